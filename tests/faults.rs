//! Fault injection on loopback: remotes that fail at every handshake step,
//! clients that fail at every stage, half-closes, a slowloris client and a
//! client that never reads. Each fault must close only its own session with
//! one log line that says why, and leave the proxy serving others.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bip324_proxy::v2::SessionKeys;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a scripted responder misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Reads our key and closes without a byte (what a v1 node does).
    CloseBeforeKey,
    /// Never answers.
    Silent,
    /// Sends 20 bytes of a key, then closes.
    CloseMidKey,
    /// Sends a valid key and some garbage, then closes.
    CloseInsideGarbage,
    /// Sends a valid key and 5,000 bytes of garbage without a terminator.
    GarbageWithoutTerminator,
    /// Sends key, garbage and the terminator, then closes.
    CloseAfterTerminator,
    /// Sends key, garbage, terminator and half a version packet, then closes.
    CloseMidPacket,
    /// Announces a 16 MB version packet.
    HugePacket,
    /// Sends a version packet whose tag does not verify.
    BadTag,
}

struct Scripted {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

async fn spawn_scripted(script: Script) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(run_script(stream, script));
        }
    });
    Scripted { addr, accepts }
}

async fn run_script(mut stream: TcpStream, script: Script) {
    let mut theirs = [0u8; 64];
    if stream.read_exact(&mut theirs).await.is_err() {
        return;
    }
    let secp = secp256k1::Secp256k1::new();
    let secret = secp256k1::SecretKey::new(&mut rand::thread_rng());
    let ours = secp256k1::ellswift::ElligatorSwift::from_seckey(&secp, secret, None).to_array();
    let keys = SessionKeys::derive(&secret, &ours, &theirs, bip324_proxy::v2::Role::Responder, &REGTEST);
    let garbage = random_payload(300);
    let mut flight = ours.to_vec();
    flight.extend_from_slice(&garbage);
    let mut version = bytes::BytesMut::new();
    keys.encoder(0).encode_packet(&[], &[], false, &garbage, &mut version).unwrap();
    let send = match script {
        Script::CloseBeforeKey => return,
        Script::Silent => {
            // Hold the connection open, reading, until the proxy gives up.
            let mut sink = [0u8; 4096];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
            return;
        }
        Script::CloseMidKey => ours[..20].to_vec(),
        Script::CloseInsideGarbage => flight,
        Script::GarbageWithoutTerminator => {
            let mut f = ours.to_vec();
            f.extend(random_payload(5000));
            f
        }
        Script::CloseAfterTerminator => {
            flight.extend_from_slice(keys.send_garbage_terminator());
            flight
        }
        Script::CloseMidPacket => {
            flight.extend_from_slice(keys.send_garbage_terminator());
            flight.extend_from_slice(&version[..10]);
            flight
        }
        Script::HugePacket => {
            flight.extend_from_slice(keys.send_garbage_terminator());
            let mut huge = bytes::BytesMut::new();
            keys.encoder(0).encode_packet(&[], &vec![0u8; 16_000_000], false, &garbage, &mut huge).unwrap();
            flight.extend_from_slice(&huge[..100]);
            flight
        }
        Script::BadTag => {
            flight.extend_from_slice(keys.send_garbage_terminator());
            let mut packet = version.to_vec();
            let last = packet.len() - 1;
            packet[last] ^= 0x01;
            flight.extend_from_slice(&packet);
            flight
        }
    };
    let _ = stream.write_all(&send).await;
    if matches!(script, Script::GarbageWithoutTerminator | Script::HugePacket | Script::BadTag) {
        // Keep the connection: the proxy must give up on its own.
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    }
}

