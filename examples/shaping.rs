//! What traffic shaping hides and what it costs, measured on a replayed
//! session: `cargo run --release --example shaping` (under two minutes on
//! 2 cores; `--help` for options).
//!
//! The example makes a regtest chain of a few hundred blocks and the
//! transactions between them with the `bitcoin` crate (`shaping/chain.rs`),
//! then, once per shaping policy, replays a session through the real proxy
//! (its library entry point, on a runtime thread of its own): a v1 client
//! relays the chain as a node does (tx `inv`, the remote's `getdata`, `tx`;
//! `headers`, `getdata`, `block` when a block arrives; pings), a BIP324
//! responder built on the `bip324` crate is the remote, and an observing
//! relay between the proxy and the remote timestamps every read of the v2
//! bytes (`shaping/peers.rs`). Time is compressed: a block interval of 600 s
//! stands as 60 ms by default, so 1 ms of the replay stands for 10 s.
//!
//! For each policy it prints what the observer sees (distinct flight and
//! segment sizes and their entropy, how visible block arrivals are) and what
//! the policy costs (decoy bytes, per-message latency against policy off).
//! The RNG is seeded, so every policy replays the same chain and schedule.

#![forbid(unsafe_code)]

#[path = "shaping/chain.rs"]
mod chain;
#[path = "shaping/peers.rs"]
mod peers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use bip324_proxy::config::{Cli, Config};
use bip324_proxy::metrics::Observer;
use bip324_proxy::server::Bound;
use bip324_proxy::session::FrontEnd;
use bip324_proxy::state::ProxyState;
use clap::Parser;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::peers::{ClientLog, Reads, RemoteLog};

/// A TCP segment's payload on a 1500-byte MTU path with timestamps (1500 -
/// 20 IP - 20 TCP - 12 options): what an observer on the Internet would
/// count as one packet.
const MSS: usize = 1448;
/// Time for the remote to log a closed connection.
const SETTLE: Duration = Duration::from_millis(200);

/// Replays a regtest session through the proxy under each shaping policy.
#[derive(Debug, Parser)]
struct Args {
    /// Seed of the chain and the schedule.
    #[arg(long, default_value_t = 324)]
    seed: u64,
    /// Blocks in the replayed chain.
    #[arg(long, default_value_t = 200)]
    blocks: usize,
    /// Mean block interval of the replay in ms (standing for 600 s).
    #[arg(long, default_value_t = 60)]
    block_interval_ms: u64,
    /// Mean transactions arriving per block interval.
    #[arg(long, default_value_t = 300.0)]
    txs_per_block: f64,
    /// Largest block, in bytes.
    #[arg(long, default_value_t = 400_000)]
    max_block_bytes: usize,
    /// Mean gap between inv trickles, replay ms.
    #[arg(long, default_value_t = 2.0)]
    trickle_ms: f64,
    /// Cover interval of the cover policies, replay ms (set on the
    /// configuration directly: the file's minimum of 10 ms would stand for
    /// 100 s here).
    #[arg(long, default_value_t = 1.0)]
    cover_interval_ms: f64,
    /// Length of the windows block visibility compares, replay ms.
    #[arg(long, default_value_t = 5.0)]
    window_ms: f64,
    /// Reads closer together than this (µs) are one flight.
    #[arg(long, default_value_t = 100)]
    flight_gap_us: u64,
    /// Handshake-only sessions per policy for the first-flight sizes.
    #[arg(long, default_value_t = 10)]
    handshakes: usize,
    /// Burst smoothing rates to replay, MB per second of replay time
    /// (repeatable; none with an empty list).
    #[arg(long, num_args = 0.., default_values_t = [16.0, 4.0])]
    smoothing_mb_per_s: Vec<f64>,
    /// The smoothing bucket, bytes.
    #[arg(long, default_value_t = 16_384)]
    smoothing_burst: u64,
}

/// A shaping policy: its name and its `[shaping]` section.
struct Policy {
    name: String,
    shaping: String,
}

const COVER_BUDGETS: &str = "cover_budget_per_hour = 1099511627776\ncover_global_budget_per_hour = 1099511627776\n";

