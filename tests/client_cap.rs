//! The per-client session cap: one client address cannot take every session
//! slot, its slots come back when its sessions end, and every refusal is
//! counted by reason.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bip324_proxy::config::{Cli, Config};
use bip324_proxy::metrics::Observer;
use bip324_proxy::server::{Bound, serve};
use bip324_proxy::session::FrontEnd;
use bip324_proxy::state::ProxyState;
use clap::Parser;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// The library entry point with these flags; returns its address and observer.
async fn proxy(args: &[&str]) -> (SocketAddr, Arc<Observer>, CancellationToken) {
    let mut all = vec!["bip324-proxy"];
    all.extend_from_slice(args);
    let config = Config::load(&Cli::try_parse_from(all).unwrap()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let observer = Arc::new(Observer::default());
    let context = Arc::new(ProxyState::new(Arc::new(config), observer.clone()));
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(vec![Bound { listener: listener.into(), front: FrontEnd::Main }], context, shutdown.clone()));
    (addr, observer, shutdown)
}

/// A v1 session from `source` (a 127.0.0.0/8 address): SOCKS5 no-auth
/// CONNECT to `target`, then VERSION; `None` when the proxy closes instead.
async fn session_from(source: &str, proxy: SocketAddr, target: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    // A refused connection is closed at accept: the greeting may already fail.
    if s.write_all(&[0x05, 0x01, 0x00]).await.is_err() {
        return None;
    }
    let mut choice = [0u8; 2];
    match tokio::time::timeout(WAIT, s.read_exact(&mut choice)).await.expect("greeting answered or closed") {
        Ok(_) => assert_eq!(choice, [0x05, 0x00]),
        Err(_) => return None,
    }
    let SocketAddr::V4(v4) = target else { panic!("IPv4 target") };
    let mut request = vec![0x05, 0x01, 0x00, 0x01];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&request).await.unwrap();
    let s = read_reply(s).await.expect("CONNECT succeeds");
    let mut s = s;
    s.write_all(&version_message(REGTEST, target)).await.unwrap();
    assert_eq!(expect_frame(&mut s).await.command, "version");
    Some(s)
}

async fn wait_for_active(observer: &Observer, n: usize) {
    for _ in 0..400 {
        if observer.status().open_sessions == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("open sessions never reached {n}: {}", observer.status().open_sessions);
}

#[tokio::test]
async fn one_client_address_cannot_take_every_slot() {
    let v2 = spawn_v2_node(V2NodeOptions::default()).await;
    let (addr, observer, _shutdown) = proxy(&["--max-sessions", "8", "--max-sessions-per-client", "3"]).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(session_from("127.0.0.1", addr, v2.addr).await.expect("within the per-client cap"));
    }
    assert!(session_from("127.0.0.1", addr, v2.addr).await.is_none(), "a 4th session from 127.0.0.1 was served");
    // Another address still gets a slot.
    let other = session_from("127.0.0.2", addr, v2.addr).await.expect("another client is served");
    let text = observer.encode_metrics();
    assert!(text.lines().any(|l| l == "bip324_proxy_connections_refused_total{reason=\"client_limit\"} 1"), "{text}");
    // A finished session gives its slot back.
    drop(mine.pop());
    wait_for_active(&observer, 3).await;
    let again = session_from("127.0.0.1", addr, v2.addr).await.expect("slot released at session end");
    drop((mine, other, again));
    wait_for_active(&observer, 0).await;
}

#[tokio::test]
async fn per_client_cap_defaults_to_a_quarter_of_max_sessions_but_at_least_32() {
    let load = |args: &[&str]| {
        let mut all = vec!["bip324-proxy"];
        all.extend_from_slice(args);
        Config::load(&Cli::try_parse_from(all).unwrap())
    };
    assert_eq!(load(&[]).unwrap().max_sessions_per_client, 128);
    assert_eq!(load(&["--max-sessions", "200"]).unwrap().max_sessions_per_client, 50);
    assert_eq!(load(&["--max-sessions", "64"]).unwrap().max_sessions_per_client, 32);
    assert_eq!(load(&["--max-sessions", "10"]).unwrap().max_sessions_per_client, 10);
    let err = load(&["--max-sessions", "10", "--max-sessions-per-client", "11"]).unwrap_err();
    assert!(err.0.contains("max_sessions_per_client"), "{err}");
    let err = load(&["--max-sessions-per-client", "0"]).unwrap_err();
    assert!(err.0.contains("max_sessions_per_client"), "{err}");
}
