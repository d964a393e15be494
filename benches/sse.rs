//! Live viewers against the pipeline: how long a 1,000-record batch takes
//! until settled, with no `/events/stream` clients, with clients that
//! never read (stalled), and with clients that read everything, in one
//! run, each figure a ratio to the floor: the rounds without clients,
//! measured before, between and after the others.
//!
//! eventsys runs in this process on 127.0.0.1:0, on a tokio runtime of 2
//! workers (as the binary has on this 2-core machine); the clients run on
//! their own 1-worker runtime. Each round POSTs 1,000 movies as one batch
//! (the same ids every round, each with a new title: 2,000 changes) and
//! then waits on `GET /settle`; the round's time is from the POST
//! to the settle's answer, as a user's client would see it. Before each
//! round, reading clients have read everything so far (and each is checked
//! to have received every change, in order).
//!
//! A stalled client connects, reads the response head and nothing more,
//! with a small receive buffer, as a browser tab in the background might.
//! Three unmeasured rounds fill the stalled clients' socket buffers first:
//! that is a cost each client pays once, bounded by the buffers (64 KiB of
//! send buffer per connection); what is measured is the steady state.
//!
//! Run: `cargo bench --bench sse`
//!
//! - `EVENTSYS_BENCH_ROUNDS` (default 41): rounds per phase; the median counts.
//! - `EVENTSYS_BENCH_STALLED` (default 1000): stalled clients.
//! - `EVENTSYS_BENCH_READERS` (default 100): reading clients.
//!
//! Targets: stalled ≤ 1.2× none, reading ≤ 2× none.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use eventsys::{App, Config};

use common::{env_usize, load_average, runtime};

const BATCH: usize = 1000;

/// Waits until every reader has read up to the log's latest change, and
/// returns that sequence.
async fn catch_up(addr: SocketAddr, readers: &[Arc<Reader>]) -> u64 {
    let target = latest(addr).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while readers
        .iter()
        .any(|r| r.last.load(Ordering::Acquire) < target)
    {
        assert!(
            Instant::now() < deadline,
            "reading clients did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    target
}

/// One request on its own connection; the status and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    stream.write_all(body.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read the response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The change log's latest sequence.
async fn latest(addr: SocketAddr) -> u64 {
    let (_, metrics) = request(addr, "GET", "/metrics", "").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("eventsys_log_sequence "))
        .and_then(|n| n.trim().parse().ok())
        .expect("eventsys_log_sequence")
}

/// Opens `GET /events/stream` (live from now) and reads its head. HTTP/1.0,
/// so that the body is the bare stream (no chunked framing to undo).
async fn open_stream(addr: SocketAddr, receive_buffer: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let mut stream = socket.connect(addr).await.expect("connect the stream");
    stream
        .write_all(
            b"GET /events/stream HTTP/1.0\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read the head");
        assert!(n > 0, "the stream was refused");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A client that reads everything: the last `id:` it has seen, and how
/// many events, checked to be consecutive.
struct Reader {
    last: AtomicU64,
    events: AtomicU64,
}

async fn read_all(mut stream: TcpStream, reader: Arc<Reader>, from: u64) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    let mut expected = from + 1;
    loop {
        let n = match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buffer[..n]);
        let mut start = 0;
        while let Some(end) = pending[start..].windows(2).position(|w| w == b"\n\n") {
            let frame = &pending[start..start + end];
            if let Some(id) = frame.strip_prefix(b"id: ") {
                let line = id.split(|b| *b == b'\n').next().unwrap_or_default();
                let seq: u64 = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .expect("an id: sequence");
                assert_eq!(
                    seq, expected,
                    "a reading client missed or reordered a change"
                );
                expected += 1;
                reader.events.fetch_add(1, Ordering::Relaxed);
                reader.last.store(seq, Ordering::Release);
            }
            start += end + 2;
        }
        pending.drain(..start);
    }
}

