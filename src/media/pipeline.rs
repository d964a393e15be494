//! The media pipeline: one topology holding all six scenarios.
//!
//! ```text
//! raw_actors ─┐
//! raw_movies ─┤                    ┌─> actors, movies, series, episodes, videos
//! raw_series ─┼─> raw_queue ─> raw_handler ─┬─> raw_episodes (back into raw_queue)
//! raw_episodes┤                             └─> encode_queue ─> encode_handler ─> encodes
//! raw_videos ─┘
//!
//! actors, movies, series, episodes ─> projection_queue ─> projection_handler
//!                                       ─> filmography, series_overview (views)
//! videos, their renditions, encodes ─> publication_queue ─> publication_handler
//!                                       ─> publications (a view); compensating
//!                                          deletes of encodes; new attempts'
//!                                          jobs on encode_queue
//! ```
//!
//! Ingest (`POST`/`PUT`/`DELETE /raw/{kind}`) writes raw tables only; the
//! rest follows from their changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::children::Children;
use crate::engine::dedup::{DedupKey, DedupWindow};
use crate::engine::handler::{BreakerPolicy, HandlerConfig, RetryPolicy};
use crate::engine::log::{Cause, Change, SubscriberId};
use crate::engine::metrics::latency_histogram;
use crate::engine::queue::{Queue, QueueCounts};
use crate::engine::record::{Data, RecordId, Timestamp, Version};
use crate::engine::table::{
    Expect, Full, Outcome, PreconditionFailed, Reconciliation, Reservation, Table, TableKind,
    Write, WriteError,
};
use crate::engine::topology::Topology;
use crate::engine::{Engine, EngineConfig};
use crate::storage::effect::{self, DedupFrame};
use prometheus_client::metrics::histogram::Histogram;

use super::encode_handler::{EncodeHandler, EncodeJob};
use super::projection::{Filmography, Overview, ProjectionHandler, Rule, View, ViewError};
use super::raw_handler::{ChildRecords, ChildSink, EncodeJobs, Parent, RawHandler, Route};
use super::records::{ByKind, Kind};
use super::saga::{Publication, PublicationHandler, RetryError, Saga};

/// Changes a raw_handler worker takes at a time.
pub(crate) const RAW_BATCH: usize = 32;
/// Jobs an encode_handler worker takes at a time.
pub(crate) const ENCODE_BATCH: usize = 1;

/// Everything the pipeline's shape and speed depend on.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub queue_capacity: usize,
    pub raw_workers: usize,
    pub encode_workers: usize,
    pub encode_delay: Duration,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
    pub event_retention: usize,
    pub max_dead_letters: usize,
    /// Events outstanding in the queues ingest feeds (changes not yet on
    /// `raw_queue`, and what waits, runs or retries on `raw_queue` and
    /// `encode_queue`) above which ingest is refused.
    pub ingest_backlog_limit: u64,
    /// Ids each table keeps at most; ingest past it is refused.
    pub max_records: u64,
    /// CloudEvent `source`+`id` pairs remembered for duplicate detection.
    pub dedup_window: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            raw_workers: 2,
            encode_workers: 2,
            encode_delay: Duration::from_millis(200),
            retry: RetryPolicy {
                max_attempts: 5,
                base: Duration::from_millis(100),
                cap: Duration::from_secs(10),
            },
            breaker: BreakerPolicy {
                threshold: 5,
                cool_down: Duration::from_secs(2),
            },
            event_retention: 1_000_000,
            max_dead_letters: 10_000,
            ingest_backlog_limit: 100_000,
            max_records: 10_000_000,
            dedup_window: 100_000,
        }
    }
}

/// Ingest was refused because the pipeline is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the pipeline is behind: {backlog} events are outstanding in raw_queue, encode_queue, \
     projection_queue and publication_queue (limit {limit})"
)]
pub struct Overloaded {
    pub backlog: u64,
    pub limit: u64,
}

/// Why ingest refused a request (nothing of it was stored, except as
/// [`Refused::Unavailable`] says).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error(transparent)]
    Full(#[from] Full),
    /// On JetStream: the shared store could not be reached. The writes of
    /// the request before the one that failed may be stored; sending the
    /// request again converges.
    #[error("{0}")]
    Unavailable(String),
}

