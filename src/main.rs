//! The `bip324-proxy` binary: flags, logging, bind, serve until SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use bip324_proxy::config::{Cli, Config};
use bip324_proxy::session::FrontEnd;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();

    let config = Config::load(&cli).context("configuration")?;
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

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    bip324_proxy::server::serve(bound, Arc::new(config), shutdown).await.context("serving")
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