fn policies(args: &Args) -> Vec<Policy> {
    let policy = |name: &str, shaping: &str| Policy { name: name.to_owned(), shaping: shaping.to_owned() };
    let mut all = vec![
        policy("off", ""),
        policy("pow2", "padding = \"pow2\"\n"),
        policy("padme", "padding = \"padme\"\n"),
        policy("cover constant", "cover = \"constant\"\n"),
        policy("cover poisson", "cover = \"poisson\"\n"),
        policy("pow2 + cover", "padding = \"pow2\"\ncover = \"constant\"\n"),
        policy("handshake decoys", "handshake_decoys = 2\nhandshake_decoy_min = 0\nhandshake_decoy_max = 1024\n"),
    ];
    for &rate in &args.smoothing_mb_per_s {
        let bytes = (rate * 1e6) as u64;
        all.push(Policy {
            name: format!("smoothing {rate} MB/s"),
            shaping: format!("smoothing_rate = {bytes}\nsmoothing_burst = {}\n", args.smoothing_burst),
        });
    }
    all
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = std::time::Instant::now();
    let params = chain::Params {
        seed: args.seed,
        blocks: args.blocks,
        block_interval: Duration::from_millis(args.block_interval_ms),
        txs_per_block_interval: args.txs_per_block,
        trickle: Duration::from_secs_f64(args.trickle_ms / 1000.0),
        // Core's PING_INTERVAL, 2 minutes, scaled.
        ping: Duration::from_millis(args.block_interval_ms).mul_f64(120.0 / 600.0),
        max_block_bytes: args.max_block_bytes,
    };
    let chain = chain::build(&params);
    let built = started.elapsed();

    let (remote, remote_logs) = peers::spawn_remote(params.ping)?;
    let (observer, recordings) = peers::spawn_observer(remote)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    let mut rows = Vec::new();
    let mut flights_by_policy = Vec::new();
    for policy in policies(&args) {
        let proxy = ProxyThread::start(&policy.shaping, Duration::from_secs_f64(args.cover_interval_ms / 1000.0))?;
        let conn = recordings.lock().unwrap_or_else(|e| e.into_inner()).len();
        let client = runtime.block_on(peers::replay(proxy.addr, observer, &chain)).context(policy.name.clone())?;
        std::thread::sleep(SETTLE);
        let reads = recording(&recordings, conn)?;
        let remote_log = remote_logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(conn)
            .context("the remote saw no session")?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let row = measure(policy.name.clone(), &args, &client, &reads, &remote_log)?;
        eprintln!("{:<18} done after {:.0?}", policy.name, started.elapsed());
        rows.push(row);

        let mut flights = Vec::new();
        for _ in 0..args.handshakes {
            let conn = recordings.lock().unwrap_or_else(|e| e.into_inner()).len();
            runtime.block_on(peers::handshake_only(proxy.addr, observer))?;
            let reads = recording(&recordings, conn)?;
            let sizes = flight_sizes(
                &reads.lock().unwrap_or_else(|e| e.into_inner()),
                Duration::from_micros(args.flight_gap_us),
            );
            flights.push((sizes.first().copied().unwrap_or(0), sizes.get(1).copied().unwrap_or(0)));
        }
        flights_by_policy.push((policy.name, flights));
        proxy.stop();
    }
    print_report(&args, &params, &chain, &rows, &flights_by_policy, built, started.elapsed());
    Ok(())
}

/// The observer's reads of connection `conn`.
fn recording(recordings: &Mutex<Vec<Reads>>, conn: usize) -> anyhow::Result<Reads> {
    recordings.lock().unwrap_or_else(|e| e.into_inner()).get(conn).cloned().context("the observer saw no session")
}

