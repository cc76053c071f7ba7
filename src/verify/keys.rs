//! Verification keys: each one pinned to the algorithms it may verify, grouped in key sets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;

/// The shape of a key, which decides which algorithms can ever be used with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A shared secret (HS256/384/512).
    Hmac,
    /// An RSA public key (RS* and PS*).
    Rsa,
    /// An EC P-256 public key (ES256).
    P256,
    /// An EC P-384 public key (ES384).
    P384,
    /// An Ed25519 public key (EdDSA).
    Ed25519,
}

impl KeyKind {
    /// Whether `alg` is defined for this kind of key: the guard against key confusion.
    pub fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Hmac => alg.family() == AlgorithmFamily::Hmac,
            KeyKind::Rsa => alg.family() == AlgorithmFamily::Rsa,
            KeyKind::P256 => alg == Algorithm::ES256,
            KeyKind::P384 => alg == Algorithm::ES384,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// One verification key.
pub struct Key {
    /// The key id tokens name in their `kid` header, if the key has one (shared with every
    /// token it verifies).
    pub kid: Option<Arc<str>>,
    /// What kind of key material this is.
    pub kind: KeyKind,
    /// The algorithms this key may verify: never empty, each one fits `kind`.
    pub algorithms: Vec<Algorithm>,
    /// The key material.
    pub material: DecodingKey,
    /// The key made ready once for each pinned algorithm: verifying through `DecodingKey` parses
    /// a public key again on every token (for RSA, its Montgomery context too), and hashes an
    /// HMAC secret into its inner and outer keys again, per new token.
    parsed: Vec<(Algorithm, Ready)>,
}

/// A key ready to verify one algorithm.
enum Ready {
    Public(aws_lc_rs::signature::ParsedPublicKey),
    Hmac(Box<aws_lc_rs::hmac::Key>),
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

impl Key {
    /// Builds a key pinned to `allowed` (intersected with what fits its kind). `public` is the
    /// public key as aws-lc-rs reads it (PKCS#1 or SPKI DER for RSA, the point for EC, the 32
    /// bytes for Ed25519); `None` for secrets.
    pub fn new(
        kid: Option<String>,
        kind: KeyKind,
        material: DecodingKey,
        public: Option<&[u8]>,
        allowed: &[Algorithm],
    ) -> Result<Key, String> {
        let algorithms: Vec<Algorithm> = allowed.iter().copied().filter(|a| kind.fits(*a)).collect();
        if algorithms.is_empty() {
            return Err(format!("a {kind:?} key cannot verify any of {allowed:?}"));
        }
        let mut parsed = Vec::new();
        for alg in &algorithms {
            if let (Some(bytes), Some(params)) = (public, verification_params(*alg)) {
                let key = aws_lc_rs::signature::ParsedPublicKey::new(params, bytes)
                    .map_err(|e| format!("bad {kind:?} key: {e}"))?;
                parsed.push((*alg, Ready::Public(key)));
            }
            if let (KeyKind::Hmac, Some(hash), Ok(secret)) = (kind, hmac_params(*alg), material.try_get_as_bytes()) {
                parsed.push((*alg, Ready::Hmac(Box::new(aws_lc_rs::hmac::Key::new(hash, secret)))));
            }
        }
        Ok(Key { kid: kid.map(Arc::from), kind, algorithms, material, parsed })
    }

    /// Checks `signature` (base64url) over `message` with `alg`, which must be pinned to this key.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &str) -> bool {
        use base64::Engine as _;
        if !self.algorithms.contains(&alg) {
            return false;
        }
        match self.parsed.iter().find(|(a, _)| *a == alg) {
            Some((_, key)) => {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature).is_ok_and(|sig| match key {
                    Ready::Public(k) => k.verify_sig(message, &sig).is_ok(),
                    // Constant-time against the whole tag, as jsonwebtoken compares it.
                    Ready::Hmac(k) => aws_lc_rs::hmac::verify(k, message, &sig).is_ok(),
                })
            }
            None => jsonwebtoken::crypto::verify(signature, message, &self.material, alg).unwrap_or(false),
        }
    }
}

/// The aws-lc-rs verification of an asymmetric JWS algorithm, as `jsonwebtoken` maps it (RSA of
/// 2048 to 8192 bits, fixed-size ECDSA signatures); `None` for HMAC.
fn verification_params(alg: Algorithm) -> Option<&'static dyn aws_lc_rs::signature::VerificationAlgorithm> {
    use aws_lc_rs::signature as s;
    Some(match alg {
        Algorithm::RS256 => &s::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &s::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &s::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &s::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &s::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &s::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &s::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &s::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &s::ED25519,
        _ => return None,
    })
}

