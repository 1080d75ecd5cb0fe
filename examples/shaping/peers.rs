//! The three parties around the proxy, all on loopback with TCP_NODELAY:
//!
//! - the client: a v1 node relaying the chain through the proxy's SOCKS5
//!   port, following the schedule and answering the remote's requests;
//! - the observer: a TCP relay between the proxy and the remote that
//!   timestamps every read of the proxy's v2 bytes (blocking reads on a
//!   thread of its own, so a timestamp is taken as the bytes arrive);
//! - the remote: a BIP324 responder built on the `bip324` crate that asks
//!   for what the client announces (`getdata`), answers pings, and records
//!   when each genuine message arrived and how many bytes were decoys.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bip324::{GarbageResult, Handshake, Initialized, PacketType, ReceivedKey, Role, VersionResult};
use bip324_proxy::translate;
use bip324_proxy::v1::{Command, Decoded, FrameDecoder, Magic, V1Header};
use bitcoin::consensus::encode::deserialize;
use bitcoin::p2p::message::{NetworkMessage, RawNetworkMessage};
use bitcoin::p2p::message_blockdata::Inventory;
use bitcoin::p2p::message_compact_blocks::SendCmpct;
use bitcoin::p2p::message_network::VersionMessage;
use bitcoin::p2p::{Address, ServiceFlags};
use bytes::{Buf, BytesMut};
use rand::{Rng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::chain::{self, Chain, Event, MAX_INV_ENTRIES};

pub const MAGIC: Magic = [0xfa, 0xbf, 0xb5, 0xda];
/// Upper bound for anything one step waits on.
const WAIT: Duration = Duration::from_secs(30);
/// The observer's read buffer: larger than any write the proxy makes.
const OBSERVER_READ: usize = 4 << 20;
/// Connections the observer and the remote accept before they stop.
pub const MAX_CONNECTIONS: usize = 256;

// ---------------------------------------------------------------- the observer

/// Every read of one connection's proxy-to-remote bytes: when, how many.
pub type Reads = Arc<Mutex<Vec<(Instant, usize)>>>;

/// A relay between the proxy and `remote`; each accepted connection's reads
/// are appended to `recordings`, in accept order.
pub fn spawn_observer(remote: SocketAddr) -> anyhow::Result<(SocketAddr, Arc<Mutex<Vec<Reads>>>)> {
    let listener = StdListener::bind("127.0.0.1:0").context("binding the observer")?;
    let addr = listener.local_addr()?;
    let recordings: Arc<Mutex<Vec<Reads>>> = Arc::default();
    let list = recordings.clone();
    std::thread::spawn(move || {
        for _ in 0..MAX_CONNECTIONS {
            let Ok((from_proxy, _)) = listener.accept() else { return };
            let Ok(to_remote) = StdStream::connect(remote) else { return };
            let reads = Reads::default();
            list.lock().unwrap_or_else(|e| e.into_inner()).push(reads.clone());
            let _ = (from_proxy.set_nodelay(true), to_remote.set_nodelay(true));
            let (Ok(proxy_back), Ok(remote_back)) = (from_proxy.try_clone(), to_remote.try_clone()) else { return };
            std::thread::spawn(move || observe(from_proxy, to_remote, reads));
            std::thread::spawn(move || copy_back(remote_back, proxy_back));
        }
    });
    Ok((addr, recordings))
}

/// Proxy -> remote, every read timestamped as it returns.
fn observe(mut from: StdStream, mut to: StdStream, reads: Reads) {
    let mut buf = vec![0u8; OBSERVER_READ];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        reads.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), n));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Remote -> proxy, unrecorded (the remote is not shaped by the proxy).
