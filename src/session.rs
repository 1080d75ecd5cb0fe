//! One session from accept to close, in stage order:
//! accept -> destination -> dial -> sniff -> upgrade -> relay.
//!
//! Three front ends feed the same pipeline: SOCKS5 (the destination comes
//! from CONNECT), transparent mode (from `addr_recv` of the client's VERSION)
//! and static routes (fixed in the configuration). The main listener tells
//! SOCKS5 from transparent clients by the first byte.
//!
//! This is the only module that decides policy: which SOCKS5 method and
//! reply, which credentials go upstream, whether to pass a v2 client
//! through, whether to fall back to v1. It writes the session's close line;
//! `server.rs` owns the span.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Span, info};

use crate::config::{Config, Fallback, Isolation};
use crate::metrics::{LiveSession, Observer};
use crate::network::Network;
use crate::outbound::{self, Destination, DialError};
use crate::relay::{self, Leg, Passthrough, RelayReport, Side, V1ToV1, V1ToV2, V2ToV1};
use crate::server::Context;
use crate::socks5::{self, Command, Credentials, Host, ReplyCode, Target};
use crate::translate;
use crate::transparent::{self, AddrRecvError};
use crate::upgrade::{self, UpgradeError};
use crate::v1::{self, Decoded, FrameDecoder, HEADER_LEN, V1_PREFIX_LEN, V1Error};

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

/// Everything a session failed on before its relay started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client closed before sending anything useful")]
    ClientGone,
    #[error("SOCKS5 negotiation timed out")]
    SocksTimeout,
    #[error("first byte {0:#04x} is neither a SOCKS5 greeting nor a v1 message of an allowed network")]
    UnknownProtocol(u8),
    #[error("bad SOCKS5 request: {0}")]
    Socks(#[from] socks5::Socks5Error),
    #[error("client offered no acceptable SOCKS5 method")]
    NoAcceptableMethod,
    #[error("SOCKS5 authentication failed")]
    AuthFailed,
    #[error("SOCKS5 command {0:?} is not supported")]
    CommandNotSupported(Command),
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("target {0} is this proxy itself")]
    TargetIsSelf(SocketAddr),
    #[error("remote {0} proved v1-only recently (remembered) and fallback is none")]
    RememberedV1Only(String),
    #[error("client sent no first message within {0:?}")]
    FirstMessageTimeout(Duration),
    #[error("client closed before its first message")]
    ClientClosedEarly,
    #[error("client's first message is for network magic {0}, which is not allowed")]
    NetworkNotAllowed(String),
    #[error("client's first v1 message is not VERSION")]
    FirstMessageNotVersion,
    #[error("client sent plaintext that is not a Bitcoin v1 message (first bytes {0})")]
    NotBitcoin(String),
    #[error("client speaks v2 itself and passthrough is disabled")]
    PassthroughDisabled,
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
    #[error("client I/O: {0}")]
    ClientIo(std::io::Error),
}

