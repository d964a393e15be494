//! `--data-dir` against the real binary: killed with SIGKILL at random
//! instants under a mixed load, restarted, and checked against what each
//! client was told; then a damaged directory, and a second server on the
//! same one.
//!
//! Each client keeps a ledger of every write it sent and whether it got a
//! 2xx. After each restart: every acknowledged write is there at its
//! version (or a later one the client sent), the change log is gapless and
//! extends the one read before the kill, acknowledged CloudEvents answer
//! `duplicate`, and the dead letter is still listed. At the end the
//! standard tables equal those of an in-memory server fed the surviving
//! raw records. The crash instant is a random number of acknowledgements
//! into each round (seeded; the seed is printed), not a sleep.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use serde_json::{Value, json};

#[path = "support/server.rs"]
mod server;

use server::{DEADLINE, Server, http, try_http};

#[path = "support/temp_dir.rs"]
mod temp_dir;

use temp_dir::TempDir;

const ROUNDS: usize = 20;
const JSON: &str = "application/json";
const CE_BATCH: &str = "application/cloudevents-batch+json";

fn durable_flags(dir: &Path) -> Vec<String> {
    [
        "--data-dir",
        &dir.display().to_string(),
        "--segment-bytes",
        "16384",
        "--snapshot-bytes",
        "262144",
        "--encode-delay-ms",
        "1",
        "--retry-base-ms",
        "2",
        "--retry-max-ms",
        "20",
    ]
    .map(String::from)
    .to_vec()
}

fn start(flags: &[String]) -> Server {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start(&flags)
}

/// Versions that only go up, across rounds: the test's start plus a
/// counter of microseconds.
struct Clock {
    base: chrono::DateTime<chrono::Utc>,
    ticks: AtomicU64,
}

impl Clock {
    fn next(&self) -> String {
        let n = self.ticks.fetch_add(1, Ordering::Relaxed) as i64;
        (self.base + chrono::Duration::microseconds(n))
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    }
}

/// A write a client sent, and whether it was acknowledged (or, after a
/// restart, found: then it is on disk as surely as if it had been).
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    /// The version written, `None` for a delete.
    version: Option<String>,
    acked: bool,
}

#[derive(Default)]
struct Ledger {
    /// Per raw table, every write in the order sent.
    writes: BTreeMap<&'static str, Vec<Sent>>,
    /// raw_actors reconciliations: the set, and whether acknowledged.
    sets: Vec<(BTreeSet<String>, bool)>,
    /// CloudEvents acknowledged, as sent (source, id, record).
    events: Vec<Value>,
}

fn send(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &Value) -> bool {
    matches!(
        try_http(addr, method, path, content_type, &body.to_string()),
        Ok((200, _))
    )
}

