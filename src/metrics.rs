//! What operators see besides the log: Prometheus counters, the table of
//! open sessions, and the HTTP listener that serves both (`/metrics`,
//! `/status` as JSON, `/` as a small HTML page).
//!
//! [`Observer`] is always present; sessions report to it whether or not a
//! metrics listener is configured. Label values come from small fixed sets
//! (transport, reason, direction, reply code), never from client input.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::shaping::HourlyBudget;
use crate::stream::Peer;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
/// `session="<id>"`, the id the session's log lines and `/status` row carry.
type SessionLabel = [(&'static str, String); 1];

/// Write sizes on a v2 leg: power-of-two buckets, 32 B .. 4 MiB (pow2
/// padding lands on them exactly).
fn write_bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(32.0, 2.0, 18))
}

/// Gaps between one session's writes: 1 ms .. ~131 s.
fn write_gap_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// The Prometheus metrics of one proxy.
pub struct Metrics {
    registry: Registry,
    sessions_opened: Family<Labels1, Counter>,
    sessions_closed: Family<Labels2, Counter>,
    sessions_active: Gauge,
    handshake_seconds: Histogram,
    bytes: Family<Labels1, Counter>,
    messages: Family<Labels1, Counter>,
    socks_replies: Family<[(&'static str, String); 1], Counter>,
    upgrade_failures: Family<Labels1, Counter>,
    v1_only_memory: Family<Labels1, Counter>,
    connections_refused: Family<Labels1, Counter>,
    key_pool: Family<Labels1, Counter>,
    inbound: InboundMetrics,
    shaping: ShapingMetrics,
}

/// What traffic shaping spends and what the v2 legs look like on the wire,
/// shared by every session (cloning shares the counters), and the one piece
/// of shaping state all sessions share: the proxy-wide cover budget.
#[derive(Clone)]
pub struct ShapingMetrics {
    decoy_bytes: Family<Labels1, Counter>,
    padding_decoy_bytes: Counter,
    cover_decoy_bytes: Counter,
    budget_exhausted: Counter,
    cover_budget_exhausted: Family<Labels1, Counter>,
    /// `shaping.cover_global_budget_per_hour`, counted from the first cover
    /// decoy (one lock per decoy).
    cover_global: Arc<Mutex<Option<(Instant, HourlyBudget)>>>,
    v2_write_bytes: Histogram,
    v2_write_gap_seconds: Histogram,
    /// `shaping.session_histograms`: the same per live session, its series
    /// removed when it closes.
    session_write_bytes: Family<SessionLabel, Histogram>,
    session_write_gap_seconds: Family<SessionLabel, Histogram>,
    /// This session's own pair, in a copy made by [`ShapingMetrics::for_session`].
    session: Option<(Histogram, Histogram)>,
}

impl Default for ShapingMetrics {
    fn default() -> Self {
        let decoy_bytes = Family::<Labels1, Counter>::default();
        let padding_decoy_bytes = decoy_bytes.get_or_create(&[("kind", "padding")]).clone();
        let cover_decoy_bytes = decoy_bytes.get_or_create(&[("kind", "cover")]).clone();
        ShapingMetrics {
            decoy_bytes,
            padding_decoy_bytes,
            cover_decoy_bytes,
            budget_exhausted: Counter::default(),
            cover_budget_exhausted: Family::default(),
            cover_global: Arc::default(),
            v2_write_bytes: write_bytes_histogram(),
            v2_write_gap_seconds: write_gap_histogram(),
            session_write_bytes: Family::new_with_constructor(write_bytes_histogram),
            session_write_gap_seconds: Family::new_with_constructor(write_gap_histogram),
            session: None,
        }
    }
}

impl ShapingMetrics {
    /// A padding decoy of `wire` bytes went out.
    pub fn padding_decoy(&self, wire: usize) {
        self.padding_decoy_bytes.inc_by(wire as u64);
    }

    /// Handshake decoys of `wire` bytes in all went out.
    pub fn handshake_decoys(&self, wire: usize) {
        if wire > 0 {
            self.decoy_bytes.get_or_create(&[("kind", "handshake")]).inc_by(wire as u64);
        }
    }

    /// A session's padding budget ran out (counted once per session).
    pub fn budget_exhausted(&self) {
        self.budget_exhausted.inc();
    }

    /// A cover decoy of `wire` bytes went out.
    pub fn cover_decoy(&self, wire: usize) {
        self.cover_decoy_bytes.inc_by(wire as u64);
    }

    /// A session's cover decoys stopped for want of its own (`"session"`) or
    /// the proxy-wide (`"global"`) budget; counted once each time a session
    /// runs into one after having sent.
    pub fn cover_budget_exhausted(&self, scope: &'static str) {
        self.cover_budget_exhausted.get_or_create(&[("scope", scope)]).inc();
    }

    /// Takes `wire` bytes from the proxy-wide cover budget of `per_hour`
    /// bytes per hour; `false` (and nothing taken) when they do not fit.
    pub fn cover_global_spend(&self, per_hour: u64, wire: u64) -> bool {
        let Ok(mut global) = self.cover_global.lock() else { return false };
        let (origin, budget) = global.get_or_insert_with(|| (Instant::now(), HourlyBudget::new(per_hour)));
        budget.try_spend(origin.elapsed(), wire)
    }

    /// One write of `len` bytes (decoys included) on a v2 leg, `gap` after
    /// the session's previous one.
    pub fn v2_write(&self, len: usize, gap: Option<Duration>) {
        self.v2_write_bytes.observe(len as f64);
        if let Some(gap) = gap {
            self.v2_write_gap_seconds.observe(gap.as_secs_f64());
        }
        if let Some((bytes, gaps)) = &self.session {
            bytes.observe(len as f64);
            if let Some(gap) = gap {
                gaps.observe(gap.as_secs_f64());
            }
        }
    }

    /// A copy that also records into session `id`'s own histograms
    /// (`v2_session_write_bytes{session="id"}` and its gaps), which
    /// [`ShapingMetrics::forget_session`] removes.
    pub fn for_session(&self, id: u64) -> ShapingMetrics {
        let label = [("session", id.to_string())];
        let bytes = self.session_write_bytes.get_or_create(&label).clone();
        let gaps = self.session_write_gap_seconds.get_or_create(&label).clone();
        ShapingMetrics { session: Some((bytes, gaps)), ..self.clone() }
    }

    /// The copy a session's shaper records into: with its own histograms
    /// when `per_session`.
    pub fn for_shaper(&self, id: u64, per_session: bool) -> ShapingMetrics {
        if per_session { self.for_session(id) } else { self.clone() }
    }

    /// Removes session `id`'s series, if it had any.
    fn forget_session(&self, id: u64) {
        let label = [("session", id.to_string())];
        self.session_write_bytes.remove(&label);
        self.session_write_gap_seconds.remove(&label);
    }
}

/// The metrics of inbound sessions (peers of a v1-only node), apart from the
/// outbound ones so that neither side's numbers hide the other's.
#[derive(Default)]
struct InboundMetrics {
    opened: Family<Labels1, Counter>,
    closed: Family<Labels2, Counter>,
    handshake_seconds: Option<Histogram>,
    handshake_failures: Family<Labels1, Counter>,
    version_rewrites: Family<Labels1, Counter>,
    addr_rewrites: Family<Labels2, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bip324_proxy");
        let sessions_opened = Family::<Labels1, Counter>::default();
        let sessions_closed = Family::<Labels2, Counter>::default();
        let sessions_active = Gauge::default();
        // 1 ms .. ~16 s
        let handshake_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let bytes = Family::<Labels1, Counter>::default();
        let messages = Family::<Labels1, Counter>::default();
        let socks_replies = Family::<[(&'static str, String); 1], Counter>::default();
        let upgrade_failures = Family::<Labels1, Counter>::default();
        let v1_only_memory = Family::<Labels1, Counter>::default();
        let connections_refused = Family::<Labels1, Counter>::default();
        let key_pool = Family::<Labels1, Counter>::default();
        // 1 ms .. ~16 s, like the outbound handshakes.
        let inbound_handshake_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let inbound =
            InboundMetrics { handshake_seconds: Some(inbound_handshake_seconds.clone()), ..Default::default() };
        let shaping = ShapingMetrics::default();
        // Name, help and metric, in the order `/metrics` lists them.
        let registrations: &[(&str, &str, &dyn Registrable)] = &[
            (
                "sessions_opened",
                "Sessions whose relay started, by transport (v2, v1-fallback, passthrough)",
                &sessions_opened,
            ),
            (
                "sessions_closed",
                "Sessions closed, by transport (none if the relay never started) and close reason",
                &sessions_closed,
            ),
            ("sessions_active", "Sessions open now, from accept to close", &sessions_active),
            (
                "handshake_duration_seconds",
                "Time for a successful BIP324 handshake with the remote",
                &handshake_seconds,
            ),
            ("bytes", "Bytes received, by direction, counted as they flow", &bytes),
            ("messages", "P2P messages carried, by direction, counted as they flow", &messages),
            ("socks_replies", "SOCKS5 replies sent, by reply code", &socks_replies),
            ("upgrade_failures", "Failed BIP324 handshakes, by reason", &upgrade_failures),
            (
                "v1_only_memory",
                "Sessions decided by the v1-only peer memory, by action (refused, direct_v1)",
                &v1_only_memory,
            ),
            (
                "connections_refused",
                "Connections closed at accept, by reason (allow_list, session_limit, client_limit, \
                 metrics_allow_list, metrics_limit, inbound_limit, inbound_source_limit, inbound_deny)",
                &connections_refused,
            ),
            (
                "key_pool",
                "Handshake keys taken, by result: hit (made ahead of time by the key pool) or miss \
                 (made on the session's critical path because the pool was empty)",
                &key_pool,
            ),
            ("inbound_sessions_opened", "Inbound sessions whose relay started, by transport (v2, v1)", &inbound.opened),
            (
                "inbound_sessions_closed",
                "Inbound sessions closed, by transport (none if the relay never started) and close reason",
                &inbound.closed,
            ),
            (
                "inbound_handshake_duration_seconds",
                "Time for a successful BIP324 handshake as responder, from accept",
                &inbound_handshake_seconds,
            ),
            (
                "inbound_handshake_failures",
                "Failed BIP324 handshakes as responder, by reason",
                &inbound.handshake_failures,
            ),
            (
                "inbound_version_rewrites",
                "The node's first message on inbound sessions, by what the NODE_P2P_V2 rewrite did \
                 (set, already_set, not_version, too_short, malformed)",
                &inbound.version_rewrites,
            ),
            (
                "inbound_addr_rewrites",
                "The node's addr and addrv2 messages on inbound listeners with `advertise`, by command \
                 and what the NODE_P2P_V2 rewrite did (set, already_set, other_addresses, malformed)",
                &inbound.addr_rewrites,
            ),
            (
                "shaping_decoy_bytes",
                "Decoy bytes written on v2 legs (packet overhead included), by kind (padding, handshake, cover)",
                &shaping.decoy_bytes,
            ),
            (
                "shaping_cover_budget_exhausted",
                "Times a session's cover decoys stopped for want of budget, by scope (session, global)",
                &shaping.cover_budget_exhausted,
            ),
            (
                "shaping_budget_exhausted",
                "Sessions whose padding budget ran out (later writes went out unpadded)",
                &shaping.budget_exhausted,
            ),
            (
                "v2_write_bytes",
                "Sizes of the writes on v2 legs, decoys included (recorded with [shaping] padding, cover or measure on)",
                &shaping.v2_write_bytes,
            ),
            (
                "v2_write_gap_seconds",
                "Time between one session's consecutive writes on a v2 leg (recorded like v2_write_bytes)",
                &shaping.v2_write_gap_seconds,
            ),
            (
                "v2_session_write_bytes",
                "v2_write_bytes of each open session, by session id (with [shaping] session_histograms on)",
                &shaping.session_write_bytes,
            ),
            (
                "v2_session_write_gap_seconds",
                "v2_write_gap_seconds of each open session, by session id (with [shaping] session_histograms on)",
                &shaping.session_write_gap_seconds,
            ),
        ];
        for (name, help, metric) in registrations {
            metric.register_in(&mut registry, name, help);
        }
        Metrics {
            registry,
            inbound,
            shaping,
            sessions_opened,
            sessions_closed,
            sessions_active,
            handshake_seconds,
            bytes,
            messages,
            socks_replies,
            upgrade_failures,
            v1_only_memory,
            connections_refused,
            key_pool,
        }
    }
}

/// A metric the registry keeps a handle of (cloning a metric shares its
/// values), so that one table can list metrics of every type.
trait Registrable {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str);
}

impl<M: Metric + Clone> Registrable for M {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.clone());
    }
}

