//! Benchmark of bip324-proxy against a plain TCP relay, on loopback only:
//!
//! 1. throughput of echoed payload (1 KiB and 1 MiB messages): a v1 client
//!    through the proxy's SOCKS5 path to a v2 echo node, versus the same
//!    client through a plain tokio relay to a v1 echo node;
//! 2. proxy CPU per echoed MB (from /proc/<pid>/stat) versus the in-process
//!    floor of the work every byte needs (one ChaCha20-Poly1305 seal and
//!    open, two SHA256d), and the relay's CPU per MB for context; with
//!    `--syscalls`, both processes' system calls per echoed MB;
//! 3. handshake latency (median and p99), SOCKS connect to the VERSION echo,
//!    versus the sum of what its parts cost on their own: a plain SOCKS relay
//!    (no crypto) plus a native v2 client (the proxy's own initiator
//!    handshake, straight to the node) minus direct v1;
//! 4. connection churn: complete sessions per second (connect, SOCKS5,
//!    handshake, VERSION echo, close) at 1, 16 and 256 at once, versus a
//!    native v2 client to the same node, and the key pool's hit rate;
//! 5. resident memory and descriptors per idle, fully established session,
//!    up to 10,000 at once.
//!
//! The proxy, the relay and the echo nodes each run in a child process (this
//! binary re-executed with a hidden `--role`), so each one's CPU time and
//! memory can be read on its own; the client and the floor run here.
//!
//! Run: `cargo run --release --example bench` (about 50 s on 2 cores; `--help` for options).

#![forbid(unsafe_code)]

#[path = "bench/children.rs"]
mod children;
#[path = "bench/client.rs"]
mod client;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/nodes.rs"]
mod nodes;
#[path = "bench/procfs.rs"]
mod procfs;
#[path = "bench/roles.rs"]
mod roles;
#[path = "bench/syscalls.rs"]
mod syscalls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bip324_proxy::v1::{self, Magic};
use clap::Parser;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::children::{ChildProcess, Role};
use crate::client::{Load, Pipeline, V1Route};

/// Regtest: every session of the benchmark speaks it.
pub const MAGIC: Magic = [0xfa, 0xbf, 0xb5, 0xda];

/// Warm-up of each throughput case before counting starts.
const WARMUP: Duration = Duration::from_secs(1);
/// CPU time of each floor measurement, single thread.
const FLOOR_DURATION: Duration = Duration::from_millis(1500);
/// Unmeasured sessions before the handshake samples (caches, lazy statics, TCP paths).
const HANDSHAKE_WARMUP: usize = 10;
/// Pause between sequential handshake samples, so one session's teardown
/// does not overlap the next one's start.
const HANDSHAKE_PAUSE: Duration = Duration::from_millis(2);
/// The small idle-memory case.
const SMALL_IDLE_SESSIONS: usize = 1_000;
/// Sessions opened before an idle-memory baseline, so lazily built state is not counted per session.
const IDLE_WARMUP_SESSIONS: usize = 32;
/// Sessions being established at once in the idle-memory cases.
const OPEN_CONCURRENCY: usize = 64;
/// Client source addresses 127.0.0.2, 127.0.0.3, ...: each has its own
/// 32768-60999 ephemeral range, so ports never run short.
const SOURCE_ADDRS: u8 = 16;
/// File descriptors the proxy keeps for itself (listener, epoll, stdio,
/// runtime) out of the hard limit; the rest allow two per session.
const PROXY_FD_RESERVE: u64 = 200;
/// Time for a proxy to close what its clients closed, or to settle after opening.
const SETTLE: Duration = Duration::from_secs(1);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Sessions running at once in the churn phases.
const CHURN_CONCURRENCY: [usize; 3] = [1, 16, 256];
/// Each churn phase stops after this long or this many sessions, whichever comes first.
const CHURN_PHASE: Duration = Duration::from_secs(2);
const CHURN_MAX_SESSIONS: usize = 4_000;
/// Goal of the churn rows: proxy sessions per second over native v2's.
const CHURN_GOAL: f64 = 0.8;
/// Open-file limit the bench asks for (hard and soft) when it may raise the
/// hard limit (root): room for 10,000 sessions in every process.
const WANTED_NOFILE: u64 = 65_536;
/// Cores busy outside the benchmark above which its numbers get a warning.
const NOISY_MACHINE_CORES: f64 = 0.2;

