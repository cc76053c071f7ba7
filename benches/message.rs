//! One Kafka message through the gate, without the broker: the source's envelope copied, the
//! decision ([`Gate::handle`]) and the trusted copy's Kafka headers built
//! ([`Sink::prepare`]), for pass-through, a reused token and a token never seen before, per
//! algorithm, in the same run. What the end-to-end Kafka bench measures over pass-through, less
//! the broker, librdkafka's I/O and the scheduling noise of a shared host. No revocation list
//! (section 2 of BENCHMARKS.md has its lookups).
//!
//! cargo bench --bench message
//! For a profile or a CPU count of one case: `TOKENGATE_BENCH_COUNT=N` runs each case picked by
//! `TOKENGATE_BENCH_ONLY` (say `HS256,new`) N times, untimed, under `perf record` or `perf stat`
//! (`-e task-clock`; `instructions:u` where the host has counters); N = 0 gives the set-up's share.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use jsonwebtoken::Algorithm;
use rdkafka::ClientConfig;
use tokengate::config::{OnUnavailable, RouteRules};
use tokengate::envelope::Envelope;
use tokengate::gate::{Gate, Outcome};
use tokengate::sink::Sink;
use tokengate::sink::kafka::KafkaSink;
use tokengate::verify::{self, Verifier};

mod common;

deployed_allocator!();

/// The Kafka bench's route, with its cache of `cache_entries` tokens.
fn route(cache_entries: u64) -> (Arc<Verifier>, RouteRules) {
    common::set_secret_env();
    let text = format!(
        "{}\n[routes.bench]\nrequire = [{{ claim = \"scope\", any_of = [\"orders:write\"] }}]\n",
        common::issuer_toml()
    );
    let mut s = tokengate::config::parse(&text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    s.cache.max_entries = cache_entries;
    let rules = s.routes.remove(0).rules;
    (Arc::new(Verifier::new(s.issuers, &s.cache)), rules)
}

/// A record as the Kafka source makes it: key, 256 B payload, the producer's token header.
fn envelope(token: &str) -> Envelope {
    common::record(vec![b'x'; 256], vec![common::bearer(token)])
}

/// The source's copy, the decision and the trusted copy's headers, as the route does them.
fn one(gate: &Gate, rules: &RouteRules, sink: &Sink, template: &Envelope, now: i64) {
    let env = black_box(template.clone());
    match gate.handle(rules, &env, now).now_or_never().expect("decided at once").expect("not held") {
        Outcome::Forward(mut out) => {
            sink.prepare(&mut out);
            black_box(out);
        }
        Outcome::DeadLetter(_, r) => panic!("rejected: {r:?}"),
    }
}

fn bench(c: &mut Criterion) {
    // Never connects: only builds headers.
    let producer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").clone();
    let sink = Sink::Kafka(KafkaSink::new(producer, "orders-trusted").unwrap());
    let (verifier, rules) = route(100_000);
    let (small, _) = route(1024);
    let pass = Gate::pass_through(Arc::clone(&verifier));
    let reused = Gate::new(verifier, None, OnUnavailable::Hold);
    let new = Gate::new(small, None, OnUnavailable::Hold);
    let count: Option<usize> = std::env::var("TOKENGATE_BENCH_COUNT").ok().and_then(|v| v.parse().ok());
    let only = common::only_words();
    for alg in [Algorithm::HS256, Algorithm::RS256] {
        let now = verify::unix_now();
        let template = envelope(&common::mint(alg, 1).remove(0));
        if let Some(n) = count {
            let picked = |case: &str| only.iter().all(|w| common::keeps(w, &format!("{alg:?} {case}")));
            let pool: Vec<Envelope> = match picked("new") {
                true => common::mint(alg, 5000).iter().map(|t| envelope(t)).collect(),
                false => Vec::new(),
            };
            for (case, gate) in [("pass_through", &pass), ("reused", &reused)] {
                if picked(case) {
                    (0..n).for_each(|_| one(gate, &rules, &sink, &template, now));
                }
            }
            pool.iter().cycle().take(n).for_each(|e| one(&new, &rules, &sink, e, now));
            continue;
        }
        let mut g = c.benchmark_group(format!("{alg:?}"));
        g.bench_function("pass_through", |b| b.iter(|| one(&pass, &rules, &sink, &template, now)));
        g.bench_function("reused", |b| b.iter(|| one(&reused, &rules, &sink, &template, now)));
        // 5,000 tokens in turn through a cache of 1,024: nearly every one is new (as in the
        // decision bench's tokengate_new).
        let pool: Vec<Envelope> = common::mint(alg, 5000).iter().map(|t| envelope(t)).collect();
        let mut next = pool.iter().cycle();
        g.bench_function("new", |b| b.iter(|| one(&new, &rules, &sink, next.next().expect("a cycle"), now)));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
