//! The AMQP source: intake with manual acks and a bounded prefetch, the conversion of a delivery
//! to an envelope, and its acknowledgement rule (ack only after the republish is confirmed; a
//! failed publish nacks with requeue). The per-message steps are [`crate::pipeline`]'s. A lost
//! connection or channel reconnects with backoff, and unacked deliveries come back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::amqp;
use crate::config::AmqpSourceSettings;
use crate::envelope::{Envelope, HeaderData, Origin};
use crate::pipeline::{Acks, CHUNK, Pipeline, Settled};
use crate::pipeline::{Backoff, Route};

/// Sessions in a row that ended on a delivery the AMQP client library could not decode before
/// the head of the queue is taken off and dead-lettered ([`super::poison`]). The first runs at the
/// route's prefetch, the next ones one delivery at a time, so that the poison is the head.
const POISON_ATTEMPTS: u32 = 3;

/// Runs one AMQP route until `cancel`, reconnecting after losses.
pub async fn run(
    route: Arc<Route>,
    src: Arc<AmqpSourceSettings>,
    cancel: CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::default();
    let mut undecodable = 0u32;
    tracing::info!(route = %route.rules.name, queue = %src.queue, trusted = %route.trusted.describe(), dead_letter = %route.dead_letter.describe(), "route started");
    loop {
        let started = Instant::now();
        let prefetch = if undecodable > 0 { 1 } else { src.prefetch };
        let Err(e) = session(&route, &src, prefetch, &cancel, drain_timeout).await else { return Ok(()) };
        route.status.running.store(false, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
            undecodable = 0;
        }
        if is_undecodable(&e) {
            undecodable += 1;
            tracing::warn!(route = %route.rules.name, attempt = undecodable, of = POISON_ATTEMPTS, error = %e, "a delivery the AMQP client cannot decode ended the session");
            if undecodable >= POISON_ATTEMPTS {
                match remove_poison(&route, &src).await {
                    Ok(removed) => {
                        undecodable = 0;
                        if !removed {
                            tracing::warn!(route = %route.rules.name, "the queue's head decodes; the poison message is elsewhere (another consumer?)");
                        }
                    }
                    Err(why) => {
                        tracing::error!(route = %route.rules.name, error = %why, "cannot take the poison message off the queue; it holds the route until an operator removes it")
                    }
                }
            }
        }
        let d = backoff.next_delay();
        tracing::warn!(route = %route.rules.name, error = %e, retry_in_ms = d.as_millis() as u64, "AMQP session lost; reconnecting (unacked deliveries will be redelivered)");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// Whether a session ended because the client library could not parse what the broker sent.
fn is_undecodable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<lapin::Error>().is_some_and(|l| matches!(l.kind(), lapin::ErrorKind::ParsingError(_)))
            || c.to_string().contains("failed to parse")
    })
}

/// Takes the queue's head off with a raw `basic.get`; if the client library cannot decode it,
/// dead-letters it (`malformed`) and acknowledges it once the dead letter is confirmed.
/// Returns whether a poison message was removed.
async fn remove_poison(route: &Route, src: &AmqpSourceSettings) -> Result<bool, String> {
    let Some(raw) = super::poison::take_head(&src.url, &src.queue).await? else { return Ok(false) };
    let Some(why) = raw.undecodable() else {
        raw.requeue().await?;
        return Ok(false);
    };
    let names = &route.rules.headers;
    let env = Envelope {
        key: None,
        payload: Some(raw.body.clone()),
        headers: Vec::new(),
        timestamp_ms: None,
        origin: Origin::Amqp {
            queue: src.queue.clone(),
            exchange: raw.exchange.clone(),
            routing_key: raw.routing_key.clone(),
            delivery_tag: raw.delivery_tag,
            redelivered: true,
        },
        amqp: None,
        amqp_headers: None,
        defect: None,
    };
    let detail = format!(
        "the AMQP client cannot decode this message's properties ({}); taken off the queue after {POISON_ATTEMPTS} failed deliveries",
        crate::verify::jwt::shorten(&why)
    );
    let r = crate::verify::Rejection::new(crate::verify::Reason::Malformed, detail);
    let mut out = crate::gate::dead_letter(&route.rules, &env, &r, None, std::time::SystemTime::now());
    // The undecodable property bytes, for whoever investigates (bounded: one AMQP frame at most).
    let raw_props = &raw.properties[..raw.properties.len().min(64 * 1024)];
    out.headers.push((names.raw_properties.clone(), HeaderData::Bytes(hex::encode(raw_props).into_bytes())));
    route.dead_letter.make_fit(&mut out, &names.prefix);
    let confirm = route.dead_letter.send(out).await.map_err(|e| e.to_string())?;
    confirm.await.map_err(|e| e.to_string())?;
    let bytes = raw.body.len();
    raw.ack().await?;
    route.metrics.poison_removed();
    tracing::error!(route = %route.rules.name, bytes, "poison message dead-lettered: the AMQP client library cannot decode its properties");
    Ok(true)
}

