//! One inbound session: a peer that connected to an inbound listener, in
//! front of a v1-only node. In stage order:
//!
//! - first bytes ([`respond::classify_first_bytes`]): a v1 VERSION of the
//!   listener's network is relayed (`v1 = "relay"`) once the whole message
//!   is in and checks out, under the same deadline as a handshake, or closed
//!   (`v1 = "refuse"`); a VERSION of another network is closed, as Core does;
//!   anything else is a BIP324 initiator;
//! - upgrade: the responder handshake ([`respond::respond_shaped`]), under
//!   the handshake timeout counted from accept, with the garbage length and
//!   handshake decoys drawn from `[shaping]` as for outbound sessions;
//! - dial: the node, directly (it is normally on loopback), only once the
//!   peer has proved itself, so junk never reaches the node;
//! - relay: [`relay::run`] with the peer as its client and the node as its
//!   remote: `V2ToV1` peer -> node and `V1ToV2` node -> peer for v2 peers,
//!   `V1ToV1` both ways for v1 peers; every byte checked as a message.
//!
//! The node's first message gets the NODE_P2P_V2 service bit
//! ([`crate::advertise`]), so peers learn that this address speaks v2; so do
//! the entries of its `addr`/`addrv2` messages that announce the listener's
//! `advertise` address.
//! The span is opened by `server.rs`; this module writes the open and close
//! lines and reports to the observer.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info};

use crate::advertise::{self, ADDR_COMMAND, AddrRewrite, Rewrite};
use crate::config::{Inbound, NodeSource, V1Peers};
use crate::metrics::{LiveSession, Observer};
use crate::outbound::{self, DialError};
use crate::policy::DialRules;
use crate::relay::{
    self, CloseReason, DirectionStats, Leg, RelayReport, Shaper, Side, Step, Translated, Translator, V1ToV1, V1ToV2,
    V2ToV1,
};
use crate::respond::{self, FirstBytes, PeerReader, RespondError};
use crate::socks5::Host;
use crate::state::ProxyState;
use crate::v1::{self, Decoded, FrameDecoder, Magic, V1Error};
use crate::v2::MAX_VERSION_CONTENTS_BYTES;

/// Reads until `pending` starts with the v1 peer's whole VERSION, checked as
/// a v1 message of the listener's network, its payload at most
/// [`v1::MAX_VERSION_PAYLOAD_BYTES`], before `deadline` (the handshake
/// deadline counted from accept). The node is dialed only once it is in: a
/// peer that sends the 16-byte v1 prefix and stops is closed at the deadline
/// like a silent v2 initiator, and never reaches the node.
async fn read_peer_version(
    peer: &mut TcpStream,
    pending: &mut BytesMut,
    magic: Magic,
    deadline: Instant,
) -> Result<(), InboundError> {
    let decoder = FrameDecoder::for_version(magic);
    loop {
        match decoder.decode(pending) {
            Ok(Decoded::Frame { .. }) => return Ok(()),
            Ok(Decoded::NeedMore { total }) => {
                let already = pending.len();
                PeerReader::new(peer, deadline, already)
                    .read_into(pending, total.saturating_sub(already))
                    .await
                    .map_err(InboundError::Handshake)?;
            }
            Err(error) => return Err(InboundError::BadVersion(error)),
        }
    }
}

/// How an inbound session carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundTransport {
    V2,
    V1,
}

impl InboundTransport {
    pub fn label(self) -> &'static str {
        match self {
            InboundTransport::V2 => "v2",
            InboundTransport::V1 => "v1",
        }
    }
}

impl std::fmt::Display for InboundTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Everything an inbound session fails on before its relay starts.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("{0}")]
    Handshake(RespondError),
    #[error("peer speaks v1 and this listener refuses v1 peers (v1 = \"refuse\")")]
    V1Refused,
    #[error("peer sent a v1 VERSION for network magic {}, not {network}", hex::encode(.found))]
    OtherNetwork { found: Magic, network: String },
    #[error("peer's v1 VERSION: {0}")]
    BadVersion(V1Error),
    #[error("node {node} unreachable: {error}")]
    Dial { node: String, error: DialError },
    #[error("node {node} unreachable from the peer's address {source_ip} (node_source = \"peer\"): {error}")]
    DialFromPeer { node: String, source_ip: IpAddr, error: std::io::Error },
}