impl From<WriteError> for Refused {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Full(full) => Refused::Full(full),
            WriteError::Unavailable(reason) => Refused::Unavailable(reason),
            // Only a conditional write fails its precondition, and it is
            // told apart before this.
            WriteError::PreconditionFailed(failed) => Refused::Unavailable(failed.to_string()),
        }
    }
}

/// The room an admitted request holds while its writes are applied: its
/// share of the backlog, and the new ids it may add to each table.
pub(super) struct Admitted<'p> {
    reserved: &'p AtomicU64,
    changes: u64,
    _tables: [Reservation<'p>; 2],
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        // By now its changes are in the log, counted by the backlog itself.
        self.reserved.fetch_sub(self.changes, Ordering::AcqRel);
    }
}

/// The read models of scenario 5.
pub struct Views {
    pub filmography: Arc<View<Filmography>>,
    pub overview: Arc<View<Overview>>,
}

impl Views {
    /// After a restart: rebuilds both views and their indexes from the
    /// restored tables (in their tasks; settle waits for it).
    pub fn invalidate(&self) {
        self.filmography.invalidate();
        self.overview.invalidate();
    }

    /// Recomputes the view named `name` from the standard tables: how many
    /// records it holds after; `None` if no view has that name.
    pub async fn rebuild(&self, name: &str, cause: &Cause) -> Option<Result<u64, ViewError>> {
        if name == Filmography::NAME {
            Some(self.filmography.rebuild(cause).await)
        } else if name == Overview::NAME {
            Some(self.overview.rebuild(cause).await)
        } else {
            None
        }
    }
}

/// Scenarios 5 and 6: the read models and the saga, which follow the
/// standard tables through the change log of this process (on JetStream,
/// this instance's replica of the shared one).
pub struct ReadModels {
    pub views: Views,
    projection_feed: SubscriberId,
    pub projection_queue: Arc<Queue<Arc<Change>>>,
    /// Scenario 6.
    pub saga: SagaModel,
}

/// Scenario 6: the saga and the queue that feeds it.
pub struct SagaModel {
    pub saga: Arc<Saga>,
    publication_feed: SubscriberId,
    pub publication_queue: Arc<Queue<Arc<Change>>>,
}

pub struct Pipeline {
    pub engine: Engine,
    /// Scenarios 5 and 6.
    pub read_models: ReadModels,
    raw: ByKind<Arc<Table>>,
    /// Parent kinds' child lists and where the children go (`None` for
    /// kinds without children).
    parents: ByKind<Option<Arc<Parent>>>,
    /// `raw_queue`'s place in the change log; `None` on JetStream, where
    /// its consumer there feeds it.
    raw_feed: Option<SubscriberId>,
    pub raw_queue: Arc<Queue<Arc<Change>>>,
    pub encode_queue: Arc<Queue<EncodeJob>>,
    /// What operators did, and every reconciliation (see `http::guard`).
    pub audit_trail: Arc<Table>,
    /// Seconds from a raw write to the standard write it caused.
    pub ingest_to_visible: Histogram,
    /// Events already applied, by CloudEvent `source` + `id`.
    pub dedup: DedupWindow,
    /// Changes admitted requests are writing now, not yet in the backlog.
    admitting: AtomicU64,
    config: PipelineConfig,
    /// On JetStream: the streams and consumers the pipeline runs on.
    pub(super) shared: Option<super::scale_out::Shared>,
}

impl Pipeline {
    /// Builds the tables, queues and handlers and starts their tasks (on the
    /// current tokio runtime).
    pub fn start(config: PipelineConfig) -> Self {
        Self::build(config, false)
    }

