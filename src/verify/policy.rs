//! Per-route rules: where the token is, which issuers count, which roles, scopes and claim
//! values a route demands. Pure functions over already verified claims.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::jwt::shorten;
use super::{Reason, Rejection};

/// A header value as a broker delivered it.
#[derive(Debug, Clone, Copy)]
pub enum HeaderValue<'a> {
    /// Raw bytes (Kafka headers, AMQP long strings and byte arrays).
    Bytes(&'a [u8]),
    /// A header present with no value (a Kafka null header, an AMQP void).
    Null,
    /// A value of a type that cannot hold a token (an AMQP integer or table, say).
    WrongType(&'static str),
}

/// Where a route finds its token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Header name, matched ASCII case-insensitively.
    pub header: String,
    /// Whether a `Bearer ` scheme prefix is required (it is always accepted).
    pub require_bearer: bool,
    /// Tokens longer than this (in bytes, prefix included) are refused unparsed.
    pub max_bytes: usize,
}

impl Default for TokenSpec {
    fn default() -> Self {
        // 8 KiB holds any sane access token, even with large role lists.
        TokenSpec { header: "authorization".into(), require_bearer: false, max_bytes: 8 * 1024 }
    }
}

/// The token after a `Bearer` scheme (RFC 6750: the scheme is case-insensitive), if there is one.
pub fn strip_bearer(text: &str) -> Option<&str> {
    let bearer = text.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("bearer"))
        && text.as_bytes().get(6).is_none_or(|b| b.is_ascii_whitespace());
    bearer.then(|| text[6..].trim_start_matches(|c: char| c.is_ascii_whitespace()))
}

impl TokenSpec {
    /// Finds the one token among a message's headers.
    pub fn extract<'a, I>(&self, headers: I) -> Result<&'a str, Rejection>
    where
        I: IntoIterator<Item = (&'a str, HeaderValue<'a>)>,
    {
        let mut found = None;
        for (name, value) in headers {
            if name.eq_ignore_ascii_case(&self.header) {
                if found.is_some() {
                    return Err(Rejection::new(
                        Reason::DuplicateToken,
                        format!("more than one {} header", self.header),
                    ));
                }
                found = Some(value);
            }
        }
        let bytes = match found {
            None => {
                return Err(Rejection::new(Reason::MissingToken, format!("no {} header", self.header)));
            }
            Some(HeaderValue::Null) => {
                return Err(Rejection::new(Reason::EmptyToken, "token header has no value"));
            }
            Some(HeaderValue::WrongType(t)) => {
                return Err(Rejection::new(Reason::Malformed, format!("token header is a {t}, not a string")));
            }
            Some(HeaderValue::Bytes(b)) => b,
        };
        if bytes.len() > self.max_bytes {
            return Err(Rejection::new(
                Reason::TokenTooLarge,
                format!("token header is {} bytes, limit {}", bytes.len(), self.max_bytes),
            ));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Rejection::new(Reason::NonUtf8Token, format!("token header is not UTF-8: {e}")))?;
        let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
        let token = match strip_bearer(text) {
            Some(t) => t,
            None if self.require_bearer => {
                return Err(Rejection::new(Reason::Malformed, "token header lacks the Bearer scheme"));
            }
            None => text,
        };
        if token.is_empty() {
            return Err(Rejection::new(Reason::EmptyToken, "token header is empty"));
        }
        Ok(token)
    }
}

/// A claim addressed by a path such as `realm_access.roles`. A top-level claim whose name itself
/// holds dots (Auth0's `https://example.com/roles`) is found by its full name first.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimPath(pub String);

impl ClaimPath {
    /// The value at this path, if any.
    pub fn get<'c>(&self, claims: &'c Map<String, Value>) -> Option<&'c Value> {
        if let Some(v) = claims.get(&self.0) {
            return Some(v);
        }
        let mut parts = self.0.split('.');
        let mut v = claims.get(parts.next()?)?;
        for p in parts {
            v = v.as_object()?.get(p)?;
        }
        Some(v)
    }
}

