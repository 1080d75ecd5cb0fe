//! Fuzzes the BIP324 packet layer: `v2::PacketDecoder` (and `PacketEncoder`) with fixed keys.
//!
//! The first input byte picks a mode:
//!
//! - even: **raw**. The rest is ciphertext from an untrusted peer, fed to a decoder with the
//!   default contents limit, in growing slices (as reads arrive) and also all at once; both ways
//!   must give the same packets and the same final outcome. Almost every input fails
//!   authentication, which is fine: what matters is no panic, NeedMore never asking for more
//!   than one maximal packet, and the decrypted length being remembered across NeedMore.
//! - odd: **structured**. The rest describes plaintext packets (see [`Plan`]), which are
//!   encrypted with the matching `PacketEncoder`, optionally bit-flipped at an input-chosen
//!   position, and decoded in input-chosen slices. Untouched packets must decode to exactly the
//!   contents and ignore bits that went in; the packet holding a flipped bit must fail with
//!   `V2Error::Decryption`, or `PacketTooLarge` if the flip hit its length field, and every
//!   packet before it must still decode.
#![no_main]

use bip324_proxy::v2::{self, DecodedPacket, PacketDecoder, PacketEncoder, V2Error};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Arbitrary fixed keys: the fuzzer explores the decoder, not the key schedule.
const LENGTH_KEY: [u8; 32] = [0x4c; 32];
const PACKET_KEY: [u8; 32] = [0x50; 32];
/// Contents limit in structured mode: far above any fuzz input, low enough that a flipped length
/// bit never makes the target pad megabytes before the tag check fails.
const STRUCTURED_MAX_CONTENTS: usize = 1 << 16;
/// Most packets one structured input describes.
const MAX_PACKETS: usize = 16;
/// The garbage-authentication AAD the first packet may carry, as in the handshake.
const AAD: &[u8] = b"garbage that the version packet authenticates";

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(usize::from(mode >> 1) + 1, rest);
    } else {
        structured(rest);
    }
});

/// What a decoder did with a stream: the packets (ignore bit, contents) and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    packets: Vec<(bool, Vec<u8>)>,
    /// `Ok(total)` for NeedMore at the end of the stream, else the error.
    end: Result<usize, V2Error>,
}

fn raw(step: usize, stream: &[u8]) {
    let whole = decode_stream(&mut new_decoder(None), stream, stream.len(), None);
    let sliced = decode_stream(&mut new_decoder(None), stream, step, None);
    assert_eq!(whole, sliced, "slices of {step} bytes");
    if let Ok(total) = whole.end {
        assert!(total <= v2::PACKET_OVERHEAD + v2::MAX_CONTENTS_BYTES, "NeedMore {total}");
    }
    if let Err(V2Error::PacketTooLarge { len, max }) = whole.end {
        assert_eq!(max, v2::MAX_CONTENTS_BYTES);
        assert!(len > max);
        assert!(len < 1 << 24, "the length field is 24 bits");
    }
}

fn new_decoder(max_contents: Option<usize>) -> PacketDecoder {
    let decoder = PacketDecoder::new(&LENGTH_KEY, &PACKET_KEY, 0);
    match max_contents {
        Some(max) => decoder.with_max_contents(max),
        None => decoder,
    }
}

/// Decodes `stream` as bytes arriving `step` at a time. `aad` applies to the first packet only.
fn decode_stream(decoder: &mut PacketDecoder, stream: &[u8], step: usize, aad: Option<&[u8]>) -> Outcome {
    let mut buf = stream.to_vec();
    let mut packets = Vec::new();
    let mut start = 0; // first byte of the packet being decoded
    let mut filled = step.min(buf.len()); // bytes received so far
    loop {
        let aad = if packets.is_empty() { aad.unwrap_or(&[]) } else { &[] };
        let available = filled - start;
        match decoder.decode_with_aad(&mut buf[start..filled], aad) {
            Ok(DecodedPacket::Packet { ignore, contents, len }) => {
                assert!(len <= available, "packet of {len} bytes in {available}");
                assert_eq!(len, v2::PACKET_OVERHEAD + contents.len());
                assert_eq!(contents.start, v2::LENGTH_LEN + v2::HEADER_LEN);
                assert_eq!(contents.end, len - v2::TAG_LEN);
                packets.push((ignore, buf[start + contents.start..start + contents.end].to_vec()));
                start += len;
            }
            Ok(DecodedPacket::NeedMore { total }) => {
                assert!(total > available, "NeedMore {total} with {available} bytes present");
                assert!(total >= v2::LENGTH_LEN);
                if available >= v2::LENGTH_LEN {
                    assert!(total >= v2::PACKET_OVERHEAD, "NeedMore {total} once the length is known");
                    // Asking again must not run the length cipher a second time.
                    let again = decoder.decode_with_aad(&mut buf[start..filled], aad);
                    assert_eq!(again, Ok(DecodedPacket::NeedMore { total }));
                }
                if filled == buf.len() {
                    return Outcome { packets, end: Ok(total) };
                }
                filled = (filled + step).min(buf.len());
            }
            Err(error) => {
                let text = error.to_string();
                assert!(is_error_style(&text), "{text}");
                return Outcome { packets, end: Err(error) };
            }
        }
    }
}

