//! Single-use tokens (replay protection): on a route with `single_use = true`, the first message
//! carrying a token's `jti` (per issuer) passes and any other message carrying it again is
//! dead-lettered as `replayed`. Uses are recorded in Redis, so they hold across instances:
//!
//! - `{prefix}used:{issuer}:{jti}` = the id of the message that used it ([`Envelope::message_id`]),
//!   written with `SET NX` and a TTL of the token's remaining lifetime plus
//!   [`REVOCATION_LEEWAY_SECS`] (no issuer accepts the token after its record is gone).
//!   `{issuer}` is the first 16 hex digits of SHA-256 of the token's `iss`, so no `iss` or
//!   `jti` can run into another's key.
//!
//! A record that names the same message is a redelivery, not a replay (a gate that crashed
//! after recording a use and before its ack reads the message again): any Kafka record
//! (coordinates never repeat otherwise), an AMQP delivery only if the broker flagged it
//! redelivered. Redis unreachable: the message holds (fail closed), never passes unrecorded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::envelope::Envelope;
use crate::revocation::Unavailable;
use crate::revocation::schema::REVOCATION_LEEWAY_SECS;
use crate::verify::{Reason, Rejection, Verified};

/// How long a Redis request may take before the message holds.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The uses recorded so far.
pub struct Uses {
    prefix: String,
    store: Store,
}

// One per process: not boxed.
#[allow(clippy::large_enum_variant)]
enum Store {
    Redis {
        client: redis::Client,
        conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    },
    /// Key -> (message id, expiry): the demo and tests.
    Memory(Mutex<HashMap<String, (String, Instant)>>),
}

/// The Redis key recording the use of `jti` from issuer `iss`.
pub fn key(prefix: &str, iss: &str, jti: &str) -> String {
    let issuer = &crate::verify::sha256_hex(iss.as_bytes())[..16];
    format!("{prefix}used:{issuer}:{jti}")
}

impl Uses {
    /// Uses recorded in Redis (connected on first use, and again after any failure).
    pub fn redis(info: redis::ConnectionInfo, prefix: &str) -> Result<Uses, redis::RedisError> {
        let client = redis::Client::open(info)?;
        Ok(Uses { prefix: prefix.to_owned(), store: Store::Redis { client, conn: tokio::sync::Mutex::new(None) } })
    }

    /// Uses recorded in process memory (the demo; tests).
    pub fn in_memory(prefix: &str) -> Uses {
        Uses { prefix: prefix.to_owned(), store: Store::Memory(Mutex::new(HashMap::new())) }
    }

    /// Records that `env` uses the verified token `v` at unix time `now`: `Ok(None)` for its
    /// first use (or a redelivery of the message that used it), `Ok(Some)` to refuse it,
    /// `Err` when the record cannot be read or written (hold).
    pub async fn claim(&self, v: &Verified, env: &Envelope, now: i64) -> Result<Option<Rejection>, Unavailable> {
        let (Some(jti), Some(exp)) = (v.jti.as_deref(), v.times.exp) else {
            let missing = if v.jti.is_none() { "jti" } else { "exp" };
            return Ok(Some(Rejection::new(
                Reason::MissingClaim,
                format!("the route requires single use: `{missing}` is required"),
            )));
        };
        let key = key(&self.prefix, &v.iss, jti);
        let id = env.message_id();
        let ttl = (exp + REVOCATION_LEEWAY_SECS - now).max(1) as u64;
        let holder = match &self.store {
            Store::Redis { client, conn } => record(client, conn, &key, &id, ttl).await?,
            Store::Memory(m) => {
                let mut m = m.lock().expect("not poisoned");
                let t = Instant::now();
                match m.get(&key) {
                    Some((holder, until)) if *until > t => Some(holder.clone()),
                    _ => {
                        m.insert(key, (id.clone(), t + Duration::from_secs(ttl)));
                        None
                    }
                }
            }
        };
        Ok(match holder {
            None => None,
            Some(h) if h == id && env.origin.may_repeat() => None,
            Some(h) => Some(Rejection::new(
                Reason::Replayed,
                format!(
                    "jti {} was used by message {}",
                    crate::verify::jwt::shorten(jti),
                    crate::verify::jwt::shorten(&h)
                ),
            )),
        })
    }
}