impl SessionError {
    /// The stage a failure belongs to, for the close line.
    pub fn stage(&self) -> &'static str {
        use SessionError::*;
        match self {
            ClientGone
            | SocksTimeout
            | UnknownProtocol(_)
            | Socks(_)
            | NoAcceptableMethod
            | AuthFailed
            | CommandNotSupported(_) => "accept",
            TargetIsSelf(_) | AddrRecv(_) | TransparentNeedsV1 | RememberedV1Only(_) => "destination",
            Dial(_) => "dial",
            FirstMessageTimeout(_)
            | ClientClosedEarly
            | NetworkNotAllowed(_)
            | FirstMessageNotVersion
            | NotBitcoin(_)
            | PassthroughDisabled
            | BadFirstMessage(_) => "sniff",
            Upgrade(_) | FallbackDial(..) => "upgrade",
            ClientIo(_) => "relay",
        }
    }

    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        use SessionError::*;
        match self {
            ClientGone | ClientClosedEarly | ClientIo(_) => "client_gone",
            SocksTimeout | FirstMessageTimeout(_) => "client_timeout",
            UnknownProtocol(_) | NotBitcoin(_) => "not_bitcoin",
            Socks(_) => "socks_error",
            NoAcceptableMethod | AuthFailed => "auth_failed",
            CommandNotSupported(_) => "command_not_supported",
            Dial(_) | FallbackDial(..) => "dial_failed",
            TargetIsSelf(_) | AddrRecv(_) | TransparentNeedsV1 => "bad_destination",
            RememberedV1Only(_) => "v1_only_remembered",
            NetworkNotAllowed(_) => "network_not_allowed",
            FirstMessageNotVersion | BadFirstMessage(_) => "bad_first_message",
            PassthroughDisabled => "passthrough_disabled",
            Upgrade(e) if e.remote_is_v1_only() => "remote_not_v2",
            Upgrade(_) => "handshake_failed",
        }
    }
}

