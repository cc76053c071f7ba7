//! The library side of the token tools: mint, inspect and verify a token.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

use crate::config;
use crate::verify::{self, HeaderValue, Policy, Verifier};

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct Mint {
    /// Signing algorithm.
    pub alg: Algorithm,
    /// Header `kid`.
    pub kid: Option<String>,
    /// Header `typ` (default `JWT`).
    pub typ: Option<String>,
    /// `iss`.
    pub iss: Option<String>,
    /// `aud` (a string if one, an array if several).
    pub aud: Vec<String>,
    /// `sub`.
    pub sub: Option<String>,
    /// `roles` array, if any.
    pub roles: Vec<String>,
    /// `scope`, space-delimited, if any.
    pub scopes: Vec<String>,
    /// Further claims; they win over the ones above.
    pub extra: Map<String, Value>,
    /// Lifetime from `now` (`exp = now + ttl`); `None` leaves `exp` out.
    pub ttl: Option<Duration>,
    /// Add a random `jti`.
    pub jti: bool,
}

impl Mint {
    /// A token request with only an algorithm and a one-hour lifetime.
    pub fn new(alg: Algorithm) -> Mint {
        Mint {
            alg,
            kid: None,
            typ: None,
            iss: None,
            aud: vec![],
            sub: None,
            roles: vec![],
            scopes: vec![],
            extra: Map::new(),
            ttl: Some(Duration::from_secs(3600)),
            jti: true,
        }
    }

    /// The claims this request produces at unix time `now`.
    pub fn claims(&self, now: i64) -> Map<String, Value> {
        let mut c = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                c.insert(k.to_owned(), v);
            }
        };
        put("iss", self.iss.clone().map(Value::from));
        put("sub", self.sub.clone().map(Value::from));
        put(
            "aud",
            match self.aud.as_slice() {
                [] => None,
                [one] => Some(Value::from(one.clone())),
                many => Some(Value::from(many.to_vec())),
            },
        );
        put("iat", Some(Value::from(now)));
        put("exp", self.ttl.map(|t| Value::from(now + t.as_secs() as i64)));
        put("jti", self.jti.then(|| Value::from(random_id())));
        put("roles", (!self.roles.is_empty()).then(|| Value::from(self.roles.clone())));
        put("scope", (!self.scopes.is_empty()).then(|| Value::from(self.scopes.join(" "))));
        for (k, v) in &self.extra {
            c.insert(k.clone(), v.clone());
        }
        c
    }

    /// Signs the token with `key` at unix time `now`.
    pub fn sign(&self, key: &EncodingKey, now: i64) -> anyhow::Result<String> {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        if let Some(t) = &self.typ {
            header.typ = Some(t.clone());
        }
        jsonwebtoken::encode(&header, &self.claims(now), key).context("signing failed")
    }
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("the system RNG works");
    hex::encode(b)
}

/// Loads a signing key: an HMAC secret for HS*, a PEM private key otherwise.
pub fn signing_key(alg: Algorithm, secret: Option<&[u8]>, pem: Option<&[u8]>) -> anyhow::Result<EncodingKey> {
    use jsonwebtoken::AlgorithmFamily as F;
    Ok(match (alg.family(), secret, pem) {
        (F::Hmac, Some(s), None) => EncodingKey::from_secret(s),
        (F::Rsa, None, Some(p)) => EncodingKey::from_rsa_pem(p).context("not an RSA private key PEM")?,
        (F::Ec, None, Some(p)) => EncodingKey::from_ec_pem(p).context("not an EC private key PEM (PKCS#8)")?,
        (F::Ed, None, Some(p)) => EncodingKey::from_ed_pem(p).context("not an Ed25519 private key PEM")?,
        (F::Hmac, _, _) => bail!("{alg:?} needs a secret (--secret-env or --secret-file)"),
        _ => bail!("{alg:?} needs a PEM private key (--key-file)"),
    })
}

/// Decodes a token without verifying it, for `token inspect`.
pub fn inspect(token: &str, now: i64) -> anyhow::Result<Value> {
    let (header, claims) =
        verify::jwt::decode_unverified(token).map_err(|r| anyhow::anyhow!("{}: {}", r.reason, r.detail))?;
    let exp = claims.get("exp").and_then(Value::as_i64);
    Ok(json!({
        "warning": "UNVERIFIED: decoded only; the signature and claims were not checked",
        "header": header,
        "claims": claims,
        "fingerprint": verify::fingerprint(token),
        "expires_in_secs": exp.map(|e| e.saturating_sub(now)),
        "expired": exp.map(|e| e <= now),
    }))
}

