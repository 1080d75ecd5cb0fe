//! The accept loops: one per listener (the main SOCKS5/transparent port, a
//! transparent-only port, each static route), one task and one tracing span
//! per session, a semaphore permit per session for the concurrency cap, and
//! graceful shutdown (stop accepting, let sessions drain until the deadline,
//! then close them).
//!
//! Listeners are TCP sockets or Unix sockets. A Unix socket is bound with its
//! mode and group set before it listens, so no client connects in between; a
//! stale socket file nobody listens on is replaced, anything else at the path
//! stops the start; the file is removed when its listener closes. Its clients
//! are local: the IP allow-list does not apply to them (the file's
//! permissions are the access control) and the per-client cap counts them by
//! user id.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, error, field, info, info_span, warn};

use crate::config::{Config, Inbound, Listen, UnixGroup, UnixSocket};
use crate::inbound;
use crate::metrics::{LiveSession, Observer};
use crate::session::{self, FrontEnd};
use crate::state::ProxyState;
use crate::stream::{ClientKey, Peer, Stream};

/// After the drain deadline, sessions are cancelled; this is how long their
/// tasks get to write their close lines.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// How long an accept loop waits after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// At most one log line per refusal reason in this time; the refusals in
/// between are counted in the next line (and each one is logged at debug).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// A bound listener and what it serves.
pub struct Bound {
    pub listener: Listener,
    pub front: FrontEnd,
}

/// A listening socket: TCP, or a Unix socket with the file it made.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocketListener),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Listener::Tcp(listener)
    }
}

impl Listener {
    /// The address as bound: the TCP port chosen, or the socket's path.
    pub fn local(&self) -> io::Result<Listen> {
        match self {
            Listener::Tcp(listener) => listener.local_addr().map(Listen::Tcp),
            Listener::Unix(unix) => Ok(Listen::Unix(unix.file.path.clone())),
        }
    }

    async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(listener) => listener.accept().await.map(|(stream, addr)| (stream.into(), addr.into())),
            Listener::Unix(unix) => unix.listener.accept().await.map(|(stream, _)| {
                let peer = Peer::of_unix(&stream);
                (stream.into(), peer)
            }),
        }
    }
}

/// A Unix-socket listener; dropping it removes its socket file.
#[derive(Debug)]
pub struct UnixSocketListener {
    listener: UnixListener,
    file: SocketFile,
}

/// The socket file a listener created, known by device and inode so that a
/// file someone else put at the path later is never removed.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => info!(path = %self.path.display(), "socket file removed"),
                Err(e) => warn!(path = %self.path.display(), error = %e, "cannot remove socket file"),
            }
        }
    }
}

/// Queue of connections not yet accepted on a Unix socket (the TCP
/// listeners get tokio's default, also 1024).
const UNIX_BACKLOG: i32 = 1024;
/// How long the probe of an existing socket file waits for a connect.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Binds a Unix-socket listener at `path`: replaces a stale socket file,
/// binds, sets group and mode, and only then listens, so the socket never
/// accepts a client under looser permissions.
pub async fn bind_unix(path: &Path, settings: &UnixSocket) -> io::Result<UnixSocketListener> {
    let shown = format!("unix:{}", path.display());
    let failed = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {shown}: {e}"));
    clear_stale(path, &shown).await?;
    let gid = settings.group.as_ref().map(resolve_group).transpose()?;

    let socket =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(|e| failed("binding", e))?;
    let addr = socket2::SockAddr::unix(path).map_err(|e| failed("binding", e))?;
    socket.bind(&addr).map_err(|e| failed("binding", e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| failed("binding", e))?;
    // From here on a failure removes the file again.
    let file = SocketFile { path: path.to_owned(), dev: meta.dev(), ino: meta.ino() };
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| failed(&format!("giving group {gid} to"), e))?;
    }
    if !file.is_ours() {
        return Err(io::Error::other(format!("binding {shown}: the socket file was replaced while binding")));
    }
    // Never through a symlink: a file swapped in after the check above keeps
    // its mode (fchmodat refuses a link), and the check after catches it.
    let mode = nix::sys::stat::Mode::from_bits_truncate(settings.mode);
    nix::sys::stat::fchmodat(nix::fcntl::AT_FDCWD, path, mode, nix::sys::stat::FchmodatFlags::NoFollowSymlink)
        .map_err(|e| failed(&format!("setting mode {:04o} on", settings.mode), io::Error::from(e)))?;
    if !file.is_ours() {
        return Err(io::Error::other(format!("binding {shown}: the socket file was replaced while binding")));
    }
    socket.listen(UNIX_BACKLOG).map_err(|e| failed("listening on", e))?;
    socket.set_nonblocking(true).map_err(|e| failed("listening on", e))?;
    let listener = UnixListener::from_std(socket.into()).map_err(|e| failed("listening on", e))?;
    Ok(UnixSocketListener { listener, file })
}

