//! The added cost per message of signing an attestation: building the trusted copy of an accepted
//! message (`gate::forward`) on a route without attestation and on the same route attesting with
//! an Ed25519 or a P-256 key, in the same run.
//!
//! cargo bench --bench attest

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use jsonwebtoken::Algorithm;
use tokengate::config;
use tokengate::envelope::{Envelope, HeaderData, Origin};
use tokengate::verify::{self, Verifier};

mod common;

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
    let env = Envelope {
        key: Some(b"order-42".to_vec()),
        payload: Some(vec![b'x'; 256]),
        headers: vec![("authorization".into(), HeaderData::Bytes(format!("Bearer {token}").into_bytes()))],
        timestamp_ms: Some(1),
        origin: Origin::Kafka { topic: Arc::from("orders"), partition: 3, offset: 12345 },
        amqp: None,
        amqp_headers: None,
        defect: None,
    };
    let mut g = c.benchmark_group("forward");
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

criterion_group!(benches, bench);
criterion_main!(benches);
