//! Operator features: metrics and the status page after a scripted set of
//! sessions, the probe command, the v1-only peer memory, completions.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tokio::io::AsyncWriteExt;

/// The binary with a metrics listener; returns it and the metrics address.
async fn proxy_with_metrics(args: &[&str]) -> (BinaryProxy, std::net::SocketAddr) {
    let mut all = vec!["--metrics-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut proxy = spawn_binary(&all, "info").await;
    let line = proxy.wait_for(&["metrics and status listening"]).await;
    let addr = line
        .split("listen=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("listen field")
        .parse()
        .expect("metrics address");
    (proxy, addr)
}

#[tokio::test]
async fn metrics_and_status_match_what_happened() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let v1 = spawn_v1_node(REGTEST).await;
    let (proxy, metrics) = proxy_with_metrics(&["--fallback", "v1"]).await;

    // An open v2 session shows on /status with the responder's session id.
    let mut v2_client = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    expect_frame(&mut v2_client).await;
    v2_client.write_all(&frame(REGTEST, "ping", &[1; 8])).await.unwrap();
    expect_frame(&mut v2_client).await;
    let (code, body) = http_get(metrics, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &status["sessions"][0];
    assert_eq!(row["transport"], "v2");
    assert_eq!(row["network"], "regtest");
    assert_eq!(row["target"], v2.addr.to_string());
    assert_eq!(row["session_id"], hex::encode(v2.log.session_ids.lock().unwrap()[0]));
    assert!(row["bytes_remote_to_client"].as_u64().unwrap() > 0);
    assert_eq!(status["v2_share"], 1.0);

    // A v1-fallback session and a refused target.
    let mut v1_client = open_v1_session(proxy.addr, v1.addr, REGTEST).await;
    expect_frame(&mut v1_client).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    assert_eq!(socks_btcd(proxy.addr, closed_addr).await.err(), Some(0x05));
    let (_, body) = http_get(metrics, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["open_sessions"], 2);
    assert_eq!(status["v2_share"], 0.5);

    drop(v2_client);
    drop(v1_client);
    let text = wait_for_metric(metrics, "bip324_proxy_sessions_active 0").await;
    for line in [
        "bip324_proxy_sessions_opened_total{transport=\"v2\"} 1",
        "bip324_proxy_sessions_opened_total{transport=\"v1-fallback\"} 1",
        "bip324_proxy_sessions_closed_total{transport=\"v2\",reason=\"closed\"} 1",
        "bip324_proxy_sessions_closed_total{transport=\"v1-fallback\",reason=\"closed\"} 1",
        "bip324_proxy_sessions_closed_total{transport=\"none\",reason=\"dial_failed\"} 1",
        "bip324_proxy_socks_replies_total{code=\"0x00\"} 2",
        "bip324_proxy_socks_replies_total{code=\"0x05\"} 1",
        "bip324_proxy_upgrade_failures_total{reason=\"no_response\"} 1",
        "bip324_proxy_messages_total{direction=\"client_to_remote\"} 3",
        "bip324_proxy_handshake_duration_seconds_count 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
    let (code, page) = http_get(metrics, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("<table") && page.contains("fetch(\"status\""));
}

#[tokio::test]
async fn metrics_listener_honours_the_allow_list() {
    // A refused client is closed at accept: no HTTP response at all.
    let (_proxy, metrics) = proxy_with_metrics(&["--allow", "10.0.0.0/8"]).await;
    let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut response = Vec::new();
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut s, &mut response)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}: {}", String::from_utf8_lossy(&response));
}

#[tokio::test]
async fn probe_tells_v2_v1_and_unreachable_apart() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let v1 = spawn_v1_node(REGTEST).await;
    let (status, out) = run_binary_stdout(&["probe", &v2.addr.to_string(), "--network", "regtest"]).await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("speaks v2"), "{out}");
    // The node records the session id after its last write; the probe may exit first.
    let mut session_id = None;
    for _ in 0..200 {
        session_id = v2.log.session_ids.lock().unwrap().first().copied();
        if session_id.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(out.contains(&hex::encode(session_id.expect("the node finished its handshake"))), "{out}");
    // Confirming v1 takes a plaintext VERSION: only where the policy allows plaintext.
    let (status, out) =
        run_binary_stdout(&["--fallback", "v1", "probe", &v1.addr.to_string(), "--network", "regtest"]).await;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("speaks v1 only"), "{out}");
    let (status, out) = run_binary_stdout(&["probe", &v1.addr.to_string(), "--network", "regtest"]).await;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("does not speak v2") && out.contains("v1 not tried"), "{out}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (status, out) = run_binary_stdout(&["probe", &addr]).await;
    assert_eq!(status.code(), Some(2), "{out}");
}

