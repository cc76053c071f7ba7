//! The verification engine against real keys and tokens, including tokens from PyJWT.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use tokengate::verify::{HeaderValue, Policy, Reason, TokenSpec, Verifier};

use crate::util::*;

const ROUTES: &str = r#"
[routes.orders]
issuers = ["idp"]
require = [{ claim = "scope", any_of = ["orders:write"] }, { claim = "realm_access.roles", all_of = ["publisher"] }]
claims = { tenant = "acme" }
"#;

fn setup() -> (Arc<Verifier>, Policy) {
    let (v, routes) = engine(&format!("{}{ROUTES}", issuers_toml()));
    (v, routes[0].policy.clone())
}

fn decide(v: &Verifier, policy: &Policy, token: &str) -> Result<(), Reason> {
    now_or_never(v.verify(policy, token, NOW)).expect("no key fetch needed").map(|_| ()).map_err(|r| r.reason)
}

#[test]
fn every_algorithm_verifies_with_its_pinned_key() {
    let (v, policy) = setup();
    for alg in
        [Algorithm::HS256, Algorithm::RS256, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA]
    {
        let t = token(alg, json!({}));
        let verified = now_or_never(v.verify(&policy, &t, NOW)).unwrap().unwrap_or_else(|r| panic!("{alg:?}: {r:?}"));
        assert_eq!(&*verified.issuer, "idp");
        assert_eq!(verified.kid.as_deref(), Some(kid_for(alg)));
        assert_eq!(verified.fingerprint.to_string(), tokengate::verify::fingerprint(&t));
    }
}

#[test]
fn tokens_made_by_pyjwt_are_accepted() {
    let (v, _) = setup();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("pyjwt_tokens.json")).unwrap()).unwrap();
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    let policy = Policy { issuers: vec!["pyjwt".into()], ..Policy::default() };
    for t in tokens {
        let got = now_or_never(v.verify(&policy, t["token"].as_str().unwrap(), NOW)).unwrap();
        let verified = got.unwrap_or_else(|r| panic!("{}: {r:?}", t["alg"]));
        assert_eq!(format!("{:?}", verified.alg), t["alg"].as_str().unwrap());
        assert_eq!(verified.sub.as_deref(), Some("pyjwt-user"));
    }
}

