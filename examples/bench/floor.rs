//! The CPU floor of v1 <-> v2 translation, measured in-process on one
//! thread: per echoed message a proxy must verify the client's checksum
//! (SHA256d), seal the packet (ChaCha20-Poly1305, payload copied into the
//! packet), open the node's packet, and checksum the payload again for the
//! v1 header it writes back. Nothing here touches a socket.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bip324_proxy::v1;
use bip324_proxy::v2::{DecodedPacket, Role, SessionKeys};
use bytes::BytesMut;

/// Messages between two looks at the clock.
const ROUNDS_PER_CHECK: usize = 8;

/// CPU seconds per MB (10^6 payload bytes) of the translation work alone.
pub fn cpu_seconds_per_mb(payload_len: usize, run_for: Duration, ticks_per_second: u64) -> anyhow::Result<f64> {
    let keys = SessionKeys::from_shared_secret(&[0x24; 32], Role::Initiator, &crate::MAGIC);
    let peer = SessionKeys::from_shared_secret(&[0x24; 32], Role::Responder, &crate::MAGIC);
    let mut encoder = keys.encoder(0);
    let mut decoder = peer.decoder(0);
    let mut payload = vec![0u8; payload_len];
    rand::Rng::fill(&mut rand::thread_rng(), &mut payload[..]);
    // A short ID, as `block` and `tx` have.
    let message_type = [2u8];
    let mut wire = BytesMut::with_capacity(payload_len + 64);

    let mut translate_once = || -> anyhow::Result<()> {
        black_box(v1::checksum(black_box(&payload)));
        wire.clear();
        encoder.encode(&message_type, &payload, &mut wire)?;
        let DecodedPacket::Packet { contents, .. } = decoder.decode(&mut wire)? else {
            anyhow::bail!("a whole packet decoded as incomplete");
        };
        ensure!(contents.len() == 1 + payload_len, "decoded contents length");
        black_box(v1::checksum(black_box(&wire[contents.start + 1..contents.end])));
        Ok(())
    };

    // Warm caches and the CPU's clock before counting.
    for _ in 0..ROUNDS_PER_CHECK {
        translate_once()?;
    }
    let started = Instant::now();
    let ticks_before = crate::procfs::thread_cpu_ticks()?;
    let mut messages = 0usize;
    while started.elapsed() < run_for {
        for _ in 0..ROUNDS_PER_CHECK {
            translate_once()?;
        }
        messages += ROUNDS_PER_CHECK;
    }
    let ticks = crate::procfs::thread_cpu_ticks()? - ticks_before;
    let cpu_seconds = ticks as f64 / ticks_per_second as f64;
    let mb = (messages * payload_len) as f64 / 1e6;
    Ok(cpu_seconds / mb)
}
