//! The Kafka consume loop: many publishes in flight, offsets committed only up to the highest
//! contiguously confirmed message of each partition.
//!
//! Offsets are stored (`enable.auto.offset.store=false`) once the trusted or dead-letter write of
//! that message and of every earlier one in its partition is confirmed, and librdkafka commits
//! stored offsets every second, on rebalance and on close. A failed publish rewinds its partition
//! to the first unconfirmed offset (at least once; never a skip). A message that cannot be
//! decided (keys or revocation list unavailable) is retried with backoff: the route holds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientContext, Offset};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSourceSettings;
use crate::envelope::{Envelope, HeaderData, Origin};
use crate::pipeline::Route;
use crate::pipeline::{Acks, CHUNK, Pipeline, Settled};

/// A partition of a topic (the name shared by every message read from it).
pub(super) type TopicPartition = (Arc<str>, i32);
/// How a Kafka message is acknowledged: its partition, offset, and the epoch it was read in.
type Ack = (TopicPartition, i64, u64);

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

/// How often `tokengate_consumer_lag` is brought up to date.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Reports `tokengate_consumer_lag` every [`LAG_EVERY`] until the consumer is dropped: for each
/// assigned partition, the high watermark librdkafka last saw (cached from fetches: no request)
/// minus the consumer's position. From the client's own state rather than librdkafka's
/// statistics events, which would run through the consumer's queue.
pub(super) fn report_lag<C: ConsumerContext + 'static>(route: &str, consumer: &Arc<StreamConsumer<C>>) {
    let (route, consumer) = (route.to_owned(), Arc::downgrade(consumer));
    crate::telemetry::set_consumer_lag(&route, 0);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LAG_EVERY).await;
            let Some(consumer) = consumer.upgrade() else { return };
            let Ok(positions) = consumer.position() else { continue };
            let lag: i64 = positions
                .elements()
                .iter()
                .filter_map(|e| {
                    let Offset::Offset(position) = e.offset() else { return None };
                    let topic = std::ffi::CString::new(e.topic()).ok()?;
                    let (mut low, mut high) = (-1i64, -1i64);
                    // SAFETY: a live client handle, a NUL-terminated topic name and out-pointers to
                    // locals; rd_kafka_get_watermark_offsets reads librdkafka's cached offsets only.
                    let err = unsafe {
                        rdkafka::bindings::rd_kafka_get_watermark_offsets(
                            consumer.client().native_ptr(),
                            topic.as_ptr(),
                            e.partition(),
                            &mut low,
                            &mut high,
                        )
                    };
                    let known = err == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0;
                    known.then(|| (high - position).max(0))
                })
                .sum();
            crate::telemetry::set_consumer_lag(&route, lag);
        }
    });
}

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

