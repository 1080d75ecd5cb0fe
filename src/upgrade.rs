//! The BIP324 handshake as initiator, the way Bitcoin Core runs it: our key
//! and 0..=4095 random garbage bytes; the responder's key; our garbage
//! terminator, our (empty) version packet and, in the same write, the
//! client's first message; then the responder's garbage, terminator, decoys
//! and version packet, whose contents are ignored.
//!
//! The `bip324` crate drives the handshake state machine. Its packet ciphers
//! stay private to it, so this module also derives the session keys itself
//! (from the secret key it hands the crate) and continues the packet stream
//! with `v2.rs`; the session ids of both must agree. That is also what lets
//! the client's first message go out right after our version packet, before
//! the crate considers the handshake complete.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bip324::{FillBytes, GarbageResult, Handshake, Initialized, ReceivedKey, Role, SentVersion, VersionResult};
use bytes::{Buf, BytesMut};
use rand::RngCore;
use secp256k1::{Secp256k1, SecretKey, SignOnly};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use zeroize::Zeroize;

use crate::metrics::KeyPoolCounters;
use crate::shaping::{HandshakePolicy, HandshakeShape, Padder};
use crate::v1::Magic;
use crate::v2::{
    ELLSWIFT_LEN, GARBAGE_TERMINATOR_LEN, HEADER_LEN, LENGTH_LEN, MAX_CONTENTS_BYTES, PacketDecoder, PacketEncoder,
    SessionKeys, TAG_LEN, V2Error,
};

/// BIP324: at most 4095 bytes of garbage precede the garbage terminator.
pub const MAX_GARBAGE_LEN: usize = 4095;

pub(crate) static SECP: LazyLock<Secp256k1<SignOnly>> = LazyLock::new(Secp256k1::signing_only);

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
    #[error("handshake: {0}")]
    Packet(#[from] V2Error),
    #[error(transparent)]
    Failed(#[from] HandshakeFailure),
}

/// How a handshake fails the same way in either role (the responder's
/// `RespondError` wraps it too).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("no garbage terminator within {} bytes", MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN)]
    NoGarbageTerminator,
    #[error("handshake packet of {len} bytes exceeds the {max}-byte limit")]
    PacketTooLarge { len: usize, max: usize },
    #[error("handshake: {0}")]
    Protocol(bip324::Error),
    #[error("handshake I/O: {0}")]
    Io(io::Error),
    /// Our own key derivation disagrees with the `bip324` crate's: a defect
    /// here, never the other side's doing.
    #[error("internal: derived {0} differs from the bip324 crate's")]
    KeyMismatch(DerivedValue),
}

impl HandshakeFailure {
    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeFailure::NoGarbageTerminator => "no_garbage_terminator",
            HandshakeFailure::PacketTooLarge { .. } => "packet_too_large",
            HandshakeFailure::Protocol(_) => "protocol",
            HandshakeFailure::Io(_) => "io_error",
            HandshakeFailure::KeyMismatch(_) => "internal",
        }
    }
}

/// What our key derivation is checked against the crate's on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivedValue {
    GarbageTerminator,
    SessionId,
}

impl std::fmt::Display for DerivedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DerivedValue::GarbageTerminator => "garbage terminator",
            DerivedValue::SessionId => "session id",
        })
    }
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
            UpgradeError::Packet(_) => "protocol",
            UpgradeError::Failed(failure) => failure.label(),
        }
    }

    /// True when Bitcoin Core would retry this peer with v1.
    pub fn remote_is_v1_only(&self) -> bool {
        matches!(self, UpgradeError::NoResponse(_))
    }
}

/// Hands the crate the secret key we generated, so we know it too (the
/// responder in `respond.rs` uses it the same way).
pub(crate) struct KnownSecret([u8; 32]);

impl FillBytes for KnownSecret {
    fn fill_bytes(&mut self, dest: &mut [u8; 32]) {
        dest.copy_from_slice(&self.0);
    }
}

impl Drop for KnownSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