/// `SET key id NX EX ttl`; when the key exists, the id it holds (`Some`), else `None`.
async fn record(
    client: &redis::Client,
    conn: &tokio::sync::Mutex<Option<MultiplexedConnection>>,
    key: &str,
    id: &str,
    ttl: u64,
) -> Result<Option<String>, Unavailable> {
    let mut c = {
        let mut slot = conn.lock().await;
        match &*slot {
            Some(c) => c.clone(),
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT));
                let c = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| Unavailable(format!("single-use records: {e}")))?;
                *slot = Some(c.clone());
                c
            }
        }
    };
    let result = async {
        let set: Option<String> =
            redis::cmd("SET").arg(key).arg(id).arg("NX").arg("EX").arg(ttl).query_async(&mut c).await?;
        if set.is_some() {
            return Ok(None);
        }
        // Held by some message: which one. Gone meanwhile (expired) or of another type: someone
        // else's, so a replay.
        let holder: redis::RedisResult<Option<String>> = redis::cmd("GET").arg(key).query_async(&mut c).await;
        match holder {
            Ok(h) => Ok(Some(h.unwrap_or_default())),
            Err(e) if e.code() == Some("WRONGTYPE") => Ok(Some(String::new())),
            Err(e) => Err(e),
        }
    }
    .await;
    result.map_err(|e: redis::RedisError| {
        if (e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
            && let Ok(mut slot) = conn.try_lock()
        {
            *slot = None;
        }
        Unavailable(format!("single-use records: {e}"))
    })
}

/// Makes a route's claims in read order while its messages are decided concurrently: a replay
/// read after the first use must be the one refused, however the decisions interleave. Each
/// message decided takes a [`Ticket`] in read order; its claim waits until every earlier ticket
/// is done (claimed, or dropped because its message went no further).
#[derive(Default)]
pub struct Turns {
    /// Tickets handed out.
    issued: std::sync::atomic::AtomicU64,
    /// The lowest ticket not yet done, and the done ones above it.
    done: Mutex<(u64, std::collections::BTreeSet<u64>)>,
    next: tokio::sync::watch::Sender<u64>,
}

/// A message's place in its route's order of claims; done when dropped.
pub struct Ticket {
    seq: u64,
    turns: std::sync::Arc<Turns>,
}

impl Turns {
    /// The next ticket, in read order.
    pub fn ticket(self: &std::sync::Arc<Self>) -> Ticket {
        let seq = self.issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ticket { seq, turns: std::sync::Arc::clone(self) }
    }
}

