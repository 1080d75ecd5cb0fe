//! The BIP324 handshake as initiator, the way Bitcoin Core runs it, in two
//! halves the session can run apart:
//!
//! 1. [`send_key`]: our ElligatorSwift key and 0..=4095 random garbage
//!    bytes, one write. It needs no network: the magic only enters the key
//!    derivation. The session sends it right after the TCP connect, while
//!    the client is still answering SOCKS5 (see docs/DESIGN.md, "Key early").
//! 2. [`complete`]: the responder's key; our garbage terminator, decoys,
//!    (empty) version packet and, in the same write, the client's first
//!    message; then the responder's garbage, terminator, decoys and version
//!    packet, whose contents are ignored.
//!
//! The ECDH and the key derivation run once per session, in `v2.rs`
//! (`SessionKeys::derive`, checked against the official vectors), and the
//! same ciphers carry the handshake's packets and the relay's. The `bip324`
//! crate is our peer in the interoperability tests, not a step here.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rand::RngCore;
use secp256k1::ellswift::ElligatorSwift;
use secp256k1::{All, Secp256k1, SecretKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

use crate::metrics::KeyPoolCounters;
use crate::shaping::{HandshakePolicy, HandshakeShape, MIN_DECOY_WIRE_BYTES, Padder};
use crate::v1::Magic;
pub use crate::v2::MAX_GARBAGE_LEN;
use crate::v2::{
    DecodedPacket, ELLSWIFT_LEN, GARBAGE_TERMINATOR_LEN, GarbageScan, PacketDecoder, PacketEncoder, Role, SessionKeys,
    V2Error, find_garbage_terminator,
};

pub(crate) static SECP: LazyLock<Secp256k1<All>> = LazyLock::new(Secp256k1::new);

/// A finished handshake: the packet stream in both directions.
pub struct V2Channel {
    pub session_id: [u8; 32],
    pub encoder: PacketEncoder,
    pub decoder: PacketDecoder,
    /// Bytes the remote sent after its version packet.
    pub leftover: BytesMut,
}

/// How a remote that never answered went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    Closed,
    Reset,
    TimedOut,
}

/// Why the handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Bitcoin Core's sign of a v1-only peer: not one byte after our key.
    #[error("remote does not speak v2: it {} without sending a byte after our key", describe_silence(*.0))]
    NoResponse(Silence),
    #[error("remote {} the connection during the handshake after {received} bytes", if *.reset { "reset" } else { "closed" })]
    ClosedMidway { received: usize, reset: bool },
    #[error("handshake timed out after {received} bytes from the remote")]
    TimedOut { received: usize },
    #[error("no garbage terminator within {} bytes", MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN)]
    NoGarbageTerminator,
    #[error("handshake packet of {len} bytes exceeds the {max}-byte limit")]
    PacketTooLarge { len: usize, max: usize },
    #[error("handshake: {0}")]
    Protocol(bip324::Error),
    #[error("handshake: {0}")]
    Packet(#[from] V2Error),
    #[error("handshake I/O: {0}")]
    Io(io::Error),
}

fn describe_silence(silence: Silence) -> &'static str {
    match silence {
        Silence::Closed => "closed the connection",
        Silence::Reset => "reset the connection",
        Silence::TimedOut => "timed out",
    }
}

impl UpgradeError {
    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpgradeError::NoResponse(_) => "no_response",
            UpgradeError::ClosedMidway { .. } => "closed_midway",
            UpgradeError::TimedOut { .. } => "timeout",
            UpgradeError::NoGarbageTerminator => "no_garbage_terminator",
            UpgradeError::PacketTooLarge { .. } => "packet_too_large",
            UpgradeError::Protocol(_) | UpgradeError::Packet(_) => "protocol",
            UpgradeError::Io(_) => "io_error",
        }
    }

    /// True when Bitcoin Core would retry this peer with v1.
    pub fn remote_is_v1_only(&self) -> bool {
        matches!(self, UpgradeError::NoResponse(_))
    }
}

