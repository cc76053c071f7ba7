//! AMQP -> AMQP throughput with publisher confirms and manual acks, with verification versus a
//! pass-through run of the same pipeline, in the same process and the same run.
//!
//! cargo bench --bench amqp      (needs RabbitMQ at TOKENGATE_TEST_AMQP or amqp://127.0.0.1:5672)
//! Optional: TOKENGATE_BENCH_MESSAGES (default 20000).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokengate::gate::Gate;
use tokengate::verify::Verifier;
use tokio_util::sync::CancellationToken;

mod common;

fn config(url: &str, q_in: &str, ex_out: &str, ex_dlq: &str) -> String {
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
source = {{ amqp = {{ broker = "rabbit", queue = "{q_in}", declare = true, prefetch = 1000 }} }}
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

async fn run(url: &str, ch: &Channel, label: &str, alg: Option<Algorithm>, n: usize) -> f64 {
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
    let toks = common::mint(alg.unwrap_or(Algorithm::HS256), 10);
    let body = vec![b'x'; 256];
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let mut h = FieldTable::default();
        h.insert(
            "authorization".into(),
            AMQPValue::LongString(LongString::from(format!("Bearer {}", toks[i % toks.len()]).into_bytes())),
        );
        let props =
            BasicProperties::default().with_headers(h).with_delivery_mode(2).with_message_id(format!("m{i}").into());
        confirms.push(
            ch.basic_publish("".into(), q_in.as_str().into(), BasicPublishOptions::default(), &body, props)
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }
    let mut s = tokengate::config::parse(&config(url, &q_in, &ex_out, &ex_dlq), &[], Path::new("."))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let cancel = CancellationToken::new();
    let gate = match alg {
        None => Arc::new(Gate::pass_through(Arc::new(Verifier::new(std::mem::take(&mut s.issuers), &s.cache)))),
        Some(_) => tokengate::app::build_gate(&mut s, None, &cancel).await.unwrap(),
    };
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { tokengate::app::run_routes(&s, gate, cancel).await }
    });
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
    let (t0, c0) = t_lo.unwrap();
    let rate = f64::from(t_hi.1 - c0) / t_hi.0.duration_since(t0).as_secs_f64().max(1e-3);
    cancel.cancel();
    task.await.unwrap().unwrap();
    eprintln!("{label}: {rate:.0} msg/s");
    rate
}

#[tokio::main]
async fn main() {
    common::set_secret_env();
    tokengate::telemetry::init_logs();
    let url = std::env::var("TOKENGATE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n: usize = std::env::var("TOKENGATE_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is required at {url}: {e}"));
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let runs: [(&str, Option<Algorithm>); 4] = [
        ("pass-through (no verification)", None),
        ("HS256, 10 reused tokens", Some(Algorithm::HS256)),
        ("RS256, 10 reused tokens", Some(Algorithm::RS256)),
        ("ES256, 10 reused tokens", Some(Algorithm::ES256)),
    ];
    let mut results = Vec::new();
    for (label, alg) in runs {
        results.push((label, run(&url, &ch, label, alg, n).await));
    }
    println!("AMQP -> AMQP through RabbitMQ at {url}: {n} persistent 256 B messages per run, prefetch 1000,");
    println!("publisher confirms + mandatory on the destination, manual acks after confirm; rate over the middle 80%.");
    println!("| run | msg/s | % of pass-through |");
    println!("|---|---:|---:|");
    for (label, rate) in &results {
        println!("| {label} | {rate:.0} | {:.0}% |", 100.0 * rate / results[0].1);
    }
}
