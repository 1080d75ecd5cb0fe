//! One session from accept to close, in stage order:
//! accept -> destination -> dial -> sniff -> upgrade -> relay.
//!
//! Three front ends feed the same steps: SOCKS5 (the destination comes from
//! CONNECT), transparent mode (from `addr_recv` of the client's VERSION) and
//! static routes (fixed in the configuration). The main listener tells
//! SOCKS5 from transparent clients by the first byte. Each front end only
//! finds the destination; `Session::connect`, `Session::sniff` and
//! `Session::carry` are shared.
//!
//! Policy comes from [`crate::policy`] (when plaintext is allowed, what may
//! be dialed) and [`crate::sniff`] (what the client speaks); this module asks
//! them at the moment each decision matters and acts on the answer. It
//! writes the session's close line; `server.rs` owns the span.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Span, info};

use crate::config::{Config, Isolation};
use crate::metrics::{Direction, LiveSession, Observer};
use crate::network::Network;
use crate::outbound::{self, Destination, DialError};
use crate::policy::{self, DialRules, Evidence, PlaintextPermit, Plan};
use crate::relay::{self, Leg, Passthrough, RelayReport, Side, V1ToV1, V1ToV2, V2ToV1};
use crate::sniff::{self, SniffError, Sniffed};
use crate::socks5::{self, Command, Credentials, Host, ReplyCode, Socks5Error, Target};
use crate::state::ProxyState;
use crate::stream::Stream;
use crate::translate;
use crate::transparent::{self, AddrRecvError};
use crate::upgrade::{self, UpgradeError};
use crate::v1::{self, Decoded, FrameDecoder, HEADER_LEN, V1Error};

/// Which listener a connection came in on.
#[derive(Debug, Clone)]
pub enum FrontEnd {
    /// The main port: SOCKS5 or transparent, by the first byte.
    Main,
    /// A transparent-only listener.
    Transparent,
    /// A static route to this target.
    Route(Target),
}

/// The stage a session failed in, for the close line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Accept,
    Destination,
    Dial,
    Sniff,
    Upgrade,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Accept => "accept",
            Stage::Destination => "destination",
            Stage::Dial => "dial",
            Stage::Sniff => "sniff",
            Stage::Upgrade => "upgrade",
        })
    }
}

/// The SOCKS5 exchange a client is in: each answers failures in its own shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocksStage {
    /// Method selection (RFC 1928 section 3): answered `05 FF`.
    Greeting,
    /// Username/password sub-negotiation (RFC 1929): answered `01 01`.
    Auth,
    /// The request (RFC 1928 section 4): answered with a 10-byte reply.
    Request,
}

impl fmt::Display for SocksStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocksStage::Greeting => "greeting",
            SocksStage::Auth => "authentication",
            SocksStage::Request => "request",
        })
    }
}

