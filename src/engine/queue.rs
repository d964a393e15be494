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

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::record::Timestamp;
use super::settle::Activity;
use super::store::{Acks, Outbox};
use crate::storage::effect::{self, DeadFrame, ItemFrame, TicketFrame, UptoFrame};
use crate::storage::journal::Journal;

/// What a queue can carry: cloneable, shown as JSON in dead letters.
pub trait QueueItem: Clone + Send + Sync + Serialize + 'static {
    /// The event's id, for logs and spans.
    fn event_id(&self) -> Uuid;

    /// An item from a change-log feed: its sequence, which names it among
    /// the queue's unfinished items on a data directory (0 otherwise).
    fn feed_seq(&self) -> u64 {
        0
    }

    /// The item as kept on a data directory.
    fn store(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The item [`QueueItem::store`] kept; `None` if it cannot be read
    /// back (such items are not kept across a restart).
    fn restore(_stored: serde_json::Value) -> Option<Self> {
        None
    }
}

/// Tickets of items put on a queue outside its feed (from the outbox, or
/// redriven): the LSN of the frame that put them there, with this bit set,
/// so they never collide with a feed item's sequence.
pub const OUTBOX: u64 = 1 << 63;

/// An item with the number of attempts already made on it.
#[derive(Clone, Debug)]
pub struct Envelope<T> {
    pub item: T,
    pub attempts: u32,
    /// What names the item among the queue's unfinished ones on a data
    /// directory (see [`OUTBOX`]); 0 in memory.
    pub ticket: u64,
}

/// An event given up on, with why.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetter<T> {
    pub event: T,
    pub error: String,
    pub attempts: u32,
    pub failed_at: Timestamp,
    /// On a data directory: the LSN of the frame that recorded it.
    #[serde(skip)]
    #[schema(ignore)]
    pub number: u64,
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
    /// On a data directory: the journal, and the items taken and not yet
    /// finished, by ticket, so a restart can give them back.
    tracking: OnceLock<Tracking<T>>,
    /// What the pipeline does with redriven items (see [`Queue::on_redrive`]).
    redrive: OnceLock<RedriveHook<T>>,
    /// On a shared store: where each item's end is told.
    acks: OnceLock<Arc<dyn Acks>>,
    /// On a shared store: where items put on the queue outside its feed go.
    outbox: OnceLock<Arc<dyn Outbox>>,
}

/// Why an item was not put on a queue.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Closed(#[from] Closed),
    /// The shared store could not take it; nothing was sent.
    #[error("{0}")]
    Unavailable(String),
}

/// Given the items a redrive takes from dead letters (with their tickets),
/// returns those to put back on the queue; the rest it has taken over
/// (and finished, with [`Queue::finished`]).
pub type RedriveHook<T> = Box<dyn Fn(Vec<(u64, T)>) -> Vec<(u64, T)> + Send + Sync>;

struct Tracking<T> {
    journal: Arc<Journal>,
    unfinished: Mutex<BTreeMap<u64, T>>,
}

