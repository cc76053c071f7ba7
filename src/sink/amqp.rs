//! An AMQP exchange as a destination: publisher confirms and `mandatory`, so an unroutable
//! message is an error that holds, never a silent loss. Reconnects on the next send after a loss.

use futures_util::FutureExt as _;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::{Confirm, Prepared, PublishError};
use crate::amqp::MAX_SHORT_STRING;
use crate::envelope::{HeaderData, Outgoing};

/// Persistent, so a confirmed message survives a broker restart on a durable queue.
const PERSISTENT: u8 = 2;

/// The most header-table bytes a message may carry: the whole content header must fit in one
/// frame, and RabbitMQ's default `frame_max` is 128 KiB (a few KiB are left for the properties).
pub const MAX_HEADER_BYTES: usize = 120 * 1024;

/// A confirmed publisher to one exchange.
pub struct AmqpSink {
    url: String,
    exchange: String,
    routing_key: Option<String>,
    /// The publishing channel; held across `basic_publish` so publishes keep their order.
    channel: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl AmqpSink {
    /// A sink for `exchange`; connects on first use. `routing_key` may use `{routing_key}`,
    /// `{topic}` and `{key}`; absent keeps the source's routing key (Kafka sources: the topic).
    pub fn new(url: &str, exchange: &str, routing_key: Option<String>) -> AmqpSink {
        AmqpSink {
            url: url.to_owned(),
            exchange: exchange.to_owned(),
            routing_key,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// The exchange.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key for `out`: the template with `{routing_key}` (the source's routing key, or
    /// the topic of a Kafka source), `{topic}` (the Kafka topic) and `{key}` (the Kafka key,
    /// lossily UTF-8) filled in; without a template the source's routing key.
    pub fn routing_key(&self, out: &Outgoing) -> String {
        let source = out.origin.routing_key();
        match &self.routing_key {
            None => source.to_owned(),
            Some(t) => t
                .replace("{routing_key}", source)
                .replace("{topic}", out.origin.topic())
                .replace("{key}", &out.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default()),
        }
    }

    /// Builds `out`'s routing key and properties ahead of [`Self::send`] (the headers move into
    /// the table).
    pub fn prepare(&self, out: &mut Outgoing) {
        out.prepared = Some(Prepared::Amqp(Box::new(self.wire(out))));
    }

    /// The routing key and properties of `out`, its headers moved into the table.
    fn wire(&self, out: &mut Outgoing) -> (ShortString, BasicProperties) {
        let key = ShortString::try_new(cut(self.routing_key(out), MAX_SHORT_STRING)).unwrap_or_default();
        (key, properties(out))
    }

    /// Whether this destination can carry `out` unchanged; if not, why (for a `malformed` detail).
    pub fn check(&self, out: &Outgoing) -> Result<(), String> {
        let key = self.routing_key(out);
        if key.len() > MAX_SHORT_STRING {
            return Err(format!("routing key renders to {} bytes; AMQP allows {MAX_SHORT_STRING}", key.len()));
        }
        if let Some((i, (name, _))) = out.headers.iter().enumerate().find(|(_, (n, _))| n.len() > MAX_SHORT_STRING) {
            return Err(format!(
                "header #{i} name of {} bytes ({}); AMQP allows {MAX_SHORT_STRING}",
                name.len(),
                crate::verify::jwt::shorten(name)
            ));
        }
        let bytes = header_bytes(out);
        if bytes > MAX_HEADER_BYTES {
            return Err(format!("headers of {bytes} bytes; an AMQP destination takes at most {MAX_HEADER_BYTES}"));
        }
        Ok(())
    }

    /// Makes `out` fit this destination by dropping what cannot be carried (dead letters must
    /// always be publishable); returns how many headers were dropped. The routing key is cut to
    /// 255 bytes at publish time.
    pub fn make_fit(&self, out: &mut Outgoing, keep_prefix: &str) -> usize {
        let before = out.headers.len();
        out.headers.retain(|(n, _)| n.len() <= MAX_SHORT_STRING);
        if header_bytes(out) > MAX_HEADER_BYTES {
            // Keep the gate's own headers (reason, detail, source): they say why it is here.
            out.headers.retain(|(n, _)| n.starts_with(keep_prefix));
            out.amqp_headers = None;
        }
        before - out.headers.len()
    }

    /// Publishes `out`. Its frames are queued on the connection before this returns, so
    /// publishes keep their call order, but it does not wait for them to be written: a run of
    /// publishes is written, and wakes the route, once, not once per message. The future
    /// resolves on the broker's confirm (or fails if the frames were never written).
    pub async fn send(&self, mut out: Outgoing) -> Result<Confirm, PublishError> {
        let mut guard = self.channel.lock().await;
        if guard.as_ref().is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected()) {
            *guard = Some(connect_confirming(&self.url).await.map_err(PublishError::Failed)?);
        }
        let (_, channel) = guard.as_ref().expect("just connected");
        let channel = channel.clone();
        let exchange = ShortString::from(self.exchange.as_str());
        let (key, props) = match out.prepared.take() {
            Some(Prepared::Amqp(wire)) => *wire,
            _ => self.wire(&mut out),
        };
        let payload = out.payload.unwrap_or_default();
        let mut publish = Box::pin(async move {
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            channel.basic_publish(exchange, key, options, &payload, props).await
        });
        // The first poll queues the frames (and takes the confirm's sequence number) and then
        // waits for the write: that wait is left to the returned future.
        let first = (&mut publish).now_or_never();
        if let Some(Err(e)) = first {
            *guard = None;
            return Err(PublishError::Failed(e.to_string()));
        }
        Ok(Box::pin(async move {
            let confirm = match first {
                Some(written) => written,
                None => publish.await,
            };
            let confirm = confirm.map_err(|e| PublishError::Failed(e.to_string()))?;
            match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(ret))) => Err(PublishError::Failed(format!(
                    "unroutable: the broker returned it ({} {})",
                    ret.reply_code, ret.reply_text
                ))),
                Ok(Confirmation::Nack(_)) => Err(PublishError::Failed("the broker nacked the message".into())),
                Ok(Confirmation::NotRequested) => Err(PublishError::Failed("publisher confirms not enabled".into())),
                Err(e) => Err(PublishError::Failed(e.to_string())),
            }
        }))
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// About what the header table takes on the wire: name, type tag, length and value per header.
fn header_bytes(out: &Outgoing) -> usize {
    out.headers
        .iter()
        .map(|(n, v)| {
            1 + n.len()
                + 5
                + match v {
                    HeaderData::Bytes(b) => b.len(),
                    HeaderData::Null => 0,
                    HeaderData::Typed { text, .. } => text.len(),
                }
        })
        .sum()
}

/// Opens a connection and a channel in confirm mode, bounded by the AMQP timeout.
pub async fn connect_confirming(url: &str) -> Result<(Connection, Channel), String> {
    let confirming = |conn: Connection| async move {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok((conn, channel))
    };
    crate::amqp::connect(url, "tokengate-publisher", confirming).await.map_err(|e| e.to_string())
}

/// AMQP properties for `out`: the source's (AMQP sources) with headers rebuilt, else persistent
/// with the Kafka timestamp.
fn properties(out: &mut Outgoing) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in std::mem::take(&mut out.headers) {
        let v = match value {
            HeaderData::Bytes(b) => AMQPValue::LongString(LongString::from(b)),
            HeaderData::Null => AMQPValue::Void,
            HeaderData::Typed { text, .. } => out
                .amqp_headers
                .as_ref()
                .and_then(|t| t.inner().get(name.as_str()).cloned())
                .unwrap_or_else(|| AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))),
        };
        // Names that AMQP cannot carry were dead-lettered or dropped before; never panic on one.
        if let Ok(name) = ShortString::try_new(name.as_str()) {
            table.insert(name, v);
        }
    }
    let base = match &out.amqp {
        Some(p) => p.clone(),
        None => {
            let p = BasicProperties::default().with_delivery_mode(PERSISTENT);
            match out.timestamp_ms {
                Some(ms) if ms >= 0 => p.with_timestamp((ms / 1000) as u64),
                _ => p,
            }
        }
    };
    base.with_headers(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Origin;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn outgoing(headers: Vec<(String, Vec<u8>)>, key: Vec<u8>, routing_key: String) -> Outgoing {
        Outgoing {
            key: Some(key),
            payload: Some(b"p".to_vec()),
            headers: headers.into_iter().map(|(n, v)| (n, HeaderData::Bytes(v))).collect(),
            timestamp_ms: Some(-5),
            origin: Origin::Amqp {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key,
                delivery_tag: 1,
                redelivered: false,
            },
            amqp: None,
            amqp_headers: None,
            facts: None,
            prepared: None,
        }
    }

    fn sink() -> AmqpSink {
        AmqpSink::new("amqp://127.0.0.1:1/%2f", "ex", Some("{routing_key}.{key}".into()))
    }

    #[test]
    fn check_names_what_does_not_fit() {
        let s = sink();
        let long_name = outgoing(vec![("n".repeat(256), vec![])], b"k".to_vec(), "rk".into());
        assert!(s.check(&long_name).unwrap_err().contains("header #0 name of 256 bytes"));
        let long_key = outgoing(vec![], vec![b'k'; 300], "rk".into());
        assert!(s.check(&long_key).unwrap_err().contains("routing key renders to 303 bytes"));
        let big = outgoing(vec![("big".into(), vec![0; MAX_HEADER_BYTES])], b"k".to_vec(), "rk".into());
        assert!(s.check(&big).unwrap_err().contains("headers of"));
        assert_eq!(cut("é".repeat(200), 255).len(), 254, "cut at a character boundary");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever a producer sent, a dead letter made to fit is publishable: names and table
        /// size fit, the routing key is cut at publish, and building the properties never panics.
        #[test]
        fn a_dead_letter_made_to_fit_always_fits(
            headers in vec((".{0,300}", vec(any::<u8>(), 0..3000)), 0..120),
            key in vec(any::<u8>(), 0..600),
            routing_key in ".{0,255}",
        ) {
            let s = sink();
            let mut out = outgoing(headers, key, routing_key);
            let _ = properties(&mut out.clone());
            let checked = s.check(&out);
            let dropped = s.make_fit(&mut out, "x-tokengate-");
            prop_assert!(checked.is_err() || dropped == 0, "what fits is not cut");
            if let Err(e) = s.check(&out) {
                prop_assert!(e.starts_with("routing key"), "{}", e);
            }
            prop_assert!(cut(s.routing_key(&out), MAX_SHORT_STRING).len() <= MAX_SHORT_STRING);
            let n = out.headers.len();
            s.prepare(&mut out);
            let Some(Prepared::Amqp(wire)) = &out.prepared else { panic!("prepared for AMQP") };
            let props = &wire.1;
            prop_assert!(out.headers.is_empty(), "the headers moved into the table");
            prop_assert!(props.headers().as_ref().map_or(0, |t| t.inner().len()) <= n);
        }
    }
}
