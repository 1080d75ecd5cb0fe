//! Inbound mode end to end, with real parts: the `bip324` crate's initiator,
//! our own outbound proxy, plain v1 peers, and v1-only nodes on loopback
//! (the echoing node from `common`, and a node here that answers a VERSION
//! with its own, as a real node does).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bip324::{
    GarbageResult, Handshake, InboundCipher, Initialized, OutboundCipher, PacketType, ReceivedKey, Role, VersionResult,
};
use bip324_proxy::config::{Cli, Config};
use bip324_proxy::metrics::Observer;
use bip324_proxy::server::{Bound, bind_inbound, serve_with_inbound};
use bip324_proxy::session::FrontEnd;
use bip324_proxy::state::ProxyState;
use clap::Parser;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const NODE_P2P_V2: u64 = 1 << 11;

// ---------------------------------------------------------------- the proxy with inbound listeners

struct InboundProxy {
    /// The main (SOCKS5) listener.
    addr: SocketAddr,
    /// The inbound listeners, in configuration order.
    inbound: Vec<SocketAddr>,
    observer: Arc<Observer>,
    shutdown: CancellationToken,
}

impl Drop for InboundProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The library entry point with a main listener and the configured inbound
/// listeners, all on 127.0.0.1 port 0 (inbound ones as configured).
async fn spawn_inbound_proxy(toml: &str, args: &[&str]) -> InboundProxy {
    let path =
        std::env::temp_dir().join(format!("bip324-inbound-test-{}-{}.toml", std::process::id(), rand::random::<u64>()));
    std::fs::write(&path, toml).unwrap();
    let mut all = vec!["bip324-proxy", "--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let config = Config::load(&Cli::try_parse_from(all).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = main.local_addr().unwrap();
    let inbound = bind_inbound(&config).await.unwrap();
    let inbound_addrs = inbound.iter().map(|b| b.listener.local_addr().unwrap()).collect();
    let observer = Arc::new(Observer::default());
    let state = Arc::new(ProxyState::new(Arc::new(config), observer.clone()));
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_with_inbound(
        vec![Bound { listener: main.into(), front: FrontEnd::Main }],
        inbound,
        state,
        shutdown.clone(),
    ));
    InboundProxy { addr, inbound: inbound_addrs, observer, shutdown }
}

async fn inbound_to(node: SocketAddr, extra: &[&str]) -> InboundProxy {
    let spec = format!("127.0.0.1:0={node}@regtest");
    let mut args = vec!["--inbound", spec.as_str()];
    args.extend_from_slice(extra);
    spawn_inbound_proxy("", &args).await
}

// ---------------------------------------------------------------- a node that answers VERSION

/// What an answering node received, per connection.
type Received = Arc<Mutex<Vec<Vec<Frame>>>>;

/// A v1-only node as a real one behaves towards an inbound peer: it reads
/// the peer's VERSION, answers with its own VERSION (NODE_NETWORK |
/// NODE_WITNESS, no NODE_P2P_V2) and a VERACK, then echoes every message
/// but the peer's VERACK.
async fn spawn_answering_node() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let log = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let conn = {
                    let mut all = log.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let Ok(version) = read_frame(&mut stream).await else { return };
                if version.magic != REGTEST || version.command != "version" {
                    return;
                }
                log.lock().unwrap()[conn].push(version);
                let mut answer = version_message(REGTEST, peer);
                answer.extend(frame(REGTEST, "verack", &[]));
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
                while let Ok(message) = read_frame(&mut stream).await {
                    let echo = frame(message.magic, &message.command, &message.payload);
                    let verack = message.command == "verack";
                    log.lock().unwrap()[conn].push(message);
                    if !verack && stream.write_all(&echo).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, received)
}

fn services(version_payload: &[u8]) -> u64 {
    u64::from_le_bytes(version_payload[4..12].try_into().unwrap())
}

// ---------------------------------------------------------------- a BIP324 initiator (the bip324 crate)

/// How the test initiator shapes its handshake.
#[derive(Clone, Default)]
struct InitiatorShape {
    garbage_len: usize,
    decoys: Vec<Vec<u8>>,
    /// Write the garbage terminator in two pieces, with a pause between.
    split_terminator: bool,
}

