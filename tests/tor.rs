//! The real binary behind a real Tor daemon (Debian's `tor` 0.4.9, offline
//! on loopback, see tests/common/tor.rs): Tor's own reply codes reach the
//! client unchanged for CONNECT and RESOLVE, and each isolation policy gives
//! Tor the SOCKS credentials it promises, as Tor's control port reports them.

mod common;

use common::tor::{StreamEvent, Tor, TorControl, socks_reply_code, spawn_tor};
use common::*;

/// A well-formed v3 onion address; offline Tor holds streams to it until
/// `SocksTimeout`.
const ONION: &str = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd.onion";
/// The same address with one character changed: its checksum fails.
const BAD_CHECKSUM_ONION: &str = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryc.onion";
const CONNECT: u8 = 0x01;
const RESOLVE: u8 = 0xF0;

/// The binary with `tor` as its upstream; its configuration file is gone
/// once the binary has read it.
async fn proxy_behind(tor: &Tor, isolation: &str) -> BinaryProxy {
    let config = std::env::temp_dir().join(format!(
        "bip324-proxy-tor-{}-{:016x}.toml",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&config, format!("[upstream]\nsocks5 = \"{}\"\n{isolation}", tor.socks)).unwrap();
    let proxy = spawn_binary(&["--config", config.to_str().unwrap()], "info").await;
    let _ = std::fs::remove_file(config);
    proxy
}

/// Runs `cases` (host, Tor's expected code) concurrently, each both straight
/// to Tor and through the proxy; returns (host, Tor's code, the client's code).
async fn codes(tor: &Tor, proxy: &BinaryProxy, command: u8, cases: &[(&str, u8)]) -> Vec<(String, u8, u8)> {
    let mut tasks = Vec::new();
    for &(host, _) in cases {
        let (socks, via, host) = (tor.socks, proxy.addr, host.to_owned());
        tasks.push(tokio::spawn(async move {
            let straight = tokio::spawn({
                let host = host.clone();
                async move { socks_reply_code(socks, None, command, &host, 8333).await }
            });
            let through = match command {
                // Core-style: credentials, target as DOMAINNAME.
                CONNECT => socks_core(via, &host, 8333).await.err().unwrap_or(0x00),
                // btcd/lnd-style RESOLVE, reading the whole reply.
                _ => socks_resolve(via, &host).await.err().unwrap_or(0x00),
            };
            (host, straight.await.unwrap(), through)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test]
async fn tor_connect_failure_codes_reach_the_client_unchanged() {
    let tor = spawn_tor().await;
    let proxy = proxy_behind(&tor, "").await;
    let cases = [
        // Malformed onion names: Tor's extended 0xF6 (onion address invalid).
        ("abc.onion", 0xF6),
        (BAD_CHECKSUM_ONION, 0xF6),
        // Held until SocksTimeout: 0x06 (TTL expired).
        (ONION, 0x06),
        ("held.example", 0x06),
    ];
    for (host, from_tor, to_client) in codes(&tor, &proxy, CONNECT, &cases).await {
        let expected = cases.iter().find(|(h, _)| *h == host).unwrap().1;
        assert_eq!(from_tor, expected, "Tor itself answered CONNECT {host} with {from_tor:#04x}");
        assert_eq!(to_client, from_tor, "CONNECT {host}: Tor said {from_tor:#04x}, the client got {to_client:#04x}");
    }
}

#[tokio::test]
async fn tor_resolve_failure_codes_reach_the_client_unchanged() {
    let tor = spawn_tor().await;
    let proxy = proxy_behind(&tor, "").await;
    // Tor answers every failed RESOLVE with 0x04 and address type 0.
    let cases = [
        // Refused at once: onion names cannot be resolved.
        (ONION, 0x04),
        ("abc.onion", 0x04),
        // Held until SocksTimeout.
        ("held.example", 0x04),
    ];
    for (host, from_tor, to_client) in codes(&tor, &proxy, RESOLVE, &cases).await {
        let expected = cases.iter().find(|(h, _)| *h == host).unwrap().1;
        assert_eq!(from_tor, expected, "Tor itself answered RESOLVE {host} with {from_tor:#04x}");
        assert_eq!(to_client, from_tor, "RESOLVE {host}: Tor said {from_tor:#04x}, the client got {to_client:#04x}");
    }
}

/// A client of the proxy: Core-style with these credentials, or offering no
/// authentication at all (btcd-style, target by name).
#[derive(Clone, Copy)]
enum Client {
    Core(&'static str),
    NoAuth,
}

/// Each client CONNECTs through the proxy (under `isolation`) to its own
/// held name; returns the stream Tor reported for each, in order. Every
/// client gets Tor's 0x06 once the stream times out.
async fn streams_seen_by_tor(isolation: &str, clients: &[Client]) -> Vec<StreamEvent> {
    let tor = spawn_tor().await;
    let mut control = TorControl::connect(tor.control).await;
    control.watch_streams().await;
    let proxy = proxy_behind(&tor, isolation).await;
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let (via, host, client) = (proxy.addr, format!("client-{i}.example"), *client);
        tasks.push(tokio::spawn(async move {
            match client {
                Client::Core(credentials) => {
                    socks_named(via, credentials, &host, 8333, false).await.err().unwrap_or(0x00)
                }
                Client::NoAuth => socks_reply_code(via, None, CONNECT, &host, 8333).await,
            }
        }));
    }
    let hosts: Vec<String> = (0..clients.len()).map(|i| format!("client-{i}.example")).collect();
    let events = control.new_streams_to(&hosts).await;
    for task in tasks {
        assert_eq!(task.await.unwrap(), 0x06, "every held stream ends with Tor's TTL expired");
    }
    events
}

fn credentials(event: &StreamEvent) -> (Option<&str>, Option<&str>) {
    (event.username.as_deref(), event.password.as_deref())
}

#[tokio::test]
async fn tor_sees_each_clients_own_credentials_under_client_isolation() {
    let clients = [Client::Core("0afb2da441f5c105-0"), Client::Core("77c2f0913b6e4d8a-1"), Client::NoAuth];
    let events = streams_seen_by_tor("isolation = \"client\"\n", &clients).await;
    assert_eq!(credentials(&events[0]), (Some("0afb2da441f5c105-0"), Some("0afb2da441f5c105-0")));
    assert_eq!(credentials(&events[1]), (Some("77c2f0913b6e4d8a-1"), Some("77c2f0913b6e4d8a-1")));
    assert_eq!(credentials(&events[2]), (None, None), "a client without credentials is sent without");
}

#[tokio::test]
async fn tor_sees_fresh_credentials_per_session_under_session_isolation() {
    let same = "0afb2da441f5c105-0";
    let clients = [Client::Core(same), Client::Core(same), Client::NoAuth];
    let events = streams_seen_by_tor("isolation = \"session\"\n", &clients).await;
    let mut seen = std::collections::HashSet::new();
    for event in &events {
        let username = event.username.clone().expect("every session carries credentials");
        assert!(!username.is_empty() && username != same, "{event:?}");
        assert!(event.password.as_ref().is_some_and(|p| !p.is_empty() && p != same), "{event:?}");
        assert!(seen.insert(username), "credentials reused across sessions: {events:?}");
    }
}

#[tokio::test]
async fn tor_sees_no_credentials_under_no_isolation() {
    let clients = [Client::Core("0afb2da441f5c105-0"), Client::NoAuth];
    let events = streams_seen_by_tor("isolation = \"none\"\n", &clients).await;
    for event in &events {
        assert_eq!(credentials(event), (None, None), "{event:?}");
    }
}

#[tokio::test]
async fn tor_sees_the_configured_credentials_under_fixed_isolation() {
    let clients = [Client::Core("0afb2da441f5c105-0"), Client::NoAuth];
    let toml = "isolation = \"fixed\"\nusername = \"tor-user\"\npassword = \"tor-pass-9e2c\"\n";
    let events = streams_seen_by_tor(toml, &clients).await;
    for event in &events {
        assert_eq!(credentials(event), (Some("tor-user"), Some("tor-pass-9e2c")), "{event:?}");
    }
}
