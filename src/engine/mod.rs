//! The engine: Tables, Queues and Handlers, and the change log that joins
//! them. It knows nothing about movies; a pipeline is built by declaring
//! tables, queues fed from tables' changes, and handlers on queues.
//!
//! - [`record`]: timestamps, versions, ids and canonical data.
//! - [`table`]: versioned maps that drop stale and no-op writes.
//! - [`log`]: the change log, the outbox every table change goes through.
//! - [`queue`]: bounded streams that deliver every event.
//! - [`handler`]: worker pools with retry, dead letters, breaker, faults.
//! - [`children`]: parent-owned children (a parent's child list as a record).
//! - [`settle`]: waiting until nothing is left to do.
//! - [`topology`]: the shape of a pipeline, for display.

pub mod children;
pub mod dedup;
pub mod handler;
pub mod log;
pub mod metrics;
pub mod queue;
pub mod record;
pub mod settle;
pub mod store;
pub mod table;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use handler::{Fault, Handler, HandlerConfig, HandlerStats, Process};
use log::{Change, ChangeLog, SubscriberId};
use queue::{DeadLetter, Queue, QueueCounts, QueueItem};
use settle::Activity;
use table::{Table, TableKind};
use topology::Topology;

use crate::storage::effect::{Correlations, EventImage};
use crate::storage::journal::Journal;

impl QueueItem for Arc<Change> {
    fn event_id(&self) -> Uuid {
        self.id
    }

    fn feed_seq(&self) -> u64 {
        self.seq
    }

    fn store(&self) -> serde_json::Value {
        serde_json::to_value(EventImage::of(self)).unwrap_or_default()
    }

    fn restore(stored: serde_json::Value) -> Option<Self> {
        let image: EventImage = serde_json::from_value(stored).ok()?;
        image.get(&mut Correlations::default()).ok().map(Arc::new)
    }
}

/// A queue as the HTTP layer sees it, whatever it carries.
pub trait QueueView: Send + Sync {
    fn name(&self) -> &str;
    fn snapshot(&self) -> QueueSnapshot;
    fn dead_letters(&self) -> Vec<DeadLetter<serde_json::Value>>;
    /// Puts every dead letter back on the queue; returns how many.
    fn redrive(&self) -> usize;
    /// Drops every dead letter; returns how many.
    fn discard(&self) -> usize;
    /// Re-delivers the retained changes after `after` that the queue was
    /// already given; how many (`None`: the queue is not fed from the log).
    fn replay(&self, after: u64) -> Option<Result<usize, log::Gone>>;
    /// On a data directory: starts writing its effects to `journal`.
    fn attach(&self, journal: Arc<Journal>);
    /// Applies a frame of this queue read back from disk.
    fn restore(&self, kind: u8, lsn: u64, payload: &[u8]) -> Result<(), String>;
    /// After a restart, before the log's restore ends: sets where its feed
    /// resumes (`cursor`, from the snapshot; the oldest change without one).
    fn set_cursor(&self, cursor: Option<u64>);
    /// After a restart, once the log's restore has ended: puts back what
    /// was taken and not finished (feed items before the cursor; the rest
    /// come again from the log).
    fn resume(&self, cursor: Option<u64>);
    /// Writes its state as snapshot frames.
    fn save(&self, out: &mut dyn FnMut(u8, &[u8]));
    /// Its place in the change log, if it is fed from it.
    fn feed(&self) -> Option<SubscriberId>;
}

/// A handler as the HTTP layer sees it.
pub trait HandlerView: Send + Sync {
    fn name(&self) -> &str;
    fn stats(&self) -> HandlerStats;
    fn fault(&self) -> Option<Fault>;
    fn set_fault(&self, fault: Option<Fault>);
}

/// A queue's counters, capacity and change-log backlog.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct QueueSnapshot {
    pub name: String,
    pub capacity: usize,
    #[serde(flatten)]
    pub counts: QueueCounts,
    /// Changes recorded for this queue and not yet put on it.
    pub backlog: u64,
    /// Events now in the dead-letter list (on JetStream: kept there, for
    /// every instance).
    pub dead_letters: usize,
    /// On JetStream: the queue over every instance, from its consumer there;
    /// the other counters are this instance's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::jetstream::queue::ClusterCounts>,
    /// On JetStream: events this instance took that an earlier delivery
    /// had not finished (a retry handed back, or an instance that died or
    /// stopped answering).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_again: Option<u64>,
}

