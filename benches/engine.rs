//! In-process benchmarks of the engine's parts, each beside a baseline
//! measured in the same run (divan).
//!
//! - `table_writes`: [`Table::apply`] over a batch of writes of one outcome
//!   (or a mix of all four), against a plain `Mutex<HashMap>` doing the same
//!   version compare, and against that map plus a `Mutex<VecDeque>` outbox
//!   (what the table's change-log append adds, at its simplest).
//! - `table_writes_shared`: one write per iteration on a table shared by 1
//!   or 2 threads, to show contention on the table's shards and the log.
//! - `log_queue_hop`: table writes whose changes go through the change log,
//!   its dispatcher and a queue to a handler that only counts them, until
//!   settled; against a bare tokio `mpsc` with a consumer task. Both as a
//!   burst of events (throughput) and as one event at a time (latency).
//! - `reconcile`: a complete set of 100k and 1M records (1% new, 1%
//!   updated, 1% missing and so deleted, the rest unchanged), against the
//!   same reconciliation on a plain `Mutex<HashMap>`.
//!
//! Run: `cargo bench --bench engine` (add `-- reconcile` etc. to filter).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::DateTime;
use divan::Bencher;
use divan::counter::ItemsCount;
use serde_json::json;
use tokio::sync::mpsc;

use eventsys::engine::handler::{Failure, HandlerConfig, Process};
use eventsys::engine::log::{Cause, Change, ChangeLog};
use eventsys::engine::record::{Data, RecordId, Timestamp, Version};
use eventsys::engine::settle::Activity;
use eventsys::engine::table::{Outcome, Table, TableKind, Write};
use eventsys::engine::{Engine, EngineConfig};
use eventsys::media::pipeline::PipelineConfig;

fn main() {
    divan::main();
}

/// The server's default change-log retention.
const RETENTION: usize = 1_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_datetime(DateTime::from_timestamp(1_700_000_000 + secs, 0).expect("in range"))
}

/// A movie-like record's data; `generation` changes its content.
fn data(n: usize, generation: u32) -> Data {
    Data::canonical(&json!({
        "id": format!("r{n:07}"),
        "title": format!("The Quiet Harbour, part {n} (cut {generation})"),
        "year": 1950 + (n % 70),
        "actor_ids": [format!("a{:07}", n % 5000), format!("a{:07}", (n + 1) % 5000)],
    }))
    .expect("canonical")
}

/// A write of record `id` at `secs` with `data` (fresh `Data`, so equal
/// content is compared byte by byte, as it is for data parsed from a request).
fn write(id: &str, secs: i64, data: Data) -> Write {
    Write {
        id: RecordId::parse(id).expect("valid id"),
        version: Version::write(at(secs), data.clone()),
        data,
    }
}

fn cause() -> Cause {
    Cause::request("bench")
}

fn new_table(retention: usize) -> Table {
    Table::new(
        "raw_movies",
        TableKind::Raw,
        Arc::new(ChangeLog::new(retention, Activity::default())),
    )
}

mod table_writes {
    //! A batch of 10k writes of one outcome (or a mix of all four) on a
    //! table preloaded with 10k records.

    use super::*;

    const PRELOAD: usize = 10_000;
    const WRITES: usize = 10_000;
    const MIXES: [&str; 5] = ["insert", "update", "unchanged", "stale", "mixed"];

    /// The records every table starts with (at t=1000).
    static PRELOADED: LazyLock<Vec<Write>> = LazyLock::new(|| {
        (0..PRELOAD)
            .map(|i| write(&format!("r{i:07}"), 1000, data(i, 0)))
            .collect()
    });

