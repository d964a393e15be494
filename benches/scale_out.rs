//! eventsys on JetStream (`--nats-url`), one and two instances, beside
//! eventsys in memory and beside a floor that does only the JetStream work
//! the same records need, in the same run, on the same nats-server.
//!
//! ```text
//! cargo bench --bench scale_out            # nats-server on PATH
//! EVENTSYS_NATS_SERVER=/path/to/nats-server cargo bench --bench scale_out
//! EVENTSYS_BENCH_RECORDS=20000 EVENTSYS_BENCH_ROUNDS=5 cargo bench --bench scale_out
//! ```
//!
//! Two loads of new movies (scenario 1's raw -> standard step), each timed
//! from the first request to `/settle` answering, so a figure is records
//! taken *and* processed per second:
//!
//! - **batches**: 1,000-record `POST /raw/movies` from 4 connections;
//! - **single**: one record per `POST`, from 16 connections.
//!
//! With two instances the connections alternate between them. The floor,
//! in this process with async-nats, does per record what JetStream must do
//! for it, on a stream made like the state stream: a compare-and-set
//! publish of the raw state (awaiting its ack), a durable pull consumer's
//! delivery of it and its ack, the compare-and-set publish of the standard
//! state, and one ordered read of both messages per instance (each instance
//! keeps a replica). Its raw publishes are as concurrent as the load's
//! requests (64 in flight for batches, 16 for single); its messages are as
//! large as the state stream's were. The ratio eventsys / floor is what to
//! read (target >= 0.5): the machine is shared, so only figures of the same
//! run compare.
//!
//! - `EVENTSYS_BENCH_RECORDS` (default 10000): records per load and round.
//! - `EVENTSYS_BENCH_ROUNDS` (default 3): rounds; the median ratio is the
//!   figure.
//! - `EVENTSYS_BENCH_LOAD` (unset): `batches` or `single` runs that one only.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/nats.rs"]
mod nats;
#[path = "../tests/support/server.rs"]
mod server;
#[path = "../tests/support/temp_dir.rs"]
mod temp_dir;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use futures_util::StreamExt;
use serde_json::{Value, json};

use server::Server;

fn movie(tag: &str, k: usize) -> Value {
    json!({"id": format!("{tag}-{k}"), "title": format!("Movie {k}"), "year": 1990 + k % 30,
        "updated_at": "2024-01-01T00:00:00Z"})
}

/// How a load is sent: records per request and connections at once.
#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    per_request: usize,
    connections: usize,
    /// The floor's raw publishes in flight at once.
    floor_in_flight: usize,
}

const LOADS: [Load; 2] = [
    Load {
        name: "batches",
        per_request: 1_000,
        connections: 4,
        floor_in_flight: 64,
    },
    Load {
        name: "single",
        per_request: 1,
        connections: 16,
        floor_in_flight: 16,
    },
];

