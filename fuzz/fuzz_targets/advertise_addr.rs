//! Fuzzes the `addr`/`addrv2` rewrite of inbound listeners
//! (`advertise::set_p2p_v2_in_addr` and `set_p2p_v2_in_addr_frame`).
//!
//! The first byte picks the command (bit 0: addrv2) and the advertised
//! address (bit 1: IPv6 `2001:db8::7`, else IPv4 `203.0.113.7`; bits 2..:
//! the port's low byte); the rest is the payload. Besides "no panic": a
//! rewrite never shrinks the payload, grows it by at most 2 bytes per entry
//! set, and is idempotent (a second pass finds every advertised entry set);
//! the frame form agrees with the payload form and yields a frame whose
//! length and checksum are right.
#![no_main]

use std::net::SocketAddr;

use bip324_proxy::advertise::{self, ADDR_COMMAND, ADDRV2_COMMAND, AddrRewrite};
use bip324_proxy::v1::{Decoded, FrameDecoder, HEADER_LEN, V1Header};
use libfuzzer_sys::fuzz_target;

const MAGIC: [u8; 4] = [0xf9, 0xbe, 0xb4, 0xd9];

fuzz_target!(|input: &[u8]| {
    let Some((&flags, payload)) = input.split_first() else {
        return;
    };
    let v2 = flags & 1 == 1;
    let port = 8300 + u16::from(flags >> 2);
    let advertise: SocketAddr = if flags & 2 == 0 {
        SocketAddr::from(([203, 0, 113, 7], port))
    } else {
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7], port))
    };
    let outcome = advertise::set_p2p_v2_in_addr(payload, v2, advertise);
    if let AddrRewrite::Set { entries, frame } = &outcome {
        assert!(*entries >= 1);
        assert!(frame.len() >= payload.len() && frame.len() <= payload.len() + 2 * entries);
        assert_eq!(advertise::set_p2p_v2_in_addr(frame, v2, advertise), AddrRewrite::AlreadySet);
    }

    let command = if v2 { ADDRV2_COMMAND } else { ADDR_COMMAND };
    let mut whole = V1Header::for_payload(MAGIC, command, payload).encode().to_vec();
    whole.extend_from_slice(payload);
    match (advertise::set_p2p_v2_in_addr_frame(&whole, advertise), outcome) {
        (AddrRewrite::Set { entries, frame }, AddrRewrite::Set { entries: expected, frame: rebuilt }) => {
            assert_eq!(entries, expected);
            assert_eq!(&frame[HEADER_LEN..], &rebuilt[..]);
            let Ok(Decoded::Frame { header, len }) = FrameDecoder::new(MAGIC, true).decode(&frame) else {
                panic!("a rebuilt frame must decode with its checksum");
            };
            assert_eq!((len, header.command), (frame.len(), command));
        }
        (framed, bare) => assert_eq!(framed, bare),
    }
    // One bit off in the checksum: never rewritten.
    whole[20] ^= 1;
    assert!(matches!(
        advertise::set_p2p_v2_in_addr_frame(&whole, advertise),
        AddrRewrite::BadFrame
    ));
});
