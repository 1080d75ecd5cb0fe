//! The promises of docs/SECURITY.md under attack, each in several spellings:
//! the downgrade race under `fallback = "none"`, the proxy dialing itself,
//! private targets for clients elsewhere, the v1 size limit from the remote,
//! SOCKS5 answers in the shape of each stage, and canonical target display.
//!
//! The client that is not on this host runs in a network namespace the test
//! creates (root is needed, as in CI), talking to the proxy over a veth pair.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bip324_proxy::config::{Cli, Config};
use bip324_proxy::server::Bound;
use bip324_proxy::session::FrontEnd;
use bip324_proxy::state::ProxyState;
use clap::Parser;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Sends raw bytes and returns everything the proxy answers before it closes.
async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await.expect("proxy closes").unwrap_or_default();
    answer
}

/// A SOCKS5 CONNECT (no auth) with DOMAINNAME `host`; the reply code.
async fn connect_by_name(proxy: SocketAddr, host: &str, port: u16) -> u8 {
    match socks_named(proxy, "x", host, port, false).await {
        Ok(_) => 0,
        Err(code) => code,
    }
}

#[tokio::test]
async fn fallback_none_stays_v2_only_when_another_session_learns_the_remote_is_v1_only() {
    let node = spawn_v1_node(REGTEST).await;
    let proxy = spawn_proxy(&[]).await;
    // Session A: dialed and answered, VERSION not sent yet.
    let mut early = socks_btcd(proxy.addr, node.addr).await.expect("A connects");
    // Session B: its upgrade fails against the v1-only node, which the proxy remembers.
    let mut b = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_closed(&mut b).await;
    // A's VERSION now: still v2 or nothing.
    early.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    expect_closed(&mut early).await;
    // A later session is refused before a dial.
    assert_eq!(socks_btcd(proxy.addr, node.addr).await.err(), Some(0x02));
    let received = node.log.received.lock().unwrap();
    assert!(received.iter().all(Vec::is_empty), "plaintext reached the v1 node: {received:?}");
}

#[tokio::test]
async fn probe_sends_no_plaintext_under_fallback_none() {
    let node = spawn_v1_node(REGTEST).await;
    let target = node.addr.to_string();
    let (status, stdout) = run_binary_stdout(&["probe", &target, "--network", "regtest"]).await;
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("v1 not tried"), "{stdout}");
    assert!(node.log.received.lock().unwrap().iter().all(Vec::is_empty));

    let (status, stdout) = run_binary_stdout(&["--fallback", "v1", "probe", &target, "--network", "regtest"]).await;
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("answered a v1 VERSION"), "{stdout}");
}

#[tokio::test]
async fn the_proxy_never_dials_itself_in_any_spelling() {
    let proxy = spawn_binary(&["--metrics-listen", "127.0.0.1:0"], "info").await;
    let mut proxy = proxy;
    let line = proxy.wait_for(&["metrics and status listening"]).await;
    let metrics: SocketAddr =
        line.split("listen=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    for port in [proxy.addr.port(), metrics.port()] {
        for host in ["localhost", "127.0.0.1", "127.1", "0.0.0.0", "0", "::", "[::]", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(connect_by_name(proxy.addr, host, port).await, 0x02, "{host}:{port}");
        }
        for target in [
            SocketAddr::new("127.0.0.1".parse().unwrap(), port),
            SocketAddr::new("0.0.0.0".parse().unwrap(), port),
            SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), port),
            SocketAddr::new("::".parse().unwrap(), port),
        ] {
            assert_eq!(socks_btcd(proxy.addr, target).await.err(), Some(0x02), "{target}");
        }
    }
    // Pipelined CONNECTs to itself build no chain: the first is refused and
    // the connection ends.
    let mut pipelined = Vec::new();
    for _ in 0..5 {
        pipelined.extend_from_slice(&[0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x03, 9]);
        pipelined.extend_from_slice(b"localhost");
        pipelined.extend_from_slice(&proxy.addr.port().to_be_bytes());
    }
    let answer = exchange(proxy.addr, &pipelined).await;
    assert_eq!(answer, [0x05, 0x00, 0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    let line = proxy.wait_for(&["session closed", "own listener"]).await;
    assert!(line.contains("stage=dial"), "{line}");
}

#[tokio::test]
async fn transparent_mode_never_dials_the_proxy_itself() {
    let mut proxy = spawn_binary(&["--allow-private-targets"], "info").await;
    for target in [proxy.addr, SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), proxy.addr.port())] {
        let mut client = open_transparent_session(proxy.addr, target, REGTEST).await;
        expect_closed(&mut client).await;
        let line = proxy.wait_for(&["session closed", "own listener"]).await;
        assert!(line.contains("stage=dial"), "{line}");
    }
}

