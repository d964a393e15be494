//! The JetStream backend against a real nats-server started by the test
//! (see support/nats.rs for where the binary comes from).

#[path = "support/nats.rs"]
mod nats;
#[path = "support/temp_dir.rs"]
mod temp_dir;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsys::engine::children::Children;
use eventsys::engine::dedup::DedupKey;
use eventsys::engine::handler::{BreakerPolicy, Failure, HandlerConfig, Process, RetryPolicy};
use eventsys::engine::log::{Cause, Change, ChangeLog};
use eventsys::engine::queue::{Queue, QueueItem};
use eventsys::engine::record::{Data, RecordId, Timestamp, Version};
use eventsys::engine::settle::Activity;
use eventsys::engine::store::SharedWindow;
use eventsys::engine::table::{Outcome, Table, TableKind, Write};
use eventsys::engine::{Engine, EngineConfig};
use eventsys::jetstream::dead::DeadLetters;
use eventsys::jetstream::dedup::Window;
use eventsys::jetstream::queue::{Idle, QueueOptions, SharedQueue, settle};
use eventsys::jetstream::state::{Names, Replicas, StateOptions, StateStore};
use eventsys::jetstream::{self, ConnectError, MIN_SERVER};
use eventsys::media::raw_handler::{ChildRecords, ChildSink};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use nats::NatsServer;

const WITHIN: Duration = Duration::from_secs(3);

#[tokio::test]
async fn connects_to_a_current_server_and_reads_its_version() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let connection = jetstream::connect(&server.url, WITHIN)
        .await
        .expect("connect");
    assert!(connection.version >= MIN_SERVER, "{}", connection.version);
    connection
        .jetstream
        .query_account()
        .await
        .expect("JetStream answers");
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_within_the_time_given() {
    // A port nothing listens on: bound, then released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let error = jetstream::connect(&url, WITHIN).await.expect_err("refused");
    assert!(started.elapsed() < WITHIN + Duration::from_secs(1));
    assert!(matches!(error, ConnectError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains(&url), "{error}");
}

/// A listener that speaks just enough of the NATS protocol to be connected
/// to, claiming to be `version`.
async fn pretend_server(version: &'static str, jetstream: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let info = serde_json::json!({
                    "server_id": "pretend", "server_name": "pretend",
                    "version": version, "go": "go1", "host": "127.0.0.1",
                    "port": addr.port(), "headers": true, "max_payload": 1048576,
                    "proto": 1, "jetstream": jetstream,
                });
                let hello = format!("INFO {info}\r\n");
                if write.write_all(hello.as_bytes()).await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("PING") && write.write_all(b"PONG\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("nats://{addr}")
}

