//! `tokengate dead-letters replay` on the real brokers: dead letters of a key published late are
//! re-driven to their source once the key is there, with their original headers, and pass;
//! nothing is removed from the dead-letter destination unless asked.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use rdkafka::Message as _;
use serde_json::json;

use crate::amqp::{RABBIT, bearer, channel, drain, hdr, props_with, publish, topology};
use crate::kafka::{Running, auth, consume, create_topics, header, kafka, produce, topics};
use crate::kafka_failover::{GateProcess, wait_ready};
use crate::util::*;

/// The test issuer with its HS256 key, and with `rsa` its RS256 key too.
fn issuer(rsa: bool) -> String {
    let mut text = "[issuers.idp]\niss = \"https://idp.test\"\naudiences = [\"tokengate\"]\nalgorithms = [\"HS256\", \"RS256\"]\n[[issuers.idp.keys]]\nkid = \"hs\"\nalgorithms = [\"HS256\"]\nsecret = { env = \"TG_TEST_SECRET\" }\n".to_owned();
    if rsa {
        let pem = fixture("keys/rsa.pub.pem");
        text += &format!(
            "[[issuers.idp.keys]]\nkid = \"rsa\"\nalgorithms = [\"RS256\"]\npem_file = \"{}\"\n",
            pem.display()
        );
    }
    text
}

