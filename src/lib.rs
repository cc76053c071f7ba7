//! tokengate: a per-message token authenticator for Kafka and RabbitMQ.
//!
//! # Architecture
//! Producers attach a JWT to each message on an untrusted topic or queue. For each message a
//! route extracts the token ([`verify::TokenSpec`]), the [`verify::Verifier`] decides it
//! (signature with pinned keys, registered claims, the route's [`verify::Policy`]), and the
//! message is republished to a trusted destination or dead-lettered with a reason code.
//! A rejected token is data ([`verify::Rejection`]); an infrastructure failure is an `Err`
//! that holds the message and is retried, never accepted.
//!
//! # Layout
//! - [`config`]: TOML file -> env overrides -> validated [`config::Settings`].
//! - [`verify`]: the decision; [`verify::jwt`] parsing, [`verify::keys`] pinned keys,
//!   [`verify::jwks`] rotating key sets, [`verify::policy`] route rules.
//! - [`revocation`]: the Redis revocation list, its key schema and invalidated local cache.
//! - [`envelope`]: a message from any broker ([`envelope::Envelope`]) and what goes out.
//! - [`gate`]: the core, `Gate::handle(route, envelope) -> Outcome` (forward / dead-letter) or a hold.
//! - [`pipeline`]: the one message path of every route ([`pipeline::Route`], its live
//!   [`pipeline::RouteStatus`]): decide many at once, publish each verdict in read order (what a
//!   destination cannot carry becomes a `malformed` dead letter), hand confirmations back in order.
//! - [`source`]: intake, envelope conversion and ack rule per broker: [`source::kafka`] (ordered
//!   offset commits, rewinds, static membership, a broker probe) and [`source::amqp`] (manual
//!   acks after confirm, bounded prefetch; [`source::poison`] takes off what the AMQP client cannot
//!   decode); every route task is supervised ([`source::supervise`]).
//! - [`sink`]: publishing with broker confirmation: [`sink::kafka`] (idempotent, `acks=all`) and
//!   [`sink::amqp`] (publisher confirms, `mandatory`).
//! - [`app`]: `tokengate run` wiring (routes, admin endpoint, shutdown).
//! - [`demo`]: `tokengate demo`, the whole pipeline on an embedded Kafka.
//! - [`admin`]: `/health`, `/ready`, `/metrics`.
//! - [`ops`]: the token and revocation tools (mint, inspect, verify, revoke, list).
//! - [`telemetry`]: log setup (wire-level client logs capped) and every metric, declared once.
//! - [`cli`]: the command line.

pub mod admin;
pub mod amqp;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod gate;
pub mod ops;
pub mod pipeline;
pub mod revocation;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod verify;
