//! Logs and per-message metrics. Logs go to stderr (`RUST_LOG` filters,
//! `TOKENGATE_LOG_FORMAT=json` for JSON lines). The README lists every metric.

use tracing_subscriber::EnvFilter;

use crate::verify::Reason;

/// Third-party clients that log wire frames at debug and trace: connection handshakes with the
/// broker password (lapin, amq-protocol) and message headers with bearer tokens. They never log
/// below `info`, whatever `RUST_LOG` asks for.
const WIRE_LOGGERS: &[&str] = &["lapin", "amq_protocol", "pinky_swear", "redis", "reqwest", "hyper", "h2", "rustls"];

/// Whether an event may be logged at all (see [`WIRE_LOGGERS`]).
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
