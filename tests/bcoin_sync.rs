//! The end-to-end proof with real nodes: two bcoin 1.0.2 full nodes (v1-only)
//! sync a regtest chain through the whole chain of ours,
//!
//! bcoin A (SOCKS5 client) -> our proxy (SOCKS5, v1 -> v2) -> BIP324 ->
//! our inbound listener (v2 -> v1) -> bcoin B (the one with the blocks),
//!
//! each proxy being its own process of the real binary. The nodes run from
//! `tests/bcoin/node.js` (bcoin installed by `./test.sh` from
//! `tests/bcoin/package.json`), chain in memory, on loopback only; the test
//! reads their machine-readable stdout lines.

mod common;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// Blocks B mines before A connects.
const BLOCKS: u32 = 300;
/// Upper bound for the whole sync once A has started.
const SYNC_DEADLINE: Duration = Duration::from_secs(120);
const NODE_P2P_V2: u64 = 1 << 11;

/// One bcoin node process, with its stdout lines.
struct Bcoin {
    _child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: VecDeque<String>,
    name: &'static str,
}

impl Bcoin {
    async fn spawn(name: &'static str, args: &[String]) -> Bcoin {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/bcoin");
        assert!(
            dir.join("node_modules/bcoin/package.json").is_file(),
            "bcoin is not installed in {}; run `./test.sh`, which installs it with npm from \
             tests/bcoin/package.json and runs the whole suite",
            dir.display()
        );
        let mut child = tokio::process::Command::new(programs::installed("node"))
            .arg(dir.join("node.js"))
            .args(args)
            .current_dir(&dir)
            .env("NODE_BACKEND", "js")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Bcoin { _child: child, lines, seen: VecDeque::new(), name }
    }

    /// Waits up to `deadline` for a line for which `wanted` holds; fails on
    /// an `ERROR` line, on exit, or at the deadline, showing the last lines.
    async fn wait_line(&mut self, deadline: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let found = tokio::time::timeout(deadline, async {
            while let Some(line) = self.lines.recv().await {
                if self.seen.len() == 20 {
                    self.seen.pop_front();
                }
                self.seen.push_back(line.clone());
                if line.starts_with("ERROR") {
                    return None;
                }
                if wanted(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "bcoin {}: no expected line within {deadline:?}; last lines:\n{}",
                self.name,
                Vec::from(self.seen.clone()).join("\n")
            ),
        }
    }
}

/// The first value of `key=` in a line of `key=value` fields (a log line's
/// span fields end in `}:`, which is not part of the value).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(prefix.as_str()))
        .map(|value| value.trim_end_matches("}:"))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[tokio::test]
async fn bcoin_syncs_from_bcoin_through_outbound_proxy_and_inbound_listener() {
    let started = Instant::now();

    // B: the v1-only node with the blocks, behind our inbound listener.
    let mut b = Bcoin::spawn("B", &[format!("--blocks={BLOCKS}")]).await;
    let ready = b.wait_line(Duration::from_secs(60), |l| l.starts_with("READY")).await;
    let b_port = field(&ready, "port");
    let b_tip = field(&ready, "tip").to_owned();
    assert_eq!(field(&ready, "height"), BLOCKS.to_string());
    let mined = started.elapsed();

    let spec = format!("127.0.0.1:0=127.0.0.1:{b_port}@regtest");
    let mut inbound = spawn_binary(&["--inbound", &spec], "info").await;
    let line = inbound.wait_for(&["listening (inbound)"]).await;
    let inbound_addr = field(&line, "listen").to_owned();

    // A: empty chain, connects only to the inbound listener, through our proxy.
    let mut outbound = spawn_binary(&[], "info").await;
    let sync_started = Instant::now();
    let mut a = Bcoin::spawn("A", &[format!("--proxy={}", outbound.addr), format!("--only={inbound_addr}")]).await;
    let ready = a.wait_line(Duration::from_secs(60), |l| l.starts_with("READY")).await;
    assert_eq!(field(&ready, "height"), "0");

    // A's peer is the inbound listener, and B's VERSION reached A with
    // NODE_P2P_V2, set by the listener (bcoin itself knows nothing of v2).
    let peer = a.wait_line(SYNC_DEADLINE, |l| l.starts_with("PEER")).await;
    assert_eq!(field(&peer, "addr"), inbound_addr, "{peer}");
    assert_eq!(field(&peer, "outbound"), "true", "{peer}");
    let services = u64::from_str_radix(field(&peer, "services").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(services & NODE_P2P_V2, 0, "B's VERSION as A sees it: {peer}");

    // The sync: A's tip becomes B's tip.
    let tip = format!("hash={b_tip}");
    let last = a.wait_line(SYNC_DEADLINE, |l| l.starts_with("TIP") && l.contains(&tip)).await;
    assert_eq!(field(&last, "height"), BLOCKS.to_string());
    let synced = sync_started.elapsed();

    // Both hops were BIP324 v2, one session seen from its two ends.
    let target = format!("target={inbound_addr}");
    let out_line = outbound.wait_for(&["session open", "transport=v2", &target]).await;
    let session_id = field(&out_line, "session_id").to_owned();
    let in_line = inbound.wait_for(&["inbound session open", "transport=v2"]).await;
    assert_eq!(field(&in_line, "session_id"), session_id, "{in_line}");

    // B saw A as an inbound peer from the listener's own connection.
    let b_peer = b.wait_line(Duration::from_secs(5), |l| l.starts_with("PEER")).await;
    assert_eq!(field(&b_peer, "outbound"), "false", "{b_peer}");
    assert_eq!(field(&b_peer, "addr"), field(&in_line, "node_local"), "{b_peer}");

    eprintln!(
        "bcoin sync: {BLOCKS} blocks mined in {mined:?}, synced through the chain in {synced:?}, \
         {:?} in all",
        started.elapsed()
    );
}
