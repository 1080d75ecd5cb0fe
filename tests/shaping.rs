//! Traffic shaping against a real BIP324 responder (the `bip324` crate's, in
//! tests/common): every shaped stream is accepted, decoys never carry
//! application data, padded writes land on bucket boundaries, budgets are
//! never exceeded, and all of it holds across rekeys.

mod common;

use std::sync::Arc;

use bip324_proxy::metrics::Observer;
use bip324_proxy::shaping::{Buckets, MIN_DECOY_WIRE_BYTES, boundary};
use bip324_proxy::translate::{MAX_MESSAGE_TYPE_LEN, encode_message_type};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The proxy's library entry point with this configuration file, and the
/// observer its metrics come from.
async fn shaped_proxy(toml: &str) -> (Proxy, Arc<Observer>) {
    spawn_proxy_from_toml(toml).await
}

/// v2 contents of a v1 message, as the proxy must deliver them.
fn contents(command: &str, payload: &[u8]) -> Vec<u8> {
    let mut padded = [0u8; 12];
    padded[..command.len()].copy_from_slice(command.as_bytes());
    let mut message_type = [0u8; MAX_MESSAGE_TYPE_LEN];
    let len = encode_message_type(&padded, &mut message_type);
    let mut contents = message_type[..len].to_vec();
    contents.extend_from_slice(payload);
    contents
}

/// Messages of the sizes a P2P session carries: pings, inv, tx, headers,
/// a block small enough to be batched and ones written in place.
fn messages() -> Vec<(&'static str, Vec<u8>)> {
    let mut all = vec![("verack", Vec::new())];
    for (command, len) in [
        ("ping", 8),
        ("inv", 37),
        ("tx", 250),
        ("inv", 73),
        ("tx", 1_000),
        ("headers", 8_001),
        ("block", 40_000),
        ("block", 65_536),
        ("block", 70_000),
        ("block", 300_017),
        ("pong", 8),
    ] {
        all.push((command, random_payload(len)));
    }
    all
}

/// Opens a session and sends each message in lockstep (one write each),
/// checking every echo; returns the contents the node must have received.
async fn exchange(proxy: &Proxy, node: &Node, messages: &[(&str, Vec<u8>)]) -> (TcpStream, Vec<Vec<u8>>) {
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    let mut sent = Vec::new();
    for (command, payload) in messages {
        client.write_all(&frame(REGTEST, command, payload)).await.unwrap();
        let echo = expect_frame(&mut client).await;
        assert_eq!((echo.command.as_str(), echo.payload.len()), (*command, payload.len()));
        assert!(echo.payload == *payload, "{command} echoed intact");
        sent.push(contents(command, payload));
    }
    (client, sent)
}

/// The node's packets after the client's VERSION (and its decoy, both in
/// the handshake flight) as writes: each genuine packet with the decoy after it.
fn writes(packets: &[(bool, usize)]) -> Vec<(usize, usize)> {
    let mut writes = Vec::new();
    let flight = if packets.get(1).is_some_and(|p| p.0) { 2 } else { 1 };
    let mut iter = packets.iter().skip(flight).peekable();
    while let Some(&(decoy, genuine)) = iter.next() {
        assert!(!decoy, "a decoy without a genuine packet before it: {packets:?}");
        let padding = match iter.peek() {
            Some(&&(true, wire)) => {
                iter.next();
                wire
            }
            _ => 0,
        };
        writes.push((genuine, padding));
    }
    writes
}