/// Everything a session failed on before its relay started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client closed before sending anything useful")]
    ClientGone,
    #[error("client sent no complete SOCKS5 request within {0:?}")]
    SocksTimeout(Duration),
    #[error("first byte {0:#04x} is neither a SOCKS5 greeting nor a v1 message of an allowed network")]
    UnknownProtocol(u8),
    #[error("bad SOCKS5 {stage}: {error}")]
    Socks { stage: SocksStage, error: Socks5Error },
    #[error("client offered no acceptable SOCKS5 method")]
    NoAcceptableMethod,
    #[error("SOCKS5 authentication failed")]
    AuthFailed,
    #[error("SOCKS5 command {0:?} is not supported")]
    CommandNotSupported(Command),
    #[error("{0}")]
    Dial(DialError),
    #[error("remote {0} proved v1-only recently (remembered) and fallback is none")]
    RememberedV1Only(String),
    #[error("client sent no first message within {0:?}")]
    FirstMessageTimeout(Duration),
    #[error("client closed before its first message")]
    ClientClosedEarly,
    #[error("{0}")]
    Sniff(SniffError),
    #[error("transparent mode needs a v1 VERSION to learn the destination; v2 clients must use SOCKS5")]
    TransparentNeedsV1,
    #[error("transparent destination: {0}")]
    AddrRecv(#[from] AddrRecvError),
    #[error("client's first message: {0}")]
    BadFirstMessage(V1Error),
    #[error("{0}")]
    Upgrade(#[from] UpgradeError),
    #[error("{0}; v1 fallback dial failed: {1}")]
    FallbackDial(UpgradeError, DialError),
    #[error("client I/O: {1}")]
    ClientIo(Stage, std::io::Error),
}

impl SessionError {
    /// The stage a failure belongs to, for the close line.
    pub fn stage(&self) -> Stage {
        use SessionError::*;
        match self {
            ClientGone
            | SocksTimeout(_)
            | UnknownProtocol(_)
            | Socks { .. }
            | NoAcceptableMethod
            | AuthFailed
            | CommandNotSupported(_) => Stage::Accept,
            AddrRecv(_) | TransparentNeedsV1 | RememberedV1Only(_) => Stage::Destination,
            Dial(_) => Stage::Dial,
            FirstMessageTimeout(_) | ClientClosedEarly | Sniff(_) | BadFirstMessage(_) => Stage::Sniff,
            Upgrade(_) | FallbackDial(..) => Stage::Upgrade,
            ClientIo(stage, _) => *stage,
        }
    }

    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        use SessionError::*;
        match self {
            ClientGone | ClientClosedEarly | ClientIo(..) => "client_gone",
            SocksTimeout(_) | FirstMessageTimeout(_) => "client_timeout",
            UnknownProtocol(_) | Sniff(SniffError::NotBitcoin { .. }) => "not_bitcoin",
            Socks { .. } => "socks_error",
            NoAcceptableMethod | AuthFailed => "auth_failed",
            CommandNotSupported(_) => "command_not_supported",
            Dial(DialError::Refused(_)) => "target_refused",
            Dial(_) | FallbackDial(..) => "dial_failed",
            AddrRecv(_) | TransparentNeedsV1 => "bad_destination",
            RememberedV1Only(_) => "v1_only_remembered",
            Sniff(SniffError::NetworkNotAllowed(_)) => "network_not_allowed",
            Sniff(SniffError::NotVersion(_)) | BadFirstMessage(_) => "bad_first_message",
            Sniff(SniffError::PassthroughDisabled) => "passthrough_disabled",
            Upgrade(e) if e.remote_is_v1_only() => "remote_not_v2",
            Upgrade(_) => "handshake_failed",
        }
    }
}

/// What a SOCKS5 client is told about a failure, in the shape of the
/// exchange it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocksAnswer {
    /// `05 FF`: no acceptable method.
    NoMethod,
    /// `01 01`: authentication failed.
    AuthFailure,
    /// A reply to the request.
    Reply(ReplyCode),
}

/// The one place failures become SOCKS5 answers (RFC 1928 sections 3 and 6,
/// RFC 1929 section 2). `None`: no answer is due (the client is gone, or the
/// session is past its SOCKS5 exchange).
pub fn socks_answer(error: &SessionError) -> Option<SocksAnswer> {
    use std::io::ErrorKind;
    let reply = |code| Some(SocksAnswer::Reply(code));
    match error {
        SessionError::Socks { stage: SocksStage::Greeting, .. } | SessionError::NoAcceptableMethod => {
            Some(SocksAnswer::NoMethod)
        }
        SessionError::Socks { stage: SocksStage::Auth, .. } | SessionError::AuthFailed => {
            Some(SocksAnswer::AuthFailure)
        }
        SessionError::Socks { stage: SocksStage::Request, error: Socks5Error::AddressTypeNotSupported(_) } => {
            reply(ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED)
        }
        SessionError::Socks { stage: SocksStage::Request, .. } => reply(ReplyCode::GENERAL_FAILURE),
        SessionError::CommandNotSupported(_) => reply(ReplyCode::COMMAND_NOT_SUPPORTED),
        SessionError::RememberedV1Only(_) => reply(ReplyCode::NOT_ALLOWED),
        SessionError::Dial(dial) => reply(match dial {
            DialError::Refused(_) => ReplyCode::NOT_ALLOWED,
            DialError::OnionNeedsUpstream(_) | DialError::Resolve { .. } | DialError::NoAddresses(_) => {
                ReplyCode::HOST_UNREACHABLE
            }
            DialError::ConnectTimeout { .. } | DialError::UpstreamTimeout { .. } => ReplyCode::TTL_EXPIRED,
            DialError::Connect { source, .. } => match source.kind() {
                ErrorKind::ConnectionRefused => ReplyCode::CONNECTION_REFUSED,
                ErrorKind::NetworkUnreachable => ReplyCode::NETWORK_UNREACHABLE,
                ErrorKind::HostUnreachable | ErrorKind::AddrNotAvailable => ReplyCode::HOST_UNREACHABLE,
                ErrorKind::TimedOut => ReplyCode::TTL_EXPIRED,
                _ => ReplyCode::GENERAL_FAILURE,
            },
            // The upstream's own answer, Tor's extended codes included.
            DialError::UpstreamRefused { code, .. } => *code,
            DialError::UpstreamUnreachable { .. } | DialError::UpstreamProtocol { .. } => ReplyCode::GENERAL_FAILURE,
        }),
        _ => None,
    }
}