pub(crate) fn fresh_secret() -> (KnownSecret, SecretKey) {
    let mut rng = rand::thread_rng();
    loop {
        let mut bytes = [0u8; 32];
        RngCore::fill_bytes(&mut rng, &mut bytes);
        // Fails only for zero or values >= the curve order (probability ~2^-128).
        if let Ok(key) = SecretKey::from_slice(&bytes) {
            return (KnownSecret(bytes), key);
        }
    }
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
pub(crate) trait HandshakeErrors: From<HandshakeFailure> {
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
            (IoFailure::Io(e), _) => HandshakeFailure::Io(e).into(),
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
/// the `bip324` crate's initial state plus the secret we handed it.
pub struct InitiatorKey {
    handshake: Handshake<Initialized>,
    secret: SecretKey,
}

impl InitiatorKey {
    /// A fresh key pair for the network `magic` (about 30 µs of CPU).
    pub fn generate(magic: Magic) -> Result<Self, UpgradeError> {
        let (mut known, secret) = fresh_secret();
        let handshake = Handshake::<Initialized>::new_with_rng(magic, Role::Initiator, &mut known, &*SECP)
            .map_err(HandshakeFailure::Protocol)?;
        Ok(InitiatorKey { handshake, secret })
    }
}

/// Keys generated ahead of time, per network, so key generation is off each
/// session's critical path. Every key is used once; the pool refills itself
/// on a blocking thread when it runs low. Each key taken counts as a hit
/// (it was ready) or a miss (made on the spot: the pool was empty, or the
/// network has none).
pub struct KeyPool {
    per_network: Vec<(Magic, Mutex<Vec<InitiatorKey>>)>,
    depth: usize,
    refilling: AtomicBool,
    counters: KeyPoolCounters,
}

impl KeyPool {
    pub fn new(magics: impl IntoIterator<Item = Magic>, depth: usize, counters: KeyPoolCounters) -> Arc<Self> {
        let per_network = magics.into_iter().map(|m| (m, Mutex::new(Vec::with_capacity(depth)))).collect();
        Arc::new(KeyPool { per_network, depth, refilling: AtomicBool::new(false), counters })
    }

    /// A key for `magic`: from the pool when one is ready, else made now.
    pub fn take(self: &Arc<Self>, magic: Magic) -> Result<InitiatorKey, UpgradeError> {
        let Some((_, keys)) = self.per_network.iter().find(|(m, _)| *m == magic) else {
            self.counters.miss.inc();
            return InitiatorKey::generate(magic);
        };
        let (key, low) = {
            let mut keys = keys.lock().unwrap_or_else(|e| e.into_inner());
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
                Ok(key)
            }
            None => {
                self.counters.miss.inc();
                InitiatorKey::generate(magic)
            }
        }
    }

    /// Tops every network up to the pool depth.
    pub fn refill(&self) {
        for (magic, keys) in &self.per_network {
            loop {
                if keys.lock().unwrap_or_else(|e| e.into_inner()).len() >= self.depth {
                    break;
                }
                let Ok(key) = InitiatorKey::generate(*magic) else { break };
                keys.lock().unwrap_or_else(|e| e.into_inner()).push(key);
            }
        }
        self.refilling.store(false, Ordering::Release);
    }
}

/// Runs the handshake on `remote` with our `key` (which fixes the network),
/// sending the client's first message (if any) as the first application packet.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    remote: &mut S,
    key: InitiatorKey,
    first_message: Option<FirstMessage<'_>>,
    handshake_timeout: Duration,
) -> Result<V2Channel, UpgradeError> {
    // Core's shape: a random garbage length in 0..=MAX_GARBAGE_LEN, no decoys.
    let shape = HandshakePolicy::default().draw(&mut rand::thread_rng());
    upgrade_shaped(remote, key, first_message, handshake_timeout, &shape, None).await
}

/// [`upgrade`] with this garbage length and these decoy packets between our
/// garbage terminator and our version packet (`shaping.rs` draws them), and
/// with `padder`, a decoy after the client's first message that brings the
/// whole encrypted flight to a bucket boundary.
pub async fn upgrade_shaped<S: AsyncRead + AsyncWrite + Unpin>(
    remote: &mut S,
    key: InitiatorKey,
    first_message: Option<FirstMessage<'_>>,
    handshake_timeout: Duration,
    shape: &HandshakeShape,
    padder: Option<&mut Padder>,
) -> Result<V2Channel, UpgradeError> {
    let mut io = HandshakeIo::<_, UpgradeError>::new(remote, Instant::now() + handshake_timeout, 0);
    let InitiatorKey { handshake, secret } = key;
    let magic = *handshake.magic();

    // Our key and garbage.
    let mut garbage = vec![0u8; shape.garbage_len.min(MAX_GARBAGE_LEN)];
    RngCore::fill_bytes(&mut rand::thread_rng(), &mut garbage);
    let mut first_flight = vec![0u8; Handshake::<Initialized>::send_key_len(Some(&garbage))];
    let handshake = handshake.send_key(Some(&garbage), &mut first_flight).map_err(HandshakeFailure::Protocol)?;
    let mut ours = [0u8; ELLSWIFT_LEN];
    ours.copy_from_slice(&first_flight[..ELLSWIFT_LEN]);
    io.write_all(&first_flight).await?;

    // The responder's key.
    let mut inbound = BytesMut::new();
    io.read_at_least(&mut inbound, ELLSWIFT_LEN).await?;
    let mut theirs = [0u8; ELLSWIFT_LEN];
    theirs.copy_from_slice(&inbound[..ELLSWIFT_LEN]);
    inbound.advance(ELLSWIFT_LEN);
    let handshake = handshake.receive_key(theirs).map_err(HandshakeFailure::Protocol)?;
    let keys = SessionKeys::derive(&secret, &ours, &theirs, Role::Initiator, &magic);

    // Garbage terminator, decoys (if any; the first packet after the
    // terminator carries the garbage as AAD, decoy or not, which the crate
    // does) and version packet from the crate, then the client's first
    // message under our own cipher, in one write.
    let decoys: Vec<Vec<u8>> = shape.decoy_lens.iter().map(|&len| vec![0u8; len]).collect();
    let decoy_refs: Vec<&[u8]> = decoys.iter().map(Vec::as_slice).collect();
    let decoy_refs = (!decoy_refs.is_empty()).then_some(&decoy_refs[..]);
    let mut second_flight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(decoy_refs)];
    let handshake = handshake.send_version(&mut second_flight, decoy_refs).map_err(HandshakeFailure::Protocol)?;
    if second_flight[..GARBAGE_TERMINATOR_LEN] != keys.send_garbage_terminator()[..] {
        return Err(HandshakeFailure::KeyMismatch(DerivedValue::GarbageTerminator).into());
    }
    let mut encoder = keys.encoder(1 + decoys.len() as u64);
    let mut flight = BytesMut::from(&second_flight[..]);
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
    let (packets_received, inbound) = receive_garbage_and_version(&mut io, handshake, inbound, &keys).await?;

    Ok(V2Channel {
        session_id: *keys.session_id(),
        encoder,
        decoder: keys.decoder(packets_received),
        leftover: inbound,
    })
}