/// Starts a round of clients writing, and returns once `acks` writes were
/// acknowledged in all, with the clients still sending: the caller kills
/// the server under them, then joins them.
fn load(
    addr: SocketAddr,
    ledger: &Arc<Mutex<Ledger>>,
    clock: &Arc<Clock>,
    round: usize,
    acks: u64,
) -> Vec<thread::JoinHandle<()>> {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..5)
        .map(|client| {
            let (ledger, clock, stop, acked) =
                (ledger.clone(), clock.clone(), stop.clone(), acked.clone());
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed((round * 10 + client) as u64);
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    if step(addr, client, round, k, &mut rng, &ledger, &clock) {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + DEADLINE;
    while acked.load(Ordering::Relaxed) < acks && Instant::now() < deadline {
        thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    clients
}

/// One write of `client`'s kind, recorded as sent before it goes out and
/// as acknowledged once the 2xx is in.
fn step(
    addr: SocketAddr,
    client: usize,
    round: usize,
    k: usize,
    rng: &mut fastrand::Rng,
    ledger: &Mutex<Ledger>,
    clock: &Clock,
) -> bool {
    let record =
        |ledger: &Mutex<Ledger>, table: &'static str, id: &str, version: Option<String>| {
            let mut ledger = ledger.lock().unwrap();
            let writes = ledger.writes.entry(table).or_default();
            writes.push(Sent {
                id: id.to_string(),
                version,
                acked: false,
            });
            writes.len() - 1
        };
    let ack = |ledger: &Mutex<Ledger>, table: &'static str, at: &[usize]| {
        let mut ledger = ledger.lock().unwrap();
        for i in at {
            ledger.writes.get_mut(table).unwrap()[*i].acked = true;
        }
    };
    match client {
        // Single movies, updated, some deleted.
        0 => {
            let id = format!("m{}", rng.usize(0..200));
            if rng.u8(0..5) == 0 {
                let version = clock.next();
                let at = record(ledger, "raw_movies", &id, None);
                let path = format!("/raw/movies/{id}?version={version}");
                let ok = send(addr, "DELETE", &path, JSON, &Value::Null);
                if ok {
                    ack(ledger, "raw_movies", &[at]);
                }
                ok
            } else {
                let version = clock.next();
                let at = record(ledger, "raw_movies", &id, Some(version.clone()));
                let body = json!({"id": id, "title": format!("r{round} k{k}"), "year": 1990 + rng.u16(0..30), "updated_at": version});
                let ok = send(addr, "POST", "/raw/movies", JSON, &body);
                if ok {
                    ack(ledger, "raw_movies", &[at]);
                }
                ok
            }
        }
        // Batches of movies with actors.
        1 => {
            let mut records = Vec::new();
            let mut at = Vec::new();
            for _ in 0..20 {
                let id = format!("b{}", rng.usize(0..500));
                let version = clock.next();
                at.push(record(ledger, "raw_movies", &id, Some(version.clone())));
                records.push(json!({"id": id, "title": format!("batch r{round}"), "actor_ids": [format!("a{}", rng.usize(0..30))], "updated_at": version}));
            }
            let ok = send(addr, "POST", "/raw/movies", JSON, &Value::Array(records));
            if ok {
                ack(ledger, "raw_movies", &at);
            }
            ok
        }
        // Complete sets of actors.
        2 => {
            let set: BTreeSet<String> = (0..30)
                .filter(|_| rng.bool())
                .map(|n| format!("a{n}"))
                .collect();
            let records: Vec<Value> = set
                .iter()
                .map(|id| json!({"id": id, "name": format!("actor {id} r{round}")}))
                .collect();
            let index = {
                let mut ledger = ledger.lock().unwrap();
                ledger.sets.push((set, false));
                ledger.sets.len() - 1
            };
            let body = json!({"as_of": clock.next(), "records": records});
            let ok = send(addr, "PUT", "/raw/actors", JSON, &body);
            if ok {
                ledger.lock().unwrap().sets[index].1 = true;
            }
            ok
        }
        // Series with their episodes, as CloudEvents.
        3 => {
            let id = format!("s{}", rng.usize(0..40));
            let version = clock.next();
            let at = record(ledger, "raw_series", &id, Some(version.clone()));
            let episodes: Vec<Value> = (1..=rng.u8(1..4))
                .map(|n| json!({"id": format!("{id}e{n}"), "title": format!("E{n} r{round}"), "number": n}))
                .collect();
            let event = json!({
                "specversion": "1.0", "id": format!("ce-{round}-{k}"), "source": "durability",
                "type": "series", "time": version,
                "data": {"id": id, "title": format!("S r{round} k{k}"), "episodes": episodes},
            });
            let ok = send(addr, "POST", "/raw/series", CE_BATCH, &json!([event]));
            if ok {
                ack(ledger, "raw_series", &[at]);
                ledger.lock().unwrap().events.push(event);
            }
            ok
        }
        // Videos with renditions, whose encodes go through the outbox.
        _ => {
            let id = format!("v{}", rng.usize(0..60));
            let version = clock.next();
            let at = record(ledger, "raw_videos", &id, Some(version.clone()));
            let renditions: Vec<Value> = [480, 720, 1080]
                .iter()
                .take(rng.usize(1..4))
                .map(|h| json!({"id": format!("{id}-{h}"), "codec": "h264", "height": h}))
                .collect();
            let body = json!({"id": id, "title": format!("V r{round}"), "renditions": renditions, "updated_at": version});
            let ok = send(addr, "POST", "/raw/videos", JSON, &body);
            if ok {
                ack(ledger, "raw_videos", &[at]);
            }
            ok
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Every live record of a table, by id: (version, data).
fn table(addr: SocketAddr, name: &str) -> BTreeMap<String, (String, Value)> {
    let mut records = BTreeMap::new();
    let mut after = String::new();
    loop {
        let page = get(addr, &format!("/tables/{name}?limit=1000{after}"));
        for r in page["records"].as_array().unwrap() {
            let id = r["id"].as_str().unwrap().to_string();
            let version = r["version"].as_str().unwrap().to_string();
            records.insert(id, (version, r["data"].clone()));
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return records,
        }
    }
}

/// The retained change log: sequence -> event id.
fn events(addr: SocketAddr) -> BTreeMap<u64, String> {
    let mut seen = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = get(addr, &format!("/events?after={after}&limit=1000"));
        let batch = page["events"].as_array().unwrap();
        for e in batch {
            let seq: u64 = e["sequence"].as_str().unwrap().parse().unwrap();
            seen.insert(seq, e["id"].as_str().unwrap().to_string());
        }
        let next = page["next"].as_u64().unwrap();
        if batch.is_empty() || next == after {
            return seen;
        }
        after = next;
    }
}

/// Checks what survived against the ledger, and marks what was found as
/// known to be on disk.
fn check(addr: SocketAddr, ledger: &Mutex<Ledger>, round: usize) {
    let mut ledger = ledger.lock().unwrap();
    for (name, writes) in ledger.writes.iter_mut() {
        let stored = table(addr, name);
        let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, w) in writes.iter().enumerate() {
            by_id.entry(w.id.as_str()).or_default().push(i);
        }
        let mut found = Vec::new();
        for (id, sent) in by_id {
            // From the last write known to be on disk on, any may be what
            // the table holds; before the first, nothing or any.
            let from = sent.iter().rposition(|i| writes[*i].acked);
            let candidates = &sent[from.unwrap_or(0)..];
            let here = stored.get(id).map(|(v, _)| v.as_str());
            let matched = candidates
                .iter()
                .rev()
                .find(|i| writes[**i].version.as_deref() == here);
            match matched {
                Some(i) => found.push(*i),
                None => assert!(
                    from.is_none() && here.is_none(),
                    "round {round}: {name}/{id} holds {here:?}, but the writes from the last \
                     acknowledged one on are {:?}",
                    candidates.iter().map(|i| &writes[*i]).collect::<Vec<_>>()
                ),
            }
        }
        for i in found {
            writes[i].acked = true;
        }
    }

    // raw_actors is the last set known to be on disk or a later one; or,
    // for one cut short by the crash (not acknowledged), part of it.
    let actors: BTreeSet<String> = table(addr, "raw_actors").into_keys().collect();
    let from = ledger.sets.iter().rposition(|(_, acked)| *acked);
    let later = &ledger.sets[from.unwrap_or(0)..];
    match later.iter().rposition(|(set, _)| *set == actors) {
        Some(p) => ledger.sets[from.unwrap_or(0) + p].1 = true,
        None => assert!(
            (from.is_none() && actors.is_empty())
                || later
                    .iter()
                    .any(|(set, acked)| !acked && actors.is_subset(set)),
            "round {round}: raw_actors holds {actors:?}, no set sent from the last acknowledged one on"
        ),
    }

    // Every acknowledged CloudEvent is remembered.
    let events = std::mem::take(&mut ledger.events);
    for chunk in events.chunks(200) {
        let (status, body) = try_http(
            addr,
            "POST",
            "/raw/series",
            CE_BATCH,
            &Value::Array(chunk.to_vec()).to_string(),
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let reply: Value = serde_json::from_str(&body).unwrap();
        for result in reply["results"].as_array().unwrap() {
            assert_eq!(
                result["outcome"], "duplicate",
                "round {round}: an acknowledged CloudEvent was applied again: {reply}"
            );
        }
    }
}

/// The change log is gapless and extends the one read before.
fn check_log(
    addr: SocketAddr,
    before: &BTreeMap<u64, String>,
    round: usize,
) -> BTreeMap<u64, String> {
    let now = events(addr);
    let seqs: Vec<u64> = now.keys().copied().collect();
    if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
        assert_eq!(
            (last - first + 1) as usize,
            seqs.len(),
            "round {round}: sequences have gaps"
        );
    }
    for (seq, id) in before {
        assert_eq!(
            now.get(seq),
            Some(id),
            "round {round}: change {seq} was lost or its sequence reused"
        );
    }
    now
}

fn dead_letters(addr: SocketAddr) -> String {
    get(addr, "/queues/raw_queue/dead-letters").to_string()
}

#[test]
fn acknowledged_writes_survive_kill_9_at_random_instants() {
    let seed = std::env::var("EVENTSYS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (EVENTSYS_CRASH_SEED={seed} repeats this run)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = TempDir::new();
    let flags = durable_flags(&dir.0);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let clock = Arc::new(Clock {
        base: chrono::Utc::now(),
        ticks: AtomicU64::new(0),
    });

    // A dead letter, made on purpose, that must outlive every crash.
    let mut server = start(&flags);
    let fault = json!({"failure_rate": 1.0, "permanent": true});
    assert_eq!(
        http(server.addr, "PUT", "/faults/raw_handler", Some(&fault)).0,
        200
    );
    let doomed = json!({"id": "doomed", "title": "D", "updated_at": clock.next()});
    assert_eq!(
        http(server.addr, "POST", "/raw/movies", Some(&doomed)).0,
        200
    );
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=20000", None).0,
        200
    );
    assert_eq!(
        http(server.addr, "DELETE", "/faults/raw_handler", None).0,
        200
    );
    assert!(dead_letters(server.addr).contains("doomed"));

    let mut log = BTreeMap::new();
    for round in 0..ROUNDS {
        let acks = rng.u64(5..300);
        let clients = load(server.addr, &ledger, &clock, round, acks);
        server.signal("KILL");
        server.wait_for_exit(DEADLINE);
        for client in clients {
            client.join().expect("a client panicked");
        }
        server = start(&flags);
        check(server.addr, &ledger, round);
        log = check_log(server.addr, &log, round);
        assert!(
            dead_letters(server.addr).contains("doomed"),
            "round {round}: the dead letter was lost"
        );
    }

    // Settled, with the dead letter redriven (the fault is gone), the
    // standard tables are what the surviving raw records make in memory.
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=60000", None).0,
        200
    );
    assert_eq!(
        http(
            server.addr,
            "POST",
            "/queues/raw_queue/dead-letters/redrive",
            None
        )
        .0,
        200
    );
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=60000", None).0,
        200
    );
    let memory = start(&durable_flags(&dir.0)[2..]);
    for (kind, table_name) in [
        ("actors", "raw_actors"),
        ("movies", "raw_movies"),
        ("series", "raw_series"),
        ("videos", "raw_videos"),
    ] {
        let records: Vec<Value> = table(server.addr, table_name)
            .into_iter()
            .map(|(_, (version, mut data))| {
                data["updated_at"] = json!(version);
                data
            })
            .collect();
        for chunk in records.chunks(500) {
            let (status, body) = http(
                memory.addr,
                "POST",
                &format!("/raw/{kind}"),
                Some(&json!(chunk)),
            );
            assert_eq!(status, 200, "{body}");
        }
    }
    assert_eq!(
        http(memory.addr, "GET", "/settle?timeout_ms=60000", None).0,
        200
    );
    for name in [
        "actors",
        "movies",
        "series",
        "episodes",
        "videos",
        "encodes",
        "filmography",
        "series_overview",
        "publications",
    ] {
        let (durable, fresh) = (table(server.addr, name), table(memory.addr, name));
        assert_eq!(
            durable.len(),
            fresh.len(),
            "{name}: {} records after the crashes, {} in memory",
            durable.len(),
            fresh.len()
        );
        for (id, (version, data)) in &fresh {
            assert_eq!(
                durable.get(id).map(|(_, d)| d),
                Some(data),
                "{name}/{id} (version {version}) differs from the in-memory run"
            );
        }
    }
    // The counters add up after all the crashes.
    counters_add_up(server.addr);
}

