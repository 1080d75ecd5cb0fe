//! System calls a child process makes over a measured window (`--syscalls`),
//! counted by the kernel's syscall tracepoints through `perf stat -p`: no
//! ptrace, so unlike `strace -c` the process runs at full speed and batches
//! its I/O as it does unobserved. Where perf is missing or not allowed
//! (`perf_event_paranoid`), the report says so instead.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// The system calls counted one by one; everything else is in `other`.
const NAMED: [&str; 8] = ["read", "recvfrom", "write", "writev", "sendto", "epoll_wait", "futex", "sched_yield"];
/// Time perf may take beyond the window to print its counts.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts over one window.
#[derive(Debug, Clone, Default)]
pub struct SyscallCounts {
    pub total: u64,
    /// In the order of [`NAMED`], then `other`.
    pub by_name: Vec<(&'static str, u64)>,
}

/// A `perf stat` attached to a process for a fixed time.
pub struct Counting {
    perf: Child,
    window: Duration,
}

impl Counting {
    /// Starts counting the system calls of `pid` for `window`.
    pub fn start(pid: u32, window: Duration) -> anyhow::Result<Counting> {
        let mut events = vec!["raw_syscalls:sys_enter".to_owned()];
        events.extend(NAMED.iter().map(|name| format!("syscalls:sys_enter_{name}")));
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &events.join(","), "-p", &pid.to_string(), "--", "sleep"])
            .arg(format!("{:.3}", window.as_secs_f64()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting perf (install linux-perf, or run without --syscalls)")?;
        Ok(Counting { perf, window })
    }

    /// Waits for the window to end and reads the counts.
    pub async fn finish(self) -> anyhow::Result<SyscallCounts> {
        let output = tokio::time::timeout(self.window + REPORT_TIMEOUT, self.perf.wait_with_output())
            .await
            .context("perf did not finish")??;
        let text = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("perf stat failed: {}", text.trim());
        }
        parse(&text)
    }
}

/// `perf stat -x ,` lines: `count,unit,event,...`.
fn parse(text: &str) -> anyhow::Result<SyscallCounts> {
    let mut counts = SyscallCounts::default();
    let mut named = [0u64; NAMED.len()];
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(count), Some(event)) = (fields.first(), fields.get(2)) else { continue };
        let Ok(count) = count.trim().parse::<u64>() else {
            if event.starts_with("raw_syscalls") || event.starts_with("syscalls") {
                bail!("perf could not count {event}: {}", count.trim());
            }
            continue;
        };
        if *event == "raw_syscalls:sys_enter" {
            counts.total = count;
        } else if let Some(name) = event.strip_prefix("syscalls:sys_enter_")
            && let Some(slot) = NAMED.iter().position(|n| *n == name)
        {
            named[slot] = count;
        }
    }
    let listed: u64 = named.iter().sum();
    counts.by_name = NAMED.iter().copied().zip(named).collect();
    counts.by_name.push(("other", counts.total.saturating_sub(listed)));
    Ok(counts)
}
