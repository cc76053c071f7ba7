//! The verified-token cache. A token is cached on its second sight: the first only leaves an
//! 8-byte trace in a fixed table, so a stream of one-time tokens (one per message, as some
//! producers mint them) costs no cache entries and no insertions. An entry is the token's text
//! and its [`Verified`], kept by `quick_cache` (about 75 bytes of bookkeeping per entry, against
//! about 400 for `moka`); a stale entry (past `exp`, or past the TTL of a token without one) is
//! never used and goes when the cache needs its room.

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Lookups answered from the cache and not, by every cache of the process (a reload's new
/// cache counts on): `tokengate_token_cache_lookups_total`.
static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);

/// Lookups of every cache so far: (hits, misses).
pub fn lookups() -> (u64, u64) {
    (HITS.load(Ordering::Relaxed), MISSES.load(Ordering::Relaxed))
}

/// Verified tokens by their text, each until its `exp` (plus leeway).
pub struct TokenCache {
    entries: quick_cache::sync::Cache<Box<str>, Arc<Verified>, quick_cache::UnitWeighter, TailHash>,
    /// Hashes of tokens seen once, one per slot (a newer one overwrites an older one).
    seen: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl TokenCache {
    /// A cache of `settings.max_entries` tokens; `None` when that is 0.
    pub fn new(settings: &CacheSettings) -> Option<TokenCache> {
        if settings.max_entries == 0 {
            return None;
        }
        // As many first-sight slots as cache entries (8 bytes each), at least 1024.
        let slots = (settings.max_entries as usize).clamp(1024, 1 << 24).next_power_of_two();
        let most = usize::try_from(settings.max_entries).unwrap_or(usize::MAX);
        Some(TokenCache {
            entries: quick_cache::sync::Cache::with(
                most,
                settings.max_entries,
                quick_cache::UnitWeighter,
                TailHash::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
            seen: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// The verified token, if cached and not stale at unix time `now`.
    pub fn get(&self, token: &str, now: i64) -> Option<Arc<Verified>> {
        match self.entries.get(token) {
            Some(v) if now <= v.cached_until => {
                HITS.fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            stale => {
                MISSES.fetch_add(1, Ordering::Relaxed);
                if stale.is_some() {
                    self.entries.remove(token); // its room goes to a fresh token
                }
                None
            }
        }
    }

    /// Forgets a token (its key set changed).
    pub fn invalidate(&self, token: &str) {
        self.entries.remove(token);
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

    /// Tokens cached, for tests and benchmarks.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
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
        let now = crate::verify::unix_now();
        cache.offer("reused.token.signature", Arc::clone(&v));
        assert!(cache.get("reused.token.signature", now).is_none());
        cache.offer("reused.token.signature", Arc::clone(&v));
        assert!(cache.get("reused.token.signature", now).is_some(), "cached on the second sight");
        assert!(cache.get("reused.token.signature", now + 61).is_none(), "never used once stale");
        assert_eq!(cache.len(), 0, "and dropped then");
        assert!(TokenCache::new(&CacheSettings { max_entries: 0, ..CacheSettings::default() }).is_none());
    }
}