#[tokio::test]
async fn socks_failures_are_answered_in_the_shape_of_their_stage() {
    let proxy = spawn_proxy(&[]).await;
    // Greeting with no methods, or a bad method count: method selection's `05 FF`.
    assert_eq!(exchange(proxy.addr, &[0x05, 0x00]).await, [0x05, 0xff]);
    assert_eq!(exchange(proxy.addr, &[0x05, 0x01, 0x80]).await, [0x05, 0xff]);
    // A bad RFC 1929 version: an authentication status, not a request reply.
    assert_eq!(exchange(proxy.addr, &[0x05, 0x01, 0x02, 0x05, 0x01, b'u', 0x01, b'p']).await, [0x05, 0x02, 0x01, 0x01]);
    // A bad request: a 10-byte reply.
    let empty_name = [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x03, 0x00, 0x20, 0x8d];
    assert_eq!(exchange(proxy.addr, &empty_name).await, [0x05, 0x00, 0x05, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    let bad_atyp = [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x09, 1, 2, 3, 4, 0x20, 0x8d];
    assert_eq!(exchange(proxy.addr, &bad_atyp).await, [0x05, 0x00, 0x05, 0x08, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    // Configured authentication with wrong credentials: `01 01`.
    let strict = spawn_proxy(&["--client-username", "alice", "--client-password", "secret"]).await;
    assert_eq!(
        exchange(strict.addr, &[0x05, 0x01, 0x02, 0x01, 0x01, b'u', 0x01, b'p']).await,
        [0x05, 0x02, 0x01, 0x01]
    );
    assert_eq!(exchange(strict.addr, &[0x05, 0x01, 0x00]).await, [0x05, 0xff]);
}

#[tokio::test]
async fn remote_messages_beyond_the_v1_limit_close_the_session() {
    // 4,000,012 payload bytes fit a v2 packet but no v1 frame.
    let node = spawn_v2_node(V2NodeOptions { flood: Some((1, 4_000_012)), ..Default::default() }).await;
    let proxy = spawn_binary(&[], "info").await;
    let mut proxy = proxy;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut answer)).await.expect("closed").unwrap_or_default();
    assert!(answer.is_empty(), "a frame reached the client: {} bytes", answer.len());
    let line = proxy.wait_for(&["session closed"]).await;
    assert!(line.contains("4000012") && line.contains("4000000"), "{line}");

    // At the limit the message is carried.
    let node = spawn_v2_node(V2NodeOptions { flood: Some((1, 4_000_000)), ..Default::default() }).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    let block = expect_frame(&mut client).await;
    assert_eq!((block.command.as_str(), block.payload.len()), ("block", 4_000_000));
}

#[tokio::test]
async fn bracketed_ipv6_names_are_shown_once_bracketed() {
    let node = spawn_v2_node_on("[::1]:0", V2NodeOptions::default()).await;
    let mut proxy = spawn_binary(&[], "info").await;
    let mut client = socks_named(proxy.addr, "x", "[::1]", node.addr.port(), false).await.expect("CONNECT");
    client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    expect_frame(&mut client).await;
    let line = proxy.wait_for(&["session open"]).await;
    assert!(line.contains(&format!("target=[::1]:{}", node.addr.port())), "{line}");
    assert!(!line.contains("[[") && !line.contains("]]"), "{line}");
}

// ---------------------------------------------------------------- clients elsewhere

/// A network namespace with a veth pair: the host side has `host_ip`, the
/// namespace `peer_ip`. Removed on drop.
struct Namespace {
    name: String,
    host_ip: String,
    peer_ip: String,
}

fn run(args: &[&str]) {
    let status = std::process::Command::new(args[0]).args(&args[1..]).status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "`{}` failed: this test needs root and iproute2 (the test entry point installs iproute2)",
        args.join(" ")
    );
}

impl Namespace {
    fn create() -> Namespace {
        // Several tests of this binary create one at once: each its own.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = (std::process::id() + n) % 200 + 20;
        let name = format!("b324sec{}-{n}", std::process::id());
        let (host_if, peer_if) = (format!("b324h{id}"), format!("b324p{id}"));
        let (host_ip, peer_ip) = (format!("10.253.{id}.1"), format!("10.253.{id}.2"));
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if]);
        run(&["ip", "link", "set", &peer_if, "netns", &name]);
        run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        run(&["ip", "link", "set", &host_if, "up"]);
        run(&["ip", "-n", &name, "addr", "add", &format!("{peer_ip}/30"), "dev", &peer_if]);
        run(&["ip", "-n", &name, "link", "set", &peer_if, "up"]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Namespace { name, host_ip, peer_ip }
    }

    /// A SOCKS5 CONNECT from inside the namespace to `host:port` by name; the reply code.
    fn socks_connect(&self, proxy: SocketAddr, host: &str, port: u16) -> u8 {
        let script = format!(
            "import socket\n\
             s = socket.create_connection(('{}', {}), timeout=20)\n\
             s.sendall(b'\\x05\\x01\\x00')\n\
             assert s.recv(2) == b'\\x05\\x00'\n\
             name = b'{host}'\n\
             s.sendall(b'\\x05\\x01\\x00\\x03' + bytes([len(name)]) + name + ({port}).to_bytes(2, 'big'))\n\
             reply = s.recv(10)\n\
             print(reply[1])\n",
            proxy.ip(),
            proxy.port()
        );
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", &script])
            .output()
            .expect("python3 runs in the namespace");
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim().parse().unwrap_or_else(|_| panic!("{text} {}", String::from_utf8_lossy(&output.stderr)))
    }
}

