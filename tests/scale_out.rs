//! Many `eventsys` binaries on one JetStream (`--nats-url`): the same
//! tables everywhere, the work spread over them, nothing acknowledged lost
//! when an instance or a NATS node dies. The nats-server comes from
//! support/nats.rs (skipped without one, failing under `CI`).

#[path = "support/nats.rs"]
mod nats;
#[path = "support/server.rs"]
mod server;
#[path = "support/temp_dir.rs"]
mod temp_dir;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use nats::{NatsCluster, NatsServer};
use server::{Server, http, try_http};

/// One request of the workload: method, path, body.
type Request = (&'static str, String, Value);

fn at(second: u32) -> String {
    format!("2024-01-01T00:{:02}:{:02}Z", second / 60, second % 60)
}

/// A mixed load of the four scenarios with explicit versions, so that two
/// runs of it (in any order) must end in the same tables: actors and
/// movies naming them (1), series with their episodes (2), videos with
/// renditions to encode (3), reconciliations of actors (4), deletes, and
/// repeats and stale versions of all of them.
fn workload(seed: u64, n: usize) -> Vec<Request> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| {
            let when = rng.u32(0..600);
            let updated_at = at(when);
            match rng.u8(0..12) {
                0..=2 => {
                    let id = rng.u8(0..20);
                    let name = format!("Actor {}", rng.u8(0..3));
                    let body = json!({"id": format!("a{id}"), "name": name, "updated_at": updated_at});
                    ("POST", "/raw/actors".to_string(), body)
                }
                3..=5 => {
                    let id = rng.u8(0..20);
                    let cast: Vec<String> = (0..rng.usize(0..3))
                        .map(|_| format!("a{}", rng.u8(0..20)))
                        .collect();
                    let body = json!({"id": format!("m{id}"), "title": format!("Movie {}", rng.u8(0..3)),
                        "year": 1990 + u32::from(rng.u8(0..20)), "actor_ids": cast,
                        "updated_at": updated_at});
                    ("POST", "/raw/movies".to_string(), body)
                }
                6 | 7 => {
                    let id = rng.u8(0..6);
                    let episodes: Vec<Value> = (1..=rng.u8(0..4))
                        .map(|k| json!({"id": format!("s{id}e{k}"), "title": format!("E{k}"),
                            "season": 1, "number": k}))
                        .collect();
                    let body = json!({"id": format!("s{id}"), "title": format!("Series {}", rng.u8(0..3)),
                        "episodes": episodes, "updated_at": updated_at});
                    ("POST", "/raw/series".to_string(), body)
                }
                8 | 9 => {
                    let id = rng.u8(0..8);
                    let renditions: Vec<Value> = (0..rng.u8(0..3))
                        .map(|k| json!({"id": format!("r{k}"), "codec": "h264",
                            "height": 360 * (u32::from(k) + 1)}))
                        .collect();
                    let body = json!({"id": format!("v{id}"), "title": format!("Video {}", rng.u8(0..3)),
                        "renditions": renditions, "updated_at": updated_at});
                    ("POST", "/raw/videos".to_string(), body)
                }
                10 => {
                    let path = format!("/raw/movies/m{}?version={updated_at}", rng.u8(0..20));
                    ("DELETE", path, Value::Null)
                }
                _ => {
                    // Early, so that later writes outlive it.
                    let as_of = at(rng.u32(0..200));
                    let mut records = Vec::new();
                    for id in 0..20 {
                        if rng.u8(0..3) != 0 {
                            records.push(json!({"id": format!("a{id}"), "name": "Listed",
                                "updated_at": at(rng.u32(0..200))}));
                        }
                    }
                    let body = json!({"as_of": as_of, "records": records});
                    ("PUT", "/raw/actors".to_string(), body)
                }
            }
        })
        .collect()
}

/// Sends one request; panics unless it is a 2xx.
fn send(addr: SocketAddr, (method, path, body): &Request) {
    let body = (!body.is_null()).then_some(body);
    let (status, text) = http(addr, method, path, body);
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {text}"
    );
}

