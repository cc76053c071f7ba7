//! An AMQP exchange as a destination: publisher confirms and `mandatory`, so an unroutable
//! message is an error that holds, never a silent loss. Reconnects on the next send after a loss.

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::{Confirm, PublishError};
use crate::envelope::{HeaderData, Outgoing};

/// Persistent, so a confirmed message survives a broker restart on a durable queue.
const PERSISTENT: u8 = 2;

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

    fn routing_key(&self, out: &Outgoing) -> String {
        let source = out.routing_key.clone().unwrap_or_else(|| {
            header_text(out, "x-tokengate-source-topic")
                .or_else(|| header_text(out, "source-topic"))
                .unwrap_or_default()
        });
        match &self.routing_key {
            None => source,
            Some(t) => t
                .replace("{routing_key}", &source)
                .replace("{topic}", &header_text(out, "x-tokengate-source-topic").unwrap_or_default())
                .replace("{key}", &out.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default()),
        }
    }

    /// Publishes `out`; the future resolves on the broker's confirm.
    pub async fn send(&self, out: &Outgoing) -> Result<Confirm, PublishError> {
        let mut guard = self.channel.lock().await;
        if guard.as_ref().is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected()) {
            *guard = Some(connect_confirming(&self.url).await.map_err(PublishError::Failed)?);
        }
        let (_, channel) = guard.as_ref().expect("just connected");
        let confirm = channel
            .basic_publish(
                ShortString::from(self.exchange.as_str()),
                ShortString::from(self.routing_key(out)),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                out.payload.as_deref().unwrap_or_default(),
                properties(out),
            )
            .await;
        let confirm = match confirm {
            Ok(c) => c,
            Err(e) => {
                *guard = None;
                return Err(PublishError::Failed(e.to_string()));
            }
        };
        Ok(Box::pin(async move {
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

fn header_text(out: &Outgoing, name: &str) -> Option<String> {
    out.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| match v {
        HeaderData::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    })
}

/// Opens a connection and a channel in confirm mode, bounded by the AMQP timeout.
pub async fn connect_confirming(url: &str) -> Result<(Connection, Channel), String> {
    let connect = async {
        let name = "tokengate-publisher".into();
        let conn = Connection::connect(url, ConnectionProperties::default().with_connection_name(name)).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        lapin::Result::Ok((conn, channel))
    };
    match tokio::time::timeout(crate::source::amqp::AMQP_TIMEOUT, connect).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("AMQP connection setup timed out".into()),
    }
}

/// AMQP properties for `out`: the source's (AMQP sources) with headers rebuilt, else persistent
/// with the Kafka timestamp.
fn properties(out: &Outgoing) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in &out.headers {
        let v = match value {
            HeaderData::Bytes(b) => AMQPValue::LongString(LongString::from(b.clone())),
            HeaderData::Null => AMQPValue::Void,
            HeaderData::Typed { text, .. } => out
                .amqp_headers
                .as_ref()
                .and_then(|t| t.inner().get(name.as_str()).cloned())
                .unwrap_or_else(|| AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))),
        };
        table.insert(ShortString::from(name.as_str()), v);
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