/// A healthy session on the same proxy, to show it still serves.
async fn still_serving(proxy: SocketAddr, node: SocketAddr) {
    let mut client = open_v1_session(proxy, node, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

#[tokio::test]
async fn remote_failures_at_every_handshake_step_close_one_session_with_the_reason() {
    let good = spawn_v2_node(V2NodeOptions::default()).await;
    let mut proxy = spawn_binary(&["--handshake-timeout", "2"], "info").await;
    let cases = [
        (Script::CloseBeforeKey, "remote does not speak v2: it"),
        (Script::Silent, "remote does not speak v2: it timed out without sending a byte"),
        (Script::CloseMidKey, "the connection during the handshake after 20 bytes"),
        (Script::CloseInsideGarbage, "the connection during the handshake after 364 bytes"),
        (Script::GarbageWithoutTerminator, "no garbage terminator within 4111 bytes"),
        (Script::CloseAfterTerminator, "the connection during the handshake after 380 bytes"),
        (Script::CloseMidPacket, "the connection during the handshake after 390 bytes"),
        (Script::HugePacket, "handshake packet of 16000000 bytes exceeds the 4000013-byte limit"),
        (Script::BadTag, "handshake:"),
    ];
    for (script, reason) in cases {
        let remote = spawn_scripted(script).await;
        let mut client = open_v1_session(proxy.addr, remote.addr, REGTEST).await;
        expect_closed(&mut client).await;
        let line = proxy.wait_for(&["session closed", &format!("target={}", remote.addr)]).await;
        assert!(line.contains("stage=upgrade"), "{script:?}: {line}");
        assert!(line.contains(reason), "{script:?}: expected `{reason}` in\n{line}");
        assert_eq!(remote.accepts.load(Ordering::SeqCst), 1, "{script:?}: no second dial under fallback none");
        still_serving(proxy.addr, good.addr).await;
    }
}

#[tokio::test]
async fn only_silence_after_our_key_allows_the_v1_fallback() {
    let proxy = spawn_proxy(&["--fallback", "v1", "--handshake-timeout", "2"]).await;
    for (script, fallback) in [
        (Script::CloseBeforeKey, true),
        (Script::CloseMidKey, false),
        (Script::CloseInsideGarbage, false),
        (Script::BadTag, false),
    ] {
        let remote = spawn_scripted(script).await;
        let mut client = open_v1_session(proxy.addr, remote.addr, REGTEST).await;
        expect_closed(&mut client).await;
        // A fallback dials the remote a second time (which then fails again).
        let dials = if fallback { 2 } else { 1 };
        assert_eq!(remote.accepts.load(Ordering::SeqCst), dials, "{script:?}");
    }
}

#[tokio::test]
async fn client_failures_at_every_stage_close_one_session_with_the_reason() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut proxy = spawn_binary(&[], "info").await;

    // Mid-greeting.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0x05, 0x02, 0x00]).await.unwrap();
    drop(s);
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("stage=accept") && line.contains("client closed"), "{line}");

    // Mid-request.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    s.write_all(&[0x05, 0x01, 0x00, 0x01, 127]).await.unwrap();
    drop(s);
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("stage=accept") && line.contains("client closed"), "{line}");

    // After the reply, before the first message.
    let s = socks_btcd(proxy.addr, node.addr).await.unwrap();
    drop(s);
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("stage=sniff") && line.contains("before its first message"), "{line}");

    // Mid-message, once the session is open.
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let ping = frame(REGTEST, "ping", &[9; 8]);
    client.write_all(&ping[..30]).await.unwrap();
    drop(client);
    let line = proxy.wait_for(&["session closed", "transport=v2"]).await;
    assert!(line.contains("client closed in the middle of a message"), "{line}");

    still_serving(proxy.addr, node.addr).await;
}

#[tokio::test]
async fn client_half_close_is_propagated_and_replies_still_arrive() {
    // The reply is in flight when the client half-closes: it arrives within
    // the drain, then the node sees the end and closes.
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    client.write_all(&frame(REGTEST, "ping", &[6; 8])).await.unwrap();
    client.shutdown().await.unwrap();
    // The echo still comes back, then the node sees our end and closes.
    assert_eq!(expect_frame(&mut client).await.payload, vec![6; 8]);
    expect_closed(&mut client).await;
}

