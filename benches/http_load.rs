//! HTTP load: eventsys against a floor, with the same client, in one run.
//!
//! The servers run in this process on 127.0.0.1:0, one at a time, on one
//! tokio runtime of 2 workers (as `eventsys` has on this 2-core machine).
//! The floor is a bare axum server whose `POST /raw/{kind}` only parses the
//! body as a `serde_json::Value` and answers 200; the targets are ratios to
//! it. A second floor, `plain`, does scenario 1's work with the least
//! machinery behind the same axum stack (eventsys's record parsing, then
//! `common::plain`: plain maps, a bounded mpsc, eventsys's `standardise`),
//! to show how much of eventsys's cost is the work itself. The client is hyper's HTTP/1.1
//! connection API on its own runtime (1 worker by default), with N
//! keep-alive connections; it only ever targets those two loopback
//! addresses, and every load below stops by itself at a count or a time.
//!
//! 1. Single-record `POST /raw/movies` (a new movie each), closed loop,
//!    for a fixed time: req/s and latency, eventsys vs floor.
//! 2. 1,000-record batches (movies and actors in turn) until every batch is
//!    accepted and, for eventsys, the pipeline has settled: records/s vs
//!    the floor's batch parse rate. A 503 is retried after 5 ms.
//! 3. Raw -> standard visibility at a fixed offered rate (10k records/s):
//!    POSTs of 1 record, then of 10, sent on a schedule (open loop), then the change
//!    log is read back: each standard change names the raw change that
//!    caused it (`causationid`), and both carry the time they were recorded,
//!    which is when they became visible (a table write and its log append
//!    are one step). So `standard.time - raw.time` is raw write -> visible
//!    in the standard table, exactly, with no polling. `send -> visible`
//!    (client send time to the standard change's time, same wall clock)
//!    adds the HTTP path.
//!
//! 4. Recovery: the `eventsys` binary on a data directory is sent
//!    `EVENTSYS_BENCH_RECOVERY_RECORDS` records in 1,000-record batches,
//!    settles, and is killed with SIGKILL; the restart's recovery time (from
//!    its log) is reported, from the log alone and, after a clean stop,
//!    from its snapshot.
//!
//! Test 1 also runs `tokens`: eventsys in memory with a tokens file, every
//! request carrying an operator's bearer token (the other servers ignore
//! it), its ratio taken to eventsys in memory without one.
//!
//! Tests 1 and 2 also run `durable`: eventsys on a data directory with
//! `--sync always`, its ratio taken to eventsys in memory in the same run
//! (test 2 in pairs, in memory and durable back to back, as a run this
//! short moves with the machine's other load).
//!
//! Run: `cargo bench --bench http_load`
//!
//! - `EVENTSYS_BENCH_SECONDS` (default 5): duration of test 1, per server.
//! - `EVENTSYS_BENCH_CONNECTIONS` (default 16 and 64): connections for
//!   test 1 (one number: only that).
//! - `EVENTSYS_BENCH_RECORDS` (default 200000): records in test 2.
//! - `EVENTSYS_BENCH_BATCH_CONNECTIONS` (default 4): connections for test 2.
//! - `EVENTSYS_BENCH_DURABLE_ROUNDS` (default 5): pairs of in-memory and
//!   durable runs of test 2 (the order alternating); the median pair's
//!   ratio is the figure.
//! - `EVENTSYS_BENCH_RATE` (default 10000): offered records/s in test 3.
//! - `EVENTSYS_BENCH_VIS_SECONDS` (default 5): duration of test 3.
//! - `EVENTSYS_BENCH_CLIENT_THREADS` (default 1): client runtime workers.
//! - `EVENTSYS_BENCH_LOG` (unset): when set, log as the binary does by
//!   default (`info`, fmt) into a sink, to include logging's cost.
//! - `EVENTSYS_BENCH_RECOVERY_RECORDS` (default 1000000): records in test 4.
//! - `EVENTSYS_BENCH_ONLY`: comma-separated tests (`single`, `batches`,
//!   `visibility`, `recovery`) and/or servers (`floor`, `plain`,
//!   `eventsys`, `durable`, `tokens`) to run; all when unset (a ratio needs the
//!   servers it compares).

mod common;
#[path = "../tests/support/server.rs"]
mod server;
#[path = "../tests/support/temp_dir.rs"]
mod temp_dir;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use eventsys::engine::record::{RecordId, Timestamp};
use eventsys::media::records::{Kind, parse_records};
use eventsys::{App, Config};

