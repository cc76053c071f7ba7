//! `tokengate demo`: the real pipeline on librdkafka's in-process mock cluster. It mints tokens,
//! produces a mix of good and bad messages, runs the gate and shows where each one went and why.
//! Revocations go to the local Redis when one answers, else to an in-memory list.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::ops::Mint;
use crate::revocation::{Kind, Revocations};
use crate::verify::unix_now;

const UNTRUSTED: &str = "orders.untrusted";
const TRUSTED: &str = "orders.trusted";
const DEAD_LETTER: &str = "orders.dead-letter";
const GROUP: &str = "tokengate-demo";
const ISS: &str = "https://idp.demo.tokengate";

fn config_text(bootstrap: &str, secret_file: &str, redis: Option<&str>) -> String {
    let redis = redis
        .map_or(String::new(), |prefix| format!("[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n"));
    format!(
        r#"
shutdown_timeout = "10s"
{redis}
[admin]
listen = ""

[kafka.embedded]
bootstrap_servers = "{bootstrap}"

[issuers.demo-idp]
iss = "{ISS}"
audiences = ["orders"]
algorithms = ["HS256"]
[[issuers.demo-idp.keys]]
kid = "demo-1"
algorithms = ["HS256"]
secret = {{ file = "{secret_file}" }}

[routes.orders]
issuers = ["demo-idp"]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
identity_headers = {{ sub = "x-tokengate-sub", roles = "x-tokengate-roles" }}
source = {{ kafka = {{ cluster = "embedded", topics = ["{UNTRUSTED}"], group = "{GROUP}" }} }}
trusted = {{ kafka = {{ cluster = "embedded", topic = "{TRUSTED}" }} }}
dead_letter = {{ kafka = {{ cluster = "embedded", topic = "{DEAD_LETTER}" }} }}
"#
    )
}

