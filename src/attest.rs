//! Attestations: the gate signs what it verified, so that a consumer of a trusted topic can check
//! who verified a message, when, under which route, for which identity, and that the payload is
//! the one that was verified.
//!
//! An attestation is a compact JWS (a JWT) in a header of each accepted message, signed with the
//! gate's own key (EdDSA or ES256, `kid` in its header); the gate serves the public keys of all
//! its configured keys as a JWKS at `/.well-known/jwks.json`, so rotation is: add the new key,
//! make it `active`, remove the old one once its attestations have expired. Its claims:
//!
//! ```text
//! iss, iat, exp   the gate's issuer id, when it signed, when the attestation expires
//! route           the route that verified the message
//! identity        the verified claims after the route's mapping (keep, rename, add)
//! token           {iss, kid, fp}: the original issuer, its key, the token's fingerprint
//! src             the source message's stable id (`x-tokengate-message-id`)
//! msg             {key_sha256, payload_sha256}: hex SHA-256 of the message key (null without
//!                 one) and of the payload (of empty bytes without one)
//! ```

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};

use crate::envelope::Envelope;
use crate::verify::{ClaimPath, Verified, sha256_hex};

/// One of the gate's signing keys, parsed once.
pub struct SigningKey {
    /// Its `kid`.
    pub kid: String,
    /// EdDSA (Ed25519) or ES256.
    pub alg: Algorithm,
    pair: Pair,
    /// The base64url JWS header (`alg`, `kid`, `typ`), the same for every attestation.
    header_b64: String,
    /// Its public half as a JWK (with `kid`, `alg`, `use: sig`).
    pub jwk: Value,
}

/// A parsed private key: jsonwebtoken would parse the PEM again for every signature.
enum Pair {
    Ed25519(aws_lc_rs::signature::Ed25519KeyPair),
    P256(aws_lc_rs::signature::EcdsaKeyPair),
}

fn b64(b: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
}

impl SigningKey {
    /// A key from a PKCS#8 PEM private key of `alg` (EdDSA or ES256).
    pub fn from_pem(kid: &str, alg: Algorithm, pem_text: &[u8]) -> Result<SigningKey, String> {
        use aws_lc_rs::signature::KeyPair as _;
        let der = pem::parse(pem_text).map_err(|e| format!("not a PEM file: {e}"))?;
        if der.tag() != "PRIVATE KEY" {
            return Err(format!("a PKCS#8 private key (-----BEGIN PRIVATE KEY-----) is needed, not {:?}", der.tag()));
        }
        let (pair, mut jwk, name) = match alg {
            Algorithm::EdDSA => {
                let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.contents())
                    .map_err(|_| "not an Ed25519 private key".to_owned())?;
                let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())});
                (Pair::Ed25519(pair), jwk, "EdDSA")
            }
            Algorithm::ES256 => {
                let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                    &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der.contents(),
                )
                .map_err(|_| "not a P-256 private key".to_owned())?;
                let point = pair.public_key().as_ref(); // 0x04 || x || y
                let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])});
                (Pair::P256(pair), jwk, "ES256")
            }
            other => return Err(format!("attestations are signed with EdDSA or ES256, not {other:?}")),
        };
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!(name);
        jwk["use"] = json!("sig");
        let header = json!({"alg": name, "kid": kid, "typ": "tokengate-attestation+jwt"});
        Ok(SigningKey { kid: kid.to_owned(), alg, pair, header_b64: b64(header.to_string().as_bytes()), jwk })
    }

    /// The compact JWS of `claims` with this key's attestation header.
    fn sign(&self, claims: &Map<String, Value>) -> Result<String, String> {
        self.sign_with(&self.header_b64, claims)
    }

    /// A producer's proof of possession of this key for a message (`iat`, `jti`, and the key and
    /// payload digests), its public JWK in the header: see [`crate::verify::proof`].
    pub fn proof(&self, key: Option<&[u8]>, payload: &[u8], jti: &str, now: i64) -> Result<String, String> {
        let mut jwk = self.jwk.clone();
        if let Some(o) = jwk.as_object_mut() {
            o.remove("kid");
            o.remove("use");
        }
        let header = json!({"alg": jwk["alg"], "typ": "tokengate-proof+jwt", "jwk": jwk});
        let claims = json!({
            "iat": now,
            "jti": jti,
            "msg": {"key_sha256": key.map(sha256_hex), "payload_sha256": sha256_hex(payload)},
        });
        let Value::Object(claims) = claims else { unreachable!("a JSON object literal") };
        self.sign_with(&b64(header.to_string().as_bytes()), &claims)
    }

    fn sign_with(&self, header_b64: &str, claims: &Map<String, Value>) -> Result<String, String> {
        let claims = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut jws = format!("{header_b64}.{}", b64(&claims));
        let signature = match &self.pair {
            Pair::Ed25519(k) => k.sign(jws.as_bytes()).as_ref().to_vec(),
            Pair::P256(k) => k
                .sign(&aws_lc_rs::rand::SystemRandom::new(), jws.as_bytes())
                .map_err(|_| "P-256 signing failed".to_owned())?
                .as_ref()
                .to_vec(),
        };
        jws.push('.');
        jws.push_str(&b64(&signature));
        Ok(jws)
    }
}

