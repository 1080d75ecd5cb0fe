//! Real peers for the integration tests, all on loopback port 0:
//! - a BIP324 responder node built on the `bip324` crate (garbage length,
//!   decoys before and after its version packet, non-empty version contents),
//!   echoing every message back;
//! - a v1-only node that closes on anything but its own magic, as a real v1
//!   node does when it receives v2 bytes, echoing every message back;
//! - SOCKS5 clients that speak exactly as Bitcoin Core and as btcd/lnd do;
//! - the proxy itself, through its library entry point or its binary;
//! - Debian's microsocks; a real Tor daemon, offline (`tor.rs`).
//!
//! Third-party programs are found through `programs::installed`, which fails
//! the test with the command that installs them.
//!
//! v1 frames here are built and checked with the `bitcoin` crate's hashes,
//! independently of the proxy's own codec.

#![allow(dead_code)]
// Test helpers: a failed expectation is a panic with its message.
#![allow(clippy::unwrap_used)]

pub mod programs;
pub mod tor;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bip324::{
    FillBytes, GarbageResult, Handshake, Initialized, OutboundCipher, PacketType, ReceivedKey, Role, VersionResult,
};
use bip324_proxy::config::{Cli, Config};
use bitcoin::hashes::{Hash, sha256d};
use clap::Parser;
use rand::{Rng, RngCore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const REGTEST: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];
pub const MAINNET: [u8; 4] = [0xf9, 0xbe, 0xb4, 0xd9];
/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- v1 frames

/// A v1 message: magic, command, length, SHA256d checksum, payload.
pub fn frame(magic: [u8; 4], command: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + payload.len());
    out.extend_from_slice(&magic);
    let mut cmd = [0u8; 12];
    cmd[..command.len()].copy_from_slice(command.as_bytes());
    out.extend_from_slice(&cmd);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&sha256d::Hash::hash(payload).as_byte_array()[..4]);
    out.extend_from_slice(payload);
    out
}

/// A VERSION message as the `bitcoin` crate serializes it.
pub fn version_message(magic: [u8; 4], receiver: SocketAddr) -> Vec<u8> {
    use bitcoin::p2p::message::{NetworkMessage, RawNetworkMessage};
    use bitcoin::p2p::message_network::VersionMessage;
    use bitcoin::p2p::{Address, Magic, ServiceFlags};
    let sender: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let version = VersionMessage::new(
        ServiceFlags::NETWORK | ServiceFlags::WITNESS,
        1_700_000_000,
        Address::new(&receiver, ServiceFlags::NONE),
        Address::new(&sender, ServiceFlags::NONE),
        rand::random(),
        "/bip324-proxy-test:0.1/".to_owned(),
        0,
    );
    let raw = RawNetworkMessage::new(Magic::from_bytes(magic), NetworkMessage::Version(version));
    bitcoin::consensus::encode::serialize(&raw)
}

/// A received v1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub magic: [u8; 4],
    pub command: String,
    pub payload: Vec<u8>,
}

/// Reads one v1 frame and checks its checksum.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Frame> {
    let mut header = [0u8; 24];
    reader.read_exact(&mut header).await?;
    let len = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
    assert!(len <= 4_000_000, "frame of {len} bytes");
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    assert_eq!(&header[20..24], &sha256d::Hash::hash(&payload).as_byte_array()[..4], "checksum");
    let command = String::from_utf8(header[4..16].iter().copied().take_while(|&b| b != 0).collect()).unwrap();
    Ok(Frame { magic: header[..4].try_into().unwrap(), command, payload })
}

/// Reads one frame with the test deadline.
pub async fn expect_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Frame {
    tokio::time::timeout(WAIT, read_frame(reader)).await.expect("frame timed out").expect("frame read")
}

/// True when the peer closes (EOF or reset) before sending anything more.
pub async fn expect_closed<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(WAIT, reader.read(&mut byte)).await.expect("close timed out") {
        Ok(0) | Err(_) => {}
        Ok(_) => panic!("expected the connection to close, got data"),
    }
}

// ---------------------------------------------------------------- SOCKS5 clients

