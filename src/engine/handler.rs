//! Handlers: pools of workers that consume a queue.
//!
//! A worker takes a batch from its queue and runs the [`Process`] step on
//! each event. A transient failure is retried after an exponential backoff
//! with jitter ([`RetryPolicy`]) by a timer task, so the worker goes on with
//! other events meanwhile; after the last attempt, or at once for a
//! permanent failure, the event goes to the queue's dead letters.
//!
//! A circuit [`Breaker`] per handler opens after a run of transient
//! failures: workers then hold their events (nothing is dead-lettered for
//! it) until a cool-down has passed, let one probe through (half-open), and
//! close again on its success. [`Fault`]s can be injected to see all this.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::queue::{Envelope, Queue, QueueItem};

/// Why processing an event failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Might work if tried again.
    #[error("{0}")]
    Transient(String),
    /// Will never work (such as a record that cannot be standardised).
    #[error("{0}")]
    Permanent(String),
    /// The shared store could not be reached. Tried again after the retry
    /// delay however many attempts were made, and never dead-lettered: the
    /// event is safe in the store until it answers again, and nothing is
    /// wrong with the event itself.
    #[error("{0}")]
    Unavailable(String),
}

/// The work a handler does for one event.
pub trait Process<T>: Send + Sync + 'static {
    fn process(&self, item: &T) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Called as `item` is given up on, before it goes to dead letters, so
    /// that the step can record the failure where others will see it (a
    /// table, whose change the change log carries). Must not block.
    fn gave_up(&self, _item: &T, _error: &str) {}
}

/// When to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, before dead-lettering.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each further one.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
}

impl RetryPolicy {
    /// The delay before retrying after failed attempt number `attempt`
    /// (1-based): `base * 2^(attempt-1)`, capped, then "equal jitter": a
    /// uniform pick in its upper half, so retries of events that failed
    /// together spread out yet never come sooner than half the policy.
    pub fn delay(&self, attempt: u32) -> Duration {
        let (low, high) = self.bounds(attempt);
        low + (high - low).mul_f64(fastrand::f64())
    }

    /// The range [`RetryPolicy::delay`] picks from.
    pub fn bounds(&self, attempt: u32) -> (Duration, Duration) {
        let doubling = 2u32.saturating_pow(attempt.saturating_sub(1));
        let full = self.base.saturating_mul(doubling).min(self.cap);
        (full / 2, full)
    }
}

/// Faults injected into a handler, for demos and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Chance in 0..=1 that an attempt fails.
    #[serde(default)]
    pub failure_rate: f64,
    /// Whether injected failures are permanent (dead-lettered at once).
    #[serde(default)]
    pub permanent: bool,
    /// Extra time each attempt takes.
    #[serde(default)]
    pub delay_ms: u64,
}

impl Fault {
    /// Checks the values a client sent.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!(
                "failure_rate must be between 0 and 1, got {}",
                self.failure_rate
            ));
        }
        if self.delay_ms > 60_000 {
            return Err(format!(
                "delay_ms must be at most 60000, got {}",
                self.delay_ms
            ));
        }
        Ok(())
    }

    async fn strike(&self) -> Result<(), Failure> {
        if self.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
        }
        if self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate {
            let why = "injected fault".to_string();
            return Err(if self.permanent {
                Failure::Permanent(why)
            } else {
                Failure::Transient(why)
            });
        }
        Ok(())
    }
}

/// When the breaker opens and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive transient failures that open the circuit.
    pub threshold: u32,
    /// How long it stays open before a probe is let through.
    pub cool_down: Duration,
}

/// A circuit's state as shown to users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else waits for its result.
    HalfOpen,
}

/// A circuit breaker shared by a handler's workers.
pub struct Breaker {
    name: Arc<str>,
    policy: BreakerPolicy,
    /// Never held across an await.
    state: Mutex<BreakerState>,
    /// Whether `state` is anything but closed with no failures: while it
    /// is not, admitting an event and counting a success take no lock.
    tripped: AtomicBool,
    changed: Notify,
}

