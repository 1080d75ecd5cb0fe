//! Pins down why fast-socks5 1.0.0 (the dependency card's plan) is not used in the shipped code:
//! each test shows one gap in fast-socks5's own behaviour, so a later version that fixes it makes
//! the test fail and tells us to revisit. Our own codec is `src/socks5.rs`; it is not exercised
//! here.
//!
//! Everything runs on 127.0.0.1 with port 0 and a timeout; the only name resolved is
//! `localhost`. The other half of gap 3 (`.onion` names go to the system resolver) is not tested
//! because showing it would send a real DNS query: fast-socks5's `TargetAddr::resolve_dns`
//! (src/util/target_addr.rs:61-77) hands every `Domain` to `tokio::net::lookup_host` with no
//! `.onion` check, and its server `Config` resolves by default (`dns_resolve: true`,
//! src/server.rs:114, used at src/server.rs:779-780).

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use fast_socks5::client::{Config as ClientConfig, Socks5Stream};
use fast_socks5::server::{DnsResolveHelper, Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, SocksError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

type BoxError = Box<dyn Error + Send + Sync>;

/// Upper bound for any one test; everything is loopback, so this only trips on a hang.
const TEST_LIMIT: Duration = Duration::from_secs(10);

/// What Bitcoin Core's -proxyrandomize sends as both username and password.
const PROXYRANDOMIZE_USER: &[u8] = b"0afb2da441f5c105-0";

/// A well-formed v3 onion name; the fake upstream never resolves or dials it.
const ONION_V3: &str = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";

async fn loopback_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// Reads until the peer closes (EOF or reset) and returns whatever arrived before that.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
}

fn domain_connect(domain: &[u8], port: u16) -> Vec<u8> {
    let len = u8::try_from(domain.len()).expect("short name");
    let mut request = vec![0x05, 0x01, 0x00, 0x03, len];
    request.extend_from_slice(domain);
    request.extend_from_slice(&port.to_be_bytes());
    request
}

/// Runs fast-socks5's password-auth server on one connection, sends `auth` as the client and
/// returns the server's error and every byte it wrote after the method choice.
async fn password_auth_attempt(auth: &[u8]) -> (SocksServerError, Vec<u8>) {
    let (listener, addr) = loopback_listener().await;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        // Accept any credentials: the check must not be what fails.
        Socks5ServerProtocol::accept_password_auth(stream, |_user: String, _pass: String| true).await.map(|_| ())
    });

    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&[0x05, 0x01, 0x02]).await.expect("greet");
    let mut choice = [0u8; 2];
    client.read_exact(&mut choice).await.expect("method choice");
    assert_eq!(choice, [0x05, 0x02], "server picks username/password");
    client.write_all(auth).await.expect("send credentials");

    let error = server.await.expect("server task").expect_err("fast-socks5 1.0.0 refuses the empty field");
    (error, read_until_closed(&mut client).await)
}

/// Gap 1a: RFC 1929 empty password. fast-socks5 1.0.0's server returns `EmptyPassword`
/// (src/server.rs:590-592) and closes without the `01 01` status the RFC requires, so a JDK
/// client (which sends an empty password) sees the connection drop. A conforming server answers
/// at least `01 01`; we accept the empty password.
#[tokio::test]
async fn gap1_server_drops_empty_password_without_reply() {
    timeout(TEST_LIMIT, async {
        let mut auth = vec![0x01, 18];
        auth.extend_from_slice(PROXYRANDOMIZE_USER);
        auth.push(0x00);
        let (error, reply) = password_auth_attempt(&auth).await;
        assert!(matches!(error, SocksServerError::EmptyPassword), "{error:?}");
        assert_eq!(reply, Vec::<u8>::new(), "no RFC 1929 status was sent");
    })
    .await
    .expect("test timed out");
}

/// Gap 1b: RFC 1929 empty username. Same as 1a through `EmptyUsername`
/// (src/server.rs:579-581): no status byte, just a closed connection.
#[tokio::test]
async fn gap1_server_drops_empty_username_without_reply() {
    timeout(TEST_LIMIT, async {
        let (error, reply) = password_auth_attempt(&[0x01, 0x00, 0x00]).await;
        assert!(matches!(error, SocksServerError::EmptyUsername), "{error:?}");
        assert_eq!(reply, Vec::<u8>::new(), "no RFC 1929 status was sent");
    })
    .await
    .expect("test timed out");
}