/// A GET that, like a client honouring `Retry-After`, asks again while
/// JetStream cannot answer (a node lost, a leader being elected), for up
/// to 30 s.
fn get(addr: SocketAddr, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = http(addr, "GET", path, None);
        if status == 503 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        assert_eq!(status, 200, "GET {path}: {text}");
        return serde_json::from_str(&text).expect("JSON");
    }
}

fn settle(addr: SocketAddr) {
    let (status, text) = http(addr, "GET", "/settle?timeout_ms=120000", None);
    assert_eq!(status, 200, "settle: {text}");
}

/// Every live record of `table`, as id -> data, paging through.
fn table(addr: SocketAddr, name: &str) -> BTreeMap<String, Value> {
    let mut records = BTreeMap::new();
    let mut after = String::new();
    loop {
        let page = get(addr, &format!("/tables/{name}?limit=1000&after={after}"));
        for record in page["records"].as_array().expect("records") {
            let id = record["id"].as_str().expect("an id").to_string();
            records.insert(id, record["data"].clone());
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => return records,
        }
    }
}

/// Every table a JetStream instance keeps but the audit trail (whose ids
/// and times are each request's own), with its records.
fn tables(addr: SocketAddr) -> BTreeMap<String, BTreeMap<String, Value>> {
    get(addr, "/tables")["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| t["name"].as_str().expect("a name").to_string())
        .filter(|name| name != "audit")
        .map(|name| {
            let records = table(addr, &name);
            (name, records)
        })
        .collect()
}

/// A queue of an instance's `/queues`.
fn queue(addr: SocketAddr, name: &str) -> Value {
    get(addr, "/queues")["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no queue {name}"))
}

fn instance(url: &str, prefix: &str, extra: &[&str]) -> Server {
    let delay = if extra.contains(&"--encode-delay-ms") {
        &[][..]
    } else {
        &["--encode-delay-ms", "2"][..]
    };
    let mut flags = vec![
        "--nats-url",
        url,
        "--nats-prefix",
        prefix,
        "--retry-base-ms",
        "5",
        "--retry-max-ms",
        "50",
    ];
    flags.extend_from_slice(delay);
    flags.extend_from_slice(extra);
    Server::start(&flags)
}

#[test]
fn three_instances_share_one_pipeline_and_agree_with_memory() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let instances: Vec<Server> = (0..3).map(|_| instance(&nats.url, "three", &[])).collect();
    let addrs: Vec<SocketAddr> = instances.iter().map(|s| s.addr).collect();
    let load = workload(11, 600);
    // Three clients at once, each sending its share round-robin over the
    // instances.
    thread::scope(|scope| {
        for client in 0..3 {
            let (load, addrs) = (&load, &addrs);
            scope.spawn(move || {
                for (k, request) in load.iter().enumerate().skip(client).step_by(3) {
                    send(addrs[k % addrs.len()], request);
                }
            });
        }
    });
    settle(addrs[0]);
    let memory = Server::start(&["--encode-delay-ms", "2"]);
    // The same writes, one at a time, in reverse.
    for request in load.iter().rev() {
        send(memory.addr, request);
    }
    settle(memory.addr);

    let shared = tables(addrs[0]);
    assert!(shared["movies"].len() > 5, "{:?}", shared["movies"]);
    assert!(shared["episodes"].len() > 3, "{:?}", shared["episodes"]);
    assert!(shared["encodes"].len() > 3, "{:?}", shared["encodes"]);
    // Every instance keeps scenario 5's views of the whole log.
    assert!(
        shared["filmography"].len() > 3,
        "{:?}",
        shared["filmography"]
    );
    assert!(
        shared["series_overview"].len() > 1,
        "{:?}",
        shared["series_overview"]
    );
    // And scenario 6's saga: with no faults, every live video published.
    let publications = &shared["publications"];
    assert!(publications.len() > 3, "{publications:?}");
    assert_eq!(publications.len(), shared["videos"].len());
    assert!(
        publications.values().all(|p| p["status"] == "published"),
        "{publications:?}"
    );
    for (n, addr) in addrs.iter().enumerate() {
        settle(*addr);
        assert_eq!(
            tables(*addr),
            shared,
            "instance {n} differs from instance 0"
        );
    }
    for (name, records) in &shared {
        assert_eq!(
            &table(memory.addr, name),
            records,
            "`{name}` differs from the in-memory run"
        );
    }
    let mut processed = 0;
    for (n, addr) in addrs.iter().enumerate() {
        let raw = queue(*addr, "raw_queue");
        let mine = raw["processed"].as_u64().expect("processed");
        assert!(mine > 0, "instance {n}'s workers took none of raw_queue");
        assert_eq!(raw["cluster"]["pending"], 0);
        assert_eq!(raw["cluster"]["in_flight"], 0);
        processed += mine;
    }
    let memory_raw = queue(memory.addr, "raw_queue");
    assert!(
        processed >= memory_raw["processed"].as_u64().expect("processed"),
        "the instances processed {processed} raw changes in all, fewer than memory's {memory_raw}"
    );
}