/// SOCKS5 as Bitcoin Core sends it with -proxyrandomize: methods 00 and 02,
/// username = password like `0afb2da441f5c105-0`, the target as DOMAINNAME
/// even for IP literals (IPv6 without brackets).
pub async fn socks_core(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, u8> {
    let credentials = format!("{:016x}-0", rand::random::<u64>());
    socks_named(proxy, &credentials, host, port, false).await
}

/// Core-style SOCKS5 with `credentials` as username and password; with
/// `require_auth` the proxy must choose username/password.
pub async fn socks_named(
    proxy: SocketAddr,
    credentials: &str,
    host: &str,
    port: u16,
    require_auth: bool,
) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let choice = socks_greet(&mut s, &[0x05, 0x02, 0x00, 0x02]).await;
    assert_eq!(choice[0], 0x05);
    if require_auth {
        assert_eq!(choice[1], 0x02, "the proxy must ask for credentials to forward them");
    }
    if choice[1] == 0x02 {
        assert_eq!(socks_auth(&mut s, credentials, credentials).await, [0x01, 0x00]);
    } else {
        assert_eq!(choice[1], 0x00);
    }
    let mut request = vec![0x05, 0x01, 0x00, 0x03, host.len() as u8];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await.unwrap();
    read_reply(s).await
}

/// Sends a SOCKS5 greeting (`05 NMETHODS METHODS`), returns the method choice.
pub async fn socks_greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, greeting: &[u8]) -> [u8; 2] {
    s.write_all(greeting).await.unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.unwrap();
    choice
}

/// RFC 1929: sends `username` and `password`, returns the two-byte status.
pub async fn socks_auth(s: &mut TcpStream, username: &str, password: &str) -> [u8; 2] {
    let mut auth = vec![0x01, username.len() as u8];
    auth.extend_from_slice(username.as_bytes());
    auth.push(password.len() as u8);
    auth.extend_from_slice(password.as_bytes());
    s.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await.unwrap();
    status
}

/// SOCKS5 as btcd and lnd send it: no-auth only, ATYP 1 or 4.
pub async fn socks_btcd(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let choice = socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    assert_eq!(choice, [0x05, 0x00]);
    let mut request = vec![0x05, 0x01, 0x00];
    match target {
        SocketAddr::V4(v4) => {
            request.push(0x01);
            request.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            request.push(0x04);
            request.extend_from_slice(&v6.ip().octets());
        }
    }
    request.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&request).await.unwrap();
    read_reply(s).await
}

/// Reads a SOCKS5 reply completely; Ok on success, Err(code) otherwise.
pub async fn read_reply(mut s: TcpStream) -> Result<TcpStream, u8> {
    let mut head = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut head)).await.expect("reply timed out").expect("reply");
    assert_eq!(head[0], 0x05);
    let rest = match head[3] {
        0x01 => 4 + 2,
        0x04 => 16 + 2,
        0x03 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await.unwrap();
            len[0] as usize + 2
        }
        other => panic!("reply ATYP {other}"),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound).await.expect("whole reply");
    if head[1] == 0 { Ok(s) } else { Err(head[1]) }
}

/// Connects through the proxy Core-style and sends VERSION.
pub async fn open_v1_session(proxy: SocketAddr, target: SocketAddr, magic: [u8; 4]) -> TcpStream {
    let host = target.ip().to_string();
    let mut s = socks_core(proxy, &host, target.port()).await.expect("SOCKS5 CONNECT");
    s.write_all(&version_message(magic, target)).await.unwrap();
    s
}

// ---------------------------------------------------------------- the proxy

pub struct Proxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// The proxy's library entry point on 127.0.0.1:0 with these flags.
pub async fn spawn_proxy(args: &[&str]) -> Proxy {
    let mut all = vec!["bip324-proxy"];
    all.extend_from_slice(args);
    let config = Config::load(&Cli::try_parse_from(all).unwrap()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bip324_proxy::server::run(listener, Arc::new(config), shutdown.clone()));
    Proxy { addr, shutdown, task }
}

// ---------------------------------------------------------------- v2 node

/// How the BIP324 responder behaves.
#[derive(Debug, Clone)]
pub struct V2NodeOptions {
    pub magic: [u8; 4],
    pub garbage_len: usize,
    pub decoys_before_version: usize,
    pub decoys_after_version: usize,
    /// Non-empty contents in the version packet (receivers must ignore them).
    pub version_contents: Vec<u8>,
    /// After echoing this many messages, shut down the write half and keep
    /// reading (a remote half-close).
    pub close_write_after: Option<usize>,
    /// Right after the handshake, send this many messages of this size
    /// without reading anything (a flooding remote).
    pub flood: Option<(usize, usize)>,
}