/// A peer that runs BIP324 as initiator with the `bip324` crate.
struct V2Peer {
    stream: TcpStream,
    session_id: [u8; 32],
    /// The responder's garbage length, and the wire size of each decoy it
    /// sent before its version packet.
    responder_garbage: usize,
    responder_decoys: Vec<usize>,
    decrypt: InboundCipher,
    encrypt: OutboundCipher,
    buf: Vec<u8>,
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) {
    while buf.len() < len {
        let mut chunk = vec![0u8; (len - buf.len()).max(4096)];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("read timed out").expect("read");
        assert!(n > 0, "responder closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl V2Peer {
    async fn connect(addr: SocketAddr, shape: InitiatorShape) -> V2Peer {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let handshake = Handshake::<Initialized>::new(REGTEST, Role::Initiator).unwrap();
        let garbage = random_payload(shape.garbage_len);
        let mut key = vec![0u8; Handshake::<Initialized>::send_key_len(Some(&garbage))];
        let handshake = handshake.send_key(Some(&garbage), &mut key).unwrap();
        stream.write_all(&key).await.unwrap();

        let mut buf = Vec::new();
        fill(&mut stream, &mut buf, 64).await;
        let theirs: [u8; 64] = buf[..64].try_into().unwrap();
        let mut garbage_buf = buf[64..].to_vec();
        let handshake = handshake.receive_key(theirs).unwrap();
        let decoys: Vec<&[u8]> = shape.decoys.iter().map(Vec::as_slice).collect();
        let mut flight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(Some(&decoys))];
        let handshake = handshake.send_version(&mut flight, Some(&decoys)).unwrap();
        if shape.split_terminator {
            stream.write_all(&flight[..7]).await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(&flight[7..]).await.unwrap();
        } else {
            stream.write_all(&flight).await.unwrap();
        }

        let mut handshake = handshake;
        let (mut handshake, consumed) = loop {
            match handshake.receive_garbage(&garbage_buf).unwrap() {
                GarbageResult::FoundGarbage { handshake, consumed_bytes } => break (handshake, consumed_bytes),
                GarbageResult::NeedMoreData(waiting) => {
                    handshake = waiting;
                    let want = garbage_buf.len() + 1;
                    fill(&mut stream, &mut garbage_buf, want).await;
                }
            }
        };
        let responder_garbage = consumed - 16;
        let mut rest = garbage_buf[consumed..].to_vec();
        let mut responder_decoys = Vec::new();
        let cipher = loop {
            fill(&mut stream, &mut rest, 3).await;
            let len = handshake.decrypt_packet_len(rest[..3].try_into().unwrap()).unwrap();
            fill(&mut stream, &mut rest, 3 + len).await;
            let mut packet: Vec<u8> = rest.drain(..3 + len).collect();
            match handshake.receive_version(&mut packet[3..]).unwrap() {
                VersionResult::Complete { cipher } => break cipher,
                VersionResult::Decoy(next) => {
                    // Decrypted in place: header byte, contents, tag.
                    assert!(packet[4..3 + len - 16].iter().all(|&b| b == 0), "a decoy carries data");
                    responder_decoys.push(3 + len);
                    handshake = next;
                }
            }
        };
        let session_id = *cipher.id();
        let (decrypt, encrypt) = cipher.into_split();
        V2Peer { stream, session_id, responder_garbage, responder_decoys, decrypt, encrypt, buf: rest }
    }

    /// Sends a message with its command in long form.
    async fn send(&mut self, command: &str, payload: &[u8]) {
        let packet = self.packet(command, payload);
        self.stream.write_all(&packet).await.unwrap();
    }

    fn packet(&mut self, command: &str, payload: &[u8]) -> Vec<u8> {
        let mut contents = vec![0u8; 13];
        contents[1..1 + command.len()].copy_from_slice(command.as_bytes());
        contents.extend_from_slice(payload);
        self.encrypt.encrypt_to_vec(&contents, PacketType::Genuine, None)
    }

    /// The next genuine message: (command, payload). Short IDs used here:
    /// addr 1, block 2, ping 18, pong 19, addrv2 28.
    async fn recv(&mut self) -> (String, Vec<u8>) {
        loop {
            fill(&mut self.stream, &mut self.buf, 3).await;
            let len = self.decrypt.decrypt_packet_len(self.buf[..3].try_into().unwrap());
            fill(&mut self.stream, &mut self.buf, 3 + len).await;
            let mut packet: Vec<u8> = self.buf.drain(..3 + len).collect();
            let (kind, plaintext) = self.decrypt.decrypt_in_place(&mut packet[3..], None).unwrap();
            if kind == PacketType::Decoy {
                continue;
            }
            let contents = &plaintext[1..];
            let (command, payload) = match contents[0] {
                0 => {
                    let name: Vec<u8> = contents[1..13].iter().copied().take_while(|&b| b != 0).collect();
                    (String::from_utf8(name).unwrap(), contents[13..].to_vec())
                }
                1 => ("addr".to_owned(), contents[1..].to_vec()),
                2 => ("block".to_owned(), contents[1..].to_vec()),
                28 => ("addrv2".to_owned(), contents[1..].to_vec()),
                18 => ("ping".to_owned(), contents[1..].to_vec()),
                19 => ("pong".to_owned(), contents[1..].to_vec()),
                other => panic!("unexpected short id {other}"),
            };
            return (command, payload);
        }
    }
}

/// The payload of a v1 VERSION frame built by `version_message`.
fn version_payload(receiver: SocketAddr) -> Vec<u8> {
    version_message(REGTEST, receiver)[24..].to_vec()
}

async fn wait_until(mut check: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition not reached");
}

/// Waits until every session has closed, then checks the metrics show `line`.
async fn assert_closed_with(proxy: &InboundProxy, line: &str) {
    let observer = proxy.observer.clone();
    wait_until(|| observer.status().open_sessions == 0).await;
    let metrics = proxy.observer.encode_metrics();
    assert!(metrics.contains(line), "{metrics}");
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn bip324_initiator_reaches_a_v1_node_through_the_inbound_listener() {
    let (node, received) = spawn_answering_node().await;
    let proxy = inbound_to(node, &[]).await;
    let mut peer = V2Peer::connect(proxy.inbound[0], InitiatorShape { garbage_len: 300, ..Default::default() }).await;
    // Shaping off: Core's handshake, no decoys.
    assert!(peer.responder_decoys.is_empty());

    // VERSION round trip: ours reaches the node unchanged, the node's comes
    // back with NODE_P2P_V2 added.
    let ours = version_payload(proxy.inbound[0]);
    peer.send("version", &ours).await;
    let (command, theirs) = peer.recv().await;
    assert_eq!(command, "version");
    assert_eq!(services(&theirs), 0x09 | NODE_P2P_V2, "NODE_NETWORK | NODE_WITNESS | NODE_P2P_V2");
    assert_eq!(peer.recv().await.0, "verack");
    peer.send("verack", &[]).await;

    // A few messages, one large enough for the relay's zero-copy path.
    let block = random_payload(200_000);
    peer.send("ping", &7u64.to_le_bytes()).await;
    peer.send("block", &block).await;
    peer.send("sendheaders", &[]).await;
    assert_eq!(peer.recv().await, ("ping".to_owned(), 7u64.to_le_bytes().to_vec()));
    assert_eq!(peer.recv().await, ("block".to_owned(), block.clone()));
    assert_eq!(peer.recv().await.0, "sendheaders");

    let seen = received.lock().unwrap()[0].clone();
    assert_eq!(seen[0].command, "version");
    assert_eq!(seen[0].payload, ours, "the peer's VERSION reaches the node untouched");
    let commands: Vec<&str> = seen.iter().map(|f| f.command.as_str()).collect();
    assert_eq!(commands, ["version", "verack", "ping", "block", "sendheaders"]);

    // The proxy's session id is the initiator's.
    let status = proxy.observer.status();
    let row = status.sessions.iter().find(|s| s.direction == "inbound").expect("inbound session listed");
    assert_eq!(row.session_id.as_deref(), Some(hex::encode(peer.session_id).as_str()));
    assert_eq!(row.transport.as_deref(), Some("v2"));
    assert_eq!(row.target.as_deref(), Some(node.to_string().as_str()));
    assert_eq!(row.network.as_deref(), Some("regtest"));
    let metrics = proxy.observer.encode_metrics();
    assert!(metrics.contains("bip324_proxy_inbound_sessions_opened_total{transport=\"v2\"} 1"), "{metrics}");
    assert!(metrics.contains("bip324_proxy_inbound_version_rewrites_total{outcome=\"set\"} 1"), "{metrics}");
    assert!(metrics.contains("bip324_proxy_inbound_handshake_duration_seconds_count 1"), "{metrics}");

    drop(peer);
    assert_closed_with(&proxy, "bip324_proxy_inbound_sessions_closed_total{transport=\"v2\",reason=\"closed\"} 1")
        .await;
}

#[tokio::test]
async fn decoys_full_garbage_and_a_terminator_split_across_reads() {
    let node = spawn_v1_node(REGTEST).await;
    let proxy = inbound_to(node.addr, &[]).await;
    let shape = InitiatorShape {
        garbage_len: 4095,
        decoys: vec![vec![0xd0; 10], vec![], vec![0xd1; 3000]],
        split_terminator: true,
    };
    let mut peer = V2Peer::connect(proxy.inbound[0], shape).await;
    let version = version_payload(proxy.inbound[0]);
    peer.send("version", &version).await;
    // The echoing node sends the peer's own VERSION back as its first
    // message; it gains the bit on its way out.
    let (command, echoed) = peer.recv().await;
    assert_eq!(command, "version");
    assert_eq!(services(&echoed), services(&version) | NODE_P2P_V2);
    assert_eq!(echoed[12..], version[12..]);
    // Decoys after the handshake are skipped.
    let decoy = peer.encrypt.encrypt_to_vec(&[0xee; 50], PacketType::Decoy, None);
    peer.stream.write_all(&decoy).await.unwrap();
    peer.send("ping", &[1; 8]).await;
    assert_eq!(peer.recv().await, ("ping".to_owned(), vec![1; 8]));
}

#[tokio::test]
async fn our_outbound_proxy_chained_to_the_inbound_listener() {
    let (node, received) = spawn_answering_node().await;
    let inbound = inbound_to(node, &[]).await;
    let outbound = spawn_inbound_proxy("", &[]).await;

    // A v1 client -> outbound proxy (SOCKS5) -> v2 -> inbound listener -> v1 node.
    let mut client = open_v1_session(outbound.addr, inbound.inbound[0], REGTEST).await;
    let answer = expect_frame(&mut client).await;
    assert_eq!(answer.command, "version");
    assert_eq!(services(&answer.payload), 0x09 | NODE_P2P_V2, "the client sees the node advertise v2");
    assert_eq!(expect_frame(&mut client).await.command, "verack");
    client.write_all(&frame(REGTEST, "verack", &[])).await.unwrap();
    let payload = random_payload(70_000);
    client.write_all(&frame(REGTEST, "ping", &[9; 8])).await.unwrap();
    client.write_all(&frame(REGTEST, "tx", &payload)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await, Frame { magic: REGTEST, command: "ping".into(), payload: vec![9; 8] });
    assert_eq!(expect_frame(&mut client).await.payload, payload);
    let commands: Vec<String> = received.lock().unwrap()[0].iter().map(|f| f.command.clone()).collect();
    assert_eq!(commands, ["version", "verack", "ping", "tx"]);

    // Both ends of the v2 link agree on the session id.
    let out_row = outbound.observer.status().sessions[0].clone();
    let in_row = inbound.observer.status().sessions[0].clone();
    assert_eq!((out_row.direction, in_row.direction), ("outbound", "inbound"));
    assert_eq!(out_row.transport.as_deref(), Some("v2"));
    assert_eq!(in_row.transport.as_deref(), Some("v2"));
    assert!(out_row.session_id.is_some());
    assert_eq!(out_row.session_id, in_row.session_id);
}

#[tokio::test]
async fn a_v1_peer_is_relayed_framed_and_sees_the_bit() {
    let (node, received) = spawn_answering_node().await;
    let proxy = inbound_to(node, &[]).await;
    let mut peer = TcpStream::connect(proxy.inbound[0]).await.unwrap();
    peer.write_all(&version_message(REGTEST, proxy.inbound[0])).await.unwrap();
    let answer = expect_frame(&mut peer).await; // checks the recomputed checksum
    assert_eq!(answer.command, "version");
    assert_eq!(services(&answer.payload), 0x09 | NODE_P2P_V2);
    assert_eq!(expect_frame(&mut peer).await.command, "verack");
    peer.write_all(&frame(REGTEST, "ping", &[3; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut peer).await.payload, vec![3; 8]);
    let row = proxy.observer.status().sessions[0].clone();
    assert_eq!((row.direction, row.transport.as_deref(), row.session_id), ("inbound", Some("v1"), None));

    // Every byte is checked as a v1 message: a bad checksum closes the
    // session and never reaches the node.
    let mut bad = frame(REGTEST, "pong", &[4; 8]);
    bad[20] ^= 0xff;
    peer.write_all(&bad).await.unwrap();
    expect_closed(&mut peer).await;
    let commands: Vec<String> = received.lock().unwrap()[0].iter().map(|f| f.command.clone()).collect();
    assert_eq!(commands, ["version", "ping"]);
    assert_closed_with(
        &proxy,
        "bip324_proxy_inbound_sessions_closed_total{transport=\"v1\",reason=\"bad_peer_message\"} 1",
    )
    .await;
}

/// A v1 peer is held to the handshake deadline until its whole VERSION is
/// in and checks out: the 16-byte v1 prefix alone, or a VERSION cut short,
/// is closed at the deadline, and a VERSION with a bad checksum at once;
/// none of them reaches the node, which is dialed only for a whole VERSION.
#[tokio::test]
async fn a_v1_peer_reaches_the_node_only_with_a_whole_version_before_the_deadline() {
    let (node, received) = spawn_answering_node().await;
    let (mut proxy, inbound) = binary_with_inbound(node, &["--handshake-timeout", "1"]).await;
    let version = version_message(REGTEST, inbound);

    let mut prefix = TcpStream::connect(inbound).await.unwrap();
    prefix.write_all(&version[..16]).await.unwrap();
    expect_closed(&mut prefix).await;
    proxy.wait_for(&["inbound session closed", "handshake timed out after 16 bytes from the peer"]).await;

    let mut cut = TcpStream::connect(inbound).await.unwrap();
    cut.write_all(&version[..version.len() - 1]).await.unwrap();
    expect_closed(&mut cut).await;
    proxy.wait_for(&["inbound session closed", "handshake timed out after"]).await;

    let mut bad = version.clone();
    bad[20] ^= 0xff;
    let mut bad_checksum = TcpStream::connect(inbound).await.unwrap();
    bad_checksum.write_all(&bad).await.unwrap();
    expect_closed(&mut bad_checksum).await;
    proxy.wait_for(&["inbound session closed", "peer's v1 VERSION: bad checksum"]).await;
    assert!(received.lock().unwrap().is_empty(), "the node was dialed for a peer without a whole VERSION");

    let mut whole = TcpStream::connect(inbound).await.unwrap();
    whole.write_all(&version).await.unwrap();
    assert_eq!(expect_frame(&mut whole).await.command, "version");
    assert_eq!(received.lock().unwrap().len(), 1);
}

/// A v2 peer's first message is its VERSION too: until it arrives, a packet
/// whose length announces more than a VERSION may take (4,109 contents
/// bytes: the long message type and 4,096 payload bytes), decoys included,
/// is refused from its length alone; afterwards the general limit applies.
#[tokio::test]
async fn a_v2_peers_first_message_is_held_to_the_version_limit() {
    let (node, _) = spawn_answering_node().await;
    let (mut proxy, inbound) = binary_with_inbound(node, &[]).await;

    let mut large = V2Peer::connect(inbound, InitiatorShape::default()).await;
    let packet = large.packet("version", &vec![0u8; 4_097]);
    large.stream.write_all(&packet[..3]).await.unwrap();
    expect_closed(&mut large.stream).await;
    let line = proxy.wait_for(&["inbound session closed"]).await;
    assert!(
        line.contains("packet of 4110 contents bytes before the first message exceeds the 4109-byte limit"),
        "{line}"
    );

    let mut decoy_first = V2Peer::connect(inbound, InitiatorShape::default()).await;
    let decoy = decoy_first.encrypt.encrypt_to_vec(&vec![0u8; 100_000], PacketType::Decoy, None);
    decoy_first.stream.write_all(&decoy[..3]).await.unwrap();
    expect_closed(&mut decoy_first.stream).await;
    let line = proxy.wait_for(&["inbound session closed"]).await;
    assert!(line.contains("exceeds the 4109-byte limit for a VERSION"), "{line}");

    // A VERSION of the largest size, then a large message: both carried.
    let mut peer = V2Peer::connect(inbound, InitiatorShape::default()).await;
    let mut payload = version_payload(inbound);
    payload.resize(4_096, 0);
    peer.send("version", &payload).await;
    assert_eq!(peer.recv().await.0, "version");
    assert_eq!(peer.recv().await.0, "verack");
    peer.send("ping", &vec![7u8; 100_000]).await;
    assert_eq!(peer.recv().await, ("ping".to_owned(), vec![7u8; 100_000]));
}

#[tokio::test]
async fn a_v1_peer_is_closed_when_v1_is_refused() {
    let node = spawn_v1_node(REGTEST).await;
    let toml = format!(
        "[[inbound]]\nlisten = \"127.0.0.1:0\"\nnode = \"{}\"\nnetwork = \"regtest\"\nv1 = \"refuse\"\n",
        node.addr
    );
    let proxy = spawn_inbound_proxy(&toml, &[]).await;
    let mut peer = TcpStream::connect(proxy.inbound[0]).await.unwrap();
    peer.write_all(&version_message(REGTEST, proxy.inbound[0])).await.unwrap();
    expect_closed(&mut peer).await;
    // A v2 peer on the same listener is served.
    let mut v2 = V2Peer::connect(proxy.inbound[0], InitiatorShape::default()).await;
    v2.send("version", &version_payload(proxy.inbound[0])).await;
    assert_eq!(v2.recv().await.0, "version");
    assert_eq!(node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 1, "only the v2 peer reached the node");
    let metrics = proxy.observer.encode_metrics();
    assert!(
        metrics.contains("bip324_proxy_inbound_sessions_closed_total{transport=\"none\",reason=\"v1_refused\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_inbound_flood_never_takes_outbound_permits() {
    let node = spawn_v1_node(REGTEST).await;
    let v2_node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy =
        inbound_to(node.addr, &["--max-sessions", "1", "--max-inbound", "3", "--max-inbound-per-source", "2"]).await;
    let inbound = proxy.inbound[0];

    // Two silent connections from one address fill its per-source share; a
    // third is closed at accept.
    let _a = TcpStream::connect(inbound).await.unwrap();
    let _b = TcpStream::connect(inbound).await.unwrap();
    let mut c = TcpStream::connect(inbound).await.unwrap();
    expect_closed(&mut c).await;
    // From another loopback address: one more fits max_inbound, then no more.
    let from = |ip: &str| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(inbound)
    };
    let _d = from("127.0.0.2").await.unwrap();
    let mut e = from("127.0.0.2").await.unwrap();
    expect_closed(&mut e).await;
    let metrics = proxy.observer.encode_metrics();
    assert!(metrics.contains("connections_refused_total{reason=\"inbound_source_limit\"} 1"), "{metrics}");
    assert!(metrics.contains("connections_refused_total{reason=\"inbound_limit\"} 1"), "{metrics}");

    // The one outbound permit is untouched.
    let mut client = open_v1_session(proxy.addr, v2_node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

// ---------------------------------------------------------------- faults, against the binary

/// The binary with one inbound listener, its address from the log.
async fn binary_with_inbound(node: SocketAddr, extra: &[&str]) -> (BinaryProxy, SocketAddr) {
    let spec = format!("127.0.0.1:0={node}@regtest");
    let mut args = vec!["--inbound", spec.as_str()];
    args.extend_from_slice(extra);
    let mut proxy = spawn_binary(&args, "info").await;
    let line = proxy.wait_for(&["listening (inbound)"]).await;
    let addr = line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap();
    (proxy, addr.parse().unwrap())
}

/// Reads the responder's key, garbage, terminator and version packet as far
/// as they come, without answering.
async fn drain_for(stream: &mut TcpStream, wait: Duration) {
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(wait, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn faults_close_only_their_own_session_with_one_line_each() {
    let (node, _) = spawn_answering_node().await;
    let v2_node = spawn_v2_node(V2NodeOptions::default()).await;
    let (mut proxy, inbound) = binary_with_inbound(node, &["--handshake-timeout", "2"]).await;

    // A good v2 peer, open throughout.
    let mut good = V2Peer::connect(inbound, InitiatorShape::default()).await;
    good.send("version", &version_payload(inbound)).await;
    assert_eq!(good.recv().await.0, "version");
    assert_eq!(good.recv().await.0, "verack");
    proxy.wait_for(&["inbound session open", "transport=v2"]).await;

    // 1. Junk instead of a key: text, then the peer leaves.
    let mut junk = TcpStream::connect(inbound).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await.unwrap();
    junk.shutdown().await.unwrap();
    expect_closed(&mut junk).await;
    proxy.wait_for(&["inbound session closed", "peer closed the connection during the handshake after 33 bytes"]).await;

    // 2. A real key, then silence: the handshake deadline closes it.
    let handshake = Handshake::<Initialized>::new(REGTEST, Role::Initiator).unwrap();
    let mut key = vec![0u8; 64];
    handshake.send_key(None, &mut key).unwrap();
    let mut silent = TcpStream::connect(inbound).await.unwrap();
    silent.write_all(&key).await.unwrap();
    drain_for(&mut silent, WAIT).await;
    proxy.wait_for(&["inbound session closed", "handshake timed out after 64 bytes"]).await;

    // 3. A key and 4096 bytes of garbage with no terminator (plus the 16
    //    bytes where one would be): closed once the limit is passed.
    let mut garbage = TcpStream::connect(inbound).await.unwrap();
    let mut flight = key.clone();
    flight.extend(random_payload(4096 + 16));
    garbage.write_all(&flight).await.unwrap();
    drain_for(&mut garbage, WAIT).await;
    proxy.wait_for(&["inbound session closed", "no garbage terminator within 4111 bytes"]).await;

    // 4. An oversize packet after a good handshake: refused from its length alone.
    let mut oversize = V2Peer::connect(inbound, InitiatorShape::default()).await;
    let packet = oversize.packet("block", &vec![0u8; 4_000_001]);
    oversize.stream.write_all(&packet[..3]).await.unwrap();
    drain_for(&mut oversize.stream, WAIT).await;
    proxy.wait_for(&["inbound session closed", "peer sent a bad v2 packet", "exceed the 4000013-byte limit"]).await;

    // 5. A decoy of oversize length during the handshake.
    let mut stream = TcpStream::connect(inbound).await.unwrap();
    let handshake = Handshake::<Initialized>::new(REGTEST, Role::Initiator).unwrap();
    let mut key = vec![0u8; 64];
    let handshake = handshake.send_key(None, &mut key).unwrap();
    stream.write_all(&key).await.unwrap();
    let mut theirs = [0u8; 64];
    stream.read_exact(&mut theirs).await.unwrap();
    let handshake = handshake.receive_key(theirs).unwrap();
    let big = vec![0u8; 4_000_014];
    let decoys: [&[u8]; 1] = [&big];
    let mut flight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(Some(&decoys))];
    handshake.send_version(&mut flight, Some(&decoys)).unwrap();
    stream.write_all(&flight[..16 + 3]).await.unwrap();
    drain_for(&mut stream, WAIT).await;
    proxy.wait_for(&["inbound session closed", "handshake packet of 4000014 bytes exceeds"]).await;

    // 6. A v1 VERSION of another network.
    let mut mainnet = TcpStream::connect(inbound).await.unwrap();
    mainnet.write_all(&version_message(MAINNET, inbound)).await.unwrap();
    expect_closed(&mut mainnet).await;
    proxy.wait_for(&["inbound session closed", "network magic f9beb4d9, not regtest"]).await;

    // The good session still works, and so does an outbound session.
    good.send("ping", &[5; 8]).await;
    assert_eq!(good.recv().await, ("ping".to_owned(), vec![5; 8]));
    let mut client = open_v1_session(proxy.addr, v2_node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    proxy.wait_for(&["session open", "transport=v2", "target="]).await;

    // One close line per faulty connection, none for the good one.
    let closes = proxy.seen.iter().filter(|l| l.contains("inbound session closed")).count();
    assert_eq!(closes, 6, "{}", proxy.seen.join("\n"));
}

/// Handshake cost per inbound session and how fast junk is shed, measured
/// on loopback (run with `--ignored --nocapture`; numbers vary by machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_inbound_handshake_cost_and_junk_shedding() {
    let node = spawn_v1_node(REGTEST).await;
    let proxy = inbound_to(node.addr, &["--max-inbound", "4096", "--max-inbound-per-source", "4096"]).await;
    let rounds = 300;
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        let peer = V2Peer::connect(proxy.inbound[0], InitiatorShape::default()).await;
        drop(peer);
    }
    let elapsed = started.elapsed();
    let metrics = proxy.observer.encode_metrics();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .unwrap()
            .parse()
            .unwrap()
    };
    let sum = value("bip324_proxy_inbound_handshake_duration_seconds_sum");
    let count = value("bip324_proxy_inbound_handshake_duration_seconds_count");
    println!(
        "{rounds} sequential handshakes (initiator in the same process): {:.0} us per session end to end; \
         responder-side accept-to-handshake mean {:.0} us",
        elapsed.as_micros() as f64 / rounds as f64,
        sum / count * 1e6
    );

    // Junk: 64 random bytes then close, as fast as 8 clients can.
    let junk_rounds = 2000;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = proxy.inbound[0];
        tasks.push(tokio::spawn(async move {
            for _ in 0..junk_rounds / 8 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&random_payload(64 + 200)).await.unwrap();
                s.shutdown().await.unwrap();
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "{junk_rounds} junk connections (64-byte fake key, 200 bytes of garbage, close) shed in {:?}: {:.0} per second",
        elapsed,
        junk_rounds as f64 / elapsed.as_secs_f64()
    );
}

// ---------------------------------------------------------------- self-announcements (addr, addrv2)

const ADVERTISED: &str = "203.0.113.7:8333";

/// A BIP155 IPv4 entry with 1-byte services 0x09 (NODE_NETWORK |
/// NODE_WITNESS): its CompactSize grows to 3 bytes once bit 11 is set.
fn addrv2_v4(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut out = 1_700_000_000u32.to_le_bytes().to_vec();
    out.extend_from_slice(&[0x09, 1, 4]);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&port.to_be_bytes());
    out
}

/// An `addr` entry for an IPv4 address (IPv4-mapped), services 0x0409.
fn addr_v4(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut out = 1_700_000_000u32.to_le_bytes().to_vec();
    out.extend_from_slice(&0x0409u64.to_le_bytes());
    out.extend_from_slice(&std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets());
    out.extend_from_slice(&port.to_be_bytes());
    out
}

/// A v1-only node that, after the VERSION exchange, announces itself in an
/// `addr` and an `addrv2` (its own address first, then another node's), as
/// Core does with `-externalip`. Records the address each connection came
/// from (the proxy's end of the node connection).
async fn spawn_announcing_node() -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let log = peers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else { return };
            log.lock().unwrap().push(peer);
            tokio::spawn(async move {
                let Ok(version) = read_frame(&mut stream).await else { return };
                if version.command != "version" {
                    return;
                }
                let mut answer = version_message(REGTEST, peer);
                answer.extend(frame(REGTEST, "verack", &[]));
                let addr = [&[2u8][..], &addr_v4([203, 0, 113, 7], 8333), &addr_v4([198, 51, 100, 1], 8333)].concat();
                answer.extend(frame(REGTEST, "addr", &addr));
                let addrv2 =
                    [&[2u8][..], &addrv2_v4([203, 0, 113, 7], 8333), &addrv2_v4([198, 51, 100, 1], 8333)].concat();
                answer.extend(frame(REGTEST, "addrv2", &addrv2));
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
                while read_frame(&mut stream).await.is_ok() {}
            });
        }
    });
    (addr, peers)
}

/// Reads the two entries of an `addr` payload: (ip, port, services).
fn addr_entries(payload: &[u8]) -> Vec<(std::net::Ipv4Addr, u16, u64)> {
    assert_eq!(payload[0], 2);
    assert_eq!(payload.len(), 1 + 2 * 30, "addr keeps its layout");
    payload[1..]
        .chunks(30)
        .map(|e| {
            let services = u64::from_le_bytes(e[4..12].try_into().unwrap());
            let ip = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&e[12..28]).unwrap()).to_ipv4_mapped().unwrap();
            (ip, u16::from_be_bytes([e[28], e[29]]), services)
        })
        .collect()
}

