//! The `bip324-proxy` binary: flags, logging, bind, serve until SIGINT or
//! SIGTERM; and `healthcheck` for container health checks.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bip324_proxy::config::{Cli, Config, Listen, SessionCap};
use bip324_proxy::metrics::Observer;
use bip324_proxy::session::FrontEnd;
use bip324_proxy::socks5::Target;
use bip324_proxy::state::ProxyState;
use bip324_proxy::stream::Stream;
use clap::{CommandFactory, Parser, Subcommand};
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
    /// Does a node speak v2? Exit 0 for v2, 1 for v1-only, 2 for unreachable.
    ///
    /// Dials the node (through the configured upstream, if any), attempts the
    /// BIP324 handshake and prints the session id and handshake time.
    Probe {
        /// The node, as HOST:PORT.
        target: String,
        /// Network whose magic keys the handshake [default: mainnet].
        #[arg(long = "network", id = "probe_network", value_name = "NAME", default_value = "mainnet")]
        network: String,
    },
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();

    if let Some(Command::Completions { shell }) = args.command {
        clap_complete::generate(shell, &mut Args::command(), "bip324-proxy", &mut std::io::stdout());
        return Ok(());
    }
    let config = Config::load(&args.cli).context("configuration")?;
    match args.command {
        None => serve(config).await,
        Some(Command::Healthcheck) => healthcheck(&config).await,
        Some(Command::Probe { target, network }) => probe(&config, &target, &network).await,
        Some(Command::Completions { .. }) => Ok(()),
    }
}

async fn probe(config: &Config, target: &str, network: &str) -> anyhow::Result<()> {
    let target = Target::parse(target).map_err(|e| anyhow::anyhow!("`{target}` is not HOST:PORT: {e}"))?;
    let Some(network) = config.known_networks.iter().find(|n| n.name == network).cloned() else {
        let known: Vec<&str> = config.known_networks.iter().map(|n| n.name.as_str()).collect();
        bail!("unknown network `{network}` (known: {})", known.join(", "));
    };
    let outcome = bip324_proxy::probe::probe(&target, &network, config).await;
    println!("{}", outcome.report(&target, &network));
    std::process::exit(outcome.exit_code().into());
}

/// Raises the soft open-file limit to the hard limit and returns the soft
/// limit in force (the automatic `max_sessions` is chosen from it).
fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(FALLBACK_NOFILE, |(soft, _)| soft);
            tracing::warn!(error = %e, open_file_limit = soft, "cannot raise the open-file limit");
            soft
        }
    }
}

/// The open-file limit assumed when it cannot even be read (Linux's usual soft limit).
const FALLBACK_NOFILE: u64 = 1024;

