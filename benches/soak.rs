//! Soak: drives mixed load through the whole app for a while and reports
//! resident memory at intervals, to show memory is bounded by configuration
//! (queue capacity, change-log retention, dead-letter cap, id space), not by
//! how long the server runs.
//!
//! ```text
//! cargo bench --bench soak                                   # 60 s
//! EVENTSYS_SOAK_SECS=600 cargo bench --bench soak            # 10 minutes
//! EVENTSYS_SOAK_RETENTION=100000 EVENTSYS_SOAK_IDS=20000 ...
//! ```
//!
//! Requests go through the real router in-process (no sockets), from four
//! client tasks that honour 503 backpressure. The id space is fixed, so the
//! tables stop growing once every id has been written; what must then stay
//! flat is everything else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use eventsys::{App, Config};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One request of the mix, chosen by `n`.
fn request(n: u64, ids: u64) -> (axum::http::Method, String, Value) {
    let id = n % ids;
    let at = format!("2024-01-01T00:00:{:02}.{:09}Z", n % 60, n % 1_000_000_000);
    match n % 20 {
        0..=9 => {
            let batch: Vec<_> = (0..50)
                .map(|i| json!({"id": format!("m{}", (id + i) % ids), "title": format!("Movie {}", n % 7), "year": 1990 + (n % 30), "updated_at": at}))
                .collect();
            (axum::http::Method::POST, "/raw/movies".into(), json!(batch))
        }
        10..=12 => {
            let episodes: Vec<_> = (0..(n % 12))
                .map(|e| json!({"id": format!("s{}e{e}", id % 500), "title": "Ep"}))
                .collect();
            (
                axum::http::Method::POST,
                "/raw/series".into(),
                json!({"id": format!("s{}", id % 500), "title": "Series", "episodes": episodes, "updated_at": at}),
            )
        }
        13..=15 => {
            let renditions: Vec<_> = (0..(1 + n % 3))
                .map(|r| json!({"id": format!("r{r}"), "codec": "h264", "height": 480 * (r + 1)}))
                .collect();
            (
                axum::http::Method::POST,
                "/raw/videos".into(),
                json!({"id": format!("v{}", id % 1000), "title": "Video", "renditions": renditions, "updated_at": at}),
            )
        }
        16 => (
            axum::http::Method::POST,
            "/raw/movies".into(),
            json!({"id": format!("bad{}", id % 100), "title": " "}),
        ),
        17 => (
            axum::http::Method::DELETE,
            format!("/raw/movies/m{id}"),
            Value::Null,
        ),
        18 => {
            let actors: Vec<_> = (0..200)
                .map(|i| json!({"id": format!("a{}", (id + i) % 2000), "name": "Actor"}))
                .collect();
            (
                axum::http::Method::PUT,
                "/raw/actors".into(),
                json!({"records": actors}),
            )
        }
        _ => (
            axum::http::Method::GET,
            "/events?limit=100".into(),
            Value::Null,
        ),
    }
}

#[tokio::main]
async fn main() {
    let seconds = env("EVENTSYS_SOAK_SECS", 60);
    let interval = env("EVENTSYS_SOAK_INTERVAL_SECS", (seconds / 10).max(1));
    let ids = env("EVENTSYS_SOAK_IDS", 50_000);
    let config = Config {
        encode_delay_ms: 1,
        event_retention: env("EVENTSYS_SOAK_RETENTION", 1_000_000),
        max_dead_letters: env("EVENTSYS_SOAK_DEAD_LETTERS", 10_000),
        ..Config::default()
    };
    println!(
        "soak: {seconds} s, {ids} ids, retention {} events, dead-letter cap {}, queue capacity {}",
        config.event_retention, config.max_dead_letters, config.queue_capacity
    );
    let app = App::start(config);
    let router = app.router();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..4u64 {
        let (router, sent, refused) = (router.clone(), sent.clone(), refused.clone());
        clients.spawn(async move {
            let mut n = client;
            while Instant::now() < deadline {
                let (method, path, body) = request(n, ids);
                let mut builder = Request::builder().method(method).uri(path);
                if !body.is_null() {
                    builder = builder.header(header::CONTENT_TYPE, "application/json");
                }
                let response = router
                    .clone()
                    .oneshot(builder.body(Body::from(body.to_string())).unwrap())
                    .await
                    .unwrap();
                match response.status() {
                    StatusCode::SERVICE_UNAVAILABLE => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    status if status.is_server_error() => panic!("{status} under soak"),
                    _ => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        n += 4;
                    }
                }
                // Requests complete without waiting, so make room for the
                // pipeline's own tasks on the runtime.
                tokio::task::yield_now().await;
            }
        });
    }
    // Sampled from a plain thread: the client tasks keep the runtime busy,
    // and the figures must come on time regardless.
    let pipeline = app.pipeline().clone();
    let (sent_seen, refused_seen) = (sent.clone(), refused.clone());
    let sampler = std::thread::spawn(move || {
        let started = Instant::now();
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>12} {:>10}",
            "elapsed", "rss_mib", "requests", "refused", "log_events", "records"
        );
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            std::thread::sleep(
                Duration::from_secs(interval)
                    .min(deadline.saturating_duration_since(Instant::now())),
            );
            let records: u64 = pipeline.engine.tables().iter().map(|t| t.len()).sum();
            let rss = rss_mib();
            samples.push(rss);
            println!(
                "{:>7}s {:>10.1} {:>10} {:>10} {:>12} {:>10}",
                started.elapsed().as_secs(),
                rss,
                sent_seen.load(Ordering::Relaxed),
                refused_seen.load(Ordering::Relaxed),
                pipeline.engine.log.len(),
                records
            );
        }
        samples
    });
    while clients.join_next().await.is_some() {}
    let samples = sampler.join().expect("sampler");
    let settled = app.pipeline().engine.settle(Duration::from_secs(60)).await;
    let half = samples.len() / 2;
    let (first, second) = samples.split_at(half.max(1).min(samples.len()));
    let max = |s: &[f64]| s.iter().copied().fold(0.0, f64::max);
    println!(
        "settled: {settled}; peak RSS first half {:.1} MiB, second half {:.1} MiB (ratio {:.2})",
        max(first),
        max(second),
        max(second) / max(first).max(1.0)
    );
}
