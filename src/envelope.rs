//! A message as the gate sees it, whatever broker it came from, and what goes out again.

/// A header value as received.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderData {
    /// Bytes (Kafka header values; AMQP strings and byte arrays).
    Bytes(Vec<u8>),
    /// Present without a value.
    Null,
    /// Another AMQP type (integer, table, ...), with a text rendering for Kafka destinations.
    Typed {
        /// The AMQP type's name, for rejection details.
        kind: &'static str,
        /// The value as text.
        text: String,
    },
}

/// Where a message came from: shown in republished headers, and needed to acknowledge it.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A Kafka record.
    Kafka {
        /// Topic (shared: one allocation per topic, not per message).
        topic: std::sync::Arc<str>,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// An AMQP delivery.
    Amqp {
        /// The queue it was consumed from.
        queue: String,
        /// The exchange it was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
        /// The channel's delivery tag.
        delivery_tag: u64,
    },
}

impl Origin {
    /// The AMQP routing key, or the Kafka topic: an AMQP destination's default routing key.
    pub fn routing_key(&self) -> &str {
        match self {
            Origin::Kafka { topic, .. } => topic,
            Origin::Amqp { routing_key, .. } => routing_key,
        }
    }

    /// The Kafka topic (empty for AMQP sources).
    pub fn topic(&self) -> &str {
        match self {
            Origin::Kafka { topic, .. } => topic,
            Origin::Amqp { .. } => "",
        }
    }

    /// The gate's headers describing the source: `(name, value)` with the names of `names`.
    pub fn describe<'n>(&self, names: &'n HeaderNames) -> [(&'n str, String); 3] {
        let [topic, partition, offset, queue, exchange, routing_key] = &names.source;
        match self {
            Origin::Kafka { topic: t, partition: p, offset: o } => {
                [(topic, t.to_string()), (partition, p.to_string()), (offset, o.to_string())]
            }
            Origin::Amqp { queue: q, exchange: e, routing_key: r, .. } => {
                [(queue, q.clone()), (exchange, e.clone()), (routing_key, r.clone())]
            }
        }
    }
}

/// AMQP basic properties carried through unchanged (headers are in [`Envelope::headers`]).
pub type AmqpProperties = lapin::BasicProperties;

/// A received message.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Kafka key (AMQP: none).
    pub key: Option<Vec<u8>>,
    /// Body.
    pub payload: Option<Vec<u8>>,
    /// Headers in order, duplicates kept (a duplicated token header is a rejection).
    pub headers: Vec<(String, HeaderData)>,
    /// Timestamp in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
    /// Where it came from.
    pub origin: Origin,
    /// AMQP properties, for AMQP sources.
    pub amqp: Option<AmqpProperties>,
    /// The original AMQP header table, to republish typed values unchanged.
    pub amqp_headers: Option<lapin::types::FieldTable>,
    /// What of the message could not be read faithfully (e.g. a header name that is not UTF-8):
    /// such a message is dead-lettered as `malformed` with this detail.
    pub defect: Option<String>,
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Body.
    pub payload: Option<Vec<u8>>,
    /// Headers to write (source headers kept, plus the gate's own).
    pub headers: Vec<(String, HeaderData)>,
    /// Timestamp in milliseconds.
    pub timestamp_ms: Option<i64>,
    /// Where the message came from (AMQP destinations derive their routing key from it).
    pub origin: Origin,
    /// AMQP properties to carry, if the source was AMQP.
    pub amqp: Option<AmqpProperties>,
    /// Typed AMQP headers of the source to carry (minus removed ones).
    pub amqp_headers: Option<lapin::types::FieldTable>,
}

/// The names of the headers the gate adds on a route: its prefix (default `x-tokengate-`) and a
/// fixed suffix, built once per route instead of once per message.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderNames {
    /// The prefix itself (incoming headers with it are removed).
    pub prefix: String,
    /// The verified `iss`.
    pub issuer: String,
    /// The key that verified the token.
    pub kid: String,
    /// The token's fingerprint.
    pub fingerprint: String,
    /// The route.
    pub route: String,
    /// A dead letter's reason code.
    pub reason: String,
    /// A dead letter's detail.
    pub detail: String,
    /// When the message was rejected.
    pub rejected_at: String,
    /// Parts of a dead letter dropped to fit its destination.
    pub dropped: String,
    /// The raw properties of an AMQP message the client could not decode.
    pub raw_properties: String,
    /// Source coordinates: topic, partition, offset, queue, exchange, routing key.
    source: [String; 6],
}

impl HeaderNames {
    /// The names under `prefix`.
    pub fn new(prefix: &str) -> HeaderNames {
        let n = |suffix: &str| format!("{prefix}{suffix}");
        HeaderNames {
            prefix: prefix.to_owned(),
            issuer: n("issuer"),
            kid: n("kid"),
            fingerprint: n("fingerprint"),
            route: n("route"),
            reason: n("reason"),
            detail: n("detail"),
            rejected_at: n("rejected-at"),
            dropped: n("dropped"),
            raw_properties: n("raw-properties"),
            source: ["topic", "partition", "offset", "queue", "exchange", "routing-key"]
                .map(|s| n(&format!("source-{s}"))),
        }
    }
}
