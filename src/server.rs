//! The accept loops: one per listener (the main SOCKS5/transparent port, a
//! transparent-only port, each static route), one task and one tracing span
//! per session, a semaphore permit per session for the concurrency cap, and
//! graceful shutdown (stop accepting, let sessions drain until the deadline,
//! then close them).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, field, info, info_span, warn};

use crate::config::{Config, Inbound};
use crate::inbound;
use crate::metrics::{LiveSession, Observer};
use crate::session::{self, FrontEnd};
use crate::state::ProxyState;

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

/// A bound inbound listener (internet-facing) and the node behind it.
pub struct InboundBound {
    pub listener: TcpListener,
    pub inbound: Arc<Inbound>,
}

/// Binds every inbound listener the configuration asks for.
pub async fn bind_inbound(config: &Config) -> io::Result<Vec<InboundBound>> {
    let mut bound = Vec::new();
    for inbound in &config.inbound {
        let addr = inbound.listen;
        let listener =
            TcpListener::bind(addr).await.map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        bound.push(InboundBound { listener, inbound: Arc::new(inbound.clone()) });
    }
    Ok(bound)
}

/// Serves one main listener until `shutdown` is cancelled, then drains.
pub async fn run(listener: TcpListener, config: Arc<Config>, shutdown: CancellationToken) -> io::Result<()> {
    let state = Arc::new(ProxyState::new(config, Arc::new(Observer::default())));
    serve(vec![Bound { listener, front: FrontEnd::Main }], state, shutdown).await
}

/// State the accept loops share.
struct Shared {
    state: Arc<ProxyState>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    /// Cancelled only when the drain deadline passes.
    sessions_cancel: CancellationToken,
    next_id: AtomicU64,
    per_client: Arc<PerClient>,
}

/// Live sessions per client address, for `max_sessions_per_client`.
#[derive(Default)]
pub struct PerClient {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    /// Takes a slot for `ip` unless it already holds `max`.
    pub fn try_take(&self, ip: IpAddr, max: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, ip: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&ip);
            }
        }
    }

    pub fn held(&self, ip: IpAddr) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).copied().unwrap_or(0)
    }
}

/// Owned by a session's task from accept to its end, however it ends: its
/// drop gives back the session's per-client slot and, if the session did not
/// close its own status row (it panicked), closes it and logs one line, so
/// `/status` and `sessions_active` never keep a dead session.
pub struct SessionGuard {
    pub observer: Arc<Observer>,
    pub live: Arc<LiveSession>,
    pub per_client: Arc<PerClient>,
    pub client_ip: IpAddr,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.per_client.release(self.client_ip);
        if self.observer.is_open(&self.live) {
            error!(session = self.live.id, client = %self.live.client, "session task ended without closing (panic)");
            self.observer.closed(&self.live, "panic");
        }
    }
}

/// Serves every listener until `shutdown` is cancelled, then drains.
pub async fn serve(bound: Vec<Bound>, state: Arc<ProxyState>, shutdown: CancellationToken) -> io::Result<()> {
    serve_with_inbound(bound, Vec::new(), state, shutdown).await
}

/// Inbound sessions' own limits, so that a flood of inbound connections
/// never takes the permits outbound sessions need.
struct InboundLimits {
    permits: Arc<Semaphore>,
    per_source: Arc<PerClient>,
}