/// A fresh ephemeral secret and its ElligatorSwift encoding, for either
/// role (`respond.rs` makes its keys here too). The encoding is randomised
/// with fresh auxiliary bytes, as BIP324 asks, so it is uniform.
pub(crate) fn ephemeral_key() -> (SecretKey, [u8; ELLSWIFT_LEN]) {
    let mut rng = rand::thread_rng();
    let secret = loop {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        RngCore::fill_bytes(&mut rng, &mut bytes[..]);
        // Fails only for zero or values >= the curve order (probability ~2^-128).
        if let Ok(key) = SecretKey::from_slice(&bytes[..]) {
            break key;
        }
    };
    let mut aux = [0u8; 32];
    RngCore::fill_bytes(&mut rng, &mut aux);
    let encoded = ElligatorSwift::from_seckey(&SECP, secret, Some(aux)).to_array();
    (secret, encoded)
}

/// A key whose first four bytes are the network magic is a v1 message, not
/// a key (BIP324 "Handshake"; the `bip324` crate and Bitcoin Core refuse it).
pub(crate) fn check_their_key(theirs: &[u8; ELLSWIFT_LEN], magic: &Magic) -> Result<(), TailError> {
    if theirs[..magic.len()] == magic[..] {
        return Err(TailError::Protocol(bip324::Error::V1Protocol));
    }
    Ok(())
}

/// How a handshake read or write failed, before a role names it.
#[derive(Debug)]
pub(crate) enum IoFailure {
    /// The deadline passed.
    TimedOut,
    /// The remote closed (`reset`: reset or aborted) the connection.
    Closed {
        reset: bool,
    },
    Io(io::Error),
}

/// What a role's handshake calls each failure, given how many bytes the
/// remote had sent (silence means something else to an initiator than to a
/// responder).
pub(crate) trait HandshakeErrors: From<TailError> {
    fn from_io(failure: IoFailure, received: usize) -> Self;
}

impl HandshakeErrors for UpgradeError {
    fn from_io(failure: IoFailure, received: usize) -> Self {
        match (failure, received) {
            (IoFailure::TimedOut, 0) => UpgradeError::NoResponse(Silence::TimedOut),
            (IoFailure::TimedOut, received) => UpgradeError::TimedOut { received },
            (IoFailure::Closed { reset: false }, 0) => UpgradeError::NoResponse(Silence::Closed),
            (IoFailure::Closed { reset: true }, 0) => UpgradeError::NoResponse(Silence::Reset),
            (IoFailure::Closed { reset }, received) => UpgradeError::ClosedMidway { received, reset },
            (IoFailure::Io(e), _) => UpgradeError::Io(e),
        }
    }
}

/// The remote's side of a handshake, in either role: every read and write
/// under one deadline, failures counted by how many bytes came so far and
/// named by the role's error type `E`.
pub(crate) struct HandshakeIo<'s, S, E> {
    stream: &'s mut S,
    deadline: Instant,
    received: usize,
    errors: std::marker::PhantomData<fn() -> E>,
}

impl<'s, S: AsyncRead + AsyncWrite + Unpin, E: HandshakeErrors> HandshakeIo<'s, S, E> {
    /// `already` bytes were read before (they count towards the totals).
    pub(crate) fn new(stream: &'s mut S, deadline: Instant, already: usize) -> Self {
        HandshakeIo { stream, deadline, received: already, errors: std::marker::PhantomData }
    }

    /// One read into `buf` (with room for at least `want` bytes).
    pub(crate) async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> Result<(), E> {
        buf.reserve(want.max(4096));
        match timeout_at(self.deadline, self.stream.read_buf(buf)).await {
            Err(_) => Err(self.fail(IoFailure::TimedOut)),
            Ok(Ok(0)) => Err(self.fail(IoFailure::Closed { reset: false })),
            Ok(Ok(n)) => {
                self.received += n;
                Ok(())
            }
            Ok(Err(e)) => Err(self.io_error(e)),
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), E> {
        match timeout_at(self.deadline, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.io_error(e)),
            Err(_) => Err(self.fail(IoFailure::TimedOut)),
        }
    }

