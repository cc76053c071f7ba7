//! The audit trail on the real brokers: one record per decision, in the documented schema,
//! never the token; a source message is acknowledged only once its record is confirmed.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rdkafka::Message as _;
use serde_json::{Value, json};

use crate::amqp::{RABBIT, bearer, channel, config, drain, props_with, publish, topology};
use crate::kafka::{
    Running, auth, committed, consume, create_topics, gate_config, kafka, produce, topics, wait_committed,
};

/// Checks a record against the schema; returns it.
fn record(bytes: &[u8]) -> Value {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(!text.contains("eyJ"), "no token in an audit record: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema"], "tokengate.audit/1");
    for field in ["time", "route", "message_id", "source", "verdict"] {
        assert!(!v[field].is_null(), "{field} in {v}");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_decisions_are_each_recorded_on_an_audit_topic_before_offsets_commit() {
    let bs = kafka();
    let t = topics("audit");
    let audit_topic = format!("{}-audit", t.untrusted);
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter, &audit_topic], 2).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let text = gate_config(&bs, &t, &group, "orders", None)
        + &format!("[audit]\nkafka = {{ cluster = \"main\", topic = \"{audit_topic}\" }}\n");
    let gate = Running::start(&text).await;
    let good = auth(Algorithm::HS256, json!({"sub": "alice", "scope": "orders:write", "jti": "j-1"}));
    let forbidden = auth(Algorithm::HS256, json!({"sub": "bob", "scope": "orders:read"}));
    let msgs: Vec<_> = (0..30)
        .map(|i| {
            let headers = match i % 3 {
                0 => good.clone(),
                1 => forbidden.clone(),
                _ => vec![],
            };
            (format!("k{i}"), format!("m{i}"), headers)
        })
        .collect();
    produce(&bs, &t.untrusted, &msgs).await;
    wait_committed(&bs, &group, &t.untrusted, 2, 30).await;
    let records: Vec<Value> =
        consume(&bs, &audit_topic, 30, 30).await.iter().map(|m| record(m.payload().unwrap())).collect();
    gate.stop().await;

    let ids: HashSet<&str> = records.iter().map(|r| r["message_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 30, "one record per source message");
    let mut verdicts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &records {
        let key = (r["verdict"].as_str().unwrap().to_owned(), r["reason"].as_str().unwrap_or("-").to_owned());
        *verdicts.entry(key).or_default() += 1;
        assert_eq!(r["source"]["broker"], "kafka");
        assert_eq!(r["source"]["topic"], t.untrusted.as_str());
        match r["verdict"].as_str().unwrap() {
            "accepted" => {
                assert_eq!((r["subject"].as_str(), r["jti"].as_str()), (Some("alice"), Some("j-1")));
                assert_eq!(r["issuer"], "https://idp.test");
                assert_eq!(r["fingerprint"].as_str().unwrap().len(), 64);
            }
            _ if r["reason"] == "forbidden" => {
                assert_eq!(r["subject"], "bob", "a refused but verified token's subject")
            }
            _ => assert!(r["fingerprint"].is_null(), "no token, no fingerprint"),
        }
    }
    let want: BTreeMap<(String, String), usize> = [
        (("accepted".into(), "-".into()), 10),
        (("rejected".into(), "forbidden".into()), 10),
        (("rejected".into(), "missing_token".into()), 10),
    ]
    .into();
    assert_eq!(verdicts, want);
    assert_eq!(committed(&bs, &group, &t.untrusted, 2), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_messages_wait_unacknowledged_until_their_audit_records_are_confirmed() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "audit").await;
    // An audit exchange nothing is bound to yet: every record comes back unroutable.
    let audit_x = format!("{}-audit-x", n.queue_in);
    let audit_q = format!("{}-audit", n.queue_in);
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(audit_x.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    let text = config(&n, 10, None)
        + &format!("[audit]\namqp = {{ broker = \"rabbit\", exchange = \"{audit_x}\", routing_key = \"audit\" }}\n");
    let gate = Running::start(&text).await;
    for i in 0..6 {
        let token = bearer(Algorithm::HS256, json!({"sub": "carol", "scope": "orders:write"}));
        let headers = if i % 2 == 0 { vec![("authorization", token)] } else { vec![] };
        publish(&ch, &n.queue_in, format!("a{i}").as_bytes(), props_with(headers)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(queued(&n.queue_in).0, 6, "no message is acknowledged while its audit record is refused");
    ch.queue_declare(audit_q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.queue_bind(
        audit_q.as_str().into(),
        audit_x.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut ids = HashSet::new();
    let mut records = Vec::new();
    while ids.len() < 6 {
        let d = drain(&ch, &audit_q, 1, 60).await.remove(0);
        let r = record(&d.data);
        assert_eq!(d.routing_key.as_str(), "audit");
        ids.insert(r["message_id"].as_str().unwrap().to_owned());
        records.push(r);
    }
    for _ in 0..100 {
        if queued(&n.queue_in).0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued(&n.queue_in), (0, 0), "acknowledged once recorded");
    gate.stop().await;
    let accepted =
        records.iter().filter(|r| r["verdict"] == "accepted").map(|r| &r["message_id"]).collect::<HashSet<_>>();
    assert_eq!(accepted.len(), 3);
    assert!(records.iter().all(|r| r["source"]["broker"] == "amqp" && r["source"]["queue"] == n.queue_in.as_str()));
}

/// Messages of `queue` (ready plus unacknowledged) and unacknowledged ones, from `rabbitmqctl`
/// (the queue's own counts, not the management plugin's delayed statistics).
fn queued(queue: &str) -> (u32, u32) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "messages", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl is required (scripts/setup installs RabbitMQ)");
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|f| f.first() == Some(&queue));
    let row = row.unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl: {text}"));
    (row[1].parse().unwrap(), row[2].parse().unwrap())
}
