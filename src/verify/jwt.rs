//! Strict parsing of a compact JWS (`header.payload.signature`) before any key is touched.
//!
//! Everything here is pure: it reads untrusted bytes and either returns the parts the verifier
//! needs or a [`Rejection`]. Nothing in the header is ever used to *find* a key except `kid`
//! (`jku`, `x5u`, `jwk`, `x5c` are ignored on purpose).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{Reason, Rejection};

/// Longest `kid` we look up; real ones are UUIDs or thumbprints, far shorter.
const MAX_KID_BYTES: usize = 256;

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Parsed<'t> {
    /// `base64url(header) "." base64url(payload)`: what the signature covers.
    pub signing_input: &'t str,
    /// The third segment, still base64url.
    pub signature: &'t str,
    /// The header's `alg`, already known not to be `none`.
    pub alg: Algorithm,
    /// The header's `kid`, if any.
    pub kid: Option<String>,
    /// The header's `typ`, if any.
    pub typ: Option<String>,
    /// The decoded claims object.
    pub claims: Map<String, Value>,
}

/// The registered claims, type-checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StdClaims {
    /// `iss`.
    pub iss: Option<String>,
    /// `sub`.
    pub sub: Option<String>,
    /// `aud`, a string or an array of strings.
    pub aud: Vec<String>,
    /// `exp`, `nbf` and `iat`.
    pub times: Times,
    /// `jti`.
    pub jti: Option<String>,
}

/// The time claims, checked on every use of a token.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Times {
    /// `exp`, seconds since the epoch.
    pub exp: Option<i64>,
    /// `nbf`, seconds since the epoch.
    pub nbf: Option<i64>,
    /// `iat`, seconds since the epoch.
    pub iat: Option<i64>,
}

fn malformed(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::Malformed, detail)
}

/// Splits, decodes and checks the header and claims of a compact JWS.
pub fn parse(token: &str) -> Result<Parsed<'_>, Rejection> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        let n = token.split('.').count();
        return Err(malformed(format!(
            "expected 3 dot-separated segments, found {n}{}",
            if n == 5 { " (an encrypted JWE is not supported)" } else { "" }
        )));
    };
    if h.is_empty() || p.is_empty() {
        return Err(malformed("empty segment"));
    }
    let header = decode_object(h, "header")?;
    let (alg, kid, typ) = check_header(&header)?;
    if s.is_empty() {
        return Err(malformed("empty signature"));
    }
    // The signature is checked by the crypto later; reject bad base64 here so that its detail is clear.
    if !is_base64url(s) {
        return Err(malformed("signature is not base64url"));
    }
    let claims = decode_object(p, "payload")?;
    Ok(Parsed { signing_input: &token[..h.len() + 1 + p.len()], signature: s, alg, kid, typ, claims })
}

/// Decodes one segment into a JSON object, refusing duplicate keys at any depth.
fn decode_object(segment: &str, what: &str) -> Result<Map<String, Value>, Rejection> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|e| malformed(format!("{what} is not base64url: {e}")))?;
    match serde_json::from_slice::<Strict>(&bytes) {
        Ok(Strict(Value::Object(map))) => Ok(map),
        Ok(_) => Err(malformed(format!("{what} is not a JSON object"))),
        Err(e) => Err(malformed(format!("{what} is not valid JSON: {e}"))),
    }
}

fn is_base64url(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') && s.len() % 4 != 1
}

fn check_header(h: &Map<String, Value>) -> Result<(Algorithm, Option<String>, Option<String>), Rejection> {
    let alg = match h.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        Some(_) => return Err(malformed("header alg is not a string")),
        None => return Err(malformed("header has no alg")),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(Rejection::new(Reason::UnsupportedAlg, "alg none is never accepted"));
    }
    let alg: Algorithm =
        alg.parse().map_err(|_| Rejection::new(Reason::UnsupportedAlg, format!("unknown alg {}", shorten(alg))))?;
    if h.contains_key("crit") {
        // We implement no JWS extension, so any critical one must make us refuse (RFC 7515 4.1.11).
        return Err(malformed("header lists crit extensions, none are supported"));
    }
    match h.get("b64") {
        None | Some(Value::Bool(true)) => {}
        Some(_) => return Err(malformed("unencoded payload (b64) is not supported")),
    }
    if h.contains_key("enc") || h.contains_key("zip") {
        return Err(malformed("JWE header fields (enc, zip) in a JWS"));
    }
    let cty = opt_str(h, "cty")?;
    if cty.as_deref().is_some_and(|c| c.eq_ignore_ascii_case("jwt")) {
        return Err(malformed("nested token (cty JWT) is not supported"));
    }
    let kid = opt_str(h, "kid")?;
    if kid.as_ref().is_some_and(|k| k.len() > MAX_KID_BYTES || k.is_empty()) {
        return Err(malformed("kid is empty or longer than 256 bytes"));
    }
    Ok((alg, kid, opt_str(h, "typ")?))
}