/// The key pool's counters (cloning shares them): keys handed out ready and
/// keys made on the spot.
#[derive(Debug, Clone, Default)]
pub struct KeyPoolCounters {
    pub hit: Counter,
    pub miss: Counter,
}

/// The direction traffic flows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToRemote,
    RemoteToClient,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::ClientToRemote => "client_to_remote",
            Direction::RemoteToClient => "remote_to_client",
        }
    }
}

/// The proxy-wide byte and message totals, by direction (the Prometheus
/// counters themselves: cloning shares them).
#[derive(Debug, Clone, Default)]
struct Totals {
    bytes: [Counter; 2],
    messages: [Counter; 2],
}

/// Live counters of one session, shared with its relay. Every batch the
/// relay reads or translates moves the session's own counters and the
/// proxy-wide totals at once, so a scrape during a days-long P2P session
/// sees its traffic as it flows.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub bytes_client_to_remote: AtomicU64,
    pub bytes_remote_to_client: AtomicU64,
    pub messages_client_to_remote: AtomicU64,
    pub messages_remote_to_client: AtomicU64,
    totals: Totals,
}

impl LiveCounters {
    /// Counts `bytes` received and `messages` carried in `direction`.
    pub fn add(&self, direction: Direction, bytes: u64, messages: u64) {
        let (own_bytes, own_messages, i) = match direction {
            Direction::ClientToRemote => (&self.bytes_client_to_remote, &self.messages_client_to_remote, 0),
            Direction::RemoteToClient => (&self.bytes_remote_to_client, &self.messages_remote_to_client, 1),
        };
        if bytes > 0 {
            own_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.totals.bytes[i].inc_by(bytes);
        }
        if messages > 0 {
            own_messages.fetch_add(messages, Ordering::Relaxed);
            self.totals.messages[i].inc_by(messages);
        }
    }
}