/// The proxy's library entry point on a runtime thread of its own.
struct ProxyThread {
    addr: SocketAddr,
    shutdown: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl ProxyThread {
    fn start(shaping: &str, cover_interval: Duration) -> anyhow::Result<ProxyThread> {
        let path = std::env::temp_dir().join(format!("bip324-proxy-shaping-example-{}.toml", std::process::id()));
        std::fs::write(&path, format!("[shaping]\n{shaping}{COVER_BUDGETS}")).context("writing the configuration")?;
        let cli = Cli::try_parse_from(["bip324-proxy", "--config", path.to_str().context("temp path")?])?;
        let loaded = Config::load(&cli);
        let _ = std::fs::remove_file(&path);
        let mut config = loaded.map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(cover) = &mut config.shaping.cover {
            cover.interval = cover_interval;
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState::new(Arc::new(config), Arc::new(Observer::default())));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let bound = vec![Bound { listener: listener.into(), front: FrontEnd::Main }];
            if let Err(e) = runtime.block_on(bip324_proxy::server::serve(bound, state, token)) {
                eprintln!("proxy: {e}");
            }
        });
        Ok(ProxyThread { addr, shutdown, thread })
    }

    fn stop(self) {
        self.shutdown.cancel();
        let _ = self.thread.join();
    }
}

/// One policy's numbers.
struct Row {
    name: String,
    flights: usize,
    flights_distinct: usize,
    flight_entropy: f64,
    segments_distinct: usize,
    segment_entropy: f64,
    visibility: f64,
    detected: f64,
    wire_bytes: u64,
    genuine_bytes: u64,
    decoy_bytes: u64,
    latency_p50: Duration,
    latency_p99: Duration,
    /// Of `block` messages alone (a few hundred of tens of thousands).
    block_latency_p50: Duration,
    block_latency_max: Duration,
    messages: usize,
    /// The replayed schedule's length.
    seconds: f64,
}

/// Reads less than `gap` apart merged: the bursts an observer tells apart.
fn flight_sizes(reads: &[(Instant, usize)], gap: Duration) -> Vec<usize> {
    let mut flights = Vec::new();
    let mut last: Option<Instant> = None;
    for &(at, n) in reads {
        match last {
            Some(previous) if at.saturating_duration_since(previous) < gap => {
                if let Some(current) = flights.last_mut() {
                    *current += n;
                }
            }
            _ => flights.push(n),
        }
        last = Some(at);
    }
    flights
}

/// Distinct values and Shannon entropy (bits) of a size distribution.
fn distinct_and_entropy(sizes: impl IntoIterator<Item = usize>) -> (usize, f64) {
    let mut counts: HashMap<usize, u64> = HashMap::new();
    let mut total = 0u64;
    for size in sizes {
        *counts.entry(size).or_default() += 1;
        total += 1;
    }
    let entropy = counts
        .values()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum::<f64>();
    // One size only: -1 * log2(1) is -0, printed as such.
    (counts.len(), if entropy > 0.0 { entropy } else { 0.0 })
}

fn measure(name: String, args: &Args, client: &ClientLog, reads: &Reads, remote: &RemoteLog) -> anyhow::Result<Row> {
    let reads = reads.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(remote.done, "{name}: the remote did not see the session end");

    // Exactly what the client wrote reached the remote, in order: decoys
    // carried nothing.
    ensure!(
        remote.received.len() == client.sent.len(),
        "{name}: the remote got {} messages, the client sent {}",
        remote.received.len(),
        client.sent.len()
    );
    let mut latencies = Vec::with_capacity(client.sent.len());
    let mut block_latencies = Vec::new();
    for (k, ((sent_at, sent), (got_at, got))) in client.sent.iter().zip(&remote.received).enumerate() {
        ensure!(sent == got, "{name}: message {k} differs");
        // The VERSION went out in the handshake; the rest are relayed.
        if k > 0 {
            let latency = got_at.saturating_duration_since(*sent_at);
            latencies.push(latency);
            if sent == b"block\0\0\0\0\0\0\0" {
                block_latencies.push(latency);
            }
        }
    }
    latencies.sort();
    block_latencies.sort();

    // After the handshake's two flights (key and garbage; the encrypted one).
    let flights = flight_sizes(&reads, Duration::from_micros(args.flight_gap_us));
    let after = flights.get(2..).unwrap_or_default();
    let (flights_distinct, flight_entropy) = distinct_and_entropy(after.iter().copied());
    let segments =
        after.iter().flat_map(|&f| std::iter::repeat_n(MSS, f / MSS).chain((f % MSS > 0).then_some(f % MSS)));
    let (segments_distinct, segment_entropy) = distinct_and_entropy(segments);

    let (visibility, detected) = block_visibility(&reads, client, Duration::from_secs_f64(args.window_ms / 1000.0));
    Ok(Row {
        name,
        flights: after.len(),
        flights_distinct,
        flight_entropy,
        segments_distinct,
        segment_entropy,
        visibility,
        detected,
        wire_bytes: reads.iter().map(|r| r.1 as u64).sum(),
        genuine_bytes: remote.genuine_bytes,
        decoy_bytes: remote.decoy_bytes + remote.handshake_decoys.iter().sum::<usize>() as u64,
        latency_p50: percentile(&latencies, 0.5),
        latency_p99: percentile(&latencies, 0.99),
        block_latency_p50: percentile(&block_latencies, 0.5),
        block_latency_max: block_latencies.last().copied().unwrap_or_default(),
        messages: client.sent.len(),
        seconds: match (client.started, client.ended) {
            (Some(start), Some(end)) => (end - start).as_secs_f64(),
            _ => 0.0,
        },
    })
}

