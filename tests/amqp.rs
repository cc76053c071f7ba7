//! The AMQP gate against the real RabbitMQ (started by scripts/test where none runs), and routes
//! across brokers through Apache Kafka. These tests share one broker and one restarts it: under
//! nextest they run one at a time (.config/nextest.toml), under `cargo test` the restart takes
//! `RABBIT` exclusively.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;

use crate::kafka::{Running, consume, create_topics, header, produce};
use crate::util::*;

/// Held shared by every test that uses the shared RabbitMQ, exclusively by the one that restarts it.
pub static RABBIT: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub fn amqp_url() -> String {
    std::env::var("TOKENGATE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn channel() -> (Connection, Channel) {
    let url = amqp_url();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is required at {url} ({e}); scripts/test installs and starts it"));
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    (conn, ch)
}

pub struct Names {
    pub queue_in: String,
    pub ex_ok: String,
    pub q_ok: String,
    pub ex_dlq: String,
    pub q_dlq: String,
}

/// Declares exchanges and durable queues for one test (topic exchanges bound with `#`).
pub async fn topology(ch: &Channel, test: &str) -> Names {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let n = Names {
        queue_in: format!("{test}-in-{id}"),
        ex_ok: format!("{test}-ok-x-{id}"),
        q_ok: format!("{test}-ok-{id}"),
        ex_dlq: format!("{test}-dlq-x-{id}"),
        q_dlq: format!("{test}-dlq-{id}"),
    };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    // The source queue exists before anything is published to it (else the default exchange drops).
    ch.queue_declare(n.queue_in.as_str().into(), durable, FieldTable::default()).await.unwrap();
    for (ex, q) in [(&n.ex_ok, &n.q_ok), (&n.ex_dlq, &n.q_dlq)] {
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(q.as_str().into(), durable, FieldTable::default()).await.unwrap();
        ch.queue_bind(
            q.as_str().into(),
            ex.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    n
}

pub fn config(n: &Names, prefetch: u16, redis: Option<(String, String)>) -> String {
    format!(
        r#"{preamble}
[amqp.rabbit]
url = "{url}"
[routes.orders]
issuers = ["idp"]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
source = {{ amqp = {{ broker = "rabbit", queue = "{q}", declare = true, prefetch = {prefetch} }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}" }} }}
"#,
        preamble = gate_preamble(redis),
        url = amqp_url(),
        q = n.queue_in,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
    )
}

pub async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props)
        .await
        .unwrap()
        .await
        .unwrap();
}

pub fn props_with(headers: Vec<(&str, AMQPValue)>) -> BasicProperties {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(k.into(), v);
    }
    BasicProperties::default().with_headers(t).with_delivery_mode(2)
}

pub fn bearer(alg: Algorithm, extra: serde_json::Value) -> AMQPValue {
    let mut c = json!({"iat": tokengate::verify::unix_now() - 5, "exp": tokengate::verify::unix_now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    AMQPValue::LongString(LongString::from(format!("Bearer {}", token(alg, c)).into_bytes()))
}

/// Takes `n` messages off `queue` (fails after `secs`).
pub async fn drain(ch: &Channel, queue: &str, n: usize, secs: u64) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while out.len() < n {
        assert!(Instant::now() < deadline, "{queue}: {} of {n} messages within {secs}s", out.len());
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            Some(m) => out.push(m.delivery),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    out
}

pub fn hdr(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    d.properties.headers().as_ref()?.inner().get(name).map(|v| match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    })
}

async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_outcomes_keep_properties_and_carry_reasons() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "outcomes").await;
    let gate = Running::start(&config(&n, 50, None)).await;
    let good = bearer(Algorithm::RS256, json!({}));
    let full = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_correlation_id("corr-1".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_000)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_type("order.created".into())
        .with_app_id("shop".into());
    let mut t = FieldTable::default();
    t.insert("authorization".into(), good.clone());
    t.insert("trace".into(), AMQPValue::LongString(LongString::from(b"t-1".to_vec())));
    t.insert("attempt".into(), AMQPValue::LongInt(3));
    t.insert("x-tokengate-sub".into(), AMQPValue::LongString(LongString::from(b"root".to_vec())));
    publish(&ch, &n.queue_in, b"{\"id\":1}", full.with_headers(t)).await;

    // RabbitMQ itself refuses a header frame over frame_max (128 KiB) with a connection error, so a
    // 1 MB header cannot reach a queue; 120 KB is the largest hostile header a producer can send.
    let big = AMQPValue::LongString(LongString::from(vec![b'a'; 120 * 1024]));
    let mut nested = FieldTable::default();
    nested.insert("token".into(), good.clone());
    let cases: Vec<(&str, BasicProperties, &str)> = vec![
        ("expired", props_with(vec![("authorization", bearer(Algorithm::HS256, json!({"exp": 1000})))]), "expired"),
        ("integer", props_with(vec![("authorization", AMQPValue::LongLongInt(42))]), "malformed"),
        ("bytes", props_with(vec![("authorization", AMQPValue::ByteArray(b"abc".to_vec().into()))]), "malformed"),
        ("table", props_with(vec![("authorization", AMQPValue::FieldTable(nested))]), "malformed"),
        (
            "non-utf8",
            props_with(vec![("authorization", AMQPValue::LongString(LongString::from(b"Bearer \xff\xfe".to_vec())))]),
            "non_utf8_token",
        ),
        ("120-kilobytes", props_with(vec![("authorization", big)]), "token_too_large"),
        ("no-properties", BasicProperties::default(), "missing_token"),
        (
            "wrong-scope",
            props_with(vec![("authorization", bearer(Algorithm::ES256, json!({"scope": "x"})))]),
            "forbidden",
        ),
    ];
    for (label, props, _) in &cases {
        publish(&ch, &n.queue_in, label.as_bytes(), props.clone()).await;
    }

    let ok = drain(&ch, &n.q_ok, 1, 30).await;
    let d = &ok[0];
    let p = &d.properties;
    assert_eq!(d.data, b"{\"id\":1}");
    assert_eq!(p.content_type().as_ref().map(ShortString::as_str), Some("application/json"));
    assert_eq!(p.content_encoding().as_ref().map(ShortString::as_str), Some("utf-8"));
    assert_eq!(p.correlation_id().as_ref().map(ShortString::as_str), Some("corr-1"));
    assert_eq!(p.message_id().as_ref().map(ShortString::as_str), Some("msg-1"));
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(*p.priority(), Some(5));
    assert_eq!(p.kind().as_ref().map(ShortString::as_str), Some("order.created"));
    assert_eq!(p.app_id().as_ref().map(ShortString::as_str), Some("shop"));
    assert_eq!(hdr(d, "authorization"), None, "token stripped");
    assert_eq!(hdr(d, "trace").as_deref(), Some("t-1"));
    assert_eq!(hdr(d, "attempt").as_deref(), Some("LongInt(3)"), "typed headers kept as they were");
    assert_eq!(hdr(d, "x-tokengate-sub").as_deref(), Some("alice"), "forged identity replaced");
    assert_eq!(hdr(d, "x-tokengate-source-queue").as_deref(), Some(n.queue_in.as_str()));
    assert_eq!(hdr(d, "x-tokengate-message-id"), Some(format!("{}/id:msg-1", n.queue_in)), "the producer's id");
    assert_eq!(d.routing_key.as_str(), n.queue_in, "the source routing key by default");

    let dead = drain(&ch, &n.q_dlq, cases.len(), 30).await;
    let got: BTreeMap<String, String> = dead
        .iter()
        .map(|d| (String::from_utf8_lossy(&d.data).into_owned(), hdr(d, "x-tokengate-reason").unwrap()))
        .collect();
    let want: BTreeMap<String, String> = cases.iter().map(|(l, _, r)| (l.to_string(), r.to_string())).collect();
    assert_eq!(got, want);
    // Without a message_id property, a digest of the message: distinct messages, distinct ids.
    let ids: std::collections::BTreeSet<String> =
        dead.iter().map(|d| hdr(d, "x-tokengate-message-id").expect("every dead letter has a message id")).collect();
    assert_eq!(ids.len(), cases.len(), "{ids:?}");
    assert!(ids.iter().all(|id| id.starts_with(&format!("{}/sha256:", n.queue_in))), "{ids:?}");
    gate.stop().await;
    assert_eq!(ready_count(&ch, &n.queue_in).await, 0, "every delivery acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_prefetch_bounds_unacked_deliveries_while_holding() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "prefetch").await;
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let url = redis.url();
    redis.stop(); // the revocation list is down from the start: the gate holds
    let gate = Running::start(&config(&n, 7, Some((url, unique_prefix("prefetch"))))).await;
    for i in 0..40 {
        publish(
            &ch,
            &n.queue_in,
            format!("m{i}").as_bytes(),
            props_with(vec![("authorization", bearer(Algorithm::HS256, json!({})))]),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready_count(&ch, &n.queue_in).await, 33, "exactly the prefetch (7) is out, unacked");
    assert_eq!(ready_count(&ch, &n.q_ok).await, 0, "nothing forwarded while holding");
    let _redis = OwnRedis::start(port);
    let ok = drain(&ch, &n.q_ok, 40, 60).await;
    assert_eq!(ok.iter().map(|d| d.data.clone()).collect::<HashSet<_>>().len(), 40);
    gate.stop().await;
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl is required");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_restart_mid_stream_loses_nothing() {
    let _exclusive = RABBIT.write().await;
    let (c, ch) = channel().await;
    let n = topology(&ch, "restart").await;
    const N: usize = 3000;
    let good = props_with(vec![("authorization", bearer(Algorithm::HS256, json!({})))]);
    let mut confirms = Vec::new();
    for i in 0..N {
        let body = format!("m{i}");
        let c = ch.basic_publish(
            "".into(),
            n.queue_in.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            good.clone(),
        );
        confirms.push(c.await.unwrap());
    }
    for c in confirms {
        c.await.unwrap();
    }
    let gate = Running::start(&config(&n, 20, None)).await;
    // Stop the broker as soon as the stream is flowing.
    while ready_count(&ch, &n.q_ok).await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = ready_count(&ch, &n.q_ok).await;
    drop((ch, c));
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let (_c, ch) = channel().await;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    assert!((before as usize) < N, "the restart happened mid-stream ({before} of {N} through)");
    while seen.len() < N {
        assert!(Instant::now() < deadline, "{} of {N} after the restart", seen.len());
        match ch.basic_get(n.q_ok.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            Some(m) => {
                seen.insert(m.delivery.data);
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    gate.stop().await;
    assert_eq!(ready_count(&ch, &n.queue_in).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_broker_kafka_to_amqp_and_amqp_to_kafka() {
    let _shared = RABBIT.read().await;
    let bs = crate::kafka::kafka();
    let (_c, ch) = channel().await;
    let n = topology(&ch, "cross").await;
    let t = crate::kafka::topics("cross");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 2).await;
    let group = format!("cross-{}", uuid::Uuid::new_v4().simple());
    let text = format!(
        r#"{preamble}
[amqp.rabbit]
url = "{url}"
[kafka.main]
bootstrap_servers = "{bs}"
[routes.k2a]
source = {{ kafka = {{ cluster = "main", topics = ["{kin}"], group = "{group}" }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}", routing_key = "orders.{{topic}}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}" }} }}
[routes.a2k]
source = {{ amqp = {{ broker = "rabbit", queue = "{qin}", declare = true }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{kok}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{kdlq}" }} }}
"#,
        preamble = gate_preamble(None),
        url = amqp_url(),
        kin = t.untrusted,
        kok = t.trusted,
        kdlq = t.dead_letter,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
        qin = n.queue_in,
    );
    let gate = Running::start(&text).await;
    crate::kafka::wait_group(&bs, &group, 1).await;
    let tok = format!(
        "Bearer {}",
        token(
            Algorithm::EdDSA,
            json!({"iat": tokengate::verify::unix_now(), "exp": tokengate::verify::unix_now() + 600})
        )
    );
    // Kafka -> AMQP
    let msgs: Vec<crate::kafka::Msg> = (0..20)
        .map(|i| ("k".to_owned(), format!("k2a-{i}"), vec![("authorization".to_owned(), tok.clone())]))
        .collect();
    produce(&bs, &t.untrusted, &msgs).await;
    produce(&bs, &t.untrusted, &[("k".into(), "k2a-bad".into(), vec![])]).await;
    let got = drain(&ch, &n.q_ok, 20, 60).await;
    let bodies: Vec<String> = got.iter().map(|d| String::from_utf8_lossy(&d.data).into_owned()).collect();
    assert_eq!(bodies, (0..20).map(|i| format!("k2a-{i}")).collect::<Vec<_>>(), "order kept");
    assert_eq!(got[0].routing_key.as_str(), format!("orders.{}", t.untrusted), "templated routing key");
    assert_eq!(hdr(&got[0], "x-tokengate-sub").as_deref(), Some("alice"));
    assert_eq!(hdr(&got[0], "authorization"), None);
    let bad = drain(&ch, &n.q_dlq, 1, 30).await;
    assert_eq!(hdr(&bad[0], "x-tokengate-reason").as_deref(), Some("missing_token"));
    // AMQP -> Kafka
    for i in 0..20 {
        let props =
            props_with(vec![("authorization", AMQPValue::LongString(LongString::from(tok.clone().into_bytes())))]);
        publish(&ch, &n.queue_in, format!("a2k-{i}").as_bytes(), props.with_message_id(format!("id-{i}").into())).await;
    }
    let out = consume(&bs, &t.trusted, 20, 60).await;
    let payloads: HashSet<String> =
        out.iter().map(|m| String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap()).into_owned()).collect();
    assert_eq!(payloads.len(), 20);
    assert!(
        out.iter()
            .all(|m| header(m, "authorization").is_none() && header(m, "x-tokengate-sub").as_deref() == Some("alice"))
    );
    assert_eq!(header(&out[0], "x-tokengate-source-queue").as_deref(), Some(n.queue_in.as_str()));
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_unroutable_republish_holds_instead_of_losing() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "unroutable").await;
    // A trusted exchange with no binding: every mandatory publish comes back unroutable.
    let lonely = format!("{}-unbound", n.ex_ok);
    ch.exchange_declare(
        lonely.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let text =
        config(&n, 10, None).replace(&format!("exchange = \"{}\"", n.ex_ok), &format!("exchange = \"{lonely}\""));
    let gate = Running::start(&text).await;
    for i in 0..5 {
        publish(
            &ch,
            &n.queue_in,
            format!("u{i}").as_bytes(),
            props_with(vec![("authorization", bearer(Algorithm::HS256, json!({})))]),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready_count(&ch, &n.q_dlq).await, 0, "an unroutable accept is not dead-lettered");
    // Bind a queue: the held messages are redelivered and now arrive.
    let late = format!("{}-late", n.q_ok);
    ch.queue_declare(late.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.queue_bind(
        late.as_str().into(),
        lonely.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let got = drain(&ch, &late, 5, 60).await;
    assert_eq!(got.iter().map(|d| d.data.clone()).collect::<HashSet<_>>().len(), 5, "nothing lost");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_print_the_broker_password_or_a_token() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "trace").await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (user, password) = (format!("tg-trace-{id}"), format!("pw-{id}"));
    rabbitmqctl(&["add_user", &user, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let text = format!(
        r#"{preamble}
[amqp.rabbit]
url = "amqp://{user}@127.0.0.1:5672/%2f"
password = {{ env = "TG_TRACE_AMQP_PASSWORD" }}
[routes.traced]
issuers = ["idp"]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
source = {{ amqp = {{ broker = "rabbit", queue = "{q}", declare = true }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}" }} }}
"#,
        preamble = gate_preamble(None),
        q = n.queue_in,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
    );
    let good = bearer(Algorithm::ES256, json!({}));
    let weak = bearer(Algorithm::HS256, json!({"scope": "orders:read"}));
    for (i, tok) in [&good, &good, &weak].into_iter().enumerate() {
        publish(&ch, &n.queue_in, format!("m{i}").as_bytes(), props_with(vec![("authorization", tok.clone())])).await;
    }
    let gate = crate::kafka_failover::GateProcess::spawn_with_env(
        &text,
        &[("RUST_LOG", "trace"), ("TG_TRACE_AMQP_PASSWORD", password.as_str())],
    );
    drain(&ch, &n.q_ok, 2, 60).await;
    drain(&ch, &n.q_dlq, 1, 60).await;
    let logs = gate.stop();
    rabbitmqctl(&["delete_user", &user]);
    assert!(logs.contains("TRACE") && logs.contains("token accepted"), "the run logged at trace level:\n{logs}");
    assert!(!logs.contains(&password), "the broker password was logged");
    for tok in [&good, &weak] {
        let AMQPValue::LongString(t) = tok else { unreachable!() };
        let t = String::from_utf8_lossy(t.as_bytes()).into_owned();
        let (_, sig) = t.rsplit_once('.').unwrap();
        assert!(!logs.contains(sig), "a token was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outages_of_1_10_and_60_seconds_hold_every_route_and_it_resumes_within_a_second() {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    let _shared = RABBIT.read().await;
    let bs = crate::kafka::kafka();
    let (_c, ch) = channel().await;
    let n = topology(&ch, "outage").await;
    let t = crate::kafka::topics("outage");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let text = format!(
        r#"{preamble}
[amqp.rabbit]
url = "{url}"
[kafka.main]
bootstrap_servers = "{bs}"
[routes.a]
source = {{ amqp = {{ broker = "rabbit", queue = "{q}", declare = true }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ok}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{dlq}" }} }}
[routes.k]
source = {{ kafka = {{ cluster = "main", topics = ["{kin}"], group = "outage-{id}" }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{kok}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{kdlq}" }} }}
"#,
        preamble = gate_preamble(Some((redis.url(), unique_prefix("outage")))),
        url = amqp_url(),
        q = n.queue_in,
        ok = n.ex_ok,
        dlq = n.ex_dlq,
        kin = t.untrusted,
        kok = t.trusted,
        kdlq = t.dead_letter,
        id = uuid::Uuid::new_v4().simple(),
    );
    let gate = Running::start(&text).await;
    // Assigned, not subscribed: no group join in the timing.
    let reader: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4().simple()))
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&t.trusted, 0, rdkafka::Offset::Beginning).unwrap();
    reader.assign(&tpl).unwrap();
    let good = bearer(Algorithm::HS256, json!({}));
    let AMQPValue::LongString(tok) = &good else { unreachable!() };
    let kafka_auth = vec![("authorization".to_owned(), String::from_utf8_lossy(tok.as_bytes()).into_owned())];
    let send = |i: usize| {
        let (ch, q, bs, topic, auth, good) =
            (ch.clone(), n.queue_in.clone(), bs.clone(), t.untrusted.clone(), kafka_auth.clone(), good.clone());
        async move {
            publish(&ch, &q, format!("a{i}").as_bytes(), props_with(vec![("authorization", good)])).await;
            produce(&bs, &topic, &[("k".into(), format!("k{i}"), auth)]).await;
        }
    };
    // Both routes' message `i` on their trusted destinations (fails after `secs`).
    let arrived = |i: usize, secs: u64| {
        let (ch, q_ok, reader) = (ch.clone(), n.q_ok.clone(), &reader);
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let (mut a, mut k) = (false, false);
            while !(a && k) {
                assert!(Instant::now() < deadline, "message {i}: amqp {a}, kafka {k} within {secs}s");
                if !a
                    && let Some(m) = ch.basic_get(q_ok.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap()
                {
                    assert_eq!(m.delivery.data, format!("a{i}").into_bytes(), "in order, nothing else");
                    a = true;
                }
                if !k && let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(20), reader.recv()).await {
                    assert_eq!(rdkafka::Message::payload(&m), Some(format!("k{i}").as_bytes()));
                    k = true;
                }
            }
        }
    };
    send(0).await;
    arrived(0, 60).await;
    for (i, outage) in [(1, 1), (2, 10), (3, 60)] {
        redis.stop();
        // Until the gate notices (the connection's close, at most its 500 ms heartbeat), it still
        // decides from the mirror, which no revocation can have changed since Redis died: the
        // fail-closed claim is about the outage once seen, so send after that.
        tokio::time::sleep(Duration::from_millis(700)).await;
        send(i).await;
        tokio::time::sleep(Duration::from_secs(outage)).await;
        assert_eq!(ready_count(&ch, &n.q_ok).await, 0, "nothing passes while Redis is down (fail closed)");
        redis = OwnRedis::start(port);
        let back = Instant::now();
        arrived(i, 30).await;
        let took = back.elapsed();
        eprintln!("Redis outage of {outage}s: both routes resumed {:.2}s after Redis answered", took.as_secs_f64());
        assert!(took < Duration::from_millis(2500), "resumed {:.2}s after Redis answered", took.as_secs_f64());
    }
    gate.stop().await;
    drop(redis);
}
