//! What every session of one proxy shares: the validated configuration, the
//! observer (metrics and status), the v1-only peer memory, the clients seen
//! speaking v2 themselves, the handshake key pool, the budget for large
//! messages and the addresses the proxy listens on. Built once by `main` (or a
//! test), handed to `server::serve`, read by every session; it depends on
//! nothing that runs, so the accept loop, the sessions and their stages all
//! point here and never at each other.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::memory::{V1OnlyMemory, V2Clients};
use crate::metrics::Observer;
use crate::relay::{MessageBudget, RelayLimits};
use crate::upgrade::KeyPool;

/// What every session of one proxy shares.
pub struct ProxyState {
    pub config: Arc<Config>,
    pub observer: Arc<Observer>,
    pub v1_only: Option<V1OnlyMemory>,
    /// Clients passed through lately: `early_key = "auto"` holds our key
    /// for their sessions.
    pub v2_clients: V2Clients,
    /// Handshake keys made ahead of time (they serve every network).
    pub keys: Arc<KeyPool>,
    /// Every address this proxy listens on, as bound (sessions never dial them).
    listening: Mutex<Vec<SocketAddr>>,
    /// What all relays together may hold of large messages being received.
    large_messages: Arc<MessageBudget>,
}

/// Keys kept ready.
const KEY_POOL_DEPTH: usize = 8;
/// Clients remembered as speaking v2 themselves, and for how long.
const V2_CLIENTS_CAPACITY: usize = 1024;
const V2_CLIENTS_TTL: Duration = Duration::from_secs(3600);

impl ProxyState {
    pub fn new(config: Arc<Config>, observer: Arc<Observer>) -> Self {
        let (capacity, ttl) = config.v1_only_memory;
        let keys = KeyPool::new(KEY_POOL_DEPTH, observer.key_pool_counters());
        let listening = Mutex::new(config.listen_addresses().into_iter().map(|(_, addr)| addr).collect());
        let large_messages = Arc::new(MessageBudget::new(config.large_message_budget));
        let v2_clients = V2Clients::new(V2_CLIENTS_CAPACITY, V2_CLIENTS_TTL).expect("a non-zero capacity");
        let v1_only = V1OnlyMemory::new(capacity, ttl);
        ProxyState { v1_only, v2_clients, config, observer, keys, listening, large_messages }
    }

    /// Records an address a listener of this proxy is bound to.
    pub fn add_listening(&self, addr: SocketAddr) {
        let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        if !listening.contains(&addr) {
            listening.push(addr);
        }
    }

    /// What bounds every relay of this proxy.
    pub fn relay_limits(&self) -> RelayLimits {
        RelayLimits {
            idle: self.config.timeouts.idle,
            write_stall: self.config.timeouts.write_stall,
            large_messages: self.large_messages.clone(),
        }
    }

    /// Every address this proxy listens on: configured and bound.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
