//! Dial a [`Destination`]: directly (every A/AAAA record of a hostname tried
//! in turn, each attempt bounded by the connect timeout) or through an
//! upstream SOCKS5 proxy such as Tor, by name, with the session's
//! credentials. `.onion` names and targets that go upstream are never handed
//! to the system resolver. Also answers Tor's RESOLVE extension.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::{Config, Upstream};
use crate::policy::{DialRefusal, DialRules};
use crate::socks5::{self, Command, Credentials, Host, ReplyCode, Socks5Error, Target};

/// Bitcoin Core waits 20 s for a SOCKS5 reply; a dial that has not finished
/// by then helps nobody, however many addresses are left to try.
pub const DIAL_DEADLINE: Duration = Duration::from_secs(19);

/// Where a session goes, and how it identifies itself upstream.
#[derive(Debug, Clone)]
pub struct Destination {
    pub target: Target,
    /// The client's DOMAINNAME as sent, when it sent one (even an IP
    /// literal): upstream targets go by name, exactly as given.
    pub name: Option<String>,
    /// Credentials for the upstream proxy (stream isolation).
    pub upstream_credentials: Option<Credentials>,
}

impl Destination {
    /// The target as the client named it (`host:port`), for logs, the
    /// status page and the v1-only memory.
    ///
    /// An IP literal is shown in its one canonical form however the client
    /// spelled it (bracketed, IPv4-mapped, as a name), so the log, the status
    /// page and the memory see one target, not several.
    pub fn shown(&self) -> String {
        match (&self.name, &self.target.host) {
            (Some(name), Host::Name(_)) => format!("{name}:{}", self.target.port),
            (_, Host::Ip(ip)) => SocketAddr::new(ip.to_canonical(), self.target.port).to_string(),
            (None, Host::Name(_)) => self.target.to_string(),
        }
    }
}

/// Why a dial failed; `session.rs` maps each to a SOCKS5 reply code.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("`{0}` is an onion service; reaching it needs an upstream proxy such as Tor")]
    OnionNeedsUpstream(String),
    #[error("resolving `{name}`: {source}")]
    Resolve { name: String, source: io::Error },
    #[error("`{0}` resolved to no address")]
    NoAddresses(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {addr}: timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("upstream proxy {upstream} unreachable: {reason}")]
    UpstreamUnreachable { upstream: String, reason: Box<DialError> },
    #[error("upstream proxy {upstream} refused `{target}`: {code}")]
    UpstreamRefused { upstream: String, target: String, code: ReplyCode },
    #[error("upstream proxy {upstream}: {reason}")]
    UpstreamProtocol { upstream: String, reason: String },
    #[error("upstream proxy {upstream} timed out")]
    UpstreamTimeout { upstream: String },
    #[error("refusing to connect: {0}")]
    Refused(#[from] DialRefusal),
}

/// Connects to the destination, through the upstream when the configuration
/// routes it there, never to an address `rules` refuses. TCP_NODELAY is set
/// (without it every handshake round trip can stall on delayed ACKs).
///
/// Directly dialed targets are checked after resolution, every candidate,
/// before and after connecting. A target that goes upstream by name is
/// resolved by the upstream; it is checked here as far as it can be without
/// DNS: an IP literal, a numeric IPv4 spelling (`127.1`, `0x7f000001`) and a
/// loopback name (`localhost`, `*.localhost`) as the addresses they name.
pub async fn dial(destination: &Destination, config: &Config, rules: &DialRules) -> Result<TcpStream, DialError> {
    match &config.upstream {
        Some(upstream) if upstream.carries(&destination.target) => {
            check_before_upstream(&destination.target, rules)?;
            let request = UpstreamRequest::new(Command::Connect, destination);
            let (stream, _) = through_upstream(upstream, &request, config.timeouts.connect, rules).await?;
            Ok(stream)
        }
        _ => dial_direct(&destination.target, config.timeouts.connect, rules).await,
    }
}

/// What can be checked of a target before it goes upstream unresolved.
fn check_before_upstream(target: &Target, rules: &DialRules) -> Result<(), DialRefusal> {
    match &target.host {
        Host::Ip(ip) => rules.check_candidate(SocketAddr::new(*ip, target.port)),
        Host::Name(name) => rules.check_name(name, target.port),
    }
}