struct RegisteredQueue<T> {
    queue: Arc<Queue<T>>,
    feed: Option<(Arc<ChangeLog>, SubscriberId)>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl<T: QueueItem> QueueView for RegisteredQueue<T> {
    fn name(&self) -> &str {
        self.queue.name()
    }

    fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            name: self.queue.name().to_string(),
            capacity: self.queue.capacity(),
            counts: self.queue.counts(),
            backlog: self.feed.as_ref().map_or(0, |(log, sub)| log.backlog(*sub)),
            dead_letters: self.queue.dead_letter_count(),
            cluster: None,
            taken_again: None,
        }
    }

    fn dead_letters(&self) -> Vec<DeadLetter<serde_json::Value>> {
        self.queue
            .dead_letters()
            .into_iter()
            .map(|d| DeadLetter {
                event: serde_json::to_value(&d.event).unwrap_or_default(),
                error: d.error,
                attempts: d.attempts,
                failed_at: d.failed_at,
                number: d.number,
            })
            .collect()
    }

    fn redrive(&self) -> usize {
        let (count, items) = self.queue.redrive_letters();
        self.put_back(items);
        count
    }

    fn discard(&self) -> usize {
        self.queue.discard_letters()
    }

    fn replay(&self, after: u64) -> Option<Result<usize, log::Gone>> {
        let (log, sub) = self.feed.as_ref()?;
        Some(log.delivered_after(*sub, after).map(|changes| {
            let count = changes.len();
            let items = changes
                .into_iter()
                .filter_map(|c| T::restore(QueueItem::store(&c)))
                .collect();
            // Enlisted like an outbox's items: on a data directory a replay
            // that was acknowledged is finished after a restart too.
            self.put_back(self.queue.enlist(items));
            count
        }))
    }

    fn attach(&self, journal: Arc<Journal>) {
        self.queue.attach(journal);
    }

    fn restore(&self, kind: u8, lsn: u64, payload: &[u8]) -> Result<(), String> {
        self.queue.restore(kind, lsn, payload)
    }

    fn set_cursor(&self, cursor: Option<u64>) {
        if let Some((log, sub)) = &self.feed {
            let skip = self.queue.dead_feed_items();
            log.restore_cursor(*sub, cursor.unwrap_or(0), skip);
        }
    }

    fn resume(&self, cursor: Option<u64>) {
        let mut items = self.queue.unfinished();
        if self.feed.is_some() {
            let cursor = cursor.unwrap_or(0);
            items.retain(|(ticket, _)| *ticket & queue::OUTBOX != 0 || *ticket < cursor);
        }
        self.put_back(items);
    }

    fn save(&self, out: &mut dyn FnMut(u8, &[u8])) {
        self.queue.save(out);
    }

    fn feed(&self) -> Option<SubscriberId> {
        self.feed.as_ref().map(|(_, sub)| *sub)
    }
}

impl<T: QueueItem> RegisteredQueue<T> {
    fn put_back(&self, items: Vec<(u64, T)>) {
        put_back(&self.queue, items, &self.tasks, &self.cancel);
    }
}

/// Puts ticketed items on `queue` from a task: the queue may be full, and
/// whoever asked should not wait for room; they are counted now, so settle
/// waits for them.
fn put_back<T: QueueItem>(
    queue: &Arc<Queue<T>>,
    items: Vec<(u64, T)>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    let count = items.len() as u64;
    if count == 0 {
        return;
    }
    let queue = queue.clone();
    let cancel = cancel.clone();
    queue.owe(count);
    tasks.spawn(async move {
        let mut left = count;
        for (ticket, item) in items {
            let delivered = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                d = queue.deliver_ticketed(ticket, item) => d,
            };
            if delivered.is_err() {
                break;
            }
            left -= 1;
        }
        if left > 0 {
            queue.forgive(left);
        }
    });
}