async fn serve(mut config: Config) -> anyhow::Result<()> {
    let open_file_limit = raise_open_file_limit();
    config.resolve_limits(open_file_limit);
    let max_sessions_from = match config.session_cap {
        SessionCap::Set => "set",
        SessionCap::Auto { .. } => "open_file_limit",
    };
    // Handlers first: a SIGTERM right after the `listening` line is a graceful
    // stop (and removes Unix socket files), not the default instant death.
    let signals = install_signal_handlers();
    let bound = bip324_proxy::server::bind_all(&config).await?;
    for b in &bound {
        let local = b.listener.local().context("reading the bound address")?;
        // A Unix socket's line also shows who may connect: its mode and group.
        let unix = matches!(local, Listen::Unix(_));
        let socket_mode = unix.then(|| format!("{:04o}", config.unix_socket.mode));
        let socket_group = unix.then(|| config.unix_socket.group.as_ref().map_or("own".to_owned(), |g| g.to_string()));
        match &b.front {
            FrontEnd::Main => info!(
                listen = %local,
                socket_mode = socket_mode.as_ref().map(tracing::field::display),
                socket_group = socket_group.as_ref().map(tracing::field::display),
                socks5 = config.socks5,
                transparent = config.transparent,
                fallback = %config.fallback,
                passthrough = config.passthrough,
                early_key = %config.early_key,
                allow_private_targets = config.allow_private_targets,
                max_sessions = config.max_sessions,
                max_sessions_from,
                open_file_limit,
                max_sessions_per_client = config.max_sessions_per_client,
                large_message_budget = config.large_message_budget,
                networks = %config.networks.names().join(","),
                upstream = %config.upstream.as_ref().map_or_else(|| "none".to_owned(), |u| u.addr.to_string()),
                "listening"
            ),
            FrontEnd::Transparent => info!(listen = %local, "listening (transparent only)"),
            FrontEnd::Route(target) => info!(listen = %local, %target, "listening (static route)"),
        }
    }
    let inbound = bip324_proxy::server::bind_inbound(&config).await?;
    for b in &inbound {
        let local = b.listener.local_addr().context("reading the bound address")?;
        let listener = &b.inbound;
        info!(
            listen = %local,
            node = %listener.node,
            network = %listener.network,
            v1 = %listener.v1,
            advertise = %listener.advertise.map_or_else(|| "none".to_owned(), |a| a.to_string()),
            max_inbound = config.max_inbound,
            max_inbound_per_source = config.max_inbound_per_source,
            "listening (inbound)"
        );
    }

    let config = Arc::new(config);
    let observer = Arc::new(Observer::default());
    let shutdown = CancellationToken::new();
    let context = Arc::new(ProxyState::new(config.clone(), observer.clone()));
    // The metrics listener outlives the drain, so operators can watch it.
    let metrics_shutdown = CancellationToken::new();
    let mut metrics_task = None;
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        context.add_listening(local);
        info!(
            listen = %local,
            max_connections = config.metrics_max_connections,
            request_timeout_secs = config.metrics_request_timeout.as_secs(),
            "metrics and status listening (/metrics, /status, /)"
        );
        let serving =
            bip324_proxy::metrics::serve(listener, observer.clone(), config.clone(), metrics_shutdown.clone());
        metrics_task = Some(tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
        }));
    }
    tokio::spawn(watch_signals(signals, shutdown.clone()));
    let served = bip324_proxy::server::serve_with_inbound(bound, inbound, context, shutdown).await.context("serving");
    metrics_shutdown.cancel();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    served
}

/// Exit status after a second SIGINT: 128 + 2, as shells report it.
const EXIT_SECOND_SIGINT: i32 = 130;
/// Exit status after a second SIGTERM: 128 + 15.
const EXIT_SECOND_SIGTERM: i32 = 143;

type SignalHandlers = Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>;

/// SIGTERM and SIGINT handlers, installed at once (registration is synchronous).
fn install_signal_handlers() -> SignalHandlers {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            None
        }
    }
}

/// The first SIGINT or SIGTERM starts the graceful shutdown; a second one
/// (of either kind) ends the process at once, without waiting for the drain.
async fn watch_signals(signals: SignalHandlers, shutdown: CancellationToken) {
    let Some((mut term, mut int)) = signals else { return };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutting down (a second signal exits at once)"),
        _ = int.recv() => info!(signal = "SIGINT", "shutting down (a second signal exits at once)"),
    }
    shutdown.cancel();
    let code = tokio::select! {
        _ = term.recv() => EXIT_SECOND_SIGTERM,
        _ = int.recv() => EXIT_SECOND_SIGINT,
    };
    tracing::warn!(exit_code = code, "second signal: exiting now without draining");
    std::process::exit(code);
}

/// Connects to the first listen address (loopback when it is a wildcard, the
/// socket file for `unix:`) and expects a SOCKS5 method choice back.
async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let Some(first) = config.listen.first() else { bail!("no listen address") };
    let addr = match first {
        Listen::Tcp(listen) => {
            let ip = match listen.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            Listen::Tcp(SocketAddr::new(ip, listen.port()))
        }
        unix => unix.clone(),
    };
    let check = async {
        let mut stream: Stream = match &addr {
            Listen::Tcp(addr) => tokio::net::TcpStream::connect(addr).await?.into(),
            Listen::Unix(path) => tokio::net::UnixStream::connect(path).await?.into(),
        };
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