impl Ticket {
    /// Waits until every earlier ticket is done.
    pub async fn wait(&self) {
        let mut next = self.turns.next.subscribe();
        // The sender lives in `turns`, which this ticket holds: never closed while waiting.
        let _ = next.wait_for(|n| *n >= self.seq).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut done = self.turns.done.lock().expect("not poisoned");
        let (next, above) = &mut *done;
        above.insert(self.seq);
        while above.remove(next) {
            *next += 1;
        }
        self.turns.next.send_replace(*next);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::envelope::{HeaderData, Origin};

    fn message(origin: Origin) -> Envelope {
        Envelope {
            key: None,
            payload: Some(b"p".to_vec()),
            headers: vec![("authorization".into(), HeaderData::Bytes(b"Bearer t".to_vec()))],
            timestamp_ms: None,
            origin,
            amqp: None,
            amqp_headers: None,
            defect: None,
        }
    }

    fn kafka(offset: i64) -> Envelope {
        message(Origin::Kafka { topic: "orders".into(), partition: 0, offset })
    }

    fn amqp(redelivered: bool) -> Envelope {
        let origin = Origin::Amqp {
            queue: "q".into(),
            exchange: "x".into(),
            routing_key: "r".into(),
            delivery_tag: 1,
            redelivered,
        };
        message(origin)
    }

    fn token(jti: Option<&str>) -> Verified {
        let mut v = Verified::for_tests();
        v.jti = jti.map(Into::into);
        v.times.exp = Some(crate::verify::unix_now() + 60);
        v
    }

    #[tokio::test]
    async fn a_jti_passes_once_and_a_redelivery_is_not_a_replay() {
        let uses = Uses::in_memory("t:");
        let now = crate::verify::unix_now();
        let v = token(Some("j-1"));
        assert_eq!(uses.claim(&v, &kafka(7), now).await.unwrap(), None, "first use");
        assert_eq!(uses.claim(&v, &kafka(7), now).await.unwrap(), None, "the same record read again");
        let replay = uses.claim(&v, &kafka(8), now).await.unwrap().expect("another record is a replay");
        assert_eq!(replay.reason, Reason::Replayed);
        assert!(replay.detail.contains("orders/0/7"), "{}", replay.detail);

        let v = token(Some("j-2"));
        assert_eq!(uses.claim(&v, &amqp(false), now).await.unwrap(), None);
        assert_eq!(uses.claim(&v, &amqp(true), now).await.unwrap(), None, "flagged redelivered by the broker");
        let copy = uses.claim(&v, &amqp(false), now).await.unwrap().expect("an identical new delivery is a replay");
        assert_eq!(copy.reason, Reason::Replayed);

        let no_jti = uses.claim(&token(None), &kafka(9), now).await.unwrap().expect("no jti, no single use");
        assert_eq!(no_jti.reason, Reason::MissingClaim);
        assert_ne!(key("p:", "https://a", "b:c"), key("p:", "https://a:b", "c"), "issuers never share keys");
    }

    proptest::proptest! {
        /// Tickets done in any order (each either waits for its turn first or goes no further)
        /// never leave a later ticket waiting forever, and a claim never starts before an earlier
        /// ticket is done.
        #[test]
        fn turns_never_deadlock_or_overtake(
            order in Just((0..12usize).collect::<Vec<_>>()).prop_shuffle(),
            claims in proptest::collection::vec(proptest::bool::ANY, 12),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let turns = std::sync::Arc::new(Turns::default());
                let tickets: Vec<Ticket> = (0..12).map(|_| turns.ticket()).collect();
                let done = std::sync::Arc::new(Mutex::new(Vec::new()));
                let mut tasks = Vec::new();
                let mut slots: Vec<Option<Ticket>> = tickets.into_iter().map(Some).collect();
                for i in order {
                    let t = slots[i].take().unwrap();
                    let (done, claim) = (std::sync::Arc::clone(&done), claims[i]);
                    tasks.push(tokio::spawn(async move {
                        if claim {
                            t.wait().await;
                            done.lock().unwrap().push(i);
                        }
                        drop(t);
                    }));
                }
                for t in tasks {
                    tokio::time::timeout(Duration::from_secs(5), t).await.expect("no ticket waits forever").unwrap();
                }
                let claimed = done.lock().unwrap().clone();
                prop_assert!(claimed.windows(2).all(|w| w[0] < w[1]), "claims in ticket order: {claimed:?}");
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn turns_come_in_ticket_order_whatever_order_tickets_finish_in() {
        let turns = std::sync::Arc::new(Turns::default());
        let [a, b, c] = [turns.ticket(), turns.ticket(), turns.ticket()];
        drop(b); // went no further: must not block c
        let waiting = tokio::spawn(async move { c.wait().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "c waits for a");
        a.wait().await;
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiting).await.expect("c's turn after a and b").unwrap();
    }
}
