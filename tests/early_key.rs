//! Key early: SOCKS5 sessions send our BIP324 key right after the TCP
//! connect, before the client's VERSION (`early_key`, docs/DESIGN.md "Key
//! early"). Against the `bip324` crate's responder, a v1-only node, and a
//! native v2 client (the crate as initiator) that needs a remote which has
//! received nothing from us.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A tap in front of `node`: reports each connection's first 64 bytes (our
/// key) as soon as they arrive, then relays both ways untouched.
async fn spawn_key_tap(node: SocketAddr) -> (SocketAddr, mpsc::UnboundedReceiver<[u8; 64]>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (keys, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut from_proxy, _)) = listener.accept().await {
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut key = [0u8; 64];
                if from_proxy.read_exact(&mut key).await.is_err() {
                    return;
                }
                let _ = keys.send(key);
                let Ok(mut to_node) = TcpStream::connect(node).await else { return };
                if to_node.write_all(&key).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut from_proxy, &mut to_node).await;
            });
        }
    });
    (addr, received)
}

/// A native v2 client (the `bip324` crate as initiator) through the proxy:
/// the handshake with the node and one message echoed.
async fn native_v2_session(proxy: SocketAddr, node: SocketAddr) {
    let stream = socks_btcd(proxy, node).await.expect("CONNECT");
    let (reader, mut writer) = stream.into_split();
    let (mut inbound, mut outbound, mut session_reader) =
        bip324::futures::handshake(REGTEST, bip324::Role::Initiator, None, None, reader, &mut writer)
            .await
            .expect("end-to-end handshake through the proxy");
    let mut contents = vec![18u8];
    contents.extend_from_slice(&[9; 8]);
    writer.write_all(&outbound.encrypt_to_vec(&contents, bip324::PacketType::Genuine, None)).await.unwrap();
    let mut len = [0u8; 3];
    session_reader.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; inbound.decrypt_packet_len(len)];
    session_reader.read_exact(&mut body).await.unwrap();
    let (_, plaintext) = inbound.decrypt_to_vec(&body, None).unwrap();
    assert_eq!(&plaintext[1..], &contents[..]);
}

#[tokio::test]
async fn our_key_reaches_the_remote_before_the_clients_version_and_the_crate_accepts_it() {
    let node = spawn_v2_node(V2NodeOptions { decoys_before_version: 1, ..Default::default() }).await;
    let (tap, mut keys) = spawn_key_tap(node.addr).await;
    for args in [&[][..], &["--early-key", "always"][..]] {
        let proxy = spawn_proxy(args).await;
        let mut client = socks_btcd(proxy.addr, tap).await.expect("CONNECT");
        // The client has sent nothing since the SOCKS5 request: the key is
        // already at the remote.
        let key = tokio::time::timeout(WAIT, keys.recv()).await.expect("key before VERSION").unwrap();
        assert_ne!(key[..4], REGTEST, "a key, not a v1 header");
        client.write_all(&version_message(REGTEST, tap)).await.unwrap();
        assert_eq!(expect_frame(&mut client).await.command, "version");
        client.write_all(&frame(REGTEST, "ping", &[5; 8])).await.unwrap();
        assert_eq!(expect_frame(&mut client).await.payload, vec![5; 8]);
        proxy.shutdown.cancel();
    }
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn early_key_never_still_upgrades() {
    assert_one_v2_session_with(&["--early-key", "never"]).await;
}

#[tokio::test]
async fn a_native_v2_client_gets_a_remote_that_has_received_nothing_from_us() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--early-key", "always"]).await;
    native_v2_session(proxy.addr, node.addr).await;
    // The first connection carried our key and was closed; the second one
    // carried the client's own handshake from its first byte.
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 2);
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1, "only the client's handshake completed");
}

#[tokio::test]
async fn auto_holds_the_key_for_a_client_that_spoke_v2_lately() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    native_v2_session(proxy.addr, node.addr).await;
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 2, "a client not yet known to speak v2: key early, redial");
    native_v2_session(proxy.addr, node.addr).await;
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 3, "now known: one connection");
    // Its v1 sessions still upgrade, with the key sent after its VERSION.
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 4);
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn v1_only_remote_follows_the_fallback_policy_whenever_the_key_went_out() {
    for early_key in ["always", "never"] {
        // none: closed, one dial, nothing in plaintext.
        let node = spawn_v1_node(REGTEST).await;
        let proxy = spawn_proxy(&["--fallback", "none", "--early-key", early_key]).await;
        let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
        expect_closed(&mut client).await;
        assert_eq!(node.log.accepts.load(Ordering::SeqCst), 1, "{early_key}");
        assert!(node.log.received.lock().unwrap().iter().all(Vec::is_empty), "{early_key}: plaintext reached the node");

        // v1: silence after our key, then a fresh connection in v1.
        let node = spawn_v1_node(REGTEST).await;
        let proxy = spawn_proxy(&["--fallback", "v1", "--early-key", early_key]).await;
        let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
        assert_eq!(expect_frame(&mut client).await.command, "version", "{early_key}");
        assert_eq!(node.log.accepts.load(Ordering::SeqCst), 2, "{early_key}");
    }
}

#[tokio::test]
async fn a_remote_found_v1_only_while_the_client_waited_gets_a_fresh_v1_connection() {
    // Session A sends its key early and waits; session B finds the remote
    // v1-only. Under fallback v1, A's VERSION then goes out in v1 on a new
    // connection: the first one already carried A's key.
    let node = spawn_v1_node(REGTEST).await;
    let proxy = spawn_proxy(&["--fallback", "v1", "--early-key", "always"]).await;
    let host = node.addr.ip().to_string();
    let mut a = socks_core(proxy.addr, &host, node.addr.port()).await.expect("CONNECT");
    let mut b = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut b).await.command, "version");
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 3, "A, B's handshake, B's v1 redial");
    a.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut a).await.command, "version");
    assert_eq!(node.log.accepts.load(Ordering::SeqCst), 4, "A's v1 redial");
}
