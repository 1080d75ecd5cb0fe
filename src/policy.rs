//! PURE session policy: the decisions that keep the proxy's promises, each
//! made in exactly one function that every front end (SOCKS5, transparent,
//! static routes) and `probe` ask.
//!
//! - [`plan`]: may this session put plaintext v1 on the wire, run the BIP324
//!   handshake, or must it close? Asked before the dial, again at the moment
//!   the client's VERSION is about to go out, and after a failed handshake,
//!   so a v1-only verdict that another session reached in the meantime is
//!   judged under the fallback policy in force. Plaintext needs a
//!   [`PlaintextPermit`], which only [`plan`] makes.
//! - [`send_key_early`]: does a SOCKS5 session send our BIP324 key right
//!   after the TCP connect, before the client's first bytes say whether it
//!   speaks v1 (upgrade) or v2 itself (passthrough, which needs a remote
//!   that has received nothing from us)?
//! - [`DialRules`]: which socket addresses a session may connect to, checked
//!   for every resolved candidate before connecting and for the connected
//!   socket after: never this proxy's own listeners (any spelling: a name, the
//!   unspecified address, another local address), never loopback, private or
//!   other unroutable addresses for a client that is not itself on this host.
//! - [`admits`]: may a front end serve a client? SOCKS5 can ask for
//!   credentials; transparent mode and static routes cannot, so they serve
//!   only clients on this host or clients a real allow-list admitted. The
//!   configuration asks it for every listener off loopback (and refuses to
//!   start), each session asks it again for its own client.
//! - [`classify_name`]: what a host name that goes to an upstream unresolved
//!   is known to be without DNS (a numeric IPv4 spelling, a loopback name),
//!   so [`DialRules::check_name`] applies the same rules to it.
//! - [`is_routable`]: Bitcoin Core's `CNetAddr::IsRoutable`, extended to IPv6
//!   forms that embed an IPv4 address.
//!
//! No I/O here: the session layer gathers the facts and acts on the answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{EarlyKey, Fallback};

/// What is known about the remote when a v1 client's traffic is about to be
/// carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// This session has not tried the handshake; `remembered_v1_only` when
    /// the v1-only memory holds the remote (another session's verdict).
    Untried { remembered_v1_only: bool },
    /// This session's handshake failed; `remote_silent` when the remote sent
    /// not one byte after our key (Bitcoin Core's only reason to retry in v1).
    UpgradeFailed { remote_silent: bool },
}

/// Proof that the fallback policy allowed plaintext v1 to this remote when
/// the proof was made. Only [`plan`] makes one, and the v1 relay takes one:
/// no code path can relay plaintext without asking the policy first.
#[derive(Debug)]
pub struct PlaintextPermit {
    _made_by_plan: (),
}

/// Why a session must close instead of carrying the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The remote proved v1-only recently and plaintext is not allowed.
    RememberedV1Only,
    /// The handshake failed and the policy allows no v1 retry for this failure.
    NotV2,
}

/// What to do with a v1 client's traffic.
#[derive(Debug)]
pub enum Plan {
    /// Run the BIP324 handshake.
    Upgrade,
    /// Speak v1 to the remote (after a redial when the handshake was tried).
    Plaintext(PlaintextPermit),
    /// Close the session.
    Refuse(Refusal),
}

/// The v1-only / fallback decision. Under `Fallback::None` no evidence ever
/// yields plaintext. Under `Fallback::V1` plaintext follows Bitcoin Core's
/// rule: only a remote that stayed silent after our key (now, or in a
/// remembered session) is spoken to in v1; one that answered with anything
/// (garbage, a partial key, a bad packet) is not, so an attacker who answers
/// cannot downgrade the session.
pub fn plan(fallback: Fallback, evidence: Evidence) -> Plan {
    let plaintext = || Plan::Plaintext(PlaintextPermit { _made_by_plan: () });
    match (fallback, evidence) {
        (_, Evidence::Untried { remembered_v1_only: false }) => Plan::Upgrade,
        (Fallback::None, Evidence::Untried { remembered_v1_only: true }) => Plan::Refuse(Refusal::RememberedV1Only),
        (Fallback::V1, Evidence::Untried { remembered_v1_only: true }) => plaintext(),
        (Fallback::V1, Evidence::UpgradeFailed { remote_silent: true }) => plaintext(),
        (Fallback::None, Evidence::UpgradeFailed { .. }) | (Fallback::V1, Evidence::UpgradeFailed { .. }) => {
            Plan::Refuse(Refusal::NotV2)
        }
    }
}

