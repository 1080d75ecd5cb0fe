//! Fuzzes the first-bytes decision and the dial rules: `sniff::classify` on arbitrary client
//! bytes (every prefix, as they would arrive), and `policy::DialRules` on an address built from
//! the input.
//!
//! Invariants: no panic; "need more" only below 64 bytes and for more than is buffered; once
//! decided, the decision stays the same as more bytes arrive; a v1 decision means the input
//! starts with an allowed magic and `version`; a candidate the rules accept is neither
//! unspecified nor, without `allow_private`, unroutable.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bip324_proxy::network::{self, NetworkSet};
use bip324_proxy::policy::{DialRules, is_routable};
use bip324_proxy::sniff::{self, Sniffed, V2_SNIFF_LEN};
use bip324_proxy::v1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let networks = NetworkSet::new(network::builtin());
    let full = sniff::classify(data, &networks, &networks, true);
    match &full {
        Ok(Sniffed::NeedMore(n)) => assert!(*n > data.len() && *n <= V2_SNIFF_LEN),
        Ok(Sniffed::V1(network)) => {
            assert_eq!(&data[..4], &network.magic);
            assert_eq!(&data[4..16], &v1::VERSION_COMMAND);
        }
        _ => {}
    }
    for cut in 0..data.len().min(V2_SNIFF_LEN + 1) {
        match sniff::classify(&data[..cut], &networks, &networks, true) {
            Ok(Sniffed::NeedMore(_)) => {}
            decided => assert_eq!(decided, full, "decided differently at {cut} bytes"),
        }
    }

    if data.len() >= 21 {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&data[..16]);
        let ip = if data[16] & 1 == 0 {
            IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        let port = u16::from_be_bytes([data[17], data[18]]);
        let listen = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), u16::from_be_bytes([data[19], data[20]]));
        let allow_private = data[16] & 2 != 0;
        let rules = DialRules { listening: vec![listen], allow_private };
        let candidate = SocketAddr::new(ip, port);
        if rules.check_candidate(candidate).is_ok() {
            assert!(!ip.to_canonical().is_unspecified());
            assert!(allow_private || is_routable(&ip.to_canonical()));
        }
        let _ = rules.check_connected(candidate, candidate);
    }
});
