//! The Kafka consume loop: many publishes in flight, offsets committed only up to the highest
//! contiguously confirmed message of each partition.
//!
//! Offsets are stored (`enable.auto.offset.store=false`) once the trusted or dead-letter write of
//! that message and of every earlier one in its partition is confirmed, and librdkafka commits
//! stored offsets every second, on rebalance and on close. A failed publish rewinds its partition
//! to the first unconfirmed offset (at least once; never a skip). A message that cannot be
//! decided (keys or revocation list unavailable) is retried with backoff: the route holds.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientConfig, ClientContext, Offset};
use tokio_util::sync::CancellationToken;

use super::{Backoff, Route};
use crate::envelope::{Envelope, HeaderData, Origin};
use crate::gate::{Guard, Outcome};
use crate::sink::PublishError;

type TopicPartition = (Arc<str>, i32);
type Done = (TopicPartition, i64, u64, Result<(), PublishError>);

/// In-flight messages per partition, in offset order.
#[derive(Default)]
struct Part {
    /// Bumped on rewind and revoke: confirmations of an older epoch are ignored.
    epoch: u64,
    /// (offset, confirmed?) in offset order.
    pending: VecDeque<(i64, bool)>,
    /// Highest offset whose message and all earlier ones are confirmed.
    confirmed: Option<i64>,
    /// Last offset handed to librdkafka's offset store.
    stored: Option<i64>,
}

/// Shared between the loop and the rebalance callback.
#[derive(Default)]
struct Tracker {
    parts: HashMap<TopicPartition, Part>,
    /// Epochs are unique across partitions and their re-assignments, so a message read before
    /// a rewind or revocation can never be mistaken for one read after.
    last_epoch: u64,
}

impl Tracker {
    /// The partition's current epoch (a fresh one for a partition not seen yet).
    fn epoch(&mut self, tp: &TopicPartition) -> u64 {
        let next = self.last_epoch + 1;
        let part = self.parts.entry(tp.clone()).or_insert_with(|| Part { epoch: next, ..Part::default() });
        if part.epoch == next {
            self.last_epoch = next;
        }
        part.epoch
    }

    /// Tracks a message about to be published, if it was read in the current epoch.
    fn add(&mut self, tp: &TopicPartition, offset: i64, epoch: u64) -> bool {
        match self.parts.get_mut(tp) {
            Some(part) if part.epoch == epoch => {
                part.pending.push_back((offset, false));
                true
            }
            _ => false,
        }
    }

    /// Records a confirmation; on failure returns the offset to rewind to.
    fn complete(&mut self, tp: &TopicPartition, offset: i64, epoch: u64, ok: bool) -> Option<i64> {
        let part = self.parts.get_mut(tp).filter(|p| p.epoch == epoch)?;
        if !ok {
            let rewind = part.pending.front().map_or(offset, |(o, _)| *o);
            self.last_epoch += 1;
            part.epoch = self.last_epoch;
            part.pending.clear();
            return Some(rewind);
        }
        if let Ok(i) = part.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            part.pending[i].1 = true;
        }
        while let Some(&(o, true)) = part.pending.front() {
            part.confirmed = Some(o);
            part.pending.pop_front();
        }
        None
    }

    /// Offsets newly confirmed since the last call.
    fn take_storable(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, part) in &mut self.parts {
            if part.confirmed > part.stored {
                part.stored = part.confirmed;
                out.push((tp.clone(), part.confirmed.expect("greater than None")));
            }
        }
        out
    }

    fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }
}

fn store<X: ConsumerContext>(consumer: &impl Consumer<X>, offsets: Vec<(TopicPartition, i64)>) {
    for ((topic, partition), offset) in offsets {
        // rd_kafka_offset_store commits offset + 1: the next message to read.
        if let Err(e) = consumer.store_offset(&topic, partition, offset) {
            tracing::debug!(%topic, partition, offset, error = %e, "offset not stored (partition no longer assigned)");
        }
    }
}

