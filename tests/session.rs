//! End-to-end sessions through the proxy's library entry point: real v1
//! clients speaking SOCKS5 as Bitcoin Core and btcd do, a real BIP324
//! responder built on the `bip324` crate, and a v1-only node.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn short_id_contents(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut contents = vec![id];
    contents.extend_from_slice(payload);
    contents
}

fn long_contents(command: &str, payload: &[u8]) -> Vec<u8> {
    let mut contents = vec![0u8; 13];
    contents[1..1 + command.len()].copy_from_slice(command.as_bytes());
    contents.extend_from_slice(payload);
    contents
}

#[tokio::test]
async fn version_verack_ping_pong_round_trip_core_style() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;

    let version = expect_frame(&mut client).await;
    assert_eq!(version.command, "version");
    assert_eq!(version.magic, REGTEST);
    client.write_all(&frame(REGTEST, "verack", &[])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "verack");
    let nonce = 0x1122_3344_5566_7788u64.to_le_bytes();
    client.write_all(&frame(REGTEST, "ping", &nonce)).await.unwrap();
    let ping = expect_frame(&mut client).await;
    assert_eq!((ping.command.as_str(), ping.payload.as_slice()), ("ping", &nonce[..]));
    client.write_all(&frame(REGTEST, "pong", &nonce)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "pong");

    // What the node received: long form for version/verack, short IDs 18/19.
    let received = node.log.received.lock().unwrap()[0].clone();
    assert_eq!(received[0][..13], long_contents("version", &[])[..13]);
    assert_eq!(received[1], long_contents("verack", &[]));
    assert_eq!(received[2], short_id_contents(18, &nonce));
    assert_eq!(received[3], short_id_contents(19, &nonce));
}

#[tokio::test]
async fn btcd_style_ipv4_and_ipv6_targets() {
    let node4 = spawn_v2_node(V2NodeOptions::default()).await;
    let node6 = spawn_v2_node_on("[::1]:0", V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    for node in [&node4, &node6] {
        let mut client = socks_btcd(proxy.addr, node.addr).await.expect("CONNECT");
        client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
        assert_eq!(expect_frame(&mut client).await.command, "version");
    }
}

#[tokio::test]
async fn ipv6_literal_as_domainname_without_brackets() {
    let node = spawn_v2_node_on("[::1]:0", V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    // Bitcoin Core sends "::1" as a DOMAINNAME, unbracketed.
    let mut client = socks_core(proxy.addr, "::1", node.addr.port()).await.expect("CONNECT");
    client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

#[tokio::test]
async fn hostname_target_is_resolved() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = socks_core(proxy.addr, "localhost", node.addr.port()).await.expect("CONNECT");
    client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

#[tokio::test]
async fn three_hundred_messages_each_way_cross_rekey() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let (mut reader, mut writer) = client.into_split();
    let sender = tokio::spawn(async move {
        for i in 0..320u64 {
            let command = if i % 2 == 0 { "inv" } else { "getheaders" };
            writer.write_all(&frame(REGTEST, command, &i.to_le_bytes().repeat(1 + (i as usize % 9)))).await.unwrap();
        }
        writer
    });
    for i in 0..320u64 {
        let echoed = expect_frame(&mut reader).await;
        assert_eq!(echoed.command, if i % 2 == 0 { "inv" } else { "getheaders" });
        assert_eq!(echoed.payload, i.to_le_bytes().repeat(1 + (i as usize % 9)));
    }
    sender.await.unwrap();
}

#[tokio::test]
async fn messages_of_3_9_mb_each_way() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let payload = random_payload(3_900_000);
    let (mut reader, mut writer) = client.into_split();
    let sent = frame(REGTEST, "block", &payload);
    let writer_task = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer
    });
    let echoed = expect_frame(&mut reader).await;
    assert_eq!(echoed.command, "block");
    assert!(echoed.payload == payload);
    writer_task.await.unwrap();
}

