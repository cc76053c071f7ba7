//! The revocation list's key schema, a stable contract that plain `redis-cli` can write too
//! (ids are written raw, any bytes allowed), and how one entry judges a token:
//! - `{prefix}revoked:jti:<jti>` = reason: that token (TTL: its remaining lifetime + 330 s, the
//!   largest leeway an issuer may have plus a margin; 24 h when its `exp` is unknown).
//! - `{prefix}revoked:sub:<sub>` = unix time: every token of that subject issued at or before it
//!   (and every token of that subject without `iat`).
//! - `{prefix}revoked:kid:<kid>` = reason: every token signed with that key.
//! - `{prefix}revoked:fp:<fingerprint>` = reason: one exact token (for tokens without `jti`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::verify::{Reason, Rejection, Verified, jwt::shorten};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "tokengate:";

/// A `jti` revocation without a known expiry lasts this long: longer than any access token
/// lifetime an identity provider should issue, short enough that the list cleans itself.
pub const DEFAULT_JTI_TTL: Duration = Duration::from_secs(24 * 3600);

/// Margin added to a token's remaining lifetime: the largest leeway any issuer may have (the
/// config refuses more) plus 30 s, so that no issuer accepts the token after its entry expires.
pub const REVOCATION_LEEWAY_SECS: i64 = crate::verify::MAX_LEEWAY_SECS as i64 + 30;

/// What kind of revocation entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One token by its `jti`.
    Jti,
    /// All tokens of a subject issued at or before a time.
    Sub,
    /// All tokens signed by a key.
    Kid,
    /// One token by its fingerprint.
    Fp,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Jti, Kind::Sub, Kind::Kid, Kind::Fp];

    /// The name used in keys.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Jti => "jti",
            Kind::Sub => "sub",
            Kind::Kid => "kid",
            Kind::Fp => "fp",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// The Redis key of an entry.
pub fn key(prefix: &str, kind: Kind, id: &str) -> String {
    let mut k = String::with_capacity(prefix.len() + 12 + id.len());
    write_key(&mut k, prefix, kind, id);
    k
}

/// Writes the Redis key of an entry into `buf` (cleared first), for lookups that allocate nothing.
pub fn write_key(buf: &mut String, prefix: &str, kind: Kind, id: &str) {
    buf.clear();
    for part in [prefix, "revoked:", kind.name(), ":", id] {
        buf.push_str(part);
    }
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

/// The SCAN pattern of every entry, or of one kind's.
pub fn scan_pattern(prefix: &str, kind: Option<Kind>) -> String {
    format!("{}revoked:{}:*", glob_escape(prefix), kind.map_or("*", Kind::name))
}

/// One SCAN step over the list (of one kind, or every entry): the next cursor (0 at the end) and
/// the keys this step named (SCAN may name a key twice). Never KEYS, which blocks Redis.
pub async fn scan(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    kind: Option<Kind>,
    cursor: u64,
) -> redis::RedisResult<(u64, Vec<Vec<u8>>)> {
    // Keys per step: few round trips for a large list, short replies for Redis.
    const COUNT: usize = 1000;
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(scan_pattern(prefix, kind))
        .arg("COUNT")
        .arg(COUNT)
        .query_async(conn)
        .await
}

/// The kind and id of a key of this schema.
pub fn parse_key<'k>(prefix: &str, key: &'k str) -> Option<(Kind, &'k str)> {
    let (kind, id) = key.strip_prefix(prefix)?.strip_prefix("revoked:")?.split_once(':')?;
    Some((Kind::parse(kind)?, id))
}

/// What identifies a token to the revocation list.
#[derive(Debug, Clone, Default)]
pub struct TokenIds {
    /// `jti` claim.
    pub jti: Option<String>,
    /// `sub` claim.
    pub sub: Option<String>,
    /// `iat` claim.
    pub iat: Option<i64>,
    /// Key id (of the key that verified it, or the header's for unverified tokens).
    pub kid: Option<String>,
    /// Token fingerprint.
    pub fingerprint: String,
}

impl TokenIds {
    /// The ids of a verified token.
    pub fn of(v: &Verified) -> TokenIds {
        TokenIds {
            jti: v.jti.as_deref().map(str::to_owned),
            sub: v.sub.as_deref().map(str::to_owned),
            iat: v.times.iat,
            kid: v.kid.as_deref().map(str::to_owned),
            fingerprint: v.fingerprint.to_string(),
        }
    }

    /// The keys this token is checked against.
    pub fn keys(&self, prefix: &str) -> Vec<(Kind, String)> {
        let mut out = Vec::with_capacity(4);
        if let Some(j) = &self.jti {
            out.push((Kind::Jti, key(prefix, Kind::Jti, j)));
        }
        if let Some(s) = &self.sub {
            out.push((Kind::Sub, key(prefix, Kind::Sub, s)));
        }
        if let Some(k) = &self.kid {
            out.push((Kind::Kid, key(prefix, Kind::Kid, k)));
        }
        out.push((Kind::Fp, key(prefix, Kind::Fp, &self.fingerprint)));
        out
    }
}

/// What Redis holds at one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// No such key.
    Absent,
    /// A string value.
    Value(Vec<u8>),
    /// A key of another type (a hash, a list...): someone wrote it wrong.
    WrongType,
}

/// Whether a bad revocation entry may be logged now, and how many reports were dropped since the
/// last one: a bad entry is read for every message of its subject or key, and must not flood the
/// log (it is logged at ERROR at most every 10 s; every message is still failed closed).
fn bad_entry_log_due() -> Option<u64> {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let mut last = LAST.lock().expect("not poisoned");
    if last.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        last.0 = Some(Instant::now());
        Some(std::mem::take(&mut last.1))
    } else {
        last.1 += 1;
        None
    }
}

