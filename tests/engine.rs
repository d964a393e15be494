//! The engine on its own: retry timing (paused time), dead letters,
//! redrive, and conservation of queue counters under injected failures.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use uuid::Uuid;

use eventsys::engine::handler::{
    BreakerPolicy, Failure, Fault, HandlerConfig, Process, RetryPolicy,
};
use eventsys::engine::queue::{Queue, QueueItem};
use eventsys::engine::{Engine, EngineConfig};

#[derive(Clone, Debug, Serialize)]
struct Job(u32);

impl QueueItem for Job {
    fn event_id(&self) -> Uuid {
        Uuid::from_u128(self.0 as u128)
    }
}

/// Fails every attempt, noting when each was made.
/// When each attempt was made.
type Attempts = Arc<Mutex<Vec<Instant>>>;

#[derive(Clone, Default)]
struct AlwaysFails {
    attempts: Attempts,
}

impl Process<Job> for AlwaysFails {
    async fn process(&self, _: &Job) -> Result<(), Failure> {
        self.attempts.lock().unwrap().push(Instant::now());
        Err(Failure::Transient("downstream unavailable".into()))
    }
}

struct Succeeds;

impl Process<Job> for Succeeds {
    async fn process(&self, _: &Job) -> Result<(), Failure> {
        Ok(())
    }
}

/// Panics on every attempt at odd jobs.
struct PanicsOnOdd;

impl Process<Job> for PanicsOnOdd {
    async fn process(&self, job: &Job) -> Result<(), Failure> {
        if job.0 % 2 == 1 {
            panic!("odd job {}", job.0);
        }
        Ok(())
    }
}

fn engine() -> Engine {
    Engine::new(EngineConfig {
        event_retention: 1000,
        max_dead_letters: 1000,
        max_records: u64::MAX,
    })
}

/// An engine with one queue `q` whose one worker fails every attempt, and
/// the times of its attempts.
fn always_failing(policy: RetryPolicy) -> (Engine, Arc<Queue<Job>>, Attempts) {
    let mut engine = engine();
    let queue = engine.add_queue::<Job>("q", 8);
    let process = AlwaysFails::default();
    let attempts = process.attempts.clone();
    engine.add_handler("h", &queue, process, config(1, policy));
    (engine, queue, attempts)
}