    /// The writes of each mix, made once and cloned per sample (a clone
    /// only bumps reference counts).
    static BATCHES: LazyLock<HashMap<&'static str, Vec<Write>>> = LazyLock::new(|| {
        let one = |outcome: &str, i: usize| match outcome {
            "insert" => write(&format!("n{i:07}"), 2000, data(i, 0)),
            "update" => write(&format!("r{i:07}"), 2000, data(i, 1)),
            "unchanged" => write(&format!("r{i:07}"), 1000, data(i, 0)),
            _ => write(&format!("r{i:07}"), 500, data(i, 1)),
        };
        MIXES
            .iter()
            .map(|&mix| {
                let writes = (0..WRITES)
                    .map(|i| match mix {
                        "mixed" => one(["insert", "update", "unchanged", "stale"][i % 4], i),
                        _ => one(mix, i),
                    })
                    .collect();
                (mix, writes)
            })
            .collect()
    });

    fn expected(mix: &str) -> Option<Outcome> {
        match mix {
            "insert" => Some(Outcome::Inserted),
            "update" => Some(Outcome::Updated),
            "unchanged" => Some(Outcome::Unchanged),
            "stale" => Some(Outcome::Stale),
            _ => None,
        }
    }

    #[divan::bench(args = MIXES, sample_count = 30, sample_size = 1)]
    fn table(bencher: Bencher, mix: &str) {
        let batch = &BATCHES[mix];
        let cause = cause();
        bencher
            .counter(ItemsCount::new(WRITES))
            .with_inputs(|| {
                let table = new_table(RETENTION);
                for w in PRELOADED.iter() {
                    table.apply(w.clone(), &cause);
                }
                (table, batch.clone())
            })
            .bench_local_values(|(table, writes)| {
                for w in writes {
                    let outcome = table.apply(w, &cause);
                    debug_assert!(expected(mix).is_none_or(|e| e == outcome));
                    divan::black_box(outcome);
                }
                table
            });
        // Checked once outside the timing, in release builds too.
        let table = new_table(RETENTION);
        for w in PRELOADED.iter() {
            table.apply(w.clone(), &cause);
        }
        let outcomes = table.apply_all(batch.clone(), &cause);
        if let Some(e) = expected(mix) {
            assert!(outcomes.iter().all(|o| *o == e), "{mix}: not all {e:?}");
        }
    }

    #[divan::bench(args = MIXES, sample_count = 30, sample_size = 1)]
    fn mutex_hashmap(bencher: Bencher, mix: &str) {
        let batch = &BATCHES[mix];
        bencher
            .counter(ItemsCount::new(WRITES))
            .with_inputs(|| {
                let map = PlainMap::default();
                for w in PRELOADED.iter() {
                    map.apply(w.clone());
                }
                (map, batch.clone())
            })
            .bench_local_values(|(map, writes)| {
                for w in writes {
                    let outcome = map.apply(w);
                    debug_assert!(expected(mix).is_none_or(|e| e == outcome));
                    divan::black_box(outcome);
                }
                map
            });
    }

    #[divan::bench(args = MIXES, sample_count = 30, sample_size = 1)]
    fn mutex_hashmap_with_outbox(bencher: Bencher, mix: &str) {
        let batch = &BATCHES[mix];
        bencher
            .counter(ItemsCount::new(WRITES))
            .with_inputs(|| {
                let map = PlainMap::with_outbox();
                for w in PRELOADED.iter() {
                    map.apply(w.clone());
                }
                (map, batch.clone())
            })
            .bench_local_values(|(map, writes)| {
                for w in writes {
                    divan::black_box(map.apply(w));
                }
                map
            });
    }
}

mod table_writes_shared {
    //! One update per iteration on a table of 10k records shared by all
    //! benchmark threads (`threads = [1, 2]`; this machine has 2 cores).

    use super::*;

    const RECORDS: usize = 10_000;
    const POOL: usize = 4096;

