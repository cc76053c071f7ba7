//! The one message path, shared by every source and sink: decide many messages at once, publish
//! each verdict in read order to the trusted or dead-letter destination, and hand the broker's
//! confirmations back in publish order for the source's acknowledgement rule.
//!
//! A source owns intake and acknowledgement; it loops over one `select!` of its intake,
//! [`Pipeline::confirmations`], [`Pipeline::decisions`] and [`Pipeline::wake_at`], and calls
//! [`Pipeline::pump`] after each event. Publishing in read order keeps the order of each Kafka
//! partition and each AMQP routing key. Nothing in here waits on a timer: a message that cannot be
//! decided or published now stays at the head with a retry time, and confirmations keep flowing.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::stream::FuturesOrdered;
use tokio::time::Instant;

use crate::config::{GuardConfig, RouteRules};
use crate::envelope::{Envelope, HeaderData};
use crate::gate::{self, Gate, Guard, Hold, Outcome};
use crate::sink::{PublishError, Sink};
use crate::verify::{Reason, Rejection};

/// Messages decided together on one worker task: verification runs on every core while the
/// revocation lookups of a chunk overlap. Small enough that a chunk of cached tokens is decided
/// in well under a millisecond.
pub const CHUNK: usize = 64;

/// How long to wait before sending again when the client's queue is full.
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(5);

/// The longest wait before deciding a held message again. Deciding it again is cheap while the
/// revocation list or the keys are unavailable (both answer at once from local state, and key
/// fetches are rate-limited), and it resumes the route within a second of the outage's end.
/// A hold is logged when it starts and then every [`HOLD_LOG_EVERY`] retries.
const HOLD_RETRY_MAX: Duration = Duration::from_millis(500);

/// What a source does when a message is about to be published.
pub trait Acks {
    /// The source's handle to acknowledge one message (Kafka: partition, offset and epoch;
    /// AMQP: the delivery's acker).
    type Ack: Send + 'static;

    /// Whether a message read earlier is still to be published. `false` drops it unpublished:
    /// the source will read it again (a rewound or revoked Kafka partition).
    fn current(&mut self, _ack: &Self::Ack) -> bool {
        true
    }

    /// The message was handed to its destination; its confirmation follows.
    fn published(&mut self, _ack: &Self::Ack) {}
}

/// A message with its acknowledgement handle and its decision (`None`: decide again).
pub struct Item<A> {
    env: Envelope,
    ack: A,
    decision: Option<Result<Ready, Hold>>,
}

/// A decided message as its destination takes it: fitted, and prepared for the sink.
struct Ready {
    out: crate::envelope::Outgoing,
    /// Why it is a dead letter, if it is one.
    rejected: Option<Rejection>,
}

impl Ready {
    /// `outcome` fitted to its destination and prepared for it, where the decision was made
    /// (a decision task, not the route's one loop, where it would add to every message).
    fn of(route: &Route, env: &Envelope, outcome: Outcome) -> Ready {
        let (mut out, rejected) = fit(route, env, outcome);
        route.destination(rejected.is_some()).prepare(&mut out);
        Ready { out, rejected }
    }
}

type Chunk<A> = tokio::task::JoinHandle<Vec<Item<A>>>;
/// A published message's acknowledgement handle and the broker's answer.
pub type Settled<A> = (A, Result<(), PublishError>);
type Confirmation<A> = Pin<Box<dyn Future<Output = Settled<A>> + Send>>;

/// The shared per-message path of one route.
pub struct Pipeline<A> {
    route: Arc<Route>,
    /// Chunks being decided on worker tasks, in read order.
    pub decisions: FuturesOrdered<Chunk<A>>,
    /// Messages inside `decisions`.
    deciding: usize,
    /// Decided messages waiting to be published, in read order.
    ready: VecDeque<Item<A>>,
    /// Published messages awaiting the broker's confirmation, in publish order.
    pub confirmations: FuturesOrdered<Confirmation<A>>,
    guard: Guard,
    backoff: Backoff,
    /// The head of `ready` waits until then (a hold, a refused publish, a full queue, a guard pause).
    retry_at: Option<Instant>,
    /// Intake pauses until then (a failed confirmation).
    intake_at: Option<Instant>,
    /// Retries of the current hold (for logging).
    hold_retries: u64,
    /// The order of single-use claims (routes with `single_use`).
    turns: Option<Arc<crate::single_use::Turns>>,
}

/// Retries of a hold between two log lines (about 10 s at the capped retry interval).
const HOLD_LOG_EVERY: u64 = 20;