/// The claims a verified token keeps: the value at each path some route reads (a requirement, a
/// value to equal, an identity header), and nothing else. A cached token costs these few values,
/// not its whole claims object.
#[derive(Debug, Clone)]
pub struct Claims {
    paths: Arc<[ClaimPath]>,
    values: Box<[Option<Value>]>,
}

impl Claims {
    /// Keeps from `all` the value at each of `paths`.
    pub fn keep(paths: &Arc<[ClaimPath]>, all: &Map<String, Value>) -> Claims {
        Claims { paths: Arc::clone(paths), values: paths.iter().map(|p| p.get(all).cloned()).collect() }
    }

    /// The value at `path`, if the token has one. Every path a route reads is kept (the
    /// config collects them), so a path not kept is a bug: it reads as absent, never as granted.
    pub fn get(&self, path: &ClaimPath) -> Option<&Value> {
        let i = self.paths.iter().position(|p| p == path);
        debug_assert!(i.is_some(), "claim path {} is not kept", path.0);
        self.values.get(i?)?.as_ref()
    }
}

/// Roles or scopes a route demands.
#[derive(Debug, Clone)]
pub struct Requirement {
    /// Where the granted values are: a space-delimited string (`scope`) or an array of strings.
    pub claim: ClaimPath,
    /// The values demanded.
    pub values: Vec<String>,
    /// All of `values` (true) or any one of them (false).
    pub all: bool,
}

/// A route's policy over verified claims.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Issuer config names this route accepts; empty means every configured issuer.
    pub issuers: Vec<String>,
    /// Role and scope requirements, all of which must hold.
    pub require: Vec<Requirement>,
    /// Claims that must equal these values exactly.
    pub equals: Vec<(ClaimPath, Value)>,
}

impl Policy {
    /// Every claim path this policy reads.
    pub fn claim_paths(&self) -> impl Iterator<Item = &ClaimPath> {
        self.require.iter().map(|r| &r.claim).chain(self.equals.iter().map(|(p, _)| p))
    }

    /// Checks the verified `claims` of a token from `issuer` against this route's rules.
    pub fn check(&self, issuer: &str, claims: &Claims) -> Result<(), Rejection> {
        if !self.issuers.is_empty() && !self.issuers.iter().any(|i| i == issuer) {
            return Err(Rejection::new(Reason::WrongIssuer, format!("issuer {issuer} is not accepted on this route")));
        }
        for r in &self.require {
            let granted = granted(claims.get(&r.claim));
            let ok = if r.all {
                r.values.iter().all(|v| granted.contains(&v.as_str()))
            } else {
                r.values.iter().any(|v| granted.contains(&v.as_str()))
            };
            if !ok {
                let mode = if r.all { "all of" } else { "one of" };
                return Err(Rejection::new(Reason::Forbidden, format!("{} lacks {mode} {:?}", r.claim.0, r.values)));
            }
        }
        for (path, want) in &self.equals {
            match claims.get(path) {
                Some(v) if v == want => {}
                Some(v) => {
                    return Err(Rejection::new(
                        Reason::Forbidden,
                        format!("{} is {}, not {want}", path.0, shorten(&v.to_string())),
                    ));
                }
                None => {
                    return Err(Rejection::new(Reason::Forbidden, format!("{} is missing", path.0)));
                }
            }
        }
        Ok(())
    }
}

