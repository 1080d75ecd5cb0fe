//! What the two handshake targets (`upgrade_handshake`, `respond_handshake`)
//! share: a runtime with tokio's clock paused, the input read as a plan, the
//! other side's key, packets and corruption as the plan says, and chunked
//! writes over the in-memory stream.

use std::future::Future;

use bip324_proxy::v2::PacketEncoder;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

pub const MAGIC: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];

/// Runs `session` on a current-thread runtime whose clock is paused, so
/// timeouts and deadlines fire at once.
pub fn run_paused<F: Future>(session: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    runtime.block_on(session)
}

/// An in-memory stream: our end, and the other side's end driven on a task
/// of its own by `raw` (even `mode`; bit 1 says whether it stays silent
/// after sending) or by `structured` (odd `mode`), with the rest of the input.
pub fn spawn_other_side<T, R, S>(
    mode: u8,
    rest: &[u8],
    raw: impl FnOnce(DuplexStream, Vec<u8>, bool) -> R,
    structured: impl FnOnce(DuplexStream, Vec<u8>) -> S,
) -> (DuplexStream, JoinHandle<T>)
where
    T: Send + 'static,
    R: Future<Output = T> + Send + 'static,
    S: Future<Output = T> + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let other = if mode & 1 == 0 {
        tokio::spawn(raw(theirs, rest.to_vec(), mode & 2 != 0))
    } else {
        tokio::spawn(structured(theirs, rest.to_vec()))
    };
    (ours, other)
}

/// A fresh secret key and its ElligatorSwift encoding, the 64 bytes sent first.
pub fn fresh_key() -> (secp256k1::SecretKey, [u8; 64]) {
    let secp = secp256k1::Secp256k1::new();
    let secret = secp256k1::SecretKey::new(&mut rand::thread_rng());
    let ours = secp256k1::ellswift::ElligatorSwift::from_seckey(&secp, secret, None).to_array();
    (secret, ours)
}

/// Reads input bytes one field at a time; missing bytes read as zero.
pub struct Plan<'a>(pub &'a [u8]);

impl Plan<'_> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// Raw mode's input: the first byte is the chunk size (at least 1), the
/// rest what the other side sends.
pub fn raw_chunks(input: &[u8]) -> (usize, &[u8]) {
    match input.split_first() {
        Some((&c, rest)) => (usize::from(c).max(1), rest),
        None => (1, &[]),
    }
}

/// Writes `bytes` in pieces of `chunk` bytes; `false` once the other end is gone.
pub async fn write_in_chunks(stream: &mut DuplexStream, bytes: &[u8], chunk: usize) -> bool {
    for piece in bytes.chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return false;
        }
    }
    true
}

/// Appends to `wire` the packets after the garbage terminator as the plan
/// says: up to 3 decoys (the first one authenticating `garbage`), the version
/// packet (up to 63 bytes) and up to 2 packets after it. Returns those last
/// packets (contents, ignore bit), or `None` when one does not encode.
pub fn planned_packets(
    plan: &mut Plan<'_>,
    encoder: &mut PacketEncoder,
    garbage: &[u8],
    wire: &mut bytes::BytesMut,
) -> Option<Vec<(Vec<u8>, bool)>> {
    let decoys = plan.byte() % 4;
    let mut aad = garbage;
    for _ in 0..decoys {
        let len = usize::from(plan.byte());
        let contents = plan.bytes(len);
        encoder.encode_packet(&[], &contents, true, aad, wire).ok()?;
        aad = &[];
    }
    let version_len = usize::from(plan.byte() % 64);
    let version = plan.bytes(version_len);
    encoder.encode_packet(&[], &version, false, aad, wire).ok()?;
    let mut after = Vec::new();
    for _ in 0..plan.byte() % 3 {
        let len = usize::from(plan.byte());
        let contents = plan.bytes(len);
        let ignore = plan.byte() & 1 == 1;
        encoder.encode_packet(&[], &contents, ignore, &[], wire).ok()?;
        after.push((contents, ignore));
    }
    Some(after)
}

/// Whether `terminator`'s first occurrence after `garbage` is the real one
/// (random garbage that happens to contain it earlier may legitimately fail).
pub fn terminator_is_first(garbage: &[u8], terminator: &[u8; 16]) -> bool {
    let mut sent = garbage.to_vec();
    sent.extend_from_slice(terminator);
    sent.windows(16).position(|w| w == terminator) == Some(garbage.len())
}

/// The plan's one corruption of the bytes on the wire: none, a flipped bit,
/// a truncation, or extra bytes after the last packet (the next packet's
/// start, which leaves the handshake and the packets before it intact).
/// Returns whether the handshake's own bytes were damaged.
pub fn corrupt(plan: &mut Plan<'_>, wire: &mut bytes::BytesMut) -> bool {
    let corruption = plan.byte() % 4;
    let position = usize::from(plan.u16());
    match corruption {
        1 if !wire.is_empty() => {
            let at = position % wire.len();
            wire[at] ^= 1 << (plan.byte() % 8);
            true
        }
        2 => {
            let at = position % (wire.len() + 1);
            wire.truncate(at);
            true
        }
        3 => {
            let extra_len = usize::from(plan.byte());
            let extra = plan.bytes(extra_len);
            wire.extend_from_slice(&extra);
            false
        }
        _ => false,
    }
}
