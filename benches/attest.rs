//! The added cost per message of signing an attestation: building the trusted copy of an accepted
//! message (`gate::forward`) on a route without attestation and on the same route attesting with
//! an Ed25519 or a P-256 key, in the same run. And the added cost of checking a proof of
//! possession: the whole decision of a message with a cached token on a route without proofs and
//! on routes requiring a proof (P-256 or Ed25519 producer keys) or a payload digest claim.
//!
//! cargo bench --bench attest

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use jsonwebtoken::Algorithm;
use tokengate::config;
use tokengate::envelope::HeaderData;
use tokengate::verify::{self, Verifier};

mod common;

deployed_allocator!();

fn routes() -> (config::Settings, Verifier) {
    common::set_secret_env();
    let key = |n: &str| common::keys_dir().join(n).display().to_string();
    let route = |name: &str, active: Option<&str>| {
        let attest = active.map_or(String::new(), |_| {
            format!("[routes.{name}.attest]\nkeep = [\"sub\", \"scope\"]\nrename = {{ sub = \"user\" }}\n")
        });
        format!("[routes.{name}]\nrequire = [{{ claim = \"scope\", any_of = [\"orders:write\"] }}]\n{attest}")
    };
    let text = format!(
        "{issuers}\n{plain}{ed}\n[attestation]\nissuer = \"tokengate.bench\"\nactive = \"ed\"\nkeys = [\n  {{ kid = \"ed\", algorithm = \"EdDSA\", pem_file = \"{ed_key}\" }},\n]\n",
        issuers = common::issuer_toml(),
        plain = route("plain", None),
        ed = route("ed", Some("ed")),
        ed_key = key("ed25519.key.pem"),
    );
    let mut s = config::parse(&text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    let verifier = Verifier::new(std::mem::take(&mut s.issuers), &s.cache);
    (s, verifier)
}

fn es256_route() -> config::RouteSettings {
    let key = common::keys_dir().join("p256.key.pem").display().to_string();
    let text = format!(
        "{}\n[routes.p256]\nrequire = [{{ claim = \"scope\", any_of = [\"orders:write\"] }}]\n[routes.p256.attest]\nkeep = [\"sub\", \"scope\"]\n\n[attestation]\nissuer = \"tokengate.bench\"\nactive = \"p\"\nkeys = [{{ kid = \"p\", algorithm = \"ES256\", pem_file = \"{key}\" }}]\n",
        common::issuer_toml()
    );
    config::parse(&text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}")).routes.remove(0)
}

fn bench(c: &mut Criterion) {
    let (mut s, verifier) = routes();
    s.routes.push(es256_route());
    let token = common::mint(Algorithm::RS256, 1).remove(0);
    let now = verify::unix_now();
    let policy = s.routes[0].rules.policy.clone();
    let v = verifier.verify(&policy, &token, now).now_or_never().unwrap().unwrap().unwrap();
    let env = common::record(vec![b'x'; 256], vec![common::bearer(&token)]);
    let mut g = c.benchmark_group("forward");
    // The pass-through copy (no verified token: no identity headers), what a reused token's
    // trusted copy is held against.
    g.bench_function("pass-through", |b| {
        b.iter(|| tokengate::gate::forward(&s.routes[0].rules, black_box(&env), None))
    });
    for r in &s.routes {
        let label = match r.rules.name.as_str() {
            "plain" => "no attestation",
            "ed" => "attested EdDSA",
            _ => "attested ES256",
        };
        g.bench_function(label, |b| b.iter(|| tokengate::gate::forward(&r.rules, black_box(&env), Some(&v))));
    }
    g.finish();
}

fn proof_bench(c: &mut Criterion) {
    use tokengate::gate::{Gate, Outcome};
    common::set_secret_env();
    let route = |name: &str, proof: &str| {
        format!("[routes.{name}]\nrequire = [{{ claim = \"scope\", any_of = [\"orders:write\"] }}]\n{proof}")
    };
    let text = format!(
        "{}\n{}{}{}",
        common::issuer_toml(),
        route("plain", ""),
        route("jkt", "[routes.jkt.proof]\nmode = \"jkt\"\n"),
        route("digest", "[routes.digest.proof]\nmode = \"digest_claim\"\n"),
    );
    let mut s = config::parse(&text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    let verifier = Arc::new(Verifier::new(std::mem::take(&mut s.issuers), &s.cache));
    let pass_through = Gate::pass_through(Arc::clone(&verifier));
    let gate = Gate::new(verifier, None, config::OnUnavailable::Hold);
    let payload = vec![b'x'; 256];
    let mut g = c.benchmark_group("decide");
    for (label, route, alg, key) in [
        ("no proof", "plain", None, None),
        ("proof ES256", "jkt", Some(Algorithm::ES256), Some("p256.key.pem")),
        ("proof EdDSA", "jkt", Some(Algorithm::EdDSA), Some("ed25519.key.pem")),
        ("digest claim", "digest", None, None),
    ] {
        // Read per case: a clock read once would put later cases' tokens in the future.
        let now = verify::unix_now();
        let mut headers = Vec::new();
        let mut extra = serde_json::Map::new();
        if let (Some(alg), Some(key)) = (alg, key) {
            let k = tokengate::attest::SigningKey::from_pem("p", alg, &common::key_file(key)).unwrap();
            extra.insert("cnf".into(), serde_json::json!({"jkt": verify::proof::thumbprint(&k.jwk).unwrap()}));
            let proof = k.proof(Some(b"order-42"), &payload, "j", now).unwrap();
            headers.push(("x-token-proof".to_owned(), HeaderData::Bytes(proof.into_bytes())));
        }
        if route == "digest" {
            extra.insert("msg_sha256".into(), serde_json::json!(verify::sha256_hex(&payload)));
        }
        let token = common::mint_with(Algorithm::RS256, extra);
        headers.push(common::bearer(&token));
        let env = common::record(payload.clone(), headers);
        let rules = &s.routes.iter().find(|r| r.rules.name == route).expect("the route").rules;
        // Seen twice first: the token is cached, as a reused token is.
        for _ in 0..2 {
            let out = gate.handle(rules, &env, now).now_or_never().unwrap().unwrap();
            if let Outcome::DeadLetter(_, r) = out {
                panic!("{label}: the bench message must pass: {r:?}");
            }
        }
        g.bench_function(label, |b| {
            b.iter(|| gate.handle(rules, black_box(&env), now).now_or_never().unwrap().unwrap())
        });
        if route == "plain" {
            g.bench_function("pass-through", |b| {
                b.iter(|| pass_through.handle(rules, black_box(&env), now).now_or_never().unwrap().unwrap())
            });
            // A route's chunk of 64 decided together (time per chunk; /64 per message): the
            // pipeline's way against `join_all`, which gives each of more than 30 a task.
            let chunk = vec![env.clone(); tokengate::pipeline::CHUNK];
            let decide = || chunk.iter().map(|e| gate.handle(rules, e, now));
            g.bench_function("chunk of 64, join_all", |b| {
                b.iter(|| futures_util::future::join_all(decide()).now_or_never().unwrap())
            });
            g.bench_function("chunk of 64, all_in_order", |b| {
                b.iter(|| tokengate::pipeline::all_in_order(decide()).now_or_never().unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench, proof_bench);
criterion_main!(benches);
