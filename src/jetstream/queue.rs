//! Queues shared by every process: one durable pull consumer per queue.
//!
//! A queue fed from the change log in memory is, on JetStream, a durable
//! consumer of the state stream filtered to its tables' subjects. Every
//! process pulls from the same consumer, so each change goes to one
//! process's workers; one that dies before it acks has its changes
//! delivered again to the others once `ack_wait` has passed. A failed
//! attempt is handed back with a nak that carries the handler's own retry
//! delay (backoff with jitter), and comes back to whichever process pulls
//! it then, which goes on counting its attempts from the delivery count.
//!
//! A queue that handlers put items on directly (encode jobs) reads a
//! work-queue stream instead, `<prefix>.work.<queue>`: an item is sent
//! there with its id as `Nats-Msg-Id`, so a step done again sends it once,
//! and is gone from the stream once acked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::{Acker, PublishMessage};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Connection;
use super::dead::{DeadLetters, Letter};
use super::state::{Names, StateStore};
use crate::engine::log::{Change, TableName};
use crate::engine::queue::{Queue, QueueItem};
use crate::engine::record::{RecordId, Timestamp};
use crate::engine::store::{Acks, Outbox, StoreError};
use crate::engine::table::Table;
use crate::storage::effect::{self, Correlations, StateFrame};

/// How a shared queue's consumer is made.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// How long a change taken by a process that stops answering stays
    /// its own before it goes to another.
    pub ack_wait: Duration,
    /// Changes taken and not yet finished, over every process.
    pub max_ack_pending: i64,
    /// Changes one process holds at once, taken and not yet finished: a
    /// few batches for its workers, so that it does not hoard what other
    /// processes could be doing.
    pub held: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 4_096,
            held: 64,
        }
    }
}

/// A shared queue's counts over every process, from its consumer.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ClusterCounts {
    /// Events no process has taken yet.
    pub pending: u64,
    /// Taken by some process and not yet finished (retries waiting
    /// included).
    pub in_flight: u64,
    /// Of those waiting or in flight, the ones delivered before (a retry,
    /// or a process that died or stopped answering).
    pub redelivered: u64,
}

/// A queue's durable consumer, as one process uses it.
pub struct SharedQueue<T: QueueItem> {
    consumer: PullConsumer,
    /// For a queue of changes: the process's replica, which a change must
    /// have reached before a handler reads the tables for it.
    replica: Option<Arc<StateStore>>,
    acks: Arc<StoreAcks>,
    queue: Arc<Queue<T>>,
    acker: Mutex<Option<mpsc::UnboundedReceiver<Finish>>>,
    /// How often the changes this process holds are told to JetStream as
    /// still in progress, so that a slow one is not given to another.
    progress_every: Duration,
    /// Messages this process took that had been delivered before.
    taken_again: AtomicU64,
    /// What a message holds: an item, or nothing to do (acked at once).
    decode: Decode<T>,
    /// Where redriven items go.
    back: Back,
}

/// Where a queue's redriven items go, for its consumer to deliver again:
/// for a queue of changes, a subject of their own on the state stream;
/// for a queue of items, its work subject.
struct Back {
    jetstream: async_nats::jetstream::Context,
    subject: String,
    /// Whether each item has a subject of its own (`<subject>.<number>`).
    one_each: bool,
}

impl Back {
    async fn send(&self, number: u64, item: &serde_json::Value) -> Result<(), StoreError> {
        self.send_named(&number.to_string(), item).await
    }

    /// Sends `item` named `name` (a token of letters, digits and `-`): one
    /// sent again under the same name is kept once.
    async fn send_named(&self, name: &str, item: &serde_json::Value) -> Result<(), StoreError> {
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
        let subject = if self.one_each {
            format!("{}.{name}", self.subject)
        } else {
            self.subject.clone()
        };
        let payload = serde_json::to_vec(item).map_err(|e| unavailable(&e))?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("{}:{name}", self.subject));
        self.jetstream
            .send_publish(subject, publish)
            .await
            .map_err(|e| unavailable(&e))?
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }
}

type Decode<T> = fn(&str, &[u8], u64, &mut Correlations) -> Result<Option<T>, String>;

