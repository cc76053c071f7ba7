//! The revocation list in Redis, its key schema, and a local cache that Redis invalidates.
//!
//! # Key schema (a stable contract; ids are written raw, any bytes allowed)
//! - `{prefix}revoked:jti:<jti>` = reason: that token (TTL: its remaining lifetime + 330 s, the
//!   largest leeway an issuer may have plus a margin; 24 h when its `exp` is unknown).
//! - `{prefix}revoked:sub:<sub>` = unix time: every token of that subject issued at or before it
//!   (and every token of that subject without `iat`).
//! - `{prefix}revoked:kid:<kid>` = reason: every token signed with that key.
//! - `{prefix}revoked:fp:<fingerprint>` = reason: one exact token (for tokens without `jti`).
//!
//! # Cache
//! One RESP3 connection with `CLIENT TRACKING ON`: Redis pushes an invalidation on that same
//! connection whenever a key we read changes (from tokengate, `redis-cli`, anything), so a token
//! seen before costs no round trip. A heartbeat PING proves the connection (and so the
//! invalidation stream) alive; if it fails or the connection drops, the cache is cleared and
//! lookups go to Redis, or fail (fail closed) until it is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind};
use tokio_util::sync::CancellationToken;

use crate::verify::{Reason, Rejection, Verified, jwt::shorten};

/// The longest wait between two connection attempts while Redis is down.
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "tokengate:";

/// How often the connection is proven alive; also the worst-case staleness of the cache when
/// the network silently drops the invalidation stream.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Most cached lookups; each is a short key and a few bytes.
const CACHE_ENTRIES: u64 = 1_000_000;

/// The revocation list cannot be consulted now: hold the message, do not accept it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("revocation list unavailable: {0}")]
pub struct Unavailable(pub String);

/// What kind of revocation entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One token by its `jti`.
    Jti,
    /// All tokens of a subject issued at or before a time.
    Sub,
    /// All tokens signed by a key.
    Kid,
    /// One token by its fingerprint.
    Fp,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Jti, Kind::Sub, Kind::Kid, Kind::Fp];

    /// The name used in keys.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Jti => "jti",
            Kind::Sub => "sub",
            Kind::Kid => "kid",
            Kind::Fp => "fp",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Connection settings from a URL and an optional password kept out of it.
