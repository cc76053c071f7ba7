//! The token decision per algorithm: tokengate cached, tokengate uncached, and plain
//! `jsonwebtoken::decode` of the same token in the same run (the baseline).
//!
//! cargo bench --bench decision

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::json;
use tokengate::config;
use tokengate::verify::{self, Verifier};

const SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(rel)).unwrap()
}

fn config_text() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys");
    let k = |n: &str| dir.join(n).display().to_string();
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
pem_file = "{}"
[[issuers.idp.keys]]
kid = "p256"
algorithms = ["ES256"]
pem_file = "{}"
[[issuers.idp.keys]]
kid = "ed25519"
algorithms = ["EdDSA"]
pem_file = "{}"
[routes.orders]
require = [{{ claim = "scope", any_of = ["orders:write"] }}]
"#,
        k("rsa.pub.pem"),
        k("p256.pub.pem"),
        k("ed25519.pub.pem")
    )
}

fn engine(cache_entries: u64) -> (Verifier, verify::Policy) {
    unsafe { std::env::set_var("TG_BENCH_SECRET", SECRET) };
    let mut s = config::parse(&config_text(), &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    s.cache.max_entries = cache_entries;
    let policy = s.routes[0].policy.clone();
    (Verifier::new(s.issuers, &s.cache), policy)
}

fn keys(alg: Algorithm) -> (EncodingKey, DecodingKey, &'static str) {
    match alg {
        Algorithm::HS256 => {
            (EncodingKey::from_secret(SECRET.as_bytes()), DecodingKey::from_secret(SECRET.as_bytes()), "hs")
        }
        Algorithm::RS256 => (
            EncodingKey::from_rsa_pem(&fixture("rsa.key.pem")).unwrap(),
            DecodingKey::from_rsa_pem(&fixture("rsa.pub.pem")).unwrap(),
            "rsa",
        ),
        Algorithm::ES256 => (
            EncodingKey::from_ec_pem(&fixture("p256.key.pem")).unwrap(),
            DecodingKey::from_ec_pem(&fixture("p256.pub.pem")).unwrap(),
            "p256",
        ),
        _ => (
            EncodingKey::from_ed_pem(&fixture("ed25519.key.pem")).unwrap(),
            DecodingKey::from_ed_pem(&fixture("ed25519.pub.pem")).unwrap(),
            "ed25519",
        ),
    }
}

fn bench(c: &mut Criterion) {
    let now = verify::unix_now();
    let (cached, policy) = engine(100_000);
    let (uncached, _) = engine(0);
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
        let (enc, dec, kid) = keys(alg);
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        let claims = json!({
            "iss": "https://idp.bench", "aud": "tokengate", "sub": "service-a", "iat": now,
            "exp": now + 3600, "jti": "b7c1", "scope": "orders:write orders:read",
            "realm_access": {"roles": ["publisher", "reader"]},
        });
        let token = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
        let mut validation = Validation::new(alg);
        validation.set_audience(&["tokengate"]);
        validation.set_issuer(&["https://idp.bench"]);

        let mut g = c.benchmark_group(format!("{alg:?}"));
        g.bench_function("jsonwebtoken_decode", |b| {
            b.iter(|| jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &dec, &validation).unwrap())
        });
        g.bench_function("tokengate_uncached", |b| {
            b.iter(|| uncached.verify(&policy, black_box(&token), now).now_or_never().unwrap().unwrap().unwrap())
        });
        g.bench_function("tokengate_cached", |b| {
            b.iter(|| cached.verify(&policy, black_box(&token), now).now_or_never().unwrap().unwrap().unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
