//! The measuring client, in the parent process: a v1 peer that reaches the
//! echo node through the proxy (SOCKS5 CONNECT, as btcd and lnd send it) or
//! through the plain relay (no SOCKS), and a native v2 peer that runs the
//! proxy's own initiator handshake (`upgrade::upgrade`) straight to the node.
//!
//! The same code drives both v1 paths; only how the TCP stream is opened
//! differs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bip324_proxy::socks5::{self, Host, Target};
use bip324_proxy::translate;
use bip324_proxy::upgrade;
use bip324_proxy::v1::{self, Command, Decoded, FrameDecoder, HEADER_LEN, Magic, V1Header};
use bip324_proxy::v2::DecodedPacket;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound for a session to open (SOCKS, dial, handshake, VERSION echo).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a pipeline to drain after its writer stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Handshake timeout given to `upgrade::upgrade` by the native v2 client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked of the kernel per read when no larger frame is pending.
const READ_CHUNK: usize = 64 * 1024;

/// A v1 message of the given command and payload.
pub fn frame(magic: Magic, command: Command, payload: &[u8]) -> Vec<u8> {
    let header = V1Header::for_payload(magic, command, payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// A VERSION payload as a Bitcoin node sends it, serialized by the `bitcoin` crate.
pub fn version_payload(receiver: SocketAddr) -> Vec<u8> {
    use bitcoin::p2p::message_network::VersionMessage;
    use bitcoin::p2p::{Address, ServiceFlags};
    let sender = SocketAddr::from(([0, 0, 0, 0], 0));
    let version = VersionMessage::new(
        ServiceFlags::NETWORK | ServiceFlags::WITNESS,
        1_700_000_000,
        Address::new(&receiver, ServiceFlags::NONE),
        Address::new(&sender, ServiceFlags::NONE),
        rand::random(),
        "/bip324-proxy-bench:0.1/".to_owned(),
        0,
    );
    bitcoin::consensus::encode::serialize(&version)
}

/// TCP connect, from `source` (port chosen by the kernel) when given.
async fn connect_from(source: Option<IpAddr>, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("binding {ip}"))?;
    }
    let stream = socket.connect(to).await.with_context(|| format!("connecting to {to}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads SOCKS5 bytes from `peer` (named in errors) until `decode` finds a
/// whole message at the front of `buf`, which it then consumes. Used by both
/// roles: this client and the plain SOCKS relay (`roles.rs`).
pub async fn read_decoded<T, E>(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    peer: &str,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    loop {
        if let Some((value, used)) = decode(buf)? {
            buf.advance(used);
            return Ok(value);
        }
        ensure!(buf.len() < 1024, "SOCKS5 message from the {peer} too long");
        buf.reserve(64);
        if stream.read_buf(buf).await? == 0 {
            bail!("{peer} closed during SOCKS5");
        }
    }
}

/// SOCKS5 CONNECT to `target` through `proxy`: no authentication, the
/// address as ATYP 1 or 4, each step awaited as btcd and lnd do it.
async fn socks_connect(proxy: SocketAddr, source: Option<IpAddr>, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut stream = connect_from(source, proxy).await?;
    let mut out = Vec::with_capacity(32);
    socks5::encode_greeting(&[socks5::METHOD_NO_AUTH], &mut out);
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let method = read_decoded(&mut stream, &mut buf, "proxy", socks5::decode_method_choice).await?;
    ensure!(method == socks5::METHOD_NO_AUTH, "proxy chose SOCKS5 method {method:#04x}");
    out.clear();
    socks5::encode_request(socks5::Command::Connect, &Target::new(Host::Ip(target.ip()), target.port()), &mut out)?;
    stream.write_all(&out).await?;
    let reply = read_decoded(&mut stream, &mut buf, "proxy", socks5::decode_reply).await?;
    ensure!(reply.code.is_success(), "SOCKS5 reply {:#04x}", reply.code.0);
    ensure!(buf.is_empty(), "bytes after the SOCKS5 reply");
    Ok(stream)
}

/// Sends `version_frame` and waits for exactly that frame to come back.
async fn exchange_version(stream: &mut TcpStream, version_frame: &[u8]) -> anyhow::Result<()> {
    stream.write_all(version_frame).await?;
    let decoder = FrameDecoder::new(crate::MAGIC, true);
    let mut buf = BytesMut::with_capacity(version_frame.len());
    loop {
        match decoder.decode(&buf)? {
            Decoded::Frame { header, len } => {
                ensure!(header.command == v1::VERSION_COMMAND, "first echo is not VERSION");
                ensure!(buf[..len] == *version_frame, "VERSION echo differs");
                ensure!(buf.len() == len, "bytes after the VERSION echo");
                return Ok(());
            }
            Decoded::NeedMore { total } => {
                buf.reserve(total.saturating_sub(buf.len()));
                if stream.read_buf(&mut buf).await? == 0 {
                    bail!("closed before the VERSION echo");
                }
            }
        }
    }
}

/// How a v1 session reaches the node.
#[derive(Debug, Clone, Copy)]
pub enum V1Route {
    /// SOCKS5 CONNECT to `node` through `proxy` (the proxy, or the plain SOCKS
    /// relay: SOCKS5, no crypto), from `source` when given.
    Socks { proxy: SocketAddr, source: Option<IpAddr>, node: SocketAddr },
    /// A plain TCP connection: to the plain relay, which always forwards to
    /// the v1 node, or straight to the v1 node.
    Direct(SocketAddr),
}

/// A v1 session: the route opened, VERSION out, VERSION echoed (through the
/// proxy, that means its v2 handshake with the node is done).
pub async fn open_v1_session(route: V1Route, version_frame: &[u8]) -> anyhow::Result<TcpStream> {
    let mut stream = match route {
        V1Route::Socks { proxy, source, node } => socks_connect(proxy, source, node).await?,
        V1Route::Direct(addr) => connect_from(None, addr).await?,
    };
    exchange_version(&mut stream, version_frame).await?;
    Ok(stream)
}

/// `GET /metrics` from the proxy's metrics listener, the body as text.
pub async fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8(response).context("metrics response is not UTF-8")?;
    let (_, body) = text.split_once("\r\n\r\n").context("no end of headers in the metrics response")?;
    Ok(body.to_owned())
}

/// A native v2 peer: our initiator handshake straight to the node with
/// VERSION in its first flight, then the VERSION echo read back.
pub async fn native_v2_version_echo(
    node: SocketAddr,
    source: Option<IpAddr>,
    version_payload: &[u8],
) -> anyhow::Result<()> {
    let mut stream = connect_from(source, node).await?;
    let mut message_type = [0u8; translate::MAX_MESSAGE_TYPE_LEN];
    let type_len = translate::encode_message_type(&v1::VERSION_COMMAND, &mut message_type);
    let message_type = &message_type[..type_len];
    let first_message = upgrade::FirstMessage { message_type, payload: version_payload };
    // A native client makes its key when it connects.
    let key = upgrade::InitiatorKey::generate();
    let mut channel = upgrade::upgrade(&mut stream, key, crate::MAGIC, Some(first_message), HANDSHAKE_TIMEOUT).await?;
    let mut buf = channel.leftover;
    loop {
        match channel.decoder.decode(&mut buf)? {
            DecodedPacket::NeedMore { total } => {
                buf.reserve(total.saturating_sub(buf.len()).max(4096));
                if stream.read_buf(&mut buf).await? == 0 {
                    bail!("node closed before the VERSION echo");
                }
            }
            DecodedPacket::Packet { ignore: true, len, .. } => buf.advance(len),
            DecodedPacket::Packet { ignore: false, contents, .. } => {
                let contents = &buf[contents];
                ensure!(contents.len() == type_len + version_payload.len(), "VERSION echo length");
                ensure!(contents[..type_len] == *message_type, "VERSION echo type");
                ensure!(contents[type_len..] == *version_payload, "VERSION echo payload");
                return Ok(());
            }
        }
    }
}

/// The message stream of one throughput case.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub command: Command,
    pub payload_len: usize,
    /// Messages per write.
    pub batch: u32,
    /// Messages sent but not yet echoed, at most.
    pub window: u32,
}

/// A writer task and a reader task on one session, `load.window` messages in flight.
pub struct Pipeline {
    echoed_bytes: Arc<AtomicU64>,
    stop: CancellationToken,
    writer: JoinHandle<std::io::Result<()>>,
    reader: JoinHandle<anyhow::Result<()>>,
}

impl Pipeline {
    /// Starts sending `load` on an open session (VERSION already exchanged).
    pub fn start(stream: TcpStream, load: Load) -> Pipeline {
        let mut payload = vec![0u8; load.payload_len];
        rand::Rng::fill(&mut rand::thread_rng(), &mut payload[..]);
        let one = frame(crate::MAGIC, load.command, &payload);
        let batch = Bytes::from(one.repeat(load.batch as usize));
        let window = Arc::new(Semaphore::new(load.window as usize));
        let echoed_bytes = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (read_half, write_half) = stream.into_split();
        let writer = tokio::spawn(write_messages(write_half, batch, load.batch, window.clone(), stop.clone()));
        let reader =
            tokio::spawn(read_echoes(read_half, load.command, Bytes::from(payload), window, echoed_bytes.clone()));
        Pipeline { echoed_bytes, stop, writer, reader }
    }

    /// Payload bytes echoed back and verified so far.
    pub fn echoed_bytes(&self) -> u64 {
        self.echoed_bytes.load(Ordering::Relaxed)
    }

    /// Stops sending, half-closes, and waits for every message in flight to
    /// come back and the far side to close in turn.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let (writer_abort, reader_abort) = (self.writer.abort_handle(), self.reader.abort_handle());
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let written = self.writer.await.context("writer task")?;
            let read = self.reader.await.context("reader task")?;
            written.context("writing")?;
            read
        })
        .await;
        writer_abort.abort();
        reader_abort.abort();
        drained.context("the session did not drain")?
    }
}