/// Benchmark of bip324-proxy against a plain TCP relay (loopback only).
#[derive(Debug, Parser)]
struct Args {
    /// Seconds each throughput case is measured, after a one-second warm-up.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Handshake latency samples for each of the proxy and the native v2 client.
    #[arg(long, default_value_t = 200)]
    handshakes: usize,
    /// 1 KiB messages in flight (sent, not yet echoed) in the throughput case.
    #[arg(long, default_value_t = 256)]
    window_small: u32,
    /// 1 MiB messages in flight in the throughput case.
    #[arg(long, default_value_t = 8)]
    window_large: u32,
    /// Idle sessions of the large memory case, capped by the file limit.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Run only these phases (repeatable or comma-separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Phase>,
    /// Count the proxy's and the relay's system calls per echoed MB in the
    /// throughput cases (needs `perf` and syscall tracepoints).
    #[arg(long)]
    syscalls: bool,
    /// A flag for the proxy under test, as on its command line (repeatable),
    /// e.g. `--proxy-flag=--early-key=never` to compare settings.
    #[arg(long = "proxy-flag", value_name = "FLAG", allow_hyphen_values = true)]
    proxy_flags: Vec<String>,
    /// Child process role (internal).
    #[arg(long, hide = true, value_enum)]
    role: Option<Role>,
    /// Where the relay role forwards to (internal).
    #[arg(long, hide = true)]
    target: Option<SocketAddr>,
    /// Session cap of the proxy role (internal).
    #[arg(long, hide = true, default_value_t = 20_000)]
    max_sessions: usize,
}

/// The benchmark's phases, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Throughput,
    Handshake,
    Churn,
    Memory,
}

