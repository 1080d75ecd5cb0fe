//! The `bip324-proxy` binary: flags, logging, bind, serve until SIGINT or
//! SIGTERM; and `healthcheck` for container health checks.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bip324_proxy::config::{Cli, Config};
use bip324_proxy::metrics::Observer;
use bip324_proxy::server::Context as ProxyContext;
use bip324_proxy::session::FrontEnd;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "bip324-proxy",
    version,
    about = "SOCKS5 proxy that carries Bitcoin P2P v1 clients over BIP324 v2 encryption"
)]
struct Args {
    #[command(flatten)]
    cli: Cli,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 if a proxy answers a SOCKS5 greeting on the configured listen address, 1 otherwise.
    Healthcheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();

    let config = Config::load(&args.cli).context("configuration")?;
    match args.command {
        None => serve(config).await,
        Some(Command::Healthcheck) => healthcheck(&config).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let bound = bip324_proxy::server::bind_all(&config).await?;
    for b in &bound {
        let local = b.listener.local_addr().context("reading the bound address")?;
        match &b.front {
            FrontEnd::Main => info!(
                listen = %local,
                socks5 = config.socks5,
                transparent = config.transparent,
                fallback = %config.fallback,
                passthrough = config.passthrough,
                networks = %config.networks.names().join(","),
                upstream = %config.upstream.as_ref().map_or_else(|| "none".to_owned(), |u| u.addr.to_string()),
                "listening"
            ),
            FrontEnd::Transparent => info!(listen = %local, "listening (transparent only)"),
            FrontEnd::Route(target) => info!(listen = %local, %target, "listening (static route)"),
        }
    }

    let config = Arc::new(config);
    let observer = Arc::new(Observer::default());
    let shutdown = CancellationToken::new();
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        info!(listen = %local, "metrics and status listening (/metrics, /status, /)");
        let serving = bip324_proxy::metrics::serve(listener, observer.clone(), config.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
        });
    }
    tokio::spawn(watch_signals(shutdown.clone()));
    let context = Arc::new(ProxyContext::new(config, observer));
    bip324_proxy::server::serve(bound, context, shutdown).await.context("serving")
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
    }
    shutdown.cancel();
}

/// Connects to the listen address (loopback when it is a wildcard) and
/// expects a SOCKS5 method choice back.
async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let ip = match config.listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, config.listen.port());
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(&[0x05, 0x01, 0x00]).await?;
        let mut choice = [0u8; 2];
        stream.read_exact(&mut choice).await?;
        Ok::<_, std::io::Error>(choice)
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok([0x05, _])) => Ok(()),
        Ok(Ok(other)) => bail!("{addr} answered {other:02x?}, not SOCKS5"),
        Ok(Err(e)) => bail!("{addr}: {e}"),
        Err(_) => bail!("{addr}: no answer within 3 s"),
    }
}
