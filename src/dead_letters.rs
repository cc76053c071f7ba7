//! `tokengate dead-letters replay`: re-drives dead-lettered messages back to the topic or queue
//! they were read from, once their cause is fixed (a key published late, an outage), with the
//! original headers restored and the gate's dead-letter headers removed. Nothing is removed
//! from the dead-letter destination unless asked (`--delete`, AMQP).
//!
//! Only messages whose token was kept can pass on a second try: a route that dead-letters with
//! the token redacted (the default) keeps its dead letters out of reach; they are counted as
//! `redacted` and left alone. Set `token.keep_in_dead_letters = true` on routes whose dead
//! letters should be replayable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{RouteRules, SinkSettings};
use crate::envelope::{Envelope, HeaderData};
use crate::progress::Progress;

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Reason codes (empty: any).
    pub reasons: Vec<String>,
    /// Rejected at or after this unix time.
    pub since: Option<i64>,
    /// Rejected before this unix time.
    pub until: Option<i64>,
    /// At most this many.
    pub max: Option<u64>,
}

/// What a replay did (or, in a dry run, would do).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Dead letters read.
    pub scanned: u64,
    /// Dead letters of the route that the filter selects.
    pub matched: u64,
    /// Republished to their source (in a dry run: would be).
    pub replayed: u64,
    /// Selected but not replayable: the token was redacted.
    pub redacted: u64,
    /// Selected but not replayable: no source topic or queue recorded.
    pub no_source: u64,
    /// Removed from the dead-letter queue (`--delete`).
    pub deleted: u64,
    /// Replayed per destination.
    pub to: BTreeMap<String, u64>,
}

/// A dead letter made a source message again: the headers it arrived with, its destination.
struct Restored {
    headers: Vec<(String, HeaderData)>,
    source: String,
}

/// The verdict on one dead letter: not this route's or not selected (`None`), or selected and
/// restored (or why it cannot be).
fn select(rules: &RouteRules, filter: &Filter, env: &Envelope, source_header: &str) -> Option<Result<Restored, bool>> {
    let names = &rules.headers;
    let get = |name: &str| header(env, name);
    if get(&names.route) != Some(rules.name.as_str()) {
        return None;
    }
    let reason = get(&names.reason).unwrap_or_default();
    if !filter.reasons.is_empty() && !filter.reasons.iter().any(|r| r == reason) {
        return None;
    }
    let at = get(&names.rejected_at)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64));
    if filter.since.is_some_and(|s| at.is_none_or(|a| a < s)) || filter.until.is_some_and(|u| at.is_none_or(|a| a >= u))
    {
        return None;
    }
    let redacted = get(&rules.token.header).is_some_and(|t| t.starts_with("redacted"));
    if redacted {
        return Some(Err(true));
    }
    let Some(source) = get(source_header).filter(|s| !s.is_empty()) else { return Some(Err(false)) };
    let headers = env.headers.iter().filter(|(n, _)| !names.is_own(n)).cloned().collect();
    Some(Ok(Restored { headers, source: source.to_owned() }))
}

/// Replays the dead letters of route `rules` from its dead-letter destination `dl`; `queue` is
/// the queue holding them for an AMQP destination. `dry_run` reads and reports only.
pub async fn replay(
    rules: &RouteRules,
    dl: &SinkSettings,
    queue: Option<&str>,
    filter: &Filter,
    dry_run: bool,
    delete: bool,
) -> anyhow::Result<Report> {
    match dl {
        SinkSettings::Kafka { config, topic } => {
            anyhow::ensure!(
                !delete,
                "--delete is for AMQP dead-letter queues: Kafka records are not removed one by one"
            );
            anyhow::ensure!(queue.is_none(), "--queue is for AMQP dead-letter destinations");
            replay_kafka(rules, config.clone(), topic, filter, dry_run).await
        }
        SinkSettings::Amqp { url, .. } => {
            let queue =
                queue.context("an AMQP dead-letter exchange: give --queue, the queue its dead letters are in")?;
            replay_amqp(rules, url, queue, filter, dry_run, delete).await
        }
    }
}

