//! Logs and per-message metrics. Logs go to stderr (`RUST_LOG` filters,
//! `TOKENGATE_LOG_FORMAT=json` for JSON lines). The README lists every metric.

use tracing_subscriber::EnvFilter;

use crate::verify::Reason;

/// Third-party clients that log wire frames at debug and trace: connection handshakes with the
/// broker password (lapin, amq-protocol) and message headers with bearer tokens. They never log
/// below `info`, whatever `RUST_LOG` asks for.
const WIRE_LOGGERS: &[&str] = &["lapin", "amq_protocol", "pinky_swear", "redis", "reqwest", "hyper", "h2", "rustls"];

/// Whether an event may be logged at all: wire-level clients never below `info`.
pub fn loggable(target: &str, level: &tracing::Level) -> bool {
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
}

/// Every metric tokengate serves: name, kind, labels, help. Each is registered when the metrics
/// endpoint starts, so it is present from the first scrape; the README's metric table lists the
/// same names (a test compares the table with what `/metrics` serves).
pub const METRICS: &[(&str, Kind, &str, &str)] = &[
    (
        "tokengate_messages_total",
        Kind::Counter,
        "route, outcome",
        "messages handed to a destination: forwarded or dead_lettered",
    ),
    ("tokengate_rejections_total", Kind::Counter, "route, reason", "dead-lettered messages by reason code"),
    (
        "tokengate_holds_total",
        Kind::Counter,
        "route, cause",
        "times a message could not be decided (cause: keys, revocation)",
    ),
    ("tokengate_holding", Kind::Gauge, "route", "1 while the route holds a message it cannot decide or publish"),
    (
        "tokengate_in_flight",
        Kind::Gauge,
        "route",
        "messages taken from the source and not yet confirmed (Kafka routes)",
    ),
    ("tokengate_publish_errors_total", Kind::Counter, "route", "publishes the broker refused or did not confirm"),
    ("tokengate_dead_letter_storm", Kind::Gauge, "route", "1 while the dead-letter guard is tripped"),
    ("tokengate_broker_up", Kind::Gauge, "route", "0 while the route's source broker does not answer"),
    ("tokengate_route_failures_total", Kind::Counter, "route", "unexpected ends of the route task (each restarted)"),
    (
        "tokengate_poison_messages_total",
        Kind::Counter,
        "route",
        "AMQP messages the client could not decode, dead-lettered",
    ),
    ("tokengate_revocation_up", Kind::Gauge, "", "1 while the revocation list answers (1 when none is configured)"),
    ("tokengate_revocation_lookups_total", Kind::Counter, "", "revocation lookups that went to Redis (cache misses)"),
    ("tokengate_jwks_fetch_errors_total", Kind::Counter, "issuer", "failed JWKS fetches"),
    (
        "tokengate_jwks_age_seconds",
        Kind::Gauge,
        "issuer",
        "age of the issuer's last good JWKS (current at every scrape)",
    ),
];

/// Registers every metric of [`METRICS`] at its starting value, for `routes` and the remote
/// `issuers`, with the installed recorder.
pub fn register(routes: &[String], issuers: &[String], revocation_up: bool) {
    for (name, kind, _, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
        }
    }
    for r in routes {
        let route = || r.clone();
        for cause in ["keys", "revocation"] {
            metrics::counter!("tokengate_holds_total", "route" => route(), "cause" => cause).increment(0);
        }
        for name in
            ["tokengate_publish_errors_total", "tokengate_route_failures_total", "tokengate_poison_messages_total"]
        {
            metrics::counter!(name, "route" => route()).increment(0);
        }
        for (name, value) in [
            ("tokengate_holding", 0.0),
            ("tokengate_in_flight", 0.0),
            ("tokengate_dead_letter_storm", 0.0),
            ("tokengate_broker_up", 1.0),
        ] {
            metrics::gauge!(name, "route" => route()).set(value);
        }
    }
    metrics::gauge!("tokengate_revocation_up").set(f64::from(u8::from(revocation_up)));
    metrics::counter!("tokengate_revocation_lookups_total").increment(0);
    for i in issuers {
        metrics::counter!("tokengate_jwks_fetch_errors_total", "issuer" => i.clone()).increment(0);
    }
}

/// A route's per-message counters, registered once so the hot path is an atomic add.
pub struct RouteMetrics {
    forwarded: metrics::Counter,
    dead_lettered: metrics::Counter,
    /// One per [`Reason`], in [`Reason::ALL`] order.
    rejections: Vec<metrics::Counter>,
}

impl RouteMetrics {
    /// Registers the counters of `route` with the installed recorder (install it first).
    pub fn new(route: &str) -> RouteMetrics {
        let messages = |outcome: &'static str| metrics::counter!("tokengate_messages_total", "route" => route.to_owned(), "outcome" => outcome);
        RouteMetrics {
            forwarded: messages("forwarded"),
            dead_lettered: messages("dead_lettered"),
            rejections: Reason::ALL
                .iter()
                .map(|r| metrics::counter!("tokengate_rejections_total", "route" => route.to_owned(), "reason" => r.code()))
                .collect(),
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
}