/// Serves every listener, inbound listeners included, until `shutdown` is
/// cancelled, then drains.
pub async fn serve_with_inbound(
    bound: Vec<Bound>,
    inbound: Vec<InboundBound>,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let config = state.config.clone();
    let shared = Arc::new(Shared {
        permits: Arc::new(Semaphore::new(config.max_sessions)),
        state,
        tracker: TaskTracker::new(),
        sessions_cancel: CancellationToken::new(),
        next_id: AtomicU64::new(1),
        per_client: Arc::new(PerClient::default()),
    });
    for b in &bound {
        if let Ok(addr) = b.listener.local_addr() {
            shared.state.add_listening(addr);
        }
    }
    for b in &inbound {
        if let Ok(addr) = b.listener.local_addr() {
            shared.state.add_listening(addr);
        }
    }
    let mut loops = JoinSet::new();
    for Bound { listener, front } in bound {
        loops.spawn(accept_loop(listener, front, shared.clone(), shutdown.clone()));
    }
    let limits = Arc::new(InboundLimits {
        permits: Arc::new(Semaphore::new(config.max_inbound)),
        per_source: Arc::new(PerClient::default()),
    });
    for b in inbound {
        loops.spawn(inbound_accept_loop(b, shared.clone(), limits.clone(), shutdown.clone()));
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
    let config = &shared.state.config;
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
        let observer = &shared.state.observer;
        if !config.allows(&client) {
            info!(session = id, %client, "connection refused: client address not in the allow-list");
            observer.refused("allow_list");
            continue;
        }
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            warn!(session = id, %client, max_sessions = config.max_sessions, "connection refused: session limit reached");
            observer.refused("session_limit");
            continue;
        };
        let client_ip = client.ip().to_canonical();
        if !shared.per_client.try_take(client_ip, config.max_sessions_per_client) {
            warn!(
                session = id,
                %client,
                max_sessions_per_client = config.max_sessions_per_client,
                "connection refused: per-client session limit reached"
            );
            observer.refused("client_limit");
            continue;
        }
        let span = info_span!(
            "session",
            id,
            %client,
            target = field::Empty,
            network = field::Empty,
            transport = field::Empty,
            session_id = field::Empty,
        );
        let (state, cancel, front) = (shared.state.clone(), shared.sessions_cancel.clone(), front.clone());
        let live = state.observer.accepted(id, client);
        let guard = SessionGuard {
            observer: state.observer.clone(),
            live: live.clone(),
            per_client: shared.per_client.clone(),
            client_ip,
        };
        shared.tracker.spawn(
            async move {
                let _guard = guard;
                session::run(stream, front, live, state, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Accepts peers of a v1-only node. No allow-list (the listener is public by
/// design); `max_inbound` and `max_inbound_per_source` instead, apart from
/// the outbound limits. Refusals are counted and logged at debug level only:
/// a flood from the internet must not flood the log.
async fn inbound_accept_loop(
    bound: InboundBound,
    shared: Arc<Shared>,
    limits: Arc<InboundLimits>,
    shutdown: CancellationToken,
) {
    let InboundBound { listener, inbound } = bound;
    let config = &shared.state.config;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, listen = %inbound.listen, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let observer = &shared.state.observer;
        let Ok(permit) = limits.permits.clone().try_acquire_owned() else {
            tracing::debug!(session = id, %peer, max_inbound = config.max_inbound, "inbound connection refused: limit reached");
            observer.refused("inbound_limit");
            continue;
        };
        let peer_ip = peer.ip().to_canonical();
        if !limits.per_source.try_take(peer_ip, config.max_inbound_per_source) {
            tracing::debug!(
                session = id,
                %peer,
                max_inbound_per_source = config.max_inbound_per_source,
                "inbound connection refused: per-source limit reached"
            );
            observer.refused("inbound_source_limit");
            continue;
        }
        let span = info_span!(
            "inbound",
            id,
            direction = "inbound",
            %peer,
            node = %inbound.node,
            network = %inbound.network,
            transport = field::Empty,
            session_id = field::Empty,
        );
        let (state, cancel, listener) = (shared.state.clone(), shared.sessions_cancel.clone(), inbound.clone());
        let live = state.observer.accepted_inbound(id, peer);
        let guard = SessionGuard {
            observer: state.observer.clone(),
            live: live.clone(),
            per_client: limits.per_source.clone(),
            client_ip: peer_ip,
        };
        shared.tracker.spawn(
            async move {
                let _guard = guard;
                inbound::run(stream, listener, live, state, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_session_leaves_status_and_counts_consistent() {
        let observer = Arc::new(Observer::default());
        let per_client = Arc::new(PerClient::default());
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let ip = client.ip();
        assert!(per_client.try_take(ip, 1));
        assert!(!per_client.try_take(ip, 1), "the cap holds");
        let live = observer.accepted(7, client);
        let guard = SessionGuard { observer: observer.clone(), live, per_client: per_client.clone(), client_ip: ip };
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("a bug in a session");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(observer.status().open_sessions, 0);
        let text = observer.encode_metrics();
        assert!(text.contains("bip324_proxy_sessions_active 0"), "{text}");
        assert!(text.contains("bip324_proxy_sessions_closed_total{transport=\"none\",reason=\"panic\"} 1"), "{text}");
        assert_eq!(per_client.held(ip), 0);
        assert!(per_client.try_take(ip, 1), "the slot came back");
    }

    #[tokio::test]
    async fn a_session_that_closed_itself_is_counted_once() {
        let observer = Arc::new(Observer::default());
        let per_client = Arc::new(PerClient::default());
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert!(per_client.try_take(client.ip(), 4));
        let live = observer.accepted(1, client);
        let guard = SessionGuard {
            observer: observer.clone(),
            live: live.clone(),
            per_client: per_client.clone(),
            client_ip: client.ip(),
        };
        observer.closed(&live, "closed");
        drop(guard);
        let text = observer.encode_metrics();
        assert!(text.contains("bip324_proxy_sessions_active 0"), "{text}");
        assert!(!text.contains("reason=\"panic\""), "{text}");
        assert_eq!(per_client.held(client.ip()), 0);
    }
}