/// A front end, by what it can ask of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// SOCKS5: can ask for RFC 1929 credentials (`[client_auth]`).
    Socks5,
    /// Transparent mode: the client's first bytes are its VERSION; nothing
    /// to authenticate with.
    Transparent,
    /// A static route: the client's first bytes go to the operator's target;
    /// nothing to authenticate with.
    Route,
}

impl Front {
    /// Whether this front end can make a client prove who it is.
    pub fn authenticates(self) -> bool {
        matches!(self, Front::Socks5)
    }
}

/// What restricts who may use the proxy's front ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRestrictions {
    /// `allow` is set and does not admit every address: whoever got past
    /// accept comes from an address the operator named.
    pub allow_list: bool,
    /// `[client_auth]` is set: SOCKS5 clients must send these credentials.
    pub client_auth: bool,
}

/// Whether `front` may serve a client. A client on this host (loopback, a
/// Unix socket) may use every front end; a client elsewhere only one that a
/// real allow-list admitted, or SOCKS5 when it must authenticate.
/// Credentials protect only a front end that asks for them: transparent
/// mode and static routes never do, so `[client_auth]` alone leaves them open.
pub fn admits(front: Front, client_is_local: bool, restrictions: ClientRestrictions) -> bool {
    client_is_local || restrictions.allow_list || (front.authenticates() && restrictions.client_auth)
}

/// Whether a SOCKS5 session whose [`plan`] is `Upgrade` sends our key right
/// after the TCP connect (docs/DESIGN.md, "Key early"). Our key on the wire
/// is only random bytes, so no setting sends plaintext; what is at stake is
/// a client that turns out to speak v2 itself: the remote already has our
/// key, so the session must redial for it. `client_spoke_v2_lately`: this
/// client was passed through within the last hour.
pub fn send_key_early(setting: EarlyKey, passthrough: bool, client_spoke_v2_lately: bool) -> bool {
    match setting {
        EarlyKey::Never => false,
        EarlyKey::Always => true,
        // Without passthrough a v2 client is refused, so the key is never in
        // its way; with it, a client known to speak v2 is waited for.
        EarlyKey::Auto => !passthrough || !client_spoke_v2_lately,
    }
}

/// Which addresses a session may connect to.
#[derive(Debug, Clone, Default)]
pub struct DialRules {
    /// Every address this proxy listens on (as bound: the real port when the
    /// configuration said 0), the metrics listener included.
    pub listening: Vec<SocketAddr>,
    /// Loopback, private, link-local and other unroutable targets may be
    /// dialed: the client is itself on this host, the target is the
    /// operator's own static route, or `allow_private_targets` is set.
    pub allow_private: bool,
}

/// Why a candidate address may not be dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DialRefusal {
    #[error("{0} is the unspecified address, which reaches this host")]
    Unspecified(SocketAddr),
    #[error("{0} is this proxy's own listener")]
    SelfTarget(SocketAddr),
    #[error(
        "{0} is not publicly routable (loopback, private, link-local or reserved) and this client may not reach it"
    )]
    Private(SocketAddr),
}

impl DialRules {
    /// Checks a resolved candidate before connecting to it.
    pub fn check_candidate(&self, candidate: SocketAddr) -> Result<(), DialRefusal> {
        let candidate = canonical(candidate);
        let ip = candidate.ip();
        if ip.is_unspecified() {
            // Connecting to 0.0.0.0 or [::] reaches this host's loopback.
            return Err(DialRefusal::Unspecified(candidate));
        }
        let on_this_host = ip.is_loopback();
        for listen in &self.listening {
            let listen = canonical(*listen);
            if listen.port() != candidate.port() {
                continue;
            }
            let same = listen.ip() == ip
                || (listen.ip().is_unspecified() && on_this_host)
                || (listen.ip().is_loopback() && on_this_host);
            if same {
                return Err(DialRefusal::SelfTarget(candidate));
            }
        }
        if !self.allow_private && !is_routable(&ip) {
            return Err(DialRefusal::Private(candidate));
        }
        Ok(())
    }

