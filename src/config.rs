//! Configuration: a TOML file (every key optional, unknown keys rejected),
//! overridden by command-line flags and `BIP324_PROXY_*` environment
//! variables, validated once into a plain [`Config`].
//!
//! The embedded defaults are the ones `config/bip324-proxy.toml` documents;
//! a test keeps the two in step.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use serde::Deserialize;

use crate::network::{self, Network, NetworkSet};
use crate::policy::{self, ClientRestrictions, Front};
use crate::shaping::{FileShaping, Shaping};
use crate::socks5::{Host, Target, TargetError};

/// Default listen address: loopback only, the port of the product.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1324";
/// Prefix of a Unix-socket listen address, as Bitcoin Core writes its
/// `-proxy=unix:/path` (`ADDR_PREFIX_UNIX` in netbase.h).
pub const UNIX_PREFIX: &str = "unix:";
/// Longest Unix-socket path, in bytes: `sun_path` is 108 bytes on Linux and
/// holds the terminating NUL.
pub const MAX_UNIX_PATH_BYTES: usize = 107;
/// Most `listen` addresses.
pub const MAX_LISTEN_ADDRESSES: usize = 16;
/// Default mode of a Unix-socket listener: owner and group may connect.
pub const DEFAULT_UNIX_SOCKET_MODE: &str = "0660";
/// Bitcoin Core's own inactivity timeout (TIMEOUT_INTERVAL, 20 minutes): an
/// idle timeout shorter than that would cut sessions Core still considers live.
pub const MIN_IDLE_TIMEOUT_SECS: u64 = 20 * 60;

/// What to do when the remote does not speak v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// v2 or nothing: the session is closed.
    #[default]
    None,
    /// Bitcoin Core's rule: reconnect and speak v1 when the remote closed,
    /// reset or timed out without sending a single byte after our key.
    V1,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::None => "none",
            Fallback::V1 => "v1",
        })
    }
}

/// When a SOCKS5 session sends our BIP324 key to the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum EarlyKey {
    /// Right after the TCP connect, except for a client that spoke v2
    /// itself (passthrough) within the last hour, whose sessions send it
    /// once the client's first bytes show it speaks v1.
    #[default]
    Auto,
    /// Always right after the TCP connect; a client that turns out to speak
    /// v2 itself costs a second connection to the remote.
    Always,
    /// Once the client's first bytes show it speaks v1.
    Never,
}

impl fmt::Display for EarlyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EarlyKey::Auto => "auto",
            EarlyKey::Always => "always",
            EarlyKey::Never => "never",
        })
    }
}

/// Stage timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// SOCKS5 greeting, authentication and request, from accept.
    pub socks: Duration,
    /// One TCP connect attempt.
    pub connect: Duration,
    /// The client's first 16 bytes and first message after the SOCKS reply.
    pub first_message: Duration,
    /// The whole BIP324 handshake.
    pub handshake: Duration,
    /// No byte in either direction for this long closes the session.
    pub idle: Option<Duration>,
    /// A relay write that makes no progress for this long closes the session
    /// (the side it writes to stopped reading).
    pub write_stall: Duration,
    /// Graceful shutdown: how long open sessions may drain.
    pub shutdown: Duration,
}

/// SOCKS5 username/password (RFC 1929) that clients must present.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientAuth { .. }")
    }
}

/// An address the main front end (SOCKS5 and transparent) listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A Unix socket at this absolute path (`unix:/path`).
    Unix(PathBuf),
}

/// `127.0.0.1:1324` or `unix:/run/bip324-proxy/socks.sock`.
impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// The group a Unix-socket listener is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixGroup {
    /// Looked up when the socket is bound.
    Name(String),
    Gid(u32),
}

impl fmt::Display for UnixGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixGroup::Name(name) => f.write_str(name),
            UnixGroup::Gid(gid) => write!(f, "{gid}"),
        }
    }
}

/// File mode and group of every Unix-socket listener: they are its access
/// control (connecting needs write permission on the socket file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Permission bits, at most 0o777.
    pub mode: u32,
    /// `None`: the proxy's own group.
    pub group: Option<UnixGroup>,
}

/// The validated configuration every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the main front end listens: TCP addresses and Unix sockets.
    pub listen: Vec<Listen>,
    pub unix_socket: UnixSocket,
    pub fallback: Fallback,
    pub passthrough: bool,
    /// When SOCKS5 sessions send our key (docs/DESIGN.md, "Key early").
    pub early_key: EarlyKey,
    pub networks: NetworkSet,
    /// Every network with a known magic (built in or custom), allowed or not:
    /// a v1 client of a disallowed network is refused, never passed through.
    pub known_networks: NetworkSet,
    /// Sessions open at once. When no file, flag or environment sets it
    /// (`session_cap` is [`SessionCap::Auto`]), this is a placeholder until
    /// [`Config::resolve_limits`] sets it from the descriptor limit:
    /// [`DEFAULT_MAX_SESSIONS`], or the explicit `max_sessions_per_client`
    /// if that is larger.
    pub max_sessions: usize,
    /// Sessions one client address may hold at once.
    pub max_sessions_per_client: usize,
    /// Whether `max_sessions` was set or is chosen from the descriptor limit.
    pub session_cap: SessionCap,
    pub timeouts: Timeouts,
    pub client_auth: Option<ClientAuth>,
    /// Client addresses allowed to connect; empty means any.
    pub allow: Vec<IpNet>,
    /// Front ends served on `listen`, told apart by the first byte.
    pub socks5: bool,
    pub transparent: bool,
    /// An extra listener that serves transparent mode only.
    pub transparent_listen: Option<SocketAddr>,
    /// Transparent clients and SOCKS5 clients not on loopback may dial
    /// loopback, private and other unroutable addresses.
    pub allow_private_targets: bool,
    pub upstream: Option<Upstream>,
    pub routes: Vec<Route>,
    /// Address of the metrics and status listener (off when `None`).
    pub metrics_listen: Option<SocketAddr>,
    /// Connections the metrics listener serves at once; more are closed at accept.
    pub metrics_max_connections: usize,
    /// Time a metrics client has for a request's headers, idle keep-alive included.
    pub metrics_request_timeout: Duration,
    /// v1-only peer memory: entries (0 = off) and how long one lasts.
    pub v1_only_memory: (usize, Duration),
    /// Inbound listeners (internet-facing; exempt from the loopback rule).
    pub inbound: Vec<Inbound>,
    /// Most inbound sessions open at once, apart from `max_sessions`.
    pub max_inbound: usize,
    /// Most inbound sessions one peer address may hold at once.
    pub max_inbound_per_source: usize,
    /// Bytes all sessions together may hold of large messages being received
    /// (`relay::MessageBudget`).
    pub large_message_budget: u64,
    /// Decoys and padding on the v2 legs we write (`[shaping]`, off by default).
    pub shaping: Shaping,
}

/// Which targets go through the upstream proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamRoute {
    /// Every target.
    #[default]
    All,
    /// Only `.onion` targets; the rest are dialed directly.
    Onion,
}

/// Credentials sent to the upstream proxy. Tor puts streams with different
/// SOCKS credentials on different circuits (IsolateSOCKSAuth, on by default).
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Forward the client's own username/password (keeps Bitcoin Core's
    /// `-proxyrandomize` isolation intact); none if the client sent none.
    #[default]
    Client,
    /// Fresh random credentials for every session.
    Session,
    /// No credentials.
    None,
    /// The same credentials for every session.
    Fixed { username: String, password: String },
}

impl fmt::Debug for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Client => "Client",
            Isolation::Session => "Session",
            Isolation::None => "None",
            Isolation::Fixed { .. } => "Fixed { .. }",
        })
    }
}

/// An upstream SOCKS5 proxy such as Tor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host and port of the upstream; a name is resolved locally (it is the
    /// proxy's own address, e.g. `tor:9050` in a compose file, not a target).
    pub addr: Target,
    pub route: UpstreamRoute,
    pub isolation: Isolation,
}

impl Upstream {
    /// Whether `target` goes through the upstream.
    pub fn carries(&self, target: &Target) -> bool {
        match self.route {
            UpstreamRoute::All => true,
            UpstreamRoute::Onion => target.is_onion(),
        }
    }
}

/// What an inbound listener does with a peer that speaks v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum V1Peers {
    /// Relay it to the node, every message checked as a v1 message.
    #[default]
    Relay,
    /// Close the connection: the node is reached over v2 only.
    Refuse,
}

impl fmt::Display for V1Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            V1Peers::Relay => "relay",
            V1Peers::Refuse => "refuse",
        })
    }
}

/// An inbound listener: the public side of a v1-only node. Peers connect to
/// `listen`; v2 peers are answered as BIP324 responder and translated, v1
/// peers relayed or refused; every session goes to `node` in v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub listen: SocketAddr,
    /// The node's own v1 listener (normally on loopback).
    pub node: Target,
    pub network: Network,
    pub v1: V1Peers,
    /// The address the node announces for itself (its `-externalip`).
    pub advertise: Option<SocketAddr>,
    /// Peer addresses and networks refused at accept.
    pub deny: Vec<IpNet>,
    /// The source address of the connection to the node.
    pub node_source: NodeSource,
}

/// `node_source`: where the node sees an inbound peer come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeSource {
    /// The proxy's own address (e.g. 127.0.0.1): works anywhere.
    #[default]
    Proxy,
    /// The peer's own IP address (Linux IP_TRANSPARENT, CAP_NET_ADMIN, and
    /// the policy routing the README gives), so the node's bans, eviction
    /// and address groups see real peers.
    Peer,
}

impl Inbound {
    /// Whether a peer address is on this listener's deny list (IPv4-mapped
    /// IPv6 peers are judged as the IPv4 address they are).
    pub fn denies(&self, peer: &SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        self.deny.iter().any(|net| net.contains(&ip))
    }
}

/// A static route: every connection to `listen` is a session to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: Target,
}

impl Default for Config {
    fn default() -> Self {
        // The embedded defaults validate by construction.
        Config::from_parts(FileConfig::default(), &Cli::default()).expect("embedded defaults are valid")
    }
}

