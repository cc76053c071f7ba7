//! A Kafka topic as a destination: an idempotent producer with `acks=all`.

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{Confirm, PublishError};
use crate::envelope::{HeaderData, Outgoing};

/// Producer settings tokengate insists on; user properties cannot weaken delivery below these.
const PINNED: &[(&str, &str)] = &[("acks", "all"), ("enable.idempotence", "true")];

/// A producer bound to one topic.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
}

/// Builds a librdkafka config: cluster settings, then per-client overrides, then pinned values.
pub fn client_config(bootstrap: &str, cluster: &[(String, String)], extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in cluster.iter().chain(extra) {
        c.set(k, v);
    }
    c
}

impl KafkaSink {
    /// A sink publishing to `topic` with the given client config (cluster and sink properties).
    pub fn new(mut config: ClientConfig, topic: &str) -> Result<KafkaSink, KafkaError> {
        // Small batches keep latency low; a user property may raise linger.ms for throughput.
        if config.get("linger.ms").is_none() {
            config.set("linger.ms", "5");
        }
        for (k, v) in PINNED {
            config.set(*k, *v);
        }
        Ok(KafkaSink { producer: config.create()?, topic: topic.to_owned() })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Enqueues without waiting; the confirmation comes through the returned future.
    pub fn send(&self, out: &Outgoing) -> Result<Confirm, PublishError> {
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (name, value) in &out.headers {
            let value: Option<&[u8]> = match value {
                HeaderData::Bytes(b) => Some(b),
                HeaderData::Null => None,
                HeaderData::Typed { text, .. } => Some(text.as_bytes()),
            };
            headers = headers.insert(Header { key: name, value });
        }
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
        match self.producer.send_result(record) {
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
