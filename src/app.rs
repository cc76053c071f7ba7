//! Wiring settings into a gate, routes and the admin endpoint, and draining them at shutdown:
//! for `tokengate run` ([`crate::reload::run`]), `tokengate demo` and the tests.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::config::{AuditSettings, RouteSettings, Settings, SinkSettings, SourceSettings};
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
    let verifier = start_verifier(settings, cancel).await;
    for e in verifier.1 {
        tracing::error!(issuer = %e.issuer, detail = %e.detail, "keys unavailable at start; its tokens hold until they load");
    }
    let revocations = match revocations {
        Some(r) => Some(r),
        None => connect_revocations(settings, cancel).await?,
    };
    assemble_gate(settings, verifier.0, revocations)
}

/// The verifier of `settings`' issuers (taken from it), its keys loaded and first JWKS fetched,
/// refreshing until `cancel`; with the issuers whose keys could not be loaded.
pub async fn start_verifier(
    settings: &mut Settings,
    cancel: &CancellationToken,
) -> (Arc<Verifier>, Vec<crate::verify::KeysUnavailable>) {
    let verifier = Arc::new(Verifier::new(std::mem::take(&mut settings.issuers), &settings.cache));
    let errors = verifier.start().await;
    verifier.spawn_refresh(cancel.clone());
    (verifier, errors)
}