/// Runs fast-socks5's no-auth server on one connection, sends `request` and returns the target
/// its `read_command` produced, optionally after its `resolve_dns` step (as its
/// examples/server.rs does).
async fn server_target(request: Vec<u8>, resolve: bool) -> TargetAddr {
    let (listener, addr) = loopback_listener().await;
    let server: JoinHandle<Result<TargetAddr, BoxError>> = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let proto = Socks5ServerProtocol::accept_no_auth(stream).await?;
        let command = proto.read_command().await?;
        let (_proto, _command, target) = if resolve { command.resolve_dns().await? } else { command };
        Ok(target)
    });

    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&[0x05, 0x01, 0x00]).await.expect("greet");
    let mut choice = [0u8; 2];
    client.read_exact(&mut choice).await.expect("method choice");
    assert_eq!(choice, [0x05, 0x00]);
    client.write_all(&request).await.expect("request");
    server.await.expect("server task").expect("server flow")
}

/// Gap 2: IP literals sent as DOMAINNAME (ATYP 3), which is how Bitcoin Core and btcd send every
/// destination, stay `TargetAddr::Domain` in fast-socks5 1.0.0's `read_command`
/// (src/util/target_addr.rs:246-256, 273). They only become addresses by going through its DNS
/// path (`resolve_dns`), which a Tor-bound proxy must turn off; we parse them into `Host::Ip`.
#[tokio::test]
async fn gap2_server_keeps_ip_literal_domainnames_as_names() {
    timeout(TEST_LIMIT, async {
        for literal in ["127.0.0.1", "1233:3432:2434:2343:3234:2345:6546:4534"] {
            let target = server_target(domain_connect(literal.as_bytes(), 8333), false).await;
            assert_eq!(target, TargetAddr::Domain(literal.to_owned(), 8333));
            assert!(target.is_domain(), "{literal} was kept as a name");
        }
    })
    .await
    .expect("test timed out");
}

/// Gap 3: fast-socks5 1.0.0 resolves a name to one address only. Its `resolve_dns` keeps the
/// first result of `lookup_host` (src/util/target_addr.rs:67-71) and `run_tcp_proxy` dials one
/// `SocketAddr` (src/server.rs:1062-1070), so a seed or peer name whose first address is down
/// fails although others would answer. Shown with `localhost`: the server's target is exactly
/// the first address the system returns. (The `.onion` half is in this file's header.)
#[tokio::test]
async fn gap3_server_resolves_only_the_first_address() {
    timeout(TEST_LIMIT, async {
        let port = 8333;
        let all: Vec<SocketAddr> =
            tokio::net::lookup_host(("localhost", port)).await.expect("resolve localhost").collect();
        let first = *all.first().expect("localhost has an address");

        let target = server_target(domain_connect(b"localhost", port), true).await;
        // One address, and a type that cannot hold more: every other entry of `all` is gone.
        assert_eq!(target, TargetAddr::Ip(first), "all addresses: {all:?}");
    })
    .await
    .expect("test timed out");
}

/// A fake upstream SOCKS5 server on 127.0.0.1:0 that accepts no-auth, reads one ATYP 3 request
/// and answers with reply code `code`, then waits for the client to go away.
async fn fake_upstream(code: u8) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let (listener, addr) = loopback_listener().await;
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut greeting = [0u8; 3];
        stream.read_exact(&mut greeting).await?;
        assert_eq!(greeting, [0x05, 0x01, 0x00], "fast-socks5 offers no-auth");
        stream.write_all(&[0x05, 0x00]).await?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await?;
        assert_eq!(head.get(..4), Some([0x05, 0x01, 0x00, 0x03].as_slice()));
        let mut rest = vec![0u8; usize::from(head[4]) + 2];
        stream.read_exact(&mut rest).await?;
        stream.write_all(&[0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0]).await?;
        let _ = read_until_closed(&mut stream).await;
        Ok(())
    });
    (addr, task)
}

/// Connects fast-socks5 1.0.0's client through a fake upstream answering `code`, inside a
/// spawned task so a panic is caught by the runtime and returned as a `JoinError`.
async fn client_through_upstream(code: u8) -> Result<Result<(), SocksError>, tokio::task::JoinError> {
    let (upstream_addr, upstream) = fake_upstream(code).await;
    let outcome = tokio::spawn(async move {
        Socks5Stream::connect(upstream_addr, ONION_V3.to_owned(), 8333, ClientConfig::default()).await.map(|_| ())
    })
    .await;
    upstream.await.expect("upstream task").expect("upstream i/o");
    outcome
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        String::from("<non-string panic payload>")
    }
}

