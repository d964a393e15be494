//! Flags and environment: every flag has an `EVENTSYS_` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::engine::handler::{BreakerPolicy, RetryPolicy};
use crate::media::data_dir::StorageOptions;
use crate::media::pipeline::PipelineConfig;
use crate::media::scale_out::ScaleOut;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// When a write to the data directory counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Sync {
    /// After fsync: survives power loss.
    Always,
    /// After the write reaches the OS: survives a killed process.
    Never,
}

/// eventsys: see, learn and prototype event-driven pipelines.
#[derive(Clone, Debug, Parser)]
#[command(name = "eventsys", version, about, long_about = None)]
pub struct Config {
    /// Listen address (port 0 picks a free port and logs it).
    #[arg(long, env = "EVENTSYS_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Capacity of each queue.
    #[arg(long, env = "EVENTSYS_QUEUE_CAPACITY", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Concurrent raw_handler workers [default: number of cores; 32 with
    /// --nats-url, where a worker mostly waits on JetStream].
    #[arg(long, env = "EVENTSYS_RAW_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub raw_workers: Option<u16>,

    /// Concurrent encode_handler workers.
    #[arg(long, env = "EVENTSYS_ENCODE_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub encode_workers: u16,

    /// Simulated time of one encode job, in milliseconds.
    #[arg(long, env = "EVENTSYS_ENCODE_DELAY_MS", default_value_t = 200)]
    pub encode_delay_ms: u64,

    /// Attempts before an event is dead-lettered.
    #[arg(long, env = "EVENTSYS_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// First retry delay in milliseconds; doubles each attempt, with jitter.
    #[arg(long, env = "EVENTSYS_RETRY_BASE_MS", default_value_t = 100)]
    pub retry_base_ms: u64,

    /// Longest retry delay in milliseconds.
    #[arg(long, env = "EVENTSYS_RETRY_MAX_MS", default_value_t = 10_000)]
    pub retry_max_ms: u64,

    /// Consecutive transient failures that open a handler's circuit.
    #[arg(long, env = "EVENTSYS_BREAKER_THRESHOLD", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_threshold: u32,

    /// How long an open circuit waits before letting a probe through, in ms.
    #[arg(long, env = "EVENTSYS_BREAKER_COOLDOWN_MS", default_value_t = 2_000)]
    pub breaker_cooldown_ms: u64,

    /// Largest request body, in bytes.
    #[arg(long, env = "EVENTSYS_BODY_LIMIT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub body_limit_bytes: usize,

    /// Change-log events kept (more while a queue has not yet received them).
    #[arg(long, env = "EVENTSYS_EVENT_RETENTION", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub event_retention: u64,

    /// CloudEvent source+id pairs remembered for duplicate detection.
    #[arg(long, env = "EVENTSYS_DEDUP_WINDOW", default_value_t = 100_000)]
    pub dedup_window: usize,

    /// Dead letters kept per queue (the oldest are dropped, and logged, past it).
    #[arg(long, env = "EVENTSYS_MAX_DEAD_LETTERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_dead_letters: u64,

    /// Events outstanding in the queues ingest feeds (raw_queue, encode_queue,
    /// projection_queue)
    /// above which ingest answers 503.
    #[arg(long, env = "EVENTSYS_INGEST_BACKLOG_LIMIT", default_value_t = 100_000)]
    pub ingest_backlog_limit: u64,

    /// Ids each table keeps at most (live, deleted and hidden ones all
    /// count); ingest past it answers 507 and stores nothing.
    #[arg(long, env = "EVENTSYS_MAX_RECORDS", default_value_t = 10_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_records: u64,

    /// How long shutdown waits for the pipeline to drain (e.g. 10s, 500ms).
    #[arg(long, env = "EVENTSYS_SHUTDOWN_TIMEOUT", default_value = "10s")]
    pub shutdown_timeout: humantime::Duration,

    /// Requests handled at once; one more is answered 503 at once (live
    /// streams and /settle do not count).
    #[arg(long, env = "EVENTSYS_MAX_REQUESTS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests: u32,

