//! v1-only peer memory: remotes that proved v1-only (Bitcoin Core's rule: not
//! one byte after our key) are remembered for a while, in a bounded LRU, so
//! the next session to them does not repeat the failed handshake. Session
//! policy decides what a remembered peer means (refuse, or v1 straight away).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

/// Remembered v1-only remotes, keyed by the target as the client named it.
pub struct V1OnlyMemory {
    entries: Mutex<LruCache<String, Instant>>,
    ttl: Duration,
}

impl V1OnlyMemory {
    /// `None` when `capacity` is 0 (the memory is off).
    pub fn new(capacity: usize, ttl: Duration) -> Option<Self> {
        let capacity = NonZeroUsize::new(capacity)?;
        Some(V1OnlyMemory { entries: Mutex::new(LruCache::new(capacity)), ttl })
    }

    pub fn remember(&self, target: &str) {
        self.remember_at(target, Instant::now());
    }

    pub fn is_v1_only(&self, target: &str) -> bool {
        self.is_v1_only_at(target, Instant::now())
    }

    pub fn remember_at(&self, target: &str, now: Instant) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).put(target.to_owned(), now);
    }

    pub fn is_v1_only_at(&self, target: &str, now: Instant) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(target) {
            Some(since) if now.saturating_duration_since(*since) < self.ttl => true,
            Some(_) => {
                entries.pop(target);
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
        assert!(!memory.is_v1_only_at("203.0.113.7:8333", t0));
        memory.remember_at("203.0.113.7:8333", t0);
        assert!(memory.is_v1_only_at("203.0.113.7:8333", t0 + Duration::from_secs(59)));
        assert!(!memory.is_v1_only_at("203.0.113.7:8333", t0 + Duration::from_secs(60)));
        assert!(memory.is_empty(), "expired entries are dropped");
    }

    #[test]
    fn bounded_least_recently_used() {
        let memory = V1OnlyMemory::new(2, Duration::from_secs(60)).unwrap();
        let t0 = Instant::now();
        memory.remember_at("a:1", t0);
        memory.remember_at("b:1", t0);
        assert!(memory.is_v1_only_at("a:1", t0));
        memory.remember_at("c:1", t0);
        assert_eq!(memory.len(), 2);
        assert!(memory.is_v1_only_at("a:1", t0));
        assert!(!memory.is_v1_only_at("b:1", t0), "least recently used is evicted");
    }

    #[test]
    fn zero_capacity_is_off() {
        assert!(V1OnlyMemory::new(0, Duration::from_secs(60)).is_none());
    }
}
