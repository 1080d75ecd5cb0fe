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

use std::time::Duration;

use bip324_proxy::upgrade::{self, FirstMessage, InitiatorKey};
use bip324_proxy::v2::SessionKeys;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const MAGIC: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    runtime.block_on(async {
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let remote = if mode & 1 == 0 {
            tokio::spawn(raw_remote(theirs, rest.to_vec(), mode & 2 != 0))
        } else {
            tokio::spawn(structured_remote(theirs, rest.to_vec()))
        };
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
    let (chunk, bytes) = match bytes.split_first() {
        Some((&c, rest)) => (usize::from(c).max(1), rest.to_vec()),
        None => (1, Vec::new()),
    };
    for piece in bytes.chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return None;
        }
    }
    if stay {
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }
    None
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

/// A responder following the input's plan; returns the session id when the
/// bytes it sent form a valid handshake.
async fn structured_remote(mut stream: DuplexStream, input: Vec<u8>) -> Option<[u8; 32]> {
    let mut plan = Plan(&input);
    let mut theirs = [0u8; 64];
    stream.read_exact(&mut theirs).await.ok()?;
    let secp = secp256k1::Secp256k1::new();
    let secret = secp256k1::SecretKey::new(&mut rand::thread_rng());
    let ours = secp256k1::ellswift::ElligatorSwift::from_seckey(&secp, secret, None).to_array();
    let keys = SessionKeys::derive(&secret, &ours, &theirs, bip324_proxy::v2::Role::Responder, &MAGIC);
    let mut encoder = keys.encoder(0);

    let garbage_len = usize::from(plan.u16()) % 5001;
    let garbage = plan.bytes(garbage_len);
    let mut wire = BytesMut::new();
    wire.extend_from_slice(&ours);
    wire.extend_from_slice(&garbage);
    wire.extend_from_slice(&*keys.send_garbage_terminator());
    let decoys = plan.byte() % 4;
    let mut aad: &[u8] = &garbage;
    for _ in 0..decoys {
        let len = usize::from(plan.byte());
        let contents = plan.bytes(len);
        encoder.encode_packet(&[], &contents, true, aad, &mut wire).ok()?;
        aad = &[];
    }
    let version_len = usize::from(plan.byte() % 64);
    let version = plan.bytes(version_len);
    encoder.encode_packet(&[], &version, false, aad, &mut wire).ok()?;
    let after = plan.byte() % 3;
    for _ in 0..after {
        let len = usize::from(plan.byte());
        let contents = plan.bytes(len);
        encoder.encode_packet(&[], &contents, plan.byte() & 1 == 1, &[], &mut wire).ok()?;
    }

    // A well-formed handshake: the garbage fits the limit, and the first
    // occurrence of the terminator is the real one (random garbage that
    // happens to contain it earlier may legitimately fail).
    let first_terminator = wire[64..].windows(16).position(|w| w == *keys.send_garbage_terminator());
    let mut valid = garbage_len <= 4095 && first_terminator == Some(garbage_len);
    let corruption = plan.byte() % 4;
    let position = usize::from(plan.u16());
    match corruption {
        1 if !wire.is_empty() => {
            let at = position % wire.len();
            wire[at] ^= 1 << (plan.byte() % 8);
            valid = false;
        }
        2 => {
            let at = position % (wire.len() + 1);
            wire.truncate(at);
            valid = false;
        }
        3 => {
            let extra_len = usize::from(plan.byte());
            let extra = plan.bytes(extra_len);
            // Extra bytes after the version packet are the first application
            // data; the handshake itself still succeeds.
            wire.extend_from_slice(&extra);
        }
        _ => {}
    }
    let chunk = usize::from(plan.byte()).max(1) * 16;
    for piece in wire.chunks(chunk) {
        if stream.write_all(piece).await.is_err() {
            return None;
        }
    }
    // Read what the initiator sends until it closes.
    let mut sink = [0u8; 4096];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    valid.then_some(*keys.session_id())
}
