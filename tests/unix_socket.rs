//! Unix-socket listeners (`listen = "unix:/path"`), through the real binary:
//! SOCKS5 and transparent sessions over the socket (our own v1 client and
//! curl, which speaks SOCKS5 over a Unix socket as `socks5h://localhost/PATH`),
//! what is found at the path at start (stale socket, live socket, files that
//! are not sockets), mode and group, removal at shutdown, and how Unix clients
//! meet the allow-list and the per-client cap.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("bip324-unix-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir(&dir).unwrap();
        // Other users must be able to reach the socket inside (the denial test).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn listen_arg(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// The binary with a TCP listener on 127.0.0.1:0 and a Unix socket at
/// `path`; returns once both are listening.
async fn spawn_with_unix(path: &Path, args: &[&str]) -> BinaryProxy {
    let listen = listen_arg(path);
    let mut all = vec!["--listen", listen.as_str()];
    all.extend_from_slice(args);
    let mut proxy = spawn_binary(&all, "info").await;
    proxy.wait_for(&["listening", &format!("listen={listen} ")]).await;
    proxy
}

/// SOCKS5 CONNECT to an IPv4 target over a Unix socket, as a client with no
/// authentication does (RFC 1928).
async fn socks_connect_unix(path: &Path, target: SocketAddr) -> Result<UnixStream, u8> {
    let SocketAddr::V4(target) = target else { panic!("IPv4 target") };
    let mut s = UnixStream::connect(path).await.expect("connect to the socket");
    let choice = socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    assert_eq!(choice, [0x05, 0x00]);
    let mut request = vec![0x05, 0x01, 0x00, 0x01];
    request.extend_from_slice(&target.ip().octets());
    request.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&request).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    if reply[1] == 0 { Ok(s) } else { Err(reply[1]) }
}

/// VERSION out, the node's echo of it back.
async fn exchange_version(s: &mut UnixStream, node: SocketAddr) {
    let version = version_message(REGTEST, node);
    s.write_all(&version).await.unwrap();
    let echoed = expect_frame(s).await;
    assert_eq!(echoed.command, "version");
    assert_eq!(echoed.payload, version[24..]);
}

fn assert_socket_file(path: &Path) {
    let meta = std::fs::symlink_metadata(path).expect("socket file exists");
    assert!(meta.file_type().is_socket(), "{} is not a socket", path.display());
}

async fn wait_until_gone(path: &Path) {
    for _ in 0..200 {
        if std::fs::symlink_metadata(path).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} still exists", path.display());
}

async fn wait_exit(proxy: &mut BinaryProxy) -> std::process::ExitStatus {
    tokio::time::timeout(WAIT, proxy.child.wait()).await.expect("the proxy exits").unwrap()
}

// ---------------------------------------------------------------- sessions

#[tokio::test]
async fn socks5_over_a_unix_socket_upgrades_a_v1_client_to_bip324() {
    let dir = TempDir::new();
    let path = dir.path("socks.sock");
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    // No --allow-private-targets: a Unix client is local and may dial loopback.
    let mut proxy = spawn_with_unix(&path, &["--metrics-listen", "127.0.0.1:0"]).await;
    let line = proxy.wait_for(&["metrics and status listening"]).await;
    let metrics: SocketAddr =
        line.split("listen=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();

    let mut s = socks_connect_unix(&path, node.addr).await.expect("CONNECT succeeds");
    exchange_version(&mut s, node.addr).await;
    let ping = frame(REGTEST, "ping", &7u64.to_le_bytes());
    s.write_all(&ping).await.unwrap();
    assert_eq!(expect_frame(&mut s).await.command, "ping");
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1, "carried over BIP324");

    let open = proxy.wait_for(&["session open", "transport=v2"]).await;
    assert!(open.contains("client=unix:uid="), "{open}");
    // /status names the Unix client the same way.
    let (status, body) = http_get(metrics, "/status").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"client\":\"unix:uid="), "{body}");
    drop(s);
    proxy.wait_for(&["session closed", "transport=v2"]).await;
}

#[tokio::test]
async fn transparent_mode_over_a_unix_socket() {
    let dir = TempDir::new();
    let path = dir.path("t.sock");
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    // Transparent clients name targets in VERSION; loopback needs the flag, as over TCP.
    let mut proxy = spawn_with_unix(&path, &["--allow-private-targets"]).await;
    let mut s = UnixStream::connect(&path).await.unwrap();
    exchange_version(&mut s, node.addr).await;
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1);
    proxy.wait_for(&["session open", "transport=v2", "client=unix:"]).await;
}