/// Scenario 6 over two instances, which both take every step of the saga:
/// a dead-lettered job compensates once (one attempt, whoever sees it
/// first), a redrive through one instance starts one new attempt for every
/// video (each job run once), and a newer version supersedes it on both.
#[test]
fn two_instances_run_one_saga() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let instances: Vec<Server> = (0..2).map(|_| instance(&nats.url, "saga", &[])).collect();
    let addrs: Vec<SocketAddr> = instances.iter().map(|s| s.addr).collect();
    let fault = json!({"failure_rate": 1.0, "permanent": true});
    for addr in &addrs {
        let (status, text) = http(*addr, "PUT", "/faults/encode_handler", Some(&fault));
        assert_eq!(status, 200, "{text}");
    }
    let videos = 12;
    let video = |n: usize, height: u32| {
        json!({"id": format!("v{n}"), "title": "V", "renditions": [
            {"id": "a", "codec": "h264", "height": height},
            {"id": "b", "codec": "av1", "height": 2 * height}]})
    };
    thread::scope(|scope| {
        for n in 0..videos {
            let (addrs, body) = (&addrs, video(n, 360));
            scope.spawn(move || send(addrs[n % 2], &("POST", "/raw/videos".into(), body)));
        }
    });
    settle(addrs[0]);
    settle(addrs[1]);
    let attempts = |addr: SocketAddr, status: &str, attempt: u64| {
        let publications = table(addr, "publications");
        assert_eq!(publications.len(), videos, "{publications:?}");
        for (id, p) in &publications {
            assert_eq!(
                (p["status"].as_str(), p["attempt"].as_u64()),
                (Some(status), Some(attempt)),
                "{id}: {p}"
            );
        }
    };
    for addr in &addrs {
        attempts(*addr, "compensated", 1);
        assert!(table(*addr, "encodes").is_empty(), "compensated");
    }
    let letters = get(addrs[0], "/queues/encode_queue/dead-letters")["dead_letters"].clone();
    let letters = letters.as_array().expect("dead letters");
    assert_eq!(letters.len(), 2 * videos, "each job dead-lettered once");

    // Faults off, the letters redriven through one instance.
    for addr in &addrs {
        let (status, text) = http(*addr, "DELETE", "/faults/encode_handler", None);
        assert_eq!(status, 200, "{text}");
    }
    let (status, text) = http(
        addrs[1],
        "POST",
        "/queues/encode_queue/dead-letters/redrive",
        None,
    );
    assert_eq!(status, 200, "{text}");
    settle(addrs[0]);
    settle(addrs[1]);
    for addr in &addrs {
        attempts(*addr, "published", 2);
        assert_eq!(table(*addr, "encodes").len(), 2 * videos);
    }
    let processed: u64 = (addrs.iter())
        .map(|addr| queue(*addr, "encode_queue")["processed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        processed,
        2 * videos as u64,
        "the new attempt's jobs ran once each"
    );

    // A newer version of every video supersedes attempt 2, from the change
    // log alone: both instances agree on it.
    for n in 0..videos {
        send(addrs[n % 2], &("POST", "/raw/videos".into(), video(n, 480)));
    }
    settle(addrs[0]);
    settle(addrs[1]);
    let mine = table(addrs[0], "publications");
    assert_eq!(
        mine,
        table(addrs[1], "publications"),
        "both instances agree"
    );
    for (id, p) in &mine {
        assert_eq!(
            (
                p["status"].as_str(),
                p["done"].as_u64(),
                p["total"].as_u64()
            ),
            (Some("published"), Some(2), Some(2)),
            "{id}: {p}"
        );
    }
    let encodes = table(addrs[1], "encodes");
    assert!(
        encodes
            .values()
            .all(|e| e["height"] == 480 || e["height"] == 960),
        "{encodes:?}"
    );
    let letters = get(addrs[0], "/queues/encode_queue/dead-letters")["dead_letters"].clone();
    assert!(letters.as_array().expect("dead letters").is_empty());
}

