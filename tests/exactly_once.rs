//! Exactly-once Kafka -> Kafka routes on the real broker: gate processes in one group, one of them
//! killed with SIGKILL again and again mid-stream, another stopped with SIGTERM, the broker itself
//! stopped and started, and a third-party `read_committed` consumer
//! (Python confluent-kafka, tests/fixtures/fates.py) that must see every source record exactly once
//! across the trusted and dead-letter topics.

use std::collections::HashMap;
use std::time::Duration;

use rand::{RngExt as _, SeedableRng as _};

use crate::kafka::{create_topics, kafka, topics, wait_group};
use crate::kafka_failover::{Fate, GateProcess, OwnKafka, Sent, assert_fates, fates, instance_config, stream};
use crate::util::free_port;

/// An instance of an `exactly_once` route (transactions of at most 100 ms by default).
fn eos_config(bs: &str, t: &crate::kafka::Topics, group: &str, route: &str, admin: Option<u16>) -> String {
    // A dead member is noticed after 6 s (the broker's minimum) instead of the default 45 s.
    let props = r#""session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000""#;
    instance_config(bs, t, group, route, props, None, admin) + "delivery = \"exactly_once\"\n"
}

/// The source topic as it is (read back by the same third-party client), to hold the gate's
/// output against record by record.
async fn source_records(bs: &str, t: &crate::kafka::Topics, n: usize) -> Vec<Fate> {
    let src = crate::kafka::Topics { trusted: t.untrusted.clone(), dead_letter: "-".into(), ..t.clone() };
    fates(bs, &src, n, 120).await
}

/// Every source record (by partition and offset, from the gate's `x-tokengate-source-*` headers)
/// is on the trusted or the dead-letter topic exactly once, as its validity says, in per-key order
/// (`context` is printed on failure). A payload the source topic itself holds twice (the test
/// producer's retries through an outage) is two records, each written once.
fn assert_each_once(sent: &[Sent], source: &[Fate], fates: &[Fate], context: &str) {
    let mut written: HashMap<(String, String), Vec<&Fate>> = HashMap::new();
    for f in fates {
        written.entry((f.source_partition.clone(), f.source_offset.clone())).or_default().push(f);
    }
    let mut twice: Vec<String> = written
        .iter()
        .filter(|(_, w)| w.len() > 1)
        .map(|((p, o), w)| format!("partition {p} offset {o} ({}) x{}", w[0].payload, w.len()))
        .collect();
    twice.sort();
    assert!(twice.is_empty(), "{} source records written more than once ({context}): {twice:?}", twice.len());
    let unwritten: Vec<String> = source
        .iter()
        .filter(|s| !written.contains_key(&(s.partition.to_string(), s.offset.to_string())))
        .map(|s| format!("partition {} offset {} ({})", s.partition, s.offset, s.payload))
        .collect();
    assert!(unwritten.is_empty(), "{} source records never written ({context}): {unwritten:?}", unwritten.len());
    assert_eq!(written.len(), source.len(), "every output names a source record ({context})");
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for s in source {
        *copies.entry(s.payload.as_str()).or_default() += 1;
    }
    assert_eq!(copies.len(), sent.len(), "the source topic holds every sent record ({context})");
    let repeated: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    if !repeated.is_empty() {
        eprintln!(
            "the source topic holds {} payloads more than once (the test producer's retries): {repeated:?}",
            repeated.len()
        );
    }
    let repeated_valid = sent.iter().filter(|s| s.valid).map(|s| copies[s.payload().as_str()] - 1).sum::<usize>();
    assert_eq!(assert_fates(sent, fates), repeated_valid, "no trusted record twice ({context})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_with_an_instance_killed_five_times_writes_every_record_exactly_once() {
    let bs = kafka();
    let t = topics("eos");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 6).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let port = free_port();
    let a = GateProcess::spawn(&eos_config(&bs, &t, &group, "gate_a", Some(port)));
    let mut b = GateProcess::spawn(&eos_config(&bs, &t, &group, "gate_b", None));
    let mut c = GateProcess::spawn(&eos_config(&bs, &t, &group, "gate_c", None));
    wait_group(&bs, &group, 3).await;

    const N: u64 = 20_000;
    let producer = tokio::spawn(stream(bs.clone(), t.untrusted.clone(), N, 400, 48));
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = Vec::new();
    for _ in 0..5 {
        let alive = Duration::from_millis(rng.random_range(2_000..5_000));
        tokio::time::sleep(alive).await;
        b.kill9();
        kills.push(alive.as_millis());
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_000))).await;
        b = GateProcess::spawn(&eos_config(&bs, &t, &group, "gate_b", None));
    }
    // Still mid-stream (the stream takes 50 s, the kills at most 35 s): a SIGTERM commits what
    // the instance wrote and leaves the group; its successor joins.
    let log = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap().replace_all(&c.stop(), "").into_owned();
    assert!(log.contains("route stopped") && log.contains("committed=true"), "{log}");
    c = GateProcess::spawn(&eos_config(&bs, &t, &group, "gate_c", None));
    let sent = producer.await.unwrap();

    let fates = fates(&bs, &t, N as usize, 240).await;
    let source = source_records(&bs, &t, N as usize).await;
    assert_each_once(&sent, &source, &fates, &format!("seed {seed}"));

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    let committed = metrics
        .lines()
        .find(|l| l.starts_with(r#"tokengate_transactions_total{route="gate_a",outcome="committed"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(committed > 0.0, "instance a committed transactions: {metrics}");
    assert!(metrics.contains("tokengate_transaction_seconds_bucket{route=\"gate_a\""), "{metrics}");
    assert!(metrics.contains("tokengate_transaction_records_count{route=\"gate_a\"}"), "{metrics}");
    let by: HashMap<&str, usize> = fates.iter().fold(HashMap::new(), |mut m, f| {
        *m.entry(f.route.as_str()).or_default() += 1;
        m
    });
    eprintln!(
        "seed {seed}; b killed after {kills:?} ms alive; records by instance: {by:?}; a committed {committed} transactions"
    );
    for g in [a, b, c] {
        g.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_a_broker_stop_and_start_writes_every_record_exactly_once() {
    let mut broker = tokio::task::spawn_blocking(OwnKafka::start).await.unwrap();
    let bs = broker.bootstrap();
    let t = topics("eos-restart");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 3).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    // Every transaction's offsets in the log, which a failure prints.
    let gate = GateProcess::spawn_with_env(
        &eos_config(&bs, &t, &group, "orders", None),
        &[("RUST_LOG", "info,tokengate::source::transaction=debug")],
    );
    wait_group(&bs, &group, 1).await;

    const N: u64 = 3000;
    let producer = tokio::spawn(stream(bs.clone(), t.untrusted.clone(), N, 150, 12));
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker = broker.stopped().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let broker = broker.started().await;
    let sent = producer.await.unwrap();
    let fates = fates(&bs, &t, N as usize, 180).await;
    let source = source_records(&bs, &t, N as usize).await;
    assert_each_once(&sent, &source, &fates, &format!("the gate's log:\n{}", gate.logs()));
    let log = gate.stop();
    eprintln!("aborted transactions logged: {}", log.matches("transaction failed").count());
    drop(broker);
}