/// An HTTP listener on loopback that records every byte it receives.
async fn recording_http_target() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn curl_speaks_socks5_over_the_unix_socket_and_its_plaintext_reaches_nothing() {
    let dir = TempDir::new();
    let path = dir.path("curl.sock");
    let (target, received) = recording_http_target().await;
    let mut proxy = spawn_with_unix(&path, &[]).await;
    let proxy_url = format!("socks5h://localhost{}", path.display());
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--proxy", &proxy_url])
        .arg(format!("http://{target}/"))
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(WAIT, output).await.expect("curl finishes").expect("curl is installed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "curl got an answer: {stderr}");
    // The SOCKS5 stage worked (the target was named and dialed); the sniff refused HTTP.
    let line = proxy.wait_for(&["session closed", "stage=sniff"]).await;
    assert!(line.contains("client=unix:") && line.contains(&format!("target={target}")), "{line}");
    assert!(line.contains("plaintext"), "{line}");
    // What reached the target is at most our BIP324 key and garbage (sent
    // right after the connect, early_key = "auto"), none of curl's request.
    let received = received.lock().unwrap();
    assert!(received.len() <= 64 + 4095, "the target received {} bytes", received.len());
    for needle in [&b"GET /"[..], b"HTTP/1.1", b"Host:"] {
        assert!(!received.windows(needle.len()).any(|w| w == needle), "curl's request reached the target");
    }
}

// ---------------------------------------------------------------- what is at the path

#[tokio::test]
async fn a_stale_socket_file_is_removed_and_bound() {
    let dir = TempDir::new();
    let path = dir.path("stale.sock");
    // A socket file whose listener is gone, as a killed proxy leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert_socket_file(&path);
    assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
    let proxy = spawn_with_unix(&path, &[]).await;
    // Bound (and the stale file replaced) before any listening line.
    assert!(proxy.seen.iter().any(|l| l.contains("removed a stale socket file")), "{:?}", proxy.seen);
    let mut s = UnixStream::connect(&path).await.expect("the new listener answers");
    let choice = socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    assert_eq!(choice, [0x05, 0x00]);
}

#[tokio::test]
async fn a_socket_someone_listens_on_refuses_the_start() {
    let dir = TempDir::new();
    let path = dir.path("live.sock");
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    let (status, log) = run_binary(&["--listen", &format!("127.0.0.1:0,{}", listen_arg(&path))]).await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("already in use"), "{log}");
    assert!(!log.contains("listening"), "no listener stays up: {log}");
    // The other listener's socket is untouched and still works.
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    live.accept().unwrap();
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_refuses_the_start_and_is_kept() {
    let dir = TempDir::new();
    let file = dir.path("regular");
    std::fs::write(&file, b"operator data").unwrap();
    let directory = dir.path("directory");
    std::fs::create_dir(&directory).unwrap();
    let fifo = dir.path("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A symlink is not followed, even to a stale socket.
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let link = dir.path("link.sock");
    std::os::unix::fs::symlink(&stale, &link).unwrap();
    let dangling = dir.path("dangling.sock");
    std::os::unix::fs::symlink(dir.path("nowhere"), &dangling).unwrap();

    for path in [&file, &directory, &fifo, &link, &dangling] {
        let (status, log) = run_binary(&["--listen", &listen_arg(path)]).await;
        assert!(!status.success(), "{}: {log}", path.display());
        assert!(log.contains("exists and is not a socket"), "{}: {log}", path.display());
        assert!(std::fs::symlink_metadata(path).is_ok(), "{} was removed", path.display());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"operator data");
    assert_socket_file(&stale);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

// ---------------------------------------------------------------- mode, group, shutdown

#[tokio::test]
async fn default_mode_is_0660_and_the_file_goes_at_shutdown() {
    let dir = TempDir::new();
    let path = dir.path("default.sock");
    let mut proxy = spawn_with_unix(&path, &[]).await;
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o660);
    proxy.terminate();
    assert!(wait_exit(&mut proxy).await.success());
    wait_until_gone(&path).await;
}

#[tokio::test]
async fn mode_and_group_by_name_and_by_id_are_applied() {
    let dir = TempDir::new();
    // `nogroup` (Debian) exists on the machines we test on; its id from /etc/group.
    let nogroup_gid: u32 = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("nogroup:x:").and_then(|rest| rest.split(':').next()?.parse().ok()))
        .expect("a nogroup group");
    for (mode, group, want_gid) in [("0640", "nogroup".to_owned(), nogroup_gid), ("600", "0".to_owned(), 0)] {
        let path = dir.path(&format!("g{want_gid}.sock"));
        let mut proxy = spawn_with_unix(&path, &["--unix-socket-mode", mode, "--unix-socket-group", &group]).await;
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, u32::from_str_radix(mode, 8).unwrap(), "{mode}");
        assert_eq!(meta.gid(), want_gid, "{group}");
        proxy.terminate();
        assert!(wait_exit(&mut proxy).await.success());
        wait_until_gone(&path).await;
    }
    let path = dir.path("none.sock");
    let (status, log) =
        run_binary(&["--listen", &listen_arg(&path), "--unix-socket-group", "no-such-group-here"]).await;
    assert!(!status.success());
    assert!(log.contains("no group named `no-such-group-here`"), "{log}");
    assert!(std::fs::symlink_metadata(&path).is_err(), "no socket file left behind");
}

/// Connects as `nobody` (gid nogroup): exit 0 connected, 13 permission denied.
fn connect_as_nobody(path: &Path) -> i32 {
    let script = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n";
    let status = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", script])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("setpriv runs");
    status.code().unwrap_or(-1)
}

