//! Chaining behind an upstream SOCKS5 proxy: Debian's microsocks as the real
//! server, and a recording upstream to check stream isolation, names, Tor's
//! extended reply codes and RESOLVE.

mod common;

use std::collections::HashMap;

use common::*;
use tokio::io::AsyncWriteExt;

const ONION: &str = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd.onion";

fn toml_upstream(addr: std::net::SocketAddr, extra: &str) -> String {
    format!("[upstream]\nsocks5 = \"{addr}\"\n{extra}")
}

#[tokio::test]
async fn full_session_through_microsocks() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let socks = spawn_microsocks("chain-user", "chain-pass").await;
    let toml =
        toml_upstream(socks.addr, "isolation = \"fixed\"\nusername = \"chain-user\"\npassword = \"chain-pass\"\n");
    let proxy = spawn_proxy_with_file(&toml, &[]).await;
    let mut client = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    assert_eq!(expect_frame(&mut client).await.command, "version");
    client.write_all(&frame(REGTEST, "ping", &[1; 8])).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.payload, vec![1; 8]);
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn microsocks_rejecting_credentials_is_a_general_failure() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let socks = spawn_microsocks("chain-user", "chain-pass").await;
    let toml = toml_upstream(socks.addr, "isolation = \"fixed\"\nusername = \"chain-user\"\npassword = \"wrong\"\n");
    let proxy = spawn_proxy_with_file(&toml, &[]).await;
    let result = socks_core(proxy.addr, "127.0.0.1", node.addr.port()).await;
    assert_eq!(result.err(), Some(0x01));
}

#[tokio::test]
async fn client_isolation_forwards_each_clients_credentials() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let upstream = spawn_recording_upstream(UpstreamBehaviour::default()).await;
    let proxy = spawn_proxy(&["--upstream", &upstream.addr.to_string()]).await;
    for creds in ["0afb2da441f5c105-0", "77c2f0913b6e4d8a-1"] {
        let mut client = socks_named(proxy.addr, creds, "127.0.0.1", node.addr.port(), true).await.expect("CONNECT");
        client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
        assert_eq!(expect_frame(&mut client).await.command, "version");
    }
    let seen = upstream.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].methods, vec![0x02], "only username/password is offered when we have credentials");
    let creds: Vec<_> = seen.iter().map(|r| r.credentials.clone().unwrap()).collect();
    assert_eq!(creds[0], (b"0afb2da441f5c105-0".to_vec(), b"0afb2da441f5c105-0".to_vec()));
    assert_eq!(creds[1], (b"77c2f0913b6e4d8a-1".to_vec(), b"77c2f0913b6e4d8a-1".to_vec()));
    // The IP literal went upstream by name, as the client sent it.
    assert_eq!((seen[0].atyp, seen[0].host.as_str()), (0x03, "127.0.0.1"));
}

#[tokio::test]
async fn session_isolation_uses_fresh_credentials() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let upstream = spawn_recording_upstream(UpstreamBehaviour::default()).await;
    let proxy = spawn_proxy_with_file(&toml_upstream(upstream.addr, "isolation = \"session\"\n"), &[]).await;
    for _ in 0..2 {
        let mut client = socks_btcd(proxy.addr, node.addr).await.expect("CONNECT");
        client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
        expect_frame(&mut client).await;
    }
    let seen = upstream.requests.lock().unwrap().clone();
    let a = seen[0].credentials.clone().expect("credentials");
    let b = seen[1].credentials.clone().expect("credentials");
    assert_ne!(a, b);
    assert!(!a.0.is_empty());
    // btcd sent ATYP 1: it goes upstream as an address.
    assert_eq!(seen[0].atyp, 0x01);
}

