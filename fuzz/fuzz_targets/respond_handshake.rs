//! Fuzzes the responder handshake (`respond::respond`, inbound listeners) with
//! the initiator's side chosen by the input, over an in-memory stream, with
//! tokio's clock paused so the handshake deadline fires at once.
//!
//! The first input byte picks a mode:
//!
//! - even: **raw**. The rest is everything the peer sends, delivered in
//!   chunks of an input-chosen size, then the peer closes (or, by a bit of the
//!   mode byte, stays silent until the deadline). First the first-bytes rule
//!   (`respond::classify_first_bytes`) runs on every prefix: once decided, a
//!   decision never changes. The raw peer cannot know our key, so it never
//!   produces our garbage terminator: the handshake must fail cleanly.
//! - odd: **structured**. A real initiator (keys from `v2::SessionKeys`): its
//!   key and input-chosen garbage (up to 5,000 bytes, past the 4,095 limit),
//!   then, once our key is in, its terminator, decoys (the first one
//!   authenticating the garbage), the version packet and packets after it,
//!   with one input-chosen corruption on the wire: none, a flipped bit, a
//!   truncation, or extra bytes. Without corruption and within the garbage
//!   limit the handshake must succeed with the initiator's session id and
//!   the packets after the version packet must decode in order; garbage over
//!   the limit must fail; anything else may fail but must not panic.
#![no_main]

use bip324_proxy::respond::{self, FirstBytes};
use bip324_proxy::v2::{DecodedPacket, Role, SessionKeys};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::{Duration, Instant};

const MAGIC: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];

/// What the peer's bytes entitle it to.
enum Expect {
    /// A well-formed initiator: this session id, these packets after the
    /// version packet.
    Success { session_id: [u8; 32], after: Vec<(Vec<u8>, bool)> },
    /// The handshake must fail.
    Failure,
    /// Either outcome is fine.
    Either,
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_first_bytes(rest);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    runtime.block_on(async {
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let peer = if mode & 1 == 0 {
            tokio::spawn(raw_peer(theirs, rest.to_vec(), mode & 2 != 0))
        } else {
            tokio::spawn(structured_peer(theirs, rest.to_vec()))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = respond::respond(&mut ours, BytesMut::new(), MAGIC, deadline).await;
        // The peer has written everything by now (or gave up); its end stays
        // open until the checks are done.
        let (expected, _peer_end) = peer.await.unwrap();
        match (outcome, expected) {
            (Ok(mut channel), Expect::Success { session_id, after }) => {
                assert_eq!(channel.session_id, session_id);
                let mut buf = channel.leftover;
                for (contents, ignore) in after {
                    loop {
                        match channel.decoder.decode(&mut buf).unwrap() {
                            DecodedPacket::Packet { ignore: got_ignore, contents: range, len } => {
                                assert_eq!((&buf[range], got_ignore), (&contents[..], ignore));
                                let _ = buf.split_to(len);
                                break;
                            }
                            DecodedPacket::NeedMore { .. } => {
                                let read = tokio::time::timeout(Duration::from_secs(1), ours.read_buf(&mut buf)).await;
                                assert!(matches!(read, Ok(Ok(1..))), "a packet after the version packet is missing");
                            }
                        }
                    }
                }
            }
            (Err(e), Expect::Success { .. }) => panic!("a well-formed initiator failed: {e}"),
            (Ok(_), Expect::Failure) => panic!("the handshake completed for a peer that must fail"),
            _ => {}
        }
    });
});

/// The first-bytes rule on every prefix: "need more" only below 16 bytes,
/// and a decision never changes as bytes arrive.
fn check_first_bytes(bytes: &[u8]) {
    let mut decided = None;
    for len in 0..=bytes.len().min(64) {
        let now = respond::classify_first_bytes(&bytes[..len], &MAGIC);
        match (now, decided) {
            (FirstBytes::NeedMore, None) => assert!(len < 16),
            (FirstBytes::NeedMore, Some(_)) => panic!("decided, then need more"),
            (now, None) => decided = Some(now),
            (now, Some(before)) => assert_eq!(now, before),
        }
    }
}

/// Sends `bytes` in chunks of the size the first byte picks, then closes or stays silent.
async fn raw_peer(mut stream: DuplexStream, bytes: Vec<u8>, stay: bool) -> (Expect, Option<DuplexStream>) {
    let (chunk, bytes) = match bytes.split_first() {
        Some((&c, rest)) => (usize::from(c).max(1), rest.to_vec()),
        None => (1, Vec::new()),
    };
    for piece in bytes.chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return (Expect::Failure, None);
        }
    }
    // Silent (the deadline ends it) or closed.
    (Expect::Failure, stay.then_some(stream))
}

