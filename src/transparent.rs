//! PURE transparent-mode destination: `addr_recv` of the client's first
//! message, which must be VERSION. The payload is read with fixed offsets
//! and a length check; nothing in it is trusted beyond those 46 bytes.
//!
//! VERSION payload layout (Bitcoin Core `PushMessage(VERSION, ...)`):
//! version i32 LE | services u64 LE | timestamp i64 LE |
//! addr_recv: services u64 LE, 16-byte IPv6 (IPv4 as ::ffff:a.b.c.d), port u16 BE | ...

use std::net::{Ipv6Addr, SocketAddr};

/// Offset of addr_recv's 16 address bytes in the VERSION payload.
const ADDR_RECV_IP: usize = 4 + 8 + 8 + 8;
/// Bytes of VERSION payload needed to read addr_recv.
pub const MIN_VERSION_PAYLOAD: usize = ADDR_RECV_IP + 16 + 2;

/// Why addr_recv cannot be used as a destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrRecvError {
    #[error("VERSION payload of {len} bytes is too short for addr_recv ({MIN_VERSION_PAYLOAD} needed)")]
    TooShort { len: usize },
    #[error(
        "addr_recv is {0}, the placeholder Bitcoin Core writes for peers it cannot name in VERSION \
         (onion, I2P, CJDNS or unroutable); such peers cannot be reached in transparent mode"
    )]
    Unspecified(SocketAddr),
    #[error("addr_recv {0} has port 0")]
    PortZero(SocketAddr),
    #[error("addr_recv {0} is not a publicly routable address (allow_private_targets is off)")]
    NotRoutable(SocketAddr),
}

/// The destination a VERSION payload names in addr_recv.
pub fn addr_recv(payload: &[u8], allow_private: bool) -> Result<SocketAddr, AddrRecvError> {
    let Some(field) = payload.get(ADDR_RECV_IP..MIN_VERSION_PAYLOAD) else {
        return Err(AddrRecvError::TooShort { len: payload.len() });
    };
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&field[..16]);
    let port = u16::from_be_bytes([field[16], field[17]]);
    let ip = Ipv6Addr::from(ip).to_canonical();
    let addr = SocketAddr::new(ip, port);
    if ip.is_unspecified() {
        return Err(AddrRecvError::Unspecified(addr));
    }
    if port == 0 {
        return Err(AddrRecvError::PortZero(addr));
    }
    if !allow_private && !is_routable(&ip) {
        return Err(AddrRecvError::NotRoutable(addr));
    }
    Ok(addr)
}

pub use crate::policy::is_routable;

#[cfg(test)]
mod tests {
    use super::*;

    /// A VERSION payload as Bitcoin Core lays it out, with `addr_recv`.
    fn payload(ip: [u8; 16], port: u16) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&70016i32.to_le_bytes());
        p.extend_from_slice(&0x409u64.to_le_bytes());
        p.extend_from_slice(&1_700_000_000i64.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&ip);
        p.extend_from_slice(&port.to_be_bytes());
        // addr_from, nonce, user agent, start height, relay
        p.extend_from_slice(&[0u8; 26]);
        p.extend_from_slice(&7u64.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&0i32.to_le_bytes());
        p.push(1);
        p
    }

    fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
        let mut ip = [0u8; 16];
        ip[10] = 0xff;
        ip[11] = 0xff;
        ip[12..].copy_from_slice(&a);
        ip
    }

    #[test]
    fn ipv4_mapped_and_native_ipv6() {
        assert_eq!(
            addr_recv(&payload(v4_mapped([15, 61, 23, 23]), 8333), false),
            Ok("15.61.23.23:8333".parse().unwrap())
        );
        let v6: Ipv6Addr = "2a01:4f8::1".parse().unwrap();
        assert_eq!(addr_recv(&payload(v6.octets(), 8333), false), Ok("[2a01:4f8::1]:8333".parse().unwrap()));
    }

    #[test]
    fn port_is_big_endian() {
        let p = payload(v4_mapped([15, 61, 23, 23]), 0x208d);
        assert_eq!(&p[ADDR_RECV_IP + 16..MIN_VERSION_PAYLOAD], &[0x20, 0x8d]);
        assert_eq!(addr_recv(&p, false).unwrap().port(), 8333);
    }

    #[test]
    fn placeholders_and_port_zero_refused() {
        assert!(matches!(addr_recv(&payload([0; 16], 0), true), Err(AddrRecvError::Unspecified(_))));
        assert!(matches!(addr_recv(&payload(v4_mapped([0, 0, 0, 0]), 8333), true), Err(AddrRecvError::Unspecified(_))));
        assert!(matches!(addr_recv(&payload(v4_mapped([15, 61, 23, 23]), 0), true), Err(AddrRecvError::PortZero(_))));
    }

    #[test]
    fn private_targets_need_the_switch() {
        for ip in [
            v4_mapped([127, 0, 0, 1]),
            v4_mapped([10, 1, 2, 3]),
            v4_mapped([192, 168, 1, 1]),
            Ipv6Addr::LOCALHOST.octets(),
        ] {
            let p = payload(ip, 18444);
            assert!(matches!(addr_recv(&p, false), Err(AddrRecvError::NotRoutable(_))));
            assert!(addr_recv(&p, true).is_ok());
        }
    }

    #[test]
    fn truncation_at_every_length() {
        let p = payload(v4_mapped([15, 61, 23, 23]), 8333);
        for len in 0..MIN_VERSION_PAYLOAD {
            assert_eq!(addr_recv(&p[..len], false), Err(AddrRecvError::TooShort { len }));
        }
        assert!(addr_recv(&p[..MIN_VERSION_PAYLOAD], false).is_ok());
    }
}
