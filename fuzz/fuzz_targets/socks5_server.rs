//! Fuzzes the server half of the SOCKS5 codec: `decode_greeting`, `decode_auth` and
//! `decode_request`, each on the whole input and then chained as a client would send them
//! (greeting -> auth -> request, each stage starting where the previous one stopped).
//!
//! Invariants: no panic; `used <= input.len()`; every strict prefix of a decoded message is
//! `Ok(None)` (checked on a few prefixes, not all, to keep executions fast); a decoded request
//! re-encodes with `encode_request` (and, if it named a DOMAINNAME, `encode_request_by_name`)
//! and decodes to the same request.
#![no_main]

mod socks5_contract;

use bip324_proxy::socks5;
use libfuzzer_sys::fuzz_target;
use socks5_contract::check;

fuzz_target!(|input: &[u8]| {
    check(socks5::decode_greeting, input);
    check(socks5::decode_auth, input);
    if let Some((request, _)) = check(socks5::decode_request, input) {
        round_trip(&request);
    }

    // The same bytes as one client's stream: each stage hands its leftover bytes to the next.
    let Some((_, used)) = check(socks5::decode_greeting, input) else {
        return;
    };
    let rest = &input[used..];
    // A client that did not offer username/password goes straight to the request; try both.
    if let Some((request, _)) = check(socks5::decode_request, rest) {
        round_trip(&request);
    }
    let Some((_, used)) = check(socks5::decode_auth, rest) else {
        return;
    };
    if let Some((request, _)) = check(socks5::decode_request, &rest[used..]) {
        round_trip(&request);
    }
});

/// A decoded request encodes again (the decoder only produces valid hosts) and decodes to the
/// same command and target; one that came as a DOMAINNAME also re-encodes by that name (how an
/// upstream proxy receives it) and decodes to exactly the same request, name included.
fn round_trip(request: &socks5::Request) {
    let mut wire = Vec::new();
    socks5::encode_request(request.command, &request.target, &mut wire)
        .unwrap_or_else(|e| panic!("decoded request {request:?} does not encode: {e}"));
    let (again, used) = socks5::decode_request(&wire).expect("re-encoded request decodes").expect("whole request");
    assert_eq!(used, wire.len());
    assert_eq!((again.command, &again.target), (request.command, &request.target));
    match &again.target.host {
        socks5::Host::Name(name) => assert_eq!(again.name.as_ref(), Some(name)),
        socks5::Host::Ip(_) => assert_eq!(again.name, None),
    }

    if let Some(name) = &request.name {
        // The name as sent: printable ASCII, and the target's host when that is not an IP.
        assert!(!name.is_empty() && name.len() <= socks5::MAX_FIELD_BYTES, "{name:?}");
        if let socks5::Host::Name(host) = &request.target.host {
            assert_eq!(host, name);
        }
        let mut wire = Vec::new();
        socks5::encode_request_by_name(request.command, name, request.target.port, &mut wire)
            .unwrap_or_else(|e| panic!("decoded name {name:?} does not encode: {e}"));
        let (again, used) = socks5::decode_request(&wire).expect("request by name decodes").expect("whole request");
        assert_eq!(used, wire.len());
        assert_eq!(&again, request);
    }
}
