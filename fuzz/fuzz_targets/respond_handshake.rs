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

mod handshake;

use bip324_proxy::respond::{self, FirstBytes};
use bip324_proxy::v2::{DecodedPacket, Role, SessionKeys};
use bytes::BytesMut;
use handshake::{MAGIC, Plan};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::time::{Duration, Instant};

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
    handshake::run_paused(async {
        let (mut ours, peer) = handshake::spawn_other_side(mode, rest, raw_peer, structured_peer);
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
    let (chunk, bytes) = handshake::raw_chunks(&bytes);
    if !handshake::write_in_chunks(&mut stream, bytes, chunk).await {
        return (Expect::Failure, None);
    }
    // Silent (the deadline ends it) or closed.
    (Expect::Failure, stay.then_some(stream))
}

/// An initiator following the input's plan.
async fn structured_peer(stream: DuplexStream, input: Vec<u8>) -> (Expect, Option<DuplexStream>) {
    let mut stream = stream;
    let expect = structured_flight(&mut stream, input).await;
    (expect, Some(stream))
}

async fn structured_flight(stream: &mut DuplexStream, input: Vec<u8>) -> Expect {
    let mut plan = Plan(&input);
    let (secret, ours) = handshake::fresh_key();
    let garbage_len = usize::from(plan.u16()) % 5001;
    let garbage = plan.bytes(garbage_len);
    let chunk = usize::from(plan.byte()).max(1) * 16;

    // The key and garbage go first; the terminator needs the responder's key.
    let mut first = ours.to_vec();
    first.extend_from_slice(&garbage);
    if !handshake::write_in_chunks(stream, &first, chunk).await {
        return Expect::Either;
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
    let Some(after) = handshake::planned_packets(&mut plan, &mut encoder, &garbage, &mut wire) else {
        return Expect::Either;
    };

    // Well formed: the garbage fits the limit and the terminator is where it
    // belongs; over-long garbage before a real terminator must fail.
    let mut expect = if !handshake::terminator_is_first(&garbage, keys.send_garbage_terminator()) {
        Expect::Either
    } else if garbage_len > 4095 {
        Expect::Failure
    } else {
        Expect::Success { session_id: *keys.session_id(), after }
    };
    // A damaged handshake may fail; extra bytes after the last packet leave
    // the handshake and the packets before them intact.
    if handshake::corrupt(&mut plan, &mut wire) && matches!(expect, Expect::Success { .. }) {
        expect = Expect::Either;
    }
    if !handshake::write_in_chunks(stream, &wire, chunk).await {
        return if matches!(expect, Expect::Failure) { Expect::Failure } else { Expect::Either };
    }
    expect
}