/// Turns an AMQP delivery into an envelope and its delivery tag; non-string header values keep
/// their type name. The body and properties move into the envelope: the header table is copied
/// once (kept, to republish typed values unchanged), nothing else is.
pub fn into_envelope(d: Delivery, queue: &str) -> (Envelope, DeliveryTag) {
    let Delivery { delivery_tag, exchange, routing_key, redelivered, properties, data, .. } = d;
    let table = properties.headers().clone();
    let headers = table
        .as_ref()
        .map(|t| t.inner().iter().map(|(k, v)| (k.as_str().to_owned(), header_data(v))).collect())
        .unwrap_or_default();
    let env = Envelope {
        key: None,
        timestamp_ms: properties.timestamp().map(|s| (s as i64).saturating_mul(1000)),
        payload: Some(data),
        headers,
        origin: Origin::Amqp {
            queue: queue.to_owned(),
            exchange: exchange.as_str().to_owned(),
            routing_key: routing_key.as_str().to_owned(),
            delivery_tag,
            redelivered,
        },
        amqp: Some(properties.with_headers(FieldTable::default())),
        amqp_headers: table,
        defect: None,
    };
    (env, delivery_tag)
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

/// A delivery's tag on the session's channel: what acks and nacks it.
type DeliveryTag = u64;

/// AMQP's publish-time rule is the default: every delivery is published; acks follow confirms.
struct AmqpAcks;

impl Acks for AmqpAcks {
    type Ack = DeliveryTag;
}

async fn session(
    route: &Arc<Route>,
    src: &AmqpSourceSettings,
    prefetch: u16,
    cancel: &CancellationToken,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let tag = format!("tokengate-{}", route.rules.name);
    let setup = |conn: Connection| async {
        let channel = conn.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let options = QueueDeclareOptions { passive: !src.declare, durable: true, ..Default::default() };
        channel.queue_declare(ShortString::from(src.queue.as_str()), options, src.arguments.clone()).await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(src.queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        anyhow::Ok((conn, channel, consumer))
    };
    let (conn, channel, mut consumer) = amqp::connect(&src.url, &tag, setup).await?;
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    let (session_start, mut prefetch) = (Instant::now(), prefetch);
    route.status.running.store(true, Ordering::Relaxed);
    let mut pipe: Pipeline<DeliveryTag> = Pipeline::new(Arc::clone(route));
    let mut failure = None;
    loop {
        let wake = pipe.wake_at();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = pipe.confirmations.next(), if !pipe.confirmations.is_empty() => {
                // Every confirmation already in, settled together: one ack for the lot.
                let mut settled = vec![done];
                while let Some(Some(d)) = pipe.confirmations.next().now_or_never() {
                    settled.push(d);
                }
                settle(&mut pipe, &channel, settled)?
            }
            Some(chunk) = pipe.decisions.next(), if !pipe.decisions.is_empty() => pipe.decided(chunk),
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
            // The consumer stream does not always end when the connection dies: check it.
            _ = liveness.tick() => {
                route.metrics.set_in_flight(pipe.in_flight());
                if !conn.status().connected() || !channel.status().connected() {
                    anyhow::bail!("AMQP connection lost");
                }
                // One delivery at a time only while looking for a poison message: a session that
                // has run a while without meeting it goes back to the route's prefetch.
                if prefetch < src.prefetch && session_start.elapsed() > Duration::from_secs(5) {
                    channel.basic_qos(src.prefetch, BasicQosOptions::default()).await?;
                    prefetch = src.prefetch;
                }
            }
            delivery = consumer.next(), if pipe.has_room() => {
                let Some(delivery) = delivery else { anyhow::bail!("the broker cancelled the consumer") };
                let delivery = delivery?;
                let mut batch = vec![into_envelope(delivery, &src.queue)];
                // Take what is already buffered, without waiting, to decide it in one task.
                failure = take_buffered(&mut consumer, &mut batch, &src.queue);
                // Nagle's rule for deliveries: while the route is busy (at least a chunk of
                // messages in flight: the broker has a backlog for us), a short batch waits up to
                // `linger` for more, so that a run of messages costs one wake-up of each thread
                // (the client's I/O threads, the runtime's workers) instead of one per message.
                // A route keeping up with its stream has less in flight and decides at once: no
                // added latency below the route's capacity.
                let busy = pipe.in_flight() >= CHUNK;
                if busy && batch.len() < CHUNK && failure.is_none() && !src.linger.is_zero() {
                    tokio::time::sleep(src.linger).await;
                    failure = take_buffered(&mut consumer, &mut batch, &src.queue);
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
        let _ = settle(&mut pipe, &channel, vec![done]);
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    route.status.running.store(false, Ordering::Relaxed);
    tracing::info!(route = %route.rules.name, "route stopped");
    Ok(())
}

/// Adds the deliveries already buffered (up to a chunk) to `batch`, without waiting; returns the
/// error that ended the stream, if one did.
fn take_buffered(
    consumer: &mut lapin::Consumer,
    batch: &mut Vec<(Envelope, DeliveryTag)>,
    queue: &str,
) -> Option<lapin::Error> {
    while batch.len() < CHUNK {
        match consumer.next().now_or_never() {
            Some(Some(Ok(d))) => batch.push(into_envelope(d, queue)),
            Some(Some(Err(e))) => return Some(e),
            _ => return None,
        }
    }
    None
}

/// AMQP's acknowledgement rule: ack a confirmed republish; nack (requeue) a failed one and
/// pause intake. `settled` is in read order (confirmations are handed back in publish order,
/// which is read order), so every delivery before a confirmed one is settled already: one ack
/// with `multiple` covers a run of confirmed ones.
///
/// Acks and nacks are queued on the channel, in order, and not waited for: their frames go out
/// with the connection's next write, and the route goes on deciding meanwhile (waiting would cost
/// a round of thread hand-offs per batch: the client's I/O thread writes, then wakes the route).
/// An ack that never reaches the broker is not a loss: the connection is gone, the session ends
/// (the liveness check sees it within a second), and the broker redelivers the message.
fn settle(
    pipe: &mut Pipeline<DeliveryTag>,
    channel: &Channel,
    settled: Vec<Settled<DeliveryTag>>,
) -> anyhow::Result<()> {
    let mut confirmed: Option<DeliveryTag> = None;
    for (tag, result) in settled {
        match result {
            Ok(()) => confirmed = Some(tag),
            Err(e) => {
                if let Some(last) = confirmed.take() {
                    ack_through(channel, last)?;
                }
                pipe.pause_after_failure(&e);
                // If the channel is gone the broker requeues it anyway.
                let nack = BasicNackOptions { requeue: true, multiple: false };
                let _ = channel.basic_nack(tag, nack).now_or_never();
            }
        }
    }
    match confirmed {
        Some(last) => ack_through(channel, last),
        None => Ok(()),
    }
}

/// Queues the ack of `last` and of every delivery before it on `channel` not settled yet.
fn ack_through(channel: &Channel, last: DeliveryTag) -> anyhow::Result<()> {
    // The first poll queues the frame (or fails at once on a closed channel); the rest of the
    // future only waits for the write.
    match channel.basic_ack(last, BasicAckOptions { multiple: true }).now_or_never() {
        Some(Err(e)) => Err(anyhow::anyhow!("ack: {e}")),
        _ => Ok(()),
    }
}