impl InboundError {
    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            InboundError::Handshake(RespondError::Closed { received: 0, .. }) => "peer_gone",
            InboundError::Handshake(RespondError::TimedOut { .. }) => "handshake_timeout",
            InboundError::Handshake(_) => "handshake_failed",
            InboundError::V1Refused => "v1_refused",
            InboundError::OtherNetwork { .. } => "wrong_network",
            InboundError::BadVersion(_) => "bad_peer_message",
            InboundError::Dial { .. } | InboundError::DialFromPeer { .. } => "node_unreachable",
        }
    }
}

/// A relay close reason in inbound terms: the relay's client is the peer,
/// its remote the node. Returns the metrics label and the log text.
pub fn describe_close(reason: &CloseReason) -> (&'static str, String) {
    let side = |side: Side| match side {
        Side::Client => "peer",
        Side::Remote => "node",
    };
    let other = |side: Side| match side {
        Side::Client => Side::Remote,
        Side::Remote => Side::Client,
    };
    match reason {
        CloseReason::BothClosed => ("closed", "peer and node closed".to_owned()),
        CloseReason::BadV1(Side::Client, e) => ("bad_peer_message", format!("peer sent a bad v1 message: {e}")),
        CloseReason::BadV1(Side::Remote, e) => ("bad_node_message", format!("node sent a bad v1 message: {e}")),
        CloseReason::BadV2(e) => ("bad_peer_packet", format!("peer sent a bad v2 packet: {e}")),
        CloseReason::Encode(e) => ("internal", format!("encrypting a node message failed: {e}")),
        CloseReason::TooLargeForV1 { command, len, max } => (
            "peer_message_too_large",
            format!("peer sent a `{command}` message of {len} payload bytes, more than the {max} a v1 node accepts"),
        ),
        CloseReason::Truncated { side: s, pending } => {
            ("truncated", format!("{} closed in the middle of a message ({pending} bytes pending)", side(*s)))
        }
        CloseReason::HalfOpen { closed, drain } => (
            "half_open",
            format!("{} closed and the {} did not close within {drain:?}", side(*closed), side(other(*closed))),
        ),
        CloseReason::WriteStalled(s, stall) => {
            ("write_stalled", format!("{} read nothing for {stall:?} (write stalled)", side(*s)))
        }
        CloseReason::Io(Side::Client, e) => ("peer_io_error", format!("peer connection error: {e}")),
        CloseReason::Io(Side::Remote, e) => ("node_io_error", format!("node connection error: {e}")),
        other => (other.label(), other.to_string()),
    }
}

/// Node -> peer: sets NODE_P2P_V2 in the node's first message (its VERSION)
/// and, with `advertise`, in the entries of its `addr`/`addrv2` messages
/// that announce that address, before `inner` translates them; and names
/// the node as the side that sent a bad v1 message (`V1ToV2` calls its
/// input the client's).
pub struct NodeToPeer<T> {
    pub inner: T,
    magic: Magic,
    advertise: Option<SocketAddr>,
    first_pending: bool,
    /// Bytes at the front of the input already looked at: whole frames,
    /// rewritten where they had to be, that `inner` has not consumed yet.
    scanned: usize,
    observer: Arc<Observer>,
}

impl<T: Translator> NodeToPeer<T> {
    pub fn new(inner: T, magic: Magic, advertise: Option<SocketAddr>, observer: Arc<Observer>) -> Self {
        NodeToPeer { inner, magic, advertise, first_pending: true, scanned: 0, observer }
    }