/// Reads the entries of an `addrv2` payload of IPv4 entries with services
/// under 2^16: (ip, port, services).
fn addrv2_entries(payload: &[u8]) -> Vec<(std::net::Ipv4Addr, u16, u64)> {
    let mut out = Vec::new();
    let mut at = 1;
    for _ in 0..payload[0] {
        at += 4;
        let services = match payload[at] {
            0xfd => {
                at += 3;
                u64::from(u16::from_le_bytes([payload[at - 2], payload[at - 1]]))
            }
            small => {
                at += 1;
                u64::from(small)
            }
        };
        assert_eq!(&payload[at..at + 2], &[1, 4], "BIP155 IPv4");
        let ip = std::net::Ipv4Addr::new(payload[at + 2], payload[at + 3], payload[at + 4], payload[at + 5]);
        let port = u16::from_be_bytes([payload[at + 6], payload[at + 7]]);
        at += 8;
        out.push((ip, port, services));
    }
    assert_eq!(at, payload.len(), "no bytes left over");
    out
}

fn announcing_toml(node: SocketAddr, extra: &str) -> String {
    format!(
        "[[inbound]]\nlisten = \"127.0.0.1:0\"\nnode = \"{node}\"\nnetwork = \"regtest\"\nadvertise = \"{ADVERTISED}\"\n{extra}"
    )
}

