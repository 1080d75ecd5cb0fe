//! PURE SOCKS5 codec for both roles, and `Target`, the destination every later stage works with.
//!
//! Covers RFC 1928 (greeting, method choice, request, reply), RFC 1929 (username/password
//! sub-negotiation) and Tor's RESOLVE (0xF0) / RESOLVE_PTR (0xF1) commands and extended reply
//! codes. The server role (a Bitcoin client connects to us) decodes greetings, credentials and
//! requests and encodes method choices, auth statuses and replies; the client role (we talk to an
//! upstream proxy such as Tor) uses the mirror-image functions. Both roles share one address
//! codec, so what we send is exactly what we accept.
//!
//! Every decoder takes the bytes read so far and returns `Ok(None)` while more are needed,
//! `Ok(Some((value, consumed)))` once a whole message is there (bytes after `consumed` belong to
//! the next stage), and an error only for bytes that can never become valid. Every variable
//! field is bounded by its one-byte length, and nothing is allocated before the whole field has
//! arrived. Sockets, timeouts, choosing a method, checking credentials and mapping errors to
//! reply codes are left to the I/O and session modules.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// RFC 1928 section 3: VER is 5 in every SOCKS5 message.
pub const SOCKS_VERSION: u8 = 0x05;
/// RFC 1928 section 3: "NO AUTHENTICATION REQUIRED".
pub const METHOD_NO_AUTH: u8 = 0x00;
/// RFC 1928 section 3: "USERNAME/PASSWORD", negotiated as in RFC 1929.
pub const METHOD_USER_PASS: u8 = 0x02;
/// RFC 1928 section 3: "NO ACCEPTABLE METHODS"; the client must then close.
pub const METHOD_NO_ACCEPTABLE: u8 = 0xFF;
/// RFC 1929 section 2: the sub-negotiation carries its own version byte.
pub const AUTH_VERSION: u8 = 0x01;
/// RFC 1928 section 5: ATYP for a 4-byte IPv4 address.
pub const ATYP_IPV4: u8 = 0x01;
/// RFC 1928 section 5: ATYP for a length-prefixed DOMAINNAME.
pub const ATYP_DOMAIN: u8 = 0x03;
/// RFC 1928 section 5: ATYP for a 16-byte IPv6 address.
pub const ATYP_IPV6: u8 = 0x04;
/// Longest DOMAINNAME, username or password: each length travels in a single byte.
pub const MAX_FIELD_BYTES: usize = 255;

/// Errors for SOCKS5 bytes that can never become a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("unsupported socks version {0:#04x}")]
    BadVersion(u8),
    #[error("greeting offers no authentication methods")]
    NoMethods,
    #[error("unsupported username/password auth version {0:#04x}")]
    BadAuthVersion(u8),
    /// The server answers this with reply 0x08 (address type not supported).
    #[error("address type {0:#04x} not supported")]
    AddressTypeNotSupported(u8),
    #[error("empty domain name")]
    EmptyDomain,
    #[error("byte {0:#04x} not allowed in a domain name")]
    BadDomainByte(u8),
    #[error("{field} is {len} bytes, more than the 255 a socks5 length byte allows")]
    FieldTooLong { field: &'static str, len: usize },
}

/// Errors from [`Target::parse`] (config files and the command line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("missing port, expected host:port")]
    MissingPort,
    #[error("invalid port {0:?}, expected a number from 0 to 65535")]
    BadPort(String),
    #[error("invalid brackets, expected [ipv6]:port")]
    BadBrackets,
    #[error("ipv6 address without brackets, expected [ipv6]:port")]
    UnbracketedIpv6,
    #[error("invalid host: {0}")]
    BadHost(Socks5Error),
}

/// The host part of a destination: an address, or a name we never resolve here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    /// Printable ASCII, 1..=255 bytes, kept as the client gave it (case and trailing dot too).
    Name(String),
}

impl fmt::Display for Host {
    /// The bare host, IPv6 without brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => ip.fmt(f),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Where a session wants to go: a host and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl Target {
    pub fn new(host: Host, port: u16) -> Self {
        Self { host, port }
    }

    /// A name under the `.onion` special-use domain (RFC 7686): case-insensitive, a trailing
    /// dot tolerated. Such names must only ever go to Tor, never to a resolver.
    pub fn is_onion(&self) -> bool {
        let Host::Name(name) = &self.host else {
            return false;
        };
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        let suffix = b".onion";
        // Longer than the suffix: a bare ".onion" names nothing.
        name.len() > suffix.len()
            && name.get(name.len() - suffix.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
    }

    /// The socket address when the host is an IP address; `None` for a name.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// Parses `"1.2.3.4:8333"`, `"[2001:db8::1]:8333"` or `"seed.bitcoin.sipa.be:8333"`, the
    /// forms [`Display`](fmt::Display) writes. Used for config files and the command line.
    ///
    /// IPv6 needs brackets, so `2001:db8::1:8333` is rejected rather than guessed at. Any port
    /// from 0 to 65535 is accepted: 0 is meaningful to Tor's RESOLVE, and whether a port is
    /// dialable is the config's decision, not the parser's. Names follow the same rules as a
    /// SOCKS DOMAINNAME (see [`host_from_domain`]) so every parsed target can be sent upstream.
    pub fn parse(s: &str) -> Result<Target, TargetError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or(TargetError::BadBrackets)?;
            let ip = inside.parse::<IpAddr>().map_err(|_| TargetError::BadBrackets)?;
            let port = match after.strip_prefix(':') {
                Some(port) => port,
                None if after.is_empty() => return Err(TargetError::MissingPort),
                None => return Err(TargetError::BadBrackets),
            };
            (Host::Ip(ip), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or(TargetError::MissingPort)?;
            if host.contains(':') {
                return Err(TargetError::UnbracketedIpv6);
            }
            if host.contains(['[', ']']) {
                return Err(TargetError::BadBrackets);
            }
            let host = match host.parse::<Ipv4Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V4(ip)),
                Err(_) => Host::Name(checked_name(host.as_bytes()).map_err(TargetError::BadHost)?),
            };
            (host, port)
        };
        if port.is_empty() {
            return Err(TargetError::MissingPort);
        }
        // u16::from_str alone would also take "+80".
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TargetError::BadPort(port.to_owned()));
        }
        let port = port.parse::<u16>().map_err(|_| TargetError::BadPort(port.to_owned()))?;
        Ok(Target { host, port })
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::parse(s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target::new(Host::Ip(addr.ip()), addr.port())
    }
}