/// An open session as `/status` shows it.
#[derive(Debug)]
pub struct LiveSession {
    pub id: u64,
    /// `/status` shows it as text: an address, or `unix:uid=..,pid=..`.
    pub client: Peer,
    started: Instant,
    started_unix: u64,
    target: OnceLock<String>,
    network: OnceLock<String>,
    transport: OnceLock<&'static str>,
    session_id: OnceLock<String>,
    /// Inbound sessions: the proxy's own address on its connection to the
    /// node, which the node lists as this peer's address.
    node_local: OnceLock<String>,
    /// Set for sessions accepted on an inbound listener.
    inbound: OnceLock<()>,
    pub counters: Arc<LiveCounters>,
}

impl LiveSession {
    pub fn set_target(&self, target: String) {
        let _ = self.target.set(target);
    }
    pub fn set_network(&self, network: String) {
        let _ = self.network.set(network);
    }
    pub fn set_transport(&self, transport: &'static str) {
        let _ = self.transport.set(transport);
    }
    pub fn set_session_id(&self, session_id: String) {
        let _ = self.session_id.set(session_id);
    }
    pub fn set_node_local(&self, node_local: String) {
        let _ = self.node_local.set(node_local);
    }
    pub fn transport(&self) -> Option<&'static str> {
        self.transport.get().copied()
    }
    /// Whether this is a peer of a v1-only node on an inbound listener.
    pub fn is_inbound(&self) -> bool {
        self.inbound.get().is_some()
    }
    /// `inbound` or `outbound`, as `/status` shows it.
    pub fn direction(&self) -> &'static str {
        if self.is_inbound() { "inbound" } else { "outbound" }
    }
}