impl Default for V2NodeOptions {
    fn default() -> Self {
        V2NodeOptions {
            magic: REGTEST,
            garbage_len: 100,
            decoys_before_version: 0,
            decoys_after_version: 0,
            version_contents: Vec::new(),
            close_write_after: None,
            flood: None,
        }
    }
}

/// What the node saw.
#[derive(Default)]
pub struct NodeLog {
    pub accepts: AtomicUsize,
    pub session_ids: Mutex<Vec<[u8; 32]>>,
    /// Contents of every genuine message received, per connection.
    pub received: Mutex<Vec<Vec<Vec<u8>>>>,
    /// Messages a flooding node has written so far.
    pub flooded: AtomicUsize,
    /// Every packet after the version packet, per connection: (decoy, bytes
    /// on the wire).
    pub packets: Mutex<Vec<Vec<(bool, usize)>>>,
    /// Wire sizes of the decoys before the initiator's version packet, per
    /// connection.
    pub handshake_decoys: Mutex<Vec<Vec<usize>>>,
}

pub struct Node {
    pub addr: SocketAddr,
    pub log: Arc<NodeLog>,
}

pub async fn spawn_v2_node(options: V2NodeOptions) -> Node {
    spawn_v2_node_on("127.0.0.1:0", options).await
}

pub async fn spawn_v2_node_on(bind: &str, options: V2NodeOptions) -> Node {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(NodeLog::default());
    let node_log = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            node_log.accepts.fetch_add(1, Ordering::SeqCst);
            let (options, log) = (options.clone(), node_log.clone());
            tokio::spawn(async move {
                let _ = serve_v2(stream, options, log).await;
            });
        }
    });
    Node { addr, log }
}

struct KnownSecret([u8; 32]);

impl FillBytes for KnownSecret {
    fn fill_bytes(&mut self, dest: &mut [u8; 32]) {
        dest.copy_from_slice(&self.0);
    }
}

/// Sends packets with the crate's cipher, or, when the version packet has
/// contents (which the crate cannot send), with keys derived from the same
/// secret by the proxy's vector-tested `v2` module.
enum Sender {
    Crate(OutboundCipher),
    Derived(Box<bip324_proxy::v2::PacketEncoder>),
}

impl Sender {
    fn packet(&mut self, contents: &[u8], decoy: bool) -> Vec<u8> {
        match self {
            Sender::Crate(cipher) => {
                let kind = if decoy { PacketType::Decoy } else { PacketType::Genuine };
                cipher.encrypt_to_vec(contents, kind, None)
            }
            Sender::Derived(encoder) => {
                let mut out = bytes::BytesMut::new();
                encoder.encode_packet(&[], contents, decoy, &[], &mut out).unwrap();
                out.to_vec()
            }
        }
    }
}