fn running_as_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

#[tokio::test]
async fn the_socket_permissions_decide_which_local_users_connect() {
    // Never a silent skip: the suite runs as root (as CI does), like the
    // network-namespace tests.
    assert!(running_as_root(), "this test needs root to switch to the nobody user; run ./test.sh as root");
    let dir = TempDir::new();
    // Owner root, group root, 0660: nobody is refused by the kernel.
    let closed = dir.path("closed.sock");
    let _a = spawn_with_unix(&closed, &[]).await;
    assert_eq!(connect_as_nobody(&closed), 13);
    // Group nogroup, 0660: nobody is in it and gets in.
    let shared = dir.path("shared.sock");
    let _b = spawn_with_unix(&shared, &["--unix-socket-group", "nogroup"]).await;
    assert_eq!(connect_as_nobody(&shared), 0);
}

#[tokio::test]
async fn shutdown_keeps_a_file_that_replaced_the_socket() {
    let dir = TempDir::new();
    let path = dir.path("replaced.sock");
    let mut proxy = spawn_with_unix(&path, &[]).await;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"not ours").unwrap();
    proxy.terminate();
    assert!(wait_exit(&mut proxy).await.success());
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
}

// ---------------------------------------------------------------- who may use it

#[tokio::test]
async fn the_ip_allow_list_does_not_apply_to_unix_clients() {
    let dir = TempDir::new();
    let path = dir.path("allow.sock");
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut proxy = spawn_with_unix(&path, &["--allow", "10.0.0.0/8"]).await;
    // 127.0.0.1 is not in the list: closed at accept.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    expect_closed(&mut tcp).await;
    proxy.wait_for(&["not in the allow-list"]).await;
    // The Unix client passed the file's permissions and is served.
    let mut s = socks_connect_unix(&path, node.addr).await.expect("CONNECT succeeds");
    exchange_version(&mut s, node.addr).await;
}

#[tokio::test]
async fn unix_clients_of_one_user_share_one_per_client_cap() {
    let dir = TempDir::new();
    let path = dir.path("cap.sock");
    let mut proxy = spawn_with_unix(&path, &["--max-sessions-per-client", "2"]).await;
    // Two held sessions of this user (their SOCKS5 greetings never sent).
    let _one = UnixStream::connect(&path).await.unwrap();
    let _two = UnixStream::connect(&path).await.unwrap();
    let mut third = UnixStream::connect(&path).await.unwrap();
    expect_closed(&mut third).await;
    let line = proxy.wait_for(&["per-client session limit reached"]).await;
    assert!(line.contains("client=unix:uid="), "{line}");
    // A TCP client is another client with its own slots.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let choice = socks_greet(&mut tcp, &[0x05, 0x01, 0x00]).await;
    assert_eq!(choice, [0x05, 0x00]);
}

// ---------------------------------------------------------------- configuration paths

/// The binary with exactly these flags and environment (no `--listen` added);
/// returns once its log holds every needle, with the log so far.
async fn spawn_exact(args: &[&str], env: &[(&str, String)], needles: &[String]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bip324-proxy"));
    command.args(args).env("RUST_LOG", "info").env("NO_COLOR", "1");
    for (key, _) in std::env::vars() {
        if key.starts_with("BIP324_PROXY_") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child =
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let found = tokio::time::timeout(WAIT, async {
        while lines.read_line(&mut log).await.unwrap_or(0) > 0 {
            if needles.iter().all(|n| log.contains(n.as_str())) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(found.unwrap_or(false), "no {needles:?} in the log:\n{log}");
    (child, log)
}

#[tokio::test]
async fn listen_lists_from_the_environment_and_the_file_and_healthcheck_over_the_socket() {
    let dir = TempDir::new();
    let env_path = dir.path("env.sock");
    let env = [("BIP324_PROXY_LISTEN", format!("127.0.0.1:0,{}", listen_arg(&env_path)))];
    let (mut child, _) =
        spawn_exact(&[], &env, &["listen=127.0.0.1:".to_owned(), format!("listen={} ", listen_arg(&env_path))]).await;
    let (status, log) = run_binary(&["--listen", &listen_arg(&env_path), "healthcheck"]).await;
    assert!(status.success(), "{log}");
    child.kill().await.unwrap();

    let file_path = dir.path("file.sock");
    let config = dir.path("proxy.toml");
    std::fs::write(
        &config,
        format!("listen = [\"127.0.0.1:0\", \"{}\"]\nunix_socket_mode = \"0600\"\n", listen_arg(&file_path)),
    )
    .unwrap();
    let needle = format!("listen={} ", listen_arg(&file_path));
    let (_child, log) =
        spawn_exact(&["--config", config.to_str().unwrap()], &[], &["listen=127.0.0.1:".to_owned(), needle]).await;
    assert!(log.contains("socket_mode=0600 socket_group=own"), "{log}");
    assert_eq!(std::fs::symlink_metadata(&file_path).unwrap().mode() & 0o777, 0o600);
}