/// One row of `/status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionRow {
    pub id: u64,
    /// `outbound` (a client of the proxy) or `inbound` (a peer of a v1-only
    /// node; `client` is the peer, `target` the node).
    pub direction: &'static str,
    pub client: String,
    pub target: Option<String>,
    pub network: Option<String>,
    pub transport: Option<String>,
    pub session_id: Option<String>,
    /// Inbound sessions: the address the node sees this peer as (the
    /// proxy's end of its connection to the node, e.g. `127.0.0.1:50312`),
    /// to match a `getpeerinfo` entry to `client`, the real peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_local: Option<String>,
    pub started_unix: u64,
    pub age_secs: u64,
    pub bytes_client_to_remote: u64,
    pub bytes_remote_to_client: u64,
    pub messages_client_to_remote: u64,
    pub messages_remote_to_client: u64,
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub open_sessions: usize,
    /// Share of open sessions with a relay that are carried over v2 (0..=1).
    pub v2_share: Option<f64>,
    pub sessions: Vec<SessionRow>,
}

/// Everything sessions report to.
pub struct Observer {
    pub metrics: Metrics,
    started: Instant,
    sessions: Mutex<BTreeMap<u64, Arc<LiveSession>>>,
}

impl Default for Observer {
    fn default() -> Self {
        Observer { metrics: Metrics::default(), started: Instant::now(), sessions: Mutex::new(BTreeMap::new()) }
    }
}