fn metric(observer: &Observer, line_start: &str) -> u64 {
    let text = observer.encode_metrics();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn padded_writes_reach_a_real_responder_on_bucket_boundaries() {
    for (policy, buckets) in [("pow2", Buckets::Pow2), ("padme", Buckets::Padme)] {
        let node = spawn_v2_node(V2NodeOptions::default()).await;
        let (proxy, observer) = shaped_proxy(&format!("[shaping]\npadding = \"{policy}\"\n")).await;
        let messages = messages();
        let (client, sent) = exchange(&proxy, &node, &messages).await;
        drop(client);

        // Decoys never carry application data: the node got exactly what
        // the client sent (after its VERSION), nothing more.
        let received = node.log.received.lock().unwrap()[0].clone();
        assert_eq!(received[1..], sent[..], "{policy}");

        let packets = node.log.packets.lock().unwrap()[0].clone();
        let writes = writes(&packets);
        assert_eq!(writes.len(), messages.len(), "{policy}: one write per message");
        let mut decoy_bytes = 0;
        for &(genuine, padding) in &writes {
            let total = genuine + padding;
            assert_eq!(boundary(buckets, 65536, total), total, "{policy}: {genuine} + {padding} is off a boundary");
            assert!(padding == 0 || padding >= MIN_DECOY_WIRE_BYTES, "{policy}: decoy of {padding} bytes");
            if padding == 0 {
                assert_eq!(boundary(buckets, 65536, genuine), genuine, "{policy}: {genuine} left unpadded");
            }
            decoy_bytes += padding;
        }
        assert!(decoy_bytes > 0, "{policy}");
        // The counter holds exactly the decoy bytes the node skipped.
        // The handshake flight (terminator, version packet, the client's
        // VERSION and its decoy) is padded too.
        let (version, flight_decoy) = (packets[0], packets[1]);
        assert!(!version.0 && flight_decoy.0, "{policy}: {packets:?}");
        let flight = 16 + MIN_DECOY_WIRE_BYTES + version.1 + flight_decoy.1;
        assert_eq!(boundary(buckets, 65536, flight), flight, "{policy}: first flight of {flight} bytes");
        let counted = metric(&observer, "bip324_proxy_shaping_decoy_bytes_total{kind=\"padding\"}");
        assert_eq!(counted, (decoy_bytes + flight_decoy.1) as u64, "{policy}");
        proxy.shutdown.cancel();
    }
}

#[tokio::test]
async fn small_messages_stop_producing_distinctive_sizes() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, _) = shaped_proxy("[shaping]\npadding = \"pow2\"\n").await;
    // inv with 1..=5 entries, ping, pong, tx of various small sizes: 10
    // distinct genuine sizes.
    let mut messages = vec![("ping", vec![1u8; 8]), ("pong", vec![2u8; 8])];
    for entries in 1..=5 {
        messages.push(("inv", random_payload(1 + 36 * entries)));
    }
    for len in [150, 170, 190, 200] {
        messages.push(("tx", random_payload(len)));
    }
    let (client, _) = exchange(&proxy, &node, &messages).await;
    drop(client);
    let packets = node.log.packets.lock().unwrap()[0].clone();
    let writes = writes(&packets);
    let genuine: std::collections::BTreeSet<usize> = writes.iter().map(|w| w.0).collect();
    let on_wire: std::collections::BTreeSet<usize> = writes.iter().map(|w| w.0 + w.1).collect();
    assert_eq!(genuine.len(), 10, "{genuine:?}");
    assert_eq!(on_wire, [64, 128, 256].into_iter().collect(), "{writes:?}");
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn padding_stays_correct_across_rekeys() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, _) = shaped_proxy("[shaping]\npadding = \"padme\"\n").await;
    // 300 messages plus their decoys: over 2.5 rekey intervals of 224 packets.
    let messages: Vec<(&str, Vec<u8>)> = (0..300).map(|i| ("tx", random_payload(60 + i * 7))).collect();
    let (client, sent) = exchange(&proxy, &node, &messages).await;
    drop(client);
    let received = node.log.received.lock().unwrap()[0].clone();
    assert_eq!(received[1..], sent[..]);
    let packets = node.log.packets.lock().unwrap()[0].clone();
    assert!(packets.len() > 2 * 224, "{} packets", packets.len());
    for (genuine, padding) in writes(&packets) {
        assert_eq!(boundary(Buckets::Padme, 65536, genuine + padding), genuine + padding);
    }
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn padding_budget_is_never_exceeded() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let budget = 4096;
    let (proxy, observer) = shaped_proxy(&format!("[shaping]\npadding = \"pow2\"\npadding_budget = {budget}\n")).await;
    let messages = messages();
    let (client, sent) = exchange(&proxy, &node, &messages).await;
    drop(client);
    let received = node.log.received.lock().unwrap()[0].clone();
    assert_eq!(received[1..], sent[..]);
    let packets = node.log.packets.lock().unwrap()[0].clone();
    let spent: usize = writes(&packets).iter().map(|w| w.1).sum::<usize>() + packets[1].1;
    assert!(spent > 0 && spent <= budget, "spent {spent} of {budget}");
    // The 300 kB block alone needs more than is left: it went out unpadded,
    // and the session's exhaustion was counted once.
    assert!(writes(&packets).iter().any(|&(genuine, padding)| genuine > 300_000 && padding == 0));
    assert_eq!(metric(&observer, "bip324_proxy_shaping_budget_exhausted_total"), 1);
    assert_eq!(metric(&observer, "bip324_proxy_shaping_decoy_bytes_total{kind=\"padding\"}"), spent as u64);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn handshake_decoys_precede_our_version_and_are_accepted() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, observer) = shaped_proxy(
        "[shaping]\nhandshake_decoys = 3\nhandshake_decoy_min = 10\nhandshake_decoy_max = 500\n\
         garbage_min = 4000\ngarbage_max = 4095\n",
    )
    .await;
    let sessions = 4;
    for _ in 0..sessions {
        let messages = vec![("verack", Vec::new()), ("ping", vec![7u8; 8])];
        let (client, _) = exchange(&proxy, &node, &messages).await;
        drop(client);
    }
    let decoys = node.log.handshake_decoys.lock().unwrap().clone();
    assert_eq!(decoys.len(), sessions);
    let mut total = 0;
    for per_session in &decoys {
        assert_eq!(per_session.len(), 3, "{decoys:?}");
        assert!(
            per_session.iter().all(|&wire| (10 + MIN_DECOY_WIRE_BYTES..=500 + MIN_DECOY_WIRE_BYTES).contains(&wire))
        );
        total += per_session.iter().sum::<usize>();
    }
    // The first flights differ in size (4 x 3 draws from 491 sizes).
    assert!(decoys.iter().map(|d| d.iter().sum::<usize>()).collect::<std::collections::BTreeSet<_>>().len() > 1);
    // Every genuine message arrived, the VERSION in the first flight included.
    for received in node.log.received.lock().unwrap().iter() {
        assert_eq!(received.len(), 3);
        assert_eq!(received[0][..13], contents("version", &[])[..13]);
    }
    assert_eq!(metric(&observer, "bip324_proxy_shaping_decoy_bytes_total{kind=\"handshake\"}"), total as u64);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn shaping_off_sends_no_decoys_and_records_nothing() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, observer) = shaped_proxy("").await;
    let (client, _) = exchange(&proxy, &node, &messages()).await;
    drop(client);
    assert!(node.log.packets.lock().unwrap()[0].iter().all(|&(decoy, _)| !decoy));
    assert!(node.log.handshake_decoys.lock().unwrap()[0].is_empty());
    assert_eq!(metric(&observer, "bip324_proxy_shaping_decoy_bytes_total"), 0);
    let text = observer.encode_metrics();
    assert!(!text.contains("kind=\"handshake\""), "{text}");
    assert!(text.contains("bip324_proxy_v2_write_bytes_count 0"), "{text}");
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn measure_records_write_sizes_without_padding() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, observer) = shaped_proxy("[shaping]\nmeasure = true\n").await;
    let messages = messages();
    let (client, _) = exchange(&proxy, &node, &messages).await;
    drop(client);
    assert!(node.log.packets.lock().unwrap()[0].iter().all(|&(decoy, _)| !decoy));
    let writes = metric(&observer, "bip324_proxy_v2_write_bytes_count");
    assert_eq!(writes, messages.len() as u64);
    // A gap between each two consecutive writes.
    assert_eq!(metric(&observer, "bip324_proxy_v2_write_gap_seconds_count"), writes - 1);
    let sum = metric(&observer, "bip324_proxy_v2_write_bytes_sum");
    let on_wire: usize = node.log.packets.lock().unwrap()[0].iter().skip(1).map(|p| p.1).sum();
    assert!(!node.log.packets.lock().unwrap()[0][1].0, "no decoy after the VERSION either");
    assert_eq!(sum, on_wire as u64);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn batches_and_in_place_writes_are_padded_in_wire_order() {
    // Many messages in one client write: the proxy batches the small ones
    // and writes the large ones in place, each write with its own decoy. A
    // decoy encrypted out of order would fail the node's authentication.
    for policy in ["pow2", "padme"] {
        let node = spawn_v2_node(V2NodeOptions::default()).await;
        let (proxy, _) = shaped_proxy(&format!("[shaping]\npadding = \"{policy}\"\n")).await;
        let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
        assert_eq!(expect_frame(&mut client).await.command, "version");
        let mut burst = Vec::new();
        let mut sent = Vec::new();
        for round in 0..3 {
            for (command, len) in
                [("inv", 37), ("tx", 300), ("block", 100_000 + round), ("inv", 73), ("block", 70_000), ("ping", 8)]
            {
                let payload = random_payload(len);
                burst.extend(frame(REGTEST, command, &payload));
                sent.push(contents(command, &payload));
            }
        }
        client.write_all(&burst).await.unwrap();
        for expected in &sent {
            let echo = expect_frame(&mut client).await;
            assert!(expected.ends_with(&echo.payload), "{policy}: {} echoed intact", echo.command);
        }
        drop(client);
        let received = node.log.received.lock().unwrap()[0].clone();
        assert_eq!(received[1..], sent[..], "{policy}");
        let packets = node.log.packets.lock().unwrap()[0].clone();
        let decoys = packets.iter().filter(|p| p.0).count();
        assert!(decoys > 0 && decoys <= sent.len(), "{policy}: {decoys} decoys for {} messages", sent.len());
        assert!(!packets.windows(2).any(|w| w[0].0 && w[1].0), "{policy}: two decoys in a row");
        proxy.shutdown.cancel();
    }
}

