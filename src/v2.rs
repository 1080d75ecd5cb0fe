//! PURE BIP324 packet layer: session key derivation (one ECDH, then HKDF),
//! the rekeying ciphers (FSChaCha20 for lengths, FSChaCha20Poly1305 for
//! packets), a streaming packet encoder/decoder over caller-owned buffers,
//! and the two byte-level pieces of the handshake: our garbage terminator,
//! decoys and version packet ([`SessionKeys::encode_handshake_tail`]) and the
//! search for the remote's terminator ([`find_garbage_terminator`]).
//!
//! `upgrade.rs` (initiator) and `respond.rs` (responder) do the handshake's
//! I/O around these. Packet encryption runs on ring's ChaCha20-Poly1305
//! (SIMD, constant-time tag check); the length cipher, three bytes per
//! packet, uses the plain ChaCha20 block function the `bip324` crate itself
//! is built on. See docs/DESIGN.md for why neither the handshake nor the
//! packet cipher is the `bip324` crate's own.

use std::ops::Range;

pub use bip324::Role;
use bytes::{BufMut, BytesMut};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use secp256k1::SecretKey;
use secp256k1::ellswift::{ElligatorSwift, ElligatorSwiftParty};
use zeroize::{Zeroize, Zeroizing};

use crate::v1;

/// Encrypted length field of every packet (BIP324 `LENGTH_FIELD_LEN`).
pub const LENGTH_LEN: usize = 3;
/// Header byte carrying the ignore bit (BIP324 `HEADER_LEN`).
pub const HEADER_LEN: usize = 1;
/// Poly1305 tag (BIP324 `CHACHA20POLY1305_EXPANSION`).
pub const TAG_LEN: usize = 16;
/// Bytes a packet adds around its contents.
pub const PACKET_OVERHEAD: usize = LENGTH_LEN + HEADER_LEN + TAG_LEN;
/// Top bit of the header byte: the packet is a decoy and must be skipped.
pub const IGNORE_BIT: u8 = 0x80;
/// Both rekeying wrappers change key after this many packets (BIP324 `REKEY_INTERVAL`).
pub const REKEY_INTERVAL: u64 = 224;
/// Largest contents we accept: 0x00 + 12-byte command + Bitcoin Core's
/// MAX_PROTOCOL_MESSAGE_LENGTH payload. Checked as soon as the length is
/// decrypted, before any buffer grows for the packet.
pub const MAX_CONTENTS_BYTES: usize = 1 + v1::COMMAND_LEN + v1::MAX_PAYLOAD_BYTES;
/// Largest contents of a packet carrying a VERSION: its message type in long
/// form and at most [`v1::MAX_VERSION_PAYLOAD_BYTES`] of payload.
pub const MAX_VERSION_CONTENTS_BYTES: usize = 1 + v1::COMMAND_LEN + v1::MAX_VERSION_PAYLOAD_BYTES;
/// Garbage terminators are 16 bytes.
pub const GARBAGE_TERMINATOR_LEN: usize = 16;
/// ElligatorSwift-encoded public keys are 64 bytes.
pub const ELLSWIFT_LEN: usize = 64;
/// BIP324: at most 4095 bytes of garbage precede the garbage terminator.
pub const MAX_GARBAGE_LEN: usize = 4095;

/// The contents length field is 24 bits.
const MAX_LENGTH_FIELD: usize = (1 << 24) - 1;

/// Errors in the packet stream. Any of them ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V2Error {
    #[error("packet contents of {len} bytes exceed the {max}-byte limit")]
    PacketTooLarge { len: usize, max: usize },
    #[error("packet authentication failed")]
    Decryption,
}