/// How the session ended up carrying traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    V2,
    V1Fallback,
    Passthrough,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::V2 => "v2",
            Transport::V1Fallback => "v1-fallback",
            Transport::Passthrough => "passthrough",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How a session that did not fail ended.
enum Ending {
    Relayed(Transport, RelayReport),
    /// A RESOLVE request, answered.
    Resolved(IpAddr),
}

/// What the client speaks, once its first bytes are in.
enum Client {
    /// A v1 client of `network`; its VERSION is the first `version_len`
    /// bytes of the pending buffer.
    V1 { network: Network, version_len: usize },
    /// A client that runs BIP324 itself.
    V2,
}

/// One session's view of the proxy: shared state, its own status entry, and
/// the token that ends it at the drain deadline.
struct Session<'a> {
    state: &'a ProxyState,
    config: &'a Config,
    observer: &'a Observer,
    live: &'a LiveSession,
    shutdown: CancellationToken,
}

/// Runs one accepted connection to its end and writes its close line.
pub async fn run(
    client: Stream,
    front: FrontEnd,
    live: Arc<LiveSession>,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let ms = || started.elapsed().as_millis() as u64;
    let session = Session { state: &state, config: &state.config, observer: &state.observer, live: &live, shutdown };
    let label = match session.serve(client, front).await {
        Ok(Ending::Relayed(transport, report)) => {
            info!(
                %transport,
                reason = %report.reason,
                bytes_client_to_remote = report.client_to_remote.bytes_in,
                bytes_remote_to_client = report.remote_to_client.bytes_in,
                messages_client_to_remote = report.client_to_remote.messages,
                messages_remote_to_client = report.remote_to_client.messages,
                ms = ms(),
                "session closed"
            );
            report.reason.label()
        }
        Ok(Ending::Resolved(ip)) => {
            info!(resolved = %ip, ms = ms(), "session closed");
            "resolved"
        }
        Err(error) => {
            info!(stage = %error.stage(), reason = %error, ms = ms(), "session closed");
            error.label()
        }
    };
    state.observer.closed(&live, label);
}

/// Bytes read from the client and not yet used; each stage hands them on.
type Pending = BytesMut;

