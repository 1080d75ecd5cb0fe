//! Property tests over the pure parsers, the same ones fuzz/ covers: SOCKS5 (both roles), v1
//! framing, v2 message types, the v2 packet ciphers, transparent mode's addr_recv, the config
//! file and inbound listeners' addr/addrv2 rewrite. They run in `cargo test` on every commit, so
//! each property is bounded (small inputs, a few dozen to a few hundred cases) to keep the whole
//! file to a few seconds in debug mode; long, coverage-guided runs are fuzz/'s job.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bip324_proxy::socks5::{self, Command, Credentials, Host, ReplyCode, Socks5Error, Target};
use bip324_proxy::translate::{self, MAX_MESSAGE_TYPE_LEN};
use bip324_proxy::v1::{self, Decoded, FrameDecoder, V1Error, V1Header};
use bip324_proxy::v2::{self, DecodedPacket, PacketDecoder, PacketEncoder, V2Error};
use bip324_proxy::{config, transparent};
use bytes::BytesMut;
use proptest::prelude::*;

const MAINNET: v1::Magic = [0xf9, 0xbe, 0xb4, 0xd9];

fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------
// Strategies: values the specs allow.
// ---------------------------------------------------------------------------------------------

/// A hostname a SOCKS5 DOMAINNAME may carry and that is not an IP literal: starts with a letter
/// (so never an IPv4 literal) and holds no `:` (so never an IPv6 one).
fn hostname() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9_-]{0,20}(\\.[a-zA-Z0-9-]{1,12}){0,4}\\.?"
}

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| Host::Ip(Ipv4Addr::from(o).into())),
        any::<[u8; 16]>().prop_map(|o| Host::Ip(Ipv6Addr::from(o).into())),
        hostname().prop_map(Host::Name),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    (host(), any::<u16>()).prop_map(|(host, port)| Target::new(host, port))
}

/// A v1 command Bitcoin Core accepts: 0..=12 printable ASCII bytes, NUL-padded.
fn command() -> impl Strategy<Value = v1::Command> {
    "[ -~]{0,12}".prop_map(|name| v1::command_from_str(&name).expect("printable and short"))
}

/// Commands weighted towards the ones BIP324 gives short IDs.
fn command_mostly_known() -> impl Strategy<Value = v1::Command> {
    prop_oneof![(1u8..=28).prop_map(|id| translate::command_for_short_id(id).expect("assigned short id")), command(),]
}

/// A SOCKS5 decoder: `Ok(None)` until a whole message is there, then the message and its size.
type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>;

/// Checks the SOCKS5 decoder contract on a whole message followed by `trailing` bytes: every
/// strict prefix asks for more, the message decodes to the same value whatever follows, and
/// exactly its bytes are consumed.
fn assert_decodes_whole<T: std::fmt::Debug + PartialEq>(
    decode: Decoder<T>,
    wire: &[u8],
    trailing: &[u8],
) -> Result<T, TestCaseError> {
    for len in 0..wire.len() {
        prop_assert_eq!(decode(&wire[..len]), Ok(None), "prefix of {} bytes", len);
    }
    let mut longer = wire.to_vec();
    longer.extend_from_slice(trailing);
    let (value, used) = decode(&longer).expect("valid message").expect("whole message");
    prop_assert_eq!(used, wire.len());
    prop_assert_eq!(decode(wire), Ok(Some((value, used))));
    Ok(decode(wire).expect("valid").expect("whole").0)
}

