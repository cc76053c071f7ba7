//! Integration tests: one binary, shared helpers in `util`.

mod util;

mod amqp;
mod cli;
mod jwks;
mod kafka;
mod kafka_failover;
mod revocation;
mod verify;