/// What a worker may do with its next event.
enum Admission {
    Go,
    /// Wait until this instant (open), or for a change (half-open).
    Wait(Option<Instant>),
}

impl Breaker {
    pub fn new(name: Arc<str>, policy: BreakerPolicy) -> Self {
        Self {
            name,
            policy,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            tripped: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn circuit(&self) -> Circuit {
        match *self.state() {
            BreakerState::Closed { .. } => Circuit::Closed,
            BreakerState::Open { .. } => Circuit::Open,
            BreakerState::HalfOpen => Circuit::HalfOpen,
        }
    }

    /// Whether the breaker is open, half-open or counting failures (the
    /// next event may have to wait).
    fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// Waits until this worker may process an event.
    async fn admit(&self) {
        if !self.tripped() {
            return;
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_admit() {
                Admission::Go => return,
                Admission::Wait(Some(until)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = changed => {}
                    }
                }
                Admission::Wait(None) => changed.await,
            }
        }
    }

    fn try_admit(&self) -> Admission {
        let mut state = self.state();
        match *state {
            BreakerState::Closed { .. } => Admission::Go,
            BreakerState::Open { until } if Instant::now() < until => Admission::Wait(Some(until)),
            BreakerState::Open { .. } => {
                *state = BreakerState::HalfOpen;
                drop(state);
                tracing::info!(handler = %self.name, "circuit half-open: letting one probe through");
                Admission::Go
            }
            BreakerState::HalfOpen => Admission::Wait(None),
        }
    }

    /// The handler ran (a permanent failure is the event's fault, not the
    /// handler's, so it counts here too).
    fn succeeded(&self) {
        if !self.tripped() {
            return;
        }
        let mut state = self.state();
        let was_closed = matches!(*state, BreakerState::Closed { .. });
        *state = BreakerState::Closed { failures: 0 };
        self.tripped.store(false, Ordering::Release);
        drop(state);
        if !was_closed {
            tracing::info!(handler = %self.name, "circuit closed");
            self.changed.notify_waiters();
        }
    }

    fn failed(&self) {
        let mut state = self.state();
        self.tripped.store(true, Ordering::Release);
        let open = match *state {
            BreakerState::Closed { failures } if failures + 1 < self.policy.threshold => {
                *state = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            BreakerState::Open { .. } => false,
            _ => true,
        };
        if open {
            *state = BreakerState::Open {
                until: Instant::now() + self.policy.cool_down,
            };
            drop(state);
            tracing::warn!(handler = %self.name, cool_down = ?self.policy.cool_down,
                "circuit open: holding events");
            self.changed.notify_waiters();
        }
    }
}

/// A failure's text for a panic's payload.
fn panicked(payload: &(dyn std::any::Any + Send)) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    format!("the handler panicked: {message}")
}

/// The most work (time spent handling events) a worker does before it
/// counts the successes of its batch so far.
const COUNT_EVERY: Duration = Duration::from_millis(5);

/// How a handler runs.
#[derive(Clone, Copy, Debug)]
pub struct HandlerConfig {
    pub workers: usize,
    /// Events a worker takes at once (1 for slow work, so workers share it).
    pub batch: usize,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
}

/// A handler's counters and state as shown to users.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct HandlerStats {
    pub name: Arc<str>,
    pub queue: Arc<str>,
    pub workers: usize,
    pub processed: u64,
    pub failed: u64,
    pub circuit: Circuit,
}