async fn serve_v2(
    mut stream: TcpStream,
    opts: V2NodeOptions,
    log: Arc<NodeLog>,
) -> Result<(), Box<dyn std::error::Error>> {
    stream.set_nodelay(true)?;
    let secp = secp256k1::Secp256k1::signing_only();
    let secret = loop {
        let bytes: [u8; 32] = rand::random();
        if secp256k1::SecretKey::from_slice(&bytes).is_ok() {
            break bytes;
        }
    };
    let handshake =
        Handshake::<Initialized>::new_with_rng(opts.magic, Role::Responder, &mut KnownSecret(secret), &secp)?;
    let mut theirs = [0u8; 64];
    stream.read_exact(&mut theirs).await?;
    let mut garbage = vec![0u8; opts.garbage_len];
    RngCore::fill_bytes(&mut rand::thread_rng(), &mut garbage);
    let mut key_flight = vec![0u8; Handshake::<Initialized>::send_key_len(Some(&garbage))];
    let handshake = handshake.send_key(Some(&garbage), &mut key_flight)?;
    let ours: [u8; 64] = key_flight[..64].try_into()?;
    stream.write_all(&key_flight).await?;
    let handshake = handshake.receive_key(theirs)?;

    let decoys: Vec<Vec<u8>> = (0..opts.decoys_before_version).map(|i| vec![0xd0 ^ i as u8; 5 + i * 7]).collect();
    let decoy_refs: Vec<&[u8]> = decoys.iter().map(Vec::as_slice).collect();
    let mut version_flight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(Some(&decoy_refs))];
    let handshake = handshake.send_version(&mut version_flight, Some(&decoy_refs))?;
    let mut derived_sender = None;
    if opts.version_contents.is_empty() {
        stream.write_all(&version_flight).await?;
    } else {
        let secret_key = secp256k1::SecretKey::from_slice(&secret)?;
        let keys = bip324_proxy::v2::SessionKeys::derive(
            &secret_key,
            &ours,
            &theirs,
            bip324_proxy::v2::Role::Responder,
            &opts.magic,
        );
        let mut encoder = keys.encoder(0);
        let mut flight = bytes::BytesMut::new();
        flight.extend_from_slice(keys.send_garbage_terminator());
        // The first packet after the garbage authenticates it (AAD).
        let mut aad: &[u8] = &garbage;
        for decoy in &decoys {
            encoder.encode_packet(&[], decoy, true, aad, &mut flight)?;
            aad = &[];
        }
        encoder.encode_packet(&[], &opts.version_contents, false, aad, &mut flight)?;
        stream.write_all(&flight).await?;
        derived_sender = Some(encoder);
    }

    // The initiator's garbage, terminator, decoys and version packet.
    let mut garbage_buffer = Vec::new();
    let mut handshake = handshake;
    let (mut handshake, consumed) = loop {
        match handshake.receive_garbage(&garbage_buffer)? {
            GarbageResult::FoundGarbage { handshake, consumed_bytes } => break (handshake, consumed_bytes),
            GarbageResult::NeedMoreData(h) => {
                handshake = h;
                let mut chunk = [0u8; 512];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err("eof in garbage".into());
                }
                garbage_buffer.extend_from_slice(&chunk[..n]);
            }
        }
    };
    let mut inbound = garbage_buffer[consumed..].to_vec();
    let mut handshake_decoys = Vec::new();
    let cipher = loop {
        fill(&mut stream, &mut inbound, 3).await?;
        let len = handshake.decrypt_packet_len(inbound[..3].try_into()?)?;
        fill(&mut stream, &mut inbound, 3 + len).await?;
        let mut packet: Vec<u8> = inbound.drain(..3 + len).collect();
        match handshake.receive_version(&mut packet[3..])? {
            VersionResult::Complete { cipher } => break cipher,
            VersionResult::Decoy(next) => {
                handshake_decoys.push(3 + len);
                handshake = next;
            }
        }
    };
    log.session_ids.lock().unwrap().push(*cipher.id());
    let conn = {
        let mut received = log.received.lock().unwrap();
        received.push(Vec::new());
        log.packets.lock().unwrap().push(Vec::new());
        log.handshake_decoys.lock().unwrap().push(handshake_decoys);
        received.len() - 1
    };
    let (mut decrypt, outbound) = cipher.into_split();
    let mut sender = match derived_sender {
        Some(encoder) => Sender::Derived(Box::new(encoder)),
        None => Sender::Crate(outbound),
    };
    let mut out = Vec::new();
    for i in 0..opts.decoys_after_version {
        out.extend(sender.packet(&vec![0xee; 3 + i], true));
    }
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    if let Some((count, size)) = opts.flood {
        let mut contents = vec![2u8]; // "block"
        contents.extend(random_payload(size));
        for _ in 0..count {
            let packet = sender.packet(&contents, false);
            stream.write_all(&packet).await?;
            log.flooded.fetch_add(1, Ordering::SeqCst);
        }
    }

    // Echo every genuine message back.
    let mut echoed = 0;
    let mut write_open = true;
    loop {
        if fill(&mut stream, &mut inbound, 3).await.is_err() {
            return Ok(());
        }
        let len = decrypt.decrypt_packet_len(inbound[..3].try_into()?);
        fill(&mut stream, &mut inbound, 3 + len).await?;
        let mut packet: Vec<u8> = inbound.drain(..3 + len).collect();
        let (kind, plaintext) = decrypt.decrypt_in_place(&mut packet[3..], None)?;
        let decoy = kind == PacketType::Decoy || plaintext[0] & 0x80 != 0;
        log.packets.lock().unwrap()[conn].push((decoy, 3 + len));
        if decoy {
            continue;
        }
        let contents = plaintext[1..].to_vec();
        log.received.lock().unwrap()[conn].push(contents.clone());
        if write_open {
            let reply = sender.packet(&contents, false);
            stream.write_all(&reply).await?;
            echoed += 1;
            if opts.close_write_after == Some(echoed) {
                stream.shutdown().await?;
                write_open = false;
            }
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    while buf.len() < len {
        let mut chunk = vec![0u8; (len - buf.len()).clamp(512, 1 << 20)];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

// ---------------------------------------------------------------- v1 node

/// A v1-only node: closes on a wrong magic (as on v2 bytes), echoes frames.
pub async fn spawn_v1_node(magic: [u8; 4]) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(NodeLog::default());
    let node_log = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            node_log.accepts.fetch_add(1, Ordering::SeqCst);
            let log = node_log.clone();
            tokio::spawn(async move {
                let conn = {
                    let mut received = log.received.lock().unwrap();
                    received.push(Vec::new());
                    received.len() - 1
                };
                loop {
                    let mut header = [0u8; 24];
                    if stream.read_exact(&mut header).await.is_err() || header[..4] != magic {
                        return;
                    }
                    let len = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
                    let mut payload = vec![0u8; len];
                    if stream.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let mut contents = header[4..16].to_vec();
                    contents.extend_from_slice(&payload);
                    log.received.lock().unwrap()[conn].push(contents);
                    let mut echo = header.to_vec();
                    echo.extend_from_slice(&payload);
                    if stream.write_all(&echo).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Node { addr, log }
}

/// A random payload of `len` bytes.
pub fn random_payload(len: usize) -> Vec<u8> {
    let mut payload = vec![0u8; len];
    rand::thread_rng().fill(&mut payload[..]);
    payload
}

// ---------------------------------------------------------------- the binary

/// The real binary, with its stderr (the log) read line by line.
pub struct BinaryProxy {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line seen so far, for assertions over the whole log.
    pub seen: Vec<String>,
}

impl BinaryProxy {
    /// Waits for a log line containing every one of `needles`.
    pub async fn wait_for(&mut self, needles: &[&str]) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if needles.iter().all(|n| line.contains(n)) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no log line with {needles:?}; log so far:\n{}", self.seen.join("\n")),
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new(programs::installed("kill")).args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    }
}

fn binary_command(args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bip324-proxy"));
    command
        .args(args)
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("BIP324_PROXY_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command
}

/// Starts the binary on 127.0.0.1:0 and waits for its `listening` line.
pub async fn spawn_binary(args: &[&str], rust_log: &str) -> BinaryProxy {
    let mut proxy = start_binary(args, rust_log, &[]);
    let line = proxy.wait_for(&["listening"]).await;
    let addr = line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("listen field");
    proxy.addr = addr.parse().expect("listen address");
    proxy
}

/// Starts the binary on 127.0.0.1:0, with `env` set for the child only
/// (process-wide environment is shared by the test threads); its log lines
/// arrive in `lines` and `addr` is not known yet.
pub fn start_binary(args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> BinaryProxy {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut child = binary_command(&all, rust_log, env).spawn().expect("binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut reader = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    BinaryProxy { child, addr: "127.0.0.1:0".parse().unwrap(), lines, seen: Vec::new() }
}

/// Runs the binary to completion; returns its exit status and stderr.
pub async fn run_binary(args: &[&str]) -> (std::process::ExitStatus, String) {
    run_binary_env(args, &[]).await
}

/// [`run_binary`] with `env` set for the child only.
pub async fn run_binary_env(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let output = tokio::time::timeout(WAIT, binary_command(args, "info", env).output())
        .await
        .expect("binary exits")
        .expect("binary runs");
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The proxy's library entry point with extra listeners besides the main one.
pub async fn spawn_proxy_fronts(
    args: &[&str],
    extra: Vec<bip324_proxy::session::FrontEnd>,
) -> (Proxy, Vec<SocketAddr>) {
    let mut all = vec!["bip324-proxy"];
    all.extend_from_slice(args);
    let config = Config::load(&Cli::try_parse_from(all).unwrap()).unwrap();
    let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = main.local_addr().unwrap();
    let mut bound =
        vec![bip324_proxy::server::Bound { listener: main.into(), front: bip324_proxy::session::FrontEnd::Main }];
    let mut extra_addrs = Vec::new();
    for front in extra {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        extra_addrs.push(listener.local_addr().unwrap());
        bound.push(bip324_proxy::server::Bound { listener: listener.into(), front });
    }
    let shutdown = CancellationToken::new();
    let context = Arc::new(bip324_proxy::state::ProxyState::new(Arc::new(config), Default::default()));
    let task = tokio::spawn(bip324_proxy::server::serve(bound, context, shutdown.clone()));
    (Proxy { addr, shutdown, task }, extra_addrs)
}

/// The proxy with a configuration file written from `toml` (plus flags).
pub async fn spawn_proxy_with_file(toml: &str, args: &[&str]) -> Proxy {
    let path =
        std::env::temp_dir().join(format!("bip324-proxy-test-{}-{}.toml", std::process::id(), rand::random::<u64>()));
    std::fs::write(&path, toml).unwrap();
    let mut all = vec!["--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let proxy = spawn_proxy(&all).await;
    let _ = std::fs::remove_file(path);
    proxy
}

/// Sends a VERSION straight to the proxy (transparent mode) with addr_recv = `target`.
pub async fn open_transparent_session(proxy: SocketAddr, target: SocketAddr, magic: [u8; 4]) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&version_message(magic, target)).await.unwrap();
    s
}

// ---------------------------------------------------------------- upstream SOCKS5

/// What the recording upstream saw in one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// Methods the proxy offered.
    pub methods: Vec<u8>,
    /// Username and password, when the proxy authenticated.
    pub credentials: Option<(Vec<u8>, Vec<u8>)>,
    pub command: u8,
    pub atyp: u8,
    /// The host as text: the DOMAINNAME, or the address for ATYP 1/4.
    pub host: String,
    pub port: u16,
}

/// A SOCKS5 server written for the tests (independently of the proxy's
/// codec) that records every request. CONNECT goes to `names[host]` or the
/// address itself, unless `reply` forces a code; RESOLVE answers `resolve_to`.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<UpstreamRequest>>>,
}

#[derive(Clone, Default)]
pub struct UpstreamBehaviour {
    pub names: std::collections::HashMap<String, SocketAddr>,
    pub reply: Option<u8>,
    pub resolve_to: Option<std::net::Ipv4Addr>,
}

pub async fn spawn_recording_upstream(behaviour: UpstreamBehaviour) -> RecordingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (behaviour, log) = (behaviour.clone(), log.clone());
            tokio::spawn(async move {
                let _ = serve_upstream(stream, behaviour, log).await;
            });
        }
    });
    RecordingUpstream { addr, requests }
}

async fn serve_upstream(
    mut s: TcpStream,
    behaviour: UpstreamBehaviour,
    log: Arc<Mutex<Vec<UpstreamRequest>>>,
) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await?;
    let mut credentials = None;
    if methods.contains(&0x02) {
        s.write_all(&[0x05, 0x02]).await?;
        let mut ver_len = [0u8; 2];
        s.read_exact(&mut ver_len).await?;
        let mut user = vec![0u8; ver_len[1] as usize];
        s.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        s.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; plen[0] as usize];
        s.read_exact(&mut pass).await?;
        credentials = Some((user, pass));
        s.write_all(&[0x01, 0x00]).await?;
    } else {
        s.write_all(&[0x05, 0x00]).await?;
    }
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    let host = match req[3] {
        0x01 => {
            let mut ip = [0u8; 4];
            s.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        0x04 => {
            let mut ip = [0u8; 16];
            s.read_exact(&mut ip).await?;
            std::net::Ipv6Addr::from(ip).to_string()
        }
        _ => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            s.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    let port = u16::from_be_bytes(port);
    log.lock().unwrap().push(UpstreamRequest {
        methods,
        credentials,
        command: req[1],
        atyp: req[3],
        host: host.clone(),
        port,
    });

    const FAIL: [u8; 8] = [0x01, 0, 0, 0, 0, 0, 0, 0];
    if let Some(code) = behaviour.reply {
        let mut reply = vec![0x05, code, 0x00];
        reply.extend_from_slice(&FAIL[..7]);
        return s.write_all(&reply).await;
    }
    if req[1] == 0xF0 {
        let ip = behaviour.resolve_to.unwrap_or(std::net::Ipv4Addr::new(10, 9, 8, 7));
        let mut reply = vec![0x05, 0x00, 0x00, 0x01];
        reply.extend_from_slice(&ip.octets());
        reply.extend_from_slice(&[0, 0]);
        return s.write_all(&reply).await;
    }
    let target = match behaviour.names.get(&host) {
        Some(addr) => *addr,
        None => match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => {
                return s.write_all(&[0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0]).await;
            }
        },
    };
    let mut remote = match TcpStream::connect(target).await {
        Ok(remote) => remote,
        Err(_) => return s.write_all(&[0x05, 0x05, 0x00, 0x01, 0, 0, 0, 0, 0, 0]).await,
    };
    s.write_all(&[0x05, 0x00, 0x00, 0x01, 127, 0, 0, 1, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut s, &mut remote).await?;
    Ok(())
}

/// Debian's microsocks on 127.0.0.1 with username/password; killed on drop.
pub struct Microsocks {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
}

pub async fn spawn_microsocks(user: &str, password: &str) -> Microsocks {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(programs::installed("microsocks"))
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-u", user, "-P", password])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("microsocks starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Microsocks { addr, _child: child };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("microsocks did not start on {addr}");
}

/// Sends a Tor RESOLVE (0xF0) for `name`; Ok(address) or Err(reply code).
pub async fn socks_resolve(proxy: SocketAddr, name: &str) -> Result<std::net::IpAddr, u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    socks_greet(&mut s, &[0x05, 0x01, 0x00]).await;
    let mut request = vec![0x05, 0xF0, 0x00, 0x03, name.len() as u8];
    request.extend_from_slice(name.as_bytes());
    request.extend_from_slice(&[0, 0]);
    s.write_all(&request).await.unwrap();
    let mut head = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut head)).await.unwrap().unwrap();
    let ip = match head[3] {
        0x01 => {
            let mut ip = [0u8; 4];
            s.read_exact(&mut ip).await.unwrap();
            std::net::IpAddr::from(ip)
        }
        0x04 => {
            let mut ip = [0u8; 16];
            s.read_exact(&mut ip).await.unwrap();
            std::net::IpAddr::from(ip)
        }
        other => panic!("RESOLVE reply ATYP {other}"),
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await.unwrap();
    if head[1] == 0 { Ok(ip) } else { Err(head[1]) }
}