    /// [`Pipeline::start`]; `shared`: for JetStream, where the change log
    /// is a replica, `raw_queue` is fed by its consumer there, and
    /// scenario 6 does not run.
    pub(super) fn build(config: PipelineConfig, shared: bool) -> Self {
        let mut engine = Engine::new(EngineConfig {
            event_retention: config.event_retention,
            max_dead_letters: config.max_dead_letters,
            max_records: config.max_records,
        });
        if shared {
            engine.log.become_replica();
        }
        let raw = ByKind::new(|k| engine.add_table(k.raw_table(), TableKind::Raw));
        let standard = ByKind::new(|k| engine.add_table(k.standard_table(), TableKind::Standard));
        let encodes = engine.add_table("encodes", TableKind::Standard);
        let children = ByKind::new(|k| {
            k.children().map(|(field, listing, split)| {
                let listing = engine.add_listing_table(listing);
                Arc::new(Children::new(field, raw.get(k).clone(), listing, split))
            })
        });
        let mut fed: Vec<&Arc<Table>> = Kind::ALL.iter().map(|k| raw.get(*k)).collect();
        fed.extend(
            Kind::ALL
                .iter()
                .filter_map(|k| children.get(*k).as_ref().map(|c| &c.listing)),
        );
        let (raw_queue, raw_feed) = if shared {
            let queue = engine.add_queue("raw_queue", config.queue_capacity);
            (queue, None)
        } else {
            let (queue, feed) = engine.add_fed_queue("raw_queue", config.queue_capacity, &fed);
            (queue, Some(feed))
        };
        let encode_queue = engine.add_queue::<EncodeJob>("encode_queue", config.queue_capacity);
        let ingest_to_visible = latency_histogram();
        let parents = ByKind::new(|kind| {
            children.get(kind).as_ref().map(|children| {
                // Where each parent kind's children go: episodes are records
                // that come back through raw_queue, renditions are jobs.
                let sink: Box<dyn ChildSink> = match kind {
                    Kind::Series => Box::new(ChildRecords {
                        table: raw.episodes.clone(),
                    }),
                    _ => Box::new(EncodeJobs {
                        encodes: encodes.clone(),
                    }),
                };
                Arc::new(Parent {
                    children: children.clone(),
                    sink,
                })
            })
        });
        let mut routes = HashMap::new();
        for kind in Kind::ALL {
            let parent = parents.get(kind).clone();
            let route = |parent| Route {
                kind,
                standard: standard.get(kind).clone(),
                parent,
            };
            if let Some(parent) = &parent {
                routes.insert(
                    parent.children.listing.name().clone(),
                    route(Some(parent.clone())),
                );
            }
            routes.insert(raw.get(kind).name().clone(), route(parent));
        }
        engine.add_handler(
            "raw_handler",
            &raw_queue,
            RawHandler {
                routes,
                encode_queue: encode_queue.clone(),
                visible: ingest_to_visible.clone(),
            },
            HandlerConfig {
                workers: config.raw_workers,
                batch: RAW_BATCH,
                retry: config.retry,
                breaker: config.breaker,
            },
        );
        engine.add_handler(
            "encode_handler",
            &encode_queue,
            EncodeHandler {
                encodes: encodes.clone(),
                delay: config.encode_delay,
            },
            HandlerConfig {
                workers: config.encode_workers,
                batch: ENCODE_BATCH,
                retry: config.retry,
                breaker: config.breaker,
            },
        );
        let renditions = children
            .get(Kind::Videos)
            .clone()
            .expect("videos list renditions");
        let read_models = read_models(
            &mut engine,
            &standard,
            &encodes,
            renditions,
            &encode_queue,
            &config,
        );
        let audit_trail = engine.add_system_table("audit");
        describe(&mut engine.topology);
        Self {
            audit_trail,
            read_models,
            engine,
            raw,
            parents,
            raw_feed,
            raw_queue,
            encode_queue,
            ingest_to_visible,
            dedup: DedupWindow::new(config.dedup_window),
            admitting: AtomicU64::new(0),
            config,
            shared: None,
        }
    }

    /// Recomputes the view named `name` (scenario 5's from the standard
    /// tables, scenario 6's publications from the videos and encodes):
    /// how many records it holds after; `None` if no view has that name.
    pub async fn rebuild(
        self: Arc<Self>,
        name: String,
        cause: Cause,
    ) -> Option<Result<u64, ViewError>> {
        if name == Saga::NAME {
            let saga = self.read_models.saga.saga.clone();
            let rebuilt = if saga.publications.is_shared() {
                Ok(saga.rebuild_shared(&cause).await)
            } else {
                // In memory the saga reads and writes all of it at once.
                tokio::task::spawn_blocking(move || saga.rebuild(&cause)).await
            };
            return Some(match rebuilt {
                Ok(rebuilt) => rebuilt,
                Err(stopped) => Err(ViewError::Source(format!("the rebuild stopped: {stopped}"))),
            });
        }
        self.read_models.views.rebuild(&name, &cause).await
    }