/// The reads the shared part of the handshake needs; each role's reader
/// classifies its own I/O failures (silence means something else to an
/// initiator than to a responder).
pub(crate) trait HandshakeRead {
    type Error: From<HandshakeFailure>;
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

/// The remote's garbage up to its terminator (the crate searches the first
/// 4095 + 16 bytes and fails beyond; each read adds a bounded chunk), then
/// its decoys and its version packet (contents ignored), each bounded by
/// [`MAX_CONTENTS_BYTES`] before it is buffered. The same for both roles.
/// `received` holds what came after the remote's key. Returns how many
/// packets the remote sent (our decoder continues after them) and the bytes
/// after its version packet.
pub(crate) async fn receive_garbage_and_version<R: HandshakeRead>(
    io: &mut R,
    handshake: Handshake<SentVersion>,
    mut received: BytesMut,
    keys: &SessionKeys,
) -> Result<(u64, BytesMut), R::Error> {
    let mut handshake = handshake;
    let (mut handshake, terminator_end) = loop {
        match handshake.receive_garbage(&received) {
            Ok(GarbageResult::FoundGarbage { handshake, consumed_bytes }) => break (handshake, consumed_bytes),
            Ok(GarbageResult::NeedMoreData(waiting)) => handshake = waiting,
            Err(bip324::Error::NoGarbageTerminator) => return Err(HandshakeFailure::NoGarbageTerminator.into()),
            Err(e) => return Err(HandshakeFailure::Protocol(e).into()),
        }
        io.read_into(&mut received, 1).await?;
    };
    // The crate borrows the garbage (the first packet authenticates it);
    // what follows the terminator continues in a buffer of its own.
    let mut inbound = BytesMut::from(&received[terminator_end..]);

    let mut packets_received = 0u64;
    loop {
        io.read_at_least(&mut inbound, LENGTH_LEN).await?;
        let mut length = [0u8; LENGTH_LEN];
        length.copy_from_slice(&inbound[..LENGTH_LEN]);
        let rest = handshake.decrypt_packet_len(length).map_err(HandshakeFailure::Protocol)?;
        let contents_len = rest.saturating_sub(HEADER_LEN + TAG_LEN);
        if contents_len > MAX_CONTENTS_BYTES {
            return Err(HandshakeFailure::PacketTooLarge { len: contents_len, max: MAX_CONTENTS_BYTES }.into());
        }
        io.read_at_least(&mut inbound, LENGTH_LEN + rest).await?;
        let mut packet = inbound.split_to(LENGTH_LEN + rest);
        packets_received += 1;
        match handshake.receive_version(&mut packet[LENGTH_LEN..]).map_err(HandshakeFailure::Protocol)? {
            VersionResult::Complete { cipher } => {
                if cipher.id() != keys.session_id() {
                    return Err(HandshakeFailure::KeyMismatch(DerivedValue::SessionId).into());
                }
                return Ok((packets_received, inbound));
            }
            VersionResult::Decoy(next) => handshake = next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGTEST: Magic = [0xfa, 0xbf, 0xb5, 0xda];

    #[test]
    fn key_pool_hands_out_each_key_once() {
        let counters = KeyPoolCounters::default();
        let pool = KeyPool::new([REGTEST], 2, counters.clone());
        pool.refill();
        let keys: Vec<InitiatorKey> = (0..3).map(|_| pool.take(REGTEST).unwrap()).collect();
        assert_eq!((counters.hit.get(), counters.miss.get()), (2, 1), "two ready keys, then one made on the spot");
        let secrets: Vec<[u8; 32]> = keys.iter().map(|k| k.secret.secret_bytes()).collect();
        assert_ne!(secrets[0], secrets[1]);
        assert_ne!(secrets[1], secrets[2], "an empty pool makes a fresh key");
        assert!(keys.iter().all(|k| *k.handshake.magic() == REGTEST));
        // A network without a pool still gets a key for its own magic.
        let mainnet = pool.take([0xf9, 0xbe, 0xb4, 0xd9]).unwrap();
        assert_eq!(*mainnet.handshake.magic(), [0xf9, 0xbe, 0xb4, 0xd9]);
        assert_eq!((counters.hit.get(), counters.miss.get()), (2, 2));
    }
}
