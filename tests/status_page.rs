//! The status page in a real browser: Debian's headless Chromium loads `/`,
//! runs its script against `/status`, and must show the open sessions. A
//! screenshot lands in the test's output directory.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::AsyncWriteExt;

fn chromium_command(chromium: &std::path::Path, user_data: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--window-size=1400,500",
        ])
        .arg(format!("--user-data-dir={}", user_data.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn status_page_renders_the_open_sessions_in_headless_chromium() {
    let chromium = programs::installed("chromium");
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let v1 = spawn_v1_node(REGTEST).await;
    let mut proxy = spawn_binary(&["--metrics-listen", "127.0.0.1:0", "--fallback", "v1"], "info").await;
    let line = proxy.wait_for(&["metrics and status listening"]).await;
    let metrics: std::net::SocketAddr =
        line.split("listen=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();

    let mut a = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    expect_frame(&mut a).await;
    let mut b = open_v1_session(proxy.addr, v2.addr, REGTEST).await;
    expect_frame(&mut b).await;
    let mut c = open_v1_session(proxy.addr, v1.addr, REGTEST).await;
    expect_frame(&mut c).await;
    a.write_all(&frame(REGTEST, "ping", &[1; 8])).await.unwrap();
    expect_frame(&mut a).await;

    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("status-page-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let url = format!("http://{metrics}/");

    let dom = chromium_command(&chromium, &out.join("profile-dom"))
        .arg("--dump-dom")
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output();
    let dom = tokio::time::timeout(std::time::Duration::from_secs(60), dom)
        .await
        .expect("chromium finishes")
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&dom.stdout);
    for id in v2.log.session_ids.lock().unwrap().iter() {
        assert!(dom.contains(&hex::encode(id)), "session id missing from the rendered page:\n{dom}");
    }
    assert!(dom.contains("v1-fallback"), "{dom}");
    assert!(dom.contains(">67 %<"), "two of three sessions are v2:\n{dom}");
    assert!(dom.contains(&v1.addr.to_string()), "{dom}");

    let png = out.join("status.png");
    let shot = chromium_command(&chromium, &out.join("profile-shot"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), shot).await.unwrap().unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", png.display());
}