impl Session<'_> {
    async fn serve(&self, mut client: Stream, front: FrontEnd) -> Result<Ending, SessionError> {
        let config = self.config;
        let mut pending = Pending::new();
        match front {
            FrontEnd::Main => {
                let deadline = Instant::now() + config.timeouts.socks;
                read_more(&mut client, &mut pending, deadline, Stage::Accept)
                    .await
                    .map_err(|e| e.or_timeout(SessionError::SocksTimeout(config.timeouts.socks)))?;
                let first = pending[0];
                if first == socks5::SOCKS_VERSION && config.socks5 {
                    self.serve_socks(client, pending, deadline).await
                } else if config.transparent && config.networks.iter().any(|n| n.magic[0] == first) {
                    self.serve_transparent(client, pending).await
                } else {
                    Err(SessionError::UnknownProtocol(first))
                }
            }
            FrontEnd::Transparent => self.serve_transparent(client, pending).await,
            FrontEnd::Route(target) => self.serve_route(client, pending, target).await,
        }
    }

    // ------------------------------------------------------------ front ends

    /// SOCKS5: negotiate, dial, reply, then sniff and carry.
    async fn serve_socks(
        &self,
        mut client: Stream,
        mut pending: Pending,
        deadline: Instant,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        let negotiated = negotiate(&mut client, &mut pending, config, deadline)
            .await
            .map_err(|e| e.or_timeout(SessionError::SocksTimeout(config.timeouts.socks)));
        let (command, destination) = match negotiated {
            Ok(request) => request,
            Err(error) => return Err(self.refuse(&mut client, error).await),
        };
        self.record_target(destination.shown());
        let rules = self.dial_rules(false);

        if command == Command::Resolve {
            return match outbound::resolve(&destination, config, &rules).await {
                Ok(ip) => {
                    let bound = Target { host: Host::Ip(ip), port: 0 };
                    self.send_reply(&mut client, ReplyCode::SUCCEEDED, &bound).await?;
                    Ok(Ending::Resolved(ip))
                }
                Err(error) => Err(self.refuse(&mut client, dial_failed(&destination, error)).await),
            };
        }

        let remote = match self.connect(&destination, &rules).await {
            Ok(remote) => remote,
            Err(error) => return Err(self.refuse(&mut client, error).await),
        };
        let bound = Target { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
        self.send_reply(&mut client, ReplyCode::SUCCEEDED, &bound).await?;

        let speaks = self.sniff(&mut client, &mut pending).await?;
        self.carry(client, pending, remote, speaks, &destination, &rules).await
    }

    /// Transparent mode: the destination is addr_recv of the client's VERSION.
    async fn serve_transparent(&self, mut client: Stream, mut pending: Pending) -> Result<Ending, SessionError> {
        let config = self.config;
        // Anything but a v1 message of an allowed network is refused at its first byte.
        if pending.is_empty() {
            let wait = config.timeouts.first_message;
            read_more(&mut client, &mut pending, Instant::now() + wait, Stage::Sniff)
                .await
                .map_err(|e| e.or_timeout(SessionError::FirstMessageTimeout(wait)))?;
        }
        if !config.networks.iter().any(|n| n.magic[0] == pending[0]) {
            return Err(SessionError::UnknownProtocol(pending[0]));
        }
        let Client::V1 { network, version_len } = self.sniff(&mut client, &mut pending).await? else {
            return Err(SessionError::TransparentNeedsV1);
        };
        let addr = transparent::addr_recv(&pending[HEADER_LEN..version_len], config.allow_private_targets)?;
        let destination = Destination {
            target: Target::from(addr),
            name: None,
            upstream_credentials: upstream_credentials(config, None),
        };
        self.record_target(destination.shown());
        // Transparent clients name their targets in VERSION: what they may
        // reach is what addr_recv may name.
        let rules = DialRules { allow_private: config.allow_private_targets, ..self.dial_rules(false) };
        let remote = self.connect(&destination, &rules).await?;
        self.carry(client, pending, remote, Client::V1 { network, version_len }, &destination, &rules).await
    }

    /// A static route: the destination is fixed by the operator; v1 clients
    /// are upgraded, v2 clients passed through.
    async fn serve_route(
        &self,
        mut client: Stream,
        mut pending: Pending,
        target: Target,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        self.record_target(target.to_string());
        let name = match &target.host {
            Host::Name(name) => Some(name.clone()),
            Host::Ip(_) => None,
        };
        let destination = Destination { target, name, upstream_credentials: upstream_credentials(config, None) };
        let speaks = self.sniff(&mut client, &mut pending).await?;
        // The operator chose the target: private addresses are theirs to route to.
        let rules = self.dial_rules(true);
        let remote = self.connect(&destination, &rules).await?;
        self.carry(client, pending, remote, speaks, &destination, &rules).await
    }

    // ------------------------------------------------------------ shared steps

    fn record_target(&self, shown: String) {
        Span::current().record("target", tracing::field::display(&shown));
        self.live.set_target(shown);
    }

    /// What this session may dial: never the proxy's own listeners; loopback
    /// and private addresses only for a client on this host, an operator's
    /// route (`operator_target`) or with `allow_private_targets`.
    fn dial_rules(&self, operator_target: bool) -> DialRules {
        let client_is_local = self.live.client.is_local();
        DialRules {
            listening: self.state.listening(),
            allow_private: self.config.allow_private_targets || operator_target || client_is_local,
        }
    }

    fn remembered_v1_only(&self, destination: &Destination) -> bool {
        self.state.v1_only.as_ref().is_some_and(|memory| memory.is_v1_only(&destination.shown()))
    }

    /// The policy for a session that has not tried the handshake yet.
    fn plan_untried(&self, destination: &Destination) -> Plan {
        policy::plan(
            self.config.fallback,
            Evidence::Untried { remembered_v1_only: self.remembered_v1_only(destination) },
        )
    }

    /// destination -> dial: a remote known to be v1-only is refused at once
    /// when no plaintext is allowed (the client moves on without a wasted
    /// dial); then the dial, under `rules`.
    async fn connect(&self, destination: &Destination, rules: &DialRules) -> Result<TcpStream, SessionError> {
        if let Plan::Refuse(_) = self.plan_untried(destination) {
            self.observer.v1_only_memory("refused");
            return Err(SessionError::RememberedV1Only(destination.shown()));
        }
        outbound::dial(destination, self.config, rules).await.map_err(|e| dial_failed(destination, e))
    }

    /// sniff: the client's first bytes decide v1 (then its whole VERSION is
    /// read) or v2; anything else is refused.
    async fn sniff(&self, client: &mut Stream, pending: &mut Pending) -> Result<Client, SessionError> {
        let config = self.config;
        let wait = config.timeouts.first_message;
        let deadline = Instant::now() + wait;
        let sniffed = read_decoded(client, pending, deadline, Stage::Sniff, |buf| {
            match sniff::classify(buf, &config.networks, &config.known_networks, config.passthrough) {
                Ok(Sniffed::NeedMore(_)) => Ok(None),
                Ok(decided) => Ok(Some((decided, 0))),
                Err(error) => Err(SessionError::Sniff(error)),
            }
        })
        .await
        .map_err(|e| e.or_timeout(SessionError::FirstMessageTimeout(wait)))?;
        match sniffed {
            Sniffed::V1(network) => self.read_version(client, pending, &network).await,
            Sniffed::V2 | Sniffed::NeedMore(_) => Ok(Client::V2),
        }
    }

    /// Reads until `pending` starts with a whole, valid VERSION message.
    async fn read_version(
        &self,
        client: &mut Stream,
        pending: &mut Pending,
        network: &Network,
    ) -> Result<Client, SessionError> {
        let wait = self.config.timeouts.first_message;
        let deadline = Instant::now() + wait;
        let decoder = FrameDecoder::new(network.magic, true);
        let version_len = read_decoded(client, pending, deadline, Stage::Sniff, |buf| {
            match decoder.decode(buf).map_err(SessionError::BadFirstMessage)? {
                Decoded::Frame { len, .. } => Ok(Some((len, 0))),
                Decoded::NeedMore { .. } => Ok(None),
            }
        })
        .await
        .map_err(|e| e.or_timeout(SessionError::FirstMessageTimeout(wait)))?;
        Ok(Client::V1 { network: network.clone(), version_len })
    }

    /// upgrade -> relay: a v2 client is passed through; a v1 client is
    /// upgraded, or spoken to in v1 only when [`policy::plan`] says so now.
    async fn carry(
        &self,
        client: Stream,
        pending: Pending,
        remote: TcpStream,
        speaks: Client,
        destination: &Destination,
        rules: &DialRules,
    ) -> Result<Ending, SessionError> {
        match speaks {
            Client::V2 => Ok(self.passthrough(client, pending, remote).await),
            Client::V1 { network, version_len } => {
                self.carry_v1(client, pending, remote, network, version_len, destination, rules).await
            }
        }
    }

    /// Relays a client that speaks v2 itself, untouched.
    async fn passthrough(&self, client: Stream, pending: Pending, remote: TcpStream) -> Ending {
        self.open_line(Transport::Passthrough, None);
        let report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote.into(), pending: BytesMut::new() },
            Passthrough,
            Passthrough,
            self.config.timeouts.idle,
            self.live.counters.clone(),
            self.shutdown.clone(),
        )
        .await;
        Ending::Relayed(Transport::Passthrough, report)
    }

    /// Upgrade to v2 with the client's VERSION (the first `version_len` bytes
    /// of `pending`) in the first flight, or speak v1 when the policy allows
    /// it at this moment; then relay.
    #[allow(clippy::too_many_arguments)]
    async fn carry_v1(
        &self,
        client: Stream,
        mut pending: Pending,
        mut remote: TcpStream,
        network: Network,
        version_len: usize,
        destination: &Destination,
        rules: &DialRules,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        Span::current().record("network", tracing::field::display(&network));
        self.live.set_network(network.name.clone());
        // Asked again now: another session may have found the remote v1-only
        // since this one was dialed.
        match self.plan_untried(destination) {
            Plan::Upgrade => {}
            Plan::Plaintext(permit) => {
                self.observer.v1_only_memory("direct_v1");
                return Ok(self.relay_v1(permit, client, pending, remote, &network).await);
            }
            Plan::Refuse(_) => {
                self.observer.v1_only_memory("refused");
                return Err(SessionError::RememberedV1Only(destination.shown()));
            }
        }
        let payload = &pending[HEADER_LEN..version_len];
        let mut message_type = [0u8; translate::MAX_MESSAGE_TYPE_LEN];
        let type_len = translate::encode_message_type(&v1::VERSION_COMMAND, &mut message_type);
        let started = Instant::now();
        let first = upgrade::FirstMessage { message_type: &message_type[..type_len], payload };
        let upgraded = match self.state.keys.take(network.magic) {
            Ok(key) => upgrade::upgrade(&mut remote, key, Some(first), config.timeouts.handshake).await,
            Err(error) => Err(error),
        };
        let channel = match upgraded {
            Ok(channel) => channel,
            Err(error) => {
                self.observer.upgrade_failed(error.label());
                let remote_silent = error.remote_is_v1_only();
                if remote_silent && let Some(memory) = &self.state.v1_only {
                    memory.remember(&destination.shown());
                }
                let Plan::Plaintext(permit) = policy::plan(config.fallback, Evidence::UpgradeFailed { remote_silent })
                else {
                    return Err(SessionError::Upgrade(error));
                };
                drop(remote);
                let remote = outbound::dial(destination, config, rules)
                    .await
                    .map_err(|dial| SessionError::FallbackDial(error, dial))?;
                return Ok(self.relay_v1(permit, client, pending, remote, &network).await);
            }
        };
        self.observer.handshake_done(started.elapsed());
        self.open_line(Transport::V2, Some(&channel.session_id));
        // The VERSION went out in the handshake; it counts as carried.
        pending.advance(version_len);
        self.live.counters.add(Direction::ClientToRemote, version_len as u64, 1);
        let mut report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote.into(), pending: channel.leftover },
            V1ToV2 { decoder: FrameDecoder::new(network.magic, true), encoder: channel.encoder },
            V2ToV1 { decoder: channel.decoder, magic: network.magic },
            config.timeouts.idle,
            self.live.counters.clone(),
            self.shutdown.clone(),
        )
        .await;
        report.client_to_remote.bytes_in += version_len as u64;
        report.client_to_remote.messages += 1;
        Ok(Ending::Relayed(Transport::V2, report))
    }

    /// The v1 fallback: the client's bytes so far, VERSION first, are
    /// replayed in v1, and both sides stay framed. Only reachable with the
    /// policy's permit.
    async fn relay_v1(
        &self,
        _permit: PlaintextPermit,
        client: Stream,
        pending: Pending,
        remote: TcpStream,
        network: &Network,
    ) -> Ending {
        self.open_line(Transport::V1Fallback, None);
        let report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote.into(), pending: BytesMut::new() },
            V1ToV1 { decoder: FrameDecoder::new(network.magic, true), side: Side::Client },
            V1ToV1 { decoder: FrameDecoder::new(network.magic, false), side: Side::Remote },
            self.config.timeouts.idle,
            self.live.counters.clone(),
            self.shutdown.clone(),
        )
        .await;
        Ending::Relayed(Transport::V1Fallback, report)
    }

    /// Records the transport (and BIP324 session id, in hex as Bitcoin Core's
    /// `getpeerinfo` shows it) on the span and the status, and writes the open line.
    fn open_line(&self, transport: Transport, session_id: Option<&[u8; 32]>) {
        let span = Span::current();
        span.record("transport", tracing::field::display(transport));
        self.observer.opened(self.live, transport.label());
        match session_id {
            Some(id) => {
                let session_id = hex::encode(id);
                span.record("session_id", tracing::field::display(&session_id));
                self.live.set_session_id(session_id.clone());
                info!(%transport, %session_id, "session open");
            }
            None => info!(%transport, "session open"),
        }
    }

    /// Sends the answer `error` calls for, if any, and hands the error back.
    async fn refuse(&self, client: &mut Stream, error: SessionError) -> SessionError {
        match socks_answer(&error) {
            Some(SocksAnswer::NoMethod) => {
                let _ = client.write_all(&socks5::encode_method_choice(socks5::METHOD_NO_ACCEPTABLE)).await;
            }
            Some(SocksAnswer::AuthFailure) => {
                let _ = client.write_all(&socks5::encode_auth_status(false)).await;
            }
            Some(SocksAnswer::Reply(code)) => {
                let bound = Target { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
                let _ = self.send_reply(client, code, &bound).await;
            }
            None => {}
        }
        error
    }

    async fn send_reply(&self, client: &mut Stream, code: ReplyCode, bound: &Target) -> Result<(), SessionError> {
        let mut reply = Vec::with_capacity(22);
        socks5::encode_reply(code, bound, &mut reply)
            .map_err(|e| SessionError::ClientIo(Stage::Accept, std::io::Error::other(e)))?;
        self.observer.socks_reply(code.0);
        client.write_all(&reply).await.map_err(|e| SessionError::ClientIo(Stage::Accept, e))
    }
}