fn opt_str(h: &Map<String, Value>, name: &str) -> Result<Option<String>, Rejection> {
    match h.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(malformed(format!("header {name} is not a string"))),
    }
}

/// Reads the registered claims, rejecting any of the wrong JSON type.
pub fn std_claims(c: &Map<String, Value>) -> Result<StdClaims, Rejection> {
    let string = |name: &str| match c.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Rejection::new(Reason::InvalidClaim, format!("{name} is not a string"))),
    };
    let date = |name: &str| match c.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(Some(numeric_date(n))),
        Some(_) => Err(Rejection::new(Reason::InvalidClaim, format!("{name} is not a number"))),
    };
    let aud = match c.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Rejection::new(Reason::InvalidClaim, "aud array holds a non-string"))?,
        Some(_) => {
            return Err(Rejection::new(Reason::InvalidClaim, "aud is not a string or array"));
        }
    };
    Ok(StdClaims {
        iss: string("iss")?,
        sub: string("sub")?,
        aud,
        times: Times { exp: date("exp")?, nbf: date("nbf")?, iat: date("iat")? },
        jti: string("jti")?,
    })
}

/// A JSON number as whole seconds; fractions are truncated and out-of-range values saturate.
fn numeric_date(n: &serde_json::Number) -> i64 {
    if let Some(i) = n.as_i64() {
        i
    } else if n.as_u64().is_some() {
        i64::MAX
    } else {
        n.as_f64().unwrap_or(0.0) as i64
    }
}

/// Cuts attacker-controlled text to a loggable size and escapes control characters.
pub fn shorten(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let mut out = format!("{cut:?}");
    if cut.len() < s.len() {
        out.push('…');
    }
    out
}

/// A token's header and claims, decoded and not verified.
pub type Unverified = (Map<String, Value>, Map<String, Value>);

/// Decodes header and claims without checking anything but the shape (for `token inspect`).
pub fn decode_unverified(token: &str) -> Result<Unverified, Rejection> {
    let mut parts = token.split('.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return Err(malformed("expected 3 dot-separated segments"));
    };
    Ok((decode_object(h, "header")?, decode_object(p, "payload")?))
}