/// Interprets a SOCKS DOMAINNAME.
///
/// Bitcoin Core and btcd send every destination as DOMAINNAME, IP literals included
/// (`"15.61.23.23"`, and IPv6 without brackets such as
/// `"1233:3432:2434:2343:3234:2345:6546:4534"`), so an IP literal, bracketed or not, becomes
/// [`Host::Ip`] and is never looked up. Anything else is a hostname: 1..=255 bytes of printable
/// ASCII without space, NUL or other control characters, and without `:`, `[` or `]` (which
/// would make `host:port` ambiguous). It is kept exactly as given.
pub fn host_from_domain(name: &[u8]) -> Result<Host, Socks5Error> {
    if let Ok(text) = std::str::from_utf8(name) {
        let unbracketed = text.strip_prefix('[').and_then(|inner| inner.strip_suffix(']')).unwrap_or(text);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
    }
    checked_name(name).map(Host::Name)
}

/// Validates a hostname and returns it as a `String`.
fn checked_name(name: &[u8]) -> Result<String, Socks5Error> {
    if name.is_empty() {
        return Err(Socks5Error::EmptyDomain);
    }
    if name.len() > MAX_FIELD_BYTES {
        return Err(Socks5Error::FieldTooLong { field: "domain name", len: name.len() });
    }
    if let Some(&bad) = name.iter().find(|&&b| !b.is_ascii_graphic() || matches!(b, b':' | b'[' | b']')) {
        return Err(Socks5Error::BadDomainByte(bad));
    }
    // Every byte is ASCII by now, so each maps to one char.
    Ok(name.iter().copied().map(char::from).collect())
}

// ---------------------------------------------------------------------------------------------
// Server role: a client connects to us.
// ---------------------------------------------------------------------------------------------

/// The client's first message (RFC 1928 section 3): the methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// 1..=255 method numbers in the client's order.
    pub methods: Vec<u8>,
}

impl Greeting {
    pub fn offers(&self, method: u8) -> bool {
        self.methods.contains(&method)
    }
}

/// Decodes `VER NMETHODS METHODS...`. Bitcoin Core sends `05 02 00 02`, btcd `05 01 00`.
pub fn decode_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, Socks5Error> {
    let mut r = Reader::new(buf);
    check_version(need!(r.u8()))?;
    let count = need!(r.u8());
    if count == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let methods = need!(r.take(usize::from(count))).to_vec();
    Ok(Some((Greeting { methods }, r.pos)))
}

/// The server's answer to a greeting: `05 METHOD`.
pub fn encode_method_choice(method: u8) -> [u8; 2] {
    [SOCKS_VERSION, method]
}

/// RFC 1929 username and password. Raw bytes: the RFC does not promise UTF-8.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: Vec<u8>,
    pub password: Vec<u8>,
}

impl fmt::Debug for Credentials {
    /// Lengths only: credentials never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username_len", &self.username.len())
            .field("password_len", &self.password.len())
            .finish()
    }
}

/// Decodes the RFC 1929 request `01 ULEN UNAME PLEN PASSWD`.
///
/// The RFC says each field is 1..=255 bytes, but empty fields are accepted: JDK clients send an
/// empty password, and refusing them gains nothing.
pub fn decode_auth(buf: &[u8]) -> Result<Option<(Credentials, usize)>, Socks5Error> {
    let mut r = Reader::new(buf);
    check_auth_version(need!(r.u8()))?;
    let username_len = need!(r.u8());
    let username = need!(r.take(usize::from(username_len)));
    let password_len = need!(r.u8());
    let password = need!(r.take(usize::from(password_len)));
    let credentials = Credentials { username: username.to_vec(), password: password.to_vec() };
    Ok(Some((credentials, r.pos)))
}

/// The server's RFC 1929 answer: `01 00` for success, `01 01` for failure.
pub fn encode_auth_status(success: bool) -> [u8; 2] {
    [AUTH_VERSION, if success { 0x00 } else { 0x01 }]
}

/// A request's CMD byte (RFC 1928 section 4, plus Tor's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0x01.
    Connect,
    /// 0x02.
    Bind,
    /// 0x03.
    UdpAssociate,
    /// 0xF0, Tor: resolve the name in DST.ADDR; the reply carries the address.
    Resolve,
    /// 0xF1, Tor: reverse-resolve the address in DST.ADDR; the reply carries a name.
    ResolvePtr,
    /// Anything else; the server replies 0x07 (command not supported).
    Unknown(u8),
}

impl From<u8> for Command {
    fn from(byte: u8) -> Self {
        match byte {
            0x01 => Command::Connect,
            0x02 => Command::Bind,
            0x03 => Command::UdpAssociate,
            0xF0 => Command::Resolve,
            0xF1 => Command::ResolvePtr,
            other => Command::Unknown(other),
        }
    }
}

impl From<Command> for u8 {
    fn from(command: Command) -> Self {
        match command {
            Command::Connect => 0x01,
            Command::Bind => 0x02,
            Command::UdpAssociate => 0x03,
            Command::Resolve => 0xF0,
            Command::ResolvePtr => 0xF1,
            Command::Unknown(byte) => byte,
        }
    }
}

/// A client's request: `05 CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub target: Target,
    /// The DOMAINNAME exactly as sent when ATYP was 3, even when it is an IP
    /// literal: an upstream proxy receives targets by name as the client gave them.
    pub name: Option<String>,
}

/// Decodes a request (RFC 1928 section 4).
///
/// An unknown ATYP is `Err(Socks5Error::AddressTypeNotSupported(atyp))` as soon as that byte
/// arrives (the server replies 0x08). Unknown command bytes decode as [`Command::Unknown`], so
/// the server can read the whole request and then reply 0x07. RSV is ignored. A DOMAINNAME that
/// is an IP literal becomes [`Host::Ip`] (see [`host_from_domain`]).
pub fn decode_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Socks5Error> {
    let mut r = Reader::new(buf);
    check_version(need!(r.u8()))?;
    let command = Command::from(need!(r.u8()));
    let _reserved = need!(r.u8());
    let start = r.pos;
    let target = need!(decode_address(&mut r)?);
    let name = match buf.get(start..r.pos) {
        // ATYP 3, length, name, port: the name is ASCII by now (host_from_domain checked it).
        Some([ATYP_DOMAIN, len, rest @ ..]) => {
            rest.get(..usize::from(*len)).map(|name| name.iter().copied().map(char::from).collect())
        }
        _ => None,
    };
    Ok(Some((Request { command, target, name }, r.pos)))
}