    /// How long a request (its body included) may take before it is answered
    /// 408 (live streams and /settle excepted).
    #[arg(long, env = "EVENTSYS_REQUEST_TIMEOUT", value_parser = positive_duration,
          default_value = "30s")]
    pub request_timeout: humantime::Duration,

    /// Connections open at once; one more is answered 503 and closed.
    #[arg(long, env = "EVENTSYS_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// How long a client may take to send a request header, from its first
    /// byte, before its connection is closed.
    #[arg(long, env = "EVENTSYS_HEADER_READ_TIMEOUT", value_parser = positive_duration,
          default_value = "10s")]
    pub header_read_timeout: humantime::Duration,

    /// How long a connection may wait for its next request before it is
    /// closed.
    #[arg(long, env = "EVENTSYS_IDLE_TIMEOUT", value_parser = positive_duration,
          default_value = "60s")]
    pub idle_timeout: humantime::Duration,

    /// Keep the pipeline in this directory, so that it survives a restart
    /// (created if missing; one server per directory). Without it,
    /// everything is in memory.
    #[arg(long, env = "EVENTSYS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// With --data-dir: `always` answers a write only once it is fsynced
    /// (survives power loss); `never` once the OS has it (survives a killed
    /// process, not a lost machine).
    #[arg(long, env = "EVENTSYS_SYNC", value_enum, default_value_t = Sync::Always)]
    pub sync: Sync,

    /// With --data-dir: bytes after which the log starts a new segment.
    #[arg(long, env = "EVENTSYS_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub segment_bytes: u64,

    /// With --data-dir: bytes logged after which a snapshot is taken (and
    /// the segments before the one before it are deleted).
    #[arg(long, env = "EVENTSYS_SNAPSHOT_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_bytes: u64,

    /// Run on NATS JetStream at this URL (`nats://host:4222`, or several
    /// of a cluster separated by commas), sharing the pipeline with every
    /// eventsys on the same JetStream and prefix. Excludes --data-dir.
    #[arg(long, env = "EVENTSYS_NATS_URL", conflicts_with = "data_dir")]
    pub nats_url: Option<String>,

    /// With --nats-url: the prefix of every stream and consumer name
    /// (`<prefix>_state`, ...), so that several pipelines can share one
    /// NATS account. Letters, digits, `-` and `_`.
    #[arg(long, env = "EVENTSYS_NATS_PREFIX", default_value = "eventsys")]
    pub nats_prefix: String,

    /// With --nats-url: copies JetStream keeps of each message (3 on a
    /// three-node cluster, so that one node may fail).
    #[arg(long, env = "EVENTSYS_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,

    /// With --nats-url: how long an event taken by an instance that stops
    /// answering stays its own before another instance takes it.
    #[arg(long, env = "EVENTSYS_NATS_ACK_WAIT", value_parser = positive_duration,
          default_value = "30s")]
    pub nats_ack_wait: humantime::Duration,

    /// Callers and their roles: lines `name role token [source-prefix ...]`,
    /// roles `reader`, `producer`, `operator` (re-read on SIGHUP). Without
    /// it, the server binds loopback only and everyone is an operator.
    #[arg(long, env = "EVENTSYS_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Without --auth-tokens-file: serve a non-loopback --addr anyway, with
    /// everyone who can reach it an operator.
    #[arg(long, env = "EVENTSYS_INSECURE_OPEN")]
    pub insecure_open: bool,

    /// Serve HTTPS with this certificate chain (PEM; needs --tls-key).
    #[arg(long, env = "EVENTSYS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "EVENTSYS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "EVENTSYS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// A duration above zero (a zero timeout would refuse everything).
fn positive_duration(text: &str) -> Result<humantime::Duration, String> {
    let duration: humantime::Duration = text.parse().map_err(|e| format!("{e}"))?;
    if Duration::from(duration).is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

impl Default for Config {
    /// The defaults of every flag (environment variables still apply).
    fn default() -> Self {
        Self::parse_from(["eventsys"])
    }
}

/// raw_handler workers on JetStream unless `--raw-workers` says: each
/// write is a round trip there, so a worker spends most of its time
/// waiting, and a few per core keep the cores busy.
const SHARED_RAW_WORKERS: usize = 32;

impl Config {
    pub fn raw_workers(&self) -> usize {
        let cores = || std::thread::available_parallelism().map_or(2, |n| n.get());
        match (self.raw_workers, &self.nats_url) {
            (Some(workers), _) => workers.into(),
            (None, Some(_)) => SHARED_RAW_WORKERS.max(cores()),
            (None, None) => cores(),
        }
    }

    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout.into()
    }

    pub fn connection_limits(&self) -> crate::http::ConnectionLimits {
        crate::http::ConnectionLimits {
            max_connections: self.max_connections as usize,
            header_read_timeout: self.header_read_timeout.into(),
            idle_timeout: self.idle_timeout.into(),
            grace: self.shutdown_timeout(),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout.into()
    }

    /// Where and how the pipeline is kept on disk, if it is.
    pub fn storage(&self) -> Option<StorageOptions> {
        self.data_dir.as_ref().map(|dir| StorageOptions {
            dir: dir.clone(),
            sync: self.sync == Sync::Always,
            segment_bytes: self.segment_bytes,
            snapshot_bytes: self.snapshot_bytes,
        })
    }

    /// Where the pipeline's JetStream is, if it runs on one.
    pub fn scale_out(&self) -> Option<ScaleOut> {
        self.nats_url.as_ref().map(|url| ScaleOut {
            url: url.clone(),
            prefix: self.nats_prefix.clone(),
            replicas: self.nats_replicas.into(),
            connect_within: Duration::from_secs(5),
            ack_wait: self.nats_ack_wait.into(),
        })
    }

    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            queue_capacity: self.queue_capacity as usize,
            raw_workers: self.raw_workers(),
            encode_workers: self.encode_workers.into(),
            encode_delay: Duration::from_millis(self.encode_delay_ms),
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                base: Duration::from_millis(self.retry_base_ms),
                cap: Duration::from_millis(self.retry_max_ms.max(self.retry_base_ms)),
            },
            breaker: BreakerPolicy {
                threshold: self.breaker_threshold,
                cool_down: Duration::from_millis(self.breaker_cooldown_ms),
            },
            event_retention: usize::try_from(self.event_retention).unwrap_or(usize::MAX),
            max_dead_letters: usize::try_from(self.max_dead_letters).unwrap_or(usize::MAX),
            ingest_backlog_limit: self.ingest_backlog_limit,
            max_records: self.max_records,
            dedup_window: self.dedup_window,
        }
    }
}
