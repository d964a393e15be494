//! What the bench binaries share: knobs from the environment, and what
//! `/proc` says about this process (memory, CPU used, time spent waiting
//! for a CPU) so that every figure says whether the machine was busy.

#![allow(dead_code)] // Each bench uses its own part of this.

/// A number from the environment (`_` separators allowed), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// A runtime whose threads are named `name` (so a profile can tell the
/// servers from the client).
pub fn runtime(workers: usize, name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Resident memory of this process (`VmRSS`), in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time this process has used (user + system), in seconds.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is
    // the 12th and stime the 13th, in clock ticks of 1/100 s.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields
        .get(11)
        .zip(fields.get(12))
        .map_or(0.0, |(u, s)| (u + s) as f64 / 100.0)
}

/// Per-thread figures summed over this process's threads.
fn per_thread(file: &str, pick: impl Fn(&str) -> u64) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join(file)).ok())
        .map(|text| pick(&text))
        .sum()
}

/// Context switches of every thread of this process so far.
pub fn context_switches() -> u64 {
    per_thread("status", |status| {
        status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    })
}

/// Time this process's threads spent runnable but waiting for a CPU
/// (`/proc/self/task/*/schedstat`), in seconds: non-zero when something
/// else on the machine (a compile, another bench) took the cores.
pub fn runqueue_wait_seconds() -> f64 {
    per_thread("schedstat", |s| {
        s.split_whitespace()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or(0)
    }) as f64
        / 1e9
}

/// The machine's load average, as `/proc/loadavg` shows it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// CPU used, context switches and CPU waited for over a stretch of time.
pub struct Usage {
    started: std::time::Instant,
    cpu: f64,
    switches: u64,
    waited: f64,
}

impl Usage {
    pub fn start() -> Self {
        Self {
            started: std::time::Instant::now(),
            cpu: cpu_seconds(),
            switches: context_switches(),
            waited: runqueue_wait_seconds(),
        }
    }

    /// `(CPU seconds, context switches, seconds waited for a CPU)` since
    /// [`Usage::start`].
    pub fn spent(&self) -> (f64, u64, f64) {
        (
            cpu_seconds() - self.cpu,
            context_switches() - self.switches,
            runqueue_wait_seconds() - self.waited,
        )
    }

    /// `(cores busy, cores waited for)` since [`Usage::start`].
    pub fn cores(&self) -> (f64, f64) {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        (
            (cpu_seconds() - self.cpu) / wall,
            (runqueue_wait_seconds() - self.waited) / wall,
        )
    }
}

pub mod plain {
    //! Scenario 1's work with the least machinery, as a floor: a
    //! `Mutex<HashMap>` per raw kind keeps the newest version of each
    //! record; the real changes go over a bounded tokio `mpsc`, up to
    //! [`CHUNK`] per message (as eventsys's dispatchers move them), to
    //! consumer tasks that standardise it with eventsys's own
    //! `standardise` into a `Mutex<HashMap>` per standard kind. No change
    //! log, cursors, retries, dead letters, admission, metrics or settle
    //! tracking beyond two counters.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use eventsys::engine::record::{Data, RecordId, Version};
    use eventsys::engine::table::Write;
    use eventsys::media::records::{Kind, standardise};
    use tokio::sync::{Notify, mpsc};

    type Map = Mutex<HashMap<RecordId, (Version, Data)>>;

    /// Changes per channel message.
    pub const CHUNK: usize = 256;

    pub struct Pipeline {
        raw: [Map; 2],
        standard: [Map; 2],
        send: mpsc::Sender<(Kind, Vec<Write>)>,
        sent: AtomicU64,
        done: AtomicU64,
        idle: Notify,
    }

    fn index(kind: Kind) -> usize {
        match kind {
            Kind::Movies => 0,
            Kind::Actors => 1,
            other => panic!("the floor takes movies and actors, not {other}"),
        }
    }