/// Block visibility: the mean bytes the observer saw in the window after
/// each block announcement, over the mean bytes of every other window of the
/// same length in the session (the session cut into windows from its start,
/// those touching a block window left out). And the share of block windows
/// that hold more bytes than 99% of those other windows.
fn block_visibility(reads: &[(Instant, usize)], client: &ClientLog, window: Duration) -> (f64, f64) {
    let (Some(start), Some(end)) = (client.started, client.ended) else { return (f64::NAN, f64::NAN) };
    let bytes_in = |from: Instant, to: Instant| -> u64 {
        reads.iter().filter(|(at, _)| *at >= from && *at < to).map(|r| r.1 as u64).sum()
    };
    let blocks: Vec<u64> = client.block_announced.iter().map(|&at| bytes_in(at, at + window)).collect();
    let touches_block =
        |from: Instant, to: Instant| client.block_announced.iter().any(|&at| at < to && at + window > from);
    let mut baseline = Vec::new();
    let mut from = start;
    while from + window <= end {
        let to = from + window;
        if !touches_block(from, to) {
            baseline.push(bytes_in(from, to));
        }
        from = to;
    }
    if blocks.is_empty() || baseline.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
    baseline.sort_unstable();
    let p99 = baseline[((baseline.len() - 1) as f64 * 0.99).round() as usize];
    let detected = blocks.iter().filter(|&&b| b > p99).count() as f64 / blocks.len() as f64;
    (mean(&blocks) / mean(&baseline).max(1.0), detected)
}

fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * quantile).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Today's date (UTC) from the system clock, as YYYY-MM-DD.
fn today() -> String {
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// The machine's load average over the last minute: latencies on a busy
/// machine are noisy (p99 most).
fn load() -> String {
    let one_minute = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("load average {one_minute} at the end")
}

fn print_report(
    args: &Args,
    params: &chain::Params,
    chain: &chain::Chain,
    rows: &[Row],
    first_flights: &[(String, Vec<(usize, usize)>)],
    built: Duration,
    elapsed: Duration,
) {
    let sizes: Vec<usize> = chain.block_sizes().collect();
    let tx_sizes: Vec<usize> = chain.txs.iter().map(|t| t.frame.len() - 24).collect();
    let command: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "Traffic shaping replay ({}; {}; `cargo run --release --example shaping{}{}`, seed {})",
        today(),
        machine(),
        if command.is_empty() { "" } else { " -- " },
        command.join(" "),
        args.seed
    );
    println!(
        "chain: {} blocks of {}..{} kB (mean {} kB), {} txs of {}..{} B, built in {:.1?}; one session per policy, {} messages from the client",
        chain.blocks.len(),
        sizes.iter().min().unwrap_or(&0) / 1000,
        sizes.iter().max().unwrap_or(&0) / 1000,
        chain.total_block_bytes() / chain.blocks.len().max(1) / 1000,
        chain.txs.len(),
        tx_sizes.iter().min().unwrap_or(&0),
        tx_sizes.iter().max().unwrap_or(&0),
        built,
        rows.first().map_or(0, |r| r.messages),
    );
    let scale = 600.0 / params.block_interval.as_secs_f64();
    println!(
        "time: 600 s block interval = {} ms (1 ms stands for {:.0} s); inv trickle every {} ms, ping every {} ms, cover decoys every {} ms (0..=256 B) while idle",
        params.block_interval.as_millis(),
        scale / 1000.0,
        args.trickle_ms,
        ms(params.ping),
        args.cover_interval_ms,
    );
    println!("observer: a relay between the proxy and the remote, one timestamp per read of the proxy's v2 bytes");
    println!(
        "  flight: reads less than {} µs apart, merged (what the observer can tell apart); the handshake's two left out",
        args.flight_gap_us
    );
    println!("  segment: a flight cut into {MSS}-byte TCP segments, as a 1500-byte MTU path carries it");
    println!("  H: Shannon entropy of the size distribution, bits");
    println!(
        "  visibility: mean bytes in the {} ms after each block announcement / mean bytes in every other {} ms window; detected: block windows above the 99th percentile of the others",
        args.window_ms, args.window_ms
    );
    println!(
        "  overhead: decoy bytes / genuine bytes on the wire; latency: client write to the remote's decryption, per message (block: of block messages alone), change against off in brackets"
    );
    if let Some(off) = rows.first() {
        println!(
            "  smoothing: a token bucket of {} B refilled at the rate, on every v2 write; the off session's mean v2 rate was {:.1} MB/s",
            args.smoothing_burst,
            off.wire_bytes as f64 / off.seconds.max(1e-9) / 1e6
        );
    }
    println!();
    println!(
        "| policy | flights | distinct | H (bits) | segment sizes | H (bits) | visibility | detected | overhead | latency p50 (ms) | p99 (ms) | block p50 (ms) | block max (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let off = rows.first();
    for row in rows {
        let delta = |value: Duration, base: Option<Duration>| match base {
            Some(base) if row.name != "off" => {
                format!("{} ({:+.2})", ms(value), (value.as_secs_f64() - base.as_secs_f64()) * 1000.0)
            }
            _ => ms(value),
        };
        println!(
            "| {} | {} | {} | {:.2} | {} | {:.2} | {:.1}x | {:.0}% | {} B ({:.1}%) | {} | {} | {} | {} |",
            row.name,
            row.flights,
            row.flights_distinct,
            row.flight_entropy,
            row.segments_distinct,
            row.segment_entropy,
            row.visibility,
            row.detected * 100.0,
            row.decoy_bytes,
            row.decoy_bytes as f64 * 100.0 / row.genuine_bytes.max(1) as f64,
            delta(row.latency_p50, off.map(|o| o.latency_p50)),
            delta(row.latency_p99, off.map(|o| o.latency_p99)),
            delta(row.block_latency_p50, off.map(|o| o.block_latency_p50)),
            delta(row.block_latency_max, off.map(|o| o.block_latency_max)),
        );
    }
    println!();
    println!(
        "first flights ({} handshake-only sessions per policy; key + garbage, then the encrypted flight: terminator, decoys, version packet, VERSION):",
        args.handshakes
    );
    for (name, flights) in first_flights {
        let (encrypted, h) = distinct_and_entropy(flights.iter().map(|f| f.1));
        let mut shown: Vec<usize> = flights.iter().map(|f| f.1).collect();
        shown.sort_unstable();
        shown.dedup();
        let keys: Vec<usize> = flights.iter().map(|f| f.0).collect();
        println!(
            "  {name:<17} key flights {}..{} B; encrypted flights: {encrypted} distinct (H {h:.2} bits): {shown:?}",
            keys.iter().min().unwrap_or(&0),
            keys.iter().max().unwrap_or(&0),
        );
    }
    let wire: u64 = rows.first().map_or(0, |r| r.wire_bytes);
    println!();
    println!("v2 bytes observed with policy off: {wire}; whole run {elapsed:.0?}; {}", load());
}
