//! Fuzzes transparent mode's destination: `transparent::addr_recv` on an arbitrary VERSION
//! payload, with `allow_private` both off and on.
//!
//! Invariants: no panic; an accepted address never has port 0 or an unspecified IP, is what the
//! payload's addr_recv field says (IPv4-mapped IPv6 as IPv4), and is routable unless private
//! targets are allowed; whatever is accepted without private targets is accepted with them.
#![no_main]

use std::net::{IpAddr, Ipv6Addr};

use bip324_proxy::transparent::{self, AddrRecvError, MIN_VERSION_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let strict = transparent::addr_recv(payload, false);
    let lenient = transparent::addr_recv(payload, true);
    for (result, allow_private) in [(&strict, false), (&lenient, true)] {
        match result {
            Ok(addr) => {
                assert_ne!(addr.port(), 0, "{addr}");
                assert!(!addr.ip().is_unspecified(), "{addr}");
                assert!(allow_private || transparent::is_routable(&addr.ip()), "{addr}");
                assert_eq!(*addr, expected(payload));
            }
            Err(AddrRecvError::TooShort { len }) => {
                assert_eq!(*len, payload.len());
                assert!(payload.len() < MIN_VERSION_PAYLOAD);
            }
            Err(AddrRecvError::Unspecified(addr)) => assert!(addr.ip().is_unspecified()),
            Err(AddrRecvError::PortZero(addr)) => assert_eq!(addr.port(), 0),
            Err(AddrRecvError::NotRoutable(addr)) => {
                assert!(!allow_private);
                assert!(!transparent::is_routable(&addr.ip()));
            }
        }
        if let Err(error) = result {
            let text = error.to_string();
            assert!(is_error_style(&text), "{text}");
        }
    }
    if let Ok(addr) = strict {
        assert_eq!(lenient, Ok(addr));
    }
});

/// addr_recv read independently: 16 address bytes at offset 28, then a big-endian port.
fn expected(payload: &[u8]) -> std::net::SocketAddr {
    let field: [u8; 18] = payload[28..46].try_into().expect("an accepted payload has addr_recv");
    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&field[..16]).expect("16 bytes"));
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    (ip, u16::from_be_bytes([field[16], field[17]])).into()
}

/// STYLE.md: error messages are lowercase without a trailing period; a leading protocol word in
/// capitals (`VERSION payload ...`) is a name, not a capitalised sentence.
fn is_error_style(text: &str) -> bool {
    let first_word = text.split(' ').next().unwrap_or_default();
    !text.is_empty()
        && !text.ends_with('.')
        && (!text.starts_with(char::is_uppercase) || !first_word.contains(char::is_lowercase))
}
