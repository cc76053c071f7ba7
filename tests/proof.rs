//! Tokens bound to their messages, end to end: on Kafka a DPoP-style proof per message (made by
//! `tokengate token proof`, by the library and by the README's Python producer), on RabbitMQ a token naming its payload's digest.
//! A token copied onto another message, a stale proof, a proof by another key and a missing proof
//! each meet their own reason.

use std::collections::BTreeMap;
use std::process::Command;

use jsonwebtoken::Algorithm;
use rdkafka::message::Message as _;
use serde_json::json;

use crate::amqp::{RABBIT, bearer, channel, drain, hdr, props_with, publish, topology};
use crate::kafka::{Running, consume, create_topics, gate_config, header, kafka, produce, topics};
use crate::util::{fixture, token};
use tokengate::attest::SigningKey;
use tokengate::verify::proof::thumbprint;
use tokengate::verify::sha256_hex;

fn producer_key(name: &str, alg: Algorithm) -> SigningKey {
    SigningKey::from_pem("producer", alg, &std::fs::read(fixture(&format!("keys/{name}"))).unwrap()).unwrap()
}

/// A proof made by the README's Python producer code (PyJWT), with the same producer key.
fn python_proof(key: &str, payload: &str) -> String {
    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(fixture("proof.py"))
        .arg(fixture("keys/p256.key.pem"))
        .args([key, payload])
        .output()
        .unwrap_or_else(|e| panic!("{python} with PyJWT is required ({e}); scripts/test installs it"));
    assert!(out.status.success(), "proof.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_tokens_pass_only_with_their_own_message_on_kafka() {
    let bs = kafka();
    let t = topics("proof");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let config = gate_config(&bs, &t, &format!("g-{}", uuid::Uuid::new_v4().simple()), "orders", None)
        + "[routes.orders.proof]\nmode = \"jkt\"\nmax_age = \"5m\"\n";
    let gate = Running::start(&config).await;

    let producer = producer_key("p256.key.pem", Algorithm::ES256);
    let jkt = thumbprint(&producer.jwk).unwrap();
    let bound = format!(
        "Bearer {}",
        token(
            Algorithm::RS256,
            json!({"cnf": {"jkt": jkt}, "exp": tokengate::verify::unix_now() + 600, "iat": tokengate::verify::unix_now()})
        )
    );
    let unbound = format!(
        "Bearer {}",
        token(
            Algorithm::RS256,
            json!({"exp": tokengate::verify::unix_now() + 600, "iat": tokengate::verify::unix_now()})
        )
    );
    let now = tokengate::verify::unix_now();
    // The producer's tool makes the first proof, as a shell producer would.
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, "pay-1").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["token", "proof", "--alg", "ES256", "--key", "m1", "--key-file"])
        .arg(fixture("keys/p256.key.pem"))
        .arg("--payload-file")
        .arg(&body)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli_proof = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let proof =
        |key: &str, payload: &str, at: i64| producer.proof(Some(key.as_bytes()), payload.as_bytes(), "j", at).unwrap();
    let other = producer_key("ed25519.key.pem", Algorithm::EdDSA);
    let h = |auth: &str, proof: Option<String>| {
        let mut v = vec![("authorization".to_owned(), auth.to_owned())];
        if let Some(p) = proof {
            v.push(("x-token-proof".to_owned(), p));
        }
        v
    };
    let cases = [
        ("m1", "pay-1", h(&bound, Some(cli_proof.clone())), "trusted"),
        ("m2", "pay-2", h(&bound, Some(cli_proof.clone())), "payload_mismatch"), // copied onto another message
        ("m1", "pay-1 changed", h(&bound, Some(proof("m1", "pay-1", now))), "payload_mismatch"),
        ("m3", "pay-3", h(&bound, None), "proof_missing"),
        ("m4", "pay-4", h(&bound, Some(proof("m4", "pay-4", now - 3600))), "proof_invalid"), // stale
        ("m5", "pay-5", h(&bound, Some(other.proof(Some(b"m5"), b"pay-5", "j", now).unwrap())), "proof_invalid"),
        ("m6", "pay-6", h(&unbound, Some(proof("m6", "pay-6", now))), "proof_invalid"),
        ("m7", "pay-7", h(&bound, Some(proof("m7", "pay-7", now))), "trusted"),
        ("m8", "pay-8", h(&bound, Some(python_proof("m8", "pay-8"))), "trusted"), // the README's producer
    ];
    let msgs: Vec<crate::kafka::Msg> =
        cases.iter().map(|(k, p, h, _)| (k.to_string(), p.to_string(), h.clone())).collect();
    produce(&bs, &t.untrusted, &msgs).await;
    let ok = consume(&bs, &t.trusted, 3, 30).await;
    let dead = consume(&bs, &t.dead_letter, 6, 30).await;
    let mut got = BTreeMap::new();
    for m in &ok {
        got.insert(String::from_utf8_lossy(m.payload().unwrap()).into_owned(), "trusted".to_owned());
    }
    for m in &dead {
        got.insert(
            String::from_utf8_lossy(m.payload().unwrap()).into_owned(),
            header(m, "x-tokengate-reason").unwrap(),
        );
    }
    let want: BTreeMap<String, String> = cases.iter().map(|(_, p, _, r)| (p.to_string(), r.to_string())).collect();
    assert_eq!(got, want);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_naming_its_payload_digest_passes_only_with_that_payload_on_amqp() {
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "proof").await;
    let config = crate::amqp::config(&n, 50, None) + "[routes.orders.proof]\nmode = \"digest_claim\"\n";
    let gate = Running::start(&config).await;
    let named = |body: &str| bearer(Algorithm::ES256, json!({"msg_sha256": sha256_hex(body.as_bytes())}));
    publish(&ch, &n.queue_in, b"order-1", props_with(vec![("authorization", named("order-1"))])).await;
    publish(&ch, &n.queue_in, b"order-2", props_with(vec![("authorization", named("order-1"))])).await;
    publish(&ch, &n.queue_in, b"order-3", props_with(vec![("authorization", bearer(Algorithm::ES256, json!({})))]))
        .await;
    let ok = drain(&ch, &n.q_ok, 1, 30).await;
    assert_eq!(ok[0].data, b"order-1");
    let dead = drain(&ch, &n.q_dlq, 2, 30).await;
    let reasons: BTreeMap<String, String> = dead
        .iter()
        .map(|d| (String::from_utf8_lossy(&d.data).into_owned(), hdr(d, "x-tokengate-reason").unwrap()))
        .collect();
    assert_eq!(
        reasons,
        BTreeMap::from([("order-2".into(), "payload_mismatch".into()), ("order-3".into(), "proof_missing".into())])
    );
    gate.stop().await;
}