/// Tor's RESOLVE (command 0xF0), as btcd and lnd use it for DNS seeds:
/// forwarded to the upstream when one carries the name, else resolved here.
pub async fn resolve(destination: &Destination, config: &Config, rules: &DialRules) -> Result<IpAddr, DialError> {
    match &config.upstream {
        Some(upstream) if upstream.carries(&destination.target) => {
            let request = UpstreamRequest::new(Command::Resolve, destination);
            let (_, reply) = through_upstream(upstream, &request, config.timeouts.connect, rules).await?;
            match reply.bound.host {
                Host::Ip(ip) => Ok(ip),
                Host::Name(_) => Err(DialError::UpstreamProtocol {
                    upstream: upstream.addr.to_string(),
                    reason: "RESOLVE reply carries a name, not an address".into(),
                }),
            }
        }
        _ => {
            let deadline = Instant::now() + DIAL_DEADLINE;
            let addrs = resolve_locally(&destination.target, deadline).await?;
            // One IPv4 address, as Tor answers; IPv6 only when there is none.
            addrs
                .iter()
                .map(SocketAddr::ip)
                .find(IpAddr::is_ipv4)
                .or_else(|| addrs.first().map(SocketAddr::ip))
                .ok_or_else(|| DialError::NoAddresses(destination.target.to_string()))
        }
    }
}

/// Direct TCP to every address of `target` in turn that `rules` allow.
pub async fn dial_direct(
    target: &Target,
    connect_timeout: Duration,
    rules: &DialRules,
) -> Result<TcpStream, DialError> {
    let deadline = Instant::now() + DIAL_DEADLINE;
    let addrs = resolve_locally(target, deadline).await?;
    let mut last_error = None;
    for addr in addrs {
        if let Err(refusal) = rules.check_candidate(addr) {
            last_error = Some(DialError::Refused(refusal));
            continue;
        }
        let attempt_deadline = deadline.min(Instant::now() + connect_timeout);
        match timeout_at(attempt_deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let checked = match (stream.peer_addr(), stream.local_addr()) {
                    (Ok(peer), Ok(local)) => rules.check_connected(peer, local).map_err(DialError::Refused),
                    (Err(source), _) | (_, Err(source)) => Err(DialError::Connect { addr, source }),
                };
                match checked {
                    Ok(()) => {
                        // Failing to set NODELAY only costs latency.
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Err(error) => last_error = Some(error),
                }
            }
            Ok(Err(source)) => last_error = Some(DialError::Connect { addr, source }),
            Err(_) => last_error = Some(DialError::ConnectTimeout { addr }),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(last_error.unwrap_or_else(|| DialError::NoAddresses(target.to_string())))
}

async fn resolve_locally(target: &Target, deadline: Instant) -> Result<Vec<SocketAddr>, DialError> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(_) if target.is_onion() => Err(DialError::OnionNeedsUpstream(target.to_string())),
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), target.port));
            let remaining = deadline.saturating_duration_since(Instant::now());
            let addrs: Vec<SocketAddr> = match timeout(remaining, lookup).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(source)) => return Err(DialError::Resolve { name: name.clone(), source }),
                Err(_) => {
                    return Err(DialError::Resolve {
                        name: name.clone(),
                        source: io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"),
                    });
                }
            };
            if addrs.is_empty() {
                return Err(DialError::NoAddresses(name.clone()));
            }
            Ok(addrs)
        }
    }
}

/// What to ask the upstream for.
struct UpstreamRequest<'a> {
    command: Command,
    destination: &'a Destination,
}

impl<'a> UpstreamRequest<'a> {
    fn new(command: Command, destination: &'a Destination) -> Self {
        UpstreamRequest { command, destination }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
        let target = &self.destination.target;
        match &self.destination.name {
            Some(name) => socks5::encode_request_by_name(self.command, name, target.port, out),
            None => socks5::encode_request(self.command, target, out),
        }
    }
}

/// Connects to the upstream, negotiates, sends the request and reads the
/// reply; the whole exchange is bounded by [`DIAL_DEADLINE`].
async fn through_upstream(
    upstream: &Upstream,
    request: &UpstreamRequest<'_>,
    connect_timeout: Duration,
    rules: &DialRules,
) -> Result<(TcpStream, socks5::Reply), DialError> {
    let name = upstream.addr.to_string();
    // The upstream is the operator's own choice and usually on loopback;
    // only this proxy's own listeners are off limits.
    let rules = DialRules { listening: rules.listening.clone(), allow_private: true };
    let mut stream = dial_direct(&upstream.addr, connect_timeout, &rules)
        .await
        .map_err(|reason| DialError::UpstreamUnreachable { upstream: name.clone(), reason: Box::new(reason) })?;
    let exchange = negotiate_upstream(&mut stream, &name, request);
    match timeout(DIAL_DEADLINE, exchange).await {
        Ok(Ok(reply)) => Ok((stream, reply)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DialError::UpstreamTimeout { upstream: name }),
    }
}