/// Commits what is confirmed before partitions are taken away.
struct Ctx {
    route: String,
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let mut tracker = self.tracker.lock().expect("not poisoned");
        store(consumer, tracker.take_storable());
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(route = %self.route, error = %e, "commit before revoke");
        }
        for el in tpl.elements() {
            tracker.parts.retain(|(t, p), _| !(&**t == el.topic() && *p == el.partition()));
        }
        tracing::info!(route = %self.route, partitions = tpl.count(), "partitions revoked after committing confirmed offsets");
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(route = %self.route, partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// A Kafka source: the consumer config and what to subscribe to.
pub struct KafkaSource {
    /// librdkafka consumer config (bootstrap, group, security, overrides).
    pub config: ClientConfig,
    /// Topic names, or one `^regex`.
    pub topics: Vec<String>,
}

/// Copies a Kafka record into an envelope.
pub fn envelope(m: &BorrowedMessage<'_>, topic: &Arc<str>) -> Envelope {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map_or(HeaderData::Null, |v| HeaderData::Bytes(v.to_vec()))))
                .collect()
        })
        .unwrap_or_default();
    Envelope {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
        origin: Origin::Kafka { topic: Arc::clone(topic), partition: m.partition(), offset: m.offset() },
        amqp: None,
        amqp_headers: None,
    }
}

/// Copies a record out of the consumer, with its topic interned and its partition's epoch.
fn intake(
    topics: &mut HashMap<String, Arc<str>>,
    tracker: &Mutex<Tracker>,
    m: &BorrowedMessage<'_>,
) -> (Arc<str>, Envelope, u64) {
    // Looked up by &str first: no allocation per message once the topic is known.
    let topic = match topics.get(m.topic()) {
        Some(t) => Arc::clone(t),
        None => Arc::clone(topics.entry(m.topic().to_owned()).or_insert_with(|| Arc::from(m.topic()))),
    };
    let env = envelope(m, &topic);
    let epoch = tracker.lock().expect("not poisoned").epoch(&(Arc::clone(&topic), m.partition()));
    (topic, env, epoch)
}

/// Messages decided together on a worker thread: verification runs on every core while
/// publishes keep the read order. Small enough that a chunk is decided in well under a millisecond
/// when tokens are cached.
const CHUNK: usize = 64;
/// Chunks being decided at once (bounds messages read but not yet published).
const CHUNKS_IN_DECISION: usize = 4;

/// A decided message: topic, envelope, the partition epoch it was read in, the decision.
type Decided = (Arc<str>, Envelope, u64, Result<Outcome, crate::gate::Hold>);

struct Loop {
    route: Arc<Route>,
    decisions: FuturesOrdered<tokio::task::JoinHandle<Vec<Decided>>>,
    consumer: Arc<StreamConsumer<Ctx>>,
    tracker: Arc<Mutex<Tracker>>,
    inflight: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>,
    guard: Guard,
    backoff: Backoff,
    topics: HashMap<String, Arc<str>>,
    cancel: CancellationToken,
    /// After a failed publish, intake pauses until then (confirmations keep flowing).
    hold_until: Option<tokio::time::Instant>,
}

/// Runs one Kafka route until `cancel`, then drains and commits within `drain_timeout`.
pub async fn run(
    route: Arc<Route>,
    mut src: KafkaSource,
    cancel: CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let interval = src.config.get("auto.commit.interval.ms").unwrap_or("1000").to_owned();
    let reset = src.config.get("auto.offset.reset").unwrap_or("earliest").to_owned();
    src.config
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", interval)
        .set("auto.offset.reset", reset);
    let consumer: Arc<StreamConsumer<Ctx>> = Arc::new(
        src.config.create_with_context(Ctx { route: route.rules.name.clone(), tracker: Arc::clone(&tracker) })?,
    );
    let topics: Vec<&str> = src.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let probe_topic = src.topics.first().filter(|t| !t.starts_with('^')).cloned();
    let probe = tokio::spawn(probe(Arc::clone(&consumer), probe_topic, Arc::clone(&route), cancel.clone()));
    route.status.running.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(route = %route.rules.name, topics = ?src.topics, trusted = %route.trusted.describe(), dead_letter = %route.dead_letter.describe(), "route started");
    let guard = Guard::new(&route.rules.name, route.guard.clone());
    let mut l = Loop {
        route,
        decisions: FuturesOrdered::new(),
        consumer,
        tracker,
        inflight: FuturesUnordered::new(),
        guard,
        backoff: Backoff::default(),
        topics: HashMap::new(),
        cancel,
        hold_until: None,
    };
    l.consume().await;
    l.shutdown(drain_timeout).await;
    probe.abort();
    Ok(())
}

