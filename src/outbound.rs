//! Dial a [`Target`]: resolve a hostname to every A/AAAA record and try them
//! in turn, each attempt bounded by the connect timeout. `.onion` names are
//! never handed to the system resolver.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::socks5::{Host, Target};

/// Bitcoin Core waits 20 s for a SOCKS5 reply; a dial that has not finished
/// by then helps nobody, however many addresses are left to try.
pub const DIAL_DEADLINE: Duration = Duration::from_secs(19);

/// Why a dial failed; `session.rs` maps each to a SOCKS5 reply code.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("`{0}` is an onion service; reaching it needs an upstream proxy such as Tor")]
    OnionNeedsUpstream(String),
    #[error("resolving `{name}`: {source}")]
    Resolve { name: String, source: io::Error },
    #[error("`{0}` resolved to no address")]
    NoAddresses(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {addr}: timed out")]
    ConnectTimeout { addr: SocketAddr },
}

/// Connects to `target`, with TCP_NODELAY set (without it every handshake
/// round trip can stall on delayed ACKs).
pub async fn dial(target: &Target, connect_timeout: Duration) -> Result<TcpStream, DialError> {
    let deadline = Instant::now() + DIAL_DEADLINE;
    let addrs = resolve(target, deadline).await?;
    let mut last_error = None;
    for addr in addrs {
        let attempt_deadline = deadline.min(Instant::now() + connect_timeout);
        match timeout_at(attempt_deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Failing to set NODELAY only costs latency.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(source)) => last_error = Some(DialError::Connect { addr, source }),
            Err(_) => last_error = Some(DialError::ConnectTimeout { addr }),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(last_error.unwrap_or_else(|| DialError::NoAddresses(target.to_string())))
}

async fn resolve(target: &Target, deadline: Instant) -> Result<Vec<SocketAddr>, DialError> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(_) if target.is_onion() => Err(DialError::OnionNeedsUpstream(target.to_string())),
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), target.port));
            let remaining = deadline.saturating_duration_since(Instant::now());
            let addrs: Vec<SocketAddr> = match timeout(remaining, lookup).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(source)) => return Err(DialError::Resolve { name: name.clone(), source }),
                Err(_) => {
                    return Err(DialError::Resolve {
                        name: name.clone(),
                        source: io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"),
                    });
                }
            };
            if addrs.is_empty() {
                return Err(DialError::NoAddresses(name.clone()));
            }
            Ok(addrs)
        }
    }
}
