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
//! # The path of one message
//! ```text
//! source::kafka / source::amqp     read a record or delivery -> envelope::Envelope
//!   -> pipeline::Pipeline          decide up to 64 at once, in order of reading:
//!        gate::Gate::handle        verify::Verifier (token, signature, claims, policy,
//!                                  a bound token's proof), attest (the gate's signature)
//!                                  + revocation::Revocations (local mirror of Redis)
//!                                  + single_use::Uses (a jti's first use, in Redis)
//!                                  -> Outcome::Forward | Outcome::DeadLetter | Hold (retry)
//!   -> sink::kafka / sink::amqp    publish in read order, confirmed by the broker
//!      (+ audit::Audit)            and its audit record, if the trail is on
//!   -> source ack rule             Kafka: commit the contiguous confirmed offsets;
//!                                  AMQP: ack the delivery tag (never before the confirm);
//!                                  Kafka exactly once: commit the writes and the offsets
//!                                  in one Kafka transaction
//! ```
//!
//! # Layout
//! - [`config`]: TOML file ([`config::file`]) -> env overrides -> typed [`config::Settings`]
//!   (brokers, secrets, keys, routes), shared by `run` and `check-config`.
//! - [`verify`]: the decision; [`verify::jwt`] token parsing, [`verify::reason`] rejection
//!   codes, [`verify::keys`] pinned keys, [`verify::jwks`] rotating key sets, [`verify::policy`]
//!   route rules, [`verify::proof`] tokens bound to their message (proof of possession).
//! - [`attest`]: the gate's own signature on what it accepted (attestations) and its JWKS.
//! - [`revocation`]: the Redis revocation list as the gate reads it: a complete local
//!   [`revocation::mirror`] kept in step by Redis (or per-key lookups, cached); its key schema
//!   in [`revocation::schema`], operators' writes in [`revocation::edit`].
//! - [`audit`]: the audit trail, one JSON record per decision (Kafka, AMQP or a JSON-lines file),
//!   confirmed before the message is acknowledged.
//! - [`single_use`]: single-use tokens (replay protection): each `jti` passes once, recorded in Redis.
//! - [`envelope`]: a message from any broker ([`envelope::Envelope`]) and what goes out.
//! - [`gate`]: the core, `Gate::handle(route, envelope) -> Outcome` (forward / dead-letter) or a hold.
//! - [`pipeline`]: the one message path of every route ([`pipeline::Route`], its live
//!   [`pipeline::RouteStatus`]): decide many at once, publish each verdict in read order (what a
//!   destination cannot carry becomes a `malformed` dead letter), hand confirmations back in order.
//! - [`source`]: intake, envelope conversion and ack rule per broker: [`source::kafka`] (ordered
//!   offset commits, rewinds, static membership, a broker probe) and [`source::amqp`] (manual
//!   acks after confirm, bounded prefetch; [`source::poison`] takes off what the AMQP client cannot
//!   decode), and [`source::transaction`] for `exactly_once` Kafka -> Kafka routes (writes and
//!   offsets in one Kafka transaction); every route task is supervised ([`source::supervise`]).
//! - [`sink`]: publishing with broker confirmation: [`sink::kafka`] (idempotent, `acks=all`) and
//!   [`sink::amqp`] (publisher confirms, `mandatory`).
//! - [`amqp`]: what the AMQP source and destination share (bounded connect, limits).
//! - [`app`]: wiring (gate, routes, admin endpoint, drain at shutdown); [`reload`]: `tokengate
//!   run`, the daemon's life, putting a changed config in force on `SIGHUP` without a restart
//!   (only changed routes restart).
//! - [`demo`]: `tokengate demo`, the whole pipeline on an embedded Kafka.
//! - [`admin`]: `/health`, `/ready`, `/metrics`, `/.well-known/jwks.json`.
//! - [`dead_letters`]: `tokengate dead-letters replay`, re-driving dead letters to their source.
//! - [`ops`]: the token tools (mint, inspect, verify, fetch from an OAuth token endpoint).
//! - [`telemetry`]: log setup (wire-level client logs capped) and every metric, declared once,
//!   with typed handles.
//! - [`cli`]: the command line; [`progress`] reports long operator commands.

pub mod admin;
pub mod amqp;
pub mod app;
pub mod attest;
pub mod audit;
pub mod cli;
pub mod config;
pub mod dead_letters;
pub mod demo;
pub mod envelope;
pub mod gate;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod reload;
pub mod revocation;
pub mod single_use;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod verify;
