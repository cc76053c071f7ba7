//! The exactly-once Kafka -> Kafka loop: the trusted and dead-letter writes of many source records
//! and those records' consumer offsets are committed in one Kafka transaction.
//!
//! One transaction is always open. The shared [`Pipeline`] decides and publishes into it in read
//! order, as on an at-least-once route; the transaction commits when it holds `max_messages`
//! records or is `max_time` old, with the offsets sent together with the consumer's group
//! metadata, so that an instance that lost its partitions in a rebalance (a zombie) is fenced by
//! the group coordinator instead of committing them twice. A failed transaction is aborted, and
//! its partitions are rewound to its first record: read, decided and written again (its aborted
//! writes are invisible to `read_committed` consumers). Partitions about to be revoked get their
//! open transaction committed first, so a rebalance costs no rework.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::kafka::{TopicPartition, buffered, probe, read};
use crate::config::{ExactlyOnce, KafkaSourceSettings};
use crate::pipeline::{Acks, Pipeline, Route, Settled};
use crate::sink::Sink;
use crate::telemetry::TransactionMetrics;

/// How long one transactional call (send offsets, commit, abort, init) may take: the producer's
/// default `transaction.timeout.ms`, after which the broker aborts the transaction anyway.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long ending a transaction may take in all (a commit, then an abort tried three times) before the
/// route gives up on its producer. librdkafka can block in `send_offsets_to_transaction` past its
/// timeout when the group coordinator does not come back (confluentinc/librdkafka#5456, #5511):
/// the route then restarts on a new producer, which aborts the stuck transaction.
const END_DEADLINE: Duration = Duration::from_secs(45);

/// How many more times a commit that timed out is resumed (each waits [`TXN_TIMEOUT`]) before the
/// producer is given up: within [`END_DEADLINE`] with the offsets sent first.
const COMMIT_RETRIES: u32 = 2;

/// How a message is acknowledged here: its partition, offset and the epoch it was read in.
type Ack = (TopicPartition, i64, u64);

/// The open transaction, shared by the loop and the rebalance callback.
#[derive(Default)]
struct Open {
    /// Each partition's epoch, bumped on rewind and revoke: a message read in an older epoch is
    /// dropped unpublished (it will be read again).
    epochs: HashMap<TopicPartition, u64>,
    /// Epochs are unique across partitions and their re-assignments.
    last_epoch: u64,
    /// First and last offset written per partition in the open transaction.
    offsets: HashMap<TopicPartition, (i64, i64)>,
    /// Records written in the open transaction.
    records: usize,
    /// When its first record was written.
    started: Option<Instant>,
    /// A write of the open transaction failed: it cannot commit.
    failed: bool,
}

impl Open {
    fn epoch(&mut self, tp: &TopicPartition) -> u64 {
        if let Some(e) = self.epochs.get(tp) {
            return *e;
        }
        self.last_epoch += 1;
        self.epochs.insert(tp.clone(), self.last_epoch);
        self.last_epoch
    }

    /// Takes the open transaction's contents, leaving an empty one.
    fn take(&mut self) -> (HashMap<TopicPartition, (i64, i64)>, usize, Option<Instant>) {
        self.failed = false;
        (std::mem::take(&mut self.offsets), std::mem::take(&mut self.records), self.started.take())
    }
}

/// How a transaction ended.
enum Ended {
    /// Nothing was written in it: nothing to commit.
    Empty,
    /// Committed.
    Committed,
    /// Aborted: these partitions must be read again from these offsets.
    Aborted(Vec<(TopicPartition, i64)>),
}

/// A route's transactional producer and its open transaction.
struct Transactions {
    route: String,
    producer: FutureProducer,
    open: Mutex<Open>,
    /// Set once the producer is given up (failed, its commit unconfirmed, or stuck) or the route
    /// stopped: nothing ends a transaction any more (the consumer's last rebalance must not
    /// block on the producer).
    closed: std::sync::atomic::AtomicBool,
    metrics: TransactionMetrics,
    max_messages: usize,
    max_time: Duration,
}

