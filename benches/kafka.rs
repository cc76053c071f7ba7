//! End-to-end throughput and added latency through the real Apache Kafka broker, with
//! verification versus a pass-through run of the same pipeline, in the same run; and for
//! every-token-new runs, CPU per message against pass-through plus the raw `jsonwebtoken`
//! verification cost, measured in the same process; and an `exactly_once` route against the same
//! route at least once.
//!
//! cargo bench --bench kafka      (needs a broker at TOKENGATE_TEST_KAFKA or 127.0.0.1:9092)
//! Optional: TOKENGATE_BENCH_MESSAGES (default 100000), TOKENGATE_BENCH_DELIVERY_MESSAGES (default
//! 200000, the exactly-once comparison's backlog), TOKENGATE_BENCH_ONLY (words of the runs;
//! "peer" for the hand-written peer's). The peer (`benches/peer.py`, Python confluent-kafka +
//! PyJWT + redis-py) runs last on the same broker and Redis; scripts/setup installs its packages.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header as KHeader, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokengate::gate::Gate;
use tokengate::verify::Verifier;
use tokio_util::sync::CancellationToken;

mod common;

deployed_allocator!();
const PARTITIONS: i32 = 4;

#[derive(Clone, Copy)]
enum Mode {
    /// No verification, messages carrying 10 tokens of this algorithm (the same bytes as the
    /// verified runs of that algorithm).
    PassThrough(Algorithm),
    Verify(Algorithm, Reuse),
    /// Verification with 10 reused tokens on a larger backlog, at least once (`false`) or exactly
    /// once (`true`, default transaction size): transactions commit in bursts of thousands, so
    /// the middle 80% of arrivals must span many of them.
    Delivery(Algorithm, bool),
}

#[derive(Clone, Copy, PartialEq)]
enum Reuse {
    /// A pool of 10 tokens, as 10 long-lived producers would send.
    Pool,
    /// A new token on every message.
    EveryMessageNew,
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::PassThrough(a) => format!("pass-through, {a:?} tokens (no verification)"),
            Mode::Verify(a, Reuse::Pool) => format!("{a:?}, 10 reused tokens"),
            Mode::Verify(a, Reuse::EveryMessageNew) => format!("{a:?}, every token new"),
            Mode::Delivery(a, false) => format!("{a:?}, 10 reused tokens, delivery at least once"),
            Mode::Delivery(a, true) => format!("{a:?}, 10 reused tokens, delivery exactly once"),
        }
    }
}

