//! The parent's side of the child processes: the bench binary re-executed
//! with `--role`, its "ready" line read for the addresses it listens on, its
//! CPU and memory read from /proc, and its end (SIGKILL and reaping).
//!
//! What a child runs is in `roles.rs`. Every child also exits on its own
//! when its stdin reaches end of file, so a parent that dies without
//! cleaning up leaves nothing behind.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::procfs;

/// How long a child may take to bind and report its addresses.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What a re-executed bench binary does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// bip324-proxy through its library entry point `server::run`.
    Proxy,
    /// A plain TCP forwarder to `--target`: tokio's `copy_bidirectional`.
    Relay,
    /// The v2 and v1 echo nodes.
    Nodes,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Relay => "relay",
            Role::Nodes => "nodes",
        }
    }
}

/// A running child and the addresses it listens on, in the order it printed them.
pub struct ChildProcess {
    role: Role,
    process: Child,
    /// Held open: the child exits when it closes.
    stdin: Option<ChildStdin>,
    pub pid: u32,
    pub addrs: Vec<SocketAddr>,
}

impl ChildProcess {
    /// Starts `current_exe --role <role> <args>` and waits for `ready ADDR...`.
    pub async fn spawn(role: Role, args: &[String]) -> anyhow::Result<ChildProcess> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut command = Command::new(exe);
        command
            .arg("--role")
            .arg(role.name())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // The proxy's CLI reads these; the measured configuration is only ours.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BIP324_PROXY_") {
                command.env_remove(key);
            }
        }
        let mut process = command.spawn().with_context(|| format!("starting the {} process", role.name()))?;
        let pid = process.id().context("child pid")?;
        let stdin = process.stdin.take();
        let stdout = process.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("the {} process did not report ready", role.name()))??
            .with_context(|| format!("the {} process exited before it was ready", role.name()))?;
        let Some(rest) = line.strip_prefix("ready ") else {
            bail!("the {} process said {line:?} instead of ready", role.name());
        };
        let addrs = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<SocketAddr>, _>>()
            .with_context(|| format!("addresses in {line:?}"))?;
        Ok(ChildProcess { role, process, stdin, pid, addrs })
    }

    /// CPU time and page faults of the child so far.
    pub fn stat(&self) -> anyhow::Result<procfs::ProcessStat> {
        procfs::process_stat(self.pid).with_context(|| format!("reading the {} process's stat", self.role.name()))
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        procfs::rss_kib(self.pid).with_context(|| format!("reading the {} process's VmRSS", self.role.name()))
    }

    /// Open file descriptors.
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        procfs::open_fds(self.pid).with_context(|| format!("counting the {} process's files", self.role.name()))
    }

    /// SIGKILL, then reap. Nothing the child does matters any more by then.
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        let _ = self.process.kill().await;
    }
}

/// In a child: exit as soon as the parent closes our stdin or goes away.
pub fn exit_with_parent() {
    std::thread::spawn(|| {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut scratch = [0u8; 64];
        loop {
            match stdin.read(&mut scratch) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
}

/// In a child: tell the parent where we listen. Nothing else goes to stdout.
pub fn announce_ready(addrs: &[SocketAddr]) {
    let list: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    println!("ready {}", list.join(" "));
}
