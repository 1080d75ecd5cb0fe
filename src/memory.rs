//! What sessions learn and later sessions use, each remembered for a while
//! in a bounded LRU ([`Recent`]):
//!
//! - [`V1OnlyMemory`]: remotes that proved v1-only (Bitcoin Core's rule: not
//!   one byte after our key), so the next session to them does not repeat
//!   the failed handshake. Session policy decides what a remembered peer
//!   means (refuse, or v1 straight away).
//! - [`V2Clients`]: clients that spoke v2 themselves (passthrough), so their
//!   next sessions hold our key until their first bytes are in rather than
//!   redial (`early_key = "auto"`, see `policy::send_key_early`).

use std::borrow::Borrow;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::stream::ClientKey;

/// Remembered v1-only remotes, keyed by the target as the client named it.
pub type V1OnlyMemory = Recent<String>;

/// Clients (by address, or user on a Unix socket) that were passed through.
pub type V2Clients = Recent<ClientKey>;

/// Keys seen within the last `ttl`, at most `capacity` of them (the least
/// recently used go first).
pub struct Recent<K: Hash + Eq> {
    entries: Mutex<LruCache<K, Instant>>,
    ttl: Duration,
}

impl<K: Hash + Eq> Recent<K> {
    /// `None` when `capacity` is 0 (the memory is off).
    pub fn new(capacity: usize, ttl: Duration) -> Option<Self> {
        let capacity = NonZeroUsize::new(capacity)?;
        Some(Recent { entries: Mutex::new(LruCache::new(capacity)), ttl })
    }

    pub fn remember<Q: ToOwned<Owned = K> + ?Sized>(&self, key: &Q) {
        self.remember_at(key, Instant::now());
    }

    pub fn contains<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.contains_at(key, Instant::now())
    }

    pub fn remember_at<Q: ToOwned<Owned = K> + ?Sized>(&self, key: &Q, now: Instant) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).put(key.to_owned(), now);
    }

    pub fn contains_at<Q: Hash + Eq + ?Sized>(&self, key: &Q, now: Instant) -> bool
    where
        K: Borrow<Q>,
    {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(since) if now.saturating_duration_since(*since) < self.ttl => true,
            Some(_) => {
                entries.pop(key);
                false
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_ttl() {
        let memory = V1OnlyMemory::new(8, Duration::from_secs(60)).unwrap();
        let t0 = Instant::now();
        assert!(!memory.contains_at("203.0.113.7:8333", t0));
        memory.remember_at("203.0.113.7:8333", t0);
        assert!(memory.contains_at("203.0.113.7:8333", t0 + Duration::from_secs(59)));
        assert!(!memory.contains_at("203.0.113.7:8333", t0 + Duration::from_secs(60)));
        assert!(memory.is_empty(), "expired entries are dropped");
    }

    #[test]
    fn bounded_least_recently_used() {
        let memory = V1OnlyMemory::new(2, Duration::from_secs(60)).unwrap();
        let t0 = Instant::now();
        memory.remember_at("a:1", t0);
        memory.remember_at("b:1", t0);
        assert!(memory.contains_at("a:1", t0));
        memory.remember_at("c:1", t0);
        assert_eq!(memory.len(), 2);
        assert!(memory.contains_at("a:1", t0));
        assert!(!memory.contains_at("b:1", t0), "least recently used is evicted");
    }

    #[test]
    fn zero_capacity_is_off() {
        assert!(V1OnlyMemory::new(0, Duration::from_secs(60)).is_none());
    }
}
