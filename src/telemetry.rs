//! Logs and per-message metrics. Logs go to stderr (`RUST_LOG` filters,
//! `TOKENGATE_LOG_FORMAT=json` for JSON lines). The README lists every metric.

use tracing_subscriber::EnvFilter;

use crate::gate::Outcome;
use crate::verify::Reason;

/// Starts logging to stderr; the default level is `info`.
pub fn init_logs() {
    // librdkafka reports every reconnect attempt; warn keeps its real problems visible.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if std::env::var("TOKENGATE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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

    /// Counts one decided message.
    pub fn record(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Forward(_) => self.forwarded.increment(1),
            Outcome::DeadLetter(_, r) => {
                self.dead_lettered.increment(1);
                self.rejections[r.reason as usize].increment(1);
            }
        }
    }
}