/// The structured input, read byte by byte; missing bytes read as zero.
struct Plan {
    /// Packets the encoder and decoder have already handled (up to 510: crosses both rekeys
    /// at 224 and 448).
    start_packet: u64,
    /// The first packet carries the handshake AAD.
    aad: bool,
    /// Where to flip one bit, as an offset into the ciphertext (reduced modulo its length),
    /// and which bit.
    flip: Option<(usize, u8)>,
    /// Bytes delivered to the decoder per read.
    step: usize,
    /// Plaintext contents and ignore bit of each packet.
    packets: Vec<(bool, Vec<u8>)>,
}

impl Plan {
    /// Layout: `start flags step flip_lo flip_hi` then per packet `len_and_ignore contents...`
    /// where the low 7 bits of `len_and_ignore` are the contents length (a 0x7f length takes
    /// every remaining byte) and the top bit is the ignore bit.
    fn read(input: &[u8]) -> Plan {
        let byte = |i: usize| input.get(i).copied().unwrap_or(0);
        let flags = byte(1);
        let mut packets = Vec::new();
        let mut rest = input.get(5..).unwrap_or(&[]);
        while let Some((&head, tail)) = rest.split_first() {
            if packets.len() == MAX_PACKETS {
                break;
            }
            let len = match usize::from(head & 0x7f) {
                0x7f => tail.len(),
                len => len.min(tail.len()),
            };
            packets.push((head & 0x80 != 0, tail[..len].to_vec()));
            rest = &tail[len..];
        }
        Plan {
            start_packet: u64::from(byte(0)) * 2,
            aad: flags & 0x01 != 0,
            flip: (flags & 0x02 != 0).then(|| (usize::from(u16::from_le_bytes([byte(3), byte(4)])), flags >> 5)),
            step: usize::from(byte(2)) + 1,
            packets,
        }
    }
}

fn structured(input: &[u8]) {
    let plan = Plan::read(input);
    let aad = plan.aad.then_some(AAD);

    let mut encoder = PacketEncoder::new(&LENGTH_KEY, &PACKET_KEY, plan.start_packet);
    let mut wire = BytesMut::new();
    let mut starts = Vec::new();
    for (index, (ignore, contents)) in plan.packets.iter().enumerate() {
        starts.push(wire.len());
        let packet_aad = if index == 0 { aad.unwrap_or(&[]) } else { &[] };
        // Split as the relay does, message type then payload; where is irrelevant to the wire.
        let (message_type, payload) = contents.split_at(contents.len().min(1));
        encoder.encode_packet(message_type, payload, *ignore, packet_aad, &mut wire).expect("small contents encode");
        assert_eq!(wire.len() - starts[index], v2::PACKET_OVERHEAD + contents.len());
    }

    let mut decoder =
        PacketDecoder::new(&LENGTH_KEY, &PACKET_KEY, plan.start_packet).with_max_contents(STRUCTURED_MAX_CONTENTS);
    let Some((offset, bit)) = plan.flip.filter(|_| !wire.is_empty()) else {
        let outcome = decode_stream(&mut decoder, &wire, plan.step, aad);
        assert_eq!(outcome.packets, plan.packets);
        // Every byte consumed: only the next packet's length is awaited.
        assert_eq!(outcome.end, Ok(v2::LENGTH_LEN));
        return;
    };

    let at = offset % wire.len();
    wire[at] ^= 1 << bit;
    let hit = starts.iter().rposition(|&start| start <= at).expect("the first packet starts at 0");
    let in_length = at - starts[hit] < v2::LENGTH_LEN;
    let mut stream = wire.to_vec();
    let mut outcome = decode_stream(&mut decoder, &stream, plan.step, aad);
    assert_eq!(outcome.packets[..], plan.packets[..hit], "packets before the flipped one");
    if let Ok(total) = outcome.end {
        // Only a longer length can leave the decoder waiting; give it the bytes (zeros) it
        // wants and the tag check must fail.
        assert!(in_length, "flip at {at} in packet {hit} left the decoder waiting for {total} bytes");
        assert!(total <= v2::PACKET_OVERHEAD + STRUCTURED_MAX_CONTENTS);
        stream.resize(starts[hit] + total, 0);
        let end = decoder.decode_with_aad(&mut stream[starts[hit]..], if hit == 0 { aad.unwrap_or(&[]) } else { &[] });
        outcome.end = end.map(|decoded| panic!("padded flipped packet decoded as {decoded:?}"));
    }
    match outcome.end {
        Err(V2Error::Decryption) => {}
        Err(V2Error::PacketTooLarge { len, max }) => {
            assert!(in_length, "PacketTooLarge from a flip outside the length field");
            assert_eq!(max, STRUCTURED_MAX_CONTENTS);
            assert!(len > max);
        }
        Ok(total) => unreachable!("NeedMore {total} was resolved above"),
    }
}

/// STYLE.md: error messages are lowercase without a trailing period; a leading protocol word in
/// capitals (`VERSION payload ...`) is a name, not a capitalised sentence.
fn is_error_style(text: &str) -> bool {
    let first_word = text.split(' ').next().unwrap_or_default();
    !text.is_empty()
        && !text.ends_with('.')
        && (!text.starts_with(char::is_uppercase) || !first_word.contains(char::is_lowercase))
}