impl Transactions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().expect("not poisoned")
    }

    /// Whether the producer was given up (`closed`): callers do not end a transaction then.
    fn given_up(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the (fresh) producer ready, fencing any earlier one with the same `transactional.id`
    /// and aborting what it left open, and opens the first transaction.
    fn start(&self) -> Result<(), KafkaError> {
        self.producer.init_transactions(TXN_TIMEOUT)?;
        self.producer.begin_transaction()
    }

    /// Commits the open transaction with its source offsets, or aborts it, and opens the next.
    /// Blocking (librdkafka waits for the broker): call off the async workers. `Err` is a fatal
    /// producer error (fenced by another producer with the same `transactional.id`) or a commit
    /// that stayed unconfirmed ([`resumable`]).
    fn end(&self, group: Option<ConsumerGroupMetadata>) -> Result<Ended, KafkaError> {
        let (offsets, records, started, failed) = {
            let mut open = self.lock();
            let failed = open.failed;
            let (o, r, s) = open.take();
            (o, r, s, failed)
        };
        if records == 0 {
            return Ok(Ended::Empty);
        }
        let began = Instant::now();
        let failure = match (failed, group) {
            (true, _) => Some("a write of the transaction failed".to_owned()),
            (false, None) => Some("no consumer group metadata (not a group member now)".to_owned()),
            (false, Some(group)) => {
                let mut tpl = TopicPartitionList::with_capacity(offsets.len());
                for ((topic, partition), (_, last)) in &offsets {
                    tpl.add_partition_offset(topic, *partition, Offset::Offset(last + 1))?;
                }
                match self.producer.send_offsets_to_transaction(&tpl, &group, TXN_TIMEOUT).and_then(|()| self.commit())
                {
                    Ok(()) => None,
                    Err(e) if fatal(&e) || resumable(&e) => return Err(e),
                    Err(e) => Some(e.to_string()),
                }
            }
        };
        let ended = match failure {
            None => {
                tracing::debug!(route = %self.route, records, commit_ms = began.elapsed().as_millis() as u64, offsets = %spans(&offsets), "transaction committed");
                self.metrics.committed(records, started.map_or(began.elapsed(), |s| s.elapsed()));
                Ended::Committed
            }
            Some(why) => {
                tracing::warn!(route = %self.route, records, error = %why, offsets = %spans(&offsets), "transaction failed; aborting it and reading its records again");
                self.abort()?;
                self.metrics.aborted();
                let mut open = self.lock();
                let mut rewind = Vec::with_capacity(offsets.len());
                for (tp, (first, _)) in offsets {
                    open.epochs.remove(&tp);
                    rewind.push((tp, first));
                }
                Ended::Aborted(rewind)
            }
        };
        self.producer.begin_transaction()?;
        Ok(ended)
    }

    /// Commits the open transaction (its offsets already sent). A commit that times out while the
    /// broker is away may already be decided there, and librdkafka refuses an abort until the
    /// commit is resumed: it is called again while it fails that way, for at most
    /// [`COMMIT_RETRIES`] more timeouts; still unresolved, the error is returned ([`resumable`]).
    fn commit(&self) -> Result<(), KafkaError> {
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(TXN_TIMEOUT) {
                Err(e) if resumable(&e) && tries < COMMIT_RETRIES => {
                    tracing::warn!(route = %self.route, error = %e, "commit not confirmed yet; resuming it");
                    tries += 1;
                }
                done => return done,
            }
        }
    }

    /// Aborts the open transaction, trying three times while the broker does not answer,
    /// since nothing can be written until it is aborted.
    fn abort(&self) -> Result<(), KafkaError> {
        let mut tries = 0;
        loop {
            match self.producer.abort_transaction(TXN_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) if fatal(&e) || tries >= 2 => return Err(e),
                Err(e) => {
                    tracing::warn!(route = %self.route, error = %e, "abort failed; retrying");
                    tries += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// [`Self::end`] on a thread of its own, waited for at most [`END_DEADLINE`]; not called once
    /// [`Self::given_up`]. `Err` means the producer is unusable: failed fatally, its commit
    /// unconfirmed, or stuck; it is given up then.
    fn end_bounded(self: &Arc<Self>, group: Option<ConsumerGroupMetadata>) -> Result<Ended, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let txns = Arc::clone(self);
        std::thread::Builder::new()
            .name("tokengate-txn".into())
            .spawn(move || {
                let _ = tx.send(txns.end(group));
            })
            .map_err(|e| format!("cannot start a thread to end the transaction: {e}"))?;
        let ended = rx.recv_timeout(END_DEADLINE);
        if !matches!(ended, Ok(Ok(_))) {
            self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match ended {
            Ok(Ok(ended)) => Ok(ended),
            Ok(Err(e)) if resumable(&e) => Err(format!(
                "a transaction's commit stayed unconfirmed; restarting the route on a new producer, which ends it: {e}"
            )),
            Ok(Err(e)) => Err(format!(
                "the transactional producer failed fatally (another process with the same transactional.id fenced it?): {e}"
            )),
            Err(_) => Err(format!(
                "ending a transaction took over {}s (librdkafka waits for a group coordinator that does not answer); \
                 restarting the route on a new producer, which aborts it",
                END_DEADLINE.as_secs()
            )),
        }
    }

    /// Whether the open transaction should end now: full, old enough, already failed, or its
    /// producer given up (ending then fails, and the route restarts).
    fn due(&self) -> bool {
        let open = self.lock();
        open.records >= self.max_messages
            || open.failed
            || open.started.is_some_and(|s| s.elapsed() >= self.max_time)
            || self.given_up()
    }

    /// When the open transaction reaches `max_time`, if it holds a record.
    fn due_at(&self) -> Option<tokio::time::Instant> {
        self.lock().started.map(|s| tokio::time::Instant::from_std(s + self.max_time))
    }
}

/// A fatal producer error: the producer cannot write again (fenced, or misconfigured).
fn fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

/// A transactional call that may have taken effect and must be called again, not aborted (a
/// commit that timed out; librdkafka answers an abort with "Conflicting commit_transaction API
/// call is already in progress" then). Still failing after the retries, the producer is given
/// up: the route restarts on a new one, whose start completes or aborts the transaction on the
/// broker, and reads again from the offsets that are committed.
fn resumable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable() && !t.txn_requires_abort() && !t.is_fatal())
}