/// What is at `path` before binding: nothing, or a socket file nobody
/// listens on (connect is refused), which is removed. A socket someone
/// listens on, or anything that is not a socket, stops the start.
async fn clear_stale(path: &Path, shown: &str) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("binding {shown}: {e}"))),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("binding {shown}: the path exists and is not a socket; not replacing it"),
        ));
    }
    let in_use = || {
        io::Error::new(io::ErrorKind::AddrInUse, format!("binding {shown}: already in use (a process listens on it)"))
    };
    match tokio::time::timeout(STALE_PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) => Err(in_use()),
        // Something is there but its queue is full: in use all the same.
        Err(_) => Err(in_use()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| {
                io::Error::new(e.kind(), format!("binding {shown}: cannot remove the stale socket file: {e}"))
            })?;
            info!(path = %path.display(), "removed a stale socket file nobody listened on");
            Ok(())
        }
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("binding {shown}: cannot tell whether the existing socket is in use: {e}"),
        )),
    }
}

/// The numeric group id of `unix_socket_group`; names are looked up through
/// the system's group database (NSS: /etc/group, LDAP, systemd-userdb...).
fn resolve_group(group: &UnixGroup) -> io::Result<u32> {
    match group {
        UnixGroup::Gid(gid) => Ok(*gid),
        UnixGroup::Name(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(group.gid.as_raw()),
            Ok(None) => {
                Err(io::Error::new(io::ErrorKind::NotFound, format!("unix_socket_group: no group named `{name}`")))
            }
            Err(e) => Err(io::Error::other(format!("unix_socket_group: looking up `{name}`: {e}"))),
        },
    }
}

/// Binds every listener the configuration asks for.
pub async fn bind_all(config: &Config) -> io::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    let bind = |addr: SocketAddr, front: FrontEnd| async move {
        let listener =
            TcpListener::bind(addr).await.map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        Ok::<_, io::Error>(Bound { listener: listener.into(), front })
    };
    if config.socks5 || config.transparent {
        for listen in &config.listen {
            match listen {
                Listen::Tcp(addr) => bound.push(bind(*addr, FrontEnd::Main).await?),
                Listen::Unix(path) => {
                    let unix = bind_unix(path, &config.unix_socket).await?;
                    bound.push(Bound { listener: Listener::Unix(unix), front: FrontEnd::Main });
                }
            }
        }
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
    serve(vec![Bound { listener: listener.into(), front: FrontEnd::Main }], state, shutdown).await
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
    refusals: RefusalLog,
}

/// Why a connection was closed at accept, before a byte was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    AllowList,
    SessionLimit,
    ClientLimit,
    InboundDeny,
    InboundLimit,
    InboundSourceLimit,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::AllowList,
        Refusal::SessionLimit,
        Refusal::ClientLimit,
        Refusal::InboundDeny,
        Refusal::InboundLimit,
        Refusal::InboundSourceLimit,
    ];

    /// The `reason` label of `connections_refused_total`.
    fn label(self) -> &'static str {
        match self {
            Refusal::AllowList => "allow_list",
            Refusal::SessionLimit => "session_limit",
            Refusal::ClientLimit => "client_limit",
            Refusal::InboundDeny => "inbound_deny",
            Refusal::InboundLimit => "inbound_limit",
            Refusal::InboundSourceLimit => "inbound_source_limit",
        }
    }

    fn why(self) -> &'static str {
        match self {
            Refusal::AllowList => "client address not in the allow-list",
            Refusal::SessionLimit => "session limit reached (max_sessions)",
            Refusal::ClientLimit => "per-client session limit reached (max_sessions_per_client)",
            Refusal::InboundDeny => "peer in the inbound deny list",
            Refusal::InboundLimit => "inbound limit reached (max_inbound)",
            Refusal::InboundSourceLimit => "per-source inbound limit reached (max_inbound_per_source)",
        }
    }
}

/// Refusals at accept, logged so that a flood of connections cannot flood
/// the log: each one at debug, and per reason one line at warn for the first
/// refusal and then at most one per [`REFUSAL_LOG_INTERVAL`], carrying how
/// many were refused since the last. `connections_refused_total` counts
/// every one.
#[derive(Default)]
struct RefusalLog {
    /// Per reason (in [`Refusal::ALL`] order): when the last line was
    /// written, and the refusals since.
    reasons: Mutex<[(Option<Instant>, u64); Refusal::ALL.len()]>,
}

