//! PURE first-bytes decision: what does the client speak? A v1 message of an
//! allowed network (translated), a BIP324 key of a client that runs v2 itself
//! (passed through), or anything else (refused, so the proxy never becomes a
//! generic tunnel).
//!
//! A v1 client is known after 16 bytes (magic + command). A v2 client is only
//! accepted after [`V2_SNIFF_LEN`] bytes that look like what a BIP324
//! initiator sends: its 64-byte ElligatorSwift key, which is uniformly random
//! and always sent at once, before the initiator waits for anything (BIP324,
//! "Handshake"). Text protocols, TLS and short client-first protocols fail
//! that test, or never send 64 bytes and time out.
//!
//! False refusals of genuine v2 keys (computed exactly in the tests):
//! - the first [`TEXT_PREFIX_LEN`] bytes all text-like, which refuses short
//!   text requests (an HTTP request line and `Host:`) without waiting for 64
//!   bytes that never come: 1.2e-10;
//! - at least [`TEXT_LIKE_MIN`] of the 64 bytes text-like (99 of 256 values):
//!   3.8e-12;
//! - a TLS ClientHello prefix (4 fixed bytes and a minor version 0..=4):
//!   4.5e-12;
//! - a known network's magic followed by a valid v1 command: 1.9e-14 for a
//!   dozen networks.
//!
//! In all 1.3e-10 per key, about one in 8 billion, under one in a billion:
//! a node opening ten thousand connections a day would meet one false
//! refusal in some 2,000 years.

use crate::network::{Network, NetworkSet};
use crate::v1::{self, COMMAND_LEN, Magic, V1_PREFIX_LEN, VERSION_COMMAND};

/// Bytes a client must send before it is taken for a BIP324 initiator: the
/// size of its ElligatorSwift public key.
pub const V2_SNIFF_LEN: usize = 64;

/// Of the first [`V2_SNIFF_LEN`] bytes, this many text-like ones mark a
/// plaintext protocol (HTTP, SMTP, SSH banners, a PostgreSQL startup message
/// with its NULs and names).
pub const TEXT_LIKE_MIN: usize = 52;

/// A prefix this long that is text-like throughout is refused at once.
pub const TEXT_PREFIX_LEN: usize = 24;

/// What the client speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not decided yet: read until the buffer holds this many bytes.
    NeedMore(usize),
    /// A v1 VERSION of this allowed network.
    V1(Network),
    /// A client that runs BIP324 itself.
    V2,
}

/// Why the client's first bytes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    #[error("first v1 message is `{}`, not VERSION", v1::command_display(.0))]
    NotVersion(v1::Command),
    #[error("v1 message for network magic {}, which is not allowed", hex::encode(.0))]
    NetworkNotAllowed(Magic),
    #[error("client sent plaintext ({kind}), not a Bitcoin v1 message or a BIP324 key (first bytes {})", hex::encode(.first))]
    NotBitcoin { kind: &'static str, first: [u8; V1_PREFIX_LEN] },
    #[error("client speaks v2 itself and passthrough is disabled")]
    PassthroughDisabled,
}

/// Decides from the client's first bytes. `allowed` are the networks carried;
/// `known` every network with a known magic (a v1 client of a disallowed one
/// is refused, never passed through as "v2").
pub fn classify(
    first: &[u8],
    allowed: &NetworkSet,
    known: &NetworkSet,
    passthrough: bool,
) -> Result<Sniffed, SniffError> {
    let Some(prefix) = first.get(..V1_PREFIX_LEN) else { return Ok(Sniffed::NeedMore(V1_PREFIX_LEN)) };
    let mut magic: Magic = [0; 4];
    magic.copy_from_slice(&prefix[..4]);
    let mut command: v1::Command = [0; COMMAND_LEN];
    command.copy_from_slice(&prefix[4..]);
    let is_command = v1::is_valid_command(&command);
    if let Some(network) = allowed.by_magic(&magic) {
        if command == VERSION_COMMAND {
            return Ok(Sniffed::V1(network.clone()));
        }
        if is_command {
            return Err(SniffError::NotVersion(command));
        }
    } else if command == VERSION_COMMAND || (is_command && known.by_magic(&magic).is_some()) {
        return Err(SniffError::NetworkNotAllowed(magic));
    }
    let mut shown = [0u8; V1_PREFIX_LEN];
    shown.copy_from_slice(prefix);
    if first.get(..TEXT_PREFIX_LEN).is_some_and(|text| text.iter().all(|&b| is_text_like(b))) {
        return Err(SniffError::NotBitcoin { kind: "text", first: shown });
    }
    let Some(key) = first.get(..V2_SNIFF_LEN) else { return Ok(Sniffed::NeedMore(V2_SNIFF_LEN)) };
    if let Some(kind) = plaintext_kind(key) {
        return Err(SniffError::NotBitcoin { kind, first: shown });
    }
    if passthrough { Ok(Sniffed::V2) } else { Err(SniffError::PassthroughDisabled) }
}

