//! `bip324-proxy probe HOST:PORT`: does a node speak v2? Dials it (through
//! the configured upstream when that carries the target), runs the BIP324
//! handshake as initiator without sending any message, and, when the node
//! stays silent as v1-only nodes do, confirms v1 with a plain VERSION, but
//! only when the fallback policy allows plaintext (`fallback = "v1"`): under
//! the default `none` the probe puts no plaintext on the wire either.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bitcoin::p2p::message::{NetworkMessage, RawNetworkMessage};
use bitcoin::p2p::message_network::VersionMessage;
use bitcoin::p2p::{Address, Magic, ServiceFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::config::Config;
use crate::network::Network;
use crate::outbound::{self, Destination, DialError};
use crate::policy::{self, DialRules, Evidence, PlaintextPermit, Plan};
use crate::socks5::{Host, Target};
use crate::upgrade::{self, UpgradeError};
use crate::v1::{HEADER_LEN, V1Header, VERSION_COMMAND};

/// What the probe found.
#[derive(Debug)]
pub enum ProbeOutcome {
    /// The node completed a BIP324 handshake.
    V2 { session_id: [u8; 32], handshake: Duration },
    /// The node ignored the v2 handshake; `answered_v1` when it then
    /// answered a plain v1 VERSION, `None` when the fallback policy forbade
    /// sending one.
    V1Only { answered_v1: Option<bool> },
    /// The node answered something that is not a BIP324 handshake.
    NotV2(UpgradeError),
    /// No TCP connection (or the upstream refused it).
    Unreachable(DialError),
}

impl ProbeOutcome {
    /// 0 for v2, 1 for v1-only (or not v2), 2 for unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProbeOutcome::V2 { .. } => 0,
            ProbeOutcome::V1Only { .. } | ProbeOutcome::NotV2(_) => 1,
            ProbeOutcome::Unreachable(_) => 2,
        }
    }

    /// The report printed for people and scripts.
    pub fn report(&self, target: &Target, network: &Network) -> String {
        match self {
            ProbeOutcome::V2 { session_id, handshake } => format!(
                "{target} speaks v2 (BIP324)\n  network     {network}\n  session id  {}\n  handshake   {:.1} ms",
                hex::encode(session_id),
                handshake.as_secs_f64() * 1000.0
            ),
            ProbeOutcome::V1Only { answered_v1: Some(true) } => {
                format!("{target} speaks v1 only: it sent nothing back to our v2 key, then answered a v1 VERSION")
            }
            ProbeOutcome::V1Only { answered_v1: Some(false) } => format!(
                "{target} does not speak v2: it sent nothing back to our v2 key (and no v1 VERSION answer either)"
            ),
            ProbeOutcome::V1Only { answered_v1: None } => format!(
                "{target} does not speak v2: it sent nothing back to our v2 key \
                 (v1 not tried: fallback = none sends no plaintext)"
            ),
            ProbeOutcome::NotV2(error) => format!("{target} does not speak v2: {error}"),
            ProbeOutcome::Unreachable(error) => format!("{target} unreachable: {error}"),
        }
    }
}

/// Probes `target` on `network`.
pub async fn probe(target: &Target, network: &Network, config: &Config) -> ProbeOutcome {
    let destination = Destination {
        target: target.clone(),
        name: match &target.host {
            Host::Name(name) => Some(name.clone()),
            Host::Ip(_) => None,
        },
        upstream_credentials: None,
    };
    // The operator's own command: any target but this host's proxy listeners.
    let rules = DialRules {
        listening: config.listen_addresses().into_iter().map(|(_, addr)| addr).collect(),
        allow_private: true,
    };
    let mut remote = match outbound::dial(&destination, config, &rules).await {
        Ok(remote) => remote,
        Err(error) => return ProbeOutcome::Unreachable(error),
    };
    let started = Instant::now();
    let key = upgrade::InitiatorKey::generate();
    let upgraded = upgrade::upgrade(&mut remote, key, network.magic, None, config.timeouts.handshake).await;
    match upgraded {
        Ok(channel) => ProbeOutcome::V2 { session_id: channel.session_id, handshake: started.elapsed() },
        Err(error) if error.remote_is_v1_only() => {
            drop(remote);
            let answered_v1 = match policy::plan(config.fallback, Evidence::UpgradeFailed { remote_silent: true }) {
                Plan::Plaintext(permit) => Some(answers_v1(permit, &destination, network, config, &rules).await),
                Plan::Upgrade | Plan::Refuse(_) => None,
            };
            ProbeOutcome::V1Only { answered_v1 }
        }
        Err(error) => ProbeOutcome::NotV2(error),
    }
}

/// Sends a v1 VERSION and checks that a v1 VERSION comes back.
async fn answers_v1(
    _permit: PlaintextPermit,
    destination: &Destination,
    network: &Network,
    config: &Config,
    rules: &DialRules,
) -> bool {
    let Ok(mut remote) = outbound::dial(destination, config, rules).await else { return false };
    let exchange = async {
        remote.write_all(&version_message(network, destination)).await.ok()?;
        let mut header = [0u8; HEADER_LEN];
        remote.read_exact(&mut header).await.ok()?;
        let header = V1Header::decode(&header);
        Some(header.magic == network.magic && header.command == VERSION_COMMAND)
    };
    matches!(timeout(config.timeouts.handshake, exchange).await, Ok(Some(true)))
}

/// A VERSION message from a node that offers no services.
fn version_message(network: &Network, destination: &Destination) -> Vec<u8> {
    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let receiver = match destination.target.host {
        Host::Ip(ip) => std::net::SocketAddr::new(ip, destination.target.port),
        Host::Name(_) => unspecified,
    };
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let mut version = VersionMessage::new(
        ServiceFlags::NONE,
        timestamp,
        Address::new(&receiver, ServiceFlags::NONE),
        Address::new(&unspecified, ServiceFlags::NONE),
        rand::random(),
        format!("/bip324-proxy:{}/", env!("CARGO_PKG_VERSION")),
        0,
    );
    version.relay = false;
    let message = RawNetworkMessage::new(Magic::from_bytes(network.magic), NetworkMessage::Version(version));
    bitcoin::consensus::encode::serialize(&message)
}