/// Bitcoin P2P has no half-close: once the remote stops writing, the client
/// sees the end at once and its own direction still reaches the remote for
/// the drain (`relay::END_DRAIN`, 5 s), after which the session ends even
/// though neither the client nor the node closed its end.
#[tokio::test]
async fn remote_half_close_is_propagated_and_the_session_ends_after_the_drain() {
    let node = spawn_v2_node(V2NodeOptions { close_write_after: Some(2), ..Default::default() }).await;
    let mut proxy = spawn_binary(&[], "info").await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    client.write_all(&frame(REGTEST, "ping", &[1; 8])).await.unwrap();
    expect_frame(&mut client).await;
    // The node stops writing after two echoes: the client sees the end...
    expect_closed(&mut client).await;
    // ...while its own direction still reaches the node, within the drain.
    client.write_all(&frame(REGTEST, "pong", &[2; 8])).await.unwrap();
    let mut arrived = false;
    for _ in 0..100 {
        if node.log.received.lock().unwrap()[0].len() == 3 {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(arrived, "the message sent after the remote's half-close never arrived");
    // Then the session ends, with the client's end still open.
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("reason=remote closed and the other side did not close within 5s"), "{line}");
}

/// The same on the internet-facing side: a node that closes after the
/// peer's VERSION, and a peer that keeps its end open and silent, give the
/// inbound slot back after the drain; with `max_inbound = 1` the next peer is
/// served. (Such a peer used to hold the slot forever.)
#[tokio::test]
async fn a_silent_peer_does_not_keep_an_inbound_slot_after_the_node_closed() {
    let node = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = node.accept().await {
            // Reads the VERSION, then closes the connection.
            let _ = read_frame(&mut stream).await;
        }
    });
    let spec = format!("127.0.0.1:0={node_addr}@regtest");
    let mut proxy = spawn_binary(&["--inbound", &spec, "--max-inbound", "1"], "info").await;
    let line = proxy.wait_for(&["listening (inbound)"]).await;
    let inbound: SocketAddr =
        line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().parse().unwrap();
    let mut silent = TcpStream::connect(inbound).await.unwrap();
    silent.write_all(&version_message(REGTEST, inbound)).await.unwrap();
    expect_closed(&mut silent).await;
    let line = proxy.wait_for(&["inbound session closed"]).await;
    assert!(line.contains("reason=node closed and the peer did not close within 5s"), "{line}");
    // The slot is free again: the next peer is dialed through.
    let mut next = TcpStream::connect(inbound).await.unwrap();
    next.write_all(&version_message(REGTEST, inbound)).await.unwrap();
    proxy.wait_for(&["inbound session open"]).await;
    drop(silent);
}

/// A side that stops reading cannot hold a session: when a write to it makes
/// no progress for `timeouts.write_stall` the session closes (here a client
/// that never reads while the remote floods it).
#[tokio::test]
async fn a_side_that_stops_reading_is_closed_after_the_write_stall_timeout() {
    let node = spawn_v2_node(V2NodeOptions { flood: Some((50, 3_900_000)), ..Default::default() }).await;
    let path = std::env::temp_dir().join(format!("bip324-proxy-stall-{}.toml", std::process::id()));
    std::fs::write(&path, "[timeouts]\nwrite_stall = 1\n").unwrap();
    let mut proxy = spawn_binary(&["--config", path.to_str().unwrap()], "info").await;
    let _ = std::fs::remove_file(&path);
    let _client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("reason=client read nothing for 1s (write stalled)"), "{line}");
    assert!(node.log.flooded.load(Ordering::SeqCst) < 50, "the flood stalled before the close");
}

#[tokio::test]
async fn slowloris_client_times_out() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy_with_file("[timeouts]\nsocks = 1\n", &[]).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let greeting = [0x05u8, 0x01, 0x00];
    let mut closed = false;
    for byte in greeting.iter().chain([0x05u8, 0x01, 0x00, 0x01, 127, 0, 0, 1].iter()) {
        if s.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    if !closed {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect("proxy closes the slow client");
    }
    still_serving(proxy.addr, node.addr).await;
}

/// Resident set size of a process, in bytes.
fn rss_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
}

#[tokio::test]
async fn client_that_never_reads_holds_memory_bounded() {
    // 50 messages of 3.9 MB: 195 MB the client never reads.
    let node = spawn_v2_node(V2NodeOptions { flood: Some((50, 3_900_000)), ..Default::default() }).await;
    let proxy = spawn_binary(&[], "info").await;
    let pid = proxy.child.id().unwrap();
    let before = rss_of(pid);
    let client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    // Wait until the flood stalls: the node's writes block once the proxy
    // stops reading (backpressure), well before all 50 are written.
    let mut last = usize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = node.log.flooded.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let sent = node.log.flooded.load(Ordering::SeqCst);
    let grown = rss_of(pid).saturating_sub(before);
    eprintln!("flood stalled after {sent} messages; proxy RSS grew by {} KiB", grown / 1024);
    assert!(sent < 50, "backpressure must stop the flood; all {sent} messages were accepted");
    // The documented ceiling: about two maximum-size messages per session
    // (4 MB received, 4 MB translated), with allocator slack.
    assert!(grown < 16 * 1024 * 1024, "proxy RSS grew by {} KiB", grown / 1024);
    drop(client);
}

