//! Messages a hostile producer crafts (not tokens: the envelope around them) through the real
//! brokers. After each hostile message a valid one still reaches the trusted destination, and the
//! hostile one's fate is exactly the README's ("What a destination cannot carry").

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use lapin::types::{AMQPValue, LongString};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::amqp::{RABBIT, amqp_url, bearer, channel, drain, hdr, props_with, publish, topology};
use crate::kafka::{Running, auth, consume, create_topics, gate_config, header, kafka, topics};
use crate::util::*;

type RawHeaders = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Produces records with header names and values of any bytes, in order, to partition 0.
async fn produce_raw(bs: &str, topic: &str, records: Vec<(Vec<u8>, Vec<u8>, RawHeaders)>) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    for (key, payload, headers) in records {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in &headers {
            // SAFETY: rdkafka hands the name to librdkafka as pointer and length only; nothing
            // reads it as text, so a name that is not UTF-8 reaches the broker as sent.
            let name = unsafe { std::str::from_utf8_unchecked(name) };
            h = h.insert(Header { key: name, value: value.as_deref() });
        }
        let rec = FutureRecord::to(topic).partition(0).key(&key).payload(&payload).headers(h);
        p.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("the broker takes the record");
    }
}

fn token_header() -> (Vec<u8>, Option<Vec<u8>>) {
    let (name, value) = auth(Algorithm::HS256, json!({})).remove(0);
    (name.into_bytes(), Some(value.into_bytes()))
}

/// `(label, fate)` of every record read from the trusted and dead-letter topics, by payload label
/// (the payload's text up to the first `|`).
fn label(m: &OwnedMessage) -> String {
    let p = m.payload().unwrap_or_default();
    String::from_utf8_lossy(p.split(|b| *b == b'|').next().unwrap_or_default()).into_owned()
}

