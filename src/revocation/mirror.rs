//! A complete local copy of the revocation list, kept in step by Redis itself, so that no
//! lookup (of a new token or a seen one) waits on a round trip.
//!
//! The tracked connection runs `CLIENT TRACKING ON BCAST PREFIX {prefix}revoked:`: Redis pushes
//! the name of every key under the prefix that changes, whoever changed it (`redis-cli`, another
//! instance), expired or was evicted. Then the mirror loads everything with SCAN. A key pushed
//! while (or after) it was read is *pending*: lookups that touch it go to Redis until it is read
//! again. "Absent from the mirror" means "not revoked" only while the mirror is proven in step:
//! loaded since the last (re)connect, the connection's heartbeat answering (a PING reply comes
//! after every push sent before it), and no push lost; otherwise lookups take the per-key path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use redis::aio::MultiplexedConnection;

use super::schema::{Entry, Kind, fetch, scan, write_key};

/// Pushed keys waiting to be read again, at most. More means writes outpace the refetches:
/// the mirror is reloaded whole instead (bounded memory either way).
const QUEUE: usize = 65_536;

/// Pushed keys read again in one round trip, at most.
const BATCH: usize = 1000;

/// Where the mirror stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not loaded since the last (re)connect, or loading: lookups take the per-key path.
    Unloaded,
    /// Complete and in step: lookups are answered here.
    Synced,
    /// The list has more entries than `max_entries`: lookups take the per-key path.
    TooLarge,
}

/// The mirrored entries, by whole Redis key.
type Entries = HashMap<Box<str>, Option<Box<[u8]>>>;

/// The mirror: every entry of the list, and the keys pushed since they were read.
pub struct Mirror {
    max_entries: usize,
    /// Key (whole Redis key) -> value; `None` for a key of an unexpected type.
    entries: RwLock<Entries>,
    /// Pushed keys not read again yet -> the push's sequence number.
    pending: Mutex<HashMap<Box<str>, u64>>,
    seq: AtomicU64,
    /// Changes whenever an answer of [`Self::find`] may change (a push, a load, a refetch, a
    /// state change), to a value no mirror of this process had before; 0 while not in step.
    generation: AtomicU64,
    state: Mutex<State>,
    /// Set by a push that could not be queued, or a flush: the mirror must be reloaded whole.
    reload: AtomicBool,
    queue: tokio::sync::mpsc::Sender<Box<str>>,
    wake: tokio::sync::Notify,
}

/// The receiving end of the pushed keys, for [`Mirror::run`].
pub type Pushed = tokio::sync::mpsc::Receiver<Box<str>>;

impl Mirror {
    /// An empty mirror of at most `max_entries` entries (0: never mirror).
    pub fn new(max_entries: usize) -> (Mirror, Pushed) {
        let (queue, pushed) = tokio::sync::mpsc::channel(QUEUE);
        let mirror = Mirror {
            max_entries,
            entries: RwLock::default(),
            pending: Mutex::default(),
            seq: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            state: Mutex::new(State::Unloaded),
            reload: AtomicBool::new(false),
            queue,
            wake: tokio::sync::Notify::new(),
        };
        (mirror, pushed)
    }

