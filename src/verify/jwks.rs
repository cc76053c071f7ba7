//! An issuer's keys: fixed ones from the config plus, optionally, a JWKS URL that rotates.
//!
//! The URL is fetched at start and then every `refresh`. A token with an unknown `kid` may
//! trigger one extra fetch, but fetches are single-flight (one at a time, waiters reuse its
//! result) and at most one per `min_refetch`; unknown kids are remembered for that long, so a
//! flood of random kids costs at most one request per interval. When the identity provider is
//! down the last good set keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::Algorithm;

use super::keys::{self, Key, KeySet};

/// A JWKS larger than this is refused: real ones are a few KB.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The keys could not be loaded and the token cannot be decided now (retry later).
#[derive(Debug, Clone, thiserror::Error)]
#[error("keys of issuer {issuer} unavailable: {detail}")]
pub struct KeysUnavailable {
    /// The issuer's config name.
    pub issuer: String,
    /// Why.
    pub detail: String,
    /// The identity provider has been unreachable for longer than the issuer's
    /// `unknown_kid_max_wait`: a token with an unknown kid is dead-lettered, not held.
    pub give_up: bool,
}

/// Where a remote key set lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A JWKS URL.
    Jwks(String),
    /// An OpenID Connect issuer URL whose discovery document names the `jwks_uri`.
    Discovery(String),
}

/// Settings of a remote key set.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    /// Where the keys are.
    pub location: Location,
    /// Periodic refresh interval.
    pub refresh: Duration,
    /// Least time between two fetches caused by unknown kids.
    pub min_refetch: Duration,
    /// HTTP timeout of one fetch.
    pub timeout: Duration,
    /// Whether `http://` URLs may be fetched (local tests only).
    pub allow_http: bool,
    /// How long into an outage a token with an unknown kid is held before it is dead-lettered.
    pub unknown_kid_max_wait: Duration,
    /// Shorter RSA keys in the set are skipped.
    pub min_rsa_bits: usize,
}

struct FetchState {
    last_attempt: Option<Instant>,
    last_ok: Option<Instant>,
    last_error: Option<String>,
    jwks_uri: Option<String>,
    body_digest: Option<Vec<u8>>,
    /// Since when fetches fail (the outage's start), if they do.
    failing_since: Option<Instant>,
    /// Failed fetches since start.
    errors: u64,
}

struct Remote {
    settings: RemoteSettings,
    client: reqwest::Client,
    /// Held for the whole fetch: this is what makes fetches single-flight.
    state: tokio::sync::Mutex<FetchState>,
    /// kids that the latest fetch did not have; bounded because attackers choose them.
    unknown_kids: moka::sync::Cache<String, ()>,
}

/// How fresh an issuer's remote keys are.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyHealth {
    /// The issuer's config name.
    pub issuer: String,
    /// Seconds since the last successful fetch; `None` if never fetched.
    pub age_secs: Option<u64>,
    /// The last fetch error, if the last fetch failed.
    pub last_error: Option<String>,
    /// Failed fetches since start.
    pub fetch_errors: u64,
}

/// All keys of one issuer.
pub struct IssuerKeys {
    issuer: String,
    allowed: Vec<Algorithm>,
    fixed: Vec<Arc<Key>>,
    remote: Option<Remote>,
    current: ArcSwap<KeySet>,
}

impl IssuerKeys {
    /// Keys from the config only, or with a remote set that is not fetched yet.
    pub fn new(issuer: &str, allowed: Vec<Algorithm>, fixed: Vec<Key>, remote: Option<RemoteSettings>) -> IssuerKeys {
        let fixed: Vec<Arc<Key>> = fixed.into_iter().map(Arc::new).collect();
        let remote = remote.map(|settings| Remote {
            client: reqwest::Client::builder()
                .timeout(settings.timeout)
                .redirect(reqwest::redirect::Policy::limited(3))
                .build()
                .expect("an HTTP client with default TLS settings builds"),
            unknown_kids: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(settings.min_refetch).build(),
            state: tokio::sync::Mutex::new(FetchState {
                last_attempt: None,
                last_ok: None,
                last_error: None,
                jwks_uri: None,
                failing_since: None,
                body_digest: None,
                errors: 0,
            }),
            settings,
        });
        let current = ArcSwap::from_pointee(KeySet::new(fixed.clone()));
        IssuerKeys { issuer: issuer.to_owned(), allowed, fixed, remote, current }
    }

    /// The key set in force now.
    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// The key set in force now, owned (to hold across an await).
    pub(crate) fn current_full(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// Whether keys come from a URL.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The periodic refresh interval, if keys come from a URL.
    pub fn refresh_interval(&self) -> Option<Duration> {
        self.remote.as_ref().map(|r| r.settings.refresh)
    }

    /// Fetches the remote set now (at start and periodically).
    pub async fn refresh(&self) -> Result<(), KeysUnavailable> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let mut state = remote.state.lock().await;
        self.fetch(remote, &mut state).await
    }

