//! Queues: bounded FIFO streams that deliver every event they are given.
//!
//! A queue never filters. It is a bounded tokio `mpsc` channel whose full
//! policy is *block*: a sender waits for room. Nothing in the pipeline that
//! a queue's own handler depends on ever waits on that queue (the change
//! log sits in between), so blocking is backpressure, not deadlock.
//!
//! Counters are kept under one small lock so that every observation is
//! consistent: at any instant
//! `enqueued = processed + dead_lettered + depth + in_flight + retrying`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::record::Timestamp;
use super::settle::Activity;

/// What a queue can carry: cloneable, shown as JSON in dead letters.
pub trait QueueItem: Clone + Send + Sync + Serialize + 'static {
    /// The event's id, for logs and spans.
    fn event_id(&self) -> Uuid;
}

/// An item with the number of attempts already made on it.
#[derive(Clone, Debug)]
pub struct Envelope<T> {
    pub item: T,
    pub attempts: u32,
}

/// An event given up on, with why.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetter<T> {
    pub event: T,
    pub error: String,
    pub attempts: u32,
    pub failed_at: Timestamp,
}

/// A consistent snapshot of a queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct QueueCounts {
    /// Events put on the queue (redriven ones count again).
    pub enqueued: u64,
    /// Events waiting in the queue.
    pub depth: u64,
    /// Events a worker has taken and not finished.
    pub in_flight: u64,
    /// Events that ended well.
    pub processed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Events waiting out a retry delay.
    pub retrying: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Events moved to dead letters.
    pub dead_lettered: u64,
}

/// The queue is shut down.
#[derive(Debug, thiserror::Error)]
#[error("queue {0} is closed")]
pub struct Closed(pub Arc<str>);

pub struct Queue<T> {
    name: Arc<str>,
    capacity: usize,
    tx: mpsc::Sender<Envelope<T>>,
    /// Shared by the handler's workers; each takes a batch, then lets go.
    rx: tokio::sync::Mutex<mpsc::Receiver<Envelope<T>>>,
    /// Never held across an await.
    counts: Mutex<QueueCounts>,
    dead: Mutex<VecDeque<DeadLetter<T>>>,
    max_dead_letters: usize,
    activity: Activity,
}

impl<T: QueueItem> Queue<T> {
    pub fn new(name: &str, capacity: usize, max_dead_letters: usize, activity: Activity) -> Self {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        Self {
            name: name.into(),
            capacity,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            counts: Mutex::new(QueueCounts::default()),
            dead: Mutex::new(VecDeque::new()),
            max_dead_letters: max_dead_letters.max(1),
            activity,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn counts_mut(&self) -> MutexGuard<'_, QueueCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counts(&self) -> QueueCounts {
        *self.counts_mut()
    }

    /// Puts a new event on the queue, waiting for room, and counts it as
    /// outstanding work for settle.
    pub async fn send(&self, item: T) -> Result<(), Closed> {
        self.activity.begin(1);
        let result = self.deliver(item).await;
        if result.is_err() {
            self.activity.end(1);
        }
        result
    }

    /// Counts `n` events as outstanding before they are put on the queue
    /// with [`Queue::deliver`] (from a task that may run later), so settle
    /// cannot report idle in between.
    pub fn owe(&self, n: u64) {
        self.activity.begin(n);
    }

    /// Gives up on `n` owed events that could not be delivered.
    pub fn forgive(&self, n: u64) {
        self.activity.end(n);
    }

    /// Puts an event on the queue whose outstanding work is already counted
    /// (the change log counts it when appending).
    pub async fn deliver(&self, item: T) -> Result<(), Closed> {
        self.put(Envelope { item, attempts: 0 }, |c| c.enqueued += 1)
            .await
    }

    /// Puts events whose outstanding work is already counted on the queue,
    /// in order, waiting until there is room for all of them at once.
    /// At most [`Queue::capacity`] events.
    pub async fn deliver_all(&self, items: Vec<T>) -> Result<(), Closed> {
        let n = items.len();
        let permits = self
            .tx
            .reserve_many(n)
            .await
            .map_err(|_| Closed(self.name.clone()))?;
        {
            // Counted before the events are visible to a worker.
            let mut counts = self.counts_mut();
            counts.enqueued += n as u64;
            counts.depth += n as u64;
        }
        for (permit, item) in permits.zip(items) {
            permit.send(Envelope { item, attempts: 0 });
        }
        Ok(())
    }

    /// Puts an event back after a retry delay.
    pub(crate) async fn redeliver(&self, envelope: Envelope<T>) -> Result<(), Closed> {
        self.put(envelope, |c| c.retrying -= 1).await
    }

    async fn put(
        &self,
        envelope: Envelope<T>,
        count: impl FnOnce(&mut QueueCounts),
    ) -> Result<(), Closed> {
        let permit = self
            .tx
            .reserve()
            .await
            .map_err(|_| Closed(self.name.clone()))?;
        {
            // Counted before the event is visible to a worker.
            let mut counts = self.counts_mut();
            count(&mut counts);
            counts.depth += 1;
        }
        permit.send(envelope);
        Ok(())
    }

    /// Takes up to `max` events into `batch`; waits while the queue is
    /// empty. Returns 0 once the queue is closed.
    pub(crate) async fn take(&self, batch: &mut Vec<Envelope<T>>, max: usize) -> usize {
        let mut rx = self.rx.lock().await;
        let n = rx.recv_many(batch, max).await;
        let mut counts = self.counts_mut();
        counts.depth -= n as u64;
        counts.in_flight += n as u64;
        n
    }

    /// `n` events ended well.
    pub(crate) fn processed(&self, n: u64) {
        {
            let mut counts = self.counts_mut();
            counts.in_flight -= n;
            counts.processed += n;
        }
        self.activity.end(n);
    }

    /// An attempt failed and the event will be retried after a delay.
    pub(crate) fn retrying(&self) {
        let mut counts = self.counts_mut();
        counts.in_flight -= 1;
        counts.failed += 1;
        counts.retried += 1;
        counts.retrying += 1;
    }

    /// A retry could not be put back (shutdown): the event stays counted
    /// as retrying, which is what it is, unfinished, so the counters still
    /// add up for whoever reads them last.
    pub(crate) fn retry_abandoned(&self) {
        tracing::debug!(queue = %self.name, "retry abandoned at shutdown");
    }

    /// The last attempt failed, or the failure is permanent.
    pub(crate) fn dead_letter(&self, event: T, error: String, attempts: u32) {
        {
            let mut counts = self.counts_mut();
            counts.in_flight -= 1;
            counts.failed += 1;
            counts.dead_lettered += 1;
        }
        let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
        if dead.len() == self.max_dead_letters {
            // Bounded memory: the oldest is dropped and said so, loudly.
            if let Some(oldest) = dead.pop_front() {
                tracing::error!(queue = %self.name, event = %oldest.event.event_id(),
                    "dead-letter list full ({}); dropping the oldest", self.max_dead_letters);
            }
        }
        dead.push_back(DeadLetter {
            event,
            error,
            attempts,
            failed_at: Timestamp::now(),
        });
        drop(dead);
        self.activity.end(1);
    }

    pub fn dead_letter_count(&self) -> usize {
        self.dead.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter<T>> {
        self.dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Removes every dead letter and returns them.
    pub fn take_dead_letters(&self) -> Vec<DeadLetter<T>> {
        self.dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }
}
