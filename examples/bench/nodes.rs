//! The remote end of every measured path: echo nodes that send each message
//! back unchanged.
//!
//! - The v2 node is a BIP324 responder. It does the handshake with
//!   `secp256k1` and the proxy's `v2` module (knowing its own secret key,
//!   it derives the session keys with `SessionKeys::derive`), then echoes
//!   every genuine packet's contents with `v2::{PacketEncoder, PacketDecoder}`:
//!   ring's ChaCha20-Poly1305, the same cipher the proxy uses, so the node
//!   is not the slow hop.
//! - The v1 node echoes whole v1 frames byte for byte after checking the
//!   magic and length, the reference for the plain relay.
//!
//! Both batch: one read of up to `READ_CHUNK` bytes, every complete message
//! in it answered, all answers in one write. Receive buffers are released
//! while a connection is idle, so thousands of idle sessions cost little here.

use std::io;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bip324_proxy::upgrade::MAX_GARBAGE_LEN;
use bip324_proxy::v1::{HEADER_LEN, MAX_PAYLOAD_BYTES, Magic};
use bip324_proxy::v2::{
    DecodedPacket, ELLSWIFT_LEN, GARBAGE_TERMINATOR_LEN, PacketDecoder, PacketEncoder, SessionKeys,
};
use bytes::{Buf, BufMut, BytesMut};
use rand::{Rng, RngCore};
use secp256k1::ellswift::ElligatorSwift;
use secp256k1::{Secp256k1, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes asked of the kernel per read when no larger message is pending.
const READ_CHUNK: usize = 64 * 1024;
/// A stalled initiator is given up on after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Reply buffers above this are dropped after their write rather than kept.
const KEEP_REPLY_CAPACITY: usize = 256 * 1024;

static SECP: LazyLock<Secp256k1<secp256k1::All>> = LazyLock::new(Secp256k1::new);

/// Accepts BIP324 initiators on `listener` forever.
pub async fn serve_v2(listener: TcpListener, magic: Magic) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            // A failed session is the client's to notice and count.
            let _ = serve_v2_session(stream, magic).await;
        });
    }
}

/// Accepts v1 peers on `listener` forever.
pub async fn serve_v1(listener: TcpListener, magic: Magic) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = serve_v1_session(stream, magic).await;
        });
    }
}

/// A secret key and its ElligatorSwift encoding, as a responder sends it.
fn fresh_key() -> (SecretKey, [u8; ELLSWIFT_LEN]) {
    let mut rng = rand::thread_rng();
    let secret = loop {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        // Fails only for zero or values >= the curve order.
        if let Ok(key) = SecretKey::from_slice(&bytes) {
            break key;
        }
    };
    let encoded = ElligatorSwift::from_seckey(&SECP, secret, Some(rng.r#gen())).to_array();
    (secret, encoded)
}

/// Reads once into `buf`, with room for at least `total` bytes in all; end of stream is an error.
async fn read_some(stream: &mut TcpStream, buf: &mut BytesMut, total: usize) -> anyhow::Result<()> {
    buf.reserve(total.saturating_sub(buf.len()).max(4096));
    if stream.read_buf(buf).await? == 0 {
        bail!("peer closed during the handshake");
    }
    Ok(())
}

/// The packet stream once the handshake is done, and the bytes read past it.
struct Established {
    encoder: PacketEncoder,
    decoder: PacketDecoder,
    inbound: BytesMut,
}

async fn serve_v2_session(mut stream: TcpStream, magic: Magic) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let established =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, respond(&mut stream, magic)).await.context("handshake timed out")??;
    echo_v2(stream, established).await
}

