//! Memory of the verified-token cache: heap bytes and RSS per cached token beyond the token's own
//! bytes, for `TOKENGATE_BENCH_TOKENS` distinct tokens (default 100,000) each seen twice (cached on
//! the second sight), and the same for as many tokens seen once (not cached), in the same run.
//! Heap bytes are counted by the allocator (live bytes requested, what the cache holds whatever
//! the allocator); RSS is what the process holds, on the allocator the binary runs with.
//!
//! cargo bench --bench memory

use std::alloc::{GlobalAlloc, Layout};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};

use futures_util::FutureExt as _;
use jsonwebtoken::Algorithm;
use tokengate::config;
use tokengate::verify::Verifier;

mod common;

/// The binary's allocator, counting the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes live on the heap now.
fn heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Resident memory after mimalloc has handed what is free back to the system: minting the
/// tokens frees far more than the cache takes, and RSS would otherwise not move at all.
fn settled_rss() -> u64 {
    // SAFETY: mi_collect only frees memory no allocation uses; it takes no pointers.
    unsafe { libmimalloc_sys::mi_collect(true) };
    rss()
}

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

    let (before, heap_before) = (settled_rss(), heap());
    for t in &once {
        verify(t);
    }
    let (after_once, heap_once) = (settled_rss(), heap());
    for t in &twice {
        verify(t);
        verify(t);
    }
    let (after_twice, heap_twice) = (settled_rss(), heap());
    let heap_per_once = (heap_once - heap_before) as f64 / n as f64;
    let heap_per_cached = (heap_twice - heap_once) as f64 / n as f64;
    let per_once = after_once.saturating_sub(before) as f64 / n as f64;
    let per_cached = after_twice.saturating_sub(after_once) as f64 / n as f64;
    println!("verified-token cache, {n} HS256 tokens of {token_bytes:.0} B (iss, aud, sub, iat, exp, jti, scope):");
    println!("| tokens | heap per token | RSS growth | RSS per token | RSS beyond the token's bytes |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| {n} seen once (not cached) | {heap_per_once:.0} B | {} KB | {per_once:.0} B | - |",
        after_once.saturating_sub(before) / 1024
    );
    println!(
        "| {n} seen twice (cached) | {heap_per_cached:.0} B | {} KB | {per_cached:.0} B | {:.0} B |",
        after_twice.saturating_sub(after_once) / 1024,
        per_cached - token_bytes
    );
    println!("The cache keeps no token text (its key is a 32-byte digest): heap per cached token is all overhead.");
}