impl Observer {
    /// A session was accepted; it is listed until [`Observer::closed`].
    pub fn accepted(&self, id: u64, client: impl Into<Peer>) -> Arc<LiveSession> {
        let client = client.into();
        let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let session = Arc::new(LiveSession {
            id,
            client,
            started: Instant::now(),
            started_unix,
            target: OnceLock::new(),
            network: OnceLock::new(),
            transport: OnceLock::new(),
            session_id: OnceLock::new(),
            node_local: OnceLock::new(),
            inbound: OnceLock::new(),
            counters: Arc::new(LiveCounters { totals: self.totals(), ..Default::default() }),
        });
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(id, session.clone());
        self.metrics.sessions_active.inc();
        session
    }

    /// A peer was accepted on an inbound listener; it is listed until
    /// [`Observer::closed`] and counted with the inbound metrics.
    pub fn accepted_inbound(&self, id: u64, peer: std::net::SocketAddr) -> Arc<LiveSession> {
        let session = self.accepted(id, peer);
        let _ = session.inbound.set(());
        session
    }

    /// The relay started with this transport.
    pub fn opened(&self, session: &LiveSession, transport: &'static str) {
        session.set_transport(transport);
        let family = if session.is_inbound() { &self.metrics.inbound.opened } else { &self.metrics.sessions_opened };
        family.get_or_create(&[("transport", transport)]).inc();
    }

    /// A responder handshake completed, `took` after accept.
    pub fn inbound_handshake_done(&self, took: Duration) {
        if let Some(histogram) = &self.metrics.inbound.handshake_seconds {
            histogram.observe(took.as_secs_f64());
        }
    }

    pub fn inbound_handshake_failed(&self, reason: &'static str) {
        self.metrics.inbound.handshake_failures.get_or_create(&[("reason", reason)]).inc();
    }

