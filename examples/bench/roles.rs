//! What a child process runs: the proxy, the plain relay, or the echo nodes.
//! Each binds loopback port 0, prints `ready ADDR...` on stdout and serves
//! on a multi-thread runtime (one worker per core, as `#[tokio::main]` gives
//! the proxy's own binary) until the parent kills it or closes its stdin.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bip324_proxy::config::{Cli, Config};
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::children::{self, Role};
use crate::{MAGIC, nodes};

/// Runs `role` until the process is ended from outside.
pub fn run(role: Role, target: Option<SocketAddr>, max_sessions: usize) -> anyhow::Result<()> {
    children::exit_with_parent();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        match role {
            Role::Proxy => run_proxy(max_sessions).await,
            Role::Relay => run_relay(target.context("--role relay needs --target")?).await,
            Role::Nodes => run_nodes().await,
        }
    })
}

/// The proxy with its default configuration, except the session cap (the
/// idle-memory case opens thousands). No tracing subscriber is installed,
/// so log lines cost only their level check.
async fn run_proxy(max_sessions: usize) -> anyhow::Result<()> {
    let cli =
        Cli::try_parse_from(["bip324-proxy", "--max-sessions", &max_sessions.to_string()]).context("proxy flags")?;
    let config = Config::load(&cli).context("proxy configuration")?;
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
    children::announce_ready(&[listener.local_addr()?]);
    bip324_proxy::server::run(listener, Arc::new(config), CancellationToken::new()).await.context("proxy")
}

/// The reference: accept, connect to the target, `copy_bidirectional`.
async fn run_relay(target: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the relay")?;
    children::announce_ready(&[listener.local_addr()?]);
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

/// The v2 echo node, then the v1 echo node, in one process.
async fn run_nodes() -> anyhow::Result<()> {
    let v2 = TcpListener::bind("127.0.0.1:0").await.context("binding the v2 node")?;
    let v1 = TcpListener::bind("127.0.0.1:0").await.context("binding the v1 node")?;
    children::announce_ready(&[v2.local_addr()?, v1.local_addr()?]);
    tokio::join!(nodes::serve_v2(v2, MAGIC), nodes::serve_v1(v1, MAGIC));
    Ok(())
}