use common::{Usage, env_usize, load_average, plain, runtime};
use temp_dir::TempDir;

/// Upper bound on requests in one closed-loop run, whatever the duration.
const MAX_REQUESTS: u64 = 5_000_000;

// ---------------------------------------------------------------- servers

struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    /// The eventsys app (none for the floors).
    app: Option<App>,
    /// The plain pipeline (for the second floor only).
    plain: Option<Arc<plain::Pipeline>>,
}

impl Server {
    fn stop(self, rt: &Runtime) {
        self.stop.cancel();
        let _ = rt.block_on(self.done);
    }
}

/// The floor: parse the JSON body, answer 200.
async fn floor_ingest(body: Bytes) -> StatusCode {
    match serde_json::from_slice::<Value>(&body) {
        Ok(value) => {
            std::hint::black_box(value);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// Serves a floor's `router` on a fresh loopback port until stopped.
fn serve_floor(rt: &Runtime, router: Router, plain: Option<Arc<plain::Pipeline>>) -> Server {
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let router = router.layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024));
    let done = rt.spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .expect("floor serves");
        }
    });
    Server {
        addr,
        stop,
        done,
        app: None,
        plain,
    }
}

fn start_floor(rt: &Runtime) -> Server {
    serve_floor(
        rt,
        Router::new().route("/raw/{kind}", post(floor_ingest)),
        None,
    )
}

/// One record's outcome in the plain floor's answer.
#[derive(Serialize)]
struct PlainOutcome {
    id: RecordId,
    outcome: &'static str,
}

#[derive(Serialize)]
struct PlainResults {
    results: Vec<PlainOutcome>,
}

/// The second floor's ingest: eventsys's own record parsing, then the
/// plain pipeline of `common::plain`; answers each record's outcome.
async fn plain_ingest(
    State(pipeline): State<Arc<plain::Pipeline>>,
    Path(kind): Path<String>,
    body: Bytes,
) -> Result<Json<PlainResults>, StatusCode> {
    let kind = Kind::parse(&kind).ok_or(StatusCode::NOT_FOUND)?;
    let values = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(values)) => values,
        Ok(value @ Value::Object(_)) => vec![value],
        _ => return Err(StatusCode::BAD_REQUEST),
    };
    let writes =
        parse_records(values, Timestamp::now(), kind).map_err(|_| StatusCode::BAD_REQUEST)?;
    let ids: Vec<RecordId> = writes.iter().map(|w| w.id.clone()).collect();
    let changed = pipeline.ingest(kind, writes).await;
    Ok(Json(PlainResults {
        results: ids
            .into_iter()
            .zip(changed)
            .map(|(id, changed)| PlainOutcome {
                id,
                outcome: if changed { "inserted" } else { "unchanged" },
            })
            .collect(),
    }))
}

/// The second floor: scenario 1's work with the least machinery
/// (`common::plain`) behind the same axum stack.
fn start_plain(rt: &Runtime) -> Server {
    let pipeline = {
        let _guard = rt.enter();
        plain::Pipeline::start(2, 1024)
    };
    let router = Router::new()
        .route("/raw/{kind}", post(plain_ingest))
        .with_state(pipeline.clone());
    serve_floor(rt, router, Some(pipeline))
}

/// The token every request of the client carries: ignored by servers
/// without tokens, an operator's for `tokens` (see [`start_with_tokens`]).
const BENCH_TOKEN: &str = "bench-operator-token-0123456789";

/// eventsys in memory, or on `data_dir` (`--sync always`).
fn start_eventsys(rt: &Runtime, data_dir: Option<&TempDir>) -> Server {
    start_configured(rt, data_dir, None)
}

/// eventsys in memory with a tokens file: every request is authorized.
fn start_with_tokens(rt: &Runtime, dir: &TempDir) -> Server {
    std::fs::create_dir_all(&dir.0).expect("a directory for the tokens file");
    let file = dir.0.join("tokens");
    std::fs::write(&file, format!("bench operator {BENCH_TOKEN}\n")).expect("tokens file");
    start_configured(rt, None, Some(file))
}

