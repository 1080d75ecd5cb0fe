//! PURE rewriting of what a v1-only node says about itself, so that peers
//! learn it can be reached over v2: the NODE_P2P_V2 service bit (BIP324,
//! "Signaling v2 support": bit 11) in the node's VERSION, as it leaves
//! through an inbound listener.
//!
//! Bitcoin Core tries v2 only towards peers whose services include that bit
//! (`CConnman::ConnectNode`, `use_v2transport`), so a node behind an inbound
//! listener must advertise it. The functions here work on byte slices and
//! report what they did; where a rewritten message stays v1, its checksum is
//! recomputed. A frame whose checksum is already wrong is never touched: the
//! rewrite must not turn a bad message into a good one.

use crate::v1::{self, CHECKSUM_LEN, HEADER_LEN, V1Header, VERSION_COMMAND};

/// BIP324's service bit, Bitcoin Core's `NODE_P2P_V2`.
pub const NODE_P2P_V2: u64 = 1 << 11;

/// Offset of `services` (u64, little-endian) in a VERSION payload, after the
/// 4-byte protocol version.
pub const SERVICES_AT: usize = 4;
const SERVICES_END: usize = SERVICES_AT + 8;

/// What [`set_p2p_v2_in_frame`] did to a v1 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// The bit was set and the checksum recomputed.
    Set,
    /// The node already advertises v2 (it runs BIP324 itself): unchanged.
    AlreadySet,
    /// Not a VERSION message: unchanged.
    NotVersion,
    /// A VERSION payload too short to carry `services`: unchanged (the node
    /// sent nonsense; the peer will judge it).
    TooShort,
    /// Not exactly one whole frame, or its checksum is wrong: unchanged (the
    /// frame decoder rejects it next).
    Malformed,
}

impl Rewrite {
    /// A short fixed label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Rewrite::Set => "set",
            Rewrite::AlreadySet => "already_set",
            Rewrite::NotVersion => "not_version",
            Rewrite::TooShort => "too_short",
            Rewrite::Malformed => "malformed",
        }
    }
}

/// Sets NODE_P2P_V2 in a VERSION payload. Returns whether anything changed:
/// false when the payload is too short to hold `services` or the bit is
/// already set.
pub fn set_p2p_v2(payload: &mut [u8]) -> bool {
    let Some(field) = payload.get_mut(SERVICES_AT..SERVICES_END) else {
        return false;
    };
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(field);
    let services = u64::from_le_bytes(bytes);
    if services & NODE_P2P_V2 != 0 {
        return false;
    }
    field.copy_from_slice(&(services | NODE_P2P_V2).to_le_bytes());
    true
}

/// The services a VERSION payload announces, if it is long enough.
pub fn services(payload: &[u8]) -> Option<u64> {
    let field = payload.get(SERVICES_AT..SERVICES_END)?;
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(field);
    Some(u64::from_le_bytes(bytes))
}

