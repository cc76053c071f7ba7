//! Property tests of the message path over arbitrary producer input: the gate decides every
//! envelope (never a panic, never a hold without an outage), and what it forwards carries no
//! forged identity and no token.

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::json;
use tokengate::config::OnUnavailable;
use tokengate::envelope::{Envelope, HeaderData, Origin};
use tokengate::gate::{Gate, Outcome};
use tokengate::source::kafka::headers_from_bytes;

use crate::util::*;

fn route_config() -> String {
    format!("{}\n[routes.r]\nissuers = [\"idp\"]\n", issuers_toml())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_envelope_is_decided_and_nothing_forged_passes(
        raw in vec((vec(any::<u8>(), 0..24), proptest::option::of(vec(any::<u8>(), 0..64))), 0..30),
        names in vec(prop_oneof![Just("authorization"), Just("x-tokengate-sub"), Just("X-TokenGate-Issuer")], 0..4),
        with_token in any::<bool>(),
        key in proptest::option::of(vec(any::<u8>(), 0..64)),
        payload in proptest::option::of(vec(any::<u8>(), 0..256)),
    ) {
        let (verifier, routes) = engine(&route_config());
        let gate = Gate::new(Arc::clone(&verifier), None, OnUnavailable::Hold);
        let mut raw = raw;
        for n in &names {
            raw.push((n.as_bytes().to_vec(), Some(b"forged".to_vec())));
        }
        if with_token {
            let tok = token(Algorithm::HS256, json!({"iat": NOW - 5, "exp": NOW + 600}));
            raw.push((b"Authorization".to_vec(), Some(format!("Bearer {tok}").into_bytes())));
        }
        let (headers, defect) = headers_from_bytes(raw);
        let env = Envelope {
            key, payload, headers, timestamp_ms: None,
            origin: Origin::Kafka { topic: "t".into(), partition: 0, offset: 0 },
            amqp: None, amqp_headers: None, defect: defect.clone(),
        };
        let outcome = now_or_never(gate.handle(&routes[0], &env, NOW));
        let outcome = outcome.expect("no outage: every message is decided, never held");
        match outcome {
            Outcome::Forward(out) => {
                prop_assert!(defect.is_none(), "a malformed envelope was forwarded");
                prop_assert!(!out.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("authorization")), "token forwarded");
                let sub: Vec<_> = out.headers.iter().filter(|(n, _)| n == "x-tokengate-sub").collect();
                prop_assert_eq!(sub.len(), 1);
                prop_assert_eq!(&sub[0].1, &HeaderData::Bytes(b"alice".to_vec()));
                prop_assert!(!out.headers.iter().any(|(_, v)| *v == HeaderData::Bytes(b"forged".to_vec()) ), "a forged gate header passed");
                prop_assert_eq!(out.key, env.key);
                prop_assert_eq!(out.payload, env.payload);
            }
            Outcome::DeadLetter(out, r) => {
                if defect.is_some() {
                    prop_assert_eq!(r.reason.code(), "malformed");
                }
                let reason = out.headers.iter().find(|(n, _)| n == "x-tokengate-reason").map(|(_, v)| v.clone());
                prop_assert_eq!(reason, Some(HeaderData::Bytes(r.reason.code().as_bytes().to_vec())));
            }
        }
    }
}

#[test]
fn identity_claims_with_control_characters_are_written_json_encoded() {
    let (verifier, routes) = engine(&route_config());
    let gate = Gate::new(verifier, None, OnUnavailable::Hold);
    for (sub, want) in [
        ("alice\r\nx-admin: 1", r#""alice\r\nx-admin: 1""#),
        ("nul\u{0}byte", r#""nul\u0000byte""#),
        ("plain alice", "plain alice"),
    ] {
        let tok = token(Algorithm::HS256, json!({"sub": sub, "iat": NOW - 5, "exp": NOW + 600}));
        let env = Envelope {
            key: None,
            payload: None,
            headers: vec![("authorization".into(), HeaderData::Bytes(format!("Bearer {tok}").into_bytes()))],
            timestamp_ms: None,
            origin: Origin::Kafka { topic: "t".into(), partition: 0, offset: 0 },
            amqp: None,
            amqp_headers: None,
            defect: None,
        };
        let Ok(Outcome::Forward(out)) = now_or_never(gate.handle(&routes[0], &env, NOW)) else { panic!("accepted") };
        let got = out.headers.iter().find(|(n, _)| n == "x-tokengate-sub").map(|(_, v)| v.clone());
        assert_eq!(got, Some(HeaderData::Bytes(want.as_bytes().to_vec())));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A bound-token route decides every proof header a producer can send (any bytes, or a valid
    /// proof with one byte changed, or several proof headers): never a panic, never a hold, and
    /// only the proof made for this very message passes.
    #[test]
    fn every_proof_header_is_decided_and_only_the_right_one_passes(
        junk in vec(any::<u8>(), 0..300),
        flip_at in any::<usize>(),
        flip_to in any::<u8>(),
        kind in 0..4u8,
    ) {
        let config = format!("{}\n[routes.r]\nissuers = [\"idp\"]\n[routes.r.proof]\nmode = \"jkt\"\n", issuers_toml());
        let (verifier, routes) = engine(&config);
        let gate = Gate::new(Arc::clone(&verifier), None, OnUnavailable::Hold);
        let producer = tokengate::attest::SigningKey::from_pem(
            "p", Algorithm::ES256, &std::fs::read(fixture("keys/p256.key.pem")).unwrap()).unwrap();
        let jkt = tokengate::verify::proof::thumbprint(&producer.jwk).unwrap();
        let tok = token(Algorithm::HS256, json!({"cnf": {"jkt": jkt}, "iat": NOW - 5, "exp": NOW + 600}));
        let good = producer.proof(Some(b"k"), b"payload", "j1", NOW).unwrap().into_bytes();
        let proofs: Vec<Vec<u8>> = match kind {
            0 => vec![junk],
            1 => {
                let mut p = good.clone();
                let i = flip_at % p.len();
                p[i] = flip_to;
                vec![p]
            }
            2 => vec![good.clone(), good.clone()],
            _ => vec![good.clone()],
        };
        let mut headers = vec![("authorization".to_owned(), HeaderData::Bytes(format!("Bearer {tok}").into_bytes()))];
        headers.extend(proofs.iter().map(|p| ("x-token-proof".to_owned(), HeaderData::Bytes(p.clone()))));
        let env = Envelope {
            key: Some(b"k".to_vec()), payload: Some(b"payload".to_vec()), headers, timestamp_ms: None,
            origin: Origin::Kafka { topic: "t".into(), partition: 0, offset: 0 },
            amqp: None, amqp_headers: None, defect: None,
        };
        let outcome = now_or_never(gate.handle(&routes[0], &env, NOW)).expect("decided, never held");
        let passed = matches!(outcome, Outcome::Forward(_));
        prop_assert_eq!(passed, proofs.len() == 1 && proofs[0] == good, "kind {}", kind);
    }
}
