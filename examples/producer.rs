//! Publishes one record with its token to an untrusted Kafka topic and waits for the broker's
//! acknowledgement (rdkafka, as tokengate itself uses).
//!
//! BOOTSTRAP=127.0.0.1:9092 TOPIC=orders.untrusted TOKEN=... cargo run --example producer -- '{"order": 42}'

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let (topic, token) = (env("TOPIC")?, env("TOKEN")?);
    let payload = std::env::args().nth(1).ok_or("usage: producer PAYLOAD")?;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", env("BOOTSTRAP")?).set("enable.idempotence", "true").create()?;
    let bearer = format!("Bearer {token}");
    let record = FutureRecord::to(&topic)
        .key("order-42")
        .payload(&payload)
        .headers(OwnedHeaders::new().insert(Header { key: "authorization", value: Some(bearer.as_bytes()) }));
    // The error of a failed send comes with the record it gives back; keep the error.
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _record)| e)?;
    Ok(())
}
