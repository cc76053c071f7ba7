//! Logs and per-message metrics. Logs go to stderr (`RUST_LOG` filters,
//! `TOKENGATE_LOG_FORMAT=json` for JSON lines). The README lists every metric.

use tracing_subscriber::EnvFilter;

use crate::verify::Reason;

/// Third-party clients that log wire frames at debug and trace: connection handshakes with the
/// broker password (lapin, amq-protocol) and message headers with bearer tokens. They never log
/// below `info`, whatever `RUST_LOG` asks for.
const WIRE_LOGGERS: &[&str] = &["lapin", "amq_protocol", "pinky_swear", "redis", "reqwest", "hyper", "h2", "rustls"];

/// Loggers that print whole messages, headers included (a token a dead letter kept), at any
/// level: lapin logs every message the broker returns (unroutable) with its body and headers at
/// `warn`. The gate logs such a publish itself, as a failure, without the message.
const MESSAGE_LOGGERS: &[&str] = &["lapin::returned_messages"];

/// Whether an event may be logged at all: wire-level clients never below `info`, loggers of
/// whole messages never.
pub fn loggable(target: &str, level: &tracing::Level) -> bool {
    if MESSAGE_LOGGERS.iter().any(|t| target.starts_with(t)) {
        return false;
    }
    *level <= tracing::Level::INFO || !WIRE_LOGGERS.iter().any(|t| target.starts_with(t))
}

/// Starts logging to stderr; the default level is `info`.
pub fn init_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // librdkafka reports every reconnect attempt; warn keeps its real problems visible.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn"));
    let wire = tracing_subscriber::filter::filter_fn(|m| loggable(m.target(), m.level()));
    let json = std::env::var("TOKENGATE_LOG_FORMAT").as_deref() == Ok("json");
    let text = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = json.then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr));
    let _ = tracing_subscriber::registry().with(filter).with(wire).with(text).with(json).try_init();
}

/// Whether a metric counts up or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution in buckets (served as `_bucket`, `_sum` and `_count`).
    Histogram(&'static [f64]),
}