/// Everything HKDF derives from the ECDH secret (BIP324 "Shared secret
/// computation"), already oriented for our role. The four cipher keys are
/// private: they leave only as ciphers ([`SessionKeys::encoder`],
/// [`SessionKeys::decoder`]) and are zeroized when the keys are dropped.
pub struct SessionKeys {
    session_id: [u8; 32],
    send_length_key: Zeroizing<[u8; 32]>,
    send_packet_key: Zeroizing<[u8; 32]>,
    recv_length_key: Zeroizing<[u8; 32]>,
    recv_packet_key: Zeroizing<[u8; 32]>,
    send_garbage_terminator: [u8; GARBAGE_TERMINATOR_LEN],
    recv_garbage_terminator: [u8; GARBAGE_TERMINATOR_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys").field("session_id", &hex::encode(self.session_id)).finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// ECDH with ElligatorSwift-encoded keys (x-only, BIP324 tagged hash),
    /// then the HKDF expansions.
    pub fn derive(
        our_secret: &SecretKey,
        ours: &[u8; ELLSWIFT_LEN],
        theirs: &[u8; ELLSWIFT_LEN],
        role: Role,
        magic: &v1::Magic,
    ) -> SessionKeys {
        let ours = ElligatorSwift::from_array(*ours);
        let theirs = ElligatorSwift::from_array(*theirs);
        let (a, b, party) = match role {
            Role::Initiator => (ours, theirs, ElligatorSwiftParty::A),
            Role::Responder => (theirs, ours, ElligatorSwiftParty::B),
        };
        let shared = Zeroizing::new(ElligatorSwift::shared_secret(a, b, *our_secret, party, None).to_secret_bytes());
        Self::from_shared_secret(&shared, role, magic)
    }

    /// HKDF-SHA256 with salt "bitcoin_v2_shared_secret" + magic.
    pub fn from_shared_secret(shared: &[u8; 32], role: Role, magic: &v1::Magic) -> SessionKeys {
        let mut salt = [0u8; 28];
        salt[..24].copy_from_slice(b"bitcoin_v2_shared_secret");
        salt[24..].copy_from_slice(magic);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
        let expand = |info: &[u8]| -> Zeroizing<[u8; 32]> {
            let mut out = Zeroizing::new([0u8; 32]);
            // Both calls only fail for an output longer than 255 hash lengths.
            prk.expand(&[info], HkdfLen(32))
                .and_then(|okm| okm.fill(&mut out[..]))
                .expect("32-byte HKDF output is always valid");
            out
        };
        let session_id = *expand(b"session_id");
        let initiator_l = expand(b"initiator_L");
        let initiator_p = expand(b"initiator_P");
        let responder_l = expand(b"responder_L");
        let responder_p = expand(b"responder_P");
        let terminators = expand(b"garbage_terminators");
        let mut initiator_t = [0u8; GARBAGE_TERMINATOR_LEN];
        let mut responder_t = [0u8; GARBAGE_TERMINATOR_LEN];
        initiator_t.copy_from_slice(&terminators[..16]);
        responder_t.copy_from_slice(&terminators[16..]);
        match role {
            Role::Initiator => SessionKeys {
                session_id,
                send_length_key: initiator_l,
                send_packet_key: initiator_p,
                recv_length_key: responder_l,
                recv_packet_key: responder_p,
                send_garbage_terminator: initiator_t,
                recv_garbage_terminator: responder_t,
            },
            Role::Responder => SessionKeys {
                session_id,
                send_length_key: responder_l,
                send_packet_key: responder_p,
                recv_length_key: initiator_l,
                recv_packet_key: initiator_p,
                send_garbage_terminator: responder_t,
                recv_garbage_terminator: initiator_t,
            },
        }
    }

    /// The BIP324 session id, as Bitcoin Core's `getpeerinfo` shows it (in hex).
    pub fn session_id(&self) -> &[u8; 32] {
        &self.session_id
    }

    /// The garbage terminator we send after our garbage.
    pub fn send_garbage_terminator(&self) -> &[u8; GARBAGE_TERMINATOR_LEN] {
        &self.send_garbage_terminator
    }

    /// The garbage terminator that ends the remote's garbage.
    pub fn recv_garbage_terminator(&self) -> &[u8; GARBAGE_TERMINATOR_LEN] {
        &self.recv_garbage_terminator
    }

    /// Encoder for our direction, positioned after `sent_packets` packets.
    pub fn encoder(&self, sent_packets: u64) -> PacketEncoder {
        PacketEncoder::new(&self.send_length_key, &self.send_packet_key, sent_packets)
    }

    /// Decoder for the remote's direction, positioned after `received_packets` packets.
    pub fn decoder(&self, received_packets: u64) -> PacketDecoder {
        PacketDecoder::new(&self.recv_length_key, &self.recv_packet_key, received_packets)
    }

    /// Appends what follows our garbage in the handshake (BIP324
    /// "Handshake"): our garbage terminator, a decoy packet of zeros for each
    /// of `decoy_lens`, and our version packet (empty contents). The first of
    /// these packets carries our `garbage` as AAD, which is how the remote
    /// authenticates it. Returns the encoder positioned after them, for the
    /// packets that follow in the same flight.
    pub fn encode_handshake_tail(
        &self,
        garbage: &[u8],
        decoy_lens: &[usize],
        out: &mut BytesMut,
    ) -> Result<PacketEncoder, V2Error> {
        out.put_slice(&self.send_garbage_terminator);
        let mut encoder = self.encoder(0);
        let mut aad = garbage;
        for &len in decoy_lens {
            encoder.seal_appended(len, true, aad, out, |out| out.put_bytes(0, len))?;
            aad = &[];
        }
        encoder.encode_packet(&[], &[], false, aad, out)?;
        Ok(encoder)
    }
}

/// Where the remote's garbage ends, as far as the bytes so far tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GarbageScan {
    /// The garbage is the first `garbage_len` bytes; the terminator follows.
    Found { garbage_len: usize },
    /// Not found yet: scan again from `resume` once more bytes are in (the
    /// bytes before it cannot start the terminator).
    NeedMore { resume: usize },
    /// [`MAX_GARBAGE_LEN`] bytes of garbage and no terminator after them:
    /// the remote broke BIP324's limit.
    TooLong,
}