    /// What the NODE_P2P_V2 rewrite did to a node's first message.
    pub fn inbound_version_rewrite(&self, outcome: &'static str) {
        self.metrics.inbound.version_rewrites.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// What the NODE_P2P_V2 rewrite did to one of the node's `addr`/`addrv2`
    /// messages.
    pub fn inbound_addr_rewrite(&self, command: &'static str, outcome: &'static str) {
        self.metrics.inbound.addr_rewrites.get_or_create(&[("command", command), ("outcome", outcome)]).inc();
    }

    /// The counters the handshake key pool moves as sessions take keys.
    pub fn key_pool_counters(&self) -> KeyPoolCounters {
        let family = &self.metrics.key_pool;
        // One statement each: the family's read guard must be gone before
        // the next get_or_create takes its write lock.
        let hit = family.get_or_create(&[("result", "hit")]).clone();
        let miss = family.get_or_create(&[("result", "miss")]).clone();
        KeyPoolCounters { hit, miss }
    }

    /// The shaping counters, for a session's relay and handshake.
    pub fn shaping(&self) -> &ShapingMetrics {
        &self.metrics.shaping
    }

    pub fn handshake_done(&self, took: Duration) {
        self.metrics.handshake_seconds.observe(took.as_secs_f64());
    }

    pub fn upgrade_failed(&self, reason: &'static str) {
        self.metrics.upgrade_failures.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn socks_reply(&self, code: u8) {
        self.metrics.socks_replies.get_or_create(&[("code", reply_label(code))]).inc();
    }

    pub fn v1_only_memory(&self, action: &'static str) {
        self.metrics.v1_only_memory.get_or_create(&[("action", action)]).inc();
    }

    /// A connection was closed at accept, before any session started.
    pub fn refused(&self, reason: &'static str) {
        self.metrics.connections_refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// Whether the session is still listed (not yet [`Observer::closed`]).
    pub fn is_open(&self, session: &LiveSession) -> bool {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&session.id)
    }

    /// The session ended; its traffic goes into the totals. Only the first
    /// call for a session counts, so a guard may call it again on every path.
    pub fn closed(&self, session: &LiveSession, reason: &'static str) {
        if self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&session.id).is_none() {
            return;
        }
        self.metrics.sessions_active.dec();
        self.metrics.shaping.forget_session(session.id);
        let transport = session.transport().unwrap_or("none");
        let family = if session.is_inbound() { &self.metrics.inbound.closed } else { &self.metrics.sessions_closed };
        family.get_or_create(&[("transport", transport), ("reason", reason)]).inc();
    }

    /// The proxy-wide traffic counters, for a new session to move.
    fn totals(&self) -> Totals {
        let counter = |family: &Family<Labels1, Counter>, direction: Direction| {
            family.get_or_create(&[("direction", direction.label())]).clone()
        };
        let directions = [Direction::ClientToRemote, Direction::RemoteToClient];
        Totals {
            bytes: directions.map(|d| counter(&self.metrics.bytes, d)),
            messages: directions.map(|d| counter(&self.metrics.messages, d)),
        }
    }

    /// The open sessions, oldest first.
    pub fn status(&self) -> Status {
        let sessions: Vec<SessionRow> = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| SessionRow {
                id: s.id,
                direction: s.direction(),
                client: s.client.to_string(),
                target: s.target.get().cloned(),
                network: s.network.get().cloned(),
                transport: s.transport.get().map(|t| (*t).to_owned()),
                session_id: s.session_id.get().cloned(),
                node_local: s.node_local.get().cloned(),
                started_unix: s.started_unix,
                age_secs: s.started.elapsed().as_secs(),
                bytes_client_to_remote: s.counters.bytes_client_to_remote.load(Ordering::Relaxed),
                bytes_remote_to_client: s.counters.bytes_remote_to_client.load(Ordering::Relaxed),
                messages_client_to_remote: s.counters.messages_client_to_remote.load(Ordering::Relaxed),
                messages_remote_to_client: s.counters.messages_remote_to_client.load(Ordering::Relaxed),
            })
            .collect();
        let relayed = sessions.iter().filter(|s| s.transport.is_some()).count();
        let v2 = sessions.iter().filter(|s| s.transport.as_deref() == Some("v2")).count();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.started.elapsed().as_secs(),
            open_sessions: sessions.len(),
            v2_share: (relayed > 0).then(|| v2 as f64 / relayed as f64),
            sessions,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.metrics.registry);
        out
    }
}

fn reply_label(code: u8) -> String {
    format!("{code:#04x}")
}

const STATUS_PAGE: &str = include_str!("status.html");

/// A connection to the metrics listener lives at most this many request
/// timeouts (60 s by default), so a client that never reads its response
/// cannot hold a slot; scrapers simply reconnect.
pub const CONNECTION_LIFETIME_TIMEOUTS: u32 = 6;
/// At shutdown, how long an open metrics connection may finish its response.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `/metrics`, `/status` and `/` until `shutdown`.
///
/// A client the allow-list refuses is closed at accept, before any HTTP (the
/// page shows client addresses and targets). At most
/// `metrics_max_connections` connections are served at once; more are closed
/// at accept. A connection must deliver each request's headers within
/// `metrics_request_timeout` (the wait on an idle keep-alive connection
/// included) and is closed after [`CONNECTION_LIFETIME_TIMEOUTS`] of them in all.
pub async fn serve(
    listener: TcpListener,
    observer: Arc<Observer>,
    config: Arc<crate::config::Config>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .route("/", get(status_page))
        .with_state(observer.clone());
    let slots = Arc::new(Semaphore::new(config.metrics_max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(config.metrics_request_timeout);
    let lifetime = config.metrics_request_timeout * CONNECTION_LIFETIME_TIMEOUTS;
    let connections = TaskTracker::new();
    let failed = |e: &std::io::Error| tracing::warn!(error = %e, "metrics accept failed");
    while let Some((stream, client)) = crate::server::next_connection(|| listener.accept(), &shutdown, failed).await {
        // Refusals are counted, not logged one by one: a flood must not flood the log.
        if !config.allows(&client) {
            tracing::debug!(%client, "metrics connection refused: client address not in the allow-list");
            observer.refused("metrics_allow_list");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%client, "metrics connection refused: connection limit reached");
            observer.refused("metrics_limit");
            continue;
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = tokio::time::sleep(lifetime) => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE * 2, connections.wait()).await;
    Ok(())
}

async fn metrics_text(State(observer): State<Arc<Observer>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], observer.encode_metrics())
}

