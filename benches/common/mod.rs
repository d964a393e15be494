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

/// CPU used and CPU waited for over a stretch of time.
pub struct Usage {
    started: std::time::Instant,
    cpu: f64,
    waited: f64,
}

impl Usage {
    pub fn start() -> Self {
        Self {
            started: std::time::Instant::now(),
            cpu: cpu_seconds(),
            waited: runqueue_wait_seconds(),
        }
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