#[tokio::test]
async fn handshake_decoys_and_a_padded_version_make_one_flight_on_a_boundary() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, _) = shaped_proxy(
        "[shaping]\npadding = \"pow2\"\nhandshake_decoys = 2\nhandshake_decoy_min = 1\nhandshake_decoy_max = 300\n",
    )
    .await;
    for _ in 0..3 {
        let (client, _) = exchange(&proxy, &node, &[("verack", Vec::new())]).await;
        drop(client);
    }
    let decoys = node.log.handshake_decoys.lock().unwrap().clone();
    for (conn, packets) in node.log.packets.lock().unwrap().iter().enumerate() {
        assert_eq!(decoys[conn].len(), 2);
        assert!(packets[1].0, "a decoy after the VERSION: {packets:?}");
        let flight = 16 + decoys[conn].iter().sum::<usize>() + MIN_DECOY_WIRE_BYTES + packets[0].1 + packets[1].1;
        assert_eq!(boundary(Buckets::Pow2, 65536, flight), flight, "first flight of {flight} bytes");
    }
    proxy.shutdown.cancel();
}

/// Wire sizes of the decoys the node skipped on connection `conn`.
fn node_decoys(node: &Node, conn: usize) -> Vec<usize> {
    let packets = node.log.packets.lock().unwrap();
    packets.get(conn).map(|p| p.iter().filter(|p| p.0).map(|p| p.1).collect()).unwrap_or_default()
}