fn check_announcements(addr: &[u8], addrv2: &[u8]) {
    let (ours, other) = ("203.0.113.7".parse().unwrap(), "198.51.100.1".parse().unwrap());
    assert_eq!(addr_entries(addr), [(ours, 8333, 0x0409 | NODE_P2P_V2), (other, 8333, 0x0409)]);
    assert_eq!(addrv2_entries(addrv2), [(ours, 8333, 0x09 | NODE_P2P_V2), (other, 8333, 0x09)]);
}

#[tokio::test]
async fn self_announcements_get_the_bit_on_the_advertised_address_only() {
    let (node, node_peers) = spawn_announcing_node().await;
    let proxy = spawn_inbound_proxy(&announcing_toml(node, ""), &[]).await;

    // A v2 peer (the bip324 crate's initiator).
    let mut peer = V2Peer::connect(proxy.inbound[0], InitiatorShape::default()).await;
    peer.send("version", &version_payload(proxy.inbound[0])).await;
    let (command, theirs) = peer.recv().await;
    assert_eq!((command.as_str(), services(&theirs)), ("version", 0x09 | NODE_P2P_V2));
    assert_eq!(peer.recv().await.0, "verack");
    let (command, addr) = peer.recv().await;
    assert_eq!(command, "addr");
    let (command, addrv2) = peer.recv().await;
    assert_eq!(command, "addrv2");
    check_announcements(&addr, &addrv2);

    // The node-side address of the session is shown next to the real peer.
    let row = proxy.observer.status().sessions[0].clone();
    assert_eq!(row.node_local, Some(node_peers.lock().unwrap()[0].to_string()));
    assert_eq!(row.client, peer.stream.local_addr().unwrap().to_string());

    // A v1 peer (v1 relay): the rebuilt messages carry valid checksums
    // (`expect_frame` checks them).
    let mut v1 = TcpStream::connect(proxy.inbound[0]).await.unwrap();
    v1.write_all(&version_message(REGTEST, proxy.inbound[0])).await.unwrap();
    let version = expect_frame(&mut v1).await;
    assert_eq!(services(&version.payload), 0x09 | NODE_P2P_V2);
    assert_eq!(expect_frame(&mut v1).await.command, "verack");
    let addr = expect_frame(&mut v1).await;
    let addrv2 = expect_frame(&mut v1).await;
    assert_eq!((addr.command.as_str(), addrv2.command.as_str()), ("addr", "addrv2"));
    check_announcements(&addr.payload, &addrv2.payload);

    let metrics = proxy.observer.encode_metrics();
    for line in [
        r#"bip324_proxy_inbound_addr_rewrites_total{command="addr",outcome="set"} 2"#,
        r#"bip324_proxy_inbound_addr_rewrites_total{command="addrv2",outcome="set"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn without_advertise_self_announcements_pass_unchanged() {
    let (node, _) = spawn_announcing_node().await;
    let proxy = inbound_to(node, &[]).await;
    let mut v1 = TcpStream::connect(proxy.inbound[0]).await.unwrap();
    v1.write_all(&version_message(REGTEST, proxy.inbound[0])).await.unwrap();
    assert_eq!(expect_frame(&mut v1).await.command, "version");
    assert_eq!(expect_frame(&mut v1).await.command, "verack");
    let addr = expect_frame(&mut v1).await;
    assert_eq!(addr_entries(&addr.payload)[0].2, 0x0409, "no advertise, no rewrite");
    assert!(!proxy.observer.encode_metrics().contains("inbound_addr_rewrites_total{"));
}

// ---------------------------------------------------------------- deny lists

#[tokio::test]
async fn denied_peers_are_closed_at_accept_before_a_byte_is_read() {
    let node = spawn_v1_node(REGTEST).await;
    let toml = format!(
        "[[inbound]]\nlisten = \"127.0.0.1:0\"\nnode = \"{}\"\nnetwork = \"regtest\"\n\
         deny = [\"127.0.0.2\", \"127.0.0.4/30\"]\n",
        node.addr
    );
    let proxy = spawn_inbound_proxy(&toml, &[]).await;
    let inbound = proxy.inbound[0];
    let from = |ip: &str| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(inbound)
    };
    for denied in ["127.0.0.2", "127.0.0.5", "127.0.0.7"] {
        let mut peer = from(denied).await.unwrap();
        // A VERSION is written, but nothing is read, answered or relayed.
        let _ = peer.write_all(&version_message(REGTEST, inbound)).await;
        expect_closed(&mut peer).await;
    }
    // Peers outside the list are served, v1 and v2.
    let mut v1 = from("127.0.0.3").await.unwrap();
    v1.write_all(&version_message(REGTEST, inbound)).await.unwrap();
    v1.write_all(&frame(REGTEST, "ping", &[5; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut v1).await.command, "version");
    assert_eq!(expect_frame(&mut v1).await.command, "ping");
    let mut v2 = V2Peer::connect(inbound, InitiatorShape::default()).await;
    v2.send("version", &version_payload(inbound)).await;
    assert_eq!(v2.recv().await.0, "version");

    assert_eq!(node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 2, "denied peers never reach the node");
    let metrics = proxy.observer.encode_metrics();
    assert!(metrics.contains("connections_refused_total{reason=\"inbound_deny\"} 3"), "{metrics}");
    let clients: Vec<String> = proxy.observer.status().sessions.iter().map(|s| s.client.clone()).collect();
    assert!(clients.iter().all(|c| !c.starts_with("127.0.0.2:")), "{clients:?}");
}

// ---------------------------------------------------------------- probe, against the binary

#[tokio::test]
async fn probe_at_an_inbound_listener_reports_v2_and_the_node_side_port() {
    let (node, node_peers) = spawn_announcing_node().await;
    let (mut proxy, inbound) = binary_with_inbound(node, &[]).await;
    let (status, out) = run_binary_stdout(&["probe", &inbound.to_string(), "--network", "regtest"]).await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("speaks v2"), "{out}");
    let line = proxy.wait_for(&["inbound session open", "transport=v2"]).await;
    let field = |name: &str| {
        // The event's own field: the last one (the span repeats some).
        line.rsplit(&format!(" {name}=")).next().and_then(|rest| rest.split_whitespace().next()).map(str::to_owned)
    };
    let session_id = field("session_id").expect("session id on the open line");
    assert!(out.contains(&session_id), "the probe shows the session id the proxy logged: {out}\n{line}");
    // The open line maps the node's view of the peer (getpeerinfo's addr)
    // to the real peer.
    assert_eq!(field("node_local"), Some(node_peers.lock().unwrap()[0].to_string()), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
}

#[tokio::test]
async fn inbound_sessions_are_shaped_like_outbound_ones() {
    let (node, _received) = spawn_answering_node().await;
    let proxy =
        spawn_inbound_proxy("[shaping]\npadding = \"pow2\"\n", &["--inbound", &format!("127.0.0.1:0={node}@regtest")])
            .await;
    let mut peer = V2Peer::connect(proxy.inbound[0], InitiatorShape::default()).await;
    peer.send("version", &version_payload(proxy.inbound[0])).await;
    // The peer skips the decoys: what it reads is exactly the node's messages.
    let (command, theirs) = peer.recv().await;
    assert_eq!(command, "version");
    assert_eq!(services(&theirs) & NODE_P2P_V2, NODE_P2P_V2);
    assert_eq!(peer.recv().await.0, "verack");
    peer.send("ping", &9u64.to_le_bytes()).await;
    assert_eq!(peer.recv().await, ("ping".to_owned(), 9u64.to_le_bytes().to_vec()));
    let metrics = proxy.observer.encode_metrics();
    let padding = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bip324_proxy_shaping_decoy_bytes_total{kind=\"padding\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(padding > 0, "no padding decoys on the inbound leg:\n{metrics}");
}

#[tokio::test]
async fn responder_handshake_decoys_and_garbage_follow_the_shaping_policy() {
    let (node, received) = spawn_answering_node().await;
    let proxy = spawn_inbound_proxy(
        "[shaping]\nhandshake_decoys = 3\nhandshake_decoy_min = 10\nhandshake_decoy_max = 500\n\
         garbage_min = 4000\ngarbage_max = 4095\n",
        &["--inbound", &format!("127.0.0.1:0={node}@regtest")],
    )
    .await;
    let sessions = 4;
    let mut flights = std::collections::BTreeSet::new();
    let mut total = 0;
    for i in 0..sessions {
        // Decoys of the initiator's own as well: both sides' are skipped.
        let shape = InitiatorShape { garbage_len: 17, decoys: vec![vec![3u8; 40]], ..Default::default() };
        let mut peer = V2Peer::connect(proxy.inbound[0], shape).await;
        assert!((4000..=4095).contains(&peer.responder_garbage), "garbage of {} bytes", peer.responder_garbage);
        assert_eq!(peer.responder_decoys.len(), 3, "{:?}", peer.responder_decoys);
        assert!(peer.responder_decoys.iter().all(|&wire| (10 + 20..=500 + 20).contains(&wire)));
        total += peer.responder_decoys.iter().sum::<usize>();
        flights.insert(peer.responder_garbage + peer.responder_decoys.iter().sum::<usize>());

        // The stream is accepted, and the first genuine packet is the node's
        // VERSION: the decoys carried nothing the node sent.
        let ours = version_payload(proxy.inbound[0]);
        peer.send("version", &ours).await;
        let (command, theirs) = peer.recv().await;
        assert_eq!(command, "version");
        assert_eq!(services(&theirs) & NODE_P2P_V2, NODE_P2P_V2);
        assert_eq!(peer.recv().await.0, "verack");
        peer.send("ping", &(i as u64).to_le_bytes()).await;
        assert_eq!(peer.recv().await, ("ping".to_owned(), (i as u64).to_le_bytes().to_vec()));
        let seen = received.lock().unwrap()[i].clone();
        let commands: Vec<&str> = seen.iter().map(|f| f.command.as_str()).collect();
        assert_eq!(commands, ["version", "ping"], "the node got exactly the peer's messages");
        assert_eq!(seen[0].payload, ours);
    }
    // The first flights differ in size (4 draws of garbage and 3 decoys).
    assert!(flights.len() > 1, "{flights:?}");
    let metrics = proxy.observer.encode_metrics();
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bip324_proxy_shaping_decoy_bytes_total{kind=\"handshake\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(counted, Some(total as u64), "{metrics}");
}

#[tokio::test]
async fn inbound_sessions_send_cover_decoys_while_the_node_is_quiet() {
    let (node, _received) = spawn_answering_node().await;
    let proxy = spawn_inbound_proxy(
        "[shaping]\ncover = \"constant\"\ncover_interval_ms = 10\ncover_size_max = 64\n",
        &["--inbound", &format!("127.0.0.1:0={node}@regtest")],
    )
    .await;
    let mut peer = V2Peer::connect(proxy.inbound[0], InitiatorShape::default()).await;
    peer.send("version", &version_payload(proxy.inbound[0])).await;
    assert_eq!(peer.recv().await.0, "version");
    assert_eq!(peer.recv().await.0, "verack");
    // The node says nothing more: the proxy fills the silence with decoys,
    // which the peer skips.
    let observer = proxy.observer.clone();
    let cover = move || {
        observer
            .encode_metrics()
            .lines()
            .find_map(|l| l.strip_prefix("bip324_proxy_shaping_decoy_bytes_total{kind=\"cover\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_until(|| cover() >= 3 * 20).await;
    peer.send("ping", &5u64.to_le_bytes()).await;
    assert_eq!(peer.recv().await, ("ping".to_owned(), 5u64.to_le_bytes().to_vec()));
}