impl Config {
    /// Reads `--config` (if any), applies flags and environment, validates.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
                parse_file(&text).map_err(|e| ConfigError(format!("in {}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        Config::from_parts(file, cli)
    }

    /// Descriptors the proxy keeps out of the automatic `max_sessions`:
    /// [`FD_RESERVE_BASE`] for its listeners, runtime and logging, two per
    /// inbound session (`max_inbound`) and one per metrics connection.
    pub fn descriptor_reserve(&self) -> u64 {
        FD_RESERVE_BASE + 2 * self.max_inbound as u64 + self.metrics_max_connections as u64
    }

    /// Chooses `max_sessions` from `nofile`, the process's soft open-file
    /// limit (main raises it to the hard limit first), when no file, flag or
    /// environment set it: see [`auto_max_sessions`]. An explicit or default
    /// `max_sessions_per_client` follows (capped at the chosen value). Does
    /// nothing when `max_sessions` was set. Kept out of [`Config::load`] so
    /// loading stays a pure function of its inputs.
    pub fn resolve_limits(&mut self, nofile: u64) {
        let SessionCap::Auto { per_client } = self.session_cap else { return };
        let max_sessions = auto_max_sessions(nofile, self.descriptor_reserve());
        self.max_sessions = to_usize(max_sessions);
        self.max_sessions_per_client =
            to_usize(per_client.map_or(default_per_client(max_sessions), |v| v.min(max_sessions)));
    }

    /// Every address the proxy listens on, with the key that set it.
    pub fn listen_addresses(&self) -> Vec<(String, SocketAddr)> {
        let mut all = self.proxy_listen_addresses();
        all.extend(self.inbound_listen_addresses());
        if let Some(addr) = self.metrics_listen {
            all.push(("metrics.listen".to_owned(), addr));
        }
        all
    }

    /// The addresses that accept proxy sessions (not the metrics listener).
    pub fn proxy_listen_addresses(&self) -> Vec<(String, SocketAddr)> {
        let mut all = Vec::new();
        if self.socks5 || self.transparent {
            all.extend(self.tcp_listen().map(|addr| ("listen".to_owned(), addr)));
        }
        if let Some(addr) = self.transparent_listen {
            all.push(("transparent_listen".to_owned(), addr));
        }
        for (i, route) in self.routes.iter().enumerate() {
            all.push((format!("route[{i}].listen"), route.listen));
        }
        all
    }

    /// The TCP addresses of `listen`.
    pub fn tcp_listen(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listen.iter().filter_map(|l| match l {
            Listen::Tcp(addr) => Some(*addr),
            Listen::Unix(_) => None,
        })
    }

    /// The Unix-socket paths of `listen`.
    pub fn unix_listen(&self) -> impl Iterator<Item = &Path> + '_ {
        self.listen.iter().filter_map(|l| match l {
            Listen::Tcp(_) => None,
            Listen::Unix(path) => Some(path.as_path()),
        })
    }

    /// The inbound listeners' addresses, with the key that set each.
    pub fn inbound_listen_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.inbound.iter().enumerate().map(|(i, inbound)| (format!("inbound[{i}].listen"), inbound.listen)).collect()
    }

    /// What restricts clients: a real allow-list (one that does not admit
    /// every address) and `[client_auth]`. [`policy::admits`] decides with it.
    pub fn client_restrictions(&self) -> ClientRestrictions {
        ClientRestrictions {
            allow_list: !self.allow.is_empty() && admits_every_address(&self.allow).is_none(),
            client_auth: self.client_auth.is_some(),
        }
    }

    /// Every front end each proxy listener serves, with the key that set it:
    /// the main TCP listeners serve SOCKS5 and transparent mode as switched
    /// on, `transparent_listen` transparent mode, a route's listener its route.
    pub fn listener_fronts(&self) -> Vec<(String, SocketAddr, Front)> {
        let mut all = Vec::new();
        for addr in self.tcp_listen() {
            if self.transparent {
                all.push(("listen".to_owned(), addr, Front::Transparent));
            }
            if self.socks5 {
                all.push(("listen".to_owned(), addr, Front::Socks5));
            }
        }
        if let Some(addr) = self.transparent_listen {
            all.push(("transparent_listen".to_owned(), addr, Front::Transparent));
        }
        for (i, route) in self.routes.iter().enumerate() {
            all.push((format!("route[{i}].listen"), route.listen, Front::Route));
        }
        all
    }

    /// Whether a client address passes the allow-list.
    pub fn allows(&self, client: &SocketAddr) -> bool {
        let ip = client.ip().to_canonical();
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }

    fn from_parts(file: FileConfig, cli: &Cli) -> Result<Config, ConfigError> {
        let listen = listen_section(if cli.listen.is_empty() { &file.listen.0 } else { &cli.listen })?;
        let unix_socket = unix_socket_section(&file, cli)?;
        let (networks, known_networks) = networks_section(&file, cli)?;
        let per_client_set = cli.max_sessions_per_client.or(file.max_sessions_per_client);
        let (max_sessions, per_client, session_cap) = match cli.max_sessions.or(file.max_sessions) {
            Some(value) => {
                let max_sessions = in_range("max_sessions", value, MAX_SESSIONS)?;
                let per_client = match per_client_set {
                    Some(value) => in_range("max_sessions_per_client", value, 1..=max_sessions)
                        .map_err(|e| ConfigError(format!("{} (at most max_sessions, {max_sessions})", e.0)))?,
                    None => default_per_client(max_sessions),
                };
                (max_sessions, per_client, SessionCap::Set)
            }
            // Chosen from the descriptor limit by `resolve_limits`, which
            // caps an explicit per-client limit at the value it chooses.
            None => {
                let per_client =
                    per_client_set.map(|v| in_range("max_sessions_per_client", v, MAX_SESSIONS)).transpose()?;
                let max_sessions = per_client.unwrap_or(0).max(DEFAULT_MAX_SESSIONS);
                let default = default_per_client(max_sessions);
                (max_sessions, per_client.unwrap_or(default), SessionCap::Auto { per_client })
            }
        };
        let timeouts = timeouts_section(&file.timeouts, cli)?;
        let client_auth = client_auth_section(&file, cli)?;
        let allow = allow_section(&file, cli)?;
        let transparent_listen =
            file.transparent_listen.as_deref().map(|t| socket_addr("transparent_listen", t)).transpose()?;
        let upstream = upstream_section(&file, cli)?;
        let mut routes = Vec::new();
        for (i, route) in file.route.iter().enumerate() {
            let listen = socket_addr(&format!("route[{i}].listen"), &route.listen)?;
            let target = target(&format!("route[{i}].target"), &route.target)?;
            routes.push(Route { listen, target });
        }
        let metrics = &file.metrics;
        let metrics_text = cli.metrics_listen.clone().or(metrics.listen.clone());
        let metrics_listen = metrics_text.as_deref().map(|t| socket_addr("metrics.listen", t)).transpose()?;
        let metrics_max_connections =
            in_range("metrics.max_connections", metrics.max_connections, METRICS_MAX_CONNECTIONS)?;
        let metrics_request_timeout = Duration::from_secs(in_range(
            "metrics.request_timeout",
            metrics.request_timeout,
            METRICS_REQUEST_TIMEOUT_SECS,
        )?);
        let memory = &file.v1_only_memory;
        let capacity = in_range("v1_only_memory.capacity", memory.capacity, V1_ONLY_MEMORY_CAPACITY)?;
        let ttl = in_range("v1_only_memory.ttl", memory.ttl, V1_ONLY_MEMORY_TTL_SECS)?;
        let inbound = inbound_section(&file, cli, &networks, &known_networks)?;
        let max_inbound = in_range("max_inbound", cli.max_inbound.unwrap_or(file.max_inbound), MAX_INBOUND)?;
        let max_inbound_per_source = match cli.max_inbound_per_source.or(file.max_inbound_per_source) {
            Some(value) => in_range("max_inbound_per_source", value, 1..=max_inbound)
                .map_err(|e| ConfigError(format!("{} (at most max_inbound, {max_inbound})", e.0)))?,
            None => default_inbound_per_source(max_inbound),
        };

        let large_message_budget = in_range(
            "large_message_budget",
            cli.large_message_budget.unwrap_or(file.large_message_budget),
            LARGE_MESSAGE_BUDGET,
        )?;

        let shaping = Shaping::from_file(&file.shaping).map_err(|e| ConfigError(e.to_string()))?;

        let config = Config {
            listen,
            unix_socket,
            fallback: cli.fallback.unwrap_or(file.fallback),
            passthrough: cli.passthrough.unwrap_or(file.passthrough),
            early_key: cli.early_key.unwrap_or(file.early_key),
            networks: NetworkSet::new(networks),
            known_networks,
            max_sessions: to_usize(max_sessions),
            max_sessions_per_client: to_usize(per_client),
            session_cap,
            timeouts,
            client_auth,
            allow,
            socks5: file.socks5,
            transparent: file.transparent,
            transparent_listen,
            allow_private_targets: cli.allow_private_targets.unwrap_or(file.allow_private_targets),
            upstream,
            routes,
            metrics_listen,
            metrics_max_connections: to_usize(metrics_max_connections),
            metrics_request_timeout,
            v1_only_memory: (to_usize(capacity), Duration::from_secs(ttl)),
            inbound,
            max_inbound: to_usize(max_inbound),
            max_inbound_per_source: to_usize(max_inbound_per_source),
            large_message_budget,
            shaping,
        };
        config.check_exposure()?;
        config.check_self_dial()?;
        if !config.socks5
            && !config.transparent
            && config.transparent_listen.is_none()
            && config.routes.is_empty()
            && config.inbound.is_empty()
        {
            return Err(ConfigError(
                "nothing to serve: socks5, transparent, every route and every inbound listener are off".into(),
            ));
        }
        Ok(config)
    }

