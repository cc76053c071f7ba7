//! The verified-token cache. A token is cached on its second sight: the first only leaves an
//! 8-byte trace in a fixed table, so a stream of one-time tokens (one per message, as some
//! producers mint them) costs no cache entries and no insertions.

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{CacheSettings, Verified};

/// Bytes of the token's end hashed for the first-sight table: they lie in the signature, which
/// differs between any two distinct tokens of a key. A forged collision only admits a token early.
const TRACE_BYTES: usize = 32;

/// Hashes only the end of what it is given (the token's signature) with a keyed SipHash: a
/// lookup costs the same for a 1 KB token as for a short one. Equal tails of distinct tokens
/// only share a bucket (the key comparison is on the whole token), and the random key keeps a
/// producer from aiming tokens at one bucket.
#[derive(Clone, Default)]
struct TailHash(std::collections::hash_map::RandomState);

struct TailHasher(std::collections::hash_map::DefaultHasher);

impl std::hash::BuildHasher for TailHash {
    type Hasher = TailHasher;
    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(&bytes[bytes.len().saturating_sub(TRACE_BYTES)..]);
    }
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Verified tokens by their text, each until its `exp` (plus leeway).
pub struct TokenCache {
    entries: moka::sync::Cache<Box<str>, Arc<Verified>, TailHash>,
    /// Hashes of tokens seen once, one per slot (a newer one overwrites an older one).
    seen: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

struct UntilExpiry;

impl moka::Expiry<Box<str>, Arc<Verified>> for UntilExpiry {
    fn expire_after_create(&self, _: &Box<str>, v: &Arc<Verified>, _: std::time::Instant) -> Option<Duration> {
        Some(v.cache_ttl)
    }
}

impl TokenCache {
    /// A cache of `settings.max_entries` tokens; `None` when that is 0.
    pub fn new(settings: &CacheSettings) -> Option<TokenCache> {
        if settings.max_entries == 0 {
            return None;
        }
        // As many first-sight slots as cache entries (8 bytes each), at least 1024.
        let slots = (settings.max_entries as usize).clamp(1024, 1 << 24).next_power_of_two();
        Some(TokenCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(UntilExpiry)
                .build_with_hasher(TailHash::default()),
            seen: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// The verified token, if cached.
    pub fn get(&self, token: &str) -> Option<Arc<Verified>> {
        self.entries.get(token)
    }

    /// Forgets a token (its key set changed).
    pub fn invalidate(&self, token: &str) {
        self.entries.invalidate(token);
    }

    /// Caches `v` if `token` was seen before; a first sight only records it.
    pub fn offer(&self, token: &str, v: Arc<Verified>) {
        let tail = &token.as_bytes()[token.len().saturating_sub(TRACE_BYTES)..];
        let h = self.hasher.hash_one(tail) | 1; // never 0, the empty slot
        let slot = &self.seen[(h as usize) & (self.seen.len() - 1)];
        if slot.swap(h, Ordering::Relaxed) == h {
            self.entries.insert(token.into(), v);
        }
    }

    /// Tokens cached (after pending maintenance), for tests and benchmarks.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_cached_on_its_second_sight_only() {
        let cache = TokenCache::new(&CacheSettings::default()).unwrap();
        let v = Arc::new(Verified::for_tests());
        for i in 0..1000 {
            cache.offer(&format!("one-time-token-{i}-signature-part-that-differs-{i}"), Arc::clone(&v));
        }
        assert_eq!(cache.len(), 0, "tokens seen once are not cached");
        cache.offer("reused.token.signature", Arc::clone(&v));
        assert!(cache.get("reused.token.signature").is_none());
        cache.offer("reused.token.signature", Arc::clone(&v));
        assert!(cache.get("reused.token.signature").is_some(), "cached on the second sight");
        assert!(TokenCache::new(&CacheSettings { max_entries: 0, ..CacheSettings::default() }).is_none());
    }
}
