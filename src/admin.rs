//! The admin endpoint: `/health` (the process is alive), `/ready` (every route is making
//! progress, the revocation list answers, every key set was loaded), `/metrics` (Prometheus),
//! `/.well-known/jwks.json` (the public keys of the gate's attestations, when it signs any).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};

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

/// The routes running: name and live status.
pub type Running = Vec<(String, Arc<RouteStatus>)>;

/// What a process has in force, swapped by a live reload: the routes read the gate from here,
/// the endpoint reports on all of it.
#[derive(Clone)]
pub struct Live {
    /// The gate (keys, revocation list, single-use records).
    pub gate: Arc<ArcSwap<Gate>>,
    /// Route name and live status, of the routes running.
    pub routes: Arc<ArcSwap<Running>>,
    /// The public keys of the gate's attestation signer, as a JWKS.
    pub jwks: Arc<ArcSwapOption<serde_json::Value>>,
    /// The config generation in force: 1 at start, one more per applied reload.
    pub generation: Arc<AtomicU64>,
}

impl Live {
    /// Generation 1, with no route yet.
    pub fn new(gate: Arc<Gate>, jwks: Option<Arc<serde_json::Value>>) -> Live {
        Live {
            gate: Arc::new(ArcSwap::new(gate)),
            routes: Arc::default(),
            jwks: Arc::new(ArcSwapOption::new(jwks)),
            generation: Arc::new(AtomicU64::new(1)),
        }
    }
}

/// What the endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    /// What is in force.
    pub live: Live,
    /// Renders metrics.
    pub metrics: Option<PrometheusHandle>,
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
    let keys = s.live.gate.load().verifier().health().await;
    for k in &keys {
        crate::telemetry::set_jwks_health(&k.issuer, k.age_secs, k.fetch_errors);
    }
    keys
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let keys = key_health(&s).await;
    let keys_ok = keys.iter().all(|k| k.age_secs.is_some());
    let revocation_up = s.live.gate.load().revocation_up();
    let running = s.live.routes.load();
    let routes: Vec<_> = running
        .iter()
        .map(|(name, st)| {
            json!({
                "route": name,
                "ready": st.ready(),
                "running": st.running.load(Ordering::Relaxed),
                "holding": st.holding.load(Ordering::Relaxed),
                "paused": st.paused.load(Ordering::Relaxed),
                "broker_up": !st.broker_down.load(Ordering::Relaxed),
                "failed": st.failure(),
            })
        })
        .collect();
    let ready = keys_ok && revocation_up && running.iter().all(|(_, st)| st.ready());
    let generation = s.live.generation.load(Ordering::Relaxed);
    let body = json!({"ready": ready, "config_generation": generation, "revocation_list_up": revocation_up, "keys": keys, "routes": routes});
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body))
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    // Current at every scrape, not only when /ready was asked.
    key_health(&s).await;
    let gate = s.live.gate.load();
    crate::telemetry::set_revocation_up(gate.revocation_up());
    let (hits, misses) = crate::verify::cache::lookups();
    crate::telemetry::set_token_cache(hits, misses, gate.verifier().cached_tokens());
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed in this process\n".to_owned()),
    }
}

/// The gate's attestation keys (404 when it signs none). Cacheable for a minute: a new key is
/// published before it becomes active, so consumers see it in time.
async fn jwks(State(s): State<AdminState>) -> axum::response::Response {
    match &*s.live.jwks.load() {
        Some(keys) => {
            ([(axum::http::header::CACHE_CONTROL, "max-age=60")], axum::Json((**keys).clone())).into_response()
        }
        None => (StatusCode::NOT_FOUND, "this gate signs no attestations ([attestation] is not configured)\n")
            .into_response(),
    }
}
