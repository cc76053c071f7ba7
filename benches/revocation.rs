//! Revocation lookups per second with the tracked local cache versus going to Redis for every
//! message, in the same run, and the write-to-effect latency of a revocation under load.
//!
//! cargo bench --bench revocation        (needs Redis at TOKENGATE_TEST_REDIS or 127.0.0.1:6379)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use tokengate::revocation::{Kind, Revocations, TokenIds, key};
use tokio_util::sync::CancellationToken;

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
                check(i % TOKENS).await;
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
    let cached = Arc::new(
        Revocations::redis(tokengate::revocation::connection_info(&url, None).unwrap(), &prefix, cancel.clone())
            .unwrap(),
    );
    assert!(cached.wait_up(Duration::from_secs(10)).await, "Redis is required at {url}");
    let conn = tokengate::revocation::edit::redis_connect(&url).await.unwrap();

    // Baseline: the same lookup (EXISTS per key + MGET, one round trip) for every message.
    let plain = {
        let conn = conn.clone();
        let prefix = prefix.clone();
        throughput(move |i| {
            let mut conn = conn.clone();
            let keys: Vec<String> = ids(i).keys(&prefix).into_iter().map(|(_, k)| k).collect();
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
            let k = key(&prefix, Kind::Jti, &format!("bench-jti-{i}"));
            async move {
                let _: Option<String> = conn.get(k).await.unwrap();
            }
        })
        .await
    };
    let trips_before = cached.round_trips();
    let with_cache = {
        let r = Arc::clone(&cached);
        throughput(move |i| {
            let r = Arc::clone(&r);
            async move {
                assert!(r.check_ids(&ids(i)).await.unwrap().is_none());
            }
        })
        .await
    };
    let trips = cached.round_trips() - trips_before;

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
        assert!(cached.check_ids(&ids(t)).await.unwrap().is_none()); // primed: cached "not revoked"
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

    println!("revocation lookups, {CHECKS} checks over {TOKENS} tokens, {IN_FLIGHT} in flight, Redis {url}");
    println!("| mode | lookups/s | Redis round trips |");
    println!("|---|---:|---:|");
    println!("| GET of one key per message (baseline) | {single_get:.0} | {CHECKS} |");
    println!("| EXISTS x4 + MGET per message (baseline) | {plain:.0} | {CHECKS} |");
    println!("| tracked local cache (tokengate) | {with_cache:.0} | {trips} |");
    println!();
    println!("write-to-effect under load, {TRIALS} revocations written with SET by another connection:");
    println!("p50 {:?}  p99 {:?}  max {:?}", pct(&latencies, 0.50), pct(&latencies, 0.99), latencies.last().unwrap());
    let mut c = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut c).await.unwrap();
    if !keys.is_empty() {
        let _: () = c.del(keys).await.unwrap();
    }
    cancel.cancel();
}