fn is_text_like(byte: u8) -> bool {
    matches!(byte, 0x20..=0x7e | b'\t' | b'\n' | b'\r' | 0)
}

/// Which plaintext protocol family `key` (the first 64 bytes) belongs to, if
/// it does not look like a uniformly random key.
fn plaintext_kind(key: &[u8]) -> Option<&'static str> {
    if key.iter().filter(|&&b| is_text_like(b)).count() >= TEXT_LIKE_MIN {
        return Some("text");
    }
    // TLS record (content type 22, version 3.0..=3.4) holding a ClientHello
    // (handshake type 1) shorter than 64 KiB.
    if let [0x16, 0x03, minor, _, _, 0x01, 0x00, ..] = key
        && *minor <= 0x04
    {
        return Some("TLS");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network;

    fn sets() -> (NetworkSet, NetworkSet) {
        let all = NetworkSet::new(network::builtin());
        let regtest = NetworkSet::new(network::builtin().into_iter().filter(|n| n.name == "regtest").collect());
        (all, regtest)
    }

    fn message(magic: Magic, command: &str) -> Vec<u8> {
        let mut m = magic.to_vec();
        m.extend_from_slice(&v1::command_from_str(command).unwrap());
        m.extend_from_slice(&[0x55, 0, 0, 0, 1, 2, 3, 4]);
        m.extend_from_slice(&[0x42; 85]);
        m
    }

    const MAINNET: Magic = [0xf9, 0xbe, 0xb4, 0xd9];

    #[test]
    fn v1_version_of_an_allowed_network() {
        let (all, _) = sets();
        let bytes = message(MAINNET, "version");
        for len in 0..V1_PREFIX_LEN {
            assert_eq!(classify(&bytes[..len], &all, &all, true), Ok(Sniffed::NeedMore(V1_PREFIX_LEN)));
        }
        assert!(matches!(classify(&bytes[..16], &all, &all, true), Ok(Sniffed::V1(n)) if n.name == "mainnet"));
        assert!(matches!(classify(&message(MAINNET, "verack"), &all, &all, true), Err(SniffError::NotVersion(_))));
    }

    #[test]
    fn v1_of_another_network_is_refused_not_passed_through() {
        let (all, regtest) = sets();
        for command in ["version", "ping", "getaddr"] {
            assert_eq!(
                classify(&message(MAINNET, command), &regtest, &all, true),
                Err(SniffError::NetworkNotAllowed(MAINNET))
            );
        }
        // Another coin's VERSION (Litecoin's magic) is not passed through either.
        let litecoin = [0xfb, 0xc0, 0xb6, 0xdb];
        assert!(matches!(
            classify(&message(litecoin, "version"), &all, &all, true),
            Err(SniffError::NetworkNotAllowed(_))
        ));
    }

    #[test]
    fn v2_needs_a_whole_random_looking_key() {
        let (all, _) = sets();
        let key: Vec<u8> = (0..V2_SNIFF_LEN as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in V1_PREFIX_LEN..V2_SNIFF_LEN {
            assert_eq!(classify(&key[..len], &all, &all, true), Ok(Sniffed::NeedMore(V2_SNIFF_LEN)), "{len}");
        }
        assert_eq!(classify(&key, &all, &all, true), Ok(Sniffed::V2));
        assert_eq!(classify(&key, &all, &all, false), Err(SniffError::PassthroughDisabled));
        // A key that starts with an allowed magic but no valid command is still a key.
        let mut magic_key = key.clone();
        magic_key[..4].copy_from_slice(&MAINNET);
        magic_key[4] = 0x01;
        assert_eq!(classify(&magic_key, &all, &all, true), Ok(Sniffed::V2));
    }

    #[test]
    fn plaintext_protocols_are_refused() {
        let (all, _) = sets();
        let mut samples: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: example.org\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n".to_vec(),
            b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\nProxy-Connection: keep-alive\r\n\r\n".to_vec(),
            b"SSH-2.0-OpenSSH_9.6p1 Debian-4\r\n\0\0\x05\xdc\x06\x14                                  ".to_vec(),
            b"EHLO mail.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n".to_vec(),
        ];
        // A PostgreSQL startup message: length, protocol 3.0, NUL-separated names.
        let mut postgres = vec![0, 0, 0, 0x54, 0, 3, 0, 0];
        postgres.extend_from_slice(
            b"user\0postgres\0database\0postgres\0application_name\0psql\0client_encoding\0UTF8\0\0",
        );
        samples.push(postgres);
        // A TLS 1.3 ClientHello: record header, handshake type 1, then random.
        let mut tls = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        tls.extend((0..64u8).map(|i| i.wrapping_mul(97).wrapping_add(13)));
        samples.push(tls);
        for sample in samples {
            assert!(
                matches!(classify(&sample, &all, &all, true), Err(SniffError::NotBitcoin { .. })),
                "{}",
                String::from_utf8_lossy(&sample)
            );
        }
    }

    /// P(X >= k) for X ~ Binomial(n, p), summed exactly in f64.
    fn binomial_tail(n: u64, k: u64, p: f64) -> f64 {
        let mut total = 0.0;
        for i in k..=n {
            let mut choose = 1.0f64;
            for j in 0..i {
                choose = choose * (n - j) as f64 / (j + 1) as f64;
            }
            total += choose * p.powi(i as i32) * (1.0 - p).powi((n - i) as i32);
        }
        total
    }

    #[test]
    fn false_refusals_of_genuine_keys_are_below_one_in_a_billion() {
        let text_like = (0..=255u8).filter(|&b| is_text_like(b)).count();
        assert_eq!(text_like, 99);
        let text = binomial_tail(V2_SNIFF_LEN as u64, TEXT_LIKE_MIN as u64, text_like as f64 / 256.0);
        // 0x16, 0x03, minor 0..=4, handshake type 0x01, length high byte 0x00.
        let tls = 5.0 / 256f64.powi(5);
        // A dozen magics (built in and custom), then any valid v1 command:
        // printable ASCII then NULs, counted exactly over the 12 bytes.
        let valid_command: f64 = (0..=COMMAND_LEN as i32)
            .map(|len| (95.0f64 / 256.0).powi(len) / 256f64.powi(COMMAND_LEN as i32 - len))
            .sum();
        let magic = 12.0 / 2f64.powi(32) * valid_command;
        let early_text = (text_like as f64 / 256.0).powi(TEXT_PREFIX_LEN as i32);
        let total = early_text + text + tls + magic;
        println!("early text {early_text:e}, text {text:e}, TLS {tls:e}, magic {magic:e}, total {total:e}");
        assert!(text < 5e-12, "{text:e}");
        assert!(tls < 5e-12, "{tls:e}");
        assert!(magic < 5e-14, "{magic:e}");
        assert!(early_text < 1.3e-10, "{early_text:e}");
        assert!(total < 1.4e-10, "{total:e}");
        assert!(total < 1e-9);
    }

    #[test]
    fn random_keys_pass() {
        // A deterministic stream of pseudorandom keys (xorshift), as a sanity check of the rates above.
        let (all, _) = sets();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            let key: Vec<u8> = (0..V2_SNIFF_LEN)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            assert_eq!(classify(&key, &all, &all, true), Ok(Sniffed::V2), "{}", hex::encode(&key));
        }
    }
}