/// Starts the binary on `dir` expecting it to refuse; its exit code and
/// everything it printed.
fn refused(dir: &Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_eventsys"))
        .args(["--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run eventsys");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// A directory with some records, the server stopped cleanly (so it holds a
/// snapshot) or killed (so it holds only the log).
fn populated(clean: bool, flags: &[String]) -> (TempDir, BTreeMap<String, (String, Value)>) {
    let dir = TempDir::new();
    let mut all = vec!["--data-dir".to_string(), dir.0.display().to_string()];
    all.extend_from_slice(flags);
    let mut server = start(&all);
    for n in 0..50 {
        let body =
            json!([{"id": format!("m{n}"), "title": "T"}, {"id": format!("n{n}"), "title": "U"}]);
        assert_eq!(http(server.addr, "POST", "/raw/movies", Some(&body)).0, 200);
    }
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=20000", None).0,
        200
    );
    let movies = table(server.addr, "movies");
    server.signal(if clean { "TERM" } else { "KILL" });
    server.wait_for_exit(DEADLINE);
    (dir, movies)
}

fn files(dir: &Path, ending: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.display().to_string().ends_with(ending))
        .collect();
    found.sort();
    found
}

#[test]
fn a_half_written_snapshot_is_passed_over_for_the_log() {
    let (dir, movies) = populated(true, &[]);
    let snaps = files(&dir.0.join("snap"), ".snap");
    assert_eq!(snaps.len(), 1, "a clean stop leaves a snapshot");
    // A crash in the middle of writing a newer one.
    let newer = dir
        .0
        .join("snap")
        .join(format!("{:020}.snap.tmp", u64::MAX / 2));
    let bytes = std::fs::read(&snaps[0]).unwrap();
    std::fs::write(&newer, &bytes[..bytes.len() / 2]).unwrap();
    let server = start(&["--data-dir".to_string(), dir.0.display().to_string()]);
    assert_eq!(table(server.addr, "movies"), movies);
    assert!(!newer.exists(), "the leftover is removed");
    assert!(
        server.log_text().contains("half-written"),
        "{}",
        server.log_text()
    );
}