#[tokio::test]
async fn a_server_too_old_is_refused_naming_both_versions() {
    let url = pretend_server("2.9.10", true).await;
    let error = jetstream::connect(&url, WITHIN).await.expect_err("refused");
    assert!(matches!(error, ConnectError::TooOld { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("2.9.10"), "{text}");
    assert!(text.contains(&MIN_SERVER.to_string()), "{text}");
}

#[tokio::test]
async fn a_server_without_jetstream_is_refused() {
    let url = pretend_server("2.15.1", false).await;
    let error = jetstream::connect(&url, WITHIN).await.expect_err("refused");
    assert!(matches!(error, ConnectError::NoJetStream { .. }), "{error}");
    let Some(server) = NatsServer::start_with(&[]) else {
        return;
    };
    let error = jetstream::connect(&server.url, WITHIN)
        .await
        .expect_err("refused");
    assert!(matches!(error, ConnectError::NoJetStream { .. }), "{error}");
}

/// One eventsys process's view of a shared table: its own connection, its
/// replica of the state stream, and the change log that replica feeds.
struct Replica {
    log: Arc<ChangeLog>,
    table: Arc<Table>,
    store: Arc<StateStore>,
    stop: CancellationToken,
}

/// A process's own connection to the state stream, and the change log its
/// replica feeds.
async fn process(url: &str, prefix: &str) -> (Arc<StateStore>, Arc<ChangeLog>) {
    let connection = jetstream::connect(url, WITHIN).await.expect("connect");
    let names = Names::new(prefix).expect("prefix");
    let store = StateStore::open(&connection, names, &StateOptions::default())
        .await
        .expect("open the state stream");
    let log = Arc::new(ChangeLog::new(1_000_000, Activity::default()));
    (store, log)
}

impl Replica {
    async fn open(url: &str, prefix: &str) -> Replica {
        let (store, log) = process(url, prefix).await;
        let table = Arc::new(Table::new("movies", TableKind::Raw, log.clone()));
        assert!(table.share(store.clone()).is_ok());
        let replicas = Replicas {
            tables: HashMap::from([(table.name().clone(), table.clone())]),
            ..Replicas::default()
        };
        let stop = CancellationToken::new();
        tokio::spawn(store.clone().follow(replicas, log.clone(), stop.clone()));
        Replica {
            log,
            table,
            store,
            stop,
        }
    }

    /// Waits until this replica has everything the stream holds now.
    async fn catch_up(&self) {
        let last = self.store.last().await.expect("stream info");
        tokio::time::timeout(Duration::from_secs(30), self.store.caught_up(last))
            .await
            .expect("the replica catches up");
    }

    /// The change log, as (sequence, id, key, kind, version).
    fn changes(&self) -> Vec<(u64, String, String, String, String)> {
        let page = self.log.read(0, usize::MAX, |_| true).expect("log");
        page.events
            .iter()
            .map(|c| {
                (
                    c.seq,
                    c.id.to_string(),
                    c.key.to_string(),
                    c.kind.as_str().to_owned(),
                    format!("{:?}", c.version),
                )
            })
            .collect()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(Write),
    Delete(RecordId, Timestamp),
    /// A complete set as of a time.
    Reconcile(Timestamp, Vec<Write>),
}

fn at(second: u32) -> Timestamp {
    Timestamp::parse(&format!("2024-01-01T00:00:{second:02}Z")).expect("a time")
}

fn a_write(rng: &mut fastrand::Rng, id: RecordId, when: Timestamp) -> Write {
    let data = Data::canonical(&serde_json::json!({"title": rng.u8(0..3)})).expect("data");
    Write {
        id,
        version: Version::write(when, data.clone()),
        data,
    }
}

/// Writes, deletes and (when `sets`) reconciliations of a few ids at a few
/// versions with a few values, so that many collide: repeats, stale
/// versions, ties broken by data, deletes before and after writes, sets
/// that hide records and sets that bring them back.
fn ops_with(seed: u64, n: usize, ids: u8, sets: bool) -> Vec<Op> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let id =
        |rng: &mut fastrand::Rng| RecordId::parse(&format!("m{}", rng.u8(0..ids))).expect("an id");
    (0..n)
        .map(|_| {
            // Sets are as of early times, so that later writes outlive
            // them.
            let when = at(rng.u32(0..20));
            match rng.u8(0..16) {
                0 => Op::Delete(id(&mut rng), when),
                1 if sets => {
                    let when = at(rng.u32(10..25));
                    // Most ids, each at an early version.
                    let mut members = Vec::new();
                    for n in 0..ids {
                        if rng.u8(0..4) != 0 {
                            let member = RecordId::parse(&format!("m{n}")).expect("an id");
                            let at = at(rng.u32(0..20));
                            members.push(a_write(&mut rng, member, at));
                        }
                    }
                    Op::Reconcile(when, members)
                }
                _ => {
                    let id = id(&mut rng);
                    Op::Write(a_write(&mut rng, id, when))
                }
            }
        })
        .collect()
}

fn ops(seed: u64, n: usize, ids: u8) -> Vec<Op> {
    ops_with(seed, n, ids, false)
}

/// Sends `ops` from eight clients at once, each its share, through one of
/// two processes' tables.
async fn from_clients(ops: &[Op], tables: [&Arc<Table>; 2]) {
    let clients = (0..8).map(|client| {
        let table = tables[client % 2].clone();
        let mine: Vec<Op> = ops.iter().skip(client).step_by(8).cloned().collect();
        tokio::spawn(async move {
            for op in mine {
                run(&table, op).await;
            }
        })
    });
    for client in futures_util::future::join_all(clients).await {
        client.expect("a client ran");
    }
}

async fn run(table: &Table, op: Op) -> Outcome {
    let cause = Cause::request("test");
    let writer = table.writer();
    match op {
        Op::Write(write) => writer.apply(write, &cause).await,
        Op::Delete(id, at) => writer.delete(&id, at, &cause).await,
        Op::Reconcile(as_of, writes) => writer
            .reconcile(as_of, writes, &cause)
            .await
            .map(|_| Outcome::Unchanged),
    }
    .expect("JetStream takes the write")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_writing_the_same_records_at_once_converge_on_what_memory_holds() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let replicas = [
        Replica::open(&server.url, "conv").await,
        Replica::open(&server.url, "conv").await,
    ];
    let mut hidden = 0;
    // Few ids collide more; many ids have few writes each, so that which
    // sets they are in decides whether they are seen.
    let ids = |round: u64| if round.is_multiple_of(2) { 6 } else { 60 };
    for round in 0..4u64 {
        let ops = ops_with(round, 300, ids(round), true);
        from_clients(&ops, [&replicas[0].table, &replicas[1].table]).await;
        for replica in &replicas {
            replica.catch_up().await;
        }
        // Memory, given every op of every round so far in another order.
        let memory = Table::new(
            "movies",
            TableKind::Raw,
            Arc::new(ChangeLog::new(1_000_000, Activity::default())),
        );
        let mut all: Vec<Op> = (0..=round)
            .flat_map(|r| ops_with(r, 300, ids(r), true))
            .collect();
        fastrand::Rng::with_seed(round + 100).shuffle(&mut all);
        for op in all {
            if let Op::Reconcile(as_of, writes) = op {
                let report = memory
                    .writer()
                    .reconcile(as_of, writes, &Cause::request("test"))
                    .await
                    .expect("memory");
                hidden += report.deleted.len();
            } else {
                run(&memory, op).await;
            }
        }
        let want = memory.snapshot();
        assert!(!want.is_empty());
        for (i, replica) in replicas.iter().enumerate() {
            assert_eq!(replica.table.snapshot(), want, "replica {i}, round {round}");
            assert_eq!(
                replica.table.len(),
                want.len() as u64,
                "replica {i} live count"
            );
        }
        // One change log: the same changes at the same sequences.
        assert_eq!(
            replicas[0].changes(),
            replicas[1].changes(),
            "round {round}"
        );
        // And it says what the table holds: each id's last change (a
        // newer version with the same data is no change).
        let mut last = BTreeMap::new();
        for change in replicas[0]
            .log
            .read(0, usize::MAX, |_| true)
            .expect("log")
            .events
        {
            last.insert(change.key.clone(), change);
        }
        let from_log: Vec<_> = last
            .values()
            .filter(|c| c.data.is_some())
            .map(|c| (c.key.clone(), c.data.clone()))
            .collect();
        let held: Vec<_> = want
            .iter()
            .map(|r| (r.id.clone(), Some(r.data.clone())))
            .collect();
        assert_eq!(from_log, held, "round {round}");
    }
    assert!(hidden > 0, "some sets hid records");
}

/// What every process's handler saw: (process, sequence, attempt, ok).
type Seen = Arc<Mutex<Vec<(usize, u64, u32, bool)>>>;

/// A handler that fails the first two attempts (by any process) at a
/// change whose title is 1, fails every attempt at one whose title is 2,
/// and does nothing at all while `hang` is set (a process that stopped
/// mid-change).
struct Recorder {
    process: usize,
    seen: Seen,
    attempts: Arc<Mutex<HashMap<u64, u32>>>,
    hang: bool,
}

impl Process<Arc<Change>> for Recorder {
    async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        let attempt = {
            let mut attempts = self.attempts.lock().expect("attempts");
            let n = attempts.entry(change.seq).or_default();
            *n += 1;
            *n
        };
        let title = change
            .data
            .as_ref()
            .map(|d| d.as_str().to_owned())
            .unwrap_or_default();
        let result = if title.contains(":2") {
            Err(Failure::Transient("title 2 always fails".into()))
        } else if title.contains(":1") && attempt <= 2 {
            Err(Failure::Transient("title 1 fails twice".into()))
        } else {
            Ok(())
        };
        self.seen
            .lock()
            .expect("seen")
            .push((self.process, change.seq, attempt, result.is_ok()));
        result
    }
}

/// One process: its engine, with the shared table, and one queue of the
/// table's changes with a handler.
struct Worker {
    engine: Engine,
    replica: Replica,
    queue: Arc<Queue<Arc<Change>>>,
    shared: Arc<SharedQueue<Arc<Change>>>,
    stop: CancellationToken,
}

impl Worker {
    async fn start(url: &str, prefix: &str, process: Recorder, ack_wait: Duration) -> Worker {
        let replica = Replica::open(url, prefix).await;
        let mut engine = Engine::new(EngineConfig {
            event_retention: 100_000,
            max_dead_letters: 10_000,
            max_records: u64::MAX,
        });
        let queue = engine.add_queue::<Arc<Change>>("movie_queue", 64);
        engine.add_handler("movie_handler", &queue, process, handler_config(4, 4));
        let names = Names::new(prefix).expect("prefix");
        let options = QueueOptions {
            ack_wait,
            ..QueueOptions::default()
        };
        let shared = SharedQueue::open(
            &replica.store,
            &names,
            queue.clone(),
            std::slice::from_ref(replica.table.name()),
            &options,
        )
        .await
        .expect("open the queue's consumer");
        let stop = CancellationToken::new();
        tokio::spawn(shared.clone().feed(stop.clone()));
        Worker {
            engine,
            replica,
            queue,
            shared,
            stop,
        }
    }
}

impl Worker {
    /// Two processes on one prefix, recording what they see in `seen`.
    async fn pair(url: &str, prefix: &str, seen: &Seen, attempts: &Attempts) -> [Worker; 2] {
        let ack_wait = Duration::from_secs(30);
        [
            Worker::start(url, prefix, recorder(0, seen, attempts, false), ack_wait).await,
            Worker::start(url, prefix, recorder(1, seen, attempts, false), ack_wait).await,
        ]
    }
}

/// A handler's workers and a quick retry policy of `attempts` in all.
fn handler_config(workers: usize, attempts: u32) -> HandlerConfig {
    HandlerConfig {
        workers,
        batch: 1,
        retry: RetryPolicy {
            max_attempts: attempts,
            base: Duration::from_millis(5),
            cap: Duration::from_millis(40),
        },
        breaker: BreakerPolicy {
            threshold: u32::MAX,
            cool_down: Duration::from_millis(10),
        },
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Attempts = Arc<Mutex<HashMap<u64, u32>>>;

fn recorder(process: usize, seen: &Seen, attempts: &Attempts, hang: bool) -> Recorder {
    Recorder {
        process,
        seen: seen.clone(),
        attempts: attempts.clone(),
        hang,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_queue_spreads_changes_over_processes_and_retries_across_them() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let (seen, attempts) = (Seen::default(), Attempts::default());
    let workers = Worker::pair(&server.url, "spread", &seen, &attempts).await;
    let ops = ops(7, 400, 80);
    from_clients(&ops, [&workers[0].replica.table, &workers[1].replica.table]).await;
    let queues: [Arc<dyn Idle>; 2] = [workers[0].shared.clone(), workers[1].shared.clone()];
    let settled = settle(&workers[0].replica.store, &queues, Duration::from_secs(60))
        .await
        .expect("JetStream answers");
    assert!(settled, "the shared queue settles");
    for worker in &workers {
        assert!(worker.engine.settle(Duration::from_secs(5)).await);
    }

    let changes = workers[0]
        .replica
        .log
        .read(0, usize::MAX, |_| true)
        .expect("log");
    assert!(changes.events.len() > 20, "{}", changes.events.len());
    let seen = seen.lock().expect("seen").clone();
    let mut by_seq: BTreeMap<u64, Vec<(usize, u32, bool)>> = BTreeMap::new();
    for &(process, seq, attempt, ok) in &seen {
        by_seq.entry(seq).or_default().push((process, attempt, ok));
    }
    let mut moved = 0;
    let mut refused = 0;
    for change in &changes.events {
        let tries = by_seq
            .get(&change.seq)
            .unwrap_or_else(|| panic!("change {} never reached a handler", change.seq));
        let title = change
            .data
            .as_ref()
            .map(|d| d.as_str().to_owned())
            .unwrap_or_default();
        if title.contains(":2") {
            // Given up after the handler's four attempts in all, wherever
            // they ran.
            refused += 1;
            assert_eq!(tries.len(), 4, "change {}: {tries:?}", change.seq);
            assert!(tries.iter().all(|t| !t.2), "{tries:?}");
        } else {
            assert!(
                tries.iter().any(|t| t.2),
                "change {} never done: {tries:?}",
                change.seq
            );
        }
        if title.contains(":1") {
            assert_eq!(tries.len(), 3, "two failures, then done: {tries:?}");
        }
        moved += usize::from(tries.iter().any(|t| t.0 != tries[0].0));
    }
    for process in 0..2 {
        assert!(
            seen.iter().any(|s| s.0 == process && s.3),
            "process {process} did some of the work"
        );
    }
    assert!(moved > 0, "some retries were taken by the other process");
    // Counters add up in each process: everything it took ended there or
    // was handed back.
    let mut dead = 0;
    for worker in &workers {
        let c = worker.queue.counts();
        assert_eq!(c.depth + c.in_flight, 0, "{c:?}");
        assert_eq!(
            c.enqueued,
            c.processed + c.dead_lettered + c.retried,
            "{c:?}"
        );
        for letter in worker.queue.dead_letters() {
            assert_eq!(letter.attempts, 4, "{}", letter.error);
        }
        dead += worker.queue.dead_letter_count();
    }
    assert_eq!(dead, refused, "each refused change is dead-lettered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_dead_process_took_are_finished_by_another() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let (seen, attempts) = (Seen::default(), Attempts::default());
    let ack_wait = Duration::from_secs(1);
    // A process that takes changes and then stops answering.
    let stuck = Worker::start(
        &server.url,
        "dies",
        recorder(0, &seen, &attempts, true),
        ack_wait,
    )
    .await;
    for op in ops(11, 60, 30) {
        run(&stuck.replica.table, op).await;
    }
    stuck.replica.catch_up().await;
    let taken = {
        let c = stuck.queue.counts();
        c.depth + c.in_flight
    };
    assert!(taken > 0, "the stuck process took changes");
    stuck.stop.cancel();
    // Another takes over what it held once `ack_wait` is over.
    let seen_after = Seen::default();
    let other = Worker::start(
        &server.url,
        "dies",
        recorder(1, &seen_after, &attempts, false),
        ack_wait,
    )
    .await;
    // The stuck process's queue still holds its changes, never acked:
    // settle waits for them to be delivered again, to the other.
    let queues: [Arc<dyn Idle>; 1] = [other.shared.clone()];
    let settled = settle(&other.replica.store, &queues, Duration::from_secs(60))
        .await
        .expect("JetStream answers");
    assert!(settled);
    let changes = other
        .replica
        .log
        .read(0, usize::MAX, |_| true)
        .expect("log");
    let reached: std::collections::BTreeSet<u64> = seen_after
        .lock()
        .expect("seen")
        .iter()
        .map(|s| s.1)
        .collect();
    for change in &changes.events {
        assert!(
            reached.contains(&change.seq),
            "change {} was lost",
            change.seq
        );
    }
    assert!(
        seen.lock().expect("seen").is_empty(),
        "the stuck process finished nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedup_window_admits_each_key_once_over_processes_and_forgets_the_oldest() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let mut windows = Vec::new();
    for _ in 0..2 {
        let connection = jetstream::connect(&server.url, WITHIN)
            .await
            .expect("connect");
        let names = Names::new("dedup").expect("prefix");
        let window = Window::open(&connection, names, 50, 1).await.expect("open");
        windows.push(Arc::new(window));
    }
    let key = |n: u8| DedupKey::of(&["source", &n.to_string()]).bytes();
    // Both processes add each of 20 keys at the same time.
    let adds = (0..20u8).flat_map(|n| {
        windows.iter().map(move |window| {
            let window = window.clone();
            tokio::spawn(async move { window.add(key(n)).await.expect("JetStream answers") })
        })
    });
    let firsts = futures_util::future::join_all(adds)
        .await
        .into_iter()
        .map(|added| added.expect("an add ran"))
        .filter(|first| *first)
        .count();
    assert_eq!(firsts, 20, "each key is new to exactly one process");
    // 40 more: the window keeps the last 50 of the 60, in either process.
    for n in 20..60 {
        assert!(
            windows[n as usize % 2]
                .add(key(n))
                .await
                .expect("JetStream answers")
        );
    }
    let mut kept = Vec::new();
    for n in 0..60 {
        let seen = windows[0]
            .contains(key(n))
            .await
            .expect("JetStream answers");
        assert_eq!(
            seen,
            windows[1]
                .contains(key(n))
                .await
                .expect("JetStream answers")
        );
        if seen {
            kept.push(n);
        }
    }
    assert_eq!(kept.len(), 50, "{kept:?}");
    assert!(
        (20..60).all(|n| kept.contains(&n)),
        "the last 40 are kept: {kept:?}"
    );
    // A forgotten key is new again.
    let forgotten = (0..20)
        .find(|n| !kept.contains(n))
        .expect("ten were forgotten");
    assert!(
        windows[1]
            .add(key(forgotten))
            .await
            .expect("JetStream answers")
    );
}

/// One process's replica of a parent table with its child lists: series,
/// their listing table, and the episodes the lists put in `episodes`.
struct Family {
    series: Arc<Table>,
    children: Arc<Children>,
    episodes: Arc<Table>,
    store: Arc<StateStore>,
    stop: CancellationToken,
}

fn split(_: &RecordId, list: &Data) -> Result<Vec<(RecordId, Data)>, String> {
    let items: Vec<serde_json::Value> =
        serde_json::from_str(list.as_str()).map_err(|e| e.to_string())?;
    items
        .iter()
        .map(|item| {
            let id = RecordId::parse(item["id"].as_str().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            Ok((id, Data::canonical(item).map_err(|e| e.to_string())?))
        })
        .collect()
}

impl Family {
    async fn open(url: &str, prefix: &str) -> Family {
        let (store, log) = process(url, prefix).await;
        let series = Arc::new(Table::new("series", TableKind::Raw, log.clone()));
        let listing = Arc::new(Table::listing("series_episodes", log.clone()));
        let episodes = Arc::new(Table::new("episodes", TableKind::Raw, log.clone()));
        let children = Arc::new(Children::new(
            "episodes",
            series.clone(),
            listing.clone(),
            split,
        ));
        for table in [&series, &listing, &episodes] {
            assert!(table.share(store.clone()).is_ok());
        }
        assert!(children.share(store.clone()).is_ok());
        let replicas = Replicas {
            tables: [&series, &listing, &episodes]
                .into_iter()
                .map(|t| (t.name().clone(), t.clone()))
                .collect(),
            children: HashMap::from([(listing.name().clone(), children.clone())]),
        };
        let stop = CancellationToken::new();
        tokio::spawn(store.clone().follow(replicas, log.clone(), stop.clone()));
        Family {
            series,
            children,
            episodes,
            store,
            stop,
        }
    }

    /// A series write, with its list first, as ingest makes it.
    async fn ingest(&self, write: Write) {
        let cause = Cause::request("test");
        if let Some(list) = self.children.listing_write(&write) {
            self.children
                .listing
                .writer()
                .apply(list, &cause)
                .await
                .expect("JetStream takes the write");
        }
        self.series
            .writer()
            .apply(write, &cause)
            .await
            .expect("JetStream takes the write");
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Refreshes a parent's children for each change of it, as raw_handler
/// does on a shared store.
struct Refresher {
    children: Arc<Children>,
    sink: ChildRecords,
    redone: Arc<std::sync::atomic::AtomicUsize>,
}

impl Process<Arc<Change>> for Refresher {
    async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
        let cause = Cause::caused_by(change);
        let mut again = false;
        loop {
            let plan = self.children.begin(&change.key, change.seq, again).await;
            let Some(plan) = plan.map_err(|e| Failure::Transient(e.to_string()))? else {
                return Ok(());
            };
            self.sink
                .apply(
                    &change.key,
                    change,
                    plan.previous.as_ref(),
                    plan.current.as_ref(),
                    &cause,
                )
                .await?;
            if self
                .children
                .finish(plan)
                .await
                .map_err(|e| Failure::Transient(e.to_string()))?
            {
                return Ok(());
            }
            self.redone
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            again = true;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_refreshed_by_two_processes_at_once_list_exactly_their_last_children() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let redone = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut families = Vec::new();
    let mut engines = Vec::new();
    let mut queues: Vec<Arc<dyn Idle>> = Vec::new();
    for _ in 0..2 {
        let family = Family::open(&server.url, "kids").await;
        let mut engine = Engine::new(EngineConfig {
            event_retention: 100_000,
            max_dead_letters: 10_000,
            max_records: u64::MAX,
        });
        let queue = engine.add_queue::<Arc<Change>>("series_queue", 64);
        let refresher = Refresher {
            children: family.children.clone(),
            sink: ChildRecords {
                table: family.episodes.clone(),
            },
            redone: redone.clone(),
        };
        engine.add_handler("series_handler", &queue, refresher, handler_config(4, 50));
        let names = Names::new("kids").expect("prefix");
        let tables = [
            family.series.name().clone(),
            family.children.listing.name().clone(),
        ];
        let shared = SharedQueue::open(
            &family.store,
            &names,
            queue,
            &tables,
            &QueueOptions::default(),
        )
        .await
        .expect("open the queue's consumer");
        tokio::spawn(shared.clone().feed(family.stop.clone()));
        families.push(family);
        engines.push(engine);
        queues.push(shared);
    }

    // Three series, rewritten 240 times with lists of their episodes
    // s<i>-e1..e5 (any subset, any titles), at random versions, through
    // either process, eight clients at once; some versions carry no list.
    let mut rng = fastrand::Rng::with_seed(5);
    let writes: Vec<Write> = (0..240)
        .map(|_| {
            let series = rng.u8(0..3);
            let mut record = serde_json::json!({"id": format!("s{series}"), "title": rng.u8(0..3)});
            if rng.u8(0..5) != 0 {
                let mut list = Vec::new();
                for e in 1..=5 {
                    if rng.bool() {
                        let title = rng.u8(0..2);
                        list.push(
                            serde_json::json!({"id": format!("s{series}-e{e}"), "title": title}),
                        );
                    }
                }
                record["episodes"] = serde_json::Value::from(list);
            }
            let data = Data::canonical(&record).expect("data");
            Write {
                id: RecordId::parse(&format!("s{series}")).expect("an id"),
                version: Version::write(at(rng.u32(0..40)), data.clone()),
                data,
            }
        })
        .collect();
    let clients = (0..8).map(|client| {
        let mine: Vec<Write> = writes.iter().skip(client).step_by(8).cloned().collect();
        let family = client % 2;
        (family, mine)
    });
    let families = Arc::new(families);
    let tasks = clients.map(|(family, mine)| {
        let families = families.clone();
        tokio::spawn(async move {
            for write in mine {
                families[family].ingest(write).await;
            }
        })
    });
    for task in futures_util::future::join_all(tasks).await {
        task.expect("a client ran");
    }
    let settled = settle(&families[0].store, &queues, Duration::from_secs(60))
        .await
        .expect("JetStream answers");
    assert!(settled, "the refreshes settle");
    for family in families.iter() {
        family
            .store
            .caught_up(families[0].store.last().await.expect("info"))
            .await;
    }

    // What the lists say now: each live series' last list, exactly.
    let mut want = Vec::new();
    for series in families[0].series.snapshot() {
        if let Some(listing) = families[0].children.current(&series.id).expect("a listing") {
            for (child, data) in listing.children {
                want.push((child, data));
            }
        }
    }
    want.sort();
    assert!(!want.is_empty());
    for (i, family) in families.iter().enumerate() {
        let got: Vec<(RecordId, Data)> = family
            .episodes
            .snapshot()
            .into_iter()
            .map(|r| (r.id, r.data))
            .collect();
        assert_eq!(got, want, "process {i}");
    }
    eprintln!(
        "refreshes done again after another moved the mark: {}",
        redone.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(engines);
}

/// An item a handler puts on a queue itself, as an encode job is.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    id: uuid::Uuid,
    n: u32,
}

impl QueueItem for Job {
    fn event_id(&self) -> uuid::Uuid {
        self.id
    }

    fn restore(stored: serde_json::Value) -> Option<Self> {
        serde_json::from_value(stored).ok()
    }
}

/// Does a job, failing the first attempt at every third one.
struct Doer {
    process: usize,
    done: Arc<Mutex<Vec<(usize, u32)>>>,
    tried: Arc<Mutex<HashMap<u32, u32>>>,
}

impl Process<Job> for Doer {
    async fn process(&self, job: &Job) -> Result<(), Failure> {
        let attempt = {
            let mut tried = self.tried.lock().expect("tried");
            let n = tried.entry(job.n).or_default();
            *n += 1;
            *n
        };
        if job.n.is_multiple_of(3) && attempt == 1 {
            return Err(Failure::Transient("every third job fails once".into()));
        }
        self.done.lock().expect("done").push((self.process, job.n));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sent_by_any_process_are_done_once_by_one_of_them() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let done = Arc::new(Mutex::new(Vec::new()));
    let tried = Arc::new(Mutex::new(HashMap::new()));
    let names = Names::new("jobs").expect("prefix");
    let mut processes = Vec::new();
    let mut idle: Vec<Arc<dyn Idle>> = Vec::new();
    let stop = CancellationToken::new();
    for process in 0..2 {
        let connection = jetstream::connect(&server.url, WITHIN)
            .await
            .expect("connect");
        let mut engine = Engine::new(EngineConfig {
            event_retention: 1_000,
            max_dead_letters: 1_000,
            max_records: u64::MAX,
        });
        let queue = engine.add_queue::<Job>("job_queue", 16);
        let doer = Doer {
            process,
            done: done.clone(),
            tried: tried.clone(),
        };
        engine.add_handler("job_handler", &queue, doer, handler_config(2, 3));
        let shared = SharedQueue::open_items(
            &connection,
            &names,
            queue.clone(),
            &QueueOptions::default(),
            1,
        )
        .await
        .expect("open the work stream");
        tokio::spawn(shared.clone().feed(stop.clone()));
        idle.push(shared);
        let store = StateStore::open(&connection, names.clone(), &StateOptions::default())
            .await
            .expect("open the state stream");
        processes.push((engine, queue, store, connection));
    }
    // Both processes send the same 60 jobs (a step done twice), at once.
    let ids: Vec<uuid::Uuid> = (0..60).map(|_| uuid::Uuid::new_v4()).collect();
    let sends = processes.iter().flat_map(|(_, queue, _, _)| {
        ids.iter().enumerate().map(move |(n, id)| {
            let (queue, job) = (
                queue.clone(),
                Job {
                    id: *id,
                    n: n as u32,
                },
            );
            tokio::spawn(async move { queue.send_enlisted(0, job).await.expect("sent") })
        })
    });
    for send in futures_util::future::join_all(sends).await {
        send.expect("a send ran");
    }
    let settled = settle(&processes[0].2, &idle, Duration::from_secs(60))
        .await
        .expect("JetStream answers");
    assert!(settled);
    let done = done.lock().expect("done").clone();
    let mut jobs: Vec<u32> = done.iter().map(|d| d.1).collect();
    jobs.sort_unstable();
    assert_eq!(jobs, (0..60).collect::<Vec<u32>>(), "each job done once");
    for process in 0..2 {
        assert!(
            done.iter().any(|d| d.0 == process),
            "process {process} did jobs"
        );
    }
    let tried = tried.lock().expect("tried").clone();
    assert!(
        (0..60u32)
            .filter(|n| n.is_multiple_of(3))
            .all(|n| tried[&n] == 2)
    );
    // Acked items leave the work stream.
    let mut stream = processes[0]
        .3
        .jetstream
        .get_stream(names.work_stream())
        .await
        .expect("the work stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, 0);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_kept_once_seen_by_every_process_and_redriven_by_any() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let (seen, attempts) = (Seen::default(), Attempts::default());
    let workers = Worker::pair(&server.url, "letters", &seen, &attempts).await;
    for worker in &workers {
        let connection = jetstream::connect(&server.url, WITHIN)
            .await
            .expect("connect");
        let names = Names::new("letters").expect("prefix");
        let letters = DeadLetters::open(&connection, names, 1_000, 1)
            .await
            .expect("open the dead-letter stream");
        worker.shared.keep_dead_letters(letters);
    }
    let tables = [&workers[0].replica.table, &workers[1].replica.table];
    from_clients(&ops(3, 200, 60), tables).await;
    let queues: [Arc<dyn Idle>; 2] = [workers[0].shared.clone(), workers[1].shared.clone()];
    let store = &workers[0].replica.store;
    assert!(
        settle(store, &queues, Duration::from_secs(60))
            .await
            .expect("settle")
    );

    // The changes whose title is 2 always fail: one letter each, the same
    // through either process, none kept in a process of its own.
    let changes = workers[0]
        .replica
        .log
        .read(0, usize::MAX, |_| true)
        .expect("log");
    let refused: Vec<u64> = changes
        .events
        .iter()
        .filter(|c| c.data.as_ref().is_some_and(|d| d.as_str().contains(":2")))
        .map(|c| c.seq)
        .collect();
    assert!(!refused.is_empty());
    let letters = workers[0].shared.dead_letters().await.expect("letters");
    let other = workers[1].shared.dead_letters().await.expect("letters");
    assert_eq!(letters, other);
    let mut lettered: Vec<u64> = letters
        .iter()
        .map(|(_, l)| {
            l.item["change"]["s"]
                .as_u64()
                .expect("the change's sequence")
        })
        .collect();
    lettered.sort_unstable();
    assert_eq!(lettered, refused);
    assert!(letters.iter().all(|(_, l)| l.attempts == 4), "{letters:?}");
    for worker in &workers {
        assert_eq!(worker.queue.dead_letter_count(), 0);
    }

    // A redrive through one process puts them back for both; they fail
    // again (four more attempts each) and are dead-lettered again, once.
    let redriven = workers[1].shared.redrive().await.expect("redrive");
    assert_eq!(redriven, refused.len());
    assert!(
        settle(store, &queues, Duration::from_secs(60))
            .await
            .expect("settle")
    );
    let again = workers[0].shared.dead_letters().await.expect("letters");
    assert_eq!(again.len(), refused.len());
    assert!(
        again
            .iter()
            .all(|(n, _)| letters.iter().all(|(old, _)| n > old))
    );
    let tried = attempts.lock().expect("attempts").clone();
    assert!(refused.iter().all(|seq| tried[seq] == 8), "{tried:?}");
    // And a discard drops them for everyone.
    assert_eq!(
        workers[0].shared.discard().await.expect("discard"),
        refused.len()
    );
    assert!(
        workers[1]
            .shared
            .dead_letters()
            .await
            .expect("letters")
            .is_empty()
    );
}
