//! What a child process runs: the proxy, the plain relay, or the echo nodes.
//! Each binds loopback port 0, prints `ready ADDR...` on stdout and serves
//! on a multi-thread runtime (one worker per core, as `#[tokio::main]` gives
//! the proxy's own binary) until the parent kills it or closes its stdin.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bip324_proxy::config::{Cli, Config};
use bip324_proxy::metrics::Observer;
use bip324_proxy::server::Bound;
use bip324_proxy::session::FrontEnd;
use bip324_proxy::socks5::{self, Host, ReplyCode, Target};
use bip324_proxy::state::ProxyState;
use bytes::BytesMut;
use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::children::{self, Role};
use crate::client::read_decoded;
use crate::{MAGIC, nodes};

/// Runs `role` until the process is ended from outside.
pub fn run(role: Role, target: Option<SocketAddr>, max_sessions: usize, proxy_flags: &[String]) -> anyhow::Result<()> {
    children::exit_with_parent();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        match role {
            Role::Proxy => run_proxy(max_sessions, proxy_flags).await,
            Role::Relay => run_relay(target.context("--role relay needs --target")?).await,
            Role::Nodes => run_nodes().await,
        }
    })
}

/// The proxy with its default configuration, except the session cap (the
/// idle-memory case opens thousands), its metrics listener (the key pool's
/// counters) and any `--proxy-flag`s. Announces the proxy's address, then
/// the metrics address. No tracing subscriber is installed, so log lines
/// cost only their level check.
async fn run_proxy(max_sessions: usize, proxy_flags: &[String]) -> anyhow::Result<()> {
    let max_sessions = max_sessions.to_string();
    let mut flags = vec!["bip324-proxy", "--max-sessions", &max_sessions, "--metrics-listen", "127.0.0.1:0"];
    flags.extend(proxy_flags.iter().map(String::as_str));
    let cli = Cli::try_parse_from(flags).context("proxy flags")?;
    let config = Arc::new(Config::load(&cli).context("proxy configuration")?);
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
    let metrics = TcpListener::bind("127.0.0.1:0").await.context("binding the metrics listener")?;
    let observer = Arc::new(Observer::default());
    let state = Arc::new(ProxyState::new(config.clone(), observer.clone()));
    state.add_listening(metrics.local_addr()?);
    children::announce_ready(&[listener.local_addr()?, metrics.local_addr()?]);
    let shutdown = CancellationToken::new();
    tokio::spawn(bip324_proxy::metrics::serve(metrics, observer, config, shutdown.clone()));
    let bound = vec![Bound { listener: listener.into(), front: FrontEnd::Main }];
    bip324_proxy::server::serve(bound, state, shutdown).await.context("proxy")
}

/// The references: accept, connect to the target, `copy_bidirectional`; on
/// the second address the same behind a SOCKS5 CONNECT (no crypto), the
/// plain SOCKS hop the proxy's handshake is compared with.
async fn run_relay(target: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the relay")?;
    let socks = TcpListener::bind("127.0.0.1:0").await.context("binding the SOCKS relay")?;
    children::announce_ready(&[listener.local_addr()?, socks.local_addr()?]);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = socks.accept().await else { continue };
            tokio::spawn(async move {
                let _ = socks_relay(client).await;
            });
        }
    });
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(mut remote) = TcpStream::connect(target).await else { return };
            let _ = client.set_nodelay(true);
            let _ = remote.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut remote).await;
        });
    }
}

/// One SOCKS5 session of the plain SOCKS relay: no authentication, CONNECT
/// to an address, then bytes copied both ways.
async fn socks_relay(mut client: TcpStream) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(64);
    let greeting = read_decoded(&mut client, &mut buf, "client", socks5::decode_greeting).await?;
    anyhow::ensure!(greeting.offers(socks5::METHOD_NO_AUTH), "no acceptable method");
    client.write_all(&socks5::encode_method_choice(socks5::METHOD_NO_AUTH)).await?;
    let request = read_decoded(&mut client, &mut buf, "client", socks5::decode_request).await?;
    let Host::Ip(ip) = request.target.host else { anyhow::bail!("a name target") };
    let mut remote = TcpStream::connect(SocketAddr::new(ip, request.target.port)).await?;
    remote.set_nodelay(true)?;
    let mut reply = Vec::with_capacity(16);
    socks5::encode_reply(ReplyCode::SUCCEEDED, &Target::new(Host::Ip([0, 0, 0, 0].into()), 0), &mut reply)?;
    client.write_all(&reply).await?;
    remote.write_all(&buf).await?;
    tokio::io::copy_bidirectional(&mut client, &mut remote).await?;
    Ok(())
}

/// The v2 echo node, then the v1 echo node, in one process.
async fn run_nodes() -> anyhow::Result<()> {
    let v2 = TcpListener::bind("127.0.0.1:0").await.context("binding the v2 node")?;
    let v1 = TcpListener::bind("127.0.0.1:0").await.context("binding the v1 node")?;
    children::announce_ready(&[v2.local_addr()?, v1.local_addr()?]);
    tokio::join!(nodes::serve_v2(v2, MAGIC), nodes::serve_v1(v1, MAGIC));
    Ok(())
}