/// A Kafka record's headers as bytes: rdkafka's own iterator panics on a name that is not UTF-8.
fn raw_headers(m: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let Some(h) = m.headers() else { return Vec::new() };
    let mut hdrs: *mut rdkafka::bindings::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m` is a live message; librdkafka hands out a pointer to headers it owns, valid
    // while `m` is, and we copy everything out before returning.
    let err = unsafe { rdkafka::bindings::rd_kafka_message_headers(m.ptr(), &mut hdrs) };
    if err != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(h.count());
    for idx in 0..h.count() {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: as above; `idx` is below the count, and the out-pointers are valid locals.
        let err = unsafe { rdkafka::bindings::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka's header names are NUL-terminated; values are `size` bytes.
        let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes().to_vec();
        let value =
            (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        out.push((name, value));
    }
    out
}

/// Copies a Kafka record into an envelope. A header name that is not UTF-8 is kept lossily and
/// makes the message `malformed` (every route holds header names to UTF-8, as AMQP does).
pub fn envelope(m: &BorrowedMessage<'_>, topic: &Arc<str>) -> Envelope {
    let (headers, defect) = headers_from_bytes(raw_headers(m));
    Envelope {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
        origin: Origin::Kafka { topic: Arc::clone(topic), partition: m.partition(), offset: m.offset() },
        amqp: None,
        amqp_headers: None,
        defect,
    }
}

/// Kafka headers (names and values of any bytes) as envelope headers, and the first defect.
pub fn headers_from_bytes(raw: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> (Vec<(String, HeaderData)>, Option<String>) {
    let mut defect = None;
    let headers = raw
        .into_iter()
        .enumerate()
        .map(|(i, (name, value))| {
            let name = String::from_utf8(name).unwrap_or_else(|e| {
                let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
                defect.get_or_insert_with(|| {
                    format!("header #{i} name is not UTF-8 ({})", crate::verify::jwt::shorten(&lossy))
                });
                lossy
            });
            (name, value.map_or(HeaderData::Null, HeaderData::Bytes))
        })
        .collect();
    (headers, defect)
}

/// Copies a record out of the consumer, with its topic interned: its envelope, partition and offset.
pub(super) fn read(topics: &mut HashMap<String, Arc<str>>, m: &BorrowedMessage<'_>) -> (Envelope, TopicPartition, i64) {
    // Looked up by &str first: no allocation per message once the topic is known.
    let topic = match topics.get(m.topic()) {
        Some(t) => Arc::clone(t),
        None => Arc::clone(topics.entry(m.topic().to_owned()).or_insert_with(|| Arc::from(m.topic()))),
    };
    let env = envelope(m, &topic);
    (env, (topic, m.partition()), m.offset())
}

/// `first` and what else the consumer has buffered (taken without waiting), up to [`CHUNK`]
/// records, each through `take`: decided together in one task.
pub(super) fn buffered<C: ConsumerContext + 'static, T>(
    consumer: &StreamConsumer<C>,
    first: BorrowedMessage<'_>,
    mut take: impl FnMut(&BorrowedMessage<'_>) -> T,
) -> Vec<T> {
    let mut batch = vec![take(&first)];
    drop(first);
    while batch.len() < CHUNK {
        match consumer.recv().now_or_never() {
            Some(Ok(m)) => batch.push(take(&m)),
            _ => break,
        }
    }
    batch
}

/// A record with its partition's epoch.
fn intake(
    topics: &mut HashMap<String, Arc<str>>,
    tracker: &Mutex<Tracker>,
    m: &BorrowedMessage<'_>,
) -> (Envelope, Ack) {
    let (env, tp, offset) = read(topics, m);
    let epoch = tracker.lock().expect("not poisoned").epoch(&tp);
    (env, (tp, offset, epoch))
}

/// Kafka's publish-time rule: only messages of the partition's current epoch are published, and
/// each published one is tracked until confirmed.
struct KafkaAcks(Arc<Mutex<Tracker>>);

impl Acks for KafkaAcks {
    type Ack = Ack;

    fn current(&mut self, (tp, _, epoch): &Ack) -> bool {
        self.0.lock().expect("not poisoned").epoch(tp) == *epoch
    }

    fn published(&mut self, (tp, offset, epoch): &Ack) {
        self.0.lock().expect("not poisoned").add(tp, *offset, *epoch);
    }
}

struct Loop {
    route: Arc<Route>,
    pipe: Pipeline<Ack>,
    acks: KafkaAcks,
    consumer: Arc<StreamConsumer<Ctx>>,
    tracker: Arc<Mutex<Tracker>>,
    topics: HashMap<String, Arc<str>>,
    cancel: CancellationToken,
}

/// Runs one Kafka route until `cancel`, then drains and commits within `drain_timeout`.
pub async fn run(
    route: Arc<Route>,
    mut src: KafkaSourceSettings,
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
    report_lag(&route.rules.name, &consumer);
    let topics: Vec<&str> = src.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let probe_topic = src.topics.first().filter(|t| !t.starts_with('^')).cloned();
    // Stopped after the drain and awaited: the consumer must close here, while its broker is
    // still there, not whenever the probe's last reference goes.
    let probe_stop = CancellationToken::new();
    let probe = tokio::spawn(probe(Arc::clone(&consumer), probe_topic, Arc::clone(&route), probe_stop.clone()));
    route.status.running.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(route = %route.rules.name, topics = ?src.topics, trusted = %route.trusted.describe(), dead_letter = %route.dead_letter.describe(), "route started");
    let mut l = Loop {
        pipe: Pipeline::new(Arc::clone(&route)),
        acks: KafkaAcks(Arc::clone(&tracker)),
        route,
        consumer,
        tracker,
        topics: HashMap::new(),
        cancel,
    };
    l.consume().await;
    l.shutdown(drain_timeout).await;
    probe_stop.cancel();
    let _ = probe.await; // at most one probe timeout
    Ok(())
}

/// How often the source broker is asked for metadata, and how long it may take to answer.
/// A fetch loop alone does not notice a dead or frozen broker (librdkafka retries quietly), so
/// readiness asks actively: two failed probes in a row (about 5 s) mark the route not ready.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn probe<C: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<C>>,
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
        route.set_broker_down(failures >= 2);
    }
}

impl Loop {
    async fn consume(&mut self) {
        let mut store_tick = tokio::time::interval(Duration::from_millis(100));
        store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.pipe.wake_at();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                Some(done) = self.pipe.confirmations.next(), if !self.pipe.confirmations.is_empty() => self.settle(done),
                _ = store_tick.tick() => self.store_confirmed(),
                Some(chunk) = self.pipe.decisions.next(), if !self.pipe.decisions.is_empty() => self.pipe.decided(chunk),
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
                msg = self.consumer.recv(), if self.pipe.has_room() => match msg {
                    Ok(m) => {
                        let batch = buffered(&self.consumer, m, |m| intake(&mut self.topics, &self.tracker, m));
                        self.pipe.submit(batch);
                    }
                    Err(e) => {
                        tracing::warn!(route = %self.route.rules.name, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
            self.pipe.pump(&mut self.acks).await;
        }
    }

    fn store_confirmed(&self) {
        let mut tracker = self.tracker.lock().expect("not poisoned");
        store(&*self.consumer, tracker.take_storable());
        self.route.metrics.set_in_flight(self.pipe.in_flight());
    }

    /// Kafka's acknowledgement rule: confirmed offsets advance the partition; a failure rewinds it
    /// to its first unconfirmed message (read and published again: at least once, never a skip).
    fn settle(&mut self, ((tp, offset, epoch), result): Settled<Ack>) {
        let ok = result.is_ok();
        let rewind = self.tracker.lock().expect("not poisoned").complete(&tp, offset, epoch, ok);
        let (Some(to), Err(e)) = (rewind, result) else { return };
        let name = self.route.rules.name.clone();
        tracing::error!(route = %name, topic = %tp.0, partition = tp.1, offset, rewind_to = to, error = %e, "publish failed; rewinding the partition to the first unconfirmed message");
        if let Err(e) = self.consumer.seek(&tp.0, tp.1, Offset::Offset(to), Duration::from_secs(10)) {
            // Without the seek we cannot re-read the message: restart consumption from the
            // last commit instead of skipping it.
            tracing::error!(route = %name, error = %e, "seek failed; re-subscribing to resume from committed offsets");
            self.consumer.unsubscribe();
            let topics: Vec<String> = self.topics.keys().cloned().collect();
            let _ = self.consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>());
        }
        self.pipe.pause_after_failure(&e);
    }

    async fn shutdown(&mut self, drain_timeout: Duration) {
        let name = self.route.rules.name.clone();
        let deadline = Instant::now() + drain_timeout;
        let pending = self.pipe.confirmations.len();
        while !self.pipe.confirmations.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout(deadline - Instant::now(), self.pipe.confirmations.next()).await {
                Ok(Some(((tp, offset, epoch), res))) => {
                    self.tracker.lock().expect("not poisoned").complete(&tp, offset, epoch, res.is_ok());
                }
                _ => break,
            }
        }
        self.store_confirmed();
        let commit = self.consumer.commit_consumer_state(CommitMode::Sync);
        let left = self.pipe.confirmations.len();
        tracing::info!(route = %name, drained = pending - left, unconfirmed = left, commit = ?commit.err(), "route stopped");
        self.route.status.running.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        /// Kafka headers of any bytes become envelope headers one for one: UTF-8 names exactly,
        /// others lossily with a defect naming the first, values byte for byte.
        #[test]
        fn headers_of_any_bytes_map_one_for_one(
            raw in vec((vec(any::<u8>(), 0..40), proptest::option::of(vec(any::<u8>(), 0..100))), 0..50),
        ) {
            let (headers, defect) = headers_from_bytes(raw.clone());
            prop_assert_eq!(headers.len(), raw.len());
            let first_bad = raw.iter().position(|(n, _)| std::str::from_utf8(n).is_err());
            prop_assert_eq!(defect.is_some(), first_bad.is_some());
            if let (Some(i), Some(d)) = (first_bad, &defect) {
                prop_assert!(d.starts_with(&format!("header #{i} name is not UTF-8")), "{}", d);
            }
            for ((name, value), (n, v)) in raw.iter().zip(&headers) {
                if let Ok(s) = std::str::from_utf8(name) {
                    prop_assert_eq!(s, n.as_str());
                }
                let want = value.clone().map_or(HeaderData::Null, HeaderData::Bytes);
                prop_assert_eq!(&want, v);
            }
        }
    }

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
        assert!(t.parts.values().all(|p| p.pending.is_empty()));
        assert_ne!(t.epoch(&tp), e, "a rewind starts a new epoch");
        assert!(!t.add(&tp, 15, e), "messages read before the rewind are not tracked");
        let other: TopicPartition = (Arc::from("t"), 1);
        assert_ne!(t.epoch(&other), t.epoch(&tp), "epochs are unique across partitions");
    }
}