/// Looks for `terminator` in what the remote sent after its key, from
/// `resume` on (0 at first, then what the last scan answered), so a remote
/// that sends one byte at a time costs one comparison per byte, not a
/// rescan. Only the first `MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN` bytes
/// are searched.
pub fn find_garbage_terminator(
    received: &[u8],
    terminator: &[u8; GARBAGE_TERMINATOR_LEN],
    resume: usize,
) -> GarbageScan {
    let limit = MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN;
    let window = &received[..received.len().min(limit)];
    let from = resume.min(window.len());
    if let Some(at) = window[from..].windows(GARBAGE_TERMINATOR_LEN).position(|w| w == terminator) {
        return GarbageScan::Found { garbage_len: from + at };
    }
    if window.len() >= limit {
        return GarbageScan::TooLong;
    }
    GarbageScan::NeedMore { resume: window.len().saturating_sub(GARBAGE_TERMINATOR_LEN - 1) }
}

struct HkdfLen(usize);

impl hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// BIP324 FSChaCha20: the length cipher. A ChaCha20 keystream consumed three
/// bytes per packet; after 224 chunks the next 32 keystream bytes become the
/// new key and the nonce's rekey counter advances.
struct FsChaCha20 {
    key: [u8; 32],
    chunk_counter: u64,
    block_counter: u32,
    block: [u8; 64],
    /// Next unused byte of `block`; 64 means a new block is needed.
    block_pos: usize,
}

impl FsChaCha20 {
    fn new(key: &[u8; 32]) -> Self {
        FsChaCha20 { key: *key, chunk_counter: 0, block_counter: 0, block: [0; 64], block_pos: 64 }
    }

    fn keystream_byte(&mut self) -> u8 {
        if self.block_pos == 64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(self.chunk_counter / REKEY_INTERVAL).to_le_bytes());
            let cipher = chacha20_poly1305::chacha20::ChaCha20::new_from_block(
                chacha20_poly1305::Key::new(self.key),
                chacha20_poly1305::Nonce::new(nonce),
                self.block_counter,
            );
            self.block = cipher.get_keystream(self.block_counter);
            self.block_counter = self.block_counter.wrapping_add(1);
            self.block_pos = 0;
        }
        let byte = self.block[self.block_pos];
        self.block_pos += 1;
        byte
    }

    fn crypt(&mut self, chunk: &mut [u8; LENGTH_LEN]) {
        for byte in chunk.iter_mut() {
            *byte ^= self.keystream_byte();
        }
        if (self.chunk_counter + 1).is_multiple_of(REKEY_INTERVAL) {
            let mut key = [0u8; 32];
            for byte in key.iter_mut() {
                *byte = self.keystream_byte();
            }
            self.key = key;
            self.block_counter = 0;
            // 224 * 3 + 32 = 704 bytes = 11 whole blocks: nothing is left over.
            self.block_pos = 64;
            key.zeroize();
        }
        self.chunk_counter += 1;
    }
}

impl Drop for FsChaCha20 {
    fn drop(&mut self) {
        self.key.zeroize();
        self.block.zeroize();
    }
}

/// BIP324 FSChaCha20Poly1305: the packet AEAD. The nonce is the packet's index
/// under the current key (u32 LE) followed by the number of rekeyings (u64 LE);
/// every 224 packets the key is replaced by the first 32 bytes of an
/// encryption of 32 zero bytes under the nonce 0xffffffff + rekey count.
struct FsChaCha20Poly1305 {
    key: LessSafeKey,
    packet_counter: u64,
}

impl FsChaCha20Poly1305 {
    fn new(key: &[u8; 32]) -> Self {
        FsChaCha20Poly1305 { key: Self::aead_key(key), packet_counter: 0 }
    }

    fn aead_key(key: &[u8; 32]) -> LessSafeKey {
        // ring only refuses keys of the wrong length.
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte ChaCha20-Poly1305 key"))
    }

    fn nonce(&self) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&((self.packet_counter % REKEY_INTERVAL) as u32).to_le_bytes());
        nonce[4..].copy_from_slice(&(self.packet_counter / REKEY_INTERVAL).to_le_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    fn seal(&mut self, aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(), Aad::from(aad), in_out)
            .expect("packet contents are bounded far below ChaCha20's 256 GiB limit");
        self.advance();
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `in_out` (ciphertext followed by the tag) in place; the
    /// plaintext is the first `in_out.len() - TAG_LEN` bytes afterwards.
    fn open(&mut self, aad: &[u8], in_out: &mut [u8]) -> Result<(), V2Error> {
        let result = self.key.open_in_place(self.nonce(), Aad::from(aad), in_out).map(|_| ());
        self.advance();
        result.map_err(|_| V2Error::Decryption)
    }

    fn advance(&mut self) {
        if (self.packet_counter + 1).is_multiple_of(REKEY_INTERVAL) {
            let mut nonce = [0xffu8; 12];
            nonce[4..].copy_from_slice(&(self.packet_counter / REKEY_INTERVAL).to_le_bytes());
            let mut next = [0u8; 32];
            // Only the keystream part of the output is used; the tag is discarded.
            let _tag = self
                .key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut next)
                .expect("32-byte rekey input");
            self.key = Self::aead_key(&next);
            next.zeroize();
        }
        self.packet_counter += 1;
    }
}