/// Runs `rounds` rounds; each round's seconds from POST to settled.
async fn rounds(
    addr: SocketAddr,
    rounds: usize,
    next: &AtomicU64,
    readers: &[Arc<Reader>],
) -> Vec<f64> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        // Readers first catch up with everything so far.
        catch_up(addr, readers).await;
        // The same 1,000 movies each round, each with a new title: 2,000
        // changes a round (raw and standard), while the tables keep their
        // size, so that memory growth does not blur the comparison.
        let round = next.fetch_add(1, Ordering::Relaxed);
        let batch: Vec<_> = (0..BATCH)
            .map(|i| json!({"id": format!("m{i}"), "title": format!("Movie {i}, take {round}"), "year": 2000}))
            .collect();
        let body = serde_json::to_string(&batch).expect("json");
        let started = Instant::now();
        let (status, reply) = request(addr, "POST", "/raw/movies", &body).await;
        assert_eq!(status, 200, "{reply}");
        let (status, reply) = request(addr, "GET", "/settle?timeout_ms=60000", "").await;
        assert_eq!(status, 200, "{reply}");
        times.push(started.elapsed().as_secs_f64());
    }
    times
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() {
    let round_count = env_usize("EVENTSYS_BENCH_ROUNDS", 41).max(1);
    let stalled_count = env_usize("EVENTSYS_BENCH_STALLED", 1000);
    let reader_count = env_usize("EVENTSYS_BENCH_READERS", 100);
    println!("sse: a {BATCH}-record batch until settled, {round_count} rounds per phase (median)");
    println!("load average before: {}", load_average());

    let server_rt = runtime(2, "server");
    let client_rt = runtime(1, "client");
    let listener = server_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = Config {
        addr,
        raw_workers: Some(2),
        max_connections: (stalled_count + reader_count + 64) as u32,
        ..Config::default()
    };
    let app = {
        let _guard = server_rt.enter();
        App::start(config)
    };
    let stop = CancellationToken::new();
    let served = server_rt.spawn({
        let (app, stop) = (app.clone(), stop.clone());
        async move {
            eventsys::serve(listener, app, stop.cancelled_owned())
                .await
                .expect("eventsys serves");
        }
    });

    client_rt.block_on(async {
        let next = AtomicU64::new(0);
        // Warm-up round, not counted.
        rounds(addr, 1, &next, &[]).await;
        // The floor is measured before, between and after the phases with
        // clients, so that a change in the machine's load shows.
        let mut floor = rounds(addr, round_count, &next, &[]).await;
        println!(
            "  no clients:               {:>8.1} ms",
            median(floor.clone()) * 1e3
        );

        let mut stalled = Vec::with_capacity(stalled_count);
        for _ in 0..stalled_count {
            stalled.push(open_stream(addr, Some(4096)).await);
        }
        // Unmeasured: the first batches fill each stalled client's socket
        // buffers (a cost each pays once, bounded by the buffers), after
        // which it is stalled for good.
        rounds(addr, 3, &next, &[]).await;
        let with_stalled = median(rounds(addr, round_count, &next, &[]).await);
        drop(stalled);
        let between = rounds(addr, round_count, &next, &[]).await;
        println!(
            "  no clients, again:        {:>8.1} ms",
            median(between.clone()) * 1e3
        );
        floor.extend(between);

        let from = latest(addr).await;
        let mut readers = Vec::with_capacity(reader_count);
        let mut reading = tokio::task::JoinSet::new();
        for _ in 0..reader_count {
            let reader = Arc::new(Reader {
                last: AtomicU64::new(from),
                events: AtomicU64::new(0),
            });
            let stream = open_stream(addr, None).await;
            reading.spawn(read_all(stream, reader.clone(), from));
            readers.push(reader);
        }
        let with_readers = median(rounds(addr, round_count, &next, &readers).await);
        let target = catch_up(addr, &readers).await;
        let received: u64 = readers
            .iter()
            .map(|r| r.events.load(Ordering::Relaxed))
            .sum();
        assert_eq!(
            received,
            (target - from) * reader_count as u64,
            "every reader got every change"
        );
        reading.shutdown().await;
        let after = rounds(addr, round_count, &next, &[]).await;
        println!(
            "  no clients, at the end:   {:>8.1} ms",
            median(after.clone()) * 1e3
        );
        floor.extend(after);

        let none = median(floor);
        println!("  floor (all rounds above): {:>8.1} ms", none * 1e3);
        println!(
            "  {stalled_count} stalled clients:     {:>8.1} ms  {:.2}x the floor (target <= 1.2x)",
            with_stalled * 1e3,
            with_stalled / none
        );
        println!(
            "  {reader_count} reading clients:     {:>8.1} ms  {:.2}x the floor (target <= 2x); \
             each read all {} changes, in order",
            with_readers * 1e3,
            with_readers / none,
            target - from
        );
    });
    println!("load average after: {}", load_average());
    stop.cancel();
    let _ = server_rt.block_on(served);
}