impl Args {
    fn runs(&self, phase: Phase) -> bool {
        self.only.is_empty() || self.only.contains(&phase)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The hard limit up when allowed (root), then the soft limit up to the
    // hard limit, in every process; children inherit both.
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && hard < WANTED_NOFILE
    {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, soft, WANTED_NOFILE);
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if let Some(role) = args.role {
        return roles::run(role, args.target, args.max_sessions, &args.proxy_flags);
    }

    let started = Instant::now();
    let ticks_per_second = procfs::clock_ticks_per_second();
    let background_cores = background_load(ticks_per_second)?;
    // Before any other process or thread exists, so nothing competes for the core.
    eprintln!("measuring the CPU floor ...");
    let floor = if args.runs(Phase::Throughput) {
        Floor {
            small: floor::cpu_seconds_per_mb(1024, FLOOR_DURATION, ticks_per_second)?,
            large: floor::cpu_seconds_per_mb(1 << 20, FLOOR_DURATION, ticks_per_second)?,
        }
    } else {
        Floor { small: 0.0, large: 0.0 }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    let results = runtime.block_on(run_cases(&args, ticks_per_second))?;
    print_report(&floor, &results, background_cores, started.elapsed(), &args.proxy_flags);
    Ok(())
}

/// Cores the machine keeps busy without us, over one second before we start.
fn background_load(ticks_per_second: u64) -> anyhow::Result<f64> {
    let before = procfs::machine_busy_ticks()?;
    std::thread::sleep(Duration::from_secs(1));
    let busy = procfs::machine_busy_ticks()? - before;
    Ok(busy as f64 / ticks_per_second as f64)
}

/// In-process floor, CPU seconds per MB.
struct Floor {
    small: f64,
    large: f64,
}

/// Everything measured against child processes.
struct Results {
    throughput: Vec<ThroughputCase>,
    handshake: Handshakes,
    churn: Vec<Churn>,
    idle: Vec<IdleMemory>,
    /// Why the large idle case has fewer sessions than asked, if it does.
    idle_cap_note: Option<String>,
}

struct ThroughputCase {
    label: &'static str,
    proxy: Throughput,
    relay: Throughput,
}

/// One throughput run: rates over the measured window only.
struct Throughput {
    mb_per_second: f64,
    /// CPU seconds of the proxy or relay process per echoed MB.
    server_cpu_per_mb: f64,
    /// Cores busy on average, per process.
    client_cores: f64,
    server_cores: f64,
    nodes_cores: f64,
    /// Cores busy with processes outside the benchmark (other work on the machine).
    other_cores: f64,
    /// Minor page faults of the proxy or relay per echoed MB.
    server_faults_per_mb: f64,
    /// System calls of the proxy or relay over the window (`--syscalls`),
    /// and the MB echoed in it.
    syscalls: Option<(Result<syscalls::SyscallCounts, String>, f64)>,
}

/// Sequential session set-up times of each path, in the same rounds.
struct Handshakes {
    proxy: Vec<Duration>,
    native: Vec<Duration>,
    /// v1 through the plain SOCKS relay.
    relay: Vec<Duration>,
    /// v1 straight to the v1 node.
    direct: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

/// One churn phase at one concurrency.
struct Churn {
    concurrency: usize,
    proxy: ChurnRate,
    native: ChurnRate,
    key_pool_hits: u64,
    key_pool_misses: u64,
}

struct ChurnRate {
    sessions: usize,
    per_second: f64,
    failures: usize,
    first_error: Option<String>,
}

struct IdleMemory {
    asked: usize,
    established: usize,
    failures: usize,
    first_error: Option<String>,
    kib_per_session: f64,
    proxy_fds: usize,
}

async fn run_cases(args: &Args, ticks_per_second: u64) -> anyhow::Result<Results> {
    let nodes = ChildProcess::spawn(Role::Nodes, &[]).await?;
    let (v2_node, v1_node) = match nodes.addrs[..] {
        [v2, v1] => (v2, v1),
        _ => anyhow::bail!("the nodes process reported {:?}", nodes.addrs),
    };
    let proxy = spawn_proxy(&args.proxy_flags).await?;
    let relay = ChildProcess::spawn(Role::Relay, &["--target".to_owned(), v1_node.to_string()]).await?;
    let version_payload = client::version_payload(v2_node);
    let version_frame = client::frame(MAGIC, v1::VERSION_COMMAND, &version_payload);
    let measure_for = Duration::from_secs(args.seconds.max(1));

    let loads = [
        ("1 KiB", Load { command: command("tx"), payload_len: 1024, batch: 16, window: args.window_small.max(16) }),
        ("1 MiB", Load { command: command("block"), payload_len: 1 << 20, batch: 1, window: args.window_large.max(1) }),
    ];
    let mut throughput = Vec::new();
    for (label, load) in loads.into_iter().filter(|_| args.runs(Phase::Throughput)) {
        eprintln!("throughput {label}: proxy ...");
        let route = V1Route::Socks { proxy: proxy.addrs[0], source: None, node: v2_node };
        let opened = client::open_v1_session(route, &version_frame);
        let stream = flatten(tokio::time::timeout(client::SESSION_TIMEOUT, opened).await)?;
        let through_proxy =
            measure_throughput(stream, load, &proxy, &nodes, measure_for, ticks_per_second, args.syscalls).await?;
        eprintln!("throughput {label}: plain relay ...");
        let opened = client::open_v1_session(V1Route::Direct(relay.addrs[0]), &version_frame);
        let stream = flatten(tokio::time::timeout(client::SESSION_TIMEOUT, opened).await)?;
        let through_relay =
            measure_throughput(stream, load, &relay, &nodes, measure_for, ticks_per_second, args.syscalls).await?;
        throughput.push(ThroughputCase { label, proxy: through_proxy, relay: through_relay });
    }

    let samples = if args.runs(Phase::Handshake) { args.handshakes } else { 0 };
    eprintln!("handshake latency: {samples} sessions each ...");
    let paths = Paths { proxy: proxy.addrs[0], v2_node, socks_relay: relay.addrs[1], v1_node };
    let handshake = measure_handshakes(&paths, &version_frame, &version_payload, samples).await;
    relay.stop().await;

    let mut churn = Vec::new();
    for concurrency in CHURN_CONCURRENCY.into_iter().filter(|_| args.runs(Phase::Churn)) {
        eprintln!("churn at {concurrency}: proxy, then native v2 ...");
        churn.push(measure_churn(&proxy, v2_node, &version_frame, &version_payload, concurrency).await?);
    }
    proxy.stop().await;

    let (hard_limit, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, hard)| (hard, soft))
        .context("reading the file limit")?;
    let most_sessions = usize::try_from(hard_limit.saturating_sub(PROXY_FD_RESERVE) / 2).unwrap_or(usize::MAX);
    let large = args.sessions.min(most_sessions);
    let idle_cap_note = (large < args.sessions).then(|| {
        format!(
            "{} idle sessions would need {} descriptors in the proxy (2 per session, plus its listener, \
             epoll and stdio), and as many in the bench (client sockets) and the nodes process; the hard \
             open-file limit here is {} and could not be raised, so the large case uses {}",
            thousands(args.sessions),
            thousands(2 * args.sessions),
            thousands(hard_limit as usize),
            thousands(large)
        )
    });
    let mut idle = Vec::new();
    for sessions in [SMALL_IDLE_SESSIONS.min(large), large].into_iter().filter(|_| args.runs(Phase::Memory)) {
        eprintln!("idle memory: {} sessions ...", thousands(sessions));
        idle.push(measure_idle_memory(v2_node, &version_frame, sessions, &args.proxy_flags).await?);
    }
    nodes.stop().await;

    Ok(Results { throughput, handshake, churn, idle, idle_cap_note })
}

fn command(name: &str) -> v1::Command {
    v1::command_from_str(name).expect("a valid command name")
}

async fn spawn_proxy(proxy_flags: &[String]) -> anyhow::Result<ChildProcess> {
    // Above the large idle case; the file limit binds first.
    let mut args = vec!["--max-sessions".to_owned(), "20000".to_owned()];
    args.extend(proxy_flags.iter().map(|flag| format!("--proxy-flag={flag}")));
    ChildProcess::spawn(Role::Proxy, &args).await
}

/// A snapshot of the counters a throughput rate is computed from.
struct Sample {
    at: Instant,
    echoed_bytes: u64,
    client: procfs::ProcessStat,
    server: procfs::ProcessStat,
    nodes: procfs::ProcessStat,
    machine_ticks: u64,
}

impl Sample {
    fn take(pipeline: &Pipeline, server: &ChildProcess, nodes: &ChildProcess) -> anyhow::Result<Sample> {
        Ok(Sample {
            at: Instant::now(),
            echoed_bytes: pipeline.echoed_bytes(),
            client: procfs::process_stat(std::process::id())?,
            server: server.stat()?,
            nodes: nodes.stat()?,
            machine_ticks: procfs::machine_busy_ticks()?,
        })
    }
}

async fn measure_throughput(
    stream: TcpStream,
    load: Load,
    server: &ChildProcess,
    nodes: &ChildProcess,
    measure_for: Duration,
    ticks_per_second: u64,
    count_syscalls: bool,
) -> anyhow::Result<Throughput> {
    let pipeline = Pipeline::start(stream, load);
    tokio::time::sleep(WARMUP).await;
    let before = Sample::take(&pipeline, server, nodes)?;
    let counting = count_syscalls.then(|| syscalls::Counting::start(server.pid, measure_for));
    tokio::time::sleep(measure_for).await;
    let after = Sample::take(&pipeline, server, nodes)?;
    let counted = match counting {
        Some(Ok(counting)) => Some(counting.finish().await.map_err(|e| format!("{e:#}"))),
        Some(Err(e)) => Some(Err(format!("{e:#}"))),
        None => None,
    };
    pipeline.finish().await?;

    let seconds = (after.at - before.at).as_secs_f64();
    let mb = (after.echoed_bytes - before.echoed_bytes) as f64 / 1e6;
    ensure!(mb > 0.0, "nothing was echoed in {seconds:.1} s");
    let cores = |before: u64, after: u64| (after - before) as f64 / ticks_per_second as f64 / seconds;
    let client_cores = cores(before.client.cpu_ticks, after.client.cpu_ticks);
    let server_cores = cores(before.server.cpu_ticks, after.server.cpu_ticks);
    let nodes_cores = cores(before.nodes.cpu_ticks, after.nodes.cpu_ticks);
    let machine_cores = cores(before.machine_ticks, after.machine_ticks);
    Ok(Throughput {
        mb_per_second: mb / seconds,
        server_cpu_per_mb: server_cores * seconds / mb,
        client_cores,
        server_cores,
        nodes_cores,
        other_cores: (machine_cores - client_cores - server_cores - nodes_cores).max(0.0),
        server_faults_per_mb: (after.server.minor_faults - before.server.minor_faults) as f64 / mb,
        syscalls: counted.map(|counts| (counts, mb)),
    })
}

/// Where each measured path starts.
struct Paths {
    proxy: SocketAddr,
    v2_node: SocketAddr,
    socks_relay: SocketAddr,
    v1_node: SocketAddr,
}

/// Sequential sessions, the four paths in turn in every round, so all see the same machine state.
async fn measure_handshakes(paths: &Paths, version_frame: &[u8], version_payload: &[u8], samples: usize) -> Handshakes {
    let mut result = Handshakes {
        proxy: Vec::with_capacity(samples),
        native: Vec::with_capacity(samples),
        relay: Vec::with_capacity(samples),
        direct: Vec::with_capacity(samples),
        errors: 0,
        first_error: None,
    };
    if samples == 0 {
        return result;
    }
    for round in 0..HANDSHAKE_WARMUP + samples {
        let counted = round >= HANDSHAKE_WARMUP;
        for path in 0..4 {
            // Path 1 is the native v2 client; the others are v1 sessions.
            let v1_route = match path {
                0 => Some(V1Route::Socks { proxy: paths.proxy, source: None, node: paths.v2_node }),
                1 => None,
                2 => Some(V1Route::Socks { proxy: paths.socks_relay, source: None, node: paths.v1_node }),
                _ => Some(V1Route::Direct(paths.v1_node)),
            };
            let start = Instant::now();
            let outcome = match v1_route {
                Some(route) => client::open_v1_session(route, version_frame).await.map(drop),
                None => client::native_v2_version_echo(paths.v2_node, None, version_payload).await,
            };
            let elapsed = start.elapsed();
            let samples = [&mut result.proxy, &mut result.native, &mut result.relay, &mut result.direct];
            match outcome {
                Ok(()) if counted => samples.into_iter().nth(path).expect("four paths").push(elapsed),
                Ok(()) => {}
                Err(e) => {
                    result.errors += 1;
                    let name = ["proxy", "native v2", "SOCKS relay", "direct v1"][path];
                    result.first_error.get_or_insert(format!("{name} session: {e:#}"));
                }
            }
            tokio::time::sleep(HANDSHAKE_PAUSE).await;
        }
    }
    result
}

/// Proxy sessions, then native v2 sessions, `concurrency` at a time, each
/// phase bounded by `CHURN_PHASE` and `CHURN_MAX_SESSIONS`; the key pool's
/// counters read from the proxy's metrics before and after its phase.
async fn measure_churn(
    proxy: &ChildProcess,
    node: SocketAddr,
    version_frame: &[u8],
    version_payload: &[u8],
    concurrency: usize,
) -> anyhow::Result<Churn> {
    let metrics = *proxy.addrs.get(1).context("the proxy reported no metrics address")?;
    let before = key_pool_counts(&client::fetch_metrics(metrics).await?);
    let proxy_addr = proxy.addrs[0];
    let frame: Arc<[u8]> = Arc::from(version_frame);
    let proxy_rate = churn_phase(concurrency, move |source| {
        let frame = frame.clone();
        let route = V1Route::Socks { proxy: proxy_addr, source: Some(source), node };
        async move { client::open_v1_session(route, &frame).await.map(drop) }
    })
    .await;
    let after = key_pool_counts(&client::fetch_metrics(metrics).await?);
    let payload: Arc<[u8]> = Arc::from(version_payload);
    let native_rate = churn_phase(concurrency, move |source| {
        let payload = payload.clone();
        async move { client::native_v2_version_echo(node, Some(source), &payload).await }
    })
    .await;
    Ok(Churn {
        concurrency,
        proxy: proxy_rate,
        native: native_rate,
        key_pool_hits: after.0.saturating_sub(before.0),
        key_pool_misses: after.1.saturating_sub(before.1),
    })
}

/// `bip324_proxy_key_pool_total` by result: (hit, miss).
fn key_pool_counts(metrics: &str) -> (u64, u64) {
    let value = |result: &str| {
        let prefix = format!("bip324_proxy_key_pool_total{{result=\"{result}\"}} ");
        metrics.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    (value("hit"), value("miss"))
}

/// Runs `session` in `concurrency` workers until the phase's time or count runs out.
async fn churn_phase<F, Fut>(concurrency: usize, session: F) -> ChurnRate
where
    F: Fn(IpAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let deadline = started + CHURN_PHASE;
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (session, issued) = (session.clone(), issued.clone());
        workers.spawn(async move {
            let (mut done, mut failures, mut first_error) = (0usize, 0usize, None);
            while Instant::now() < deadline {
                let index = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= CHURN_MAX_SESSIONS {
                    break;
                }
                let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(SOURCE_ADDRS)) as u8));
                match flatten(tokio::time::timeout(client::SESSION_TIMEOUT, session(source)).await) {
                    Ok(()) => done += 1,
                    Err(e) => {
                        failures += 1;
                        first_error.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            (done, failures, first_error)
        });
    }
    let mut rate = ChurnRate { sessions: 0, per_second: 0.0, failures: 0, first_error: None };
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((done, failures, first_error)) => {
                rate.sessions += done;
                rate.failures += failures;
                if rate.first_error.is_none() {
                    rate.first_error = first_error;
                }
            }
            Err(e) => {
                rate.failures += 1;
                rate.first_error.get_or_insert(format!("{e}"));
            }
        }
    }
    rate.per_second = rate.sessions as f64 / started.elapsed().as_secs_f64();
    rate
}