/// Encrypts packets for one direction.
pub struct PacketEncoder {
    length: FsChaCha20,
    aead: FsChaCha20Poly1305,
}

impl PacketEncoder {
    /// A cipher pair positioned after `sent_packets` packets (those the
    /// handshake already sent with the same keys).
    pub fn new(length_key: &[u8; 32], packet_key: &[u8; 32], sent_packets: u64) -> Self {
        let mut encoder =
            PacketEncoder { length: FsChaCha20::new(length_key), aead: FsChaCha20Poly1305::new(packet_key) };
        for _ in 0..sent_packets {
            encoder.length.crypt(&mut [0; LENGTH_LEN]);
            encoder.aead.advance();
        }
        encoder
    }

    /// Appends one genuine packet whose contents are `message_type` followed by
    /// `payload`. The payload is copied once, into `out`, and encrypted there.
    pub fn encode(&mut self, message_type: &[u8], payload: &[u8], out: &mut BytesMut) -> Result<(), V2Error> {
        self.encode_packet(message_type, payload, false, &[], out)
    }

    /// The general form: any header ignore bit and AAD (the handshake's
    /// garbage authentication uses AAD; tests use both).
    pub fn encode_packet(
        &mut self,
        message_type: &[u8],
        payload: &[u8],
        ignore: bool,
        aad: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), V2Error> {
        self.seal_appended(message_type.len() + payload.len(), ignore, aad, out, |out| {
            out.put_slice(message_type);
            out.put_slice(payload);
        })
    }

    /// Appends a decoy packet (ignore bit set) of `contents_len` zero bytes,
    /// which the receiver skips (BIP324 decoy packets). Encrypted, its
    /// contents are as pseudorandom as any packet's.
    pub fn encode_decoy(&mut self, contents_len: usize, out: &mut BytesMut) -> Result<(), V2Error> {
        self.seal_appended(contents_len, true, &[], out, |out| out.put_bytes(0, contents_len))
    }

    /// Appends length, header and the contents `fill` writes, encrypted.
    fn seal_appended(
        &mut self,
        contents_len: usize,
        ignore: bool,
        aad: &[u8],
        out: &mut BytesMut,
        fill: impl FnOnce(&mut BytesMut),
    ) -> Result<(), V2Error> {
        if contents_len > MAX_LENGTH_FIELD {
            return Err(V2Error::PacketTooLarge { len: contents_len, max: MAX_LENGTH_FIELD });
        }
        let start = out.len();
        out.reserve(PACKET_OVERHEAD + contents_len);
        let mut length = [0u8; LENGTH_LEN];
        length.copy_from_slice(&(contents_len as u32).to_le_bytes()[..LENGTH_LEN]);
        self.length.crypt(&mut length);
        out.put_slice(&length);
        out.put_u8(if ignore { IGNORE_BIT } else { 0 });
        fill(out);
        let tag = self.aead.seal(aad, &mut out[start + LENGTH_LEN..]);
        out.put_slice(&tag);
        Ok(())
    }
}

impl PacketEncoder {
    /// Encrypts a genuine packet where its payload already lies, so a large
    /// message is not copied: `buf[start..]` must hold `PACKET_PREFIX +
    /// message_type.len()` free bytes followed by the payload (all of the
    /// rest of `buf`). Writes the encrypted length, header and message type
    /// in front of the payload, encrypts the lot in place, and returns the
    /// tag, which the caller sends right after `buf[start..]`.
    pub fn encode_in_place(
        &mut self,
        buf: &mut [u8],
        start: usize,
        message_type: &[u8],
    ) -> Result<[u8; TAG_LEN], V2Error> {
        let type_end = start + LENGTH_LEN + HEADER_LEN + message_type.len();
        let contents_len = buf.len().saturating_sub(type_end) + message_type.len();
        if type_end > buf.len() || contents_len > MAX_LENGTH_FIELD {
            return Err(V2Error::PacketTooLarge { len: contents_len, max: MAX_LENGTH_FIELD });
        }
        let mut length = [0u8; LENGTH_LEN];
        length.copy_from_slice(&(contents_len as u32).to_le_bytes()[..LENGTH_LEN]);
        self.length.crypt(&mut length);
        buf[start..start + LENGTH_LEN].copy_from_slice(&length);
        buf[start + LENGTH_LEN] = 0;
        buf[start + LENGTH_LEN + HEADER_LEN..type_end].copy_from_slice(message_type);
        Ok(self.aead.seal(&[], &mut buf[start + LENGTH_LEN..]))
    }
}