fn replay(config: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec!["dead-letters", "replay", "--config", config.to_str().unwrap(), "--route", "orders"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "replay failed: {out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_of_a_late_key_replay_to_their_source_and_pass() {
    let bs = kafka();
    let t = topics("replay");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let (port, group) = (free_port(), format!("replay-{}", uuid::Uuid::new_v4().simple()));
    let config = |rsa: bool| {
        format!(
            "shutdown_timeout = \"10s\"\n[admin]\nlisten = \"127.0.0.1:{port}\"\n[kafka.main]\nbootstrap_servers = \"{bs}\"\n{}\n[routes.orders]\nissuers = [\"idp\"]\ntoken = {{ keep_in_dead_letters = true }}\nsource = {{ kafka = {{ cluster = \"main\", topics = [\"{}\"], group = \"{group}\" }} }}\ntrusted = {{ kafka = {{ cluster = \"main\", topic = \"{}\" }} }}\ndead_letter = {{ kafka = {{ cluster = \"main\", topic = \"{}\" }} }}\n",
            issuer(rsa),
            t.untrusted,
            t.trusted,
            t.dead_letter
        )
    };
    let gate = GateProcess::spawn(&config(false));
    wait_ready(port, true, 60).await;
    let rs256: Vec<_> = (0..5)
        .map(|i| (format!("k{i}"), format!("late-key-{i}"), auth(Algorithm::RS256, json!({"sub": format!("rsa-{i}")}))))
        .collect();
    let expired: Vec<_> = (0..3)
        .map(|i| {
            (
                format!("e{i}"),
                format!("expired-{i}"),
                auth(Algorithm::HS256, json!({"exp": tokengate::verify::unix_now() - 3600})),
            )
        })
        .collect();
    produce(&bs, &t.untrusted, &[rs256.clone(), expired].concat()).await;
    let dead = consume(&bs, &t.dead_letter, 8, 60).await;
    assert!(dead.iter().filter(|m| header(m, "x-tokengate-reason").as_deref() == Some("unknown_kid")).count() == 5);

    // The key is published late: the gate reloads it; the dead letters are replayed.
    gate.rewrite(&config(true));
    gate.hup();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dry = replay(&gate.config_path(), &["--reason", "unknown_kid", "--dry-run"]);
    assert!(dry.contains("would replay 5 of 8 dead letters read"), "{dry}");
    assert_eq!(
        dry.lines().filter(|l| l.starts_with("would replay ") && l.contains("(unknown_kid)")).count(),
        5,
        "{dry}"
    );
    let done = replay(&gate.config_path(), &["--reason", "unknown_kid", "--max", "10"]);
    assert!(done.contains("replayed 5 of 8 dead letters read"), "{done}");
    assert!(done.contains(&format!("5 -> {}", t.untrusted)), "{done}");

    let trusted = consume(&bs, &t.trusted, 5, 60).await;
    let mut subs: Vec<String> = trusted.iter().map(|m| header(m, "x-tokengate-sub").unwrap_or_default()).collect();
    subs.sort();
    assert_eq!(
        subs,
        (0..5).map(|i| format!("rsa-{i}")).collect::<Vec<_>>(),
        "replayed messages pass with their identity"
    );
    // The replayed source records are the originals: same key, payload and token, no gate headers.
    let source = consume(&bs, &t.untrusted, 13, 30).await;
    for (m, (key, payload, headers)) in source[8..].iter().zip(&rs256) {
        assert_eq!((m.key(), m.payload()), (Some(key.as_bytes()), Some(payload.as_bytes())));
        assert_eq!(header(m, "authorization").as_deref(), Some(headers[0].1.as_str()));
        let names: Vec<&str> =
            m.headers().map(|h| rdkafka::message::Headers::iter(h).map(|h| h.key).collect()).unwrap_or_default();
        assert!(names.iter().all(|n| !n.starts_with("x-tokengate-")), "{names:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = consume(&bs, &t.dead_letter, 8, 10).await;
    assert_eq!(still.len(), 8, "nothing removed from the dead-letter topic, nothing added");
    gate.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_dead_letters_replay_and_are_deleted_only_when_asked() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "replay").await;
    let config = |rsa: bool| {
        let text = crate::amqp::config(&n, 10, None)
            .replace("[routes.orders]\n", "[routes.orders]\ntoken = { keep_in_dead_letters = true }\n");
        // Only the idp issuer, with or without its RSA key.
        let start = text.find("\n[issuers.idp]").unwrap();
        let end = text.find("\n[amqp.rabbit]").unwrap();
        format!("{}\n{}{}", &text[..start], issuer(rsa), &text[end..])
    };
    let gate = Running::start(&config(false)).await;
    for i in 0..3 {
        let token = bearer(Algorithm::RS256, json!({"sub": format!("rsa-{i}"), "scope": "orders:write"}));
        publish(&ch, &n.queue_in, format!("late-{i}").as_bytes(), props_with(vec![("authorization", token)])).await;
    }
    for i in 0..2 {
        let token = bearer(Algorithm::HS256, json!({"exp": tokengate::verify::unix_now() - 3600}));
        publish(&ch, &n.queue_in, format!("expired-{i}").as_bytes(), props_with(vec![("authorization", token)])).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    gate.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.toml");
    std::fs::write(&path, config(true)).unwrap();
    let gate = Running::start(&config(true)).await;

    let dry = replay(&path, &["--queue", &n.q_dlq, "--reason", "unknown_kid", "--dry-run"]);
    assert!(dry.contains("would replay 3 of 5"), "{dry}");
    let done = replay(&path, &["--queue", &n.q_dlq, "--reason", "unknown_kid", "--delete"]);
    assert!(done.contains("replayed 3 of 5") && done.contains("3 deleted"), "{done}");
    let ok = drain(&ch, &n.q_ok, 3, 60).await;
    let mut subs: Vec<String> = ok.iter().map(|d| hdr(d, "x-tokengate-sub").unwrap_or_default()).collect();
    subs.sort();
    assert_eq!(subs, ["rsa-0", "rsa-1", "rsa-2"]);
    let left = replay(&path, &["--queue", &n.q_dlq, "--dry-run"]);
    assert!(
        left.contains("would replay 2 of 2 dead letters read"),
        "the expired two stay, the replayed three are gone: {left}"
    );
    gate.stop().await;
}

#[test]
fn replay_refuses_an_unknown_reason_and_a_missing_route() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[routes.orders]\nsource = { kafka = { cluster = \"k\", topics = [\"a\"], group = \"g\" } }\ntrusted = { kafka = { cluster = \"k\", topic = \"t\" } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n").unwrap();
    let p = path.to_str().unwrap();
    let (code, _, err) = run_cli(&["dead-letters", "replay", "--config", p, "--route", "orders", "--reason", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a reason code"), "{err}");
    let (code, _, err) = run_cli(&["dead-letters", "replay", "--config", p, "--route", "other"]);
    assert_eq!(code, 2);
    assert!(err.contains("no route \"other\""), "{err}");
}
