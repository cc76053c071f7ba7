//! Live reload under a live stream on the real broker: SIGHUP adds a key, changes one route and
//! adds another; the unchanged route is not touched, the changed one drains and restarts with its
//! new settings, nothing is lost or duplicated, and a broken config is refused whole.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::kafka::{Topics, auth, create_topics, kafka, produce, topics};
use crate::kafka_failover::{Fate, GateProcess, assert_fates, fates, stream, wait_ready};
use crate::util::*;

/// A gate config: routes `orders` (a) and `payments` (b), and with `v2` an RS256 key for the
/// issuer, `payments` adding the `sub` header, and a new route `refunds` (c).
fn config(bs: &str, port: u16, group: &str, [a, b, c]: [&Topics; 3], v2: bool) -> String {
    let route = |name: &str, t: &Topics, extra: &str| {
        format!(
            r#"
[routes.{name}]
issuers = ["idp"]
{extra}
source = {{ kafka = {{ cluster = "main", topics = ["{}"], group = "{group}-{name}", properties = {{ "session.timeout.ms" = "6000" }} }} }}
trusted = {{ kafka = {{ cluster = "main", topic = "{}" }} }}
dead_letter = {{ kafka = {{ cluster = "main", topic = "{}" }} }}
"#,
            t.untrusted, t.trusted, t.dead_letter
        )
    };
    let rsa = fixture("keys/rsa.pub.pem").display().to_string();
    let mut text = format!(
        r#"shutdown_timeout = "10s"
[admin]
listen = "127.0.0.1:{port}"
[kafka.main]
bootstrap_servers = "{bs}"
[issuers.idp]
iss = "https://idp.test"
audiences = ["tokengate"]
algorithms = ["HS256", "RS256"]
[[issuers.idp.keys]]
kid = "hs"
algorithms = ["HS256"]
secret = {{ env = "TG_TEST_SECRET" }}
"#
    );
    if v2 {
        text += &format!("[[issuers.idp.keys]]\nkid = \"rsa\"\nalgorithms = [\"RS256\"]\npem_file = \"{rsa}\"\n");
    }
    text += &route("orders", a, "");
    text += &route("payments", b, if v2 { "" } else { "identity_headers = {}" });
    if v2 {
        text += &route("refunds", c, "");
    }
    text
}

async fn ready_json(port: u16) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{port}/ready")).await.unwrap().json().await.unwrap()
}

async fn metrics(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap()
}

