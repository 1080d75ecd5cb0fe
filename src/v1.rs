//! PURE v1 P2P framing: the 24-byte message header (magic, command, payload length, checksum),
//! the checksum, command validity, and a streaming decoder that finds whole frames in a
//! caller-owned buffer.
//!
//! It never reads a socket, owns a buffer, or interprets a payload; what to do with a bad frame
//! (close, or skip it as Bitcoin Core does for some errors) is the caller's policy.

use std::fmt;

/// Size of a v1 message header: 4 magic + 12 command + 4 payload length + 4 checksum.
pub const HEADER_LEN: usize = 24;
/// Size of the NUL-padded command field (Bitcoin Core's `CMessageHeader::COMMAND_SIZE`).
pub const COMMAND_LEN: usize = 12;
/// Largest payload we accept: Bitcoin Core's `MAX_PROTOCOL_MESSAGE_LENGTH` (4 * 1000 * 1000).
/// Core disconnects a peer whose header announces more, before reading the payload.
pub const MAX_PAYLOAD_BYTES: usize = 4_000_000;
/// Largest payload of a client's or peer's first message, its VERSION, before anything is
/// buffered for it. Bitcoin Core's own VERSION is at most 344 bytes: version 4, services 8,
/// time 8, two network addresses of 26, nonce 8, a user agent of at most 256 bytes (Core's
/// `MAX_SUBVERSION_LENGTH`; it refuses longer ones) with its 3-byte CompactSize, start height 4,
/// relay 1. 4,096 bytes leaves room for fields later versions may append, and keeps a first
/// message from making the proxy buffer 4 MB before it knows the sender speaks Bitcoin.
pub const MAX_VERSION_PAYLOAD_BYTES: usize = 4096;
/// Size of the checksum field.
pub const CHECKSUM_LEN: usize = 4;
/// Size of the v1 prefix that identifies a v1 peer: magic + "version" command (BIP324 `V1_PREFIX`).
pub const V1_PREFIX_LEN: usize = 16;

/// Network magic, the first 4 bytes of every v1 message (e.g. mainnet `f9beb4d9`).
pub type Magic = [u8; 4];
/// A v1 command: ASCII name padded with NUL bytes to 12 bytes.
pub type Command = [u8; COMMAND_LEN];

/// The `version` command, the first message a v1 peer sends.
pub const VERSION_COMMAND: Command = *b"version\0\0\0\0\0";

// Field offsets inside the header, in wire order.
const MAGIC_AT: usize = 0;
const COMMAND_AT: usize = 4;
const PAYLOAD_LEN_AT: usize = 16;
const CHECKSUM_AT: usize = 20;

/// A decoded v1 header. Decoding does not validate it; see [`FrameDecoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V1Header {
    pub magic: Magic,
    pub command: Command,
    /// Payload length as sent: little-endian u32 on the wire.
    pub payload_len: u32,
    /// First 4 bytes of SHA256(SHA256(payload)) as sent.
    pub checksum: [u8; CHECKSUM_LEN],
}

impl V1Header {
    /// Splits 24 header bytes into their fields; never fails, checks nothing.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> V1Header {
        V1Header {
            magic: field(bytes, MAGIC_AT),
            command: field(bytes, COMMAND_AT),
            payload_len: u32::from_le_bytes(field(bytes, PAYLOAD_LEN_AT)),
            checksum: field(bytes, CHECKSUM_AT),
        }
    }

    /// The 24 wire bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[MAGIC_AT..COMMAND_AT].copy_from_slice(&self.magic);
        out[COMMAND_AT..PAYLOAD_LEN_AT].copy_from_slice(&self.command);
        out[PAYLOAD_LEN_AT..CHECKSUM_AT].copy_from_slice(&self.payload_len.to_le_bytes());
        out[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&self.checksum);
        out
    }

    /// Header for `payload` with its computed checksum.
    ///
    /// Checks nothing: the caller keeps `payload` within [`MAX_PAYLOAD_BYTES`] (for v2 input,
    /// `v2::MAX_CONTENTS_BYTES`, Core's `V2Transport::MAX_CONTENTS_LEN`), or the v1 peer will
    /// reject the frame.
    pub fn for_payload(magic: Magic, command: Command, payload: &[u8]) -> V1Header {
        V1Header {
            magic,
            command,
            // Our payloads come from BIP324 packets, whose length field is 3 bytes.
            payload_len: u32::try_from(payload.len()).expect("payload length fits in a u32"),
            checksum: checksum(payload),
        }
    }

    /// Size of the whole frame this header announces: header plus payload.
    pub fn frame_len(&self) -> usize {
        // u32 -> usize is lossless on every target this proxy builds for (32- and 64-bit).
        HEADER_LEN + self.payload_len as usize
    }
}

