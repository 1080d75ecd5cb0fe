//! The proxy's packet ciphers (`v2.rs`, on ring) against the `bip324` crate,
//! in both roles, in memory: the crate runs both handshakes; our keys are
//! derived from the same secrets and must give the same session id; then
//! hundreds of packets cross each way (past several rekeys), encrypted by one
//! implementation and decrypted by the other.

use bip324::{
    CipherSession, FillBytes, GarbageResult, Handshake, Initialized, PacketType, ReceivedKey, Role, SentVersion,
    VersionResult,
};
use bip324_proxy::v2::{DecodedPacket, PacketDecoder, PacketEncoder, SessionKeys};
use bytes::BytesMut;

const MAGIC: [u8; 4] = [0x0a, 0x03, 0xcf, 0x40]; // signet

struct Known([u8; 32]);

impl FillBytes for Known {
    fn fill_bytes(&mut self, dest: &mut [u8; 32]) {
        dest.copy_from_slice(&self.0);
    }
}

fn secret() -> secp256k1::SecretKey {
    secp256k1::SecretKey::new(&mut rand::thread_rng())
}

fn finish(handshake: Handshake<SentVersion>, flight: &[u8]) -> CipherSession {
    let GarbageResult::FoundGarbage { mut handshake, consumed_bytes } = handshake.receive_garbage(flight).unwrap()
    else {
        panic!("no terminator")
    };
    let rest = &flight[consumed_bytes..];
    handshake.decrypt_packet_len(rest[..3].try_into().unwrap()).unwrap();
    let mut packet = rest[3..].to_vec();
    match handshake.receive_version(&mut packet).unwrap() {
        VersionResult::Complete { cipher } => cipher,
        VersionResult::Decoy(_) => panic!("decoy"),
    }
}

/// Runs the crate's handshake; returns both crate sessions and our keys for
/// the initiator and the responder.
fn sessions() -> (CipherSession, CipherSession, SessionKeys, SessionKeys) {
    let secp = secp256k1::Secp256k1::signing_only();
    let (si, sr) = (secret(), secret());
    let initiator =
        Handshake::<Initialized>::new_with_rng(MAGIC, Role::Initiator, &mut Known(si.secret_bytes()), &secp).unwrap();
    let responder =
        Handshake::<Initialized>::new_with_rng(MAGIC, Role::Responder, &mut Known(sr.secret_bytes()), &secp).unwrap();
    let garbage = [0x5a; 33];
    let mut ik = vec![0u8; 64 + garbage.len()];
    let mut rk = [0u8; 64];
    let initiator = initiator.send_key(Some(&garbage), &mut ik).unwrap();
    let responder = responder.send_key(None, &mut rk).unwrap();
    let ours_i: [u8; 64] = ik[..64].try_into().unwrap();
    let initiator = initiator.receive_key(rk).unwrap();
    let responder = responder.receive_key(ours_i).unwrap();
    let mut iflight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(None)];
    let mut rflight = vec![0u8; Handshake::<ReceivedKey>::send_version_len(None)];
    let initiator = initiator.send_version(&mut iflight, None).unwrap();
    let responder = responder.send_version(&mut rflight, None).unwrap();
    let mut from_initiator = garbage.to_vec();
    from_initiator.extend_from_slice(&iflight);
    let crate_i = finish(initiator, &rflight);
    let crate_r = finish(responder, &from_initiator);
    let keys_i = SessionKeys::derive(&si, &ours_i, &rk, bip324_proxy::v2::Role::Initiator, &MAGIC);
    let keys_r = SessionKeys::derive(&sr, &rk, &ours_i, bip324_proxy::v2::Role::Responder, &MAGIC);
    (crate_i, crate_r, keys_i, keys_r)
}

/// `count` packets from the crate's sender to our decoder.
fn crate_to_ours(sender: &mut CipherSession, decoder: &mut PacketDecoder, count: usize) {
    for i in 0..count {
        let contents: Vec<u8> = (0..(i % 300)).map(|b| (b ^ i) as u8).collect();
        let decoy = i % 7 == 3;
        let kind = if decoy { PacketType::Decoy } else { PacketType::Genuine };
        let mut packet = sender.outbound().encrypt_to_vec(&contents, kind, None);
        match decoder.decode(&mut packet).unwrap() {
            DecodedPacket::Packet { ignore, contents: range, len } => {
                assert_eq!(ignore, decoy, "packet {i}");
                assert_eq!(&packet[range], &contents[..], "packet {i}");
                assert_eq!(len, packet.len());
            }
            other => panic!("packet {i}: {other:?}"),
        }
    }
}

/// `count` packets from our encoder to the crate's receiver.
fn ours_to_crate(encoder: &mut PacketEncoder, receiver: &mut CipherSession, count: usize) {
    for i in 0..count {
        let payload: Vec<u8> = (0..(i * 13 % 500)).map(|b| (b + i) as u8).collect();
        let mut out = BytesMut::new();
        encoder.encode(&[14], &payload, &mut out).unwrap();
        let len = receiver.inbound().decrypt_packet_len(out[..3].try_into().unwrap());
        assert_eq!(len, out.len() - 3, "packet {i}");
        let (kind, plaintext) = receiver.inbound().decrypt_to_vec(&out[3..], None).unwrap();
        assert_eq!(kind, PacketType::Genuine);
        assert_eq!(plaintext[1], 14);
        assert_eq!(&plaintext[2..], &payload[..], "packet {i}");
    }
}

#[test]
fn our_keys_match_the_crates_in_both_roles() {
    let (crate_i, crate_r, keys_i, keys_r) = sessions();
    assert_eq!(keys_i.session_id(), crate_i.id());
    assert_eq!(keys_r.session_id(), crate_r.id());
    assert_eq!(*keys_i.send_garbage_terminator(), *keys_r.recv_garbage_terminator());
}

#[test]
fn ours_as_initiator_talks_to_the_crate_as_responder() {
    let (_, mut crate_r, keys_i, _) = sessions();
    // Both sides have each sent their version packet (packet 0).
    let mut encoder = keys_i.encoder(1);
    let mut decoder = keys_i.decoder(1);
    ours_to_crate(&mut encoder, &mut crate_r, 600);
    crate_to_ours(&mut crate_r, &mut decoder, 600);
}

#[test]
fn ours_as_responder_talks_to_the_crate_as_initiator() {
    let (mut crate_i, _, _, keys_r) = sessions();
    let mut encoder = keys_r.encoder(1);
    let mut decoder = keys_r.decoder(1);
    crate_to_ours(&mut crate_i, &mut decoder, 600);
    ours_to_crate(&mut encoder, &mut crate_i, 600);
}