impl<T: QueueItem, P: Process<T>> HandlerView for Handler<T, P> {
    fn name(&self) -> &str {
        Handler::name(self)
    }

    fn stats(&self) -> HandlerStats {
        Handler::stats(self)
    }

    fn fault(&self) -> Option<Fault> {
        Handler::fault(self)
    }

    fn set_fault(&self, fault: Option<Fault>) {
        Handler::set_fault(self, fault)
    }
}

/// Limits that keep memory bounded.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Change-log events kept (more while a queue has not received them).
    pub event_retention: usize,
    /// Dead letters kept per queue.
    pub max_dead_letters: usize,
    /// Ids each table keeps at most (`u64::MAX` for no limit).
    pub max_records: u64,
}

/// The running parts of a pipeline and the tasks that drive them.
pub struct Engine {
    pub log: Arc<ChangeLog>,
    pub activity: Activity,
    pub topology: Topology,
    pub metrics: metrics::EngineMetrics,
    config: EngineConfig,
    tasks: TaskTracker,
    cancel: CancellationToken,
    tables: Vec<Arc<Table>>,
    queues: Vec<Arc<dyn QueueView>>,
    handlers: Vec<Arc<dyn HandlerView>>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        let activity = Activity::default();
        Self {
            log: Arc::new(ChangeLog::new(config.event_retention, activity.clone())),
            activity,
            topology: Topology::default(),
            metrics: Default::default(),
            config,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            tables: Vec::new(),
            queues: Vec::new(),
            handlers: Vec::new(),
        }
    }

    pub fn add_table(&mut self, name: &str, kind: TableKind) -> Arc<Table> {
        let table = Arc::new(Table::new(name, kind, self.log.clone()));
        table.set_limit(self.config.max_records);
        self.tables.push(table.clone());
        self.topology.node(name, topology::NodeKind::Table);
        table
    }

    /// A table of the server's own that no queue reads and no scenario
    /// shows (the audit trail): in `/tables` and the change log, not in
    /// the topology.
    pub fn add_system_table(&mut self, name: &str) -> Arc<Table> {
        let table = Arc::new(Table::new(name, TableKind::System, self.log.clone()));
        table.set_limit(self.config.max_records);
        self.tables.push(table.clone());
        table
    }

    /// A raw table of parents' child lists (see [`children`]).
    pub fn add_listing_table(&mut self, name: &str) -> Arc<Table> {
        let table = Arc::new(Table::listing(name, self.log.clone()));
        table.set_limit(self.config.max_records);
        self.tables.push(table.clone());
        self.topology.node(name, topology::NodeKind::Table);
        table
    }

    /// A queue that handlers put events on directly.
    pub fn add_queue<T: QueueItem>(&mut self, name: &str, capacity: usize) -> Arc<Queue<T>> {
        let queue = self.new_queue(name, capacity);
        self.register_queue(queue.clone(), None);
        queue
    }

    /// A queue fed from the change log with every change of `tables`, and
    /// its place in the log (for its backlog).
    pub fn add_fed_queue(
        &mut self,
        name: &str,
        capacity: usize,
        tables: &[&Arc<Table>],
    ) -> (Arc<Queue<Arc<Change>>>, SubscriberId) {
        let queue = self.new_queue(name, capacity);
        let names: Vec<_> = tables.iter().map(|t| t.name().clone()).collect();
        let subscriber = self.log.subscribe(&names);
        self.tasks.spawn(dispatch(
            self.log.clone(),
            subscriber,
            queue.clone(),
            self.cancel.clone(),
        ));
        self.register_queue(queue.clone(), Some(subscriber));
        (queue, subscriber)
    }

    fn new_queue<T: QueueItem>(&mut self, name: &str, capacity: usize) -> Arc<Queue<T>> {
        self.topology.node(name, topology::NodeKind::Queue);
        Arc::new(Queue::new(
            name,
            capacity,
            self.config.max_dead_letters,
            self.activity.clone(),
        ))
    }

    fn register_queue<T: QueueItem>(&mut self, queue: Arc<Queue<T>>, feed: Option<SubscriberId>) {
        self.queues.push(Arc::new(RegisteredQueue {
            queue,
            feed: feed.map(|s| (self.log.clone(), s)),
            tasks: self.tasks.clone(),
            cancel: self.cancel.clone(),
        }));
    }

    /// Starts a handler's workers on `queue`.
    pub fn add_handler<T: QueueItem, P: Process<T>>(
        &mut self,
        name: &str,
        queue: &Arc<Queue<T>>,
        process: P,
        config: HandlerConfig,
    ) -> Arc<Handler<T, P>> {
        let duration = self
            .metrics
            .handler_duration
            .get_or_create(&metrics::HandlerLabel {
                handler: name.to_string(),
            })
            .clone();
        let handler = Handler::start(
            name,
            queue.clone(),
            process,
            config,
            duration,
            self.tasks.clone(),
            self.cancel.clone(),
        );
        self.handlers.push(handler.clone());
        self.topology.node(name, topology::NodeKind::Handler);
        handler
    }

    pub fn tables(&self) -> &[Arc<Table>] {
        &self.tables
    }

    pub fn table(&self, name: &str) -> Option<&Arc<Table>> {
        self.tables.iter().find(|t| &**t.name() == name)
    }

    pub fn queues(&self) -> &[Arc<dyn QueueView>] {
        &self.queues
    }

    pub fn queue(&self, name: &str) -> Option<&Arc<dyn QueueView>> {
        self.queues.iter().find(|q| q.name() == name)
    }

    pub fn handlers(&self) -> &[Arc<dyn HandlerView>] {
        &self.handlers
    }

    pub fn handler(&self, name: &str) -> Option<&Arc<dyn HandlerView>> {
        self.handlers.iter().find(|h| h.name() == name)
    }

    /// Waits until every queue is empty, nothing is in flight and no retry
    /// is pending; `false` if `timeout` passed first.
    pub async fn settle(&self, timeout: Duration) -> bool {
        self.activity.settle(timeout).await
    }

    /// A token cancelled when the engine shuts down (live streams end on it).
    /// Runs a task of the pipeline's own until shutdown (it must end once
    /// [`Engine::shutdown_token`] is cancelled).
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Puts enlisted items (see [`Queue::enlist`]) on `queue` without
    /// waiting for room; settle waits for them.
    pub fn put_back<T: QueueItem>(&self, queue: &Arc<Queue<T>>, items: Vec<(u64, T)>) {
        put_back(queue, items, &self.tasks, &self.cancel);
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Lets the pipeline drain for up to `timeout`, then stops every task.
    /// Returns how many events were left unfinished.
    pub async fn shutdown(&self, timeout: Duration) -> u64 {
        let drained = self.settle(timeout).await;
        let left = self.activity.outstanding();
        if !drained {
            tracing::warn!(left, "shutdown timeout: events left unfinished");
            for queue in &self.queues {
                let s = queue.snapshot();
                tracing::warn!(queue = %s.name, depth = s.counts.depth, in_flight = s.counts.in_flight,
                    retrying = s.counts.retrying, backlog = s.backlog, "left in queue");
            }
        }
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        left
    }
}

/// Moves a subscriber's changes from the log onto its queue, advancing the
/// log cursor only once the queue has taken them. Changes move in batches:
/// one wait for room, one count update and one cursor move per batch.
async fn dispatch(
    log: Arc<ChangeLog>,
    subscriber: SubscriberId,
    queue: Arc<Queue<Arc<Change>>>,
    cancel: CancellationToken,
) {
    let appended = log.appended(subscriber);
    let batch = queue.capacity().min(DISPATCH_BATCH);
    loop {
        let (changes, cursor) = log.pending(subscriber, batch);
        let count = changes.len() as u64;
        if count == 0 {
            // Owed nothing: the log moves this cursor past other tables'
            // changes itself, so there is nothing to record before waiting.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = appended.notified() => continue,
            }
        }
        let delivered = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            d = queue.deliver_all(changes) => d,
        };
        if delivered.is_err() {
            return;
        }
        log.delivered(subscriber, cursor, count);
    }
}

/// Changes a dispatcher moves at once (fewer if the queue holds fewer).
const DISPATCH_BATCH: usize = 256;
