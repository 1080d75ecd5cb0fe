//! PURE rewriting of what a v1-only node says about itself, so that peers
//! learn it can be reached over v2: the NODE_P2P_V2 service bit (BIP324,
//! "Signaling v2 support": bit 11) in the node's VERSION, and in the entries
//! of its `addr`/`addrv2` messages that announce the listener's public
//! address (`advertise`), as they leave through an inbound listener.
//!
//! Bitcoin Core tries v2 only towards peers whose services include that bit
//! (`CConnman::ConnectNode`, `use_v2transport`), so a node behind an inbound
//! listener must advertise it. The functions here work on byte slices and
//! report what they did; where a rewritten message stays v1, its checksum is
//! recomputed. A frame whose checksum is already wrong is never touched: the
//! rewrite must not turn a bad message into a good one.

use std::net::{IpAddr, SocketAddr};

use crate::v1::{self, CHECKSUM_LEN, Command, HEADER_LEN, V1Header, VERSION_COMMAND};

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

/// The `addr` command: entries of 30 bytes (BIP 0031 era `CAddress` with
/// its time).
pub const ADDR_COMMAND: Command = *b"addr\0\0\0\0\0\0\0\0";
/// The `addrv2` command (BIP155).
pub const ADDRV2_COMMAND: Command = *b"addrv2\0\0\0\0\0\0";
/// Most entries one `addr`/`addrv2` message may carry: Core's
/// `MAX_ADDR_TO_SEND`; Core punishes a peer that sends more.
pub const MAX_ADDR_ENTRIES: u64 = 1000;
/// Longest BIP155 address: Core's `CNetAddr::MAX_ADDRV2_SIZE`.
pub const MAX_ADDRV2_ADDRESS_BYTES: u64 = 512;
/// BIP155 network ids of the two networks an `advertise` address can be on.
const BIP155_IPV4: u8 = 1;
const BIP155_IPV6: u8 = 2;

/// Why an `addr`/`addrv2` payload was left as it came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("payload ends inside {field} (at byte {at})")]
    Truncated { field: &'static str, at: usize },
    #[error("{count} entries, more than the {max} a message may carry")]
    TooManyEntries { count: u64, max: u64 },
    #[error("non-canonical CompactSize for {field} (at byte {at})")]
    NonCanonical { field: &'static str, at: usize },
    #[error("BIP155 address of {len} bytes, more than {max}")]
    AddressTooLong { len: u64, max: u64 },
    #[error("BIP155 network {network} with a {len}-byte address (it takes {expected})")]
    AddressLength { network: u8, len: u64, expected: u64 },
    #[error("{extra} bytes after the last entry")]
    TrailingBytes { extra: usize },
}

/// What the addr rewrite did to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRewrite {
    /// `entries` entries announced the advertised address without the bit:
    /// the message was rebuilt with the bit set in each.
    Set { entries: usize, frame: Vec<u8> },
    /// The advertised address is announced, already with the bit.
    AlreadySet,
    /// No entry announces the advertised address.
    OtherAddresses,
    /// Not an `addr` or `addrv2` message.
    NotAddr,
    /// Not exactly one whole frame, or its checksum is wrong: unchanged.
    BadFrame,
    /// The payload does not parse as the command's layout: unchanged (a
    /// malformed message is the peer's to judge, never ours to fix).
    Malformed(AddrError),
}

impl AddrRewrite {
    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            AddrRewrite::Set { .. } => "set",
            AddrRewrite::AlreadySet => "already_set",
            AddrRewrite::OtherAddresses => "other_addresses",
            AddrRewrite::NotAddr => "not_addr",
            AddrRewrite::BadFrame | AddrRewrite::Malformed(_) => "malformed",
        }
    }
}

/// Whether `command` is one the addr rewrite looks at.
pub fn is_addr_command(command: &Command) -> bool {
    *command == ADDR_COMMAND || *command == ADDRV2_COMMAND
}

