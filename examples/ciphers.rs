//! Why the packet cipher is not the `bip324` crate's: seal + open throughput
//! of its ChaCha20-Poly1305 against `bip324_proxy::v2` (ring) on the same
//! packets, and SHA256d (the v1 checksum) for scale. Then what one
//! handshake's key work costs: a key pair (what the key pool makes ahead of
//! time) and one ECDH + HKDF (`SessionKeys::derive`, once per session). One
//! thread, in memory.
//!
//! Run: `cargo run --release --example ciphers` (a few seconds).

#![forbid(unsafe_code)]

use std::time::Instant;

use anyhow::{Context, bail};
use bip324::{CipherSession, GarbageResult, Handshake, Initialized, PacketType, ReceivedKey, Role, SentVersion};
use bytes::BytesMut;

const MAGIC: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];
/// Payload pushed through each cipher per message size.
const TOTAL_BYTES: usize = 256 << 20;

/// Completes one side of the crate's handshake from the other side's version flight.
fn finish(handshake: Handshake<SentVersion>, flight: &[u8]) -> anyhow::Result<CipherSession> {
    let GarbageResult::FoundGarbage { mut handshake, consumed_bytes } = handshake.receive_garbage(flight)? else {
        bail!("no garbage terminator");
    };
    let rest = &flight[consumed_bytes..];
    handshake.decrypt_packet_len(rest[..3].try_into()?)?;
    let mut packet = rest[3..].to_vec();
    match handshake.receive_version(&mut packet)? {
        bip324::VersionResult::Complete { cipher } => Ok(cipher),
        bip324::VersionResult::Decoy(_) => bail!("unexpected decoy"),
    }
}

/// Both ends of a session set up by the `bip324` crate's own handshake.
fn crate_sessions() -> anyhow::Result<(CipherSession, CipherSession)> {
    let (mut initiator_key, mut responder_key) = ([0u8; 64], [0u8; 64]);
    let initiator = Handshake::<Initialized>::new(MAGIC, Role::Initiator)?.send_key(None, &mut initiator_key)?;
    let responder = Handshake::<Initialized>::new(MAGIC, Role::Responder)?.send_key(None, &mut responder_key)?;
    let initiator = initiator.receive_key(responder_key)?;
    let responder = responder.receive_key(initiator_key)?;
    let mut initiator_flight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(None)];
    let mut responder_flight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(None)];
    let initiator = initiator.send_version(&mut initiator_flight, None)?;
    let responder = responder.send_version(&mut responder_flight, None)?;
    Ok((finish(initiator, &responder_flight)?, finish(responder, &initiator_flight)?))
}

fn main() -> anyhow::Result<()> {
    println!("seal + open of one packet per message, {} MB per row, one thread", TOTAL_BYTES >> 20);
    for size in [1024usize, 1 << 20] {
        let messages = TOTAL_BYTES / size;
        let payload = vec![7u8; size];

        let (mut sender, mut receiver) = crate_sessions()?;
        let mut packet = vec![0u8; size + 20];
        let started = Instant::now();
        for _ in 0..messages {
            sender.outbound().encrypt(&payload, &mut packet, PacketType::Genuine, None)?;
            receiver.inbound().decrypt_packet_len(packet[..3].try_into()?);
            receiver.inbound().decrypt_in_place(&mut packet[3..], None)?;
        }
        let crate_rate = TOTAL_BYTES as f64 / started.elapsed().as_secs_f64() / 1e6;

        use bip324_proxy::v2::{Role, SessionKeys};
        let keys = SessionKeys::from_shared_secret(&[1; 32], Role::Initiator, &MAGIC);
        let peer = SessionKeys::from_shared_secret(&[1; 32], Role::Responder, &MAGIC);
        let mut encoder = keys.encoder(0);
        let mut decoder = peer.decoder(0);
        let mut wire = BytesMut::with_capacity(size + 20);
        let started = Instant::now();
        for _ in 0..messages {
            wire.clear();
            encoder.encode(&[], &payload, &mut wire)?;
            decoder.decode(&mut wire).context("ring packet")?;
        }
        let ring_rate = TOTAL_BYTES as f64 / started.elapsed().as_secs_f64() / 1e6;

        let started = Instant::now();
        for _ in 0..messages {
            std::hint::black_box(bip324_proxy::v1::checksum(std::hint::black_box(&payload)));
        }
        let sha_rate = TOTAL_BYTES as f64 / started.elapsed().as_secs_f64() / 1e6;

        println!(
            "{:>7} B messages: bip324 crate {crate_rate:>5.0} MB/s   ring (bip324_proxy::v2) {ring_rate:>5.0} MB/s   ({:.1}x)   SHA256d {sha_rate:>5.0} MB/s",
            size,
            ring_rate / crate_rate
        );
    }

    let rounds = 2000;
    let secp = secp256k1::Secp256k1::new();
    let started = Instant::now();
    let keys: Vec<_> = (0..rounds)
        .map(|_| {
            // Fails only for zero or values >= the curve order.
            let secret = loop {
                if let Ok(key) = secp256k1::SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
                    break key;
                }
            };
            let encoded = secp256k1::ellswift::ElligatorSwift::from_seckey(&secp, secret, Some(rand::random()));
            (secret, encoded.to_array())
        })
        .collect();
    let keygen = started.elapsed().as_secs_f64() / rounds as f64;
    let started = Instant::now();
    for pair in keys.windows(2) {
        let derived = bip324_proxy::v2::SessionKeys::derive(
            &pair[0].0,
            &pair[0].1,
            &pair[1].1,
            bip324_proxy::v2::Role::Initiator,
            &MAGIC,
        );
        std::hint::black_box(derived.session_id());
    }
    let derive = started.elapsed().as_secs_f64() / (rounds - 1) as f64;
    println!(
        "per handshake: key pair {:.1} µs (made ahead of time by the key pool), ECDH + HKDF {:.1} µs",
        keygen * 1e6,
        derive * 1e6
    );
    Ok(())
}
