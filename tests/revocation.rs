//! The Redis revocation list against the real Redis: CLI and raw redis-cli writes, the key
//! schema and TTLs, live effect through the tracked cache, hostile ids, and Redis going away.

use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::Value;
use tokengate::revocation::{Kind, Revocations, TokenIds, key};
use tokio_util::sync::CancellationToken;

use crate::util::*;

fn ids(jti: &str, sub: &str, iat: Option<i64>) -> TokenIds {
    TokenIds { jti: Some(jti.into()), sub: Some(sub.into()), iat, kid: Some("k1".into()), fingerprint: "ab".repeat(32) }
}

async fn tracked(url: &str, prefix: &str) -> (Revocations, CancellationToken) {
    let cancel = CancellationToken::new();
    let r = Revocations::redis(
        tokengate::revocation::connection_info(url, None).unwrap(),
        prefix,
        1_000_000,
        cancel.clone(),
    )
    .unwrap();
    assert!(r.wait_up(Duration::from_secs(10)).await, "Redis is required at {url}; scripts/test starts it");
    (r, cancel)
}

/// Polls `check_ids` until it reports a revocation (liveness, not a latency assertion).
async fn until_revoked(r: &Revocations, t: &TokenIds) -> String {
    for _ in 0..500 {
        if let Some(rej) = r.check_ids(t).await.unwrap() {
            return rej.detail;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("revocation never took effect");
}

fn redis_cli(args: &[&str]) {
    let url = redis_url();
    let out =
        std::process::Command::new("redis-cli").arg("-u").arg(&url).args(args).output().expect("redis-cli is required");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn every_selector_via_the_cli_writes_the_documented_key() {
    let prefix = unique_prefix("cli");
    let url = redis_url();
    let mut conn = redis_conn().await;
    let base = ["--redis", &url, "--prefix", &prefix];
    let cli = |extra: &[&str]| {
        let mut a: Vec<&str> = extra.to_vec();
        a.extend_from_slice(&base);
        run_cli(&a)
    };

    let (code, out, err) = cli(&["revoke", "--jti", "j-1", "--reason", "stolen laptop"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked jti"), "{out}");
    let k = key(&prefix, Kind::Jti, "j-1");
    assert_eq!(conn.get::<_, String>(&k).await.unwrap(), "stolen laptop");
    let ttl: i64 = conn.ttl(&k).await.unwrap();
    assert!((86_000..=86_400).contains(&ttl), "default jti TTL is a day, got {ttl}");

    let (code, _, err) = cli(&["revoke", "--sub", "alice", "--before", "1700000000"]);
    assert_eq!(code, 0, "{err}");
    let k = key(&prefix, Kind::Sub, "alice");
    assert_eq!(conn.get::<_, String>(&k).await.unwrap(), "1700000000");
    assert_eq!(conn.ttl::<_, i64>(&k).await.unwrap(), -1, "sub revocations persist by default");

    let (code, _, _) = cli(&["revoke", "--kid", "leaked-key", "--ttl", "2h"]);
    assert_eq!(code, 0);
    let ttl: i64 = conn.ttl(key(&prefix, Kind::Kid, "leaked-key")).await.unwrap();
    assert!((7100..=7200).contains(&ttl), "{ttl}");

    // --token with jti: the jti key, TTL = remaining lifetime + the largest leeway (300 s) + 30 s,
    // so that an issuer with a long leeway never accepts the token after the entry expired.
    let now = tokengate::verify::unix_now();
    let with_jti =
        token(jsonwebtoken::Algorithm::HS256, serde_json::json!({"jti": "tok-jti", "exp": now + 600, "iat": now}));
    let (code, _, err) = cli(&["revoke", "--token", &with_jti]);
    assert_eq!(code, 0, "{err}");
    let ttl: i64 = conn.ttl(key(&prefix, Kind::Jti, "tok-jti")).await.unwrap();
    assert!((920..=930).contains(&ttl), "{ttl}");

    // --token without jti: the fingerprint key.
    let no_jti = token(jsonwebtoken::Algorithm::HS256, serde_json::json!({"jti": null, "exp": now + 600, "iat": now}));
    let (code, _, _) = cli(&["revoke", "--token", &no_jti, "--until", &(now + 100).to_string()]);
    assert_eq!(code, 0);
    let fp = tokengate::verify::fingerprint(&no_jti);
    let ttl: i64 = conn.ttl(key(&prefix, Kind::Fp, &fp)).await.unwrap();
    assert!((90..=100).contains(&ttl), "{ttl}");

    // check says which kind matched; exit 1 when revoked.
    let (code, out, _) = cli(&["revocations", "check", &no_jti]);
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matches"][0]["kind"], "fp");

    // list (SCAN) shows them all, filterable by kind.
    let (code, out, _) = cli(&["revocations", "list", "--json"]);
    assert_eq!(code, 0);
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 5, "{out}");
    let (_, out, _) = cli(&["revocations", "list", "--kind", "sub", "--json"]);
    let subs: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0]["id"], "alice");
    let (_, table, _) = cli(&["revocations", "list"]);
    assert!(table.contains("leaked-key"), "{table}");

    // unrevoke removes, and says so.
    let (code, out, _) = cli(&["unrevoke", "--token", &no_jti]);
    assert_eq!(code, 0);
    assert!(out.contains("unrevoked"), "{out}");
    let (code, _, _) = cli(&["revocations", "check", &no_jti]);
    assert_eq!(code, 0);
    let (_, out, _) = cli(&["unrevoke", "--kid", "never-revoked"]);
    assert!(out.contains("nothing to unrevoke"));
}

#[tokio::test]
async fn bad_input_is_a_clear_error() {
    let url = redis_url();
    let cases: &[(&[&str], &str)] = &[
        (&["revoke", "--jti", "", "--redis", &url], "--jti must not be empty"),
        (&["revoke", "--sub", "a", "--before", "last tuesday", "--redis", &url], "cannot read time"),
        (&["revoke", "--fp", "xyz", "--redis", &url], "64 hex digits"),
        (&["revoke", "--jti", "a", "--until", "1000", "--redis", &url], "end in the past"),
        (&["revoke", "--jti", "a", "--redis", "redis://127.0.0.1:1"], "cannot reach Redis"),
        (&["revoke", "--jti", "a", "--redis", "redis://u:hunter2@127.0.0.1:1"], "u:***@"),
        (&["revocations", "list", "--kind", "nope", "--redis", &url], "unknown kind"),
    ];
    for (args, want) in cases {
        let (code, _, err) = run_cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("hunter2"), "password leaked: {err}");
    }
    // Two selectors at once is a usage error too.
    let (code, _, _) = run_cli(&["revoke", "--jti", "a", "--kid", "b"]);
    assert_eq!(code, 2);
}

#[tokio::test]
async fn raw_redis_cli_writes_take_effect_through_the_cache() {
    let prefix = unique_prefix("raw");
    let (r, _cancel) = tracked(&redis_url(), &prefix).await;
    let t = ids("raw-jti", "bob", Some(1000));
    // Prime the cache with "not revoked", then prove hits make no round trip.
    assert!(r.check_ids(&t).await.unwrap().is_none());
    let before = r.round_trips();
    for _ in 0..1000 {
        assert!(r.check_ids(&t).await.unwrap().is_none());
    }
    assert_eq!(r.round_trips(), before, "cached lookups must not go to Redis");

    for (kind, id, value) in [
        (Kind::Jti, "raw-jti", "x"),
        (Kind::Kid, "k1", "leak"),
        (Kind::Fp, &"ab".repeat(32)[..], "y"),
        (Kind::Sub, "bob", "1000"),
    ] {
        let k = key(&prefix, kind, id);
        redis_cli(&["SET", &k, value]);
        let detail = until_revoked(&r, &t).await;
        assert!(detail.contains(kind.name()), "{detail}");
        redis_cli(&["DEL", &k]);
        for _ in 0..500 {
            if r.check_ids(&t).await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(r.check_ids(&t).await.unwrap().is_none(), "{kind:?} unrevoke took effect");
    }
}

#[tokio::test]
async fn sub_before_is_inclusive_and_tokens_without_iat_are_revoked() {
    let prefix = unique_prefix("before");
    let (r, _cancel) = tracked(&redis_url(), &prefix).await;
    let (code, _, err) =
        run_cli(&["revoke", "--sub", "carol", "--before", "2000", "--redis", &redis_url(), "--prefix", &prefix]);
    assert_eq!(code, 0, "{err}");
    // In effect once Redis's push reaches the mirror (well under 100 ms; see BENCHMARKS.md).
    until_revoked(&r, &ids("a", "carol", Some(1999))).await;
    assert!(r.check_ids(&ids("b", "carol", Some(2000))).await.unwrap().is_some(), "at the boundary: revoked");
    assert!(r.check_ids(&ids("c", "carol", Some(2001))).await.unwrap().is_none(), "issued after: valid");
    assert!(r.check_ids(&ids("d", "carol", None)).await.unwrap().is_some(), "no iat: revoked");
    assert!(r.check_ids(&ids("e", "dave", Some(1))).await.unwrap().is_none(), "other subject");
}

#[tokio::test]
async fn hostile_ids_and_values() {
    let prefix = unique_prefix("hostile");
    let url = redis_url();
    let (r, _cancel) = tracked(&url, &prefix).await;
    let long = "x".repeat(10 * 1024);
    for id in ["with space", "new\nline", "ünï©ødé ✓", "*glob?[x]", long.as_str()] {
        let (code, _, err) = run_cli(&["revoke", "--jti", id, "--redis", &url, "--prefix", &prefix]);
        assert_eq!(code, 0, "{err}");
        let detail = until_revoked(&r, &ids(id, "nobody", Some(1))).await;
        assert!(detail.contains("jti"));
        assert!(r.check_ids(&ids(&format!("{id}-other"), "nobody", Some(1))).await.unwrap().is_none());
    }
    let (_, out, _) = run_cli(&["revocations", "list", "--json", "--redis", &url, "--prefix", &prefix]);
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 5);

    let mut conn = redis_conn().await;
    // A sub value that is not a number: fail closed (every token of the subject).
    let _: () = conn.set(key(&prefix, Kind::Sub, "eve"), "yesterday").await.unwrap();
    assert!(r.check_ids(&ids("z", "eve", Some(i64::MAX))).await.unwrap().unwrap().detail.contains("unparsable"));
    // Keys of an unexpected type: fail closed.
    let _: () = conn.hset(key(&prefix, Kind::Jti, "hash-jti"), "f", "v").await.unwrap();
    assert!(r.check_ids(&ids("hash-jti", "x", Some(1))).await.unwrap().unwrap().detail.contains("unexpected type"));
    let _: () = conn.rpush(key(&prefix, Kind::Sub, "listy"), "1").await.unwrap();
    assert!(r.check_ids(&ids("q", "listy", Some(1))).await.unwrap().is_some());
}

#[tokio::test]
async fn redis_down_fails_closed_and_recovers_by_itself() {
    let port = free_port();
    let mut server = OwnRedis::start(port);
    let prefix = unique_prefix("down");
    let (r, _cancel) = tracked(&server.url(), &prefix).await;
    let t = ids("down-jti", "frank", Some(1));
    assert!(r.check_ids(&t).await.unwrap().is_none());

    server.stop();
    // Once the loss is noticed, nothing is answered "not revoked": every lookup is an error.
    for _ in 0..500 {
        if !r.is_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!r.is_up(), "the outage was noticed");
    for _ in 0..20 {
        assert!(r.check_ids(&t).await.is_err(), "no answer while Redis is down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Restarted (empty) Redis on the same port: the checker reconnects by itself.
    let _server = OwnRedis::start(port);
    assert!(r.wait_up(Duration::from_secs(15)).await, "reconnected");
    let mut conn = tokengate::revocation::edit::redis_connect(&format!("redis://127.0.0.1:{port}")).await.unwrap();
    let _: () = conn.set(key(&prefix, Kind::Jti, "down-jti"), "after restart").await.unwrap();
    let detail = until_revoked(&r, &t).await;
    assert!(detail.contains("after restart"), "{detail}");
}

#[tokio::test]
async fn check_with_the_config_uses_the_verifying_keys_kid_as_the_gate_does() {
    let prefix = unique_prefix("checkkid");
    let url = redis_url();
    let _ = redis_conn().await;
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut cfg, issuers_toml().as_bytes()).unwrap();
    let cfg = cfg.path().to_str().unwrap().to_owned();
    let base = ["--redis", url.as_str(), "--prefix", prefix.as_str()];
    let cli = |extra: &[&str]| {
        let mut a: Vec<&str> = extra.to_vec();
        a.extend_from_slice(&base);
        run_cli(&a)
    };
    // The key with kid "hs" leaked; a token without a kid header is still verified by it.
    assert_eq!(cli(&["revoke", "--kid", "hs"]).0, 0);
    let now = tokengate::verify::unix_now();
    let claims = claims(serde_json::json!({"iat": now, "exp": now + 600}));
    let no_kid = sign_raw(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &claims.to_string(),
        jsonwebtoken::Algorithm::HS256,
        &signing_key(jsonwebtoken::Algorithm::HS256),
    );
    let (code, out, err) = cli(&["revocations", "check", &format!("BEARER {no_kid}")]);
    assert_eq!(code, 0, "by the header alone it looks fine (the Bearer scheme in any case): {out} {err}");
    assert!(out.contains("unverified token header"), "{out}");
    let (code, out, err) = cli(&["revocations", "check", "--config", &cfg, &no_kid]);
    assert_eq!(code, 1, "the verifying key is revoked, as the gate would see it: {out} {err}");
    assert!(out.contains("verified key") && out.contains(r#""kind":"kid""#), "{out}");
}

/// Waits until the mirror is in step with `entries` entries (loading a million takes seconds).
async fn until_mirrored(r: &Revocations, entries: usize) {
    use tokengate::revocation::mirror::State;
    for _ in 0..1800 {
        if r.mirror() == Some((State::Synced, entries)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the mirror did not load {entries} entries: {:?}", r.mirror());
}

/// Polls until `t` is no longer revoked.
async fn until_not_revoked(r: &Revocations, t: &TokenIds) {
    for _ in 0..500 {
        if r.check_ids(t).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the deletion never took effect");
}

fn jti(id: &str) -> TokenIds {
    TokenIds { jti: Some(id.into()), fingerprint: "cd".repeat(32), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_entries_are_mirrored_kept_in_step_with_redis_cli_and_survive_a_restart() {
    const N: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let snapshot = ["--dir", dir.path().to_str().unwrap()];
    let mut server = OwnRedis::start_with(port, &snapshot);
    let prefix = unique_prefix("mirror");
    let mut conn = tokengate::revocation::edit::redis_connect(&server.url()).await.unwrap();
    for start in (0..N).step_by(10_000) {
        let mut pipe = redis::pipe();
        for i in start..start + 10_000 {
            pipe.cmd("SET").arg(key(&prefix, Kind::Jti, &format!("bulk-{i}"))).arg("bulk").ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let (r, _cancel) = tracked(&server.url(), &prefix).await;
    until_mirrored(&r, N).await;

    // Every lookup, of a revoked token or a never-seen one, is answered without Redis.
    let round_trips = r.round_trips();
    assert!(r.check_ids(&jti("bulk-123456")).await.unwrap().is_some());
    for i in 0..1000 {
        assert!(r.check_ids(&jti(&format!("fresh-{i}"))).await.unwrap().is_none());
    }
    assert_eq!(r.round_trips(), round_trips, "no lookup waited on Redis");

    // Writes from plain redis-cli while lookups run: each takes effect, both ways.
    let cli = move |args: Vec<String>| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(&args)
            .output()
            .expect("redis-cli is required");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let (p, c) = (prefix.clone(), cli);
    let writer = tokio::task::spawn_blocking(move || {
        for i in 0..50 {
            c(vec!["SET".into(), key(&p, Kind::Jti, &format!("live-{i}")), "from redis-cli".into()]);
            c(vec!["DEL".into(), key(&p, Kind::Jti, &format!("bulk-{i}"))]);
        }
    });
    for i in 0..50 {
        let detail = until_revoked(&r, &jti(&format!("live-{i}"))).await;
        assert!(detail.contains("from redis-cli"), "{detail}");
        until_not_revoked(&r, &jti(&format!("bulk-{i}"))).await;
    }
    writer.await.unwrap();
    until_mirrored(&r, N).await;

    // A restart (the list kept in a snapshot): fail closed while down, then mirrored again.
    let () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    server.stop();
    for _ in 0..500 {
        if r.check_ids(&jti("fresh-0")).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(r.check_ids(&jti("fresh-0")).await.is_err(), "no answer while Redis is down");
    let _server = OwnRedis::start_with(port, &snapshot);
    until_mirrored(&r, N).await;
    assert!(r.check_ids(&jti("live-7")).await.unwrap().is_some(), "kept across the restart");
    assert!(r.check_ids(&jti("bulk-7")).await.unwrap().is_none(), "deleted before the restart");
    let mut conn = tokengate::revocation::edit::redis_connect(&format!("redis://127.0.0.1:{port}")).await.unwrap();
    let _: () = conn.set(key(&prefix, Kind::Jti, "after-restart"), "again").await.unwrap();
    until_revoked(&r, &jti("after-restart")).await;
}

#[tokio::test]
async fn revoke_from_file_writes_every_line_or_nothing() {
    let prefix = unique_prefix("bulk");
    let mut conn = redis_conn().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    let mut text = String::from("# leaked on 2026-11-28\njti:one\nsub:alice\n\nkid:2026-11\n");
    text += &format!("{}\n", token(jsonwebtoken::Algorithm::HS256, serde_json::json!({"jti": "from-a-token"})));
    for i in 0..2000 {
        text += &format!("jti:bulk-{i}\n");
    }
    std::fs::write(&good, &text).unwrap();
    let redis = redis_url();
    let (code, out, err) =
        run_cli(&["revoke", "--from-file", good.to_str().unwrap(), "--redis", &redis, "--prefix", &prefix]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("revoked 2004 entries from 2004 lines"), "{out}");
    assert!(err.contains("revoking: 2004/2004"), "a plain progress line when not a terminal: {err}");
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    assert_eq!(keys.len(), 2004);
    let ttl: i64 = redis::cmd("TTL").arg(format!("{prefix}revoked:jti:one")).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0 && ttl <= 24 * 3600, "a bare jti lasts a day: {ttl}");
    let ttl: i64 = redis::cmd("TTL").arg(format!("{prefix}revoked:sub:alice")).query_async(&mut conn).await.unwrap();
    assert_eq!(ttl, -1, "a subject until unrevoked");

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "jti:fine\nfp:not-hex\njti:\n").unwrap();
    let prefix2 = unique_prefix("bulk-bad");
    let (code, _, err) =
        run_cli(&["revoke", "--from-file", bad.to_str().unwrap(), "--redis", &redis, "--prefix", &prefix2]);
    assert_eq!(code, 2);
    assert!(err.contains("line 2") && err.contains("line 3") && err.contains("nothing revoked"), "{err}");
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix2}*")).query_async(&mut conn).await.unwrap();
    assert!(keys.is_empty(), "a file with a bad line writes nothing");
    let written: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("DEL").arg(&written).query_async(&mut conn).await.unwrap();
}

/// Polls `check` of a verified token until it reports a revocation (or not), as the gate checks
/// every message of a reused token.
async fn until_verified_is(r: &Revocations, v: &tokengate::verify::Verified, revoked: bool) {
    for _ in 0..500 {
        if r.check(v).await.unwrap().is_some() == revoked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the token never became {}", if revoked { "revoked" } else { "valid again" });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_token_found_absent_is_looked_up_again_after_every_change_of_the_list() {
    let prefix = unique_prefix("memo");
    let url = redis_url();
    let (r, cancel) = tracked(&url, &prefix).await;
    until_mirrored(&r, 0).await;
    let (verifier, _) = engine(&issuers_toml());
    let t = token(jsonwebtoken::Algorithm::HS256, serde_json::json!({"jti": "memo-1", "sub": "memo-user"}));
    let v = verifier.verify_token(&t, NOW).await.unwrap().unwrap();
    // Found absent, then answered from that finding while the list is unchanged.
    for _ in 0..3 {
        assert!(r.check(&v).await.unwrap().is_none());
    }
    let mut c = redis_conn().await;
    // Each selector of this very token, written with plain Redis, takes effect on the next checks.
    let (fp, later) = (v.fingerprint.to_string(), (NOW + 3600).to_string());
    for (kind, id, value) in [
        (Kind::Jti, "memo-1", "revoked by operator"),
        (Kind::Sub, "memo-user", later.as_str()), // every token of the subject issued before then
        (Kind::Kid, "hs", "key leaked"),
        (Kind::Fp, fp.as_str(), "revoked by operator"),
    ] {
        let k = key(&prefix, kind, id);
        let _: () = c.set(&k, value).await.unwrap();
        until_verified_is(&r, &v, true).await;
        let _: () = c.del(&k).await.unwrap();
        until_verified_is(&r, &v, false).await;
    }
    // A change to another key starts a new generation too; the answer for this token stays.
    let _: () = c.set(key(&prefix, Kind::Jti, "someone-else"), "x").await.unwrap();
    until_mirrored(&r, 1).await;
    assert!(r.check(&v).await.unwrap().is_none());
    // (A reconnect and a Redis restart reload the mirror: the million-entry test covers them.)
    cancel.cancel();
}
