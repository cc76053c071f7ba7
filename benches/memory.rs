//! Memory of the verified-token cache: RSS per cached token beyond the token's own bytes, for
//! `TOKENGATE_BENCH_TOKENS` distinct tokens (default 100,000) each seen twice (cached on the second
//! sight), and the RSS of the same number of tokens seen once (not cached), in the same run.
//!
//! cargo bench --bench memory

use std::path::Path;

use futures_util::FutureExt as _;
use jsonwebtoken::Algorithm;
use tokengate::config;
use tokengate::verify::Verifier;

mod common;

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kb.unwrap_or(0u64) * 1024
}

fn main() {
    common::set_secret_env();
    let n: usize = std::env::var("TOKENGATE_BENCH_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let text = format!(
        "{}\n[cache]\nmax_entries = {}\n[routes.orders]\nrequire = [{{ claim = \"scope\", any_of = [\"orders:write\"] }}]\n",
        common::issuer_toml(),
        2 * n
    );
    let s = config::parse(&text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    let policy = s.routes[0].rules.policy.clone();
    let verifier = Verifier::new(s.issuers, &s.cache);
    let now = tokengate::verify::unix_now();
    let once = common::mint(Algorithm::HS256, n);
    let twice: Vec<String> = common::mint(Algorithm::HS256, 2 * n).split_off(n);
    let token_bytes = twice.iter().map(String::len).sum::<usize>() as f64 / n as f64;
    let verify = |t: &str| verifier.verify(&policy, t, now).now_or_never().unwrap().unwrap().unwrap();

    let before = rss();
    for t in &once {
        verify(t);
    }
    let after_once = rss();
    for t in &twice {
        verify(t);
        verify(t);
    }
    let after_twice = rss();
    let per_once = after_once.saturating_sub(before) as f64 / n as f64;
    let per_cached = after_twice.saturating_sub(after_once) as f64 / n as f64;
    println!("verified-token cache, {n} HS256 tokens of {token_bytes:.0} B (iss, aud, sub, iat, exp, jti, scope):");
    println!("| tokens | RSS growth | per token | beyond the token's bytes |");
    println!("|---|---:|---:|---:|");
    println!("| {n} seen once (not cached) | {} KB | {per_once:.0} B | - |", after_once.saturating_sub(before) / 1024);
    println!(
        "| {n} seen twice (cached) | {} KB | {per_cached:.0} B | {:.0} B |",
        after_twice.saturating_sub(after_once) / 1024,
        per_cached - token_bytes
    );
}
