//! `tokengate run`: wires settings into a gate, routes, the admin endpoint and shutdown; and
//! `tokengate demo`, the same pipeline on an embedded Kafka.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Settings, SinkConfig, SourceConfig};
use crate::gate::Gate;
use crate::pipeline::{Route, RouteStatus};
use crate::revocation::{self, Revocations};
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
    let on_unavailable = settings.raw.redis.as_ref().map(|r| r.on_unavailable).unwrap_or_default();
    let revocations = match (revocations, &settings.raw.redis) {
        (Some(r), _) => Some(r),
        (None, Some(rc)) => {
            let password =
                rc.password.as_ref().map(|s| s.resolve(&settings.base)).transpose().map_err(anyhow::Error::msg)?;
            let password = password.map(|p| String::from_utf8_lossy(&p).into_owned());
            let info = revocation::connection_info(&rc.url, password.as_deref()).context("redis.url")?;
            let list = Arc::new(Revocations::redis(info, &rc.prefix, cancel.clone())?);
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
    Ok(Arc::new(Gate::new(verifier, revocations, on_unavailable)))
}

fn kafka_properties(settings: &Settings, cluster: &str) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let c = settings.raw.kafka.get(cluster).with_context(|| format!("no kafka cluster {cluster}"))?;
    let mut props: Vec<(String, String)> = c.properties.clone().into_iter().collect();
    for (k, secret) in &c.secret_properties {
        let v = secret.resolve(&settings.base).map_err(anyhow::Error::msg)?;
        props.push((k.clone(), String::from_utf8(v).context("secret property is not UTF-8")?));
    }
    Ok((c.bootstrap_servers.clone(), props))
}

/// The broker URL with its password (kept out of the config file) filled in.
fn amqp_url(settings: &Settings, broker: &str) -> anyhow::Result<String> {
    let b = settings.raw.amqp.get(broker).with_context(|| format!("no amqp broker {broker}"))?;
    let Some(secret) = &b.password else { return Ok(b.url.clone()) };
    let password = secret.resolve(&settings.base).map_err(anyhow::Error::msg)?;
    let mut url = url::Url::parse(&b.url).with_context(|| format!("amqp.{broker}.url"))?;
    url.set_password(Some(&String::from_utf8_lossy(&password)))
        .map_err(|()| anyhow::anyhow!("amqp.{broker}.url cannot carry a password"))?;
    Ok(url.to_string())
}

/// A queue argument from TOML.
fn amqp_value(v: &toml::Value) -> anyhow::Result<lapin::types::AMQPValue> {
    use lapin::types::AMQPValue;
    Ok(match v {
        toml::Value::String(s) => AMQPValue::LongString(s.as_bytes().to_vec().into()),
        toml::Value::Integer(i) => AMQPValue::LongLongInt(*i),
        toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
        toml::Value::Float(f) => AMQPValue::Double(*f),
        other => anyhow::bail!("unsupported queue argument type: {other}"),
    })
}

fn build_sink(settings: &Settings, sink: &SinkConfig) -> anyhow::Result<Sink> {
    match sink {
        SinkConfig::Kafka(k) => {
            let (bootstrap, props) = kafka_properties(settings, &k.cluster)?;
            let extra: Vec<_> = k.properties.clone().into_iter().collect();
            let config = crate::sink::kafka::client_config(&bootstrap, &props, &extra);
            Ok(Sink::Kafka(KafkaSink::new(config, &k.topic)?))
        }
        SinkConfig::Amqp(a) => {
            let url = amqp_url(settings, &a.broker)?;
            Ok(Sink::Amqp(crate::sink::amqp::AmqpSink::new(&url, &a.exchange, a.routing_key.clone())))
        }
    }
}

