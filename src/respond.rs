//! The BIP324 handshake as responder, for connections a v1-only node accepts
//! through an inbound listener, the way Bitcoin Core's `V2Transport` runs it:
//!
//! 1. the first 16 bytes decide ([`classify_first_bytes`]): the network's
//!    magic and `version\0\0\0\0\0` is a v1 peer; the `version` command
//!    under another magic is a v1 peer of another network (Core disconnects
//!    it); anything else is the initiator's ElligatorSwift key;
//! 2. with the initiator's 64-byte key in, we send our key, 0..=4095 random
//!    garbage bytes, our garbage terminator and our (empty) version packet in
//!    one write; with `[shaping]` handshake decoys ([`respond_shaped`]), the
//!    garbage length comes from the policy and decoy packets go between the
//!    terminator and the version packet, in the same write;
//! 3. the initiator's garbage (at most 4095 bytes before its terminator),
//!    decoys and version packet (contents ignored), each packet's length
//!    checked against [`MAX_CONTENTS_BYTES`] before anything is buffered for it.
//!
//! As in `upgrade.rs`, one ECDH and key derivation (`v2::SessionKeys`) key
//! the `v2.rs` ciphers that carry both the handshake's packets and the
//! packet stream after it. The whole handshake, first bytes included, runs
//! under one deadline.

use bytes::{Buf, BufMut, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::shaping::{HandshakePolicy, HandshakeShape};

use crate::upgrade::{
    HandshakeErrors, HandshakeFailure, HandshakeIo, HandshakeRead, IoFailure, MAX_GARBAGE_LEN, V2Channel,
    check_their_key, ephemeral_key, receive_garbage_and_version,
};
use crate::v1::{Magic, V1_PREFIX_LEN, VERSION_COMMAND, is_version_prefix};
use crate::v2::{ELLSWIFT_LEN, GARBAGE_TERMINATOR_LEN, Role, SessionKeys, V2Error};

/// What a peer's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// Fewer than 16 bytes so far.
    NeedMore,
    /// The network's magic and the `version` command: a v1 peer.
    V1,
    /// The `version` command under another magic: a v1 peer of another
    /// network. Core's responder disconnects it (`V2Transport::
    /// ProcessReceivedKeyBytes`); no honest v2 key looks like that.
    OtherNetworkV1(Magic),
    /// Anything else: the start of an initiator's key.
    V2,
}

/// BIP324's responder rule ("Handshake", V1_PREFIX) on the bytes a peer sent
/// first. A v2 initiator sends its 64-byte key at once, a v1 peer a whole
/// VERSION, so waiting for 16 bytes costs neither a round trip.
pub fn classify_first_bytes(buf: &[u8], magic: &Magic) -> FirstBytes {
    let Some(prefix) = buf.first_chunk::<V1_PREFIX_LEN>() else {
        return FirstBytes::NeedMore;
    };
    if is_version_prefix(prefix, magic) {
        return FirstBytes::V1;
    }
    let (their_magic, command) = prefix.split_at(4);
    if command == VERSION_COMMAND {
        let mut found = [0u8; 4];
        found.copy_from_slice(their_magic);
        return FirstBytes::OtherNetworkV1(found);
    }
    FirstBytes::V2
}

/// Why a responder handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RespondError {
    #[error("peer {} the connection during the handshake after {received} bytes", if *.reset { "reset" } else { "closed" })]
    Closed { received: usize, reset: bool },
    #[error("handshake timed out after {received} bytes from the peer")]
    TimedOut { received: usize },
    #[error(transparent)]
    Failed(#[from] HandshakeFailure),
}

impl From<V2Error> for RespondError {
    fn from(error: V2Error) -> Self {
        RespondError::Failed(error.into())
    }
}

impl RespondError {
    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RespondError::Closed { .. } => "peer_closed",
            RespondError::TimedOut { .. } => "timeout",
            RespondError::Failed(failure) => failure.label(),
        }
    }
}

impl HandshakeErrors for RespondError {
    fn from_io(failure: IoFailure, received: usize) -> Self {
        match failure {
            IoFailure::TimedOut => RespondError::TimedOut { received },
            IoFailure::Closed { reset } => RespondError::Closed { received, reset },
            IoFailure::Io(e) => HandshakeFailure::Io(e).into(),
        }
    }
}

/// Reads from the peer under the handshake deadline, counting what came.
pub(crate) type PeerReader<'s, S> = HandshakeIo<'s, S, RespondError>;

/// Runs the responder handshake for network `magic` on `peer`, whose first
/// bytes (already classified as [`FirstBytes::V2`]) are in `received`.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    peer: &mut S,
    received: BytesMut,
    magic: Magic,
    deadline: Instant,
) -> Result<V2Channel, RespondError> {
    let shape = HandshakePolicy::default().draw(&mut rand::thread_rng());
    respond_shaped(peer, received, magic, deadline, &shape).await
}

