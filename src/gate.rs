//! The core: an envelope in, an outcome out (forward, dead-letter) or a hold.
//!
//! Sources call [`Gate::handle`] for each message; it is the same for Kafka and AMQP. A hold
//! (`Err`) means an infrastructure failure: the source must not acknowledge, must back off and
//! retry the same message. It never becomes an accept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::config::{GuardConfig, OnUnavailable, RouteRules};
use crate::envelope::{Envelope, HeaderData, Outgoing};
use crate::revocation::{self, Revocations};
use crate::single_use::{Ticket, Uses};
use crate::verify::{self, Facts, HeaderValue, KeysUnavailable, Reason, Rejection, Verified, Verifier};

/// Why a message cannot be decided now.
#[derive(Debug, thiserror::Error)]
pub enum Hold {
    /// Signing keys could not be fetched.
    #[error(transparent)]
    Keys(#[from] KeysUnavailable),
    /// The revocation list could not be read.
    #[error(transparent)]
    Revocation(#[from] revocation::Unavailable),
    /// A single-use route's record of uses could not be read or written.
    #[error("{} (unreachable)", .0.0)]
    SingleUse(revocation::Unavailable),
}

impl Hold {
    /// Its `cause` label (one of [`crate::telemetry::HOLD_CAUSES`]).
    pub fn cause(&self) -> &'static str {
        let [keys, revocation, single_use] = crate::telemetry::HOLD_CAUSES;
        match self {
            Hold::Keys(_) => keys,
            Hold::Revocation(_) => revocation,
            Hold::SingleUse(_) => single_use,
        }
    }
}

/// What to do with a message.
#[derive(Debug)]
pub enum Outcome {
    /// Publish to the trusted destination.
    Forward(Outgoing),
    /// Publish to the dead-letter destination.
    DeadLetter(Outgoing, Rejection),
}

/// The decision shared by every route and source.
pub struct Gate {
    verifier: Arc<Verifier>,
    revocations: Option<Arc<Revocations>>,
    /// The record of single-use tokens' uses (routes with `single_use = true`).
    uses: Option<Arc<Uses>>,
    on_unavailable: OnUnavailable,
    verify: bool,
    /// Whether decisions carry their [`Facts`] (the audit trail is on).
    audit: bool,
    /// Per route and reason: when a rejection was last logged, and how many were not since.
    last_logged: Mutex<HashMap<(String, Reason), LogWindow>>,
}

/// When a kind of line was last logged, and how many were not logged since.
type LogWindow = (Option<Instant>, u64);

/// A rejection of each reason is logged at most this often per route; all are counted.
const REJECTION_LOG_EVERY: Duration = Duration::from_secs(10);

impl Gate {
    /// A gate that verifies tokens and, if given, checks revocations.
    pub fn new(verifier: Arc<Verifier>, revocations: Option<Arc<Revocations>>, on_unavailable: OnUnavailable) -> Gate {
        Gate {
            verifier,
            revocations,
            uses: None,
            on_unavailable,
            verify: true,
            audit: false,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// The same gate, its decisions carrying what the audit trail records.
    pub fn audited(self) -> Gate {
        Gate { audit: true, ..self }
    }

    /// The same gate, recording single-use tokens' uses in `uses`.
    pub fn with_single_use(self, uses: Arc<Uses>) -> Gate {
        Gate { uses: Some(uses), ..self }
    }

    /// A gate that forwards everything unverified: only for measuring the pipeline's own cost.
    pub fn pass_through(verifier: Arc<Verifier>) -> Gate {
        Gate { verify: false, ..Gate::new(verifier, None, OnUnavailable::Hold) }
    }

    /// The verifier (for health reporting).
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// The revocation list, if checked (a reload that keeps `[redis]` keeps it).
    pub fn revocations(&self) -> Option<&Arc<Revocations>> {
        self.revocations.as_ref()
    }

    /// Whether revocations can be checked now.
    pub fn revocation_up(&self) -> bool {
        self.revocations.as_ref().is_none_or(|r| r.is_up())
    }

    /// Decides one message at unix time `now`.
    pub async fn handle(&self, route: &RouteRules, env: &Envelope, now: i64) -> Result<Outcome, Hold> {
        self.handle_in_turn(route, env, now, None).await
    }

    /// [`Self::handle`], making a single-use claim only once `turn` comes (read order).
    pub async fn handle_in_turn(
        &self,
        route: &RouteRules,
        env: &Envelope,
        now: i64,
        turn: Option<Ticket>,
    ) -> Result<Outcome, Hold> {
        if !self.verify {
            return Ok(Outcome::Forward(forward(route, env, None)));
        }
        if let Some(defect) = &env.defect {
            let r = Rejection::new(Reason::Malformed, defect.clone());
            self.log_rejection(route, &r, None);
            let mut out = dead_letter(route, env, &r, None, SystemTime::now());
            out.facts = self.audit.then(Box::default);
            return Ok(Outcome::DeadLetter(out, r));
        }
        let headers = env.headers.iter().map(|(n, d)| (n.as_str(), header_value(d)));
        let (token, verdict, verified) = match route.token.extract(headers) {
            Ok(t) => match self.verifier.verify_token(t, now).await? {
                Ok(v) => {
                    // Kept past the route's rules only for the audit trail (no clone otherwise).
                    let kept = self.audit.then(|| Arc::clone(&v));
                    (Some(t), self.verifier.admit(&route.policy, v, now), kept)
                }
                Err(r) => (Some(t), Err(r), None),
            },
            Err(r) => (None, Err(r), None),
        };
        // What is known of the token for the audit trail: a token refused by the route's rules
        // (`forbidden`, `expired`) still verified, and its identity is recorded.
        let facts = self.audit.then(|| match &verified {
            Some(v) => Box::new(Facts::of(v)),
            None => Box::new(Facts { fingerprint: token.map(verify::fingerprint), ..Facts::default() }),
        });
        drop(verified);
        // A token bound to its message: the proof travels with the message, so it is checked
        // for every message, cached token or not.
        let verdict = match (verdict, &route.proof) {
            (Ok(v), Some(spec)) => {
                let name = match &**spec {
                    verify::proof::ProofSpec::Jkt { header, .. } => Some(header.as_str()),
                    verify::proof::ProofSpec::DigestClaim(_) => None,
                };
                let proofs = env.headers.iter().filter_map(|(n, d)| match d {
                    HeaderData::Bytes(b) if name.is_some_and(|h| n.eq_ignore_ascii_case(h)) => Some(b.as_slice()),
                    _ => None,
                });
                let payload = env.payload.as_deref().unwrap_or_default();
                spec.check(proofs, env.key.as_deref(), payload, &v, now).map(|()| v)
            }
            (verdict, _) => verdict,
        };
        let verdict = match (verdict, &self.revocations) {
            (Ok(v), Some(list)) => match list.check(&v).await {
                Ok(None) => Ok(v),
                Ok(Some(r)) => Err(r),
                Err(e) if self.on_unavailable == OnUnavailable::DeadLetter => {
                    Err(Rejection::new(Reason::RevocationUnavailable, e.0))
                }
                Err(e) => return Err(Hold::Revocation(e)),
            },
            (verdict, _) => verdict,
        };
        // Last, so that only a token that passes everything else uses up its jti.
        let verdict = match verdict {
            Ok(v) if route.single_use => {
                if let Some(t) = &turn {
                    t.wait().await;
                }
                let claimed = match &self.uses {
                    // Boxed, as the revocation list's round trip is (see `Revocations::check`).
                    Some(uses) => Box::pin(uses.claim(&v, env, now)).await,
                    None => Err(revocation::Unavailable("no record of single-use tokens (needs [redis])".into())),
                };
                match claimed {
                    Ok(None) => Ok(v),
                    Ok(Some(r)) => Err(r),
                    Err(e) if self.on_unavailable == OnUnavailable::DeadLetter => {
                        Err(Rejection::new(Reason::RevocationUnavailable, e.0))
                    }
                    Err(e) => return Err(Hold::SingleUse(e)),
                }
            }
            verdict => verdict,
        };
        Ok(match verdict {
            Ok(v) => {
                tracing::trace!(route = %route.name, fingerprint = %v.fingerprint, kid = v.kid.as_deref().unwrap_or("-"), "token accepted");
                let mut out = forward(route, env, Some(&v));
                out.facts = facts;
                Outcome::Forward(out)
            }
            Err(r) => {
                let fp = token.map(verify::fingerprint);
                self.log_rejection(route, &r, fp.as_deref());
                let mut out = dead_letter(route, env, &r, fp.as_deref(), SystemTime::now());
                out.facts = facts;
                Outcome::DeadLetter(out, r)
            }
        })
    }

    /// Rejections are counted by the source ([`crate::telemetry::RouteMetrics`]) and logged
    /// here rate-limited (one line per route and reason every 10 s, saying how many were not
    /// logged): a hostile producer must not be able to flood the logs.
    fn log_rejection(&self, route: &RouteRules, r: &Rejection, fp: Option<&str>) {
        let mut last = self.last_logged.lock().expect("not poisoned");
        let entry = last.entry((route.name.clone(), r.reason)).or_insert((None, 0));
        if entry.0.is_none_or(|t| t.elapsed() >= REJECTION_LOG_EVERY) {
            let suppressed = std::mem::take(&mut entry.1);
            entry.0 = Some(Instant::now());
            tracing::info!(route = %route.name, reason = r.reason.code(), detail = %r.detail, fingerprint = fp.unwrap_or("-"), suppressed, "token rejected (one line per route and reason every 10s; suppressed: not logged since)");
        } else {
            entry.1 += 1;
        }
    }
}

fn header_value(d: &HeaderData) -> HeaderValue<'_> {
    match d {
        HeaderData::Bytes(b) => HeaderValue::Bytes(b),
        HeaderData::Null => HeaderValue::Null,
        HeaderData::Typed { kind, .. } => HeaderValue::WrongType(kind),
    }
}

/// Source headers minus the ones that must not pass: the gate's own prefix (a producer could
/// forge them), configured identity headers (same), and optionally the token. With room for the
/// gate's own headers (identity, issuer, key, fingerprint, route, source, id, reason), so that
/// adding them does not grow the list again.
fn kept_headers(route: &RouteRules, env: &Envelope, strip_token: bool) -> Vec<(String, HeaderData)> {
    let mut kept = Vec::with_capacity(env.headers.len() + route.identity_headers.len() + 10);
    let headers = env
        .headers
        .iter()
        .filter(|(name, _)| {
            // Compared without case and without allocating (a copy per header per message).
            !(route.headers.is_own(name)
                || route.identity_headers.iter().any(|(_, h)| h.eq_ignore_ascii_case(name))
                || (strip_token && name.eq_ignore_ascii_case(&route.token.header)))
        })
        .cloned();
    kept.extend(headers);
    kept
}

fn text(s: impl Into<String>) -> HeaderData {
    HeaderData::Bytes(s.into().into_bytes())
}

fn base(env: &Envelope, headers: Vec<(String, HeaderData)>) -> Outgoing {
    Outgoing {
        key: env.key.clone(),
        payload: env.payload.clone(),
        headers,
        timestamp_ms: env.timestamp_ms,
        origin: env.origin.clone(),
        amqp: env.amqp.clone(),
        amqp_headers: env.amqp_headers.clone(),
        facts: None,
        prepared: None,
    }
}

/// The trusted copy: identity headers added, token stripped (by default).
pub fn forward(route: &RouteRules, env: &Envelope, v: Option<&Verified>) -> Outgoing {
    let mut headers = kept_headers(route, env, route.strip_token);
    let names = &route.headers;
    if let Some(v) = v {
        for (claim, header) in &route.identity_headers {
            match v.claims.get(claim) {
                // A string with control characters (CR, LF, NUL, ...) is written JSON-encoded,
                // quoted and escaped, on every broker: a consumer that splits or logs header
                // values line by line cannot be fooled into reading a second header or line.
                Some(Value::String(s)) if s.chars().any(char::is_control) => {
                    headers.push((header.clone(), text(Value::String(s.clone()).to_string())));
                }
                Some(Value::String(s)) => headers.push((header.clone(), text(s.clone()))),
                Some(other) => headers.push((header.clone(), text(other.to_string()))),
                None => {}
            }
        }
        headers.push((names.issuer.clone(), HeaderData::Bytes(v.iss.as_bytes().to_vec())));
        if let Some(kid) = &v.kid {
            headers.push((names.kid.clone(), HeaderData::Bytes(kid.as_bytes().to_vec())));
        }
        headers.push((names.fingerprint.clone(), HeaderData::Bytes(v.fingerprint.hex().as_str().as_bytes().to_vec())));
    }
    let id = env.message_id();
    if let (Some(v), Some(a)) = (v, &route.attest) {
        // Signing cannot fail for keys checked at load (an EdDSA or ES256 key and a JSON
        // object); if it ever did, the message goes without the header, which consumers
        // that check attestations refuse, and the log says why.
        match a.attest(&route.name, env, &id, v, verify::unix_now()) {
            Ok(jws) => headers.push((a.header.clone(), text(jws))),
            Err(e) => tracing::error!(route = %route.name, error = %e, "attestation not signed"),
        }
    }
    headers.push((names.route.clone(), text(route.name.clone())));
    for (k, val) in env.origin.describe(names) {
        headers.push((k.to_owned(), text(val)));
    }
    headers.push((names.message_id.clone(), text(id)));
    base(env, headers)
}

/// The dead-letter copy: the original message plus the reason, detail, source and time.
pub fn dead_letter(route: &RouteRules, env: &Envelope, r: &Rejection, fp: Option<&str>, at: SystemTime) -> Outgoing {
    let mut headers = kept_headers(route, env, false);
    if !route.dead_letter_keeps_token {
        // A dead letter must not hand a replayable token to whoever reads the dead-letter topic.
        let redacted = fp.map_or_else(|| "redacted".to_owned(), |fp| format!("redacted; fingerprint={fp}"));
        for (name, value) in &mut headers {
            if name.eq_ignore_ascii_case(&route.token.header) {
                *value = text(redacted.clone());
            }
        }
    }
    let names = &route.headers;
    headers.push((names.reason.clone(), text(r.reason.code())));
    headers.push((names.detail.clone(), text(r.detail.clone())));
    headers.push((names.route.clone(), text(route.name.clone())));
    headers.push((names.rejected_at.clone(), text(humantime::format_rfc3339_millis(at).to_string())));
    if let Some(fp) = fp {
        headers.push((names.fingerprint.clone(), text(fp)));
    }
    for (k, val) in env.origin.describe(names) {
        headers.push((k.to_owned(), text(val)));
    }
    headers.push((names.message_id.clone(), text(env.message_id())));
    base(env, headers)
}

/// The runaway dead-letter guard of one route: trips when a window's dead-letter share is too high.
pub struct Guard {
    cfg: GuardConfig,
    route: String,
    /// The route's storm gauge ([`crate::telemetry::RouteMetrics::dead_letter_storm`]).
    storm: metrics::Gauge,
    started: Instant,
    total: u64,
    dead: u64,
}

impl Guard {
    /// A guard with the route's settings.
    pub fn new(route: &str, cfg: GuardConfig, storm: metrics::Gauge) -> Guard {
        Guard { cfg, route: route.to_owned(), storm, started: Instant::now(), total: 0, dead: 0 }
    }

