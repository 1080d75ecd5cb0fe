//! Fuzzes the initiator handshake (`upgrade::upgrade`) with the remote's side
//! chosen by the input, over an in-memory stream, with tokio's clock paused so
//! timeouts fire at once.
//!
//! The first input byte picks a mode:
//!
//! - even: **raw**. The rest is everything the remote sends, delivered in
//!   chunks of an input-chosen size, then the remote closes (or, by a bit of
//!   the mode byte, stays silent until the handshake times out). It cannot
//!   know our key, so it never produces a valid terminator: the handshake must
//!   fail cleanly (no panic, no allocation beyond the limits).
//! - odd: **structured**. A real responder (keys from `v2::SessionKeys`):
//!   input-chosen garbage length (up to 5,000, past the 4,095 limit), decoys
//!   before the version packet, version packet contents and first packets
//!   after it, and then one input-chosen corruption of the bytes on the wire:
//!   none, a flipped bit, a truncation, or extra garbage. Without corruption
//!   and within the garbage limit the handshake must succeed with the
//!   responder's session id; with one, it may fail but must not panic.
#![no_main]

mod handshake;

use std::time::Duration;

use bip324_proxy::upgrade::{self, FirstMessage, InitiatorKey};
use bip324_proxy::v2::SessionKeys;
use bytes::BytesMut;
use handshake::{MAGIC, Plan};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, DuplexStream};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    handshake::run_paused(async {
        let (mut ours, remote) = handshake::spawn_other_side(mode, rest, raw_remote, structured_remote);
        let key = InitiatorKey::generate();
        let first = FirstMessage { message_type: &[18], payload: &[7; 8] };
        let outcome = upgrade::upgrade(&mut ours, key, MAGIC, Some(first), Duration::from_secs(10)).await;
        drop(ours);
        let expected = remote.await.unwrap();
        match (outcome, expected) {
            (Ok(channel), Some(session_id)) => assert_eq!(channel.session_id, session_id),
            (Err(e), Some(_)) => panic!("a well-formed responder failed: {e}"),
            (Ok(_), None) if mode & 1 == 0 => panic!("raw bytes completed a handshake"),
            _ => {}
        }
    });
});

/// Sends `bytes` in chunks of the size the first byte picks, then closes or stays silent.
async fn raw_remote(mut stream: DuplexStream, bytes: Vec<u8>, stay: bool) -> Option<[u8; 32]> {
    let (chunk, bytes) = handshake::raw_chunks(&bytes);
    if !handshake::write_in_chunks(&mut stream, bytes, chunk).await {
        return None;
    }
    if stay {
        read_until_closed(&mut stream).await;
    }
    None
}

/// Reads what the initiator sends until it closes.
async fn read_until_closed(stream: &mut DuplexStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// A responder following the input's plan; returns the session id when the
/// bytes it sent form a valid handshake.
async fn structured_remote(mut stream: DuplexStream, input: Vec<u8>) -> Option<[u8; 32]> {
    let mut plan = Plan(&input);
    let mut theirs = [0u8; 64];
    stream.read_exact(&mut theirs).await.ok()?;
    let (secret, ours) = handshake::fresh_key();
    let keys = SessionKeys::derive(&secret, &ours, &theirs, bip324_proxy::v2::Role::Responder, &MAGIC);
    let mut encoder = keys.encoder(0);

    let garbage_len = usize::from(plan.u16()) % 5001;
    let garbage = plan.bytes(garbage_len);
    let mut wire = BytesMut::new();
    wire.extend_from_slice(&ours);
    wire.extend_from_slice(&garbage);
    wire.extend_from_slice(&*keys.send_garbage_terminator());
    handshake::planned_packets(&mut plan, &mut encoder, &garbage, &mut wire)?;

    // A well-formed handshake: the garbage fits the limit and the terminator
    // is where it belongs, and no corruption damaged it (extra bytes after
    // the version packet are the first application data).
    let valid = garbage_len <= 4095 && handshake::terminator_is_first(&garbage, keys.send_garbage_terminator());
    let damaged = handshake::corrupt(&mut plan, &mut wire);
    let valid = valid && !damaged;
    let chunk = usize::from(plan.byte()).max(1) * 16;
    if !handshake::write_in_chunks(&mut stream, &wire, chunk).await {
        return None;
    }
    read_until_closed(&mut stream).await;
    valid.then_some(*keys.session_id())
}