/// RS256 messages `{tag}-{i}` for route `orders`.
async fn rsa_messages(bs: &str, topic: &str, tag: &str) {
    let msgs: Vec<_> =
        (0..5).map(|i| (format!("rsa-{i}"), format!("{tag}-{i}"), auth(Algorithm::RS256, json!({})))).collect();
    produce(bs, topic, &msgs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_and_routes_under_a_live_stream_and_refuses_a_broken_config() {
    let bs = kafka();
    let (a, b, c) = (topics("reload-a"), topics("reload-b"), topics("reload-c"));
    for t in [&a, &b, &c] {
        create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 3).await;
    }
    let (port, group) = (free_port(), format!("gate-{}", uuid::Uuid::new_v4().simple()));
    let gate = GateProcess::spawn(&config(&bs, port, &group, [&a, &b, &c], false));
    wait_ready(port, true, 60).await;
    assert_eq!(ready_json(port).await["config_generation"], 1);

    const N: u64 = 3000;
    let stream_a = tokio::spawn(stream(bs.clone(), a.untrusted.clone(), N, 300, 12));
    let stream_b = tokio::spawn(stream(bs.clone(), b.untrusted.clone(), N, 300, 12));
    rsa_messages(&bs, &a.untrusted, "rsa-before").await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    gate.rewrite(&config(&bs, port, &group, [&a, &b, &c], true));
    gate.hup();
    for _ in 0..100 {
        if ready_json(port).await["config_generation"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready_json(port).await["config_generation"], 2, "the reload was applied");
    rsa_messages(&bs, &a.untrusted, "rsa-after").await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    gate.rewrite("[routes.orders\nthis is not a config");
    gate.hup();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready_json(port).await["config_generation"], 2, "a broken config is refused whole");
    let m = metrics(port).await;
    assert!(m.contains("tokengate_config_reloads_total{outcome=\"refused\"} 1"), "{m}");
    assert!(m.contains("tokengate_config_reloads_total{outcome=\"applied\"} 1"), "{m}");
    assert!(m.contains("tokengate_config_generation 2"), "{m}");

    let sent_a = stream_a.await.unwrap();
    let sent_b = stream_b.await.unwrap();
    let refunds: Vec<_> =
        (0..20).map(|i| (format!("r{i}"), format!("refund-{i}"), auth(Algorithm::HS256, json!({})))).collect();
    produce(&bs, &c.untrusted, &refunds).await;

    let fates_a = fates(&bs, &a, N as usize + 10, 120).await;
    let fates_b = fates(&bs, &b, N as usize, 120).await;
    let fates_c = fates(&bs, &c, 20, 60).await;
    let logs = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap().replace_all(&gate.stop(), "").into_owned();

    let (rsa, stream_fates): (Vec<Fate>, Vec<Fate>) = fates_a.into_iter().partition(|f| f.payload.starts_with("rsa-"));
    for f in &rsa {
        let want = if f.payload.starts_with("rsa-before") { "dead_letter" } else { "trusted" };
        assert_eq!(f.dest, want, "{}: a key added by the reload verifies from then on ({})", f.payload, f.reason);
    }
    assert_eq!(rsa.len(), 10, "every RS256 message once");
    assert_eq!(assert_fates(&sent_a, &stream_fates), 0, "the unchanged route duplicated nothing");
    assert_eq!(assert_fates(&sent_b, &fates_b), 0, "the changed route drained and committed: nothing twice");
    let mut by_partition: Vec<&Fate> = fates_b.iter().filter(|f| f.dest == "trusted").collect();
    by_partition.sort_by_key(|f| (f.partition, f.offset));
    let with_sub = by_partition.iter().filter(|f| !f.sub.is_empty()).count();
    assert!(with_sub > 0 && with_sub < by_partition.len(), "payments changed its headers mid-stream");
    for w in by_partition.windows(2) {
        let later_without = w[0].partition == w[1].partition && !w[0].sub.is_empty() && w[1].sub.is_empty();
        assert!(!later_without, "once restarted, payments writes the new header on every record");
    }
    let refunds_log: Vec<&str> =
        logs.lines().filter(|l| l.contains("refunds") || l.contains("WARN") || l.contains("ERROR")).collect();
    assert_eq!(fates_c.iter().filter(|f| f.dest == "trusted").count(), 20, "the added route runs: {refunds_log:#?}");

    assert!(logs.contains("route stopped for the reloaded config route=payments"), "{logs}");
    assert!(!logs.contains("route stopped for the reloaded config route=orders"), "orders was not touched");
    assert!(logs.contains("route started with the reloaded config route=refunds"), "{logs}");
    assert!(logs.contains("config reload refused"), "the refusal is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_config_or_key_file_that_changes_is_reloaded() {
    let bs = kafka();
    let t = topics("reload-watch");
    create_topics(&bs, &[&t.untrusted, &t.trusted, &t.dead_letter], 1).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("rsa.pub.pem");
    std::fs::copy(fixture("keys/rsa.pub.pem"), &key).unwrap();
    let (port, group) = (free_port(), format!("gate-{}", uuid::Uuid::new_v4().simple()));
    let text = config(&bs, port, &group, [&t, &t, &t], false)
        .replace("[routes.payments]", "[routes.unused-payments]")
        .replace(
            "[[issuers.idp.keys]]\n",
            &format!("[[issuers.idp.keys]]\nkid = \"rsa\"\nalgorithms = [\"RS256\"]\npem_file = \"{}\"\n[[issuers.idp.keys]]\n", key.display()),
        )
        + "[reload]\nwatch = \"500ms\"\n";
    let gate = GateProcess::spawn(&text);
    wait_ready(port, true, 60).await;
    let generation = || async { ready_json(port).await["config_generation"].as_u64().unwrap() };
    let wait_for = |want: u64| async move {
        for _ in 0..50 {
            if generation().await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("config_generation did not reach {want}");
    };
    assert_eq!(generation().await, 1);
    gate.rewrite(&(text.clone() + "# a comment changes the file\n"));
    wait_for(2).await;
    let pem = std::fs::read_to_string(&key).unwrap();
    std::fs::write(&key, format!("{pem}\n")).unwrap();
    wait_for(3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(generation().await, 3, "an unchanged file reloads nothing");
    let logs = gate.stop();
    assert_eq!(logs.matches("a watched file changed").count(), 2, "{logs}");
}
