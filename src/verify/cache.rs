//! The verified-token cache. A token is cached on its second sight: the first only leaves an
//! 8-byte trace in a fixed table, so a stream of one-time tokens (one per message, as some
//! producers mint them) costs no cache entries and no insertions. An entry is keyed by the
//! SHA-256 of the whole token (signature included), not its text: a cached token costs the same
//! whatever its length, and a token whose signature differs in a single bit is another key. Its
//! value is the [`Verified`] record, kept by `quick_cache`; a stale entry (past `exp`, or past the
//! TTL of a token without one) is never used and goes when the cache needs its room.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CacheSettings, Verified};

/// A cache key: SHA-256 of the whole token. Collision resistance is what makes the key safe: no
/// other token (a forged signature, say) can hit a verified token's entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    /// The key of `token`.
    pub fn of(token: &str) -> Key {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut k = [0; 32];
        k.copy_from_slice(d.as_ref());
        Key(k)
    }

    /// 64 bits of the digest: as good as any hash of the token (no producer can aim SHA-256).
    fn word(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.word(0));
    }
}

/// Takes a [`Key`]'s own 64 bits as its hash: the digest is already uniform.
#[derive(Clone, Default)]
struct KeyHash;

#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::BuildHasher for KeyHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys hashed another way; fold them in.
        for chunk in bytes.chunks(8) {
            let mut w = [0; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(w);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
    fn finish(&self) -> u64 {
        self.0
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

/// Each cache's identity, so that a thread's recent tokens ([`TokenCache::recent`]) are never
/// taken from another cache (a reload's new verifier starts a new one).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Slots of a thread's recent tokens, and the longest token kept in one.
const RECENT_SLOTS: usize = 64;
const RECENT_MAX_BYTES: usize = 4096;

/// A token a thread found in a cache, by its whole text.
struct Recent {
    cache: u64,
    token: Box<str>,
    verified: Arc<Verified>,
}

thread_local! {
    /// Each thread's recent cache hits, one per slot (chosen by the token's last bytes).
    static RECENT: RefCell<Vec<Option<Recent>>> = RefCell::new((0..RECENT_SLOTS).map(|_| None).collect());
}

/// The slot of `token`: from its last 8 bytes (the signature's tail), mixed. A producer aiming
/// tokens at one slot only makes them miss here and take the digest path.
fn recent_slot(token: &str) -> usize {
    let b = token.as_bytes();
    let mut tail = [0u8; 8];
    let n = b.len().min(8);
    tail[..n].copy_from_slice(&b[b.len() - n..]);
    // The product's high bits mix all eight bytes.
    (u64::from_le_bytes(tail).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % RECENT_SLOTS
}

/// Verified tokens by their key, each until its `exp` (plus leeway).
pub struct TokenCache {
    id: u64,
    entries: quick_cache::sync::Cache<Key, Arc<Verified>, quick_cache::UnitWeighter, KeyHash>,
    /// Traces of tokens seen once, one per slot (a newer one overwrites an older one).
    seen: Box<[AtomicU64]>,
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
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            entries: quick_cache::sync::Cache::with(
                most,
                settings.max_entries,
                quick_cache::UnitWeighter,
                KeyHash,
                quick_cache::sync::DefaultLifecycle::default(),
            ),
            seen: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The verified token of `key`, if cached and not stale at unix time `now`.
    pub fn get(&self, key: &Key, now: i64) -> Option<Arc<Verified>> {
        match self.entries.get(key) {
            Some(v) if now <= v.cached_until => {
                HITS.fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            stale => {
                MISSES.fetch_add(1, Ordering::Relaxed);
                if stale.is_some() {
                    self.entries.remove(key); // its room goes to a fresh token
                }
                None
            }
        }
    }

    /// The verified token of `token` if this thread found it in this cache lately, it is not
    /// stale at unix time `now`, and `current(v)` (its key set unchanged). Matched by comparing
    /// the whole text, byte for byte: a reused token skips the digest of [`Key::of`] (about 0.4
    /// µs for a 600-byte token, every message) for a comparison of tens of nanoseconds.
    pub fn recent(&self, token: &str, now: i64, current: impl Fn(&Verified) -> bool) -> Option<Arc<Verified>> {
        let v = RECENT.with_borrow(|slots| match &slots[recent_slot(token)] {
            Some(r) if r.cache == self.id && *r.token == *token => Some(Arc::clone(&r.verified)),
            _ => None,
        })?;
        if now > v.cached_until || !current(&v) {
            return None;
        }
        HITS.fetch_add(1, Ordering::Relaxed);
        Some(v)
    }

    /// Keeps `token`, just found in this cache, among this thread's recent tokens (tokens seen at
    /// least three times: a one-time token never gets here).
    pub fn remember(&self, token: &str, v: &Arc<Verified>) {
        if token.len() > RECENT_MAX_BYTES {
            return;
        }
        RECENT.with_borrow_mut(|slots| {
            let slot = &mut slots[recent_slot(token)];
            if slot.as_ref().is_some_and(|r| r.cache == self.id && *r.token == *token) {
                return;
            }
            *slot = Some(Recent { cache: self.id, token: token.into(), verified: Arc::clone(v) });
        });
    }

    /// Forgets a token (its key set changed).
    pub fn invalidate(&self, key: &Key) {
        self.entries.remove(key);
    }

    /// Caches `v` if the token of `key` was seen before; a first sight only records it.
    pub fn offer(&self, key: Key, v: Arc<Verified>) {
        let trace = key.word(8) | 1; // never 0, the empty slot
        let slot = &self.seen[(key.word(16) as usize) & (self.seen.len() - 1)];
        if slot.swap(trace, Ordering::Relaxed) == trace {
            self.entries.insert(key, v);
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
            cache.offer(Key::of(&format!("one-time-token-{i}")), Arc::clone(&v));
        }
        assert_eq!(cache.len(), 0, "tokens seen once are not cached");
        let now = crate::verify::unix_now();
        let key = Key::of("reused.token.signature");
        cache.offer(key, Arc::clone(&v));
        assert!(cache.get(&key, now).is_none());
        cache.offer(key, Arc::clone(&v));
        assert!(cache.get(&key, now).is_some(), "cached on the second sight");
        assert!(cache.get(&Key::of("reused.token.signaturf"), now).is_none(), "another signature, another key");
        assert!(cache.get(&key, now + 61).is_none(), "never used once stale");
        assert_eq!(cache.len(), 0, "and dropped then");
        assert!(TokenCache::new(&CacheSettings { max_entries: 0, ..CacheSettings::default() }).is_none());
    }

    #[test]
    fn a_recent_token_is_matched_by_its_whole_text_in_its_own_cache_only() {
        let (a, b) =
            (TokenCache::new(&CacheSettings::default()).unwrap(), TokenCache::new(&CacheSettings::default()).unwrap());
        let now = crate::verify::unix_now();
        let v = Arc::new(Verified::for_tests());
        let token = "header.claims.signature-tail";
        assert!(a.recent(token, now, |_| true).is_none(), "nothing remembered yet");
        a.remember(token, &v);
        assert!(a.recent(token, now, |_| true).is_some());
        assert!(b.recent(token, now, |_| true).is_none(), "another cache (a reload's) never sees it");
        assert!(a.recent("header.claimz.signature-tail", now, |_| true).is_none(), "one byte differs: no match");
        assert!(a.recent(token, now, |_| false).is_none(), "its key set changed");
        assert!(a.recent(token, now + 61, |_| true).is_none(), "stale");
        let other = std::thread::scope(|s| s.spawn(|| a.recent(token, now, |_| true).is_some()).join().unwrap());
        assert!(!other, "per thread");
        a.remember(&"x".repeat(RECENT_MAX_BYTES + 1), &v);
        assert!(a.recent(&"x".repeat(RECENT_MAX_BYTES + 1), now, |_| true).is_none(), "huge tokens are not kept");
    }
}
