//! The decoder contract both SOCKS5 targets (`socks5_server`, `socks5_client`)
//! check on every message they decode.

use bip324_proxy::socks5::Socks5Error;

pub type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>;

/// Runs `decode` on `buf`, checks the shared decoder invariants, and returns the message and
/// the bytes it used.
pub fn check<T: std::fmt::Debug + PartialEq>(decode: Decoder<T>, buf: &[u8]) -> Option<(T, usize)> {
    let (value, used) = decode(buf).ok()??;
    assert!(used <= buf.len(), "used {used} of {} bytes", buf.len());
    assert!(used > 0, "a whole message is never empty");
    // Strict prefixes ask for more bytes: the empty one, the last one, and a middle one.
    for len in [0, used / 2, used - 1] {
        assert_eq!(decode(&buf[..len]), Ok(None), "prefix of {len} bytes of a {used}-byte message");
    }
    // The message alone decodes the same: bytes after it are never looked at.
    let alone = decode(&buf[..used]);
    assert_eq!(alone, Ok(Some((value, used))));
    alone.ok().flatten()
}
