//! AMQP -> AMQP throughput with publisher confirms and manual acks (the source's default `linger`,
//! and `linger = 0` for comparison), with verification versus a
//! pass-through run of the same pipeline and versus RabbitMQ's own shovel moving the same messages
//! (`ack-mode = on-confirm`), for persistent and transient messages, in the same run; with the CPU
//! per message of this process and of the broker.
//!
//! cargo bench --bench amqp      (needs RabbitMQ at TOKENGATE_TEST_AMQP or amqp://127.0.0.1:5672,
//!                                and `rabbitmq-plugins` on the PATH: it enables rabbitmq_shovel)
//! Optional: TOKENGATE_BENCH_MESSAGES (default 20000).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use jsonwebtoken::Algorithm;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokengate::gate::Gate;
use tokengate::verify::Verifier;
use tokio_util::sync::CancellationToken;

mod common;

deployed_allocator!();

fn config(url: &str, q_in: &str, ex_out: &str, ex_dlq: &str, linger: bool) -> String {
    let linger = if linger { "" } else { ", linger = 0" };
    format!(
        r#"
shutdown_timeout = "10s"
[admin]
listen = ""
[amqp.rabbit]
url = "{url}"
{issuers}
[routes.bench]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
source = {{ amqp = {{ broker = "rabbit", queue = "{q_in}", declare = true, prefetch = 1000{linger} }} }}
trusted = {{ amqp = {{ broker = "rabbit", exchange = "{ex_out}" }} }}
dead_letter = {{ amqp = {{ broker = "rabbit", exchange = "{ex_dlq}" }} }}
"#,
        issuers = common::issuer_toml(),
    )
}