/// A read that did not produce the bytes a stage wanted.
enum ReadFailure {
    /// The stage's deadline passed.
    Timeout,
    Failed(SessionError),
}

impl ReadFailure {
    /// The session error, with `timeout` standing for a passed deadline.
    fn or_timeout(self, timeout: SessionError) -> SessionError {
        match self {
            ReadFailure::Timeout => timeout,
            ReadFailure::Failed(error) => error,
        }
    }
}

impl From<SessionError> for ReadFailure {
    fn from(error: SessionError) -> Self {
        ReadFailure::Failed(error)
    }
}

/// Reads more client bytes into `pending` before `deadline`. End of stream
/// is the client leaving during `stage`.
async fn read_more(
    client: &mut Stream,
    pending: &mut Pending,
    deadline: Instant,
    stage: Stage,
) -> Result<(), ReadFailure> {
    pending.reserve(512);
    match timeout_at(deadline, client.read_buf(pending)).await {
        Err(_) => Err(ReadFailure::Timeout),
        Ok(Ok(0)) if stage == Stage::Accept => Err(SessionError::ClientGone.into()),
        Ok(Ok(0)) => Err(SessionError::ClientClosedEarly.into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(SessionError::ClientIo(stage, e).into()),
    }
}

/// Decode or read more: runs `decode` on the pending bytes until it yields a
/// value, reading more client bytes while it answers "need more". `decode`
/// returns the value and how many bytes it used (they are consumed).
async fn read_decoded<T>(
    client: &mut Stream,
    pending: &mut Pending,
    deadline: Instant,
    stage: Stage,
    mut decode: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, SessionError>,
) -> Result<T, ReadFailure> {
    loop {
        if let Some((value, used)) = decode(pending)? {
            pending.advance(used);
            return Ok(value);
        }
        read_more(client, pending, deadline, stage).await?;
    }
}

/// A dial failure, with the operator hint an onion target needs.
fn dial_failed(destination: &Destination, error: DialError) -> SessionError {
    if let DialError::OnionNeedsUpstream(_) = &error {
        info!(target = %destination.target, "onion targets need an upstream SOCKS5 proxy such as Tor; none is configured");
    }
    SessionError::Dial(error)
}

/// Credentials for the upstream under the isolation policy.
fn upstream_credentials(config: &Config, from_client: Option<Credentials>) -> Option<Credentials> {
    let upstream = config.upstream.as_ref()?;
    match &upstream.isolation {
        Isolation::Client => from_client,
        Isolation::Session => {
            let token = hex::encode(rand::random::<[u8; 8]>());
            Some(Credentials { username: token.clone().into_bytes(), password: token.into_bytes() })
        }
        Isolation::None => None,
        Isolation::Fixed { username, password } => {
            Some(Credentials { username: username.clone().into_bytes(), password: password.clone().into_bytes() })
        }
    }
}

/// SOCKS5 greeting, optional authentication and the request, each decode
/// error tagged with the exchange it happened in.
async fn negotiate(
    client: &mut Stream,
    pending: &mut Pending,
    config: &Config,
    deadline: Instant,
) -> Result<(Command, Destination), ReadFailure> {
    let in_stage = |stage: SocksStage| move |error: Socks5Error| SessionError::Socks { stage, error };
    let greeting = read_decoded(client, pending, deadline, Stage::Accept, |buf| {
        socks5::decode_greeting(buf).map_err(in_stage(SocksStage::Greeting))
    })
    .await?;

    // Method choice: credentials only when we need them: configured client
    // authentication, or an upstream that isolates streams by the client's
    // own credentials. Otherwise no-auth, and any credentials are accepted.
    let want_credentials =
        config.client_auth.is_some() || config.upstream.as_ref().is_some_and(|u| u.isolation == Isolation::Client);
    let method = if config.client_auth.is_some() {
        greeting.offers(socks5::METHOD_USER_PASS).then_some(socks5::METHOD_USER_PASS)
    } else if want_credentials && greeting.offers(socks5::METHOD_USER_PASS) {
        Some(socks5::METHOD_USER_PASS)
    } else if greeting.offers(socks5::METHOD_NO_AUTH) {
        Some(socks5::METHOD_NO_AUTH)
    } else if greeting.offers(socks5::METHOD_USER_PASS) {
        Some(socks5::METHOD_USER_PASS)
    } else {
        None
    };
    let Some(method) = method else { return Err(SessionError::NoAcceptableMethod.into()) };
    client
        .write_all(&socks5::encode_method_choice(method))
        .await
        .map_err(|e| SessionError::ClientIo(Stage::Accept, e))?;

    let mut client_credentials = None;
    if method == socks5::METHOD_USER_PASS {
        let credentials = read_decoded(client, pending, deadline, Stage::Accept, |buf| {
            socks5::decode_auth(buf).map_err(in_stage(SocksStage::Auth))
        })
        .await?;
        let accepted = match &config.client_auth {
            None => true,
            Some(auth) => {
                constant_time_eq(&credentials.username, auth.username.as_bytes())
                    & constant_time_eq(&credentials.password, auth.password.as_bytes())
            }
        };
        if !accepted {
            return Err(SessionError::AuthFailed.into());
        }
        client
            .write_all(&socks5::encode_auth_status(true))
            .await
            .map_err(|e| SessionError::ClientIo(Stage::Accept, e))?;
        client_credentials = Some(credentials);
    }

    let request = read_decoded(client, pending, deadline, Stage::Accept, |buf| {
        socks5::decode_request(buf).map_err(in_stage(SocksStage::Request))
    })
    .await?;
    match request.command {
        Command::Connect | Command::Resolve => {
            let destination = Destination {
                target: request.target,
                name: request.name,
                upstream_credentials: upstream_credentials(config, client_credentials),
            };
            Ok((request.command, destination))
        }
        other => Err(SessionError::CommandNotSupported(other).into()),
    }
}

/// Compares credentials without a timing difference on their contents
/// (`subtle`: only the lengths may show).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::policy::DialRefusal;

    #[test]
    fn socks_answers_follow_the_stage() {
        use std::io::{Error, ErrorKind};
        let reply = |code| Some(SocksAnswer::Reply(code));
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let connect = |kind| SessionError::Dial(DialError::Connect { addr, source: Error::from(kind) });
        assert_eq!(socks_answer(&connect(ErrorKind::ConnectionRefused)), reply(ReplyCode::CONNECTION_REFUSED));
        assert_eq!(socks_answer(&connect(ErrorKind::HostUnreachable)), reply(ReplyCode::HOST_UNREACHABLE));
        assert_eq!(socks_answer(&connect(ErrorKind::NetworkUnreachable)), reply(ReplyCode::NETWORK_UNREACHABLE));
        assert_eq!(socks_answer(&connect(ErrorKind::Other)), reply(ReplyCode::GENERAL_FAILURE));
        assert_eq!(
            socks_answer(&SessionError::Dial(DialError::ConnectTimeout { addr })),
            reply(ReplyCode::TTL_EXPIRED)
        );
        assert_eq!(
            socks_answer(&SessionError::Dial(DialError::OnionNeedsUpstream("x.onion:8333".into()))),
            reply(ReplyCode::HOST_UNREACHABLE)
        );
        assert_eq!(
            socks_answer(&SessionError::Dial(DialError::Refused(DialRefusal::SelfTarget(addr)))),
            reply(ReplyCode::NOT_ALLOWED)
        );
        assert_eq!(
            socks_answer(&SessionError::CommandNotSupported(Command::Bind)),
            reply(ReplyCode::COMMAND_NOT_SUPPORTED)
        );
        let socks = |stage, error| SessionError::Socks { stage, error };
        assert_eq!(
            socks_answer(&socks(SocksStage::Request, Socks5Error::AddressTypeNotSupported(9))),
            reply(ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED)
        );
        assert_eq!(
            socks_answer(&socks(SocksStage::Request, Socks5Error::EmptyDomain)),
            reply(ReplyCode::GENERAL_FAILURE)
        );
        // Greeting and authentication failures are answered in their own shape.
        assert_eq!(socks_answer(&socks(SocksStage::Greeting, Socks5Error::NoMethods)), Some(SocksAnswer::NoMethod));
        assert_eq!(socks_answer(&SessionError::NoAcceptableMethod), Some(SocksAnswer::NoMethod));
        assert_eq!(
            socks_answer(&socks(SocksStage::Auth, Socks5Error::BadAuthVersion(5))),
            Some(SocksAnswer::AuthFailure)
        );
        assert_eq!(socks_answer(&SessionError::AuthFailed), Some(SocksAnswer::AuthFailure));
        assert_eq!(socks_answer(&SessionError::ClientClosedEarly), None);
    }
}
