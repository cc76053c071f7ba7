//! The steady-state soak: the gate binary (`tokengate run`, its own process) under a fixed mixed
//! load on both brokers for a fixed time, with a row every minute: the gate's RSS and open file
//! descriptors, end-to-end latency p50/p99 per broker (producer send to trusted arrival), the
//! messages moved, and Redis's memory and client-tracking tables. At the end: messages lost (none
//! may be), and the drift of RSS and p99 between the first and the last third of the run.
//!
//! cargo bench --bench soak      (needs Kafka, RabbitMQ and Redis as `scripts/setup` starts them)
//! Optional: TOKENGATE_SOAK_MINUTES (default 30), TOKENGATE_SOAK_KAFKA_RATE (msg/s, default
//! 3000), TOKENGATE_SOAK_AMQP_RATE (default 500), TOKENGATE_SOAK_NEW (share of messages with a
//! token never seen before, default 0.1), TOKENGATE_SOAK_POOL (distinct reused tokens, default
//! 100), TOKENGATE_SOAK_REVOKED (revocation entries, default 100000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use jsonwebtoken::{Algorithm, Header};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header as KafkaHeader, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use serde_json::json;

mod common;

deployed_allocator!();

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Tokens for the load: a pool of reused ones, and a fresh one (new `jti` and `sub`) when asked.
struct Tokens {
    reused: Vec<String>,
    key: jsonwebtoken::EncodingKey,
    header: Header,
    minted: AtomicU64,
}

impl Tokens {
    fn new(pool: usize) -> Tokens {
        let (key, kid) = common::signing_key(Algorithm::HS256);
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        Tokens { reused: common::mint(Algorithm::HS256, pool.max(1)), key, header, minted: AtomicU64::new(0) }
    }

    fn pick(&self, seq: u64, new_share: f64) -> String {
        // A fixed pattern: message `seq` carries a new token when the share passes a whole number.
        let new = ((seq + 1) as f64 * new_share).floor() > (seq as f64 * new_share).floor();
        if !new {
            return format!("Bearer {}", self.reused[seq as usize % self.reused.len()]);
        }
        let i = self.minted.fetch_add(1, Ordering::Relaxed);
        let now = tokengate::verify::unix_now();
        let c = json!({"iss": "https://idp.bench", "aud": "tokengate", "sub": format!("soak-{i}"), "iat": now,
                       "exp": now + 7200, "jti": format!("soak-{i}-{seq}"), "scope": "orders:write"});
        format!("Bearer {}", jsonwebtoken::encode(&self.header, &c, &self.key).unwrap())
    }
}

/// Latencies (µs) and counts of one broker for the current minute, and every message seen.
#[derive(Default)]
struct Arrivals {
    minute: Vec<u64>,
    seen: Vec<bool>,
    duplicates: u64,
}

impl Arrivals {
    fn record(&mut self, seq: u64, sent_ns: u64) {
        let seq = seq as usize;
        if self.seen.len() <= seq {
            self.seen.resize(seq + 1, false);
        }
        if std::mem::replace(&mut self.seen[seq], true) {
            self.duplicates += 1;
        }
        self.minute.push(now_ns().saturating_sub(sent_ns) / 1000);
    }

