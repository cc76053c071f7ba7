//! Sources: each owns its intake, the conversion of its messages to envelopes and its
//! acknowledgement rule (Kafka offsets, AMQP delivery tags, Kafka transactions); the per-message steps are
//! [`crate::pipeline`]'s. [`supervise`] restarts a route task that ends unexpectedly.

pub mod amqp;
pub mod kafka;
pub mod poison;
pub mod transaction;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::pipeline::{Backoff, RouteStatus};
use crate::telemetry::RouteMetrics;

/// Runs one route task from `start` until `cancel`. A task that ends unexpectedly (an error, or a
/// panic, which is a bug but must not end the route quietly) marks the route failed (`/ready`
/// names it), counts it ([`RouteMetrics::route_failed`]), logs why, and is restarted with backoff.
/// After more than `max_failures` failures in a row (a run of a minute or more resets the count)
/// it returns the error, so that the process exits non-zero and an orchestrator restarts it.
/// What a failed task took from its broker was not acknowledged, so it is delivered again.
pub async fn supervise<F, Fut>(
    name: &str,
    status: &RouteStatus,
    metrics: &RouteMetrics,
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
        metrics.route_failed();
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
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn a_panicking_route_is_restarted_then_ends_the_process() {
        let status = RouteStatus::default();
        let runs = Arc::new(AtomicU32::new(0));
        let cancel = CancellationToken::new();
        let r = Arc::clone(&runs);
        let err = supervise("r", &status, &RouteMetrics::new("r"), &cancel, 2, move || {
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
            supervise("r", &st, &RouteMetrics::new("r"), &c, 5, move || {
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