#[test]
fn a_corrupt_middle_segment_stops_the_start_naming_the_file_and_offset() {
    let (dir, _) = populated(false, &["--segment-bytes".into(), "2048".into()]);
    let segments = files(&dir.0.join("wal"), ".wal");
    assert!(segments.len() >= 3, "{segments:?}");
    let middle = &segments[segments.len() / 2];
    let mut bytes = std::fs::read(middle).unwrap();
    let before = bytes.clone();
    bytes[20] ^= 0xff;
    std::fs::write(middle, &bytes).unwrap();
    let (code, text) = refused(&dir.0);
    assert_ne!(code, Some(0), "{text}");
    let name = middle.file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains(&name) && text.contains("offset"), "{text}");
    // Nothing was overwritten: the file is as the damage left it.
    assert_eq!(std::fs::read(middle).unwrap(), bytes);
    assert_ne!(bytes, before);
}

#[test]
fn a_torn_last_frame_is_cut_with_a_warning() {
    let (dir, movies) = populated(false, &[]);
    let segments = files(&dir.0.join("wal"), ".wal");
    let last = segments.last().unwrap();
    // Half a frame, as a crash mid-write leaves it.
    let mut bytes = std::fs::read(last).unwrap();
    bytes.extend_from_slice(&[0x40, 0, 0, 0, 1, 2, 3]);
    std::fs::write(last, &bytes).unwrap();
    let server = start(&["--data-dir".to_string(), dir.0.display().to_string()]);
    assert_eq!(table(server.addr, "movies"), movies);
    assert!(server.log_text().contains("torn"), "{}", server.log_text());
}