    /// Checks a connected socket: `peer` as connected, `local` our own end.
    /// A connection whose two ends share an address goes to this host (the
    /// kernel picks the destination itself as the source for a local
    /// address), which catches every spelling of a local address that
    /// [`check_candidate`](Self::check_candidate) cannot know, such as one of
    /// this host's interface addresses behind a wildcard listener.
    pub fn check_connected(&self, peer: SocketAddr, local: SocketAddr) -> Result<(), DialRefusal> {
        self.check_candidate(peer)?;
        let (peer, local) = (canonical(peer), canonical(local));
        if peer.ip() != local.ip() {
            return Ok(());
        }
        let ours = self
            .listening
            .iter()
            .map(|l| canonical(*l))
            .any(|l| l.port() == peer.port() && (l.ip().is_unspecified() || l.ip() == peer.ip()));
        if ours {
            return Err(DialRefusal::SelfTarget(peer));
        }
        if !self.allow_private {
            // This host's own address, reached from a client elsewhere.
            return Err(DialRefusal::Private(peer));
        }
        Ok(())
    }
}

impl DialRules {
    /// Checks a host name that goes to an upstream proxy unresolved, with
    /// what is known of it without DNS ([`classify_name`]): a numeric IPv4
    /// spelling as that address, a loopback name as `127.0.0.1` and `[::1]`,
    /// both at `port`. Other names are the upstream's to resolve.
    pub fn check_name(&self, name: &str, port: u16) -> Result<(), DialRefusal> {
        match classify_name(name) {
            NameClass::Ipv4(ip) => self.check_candidate(SocketAddr::new(IpAddr::V4(ip), port)),
            NameClass::Loopback => {
                self.check_candidate(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))?;
                self.check_candidate(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port))
            }
            NameClass::Other => Ok(()),
        }
    }
}

/// What a host name is known to be without asking DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameClass {
    /// A numeric IPv4 spelling: what `inet_aton` (and so glibc's
    /// `getaddrinfo`, which many SOCKS5 servers call) reads as this address.
    Ipv4(Ipv4Addr),
    /// `localhost`, a name under it (RFC 6761 section 6.3: resolvers answer
    /// loopback for them) or a loopback alias hosts files ship.
    Loopback,
    /// Anything else: only a resolver knows.
    Other,
}

/// Loopback names hosts files ship besides `localhost` (Debian, Fedora and
/// RHEL, Alpine, openSUSE): any resolver on such a host answers loopback
/// for them.
const LOOPBACK_ALIASES: [&str; 8] = [
    "localhost.localdomain",
    "localhost4",
    "localhost4.localdomain4",
    "localhost6",
    "localhost6.localdomain6",
    "ip6-localhost",
    "ip6-loopback",
    "ipv6-localhost",
];

/// Classifies a host name without DNS, case-insensitively and with one
/// trailing dot ignored (a resolver may strip it, and refusing more is the
/// safe side).
pub fn classify_name(name: &str) -> NameClass {
    let name = name.strip_suffix('.').unwrap_or(name);
    if let Some(ip) = parse_inet_aton(name) {
        return NameClass::Ipv4(ip);
    }
    let lower = name.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") || LOOPBACK_ALIASES.contains(&lower.as_str()) {
        return NameClass::Loopback;
    }
    NameClass::Other
}