fn fates(trusted: &[OwnedMessage], dead: &[OwnedMessage]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for m in trusted {
        out.insert(label(m), "trusted".to_owned());
    }
    for m in dead {
        let reason = header(m, "x-tokengate-reason").unwrap_or_default();
        out.insert(label(m), format!("dead_letter:{reason}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_kafka_records_each_meet_their_documented_fate_and_the_route_flows() {
    let bs = kafka();
    let t = topics("hostile");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let text = gate_config(&bs, &t, &group, "orders", None);
    let tok = token_header();
    let with_token = |mut h: RawHeaders| {
        h.push(tok.clone());
        h
    };
    let binary: Vec<u8> = b"binary|".iter().copied().chain(0..=255u8).collect();
    let many: RawHeaders =
        (0..2000u32).map(|i| (format!("h{i}").into_bytes(), Some(i.to_be_bytes().to_vec()))).collect();
    // label, key, payload, headers, expected reason
    type Case = (&'static str, Vec<u8>, Vec<u8>, RawHeaders, &'static str);
    let cases: Vec<Case> = vec![
        (
            "non-utf8-name",
            b"k".to_vec(),
            b"non-utf8-name".to_vec(),
            with_token(vec![(vec![0xff, 0xfe, b'x'], Some(b"v".to_vec()))]),
            "dead_letter:malformed",
        ),
        (
            "empty-name",
            b"k".to_vec(),
            b"empty-name".to_vec(),
            with_token(vec![(vec![], Some(b"v".to_vec()))]),
            "trusted",
        ),
        ("null-value", b"k".to_vec(), b"null-value".to_vec(), with_token(vec![(b"x-null".to_vec(), None)]), "trusted"),
        (
            "long-name",
            b"k".to_vec(),
            b"long-name".to_vec(),
            with_token(vec![(vec![b'n'; 300], Some(vec![0u8; 3]))]),
            "trusted",
        ),
        (
            "binary-values",
            b"k".to_vec(),
            b"binary-values".to_vec(),
            with_token(vec![(b"bin".to_vec(), Some((0..=255u8).collect()))]),
            "trusted",
        ),
        ("many-headers", b"k".to_vec(), b"many-headers".to_vec(), with_token(many), "trusted"),
        ("huge-key", vec![b'k'; 500_000], b"huge-key".to_vec(), with_token(vec![]), "trusted"),
        ("binary", b"k".to_vec(), binary.clone(), with_token(vec![]), "trusted"),
        (
            "two-tokens",
            b"k".to_vec(),
            b"two-tokens".to_vec(),
            with_token(vec![tok.clone()]),
            "dead_letter:duplicate_token",
        ),
        (
            "token-not-utf8",
            b"k".to_vec(),
            b"token-not-utf8".to_vec(),
            vec![(b"authorization".to_vec(), Some(vec![0xc3, 0x28]))],
            "dead_letter:non_utf8_token",
        ),
        (
            "token-null",
            b"k".to_vec(),
            b"token-null".to_vec(),
            vec![(b"authorization".to_vec(), None)],
            "dead_letter:empty_token",
        ),
        (
            "forged-identity",
            b"k".to_vec(),
            b"forged-identity".to_vec(),
            with_token(vec![(b"X-Tokengate-Sub".to_vec(), Some(b"root".to_vec()))]),
            "trusted",
        ),
        ("valid-last", b"k".to_vec(), b"valid-last".to_vec(), with_token(vec![]), "trusted"),
    ];
    let want: HashMap<String, String> = cases.iter().map(|c| (c.0.to_owned(), c.4.to_owned())).collect();
    let n_ok = want.values().filter(|f| *f == "trusted").count();
    produce_raw(&bs, &t.untrusted, cases.into_iter().map(|(_, k, p, h, _)| (k, p, h)).collect()).await;
    let gate = Running::start(&text).await;
    let trusted = consume(&bs, &t.trusted, n_ok, 60).await;
    let dead = consume(&bs, &t.dead_letter, want.len() - n_ok, 60).await;
    gate.stop().await;
    assert_eq!(fates(&trusted, &dead), want);
    let by_label = |l: &str| trusted.iter().find(|m| label(m) == l).unwrap();
    assert_eq!(by_label("binary").payload(), Some(&binary[..]), "binary payload carried byte for byte");
    assert_eq!(by_label("huge-key").key().map(<[u8]>::len), Some(500_000));
    assert_eq!(
        header(by_label("forged-identity"), "x-tokengate-sub").as_deref(),
        Some("alice"),
        "forged identity replaced"
    );
    let dead_detail = |l: &str| {
        let m = dead.iter().find(|m| label(m) == l).unwrap();
        header(m, "x-tokengate-detail").unwrap_or_default()
    };
    assert!(dead_detail("non-utf8-name").contains("header #0 name is not UTF-8"), "{}", dead_detail("non-utf8-name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_amqp_cannot_carry_is_dead_lettered_on_kafka_to_amqp_and_the_route_flows() {
    let _shared = RABBIT.read().await;
    let bs = kafka();
    let (_c, ch) = channel().await;
    let n = topology(&ch, "hostile-k2a").await;
    let t = topics("hostile-k2a");
    create_topics(&bs, &[&t.untrusted], 1).await;
    let text = format!(
        r#"{preamble}
[amqp.rabbit]
url = "{url}"
[kafka.main]
bootstrap_servers = "{bs}"
[routes.k2a]
source = {{ kafka = {{ cluster = "main", topics = ["{kin}"], group = "hostile-{id}" }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}", routing_key = "orders.{{key}}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}", routing_key = "dead.{{key}}" }} }}
"#,
        preamble = gate_preamble(None),
        url = amqp_url(),
        kin = t.untrusted,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
        id = uuid::Uuid::new_v4().simple(),
    );
    let tok = token_header();
    let with_token = |mut h: RawHeaders| {
        h.push(tok.clone());
        h
    };
    let cases: Vec<(Vec<u8>, Vec<u8>, RawHeaders)> = vec![
        // A header name AMQP cannot carry (over 255 bytes).
        (b"k".to_vec(), b"long-name".to_vec(), with_token(vec![(vec![b'n'; 300], Some(b"v".to_vec()))])),
        // A routing key rendered from message data over 255 bytes.
        (vec![b'r'; 400], b"long-routing-key".to_vec(), with_token(vec![])),
        // Empty key: an empty {key} is a valid routing key.
        (vec![], b"empty-key".to_vec(), with_token(vec![])),
        (b"k".to_vec(), b"valid-last".to_vec(), with_token(vec![])),
    ];
    produce_raw(&bs, &t.untrusted, cases).await;
    let gate = Running::start(&text).await;
    let ok = drain(&ch, &n.q_ok, 2, 60).await;
    let dead = drain(&ch, &n.q_dlq, 2, 60).await;
    gate.stop().await;
    let bodies: Vec<String> = ok.iter().map(|d| String::from_utf8_lossy(&d.data).into_owned()).collect();
    assert_eq!(bodies, ["empty-key", "valid-last"]);
    assert_eq!(ok[0].routing_key.as_str(), "orders.");
    let by: HashMap<String, &lapin::message::Delivery> =
        dead.iter().map(|d| (String::from_utf8_lossy(&d.data).into_owned(), d)).collect();
    let long_name = by["long-name"];
    assert_eq!(hdr(long_name, "x-tokengate-reason").as_deref(), Some("malformed"));
    assert!(hdr(long_name, "x-tokengate-detail").unwrap().contains("name of 300 bytes"));
    assert_eq!(hdr(long_name, "x-tokengate-dropped").as_deref(), Some("1"), "the dead letter says what it dropped");
    let long_key = by["long-routing-key"];
    assert_eq!(hdr(long_key, "x-tokengate-reason").as_deref(), Some("malformed"));
    assert!(hdr(long_key, "x-tokengate-detail").unwrap().contains("routing key renders to 407 bytes"));
    assert_eq!(long_key.routing_key.as_str().len(), 255, "a dead letter's routing key is cut to fit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_template_rendering_an_oversized_routing_key_is_dead_lettered_and_the_queue_moves() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "hostile-a2a").await;
    let text = format!(
        r#"{preamble}
[amqp.rabbit]
url = "{url}"
[routes.a2a]
source = {{ amqp = {{ broker = "rabbit", queue = "{q}", declare = true }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}", routing_key = "{{routing_key}}.{{routing_key}}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}" }} }}
"#,
        preamble = gate_preamble(None),
        url = amqp_url(),
        q = n.queue_in,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
    );
    // Published to the source queue through an exchange bound with a 200-byte routing key.
    let long_key = "r".repeat(200);
    let fan = format!("{}-fan", n.queue_in);
    ch.exchange_declare(fan.as_str().into(), lapin::ExchangeKind::Fanout, Default::default(), Default::default())
        .await
        .unwrap();
    ch.queue_bind(n.queue_in.as_str().into(), fan.as_str().into(), "".into(), Default::default(), Default::default())
        .await
        .unwrap();
    let good = bearer(Algorithm::HS256, json!({}));
    let props = || props_with(vec![("authorization", good.clone())]);
    for (key, body) in [(long_key.as_str(), "long-key"), ("short", "valid-after")] {
        ch.basic_publish(fan.as_str().into(), key.into(), Default::default(), body.as_bytes(), props())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A header of every AMQP type, values of any bytes, an empty name: carried or dead-lettered,
    // never stuck.
    let odd = props_with(vec![
        ("authorization", good.clone()),
        ("", AMQPValue::LongString(LongString::from(vec![0u8, 255, 10, 13]))),
        ("bytes", AMQPValue::ByteArray(vec![1u8, 2, 3].into())),
        ("n", AMQPValue::LongLongInt(-7)),
    ]);
    publish(&ch, &n.queue_in, b"odd-headers", odd).await;
    let gate = Running::start(&text).await;
    let dead = drain(&ch, &n.q_dlq, 1, 60).await;
    let ok = drain(&ch, &n.q_ok, 2, 60).await;
    gate.stop().await;
    assert_eq!(String::from_utf8_lossy(&dead[0].data), "long-key");
    assert_eq!(hdr(&dead[0], "x-tokengate-reason").as_deref(), Some("malformed"));
    assert!(hdr(&dead[0], "x-tokengate-detail").unwrap().contains("routing key renders to 401 bytes"));
    let bodies: Vec<String> = ok.iter().map(|d| String::from_utf8_lossy(&d.data).into_owned()).collect();
    assert_eq!(bodies, ["valid-after", "odd-headers"]);
    assert_eq!(ok[0].routing_key.as_str(), "short.short");
}

/// AMQP basic properties with only a headers table: `entries` are raw (name, type tag, value bytes).
fn raw_properties(entries: &[(&[u8], u8, Vec<u8>)]) -> Vec<u8> {
    let mut table = Vec::new();
    for (name, tag, value) in entries {
        table.push(name.len() as u8);
        table.extend_from_slice(name);
        table.push(*tag);
        table.extend_from_slice(value);
    }
    let mut p = (1u16 << 13).to_be_bytes().to_vec(); // property flags: headers only
    p.extend_from_slice(&(table.len() as u32).to_be_bytes());
    p.extend_from_slice(&table);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_amqp_client_cannot_decode_is_dead_lettered_after_bounded_attempts() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "poison").await;
    let text = format!(
        r#"{preamble}
[amqp.rabbit]
url = "{url}"
[routes.poison]
source = {{ amqp = {{ broker = "rabbit", queue = "{q}", declare = true, prefetch = 50 }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}" }} }}
"#,
        preamble = gate_preamble(None),
        url = amqp_url(),
        q = n.queue_in,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
    );
    let good = bearer(Algorithm::HS256, json!({}));
    publish(&ch, &n.queue_in, b"before", props_with(vec![("authorization", good.clone())])).await;
    // A header name that is not UTF-8: RabbitMQ takes short strings as bytes and passes it through;
    // the client library cannot parse it and drops the connection on every delivery.
    let AMQPValue::LongString(tok) = &good else { unreachable!() };
    let mut long_string = (tok.as_bytes().len() as u32).to_be_bytes().to_vec();
    long_string.extend_from_slice(tok.as_bytes());
    let poison =
        raw_properties(&[(b"authorization", b'S', long_string), (b"x-\xff\xfe", b'S', vec![0, 0, 0, 1, b'v'])]);
    tokengate::source::poison::publish_raw(&amqp_url(), "", &n.queue_in, &poison, b"poison-body").await.unwrap();
    publish(&ch, &n.queue_in, b"after", props_with(vec![("authorization", good.clone())])).await;

    let gate = Running::start(&text).await;
    // "before" may arrive twice: the connection the poison killed can take its ack along.
    let mut bodies = Vec::new();
    while !bodies.iter().any(|b| b == "after") {
        let d = drain(&ch, &n.q_ok, 1, 90).await;
        bodies.push(String::from_utf8_lossy(&d[0].data).into_owned());
    }
    let dead = drain(&ch, &n.q_dlq, 1, 90).await;
    gate.stop().await;
    assert!(bodies.iter().all(|b| b == "before" || b == "after") && bodies[0] == "before", "{bodies:?}");
    assert_eq!(dead[0].data, b"poison-body");
    assert_eq!(hdr(&dead[0], "x-tokengate-reason").as_deref(), Some("malformed"));
    let detail = hdr(&dead[0], "x-tokengate-detail").unwrap();
    assert!(detail.contains("cannot decode this message's properties"), "{detail}");
    assert_eq!(hdr(&dead[0], "x-tokengate-raw-properties"), Some(hex::encode(&poison)));
}