/// Writes videos from clients until stopped, recording each one
/// acknowledged (id -> renditions).
struct Writer {
    acked: Arc<Mutex<BTreeMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    clients: Vec<thread::JoinHandle<()>>,
}

impl Writer {
    fn start(addrs: Vec<SocketAddr>, kind: &'static str) -> Writer {
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let clients = (0..3)
            .map(|client| {
                let (acked, stop, sent, addrs) =
                    (acked.clone(), stop.clone(), sent.clone(), addrs.clone());
                thread::spawn(move || {
                    let mut k = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        let id = format!("c{client}n{k}");
                        let (body, renditions) = match kind {
                            "videos" => (
                                json!({"id": id, "title": "V", "renditions": [
                                    {"id": "r0", "codec": "h264", "height": 360},
                                    {"id": "r1", "codec": "h264", "height": 720}]}),
                                2,
                            ),
                            _ => (json!({"id": id, "title": format!("T{k}")}), 0),
                        };
                        let addr = addrs[k % addrs.len()];
                        let path = format!("/raw/{kind}");
                        let reply =
                            try_http(addr, "POST", &path, "application/json", &body.to_string());
                        sent.fetch_add(1, Ordering::Relaxed);
                        if matches!(reply, Ok((200, _))) {
                            acked.lock().expect("acked").insert(id, renditions);
                        }
                    }
                })
            })
            .collect();
        Writer {
            acked,
            stop,
            sent,
            clients,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits until `n` more writes are acknowledged (or 60 s passed).
    fn wait_for(&self, n: usize) {
        let target = self.acked() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < target && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(self.acked() >= target, "writes stopped being acknowledged");
    }

    fn finish(self) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().expect("client");
        }
        assert!(self.sent.load(Ordering::Relaxed) > 0);
        Arc::try_unwrap(self.acked)
            .expect("clients joined")
            .into_inner()
            .expect("acked")
    }
}

/// Every acknowledged video is there through `addr`, with every rendition
/// encoded, and nothing waits, runs or was given up on.
fn everything_acknowledged_is_done(addr: SocketAddr, acked: &BTreeMap<String, usize>) {
    let videos = table(addr, "videos");
    let encodes = table(addr, "encodes");
    for (id, renditions) in acked {
        assert!(videos.contains_key(id), "acknowledged video {id} is lost");
        for r in 0..*renditions {
            let encode = encodes
                .get(&format!("{id}:r{r}"))
                .unwrap_or_else(|| panic!("{id}'s rendition r{r} was never encoded"));
            assert_eq!(encode["status"], "encoded", "{encode}");
        }
    }
    for name in ["raw_queue", "encode_queue"] {
        let q = queue(addr, name);
        assert_eq!(q["cluster"]["pending"], 0, "{q}");
        assert_eq!(q["cluster"]["in_flight"], 0, "{q}");
        assert_eq!(q["dead_letters"], 0, "{q}");
        // This instance holds nothing either, and its counters add up.
        assert_eq!(q["depth"], 0, "{q}");
        assert_eq!(q["in_flight"], 0, "{q}");
        assert_eq!(q["retrying"], 0, "{q}");
        let n = |k: &str| q[k].as_u64().unwrap_or_else(|| panic!("{k} in {q}"));
        assert_eq!(n("enqueued"), n("processed") + n("dead_lettered"), "{q}");
    }
}

