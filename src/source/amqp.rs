//! The AMQP source: intake with manual acks and a bounded prefetch, the conversion of a delivery
//! to an envelope, and its acknowledgement rule (ack only after the republish is confirmed; a
//! failed publish nacks with requeue). The per-message steps are [`crate::pipeline`]'s. A lost
//! connection or channel reconnects with backoff, and unacked deliveries come back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::{Backoff, Route};
use crate::envelope::{Envelope, HeaderData, Origin};
use crate::pipeline::{Acks, CHUNK, Pipeline, Settled};

/// An AMQP source's settings.
pub struct AmqpSource {
    /// Connection URL, credentials included.
    pub url: String,
    /// Queue name.
    pub queue: String,
    /// Declare the queue (durable) with `arguments`, else check it exists (passive).
    pub declare: bool,
    /// Declaration arguments.
    pub arguments: FieldTable,
    /// Most unacked deliveries (channel prefetch).
    pub prefetch: u16,
}

/// Longest wait for a connection handshake or an ack on a broker that stopped answering.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one AMQP route until `cancel`, reconnecting after losses.
pub async fn run(
    route: Arc<Route>,
    src: Arc<AmqpSource>,
    cancel: CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::default();
    tracing::info!(route = %route.rules.name, queue = %src.queue, trusted = %route.trusted.describe(), dead_letter = %route.dead_letter.describe(), "route started");
    loop {
        let started = Instant::now();
        match session(&route, &src, &cancel, drain_timeout).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                route.status.running.store(false, Ordering::Relaxed);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                let d = backoff.next_delay();
                tracing::warn!(route = %route.rules.name, error = %e, retry_in_ms = d.as_millis() as u64, "AMQP session lost; reconnecting (unacked deliveries will be redelivered)");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

/// Turns an AMQP delivery into an envelope; non-string header values keep their type name.
pub fn envelope(d: &Delivery, queue: &str) -> Envelope {
    let table = d.properties.headers().clone();
    let headers = table
        .as_ref()
        .map(|t| t.inner().iter().map(|(k, v)| (k.as_str().to_owned(), header_data(v))).collect())
        .unwrap_or_default();
    Envelope {
        key: None,
        payload: Some(d.data.clone()),
        headers,
        timestamp_ms: d.properties.timestamp().map(|s| (s as i64).saturating_mul(1000)),
        origin: Origin::Amqp {
            queue: queue.to_owned(),
            exchange: d.exchange.as_str().to_owned(),
            routing_key: d.routing_key.as_str().to_owned(),
            delivery_tag: d.delivery_tag,
        },
        amqp: Some(d.properties.clone().with_headers(FieldTable::default())),
        amqp_headers: table,
        defect: None,
    }
}

fn header_data(v: &AMQPValue) -> HeaderData {
    match v {
        AMQPValue::LongString(s) => HeaderData::Bytes(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => HeaderData::Bytes(s.as_str().as_bytes().to_vec()),
        AMQPValue::ByteArray(b) => HeaderData::Typed { kind: "byte array", text: hex::encode(b.as_slice()) },
        AMQPValue::Void => HeaderData::Null,
        AMQPValue::FieldTable(_) => HeaderData::Typed { kind: "table", text: format!("{v:?}") },
        AMQPValue::FieldArray(_) => HeaderData::Typed { kind: "array", text: format!("{v:?}") },
        AMQPValue::Boolean(b) => HeaderData::Typed { kind: "boolean", text: b.to_string() },
        AMQPValue::Timestamp(t) => HeaderData::Typed { kind: "timestamp", text: t.to_string() },
        AMQPValue::Float(f) => HeaderData::Typed { kind: "float", text: f.to_string() },
        AMQPValue::Double(f) => HeaderData::Typed { kind: "double", text: f.to_string() },
        other => HeaderData::Typed { kind: "integer", text: format!("{other:?}") },
    }
}

/// AMQP's publish-time rule is the default: every delivery is published; acks follow confirms.
struct AmqpAcks;

impl Acks for AmqpAcks {
    type Ack = Acker;
}

async fn session(
    route: &Arc<Route>,
    src: &AmqpSource,
    cancel: &CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let name = route.rules.name.clone();
    // A broker that accepts TCP while still starting can leave a handshake hanging: bound it.
    let setup = async {
        let conn = Connection::connect(
            &src.url,
            ConnectionProperties::default().with_connection_name(format!("tokengate-{name}").into()),
        )
        .await?;
        let channel = conn.create_channel().await?;
        channel.basic_qos(src.prefetch, BasicQosOptions::default()).await?;
        let options = QueueDeclareOptions { passive: !src.declare, durable: true, ..Default::default() };
        channel.queue_declare(ShortString::from(src.queue.as_str()), options, src.arguments.clone()).await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(src.queue.as_str()),
                ShortString::from(format!("tokengate-{name}")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        anyhow::Ok((conn, channel, consumer))
    };
    let (conn, channel, mut consumer) = tokio::time::timeout(AMQP_TIMEOUT, setup)
        .await
        .map_err(|_| anyhow::anyhow!("AMQP connection setup timed out"))??;
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    route.status.running.store(true, Ordering::Relaxed);
    let mut pipe: Pipeline<Acker> = Pipeline::new(Arc::clone(route));
    let mut failure = None;
    loop {
        let wake = pipe.wake_at();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = pipe.confirmations.next(), if !pipe.confirmations.is_empty() => settle(&mut pipe, done).await?,
            Some(chunk) = pipe.decisions.next(), if !pipe.decisions.is_empty() => pipe.decided(chunk),
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
            // The consumer stream does not always end when the connection dies: check it.
            _ = liveness.tick() => {
                if !conn.status().connected() || !channel.status().connected() {
                    anyhow::bail!("AMQP connection lost");
                }
            }
            delivery = consumer.next(), if pipe.has_room() => {
                let Some(delivery) = delivery else { anyhow::bail!("the broker cancelled the consumer") };
                let delivery = delivery?;
                let mut batch = vec![(envelope(&delivery, &src.queue), delivery.acker)];
                // Take what is already buffered, without waiting, to decide it in one task.
                while batch.len() < CHUNK {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push((envelope(&d, &src.queue), d.acker)),
                        Some(Some(Err(e))) => {
                            failure = Some(e);
                            break;
                        }
                        _ => break,
                    }
                }
                pipe.submit(batch);
            }
        }
        pipe.pump(&mut AmqpAcks).await;
        if let Some(e) = failure.take() {
            // Unacked deliveries go back to the queue when the session ends.
            return Err(e.into());
        }
    }
    // Shutdown: settle what is in flight; anything unconfirmed stays unacked and is redelivered.
    let deadline = Instant::now() + drain_timeout;
    while let Ok(Some(done)) =
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), pipe.confirmations.next()).await
    {
        let _ = settle(&mut pipe, done).await;
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    route.status.running.store(false, Ordering::Relaxed);
    tracing::info!(route = %name, "route stopped");
    Ok(())
}

/// AMQP's acknowledgement rule: ack a confirmed republish; nack (requeue) a failed one and
/// pause intake.
async fn settle(pipe: &mut Pipeline<Acker>, (acker, result): Settled<Acker>) -> anyhow::Result<()> {
    match result {
        Ok(()) => {
            tokio::time::timeout(AMQP_TIMEOUT, acker.ack(BasicAckOptions::default()))
                .await
                .map_err(|_| anyhow::anyhow!("ack timed out"))??;
        }
        Err(e) => {
            pipe.pause_after_failure(&e);
            // If the channel is gone the broker requeues it anyway.
            let nack = acker.nack(BasicNackOptions { requeue: true, ..Default::default() });
            let _ = tokio::time::timeout(AMQP_TIMEOUT, nack).await;
        }
    }
    Ok(())
}
