//! Integration tests: one binary, shared helpers in `util`.

mod util;

mod amqp;
mod attest;
mod audit;
mod cli;
mod dead_letters;
mod deploy;
mod exactly_once;
mod hostile;
mod jwks;
mod kafka;
mod kafka_failover;
mod producers;
mod proof;
mod properties;
mod reload;
mod revocation;
mod single_use;
mod token_fetch;
mod verify;
