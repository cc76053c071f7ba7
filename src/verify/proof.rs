//! Tokens bound to the message they came with (proof of possession), so that a token copied from
//! the untrusted topic onto another message does not pass.
//!
//! Two modes, per route:
//! - `jkt` (as OAuth 2.0 DPoP-bound tokens): the access token carries `cnf.jkt`, the RFC 7638
//!   SHA-256 thumbprint of the producer's key (RFC 7800). Each message carries a proof header: a
//!   JWS signed with that key, its public JWK in the JWS header (`jwk`), with claims `iat`, `jti`
//!   and `msg: {key_sha256, payload_sha256}` (hex SHA-256 of the message key, `null` without one,
//!   and of the payload). The gate checks the thumbprint, the signature, the digests and that
//!   `iat` is within `max_age`.
//! - `digest_claim`: for producers that mint their own short tokens, the token itself carries the
//!   hex SHA-256 of the payload in a claim.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use super::{ClaimPath, Reason, Rejection, Verified, sha256_hex};

/// How a route binds tokens to messages.
#[derive(Debug, Clone)]
pub enum ProofSpec {
    /// A proof header signed by the key whose thumbprint is the token's `cnf.jkt`.
    Jkt {
        /// The proof header's name (case-insensitive).
        header: String,
        /// How old a proof's `iat` may be (and how far in the future, at most 60 s).
        max_age: Duration,
        /// Largest proof header, in bytes.
        max_bytes: usize,
    },
    /// The token's claim at this path holds the payload's hex SHA-256.
    DigestClaim(ClaimPath),
}

/// The claim path of the key thumbprint in a bound token.
pub fn cnf_jkt() -> ClaimPath {
    ClaimPath("cnf.jkt".into())
}

/// The RFC 7638 thumbprint (base64url SHA-256 of the required members in lexicographic order) of
/// a public JWK; `None` for a key type tokengate does not take.
pub fn thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    let canonical = match s("kty")? {
        "EC" => json!({"crv": s("crv")?, "kty": "EC", "x": s("x")?, "y": s("y")?}),
        "OKP" => json!({"crv": s("crv")?, "kty": "OKP", "x": s("x")?}),
        "RSA" => json!({"e": s("e")?, "kty": "RSA", "n": s("n")?}),
        _ => return None,
    };
    // serde_json writes object keys in order (BTreeMap) with no whitespace: RFC 7638's form.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.to_string().as_bytes());
    Some(base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, digest.as_ref()))
}

fn invalid(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::ProofInvalid, detail)
}