/// Decides whether one entry revokes the token `v`.
pub fn judge(kind: Kind, entry: &Entry, v: &TokenIds) -> Option<Rejection> {
    let value = match entry {
        Entry::Absent => return None,
        Entry::WrongType => {
            // Fail closed: the operator meant to revoke something.
            if let Some(suppressed) = bad_entry_log_due() {
                tracing::error!(kind = kind.name(), fingerprint = %v.fingerprint, suppressed, "revocation key has an unexpected Redis type; treating the token as revoked");
            }
            return Some(Rejection::new(
                Reason::Revoked,
                format!("revoked by {} (key of unexpected type)", kind.name()),
            ));
        }
        Entry::Value(b) => String::from_utf8_lossy(b),
    };
    if kind != Kind::Sub {
        let why = if value.is_empty() { String::new() } else { format!(": {}", shorten(&value)) };
        return Some(Rejection::new(Reason::Revoked, format!("revoked by {}{why}", kind.name())));
    }
    let Ok(before) = value.trim().parse::<i64>() else {
        if let Some(suppressed) = bad_entry_log_due() {
            tracing::error!(fingerprint = %v.fingerprint, suppressed, "sub revocation value is not a unix time; treating every token of the subject as revoked");
        }
        return Some(Rejection::new(Reason::Revoked, "revoked by sub (unparsable time: all tokens)"));
    };
    match v.iat {
        Some(iat) if iat > before => None,
        Some(_) => Some(Rejection::new(Reason::Revoked, format!("revoked by sub: issued at or before {before}"))),
        None => Some(Rejection::new(Reason::Revoked, "revoked by sub: token has no iat")),
    }
}

/// Reads `keys` in one round trip: EXISTS for each (it sees keys of any type), then one MGET.
pub async fn fetch(conn: &mut MultiplexedConnection, keys: &[&str]) -> Result<Vec<Entry>, String> {
    if keys.is_empty() {
        return Ok(Vec::new()); // MGET needs a key (a SCAN step may name none)
    }
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("EXISTS").arg(*k);
    }
    pipe.cmd("MGET").arg(keys);
    let reply: Vec<redis::Value> = pipe.query_async(conn).await.map_err(|e| e.to_string())?;
    decode(&reply, keys.len())
}

/// `n` EXISTS replies then one MGET reply -> one entry per key.
fn decode(reply: &[redis::Value], n: usize) -> Result<Vec<Entry>, String> {
    let bad = || format!("unexpected Redis reply to EXISTS/MGET: {reply:?}");
    let (exists, rest) = reply.split_at_checked(n).ok_or_else(bad)?;
    let Some(redis::Value::Array(values)) = rest.first() else {
        return Err(bad());
    };
    if values.len() != n {
        return Err(bad());
    }
    exists
        .iter()
        .zip(values)
        .map(|(e, v)| match (e, v) {
            (redis::Value::Int(0), _) => Ok(Entry::Absent),
            (redis::Value::Int(_), redis::Value::BulkString(b)) => Ok(Entry::Value(b.clone())),
            (redis::Value::Int(_), redis::Value::Nil) => Ok(Entry::WrongType),
            _ => Err(bad()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_maps_exists_and_values() {
        use redis::Value as V;
        let reply = vec![V::Int(0), V::Int(1), V::Int(1), V::Array(vec![V::Nil, V::BulkString(b"x".to_vec()), V::Nil])];
        assert_eq!(decode(&reply, 3).unwrap(), vec![Entry::Absent, Entry::Value(b"x".to_vec()), Entry::WrongType]);
        assert!(decode(&reply, 4).is_err());
        assert!(decode(&[V::Int(0)], 1).is_err());
    }

    #[test]
    fn judge_table() {
        let ids = TokenIds { sub: Some("u".into()), iat: Some(100), ..Default::default() };
        let no_iat = TokenIds { iat: None, ..ids.clone() };
        let v = |s: &str| Entry::Value(s.as_bytes().to_vec());
        let cases = [
            (Kind::Jti, Entry::Absent, &ids, false),
            (Kind::Jti, v(""), &ids, true),
            (Kind::Kid, v("leaked"), &ids, true),
            (Kind::Fp, Entry::WrongType, &ids, true),
            (Kind::Sub, v("99"), &ids, false),
            (Kind::Sub, v("100"), &ids, true),
            (Kind::Sub, v(" 101 "), &ids, true),
            (Kind::Sub, v("99"), &no_iat, true),
            (Kind::Sub, v("yesterday"), &ids, true),
            (Kind::Sub, Entry::WrongType, &ids, true),
        ];
        for (kind, entry, ids, revoked) in cases {
            let got = judge(kind, &entry, ids);
            assert_eq!(got.is_some(), revoked, "{kind:?} {entry:?} {ids:?}");
            if let Some(r) = got {
                assert_eq!(r.reason, Reason::Revoked);
                assert!(r.detail.contains(kind.name()), "{}", r.detail);
            }
        }
    }

    #[test]
    fn keys_follow_the_schema() {
        assert_eq!(key("tokengate:", Kind::Jti, "a b\n"), "tokengate:revoked:jti:a b\n");
        assert_eq!(Kind::parse("fp"), Some(Kind::Fp));
        assert_eq!(Kind::parse("xx"), None);
        assert_eq!(parse_key("tg:", "tg:revoked:sub:a:b"), Some((Kind::Sub, "a:b")));
        assert_eq!(parse_key("tg:", "tg:revoked:xx:a"), None);
        assert_eq!(parse_key("tg:", "other:revoked:jti:a"), None);
        assert_eq!(scan_pattern("t*g:", Some(Kind::Jti)), "t\\*g:revoked:jti:*");
    }
}