fn start_configured(
    rt: &Runtime,
    data_dir: Option<&TempDir>,
    auth_tokens_file: Option<std::path::PathBuf>,
) -> Server {
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = Config {
        addr,
        raw_workers: Some(2),
        data_dir: data_dir.map(|d| d.0.clone()),
        auth_tokens_file,
        ..Config::default()
    };
    let app = {
        let _guard = rt.enter();
        App::start(config)
    };
    let stop = CancellationToken::new();
    let done = rt.spawn({
        let stop = stop.clone();
        let app = app.clone();
        async move {
            eventsys::serve(listener, app, stop.cancelled_owned())
                .await
                .expect("eventsys serves");
        }
    });
    Server {
        addr,
        stop,
        done,
        app: Some(app),
        plain: None,
    }
}

// ----------------------------------------------------------------- client

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// POSTs `body` to `path` and reads the whole response.
async fn post_json(sender: &mut Sender, path: &str, body: Bytes) -> (StatusCode, Duration) {
    sender.ready().await.expect("connection ready");
    let request = Request::post(path)
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, bearer())
        .body(Full::new(body))
        .expect("request");
    let started = Instant::now();
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let _ = response.into_body().collect().await.expect("body");
    (status, started.elapsed())
}

fn bearer() -> String {
    format!("Bearer {BENCH_TOKEN}")
}

fn movie(id: &str, n: u64) -> Value {
    json!({
        "id": id,
        "title": format!("The Quiet Harbour {n}"),
        "year": 1950 + n % 70,
        "actor_ids": [format!("a-{:08}", n % 100_000), format!("a-{:08}", (n + 7) % 100_000)],
        "updated_at": "2024-03-01T12:00:00Z",
    })
}

fn actor(id: &str, n: u64) -> Value {
    json!({
        "id": id,
        "name": format!("Ada Actor {n}"),
        "birth_date": format!("19{:02}-{:02}-{:02}", 40 + n % 60, 1 + n % 12, 1 + n % 28),
        "updated_at": "2024-03-01T12:00:00Z",
    })
}

/// Latencies and counts of one load.
#[derive(Default)]
struct Results {
    ok: u64,
    refused: u64,
    errors: u64,
    records: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// Cores this process kept busy, and cores it waited for, meanwhile.
    cores: (f64, f64),
}

impl Results {
    fn merge(&mut self, other: Results) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.errors += other.errors;
        self.records += other.records;
        self.latencies.extend(other.latencies);
    }

    fn percentile(&mut self, p: f64) -> Duration {
        percentile(&mut self.latencies, p)
    }
}

fn percentile(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let index = ((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1;
    values[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ------------------------------------------------------------------ loads

/// Test 1: closed loop of single-record POSTs for `duration`.
fn single_records(
    client: &Runtime,
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    tag: &str,
) -> Results {
    client.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        for _ in 0..connections {
            senders.push(connect(addr).await);
        }
        // Warm-up: a few requests per connection, not counted.
        for sender in &mut senders {
            for _ in 0..20 {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let body = movie(&format!("{tag}-warm-{n}"), n).to_string();
                post_json(sender, "/raw/movies", body.into()).await;
            }
        }
        let usage = Usage::start();
        let started = Instant::now();
        let deadline = started + duration;
        let mut tasks = Vec::new();
        for mut sender in senders {
            let next = next.clone();
            let tag = tag.to_string();
            tasks.push(tokio::spawn(async move {
                let mut results = Results::default();
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= MAX_REQUESTS {
                        break;
                    }
                    let body = movie(&format!("{tag}-{n}"), n).to_string();
                    let (status, latency) =
                        post_json(&mut sender, "/raw/movies", body.into()).await;
                    match status {
                        StatusCode::OK => {
                            results.ok += 1;
                            results.records += 1;
                            results.latencies.push(latency);
                        }
                        StatusCode::SERVICE_UNAVAILABLE => results.refused += 1,
                        _ => results.errors += 1,
                    }
                }
                results
            }));
        }
        gather(tasks, started, &usage).await
    })
}

/// The client tasks' results merged, timed from `started`.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<Results>>,
    started: Instant,
    usage: &Usage,
) -> Results {
    let mut all = Results::default();
    for task in tasks {
        all.merge(task.await.expect("client task"));
    }
    all.elapsed = started.elapsed();
    all.cores = usage.cores();
    all
}