/// The partitions and offsets of a transaction, for the log: `topic[partition] first..=last`.
fn spans(offsets: &HashMap<TopicPartition, (i64, i64)>) -> String {
    let mut s: Vec<String> = offsets.iter().map(|((t, p), (a, b))| format!("{t}[{p}] {a}..={b}")).collect();
    s.sort();
    s.join(", ")
}

/// Commits the open transaction before partitions are taken away, so that their new owner
/// starts after everything this instance wrote.
struct Ctx(Arc<Transactions>);

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let txns = &self.0;
        if !txns.given_up() {
            match txns.end_bounded(consumer.group_metadata()) {
                Ok(Ended::Aborted(rewind)) => seek(consumer, &txns.route, rewind),
                Ok(_) => {}
                // The loop meets the same error at its next commit and ends the route.
                Err(e) => tracing::error!(route = %txns.route, error = %e, "transaction not ended before a rebalance"),
            }
        }
        let mut open = txns.lock();
        for el in tpl.elements() {
            open.epochs.retain(|(t, p), _| !(&**t == el.topic() && *p == el.partition()));
        }
        tracing::info!(route = %txns.route, partitions = tpl.count(), "partitions revoked after committing the open transaction");
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(route = %self.0.route, partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// Rewinds partitions to the first record of an aborted transaction. A partition no longer
/// assigned cannot be sought; its next owner reads it from the last committed offset anyway.
fn seek<C: ConsumerContext>(consumer: &impl Consumer<C>, route: &str, rewind: Vec<(TopicPartition, i64)>) {
    for ((topic, partition), offset) in rewind {
        if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
            tracing::debug!(route, %topic, partition, offset, error = %e, "not rewound (partition no longer assigned)");
        }
    }
}

/// The publish-time rule: a message of a partition's current epoch is written into the open
/// transaction, and its offset recorded there.
struct TxnAcks(Arc<Transactions>);

impl Acks for TxnAcks {
    type Ack = Ack;

    fn current(&mut self, (tp, _, epoch): &Ack) -> bool {
        self.0.lock().epoch(tp) == *epoch
    }

    fn published(&mut self, (tp, offset, _): &Ack) {
        let mut open = self.0.lock();
        open.offsets.entry(tp.clone()).and_modify(|(_, last)| *last = *offset).or_insert((*offset, *offset));
        open.records += 1;
        open.started.get_or_insert_with(Instant::now);
    }
}