    /// Rewrites the whole frame at `input[at..at + len]` where it has to be;
    /// returns its length afterwards.
    fn rewrite(&mut self, input: &mut BytesMut, at: usize, len: usize, command: &v1::Command) -> usize {
        if self.first_pending {
            self.first_pending = false;
            let outcome = advertise::set_p2p_v2_in_frame(&mut input[at..at + len]);
            self.observer.inbound_version_rewrite(outcome.label());
            match outcome {
                Rewrite::Set => debug!("node VERSION: NODE_P2P_V2 set, checksum recomputed"),
                other => debug!(outcome = other.label(), "node's first message left unchanged"),
            }
        }
        let Some(advertised) = self.advertise.filter(|_| advertise::is_addr_command(command)) else {
            return len;
        };
        let name = if *command == ADDR_COMMAND { "addr" } else { "addrv2" };
        let outcome = advertise::set_p2p_v2_in_addr_frame(&input[at..at + len], advertised);
        self.observer.inbound_addr_rewrite(name, outcome.label());
        match outcome {
            AddrRewrite::Set { entries, frame } => {
                debug!(command = name, entries, %advertised, "node self-announcement: NODE_P2P_V2 set");
                let tail = input.split_off(at + len);
                input.truncate(at);
                input.extend_from_slice(&frame);
                input.unsplit(tail);
                frame.len()
            }
            AddrRewrite::Malformed(error) => {
                debug!(command = name, %error, "node addr message left unchanged");
                len
            }
            other => {
                debug!(command = name, outcome = other.label(), "node addr message left unchanged");
                len
            }
        }
    }
}

impl<T: Translator> Translator for NodeToPeer<T> {
    fn translate(&mut self, input: &mut BytesMut, output: &mut BytesMut, stats: &mut DirectionStats) -> Translated {
        // Every whole frame not yet looked at, in order. A partial frame
        // waits for its bytes; a bad header is `inner`'s to report.
        let decoder = FrameDecoder::new(self.magic, false);
        while let Some(Ok(Decoded::Frame { header, len })) = input.get(self.scanned..).map(|rest| decoder.decode(rest))
        {
            let at = self.scanned;
            self.scanned = at + self.rewrite(input, at, len, &header.command);
        }
        let before = input.len();
        let translated = self.inner.translate(input, output, stats);
        // `inner` consumes whole frames from the front: now, or (`Direct`)
        // once the relay has written them.
        let mut consumed = before.saturating_sub(input.len());
        if let Ok(Step::Direct(direct)) = &translated {
            consumed += direct.consumed;
        }
        self.scanned = self.scanned.saturating_sub(consumed);
        translated.map_err(|reason| match reason {
            CloseReason::BadV1(Side::Client, e) => CloseReason::BadV1(Side::Remote, e),
            other => other,
        })
    }

    // Cover decoys are `inner`'s (the v2 encoder's); they go to the peer
    // between whole writes and never pass the frame scan above.
    fn idle_wake(&self) -> Option<Instant> {
        self.inner.idle_wake()
    }

    fn idle_write(&mut self, now: Instant, out: &mut BytesMut) -> Result<(), CloseReason> {
        self.inner.idle_write(now, out)
    }

    fn pacing(&mut self) -> Option<&mut relay::Pacing> {
        self.inner.pacing()
    }
}

/// Connects to `node` from `source`, an address of another host (the
/// peer's): IP_TRANSPARENT lets the socket bind it, and the policy routing
/// the README gives delivers the node's answers back to this socket. The
/// port is the kernel's choice.
#[cfg(target_os = "linux")]
async fn connect_from(source: IpAddr, node: SocketAddr, rules: &DialRules, limit: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    if let Err(refusal) = rules.check_candidate(node) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, refusal.to_string()));
    }
    if source.is_ipv4() != node.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the peer's address family differs from the node's (give the node an address of both families)",
        ));
    }
    let socket = Socket::new(Domain::for_address(node), Type::STREAM, Some(Protocol::TCP))?;
    if source.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    tokio::time::timeout(limit, socket.connect(node))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out (is the policy routing in place?)"))?
}

#[cfg(not(target_os = "linux"))]
async fn connect_from(_: IpAddr, _: SocketAddr, _: &DialRules, _: Duration) -> io::Result<TcpStream> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "node_source = \"peer\" needs Linux (IP_TRANSPARENT)"))
}