pub struct Handler<T, P> {
    name: Arc<str>,
    queue: Arc<Queue<T>>,
    process: P,
    config: HandlerConfig,
    breaker: Breaker,
    fault: Mutex<Option<Fault>>,
    /// Whether `fault` is set, so that events take no lock when it is not.
    faulted: AtomicBool,
    processed: AtomicU64,
    failed: AtomicU64,
    /// Seconds each attempt took.
    duration: Histogram,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl<T: QueueItem, P: Process<T>> Handler<T, P> {
    /// Starts `config.workers` workers on `queue`, owned by `tasks`.
    pub fn start(
        name: &str,
        queue: Arc<Queue<T>>,
        process: P,
        config: HandlerConfig,
        duration: Histogram,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let name: Arc<str> = name.into();
        let handler = Arc::new(Self {
            breaker: Breaker::new(name.clone(), config.breaker),
            name,
            queue,
            process,
            config,
            fault: Mutex::new(None),
            faulted: AtomicBool::new(false),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            duration,
            tasks: tasks.clone(),
            cancel,
        });
        for _ in 0..config.workers.max(1) {
            tasks.spawn(handler.clone().work());
        }
        handler
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn queue(&self) -> &Arc<Queue<T>> {
        &self.queue
    }

    pub fn process_step(&self) -> &P {
        &self.process
    }

    pub fn fault(&self) -> Option<Fault> {
        if !self.faulted.load(Ordering::Acquire) {
            return None;
        }
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        let mut slot = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        *slot = fault;
        self.faulted.store(fault.is_some(), Ordering::Release);
    }

    pub fn stats(&self) -> HandlerStats {
        HandlerStats {
            name: self.name.clone(),
            queue: self.queue.name().clone(),
            workers: self.config.workers.max(1),
            processed: self.processed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            circuit: self.breaker.circuit(),
        }
    }

    async fn work(self: Arc<Self>) {
        let mut batch = Vec::with_capacity(self.config.batch.max(1));
        loop {
            let taken = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                n = self.queue.take(&mut batch, self.config.batch.max(1)) => n,
            };
            if taken == 0 {
                return;
            }
            // Successes are counted a batch at a time (one lock, not one
            // each), but at least every few milliseconds of work, so that
            // slow events still show up in the counters as they finish.
            let mut processed = 0;
            let mut uncounted = Duration::ZERO;
            for envelope in batch.drain(..) {
                if self.breaker.tripped() {
                    // The next event may be held for a cool-down.
                    self.count_processed(std::mem::take(&mut processed));
                }
                // Shutdown past its timeout abandons the event mid-way; it is
                // still counted in flight and handlers are safe to redo.
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => {
                        self.count_processed(processed);
                        return;
                    }
                    (ok, took) = self.handle(envelope) => {
                        processed += u64::from(ok);
                        uncounted += took;
                    }
                }
                if uncounted >= COUNT_EVERY {
                    self.count_processed(std::mem::take(&mut processed));
                    uncounted = Duration::ZERO;
                }
            }
            self.count_processed(processed);
            // Let the worker that was woken by the channel run elsewhere:
            // without this, workers sharing the receiver tend to take turns
            // on one thread instead of using every core.
            tokio::task::yield_now().await;
        }
    }

    fn count_processed(&self, n: u64) {
        if n > 0 {
            self.processed.fetch_add(n, Ordering::Relaxed);
            self.queue.processed(n);
        }
    }