/// The bodies of test 2: `records` records in batches of 1,000, movies and
/// actors in turn, with ids unique to `tag`.
fn batch_bodies(records: usize, tag: &str) -> Vec<(&'static str, Bytes, u64)> {
    (0..records.div_ceil(1000))
        .map(|b| {
            let count = 1000.min(records - b * 1000) as u64;
            let first = (b * 1000) as u64;
            let (path, values): (_, Vec<Value>) = if b % 2 == 0 {
                (
                    "/raw/movies",
                    (first..first + count)
                        .map(|n| movie(&format!("{tag}-m{n}"), n))
                        .collect(),
                )
            } else {
                (
                    "/raw/actors",
                    (first..first + count)
                        .map(|n| actor(&format!("{tag}-a{n}"), n))
                        .collect(),
                )
            };
            (path, Bytes::from(Value::Array(values).to_string()), count)
        })
        .collect()
}

/// Test 2: every batch posted once accepted (503s retried), over
/// `connections` connections.
fn batches(
    client: &Runtime,
    addr: SocketAddr,
    connections: usize,
    bodies: Arc<Vec<(&'static str, Bytes, u64)>>,
) -> Results {
    client.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        for _ in 0..connections {
            senders.push(connect(addr).await);
        }
        let usage = Usage::start();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for mut sender in senders {
            let next = next.clone();
            let bodies = bodies.clone();
            tasks.push(tokio::spawn(async move {
                let mut results = Results::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((path, body, count)) = bodies.get(i) else {
                        break;
                    };
                    // Bounded: a batch refused for 60 s in a row is an error.
                    let give_up = Instant::now() + Duration::from_secs(60);
                    loop {
                        let (status, latency) = post_json(&mut sender, path, body.clone()).await;
                        match status {
                            StatusCode::OK => {
                                results.ok += 1;
                                results.records += count;
                                results.latencies.push(latency);
                                break;
                            }
                            StatusCode::SERVICE_UNAVAILABLE if Instant::now() < give_up => {
                                results.refused += 1;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            _ => {
                                results.errors += 1;
                                break;
                            }
                        }
                    }
                }
                results
            }));
        }
        gather(tasks, started, &usage).await
    })
}

/// Test 3's figures.
struct Visibility {
    offered: f64,
    achieved: f64,
    sent: u64,
    matched: usize,
    http: Results,
    raw_to_visible: Vec<Duration>,
    send_to_visible: Vec<Duration>,
}

/// Test 3: single-record POSTs on a fixed schedule, then the change log.
fn visibility(
    client: &Runtime,
    server: &Server,
    rate: f64,
    duration: Duration,
    per_post: u64,
) -> Visibility {
    let app = server.app.as_ref().expect("eventsys");
    let pipeline = app.pipeline().clone();
    let log = pipeline.engine.log.clone();
    let first_seq = log.latest();
    let posts = (rate * duration.as_secs_f64()) as u64 / per_post;
    let total = posts * per_post;
    // Enough connections that a slow response never holds up the schedule.
    let connections = 32;
    let sent_at: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let tag = format!("vis{per_post}-");
    let http = client.block_on(async {
        let mut senders = Vec::new();
        for _ in 0..connections {
            senders.push(connect(server.addr).await);
        }
        let usage = Usage::start();
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for (c, mut sender) in senders.into_iter().enumerate() {
            let sent_at = sent_at.clone();
            let tag = tag.clone();
            tasks.push(tokio::spawn(async move {
                let mut results = Results::default();
                let mut post = c as u64;
                while post < posts {
                    // POST k is due when its first record is (k * per_post
                    // / rate); a late connection catches up at once (open
                    // loop). Tokio's timer ticks in milliseconds, so
                    // records leave in bursts of rate/1000.
                    let first = post * per_post;
                    tokio::time::sleep_until(
                        started + Duration::from_secs_f64(first as f64 / rate),
                    )
                    .await;
                    let ids: Vec<String> = (first..first + per_post)
                        .map(|k| format!("{tag}{k}"))
                        .collect();
                    let body = if per_post == 1 {
                        movie(&ids[0], first).to_string()
                    } else {
                        Value::Array(
                            ids.iter()
                                .zip(first..)
                                .map(|(id, k)| movie(id, k))
                                .collect(),
                        )
                        .to_string()
                    };
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .expect("after 1970")
                        .as_nanos() as i64;
                    sent_at
                        .lock()
                        .expect("not poisoned")
                        .extend(ids.into_iter().map(|id| (id, now)));
                    let (status, latency) =
                        post_json(&mut sender, "/raw/movies", body.into()).await;
                    if status == StatusCode::OK {
                        results.ok += 1;
                        results.records += per_post;
                        results.latencies.push(latency);
                    } else {
                        results.errors += 1;
                    }
                    post += connections as u64;
                }
                results
            }));
        }
        gather(tasks, started.into_std(), &usage).await
    });
    assert!(
        client.block_on(pipeline.engine.settle(Duration::from_secs(60))),
        "did not settle"
    );
    // Read the log back: raw changes by id, standard changes by cause.
    let mut raw_time = HashMap::new();
    let mut standard = Vec::new();
    let mut after = first_seq;
    loop {
        let page = log.read(after, 1000, |_| true).expect("retained");
        if page.events.is_empty() && page.next == after {
            break;
        }
        for change in &page.events {
            if !change.key.as_str().starts_with(&tag) {
                continue;
            }
            match &*change.table {
                "raw_movies" => {
                    raw_time.insert(change.id, change.time.nanos());
                }
                "movies" => standard.push((
                    change.cause.causation,
                    change.key.to_string(),
                    change.time.nanos(),
                )),
                _ => {}
            }
        }
        after = page.next;
    }
    let sent_at = sent_at.lock().expect("not poisoned");
    let mut raw_to_visible = Vec::new();
    let mut send_to_visible = Vec::new();
    for (causation, key, visible) in &standard {
        if let Some(raw) = causation.and_then(|c| raw_time.get(&c)) {
            raw_to_visible.push(Duration::from_nanos((visible - raw).max(0) as u64));
        }
        if let Some(sent) = sent_at.get(key) {
            send_to_visible.push(Duration::from_nanos((visible - sent).max(0) as u64));
        }
    }
    Visibility {
        offered: rate,
        achieved: http.records as f64 / http.elapsed.as_secs_f64(),
        sent: total,
        matched: raw_to_visible.len(),
        http,
        raw_to_visible,
        send_to_visible,
    }
}

