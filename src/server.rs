//! The accept loops: one per listener (the main SOCKS5/transparent port, a
//! transparent-only port, each static route), one task and one tracing span
//! per session, a semaphore permit per session for the concurrency cap, and
//! graceful shutdown (stop accepting, let sessions drain until the deadline,
//! then close them).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field, info, info_span, warn};

use crate::config::Config;
use crate::memory::V1OnlyMemory;
use crate::metrics::Observer;
use crate::session::{self, FrontEnd};
use crate::upgrade::KeyPool;

/// What every session of one proxy shares.
pub struct Context {
    pub config: Arc<Config>,
    pub observer: Arc<Observer>,
    pub v1_only: Option<V1OnlyMemory>,
    /// Handshake keys made ahead of time for the allowed networks.
    pub keys: Arc<KeyPool>,
    /// Every address this proxy listens on, as bound (sessions never dial them).
    listening: Mutex<Vec<SocketAddr>>,
}

/// Keys kept ready per allowed network.
const KEY_POOL_DEPTH: usize = 8;

impl Context {
    pub fn new(config: Arc<Config>, observer: Arc<Observer>) -> Self {
        let (capacity, ttl) = config.v1_only_memory;
        let keys = KeyPool::new(config.networks.iter().map(|n| n.magic), KEY_POOL_DEPTH);
        let listening = Mutex::new(config.listen_addresses().into_iter().map(|(_, addr)| addr).collect());
        Context { v1_only: V1OnlyMemory::new(capacity, ttl), config, observer, keys, listening }
    }

    /// Records an address a listener of this proxy is bound to.
    pub fn add_listening(&self, addr: SocketAddr) {
        let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        if !listening.contains(&addr) {
            listening.push(addr);
        }
    }

    /// Every address this proxy listens on: configured and bound.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// After the drain deadline, sessions are cancelled; this is how long their
/// tasks get to write their close lines.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// A bound listener and what it serves.
pub struct Bound {
    pub listener: TcpListener,
    pub front: FrontEnd,
}

/// Binds every listener the configuration asks for.
pub async fn bind_all(config: &Config) -> io::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    let bind = |addr: SocketAddr, front: FrontEnd| async move {
        let listener =
            TcpListener::bind(addr).await.map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        Ok::<_, io::Error>(Bound { listener, front })
    };
    if config.socks5 || config.transparent {
        bound.push(bind(config.listen, FrontEnd::Main).await?);
    }
    if let Some(addr) = config.transparent_listen {
        bound.push(bind(addr, FrontEnd::Transparent).await?);
    }
    for route in &config.routes {
        bound.push(bind(route.listen, FrontEnd::Route(route.target.clone())).await?);
    }
    Ok(bound)
}

/// Serves one main listener until `shutdown` is cancelled, then drains.
pub async fn run(listener: TcpListener, config: Arc<Config>, shutdown: CancellationToken) -> io::Result<()> {
    let context = Arc::new(Context::new(config, Arc::new(Observer::default())));
    serve(vec![Bound { listener, front: FrontEnd::Main }], context, shutdown).await
}

/// State the accept loops share.
struct Shared {
    context: Arc<Context>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    /// Cancelled only when the drain deadline passes.
    sessions_cancel: CancellationToken,
    next_id: AtomicU64,
}

/// Serves every listener until `shutdown` is cancelled, then drains.
pub async fn serve(bound: Vec<Bound>, context: Arc<Context>, shutdown: CancellationToken) -> io::Result<()> {
    let config = context.config.clone();
    let shared = Arc::new(Shared {
        permits: Arc::new(Semaphore::new(config.max_sessions)),
        context,
        tracker: TaskTracker::new(),
        sessions_cancel: CancellationToken::new(),
        next_id: AtomicU64::new(1),
    });
    for b in &bound {
        if let Ok(addr) = b.listener.local_addr() {
            shared.context.add_listening(addr);
        }
    }
    let mut loops = JoinSet::new();
    for Bound { listener, front } in bound {
        loops.spawn(accept_loop(listener, front, shared.clone(), shutdown.clone()));
    }
    loops.join_all().await;

    let tracker = &shared.tracker;
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
        shared.sessions_cancel.cancel();
        let _ = tokio::time::timeout(CANCEL_GRACE, tracker.wait()).await;
    }
    info!("stopped");
    Ok(())
}

async fn accept_loop(listener: TcpListener, front: FrontEnd, shared: Arc<Shared>, shutdown: CancellationToken) {
    let config = &shared.context.config;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
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
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if !config.allows(&client) {
            info!(session = id, %client, "connection refused: client address not in the allow-list");
            continue;
        }
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
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
        let (context, cancel, front) = (shared.context.clone(), shared.sessions_cancel.clone(), front.clone());
        let live = context.observer.accepted(id, client);
        shared.tracker.spawn(
            async move {
                session::run(stream, front, live, context, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}
