//! Operators' writes to the revocation list (revoke, unrevoke, list, check), for the CLI and
//! scripts. Keys and values follow [`super::schema`]; the CLI only presents the results.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use super::schema::{DEFAULT_JTI_TTL, Kind, REVOCATION_LEEWAY_SECS, TokenIds, fetch, judge, key, parse_key, scan};
use crate::verify;

/// Which revocation entry an ops command addresses.
#[derive(Debug, Clone)]
pub enum Selector {
    /// One token by `jti`.
    Jti(String),
    /// All tokens of a subject (issued at or before `before`, default now).
    Sub(String),
    /// All tokens of a signing key.
    Kid(String),
    /// One token by fingerprint.
    Fp(String),
    /// One token given whole: its `jti` if it has one, else its fingerprint.
    Token(String),
}

/// How long a revocation lasts.
#[derive(Debug, Clone, Copy)]
pub enum Expiry {
    /// The default for the selector.
    Default,
    /// For this long.
    Ttl(Duration),
    /// Until this unix time.
    Until(i64),
}

/// A revocation as written to Redis.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// The kind of entry.
    pub kind: Kind,
    /// The id within the kind.
    pub id: String,
    /// The Redis key.
    pub key: String,
    /// The stored value.
    pub value: String,
    /// Seconds until Redis drops it; `None`: kept until unrevoked.
    pub ttl_secs: Option<i64>,
}

fn nonempty(what: &str, id: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!id.is_empty(), "{what} must not be empty");
    Ok(id.to_owned())
}

/// Resolves a selector into the entries it means, with their default expiry.
fn entries(sel: &Selector, now: i64) -> anyhow::Result<Vec<(Kind, String, Option<i64>)>> {
    let day = Some(now + DEFAULT_JTI_TTL.as_secs() as i64);
    Ok(match sel {
        Selector::Jti(j) => vec![(Kind::Jti, nonempty("--jti", j)?, day)],
        Selector::Sub(s) => vec![(Kind::Sub, nonempty("--sub", s)?, None)],
        Selector::Kid(k) => vec![(Kind::Kid, nonempty("--kid", k)?, None)],
        Selector::Fp(f) => {
            anyhow::ensure!(f.len() == 64 && f.bytes().all(|b| b.is_ascii_hexdigit()), "--fp must be 64 hex digits");
            vec![(Kind::Fp, f.to_ascii_lowercase(), day)]
        }
        Selector::Token(t) => {
            let t = t.trim();
            let t = verify::policy::strip_bearer(t).unwrap_or(t);
            let (_, claims) =
                verify::jwt::decode_unverified(t).map_err(|r| anyhow::anyhow!("--token: {}", r.detail))?;
            let until = claims
                .get("exp")
                .and_then(Value::as_i64)
                .map(|e| e.max(now).saturating_add(REVOCATION_LEEWAY_SECS))
                .or(day);
            match claims.get("jti").and_then(Value::as_str) {
                Some(j) if !j.is_empty() => vec![(Kind::Jti, j.to_owned(), until)],
                _ => vec![(Kind::Fp, verify::fingerprint(t), until)],
            }
        }
    })
}

/// Connects for an ops command, with a short timeout so a dead Redis fails fast and clearly.
pub async fn redis_connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {}", redact_url(url)))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("cannot reach Redis at {}", redact_url(url)))
}