/// Runs every route that has a source until `cancel`, then drains and commits.
pub async fn run_routes(settings: &Settings, gate: Arc<Gate>, cancel: CancellationToken) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let drain = settings.raw.shutdown_timeout.0;
    // Before any route registers its counters, so that they report to the endpoint.
    let recorder = if settings.raw.admin.listen.is_empty() { None } else { crate::admin::install_metrics() };
    if recorder.is_some() {
        let remote: Vec<String> = gate.verifier().health().await.into_iter().map(|k| k.issuer).collect();
        crate::telemetry::register(&remote, gate.revocation_up());
    }
    let mut statuses = Vec::new();
    // The first route that failed for good: the process shuts down and exits with its error.
    let fatal: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Arc::default();
    let max = settings.raw.max_route_failures;
    for rules in &settings.routes {
        let rc = &settings.raw.routes[&rules.name];
        let (Some(src), Some(trusted), Some(dead_letter)) = (&rc.source, &rc.trusted, &rc.dead_letter) else {
            continue;
        };
        let status = Arc::new(RouteStatus::default());
        statuses.push((rules.name.clone(), Arc::clone(&status)));
        let route = Arc::new(Route {
            rules: rules.clone(),
            gate: Arc::clone(&gate),
            trusted: build_sink(settings, trusted).with_context(|| format!("routes.{}.trusted", rules.name))?,
            dead_letter: build_sink(settings, dead_letter)
                .with_context(|| format!("routes.{}.dead_letter", rules.name))?,
            max_in_flight: rc.max_in_flight,
            guard: rc.dead_letter_guard.clone(),
            status: Arc::clone(&status),
            metrics: crate::telemetry::RouteMetrics::new(&rules.name),
        });
        let supervised_route = Arc::clone(&route);
        let start: StartRoute = match src {
            SourceConfig::Kafka(k) => {
                let (bootstrap, props) = kafka_properties(settings, &k.cluster)?;
                let extra: Vec<_> = k.properties.clone().into_iter().collect();
                let mut config = crate::sink::kafka::client_config(&bootstrap, &props, &extra);
                config.set("group.id", &k.group);
                if let Some(id) = &settings.raw.instance_id
                    && config.get("group.instance.id").is_none()
                {
                    config.set("group.instance.id", format!("{id}.{}", rules.name));
                }
                let topics = match &k.topic_regex {
                    Some(re) if re.starts_with('^') => vec![re.clone()],
                    Some(re) => vec![format!("^{re}")],
                    None => k.topics.clone(),
                };
                let c = cancel.clone();
                Box::new(move || {
                    let src = source::kafka::KafkaSource { config: config.clone(), topics: topics.clone() };
                    Box::pin(source::kafka::run(Arc::clone(&route), src, c.clone(), drain))
                })
            }
            SourceConfig::Amqp(a) => {
                let mut arguments = lapin::types::FieldTable::default();
                for (k, v) in &a.arguments {
                    arguments.insert(
                        k.as_str().into(),
                        amqp_value(v).with_context(|| format!("routes.{}.source.amqp.arguments.{k}", rules.name))?,
                    );
                }
                let src = source::amqp::AmqpSource {
                    url: amqp_url(settings, &a.broker)?,
                    queue: a.queue.clone(),
                    declare: a.declare,
                    arguments,
                    prefetch: a.prefetch,
                };
                let src = Arc::new(src);
                let c = cancel.clone();
                Box::new(move || Box::pin(source::amqp::run(Arc::clone(&route), Arc::clone(&src), c.clone(), drain)))
            }
        };
        tasks.spawn(supervised(supervised_route, cancel.clone(), fatal.clone(), max, start));
    }
    anyhow::ensure!(!statuses.is_empty(), "no route has a source, trusted and dead_letter: nothing to run");
    if !settings.raw.admin.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&settings.raw.admin.listen)
            .await
            .with_context(|| format!("admin.listen {}", settings.raw.admin.listen))?;
        tracing::info!(listen = %settings.raw.admin.listen, "admin endpoint: /health /ready /metrics");
        let state = crate::admin::AdminState { routes: statuses, gate, metrics: recorder };
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
