//! Revocation lookups per second with the local mirror, with per-key lookups and their tracked
//! cache, and going to Redis for every message, in the same run, for reused and for never-seen
//! tokens; the write-to-effect latency of a revocation under load; and the mirror's memory and
//! load time for a list of `TOKENGATE_BENCH_MIRROR_ENTRIES` entries (default 1,000,000).
//!
//! cargo bench --bench revocation        (needs Redis at TOKENGATE_TEST_REDIS or 127.0.0.1:6379)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use tokengate::revocation::{Kind, Revocations, TokenIds, key};
use tokio_util::sync::CancellationToken;

mod common;

/// The allocator the `tokengate` binary runs with (see `src/main.rs`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKENS: usize = 1_000;
const CHECKS: usize = 200_000;
const IN_FLIGHT: usize = 64;
const TRIALS: usize = 200;

fn ids(i: usize) -> TokenIds {
    TokenIds {
        jti: Some(format!("bench-jti-{i}")),
        sub: Some(format!("user-{}", i % 50)),
        iat: Some(1_800_000_000),
        kid: Some("k1".into()),
        fingerprint: format!("{i:064x}"),
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kb.unwrap_or(0u64) * 1024
}

async fn list(url: &str, prefix: &str, mirror_max_entries: usize, cancel: &CancellationToken) -> Arc<Revocations> {
    let info = tokengate::revocation::connection_info(url, None).unwrap();
    let r = Arc::new(Revocations::redis(info, prefix, mirror_max_entries, cancel.clone()).unwrap());
    assert!(r.wait_up(Duration::from_secs(10)).await, "Redis is required at {url}");
    r
}

async fn until_mirrored(r: &Revocations, entries: usize) -> Duration {
    let start = Instant::now();
    while r.mirror() != Some((tokengate::revocation::mirror::State::Synced, entries)) {
        assert!(start.elapsed() < Duration::from_secs(600), "mirror never loaded: {:?}", r.mirror());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Lookups per second and Redis round trips of `r` over reused tokens (`TOKENS` distinct) or
/// every token new (ids never seen, offset by `fresh`).
async fn bench_list(r: &Arc<Revocations>, fresh: Option<usize>) -> (f64, u64) {
    let before = r.round_trips();
    let r2 = Arc::clone(r);
    let rate = throughput(move |i| {
        let r = Arc::clone(&r2);
        async move {
            let id = match fresh {
                Some(base) => ids(base + i),
                None => ids(i % TOKENS),
            };
            assert!(r.check_ids(&id).await.unwrap().is_none());
        }
    })
    .await;
    (rate, r.round_trips() - before)
}

const ONE_TOKEN_CHECKS: u32 = 1_000_000;

/// ns per check of one verified token, on one thread: its four keys looked up in the mirror
/// (`check_ids`), and `check` of the token itself, remembered as absent in the mirror's current
/// generation after its first check (a reused token while the list does not change).
async fn one_token(r: &Revocations) -> (f64, f64) {
    common::set_secret_env();
    let text = format!("{}\n[routes.r]\n", common::issuer_toml());
    let s = tokengate::config::parse(&text, &[], std::path::Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
    let verifier = tokengate::verify::Verifier::new(s.issuers, &s.cache);
    let token = common::mint(jsonwebtoken::Algorithm::HS256, 1).remove(0);
    let v = verifier.verify_token(&token, tokengate::verify::unix_now()).await.unwrap().unwrap();
    let ids = TokenIds::of(&v);
    let time = |f: &dyn Fn() -> bool| {
        let start = Instant::now();
        for _ in 0..ONE_TOKEN_CHECKS {
            assert!(f());
        }
        start.elapsed().as_nanos() as f64 / f64::from(ONE_TOKEN_CHECKS)
    };
    use futures_util::FutureExt as _;
    let looked_up = time(&|| r.check_ids(std::hint::black_box(&ids)).now_or_never().unwrap().unwrap().is_none());
    let remembered = time(&|| r.check(std::hint::black_box(&v)).now_or_never().unwrap().unwrap().is_none());
    (looked_up, remembered)
}

/// Runs `CHECKS` lookups with `IN_FLIGHT` concurrent workers; returns lookups per second.
async fn throughput<F, Fut>(check: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..IN_FLIGHT {
        let check = check.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < CHECKS {
                check(i).await;
                i += IN_FLIGHT;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    CHECKS as f64 / start.elapsed().as_secs_f64()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let url = std::env::var("TOKENGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("tgbench:{}:", std::process::id());
    let cancel = CancellationToken::new();
    let per_key = list(&url, &prefix, 0, &cancel).await;
    let cached = list(&url, &prefix, 1_000_000, &cancel).await;
    until_mirrored(&cached, 0).await;
    let conn = tokengate::revocation::edit::redis_connect(&url).await.unwrap();

    // Baseline: the same lookup (EXISTS per key + MGET, one round trip) for every message.
    let plain = {
        let conn = conn.clone();
        let prefix = prefix.clone();
        throughput(move |i| {
            let mut conn = conn.clone();
            let keys: Vec<String> = ids(i % TOKENS).keys(&prefix).into_iter().map(|(_, k)| k).collect();
            async move {
                let names: Vec<&str> = keys.iter().map(String::as_str).collect();
                tokengate::revocation::schema::fetch(&mut conn, &names).await.unwrap();
            }
        })
        .await
    };
    let single_get = {
        let conn = conn.clone();
        let prefix = prefix.clone();
        throughput(move |i| {
            let mut conn = conn.clone();
            let k = key(&prefix, Kind::Jti, &format!("bench-jti-{}", i % TOKENS));
            async move {
                let _: Option<String> = conn.get(k).await.unwrap();
            }
        })
        .await
    };
    let (per_key_reused, per_key_reused_trips) = bench_list(&per_key, None).await;
    let (per_key_new, per_key_new_trips) = bench_list(&per_key, Some(1_000_000)).await;
    let (mirror_reused, mirror_reused_trips) = bench_list(&cached, None).await;
    let (mirror_new, mirror_new_trips) = bench_list(&cached, Some(2_000_000)).await;
    let (looked_up_ns, remembered_ns) = one_token(&cached).await;

    // Write-to-effect: a steady load checks every token in a loop; we revoke one primed token at
    // a time through a separate connection and time the first rejection the load observes.
    let stop = Arc::new(AtomicBool::new(false));
    let revoked_at = Arc::new(std::sync::Mutex::new(Vec::<(usize, Instant)>::new()));
    let mut load = Vec::new();
    for w in 0..4 {
        let (r, stop, seen) = (Arc::clone(&cached), Arc::clone(&stop), Arc::clone(&revoked_at));
        load.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let t = TOKENS + (i % TRIALS);
                if r.check_ids(&ids(t)).await.unwrap().is_some() {
                    seen.lock().unwrap().push((t, Instant::now()));
                }
                i += 4;
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in TOKENS..TOKENS + TRIALS {
        assert!(cached.check_ids(&ids(t)).await.unwrap().is_none()); // seen: "not revoked"
    }
    let mut writer = conn.clone();
    let mut latencies = Vec::new();
    for t in TOKENS..TOKENS + TRIALS {
        let k = key(&prefix, Kind::Jti, &format!("bench-jti-{t}"));
        let start = Instant::now();
        let _: () = writer.set(&k, "bench").await.unwrap();
        let first = loop {
            if let Some(&(_, at)) = revoked_at.lock().unwrap().iter().find(|(i, _)| *i == t) {
                break at;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "revocation of {t} never took effect");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        latencies.push(first.saturating_duration_since(start));
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    latencies.sort();

    println!("revocation lookups, {CHECKS} checks, {IN_FLIGHT} in flight, Redis {url}");
    println!("| mode | tokens | lookups/s | Redis round trips |");
    println!("|---|---|---:|---:|");
    println!("| GET of one key per message (baseline) | {TOKENS} reused | {single_get:.0} | {CHECKS} |");
    println!("| EXISTS x4 + MGET per message (baseline) | {TOKENS} reused | {plain:.0} | {CHECKS} |");
    println!(
        "| per-key lookups + tracked cache (mirror off) | {TOKENS} reused | {per_key_reused:.0} | {per_key_reused_trips} |"
    );
    println!(
        "| per-key lookups + tracked cache (mirror off) | every one new | {per_key_new:.0} | {per_key_new_trips} |"
    );
    println!("| local mirror (tokengate default) | {TOKENS} reused | {mirror_reused:.0} | {mirror_reused_trips} |");
    println!("| local mirror (tokengate default) | every one new | {mirror_new:.0} | {mirror_new_trips} |");
    println!();
    println!("one verified token checked {ONE_TOKEN_CHECKS} times on one thread (the gate's check of a reused token):");
    println!("| check | ns per check |");
    println!("|---|---:|");
    println!(
        "| mirror lookup of its four keys (`check_ids`: every check before issue 13's generations) | {looked_up_ns:.0} |"
    );
    println!("| found absent in this generation of the mirror (`check`, a reused token) | {remembered_ns:.0} |");
    println!();
    println!("write-to-effect under load (mirror), {TRIALS} revocations written with SET by another connection:");
    println!("p50 {:?}  p99 {:?}  max {:?}", pct(&latencies, 0.50), pct(&latencies, 0.99), latencies.last().unwrap());

    // Memory: a list of N entries (jti keys of 36-character ids, a 19-byte reason) mirrored.
    let n: usize =
        std::env::var("TOKENGATE_BENCH_MIRROR_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mem_prefix = format!("tgbench:{}:mem:", std::process::id());
    let mut w = conn.clone();
    for start in (0..n).step_by(10_000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 10_000).min(n) {
            let id = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
            pipe.cmd("SET").arg(key(&mem_prefix, Kind::Jti, &id)).arg("revoked by operator").ignore();
        }
        let () = pipe.query_async(&mut w).await.unwrap();
    }
    let key_bytes = key(&mem_prefix, Kind::Jti, "00000000-0000-4000-8000-000000000000").len();
    let before = rss();
    let big = list(&url, &mem_prefix, n, &cancel).await;
    let load = until_mirrored(&big, n).await;
    let after = rss();
    let per_entry = (after.saturating_sub(before)) as f64 / n as f64;
    let (big_looked_up_ns, big_remembered_ns) = one_token(&big).await;
    println!();
    println!(
        "mirror of {n} entries (key {key_bytes} B, value 19 B): loaded in {load:.1?}; RSS {} MB -> {} MB, {per_entry:.0} B per entry ({:.0} B beyond key and value)",
        before / 1_000_000,
        after / 1_000_000,
        per_entry - (key_bytes + 19) as f64
    );
    println!(
        "one verified token against this mirror, {ONE_TOKEN_CHECKS} checks on one thread: {big_looked_up_ns:.0} ns per mirror lookup of its four keys, {big_remembered_ns:.0} ns found absent in this generation"
    );
    let mut c = conn.clone();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{mem_prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut c)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = c.del(keys).await.unwrap();
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut c = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut c).await.unwrap();
    if !keys.is_empty() {
        let _: () = c.del(keys).await.unwrap();
    }
    cancel.cancel();
}
