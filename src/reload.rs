//! `tokengate run`, the daemon's life: start, live reload, stop on `SIGINT`/`SIGTERM`.
//!
//! Live reload: on `SIGHUP` (and, with `[reload] watch`, when the config file or a key file it
//! names changes) the config is read and validated again and, if it passes whole, put in force
//! without a restart: a new gate (issuers, keys, policies, claim mappings; the Redis connection
//! and its mirror kept while `[redis]` is unchanged), and only the routes whose settings changed
//! drain, commit and start again ([`crate::app::Routes::apply`]). A config that fails is refused
//! whole, logged and counted; the running one stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::{self, Routes};
use crate::config::{self, Settings};

/// `tokengate run`: the daemon, until SIGINT or SIGTERM; `SIGHUP` reloads the config at `path`
/// ([`Reloader`]).
pub async fn run(mut settings: Settings, path: &std::path::Path) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received");
        signals.cancel();
    });
    let (gate_stop, redis_stop) = (cancel.child_token(), cancel.child_token());
    let (verifier, unavailable) = app::start_verifier(&mut settings, &gate_stop).await;
    for e in unavailable {
        tracing::error!(issuer = %e.issuer, detail = %e.detail, "keys unavailable at start; its tokens hold until they load");
    }
    let revocations = app::connect_revocations(&settings, &redis_stop).await?;
    let gate = app::assemble_gate(&settings, verifier, revocations)?;
    let mut routes = Routes::start(&settings, gate, cancel.clone()).await?;
    Reloader::new(path, &settings, cancel, gate_stop, redis_stop).serve(&mut routes).await;
    routes.finish().await
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

/// What a reload compares with and replaces.
pub struct Reloader {
    path: PathBuf,
    /// The process: the tokens below are its children.
    cancel: CancellationToken,
    /// Stops the gate in force's key refresh when it is replaced.
    gate_stop: CancellationToken,
    /// Stops the revocation list's connection when `[redis]` changes.
    redis_stop: CancellationToken,
    redis_digest: Option<String>,
    admin_listen: Option<std::net::SocketAddr>,
    watch: Option<Duration>,
    /// The files whose change reloads, and a digest of their contents.
    files: Vec<PathBuf>,
}

impl Reloader {
    /// A reloader of the config at `path`, in force as `settings`.
    pub fn new(
        path: &Path,
        settings: &Settings,
        cancel: CancellationToken,
        gate_stop: CancellationToken,
        redis_stop: CancellationToken,
    ) -> Reloader {
        Reloader {
            path: path.to_owned(),
            cancel,
            gate_stop,
            redis_stop,
            redis_digest: settings.redis.as_ref().map(|r| r.digest.clone()),
            admin_listen: settings.admin_listen,
            watch: settings.reload_watch,
            files: watched(path, settings),
        }
    }

    /// Reloads on `SIGHUP` (and changed files, if watched) until the process is cancelled.
    pub async fn serve(mut self, routes: &mut Routes) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
        let mut seen = contents(&self.files);
        let mut tick = tokio::time::interval(self.watch.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hangup = hup.recv();
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            let why = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = hangup => "SIGHUP",
                _ = tick.tick(), if self.watch.is_some() => {
                    let now = contents(&self.files);
                    if now == seen {
                        continue;
                    }
                    "a watched file changed"
                }
            };
            seen = contents(&self.files);
            self.reload(routes, why).await;
        }
    }

    /// Reads, validates and applies the config; logs and counts the outcome.
    pub async fn reload(&mut self, routes: &mut Routes, why: &str) {
        tracing::info!(path = %self.path.display(), trigger = why, "reloading the config");
        match self.apply(routes).await {
            Ok(()) => {
                let generation = routes.live().generation.fetch_add(1, Ordering::SeqCst) + 1;
                crate::telemetry::config_reloaded(Some(generation));
                tracing::info!(generation, "config reloaded");
            }
            Err(e) => {
                crate::telemetry::config_reloaded(None);
                let generation = routes.live().generation.load(Ordering::SeqCst);
                tracing::error!(generation, "config reload refused; the running config stays: {e:#}");
            }
        }
    }

    async fn apply(&mut self, routes: &mut Routes) -> anyhow::Result<()> {
        let mut new = config::load(&self.path, &config::process_env()).map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(new.admin_listen == self.admin_listen, "admin.listen changes only with a restart");
        let gate_stop = self.cancel.child_token();
        let (verifier, unavailable) = app::start_verifier(&mut new, &gate_stop).await;
        if let Some(e) = unavailable.first() {
            gate_stop.cancel();
            anyhow::bail!("keys of issuer {} unavailable: {}", e.issuer, e.detail);
        }
        let redis_digest = new.redis.as_ref().map(|r| r.digest.clone());
        let (revocations, redis_stop) = if redis_digest == self.redis_digest {
            (routes.gate().revocations().cloned(), None)
        } else {
            let stop = self.cancel.child_token();
            (app::connect_revocations(&new, &stop).await?, Some(stop))
        };
        let gate = app::assemble_gate(&new, verifier, revocations)?;
        if let Err(e) = routes.apply(&new, gate).await {
            gate_stop.cancel();
            return Err(e);
        }
        std::mem::replace(&mut self.gate_stop, gate_stop).cancel();
        if let Some(stop) = redis_stop {
            std::mem::replace(&mut self.redis_stop, stop).cancel();
            self.redis_digest = redis_digest;
        }
        self.watch = new.reload_watch;
        self.files = watched(&self.path, &new);
        Ok(())
    }
}

/// The config file and the key files it names.
fn watched(path: &Path, settings: &Settings) -> Vec<PathBuf> {
    std::iter::once(path.to_owned()).chain(settings.key_files.iter().cloned()).collect()
}

/// A digest of the files' contents (an absent file counts as empty but distinct).
fn contents(files: &[PathBuf]) -> String {
    let mut all = Vec::new();
    for f in files {
        match std::fs::read(f) {
            Ok(bytes) => all.extend_from_slice(crate::verify::sha256_hex(&bytes).as_bytes()),
            Err(_) => all.extend_from_slice(b"-"),
        }
    }
    crate::verify::sha256_hex(&all)
}
