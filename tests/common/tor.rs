//! A real Tor daemon (Debian's `tor`) for the upstream tests, offline on
//! loopback: its only bridge is a closed loopback port, so it never reaches
//! the network yet its SocksPort answers (`DisableNetwork 1` would close it).
//! Streams to anything but a malformed name wait for a circuit that never
//! comes and fail after `SocksTimeout`. The control port's STREAM events show
//! the SOCKS credentials each stream carried. Killed and its DataDirectory
//! removed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::WAIT;
use super::programs::installed;

/// How long Tor holds a stream it cannot attach before failing it. Small, so
/// the timeout cases finish quickly; Tor checks once a second.
pub const TOR_SOCKS_TIMEOUT_SECS: u64 = 2;

pub struct Tor {
    pub socks: SocketAddr,
    pub control: SocketAddr,
    dir: PathBuf,
    _child: tokio::process::Child,
}

impl Drop for Tor {
    fn drop(&mut self) {
        // The child is killed by `kill_on_drop`.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts Tor with `SocksPort auto ExtendedErrors` (Tor's 0xF0..0xF7 reply
/// codes) and an unauthenticated `ControlPort auto`, both on 127.0.0.1 on
/// ports Tor picks and reports (no race for a free port), and waits (bounded)
/// until the SocksPort answers a greeting.
pub async fn spawn_tor() -> Tor {
    let tor = installed("tor");
    let dir =
        std::env::temp_dir().join(format!("bip324-proxy-tor-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    {
        use std::os::unix::fs::DirBuilderExt;
        // Tor refuses a DataDirectory others can read.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).unwrap();
    }
    let control_file = dir.join("control-port");
    let log_file = dir.join("tor.log");
    let dead_bridge = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let child = tokio::process::Command::new(tor)
        .args(["-f", "/dev/null", "--defaults-torrc", "/dev/null", "--ignore-missing-torrc"])
        .arg("--DataDirectory")
        .arg(&dir)
        .args(["--SocksPort", "127.0.0.1:auto ExtendedErrors"])
        .args(["--ControlPort", "127.0.0.1:auto", "--CookieAuthentication", "0"])
        .arg("--ControlPortWriteToFile")
        .arg(&control_file)
        .args(["--UseBridges", "1", "--Bridge", &dead_bridge.to_string()])
        .args(["--SocksTimeout", &TOR_SOCKS_TIMEOUT_SECS.to_string()])
        .args(["--ClientUseIPv6", "0", "--AvoidDiskWrites", "1", "--RunAsDaemon", "0"])
        .arg("--Log")
        .arg(format!("notice file {}", log_file.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tor starts");
    let mut tor = Tor { socks: dead_bridge, control: dead_bridge, dir, _child: child };

    let deadline = Instant::now() + WAIT;
    // ControlPortWriteToFile: "PORT=127.0.0.1:NNNN", written once listening.
    tor.control = loop {
        let text = std::fs::read_to_string(&control_file).unwrap_or_default();
        if let Some(addr) = text.trim().strip_prefix("PORT=").and_then(|a| a.parse().ok()) {
            break addr;
        }
        if Instant::now() > deadline {
            failed(&tor.dir, "no control port file");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut control = TorControl::connect(tor.control).await;
    let listeners = control.command("GETINFO net/listeners/socks").await;
    // 250-net/listeners/socks="127.0.0.1:NNNN"
    tor.socks = match listeners.split('"').nth(1).and_then(|a| a.parse().ok()) {
        Some(addr) => addr,
        None => failed(&tor.dir, &format!("GETINFO answered {listeners:?}")),
    };
    loop {
        if socks_port_answers(tor.socks).await {
            return tor;
        }
        if Instant::now() > deadline {
            failed(&tor.dir, "SocksPort silent");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failed(dir: &std::path::Path, what: &str) -> ! {
    let log = std::fs::read_to_string(dir.join("tor.log")).unwrap_or_default();
    panic!("tor did not start ({what}) in {}; its log:\n{log}", dir.display());
}

async fn socks_port_answers(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(&[0x05, 0x01, 0x00]).await.ok()?;
        let mut choice = [0u8; 2];
        s.read_exact(&mut choice).await.ok()?;
        Some(choice == [0x05, 0x00])
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Some(true)))
}

/// A stream as Tor's control port reported it (`650 STREAM ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub id: String,
    pub status: String,
    /// `host:port` as Tor saw it.
    pub target: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A control-port connection (no authentication configured).
pub struct TorControl {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl TorControl {
    pub async fn connect(addr: SocketAddr) -> TorControl {
        let (read, writer) = TcpStream::connect(addr).await.expect("tor control port").into_split();
        let mut control = TorControl { reader: BufReader::new(read), writer };
        control.command("AUTHENTICATE").await;
        control
    }

    /// Sends `command`; returns the reply's lines, failing unless it ends in `250 OK`.
    pub async fn command(&mut self, command: &str) -> String {
        self.writer.write_all(format!("{command}\r\n").as_bytes()).await.unwrap();
        let mut reply = String::new();
        loop {
            let line = self.line().await;
            if line.starts_with("650") {
                continue; // an event that raced with the reply
            }
            reply.push_str(&line);
            reply.push('\n');
            if line.starts_with("250 ") {
                return reply;
            }
            assert!(line.starts_with("250-") || line.starts_with("250+"), "tor answered `{command}` with {reply}");
        }
    }

    /// Subscribes to STREAM events (Tor 0.4.9 always sends the extended
    /// fields, SOCKS_USERNAME and SOCKS_PASSWORD among them).
    pub async fn watch_streams(&mut self) {
        self.command("SETEVENTS STREAM").await;
    }

    /// The first NEW stream to each of `hosts` (any port), in the order of
    /// `hosts`, whatever order Tor reports them in; other events are skipped.
    pub async fn new_streams_to(&mut self, hosts: &[String]) -> Vec<StreamEvent> {
        let mut found: Vec<Option<StreamEvent>> = vec![None; hosts.len()];
        let all = tokio::time::timeout(WAIT, async {
            while found.iter().any(Option::is_none) {
                let line = self.line().await;
                let Some(event) = parse_stream_event(&line) else { continue };
                if event.status != "NEW" {
                    continue;
                }
                let host = event.target.rsplit_once(':').map_or(event.target.as_str(), |(host, _)| host);
                if let Some(i) = hosts.iter().position(|h| h == host)
                    && found[i].is_none()
                {
                    found[i] = Some(event);
                }
            }
        })
        .await;
        if all.is_err() {
            panic!("tor reported no new stream for some of {hosts:?}; seen: {found:?}");
        }
        found.into_iter().flatten().collect()
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let read = tokio::time::timeout(WAIT, self.reader.read_line(&mut line)).await;
        match read {
            Ok(Ok(n)) if n > 0 => line.trim_end().to_owned(),
            other => panic!("tor control port: {other:?}"),
        }
    }
}

/// `650 STREAM <id> <status> <circuit> <target> [KEY=VALUE ...]`.
fn parse_stream_event(line: &str) -> Option<StreamEvent> {
    let rest = line.strip_prefix("650 STREAM ")?;
    let mut words = rest.split(' ');
    let id = words.next()?.to_owned();
    let status = words.next()?.to_owned();
    let _circuit = words.next()?;
    let target = words.next()?.to_owned();
    Some(StreamEvent {
        id,
        status,
        target,
        username: quoted_field(line, "SOCKS_USERNAME"),
        password: quoted_field(line, "SOCKS_PASSWORD"),
    })
}

/// `KEY="value"` with control-spec backslash escapes.
fn quoted_field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}=\""))? + key.len() + 3;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    None
}

/// A SOCKS5 exchange with `socks` (Tor itself, or the proxy) offering only
/// no-auth, or only username/password with `credentials` as both: the reply
/// code for `command` (0x01 CONNECT, 0xF0 RESOLVE) to `host:port` sent as a
/// DOMAINNAME. Only the first two bytes are read: Tor's failed RESOLVE
/// replies carry address type 0, which no client can parse further.
pub async fn socks_reply_code(socks: SocketAddr, credentials: Option<&str>, command: u8, host: &str, port: u16) -> u8 {
    let mut s = TcpStream::connect(socks).await.unwrap();
    match credentials {
        Some(credentials) => {
            let choice = super::socks_greet(&mut s, &[0x05, 0x01, 0x02]).await;
            assert_eq!(choice, [0x05, 0x02]);
            assert_eq!(super::socks_auth(&mut s, credentials, credentials).await, [0x01, 0x00]);
        }
        None => {
            let choice = super::socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
            assert_eq!(choice, [0x05, 0x00]);
        }
    }
    let mut request = vec![0x05, command, 0x00, 0x03, host.len() as u8];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await.unwrap();
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut head)).await.expect("tor replies").expect("reply");
    assert_eq!(head[0], 0x05);
    head[1]
}