async fn ready(ch: &Channel, q: &str) -> u32 {
    ch.queue_declare(q.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

/// CPU seconds (user + system) of process `pid` ("self" for this one), from `/proc`.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Context switches (voluntary and not) of every thread of this process so far, from `/proc`.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap_or_default())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The RabbitMQ node's process (the Erlang VM), for its CPU time.
fn broker_pid() -> String {
    let out = std::process::Command::new("pgrep").args(["-o", "beam.smp"]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Who moves the messages.
#[derive(Clone, Copy)]
enum Mover {
    /// tokengate: verification with tokens of this algorithm, or pass-through (`None`); with the
    /// source's default `linger` (`true`) or `linger = 0`.
    Gate(Option<Algorithm>, bool),
    /// RabbitMQ's shovel plugin, `ack-mode = on-confirm`.
    Shovel,
}

/// One run's figures.
struct Figures {
    rate: f64,
    /// This process's CPU µs per message (the gate; ~0 for the shovel).
    gate_cpu: f64,
    /// The broker's CPU µs per message.
    broker_cpu: f64,
    /// This process's context switches per message.
    switches: f64,
    /// Publish to arrival on the destination queue at a steady 1,000 msg/s: p50 and p99, ms.
    latency: (f64, f64),
}

/// Publish-to-arrival latency through whatever moves `q_in` to `q_out`, at a steady `rate` for
/// `count` messages (the `sent` header carries the send time): p50 and p99 in ms.
async fn latency(ch: &Channel, q_in: &str, q_out: &str, persistent: bool, count: usize, rate: u64) -> (f64, f64) {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let rx = conn.create_channel().await.unwrap();
    let mut consumer = rx
        .basic_consume(
            q_out.into(),
            "latency".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let origin = Instant::now();
    let receive = tokio::spawn(async move {
        let mut ms = Vec::with_capacity(count);
        while ms.len() < count {
            let d = consumer.next().await.expect("the consumer runs").unwrap();
            let sent = d.properties.headers().as_ref().and_then(|h| match h.inner().get("sent") {
                Some(AMQPValue::LongLongInt(us)) => Some(*us),
                _ => None,
            });
            if let Some(us) = sent {
                ms.push((origin.elapsed().as_micros() as i64 - us) as f64 / 1000.0);
            }
        }
        ms
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let body = vec![b'x'; 256];
    let token = format!("Bearer {}", common::mint(Algorithm::RS256, 1).remove(0));
    for _ in 0..count {
        tick.tick().await;
        let mut h = FieldTable::default();
        h.insert("authorization".into(), AMQPValue::LongString(LongString::from(token.as_bytes().to_vec())));
        h.insert("sent".into(), AMQPValue::LongLongInt(origin.elapsed().as_micros() as i64));
        let props = BasicProperties::default().with_headers(h).with_delivery_mode(if persistent { 2 } else { 1 });
        // The confirm is not awaited: a steady rate, whatever the broker's confirm pace.
        drop(ch.basic_publish("".into(), q_in.into(), BasicPublishOptions::default(), &body, props).await.unwrap());
    }
    let mut ms = tokio::time::timeout(Duration::from_secs(60), receive).await.expect("every message arrives").unwrap();
    let _ = conn.close(200, "done".into()).await;
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    (at(0.50), at(0.99))
}

fn url() -> String {
    std::env::var("TOKENGATE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn run(url: &str, ch: &Channel, label: &str, mover: Mover, persistent: bool, n: usize) -> Figures {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (q_in, ex_out, q_out, ex_dlq) =
        (format!("b-in-{id}"), format!("b-out-x-{id}"), format!("b-out-{id}"), format!("b-dlq-x-{id}"));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(q_in.as_str().into(), durable, FieldTable::default()).await.unwrap();
    for ex in [&ex_out, &ex_dlq] {
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_declare(q_out.as_str().into(), durable, FieldTable::default()).await.unwrap();
    ch.queue_bind(
        q_out.as_str().into(),
        ex_out.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let alg = match mover {
        Mover::Gate(a, _) => a,
        Mover::Shovel => None,
    };
    let toks = common::mint(alg.unwrap_or(Algorithm::HS256), 10);
    let body = vec![b'x'; 256];
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let mut h = FieldTable::default();
        h.insert(
            "authorization".into(),
            AMQPValue::LongString(LongString::from(format!("Bearer {}", toks[i % toks.len()]).into_bytes())),
        );
        let props = BasicProperties::default()
            .with_headers(h)
            .with_delivery_mode(if persistent { 2 } else { 1 })
            .with_message_id(format!("m{i}").into());
        confirms.push(
            ch.basic_publish("".into(), q_in.as_str().into(), BasicPublishOptions::default(), &body, props)
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }
    let broker = broker_pid();
    let (cpu0, broker0, switches0) = (cpu_secs("self"), cpu_secs(&broker), context_switches());
    let cancel = CancellationToken::new();
    let task = match mover {
        Mover::Gate(alg, linger) => {
            let mut s = tokengate::config::parse(&config(url, &q_in, &ex_out, &ex_dlq, linger), &[], Path::new("."))
                .unwrap_or_else(|e| panic!("{e:?}"));
            let gate = match alg {
                None => Arc::new(Gate::pass_through(Arc::new(Verifier::new(std::mem::take(&mut s.issuers), &s.cache)))),
                Some(_) => tokengate::app::build_gate(&mut s, None, &cancel).await.unwrap(),
            };
            let cancel = cancel.clone();
            Some(tokio::spawn(async move { tokengate::app::run_routes(&s, gate, cancel).await }))
        }
        Mover::Shovel => {
            let def = serde_json::json!({
                "src-protocol": "amqp091", "src-uri": "amqp://", "src-queue": q_in, "src-prefetch-count": 1000,
                "dest-protocol": "amqp091", "dest-uri": "amqp://", "dest-exchange": ex_out,
                "ack-mode": "on-confirm",
            });
            rabbitmqctl(&["set_parameter", "shovel", &format!("bench-{id}"), &def.to_string()]);
            None
        }
    };
    // Rate over the middle 80% of the run, read from the destination queue's depth.
    let (lo, hi) = ((n / 10) as u32, (n - n / 10) as u32);
    let mut t_lo = None;
    let t_hi = loop {
        let c = ready(ch, &q_out).await;
        if c >= lo && t_lo.is_none() {
            t_lo = Some((Instant::now(), c));
        }
        if c >= hi {
            break (Instant::now(), c);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (gate_cpu, broker_cpu) =
        ((cpu_secs("self") - cpu0) * 1e6 / f64::from(hi), (cpu_secs(&broker) - broker0) * 1e6 / f64::from(hi));
    let switches = (context_switches() - switches0) as f64 / f64::from(hi);
    let (t0, c0) = t_lo.unwrap();
    let rate = f64::from(t_hi.1 - c0) / t_hi.0.duration_since(t0).as_secs_f64().max(1e-3);
    // Then latency: the backlog drained and cleared, a steady stream through the same mover.
    while ready(ch, &q_out).await < n as u32 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ch.queue_purge(q_out.as_str().into(), QueuePurgeOptions::default()).await.unwrap();
    let latency = latency(ch, &q_in, &q_out, persistent, 2000, 1000).await;
    cancel.cancel();
    match task {
        Some(t) => t.await.unwrap().unwrap(),
        None => rabbitmqctl(&["clear_parameter", "shovel", &format!("bench-{id}")]),
    }
    eprintln!("{label}: {rate:.0} msg/s");
    Figures { rate, gate_cpu, broker_cpu, switches, latency }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl is required");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::main]
async fn main() {
    common::set_secret_env();
    tokengate::telemetry::init_logs();
    let url = url();
    let n: usize = std::env::var("TOKENGATE_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is required at {url}: {e}"));
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let out = std::process::Command::new("rabbitmq-plugins")
        .args(["enable", "rabbitmq_shovel"])
        .output()
        .expect("rabbitmq-plugins is required (it ships with rabbitmq-server)");
    assert!(out.status.success(), "enabling rabbitmq_shovel: {}", String::from_utf8_lossy(&out.stderr));
    let runs: [(&str, Mover, bool); 12] = [
        ("pass-through (no verification), linger 0, persistent", Mover::Gate(None, false), true),
        ("RS256, 10 reused tokens, linger 0, persistent", Mover::Gate(Some(Algorithm::RS256), false), true),
        ("pass-through (no verification), persistent", Mover::Gate(None, true), true),
        ("HS256, 10 reused tokens, persistent", Mover::Gate(Some(Algorithm::HS256), true), true),
        ("RS256, 10 reused tokens, persistent", Mover::Gate(Some(Algorithm::RS256), true), true),
        ("ES256, 10 reused tokens, persistent", Mover::Gate(Some(Algorithm::ES256), true), true),
        ("RabbitMQ shovel (on-confirm), persistent", Mover::Shovel, true),
        ("pass-through (no verification), linger 0, transient", Mover::Gate(None, false), false),
        ("RS256, 10 reused tokens, linger 0, transient", Mover::Gate(Some(Algorithm::RS256), false), false),
        ("pass-through (no verification), transient", Mover::Gate(None, true), false),
        ("RS256, 10 reused tokens, transient", Mover::Gate(Some(Algorithm::RS256), true), false),
        ("RabbitMQ shovel (on-confirm), transient", Mover::Shovel, false),
    ];
    // TOKENGATE_BENCH_ONLY=transient (say) runs only the runs whose label has every word given
    // (comma-separated; '-word' leaves runs out). A shovel run is the baseline of every run of
    // its kind: only the kind ("persistent", "transient") filters it.
    let only = common::only_words();
    let mut results = Vec::new();
    for (label, mover, persistent) in runs {
        let shovel = matches!(mover, Mover::Shovel);
        let wanted = only
            .iter()
            .all(|w| common::keeps(w, label) || (shovel && !matches!(w.as_str(), "persistent" | "transient")));
        if wanted {
            results.push((label, run(&url, &ch, label, mover, persistent, n).await));
        }
    }
    println!("AMQP -> AMQP through RabbitMQ at {url}: {n} 256 B messages per run, prefetch 1000,");
    println!("publisher confirms + mandatory on the destination, manual acks after confirm; rate over the middle 80%.");
    println!("CPU µs/msg: this process (the gate) and the RabbitMQ node (beam.smp), over the same 90% of a run.");
    println!("Context switches: of every thread of this process, per message, over the same part.");
    println!("Latency: publish to arrival on the destination queue, 2,000 messages at 1,000 msg/s after the run.");
    println!(
        "| run | msg/s | % of the shovel | gate CPU µs/msg | broker CPU µs/msg | gate context switches/msg | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let shovel = |kind: &str| {
        results
            .iter()
            .find(|(l, _)| l.starts_with("RabbitMQ shovel") && l.ends_with(kind))
            .map_or(f64::NAN, |(_, f)| f.rate)
    };
    for (label, f) in &results {
        let base = shovel(if label.ends_with("persistent") { "persistent" } else { "transient" });
        println!(
            "| {label} | {:.0} | {:.0}% | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            f.rate,
            100.0 * f.rate / base,
            f.gate_cpu,
            f.broker_cpu,
            f.switches,
            f.latency.0,
            f.latency.1
        );
    }
}