fn granted(v: Option<&Value>) -> Vec<&str> {
    match v {
        Some(Value::String(s)) => s.split_ascii_whitespace().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> TokenSpec {
        TokenSpec { max_bytes: 16, ..TokenSpec::default() }
    }

    #[test]
    fn extraction_table() {
        let big = vec![b'a'; 17];
        type Case<'a> = (Vec<(&'a str, HeaderValue<'a>)>, Result<&'a str, Reason>);
        let cases: Vec<Case> = vec![
            (vec![("authorization", HeaderValue::Bytes(b"abc"))], Ok("abc")),
            (vec![("Authorization", HeaderValue::Bytes(b"Bearer abc"))], Ok("abc")),
            (vec![("AUTHORIZATION", HeaderValue::Bytes(b"bEaReR   abc "))], Ok("abc")),
            (vec![("other", HeaderValue::Bytes(b"abc"))], Err(Reason::MissingToken)),
            (vec![], Err(Reason::MissingToken)),
            (vec![("authorization", HeaderValue::Bytes(b""))], Err(Reason::EmptyToken)),
            (vec![("authorization", HeaderValue::Bytes(b"Bearer "))], Err(Reason::EmptyToken)),
            (vec![("authorization", HeaderValue::Null)], Err(Reason::EmptyToken)),
            (
                vec![("authorization", HeaderValue::Bytes(b"a")), ("Authorization", HeaderValue::Bytes(b"b"))],
                Err(Reason::DuplicateToken),
            ),
            (vec![("authorization", HeaderValue::Bytes(b"\xff\xfe"))], Err(Reason::NonUtf8Token)),
            (vec![("authorization", HeaderValue::Bytes(&big))], Err(Reason::TokenTooLarge)),
            (vec![("authorization", HeaderValue::WrongType("long integer"))], Err(Reason::Malformed)),
        ];
        for (headers, want) in cases {
            let got = spec().extract(headers.clone()).map_err(|r| r.reason);
            assert_eq!(got, want, "{headers:?}");
        }
        let strict = TokenSpec { require_bearer: true, ..spec() };
        assert_eq!(
            strict.extract([("authorization", HeaderValue::Bytes(b"abc"))]).unwrap_err().reason,
            Reason::Malformed
        );
        assert_eq!(strict.extract([("authorization", HeaderValue::Bytes(b"bearer abc"))]).unwrap(), "abc");
    }

    #[test]
    fn policy_table() {
        let claims = json!({
            "scope": "orders:read orders:write",
            "roles": ["admin", "ops"],
            "realm_access": {"roles": ["publisher"]},
            "https://example.com/roles": ["ns"],
            "tenant": "acme",
            "level": 3,
        });
        let claims = claims.as_object().unwrap();
        let req = |claim: &str, values: &[&str], all: bool| Requirement {
            claim: ClaimPath(claim.into()),
            values: values.iter().map(|s| s.to_string()).collect(),
            all,
        };
        let cases: Vec<(Policy, Option<Reason>)> = vec![
            (Policy::default(), None),
            (Policy { require: vec![req("scope", &["orders:write"], false)], ..Default::default() }, None),
            (
                Policy { require: vec![req("scope", &["orders:write", "x"], true)], ..Default::default() },
                Some(Reason::Forbidden),
            ),
            (Policy { require: vec![req("scope", &["x", "orders:read"], false)], ..Default::default() }, None),
            (Policy { require: vec![req("roles", &["admin", "ops"], true)], ..Default::default() }, None),
            (Policy { require: vec![req("realm_access.roles", &["publisher"], true)], ..Default::default() }, None),
            (Policy { require: vec![req("https://example.com/roles", &["ns"], true)], ..Default::default() }, None),
            (
                Policy { require: vec![req("realm_access.missing", &["a"], false)], ..Default::default() },
                Some(Reason::Forbidden),
            ),
            (Policy { require: vec![req("level", &["3"], false)], ..Default::default() }, Some(Reason::Forbidden)),
            (Policy { equals: vec![(ClaimPath("tenant".into()), json!("acme"))], ..Default::default() }, None),
            (
                Policy { equals: vec![(ClaimPath("tenant".into()), json!("evil"))], ..Default::default() },
                Some(Reason::Forbidden),
            ),
            (Policy { equals: vec![(ClaimPath("level".into()), json!(3))], ..Default::default() }, None),
            (
                Policy { equals: vec![(ClaimPath("level".into()), json!("3"))], ..Default::default() },
                Some(Reason::Forbidden),
            ),
            (
                Policy { equals: vec![(ClaimPath("nope".into()), json!(1))], ..Default::default() },
                Some(Reason::Forbidden),
            ),
            (Policy { issuers: vec!["a".into()], ..Default::default() }, None),
            (Policy { issuers: vec!["b".into()], ..Default::default() }, Some(Reason::WrongIssuer)),
        ];
        for (policy, want) in cases {
            let kept = Claims::keep(&policy.claim_paths().cloned().collect(), claims);
            assert_eq!(policy.check("a", &kept).err().map(|r| r.reason), want, "{policy:?}");
        }
    }
}