async fn negotiate_upstream(
    stream: &mut TcpStream,
    upstream: &str,
    request: &UpstreamRequest<'_>,
) -> Result<socks5::Reply, DialError> {
    let protocol = |reason: String| DialError::UpstreamProtocol { upstream: upstream.to_owned(), reason };
    let io_error = |e: io::Error| protocol(format!("connection failed: {e}"));
    let mut out = Vec::with_capacity(600);
    let mut input = BytesMut::with_capacity(512);

    // Offer exactly one method: credentials when the session has them, so
    // Tor cannot pick no-auth and merge this stream with others.
    let credentials = request.destination.upstream_credentials.as_ref();
    let method = if credentials.is_some() { socks5::METHOD_USER_PASS } else { socks5::METHOD_NO_AUTH };
    socks5::encode_greeting(&[method], &mut out);
    stream.write_all(&out).await.map_err(io_error)?;
    let chosen = read_decoded(stream, &mut input, socks5::decode_method_choice).await.map_err(&protocol)?;
    if chosen != method {
        return Err(protocol(format!("chose SOCKS5 method {chosen:#04x}, we offered {method:#04x}")));
    }
    if let Some(credentials) = credentials {
        out.clear();
        socks5::encode_auth(credentials, &mut out).map_err(|e| protocol(e.to_string()))?;
        stream.write_all(&out).await.map_err(io_error)?;
        let accepted = read_decoded(stream, &mut input, socks5::decode_auth_status).await.map_err(&protocol)?;
        if !accepted {
            return Err(protocol("rejected our credentials".into()));
        }
    }

    out.clear();
    request.encode(&mut out).map_err(|e| protocol(e.to_string()))?;
    stream.write_all(&out).await.map_err(io_error)?;
    // The reply code is final as soon as it arrives. A failed reply's bound
    // address means nothing and is neither waited for nor parsed (Tor's
    // failed RESOLVE replies carry address type 0): the upstream's code,
    // whatever it is, goes back to the client unchanged.
    let code = read_decoded(stream, &mut input, peek_reply_code).await.map_err(&protocol)?;
    if code != ReplyCode::SUCCEEDED {
        let target = request.destination.name.clone().unwrap_or_else(|| request.destination.target.to_string());
        return Err(DialError::UpstreamRefused { upstream: upstream.to_owned(), target, code });
    }
    let reply = read_decoded(stream, &mut input, socks5::decode_reply).await.map_err(&protocol)?;
    if !input.is_empty() {
        return Err(protocol("sent data after its reply, before the remote could".into()));
    }
    Ok(reply)
}

/// The code of a reply (`05 REP ...`) from its first two bytes, consuming
/// nothing, so that the whole reply can still be decoded after it.
fn peek_reply_code(buf: &[u8]) -> Result<Option<(ReplyCode, usize)>, Socks5Error> {
    match buf {
        [] | [_] => Ok(None),
        [socks5::SOCKS_VERSION, code, ..] => Ok(Some((ReplyCode(*code), 0))),
        [version, ..] => Err(Socks5Error::BadVersion(*version)),
    }
}

/// A `socks5::decode_*` function: a value and the bytes it used, or "need more".
type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>;