/// Runs one inbound connection to its end and writes its close line.
pub async fn run(
    peer: TcpStream,
    listener: Arc<Inbound>,
    live: Arc<LiveSession>,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
) {
    let accepted = Instant::now();
    let _ = peer.set_nodelay(true);
    live.set_target(listener.node.to_string());
    live.set_network(listener.network.name.clone());
    let session = InboundSession { state: &state, listener: &listener, live: &live, shutdown, accepted };
    let ms = || accepted.elapsed().as_millis() as u64;
    let label = match session.serve(peer).await {
        Ok((transport, report)) => {
            let (label, reason) = describe_close(&report.reason);
            info!(
                %transport,
                %reason,
                bytes_peer_to_node = report.client_to_remote.bytes_in,
                bytes_node_to_peer = report.remote_to_client.bytes_in,
                messages_peer_to_node = report.client_to_remote.messages,
                messages_node_to_peer = report.remote_to_client.messages,
                ms = ms(),
                "inbound session closed"
            );
            label
        }
        Err(error) => {
            info!(reason = %error, ms = ms(), "inbound session closed");
            error.label()
        }
    };
    state.observer.closed(&live, label);
}

struct InboundSession<'a> {
    state: &'a ProxyState,
    listener: &'a Inbound,
    live: &'a LiveSession,
    shutdown: CancellationToken,
    accepted: Instant,
}