/// The IPv4 address `inet_aton` reads from `text`: one to four parts
/// separated by dots, each decimal, octal (a leading `0`) or hexadecimal
/// (`0x`/`0X`, digits optional); the last part fills the bytes left
/// (`127.1` is 127.0.0.1, `2130706433` and `0x7f000001` are too). `None` for
/// anything else, whitespace included (host names here never hold any).
pub fn parse_inet_aton(text: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u64; 4];
    let mut count = 0;
    for part in text.split('.') {
        if count == parts.len() {
            return None;
        }
        parts[count] = parse_inet_aton_part(part)?;
        count += 1;
    }
    let (last, leading) = (parts[count - 1], &parts[..count - 1]);
    // Each leading part is one byte; the last fills the remaining ones.
    let last_max = u64::MAX >> (64 - 8 * (4 - leading.len()));
    if leading.iter().any(|&p| p > 0xff) || last > last_max {
        return None;
    }
    let value = leading.iter().enumerate().fold(last, |value, (i, &p)| value | (p << (24 - 8 * i)));
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// One part of an `inet_aton` address, or `None` if it is not one (empty,
/// a non-digit, 8 or 9 in octal, or beyond 32 bits).
fn parse_inet_aton_part(part: &str) -> Option<u64> {
    let bytes = part.as_bytes();
    let (radix, digits) = match bytes {
        [] => return None,
        [b'0', b'x' | b'X', rest @ ..] => (16, rest),
        [b'0', rest @ ..] => (8, rest),
        _ => (10, bytes),
    };
    let mut value: u64 = 0;
    for &digit in digits {
        let d = char::from(digit).to_digit(radix)?;
        value = value * u64::from(radix) + u64::from(d);
        if value > u64::from(u32::MAX) {
            return None;
        }
    }
    Some(value)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Bitcoin Core's `CNetAddr::IsRoutable`: not loopback, private (RFC 1918,
/// RFC 4193), link-local, CGNAT, documentation, benchmarking or other
/// reserved ranges. IPv6 forms that carry an IPv4 address (IPv4-mapped,
/// IPv4-compatible, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4
/// `2002::/16`, Teredo `2001::/32`) are judged by that IPv4 address, and the
/// deprecated site-local `fec0::/10` is not routable.
pub fn is_routable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_routable_v4(v4),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some(Embedded::Ipv4(v4)) => is_routable_v4(&v4),
            Some(Embedded::Unroutable) => false,
            None => is_routable_v6(v6),
        },
    }
}

fn is_routable_v4(v4: &Ipv4Addr) -> bool {
    let o = v4.octets();
    !(v4.is_unspecified()
        || v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4.is_documentation()
        || v4.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // RFC 6598 shared address space
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // RFC 2544 benchmarking
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // RFC 6890 IETF protocol assignments
        || o[0] >= 240) // RFC 1112 reserved
}

fn is_routable_v6(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    !(v6.is_unspecified()
        || v6.is_loopback()
        || v6.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // RFC 4193 unique local
        || (s[0] & 0xffc0) == 0xfe80 // RFC 4862 link-local
        || (s[0] & 0xffc0) == 0xfec0 // RFC 3879 site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // RFC 3849 documentation
        || (s[0] == 0x2001 && s[1] & 0xfff0 == 0x0010) // RFC 4843 ORCHID
        || (s[0] == 0x2001 && s[1] & 0xfff0 == 0x0020) // RFC 7343 ORCHIDv2
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0)) // RFC 6666 discard-only
}

enum Embedded {
    Ipv4(Ipv4Addr),
    /// A form that reaches an IPv4 address this host cannot judge from here.
    Unroutable,
}