/// Copies `N` bytes starting at the constant offset `at` (always inside the fixed-size header).
fn field<const N: usize>(bytes: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    std::array::from_fn(|i| bytes[at + i])
}

/// Bitcoin Core's `CMessageHeader::IsMessageTypeValid`: printable ASCII (0x20..=0x7e) up to the
/// first NUL, then only NULs. An all-NUL command passes too, as it does in Core.
pub const fn is_valid_command(command: &Command) -> bool {
    let mut i = 0;
    let mut padding = false;
    while i < COMMAND_LEN {
        let byte = command[i];
        if byte == 0 {
            padding = true;
        } else if padding || !is_printable(byte) {
            return false;
        }
        i += 1;
    }
    true
}

const fn is_printable(byte: u8) -> bool {
    matches!(byte, 0x20..=0x7e)
}

/// The command for a name, e.g. `"ping"` -> `b"ping\0\0\0\0\0\0\0\0"`.
///
/// `None` if the name is longer than 12 bytes or holds a byte outside printable ASCII (a NUL
/// inside the name included, so distinct names never map to the same command). The empty name
/// gives the all-NUL command, which Core accepts.
pub const fn command_from_str(name: &str) -> Option<Command> {
    let name = name.as_bytes();
    if name.len() > COMMAND_LEN {
        return None;
    }
    let mut command = [0u8; COMMAND_LEN];
    let mut i = 0;
    while i < name.len() {
        if !is_printable(name[i]) {
            return None;
        }
        command[i] = name[i];
        i += 1;
    }
    Some(command)
}

/// A printable form of a command for logs and errors; see [`command_display`].
#[derive(Debug, Clone, Copy)]
pub struct CommandDisplay<'a>(pub &'a Command);

/// Printable form of a command for logs: the name without its NUL padding, with any other
/// non-printable byte escaped (`\x01`) and, as `escape_ascii` does, quotes and backslashes too.
/// For a valid command this is the text before the first NUL; for an invalid one the bytes after
/// a NUL stay visible (`ab\x00c`). Allocates nothing until formatted.
pub fn command_display(command: &Command) -> CommandDisplay<'_> {
    CommandDisplay(command)
}

impl fmt::Display for CommandDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_len = self.0.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
        for &byte in self.0.iter().take(name_len) {
            write!(f, "{}", byte.escape_ascii())?;
        }
        Ok(())
    }
}

/// First 4 bytes of SHA256(SHA256(payload)), the v1 header checksum.
pub fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    use ring::digest::{SHA256, digest};
    let once = digest(&SHA256, payload);
    let twice = digest(&SHA256, once.as_ref());
    *twice.as_ref().first_chunk().expect("a SHA256 digest is 32 bytes")
}

/// Hex for error messages, without pulling a hex crate into a pure module.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Bytes that can never become a valid v1 frame.
///
/// Bitcoin Core disconnects on [`WrongMagic`](V1Error::WrongMagic) and
/// [`PayloadTooLarge`](V1Error::PayloadTooLarge), but skips a whole frame with
/// [`BadChecksum`](V1Error::BadChecksum) or [`InvalidCommand`](V1Error::InvalidCommand) and
/// keeps the connection (`V1Transport::GetReceivedMessage` sets `reject_message`). A caller that
/// wants to skip can get the frame size from [`V1Header::frame_len`] on the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V1Error {
    #[error("wrong magic: expected {}, found {}", Hex(.expected), Hex(.found))]
    WrongMagic { expected: Magic, found: Magic },
    #[error("payload of {len} bytes exceeds the {max} byte limit")]
    PayloadTooLarge { len: u32, max: usize },
    /// `expected` is computed from the payload, `actual` is what the header carries (the order
    /// of Core's "Wrong checksum ... expected %s was %s" log line).
    #[error(
        "bad checksum for {}: expected {}, header has {}",
        CommandDisplay(.command), Hex(.expected), Hex(.actual)
    )]
    BadChecksum { command: Command, expected: [u8; CHECKSUM_LEN], actual: [u8; CHECKSUM_LEN] },
    #[error("invalid command \"{}\"", CommandDisplay(.command))]
    InvalidCommand { command: Command },
}