/// Sets NODE_P2P_V2 in `frame`, which must be exactly one whole v1 frame
/// (header and payload) with a valid checksum, and recomputes its checksum.
/// The magic and command validity are the frame decoder's business; this
/// only looks at the command, the length and the checksum.
pub fn set_p2p_v2_in_frame(frame: &mut [u8]) -> Rewrite {
    let Some(header_bytes) = frame.first_chunk::<HEADER_LEN>() else {
        return Rewrite::Malformed;
    };
    let header = V1Header::decode(header_bytes);
    if header.frame_len() != frame.len() {
        return Rewrite::Malformed;
    }
    if header.command != VERSION_COMMAND {
        return Rewrite::NotVersion;
    }
    let (head, payload) = frame.split_at_mut(HEADER_LEN);
    if v1::checksum(payload) != header.checksum {
        return Rewrite::Malformed;
    }
    if payload.len() < SERVICES_END {
        return Rewrite::TooShort;
    }
    if !set_p2p_v2(payload) {
        return Rewrite::AlreadySet;
    }
    head[HEADER_LEN - CHECKSUM_LEN..].copy_from_slice(&v1::checksum(payload));
    Rewrite::Set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Decoded, FrameDecoder, Magic};

    const REGTEST: Magic = [0xfa, 0xbf, 0xb5, 0xda];

    /// A VERSION payload: protocol 70016, services NODE_NETWORK | NODE_WITNESS |
    /// NODE_NETWORK_LIMITED (0x0409), then the rest of a real message.
    fn version_payload(services: u64) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&70016u32.to_le_bytes());
        payload.extend_from_slice(&services.to_le_bytes());
        payload.extend_from_slice(&1_700_000_000i64.to_le_bytes());
        payload.extend_from_slice(&[0u8; 26 + 26]); // addr_recv, addr_from
        payload.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes()); // nonce
        payload.extend_from_slice(b"\x10/Satoshi:27.0.0/");
        payload.extend_from_slice(&840_000i32.to_le_bytes());
        payload.push(1);
        payload
    }

    fn frame(command: v1::Command, payload: &[u8]) -> Vec<u8> {
        let mut out = V1Header::for_payload(REGTEST, command, payload).encode().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn sets_bit_11_and_nothing_else() {
        let mut payload = version_payload(0x0409);
        let before = payload.clone();
        assert!(set_p2p_v2(&mut payload));
        assert_eq!(services(&payload), Some(0x0c09));
        assert_eq!(payload[4..12], [0x09, 0x0c, 0, 0, 0, 0, 0, 0]);
        // Every other byte is as it was.
        for (i, (a, b)) in before.iter().zip(&payload).enumerate() {
            if i != 5 {
                assert_eq!(a, b, "byte {i}");
            }
        }
    }

    #[test]
    fn already_set_or_too_short_is_unchanged() {
        let mut payload = version_payload(0x0c09);
        let before = payload.clone();
        assert!(!set_p2p_v2(&mut payload));
        assert_eq!(payload, before);
        for len in 0..SERVICES_END {
            let mut short = version_payload(0x0409)[..len].to_vec();
            let before = short.clone();
            assert!(!set_p2p_v2(&mut short), "len {len}");
            assert_eq!(short, before);
            assert_eq!(services(&short), None);
        }
        // Exactly version + services is enough.
        let mut minimal = version_payload(1)[..SERVICES_END].to_vec();
        assert!(set_p2p_v2(&mut minimal));
        assert_eq!(services(&minimal), Some(1 | NODE_P2P_V2));
    }

    #[test]
    fn frame_rewrite_recomputes_the_checksum() {
        let mut version = frame(VERSION_COMMAND, &version_payload(0x0409));
        assert_eq!(set_p2p_v2_in_frame(&mut version), Rewrite::Set);
        let decoder = FrameDecoder::new(REGTEST, true);
        let Ok(Decoded::Frame { header, len }) = decoder.decode(&version) else {
            panic!("the rewritten frame must decode with a valid checksum");
        };
        assert_eq!(len, version.len());
        assert_eq!(header.command, VERSION_COMMAND);
        assert_eq!(services(&version[HEADER_LEN..]), Some(0x0c09));
        // A second pass finds the bit and leaves the frame alone.
        let again = version.clone();
        assert_eq!(set_p2p_v2_in_frame(&mut version), Rewrite::AlreadySet);
        assert_eq!(version, again);
    }

    #[test]
    fn other_frames_are_left_alone() {
        let mut verack = frame(*b"verack\0\0\0\0\0\0", &[]);
        let before = verack.clone();
        assert_eq!(set_p2p_v2_in_frame(&mut verack), Rewrite::NotVersion);
        assert_eq!(verack, before);

        // A ping whose payload would have the bit clear at offset 4..12.
        let mut ping = frame(*b"ping\0\0\0\0\0\0\0\0", &[0u8; 16]);
        let before = ping.clone();
        assert_eq!(set_p2p_v2_in_frame(&mut ping), Rewrite::NotVersion);
        assert_eq!(ping, before);

        let mut short = frame(VERSION_COMMAND, &[1, 2, 3, 4, 5]);
        let before = short.clone();
        assert_eq!(set_p2p_v2_in_frame(&mut short), Rewrite::TooShort);
        assert_eq!(short, before);
    }

    #[test]
    fn a_bad_checksum_is_never_laundered() {
        let mut version = frame(VERSION_COMMAND, &version_payload(0x0409));
        version[20] ^= 1;
        let before = version.clone();
        assert_eq!(set_p2p_v2_in_frame(&mut version), Rewrite::Malformed);
        assert_eq!(version, before);
        assert!(FrameDecoder::new(REGTEST, true).decode(&version).is_err());
    }

    #[test]
    fn partial_or_extra_bytes_are_malformed() {
        let whole = frame(VERSION_COMMAND, &version_payload(0x0409));
        for len in 0..whole.len() {
            let mut part = whole[..len].to_vec();
            assert_eq!(set_p2p_v2_in_frame(&mut part), Rewrite::Malformed, "len {len}");
            assert_eq!(part, whole[..len]);
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert_eq!(set_p2p_v2_in_frame(&mut longer), Rewrite::Malformed);
    }
}