#[test]
fn an_instance_killed_mid_work_has_its_events_finished_by_the_others() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    // Slow encodes, so that the victim holds some when it dies, and a short
    // ack wait, so that they go to the others soon after.
    let slow = ["--encode-delay-ms", "300", "--nats-ack-wait", "2s"];
    let mut instances: Vec<Server> = (0..3).map(|_| instance(&nats.url, "kill", &slow)).collect();
    let addrs: Vec<SocketAddr> = instances.iter().map(|s| s.addr).collect();
    let writer = Writer::start(addrs.clone(), "videos");
    writer.wait_for(30);
    // The victim has encodes in flight now.
    let victim = addrs[2];
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue(victim, "encode_queue")["in_flight"] == 0 {
        assert!(Instant::now() < deadline, "the victim never took an encode");
        thread::sleep(Duration::from_millis(5));
    }
    instances[2].signal("KILL");
    instances[2].wait_for_exit(Duration::from_secs(10));
    // Writes through the other two go on meanwhile.
    let survivors = Writer::start(addrs[..2].to_vec(), "videos");
    survivors.wait_for(10);
    let mut acked = writer.finish();
    acked.extend(survivors.finish());

    for addr in &addrs[..2] {
        settle(*addr);
        everything_acknowledged_is_done(*addr, &acked);
    }
    // The survivors took over what the victim held (not retries: no
    // handler failed).
    let encodes: Vec<Value> = addrs[..2]
        .iter()
        .map(|a| queue(*a, "encode_queue"))
        .collect();
    let taken_again: u64 = encodes
        .iter()
        .map(|q| q["taken_again"].as_u64().expect("taken_again"))
        .sum();
    assert!(
        taken_again > 0,
        "the victim's encodes were not taken again: {encodes:?}"
    );
    for q in &encodes {
        assert_eq!(q["retried"], 0, "{q}");
    }
    assert_eq!(table(addrs[0], "videos"), table(addrs[1], "videos"));
}

#[test]
fn a_three_node_cluster_loses_a_node_mid_load_and_nothing_acknowledged() {
    let Some(mut cluster) = NatsCluster::start() else {
        return;
    };
    // Acks sent to the node that dies are lost with it: those events come
    // back after the ack wait, kept short here.
    let replicated = [
        "--nats-replicas",
        "3",
        "--request-timeout",
        "20s",
        "--nats-ack-wait",
        "5s",
    ];
    let instances: Vec<Server> = (0..2)
        .map(|_| instance(&cluster.urls, "r3", &replicated))
        .collect();
    let addrs: Vec<SocketAddr> = instances.iter().map(|s| s.addr).collect();
    let writer = Writer::start(addrs.clone(), "movies");
    writer.wait_for(100);
    cluster.kill(0);
    writer.wait_for(100);
    let acked = writer.finish();

    for addr in &addrs {
        settle(*addr);
        let (raw, movies) = (table(*addr, "raw_movies"), table(*addr, "movies"));
        for id in acked.keys() {
            assert!(
                raw.contains_key(id),
                "acknowledged movie {id} is lost through {addr}"
            );
            assert!(
                movies.contains_key(id),
                "acknowledged movie {id} was never processed (seen through {addr}): {:?}",
                queue(*addr, "raw_queue")
            );
        }
        // NATS out of reach is waited out, not given up on.
        let raw = queue(*addr, "raw_queue");
        assert_eq!(raw["cluster"]["pending"], 0, "{raw}");
        assert_eq!(raw["cluster"]["in_flight"], 0, "{raw}");
        assert_eq!(raw["dead_letters"], 0, "{raw}");
    }
}
