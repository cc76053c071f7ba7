//! Logs and metrics. Logs go to stderr (`RUST_LOG` filters, `TOKENGATE_LOG_FORMAT=json` for
//! JSON lines); metric names live here so they are documented in one place.

use tracing_subscriber::EnvFilter;

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