/// Waits (bounded) until `done` holds; false if it never did.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..300 {
        if done() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    done()
}

/// Sends one message on an open session and checks its echo.
async fn echo(client: &mut TcpStream, command: &str, payload: &[u8]) {
    client.write_all(&frame(REGTEST, command, payload)).await.unwrap();
    let echo = expect_frame(client).await;
    assert_eq!(echo.command, command);
    assert!(echo.payload == payload, "{command} echoed intact");
}

#[tokio::test]
async fn cover_decoys_flow_while_idle_and_genuine_messages_stay_exact() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, observer) = shaped_proxy(
        "[shaping]\ncover = \"constant\"\ncover_interval_ms = 100\ncover_size_min = 0\ncover_size_max = 64\n",
    )
    .await;
    let messages = messages();
    let (mut client, mut sent) = exchange(&proxy, &node, &messages).await;
    // Idle for a second: about ten decoys are due.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    for (command, payload) in &messages {
        echo(&mut client, command, payload).await;
        sent.push(contents(command, payload));
    }
    drop(client);
    let received = node.log.received.lock().unwrap()[0].clone();
    assert_eq!(received[1..], sent[..], "decoys carry no application data");
    let decoys = node_decoys(&node, 0);
    assert!(decoys.len() >= 4, "{} decoys in 1.2 s idle", decoys.len());
    assert!(decoys.iter().all(|wire| (MIN_DECOY_WIRE_BYTES..=64 + MIN_DECOY_WIRE_BYTES).contains(wire)));
    // The counter holds exactly what the node skipped (once it read it all).
    let counted = || metric(&observer, "bip324_proxy_shaping_decoy_bytes_total{kind=\"cover\"}");
    assert!(eventually(|| node_decoys(&node, 0).iter().sum::<usize>() as u64 == counted()).await);
    assert!(counted() > 0);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn cover_session_budget_caps_decoy_bytes() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let wire = 30 + MIN_DECOY_WIRE_BYTES;
    let budget = 4 * wire + wire / 2;
    let (proxy, observer) = shaped_proxy(&format!(
        "[shaping]\ncover = \"poisson\"\ncover_interval_ms = 10\ncover_size_min = 30\ncover_size_max = 30\n\
         cover_budget_per_hour = {budget}\n"
    ))
    .await;
    let (mut client, _) = exchange(&proxy, &node, &[("verack", Vec::new())]).await;
    // About a hundred decoys are due in a second; the budget has room for four.
    let exhausted = || metric(&observer, "bip324_proxy_shaping_cover_budget_exhausted_total{scope=\"session\"}");
    assert!(eventually(|| exhausted() == 1).await);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    echo(&mut client, "ping", &[9u8; 8]).await;
    assert_eq!(node_decoys(&node, 0), vec![wire; 4]);
    assert_eq!(exhausted(), 1, "counted once per session");
    assert_eq!(metric(&observer, "bip324_proxy_shaping_decoy_bytes_total{kind=\"cover\"}"), 4 * wire as u64);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn cover_global_budget_caps_decoys_across_sessions() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let wire = 30 + MIN_DECOY_WIRE_BYTES;
    let global = 6 * wire;
    let (proxy, observer) = shaped_proxy(&format!(
        "[shaping]\ncover = \"constant\"\ncover_interval_ms = 20\ncover_size_min = 30\ncover_size_max = 30\n\
         cover_budget_per_hour = 1000000\ncover_global_budget_per_hour = {global}\n"
    ))
    .await;
    let (mut first, _) = exchange(&proxy, &node, &[("verack", Vec::new())]).await;
    let (mut second, _) = exchange(&proxy, &node, &[("verack", Vec::new())]).await;
    let exhausted = || metric(&observer, "bip324_proxy_shaping_cover_budget_exhausted_total{scope=\"global\"}");
    assert!(eventually(|| exhausted() >= 1).await);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    echo(&mut first, "ping", &[1u8; 8]).await;
    echo(&mut second, "ping", &[2u8; 8]).await;
    let spent: usize = node_decoys(&node, 0).iter().sum::<usize>() + node_decoys(&node, 1).iter().sum::<usize>();
    assert_eq!(spent, global, "the proxy-wide budget, exactly");
    assert!(node_decoys(&node, 1).len() + node_decoys(&node, 0).len() == 6);
    assert_eq!(metric(&observer, "bip324_proxy_shaping_cover_budget_exhausted_total{scope=\"session\"}"), 0);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn cover_stays_correct_across_rekeys() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, _) =
        shaped_proxy("[shaping]\ncover = \"constant\"\ncover_interval_ms = 10\ncover_size_max = 16\n").await;
    let (mut client, mut sent) = exchange(&proxy, &node, &[("verack", Vec::new())]).await;
    // Decoys count as packets: past 224 of them the proxy has rekeyed.
    assert!(eventually(|| node_decoys(&node, 0).len() >= 250).await, "{} decoys", node_decoys(&node, 0).len());
    for (command, payload) in messages() {
        echo(&mut client, command, &payload).await;
        sent.push(contents(command, &payload));
    }
    let received = node.log.received.lock().unwrap()[0].clone();
    assert_eq!(received[1..], sent[..]);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn smoothed_writes_arrive_whole_and_in_order() {
    // Paced writes go out in chunks; padding still lands each whole write on
    // a boundary, and the node decodes every packet across chunk edges.
    for (padding, buckets) in [("", None), ("padding = \"pow2\"\n", Some(Buckets::Pow2))] {
        let node = spawn_v2_node(V2NodeOptions::default()).await;
        let (proxy, _) =
            shaped_proxy(&format!("[shaping]\n{padding}smoothing_rate = 8000000\nsmoothing_burst = 16384\n")).await;
        let messages = messages();
        let (client, sent) = exchange(&proxy, &node, &messages).await;
        drop(client);
        let received = node.log.received.lock().unwrap()[0].clone();
        assert_eq!(received[1..], sent[..], "{padding}");
        if let Some(buckets) = buckets {
            for (genuine, decoy) in writes(&node.log.packets.lock().unwrap()[0]) {
                assert_eq!(boundary(buckets, 65536, genuine + decoy), genuine + decoy);
            }
        } else {
            assert!(node.log.packets.lock().unwrap()[0].iter().all(|&(decoy, _)| !decoy));
        }

        // Many messages in one client write: batches and in-place writes,
        // each paced, stay in order.
        let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
        assert_eq!(expect_frame(&mut client).await.command, "version");
        let mut burst = Vec::new();
        let mut sent = Vec::new();
        for (command, len) in [("inv", 37), ("block", 200_000), ("tx", 300), ("block", 70_000), ("ping", 8)] {
            let payload = random_payload(len);
            burst.extend(frame(REGTEST, command, &payload));
            sent.push(contents(command, &payload));
        }
        let started = std::time::Instant::now();
        client.write_all(&burst).await.unwrap();
        for expected in &sent {
            let echo = expect_frame(&mut client).await;
            assert!(expected.ends_with(&echo.payload), "{padding}: {} echoed intact", echo.command);
        }
        // Paced: the 270 kB cannot have reached the node faster than the
        // bucket plus the rate allow (a lower bound, which a slow machine
        // only exceeds further).
        let least = (burst.len() - 16_384) as f64 / 8_000_000.0;
        assert!(started.elapsed().as_secs_f64() >= least, "{padding}: faster than {least} s");
        let received = node.log.received.lock().unwrap()[1].clone();
        assert_eq!(received[1..], sent[..], "{padding}");
        proxy.shutdown.cancel();
    }
}