/// Gap 4: fast-socks5 1.0.0's client panics on reply codes outside 0x00..=0x08, such as Tor's
/// extended onion-service errors (0xF1 "descriptor is invalid") or an unassigned 0x09:
/// `ReplyError::from_u8` ends in `unreachable!("ReplyError code unsupported.")` (src/lib.rs:274,
/// called from src/client.rs:363). In a proxy that panic would kill the session task instead of
/// becoming a SOCKS reply to the client. The panic message printed while this test runs is
/// expected. A known code (0x05) is checked too, to pin the boundary.
#[tokio::test]
async fn gap4_client_panics_on_reply_codes_outside_rfc1928() {
    timeout(TEST_LIMIT, async {
        for code in [0xF1u8, 0x09] {
            let outcome = client_through_upstream(code).await;
            let join_error = outcome.expect_err("fast-socks5 1.0.0 panics");
            assert!(join_error.is_panic(), "code {code:#04x}: {join_error:?}");
            let message = panic_message(join_error.into_panic().as_ref());
            assert!(message.contains("ReplyError code unsupported"), "code {code:#04x}: {message}");
        }

        let refused = client_through_upstream(0x05).await.expect("no panic for 0x05");
        assert!(matches!(refused, Err(SocksError::ReplyError(ReplyError::ConnectionRefused))), "{refused:?}");
    })
    .await
    .expect("test timed out");
}

/// Gap 5: Tor's RESOLVE (command 0xF0, which btcd and lnd use for DNS seeds) never reaches code
/// built on fast-socks5 1.0.0's server: `read_command` answers it with 0x07 (command not
/// supported) itself, inside the call (its `try_notify!` on `Socks5Command::from_u8`), and only
/// then returns an error. We forward RESOLVE upstream or answer it.
#[tokio::test]
async fn gap5_server_answers_tor_resolve_with_07_before_the_caller_sees_it() {
    timeout(TEST_LIMIT, async {
        let (listener, addr) = loopback_listener().await;
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let proto = Socks5ServerProtocol::accept_no_auth(stream).await.expect("no-auth greeting");
            proto.read_command().await.map(|_| ())
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&[0x05, 0x01, 0x00]).await.expect("greet");
        let mut choice = [0u8; 2];
        client.read_exact(&mut choice).await.expect("method choice");
        let mut resolve = domain_connect(b"seed.bitcoin.sipa.be", 0);
        resolve[1] = 0xf0;
        client.write_all(&resolve).await.expect("RESOLVE");
        let error = server.await.expect("server task").expect_err("fast-socks5 refuses RESOLVE");
        assert!(matches!(error, SocksServerError::UnknownCommand(0xf0)), "{error:?}");
        let answer = read_until_closed(&mut client).await;
        assert_eq!(answer.get(..2), Some(&[0x05, 0x07][..]), "answered before the caller could: {answer:02x?}");
    })
    .await
    .expect("test timed out");
}

/// Gap 6: a server built on fast-socks5 1.0.0 cannot pass Tor's extended reply codes
/// (0xF0..0xF7, e.g. 0xF6 for a bad onion address) back to its client: `reply_error` takes the
/// closed `ReplyError` enum, whose every variant maps to an RFC 1928 code. The exhaustive match
/// stops compiling when a variant is added (for instance the commented-out `OtherReply(u8)`).
#[test]
fn gap6_reply_error_cannot_carry_tor_reply_codes() {
    let every = [
        ReplyError::Succeeded,
        ReplyError::GeneralFailure,
        ReplyError::ConnectionNotAllowed,
        ReplyError::NetworkUnreachable,
        ReplyError::HostUnreachable,
        ReplyError::ConnectionRefused,
        ReplyError::ConnectionTimeout,
        ReplyError::TtlExpired,
        ReplyError::CommandNotSupported,
        ReplyError::AddressTypeNotSupported,
    ];
    for error in every {
        let code = match error {
            ReplyError::Succeeded
            | ReplyError::GeneralFailure
            | ReplyError::ConnectionNotAllowed
            | ReplyError::NetworkUnreachable
            | ReplyError::HostUnreachable
            | ReplyError::ConnectionRefused
            | ReplyError::ConnectionTimeout
            | ReplyError::TtlExpired
            | ReplyError::CommandNotSupported
            | ReplyError::AddressTypeNotSupported => error.as_u8(),
        };
        assert!(code <= 0x08, "{error:?} maps to {code:#04x}");
    }
}
