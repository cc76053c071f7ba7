//! The token decision: may this token pass on this route?
//!
//! `Verifier::verify` parses the token strictly ([`jwt`]), finds its issuer by `iss` and its key
//! by `kid` ([`keys`], [`jwks`]), checks the signature with an algorithm pinned to that key, then
//! the registered claims, and finally the route's [`policy`]. Verified tokens are cached by their
//! bytes; a hit skips the signature but still checks time and policy.

pub mod cache;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod policy;
pub mod proof;
pub mod reason;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use jwks::{IssuerKeys, KeyHealth, KeysUnavailable};
pub use jwt::{StdClaims, Times};
pub use policy::{ClaimPath, Claims, HeaderValue, Policy, Requirement, TokenSpec};
pub use reason::{Reason, Rejection};

/// The largest `leeway` an issuer may have. Revocation entries of expiring tokens outlive the
/// token's `exp` by this much plus a margin, without knowing which issuer will see the token.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// A token whose signature and issuer-level claims checked out: what routes, revocation and
/// the trusted copy read, and nothing more (a cached token costs about this struct).
#[derive(Debug)]
pub struct Verified {
    /// The issuer's config name.
    pub issuer: Arc<str>,
    /// The issuer's `iss` (the token's, which had to equal it).
    pub iss: Arc<str>,
    /// The `kid` of the key that verified it, if the key has one.
    pub kid: Option<Arc<str>>,
    /// The algorithm it was verified with.
    pub alg: Algorithm,
    /// See [`Fingerprint`].
    pub fingerprint: Fingerprint,
    /// `sub`.
    pub sub: Option<Box<str>>,
    /// `jti`.
    pub jti: Option<Box<str>>,
    /// `exp`, `nbf` and `iat`, checked again on every use.
    pub times: Times,
    /// The claims some route reads ([`CacheSettings::claims`]).
    pub claims: Claims,
    issuer_index: usize,
    generation: u64,
    /// Unix time after which a cached copy is not used (`exp` plus leeway, or the TTL for tokens
    /// without `exp`).
    cached_until: i64,
    /// The revocation mirror's generation in which this token was last found absent from the
    /// list (0: never): while the mirror is unchanged, a reused token is not looked up again
    /// ([`crate::revocation::Revocations::check`]).
    pub(crate) unrevoked_in: std::sync::atomic::AtomicU64,
}

/// What the gate learned of a message's token, carried from the decision to the
/// audit trail ([`crate::audit`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// The verified `iss` (only once the signature verified).
    pub issuer: Option<Arc<str>>,
    /// `sub`.
    pub subject: Option<Box<str>>,
    /// The key that verified it.
    pub kid: Option<Arc<str>>,
    /// `jti`.
    pub jti: Option<Box<str>>,
    /// The token's fingerprint (hex), whenever there was a token.
    pub fingerprint: Option<String>,
}

impl Facts {
    /// The facts of a verified token.
    pub fn of(v: &Verified) -> Facts {
        Facts {
            issuer: Some(Arc::clone(&v.iss)),
            subject: v.sub.clone(),
            kid: v.kid.clone(),
            jti: v.jti.clone(),
            fingerprint: Some(v.fingerprint.to_string()),
        }
    }
}

#[cfg(test)]
impl Verified {
    /// A verified token of no issuer, cached for a minute.
    pub(crate) fn for_tests() -> Verified {
        Verified {
            issuer: Arc::from("test"),
            iss: Arc::from("test"),
            kid: None,
            alg: Algorithm::HS256,
            fingerprint: Fingerprint::of("test"),
            sub: None,
            jti: None,
            times: Times::default(),
            claims: Claims::keep(&Arc::from([]), &Map::new()),
            issuer_index: 0,
            generation: 0,
            cached_until: unix_now() + 60,
            unrevoked_in: Default::default(),
        }
    }
}