/// Reads a canonical CompactSize at `at`: the value and the bytes it took.
fn read_compact_size(bytes: &[u8], at: usize, field: &'static str) -> Result<(u64, usize), AddrError> {
    let truncated = AddrError::Truncated { field, at };
    let first = *bytes.get(at).ok_or(truncated.clone())?;
    let (width, min) = match first {
        0..=0xfc => return Ok((u64::from(first), 1)),
        0xfd => (2, 0xfd),
        0xfe => (4, 0x1_0000),
        0xff => (8, 0x1_0000_0000),
    };
    let raw = bytes.get(at + 1..at + 1 + width).ok_or(truncated)?;
    let mut le = [0u8; 8];
    le[..width].copy_from_slice(raw);
    let value = u64::from_le_bytes(le);
    if value < min {
        return Err(AddrError::NonCanonical { field, at });
    }
    Ok((value, 1 + width))
}

/// Appends `value` as a canonical CompactSize.
fn write_compact_size(value: u64, out: &mut Vec<u8>) {
    match value {
        0..=0xfc => out.push(value as u8),
        0xfd..=0xffff => {
            out.push(0xfd);
            out.extend_from_slice(&(value as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xfe);
            out.extend_from_slice(&(value as u32).to_le_bytes());
        }
        _ => {
            out.push(0xff);
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

fn compact_size_len(value: u64) -> usize {
    match value {
        0..=0xfc => 1,
        0xfd..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

fn slice<'a>(bytes: &'a [u8], at: usize, len: usize, field: &'static str) -> Result<&'a [u8], AddrError> {
    at.checked_add(len).and_then(|end| bytes.get(at..end)).ok_or(AddrError::Truncated { field, at })
}

/// The entry count, bounded by [`MAX_ADDR_ENTRIES`] before anything else.
fn read_count(payload: &[u8]) -> Result<(u64, usize), AddrError> {
    let (count, at) = read_compact_size(payload, 0, "count")?;
    if count > MAX_ADDR_ENTRIES {
        return Err(AddrError::TooManyEntries { count, max: MAX_ADDR_ENTRIES });
    }
    Ok((count, at))
}

/// One entry seen by the scan: where its services are and whether it
/// announces the advertised address.
struct Entry {
    services_at: usize,
    services_len: usize,
    services: u64,
    advertised: bool,
}

/// Walks an `addr` (`v2 = false`) or `addrv2` payload entry by entry,
/// validating it whole, and calls `each` per entry. Allocates nothing.
fn scan(payload: &[u8], v2: bool, advertise: SocketAddr, mut each: impl FnMut(Entry)) -> Result<(), AddrError> {
    let ip = advertise.ip().to_canonical();
    let (count, mut at) = read_count(payload)?;
    for _ in 0..count {
        slice(payload, at, 4, "time")?;
        at += 4;
        let services_at = at;
        let (services, services_len) = if v2 {
            read_compact_size(payload, at, "services")?
        } else {
            let raw = slice(payload, at, 8, "services")?;
            let mut le = [0u8; 8];
            le.copy_from_slice(raw);
            (u64::from_le_bytes(le), 8)
        };
        at += services_len;
        let address_matches = if v2 {
            let network = *payload.get(at).ok_or(AddrError::Truncated { field: "network id", at })?;
            at += 1;
            let (len, width) = read_compact_size(payload, at, "address length")?;
            at += width;
            if len > MAX_ADDRV2_ADDRESS_BYTES {
                return Err(AddrError::AddressTooLong { len, max: MAX_ADDRV2_ADDRESS_BYTES });
            }
            // Core's `SetNetFromBIP155Network`: a known network with another
            // length is an error; unknown networks are skipped.
            let expected = match network {
                BIP155_IPV4 => Some(4),
                BIP155_IPV6 | 6 => Some(16),
                4 | 5 => Some(32),
                _ => None,
            };
            if let Some(expected) = expected.filter(|&expected| expected != len) {
                return Err(AddrError::AddressLength { network, len, expected });
            }
            let address = slice(payload, at, len as usize, "address")?;
            at += len as usize;
            match ip {
                IpAddr::V4(v4) => network == BIP155_IPV4 && address == v4.octets(),
                IpAddr::V6(v6) => network == BIP155_IPV6 && address == v6.octets(),
            }
        } else {
            let address = slice(payload, at, 16, "address")?;
            at += 16;
            let expected = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            address == expected
        };
        let port = slice(payload, at, 2, "port")?;
        at += 2;
        let advertised = address_matches && port == advertise.port().to_be_bytes();
        each(Entry { services_at, services_len, services, advertised });
    }
    if at != payload.len() {
        return Err(AddrError::TrailingBytes { extra: payload.len() - at });
    }
    Ok(())
}

/// Sets NODE_P2P_V2 in every entry of an `addr` (`v2 = false`) or `addrv2`
/// payload whose address and port equal `advertise`. The whole payload is
/// validated first (count within [`MAX_ADDR_ENTRIES`], every entry whole, no
/// trailing bytes) without allocating; only then is the new payload built,
/// at most 2 bytes longer per entry (an addrv2 CompactSize growing from 1 to
/// 3 bytes).
pub fn set_p2p_v2_in_addr(payload: &[u8], v2: bool, advertise: SocketAddr) -> AddrRewrite {
    let (mut to_set, mut already, mut growth) = (0usize, 0usize, 0usize);
    let scanned = scan(payload, v2, advertise, |entry| {
        if !entry.advertised {
            return;
        }
        if entry.services & NODE_P2P_V2 != 0 {
            already += 1;
        } else {
            to_set += 1;
            if v2 {
                growth += compact_size_len(entry.services | NODE_P2P_V2) - entry.services_len;
            }
        }
    });
    if let Err(error) = scanned {
        return AddrRewrite::Malformed(error);
    }
    if to_set == 0 {
        return if already > 0 { AddrRewrite::AlreadySet } else { AddrRewrite::OtherAddresses };
    }
    let mut out = Vec::with_capacity(payload.len() + growth);
    let mut copied = 0;
    let rebuilt = scan(payload, v2, advertise, |entry| {
        if !entry.advertised || entry.services & NODE_P2P_V2 != 0 {
            return;
        }
        out.extend_from_slice(&payload[copied..entry.services_at]);
        let services = entry.services | NODE_P2P_V2;
        if v2 {
            write_compact_size(services, &mut out);
        } else {
            out.extend_from_slice(&services.to_le_bytes());
        }
        copied = entry.services_at + entry.services_len;
    });
    debug_assert!(rebuilt.is_ok(), "the second scan sees the bytes the first accepted");
    out.extend_from_slice(&payload[copied..]);
    AddrRewrite::Set { entries: to_set, frame: out }
}

/// [`set_p2p_v2_in_addr`] on exactly one whole v1 frame with a valid
/// checksum; on `Set`, `frame` is the whole rebuilt frame (same magic and
/// command, new length and checksum).
pub fn set_p2p_v2_in_addr_frame(frame: &[u8], advertise: SocketAddr) -> AddrRewrite {
    let Some(header_bytes) = frame.first_chunk::<HEADER_LEN>() else {
        return AddrRewrite::BadFrame;
    };
    let header = V1Header::decode(header_bytes);
    if header.frame_len() != frame.len() {
        return AddrRewrite::BadFrame;
    }
    let v2 = match header.command {
        ADDR_COMMAND => false,
        ADDRV2_COMMAND => true,
        _ => return AddrRewrite::NotAddr,
    };
    let payload = &frame[HEADER_LEN..];
    if v1::checksum(payload) != header.checksum {
        return AddrRewrite::BadFrame;
    }
    match set_p2p_v2_in_addr(payload, v2, advertise) {
        AddrRewrite::Set { entries, frame: payload } => {
            // At most 1000 entries of at most 531 bytes: far below
            // `MAX_PAYLOAD_BYTES`, so the rebuilt frame is one a peer takes.
            let header = V1Header::for_payload(header.magic, header.command, &payload);
            let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
            out.extend_from_slice(&header.encode());
            out.extend_from_slice(&payload);
            AddrRewrite::Set { entries, frame: out }
        }
        other => other,
    }
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

    // ---- addr / addrv2 ----

    const ADVERTISED: &str = "203.0.113.7:8333";

    fn advertised() -> SocketAddr {
        ADVERTISED.parse().unwrap()
    }

    /// A BIP155 `addrv2` entry: time u32, services CompactSize, network id,
    /// address length CompactSize, address, port u16 big-endian.
    fn addrv2_entry(services: u64, network: u8, address: &[u8], port: u16) -> Vec<u8> {
        let mut out = 1_700_000_000u32.to_le_bytes().to_vec();
        write_compact_size(services, &mut out);
        out.push(network);
        write_compact_size(address.len() as u64, &mut out);
        out.extend_from_slice(address);
        out.extend_from_slice(&port.to_be_bytes());
        out
    }

    /// An `addr` entry: time u32, services u64 LE, 16-byte address, port BE.
    fn addr_entry(services: u64, ip: std::net::Ipv6Addr, port: u16) -> Vec<u8> {
        let mut out = 1_700_000_000u32.to_le_bytes().to_vec();
        out.extend_from_slice(&services.to_le_bytes());
        out.extend_from_slice(&ip.octets());
        out.extend_from_slice(&port.to_be_bytes());
        out
    }

    fn with_count(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        write_compact_size(entries.len() as u64, &mut out);
        for entry in entries {
            out.extend_from_slice(entry);
        }
        out
    }

    fn mapped(ip: &str) -> std::net::Ipv6Addr {
        ip.parse::<std::net::Ipv4Addr>().unwrap().to_ipv6_mapped()
    }

    #[test]
    fn addr_sets_the_bit_on_the_advertised_entry_only() {
        let entries = [
            addr_entry(0x0409, mapped("203.0.113.7"), 8333),
            addr_entry(0x0409, mapped("203.0.113.7"), 8334), // same IP, other port
            addr_entry(0x0409, mapped("198.51.100.1"), 8333), // other IP, same port
            addr_entry(0x0409, "2001:db8::7".parse().unwrap(), 8333),
        ];
        let payload = with_count(&entries);
        let AddrRewrite::Set { entries: 1, frame: out } = set_p2p_v2_in_addr(&payload, false, advertised()) else {
            panic!("one entry to set");
        };
        assert_eq!(out.len(), payload.len());
        let mut expected = payload.clone();
        // count (1) + time (4): services start at byte 5; bit 11 is in its second byte.
        expected[6] |= 0x08;
        assert_eq!(out, expected);

        // The same through a frame: its checksum is recomputed.
        let whole = frame(ADDR_COMMAND, &payload);
        let AddrRewrite::Set { frame: rebuilt, .. } = set_p2p_v2_in_addr_frame(&whole, advertised()) else {
            panic!("the frame is rewritten");
        };
        assert_eq!(&rebuilt[HEADER_LEN..], &expected[..]);
        assert!(FrameDecoder::new(REGTEST, true).decode(&rebuilt).is_ok());
        assert_eq!(rebuilt[..20], whole[..20], "magic, command and length stay");
    }

    #[test]
    fn addrv2_services_compact_size_may_grow_and_the_message_is_rebuilt() {
        let tor_v3 = [0x11u8; 32];
        let entries = [
            addrv2_entry(0x09, BIP155_IPV4, &[203, 0, 113, 7], 8333), // 1-byte services -> 3
            addrv2_entry(0x09, BIP155_IPV4, &[198, 51, 100, 1], 8333),
            addrv2_entry(0x0409, 4, &tor_v3, 8333),
            addrv2_entry(0x09, 0x2a, &[1, 2, 3, 4, 5, 6, 7], 8333), // unknown network: skipped
            addrv2_entry(0x0409, BIP155_IPV4, &[203, 0, 113, 7], 8333), // 3-byte services stay 3
            addrv2_entry(0x1_0009, BIP155_IPV4, &[203, 0, 113, 7], 8333), // 5 bytes stay 5
            addrv2_entry(0x09, BIP155_IPV4, &[203, 0, 113, 7], 18333),
        ];
        let payload = with_count(&entries);
        let AddrRewrite::Set { entries: 3, frame: out } = set_p2p_v2_in_addr(&payload, true, advertised()) else {
            panic!("three entries to set");
        };
        let expected = with_count(&[
            addrv2_entry(0x0809, BIP155_IPV4, &[203, 0, 113, 7], 8333),
            entries[1].clone(),
            entries[2].clone(),
            entries[3].clone(),
            addrv2_entry(0x0c09, BIP155_IPV4, &[203, 0, 113, 7], 8333),
            addrv2_entry(0x1_0809, BIP155_IPV4, &[203, 0, 113, 7], 8333),
            entries[6].clone(),
        ]);
        assert_eq!(out, expected);
        assert_eq!(out.len(), payload.len() + 2);
        assert_eq!(out[5..8], [0xfd, 0x09, 0x08]);

        let whole = frame(ADDRV2_COMMAND, &payload);
        let AddrRewrite::Set { frame: rebuilt, .. } = set_p2p_v2_in_addr_frame(&whole, advertised()) else {
            panic!("the frame is rewritten");
        };
        let Ok(Decoded::Frame { header, len }) = FrameDecoder::new(REGTEST, true).decode(&rebuilt) else {
            panic!("the rebuilt frame decodes with its new length and checksum");
        };
        assert_eq!((header.command, len, header.payload_len as usize), (ADDRV2_COMMAND, rebuilt.len(), out.len()));
        // A second pass finds every advertised entry already set.
        assert_eq!(set_p2p_v2_in_addr(&out, true, advertised()), AddrRewrite::AlreadySet);
    }

    #[test]
    fn ipv6_and_mapped_spellings_of_the_advertised_address() {
        let v6: SocketAddr = "[2001:db8::7]:8333".parse().unwrap();
        let octets = "2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let payload = with_count(&[addrv2_entry(1, BIP155_IPV6, &octets, 8333)]);
        assert!(matches!(set_p2p_v2_in_addr(&payload, true, v6), AddrRewrite::Set { entries: 1, .. }));
        // An IPv4 address given as IPv4-mapped IPv6 is the IPv4 address.
        let spelled: SocketAddr = "[::ffff:203.0.113.7]:8333".parse().unwrap();
        let v4 = with_count(&[addrv2_entry(1, BIP155_IPV4, &[203, 0, 113, 7], 8333)]);
        assert!(matches!(set_p2p_v2_in_addr(&v4, true, spelled), AddrRewrite::Set { entries: 1, .. }));
        let v1 = with_count(&[addr_entry(1, mapped("203.0.113.7"), 8333)]);
        assert!(matches!(set_p2p_v2_in_addr(&v1, false, spelled), AddrRewrite::Set { entries: 1, .. }));
        // An IPv4-mapped address in a BIP155 IPv6 entry is not an IPv4 one (Core
        // treats it as invalid).
        let in_v6 = with_count(&[addrv2_entry(1, BIP155_IPV6, &mapped("203.0.113.7").octets(), 8333)]);
        assert_eq!(set_p2p_v2_in_addr(&in_v6, true, advertised()), AddrRewrite::OtherAddresses);
    }

    #[test]
    fn nothing_to_do_is_unchanged() {
        let others = with_count(&[addr_entry(0x0409, mapped("198.51.100.1"), 8333)]);
        assert_eq!(set_p2p_v2_in_addr(&others, false, advertised()), AddrRewrite::OtherAddresses);
        let set = with_count(&[addr_entry(0x0c09, mapped("203.0.113.7"), 8333)]);
        assert_eq!(set_p2p_v2_in_addr(&set, false, advertised()), AddrRewrite::AlreadySet);
        assert_eq!(set_p2p_v2_in_addr(&[0], false, advertised()), AddrRewrite::OtherAddresses);
        assert_eq!(set_p2p_v2_in_addr(&[0], true, advertised()), AddrRewrite::OtherAddresses);

        let mut ping = frame(*b"ping\0\0\0\0\0\0\0\0", &[0u8; 8]);
        assert_eq!(set_p2p_v2_in_addr_frame(&ping, advertised()), AddrRewrite::NotAddr);
        ping.pop();
        assert_eq!(set_p2p_v2_in_addr_frame(&ping, advertised()), AddrRewrite::BadFrame);
        let mut bad = frame(ADDR_COMMAND, &with_count(&[addr_entry(1, mapped("203.0.113.7"), 8333)]));
        bad[HEADER_LEN + 8] ^= 1;
        assert_eq!(set_p2p_v2_in_addr_frame(&bad, advertised()), AddrRewrite::BadFrame, "never launder a checksum");
    }

    #[test]
    fn counts_are_bounded_before_anything_else() {
        for (v2, count) in [(false, 1001u64), (true, 1001), (true, u64::MAX), (false, 0xffff_ffff)] {
            let mut payload = Vec::new();
            write_compact_size(count, &mut payload);
            assert_eq!(
                set_p2p_v2_in_addr(&payload, v2, advertised()),
                AddrRewrite::Malformed(AddrError::TooManyEntries { count, max: MAX_ADDR_ENTRIES })
            );
        }
        // 1000 entries is the most, and allowed.
        let entries = vec![addr_entry(1, mapped("203.0.113.7"), 8333); 1000];
        let payload = with_count(&entries);
        assert!(matches!(set_p2p_v2_in_addr(&payload, false, advertised()), AddrRewrite::Set { entries: 1000, .. }));
    }

    #[test]
    fn malformed_payloads_are_left_alone() {
        let v2 = with_count(&[
            addrv2_entry(0x09, BIP155_IPV4, &[203, 0, 113, 7], 8333),
            addrv2_entry(0x09, 4, &[0x11; 32], 8333),
        ]);
        let v1 = with_count(&[addr_entry(1, mapped("203.0.113.7"), 8333), addr_entry(1, mapped("203.0.113.7"), 1)]);
        for (payload, is_v2) in [(&v2, true), (&v1, false)] {
            for len in 1..payload.len() {
                assert!(
                    matches!(
                        set_p2p_v2_in_addr(&payload[..len], is_v2, advertised()),
                        AddrRewrite::Malformed(AddrError::Truncated { .. })
                    ),
                    "v2 {is_v2}, len {len}"
                );
            }
            let mut longer = payload.clone();
            longer.push(0);
            assert_eq!(
                set_p2p_v2_in_addr(&longer, is_v2, advertised()),
                AddrRewrite::Malformed(AddrError::TrailingBytes { extra: 1 })
            );
        }
        // Non-canonical CompactSizes: the count, and services.
        assert_eq!(
            set_p2p_v2_in_addr(&[0xfd, 0x01, 0x00], true, advertised()),
            AddrRewrite::Malformed(AddrError::NonCanonical { field: "count", at: 0 })
        );
        let mut entry = 0u32.to_le_bytes().to_vec();
        entry.extend_from_slice(&[0xfe, 0x09, 0x08, 0, 0, BIP155_IPV4, 4, 203, 0, 113, 7, 0x20, 0x8d]);
        assert_eq!(
            set_p2p_v2_in_addr(&with_count(&[entry]), true, advertised()),
            AddrRewrite::Malformed(AddrError::NonCanonical { field: "services", at: 5 })
        );
        // Address lengths: over BIP155's bound, or wrong for a known network.
        let mut long = 0u32.to_le_bytes().to_vec();
        long.extend_from_slice(&[1, 0x2a, 0xfd, 0x01, 0x02]);
        assert_eq!(
            set_p2p_v2_in_addr(&with_count(&[long]), true, advertised()),
            AddrRewrite::Malformed(AddrError::AddressTooLong { len: 513, max: 512 })
        );
        let wrong = with_count(&[addrv2_entry(1, BIP155_IPV4, &[0; 16], 8333)]);
        assert_eq!(
            set_p2p_v2_in_addr(&wrong, true, advertised()),
            AddrRewrite::Malformed(AddrError::AddressLength { network: 1, len: 16, expected: 4 })
        );
    }

    #[test]
    fn compact_size_round_trips_at_every_width() {
        for value in [0, 0xfc, 0xfd, 0xffff, 0x1_0000, 0xffff_ffff, 0x1_0000_0000, u64::MAX] {
            let mut out = Vec::new();
            write_compact_size(value, &mut out);
            assert_eq!(out.len(), compact_size_len(value));
            assert_eq!(read_compact_size(&out, 0, "x"), Ok((value, out.len())));
        }
    }
}