/// [`respond`] with this garbage length and these decoy packets between our
/// garbage terminator and our version packet (`shaping.rs` draws them from
/// the same `[shaping]` policy the initiator uses).
pub async fn respond_shaped<S: AsyncRead + AsyncWrite + Unpin>(
    peer: &mut S,
    mut received: BytesMut,
    magic: Magic,
    deadline: Instant,
    shape: &HandshakeShape,
) -> Result<V2Channel, RespondError> {
    let mut io = PeerReader::new(peer, deadline, received.len());

    // The initiator's key.
    io.read_at_least(&mut received, ELLSWIFT_LEN).await?;
    let mut theirs = [0u8; ELLSWIFT_LEN];
    theirs.copy_from_slice(&received[..ELLSWIFT_LEN]);
    received.advance(ELLSWIFT_LEN);

    check_their_key(&theirs, &magic)?;

    // Our key and garbage, then our terminator, decoys (if any; the first
    // packet after the terminator carries the garbage as AAD, decoy or not)
    // and version packet, in one write.
    let (secret, ours) = ephemeral_key();
    let keys = SessionKeys::derive(&secret, &ours, &theirs, Role::Responder, &magic);
    let mut garbage = vec![0u8; shape.garbage_len.min(MAX_GARBAGE_LEN)];
    RngCore::fill_bytes(&mut rand::thread_rng(), &mut garbage);
    let mut flight = BytesMut::with_capacity(ELLSWIFT_LEN + garbage.len() + GARBAGE_TERMINATOR_LEN + 64);
    flight.put_slice(&ours);
    flight.put_slice(&garbage);
    let encoder = keys.encode_handshake_tail(&garbage, &shape.decoy_lens, &mut flight)?;
    io.write_all(&flight).await?;
    drop(flight);

    // The initiator's garbage, decoys and version packet.
    let (decoder, inbound) = receive_garbage_and_version(&mut io, received, &keys).await?;

    Ok(V2Channel { session_id: *keys.session_id(), encoder, decoder, leftover: inbound })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGTEST: Magic = [0xfa, 0xbf, 0xb5, 0xda];
    const MAINNET: Magic = [0xf9, 0xbe, 0xb4, 0xd9];

    fn prefix(magic: Magic, command: &[u8; 12]) -> Vec<u8> {
        let mut out = magic.to_vec();
        out.extend_from_slice(command);
        out
    }

    #[test]
    fn v1_version_of_our_network() {
        let bytes = prefix(REGTEST, &VERSION_COMMAND);
        for len in 0..V1_PREFIX_LEN {
            assert_eq!(classify_first_bytes(&bytes[..len], &REGTEST), FirstBytes::NeedMore, "len {len}");
        }
        assert_eq!(classify_first_bytes(&bytes, &REGTEST), FirstBytes::V1);
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0x66; 80]);
        assert_eq!(classify_first_bytes(&longer, &REGTEST), FirstBytes::V1);
    }

    #[test]
    fn version_of_another_network_is_told_apart() {
        let bytes = prefix(MAINNET, &VERSION_COMMAND);
        assert_eq!(classify_first_bytes(&bytes, &REGTEST), FirstBytes::OtherNetworkV1(MAINNET));
    }

    #[test]
    fn anything_else_is_a_key() {
        // Our magic with another command is no V1_PREFIX: BIP324 treats it as
        // a key (`respond` then refuses a key that starts with our magic).
        assert_eq!(classify_first_bytes(&prefix(REGTEST, b"verack\0\0\0\0\0\0"), &REGTEST), FirstBytes::V2);
        assert_eq!(classify_first_bytes(&[0xffu8; 16], &REGTEST), FirstBytes::V2);
        assert_eq!(classify_first_bytes(b"GET / HTTP/1.1\r\n", &REGTEST), FirstBytes::V2);
        // One bit off in the command.
        assert_eq!(classify_first_bytes(&prefix(REGTEST, b"version\0\0\0\0\x01"), &REGTEST), FirstBytes::V2);
    }

    #[test]
    fn labels_are_fixed() {
        assert_eq!(RespondError::from(HandshakeFailure::NoGarbageTerminator).label(), "no_garbage_terminator");
        assert_eq!(
            RespondError::TimedOut { received: 3 }.to_string(),
            "handshake timed out after 3 bytes from the peer"
        );
        assert_eq!(
            RespondError::Closed { received: 64, reset: false }.to_string(),
            "peer closed the connection during the handshake after 64 bytes"
        );
    }
}