async fn status_json(State(observer): State<Arc<Observer>>) -> impl IntoResponse {
    axum::Json(observer.status())
}

async fn status_page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_labels_are_hex() {
        assert_eq!(reply_label(0x00), "0x00");
        assert_eq!(reply_label(0x05), "0x05");
        assert_eq!(reply_label(0xf1), "0xf1");
    }

    #[test]
    fn sessions_are_listed_until_closed_and_counted() {
        let observer = Observer::default();
        let a = observer.accepted(1, "127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap());
        let b = observer.accepted(2, "127.0.0.1:2".parse::<std::net::SocketAddr>().unwrap());
        observer.opened(&a, "v2");
        a.set_session_id("ab".repeat(32));
        a.counters.add(Direction::ClientToRemote, 100, 1);
        // Totals move while the session is open.
        assert!(
            observer.encode_metrics().contains("bip324_proxy_bytes_total{direction=\"client_to_remote\"} 100"),
            "{}",
            observer.encode_metrics()
        );
        observer.opened(&b, "v1-fallback");
        let status = observer.status();
        assert_eq!(status.open_sessions, 2);
        assert_eq!(status.v2_share, Some(0.5));
        assert_eq!(status.sessions[0].session_id.as_deref(), Some("ab".repeat(32).as_str()));
        observer.closed(&a, "closed");
        observer.closed(&b, "idle");
        assert_eq!(observer.status().open_sessions, 0);
        let text = observer.encode_metrics();
        assert!(text.contains("bip324_proxy_sessions_opened_total{transport=\"v2\"} 1"), "{text}");
        assert!(text.contains("bip324_proxy_sessions_closed_total{transport=\"v2\",reason=\"closed\"} 1"), "{text}");
        assert!(text.contains("bip324_proxy_bytes_total{direction=\"client_to_remote\"} 100"), "{text}");
        assert!(text.contains("bip324_proxy_sessions_active 0"), "{text}");
    }

    #[test]
    fn key_pool_hits_and_misses_are_exposed() {
        let observer = Observer::default();
        let counters = observer.key_pool_counters();
        counters.hit.inc();
        counters.hit.inc();
        // A second handle shares the counters.
        observer.key_pool_counters().miss.inc();
        let text = observer.encode_metrics();
        assert!(text.contains("bip324_proxy_key_pool_total{result=\"hit\"} 2"), "{text}");
        assert!(text.contains("bip324_proxy_key_pool_total{result=\"miss\"} 1"), "{text}");
    }

    #[test]
    fn inbound_sessions_are_counted_apart_and_shown_with_their_direction() {
        let observer = Observer::default();
        let outbound = observer.accepted(1, "127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap());
        let inbound = observer.accepted_inbound(2, "203.0.113.9:50000".parse().unwrap());
        observer.opened(&outbound, "v2");
        observer.opened(&inbound, "v2");
        let status = observer.status();
        assert_eq!(status.sessions[0].direction, "outbound");
        assert_eq!(status.sessions[1].direction, "inbound");
        assert_eq!(status.sessions[1].client, "203.0.113.9:50000");
        observer.closed(&inbound, "closed");
        let text = observer.encode_metrics();
        assert!(text.contains("bip324_proxy_inbound_sessions_opened_total{transport=\"v2\"} 1"), "{text}");
        assert!(text.contains("bip324_proxy_sessions_opened_total{transport=\"v2\"} 1"), "{text}");
        assert!(
            text.contains("bip324_proxy_inbound_sessions_closed_total{transport=\"v2\",reason=\"closed\"} 1"),
            "{text}"
        );
        assert!(!text.contains("bip324_proxy_sessions_closed_total"), "{text}");
        assert!(text.contains("bip324_proxy_sessions_active 1"), "{text}");
    }
}