fn config(workers: usize, retry: RetryPolicy) -> HandlerConfig {
    HandlerConfig {
        workers,
        batch: 4,
        retry,
        breaker: BreakerPolicy {
            threshold: u32::MAX,
            cool_down: Duration::from_secs(1),
        },
    }
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_within_the_jitter_bounds() {
    let policy = RetryPolicy {
        max_attempts: 6,
        base: Duration::from_millis(100),
        cap: Duration::from_millis(1_000),
    };
    let (engine, queue, attempts) = always_failing(policy);

    queue.send(Job(1)).await.unwrap();
    assert!(engine.settle(Duration::from_secs(3600)).await);

    let times = attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 6, "max_attempts in all");
    for (i, pair) in times.windows(2).enumerate() {
        let waited = pair[1] - pair[0];
        let (low, high) = policy.bounds(i as u32 + 1);
        assert!(
            low <= waited && waited <= high + Duration::from_millis(1),
            "retry {} waited {waited:?}, policy {low:?}..{high:?}",
            i + 1
        );
    }
    let view = engine.queue("q").unwrap();
    let dead = view.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 6);
    assert_eq!(dead[0].error, "downstream unavailable");
    let counts = view.snapshot().counts;
    assert_eq!(
        (
            counts.failed,
            counts.retried,
            counts.dead_lettered,
            counts.processed
        ),
        (6, 5, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_retry_does_not_block_other_events() {
    let policy = RetryPolicy {
        max_attempts: 2,
        base: Duration::from_secs(600),
        cap: Duration::from_secs(600),
    };
    let mut engine = engine();
    let queue = engine.add_queue::<Job>("q", 8);
    let handler = engine.add_handler("h", &queue, Succeeds, config(1, policy));
    handler.set_fault(Some(Fault {
        failure_rate: 1.0,
        permanent: false,
        delay_ms: 0,
    }));
    queue.send(Job(1)).await.unwrap();
    // Let the first attempt fail, then stop failing.
    while queue.counts().retrying == 0 {
        tokio::task::yield_now().await;
    }
    handler.set_fault(None);
    let started = Instant::now();
    queue.send(Job(2)).await.unwrap();
    while queue.counts().processed == 0 {
        tokio::task::yield_now().await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "job 2 ran while job 1 waited out its retry"
    );
    assert!(engine.settle(Duration::from_secs(3600)).await);
    assert_eq!(queue.counts().processed, 2);
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_skip_retries_and_redrive_puts_them_back() {
    let policy = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(10),
    };
    let mut engine = engine();
    let queue = engine.add_queue::<Job>("q", 2);
    let handler = engine.add_handler("h", &queue, Succeeds, config(2, policy));
    handler.set_fault(Some(Fault {
        failure_rate: 1.0,
        permanent: true,
        delay_ms: 0,
    }));
    for i in 0..5 {
        queue.send(Job(i)).await.unwrap();
    }
    assert!(engine.settle(Duration::from_secs(60)).await);
    let view = engine.queue("q").unwrap().clone();
    assert_eq!(view.dead_letters().len(), 5);
    assert!(view.dead_letters().iter().all(|d| d.attempts == 1));
    assert_eq!(view.snapshot().counts.retried, 0);

    handler.set_fault(None);
    assert_eq!(view.redrive(), 5);
    assert!(
        engine.settle(Duration::from_secs(60)).await,
        "settle waits for redriven events"
    );
    let counts = view.snapshot().counts;
    assert_eq!(
        (counts.enqueued, counts.processed, counts.dead_lettered),
        (10, 5, 5)
    );
    assert!(view.dead_letters().is_empty());

    handler.set_fault(Some(Fault {
        failure_rate: 1.0,
        permanent: true,
        delay_ms: 0,
    }));
    queue.send(Job(9)).await.unwrap();
    assert!(engine.settle(Duration::from_secs(60)).await);
    assert_eq!(view.discard(), 1);
    assert!(view.dead_letters().is_empty());
}

/// Conservation: with 30 % of attempts failing, every event ends processed
/// or dead-lettered, and the counters add up at every observation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_add_up_at_every_observation_under_transient_failures() {
    for (capacity, workers) in [(1, 1), (4, 3), (64, 2)] {
        let policy = RetryPolicy {
            max_attempts: 4,
            base: Duration::from_micros(100),
            cap: Duration::from_millis(2),
        };
        let mut engine = engine();
        let queue = engine.add_queue::<Job>("q", capacity);
        let handler = engine.add_handler("h", &queue, Succeeds, config(workers, policy));
        handler.set_fault(Some(Fault {
            failure_rate: 0.3,
            permanent: false,
            delay_ms: 0,
        }));
        let view = engine.queue("q").unwrap().clone();

        let observer = tokio::spawn({
            let view = view.clone();
            async move {
                let mut observations = 0u64;
                loop {
                    let c = view.snapshot().counts;
                    assert_eq!(
                        c.enqueued,
                        c.processed + c.dead_lettered + c.depth + c.in_flight + c.retrying,
                        "counters do not add up: {c:?}"
                    );
                    observations += 1;
                    if c.enqueued == 3000 && c.processed + c.dead_lettered == 3000 {
                        return observations;
                    }
                    tokio::task::yield_now().await;
                }
            }
        });
        for i in 0..3000 {
            queue.send(Job(i)).await.unwrap();
        }
        assert!(engine.settle(Duration::from_secs(120)).await);
        let observations = observer.await.unwrap();
        assert!(observations > 10, "observed while running ({observations})");
        let c = view.snapshot().counts;
        assert_eq!(
            c.processed + c.dead_lettered,
            3000,
            "every event ended: {c:?}"
        );
        assert_eq!(view.dead_letters().len() as u64, c.dead_lettered);
        assert!(c.retried > 0 && c.failed >= c.retried);
        assert_eq!(
            c.failed,
            c.retried + c.dead_lettered,
            "each failure was retried or ended the event"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn slow_events_are_counted_as_they_finish_not_at_the_end_of_their_batch() {
    let mut engine = engine();
    let queue = engine.add_queue::<Job>("q", 8);
    let policy = RetryPolicy {
        max_attempts: 1,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(1),
    };
    // Each attempt takes one second; one worker takes all four in one batch.
    let handler = engine.add_handler("h", &queue, Succeeds, config(1, policy));
    handler.set_fault(Some(Fault {
        failure_rate: 0.0,
        permanent: false,
        delay_ms: 1000,
    }));
    for i in 0..4 {
        queue.send(Job(i)).await.unwrap();
    }
    let started = Instant::now();
    while queue.counts().processed < 2 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "two of four one-second events were counted only after {:?}",
        started.elapsed()
    );
    assert_eq!(queue.counts().in_flight, 4 - queue.counts().processed);
    assert!(engine.settle(Duration::from_secs(60)).await);
    assert_eq!(queue.counts().processed, 4);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_loses_nothing() {
    let policy = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(100),
    };
    let mut engine = engine();
    let queue = engine.add_queue::<Job>("q", 8);
    let handler = engine.add_handler("h", &queue, PanicsOnOdd, config(2, policy));
    for i in 0..20 {
        queue.send(Job(i)).await.unwrap();
    }
    assert!(
        engine.settle(Duration::from_secs(3600)).await,
        "a panic settles like any failure"
    );
    let view = engine.queue("q").unwrap();
    let dead = view.dead_letters();
    assert_eq!(dead.len(), 10, "every odd job is dead-lettered");
    assert!(dead.iter().all(|d| d.attempts == 3), "{dead:?}");
    assert!(
        dead[0].error.starts_with("the handler panicked: odd job"),
        "{}",
        dead[0].error
    );
    let counts = view.snapshot().counts;
    assert_eq!(
        (counts.enqueued, counts.processed, counts.dead_lettered),
        (20, 10, 10)
    );
    assert_eq!(
        handler.stats().failed,
        30,
        "three failed attempts per odd job"
    );
    // The workers survived: new work is still done.
    queue.send(Job(100)).await.unwrap();
    assert!(engine.settle(Duration::from_secs(3600)).await);
    assert_eq!(view.snapshot().counts.processed, 11);
}

#[tokio::test(start_paused = true)]
async fn a_retry_abandoned_at_shutdown_still_adds_up() {
    let (engine, queue, attempts) = always_failing(RetryPolicy {
        max_attempts: 5,
        base: Duration::from_secs(60),
        cap: Duration::from_secs(60),
    });
    queue.send(Job(1)).await.unwrap();
    while attempts.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    let left = engine.shutdown(Duration::ZERO).await;
    assert_eq!(left, 1, "the retrying event is left unfinished");
    let c = engine.queue("q").unwrap().snapshot().counts;
    assert_eq!(c.retrying, 1, "{c:?}");
    assert_eq!(
        c.enqueued,
        c.processed + c.dead_lettered + c.depth + c.in_flight + c.retrying,
        "{c:?}"
    );
}
