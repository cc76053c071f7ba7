//! `tokengate token fetch` against a small OAuth 2.0 token endpoint started by the test:
//! client_secret_basic, client_secret_post and private_key_jwt (RFC 7523), the cache reused until
//! shortly before expiry, and a refused client (the secret never printed).

use std::collections::HashMap;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use crate::util::{fixture, token};

const SECRET: &str = "s3cr&t:with=odd chars";

#[derive(Clone)]
struct Endpoint {
    url: Arc<std::sync::OnceLock<String>>,
    hits: Arc<AtomicUsize>,
}

fn refuse(why: &str) -> (StatusCode, axum::Json<Value>) {
    (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "invalid_client", "error_description": why})))
}

/// Authenticates the client the three ways, then issues a 300-second token.
async fn issue(State(e): State<Endpoint>, headers: HeaderMap, body: String) -> (StatusCode, axum::Json<Value>) {
    e.hits.fetch_add(1, Ordering::SeqCst);
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "unsupported_grant_type"})));
    }
    let dec = |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().unwrap().1.into_owned();
    let basic = headers.get("authorization").and_then(|h| h.to_str().ok()?.strip_prefix("Basic ").map(str::to_owned));
    let client = if let Some(b) = basic {
        let raw =
            String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).unwrap()).unwrap();
        let (id, secret) = raw.split_once(':').unwrap();
        if dec(secret) != SECRET {
            return refuse("bad client secret");
        }
        dec(id)
    } else if let Some(assertion) = form.get("client_assertion") {
        let key =
            jsonwebtoken::DecodingKey::from_rsa_pem(&std::fs::read(fixture("keys/rsa.pub.pem")).unwrap()).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
        v.set_audience(&[e.url.get().unwrap()]);
        v.set_issuer(&["producer-1"]);
        match jsonwebtoken::decode::<Value>(assertion, &key, &v) {
            Ok(d) if d.claims["sub"] == "producer-1" && d.claims["jti"].is_string() => "producer-1".to_owned(),
            _ => return refuse("bad client assertion"),
        }
    } else {
        if form.get("client_secret").map(String::as_str) != Some(SECRET) {
            return refuse("bad client secret");
        }
        form["client_id"].clone()
    };
    let scope = form.get("scope").cloned().unwrap_or_default();
    let now = tokengate::verify::unix_now();
    let access = token(Algorithm::RS256, json!({"sub": client, "scope": scope, "iat": now, "exp": now + 300}));
    (StatusCode::OK, axum::Json(json!({"access_token": access, "token_type": "Bearer", "expires_in": 300})))
}

async fn start() -> Endpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = Endpoint { url: Default::default(), hits: Default::default() };
    e.url.set(format!("http://{}/token", listener.local_addr().unwrap())).unwrap();
    let app = Router::new().route("/token", post(issue)).with_state(e.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    e
}

async fn fetch(e: &Endpoint, args: &[&str]) -> Output {
    let mut all = vec!["token".to_owned(), "fetch".into(), "--token-url".into(), e.url.get().unwrap().clone()];
    all.extend(["--client-id".into(), "producer-1".into()]);
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(&all)
            .env("TG_FETCH_SECRET", SECRET)
            .env("TG_WRONG_SECRET", "not-it")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn claims(token: &str) -> Value {
    tokengate::verify::jwt::decode_unverified(token.trim()).unwrap().1.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_fetch_authenticates_three_ways_caches_and_never_prints_the_secret() {
    let e = start().await;
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let basic = fetch(&e, &["--client-secret-env", "TG_FETCH_SECRET", "--scope", "orders:write"]).await;
    assert!(basic.status.success(), "{}", err(&basic));
    assert_eq!(claims(&text(&basic))["scope"], "orders:write");
    let post = fetch(&e, &["--client-secret-env", "TG_FETCH_SECRET", "--auth", "post"]).await;
    assert!(post.status.success(), "{}", err(&post));
    let key = fixture("keys/rsa.key.pem");
    let pkjwt = fetch(&e, &["--private-key-file", key.to_str().unwrap(), "--alg", "RS256"]).await;
    assert!(pkjwt.status.success(), "{}", err(&pkjwt));
    assert_eq!(claims(&text(&pkjwt))["sub"], "producer-1");
    assert_eq!(e.hits.load(Ordering::SeqCst), 3);

    // The cache: reused while more than --min-remaining is left, then fetched again.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.json");
    let out = dir.path().join("token");
    let cached = |extra: &'static [&'static str]| {
        let mut a = vec!["--client-secret-env", "TG_FETCH_SECRET", "--cache", cache.to_str().unwrap()];
        a.extend(["--out", out.to_str().unwrap()]);
        a.extend(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let e = e.clone();
        async move { fetch(&e, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let first = run(cached(&[])).await;
    assert!(first.status.success() && text(&first).is_empty(), "--out writes the file, prints nothing");
    let token = std::fs::read_to_string(&out).unwrap();
    let again = run(cached(&[])).await;
    assert!(err(&again).contains("reused from the cache"), "{}", err(&again));
    assert_eq!(e.hits.load(Ordering::SeqCst), 4, "the second call did not reach the endpoint");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), token);
    let renewed = run(cached(&["--min-remaining", "400s"])).await;
    assert!(err(&renewed).contains("fetched"), "{}", err(&renewed));
    assert_eq!(e.hits.load(Ordering::SeqCst), 5, "a token with 300 s left is renewed when 400 s are asked");
    #[cfg(unix)]
    for f in [&cache, &out] {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }

    // A refused client: exit 2 with the OAuth error, never the secret.
    let refused = fetch(&e, &["--client-secret-env", "TG_WRONG_SECRET"]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(err(&refused).contains("401") && err(&refused).contains("invalid_client"), "{}", err(&refused));
    assert!(!err(&refused).contains("not-it") && !text(&refused).contains("not-it"));
}