/// Reads input bytes one field at a time; missing bytes read as zero.
struct Plan<'a>(&'a [u8]);

impl Plan<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// An initiator following the input's plan.
async fn structured_peer(stream: DuplexStream, input: Vec<u8>) -> (Expect, Option<DuplexStream>) {
    let mut stream = stream;
    let expect = structured_flight(&mut stream, input).await;
    (expect, Some(stream))
}

async fn structured_flight(stream: &mut DuplexStream, input: Vec<u8>) -> Expect {
    let mut plan = Plan(&input);
    let secp = secp256k1::Secp256k1::new();
    let secret = secp256k1::SecretKey::new(&mut rand::thread_rng());
    let ours = secp256k1::ellswift::ElligatorSwift::from_seckey(&secp, secret, None).to_array();
    let garbage_len = usize::from(plan.u16()) % 5001;
    let garbage = plan.bytes(garbage_len);
    let chunk = usize::from(plan.byte()).max(1) * 16;

    // The key and garbage go first; the terminator needs the responder's key.
    let mut first = ours.to_vec();
    first.extend_from_slice(&garbage);
    for piece in first.chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return Expect::Either;
        }
    }
    let mut theirs = [0u8; 64];
    if stream.read_exact(&mut theirs).await.is_err() {
        // The responder gave up before its key: only over-long garbage or a
        // key that looks like v1 (never, in practice) explains that.
        return if garbage_len > 4095 { Expect::Failure } else { Expect::Either };
    }
    let keys = SessionKeys::derive(&secret, &ours, &theirs, Role::Initiator, &MAGIC);
    let mut encoder = keys.encoder(0);
    let mut wire = BytesMut::new();
    wire.extend_from_slice(&*keys.send_garbage_terminator());
    let decoys = plan.byte() % 4;
    let mut aad: &[u8] = &garbage;
    for _ in 0..decoys {
        let len = usize::from(plan.byte());
        let contents = plan.bytes(len);
        if encoder.encode_packet(&[], &contents, true, aad, &mut wire).is_err() {
            return Expect::Either;
        }
        aad = &[];
    }
    let version_len = usize::from(plan.byte() % 64);
    let version = plan.bytes(version_len);
    if encoder.encode_packet(&[], &version, false, aad, &mut wire).is_err() {
        return Expect::Either;
    }
    let mut after = Vec::new();
    for _ in 0..plan.byte() % 3 {
        let len = usize::from(plan.byte());
        let contents = plan.bytes(len);
        let ignore = plan.byte() & 1 == 1;
        if encoder.encode_packet(&[], &contents, ignore, &[], &mut wire).is_err() {
            return Expect::Either;
        }
        after.push((contents, ignore));
    }

    // Well formed: the garbage fits the limit and the terminator's first
    // occurrence is the real one (garbage that happens to contain it earlier
    // may legitimately fail).
    let mut sent = garbage.clone();
    sent.extend_from_slice(&*keys.send_garbage_terminator());
    let first_terminator = sent.windows(16).position(|w| w == *keys.send_garbage_terminator());
    let mut expect = if garbage_len > 4095 && first_terminator == Some(garbage_len) {
        Expect::Failure
    } else if first_terminator == Some(garbage_len) {
        Expect::Success { session_id: *keys.session_id(), after }
    } else {
        Expect::Either
    };
    let corruption = plan.byte() % 4;
    let position = usize::from(plan.u16());
    match corruption {
        1 if !wire.is_empty() => {
            let at = position % wire.len();
            wire[at] ^= 1 << (plan.byte() % 8);
            if matches!(expect, Expect::Success { .. }) {
                expect = Expect::Either;
            }
        }
        2 => {
            let at = position % (wire.len() + 1);
            wire.truncate(at);
            if matches!(expect, Expect::Success { .. }) {
                expect = Expect::Either;
            }
        }
        3 => {
            // Extra bytes after the last packet are the next packet's start:
            // the handshake and the packets before them are unaffected.
            let extra_len = usize::from(plan.byte());
            let extra = plan.bytes(extra_len);
            wire.extend_from_slice(&extra);
        }
        _ => {}
    }
    for piece in wire.chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return if matches!(expect, Expect::Failure) { Expect::Failure } else { Expect::Either };
        }
    }
    expect
}