impl<A: Send + 'static> Pipeline<A> {
    /// The path of `route`.
    pub fn new(route: Arc<Route>) -> Pipeline<A> {
        let guard = Guard::new(&route.rules.name, route.guard.clone(), route.metrics.dead_letter_storm.clone());
        let single_use = route.rules.single_use;
        Pipeline {
            route,
            decisions: FuturesOrdered::new(),
            deciding: 0,
            ready: VecDeque::new(),
            confirmations: FuturesOrdered::new(),
            guard,
            backoff: Backoff::default(),
            retry_at: None,
            intake_at: None,
            hold_retries: 0,
            turns: single_use.then(Arc::default),
        }
    }

    /// Messages taken from the broker and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.deciding + self.ready.len() + self.confirmations.len()
    }

    /// Whether the source may take another message: under `max_in_flight` and not holding.
    pub fn has_room(&self) -> bool {
        self.in_flight() < self.route.max_in_flight && self.retry_at.is_none() && self.intake_at.is_none()
    }

    /// When something waits on a timer (for the source's `select!`), if anything does.
    pub fn wake_at(&self) -> Option<Instant> {
        match (self.retry_at, self.intake_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts deciding a batch read in order.
    pub fn submit(&mut self, batch: Vec<(Envelope, A)>) {
        let route = Arc::clone(&self.route);
        self.deciding += batch.len();
        let tickets: Vec<_> = batch.iter().map(|_| self.turns.as_ref().map(|t| t.ticket())).collect();
        self.decisions.push_back(tokio::spawn(async move {
            let now = crate::verify::unix_now();
            let gate = route.gate.load_full();
            let decide = batch.into_iter().zip(tickets).map(|((env, ack), turn)| {
                let (route, gate) = (&route, &gate);
                async move {
                    let decision = gate.handle_in_turn(&route.rules, &env, now, turn).await;
                    let decision = decision.map(|outcome| Ready::of(route, &env, outcome));
                    Item { env, ack, decision: Some(decision) }
                }
            });
            all_in_order(decide).await
        }));
    }

    /// Takes a decided chunk (from [`Self::decisions`]) into the publish queue.
    pub fn decided(&mut self, chunk: Result<Vec<Item<A>>, tokio::task::JoinError>) {
        match chunk {
            Ok(items) => {
                self.deciding -= items.len();
                self.ready.extend(items);
            }
            // A decision task only ends like this on a bug (a panic): the route's supervisor
            // restarts the route, and what was not acknowledged is delivered again.
            Err(e) => panic!("a decision task failed: {e}"),
        }
    }

    /// A confirmation failed: pause intake with backoff (the source re-reads or requeues it).
    pub fn pause_after_failure(&mut self, error: &PublishError) {
        let name = &self.route.rules.name;
        self.route.metrics.publish_failed();
        self.route.set_holding(true);
        let now = Instant::now();
        if self.intake_at.is_none_or(|t| t <= now) {
            let d = self.backoff.next_delay();
            self.intake_at = Some(now + d);
            tracing::warn!(route = %name, error = %error, pause_ms = d.as_millis() as u64, "publish failed; intake paused");
        }
    }

    /// Publishes what is ready, in order, until something has to wait. Call after every event.
    pub async fn pump(&mut self, acks: &mut impl Acks<Ack = A>) {
        let now = Instant::now();
        if self.intake_at.is_some_and(|t| t <= now) {
            self.intake_at = None;
        }
        if self.retry_at.is_some_and(|t| t > now) {
            return;
        }
        if self.retry_at.take().is_some() {
            self.route.status.paused.store(false, Ordering::Relaxed);
        }
        while let Some(item) = self.ready.front_mut() {
            if !acks.current(&item.ack) {
                self.ready.pop_front();
                continue;
            }
            let name = &self.route.rules.name;
            let decision = match item.decision.take() {
                Some(Ok(o)) => Ok(o),
                // A hold decided with its chunk may be stale by now (the outage it met may be
                // over): decide again before waiting on it.
                Some(Err(_)) | None => {
                    let gate = self.route.gate.load_full();
                    let decision = gate.handle(&self.route.rules, &item.env, crate::verify::unix_now()).await;
                    decision.map(|outcome| Ready::of(&self.route, &item.env, outcome))
                }
            };
            let Ready { mut out, rejected } = match decision {
                Ok(r) => r,
                Err(hold) => {
                    self.route.set_holding(true);
                    self.route.metrics.held(hold.cause());
                    let d = self.backoff.next_delay().min(HOLD_RETRY_MAX);
                    if self.hold_retries.is_multiple_of(HOLD_LOG_EVERY) {
                        tracing::warn!(route = %name, error = %hold, retries = self.hold_retries, retry_in_ms = d.as_millis() as u64, "holding: message cannot be decided now");
                    }
                    self.hold_retries += 1;
                    self.retry_at = Some(Instant::now() + d);
                    return; // decided again when the retry is due
                }
            };
            let facts = out.facts.take();
            let dead = rejected.is_some();
            let sink = self.route.destination(dead);
            match sink.send(out).await {
                Ok(confirm) => {
                    // Counted once it is handed over: a refused publish is decided again.
                    self.route.metrics.count(rejected.as_ref().map(|r| r.reason));
                    let confirm = match &self.route.audit {
                        Some((audit, metrics)) => {
                            let facts = facts.unwrap_or_default();
                            let record = audit.write(name, &item.env, rejected.as_ref(), &facts).await;
                            audited(confirm, record, metrics.clone())
                        }
                        None => confirm,
                    };
                    let item = self.ready.pop_front().expect("the head was just published");
                    acks.published(&item.ack);
                    let ack = item.ack;
                    self.confirmations.push_back(Box::pin(async move { (ack, confirm.await) }));
                }
                Err(e) => {
                    // Not published: the message stays at the head, decided again on retry.
                    let d = match e {
                        PublishError::Backpressure => BACKPRESSURE_WAIT,
                        PublishError::Failed(ref why) => {
                            self.route.set_holding(true);
                            let d = self.backoff.next_delay();
                            tracing::warn!(route = %name, error = %why, retry_in_ms = d.as_millis() as u64, "holding: publish refused");
                            d
                        }
                    };
                    self.retry_at = Some(Instant::now() + d);
                    return;
                }
            }
            if self.intake_at.is_none() {
                self.route.set_holding(false);
                self.backoff.reset();
            }
            if self.hold_retries > 0 {
                tracing::info!(route = %name, retries = self.hold_retries, "hold over: deciding again");
                self.hold_retries = 0;
            }
            if let Some(pause) = self.guard.record(dead) {
                self.route.status.paused.store(true, Ordering::Relaxed);
                self.retry_at = Some(Instant::now() + pause);
                return;
            }
        }
    }
}

/// Runs `futures` together and returns their outputs in order. `join_all` polls up to 30
/// futures in place but gives each a task of its own past that (an allocation, atomic wake-ups,
/// outputs reordered and collected into a growing vector); a chunk's decisions nearly all finish
/// on their first poll, so they run in parts of 30 polled in place, all parts at once.
pub async fn all_in_order<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    // futures-util's limit for polling in place (`join_all`'s SMALL).
    const IN_PLACE: usize = 30;
    let mut futures: Vec<F> = futures.into_iter().collect();
    let total = futures.len();
    let mut parts = Vec::with_capacity(total.div_ceil(IN_PLACE));
    while futures.len() > IN_PLACE {
        let rest = futures.split_off(IN_PLACE);
        parts.push(futures_util::future::join_all(std::mem::replace(&mut futures, rest)));
    }
    parts.push(futures_util::future::join_all(futures));
    let mut out = Vec::with_capacity(total);
    for part in futures_util::future::join_all(parts).await {
        out.extend(part);
    }
    out
}