/// What [`FrameDecoder::decode`] found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole frame yet: `total` is the size of the whole frame (header + payload) once the
    /// header is known and valid, or [`HEADER_LEN`] while the header itself is incomplete. The
    /// caller reserves that much and reads more.
    NeedMore { total: usize },
    /// A whole valid frame is at the start of the buffer: its first `len` bytes
    /// ([`HEADER_LEN`] + payload length). The payload is `buf[HEADER_LEN..len]`.
    Frame { header: V1Header, len: usize },
}

/// Streaming decoder for one direction of a v1 stream. It holds no buffer: the caller owns the
/// bytes, calls [`decode`](FrameDecoder::decode), and consumes `len` bytes after each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    magic: Magic,
    verify_checksum: bool,
    max_payload: usize,
}

impl FrameDecoder {
    /// A decoder expecting `magic`, payloads up to [`MAX_PAYLOAD_BYTES`]. With `verify_checksum`
    /// false the checksum is not computed, for a direction whose bytes are re-checked elsewhere.
    pub fn new(magic: Magic, verify_checksum: bool) -> Self {
        FrameDecoder { magic, verify_checksum, max_payload: MAX_PAYLOAD_BYTES }
    }

    /// The decoder for a first message, a VERSION: checksum verified, payloads up to
    /// [`MAX_VERSION_PAYLOAD_BYTES`].
    pub fn for_version(magic: Magic) -> Self {
        FrameDecoder { magic, verify_checksum: true, max_payload: MAX_VERSION_PAYLOAD_BYTES }
    }

    /// The largest payload this decoder accepts.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub fn magic(&self) -> Magic {
        self.magic
    }

    /// Looks at the start of `buf`, which may hold several frames or a partial one.
    ///
    /// As soon as the 24 header bytes are present it checks the magic, the payload length
    /// against [`MAX_PAYLOAD_BYTES`] or the decoder's lower limit (before the payload arrives,
    /// so the caller never buffers an oversized message; Core's `V1Transport::readHeader` does the same) and the command.
    /// Once the whole frame is present it verifies the checksum if asked to.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, V1Error> {
        let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(Decoded::NeedMore { total: HEADER_LEN });
        };
        let header = V1Header::decode(header_bytes);
        self.check_header(&header)?;

        let total = header.frame_len();
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(Decoded::NeedMore { total });
        };
        if self.verify_checksum {
            let expected = checksum(payload);
            if expected != header.checksum {
                return Err(V1Error::BadChecksum { command: header.command, expected, actual: header.checksum });
            }
        }
        Ok(Decoded::Frame { header, len: total })
    }

    /// Everything that can be checked from the header alone, in Core's order: magic, then
    /// length; then the command, which Core only checks once the payload is in.
    fn check_header(&self, header: &V1Header) -> Result<(), V1Error> {
        if header.magic != self.magic {
            return Err(V1Error::WrongMagic { expected: self.magic, found: header.magic });
        }
        if header.payload_len as usize > self.max_payload {
            return Err(V1Error::PayloadTooLarge { len: header.payload_len, max: self.max_payload });
        }
        if !is_valid_command(&header.command) {
            return Err(V1Error::InvalidCommand { command: header.command });
        }
        Ok(())
    }
}