    /// A plain map's write, with eventsys's version rule: newest version
    /// wins, equal data is no change (though a newer version is still
    /// recorded). Returns whether the data changed.
    fn write(map: &mut HashMap<RecordId, (Version, Data)>, write: &Write) -> bool {
        match map.get_mut(&write.id) {
            Some((version, data)) if *data == write.data => {
                if write.version > *version {
                    *version = write.version.clone();
                }
                false
            }
            Some((version, _)) if write.version <= *version => false,
            Some(entry) => {
                *entry = (write.version.clone(), write.data.clone());
                true
            }
            None => {
                map.insert(
                    write.id.clone(),
                    (write.version.clone(), write.data.clone()),
                );
                true
            }
        }
    }

    impl Pipeline {
        /// Starts `workers` consumers on the current tokio runtime, fed by
        /// a channel that holds about `capacity` changes.
        pub fn start(workers: usize, capacity: usize) -> Arc<Self> {
            let (send, receive) = mpsc::channel(capacity.div_ceil(CHUNK));
            let pipeline = Arc::new(Self {
                raw: Default::default(),
                standard: Default::default(),
                send,
                sent: AtomicU64::new(0),
                done: AtomicU64::new(0),
                idle: Notify::new(),
            });
            let receive = Arc::new(tokio::sync::Mutex::new(receive));
            for _ in 0..workers {
                let pipeline = pipeline.clone();
                let receive = receive.clone();
                tokio::spawn(async move {
                    loop {
                        let Some((kind, chunk)) = receive.lock().await.recv().await else {
                            return;
                        };
                        let n = chunk.len() as u64;
                        for raw in chunk {
                            pipeline.standardise(kind, raw);
                        }
                        if pipeline.done.fetch_add(n, Ordering::AcqRel) + n
                            == pipeline.sent.load(Ordering::Acquire)
                        {
                            pipeline.idle.notify_waiters();
                        }
                        tokio::task::yield_now().await;
                    }
                });
            }
            pipeline
        }

        fn standardise(&self, kind: Kind, raw: Write) {
            let data = standardise(kind, &raw.id, &raw.data, &[]).expect("standardises");
            let standard = Write { data, ..raw };
            write(
                &mut self.standard[index(kind)].lock().expect("not poisoned"),
                &standard,
            );
        }

        /// Writes `writes` to the raw map of `kind` and queues the real
        /// changes, waiting while the channel is full; returns whether
        /// each changed the map.
        pub async fn ingest(&self, kind: Kind, writes: Vec<Write>) -> Vec<bool> {
            let (mut changed, outcomes): (Vec<Write>, Vec<bool>) = {
                let mut map = self.raw[index(kind)].lock().expect("not poisoned");
                let outcomes: Vec<bool> = writes.iter().map(|w| write(&mut map, w)).collect();
                let changed = writes
                    .into_iter()
                    .zip(&outcomes)
                    .filter_map(|(w, changed)| changed.then_some(w))
                    .collect();
                (changed, outcomes)
            };
            self.sent.fetch_add(changed.len() as u64, Ordering::AcqRel);
            while !changed.is_empty() {
                let rest = changed.split_off(CHUNK.min(changed.len()));
                let chunk = std::mem::replace(&mut changed, rest);
                self.send.send((kind, chunk)).await.expect("consumers run");
            }
            outcomes
        }

        /// Waits until every queued change is standardised.
        pub async fn settle(&self) {
            loop {
                let idle = self.idle.notified();
                if self.done.load(Ordering::Acquire) == self.sent.load(Ordering::Acquire) {
                    return;
                }
                idle.await;
            }
        }

        fn maps(&self) -> impl Iterator<Item = &Map> {
            self.raw.iter().chain(&self.standard)
        }

        /// Live records in the raw maps and in the standard maps.
        pub fn live(&self) -> (usize, usize) {
            let count = |maps: &[Map]| -> usize {
                maps.iter()
                    .map(|m| m.lock().expect("not poisoned").len())
                    .sum()
            };
            (count(&self.raw), count(&self.standard))
        }

        /// The JSON every live record holds, raw and standard.
        pub fn stored_json_bytes(&self) -> usize {
            self.maps()
                .map(|m| {
                    let m = m.lock().expect("not poisoned");
                    m.values().map(|(_, d)| d.len()).sum::<usize>()
                })
                .sum()
        }
    }
}