#[tokio::test]
async fn session_histograms_follow_each_open_session_and_go_when_it_closes() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, observer) = shaped_proxy("[shaping]\npadding = \"pow2\"\nsession_histograms = true\n").await;
    let messages = messages();
    let (first, _) = exchange(&proxy, &node, &messages).await;
    let (second, _) = exchange(&proxy, &node, &messages[..3]).await;
    let text = observer.encode_metrics();
    let count = |session: &str| {
        metric(&observer, &format!("bip324_proxy_v2_session_write_bytes_count{{session=\"{session}\"}}"))
    };
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("bip324_proxy_v2_session_write_bytes_count{session=\""))
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 2, "one series per open session:\n{text}");
    let (a, b) = (count(&ids[0]), count(&ids[1]));
    // Each session's writes are its own; together they are the proxy-wide count.
    assert_eq!(a.max(b), messages.len() as u64, "{text}");
    assert_eq!(a.min(b), 3, "{text}");
    assert_eq!(a + b, metric(&observer, "bip324_proxy_v2_write_bytes_count"));
    // pow2 padding: every write of each session lands in a power-of-two bucket.
    let sum = metric(&observer, &format!("bip324_proxy_v2_session_write_bytes_sum{{session=\"{}\"}}", ids[0]));
    assert!(sum > 0);
    drop(first);
    drop(second);
    let gone = eventually(|| !observer.encode_metrics().contains("v2_session_write_bytes_count{")).await;
    assert!(gone, "closed sessions' series are removed");
    assert!(metric(&observer, "bip324_proxy_v2_write_bytes_count") >= messages.len() as u64 + 3);
    proxy.shutdown.cancel();
}

#[tokio::test]
async fn session_histograms_are_off_by_default() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, observer) = shaped_proxy("[shaping]\npadding = \"pow2\"\n").await;
    let (_client, _) = exchange(&proxy, &node, &messages()[..2]).await;
    let text = observer.encode_metrics();
    assert!(!text.contains("v2_session_write_bytes_count{"), "{text}");
    assert!(metric(&observer, "bip324_proxy_v2_write_bytes_count") > 0);
    proxy.shutdown.cancel();
}
