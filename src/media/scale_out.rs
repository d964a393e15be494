//! The pipeline on NATS JetStream (`--nats-url`): many processes, one
//! pipeline.
//!
//! Each process builds the same pipeline as in memory, then makes it a
//! replica of the streams under one prefix:
//!
//! - every table (raw, listing, standard, `encodes`, `audit`) keeps its
//!   records' states on the state stream, one subject per record, and
//!   writes by compare-and-set there; the state a write publishes carries
//!   its change, so the stream is also the change log, which each process
//!   follows into its tables and its log;
//! - `raw_queue` is a durable pull consumer of the raw and listing tables'
//!   subjects, shared by every process's `raw_handler`;
//! - `encode_queue` is a consumer of a work-queue stream, where jobs are
//!   published under their own ids (a step done again sends each once);
//! - dead letters of both queues, and the CloudEvents dedup window, are
//!   streams of their own.
//!
//! Each process also runs scenario 5's projection and scenario 6's saga
//! over the whole change log it follows, and writes the view and
//! publication records to the state stream at the positions it read (see
//! `projection` and `saga`): the newest position's write is kept, and the
//! jobs of a saga's new attempt, named alike by every process, are kept
//! once on the work stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::engine::dedup::DedupKey;
use crate::engine::log::{Cause, Change, Gone, TableName};
use crate::engine::queue::QueueItem;
use crate::engine::record::{RecordId, Timestamp};
use crate::engine::store::{SharedWindow, Store, StoreError};
use crate::engine::table::{
    Expect, Outcome, PreconditionFailed, Reconciliation, Write, WriteError,
};
use crate::jetstream::dead::DeadLetters;
use crate::jetstream::dedup::Window;
use crate::jetstream::queue::{ClusterCounts, Idle, QueueOptions, SharedQueue};
use crate::jetstream::state::{BadPrefix, Names, OpenError, Replicas, StateOptions, StateStore};
use crate::jetstream::{self, ConnectError, Connection};

use super::encode_handler::EncodeJob;
use super::pipeline::{ENCODE_BATCH, Pipeline, PipelineConfig, RAW_BATCH, Refused};
use super::records::Kind;

/// Where the pipeline's JetStream is, and how its streams are made.
#[derive(Clone, Debug)]
pub struct ScaleOut {
    /// `nats://host:port`, or several separated by commas.
    pub url: String,
    /// Names every stream and consumer (`<prefix>_state`, ...).
    pub prefix: String,
    /// Copies JetStream keeps of each message: 1, or 3 on a cluster.
    pub replicas: usize,
    /// How long to try to reach the server at start-up.
    pub connect_within: Duration,
    /// How long an event taken by a process that stops answering stays
    /// its own before another takes it.
    pub ack_wait: Duration,
}

