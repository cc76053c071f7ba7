//! `tokengate run`: wires settings into a gate, routes, the admin endpoint and shutdown; and
//! `tokengate demo`, the same pipeline on an embedded Kafka.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::config::{AuditSettings, Settings, SinkSettings, SourceSettings};
use crate::gate::Gate;
use crate::pipeline::{Route, RouteStatus};
use crate::revocation::Revocations;
use crate::single_use::Uses;
use crate::sink::{Sink, kafka::KafkaSink};
use crate::source;
use crate::verify::Verifier;

/// Builds the gate: starts the verifier (first JWKS fetch, periodic refresh) and the
/// revocation list. `revocations` overrides the `[redis]` section (the demo's in-memory list).
pub async fn build_gate(
    settings: &mut Settings,
    revocations: Option<Arc<Revocations>>,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<Gate>> {
    let verifier = Arc::new(Verifier::new(std::mem::take(&mut settings.issuers), &settings.cache));
    for e in verifier.start().await {
        tracing::error!(issuer = %e.issuer, detail = %e.detail, "keys unavailable at start; its tokens hold until they load");
    }
    verifier.spawn_refresh(cancel.clone());
    let on_unavailable = settings.redis.as_ref().map(|r| r.on_unavailable).unwrap_or_default();
    let revocations = match (revocations, &settings.redis) {
        (Some(r), _) => Some(r),
        (None, Some(rc)) => {
            let list =
                Arc::new(Revocations::redis(rc.info.clone(), &rc.prefix, rc.mirror_max_entries, cancel.clone())?);
            if !list.wait_up(Duration::from_secs(5)).await {
                tracing::error!("Redis unreachable at start; messages hold until it answers");
            }
            Some(list)
        }
        (None, None) => {
            tracing::warn!("no [redis] section: tokens are NOT checked against a revocation list");
            None
        }
    };
    let mut gate = Gate::new(verifier, revocations, on_unavailable);
    if settings.audit.is_some() {
        gate = gate.audited();
    }
    let single_use = settings.routes.iter().any(|r| r.rules.single_use);
    Ok(Arc::new(match (&settings.redis, single_use) {
        (Some(rc), true) => gate.with_single_use(Arc::new(Uses::redis(rc.info.clone(), &rc.prefix)?)),
        (None, true) => gate.with_single_use(Arc::new(Uses::in_memory(crate::revocation::DEFAULT_PREFIX))),
        (_, false) => gate,
    }))
}

fn build_sink(sink: &SinkSettings) -> anyhow::Result<Sink> {
    Ok(match sink {
        SinkSettings::Kafka { config, topic } => Sink::Kafka(KafkaSink::new(config.clone(), topic)?),
        SinkSettings::Amqp { url, exchange, routing_key } => {
            Sink::Amqp(crate::sink::amqp::AmqpSink::new(url, exchange, routing_key.clone()))
        }
    })
}

fn build_audit(a: &AuditSettings, instance: Option<String>) -> anyhow::Result<Audit> {
    Ok(match a {
        AuditSettings::Broker(sink) => Audit::broker(build_sink(sink)?, instance),
        AuditSettings::File(f) => Audit::file(f, instance).with_context(|| format!("{}", f.path.display()))?,
    })
}

/// Runs every route that has a source until `cancel`, then drains and commits.
pub async fn run_routes(settings: &Settings, gate: Arc<Gate>, cancel: CancellationToken) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let drain = settings.shutdown_timeout;
    // Before any route registers its counters, so that they report to the endpoint.
    let recorder = settings.admin_listen.and_then(|_| crate::admin::install_metrics());
    if recorder.is_some() {
        let remote: Vec<String> = gate.verifier().health().await.into_iter().map(|k| k.issuer).collect();
        crate::telemetry::register(&remote, gate.revocation_up());
    }
    let audit = match &settings.audit {
        Some(a) => {
            let audit = Arc::new(build_audit(a, settings.instance_id.clone()).context("audit")?);
            tracing::info!(destination = %audit.describe(), "audit trail on: every decision is recorded before its ack");
            Some(audit)
        }
        None => None,
    };
    let mut statuses = Vec::new();
    // The first route that failed for good: the process shuts down and exits with its error.
    let fatal: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Arc::default();
    for rs in &settings.routes {
        let Some(io) = &rs.io else { continue };
        let name = &rs.rules.name;
        let status = Arc::new(RouteStatus::default());
        statuses.push((name.clone(), Arc::clone(&status)));
        let (trusted, dead_letter) = match (&io.exactly_once, &io.trusted, &io.dead_letter) {
            (
                Some(eo),
                SinkSettings::Kafka { config, topic: trusted },
                SinkSettings::Kafka { topic: dead_letter, .. },
            ) => {
                let (t, d) = KafkaSink::transactional(config.clone(), &eo.transactional_id, trusted, dead_letter)
                    .with_context(|| format!("routes.{name}.trusted"))?;
                (Sink::Kafka(t), Sink::Kafka(d))
            }
            _ => (
                build_sink(&io.trusted).with_context(|| format!("routes.{name}.trusted"))?,
                build_sink(&io.dead_letter).with_context(|| format!("routes.{name}.dead_letter"))?,
            ),
        };
        let route = Arc::new(Route {
            rules: rs.rules.clone(),
            gate: Arc::clone(&gate),
            trusted,
            dead_letter,
            max_in_flight: io.max_in_flight,
            guard: io.guard.clone(),
            status,
            metrics: crate::telemetry::RouteMetrics::new(name),
            audit: audit.as_ref().map(|a| (Arc::clone(a), crate::telemetry::AuditMetrics::new(name))),
        });
        let supervised_route = Arc::clone(&route);
        let c = cancel.clone();
        let start: StartRoute = match &io.source {
            SourceSettings::Kafka(k) => match io.exactly_once.clone() {
                Some(eo) => {
                    let k = k.clone();
                    Box::new(move || {
                        Box::pin(source::transaction::run(Arc::clone(&route), k.clone(), eo.clone(), c.clone(), drain))
                    })
                }
                None => {
                    let k = k.clone();
                    Box::new(move || Box::pin(source::kafka::run(Arc::clone(&route), k.clone(), c.clone(), drain)))
                }
            },
            SourceSettings::Amqp(a) => {
                let a = Arc::clone(a);
                Box::new(move || Box::pin(source::amqp::run(Arc::clone(&route), Arc::clone(&a), c.clone(), drain)))
            }
        };
        tasks.spawn(supervised(supervised_route, cancel.clone(), fatal.clone(), settings.max_route_failures, start));
    }
    anyhow::ensure!(!statuses.is_empty(), "no route has a source, trusted and dead_letter: nothing to run");
    if let Some(listen) = settings.admin_listen {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("admin.listen {listen}"))?;
        tracing::info!(%listen, "admin endpoint: /health /ready /metrics");
        let jwks = settings.attester.as_ref().map(|a| Arc::new(a.jwks()));
        let state = crate::admin::AdminState { routes: statuses, gate, metrics: recorder, jwks };
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::admin::serve(listener, state, cancel).await {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    tasks.close();
    cancel.cancelled().await;
    tracing::info!(deadline_secs = drain.as_secs(), "shutting down: intake stopped, draining in-flight messages");
    if tokio::time::timeout(drain + Duration::from_secs(5), tasks.wait()).await.is_err() {
        tracing::error!("shutdown deadline passed; unconfirmed messages will be read again on restart");
    }
    if let Some(a) = &audit {
        a.sync();
    }
    match fatal.lock().expect("not poisoned").take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Starts one run of a route task (called again for each restart).
type StartRoute = Box<dyn FnMut() -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + Send>;

/// A route task under [`source::supervise`]; a route that fails for good stops the process.
async fn supervised<F, Fut>(
    route: Arc<Route>,
    cancel: CancellationToken,
    fatal: Arc<std::sync::Mutex<Option<anyhow::Error>>>,
    max_failures: u32,
    start: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    if let Err(e) =
        source::supervise(&route.rules.name, &route.status, &route.metrics, &cancel, max_failures, start).await
    {
        fatal.lock().expect("not poisoned").get_or_insert(e);
        cancel.cancel();
    }
}

/// `tokengate run`: the daemon, until SIGINT or SIGTERM.
pub async fn run(mut settings: Settings) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received");
        signals.cancel();
    });
    let gate = build_gate(&mut settings, None, &cancel).await?;
    run_routes(&settings, gate, cancel).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