impl Namespace {
    /// From inside the namespace: connects to `addr`, sends `bytes`, and
    /// reads until the proxy closes. Returns how many bytes came back, or
    /// `timeout` after them when the connection stayed open for 20 s.
    fn send_and_read(&self, addr: SocketAddr, bytes: &[u8]) -> String {
        let script = format!(
            "import socket\n\
             s = socket.create_connection(('{}', {}), timeout=20)\n\
             s.sendall(bytes.fromhex('{}'))\n\
             n = 0\n\
             try:\n\
             \x20   while True:\n\
             \x20       d = s.recv(65536)\n\
             \x20       if not d: break\n\
             \x20       n += len(d)\n\
             except socket.timeout:\n\
             \x20   print('timeout', end=' ')\n\
             except ConnectionResetError:\n\
             \x20   pass\n\
             print(n)\n",
            addr.ip(),
            addr.port(),
            hex::encode(bytes)
        );
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", &script])
            .output()
            .expect("python3 runs in the namespace");
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(!text.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
        text
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The proxy's library entry on `listen`, with `allow` as its allow-list.
async fn proxy_on(listen: &str, args: &[&str]) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut all = vec!["bip324-proxy", "--listen", listen];
    all.extend_from_slice(args);
    let config = Arc::new(Config::load(&Cli::try_parse_from(all).unwrap()).unwrap());
    let shutdown = CancellationToken::new();
    let context = Arc::new(ProxyState::new(config, Default::default()));
    tokio::spawn(bip324_proxy::server::serve(
        vec![Bound { listener: listener.into(), front: FrontEnd::Main }],
        context,
        shutdown.clone(),
    ));
    (addr, shutdown)
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_elsewhere_reach_no_loopback_or_private_target() {
    let ns = Namespace::create();
    // Services on the proxy host: a v2 node on loopback and one on the host's veth address.
    let loopback_node = spawn_v2_node(V2NodeOptions::default()).await;
    let host_node = spawn_v2_node_on(&format!("{}:0", ns.host_ip), V2NodeOptions::default()).await;
    let allow = format!("{}/32", ns.peer_ip);
    let (proxy, _stop) = proxy_on(&format!("{}:0", ns.host_ip), &["--allow", &allow]).await;

    let targets: [(&str, u16); 6] = [
        ("127.0.0.1", loopback_node.addr.port()),
        ("localhost", loopback_node.addr.port()),
        ("127.0.0.2", loopback_node.addr.port()),
        ("::ffff:127.0.0.1", loopback_node.addr.port()),
        ("0.0.0.0", loopback_node.addr.port()),
        (ns.host_ip.clone().leak(), host_node.addr.port()),
    ];
    let ns = Arc::new(ns);
    for (host, port) in targets {
        let (ns, host_owned) = (ns.clone(), host.to_owned());
        let code = tokio::task::spawn_blocking(move || ns.socks_connect(proxy, &host_owned, port)).await.unwrap();
        assert_eq!(code, 0x02, "{host}:{port} from a client elsewhere");
    }
    assert_eq!(loopback_node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(host_node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 0);

    // With allow_private_targets the operator opts in.
    let (open_proxy, _stop) =
        proxy_on(&format!("{}:0", ns.host_ip), &["--allow", &allow, "--allow-private-targets"]).await;
    let port = host_node.addr.port();
    let (ns2, host) = (ns.clone(), ns.host_ip.clone());
    let code = tokio::task::spawn_blocking(move || ns2.socks_connect(open_proxy, &host, port)).await.unwrap();
    assert_eq!(code, 0x00);
}

#[tokio::test]
async fn client_first_binary_protocols_are_not_tunnelled() {
    // A plain TCP service that records whatever reaches it, per connection.
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    let received: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = service.accept().await {
            let sink = sink.clone();
            let connection = {
                let mut all = sink.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    sink.lock().unwrap()[connection].extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let mut postgres = vec![0, 0, 0, 0x54, 0, 3, 0, 0];
    postgres
        .extend_from_slice(b"user\0postgres\0database\0postgres\0application_name\0psql\0client_encoding\0UTF8\0\0");
    let mut samples = vec![postgres, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()];
    let mut tls = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    tls.extend(random_payload(200));
    samples.push(tls);
    // With the key sent early the service gets our BIP324 first flight (key
    // and random garbage, as a v1 client's VERSION would have earned it),
    // never a byte of the client's; with it held, nothing at all.
    for early_key in ["always", "never"] {
        let proxy = spawn_proxy(&["--early-key", early_key]).await;
        received.lock().unwrap().clear();
        for sample in &samples {
            let mut client = socks_btcd(proxy.addr, service_addr).await.expect("CONNECT");
            client.write_all(sample).await.unwrap();
            expect_closed(&mut client).await;
        }
        let received = received.lock().unwrap();
        for (connection, sample) in received.iter().zip(&samples) {
            if early_key == "never" {
                assert!(connection.is_empty(), "bytes reached the service");
            } else {
                assert!(connection.len() <= 64 + 4095, "more than our first flight: {} bytes", connection.len());
                assert!(
                    !connection.windows(8).any(|w| sample.windows(8).any(|s| s == w)),
                    "client bytes were tunnelled"
                );
            }
        }
        proxy.shutdown.cancel();
    }
}

/// `[client_auth]` protects SOCKS5 only: transparent mode and static routes
/// cannot ask for credentials. Off loopback with credentials alone the binary
/// refuses to start; and a listener bound off loopback behind the
/// configuration's back still serves a client elsewhere nothing at all (each
/// session asks `policy::admits` again), while a client on this host is served.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_do_not_stand_for_an_allow_list_where_no_front_end_asks_for_them() {
    let auth = ["--client-username", "alice", "--client-password", "secret"];
    for (toml, key) in [
        ("listen = \"0.0.0.0:0\"\n", "listen: 0.0.0.0:0"),
        (
            "transparent = false\n[[route]]\nlisten = \"0.0.0.0:0\"\ntarget = \"127.0.0.1:18444\"\n",
            "route[0].listen: 0.0.0.0:0",
        ),
        ("transparent_listen = \"0.0.0.0:0\"\n", "transparent_listen: 0.0.0.0:0"),
    ] {
        let path = std::env::temp_dir().join(format!("bip324-proxy-auth-{}-{}.toml", std::process::id(), key.len()));
        std::fs::write(&path, toml).unwrap();
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(&auth);
        let (status, log) = run_binary(&args).await;
        let _ = std::fs::remove_file(&path);
        assert!(!status.success(), "{toml}: started with credentials as its only restriction");
        assert!(log.contains(key) && log.contains("allow = [...]"), "{toml}: {log}");
    }

    let ns = Namespace::create();
    let loopback_node = spawn_v2_node(V2NodeOptions::default()).await;
    let host_node = spawn_v2_node_on(&format!("{}:0", ns.host_ip), V2NodeOptions::default()).await;
    let mut args = vec!["bip324-proxy", "--listen", "127.0.0.1:0", "--network", "regtest", "--allow-private-targets"];
    args.extend_from_slice(&auth);
    let config = Arc::new(Config::load(&Cli::try_parse_from(args).unwrap()).unwrap());
    let route = bip324_proxy::socks5::Target::from(loopback_node.addr);
    let mut bound = Vec::new();
    let mut addrs = Vec::new();
    for (ip, front) in [
        (ns.host_ip.as_str(), FrontEnd::Main),
        (ns.host_ip.as_str(), FrontEnd::Transparent),
        (ns.host_ip.as_str(), FrontEnd::Route(route.clone())),
        ("127.0.0.1", FrontEnd::Route(route)),
    ] {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        bound.push(Bound { listener: listener.into(), front });
    }
    let shutdown = CancellationToken::new();
    let state = Arc::new(ProxyState::new(config, Default::default()));
    tokio::spawn(bip324_proxy::server::serve(bound, state, shutdown.clone()));

    let ns = Arc::new(ns);
    let to_host_node = version_message(REGTEST, host_node.addr);
    for (addr, what) in [(addrs[0], "main port, transparent"), (addrs[1], "transparent_listen"), (addrs[2], "route")] {
        let (ns, bytes) = (ns.clone(), to_host_node.clone());
        let answer = tokio::task::spawn_blocking(move || ns.send_and_read(addr, &bytes)).await.unwrap();
        assert_eq!(answer, "0", "{what}: a client elsewhere without credentials was served");
    }
    assert_eq!(host_node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(loopback_node.log.accepts.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A client on this host uses the same route.
    let mut local = TcpStream::connect(addrs[3]).await.unwrap();
    local.write_all(&version_message(REGTEST, loopback_node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut local).await.command, "version");
    shutdown.cancel();
}

/// Resident set size of a process, in bytes.
fn rss_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
}

/// A v1 header for `command` announcing `len` payload bytes.
fn header_announcing(command: &str, len: u32) -> Vec<u8> {
    let mut header = REGTEST.to_vec();
    let mut name = [0u8; 12];
    name[..command.len()].copy_from_slice(command.as_bytes());
    header.extend_from_slice(&name);
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&[0; 4]);
    header
}

/// A first message is a VERSION, and a VERSION is small: every place that
/// awaits one (after a SOCKS5 reply, transparent mode, an inbound v1 peer)
/// refuses a header announcing more than 4,096 payload bytes at once,
/// before buffering any of it. Forty sessions that each announce 4,000,000
/// bytes and send one megabyte of them are closed with that reason, and the
/// proxy's memory does not grow with them.
#[tokio::test]
async fn first_messages_are_held_to_the_version_limit_before_anything_is_buffered() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let inbound_spec = format!("127.0.0.1:0={}@regtest", node.addr);
    let mut proxy = spawn_binary(&["--network", "regtest", "--inbound", &inbound_spec], "info").await;
    let line = proxy.wait_for(&["listening (inbound)"]).await;
    let inbound: SocketAddr =
        line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().parse().unwrap();
    let pid = proxy.child.id().unwrap();
    let before = rss_of(pid);

    let mut first = header_announcing("version", 4_000_000);
    first.extend_from_slice(&vec![0x01; 1_000_000]);
    let mut held = Vec::new();
    for i in 0..40 {
        let mut client = match i % 3 {
            0 => socks_btcd(proxy.addr, node.addr).await.expect("CONNECT"),
            1 => TcpStream::connect(proxy.addr).await.unwrap(),
            _ => TcpStream::connect(inbound).await.unwrap(),
        };
        // The proxy may close before all of it is written.
        let _ = client.write_all(&first).await;
        held.push(client);
    }
    for client in &mut held {
        expect_closed(client).await;
    }
    let refusals = [
        ("session closed", "client's first message: payload of 4000000 bytes exceeds the 4096 byte limit"),
        ("inbound session closed", "peer's v1 VERSION: payload of 4000000 bytes exceeds the 4096 byte limit"),
    ];
    let mut counts = [0usize; 2];
    while counts[0] + counts[1] < 40 {
        let line = proxy.wait_for(&["closed"]).await;
        let kind = refusals.iter().position(|(what, why)| line.contains(what) && line.contains(why));
        let kind = kind.unwrap_or_else(|| panic!("closed for another reason: {line}"));
        counts[kind] += 1;
    }
    assert_eq!(counts, [27, 13], "SOCKS5 and transparent sessions, inbound peers");
    let grown = rss_of(pid).saturating_sub(before);
    assert!(grown < 16 * 1024 * 1024, "proxy RSS grew by {} KiB", grown / 1024);
    // One dial per SOCKS5 CONNECT (the node may count its last accepts late),
    // none for the transparent sessions.
    let accepts = || node.log.accepts.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        if accepts() >= 14 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(accepts(), 14, "one dial per SOCKS5 CONNECT only");

    // The limit leaves a real VERSION alone.
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
}

/// Names that go to an upstream unresolved are checked as far as they can be
/// without DNS: numeric IPv4 spellings as `inet_aton` reads them and loopback
/// names (`localhost`, `*.localhost`) as loopback. So the proxy never reaches
/// itself through the upstream (each such session would come back from the
/// upstream's address as a new client, a chain that escapes the per-client
/// cap), and a client elsewhere reaches no loopback service through it; a
/// name only the upstream can resolve still goes there.
#[tokio::test(flavor = "multi_thread")]
async fn names_for_the_upstream_are_checked_as_the_addresses_they_spell() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut names = std::collections::HashMap::new();
    names.insert("node.example".to_owned(), node.addr);
    let upstream = spawn_recording_upstream(UpstreamBehaviour { names, ..Default::default() }).await;
    let proxy = spawn_binary(&["--upstream", &upstream.addr.to_string()], "info").await;
    let own = proxy.addr.port();
    for host in
        ["localhost", "LOCALHOST.", "proxy.localhost", "127.1", "0x7f000001", "2130706433", "017700000001", "0x7f.1"]
    {
        assert_eq!(connect_by_name(proxy.addr, host, own).await, 0x02, "{host}:{own}");
    }
    // Pipelined CONNECTs to itself by name build no chain either.
    let mut pipelined = Vec::new();
    for _ in 0..5 {
        pipelined.extend_from_slice(&[0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x03, 5]);
        pipelined.extend_from_slice(b"127.1");
        pipelined.extend_from_slice(&own.to_be_bytes());
    }
    assert_eq!(exchange(proxy.addr, &pipelined).await, [0x05, 0x00, 0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    assert!(upstream.requests.lock().unwrap().is_empty(), "a name for the proxy itself went upstream");
    // A local client may still reach loopback services through the upstream.
    let mut client = socks_named(proxy.addr, "x", "node.example", node.addr.port(), false).await.expect("CONNECT");
    client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "version");

    // A client elsewhere: loopback by any spelling is refused before the upstream.
    let ns = Arc::new(Namespace::create());
    let allow = format!("{}/32", ns.peer_ip);
    let upstream_arg = upstream.addr.to_string();
    let (remote_proxy, _stop) =
        proxy_on(&format!("{}:0", ns.host_ip), &["--allow", &allow, "--upstream", &upstream_arg]).await;
    let before = upstream.requests.lock().unwrap().len();
    for host in ["localhost", "127.1", "0x7f000001", "2130706433", "a.localhost", "10.1"] {
        let (ns, host_owned) = (ns.clone(), host.to_owned());
        let port = node.addr.port();
        let code =
            tokio::task::spawn_blocking(move || ns.socks_connect(remote_proxy, &host_owned, port)).await.unwrap();
        assert_eq!(code, 0x02, "{host} from a client elsewhere");
    }
    assert_eq!(upstream.requests.lock().unwrap().len(), before, "a loopback name went upstream for a client elsewhere");
    let (ns2, port) = (ns.clone(), node.addr.port());
    let code =
        tokio::task::spawn_blocking(move || ns2.socks_connect(remote_proxy, "node.example", port)).await.unwrap();
    assert_eq!(code, 0x00, "a name only the upstream can resolve");
    assert_eq!(upstream.requests.lock().unwrap().len(), before + 1);
}
