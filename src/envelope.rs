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
        /// Set by the broker on a delivery it made before (a consumer died before its ack).
        redelivered: bool,
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

    /// Whether this may be a second delivery of a message already read: any Kafka record (its
    /// coordinates are unique, so a repeat can only be a re-read), an AMQP delivery only when the
    /// broker flagged it redelivered (a producer can repeat an AMQP message's id, not that flag).
    pub fn may_repeat(&self) -> bool {
        match self {
            Origin::Kafka { .. } => true,
            Origin::Amqp { redelivered, .. } => *redelivered,
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

impl Envelope {
    /// A stable id of the source message, the same on every delivery of it, for consumers that
    /// deduplicate what at-least-once delivery may repeat: `{topic}/{partition}/{offset}` for a
    /// Kafka record; for an AMQP message, `{queue}/id:{message_id}` when the producer set the
    /// `message_id` property, else `{queue}/sha256:{hex}` over its exchange, routing key, headers
    /// and body (two identical messages then share an id: producers that may send identical
    /// messages should set `message_id`).
    pub fn message_id(&self) -> String {
        match &self.origin {
            Origin::Kafka { topic, partition, offset } => format!("{topic}/{partition}/{offset}"),
            Origin::Amqp { queue, exchange, routing_key, .. } => {
                if let Some(id) = self.amqp.as_ref().and_then(|p| p.message_id().as_ref()) {
                    return format!("{queue}/id:{id}");
                }
                let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                // Each part length-prefixed, so that no two different messages hash the same bytes.
                let mut part = |b: &[u8]| {
                    d.update(&(b.len() as u64).to_be_bytes());
                    d.update(b);
                };
                part(exchange.as_bytes());
                part(routing_key.as_bytes());
                for (name, value) in &self.headers {
                    part(name.as_bytes());
                    match value {
                        HeaderData::Bytes(b) => part(b),
                        HeaderData::Null => part(b"\0null"),
                        HeaderData::Typed { kind, text } => {
                            part(kind.as_bytes());
                            part(text.as_bytes());
                        }
                    }
                }
                part(self.payload.as_deref().unwrap_or_default());
                format!("{queue}/sha256:{}", hex::encode(d.finish().as_ref()))
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
    /// What the decision learned of the token, for the audit trail (only when it is on).
    pub facts: Option<Box<crate::verify::Facts>>,
    /// The message in its destination's own form, built beside the decision rather than on the
    /// route's one loop ([`crate::sink::Sink::prepare`]); `headers` is then empty.
    pub prepared: Option<crate::sink::Prepared>,
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
    /// The source message's stable id ([`Envelope::message_id`]).
    pub message_id: String,
    /// Source coordinates: topic, partition, offset, queue, exchange, routing key.
    source: [String; 6],
}

impl HeaderNames {
    /// Whether `name` is under the gate's prefix, compared without case (and without a copy):
    /// such a header is the gate's own, never carried over from a producer or a dead letter.
    pub fn is_own(&self, name: &str) -> bool {
        name.get(..self.prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(&self.prefix))
    }

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
            message_id: n("message-id"),
            source: ["topic", "partition", "offset", "queue", "exchange", "routing-key"]
                .map(|s| n(&format!("source-{s}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gates_own_headers_are_recognised_whatever_their_case_and_never_panic() {
        let names = HeaderNames::new("x-tokengate-");
        assert!(names.is_own("x-tokengate-sub"));
        assert!(names.is_own("X-TokenGate-Reason"), "a producer's forgery in another case");
        assert!(!names.is_own("x-token"), "shorter than the prefix");
        assert!(!names.is_own("authorization"));
        assert!(!names.is_own("x-tokengaté-sub"), "a multi-byte character across the prefix's end");
    }

    fn amqp(payload: &[u8], message_id: Option<&str>) -> Envelope {
        let props =
            message_id.map_or_else(AmqpProperties::default, |id| AmqpProperties::default().with_message_id(id.into()));
        Envelope {
            key: None,
            payload: Some(payload.to_vec()),
            headers: vec![("authorization".into(), HeaderData::Bytes(b"Bearer t".to_vec()))],
            timestamp_ms: None,
            origin: Origin::Amqp {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "r".into(),
                delivery_tag: 1,
                redelivered: false,
            },
            amqp: Some(props),
            amqp_headers: None,
            defect: None,
        }
    }

    #[test]
    fn message_ids_are_stable_per_source_message() {
        let kafka = Envelope {
            origin: Origin::Kafka { topic: "orders".into(), partition: 2, offset: 41 },
            amqp: None,
            ..amqp(b"p", None)
        };
        assert_eq!(kafka.message_id(), "orders/2/41");
        assert_eq!(amqp(b"p", Some("m-1")).message_id(), "q/id:m-1");
        let a = amqp(b"p", None);
        let mut redelivered = a.clone();
        if let Origin::Amqp { delivery_tag, .. } = &mut redelivered.origin {
            *delivery_tag = 9;
        }
        assert_eq!(a.message_id(), redelivered.message_id(), "a redelivery keeps its id");
        assert!(a.message_id().starts_with("q/sha256:"));
        assert_ne!(a.message_id(), amqp(b"other", None).message_id());
    }
}