#[test]
fn a_second_server_on_the_same_directory_is_refused_naming_it() {
    let dir = TempDir::new();
    let first = start(&["--data-dir".to_string(), dir.0.display().to_string()]);
    let (code, text) = refused(&dir.0);
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains(&dir.0.display().to_string()) && text.contains("in use"),
        "{text}"
    );
    // The first one still serves.
    assert_eq!(http(first.addr, "GET", "/healthz", None).0, 200);
}

#[test]
fn disk_use_follows_snapshots_not_uptime() {
    let dir = TempDir::new();
    let flags = [
        "--data-dir",
        &dir.0.display().to_string(),
        "--segment-bytes",
        "8192",
        "--snapshot-bytes",
        "65536",
        "--event-retention",
        "500",
    ]
    .map(String::from);
    let mut server = start(&flags);
    // The same 100 movies rewritten over and over: the state (with the
    // retained change log) stays small while the log grows by megabytes.
    for round in 0..300 {
        let batch: Vec<Value> = (0..20)
            .map(|n| json!({"id": format!("m{}", (round * 20 + n) % 100), "title": format!("take {round}")}))
            .collect();
        assert_eq!(
            http(server.addr, "POST", "/raw/movies", Some(&json!(batch))).0,
            200
        );
    }
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=20000", None).0,
        200
    );
    // A snapshot may still be published after settle, removing segments
    // while the directory is read: read the report and the directory until
    // the report stands still around a whole reading.
    let (storage, appended) = (0..100)
        .find_map(|_| {
            let before = get(server.addr, "/storage");
            let sizes: Option<Vec<u64>> = std::fs::read_dir(dir.0.join("wal"))
                .unwrap()
                .map(|e| e.ok()?.metadata().ok().map(|m| m.len()))
                .collect();
            let after = get(server.addr, "/storage");
            (before == after).then_some(sizes.map(|s| (after, s.iter().sum::<u64>())))?
        })
        .expect("the report stood still around a reading of the directory");
    assert!(
        storage["last_snapshot"].is_object(),
        "snapshots were taken: {storage}"
    );
    assert_eq!(
        storage["log_bytes"].as_u64().unwrap(),
        appended,
        "{storage}"
    );
    // Counted once stopped: while running, a snapshot being published is
    // renamed in before the oldest is removed, and the last burst of writes
    // may not yet have its snapshot (one is taken at most every 200 ms),
    // while the shutdown takes one of everything. So first let the server
    // take the snapshot the last burst is due: settled, it has one once a
    // second has gone by since its last snapshot with none newer.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let storage = get(server.addr, "/storage");
        let taken = storage["last_snapshot"]["taken_at"]
            .as_str()
            .unwrap_or_default();
        let taken = chrono::DateTime::parse_from_rfc3339(taken).expect("a snapshot time");
        if chrono::Utc::now() - taken.to_utc() > chrono::Duration::seconds(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshots never stopped: {storage}"
        );
        thread::sleep(std::time::Duration::from_millis(50));
    }
    server.signal("TERM");
    server.wait_for_exit(DEADLINE);
    let snapshots = files(&dir.0.join("snap"), ".snap");
    assert!(snapshots.len() <= 2, "{snapshots:?}");
    // Everything logged is far more than 2 MiB (300 batches, each record
    // twice); what is kept is the log since the snapshot before the last.
    let kept: u64 = std::fs::read_dir(dir.0.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        kept < 1024 * 1024,
        "{kept} bytes of log kept; while running: {storage}"
    );
}

