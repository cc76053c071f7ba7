//! Attestations end to end: gate processes sign what they accept, serve their public keys at
//! `/.well-known/jwks.json`, rotate keys between runs, and a third-party library (PyJWT,
//! tests/fixtures/attestations.py) verifies every attestation against the served JWKS and spots
//! a payload changed after the gate verified it.

use std::process::{Command, Stdio};

use jsonwebtoken::Algorithm;
use rdkafka::message::Message as _;
use serde_json::{Value, json};

use crate::kafka::{auth, consume, create_topics, header, kafka, produce, topics, wait_group};
use crate::kafka_failover::{GateProcess, instance_config, wait_ready};
use crate::util::{fixture, free_port};

/// The gate's signing keys (both published), `active` signing; the route keeps `sub` as `user`
/// and `scope`, and adds `env`.
fn attest_toml(route: &str, active: &str) -> String {
    let key = |n: &str| fixture(&format!("keys/{n}")).display().to_string();
    format!(
        r#"
[routes.{route}.attest]
keep = ["sub", "scope"]
rename = {{ sub = "user" }}
add = {{ env = "test" }}

[attestation]
issuer = "tokengate.test"
ttl = "10m"
active = "{active}"
keys = [
  {{ kid = "gate-ed", algorithm = "EdDSA", pem_file = "{ed}" }},
  {{ kid = "gate-p256", algorithm = "ES256", pem_file = "{p256}" }},
]
"#,
        ed = key("ed25519.key.pem"),
        p256 = key("p256.key.pem"),
    )
}

/// PyJWT's verdict on each (attestation, key, payload) against `jwks`.
fn python_checks(jwks: &Value, records: &[(String, Option<String>, String)]) -> Vec<Value> {
    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let doc = json!({
        "jwks": jwks,
        "records": records.iter().map(|(a, k, p)| json!({"attestation": a, "key": k, "payload": p})).collect::<Vec<_>>(),
    });
    let mut child = Command::new(&python)
        .arg(fixture("attestations.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} with PyJWT is required ({e}); scripts/test installs it"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), doc.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "attestations.py failed");
    serde_json::from_slice(&out.stdout).expect("attestations.py prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestations_verify_downstream_across_a_key_rotation_and_catch_a_changed_payload() {
    let bs = kafka();
    let t = topics("attest");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let group = format!("gate-{}", uuid::Uuid::new_v4().simple());
    let cfg = |active: &str, port: u16| {
        instance_config(&bs, &t, &group, "orders", "", None, Some(port)) + &attest_toml("orders", active)
    };
    let good = auth(Algorithm::RS256, json!({}));
    let batch = |tag: &str| -> Vec<crate::kafka::Msg> {
        (0..3).map(|i| (format!("k{i}"), format!("{tag}-{i}"), good.clone())).collect()
    };

    // Before the rotation: the Ed25519 key signs.
    let port = free_port();
    let gate = GateProcess::spawn(&cfg("gate-ed", port));
    wait_ready(port, true, 30).await;
    wait_group(&bs, &group, 1).await;
    produce(&bs, &t.untrusted, &batch("before")).await;
    consume(&bs, &t.trusted, 3, 30).await;
    gate.stop();

    // The rotation: the P-256 key signs from now on; both stay published.
    let port = free_port();
    let gate = GateProcess::spawn(&cfg("gate-p256", port));
    wait_ready(port, true, 30).await;
    produce(&bs, &t.untrusted, &batch("after")).await;
    let out = consume(&bs, &t.trusted, 6, 30).await;
    let jwks: Value =
        reqwest::get(format!("http://127.0.0.1:{port}/.well-known/jwks.json")).await.unwrap().json().await.unwrap();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, ["gate-ed", "gate-p256"], "{jwks}");
    assert!(jwks.to_string().find("\"d\"").is_none(), "no private part in the JWKS: {jwks}");

    let records: Vec<(String, Option<String>, String)> = out
        .iter()
        .map(|m| {
            let a = header(m, "x-tokengate-attestation").expect("every accepted message is attested");
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            (a, key, String::from_utf8_lossy(m.payload().unwrap()).into_owned())
        })
        .collect();
    let checks = python_checks(&jwks, &records);
    for (c, (_, _, payload)) in checks.iter().zip(&records) {
        assert_eq!(c["valid"], true, "{payload}: {c}");
        let want_kid = if payload.starts_with("before") { "gate-ed" } else { "gate-p256" };
        assert_eq!(c["kid"], want_kid, "{payload}");
        let claims = &c["claims"];
        assert_eq!(claims["iss"], "tokengate.test");
        assert_eq!(claims["route"], "orders");
        assert_eq!(claims["identity"], json!({"user": "alice", "scope": "orders:write orders:read", "env": "test"}));
        assert_eq!(claims["token"]["iss"], "https://idp.test");
        assert_eq!(claims["src"].as_str().unwrap().split('/').next(), Some(t.untrusted.as_str()));
    }

    // Downstream, a payload changed after the gate verified it is caught, by PyJWT and by the CLI.
    let (a, key, _) = &records[0];
    let tampered = python_checks(&jwks, &[(a.clone(), key.clone(), "before-0 but changed".into())]);
    assert_eq!(
        (tampered[0]["valid"].clone(), tampered[0]["reason"].clone()),
        (json!(false), json!("payload_mismatch"))
    );
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let cli = |payload: &str| {
        let f = dir.path().join("payload");
        std::fs::write(&f, payload).unwrap();
        let mut args = vec!["token", "verify-attestation", "--jwks", jwks_file.to_str().unwrap()];
        args.extend(["--payload-file", f.to_str().unwrap()]);
        if let Some(k) = key {
            args.extend(["--key", k.as_str()]);
        }
        args.push(a.as_str());
        Command::new(env!("CARGO_BIN_EXE_tokengate")).args(&args).output().unwrap()
    };
    let ok = cli(&records[0].2);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    let bad = cli("before-0 but changed");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("the payload is not the attested one"));
    gate.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestations_on_amqp_verify_downstream_and_catch_a_changed_body() {
    use crate::amqp::{RABBIT, bearer, channel, drain, hdr, props_with, publish, topology};
    let _shared = RABBIT.read().await;
    let (_c, ch) = channel().await;
    let n = topology(&ch, "attest").await;
    let config = crate::amqp::config(&n, 50, None) + &attest_toml("orders", "gate-p256");
    let jwks = crate::util::settings(&config).attester.expect("the config has [attestation]").jwks();
    let gate = crate::kafka::Running::start(&config).await;
    publish(
        &ch,
        &n.queue_in,
        b"{\"order\":1}",
        props_with(vec![("authorization", bearer(Algorithm::ES256, json!({})))]),
    )
    .await;
    let ok = drain(&ch, &n.q_ok, 1, 30).await;
    let att = hdr(&ok[0], "x-tokengate-attestation").expect("attested");
    let body = String::from_utf8(ok[0].data.clone()).unwrap();
    let checks = python_checks(&jwks, &[(att.clone(), None, body), (att, None, "{\"order\":2}".into())]);
    assert_eq!(checks[0]["valid"], true, "{}", checks[0]);
    assert_eq!(checks[0]["kid"], "gate-p256");
    assert_eq!(checks[0]["claims"]["msg"]["key_sha256"], Value::Null, "AMQP messages have no key");
    assert_eq!((checks[1]["valid"].clone(), checks[1]["reason"].clone()), (json!(false), json!("payload_mismatch")));
    gate.stop().await;
}