    /// Runs one attempt; whether it succeeded (counted by the caller), and
    /// how long it took.
    async fn handle(self: &Arc<Self>, mut envelope: Envelope<T>) -> (bool, Duration) {
        self.breaker.admit().await;
        envelope.attempts += 1;
        let span = tracing::debug_span!("handle", handler = %self.name, queue = %self.queue.name(),
            event = %envelope.item.event_id(), attempt = envelope.attempts);
        let fault = self.fault();
        let started = Instant::now();
        // A panic inside the step is a failed attempt like any other: the
        // worker survives and the event is retried or dead-lettered.
        let result = AssertUnwindSafe(async {
            if let Some(fault) = fault {
                fault.strike().await?;
            }
            self.process.process(&envelope.item).await
        })
        .catch_unwind()
        .instrument(span.clone())
        .await
        .unwrap_or_else(|panic| Err(Failure::Transient(panicked(&*panic))));
        let took = started.elapsed();
        self.duration.observe(took.as_secs_f64());
        let ok = match result {
            Ok(()) => {
                self.breaker.succeeded();
                self.queue.finished(envelope.ticket);
                true
            }
            Err(failure) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let _enter = span.enter();
                self.failed_attempt(envelope, failure);
                false
            }
        };
        (ok, took)
    }

    fn failed_attempt(self: &Arc<Self>, envelope: Envelope<T>, failure: Failure) {
        let attempts = envelope.attempts;
        match failure {
            Failure::Permanent(error) => {
                self.breaker.succeeded();
                tracing::warn!(%error, "permanent failure: dead-lettered");
                self.process.gave_up(&envelope.item, &error);
                self.queue
                    .dead_letter(envelope.ticket, envelope.item, error, attempts);
            }
            Failure::Transient(error) if attempts >= self.config.retry.max_attempts => {
                self.breaker.failed();
                tracing::warn!(%error, attempts, "failed on the last attempt: dead-lettered");
                self.process.gave_up(&envelope.item, &error);
                self.queue
                    .dead_letter(envelope.ticket, envelope.item, error, attempts);
            }
            Failure::Transient(error) | Failure::Unavailable(error) => {
                self.breaker.failed();
                let max = self.config.retry.max_attempts;
                let delay = self.config.retry.delay(attempts.min(max));
                tracing::debug!(%error, ?delay, "failed; retrying");
                if self.queue.hand_back(envelope.ticket, delay) {
                    return;
                }
                self.queue.retrying();
                let handler = self.clone();
                self.tasks.spawn(async move {
                    tokio::select! {
                        _ = handler.cancel.cancelled() => handler.queue.retry_abandoned(),
                        _ = tokio::time::sleep(delay) => {
                            if handler.queue.redeliver(envelope).await.is_err() {
                                handler.queue.retry_abandoned();
                            }
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_and_are_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(
            policy.bounds(1),
            (Duration::from_millis(50), Duration::from_millis(100))
        );
        assert_eq!(
            policy.bounds(2),
            (Duration::from_millis(100), Duration::from_millis(200))
        );
        assert_eq!(
            policy.bounds(4),
            (Duration::from_millis(400), Duration::from_millis(800))
        );
        assert_eq!(
            policy.bounds(9),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        assert_eq!(
            policy.bounds(60),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        for attempt in 1..12 {
            let (low, high) = policy.bounds(attempt);
            for _ in 0..100 {
                let d = policy.delay(attempt);
                assert!(
                    low <= d && d <= high,
                    "attempt {attempt}: {d:?} outside {low:?}..{high:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_holds_probes_once_and_closes() {
        let breaker = Arc::new(Breaker::new(
            "h".into(),
            BreakerPolicy {
                threshold: 3,
                cool_down: Duration::from_secs(10),
            },
        ));
        breaker.failed();
        breaker.failed();
        assert_eq!(breaker.circuit(), Circuit::Closed, "below the threshold");
        breaker.succeeded();
        breaker.failed();
        breaker.failed();
        assert_eq!(
            breaker.circuit(),
            Circuit::Closed,
            "a success resets the run"
        );
        breaker.failed();
        assert_eq!(breaker.circuit(), Circuit::Open);

        // A worker is held for the cool-down, then let through as the probe.
        let opened = Instant::now();
        breaker.admit().await;
        assert!(opened.elapsed() >= Duration::from_secs(10));
        assert_eq!(breaker.circuit(), Circuit::HalfOpen);
        // A second worker waits while the probe is out.
        let second = tokio::spawn({
            let breaker = breaker.clone();
            async move { breaker.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!second.is_finished(), "only one probe at a time");
        // The probe fails: open again for another cool-down.
        breaker.failed();
        assert_eq!(breaker.circuit(), Circuit::Open);
        tokio::time::sleep(Duration::from_secs(11)).await;
        second.await.unwrap();
        assert_eq!(breaker.circuit(), Circuit::HalfOpen);
        breaker.succeeded();
        assert_eq!(breaker.circuit(), Circuit::Closed);
    }

    #[test]
    fn faults_are_validated() {
        assert!(
            Fault {
                failure_rate: 0.5,
                ..Default::default()
            }
            .validate()
            .is_ok()
        );
        assert!(
            Fault {
                failure_rate: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Fault {
                failure_rate: -0.1,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Fault {
                failure_rate: f64::NAN,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
