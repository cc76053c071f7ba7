//! The Kafka gate end to end: against the Apache Kafka broker over TCP (started by
//! scripts/test), and against librdkafka's mock cluster for fault injection.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::util::*;

/// The shared test broker's address; fails, saying what is missing, when nothing answers there.
pub fn kafka() -> String {
    let addr = std::env::var("TOKENGATE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "Apache Kafka is required at {addr}; scripts/test starts it (scripts/kafka/broker start)"
    );
    addr
}

#[derive(Clone)]
pub struct Topics {
    pub untrusted: String,
    pub trusted: String,
    pub dead_letter: String,
}

pub fn topics(test: &str) -> Topics {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Topics {
        untrusted: format!("{test}-in-{id}"),
        trusted: format!("{test}-ok-{id}"),
        dead_letter: format!("{test}-dlq-{id}"),
    }
}

pub async fn create_topics(bootstrap: &str, names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let new: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await.unwrap() {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// A route config over `bootstrap` with the test issuers; `redis_prefix` enables revocation.
pub fn gate_config(bootstrap: &str, t: &Topics, group: &str, route: &str, redis_prefix: Option<&str>) -> String {
    gate_config_with(bootstrap, t, group, route, redis_prefix.map(|p| (redis_url(), p.to_owned())))
}

pub fn gate_config_with(
    bootstrap: &str,
    t: &Topics,
    group: &str,
    route: &str,
    redis: Option<(String, String)>,
) -> String {
    format!(
        r#"{preamble}
[kafka.main]
bootstrap_servers = "{bootstrap}"
[routes.{route}]
issuers = ["idp"]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
identity_headers = {{ sub = "x-tokengate-sub", "realm_access.roles" = "x-tokengate-roles" }}
source = {{ kafka = {{ cluster = "main", topics = ["{in_}"], group = "{group}" }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{ok}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{dlq}" }} }}
"#,
        preamble = gate_preamble(redis),
        in_ = t.untrusted,
        ok = t.trusted,
        dlq = t.dead_letter,
    )
}

/// A running gate; cancelled and drained by `stop`.
pub struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(config: &str) -> Running {
        // Logs go to the test's captured stderr: shown when a test fails.
        tokengate::telemetry::init_logs();
        let mut s = settings(config);
        let cancel = CancellationToken::new();
        let gate = tokengate::app::build_gate(&mut s, None, &cancel).await.unwrap();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { tokengate::app::run_routes(&s, gate, cancel).await }
        });
        Running { cancel, task }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub type Msg = (String, String, Vec<(String, String)>);

/// The timestamp `produce` gives every record (the gate must keep it): a minute before the test
/// process started. Not a fixed date: a record older than the broker's retention (7 days) is
/// deleted by its next retention check (every 5 minutes), possibly before it is read.
pub static STAMP: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| (tokengate::verify::unix_now() - 60) * 1000);

/// Produces (key, payload, headers) in order, batching as a real producer would.
pub async fn produce(bootstrap: &str, topic: &str, msgs: &[Msg]) {
    let p: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let mut pending = Vec::new();
    for (k, v, hs) in msgs {
        let mut headers = OwnedHeaders::new();
        for (hk, hv) in hs {
            headers = headers.insert(Header { key: hk, value: Some(hv.as_bytes()) });
        }
        let rec = FutureRecord::to(topic).key(k).payload(v).headers(headers).timestamp(*STAMP);
        pending.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Reads `topic` from the start until `n` messages arrived (or fails after `secs`).
pub async fn consume(bootstrap: &str, topic: &str, n: usize, secs: u64) -> Vec<OwnedMessage> {
    consume_until(bootstrap, topic, secs, |got| got.len() >= n).await
}

/// Reads `topic` from the start until `n` distinct payloads arrived (at least once allows
/// duplicates: a rebalance re-reads what was not committed yet).
pub async fn consume_distinct(bootstrap: &str, topic: &str, n: usize, secs: u64) -> Vec<OwnedMessage> {
    consume_until(bootstrap, topic, secs, |got| {
        got.iter().map(|m| m.payload()).collect::<std::collections::HashSet<_>>().len() >= n
    })
    .await
}

async fn consume_until(
    bootstrap: &str,
    topic: &str,
    secs: u64,
    done: impl Fn(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done(&out) && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
            out.push(m.detach());
        }
    }
    assert!(done(&out), "{topic}: only {} messages within {secs}s", out.len());
    out
}

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Committed offsets of `group` on `topic`, summed over `partitions`.
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements().iter().map(|e| e.offset().to_raw().unwrap_or(-1).max(0)).sum()
}

/// Waits until `group` is stable with `members` members (as the broker's group coordinator
/// reports it), so that a test does not guess how long a join takes.
pub async fn wait_group(bootstrap: &str, group: &str, members: usize) {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = match c.fetch_group_list(Some(group), Duration::from_secs(5)) {
            Ok(list) => list
                .groups()
                .iter()
                .find(|g| g.name() == group)
                .map(|g| (g.state().to_owned(), g.members().len()))
                .unwrap_or_default(),
            Err(e) => (e.to_string(), 0),
        };
        if seen.0 == "Stable" && seen.1 == members {
            return;
        }
        assert!(Instant::now() < deadline, "group {group} not stable with {members} members within 60s: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn wait_committed(bootstrap: &str, group: &str, topic: &str, partitions: i32, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = committed(bootstrap, group, topic, partitions);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "committed {got} of {want} offsets of {group}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn auth(alg: Algorithm, extra: serde_json::Value) -> Vec<(String, String)> {
    let mut c = json!({"iat": tokengate::verify::unix_now() - 5, "exp": tokengate::verify::unix_now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    vec![("authorization".into(), format!("Bearer {}", token(alg, c)))]
}

/// The standard mix: valid messages over a few keys (ordered), plus one of each rejection.
fn mix(valid_per_key: usize) -> (Vec<Msg>, BTreeMap<String, &'static str>) {
    let mut msgs = Vec::new();
    let good = auth(Algorithm::ES256, json!({}));
    for i in 0..valid_per_key {
        for key in ["k1", "k2", "k3"] {
            let mut h = good.clone();
            h.push(("trace-id".into(), format!("{key}-{i}")));
            msgs.push((key.to_owned(), format!("{key}:{i}"), h));
        }
    }
    let now = tokengate::verify::unix_now();
    // label, headers, expected reason
    type Case = (&'static str, Vec<(String, String)>, &'static str);
    let mut bad: Vec<Case> = vec![
        ("expired", auth(Algorithm::HS256, json!({"exp": now - 3600})), "expired"),
        ("wrong-scope", auth(Algorithm::HS256, json!({"scope": "orders:read"})), "forbidden"),
        ("no-token", vec![], "missing_token"),
        (
            "alg-none",
            vec![("authorization".into(), format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"x"}"#)))],
            "unsupported_alg",
        ),
        ("wrong-aud", auth(Algorithm::RS256, json!({"aud": "billing"})), "wrong_audience"),
    ];
    let mut forged = auth(Algorithm::HS256, json!({}));
    forged[0].1.push_str("AAAA");
    bad.push(("forged", forged, "bad_signature"));
    let mut want = BTreeMap::new();
    for (label, h, reason) in bad {
        msgs.push((label.to_owned(), label.to_owned(), h));
        want.insert(label.to_owned(), reason);
    }
    (msgs, want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_every_outcome_reaches_its_topic_with_headers_and_offsets_commit() {
    let bs = kafka();
    let t = topics("outcomes");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 3).await;
    let prefix = unique_prefix("kafka");
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    // A revoked token, revoked with plain Redis before the gate sees it.
    let revoked = auth(Algorithm::HS256, json!({"jti": "kafka-revoked"}));
    let mut conn = redis_conn().await;
    let _: () = redis::AsyncCommands::set(
        &mut conn,
        tokengate::revocation::key(&prefix, tokengate::revocation::Kind::Jti, "kafka-revoked"),
        "test",
    )
    .await
    .unwrap();

    let (mut msgs, mut want) = mix(20);
    msgs.push(("revoked".into(), "revoked".into(), revoked));
    want.insert("revoked".into(), "revoked");
    produce(&bs, &t.untrusted, &msgs).await;
    let gate = Running::start(&gate_config(&bs, &t, &group, "orders", Some(&prefix))).await;

    let trusted = consume(&bs, &t.trusted, 60, 60).await;
    let dead = consume(&bs, &t.dead_letter, want.len(), 60).await;
    wait_committed(&bs, &group, &t.untrusted, 3, msgs.len() as i64).await;
    gate.stop().await;

    // Trusted: token stripped, identity added, original key/payload/timestamp kept, order per key.
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &trusted {
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let payload = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
        let seq: i64 = payload.split(':').nth(1).unwrap().parse().unwrap();
        assert!(seq > *last.get(&key).unwrap_or(&-1), "order per key broken at {payload}");
        last.insert(key.clone(), seq);
        assert!(header(m, "authorization").is_none(), "token leaked downstream");
        assert_eq!(header(m, "x-tokengate-sub").as_deref(), Some("alice"));
        assert_eq!(header(m, "x-tokengate-roles").as_deref(), Some(r#"["publisher"]"#));
        assert_eq!(header(m, "x-tokengate-issuer").as_deref(), Some("https://idp.test"));
        assert_eq!(header(m, "x-tokengate-kid").as_deref(), Some("p256"));
        assert_eq!(header(m, "x-tokengate-fingerprint").map(|f| f.len()), Some(64));
        assert_eq!(header(m, "x-tokengate-source-topic").as_deref(), Some(t.untrusted.as_str()));
        assert!(
            header(m, "x-tokengate-source-offset").is_some() && header(m, "x-tokengate-source-partition").is_some()
        );
        assert_eq!(header(m, "trace-id").as_deref(), Some(format!("{key}-{seq}").as_str()), "other headers kept");
        assert_eq!(m.timestamp().to_millis(), Some(*STAMP));
    }
    assert_eq!(last.len(), 3);
    // Dead letters: every rejection with its reason code.
    let got: BTreeMap<String, String> = dead
        .iter()
        .map(|m| (String::from_utf8(m.key().unwrap().to_vec()).unwrap(), header(m, "x-tokengate-reason").unwrap()))
        .collect();
    let want: BTreeMap<String, String> = want.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
    assert_eq!(got, want);
    for m in &dead {
        if let Some(token) = header(m, "authorization") {
            assert!(token.starts_with("redacted"), "a dead letter carries a replayable token: {token}");
        }
        assert!(header(m, "x-tokengate-detail").is_some() && header(m, "x-tokengate-rejected-at").is_some());
        assert_eq!(header(m, "x-tokengate-source-topic").as_deref(), Some(t.untrusted.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_two_instances_in_one_group_share_partitions_without_loss() {
    let bs = kafka();
    let t = topics("scale");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 4).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let a = Running::start(&gate_config(&bs, &t, &group, "instance_a", None)).await;
    let b = Running::start(&gate_config(&bs, &t, &group, "instance_b", None)).await;
    wait_group(&bs, &group, 2).await;
    let good = auth(Algorithm::HS256, json!({}));
    let msgs: Vec<Msg> = (0..2000).map(|i| (format!("key-{}", i % 50), format!("m{i}"), good.clone())).collect();
    produce(&bs, &t.untrusted, &msgs).await;
    let trusted = consume_distinct(&bs, &t.trusted, 2000, 90).await;
    wait_committed(&bs, &group, &t.untrusted, 4, 2000).await;
    a.stop().await;
    b.stop().await;
    let payloads: std::collections::HashSet<Vec<u8>> = trusted.iter().map(|m| m.payload().unwrap().to_vec()).collect();
    assert_eq!(payloads.len(), 2000, "every message arrived at least once");
    let instances: std::collections::HashSet<String> =
        trusted.iter().filter_map(|m| header(m, "x-tokengate-route")).collect();
    assert_eq!(instances.len(), 2, "both instances did work: {instances:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_messages_from_python_confluent_kafka_pass() {
    let bs = kafka();
    let t = topics("python");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let tok = token(
        Algorithm::RS256,
        json!({"iat": tokengate::verify::unix_now(), "exp": tokengate::verify::unix_now() + 600}),
    );
    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import sys
from confluent_kafka import Producer
bs, topic, token = sys.argv[1:4]
p = Producer({"bootstrap.servers": bs})
for i in range(10):
    p.produce(topic, key=b"py", value=b"py-%d" % i, headers=[("Authorization", b"Bearer " + token.encode())])
assert p.flush(30) == 0
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, &bs, &t.untrusted, &tok])
        .output()
        .unwrap_or_else(|e| {
            panic!("{python} is required with confluent-kafka ({e}); scripts/test installs it into .tokengate/venv")
        });
    assert!(out.status.success(), "python producer failed: {}", String::from_utf8_lossy(&out.stderr));
    // Subscribed by regex, as a route for a family of topics would be.
    let by_regex = gate_config(&bs, &t, &group, "orders", None)
        .replace(&format!("topics = [\"{}\"]", t.untrusted), &format!("topic_regex = \"^{}$\"", t.untrusted));
    let gate = Running::start(&by_regex).await;
    let trusted = consume(&bs, &t.trusted, 10, 60).await;
    gate.stop().await;
    let payloads: Vec<String> =
        trusted.iter().map(|m| String::from_utf8_lossy(m.payload().unwrap()).into_owned()).collect();
    assert_eq!(payloads, (0..10).map(|i| format!("py-{i}")).collect::<Vec<_>>());
    assert!(trusted.iter().all(|m| header(m, "Authorization").is_none()));
}

mod mock {
    //! Fault injection with librdkafka's in-process mock cluster.
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    async fn run_faulted(
        inject: impl FnOnce(&MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
        heal: impl FnOnce(&MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    ) {
        let mock = MockCluster::new(3).unwrap();
        let bs = mock.bootstrap_servers();
        let t = topics("mock");
        for n in [&t.untrusted, &t.trusted, &t.dead_letter] {
            mock.create_topic(n, 3, 3).unwrap();
        }
        let group = "mock-gate";
        let (msgs, want) = mix(100);
        produce(&bs, &t.untrusted, &msgs).await;
        // The fault is in place before the gate starts, so it processes through it.
        inject(&mock);
        let gate = Running::start(&gate_config(&bs, &t, group, "orders", None)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        heal(&mock);
        let trusted = consume_distinct(&bs, &t.trusted, 300, 90).await;
        let dead = consume(&bs, &t.dead_letter, want.len(), 60).await;
        wait_committed(&bs, group, &t.untrusted, 3, msgs.len() as i64).await;
        gate.stop().await;
        let payloads: std::collections::HashSet<Vec<u8>> =
            trusted.iter().map(|m| m.payload().unwrap().to_vec()).collect();
        assert_eq!(payloads.len(), 300, "no valid message lost");
        assert!(
            trusted.iter().all(|m| header(m, "x-tokengate-sub").as_deref() == Some("alice")),
            "nothing unverified leaked"
        );
        let reasons: std::collections::HashSet<String> =
            dead.iter().filter_map(|m| header(m, "x-tokengate-reason")).collect();
        assert_eq!(reasons.len(), want.len());
        drop(mock);
    }

    /// Messages in a one-partition topic (its high watermark).
    async fn trusted_count(bs: &str, topic: &str) -> usize {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bs).create().unwrap();
        let (_, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
        high as usize
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_holds_the_gate_and_it_resumes_by_itself() {
        let mock = MockCluster::new(1).unwrap();
        let bs = mock.bootstrap_servers();
        let t = topics("hold");
        for n in [&t.untrusted, &t.trusted, &t.dead_letter] {
            mock.create_topic(n, 1, 1).unwrap();
        }
        let port = free_port();
        let mut redis = OwnRedis::start(port);
        let prefix = unique_prefix("hold");
        let gate = Running::start(&gate_config_with(&bs, &t, "hold-gate", "orders", Some((redis.url(), prefix)))).await;
        let good = auth(Algorithm::HS256, json!({}));
        let batch = |from: usize| -> Vec<Msg> {
            (from..from + 50).map(|i| ("k".to_owned(), format!("m{i}"), good.clone())).collect()
        };
        produce(&bs, &t.untrusted, &batch(0)).await;
        consume(&bs, &t.trusted, 50, 30).await;

        redis.stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        produce(&bs, &t.untrusted, &batch(50)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(trusted_count(&bs, &t.trusted).await, 50, "nothing forwarded while the revocation list is down");
        assert_eq!(trusted_count(&bs, &t.dead_letter).await, 0, "nothing dead-lettered because of the outage");
        assert!(committed(&bs, "hold-gate", &t.untrusted, 1) <= 51, "held messages are not committed");

        let _redis = OwnRedis::start(port);
        let all = consume_distinct(&bs, &t.trusted, 100, 60).await;
        let payloads: std::collections::HashSet<Vec<u8>> = all.iter().map(|m| m.payload().unwrap().to_vec()).collect();
        assert_eq!(payloads.len(), 100, "processing resumed by itself");
        wait_committed(&bs, "hold-gate", &t.untrusted, 1, 100).await;
        gate.stop().await;
        drop(mock);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_with_dead_letter_opt_in_dead_letters_and_never_accepts() {
        let mock = MockCluster::new(1).unwrap();
        let bs = mock.bootstrap_servers();
        let t = topics("optin");
        for n in [&t.untrusted, &t.trusted, &t.dead_letter] {
            mock.create_topic(n, 1, 1).unwrap();
        }
        let port = free_port();
        let mut redis = OwnRedis::start(port);
        let url = redis.url();
        redis.stop();
        let text = gate_config_with(&bs, &t, "optin-gate", "orders", Some((url, unique_prefix("optin")))).replacen(
            "[redis]\n",
            "[redis]\non_unavailable = \"dead_letter\"\n",
            1,
        );
        let gate = Running::start(&text).await;
        let good = auth(Algorithm::HS256, json!({}));
        produce(
            &bs,
            &t.untrusted,
            &(0..10).map(|i| ("k".to_owned(), format!("o{i}"), good.clone())).collect::<Vec<_>>(),
        )
        .await;
        let dead = consume(&bs, &t.dead_letter, 10, 30).await;
        assert!(dead.iter().all(|m| header(m, "x-tokengate-reason").as_deref() == Some("revocation_unavailable")));
        wait_committed(&bs, "optin-gate", &t.untrusted, 1, 10).await;
        gate.stop().await;
        assert_eq!(trusted_count(&bs, &t.trusted).await, 0, "nothing accepted");
        drop(mock);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mock_broker_down_and_back_loses_nothing() {
        run_faulted(
            |m| {
                for b in 1..=3 {
                    m.broker_down(b).unwrap();
                }
            },
            |m| {
                for b in 1..=3 {
                    m.broker_up(b).unwrap();
                }
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mock_produce_and_commit_errors_lose_nothing() {
        run_faulted(
            |m| {
                m.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 20]);
                m.request_errors(
                    RDKafkaApiKey::OffsetCommit,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 5],
                );
            },
            |m| {
                m.clear_request_errors(RDKafkaApiKey::Produce);
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_health_ready_metrics_and_stops_cleanly_on_sigterm() {
    let bs = kafka();
    let t = topics("daemon");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 2).await;
    let group = format!("daemon-{}", uuid::Uuid::new_v4().simple());
    let port = free_port();
    // A remote issuer too, so that the per-issuer metrics exist.
    let jwks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("http://{}/certs", jwks.local_addr().unwrap());
    let body = std::fs::read_to_string(fixture("jwks.json")).unwrap();
    let app = axum::Router::new().route("/certs", axum::routing::get(move || async move { body }));
    tokio::spawn(async move { axum::serve(jwks, app).await });
    let text = gate_config(&bs, &t, &group, "orders", None)
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
        + &format!(
            "[issuers.remote]\niss = \"https://remote.test\"\nalgorithms = [\"RS256\"]\njwks_url = \"{jwks_url}\"\nallow_insecure_http = true\n"
        );
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut cfg, text.as_bytes()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["run", "--config", cfg.path().to_str().unwrap()])
        .env("TG_TEST_SECRET", SECRET)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon's log, read as it is written: a pipe left unread blocks the daemon once full.
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = std::thread::spawn({
        let (stderr, logs) = (child.stderr.take().unwrap(), std::sync::Arc::clone(&logs));
        move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
                let mut logs = logs.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        }
    });
    let good = auth(Algorithm::HS256, json!({}));
    let msgs: Vec<Msg> = (0..100).map(|i| (format!("k{}", i % 5), format!("d{i}"), good.clone())).collect();
    produce(&bs, &t.untrusted, &msgs).await;
    produce(&bs, &t.untrusted, &[("bad".into(), "bad".into(), vec![])]).await;
    let (b, topic) = (bs.clone(), t.trusted.clone());
    if tokio::spawn(async move { consume(&b, &topic, 100, 60).await }).await.is_err() {
        panic!("the daemon forwarded too little; its log:\n{}", logs.lock().unwrap());
    }

    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    assert_eq!(http.get(url("/health")).send().await.unwrap().status(), 200);
    let ready = http.get(url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["routes"][0]["route"], "orders");
    let metrics = http.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"tokengate_messages_total{route="orders",outcome="forwarded"} 100"#), "{metrics}");
    assert!(metrics.contains(r#"tokengate_rejections_total{route="orders",reason="missing_token"} 1"#), "{metrics}");
    assert!(!metrics.contains("eyJ"), "no token in metrics");
    let lag = metrics.lines().find(|l| l.starts_with("tokengate_consumer_lag{")).expect("the route's consumer lag");
    assert!(lag.rsplit(' ').next().unwrap().parse::<f64>().is_ok_and(|v| v >= 0.0), "{lag}");
    // Every documented metric is served (from startup), and nothing undocumented.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("| `tokengate_"))
        .map(|rest| format!("tokengate_{}", rest.split('`').next().unwrap()))
        .collect();
    let served: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter(|l| l.starts_with("tokengate_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    // Transaction metrics are served by a process with an exactly_once route (tests/exactly_once.rs).
    // Audit metrics, by a process with an [audit] destination (tests/audit.rs).
    let only_exactly_once: std::collections::BTreeSet<String> = tokengate::telemetry::TRANSACTION_METRICS
        .iter()
        .chain(&tokengate::telemetry::AUDIT_METRICS)
        .map(|m| m.name.to_owned())
        .collect();
    assert!(served.is_disjoint(&only_exactly_once), "no transaction or audit metric without them");
    let always: std::collections::BTreeSet<String> = documented.difference(&only_exactly_once).cloned().collect();
    assert_eq!(always, served, "README metric table vs /metrics");
    let declared: std::collections::BTreeSet<String> =
        tokengate::telemetry::METRICS.iter().map(|m| m.name.to_owned()).collect();
    assert_eq!(documented, declared, "README metric table vs telemetry::METRICS");
    // Every metric the Grafana dashboard and the alerting rules query is served (the optional
    // ones by a process with their feature: tests/exactly_once.rs, tests/audit.rs).
    let queried = crate::deploy::dashboard_and_alert_metrics();
    let missing: Vec<_> = queried.iter().filter(|m| !served.contains(*m) && !only_exactly_once.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard or alerts query metrics /metrics does not serve: {missing:?}");

    // SIGTERM: stop intake, drain, commit, exit 0 within the deadline.
    let started = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "did not stop within the shutdown deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    reader.join().unwrap();
    let logs = logs.lock().unwrap().clone();
    assert!(logs.contains("route stopped"), "{logs}");
    let (_, sig) = good[0].1.rsplit_once('.').unwrap();
    assert!(!logs.contains(sig), "a token was logged");
    assert_eq!(committed(&bs, &group, &t.untrusted, 2), 101);
}
