//! The real binary: start-up checks, the log an operator reads, signals.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn logged_session_id_equals_the_responders() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut proxy = spawn_binary(&[], "info").await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let line = proxy.wait_for(&["session open", "transport=v2"]).await;
    let logged = line.split("session_id=").nth(1).expect("session_id field")[..64].to_owned();
    let responder = hex::encode(node.log.session_ids.lock().unwrap()[0]);
    assert_eq!(logged, responder);
    // The span carries client, target and network.
    assert!(line.contains(&format!("target={}", node.addr)), "{line}");
    assert!(line.contains("network=regtest"), "{line}");

    drop(client);
    let closed = proxy.wait_for(&["session closed"]).await;
    assert!(closed.contains("bytes_client_to_remote="), "{closed}");
    assert!(closed.contains("messages_remote_to_client=1"), "{closed}");
}

#[tokio::test]
async fn failed_upgrade_logs_one_line_with_the_reason() {
    let node = spawn_v1_node(REGTEST).await;
    let mut proxy = spawn_binary(&[], "info").await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_closed(&mut client).await;
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("remote does not speak v2"), "{line}");
    assert!(line.contains("stage=upgrade"), "{line}");
}

#[tokio::test]
async fn sigterm_drains_open_sessions_then_exits() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut proxy = spawn_binary(&[], "info").await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    proxy.terminate();
    proxy.wait_for(&["draining sessions"]).await;
    // The open session still works during the drain.
    client.write_all(&frame(REGTEST, "ping", &[5; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.payload, vec![5; 8]);
    drop(client);
    proxy.wait_for(&["stopped"]).await;
    let status = tokio::time::timeout(WAIT, proxy.child.wait()).await.unwrap().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_drain_deadline_closes_stuck_sessions() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let config = std::env::temp_dir().join(format!("bip324-proxy-drain-{}.toml", std::process::id()));
    std::fs::write(&config, "[timeouts]\nshutdown = 1\n").unwrap();
    let mut proxy = spawn_binary(&["--config", config.to_str().unwrap()], "info").await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    proxy.terminate();
    proxy.wait_for(&["drain deadline passed"]).await;
    expect_closed(&mut client).await;
    let closed = proxy.wait_for(&["session closed"]).await;
    assert!(closed.contains("shutting down"), "{closed}");
    let status = tokio::time::timeout(WAIT, proxy.child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn non_loopback_listen_without_auth_refuses_to_start() {
    let (status, stderr) = run_binary(&["--listen", "0.0.0.0:0"]).await;
    assert!(!status.success());
    assert!(stderr.contains("refusing") && stderr.contains("allow"), "{stderr}");
}

#[tokio::test]
async fn config_error_names_key_and_line() {
    let config = std::env::temp_dir().join(format!("bip324-proxy-bad-{}.toml", std::process::id()));
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\n\n[timeouts]\nhandshak = 5\n").unwrap();
    let (status, stderr) = run_binary(&["--config", config.to_str().unwrap()]).await;
    assert!(!status.success());
    assert!(stderr.contains("handshak") && stderr.contains("line 4"), "{stderr}");
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn credentials_never_reach_the_log() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut proxy =
        spawn_binary(&["--client-username", "wallet-user", "--client-password", "pw-7f3a9c"], "trace").await;
    // A wrong password, then the right one.
    for password in ["bad-pw-2e8d1b", "pw-7f3a9c"] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&[0x05, 0x01, 0x02]).await.unwrap();
        let mut auth = vec![0x01, 11];
        auth.extend_from_slice(b"wallet-user");
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        s.write_all(&auth).await.unwrap();
        let mut request = vec![0x05, 0x01, 0x00, 0x01, 127, 0, 0, 1];
        request.extend_from_slice(&node.addr.port().to_be_bytes());
        // After a wrong password the proxy answers `01 01` and closes: these
        // writes may meet a closed socket.
        let _ = s.write_all(&request).await;
        let _ = s.write_all(&version_message(REGTEST, node.addr)).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest),
        )
        .await;
    }
    proxy.wait_for(&["session open"]).await;
    proxy.terminate();
    proxy.wait_for(&["stopped"]).await;
    let log = proxy.seen.join("\n");
    for secret in ["wallet-user", "pw-7f3a9c", "bad-pw-2e8d1b"] {
        assert!(!log.contains(secret), "`{secret}` appears in the log:\n{log}");
    }
}

#[tokio::test]
async fn environment_variables_configure_the_binary() {
    // The variables are set in the child's environment only.
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bip324-proxy"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("BIP324_PROXY_FALLBACK", "v1")
        .env("BIP324_PROXY_NETWORKS", "signet,regtest")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(line.contains("fallback=v1") && line.contains("networks=signet,regtest"), "{line}");
}

#[tokio::test]
async fn transparent_placeholder_addr_recv_is_refused_with_the_reason() {
    let mut proxy = spawn_binary(&["--allow-private-targets"], "info").await;
    let mut client = open_transparent_session(proxy.addr, "[::]:0".parse().unwrap(), REGTEST).await;
    expect_closed(&mut client).await;
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("stage=destination"), "{line}");
    assert!(line.contains("[::]:0") && line.contains("onion, I2P, CJDNS or unroutable"), "{line}");
}

#[tokio::test]
async fn healthcheck_reports_a_live_proxy() {
    let mut proxy = spawn_binary(&[], "info").await;
    let listen = proxy.addr.to_string();
    let (status, stderr) = run_binary(&["--listen", &listen, "healthcheck"]).await;
    assert!(status.success(), "{stderr}");
    // A health check every 30 s must not write a line each time at info: the
    // first close line seen is the half-sent greeting that follows it.
    let mut half = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, &[0x05, 0x02, 0x00]).await.unwrap();
    drop(half);
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("session{id=2 ") && line.contains("client closed before sending anything useful"), "{line}");
    drop(proxy);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (status, _) = run_binary(&["--listen", &addr, "healthcheck"]).await;
    assert!(!status.success());
}

#[tokio::test]
async fn first_byte_neither_socks_nor_magic_is_refused_with_the_reason() {
    let mut proxy = spawn_binary(&[], "info").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_closed(&mut s).await;
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("first byte 0x47 is neither a SOCKS5 greeting"), "{line}");
}
