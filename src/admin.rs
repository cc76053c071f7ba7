//! The admin endpoint: `/health` (the process is alive), `/ready` (every route is making
//! progress, the revocation list answers, every key set was loaded), `/metrics` (Prometheus),
//! `/.well-known/jwks.json` (the public keys of the gate's attestations, when it signs any).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;
use crate::pipeline::RouteStatus;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    /// Route name and live status.
    pub routes: Vec<(String, Arc<RouteStatus>)>,
    /// The gate (key health, revocation list).
    pub gate: Arc<Gate>,
    /// Renders metrics.
    pub metrics: Option<PrometheusHandle>,
    /// The public keys of the gate's attestation signer, as a JWKS.
    pub jwks: Option<Arc<serde_json::Value>>,
}

/// Installs the Prometheus recorder once per process; later calls get `None`.
pub fn install_metrics() -> Option<PrometheusHandle> {
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    for m in crate::telemetry::METRICS {
        if let crate::telemetry::Kind::Histogram(buckets) = m.kind {
            builder = builder
                .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(m.name.to_owned()), buckets)
                .ok()?;
        }
    }
    builder.install_recorder().ok()
}

/// Serves the endpoint on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await
}

/// The key sets' health, with their metrics brought up to date.
async fn key_health(s: &AdminState) -> Vec<crate::verify::KeyHealth> {
    let keys = s.gate.verifier().health().await;
    for k in &keys {
        crate::telemetry::set_jwks_health(&k.issuer, k.age_secs, k.fetch_errors);
    }
    keys
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let keys = key_health(&s).await;
    let keys_ok = keys.iter().all(|k| k.age_secs.is_some());
    let revocation_up = s.gate.revocation_up();
    let routes: Vec<_> = s
        .routes
        .iter()
        .map(|(name, st)| {
            json!({
                "route": name,
                "ready": st.ready(),
                "running": st.running.load(std::sync::atomic::Ordering::Relaxed),
                "holding": st.holding.load(std::sync::atomic::Ordering::Relaxed),
                "paused": st.paused.load(std::sync::atomic::Ordering::Relaxed),
                "broker_up": !st.broker_down.load(std::sync::atomic::Ordering::Relaxed),
                "failed": st.failure(),
            })
        })
        .collect();
    let ready = keys_ok && revocation_up && s.routes.iter().all(|(_, st)| st.ready());
    let body = json!({"ready": ready, "revocation_list_up": revocation_up, "keys": keys, "routes": routes});
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body))
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    // Current at every scrape, not only when /ready was asked.
    key_health(&s).await;
    crate::telemetry::set_revocation_up(s.gate.revocation_up());
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed in this process\n".to_owned()),
    }
}

/// The gate's attestation keys (404 when it signs none). Cacheable for a minute: a new key is
/// published before it becomes active, so consumers see it in time.
async fn jwks(State(s): State<AdminState>) -> axum::response::Response {
    match &s.jwks {
        Some(keys) => {
            ([(axum::http::header::CACHE_CONTROL, "max-age=60")], axum::Json((**keys).clone())).into_response()
        }
        None => (StatusCode::NOT_FOUND, "this gate signs no attestations ([attestation] is not configured)\n")
            .into_response(),
    }
}