/// The HMAC of an HS* algorithm.
fn hmac_params(alg: Algorithm) -> Option<aws_lc_rs::hmac::Algorithm> {
    Some(match alg {
        Algorithm::HS256 => aws_lc_rs::hmac::HMAC_SHA256,
        Algorithm::HS384 => aws_lc_rs::hmac::HMAC_SHA384,
        Algorithm::HS512 => aws_lc_rs::hmac::HMAC_SHA512,
        _ => return None,
    })
}

/// A DER `RSAPublicKey` (RFC 8017: a sequence of the modulus and the exponent) from their
/// big-endian bytes, for RSA keys that come as JWK components.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn len(out: &mut Vec<u8>, n: usize) {
        match n {
            0..=0x7f => out.push(n as u8),
            0x80..=0xff => out.extend([0x81, n as u8]),
            _ => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
    }
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let v = &v[v.iter().take_while(|b| **b == 0).count().min(v.len().saturating_sub(1))..];
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push(0x02);
        len(out, v.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    integer(&mut body, n);
    integer(&mut body, e);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(0x30);
    len(&mut out, body.len());
    out.extend(body);
    out
}

/// Loads an HMAC secret.
pub fn hmac(kid: Option<String>, secret: &[u8], allowed: &[Algorithm]) -> Result<Key, String> {
    // RFC 7518 3.2: a key shorter than the hash output weakens HS256 to a guessable secret.
    if secret.len() < 32 {
        return Err(format!("HMAC secret is {} bytes; at least 32 are required", secret.len()));
    }
    Key::new(kid, KeyKind::Hmac, DecodingKey::from_secret(secret), None, allowed)
}

/// The shortest RSA modulus accepted by default (an issuer's `min_rsa_bits` may raise it, never
/// lower it): NIST SP 800-131A disallows shorter keys for signatures, and 1024-bit moduli are
/// within reach of a well-funded attacker.
pub const MIN_RSA_BITS: usize = 2048;

/// Refuses an RSA modulus (big-endian bytes) shorter than `min_bits`.
fn check_rsa_modulus(n: &[u8], min_bits: usize) -> Result<(), String> {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    let bits = n.first().map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
    if bits < min_bits {
        return Err(format!("RSA key of {bits} bits; at least {min_bits} are required"));
    }
    Ok(())
}

/// The modulus of a PKCS#1 `RSAPublicKey` (DER: SEQUENCE { INTEGER n, INTEGER e }).
fn pkcs1_modulus(der: &[u8]) -> Option<&[u8]> {
    fn header(b: &[u8], tag: u8) -> Option<(usize, &[u8])> {
        let (&t, rest) = b.split_first()?;
        if t != tag {
            return None;
        }
        let (&l, rest) = rest.split_first()?;
        if l < 0x80 {
            return Some((usize::from(l), rest));
        }
        let n = usize::from(l & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
        Some((len, &rest[n..]))
    }
    let (_, body) = header(der, 0x30)?;
    let (len, rest) = header(body, 0x02)?;
    rest.get(..len)
}

/// Loads a PEM public key (RSA of at least `min_rsa_bits`, EC P-256/P-384 or Ed25519), pinned
/// to `allowed`.
pub fn pem(kid: Option<String>, pem: &[u8], allowed: &[Algorithm], min_rsa_bits: usize) -> Result<Key, String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        let der = k.try_get_as_bytes().map_err(|e| format!("bad RSA key: {e}"))?;
        check_rsa_modulus(pkcs1_modulus(der).ok_or("bad RSA key: no modulus")?, min_rsa_bits)?;
        let der = der.to_vec();
        return Key::new(kid, KeyKind::Rsa, k, Some(&der), allowed);
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        // An uncompressed point is 0x04 || x || y: 65 bytes on P-256, 97 on P-384.
        let kind = match k.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => KeyKind::P256,
            Ok(97) => KeyKind::P384,
            _ => return Err("unsupported EC curve (P-256 and P-384 are)".into()),
        };
        let point = k.try_get_as_bytes().map_err(|e| format!("bad EC key: {e}"))?.to_vec();
        return Key::new(kid, kind, k, Some(&point), allowed);
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        let raw = k.try_get_as_bytes().map_err(|e| format!("bad Ed25519 key: {e}"))?.to_vec();
        return Key::new(kid, KeyKind::Ed25519, k, Some(&raw), allowed);
    }
    Err("not a PEM public key (RSA, EC or Ed25519)".into())
}

