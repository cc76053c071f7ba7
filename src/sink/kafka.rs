//! A Kafka topic as a destination: an idempotent producer with `acks=all`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{Confirm, Prepared, PublishError};
use crate::envelope::{HeaderData, Outgoing};

/// Producer settings tokengate insists on; user properties cannot weaken delivery below these.
const PINNED: &[(&str, &str)] = &[("acks", "all"), ("enable.idempotence", "true")];

/// A producer bound to one topic.
pub struct KafkaSink {
    producer: Arc<Slot>,
    topic: String,
    /// The producer's `message.max.bytes`: a larger record is refused before it is sent.
    max_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_BYTES: usize = 1_000_000;

impl KafkaSink {
    /// A sink publishing to `topic` with the given client config (cluster and sink properties).
    pub fn new(config: ClientConfig, topic: &str) -> Result<KafkaSink, KafkaError> {
        let config = pinned(config);
        let max_bytes = max_bytes(&config);
        Ok(KafkaSink { producer: Arc::new(Slot::new(config)?), topic: topic.to_owned(), max_bytes })
    }

    /// Two sinks, to `trusted` and to `dead_letter`, on one transactional producer (`config` with
    /// `transactional.id` = `id`), for an `exactly_once` route: its loop runs the transactions.
    /// A transaction the broker did not see end within `transaction.timeout.ms` (the process was
    /// killed) is aborted by the broker: 10 s unless set, so that a partition's next owner waits
    /// no longer than that for it.
    pub fn transactional(
        config: ClientConfig,
        id: &str,
        trusted: &str,
        dead_letter: &str,
    ) -> Result<(KafkaSink, KafkaSink), KafkaError> {
        let mut config = pinned(config);
        config.set("transactional.id", id);
        if config.get("transaction.timeout.ms").is_none() {
            config.set("transaction.timeout.ms", "10000");
        }
        // Right after a commit the coordinator answers the next transaction's first request with
        // CONCURRENT_TRANSACTIONS until its commit markers are written (a few ms here), and
        // librdkafka retries after retry.backoff.ms: 100 ms by default, which then bounds every
        // transaction. Retries back off exponentially from here up to retry.backoff.max.ms.
        if config.get("retry.backoff.ms").is_none() {
            config.set("retry.backoff.ms", "5");
        }
        let max_bytes = max_bytes(&config);
        let slot = Arc::new(Slot::new(config)?);
        let sink = |topic: &str| KafkaSink { producer: Arc::clone(&slot), topic: topic.to_owned(), max_bytes };
        Ok((sink(trusted), sink(dead_letter)))
    }

    /// Replaces the producer (of both sinks of an `exactly_once` route) with a new one and returns
    /// it: each run of the route's loop starts on a fresh producer, since one that met a fatal
    /// error (fenced, say) can never write again. The new producer fences the old one.
    pub fn renew_producer(&self) -> Result<FutureProducer, KafkaError> {
        let fresh: FutureProducer = self.producer.config.create()?;
        self.producer.current.store(Arc::new(fresh.clone()));
        Ok(fresh)
    }

    /// Whether the topic can take `out` (librdkafka refuses records over `message.max.bytes`).
    pub fn check(&self, out: &Outgoing) -> Result<(), String> {
        let size = record_bytes(out);
        if size > self.max_bytes {
            return Err(format!(
                "record of about {size} bytes; the destination's message.max.bytes is {}",
                self.max_bytes
            ));
        }
        Ok(())
    }

    /// Makes a dead letter fit: headers first, then the payload, are dropped while it is too large.
    /// Returns what was dropped.
    pub fn make_fit(&self, out: &mut Outgoing, keep_prefix: &str) -> usize {
        if self.check(out).is_ok() {
            return 0;
        }
        let before = out.headers.len();
        out.headers.retain(|(n, _)| n.starts_with(keep_prefix));
        let mut dropped = before - out.headers.len();
        if self.check(out).is_err() && out.payload.take().is_some() {
            dropped += 1;
        }
        dropped
    }

    /// Builds `out`'s headers as librdkafka takes them ahead of [`Self::send`]; `out.headers`
    /// are dropped here too.
    pub fn prepare(&self, out: &mut Outgoing) {
        out.prepared = Some(Prepared::Kafka(headers(&out.headers)));
        out.headers = Vec::new();
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Enqueues without waiting; the confirmation comes through the returned future.
    ///
    /// Header names are written as they are (Kafka takes any bytes); values likewise.
    pub fn send(&self, mut out: Outgoing) -> Result<Confirm, PublishError> {
        let headers = match out.prepared.take() {
            Some(Prepared::Kafka(h)) => h,
            _ => headers(&out.headers),
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &out.key {
            record = record.key(k);
        }
        if let Some(p) = &out.payload {
            record = record.payload(p);
        }
        if let Some(ts) = out.timestamp_ms {
            record = record.timestamp(ts);
        }
        match self.producer.current.load().send_result(record) {
            Ok(delivery) => Ok(Box::pin(async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(PublishError::Failed(e.to_string())),
                    Err(_) => Err(PublishError::Failed("producer shut down before confirming".into())),
                }
            })),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(PublishError::Backpressure),
            Err((e, _)) => Err(PublishError::Failed(e.to_string())),
        }
    }
}

/// `list` as librdkafka takes it (one allocation and copy per header).
fn headers(list: &[(String, HeaderData)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(list.len());
    for (name, value) in list {
        let value: Option<&[u8]> = match value {
            HeaderData::Bytes(b) => Some(b),
            HeaderData::Null => None,
            HeaderData::Typed { text, .. } => Some(text.as_bytes()),
        };
        headers = headers.insert(Header { key: name, value });
    }
    headers
}

/// A sink's producer, replaceable, with the config it is made from.
struct Slot {
    current: ArcSwap<FutureProducer>,
    config: ClientConfig,
}

impl Slot {
    fn new(config: ClientConfig) -> Result<Slot, KafkaError> {
        Ok(Slot { current: ArcSwap::from_pointee(config.create()?), config })
    }
}

/// `config` with low-latency batching unless set, and the delivery settings tokengate insists on.
fn pinned(mut config: ClientConfig) -> ClientConfig {
    // Small batches keep latency low; a user property may raise linger.ms for throughput.
    if config.get("linger.ms").is_none() {
        config.set("linger.ms", "5");
    }
    for (k, v) in PINNED {
        config.set(*k, *v);
    }
    config
}

/// The producer's `message.max.bytes`.
fn max_bytes(config: &ClientConfig) -> usize {
    config.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_BYTES)
}

/// About what a record takes against `message.max.bytes`: key, payload, headers and overhead.
fn record_bytes(out: &Outgoing) -> usize {
    let headers: usize = out
        .headers
        .iter()
        .map(|(n, v)| {
            n.len()
                + match v {
                    HeaderData::Bytes(b) => b.len(),
                    HeaderData::Null => 0,
                    HeaderData::Typed { text, .. } => text.len(),
                }
                + 10
        })
        .sum();
    out.key.as_ref().map_or(0, Vec::len) + out.payload.as_ref().map_or(0, Vec::len) + headers + 100
}