/// The one place failures become SOCKS5 reply codes (RFC 1928 section 6).
/// `None`: no reply is due (the client is gone, or the stage is past the reply).
pub fn reply_code(error: &SessionError) -> Option<ReplyCode> {
    use std::io::ErrorKind;
    match error {
        SessionError::Socks(socks5::Socks5Error::AddressTypeNotSupported(_)) => {
            Some(ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED)
        }
        SessionError::Socks(_) => Some(ReplyCode::GENERAL_FAILURE),
        SessionError::CommandNotSupported(_) => Some(ReplyCode::COMMAND_NOT_SUPPORTED),
        SessionError::TargetIsSelf(_) | SessionError::RememberedV1Only(_) => Some(ReplyCode::NOT_ALLOWED),
        SessionError::Dial(dial) => Some(match dial {
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

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How a session that did not fail ended.
enum Ending {
    Relayed(Transport, RelayReport),
    /// A RESOLVE request, answered.
    Resolved(IpAddr),
}

/// One session's view of the proxy: shared state, its own status entry, and
/// the token that ends it at the drain deadline.
struct Session<'a> {
    context: &'a Context,
    config: &'a Config,
    observer: &'a Observer,
    live: &'a LiveSession,
    shutdown: CancellationToken,
}

/// Runs one accepted connection to its end and writes its close line.
pub async fn run(
    client: TcpStream,
    front: FrontEnd,
    live: Arc<LiveSession>,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let ms = || started.elapsed().as_millis() as u64;
    let session =
        Session { context: &context, config: &context.config, observer: &context.observer, live: &live, shutdown };
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
    context.observer.closed(&live, label);
}

impl Session<'_> {
    async fn serve(&self, mut client: TcpStream, front: FrontEnd) -> Result<Ending, SessionError> {
        let config = self.config;
        // Bytes read from the client and not yet used; each stage hands them on.
        let mut pending = BytesMut::new();
        match front {
            FrontEnd::Main => {
                let first =
                    timeout(config.timeouts.socks, read_more(&mut client, &mut pending, SessionError::ClientGone));
                match first.await {
                    Ok(result) => result?,
                    Err(_) => return Err(SessionError::SocksTimeout),
                }
                let first = pending[0];
                if first == socks5::SOCKS_VERSION && config.socks5 {
                    self.serve_socks(client, pending).await
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

    fn record_target(&self, shown: String) {
        Span::current().record("target", tracing::field::display(&shown));
        self.live.set_target(shown);
    }

    /// SOCKS5: negotiate, dial, reply, then sniff and carry.
    async fn serve_socks(&self, mut client: TcpStream, mut pending: BytesMut) -> Result<Ending, SessionError> {
        let config = self.config;
        // accept + destination
        let negotiated = timeout(config.timeouts.socks, negotiate(&mut client, &mut pending, config)).await;
        let (command, destination) = match negotiated {
            Ok(Ok(request)) => request,
            Ok(Err(error)) => return Err(self.refuse(&mut client, error).await),
            Err(_) => return Err(SessionError::SocksTimeout),
        };
        self.record_target(destination.shown());

        if command == Command::Resolve {
            return match outbound::resolve(&destination, config).await {
                Ok(ip) => {
                    let bound = Target { host: Host::Ip(ip), port: 0 };
                    self.send_reply(&mut client, ReplyCode::SUCCEEDED, &bound).await?;
                    Ok(Ending::Resolved(ip))
                }
                Err(error) => Err(self.refuse(&mut client, dial_failed(&destination, error)).await),
            };
        }

        // A remote that proved v1-only recently: refused at once under
        // fallback none, so the client moves on without a wasted dial.
        if self.remembered_v1_only(&destination) && config.fallback == Fallback::None {
            self.observer.v1_only_memory("refused");
            return Err(self.refuse(&mut client, SessionError::RememberedV1Only(destination.shown())).await);
        }

        // dial
        if let Err(error) = check_not_self(&destination.target, config) {
            return Err(self.refuse(&mut client, error).await);
        }
        let remote = match outbound::dial(&destination, config).await {
            Ok(remote) => remote,
            Err(error) => return Err(self.refuse(&mut client, dial_failed(&destination, error)).await),
        };
        let bound = Target { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
        self.send_reply(&mut client, ReplyCode::SUCCEEDED, &bound).await?;

        // sniff
        match sniff(&mut client, &mut pending, config).await? {
            FirstBytes::V2 => Ok(self.passthrough(client, pending, remote).await),
            FirstBytes::V1(network) => {
                let version_len = read_first_message(&mut client, &mut pending, &network, config).await?;
                self.carry_v1(client, pending, remote, network, version_len, &destination).await
            }
        }
    }

    fn remembered_v1_only(&self, destination: &Destination) -> bool {
        self.context.v1_only.as_ref().is_some_and(|memory| memory.is_v1_only(&destination.shown()))
    }

    /// Transparent mode: the destination is addr_recv of the client's VERSION.
    async fn serve_transparent(&self, mut client: TcpStream, mut pending: BytesMut) -> Result<Ending, SessionError> {
        let config = self.config;
        // Anything but a v1 message of an allowed network is refused at its first byte.
        if pending.is_empty() {
            match timeout(config.timeouts.first_message, read_more(&mut client, &mut pending, SessionError::ClientGone))
                .await
            {
                Ok(result) => result?,
                Err(_) => return Err(SessionError::FirstMessageTimeout(config.timeouts.first_message)),
            }
        }
        if !config.networks.iter().any(|n| n.magic[0] == pending[0]) {
            return Err(SessionError::UnknownProtocol(pending[0]));
        }
        let network = match sniff(&mut client, &mut pending, config).await? {
            FirstBytes::V1(network) => network,
            FirstBytes::V2 => return Err(SessionError::TransparentNeedsV1),
        };
        let version_len = read_first_message(&mut client, &mut pending, &network, config).await?;
        let addr = transparent::addr_recv(&pending[HEADER_LEN..version_len], config.allow_private_targets)?;
        let destination = Destination {
            target: Target::from(addr),
            name: None,
            upstream_credentials: upstream_credentials(config, None),
        };
        self.record_target(destination.shown());
        check_not_self(&destination.target, config)?;
        if self.remembered_v1_only(&destination) && config.fallback == Fallback::None {
            self.observer.v1_only_memory("refused");
            return Err(SessionError::RememberedV1Only(destination.shown()));
        }
        let remote = outbound::dial(&destination, config).await.map_err(|e| dial_failed(&destination, e))?;
        self.carry_v1(client, pending, remote, network, version_len, &destination).await
    }

    /// A static route: the destination is fixed; v1 clients are upgraded, v2
    /// clients passed through.
    async fn serve_route(
        &self,
        mut client: TcpStream,
        mut pending: BytesMut,
        target: Target,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        self.record_target(target.to_string());
        let name = match &target.host {
            Host::Name(name) => Some(name.clone()),
            Host::Ip(_) => None,
        };
        let destination = Destination { target, name, upstream_credentials: upstream_credentials(config, None) };
        match sniff(&mut client, &mut pending, config).await? {
            FirstBytes::V2 => {
                let remote = outbound::dial(&destination, config).await.map_err(|e| dial_failed(&destination, e))?;
                Ok(self.passthrough(client, pending, remote).await)
            }
            FirstBytes::V1(network) => {
                let version_len = read_first_message(&mut client, &mut pending, &network, config).await?;
                if self.remembered_v1_only(&destination) && config.fallback == Fallback::None {
                    self.observer.v1_only_memory("refused");
                    return Err(SessionError::RememberedV1Only(destination.shown()));
                }
                let remote = outbound::dial(&destination, config).await.map_err(|e| dial_failed(&destination, e))?;
                self.carry_v1(client, pending, remote, network, version_len, &destination).await
            }
        }
    }
}

/// A dial failure, with the operator hint an onion target needs.
fn dial_failed(destination: &Destination, error: DialError) -> SessionError {
    if let DialError::OnionNeedsUpstream(_) = &error {
        info!(target = %destination.target, "onion targets need an upstream SOCKS5 proxy such as Tor; none is configured");
    }
    SessionError::Dial(error)
}

/// Refuses targets that would loop back into this proxy.
fn check_not_self(target: &Target, config: &Config) -> Result<(), SessionError> {
    let Host::Ip(ip) = target.host else { return Ok(()) };
    let ip = ip.to_canonical();
    for (_, listen) in config.listen_addresses() {
        let same_host =
            listen.ip() == ip || listen.ip().is_unspecified() || (listen.ip().is_loopback() && ip.is_loopback());
        if listen.port() == target.port && same_host {
            return Err(SessionError::TargetIsSelf(SocketAddr::new(ip, target.port)));
        }
    }
    Ok(())
}

impl Session<'_> {
    /// Relays a client that speaks v2 itself, untouched.
    async fn passthrough(&self, client: TcpStream, pending: BytesMut, remote: TcpStream) -> Ending {
        self.open_line(Transport::Passthrough, None);
        let report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote, pending: BytesMut::new() },
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
    /// of `pending`) in the first flight, or fall back to v1 under the policy;
    /// then relay.
    async fn carry_v1(
        &self,
        client: TcpStream,
        mut pending: BytesMut,
        mut remote: TcpStream,
        network: Network,
        version_len: usize,
        destination: &Destination,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        Span::current().record("network", tracing::field::display(&network));
        self.live.set_network(network.name.clone());
        if self.remembered_v1_only(destination) {
            // Only reachable under fallback v1: skip the handshake it failed before.
            self.observer.v1_only_memory("direct_v1");
            return Ok(self.relay_v1(client, pending, remote, &network).await);
        }
        let payload = &pending[HEADER_LEN..version_len];
        let mut message_type = [0u8; translate::MAX_MESSAGE_TYPE_LEN];
        let type_len = translate::encode_message_type(&v1::VERSION_COMMAND, &mut message_type);
        let started = Instant::now();
        let first = upgrade::FirstMessage { message_type: &message_type[..type_len], payload };
        let upgraded = match self.context.keys.take(network.magic) {
            Ok(key) => upgrade::upgrade(&mut remote, key, Some(first), config.timeouts.handshake).await,
            Err(error) => Err(error),
        };
        match upgraded {
            Ok(channel) => {
                self.observer.handshake_done(started.elapsed());
                self.open_line(Transport::V2, Some(&channel.session_id));
                // The VERSION went out in the handshake; it counts as carried.
                pending.advance(version_len);
                let counters = &self.live.counters;
                counters.bytes_client_to_remote.fetch_add(version_len as u64, Ordering::Relaxed);
                counters.messages_client_to_remote.fetch_add(1, Ordering::Relaxed);
                let mut report = relay::run(
                    Leg { stream: client, pending },
                    Leg { stream: remote, pending: channel.leftover },
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
            Err(error) => {
                self.observer.upgrade_failed(error.label());
                if error.remote_is_v1_only()
                    && let Some(memory) = &self.context.v1_only
                {
                    memory.remember(&destination.shown());
                }
                if !(error.remote_is_v1_only() && config.fallback == Fallback::V1) {
                    return Err(SessionError::Upgrade(error));
                }
                drop(remote);
                let remote = outbound::dial(destination, config)
                    .await
                    .map_err(|dial| SessionError::FallbackDial(error, dial))?;
                Ok(self.relay_v1(client, pending, remote, &network).await)
            }
        }
    }

    /// The v1 fallback: the client's bytes so far, VERSION first, are
    /// replayed in v1, and both sides stay framed.
    async fn relay_v1(&self, client: TcpStream, pending: BytesMut, remote: TcpStream, network: &Network) -> Ending {
        self.open_line(Transport::V1Fallback, None);
        let report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote, pending: BytesMut::new() },
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

    /// Sends the reply `error` calls for, if any, and hands the error back.
    async fn refuse(&self, client: &mut TcpStream, error: SessionError) -> SessionError {
        if let Some(code) = reply_code(&error) {
            let bound = Target { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
            let _ = self.send_reply(client, code, &bound).await;
        }
        error
    }

    async fn send_reply(&self, client: &mut TcpStream, code: ReplyCode, bound: &Target) -> Result<(), SessionError> {
        let mut reply = Vec::with_capacity(22);
        socks5::encode_reply(code, bound, &mut reply).map_err(|e| SessionError::ClientIo(std::io::Error::other(e)))?;
        self.observer.socks_reply(code.0);
        client.write_all(&reply).await.map_err(SessionError::ClientIo)
    }
}

/// Reads more client bytes into `pending`; end of stream is `gone`.
async fn read_more(client: &mut TcpStream, pending: &mut BytesMut, gone: SessionError) -> Result<(), SessionError> {
    pending.reserve(512);
    match client.read_buf(pending).await {
        Ok(0) => Err(gone),
        Ok(_) => Ok(()),
        Err(e) => Err(SessionError::ClientIo(e)),
    }
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

/// SOCKS5 greeting, optional authentication and the request.
async fn negotiate(
    client: &mut TcpStream,
    pending: &mut BytesMut,
    config: &Config,
) -> Result<(Command, Destination), SessionError> {
    let greeting = loop {
        if let Some((greeting, used)) = socks5::decode_greeting(pending)? {
            pending.advance(used);
            break greeting;
        }
        read_more(client, pending, SessionError::ClientGone).await?;
    };

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
    let Some(method) = method else {
        let _ = client.write_all(&socks5::encode_method_choice(socks5::METHOD_NO_ACCEPTABLE)).await;
        return Err(SessionError::NoAcceptableMethod);
    };
    client.write_all(&socks5::encode_method_choice(method)).await.map_err(SessionError::ClientIo)?;

    let mut client_credentials = None;
    if method == socks5::METHOD_USER_PASS {
        let credentials = loop {
            if let Some((credentials, used)) = socks5::decode_auth(pending)? {
                pending.advance(used);
                break credentials;
            }
            read_more(client, pending, SessionError::ClientGone).await?;
        };
        let accepted = match &config.client_auth {
            None => true,
            Some(auth) => {
                constant_time_eq(&credentials.username, auth.username.as_bytes())
                    & constant_time_eq(&credentials.password, auth.password.as_bytes())
            }
        };
        client.write_all(&socks5::encode_auth_status(accepted)).await.map_err(SessionError::ClientIo)?;
        if !accepted {
            return Err(SessionError::AuthFailed);
        }
        client_credentials = Some(credentials);
    }

    let request = loop {
        if let Some((request, used)) = socks5::decode_request(pending)? {
            pending.advance(used);
            break request;
        }
        read_more(client, pending, SessionError::ClientGone).await?;
    };
    match request.command {
        Command::Connect | Command::Resolve => {
            let destination = Destination {
                target: request.target,
                name: request.name,
                upstream_credentials: upstream_credentials(config, client_credentials),
            };
            Ok((request.command, destination))
        }
        other => Err(SessionError::CommandNotSupported(other)),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the client's first bytes say it speaks.
enum FirstBytes {
    /// A v1 VERSION for an allowed network.
    V1(Network),
    /// Not v1: a client that runs BIP324 itself.
    V2,
}

async fn sniff(client: &mut TcpStream, pending: &mut BytesMut, config: &Config) -> Result<FirstBytes, SessionError> {
    let wait = config.timeouts.first_message;
    let deadline = Instant::now() + wait;
    while pending.len() < V1_PREFIX_LEN {
        match timeout_at(deadline, read_more(client, pending, SessionError::ClientClosedEarly)).await {
            Ok(result) => result?,
            Err(_) => return Err(SessionError::FirstMessageTimeout(wait)),
        }
    }
    let mut prefix = [0u8; V1_PREFIX_LEN];
    prefix.copy_from_slice(&pending[..V1_PREFIX_LEN]);
    classify(&prefix, config)
}

/// The sniff decision, on the first 16 bytes.
fn classify(prefix: &[u8; V1_PREFIX_LEN], config: &Config) -> Result<FirstBytes, SessionError> {
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&prefix[..4]);
    let is_version = prefix[4..] == v1::VERSION_COMMAND;
    if let Some(network) = config.networks.by_magic(&magic) {
        return if is_version {
            Ok(FirstBytes::V1(network.clone()))
        } else {
            Err(SessionError::FirstMessageNotVersion)
        };
    }
    if is_version || config.known_networks.by_magic(&magic).is_some() {
        // A v1 client of a network we do not carry; never pass it through.
        return Err(SessionError::NetworkNotAllowed(hex::encode(magic)));
    }
    if looks_like_plaintext(prefix) {
        return Err(SessionError::NotBitcoin(hex::encode(prefix)));
    }
    if config.passthrough { Ok(FirstBytes::V2) } else { Err(SessionError::PassthroughDisabled) }
}

/// A BIP324 initiator starts with 64 bytes indistinguishable from random.
/// Printable text (HTTP, SMTP, SSH banners) or a TLS record header are not
/// that, and must not turn the proxy into a generic tunnel.
fn looks_like_plaintext(prefix: &[u8; V1_PREFIX_LEN]) -> bool {
    let text = prefix.iter().all(|&b| b == b'\r' || b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b));
    let tls = prefix[0] == 0x16 && prefix[1] == 0x03 && prefix[2] <= 0x04;
    text || tls
}

/// Reads until `pending` starts with a whole, valid VERSION message; returns its length.
async fn read_first_message(
    client: &mut TcpStream,
    pending: &mut BytesMut,
    network: &Network,
    config: &Config,
) -> Result<usize, SessionError> {
    let wait = config.timeouts.first_message;
    let decoder = FrameDecoder::new(network.magic, true);
    let deadline = Instant::now() + wait;
    loop {
        match decoder.decode(pending).map_err(SessionError::BadFirstMessage)? {
            Decoded::Frame { len, .. } => return Ok(len),
            Decoded::NeedMore { .. } => {
                match timeout_at(deadline, read_more(client, pending, SessionError::ClientClosedEarly)).await {
                    Ok(result) => result?,
                    Err(_) => return Err(SessionError::FirstMessageTimeout(wait)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn prefix(magic: [u8; 4], command: &[u8]) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[..4].copy_from_slice(&magic);
        p[4..4 + command.len()].copy_from_slice(command);
        p
    }

    #[test]
    fn classify_first_bytes() {
        let config = Config::default();
        let mainnet = [0xf9, 0xbe, 0xb4, 0xd9];
        assert!(
            matches!(classify(&prefix(mainnet, b"version"), &config), Ok(FirstBytes::V1(n)) if n.name == "mainnet")
        );
        assert!(matches!(classify(&prefix(mainnet, b"verack"), &config), Err(SessionError::FirstMessageNotVersion)));
        // Another coin's v1 VERSION is not passed through.
        assert!(matches!(
            classify(&prefix([0xfb, 0xc0, 0xb6, 0xdb], b"version"), &config),
            Err(SessionError::NetworkNotAllowed(_))
        ));
        assert!(matches!(classify(b"GET / HTTP/1.1\r\n", &config), Err(SessionError::NotBitcoin(_))));
        let mut tls = [0x5au8; 16];
        tls[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
        assert!(matches!(classify(&tls, &config), Err(SessionError::NotBitcoin(_))));
        let random = [0x8f, 0x01, 0xee, 0x42, 0x10, 0x99, 0xfe, 0x00, 0x31, 0xc4, 0x77, 0x05, 0xaa, 0x3b, 0x60, 0xd2];
        assert!(matches!(classify(&random, &config), Ok(FirstBytes::V2)));
    }

    #[test]
    fn disallowed_network_is_refused_not_passed_through() {
        let cli = crate::config::Cli { network: vec!["regtest".into()], ..Default::default() };
        let config = Config::load(&cli).unwrap();
        let mainnet = [0xf9, 0xbe, 0xb4, 0xd9];
        assert!(matches!(classify(&prefix(mainnet, b"version"), &config), Err(SessionError::NetworkNotAllowed(_))));
        assert!(matches!(classify(&prefix(mainnet, b"ping"), &config), Err(SessionError::NetworkNotAllowed(_))));
    }

    #[test]
    fn passthrough_can_be_disabled() {
        let cli = crate::config::Cli { passthrough: Some(false), ..Default::default() };
        let config = Config::load(&cli).unwrap();
        let random = [0x8f; 16];
        assert!(matches!(classify(&random, &config), Err(SessionError::PassthroughDisabled)));
    }

    #[test]
    fn reply_codes() {
        use std::io::{Error, ErrorKind};
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let connect = |kind| SessionError::Dial(DialError::Connect { addr, source: Error::from(kind) });
        assert_eq!(reply_code(&connect(ErrorKind::ConnectionRefused)), Some(ReplyCode::CONNECTION_REFUSED));
        assert_eq!(reply_code(&connect(ErrorKind::HostUnreachable)), Some(ReplyCode::HOST_UNREACHABLE));
        assert_eq!(reply_code(&connect(ErrorKind::NetworkUnreachable)), Some(ReplyCode::NETWORK_UNREACHABLE));
        assert_eq!(reply_code(&connect(ErrorKind::Other)), Some(ReplyCode::GENERAL_FAILURE));
        assert_eq!(reply_code(&SessionError::Dial(DialError::ConnectTimeout { addr })), Some(ReplyCode::TTL_EXPIRED));
        assert_eq!(
            reply_code(&SessionError::Dial(DialError::OnionNeedsUpstream("x.onion:8333".into()))),
            Some(ReplyCode::HOST_UNREACHABLE)
        );
        assert_eq!(
            reply_code(&SessionError::CommandNotSupported(Command::Bind)),
            Some(ReplyCode::COMMAND_NOT_SUPPORTED)
        );
        assert_eq!(
            reply_code(&SessionError::Socks(socks5::Socks5Error::AddressTypeNotSupported(9))),
            Some(ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED)
        );
        assert_eq!(reply_code(&SessionError::ClientClosedEarly), None);
    }
}