impl RefusalLog {
    /// Counts a refusal at `now`; `Some(refusals since the last line)`
    /// (this one included) when a line is due.
    fn due(&self, reason: Refusal, now: Instant) -> Option<u64> {
        let index = Refusal::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        let (last, count) = &mut reasons[index];
        *count = count.saturating_add(1);
        if last.is_some_and(|at| now.saturating_duration_since(at) < REFUSAL_LOG_INTERVAL) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }

    fn refuse(&self, observer: &Observer, reason: Refusal, session: u64, client: &dyn std::fmt::Display) {
        observer.refused(reason.label());
        tracing::debug!(session, %client, reason = reason.label(), "connection refused: {}", reason.why());
        // Denied peers are the operator's own choice: nothing to warn of.
        if reason != Refusal::InboundDeny
            && let Some(refused) = self.due(reason, Instant::now())
        {
            warn!(
                %client,
                reason = reason.label(),
                refused,
                "connection refused: {} ({refused} since the last such line; at most one line a minute)",
                reason.why()
            );
        }
    }
}

/// Live sessions per client (address, or user of a Unix-socket client), for
/// `max_sessions_per_client`.
#[derive(Default)]
pub struct PerClient {
    counts: Mutex<HashMap<ClientKey, usize>>,
}

impl PerClient {
    /// Takes a slot for `key` unless it already holds `max`.
    pub fn try_take(&self, key: ClientKey, max: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, key: ClientKey) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }

    pub fn held(&self, key: ClientKey) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied().unwrap_or(0)
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
    pub client_key: ClientKey,
}