#[tokio::test]
async fn no_isolation_and_fixed_credentials() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let upstream = spawn_recording_upstream(UpstreamBehaviour::default()).await;
    let none = spawn_proxy_with_file(&toml_upstream(upstream.addr, "isolation = \"none\"\n"), &[]).await;
    let mut client = open_v1_session(none.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let fixed = spawn_proxy_with_file(
        &toml_upstream(upstream.addr, "isolation = \"fixed\"\nusername = \"u1\"\npassword = \"p1\"\n"),
        &[],
    )
    .await;
    let mut client = open_v1_session(fixed.addr, node.addr, REGTEST).await;
    expect_frame(&mut client).await;
    let seen = upstream.requests.lock().unwrap().clone();
    assert_eq!((seen[0].methods.clone(), seen[0].credentials.clone()), (vec![0x00], None));
    assert_eq!(seen[1].credentials, Some((b"u1".to_vec(), b"p1".to_vec())));
}

#[tokio::test]
async fn tor_extended_reply_codes_reach_the_client() {
    let upstream = spawn_recording_upstream(UpstreamBehaviour { reply: Some(0xF1), ..Default::default() }).await;
    let proxy = spawn_proxy(&["--upstream", &upstream.addr.to_string()]).await;
    assert_eq!(socks_core(proxy.addr, ONION, 8333).await.err(), Some(0xF1));
    let odd = spawn_recording_upstream(UpstreamBehaviour { reply: Some(0x42), ..Default::default() }).await;
    let proxy2 = spawn_proxy(&["--upstream", &odd.addr.to_string()]).await;
    assert_eq!(socks_core(proxy2.addr, ONION, 8333).await.err(), Some(0x42));
    // Still serving.
    assert_eq!(socks_core(proxy.addr, ONION, 8333).await.err(), Some(0xF1));
}

#[tokio::test]
async fn onion_targets_go_upstream_by_name() {
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let mut names = HashMap::new();
    names.insert(ONION.to_owned(), node.addr);
    let upstream = spawn_recording_upstream(UpstreamBehaviour { names, ..Default::default() }).await;
    let proxy = spawn_proxy(&["--upstream", &upstream.addr.to_string(), "--upstream-route", "onion"]).await;
    let mut client = socks_core(proxy.addr, ONION, 8333).await.expect("CONNECT");
    client.write_all(&version_message(REGTEST, node.addr)).await.unwrap();
    assert_eq!(expect_frame(&mut client).await.command, "version");
    // A clearnet target goes direct under route = "onion".
    let mut direct = open_v1_session(proxy.addr, node.addr, REGTEST).await;
    expect_frame(&mut direct).await;
    let seen = upstream.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].atyp, seen[0].host.as_str(), seen[0].port), (0x03, ONION, 8333));
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn unreachable_upstream_is_a_general_failure() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = spawn_proxy(&["--upstream", &addr.to_string()]).await;
    assert_eq!(socks_core(proxy.addr, ONION, 8333).await.err(), Some(0x01));
}

#[tokio::test]
async fn resolve_without_upstream_is_local() {
    let proxy = spawn_proxy(&[]).await;
    assert_eq!(socks_resolve(proxy.addr, "localhost").await, Ok("127.0.0.1".parse().unwrap()));
    assert_eq!(socks_resolve(proxy.addr, ONION).await, Err(0x04));
}

#[tokio::test]
async fn resolve_with_upstream_is_forwarded() {
    let upstream = spawn_recording_upstream(UpstreamBehaviour {
        resolve_to: Some("10.20.30.40".parse().unwrap()),
        ..Default::default()
    })
    .await;
    let proxy = spawn_proxy(&["--upstream", &upstream.addr.to_string()]).await;
    assert_eq!(socks_resolve(proxy.addr, "seed.example.org").await, Ok("10.20.30.40".parse().unwrap()));
    let seen = upstream.requests.lock().unwrap().clone();
    assert_eq!((seen[0].command, seen[0].atyp, seen[0].host.as_str()), (0xF0, 0x03, "seed.example.org"));
}