fn copy_back(mut from: StdStream, mut to: StdStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------- the remote

/// What the remote saw on one connection.
#[derive(Debug, Default, Clone)]
pub struct RemoteLog {
    /// Every genuine message after the handshake: when it was decrypted, its command.
    pub received: Vec<(Instant, Command)>,
    /// Wire bytes of genuine and of decoy packets after the handshake.
    pub genuine_bytes: u64,
    pub decoy_bytes: u64,
    /// Wire bytes of each decoy before the initiator's version packet.
    pub handshake_decoys: Vec<usize>,
    /// The connection ended cleanly (the initiator closed).
    pub done: bool,
}

pub type RemoteLogs = Arc<Mutex<Vec<Arc<Mutex<RemoteLog>>>>>;

/// The remote: a BIP324 responder, on its own runtime thread.
pub fn spawn_remote(ping: Duration) -> anyhow::Result<(SocketAddr, RemoteLogs)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let logs = RemoteLogs::default();
    let list = logs.clone();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            for _ in 0..MAX_CONNECTIONS {
                let Ok((stream, _)) = listener.accept().await else { return };
                let log = Arc::new(Mutex::new(RemoteLog::default()));
                list.lock().unwrap_or_else(|e| e.into_inner()).push(log.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_remote(stream, log, ping).await {
                        eprintln!("remote: {e:#}");
                    }
                });
            }
        });
    });
    Ok((addr, logs))
}

async fn fill(stream: &mut (impl AsyncReadExt + Unpin), buf: &mut BytesMut, len: usize) -> anyhow::Result<bool> {
    while buf.len() < len {
        buf.reserve((len - buf.len()).max(64 * 1024));
        if stream.read_buf(buf).await? == 0 {
            ensure!(buf.is_empty(), "closed in the middle of a packet");
            return Ok(false);
        }
    }
    Ok(true)
}

/// A message as BIP324 contents: its message type, then the payload.
fn contents(message: NetworkMessage) -> Vec<u8> {
    let frame = chain::frame(message);
    let mut command: Command = [0; 12];
    command.copy_from_slice(&frame[4..16]);
    let mut message_type = [0u8; translate::MAX_MESSAGE_TYPE_LEN];
    let len = translate::encode_message_type(&command, &mut message_type);
    let mut out = message_type[..len].to_vec();
    out.extend_from_slice(&frame[24..]);
    out
}

/// The remote's version message.
fn version(receiver: SocketAddr, user_agent: &str) -> NetworkMessage {
    let sender = SocketAddr::from(([0, 0, 0, 0], 0));
    NetworkMessage::Version(VersionMessage {
        version: 70016,
        services: ServiceFlags::NETWORK | ServiceFlags::WITNESS | ServiceFlags::P2P_V2,
        timestamp: 1_700_000_000,
        receiver: Address::new(&receiver, ServiceFlags::NONE),
        sender: Address::new(&sender, ServiceFlags::NONE),
        nonce: rand::random(),
        user_agent: user_agent.to_owned(),
        start_height: 0,
        relay: true,
    })
}

