//! Load and soak: 10,000 sessions in waves through one proxy, then open file
//! descriptors, live tasks and RSS must come back to where they started.
//! Bounded: a fixed number of waves, each with a deadline.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

const SESSIONS: usize = 10_000;
const WAVE: usize = 250;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Waits (bounded) until `measure` is back to at most `limit`.
async fn settles(measure: impl Fn() -> usize, limit: usize) -> usize {
    let mut now = measure();
    for _ in 0..200 {
        if now <= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = measure();
    }
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sessions_in_waves_leave_nothing_behind() {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    assert!(hard >= 4 * WAVE as u64 + 100, "fd limit {hard} too low for waves of {WAVE}");

    let node = spawn_v2_node(V2NodeOptions::default()).await;
    // Every client is 127.0.0.1: the per-client cap must not be what limits a
    // wave while the previous wave's sessions are still closing.
    let proxy = spawn_proxy(&["--max-sessions", "1024", "--max-sessions-per-client", "1024"]).await;
    // One session first, so lazily created state is in the baseline.
    still_works(proxy.addr, node.addr, 0).await;
    let (fds0, tasks0) = (settles(open_fds, 0).await, settles(alive_tasks, 0).await);
    let rss0 = rss_kib();

    let mut done = 0;
    while done < SESSIONS {
        let mut wave = Vec::with_capacity(WAVE);
        for i in 0..WAVE {
            let (proxy, node) = (proxy.addr, node.addr);
            wave.push(tokio::spawn(async move { still_works(proxy, node, (done + i) as u64).await }));
        }
        let results = tokio::time::timeout(Duration::from_secs(120), futures_join(wave)).await.expect("wave finishes");
        assert!(results.iter().all(|ok| *ok), "a session failed in the wave starting at {done}");
        done += WAVE;
    }

    let fds = settles(open_fds, fds0 + 2).await;
    let tasks = settles(alive_tasks, tasks0).await;
    let rss = rss_kib();
    eprintln!("{SESSIONS} sessions: fds {fds0} -> {fds}, live tasks {tasks0} -> {tasks}, RSS {rss0} KiB -> {rss} KiB");
    assert!(fds <= fds0 + 2, "open fds {fds0} -> {fds}");
    assert!(tasks <= tasks0, "live tasks {tasks0} -> {tasks}");
    // Allocator slack after 10,000 sessions, not growth per session.
    assert!(rss <= rss0 + 32 * 1024, "RSS {rss0} KiB -> {rss} KiB");
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard);
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<bool>>) -> Vec<bool> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.unwrap_or(false));
    }
    results
}

/// One full session: SOCKS5, handshake, VERSION and a ping echoed, close.
async fn still_works(proxy: std::net::SocketAddr, node: std::net::SocketAddr, n: u64) -> bool {
    let mut client = open_v1_session(proxy, node, REGTEST).await;
    if read_frame(&mut client).await.map(|f| f.command).ok().as_deref() != Some("version") {
        return false;
    }
    if client.write_all(&frame(REGTEST, "ping", &n.to_le_bytes())).await.is_err() {
        return false;
    }
    matches!(read_frame(&mut client).await, Ok(f) if f.payload == n.to_le_bytes())
}