/// Parses a JWKS document. Keys that cannot be used are skipped and reported, never fatal,
/// because identity providers publish encryption keys and new key types beside signing keys.
/// `allow_secrets` admits `oct` keys (only from files the operator controls); RSA keys shorter
/// than `min_rsa_bits` are skipped.
pub fn jwks(
    doc: &[u8],
    allowed: &[Algorithm],
    allow_secrets: bool,
    min_rsa_bits: usize,
) -> Result<(Vec<Key>, Vec<String>), String> {
    let doc: Value = serde_json::from_slice(doc).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let Some(items) = doc.get("keys").and_then(Value::as_array) else {
        return Err("JWKS has no keys array".into());
    };
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match jwk(item, allowed, allow_secrets, min_rsa_bits) {
            Ok(k) => keys.push(k),
            Err(e) => skipped.push(format!("key {i}: {e}")),
        }
    }
    Ok((keys, skipped))
}

fn jwk(item: &Value, allowed: &[Algorithm], allow_secrets: bool, min_rsa_bits: usize) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(item.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("use is enc".into());
    }
    // A key whose operations are listed but do not include verify is not a verification key.
    if let Some(ops) = &jwk.common.key_operations
        && !ops.iter().any(|o| matches!(o, jsonwebtoken::jwk::KeyOperations::Verify))
    {
        return Err("key_ops lacks verify".into());
    }
    let mut rsa_der = None;
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            use base64::Engine as _;
            let b64 = |v: &str, what: &str| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(v.trim_end_matches('='))
                    .map_err(|e| format!("bad RSA {what}: {e}"))
            };
            let n = b64(&p.n, "modulus")?;
            check_rsa_modulus(&n, min_rsa_bits)?;
            rsa_der = Some(rsa_public_key_der(&n, &b64(&p.e, "exponent")?));
            KeyKind::Rsa
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::P256,
            EllipticCurve::P384 => KeyKind::P384,
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => KeyKind::Ed25519,
        AlgorithmParameters::OctetKey(_) if allow_secrets => KeyKind::Hmac,
        AlgorithmParameters::OctetKey(_) => {
            return Err("oct (secret) keys are not taken from URLs".into());
        }
        _ => return Err("unsupported key type".into()),
    };
    // A JWK's own alg pins it further; without one, the issuer's allowlist applies.
    let pinned: Vec<Algorithm> = match jwk.common.key_algorithm {
        Some(a) => {
            let a: Algorithm = a.to_string().parse().map_err(|_| format!("unsupported alg {a}"))?;
            allowed.iter().copied().filter(|x| *x == a).collect()
        }
        None => allowed.to_vec(),
    };
    let material = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
    if kind == KeyKind::Hmac && material.try_get_as_bytes().map_or(0, <[u8]>::len) < 32 {
        return Err("oct key shorter than 32 bytes".into());
    }
    let public = match kind {
        KeyKind::Hmac => None,
        KeyKind::Rsa => rsa_der,
        _ => Some(material.try_get_as_bytes().map_err(|e| format!("bad key material: {e}"))?.to_vec()),
    };
    Key::new(jwk.common.key_id.clone(), kind, material, public.as_deref(), &pinned)
}

/// Source of key set generations: a new number whenever any key set changes, so that a cached
/// verification made under an older set is never reused.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// An immutable set of keys, swapped whole when it changes.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Changes whenever the keys change.
    pub generation: u64,
    /// The keys.
    pub keys: Vec<Arc<Key>>,
}

/// What a key lookup found.
pub enum Lookup<'a> {
    /// Keys to try, in order.
    Found(Vec<&'a Key>),
    /// Keys with that kid exist but none is pinned to the token's alg.
    AlgNotPinned,
    /// No key has that kid (or, without a kid, none takes the alg).
    NoKey,
}

impl KeySet {
    /// A set with a fresh generation number.
    pub fn new(keys: Vec<Arc<Key>>) -> KeySet {
        KeySet { generation: GENERATION.fetch_add(1, Ordering::Relaxed), keys }
    }

