//! The JWS parser and the whole token check: any text a producer puts in the token header.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tokengate::verify::jwt::parse(text);
    let _ = tokengate::verify::jwt::decode_unverified(text);
    let e = common::engine();
    let _ = common::now(e.verifier.verify(&e.route.policy, text, 1_800_000_000));
});