/// A token's fingerprint: SHA-256 of `header.payload`, so a re-encoded signature (ECDSA
/// malleability) keeps it. Safe to log and to use as a revocation key; written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `token`.
    pub fn of(token: &str) -> Fingerprint {
        let signing_input = token.rsplit_once('.').map_or(token, |(si, _)| si);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, signing_input.as_bytes());
        Fingerprint(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// The 64 hex digits, without allocating.
    pub fn hex(&self) -> FingerprintHex {
        let mut out = [0u8; 64];
        hex::encode_to_slice(self.0, &mut out).expect("64 hex digits for 32 bytes");
        FingerprintHex(out)
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A fingerprint's text, on the stack.
pub struct FingerprintHex([u8; 64]);

impl FingerprintHex {
    /// The hex digits.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// Hex SHA-256 of `b`: the message digests of attestations and proofs.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref())
}

/// The fingerprint of a token as text, see [`Fingerprint`].
pub fn fingerprint(token: &str) -> String {
    Fingerprint::of(token).to_string()
}

/// The result of a decision: the verified token or why not.
pub type Verdict = Result<Arc<Verified>, Rejection>;

/// Issuer-level checks, from the config.
#[derive(Debug, Clone)]
pub struct IssuerChecks {
    /// The `iss` value tokens of this issuer carry.
    pub iss: Arc<str>,
    /// Acceptable `aud` values (any one); empty means `aud` is not checked.
    pub audiences: Vec<String>,
    /// Algorithms this issuer may use; keys narrow this further.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: i64,
    /// Whether a token without `exp` is refused.
    pub require_exp: bool,
    /// Largest allowed `now - iat`, in seconds.
    pub max_age: Option<i64>,
    /// Required header `typ` (e.g. `at+jwt`), compared case-insensitively.
    pub typ: Option<String>,
    /// Claims that must be present (paths allowed).
    pub required_claims: Vec<ClaimPath>,
}

/// A trusted token issuer: its checks and its keys.
pub struct Issuer {
    /// Config name.
    pub name: Arc<str>,
    /// Claim checks.
    pub checks: IssuerChecks,
    /// Keys.
    pub keys: IssuerKeys,
}

/// The verified-token cache, and what a verified token keeps.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most tokens kept (each is cached on its second sight); each costs about 550 bytes,
    /// whatever its length (BENCHMARKS.md, 2a). Zero disables the cache.
    pub max_entries: u64,
    /// How long a token without `exp` stays cached.
    pub ttl_without_exp: Duration,
    /// Every claim path some route reads: a verified token keeps these claims only. The config
    /// collects them from all routes.
    pub claims: Arc<[ClaimPath]>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings { max_entries: 100_000, ttl_without_exp: Duration::from_secs(300), claims: Arc::from([]) }
    }
}