fn flatten<T>(outcome: Result<anyhow::Result<T>, tokio::time::error::Elapsed>) -> anyhow::Result<T> {
    outcome.context("timed out")?
}

/// RSS growth of a fresh proxy for `sessions` idle sessions, each with its
/// v2 handshake done and the VERSION echoed.
async fn measure_idle_memory(
    node: SocketAddr,
    version_frame: &[u8],
    sessions: usize,
    proxy_flags: &[String],
) -> anyhow::Result<IdleMemory> {
    // A fresh process: memory freed by earlier cases would otherwise be reused
    // by these sessions and hide part of their cost.
    let proxy = spawn_proxy(proxy_flags).await?;
    let fds_at_start = proxy.open_fds()?;
    let warmup = open_sessions(proxy.addrs[0], node, version_frame, IDLE_WARMUP_SESSIONS).await;
    ensure!(warmup.failures == 0, "warm-up sessions failed: {}", warmup.first_error.unwrap_or_default());
    drop(warmup.streams);
    wait_for_fds(&proxy, fds_at_start).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_before = proxy.rss_kib()?;

    let opened = open_sessions(proxy.addrs[0], node, version_frame, sessions).await;
    tokio::time::sleep(SETTLE).await;
    let rss_after = proxy.rss_kib()?;
    let proxy_fds = proxy.open_fds()?;
    let established = opened.streams.len();

    drop(opened.streams);
    wait_for_fds(&proxy, fds_at_start).await?;
    proxy.stop().await;

    ensure!(established > 0, "no idle session opened: {}", opened.first_error.unwrap_or_default());
    Ok(IdleMemory {
        asked: sessions,
        established,
        failures: opened.failures,
        first_error: opened.first_error,
        kib_per_session: rss_after.saturating_sub(rss_before) as f64 / established as f64,
        proxy_fds,
    })
}

