//! The token decision per algorithm: tokengate cached, tokengate uncached, tokengate with its
//! cache on and every token new (a stream of one-time tokens, as deployed), and plain
//! `jsonwebtoken::decode` of the same token in the same run (the baseline).
//!
//! cargo bench --bench decision

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokengate::config;
use tokengate::verify::{self, Verifier};

mod common;

deployed_allocator!();

fn engine(cache_entries: u64) -> (Verifier, verify::Policy) {
    common::set_secret_env();
    let text = format!(
        "{}\n[routes.orders]\nrequire = [{{ claim = \"scope\", any_of = [\"orders:write\"] }}]\n",
        common::issuer_toml()
    );
    let mut s = config::parse(&text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    s.cache.max_entries = cache_entries;
    let policy = s.routes[0].rules.policy.clone();
    (Verifier::new(s.issuers, &s.cache), policy)
}

/// The baseline's key: the same public key material `jsonwebtoken::decode` is given.
fn decoding_key(alg: Algorithm) -> DecodingKey {
    match alg {
        Algorithm::HS256 => DecodingKey::from_secret(common::SECRET.as_bytes()),
        Algorithm::RS256 => DecodingKey::from_rsa_pem(&common::key_file("rsa.pub.pem")).unwrap(),
        Algorithm::ES256 => DecodingKey::from_ec_pem(&common::key_file("p256.pub.pem")).unwrap(),
        _ => DecodingKey::from_ed_pem(&common::key_file("ed25519.pub.pem")).unwrap(),
    }
}

fn bench(c: &mut Criterion) {
    let (cached, policy) = engine(100_000);
    let (uncached, _) = engine(0);
    // A cache of 1,024 entries has 1,024 first-sight slots: a pool of 5,000 tokens taken in turn
    // overwrites each token's trace before it comes again (all but about 0.7% are seen as new).
    let (small, _) = engine(1024);
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
        let token = common::mint(alg, 1).remove(0);
        // The token's iat: a clock read once for the whole bench would put later tokens in the future.
        let now = verify::unix_now();
        let dec = decoding_key(alg);
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
        let pool = common::mint(alg, 5000);
        let mut next = pool.iter().cycle();
        g.bench_function("tokengate_new", |b| {
            b.iter(|| {
                let t = next.next().expect("a cycle");
                small.verify(&policy, black_box(t), now).now_or_never().unwrap().unwrap().unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