    /// Distinct contents, reused round-robin: with 10k ids and 4096
    /// contents, consecutive writes to one id always differ.
    static POOL_DATA: LazyLock<Vec<Data>> =
        LazyLock::new(|| (0..POOL).map(|i| data(i, 9)).collect());
    static IDS: LazyLock<Vec<RecordId>> = LazyLock::new(|| {
        (0..RECORDS)
            .map(|i| RecordId::parse(&format!("r{i:07}")).expect("valid id"))
            .collect()
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// A newer write of some record each call.
    fn next_write() -> Write {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
        let data = POOL_DATA[n % POOL].clone();
        Write {
            id: IDS[n % RECORDS].clone(),
            version: Version::write(at(10_000 + n as i64), data.clone()),
            data,
        }
    }

    static TABLE: LazyLock<Table> = LazyLock::new(|| new_table(100_000));
    static MAP: LazyLock<PlainMap> = LazyLock::new(PlainMap::default);

    #[divan::bench(threads = [1, 2])]
    fn table(bencher: Bencher) {
        let cause = cause();
        bencher
            .with_inputs(next_write)
            .bench_values(|w| TABLE.apply(w, &cause));
    }

    #[divan::bench(threads = [1, 2])]
    fn mutex_hashmap(bencher: Bencher) {
        bencher
            .with_inputs(next_write)
            .bench_values(|w| MAP.apply(w));
    }
}

/// The baseline: one `Mutex<HashMap>` with the same outcome rules as a
/// table (tombstones aside, which these benches never write), and
/// optionally a change pushed to a `Mutex<VecDeque>` for each real change.
#[derive(Default)]
struct PlainMap {
    map: Mutex<HashMap<RecordId, (Version, Data)>>,
    outbox: Option<Mutex<VecDeque<Arc<OutboxChange>>>>,
}

/// What the outbox baseline keeps per change: sequence, id, version, data.
type OutboxChange = (u64, RecordId, Version, Data);

impl PlainMap {
    fn with_outbox() -> Self {
        Self {
            outbox: Some(Mutex::default()),
            ..Default::default()
        }
    }

    fn apply(&self, w: Write) -> Outcome {
        let mut map = self.map.lock().expect("not poisoned");
        match map.get_mut(&w.id) {
            None => {
                self.emit(&w);
                map.insert(w.id, (w.version, w.data));
                Outcome::Inserted
            }
            Some((version, data)) if *data == w.data => {
                if w.version > *version {
                    *version = w.version;
                }
                Outcome::Unchanged
            }
            Some((version, _)) if w.version <= *version => Outcome::Stale,
            Some(entry) => {
                self.emit(&w);
                *entry = (w.version, w.data);
                Outcome::Updated
            }
        }
    }

    fn emit(&self, w: &Write) {
        if let Some(outbox) = &self.outbox {
            let mut outbox = outbox.lock().expect("not poisoned");
            let seq = outbox.len() as u64;
            outbox.push_back(Arc::new((
                seq,
                w.id.clone(),
                w.version.clone(),
                w.data.clone(),
            )));
            if outbox.len() > RETENTION {
                outbox.pop_front();
            }
        }
    }
}

mod log_queue_hop {
    //! Table change -> change log -> dispatcher -> queue -> handler, against
    //! a bare tokio mpsc from a producer to a consumer task.

    use super::*;

    const BURST: usize = 10_000;

    /// Two workers, as the server has on this 2-core machine.
    static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    });

    /// A handler that only counts.
    struct Count(Arc<AtomicU64>);

    impl Process<Arc<Change>> for Count {
        async fn process(&self, _: &Arc<Change>) -> Result<(), Failure> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// About 5 µs of work that takes no lock: a stand-in for
    /// standardising a record.
    fn busy_work(seed: u64) -> u64 {
        let mut x = seed | 1;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        x
    }

    /// A handler whose every event costs [`busy_work`].
    struct Busy(Arc<AtomicU64>);

    impl Process<Arc<Change>> for Busy {
        async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
            self.0.fetch_add(
                divan::black_box(busy_work(change.seq)) & 1,
                Ordering::Relaxed,
            );
            Ok(())
        }
    }

    /// A table feeding a queue with a counting handler, configured like
    /// `raw_queue` and `raw_handler` (capacity 1024, 2 workers, batch 32).
    fn engine() -> (Engine, Arc<Table>, Arc<AtomicU64>) {
        engine_with(2, Count)
    }

    fn engine_with<P: Process<Arc<Change>>>(
        workers: usize,
        process: impl FnOnce(Arc<AtomicU64>) -> P,
    ) -> (Engine, Arc<Table>, Arc<AtomicU64>) {
        let _guard = RUNTIME.enter();
        let mut engine = Engine::new(EngineConfig {
            event_retention: RETENTION,
            max_dead_letters: 1000,
            max_records: u64::MAX,
        });
        let table = engine.add_table("raw_movies", TableKind::Raw);
        let (queue, _) = engine.add_fed_queue("raw_queue", 1024, &[&table]);
        let count = Arc::new(AtomicU64::new(0));
        engine.add_handler("raw_handler", &queue, process(count.clone()), {
            // The server's retry and breaker policies.
            let defaults = PipelineConfig::default();
            HandlerConfig {
                workers,
                batch: 32,
                retry: defaults.retry,
                breaker: defaults.breaker,
            }
        });
        (engine, table, count)
    }

    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    static SMALL: LazyLock<Data> = LazyLock::new(|| data(0, 0));

    /// Inserts of ids never written before (so every write is a change).
    fn inserts(n: usize) -> Vec<Write> {
        (0..n)
            .map(|_| {
                let i = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                Write {
                    id: RecordId::parse(&format!("h{i:09}")).expect("valid id"),
                    version: Version::write(at(1000), SMALL.clone()),
                    data: SMALL.clone(),
                }
            })
            .collect()
    }