    /// An operator's retry of a compensated publication: a new attempt,
    /// whose jobs go on `encode_queue` without waiting for room.
    pub async fn retry_publication(
        &self,
        video: &RecordId,
        cause: &Cause,
    ) -> Result<(Publication, usize), RetryError> {
        let saga = &self.read_models.saga.saga;
        let (publication, jobs, count) = saga.retry(video, cause).await?;
        self.engine.put_back(&self.encode_queue, jobs);
        Ok((publication, count))
    }

    /// Records an operator action (or a reconciliation) as `data`, at
    /// `at`, in the `audit` table.
    pub async fn audit(
        &self,
        id: RecordId,
        at: Timestamp,
        data: Data,
        cause: &Cause,
    ) -> Result<(), Refused> {
        let table = &self.audit_trail;
        let _room = table.reserve([&id])?;
        let write = Write {
            id,
            version: Version::write(at, data.clone()),
            data,
        };
        table.writer().apply(write, cause).await?;
        Ok(())
    }

    /// The parents' child listings (what raw_handler has applied of each).
    pub fn children(&self) -> impl Iterator<Item = &Arc<Children>> {
        Kind::ALL
            .into_iter()
            .filter_map(|k| self.parents.get(k).as_ref().map(|p| &p.children))
    }

    pub fn raw_table(&self, kind: Kind) -> &Arc<Table> {
        self.raw.get(kind)
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Events outstanding in the queues ingest feeds, directly or through
    /// handlers: changes not yet put on `raw_queue` or `projection_queue`,
    /// and what waits, runs or retries on those and `encode_queue`. (A slow
    /// subscriber holds the change log past its retention, so it must hold
    /// back ingest too.)
    pub fn backlog(&self) -> u64 {
        fn outstanding(c: QueueCounts) -> u64 {
            c.depth + c.in_flight + c.retrying
        }
        let log = &self.engine.log;
        let views = &self.read_models;
        let m = &views.saga;
        let saga = log.backlog(m.publication_feed) + outstanding(m.publication_queue.counts());
        let models = log.backlog(views.projection_feed)
            + outstanding(views.projection_queue.counts())
            + saga;
        self.raw_feed.map_or(0, |feed| log.backlog(feed))
            + outstanding(self.raw_queue.counts())
            + outstanding(self.encode_queue.counts())
            + models
    }

    /// Refuses new ingest while the backlog, with what admitted requests
    /// are writing now, is over its bound. A cheap check before a request
    /// is parsed; the writes themselves reserve their share
    /// ([`Pipeline::admit_writes`]). Writes made by handlers are never
    /// refused.
    pub fn admit(&self) -> Result<(), Overloaded> {
        let backlog = self.backlog() + self.admitting.load(Ordering::Acquire);
        let limit = self.config.ingest_backlog_limit;
        if backlog > limit {
            return Err(Overloaded { backlog, limit });
        }
        Ok(())
    }

    /// Admits a request that writes `ids` to `kind`'s raw table and `lists`
    /// to its listing table, or refuses it whole: reserves its changes in
    /// the backlog, so that concurrent requests cannot all pass one check,
    /// and room for its new ids in both tables.
    fn admit_writes<'w>(
        &self,
        kind: Kind,
        ids: &[&'w RecordId],
        lists: &[&'w RecordId],
    ) -> Result<Admitted<'_>, Refused> {
        let limit = self.config.ingest_backlog_limit;
        let changes = (ids.len() + lists.len()) as u64;
        let backlog = self.backlog();
        self.admitting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |admitting| {
                (backlog + admitting <= limit).then_some(admitting + changes)
            })
            .map_err(|admitting| Overloaded {
                backlog: backlog + admitting,
                limit,
            })?;
        // Made before the tables are reserved, so that a refusal by a table
        // gives the backlog share back.
        let mut room = Admitted {
            reserved: &self.admitting,
            changes,
            _tables: [Reservation::none(), Reservation::none()],
        };
        room._tables[0] = self.raw.get(kind).reserve(ids.iter().copied())?;
        if let Some(listing) = self.listing_table(kind) {
            room._tables[1] = listing.reserve(lists.iter().copied())?;
        }
        Ok(room)
    }