/// A reply's REP byte (RFC 1928 section 6). Any value is representable: Tor adds 0xF0..=0xF7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyCode(pub u8);

impl ReplyCode {
    pub const SUCCEEDED: Self = Self(0x00);
    pub const GENERAL_FAILURE: Self = Self(0x01);
    pub const NOT_ALLOWED: Self = Self(0x02);
    pub const NETWORK_UNREACHABLE: Self = Self(0x03);
    pub const HOST_UNREACHABLE: Self = Self(0x04);
    pub const CONNECTION_REFUSED: Self = Self(0x05);
    pub const TTL_EXPIRED: Self = Self(0x06);
    pub const COMMAND_NOT_SUPPORTED: Self = Self(0x07);
    pub const ADDRESS_TYPE_NOT_SUPPORTED: Self = Self(0x08);
    // Tor's extended errors for onion services (tor's socks-extensions.txt, "Extended error
    // codes"), sent only when the SOCKSPort has ExtendedErrors.
    pub const ONION_DESCRIPTOR_NOT_FOUND: Self = Self(0xF0);
    pub const ONION_DESCRIPTOR_INVALID: Self = Self(0xF1);
    pub const ONION_INTRODUCTION_FAILED: Self = Self(0xF2);
    pub const ONION_RENDEZVOUS_FAILED: Self = Self(0xF3);
    pub const ONION_MISSING_CLIENT_AUTH: Self = Self(0xF4);
    pub const ONION_WRONG_CLIENT_AUTH: Self = Self(0xF5);
    pub const ONION_INVALID_ADDRESS: Self = Self(0xF6);
    pub const ONION_INTRODUCTION_TIMED_OUT: Self = Self(0xF7);

    pub fn is_success(self) -> bool {
        self == Self::SUCCEEDED
    }

    /// The code's meaning in words, `None` for codes neither RFC 1928 nor Tor defines.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x00 => "succeeded",
            0x01 => "general failure",
            0x02 => "connection not allowed by ruleset",
            0x03 => "network unreachable",
            0x04 => "host unreachable",
            0x05 => "connection refused",
            0x06 => "ttl expired",
            0x07 => "command not supported",
            0x08 => "address type not supported",
            0xF0 => "onion service descriptor can not be found",
            0xF1 => "onion service descriptor is invalid",
            0xF2 => "onion service introduction failed",
            0xF3 => "onion service rendezvous failed",
            0xF4 => "onion service missing client authorization",
            0xF5 => "onion service wrong client authorization",
            0xF6 => "onion service invalid address",
            0xF7 => "onion service introduction timed out",
            _ => return None,
        })
    }
}

impl fmt::Display for ReplyCode {
    /// `"connection refused (0x05)"`, `"unknown reply (0x42)"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#04x})", self.0),
            None => write!(f, "unknown reply ({:#04x})", self.0),
        }
    }
}

