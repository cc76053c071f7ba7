//! Sources: each owns its intake, the conversion of its messages to envelopes and its
//! acknowledgement rule (Kafka offsets, AMQP delivery tags); the per-message steps are
//! [`crate::pipeline`]'s. [`supervise`] restarts a route task that ends unexpectedly.

pub mod amqp;
pub mod kafka;
pub mod poison;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{GuardConfig, RouteRules};
use crate::gate::Gate;
use crate::sink::Sink;

/// Everything a source loop needs to run one route.
pub struct Route {
    /// Verification and header rules.
    pub rules: RouteRules,
    /// The decision.
    pub gate: Arc<Gate>,
    /// Where accepted messages go.
    pub trusted: Sink,
    /// Where rejected messages go.
    pub dead_letter: Sink,
    /// Most unconfirmed publishes at once.
    pub max_in_flight: usize,
    /// Dead-letter storm guard settings.
    pub guard: GuardConfig,
    /// Live state for readiness.
    pub status: Arc<RouteStatus>,
    /// Per-message counters.
    pub metrics: crate::telemetry::RouteMetrics,
}

/// What readiness reports about a route.
#[derive(Debug, Default)]
pub struct RouteStatus {
    /// Consuming (connected and subscribed).
    pub running: AtomicBool,
    /// Holding a message that cannot be decided or published now.
    pub holding: AtomicBool,
    /// Paused by the dead-letter guard.
    pub paused: AtomicBool,
    /// The source broker does not answer (an active probe, so an idle route notices too).
    pub broker_down: AtomicBool,
    /// Why the route task last ended unexpectedly, until it runs again.
    pub failed: Mutex<Option<String>>,
}

impl RouteStatus {
    /// Whether the route is making progress.
    pub fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
            && !self.holding.load(Ordering::Relaxed)
            && !self.broker_down.load(Ordering::Relaxed)
            && self.failure().is_none()
    }

    /// Why the route task last ended unexpectedly, if it has not run again since.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("not poisoned").clone()
    }

    pub(crate) fn set_broker_down(&self, route: &str, down: bool) {
        if self.broker_down.swap(down, Ordering::Relaxed) != down {
            metrics::gauge!("tokengate_broker_up", "route" => route.to_owned()).set(f64::from(u8::from(!down)));
            if down {
                tracing::warn!(route, "source broker does not answer: route not ready");
            } else {
                tracing::info!(route, "source broker answers again");
            }
        }
    }

    pub(crate) fn set_holding(&self, route: &str, on: bool) {
        if self.holding.swap(on, Ordering::Relaxed) != on {
            metrics::gauge!("tokengate_holding", "route" => route.to_owned()).set(f64::from(u8::from(on)));
        }
    }
}

/// Exponential backoff for holds: 100 ms doubling to 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Runs one route task from `start` until `cancel`. A task that ends unexpectedly (an error, or a
/// panic, which is a bug but must not end the route quietly) marks the route failed (`/ready`
/// names it), counts `tokengate_route_failures_total`, logs why, and is restarted with backoff.
/// After more than `max_failures` failures in a row (a run of a minute or more resets the count)
/// it returns the error, so that the process exits non-zero and an orchestrator restarts it.
/// What a failed task took from its broker was not acknowledged, so it is delivered again.
pub async fn supervise<F, Fut>(
    name: &str,
    status: &RouteStatus,
    cancel: &CancellationToken,
    max_failures: u32,
    mut start: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    /// A route that ran this long before failing is not failing in a loop.
    const HEALTHY_RUN: Duration = Duration::from_secs(60);
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let outcome = tokio::spawn(start()).await;
        if cancel.is_cancelled() {
            match outcome {
                Ok(Err(e)) => tracing::warn!(route = name, error = %e, "route ended with an error during shutdown"),
                Err(e) => tracing::warn!(route = name, error = %e, "route task failed during shutdown"),
                Ok(Ok(())) => {}
            }
            return Ok(());
        }
        let why = match outcome {
            Ok(Ok(())) => "the route task ended without being asked to stop".to_owned(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let msg =
                    p.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| p.downcast_ref::<String>().cloned());
                format!("panicked: {}", msg.unwrap_or_else(|| "(no message)".into()))
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
            backoff.reset();
        }
        failures += 1;
        status.running.store(false, Ordering::Relaxed);
        *status.failed.lock().expect("not poisoned") = Some(why.clone());
        metrics::counter!("tokengate_route_failures_total", "route" => name.to_owned()).increment(1);
        if failures > max_failures {
            tracing::error!(route = name, failures, error = %why, "route keeps failing; exiting so that the process is restarted");
            anyhow::bail!("route {name} failed {failures} times in a row: {why}");
        }
        let d = backoff.next_delay().max(Duration::from_secs(1));
        tracing::error!(route = name, failures, error = %why, restart_in_ms = d.as_millis() as u64, "route ended unexpectedly; restarting it");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(d) => {}
        }
        *status.failed.lock().expect("not poisoned") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn a_panicking_route_is_restarted_then_ends_the_process() {
        let status = RouteStatus::default();
        let runs = Arc::new(AtomicU32::new(0));
        let cancel = CancellationToken::new();
        let r = Arc::clone(&runs);
        let err = supervise("r", &status, &cancel, 2, move || {
            let r = Arc::clone(&r);
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("boom");
                }
                anyhow::bail!("broker refused")
            }
        })
        .await
        .unwrap_err();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two restarts, then the process ends");
        assert!(err.to_string().contains("failed 3 times in a row: broker refused"), "{err}");
        assert!(!status.ready());
        assert_eq!(status.failure().as_deref(), Some("broker refused"));
    }

    #[tokio::test]
    async fn a_failed_route_is_not_ready_until_it_runs_again_and_cancel_ends_it_cleanly() {
        let status = Arc::new(RouteStatus::default());
        let cancel = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (st, r, c) = (Arc::clone(&status), Arc::clone(&runs), cancel.clone());
        let task = tokio::spawn(async move {
            let route_cancel = c.clone();
            supervise("r", &st, &c, 5, move || {
                let (r, cancel) = (Arc::clone(&r), route_cancel.clone());
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("first run fails");
                    }
                    cancel.cancelled().await; // a route runs until asked to stop
                    Ok(())
                }
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(status.failure().as_deref(), Some("panicked: first run fails"));
        assert!(!status.ready(), "readiness names the failure");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted after the backoff");
        assert_eq!(status.failure(), None);
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
}