impl ProofSpec {
    /// Checks that the message (`proof` header values, `key`, `payload`) is bound to the verified
    /// token `v` at unix time `now`.
    pub fn check<'h>(
        &self,
        mut proofs: impl Iterator<Item = &'h [u8]>,
        key: Option<&[u8]>,
        payload: &[u8],
        v: &Verified,
        now: i64,
    ) -> Result<(), Rejection> {
        match self {
            ProofSpec::DigestClaim(path) => {
                let Some(Value::String(want)) = v.claims.get(path) else {
                    return Err(Rejection::new(Reason::ProofMissing, format!("the token has no {} claim", path.0)));
                };
                if !want.eq_ignore_ascii_case(&sha256_hex(payload)) {
                    return Err(Rejection::new(Reason::PayloadMismatch, "the payload is not the one the token names"));
                }
                Ok(())
            }
            ProofSpec::Jkt { header, max_age, max_bytes } => {
                let Some(proof) = proofs.next() else {
                    return Err(Rejection::new(Reason::ProofMissing, format!("no {header} header")));
                };
                if proofs.next().is_some() {
                    return Err(invalid(format!("more than one {header} header")));
                }
                if proof.len() > *max_bytes {
                    return Err(invalid(format!("the proof is over {max_bytes} bytes")));
                }
                let proof = std::str::from_utf8(proof).map_err(|_| invalid("the proof is not UTF-8"))?.trim();
                let Some(Value::String(jkt)) = v.claims.get(&cnf_jkt()) else {
                    return Err(invalid("the token is not bound to a key (no cnf.jkt claim)"));
                };
                let claims = verify_proof(proof, jkt)?;
                let iat = claims.get("iat").and_then(Value::as_i64).ok_or_else(|| invalid("the proof has no iat"))?;
                if iat < now - max_age.as_secs() as i64 || iat > now + 60 {
                    return Err(invalid(format!(
                        "the proof's iat is {}s from now (allowed: {}s)",
                        iat - now,
                        max_age.as_secs()
                    )));
                }
                if claims.get("jti").and_then(Value::as_str).is_none_or(str::is_empty) {
                    return Err(invalid("the proof has no jti"));
                }
                let msg = &claims["msg"];
                if msg["payload_sha256"].as_str() != Some(sha256_hex(payload).as_str()) {
                    return Err(Rejection::new(Reason::PayloadMismatch, "the payload is not the one the proof signs"));
                }
                if msg["key_sha256"].as_str() != key.map(sha256_hex).as_deref() {
                    return Err(Rejection::new(
                        Reason::PayloadMismatch,
                        "the message key is not the one the proof signs",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Verifies a proof JWS with the public JWK in its header, which must have thumbprint `jkt`.
/// Parsed and verified here with aws-lc-rs (ES256, EdDSA; RSA through jsonwebtoken): the proof's
/// key changes with every producer, so there is nothing to keep parsed.
fn verify_proof(proof: &str, jkt: &str) -> Result<serde_json::Map<String, Value>, Rejection> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = proof.split('.');
    let (Some(h), Some(c), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("not a compact JWS"));
    };
    let json = |part: &str, what: &str| -> Result<serde_json::Map<String, Value>, Rejection> {
        let bytes = b64.decode(part).map_err(|_| invalid(format!("the proof's {what} is not base64url")))?;
        serde_json::from_slice(&bytes).map_err(|_| invalid(format!("the proof's {what} is not a JSON object")))
    };
    let header = json(h, "header")?;
    let jwk = header.get("jwk").ok_or_else(|| invalid("the proof's header has no jwk"))?;
    if jwk.get("d").is_some() {
        return Err(invalid("the proof's jwk holds a private key"));
    }
    if thumbprint(jwk).as_deref() != Some(jkt) {
        return Err(invalid("the proof's key is not the one the token is bound to (cnf.jkt)"));
    }
    let coord = |k: &str| jwk.get(k).and_then(Value::as_str).and_then(|v| b64.decode(v).ok());
    let signature = b64.decode(sig).map_err(|_| invalid("the proof's signature is not base64url"))?;
    let signing_input = &proof.as_bytes()[..h.len() + 1 + c.len()];
    let (alg, key) = match (header.get("alg").and_then(Value::as_str), jwk.get("kty").and_then(Value::as_str)) {
        (Some("ES256"), Some("EC")) if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => {
            let (Some(x), Some(y)) = (coord("x"), coord("y")) else { return Err(invalid("bad P-256 jwk")) };
            let mut point = vec![4u8];
            point.extend(x);
            point.extend(y);
            (&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED as &dyn aws_lc_rs::signature::VerificationAlgorithm, point)
        }
        (Some("EdDSA"), Some("OKP")) if jwk.get("crv").and_then(Value::as_str) == Some("Ed25519") => {
            let Some(x) = coord("x") else { return Err(invalid("bad Ed25519 jwk")) };
            (&aws_lc_rs::signature::ED25519 as &dyn aws_lc_rs::signature::VerificationAlgorithm, x)
        }
        (Some(alg @ ("RS256" | "PS256")), Some("RSA")) => return verify_rsa(proof, alg, jwk),
        (alg, kty) => {
            return Err(invalid(format!(
                "proof alg {alg:?} with key type {kty:?} (ES256/P-256, EdDSA/Ed25519, RS256 or PS256/RSA)"
            )));
        }
    };
    aws_lc_rs::signature::UnparsedPublicKey::new(alg, key)
        .verify(signing_input, &signature)
        .map_err(|_| invalid("the proof's signature does not verify"))?;
    json(c, "claims")
}

/// An RSA proof, through jsonwebtoken (2048-bit keys at least, as for tokens).
fn verify_rsa(proof: &str, alg: &str, jwk: &Value) -> Result<serde_json::Map<String, Value>, Rejection> {
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(jwk.clone()).map_err(|e| invalid(format!("bad jwk: {e}")))?;
    let n_bits = match &jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::RSA(r) => {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&r.n).map_or(0, |n| n.len() * 8)
        }
        _ => 0,
    };
    if n_bits < 2048 {
        return Err(invalid("RSA proof keys must be at least 2048 bits"));
    }
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| invalid(format!("bad jwk: {e}")))?;
    let alg = if alg == "RS256" { Algorithm::RS256 } else { Algorithm::PS256 };
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<serde_json::Map<String, Value>>(proof, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| invalid(format!("the proof does not verify: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 7638, section 3.1.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(thumbprint(&jwk).as_deref(), Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"));
        assert_eq!(thumbprint(&json!({"kty": "oct", "k": "x"})), None);
    }
}