/// The verification engine shared by every route.
pub struct Verifier {
    issuers: Vec<Issuer>,
    by_iss: HashMap<String, usize>,
    cache: Option<cache::TokenCache>,
    ttl_without_exp: Duration,
    claims: Arc<[ClaimPath]>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Verifier {
    /// Tokens in the verified-token cache.
    pub fn cached_tokens(&self) -> u64 {
        self.cache.as_ref().map_or(0, cache::TokenCache::len)
    }

    /// An engine over `issuers`; remote keys are not fetched until [`Verifier::start`].
    pub fn new(issuers: Vec<Issuer>, cache: &CacheSettings) -> Verifier {
        let by_iss = issuers.iter().enumerate().map(|(i, is)| (is.checks.iss.to_string(), i)).collect();
        Verifier {
            issuers,
            by_iss,
            cache: cache::TokenCache::new(cache),
            ttl_without_exp: cache.ttl_without_exp,
            claims: Arc::clone(&cache.claims),
        }
    }

    /// Fetches every remote key set once; returns the failures (those issuers hold until fixed).
    pub async fn start(&self) -> Vec<KeysUnavailable> {
        let mut failed = Vec::new();
        for i in &self.issuers {
            if let Err(e) = i.keys.refresh().await {
                failed.push(e);
            }
        }
        failed
    }

    /// Refreshes remote key sets periodically until `cancel`.
    pub fn spawn_refresh(self: &Arc<Self>, cancel: CancellationToken) {
        for idx in 0..self.issuers.len() {
            let Some(every) = self.issuers[idx].keys.refresh_interval() else {
                continue;
            };
            let this = Arc::clone(self);
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await; // the first tick is immediate; start() already fetched
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => { let _ = this.issuers[idx].keys.refresh().await; }
                    }
                }
            });
        }
    }

    /// Freshness of every remote key set.
    pub async fn health(&self) -> Vec<KeyHealth> {
        let mut out = Vec::new();
        for i in &self.issuers {
            out.extend(i.keys.health().await);
        }
        out
    }

    /// Decides `token` for a route with `policy` at unix time `now`. `Err` means the decision
    /// could not be made (keys unavailable): hold and retry, never accept.
    pub async fn verify(&self, policy: &Policy, token: &str, now: i64) -> Result<Verdict, KeysUnavailable> {
        Ok(match self.verify_token(token, now).await? {
            Ok(v) => self.admit(policy, v, now),
            Err(r) => Err(r),
        })
    }

    /// The token's signature and issuer-level claims, from the cache when it was verified before
    /// (and cached on its second sight while its times hold): what is known of the token, not yet
    /// whether a route takes it now ([`Self::admit`]).
    pub async fn verify_token(&self, token: &str, now: i64) -> Result<Verdict, KeysUnavailable> {
        let current = |v: &Verified| self.issuers[v.issuer_index].keys.current().generation == v.generation;
        if let Some(c) = &self.cache
            && let Some(v) = c.recent(token, now, current)
        {
            return Ok(Ok(v));
        }
        let key = self.cache.as_ref().map(|_| cache::Key::of(token));
        if let (Some(c), Some(key)) = (&self.cache, &key)
            && let Some(v) = c.get(key, now)
        {
            if current(&v) {
                c.remember(token, &v);
                return Ok(Ok(v));
            }
            c.invalidate(key);
        }
        let verified = match self.verify_uncached(token, now).await? {
            Ok(v) => Arc::new(v),
            Err(r) => return Ok(Err(r)),
        };
        let timely = check_time(&self.issuers[verified.issuer_index].checks, &verified.times, now).is_ok();
        if let (true, Some(c), Some(key)) = (timely, &self.cache, key) {
            c.offer(key, Arc::clone(&verified));
        }
        Ok(Ok(verified))
    }

    /// Checks what can change between two uses of the same verified token: time and route policy.
    pub fn admit(&self, policy: &Policy, v: Arc<Verified>, now: i64) -> Verdict {
        let checks = &self.issuers[v.issuer_index].checks;
        check_time(checks, &v.times, now)?;
        policy.check(&v.issuer, &v.claims)?;
        Ok(v)
    }

    async fn verify_uncached(&self, token: &str, now: i64) -> Result<Result<Verified, Rejection>, KeysUnavailable> {
        let p = match jwt::parse(token) {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        let std = match jwt::std_claims(&p.claims) {
            Ok(s) => s,
            Err(r) => return Ok(Err(r)),
        };
        let Some(iss) = std.iss.as_deref() else {
            return Ok(Err(Rejection::new(Reason::MissingClaim, "no iss claim")));
        };
        let Some(&idx) = self.by_iss.get(iss) else {
            return Ok(Err(Rejection::new(
                Reason::UnknownIssuer,
                format!("iss {} is not configured", jwt::shorten(iss)),
            )));
        };
        let issuer = &self.issuers[idx];
        if !issuer.checks.algorithms.contains(&p.alg) {
            return Ok(Err(Rejection::new(
                Reason::UnsupportedAlg,
                format!("{:?} is not allowed for issuer {}", p.alg, issuer.name),
            )));
        }
        let mut refetched = false;
        let (kid, generation) = loop {
            let set = issuer.keys.current_full();
            match set.lookup(p.kid.as_deref(), p.alg) {
                keys::Lookup::Found(candidates) => {
                    let Some(key) =
                        candidates.iter().find(|k| k.verify(p.alg, p.signing_input.as_bytes(), p.signature))
                    else {
                        return Ok(Err(Rejection::new(Reason::BadSignature, "signature does not verify")));
                    };
                    break (key.kid.clone(), set.generation);
                }
                keys::Lookup::AlgNotPinned => {
                    return Ok(Err(Rejection::new(
                        Reason::UnsupportedAlg,
                        format!("key {} is not pinned to {:?}", jwt::shorten(p.kid.as_deref().unwrap_or("")), p.alg),
                    )));
                }
                keys::Lookup::NoKey => match p.kid.as_deref() {
                    Some(kid) if !refetched && issuer.keys.is_remote() => {
                        let seen = set.generation;
                        drop(set);
                        // Boxed: a rare wait, kept out of every decision's future (moved per message).
                        match Box::pin(issuer.keys.on_unknown_kid(kid, seen)).await {
                            Ok(()) => refetched = true,
                            // Held long enough: one producer's unknown kid must not hold the
                            // route for the whole outage.
                            Err(u) if u.give_up => {
                                return Ok(Err(Rejection::new(
                                    Reason::KeyUnavailable,
                                    format!("no key with kid {} and {}", jwt::shorten(kid), u.detail),
                                )));
                            }
                            Err(u) => return Err(u),
                        }
                    }
                    Some(kid) => {
                        return Ok(Err(Rejection::new(
                            Reason::UnknownKid,
                            format!("no key with kid {}", jwt::shorten(kid)),
                        )));
                    }
                    None => {
                        return Ok(Err(Rejection::new(
                            Reason::UnknownKid,
                            format!("token has no kid and no key takes {:?}", p.alg),
                        )));
                    }
                },
            }
        };
        if let Err(r) = check_claims(&issuer.checks, p.typ.as_deref(), &std, &p.claims) {
            return Ok(Err(r));
        }
        let cached_until = match std.times.exp {
            Some(exp) => exp.saturating_add(issuer.checks.leeway),
            None => now.saturating_add(self.ttl_without_exp.as_secs() as i64),
        };
        Ok(Ok(Verified {
            issuer: Arc::clone(&issuer.name),
            iss: Arc::clone(&issuer.checks.iss),
            kid,
            alg: p.alg,
            fingerprint: Fingerprint::of(token),
            times: std.times,
            sub: std.sub.map(String::into_boxed_str),
            jti: std.jti.map(String::into_boxed_str),
            claims: Claims::keep(&self.claims, &p.claims),
            issuer_index: idx,
            generation,
            cached_until,
            unrevoked_in: Default::default(),
        }))
    }
}