pub fn connection_info(url: &str, password: Option<&str>) -> Result<redis::ConnectionInfo, redis::RedisError> {
    let info = redis::Client::open(url)?.get_connection_info().clone();
    Ok(match password {
        Some(p) => {
            let settings = info.redis_settings().clone().set_password(p);
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

/// The Redis key of an entry.
pub fn key(prefix: &str, kind: Kind, id: &str) -> String {
    format!("{prefix}revoked:{}:{id}", kind.name())
}

/// What identifies a token to the revocation list.
#[derive(Debug, Clone, Default)]
pub struct TokenIds {
    /// `jti` claim.
    pub jti: Option<String>,
    /// `sub` claim.
    pub sub: Option<String>,
    /// `iat` claim.
    pub iat: Option<i64>,
    /// Key id (of the key that verified it, or the header's for unverified tokens).
    pub kid: Option<String>,
    /// Token fingerprint.
    pub fingerprint: String,
}

impl TokenIds {
    /// The ids of a verified token.
    pub fn of(v: &Verified) -> TokenIds {
        TokenIds {
            jti: v.std.jti.clone(),
            sub: v.std.sub.clone(),
            iat: v.std.iat,
            kid: v.kid.clone(),
            fingerprint: v.fingerprint.clone(),
        }
    }

    /// The keys this token is checked against.
    pub fn keys(&self, prefix: &str) -> Vec<(Kind, String)> {
        let mut out = Vec::with_capacity(4);
        if let Some(j) = &self.jti {
            out.push((Kind::Jti, key(prefix, Kind::Jti, j)));
        }
        if let Some(s) = &self.sub {
            out.push((Kind::Sub, key(prefix, Kind::Sub, s)));
        }
        if let Some(k) = &self.kid {
            out.push((Kind::Kid, key(prefix, Kind::Kid, k)));
        }
        out.push((Kind::Fp, key(prefix, Kind::Fp, &self.fingerprint)));
        out
    }
}

/// What Redis holds at one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// No such key.
    Absent,
    /// A string value.
    Value(Vec<u8>),
    /// A key of another type (a hash, a list...): someone wrote it wrong.
    WrongType,
}

/// Whether a bad revocation entry may be logged now, and how many reports were dropped since the
/// last one: a bad entry is read for every message of its subject or key, and must not flood the
/// log (it is logged at ERROR at most every 10 s; every message is still failed closed).
fn bad_entry_log_due() -> Option<u64> {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let mut last = LAST.lock().expect("not poisoned");
    if last.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        last.0 = Some(Instant::now());
        Some(std::mem::take(&mut last.1))
    } else {
        last.1 += 1;
        None
    }
}

/// Decides whether one entry revokes the token `v`.
pub fn judge(kind: Kind, entry: &Entry, v: &TokenIds) -> Option<Rejection> {
    let value = match entry {
        Entry::Absent => return None,
        Entry::WrongType => {
            // Fail closed: the operator meant to revoke something.
            if let Some(suppressed) = bad_entry_log_due() {
                tracing::error!(kind = kind.name(), fingerprint = %v.fingerprint, suppressed, "revocation key has an unexpected Redis type; treating the token as revoked");
            }
            return Some(Rejection::new(
                Reason::Revoked,
                format!("revoked by {} (key of unexpected type)", kind.name()),
            ));
        }
        Entry::Value(b) => String::from_utf8_lossy(b),
    };
    if kind != Kind::Sub {
        let why = if value.is_empty() { String::new() } else { format!(": {}", shorten(&value)) };
        return Some(Rejection::new(Reason::Revoked, format!("revoked by {}{why}", kind.name())));
    }
    let Ok(before) = value.trim().parse::<i64>() else {
        if let Some(suppressed) = bad_entry_log_due() {
            tracing::error!(fingerprint = %v.fingerprint, suppressed, "sub revocation value is not a unix time; treating every token of the subject as revoked");
        }
        return Some(Rejection::new(Reason::Revoked, "revoked by sub (unparsable time: all tokens)"));
    };
    match v.iat {
        Some(iat) if iat > before => None,
        Some(_) => Some(Rejection::new(Reason::Revoked, format!("revoked by sub: issued at or before {before}"))),
        None => Some(Rejection::new(Reason::Revoked, "revoked by sub: token has no iat")),
    }
}

/// The revocation list as the gates see it.
pub struct Revocations {
    prefix: String,
    store: Store,
}

/// An in-memory entry: value and optional expiry.
type MemoryEntry = (Vec<u8>, Option<Instant>);

enum Store {
    Redis(Arc<Tracked>),
    Memory(Mutex<HashMap<String, MemoryEntry>>),
}

impl Revocations {
    /// A list held in process memory (the demo without Redis; tests).
    pub fn in_memory(prefix: &str) -> Revocations {
        Revocations { prefix: prefix.to_owned(), store: Store::Memory(Mutex::new(HashMap::new())) }
    }

    /// A list in Redis, with the tracked local cache; keeps reconnecting until `cancel`.
    /// An unreachable Redis is not an error here: it is retried in the background.
    pub fn redis(
        info: redis::ConnectionInfo,
        prefix: &str,
        cancel: CancellationToken,
    ) -> Result<Revocations, redis::RedisError> {
        // RESP3 carries tracking invalidations on the data connection itself (Redis 6+).
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let tracked = Arc::new(Tracked::new(client));
        tokio::spawn(Arc::clone(&tracked).supervise(cancel));
        Ok(Revocations { prefix: prefix.to_owned(), store: Store::Redis(tracked) })
    }

    /// Waits until Redis is connected, up to `timeout` (for start-up and tests).
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_up() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Lookups that went to Redis (cache misses), for tests and the benchmark.
    pub fn round_trips(&self) -> u64 {
        match &self.store {
            Store::Redis(t) => t.round_trips.load(Ordering::Relaxed),
            Store::Memory(_) => 0,
        }
    }

    /// Whether the list can be consulted now (for readiness).
    pub fn is_up(&self) -> bool {
        match &self.store {
            Store::Redis(t) => t.conn.lock().expect("not poisoned").is_some(),
            Store::Memory(_) => true,
        }
    }

    /// Writes an entry into an in-memory list (the demo).
    pub fn insert_local(&self, kind: Kind, id: &str, value: &str) {
        if let Store::Memory(m) = &self.store {
            m.lock().expect("not poisoned").insert(key(&self.prefix, kind, id), (value.as_bytes().to_vec(), None));
        }
    }

    /// Checks a verified token. `Ok(Some)` is a revocation; `Err` means "cannot tell now".
    pub async fn check(&self, v: &Verified) -> Result<Option<Rejection>, Unavailable> {
        self.check_ids(&TokenIds::of(v)).await
    }

    /// Checks a token by its ids.
    pub async fn check_ids(&self, v: &TokenIds) -> Result<Option<Rejection>, Unavailable> {
        let keys = v.keys(&self.prefix);
        let entries = match &self.store {
            Store::Redis(t) => t.lookup(keys.iter().map(|(_, k)| k.as_str())).await?,
            Store::Memory(m) => {
                let m = m.lock().expect("not poisoned");
                keys.iter()
                    .map(|(_, k)| match m.get(k) {
                        Some((val, exp)) if exp.is_none_or(|e| e > Instant::now()) => Entry::Value(val.clone()),
                        _ => Entry::Absent,
                    })
                    .collect()
            }
        };
        Ok(keys.iter().zip(&entries).find_map(|((kind, _), e)| judge(*kind, e, v)))
    }
}

/// A Redis connection with client-side tracking and the cache it keeps honest.
struct Tracked {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    cache: moka::sync::Cache<String, Entry>,
    /// Whether the cache may be used: tracking is on and the connection proved alive.
    tracking: AtomicBool,
    /// Bumped on every invalidation; a lookup caches its answer only if none arrived meanwhile,
    /// so a reply that raced with a write can never be cached stale.
    invalidations: AtomicU64,
    round_trips: AtomicU64,
}

impl Tracked {
    fn new(client: redis::Client) -> Tracked {
        Tracked {
            client,
            conn: Mutex::new(None),
            cache: moka::sync::Cache::builder().max_capacity(CACHE_ENTRIES).build(),
            tracking: AtomicBool::new(false),
            invalidations: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
        }
    }

    fn drop_cache(&self) {
        self.tracking.store(false, Ordering::SeqCst);
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::Invalidate => {
                self.invalidations.fetch_add(1, Ordering::SeqCst);
                // data: [array of keys] or [nil] when Redis flushed everything.
                match push.data.first() {
                    Some(redis::Value::Array(keys)) => {
                        for k in keys {
                            if let Ok(k) = redis::from_redis_value_ref::<String>(k) {
                                self.cache.invalidate(&k);
                            }
                        }
                    }
                    _ => self.cache.invalidate_all(),
                }
            }
            PushKind::Disconnection => {
                tracing::warn!("Redis connection lost; revocation cache cleared");
                self.drop_cache();
                *self.conn.lock().expect("not poisoned") = None;
            }
            _ => {}
        }
    }

    /// Keeps one tracked connection up, proving it alive every `HEARTBEAT`. While Redis is down
    /// it tries again at least every [`RECONNECT_MAX`]: a connection attempt to a dead Redis
    /// costs nothing, and routes resume within about a second of Redis answering again.
    async fn supervise(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.connect().await {
                Ok(mut conn) => {
                    backoff = Duration::from_millis(100);
                    tracing::info!("revocation list connected (client tracking on)");
                    crate::telemetry::set_revocation_up(true);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(HEARTBEAT) => {}
                        }
                        let ping =
                            tokio::time::timeout(HEARTBEAT, redis::cmd("PING").query_async::<()>(&mut conn)).await;
                        if !matches!(ping, Ok(Ok(()))) || self.conn.lock().expect("not poisoned").is_none() {
                            break;
                        }
                    }
                    tracing::warn!("Redis heartbeat failed; revocation cache cleared, reconnecting");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to Redis; holding messages that need the revocation list")
                }
            }
            self.drop_cache();
            *self.conn.lock().expect("not poisoned") = None;
            crate::telemetry::set_revocation_up(false);
            // Jitter spreads the reconnects of many instances after a Redis restart.
            let jittered = backoff.mul_f64(rand::random_range(0.8..1.2));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    async fn connect(self: &Arc<Self>) -> redis::RedisResult<MultiplexedConnection> {
        let weak = Arc::downgrade(self);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_push_sender(move |push: PushInfo| {
                if let Some(t) = weak.upgrade() {
                    t.on_push(push);
                }
                Ok::<(), ()>(())
            });
        let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        self.drop_cache();
        redis::cmd("CLIENT").arg("TRACKING").arg("ON").query_async::<()>(&mut conn).await?;
        *self.conn.lock().expect("not poisoned") = Some(conn.clone());
        self.tracking.store(true, Ordering::SeqCst);
        Ok(conn)
    }

    /// Looks up `keys`, from the cache where tracking vouches for it, else in one round trip.
    async fn lookup<'k>(
        &self,
        keys: impl ExactSizeIterator<Item = &'k str> + Clone,
    ) -> Result<Vec<Entry>, Unavailable> {
        let use_cache = self.tracking.load(Ordering::SeqCst);
        if use_cache {
            let hits: Vec<Entry> = keys.clone().map_while(|k| self.cache.get(k)).collect();
            if hits.len() == keys.len() {
                return Ok(hits);
            }
        }
        let Some(mut conn) = self.conn.lock().expect("not poisoned").clone() else {
            return Err(Unavailable("not connected to Redis".into()));
        };
        let seen = self.invalidations.load(Ordering::SeqCst);
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::revocation_lookup();
        let entries = fetch(&mut conn, &keys.clone().collect::<Vec<_>>()).await.map_err(Unavailable)?;
        if use_cache && self.invalidations.load(Ordering::SeqCst) == seen {
            for (k, e) in keys.zip(&entries) {
                self.cache.insert(k.to_owned(), e.clone());
            }
        }
        Ok(entries)
    }
}