    /// 10k changes written at once, until the handler has processed all.
    #[divan::bench(sample_count = 30, sample_size = 1)]
    fn engine_burst(bencher: Bencher) {
        let (engine, table, count) = engine();
        let cause = cause();
        bencher
            .counter(ItemsCount::new(BURST))
            .with_inputs(|| inserts(BURST))
            .bench_local_values(|writes| {
                RUNTIME.block_on(async {
                    for w in writes {
                        table.apply(w, &cause);
                    }
                    assert!(engine.settle(Duration::from_secs(30)).await);
                })
            });
        assert!(count.load(Ordering::Relaxed) > 0);
        RUNTIME.block_on(engine.shutdown(Duration::from_secs(5)));
    }

    /// The same number of items through a bounded mpsc (capacity 1024) to
    /// a task that takes them 32 at a time.
    #[divan::bench(sample_count = 30, sample_size = 1)]
    fn mpsc_burst(bencher: Bencher) {
        bencher
            .counter(ItemsCount::new(BURST))
            .with_inputs(|| {
                inserts(BURST)
                    .into_iter()
                    .enumerate()
                    .map(|(i, w)| Arc::new((i as u64, w)))
                    .collect::<Vec<_>>()
            })
            .bench_local_values(|items| {
                RUNTIME.block_on(async {
                    let (tx, mut rx) = mpsc::channel(1024);
                    let consumer = tokio::spawn(async move {
                        let mut batch = Vec::with_capacity(32);
                        let mut seen = 0;
                        while rx.recv_many(&mut batch, 32).await > 0 {
                            seen += batch.len();
                            batch.clear();
                        }
                        seen
                    });
                    for item in items {
                        tx.send(item).await.expect("consumer alive");
                    }
                    drop(tx);
                    assert_eq!(consumer.await.expect("consumer"), BURST);
                })
            });
    }

    const CPU_EVENTS: usize = 2_000;

    /// Does a worker pool use both cores? 2,000 events of ~5 µs of
    /// lock-free work each through a handler of 1 or 2 workers: with 2
    /// workers on 2 cores the time should halve.
    #[divan::bench(args = [1, 2], sample_count = 20, sample_size = 1)]
    fn engine_cpu_bound(bencher: Bencher, workers: usize) {
        let (engine, table, _) = engine_with(workers, Busy);
        let cause = cause();
        bencher
            .counter(ItemsCount::new(CPU_EVENTS))
            .with_inputs(|| inserts(CPU_EVENTS))
            .bench_local_values(|writes| {
                RUNTIME.block_on(async {
                    for w in writes {
                        table.apply(w, &cause);
                    }
                    assert!(engine.settle(Duration::from_secs(30)).await);
                })
            });
        RUNTIME.block_on(engine.shutdown(Duration::from_secs(5)));
    }

    /// The same work split over 1 or 2 plain tokio tasks: the floor.
    #[divan::bench(args = [1, 2], sample_count = 20, sample_size = 1)]
    fn tasks_cpu_bound(bencher: Bencher, tasks: usize) {
        bencher
            .counter(ItemsCount::new(CPU_EVENTS))
            .bench_local(|| {
                RUNTIME.block_on(async {
                    let handles: Vec<_> = (0..tasks)
                        .map(|t| {
                            tokio::spawn(async move {
                                let mut sum = 0;
                                for i in (t..CPU_EVENTS).step_by(tasks) {
                                    sum += busy_work(i as u64) & 1;
                                    tokio::task::yield_now().await;
                                }
                                sum
                            })
                        })
                        .collect();
                    for handle in handles {
                        divan::black_box(handle.await.expect("task"));
                    }
                })
            });
    }

    /// One change at a time: written, then waited for until settled (the
    /// settle wake-up is the second hop).
    #[divan::bench(sample_count = 100, sample_size = 20)]
    fn engine_one_event(bencher: Bencher) {
        let (engine, table, _) = engine();
        let cause = cause();
        bencher
            .with_inputs(|| inserts(1).pop().expect("one"))
            .bench_local_values(|w| {
                RUNTIME.block_on(async {
                    table.apply(w, &cause);
                    engine.settle(Duration::from_secs(5)).await
                })
            });
        RUNTIME.block_on(engine.shutdown(Duration::from_secs(5)));
    }

