//! The library side of the token tools: mint, inspect and verify a token. (The revocation
//! tools are [`crate::revocation::edit`].)

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
                "kid": v.kid.as_deref(),
                "alg": format!("{:?}", v.alg),
                "sub": v.sub,
                "fingerprint": v.fingerprint.to_string(),
                "expires_in_secs": v.times.exp.map(|e| e.saturating_sub(now)),
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

/// How `token fetch` authenticates the client at the token endpoint.
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the client id and secret.
    SecretBasic(String),
    /// `client_secret_post`: the id and secret in the form body.
    SecretPost(String),
    /// `private_key_jwt` (RFC 7523): a short JWT signed with the client's private key.
    PrivateKeyJwt {
        /// The signing key.
        key: EncodingKey,
        /// Its algorithm (RS*, PS*, ES*, EdDSA).
        alg: Algorithm,
        /// Its `kid`, if the server needs one.
        kid: Option<String>,
    },
}

/// An OAuth 2.0 client-credentials request (`tokengate token fetch`).
pub struct Fetch {
    /// The token endpoint.
    pub token_url: String,
    /// The client id.
    pub client_id: String,
    /// How the client authenticates.
    pub auth: ClientAuth,
    /// Scopes asked for (space-joined).
    pub scopes: Vec<String>,
    /// `audience` parameter (Auth0 and others), if any.
    pub audience: Option<String>,
}

impl Fetch {
    /// A key for the cache: the same request, the same cached token.
    pub fn cache_key(&self) -> String {
        let id = format!("{}\n{}\n{}\n{:?}", self.token_url, self.client_id, self.scopes.join(" "), self.audience);
        verify::sha256_hex(id.as_bytes())
    }

    /// Asks the token endpoint for a token: returns it and its lifetime in seconds (`expires_in`).
    pub async fn request(&self, now: i64) -> anyhow::Result<(String, Option<i64>)> {
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if !self.scopes.is_empty() {
            form.push(("scope", self.scopes.join(" ")));
        }
        if let Some(a) = &self.audience {
            form.push(("audience", a.clone()));
        }
        let mut req = reqwest::Client::new().post(&self.token_url).timeout(std::time::Duration::from_secs(30));
        match &self.auth {
            ClientAuth::SecretBasic(secret) => {
                // RFC 6749 2.3.1: id and secret are form-urlencoded before Basic encoding.
                let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                req = req.basic_auth(enc(&self.client_id), Some(enc(secret)));
            }
            ClientAuth::SecretPost(secret) => {
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_secret", secret.clone()));
            }
            ClientAuth::PrivateKeyJwt { key, alg, kid } => {
                let mut header = jsonwebtoken::Header::new(*alg);
                header.kid = kid.clone();
                let claims = json!({
                    "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                    "iat": now, "exp": now + 60, "jti": format!("{:032x}", rand::random::<u128>()),
                });
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into()));
                form.push(("client_assertion", jsonwebtoken::encode(&header, &claims, key)?));
            }
        }
        let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish();
        let resp = req
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {}", self.token_url))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            // The OAuth error fields only: never the request (it may hold the secret).
            let err = v["error"].as_str().unwrap_or("no OAuth error in the response");
            let desc =
                v["error_description"].as_str().map(|d| format!(": {}", verify::jwt::shorten(d))).unwrap_or_default();
            bail!("the token endpoint answered {status}: {err}{desc}");
        }
        let token = v["access_token"].as_str().context("the token endpoint's answer has no access_token")?;
        Ok((token.to_owned(), v["expires_in"].as_i64()))
    }
}

/// A token from `cache` while it has more than `min_remaining` seconds left, else a new one from
/// the endpoint, written back to `cache` (mode 0600). Returns the token and whether it was cached.
pub async fn fetch_cached(
    f: &Fetch,
    cache: Option<&Path>,
    min_remaining: i64,
    now: i64,
) -> anyhow::Result<(String, bool)> {
    let key = f.cache_key();
    if let Some(path) = cache
        && let Ok(text) = std::fs::read_to_string(path)
        && let Ok(v) = serde_json::from_str::<Value>(&text)
        && v["key"].as_str() == Some(key.as_str())
        && v["expires_at"].as_i64().is_some_and(|e| e - now > min_remaining)
        && let Some(t) = v["access_token"].as_str()
    {
        return Ok((t.to_owned(), true));
    }
    let (token, expires_in) = f.request(now).await?;
    // Without expires_in, the token's own exp (unverified: only for caching).
    let expires_at = expires_in.map(|e| now + e).or_else(|| {
        verify::jwt::decode_unverified(&token).ok().and_then(|(_, c)| c.get("exp").and_then(Value::as_i64))
    });
    if let (Some(path), Some(expires_at)) = (cache, expires_at) {
        let doc = json!({"key": key, "access_token": token, "expires_at": expires_at});
        write_private(path, doc.to_string().as_bytes())
            .with_context(|| format!("writing the cache {}", path.display()))?;
    }
    Ok((token, false))
}

/// Writes a file only its owner may read (a token, a cache of tokens).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut file = o.open(path)?;
    file.write_all(bytes)
}