/// Why the pipeline cannot start on JetStream.
#[derive(Debug, thiserror::Error)]
pub enum ScaleOutError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Prefix(#[from] BadPrefix),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot read the JetStream state: {0}")]
    Store(#[from] StoreError),
    /// `App::open` cannot wait for NATS: `App::connect` does.
    #[error("--nats-url needs App::connect, which waits for NATS")]
    NeedsAsync,
}

/// The streams and consumers a pipeline runs on.
pub struct Shared {
    pub connection: Connection,
    pub store: Arc<StateStore>,
    pub raw_queue: Arc<SharedQueue<Arc<Change>>>,
    pub encode_queue: Arc<SharedQueue<EncodeJob>>,
    pub prefix: String,
    window: Window,
    /// The tables whose changes feed `raw_queue`.
    fed: Vec<TableName>,
    /// Each shared queue's dead letters when last counted (for metrics,
    /// which are read without waiting).
    dead_counted: std::sync::Mutex<HashMap<String, usize>>,
}

/// Records of one ingest request written to JetStream at once.
const WRITES_AT_ONCE: usize = 64;

impl Shared {
    /// Whether the connection to NATS is up now.
    pub fn connected(&self) -> bool {
        matches!(
            self.connection.client.connection_state(),
            async_nats::connection::State::Connected
        )
    }

    /// The shared queue named `name`, as the HTTP layer's dead-letter
    /// routes use it.
    pub fn queue(&self, name: &str) -> Option<&dyn SharedLetters> {
        if name == self.raw_queue.name() {
            Some(&*self.raw_queue)
        } else if name == self.encode_queue.name() {
            Some(&*self.encode_queue)
        } else {
            None
        }
    }

    /// How many of the shared queue `name`'s messages this instance took
    /// that had been delivered before.
    pub fn taken_again(&self, name: &str) -> Option<u64> {
        if name == self.raw_queue.name() {
            Some(self.raw_queue.taken_again())
        } else if name == self.encode_queue.name() {
            Some(self.encode_queue.taken_again())
        } else {
            None
        }
    }

    /// The queue named `name` over every instance: its dead letters and
    /// its consumer's counts; `None` if it is not a shared queue.
    pub async fn counts(
        &self,
        name: &str,
    ) -> Option<(Result<usize, StoreError>, Result<ClusterCounts, StoreError>)> {
        let (letters, counts) = if name == self.raw_queue.name() {
            (
                self.raw_queue.dead_letters().await,
                self.raw_queue.cluster_counts().await,
            )
        } else if name == self.encode_queue.name() {
            (
                self.encode_queue.dead_letters().await,
                self.encode_queue.cluster_counts().await,
            )
        } else {
            return None;
        };
        Some((letters.map(|l| l.len()), counts))
    }

    /// Counts each shared queue's dead letters again, for
    /// [`Shared::dead_letters_counted`].
    pub async fn count_dead_letters(&self) -> Result<(), StoreError> {
        let counts = [
            (
                self.raw_queue.name(),
                self.raw_queue.dead_letters().await?.len(),
            ),
            (
                self.encode_queue.name(),
                self.encode_queue.dead_letters().await?.len(),
            ),
        ];
        let mut counted = self.dead_counted.lock().unwrap_or_else(|e| e.into_inner());
        for (name, count) in counts {
            counted.insert(name.to_string(), count);
        }
        Ok(())
    }

    /// The queue `name`'s dead letters at the last count.
    pub fn dead_letters_counted(&self, name: &str) -> Option<usize> {
        let counted = self.dead_counted.lock().unwrap_or_else(|e| e.into_inner());
        counted.get(name).copied()
    }

    /// Re-delivers the retained changes after `after` that `queue` carries
    /// (through its redrive subject, to whichever instance takes them);
    /// how many. `None` if `queue` is not fed from the change log.
    pub async fn replay(
        &self,
        log: &crate::engine::log::ChangeLog,
        queue: &str,
        after: u64,
    ) -> Option<Result<Result<usize, Gone>, StoreError>> {
        if queue != self.raw_queue.name() {
            return None;
        }
        let fed = &self.fed;
        let page = match log.read_strict(after, usize::MAX, |c| fed.contains(&c.table)) {
            Ok(page) => page,
            Err(gone) => return Some(Ok(Err(gone))),
        };
        let replay = uuid::Uuid::now_v7().simple().to_string();
        for change in &page.events {
            let name = format!("{replay}-{}", change.seq);
            if let Err(error) = self
                .raw_queue
                .put_back(&name, &QueueItem::store(change))
                .await
            {
                return Some(Err(error));
            }
        }
        Some(Ok(Ok(page.events.len())))
    }

    fn idle(&self) -> [Arc<dyn Idle>; 2] {
        [self.raw_queue.clone(), self.encode_queue.clone()]
    }
}

/// A shared queue's dead letters, whatever it carries.
pub trait SharedLetters: Send + Sync {
    /// Oldest first: number, event as stored, error, attempts, when.
    fn letters(
        &self,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<(u64, jetstream::dead::Letter)>, StoreError>>;
    fn redrive_all(&self) -> futures_util::future::BoxFuture<'_, Result<usize, StoreError>>;
    fn discard_all(&self) -> futures_util::future::BoxFuture<'_, Result<usize, StoreError>>;
}

impl<T: QueueItem> SharedLetters for SharedQueue<T> {
    fn letters(
        &self,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<(u64, jetstream::dead::Letter)>, StoreError>>
    {
        Box::pin(async move {
            let mut letters = self.dead_letters().await?;
            // Shown as the event itself, as in memory, not as it is kept.
            for (_, letter) in &mut letters {
                if let Some(item) = T::restore(letter.item.clone()) {
                    letter.item = serde_json::to_value(&item).unwrap_or_default();
                }
            }
            Ok(letters)
        })
    }

    fn redrive_all(&self) -> futures_util::future::BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.redrive())
    }

    fn discard_all(&self) -> futures_util::future::BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.discard())
    }
}