// ----------------------------------------------------------------- report

fn row(test: &str, server: &str, r: &mut Results, note: &str) {
    let secs = r.elapsed.as_secs_f64();
    println!(
        "{:<32} {:<8} {:>8.0} {:>10.0} {:>7.3} {:>7.3} {:>5} {:>4} {:>5.2} {:>5.2}  {}",
        test,
        server,
        r.ok as f64 / secs,
        r.records as f64 / secs,
        ms(r.percentile(0.50)),
        ms(r.percentile(0.99)),
        r.refused,
        r.errors,
        r.cores.0,
        r.cores.1,
        note,
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "UNMET" }
}

/// Whether `EVENTSYS_BENCH_ONLY` (comma-separated test or server names;
/// all when unset) selects `name`.
fn selected(name: &str) -> bool {
    std::env::var("EVENTSYS_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|o| o.trim() == name))
}

/// Whether test `name` runs: when `EVENTSYS_BENCH_ONLY` names it, or
/// names no test at all.
fn test_on(name: &str) -> bool {
    const TESTS: [&str; 4] = ["single", "batches", "visibility", "recovery"];
    selected(name) || !TESTS.iter().any(|t| selected(t))
}

fn main() {
    let seconds = env_usize("EVENTSYS_BENCH_SECONDS", 5) as u64;
    let connection_counts = match env_usize("EVENTSYS_BENCH_CONNECTIONS", 0) {
        0 => vec![16, 64],
        n => vec![n],
    };
    let recovery_records = env_usize("EVENTSYS_BENCH_RECOVERY_RECORDS", 1_000_000).max(1000);
    let records = env_usize("EVENTSYS_BENCH_RECORDS", 200_000).max(1000);
    let batch_connections = env_usize("EVENTSYS_BENCH_BATCH_CONNECTIONS", 4).max(1);
    let durable_rounds = env_usize("EVENTSYS_BENCH_DURABLE_ROUNDS", 5).max(1);
    let rate = env_usize("EVENTSYS_BENCH_RATE", 10_000).max(1) as f64;
    let vis_seconds = env_usize("EVENTSYS_BENCH_VIS_SECONDS", 5) as u64;
    let client_threads = env_usize("EVENTSYS_BENCH_CLIENT_THREADS", 1).max(1);
    let servers_named = ["floor", "plain", "eventsys", "durable", "tokens"]
        .iter()
        .any(|s| selected(s))
        && std::env::var_os("EVENTSYS_BENCH_ONLY").is_some();
    let floor_on = !servers_named || selected("floor");
    let plain_on = !servers_named || selected("plain");
    let eventsys_on = !servers_named || selected("eventsys");
    let durable_on = !servers_named || selected("durable");
    let tokens_on = !servers_named || selected("tokens");

    if std::env::var_os("EVENTSYS_BENCH_LOG").is_some() {
        // As the `eventsys` binary logs by default (info), into a sink.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .init();
    }
    let servers = runtime(2, "server");
    let client = runtime(client_threads, "client");
    println!(
        "servers: one runtime of 2 workers; client: hyper http1 on {client_threads} worker(s), same process; loopback only; load average at start: {}",
        load_average()
    );
    println!(
        "{:<32} {:<8} {:>8} {:>10} {:>7} {:>7} {:>5} {:>4} {:>5} {:>5}",
        "test", "server", "req/s", "records/s", "p50 ms", "p99 ms", "503s", "err", "cores", "wait"
    );

    // 1. Single-record POSTs.
    for connections in connection_counts
        .iter()
        .copied()
        .filter(|_| test_on("single"))
    {
        let duration = Duration::from_secs(seconds);
        let test = format!("1. single POST, {connections} conns");
        let mut floor_rate = f64::NAN;
        if floor_on {
            let floor = start_floor(&servers);
            let mut r = single_records(&client, floor.addr, connections, duration, "f");
            floor.stop(&servers);
            floor_rate = r.ok as f64 / r.elapsed.as_secs_f64();
            row(&test, "floor", &mut r, "");
        }
        let mut plain_rate = f64::NAN;
        if plain_on {
            let server = start_plain(&servers);
            let mut r = single_records(&client, server.addr, connections, duration, "p");
            let pipeline = server.plain.clone().expect("plain");
            servers.block_on(pipeline.settle());
            server.stop(&servers);
            plain_rate = r.ok as f64 / r.elapsed.as_secs_f64();
            let ratio = plain_rate / floor_rate;
            row(&test, "plain", &mut r, &format!("ratio {ratio:.2}"));
        }
        let mut memory_rate = f64::NAN;
        if eventsys_on {
            let eventsys = start_eventsys(&servers, None);
            let mut r = single_records(&client, eventsys.addr, connections, duration, "e");
            let load_ended = Instant::now();
            let app = eventsys.app.clone().expect("eventsys");
            assert!(servers.block_on(app.pipeline().engine.settle(Duration::from_secs(120))));
            let drain = load_ended.elapsed();
            eventsys.stop(&servers);
            let rate = r.ok as f64 / r.elapsed.as_secs_f64();
            memory_rate = rate;
            let ratio = rate / floor_rate;
            let settled_rate = r.ok as f64 / (r.elapsed + drain).as_secs_f64();
            row(
                &test,
                "eventsys",
                &mut r,
                &format!(
                    "ratio {ratio:.2} (target >= 0.8: {}), {:.2} of plain; settled {:.0} ms after the load ({settled_rate:.0} records/s settled)",
                    verdict(ratio >= 0.8),
                    rate / plain_rate,
                    ms(drain),
                ),
            );
        }
        if tokens_on {
            let dir = TempDir::new();
            let secured = start_with_tokens(&servers, &dir);
            let mut r = single_records(&client, secured.addr, connections, duration, "t");
            let app = secured.app.clone().expect("eventsys");
            assert!(servers.block_on(app.pipeline().engine.settle(Duration::from_secs(120))));
            secured.stop(&servers);
            let ratio = r.ok as f64 / r.elapsed.as_secs_f64() / memory_rate;
            row(
                &test,
                "tokens",
                &mut r,
                &format!(
                    "--auth-tokens-file; {ratio:.2} of in memory without (target >= 0.95: {})",
                    verdict(ratio >= 0.95)
                ),
            );
        }
        if durable_on {
            let dir = TempDir::new();
            let durable = start_eventsys(&servers, Some(&dir));
            let mut r = single_records(&client, durable.addr, connections, duration, "d");
            let app = durable.app.clone().expect("eventsys");
            assert!(servers.block_on(app.pipeline().engine.settle(Duration::from_secs(120))));
            durable.stop(&servers);
            let ratio = r.ok as f64 / r.elapsed.as_secs_f64() / memory_rate;
            let target = if connections >= 64 {
                " (target >= 0.5: "
            } else {
                " ("
            };
            let verdict = if connections >= 64 {
                verdict(ratio >= 0.5)
            } else {
                "no target"
            };
            row(
                &test,
                "durable",
                &mut r,
                &format!("--sync always; {ratio:.2} of in memory{target}{verdict})"),
            );
        }
    }

    // 2. 1,000-record batches through scenario 1, until settled.
    if test_on("batches") {
        let test = format!("2. 1000-record batches, {batch_connections} conns");
        let mut floor_rate = f64::NAN;
        if floor_on {
            let floor = start_floor(&servers);
            let bodies = Arc::new(batch_bodies(records, "f"));
            let mut r = batches(&client, floor.addr, batch_connections, bodies);
            floor.stop(&servers);
            floor_rate = r.records as f64 / r.elapsed.as_secs_f64();
            row(&test, "floor", &mut r, "(parse only)");
        }
        let mut plain_rate = f64::NAN;
        if plain_on {
            let server = start_plain(&servers);
            let bodies = Arc::new(batch_bodies(records, "p"));
            let usage = Usage::start();
            let started = Instant::now();
            let mut r = batches(&client, server.addr, batch_connections, bodies);
            let pipeline = server.plain.clone().expect("plain");
            servers.block_on(pipeline.settle());
            r.elapsed = started.elapsed();
            r.cores = usage.cores();
            let (_, standard_rows) = pipeline.live();
            server.stop(&servers);
            plain_rate = r.records as f64 / r.elapsed.as_secs_f64();
            let ratio = plain_rate / floor_rate;
            row(
                &test,
                "plain",
                &mut r,
                &format!("until settled ({standard_rows} standard records); ratio {ratio:.2}"),
            );
        }
        // eventsys in memory, or on a data directory: the batches posted,
        // then settled; the results, standard records, and time to accept.
        let run = |dir: Option<&TempDir>, tag: &str| {
            let eventsys = start_eventsys(&servers, dir);
            let bodies = Arc::new(batch_bodies(records, tag));
            let usage = Usage::start();
            let started = Instant::now();
            let mut r = batches(&client, eventsys.addr, batch_connections, bodies);
            let accepted = started.elapsed();
            let app = eventsys.app.clone().expect("eventsys");
            assert!(servers.block_on(app.pipeline().engine.settle(Duration::from_secs(300))));
            r.elapsed = started.elapsed();
            r.cores = usage.cores();
            let standard_rows: u64 = ["movies", "actors"]
                .iter()
                .filter_map(|t| app.pipeline().engine.table(t).map(|t| t.len()))
                .sum();
            eventsys.stop(&servers);
            (r, standard_rows, accepted)
        };
        let rate = |r: &Results| r.records as f64 / r.elapsed.as_secs_f64();
        if eventsys_on {
            let (mut r, standard_rows, accepted) = run(None, "e");
            let ratio = rate(&r) / floor_rate;
            let accepted_rate = r.records as f64 / accepted.as_secs_f64();
            let of_plain = rate(&r) / plain_rate;
            row(
                &test,
                "eventsys",
                &mut r,
                &format!(
                    "until settled ({standard_rows} standard records; all accepted after {:.0} ms, {accepted_rate:.0} records/s); ratio {ratio:.2} (target >= 0.5: {}), {of_plain:.2} of plain",
                    ms(accepted),
                    verdict(ratio >= 0.5),
                ),
            );
        }
        // Durable against in memory in pairs, the order alternating, so
        // that a pair's two runs see the same machine: the ratio is the
        // median pair's.
        if durable_on && !eventsys_on {
            let dir = TempDir::new();
            let (mut r, ..) = run(Some(&dir), "d");
            row(
                &test,
                "durable",
                &mut r,
                "until settled, --sync always (alone: no ratio)",
            );
        }
        if durable_on && eventsys_on {
            let mut ratios = Vec::new();
            for round in 0..durable_rounds {
                let dir = TempDir::new();
                let pair = if round % 2 == 0 {
                    let memory = run(None, "e");
                    (memory, run(Some(&dir), "d"))
                } else {
                    let durable = run(Some(&dir), "d");
                    (run(None, "e"), durable)
                };
                let ((mut memory, ..), (mut durable, ..)) = pair;
                let ratio = rate(&durable) / rate(&memory);
                ratios.push(ratio);
                let label = format!("{test} pair {}", round + 1);
                row(&label, "eventsys", &mut memory, "until settled");
                row(
                    &label,
                    "durable",
                    &mut durable,
                    &format!("until settled, --sync always; {ratio:.2} of in memory"),
                );
            }
            ratios.sort_by(f64::total_cmp);
            let median = ratios[ratios.len() / 2];
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "   durable batches: median {median:.2} of in memory over {} pairs ({}); target >= 0.6: {}",
                ratios.len(),
                shown.join(", "),
                verdict(median >= 0.6)
            );
        }
    }

    // 3. Raw -> standard visibility at a fixed offered rate, as single
    // records and as 10-record POSTs (less HTTP work for the same rate).
    if eventsys_on && test_on("visibility") {
        for per_post in [1, 10] {
            let eventsys = start_eventsys(&servers, None);
            let mut vis = visibility(
                &client,
                &eventsys,
                rate,
                Duration::from_secs(vis_seconds),
                per_post,
            );
            eventsys.stop(&servers);
            let test = format!("3. {:.0} rec/s, {per_post} per POST", vis.offered);
            row(&test, "eventsys", &mut vis.http, "(HTTP response times)");
            let p99 = percentile(&mut vis.raw_to_visible, 0.99);
            println!(
                "   raw write -> visible in standard table ({} of {} records): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (target p99 < 1 ms: {})",
                vis.matched,
                vis.sent,
                ms(percentile(&mut vis.raw_to_visible, 0.50)),
                ms(p99),
                ms(percentile(&mut vis.raw_to_visible, 1.0)),
                verdict(p99 < Duration::from_millis(1)),
            );
            println!(
                "   client send -> visible in standard table: p50 {:.3} ms, p99 {:.3} ms; achieved {:.0} of {:.0} offered records/s",
                ms(percentile(&mut vis.send_to_visible, 0.50)),
                ms(percentile(&mut vis.send_to_visible, 0.99)),
                vis.achieved,
                vis.offered,
            );
        }
    }
    // 4. Recovery of the binary on a data directory.
    if durable_on && test_on("recovery") {
        let (from_log, from_snapshot) = recovery(&client, recovery_records, batch_connections);
        for (how, (frames, seconds)) in [("log", from_log), ("snapshot", from_snapshot)] {
            println!(
                "4. recovery of {recovery_records} records from its {how}: {seconds:.2} s ({frames} frames; target < 5 s: {})",
                verdict(seconds < 5.0)
            );
        }
    }
    println!(
        "(cores: CPU this process used / wall time, servers and client together; wait: time its threads were runnable without a CPU / wall time)"
    );
}

