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

/// B, the v1-only node with `BLOCKS` blocks, behind an inbound listener of
/// its own binary process. Dropping `b` stops B: a test keeps it to the end.
struct Source {
    b: Bcoin,
    tip: String,
    listener: BinaryProxy,
    /// The inbound listener's address: what peers of B connect to.
    listen: String,
    /// From B's start to its READY line (mining included).
    mined: Duration,
}

/// Starts B, then the listener: with `--inbound` (the flag, `v1` left at its
/// default) when `v1` is `None`, or an `[[inbound]]` section with that `v1`.
async fn source_behind_listener(v1: Option<&str>) -> Source {
    let started = Instant::now();
    let mut b = Bcoin::spawn("B", &[format!("--blocks={BLOCKS}")]).await;
    let ready = b.wait_line(Duration::from_secs(60), |l| l.starts_with("READY")).await;
    assert_eq!(field(&ready, "height"), BLOCKS.to_string());
    let tip = field(&ready, "tip").to_owned();
    let node = format!("127.0.0.1:{}", field(&ready, "port"));
    let mined = started.elapsed();

    let config =
        std::env::temp_dir().join(format!("bip324-bcoin-{}-{}.toml", std::process::id(), rand::random::<u64>()));
    let spec = format!("127.0.0.1:0={node}@regtest");
    let args = match v1 {
        None => vec!["--inbound".to_owned(), spec],
        Some(v1) => {
            let toml = format!(
                "[[inbound]]\nlisten = \"127.0.0.1:0\"\nnode = \"{node}\"\nnetwork = \"regtest\"\nv1 = \"{v1}\"\n"
            );
            std::fs::write(&config, toml).unwrap();
            vec!["--config".to_owned(), config.display().to_string()]
        }
    };
    let mut listener = spawn_binary(&args.iter().map(String::as_str).collect::<Vec<_>>(), "info").await;
    let _ = std::fs::remove_file(&config);
    let line = listener.wait_for(&["listening (inbound)"]).await;
    let listen = field(&line, "listen").to_owned();
    Source { b, tip, listener, listen, mined }
}

/// Whether a `PEER` line shows NODE_P2P_V2 among the peer's services.
fn advertises_v2(peer: &str) -> bool {
    let services = u64::from_str_radix(field(peer, "services").trim_start_matches("0x"), 16).unwrap();
    services & NODE_P2P_V2 != 0
}

#[tokio::test]
async fn bcoin_syncs_from_bcoin_through_outbound_proxy_and_inbound_listener() {
    let started = Instant::now();
    let Source { mut b, tip: b_tip, listener: mut inbound, listen: inbound_addr, mined } =
        source_behind_listener(None).await;

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
    assert!(advertises_v2(&peer), "B's VERSION as A sees it: {peer}");

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

#[tokio::test]
async fn bcoin_v1_peer_syncs_through_the_inbound_listener_relay() {
    let Source { b: _b, tip: b_tip, listener: mut inbound, listen: inbound_addr, .. } =
        source_behind_listener(None).await;

    // A speaks plain v1 straight to the listener (no proxy of ours before it).
    let mut a = Bcoin::spawn("A", &[format!("--only={inbound_addr}")]).await;
    let peer = a.wait_line(SYNC_DEADLINE, |l| l.starts_with("PEER")).await;
    assert!(advertises_v2(&peer), "B's VERSION as a v1 peer sees it: {peer}");
    let tip = format!("hash={b_tip}");
    a.wait_line(SYNC_DEADLINE, |l| l.starts_with("TIP") && l.contains(&tip)).await;

    let in_line = inbound.wait_for(&["inbound session open", "transport=v1"]).await;
    assert!(!in_line.contains("session_id="), "{in_line}");
}

#[tokio::test]
async fn bcoin_v1_peer_is_refused_when_the_listener_refuses_v1() {
    let Source { mut b, listener: mut inbound, listen: inbound_addr, .. } =
        source_behind_listener(Some("refuse")).await;

    let mut a = Bcoin::spawn("A", &[format!("--only={inbound_addr}")]).await;
    inbound.wait_for(&["inbound session closed", "refuses v1 peers"]).await;
    // Neither node completed a handshake with the other: no PEER line by now,
    // nor within a second more (A retries; every retry is refused the same way).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (node, name) in [(&mut a, "A"), (&mut b, "B")] {
        while let Ok(line) = node.lines.try_recv() {
            assert!(!line.starts_with("PEER") && !line.starts_with("TIP"), "bcoin {name}: {line}");
        }
    }
    assert!(inbound.seen.iter().all(|l| !l.contains("inbound session open")), "{}", inbound.seen.join("\n"));
}