    /// Whether mirroring is on at all.
    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The current generation: an answer [`Self::find`] gave after it was read holds while it
    /// is unchanged. 0 when the mirror is not in step (nothing can be vouched for then).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Starts a new generation, after a change (or, if not in step, none).
    fn changed(&self) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let synced = self.state() == State::Synced;
        self.generation.store(if synced { NEXT.fetch_add(1, Ordering::SeqCst) } else { 0 }, Ordering::SeqCst);
    }

    /// Where the mirror stands.
    pub fn state(&self) -> State {
        *self.state.lock().expect("not poisoned")
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.read().expect("not poisoned").len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries present for a token's ids (`(kind, id)`, keys built under `prefix` in one
    /// reused buffer), or `None` if the mirror cannot vouch for them now. Absent ones are left
    /// out: for almost every token the answer is an empty list, and nothing is allocated.
    pub fn find(&self, prefix: &str, ids: &[(Kind, Option<&str>)]) -> Option<Vec<(Kind, Entry)>> {
        if self.state() != State::Synced {
            return None;
        }
        let entries = self.entries.read().expect("not poisoned");
        let pending = self.pending.lock().expect("not poisoned");
        let mut buf = String::with_capacity(128);
        let mut present = Vec::new();
        for (kind, id) in ids {
            let Some(id) = id else { continue };
            write_key(&mut buf, prefix, *kind, id);
            if pending.contains_key(buf.as_str()) {
                return None;
            }
            match entries.get(buf.as_str()) {
                None => {}
                Some(Some(v)) => present.push((*kind, Entry::Value(v.to_vec()))),
                Some(None) => present.push((*kind, Entry::WrongType)),
            }
        }
        Some(present)
    }

    /// A push named `key` (on the connection's reader, so it must not block).
    pub fn pushed(&self, key: &str) {
        if !self.enabled() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.pending.lock().expect("not poisoned").insert(key.into(), seq);
        self.changed();
        if self.queue.try_send(key.into()).is_err() {
            self.reload_whole();
        }
    }

    /// Redis flushed its keys, or a push was lost: nothing here can be vouched for until the
    /// whole list is read again.
    pub fn reload_whole(&self) {
        // The flag first: a load that finishes meanwhile sees it and does not claim to be in step.
        self.reload.store(true, Ordering::SeqCst);
        *self.state.lock().expect("not poisoned") = State::Unloaded;
        self.changed();
        self.wake.notify_one();
    }

    /// The connection was lost: out of step until reloaded on the next connection.
    pub fn disconnected(&self) {
        *self.state.lock().expect("not poisoned") = State::Unloaded;
        self.pending.lock().expect("not poisoned").clear();
        self.changed();
        crate::telemetry::set_revocation_mirror(false, self.len());
    }

    /// Keeps the mirror in step on `conn`: reloads it whole when asked (after every connect),
    /// else reads each pushed key again. Returns when `conn` fails; the caller reconnects.
    pub async fn run(&self, conn: &mut MultiplexedConnection, prefix: &str, pushed: &mut Pushed) -> String {
        loop {
            if self.reload.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.load(conn, prefix).await {
                    return e;
                }
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                Some(key) = pushed.recv() => {
                    let mut keys = vec![key];
                    while keys.len() < BATCH {
                        match pushed.try_recv() {
                            Ok(k) => keys.push(k),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.refetch(conn, keys).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Reads pushed keys again; each leaves `pending` unless pushed once more meanwhile.
    async fn refetch(&self, conn: &mut MultiplexedConnection, keys: Vec<Box<str>>) -> Result<(), String> {
        let seqs: Vec<Option<u64>> = {
            let pending = self.pending.lock().expect("not poisoned");
            keys.iter().map(|k| pending.get(k).copied()).collect()
        };
        let names: Vec<&str> = keys.iter().map(|k| &**k).collect();
        let read = fetch(conn, &names).await?;
        let mut entries = self.entries.write().expect("not poisoned");
        let mut pending = self.pending.lock().expect("not poisoned");
        for ((key, seq), entry) in keys.into_iter().zip(seqs).zip(read) {
            // A key no longer pending was settled by a reload or a later refetch; a newer push
            // queued it again, and that refetch settles it.
            if seq.is_none() || pending.get(&key).copied() != seq {
                continue;
            }
            pending.remove(&key);
            match entry {
                Entry::Absent => entries.remove(&key),
                Entry::Value(v) => entries.insert(key, Some(v.into_boxed_slice())),
                Entry::WrongType => entries.insert(key, None),
            };
        }
        drop((entries, pending));
        self.changed();
        Ok(())
    }

    /// Reads the whole list with SCAN. Pushes that arrive meanwhile stay pending (their keys may
    /// have been read before they changed) and are read again after.
    async fn load(&self, conn: &mut MultiplexedConnection, prefix: &str) -> Result<(), String> {
        let started = std::time::Instant::now();
        let first_seq = self.seq.load(Ordering::SeqCst);
        let mut map: Entries = HashMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys) = scan(conn, prefix, None, cursor).await.map_err(|e| e.to_string())?;
            // A key that is not UTF-8 is never looked up (keys are built from token claims).
            let keys: Vec<String> = keys.into_iter().filter_map(|k| String::from_utf8(k).ok()).collect();
            if map.len() + keys.len() > self.max_entries {
                *self.state.lock().expect("not poisoned") = State::TooLarge;
                self.changed();
                self.entries.write().expect("not poisoned").clear();
                tracing::warn!(
                    max_entries = self.max_entries,
                    "the revocation list is larger than redis.mirror_max_entries; looking tokens up one by one in Redis (cached) instead of mirroring it"
                );
                crate::telemetry::set_revocation_mirror(false, 0);
                return Ok(());
            }
            let names: Vec<&str> = keys.iter().map(String::as_str).collect();
            for (key, entry) in keys.iter().zip(fetch(conn, &names).await?) {
                match entry {
                    Entry::Absent => {} // deleted since SCAN named it
                    Entry::Value(v) => {
                        map.insert(key.as_str().into(), Some(v.into_boxed_slice()));
                    }
                    Entry::WrongType => {
                        map.insert(key.as_str().into(), None);
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let n = map.len();
        *self.entries.write().expect("not poisoned") = map;
        // Pushed before the SCAN began: the SCAN read them after they changed.
        self.pending.lock().expect("not poisoned").retain(|_, seq| *seq >= first_seq);
        let mut state = self.state.lock().expect("not poisoned");
        if self.reload.load(Ordering::SeqCst) {
            return Ok(()); // a push was lost while loading: load again
        }
        *state = State::Synced;
        drop(state);
        self.changed();
        crate::telemetry::set_revocation_mirror(true, n);
        tracing::info!(entries = n, load_ms = started.elapsed().as_millis() as u64, "revocation list mirrored");
        Ok(())
    }
}