/// A metric tokengate serves. Its name appears nowhere but here: code uses the handles below.
#[derive(Debug)]
pub struct Metric {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Label names, in order.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn metric(name: &'static str, kind: Kind, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric { name, kind, labels, help }
}

const MESSAGES: Metric = metric(
    "tokengate_messages_total",
    Kind::Counter,
    &["route", "outcome"],
    "messages handed to a destination: forwarded or dead_lettered",
);
const REJECTIONS: Metric =
    metric("tokengate_rejections_total", Kind::Counter, &["route", "reason"], "dead-lettered messages by reason code");
const HOLDS: Metric = metric(
    "tokengate_holds_total",
    Kind::Counter,
    &["route", "cause"],
    "times a message could not be decided (cause: keys, revocation, single_use)",
);
const HOLDING: Metric = metric(
    "tokengate_holding",
    Kind::Gauge,
    &["route"],
    "1 while the route holds a message it cannot decide or publish",
);
const IN_FLIGHT: Metric = metric(
    "tokengate_in_flight",
    Kind::Gauge,
    &["route"],
    "messages taken from the source and not yet confirmed (bounded by max_in_flight)",
);
const PUBLISH_ERRORS: Metric = metric(
    "tokengate_publish_errors_total",
    Kind::Counter,
    &["route"],
    "publishes the broker refused or did not confirm",
);
const DEAD_LETTER_STORM: Metric =
    metric("tokengate_dead_letter_storm", Kind::Gauge, &["route"], "1 while the dead-letter guard is tripped");
const BROKER_UP: Metric =
    metric("tokengate_broker_up", Kind::Gauge, &["route"], "0 while the route's source broker does not answer");
const ROUTE_FAILURES: Metric = metric(
    "tokengate_route_failures_total",
    Kind::Counter,
    &["route"],
    "unexpected ends of the route task (each restarted)",
);
const POISON_MESSAGES: Metric = metric(
    "tokengate_poison_messages_total",
    Kind::Counter,
    &["route"],
    "AMQP messages the client could not decode, dead-lettered",
);
const REVOCATION_UP: Metric = metric(
    "tokengate_revocation_up",
    Kind::Gauge,
    &[],
    "1 while the revocation list answers (1 when none is configured)",
);
const REVOCATION_LOOKUPS: Metric = metric(
    "tokengate_revocation_lookups_total",
    Kind::Counter,
    &[],
    "revocation lookups that went to Redis (cache misses)",
);
const REVOCATION_MIRRORED: Metric = metric(
    "tokengate_revocation_mirrored",
    Kind::Gauge,
    &[],
    "1 while every revocation lookup is answered from the complete local mirror",
);
const REVOCATION_MIRROR_ENTRIES: Metric = metric(
    "tokengate_revocation_mirror_entries",
    Kind::Gauge,
    &[],
    "entries in the local mirror of the revocation list",
);
const JWKS_FETCH_ERRORS: Metric =
    metric("tokengate_jwks_fetch_errors_total", Kind::Counter, &["issuer"], "failed JWKS fetches");
const JWKS_AGE: Metric = metric(
    "tokengate_jwks_age_seconds",
    Kind::Gauge,
    &["issuer"],
    "age of the issuer's last good JWKS (current at every scrape)",
);
const TRANSACTIONS: Metric = metric(
    "tokengate_transactions_total",
    Kind::Counter,
    &["route", "outcome"],
    "Kafka transactions of exactly_once routes: committed or aborted",
);
const TRANSACTION_SECONDS: Metric = metric(
    "tokengate_transaction_seconds",
    Kind::Histogram(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
    &["route"],
    "time from a committed transaction's first record to its commit",
);
const TRANSACTION_RECORDS: Metric = metric(
    "tokengate_transaction_records",
    Kind::Histogram(&[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]),
    &["route"],
    "records per committed transaction",
);

const CONSUMER_LAG: Metric = metric(
    "tokengate_consumer_lag",
    Kind::Gauge,
    &["route"],
    "Kafka routes: records behind the partitions' ends, summed over the partitions this instance owns (every 5 s)",
);
const TOKEN_CACHE: Metric = metric(
    "tokengate_token_cache_lookups_total",
    Kind::Counter,
    &["result"],
    "verified-token cache lookups: hit (decided without a signature check) or miss",
);
const TOKEN_CACHE_ENTRIES: Metric =
    metric("tokengate_token_cache_entries", Kind::Gauge, &[], "tokens in the verified-token cache");
const CONFIG_GENERATION: Metric = metric(
    "tokengate_config_generation",
    Kind::Gauge,
    &[],
    "the config generation in force: 1 at start, one more per applied reload",
);
const CONFIG_RELOADS: Metric = metric(
    "tokengate_config_reloads_total",
    Kind::Counter,
    &["outcome"],
    "live reloads (SIGHUP or a changed file): applied, or refused (the running config stays)",
);
const AUDIT_RECORDS: Metric = metric(
    "tokengate_audit_records_total",
    Kind::Counter,
    &["route", "outcome"],
    "audit records of decisions: confirmed (written) or not (failed: the message is read again)",
);

/// Metrics served only by a process with an `[audit]` destination.
pub const AUDIT_METRICS: [&Metric; 1] = [&AUDIT_RECORDS];

/// Metrics served only by a process with an `exactly_once` route.
pub const TRANSACTION_METRICS: [&Metric; 3] = [&TRANSACTIONS, &TRANSACTION_SECONDS, &TRANSACTION_RECORDS];

/// Every metric tokengate serves. Each is registered when the metrics endpoint starts, so it is
/// present from the first scrape; the README's metric table lists the same names (a test
/// compares the table with this list and with what `/metrics` serves).
pub const METRICS: [&Metric; 25] = [
    &MESSAGES,
    &REJECTIONS,
    &HOLDS,
    &HOLDING,
    &IN_FLIGHT,
    &PUBLISH_ERRORS,
    &DEAD_LETTER_STORM,
    &BROKER_UP,
    &ROUTE_FAILURES,
    &POISON_MESSAGES,
    &REVOCATION_UP,
    &REVOCATION_LOOKUPS,
    &REVOCATION_MIRRORED,
    &REVOCATION_MIRROR_ENTRIES,
    &JWKS_FETCH_ERRORS,
    &JWKS_AGE,
    &TRANSACTIONS,
    &TRANSACTION_SECONDS,
    &TRANSACTION_RECORDS,
    &AUDIT_RECORDS,
    &CONFIG_GENERATION,
    &CONFIG_RELOADS,
    &CONSUMER_LAG,
    &TOKEN_CACHE,
    &TOKEN_CACHE_ENTRIES,
];

/// Why a message is held (the `cause` label of `tokengate_holds_total`).
pub const HOLD_CAUSES: [&str; 3] = ["keys", "revocation", "single_use"];

/// Describes every metric and sets the process-wide ones to their starting values, for the
/// remote `issuers`, with the installed recorder (routes register with [`RouteMetrics::new`]).
pub fn register(issuers: &[String], revocation_up: bool) {
    for m in METRICS {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram(_) => metrics::describe_histogram!(m.name, m.help),
        }
    }
    set_revocation_up(revocation_up);
    metrics::gauge!(CONFIG_GENERATION.name).set(1.0);
    set_token_cache(0, 0, 0);
    for outcome in ["applied", "refused"] {
        metrics::counter!(CONFIG_RELOADS.name, "outcome" => outcome).increment(0);
    }
    metrics::counter!(REVOCATION_LOOKUPS.name).increment(0);
    metrics::gauge!(REVOCATION_MIRRORED.name).set(0.0);
    metrics::gauge!(REVOCATION_MIRROR_ENTRIES.name).set(0.0);
    for i in issuers {
        metrics::counter!(JWKS_FETCH_ERRORS.name, "issuer" => i.clone()).increment(0);
    }
}

/// Sets a Kafka route's consumer lag.
pub fn set_consumer_lag(route: &str, lag: i64) {
    metrics::gauge!(CONSUMER_LAG.name, "route" => route.to_owned()).set(lag as f64);
}

/// Brings the token cache's figures up to date (at every scrape).
pub fn set_token_cache(hits: u64, misses: u64, entries: u64) {
    metrics::counter!(TOKEN_CACHE.name, "result" => "hit").absolute(hits);
    metrics::counter!(TOKEN_CACHE.name, "result" => "miss").absolute(misses);
    metrics::gauge!(TOKEN_CACHE_ENTRIES.name).set(entries as f64);
}

/// Counts a reload, applied (now at `generation`) or refused.
pub fn config_reloaded(applied: Option<u64>) {
    let outcome = if applied.is_some() { "applied" } else { "refused" };
    metrics::counter!(CONFIG_RELOADS.name, "outcome" => outcome).increment(1);
    if let Some(g) = applied {
        metrics::gauge!(CONFIG_GENERATION.name).set(g as f64);
    }
}

/// Sets `tokengate_revocation_up`.
pub fn set_revocation_up(up: bool) {
    metrics::gauge!(REVOCATION_UP.name).set(f64::from(u8::from(up)));
}

/// Sets whether lookups are answered from the complete local mirror, and its size.
pub fn set_revocation_mirror(synced: bool, entries: usize) {
    metrics::gauge!(REVOCATION_MIRRORED.name).set(f64::from(u8::from(synced)));
    metrics::gauge!(REVOCATION_MIRROR_ENTRIES.name).set(entries as f64);
}

/// Counts a revocation lookup that went to Redis.
pub fn revocation_lookup() {
    metrics::counter!(REVOCATION_LOOKUPS.name).increment(1);
}

/// Brings an issuer's key set metrics up to date (at every scrape): failed fetches so far and,
/// once one succeeded, the age of the last good JWKS.
pub fn set_jwks_health(issuer: &str, age_secs: Option<u64>, fetch_errors: u64) {
    metrics::counter!(JWKS_FETCH_ERRORS.name, "issuer" => issuer.to_owned()).absolute(fetch_errors);
    if let Some(age) = age_secs {
        metrics::gauge!(JWKS_AGE.name, "issuer" => issuer.to_owned()).set(age as f64);
    }
}

/// A route's metrics, registered once (at their starting values) so the hot path is an atomic
/// add. Create it after the recorder is installed: a handle made before reports nowhere.
pub struct RouteMetrics {
    forwarded: metrics::Counter,
    dead_lettered: metrics::Counter,
    /// One per [`Reason`], in [`Reason::ALL`] order.
    rejections: Vec<metrics::Counter>,
    /// One per [`HOLD_CAUSES`] entry.
    holds: Vec<metrics::Counter>,
    holding: metrics::Gauge,
    in_flight: metrics::Gauge,
    publish_errors: metrics::Counter,
    /// `tokengate_dead_letter_storm`, set by the route's dead-letter guard.
    pub dead_letter_storm: metrics::Gauge,
    broker_up: metrics::Gauge,
    failures: metrics::Counter,
    poison: metrics::Counter,
}

impl RouteMetrics {
    /// Registers the metrics of `route` with the installed recorder.
    pub fn new(route: &str) -> RouteMetrics {
        let r = || route.to_owned();
        let messages = |outcome: &'static str| metrics::counter!(MESSAGES.name, "route" => r(), "outcome" => outcome);
        let counter = |m: &Metric| {
            let c = metrics::counter!(m.name, "route" => r());
            c.increment(0);
            c
        };
        let gauge = |m: &Metric, start: f64| {
            let g = metrics::gauge!(m.name, "route" => r());
            g.set(start);
            g
        };
        RouteMetrics {
            forwarded: messages("forwarded"),
            dead_lettered: messages("dead_lettered"),
            rejections: Reason::ALL
                .iter()
                .map(|reason| metrics::counter!(REJECTIONS.name, "route" => r(), "reason" => reason.code()))
                .collect(),
            holds: HOLD_CAUSES
                .iter()
                .map(|cause| {
                    let c = metrics::counter!(HOLDS.name, "route" => r(), "cause" => *cause);
                    c.increment(0);
                    c
                })
                .collect(),
            holding: gauge(&HOLDING, 0.0),
            in_flight: gauge(&IN_FLIGHT, 0.0),
            publish_errors: counter(&PUBLISH_ERRORS),
            dead_letter_storm: gauge(&DEAD_LETTER_STORM, 0.0),
            broker_up: gauge(&BROKER_UP, 1.0),
            failures: counter(&ROUTE_FAILURES),
            poison: counter(&POISON_MESSAGES),
        }
    }