    /// A listener off loopback needs a real restriction on who may use it,
    /// one its front ends can enforce ([`policy::admits`] for a client that
    /// is not on this host): credentials protect SOCKS5 only.
    fn check_exposure(&self) -> Result<(), ConfigError> {
        let every = admits_every_address(&self.allow);
        if let Some(addr) = self.metrics_listen
            && !addr.ip().is_loopback()
        {
            if let Some(family) = every {
                return Err(ConfigError(format!(
                    "allow: the list admits every {family} address, so it restricts nothing; metrics.listen is not \
                     a loopback address and needs a narrower allow-list"
                )));
            }
            if self.allow.is_empty() {
                return Err(ConfigError(format!(
                    "metrics.listen: {addr} is not a loopback address; the status page shows clients and targets, \
                     so serving it there needs a client allow-list (allow = [...])"
                )));
            }
        }
        let restrictions = self.client_restrictions();
        for (key, addr, front) in self.listener_fronts() {
            if addr.ip().is_loopback() || policy::admits(front, false, restrictions) {
                continue;
            }
            let why = match (front, key.as_str()) {
                (Front::Socks5, _) => "refusing to serve it without client authentication ([client_auth]) or a \
                                       client allow-list (allow = [...])"
                    .to_owned(),
                (Front::Transparent, "listen") => "refusing to serve it without a client allow-list (allow = [...]): \
                     transparent mode (transparent = true, the default) cannot ask for credentials, so \
                     [client_auth] does not protect it; set transparent = false to serve only SOCKS5 with \
                     [client_auth]"
                    .to_owned(),
                (Front::Transparent, _) => "transparent mode cannot ask for credentials, so serving it there needs \
                                            a client allow-list (allow = [...]); [client_auth] does not protect it"
                    .to_owned(),
                (Front::Route, _) => "a static route cannot ask for credentials, so serving it there needs a client \
                                      allow-list (allow = [...]); [client_auth] does not protect it"
                    .to_owned(),
            };
            return Err(ConfigError(match every {
                Some(family) => format!(
                    "allow: the list admits every {family} address, so it restricts nothing; {key}: {addr} is not a \
                     loopback address; {why}"
                ),
                None => format!("{key}: {addr} is not a loopback address; {why}"),
            }));
        }
        Ok(())
    }

    /// The upstream and every route dialed directly must not be one of our
    /// own listeners: each session would dial the proxy itself, again and
    /// again, until every slot is taken.
    fn check_self_dial(&self) -> Result<(), ConfigError> {
        let own = self.listen_addresses();
        let ports: Vec<u16> = own.iter().map(|(_, a)| a.port()).filter(|&p| p != 0).collect();
        let mut dialed: Vec<(String, &Target)> = Vec::new();
        if let Some(upstream) = &self.upstream {
            dialed.push(("upstream.socks5".to_owned(), &upstream.addr));
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !self.upstream.as_ref().is_some_and(|u| u.carries(&route.target)) {
                dialed.push((format!("route[{i}].target"), &route.target));
            }
        }
        for (i, inbound) in self.inbound.iter().enumerate() {
            dialed.push((format!("inbound[{i}].node"), &inbound.node));
        }
        for (key, target) in dialed {
            // Only a target on one of our ports can be us; names are resolved only then.
            if !ports.contains(&target.port) || target.is_onion() {
                continue;
            }
            let addrs: Vec<SocketAddr> = match target.socket_addr() {
                Some(addr) => vec![addr],
                None => {
                    use std::net::ToSocketAddrs;
                    (target.host.to_string().as_str(), target.port)
                        .to_socket_addrs()
                        .map(Iterator::collect)
                        .unwrap_or_default()
                }
            };
            for addr in addrs {
                if let Some((listen_key, listen)) = own.iter().find(|(_, l)| same_socket(*l, addr)) {
                    return Err(ConfigError(format!(
                        "{key}: {target} is this proxy's own {listen_key} ({listen}); sessions would dial the proxy itself"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Documented ranges of the numeric settings (README, configuration reference).
pub const MAX_SESSIONS: RangeInclusive<u64> = 1..=100_000;
/// Every stage timeout, the write stall and the shutdown drain, in seconds.
pub const STAGE_TIMEOUT_SECS: RangeInclusive<u64> = 1..=3600;
/// `timeouts.write_stall` when not set: Bitcoin Core's own scale for a peer
/// that stops answering (`-peertimeout`, 60 s); a peer that reads slowly
/// keeps its session, one that reads nothing for a minute does not.
pub const DEFAULT_WRITE_STALL_SECS: u64 = 60;
/// The idle timeout when on: Core's own inactivity timeout up to a week.
pub const IDLE_TIMEOUT_SECS: RangeInclusive<u64> = MIN_IDLE_TIMEOUT_SECS..=7 * 24 * 3600;
/// Entries of the v1-only memory (0 = off); the LRU allocates its table up front.
pub const V1_ONLY_MEMORY_CAPACITY: RangeInclusive<u64> = 0..=100_000;
pub const V1_ONLY_MEMORY_TTL_SECS: RangeInclusive<u64> = 1..=30 * 24 * 3600;
pub const METRICS_MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1024;
pub const METRICS_REQUEST_TIMEOUT_SECS: RangeInclusive<u64> = 1..=600;
/// Inbound sessions open at once, counted apart from `max_sessions`.
pub const MAX_INBOUND: RangeInclusive<u64> = 1..=100_000;
/// `large_message_budget`, in bytes: at least two of the largest messages
/// (a v2 packet of 4,000,013 contents bytes, 4,000,033 on the wire, rounded
/// up to 8 MiB), at most 256 GiB (the budget counts KiB in a semaphore, which
/// holds fewer than 2^29 permits on 32-bit targets).
pub const LARGE_MESSAGE_BUDGET: RangeInclusive<u64> = 8 << 20..=256 << 30;
/// `large_message_budget` when not set: 1 GiB, room for 268 maximum-size
/// messages at once (a node in initial block download behind the proxy
/// receives blocks from about ten peers).
pub const DEFAULT_LARGE_MESSAGE_BUDGET: u64 = 1 << 30;

/// Whether `max_sessions` was set (file, flag or environment) or is left to
/// [`Config::resolve_limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCap {
    Set,
    /// Chosen from the descriptor limit; `per_client` is an explicit
    /// `max_sessions_per_client`, if one was given.
    Auto {
        per_client: Option<u64>,
    },
}

/// `max_sessions` before [`Config::resolve_limits`] has seen the descriptor
/// limit (and in every configuration loaded without it: tests, the library).
pub const DEFAULT_MAX_SESSIONS: u64 = 512;
/// The automatic `max_sessions` never goes above this, however many
/// descriptors the process may open.
pub const AUTO_MAX_SESSIONS_CAP: u64 = 16_384;
/// Descriptors every proxy keeps for itself before sessions: listeners,
/// epoll and the runtime's own, stdio, the log, resolver sockets.
pub const FD_RESERVE_BASE: u64 = 64;

/// The automatic `max_sessions`: each session holds two descriptors (client
/// and remote), so half of what `nofile` leaves after `reserve`, at most
/// [`AUTO_MAX_SESSIONS_CAP`] and at least 1.
pub fn auto_max_sessions(nofile: u64, reserve: u64) -> u64 {
    (nofile.saturating_sub(reserve) / 2).clamp(1, AUTO_MAX_SESSIONS_CAP)
}

/// Inbound sessions one peer address may hold when `max_inbound_per_source`
/// is not set: 8 (a peer has no reason for more than one or two; 8 leaves
/// room for several nodes behind one NAT), never more than `max_inbound`.
pub fn default_inbound_per_source(max_inbound: u64) -> u64 {
    8.min(max_inbound)
}

/// Sessions one client address may hold when `max_sessions_per_client` is
/// not set: a quarter of `max_sessions`, but at least 32 (a Bitcoin Core node
/// behind the proxy opens about 11 outbound connections, feelers and up to 8
/// `-addnode` peers) and never more than `max_sessions`.
pub fn default_per_client(max_sessions: u64) -> u64 {
    (max_sessions / 4).max(32).min(max_sessions)
}

fn in_range(key: &str, value: u64, range: RangeInclusive<u64>) -> Result<u64, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError(format!("{key}: {value} is out of range {}..={}", range.start(), range.end())))
    }
}

/// Every range above fits a `usize` on the 32- and 64-bit targets we build for.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// User text in an error message: anything before an `@` (credentials in a
/// URL-style address) is left out and control characters are escaped.
fn shown(text: &str) -> String {
    let visible = match text.rsplit_once('@') {
        Some((_, rest)) => format!("(credentials not shown)@{rest}"),
        None => text.to_owned(),
    };
    visible.chars().flat_map(char::escape_default).collect()
}

/// `listen`: 1..=16 addresses, each `IP:PORT` or `unix:/absolute/path`, none twice.
fn listen_section(texts: &[String]) -> Result<Vec<Listen>, ConfigError> {
    if texts.is_empty() {
        return Err(ConfigError("listen: give at least one address".into()));
    }
    if texts.len() > MAX_LISTEN_ADDRESSES {
        return Err(ConfigError(format!(
            "listen: {} addresses given; at most {MAX_LISTEN_ADDRESSES} are allowed",
            texts.len()
        )));
    }
    let mut all: Vec<Listen> = Vec::with_capacity(texts.len());
    for text in texts {
        let listen = listen_addr(text)?;
        // Port 0 twice is two ephemeral ports; anything else twice cannot be bound twice.
        let repeatable = matches!(listen, Listen::Tcp(addr) if addr.port() == 0);
        if !repeatable && all.contains(&listen) {
            return Err(ConfigError(format!("listen: `{listen}` is given twice")));
        }
        all.push(listen);
    }
    Ok(all)
}

/// One `listen` address: `IP:PORT`, or `unix:` and an absolute path that fits
/// a socket address (no abstract sockets: they have no file permissions).
pub fn listen_addr(text: &str) -> Result<Listen, ConfigError> {
    let Some(path) = text.strip_prefix(UNIX_PREFIX) else {
        return socket_addr("listen", text).map(Listen::Tcp);
    };
    let why = if !path.starts_with('/') {
        "needs an absolute path"
    } else if path.contains('\0') {
        "contains a NUL byte"
    } else if path.len() > MAX_UNIX_PATH_BYTES {
        "is longer than a Unix socket address holds (107 bytes)"
    } else if path.ends_with('/') {
        "names a directory"
    } else {
        return Ok(Listen::Unix(PathBuf::from(path)));
    };
    Err(ConfigError(format!("listen: `{}` {why}", shown(text))))
}

/// `unix_socket_mode` and `unix_socket_group`.
fn unix_socket_section(file: &FileConfig, cli: &Cli) -> Result<UnixSocket, ConfigError> {
    let mode_text = cli.unix_socket_mode.as_deref().or(file.unix_socket_mode.as_deref());
    let mode = parse_socket_mode(mode_text.unwrap_or(DEFAULT_UNIX_SOCKET_MODE)).ok_or_else(|| {
        ConfigError(format!(
            "unix_socket_mode: `{}` is not an octal mode from 000 to 0777 (e.g. \"0660\")",
            shown(mode_text.unwrap_or_default())
        ))
    })?;
    let group = match cli.unix_socket_group.as_deref().or(file.unix_socket_group.as_deref()) {
        None => None,
        Some(text) => Some(parse_socket_group(text).ok_or_else(|| {
            ConfigError(format!("unix_socket_group: `{}` is neither a group name nor a numeric group id", shown(text)))
        })?),
    };
    Ok(UnixSocket { mode, group })
}

/// An octal permission string: three digits, or four with a leading `0`
/// (`660`, `0660`). Special bits (setuid, setgid, sticky) mean nothing on a
/// socket and are refused.
pub fn parse_socket_mode(text: &str) -> Option<u32> {
    let digits = match text.len() {
        3 => text,
        4 => text.strip_prefix('0')?,
        _ => return None,
    };
    if !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(digits, 8).ok()
}

/// A group by numeric id (all digits, fits 32 bits) or by name: 1..=64
/// bytes of letters, digits, `.`, `_` and `-` (not first) and an optional
/// trailing `$`, the portable set `groupadd` takes.
pub fn parse_socket_group(text: &str) -> Option<UnixGroup> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // (gid_t)-1 means "leave the group unchanged" to chown(2), not a group.
        return text.parse().ok().filter(|&gid: &u32| gid != u32::MAX).map(UnixGroup::Gid);
    }
    let body = text.strip_suffix('$').unwrap_or(text);
    let portable = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    let valid =
        (1..=64).contains(&text.len()) && !body.starts_with('-') && !body.is_empty() && body.bytes().all(portable);
    valid.then(|| UnixGroup::Name(text.to_owned()))
}

fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| ConfigError(format!("{key}: `{}` is not an IP:port address", shown(text))))
}