/// Runs one `exactly_once` route until `cancel`, then commits what it wrote within `drain_timeout`.
/// The route's trusted and dead-letter sinks share its transactional producer, new for each run.
pub async fn run(
    route: Arc<Route>,
    mut src: KafkaSourceSettings,
    eo: ExactlyOnce,
    cancel: CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let Sink::Kafka(trusted) = &route.trusted else {
        anyhow::bail!("an exactly_once route writes to Kafka (check-config refuses anything else)")
    };
    let txns = Arc::new(Transactions {
        route: route.rules.name.clone(),
        producer: trusted.renew_producer()?,
        open: Mutex::default(),
        closed: Default::default(),
        metrics: TransactionMetrics::new(&route.rules.name),
        max_messages: eo.max_messages,
        max_time: eo.max_time,
    });
    let t = Arc::clone(&txns);
    tokio::task::spawn_blocking(move || t.start())
        .await?
        .map_err(|e| anyhow::anyhow!("transactional producer {:?} cannot start: {e}", eo.transactional_id))?;
    let reset = src.config.get("auto.offset.reset").unwrap_or("earliest").to_owned();
    src.config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", reset);
    let consumer: Arc<StreamConsumer<Ctx>> = Arc::new(src.config.create_with_context(Ctx(Arc::clone(&txns)))?);
    super::kafka::report_lag(&route.rules.name, &consumer);
    let topics: Vec<&str> = src.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let probe_stop = CancellationToken::new();
    let probe_topic = src.topics.first().filter(|t| !t.starts_with('^')).cloned();
    let probe = tokio::spawn(probe(Arc::clone(&consumer), probe_topic, Arc::clone(&route), probe_stop.clone()));
    route.status.running.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(route = %route.rules.name, topics = ?src.topics, trusted = %route.trusted.describe(), dead_letter = %route.dead_letter.describe(), transactional_id = %eo.transactional_id, max_messages = eo.max_messages, max_time_ms = eo.max_time.as_millis() as u64, "route started (exactly once)");
    let mut l = Loop {
        pipe: Pipeline::new(Arc::clone(&route)),
        acks: TxnAcks(Arc::clone(&txns)),
        route,
        consumer,
        txns,
        topics: HashMap::new(),
        cancel,
    };
    let result = l.consume().await;
    if result.is_ok() {
        l.shutdown(drain_timeout).await;
    }
    // The consumer closes (a last rebalance) without touching the producer again.
    l.txns.closed.store(true, std::sync::atomic::Ordering::Relaxed);
    probe_stop.cancel();
    let _ = probe.await;
    l.route.status.running.store(false, std::sync::atomic::Ordering::Relaxed);
    result
}