/// What settle asks of every shared queue, whatever it carries.
pub trait Idle: Send + Sync {
    /// Whether nothing of the queue waits or is in flight anywhere.
    fn idle(&self) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.outstanding().await? == 0) })
    }

    /// How many of the queue's events wait or are in flight, anywhere.
    fn outstanding(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
}

impl<T: QueueItem> Idle for SharedQueue<T> {
    fn outstanding(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(SharedQueue::outstanding(self))
    }
}

/// The acks of the items this process has taken, by ticket (their
/// stream sequence), sent by one task so that no worker waits on them.
struct StoreAcks {
    taken: Mutex<HashMap<u64, Arc<Acker>>>,
    /// Room for the changes this process may hold (see
    /// [`QueueOptions::held`]): taken when one is, given back as it ends.
    room: Arc<Semaphore>,
    send: mpsc::UnboundedSender<Finish>,
    /// Where the queue's dead letters go, and the queue's name.
    dead: OnceLock<(DeadLetters, String)>,
}

/// How the ack task ends an item.
enum Finish {
    Ack(Arc<Acker>, AckKind),
    /// Keeps the letter, then acks.
    Dead(Arc<Acker>, Box<Letter>),
}

impl StoreAcks {
    fn take(&self, ticket: u64) -> Option<Arc<Acker>> {
        let acker = self
            .taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ticket);
        if acker.is_some() {
            self.room.add_permits(1);
        }
        acker
    }

    /// Everything this process holds, to tell JetStream it is in progress.
    fn held(&self) -> Vec<Arc<Acker>> {
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.values().cloned().collect()
    }

    fn finish(&self, ticket: u64, kind: AckKind) {
        if let Some(acker) = self.take(ticket) {
            // The receiver lives as long as the queue's feed.
            let _ = self.send.send(Finish::Ack(acker, kind));
        }
    }
}

impl Acks for StoreAcks {
    fn done(&self, ticket: u64) {
        self.finish(ticket, AckKind::Ack);
    }

    fn retry(&self, ticket: u64, delay: Duration) {
        self.finish(ticket, AckKind::Nak(Some(delay)));
    }

    fn dead(
        &self,
        ticket: u64,
        item: serde_json::Value,
        error: &str,
        attempts: u32,
        at: Timestamp,
    ) -> bool {
        if self.dead.get().is_none() {
            return false;
        }
        if let Some(acker) = self.take(ticket) {
            let letter = Letter {
                item,
                error: error.to_owned(),
                attempts,
                failed_at: at.to_string(),
            };
            let _ = self.send.send(Finish::Dead(acker, Box::new(letter)));
        }
        true
    }
}

impl SharedQueue<Arc<Change>> {
    /// Opens (making it if need be) the consumer of `queue`, which carries
    /// every change of `tables`, and makes `queue` tell it of each end.
    pub async fn open(
        store: &Arc<StateStore>,
        names: &Names,
        queue: Arc<Queue<Arc<Change>>>,
        tables: &[TableName],
        options: &QueueOptions,
    ) -> Result<Arc<Self>, StoreError> {
        let mut filter: Vec<String> = tables.iter().map(|t| names.table_subjects(t)).collect();
        filter.push(names.redrive_subjects(queue.name()));
        let consumer = consumer(store.stream(), names, queue.name(), filter, options).await?;
        let back = Back {
            jetstream: store.jetstream().clone(),
            subject: names.redrive_subject(queue.name()),
            one_each: true,
        };
        Ok(Self::made(
            consumer,
            Some(store.clone()),
            queue,
            decode_change,
            back,
            options,
        ))
    }
}