/// A publish confirmed only once its audit record is too: the message is acknowledged after
/// both, and read again if either fails.
fn audited(
    publish: crate::sink::Confirm,
    record: Result<crate::sink::Confirm, PublishError>,
    metrics: crate::telemetry::AuditMetrics,
) -> crate::sink::Confirm {
    Box::pin(async move {
        let (published, recorded) = match record {
            Ok(r) => futures_util::future::join(publish, r).await,
            Err(e) => (publish.await, Err(e)),
        };
        metrics.record(recorded.is_ok());
        published?;
        recorded.map_err(|e| PublishError::Failed(format!("audit record: {e}")))
    })
}

/// The message to publish and, for a dead letter, why. A verdict the trusted destination cannot
/// carry becomes a `malformed` dead letter; a dead letter is cut to fit its destination.
fn fit(route: &Route, env: &Envelope, outcome: Outcome) -> (crate::envelope::Outgoing, Option<Rejection>) {
    let rules = &route.rules;
    let outcome = match outcome {
        Outcome::Forward(out) => match route.trusted.check(&out) {
            Ok(()) => Outcome::Forward(out),
            Err(why) => {
                let r = Rejection::new(Reason::Malformed, format!("the trusted destination cannot carry it: {why}"));
                let mut dead = gate::dead_letter(rules, env, &r, None, SystemTime::now());
                dead.facts = out.facts;
                Outcome::DeadLetter(dead, r)
            }
        },
        dead => dead,
    };
    match outcome {
        Outcome::Forward(out) => (out, None),
        Outcome::DeadLetter(mut out, r) => {
            let dropped = route.dead_letter.make_fit(&mut out, &rules.headers.prefix);
            if dropped > 0 {
                out.headers.push((rules.headers.dropped.clone(), HeaderData::Bytes(dropped.to_string().into_bytes())));
            }
            (out, Some(r))
        }
    }
}