/// A plain HTTP/1.1 GET; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_owned())
}

/// Waits for `metrics` to contain `line` (counters settle when sessions close).
pub async fn wait_for_metric(addr: SocketAddr, line: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let (_, body) = http_get(addr, "/metrics").await;
        if body.lines().any(|l| l == line) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("metrics never showed `{line}`:\n{last}");
}

/// Runs the binary to completion; returns its exit status and stdout.
pub async fn run_binary_stdout(args: &[&str]) -> (std::process::ExitStatus, String) {
    let output =
        tokio::time::timeout(WAIT, binary_command(args, "warn", &[]).stdout(std::process::Stdio::piped()).output())
            .await
            .expect("binary exits")
            .expect("binary runs");
    (output.status, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The proxy's library entry point with this configuration file, and the
/// observer its metrics come from.
pub async fn spawn_proxy_from_toml(toml: &str) -> (Proxy, Arc<bip324_proxy::metrics::Observer>) {
    let path =
        std::env::temp_dir().join(format!("bip324-proxy-test-{}-{}.toml", std::process::id(), rand::random::<u64>()));
    std::fs::write(&path, toml).unwrap();
    let cli = Cli::try_parse_from(["bip324-proxy", "--config", path.to_str().unwrap()]).unwrap();
    let config = Config::load(&cli).unwrap();
    let _ = std::fs::remove_file(&path);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let observer = Arc::new(bip324_proxy::metrics::Observer::default());
    let state = Arc::new(bip324_proxy::state::ProxyState::new(Arc::new(config), observer.clone()));
    let bound =
        vec![bip324_proxy::server::Bound { listener: listener.into(), front: bip324_proxy::session::FrontEnd::Main }];
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bip324_proxy::server::serve(bound, state, shutdown.clone()));
    (Proxy { addr, shutdown, task }, observer)
}

/// A v1 client through the proxy started with `args` reaches a v2 node over
/// exactly one BIP324 session and gets the node's VERSION back.
pub async fn assert_one_v2_session_with(args: &[&str]) {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(args).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1);
}