    /// Counts one message: forwarded (`None`) or dead-lettered for `reason`.
    pub fn count(&self, rejected: Option<Reason>) {
        match rejected {
            None => self.forwarded.increment(1),
            Some(reason) => {
                self.dead_lettered.increment(1);
                self.rejections[reason as usize].increment(1);
            }
        }
    }

    /// Counts a hold of `cause` (one of [`HOLD_CAUSES`]).
    pub fn held(&self, cause: &str) {
        if let Some(i) = HOLD_CAUSES.iter().position(|c| *c == cause) {
            self.holds[i].increment(1);
        }
    }

    /// Sets `tokengate_holding`.
    pub fn set_holding(&self, on: bool) {
        self.holding.set(f64::from(u8::from(on)));
    }

    /// Sets `tokengate_in_flight`.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.set(n as f64);
    }

    /// Counts a publish the broker refused or did not confirm.
    pub fn publish_failed(&self) {
        self.publish_errors.increment(1);
    }

    /// Sets `tokengate_broker_up`.
    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.set(f64::from(u8::from(up)));
    }

    /// Counts an unexpected end of the route task.
    pub fn route_failed(&self) {
        self.failures.increment(1);
    }

    /// Counts a poison message taken off the source.
    pub fn poison_removed(&self) {
        self.poison.increment(1);
    }
}