impl<T> Tracking<T> {
    fn unfinished(&self) -> MutexGuard<'_, BTreeMap<u64, T>> {
        self.unfinished.lock().unwrap_or_else(|e| e.into_inner())
    }
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
            tracking: OnceLock::new(),
            redrive: OnceLock::new(),
            acks: OnceLock::new(),
            outbox: OnceLock::new(),
        }
    }

    /// Lets the pipeline take over redriven items instead of putting them
    /// back as they were (a saga starts a new attempt for a redriven step
    /// of one it compensated). Set once, before any redrive.
    pub fn on_redrive(&self, hook: RedriveHook<T>) {
        let _ = self.redrive.set(hook);
    }

    /// Makes this a queue fed by a shared store: the end of each item it
    /// takes is told to `acks`, and a failed attempt is handed back to the
    /// store rather than retried here.
    pub fn share(&self, acks: Arc<dyn Acks>) {
        let _ = self.acks.set(acks);
    }

    /// On a shared store: items put on this queue outside its feed go to
    /// `outbox`, which every process's consumer of the queue reads.
    pub fn share_outbox(&self, outbox: Arc<dyn Outbox>) {
        let _ = self.outbox.set(outbox);
    }

    /// Puts on the queue an item a shared store handed this process, with
    /// the attempts any process already made on it, and counts it as
    /// outstanding work here until it ends or is handed back.
    pub async fn take_over(&self, ticket: u64, item: T, attempts: u32) -> Result<(), Closed> {
        self.activity.begin(1);
        let envelope = Envelope {
            item,
            attempts,
            ticket,
        };
        let result = self.put(envelope, |c| c.enqueued += 1).await;
        if result.is_err() {
            self.activity.end(1);
        }
        result
    }

    /// On a shared store: hands a failed item back, to be tried again
    /// after `delay` by whichever process takes it then, and returns
    /// `true`. `false` (nothing done) on a queue of this process's own.
    pub(crate) fn hand_back(&self, ticket: u64, delay: std::time::Duration) -> bool {
        let Some(acks) = self.acks.get() else {
            return false;
        };
        acks.retry(ticket, delay);
        {
            let mut counts = self.counts_mut();
            counts.in_flight -= 1;
            counts.failed += 1;
            counts.retried += 1;
        }
        self.activity.end(1);
        true
    }

    /// Starts tracking items and writing dead letters to `journal`.
    pub fn attach(&self, journal: Arc<Journal>) {
        let _ = self.tracking.set(Tracking {
            journal,
            unfinished: Mutex::new(BTreeMap::new()),
        });
    }

    fn track(&self, ticket: u64, item: &T) {
        if let Some(tracking) = self.tracking.get() {
            tracking.unfinished().insert(ticket, item.clone());
        }
    }

    /// Records items that will be put on the queue outside its feed (an
    /// outbox: on a data directory they are in the log before the step
    /// that asked for them is, so a restart sends them even if the step is
    /// never redone). Returns each with its ticket, for
    /// [`Queue::send_enlisted`].
    pub fn enlist(&self, items: Vec<T>) -> Vec<(u64, T)> {
        let Some(tracking) = self.tracking.get() else {
            return items.into_iter().map(|item| (0, item)).collect();
        };
        items
            .into_iter()
            .map(|item| {
                let frame = ItemFrame {
                    q: self.name.to_string(),
                    ticket: 0,
                    item: effect::Json(item.store()),
                };
                let ticket = OUTBOX | tracking.journal.append(effect::ENLIST, &frame);
                tracking.unfinished().insert(ticket, item.clone());
                (ticket, item)
            })
            .collect()
    }

    /// Puts an enlisted item on the queue, waiting for room, and counts it
    /// as outstanding work for settle.
    pub async fn send_enlisted(&self, ticket: u64, item: T) -> Result<(), SendError> {
        if let Some(outbox) = self.outbox.get() {
            return outbox
                .send(item.event_id(), item.store())
                .await
                .map_err(|e| SendError::Unavailable(e.to_string()));
        }
        self.activity.begin(1);
        let result = self
            .put(
                Envelope {
                    item,
                    attempts: 0,
                    ticket,
                },
                |c| c.enqueued += 1,
            )
            .await;
        if result.is_err() {
            self.activity.end(1);
        }
        Ok(result?)
    }

    /// An item ended, well or dead-lettered: it is no longer owed.
    pub(crate) fn finished(&self, ticket: u64) {
        if let Some(acks) = self.acks.get() {
            acks.done(ticket);
        }
        let Some(tracking) = self.tracking.get() else {
            return;
        };
        tracking.unfinished().remove(&ticket);
        if ticket & OUTBOX != 0 {
            let frame = TicketFrame {
                q: self.name.to_string(),
                ticket,
            };
            tracking.journal.append(effect::DONE, &frame);
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
        self.deliver_ticketed(item.feed_seq(), item).await
    }

    /// Like [`Queue::deliver`], for an item that has its ticket.
    pub async fn deliver_ticketed(&self, ticket: u64, item: T) -> Result<(), Closed> {
        self.track(ticket, &item);
        self.put(
            Envelope {
                item,
                attempts: 0,
                ticket,
            },
            |c| c.enqueued += 1,
        )
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
        if let Some(tracking) = self.tracking.get() {
            let mut unfinished = tracking.unfinished();
            for item in &items {
                unfinished.insert(item.feed_seq(), item.clone());
            }
        }
        for (permit, item) in permits.zip(items) {
            let ticket = item.feed_seq();
            permit.send(Envelope {
                item,
                attempts: 0,
                ticket,
            });
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
    pub(crate) fn dead_letter(&self, ticket: u64, event: T, error: String, attempts: u32) {
        let failed_at = Timestamp::now();
        if let Some(acks) = self.acks.get()
            && acks.dead(ticket, event.store(), &error, attempts, failed_at)
        {
            let mut counts = self.counts_mut();
            counts.in_flight -= 1;
            counts.failed += 1;
            counts.dead_lettered += 1;
            drop(counts);
            self.activity.end(1);
            return;
        }
        let number = match self.tracking.get() {
            Some(tracking) => {
                let frame = DeadFrame {
                    q: self.name.to_string(),
                    n: 0,
                    ticket,
                    item: effect::Json(event.store()),
                    error: error.clone(),
                    attempts,
                    at: failed_at.into(),
                };
                // The frame's LSN numbers the letter; it is read back so.
                let number = tracking.journal.append(effect::DEAD, &frame);
                tracking.unfinished().remove(&ticket);
                number
            }
            None => 0,
        };
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
            failed_at,
            number,
        });
        drop(dead);
        if let Some(acks) = self.acks.get() {
            acks.done(ticket);
        }
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

    /// Removes every dead letter to put it back on the queue; returns how
    /// many, and the items to put back, each with its ticket for
    /// [`Queue::deliver_ticketed`] (all of them, unless the redrive hook
    /// took some over).
    pub fn redrive_letters(&self) -> (usize, Vec<(u64, T)>) {
        let letters = self.take_dead_letters(effect::REDRIVE);
        let count = letters.len();
        let items = letters
            .into_iter()
            .map(|letter| {
                let ticket = if self.tracking.get().is_some() {
                    OUTBOX | letter.number
                } else {
                    0
                };
                self.track(ticket, &letter.event);
                (ticket, letter.event)
            })
            .collect();
        let items = match self.redrive.get() {
            Some(hook) => hook(items),
            None => items,
        };
        (count, items)
    }

    /// Drops every dead letter; how many.
    pub fn discard_letters(&self) -> usize {
        self.take_dead_letters(effect::DISCARD).len()
    }

    fn take_dead_letters(&self, kind: u8) -> Vec<DeadLetter<T>> {
        let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(tracking), Some(last)) = (self.tracking.get(), dead.back()) {
            let frame = UptoFrame {
                q: self.name.to_string(),
                upto: last.number,
            };
            tracking.journal.append(kind, &frame);
        }
        dead.drain(..).collect()
    }

    // Restoring from a data directory, before the queue's handler starts.

    /// Applies one of the queue's frames read back from disk.
    pub(crate) fn restore(&self, kind: u8, lsn: u64, payload: &[u8]) -> Result<(), String> {
        let name = &self.name;
        let read = |item: serde_json::Value| {
            T::restore(item).ok_or_else(|| format!("an item of {name} that cannot be read"))
        };
        match kind {
            effect::ENLIST | effect::UNFINISHED => {
                let frame: ItemFrame = effect::decode(kind, payload)?;
                let ticket = if kind == effect::ENLIST {
                    OUTBOX | lsn
                } else {
                    frame.ticket
                };
                self.track(ticket, &read(frame.item.0)?);
            }
            effect::DONE => {
                let frame: TicketFrame = effect::decode(kind, payload)?;
                if let Some(tracking) = self.tracking.get() {
                    tracking.unfinished().remove(&frame.ticket);
                }
            }
            effect::DEAD => {
                let frame: DeadFrame = effect::decode(kind, payload)?;
                // In a snapshot the number is kept; in the log it is the LSN.
                let number = if frame.n == 0 { lsn } else { frame.n };
                if let Some(tracking) = self.tracking.get() {
                    tracking.unfinished().remove(&frame.ticket);
                }
                let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
                if dead.iter().any(|d| d.number == number) {
                    return Ok(());
                }
                if dead.len() == self.max_dead_letters {
                    dead.pop_front();
                }
                dead.push_back(DeadLetter {
                    event: read(frame.item.0)?,
                    error: frame.error,
                    attempts: frame.attempts,
                    failed_at: frame.at.get()?,
                    number,
                });
            }
            effect::REDRIVE | effect::DISCARD => {
                let frame: UptoFrame = effect::decode(kind, payload)?;
                let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
                let (gone, kept): (Vec<_>, Vec<_>) =
                    dead.drain(..).partition(|d| d.number <= frame.upto);
                dead.extend(kept);
                drop(dead);
                if kind == effect::REDRIVE {
                    for letter in gone {
                        self.track(OUTBOX | letter.number, &letter.event);
                    }
                }
            }
            _ => return Err(format!("frame kind {kind} is not a queue's")),
        }
        Ok(())
    }

    /// The items taken and not finished, by ticket (restored ones, to put
    /// back on the queue after a restart).
    pub(crate) fn unfinished(&self) -> Vec<(u64, T)> {
        self.tracking.get().map_or_else(Vec::new, |tracking| {
            tracking
                .unfinished()
                .iter()
                .map(|(ticket, item)| (*ticket, item.clone()))
                .collect()
        })
    }

    /// Tickets of the dead letters that came from the feed (their
    /// sequences), not to be delivered again after a restart.
    pub(crate) fn dead_feed_items(&self) -> std::collections::HashSet<u64> {
        self.dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| d.event.feed_seq())
            .filter(|seq| *seq != 0)
            .collect()
    }

    /// Writes the queue's dead letters and unfinished items as snapshot
    /// frames.
    pub(crate) fn save(&self, out: &mut dyn FnMut(u8, &[u8])) {
        let letters: Vec<DeadLetter<T>> = self.dead_letters();
        for letter in letters {
            let frame = DeadFrame {
                q: self.name.to_string(),
                n: letter.number,
                ticket: 0,
                item: effect::Json(letter.event.store()),
                error: letter.error,
                attempts: letter.attempts,
                at: letter.failed_at.into(),
            };
            out(effect::DEAD, &effect::encode(&frame));
        }
        for (ticket, item) in self.unfinished() {
            let frame = ItemFrame {
                q: self.name.to_string(),
                ticket,
                item: effect::Json(item.store()),
            };
            out(effect::UNFINISHED, &effect::encode(&frame));
        }
    }
}