/// The gate's attestation signer: its issuer id, lifetime and keys (one active).
pub struct Attester {
    /// The `iss` of every attestation.
    pub issuer: String,
    /// Seconds an attestation is valid.
    pub ttl_secs: i64,
    keys: Vec<SigningKey>,
    active: usize,
}

impl Attester {
    /// A signer with `keys`, signing with the one whose kid is `active`.
    pub fn new(issuer: String, ttl_secs: i64, keys: Vec<SigningKey>, active: &str) -> Result<Attester, String> {
        let active = keys.iter().position(|k| k.kid == active).ok_or_else(|| format!("no key with kid {active:?}"))?;
        Ok(Attester { issuer, ttl_secs, keys, active })
    }

    /// The public keys of every configured key, as a JWKS document.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }

    /// Signs `claims` (with `iss`, `iat` and `exp` added) with the active key.
    fn sign(&self, mut claims: Map<String, Value>, now: i64) -> Result<String, String> {
        claims.insert("iss".into(), json!(self.issuer));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + self.ttl_secs));
        self.keys[self.active].sign(&claims)
    }
}

/// A route's attestation: the signer, the header it goes in, and the identity mapping.
pub struct RouteAttestation {
    /// The signer (shared by every route).
    pub attester: Arc<Attester>,
    /// The header name.
    pub header: String,
    /// Verified claims carried as `identity`: (path, name in the attestation).
    pub keep: Vec<(ClaimPath, String)>,
    /// Fixed claims added to `identity`.
    pub add: Vec<(String, Value)>,
}

impl std::fmt::Debug for RouteAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteAttestation").field("header", &self.header).field("keep", &self.keep).finish()
    }
}

impl RouteAttestation {
    /// The attestation of `env` (whose [`Envelope::message_id`] is `src`), accepted on `route`
    /// with the verified token `v`, at `now`.
    pub fn attest(&self, route: &str, env: &Envelope, src: &str, v: &Verified, now: i64) -> Result<String, String> {
        let mut identity = Map::new();
        for (path, name) in &self.keep {
            if let Some(value) = v.claims.get(path) {
                identity.insert(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.add {
            identity.insert(name.clone(), value.clone());
        }
        let mut claims = Map::new();
        claims.insert("route".into(), json!(route));
        claims.insert("identity".into(), Value::Object(identity));
        claims
            .insert("token".into(), json!({"iss": &*v.iss, "kid": v.kid.as_deref(), "fp": v.fingerprint.to_string()}));
        claims.insert("src".into(), json!(src));
        claims.insert(
            "msg".into(),
            json!({
                "key_sha256": env.key.as_deref().map(sha256_hex),
                "payload_sha256": sha256_hex(env.payload.as_deref().unwrap_or_default()),
            }),
        );
        self.attester.sign(claims, now)
    }
}

/// Checks an attestation against `jwks` and the message it came with: signature (EdDSA or ES256
/// by `kid`), expiry, and the key and payload digests. Returns its claims.
pub fn check(attestation: &str, jwks: &Value, key: Option<&[u8]>, payload: &[u8], now: i64) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(attestation).map_err(|e| format!("not a JWS: {e}"))?;
    if !matches!(header.alg, Algorithm::EdDSA | Algorithm::ES256) {
        return Err(format!("attestations are EdDSA or ES256, not {:?}", header.alg));
    }
    let kid = header.kid.ok_or("no kid in the attestation's header")?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).map_err(|e| format!("bad JWKS: {e}"))?;
    let jwk = set.find(&kid).ok_or_else(|| format!("no key {kid:?} in the JWKS"))?;
    let decoding = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| format!("bad JWK {kid:?}: {e}"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.validate_aud = false;
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(attestation, &decoding, &validation)
        .map_err(|e| format!("invalid attestation: {e}"))?
        .claims;
    if claims["exp"].as_i64().is_none_or(|exp| exp < now) {
        return Err("the attestation has expired".into());
    }
    let want_key = key.map(sha256_hex);
    if claims["msg"]["key_sha256"].as_str() != want_key.as_deref() {
        return Err("the message key is not the attested one".into());
    }
    if claims["msg"]["payload_sha256"].as_str() != Some(sha256_hex(payload).as_str()) {
        return Err("the payload is not the attested one".into());
    }
    Ok(claims)
}