    /// Finds the keys that may verify a token with this `kid` and `alg`.
    pub fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        let mut named = false;
        let mut found = Vec::new();
        for k in &self.keys {
            if let Some(kid) = kid {
                if k.kid.as_deref() != Some(kid) {
                    continue;
                }
                named = true;
            }
            if k.algorithms.contains(&alg) {
                found.push(k.as_ref());
            }
        }
        match (found.is_empty(), named) {
            (false, _) => Lookup::Found(found),
            (true, true) => Lookup::AlgNotPinned,
            (true, false) => Lookup::NoKey,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_kinds_only_fit_their_own_algorithms() {
        use Algorithm::*;
        let table = [
            (KeyKind::Hmac, vec![HS256, HS384, HS512]),
            (KeyKind::Rsa, vec![RS256, RS384, RS512, PS256, PS384, PS512]),
            (KeyKind::P256, vec![ES256]),
            (KeyKind::P384, vec![ES384]),
            (KeyKind::Ed25519, vec![EdDSA]),
        ];
        let all = [HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA];
        for (kind, fits) in table {
            for alg in all {
                assert_eq!(kind.fits(alg), fits.contains(&alg), "{kind:?} {alg:?}");
            }
        }
    }

    #[test]
    fn short_hmac_secrets_are_refused() {
        assert!(hmac(None, b"short", &[Algorithm::HS256]).is_err());
        assert!(hmac(None, &[7; 32], &[Algorithm::RS256]).is_err());
        assert!(hmac(None, &[7; 32], &[Algorithm::HS256]).is_ok());
    }

    #[test]
    fn jwks_skips_unusable_keys_and_pins_algs() {
        let doc = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI","kid":"s"},
            {"kty":"EC","crv":"P-256","use":"enc","kid":"e","x":"AA","y":"AA"},
            {"kty":"XYZ","kid":"x"}
        ]}"#;
        let (keys, skipped) = jwks(doc, &[Algorithm::HS256], false, MIN_RSA_BITS).unwrap();
        assert!(keys.is_empty());
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        let (keys, _) = jwks(doc, &[Algorithm::HS256], true, MIN_RSA_BITS).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(jwks(b"{}", &[Algorithm::HS256], true, MIN_RSA_BITS).is_err());
        assert!(jwks(b"nope", &[Algorithm::HS256], true, MIN_RSA_BITS).is_err());
    }

    #[test]
    fn short_rsa_keys_and_keys_not_for_verifying_are_refused() {
        let short = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/rsa1024.pub.pem")).unwrap();
        let err = pem(None, &short, &[Algorithm::RS256], MIN_RSA_BITS).unwrap_err();
        assert_eq!(err, "RSA key of 1024 bits; at least 2048 are required");
        let good = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/rsa.pub.pem")).unwrap();
        assert!(pem(None, &good, &[Algorithm::RS256], MIN_RSA_BITS).is_ok());
        let raised = pem(None, &good, &[Algorithm::RS256], 4096).unwrap_err();
        assert!(raised.ends_with("at least 4096 are required"), "an issuer may raise the floor: {raised}");
        let doc = br#"{"keys":[
            {"kty":"RSA","kid":"short","n":"pk6Vr8fCirojBC62_2pO7-Vlap-1bUeoV5zcKcTO3VD0iNM6hqQlNOvSiZ5ETUu3z2Hss8u3VpWogMNLiongpiGaql_ri24-KcM1OwIKfSKoUlKzL4iaAOdbduKN2p0N3tePShmqQx8Q7dxsbh9bPM04YHYLASvwgF_UmmQwaGU","e":"AQAB"},
            {"kty":"oct","kid":"enc-only","key_ops":["encrypt"],"k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI"},
            {"kty":"oct","kid":"verify","key_ops":["verify"],"k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI"}
        ]}"#;
        let (keys, skipped) = jwks(doc, &[Algorithm::RS256, Algorithm::HS256], true, MIN_RSA_BITS).unwrap();
        assert_eq!(keys.iter().map(|k| k.kid.as_deref()).collect::<Vec<_>>(), vec![Some("verify")]);
        assert_eq!(
            skipped,
            vec!["key 0: RSA key of 1024 bits; at least 2048 are required", "key 1: key_ops lacks verify"]
        );
    }

    #[test]
    fn rsa_components_encode_to_the_same_der_as_the_pem() {
        let pem = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/rsa.pub.pem")).unwrap();
        let k = DecodingKey::from_rsa_pem(&pem).unwrap();
        let der = k.try_get_as_bytes().unwrap();
        let n = pkcs1_modulus(der).unwrap();
        // 65537, as written in the key and as a JWK writes it ("AQAB").
        assert_eq!(rsa_public_key_der(n, &[1, 0, 1]), der);
        assert_eq!(rsa_public_key_der(&[0, 0, 0x7f], &[3]), vec![0x30, 6, 2, 1, 0x7f, 2, 1, 3]);
        assert_eq!(rsa_public_key_der(&[0x80], &[3]), vec![0x30, 7, 2, 2, 0, 0x80, 2, 1, 3]);
    }
}