/// An `exactly_once` route's transaction metrics.
pub struct TransactionMetrics {
    committed: metrics::Counter,
    aborted: metrics::Counter,
    seconds: metrics::Histogram,
    records: metrics::Histogram,
}

impl TransactionMetrics {
    /// Registers the transaction metrics of `route` with the installed recorder.
    pub fn new(route: &str) -> TransactionMetrics {
        let outcome = |o: &'static str| {
            let c = metrics::counter!(TRANSACTIONS.name, "route" => route.to_owned(), "outcome" => o);
            c.increment(0);
            c
        };
        TransactionMetrics {
            committed: outcome("committed"),
            aborted: outcome("aborted"),
            seconds: metrics::histogram!(TRANSACTION_SECONDS.name, "route" => route.to_owned()),
            records: metrics::histogram!(TRANSACTION_RECORDS.name, "route" => route.to_owned()),
        }
    }

    /// Counts a committed transaction of `records` records that was open for `took`.
    pub fn committed(&self, records: usize, took: std::time::Duration) {
        self.committed.increment(1);
        self.seconds.record(took.as_secs_f64());
        self.records.record(records as f64);
    }

    /// Counts an aborted transaction.
    pub fn aborted(&self) {
        self.aborted.increment(1);
    }
}

/// A route's audit trail metrics.
#[derive(Clone)]
pub struct AuditMetrics {
    written: metrics::Counter,
    failed: metrics::Counter,
}

impl AuditMetrics {
    /// Registers the audit metrics of `route` with the installed recorder.
    pub fn new(route: &str) -> AuditMetrics {
        let outcome = |o: &'static str| {
            let c = metrics::counter!(AUDIT_RECORDS.name, "route" => route.to_owned(), "outcome" => o);
            c.increment(0);
            c
        };
        AuditMetrics { written: outcome("written"), failed: outcome("failed") }
    }

    /// Counts a confirmed record, or one that was not.
    pub fn record(&self, confirmed: bool) {
        if confirmed { &self.written } else { &self.failed }.increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_loggers_stop_at_info_and_message_loggers_are_silent() {
        use tracing::Level;
        assert!(loggable("tokengate::gate", &Level::TRACE));
        assert!(loggable("lapin::channel", &Level::INFO));
        assert!(!loggable("lapin::channel", &Level::DEBUG), "frames with the broker password");
        assert!(!loggable("redis::aio", &Level::TRACE));
        for level in [Level::ERROR, Level::WARN, Level::INFO] {
            assert!(!loggable("lapin::returned_messages", &level), "a returned message's headers may hold a token");
        }
    }
}