/// Runs the demo and prints what happened.
pub async fn run() -> anyhow::Result<()> {
    let mock = MockCluster::new(1).context("starting the embedded Kafka")?;
    for t in [UNTRUSTED, TRUSTED, DEAD_LETTER] {
        mock.create_topic(t, 3, 1)?;
    }
    let bootstrap = mock.bootstrap_servers();
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret).expect("system RNG");
    let secret = hex::encode(secret);
    let secret_file = std::env::temp_dir().join(format!("tokengate-demo-{}.secret", std::process::id()));
    std::fs::write(&secret_file, &secret)?;

    let redis_up = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect("127.0.0.1:6379"))
        .await
        .is_ok_and(|r| r.is_ok());
    let prefix = format!("tokengate-demo:{}:", std::process::id());
    let text = config_text(&bootstrap, &secret_file.display().to_string(), redis_up.then_some(prefix.as_str()));
    let parsed = crate::config::parse(&text, &[], std::path::Path::new("."));
    let _ = std::fs::remove_file(&secret_file);
    let mut settings = parsed.map_err(|p| anyhow::anyhow!("demo config: {p:?}"))?;

    let memory = (!redis_up).then(|| Arc::new(Revocations::in_memory(&prefix)));
    let cancel = CancellationToken::new();
    let gate = crate::app::build_gate(&mut settings, memory.clone(), &cancel).await?;

    // Tokens, as producers would get them from their identity provider.
    let now = unix_now();
    let key = EncodingKey::from_secret(secret.as_bytes());
    let mint = |sub: &str, scopes: &[&str], ttl: i64, at: i64| -> anyhow::Result<String> {
        let mut m = Mint::new(Algorithm::HS256);
        m.kid = Some("demo-1".into());
        m.iss = Some(ISS.into());
        m.aud = vec!["orders".into()];
        m.sub = Some(sub.into());
        m.roles = vec!["publisher".into()];
        m.scopes = scopes.iter().map(|s| s.to_string()).collect();
        m.ttl = Some(Duration::from_secs(ttl as u64));
        m.sign(&key, at)
    };
    let alice = mint("alice", &["orders:write"], 3600, now)?;
    let bob = mint("bob", &["orders:write", "orders:read"], 3600, now)?;
    let expired = mint("carol", &["orders:write"], 60, now - 7200)?;
    let reader = mint("dave", &["orders:read"], 3600, now)?;
    let revoked = mint("erin", &["orders:write"], 3600, now)?;
    let forged = {
        let mut m = Mint::new(Algorithm::HS256);
        (m.kid, m.iss, m.aud, m.sub) =
            (Some("demo-1".into()), Some(ISS.into()), vec!["orders".into()], Some("mallory".into()));
        m.scopes = vec!["orders:write".into()];
        m.sign(&EncodingKey::from_secret(b"not-the-identity-providers-secret!!"), now)?
    };
    let none_alg = {
        use base64::Engine as _;
        let b = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.",
            b(json!({"alg": "none"}).to_string()),
            b(json!({"iss": ISS, "sub": "mallory", "scope": "orders:write"}).to_string())
        )
    };

    // An operator revokes erin's token (by jti), as `tokengate revoke --token` would.
    let revoked_jti = crate::ops::inspect(&revoked, now)?["claims"]["jti"].as_str().unwrap_or_default().to_owned();
    if let Some(list) = &memory {
        list.insert_local(Kind::Jti, &revoked_jti, "demo: reported stolen");
    } else {
        let mut conn = crate::revocation::edit::redis_connect("redis://127.0.0.1:6379").await?;
        let sel = crate::revocation::edit::Selector::Jti(revoked_jti.clone());
        crate::revocation::edit::revoke(
            &mut conn,
            &prefix,
            &sel,
            None,
            "demo: reported stolen",
            crate::revocation::edit::Expiry::Ttl(Duration::from_secs(600)),
            now,
        )
        .await?;
    }

    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("valid token (alice)", vec![("authorization", bearer(&alice))]),
        ("valid token (bob), no Bearer prefix", vec![("Authorization", bob.clone())]),
        ("same token again (cache hit)", vec![("authorization", bearer(&alice))]),
        (
            "valid token + forged x-tokengate-sub",
            vec![("authorization", bearer(&bob)), ("x-tokengate-sub", "root".into())],
        ),
        ("expired token", vec![("authorization", bearer(&expired))]),
        ("forged signature", vec![("authorization", bearer(&forged))]),
        ("alg none", vec![("authorization", bearer(&none_alg))]),
        ("wrong scope (orders:read only)", vec![("authorization", bearer(&reader))]),
        ("revoked token", vec![("authorization", bearer(&revoked))]),
        ("no token", vec![]),
        ("two token headers", vec![("authorization", bearer(&alice)), ("authorization", bearer(&bob))]),
        ("not a JWT", vec![("authorization", "Bearer hello".into())]),
    ];
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
    for (i, (label, headers)) in cases.iter().enumerate() {
        let mut h = OwnedHeaders::new().insert(Header { key: "demo-case", value: Some(label.as_bytes()) });
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let payload = json!({"order": i + 1}).to_string();
        let key = format!("order-{}", i + 1);
        let record = FutureRecord::to(UNTRUSTED).key(&key).payload(&payload).headers(h);
        producer.send(record, Duration::from_secs(5)).await.map_err(|(e, _)| e)?;
    }

    let routes = tokio::spawn({
        let (gate, cancel) = (Arc::clone(&gate), cancel.clone());
        async move { crate::app::run_routes(&settings, gate, cancel).await }
    });

    let reader_consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("demo-reader-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .create()?;
    reader_consumer.subscribe(&[TRUSTED, DEAD_LETTER])?;
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < cases.len() && Instant::now() < deadline {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), reader_consumer.recv()).await else { continue };
        let header = |name: &str| {
            m.headers().and_then(|hs| {
                hs.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let label = header("demo-case").unwrap_or_default();
        let outcome = if m.topic() == TRUSTED {
            let token_kept =
                m.headers().is_some_and(|hs| hs.iter().any(|h| h.key.eq_ignore_ascii_case("authorization")));
            format!(
                "sub={} roles={}{}",
                header("x-tokengate-sub").unwrap_or_default(),
                header("x-tokengate-roles").unwrap_or_default(),
                if token_kept { "" } else { ", token stripped" }
            )
        } else {
            format!(
                "{}: {}",
                header("x-tokengate-reason").unwrap_or_default(),
                header("x-tokengate-detail").unwrap_or_default()
            )
        };
        let dest = if m.topic() == TRUSTED { "trusted" } else { "dead-letter" };
        seen.insert(label, (dest.to_owned(), outcome));
    }

    println!();
    println!(
        "tokengate demo: {} messages on {UNTRUSTED} (embedded Kafka), revocations {}",
        cases.len(),
        if redis_up { "in Redis at 127.0.0.1:6379" } else { "in memory (no Redis on 127.0.0.1:6379)" }
    );
    println!();
    println!("{:<40} {:<12} WHY", "MESSAGE", "WENT TO");
    for (label, _) in &cases {
        match seen.get(*label) {
            Some((dest, why)) => println!("{label:<40} {dest:<12} {why}"),
            None => println!("{label:<40} {:<12} (not seen within 30s)", "?"),
        }
    }
    cancel.cancel();
    routes.await??;
    // Close every client before the embedded cluster goes away.
    drop((reader_consumer, producer, gate));

    let committed = committed_offsets(&bootstrap)?;
    println!();
    println!("committed offsets of group {GROUP} on {UNTRUSTED} (acknowledged only after republish): {committed}");
    println!("try next: tokengate token mint --help, tokengate check-config config/tokengate.example.toml");
    anyhow::ensure!(seen.len() == cases.len(), "some messages were not seen on the destinations");
    drop(mock);
    Ok(())
}

fn committed_offsets(bootstrap: &str) -> anyhow::Result<String> {
    let c: rdkafka::consumer::BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", GROUP).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(UNTRUSTED, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| format!("p{}={}", e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect::<Vec<_>>()
        .join(" "))
}
