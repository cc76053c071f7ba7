//! The AMQP consume loop: manual acks, a bounded prefetch, and an ack only after the republish
//! is confirmed. A failed publish nacks with requeue (redelivered, never dropped); a lost
//! connection or channel reconnects with backoff, and unacked deliveries come back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::{Backoff, Route};
use crate::envelope::{Envelope, HeaderData, Origin};
use crate::gate::{Guard, Outcome};
use crate::sink::PublishError;

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

type Done = (Acker, Result<(), PublishError>);

/// Longest wait for a connection handshake or an ack on a broker that stopped answering.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(10);

/// A session's hold state: a failed publish pauses intake until `until` (confirmations of other
/// deliveries keep being settled meanwhile), with a backoff that grows while failures repeat.
#[derive(Default)]
struct Holding {
    backoff: Backoff,
    until: Option<tokio::time::Instant>,
}

/// Runs one AMQP route until `cancel`, reconnecting after losses.
pub async fn run(
    route: Arc<Route>,
    src: AmqpSource,
    cancel: CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::default();
    tracing::info!(route = %route.rules.name, queue = %src.queue, trusted = %route.trusted.describe(), dead_letter = %route.dead_letter.describe(), "route started");
    let mut guard = Guard::new(&route.rules.name, route.guard.clone());
    loop {
        let started = Instant::now();
        match session(&route, &src, &cancel, drain_timeout, &mut guard).await {
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

async fn session(
    route: &Arc<Route>,
    src: &AmqpSource,
    cancel: &CancellationToken,
    drain_timeout: Duration,
    guard: &mut Guard,
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
    let mut inflight: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>> = FuturesUnordered::new();
    let mut h = Holding::default();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = inflight.next(), if !inflight.is_empty() => settle(route, done, &mut h).await?,
            _ = tokio::time::sleep_until(h.until.unwrap_or_else(tokio::time::Instant::now)), if h.until.is_some() => {
                h.until = None;
            }
            // The consumer stream does not always end when the connection dies: check it.
            _ = liveness.tick() => {
                if !conn.status().connected() || !channel.status().connected() {
                    anyhow::bail!("AMQP connection lost");
                }
            }
            delivery = consumer.next(), if inflight.len() < usize::from(src.prefetch) && h.until.is_none() => {
                let Some(delivery) = delivery else { anyhow::bail!("the broker cancelled the consumer") };
                let delivery = delivery?;
                let env = envelope(&delivery, &src.queue);
                let Some(outcome) = decide(route, &env, &mut inflight, &mut h, cancel).await? else { break };
                route.metrics.record(&outcome);
                let (out, dead) = match outcome {
                    Outcome::Forward(out) => (out, false),
                    Outcome::DeadLetter(out, _) => (out, true),
                };
                let sink = if dead { &route.dead_letter } else { &route.trusted };
                let acker = delivery.acker;
                match sink.send(&out).await {
                    Ok(confirm) => inflight.push(Box::pin(async move { (acker, confirm.await) })),
                    Err(e) => {
                        // Not published: give it back to the queue and hold before the next one.
                        inflight.push(Box::pin(async move { (acker, Err(e)) }));
                    }
                }
                if let Some(pause) = guard.record(dead) {
                    route.status.paused.store(true, Ordering::Relaxed);
                    wait(route, pause, &mut inflight, &mut h, cancel).await?;
                    route.status.paused.store(false, Ordering::Relaxed);
                }
            }
        }
    }
    // Shutdown: settle what is in flight; anything unconfirmed stays unacked and is redelivered.
    let deadline = Instant::now() + drain_timeout;
    while let Ok(Some(done)) =
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), inflight.next()).await
    {
        let _ = settle(route, done, &mut h).await;
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    route.status.running.store(false, Ordering::Relaxed);
    tracing::info!(route = %name, "route stopped");
    Ok(())
}

/// Acks a confirmed republish; nacks (requeue) a failed one and pauses intake.
async fn settle(route: &Route, (acker, result): Done, h: &mut Holding) -> anyhow::Result<()> {
    match result {
        Ok(()) => {
            tokio::time::timeout(AMQP_TIMEOUT, acker.ack(BasicAckOptions::default()))
                .await
                .map_err(|_| anyhow::anyhow!("ack timed out"))??;
            if h.until.is_none() {
                route.status.set_holding(&route.rules.name, false);
                h.backoff.reset();
            }
        }
        Err(e) => {
            metrics::counter!("tokengate_publish_errors_total", "route" => route.rules.name.clone()).increment(1);
            route.status.set_holding(&route.rules.name, true);
            let now = tokio::time::Instant::now();
            if h.until.is_none_or(|t| t <= now) {
                let d = h.backoff.next_delay();
                h.until = Some(now + d);
                tracing::warn!(route = %route.rules.name, error = %e, pause_ms = d.as_millis() as u64, "publish failed; delivery requeued, intake paused");
            }
            // If the channel is gone the broker requeues it anyway.
            let nack = acker.nack(BasicNackOptions { requeue: true, ..Default::default() });
            let _ = tokio::time::timeout(AMQP_TIMEOUT, nack).await;
        }
    }
    Ok(())
}

/// Decides with holds: retries with backoff while still settling confirmations. `None` on cancel.
async fn decide(
    route: &Route,
    env: &Envelope,
    inflight: &mut FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>,
    h: &mut Holding,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Outcome>> {
    loop {
        match route.gate.handle(&route.rules, env, crate::verify::unix_now()).await {
            Ok(o) => return Ok(Some(o)),
            Err(hold) => {
                route.status.set_holding(&route.rules.name, true);
                metrics::counter!("tokengate_holds_total", "route" => route.rules.name.clone(), "cause" => hold.cause()).increment(1);
                let d = h.backoff.next_delay();
                tracing::warn!(route = %route.rules.name, error = %hold, retry_in_ms = d.as_millis() as u64, "holding: message cannot be decided now");
                wait(route, d, inflight, h, cancel).await?;
                if cancel.is_cancelled() {
                    return Ok(None);
                }
            }
        }
    }
}

async fn wait(
    route: &Route,
    d: Duration,
    inflight: &mut FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>,
    h: &mut Holding,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + d;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(until) => return Ok(()),
            Some(done) = inflight.next(), if !inflight.is_empty() => settle(route, done, h).await?,
        }
    }
}
