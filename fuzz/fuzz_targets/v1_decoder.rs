//! Fuzzes v1 framing: the input is one direction of a mainnet v1 stream, cut into frames by
//! `FrameDecoder::decode` as the relay does (consume `len` after each frame, stop at NeedMore or
//! an error). Runs once with checksum verification and once without.
//!
//! Invariants: no panic; NeedMore's `total` is at least the header, at most header + Core's
//! 4,000,000-byte limit, and more than the bytes available; a frame never exceeds the buffer,
//! its header re-encodes to its first 24 bytes and passes every header check; a strict prefix of
//! a frame is NeedMore; with verification the checksum matches; the frames found with
//! verification are a prefix of those found without.
#![no_main]

use bip324_proxy::v1::{self, Decoded, FrameDecoder, V1Error, V1Header};
use libfuzzer_sys::fuzz_target;

const MAINNET: v1::Magic = [0xf9, 0xbe, 0xb4, 0xd9];

fuzz_target!(|input: &[u8]| {
    let verified = frames(input, true);
    let unverified = frames(input, false);
    assert!(verified.len() <= unverified.len());
    assert_eq!(verified[..], unverified[..verified.len()]);
});

/// Cuts `input` into frames and returns each frame's header and length.
fn frames(input: &[u8], verify_checksum: bool) -> Vec<(V1Header, usize)> {
    let decoder = FrameDecoder::new(MAINNET, verify_checksum);
    assert_eq!(decoder.magic(), MAINNET);
    let mut found = Vec::new();
    let mut rest = input;
    loop {
        match decoder.decode(rest) {
            Ok(Decoded::Frame { header, len }) => {
                check_frame(&decoder, rest, &header, len, verify_checksum);
                found.push((header, len));
                rest = &rest[len..];
            }
            Ok(Decoded::NeedMore { total }) => {
                assert!(total >= v1::HEADER_LEN, "NeedMore {total} below the header size");
                assert!(total <= v1::HEADER_LEN + v1::MAX_PAYLOAD_BYTES, "NeedMore {total} above the frame limit");
                assert!(total > rest.len(), "NeedMore {total} with {} bytes present", rest.len());
                if rest.len() >= v1::HEADER_LEN {
                    let header = header_of(rest);
                    assert_eq!(total, header.frame_len());
                }
                return found;
            }
            Err(error) => {
                check_error(rest, &error, verify_checksum);
                return found;
            }
        }
    }
}

fn header_of(buf: &[u8]) -> V1Header {
    V1Header::decode(buf.first_chunk::<{ v1::HEADER_LEN }>().expect("caller checked the length"))
}

fn check_frame(decoder: &FrameDecoder, buf: &[u8], header: &V1Header, len: usize, verify_checksum: bool) {
    assert!(len <= buf.len(), "frame of {len} bytes in a {}-byte buffer", buf.len());
    assert!(len >= v1::HEADER_LEN);
    assert_eq!(len, header.frame_len());
    assert_eq!(*header, header_of(buf));
    assert_eq!(header.encode()[..], buf[..v1::HEADER_LEN]);
    assert_eq!(header.magic, MAINNET);
    assert!(header.payload_len as usize <= v1::MAX_PAYLOAD_BYTES);
    assert!(v1::is_valid_command(&header.command));
    let payload = &buf[v1::HEADER_LEN..len];
    if verify_checksum {
        assert_eq!(v1::checksum(payload), header.checksum);
        // Our own header for this payload is the one on the wire.
        assert_eq!(V1Header::for_payload(header.magic, header.command, payload), *header);
    }
    // A valid command displays as printable text without its NUL padding; it is the name
    // itself unless it holds a byte `escape_ascii` escapes even though printable (\ ' ").
    let name = v1::command_display(&header.command).to_string();
    assert!(name.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{name:?}");
    if !header.command.iter().any(|b| matches!(b, b'\\' | b'\'' | b'"')) {
        assert_eq!(v1::command_from_str(&name), Some(header.command));
    }
    // Every strict prefix is NeedMore: the empty one, one inside the header, the last one.
    for cut in [0, len.min(v1::HEADER_LEN) / 2, len - 1] {
        let expected = if cut < v1::HEADER_LEN { v1::HEADER_LEN } else { len };
        assert_eq!(decoder.decode(&buf[..cut]), Ok(Decoded::NeedMore { total: expected }), "prefix of {cut} bytes");
    }
    // Trailing bytes are never looked at.
    assert_eq!(decoder.decode(&buf[..len]), Ok(Decoded::Frame { header: *header, len }));
}

fn check_error(buf: &[u8], error: &V1Error, verify_checksum: bool) {
    assert!(buf.len() >= v1::HEADER_LEN, "error {error:?} before a whole header");
    let header = header_of(buf);
    match error {
        V1Error::WrongMagic { expected, found } => {
            assert_eq!(*expected, MAINNET);
            assert_eq!(*found, header.magic);
            assert_ne!(*found, MAINNET);
        }
        V1Error::PayloadTooLarge { len, max } => {
            assert_eq!(*len, header.payload_len);
            assert!(*len as usize > *max);
            assert_eq!(*max, v1::MAX_PAYLOAD_BYTES);
        }
        V1Error::InvalidCommand { command } => {
            assert_eq!(*command, header.command);
            assert!(!v1::is_valid_command(command));
        }
        V1Error::BadChecksum { command, expected, actual } => {
            assert!(verify_checksum, "checksum error without verification");
            assert!(buf.len() >= header.frame_len(), "checksum checked before the payload arrived");
            assert_eq!(*command, header.command);
            assert_eq!(*actual, header.checksum);
            assert_eq!(*expected, v1::checksum(&buf[v1::HEADER_LEN..header.frame_len()]));
            assert_ne!(expected, actual);
        }
    }
    // Every error message formats, lowercase and without a trailing period.
    let text = error.to_string();
    assert!(is_error_style(&text), "{text}");
}

/// STYLE.md: error messages are lowercase without a trailing period; a leading protocol word in
/// capitals (`VERSION payload ...`) is a name, not a capitalised sentence.
fn is_error_style(text: &str) -> bool {
    let first_word = text.split(' ').next().unwrap_or_default();
    !text.is_empty()
        && !text.ends_with('.')
        && (!text.starts_with(char::is_uppercase) || !first_word.contains(char::is_lowercase))
}