    /// (messages, p50 ms, p99 ms) of the minute, which starts over.
    fn take_minute(&mut self) -> (usize, f64, f64) {
        let mut m = std::mem::take(&mut self.minute);
        if m.is_empty() {
            return (0, f64::NAN, f64::NAN);
        }
        m.sort_unstable();
        let q = |p: f64| m[((m.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        (m.len(), q(0.5), q(0.99))
    }

    fn distinct(&self) -> usize {
        self.seen.iter().filter(|s| **s).count()
    }
}

/// A number from Redis's `INFO` text (one of its `name:value` lines).
fn info_field(info: &str, field: &str) -> u64 {
    info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Calls `send` with the next sequence number `rate` times a second (in ticks of 10 ms) until
/// `end`, counting in `sent`.
async fn paced<F: std::future::Future<Output = ()>>(
    rate: u64,
    end: Instant,
    sent: &AtomicU64,
    mut send: impl FnMut(u64) -> F,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    while Instant::now() < end {
        tick.tick().await;
        let due = started.elapsed().as_millis() as u64 * rate / 1000;
        while sent.load(Ordering::Relaxed) < due {
            send(sent.fetch_add(1, Ordering::Relaxed)).await;
        }
    }
}

/// A memory figure of process `pid` from `/proc` (`VmRSS`, `VmHWM`), in bytes.
fn mem(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kb * 1024
}

/// RSS (bytes) and open file descriptors of process `pid`.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (mem(pid, "VmRSS"), fds)
}

fn seq_and_sent(seq: Option<&[u8]>, sent: Option<&[u8]>) -> Option<(u64, u64)> {
    let num = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
    Some((num(seq?)?, num(sent?)?))
}

async fn amqp_topology(ch: &Channel, id: &str) -> (String, String, String, String) {
    let (q_in, ex_ok, q_ok, ex_dlq) =
        (format!("soak-in-{id}"), format!("soak-ok-x-{id}"), format!("soak-ok-{id}"), format!("soak-dlq-x-{id}"));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    for q in [&q_in, &q_ok] {
        ch.queue_declare(q.as_str().into(), durable, FieldTable::default()).await.unwrap();
    }
    for ex in [&ex_ok, &ex_dlq] {
        let opts = ExchangeDeclareOptions::default();
        ch.exchange_declare(ex.as_str().into(), ExchangeKind::Topic, opts, FieldTable::default()).await.unwrap();
    }
    let bind = QueueBindOptions::default();
    ch.queue_bind(q_ok.as_str().into(), ex_ok.as_str().into(), "#".into(), bind, FieldTable::default()).await.unwrap();
    (q_in, ex_ok, q_ok, ex_dlq)
}

#[tokio::main]
async fn main() {
    common::set_secret_env();
    let minutes: u64 = env_or("TOKENGATE_SOAK_MINUTES", 30);
    let kafka_rate: u64 = env_or("TOKENGATE_SOAK_KAFKA_RATE", 3000);
    let amqp_rate: u64 = env_or("TOKENGATE_SOAK_AMQP_RATE", 500);
    let new_share: f64 = env_or("TOKENGATE_SOAK_NEW", 0.1);
    let revoked: usize = env_or("TOKENGATE_SOAK_REVOKED", 100_000);
    let pool: usize = env_or("TOKENGATE_SOAK_POOL", 100);
    let bs = std::env::var("TOKENGATE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let amqp_url = std::env::var("TOKENGATE_TEST_AMQP").unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into());
    let redis_url = std::env::var("TOKENGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let id = uuid::Uuid::new_v4().simple().to_string();

    // Kafka topics, RabbitMQ queues, a revocation list of `revoked` entries under a fresh prefix.
    let (k_in, k_ok, k_dlq) = (format!("soak-in-{id}"), format!("soak-ok-{id}"), format!("soak-dlq-{id}"));
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bs).create().expect("Kafka admin client");
    let topics: Vec<rdkafka::admin::NewTopic> = [&k_in, &k_ok, &k_dlq]
        .iter()
        .map(|t| rdkafka::admin::NewTopic::new(t, 3, rdkafka::admin::TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&topics, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap_or_else(|e| panic!("Kafka at {bs}: {e}"))
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default()).await.expect("RabbitMQ");
    let ch = conn.create_channel().await.unwrap();
    let (q_in, ex_ok, q_ok, ex_dlq) = amqp_topology(&ch, &id).await;
    let prefix = format!("soak-{id}:");
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.expect("Redis");
    for chunk in (0..revoked).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET").arg(format!("{prefix}revoked:jti:gone-{i}")).arg("soak").ignore();
        }
        let _: () = pipe.query_async(&mut redis).await.unwrap();
    }

    let config = format!(
        r#"shutdown_timeout = "10s"
[admin]
listen = ""
[redis]
url = "{redis_url}"
prefix = "{prefix}"
[kafka.main]
bootstrap_servers = "{bs}"
[amqp.rabbit]
url = "{amqp_url}"
{issuers}
[routes.kafka]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
identity_headers = {{ sub = "x-tokengate-sub" }}
source = {{ kafka = {{ cluster = "main", topics = ["{k_in}"], group = "soak-{id}" }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{k_ok}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{k_dlq}" }} }}
[routes.amqp]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
identity_headers = {{ sub = "x-tokengate-sub" }}
source = {{ amqp = {{ broker = "rabbit", queue = "{q_in}" }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ex_ok}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{ex_dlq}" }} }}
"#,
        issuers = common::issuer_toml(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("soak.toml");
    std::fs::write(&path, config).unwrap();
    let mut gate = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the tokengate binary");
    let pid = gate.id().expect("gate pid");

    // Consumers of both trusted destinations, recording latency per arrival.
    let kafka_in = Arc::new(Mutex::new(Arrivals::default()));
    let amqp_in = Arc::new(Mutex::new(Arrivals::default()));
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", format!("soak-reader-{id}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&k_ok]).unwrap();
    tokio::spawn({
        let arrivals = Arc::clone(&kafka_in);
        async move {
            let mut stream = reader.stream();
            while let Some(Ok(m)) = stream.next().await {
                let h = |name: &str| m.headers()?.iter().find(|h| h.key == name)?.value;
                if let Some((seq, sent)) = seq_and_sent(h("x-seq"), h("x-sent-ns")) {
                    arrivals.lock().unwrap().record(seq, sent);
                }
            }
        }
    });
    let consumer = ch
        .basic_consume(
            q_ok.as_str().into(),
            "soak-reader".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn({
        let arrivals = Arc::clone(&amqp_in);
        let mut consumer = consumer;
        async move {
            while let Some(Ok(d)) = consumer.next().await {
                let table = d.properties.headers().clone().unwrap_or_default();
                let h = |name: &str| match table.inner().get(name) {
                    Some(AMQPValue::LongString(s)) => Some(s.as_bytes().to_vec()),
                    _ => None,
                };
                if let Some((seq, sent)) = seq_and_sent(h("x-seq").as_deref(), h("x-sent-ns").as_deref()) {
                    arrivals.lock().unwrap().record(seq, sent);
                }
            }
        }
    });

    // Producers at fixed rates, in ticks of 10 ms.
    let tokens = Arc::new(Tokens::new(pool));
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let kafka_sent = Arc::new(AtomicU64::new(0));
    let amqp_sent = Arc::new(AtomicU64::new(0));
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &bs).set("linger.ms", "2").create().unwrap();
    let kafka_task = tokio::spawn({
        let (tokens, sent, topic) = (Arc::clone(&tokens), Arc::clone(&kafka_sent), k_in.clone());
        async move {
            paced(kafka_rate, end, &sent, |seq| {
                let (token, seq_text, sent_ns) = (tokens.pick(seq, new_share), seq.to_string(), now_ns().to_string());
                let headers = OwnedHeaders::new()
                    .insert(KafkaHeader { key: "authorization", value: Some(token.as_bytes()) })
                    .insert(KafkaHeader { key: "x-seq", value: Some(seq_text.as_bytes()) })
                    .insert(KafkaHeader { key: "x-sent-ns", value: Some(sent_ns.as_bytes()) });
                let key = format!("k{}", seq % 64);
                let rec = FutureRecord::to(&topic).key(&key).payload(&[b'x'; 256][..]).headers(headers);
                if let Err((e, _)) = producer.send_result(rec) {
                    panic!("Kafka producer queue: {e}");
                }
                std::future::ready(())
            })
            .await;
            producer.flush(Duration::from_secs(30)).unwrap();
        }
    });
    let amqp_task = tokio::spawn({
        let (tokens, sent, ch, q_in) = (Arc::clone(&tokens), Arc::clone(&amqp_sent), ch.clone(), q_in.clone());
        async move {
            paced(amqp_rate, end, &sent, |seq| {
                let mut h = FieldTable::default();
                let text = |s: String| AMQPValue::LongString(LongString::from(s.into_bytes()));
                h.insert("authorization".into(), text(tokens.pick(seq, new_share)));
                h.insert("x-seq".into(), text(seq.to_string()));
                h.insert("x-sent-ns".into(), text(now_ns().to_string()));
                let props = BasicProperties::default().with_headers(h).with_delivery_mode(2);
                let (ch, q_in) = (ch.clone(), q_in.clone());
                async move {
                    let opts = BasicPublishOptions::default();
                    ch.basic_publish("".into(), q_in.as_str().into(), opts, &[b'x'; 256], props).await.unwrap();
                }
            })
            .await;
        }
    });

    println!(
        "soak: {minutes} min, Kafka {kafka_rate} msg/s + AMQP {amqp_rate} msg/s (persistent), {:.0}% new tokens, \
         the rest from {pool} reused ones, {revoked} revocation entries mirrored; gate pid {pid}",
        new_share * 100.0
    );
    println!(
        "| min | Kafka sent/s | Kafka p50 ms | Kafka p99 ms | AMQP sent/s | AMQP p50 ms | AMQP p99 ms | gate RSS MB | gate fds | Redis used MB | tracked keys/prefixes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows: Vec<(f64, f64, f64)> = Vec::new(); // (RSS MB, Kafka p99, AMQP p99)
    let mut last = (0u64, 0u64);
    for minute in 1..=minutes {
        tokio::time::sleep_until((end - Duration::from_secs((minutes - minute) * 60)).into()).await;
        if let Ok(Some(status)) = gate.try_wait() {
            panic!("the gate exited during the soak: {status}");
        }
        let (k, a) = (kafka_sent.load(Ordering::Relaxed), amqp_sent.load(Ordering::Relaxed));
        let (_, kp50, kp99) = kafka_in.lock().unwrap().take_minute();
        let (_, ap50, ap99) = amqp_in.lock().unwrap().take_minute();
        let (rss, fds) = rss_and_fds(pid);
        let info: String = redis::cmd("INFO").arg("all").query_async(&mut redis).await.unwrap_or_default();
        let used = info_field(&info, "used_memory");
        let tracked = info_field(&info, "tracking_total_keys");
        let prefixes = info_field(&info, "tracking_total_prefixes");
        let rss_mb = rss as f64 / 1e6;
        println!(
            "| {minute} | {} | {kp50:.1} | {kp99:.1} | {} | {ap50:.1} | {ap99:.1} | {rss_mb:.0} | {fds} | {:.1} | {tracked}/{prefixes} |",
            (k - last.0) / 60,
            (a - last.1) / 60,
            used as f64 / 1e6
        );
        rows.push((rss_mb, kp99, ap99));
        last = (k, a);
    }
    kafka_task.await.unwrap();
    amqp_task.await.unwrap();

    // Everything sent must arrive: wait for the tail, then count.
    let (k_total, a_total) = (kafka_sent.load(Ordering::Relaxed), amqp_sent.load(Ordering::Relaxed));
    let drain_end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < drain_end
        && (kafka_in.lock().unwrap().distinct() < k_total as usize
            || amqp_in.lock().unwrap().distinct() < a_total as usize)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (k_got, k_dup) = {
        let a = kafka_in.lock().unwrap();
        (a.distinct(), a.duplicates)
    };
    let (a_got, a_dup) = {
        let a = amqp_in.lock().unwrap();
        (a.distinct(), a.duplicates)
    };
    let third = (rows.len() / 3).max(1);
    let mean = |r: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| r.iter().map(f).sum::<f64>() / r.len() as f64;
    let (first, tail) = (&rows[..third], &rows[rows.len() - third..]);
    println!();
    println!(
        "Kafka: {k_total} sent, {k_got} arrived ({} lost, {k_dup} duplicates); AMQP: {a_total} sent, {a_got} arrived ({} lost, {a_dup} duplicates); {} new tokens minted",
        k_total as usize - k_got.min(k_total as usize),
        a_total as usize - a_got.min(a_total as usize),
        tokens.minted.load(Ordering::Relaxed)
    );
    println!(
        "first third vs last third: RSS {:.0} -> {:.0} MB, Kafka p99 {:.1} -> {:.1} ms, AMQP p99 {:.1} -> {:.1} ms",
        mean(first, |r| r.0),
        mean(tail, |r| r.0),
        mean(first, |r| r.1),
        mean(tail, |r| r.1),
        mean(first, |r| r.2),
        mean(tail, |r| r.2),
    );
    println!("gate peak RSS (VmHWM): {:.0} MB", mem(pid, "VmHWM") as f64 / 1e6);
    let _ = gate.start_kill();
    let _ = gate.wait().await;
    let _: Result<(), _> = redis::cmd("EVAL")
        .arg("for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end")
        .arg(0)
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await;
    // The topics too: a 30-minute soak writes gigabytes that the broker would keep for a week.
    let _ = admin.delete_topics(&[&k_in, &k_ok, &k_dlq], &rdkafka::admin::AdminOptions::new()).await;
    assert_eq!((k_got as u64, a_got as u64), (k_total, a_total), "messages lost in the soak");
}