/// A HOST:PORT the proxy dials. Credentials have their own keys; an address
/// with `user:pass@` in it is refused without echoing it.
fn target(key: &str, text: &str) -> Result<Target, ConfigError> {
    if text.contains('@') || text.contains("://") {
        return Err(ConfigError(format!(
            "{key}: give HOST:PORT only; credentials and URL schemes are not taken here (address not shown)"
        )));
    }
    Target::parse(text).map_err(|e| {
        let why = match e {
            TargetError::BadPort(_) => "invalid port, expected a number from 0 to 65535".to_owned(),
            TargetError::BadHost(_) => "invalid host name".to_owned(),
            other => other.to_string(),
        };
        ConfigError(format!("{key}: `{}` is not HOST:PORT ({why})", shown(text)))
    })
}

/// Whether two addresses reach the same listening socket: equal, or the
/// listener is on the unspecified address of the family (`[::]` takes IPv4
/// too) and the other is one of this host's addresses.
fn same_socket(listen: SocketAddr, dialed: SocketAddr) -> bool {
    if listen.port() != dialed.port() {
        return false;
    }
    let (l, d) = (listen.ip().to_canonical(), dialed.ip().to_canonical());
    if l == d {
        return true;
    }
    let covers = match l {
        IpAddr::V4(v4) => v4.is_unspecified() && d.is_ipv4(),
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    // Binding port 0 on an address succeeds only for this host's own addresses; nothing is sent.
    covers && (d.is_loopback() || d.is_unspecified() || std::net::UdpSocket::bind((d, 0)).is_ok())
}

/// `Some("IPv4")` or `Some("IPv6")` when the allow-list, taken together,
/// admits every address of that family (e.g. `0.0.0.0/0`, or `0.0.0.0/1` with
/// `128.0.0.0/1`).
fn admits_every_address(allow: &[IpNet]) -> Option<&'static str> {
    IpNet::aggregate(&allow.to_vec()).iter().find(|net| net.prefix_len() == 0).map(|net| match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    })
}

/// A custom network's name: 1..=32 of `a-z 0-9 _ -`, so it is safe in logs,
/// labels and `--network` lists.
fn valid_network_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn networks_section(file: &FileConfig, cli: &Cli) -> Result<(Vec<Network>, NetworkSet), ConfigError> {
    let mut table = network::builtin();
    for (name, magic_text) in &file.custom_networks {
        if !valid_network_name(name) {
            return Err(ConfigError(format!(
                "custom_networks: the name `{}` is not 1 to 32 characters of a-z, 0-9, `_` and `-`",
                shown(name)
            )));
        }
        let magic = network::parse_magic(magic_text).ok_or_else(|| {
            ConfigError(format!("custom_networks.{name}: `{}` is not 8 hex digits", shown(magic_text)))
        })?;
        if let Some(clash) = table.iter().find(|n| n.name == *name || n.magic == magic) {
            return Err(ConfigError(format!(
                "custom_networks.{name}: clashes with network `{}` ({})",
                clash.name,
                hex::encode(clash.magic)
            )));
        }
        table.push(Network { name: name.clone(), magic });
    }
    let wanted = if !cli.network.is_empty() { Some(&cli.network) } else { file.networks.as_ref() };
    let known = NetworkSet::new(table.clone());
    let Some(names) = wanted else {
        return Ok((table, known));
    };
    let mut chosen = Vec::new();
    for name in names {
        let net = table.iter().find(|n| n.name == *name).ok_or_else(|| {
            let known: Vec<&str> = table.iter().map(|n| n.name.as_str()).collect();
            ConfigError(format!("networks: unknown network `{}` (known: {})", shown(name), known.join(", ")))
        })?;
        if !chosen.contains(net) {
            chosen.push(net.clone());
        }
    }
    if chosen.is_empty() {
        return Err(ConfigError("networks: at least one network must be allowed".into()));
    }
    Ok((chosen, known))
}

fn timeouts_section(t: &FileTimeouts, cli: &Cli) -> Result<Timeouts, ConfigError> {
    let stage = |name: &str, value: u64| -> Result<Duration, ConfigError> {
        in_range(&format!("timeouts.{name}"), value, STAGE_TIMEOUT_SECS).map(Duration::from_secs)
    };
    let idle_secs = cli.idle_timeout.unwrap_or(t.idle);
    if idle_secs != 0 && idle_secs < MIN_IDLE_TIMEOUT_SECS {
        return Err(ConfigError(format!(
            "timeouts.idle: {idle_secs} s is shorter than Bitcoin Core's own {MIN_IDLE_TIMEOUT_SECS} s \
             inactivity timeout; use 0 (off) or at least {MIN_IDLE_TIMEOUT_SECS}"
        )));
    }
    let idle = match idle_secs {
        0 => None,
        secs => Some(Duration::from_secs(in_range("timeouts.idle", secs, IDLE_TIMEOUT_SECS)?)),
    };
    Ok(Timeouts {
        socks: stage("socks", t.socks)?,
        connect: stage("connect", cli.connect_timeout.unwrap_or(t.connect))?,
        first_message: stage("first_message", t.first_message)?,
        handshake: stage("handshake", cli.handshake_timeout.unwrap_or(t.handshake))?,
        idle,
        write_stall: stage("write_stall", t.write_stall)?,
        shutdown: stage("shutdown", t.shutdown)?,
    })
}

/// SOCKS5 (RFC 1929) length bytes: username 1..=255 bytes, password 0..=255.
fn credentials_fit(key: &str, username: &str, password: &str) -> Result<(), ConfigError> {
    if username.is_empty() || username.len() > 255 || password.len() > 255 {
        return Err(ConfigError(format!("{key}: username must be 1..=255 bytes and password at most 255 bytes")));
    }
    Ok(())
}

fn client_auth_section(file: &FileConfig, cli: &Cli) -> Result<Option<ClientAuth>, ConfigError> {
    let username = cli.client_username.clone().or(file.client_auth.as_ref().map(|a| a.username.clone()));
    let password = cli.client_password.clone().or(file.client_auth.as_ref().map(|a| a.password.clone()));
    match (username, password) {
        (None, None) => Ok(None),
        (Some(username), Some(password)) => {
            credentials_fit("client_auth", &username, &password)?;
            Ok(Some(ClientAuth { username, password }))
        }
        _ => Err(ConfigError("client_auth: set both username and password".into())),
    }
}

/// Most entries in one inbound listener's `deny` list: matching is a linear
/// scan per accepted connection.
pub const MAX_DENY_ENTRIES: usize = 1024;

/// An inbound listener's `deny = ["ADDR" | "CIDR", ...]`.
fn deny_list(key: &str, texts: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    if texts.len() > MAX_DENY_ENTRIES {
        return Err(ConfigError(format!(
            "{key}: {} entries given; at most {MAX_DENY_ENTRIES} are allowed",
            texts.len()
        )));
    }
    texts
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| ConfigError(format!("{key}: `{}` is not an address or CIDR network", shown(text))))
        })
        .collect()
}

fn allow_section(file: &FileConfig, cli: &Cli) -> Result<Vec<IpNet>, ConfigError> {
    let texts = if cli.allow.is_empty() { &file.allow } else { &cli.allow };
    texts
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ConfigError(format!("allow: `{}` is not an address or CIDR network", shown(text))))
        })
        .collect()
}

