//! The metrics and status listener under hostile or careless clients, with the
//! real binary: refused addresses are dropped at accept, connections are
//! capped, idle and slow requests time out, `/metrics` stays up while
//! sessions drain, and a second signal ends the process at once.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Writes `toml` to a temporary file and returns its path.
fn config_file(toml: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "bip324-proxy-metrics-{}-{}.toml",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&path, toml).unwrap();
    path
}

/// The binary with a metrics listener on 127.0.0.1:0 and this config file.
async fn proxy_with_metrics(toml: &str, args: &[&str]) -> (BinaryProxy, SocketAddr) {
    let path = config_file(toml);
    let mut all = vec!["--metrics-listen", "127.0.0.1:0", "--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut proxy = spawn_binary(&all, "info").await;
    let line = proxy.wait_for(&["metrics and status listening"]).await;
    let _ = std::fs::remove_file(path);
    let addr = line.split("listen=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    (proxy, addr)
}

/// Connects from `source` (any 127.0.0.0/8 address) to `addr`.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// True once the server has closed `stream` (EOF or reset), reading and
/// discarding whatever it sent first; false if it is still open after `WAIT`.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A GET that may be refused: the body of a 200 answer, or `None`.
async fn try_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut response)).await.ok()?.ok()?;
    let text = String::from_utf8(response).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

fn signal(proxy: &BinaryProxy, name: &str) {
    let pid = proxy.child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn refused_client_is_closed_at_accept_without_a_request() {
    // 127.0.0.1 is not on the list: the connection is dropped before any HTTP.
    let (_proxy, metrics) = proxy_with_metrics("allow = [\"127.0.0.2\"]\n", &[]).await;
    for _ in 0..3 {
        let mut refused = connect_from("127.0.0.1", metrics).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(WAIT, refused.read(&mut byte)).await.expect("closed at accept");
        assert!(matches!(read, Ok(0) | Err(_)), "a refused client got bytes: {read:?}");
    }
    // An allowed address is answered.
    let mut allowed = connect_from("127.0.0.2", metrics).await;
    allowed.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, allowed.read_to_end(&mut response)).await.unwrap().unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));
}

#[tokio::test]
async fn connection_cap_holds_and_the_proxy_keeps_accepting() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, metrics) = proxy_with_metrics("[metrics]\nmax_connections = 4\nrequest_timeout = 600\n", &[]).await;
    // Far more idle connections than the cap: those past it are closed at once.
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..200 {
        let mut stream = TcpStream::connect(metrics).await.unwrap();
        let mut byte = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::from_millis(200), stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("an idle connection got bytes"),
            Err(_) => held.push(stream),
        }
    }
    assert!(held.len() <= 4, "{} idle connections held open past a cap of 4", held.len());
    assert!(closed >= 196, "only {closed} connections closed");
    // The SOCKS port is unaffected.
    let mut session = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut session).await.command, "version");
    // Freed slots serve requests again (once the listener has seen them close).
    drop(held);
    let mut text = String::new();
    for _ in 0..100 {
        if let Some(body) = try_get(metrics, "/metrics").await {
            text = body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(text.lines().any(|l| l == "bip324_proxy_sessions_active 1"), "{text}");
    assert!(text.contains("bip324_proxy_connections_refused_total{reason=\"metrics_limit\"}"), "{text}");
}

#[tokio::test]
async fn idle_and_slow_metrics_connections_are_closed_after_the_timeout() {
    let (_proxy, metrics) = proxy_with_metrics("[metrics]\nrequest_timeout = 1\n", &[]).await;
    // Sends nothing at all.
    let mut silent = TcpStream::connect(metrics).await.unwrap();
    // Sends half a request line and stops (slowloris).
    let mut slow = TcpStream::connect(metrics).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // A finished keep-alive request, then idle.
    let mut keep_alive = TcpStream::connect(metrics).await.unwrap();
    keep_alive.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    keep_alive.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    for (name, stream) in [("silent", &mut silent), ("slow", &mut slow), ("keep-alive", &mut keep_alive)] {
        assert!(closed_by_server(stream).await, "{name} connection still open after {WAIT:?}");
    }
}

#[tokio::test]
async fn metrics_answer_during_the_drain_and_a_second_sigterm_exits_143() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let (mut proxy, metrics) = proxy_with_metrics("[timeouts]\nshutdown = 600\n", &[]).await;
    let mut session = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    expect_frame(&mut session).await;
    signal(&proxy, "TERM");
    proxy.wait_for(&["draining sessions"]).await;
    let (code, body) = http_get(metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.lines().any(|l| l == "bip324_proxy_sessions_active 1"), "{body}");
    let (code, _) = http_get(metrics, "/status").await;
    assert_eq!(code, 200);
    signal(&proxy, "TERM");
    let status = tokio::time::timeout(WAIT, proxy.child.wait()).await.expect("exits at once").unwrap();
    assert_eq!(status.code(), Some(143));
}

#[tokio::test]
async fn a_second_sigint_exits_130() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let (mut proxy, _metrics) = proxy_with_metrics("[timeouts]\nshutdown = 600\n", &[]).await;
    let mut session = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    expect_frame(&mut session).await;
    signal(&proxy, "INT");
    proxy.wait_for(&["draining sessions"]).await;
    signal(&proxy, "INT");
    let status = tokio::time::timeout(WAIT, proxy.child.wait()).await.expect("exits at once").unwrap();
    assert_eq!(status.code(), Some(130));
}
