//! What the bench binaries share: the test issuer, its keys, and token minting.
#![allow(dead_code)]

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The HMAC secret of the bench issuer (test-only, like the fixture keys).
pub const SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

/// The committed test keys.
pub fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys")
}

/// A fixture key file's bytes.
pub fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap()
}

/// Exposes `SECRET` to the config (`secret = { env = "TG_BENCH_SECRET" }`).
pub fn set_secret_env() {
    // SAFETY: called at the start of a bench, before other threads read the environment.
    unsafe { std::env::set_var("TG_BENCH_SECRET", SECRET) };
}

/// `[issuers.idp]` with one pinned key per algorithm: HS256, RS256, ES256, EdDSA.
pub fn issuer_toml() -> String {
    let k = |n: &str| keys_dir().join(n).display().to_string();
    format!(
        r#"
[issuers.idp]
iss = "https://idp.bench"
audiences = ["tokengate"]
algorithms = ["HS256", "RS256", "ES256", "EdDSA"]
[[issuers.idp.keys]]
kid = "hs"
algorithms = ["HS256"]
secret = {{ env = "TG_BENCH_SECRET" }}
[[issuers.idp.keys]]
kid = "rsa"
algorithms = ["RS256"]
pem_file = "{rsa}"
[[issuers.idp.keys]]
kid = "p256"
algorithms = ["ES256"]
pem_file = "{p256}"
[[issuers.idp.keys]]
kid = "ed25519"
algorithms = ["EdDSA"]
pem_file = "{ed}"
"#,
        rsa = k("rsa.pub.pem"),
        p256 = k("p256.pub.pem"),
        ed = k("ed25519.pub.pem"),
    )
}

/// The signing key of `alg` and the kid the issuer knows it by.
pub fn signing_key(alg: Algorithm) -> (EncodingKey, &'static str) {
    match alg {
        Algorithm::HS256 => (EncodingKey::from_secret(SECRET.as_bytes()), "hs"),
        Algorithm::RS256 => (EncodingKey::from_rsa_pem(&key_file("rsa.key.pem")).unwrap(), "rsa"),
        Algorithm::ES256 => (EncodingKey::from_ec_pem(&key_file("p256.key.pem")).unwrap(), "p256"),
        Algorithm::EdDSA => (EncodingKey::from_ed_pem(&key_file("ed25519.key.pem")).unwrap(), "ed25519"),
        other => panic!("no bench key for {other:?}"),
    }
}

/// `n` distinct valid tokens (subject `svc-i`), signed on every core (RSA signing is ~1 ms).
pub fn mint(alg: Algorithm, n: usize) -> Vec<String> {
    let (key, kid) = signing_key(alg);
    let now = tokengate::verify::unix_now();
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    let sign = |i: usize| {
        let c = json!({"iss": "https://idp.bench", "aud": "tokengate", "sub": format!("svc-{i}"), "iat": now,
                       "exp": now + 3600, "jti": format!("j{i}"), "scope": "orders:write"});
        jsonwebtoken::encode(&h, &c, &key).unwrap()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || (t * per..((t + 1) * per).min(n)).map(sign).collect::<Vec<_>>()))
            .collect();
        parts.into_iter().flat_map(|p| p.join().unwrap()).collect()
    })
}

/// One token of `alg` with the usual claims plus `extra`.
pub fn mint_with(alg: Algorithm, extra: serde_json::Map<String, serde_json::Value>) -> String {
    let (key, kid) = signing_key(alg);
    let now = tokengate::verify::unix_now();
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    let mut c = json!({"iss": "https://idp.bench", "aud": "tokengate", "sub": "svc", "iat": now,
                       "exp": now + 3600, "jti": "j", "scope": "orders:write"});
    for (k, v) in extra {
        c[k] = v;
    }
    jsonwebtoken::encode(&h, &c, &key).unwrap()
}

/// The words of `TOKENGATE_BENCH_ONLY` (comma-separated), which pick the runs of a bench.
pub fn only_words() -> Vec<String> {
    std::env::var("TOKENGATE_BENCH_ONLY")
        .map(|v| v.split(',').map(|w| w.trim().to_owned()).filter(|w| !w.is_empty()).collect())
        .unwrap_or_default()
}

/// Whether `word` of `TOKENGATE_BENCH_ONLY` keeps the run labelled `label`: a plain word must be
/// in the label, a word with a leading '-' must not ("-once": no exactly-once runs).
pub fn keeps(word: &str, label: &str) -> bool {
    match word.strip_prefix('-') {
        Some(w) => !label.contains(w),
        None => label.contains(word),
    }
}

/// Makes the bench binary run on the allocator the `tokengate` binary runs with (see
/// `src/main.rs`), so that the benches measure the gate as deployed.
#[macro_export]
macro_rules! deployed_allocator {
    () => {
        #[global_allocator]
        static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
    };
}

/// The producer's token header: `authorization: Bearer <token>`.
pub fn bearer(token: &str) -> (String, tokengate::envelope::HeaderData) {
    ("authorization".into(), tokengate::envelope::HeaderData::Bytes(format!("Bearer {token}").into_bytes()))
}

/// A Kafka record as the Kafka source makes it (key `order-42`, topic `orders`), with `payload`
/// and `headers`.
pub fn record(
    payload: Vec<u8>,
    headers: Vec<(String, tokengate::envelope::HeaderData)>,
) -> tokengate::envelope::Envelope {
    tokengate::envelope::Envelope {
        key: Some(b"order-42".to_vec()),
        payload: Some(payload),
        headers,
        timestamp_ms: Some(1),
        origin: tokengate::envelope::Origin::Kafka {
            topic: std::sync::Arc::from("orders"),
            partition: 3,
            offset: 12345,
        },
        amqp: None,
        amqp_headers: None,
        defect: None,
    }
}