/// Bytes in front of the message type: the encrypted length and the header.
pub const PACKET_PREFIX: usize = LENGTH_LEN + HEADER_LEN;

/// Result of looking at the start of a receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodedPacket {
    /// The packet is not complete; `total` is its full size once its length
    /// is known (or LENGTH_LEN before that). The caller reserves that much.
    NeedMore { total: usize },
    /// A whole packet, decrypted in place: `contents` indexes the buffer,
    /// `len` is how many bytes it took.
    Packet { ignore: bool, contents: Range<usize>, len: usize },
}

/// Decrypts packets for one direction. It remembers a decrypted length
/// between calls, because the length cipher must not run twice per packet.
pub struct PacketDecoder {
    length: FsChaCha20,
    aead: FsChaCha20Poly1305,
    pending_contents_len: Option<usize>,
    max_contents: usize,
}

impl PacketDecoder {
    /// A cipher pair positioned after `received_packets` packets.
    pub fn new(length_key: &[u8; 32], packet_key: &[u8; 32], received_packets: u64) -> Self {
        let mut decoder = PacketDecoder {
            length: FsChaCha20::new(length_key),
            aead: FsChaCha20Poly1305::new(packet_key),
            pending_contents_len: None,
            max_contents: MAX_CONTENTS_BYTES,
        };
        for _ in 0..received_packets {
            decoder.length.crypt(&mut [0; LENGTH_LEN]);
            decoder.aead.advance();
        }
        decoder
    }

    /// Raises or lowers the contents limit (default [`MAX_CONTENTS_BYTES`]).
    pub fn with_max_contents(mut self, max_contents: usize) -> Self {
        self.max_contents = max_contents.min(MAX_LENGTH_FIELD);
        self
    }

