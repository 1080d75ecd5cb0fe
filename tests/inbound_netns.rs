//! `node_source = "peer"` in network namespaces that the test creates (root
//! needed, as in CI): a peer namespace and a proxy namespace joined by a
//! veth pair, the proxy namespace with the policy routing from the README.
//! The real binary serves the inbound listener there, the node is this test
//! binary re-run inside the proxy namespace (`netns_node_helper`), and the
//! peer is the binary's own `probe`, run in the peer namespace.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::programs;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const PEER_IP: &str = "10.213.0.2";
const PROXY_IP: &str = "10.213.0.1";
const NODE: &str = "127.0.0.1:18334";
const WAIT: Duration = Duration::from_secs(20);

/// Two namespaces and a veth pair between them; deleted on drop.
struct Namespaces {
    proxy: String,
    peer: String,
}

impl Namespaces {
    fn create(with_policy_routing: bool) -> Namespaces {
        let id = format!("{}-{:x}", std::process::id(), rand::random::<u16>());
        let ns = Namespaces { proxy: format!("b324x-{id}"), peer: format!("b324p-{id}") };
        let ip = |args: &[&str]| {
            let status = std::process::Command::new(programs::installed("ip")).args(args).status().unwrap();
            assert!(status.success(), "`ip {}` failed (this test needs root, as CI has)", args.join(" "));
        };
        ip(&["netns", "add", &ns.proxy]);
        ip(&["netns", "add", &ns.peer]);
        // Created inside the namespaces: nothing is added to the host's network.
        ip(&["link", "add", "b324x0", "netns", &ns.proxy, "type", "veth", "peer", "name", "b324p0", "netns", &ns.peer]);
        ip(&["-n", &ns.proxy, "addr", "add", &format!("{PROXY_IP}/24"), "dev", "b324x0"]);
        ip(&["-n", &ns.peer, "addr", "add", &format!("{PEER_IP}/24"), "dev", "b324p0"]);
        for (name, dev) in [(&ns.proxy, "b324x0"), (&ns.peer, "b324p0"), (&ns.proxy, "lo"), (&ns.peer, "lo")] {
            ip(&["-n", name, "link", "set", dev, "up"]);
        }
        if with_policy_routing {
            // The README's setup: the node's answers (from 127.0.0.1, sent
            // on lo) are delivered locally, to the proxy's transparent socket.
            ip(&["-n", &ns.proxy, "rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", "123"]);
            ip(&["-n", &ns.proxy, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "123"]);
        }
        ns
    }

    fn exec(&self, namespace: &str, program: &str) -> Command {
        let mut command = Command::new(programs::installed("ip"));
        command.args(["netns", "exec", namespace, program]).kill_on_drop(true).stdin(Stdio::null());
        command
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.proxy, &self.peer] {
            let _ = std::process::Command::new(programs::installed("ip")).args(["netns", "del", name]).status();
        }
    }
}

/// The node, when this binary is re-run with `BIP324_NETNS_NODE` set: it
/// accepts one connection on that address and prints who connected.
#[test]
#[ignore = "the node of `the_node_sees_the_peers_own_address`, run inside its namespace"]
fn netns_node_helper() {
    use std::io::Write;
    let Ok(listen) = std::env::var("BIP324_NETNS_NODE") else { return };
    let listener = std::net::TcpListener::bind(&listen).unwrap();
    println!("NODE_LISTENING");
    std::io::stdout().flush().unwrap();
    let (_stream, peer) = listener.accept().unwrap();
    println!("NODE_SAW {peer}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
}

type Lines<R> = tokio::io::Lines<BufReader<R>>;

/// The next output line that contains `needle`.
async fn line_with<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut Lines<R>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    let found = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        _ => panic!("no line with `{needle}`; so far:\n{}", seen.join("\n")),
    }
}

async fn run(with_policy_routing: bool) -> (Option<String>, String, Vec<String>) {
    let ns = Namespaces::create(with_policy_routing);
    let binary = env!("CARGO_BIN_EXE_bip324-proxy");

    let mut node = ns.exec(&ns.proxy, std::env::current_exe().unwrap().to_str().unwrap());
    node.args(["--exact", "netns_node_helper", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("BIP324_NETNS_NODE", NODE)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut node = node.spawn().unwrap();
    let mut node_lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    line_with(&mut node_lines, "NODE_LISTENING", &mut seen).await;

    let config =
        std::env::temp_dir().join(format!("bip324-netns-{}-{:x}.toml", std::process::id(), rand::random::<u32>()));
    std::fs::write(
        &config,
        format!(
            "[[inbound]]\nlisten = \"{PROXY_IP}:8333\"\nnode = \"{NODE}\"\nnetwork = \"regtest\"\nnode_source = \"peer\"\n"
        ),
    )
    .unwrap();
    let mut proxy = ns.exec(&ns.proxy, binary);
    proxy
        .args(["--listen", "127.0.0.1:0", "--config", config.to_str().unwrap(), "--connect-timeout", "2"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut proxy = proxy.spawn().unwrap();
    let mut proxy_lines = BufReader::new(proxy.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    line_with(&mut proxy_lines, "listening (inbound)", &mut log).await;
    let _ = std::fs::remove_file(&config);

    let probe = ns
        .exec(&ns.peer, binary)
        .args(["probe", &format!("{PROXY_IP}:8333"), "--network", "regtest"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output();
    let probe = tokio::time::timeout(WAIT, probe).await.unwrap().unwrap();
    let probe_out = String::from_utf8_lossy(&probe.stdout).into_owned();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(line)) = node_lines.next_line().await {
            if let Some(peer) = line.strip_prefix("NODE_SAW ") {
                return Some(peer.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    line_with(&mut proxy_lines, "inbound session closed", &mut log).await;
    (outcome, probe_out, log)
}

#[tokio::test]
async fn the_node_sees_the_peers_own_address() {
    let (node_saw, probe, log) = run(true).await;
    assert!(probe.contains("speaks v2"), "{probe}");
    let node_saw = node_saw.unwrap_or_else(|| panic!("the node saw no connection; proxy log:\n{}", log.join("\n")));
    assert!(node_saw.starts_with(&format!("{PEER_IP}:")), "the node saw {node_saw}");
    let open = log.iter().find(|l| l.contains("inbound session open")).expect("open line");
    assert!(open.contains(&format!("peer={PEER_IP}:")) && open.contains(&format!("node_local={node_saw}")), "{open}");
}

#[tokio::test]
async fn without_the_policy_routing_the_node_connection_fails_cleanly() {
    let (node_saw, _, log) = run(false).await;
    assert_eq!(node_saw, None, "the node's answer must not reach the proxy without the routing");
    let closed = log.iter().find(|l| l.contains("inbound session closed")).expect("close line");
    assert!(closed.contains(&format!("unreachable from the peer's address {PEER_IP}")), "{closed}");
}