/// Encodes a reply `05 REP 00 ATYP BND.ADDR BND.PORT`, the bound address as ATYP 1, 4 or 3 per
/// its host. A name that is empty, longer than 255 bytes or not a valid hostname is an error,
/// and then nothing is written to `out`.
pub fn encode_reply(code: ReplyCode, bound: &Target, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    let host = WireHost::new(&bound.host)?;
    out.extend_from_slice(&[SOCKS_VERSION, code.0, 0x00]);
    host.put(bound.port, out);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client role: we talk to an upstream SOCKS5 proxy such as Tor.
// ---------------------------------------------------------------------------------------------

/// Encodes `05 NMETHODS METHODS...`. We offer one or two methods; a list longer than 255 (only
/// possible with repeats) is cut at 255, the most NMETHODS can announce.
pub fn encode_greeting(methods: &[u8], out: &mut Vec<u8>) {
    let methods = methods.get(..MAX_FIELD_BYTES).unwrap_or(methods);
    out.push(SOCKS_VERSION);
    out.push(u8::try_from(methods.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(methods);
}

/// Decodes the server's `05 METHOD`; [`METHOD_NO_ACCEPTABLE`] is returned as a value for the
/// caller to act on.
pub fn decode_method_choice(buf: &[u8]) -> Result<Option<(u8, usize)>, Socks5Error> {
    let mut r = Reader::new(buf);
    check_version(need!(r.u8()))?;
    let method = need!(r.u8());
    Ok(Some((method, r.pos)))
}

/// Encodes the RFC 1929 request. Each field must be at most 255 bytes, else an error and nothing
/// is written; empty fields are sent as they are (Tor takes them).
pub fn encode_auth(credentials: &Credentials, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    let username_len = field_len("username", &credentials.username)?;
    let password_len = field_len("password", &credentials.password)?;
    out.push(AUTH_VERSION);
    out.push(username_len);
    out.extend_from_slice(&credentials.username);
    out.push(password_len);
    out.extend_from_slice(&credentials.password);
    Ok(())
}

/// Decodes the server's RFC 1929 `01 STATUS`: `true` for 0x00, `false` for any other status.
pub fn decode_auth_status(buf: &[u8]) -> Result<Option<(bool, usize)>, Socks5Error> {
    let mut r = Reader::new(buf);
    check_auth_version(need!(r.u8()))?;
    let status = need!(r.u8());
    Ok(Some((status == 0x00, r.pos)))
}

/// Encodes `05 CMD 00 ATYP DST.ADDR DST.PORT`. Targets with [`Host::Name`] are sent as ATYP 3,
/// never resolved here (the upstream, e.g. Tor, resolves them). An invalid name is an error and
/// then nothing is written.
pub fn encode_request(command: Command, target: &Target, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    let host = WireHost::new(&target.host)?;
    out.extend_from_slice(&[SOCKS_VERSION, u8::from(command), 0x00]);
    host.put(target.port, out);
    Ok(())
}

/// Encodes a request with `name` sent as DOMAINNAME exactly as given (an IP
/// literal stays text): how targets the client named go to an upstream proxy.
pub fn encode_request_by_name(command: Command, name: &str, port: u16, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    // Only what our own decoder accepts: a hostname or an IP literal.
    host_from_domain(name.as_bytes())?;
    let host = WireHost::Name(field_len("domain name", name.as_bytes())?, name.as_bytes());
    out.extend_from_slice(&[SOCKS_VERSION, u8::from(command), 0x00]);
    host.put(port, out);
    Ok(())
}

/// The upstream's reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: ReplyCode,
    pub bound: Target,
}

/// Decodes `05 REP RSV ATYP BND.ADDR BND.PORT`. Every reply code 0x00..=0xFF decodes (Tor sends
/// 0xF0..=0xF7); what a failure means is the caller's decision. An unknown ATYP is an error.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, Socks5Error> {
    let mut r = Reader::new(buf);
    check_version(need!(r.u8()))?;
    let code = ReplyCode(need!(r.u8()));
    let _reserved = need!(r.u8());
    let bound = need!(decode_address(&mut r)?);
    Ok(Some((Reply { code, bound }, r.pos)))
}

// ---------------------------------------------------------------------------------------------
// Shared pieces.
// ---------------------------------------------------------------------------------------------

/// Unwraps an `Option` from the reader, or returns "need more bytes" from the decoder.
macro_rules! need {
    ($read:expr) => {
        match $read {
            Some(value) => value,
            None => return Ok(None),
        }
    };
}
use need;

/// A cursor over the bytes received so far; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn u8(&mut self) -> Option<u8> {
        let byte = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(byte)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u16_be(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
}

fn check_version(version: u8) -> Result<(), Socks5Error> {
    if version == SOCKS_VERSION { Ok(()) } else { Err(Socks5Error::BadVersion(version)) }
}

fn check_auth_version(version: u8) -> Result<(), Socks5Error> {
    if version == AUTH_VERSION { Ok(()) } else { Err(Socks5Error::BadAuthVersion(version)) }
}

fn field_len(field: &'static str, bytes: &[u8]) -> Result<u8, Socks5Error> {
    u8::try_from(bytes.len()).map_err(|_| Socks5Error::FieldTooLong { field, len: bytes.len() })
}

/// Decodes `ATYP ADDR PORT`, shared by requests and replies.
fn decode_address(r: &mut Reader<'_>) -> Result<Option<Target>, Socks5Error> {
    let host = match need!(r.u8()) {
        ATYP_IPV4 => Host::Ip(IpAddr::V4(Ipv4Addr::from(need!(r.array::<4>())))),
        ATYP_IPV6 => Host::Ip(IpAddr::V6(Ipv6Addr::from(need!(r.array::<16>())))),
        ATYP_DOMAIN => {
            let len = need!(r.u8());
            if len == 0 {
                return Err(Socks5Error::EmptyDomain);
            }
            host_from_domain(need!(r.take(usize::from(len))))?
        }
        other => return Err(Socks5Error::AddressTypeNotSupported(other)),
    };
    let port = need!(r.u16_be());
    Ok(Some(Target { host, port }))
}

/// A host checked and ready to be written as `ATYP ADDR`.
enum WireHost<'a> {
    V4([u8; 4]),
    V6([u8; 16]),
    Name(u8, &'a [u8]),
}

impl<'a> WireHost<'a> {
    /// Validates names with the same rules the decoder applies, so we never send what we would
    /// refuse to read.
    fn new(host: &'a Host) -> Result<Self, Socks5Error> {
        Ok(match host {
            Host::Ip(IpAddr::V4(ip)) => WireHost::V4(ip.octets()),
            Host::Ip(IpAddr::V6(ip)) => WireHost::V6(ip.octets()),
            Host::Name(name) => {
                checked_name(name.as_bytes())?;
                WireHost::Name(field_len("domain name", name.as_bytes())?, name.as_bytes())
            }
        })
    }

    fn put(&self, port: u16, out: &mut Vec<u8>) {
        match self {
            WireHost::V4(octets) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(octets);
            }
            WireHost::V6(octets) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(octets);
            }
            WireHost::Name(len, name) => {
                out.push(ATYP_DOMAIN);
                out.push(*len);
                out.extend_from_slice(name);
            }
        }
        out.extend_from_slice(&port.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>;

    const PROXYRANDOMIZE_USER: &[u8] = b"0afb2da441f5c105-0";
    const ONION_V3: &str = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";

    /// Decodes a whole message, checks every strict prefix asks for more bytes, and checks
    /// trailing bytes are left for the next stage.
    fn decode_whole<T: fmt::Debug + PartialEq>(decode: Decoder<T>, msg: &[u8]) -> T {
        for len in 0..msg.len() {
            assert_eq!(decode(&msg[..len]), Ok(None), "prefix of {len} bytes");
        }
        let mut longer = msg.to_vec();
        longer.extend_from_slice(&[0x05, 0x01, 0x00]);
        let (value, consumed) = decode(&longer).expect("valid message").expect("whole message");
        assert_eq!(consumed, msg.len());
        let (again, consumed) = decode(msg).expect("valid").expect("whole");
        assert_eq!(consumed, msg.len());
        assert_eq!(again, value);
        value
    }

    fn name(s: &str) -> Host {
        Host::Name(s.to_owned())
    }

    fn domain_request(command: u8, domain: &[u8], port: u16) -> Vec<u8> {
        let mut msg = vec![0x05, command, 0x00, 0x03, domain.len() as u8];
        msg.extend_from_slice(domain);
        msg.extend_from_slice(&port.to_be_bytes());
        msg
    }

    // --- greeting and method choice ----------------------------------------------------------

    #[test]
    fn greeting_as_bitcoin_core_sends_it() {
        let greeting = decode_whole(decode_greeting, &[0x05, 0x02, 0x00, 0x02]);
        assert_eq!(greeting.methods, vec![METHOD_NO_AUTH, METHOD_USER_PASS]);
        assert!(greeting.offers(METHOD_NO_AUTH));
        assert!(greeting.offers(METHOD_USER_PASS));
        assert!(!greeting.offers(0x01));
    }

    #[test]
    fn greeting_as_btcd_sends_it() {
        let greeting = decode_whole(decode_greeting, &[0x05, 0x01, 0x00]);
        assert!(greeting.offers(METHOD_NO_AUTH));
        assert!(!greeting.offers(METHOD_USER_PASS));
    }

    #[test]
    fn greeting_with_255_methods() {
        let mut msg = vec![0x05, 0xFF];
        msg.extend(0..=254u8);
        let greeting = decode_whole(decode_greeting, &msg);
        assert_eq!(greeting.methods.len(), 255);
    }

    #[test]
    fn greeting_errors_as_soon_as_the_bytes_show_them() {
        assert_eq!(decode_greeting(&[0x04]), Err(Socks5Error::BadVersion(4)));
        // A SOCKS4 CONNECT, as a misconfigured client would send.
        assert_eq!(decode_greeting(&[0x04, 0x01, 0x20, 0x8d, 127, 0, 0, 1, 0]), Err(Socks5Error::BadVersion(4)));
        // An HTTP client pointed at the SOCKS port.
        assert_eq!(decode_greeting(b"GET /"), Err(Socks5Error::BadVersion(b'G')));
        assert_eq!(decode_greeting(&[0x05, 0x00]), Err(Socks5Error::NoMethods));
    }

    #[test]
    fn greeting_round_trips_through_encode_greeting() {
        let mut out = Vec::new();
        encode_greeting(&[METHOD_NO_AUTH, METHOD_USER_PASS], &mut out);
        assert_eq!(out, [0x05, 0x02, 0x00, 0x02]);
        let greeting = decode_whole(decode_greeting, &out);
        assert_eq!(greeting.methods, [0x00, 0x02]);

        let mut out = Vec::new();
        encode_greeting(&[0u8; 300], &mut out);
        assert_eq!(out.len(), 2 + 255);
        assert_eq!(out.get(1), Some(&0xFF));
    }

    #[test]
    fn method_choice_round_trip() {
        for method in [METHOD_NO_AUTH, METHOD_USER_PASS, METHOD_NO_ACCEPTABLE] {
            let bytes = encode_method_choice(method);
            assert_eq!(bytes, [0x05, method]);
            assert_eq!(decode_whole(decode_method_choice, &bytes), method);
        }
        assert_eq!(decode_method_choice(&[0x01, 0x00]), Err(Socks5Error::BadVersion(1)));
    }

    // --- RFC 1929 ----------------------------------------------------------------------------

    fn auth_message(username: &[u8], password: &[u8]) -> Vec<u8> {
        let mut msg = vec![0x01, username.len() as u8];
        msg.extend_from_slice(username);
        msg.push(password.len() as u8);
        msg.extend_from_slice(password);
        msg
    }

    #[test]
    fn auth_as_core_proxyrandomize_sends_it() {
        let msg = auth_message(PROXYRANDOMIZE_USER, PROXYRANDOMIZE_USER);
        assert_eq!(msg.len(), 3 + 2 * 18);
        let credentials = decode_whole(decode_auth, &msg);
        assert_eq!(credentials.username, PROXYRANDOMIZE_USER);
        assert_eq!(credentials.password, PROXYRANDOMIZE_USER);
    }

    #[test]
    fn auth_accepts_an_empty_password_as_jdk_clients_send() {
        let credentials = decode_whole(decode_auth, &auth_message(b"satoshi", b""));
        assert_eq!(credentials.username, b"satoshi");
        assert!(credentials.password.is_empty());
    }

    #[test]
    fn auth_accepts_empty_username_and_password() {
        let credentials = decode_whole(decode_auth, &[0x01, 0x00, 0x00]);
        assert!(credentials.username.is_empty());
        assert!(credentials.password.is_empty());
    }

    #[test]
    fn auth_with_longest_fields() {
        let long = [b'x'; 255];
        let credentials = decode_whole(decode_auth, &auth_message(&long, &long));
        assert_eq!(credentials.username.len(), 255);
        assert_eq!(credentials.password.len(), 255);
    }

    #[test]
    fn auth_rejects_a_wrong_sub_negotiation_version() {
        assert_eq!(decode_auth(&[0x05, 0x01, b'a', 0x01, b'b']), Err(Socks5Error::BadAuthVersion(5)));
        assert_eq!(decode_auth(&[0x00]), Err(Socks5Error::BadAuthVersion(0)));
    }

    #[test]
    fn credentials_debug_prints_lengths_only() {
        let credentials = Credentials { username: PROXYRANDOMIZE_USER.to_vec(), password: b"hunter2".to_vec() };
        let debug = format!("{credentials:?}");
        assert!(!debug.contains("0afb2da4"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("18") && debug.contains('7'), "{debug}");
    }

    #[test]
    fn auth_round_trips_through_encode_auth() {
        for (username, password) in [
            (PROXYRANDOMIZE_USER, PROXYRANDOMIZE_USER),
            (b"user".as_slice(), b"".as_slice()),
            (b"".as_slice(), b"".as_slice()),
        ] {
            let credentials = Credentials { username: username.to_vec(), password: password.to_vec() };
            let mut out = Vec::new();
            encode_auth(&credentials, &mut out).expect("fits");
            assert_eq!(out, auth_message(username, password));
            assert_eq!(decode_whole(decode_auth, &out), credentials);
        }
    }

    #[test]
    fn encode_auth_rejects_long_fields_without_writing() {
        let mut out = vec![0xAA];
        let too_long = Credentials { username: vec![b'u'; 256], password: Vec::new() };
        assert_eq!(encode_auth(&too_long, &mut out), Err(Socks5Error::FieldTooLong { field: "username", len: 256 }));
        let too_long = Credentials { username: Vec::new(), password: vec![b'p'; 300] };
        assert_eq!(encode_auth(&too_long, &mut out), Err(Socks5Error::FieldTooLong { field: "password", len: 300 }));
        assert_eq!(out, [0xAA]);
    }

    #[test]
    fn auth_status_round_trip() {
        assert_eq!(encode_auth_status(true), [0x01, 0x00]);
        assert_eq!(encode_auth_status(false), [0x01, 0x01]);
        assert!(decode_whole(decode_auth_status, &[0x01, 0x00]));
        assert!(!decode_whole(decode_auth_status, &[0x01, 0x01]));
        assert!(!decode_whole(decode_auth_status, &[0x01, 0xFF]));
        assert_eq!(decode_auth_status(&[0x05, 0x00]), Err(Socks5Error::BadAuthVersion(5)));
    }

    // --- requests ----------------------------------------------------------------------------

    #[test]
    fn request_with_ipv4() {
        let msg = [0x05, 0x01, 0x00, 0x01, 15, 61, 23, 23, 0x20, 0x8d];
        let request = decode_whole(decode_request, &msg);
        assert_eq!(request.command, Command::Connect);
        assert_eq!(request.target, Target::new(Host::Ip(Ipv4Addr::new(15, 61, 23, 23).into()), 8333));
    }

    #[test]
    fn request_with_ipv6() {
        let ip: Ipv6Addr = "2001:db8::1".parse().expect("literal");
        let mut msg = vec![0x05, 0x01, 0x00, 0x04];
        msg.extend_from_slice(&ip.octets());
        msg.extend_from_slice(&[0x47, 0x9d]);
        let request = decode_whole(decode_request, &msg);
        assert_eq!(request.target, Target::new(Host::Ip(ip.into()), 18333));
    }

    #[test]
    fn request_with_ipv4_literal_as_domainname_becomes_ip() {
        let request = decode_whole(decode_request, &domain_request(0x01, b"15.61.23.23", 8333));
        assert_eq!(request.target.host, Host::Ip(Ipv4Addr::new(15, 61, 23, 23).into()));
        assert_eq!(request.target.port, 8333);
    }

    #[test]
    fn request_with_unbracketed_ipv6_domainname_becomes_ip() {
        let literal = "1233:3432:2434:2343:3234:2345:6546:4534";
        let request = decode_whole(decode_request, &domain_request(0x01, literal.as_bytes(), 8333));
        let ip: Ipv6Addr = literal.parse().expect("literal");
        assert_eq!(request.target.host, Host::Ip(ip.into()));
    }

    #[test]
    fn request_with_bracketed_ipv6_domainname_becomes_ip() {
        let request = decode_whole(decode_request, &domain_request(0x01, b"[::1]", 8333));
        assert_eq!(request.target.host, Host::Ip(Ipv6Addr::LOCALHOST.into()));
    }

    #[test]
    fn request_with_hostname() {
        let request = decode_whole(decode_request, &domain_request(0x01, b"seed.bitcoin.sipa.be", 8333));
        assert_eq!(request.target, Target::new(name("seed.bitcoin.sipa.be"), 8333));
        assert!(!request.target.is_onion());
    }

    #[test]
    fn request_with_onion_v3_name() {
        let request = decode_whole(decode_request, &domain_request(0x01, ONION_V3.as_bytes(), 8333));
        assert_eq!(request.target.host, name(ONION_V3));
        assert!(request.target.is_onion());
    }

    #[test]
    fn request_with_longest_name() {
        let long = [b'a'; 255];
        let request = decode_whole(decode_request, &domain_request(0x01, &long, 1));
        assert_eq!(request.target.host, Host::Name("a".repeat(255)));
    }

    #[test]
    fn request_commands() {
        for (byte, command) in [
            (0x01, Command::Connect),
            (0x02, Command::Bind),
            (0x03, Command::UdpAssociate),
            (0xF0, Command::Resolve),
            (0xF1, Command::ResolvePtr),
            (0x00, Command::Unknown(0x00)),
            (0x09, Command::Unknown(0x09)),
            (0xFF, Command::Unknown(0xFF)),
        ] {
            let request = decode_whole(decode_request, &domain_request(byte, b"example.com", 0));
            assert_eq!(request.command, command);
        }
        for byte in 0..=u8::MAX {
            assert_eq!(u8::from(Command::from(byte)), byte);
        }
    }

    #[test]
    fn tor_resolve_ptr_request_with_ipv4() {
        let msg = [0x05, 0xF1, 0x00, 0x01, 1, 2, 3, 4, 0x00, 0x00];
        let request = decode_whole(decode_request, &msg);
        assert_eq!(request.command, Command::ResolvePtr);
        assert_eq!(request.target.socket_addr(), Some("1.2.3.4:0".parse().expect("literal")));
    }

    #[test]
    fn request_ignores_reserved_byte() {
        let msg = [0x05, 0x01, 0xAB, 0x01, 1, 2, 3, 4, 0x20, 0x8d];
        let request = decode_whole(decode_request, &msg);
        assert_eq!(request.target.to_string(), "1.2.3.4:8333");
    }

    #[test]
    fn request_with_unknown_address_type() {
        let msg = [0x05, 0x01, 0x00, 0x05, 1, 2, 3, 4, 0x20, 0x8d];
        // Known as soon as the ATYP byte is there, so the server can reply 0x08 at once.
        for len in 4..=msg.len() {
            assert_eq!(decode_request(&msg[..len]), Err(Socks5Error::AddressTypeNotSupported(0x05)));
        }
        assert_eq!(decode_request(&[0x05, 0x01, 0x00, 0x00]), Err(Socks5Error::AddressTypeNotSupported(0x00)));
    }

    #[test]
    fn request_with_bad_domainname() {
        assert_eq!(decode_request(&[0x05, 0x01, 0x00, 0x03, 0x00, 0x20, 0x8d]), Err(Socks5Error::EmptyDomain));
        for (domain, bad) in [
            (b"bad host".as_slice(), b' '),
            (b"nul\0.example", 0x00),
            (b"tab\t", b'\t'),
            (b"caf\xc3\xa9.example", 0xC3),
            (b"del\x7f", 0x7F),
            (b"host:8333", b':'),
            (b"[not-an-ip]", b'['),
        ] {
            assert_eq!(
                decode_request(&domain_request(0x01, domain, 8333)),
                Err(Socks5Error::BadDomainByte(bad)),
                "{domain:?}"
            );
        }
    }

    #[test]
    fn request_with_bad_version() {
        assert_eq!(decode_request(&[0x04]), Err(Socks5Error::BadVersion(4)));
    }

    #[test]
    fn request_round_trips_through_encode_request() {
        let targets = [
            Target::new(Host::Ip(Ipv4Addr::new(1, 2, 3, 4).into()), 8333),
            Target::new(Host::Ip("2001:db8::1".parse().expect("literal")), 8333),
            Target::new(name("seed.bitcoin.sipa.be"), 8333),
            Target::new(name(ONION_V3), 8333),
        ];
        for command in [Command::Connect, Command::Resolve, Command::Unknown(0x42)] {
            for target in &targets {
                let mut out = Vec::new();
                encode_request(command, target, &mut out).expect("encodable");
                let request = decode_whole(decode_request, &out);
                assert_eq!(request.command, command);
                assert_eq!(&request.target, target);
            }
        }
    }

    #[test]
    fn encode_request_sends_names_as_domainname() {
        let mut out = Vec::new();
        encode_request(Command::Connect, &Target::new(name("a.onion"), 8333), &mut out).expect("encodable");
        assert_eq!(out, [0x05, 0x01, 0x00, 0x03, 7, b'a', b'.', b'o', b'n', b'i', b'o', b'n', 0x20, 0x8d]);
    }

    #[test]
    fn encode_request_rejects_bad_names_without_writing() {
        let mut out = Vec::new();
        let long = Target::new(Host::Name("a".repeat(256)), 1);
        assert_eq!(
            encode_request(Command::Connect, &long, &mut out),
            Err(Socks5Error::FieldTooLong { field: "domain name", len: 256 })
        );
        let empty = Target::new(name(""), 1);
        assert_eq!(encode_request(Command::Connect, &empty, &mut out), Err(Socks5Error::EmptyDomain));
        let spaced = Target::new(name("a b"), 1);
        assert_eq!(encode_request(Command::Connect, &spaced, &mut out), Err(Socks5Error::BadDomainByte(b' ')));
        assert!(out.is_empty());
    }

    // --- replies -----------------------------------------------------------------------------

    #[test]
    fn reply_bytes_for_a_plain_success() {
        let mut out = Vec::new();
        let unspecified = Target::new(Host::Ip(Ipv4Addr::UNSPECIFIED.into()), 0);
        encode_reply(ReplyCode::SUCCEEDED, &unspecified, &mut out).expect("encodable");
        assert_eq!(out, [0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn replies_round_trip() {
        let bounds = [
            Target::new(Host::Ip(Ipv4Addr::new(127, 0, 0, 1).into()), 9050),
            Target::new(Host::Ip(Ipv6Addr::LOCALHOST.into()), 9050),
            Target::new(name("resolved.example"), 0),
        ];
        for code in [ReplyCode::SUCCEEDED, ReplyCode::CONNECTION_REFUSED, ReplyCode(0xF1), ReplyCode(0x42)] {
            for bound in &bounds {
                let mut out = Vec::new();
                encode_reply(code, bound, &mut out).expect("encodable");
                let reply = decode_whole(decode_reply, &out);
                assert_eq!(reply.code, code);
                assert_eq!(&reply.bound, bound);
            }
        }
    }

    #[test]
    fn every_reply_code_decodes() {
        for code in 0..=u8::MAX {
            let msg = [0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
            assert_eq!(decode_whole(decode_reply, &msg).code, ReplyCode(code));
        }
    }

    #[test]
    fn reply_errors() {
        assert_eq!(decode_reply(&[0x05, 0x00, 0x00, 0x07]), Err(Socks5Error::AddressTypeNotSupported(0x07)));
        assert_eq!(decode_reply(&[0x00, 0x5a]), Err(Socks5Error::BadVersion(0)));
        let mut out = vec![0x01];
        let long = Target::new(Host::Name("b".repeat(300)), 1);
        assert_eq!(
            encode_reply(ReplyCode::SUCCEEDED, &long, &mut out),
            Err(Socks5Error::FieldTooLong { field: "domain name", len: 300 })
        );
        assert_eq!(out, [0x01]);
    }

    #[test]
    fn reply_code_display() {
        assert_eq!(ReplyCode::CONNECTION_REFUSED.to_string(), "connection refused (0x05)");
        assert_eq!(ReplyCode::SUCCEEDED.to_string(), "succeeded (0x00)");
        assert_eq!(ReplyCode(0xF0).to_string(), "onion service descriptor can not be found (0xf0)");
        assert_eq!(ReplyCode::ONION_DESCRIPTOR_INVALID.to_string(), "onion service descriptor is invalid (0xf1)");
        assert_eq!(ReplyCode(0xF7).to_string(), "onion service introduction timed out (0xf7)");
        assert_eq!(ReplyCode(0x42).to_string(), "unknown reply (0x42)");
        assert_eq!(ReplyCode(0xF8).to_string(), "unknown reply (0xf8)");
        assert!(ReplyCode::SUCCEEDED.is_success());
        assert!(!ReplyCode::GENERAL_FAILURE.is_success());
    }

    // --- Target ------------------------------------------------------------------------------

    #[test]
    fn target_parse_and_display_round_trip() {
        for text in [
            "1.2.3.4:8333",
            "[2001:db8::1]:8333",
            "[::ffff:1.2.3.4]:1",
            "seed.bitcoin.sipa.be:8333",
            "localhost:65535",
            "Seed.Example.:18444",
        ] {
            let target = Target::parse(text).expect(text);
            assert_eq!(target.to_string(), text);
            assert_eq!(text.parse::<Target>().as_ref(), Ok(&target));
        }
        let onion = format!("{ONION_V3}:8333");
        assert!(Target::parse(&onion).expect("onion").is_onion());
    }

    #[test]
    fn target_parse_accepts_port_zero() {
        // Documented: 0 is valid for Tor's RESOLVE; config decides what is dialable.
        assert_eq!(Target::parse("example.com:0"), Ok(Target::new(name("example.com"), 0)));
    }

    #[test]
    fn target_parse_gives_ip_hosts() {
        assert_eq!(
            Target::parse("1.2.3.4:8333").map(|t| t.socket_addr()),
            Ok(Some("1.2.3.4:8333".parse().expect("literal")))
        );
        assert_eq!(
            Target::parse("[2001:db8::1]:8333").map(|t| t.socket_addr()),
            Ok(Some("[2001:db8::1]:8333".parse().expect("literal")))
        );
    }

    #[test]
    fn target_parse_errors() {
        use TargetError::*;
        for (text, error) in [
            ("seed.bitcoin.sipa.be", MissingPort),
            ("1.2.3.4", MissingPort),
            ("1.2.3.4:", MissingPort),
            ("[2001:db8::1]", MissingPort),
            ("1.2.3.4:65536", BadPort("65536".into())),
            ("1.2.3.4:+80", BadPort("+80".into())),
            ("1.2.3.4:-1", BadPort("-1".into())),
            ("host:80a", BadPort("80a".into())),
            ("[2001:db8::1:8333", BadBrackets),
            ("[2001:db8::1]8333", BadBrackets),
            ("[not-an-ip]:8333", BadBrackets),
            ("[]:8333", BadBrackets),
            ("host]:8333", BadBrackets),
            ("2001:db8::1:8333", UnbracketedIpv6),
            ("::1", UnbracketedIpv6),
            (":8333", BadHost(Socks5Error::EmptyDomain)),
            ("bad host:8333", BadHost(Socks5Error::BadDomainByte(b' '))),
            ("", MissingPort),
        ] {
            assert_eq!(Target::parse(text), Err(error), "{text:?}");
        }
        let long = format!("{}:1", "a".repeat(256));
        assert_eq!(Target::parse(&long), Err(BadHost(Socks5Error::FieldTooLong { field: "domain name", len: 256 })));
    }

    #[test]
    fn target_from_socket_addr() {
        let v4: SocketAddr = "15.61.23.23:8333".parse().expect("literal");
        assert_eq!(Target::from(v4).to_string(), "15.61.23.23:8333");
        let v6: SocketAddr = "[2001:db8::1]:8333".parse().expect("literal");
        assert_eq!(Target::from(v6).to_string(), "[2001:db8::1]:8333");
        assert_eq!(Target::from(v6).socket_addr(), Some(v6));
    }

    #[test]
    fn onion_detection() {
        for (text, onion) in [
            (ONION_V3, true),
            ("abc.ONION", true),
            ("abc.Onion.", true),
            ("onion", false),
            (".onion", false),
            ("notonion", false),
            ("onion.example", false),
            ("é.onion", true),
            ("é", false),
        ] {
            assert_eq!(Target::new(name(text), 1).is_onion(), onion, "{text}");
        }
        assert!(!Target::new(Host::Ip(Ipv4Addr::LOCALHOST.into()), 1).is_onion());
    }

    #[test]
    fn host_from_domain_cases() {
        assert_eq!(host_from_domain(b"127.0.0.1"), Ok(Host::Ip(Ipv4Addr::LOCALHOST.into())));
        assert_eq!(host_from_domain(b"[127.0.0.1]"), Ok(Host::Ip(Ipv4Addr::LOCALHOST.into())));
        assert_eq!(host_from_domain(b"Example.COM."), Ok(name("Example.COM.")));
        assert_eq!(host_from_domain(b""), Err(Socks5Error::EmptyDomain));
        assert_eq!(host_from_domain(b"[::1"), Err(Socks5Error::BadDomainByte(b'[')));
        assert_eq!(host_from_domain(&[b'a'; 256]), Err(Socks5Error::FieldTooLong { field: "domain name", len: 256 }));
    }

    #[test]
    fn error_display_is_lowercase_without_period() {
        let errors = [
            Socks5Error::BadVersion(4).to_string(),
            Socks5Error::AddressTypeNotSupported(5).to_string(),
            TargetError::MissingPort.to_string(),
            TargetError::BadHost(Socks5Error::EmptyDomain).to_string(),
        ];
        assert_eq!(errors[0], "unsupported socks version 0x04");
        assert_eq!(errors[1], "address type 0x05 not supported");
        for error in errors {
            assert!(!error.ends_with('.'), "{error}");
            assert!(!error.starts_with(char::is_uppercase), "{error}");
        }
    }

    // --- no decoder panics ---------------------------------------------------------------------

    /// xorshift64*: deterministic bytes without a dependency.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    fn decode_everything(buf: &[u8]) {
        fn check<T>(result: Result<Option<(T, usize)>, Socks5Error>, len: usize) {
            if let Ok(Some((_, consumed))) = result {
                assert!(consumed <= len);
            }
        }
        check(decode_greeting(buf), buf.len());
        check(decode_auth(buf), buf.len());
        check(decode_request(buf), buf.len());
        check(decode_reply(buf), buf.len());
        check(decode_method_choice(buf), buf.len());
        check(decode_auth_status(buf), buf.len());
        let _ = host_from_domain(buf);
    }

    #[test]
    fn decoders_never_panic_on_random_bytes() {
        let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
        let prefixes: [&[u8]; 5] = [&[], &[0x05], &[0x05, 0x01, 0x00, 0x03], &[0x05, 0x01, 0x00, 0x01], &[0x01]];
        for round in 0..20_000 {
            let prefix = prefixes[round % prefixes.len()];
            let len = usize::from(noise.byte() % 64);
            let mut buf = prefix.to_vec();
            buf.extend((0..len).map(|_| noise.byte()));
            decode_everything(&buf);
            // Small length bytes make whole messages likely, not just "need more".
            if let Some(byte) = buf.get_mut(prefix.len()) {
                *byte %= 8;
            }
            decode_everything(&buf);
        }
    }

    #[test]
    fn request_keeps_the_name_as_sent() {
        let mut bytes = vec![0x05, 0x01, 0x00, 0x03, 11];
        bytes.extend_from_slice(b"15.61.23.23");
        bytes.extend_from_slice(&8333u16.to_be_bytes());
        let (request, used) = decode_request(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(request.target.host, Host::Ip("15.61.23.23".parse().unwrap()));
        assert_eq!(request.name.as_deref(), Some("15.61.23.23"));
        let ipv4 = [0x05, 0x01, 0x00, 0x01, 1, 2, 3, 4, 0x20, 0x8d];
        assert_eq!(decode_request(&ipv4).unwrap().unwrap().0.name, None);
    }

    #[test]
    fn request_by_name_sends_ip_literals_as_text() {
        let mut out = Vec::new();
        let v6 = "1233:3432:2434:2343:3234:2345:6546:4534";
        encode_request_by_name(Command::Connect, v6, 8333, &mut out).unwrap();
        assert_eq!(out[3], ATYP_DOMAIN);
        assert_eq!(out[4] as usize, v6.len());
        let (request, _) = decode_request(&out).unwrap().unwrap();
        assert_eq!(request.name.as_deref(), Some(v6));
        assert!(encode_request_by_name(Command::Connect, "a b", 1, &mut Vec::new()).is_err());
        assert!(encode_request_by_name(Command::Connect, &"a".repeat(256), 1, &mut Vec::new()).is_err());
    }
}
