//! The revocation list as the gate reads it: Redis with a complete local [`mirror`] (while the
//! list is small enough) or else per-key lookups and a local cache, both kept honest by Redis's
//! pushes. Its key schema is [`schema`]; operators' writes are [`edit`].
//!
//! # Cache (when not mirrored)
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

pub mod edit;
pub mod mirror;
pub mod schema;

pub use schema::{DEFAULT_PREFIX, Entry, Kind, TokenIds, key};
use schema::{fetch, judge};

use crate::verify::{Rejection, Verified};
use mirror::Mirror;

/// The longest wait between two connection attempts while Redis is down.
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// How often the connection is proven alive; also the worst-case staleness of the cache when
/// the network silently drops the invalidation stream.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Most cached lookups; each is a short key and a few bytes.
const CACHE_ENTRIES: u64 = 1_000_000;

/// The revocation list cannot be consulted now: hold the message, do not accept it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("revocation list unavailable: {0}")]
pub struct Unavailable(pub String);

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
    /// The whole list is mirrored locally while it has at most `mirror_max_entries` entries
    /// (0: never; then seen tokens are cached and new ones looked up).
    pub fn redis(
        info: redis::ConnectionInfo,
        prefix: &str,
        mirror_max_entries: usize,
        cancel: CancellationToken,
    ) -> Result<Revocations, redis::RedisError> {
        // RESP3 carries tracking invalidations on the data connection itself (Redis 6+).
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let tracked = Arc::new(Tracked::new(client, prefix, mirror_max_entries));
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

    /// Where the local mirror stands and how many entries it holds (`None` for an in-memory list).
    pub fn mirror(&self) -> Option<(mirror::State, usize)> {
        match &self.store {
            Store::Redis(t) => Some((t.mirror.state(), t.mirror.len())),
            Store::Memory(_) => None,
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
        // A reused token found absent while the mirror has not changed since (no push, no
        // reload, no reconnect: each starts a new generation) is absent still.
        let generation = match &self.store {
            Store::Redis(t) => t.mirror.generation(),
            Store::Memory(_) => 0,
        };
        if generation != 0 && v.unrevoked_in.load(Ordering::Relaxed) == generation {
            return Ok(None);
        }
        // The common case, answered by the mirror without copying the token's ids.
        let fp = v.fingerprint.hex();
        match self.mirrored(&ids(v.jti.as_deref(), v.sub.as_deref(), v.kid.as_deref(), fp.as_str())) {
            Some(present) if present.is_empty() => {
                v.unrevoked_in.store(generation, Ordering::Relaxed);
                Ok(None)
            }
            Some(present) => Ok(judge_all(&present, &TokenIds::of(v))),
            // Boxed: a Redis round trip's future is large, and every decision's future (moved
            // per message) would carry its size.
            None => Box::pin(self.look_up(&TokenIds::of(v))).await,
        }
    }

    /// Checks a token by its ids.
    pub async fn check_ids(&self, v: &TokenIds) -> Result<Option<Rejection>, Unavailable> {
        match self.mirrored(&ids(v.jti.as_deref(), v.sub.as_deref(), v.kid.as_deref(), &v.fingerprint)) {
            Some(present) => Ok(judge_all(&present, v)),
            None => Box::pin(self.look_up(v)).await,
        }
    }

    /// The entries present for `ids`, from the mirror, if it can vouch for them now.
    fn mirrored(&self, ids: &[(Kind, Option<&str>)]) -> Option<Vec<(Kind, Entry)>> {
        match &self.store {
            Store::Redis(t) if t.tracking.load(Ordering::SeqCst) => t.mirror.find(&self.prefix, ids),
            _ => None,
        }
    }

    /// Looks `v` up key by key (cached where tracking vouches for it): the list is not mirrored.
    async fn look_up(&self, v: &TokenIds) -> Result<Option<Rejection>, Unavailable> {
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

/// A token's ids as the mirror is asked for them, in key order (jti, sub, kid, fingerprint).
fn ids<'a>(
    jti: Option<&'a str>,
    sub: Option<&'a str>,
    kid: Option<&'a str>,
    fingerprint: &'a str,
) -> [(Kind, Option<&'a str>); 4] {
    [(Kind::Jti, jti), (Kind::Sub, sub), (Kind::Kid, kid), (Kind::Fp, Some(fingerprint))]
}

/// The first revocation among present entries (in key order: jti, sub, kid, fingerprint).
fn judge_all(present: &[(Kind, Entry)], v: &TokenIds) -> Option<Rejection> {
    present.iter().find_map(|(kind, e)| judge(*kind, e, v))
}

/// A Redis connection with client-side tracking, and the mirror and cache it keeps honest.
struct Tracked {
    client: redis::Client,
    prefix: String,
    /// The whole list, when it is small enough (lookups wait on nothing).
    mirror: Mirror,
    /// The mirror's pushed keys, taken by the connection's supervisor.
    pushed: Mutex<Option<mirror::Pushed>>,
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
    fn new(client: redis::Client, prefix: &str, mirror_max_entries: usize) -> Tracked {
        let (mirror, pushed) = Mirror::new(mirror_max_entries);
        Tracked {
            client,
            prefix: prefix.to_owned(),
            mirror,
            pushed: Mutex::new(Some(pushed)),
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
        self.mirror.disconnected();
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
                                self.mirror.pushed(&k);
                            }
                        }
                    }
                    _ => {
                        self.cache.invalidate_all();
                        self.mirror.reload_whole();
                    }
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
        let mut pushed = self.pushed.lock().expect("not poisoned").take().expect("one supervisor");
        loop {
            match self.connect().await {
                Ok(conn) => {
                    backoff = Duration::from_millis(100);
                    tracing::info!("revocation list connected (client tracking on)");
                    crate::telemetry::set_revocation_up(true);
                    let heartbeat = async {
                        let mut conn = conn.clone();
                        loop {
                            tokio::time::sleep(HEARTBEAT).await;
                            let ping = redis::cmd("PING");
                            let ping = tokio::time::timeout(HEARTBEAT, ping.query_async::<()>(&mut conn)).await;
                            if !matches!(ping, Ok(Ok(()))) || self.conn.lock().expect("not poisoned").is_none() {
                                return;
                            }
                        }
                    };
                    let mirror = async {
                        if !self.mirror.enabled() {
                            return std::future::pending().await;
                        }
                        let e = self.mirror.run(&mut conn.clone(), &self.prefix, &mut pushed).await;
                        tracing::warn!(error = %e, "reading the revocation list failed");
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = heartbeat => tracing::warn!("Redis heartbeat failed; revocation cache cleared, reconnecting"),
                        _ = mirror => {}
                    }
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
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("ON");
        if self.mirror.enabled() {
            // Every change under the list's prefix, not only keys read on this connection.
            tracking.arg("BCAST").arg("PREFIX").arg(format!("{}revoked:", self.prefix));
        }
        tracking.query_async::<()>(&mut conn).await?;
        *self.conn.lock().expect("not poisoned") = Some(conn.clone());
        self.tracking.store(true, Ordering::SeqCst);
        if self.mirror.enabled() {
            self.mirror.reload_whole();
        }
        Ok(conn)
    }

    /// Looks up `keys`, from the cache where tracking vouches for them, else in one round trip.
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
