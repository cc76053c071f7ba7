//! The producer examples (examples/producers: Python, Node.js, Java, Go; examples/producer.rs)
//! run against the test ground: each attaches a token to a message, and every message reaches
//! the trusted destination with the identity the gate verified. scripts/setup builds them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::amqp::{RABBIT, amqp_url, channel, config, drain, hdr, topology};
use crate::kafka::{Running, consume, create_topics, header, kafka, topics};
use crate::util::*;

/// A token of `sub` valid now.
fn live_token(sub: &str) -> String {
    let now = tokengate::verify::unix_now();
    token(Algorithm::HS256, json!({"sub": sub, "iat": now - 5, "exp": now + 600}))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Runs one producer example; fails with its output if it fails or is missing.
fn run(name: &str, program: &str, args: &[&str], dir: &Path, env: &[(&str, String)]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("{name}: cannot run {program} ({e}); scripts/setup builds the examples"));
    assert!(
        out.status.success(),
        "{name} failed ({}): {}{}\n(scripts/setup builds the examples)",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_producer_example_gets_its_messages_through_with_its_identity() {
    let _shared = RABBIT.read().await;
    let bs = kafka();
    let t = topics("producers");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "producers").await;
    let text = config(&n, 10, None)
        + &format!(
            r#"
[kafka.main]
bootstrap_servers = "{bs}"
[routes.orders-kafka]
issuers = ["idp"]
source = {{ kafka = {{ cluster = "main", topics = ["{}"], group = "producers-{}" }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{}" }} }}
"#,
            t.untrusted,
            uuid::Uuid::new_v4().simple(),
            t.trusted,
            t.dead_letter
        );
    let gate = Running::start(&text).await;

    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ex = examples();
    let producers = ex.join("producers");
    let rust = PathBuf::from(env!("CARGO_BIN_EXE_tokengate")).with_file_name("examples").join("producer");
    let kafka_env =
        |who: &str| vec![("BOOTSTRAP", bs.clone()), ("TOPIC", t.untrusted.clone()), ("TOKEN", live_token(who))];
    let amqp_env =
        |who: &str| vec![("AMQP_URL", amqp_url()), ("QUEUE", n.queue_in.clone()), ("TOKEN", live_token(who))];
    let payload = |who: &str| json!({"from": who}).to_string();
    let kafka_producers: [(&str, &str, Vec<&str>, PathBuf); 5] = [
        ("python-kafka", python.as_str(), vec!["kafka_producer.py"], producers.join("python")),
        ("node-kafka", "node", vec!["kafka-producer.mjs"], producers.join("node")),
        ("java-kafka", "java", vec!["-cp", "target/classes:target/lib/*", "example.Producer"], producers.join("java")),
        ("go-kafka", "./producer", vec![], producers.join("go")),
        ("rust-kafka", rust.to_str().unwrap(), vec![], ex.clone()),
    ];
    for (who, program, args, dir) in &kafka_producers {
        let p = payload(who);
        let args: Vec<&str> = args.iter().copied().chain([p.as_str()]).collect();
        run(who, program, &args, dir, &kafka_env(who));
    }
    let amqp_producers = [
        ("python-amqp", python.as_str(), "amqp_producer.py", producers.join("python")),
        ("node-amqp", "node", "amqp-producer.mjs", producers.join("node")),
    ];
    for (who, program, script, dir) in &amqp_producers {
        run(who, program, &[script, &payload(who)], dir, &amqp_env(who));
    }

    let got: BTreeSet<(String, String)> = consume(&bs, &t.trusted, kafka_producers.len(), 60)
        .await
        .iter()
        .map(|m| {
            (
                header(m, "x-tokengate-sub").unwrap_or_default(),
                String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap()).into_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> =
        kafka_producers.iter().map(|(who, ..)| (who.to_string(), payload(who))).collect();
    assert_eq!(got, want, "each Kafka producer's message, with the identity it was verified as");
    let got: BTreeSet<(String, String)> = drain(&ch, &n.q_ok, amqp_producers.len(), 60)
        .await
        .iter()
        .map(|d| (hdr(d, "x-tokengate-sub").unwrap_or_default(), String::from_utf8_lossy(&d.data).into_owned()))
        .collect();
    let want: BTreeSet<(String, String)> =
        amqp_producers.iter().map(|(who, ..)| (who.to_string(), payload(who))).collect();
    assert_eq!(got, want, "each AMQP producer's message, with the identity it was verified as");
    gate.stop().await;
}