/// The Redis of the bench (the gate's revocation list, mirrored; the peer's, per message).
fn redis_url() -> String {
    std::env::var("TOKENGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config(bootstrap: &str, topic_in: &str, topic_out: &str, topic_dlq: &str, group: &str, delivery: &str) -> String {
    format!(
        r#"
shutdown_timeout = "10s"
[admin]
listen = ""
[redis]
url = "{redis}"
prefix = "tgbench:{group}:"
[kafka.main]
bootstrap_servers = "{bootstrap}"
{issuers}
[routes.bench]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
source = {{ kafka = {{ cluster = "main", topics = ["{topic_in}"], group = "{group}", properties = {{ "fetch.wait.max.ms" = "10" }} }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{topic_out}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{topic_dlq}" }} }}
delivery = "{delivery}"
"#,
        issuers = common::issuer_toml(),
        redis = redis_url(),
    )
}

/// The hand-written peer (`benches/peer.py`) on a backlog of `n` messages with RS256 tokens:
/// its throughput and CPU per message, as a row of the table.
async fn peer(bootstrap: &str, reuse: Reuse, n: usize) -> Result {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (tin, tout) = (format!("peer-in-{id}"), format!("peer-ok-{id}"));
    create(bootstrap, &[&tin, &tout]).await;
    let toks = common::mint(Algorithm::RS256, if reuse == Reuse::Pool { 10 } else { n });
    produce(&producer(bootstrap), &tin, &toks, n, None).await;
    let python = std::env::var("TOKENGATE_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.tokengate/venv/bin/python").into());
    let pem = common::keys_dir().join("rsa.pub.pem");
    let out = tokio::process::Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peer.py"))
        .args([bootstrap, &tin, &tout, &format!("peer-{id}"), &n.to_string()])
        .arg(&pem)
        .args([redis_url(), format!("tgbench:peer-{id}:")])
        .output()
        .await
        .unwrap_or_else(|e| panic!("{python} (scripts/setup installs it): {e}"));
    assert!(out.status.success(), "peer.py failed: {}", String::from_utf8_lossy(&out.stderr));
    delete(bootstrap, &[&tin, &tout]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peer.py prints one JSON line");
    let label = match reuse {
        Reuse::Pool => "hand-written peer (Python), RS256, 10 reused tokens",
        Reuse::EveryMessageNew => "hand-written peer (Python), RS256, every token new",
    };
    Result {
        label: label.into(),
        alg: Some(Algorithm::RS256),
        msgs_per_sec: v["msgs_per_sec"].as_f64().unwrap(),
        cpu_us_per_msg: v["cpu_secs"].as_f64().unwrap() * 1e6 / n as f64,
        broker_cpu_us_per_msg: None,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
    }
}

async fn create(bootstrap: &str, names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let new: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
}

/// Deletes a run's topics: a full bench writes several GB, and the broker keeps a topic's
/// records for a week (a bench run after run filled the disk).
async fn delete(bootstrap: &str, names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    for r in admin.delete_topics(names, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", bootstrap).set("batch.num.messages", "10000").create().unwrap()
}

async fn produce(p: &FutureProducer, topic: &str, tokens: &[String], n: usize, rate: Option<f64>) {
    let payload = vec![b'x'; 256];
    let start = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / r);
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(w).await;
            }
        }
        let bearer = format!("Bearer {}", tokens[i % tokens.len()]);
        let key = format!("key-{}", i % 100);
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        loop {
            let rec =
                FutureRecord::to(topic).key(&key).payload(&payload).timestamp(now_ms).headers(
                    OwnedHeaders::new().insert(KHeader { key: "authorization", value: Some(bearer.as_bytes()) }),
                );
            match p.send_result(rec) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

#[derive(Clone)]
struct Result {
    label: String,
    /// The algorithm of the run's tokens (the peer's: RS256).
    alg: Option<Algorithm>,
    msgs_per_sec: f64,
    /// Process CPU microseconds per message while the backlog drains.
    cpu_us_per_msg: f64,
    /// The broker's CPU microseconds per message meanwhile, when its process is known.
    broker_cpu_us_per_msg: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat` (ticks of 10 ms).
fn cpu_secs() -> f64 {
    proc_cpu_secs("self").unwrap_or(0.0)
}

/// The broker's process on this machine, for its CPU per message: `TOKENGATE_BENCH_BROKER_PID`,
/// else the project's own broker (scripts/setup's PID file) when the bench runs against it.
fn broker_pid(bootstrap: &str) -> Option<String> {
    if let Ok(pid) = std::env::var("TOKENGATE_BENCH_BROKER_PID") {
        return Some(pid);
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tokengate/kafka/broker.pid");
    let pid = std::fs::read_to_string(file).ok().filter(|_| bootstrap == "127.0.0.1:9092")?;
    Some(pid.trim().to_owned()).filter(|p| proc_cpu_secs(p).is_some())
}

/// CPU seconds (user + system) of process `pid` ("self" for this one), in ticks of 10 ms.
fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((ticks(11) + ticks(12)) / 100.0) // utime, stime: fields 14 and 15 of the whole line
}

/// This thread's CPU time in seconds, to the nanosecond (`/proc/thread-self/schedstat`; the
/// process's `/proc/self/stat` counts in 10 ms ticks, too coarse for a few thousand decodes).
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

/// CPU µs of one `jsonwebtoken::decode` of a token of `alg` (each token different, the key
/// parsed once, signature, `iss`, `aud` and `exp` checked), on this thread: the raw verification
/// cost that a new token's CPU per message is held against.
fn raw_verify_us(alg: Algorithm) -> f64 {
    // At least about 50 ms of work (RSA signing, ~1 ms a token, bounds the RS256 pool).
    let tokens = common::mint(alg, if alg == Algorithm::RS256 { 2000 } else { 20_000 });
    let pem = |name: &str| common::key_file(name);
    let key = match alg {
        Algorithm::HS256 => jsonwebtoken::DecodingKey::from_secret(common::SECRET.as_bytes()),
        Algorithm::RS256 => jsonwebtoken::DecodingKey::from_rsa_pem(&pem("rsa.pub.pem")).unwrap(),
        Algorithm::ES256 => jsonwebtoken::DecodingKey::from_ec_pem(&pem("p256.pub.pem")).unwrap(),
        other => panic!("no raw bench for {other:?}"),
    };
    let mut v = jsonwebtoken::Validation::new(alg);
    v.set_issuer(&["https://idp.bench"]);
    v.set_audience(&["tokengate"]);
    let cpu0 = thread_cpu_secs();
    for t in &tokens {
        jsonwebtoken::decode::<serde_json::Value>(t, &key, &v).unwrap();
    }
    (thread_cpu_secs() - cpu0) * 1e6 / tokens.len() as f64
}

async fn run(bootstrap: &str, mode: Mode, n: usize, latency_n: usize) -> Result {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (tin, tout, tdlq) = (format!("bench-in-{id}"), format!("bench-ok-{id}"), format!("bench-dlq-{id}"));
    create(bootstrap, &[&tin, &tout, &tdlq]).await;
    let toks = match mode {
        Mode::PassThrough(a) => common::mint(a, 10),
        Mode::Verify(a, Reuse::Pool) | Mode::Delivery(a, _) => common::mint(a, 10),
        Mode::Verify(a, Reuse::EveryMessageNew) => common::mint(a, n + latency_n),
    };
    let p = producer(bootstrap);
    eprintln!("{}: producing {n} messages", mode.label());
    // Throughput: a backlog of n messages, drained by the gate.
    produce(&p, &tin, &toks[..toks.len().min(n)], n, None).await;
    // Count arrivals on the trusted topic as a downstream reader sees them; time from the first
    // to the last arrival.
    let counter: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("count-{id}"))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    counter.subscribe(&[tout.as_str()]).unwrap();
    // Join before the gate starts, so arrivals are timed as the gate publishes them.
    while counter.assignment().map_or(0, |a| a.count()) == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(100), counter.recv()).await;
    }
    let delivery = if matches!(mode, Mode::Delivery(_, true)) { "exactly_once" } else { "at_least_once" };
    let text = config(bootstrap, &tin, &tout, &tdlq, &format!("g-{id}"), delivery);
    let mut s = tokengate::config::parse(&text, &[], Path::new(".")).unwrap_or_else(|e| panic!("{e:?}"));
    let cancel = CancellationToken::new();
    let broker = broker_pid(bootstrap);
    let broker_start = broker.as_deref().and_then(proc_cpu_secs);
    let cpu_start = cpu_secs();
    let gate = match mode {
        Mode::PassThrough(_) => {
            Arc::new(Gate::pass_through(Arc::new(Verifier::new(std::mem::take(&mut s.issuers), &s.cache))))
        }
        Mode::Verify(..) | Mode::Delivery(..) => tokengate::app::build_gate(&mut s, None, &cancel).await.unwrap(),
    };
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { tokengate::app::run_routes(&s, gate, cancel).await }
    });
    eprintln!("{}: gate started", mode.label());
    // Throughput over the middle 80% of arrivals: start-up and the last batches are left out.
    let (lo, hi) = (n / 10, n - n / 10);
    let (mut seen, mut t_lo) = (0usize, None);
    let mut t_hi = Instant::now();
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(60), counter.recv())
            .await
            .expect("trusted topic stalled")
            .unwrap();
        drop(m);
        seen += 1;
        if seen == lo {
            t_lo = Some(Instant::now());
        }
        if seen == hi {
            t_hi = Instant::now();
        }
    }
    let msgs_per_sec = (hi - lo) as f64 / t_hi.duration_since(t_lo.unwrap()).as_secs_f64().max(1e-3);
    let cpu_us_per_msg = (cpu_secs() - cpu_start) * 1e6 / n as f64;
    let broker_cpu_us_per_msg = match (broker.as_deref().and_then(proc_cpu_secs), broker_start) {
        (Some(end), Some(start)) => Some((end - start) * 1e6 / n as f64),
        _ => None,
    };
    drop(counter);
    eprintln!("{}: drained at {msgs_per_sec:.0} msg/s", mode.label());
    // Added latency: a steady 1000 msg/s stream, measured from produce time to trusted arrival.
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("lat-{id}"))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    c.subscribe(&[tout.as_str()]).unwrap();
    // Join the group before producing, so no message is missed.
    while c.assignment().map_or(0, |a| a.count()) == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(100), c.recv()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lat_tokens = if toks.len() > n { toks[n..].to_vec() } else { toks.clone() };
    let producing = tokio::spawn({
        let (p, tin) = (p.clone(), tin.clone());
        async move { produce(&p, &tin, &lat_tokens, latency_n, Some(1000.0)).await }
    });
    let mut lat = Vec::with_capacity(latency_n);
    while lat.len() < latency_n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv()).await.expect("latency stream stalled").unwrap();
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        lat.push((now_ms - m.timestamp().to_millis().unwrap()) as f64);
    }
    producing.await.unwrap();
    cancel.cancel();
    task.await.unwrap().unwrap();
    delete(bootstrap, &[&tin, &tout, &tdlq]).await;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    let alg = match mode {
        Mode::PassThrough(a) | Mode::Verify(a, _) | Mode::Delivery(a, _) => Some(a),
    };
    Result {
        label: mode.label(),
        alg,
        msgs_per_sec,
        cpu_us_per_msg,
        broker_cpu_us_per_msg,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

/// The baseline of `results[i]`: the faster of the pass-through runs with tokens of its
/// algorithm last before it (or itself) and first after it.
fn baseline(results: &[Result], i: usize) -> Result {
    let alg = results[i].alg;
    let pass = |r: &&Result| r.label.starts_with("pass-through") && r.alg == alg;
    let before = results[..=i].iter().rev().find(pass);
    let after = results[i + 1..].iter().find(pass);
    before.into_iter().chain(after).max_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec)).cloned().unwrap_or(
        Result {
            label: String::new(),
            alg,
            msgs_per_sec: f64::NAN,
            cpu_us_per_msg: f64::NAN,
            broker_cpu_us_per_msg: None,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
        },
    )
}

/// Reused tokens against their baselines, one column per round: the spread the 90% target is
/// held to.
fn print_reused_spread(results: &[Result]) {
    let reused: Vec<(usize, &Result)> =
        results.iter().enumerate().filter(|(_, r)| r.label.ends_with("10 reused tokens")).collect();
    if reused.is_empty() {
        return;
    }
    println!();
    println!("Reused tokens, % of the pass-through baseline in each round (CPU µs/msg over the baseline's):");
    println!(
        "| algorithm | rounds | min | median | max | CPU over pass-through, µs/msg (median) | broker CPU over pass-through, µs/msg (median) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
        let rows: Vec<(f64, f64, f64)> = reused
            .iter()
            .filter(|(_, r)| r.alg == Some(alg))
            .map(|&(i, r)| {
                let b = baseline(results, i);
                let broker = match (r.broker_cpu_us_per_msg, b.broker_cpu_us_per_msg) {
                    (Some(r), Some(b)) => r - b,
                    _ => f64::NAN,
                };
                (100.0 * r.msgs_per_sec / b.msgs_per_sec, r.cpu_us_per_msg - b.cpu_us_per_msg, broker)
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let each: Vec<String> = rows.iter().map(|(p, _, _)| format!("{p:.0}%")).collect();
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let pct: Vec<f64> = rows.iter().map(|r| r.0).collect();
        println!(
            "| {alg:?} | {} | {:.0}% | {:.0}% | {:.0}% | {:+.1} | {:+.1} |",
            each.join(", "),
            pct.iter().copied().fold(f64::INFINITY, f64::min),
            median(pct.clone()),
            pct.iter().copied().fold(0.0, f64::max),
            median(rows.iter().map(|r| r.1).collect()),
            median(rows.iter().map(|r| r.2).collect())
        );
    }
}

#[tokio::main]
async fn main() {
    common::set_secret_env();
    tokengate::telemetry::init_logs();
    let bootstrap = std::env::var("TOKENGATE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    assert!(
        std::net::TcpStream::connect(&bootstrap).is_ok(),
        "Apache Kafka is required at {bootstrap} (scripts/setup starts it)"
    );
    let n: usize = std::env::var("TOKENGATE_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    // Each algorithm against a pass-through run of the same messages (an RS256 token is twice
    // the bytes of an HS256 one). The pass-through runs come again at the end: the broker warms
    // up over a run, so each baseline is measured twice and the faster is used (the conservative
    // choice for the percentages).
    let algs = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256];
    // TOKENGATE_BENCH_ROUNDS (default 1): the runs of every algorithm, repeated; each verified
    // run is held against the pass-through runs just before and just after it.
    let rounds: usize = std::env::var("TOKENGATE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let modes: Vec<Mode> = (0..rounds)
        .flat_map(|_| algs)
        .flat_map(|a| [Mode::PassThrough(a), Mode::Verify(a, Reuse::Pool), Mode::Verify(a, Reuse::EveryMessageNew)])
        .chain([true, false, true, false, true, false].map(|eo| Mode::Delivery(Algorithm::RS256, eo)))
        .chain(algs.iter().map(|&a| Mode::PassThrough(a)))
        .collect();
    // TOKENGATE_BENCH_ONLY=RS256,new (say) runs only the runs whose label has every word given
    // (for profiling one run); the table's percentages then need a pass-through run among them.
    // A word with a leading '-' leaves out the runs whose label has it ("-once": no delivery runs).
    let only = common::only_words();
    let modes: Vec<Mode> = modes.into_iter().filter(|m| only.iter().all(|w| common::keeps(w, &m.label()))).collect();
    // A first run of a process pays for its start (memory first touched, connections, the
    // broker's new topics): a pass-through run that is not reported warms both up.
    if !modes.is_empty() {
        eprintln!("warm-up: one pass-through run, not reported");
        run(&bootstrap, Mode::PassThrough(Algorithm::HS256), n.min(50_000), 200).await;
    }
    let mut results = Vec::new();
    // TOKENGATE_BENCH_DELIVERY_MESSAGES (default 200000): the backlog of the delivery runs.
    let n_delivery: usize =
        std::env::var("TOKENGATE_BENCH_DELIVERY_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    for m in modes {
        let backlog = if matches!(m, Mode::Delivery(..)) { n_delivery } else { n };
        let r = run(&bootstrap, m, backlog, 2000).await;
        eprintln!("{}: {:.0} msg/s", r.label, r.msgs_per_sec);
        results.push(r);
    }
    // The peer runs with no words, with "peer", or with only exclusions other than "-peer".
    if only.iter().any(|w| w == "peer") || only.iter().all(|w| w.starts_with('-') && w != "-peer") {
        for reuse in [Reuse::Pool, Reuse::EveryMessageNew] {
            let r = peer(&bootstrap, reuse, n).await;
            eprintln!("{}: {:.0} msg/s", r.label, r.msgs_per_sec);
            results.push(r);
        }
    }
    // A run's baseline: the faster of the pass-through runs with tokens of its algorithm just
    // before it (or itself) and just after it, so that a slow hour of the host falls on both.
    let base = |i: usize| baseline(&results, i);
    println!(
        "Kafka end to end through {bootstrap}: {n} backlog messages (256 B, 4 partitions) per run; throughput over"
    );
    println!("the middle 80% of arrivals on the trusted topic (a reader joined before the gate started);");
    println!(
        "latency = produce time to arrival on the trusted topic, 2000 messages at 1000 msg/s
(producers at librdkafka's default linger.ms 5, fetch.wait.max.ms 10 on both consumers)."
    );
    println!("Percentages and added latency are against the faster of the pass-through runs carrying tokens");
    println!("of the same algorithm (the same message bytes) just before and just after the run, after one");
    println!("unreported pass-through run that warms up the process and the broker.");
    println!("CPU/msg = this process's CPU time while the gate drains the backlog / messages (the gate,");
    println!("plus the reader counting arrivals, the same in every run); broker CPU/msg = the broker process's");
    println!("meanwhile (when it runs on this machine: the project's own, or TOKENGATE_BENCH_BROKER_PID).");
    println!(
        "| run | msg/s | % of pass-through | CPU µs/msg | broker CPU µs/msg | p50 ms | p99 ms | p50 added ms | p99 added ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |v: f64, signed: bool| match (v.is_nan(), signed) {
        (true, _) => "-".to_owned(),
        (false, true) => format!("{v:+.1}"),
        (false, false) => format!("{v:.1}"),
    };
    for (i, r) in results.iter().enumerate() {
        let base = base(i);
        println!(
            "| {} | {:.0} | {:.0}% | {:.1} | {} | {} | {} | {} | {} |",
            r.label,
            r.msgs_per_sec,
            100.0 * r.msgs_per_sec / base.msgs_per_sec,
            r.cpu_us_per_msg,
            r.broker_cpu_us_per_msg.map_or("-".to_owned(), |b| format!("{b:.1}")),
            ms(r.p50_ms, false),
            ms(r.p99_ms, false),
            ms(r.p50_ms - base.p50_ms, true),
            ms(r.p99_ms - base.p99_ms, true)
        );
    }
    print_reused_spread(&results);
    // Exactly once against at least once: the same algorithm, tokens and route, in alternation.
    let pairs: Vec<(&Result, &Result)> = results
        .iter()
        .filter(|r| r.label.ends_with("exactly once"))
        .zip(results.iter().filter(|r| r.label.ends_with("at least once")))
        .collect();
    if !pairs.is_empty() {
        println!();
        println!("Exactly once against at least once, {n_delivery} backlog messages per run, the default transaction");
        println!("size (5000 records or 100 ms), each exactly-once run followed by its at-least-once run:");
        println!(
            "| pair | at least once msg/s | exactly once msg/s | ratio | CPU µs/msg (ALO / EO) | p50 ms (ALO / EO) | p99 ms (ALO / EO) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for (i, (eo, alo)) in pairs.iter().enumerate() {
            println!(
                "| {} | {:.0} | {:.0} | {:.0}% | {:.1} / {:.1} | {} / {} | {} / {} |",
                i + 1,
                alo.msgs_per_sec,
                eo.msgs_per_sec,
                100.0 * eo.msgs_per_sec / alo.msgs_per_sec,
                alo.cpu_us_per_msg,
                eo.cpu_us_per_msg,
                ms(alo.p50_ms, false),
                ms(eo.p50_ms, false),
                ms(alo.p99_ms, false),
                ms(eo.p99_ms, false)
            );
        }
    }
    // New tokens against their signature's cost: pass-through CPU + 1.2 x raw verification + 2 µs.
    let new_runs: Vec<(usize, &Result)> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.label.contains("every token new") && !r.label.starts_with("hand-written"))
        .collect();
    if new_runs.is_empty() {
        return;
    }
    println!();
    println!("Every token new, against the raw verification cost measured in this process after the runs:");
    println!(
        "| algorithm | raw jsonwebtoken::decode µs | pass-through CPU µs/msg | target µs/msg | measured CPU µs/msg | met |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    for (i, r) in new_runs {
        let alg = r.alg.expect("a verified run has an algorithm");
        let base = base(i);
        let raw = raw_verify_us(alg);
        let target = base.cpu_us_per_msg + 1.2 * raw + 2.0;
        let met = if r.cpu_us_per_msg <= target { "yes" } else { "no" };
        println!("| {alg:?} | {raw:.1} | {:.1} | {target:.1} | {:.1} | {met} |", base.cpu_us_per_msg, r.cpu_us_per_msg);
    }
}