/// `[[inbound]]` sections, then every `--inbound LISTEN=NODE[@NETWORK]`.
/// Without a network, the one allowed network is used when exactly one is.
fn inbound_section(
    file: &FileConfig,
    cli: &Cli,
    allowed: &[Network],
    known: &NetworkSet,
) -> Result<Vec<Inbound>, ConfigError> {
    let network = |key: &str, name: Option<&str>| -> Result<Network, ConfigError> {
        match name {
            Some(name) => known.iter().find(|n| n.name == name).cloned().ok_or_else(|| {
                ConfigError(format!(
                    "{key}.network: unknown network `{}` (known: {})",
                    shown(name),
                    known.names().join(", ")
                ))
            }),
            None => match allowed {
                [only] => Ok(only.clone()),
                _ => Err(ConfigError(format!(
                    "{key}: no network given and {} networks are allowed; set `network` (flag: \
                     LISTEN=NODE@NETWORK) or allow exactly one network",
                    allowed.len()
                ))),
            },
        }
    };
    let mut all = Vec::new();
    for (i, section) in file.inbound.iter().enumerate() {
        let key = format!("inbound[{i}]");
        all.push(Inbound {
            listen: socket_addr(&format!("{key}.listen"), &section.listen)?,
            node: target(&format!("{key}.node"), &section.node)?,
            network: network(&key, section.network.as_deref())?,
            v1: section.v1,
            advertise: section.advertise.as_deref().map(|a| socket_addr(&format!("{key}.advertise"), a)).transpose()?,
            deny: deny_list(&format!("{key}.deny"), &section.deny)?,
            node_source: section.node_source,
        });
        if section.node_source == NodeSource::Peer {
            let node = &all[all.len() - 1].node;
            if !matches!(node.host, Host::Ip(_)) {
                return Err(ConfigError(format!(
                    "{key}.node: node_source = \"peer\" needs the node as IP:PORT (the peer's address family \
                     must match it), not the name `{}`",
                    shown(&node.to_string())
                )));
            }
        }
    }
    for text in &cli.inbound {
        let key = format!("inbound[{}]", all.len());
        let Some((listen, rest)) = text.split_once('=') else {
            return Err(ConfigError(format!(
                "--inbound: `{}` is not LISTEN=NODE[@NETWORK] (e.g. 0.0.0.0:8333=127.0.0.1:8334@mainnet)",
                shown(text)
            )));
        };
        let (node, name) = match rest.rsplit_once('@') {
            Some((node, name)) => (node, Some(name)),
            None => (rest, None),
        };
        all.push(Inbound {
            listen: socket_addr(&format!("{key}.listen"), listen)?,
            node: target(&format!("{key}.node"), node)?,
            network: network(&key, name)?,
            v1: V1Peers::Relay,
            advertise: None,
            deny: Vec::new(),
            node_source: NodeSource::Proxy,
        });
    }
    Ok(all)
}

fn upstream_section(file: &FileConfig, cli: &Cli) -> Result<Option<Upstream>, ConfigError> {
    let section = file.upstream.as_ref();
    let Some(text) = cli.upstream.clone().or(section.and_then(|u| u.socks5.clone())) else {
        if section.is_some() {
            return Err(ConfigError("upstream: `socks5 = \"HOST:PORT\"` is required".into()));
        }
        return Ok(None);
    };
    let addr = target("upstream.socks5", &text)?;
    let route = cli.upstream_route.or(section.map(|u| u.route)).unwrap_or_default();
    let isolation = match section.map(|u| (u.isolation, u.username.clone(), u.password.clone())) {
        None => Isolation::Client,
        Some((FileIsolation::Client, None, None)) => Isolation::Client,
        Some((FileIsolation::Session, None, None)) => Isolation::Session,
        Some((FileIsolation::None, None, None)) => Isolation::None,
        Some((FileIsolation::Fixed, Some(username), Some(password))) => {
            credentials_fit("upstream", &username, &password)?;
            Isolation::Fixed { username, password }
        }
        Some((FileIsolation::Fixed, _, _)) => {
            return Err(ConfigError("upstream: isolation = \"fixed\" needs both username and password".into()));
        }
        Some(_) => {
            return Err(ConfigError("upstream: username and password go with isolation = \"fixed\" only".into()));
        }
    };
    Ok(Some(Upstream { addr, route, isolation }))
}

/// A configuration problem, ready to print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The TOML file. Every key is optional; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    listen: ListenList,
    unix_socket_mode: Option<String>,
    unix_socket_group: Option<String>,
    fallback: Fallback,
    passthrough: bool,
    early_key: EarlyKey,
    networks: Option<Vec<String>>,
    custom_networks: BTreeMap<String, String>,
    /// `None`: chosen from the descriptor limit at startup.
    max_sessions: Option<u64>,
    max_sessions_per_client: Option<u64>,
    allow: Vec<String>,
    timeouts: FileTimeouts,
    client_auth: Option<FileClientAuth>,
    socks5: bool,
    transparent: bool,
    transparent_listen: Option<String>,
    allow_private_targets: bool,
    upstream: Option<FileUpstream>,
    route: Vec<FileRoute>,
    metrics: FileMetrics,
    v1_only_memory: FileMemory,
    inbound: Vec<FileInbound>,
    max_inbound: u64,
    max_inbound_per_source: Option<u64>,
    large_message_budget: u64,
    shaping: FileShaping,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInbound {
    listen: String,
    node: String,
    network: Option<String>,
    #[serde(default)]
    v1: V1Peers,
    advertise: Option<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    node_source: NodeSource,
}

/// `listen = "ADDR"` or `listen = ["ADDR", ...]`.
#[derive(Debug)]
struct ListenList(Vec<String>);

impl<'de> Deserialize<'de> for ListenList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ListenList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address (\"IP:PORT\" or \"unix:/path\") or an array of addresses")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ListenList, E> {
                Ok(ListenList(vec![text.to_owned()]))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ListenList, A::Error> {
                let mut all = Vec::new();
                while let Some(text) = seq.next_element::<String>()? {
                    // Bounded before it grows: the count is checked again with a clear message.
                    if all.len() > MAX_LISTEN_ADDRESSES {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_LISTEN_ADDRESSES} listen addresses"
                        )));
                    }
                    all.push(text);
                }
                Ok(ListenList(all))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileMetrics {
    listen: Option<String>,
    max_connections: u64,
    request_timeout: u64,
}