    /// One item to a consumer task and an acknowledgement back.
    #[divan::bench(sample_count = 100, sample_size = 20)]
    fn mpsc_one_event(bencher: Bencher) {
        let (tx, mut rx) = mpsc::channel::<(Write, tokio::sync::oneshot::Sender<()>)>(1024);
        let consumer = RUNTIME.spawn(async move {
            while let Some((w, ack)) = rx.recv().await {
                divan::black_box(w);
                let _ = ack.send(());
            }
        });
        bencher
            .with_inputs(|| inserts(1).pop().expect("one"))
            .bench_local_values(|w| {
                RUNTIME.block_on(async {
                    let (ack, acked) = tokio::sync::oneshot::channel();
                    tx.send((w, ack)).await.expect("consumer alive");
                    acked.await.expect("acked")
                })
            });
        drop(tx);
        RUNTIME.block_on(consumer).expect("consumer");
    }
}

mod reconcile {
    //! A complete set of `n` records against a table of `n`: 1% of the
    //! table missing from the set (deleted), 1% new, 1% updated, the rest
    //! unchanged (equal content, freshly parsed so compared byte-wise).

    use super::*;

    /// The `n` records a table or map starts with.
    fn preload(n: usize) -> impl Iterator<Item = Write> {
        (0..n).map(|i| write(&format!("r{i:07}"), 1000, data(i, 0)))
    }

    fn inputs(n: usize) -> (Table, Vec<Write>) {
        let table = new_table(RETENTION);
        let cause = cause();
        for w in preload(n) {
            table.apply(w, &cause);
        }
        (table, set(n))
    }

    /// The complete set reconciled against `preload(n)`.
    fn set(n: usize) -> Vec<Write> {
        let kept = n - n / 100;
        let mut set: Vec<Write> = (0..kept)
            .map(|i| {
                if i % 100 == 0 {
                    write(&format!("r{i:07}"), 2000, data(i, 1))
                } else {
                    write(&format!("r{i:07}"), 1000, data(i, 0))
                }
            })
            .collect();
        set.extend((0..n / 100).map(|i| write(&format!("n{i:07}"), 2000, data(n + i, 0))));
        set
    }

    #[divan::bench(args = [100_000, 1_000_000], sample_count = 5, sample_size = 1)]
    fn complete_set(bencher: Bencher, n: usize) {
        let cause = cause();
        bencher
            .counter(ItemsCount::new(n))
            .with_inputs(|| inputs(n))
            .bench_local_values(|(table, set)| {
                let report = table.reconcile(at(3000), set, &cause);
                debug_assert_eq!(report.deleted.len(), n / 100);
                (table, report)
            });
    }

    /// The same reconciliation on a plain `Mutex<HashMap>` under one lock:
    /// each write applied with the same version compare and marked seen,
    /// then one pass deleting what was neither seen nor newer. No change
    /// log, no shards.
    #[divan::bench(args = [100_000, 1_000_000], sample_count = 5, sample_size = 1)]
    fn mutex_hashmap(bencher: Bencher, n: usize) {
        bencher
            .counter(ItemsCount::new(n))
            .with_inputs(|| {
                let map = PlainSet::default();
                map.reconcile(at(1000), preload(n).collect());
                (map, set(n))
            })
            .bench_local_values(|(map, set)| {
                let deleted = map.reconcile(at(3000), set);
                assert_eq!(deleted.len(), n / 100);
                (map, deleted)
            });
    }

    type Stored = (Version, Option<Data>, Option<Timestamp>);

    #[derive(Default)]
    struct PlainSet(Mutex<HashMap<RecordId, Stored>>);

    impl PlainSet {
        /// Applies the complete set `writes` as of `as_of`; returns the ids
        /// deleted, in id order.
        fn reconcile(&self, as_of: Timestamp, writes: Vec<Write>) -> Vec<RecordId> {
            let mut map = self.0.lock().expect("not poisoned");
            for w in writes {
                match map.get_mut(&w.id) {
                    None => {
                        map.insert(w.id, (w.version, Some(w.data), Some(as_of)));
                    }
                    Some((version, data, seen)) => {
                        *seen = (*seen).max(Some(as_of));
                        match data {
                            Some(stored) if *stored == w.data => {
                                if w.version > *version {
                                    *version = w.version;
                                }
                            }
                            _ if w.version <= *version => {}
                            _ => {
                                *version = w.version;
                                *data = Some(w.data);
                            }
                        }
                    }
                }
            }
            let tombstone = Version::delete(as_of);
            let mut deleted = Vec::new();
            for (id, (version, data, seen)) in map.iter_mut() {
                if data.is_some() && seen.is_none_or(|s| s < as_of) && version.at < as_of {
                    *version = tombstone.clone();
                    *data = None;
                    deleted.push(id.clone());
                }
            }
            deleted.sort();
            deleted
        }
    }
}
