//! Scenario 1 without HTTP: raw records of mixed kinds (movies and actors)
//! written into the raw tables, through `raw_queue` and `raw_handler`, until
//! the standard tables are settled; then the memory the pipeline holds.
//!
//! The records are parsed into writes before the clock starts (parsing is
//! measured by the HTTP bench), then ingested 1,000 at a time as the HTTP
//! edge does, waiting whenever the pipeline refuses more (`admit`).
//!
//! Each change-log retention is measured in a fresh child process, so one
//! run's freed-but-kept heap does not count against the next. RSS is read
//! from `/proc/self/status` (`VmRSS`), and set against two sizes of JSON:
//! the raw records sent (`RSS/json`, one raw and one standard record held
//! per record sent), and every live record's own JSON, raw and standard
//! (`RSS/stored`).
//!
//! Run: `cargo bench --bench pipeline`
//!
//! - `EVENTSYS_BENCH_RECORDS` (default 1000000): records ingested.
//! - `EVENTSYS_BENCH_RETENTION` (default `1000000,10000`): change-log
//!   retentions to measure, comma-separated (1000000 is the server default).
//! - `EVENTSYS_BENCH_BATCH` (default 1000): records per ingest call.
//! - `EVENTSYS_BENCH_RAW_WORKERS` (default 2, the server's default here):
//!   `raw_handler` workers.
//! - `EVENTSYS_QUEUE_CAPACITY` (1024) and `EVENTSYS_INGEST_BACKLOG_LIMIT`
//!   (100000): as for the server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use eventsys::engine::log::Cause;
use eventsys::engine::record::Timestamp;
use eventsys::engine::table::Write;
use eventsys::media::pipeline::{Pipeline, PipelineConfig};
use eventsys::media::records::{Kind, parse_records};

use common::{Usage, env_usize, load_average, plain, rss};

/// Raw record `i`: even ones are movies, odd ones actors, shaped as a
/// vendor might send them.
fn raw_record(i: usize) -> (Kind, Value) {
    if i.is_multiple_of(2) {
        (
            Kind::Movies,
            json!({
                "id": format!("m-{i:08}"),
                "title": format!("The Quiet Harbour {i}"),
                "year": 1950 + (i % 70),
                "actor_ids": [format!("a-{:08}", (i + 1) % 100_000), format!("a-{:08}", (i + 3) % 100_000)],
                "updated_at": format!("2024-03-{:02}T12:{:02}:{:02}Z", 1 + i % 28, i % 60, (i / 60) % 60),
            }),
        )
    } else {
        (
            Kind::Actors,
            json!({
                "id": format!("a-{i:08}"),
                "name": format!("Ada Actor {i}"),
                "birth_date": format!("19{:02}-{:02}-{:02}", 40 + i % 60, 1 + i % 12, 1 + i % 28),
                "updated_at": format!("2024-03-{:02}T12:{:02}:{:02}Z", 1 + i % 28, i % 60, (i / 60) % 60),
            }),
        )
    }
}

/// Batches of pre-parsed writes of one kind each, and the JSON size of the
/// records they came from.
fn batches(records: usize, batch: usize) -> (Vec<(Kind, Vec<Write>)>, u64) {
    let mut json_bytes = 0u64;
    let mut out = Vec::new();
    let now = Timestamp::now();
    for start in (0..records).step_by(batch * 2) {
        let mut movies = Vec::with_capacity(batch);
        let mut actors = Vec::with_capacity(batch);
        for i in start..(start + batch * 2).min(records) {
            let (kind, value) = raw_record(i);
            json_bytes += serde_json::to_vec(&value).expect("json").len() as u64;
            match kind {
                Kind::Movies => movies.push(value),
                _ => actors.push(value),
            }
        }
        for (kind, values) in [(Kind::Movies, movies), (Kind::Actors, actors)] {
            if !values.is_empty() {
                out.push((kind, parse_records(values, now, kind).expect("valid")));
            }
        }
    }
    (out, json_bytes)
}