/// One connection: Core's responder handshake, then every packet decrypted,
/// counted, and answered where a node would answer.
async fn serve_remote(mut stream: TcpStream, log: Arc<Mutex<RemoteLog>>, ping: Duration) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let handshake = Handshake::<Initialized>::new(MAGIC, Role::Responder)?;
    let mut buf = BytesMut::new();
    fill(&mut stream, &mut buf, 64).await?;
    let theirs: [u8; 64] = buf[..64].try_into()?;
    buf.advance(64);
    let mut garbage = vec![0u8; rand::thread_rng().gen_range(0..=4095)];
    rand::thread_rng().fill_bytes(&mut garbage);
    let mut flight = vec![0u8; Handshake::<Initialized>::send_key_len(Some(&garbage))];
    let handshake = handshake.send_key(Some(&garbage), &mut flight)?;
    let handshake = handshake.receive_key(theirs)?;
    let key_len = flight.len();
    flight.resize(key_len + Handshake::<ReceivedKey>::send_version_len(None), 0);
    let handshake = handshake.send_version(&mut flight[key_len..], None)?;
    stream.write_all(&flight).await?;

    let mut handshake = handshake;
    let (mut handshake, consumed) = loop {
        match handshake.receive_garbage(&buf)? {
            GarbageResult::FoundGarbage { handshake, consumed_bytes } => break (handshake, consumed_bytes),
            GarbageResult::NeedMoreData(waiting) => {
                handshake = waiting;
                let want = buf.len() + 1;
                ensure!(fill(&mut stream, &mut buf, want).await?, "closed in the handshake");
            }
        }
    };
    let mut buf = BytesMut::from(&buf[consumed..]);
    let cipher = loop {
        ensure!(fill(&mut stream, &mut buf, 3).await?, "closed in the handshake");
        let len = handshake.decrypt_packet_len(buf[..3].try_into()?)?;
        ensure!(fill(&mut stream, &mut buf, 3 + len).await?, "closed in the handshake");
        let mut packet = buf.split_to(3 + len);
        match handshake.receive_version(&mut packet[3..])? {
            VersionResult::Complete { cipher } => break cipher,
            VersionResult::Decoy(next) => {
                log.lock().unwrap_or_else(|e| e.into_inner()).handshake_decoys.push(3 + len);
                handshake = next;
            }
        }
    };
    let (mut decrypt, mut encrypt) = cipher.into_split();
    let (mut reader, mut writer) = stream.into_split();

    // Replies and pings go out through one writer task.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Vec<u8>>>();
    let writing = tokio::spawn(async move {
        while let Some(messages) = rx.recv().await {
            let mut out = Vec::new();
            for message in messages {
                out.extend(encrypt.encrypt_to_vec(&message, PacketType::Genuine, None));
            }
            if writer.write_all(&out).await.is_err() {
                break;
            }
        }
    });
    let pinger = tx.clone();
    let pinging = tokio::spawn(async move {
        // Offset from the client's pings by half an interval.
        let mut next = Instant::now() + ping / 2;
        loop {
            tokio::time::sleep_until(next).await;
            next += ping;
            if pinger.send(vec![contents(NetworkMessage::Ping(rand::random()))]).is_err() {
                break;
            }
        }
    });

    let decoder = FrameDecoder::new(MAGIC, false);
    let result = async {
        loop {
            if !fill(&mut reader, &mut buf, 3).await? {
                break;
            }
            let len = decrypt.decrypt_packet_len(buf[..3].try_into()?);
            ensure!(fill(&mut reader, &mut buf, 3 + len).await?, "closed in the middle of a packet");
            let mut packet = buf.split_to(3 + len);
            let now = Instant::now();
            let (kind, plaintext) = decrypt.decrypt_in_place(&mut packet[3..], None)?;
            if kind == PacketType::Decoy {
                ensure!(plaintext[1..].iter().all(|&b| b == 0), "a decoy with data");
                log.lock().unwrap_or_else(|e| e.into_inner()).decoy_bytes += 3 + len as u64;
                continue;
            }
            let (command, at) = translate::decode_contents(&plaintext[1..])?;
            let payload = &plaintext[1 + at..];
            {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.received.push((now, command));
                log.genuine_bytes += 3 + len as u64;
            }
            let name = bip324_proxy::v1::command_display(&command).to_string();
            let reply = match name.as_str() {
                "version" => vec![contents(version(peer, "/Satoshi:27.1.0/")), contents(NetworkMessage::Verack)],
                "inv" | "headers" | "ping" => {
                    let mut frame = V1Header::for_payload(MAGIC, command, payload).encode().to_vec();
                    frame.extend_from_slice(payload);
                    ensure!(matches!(decoder.decode(&frame), Ok(Decoded::Frame { .. })), "bad {name}");
                    let message: RawNetworkMessage = deserialize(&frame)?;
                    match message.payload() {
                        NetworkMessage::Inv(items) => vec![contents(NetworkMessage::GetData(items.clone()))],
                        NetworkMessage::Headers(headers) => {
                            let wanted = headers.iter().map(|h| Inventory::WitnessBlock(h.block_hash())).collect();
                            vec![contents(NetworkMessage::GetData(wanted))]
                        }
                        NetworkMessage::Ping(nonce) => vec![contents(NetworkMessage::Pong(*nonce))],
                        _ => Vec::new(),
                    }
                }
                _ => Vec::new(),
            };
            if !reply.is_empty() {
                let _ = tx.send(reply);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    pinging.abort();
    drop(tx);
    let _ = writing.await;
    result?;
    log.lock().unwrap_or_else(|e| e.into_inner()).done = true;
    Ok(())
}

// ---------------------------------------------------------------- the client

/// What the client sent: when each message's write began, and its command.
#[derive(Debug, Default)]
pub struct ClientLog {
    pub sent: Vec<(Instant, Command)>,
    /// When each block was announced (its `headers` write).
    pub block_announced: Vec<Instant>,
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
}

/// SOCKS5 CONNECT to `target` (no authentication, IPv4), as btcd sends it.
pub async fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    ensure!(choice == [5, 0], "SOCKS5 method {choice:?}");
    let SocketAddr::V4(v4) = target else { bail!("IPv4 targets only") };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await?;
    ensure!(reply[1] == 0, "SOCKS5 reply {}", reply[1]);
    Ok(stream)
}

/// The client's VERSION, as Bitcoin Core 27.1 would send it.
pub fn client_version(receiver: SocketAddr) -> Vec<u8> {
    chain::frame(version(receiver, "/Satoshi:27.1.0/"))
}

/// What the client hears from the remote that it acts on.
enum Heard {
    Version,
    Verack,
    GetData(Vec<Inventory>),
    Ping(u64),
}

/// Reads v1 messages from the proxy until it closes.
async fn listen(mut reader: tokio::net::tcp::OwnedReadHalf, heard: mpsc::UnboundedSender<Heard>) -> anyhow::Result<()> {
    let decoder = FrameDecoder::new(MAGIC, true);
    let mut buf = BytesMut::new();
    loop {
        match decoder.decode(&buf)? {
            Decoded::Frame { len, .. } => {
                let message: RawNetworkMessage = deserialize(&buf[..len])?;
                buf.advance(len);
                let event = match message.payload() {
                    NetworkMessage::Version(_) => Heard::Version,
                    NetworkMessage::Verack => Heard::Verack,
                    NetworkMessage::GetData(items) => Heard::GetData(items.clone()),
                    NetworkMessage::Ping(nonce) => Heard::Ping(*nonce),
                    _ => continue,
                };
                if heard.send(event).is_err() {
                    return Ok(());
                }
            }
            Decoded::NeedMore { total } => {
                buf.reserve(total.saturating_sub(buf.len()).max(64 * 1024));
                if reader.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
        }
    }
}

/// Writes `frames` in one write and logs each message's command.
async fn send(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    log: &mut ClientLog,
    frames: &[&[u8]],
) -> anyhow::Result<Instant> {
    let now = Instant::now();
    let mut out = Vec::with_capacity(frames.iter().map(|f| f.len()).sum());
    for frame in frames {
        let mut command: Command = [0; 12];
        command.copy_from_slice(&frame[4..16]);
        log.sent.push((now, command));
        out.extend_from_slice(frame);
    }
    writer.write_all(&out).await?;
    Ok(now)
}

async fn heard(rx: &mut mpsc::UnboundedReceiver<Heard>) -> anyhow::Result<Heard> {
    tokio::time::timeout(WAIT, rx.recv()).await.context("waiting for the remote")?.context("proxy closed")
}

/// One session through the proxy to `target`: the version handshake as Core
/// runs it, then the schedule in real time, `getdata` answered at once.
pub async fn replay(proxy: SocketAddr, target: SocketAddr, chain: &Chain) -> anyhow::Result<ClientLog> {
    let mut log = ClientLog::default();
    let stream = socks_connect(proxy, target).await?;
    let (reader, mut writer) = stream.into_split();
    let (heard_tx, mut rx) = mpsc::unbounded_channel();
    let listening = tokio::spawn(listen(reader, heard_tx));
    send(&mut writer, &mut log, &[&client_version(target)]).await?;

    // Core's order: wtxidrelay and sendaddrv2 before verack; the rest after
    // the peer's verack.
    let mut pending_pings = Vec::new();
    let (mut got_version, mut got_verack) = (false, false);
    for _ in 0..64 {
        if got_version && got_verack {
            break;
        }
        match heard(&mut rx).await? {
            Heard::Version => {
                got_version = true;
                let frames = [
                    chain::frame(NetworkMessage::WtxidRelay),
                    chain::frame(NetworkMessage::SendAddrV2),
                    chain::frame(NetworkMessage::Verack),
                ];
                send(&mut writer, &mut log, &frames.iter().map(Vec::as_slice).collect::<Vec<_>>()).await?;
            }
            Heard::Verack => got_verack = true,
            Heard::Ping(nonce) => pending_pings.push(nonce),
            Heard::GetData(_) => {}
        }
    }
    ensure!(got_version && got_verack, "no version handshake");
    let frames = [
        chain::frame(NetworkMessage::SendHeaders),
        chain::frame(NetworkMessage::SendCmpct(SendCmpct { send_compact: false, version: 2 })),
        chain::frame(NetworkMessage::Ping(rand::random())),
        chain::frame(NetworkMessage::FeeFilter(1000)),
    ];
    send(&mut writer, &mut log, &frames.iter().map(Vec::as_slice).collect::<Vec<_>>()).await?;
    for nonce in pending_pings {
        send(&mut writer, &mut log, &[&chain::frame(NetworkMessage::Pong(nonce))]).await?;
    }

    let start = Instant::now();
    log.started = Some(start);
    let mut next = 0;
    let mut announce: Vec<usize> = Vec::new();
    let mut confirmed: HashSet<usize> = HashSet::new();
    let mut blocks_sent = 0;
    // Bounded: each turn handles one scheduled moment or one request.
    let turns = chain.schedule.len() + 4 * chain.txs.len() + 100_000;
    for _ in 0..turns {
        if next == chain.schedule.len() && blocks_sent == chain.blocks.len() {
            break;
        }
        let due = chain.schedule.get(next).map(|(at, _)| start + *at);
        tokio::select! {
            biased;
            event = rx.recv() => match event.context("proxy closed")? {
                Heard::GetData(items) => {
                    let mut frames: Vec<&[u8]> = Vec::new();
                    for item in &items {
                        match item {
                            Inventory::WTx(wtxid) => {
                                if let Some(&i) = chain.by_wtxid.get(wtxid) {
                                    frames.push(&chain.txs[i].frame);
                                }
                            }
                            Inventory::WitnessBlock(hash) => {
                                if let Some(&b) = chain.by_hash.get(hash) {
                                    frames.push(&chain.blocks[b].frame);
                                    blocks_sent += 1;
                                }
                            }
                            _ => {}
                        }
                    }
                    if !frames.is_empty() {
                        send(&mut writer, &mut log, &frames).await?;
                    }
                }
                Heard::Ping(nonce) => {
                    send(&mut writer, &mut log, &[&chain::frame(NetworkMessage::Pong(nonce))]).await?;
                }
                Heard::Version | Heard::Verack => {}
            },
            _ = tokio::time::sleep_until(due.unwrap_or(start)), if due.is_some() => {
                let now = Instant::now();
                while let Some(&(at, event)) = chain.schedule.get(next) {
                    if start + at > now {
                        break;
                    }
                    next += 1;
                    match event {
                        Event::TxArrives(i) => announce.push(i),
                        Event::Trickle => {
                            announce.retain(|i| !confirmed.contains(i));
                            if announce.is_empty() {
                                continue;
                            }
                            let items: Vec<Inventory> = announce
                                .drain(..announce.len().min(MAX_INV_ENTRIES))
                                .map(|i| Inventory::WTx(chain.txs[i].wtxid))
                                .collect();
                            send(&mut writer, &mut log, &[&chain::frame(NetworkMessage::Inv(items))]).await?;
                        }
                        Event::Block(b) => {
                            confirmed.extend(chain.blocks[b].txs.iter().copied());
                            let at = send(&mut writer, &mut log, &[&chain.blocks[b].headers_frame]).await?;
                            log.block_announced.push(at);
                        }
                        Event::Ping => {
                            send(&mut writer, &mut log, &[&chain::frame(NetworkMessage::Ping(rand::random()))]).await?;
                        }
                    }
                }
            }
        }
    }
    log.ended = Some(Instant::now());
    writer.shutdown().await?;
    // The proxy closes our read side once the remote has closed.
    let _ = tokio::time::timeout(WAIT, listening).await;
    Ok(log)
}

/// A session that only does the handshake and the version exchange (for
/// first-flight sizes).
pub async fn handshake_only(proxy: SocketAddr, target: SocketAddr) -> anyhow::Result<()> {
    let stream = socks_connect(proxy, target).await?;
    let (reader, mut writer) = stream.into_split();
    let (heard_tx, mut rx) = mpsc::unbounded_channel();
    let listening = tokio::spawn(listen(reader, heard_tx));
    writer.write_all(&client_version(target)).await?;
    for _ in 0..8 {
        if matches!(heard(&mut rx).await?, Heard::Version) {
            break;
        }
    }
    writer.shutdown().await?;
    let _ = tokio::time::timeout(WAIT, listening).await;
    Ok(())
}
