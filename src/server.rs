//! The accept loop: one task and one tracing span per session, a semaphore
//! permit per session for the concurrency cap, and graceful shutdown (stop
//! accepting, let sessions drain until the deadline, then close them).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field, info, info_span, warn};

use crate::config::Config;
use crate::session;

/// After the drain deadline, sessions are cancelled; this is how long their
/// tasks get to write their close lines.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Serves `listener` until `shutdown` is cancelled, then drains.
pub async fn run(listener: TcpListener, config: Arc<Config>, shutdown: CancellationToken) -> io::Result<()> {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(config.max_sessions));
    // Cancelled only when the drain deadline passes.
    let sessions_cancel = CancellationToken::new();
    let next_id = AtomicU64::new(1);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (stream, client) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if !config.allows(&client) {
            info!(session = id, %client, "connection refused: client address not in the allow-list");
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(session = id, %client, max_sessions = config.max_sessions, "connection refused: session limit reached");
            continue;
        };
        let span = info_span!(
            "session",
            id,
            %client,
            target = field::Empty,
            network = field::Empty,
            transport = field::Empty,
            session_id = field::Empty,
        );
        let config = config.clone();
        let cancel = sessions_cancel.clone();
        tracker.spawn(
            async move {
                session::run(stream, config, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    drop(listener);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        info!(
            open_sessions = open,
            deadline_secs = config.timeouts.shutdown.as_secs(),
            "shutting down: draining sessions"
        );
    }
    if tokio::time::timeout(config.timeouts.shutdown, tracker.wait()).await.is_err() {
        info!(open_sessions = tracker.len(), "drain deadline passed: closing remaining sessions");
        sessions_cancel.cancel();
        let _ = tokio::time::timeout(CANCEL_GRACE, tracker.wait()).await;
    }
    info!("stopped");
    Ok(())
}
