//! One session from accept to close, in stage order:
//! accept -> destination -> dial -> sniff -> upgrade -> relay.
//!
//! Three front ends feed the same steps: SOCKS5 (the destination comes from
//! CONNECT), transparent mode (from `addr_recv` of the client's VERSION) and
//! static routes (fixed in the configuration). The main listener tells
//! SOCKS5 from transparent clients by the first byte. Each front end only
//! finds the destination (`front.rs`); `Session::connect`, `Session::sniff`
//! (here) and `Session::carry` (`carry.rs`) are shared. SOCKS5 sessions
//! also send our BIP324 key between dial and reply when the policy says so
//! (`Session::send_key_early`), so the upgrade's first round trip overlaps
//! the client's. Files, in stage order: `front.rs` (accept, destination),
//! this file (dial, sniff), `carry.rs` (upgrade, relay); `read.rs` is the
//! one "decode or read more" loop, `error.rs` the failures and their SOCKS5
//! answers.
//!
//! Policy comes from [`crate::policy`] (when plaintext is allowed, what may
//! be dialed) and [`crate::sniff`] (what the client speaks); this module asks
//! them at the moment each decision matters and acts on the answer. It
//! writes the session's close line; `server.rs` owns the span.

mod carry;
mod error;
mod front;
mod read;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info};

pub use self::error::{SessionError, SocksAnswer, SocksStage, Stage, socks_answer};
use self::read::{read_decoded, read_more};
use crate::config::Config;
use crate::metrics::{LiveSession, Observer};
use crate::network::Network;
use crate::outbound::{self, Destination, DialError};
use crate::policy::{self, DialRules, Evidence, Front, Plan};
use crate::relay::RelayReport;
use crate::sniff::{self, Sniffed};
use crate::socks5::{self, Target};
use crate::state::ProxyState;
use crate::stream::Stream;
use crate::upgrade::{self, KeySent, UpgradeError};
use crate::v1::{Decoded, FrameDecoder};

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

/// Our key, sent early or not: SOCKS5 sessions may send it right after the
/// TCP connect, before the client's first bytes are in.
enum OurKey {
    /// Not sent: the remote has received nothing from us.
    NotSent,
    /// On the wire; the rest of the handshake continues from here.
    Sent(KeySent),
    /// Sending it failed; judged like any handshake failure once a v1
    /// client's VERSION is in.
    SendFailed(UpgradeError),
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
        Err(error @ SessionError::ClientLeftIdle) => {
            debug!(stage = %error.stage(), reason = %error, ms = ms(), "session closed");
            error.label()
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
                    self.admit(Front::Socks5)?;
                    self.serve_socks(client, pending, deadline).await
                } else if config.transparent && config.networks.iter().any(|n| n.magic[0] == first) {
                    self.admit(Front::Transparent)?;
                    self.serve_transparent(client, pending).await
                } else {
                    Err(SessionError::UnknownProtocol(first))
                }
            }
            FrontEnd::Transparent => {
                self.admit(Front::Transparent)?;
                self.serve_transparent(client, pending).await
            }
            FrontEnd::Route(target) => {
                self.admit(Front::Route)?;
                self.serve_route(client, pending, target).await
            }
        }
    }

    /// Whether this client may use `front` ([`policy::admits`]). The
    /// configuration already refuses to start a listener off loopback that
    /// `front` could not protect; this is the same rule per session, so a
    /// front end that cannot ask for credentials never serves a client
    /// elsewhere that only credentials were meant to keep out.
    fn admit(&self, front: Front) -> Result<(), SessionError> {
        if policy::admits(front, self.live.client.is_local(), self.config.client_restrictions()) {
            Ok(())
        } else {
            Err(SessionError::NotAdmitted(front))
        }
    }

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
        self.state.v1_only.as_ref().is_some_and(|memory| memory.contains(&destination.shown()))
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

    /// dial -> upgrade, early: our key and garbage right after the TCP
    /// connect, when [`policy::send_key_early`] says so, so the remote's
    /// answer is on its way while the client reads the SOCKS5 reply and
    /// sends its VERSION (docs/DESIGN.md, "Key early"). Only for a session
    /// the policy would upgrade: a remembered v1-only remote under fallback
    /// v1 is spoken to in v1 and gets no key.
    async fn send_key_early(&self, remote: &mut TcpStream, destination: &Destination) -> OurKey {
        let config = self.config;
        let spoke_v2 = self.state.v2_clients.contains(&self.live.client.key());
        if !policy::send_key_early(config.early_key, config.passthrough, spoke_v2)
            || !matches!(self.plan_untried(destination), Plan::Upgrade)
        {
            return OurKey::NotSent;
        }
        let shape = config.shaping.handshake.draw(&mut rand::thread_rng());
        match upgrade::send_key(remote, self.state.keys.take(), &shape, config.timeouts.handshake).await {
            Ok(sent) => OurKey::Sent(sent),
            Err(error) => OurKey::SendFailed(error),
        }
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

    /// Reads until `pending` starts with a whole, valid VERSION message, its
    /// payload at most [`crate::v1::MAX_VERSION_PAYLOAD_BYTES`] (checked from the
    /// header, before more is read).
    async fn read_version(
        &self,
        client: &mut Stream,
        pending: &mut Pending,
        network: &Network,
    ) -> Result<Client, SessionError> {
        let wait = self.config.timeouts.first_message;
        let deadline = Instant::now() + wait;
        let decoder = FrameDecoder::for_version(network.magic);
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
}

/// A dial failure, with the operator hint an onion target needs.
fn dial_failed(destination: &Destination, error: DialError) -> SessionError {
    if let DialError::OnionNeedsUpstream(_) = &error {
        info!(target = %destination.target, "onion targets need an upstream SOCKS5 proxy such as Tor; none is configured");
    }
    SessionError::Dial(error)
}