/// The revocation list of `[redis]`, connecting (and reconnecting until `cancel`).
pub async fn connect_revocations(
    settings: &Settings,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Arc<Revocations>>> {
    let Some(rc) = &settings.redis else {
        tracing::warn!("no [redis] section: tokens are NOT checked against a revocation list");
        return Ok(None);
    };
    let list = Arc::new(Revocations::redis(rc.info.clone(), &rc.prefix, rc.mirror_max_entries, cancel.clone())?);
    if !list.wait_up(Duration::from_secs(5)).await {
        tracing::error!("Redis unreachable at start; messages hold until it answers");
    }
    Ok(Some(list))
}

/// The gate of `settings` around a started verifier and revocation list.
pub fn assemble_gate(
    settings: &Settings,
    verifier: Arc<Verifier>,
    revocations: Option<Arc<Revocations>>,
) -> anyhow::Result<Arc<Gate>> {
    let on_unavailable = settings.redis.as_ref().map(|r| r.on_unavailable).unwrap_or_default();
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

fn build_audit(settings: &Settings) -> anyhow::Result<Option<Arc<Audit>>> {
    let instance = settings.instance_id.clone();
    let audit = match &settings.audit {
        None => return Ok(None),
        Some(AuditSettings::Broker(sink)) => Audit::broker(build_sink(sink).context("audit")?, instance),
        Some(AuditSettings::File(f)) => {
            Audit::file(f, instance).with_context(|| format!("audit.file.path {}", f.path.display()))?
        }
    };
    tracing::info!(destination = %audit.describe(), "audit trail on: every decision is recorded before its ack");
    Ok(Some(Arc::new(audit)))
}

/// Runs every route that has a source until `cancel`, then drains and commits.
pub async fn run_routes(settings: &Settings, gate: Arc<Gate>, cancel: CancellationToken) -> anyhow::Result<()> {
    let routes = Routes::start(settings, gate, cancel.clone()).await?;
    cancel.cancelled().await;
    routes.finish().await
}

/// A running route: what it was started from, its own stop, its task.
struct RouteTask {
    digest: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The routes of a process and what they share: the gate in force (swapped by a reload), the
/// admin endpoint's view of them, the audit trail.
pub struct Routes {
    live: crate::admin::Live,
    tasks: std::collections::BTreeMap<String, RouteTask>,
    /// The process: cancelled on a signal or when a route fails for good.
    cancel: CancellationToken,
    /// The first route that failed for good: the process shuts down and exits with its error.
    fatal: Arc<std::sync::Mutex<Option<anyhow::Error>>>,
    admin: Option<tokio::task::JoinHandle<()>>,
    audit: Option<Arc<Audit>>,
    drain: Duration,
    max_failures: u32,
}

impl Routes {
    /// Starts the admin endpoint and every route that has a source.
    pub async fn start(settings: &Settings, gate: Arc<Gate>, cancel: CancellationToken) -> anyhow::Result<Routes> {
        // Before any route registers its counters, so that they report to the endpoint.
        let recorder = settings.admin_listen.and_then(|_| crate::admin::install_metrics());
        if recorder.is_some() {
            let remote: Vec<String> = gate.verifier().health().await.into_iter().map(|k| k.issuer).collect();
            crate::telemetry::register(&remote, gate.revocation_up());
        }
        let live = crate::admin::Live::new(gate, settings.attester.as_ref().map(|a| Arc::new(a.jwks())));
        let mut routes = Routes {
            live: live.clone(),
            tasks: Default::default(),
            cancel: cancel.clone(),
            fatal: Arc::default(),
            admin: None,
            audit: build_audit(settings)?,
            drain: settings.shutdown_timeout,
            max_failures: settings.max_route_failures,
        };
        for rs in &settings.routes {
            routes.spawn_route(rs)?;
        }
        anyhow::ensure!(!routes.tasks.is_empty(), "no route has a source, trusted and dead_letter: nothing to run");
        if let Some(listen) = settings.admin_listen {
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("admin.listen {listen}"))?;
            tracing::info!(%listen, "admin endpoint: /health /ready /metrics");
            let state = crate::admin::AdminState { live, metrics: recorder };
            routes.admin = Some(tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(listener, state, cancel).await {
                    tracing::error!(error = %e, "admin endpoint failed");
                }
            }));
        }
        Ok(routes)
    }

    /// What is in force.
    pub fn live(&self) -> &crate::admin::Live {
        &self.live
    }

    /// The gate in force.
    pub fn gate(&self) -> Arc<Gate> {
        self.live.gate.load_full()
    }

    /// Puts `new` in force with `gate`: routes removed or changed drain and commit what is in
    /// flight and stop, then changed and added ones start with the new settings; unchanged
    /// routes keep running and decide with the new gate from their next message.
    pub async fn apply(&mut self, new: &Settings, gate: Arc<Gate>) -> anyhow::Result<()> {
        let wanted: std::collections::BTreeMap<&str, &RouteSettings> =
            new.routes.iter().filter(|r| r.io.is_some()).map(|r| (r.rules.name.as_str(), r)).collect();
        anyhow::ensure!(!wanted.is_empty(), "no route has a source, trusted and dead_letter: nothing to run");
        let stale: Vec<String> = self
            .tasks
            .iter()
            .filter(|(name, t)| wanted.get(name.as_str()).is_none_or(|r| r.digest != t.digest))
            .map(|(name, _)| name.clone())
            .collect();
        self.audit = build_audit(new)?;
        for name in &stale {
            self.stop_route(name).await;
        }
        self.live.gate.store(gate);
        self.live.jwks.store(new.attester.as_ref().map(|a| Arc::new(a.jwks())));
        for (name, rs) in wanted {
            if !self.tasks.contains_key(name) {
                self.spawn_route(rs)?;
                tracing::info!(route = %name, "route started with the reloaded config");
            }
        }
        Ok(())
    }

    /// Stops one route: intake stops, what is in flight drains and is committed (bounded by
    /// the shutdown deadline).
    async fn stop_route(&mut self, name: &str) {
        let Some(t) = self.tasks.remove(name) else { return };
        t.stop.cancel();
        if tokio::time::timeout(self.drain + Duration::from_secs(5), t.task).await.is_err() {
            tracing::error!(
                route = name,
                "route did not stop within the shutdown deadline; unconfirmed messages will be read again"
            );
        }
        self.live.routes.rcu(|rs| rs.iter().filter(|(n, _)| n != name).cloned().collect::<Vec<_>>());
        tracing::info!(route = %name, "route stopped for the reloaded config");
    }

    fn spawn_route(&mut self, rs: &RouteSettings) -> anyhow::Result<()> {
        let Some(io) = &rs.io else { return Ok(()) };
        let name = &rs.rules.name;
        let status = Arc::new(RouteStatus::default());
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
            gate: Arc::clone(&self.live.gate),
            trusted,
            dead_letter,
            max_in_flight: io.max_in_flight,
            guard: io.guard.clone(),
            status: Arc::clone(&status),
            metrics: crate::telemetry::RouteMetrics::new(name),
            audit: self.audit.as_ref().map(|a| (Arc::clone(a), crate::telemetry::AuditMetrics::new(name))),
        });
        let supervised_route = Arc::clone(&route);
        let stop = self.cancel.child_token();
        let (c, drain) = (stop.clone(), self.drain);
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
        let task = tokio::spawn(supervised(
            supervised_route,
            stop.clone(),
            self.cancel.clone(),
            self.fatal.clone(),
            self.max_failures,
            start,
        ));
        self.live.routes.rcu(|rs| {
            let mut rs = (**rs).clone();
            rs.push((name.clone(), Arc::clone(&status)));
            rs
        });
        self.tasks.insert(name.clone(), RouteTask { digest: rs.digest.clone(), stop, task });
        Ok(())
    }

    /// After the process was cancelled: waits for every route to drain and commit (bounded by
    /// the shutdown deadline); the error of a route that failed for good, if one did.
    pub async fn finish(self) -> anyhow::Result<()> {
        tracing::info!(
            deadline_secs = self.drain.as_secs(),
            "shutting down: intake stopped, draining in-flight messages"
        );
        let all = futures_util::future::join_all(self.tasks.into_values().map(|t| t.task));
        if tokio::time::timeout(self.drain + Duration::from_secs(5), all).await.is_err() {
            tracing::error!("shutdown deadline passed; unconfirmed messages will be read again on restart");
        }
        if let Some(a) = &self.audit {
            a.sync();
        }
        if let Some(admin) = self.admin {
            let _ = admin.await;
        }
        match self.fatal.lock().expect("not poisoned").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Starts one run of a route task (called again for each restart).
type StartRoute = Box<dyn FnMut() -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + Send>;

/// A route task under [`source::supervise`]; a route that fails for good stops the process.
async fn supervised<F, Fut>(
    route: Arc<Route>,
    stop: CancellationToken,
    process: CancellationToken,
    fatal: Arc<std::sync::Mutex<Option<anyhow::Error>>>,
    max_failures: u32,
    start: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    if let Err(e) =
        source::supervise(&route.rules.name, &route.status, &route.metrics, &stop, max_failures, start).await
    {
        fatal.lock().expect("not poisoned").get_or_insert(e);
        process.cancel();
    }
}