/// Sessions opened at once.
struct OpenSessions {
    streams: Vec<TcpStream>,
    failures: usize,
    first_error: Option<String>,
}

/// Opens `count` proxy sessions, `OPEN_CONCURRENCY` at a time, from source
/// addresses spread over 127.0.0.2 and up.
async fn open_sessions(proxy: SocketAddr, node: SocketAddr, version_frame: &[u8], count: usize) -> OpenSessions {
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let version_frame: Arc<[u8]> = Arc::from(version_frame);
    let mut tasks = JoinSet::new();
    for index in 0..count {
        let (gate, version_frame) = (gate.clone(), version_frame.clone());
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(SOURCE_ADDRS)) as u8));
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate is never closed");
            let opened = tokio::time::timeout(
                client::SESSION_TIMEOUT,
                client::open_v1_session(V1Route::Socks { proxy, source: Some(source), node }, &version_frame),
            )
            .await;
            flatten(opened)
        });
    }
    let mut result = OpenSessions { streams: Vec::with_capacity(count), failures: 0, first_error: None };
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(anyhow::Error::from).and_then(|opened| opened) {
            Ok(stream) => result.streams.push(stream),
            Err(e) => {
                result.failures += 1;
                result.first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    result
}

/// Waits, bounded, until the proxy holds no more descriptors than `fds`.
async fn wait_for_fds(proxy: &ChildProcess, fds: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let open = proxy.open_fds()?;
        if open <= fds {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the proxy still holds {open} descriptors (idle: {fds})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- report

fn print_report(floor: &Floor, results: &Results, background_cores: f64, elapsed: Duration, proxy_flags: &[String]) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!();
    println!("bip324-proxy benchmark (machine: {}, {cores} cores)", procfs::cpu_model());
    if !proxy_flags.is_empty() {
        println!("proxy flags: {}", proxy_flags.join(" "));
    }
    println!("{:<20} {:<18} {:<22} {:<7} {:<10} verdict", "case", "proxy", "reference", "ratio", "goal");

    // Issue 15: efficiency >= 0.75 of the floor at 1 KiB and >= 0.8 at 1 MiB.
    // Throughput against the relay is context on 2 cores (the echo node's
    // AEAD shares them), not a goal.
    let goals_efficiency = [0.75, 0.8];
    for case in &results.throughput {
        let ratio = case.proxy.mb_per_second / case.relay.mb_per_second;
        println!(
            "{:<20} {:<18} {:<22} {:<7.2} {:<10}",
            format!("throughput {}", case.label),
            format!("{:.1} MB/s", case.proxy.mb_per_second),
            format!("relay {:.1} MB/s", case.relay.mb_per_second),
            ratio,
            "(context)"
        );
    }
    for ((case, goal), floor) in results.throughput.iter().zip(goals_efficiency).zip([floor.small, floor.large]) {
        let efficiency = floor / case.proxy.server_cpu_per_mb;
        row(
            &format!("cpu/MB {}", case.label),
            &format!("proxy {:.2} ms", case.proxy.server_cpu_per_mb * 1e3),
            &format!("floor {:.2} ms", floor * 1e3),
            efficiency,
            &format!(">= {goal}"),
            efficiency >= goal,
        );
    }
    for case in &results.throughput {
        println!(
            "{:<20} {:<18} {:<22} {:<7} {:<10}",
            format!("relay cpu/MB {}", case.label),
            format!("relay {:.2} ms", case.relay.server_cpu_per_mb * 1e3),
            format!("proxy/relay {:.1}x", case.proxy.server_cpu_per_mb / case.relay.server_cpu_per_mb),
            "",
            "(context)"
        );
    }

    let hs = &results.handshake;
    let all_paths = [&hs.proxy, &hs.native, &hs.relay, &hs.direct];
    let handshake_ran = all_paths.iter().any(|samples| !samples.is_empty()) || hs.errors > 0;
    if handshake_ran && all_paths.iter().any(|samples| samples.is_empty()) {
        println!("{:<20} no successful sessions on some path", "handshake");
    } else if handshake_ran {
        for (label, quantile) in [("median", 0.5), ("p99", 0.99)] {
            let [proxy, native, relay, direct] = all_paths.map(|samples| percentile(samples, quantile).as_secs_f64());
            let reference = relay + native - direct;
            let ratio = proxy / reference;
            row(
                &format!("handshake {label}"),
                &format!("{:.3} ms", proxy * 1e3),
                &format!("sum {:.3} ms", reference * 1e3),
                ratio,
                "<= 1.0",
                ratio <= 1.0,
            );
            println!(
                "{:<20} {:<18} {:<22} {:<7} {:<10}",
                "",
                "",
                format!("= {:.3}+{:.3}-{:.3}", relay * 1e3, native * 1e3, direct * 1e3),
                "",
                "(relay+v2-v1)"
            );
        }
    }
    for c in &results.churn {
        let ratio = c.proxy.per_second / c.native.per_second;
        row(
            &format!("churn x{}", c.concurrency),
            &format!("{:.0} sessions/s", c.proxy.per_second),
            &format!("native v2 {:.0}/s", c.native.per_second),
            ratio,
            &format!(">= {CHURN_GOAL}"),
            ratio >= CHURN_GOAL && c.proxy.failures == 0,
        );
    }

    let idle_goal_kib = 24.0;
    let idle_text: Vec<String> =
        results.idle.iter().map(|m| format!("{}: {:.1} KiB", thousands(m.asked), m.kib_per_session)).collect();
    let idle_met = results.idle.iter().all(|m| m.kib_per_session <= idle_goal_kib && m.failures == 0);
    if !results.idle.is_empty() {
        println!(
            "{:<20} {:<49} {:<10} {}",
            "idle RSS/session",
            idle_text.join("   "),
            format!("<= {idle_goal_kib} KiB"),
            verdict(idle_met)
        );
    }

    println!();
    println!("notes:");
    println!("  MB = 10^6 bytes of echoed payload. cpu/MB = utime+stime of the proxy (or relay) process per");
    println!("  echoed MB; floor = one ChaCha20-Poly1305 seal + open and two SHA256d per payload byte on one");
    println!("  thread in-process; ratio on cpu rows = floor/proxy (efficiency).");
    for case in &results.throughput {
        for (path, run) in [("proxy", &case.proxy), ("relay", &case.relay)] {
            println!(
                "  {} via {path}: cores busy: client {:.2}, {path} {:.2}, echo nodes {:.2}, other processes {:.2}; \
                 {path} page faults/MB {:.0}",
                case.label,
                run.client_cores,
                run.server_cores,
                run.nodes_cores,
                run.other_cores,
                run.server_faults_per_mb
            );
        }
    }
    for case in &results.throughput {
        for (path, run) in [("proxy", &case.proxy), ("relay", &case.relay)] {
            match &run.syscalls {
                Some((Ok(counts), mb)) => {
                    let per_mb = |n: u64| n as f64 / mb;
                    let named: Vec<String> = counts
                        .by_name
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(name, n)| format!("{name} {:.0}", per_mb(*n)))
                        .collect();
                    println!(
                        "  {} via {path}: system calls per MB {:.0} ({})",
                        case.label,
                        per_mb(counts.total),
                        named.join(", ")
                    );
                }
                Some((Err(e), _)) => println!("  {} via {path}: system calls not counted: {e}", case.label),
                None => {}
            }
        }
    }
    println!(
        "  handshake: session set-up to the VERSION echo, {} samples of each path after {HANDSHAKE_WARMUP} \
         warm-up rounds, paths in turn; sum = plain SOCKS relay (no crypto) + native v2 client - direct v1, \
         each at the same quantile; failed sessions: {}",
        hs.proxy.len(),
        hs.errors
    );
    if let Some(error) = &hs.first_error {
        println!("    first failure: {error}");
    }
    println!(
        "  churn: complete sessions (connect, SOCKS5, handshake, VERSION echo, close); each phase {:.0} s or \
         {} sessions at most",
        CHURN_PHASE.as_secs_f64(),
        thousands(CHURN_MAX_SESSIONS)
    );
    for c in &results.churn {
        let taken = c.key_pool_hits + c.key_pool_misses;
        let hit_rate = if taken > 0 { c.key_pool_hits as f64 / taken as f64 * 100.0 } else { 0.0 };
        println!(
            "  churn x{}: proxy {} sessions ({} failed), native v2 {} ({} failed); key pool hits {} of {} ({hit_rate:.0}%)",
            c.concurrency,
            thousands(c.proxy.sessions),
            c.proxy.failures,
            thousands(c.native.sessions),
            c.native.failures,
            thousands(c.key_pool_hits as usize),
            thousands(taken as usize)
        );
        for error in [&c.proxy.first_error, &c.native.first_error].into_iter().flatten() {
            println!("    first failure: {error}");
        }
    }
    for m in &results.idle {
        println!(
            "  idle sessions {}: established {}, failed {}, proxy descriptors while open {}, proxy RSS growth {:.1} MiB",
            thousands(m.asked),
            thousands(m.established),
            m.failures,
            thousands(m.proxy_fds),
            m.kib_per_session * m.established as f64 / 1024.0
        );
        if let Some(error) = &m.first_error {
            println!("    first failure: {error}");
        }
    }
    if let Some(note) = &results.idle_cap_note {
        println!("  {note}.");
    }
    let busiest_other = results.throughput.iter().flat_map(|c| [c.proxy.other_cores, c.relay.other_cores]);
    let busiest_other = busiest_other.fold(background_cores, f64::max);
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        println!(
            "  open-file limit of every bench process: soft {}, hard {}",
            thousands(soft as usize),
            thousands(hard as usize)
        );
    }
    println!("  other processes kept {background_cores:.2} cores busy before the run");
    if busiest_other > NOISY_MACHINE_CORES {
        println!(
            "  WARNING: other processes used up to {busiest_other:.2} cores during the run; \
             throughput and latency numbers are not reliable"
        );
    }
    println!("  total run time: {:.1} s", elapsed.as_secs_f64());
}

fn row(case: &str, proxy: &str, reference: &str, ratio: f64, goal: &str, met: bool) {
    println!("{case:<20} {proxy:<18} {reference:<22} {ratio:<7.2} {goal:<10} {}", verdict(met));
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// Nearest-rank percentile.
fn percentile(samples: &[Duration], quantile: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// 9900 -> "9,900".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