/// Reads until `decode` yields a value; consumes exactly its bytes.
async fn read_decoded<T>(stream: &mut TcpStream, input: &mut BytesMut, decode: Decoder<T>) -> Result<T, String> {
    loop {
        if let Some((value, used)) = decode(input).map_err(|e| e.to_string())? {
            input.advance(used);
            return Ok(value);
        }
        input.reserve(512);
        match stream.read_buf(input).await {
            Ok(0) => return Err("closed the connection during negotiation".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clap::Parser;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Cli;

    /// What a scripted upstream sends after `05 REP`.
    #[derive(Debug, Clone, Copy)]
    enum Tail {
        /// A well-formed IPv4 bound address.
        Ipv4,
        /// Address type 0 and six zero bytes, as Tor answers a failed RESOLVE.
        TorResolveFailure,
        /// An address type no SOCKS5 version defines.
        UnknownAddressType,
        /// Nothing: the upstream closes.
        Close,
        /// Nothing: the upstream stays silent and keeps the connection.
        Hold,
    }

    /// A SOCKS5 upstream on 127.0.0.1:0 that accepts no-auth, reads one
    /// request and answers `05 code` then `tail`, for each (code, tail) in
    /// turn, one per connection.
    async fn scripted_upstream(script: Vec<(u8, Tail)>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for (code, tail) in script {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut greeting = [0u8; 3];
                let _ = s.read_exact(&mut greeting).await;
                let _ = s.write_all(&[0x05, 0x00]).await;
                // 05 CMD 00 03 LEN NAME PORT
                let mut head = [0u8; 5];
                let _ = s.read_exact(&mut head).await;
                let mut rest = vec![0u8; usize::from(head[4]) + 2];
                let _ = s.read_exact(&mut rest).await;
                let mut reply = vec![0x05, code];
                match tail {
                    Tail::Ipv4 => reply.extend_from_slice(&[0x00, 0x01, 0, 0, 0, 0, 0, 0]),
                    Tail::TorResolveFailure => reply.extend_from_slice(&[0x00, 0x00, 0, 0, 0, 0, 0, 0]),
                    Tail::UnknownAddressType => reply.extend_from_slice(&[0x00, 0x09, 1, 2, 3]),
                    Tail::Close | Tail::Hold => {}
                }
                let _ = s.write_all(&reply).await;
                if let Tail::Hold = tail {
                    tokio::spawn(async move {
                        let mut sink = [0u8; 16];
                        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                }
            }
        });
        addr
    }

    fn config_with_upstream(upstream: SocketAddr) -> Config {
        let upstream = upstream.to_string();
        let cli = Cli::try_parse_from(["bip324-proxy", "--upstream", upstream.as_str()]).unwrap();
        Config::load(&cli).unwrap()
    }

    fn destination() -> Destination {
        let target = Target { host: Host::Name("seed.example".into()), port: 8333 };
        Destination { target, name: Some("seed.example".into()), upstream_credentials: None }
    }

    /// Every failure code 0x01..=0xFF the upstream sends, Tor's 0xF0..=0xF7
    /// and unknown ones included, comes back as that code for CONNECT and for
    /// RESOLVE, whatever follows it: the bound address of a failed reply
    /// means nothing and is not waited for or parsed.
    #[tokio::test]
    async fn every_upstream_failure_code_is_returned_unchanged() {
        let tails = [Tail::Ipv4, Tail::TorResolveFailure, Tail::UnknownAddressType, Tail::Close, Tail::Hold];
        for command in [Command::Connect, Command::Resolve] {
            let script: Vec<(u8, Tail)> =
                (0x01..=0xFF).flat_map(|code| tails.iter().map(move |tail| (code, *tail))).collect();
            let config = Arc::new(config_with_upstream(scripted_upstream(script.clone()).await));
            for (code, tail) in script {
                let attempt = async {
                    match command {
                        Command::Resolve => resolve(&destination(), &config, &DialRules::default()).await.map(|_| ()),
                        _ => dial(&destination(), &config, &DialRules::default()).await.map(|_| ()),
                    }
                };
                let result = timeout(Duration::from_secs(2), attempt).await;
                match result {
                    Ok(Err(DialError::UpstreamRefused { code: got, .. })) => {
                        assert_eq!(got, ReplyCode(code), "{command:?} {tail:?}")
                    }
                    other => panic!("{command:?} code {code:#04x} then {tail:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn reply_code_is_read_from_two_bytes_without_consuming() {
        assert_eq!(peek_reply_code(&[]), Ok(None));
        assert_eq!(peek_reply_code(&[0x05]), Ok(None));
        assert_eq!(peek_reply_code(&[0x05, 0xF6]), Ok(Some((ReplyCode(0xF6), 0))));
        assert_eq!(peek_reply_code(&[0x05, 0x00, 0x00, 0x01]), Ok(Some((ReplyCode::SUCCEEDED, 0))));
        assert_eq!(peek_reply_code(&[0x04, 0x5A]), Err(Socks5Error::BadVersion(0x04)));
    }

    #[test]
    fn ip_literals_are_shown_in_one_canonical_form() {
        let shown = |name: Option<&str>, host: Host| {
            Destination { target: Target::new(host, 8333), name: name.map(str::to_owned), upstream_credentials: None }
                .shown()
        };
        let v6 = Host::Ip("::1".parse().unwrap());
        assert_eq!(shown(Some("[::1]"), v6.clone()), "[::1]:8333");
        assert_eq!(shown(Some("::1"), v6.clone()), "[::1]:8333");
        assert_eq!(shown(None, v6), "[::1]:8333");
        assert_eq!(shown(Some("::ffff:1.2.3.4"), Host::Ip("::ffff:1.2.3.4".parse().unwrap())), "1.2.3.4:8333");
        assert_eq!(shown(Some("node.example.org"), Host::Name("node.example.org".into())), "node.example.org:8333");
    }
}