/// A child's runtime: 2 workers, as the server has on this machine.
fn child_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Prints a child's one line and exits at once, without tearing down a
/// million records: that is not measured.
fn report(line: &str) -> ! {
    use std::io::Write as _;
    println!("{line}");
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

/// One measurement, in a child process: prints one line of `key=value`.
fn child(retention: usize) {
    let records = env_usize("EVENTSYS_BENCH_RECORDS", 1_000_000);
    let batch = env_usize("EVENTSYS_BENCH_BATCH", 1000).max(1);
    let runtime = child_runtime("pipeline");
    let line = runtime.block_on(async move {
        let pipeline = std::sync::Arc::new(Pipeline::start(PipelineConfig {
            event_retention: retention,
            raw_workers: env_usize("EVENTSYS_BENCH_RAW_WORKERS", 2).max(1),
            queue_capacity: env_usize("EVENTSYS_QUEUE_CAPACITY", 1024).max(1),
            ingest_backlog_limit: env_usize("EVENTSYS_INGEST_BACKLOG_LIMIT", 100_000) as u64,
            ..PipelineConfig::default()
        }));
        let rss_empty = rss();
        let (batches, json_bytes) = batches(records, batch);
        let rss_parsed = rss();
        let usage = Usage::start();
        let started = Instant::now();
        let ingest = tokio::spawn({
            let pipeline = pipeline.clone();
            async move {
                let cause = Cause::request("bench");
                let mut refused = 0u64;
                for (kind, writes) in batches {
                    // A refused batch is stored in no part, and tried again
                    // (the clone shares its records' data).
                    while pipeline.admit().is_err()
                        || pipeline.ingest(kind, writes.clone(), &cause).await.is_err()
                    {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    // As an HTTP handler would between requests.
                    tokio::task::yield_now().await;
                }
                refused
            }
        });
        let refused = ingest.await.expect("ingest task");
        let ingested = started.elapsed();
        assert!(
            pipeline.engine.settle(Duration::from_secs(600)).await,
            "did not settle"
        );
        let settled = started.elapsed();
        let (cpu, switches, waited) = usage.spent();
        let rss_settled = rss();
        let count = |name: &str| pipeline.engine.table(name).map_or(0, |t| t.len());
        let live_raw = count("raw_movies") + count("raw_actors");
        let live_standard = count("movies") + count("actors");
        assert_eq!(live_standard, records as u64, "every record standardised");
        let log_len = pipeline.engine.log.len();
        // The JSON every live record holds, raw and standard (after RSS was
        // read: the snapshots allocate).
        let stored_json_bytes: usize = ["raw_movies", "raw_actors", "movies", "actors"]
            .into_iter()
            .filter_map(|name| pipeline.engine.table(name))
            .flat_map(|table| table.snapshot())
            .map(|record| record.data.len())
            .sum();
        format!(
            "retention={retention} records={records} json_bytes={json_bytes} \
             ingest_s={:.3} settle_s={:.3} refused={refused} rss_empty={rss_empty} \
             rss_parsed={rss_parsed} rss_settled={rss_settled} live_raw={live_raw} \
             live_standard={live_standard} stored_json_bytes={stored_json_bytes} \
             log_len={log_len} cpu_s={cpu:.2} \
             context_switches={switches} runqueue_wait_s={waited:.2}",
            ingested.as_secs_f64(),
            settled.as_secs_f64(),
        )
    });
    report(&line)
}

/// The floor, in a child process like the rest: the same pre-parsed
/// batches through [`plain::Pipeline`] (plain maps, a bounded mpsc and
/// eventsys's own `standardise`), ingested by one task as eventsys's are.
fn floor_child() {
    let records = env_usize("EVENTSYS_BENCH_RECORDS", 1_000_000);
    let batch = env_usize("EVENTSYS_BENCH_BATCH", 1000).max(1);
    let runtime = child_runtime("floor");
    let line = runtime.block_on(async move {
        let pipeline = plain::Pipeline::start(
            env_usize("EVENTSYS_BENCH_RAW_WORKERS", 2).max(1),
            env_usize("EVENTSYS_QUEUE_CAPACITY", 1024).max(1),
        );
        let rss_empty = rss();
        let (batches, json_bytes) = batches(records, batch);
        let usage = Usage::start();
        let started = Instant::now();
        let ingest = tokio::spawn({
            let pipeline = pipeline.clone();
            async move {
                for (kind, writes) in batches {
                    pipeline.ingest(kind, writes).await;
                    tokio::task::yield_now().await;
                }
            }
        });
        ingest.await.expect("ingest task");
        let ingested = started.elapsed();
        pipeline.settle().await;
        let settled = started.elapsed();
        let (cpu, switches, waited) = usage.spent();
        let rss_settled = rss();
        let (live_raw, live_standard) = pipeline.live();
        assert_eq!(live_standard, records, "every record standardised");
        format!(
            "retention=floor records={records} json_bytes={json_bytes} \
             ingest_s={:.3} settle_s={:.3} rss_empty={rss_empty} rss_settled={rss_settled} \
             live_raw={live_raw} live_standard={live_standard} stored_json_bytes={} log_len=0 \
             cpu_s={cpu:.2} context_switches={switches} runqueue_wait_s={waited:.2}",
            ingested.as_secs_f64(),
            settled.as_secs_f64(),
            pipeline.stored_json_bytes(),
        )
    });
    report(&line)
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    match std::env::var("EVENTSYS_BENCH_CHILD").as_deref() {
        Ok("floor") => return floor_child(),
        Ok(retention) => return child(retention.parse().expect("retention")),
        Err(_) => {}
    }
    let retentions: Vec<usize> = std::env::var("EVENTSYS_BENCH_RETENTION")
        .unwrap_or_else(|_| "1000000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().replace('_', "").parse().ok())
        .collect();
    let exe = std::env::current_exe().expect("own path");
    println!("load average at start: {}", load_average());
    println!(
        "scenario 1 without HTTP: {} records (movies and actors), pre-parsed, ingested {} per call, 2 runtime workers, {} raw_handler workers",
        env_usize("EVENTSYS_BENCH_RECORDS", 1_000_000),
        env_usize("EVENTSYS_BENCH_BATCH", 1000),
        env_usize("EVENTSYS_BENCH_RAW_WORKERS", 2).max(1),
    );
    println!(
        "{:>10} {:>9} {:>10} {:>10} {:>12} {:>6} {:>6} {:>8} {:>11} {:>11} {:>10} {:>12} {:>9} {:>8}",
        "retention",
        "records",
        "ingest s",
        "settled s",
        "records/s",
        "cores",
        "waited",
        "cs/rec",
        "json B/rec",
        "RSS B/rec",
        "RSS/json",
        "RSS/stored",
        "log kept",
        "target",
    );
    let runs = std::iter::once("floor".to_string()).chain(retentions.iter().map(|r| r.to_string()));
    // (what ran, records/s, RSS per record)
    let mut measured: Vec<(String, f64, f64)> = Vec::new();
    for run in runs {
        let output = Command::new(&exe)
            .env("EVENTSYS_BENCH_CHILD", &run)
            .output()
            .expect("child runs");
        let line = String::from_utf8_lossy(&output.stdout);
        let line = line.trim();
        if !output.status.success() || line.is_empty() {
            eprintln!(
                "{run}: child failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            continue;
        }
        let floor = run == "floor";
        let records = field(line, "records");
        let json_per = field(line, "json_bytes") / records;
        // Memory the pipeline holds for the records: the writes were
        // parsed before the pipeline got them and moved into its tables, so
        // this counts from the empty pipeline.
        let rss_per = (field(line, "rss_settled") - field(line, "rss_empty")) / records;
        let ratio = rss_per / json_per;
        // The same memory against the JSON of every live record, raw and
        // standard: what each stored record costs beyond its own JSON.
        let stored_ratio = (field(line, "rss_settled") - field(line, "rss_empty"))
            / field(line, "stored_json_bytes");
        let rate = records / field(line, "settle_s");
        measured.push((run.clone(), rate, rss_per));
        println!(
            "{:>10} {:>9} {:>10.3} {:>10.3} {:>12.0} {:>6.2} {:>6.2} {:>8.3} {:>11.1} {:>11.1} {:>9.2}x {:>11.2}x {:>9} {:>8}",
            run,
            records,
            field(line, "ingest_s"),
            field(line, "settle_s"),
            rate,
            field(line, "cpu_s") / field(line, "settle_s"),
            field(line, "runqueue_wait_s") / field(line, "settle_s"),
            field(line, "context_switches") / records,
            json_per,
            rss_per,
            ratio,
            stored_ratio,
            if floor {
                "-".to_string()
            } else {
                field(line, "log_len").to_string()
            },
            match (floor, ratio <= 2.0) {
                (true, _) => "-",
                (false, true) => "met",
                (false, false) => "unmet",
            },
        );
        println!("  raw: {line}");
    }
    if let Some((_, floor_rate, floor_rss)) = measured.iter().find(|(run, ..)| run == "floor") {
        for (run, rate, rss_per) in measured.iter().filter(|(run, ..)| run != "floor") {
            println!(
                "retention {run}: {:.2}x the floor's records/s, {:.2}x its memory per record",
                rate / floor_rate,
                rss_per / floor_rss,
            );
        }
    }
    println!(
        "(cores: CPU time used / wall time while ingesting and settling; waited: time runnable but"
    );
    println!(
        " without a CPU / wall time (non-zero when something else ran); cs/rec: context switches per record;"
    );
    println!(
        " RSS/json: memory per record against the raw JSON sent; RSS/stored: the same memory against"
    );
    println!(
        " the JSON of every live record, raw and standard; target: memory <= 2x the JSON size per live record;"
    );
    println!(
        " floor: plain maps and a bounded mpsc doing the same work with eventsys's own standardise)"
    );
}
