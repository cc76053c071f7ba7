//! A bound-token route's proof check: any bytes a producer puts in the proof header, with a valid
//! token bound to the key of tests/fixtures/keys/p256.key.pem (`cnf.jkt`; the seed is its proof).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::envelope::{Envelope, HeaderData, Origin};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let e = common::engine();
    let claims = serde_json::json!({"iss": "https://idp.test", "aud": "tokengate", "sub": "alice",
        "iat": 1_799_999_990, "exp": 1_800_000_600, "cnf": {"jkt": "o2DMlE_sSf9QnBz4t79X1h2kLVjG4isvpZ8MxG-W2oM"}});
    let key = jsonwebtoken::EncodingKey::from_secret(b"fuzz-secret-0123456789abcdef-0123456789");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("hs".into());
    let token = jsonwebtoken::encode(&header, &claims, &key).expect("signs");
    let env = Envelope {
        key: Some(b"k".to_vec()),
        payload: Some(b"p".to_vec()),
        headers: vec![
            ("authorization".into(), HeaderData::Bytes(format!("Bearer {token}").into_bytes())),
            ("x-token-proof".into(), HeaderData::Bytes(data.to_vec())),
        ],
        timestamp_ms: None,
        origin: Origin::Kafka { topic: "t".into(), partition: 0, offset: 0 },
        amqp: None,
        amqp_headers: None,
        defect: None,
    };
    let _ = common::now(e.gate.handle(&e.bound, &env, 1_800_000_000));
});