impl Pipeline {
    /// Connects to JetStream, builds the pipeline as a replica of the
    /// streams under `options.prefix` (making them if need be), reads what
    /// they hold into its tables and change log, and starts taking its
    /// share of the queues.
    pub async fn start_shared(
        config: PipelineConfig,
        options: &ScaleOut,
    ) -> Result<Self, ScaleOutError> {
        let connection = jetstream::connect(&options.url, options.connect_within).await?;
        let names = Names::new(&options.prefix)?;
        let state = StateOptions {
            replicas: options.replicas,
            ..StateOptions::default()
        };
        let store = StateStore::open(&connection, names.clone(), &state).await?;
        let mut pipeline = Pipeline::build(config, true);
        let shared_store: Arc<dyn Store> = store.clone();
        let mut replicas = Replicas::default();
        for table in pipeline.engine.tables() {
            let _ = table.share(shared_store.clone());
            replicas.tables.insert(table.name().clone(), table.clone());
        }
        let mut fed = Vec::new();
        for kind in Kind::ALL {
            fed.push(pipeline.raw_table(kind).name().clone());
        }
        for children in pipeline.children() {
            let _ = children.share(shared_store.clone());
            replicas
                .children
                .insert(children.listing.name().clone(), children.clone());
            fed.push(children.listing.name().clone());
        }
        let stop = pipeline.engine.shutdown_token();
        pipeline.engine.spawn(store.clone().follow(
            replicas,
            pipeline.engine.log.clone(),
            stop.clone(),
        ));
        let last = store.last().await?;
        tracing::info!(
            messages = last,
            "reading the JetStream state into this instance"
        );
        store.caught_up(last).await;
        // Each process holds two batches per worker at most, and no more
        // than 256 events of a queue.
        let config = pipeline.config();
        let queue_options = |workers: usize, batch: usize| QueueOptions {
            ack_wait: options.ack_wait,
            held: (workers * batch * 2).clamp(4, 256),
            ..QueueOptions::default()
        };
        let (raw_options, encode_options) = (
            queue_options(config.raw_workers, RAW_BATCH),
            queue_options(config.encode_workers, ENCODE_BATCH),
        );
        let per_queue = pipeline.config().max_dead_letters;
        let letters = || DeadLetters::open(&connection, names.clone(), per_queue, options.replicas);
        let raw_queue = SharedQueue::open(
            &store,
            &names,
            pipeline.raw_queue.clone(),
            &fed,
            &raw_options,
        )
        .await?;
        raw_queue.keep_dead_letters(letters().await?);
        let encode_queue = SharedQueue::open_items(
            &connection,
            &names,
            pipeline.encode_queue.clone(),
            &encode_options,
            options.replicas,
        )
        .await?;
        encode_queue.keep_dead_letters(letters().await?);
        pipeline.engine.spawn(raw_queue.clone().feed(stop.clone()));
        pipeline.engine.spawn(encode_queue.clone().feed(stop));
        let window = Window::open(
            &connection,
            names,
            pipeline.config().dedup_window,
            options.replicas,
        )
        .await?;
        pipeline.shared = Some(Shared {
            connection,
            store,
            raw_queue,
            encode_queue,
            prefix: options.prefix.clone(),
            window,
            fed,
            dead_counted: Default::default(),
        });
        Ok(pipeline)
    }

    /// On JetStream: its streams and consumers.
    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    /// On JetStream: redrives the dead letters of the shared queue `name`
    /// (`None` if it is not one). Those of `encode_queue` go through the
    /// saga first, as in memory: a letter whose attempt it restarts, or
    /// that a newer attempt superseded, is dropped rather than put back.
    pub async fn redrive_shared(&self, name: &str) -> Option<Result<usize, StoreError>> {
        let shared = self.shared.as_ref()?;
        let saga = self.read_models.saga.saga.clone();
        if name != shared.encode_queue.name() {
            return Some(shared.queue(name)?.redrive_all().await);
        }
        let redriven = shared
            .encode_queue
            .redrive_taking(|job: EncodeJob| {
                let saga = saga.clone();
                async move { saga.redriven_shared(&job).await }
            })
            .await;
        Some(redriven)
    }