/// How often the source broker is asked for metadata, and how long it may take to answer.
/// A fetch loop alone does not notice a dead or frozen broker (librdkafka retries quietly), so
/// readiness asks actively: two failed probes in a row (about 5 s) mark the route not ready.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn probe(
    consumer: Arc<StreamConsumer<Ctx>>,
    topic: Option<String>,
    route: Arc<Route>,
    cancel: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
        let (c, t) = (Arc::clone(&consumer), topic.clone());
        let ok = tokio::task::spawn_blocking(move || c.client().fetch_metadata(t.as_deref(), PROBE_TIMEOUT).is_ok())
            .await
            .unwrap_or(false);
        failures = if ok { 0 } else { failures + 1 };
        route.status.set_broker_down(&route.rules.name, failures >= 2);
    }
}

impl Loop {
    async fn consume(&mut self) {
        let mut store_tick = tokio::time::interval(Duration::from_millis(100));
        store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.inflight.len() < self.route.max_in_flight;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => self.on_done(done),
                _ = store_tick.tick() => self.store_confirmed(),
                _ = tokio::time::sleep_until(self.hold_until.unwrap_or_else(tokio::time::Instant::now)), if self.hold_until.is_some() => {
                    self.hold_until = None;
                }
                Some(chunk) = self.decisions.next(), if !self.decisions.is_empty() => {
                    for decided in chunk.expect("decision tasks do not panic") {
                        self.publish(decided).await;
                        if self.cancel.is_cancelled() {
                            return;
                        }
                    }
                }
                msg = self.consumer.recv(), if room && self.hold_until.is_none() && self.decisions.len() < CHUNKS_IN_DECISION => match msg {
                    Ok(m) => {
                        let mut batch = vec![intake(&mut self.topics, &self.tracker, &m)];
                        drop(m);
                        // Take what is already buffered, without waiting, to decide it in one task.
                        while batch.len() < CHUNK {
                            match self.consumer.recv().now_or_never() {
                                Some(Ok(m)) => batch.push(intake(&mut self.topics, &self.tracker, &m)),
                                _ => break,
                            }
                        }
                        self.decide(batch);
                    }
                    Err(e) => {
                        tracing::warn!(route = %self.route.rules.name, error = %e, "consumer error");
                        self.wait(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    fn decide(&mut self, batch: Vec<(Arc<str>, Envelope, u64)>) {
        let route = Arc::clone(&self.route);
        self.decisions.push_back(tokio::spawn(async move {
            let now = crate::verify::unix_now();
            let mut out = Vec::with_capacity(batch.len());
            for (topic, env, epoch) in batch {
                let decision = route.gate.handle(&route.rules, &env, now).await;
                out.push((topic, env, epoch, decision));
            }
            out
        }));
    }

    fn store_confirmed(&self) {
        let mut tracker = self.tracker.lock().expect("not poisoned");
        store(&*self.consumer, tracker.take_storable());
        metrics::gauge!("tokengate_in_flight", "route" => self.route.rules.name.clone())
            .set(tracker.in_flight() as f64);
    }

    /// Waits `d` while still taking confirmations, so holds never stall offset progress.
    async fn wait(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(until) => return,
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => self.on_done(done),
            }
        }
    }

    /// Publishes one decided message (holding first if it could not be decided), then tracks it.
    async fn publish(&mut self, (topic, env, epoch, mut decision): Decided) {
        let Origin::Kafka { partition, offset, .. } = env.origin else { unreachable!("a Kafka envelope") };
        let tp: TopicPartition = (topic, partition);
        if self.tracker.lock().expect("not poisoned").epoch(&tp) != epoch {
            return; // read before a rewind or revocation: it will be read again
        }
        let route = Arc::clone(&self.route);
        let name = &route.rules.name;
        let outcome = loop {
            match decision {
                Ok(o) => break o,
                Err(hold) => {
                    route.status.set_holding(name, true);
                    metrics::counter!("tokengate_holds_total", "route" => name.clone(), "cause" => hold.cause())
                        .increment(1);
                    let d = self.backoff.next_delay();
                    tracing::warn!(route = %name, error = %hold, retry_in_ms = d.as_millis() as u64, "holding: message cannot be decided now");
                    self.wait(d).await;
                    if self.cancel.is_cancelled() {
                        return; // not tracked, not committed: read again after restart
                    }
                    decision = route.gate.handle(&route.rules, &env, crate::verify::unix_now()).await;
                }
            }
        };
        route.metrics.record(&outcome);
        let (out, dead) = match outcome {
            Outcome::Forward(out) => (out, false),
            Outcome::DeadLetter(out, _) => (out, true),
        };
        let sink = if dead { &route.dead_letter } else { &route.trusted };
        let confirm = loop {
            match sink.send(&out).await {
                Ok(c) => break c,
                Err(PublishError::Backpressure) => self.wait(Duration::from_millis(5)).await,
                Err(PublishError::Failed(e)) => {
                    route.status.set_holding(name, true);
                    let d = self.backoff.next_delay();
                    tracing::warn!(route = %name, error = %e, retry_in_ms = d.as_millis() as u64, "holding: publish refused");
                    self.wait(d).await;
                }
            }
            if self.cancel.is_cancelled() {
                return;
            }
        };
        route.status.set_holding(name, false);
        self.backoff.reset();
        if !self.tracker.lock().expect("not poisoned").add(&tp, offset, epoch) {
            return; // rewound while we published: it will be read and published again
        }
        self.inflight.push(Box::pin(async move { (tp, offset, epoch, confirm.await) }));
        if let Some(pause) = self.guard.record(dead) {
            route.status.paused.store(true, std::sync::atomic::Ordering::Relaxed);
            self.wait(pause).await;
            route.status.paused.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn on_done(&mut self, (tp, offset, epoch, result): Done) {
        let ok = result.is_ok();
        let rewind = self.tracker.lock().expect("not poisoned").complete(&tp, offset, epoch, ok);
        let (Some(to), Err(e)) = (rewind, result) else { return };
        let name = self.route.rules.name.clone();
        metrics::counter!("tokengate_publish_errors_total", "route" => name.clone()).increment(1);
        tracing::error!(route = %name, topic = %tp.0, partition = tp.1, offset, rewind_to = to, error = %e, "publish failed; rewinding the partition to the first unconfirmed message");
        if let Err(e) = self.consumer.seek(&tp.0, tp.1, Offset::Offset(to), Duration::from_secs(10)) {
            // Without the seek we cannot re-read the message: restart consumption from the
            // last commit instead of skipping it.
            tracing::error!(route = %name, error = %e, "seek failed; re-subscribing to resume from committed offsets");
            self.consumer.unsubscribe();
            let topics: Vec<String> = self.topics.keys().cloned().collect();
            let _ = self.consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>());
        }
        self.route.status.set_holding(&name, true);
        self.hold_until = Some(tokio::time::Instant::now() + self.backoff.next_delay());
    }

    async fn shutdown(&mut self, drain_timeout: Duration) {
        let name = self.route.rules.name.clone();
        let deadline = Instant::now() + drain_timeout;
        let pending = self.inflight.len();
        while !self.inflight.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout(deadline - Instant::now(), self.inflight.next()).await {
                Ok(Some((tp, offset, epoch, res))) => {
                    self.tracker.lock().expect("not poisoned").complete(&tp, offset, epoch, res.is_ok());
                }
                _ => break,
            }
        }
        self.store_confirmed();
        let commit = self.consumer.commit_consumer_state(CommitMode::Sync);
        let left = self.inflight.len();
        tracing::info!(route = %name, drained = pending - left, unconfirmed = left, commit = ?commit.err(), "route stopped");
        self.route.status.running.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_advance_only_over_contiguous_confirmations() {
        let mut t = Tracker::default();
        let tp: TopicPartition = (Arc::from("t"), 0);
        let e = t.epoch(&tp);
        assert!((10..15).all(|o| t.add(&tp, o, e)));
        assert_eq!(t.complete(&tp, 12, e, true), None);
        assert!(t.take_storable().is_empty(), "10 and 11 are not confirmed yet");
        t.complete(&tp, 10, e, true);
        assert_eq!(t.take_storable(), vec![(tp.clone(), 10)]);
        t.complete(&tp, 11, e, true);
        assert_eq!(t.take_storable(), vec![(tp.clone(), 12)]);
        // A failure rewinds to the first unconfirmed offset and ignores the old epoch.
        assert_eq!(t.complete(&tp, 14, e, false), Some(13));
        assert_eq!(t.complete(&tp, 13, e, true), None);
        assert!(t.take_storable().is_empty());
        assert_eq!(t.in_flight(), 0);
        assert_ne!(t.epoch(&tp), e, "a rewind starts a new epoch");
        assert!(!t.add(&tp, 15, e), "messages read before the rewind are not tracked");
        let other: TopicPartition = (Arc::from("t"), 1);
        assert_ne!(t.epoch(&other), t.epoch(&tp), "epochs are unique across partitions");
    }
}