    fn fail(&self, failure: IoFailure) -> E {
        E::from_io(failure, self.received)
    }

    fn io_error(&self, e: io::Error) -> E {
        let reset = matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
        );
        self.fail(if reset { IoFailure::Closed { reset: true } } else { IoFailure::Io(e) })
    }
}

/// The client's first message as v2 contents, to go out in the handshake's
/// first encrypted flight.
#[derive(Debug, Clone, Copy)]
pub struct FirstMessage<'a> {
    pub message_type: &'a [u8],
    pub payload: &'a [u8],
}

/// Our ephemeral key for one handshake, made ahead of time or on the spot:
/// a secret and its ElligatorSwift encoding. It belongs to no network (the
/// magic only enters the key derivation), so one pool serves them all and
/// the key can go out before the client has said which network it speaks.
pub struct InitiatorKey {
    secret: SecretKey,
    encoded: [u8; ELLSWIFT_LEN],
}

impl InitiatorKey {
    /// A fresh key pair (about 30 µs of CPU).
    pub fn generate() -> Self {
        let (secret, encoded) = ephemeral_key();
        InitiatorKey { secret, encoded }
    }
}

/// Keys generated ahead of time, so key generation is off each session's
/// critical path. Every key is used once; the pool refills itself on a
/// blocking thread when it runs low. Each key taken counts as a hit (it was
/// ready) or a miss (made on the spot: the pool was empty).
pub struct KeyPool {
    keys: Mutex<Vec<InitiatorKey>>,
    depth: usize,
    refilling: AtomicBool,
    counters: KeyPoolCounters,
}

impl KeyPool {
    pub fn new(depth: usize, counters: KeyPoolCounters) -> Arc<Self> {
        Arc::new(KeyPool {
            keys: Mutex::new(Vec::with_capacity(depth)),
            depth,
            refilling: AtomicBool::new(false),
            counters,
        })
    }

    /// A key: from the pool when one is ready, else made now.
    pub fn take(self: &Arc<Self>) -> InitiatorKey {
        let (key, low) = {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            let key = keys.pop();
            (key, keys.len() <= self.depth / 2)
        };
        if low && !self.refilling.swap(true, Ordering::AcqRel) {
            let pool = self.clone();
            // A runtime is always present in the proxy; without one (unit
            // tests), keys are simply made on demand.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn_blocking(move || pool.refill());
            } else {
                self.refilling.store(false, Ordering::Release);
            }
        }
        match key {
            Some(key) => {
                self.counters.hit.inc();
                key
            }
            None => {
                self.counters.miss.inc();
                InitiatorKey::generate()
            }
        }
    }

    /// Tops the pool up to its depth.
    pub fn refill(&self) {
        loop {
            if self.keys.lock().unwrap_or_else(|e| e.into_inner()).len() >= self.depth {
                break;
            }
            let key = InitiatorKey::generate();
            self.keys.lock().unwrap_or_else(|e| e.into_inner()).push(key);
        }
        self.refilling.store(false, Ordering::Release);
    }
}

/// Runs the whole handshake on `remote` for the network `magic` with our
/// `key`, sending the client's first message (if any) as the first
/// application packet.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    remote: &mut S,
    key: InitiatorKey,
    magic: Magic,
    first_message: Option<FirstMessage<'_>>,
    handshake_timeout: Duration,
) -> Result<V2Channel, UpgradeError> {
    // Core's shape: a random garbage length in 0..=MAX_GARBAGE_LEN, no decoys.
    let shape = HandshakePolicy::default().draw(&mut rand::thread_rng());
    let sent = send_key(remote, key, &shape, handshake_timeout).await?;
    complete(remote, sent, magic, first_message, handshake_timeout, None).await
}

/// Our first flight is on the wire: what the rest of the handshake needs.
pub struct KeySent {
    key: InitiatorKey,
    garbage: Vec<u8>,
    decoy_lens: Vec<usize>,
}

impl KeySent {
    /// Wire bytes of the handshake decoys [`complete`] will send.
    pub fn decoy_wire_bytes(&self) -> usize {
        self.decoy_lens.iter().map(|len| len + MIN_DECOY_WIRE_BYTES).sum()
    }
}