/// Test 4: (frames, seconds) of the binary's recovery of `records`, from
/// its log after SIGKILL, then from its snapshot after a clean stop.
fn recovery(client: &Runtime, records: usize, connections: usize) -> ((u64, f64), (u64, f64)) {
    let dir = TempDir::new();
    let flags = [
        "--data-dir",
        &dir.0.display().to_string(),
        "--raw-workers",
        "2",
    ]
    .map(String::from);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut server = server::Server::start(&flags);
    let r = batches(
        client,
        server.addr,
        connections,
        Arc::new(batch_bodies(records, "r")),
    );
    assert_eq!(r.errors, 0, "every batch is accepted");
    let (status, _) = server::http(server.addr, "GET", "/settle?timeout_ms=600000", None);
    assert_eq!(status, 200);
    server.signal("KILL");
    server.wait_for_exit(Duration::from_secs(60));
    // Logged before the port opens, so it is in by the time the server
    // is up.
    let recovered = |server: &mut server::Server| {
        let entries: Vec<Value> = server
            .log_text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let line = entries
            .iter()
            .find(|e| server::message(e) == "recovered from the data directory")
            .expect("the server logs its recovery");
        let fields = &line["fields"];
        (
            fields["frames"].as_u64().unwrap_or(0),
            fields["seconds"].as_f64().unwrap_or(f64::NAN),
        )
    };
    let mut server = server::Server::start(&flags);
    let from_log = recovered(&mut server);
    server.signal("TERM");
    server.wait_for_exit(Duration::from_secs(120));
    let mut server = server::Server::start(&flags);
    let from_snapshot = recovered(&mut server);
    server.signal("TERM");
    server.wait_for_exit(Duration::from_secs(120));
    (from_log, from_snapshot)
}