/// The proxy's library entry point with an 8 MiB large-message budget and
/// `write_stall` seconds, a v2 node, the proxy's observer and its shutdown.
async fn proxy_with_budget(
    write_stall: u64,
) -> (std::net::SocketAddr, Node, Arc<bip324_proxy::metrics::Observer>, tokio_util::sync::CancellationToken) {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let toml = format!("large_message_budget = 8388608\n[timeouts]\nwrite_stall = {write_stall}\n");
    let (proxy, observer) = spawn_proxy_from_toml(&toml).await;
    (proxy.addr, node, observer, proxy.shutdown)
}

#[tokio::test]
async fn senders_that_trickle_a_large_message_hold_only_what_they_sent() {
    // Eight sessions announce 4 MB blocks and send 1,000 bytes of them: with
    // the budget charged for the size announced they would hold 32 MB of an
    // 8 MiB budget; charged for what arrived, about 2 MiB.
    let (addr, node, observer, shutdown) = proxy_with_budget(2).await;
    let block = frame(REGTEST, "block", &random_payload(4_000_000));
    let mut tricklers = Vec::new();
    for _ in 0..8 {
        let mut client = open_v1_session(addr, node.addr, REGTEST).await;
        expect_frame(&mut client).await;
        client.write_all(&block[..1_000]).await.unwrap();
        tricklers.push(client);
    }
    // Wait until the proxy has read every trickler's first bytes.
    for _ in 0..1000 {
        let started = observer.status().sessions.iter().filter(|row| row.bytes_client_to_remote > 900).count();
        if started == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An honest session still gets its whole block through.
    let mut honest = open_v1_session(addr, node.addr, REGTEST).await;
    expect_frame(&mut honest).await;
    honest.write_all(&block).await.unwrap();
    let echo = expect_frame(&mut honest).await;
    assert_eq!((echo.command.as_str(), echo.payload.len()), ("block", 4_000_000));
    let metrics = observer.encode_metrics();
    assert!(!metrics.contains("reason=\"memory_budget\""), "{metrics}");
    // And the tricklers' blocks complete too.
    for client in &mut tricklers {
        client.write_all(&block[1_000..]).await.unwrap();
        let echo = expect_frame(client).await;
        assert_eq!(echo.payload.len(), 4_000_000);
    }
    shutdown.cancel();
}

/// Messages of 64 KiB or more are charged to one proxy-wide budget before
/// their bytes are buffered, 256 KiB ahead of what has arrived
/// (`large_message_budget`, here its minimum, 8 MiB: two 4 MB blocks). A
/// third session with a large message in flight waits, and is closed after
/// `timeouts.write_stall`; the two that fit are carried whole, and the budget
/// they give back carries the echoes.
#[tokio::test]
async fn large_messages_share_one_proxy_wide_budget() {
    let (addr, node, observer, shutdown) = proxy_with_budget(1).await;

    let block = frame(REGTEST, "block", &random_payload(4_000_000));
    // Each holder sends most of its block: the budget is charged for what
    // arrives, so two of them hold nearly all 8 MiB.
    let (head, rest) = block.split_at(3_900_000);
    let reading = |observer: &bip324_proxy::metrics::Observer| {
        observer.status().sessions.iter().filter(|row| row.bytes_client_to_remote > 3_900_000 - 24).count()
    };
    let mut holders = Vec::new();
    for expected in 1..=2 {
        let mut client = open_v1_session(addr, node.addr, REGTEST).await;
        expect_frame(&mut client).await;
        client.write_all(head).await.unwrap();
        for _ in 0..1000 {
            if reading(&observer) == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reading(&observer), expected);
        holders.push(client);
    }
    let mut third = open_v1_session(addr, node.addr, REGTEST).await;
    expect_frame(&mut third).await;
    third.write_all(&block[..500_000]).await.unwrap();
    expect_closed(&mut third).await;
    let metrics = observer.encode_metrics();
    assert!(metrics.contains("reason=\"memory_budget\"} 1"), "{metrics}");

    for client in &mut holders {
        client.write_all(rest).await.unwrap();
        let echo = expect_frame(client).await;
        assert_eq!((echo.command.as_str(), echo.payload.len()), ("block", 4_000_000));
    }
    shutdown.cancel();
}
