//! Single-use routes on the real broker and Redis: each `jti` passes once, a replay (the same
//! token on another message) is dead-lettered as `replayed`, a redelivery after SIGKILL of a
//! message whose use was recorded is not a replay, and a dead Redis holds messages (fail closed).

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::kafka::{auth, create_topics, kafka, topics};
use crate::kafka_failover::{GateProcess, fates, instance_config};
use crate::util::*;

/// Sends messages `from..to` on `topic`: payload `key-{k}:{i}:{first|replay}`, each with a token
/// of its own `jti`, except every tenth, which carries again the token of the message 12 before
/// it (same key, so same partition, read after it). Returns `(payload, is_replay)`.
async fn send(bs: &str, topic: &str, from: u64, to: u64, per_sec: u64) -> Vec<(String, bool)> {
    let p: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", bs).set("enable.idempotence", "true").create().unwrap();
    let mut tokens: HashMap<u64, Vec<(String, String)>> = HashMap::new();
    let mut sent = Vec::new();
    let mut pending = Vec::new();
    for i in from..to {
        let replay = i % 10 == 9 && i >= from + 12;
        let auth = match replay {
            true => tokens[&(i - 12)].clone(),
            false => auth(Algorithm::HS256, json!({"jti": format!("jti-{i}-{}", uuid::Uuid::new_v4().simple())})),
        };
        tokens.insert(i, auth.clone());
        let key = format!("key-{}", i % 12);
        let payload = format!("{key}:{i}:{}", if replay { "replay" } else { "first" });
        let mut headers = OwnedHeaders::new();
        for (hk, hv) in &auth {
            headers = headers.insert(Header { key: hk, value: Some(hv.as_bytes()) });
        }
        let rec = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
        pending.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
        sent.push((payload, replay));
        if i % (per_sec / 100).max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).expect("the test producer delivers every message");
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_passes_each_jti_once_through_sigkills_and_holds_while_redis_is_down() {
    let bs = kafka();
    let t = topics("single-use");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 3).await;
    let mut redis = OwnRedis::start(free_port());
    let prefix = unique_prefix("single-use");
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    // A dead member is noticed after 6 s (the broker's minimum) instead of the default 45 s.
    let props = r#""session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000""#;
    let config = instance_config(&bs, &t, &group, "orders", props, None, None).replacen(
        "[admin]\n",
        &format!("[redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\n[admin]\n", redis.url()),
        1,
    ) + "single_use = true\n";

    let mut gate = GateProcess::spawn(&config);
    const N: u64 = 3000;
    let producer = tokio::spawn({
        let (bs, topic) = (bs.clone(), t.untrusted.clone());
        async move { send(&bs, &topic, 0, N, 300).await }
    });
    // Two crashes mid-stream: whatever was recorded and not yet committed is read again.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(3500)).await;
        gate.kill9();
        gate = GateProcess::spawn(&config);
    }
    let mut sent = producer.await.unwrap();
    let fates1 = fates(&bs, &t, N as usize, 120).await;

    // Redis down: fresh tokens cannot be recorded, so nothing passes; back up, they flow.
    redis.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    sent.extend(send(&bs, &t.untrusted, N, N + 20, 100).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = fates(&bs, &t, N as usize, 10).await;
    assert_eq!(during.len(), fates1.len(), "nothing is decided while the record of uses is unreachable");
    let _redis = OwnRedis::start(redis.port);
    let all = fates(&bs, &t, N as usize + 20, 60).await;
    let logs = gate.stop();
    let logs = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap().replace_all(&logs, "").into_owned();
    assert!(logs.contains("holding: message cannot be decided now"), "the hold is logged; log:\n{logs}");

    let mut by_payload: HashMap<&str, (usize, Vec<&str>)> = HashMap::new();
    for f in &all {
        let e = by_payload.entry(f.payload.as_str()).or_default();
        match f.dest.as_str() {
            "trusted" => e.0 += 1,
            _ => e.1.push(f.reason.as_str()),
        }
    }
    let (mut redelivered, mut problems) = (0, Vec::new());
    for (payload, replay) in &sent {
        let (trusted, dead) = by_payload.get(payload.as_str()).cloned().unwrap_or_default();
        match (replay, trusted, dead.as_slice()) {
            (false, 1.., []) => redelivered += trusted - 1,
            (true, 0, [_, ..]) if dead.iter().all(|r| *r == "replayed") => {}
            _ => problems.push(format!("{payload}: trusted {trusted}, dead-lettered {dead:?}")),
        }
    }
    assert!(
        problems.is_empty(),
        "{} messages with the wrong fate, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    assert!(redelivered > 0, "the SIGKILLs made the gate read recorded messages again (else this proves nothing)");
    eprintln!("{} messages, {redelivered} redelivered after SIGKILLs and passed again", sent.len());
}