async fn write_messages(
    mut writer: OwnedWriteHalf,
    batch: Bytes,
    messages_per_batch: u32,
    window: Arc<Semaphore>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = window.acquire_many(messages_per_batch) => permit,
        };
        // The semaphore is never closed; the reader hands the permits back.
        permit.expect("window semaphore is never closed").forget();
        // Never cut a write short: a partial frame would end the session with an error.
        writer.write_all(&batch).await?;
    }
    writer.shutdown().await
}

async fn read_echoes(
    mut reader: OwnedReadHalf,
    command: Command,
    payload: Bytes,
    window: Arc<Semaphore>,
    echoed_bytes: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    // The proxy verifies checksums on both sides; comparing the payload is cheaper and stricter.
    let decoder = FrameDecoder::new(crate::MAGIC, false);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let mut echoed = 0usize;
        let need = loop {
            match decoder.decode(&buf)? {
                Decoded::NeedMore { total } => break total,
                Decoded::Frame { header, len } => {
                    ensure!(header.command == command, "echo of another command");
                    ensure!(buf[HEADER_LEN..len] == payload[..], "echoed payload differs");
                    buf.advance(len);
                    echoed += 1;
                }
            }
        };
        if echoed > 0 {
            echoed_bytes.fetch_add((echoed * payload.len()) as u64, Ordering::Relaxed);
            window.add_permits(echoed);
        }
        buf.reserve(need.saturating_sub(buf.len()).max(READ_CHUNK));
        if reader.read_buf(&mut buf).await? == 0 {
            ensure!(buf.is_empty(), "closed in the middle of an echo");
            return Ok(());
        }
    }
}
