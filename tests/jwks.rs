//! JWKS URLs against a real HTTP server started by the test: rotation, unknown-kid refetch,
//! the rate limit under a flood of random kids, and the identity provider going down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokengate::verify::{Policy, Reason, Verifier};

use crate::util::*;

#[derive(Clone)]
struct Idp {
    jwks: Arc<std::sync::Mutex<String>>,
    hits: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Idp {
    fn set(&self, file: &str) {
        *self.jwks.lock().unwrap() = std::fs::read_to_string(fixture(file)).unwrap();
    }
}

async fn serve_jwks(State(idp): State<Idp>) -> (StatusCode, String) {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    if idp.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down".into());
    }
    (StatusCode::OK, idp.jwks.lock().unwrap().clone())
}

/// Starts the fake identity provider; returns it and its base URL.
async fn start_idp() -> (Idp, String) {
    let idp = Idp { jwks: Default::default(), hits: Default::default(), down: Default::default() };
    idp.set("jwks.json");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let discovery = format!(r#"{{"issuer":"{base}","jwks_uri":"{base}/certs"}}"#);
    let app = Router::new()
        .route("/certs", get(serve_jwks))
        .route("/.well-known/openid-configuration", get(move || async move { discovery }))
        .with_state(idp.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (idp, base)
}

fn remote_config(field: &str, url: &str, min_refetch: &str) -> String {
    format!(
        r#"
[issuers.remote]
iss = "https://idp.test"
audiences = ["tokengate"]
algorithms = ["RS256", "ES256"]
{field} = "{url}"
jwks_min_refetch = "{min_refetch}"
allow_insecure_http = true
"#
    )
}

fn rsa2_token(kid: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(fixture("keys/rsa2.key.pem")).unwrap()).unwrap();
    let header = json!({"alg": "RS256", "kid": kid}).to_string();
    sign_raw(&header, &claims(json!({})).to_string(), Algorithm::RS256, &key)
}

async fn started(text: &str) -> Arc<Verifier> {
    let (v, _) = engine(text);
    assert!(v.start().await.is_empty(), "initial fetch works");
    v
}

#[tokio::test]
async fn rotation_is_picked_up_by_an_unknown_kid_refetch() {
    let (idp, base) = start_idp().await;
    let v = started(&remote_config("jwks_url", &format!("{base}/certs"), "1s")).await;
    let p = Policy::default();
    let old = token(Algorithm::RS256, json!({}));
    assert!(v.verify(&p, &old, NOW).await.unwrap().is_ok());
    assert!(v.verify(&p, &old, NOW).await.unwrap().is_ok(), "seen twice: cached");
    let new = rsa2_token("rsa2");
    // Not published yet: unknown (and remembered for min_refetch).
    assert_eq!(v.verify(&p, &new, NOW).await.unwrap().unwrap_err().reason, Reason::UnknownKid);
    idp.set("jwks_rotated.json");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let hits = idp.hits.load(Ordering::SeqCst);
    assert!(v.verify(&p, &new, NOW).await.unwrap().is_ok(), "rotated key found by refetch");
    assert_eq!(idp.hits.load(Ordering::SeqCst), hits + 1);
    // The old key left the set: its cached verification must not survive the key set change.
    assert_eq!(v.verify(&p, &old, NOW).await.unwrap().unwrap_err().reason, Reason::UnknownKid);
}

#[tokio::test]
async fn a_flood_of_random_kids_costs_at_most_one_fetch_per_interval() {
    let (idp, base) = start_idp().await;
    let v = started(&remote_config("jwks_url", &format!("{base}/certs"), "60s")).await;
    let before = idp.hits.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..500 {
        let v = Arc::clone(&v);
        tasks.push(tokio::spawn(async move {
            let t = rsa2_token(&format!("random-{i}"));
            v.verify(&Policy::default(), &t, NOW).await.unwrap().unwrap_err().reason
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Reason::UnknownKid);
    }
    let fetched = idp.hits.load(Ordering::SeqCst) - before;
    assert!(fetched <= 1, "{fetched} fetches for 500 random kids");
}

#[tokio::test]
async fn identity_provider_down_keeps_the_last_good_keys_and_never_accepts_unknown_kids() {
    let (idp, base) = start_idp().await;
    let v = started(&remote_config("discovery_url", &base, "1s")).await;
    let p = Policy::default();
    idp.down.store(true, Ordering::SeqCst);
    assert!(v.start().await.len() == 1, "refresh fails while down");
    // Known keys keep serving.
    assert!(v.verify(&p, &token(Algorithm::ES256, json!({})), NOW).await.unwrap().is_ok());
    // An unknown kid cannot be decided: an error (hold), never an accept.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let err = v.verify(&p, &rsa2_token("rsa2"), NOW).await.unwrap_err();
    assert_eq!(err.issuer, "remote");
    let health = v.health().await;
    assert!(health[0].last_error.as_deref().unwrap().contains("503"), "{health:?}");
    assert!(health[0].age_secs.is_some());
    // Back up: the rotated key is found again.
    idp.down.store(false, Ordering::SeqCst);
    idp.set("jwks_rotated.json");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(v.verify(&p, &rsa2_token("rsa2"), NOW).await.unwrap().is_ok());
    assert!(v.health().await[0].last_error.is_none());
}

#[tokio::test]
async fn never_fetched_keys_hold_instead_of_rejecting() {
    let (v, _) = engine(&remote_config("jwks_url", "http://127.0.0.1:9/certs", "1s"));
    assert_eq!(v.start().await.len(), 1);
    assert!(v.verify(&Policy::default(), &token(Algorithm::RS256, json!({})), NOW).await.is_err());
}

#[tokio::test]
async fn during_an_outage_an_unknown_kid_is_held_at_most_unknown_kid_max_wait_then_dead_lettered() {
    let (idp, base) = start_idp().await;
    let text = format!("{}unknown_kid_max_wait = \"2s\"\n", remote_config("jwks_url", &format!("{base}/certs"), "1s"));
    let v = started(&text).await;
    let p = Policy::default();
    idp.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // Early in the outage: held (an error, never an accept), while known keys keep working.
    assert!(v.verify(&p, &rsa2_token("rsa2"), NOW).await.is_err(), "held early in the outage");
    assert!(v.verify(&p, &token(Algorithm::ES256, json!({})), NOW).await.unwrap().is_ok());
    // Past unknown_kid_max_wait into the outage: dead-lettered with its own reason.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = v.verify(&p, &rsa2_token("rsa2"), NOW).await.unwrap().unwrap_err();
    assert_eq!(r.reason, Reason::KeyUnavailable, "{r:?}");
    assert!(r.detail.contains("could not be fetched for"), "{}", r.detail);
    assert!(v.verify(&p, &token(Algorithm::ES256, json!({})), NOW).await.unwrap().is_ok(), "known keys still work");
    // The provider back: the same token is decided on its merits again.
    idp.down.store(false, Ordering::SeqCst);
    idp.set("jwks_rotated.json");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(v.verify(&p, &rsa2_token("rsa2"), NOW).await.unwrap().is_ok());
}