#[tokio::test]
async fn probe_goes_through_the_upstream() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let upstream = spawn_recording_upstream(UpstreamBehaviour::default()).await;
    let (status, out) = run_binary_stdout(&[
        "--upstream",
        &upstream.addr.to_string(),
        "probe",
        &v2.addr.to_string(),
        "--network",
        "regtest",
    ])
    .await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert_eq!(upstream.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn remembered_v1_only_target_is_refused_without_dialing() {
    let v1 = spawn_v1_node(REGTEST).await;
    let (proxy, metrics) = proxy_with_metrics(&[]).await;
    let mut first = open_v1_session(proxy.addr, v1.addr, REGTEST).await;
    expect_closed(&mut first).await;
    assert_eq!(v1.log.accepts.load(Ordering::SeqCst), 1);
    // The second attempt gets "not allowed" at the SOCKS stage: no TCP to the remote.
    assert_eq!(socks_core(proxy.addr, "127.0.0.1", v1.addr.port()).await.err(), Some(0x02));
    assert_eq!(v1.log.accepts.load(Ordering::SeqCst), 1);
    wait_for_metric(metrics, "bip324_proxy_v1_only_memory_total{action=\"refused\"} 1").await;
}

#[tokio::test]
async fn remembered_v1_only_target_goes_straight_to_v1_under_fallback_v1() {
    let v1 = spawn_v1_node(REGTEST).await;
    let proxy = spawn_proxy(&["--fallback", "v1"]).await;
    let mut first = open_v1_session(proxy.addr, v1.addr, REGTEST).await;
    expect_frame(&mut first).await;
    assert_eq!(v1.log.accepts.load(Ordering::SeqCst), 2, "handshake attempt + v1 redial");
    let mut second = open_v1_session(proxy.addr, v1.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut second).await.command, "version");
    assert_eq!(v1.log.accepts.load(Ordering::SeqCst), 3, "no wasted handshake the second time");
}

#[tokio::test]
async fn v1_only_memory_can_be_switched_off() {
    let v1 = spawn_v1_node(REGTEST).await;
    let proxy = spawn_proxy_with_file("[v1_only_memory]\ncapacity = 0\n", &[]).await;
    for _ in 0..2 {
        let mut client = open_v1_session(proxy.addr, v1.addr, REGTEST).await;
        expect_closed(&mut client).await;
    }
    assert_eq!(v1.log.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn version_and_completions() {
    let (status, out) = run_binary_stdout(&["--version"]).await;
    assert!(status.success());
    assert!(out.starts_with("bip324-proxy "), "{out}");
    for shell in ["bash", "zsh", "fish"] {
        let (status, out) = run_binary_stdout(&["completions", shell]).await;
        assert!(status.success(), "{shell}");
        assert!(out.contains("bip324-proxy") && out.contains("probe"), "{shell}: {out}");
    }
}

#[test]
fn systemd_unit_is_hardened_and_runs_the_shipped_config() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/bip324-proxy.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| l.split_once('=').expect("key=value"))
        .collect();
    let get = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    assert_eq!(get("DynamicUser"), Some("yes"));
    assert_eq!(get("NoNewPrivileges"), Some("yes"));
    assert_eq!(get("RestrictAddressFamilies"), Some("AF_INET AF_INET6 AF_UNIX"));
    assert_eq!(get("ProtectSystem"), Some("strict"));
    assert_eq!(get("CapabilityBoundingSet"), Some(""));
    assert!(get("ExecStart").unwrap().contains("--config /etc/bip324-proxy/bip324-proxy.toml"));
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(unit.contains(section), "{section}");
    }
}

/// The value of a metric line (`name{labels} value`) in a scrape.
fn metric_value(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{text}"))
}

#[tokio::test]
async fn byte_and_message_totals_grow_while_a_session_is_open() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let (proxy, metrics) = proxy_with_metrics(&[]).await;
    let mut client = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let bytes_up = "bip324_proxy_bytes_total{direction=\"client_to_remote\"} ";
    let messages_down = "bip324_proxy_messages_total{direction=\"remote_to_client\"} ";
    let (_, first) = http_get(metrics, "/metrics").await;
    let (bytes_before, messages_before) = (metric_value(&first, bytes_up), metric_value(&first, messages_down));
    assert!(bytes_before > 0 && messages_before > 0, "{first}");
    for i in 0..10u8 {
        client.write_all(&frame(REGTEST, "ping", &[i; 8])).await.unwrap();
        expect_frame(&mut client).await;
    }
    let (_, second) = http_get(metrics, "/metrics").await;
    assert_eq!(metric_value(&second, bytes_up), bytes_before + 10 * 32, "{second}");
    assert_eq!(metric_value(&second, messages_down), messages_before + 10, "{second}");
    assert!(second.contains("bip324_proxy_sessions_active 1"), "the session is still open:\n{second}");
}