/// A record with its partition's epoch.
fn intake(
    topics: &mut HashMap<String, Arc<str>>,
    txns: &Transactions,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> (crate::envelope::Envelope, Ack) {
    let (env, tp, offset) = read(topics, m);
    let epoch = txns.lock().epoch(&tp);
    (env, (tp, offset, epoch))
}

struct Loop {
    route: Arc<Route>,
    pipe: Pipeline<Ack>,
    acks: TxnAcks,
    consumer: Arc<StreamConsumer<Ctx>>,
    txns: Arc<Transactions>,
    topics: HashMap<String, Arc<str>>,
    cancel: CancellationToken,
}

impl Loop {
    async fn consume(&mut self) -> anyhow::Result<()> {
        loop {
            let wake = self.pipe.wake_at();
            let due = self.txns.due_at();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(()),
                Some(done) = self.pipe.confirmations.next(), if !self.pipe.confirmations.is_empty() => self.settle(done),
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
                Some(chunk) = self.pipe.decisions.next(), if !self.pipe.decisions.is_empty() => self.pipe.decided(chunk),
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
                msg = self.consumer.recv(), if self.pipe.has_room() => match msg {
                    Ok(m) => {
                        let batch = buffered(&self.consumer, m, |m| intake(&mut self.topics, &self.txns, m));
                        self.pipe.submit(batch);
                    }
                    Err(e) => {
                        tracing::warn!(route = %self.route.rules.name, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
            if !self.txns.due() {
                self.pipe.pump(&mut self.acks).await;
            }
            if self.txns.due() {
                self.end().await?;
            }
        }
    }

    /// A write's delivery report. Writes are only visible once their transaction commits, so a
    /// success needs nothing; a failure dooms the open transaction (librdkafka refuses to commit
    /// it), which then aborts at once and is read again.
    fn settle(&mut self, ((tp, _, epoch), result): Settled<Ack>) {
        if let Err(e) = result {
            let mut open = self.txns.lock();
            if open.epochs.get(&tp) == Some(&epoch) {
                open.failed = true;
                drop(open);
                self.pipe.pause_after_failure(&e);
            }
        }
    }

    /// Ends the open transaction off the async workers; rewinds what an abort gave back.
    ///
    /// Its writes are confirmed first: rdkafka's `commit_transaction` flushes by polling a queue
    /// that the producer's own thread serves, so with writes outstanding it sleeps 100 ms.
    async fn end(&mut self) -> anyhow::Result<()> {
        if self.txns.given_up() {
            // Given up (its error is logged): nothing it holds will be confirmed or committed.
            anyhow::bail!("the transactional producer was given up; the route restarts on a new one");
        }
        // Sends what lingers at once (librdkafka treats linger.ms as elapsed while flushing); the
        // flush itself returns immediately, unfinished.
        let _ = self.txns.producer.flush(Duration::ZERO);
        let drained = tokio::time::timeout(TXN_TIMEOUT, async {
            while let Some(done) = self.pipe.confirmations.next().await {
                self.settle(done);
            }
        })
        .await;
        if drained.is_err() {
            self.txns.lock().failed = true; // aborted below: the abort purges what is outstanding
        }
        let (txns, consumer) = (Arc::clone(&self.txns), Arc::clone(&self.consumer));
        let ended = tokio::task::spawn_blocking(move || {
            let ended = txns.end_bounded(consumer.group_metadata());
            if let Ok(Ended::Aborted(rewind)) = &ended {
                seek(&*consumer, &txns.route, rewind.clone());
            }
            ended
        })
        .await?;
        match ended {
            Ok(Ended::Aborted(_)) => {
                self.pipe.pause_after_failure(&crate::sink::PublishError::Failed("transaction aborted".into()));
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => anyhow::bail!(e),
        }
    }

    /// Stops intake and commits what was written, within `drain_timeout`; what was decided but
    /// not written is read again by the partition's next owner.
    async fn shutdown(&mut self, drain_timeout: Duration) {
        let name = self.route.rules.name.clone();
        let records = self.txns.lock().records;
        let ended = tokio::time::timeout(drain_timeout, self.end()).await;
        tracing::info!(route = %name, records, committed = matches!(ended, Ok(Ok(()))), "route stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::{BaseProducer, FutureRecord};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// A commit answered after the API timeout (the broker slow, or away once the commit was
    /// sent) is resumed until it is confirmed: not aborted (librdkafka refuses the abort then,
    /// and the broker may have decided the commit), and the producer not given up.
    #[test]
    fn a_commit_that_times_out_is_resumed_until_confirmed() {
        let owner: BaseProducer = ClientConfig::new().set("test.mock.num.brokers", "1").create().unwrap();
        let mock = owner.client().mock_cluster().expect("a mock cluster");
        let bs = mock.bootstrap_servers();
        for t in ["in", "out"] {
            mock.create_topic(t, 1, 1).unwrap();
        }
        let producer: FutureProducer =
            ClientConfig::new().set("bootstrap.servers", &bs).set("transactional.id", "resume").create().unwrap();
        let txns = Transactions {
            route: "r".into(),
            producer,
            open: Mutex::default(),
            closed: Default::default(),
            metrics: TransactionMetrics::new("r"),
            max_messages: 10,
            max_time: Duration::from_secs(1),
        };
        txns.start().unwrap();
        let sent = txns.producer.send_result(FutureRecord::<[u8], [u8]>::to("out").payload(b"x")).unwrap();
        assert!(block_on(sent).is_ok(), "the record is written");
        {
            let mut open = txns.lock();
            open.offsets.insert((Arc::from("in"), 0), (0, 0));
            open.records = 1;
            open.started = Some(Instant::now());
        }
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &bs).set("group.id", "g").create().unwrap();
        // The next EndTxn is answered after 12 s: the first commit call times out (10 s).
        let raw = unsafe { rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr()) };
        let err = unsafe {
            rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                raw,
                1,
                RDKafkaApiKey::EndTxn as i16,
                1,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
                12_000 as std::ffi::c_int,
            )
        };
        assert_eq!(err, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
        let began = Instant::now();
        let ended = txns.end(consumer.group_metadata());
        assert!(matches!(ended, Ok(Ended::Committed)), "committed after resuming: {:?}", ended.err());
        assert!(began.elapsed() >= TXN_TIMEOUT, "the first call timed out ({:?})", began.elapsed());
        assert!(txns.lock().records == 0, "a new transaction is open");
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }
}