    /// Decodes the packet at the start of `buf`, decrypting it in place.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<DecodedPacket, V2Error> {
        self.decode_with_aad(buf, &[])
    }

    pub fn decode_with_aad(&mut self, buf: &mut [u8], aad: &[u8]) -> Result<DecodedPacket, V2Error> {
        let contents_len = match self.pending_contents_len {
            Some(len) => len,
            None => {
                let Some(field) = buf.get(..LENGTH_LEN) else {
                    return Ok(DecodedPacket::NeedMore { total: LENGTH_LEN });
                };
                let mut length = [0u8; LENGTH_LEN];
                length.copy_from_slice(field);
                self.length.crypt(&mut length);
                let len = u32::from_le_bytes([length[0], length[1], length[2], 0]) as usize;
                if len > self.max_contents {
                    return Err(V2Error::PacketTooLarge { len, max: self.max_contents });
                }
                self.pending_contents_len = Some(len);
                len
            }
        };
        let total = PACKET_OVERHEAD + contents_len;
        let Some(packet) = buf.get_mut(LENGTH_LEN..total) else {
            return Ok(DecodedPacket::NeedMore { total });
        };
        self.pending_contents_len = None;
        self.aead.open(aad, packet)?;
        let header = packet[0];
        let contents_start = LENGTH_LEN + HEADER_LEN;
        Ok(DecodedPacket::Packet {
            ignore: header & IGNORE_BIT != 0,
            contents: contents_start..contents_start + contents_len,
            len: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = include_str!("../tests/vectors/bip324/packet_encoding_test_vectors.csv");

    struct Row {
        idx: u64,
        priv_ours: [u8; 32],
        ellswift_ours: [u8; 64],
        ellswift_theirs: [u8; 64],
        initiating: bool,
        contents: Vec<u8>,
        aad: Vec<u8>,
        ignore: bool,
        shared_secret: [u8; 32],
        initiator_l: [u8; 32],
        initiator_p: [u8; 32],
        responder_l: [u8; 32],
        responder_p: [u8; 32],
        send_terminator: [u8; 16],
        recv_terminator: [u8; 16],
        session_id: [u8; 32],
        ciphertext: Vec<u8>,
        ciphertext_endswith: Vec<u8>,
    }

    impl Row {
        fn role(&self) -> Role {
            if self.initiating { Role::Initiator } else { Role::Responder }
        }
    }

    fn arr<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn rows() -> Vec<Row> {
        let mut lines = VECTORS.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        lines
            .filter(|l| !l.is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split(',').collect();
                let get = |name: &str| f[col(name)];
                let multiply: usize = get("in_multiply").parse().unwrap();
                Row {
                    idx: get("in_idx").parse().unwrap(),
                    priv_ours: arr(get("in_priv_ours")),
                    ellswift_ours: arr(get("in_ellswift_ours")),
                    ellswift_theirs: arr(get("in_ellswift_theirs")),
                    initiating: get("in_initiating") == "1",
                    contents: hex::decode(get("in_contents")).unwrap().repeat(multiply),
                    aad: hex::decode(get("in_aad")).unwrap(),
                    ignore: get("in_ignore") == "1",
                    shared_secret: arr(get("mid_shared_secret")),
                    initiator_l: arr(get("mid_initiator_l")),
                    initiator_p: arr(get("mid_initiator_p")),
                    responder_l: arr(get("mid_responder_l")),
                    responder_p: arr(get("mid_responder_p")),
                    send_terminator: arr(get("mid_send_garbage_terminator")),
                    recv_terminator: arr(get("mid_recv_garbage_terminator")),
                    session_id: arr(get("out_session_id")),
                    ciphertext: hex::decode(get("out_ciphertext")).unwrap(),
                    ciphertext_endswith: hex::decode(get("out_ciphertext_endswith")).unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn official_vectors_cover_every_row() {
        let rows = rows();
        assert_eq!(rows.len(), 7);
        let indices: Vec<u64> = rows.iter().map(|r| r.idx).collect();
        assert_eq!(indices, vec![1, 999, 0, 223, 448, 673, 1024]);
    }

    #[test]
    fn official_vectors_key_derivation() {
        for row in rows() {
            let secret = SecretKey::from_slice(&row.priv_ours).unwrap();
            let keys = SessionKeys::derive(
                &secret,
                &row.ellswift_ours,
                &row.ellswift_theirs,
                row.role(),
                &[0xf9, 0xbe, 0xb4, 0xd9],
            );
            assert_eq!(keys.session_id, row.session_id, "row {}", row.idx);
            assert_eq!(*keys.send_garbage_terminator(), row.send_terminator, "row {}", row.idx);
            assert_eq!(*keys.recv_garbage_terminator(), row.recv_terminator, "row {}", row.idx);
            let (send_l, send_p, recv_l, recv_p) = if row.initiating {
                (row.initiator_l, row.initiator_p, row.responder_l, row.responder_p)
            } else {
                (row.responder_l, row.responder_p, row.initiator_l, row.initiator_p)
            };
            assert_eq!(*keys.send_length_key, send_l, "row {}", row.idx);
            assert_eq!(*keys.send_packet_key, send_p, "row {}", row.idx);
            assert_eq!(*keys.recv_length_key, recv_l, "row {}", row.idx);
            assert_eq!(*keys.recv_packet_key, recv_p, "row {}", row.idx);
            let from_secret =
                SessionKeys::from_shared_secret(&row.shared_secret, row.role(), &[0xf9, 0xbe, 0xb4, 0xd9]);
            assert_eq!(from_secret.session_id, row.session_id);
        }
    }

    #[test]
    fn official_vectors_packet_encryption_and_decryption() {
        for row in rows() {
            let keys = SessionKeys::from_shared_secret(&row.shared_secret, row.role(), &[0xf9, 0xbe, 0xb4, 0xd9]);
            // The vectors encrypt packet number `idx` of our sending direction.
            let mut encoder = keys.encoder(row.idx);
            let mut out = BytesMut::new();
            encoder.encode_packet(&[], &row.contents, row.ignore, &row.aad, &mut out).unwrap();
            if !row.ciphertext.is_empty() {
                assert_eq!(&out[..], &row.ciphertext[..], "row {}", row.idx);
            }
            assert!(out.ends_with(&row.ciphertext_endswith), "row {}", row.idx);

            // The peer's decoder for this direction reads it back.
            // One vector carries 16 MiB of contents, beyond what the relay accepts.
            let mut decoder = PacketDecoder::new(&keys.send_length_key, &keys.send_packet_key, row.idx)
                .with_max_contents(MAX_LENGTH_FIELD);
            let mut buf = out.to_vec();
            match decoder.decode_with_aad(&mut buf, &row.aad).unwrap() {
                DecodedPacket::Packet { ignore, contents, len } => {
                    assert_eq!(ignore, row.ignore);
                    assert_eq!(&buf[contents], &row.contents[..]);
                    assert_eq!(len, buf.len());
                }
                other => panic!("row {}: {other:?}", row.idx),
            }
        }
    }

    fn pair() -> (PacketEncoder, PacketDecoder) {
        let keys = SessionKeys::from_shared_secret(&[7; 32], Role::Initiator, &[0xfa, 0xbf, 0xb5, 0xda]);
        (keys.encoder(0), PacketDecoder::new(&keys.send_length_key, &keys.send_packet_key, 0))
    }

    #[test]
    fn round_trip_across_rekeys_with_partial_input() {
        let (mut encoder, mut decoder) = pair();
        let mut stream = BytesMut::new();
        for i in 0..500u32 {
            encoder.encode(&[18], &i.to_le_bytes(), &mut stream).unwrap();
        }
        // Feed the stream in growing prefixes to exercise NeedMore at every split.
        let mut buf = stream.to_vec();
        let mut start = 0;
        for i in 0..500u32 {
            let packet_len = PACKET_OVERHEAD + 5;
            for cut in 0..packet_len {
                let mut partial = buf[start..start + cut].to_vec();
                match decoder.decode(&mut partial).unwrap() {
                    DecodedPacket::NeedMore { total } => {
                        assert_eq!(total, if cut < LENGTH_LEN { LENGTH_LEN } else { packet_len })
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            match decoder.decode(&mut buf[start..]).unwrap() {
                DecodedPacket::Packet { ignore: false, contents, len } => {
                    assert_eq!(len, packet_len);
                    let contents = &buf[start..][contents];
                    assert_eq!(contents[0], 18);
                    assert_eq!(&contents[1..], &i.to_le_bytes());
                }
                other => panic!("unexpected {other:?}"),
            }
            start += packet_len;
        }
    }

    #[test]
    fn in_place_encoding_matches_the_copying_encoder() {
        let keys = SessionKeys::from_shared_secret(&[3; 32], Role::Initiator, &[0xfa, 0xbf, 0xb5, 0xda]);
        let (mut copying, mut in_place) = (keys.encoder(5), keys.encoder(5));
        for (message_type, payload) in [(&[2u8][..], vec![7u8; 100_000]), (&b"\0bigpayload\0\0"[..], vec![9u8; 70_000])]
        {
            let mut expected = BytesMut::new();
            copying.encode(message_type, &payload, &mut expected).unwrap();
            let mut buf = vec![0u8; 24];
            buf.extend_from_slice(&payload);
            let start = 24 - PACKET_PREFIX - message_type.len();
            let tag = in_place.encode_in_place(&mut buf, start, message_type).unwrap();
            let mut got = buf[start..].to_vec();
            got.extend_from_slice(&tag);
            assert_eq!(got, expected.to_vec());
        }
    }

    #[test]
    fn oversize_length_rejected_before_body() {
        let keys = SessionKeys::from_shared_secret(&[9; 32], Role::Initiator, &[0xfa, 0xbf, 0xb5, 0xda]);
        let mut encoder = keys.encoder(0);
        let big = vec![0u8; MAX_CONTENTS_BYTES + 1];
        let mut out = BytesMut::new();
        encoder.encode(&[], &big, &mut out).unwrap();
        let mut decoder = PacketDecoder::new(&keys.send_length_key, &keys.send_packet_key, 0);
        // Only the three length bytes are offered.
        let mut head = out[..LENGTH_LEN].to_vec();
        assert_eq!(
            decoder.decode(&mut head),
            Err(V2Error::PacketTooLarge { len: MAX_CONTENTS_BYTES + 1, max: MAX_CONTENTS_BYTES })
        );
    }

    #[test]
    fn tampered_packet_fails_authentication() {
        let (mut encoder, mut decoder) = pair();
        let mut out = BytesMut::new();
        encoder.encode(&[19], b"12345678", &mut out).unwrap();
        let last = out.len() - 1;
        out[last] ^= 1;
        assert_eq!(decoder.decode(&mut out), Err(V2Error::Decryption));
    }

    #[test]
    fn decoys_are_skippable_packets_of_the_asked_size() {
        let (mut encoder, mut decoder) = pair();
        let mut expected = BytesMut::new();
        let (mut copying, _) = pair();
        for len in [0usize, 1, 1000] {
            let mut out = BytesMut::new();
            encoder.encode_decoy(len, &mut out).unwrap();
            assert_eq!(out.len(), PACKET_OVERHEAD + len);
            copying.encode_packet(&[], &vec![0; len], true, &[], &mut expected).unwrap();
            assert!(expected.ends_with(&out), "same bytes as an ignore-bit packet of zeros");
            let DecodedPacket::Packet { ignore, contents, .. } = decoder.decode(&mut out).unwrap() else { panic!() };
            assert!(ignore);
            assert_eq!(contents.len(), len);
        }
    }

    #[test]
    fn garbage_terminator_found_at_every_length_fed_in_any_chunks() {
        let terminator = [0x5au8; GARBAGE_TERMINATOR_LEN];
        for garbage_len in [0usize, 1, 15, 16, 17, 100, MAX_GARBAGE_LEN - 1, MAX_GARBAGE_LEN] {
            // Garbage that shares bytes with the terminator, to tempt a naive resume.
            let mut stream: Vec<u8> = (0..garbage_len).map(|i| if i % 7 == 0 { 0x11 } else { 0x5a }).collect();
            stream.extend_from_slice(&terminator);
            stream.extend_from_slice(b"after");
            for chunk in [1usize, 3, 16, 4096] {
                let mut resume = 0;
                let mut fed = 0;
                let found = loop {
                    fed = (fed + chunk).min(stream.len());
                    match find_garbage_terminator(&stream[..fed], &terminator, resume) {
                        GarbageScan::Found { garbage_len } => break garbage_len,
                        GarbageScan::NeedMore { resume: next } => resume = next,
                        GarbageScan::TooLong => panic!("garbage {garbage_len}, chunk {chunk}: too long"),
                    }
                    assert!(fed < stream.len(), "garbage {garbage_len}, chunk {chunk}: not found");
                };
                // The first occurrence: garbage of 0x5a bytes may hold the terminator earlier.
                let first = stream.windows(GARBAGE_TERMINATOR_LEN).position(|w| w == terminator).unwrap();
                assert_eq!(found, first, "garbage {garbage_len}, chunk {chunk}");
            }
        }
    }

    #[test]
    fn more_garbage_than_bip324_allows_is_refused_at_the_limit() {
        let terminator = [0xa5u8; GARBAGE_TERMINATOR_LEN];
        let limit = MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN;
        let mut stream = vec![0u8; MAX_GARBAGE_LEN + 1];
        stream.extend_from_slice(&terminator);
        assert!(matches!(find_garbage_terminator(&stream[..limit - 1], &terminator, 0), GarbageScan::NeedMore { .. }));
        assert_eq!(find_garbage_terminator(&stream[..limit], &terminator, 0), GarbageScan::TooLong);
        assert_eq!(find_garbage_terminator(&stream, &terminator, 0), GarbageScan::TooLong);
        // Exactly MAX_GARBAGE_LEN bytes of garbage is allowed.
        assert_eq!(
            find_garbage_terminator(&stream[1..], &terminator, 0),
            GarbageScan::Found { garbage_len: MAX_GARBAGE_LEN }
        );
    }

    /// Hands the `bip324` crate a secret we chose.
    struct Known([u8; 32]);

    impl bip324::FillBytes for Known {
        fn fill_bytes(&mut self, dest: &mut [u8; 32]) {
            dest.copy_from_slice(&self.0);
        }
    }

    #[test]
    fn handshake_tail_is_byte_for_byte_the_bip324_crates() {
        use bip324::{Handshake, Initialized, ReceivedKey};
        let magic = [0xfa, 0xbf, 0xb5, 0xda];
        let secp = secp256k1::Secp256k1::signing_only();
        for (role, garbage_len, decoys) in
            [(Role::Initiator, 0, vec![]), (Role::Initiator, 300, vec![0, 7, 1000]), (Role::Responder, 4095, vec![3])]
        {
            let ours_secret = [0x21u8; 32];
            let theirs = {
                let peer =
                    Handshake::<Initialized>::new_with_rng(magic, Role::Responder, &mut Known([0x42; 32]), &secp)
                        .unwrap();
                let mut key = [0u8; ELLSWIFT_LEN];
                peer.send_key(None, &mut key).unwrap();
                key
            };
            let garbage = vec![0x33u8; garbage_len];
            let crate_side =
                Handshake::<Initialized>::new_with_rng(magic, role, &mut Known(ours_secret), &secp).unwrap();
            let mut first = vec![0u8; Handshake::<Initialized>::send_key_len(Some(&garbage))];
            let crate_side = crate_side.send_key(Some(&garbage), &mut first).unwrap();
            let ours: [u8; ELLSWIFT_LEN] = first[..ELLSWIFT_LEN].try_into().unwrap();
            let crate_side = crate_side.receive_key(theirs).unwrap();
            let decoy_contents: Vec<Vec<u8>> = decoys.iter().map(|&len| vec![0u8; len]).collect();
            let decoy_refs: Vec<&[u8]> = decoy_contents.iter().map(Vec::as_slice).collect();
            let decoy_refs = (!decoy_refs.is_empty()).then_some(&decoy_refs[..]);
            let mut expected = vec![0u8; Handshake::<ReceivedKey>::send_version_len(decoy_refs)];
            crate_side.send_version(&mut expected, decoy_refs).unwrap();

            let secret = SecretKey::from_slice(&ours_secret).unwrap();
            let keys = SessionKeys::derive(&secret, &ours, &theirs, role, &magic);
            let mut got = BytesMut::new();
            let mut encoder = keys.encode_handshake_tail(&garbage, &decoys, &mut got).unwrap();
            assert_eq!(&got[..], &expected[..], "{role:?}, garbage {garbage_len}, decoys {decoys:?}");
            // The encoder continues after them: the next packet is number 1 + decoys.
            let mut next = BytesMut::new();
            encoder.encode(&[18], b"ping", &mut next).unwrap();
            let mut expected_next = BytesMut::new();
            keys.encoder(1 + decoys.len() as u64).encode(&[18], b"ping", &mut expected_next).unwrap();
            assert_eq!(next, expected_next);
        }
    }

    #[test]
    fn ignore_bit_is_the_top_bit_only() {
        let (mut encoder, mut decoder) = pair();
        let mut out = BytesMut::new();
        encoder.encode_packet(&[], b"x", true, &[], &mut out).unwrap();
        let DecodedPacket::Packet { ignore, .. } = decoder.decode(&mut out).unwrap() else { panic!() };
        assert!(ignore);
    }
}