/// Verifies `token` as route `route` of `config_file` would, printing-ready as JSON.
/// `Ok((accepted, json))`; `Err` is a failure of the tool itself (bad config, keys unreachable).
pub async fn verify_token(
    config_file: &Path,
    route: Option<&str>,
    token: &str,
    now: i64,
) -> anyhow::Result<(bool, Value)> {
    let settings = config::load(config_file, &config::process_env())?;
    let (spec, policy) = match route {
        Some(name) => {
            let r = settings.route(name).with_context(|| format!("no route named {name:?}"))?;
            (r.token.clone(), r.policy.clone())
        }
        None => (verify::TokenSpec::default(), Policy::default()),
    };
    let verifier = Verifier::new(settings.issuers, &settings.cache);
    for e in verifier.start().await {
        tracing::warn!(issuer = %e.issuer, detail = %e.detail, "key fetch failed at start");
    }
    let token = token.trim();
    let headers = [(spec.header.as_str(), HeaderValue::Bytes(token.as_bytes()))];
    let verdict = match spec.extract(headers) {
        Ok(t) => verifier.verify(&policy, t, now).await?,
        Err(r) => Err(r),
    };
    Ok(match verdict {
        Ok(v) => (
            true,
            json!({
                "decision": "accept",
                "issuer": &*v.issuer,
                "kid": v.kid,
                "alg": format!("{:?}", v.alg),
                "sub": v.std.sub,
                "fingerprint": v.fingerprint,
                "expires_in_secs": v.std.exp.map(|e| e.saturating_sub(now)),
            }),
        ),
        Err(r) => (
            false,
            json!({
                "decision": "reject",
                "reason": r.reason.code(),
                "detail": r.detail,
                "fingerprint": verify::fingerprint(token),
            }),
        ),
    })
}

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
    pub kind: crate::revocation::Kind,
    /// The id within the kind.
    pub id: String,
    /// The Redis key.
    pub key: String,
    /// The stored value.
    pub value: String,
    /// Seconds until Redis drops it; `None`: kept until unrevoked.
    pub ttl_secs: Option<i64>,
}

/// A `jti` revocation without a known expiry lasts this long: longer than any access token
/// lifetime an identity provider should issue, short enough that the list cleans itself.
pub const DEFAULT_JTI_TTL: Duration = Duration::from_secs(24 * 3600);

/// Margin added to a token's remaining lifetime: the largest leeway any issuer may have (the
/// config refuses more) plus 30 s, so that no issuer accepts the token after its entry expires.
pub const REVOCATION_LEEWAY_SECS: i64 = crate::config::MAX_LEEWAY_SECS as i64 + 30;

/// Parses a time: unix seconds, RFC 3339 (`2026-11-24T10:00:00Z`), or `now`.
pub fn parse_time(s: &str, now: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow::anyhow!("cannot read time {s:?}: give unix seconds, RFC 3339 (2026-11-24T10:00:00Z) or now")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64))
}

fn nonempty(what: &str, id: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!id.is_empty(), "{what} must not be empty");
    Ok(id.to_owned())
}

/// Resolves a selector into the entries it means, with their default expiry.
fn entries(sel: &Selector, now: i64) -> anyhow::Result<Vec<(crate::revocation::Kind, String, Option<i64>)>> {
    use crate::revocation::Kind;
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
    use crate::revocation::{Kind, key};
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
        candidates.push((crate::revocation::Kind::Fp, verify::fingerprint(t.trim()), None));
    }
    for (kind, id, _) in candidates {
        let k = crate::revocation::key(prefix, kind, &id);
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

/// Escapes glob characters so a prefix is matched literally by SCAN MATCH.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Lists revocations with SCAN (never KEYS), optionally of one kind.
pub async fn list(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    kind: Option<crate::revocation::Kind>,
) -> anyhow::Result<Vec<Written>> {
    use crate::revocation::Kind;
    let pattern = format!("{}revoked:{}:*", glob_escape(prefix), kind.map_or("*", Kind::name));
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN")?;
        // A few operator-sized round trips per key: listing is rare and must show odd keys too.
        for k in keys {
            let ty: String = redis::cmd("TYPE").arg(&k).query_async(conn).await?;
            let value: Option<Vec<u8>> =
                if ty == "string" { redis::cmd("GET").arg(&k).query_async(conn).await? } else { None };
            let ttl: i64 = redis::cmd("TTL").arg(&k).query_async(conn).await?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let rest = &key[prefix.len() + "revoked:".len()..];
            let Some((kname, id)) = rest.split_once(':') else {
                continue;
            };
            let Some(kind) = Kind::parse(kname) else {
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
    use crate::revocation::{TokenIds, fetch, judge};
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
