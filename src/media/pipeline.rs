//! The media pipeline: one topology holding all four scenarios.
//!
//! ```text
//! raw_actors ─┐
//! raw_movies ─┤                    ┌─> actors, movies, series, episodes, videos
//! raw_series ─┼─> raw_queue ─> raw_handler ─┬─> raw_episodes (back into raw_queue)
//! raw_episodes┤                             └─> encode_queue ─> encode_handler ─> encodes
//! raw_videos ─┘
//! ```
//!
//! Ingest (`POST`/`PUT`/`DELETE /raw/{kind}`) writes raw tables only; the
//! rest follows from their changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::children::Children;
use crate::engine::dedup::DedupWindow;
use crate::engine::handler::{BreakerPolicy, HandlerConfig, RetryPolicy};
use crate::engine::log::{Cause, Change, SubscriberId};
use crate::engine::metrics::latency_histogram;
use crate::engine::queue::Queue;
use crate::engine::record::{RecordId, Timestamp};
use crate::engine::table::{
    Expect, Outcome, PreconditionFailed, Reconciliation, Table, TableKind, Write,
};
use crate::engine::topology::Topology;
use crate::engine::{Engine, EngineConfig};
use prometheus_client::metrics::histogram::Histogram;

use super::encode_handler::{EncodeHandler, EncodeJob};
use super::raw_handler::{ChildRecords, ChildSink, EncodeJobs, Parent, RawHandler, Route};
use super::records::{ByKind, Kind};

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
    /// Raw changes waiting for `raw_queue` above which ingest is refused.
    pub ingest_backlog_limit: u64,
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
            dedup_window: 100_000,
        }
    }
}

/// Ingest was refused because the pipeline is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the pipeline is behind: {backlog} changes wait for raw_queue (limit {limit})")]
pub struct Overloaded {
    pub backlog: u64,
    pub limit: u64,
}

pub struct Pipeline {
    pub engine: Engine,
    raw: ByKind<Arc<Table>>,
    /// Parent kinds' child lists (`None` for kinds without children).
    children: ByKind<Option<Arc<Children>>>,
    raw_feed: SubscriberId,
    pub raw_queue: Arc<Queue<Arc<Change>>>,
    pub encode_queue: Arc<Queue<EncodeJob>>,
    /// Seconds from a raw write to the standard write it caused.
    pub ingest_to_visible: Histogram,
    /// Events already applied, by CloudEvent `source` + `id`.
    pub dedup: DedupWindow,
    config: PipelineConfig,
}

impl Pipeline {
    /// Builds the tables, queues and handlers and starts their tasks (on the
    /// current tokio runtime).
    pub fn start(config: PipelineConfig) -> Self {
        let mut engine = Engine::new(EngineConfig {
            event_retention: config.event_retention,
            max_dead_letters: config.max_dead_letters,
        });
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
        let (raw_queue, raw_feed) = engine.add_fed_queue("raw_queue", config.queue_capacity, &fed);
        let encode_queue = engine.add_queue::<EncodeJob>("encode_queue", config.queue_capacity);
        let ingest_to_visible = latency_histogram();
        let mut routes = HashMap::new();
        for kind in Kind::ALL {
            let parent = children.get(kind).as_ref().map(|children| {
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
            });
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
                batch: 32,
                retry: config.retry,
                breaker: config.breaker,
            },
        );
        engine.add_handler(
            "encode_handler",
            &encode_queue,
            EncodeHandler {
                encodes,
                delay: config.encode_delay,
            },
            HandlerConfig {
                workers: config.encode_workers,
                batch: 1,
                retry: config.retry,
                breaker: config.breaker,
            },
        );
        describe(&mut engine.topology);
        Self {
            engine,
            raw,
            children,
            raw_feed,
            raw_queue,
            encode_queue,
            ingest_to_visible,
            dedup: DedupWindow::new(config.dedup_window),
            config,
        }
    }

    pub fn raw_table(&self, kind: Kind) -> &Arc<Table> {
        self.raw.get(kind)
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Refuses new ingest while too many raw changes wait for `raw_queue`.
    /// Writes made by handlers are never refused.
    pub fn admit(&self) -> Result<(), Overloaded> {
        let backlog = self.engine.log.backlog(self.raw_feed);
        if backlog > self.config.ingest_backlog_limit {
            return Err(Overloaded {
                backlog,
                limit: self.config.ingest_backlog_limit,
            });
        }
        Ok(())
    }

    /// The listing-table write that goes with a parent write, if it
    /// carries its child list.
    fn listing(&self, kind: Kind, write: &Write) -> Option<(&Arc<Table>, Write)> {
        let children = self.children.get(kind).as_ref()?;
        Some((&children.listing, children.listing_write(write)?))
    }

    /// One raw write, with its child list if it carries one. The list goes
    /// first, so the handler that sees the parent's change sees it too.
    fn write(&self, kind: Kind, write: Write, cause: &Cause) -> Outcome {
        if let Some((listing, list)) = self.listing(kind, &write) {
            listing.apply(list, cause);
        }
        self.raw.get(kind).apply(write, cause)
    }

    /// Writes raw records of `kind`, in order.
    pub fn ingest(
        &self,
        kind: Kind,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Vec<(RecordId, Outcome)> {
        writes
            .into_iter()
            .map(|w| (w.id.clone(), self.write(kind, w, cause)))
            .collect()
    }

    /// Writes raw records that came as CloudEvents, each with its `source`
    /// and `id` as its dedup key: an event already applied within the
    /// window is not applied again (`None`).
    pub fn ingest_events(
        &self,
        kind: Kind,
        events: Vec<(String, Write)>,
        cause: &Cause,
    ) -> Vec<(RecordId, Option<Outcome>)> {
        events
            .into_iter()
            .map(|(key, w)| {
                let id = w.id.clone();
                let outcome = self
                    .dedup
                    .first_time(&key)
                    .then(|| self.write(kind, w, cause));
                (id, outcome)
            })
            .collect()
    }

    /// Writes one raw record if the stored one meets `expect`.
    pub fn ingest_if(
        &self,
        kind: Kind,
        write: Write,
        expect: Expect,
        cause: &Cause,
    ) -> Result<Outcome, PreconditionFailed> {
        let list = self.listing(kind, &write);
        let outcome = self.raw.get(kind).apply_if(write, expect, cause)?;
        if let Some((listing, list)) = list {
            listing.apply(list, cause);
        }
        Ok(outcome)
    }

    /// Applies a complete set of `kind` as of `as_of`.
    pub fn reconcile(
        &self,
        kind: Kind,
        as_of: Timestamp,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Reconciliation {
        for (listing, list) in writes.iter().filter_map(|w| self.listing(kind, w)) {
            listing.apply(list, cause);
        }
        self.raw.get(kind).reconcile(as_of, writes, cause)
    }

    pub fn delete(&self, kind: Kind, id: &RecordId, at: Timestamp, cause: &Cause) -> Outcome {
        self.raw.get(kind).delete(id, at, cause)
    }
}

/// The four scenarios as edges of the one topology.
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
    t.edge("encode_queue", "encode_handler", "job", &[3]);
    t.edge("encode_handler", "encodes", "encoded rendition", &[3]);
}
