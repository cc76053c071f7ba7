//! The envelope and header path: Kafka headers of any bytes through the gate, then what each
//! destination kind makes of the verdict. Nothing may panic, and a dead letter made to fit fits.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use tokengate::envelope::{Envelope, Origin};
use tokengate::gate::Outcome;
use tokengate::sink::amqp::AmqpSink;

#[path = "common.rs"]
mod common;

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    routing_key: String,
    amqp_source: bool,
}

fn sink() -> &'static AmqpSink {
    static S: OnceLock<AmqpSink> = OnceLock::new();
    S.get_or_init(|| AmqpSink::new("amqp://127.0.0.1:1/%2f", "ex", Some("{routing_key}.{topic}.{key}".into())))
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let (headers, defect) = tokengate::source::kafka::headers_from_bytes(input.headers);
    let origin = if input.amqp_source {
        Origin::Amqp { queue: "q".into(), exchange: "x".into(), routing_key: input.routing_key, delivery_tag: 1 }
    } else {
        Origin::Kafka { topic: input.routing_key.as_str().into(), partition: 0, offset: 0 }
    };
    let env = Envelope {
        key: input.key,
        payload: input.payload,
        headers,
        timestamp_ms: None,
        origin,
        amqp: None,
        amqp_headers: None,
        defect,
    };
    let e = common::engine();
    let outcome = common::now(e.gate.handle(&e.route, &env, 1_800_000_000)).expect("no outage, no hold");
    let mut out = match outcome {
        Outcome::Forward(out) => out,
        Outcome::DeadLetter(out, _) => out,
    };
    let s = sink();
    let _ = s.check(&out);
    s.make_fit(&mut out, "x-tokengate-");
    if let Err(why) = s.check(&out) {
        assert!(why.starts_with("routing key"), "a fitted dead letter does not fit: {why}");
    }
});
