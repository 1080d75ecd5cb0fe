//! Fuzzes the client half of the SOCKS5 codec, what we read from an upstream proxy such as Tor:
//! `decode_method_choice`, `decode_auth_status` and `decode_reply`, each on the whole input and
//! chained (method choice -> auth status -> reply) as one upstream stream.
//!
//! Invariants: no panic; `used <= input.len()`; strict prefixes are `Ok(None)`; every reply code
//! decodes (only version and address bytes can be errors); a decoded reply re-encodes with
//! `encode_reply` and decodes to the same reply. The client-role encoders are also checked
//! against the server-role decoders on input-derived values (greeting and credentials), since
//! both roles share one codec.
#![no_main]

mod socks5_contract;

use bip324_proxy::socks5::{self, Credentials, ReplyCode, Socks5Error};
use libfuzzer_sys::fuzz_target;
use socks5_contract::check;

fuzz_target!(|input: &[u8]| {
    check(socks5::decode_method_choice, input);
    check(socks5::decode_auth_status, input);
    reply(input);

    // One upstream stream: method choice, then (if user/pass was chosen) the auth status, then
    // the reply. Try the reply both right after the method choice and after an auth status.
    if let Some((_, used)) = check(socks5::decode_method_choice, input) {
        let rest = &input[used..];
        reply(rest);
        if let Some((_, used)) = check(socks5::decode_auth_status, rest) {
            reply(&rest[used..]);
        }
    }

    encoders_match_decoders(input);
});

/// Decodes a reply and checks what only replies promise.
fn reply(buf: &[u8]) {
    let result = socks5::decode_reply(buf);
    // Any reply code decodes: an error can only come from VER (byte 0) or the address (byte 3+).
    if let (Some(&version), Err(e)) = (buf.first(), &result) {
        match e {
            Socks5Error::BadVersion(v) => assert_eq!(*v, version),
            Socks5Error::AddressTypeNotSupported(_)
            | Socks5Error::EmptyDomain
            | Socks5Error::BadDomainByte(_)
            | Socks5Error::FieldTooLong { .. } => {
                assert_eq!(version, socks5::SOCKS_VERSION);
                // The same error whatever the reply code.
                let mut other = buf.to_vec();
                if let Some(code) = other.get_mut(1) {
                    *code = code.wrapping_add(1);
                }
                assert_eq!(&socks5::decode_reply(&other), &result);
            }
            other => panic!("unexpected reply error {other:?}"),
        }
    }
    let Some((reply, _)) = check(socks5::decode_reply, buf) else {
        return;
    };
    let mut wire = Vec::new();
    socks5::encode_reply(reply.code, &reply.bound, &mut wire)
        .unwrap_or_else(|e| panic!("decoded reply {reply:?} does not encode: {e}"));
    let (again, used) = socks5::decode_reply(&wire).expect("re-encoded reply decodes").expect("whole reply");
    assert_eq!(used, wire.len());
    assert_eq!(again, reply);
    // Every code has a Display form, named or not.
    let text = ReplyCode(reply.code.0).to_string();
    assert!(text.ends_with(&format!("({:#04x})", reply.code.0)), "{text}");
}

/// What we send upstream is what a server (ours included) reads back.
fn encoders_match_decoders(input: &[u8]) {
    // The input as a method list: encode_greeting cuts it at 255.
    let mut wire = Vec::new();
    socks5::encode_greeting(input, &mut wire);
    match socks5::decode_greeting(&wire) {
        Ok(Some((greeting, used))) => {
            assert_eq!(used, wire.len());
            assert_eq!(greeting.methods, &input[..input.len().min(socks5::MAX_FIELD_BYTES)]);
        }
        Err(Socks5Error::NoMethods) => assert!(input.is_empty()),
        other => panic!("encoded greeting decodes as {other:?}"),
    }

    // The input split in two as credentials; fields over 255 bytes are refused unwritten.
    let split = input.first().map_or(0, |&b| usize::from(b)).min(input.len());
    let credentials = Credentials { username: input[..split].to_vec(), password: input[split..].to_vec() };
    let mut wire = Vec::new();
    match socks5::encode_auth(&credentials, &mut wire) {
        Ok(()) => {
            let (decoded, used) = socks5::decode_auth(&wire).expect("encoded auth decodes").expect("whole auth");
            assert_eq!(used, wire.len());
            assert_eq!(decoded, credentials);
        }
        Err(Socks5Error::FieldTooLong { len, .. }) => {
            assert!(len > socks5::MAX_FIELD_BYTES);
            assert!(wire.is_empty(), "nothing is written on error");
        }
        Err(other) => panic!("unexpected auth encoding error {other:?}"),
    }
}