/// Asserts that every queue's counters add up.
fn counters_add_up(addr: SocketAddr) {
    for q in get(addr, "/queues")["queues"].as_array().unwrap() {
        let n = |k: &str| q[k].as_u64().unwrap();
        assert_eq!(
            n("enqueued"),
            n("processed") + n("dead_lettered") + n("depth") + n("in_flight") + n("retrying"),
            "{q}"
        );
    }
}

fn settled(addr: SocketAddr) {
    assert_eq!(http(addr, "GET", "/settle?timeout_ms=20000", None).0, 200);
}

#[test]
fn a_saga_survives_kill_9_compensated_and_is_published_by_a_redrive_after() {
    let dir = TempDir::new();
    let flags = durable_flags(&dir.0);
    let mut server = start(&flags);
    let fault = json!({"failure_rate": 1.0, "permanent": true});
    assert_eq!(
        http(server.addr, "PUT", "/faults/encode_handler", Some(&fault)).0,
        200
    );
    let video = json!({"id": "v1", "title": "V", "renditions": [
        {"id": "r1", "codec": "h264", "height": 720},
        {"id": "r2", "codec": "h264", "height": 1080}]});
    assert_eq!(
        http(server.addr, "POST", "/raw/videos", Some(&video)).0,
        200
    );
    settled(server.addr);
    let compensated = get(server.addr, "/tables/publications/v1")["data"].clone();
    assert_eq!(compensated["status"], "compensated");
    let letters = get(server.addr, "/queues/encode_queue/dead-letters")["dead_letters"].clone();
    assert!(!letters.as_array().unwrap().is_empty());

    // Killed: the compensation and its dead letters are on disk, and the
    // fault (kept in memory only) is gone.
    server.signal("KILL");
    server.wait_for_exit(DEADLINE);
    let mut server = start(&flags);
    settled(server.addr);
    assert_eq!(
        get(server.addr, "/tables/publications/v1")["data"],
        compensated
    );
    assert_eq!(
        get(server.addr, "/queues/encode_queue/dead-letters")["dead_letters"],
        letters
    );
    assert!(
        table(server.addr, "encodes").is_empty(),
        "the compensation's deletes held"
    );

    // A redrive starts attempt 2, which ends published.
    let (status, body) = http(
        server.addr,
        "POST",
        "/queues/encode_queue/dead-letters/redrive",
        None,
    );
    assert_eq!(status, 200, "{body}");
    settled(server.addr);
    let published = get(server.addr, "/tables/publications/v1")["data"].clone();
    assert_eq!(
        (published["status"].as_str(), published["attempt"].as_u64()),
        (Some("published"), Some(2))
    );
    let encodes = table(server.addr, "encodes");
    assert_eq!(encodes.len(), 2);
    counters_add_up(server.addr);

    // Killed again: the redriven letters stay finished, and nothing runs
    // again that would change the publication.
    server.signal("KILL");
    server.wait_for_exit(DEADLINE);
    let server = start(&flags);
    settled(server.addr);
    assert_eq!(
        get(server.addr, "/tables/publications/v1")["data"],
        published
    );
    let encode_queue = get(server.addr, "/queues")["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "encode_queue")
        .unwrap()
        .clone();
    assert_eq!(
        encode_queue["enqueued"], 0,
        "no job was owed again: {encode_queue}"
    );
    assert_eq!(table(server.addr, "encodes"), encodes);
    assert!(
        get(server.addr, "/queues/encode_queue/dead-letters")["dead_letters"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    counters_add_up(server.addr);
}