#[tokio::test]
async fn max_garbage_decoys_and_version_contents() {
    let node = spawn_v2_node(V2NodeOptions {
        garbage_len: 4095,
        decoys_before_version: 3,
        decoys_after_version: 4,
        version_contents: b"future transport version".to_vec(),
        ..Default::default()
    })
    .await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    client.write_all(&frame(REGTEST, "ping", &[7; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.payload, vec![7; 8]);
}

#[tokio::test]
async fn crate_decoys_before_version_without_contents() {
    let node = spawn_v2_node(V2NodeOptions { garbage_len: 0, decoys_before_version: 2, ..Default::default() }).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

#[tokio::test]
async fn mainnet_magic_selects_mainnet_keys() {
    let node = spawn_v2_node(V2NodeOptions { magic: MAINNET, ..Default::default() }).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, MAINNET).await;
    assert_eq!(expect_frame(&mut client).await.magic, MAINNET);
}

#[tokio::test]
async fn disallowed_network_is_closed() {
    let node = spawn_v2_node(V2NodeOptions { magic: MAINNET, ..Default::default() }).await;
    let proxy = spawn_proxy(&["--network", "regtest"]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, MAINNET).await;
    expect_closed(&mut client).await;
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn v2_client_is_passed_through_to_v2_node() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let stream = socks_btcd(proxy.addr, node.addr).await.expect("CONNECT");
    let (reader, mut writer) = stream.into_split();
    let (mut inbound, mut outbound, mut session_reader) =
        bip324::futures::handshake(REGTEST, bip324::Role::Initiator, None, None, reader, &mut writer)
            .await
            .expect("end-to-end handshake through the proxy");
    let mut contents = vec![18u8];
    contents.extend_from_slice(&[9; 8]);
    let packet = outbound.encrypt_to_vec(&contents, bip324::PacketType::Genuine, None);
    writer.write_all(&packet).await.unwrap();
    let mut len = [0u8; 3];
    session_reader.read_exact(&mut len).await.unwrap();
    let rest = inbound.decrypt_packet_len(len);
    let mut body = vec![0u8; rest];
    session_reader.read_exact(&mut body).await.unwrap();
    let (_, plaintext) = inbound.decrypt_to_vec(&body, None).unwrap();
    assert_eq!(&plaintext[1..], &contents[..]);
}

#[tokio::test]
async fn v2_client_refused_when_passthrough_is_off() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--passthrough", "false"]).await;
    let mut stream = socks_btcd(proxy.addr, node.addr).await.expect("CONNECT");
    stream.write_all(&random_payload(64)).await.unwrap();
    expect_closed(&mut stream).await;
}

#[tokio::test]
async fn plaintext_other_protocols_are_not_tunnelled() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut stream = socks_btcd(proxy.addr, node.addr).await.expect("CONNECT");
    stream.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await.unwrap();
    expect_closed(&mut stream).await;
}

#[tokio::test]
async fn fallback_none_closes_against_v1_only_node() {
    let node = spawn_v1_node(REGTEST).await;
    let proxy = spawn_proxy(&["--fallback", "none"]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_closed(&mut client).await;
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 1);
    // Nothing in plaintext reached the node.
    assert!(node.log.received.lock().unwrap()[0].is_empty());
}

#[tokio::test]
async fn fallback_v1_reconnects_and_replays_version() {
    let node = spawn_v1_node(REGTEST).await;
    let proxy = spawn_proxy(&["--fallback", "v1"]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    client.write_all(&frame(REGTEST, "verack", &[])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "verack");
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fallback_v1_still_prefers_v2() {
    assert_one_v2_session_with(&["--fallback", "v1"]).await;
}

#[tokio::test]
async fn bad_checksum_closes_only_that_session() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut good = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut good).await;
    let mut bad = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut bad).await;
    let mut broken = frame(REGTEST, "ping", &[1; 8]);
    broken[20] ^= 0xff;
    bad.write_all(&broken).await.unwrap();
    expect_closed(&mut bad).await;
    good.write_all(&frame(REGTEST, "ping", &[2; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut good).await.payload, vec![2; 8]);
}

#[tokio::test]
async fn oversize_header_closes_before_payload() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let mut header = frame(REGTEST, "block", &[])[..24].to_vec();
    header[16..20].copy_from_slice(&4_000_001u32.to_le_bytes());
    client.write_all(&header).await.unwrap();
    expect_closed(&mut client).await;
}

#[tokio::test]
async fn wrong_magic_after_version_closes() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    client.write_all(&frame(MAINNET, "verack", &[])).await.unwrap();
    expect_closed(&mut client).await;
}

async fn request_with_command(proxy: std::net::SocketAddr, command: u8, atyp: u8) -> u8 {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    let mut request = vec![0x05, command, 0x00, atyp];
    request.extend_from_slice(&[127, 0, 0, 1, 0x20, 0x8d]);
    s.write_all(&request).await.unwrap();
    match read_reply(s).await {
        Ok(_) => 0,
        Err(code) => code,
    }
}

#[tokio::test]
async fn bind_udp_and_unknown_commands_get_07_unknown_atyp_08() {
    let proxy = spawn_proxy(&[]).await;
    assert_eq!(request_with_command(proxy.addr, 0x02, 0x01).await, 0x07);
    assert_eq!(request_with_command(proxy.addr, 0x03, 0x01).await, 0x07);
    assert_eq!(request_with_command(proxy.addr, 0x42, 0x01).await, 0x07);
    assert_eq!(request_with_command(proxy.addr, 0x01, 0x09).await, 0x08);
}

#[tokio::test]
async fn refused_target_gets_05() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = spawn_proxy(&[]).await;
    assert_eq!(socks_btcd(proxy.addr, addr).await.err(), Some(0x05));
    assert_eq!(socks_core(proxy.addr, "127.0.0.1", addr.port()).await.err(), Some(0x05));
}

#[tokio::test]
async fn onion_without_upstream_gets_04() {
    let proxy = spawn_proxy(&[]).await;
    let onion = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd.onion";
    assert_eq!(socks_core(proxy.addr, onion, 8333).await.err(), Some(0x04));
}

