//! Sources: each owns its consume loop and its acknowledgement rules (Kafka offsets, AMQP
//! delivery tags) and shares the decision ([`crate::gate`]) and destinations ([`crate::sink`]).

pub mod amqp;
pub mod kafka;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
}

impl RouteStatus {
    /// Whether the route is making progress.
    pub fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
            && !self.holding.load(Ordering::Relaxed)
            && !self.broker_down.load(Ordering::Relaxed)
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