#[test]
fn rejection_table() {
    let (v, policy) = setup();
    let hs = signing_key(Algorithm::HS256);
    let rsa_pub = std::fs::read(fixture("keys/rsa.pub.pem")).unwrap();
    let good = token(Algorithm::ES256, json!({}));
    let (gh, rest) = good.split_once('.').unwrap();
    let (gp, gs) = rest.split_once('.').unwrap();
    let attacker = EncodingKey::from_secret(b"attacker-attacker-attacker-attacker!");
    let claims = claims(json!({})).to_string();

    let cases: Vec<(&str, String, Reason)> = vec![
        ("alg none", format!("{}.{gp}.", b64(r#"{"alg":"none"}"#)), Reason::UnsupportedAlg),
        ("alg None", format!("{}.{gp}.", b64(r#"{"alg":"None","kid":"hs"}"#)), Reason::UnsupportedAlg),
        ("alg NONE", format!("{}.{gp}.c2ln", b64(r#"{"alg":"NONE"}"#)), Reason::UnsupportedAlg),
        ("alg nOnE", format!("{}.{gp}.", b64(r#"{"alg":"nOnE"}"#)), Reason::UnsupportedAlg),
        (
            "HS256 signed with the RSA public key bytes",
            sign_raw(r#"{"alg":"HS256","kid":"rsa"}"#, &claims, Algorithm::HS256, &EncodingKey::from_secret(&rsa_pub)),
            Reason::UnsupportedAlg,
        ),
        (
            "HS256 with RSA key bytes, no kid",
            sign_raw(r#"{"alg":"HS256"}"#, &claims, Algorithm::HS256, &EncodingKey::from_secret(&rsa_pub)),
            Reason::BadSignature,
        ),
        ("psychic ES256 (r = s = 0)", format!("{gh}.{gp}.{}", b64(&"\0".repeat(64))), Reason::BadSignature),
        (
            "ES256 signature of another token",
            format!("{gh}.{}.{gs}", b64(&claims.replace("alice", "mallory"))),
            Reason::BadSignature,
        ),
        (
            "kid ../../dev/null",
            sign_raw(r#"{"alg":"HS256","kid":"../../dev/null"}"#, &claims, Algorithm::HS256, &hs),
            Reason::UnknownKid,
        ),
        (
            "injected jku",
            sign_raw(
                r#"{"alg":"HS256","kid":"evil","jku":"http://127.0.0.1:1/jwks"}"#,
                &claims,
                Algorithm::HS256,
                &attacker,
            ),
            Reason::UnknownKid,
        ),
        (
            "injected jwk with its own secret",
            sign_raw(
                r#"{"alg":"HS256","kid":"hs","jwk":{"kty":"oct","k":"YXR0YWNrZXItYXR0YWNrZXItYXR0YWNrZXItYXR0YWNrZXIh"}}"#,
                &claims,
                Algorithm::HS256,
                &attacker,
            ),
            Reason::BadSignature,
        ),
        ("wrong segment count", format!("{gh}.{gp}"), Reason::Malformed),
        ("bad base64", format!("{gh}.{gp}$.{gs}"), Reason::Malformed),
        (
            "crit",
            sign_raw(r#"{"alg":"HS256","kid":"hs","crit":["x"],"x":1}"#, &claims, Algorithm::HS256, &hs),
            Reason::Malformed,
        ),
        (
            "cty JWT",
            sign_raw(r#"{"alg":"HS256","kid":"hs","cty":"JWT"}"#, &claims, Algorithm::HS256, &hs),
            Reason::Malformed,
        ),
        (
            "b64 false",
            sign_raw(r#"{"alg":"HS256","kid":"hs","b64":false}"#, &claims, Algorithm::HS256, &hs),
            Reason::Malformed,
        ),
        (
            "duplicate header key",
            sign_raw(r#"{"alg":"HS256","kid":"hs","kid":"rsa"}"#, &claims, Algorithm::HS256, &hs),
            Reason::Malformed,
        ),
        (
            "duplicate claim",
            sign_raw(
                r#"{"alg":"HS256","kid":"hs"}"#,
                &claims.replacen('{', r#"{"sub":"root","#, 1),
                Algorithm::HS256,
                &hs,
            ),
            Reason::Malformed,
        ),
        (
            "exp as a string",
            sign_raw(
                r#"{"alg":"HS256","kid":"hs"}"#,
                &claims.replace(&format!("\"exp\":{}", NOW + 600), r#""exp":"9999999999""#),
                Algorithm::HS256,
                &hs,
            ),
            Reason::InvalidClaim,
        ),
        ("expired", token(Algorithm::HS256, json!({"exp": NOW - 31})), Reason::Expired),
        ("no exp", token(Algorithm::HS256, json!({"exp": null})), Reason::MissingClaim),
        ("not yet valid", token(Algorithm::HS256, json!({"nbf": NOW + 31})), Reason::NotYetValid),
        ("issued in the future", token(Algorithm::HS256, json!({"iat": NOW + 60})), Reason::IssuedInFuture),
        ("unknown issuer", token(Algorithm::HS256, json!({"iss": "https://evil.test"})), Reason::UnknownIssuer),
        ("no iss", token(Algorithm::HS256, json!({"iss": null})), Reason::MissingClaim),
        ("wrong audience", token(Algorithm::HS256, json!({"aud": ["billing"]})), Reason::WrongAudience),
        ("no audience", token(Algorithm::HS256, json!({"aud": null})), Reason::MissingClaim),
        ("required claim missing", token(Algorithm::HS256, json!({"sub": null})), Reason::MissingClaim),
        ("scope missing", token(Algorithm::HS256, json!({"scope": "orders:read"})), Reason::Forbidden),
        ("role missing", token(Algorithm::HS256, json!({"realm_access": {"roles": ["reader"]}})), Reason::Forbidden),
        ("wrong tenant", token(Algorithm::HS256, json!({"tenant": "evil"})), Reason::Forbidden),
        (
            "issuer not on this route",
            sign_raw(
                r#"{"alg":"HS256"}"#,
                &claims.replace("https://idp.test", "https://other.test"),
                Algorithm::HS256,
                &signing_key(Algorithm::HS256),
            ),
            Reason::WrongIssuer,
        ),
        (
            "RS384 not allowed for the issuer",
            sign_raw(r#"{"alg":"RS384","kid":"rsa"}"#, &claims, Algorithm::RS384, &signing_key(Algorithm::RS256)),
            Reason::UnsupportedAlg,
        ),
        (
            "PS256 key pinned",
            sign_raw(r#"{"alg":"ES256","kid":"rsa"}"#, &claims, Algorithm::ES256, &signing_key(Algorithm::ES256)),
            Reason::UnsupportedAlg,
        ),
    ];
    for (name, tok, want) in cases {
        assert_eq!(decide(&v, &policy, &tok), Err(want), "{name}");
    }
    assert_eq!(decide(&v, &policy, &good), Ok(()));
}

#[test]
fn hostile_header_values_are_rejected_before_parsing() {
    let spec = TokenSpec::default();
    let huge = vec![b'a'; 1 << 20];
    let cases: Vec<(Vec<(&str, HeaderValue)>, Reason)> = vec![
        (vec![("authorization", HeaderValue::Bytes(&huge))], Reason::TokenTooLarge),
        (vec![("authorization", HeaderValue::Bytes(b"Bearer \xc3\x28.x.y"))], Reason::NonUtf8Token),
        (vec![("x-other", HeaderValue::Bytes(b"a.b.c"))], Reason::MissingToken),
        (
            vec![("authorization", HeaderValue::Bytes(b"a.b.c")), ("authorization", HeaderValue::Bytes(b"d.e.f"))],
            Reason::DuplicateToken,
        ),
        (vec![("authorization", HeaderValue::Bytes(b"   "))], Reason::EmptyToken),
    ];
    for (headers, want) in cases {
        assert_eq!(spec.extract(headers).map(|_| ()).map_err(|r| r.reason), Err(want));
    }
}

#[test]
fn cache_hits_skip_the_signature_but_not_time_or_policy() {
    let (v, policy) = setup();
    let t = token(Algorithm::RS256, json!({"exp": NOW + 100}));
    let first = now_or_never(v.verify(&policy, &t, NOW)).unwrap().unwrap();
    let second = now_or_never(v.verify(&policy, &t, NOW + 1)).unwrap().unwrap();
    assert!(!Arc::ptr_eq(&first, &second), "a token seen once is not cached (one-time tokens cost no entry)");
    let third = now_or_never(v.verify(&policy, &t, NOW + 1)).unwrap().unwrap();
    assert!(Arc::ptr_eq(&second, &third), "from its second sight on, decisions come from the cache");
    // Time is checked on every hit.
    let late = now_or_never(v.verify(&policy, &t, NOW + 131)).unwrap().unwrap_err();
    assert_eq!(late.reason, Reason::Expired);
    // Policy is the route's, checked on every hit.
    let strict = Policy {
        require: vec![tokengate::verify::Requirement {
            claim: tokengate::verify::ClaimPath("scope".into()),
            values: vec!["admin".into()],
            all: true,
        }],
        ..policy.clone()
    };
    assert_eq!(now_or_never(v.verify(&strict, &t, NOW)).unwrap().unwrap_err().reason, Reason::Forbidden);
    // A forged signature on a cached payload is a different token: not a hit.
    let (si, _) = t.rsplit_once('.').unwrap();
    let forged = format!("{si}.{}", b64("forged"));
    assert_eq!(decide(&v, &policy, &forged), Err(Reason::BadSignature));
}