/// The first half: our key and `shape.garbage_len` random garbage bytes, in
/// one write under `handshake_timeout`. The decoys of `shape` go out with
/// our version packet in [`complete`].
pub async fn send_key<S: AsyncRead + AsyncWrite + Unpin>(
    remote: &mut S,
    key: InitiatorKey,
    shape: &HandshakeShape,
    handshake_timeout: Duration,
) -> Result<KeySent, UpgradeError> {
    let mut io = HandshakeIo::<_, UpgradeError>::new(remote, Instant::now() + handshake_timeout, 0);
    let mut garbage = vec![0u8; shape.garbage_len.min(MAX_GARBAGE_LEN)];
    RngCore::fill_bytes(&mut rand::thread_rng(), &mut garbage);
    let mut flight = Vec::with_capacity(ELLSWIFT_LEN + garbage.len());
    flight.extend_from_slice(&key.encoded);
    flight.extend_from_slice(&garbage);
    io.write_all(&flight).await?;
    Ok(KeySent { key, garbage, decoy_lens: shape.decoy_lens.clone() })
}

/// The second half, for the network `magic`, under a fresh
/// `handshake_timeout`: the responder's key; our garbage terminator, decoys
/// and version packet, then the client's first message under the same
/// cipher, and with `padder` a decoy that brings this whole encrypted
/// flight to a bucket boundary, in one write; then the responder's garbage,
/// decoys and version packet.
pub async fn complete<S: AsyncRead + AsyncWrite + Unpin>(
    remote: &mut S,
    sent: KeySent,
    magic: Magic,
    first_message: Option<FirstMessage<'_>>,
    handshake_timeout: Duration,
    padder: Option<&mut Padder>,
) -> Result<V2Channel, UpgradeError> {
    let mut io = HandshakeIo::<_, UpgradeError>::new(remote, Instant::now() + handshake_timeout, 0);
    let KeySent { key, garbage, decoy_lens } = sent;

    // The responder's key.
    let mut inbound = BytesMut::new();
    io.read_at_least(&mut inbound, ELLSWIFT_LEN).await?;
    let mut theirs = [0u8; ELLSWIFT_LEN];
    theirs.copy_from_slice(&inbound[..ELLSWIFT_LEN]);
    inbound.advance(ELLSWIFT_LEN);
    check_their_key(&theirs, &magic)?;
    let keys = SessionKeys::derive(&key.secret, &key.encoded, &theirs, Role::Initiator, &magic);

    let mut flight = BytesMut::new();
    let mut encoder = keys.encode_handshake_tail(&garbage, &decoy_lens, &mut flight)?;
    if let Some(first) = first_message {
        encoder.encode(first.message_type, first.payload, &mut flight)?;
    }
    // The client's VERSION has a size of its own (user agent, relay flag):
    // padded like any other write.
    if let Some(contents) = padder.and_then(|padder| padder.decoy_for(flight.len())) {
        encoder.encode_decoy(contents, &mut flight)?;
    }
    io.write_all(&flight).await?;

    // The responder's garbage, decoys and version packet.
    let (decoder, leftover) = receive_garbage_and_version(&mut io, inbound, &keys).await?;
    Ok(V2Channel { session_id: *keys.session_id(), encoder, decoder, leftover })
}

/// How the part of the handshake both roles share can fail: from the
/// remote's key on, its garbage, decoys and version packet.
#[derive(Debug)]
pub(crate) enum TailError {
    NoGarbageTerminator,
    PacketTooLarge {
        len: usize,
        max: usize,
    },
    /// The remote's key is a v1 message (`bip324::Error::V1Protocol`).
    Protocol(bip324::Error),
    /// A packet failed authentication.
    Packet(V2Error),
}

impl From<V2Error> for TailError {
    fn from(error: V2Error) -> Self {
        match error {
            V2Error::PacketTooLarge { len, max } => TailError::PacketTooLarge { len, max },
            other => TailError::Packet(other),
        }
    }
}