/// Whether the first 16 bytes a peer sent are `magic` + `"version\0\0\0\0\0"`: BIP324's
/// `V1_PREFIX`, the test a responder uses to tell a v1 peer from a v2 one.
pub fn is_version_prefix(bytes: &[u8; V1_PREFIX_LEN], magic: &Magic) -> bool {
    let (found_magic, command) = bytes.split_at(magic.len());
    found_magic == magic && command == VERSION_COMMAND
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAINNET: Magic = [0xf9, 0xbe, 0xb4, 0xd9];
    const TESTNET3: Magic = [0x0b, 0x11, 0x09, 0x07];

    /// Mainnet `verack`: empty payload, checksum of the empty string is 5df6e0e2.
    const VERACK: [u8; 24] = [
        0xf9, 0xbe, 0xb4, 0xd9, // magic
        b'v', b'e', b'r', b'a', b'c', b'k', 0, 0, 0, 0, 0, 0, // command
        0x00, 0x00, 0x00, 0x00, // payload length
        0x5d, 0xf6, 0xe0, 0xe2, // checksum
    ];

    /// Mainnet `ping` with nonce 0123456789abcdef. Checksum computed independently:
    /// `hashlib.sha256(hashlib.sha256(bytes.fromhex("0123456789abcdef")).digest()).digest()[:4]`.
    const PING: [u8; 32] = [
        0xf9, 0xbe, 0xb4, 0xd9, // magic
        b'p', b'i', b'n', b'g', 0, 0, 0, 0, 0, 0, 0, 0, // command
        0x08, 0x00, 0x00, 0x00, // payload length
        0x13, 0x7a, 0xd6, 0x63, // checksum
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, // nonce
    ];

    fn decoder() -> FrameDecoder {
        FrameDecoder::new(MAINNET, true)
    }

    /// A header-only buffer announcing `len` payload bytes for a `block`.
    fn header_with_len(len: u32) -> [u8; HEADER_LEN] {
        V1Header { magic: MAINNET, command: command_from_str("block").unwrap(), payload_len: len, checksum: [0; 4] }
            .encode()
    }

    #[test]
    fn decodes_verack() {
        assert_eq!(
            decoder().decode(&VERACK),
            Ok(Decoded::Frame {
                header: V1Header {
                    magic: MAINNET,
                    command: command_from_str("verack").unwrap(),
                    payload_len: 0,
                    checksum: [0x5d, 0xf6, 0xe0, 0xe2],
                },
                len: 24,
            })
        );
    }

    #[test]
    fn decodes_ping() {
        let Ok(Decoded::Frame { header, len }) = decoder().decode(&PING) else {
            panic!("ping should decode");
        };
        assert_eq!(len, PING.len());
        assert_eq!(header.command, command_from_str("ping").unwrap());
        assert_eq!(header.payload_len, 8);
        assert_eq!(&PING[HEADER_LEN..len], &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
    }

    #[test]
    fn checksum_matches_known_values() {
        assert_eq!(checksum(&[]), [0x5d, 0xf6, 0xe0, 0xe2]);
        assert_eq!(checksum(&PING[HEADER_LEN..]), [0x13, 0x7a, 0xd6, 0x63]);
        // python3: sha256(sha256(bytes(4)))[:4]
        assert_eq!(checksum(&[0; 4]), [0x8c, 0xb9, 0x01, 0x25]);
    }

    #[test]
    fn every_truncation_needs_more() {
        for message in [&VERACK[..], &PING[..]] {
            for cut in 0..message.len() {
                let expected_total = if cut < HEADER_LEN { HEADER_LEN } else { message.len() };
                assert_eq!(
                    decoder().decode(&message[..cut]),
                    Ok(Decoded::NeedMore { total: expected_total }),
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn back_to_back_frames_decode_one_at_a_time() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&PING);
        stream.extend_from_slice(&VERACK);
        stream.extend_from_slice(&PING[..30]);

        let Ok(Decoded::Frame { header, len }) = decoder().decode(&stream) else {
            panic!("first frame");
        };
        assert_eq!(header.command, command_from_str("ping").unwrap());
        assert_eq!(len, PING.len());
        let rest = &stream[len..];

        let Ok(Decoded::Frame { header, len }) = decoder().decode(rest) else {
            panic!("second frame");
        };
        assert_eq!(header.command, command_from_str("verack").unwrap());
        assert_eq!(len, VERACK.len());
        let rest = &rest[len..];

        assert_eq!(decoder().decode(rest), Ok(Decoded::NeedMore { total: PING.len() }));
    }

    #[test]
    fn wrong_magic_is_rejected() {
        assert_eq!(
            FrameDecoder::new(TESTNET3, true).decode(&VERACK),
            Err(V1Error::WrongMagic { expected: TESTNET3, found: MAINNET })
        );
    }

    #[test]
    fn oversize_length_is_rejected_from_the_header_alone() {
        let header = header_with_len(4_000_001);
        assert_eq!(decoder().decode(&header), Err(V1Error::PayloadTooLarge { len: 4_000_001, max: MAX_PAYLOAD_BYTES }));
        assert_eq!(
            decoder().decode(&header_with_len(u32::MAX)),
            Err(V1Error::PayloadTooLarge { len: u32::MAX, max: MAX_PAYLOAD_BYTES })
        );
    }

    #[test]
    fn a_first_message_is_held_to_the_version_limit_from_its_header() {
        let version = FrameDecoder::for_version(MAINNET);
        assert_eq!(version.max_payload(), MAX_VERSION_PAYLOAD_BYTES);
        assert_eq!(version.decode(&header_with_len(4096)), Ok(Decoded::NeedMore { total: 24 + 4096 }));
        assert_eq!(
            version.decode(&header_with_len(4097)),
            Err(V1Error::PayloadTooLarge { len: 4097, max: MAX_VERSION_PAYLOAD_BYTES })
        );
        assert_eq!(
            version.decode(&header_with_len(4_000_000)),
            Err(V1Error::PayloadTooLarge { len: 4_000_000, max: MAX_VERSION_PAYLOAD_BYTES })
        );
        // Core's largest VERSION (a 256-byte user agent) fits with room to spare.
        const CORE_MAX_VERSION: usize = 4 + 8 + 8 + 26 + 26 + 8 + 3 + 256 + 4 + 1;
        assert_eq!(CORE_MAX_VERSION, 344);
        assert!(version.decode(&header_with_len(CORE_MAX_VERSION as u32)).is_ok());
    }

    #[test]
    fn maximum_length_is_accepted() {
        assert_eq!(decoder().decode(&header_with_len(4_000_000)), Ok(Decoded::NeedMore { total: 4_000_024 }));
    }

    #[test]
    fn bad_checksum_is_rejected() {
        let mut ping = PING;
        ping[HEADER_LEN] ^= 1; // flip a payload bit
        assert_eq!(
            decoder().decode(&ping),
            Err(V1Error::BadChecksum {
                command: command_from_str("ping").unwrap(),
                expected: checksum(&ping[HEADER_LEN..]),
                actual: [0x13, 0x7a, 0xd6, 0x63],
            })
        );
    }

    #[test]
    fn checksum_check_can_be_skipped() {
        let mut ping = PING;
        ping[HEADER_LEN] ^= 1;
        assert_eq!(
            FrameDecoder::new(MAINNET, false).decode(&ping),
            Ok(Decoded::Frame { header: V1Header::decode(ping.first_chunk().unwrap()), len: PING.len() })
        );
    }

    #[test]
    fn invalid_commands_are_rejected_from_the_header_alone() {
        let mut control_byte = VERACK;
        control_byte[COMMAND_AT + 2] = 0x01;
        let mut after_nul = VERACK;
        after_nul[COMMAND_AT + 8] = b'x';
        let mut high_byte = VERACK;
        high_byte[COMMAND_AT] = 0x80;
        for bytes in [control_byte, after_nul, high_byte] {
            let command = V1Header::decode(&bytes).command;
            assert_eq!(decoder().decode(&bytes), Err(V1Error::InvalidCommand { command }));
        }
    }

    #[test]
    fn command_validity_follows_core() {
        assert!(is_valid_command(&[0; 12]));
        assert!(is_valid_command(b"sendaddrv2\0\0"));
        assert!(is_valid_command(b"abcdefghijkl"));
        assert!(is_valid_command(b" ~\0\0\0\0\0\0\0\0\0\0"));
        assert!(!is_valid_command(b"\0ping\0\0\0\0\0\0\0"));
        assert!(!is_valid_command(b"ping\0\0\0\0\0\0\0x"));
        assert!(!is_valid_command(b"pi\x7fng\0\0\0\0\0\0\0"));
        assert!(!is_valid_command(b"pi\x1fng\0\0\0\0\0\0\0"));
    }

    #[test]
    fn command_from_str_pads_and_validates() {
        assert_eq!(command_from_str("ping"), Some(*b"ping\0\0\0\0\0\0\0\0"));
        assert_eq!(command_from_str("version"), Some(VERSION_COMMAND));
        assert_eq!(command_from_str("abcdefghijkl"), Some(*b"abcdefghijkl"));
        assert_eq!(command_from_str(""), Some([0; 12]));
        assert_eq!(command_from_str("abcdefghijklm"), None);
        assert_eq!(command_from_str("pi\nng"), None);
        assert_eq!(command_from_str("ping\0"), None);
        assert_eq!(command_from_str("pïng"), None);
    }

    #[test]
    fn command_display_trims_padding_and_escapes() {
        assert_eq!(command_display(&VERSION_COMMAND).to_string(), "version");
        assert_eq!(command_display(&[0; 12]).to_string(), "");
        assert_eq!(command_display(b"abcdefghijkl").to_string(), "abcdefghijkl");
        assert_eq!(command_display(b"a\x01b\0c\0\0\0\0\0\0\0").to_string(), "a\\x01b\\x00c");
    }

    #[test]
    fn errors_display_lowercase_without_period() {
        let errors = [
            V1Error::WrongMagic { expected: MAINNET, found: TESTNET3 },
            V1Error::PayloadTooLarge { len: 4_000_001, max: MAX_PAYLOAD_BYTES },
            V1Error::BadChecksum { command: VERSION_COMMAND, expected: [1, 2, 3, 4], actual: [5, 6, 7, 8] },
            V1Error::InvalidCommand { command: *b"a\x01\0\0\0\0\0\0\0\0\0\0" },
        ];
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "wrong magic: expected f9beb4d9, found 0b110907",
                "payload of 4000001 bytes exceeds the 4000000 byte limit",
                "bad checksum for version: expected 01020304, header has 05060708",
                "invalid command \"a\\x01\"",
            ]
        );
    }

    #[test]
    fn header_round_trips() {
        assert_eq!(V1Header::decode(&VERACK).encode(), VERACK);
        let ping_header = PING.first_chunk::<HEADER_LEN>().unwrap();
        assert_eq!(V1Header::decode(ping_header).encode(), *ping_header);

        let built = V1Header::for_payload(MAINNET, command_from_str("ping").unwrap(), &PING[HEADER_LEN..]);
        assert_eq!(built.encode(), *ping_header);
        assert_eq!(built.frame_len(), PING.len());
    }

    #[test]
    fn version_prefix() {
        let mut prefix = [0u8; V1_PREFIX_LEN];
        prefix[..4].copy_from_slice(&MAINNET);
        prefix[4..].copy_from_slice(&VERSION_COMMAND);
        assert!(is_version_prefix(&prefix, &MAINNET));
        assert!(!is_version_prefix(&prefix, &TESTNET3));
        let verack_prefix = VERACK.first_chunk::<V1_PREFIX_LEN>().unwrap();
        assert!(!is_version_prefix(verack_prefix, &MAINNET));
    }

    /// Deterministic pseudo-random bytes (xorshift64), so these sweeps need no extra crate.
    fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.max(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for seed in 1..2_000u64 {
            let mut bytes = pseudo_random_bytes(seed, (seed % 64) as usize);
            // Half the inputs carry the right magic so they reach the later checks.
            if seed % 2 == 0 && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&MAINNET);
            }
            let _ = decoder().decode(&bytes);
            let _ = FrameDecoder::new(MAINNET, false).decode(&bytes);
        }
    }

    #[test]
    fn built_frames_decode_with_trailing_bytes() {
        let names = ["", "a", "tx", "version", "sendaddrv2", "abcdefghijkl", " ~!\\\"'"];
        for (seed, name) in (1u64..).zip(names.iter().cycle().take(200)) {
            let command = command_from_str(name).unwrap();
            let payload = pseudo_random_bytes(seed, (seed as usize * 7) % 300);
            let header = V1Header::for_payload(MAINNET, command, &payload);
            let mut stream = header.encode().to_vec();
            stream.extend_from_slice(&payload);
            let len = stream.len();
            stream.extend_from_slice(&pseudo_random_bytes(seed + 1, (seed % 30) as usize));
            assert_eq!(decoder().decode(&stream), Ok(Decoded::Frame { header, len }));
            assert_eq!(&stream[HEADER_LEN..len], &payload[..]);
        }
    }
}
