//! Transparent mode (destination from VERSION addr_recv), the shared main
//! port, a transparent-only listener and static routes.

mod common;

use bip324_proxy::session::FrontEnd;
use bip324_proxy::socks5::Target;
use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn transparent_ipv4_addr_recv() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let mut client = open_transparent_session(proxy.addr, node.addr, REGTEST).await;
    let version = expect_frame(&mut client).await;
    assert_eq!(version.command, "version");
    client.write_all(&frame(REGTEST, "ping", &[4; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.payload, vec![4; 8]);
}

#[tokio::test]
async fn transparent_ipv6_addr_recv() {
    let node = spawn_v2_node_on("[::1]:0", V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let mut client = open_transparent_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

#[tokio::test]
async fn transparent_forwards_version_unchanged() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let version = version_message(REGTEST, node.addr);
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(&version).await.unwrap();
    expect_frame(&mut client).await;
    let received = node.log.received.lock().unwrap()[0][0].clone();
    assert_eq!(&received[1..13], &version[4..16], "command");
    assert_eq!(&received[13..], &version[24..], "payload");
}

#[tokio::test]
async fn transparent_refuses_unspecified_addr_recv() {
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let mut client = open_transparent_session(proxy.addr, "[::]:0".parse().unwrap(), REGTEST).await;
    expect_closed(&mut client).await;
}

#[tokio::test]
async fn transparent_refuses_private_targets_by_default() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let mut client = open_transparent_session(proxy.addr, node.addr, REGTEST).await;
    expect_closed(&mut client).await;
    assert_eq!(node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn transparent_refuses_a_first_message_other_than_version() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(&frame(REGTEST, "verack", &[])).await.unwrap();
    expect_closed(&mut client).await;
    assert_eq!(node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn transparent_refuses_the_proxy_itself() {
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let mut client = open_transparent_session(proxy.addr, proxy.addr, REGTEST).await;
    expect_closed(&mut client).await;
}

#[tokio::test]
async fn socks_and_transparent_clients_share_the_port() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&["--allow-private-targets"]).await;
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let (proxy, node) = (proxy.addr, node.addr);
        tasks.push(tokio::spawn(async move {
            let mut client = if i % 2 == 0 {
                open_transparent_session(proxy, node, REGTEST).await
            } else {
                open_v1_session(proxy, node, REGTEST).await
            };
            assert_eq!(expect_frame(&mut client).await.command, "version");
            client.write_all(&frame(REGTEST, "ping", &i.to_le_bytes())).await.unwrap();
            assert_eq!(expect_frame(&mut client).await.payload, i.to_le_bytes());
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn front_ends_can_be_switched_off() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let socks_only = spawn_proxy_with_file("transparent = false\n", &["--allow-private-targets"]).await;
    let mut client = open_transparent_session(socks_only.addr, node.addr, REGTEST).await;
    expect_closed(&mut client).await;
    let transparent_only = spawn_proxy_with_file("socks5 = false\n", &["--allow-private-targets"]).await;
    let mut s = tokio::net::TcpStream::connect(transparent_only.addr).await.unwrap();
    s.write_all(&[0x05, 0x01, 0x00]).await.unwrap();
    expect_closed(&mut s).await;
}

#[tokio::test]
async fn transparent_only_listener() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (_proxy, extra) = spawn_proxy_fronts(&["--allow-private-targets"], vec![FrontEnd::Transparent]).await;
    let mut client = open_transparent_session(extra[0], node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    // SOCKS5 is not spoken there.
    let mut s = tokio::net::TcpStream::connect(extra[0]).await.unwrap();
    s.write_all(&[0x05, 0x01, 0x00]).await.unwrap();
    expect_closed(&mut s).await;
}

#[tokio::test]
async fn static_route_to_a_hostname_carries_a_full_session() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let target = Target::parse(&format!("localhost:{}", node.addr.port())).unwrap();
    let (_proxy, extra) = spawn_proxy_fronts(&[], vec![FrontEnd::Route(target)]).await;
    // The client knows nothing of the node: its VERSION can name anything.
    let mut client = open_transparent_session(extra[0], "[::]:0".parse().unwrap(), REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    client.write_all(&frame(REGTEST, "verack", &[])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "verack");
    for i in 0..50u32 {
        client.write_all(&frame(REGTEST, "inv", &i.to_le_bytes())).await.unwrap();
        assert_eq!(expect_frame(&mut client).await.payload, i.to_le_bytes());
    }
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn static_route_passes_a_v2_client_through() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let (_proxy, extra) = spawn_proxy_fronts(&[], vec![FrontEnd::Route(Target::from(node.addr))]).await;
    let stream = tokio::net::TcpStream::connect(extra[0]).await.unwrap();
    let (reader, mut writer) = stream.into_split();
    let (mut inbound, mut outbound, mut session_reader) =
        bip324::futures::handshake(REGTEST, bip324::Role::Initiator, None, None, reader, &mut writer)
            .await
            .expect("end-to-end handshake through the route");
    let packet = outbound.encrypt_to_vec(&[19, 1, 2, 3, 4, 5, 6, 7, 8], bip324::PacketType::Genuine, None);
    writer.write_all(&packet).await.unwrap();
    let mut len = [0u8; 3];
    tokio::io::AsyncReadExt::read_exact(&mut session_reader, &mut len).await.unwrap();
    let mut body = vec![0u8; inbound.decrypt_packet_len(len)];
    tokio::io::AsyncReadExt::read_exact(&mut session_reader, &mut body).await.unwrap();
    let (_, plaintext) = inbound.decrypt_to_vec(&body, None).unwrap();
    assert_eq!(&plaintext[1..], &[19, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn static_routes_from_the_config_file() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let toml = format!("[[route]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"{}\"\n", node.addr);
    let config = std::env::temp_dir().join(format!("bip324-proxy-route-{}.toml", std::process::id()));
    std::fs::write(&config, toml).unwrap();
    let mut proxy = spawn_binary(&["--config", config.to_str().unwrap()], "info").await;
    let line = proxy.wait_for(&["static route"]).await;
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    let mut client =
        open_transparent_session(format!("127.0.0.1:{port}").parse().unwrap(), "[::]:0".parse().unwrap(), REGTEST)
            .await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    let _ = std::fs::remove_file(config);
}