impl SessionGuard {
    /// The guard of session `live`, holding `key`'s slot in `per_client`.
    pub fn new(observer: &Arc<Observer>, live: &Arc<LiveSession>, per_client: &Arc<PerClient>, key: ClientKey) -> Self {
        SessionGuard { observer: observer.clone(), live: live.clone(), per_client: per_client.clone(), client_key: key }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.per_client.release(self.client_key);
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
        refusals: RefusalLog::default(),
    });
    for b in &bound {
        if let Listener::Tcp(listener) = &b.listener
            && let Ok(addr) = listener.local_addr()
        {
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

/// The next connection `accept` yields, or `None` once `shutdown` is
/// cancelled. A failed accept (out of file descriptors and similar) goes to
/// `failed`, and the loop backs off for [`ACCEPT_RETRY`] instead of spinning.
pub(crate) async fn next_connection<T, F: Future<Output = io::Result<T>>>(
    mut accept: impl FnMut() -> F,
    shutdown: &CancellationToken,
    failed: impl Fn(&io::Error),
) -> Option<T> {
    loop {
        let accepted = tokio::select! {
            accepted = accept() => accepted,
            _ = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok(connection) => return Some(connection),
            Err(e) => {
                failed(&e);
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// A listener's session permits, its per-client (or per-source) counts and
/// how many slots one key may hold.
type Slots<'a> = (&'a Arc<Semaphore>, &'a PerClient, usize);

impl Shared {
    /// Admits connection `id` from `who`, or refuses it (counted and logged
    /// by [`RefusalLog`]): with `denied` when that is set, before any slot is
    /// spent; else with the first of `refusals` when every permit is taken,
    /// the second when `key` holds all its slots. The permit and the key's
    /// slot are the session's until it ends.
    fn admit(
        &self,
        id: u64,
        who: &dyn std::fmt::Display,
        denied: Option<Refusal>,
        (permits, per_key, max_per_key): Slots<'_>,
        key: ClientKey,
        [all_taken, key_full]: [Refusal; 2],
    ) -> Option<OwnedSemaphorePermit> {
        let refused = match (denied, permits.clone().try_acquire_owned()) {
            (Some(reason), _) => reason,
            (None, Err(_)) => all_taken,
            (None, Ok(permit)) if per_key.try_take(key, max_per_key) => return Some(permit),
            (None, Ok(_)) => key_full,
        };
        self.refusals.refuse(&self.state.observer, refused, id, who);
        None
    }

    /// Runs an accepted session on the tracker, in its `span`, holding its
    /// concurrency `permit` until it ends and its `guard` until its task is gone.
    fn spawn_session(
        &self,
        span: Span,
        guard: SessionGuard,
        permit: OwnedSemaphorePermit,
        session: impl Future<Output = ()> + Send + 'static,
    ) {
        self.tracker.spawn(
            async move {
                let _guard = guard;
                // Boxed: a session's future is several KiB, and the task
                // wrappers (span, tracker, tokio's task cell) would each copy
                // it whole; boxed they move a pointer.
                Box::pin(session).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn accept_loop(listener: Listener, front: FrontEnd, shared: Arc<Shared>, shutdown: CancellationToken) {
    let config = &shared.state.config;
    let failed = |e: &io::Error| warn!(error = %e, "accept failed");
    while let Some((stream, client)) = next_connection(|| listener.accept(), &shutdown, failed).await {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Unix-socket clients passed the socket file's permissions instead.
        let denied = client.socket_addr().is_some_and(|addr| !config.allows(&addr)).then_some(Refusal::AllowList);
        let client_key = client.key();
        let slots = (&shared.permits, &*shared.per_client, config.max_sessions_per_client);
        let refusals = [Refusal::SessionLimit, Refusal::ClientLimit];
        let Some(permit) = shared.admit(id, &client, denied, slots, client_key, refusals) else {
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
        let (state, cancel, front) = (shared.state.clone(), shared.sessions_cancel.clone(), front.clone());
        let live = state.observer.accepted(id, client);
        let guard = SessionGuard::new(&state.observer, &live, &shared.per_client, client_key);
        shared.spawn_session(span, guard, permit, session::run(stream, front, live, state, cancel));
    }
}

/// Accepts peers of a v1-only node. No allow-list (the listener is public by
/// design); `max_inbound` and `max_inbound_per_source` instead, apart from
/// the outbound limits. Refusals are counted and logged like the main
/// listener's ([`RefusalLog`]); a peer an operator denies only at debug.
async fn inbound_accept_loop(
    bound: InboundBound,
    shared: Arc<Shared>,
    limits: Arc<InboundLimits>,
    shutdown: CancellationToken,
) {
    let InboundBound { listener, inbound } = bound;
    let config = &shared.state.config;
    let failed = |e: &io::Error| warn!(error = %e, listen = %inbound.listen, "inbound accept failed");
    while let Some((stream, peer)) = next_connection(|| listener.accept(), &shutdown, failed).await {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Dropped before a byte is read, before any limit is spent on it.
        let denied = inbound.denies(&peer).then_some(Refusal::InboundDeny);
        let peer_key = ClientKey::of_ip(peer.ip());
        let slots = (&limits.permits, &*limits.per_source, config.max_inbound_per_source);
        let refusals = [Refusal::InboundLimit, Refusal::InboundSourceLimit];
        let Some(permit) = shared.admit(id, &peer, denied, slots, peer_key, refusals) else {
            continue;
        };
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
        let guard = SessionGuard::new(&state.observer, &live, &limits.per_source, peer_key);
        shared.spawn_session(span, guard, permit, inbound::run(stream, listener, live, state, cancel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_a_minute_per_reason_with_the_count_between() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(log.due(Refusal::SessionLimit, at(0)), Some(1), "the first refusal is logged at once");
        for second in 1..=59 {
            assert_eq!(log.due(Refusal::SessionLimit, at(second)), None, "second {second}");
        }
        assert_eq!(log.due(Refusal::AllowList, at(30)), Some(1), "each reason has its own minute");
        assert_eq!(log.due(Refusal::SessionLimit, at(60)), Some(60), "59 held back, and this one");
        assert_eq!(log.due(Refusal::SessionLimit, at(61)), None);
        assert_eq!(log.due(Refusal::SessionLimit, at(500)), Some(2));
        for reason in Refusal::ALL {
            assert!(!reason.label().is_empty() && !reason.why().is_empty());
        }
    }

    /// A session accepted from 127.0.0.1:5000, holding its client's slot
    /// (of `max`), and its guard.
    fn guarded_session(max: usize) -> (Arc<Observer>, Arc<PerClient>, ClientKey, Arc<LiveSession>, SessionGuard) {
        let observer = Arc::new(Observer::default());
        let per_client = Arc::new(PerClient::default());
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let key = Peer::from(client).key();
        assert!(per_client.try_take(key, max));
        let live = observer.accepted(1, client);
        let guard = SessionGuard::new(&observer, &live, &per_client, key);
        (observer, per_client, key, live, guard)
    }

    #[tokio::test]
    async fn a_panicking_session_leaves_status_and_counts_consistent() {
        let (observer, per_client, ip, _, guard) = guarded_session(1);
        assert!(!per_client.try_take(ip, 1), "the cap holds");
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
        let (observer, per_client, key, live, guard) = guarded_session(4);
        observer.closed(&live, "closed");
        drop(guard);
        let text = observer.encode_metrics();
        assert!(text.contains("bip324_proxy_sessions_active 0"), "{text}");
        assert!(!text.contains("reason=\"panic\""), "{text}");
        assert_eq!(per_client.held(key), 0);
    }
}