    /// Called when no key has `kid`; may fetch once (see the module doc). `Ok` means "look again";
    /// `Err` means the identity provider could not be asked, so the token cannot be decided yet.
    pub async fn on_unknown_kid(&self, kid: &str, seen_generation: u64) -> Result<(), KeysUnavailable> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if remote.unknown_kids.contains_key(kid) {
            return Ok(());
        }
        let mut state = remote.state.lock().await;
        if self.current.load().generation != seen_generation {
            return Ok(()); // another task fetched while we waited
        }
        let recent = state.last_attempt.is_some_and(|t| t.elapsed() < remote.settings.min_refetch);
        let give_up = |state: &FetchState, mut u: KeysUnavailable| {
            let outage = state.failing_since.map_or(Duration::ZERO, |t| t.elapsed());
            u.give_up = outage >= remote.settings.unknown_kid_max_wait;
            u.detail = format!("the key set could not be fetched for {}s: {}", outage.as_secs(), u.detail);
            u
        };
        if recent {
            if let Some(e) = &state.last_error {
                return Err(give_up(&state, self.unavailable(e.clone())));
            }
            remote.unknown_kids.insert(kid.to_owned(), ());
            return Ok(());
        }
        if let Err(u) = self.fetch(remote, &mut state).await {
            return Err(give_up(&state, u));
        }
        if !self.current.load().keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
            remote.unknown_kids.insert(kid.to_owned(), ());
        }
        Ok(())
    }

    /// The age of the remote set, for health reporting.
    pub async fn health(&self) -> Option<KeyHealth> {
        let remote = self.remote.as_ref()?;
        let state = remote.state.lock().await;
        Some(KeyHealth {
            issuer: self.issuer.clone(),
            age_secs: state.last_ok.map(|t| t.elapsed().as_secs()),
            last_error: state.last_error.clone(),
            fetch_errors: state.errors,
        })
    }

    fn unavailable(&self, detail: String) -> KeysUnavailable {
        KeysUnavailable { issuer: self.issuer.clone(), detail, give_up: false }
    }

    async fn fetch(&self, remote: &Remote, state: &mut FetchState) -> Result<(), KeysUnavailable> {
        state.last_attempt = Some(Instant::now());
        match self.download(remote, state).await {
            Ok(()) => {
                state.last_ok = Some(Instant::now());
                state.last_error = None;
                state.failing_since = None;
                Ok(())
            }
            Err(e) => {
                state.failing_since.get_or_insert_with(Instant::now);
                tracing::warn!(issuer = %self.issuer, error = %e, "JWKS fetch failed; keeping the last good key set");
                state.errors += 1;
                state.last_error = Some(e.clone());
                state.jwks_uri = None; // rediscover next time
                Err(self.unavailable(e))
            }
        }
    }

    async fn download(&self, remote: &Remote, state: &mut FetchState) -> Result<(), String> {
        let uri = match (&remote.settings.location, &state.jwks_uri) {
            (Location::Jwks(u), _) => u.clone(),
            (Location::Discovery(_), Some(u)) => u.clone(),
            (Location::Discovery(base), None) => {
                let url = discovery_url(base);
                let doc: serde_json::Value = serde_json::from_slice(&get(&remote.client, &url).await?)
                    .map_err(|e| format!("discovery document is not JSON: {e}"))?;
                let uri = doc["jwks_uri"].as_str().ok_or("discovery document has no jwks_uri")?.to_owned();
                if !(uri.starts_with("https://") || (remote.settings.allow_http && uri.starts_with("http://"))) {
                    return Err(format!("discovered jwks_uri {} is not https://", crate::verify::jwt::shorten(&uri)));
                }
                state.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let body = get(&remote.client, &uri).await?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body).as_ref().to_vec();
        if state.body_digest.as_ref() == Some(&digest) {
            return Ok(()); // unchanged: keep the generation so cached verifications stay valid
        }
        let (fetched, skipped) = keys::jwks(&body, &self.allowed, false, remote.settings.min_rsa_bits)?;
        if fetched.is_empty() {
            return Err(format!("JWKS at {uri} has no usable signing key ({} skipped)", skipped.len()));
        }
        for s in &skipped {
            tracing::debug!(issuer = %self.issuer, skipped = %s, "JWKS key skipped");
        }
        let mut all = self.fixed.clone();
        all.extend(fetched.into_iter().map(Arc::new));
        tracing::info!(issuer = %self.issuer, keys = all.len(), "key set updated");
        self.current.store(Arc::new(KeySet::new(all)));
        state.body_digest = Some(digest);
        Ok(())
    }
}

fn discovery_url(base: &str) -> String {
    const WELL_KNOWN: &str = "/.well-known/openid-configuration";
    if base.ends_with(WELL_KNOWN) { base.to_owned() } else { format!("{}{WELL_KNOWN}", base.trim_end_matches('/')) }
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut resp = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("GET {url}: body larger than {MAX_JWKS_BYTES} bytes"));
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_url_appends_well_known_once() {
        assert_eq!(discovery_url("https://idp/realms/a/"), "https://idp/realms/a/.well-known/openid-configuration");
        assert_eq!(
            discovery_url("https://idp/.well-known/openid-configuration"),
            "https://idp/.well-known/openid-configuration"
        );
    }
}