/// The IPv4 address an IPv6 address carries, for the forms that route to it.
fn embedded_ipv4(v6: &Ipv6Addr) -> Option<Embedded> {
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(Embedded::Ipv4(v4));
    }
    // IPv4-compatible ::a.b.c.d (RFC 4291, deprecated); :: and ::1 are not.
    if s[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback() {
        return Some(Embedded::Ipv4(tail));
    }
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Embedded::Ipv4(tail));
    }
    // Local-use NAT64 64:ff9b:1::/48 (RFC 8215): translated inside a local network.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some(Embedded::Unroutable);
    }
    // 6to4 2002:AABB:CCDD::/48 (RFC 3056).
    if s[0] == 0x2002 {
        return Some(Embedded::Ipv4(Ipv4Addr::new(o[2], o[3], o[4], o[5])));
    }
    // Teredo 2001:0::/32 (RFC 4380): the client's address, inverted, in the last 32 bits.
    if s[0] == 0x2001 && s[1] == 0 {
        return Some(Embedded::Ipv4(Ipv4Addr::from(!u32::from(tail))));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_none_never_yields_plaintext() {
        for evidence in [
            Evidence::Untried { remembered_v1_only: false },
            Evidence::Untried { remembered_v1_only: true },
            Evidence::UpgradeFailed { remote_silent: false },
            Evidence::UpgradeFailed { remote_silent: true },
        ] {
            assert!(!matches!(plan(Fallback::None, evidence), Plan::Plaintext(_)), "{evidence:?}");
        }
    }

    #[test]
    fn early_key_waits_only_for_clients_known_to_speak_v2() {
        for passthrough in [false, true] {
            for lately in [false, true] {
                assert!(send_key_early(EarlyKey::Always, passthrough, lately));
                assert!(!send_key_early(EarlyKey::Never, passthrough, lately));
                let auto = send_key_early(EarlyKey::Auto, passthrough, lately);
                assert_eq!(auto, !(passthrough && lately), "passthrough {passthrough}, lately {lately}");
            }
        }
    }

    #[test]
    fn fallback_v1_follows_cores_rule() {
        assert!(matches!(plan(Fallback::V1, Evidence::Untried { remembered_v1_only: false }), Plan::Upgrade));
        assert!(matches!(plan(Fallback::V1, Evidence::Untried { remembered_v1_only: true }), Plan::Plaintext(_)));
        assert!(matches!(plan(Fallback::V1, Evidence::UpgradeFailed { remote_silent: true }), Plan::Plaintext(_)));
        assert!(matches!(
            plan(Fallback::V1, Evidence::UpgradeFailed { remote_silent: false }),
            Plan::Refuse(Refusal::NotV2)
        ));
        assert!(matches!(
            plan(Fallback::None, Evidence::Untried { remembered_v1_only: true }),
            Plan::Refuse(Refusal::RememberedV1Only)
        ));
    }

    #[test]
    fn only_socks5_is_protected_by_credentials() {
        let auth_only = ClientRestrictions { allow_list: false, client_auth: true };
        let allow_only = ClientRestrictions { allow_list: true, client_auth: false };
        let none = ClientRestrictions { allow_list: false, client_auth: false };
        for front in [Front::Socks5, Front::Transparent, Front::Route] {
            // Local clients and allow-listed ones: every front end.
            assert!(admits(front, true, none), "{front:?}");
            assert!(admits(front, false, allow_only), "{front:?}");
            assert!(!admits(front, false, none), "{front:?}");
        }
        assert!(admits(Front::Socks5, false, auth_only));
        assert!(!admits(Front::Transparent, false, auth_only));
        assert!(!admits(Front::Route, false, auth_only));
    }

    #[test]
    fn numeric_ipv4_spellings_are_read_as_inet_aton_reads_them() {
        let loopback = Some(Ipv4Addr::LOCALHOST);
        for text in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "0x7f000001",
            "0X7F000001",
            "2130706433",
            "017700000001",
            "0177.0.0.1",
            "0x7f.1",
            "0x7f.0.0.0x1",
            "127.0x0.0.01",
        ] {
            assert_eq!(parse_inet_aton(text), loopback, "{text}");
        }
        assert_eq!(parse_inet_aton("0"), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(parse_inet_aton("0x"), Some(Ipv4Addr::UNSPECIFIED), "glibc reads a bare 0x as 0");
        assert_eq!(parse_inet_aton("10.1.65535"), Some(Ipv4Addr::new(10, 1, 255, 255)));
        assert_eq!(parse_inet_aton("1.16777215"), Some(Ipv4Addr::new(1, 255, 255, 255)));
        assert_eq!(parse_inet_aton("4294967295"), Some(Ipv4Addr::BROADCAST));
        for text in [
            "",
            ".",
            "1..2",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.2.65536",
            "1.16777216",
            "4294967296",
            "99999999999999999999999",
            "08.1.1.1",
            "0x1g",
            "1.2.3.4 ",
            "-1",
            "+1",
            "localhost",
            "1e3",
        ] {
            assert_eq!(parse_inet_aton(text), None, "{text:?}");
        }
    }

    #[test]
    fn names_are_classified_without_dns() {
        for name in ["127.1", "127.1.", "2130706433", "0x7f000001"] {
            assert_eq!(classify_name(name), NameClass::Ipv4(Ipv4Addr::LOCALHOST), "{name}");
        }
        for name in [
            "localhost",
            "LOCALHOST",
            "localhost.",
            "a.localhost",
            "proxy.LocalHost.",
            "localhost.localdomain",
            "ip6-localhost",
            "ip6-loopback",
            "localhost6",
            "localhost4",
            "LOCALHOST4.localdomain4.",
            "ipv6-localhost",
        ] {
            assert_eq!(classify_name(name), NameClass::Loopback, "{name}");
        }
        for name in
            ["example.com", "notlocalhost", "localhost.example.com", "seed.bitcoin.sipa.be", "x.onion", "1.2.3.4.5"]
        {
            assert_eq!(classify_name(name), NameClass::Other, "{name}");
        }
    }

    #[test]
    fn names_are_checked_like_the_addresses_they_spell() {
        let strict = rules(&["127.0.0.1:1324"], false);
        let local = rules(&["127.0.0.1:1324"], true);
        for name in ["localhost", "127.1", "0x7f000001", "2130706433", "a.localhost."] {
            // Never the proxy's own port, whoever asks.
            assert!(matches!(local.check_name(name, 1324), Err(DialRefusal::SelfTarget(_))), "{name}");
            // Loopback at all only for local clients.
            assert!(matches!(strict.check_name(name, 8333), Err(DialRefusal::Private(_))), "{name}");
            assert_eq!(local.check_name(name, 8333), Ok(()), "{name}");
        }
        assert!(matches!(strict.check_name("10.1", 8333), Err(DialRefusal::Private(_))));
        assert!(matches!(local.check_name("0", 8333), Err(DialRefusal::Unspecified(_))));
        assert_eq!(strict.check_name("8.8.8.8", 8333), Ok(()));
        assert_eq!(strict.check_name("seed.example.org", 1324), Ok(()), "names only the upstream can resolve");
    }

    fn rules(listening: &[&str], allow_private: bool) -> DialRules {
        DialRules { listening: listening.iter().map(|a| a.parse().unwrap()).collect(), allow_private }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn own_listeners_in_every_spelling_are_refused() {
        let loopback = rules(&["127.0.0.1:1324", "127.0.0.1:9332"], true);
        for target in [
            "127.0.0.1:1324",
            "127.0.0.2:1324",
            "[::1]:1324",
            "[::ffff:127.0.0.1]:1324",
            "127.0.0.1:9332",
            "127.1.2.3:9332",
        ] {
            assert_eq!(loopback.check_candidate(addr(target)), Err(DialRefusal::SelfTarget(canonical(addr(target)))));
        }
        for target in ["0.0.0.0:1324", "[::]:1324", "0.0.0.0:18444", "[::ffff:0.0.0.0]:1"] {
            assert!(matches!(loopback.check_candidate(addr(target)), Err(DialRefusal::Unspecified(_))), "{target}");
        }
        assert_eq!(loopback.check_candidate(addr("127.0.0.1:18444")), Ok(()));

        let wildcard = rules(&["[::]:1324"], true);
        assert!(wildcard.check_candidate(addr("127.0.0.1:1324")).is_err());
        assert!(wildcard.check_candidate(addr("[::1]:1324")).is_err());
        // An interface address is only known to be local once connected.
        assert_eq!(wildcard.check_candidate(addr("192.0.2.10:1324")), Ok(()));
        assert_eq!(
            wildcard.check_connected(addr("192.0.2.10:1324"), addr("192.0.2.10:40000")),
            Err(DialRefusal::SelfTarget(addr("192.0.2.10:1324")))
        );
        assert_eq!(wildcard.check_connected(addr("192.0.2.10:8333"), addr("192.0.2.10:40000")), Ok(()));
        assert_eq!(wildcard.check_connected(addr("192.0.2.10:1324"), addr("192.0.2.99:40000")), Ok(()));
    }

    #[test]
    fn private_targets_need_permission() {
        let strict = rules(&["127.0.0.1:1324"], false);
        for target in ["127.0.0.1:5432", "10.0.0.5:8333", "[fe80::1]:8333", "[::ffff:192.168.1.1]:8333", "[::1]:22"] {
            assert!(matches!(strict.check_candidate(addr(target)), Err(DialRefusal::Private(_))), "{target}");
        }
        assert_eq!(strict.check_candidate(addr("8.8.8.8:8333")), Ok(()));
        // This host's own public address, reached by a remote client.
        assert!(matches!(
            strict.check_connected(addr("8.8.8.8:5432"), addr("8.8.8.8:40000")),
            Err(DialRefusal::Private(_))
        ));
        let lenient = rules(&["127.0.0.1:1324"], true);
        assert_eq!(lenient.check_candidate(addr("127.0.0.1:5432")), Ok(()));
    }

    #[test]
    fn routability() {
        for ok in ["8.8.8.8", "2a01:4f8::1", "15.61.23.23", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"] {
            assert!(is_routable(&ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.1.1",
            "127.0.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "fd00::1",
            "fe80::1",
            "::1",
            "::",
            "2001:db8::1",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "fec0::1",
            "feff::1",
            "100::1",
            // IPv4 inside IPv6.
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::808:808",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
        ] {
            assert!(!is_routable(&bad.parse().unwrap()), "{bad}");
        }
    }
}