impl<T: QueueItem> SharedQueue<T> {
    /// Opens (making them if need be) the work stream and the consumer of
    /// `queue`, a queue that handlers put items on, and makes `queue` send
    /// what is put on it there.
    pub async fn open_items(
        connection: &Connection,
        names: &Names,
        queue: Arc<Queue<T>>,
        options: &QueueOptions,
        replicas: usize,
    ) -> Result<Arc<Self>, StoreError> {
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
        let config = stream::Config {
            name: names.work_stream(),
            subjects: vec![names.work_subjects()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let stream = connection
            .stream(config)
            .await
            .map_err(|e| unavailable(&e))?;
        let subject = names.work_subject(queue.name());
        let consumer =
            consumer(&stream, names, queue.name(), vec![subject.clone()], options).await?;
        queue.share_outbox(Arc::new(Work {
            jetstream: connection.jetstream.clone(),
            subject: subject.clone(),
        }));
        let back = Back {
            jetstream: connection.jetstream.clone(),
            subject,
            one_each: false,
        };
        Ok(Self::made(
            consumer,
            None,
            queue,
            decode_item,
            back,
            options,
        ))
    }

    fn made(
        consumer: PullConsumer,
        replica: Option<Arc<StateStore>>,
        queue: Arc<Queue<T>>,
        decode: Decode<T>,
        back: Back,
        options: &QueueOptions,
    ) -> Arc<Self> {
        let (send, receive) = mpsc::unbounded_channel();
        let acks = Arc::new(StoreAcks {
            taken: Mutex::new(HashMap::new()),
            room: Arc::new(Semaphore::new(options.held.max(1))),
            send,
            dead: OnceLock::new(),
        });
        queue.share(acks.clone());
        Arc::new(Self {
            consumer,
            replica,
            acks,
            queue,
            acker: Mutex::new(Some(receive)),
            progress_every: (options.ack_wait / 3).max(Duration::from_millis(100)),
            taken_again: AtomicU64::new(0),
            decode,
            back,
        })
    }

    /// Keeps the queue's dead letters in `letters`, where every process
    /// sees them, rather than in this process.
    pub fn keep_dead_letters(&self, letters: DeadLetters) {
        let _ = self.acks.dead.set((letters, self.queue.name().to_string()));
    }

    /// The queue's dead letters, oldest first, with their numbers.
    pub async fn dead_letters(&self) -> Result<Vec<(u64, Letter)>, StoreError> {
        match self.acks.dead.get() {
            Some((letters, queue)) => letters.list(queue).await,
            None => Ok(Vec::new()),
        }
    }

    /// Drops the queue's dead letters; how many.
    pub async fn discard(&self) -> Result<usize, StoreError> {
        let Some((letters, queue)) = self.acks.dead.get() else {
            return Ok(0);
        };
        let kept = letters.list(queue).await?;
        if let Some((last, _)) = kept.last() {
            letters.drop_through(queue, *last).await?;
        }
        Ok(kept.len())
    }

    /// Puts the queue's dead letters back, for whichever process pulls
    /// them, then drops them; how many. Each goes back named by its
    /// letter's number, so a redrive cut short and done again puts it
    /// back once.
    pub async fn redrive(&self) -> Result<usize, StoreError> {
        self.redrive_taking(|_| async { false }).await
    }

    /// [`SharedQueue::redrive`], where `take` may take a letter's item
    /// over instead (it is then dropped with the others, not put back): a
    /// redrive cut short and done again asks `take` again.
    pub async fn redrive_taking<F, Taken>(&self, mut take: F) -> Result<usize, StoreError>
    where
        F: FnMut(T) -> Taken,
        Taken: std::future::Future<Output = bool>,
    {
        let Some((letters, queue)) = self.acks.dead.get() else {
            return Ok(0);
        };
        let kept = letters.list(queue).await?;
        for (number, letter) in &kept {
            if let Some(item) = T::restore(letter.item.clone())
                && take(item).await
            {
                continue;
            }
            self.back.send(*number, &letter.item).await?;
        }
        if let Some((last, _)) = kept.last() {
            letters.drop_through(queue, *last).await?;
        }
        Ok(kept.len())
    }

    /// Puts `item` (as [`QueueItem::store`] keeps it) back on the queue,
    /// for whichever process takes it, named `name` (letters, digits and
    /// `-`): one put back again under the same name is delivered once.
    pub async fn put_back(&self, name: &str, item: &serde_json::Value) -> Result<(), StoreError> {
        self.back.send_named(name, item).await
    }

    /// Whether no change of this queue waits or is in flight anywhere.
    pub async fn idle(&self) -> Result<bool, StoreError> {
        Ok(self.outstanding().await? == 0)
    }

    /// How many of this queue's events wait or are in flight, anywhere.
    pub async fn outstanding(&self) -> Result<u64, StoreError> {
        let mut consumer = self.consumer.clone();
        let info = consumer
            .info()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// How many messages this process took that had been delivered before
    /// (to it or to another).
    pub fn taken_again(&self) -> u64 {
        self.taken_again.load(Ordering::Relaxed)
    }

    /// Whether the consumer has events no process has taken.
    async fn waiting(&self) -> bool {
        let mut consumer = self.consumer.clone();
        consumer.info().await.is_ok_and(|info| info.num_pending > 0)
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        self.queue.name()
    }

    /// The queue's consumer: delivered, waiting and in-flight counts over
    /// every process.
    pub async fn cluster_counts(&self) -> Result<ClusterCounts, StoreError> {
        let mut consumer = self.consumer.clone();
        let info = consumer
            .info()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(ClusterCounts {
            pending: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        })
    }

    /// Pulls changes onto the local queue, for its workers, until `stop`.
    pub async fn feed(self: Arc<Self>, stop: CancellationToken) {
        let receive = self.acker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(receive) = receive {
            tokio::spawn(send_acks(receive, self.acks.clone()));
            tokio::spawn(send_progress(
                self.acks.clone(),
                self.progress_every,
                stop.clone(),
            ));
        }
        let batch = self.acks.room.available_permits().clamp(1, 64);
        let mut correlations = Correlations::default();
        loop {
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(batch)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(queue = %self.queue.name(), %error, "cannot pull");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = tokio::time::timeout(STALL, messages.next()) => message,
                };
                match message {
                    Ok(Some(Ok(message))) => {
                        if !self.take(message, &mut correlations).await {
                            return;
                        }
                    }
                    Ok(Some(Err(error))) => {
                        tracing::warn!(queue = %self.queue.name(), %error, "pulling");
                    }
                    Ok(None) => break,
                    // Nothing came while some wait: the pull may have been
                    // left on a NATS node that died, which the client can
                    // take a minute to notice. Pulled again.
                    Err(_) if self.waiting().await => {
                        tracing::warn!(queue = %self.queue.name(), "pulling stalled; pulling again");
                        break;
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// Puts one pulled message's change on the queue (acking at once one
    /// that carries none). `false` once the queue is closed.
    async fn take(
        &self,
        message: async_nats::jetstream::Message,
        correlations: &mut Correlations,
    ) -> bool {
        let (seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::warn!(%error, "a queued message without its sequence");
                return true;
            }
        };
        let subject = message.subject.to_string();
        let item = (self.decode)(&subject, &message.payload, seq, correlations);
        let (_, acker) = message.split();
        let item = match item {
            Ok(Some(item)) => item,
            Ok(None) => {
                let _ = self
                    .acks
                    .send
                    .send(Finish::Ack(Arc::new(acker), AckKind::Ack));
                return true;
            }
            Err(error) => {
                tracing::warn!(queue = %self.queue.name(), %subject, seq, %error,
                    "a state message no handler can read; left");
                let _ = self
                    .acks
                    .send
                    .send(Finish::Ack(Arc::new(acker), AckKind::Term));
                return true;
            }
        };
        // Waits for room while this process holds its share; the ones it
        // holds are told in progress meanwhile, so none is given away.
        let acker = Arc::new(acker);
        let room = self.acks.room.clone().acquire_owned().await;
        let Ok(room) = room else {
            return false;
        };
        room.forget();
        self.acks
            .taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, acker);
        let attempts = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
        if delivered > 1 {
            self.taken_again.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(replica) = &self.replica {
            // A handler reads the tables as of this change at least.
            replica.caught_up(seq).await;
        }
        self.queue.take_over(seq, item, attempts).await.is_ok()
    }
}

/// The durable consumer of `queue` on `stream`, made if need be.
async fn consumer(
    stream: &stream::Stream,
    names: &Names,
    queue: &str,
    filter_subjects: Vec<String>,
    options: &QueueOptions,
) -> Result<PullConsumer, StoreError> {
    let name = names.consumer(queue);
    let config = pull::Config {
        durable_name: Some(name.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: options.ack_wait,
        max_ack_pending: options.max_ack_pending,
        deliver_policy: DeliverPolicy::All,
        filter_subjects,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&name, config)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// Where a queue's items go: its subject of the work stream.
struct Work {
    jetstream: async_nats::jetstream::Context,
    subject: String,
}

impl Outbox for Work {
    fn send(&self, id: Uuid, item: serde_json::Value) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
            let payload = serde_json::to_vec(&item).map_err(|e| unavailable(&e))?;
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(id.to_string());
            self.jetstream
                .send_publish(self.subject.clone(), publish)
                .await
                .map_err(|e| unavailable(&e))?
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(())
        })
    }
}

/// An item as [`Work`] sent it.
fn decode_item<T: QueueItem>(
    _: &str,
    payload: &[u8],
    _: u64,
    _: &mut Correlations,
) -> Result<Option<T>, String> {
    let stored: serde_json::Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    T::restore(stored)
        .map(Some)
        .ok_or_else(|| "an item this queue cannot read".to_owned())
}

/// The change a state message carries, if any.
fn decode_change(
    subject: &str,
    payload: &[u8],
    seq: u64,
    correlations: &mut Correlations,
) -> Result<Option<Arc<Change>>, String> {
    if subject.contains(".redrive.") {
        // A dead letter's change, put back whole.
        return decode_item(subject, payload, seq, correlations);
    }
    let frame: StateFrame = effect::decode(effect::STATE, payload)?;
    let table: TableName = frame.t.as_str().into();
    if !subject.contains(&format!(".state.{table}.")) {
        return Err(format!("it holds a state of `{table}`"));
    }
    let change = Table::carried(
        &table,
        RecordId::derived(frame.id),
        seq,
        frame.e,
        frame.change,
        correlations,
    )?;
    Ok(change.map(Arc::new))
}

async fn send_acks(mut receive: mpsc::UnboundedReceiver<Finish>, acks: Arc<StoreAcks>) {
    while let Some(finish) = receive.recv().await {
        let (acker, kind) = match finish {
            Finish::Ack(acker, kind) => (acker, kind),
            Finish::Dead(acker, letter) => {
                let Some((letters, queue)) = acks.dead.get() else {
                    continue;
                };
                if let Err(error) = letters.record(queue, &letter).await {
                    // Not acked either: the item comes back after
                    // `ack_wait`, and is given up on again.
                    tracing::warn!(%queue, %error, "dead letter not kept");
                    continue;
                }
                (acker, AckKind::Ack)
            }
        };
        if let Err(error) = acker.ack_with(kind).await {
            // Not acked: JetStream delivers it again after `ack_wait`, and
            // handlers are safe to redo.
            tracing::warn!(%error, "ack not sent");
        }
    }
}

/// Tells JetStream, every `every`, that the changes this process holds
/// are in progress (reset their `ack_wait`), until `stop`: one that waits
/// for a worker, or whose handler is slow, stays with this process while it
/// lives, and goes to another within `ack_wait` once it dies.
async fn send_progress(acks: Arc<StoreAcks>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        for acker in acks.held() {
            if let Err(error) = acker.ack_with(AckKind::Progress).await {
                tracing::debug!(%error, "progress not sent");
            }
        }
    }
}

/// How long a pull may bring nothing while the consumer has events
/// waiting before it is made again.
const STALL: Duration = Duration::from_secs(2);

/// How often [`settle`] asks JetStream how the queues stand.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// Waits until no change of `queues` waits or is in flight in any process:
/// every consumer has nothing pending and nothing unacked, twice in a row
/// with the state stream's last sequence the same both times (a handler
/// writes what it derives before it acks, so work it caused shows as a
/// new sequence), and this process has applied the stream that far.
/// `Ok(false)` if `timeout` passed first.
pub async fn settle(
    store: &StateStore,
    queues: &[Arc<dyn Idle>],
    timeout: Duration,
) -> Result<bool, StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_at = None;
    loop {
        // JetStream not answering (a node lost, a leader being elected) is
        // asked again until the deadline, and reported only then.
        match quiet(store, queues).await {
            Ok(Some(last)) if quiet_at == Some(last) => {
                return Ok(tokio::time::timeout_at(deadline, store.caught_up(last))
                    .await
                    .is_ok());
            }
            Ok(now) => quiet_at = now,
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
            Err(_) => quiet_at = None,
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// The state stream's last sequence if no queue has anything waiting or in
/// flight, `None` if one has.
async fn quiet(store: &StateStore, queues: &[Arc<dyn Idle>]) -> Result<Option<u64>, StoreError> {
    let last = store.last().await?;
    for queue in queues {
        if !queue.idle().await? {
            return Ok(None);
        }
    }
    Ok(Some(last))
}
