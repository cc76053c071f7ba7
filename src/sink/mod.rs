//! Destinations: publish a message and get a future that resolves when the broker confirms it.
//!
//! `send` enqueues in call order (so per-partition order is kept); the returned [`Confirm`]
//! resolves once the broker has the message. Sources acknowledge only after it resolves `Ok`.

pub mod amqp;
pub mod kafka;

use std::future::Future;
use std::pin::Pin;

use crate::envelope::Outgoing;

/// Resolves when the broker confirmed (or refused) a published message.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// A publish that did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The client's queue is full: wait for confirmations, then send again.
    #[error("producer queue full")]
    Backpressure,
    /// The broker refused or could not be reached in time: hold and retry the message.
    #[error("publish failed: {0}")]
    Failed(String),
}

/// A destination of a route.
// A few per process, matched on every send: not boxed.
#[allow(clippy::large_enum_variant)]
pub enum Sink {
    /// A Kafka topic.
    Kafka(kafka::KafkaSink),
    /// An AMQP exchange.
    Amqp(amqp::AmqpSink),
}

/// A message in its destination's own form, built by [`Sink::prepare`] ahead of [`Sink::send`].
#[derive(Debug, Clone)]
pub enum Prepared {
    /// librdkafka's header list.
    Kafka(rdkafka::message::OwnedHeaders),
    /// The routing key and the properties, header table included (boxed: Kafka's is a pointer).
    Amqp(Box<(lapin::types::ShortString, lapin::BasicProperties)>),
}

impl Sink {
    /// Enqueues `out`; the returned future resolves on the broker's confirmation.
    pub async fn send(&self, out: Outgoing) -> Result<Confirm, PublishError> {
        match self {
            Sink::Kafka(k) => k.send(out),
            Sink::Amqp(a) => a.send(out).await,
        }
    }

    /// Builds what the destination writes from `out`, where the caller can afford it (a
    /// decision task), so that [`Self::send`] on the route's one loop only hands it over. After
    /// [`Self::check`] and [`Self::make_fit`], which read `out.headers`.
    pub fn prepare(&self, out: &mut Outgoing) {
        match self {
            Sink::Kafka(k) => k.prepare(out),
            Sink::Amqp(a) => a.prepare(out),
        }
    }

    /// Whether the destination can carry `out` unchanged; if not, why.
    pub fn check(&self, out: &Outgoing) -> Result<(), String> {
        match self {
            Sink::Kafka(k) => k.check(out),
            Sink::Amqp(a) => a.check(out),
        }
    }

    /// Drops what the destination cannot carry (headers not starting with `keep_prefix` first);
    /// returns how many parts were dropped. For dead letters, which must always be publishable.
    pub fn make_fit(&self, out: &mut Outgoing, keep_prefix: &str) -> usize {
        match self {
            Sink::Kafka(k) => k.make_fit(out, keep_prefix),
            Sink::Amqp(a) => a.make_fit(out, keep_prefix),
        }
    }

    /// Where it publishes, for logs.
    pub fn describe(&self) -> String {
        match self {
            Sink::Kafka(k) => format!("kafka topic {}", k.topic()),
            Sink::Amqp(a) => format!("amqp exchange {:?}", a.exchange()),
        }
    }
}