#[tokio::test]
async fn no_acceptable_method_gets_ff() {
    let proxy = spawn_proxy(&[]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let choice = socks_greet(&mut s, &[0x05, 0x01, 0x01]).await;
    assert_eq!(choice, [0x05, 0xff]);
}

#[tokio::test]
async fn empty_password_is_accepted_jdk_style() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Offer only username/password, as a JDK client with credentials does.
    let choice = socks_greet(&mut s, &[0x05, 0x01, 0x02]).await;
    assert_eq!(choice, [0x05, 0x02]);
    s.write_all(&[0x01, 0x04, b'u', b's', b'e', b'r', 0x00]).await.unwrap();
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await.unwrap();
    assert_eq!(status, [0x01, 0x00]);
    let mut request = vec![0x05, 0x01, 0x00, 0x01, 127, 0, 0, 1];
    request.extend_from_slice(&node.addr.port().to_be_bytes());
    s.write_all(&request).await.unwrap();
    let mut client = read_reply(s).await.expect("CONNECT");
    client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

#[tokio::test]
async fn configured_client_auth_rejects_wrong_credentials() {
    let proxy = spawn_proxy(&["--client-username", "wallet", "--client-password", "s3cret"]).await;
    for (user, pass, ok) in [("wallet", "s3cret", true), ("wallet", "wrong", false), ("", "", false)] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let choice = socks_greet(&mut s, &[0x05, 0x02, 0x00, 0x02]).await;
        assert_eq!(choice, [0x05, 0x02], "credentials are required");
        let status = socks_auth(&mut s, user, pass).await;
        assert_eq!(status, if ok { [0x01, 0x00] } else { [0x01, 0x01] }, "{user}:{pass}");
    }
    // A client offering only no-auth gets 0xFF.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let choice = socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    assert_eq!(choice, [0x05, 0xff]);
}

#[tokio::test]
async fn fifty_concurrent_sessions() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let (proxy, node) = (proxy.addr, node.addr);
        tasks.push(tokio::spawn(async move {
            let mut client = open_v1_session(proxy, node, REGTEST).await;
            assert_eq!(expect_frame(&mut client).await.command, "version");
            for j in 0..10u64 {
                let payload = (i * 1000 + j).to_le_bytes();
                client.write_all(&frame(REGTEST, "ping", &payload)).await.unwrap();
                assert_eq!(expect_frame(&mut client).await.payload, payload);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 50);
}

#[tokio::test]
async fn graceful_shutdown_drains_open_sessions() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;

    proxy.shutdown.cancel();
    // No new sessions are accepted...
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err());
    // ...while the open one keeps working until it ends.
    client.write_all(&frame(REGTEST, "ping", &[3; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.payload, vec![3; 8]);
    drop(client);
    let result = tokio::time::timeout(WAIT, proxy.task).await.expect("server stops after drain");
    result.unwrap().unwrap();
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_session() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--idle-timeout", "1200"]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    // Virtual time from here: the runtime jumps to the next timer when idle.
    tokio::time::pause();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(3600), client.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "session should close after 1200 s idle: {read:?}");
}

#[tokio::test]
async fn session_limit_refuses_excess_connections_at_once() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--max-sessions", "1"]).await;
    let mut first = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut first).await;
    let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(&[0x05, 0x01, 0x00]).await.unwrap();
    expect_closed(&mut second).await;
    drop(first);
    // The permit comes back when the first session ends.
    let mut third = None;
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&[0x05, 0x01, 0x00]).await.unwrap();
        let mut choice = [0u8; 2];
        if s.read_exact(&mut choice).await.is_ok() {
            third = Some(choice);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(third, Some([0x05, 0x00]));
}

#[tokio::test]
async fn large_and_small_messages_interleaved_keep_their_order() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    // Sizes around the relay's 64 KiB direct-write threshold, in one write.
    let sizes = [8usize, 65_535, 8, 65_536, 1_000_000, 0, 300_000, 8, 64 * 1024 + 1];
    let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| random_payload(n)).collect();
    let commands = ["ping", "block", "pong", "tx", "block", "verack", "cmpctblock", "ping", "headers"];
    let mut batch = Vec::new();
    for (command, payload) in commands.iter().zip(&payloads) {
        batch.extend(frame(REGTEST, command, payload));
    }
    let (mut reader, mut writer) = client.into_split();
    let writing = tokio::spawn(async move {
        writer.write_all(&batch).await.unwrap();
        writer
    });
    for (command, payload) in commands.iter().zip(&payloads) {
        let echoed = expect_frame(&mut reader).await;
        assert_eq!(&echoed.command, command);
        assert!(&echoed.payload == payload, "{command}: payload differs");
    }
    writing.await.unwrap();
}

#[tokio::test]
async fn client_outside_the_allow_list_is_closed_at_accept() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--allow", "10.0.0.0/8"]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s.write_all(&[0x05, 0x01, 0x00]).await;
    expect_closed(&mut s).await;
    // The same proxy serves an allowed client.
    let allowed = spawn_proxy(&["--allow", "127.0.0.0/8"]).await;
    let mut client = open_v1_session(allowed.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
}