impl From<TailError> for UpgradeError {
    fn from(error: TailError) -> Self {
        match error {
            TailError::NoGarbageTerminator => UpgradeError::NoGarbageTerminator,
            TailError::PacketTooLarge { len, max } => UpgradeError::PacketTooLarge { len, max },
            TailError::Protocol(e) => UpgradeError::Protocol(e),
            TailError::Packet(e) => UpgradeError::Packet(e),
        }
    }
}

/// The reads the shared part of the handshake needs; each role's reader
/// classifies its own I/O failures (silence means something else to an
/// initiator than to a responder).
pub(crate) trait HandshakeRead {
    type Error: From<TailError>;
    /// Reads at least one more byte into `buf`, reserving room for `want`.
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> Result<(), Self::Error>;

    /// Reads until `buf` holds at least `len` bytes.
    async fn read_at_least(&mut self, buf: &mut BytesMut, len: usize) -> Result<(), Self::Error> {
        while buf.len() < len {
            self.read_into(buf, len - buf.len()).await?;
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, E: HandshakeErrors> HandshakeRead for HandshakeIo<'_, S, E> {
    type Error = E;

    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> Result<(), E> {
        HandshakeIo::read_into(self, buf, want).await
    }
}

/// The remote's garbage up to its terminator (searched within the first
/// 4095 + 16 bytes; each read adds a bounded chunk), then its decoys and its
/// version packet (contents ignored, as BIP324 asks), each packet's length
/// checked against [`MAX_CONTENTS_BYTES`](crate::v2::MAX_CONTENTS_BYTES) by
/// the decoder before the packet is buffered. The first packet after the
/// terminator authenticates the garbage (AAD). The same for both roles.
/// `received` holds what came after the remote's key. Returns the decoder,
/// positioned after the remote's version packet, and the bytes after it.
pub(crate) async fn receive_garbage_and_version<R: HandshakeRead>(
    io: &mut R,
    mut received: BytesMut,
    keys: &SessionKeys,
) -> Result<(PacketDecoder, BytesMut), R::Error> {
    let mut resume = 0;
    let garbage_len = loop {
        match find_garbage_terminator(&received, keys.recv_garbage_terminator(), resume) {
            GarbageScan::Found { garbage_len } => break garbage_len,
            GarbageScan::NeedMore { resume: next } => resume = next,
            GarbageScan::TooLong => return Err(TailError::NoGarbageTerminator.into()),
        }
        io.read_into(&mut received, 1).await?;
    };
    let mut inbound = received.split_off(garbage_len + GARBAGE_TERMINATOR_LEN);
    let garbage = received;

    let mut decoder = keys.decoder(0);
    let mut aad = &garbage[..garbage_len];
    loop {
        match decoder.decode_with_aad(&mut inbound, aad).map_err(TailError::from)? {
            DecodedPacket::NeedMore { total } => io.read_at_least(&mut inbound, total).await?,
            DecodedPacket::Packet { ignore, len, .. } => {
                inbound.advance(len);
                aad = &[];
                if !ignore {
                    return Ok((decoder, inbound));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pool_hands_out_each_key_once() {
        let counters = KeyPoolCounters::default();
        let pool = KeyPool::new(2, counters.clone());
        pool.refill();
        let keys: Vec<InitiatorKey> = (0..3).map(|_| pool.take()).collect();
        assert_eq!((counters.hit.get(), counters.miss.get()), (2, 1), "two ready keys, then one made on the spot");
        let secrets: Vec<[u8; 32]> = keys.iter().map(|k| k.secret.secret_bytes()).collect();
        assert_ne!(secrets[0], secrets[1]);
        assert_ne!(secrets[1], secrets[2], "an empty pool makes a fresh key");
        for key in &keys {
            let public = secp256k1::PublicKey::from_secret_key(&SECP, &key.secret);
            let decoded = secp256k1::PublicKey::from_ellswift(ElligatorSwift::from_array(key.encoded));
            assert_eq!(decoded, public, "the encoding is the secret's public key");
        }
    }
}