// ---------------------------------------------------------------------------------------------
// SOCKS5.
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn socks5_decoders_keep_their_contract_on_any_bytes(
        buf in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            // A plausible start, so whole messages are common and not only "need more".
            (prop_oneof![Just(socks5::SOCKS_VERSION), Just(socks5::AUTH_VERSION)], 0u8..8, proptest::collection::vec(any::<u8>(), 0..48))
                .prop_map(|(version, second, rest)| [vec![version, second], rest].concat()),
        ]
    ) {
        fn check<T>(result: Result<Option<(T, usize)>, Socks5Error>, len: usize) -> Result<(), TestCaseError> {
            if let Ok(Some((_, used))) = result {
                prop_assert!(used > 0 && used <= len);
            }
            Ok(())
        }
        check(socks5::decode_greeting(&buf), buf.len())?;
        check(socks5::decode_auth(&buf), buf.len())?;
        check(socks5::decode_method_choice(&buf), buf.len())?;
        check(socks5::decode_auth_status(&buf), buf.len())?;
        check(socks5::decode_request(&buf), buf.len())?;
        check(socks5::decode_reply(&buf), buf.len())?;
        let _ = socks5::host_from_domain(&buf);
        // Whatever decodes as a request or reply encodes again to the same value.
        if let Ok(Some((request, _))) = socks5::decode_request(&buf) {
            let mut wire = Vec::new();
            socks5::encode_request(request.command, &request.target, &mut wire).expect("decoded request encodes");
            let (again, used) = socks5::decode_request(&wire).expect("valid").expect("whole");
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!((again.command, &again.target), (request.command, &request.target));
            // A DOMAINNAME, IP literal or not, also goes upstream as the same text.
            if let Some(name) = &request.name {
                let mut wire = Vec::new();
                socks5::encode_request_by_name(request.command, name, request.target.port, &mut wire)
                    .expect("decoded name encodes");
                prop_assert_eq!(socks5::decode_request(&wire), Ok(Some((request, wire.len()))));
            }
        }
        if let Ok(Some((reply, _))) = socks5::decode_reply(&buf) {
            let mut wire = Vec::new();
            socks5::encode_reply(reply.code, &reply.bound, &mut wire).expect("decoded reply encodes");
            prop_assert_eq!(socks5::decode_reply(&wire), Ok(Some((reply, wire.len()))));
        }
    }

    #[test]
    fn socks5_request_round_trips(command in any::<u8>(), target in target(), trailing in proptest::collection::vec(any::<u8>(), 0..8)) {
        let command = Command::from(command);
        let mut wire = Vec::new();
        socks5::encode_request(command, &target, &mut wire).expect("valid target encodes");
        let request = assert_decodes_whole(socks5::decode_request, &wire, &trailing)?;
        prop_assert_eq!(request.command, command);
        prop_assert_eq!(request.target, target);
    }

    #[test]
    fn socks5_reply_round_trips_for_every_code(code in any::<u8>(), bound in target()) {
        let mut wire = Vec::new();
        socks5::encode_reply(ReplyCode(code), &bound, &mut wire).expect("valid target encodes");
        let reply = assert_decodes_whole(socks5::decode_reply, &wire, &[0x05])?;
        prop_assert_eq!(reply.code, ReplyCode(code));
        prop_assert_eq!(reply.bound, bound);
    }

    #[test]
    fn socks5_ip_literal_domainnames_become_ips(ip in any::<IpAddr>(), bracketed in any::<bool>(), port in any::<u16>()) {
        // Bitcoin Core and btcd send IP destinations as DOMAINNAME text.
        let text = match (ip, bracketed) {
            (IpAddr::V6(v6), true) => format!("[{v6}]"),
            _ => ip.to_string(),
        };
        let mut wire = vec![0x05, 0x01, 0x00, socks5::ATYP_DOMAIN, text.len() as u8];
        wire.extend_from_slice(text.as_bytes());
        wire.extend_from_slice(&port.to_be_bytes());
        let request = assert_decodes_whole(socks5::decode_request, &wire, &[])?;
        prop_assert_eq!(request.target, Target::new(Host::Ip(ip), port));
        prop_assert_eq!(request.name.as_deref(), Some(text.as_str()));
        // Sent upstream by name, the literal stays text, byte for byte.
        let mut by_name = Vec::new();
        socks5::encode_request_by_name(Command::Connect, &text, port, &mut by_name).expect("IP literal encodes");
        prop_assert_eq!(by_name, wire);
    }

    #[test]
    fn socks5_greeting_and_auth_round_trip(
        methods in proptest::collection::vec(any::<u8>(), 1..=255),
        username in proptest::collection::vec(any::<u8>(), 0..=255),
        password in proptest::collection::vec(any::<u8>(), 0..=255),
    ) {
        let mut wire = Vec::new();
        socks5::encode_greeting(&methods, &mut wire);
        let greeting = assert_decodes_whole(socks5::decode_greeting, &wire, &[0x01])?;
        prop_assert_eq!(greeting.methods, methods);

        let credentials = Credentials { username, password };
        let mut wire = Vec::new();
        socks5::encode_auth(&credentials, &mut wire).expect("fields of at most 255 bytes");
        let decoded = assert_decodes_whole(socks5::decode_auth, &wire, &[0x05])?;
        prop_assert_eq!(decoded, credentials);
    }

    #[test]
    fn target_text_round_trips(target in target()) {
        let text = target.to_string();
        prop_assert_eq!(Target::parse(&text), Ok(target));
    }

    #[test]
    fn target_parse_never_panics(text in "\\PC{0,40}") {
        if let Ok(target) = Target::parse(&text) {
            // Whatever the config accepts can be sent upstream as-is.
            let mut wire = Vec::new();
            socks5::encode_request(Command::Connect, &target, &mut wire).expect("parsed target encodes");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// v1 framing and v2 message types.
// ---------------------------------------------------------------------------------------------

fn frame(command: v1::Command, payload: &[u8]) -> Vec<u8> {
    let mut wire = V1Header::for_payload(MAINNET, command, payload).encode().to_vec();
    wire.extend_from_slice(payload);
    wire
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn v1_stream_of_frames_decodes_in_order(
        frames in proptest::collection::vec((command(), proptest::collection::vec(any::<u8>(), 0..80)), 0..6),
        cut in any::<prop::sample::Index>(),
        verify in any::<bool>(),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|(command, payload)| frame(*command, payload)).collect();
        let decoder = FrameDecoder::new(MAINNET, verify);
        let mut rest = &stream[..];
        for (command, payload) in &frames {
            match decoder.decode(rest) {
                Ok(Decoded::Frame { header, len }) => {
                    prop_assert_eq!(header.command, *command);
                    prop_assert_eq!(&rest[v1::HEADER_LEN..len], &payload[..]);
                    rest = &rest[len..];
                }
                other => prop_assert!(false, "expected a frame, got {:?}", other),
            }
        }
        prop_assert_eq!(decoder.decode(rest), Ok(Decoded::NeedMore { total: v1::HEADER_LEN }));

        // Cut anywhere inside the first frame: NeedMore for exactly that frame's size.
        if let Some((command, payload)) = frames.first() {
            let first = frame(*command, payload);
            let at = cut.index(first.len());
            let expected = if at < v1::HEADER_LEN { v1::HEADER_LEN } else { first.len() };
            prop_assert_eq!(decoder.decode(&stream[..at]), Ok(Decoded::NeedMore { total: expected }));
        }
    }

    #[test]
    fn v1_decoder_keeps_its_contract_on_any_bytes(
        buf in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            // Mainnet magic first, so the length and command checks are reached.
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|mut rest| { rest.splice(0..0, MAINNET); rest }),
        ],
        verify in any::<bool>(),
    ) {
        match FrameDecoder::new(MAINNET, verify).decode(&buf) {
            Ok(Decoded::Frame { header, len }) => {
                prop_assert!(len <= buf.len());
                prop_assert!(v1::is_valid_command(&header.command));
            }
            Ok(Decoded::NeedMore { total }) => {
                prop_assert!(total > buf.len());
                prop_assert!(total <= v1::HEADER_LEN + v1::MAX_PAYLOAD_BYTES);
            }
            Err(_) => prop_assert!(buf.len() >= v1::HEADER_LEN),
        }
    }

    #[test]
    fn v1_oversized_length_is_rejected_from_the_header_alone(len in (v1::MAX_PAYLOAD_BYTES as u32 + 1)..=u32::MAX, command in command()) {
        let header = V1Header { magic: MAINNET, command, payload_len: len, checksum: [0; 4] };
        prop_assert_eq!(
            FrameDecoder::new(MAINNET, true).decode(&header.encode()),
            Err(V1Error::PayloadTooLarge { len, max: v1::MAX_PAYLOAD_BYTES })
        );
    }

    #[test]
    fn v2_message_type_round_trips(command in command_mostly_known(), payload in proptest::collection::vec(any::<u8>(), 0..32)) {
        let mut message_type = [0u8; MAX_MESSAGE_TYPE_LEN];
        let used = translate::encode_message_type(&command, &mut message_type);
        prop_assert_eq!(used == 1, translate::short_id(&command).is_some(), "short id used exactly when one exists");
        let mut contents = message_type[..used].to_vec();
        contents.extend_from_slice(&payload);
        let (decoded, payload_at) = translate::decode_contents(&contents).expect("encoded type decodes");
        prop_assert_eq!(decoded, command);
        prop_assert_eq!(&contents[payload_at..], &payload[..]);
    }

    #[test]
    fn v2_contents_never_panic_and_give_valid_commands(contents in proptest::collection::vec(any::<u8>(), 0..20)) {
        if let Ok((command, payload_at)) = translate::decode_contents(&contents) {
            prop_assert!(v1::is_valid_command(&command));
            prop_assert!(payload_at <= contents.len());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// v2 packets.
// ---------------------------------------------------------------------------------------------

/// Decrypted packets: ignore bit and contents.
type Packets = Vec<(bool, Vec<u8>)>;

/// Decodes `stream` delivered `step` bytes at a time; returns the packets and how it ended
/// (`Ok(total)` for NeedMore at the end of the stream).
fn decode_in_steps(decoder: &mut PacketDecoder, stream: &[u8], step: usize) -> (Packets, Result<usize, V2Error>) {
    let mut buf = stream.to_vec();
    let mut packets = Vec::new();
    let (mut start, mut filled) = (0, step.min(buf.len()));
    loop {
        match decoder.decode(&mut buf[start..filled]) {
            Ok(DecodedPacket::Packet { ignore, contents, len }) => {
                packets.push((ignore, buf[start + contents.start..start + contents.end].to_vec()));
                start += len;
            }
            Ok(DecodedPacket::NeedMore { total }) if filled == buf.len() => return (packets, Ok(total)),
            Ok(DecodedPacket::NeedMore { .. }) => filled = (filled + step).min(buf.len()),
            Err(error) => return (packets, Err(error)),
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn v2_packets_round_trip_in_any_slicing(
        keys in any::<([u8; 32], [u8; 32])>(),
        already in 0u64..460,
        packets in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
        step in 1usize..64,
    ) {
        let (length_key, packet_key) = keys;
        let mut encoder = PacketEncoder::new(&length_key, &packet_key, already);
        let mut wire = BytesMut::new();
        for (ignore, contents) in &packets {
            encoder.encode_packet(&[], contents, *ignore, &[], &mut wire).expect("small packet");
        }
        let mut decoder = PacketDecoder::new(&length_key, &packet_key, already);
        let (decoded, end) = decode_in_steps(&mut decoder, &wire, step);
        prop_assert_eq!(decoded, packets);
        prop_assert_eq!(end, Ok(v2::LENGTH_LEN));
    }

    #[test]
    fn v2_any_flipped_bit_fails_that_packet(
        contents in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..4),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (length_key, packet_key) = ([7u8; 32], [9u8; 32]);
        let mut encoder = PacketEncoder::new(&length_key, &packet_key, 0);
        let mut wire = BytesMut::new();
        let mut starts = Vec::new();
        for packet in &contents {
            starts.push(wire.len());
            encoder.encode(&[], packet, &mut wire).expect("small packet");
        }
        let at = flip.index(wire.len());
        wire[at] ^= 1 << bit;
        let hit = starts.iter().rposition(|&start| start <= at).expect("first packet starts at 0");
        let mut decoder = PacketDecoder::new(&length_key, &packet_key, 0).with_max_contents(1 << 12);
        let mut stream = wire.to_vec();
        let (decoded, end) = decode_in_steps(&mut decoder, &stream, stream.len());
        let expected: Packets = contents[..hit].iter().map(|c| (false, c.clone())).collect();
        prop_assert_eq!(decoded, expected);
        let end = match end {
            // A flipped length bit can make the packet look longer than what arrived: give it
            // zeros up to that length and the tag check must still fail.
            Ok(total) => {
                stream.resize(starts[hit] + total, 0);
                decoder.decode(&mut stream[starts[hit]..]).map(|decoded| format!("{decoded:?}"))
            }
            Err(error) => Err(error),
        };
        let in_length = at - starts[hit] < v2::LENGTH_LEN;
        match end {
            Err(V2Error::Decryption) => {}
            Err(V2Error::PacketTooLarge { .. }) => prop_assert!(in_length),
            Ok(decoded) => prop_assert!(false, "flipped packet decoded: {}", decoded),
        }
    }

    #[test]
    fn v2_decoder_keeps_its_contract_on_any_bytes(buf in proptest::collection::vec(any::<u8>(), 0..128), step in 1usize..40) {
        let mut decoder = PacketDecoder::new(&[1; 32], &[2; 32], 0);
        let (_, end) = decode_in_steps(&mut decoder, &buf, step);
        match end {
            Ok(total) => prop_assert!(total <= v2::PACKET_OVERHEAD + v2::MAX_CONTENTS_BYTES),
            Err(V2Error::PacketTooLarge { len, max }) => prop_assert!(len > max),
            Err(V2Error::Decryption) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transparent mode and the config file.
// ---------------------------------------------------------------------------------------------

/// A VERSION payload as Bitcoin Core writes it, with `addr_recv` set to `addr`.
fn version_payload(addr: SocketAddr, tail: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&70016i32.to_le_bytes());
    payload.extend_from_slice(&0xc09u64.to_le_bytes());
    payload.extend_from_slice(&1_732_550_000i64.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    payload.extend_from_slice(&ip.octets());
    payload.extend_from_slice(&addr.port().to_be_bytes());
    payload.extend_from_slice(tail);
    payload
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn addr_recv_is_read_back(addr in any::<SocketAddr>(), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        // IPv4 travels as IPv4-mapped IPv6 and comes back as IPv4; IPv6 flow info is not on the wire.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let payload = version_payload(addr, &tail);
        let lenient = transparent::addr_recv(&payload, true);
        let strict = transparent::addr_recv(&payload, false);
        if addr.ip().is_unspecified() || addr.port() == 0 {
            prop_assert!(lenient.is_err() && strict.is_err());
        } else {
            prop_assert_eq!(lenient, Ok(addr));
            prop_assert_eq!(strict.is_ok(), transparent::is_routable(&addr.ip()));
        }
    }

    #[test]
    fn addr_recv_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..64), allow_private in any::<bool>()) {
        if let Ok(addr) = transparent::addr_recv(&payload, allow_private) {
            prop_assert!(addr.port() != 0 && !addr.ip().is_unspecified());
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn config_parse_never_panics(text in prop_oneof![
        "\\PC{0,60}",
        // Keys the file knows, with arbitrary values, so typed errors are reached too.
        ("(listen|fallback|passthrough|networks|max_sessions|allow|\\[timeouts\\]\nidle|\\[custom_networks\\]\nx) = ", "\\PC{0,20}")
            .prop_map(|(key, value)| format!("{key}{value}\n")),
    ]) {
        if let Err(error) = config::parse_file(&text) {
            prop_assert!(!error.0.is_empty());
        }
    }

    #[test]
    fn config_accepts_what_it_documents(
        port in any::<u16>(),
        fallback in prop_oneof![Just("none"), Just("v1")],
        max_sessions in 1usize..100_000,
        idle in prop_oneof![Just(0u64), 1200u64..100_000],
    ) {
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nfallback = \"{fallback}\"\nmax_sessions = {max_sessions}\n\
             [timeouts]\nidle = {idle}\n"
        );
        prop_assert!(config::parse_file(&text).is_ok(), "{}", text);
    }
}

// ---------------------------------------------------------------------------------------------
// The first-bytes decision and the dial rules.
// ---------------------------------------------------------------------------------------------

mod sniff_and_policy {
    use bip324_proxy::network::{self, NetworkSet};
    use bip324_proxy::policy::{DialRefusal, DialRules, is_routable};
    use bip324_proxy::sniff::{self, Sniffed, V2_SNIFF_LEN};

    use super::*;

    fn all() -> NetworkSet {
        NetworkSet::new(network::builtin())
    }

    proptest! {
        #![proptest_config(cases(512))]

        /// Any bytes: no panic, "need more" only below 64 bytes, and a decision
        /// never changes when more bytes arrive.
        #[test]
        fn classify_is_total_and_stable(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let networks = all();
            let full = sniff::classify(&bytes, &networks, &networks, true);
            if let Ok(Sniffed::NeedMore(n)) = &full {
                prop_assert!(*n > bytes.len() && *n <= V2_SNIFF_LEN);
            }
            for cut in 0..bytes.len() {
                match sniff::classify(&bytes[..cut], &networks, &networks, true) {
                    Ok(Sniffed::NeedMore(_)) => {}
                    decided => prop_assert_eq!(&decided, &full, "decided at {} bytes", cut),
                }
            }
        }

        /// A uniformly random 64-byte key is passed through (the false-refusal
        /// rate is 1.3e-10, so a failure here means the rule changed).
        #[test]
        fn random_keys_are_v2(key in any::<[u8; 32]>(), more in any::<[u8; 32]>()) {
            let networks = all();
            let mut bytes = key.to_vec();
            bytes.extend_from_slice(&more);
            prop_assert_eq!(sniff::classify(&bytes, &networks, &networks, true), Ok(Sniffed::V2));
        }

        /// Any candidate: no panic; a refused one is refused for a reason that
        /// holds, and an allowed one is routable unless private targets are allowed.
        #[test]
        fn dial_rules_hold(ip in any::<[u8; 16]>(), port in any::<u16>(), v4 in any::<bool>(),
                           listen_port in any::<u16>(), allow_private in any::<bool>()) {
            let ip = if v4 { IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])) } else { IpAddr::V6(Ipv6Addr::from(ip)) };
            let candidate = SocketAddr::new(ip, port);
            let rules = DialRules { listening: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen_port)], allow_private };
            match rules.check_candidate(candidate) {
                Ok(()) => {
                    prop_assert!(!ip.to_canonical().is_unspecified());
                    prop_assert!(allow_private || is_routable(&ip.to_canonical()));
                    prop_assert!(!(ip.to_canonical().is_loopback() && port == listen_port));
                }
                Err(DialRefusal::Unspecified(_)) => prop_assert!(ip.to_canonical().is_unspecified()),
                Err(DialRefusal::SelfTarget(a)) => prop_assert_eq!(a.port(), listen_port),
                Err(DialRefusal::Private(_)) => prop_assert!(!allow_private && !is_routable(&ip.to_canonical())),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// addr / addrv2: NODE_P2P_V2 on the advertised address (inbound listeners' `advertise`).
// ---------------------------------------------------------------------------------------------

mod addr_rewrite {
    use std::net::{Ipv4Addr, SocketAddr};

    use bip324_proxy::advertise::{self, AddrRewrite, NODE_P2P_V2};
    use proptest::prelude::*;

    const ADVERTISED: [u8; 4] = [203, 0, 113, 7];
    const PORT: u16 = 8333;

    /// One IPv4 entry: (address is the advertised one, port is, services).
    fn entry() -> impl Strategy<Value = (bool, bool, u64)> {
        (any::<bool>(), any::<bool>(), prop_oneof![0u64..0x1_0000, any::<u64>()])
    }

    fn compact_size(value: u64, out: &mut Vec<u8>) {
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

    /// The payload with these entries, services as given or (`set`) with the
    /// bit on the advertised entries.
    fn payload(entries: &[(bool, bool, u64)], v2: bool, set: bool) -> Vec<u8> {
        let mut out = Vec::new();
        compact_size(entries.len() as u64, &mut out);
        for &(ours, our_port, services) in entries {
            let advertised = ours && our_port;
            let services = if set && advertised { services | NODE_P2P_V2 } else { services };
            let ip = if ours { ADVERTISED } else { [198, 51, 100, 9] };
            let port = if our_port { PORT } else { PORT + 1 };
            out.extend_from_slice(&1_700_000_000u32.to_le_bytes());
            if v2 {
                compact_size(services, &mut out);
                out.extend_from_slice(&[1, 4]);
                out.extend_from_slice(&ip);
            } else {
                out.extend_from_slice(&services.to_le_bytes());
                out.extend_from_slice(&Ipv4Addr::from(ip).to_ipv6_mapped().octets());
            }
            out.extend_from_slice(&port.to_be_bytes());
        }
        out
    }

    fn advertise() -> SocketAddr {
        SocketAddr::from((ADVERTISED, PORT))
    }

    proptest! {
        #![proptest_config(super::cases(256))]

        #[test]
        fn exactly_the_advertised_entries_get_the_bit(entries in proptest::collection::vec(entry(), 0..40), v2 in any::<bool>()) {
            let before = payload(&entries, v2, false);
            let expected = payload(&entries, v2, true);
            let to_set = entries.iter().filter(|(ours, port, services)| *ours && *port && services & NODE_P2P_V2 == 0).count();
            let any_advertised = entries.iter().any(|(ours, port, _)| *ours && *port);
            match advertise::set_p2p_v2_in_addr(&before, v2, advertise()) {
                AddrRewrite::Set { entries, frame } => {
                    prop_assert_eq!(entries, to_set);
                    prop_assert_eq!(&frame, &expected);
                    prop_assert!(frame.len() <= before.len() + 2 * to_set);
                    prop_assert_eq!(advertise::set_p2p_v2_in_addr(&frame, v2, advertise()), AddrRewrite::AlreadySet);
                }
                AddrRewrite::AlreadySet => prop_assert!(to_set == 0 && any_advertised),
                AddrRewrite::OtherAddresses => prop_assert!(!any_advertised),
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn any_bytes_never_panic_and_a_rewrite_only_sets_bits(bytes in proptest::collection::vec(any::<u8>(), 0..400), v2 in any::<bool>()) {
            if let AddrRewrite::Set { frame, .. } = advertise::set_p2p_v2_in_addr(&bytes, v2, advertise()) {
                prop_assert!(frame.len() >= bytes.len());
                prop_assert_eq!(advertise::set_p2p_v2_in_addr(&frame, v2, advertise()), AddrRewrite::AlreadySet);
            }
            // Every cut of a valid payload is refused, never half-rewritten.
            let valid = payload(&[(true, true, 9), (false, true, 9)], v2, false);
            let cut = bytes.first().map_or(0, |&b| usize::from(b) % valid.len());
            prop_assert!(matches!(advertise::set_p2p_v2_in_addr(&valid[..cut.max(1)], v2, advertise()), AddrRewrite::Malformed(_)));
        }
    }
}