/// Checks that do not depend on time: type, audience, required claims.
fn check_claims(
    c: &IssuerChecks,
    typ: Option<&str>,
    std: &StdClaims,
    claims: &Map<String, Value>,
) -> Result<(), Rejection> {
    if let Some(want) = &c.typ {
        let got = typ.unwrap_or("");
        let got = got.strip_prefix("application/").unwrap_or(got);
        if !got.eq_ignore_ascii_case(want) {
            return Err(Rejection::new(Reason::WrongType, format!("typ is {}, expected {want}", jwt::shorten(got))));
        }
    }
    if !c.audiences.is_empty() {
        if std.aud.is_empty() {
            return Err(Rejection::new(Reason::MissingClaim, "no aud claim"));
        }
        if !std.aud.iter().any(|a| c.audiences.contains(a)) {
            return Err(Rejection::new(
                Reason::WrongAudience,
                format!(
                    "aud {:?} is not one of {:?}",
                    std.aud.iter().map(|a| jwt::shorten(a)).collect::<Vec<_>>(),
                    c.audiences
                ),
            ));
        }
    }
    for path in &c.required_claims {
        if path.get(claims).is_none() {
            return Err(Rejection::new(Reason::MissingClaim, format!("no {} claim", path.0)));
        }
    }
    Ok(())
}