/// A URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            let user = cred.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Reads a bulk revocation file: one selector per line, `jti:<id>`, `sub:<id>`, `kid:<id>`,
/// `fp:<64 hex>`, or a whole token (with or without `Bearer `); blank lines and `#` comments
/// are skipped. Every bad line is reported (with its number), and then nothing is written.
pub fn parse_selectors(text: &str) -> Result<Vec<Selector>, Vec<String>> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sel = match line.split_once(':') {
            Some(("jti", id)) => Selector::Jti(id.trim().to_owned()),
            Some(("sub", id)) => Selector::Sub(id.trim().to_owned()),
            Some(("kid", id)) => Selector::Kid(id.trim().to_owned()),
            Some(("fp", id)) => Selector::Fp(id.trim().to_owned()),
            _ => Selector::Token(line.to_owned()),
        };
        // Checked the way revoke will write it (an empty id, a bad fingerprint, not a JWT).
        match entries(&sel, 0) {
            Ok(_) => out.push(sel),
            Err(e) => bad.push(format!("line {}: {e:#}", i + 1)),
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// Writes the revocations of many selectors, pipelined 500 at a time; `progress` is told how
/// many selectors each batch wrote. Returns how many entries were written.
pub async fn revoke_many(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    sels: &[Selector],
    reason: &str,
    now: i64,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<u64> {
    let mut written = 0;
    for batch in sels.chunks(500) {
        let mut pipe = redis::pipe();
        for sel in batch {
            for (kind, id, until) in entries(sel, now)? {
                let value = if kind == Kind::Sub { now.to_string() } else { reason.to_owned() };
                let cmd = pipe.cmd("SET").arg(key(prefix, kind, &id)).arg(value);
                if let Some(u) = until {
                    cmd.arg("EXAT").arg(u.max(now + 1));
                }
                cmd.ignore();
                written += 1;
            }
        }
        pipe.query_async::<()>(conn).await.context("writing revocations")?;
        progress(batch.len() as u64);
    }
    Ok(written)
}

/// Writes the revocation(s) a selector means.
pub async fn revoke(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    sel: &Selector,
    before: Option<i64>,
    reason: &str,
    expiry: Expiry,
    now: i64,
) -> anyhow::Result<Vec<Written>> {
    let mut out = Vec::new();
    for (kind, id, default_until) in entries(sel, now)? {
        let until = match expiry {
            Expiry::Default => default_until,
            Expiry::Ttl(d) => Some(now + d.as_secs().max(1) as i64),
            Expiry::Until(t) => Some(t),
        };
        if let Some(u) = until {
            anyhow::ensure!(u > now, "the revocation would end in the past ({u}); nothing written");
        }
        let value = if kind == Kind::Sub { before.unwrap_or(now).to_string() } else { reason.to_owned() };
        let k = key(prefix, kind, &id);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&k).arg(&value);
        if let Some(u) = until {
            cmd.arg("EXAT").arg(u);
        }
        cmd.query_async::<()>(conn).await.with_context(|| format!("writing {}", shorten_key(&k)))?;
        out.push(Written { kind, id, key: k, value, ttl_secs: until.map(|u| u - now) });
    }
    Ok(out)
}

/// Deletes the revocation(s) a selector means; returns the keys that existed.
pub async fn unrevoke(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    sel: &Selector,
    now: i64,
) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut candidates: Vec<_> = entries(sel, now)?;
    if let Selector::Token(t) = sel {
        // Remove the fingerprint entry too: it may have been written by hand.
        candidates.push((Kind::Fp, verify::fingerprint(t.trim()), None));
    }
    for (kind, id, _) in candidates {
        let k = key(prefix, kind, &id);
        let n: i64 = redis::cmd("DEL").arg(&k).query_async(conn).await.context("deleting")?;
        if n > 0 {
            removed.push(k);
        }
    }
    Ok(removed)
}

fn shorten_key(k: &str) -> String {
    verify::jwt::shorten(k)
}

/// Lists revocations with SCAN (never KEYS), optionally of one kind.
pub async fn list(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    kind: Option<Kind>,
) -> anyhow::Result<Vec<Written>> {
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, keys) = scan(conn, prefix, kind, cursor).await.context("SCAN")?;
        // A few operator-sized round trips per key: listing is rare and must show odd keys too.
        for k in keys {
            let ty: String = redis::cmd("TYPE").arg(&k).query_async(conn).await?;
            let value: Option<Vec<u8>> =
                if ty == "string" { redis::cmd("GET").arg(&k).query_async(conn).await? } else { None };
            let ttl: i64 = redis::cmd("TTL").arg(&k).query_async(conn).await?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let Some((kind, id)) = parse_key(prefix, &key) else {
                continue;
            };
            let value = match value {
                Some(v) => String::from_utf8_lossy(&v).into_owned(),
                None => format!("<{ty}: unexpected type, treated as revoked>"),
            };
            out.push(Written { kind, id: id.to_owned(), key, value, ttl_secs: (ttl >= 0).then_some(ttl) });
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    out.sort_by(|a, b| (a.kind.name(), &a.id).cmp(&(b.kind.name(), &b.id)));
    Ok(out)
}

/// Says whether and why a token is revoked (reading Redis directly, no cache). The gate checks
/// the `kid` of the key that verified the token: pass it as `verified_kid` (from a verification
/// with the config); without it the token header's `kid` is checked, and the output says so.
pub async fn check_revoked(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    token: &str,
    verified_kid: Option<Option<String>>,
) -> anyhow::Result<(bool, Value)> {
    let token = token.trim();
    let token = verify::policy::strip_bearer(token).unwrap_or(token);
    let (header, claims) =
        verify::jwt::decode_unverified(token).map_err(|r| anyhow::anyhow!("{}: {}", r.reason, r.detail))?;
    let s = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let ids = TokenIds {
        jti: s(&claims, "jti"),
        sub: s(&claims, "sub"),
        iat: claims.get("iat").and_then(Value::as_i64),
        kid: verified_kid.clone().unwrap_or_else(|| s(&header, "kid")),
        fingerprint: verify::fingerprint(token),
    };
    let kid_checked = json!({"kid": ids.kid, "from": if verified_kid.is_some() { "verified key" } else { "unverified token header (pass --config to use the verifying key's kid)" }});
    let keys = ids.keys(prefix);
    let names: Vec<&str> = keys.iter().map(|(_, k)| k.as_str()).collect();
    let entries = fetch(conn, &names).await.map_err(|e| anyhow::anyhow!("reading revocations: {e}"))?;
    let matches: Vec<Value> = keys
        .iter()
        .zip(&entries)
        .filter_map(|((kind, key), e)| {
            judge(*kind, e, &ids).map(|r| json!({"kind": kind.name(), "key": key, "detail": r.detail}))
        })
        .collect();
    let revoked = !matches.is_empty();
    Ok((
        revoked,
        json!({"revoked": revoked, "fingerprint": ids.fingerprint, "kid": kid_checked, "checked": keys.iter().map(|(_, k)| k).collect::<Vec<_>>(), "matches": matches}),
    ))
}