/// A JSON value whose objects, at every depth, have no duplicate keys.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.insert(key, v).is_some() {
                return Err(de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(claims))
    }

    #[test]
    fn hostile_headers_are_rejected_with_their_reason() {
        let ok_claims = r#"{"sub":"a"}"#;
        let cases: &[(&str, Reason, &str)] = &[
            (r#"{"alg":"none"}"#, Reason::UnsupportedAlg, "none"),
            (r#"{"alg":"None"}"#, Reason::UnsupportedAlg, "none"),
            (r#"{"alg":"NONE"}"#, Reason::UnsupportedAlg, "none"),
            (r#"{"alg":"nOnE"}"#, Reason::UnsupportedAlg, "none"),
            (r#"{"alg":"HS1"}"#, Reason::UnsupportedAlg, "unknown alg"),
            (r#"{"alg":""}"#, Reason::UnsupportedAlg, "unknown alg"),
            (r#"{"typ":"JWT"}"#, Reason::Malformed, "no alg"),
            (r#"{"alg":256}"#, Reason::Malformed, "alg is not a string"),
            (r#"{"alg":"HS256","crit":["exp"]}"#, Reason::Malformed, "crit"),
            (r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#, Reason::Malformed, "crit"),
            (r#"{"alg":"HS256","b64":false}"#, Reason::Malformed, "b64"),
            (r#"{"alg":"HS256","cty":"JWT"}"#, Reason::Malformed, "nested"),
            (r#"{"alg":"HS256","cty":"jwt"}"#, Reason::Malformed, "nested"),
            (r#"{"alg":"HS256","enc":"A128GCM"}"#, Reason::Malformed, "JWE"),
            (r#"{"alg":"HS256","alg":"none"}"#, Reason::Malformed, "duplicate key"),
            (r#"{"alg":"HS256","kid":7}"#, Reason::Malformed, "kid is not a string"),
            (r#"{"alg":"HS256","kid":""}"#, Reason::Malformed, "kid is empty"),
            (r#"["alg","HS256"]"#, Reason::Malformed, "not a JSON object"),
            (r#"{"alg":"HS256""#, Reason::Malformed, "not valid JSON"),
        ];
        for (header, reason, detail) in cases {
            let err = parse(&token(header, ok_claims)).unwrap_err();
            assert_eq!(err.reason, *reason, "{header}: {err:?}");
            assert!(err.detail.contains(detail), "{header}: {err:?}");
        }
    }

    #[test]
    fn hostile_shapes_are_malformed() {
        let good = token(r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#);
        let (h, rest) = good.split_once('.').unwrap();
        let (p, _) = rest.split_once('.').unwrap();
        let cases = [
            ("", "segments"),
            ("abc", "segments"),
            ("a.b", "segments"),
            ("a.b.c.d.e", "JWE"),
            (&format!("{h}.{p}."), "empty signature"),
            (&format!(".{p}.c2ln"), "empty segment"),
            (&format!("{h}.{p}.sig.extra"), "segments"),
            (&format!("{h}==.{p}.c2ln"), "header is not base64url"),
            (&format!("{h}.{p}!.c2ln"), "payload is not base64url"),
            (&format!("{h}.{p}.c2l+"), "signature is not base64url"),
            (&format!("{h}.{}.c2ln", b64(r#"{"a":1,"a":2}"#)), "duplicate key"),
            (&format!("{h}.{}.c2ln", b64(r#"{"r":{"x":1,"x":1}}"#)), "duplicate key"),
            (&format!("{h}.{}.c2ln", b64("[1]")), "payload is not a JSON object"),
        ];
        for (tok, detail) in cases {
            let err = parse(tok).unwrap_err();
            assert_eq!(err.reason, Reason::Malformed, "{tok}");
            assert!(err.detail.contains(detail), "{tok}: {err:?}");
        }
    }

    #[test]
    fn hint_headers_are_ignored_not_followed() {
        let h = r#"{"alg":"RS256","kid":"../../dev/null","jku":"http://evil/jwks","jwk":{"kty":"oct","k":"AA"},"x5u":"http://evil","x5c":["AA"]}"#;
        let t = token(h, "{}");
        let p = parse(&t).unwrap();
        assert_eq!(p.alg, Algorithm::RS256);
        assert_eq!(p.kid.as_deref(), Some("../../dev/null"));
    }

    #[test]
    fn registered_claims_of_the_wrong_type_are_rejected() {
        let cases = [
            (r#"{"exp":"1700000000"}"#, "exp is not a number"),
            (r#"{"nbf":true}"#, "nbf is not a number"),
            (r#"{"iat":[1]}"#, "iat is not a number"),
            (r#"{"iss":1}"#, "iss is not a string"),
            (r#"{"sub":{}}"#, "sub is not a string"),
            (r#"{"jti":2}"#, "jti is not a string"),
            (r#"{"aud":[1]}"#, "non-string"),
            (r#"{"aud":3}"#, "aud is not"),
        ];
        for (claims, detail) in cases {
            let map: Map<String, Value> = serde_json::from_str(claims).unwrap();
            let err = std_claims(&map).unwrap_err();
            assert_eq!(err.reason, Reason::InvalidClaim);
            assert!(err.detail.contains(detail), "{claims}: {err:?}");
        }
        let map: Map<String, Value> =
            serde_json::from_str(r#"{"exp":1.9,"aud":"x","iat":1e300,"nbf":18446744073709551615}"#).unwrap();
        let c = std_claims(&map).unwrap();
        assert_eq!(c.times, Times { exp: Some(1), iat: Some(i64::MAX), nbf: Some(i64::MAX) });
        assert_eq!(c.aud, vec!["x".to_owned()]);
    }

    #[test]
    fn shorten_escapes_and_cuts() {
        assert_eq!(shorten("a\nb"), "\"a\\nb\"");
        assert!(shorten(&"x".repeat(1000)).len() < 80);
    }
}