impl InboundSession<'_> {
    async fn serve(&self, mut peer: TcpStream) -> Result<(InboundTransport, RelayReport), InboundError> {
        let peer_ip = peer.peer_addr().map(|addr| addr.ip());
        let config = &self.state.config;
        let magic = self.listener.network.magic;
        let deadline = self.accepted + config.timeouts.handshake;

        // First bytes: v1 or v2, under the handshake deadline.
        let mut pending = BytesMut::new();
        let first = loop {
            match respond::classify_first_bytes(&pending, &magic) {
                FirstBytes::NeedMore => {
                    let already = pending.len();
                    PeerReader::new(&mut peer, deadline, already)
                        .read_into(&mut pending, 16)
                        .await
                        .map_err(InboundError::Handshake)?;
                }
                decided => break decided,
            }
        };
        match first {
            FirstBytes::V1 => {
                if self.listener.v1 == V1Peers::Refuse {
                    return Err(InboundError::V1Refused);
                }
                read_peer_version(&mut peer, &mut pending, magic, deadline).await?;
                let node = self.dial_node(peer_ip).await?;
                Ok((InboundTransport::V1, self.relay_v1(peer, pending, node).await))
            }
            FirstBytes::OtherNetworkV1(found) => {
                Err(InboundError::OtherNetwork { found, network: self.listener.network.name.clone() })
            }
            FirstBytes::V2 | FirstBytes::NeedMore => {
                // The same garbage and decoy policy as our initiator's.
                let shape = config.shaping.handshake.draw(&mut rand::thread_rng());
                let channel = match respond::respond_shaped(&mut peer, pending, magic, deadline, &shape).await {
                    Ok(channel) => channel,
                    Err(error) => {
                        self.state.observer.inbound_handshake_failed(error.label());
                        return Err(InboundError::Handshake(error));
                    }
                };
                self.state.observer.inbound_handshake_done(self.accepted.elapsed());
                self.state.observer.shaping().handshake_decoys(shape.decoy_wire_bytes());
                let node = self.dial_node(peer_ip).await?;
                self.open_line(InboundTransport::V2, Some(&channel.session_id), &node);
                let shaping = self.state.observer.shaping().for_shaper(self.live.id, config.shaping.session_histograms);
                let report = self
                    .relay(
                        Leg { stream: peer.into(), pending: channel.leftover },
                        node,
                        // The peer's first message is its VERSION.
                        V2ToV1 { decoder: channel.decoder, magic, first_message_max: Some(MAX_VERSION_CONTENTS_BYTES) },
                        V1ToV2 {
                            decoder: FrameDecoder::new(magic, true),
                            encoder: channel.encoder,
                            // What the proxy writes to the peer is shaped
                            // like an outbound session's client_to_remote leg.
                            shaper: Shaper::for_config(&config.shaping, &shaping),
                        },
                    )
                    .await;
                Ok((InboundTransport::V2, report))
            }
        }
    }

    /// The node is the operator's own address, normally on loopback; never
    /// one of this proxy's listeners. With `node_source = "peer"` the
    /// connection comes from the peer's own IP address.
    async fn dial_node(&self, peer: io::Result<IpAddr>) -> Result<TcpStream, InboundError> {
        let rules = DialRules { listening: self.state.listening(), allow_private: true };
        let node = &self.listener.node;
        let connect = self.state.config.timeouts.connect;
        match (self.listener.node_source, &node.host) {
            (NodeSource::Peer, Host::Ip(ip)) => {
                let addr = SocketAddr::new(*ip, node.port);
                let unknown = IpAddr::from([0, 0, 0, 0]);
                let fail = |source_ip, error| InboundError::DialFromPeer { node: node.to_string(), source_ip, error };
                let source_ip = peer.map_err(|error| fail(unknown, error))?.to_canonical();
                let stream =
                    connect_from(source_ip, addr, &rules, connect).await.map_err(|error| fail(source_ip, error))?;
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            _ => outbound::dial_direct(node, connect, &rules)
                .await
                .map_err(|error| InboundError::Dial { node: node.to_string(), error }),
        }
    }

    /// A v1 peer, framed both ways: the peer's bytes so far (its VERSION
    /// first) go to the node once each message checks out.
    async fn relay_v1(&self, peer: TcpStream, pending: BytesMut, node: TcpStream) -> RelayReport {
        let magic = self.listener.network.magic;
        self.open_line(InboundTransport::V1, None, &node);
        self.relay(
            Leg { stream: peer.into(), pending },
            node,
            V1ToV1 { decoder: FrameDecoder::new(magic, true), side: Side::Client },
            V1ToV1 { decoder: FrameDecoder::new(magic, true), side: Side::Remote },
        )
        .await
    }

    /// Relays `peer` and `node` until the session ends: `peer_to_node` one
    /// way, `node_to_peer` the other, wrapped so that the node's VERSION and
    /// addresses advertise what this listener says.
    async fn relay(
        &self,
        peer: Leg,
        node: TcpStream,
        peer_to_node: impl Translator + 'static,
        node_to_peer: impl Translator + 'static,
    ) -> RelayReport {
        let magic = self.listener.network.magic;
        let node_to_peer = NodeToPeer::new(node_to_peer, magic, self.listener.advertise, self.state.observer.clone());
        let node = Leg { stream: node.into(), pending: BytesMut::new() };
        let (limits, counters) = (self.state.relay_limits(), self.live.counters.clone());
        relay::run(peer, node, peer_to_node, node_to_peer, limits, counters, self.shutdown.clone()).await
    }

    /// Records the transport (and session id, in hex as Core's `getpeerinfo`
    /// shows it) on the span and the status, and writes the open line. It
    /// names `node_local`, the proxy's end of the node connection: the
    /// address the node lists this peer under (`getpeerinfo`'s `addr`), next
    /// to the real peer address the span carries.
    fn open_line(&self, transport: InboundTransport, session_id: Option<&[u8; 32]>, node: &TcpStream) {
        let span = Span::current();
        span.record("transport", tracing::field::display(transport));
        let node_local = node.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "unknown".to_owned());
        self.live.set_node_local(node_local.clone());
        self.state.observer.opened(self.live, transport.label());
        match session_id {
            Some(id) => {
                let session_id = hex::encode(id);
                span.record("session_id", tracing::field::display(&session_id));
                self.live.set_session_id(session_id.clone());
                info!(%transport, %session_id, %node_local, "inbound session open");
            }
            None => info!(%transport, %node_local, "inbound session open"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{V1Error, V1Header, VERSION_COMMAND};
    use crate::v2::V2Error;

    const REGTEST: Magic = [0xfa, 0xbf, 0xb5, 0xda];

    #[test]
    fn close_reasons_name_peer_and_node() {
        let bad = V1Error::InvalidCommand { command: [1; 12] };
        assert_eq!(describe_close(&CloseReason::BadV1(Side::Client, bad.clone())).0, "bad_peer_message");
        let (label, text) = describe_close(&CloseReason::BadV1(Side::Remote, bad));
        assert_eq!(label, "bad_node_message");
        assert!(text.starts_with("node sent"), "{text}");
        let (label, text) = describe_close(&CloseReason::BadV2(V2Error::Decryption));
        assert_eq!(
            (label, text.as_str()),
            ("bad_peer_packet", "peer sent a bad v2 packet: packet authentication failed")
        );
        let (_, text) = describe_close(&CloseReason::Truncated { side: Side::Remote, pending: 3 });
        assert!(text.starts_with("node closed"), "{text}");
        let half_open = CloseReason::HalfOpen { closed: Side::Remote, drain: Duration::from_secs(5) };
        assert_eq!(
            describe_close(&half_open),
            ("half_open", "node closed and the peer did not close within 5s".into())
        );
        let stalled = CloseReason::WriteStalled(Side::Client, Duration::from_secs(60));
        assert_eq!(describe_close(&stalled), ("write_stalled", "peer read nothing for 60s (write stalled)".into()));
    }

    /// A translator that hands whole frames on, as the real ones consume
    /// them, or fails like `V1ToV2` does on a bad message from its input side.
    struct Echo {
        fail: bool,
    }

    impl Translator for Echo {
        fn translate(
            &mut self,
            input: &mut BytesMut,
            output: &mut BytesMut,
            _stats: &mut DirectionStats,
        ) -> Translated {
            if self.fail {
                return Err(CloseReason::BadV1(Side::Client, V1Error::InvalidCommand { command: [0; 12] }));
            }
            let decoder = FrameDecoder::new(REGTEST, false);
            let mut complete = 0;
            while let Ok(Decoded::Frame { len, .. }) = decoder.decode(&input[complete..]) {
                complete += len;
            }
            output.extend_from_slice(&input.split_to(complete));
            Ok(Step::NeedMore(0))
        }
    }

    fn version_frame(services: u64) -> Vec<u8> {
        let mut payload = 70016u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&services.to_le_bytes());
        payload.extend_from_slice(&[7u8; 80]);
        let mut frame = V1Header::for_payload(REGTEST, VERSION_COMMAND, &payload).encode().to_vec();
        frame.extend_from_slice(&payload);
        frame
    }

    #[test]
    fn node_version_gets_the_bit_once_whatever_the_read_sizes() {
        let observer = Arc::new(Observer::default());
        let whole = [version_frame(0x0409), version_frame(0x0409)].concat();
        for chunk in [1, 7, 24, 25, 50, whole.len()] {
            let mut translator = NodeToPeer::new(Echo { fail: false }, REGTEST, None, observer.clone());
            let (mut input, mut output) = (BytesMut::new(), BytesMut::new());
            let mut stats = DirectionStats::default();
            for piece in whole.chunks(chunk) {
                input.extend_from_slice(piece);
                translator.translate(&mut input, &mut output, &mut stats).unwrap();
            }
            let first = &output[..whole.len() / 2];
            assert_eq!(advertise::services(&first[24..]), Some(0x0c09), "chunk {chunk}");
            assert!(FrameDecoder::new(REGTEST, true).decode(first).is_ok(), "checksum, chunk {chunk}");
            // Only the first message is touched.
            assert_eq!(&output[whole.len() / 2..], &whole[whole.len() / 2..], "chunk {chunk}");
        }
    }

    #[test]
    fn a_bad_node_message_is_the_nodes() {
        let mut translator = NodeToPeer::new(Echo { fail: true }, REGTEST, None, Arc::new(Observer::default()));
        let mut input = BytesMut::from(&[0u8; 30][..]);
        let error = translator.translate(&mut input, &mut BytesMut::new(), &mut DirectionStats::default());
        assert!(matches!(error, Err(CloseReason::BadV1(Side::Remote, _))), "{error:?}");
    }

    fn frame(command: &str, payload: &[u8]) -> Vec<u8> {
        let command = v1::command_from_str(command).unwrap();
        let mut frame = V1Header::for_payload(REGTEST, command, payload).encode().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    /// A BIP155 IPv4 entry with 1-byte services (its CompactSize grows to 3
    /// bytes when bit 11 is set).
    fn addrv2_v4(ip: [u8; 4], port: u16, services: u8) -> Vec<u8> {
        let mut out = 1_700_000_000u32.to_le_bytes().to_vec();
        out.extend_from_slice(&[services, 1, 4]);
        out.extend_from_slice(&ip);
        out.extend_from_slice(&port.to_be_bytes());
        out
    }

    fn addr_v4(ip: [u8; 4], port: u16, services: u64) -> Vec<u8> {
        let mut out = 1_700_000_000u32.to_le_bytes().to_vec();
        out.extend_from_slice(&services.to_le_bytes());
        out.extend_from_slice(&std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets());
        out.extend_from_slice(&port.to_be_bytes());
        out
    }

    #[test]
    fn node_addr_messages_get_the_bit_whatever_the_read_sizes() {
        let advertised: SocketAddr = "203.0.113.7:8333".parse().unwrap();
        let ping = frame("ping", &[9u8; 8]);
        let sent = [
            version_frame(0x0409),
            frame(
                "addrv2",
                &[&[2u8][..], &addrv2_v4([203, 0, 113, 7], 8333, 9), &addrv2_v4([198, 51, 100, 1], 8333, 9)].concat(),
            ),
            ping.clone(),
            frame(
                "addr",
                &[&[2u8][..], &addr_v4([198, 51, 100, 1], 8333, 9), &addr_v4([203, 0, 113, 7], 8333, 9)].concat(),
            ),
            frame("addrv2", &[&[1u8][..], &addrv2_v4([203, 0, 113, 7], 8334, 9)].concat()),
        ];
        // The advertised entry with services 0x0809: a 3-byte CompactSize.
        let mut advertised_v2_set = 1_700_000_000u32.to_le_bytes().to_vec();
        advertised_v2_set.extend_from_slice(&[0xfd, 0x09, 0x08, 1, 4, 203, 0, 113, 7, 0x20, 0x8d]);
        let expected = [
            version_frame(0x0c09),
            frame("addrv2", &[&[2u8][..], &advertised_v2_set, &addrv2_v4([198, 51, 100, 1], 8333, 9)].concat()),
            ping,
            frame(
                "addr",
                &[&[2u8][..], &addr_v4([198, 51, 100, 1], 8333, 9), &addr_v4([203, 0, 113, 7], 8333, 0x809)].concat(),
            ),
            sent[4].clone(),
        ]
        .concat();
        let whole = sent.concat();
        for chunk in [1, 5, 24, 25, 61, 100, whole.len()] {
            let observer = Arc::new(Observer::default());
            let inner = V1ToV1 { decoder: FrameDecoder::new(REGTEST, true), side: Side::Remote };
            let mut translator = NodeToPeer::new(inner, REGTEST, Some(advertised), observer.clone());
            let (mut input, mut output) = (BytesMut::new(), BytesMut::new());
            let mut stats = DirectionStats::default();
            for piece in whole.chunks(chunk) {
                input.extend_from_slice(piece);
                translator.translate(&mut input, &mut output, &mut stats).unwrap();
            }
            assert!(input.is_empty(), "chunk {chunk}");
            assert_eq!(&output[..], &expected[..], "chunk {chunk}");
            let metrics = observer.encode_metrics();
            for line in [
                r#"inbound_addr_rewrites_total{command="addrv2",outcome="set"} 1"#,
                r#"inbound_addr_rewrites_total{command="addr",outcome="set"} 1"#,
                r#"inbound_addr_rewrites_total{command="addrv2",outcome="other_addresses"} 1"#,
            ] {
                assert!(metrics.contains(line), "chunk {chunk}: {line} missing");
            }
        }
    }

    #[test]
    fn without_advertise_addr_messages_pass_unchanged() {
        let addr = frame("addr", &[&[1u8][..], &addr_v4([203, 0, 113, 7], 8333, 9)].concat());
        let whole = [version_frame(0x0c09), addr].concat();
        let inner = V1ToV1 { decoder: FrameDecoder::new(REGTEST, true), side: Side::Remote };
        let mut translator = NodeToPeer::new(inner, REGTEST, None, Arc::new(Observer::default()));
        let (mut input, mut output) = (BytesMut::from(&whole[..]), BytesMut::new());
        translator.translate(&mut input, &mut output, &mut DirectionStats::default()).unwrap();
        assert_eq!(&output[..], &whole[..]);
    }
}