/// Reads the dead-letter topic from its start to its end as of now and republishes what the
/// filter selects to each record's source topic (key, payload, timestamp and headers restored).
async fn replay_kafka(
    rules: &RouteRules,
    config: ClientConfig,
    topic: &str,
    filter: &Filter,
    dry_run: bool,
) -> anyhow::Result<Report> {
    let mut consumer_config = config.clone();
    consumer_config
        .set("group.id", format!("tokengate-replay-{}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = consumer_config.create().context("dead-letter consumer")?;
    let producer: FutureProducer = {
        let mut c = config;
        c.set("enable.idempotence", "true");
        c.create().context("replay producer")?
    };
    let topic_owned = topic.to_owned();
    let (consumer, ends) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let md = consumer.fetch_metadata(Some(&topic_owned), Duration::from_secs(10))?;
        let parts: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        anyhow::ensure!(!parts.is_empty(), "dead-letter topic {topic_owned} has no partitions (does it exist?)");
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in parts {
            let (low, high) = consumer.fetch_watermarks(&topic_owned, p, Duration::from_secs(10))?;
            if high > low {
                tpl.add_partition_offset(&topic_owned, p, rdkafka::Offset::Offset(low))?;
                ends.insert(p, high);
            }
        }
        consumer.assign(&tpl)?;
        Ok((consumer, ends))
    })
    .await??;
    let mut progress = Progress::new("replaying dead letters", None);
    let mut report = Report::default();
    let mut pending = Vec::new();
    let source_header = format!("{}source-topic", rules.headers.prefix);
    let mut remaining = ends.clone();
    let consumer = Arc::new(consumer);
    while !remaining.is_empty() && filter.max.is_none_or(|m| report.matched < m) {
        let c = Arc::clone(&consumer);
        let polled = tokio::task::spawn_blocking(move || {
            c.poll(Duration::from_millis(500)).map(|r| {
                r.map(|m| (crate::source::kafka::envelope(&m, &Arc::from(m.topic())), m.partition(), m.offset()))
            })
        })
        .await?;
        let Some(polled) = polled else { continue };
        let (env, partition, offset) = polled.context("reading the dead-letter topic")?;
        if remaining.get(&partition).is_some_and(|end| offset + 1 >= *end) {
            remaining.remove(&partition);
        }
        report.scanned += 1;
        progress.add(1);
        match select(rules, filter, &env, &source_header) {
            None => continue,
            Some(Err(redacted)) => {
                report.matched += 1;
                if redacted { report.redacted += 1 } else { report.no_source += 1 }
            }
            Some(Ok(r)) => {
                report.matched += 1;
                report.replayed += 1;
                *report.to.entry(r.source.clone()).or_default() += 1;
                if dry_run {
                    println!("would replay {} ({}) -> {}", message_of(&env, rules), reason_of(&env, rules), r.source);
                    continue;
                }
                let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
                for (name, value) in &r.headers {
                    let bytes = match value {
                        HeaderData::Bytes(b) => Some(b.as_slice()),
                        HeaderData::Typed { text, .. } => Some(text.as_bytes()),
                        HeaderData::Null => None,
                    };
                    headers = headers.insert(Header { key: name, value: bytes });
                }
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.source).headers(headers);
                if let Some(k) = &env.key {
                    record = record.key(k.as_slice());
                }
                if let Some(p) = &env.payload {
                    record = record.payload(p.as_slice());
                }
                if let Some(ts) = env.timestamp_ms {
                    record = record.timestamp(ts);
                }
                let delivery = producer.send_result(record).map_err(|(e, _)| e).context("replay producer queue")?;
                pending.push(delivery);
            }
        }
    }
    for d in pending {
        d.await.context("replay producer dropped")?.map_err(|(e, _)| e).context("replaying a dead letter")?;
    }
    progress.finish();
    Ok(report)
}

/// A header's text, if the message has it.
fn header<'e>(env: &'e Envelope, name: &str) -> Option<&'e str> {
    env.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(_, v)| match v {
        HeaderData::Bytes(b) => std::str::from_utf8(b).ok(),
        HeaderData::Typed { text, .. } => Some(text.as_str()),
        HeaderData::Null => None,
    })
}

fn message_of<'e>(env: &'e Envelope, rules: &RouteRules) -> &'e str {
    header(env, &rules.headers.message_id).unwrap_or("-")
}

fn reason_of<'e>(env: &'e Envelope, rules: &RouteRules) -> &'e str {
    header(env, &rules.headers.reason).unwrap_or("-")
}

