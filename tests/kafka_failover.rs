//! What only a real Apache Kafka makes possible: gate processes in one consumer group killed and
//! joined mid-stream, the broker stopped and started mid-stream, and a crash-restart with static
//! group membership. A third-party consumer (Python confluent-kafka, `isolation.level=read_committed`,
//! tests/fixtures/fates.py) reads the trusted and dead-letter topics and every message's fate is counted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::kafka::{Topics, auth, create_topics, kafka, topics};
use crate::util::*;

/// Whether a broker at `bootstrap` answers a metadata request within `secs`.
fn answers(bootstrap: &str, secs: u64) -> bool {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if c.fetch_metadata(None, Duration::from_secs(2)).is_ok_and(|m| !m.brokers().is_empty()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

/// A Kafka broker of the test's own (`scripts/kafka/broker run`), to stop and start without
/// disturbing the shared one.
pub struct OwnKafka {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnKafka {
    pub fn start() -> OwnKafka {
        let mut k = OwnKafka { port: free_port(), dir: tempfile::tempdir().unwrap(), child: None };
        k.start_again();
        k
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Starts the broker on its data (formatting it the first time) and waits until it answers.
    pub fn start_again(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/broker");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log()).unwrap();
        let child = Command::new(&script)
            .args(["run", self.dir.path().to_str().unwrap(), &self.port.to_string()])
            .env("TOKENGATE_KAFKA_HEAP", "384m")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} is required ({e}); scripts/setup resolves Kafka", script.display()));
        self.child = Some(child);
        if !answers(&self.bootstrap(), 90) {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!("own Kafka broker on {} did not answer within 90s; log tail (newest first):\n{tail}", self.port);
        }
    }

    /// [`Self::stop`] off the async workers.
    pub async fn stopped(mut self) -> OwnKafka {
        tokio::task::spawn_blocking(move || {
            self.stop();
            self
        })
        .await
        .unwrap()
    }

    /// [`Self::start_again`] off the async workers.
    pub async fn started(mut self) -> OwnKafka {
        tokio::task::spawn_blocking(move || {
            self.start_again();
            self
        })
        .await
        .unwrap()
    }

    /// Stops the broker as an operator would (SIGTERM: a controlled shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
}

/// A `tokengate run` process with its log in a temp dir.
pub struct GateProcess {
    child: Child,
    dir: tempfile::TempDir,
}

impl GateProcess {
    pub fn spawn(config: &str) -> GateProcess {
        GateProcess::spawn_with_env(config, &[("RUST_LOG", "info")])
    }

    pub fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> GateProcess {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tokengate.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("gate.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("TG_TEST_SECRET", SECRET)
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        GateProcess { child, dir }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gate.log")).unwrap_or_default()
    }

    /// Its config file.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tokengate.toml")
    }

    /// Replaces its config file (read again on SIGHUP).
    pub fn rewrite(&self, config: &str) {
        std::fs::write(self.dir.path().join("tokengate.toml"), config).unwrap();
    }

    /// SIGHUP: reload the config.
    pub fn hup(&self) {
        signal(self.child.id(), "HUP");
    }

    /// SIGKILL: no drain, no commit, no leave-group.
    pub fn kill9(&mut self) {
        signal(self.child.id(), "KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM; asserts a clean exit within the shutdown deadline; returns the whole log.
    pub fn stop(mut self) -> String {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "gate exited with {s:?}; log:\n{}", self.logs());
                return self.logs();
            }
            assert!(Instant::now() < deadline, "gate did not stop within 30s; log:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gate config for one instance: route `route` (it names the instance in `x-tokengate-route`),
/// consumer `properties` (TOML inline-table body), optional `instance_id` and admin port.
pub fn instance_config(
    bs: &str,
    t: &Topics,
    group: &str,
    route: &str,
    properties: &str,
    instance_id: Option<&str>,
    admin: Option<u16>,
) -> String {
    let mut text = String::new();
    if let Some(id) = instance_id {
        text.push_str(&format!("instance_id = \"{id}\"\n"));
    }
    text.push_str(&gate_preamble(None));
    if let Some(port) = admin {
        text = text.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    }
    text.push_str(&format!(
        r#"
[kafka.main]
bootstrap_servers = "{bs}"
[routes.{route}]
issuers = ["idp"]
source = {{ kafka = {{ cluster = "main", topics = ["{in_}"], group = "{group}", properties = {{ {properties} }} }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{ok}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{dlq}" }} }}
"#,
        in_ = t.untrusted,
        ok = t.trusted,
        dlq = t.dead_letter,
    ));
    text
}

/// One message of a stream: payload `key:seq:valid` (or `:invalid`).
#[derive(Clone)]
pub struct Sent {
    pub key: String,
    pub seq: u64,
    pub valid: bool,
}

impl Sent {
    pub fn payload(&self) -> String {
        format!("{}:{}:{}", self.key, self.seq, if self.valid { "valid" } else { "invalid" })
    }
}

/// Produces `n` messages over `keys` keys at about `per_sec`; every tenth has no token or an
/// expired one. Returns what was sent once every message is confirmed by the broker.
pub async fn stream(bs: String, topic: String, n: u64, per_sec: u64, keys: u64) -> Vec<Sent> {
    // Idempotent: retries through a broker outage must not reorder the source topic itself.
    let p: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &bs).set("enable.idempotence", "true").create().unwrap();
    let good = auth(Algorithm::HS256, json!({"exp": tokengate::verify::unix_now() + 3600}));
    let expired = auth(Algorithm::HS256, json!({"exp": tokengate::verify::unix_now() - 3600}));
    let mut sent = Vec::new();
    let mut pending = Vec::new();
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    let tick = Duration::from_millis(10);
    let per_tick = (per_sec / 100).max(1);
    let mut next = tokio::time::Instant::now();
    for i in 0..n {
        let k = i % keys;
        let seq = seqs.entry(k).or_default();
        *seq += 1;
        let s = Sent { key: format!("key-{k}"), seq: *seq, valid: i % 10 != 9 };
        let auth = match (s.valid, i % 20 == 9) {
            (true, _) => good.clone(),
            (false, true) => vec![],
            (false, false) => expired.clone(),
        };
        let mut headers = OwnedHeaders::new();
        for (hk, hv) in &auth {
            headers = headers.insert(Header { key: hk, value: Some(hv.as_bytes()) });
        }
        let payload = s.payload();
        let rec = FutureRecord::to(&topic).key(&s.key).payload(&payload).headers(headers);
        pending.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
        sent.push(s);
        if (i + 1) % per_tick == 0 {
            next += tick;
            tokio::time::sleep_until(next).await;
        }
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).expect("the test producer delivers every message");
    }
    sent
}

#[derive(serde::Deserialize, Debug)]
pub struct Fate {
    pub dest: String,
    pub key: String,
    pub payload: String,
    pub partition: i32,
    pub offset: i64,
    pub route: String,
    pub reason: String,
    /// `x-tokengate-sub`.
    pub sub: String,
    /// `x-tokengate-source-partition` and `-offset`: the source record it was written for.
    #[serde(default)]
    pub source_partition: String,
    #[serde(default)]
    pub source_offset: String,
}

/// Every record on the trusted and dead-letter topics, read by the third-party consumer.
pub async fn fates(bs: &str, t: &Topics, expected: usize, secs: u64) -> Vec<Fate> {
    let (bs, t) = (bs.to_owned(), t.clone());
    tokio::task::spawn_blocking(move || read_fates(&bs, &t, expected, secs)).await.unwrap()
}

fn read_fates(bs: &str, t: &Topics, expected: usize, secs: u64) -> Vec<Fate> {
    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(fixture("fates.py"))
        .args([bs, &t.trusted, &t.dead_letter, &expected.to_string(), &secs.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{python} with confluent-kafka is required ({e}); scripts/test installs it"));
    assert!(out.status.success(), "fates.py failed");
    serde_json::from_slice(&out.stdout).expect("fates.py prints JSON")
}

/// Asserts every sent message's fate: valid ones on the trusted topic (at least once), invalid ones
/// on the dead-letter topic and never on the trusted one, and per-key order on the trusted topic.
/// Returns how many trusted records were duplicates (redeliveries after a crash).
pub fn assert_fates(sent: &[Sent], fates: &[Fate]) -> usize {
    let mut count: HashMap<(&str, &str), usize> = HashMap::new();
    for f in fates {
        *count.entry((f.payload.as_str(), f.dest.as_str())).or_default() += 1;
    }
    let (mut lost, mut leaked, mut misrouted) = (Vec::new(), Vec::new(), Vec::new());
    for s in sent {
        let p = s.payload();
        let ok = count.get(&(p.as_str(), "trusted")).copied().unwrap_or(0);
        let dead = count.get(&(p.as_str(), "dead_letter")).copied().unwrap_or(0);
        match (s.valid, ok, dead) {
            (_, 0, 0) => lost.push(p),
            (false, 1.., _) => leaked.push(p),
            (true, _, 1..) => misrouted.push(p),
            _ => {}
        }
    }
    assert!(lost.is_empty(), "{} lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    assert!(leaked.is_empty(), "{} invalid messages leaked to the trusted topic: {leaked:?}", leaked.len());
    assert!(misrouted.is_empty(), "{} valid messages dead-lettered: {misrouted:?}", misrouted.len());
    // Per key, in partition order: the first arrival of each message follows the key's sequence.
    let mut trusted: Vec<&Fate> = fates.iter().filter(|f| f.dest == "trusted").collect();
    trusted.sort_by_key(|f| (f.partition, f.offset));
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    for f in trusted {
        if !seen.insert(f.payload.as_str()) {
            duplicates += 1;
            continue;
        }
        let seq: u64 = f.payload.split(':').nth(1).unwrap().parse().unwrap();
        let prev = last.insert(f.key.as_str(), seq).unwrap_or(0);
        assert!(seq > prev, "order of {} broken: {seq} after {prev}", f.key);
    }
    for f in fates.iter().filter(|f| f.dest == "dead_letter") {
        assert!(["expired", "missing_token"].contains(&f.reason.as_str()), "dead letter reason {:?}", f.reason);
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_killed_one_joining_mid_stream_lose_and_leak_nothing() {
    let bs = kafka();
    let t = topics("group");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 6).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    // A dead member is noticed after 6 s (the broker's minimum) instead of the default 45 s.
    let props = r#""session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000""#;
    let cfg = |route: &str| instance_config(&bs, &t, &group, route, props, None, None);
    let a = GateProcess::spawn(&cfg("gate_a"));
    let mut b = GateProcess::spawn(&cfg("gate_b"));
    let c = GateProcess::spawn(&cfg("gate_c"));
    tokio::time::sleep(Duration::from_secs(4)).await; // let the three join

    const N: u64 = 4000;
    let producer = tokio::spawn(stream(bs.clone(), t.untrusted.clone(), N, 200, 24));
    tokio::time::sleep(Duration::from_secs(6)).await;
    b.kill9();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let d = GateProcess::spawn(&cfg("gate_d"));
    let sent = producer.await.unwrap();

    let fates = fates(&bs, &t, N as usize, 120).await;
    let duplicates = assert_fates(&sent, &fates);
    let by: HashMap<&str, usize> = fates.iter().fold(HashMap::new(), |mut m, f| {
        *m.entry(f.route.as_str()).or_default() += 1;
        m
    });
    for route in ["gate_a", "gate_b", "gate_c", "gate_d"] {
        assert!(by.get(route).copied().unwrap_or(0) > 0, "{route} did no work: {by:?}");
    }
    eprintln!("fates by instance: {by:?}; {duplicates} redelivered after the SIGKILL");
    for g in [a, c, d] {
        g.stop();
    }
}

/// Polls `/ready` until its status is `want` (true: 200) or `secs` pass; returns the wait.
pub async fn wait_ready(port: u16, want: bool, secs: u64) -> Duration {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let code = http
            .get(format!("http://127.0.0.1:{port}/ready"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if code.as_ref().is_ok_and(|c| (*c == 200) == want) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(secs), "/ready did not become {want} within {secs}s: {code:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_stopped_and_started_mid_stream_loses_nothing_and_ready_tells() {
    let mut broker = tokio::task::spawn_blocking(OwnKafka::start).await.unwrap();
    let bs = broker.bootstrap();
    let t = topics("restart");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 3).await;
    let port = free_port();
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let gate = GateProcess::spawn(&instance_config(&bs, &t, &group, "orders", "", None, Some(port)));
    wait_ready(port, true, 30).await;

    const N: u64 = 3000;
    let producer = tokio::spawn(stream(bs.clone(), t.untrusted.clone(), N, 150, 12));
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker = broker.stopped().await;
    let noticed = wait_ready(port, false, 20).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_ready(port, false, 1).await; // still not ready while the broker is down
    let restarted = Instant::now();
    let broker = broker.started().await;
    let back = wait_ready(port, true, 60).await;
    let sent = producer.await.unwrap();
    let fates = fates(&bs, &t, N as usize, 120).await;
    let duplicates = assert_fates(&sent, &fates);
    eprintln!(
        "not ready {:.1}s after the stop; ready {:.1}s after the restart began ({:.1}s after it answered); {duplicates} duplicates",
        noticed.as_secs_f64(),
        restarted.elapsed().as_secs_f64(),
        back.as_secs_f64()
    );
    gate.stop();
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_killed_and_restarted_is_back_at_work_within_seconds() {
    let bs = kafka();
    let t = topics("static");
    const PARTITIONS: i32 = 4;
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], PARTITIONS).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    // The default session timeout (45 s): a dynamic member's partitions would sit that long.
    let cfg = |id: &str| instance_config(&bs, &t, &group, &format!("gate_{id}"), "", Some(id), None);
    let mut a = GateProcess::spawn(&cfg("a"));
    let b = GateProcess::spawn(&cfg("b"));
    let probe = |tag: &'static str| {
        let (bs, topic) = (bs.clone(), t.untrusted.clone());
        async move {
            let p: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bs).create().unwrap();
            let good = auth(Algorithm::HS256, json!({}));
            for part in 0..PARTITIONS {
                let payload = format!("{tag}-{part}");
                let h = OwnedHeaders::new().insert(Header { key: "authorization", value: Some(good[0].1.as_bytes()) });
                let rec = FutureRecord::to(&topic).partition(part).key("probe").payload(&payload).headers(h);
                p.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
            }
        }
    };
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&t.trusted]).unwrap();
    // Waits until every partition's probe `tag` reached the trusted topic; returns the routes that did it.
    let arrived = |tag: &'static str, secs: u64| {
        let reader = &reader;
        async move {
            let mut got = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(secs);
            while got.len() < PARTITIONS as usize {
                assert!(Instant::now() < deadline, "probes {tag}: {} of {PARTITIONS} within {secs}s", got.len());
                if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await {
                    let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                    if payload.starts_with(tag) {
                        got.insert(payload, crate::kafka::header(&m.detach(), "x-tokengate-route").unwrap_or_default());
                    }
                }
            }
            got
        }
    };
    // Until the group settled with partitions on both instances (b may join first and take all).
    let mut settled = false;
    for round in ["warm0", "warm1", "warm2", "warm3", "warm4", "warm5", "warm6", "warm7", "warm8", "warm9"] {
        probe(round).await;
        let routes = arrived(round, 60).await;
        if routes.values().any(|r| r == "gate_a") && routes.values().any(|r| r == "gate_b") {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(settled, "the group never spread over both instances:\n{}", a.logs());

    a.kill9();
    let restarted = Instant::now();
    let a2 = GateProcess::spawn(&cfg("a"));
    probe("after").await;
    let routes = arrived("after", 40).await;
    let took = restarted.elapsed();
    eprintln!("every partition back at work {:.1}s after the crash-restart: {routes:?}", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(15),
        "partitions idle for {:.1}s after a crash-restart of a static member",
        took.as_secs_f64()
    );
    assert!(a2.logs().contains("partitions assigned") || routes.values().any(|r| r == "gate_a"));
    a2.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_keeps_failing_is_named_by_ready_then_ends_the_process_non_zero() {
    let bs = kafka();
    let t = topics("supervised");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let port = free_port();
    // A valid config (check-config passes it) whose consumer cannot be created while its CA
    // file is missing: the route task fails each time it starts.
    let props = r#""security.protocol" = "ssl", "ssl.ca.location" = "/nonexistent/tokengate-test-ca.pem""#;
    let text = format!("max_route_failures = 2\n{}", instance_config(&bs, &t, "g", "broken", props, None, Some(port)));
    let mut gate = GateProcess::spawn(&text);
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut named = None;
    let status = loop {
        if let Some(s) = gate.child.try_wait().unwrap() {
            break s;
        }
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/ready")).send().await
            && r.status() == 503
        {
            let body: serde_json::Value = r.json().await.unwrap();
            if let Some(why) = body["routes"][0]["failed"].as_str() {
                named = Some((body["routes"][0]["route"].clone(), why.to_owned()));
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still running:\n{}", gate.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = gate.logs();
    assert!(!status.success(), "exits non-zero so that an orchestrator restarts it: {status:?}");
    let (route, why) = named.expect("/ready named the failed route while it was restarting");
    assert_eq!(route, "broken");
    assert!(why.contains("ssl.ca.location"), "{why}");
    assert!(logs.contains("route ended unexpectedly; restarting it"), "{logs}");
    assert!(logs.contains("route keeps failing; exiting"), "{logs}");
}