    /// The listing-table write that goes with each of `writes` that
    /// carries its child list.
    pub(super) fn lists(&self, kind: Kind, writes: &[Write]) -> Vec<Option<Write>> {
        match self.parents.get(kind) {
            Some(parent) => writes
                .iter()
                .map(|w| parent.children.listing_write(w))
                .collect(),
            None => writes.iter().map(|_| None).collect(),
        }
    }

    /// Admits writes to `kind` with their child lists, as a whole.
    pub(super) fn admit_all<'w>(
        &self,
        kind: Kind,
        writes: impl Iterator<Item = &'w Write>,
        lists: &'w [Option<Write>],
    ) -> Result<Admitted<'_>, Refused> {
        let ids: Vec<&RecordId> = writes.map(|w| &w.id).collect();
        let listed: Vec<&RecordId> = lists.iter().flatten().map(|l| &l.id).collect();
        let room = self.admit_writes(kind, &ids, &listed)?;
        // raw_handler writes the children later, where a full table could
        // only dead-letter the parent: refuse it now instead.
        if let Some(parent) = self.parents.get(kind) {
            let keys: Vec<RecordId> = lists
                .iter()
                .flatten()
                .flat_map(|list| {
                    let children = parent.children.child_ids(&list.id, &list.data);
                    children
                        .into_iter()
                        .map(|child| parent.sink.key(&list.id, &child))
                })
                .collect();
            parent.sink.table().room_for(&keys)?;
        }
        Ok(room)
    }

    /// On a data directory: holds the log's writer off, so that the frames
    /// of one request's step (a parent with its child list, a whole
    /// reconciliation) go to the disk in one write, which no crash between
    /// writes can split (a torn write still can: recovery keeps the whole
    /// frames before the tear). Never taken
    /// twice on one thread (the writer would wait for the first, and the
    /// second for the writer).
    fn group(&self) -> Option<crate::storage::commit::Group<'_>> {
        self.engine.log.journal().map(|journal| journal.group())
    }

    pub(super) fn listing_table(&self, kind: Kind) -> Option<&Arc<Table>> {
        self.parents.get(kind).as_ref().map(|p| &p.children.listing)
    }

    /// One raw write, with its child list if it carries one. The list goes
    /// first, so the handler that sees the parent's change sees it too.
    fn write(&self, kind: Kind, write: Write, list: Option<Write>, cause: &Cause) -> Outcome {
        let _together = self.group();
        if let (Some(list), Some(listing)) = (list, self.listing_table(kind)) {
            listing.apply(list, cause);
        }
        self.raw.get(kind).apply(write, cause)
    }

    /// Writes raw records of `kind`, in order, or refuses them all.
    pub async fn ingest(
        &self,
        kind: Kind,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Vec<(RecordId, Outcome)>, Refused> {
        match &self.shared {
            None => self.ingest_here(kind, writes, cause),
            Some(_) => self.ingest_shared(kind, writes, cause).await,
        }
    }

    fn ingest_here(
        &self,
        kind: Kind,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Vec<(RecordId, Outcome)>, Refused> {
        let lists = self.lists(kind, &writes);
        let _room = self.admit_all(kind, writes.iter(), &lists)?;
        Ok(writes
            .into_iter()
            .zip(lists)
            .map(|(w, list)| (w.id.clone(), self.write(kind, w, list, cause)))
            .collect())
    }

    /// Writes raw records that came as CloudEvents, each with its `source`
    /// and `id` as its dedup key: an event already applied within the
    /// window is not applied again (`None`).
    pub async fn ingest_events(
        &self,
        kind: Kind,
        events: Vec<(DedupKey, Write)>,
        cause: &Cause,
    ) -> Result<Vec<(RecordId, Option<Outcome>)>, Refused> {
        match &self.shared {
            None => self.ingest_events_here(kind, events, cause),
            Some(shared) => self.ingest_events_shared(shared, kind, events, cause).await,
        }
    }

    fn ingest_events_here(
        &self,
        kind: Kind,
        events: Vec<(DedupKey, Write)>,
        cause: &Cause,
    ) -> Result<Vec<(RecordId, Option<Outcome>)>, Refused> {
        let (keys, writes): (Vec<DedupKey>, Vec<Write>) = events.into_iter().unzip();
        let lists = self.lists(kind, &writes);
        let _room = self.admit_all(kind, writes.iter(), &lists)?;
        Ok(keys
            .into_iter()
            .zip(writes)
            .zip(lists)
            .map(|((key, w), list)| {
                let id = w.id.clone();
                let outcome = self.dedup.first_time(key).then(|| {
                    let outcome = self.write(kind, w, list, cause);
                    // After the write: a crash between the two frames
                    // leaves a retry that is applied again (and converges),
                    // never a false `duplicate` for a write that was lost.
                    if let Some(journal) = self.engine.log.journal() {
                        journal.append(effect::DEDUP, &DedupFrame(key.bytes()));
                    }
                    outcome
                });
                (id, outcome)
            })
            .collect())
    }

    /// Writes one raw record if the stored one meets `expect`.
    pub async fn ingest_if(
        &self,
        kind: Kind,
        write: Write,
        expect: Expect,
        cause: &Cause,
    ) -> Result<Result<Outcome, PreconditionFailed>, Refused> {
        match &self.shared {
            None => self.ingest_if_here(kind, write, expect, cause),
            Some(_) => self.ingest_if_shared(kind, write, expect, cause).await,
        }
    }

    fn ingest_if_here(
        &self,
        kind: Kind,
        write: Write,
        expect: Expect,
        cause: &Cause,
    ) -> Result<Result<Outcome, PreconditionFailed>, Refused> {
        let lists = self.lists(kind, std::slice::from_ref(&write));
        let _room = self.admit_all(kind, std::iter::once(&write), &lists)?;
        let _together = self.group();
        let outcome = match self.raw.get(kind).apply_if(write, expect, cause) {
            Ok(outcome) => outcome,
            Err(failed) => return Ok(Err(failed)),
        };
        if let (Some(Some(list)), Some(listing)) =
            (lists.into_iter().next(), self.listing_table(kind))
        {
            listing.apply(list, cause);
        }
        Ok(Ok(outcome))
    }

    /// Applies a complete set of `kind` as of `as_of`, or refuses it whole.
    pub async fn reconcile(
        &self,
        kind: Kind,
        as_of: Timestamp,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Reconciliation, Refused> {
        match &self.shared {
            None => self.reconcile_here(kind, as_of, writes, cause),
            Some(_) => self.reconcile_shared(kind, as_of, writes, cause).await,
        }
    }

    fn reconcile_here(
        &self,
        kind: Kind,
        as_of: Timestamp,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Reconciliation, Refused> {
        let lists = self.lists(kind, &writes);
        let _room = self.admit_all(kind, writes.iter(), &lists)?;
        let _together = self.group();
        if let Some(listing) = self.listing_table(kind) {
            for list in lists.into_iter().flatten() {
                listing.apply(list, cause);
            }
        }
        Ok(self.raw.get(kind).reconcile(as_of, writes, cause))
    }

    /// Deletes `id` of `kind` as of `at` (a tombstone is kept, so it needs
    /// room too), or refuses it.
    pub async fn delete(
        &self,
        kind: Kind,
        id: &RecordId,
        at: Timestamp,
        cause: &Cause,
    ) -> Result<Outcome, Refused> {
        let _room = self.admit_writes(kind, &[id], &[])?;
        Ok(self.raw.get(kind).writer().delete(id, at, cause).await?)
    }
}

/// Scenarios 5 and 6: the views, fed from the standard tables, and (given
/// the videos' rendition lists) the saga, fed from the videos, their
/// rendition lists and their encodes.
fn read_models(
    engine: &mut Engine,
    standard: &ByKind<Arc<Table>>,
    encodes: &Arc<Table>,
    renditions: Arc<Children>,
    encode_queue: &Arc<Queue<EncodeJob>>,
    config: &PipelineConfig,
) -> ReadModels {
    // Scenario 5: the standard tables also feed projection_queue (each
    // subscriber has its own cursor), whose handler alone writes the
    // views.
    let filmography = engine.add_table(Filmography::NAME, TableKind::View);
    let series_overview = engine.add_table(Overview::NAME, TableKind::View);
    let sources: Vec<&Arc<Table>> = Kind::PROJECTED.iter().map(|k| standard.get(*k)).collect();
    let (projection_queue, projection_feed) =
        engine.add_fed_queue("projection_queue", config.queue_capacity, &sources);
    let views = Views {
        filmography: Arc::new(View::new(
            filmography,
            standard.actors.clone(),
            standard.movies.clone(),
            engine.log.clone(),
            engine.activity.clone(),
        )),
        overview: Arc::new(View::new(
            series_overview,
            standard.series.clone(),
            standard.episodes.clone(),
            engine.log.clone(),
            engine.activity.clone(),
        )),
    };
    // Two rounds per view, one per core here: a record is never
    // recomputed by both at once.
    let stop = engine.shutdown_token();
    for _ in 0..2 {
        engine.spawn(views.filmography.clone().run(stop.clone()));
        engine.spawn(views.overview.clone().run(stop.clone()));
    }
    engine.add_handler(
        "projection_handler",
        &projection_queue,
        ProjectionHandler {
            filmography: views.filmography.clone(),
            overview: views.overview.clone(),
        },
        HandlerConfig {
            // It only marks what moved; each view's task recomputes.
            workers: 1,
            batch: 32,
            retry: config.retry,
            breaker: config.breaker,
        },
    );
    let saga = saga_model(engine, standard, encodes, renditions, encode_queue, config);
    ReadModels {
        views,
        projection_feed,
        projection_queue,
        saga,
    }
}

/// Scenario 6: the saga follows videos, their rendition lists and their
/// encodes through the change log, and alone writes publications.
fn saga_model(
    engine: &mut Engine,
    standard: &ByKind<Arc<Table>>,
    encodes: &Arc<Table>,
    renditions: Arc<Children>,
    encode_queue: &Arc<Queue<EncodeJob>>,
    config: &PipelineConfig,
) -> SagaModel {
    let publications = engine.add_table(Saga::NAME, TableKind::View);
    let sources = [&standard.videos, &renditions.listing, encodes];
    let (publication_queue, publication_feed) =
        engine.add_fed_queue("publication_queue", config.queue_capacity, &sources);
    let saga = Arc::new(Saga::new(
        publications,
        standard.videos.clone(),
        encodes.clone(),
        renditions,
        encode_queue.clone(),
        engine.log.clone(),
    ));
    // A redrive of a job the saga compensated for starts a new attempt.
    let redriven = saga.clone();
    encode_queue.on_redrive(Box::new(move |letters| redriven.redriven(letters)));
    engine.add_handler(
        "publication_handler",
        &publication_queue,
        PublicationHandler { saga: saga.clone() },
        HandlerConfig {
            // Steps run one at a time anyway (see saga.rs).
            workers: 1,
            batch: 32,
            retry: config.retry,
            breaker: config.breaker,
        },
    );
    SagaModel {
        saga,
        publication_feed,
        publication_queue,
    }
}

/// The six scenarios as edges of the one topology.
fn describe(t: &mut Topology) {
    t.scenario(
        1,
        "Overloaded queue",
        "Every raw table feeds the one raw_queue, with mixed schemas.",
    );
    t.scenario(
        2,
        "Recursive breakdown",
        "raw_handler splits a series into raw_episodes, which come back through raw_queue.",
    );
    t.scenario(
        3,
        "Async secondary work",
        "A video is written at once; its slow encodes run on encode_queue.",
    );
    t.scenario(
        4,
        "Fan-out reconciliation",
        "PUT /raw/{kind} applies a complete set; deletes of what was not seen flow downstream.",
    );
    for kind in Kind::ALL {
        let scenarios: &[u8] = match kind {
            Kind::Series => &[1, 2, 4],
            Kind::Episodes => &[1, 2, 4],
            Kind::Videos => &[1, 3, 4],
            _ => &[1, 4],
        };
        t.edge(kind.raw_table(), "raw_queue", "change", scenarios);
        t.edge(
            "raw_handler",
            kind.standard_table(),
            "standard record",
            scenarios,
        );
    }
    // Ingest writes a parent's child list beside it, in the same step.
    for (kind, scenario) in [(Kind::Series, 2), (Kind::Videos, 3)] {
        if let Some((_, listing, _)) = kind.children() {
            t.edge(kind.raw_table(), listing, "child list", &[scenario]);
            t.edge(listing, "raw_queue", "change", &[scenario]);
        }
    }
    t.edge("raw_queue", "raw_handler", "event", &[1, 2, 3, 4]);
    t.edge("raw_handler", "raw_episodes", "episodes split off", &[2]);
    t.edge("raw_handler", "encode_queue", "one job per rendition", &[3]);
    t.edge("encode_queue", "encode_handler", "job", &[3, 6]);
    t.edge(
        "encode_handler",
        "encodes",
        "encoded (or failed) rendition",
        &[3, 6],
    );
    t.scenario(
        5,
        "Projection (CQRS)",
        "The standard tables also feed projection_queue; projection_handler alone keeps the \
         filmography and series_overview views, whatever order records arrive in.",
    );
    for kind in Kind::PROJECTED {
        t.edge(kind.standard_table(), "projection_queue", "change", &[5]);
    }
    t.edge("projection_queue", "projection_handler", "event", &[5]);
    t.edge("projection_handler", Filmography::NAME, "view record", &[5]);
    t.edge("projection_handler", Overview::NAME, "view record", &[5]);
    t.scenario(
        6,
        "Saga with compensation",
        "publication_handler follows each video's encodes through the change log: pending, \
         then published; a dead-lettered encode is compensated by deleting the encodes made, \
         and a retry or redrive starts a new attempt.",
    );
    if let Some((_, listing, _)) = Kind::Videos.children() {
        t.edge(listing, "publication_queue", "change", &[6]);
    }
    t.edge(
        Kind::Videos.standard_table(),
        "publication_queue",
        "change",
        &[6],
    );
    t.edge(
        "encodes",
        "publication_queue",
        "change (encoded or failed)",
        &[6],
    );
    t.edge("publication_queue", "publication_handler", "event", &[6]);
    t.edge("publication_handler", Saga::NAME, "publication", &[6]);
    t.edge(
        "publication_handler",
        "encodes",
        "compensating delete",
        &[6],
    );
    t.edge("publication_handler", "encode_queue", "new attempt", &[6]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<RecordId> {
        (0..n)
            .map(|i| RecordId::parse(&format!("m{i}")).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn an_admitted_request_holds_its_share_of_the_backlog_while_it_writes() {
        let pipeline = Pipeline::start(PipelineConfig {
            ingest_backlog_limit: 10,
            ..Default::default()
        });
        let batch = ids(8);
        let batch: Vec<&RecordId> = batch.iter().collect();
        let first = pipeline.admit_writes(Kind::Movies, &batch, &[]).unwrap();
        // The existing backlog (8, reserved) is within the bound: admitted.
        let second = pipeline.admit_writes(Kind::Movies, &batch, &[]).unwrap();
        // Now it is not, though nothing is written yet.
        let refused = pipeline.admit_writes(Kind::Movies, &batch, &[]);
        assert!(
            matches!(
                refused,
                Err(Refused::Overloaded(Overloaded {
                    backlog: 16,
                    limit: 10
                }))
            ),
            "{:?}",
            refused.err()
        );
        assert!(pipeline.admit().is_err(), "the cheap check sees it too");
        drop((first, second));
        assert!(pipeline.admit().is_ok());
        assert!(pipeline.admit_writes(Kind::Movies, &batch, &[]).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_backlog_counts_the_encodes_ingest_led_to() {
        let pipeline = Pipeline::start(PipelineConfig {
            encode_delay: Duration::from_secs(3600),
            encode_workers: 1,
            ingest_backlog_limit: 5,
            ..Default::default()
        });
        let renditions: Vec<serde_json::Value> = (0..10)
            .map(|i| serde_json::json!({"id": format!("r{i}"), "codec": "h264", "height": 720}))
            .collect();
        let video = serde_json::json!({"id": "v1", "title": "V", "renditions": renditions});
        let write =
            crate::media::records::parse_record(video, Timestamp::now(), Kind::Videos).unwrap();
        pipeline
            .ingest(Kind::Videos, vec![write], &Cause::request("r"))
            .await
            .unwrap();
        // raw_handler runs between yields; encodes wait an hour each.
        while pipeline
            .raw_feed
            .is_some_and(|feed| pipeline.engine.log.backlog(feed) > 0)
            || pipeline.raw_queue.counts().processed < 2
        {
            tokio::task::yield_now().await;
        }
        assert_eq!(pipeline.backlog(), 10, "ten encode jobs are outstanding");
        let refused = pipeline.admit();
        assert_eq!(
            refused,
            Err(Overloaded {
                backlog: 10,
                limit: 5
            })
        );
    }
}