/// Takes the dead letters in `queue` (as many as it holds now) and republishes what the filter
/// selects to each message's source queue, with publisher confirms; a replayed message is
/// removed from `queue` only with `delete`. Everything not removed goes back to `queue`.
async fn replay_amqp(
    rules: &RouteRules,
    url: &str,
    queue: &str,
    filter: &Filter,
    dry_run: bool,
    delete: bool,
) -> anyhow::Result<Report> {
    let conn = crate::amqp::connect(url, "tokengate dead-letter replay", |c| async { Ok(c) }).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let count = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("dead-letter queue {queue:?}"))?
        .message_count();
    let mut progress = Progress::new("replaying dead letters", Some(u64::from(count)));
    let mut report = Report::default();
    let source_header = format!("{}source-queue", rules.headers.prefix);
    let mut last_tag = None;
    for _ in 0..count {
        if filter.max.is_some_and(|m| report.matched >= m) {
            break;
        }
        let Some(msg) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await? else { break };
        let tag = msg.delivery.delivery_tag;
        last_tag = Some(tag);
        report.scanned += 1;
        progress.add(1);
        let (env, _) = crate::source::amqp::into_envelope(msg.delivery, queue);
        let Some(verdict) = select(rules, filter, &env, &source_header) else { continue };
        report.matched += 1;
        let r = match verdict {
            Ok(r) => r,
            Err(true) => {
                report.redacted += 1;
                continue;
            }
            Err(false) => {
                report.no_source += 1;
                continue;
            }
        };
        report.replayed += 1;
        *report.to.entry(r.source.clone()).or_default() += 1;
        if dry_run {
            println!("would replay {} ({}) -> queue {}", message_of(&env, rules), reason_of(&env, rules), r.source);
            continue;
        }
        // The original typed header table, minus the gate's headers.
        let mut table = FieldTable::default();
        if let Some(t) = &env.amqp_headers {
            for (k, v) in t.inner() {
                if !rules.headers.is_own(k.as_str()) {
                    table.insert(k.clone(), v.clone());
                }
            }
        }
        let props = env.amqp.clone().unwrap_or_default().with_headers(table);
        let confirm = ch
            .basic_publish(
                "".into(),
                r.source.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                env.payload.as_deref().unwrap_or_default(),
                props,
            )
            .await?
            .await?;
        anyhow::ensure!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "queue {:?} did not take the replayed message (does it exist?)",
            r.source
        );
        if delete {
            ch.basic_ack(tag, BasicAckOptions::default()).await?;
            report.deleted += 1;
        }
    }
    if let Some(tag) = last_tag {
        // Everything taken and not deleted goes back, in order.
        ch.basic_nack(tag, BasicNackOptions { multiple: true, requeue: true }).await?;
    }
    progress.finish();
    ch.close(200, "done".into()).await.ok();
    conn.close(200, "done".into()).await.ok();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{HeaderNames, Origin};

    fn rules(name: &str) -> RouteRules {
        RouteRules {
            name: name.into(),
            token: crate::verify::TokenSpec::default(),
            strip_token: true,
            dead_letter_keeps_token: true,
            policy: crate::verify::Policy::default(),
            identity_headers: vec![],
            headers: HeaderNames::new("x-tokengate-"),
            attest: None,
            proof: None,
            single_use: false,
        }
    }

    fn dead_letter(route: &str, reason: &str, at: &str, token: &str) -> Envelope {
        let h = |n: &str, v: &str| (n.to_owned(), HeaderData::Bytes(v.as_bytes().to_vec()));
        Envelope {
            key: Some(b"k".to_vec()),
            payload: Some(b"p".to_vec()),
            headers: vec![
                h("trace-id", "t-1"),
                h("authorization", token),
                h("x-tokengate-route", route),
                h("x-tokengate-reason", reason),
                h("x-tokengate-rejected-at", at),
                h("x-tokengate-source-topic", "orders.untrusted"),
            ],
            timestamp_ms: None,
            origin: Origin::Kafka { topic: "orders.dead-letter".into(), partition: 0, offset: 3 },
            amqp: None,
            amqp_headers: None,
            defect: None,
        }
    }

    #[test]
    fn a_dead_letter_is_selected_by_route_reason_and_time_and_restored_without_gate_headers() {
        let (r, src) = (rules("orders"), "x-tokengate-source-topic");
        let at = "2026-11-28T08:00:00.000Z";
        let dl = dead_letter("orders", "unknown_kid", at, "Bearer a.b.c");
        let all = Filter::default();
        let Some(Ok(restored)) = select(&r, &all, &dl, src) else { panic!("selected") };
        assert_eq!(restored.source, "orders.untrusted");
        let names: Vec<&str> = restored.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["trace-id", "authorization"], "original headers only, in order");
        assert!(select(&rules("payments"), &all, &dl, src).is_none(), "another route's");
        let kid_only = Filter { reasons: vec!["expired".into()], ..Filter::default() };
        assert!(select(&r, &kid_only, &dl, src).is_none(), "another reason");
        let t = humantime::parse_rfc3339(at).unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(select(&r, &Filter { since: Some(t + 1), ..Filter::default() }, &dl, src).is_none());
        assert!(select(&r, &Filter { until: Some(t), ..Filter::default() }, &dl, src).is_none());
        assert!(select(&r, &Filter { since: Some(t), until: Some(t + 1), ..Filter::default() }, &dl, src).is_some());
        let redacted = dead_letter("orders", "unknown_kid", at, "redacted; fingerprint=ab");
        assert!(matches!(select(&r, &all, &redacted, src), Some(Err(true))), "a redacted token cannot pass again");
    }
}