    /// Records one outcome; returns how long to pause if the guard tripped and pausing is on.
    pub fn record(&mut self, dead_lettered: bool) -> Option<Duration> {
        self.total += 1;
        self.dead += u64::from(dead_lettered);
        if self.started.elapsed() < self.cfg.window.0 {
            return None;
        }
        let (total, dead) = (self.total, self.dead);
        (self.started, self.total, self.dead) = (Instant::now(), 0, 0);
        let tripped = total >= self.cfg.min_messages && dead as f64 > self.cfg.max_ratio * total as f64;
        self.storm.set(f64::from(u8::from(tripped)));
        if !tripped {
            return None;
        }
        let pause = self.cfg.pause.map(|d| d.0);
        tracing::error!(route = %self.route, dead_lettered = dead, total, pause_secs = pause.map(|d| d.as_secs()), "dead-letter storm: most messages are rejected; check issuer keys and route policy");
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use crate::envelope::Origin;
    use crate::verify::{ClaimPath, Policy, TokenSpec};

    fn route() -> RouteRules {
        RouteRules {
            name: "r".into(),
            token: TokenSpec::default(),
            strip_token: true,
            dead_letter_keeps_token: false,
            policy: Policy::default(),
            identity_headers: vec![(ClaimPath("sub".into()), "x-user".into())],
            headers: crate::envelope::HeaderNames::new("x-tokengate-"),
            attest: None,
            proof: None,
            single_use: false,
        }
    }

    fn env(headers: &[(&str, &str)]) -> Envelope {
        Envelope {
            key: Some(b"k".to_vec()),
            payload: Some(b"p".to_vec()),
            headers: headers.iter().map(|(n, v)| (n.to_string(), HeaderData::Bytes(v.as_bytes().to_vec()))).collect(),
            timestamp_ms: Some(5),
            origin: Origin::Kafka { topic: "t".into(), partition: 2, offset: 9 },
            amqp: None,
            amqp_headers: None,
            defect: None,
        }
    }

    fn names(o: &Outgoing) -> Vec<&str> {
        o.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn forged_identity_headers_and_the_token_never_pass() {
        let e =
            env(&[("Authorization", "Bearer x"), ("X-Tokengate-Issuer", "evil"), ("x-user", "root"), ("trace", "1")]);
        let out = forward(&route(), &e, None);
        assert_eq!(
            names(&out),
            vec![
                "trace",
                "x-tokengate-route",
                "x-tokengate-source-topic",
                "x-tokengate-source-partition",
                "x-tokengate-source-offset",
                "x-tokengate-message-id"
            ]
        );
        assert_eq!(
            (out.key.as_deref(), out.payload.as_deref(), out.timestamp_ms),
            (Some(&b"k"[..]), Some(&b"p"[..]), Some(5))
        );
        let dl = dead_letter(&route(), &e, &Rejection::new(Reason::Expired, "old"), Some("fp"), SystemTime::UNIX_EPOCH);
        let n = names(&dl);
        assert!(n.contains(&"Authorization"), "dead letters keep the token header's place");
        let token = dl.headers.iter().find(|(n, _)| n == "Authorization").map(|(_, v)| v.clone());
        assert_eq!(token, Some(text("redacted; fingerprint=fp")), "but never the replayable token");
        let keep = RouteRules { dead_letter_keeps_token: true, ..route() };
        let kept = dead_letter(&keep, &e, &Rejection::new(Reason::Expired, "old"), Some("fp"), SystemTime::UNIX_EPOCH);
        assert!(kept.headers.iter().any(|(n, v)| n == "Authorization" && *v == text("Bearer x")), "opt-in keeps it");
        assert!(!n.contains(&"X-Tokengate-Issuer") && !n.contains(&"x-user"));
        let get = |k: &str| dl.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("x-tokengate-reason"), Some(text("expired")));
        assert_eq!(get("x-tokengate-rejected-at"), Some(text("1970-01-01T00:00:00.000Z")));
        assert_eq!(get("x-tokengate-fingerprint"), Some(text("fp")));
    }

    #[test]
    fn guard_trips_only_on_a_full_bad_window() {
        let cfg = GuardConfig {
            max_ratio: 0.5,
            min_messages: 10,
            window: Dur(Duration::ZERO),
            pause: Some(Dur(Duration::from_secs(3))),
        };
        let mut g = Guard::new("r", cfg.clone(), metrics::Gauge::noop());
        assert_eq!(g.record(true), None, "1 message is below min_messages");
        let mut g = Guard {
            cfg: GuardConfig { window: Dur(Duration::from_secs(3600)), ..cfg },
            ..Guard::new("r", GuardConfig::default(), metrics::Gauge::noop())
        };
        for _ in 0..20 {
            assert_eq!(g.record(true), None, "window not over");
        }
        g.started -= Duration::from_secs(3601);
        assert_eq!(g.record(true), Some(Duration::from_secs(3)));
    }
}
