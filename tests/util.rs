//! Shared test helpers: fixtures, token signing, engines from config text.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::Value;
use tokengate::config;
use tokengate::verify::{Policy, TokenSpec, Verifier};

/// A fixed "now" inside every fixture token's lifetime.
pub const NOW: i64 = 1_800_000_000;

/// The HMAC secret used by test configs.
pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// The test private key for an algorithm (HMAC: `SECRET`).
pub fn signing_key(alg: Algorithm) -> EncodingKey {
    let pem = |name: &str| std::fs::read(fixture(&format!("keys/{name}.key.pem"))).unwrap();
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem("rsa")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("p256")).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(&pem("p384")).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed25519")).unwrap(),
        other => panic!("no test key for {other:?}"),
    }
}

/// The kid the test config gives each algorithm's key.
pub fn kid_for(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => "hs",
        Algorithm::ES256 => "p256",
        Algorithm::ES384 => "p384",
        Algorithm::EdDSA => "ed25519",
        _ => "rsa",
    }
}

pub fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// Signs arbitrary header and claims JSON text (to make hostile tokens with valid signatures).
pub fn sign_raw(header: &str, claims: &str, alg: Algorithm, key: &EncodingKey) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

/// Standard claims of the test issuer, valid at `NOW`, merged with `extra`.
pub fn claims(extra: Value) -> Value {
    let mut c = serde_json::json!({
        "iss": "https://idp.test", "aud": "tokengate", "sub": "alice",
        "iat": NOW - 10, "exp": NOW + 600, "scope": "orders:write orders:read",
        "tenant": "acme", "realm_access": {"roles": ["publisher"]},
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// A token from the test issuer with its standard key for `alg`.
pub fn token(alg: Algorithm, extra: Value) -> String {
    let header = serde_json::json!({"alg": format!("{alg:?}"), "kid": kid_for(alg), "typ": "JWT"});
    sign_raw(&header.to_string(), &claims(extra).to_string(), alg, &signing_key(alg))
}

/// Config text of the test issuers: `idp` (every key kind) and `pyjwt` (fixture tokens).
pub fn issuers_toml() -> String {
    let k = |n: &str| fixture(&format!("keys/{n}")).display().to_string();
    format!(
        r#"
[issuers.idp]
iss = "https://idp.test"
audiences = ["tokengate", "other"]
algorithms = ["HS256", "RS256", "PS256", "ES256", "ES384", "EdDSA"]
required_claims = ["sub"]
[[issuers.idp.keys]]
kid = "hs"
algorithms = ["HS256"]
secret = {{ env = "TG_TEST_SECRET" }}
[[issuers.idp.keys]]
kid = "rsa"
algorithms = ["RS256", "PS256"]
pem_file = "{rsa}"
[[issuers.idp.keys]]
kid = "p256"
algorithms = ["ES256"]
pem_file = "{p256}"
[[issuers.idp.keys]]
kid = "p384"
algorithms = ["ES384"]
pem_file = "{p384}"
[[issuers.idp.keys]]
kid = "ed25519"
algorithms = ["EdDSA"]
pem_file = "{ed}"

[issuers.pyjwt]
iss = "https://pyjwt.example"
audiences = ["tokengate"]
algorithms = ["HS256", "RS256", "PS256", "ES256", "ES384", "EdDSA"]
[[issuers.pyjwt.keys]]
kid = "hs"
algorithms = ["HS256"]
secret = {{ file = "{hmac}" }}
[[issuers.pyjwt.keys]]
jwks_file = "{jwks}"

[issuers.other]
iss = "https://other.test"
algorithms = ["HS256"]
[[issuers.other.keys]]
algorithms = ["HS256"]
secret = {{ env = "TG_TEST_SECRET" }}
"#,
        rsa = k("rsa.pub.pem"),
        p256 = k("p256.pub.pem"),
        p384 = k("p384.pub.pem"),
        ed = k("ed25519.pub.pem"),
        hmac = k("hmac.secret"),
        jwks = fixture("jwks.json").display(),
    )
}

pub fn set_secret_env() {
    // SAFETY: every test sets the same value; nothing reads it concurrently with a different one.
    unsafe { std::env::set_var("TG_TEST_SECRET", SECRET) };
}

/// Settings from config text (panics with every problem if invalid).
pub fn settings(text: &str) -> config::Settings {
    set_secret_env();
    config::parse(text, &[], Path::new(".")).unwrap_or_else(|p| panic!("config problems: {p:#?}"))
}

/// The engine and the route rules of config text.
pub fn engine(text: &str) -> (Arc<Verifier>, Vec<config::RouteRules>) {
    let s = settings(text);
    (Arc::new(Verifier::new(s.issuers, &s.cache)), s.routes.into_iter().map(|r| r.rules).collect())
}

/// Runs a future that never awaits anything real to completion.
pub fn now_or_never<F: std::future::Future>(f: F) -> F::Output {
    futures_util::FutureExt::now_or_never(f).expect("future completed without I/O")
}

pub fn open_policy() -> (TokenSpec, Policy) {
    (TokenSpec::default(), Policy::default())
}

/// The test Redis URL (scripts/test starts one).
pub fn redis_url() -> String {
    std::env::var("TOKENGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to the test Redis, or a failure that says what is missing.
pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    tokengate::revocation::edit::redis_connect(&url)
        .await
        .unwrap_or_else(|e| panic!("Redis is required at {url} ({e:#}); scripts/test installs and starts it"))
}

/// A key prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!("tgtest:{test}:{}:", uuid::Uuid::new_v4().simple())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server of the test's own (to stop and restart without disturbing other tests).
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start(port: u16) -> OwnRedis {
        OwnRedis::start_with(port, &[])
    }

    /// With extra `redis-server` arguments (`--dir` to keep a snapshot across restarts).
    pub fn start_with(port: u16, extra: &[&str]) -> OwnRedis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is required (scripts/setup installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return OwnRedis { port, child: Some(child) };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server on port {port} did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the tokengate binary with args; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(args)
        .env("TG_TEST_SECRET", SECRET)
        .env_remove("TOKENGATE_REDIS_URL")
        .output()
        .expect("the tokengate binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The start of a gate config for tests: a short shutdown, no admin endpoint, optionally a
/// `[redis]` revocation list `(url, prefix)`, and the test issuers.
pub fn gate_preamble(redis: Option<(String, String)>) -> String {
    let redis = redis.map_or(String::new(), |(url, p)| format!("[redis]\nurl = \"{url}\"\nprefix = \"{p}\"\n"));
    format!("shutdown_timeout = \"10s\"\n{redis}[admin]\nlisten = \"\"\n{}", issuers_toml())
}
