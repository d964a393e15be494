//! Table writes on JetStream beside a floor that does only the
//! JetStream work those writes need, in the same run, on the same
//! nats-server.
//!
//! ```text
//! cargo bench --bench jetstream            # nats-server on PATH
//! EVENTSYS_NATS_SERVER=/path/to/nats-server cargo bench --bench jetstream
//! EVENTSYS_BENCH_WRITES=20000 EVENTSYS_BENCH_TASKS=64 cargo bench --bench jetstream
//! ```
//!
//! Each round writes new records from many tasks at once:
//!
//! - **floor**: for each record, one publish of a message as large as a
//!   state message with `Nats-Expected-Last-Subject-Sequence: 0`, to a
//!   stream made like the state stream, awaiting its ack; that is all
//!   JetStream must do for a new record;
//! - **eventsys**: `Table::writer().apply` on a table shared through the
//!   state stream: the step worked out on the replica, the compare-and-set
//!   publish, and the wait until this process's replica has the new state.
//!
//! The ratio eventsys / floor is what to read: the machine is shared.

#[path = "../tests/support/nats.rs"]
mod nats;
#[path = "../tests/support/temp_dir.rs"]
mod temp_dir;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use eventsys::engine::log::{Cause, ChangeLog};
use eventsys::engine::record::{Data, RecordId, Timestamp, Version};
use eventsys::engine::settle::Activity;
use eventsys::engine::table::{Table, TableKind, Write};
use eventsys::jetstream::state::{Names, Replicas, StateOptions, StateStore};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write(round: usize, n: usize) -> Write {
    let data = Data::canonical(&serde_json::json!({
        "id": format!("m{n}"), "title": format!("Movie {n}"), "year": 1990 + n % 30,
    }))
    .expect("data");
    let at = Timestamp::parse("2024-01-01T00:00:00Z").expect("a time");
    Write {
        id: RecordId::parse(&format!("r{round}-m{n}")).expect("an id"),
        version: Version::write(at, data.clone()),
        data,
    }
}

/// Runs `work` for `0..writes` spread over `tasks` tasks; writes a second.
async fn rate<F, Fut>(writes: usize, tasks: usize, work: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let work = work.clone();
            tokio::spawn(async move {
                for n in (task..writes).step_by(tasks) {
                    work(n).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("a task ran");
    }
    writes as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let Some(server) = nats::NatsServer::start() else {
        return;
    };
    let writes = env("EVENTSYS_BENCH_WRITES", 5_000);
    let tasks = env("EVENTSYS_BENCH_TASKS", 64);
    let within = Duration::from_secs(5);
    let connection = eventsys::jetstream::connect(&server.url, within)
        .await
        .expect("connect");
    let names = Names::new("bench").expect("prefix");
    let store = StateStore::open(&connection, names.clone(), &StateOptions::default())
        .await
        .expect("open the state stream");
    let log = Arc::new(ChangeLog::new(writes * 8, Activity::default()));
    let table = Arc::new(Table::new("movies", TableKind::Raw, log.clone()));
    assert!(table.share(store.clone()).is_ok());
    let replicas = Replicas {
        tables: HashMap::from([(table.name().clone(), table.clone())]),
        ..Replicas::default()
    };
    let stop = CancellationToken::new();
    tokio::spawn(store.clone().follow(replicas, log, stop.clone()));
    // A state message as large as the table's, for the floor.
    let frame_size = {
        let before = store.last().await.expect("info");
        table
            .writer()
            .apply(write(0, 0), &Cause::request("bench"))
            .await
            .expect("a write");
        let mut stream = store.stream().clone();
        let info = stream.info().await.expect("info");
        (info.state.bytes as usize / (info.state.last_sequence - before) as usize).max(64)
    };
    // The floor's own stream, made as the state stream is, so that the
    // replica does not read the floor's messages.
    let floor_stream = async_nats::jetstream::stream::Config {
        name: "floor".into(),
        subjects: vec!["floor.>".into()],
        max_messages_per_subject: StateOptions::default().history,
        allow_direct: true,
        ..Default::default()
    };
    connection
        .stream(floor_stream)
        .await
        .expect("the floor's stream");
    println!(
        "{writes} new records per round from {tasks} tasks, nats-server at {}",
        server.url
    );
    println!(
        "{:>10} {:>12} {:>12} {:>8}",
        "round", "floor/s", "eventsys/s", "ratio"
    );
    for round in 1..=3 {
        let jetstream = connection.jetstream.clone();
        let payload = Arc::new(vec![b'x'; frame_size]);
        let floor = rate(writes, tasks, move |n| {
            let (jetstream, payload) = (jetstream.clone(), payload.clone());
            async move {
                let subject = format!("floor.r{round}.m{n}");
                let publish = PublishMessage::build()
                    .payload(payload.to_vec().into())
                    .expected_last_subject_sequence(0);
                jetstream
                    .send_publish(subject, publish)
                    .await
                    .expect("publish")
                    .await
                    .expect("acked");
            }
        })
        .await;
        let shared = table.clone();
        let eventsys = rate(writes, tasks, move |n| {
            let table = shared.clone();
            async move {
                table
                    .writer()
                    .apply(write(round, n), &Cause::request("bench"))
                    .await
                    .expect("a write");
            }
        })
        .await;
        println!(
            "{round:>10} {floor:>12.0} {eventsys:>12.0} {:>8.2}",
            eventsys / floor
        );
    }
    stop.cancel();
}