impl Default for FileMetrics {
    fn default() -> Self {
        FileMetrics { listen: None, max_connections: 64, request_timeout: 10 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileMemory {
    capacity: u64,
    ttl: u64,
}

impl Default for FileMemory {
    fn default() -> Self {
        FileMemory { capacity: 1024, ttl: 3600 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum FileIsolation {
    #[default]
    Client,
    Session,
    None,
    Fixed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    socks5: Option<String>,
    #[serde(default)]
    route: UpstreamRoute,
    #[serde(default)]
    isolation: FileIsolation,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    listen: String,
    target: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: ListenList(vec![DEFAULT_LISTEN.to_owned()]),
            unix_socket_mode: None,
            unix_socket_group: None,
            fallback: Fallback::None,
            passthrough: true,
            early_key: EarlyKey::Auto,
            networks: None,
            custom_networks: BTreeMap::new(),
            max_sessions: None,
            max_sessions_per_client: None,
            allow: Vec::new(),
            timeouts: FileTimeouts::default(),
            client_auth: None,
            socks5: true,
            transparent: true,
            transparent_listen: None,
            allow_private_targets: false,
            upstream: None,
            route: Vec::new(),
            metrics: FileMetrics::default(),
            v1_only_memory: FileMemory::default(),
            inbound: Vec::new(),
            max_inbound: 256,
            max_inbound_per_source: None,
            large_message_budget: DEFAULT_LARGE_MESSAGE_BUDGET,
            shaping: FileShaping::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileTimeouts {
    socks: u64,
    connect: u64,
    first_message: u64,
    handshake: u64,
    idle: u64,
    write_stall: u64,
    shutdown: u64,
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            socks: 10,
            connect: 10,
            first_message: 10,
            handshake: 10,
            idle: 0,
            write_stall: DEFAULT_WRITE_STALL_SECS,
            shutdown: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClientAuth {
    username: String,
    password: String,
}

/// Parses the TOML text; errors carry the line, column and offending key.
/// An error on a line that holds a username or password says so without
/// quoting the line or the value.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let Some(span) = e.span() else {
            return ConfigError(e.message().trim_end().to_owned());
        };
        let start = span.start.min(text.len());
        let before = text.get(..start).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let line_text = text.lines().nth(line - 1).unwrap_or("");
        let key = line_text.split('=').next().unwrap_or("").trim().trim_matches(['"', '\'']);
        if ["username", "password"].contains(&key) || line_text.contains("password") || line_text.contains("username") {
            ConfigError(format!("line {line}, column {column}: invalid `{key}` value (not shown)"))
        } else {
            ConfigError(format!("line {line}, column {column}: {}", e.message().trim_end()))
        }
    })
}

/// The boolean spellings flags and environment variables take.
pub const BOOL_WORDS: &str = "1/0, true/false, yes/no or on/off";

/// `1`, `true`, `yes`, `on` (any case) and their opposites.
pub fn parse_bool_word(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn bool_word(text: &str, flag: &str, variable: &str) -> Result<bool, String> {
    parse_bool_word(text).ok_or_else(|| format!("{flag} / {variable} takes {BOOL_WORDS} (case-insensitive)"))
}

fn passthrough_word(text: &str) -> Result<bool, String> {
    bool_word(text, "--passthrough", "BIP324_PROXY_PASSTHROUGH")
}

fn private_targets_word(text: &str) -> Result<bool, String> {
    bool_word(text, "--allow-private-targets", "BIP324_PROXY_ALLOW_PRIVATE_TARGETS")
}

/// Command-line flags; each also reads a `BIP324_PROXY_*` environment variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "bip324-proxy",
    version,
    about = "SOCKS5 proxy that carries Bitcoin P2P v1 clients over BIP324 v2 encryption"
)]
pub struct Cli {
    /// TOML configuration file (see config/bip324-proxy.toml).
    #[arg(long, env = "BIP324_PROXY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on, IP:PORT or unix:/PATH (repeatable, or comma-separated) [default: 127.0.0.1:1324].
    #[arg(long, env = "BIP324_PROXY_LISTEN", value_name = "ADDR", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Octal mode of unix: listen sockets [default: 0660].
    #[arg(long, env = "BIP324_PROXY_UNIX_SOCKET_MODE", value_name = "MODE")]
    pub unix_socket_mode: Option<String>,
    /// Group of unix: listen sockets, by name or numeric id [default: the proxy's own group].
    #[arg(long, env = "BIP324_PROXY_UNIX_SOCKET_GROUP", value_name = "GROUP")]
    pub unix_socket_group: Option<String>,
    /// What to do when the remote does not speak v2 [default: none].
    #[arg(long, env = "BIP324_PROXY_FALLBACK", value_enum)]
    pub fallback: Option<Fallback>,
    /// Relay clients that already speak v2 untouched [default: true].
    #[arg(long, env = "BIP324_PROXY_PASSTHROUGH", value_name = "BOOL", value_parser = passthrough_word)]
    pub passthrough: Option<bool>,
    /// When SOCKS5 sessions send our BIP324 key: auto (right after the connect, unless the client spoke v2 itself lately), always or never (after the client's first bytes) [default: auto].
    #[arg(long, env = "BIP324_PROXY_EARLY_KEY", value_enum)]
    pub early_key: Option<EarlyKey>,
    /// Allow only this network (repeatable): mainnet, testnet3, testnet4, signet, regtest or a custom name.
    #[arg(long = "network", env = "BIP324_PROXY_NETWORKS", value_name = "NAME", value_delimiter = ',')]
    pub network: Vec<String>,
    /// Most sessions open at once, 1..=100000 [default: 512].
    #[arg(long, env = "BIP324_PROXY_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<u64>,
    /// Most sessions one client address (or user, on a Unix socket) may hold, 1..=max-sessions [default: max(max-sessions/4, 32)].
    #[arg(long, env = "BIP324_PROXY_MAX_SESSIONS_PER_CLIENT", value_name = "N")]
    pub max_sessions_per_client: Option<u64>,
    /// Client address or CIDR network allowed to connect (repeatable) [default: any].
    #[arg(long, env = "BIP324_PROXY_ALLOW", value_name = "CIDR", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// SOCKS5 username clients must send (with --client-password).
    #[arg(long, env = "BIP324_PROXY_CLIENT_USERNAME", value_name = "NAME", hide_env_values = true)]
    pub client_username: Option<String>,
    /// SOCKS5 password clients must send (with --client-username).
    #[arg(long, env = "BIP324_PROXY_CLIENT_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    pub client_password: Option<String>,
    /// Seconds for one TCP connect attempt [default: 10].
    #[arg(long, env = "BIP324_PROXY_CONNECT_TIMEOUT", value_name = "SECS")]
    pub connect_timeout: Option<u64>,
    /// Seconds for the BIP324 handshake [default: 10].
    #[arg(long, env = "BIP324_PROXY_HANDSHAKE_TIMEOUT", value_name = "SECS")]
    pub handshake_timeout: Option<u64>,
    /// Seconds without traffic before a session is closed; 0 = off, else at least 1200 [default: 0].
    #[arg(long, env = "BIP324_PROXY_IDLE_TIMEOUT", value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Upstream SOCKS5 proxy (e.g. Tor at 127.0.0.1:9050).
    #[arg(long, env = "BIP324_PROXY_UPSTREAM", value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Which targets go upstream: all, or only .onion [default: all].
    #[arg(long, env = "BIP324_PROXY_UPSTREAM_ROUTE", value_enum)]
    pub upstream_route: Option<UpstreamRoute>,
    /// Transparent and non-loopback SOCKS5 clients may dial loopback and private addresses (tests, regtest).
    #[arg(
        long,
        env = "BIP324_PROXY_ALLOW_PRIVATE_TARGETS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = private_targets_word
    )]
    pub allow_private_targets: Option<bool>,
    /// Serve Prometheus /metrics, /status (JSON) and a status page on this address [default: off].
    #[arg(long, env = "BIP324_PROXY_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Inbound listener for a v1-only node (repeatable): LISTEN=NODE[@NETWORK], e.g.
    /// 0.0.0.0:8333=127.0.0.1:8334@mainnet; without @NETWORK the one allowed --network.
    #[arg(long, env = "BIP324_PROXY_INBOUND", value_name = "LISTEN=NODE[@NETWORK]", value_delimiter = ',')]
    pub inbound: Vec<String>,
    /// Most inbound sessions open at once, 1..=100000, apart from --max-sessions [default: 256].
    #[arg(long, env = "BIP324_PROXY_MAX_INBOUND", value_name = "N")]
    pub max_inbound: Option<u64>,
    /// Most inbound sessions one peer address may hold, 1..=max-inbound [default: 8].
    #[arg(long, env = "BIP324_PROXY_MAX_INBOUND_PER_SOURCE", value_name = "N")]
    pub max_inbound_per_source: Option<u64>,
    /// Bytes all sessions together may hold of messages of 64 KiB or more while
    /// they arrive, 8388608..=274877906944 [default: 1073741824 (1 GiB)].
    #[arg(long, env = "BIP324_PROXY_LARGE_MESSAGE_BUDGET", value_name = "BYTES")]
    pub large_message_budget: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["bip324-proxy"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn load_text(text: &str, args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_parts(parse_file(text)?, &cli(args))
    }

    #[test]
    fn embedded_defaults() {
        let c = Config::default();
        assert_eq!(c.listen, vec![Listen::Tcp("127.0.0.1:1324".parse().unwrap())]);
        assert_eq!(c.unix_socket, UnixSocket { mode: 0o660, group: None });
        assert_eq!(c.fallback, Fallback::None);
        assert!(c.passthrough);
        assert_eq!(c.early_key, EarlyKey::Auto);
        assert_eq!(c.networks.names(), vec!["mainnet", "testnet3", "testnet4", "signet", "regtest"]);
        assert_eq!(c.timeouts.connect, Duration::from_secs(10));
        assert_eq!(c.timeouts.handshake, Duration::from_secs(10));
        assert_eq!(c.timeouts.idle, None);
        assert!(c.client_auth.is_none());
        assert!(c.allow.is_empty());
    }

    #[test]
    fn automatic_max_sessions_is_half_the_descriptors_left_after_the_reserve() {
        assert_eq!(auto_max_sessions(20_000, 640), 9_680);
        assert_eq!(auto_max_sessions(1_024, 640), 192);
        assert_eq!(auto_max_sessions(1_025, 640), 192, "an odd descriptor is not half a session");
        // Never zero, never above the cap, whatever the limit.
        assert_eq!(auto_max_sessions(0, 640), 1);
        assert_eq!(auto_max_sessions(640, 640), 1);
        assert_eq!(auto_max_sessions(1 << 20, 640), AUTO_MAX_SESSIONS_CAP);
        assert_eq!(auto_max_sessions(u64::MAX, u64::MAX), 1);
        assert_eq!(auto_max_sessions(u64::MAX, 0), AUTO_MAX_SESSIONS_CAP);
        // 64 + 2 x max_inbound (256) + metrics.max_connections (64).
        assert_eq!(Config::default().descriptor_reserve(), 640);
        let c = load_text("max_inbound = 10\n[metrics]\nmax_connections = 3\n", &[]).unwrap();
        assert_eq!(c.descriptor_reserve(), 64 + 20 + 3);
    }

    #[test]
    fn max_sessions_is_chosen_from_the_descriptor_limit_only_when_not_set() {
        // Loading never reads the limit: the unresolved default is deterministic.
        let mut c = Config::default();
        assert_eq!(c.session_cap, SessionCap::Auto { per_client: None });
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (512, 128));
        c.resolve_limits(20_000);
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (9_680, 2_420));
        // Resolving again starts from what was configured, not from the last result.
        c.resolve_limits(1_024);
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (192, 48));
        c.resolve_limits(100);
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (1, 1));

        // Set by file, flag or environment: kept whatever the limit.
        for mut set in
            [load_text("max_sessions = 300\n", &[]).unwrap(), load_text("", &["--max-sessions", "300"]).unwrap()]
        {
            assert_eq!(set.session_cap, SessionCap::Set);
            set.resolve_limits(100);
            assert_eq!((set.max_sessions, set.max_sessions_per_client), (300, 75));
        }

        // An explicit per-client limit with the automatic cap: any value up to
        // the largest max_sessions, capped at the one chosen.
        let mut c = load_text("max_sessions_per_client = 5000\n", &[]).unwrap();
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (5_000, 5_000));
        c.resolve_limits(20_000);
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (9_680, 5_000));
        c.resolve_limits(1_024);
        assert_eq!((c.max_sessions, c.max_sessions_per_client), (192, 192));
        assert!(
            load_text("max_sessions_per_client = 100001\n", &[]).unwrap_err().0.contains("max_sessions_per_client")
        );
        assert!(load_text("max_sessions_per_client = 0\n", &[]).unwrap_err().0.contains("max_sessions_per_client"));
        // With max_sessions set, the per-client limit stays within it.
        let err = load_text("max_sessions = 100\nmax_sessions_per_client = 101\n", &[]).unwrap_err();
        assert!(err.0.contains("at most max_sessions"), "{err}");
    }

    #[test]
    fn shipped_config_file_matches_embedded_defaults() {
        let text = include_str!("../config/bip324-proxy.toml");
        let from_file = load_text(text, &[]).unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn shipped_example_configs_load() {
        for (name, text) in
            [("tor.toml", include_str!("../config/tor.toml")), ("docker.toml", include_str!("../config/docker.toml"))]
        {
            let config = load_text(text, &[]).unwrap_or_else(|e| panic!("config/{name}: {e}"));
            assert!(config.upstream.is_some(), "{name}");
        }
    }

    #[test]
    fn upstream_section() {
        let c = load_text("[upstream]\nsocks5 = \"127.0.0.1:9050\"\nroute = \"onion\"\nisolation = \"session\"\n", &[])
            .unwrap();
        let up = c.upstream.unwrap();
        assert_eq!((up.route, up.isolation), (UpstreamRoute::Onion, Isolation::Session));
        let fixed = load_text(
            "[upstream]\nsocks5 = \"tor:9050\"\nisolation = \"fixed\"\nusername = \"u\"\npassword = \"p\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(fixed.upstream.unwrap().isolation, Isolation::Fixed { username: "u".into(), password: "p".into() });
        assert!(load_text("[upstream]\nsocks5 = \"tor:9050\"\nisolation = \"fixed\"\n", &[]).is_err());
        assert!(load_text("[upstream]\nsocks5 = \"tor:9050\"\nusername = \"u\"\npassword = \"p\"\n", &[]).is_err());
        assert!(load_text("[upstream]\nroute = \"all\"\n", &[]).is_err());
        assert!(load_text("[upstream]\nsocks5 = \"nope\"\n", &[]).is_err());
        let flag = load_text("", &["--upstream", "127.0.0.1:9050", "--upstream-route", "onion"]).unwrap();
        assert_eq!(flag.upstream.unwrap().route, UpstreamRoute::Onion);
    }

    #[test]
    fn routes_and_their_listen_addresses() {
        let c =
            load_text("[[route]]\nlisten = \"127.0.0.1:38400\"\ntarget = \"node.example.org:8333\"\n", &[]).unwrap();
        assert_eq!(c.routes[0].target.to_string(), "node.example.org:8333");
        assert!(
            load_text("[[route]]\nlisten = \"0.0.0.0:38400\"\ntarget = \"a:1\"\n", &[])
                .unwrap_err()
                .0
                .contains("route[0].listen")
        );
        assert!(load_text("[[route]]\nlisten = \"127.0.0.1:1\"\ntarget = \"a\"\n", &[]).is_err());
        assert!(load_text("socks5 = false\ntransparent = false\n", &[]).is_err());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = load_text("listen = \"127.0.0.1:1\"\nfalback = \"v1\"\n", &[]).unwrap_err();
        assert!(err.0.contains("falback"), "{err}");
        assert!(err.0.contains("line 2"), "{err}");
        let err = load_text("[timeouts]\nconect = 3\n", &[]).unwrap_err();
        assert!(err.0.contains("conect") && err.0.contains("line 2"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let c = load_text(
            "fallback = \"v1\"\npassthrough = true\nearly_key = \"never\"\nlisten = \"127.0.0.1:5\"\n",
            &["--fallback", "none", "--passthrough", "false", "--early-key", "always", "--listen", "127.0.0.1:0"],
        )
        .unwrap();
        assert_eq!(c.fallback, Fallback::None);
        assert!(!c.passthrough);
        assert_eq!(c.early_key, EarlyKey::Always);
        assert_eq!(c.listen, vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())]);
    }

    #[test]
    fn networks_restrict_and_custom_signet() {
        let c = load_text(
            "[custom_networks]\nmysignet = \"a1b2c3d4\"\n",
            &["--network", "regtest", "--network", "mysignet"],
        )
        .unwrap();
        assert_eq!(c.networks.names(), vec!["regtest", "mysignet"]);
        assert!(c.networks.by_magic(&[0xa1, 0xb2, 0xc3, 0xd4]).is_some());
        assert!(c.networks.by_magic(&[0xf9, 0xbe, 0xb4, 0xd9]).is_none());
        let err = load_text("", &["--network", "nonet"]).unwrap_err();
        assert!(err.0.contains("nonet"));
        let err = load_text("[custom_networks]\nx = \"f9beb4d9\"\n", &[]).unwrap_err();
        assert!(err.0.contains("mainnet"), "{err}");
    }

    #[test]
    fn non_loopback_listen_needs_auth_or_allow_list() {
        let err = load_text("", &["--listen", "0.0.0.0:1324"]).unwrap_err();
        assert!(err.0.contains("refusing"), "{err}");
        assert!(load_text("allow = [\"172.16.0.0/12\"]\n", &["--listen", "0.0.0.0:1324"]).is_ok());
        let auth = "[client_auth]\nusername = \"u\"\npassword = \"p\"\n";
        assert!(load_text(&format!("transparent = false\n{auth}"), &["--listen", "[::]:1324"]).is_ok());
    }

    /// `[client_auth]` protects SOCKS5 only: transparent mode and static
    /// routes cannot ask for credentials, so off loopback they need a real
    /// allow-list, and the main port with transparent mode on does too.
    #[test]
    fn credentials_protect_only_the_socks5_front_end() {
        let auth = "[client_auth]\nusername = \"u\"\npassword = \"p\"\n";
        let public = ["--listen", "0.0.0.0:1324"];
        let err = load_text(auth, &public).unwrap_err().0;
        assert!(err.starts_with("listen: 0.0.0.0:1324 is not a loopback address"), "{err}");
        assert!(err.contains("transparent = false") && err.contains("allow = [...]"), "{err}");
        let socks_only = format!("transparent = false\n{auth}");
        assert!(load_text(&socks_only, &public).is_ok());

        let route = "[[route]]\nlisten = \"0.0.0.0:38400\"\ntarget = \"127.0.0.1:38333\"\n";
        let err = load_text(&format!("transparent = false\n{route}{auth}"), &[]).unwrap_err().0;
        assert!(err.starts_with("route[0].listen: 0.0.0.0:38400") && err.contains("static route"), "{err}");
        let err = load_text(&format!("transparent_listen = \"0.0.0.0:1325\"\n{auth}"), &[]).unwrap_err().0;
        assert!(err.starts_with("transparent_listen: 0.0.0.0:1325"), "{err}");
        // On loopback nothing is required; a real allow-list covers every front end.
        let loopback_route = "[[route]]\nlisten = \"127.0.0.1:38400\"\ntarget = \"127.0.0.1:38333\"\n";
        assert!(load_text(&format!("{loopback_route}{auth}"), &[]).is_ok());
        let allow = "allow = [\"192.168.0.0/16\"]\ntransparent_listen = \"0.0.0.0:1325\"\n";
        assert!(load_text(&format!("{allow}{route}"), &public).is_ok());
        // An allow-list that admits everyone is no allow-list.
        let every = "allow = [\"0.0.0.0/0\"]\ntransparent = false\n";
        assert!(load_text(&format!("{every}{auth}"), &public).is_ok());
        let err = load_text(&format!("{every}{route}{auth}"), &public).unwrap_err().0;
        assert!(err.contains("restricts nothing") && err.contains("route[0].listen"), "{err}");
    }

    #[test]
    fn listen_takes_one_address_or_a_list_with_unix_sockets() {
        let tcp = |t: &str| Listen::Tcp(t.parse().unwrap());
        let unix = |p: &str| Listen::Unix(PathBuf::from(p));
        let c = load_text("listen = \"127.0.0.1:5\"\n", &[]).unwrap();
        assert_eq!(c.listen, vec![tcp("127.0.0.1:5")]);
        let c =
            load_text("listen = [\"127.0.0.1:5\", \"unix:/run/bip324-proxy/socks.sock\", \"[::1]:6\"]\n", &[]).unwrap();
        assert_eq!(c.listen, vec![tcp("127.0.0.1:5"), unix("/run/bip324-proxy/socks.sock"), tcp("[::1]:6")]);
        assert_eq!(c.tcp_listen().count(), 2);
        assert_eq!(c.unix_listen().collect::<Vec<_>>(), vec![Path::new("/run/bip324-proxy/socks.sock")]);
        // Only TCP addresses are proxy addresses a session could dial.
        assert!(c.listen_addresses().iter().all(|(key, _)| key == "listen") && c.listen_addresses().len() == 2);
        // Flags replace the file's list; repeated or comma-separated.
        let c = load_text("listen = [\"127.0.0.1:5\"]\n", &["--listen", "127.0.0.1:7,unix:/tmp/a.sock"]).unwrap();
        assert_eq!(c.listen, vec![tcp("127.0.0.1:7"), unix("/tmp/a.sock")]);
        let c = load_text("", &["--listen", "unix:/tmp/a.sock", "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
            .unwrap();
        assert_eq!(c.listen, vec![unix("/tmp/a.sock"), tcp("127.0.0.1:0"), tcp("127.0.0.1:0")]);
        assert_eq!(c.listen[0].to_string(), "unix:/tmp/a.sock");
    }

    #[test]
    fn bad_listen_addresses_are_named() {
        let err = |toml: &str, args: &[&str]| load_text(toml, args).unwrap_err().0;
        assert_eq!(err("", &["--listen", "nope"]), "listen: `nope` is not an IP:port address");
        assert!(err("listen = []\n", &[]).contains("at least one"));
        assert!(err("listen = 5\n", &[]).contains("an address (\"IP:PORT\" or \"unix:/path\") or an array"));
        assert!(err("listen = [\"127.0.0.1:1\", 5]\n", &[]).contains("line 1"));
        let many = format!("listen = [{}]\n", vec!["\"127.0.0.1:0\""; 17].join(","));
        assert!(err(&many, &[]).contains("16"), "{}", err(&many, &[]));
        assert!(err("", &["--listen", &vec!["127.0.0.1:0"; 17].join(",")]).contains("at most 16"));
        assert!(err("", &["--listen", "unix:relative.sock"]).contains("absolute path"));
        assert!(err("", &["--listen", "unix:"]).contains("absolute path"));
        assert!(err("", &["--listen", "unix:/tmp/"]).contains("directory"));
        assert!(err("listen = \"unix:/tmp/a\\u0000b\"\n", &[]).contains("NUL"));
        let long = format!("unix:/{}", "a".repeat(107));
        assert!(err("", &["--listen", &long]).contains("107 bytes"));
        assert!(load_text("", &["--listen", &format!("unix:/{}", "a".repeat(106))]).is_ok());
        assert!(err("", &["--listen", "unix:/tmp/a.sock,unix:/tmp/a.sock"]).contains("given twice"));
        assert!(err("", &["--listen", "127.0.0.1:5,127.0.0.1:5"]).contains("given twice"));
    }

    #[test]
    fn unix_listeners_are_local_for_the_exposure_check() {
        assert!(load_text("", &["--listen", "unix:/tmp/a.sock"]).is_ok());
        // A TCP listener off loopback next to it still needs a restriction.
        let err = load_text("", &["--listen", "unix:/tmp/a.sock,0.0.0.0:1324"]).unwrap_err();
        assert!(err.0.contains("listen: 0.0.0.0:1324 is not a loopback address"), "{err}");
    }

    #[test]
    fn unix_socket_mode_and_group() {
        let c = load_text("unix_socket_mode = \"0600\"\nunix_socket_group = \"bitcoin\"\n", &[]).unwrap();
        assert_eq!(c.unix_socket, UnixSocket { mode: 0o600, group: Some(UnixGroup::Name("bitcoin".into())) });
        let c = load_text("unix_socket_mode = \"666\"\nunix_socket_group = \"0\"\n", &[]).unwrap();
        assert_eq!(c.unix_socket, UnixSocket { mode: 0o666, group: Some(UnixGroup::Gid(0)) });
        let c = load_text("unix_socket_mode = \"0600\"\n", &["--unix-socket-mode", "0640", "--unix-socket-group", "7"])
            .unwrap();
        assert_eq!(c.unix_socket, UnixSocket { mode: 0o640, group: Some(UnixGroup::Gid(7)) });
        for bad in ["", "8", "0o660", "1777", "4755", "0888", "07777", "rw-rw----", "+660", " 660"] {
            assert_eq!(parse_socket_mode(bad), None, "{bad:?}");
            let err = load_text(&format!("unix_socket_mode = \"{bad}\"\n"), &[]).unwrap_err();
            assert!(err.0.starts_with("unix_socket_mode:"), "{err}");
        }
        assert!(load_text("unix_socket_mode = 0o660\n", &[]).is_err(), "a string, not a number");
        for good in ["bitcoin", "_bitcoin", "node-users", "machine$", "a.b", &"g".repeat(64)] {
            assert_eq!(parse_socket_group(good), Some(UnixGroup::Name(good.to_owned())), "{good:?}");
        }
        assert_eq!(parse_socket_group("4294967294"), Some(UnixGroup::Gid(u32::MAX - 1)));
        for bad in ["", "-x", "a b", "a:b", "4294967296", "4294967295", "$", "a\n", &"g".repeat(65), "grüppe"] {
            assert_eq!(parse_socket_group(bad), None, "{bad:?}");
        }
        let err = load_text("unix_socket_group = \"a:b\"\n", &[]).unwrap_err();
        assert!(err.0.starts_with("unix_socket_group:"), "{err}");
    }

    #[test]
    fn idle_timeout_floor() {
        assert!(load_text("[timeouts]\nidle = 60\n", &[]).is_err());
        let c = load_text("[timeouts]\nidle = 1200\n", &[]).unwrap();
        assert_eq!(c.timeouts.idle, Some(Duration::from_secs(1200)));
    }

    #[test]
    fn allow_list_matching() {
        let c = load_text("allow = [\"10.0.0.0/8\", \"::1\"]\n", &[]).unwrap();
        assert!(c.allows(&"10.1.2.3:5".parse().unwrap()));
        assert!(c.allows(&"[::1]:5".parse().unwrap()));
        assert!(c.allows(&"[::ffff:10.0.0.1]:5".parse().unwrap()));
        assert!(!c.allows(&"192.168.0.1:5".parse().unwrap()));
    }

    #[test]
    fn inbound_sections_and_flag() {
        let c = load_text(
            "[custom_networks]\nmysignet = \"a1b2c3d4\"\n\
             [[inbound]]\nlisten = \"0.0.0.0:8333\"\nnode = \"127.0.0.1:8334\"\nnetwork = \"mainnet\"\n\
             [[inbound]]\nlisten = \"[::]:38333\"\nnode = \"bitcoind:38334\"\nnetwork = \"mysignet\"\n\
             v1 = \"refuse\"\nadvertise = \"203.0.113.7:38333\"\n",
            &["--inbound", "0.0.0.0:18444=127.0.0.1:18445@regtest"],
        )
        .unwrap();
        assert_eq!(c.inbound.len(), 3);
        assert_eq!(c.inbound[0].listen.to_string(), "0.0.0.0:8333");
        assert_eq!(c.inbound[0].node.to_string(), "127.0.0.1:8334");
        assert_eq!((c.inbound[0].network.name.as_str(), c.inbound[0].v1), ("mainnet", V1Peers::Relay));
        assert_eq!(c.inbound[1].network.magic, [0xa1, 0xb2, 0xc3, 0xd4]);
        assert_eq!(c.inbound[1].v1, V1Peers::Refuse);
        assert_eq!(c.inbound[1].advertise, Some("203.0.113.7:38333".parse().unwrap()));
        assert_eq!(c.inbound[2].network.name, "regtest");
        assert_eq!(c.max_inbound, 256);
        assert_eq!(c.max_inbound_per_source, 8);
    }

    #[test]
    fn inbound_node_source() {
        let section = |node: &str, extra: &str| {
            format!("[[inbound]]\nlisten = \"0.0.0.0:8333\"\nnode = \"{node}\"\nnetwork = \"mainnet\"\n{extra}\n")
        };
        assert_eq!(load_text(&section("127.0.0.1:8334", ""), &[]).unwrap().inbound[0].node_source, NodeSource::Proxy);
        let c = load_text(&section("127.0.0.1:8334", "node_source = \"peer\""), &[]).unwrap();
        assert_eq!(c.inbound[0].node_source, NodeSource::Peer);
        assert_eq!(
            load_text(&section("[::1]:8334", "node_source = \"proxy\""), &[]).unwrap().inbound[0].node_source,
            NodeSource::Proxy
        );
        let err = load_text(&section("bitcoind:8334", "node_source = \"peer\""), &[]).unwrap_err();
        assert!(err.0.contains("inbound[0].node") && err.0.contains("IP:PORT"), "{err}");
        assert!(load_text(&section("127.0.0.1:8334", "node_source = \"transparent\""), &[]).is_err());
    }

    #[test]
    fn inbound_deny_lists() {
        let section = |deny: &str| {
            format!("[[inbound]]\nlisten = \"0.0.0.0:8333\"\nnode = \"127.0.0.1:8334\"\nnetwork = \"mainnet\"\n{deny}")
        };
        let c = load_text(&section("deny = [\"192.0.2.1\", \"198.51.100.77/24\", \"2001:db8::/32\"]\n"), &[]).unwrap();
        let inbound = &c.inbound[0];
        // Host bits of a network are dropped: 198.51.100.77/24 is 198.51.100.0/24.
        assert_eq!(inbound.deny[1].to_string(), "198.51.100.0/24");
        for (peer, denied) in [
            ("192.0.2.1:1", true),
            ("192.0.2.2:1", false),
            ("198.51.100.200:8333", true),
            ("[::ffff:198.51.100.9]:8333", true), // IPv4-mapped: judged as IPv4
            ("[2001:db8:1::5]:8333", true),
            ("[2001:db9::5]:8333", false),
            ("203.0.113.1:8333", false),
        ] {
            assert_eq!(inbound.denies(&peer.parse().unwrap()), denied, "{peer}");
        }
        assert!(load_text(&section(""), &[]).unwrap().inbound[0].deny.is_empty());
        for bad in ["deny = [\"192.0.2.1/33\"]", "deny = [\"example.com\"]", "deny = [\"\"]", "deny = \"192.0.2.1\""] {
            assert!(load_text(&section(bad), &[]).is_err(), "{bad}");
        }
        let err = load_text(&section("deny = [\"nope\"]"), &[]).unwrap_err();
        assert!(err.0.contains("inbound[0].deny") && err.0.contains("nope"), "{err}");
        let many = vec!["\"192.0.2.1\""; MAX_DENY_ENTRIES + 1].join(",");
        let err = load_text(&section(&format!("deny = [{many}]")), &[]).unwrap_err();
        assert!(err.0.contains("at most 1024"), "{err}");
    }

    #[test]
    fn inbound_network_defaults_to_the_only_allowed_one() {
        let c = load_text("", &["--network", "signet", "--inbound", "0.0.0.0:38333=127.0.0.1:38334"]).unwrap();
        assert_eq!(c.inbound[0].network.name, "signet");
        let err = load_text("", &["--inbound", "0.0.0.0:8333=127.0.0.1:8334"]).unwrap_err();
        assert!(err.0.contains("inbound[0]") && err.0.contains("@NETWORK"), "{err}");
        let err = load_text("", &["--inbound", "0.0.0.0:8333=127.0.0.1:8334@nonet"]).unwrap_err();
        assert!(err.0.contains("nonet") && err.0.contains("known"), "{err}");
        for bad in ["0.0.0.0:8333", "8333=127.0.0.1:8334@mainnet", "0.0.0.0:8333=@mainnet", "0.0.0.0:8333=a:b@mainnet"]
        {
            assert!(load_text("", &["--inbound", bad]).is_err(), "{bad}");
        }
        let err = load_text("[[inbound]]\nlisten = \"0.0.0.0:8333\"\nnode = \"127.0.0.1:8334\"\nv1 = \"maybe\"\n", &[])
            .unwrap_err();
        assert!(err.0.contains("line 4"), "{err}");
        let err = load_text("[[inbound]]\nlisten = \"0.0.0.0:8333\"\nnode = \"x:1\"\nnetwrk = \"mainnet\"\n", &[])
            .unwrap_err();
        assert!(err.0.contains("netwrk"), "{err}");
    }

    #[test]
    fn inbound_listeners_are_exempt_from_the_loopback_rule() {
        // No client_auth, no allow-list, a public address: fine for inbound.
        assert!(load_text("", &["--inbound", "0.0.0.0:8333=127.0.0.1:8334@mainnet"]).is_ok());
        // Even an allow-list that admits everything does not concern it.
        assert!(load_text("allow = [\"0.0.0.0/0\"]\n", &["--inbound", "0.0.0.0:8333=127.0.0.1:8334@mainnet"]).is_ok());
        // The SOCKS5 listener keeps its rule.
        assert!(
            load_text("", &["--listen", "0.0.0.0:1324", "--inbound", "0.0.0.0:8333=127.0.0.1:8334@mainnet"]).is_err()
        );
        // An inbound-only proxy has something to serve.
        assert!(
            load_text("socks5 = false\ntransparent = false\n", &["--inbound", "0.0.0.0:8333=127.0.0.1:8334@mainnet"])
                .is_ok()
        );
        // The node is never one of our own listeners.
        let err = load_text("", &["--inbound", "127.0.0.1:8333=127.0.0.1:8333@mainnet"]).unwrap_err();
        assert!(err.0.contains("inbound[0].node"), "{err}");
    }

    #[test]
    fn inbound_limits_have_ranges() {
        assert!(load_text("max_inbound = 0\n", &[]).unwrap_err().0.contains("1..=100000"));
        assert!(load_text("", &["--max-inbound", "100001"]).is_err());
        let c = load_text("max_inbound = 4\n", &[]).unwrap();
        assert_eq!((c.max_inbound, c.max_inbound_per_source), (4, 4));
        let err = load_text("max_inbound = 4\nmax_inbound_per_source = 5\n", &[]).unwrap_err();
        assert!(err.0.contains("at most max_inbound"), "{err}");
        assert_eq!(load_text("", &["--max-inbound-per-source", "2"]).unwrap().max_inbound_per_source, 2);
    }

    #[test]
    fn client_auth_debug_is_redacted() {
        let c = load_text("[client_auth]\nusername = \"alice\"\npassword = \"hunter2\"\n", &[]).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("alice") && !shown.contains("hunter2"), "{shown}");
    }
}