/// Reads `keys` in one round trip: EXISTS for each (it sees keys of any type), then one MGET.
pub async fn fetch(conn: &mut MultiplexedConnection, keys: &[&str]) -> Result<Vec<Entry>, String> {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("EXISTS").arg(*k);
    }
    pipe.cmd("MGET").arg(keys);
    let reply: Vec<redis::Value> = pipe.query_async(conn).await.map_err(|e| e.to_string())?;
    decode(&reply, keys.len())
}

/// `n` EXISTS replies then one MGET reply -> one entry per key.
fn decode(reply: &[redis::Value], n: usize) -> Result<Vec<Entry>, String> {
    let bad = || format!("unexpected Redis reply to EXISTS/MGET: {reply:?}");
    let (exists, rest) = reply.split_at_checked(n).ok_or_else(bad)?;
    let Some(redis::Value::Array(values)) = rest.first() else {
        return Err(bad());
    };
    if values.len() != n {
        return Err(bad());
    }
    exists
        .iter()
        .zip(values)
        .map(|(e, v)| match (e, v) {
            (redis::Value::Int(0), _) => Ok(Entry::Absent),
            (redis::Value::Int(_), redis::Value::BulkString(b)) => Ok(Entry::Value(b.clone())),
            (redis::Value::Int(_), redis::Value::Nil) => Ok(Entry::WrongType),
            _ => Err(bad()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_maps_exists_and_values() {
        use redis::Value as V;
        let reply = vec![V::Int(0), V::Int(1), V::Int(1), V::Array(vec![V::Nil, V::BulkString(b"x".to_vec()), V::Nil])];
        assert_eq!(decode(&reply, 3).unwrap(), vec![Entry::Absent, Entry::Value(b"x".to_vec()), Entry::WrongType]);
        assert!(decode(&reply, 4).is_err());
        assert!(decode(&[V::Int(0)], 1).is_err());
    }

    #[test]
    fn judge_table() {
        let ids = TokenIds { sub: Some("u".into()), iat: Some(100), ..Default::default() };
        let no_iat = TokenIds { iat: None, ..ids.clone() };
        let v = |s: &str| Entry::Value(s.as_bytes().to_vec());
        let cases = [
            (Kind::Jti, Entry::Absent, &ids, false),
            (Kind::Jti, v(""), &ids, true),
            (Kind::Kid, v("leaked"), &ids, true),
            (Kind::Fp, Entry::WrongType, &ids, true),
            (Kind::Sub, v("99"), &ids, false),
            (Kind::Sub, v("100"), &ids, true),
            (Kind::Sub, v(" 101 "), &ids, true),
            (Kind::Sub, v("99"), &no_iat, true),
            (Kind::Sub, v("yesterday"), &ids, true),
            (Kind::Sub, Entry::WrongType, &ids, true),
        ];
        for (kind, entry, ids, revoked) in cases {
            let got = judge(kind, &entry, ids);
            assert_eq!(got.is_some(), revoked, "{kind:?} {entry:?} {ids:?}");
            if let Some(r) = got {
                assert_eq!(r.reason, Reason::Revoked);
                assert!(r.detail.contains(kind.name()), "{}", r.detail);
            }
        }
    }

    #[test]
    fn keys_follow_the_schema() {
        assert_eq!(key("tokengate:", Kind::Jti, "a b\n"), "tokengate:revoked:jti:a b\n");
        assert_eq!(Kind::parse("fp"), Some(Kind::Fp));
        assert_eq!(Kind::parse("xx"), None);
    }
}