/// Time checks, run on every use of a token (cached or not).
pub fn check_time(c: &IssuerChecks, s: &Times, now: i64) -> Result<(), Rejection> {
    let leeway = c.leeway;
    match s.exp {
        Some(exp) if now >= exp.saturating_add(leeway) => {
            return Err(Rejection::new(Reason::Expired, format!("expired {}s ago", now.saturating_sub(exp))));
        }
        None if c.require_exp => return Err(Rejection::new(Reason::MissingClaim, "no exp claim")),
        _ => {}
    }
    if let Some(nbf) = s.nbf
        && nbf > now.saturating_add(leeway)
    {
        return Err(Rejection::new(Reason::NotYetValid, format!("valid in {}s", nbf.saturating_sub(now))));
    }
    if let Some(iat) = s.iat
        && iat > now.saturating_add(leeway)
    {
        return Err(Rejection::new(
            Reason::IssuedInFuture,
            format!("issued {}s in the future", iat.saturating_sub(now)),
        ));
    }
    if let Some(max) = c.max_age {
        let Some(iat) = s.iat else {
            return Err(Rejection::new(Reason::MissingClaim, "no iat claim (a maximum age is set)"));
        };
        if now.saturating_sub(iat) > max.saturating_add(leeway) {
            return Err(Rejection::new(
                Reason::TooOld,
                format!("issued {}s ago, limit {max}s", now.saturating_sub(iat)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_table() {
        let checks = IssuerChecks {
            iss: "i".into(),
            audiences: vec![],
            algorithms: vec![],
            leeway: 30,
            require_exp: true,
            max_age: Some(3600),
            typ: None,
            required_claims: vec![],
        };
        let now = 1_000_000;
        let c = |exp: Option<i64>, nbf: Option<i64>, iat: Option<i64>| Times { exp, nbf, iat };
        let cases = [
            (c(Some(now + 10), None, Some(now)), None),
            (c(Some(now - 29), None, Some(now)), None),
            (c(Some(now - 30), None, Some(now)), Some(Reason::Expired)),
            (c(None, None, Some(now)), Some(Reason::MissingClaim)),
            (c(Some(now + 10), Some(now + 30), Some(now)), None),
            (c(Some(now + 10), Some(now + 31), Some(now)), Some(Reason::NotYetValid)),
            (c(Some(now + 100), None, Some(now + 31)), Some(Reason::IssuedInFuture)),
            (c(Some(now + 10), None, None), Some(Reason::MissingClaim)),
            (c(Some(now + 10), None, Some(now - 3630)), None),
            (c(Some(now + 10), None, Some(now - 3631)), Some(Reason::TooOld)),
            (c(Some(i64::MAX), Some(i64::MIN), Some(i64::MIN)), Some(Reason::TooOld)),
        ];
        for (claims, want) in cases {
            assert_eq!(check_time(&checks, &claims, now).err().map(|r| r.reason), want, "{claims:?}");
        }
        let lax = IssuerChecks { require_exp: false, max_age: None, ..checks };
        assert!(check_time(&lax, &Times::default(), now).is_ok());
    }

    #[test]
    fn fingerprint_ignores_the_signature() {
        assert_eq!(fingerprint("a.b.sig1"), fingerprint("a.b.sig2"));
        assert_ne!(fingerprint("a.b.sig1"), fingerprint("a.c.sig1"));
        assert_eq!(fingerprint("a.b.x").len(), 64);
    }
}