/// BIP324 responder, the way Bitcoin Core answers: random garbage length,
/// no decoys, an empty version packet.
async fn respond(stream: &mut TcpStream, magic: Magic) -> anyhow::Result<Established> {
    let (secret, ours) = fresh_key();
    let mut inbound = BytesMut::new();
    while inbound.len() < ELLSWIFT_LEN {
        read_some(stream, &mut inbound, ELLSWIFT_LEN).await?;
    }
    let mut theirs = [0u8; ELLSWIFT_LEN];
    theirs.copy_from_slice(&inbound[..ELLSWIFT_LEN]);
    inbound.advance(ELLSWIFT_LEN);
    ensure!(theirs[..magic.len()] != magic, "a v1 peer");
    let keys = SessionKeys::derive(&secret, &ours, &theirs, bip324_proxy::v2::Role::Responder, &magic);

    // Key, garbage, garbage terminator and version packet in one write; the
    // version packet authenticates our garbage (BIP324: garbage as AAD of the
    // first packet).
    let mut garbage = vec![0u8; rand::thread_rng().gen_range(0..=MAX_GARBAGE_LEN)];
    rand::thread_rng().fill_bytes(&mut garbage);
    let mut encoder = keys.encoder(0);
    let mut flight = BytesMut::with_capacity(ELLSWIFT_LEN + garbage.len() + GARBAGE_TERMINATOR_LEN + 64);
    flight.put_slice(&ours);
    flight.put_slice(&garbage);
    flight.put_slice(keys.send_garbage_terminator());
    encoder.encode_packet(&[], &[], false, &garbage, &mut flight)?;
    stream.write_all(&flight).await?;

    // The initiator's garbage, up to its terminator.
    let search_limit = MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN;
    let terminator_end = loop {
        let window = &inbound[..inbound.len().min(search_limit)];
        if let Some(at) = window.windows(GARBAGE_TERMINATOR_LEN).position(|w| w == *keys.recv_garbage_terminator()) {
            break at + GARBAGE_TERMINATOR_LEN;
        }
        ensure!(inbound.len() < search_limit, "no garbage terminator");
        read_some(stream, &mut inbound, search_limit).await?;
    };
    let their_garbage = inbound.split_to(terminator_end);
    let mut aad = their_garbage[..terminator_end - GARBAGE_TERMINATOR_LEN].to_vec();

    // Decoys, then the initiator's version packet (contents ignored).
    let mut decoder = keys.decoder(0);
    loop {
        match decoder.decode_with_aad(&mut inbound, &aad)? {
            DecodedPacket::NeedMore { total } => read_some(stream, &mut inbound, total).await?,
            DecodedPacket::Packet { ignore, len, .. } => {
                inbound.advance(len);
                aad.clear();
                if !ignore {
                    return Ok(Established { encoder, decoder, inbound });
                }
            }
        }
    }
}

/// Every genuine packet's contents go back in a packet of our own.
async fn echo_v2(mut stream: TcpStream, established: Established) -> anyhow::Result<()> {
    let Established { mut encoder, mut decoder, mut inbound } = established;
    let mut replies = BytesMut::new();
    loop {
        let need = loop {
            match decoder.decode(&mut inbound)? {
                DecodedPacket::NeedMore { total } => break total,
                DecodedPacket::Packet { ignore, contents, len } => {
                    if !ignore {
                        encoder.encode(&[], &inbound[contents], &mut replies)?;
                    }
                    inbound.advance(len);
                }
            }
        };
        if !replies.is_empty() {
            stream.write_all(&replies).await?;
            if replies.capacity() > KEEP_REPLY_CAPACITY {
                replies = BytesMut::new();
            } else {
                replies.clear();
            }
        }
        if !read_echo_input(&mut stream, &mut inbound, need).await? {
            return Ok(());
        }
    }
}

/// Echo loop of the v1 node: complete frames are written back as they came.
async fn serve_v1_session(mut stream: TcpStream, magic: Magic) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut inbound = BytesMut::new();
    loop {
        let mut complete = 0;
        let need = loop {
            let rest = &inbound[complete..];
            let Some(header) = rest.first_chunk::<HEADER_LEN>() else { break HEADER_LEN };
            ensure!(header[..magic.len()] == magic, "wrong magic");
            let payload_len = u32::from_le_bytes([header[16], header[17], header[18], header[19]]) as usize;
            ensure!(payload_len <= MAX_PAYLOAD_BYTES, "payload of {payload_len} bytes");
            if rest.len() < HEADER_LEN + payload_len {
                break HEADER_LEN + payload_len;
            }
            complete += HEADER_LEN + payload_len;
        };
        if complete > 0 {
            stream.write_all(&inbound[..complete]).await?;
            inbound.advance(complete);
        }
        if !read_echo_input(&mut stream, &mut inbound, need).await? {
            return Ok(());
        }
    }
}

/// Waits for input and reads it, holding no buffer while the socket is idle.
/// `need` is the size of the message at the front of `inbound` once complete.
/// False on a clean end of stream.
async fn read_echo_input(stream: &mut TcpStream, inbound: &mut BytesMut, need: usize) -> anyhow::Result<bool> {
    loop {
        if inbound.is_empty() && inbound.capacity() > 0 {
            *inbound = BytesMut::new();
        }
        stream.readable().await?;
        inbound.reserve(need.saturating_sub(inbound.len()).max(READ_CHUNK));
        match stream.try_read_buf(inbound) {
            Ok(0) => {
                ensure!(inbound.is_empty(), "peer closed in the middle of a message");
                return Ok(false);
            }
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("reading"),
        }
    }
}