/// Sends `records` new movies tagged `tag` to `addrs` as `load` says,
/// then settles; records a second.
async fn eventsys(
    client: &reqwest::Client,
    addrs: &[SocketAddr],
    load: Load,
    records: usize,
    tag: &str,
) -> f64 {
    let requests = records.div_ceil(load.per_request);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let senders: Vec<_> = (0..load.connections)
        .map(|c| {
            let (client, next, tag) = (client.clone(), next.clone(), tag.to_owned());
            let url = format!("http://{}/raw/movies", addrs[c % addrs.len()]);
            tokio::spawn(async move {
                loop {
                    let r = next.fetch_add(1, Ordering::Relaxed);
                    if r >= requests {
                        return;
                    }
                    let first = r * load.per_request;
                    let last = (first + load.per_request).min(records);
                    let body = if load.per_request == 1 {
                        movie(&tag, first)
                    } else {
                        Value::Array((first..last).map(|k| movie(&tag, k)).collect())
                    };
                    let body = body.to_string();
                    loop {
                        let reply = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                            .expect("a reply");
                        match reply.status().as_u16() {
                            200 => break,
                            // Full for now: asked again shortly.
                            429 | 503 => tokio::time::sleep(Duration::from_millis(5)).await,
                            status => {
                                panic!("{status}: {}", reply.text().await.unwrap_or_default())
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.expect("a sender");
    }
    // Settle waits for every instance's work, on JetStream.
    let settled = client
        .get(format!("http://{}/settle?timeout_ms=300000", addrs[0]))
        .send()
        .await
        .expect("settle");
    assert_eq!(settled.status().as_u16(), 200, "did not settle");
    records as f64 / started.elapsed().as_secs_f64()
}

/// The JetStream work of `records` movies with `instances` replicas on a
/// stream of its own (`floor<run>`); records a second.
async fn floor(
    jetstream: &async_nats::jetstream::Context,
    run: usize,
    records: usize,
    in_flight: usize,
    instances: usize,
    message_size: usize,
) -> f64 {
    let prefix = format!("floor{run}");
    let stream = jetstream
        .get_or_create_stream(stream::Config {
            name: prefix.clone(),
            subjects: vec![format!("{prefix}.>")],
            max_messages_per_subject: 64,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .expect("the floor's stream");
    let work = stream
        .create_consumer(pull::Config {
            durable_name: Some("work".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 4_096,
            filter_subject: format!("{prefix}.raw.>"),
            ..Default::default()
        })
        .await
        .expect("the floor's consumer");
    let payload = Arc::new(vec![b'x'; message_size]);
    let owned = jetstream.clone();
    let publish = move |subject: String| {
        let (jetstream, payload) = (owned.clone(), payload.clone());
        async move {
            let message = PublishMessage::build()
                .payload(payload.to_vec().into())
                .expected_last_subject_sequence(0);
            jetstream
                .send_publish(subject, message)
                .await
                .expect("publish")
                .await
                .expect("acked");
        }
    };
    let started = Instant::now();
    let readers: Vec<_> = (0..instances)
        .map(|_| {
            let stream = stream.clone();
            tokio::spawn(async move {
                let reader = stream
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
                    .expect("a reader");
                let mut messages = reader.messages().await.expect("read");
                for _ in 0..2 * records {
                    messages.next().await.expect("more").expect("a message");
                }
            })
        })
        .collect();
    let worker = {
        let publish = publish.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            let messages = work.messages().await.expect("pull");
            messages
                .take(records)
                .for_each_concurrent(64, |message| {
                    let publish = publish.clone();
                    let prefix = prefix.clone();
                    async move {
                        let message = message.expect("a message");
                        let id = message.subject.rsplit('.').next().unwrap_or("x").to_owned();
                        publish(format!("{prefix}.std.{id}")).await;
                        message.ack().await.expect("ack");
                    }
                })
                .await;
        })
    };
    futures_util::stream::iter(0..records)
        .for_each_concurrent(in_flight, |k| publish(format!("{prefix}.raw.m{k}")))
        .await;
    worker.await.expect("the worker");
    for reader in readers {
        reader.await.expect("a reader");
    }
    let rate = records as f64 / started.elapsed().as_secs_f64();
    jetstream.delete_stream(&prefix).await.expect("dropped");
    rate
}

/// The mean size of the messages on `prefix`'s state stream.
async fn state_message_size(jetstream: &async_nats::jetstream::Context, prefix: &str) -> usize {
    let mut stream = jetstream
        .get_stream(format!("{prefix}_state"))
        .await
        .expect("the state stream");
    let info = stream.info().await.expect("info");
    (info.state.bytes / info.state.messages.max(1)) as usize
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let Some(nats) = nats::NatsServer::start() else {
        return;
    };
    let records = common::env_usize("EVENTSYS_BENCH_RECORDS", 10_000);
    let rounds = common::env_usize("EVENTSYS_BENCH_ROUNDS", 3).max(1);
    let memory = Server::start(&[]);
    let one = Server::start(&["--nats-url", &nats.url, "--nats-prefix", "one"]);
    let two: Vec<Server> = (0..2)
        .map(|_| Server::start(&["--nats-url", &nats.url, "--nats-prefix", "two"]))
        .collect();
    let runtime = common::runtime(1, "client");
    let client = reqwest::Client::new();
    let connection = runtime
        .block_on(eventsys::jetstream::connect(
            &nats.url,
            Duration::from_secs(5),
        ))
        .expect("connect");
    let jetstream = connection.jetstream;
    println!(
        "{records} new movies per load and round, nats-server at {}",
        nats.url
    );
    println!(
        "{:>8} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>7} {:>7}",
        "load",
        "round",
        "memory/s",
        "floor1/s",
        "nats1/s",
        "floor2/s",
        "nats2/s",
        "ratio1",
        "ratio2"
    );
    let mut run = 0;
    let only = std::env::var("EVENTSYS_BENCH_LOAD").ok();
    for load in LOADS {
        if only.as_ref().is_some_and(|only| only != load.name) {
            continue;
        }
        let (mut ratio1, mut ratio2) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let tag = format!("{}{round}", load.name);
            let rates = runtime.block_on(async {
                let memory = eventsys(&client, &[memory.addr], load, records, &tag).await;
                let nats1 = eventsys(&client, &[one.addr], load, records, &tag).await;
                let addrs: Vec<SocketAddr> = two.iter().map(|s| s.addr).collect();
                let nats2 = eventsys(&client, &addrs, load, records, &tag).await;
                let size = state_message_size(&jetstream, "one").await;
                run += 1;
                let floor1 = floor(&jetstream, run, records, load.floor_in_flight, 1, size).await;
                run += 1;
                let floor2 = floor(&jetstream, run, records, load.floor_in_flight, 2, size).await;
                (memory, floor1, nats1, floor2, nats2)
            });
            let (memory, floor1, nats1, floor2, nats2) = rates;
            ratio1.push(nats1 / floor1);
            ratio2.push(nats2 / floor2);
            println!(
                "{:>8} {round:>6} {memory:>11.0} {floor1:>11.0} {nats1:>11.0} {floor2:>11.0} {nats2:>11.0} {:>7.2} {:>7.2}",
                load.name,
                nats1 / floor1,
                nats2 / floor2
            );
        }
        let (one, two) = (median(ratio1), median(ratio2));
        let verdict = |r: f64| if r >= 0.5 { "meets" } else { "misses" };
        println!(
            "{}: median eventsys/floor {one:.2} with one instance ({}), {two:.2} with two ({}); target >= 0.5",
            load.name,
            verdict(one),
            verdict(two)
        );
    }
}