    /// Waits until nothing is left to do (in every process, on JetStream);
    /// `false` if `timeout` passed first.
    pub async fn settle(&self, timeout: Duration) -> Result<bool, StoreError> {
        match &self.shared {
            None => Ok(self.engine.settle(timeout).await),
            Some(shared) => {
                // The cluster first; then what this instance does with the
                // changes it follows (its views and its saga), and again
                // while that put new work on the cluster's queues (a saga's
                // new attempt).
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if !jetstream::queue::settle(&shared.store, &shared.idle(), left).await? {
                        return Ok(false);
                    }
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if !self.engine.settle(left).await {
                        return Ok(false);
                    }
                    if self.outstanding().await == 0 {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Events waiting or in flight (in every process, on JetStream).
    pub async fn outstanding(&self) -> u64 {
        match &self.shared {
            None => self.engine.activity.outstanding(),
            Some(shared) => {
                let mut total = 0;
                for queue in shared.idle() {
                    total += queue.outstanding().await.unwrap_or(0);
                }
                total
            }
        }
    }

    pub(super) async fn ingest_shared(
        &self,
        kind: Kind,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Vec<(RecordId, Outcome)>, Refused> {
        let lists = self.lists(kind, &writes);
        let _room = self.admit_all(kind, writes.iter(), &lists)?;
        // Each write is a round trip to JetStream: the records of a batch
        // are written side by side, the writes of one record in order.
        let n = writes.len();
        let mut groups: Vec<Vec<(usize, Write, Option<Write>)>> = Vec::new();
        let mut group_of: HashMap<RecordId, usize> = HashMap::new();
        for (i, (write, list)) in writes.into_iter().zip(lists).enumerate() {
            let g = *group_of.entry(write.id.clone()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push((i, write, list));
        }
        let mut written = futures_util::stream::iter(groups)
            .map(|group| async move {
                let mut outcomes = Vec::with_capacity(group.len());
                for (i, write, list) in group {
                    let id = write.id.clone();
                    outcomes.push((i, id, self.write_shared(kind, write, list, cause).await?));
                }
                Ok::<_, WriteError>(outcomes)
            })
            .buffer_unordered(WRITES_AT_ONCE);
        let mut results: Vec<Option<(RecordId, Outcome)>> = vec![None; n];
        while let Some(outcomes) = written.next().await {
            for (i, id, outcome) in outcomes? {
                results[i] = Some((id, outcome));
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// One raw write on JetStream, its child list first (see
    /// [`Pipeline::ingest`]).
    async fn write_shared(
        &self,
        kind: Kind,
        write: Write,
        list: Option<Write>,
        cause: &Cause,
    ) -> Result<Outcome, WriteError> {
        if let (Some(list), Some(listing)) = (list, self.listing_table(kind)) {
            listing.writer().apply(list, cause).await?;
        }
        self.raw_table(kind).writer().apply(write, cause).await
    }

    pub(super) async fn ingest_events_shared(
        &self,
        shared: &Shared,
        kind: Kind,
        events: Vec<(DedupKey, Write)>,
        cause: &Cause,
    ) -> Result<Vec<(RecordId, Option<Outcome>)>, Refused> {
        let (keys, writes): (Vec<DedupKey>, Vec<Write>) = events.into_iter().unzip();
        let lists = self.lists(kind, &writes);
        let _room = self.admit_all(kind, writes.iter(), &lists)?;
        let unavailable = |e: StoreError| Refused::Unavailable(e.to_string());
        let mut results = Vec::with_capacity(writes.len());
        for ((key, write), list) in keys.into_iter().zip(writes).zip(lists) {
            let id = write.id.clone();
            if shared
                .window
                .contains(key.bytes())
                .await
                .map_err(unavailable)?
            {
                results.push((id, None));
                continue;
            }
            let outcome = self.write_shared(kind, write, list, cause).await?;
            // After the write, as on disk: a crash between the two leaves a
            // retry that is applied again, never a false duplicate.
            shared.window.add(key.bytes()).await.map_err(unavailable)?;
            results.push((id, Some(outcome)));
        }
        Ok(results)
    }

    pub(super) async fn ingest_if_shared(
        &self,
        kind: Kind,
        write: Write,
        expect: Expect,
        cause: &Cause,
    ) -> Result<Result<Outcome, PreconditionFailed>, Refused> {
        let lists = self.lists(kind, std::slice::from_ref(&write));
        let _room = self.admit_all(kind, std::iter::once(&write), &lists)?;
        let outcome = match self
            .raw_table(kind)
            .writer()
            .apply_if(write, expect, cause)
            .await
        {
            Ok(outcome) => outcome,
            Err(WriteError::PreconditionFailed(failed)) => return Ok(Err(failed)),
            Err(error) => return Err(error.into()),
        };
        if let (Some(Some(list)), Some(listing)) =
            (lists.into_iter().next(), self.listing_table(kind))
        {
            listing.writer().apply(list, cause).await?;
        }
        Ok(Ok(outcome))
    }

    pub(super) async fn reconcile_shared(
        &self,
        kind: Kind,
        as_of: Timestamp,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Reconciliation, Refused> {
        let lists = self.lists(kind, &writes);
        let _room = self.admit_all(kind, writes.iter(), &lists)?;
        if let Some(listing) = self.listing_table(kind) {
            for list in lists.into_iter().flatten() {
                listing.writer().apply(list, cause).await?;
            }
        }
        Ok(self
            .raw_table(kind)
            .writer()
            .reconcile(as_of, writes, cause)
            .await?)
    }
}