/// Everything a source loop needs to run one route.
pub struct Route {
    /// Verification and header rules.
    pub rules: RouteRules,
    /// The decision in force (a live reload swaps it).
    pub gate: Arc<arc_swap::ArcSwap<Gate>>,
    /// Where accepted messages go.
    pub trusted: Sink,
    /// Where rejected messages go.
    pub dead_letter: Sink,
    /// Most unconfirmed publishes at once.
    pub max_in_flight: usize,
    /// Dead-letter storm guard settings.
    pub guard: GuardConfig,
    /// Live state for readiness.
    pub status: Arc<RouteStatus>,
    /// The route's metrics.
    pub metrics: crate::telemetry::RouteMetrics,
    /// Where every decision is recorded, and its metrics, if the audit trail is on.
    pub audit: Option<(Arc<crate::audit::Audit>, crate::telemetry::AuditMetrics)>,
}

impl Route {
    /// Where a message goes: the dead-letter destination if it was rejected, else the trusted one.
    fn destination(&self, dead: bool) -> &Sink {
        if dead { &self.dead_letter } else { &self.trusted }
    }

    /// Marks the route holding (or not), for readiness and its gauge.
    pub(crate) fn set_holding(&self, on: bool) {
        if self.status.holding.swap(on, Ordering::Relaxed) != on {
            self.metrics.set_holding(on);
        }
    }

    /// Marks the source broker down (or answering again), for readiness, its gauge and the log.
    pub(crate) fn set_broker_down(&self, down: bool) {
        if self.status.broker_down.swap(down, Ordering::Relaxed) != down {
            self.metrics.set_broker_up(!down);
            let route = &self.rules.name;
            if down {
                tracing::warn!(route, "source broker does not answer: route not ready");
            } else {
                tracing::info!(route, "source broker answers again");
            }
        }
    }
}

/// What readiness reports about a route.
#[derive(Debug, Default)]
pub struct RouteStatus {
    /// Consuming (connected and subscribed).
    pub running: AtomicBool,
    /// Holding a message that cannot be decided or published now.
    pub holding: AtomicBool,
    /// Paused by the dead-letter guard.
    pub paused: AtomicBool,
    /// The source broker does not answer (an active probe, so an idle route notices too).
    pub broker_down: AtomicBool,
    /// Why the route task last ended unexpectedly, until it runs again.
    pub failed: Mutex<Option<String>>,
}

impl RouteStatus {
    /// Whether the route is making progress.
    pub fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
            && !self.holding.load(Ordering::Relaxed)
            && !self.broker_down.load(Ordering::Relaxed)
            && self.failure().is_none()
    }

    /// Why the route task last ended unexpectedly, if it has not run again since.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("not poisoned").clone()
    }
}

/// Exponential backoff for holds: 100 ms doubling to 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::all_in_order;
    use futures_util::FutureExt as _;

    #[tokio::test]
    async fn all_in_order_keeps_the_order_of_any_count_whatever_finishes_first() {
        for n in [0, 1, 29, 30, 31, 60, 64, 100] {
            // Later futures finish first: each waits less than the one before it.
            let waits = (0..n).map(|i| async move {
                tokio::time::sleep(std::time::Duration::from_micros(((n - i) * 50) as u64)).await;
                i
            });
            assert_eq!(all_in_order(waits).await, (0..n).collect::<Vec<_>>(), "{n} futures");
        }
    }

    #[test]
    fn all_in_order_finishes_on_the_first_poll_when_every_future_is_ready() {
        let out = all_in_order((0..64).map(|i| async move { i * 2 })).now_or_never();
        assert_eq!(out, Some((0..64).map(|i| i * 2).collect()));
    }
}
