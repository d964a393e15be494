//! The pipeline on a data directory (`--data-dir`): rebuilt from disk
//! before the port opens, snapshotted on a background task, and reported
//! by `GET /storage`.
//!
//! ```text
//! DIR/LOCK                     one server per directory
//! DIR/wal/<first-lsn>.wal      the write-ahead log of effects
//! DIR/snap/<lsn>.snap          the state as of log frame <lsn> (two kept)
//! ```
//!
//! A restart reads the newest good snapshot, then every log frame after
//! it. Frames are effects (an entry as it was after a write, with the
//! change it emitted), so applying one twice leaves the state as once, and
//! a snapshot copied while writes go on is made whole by the frames after
//! its position.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::QueueView;
use crate::engine::children::Children;
use crate::engine::dedup::DedupKey;
use crate::engine::log::{Cause, Change};
use crate::engine::record::{RecordId, Timestamp};
use crate::engine::table::Table;
use crate::storage::commit::Committer;
use crate::storage::disk::{Disk, FsDisk};
use crate::storage::effect::{
    self, AppliedFrame, ChangeImage, Correlations, CurrentFrame, CursorFrame, DedupFrame,
    EventImage, HeaderFrame, PutFrame,
};
use crate::storage::frame;
use crate::storage::journal::Journal;
use crate::storage::lock::{DirLock, LockError};
use crate::storage::snapshot::{self, ReadError};
use crate::storage::wal::{OpenError, Poisoned, Recovered, Wal};

use super::pipeline::Pipeline;

/// How the data directory is written.
#[derive(Clone, Debug)]
pub struct StorageOptions {
    pub dir: PathBuf,
    /// Whether a commit waits for fsync (`--sync always`) or leaves the
    /// bytes to the OS (`--sync never`: survives `kill -9`, not power loss).
    pub sync: bool,
    /// A new log segment starts once the current one holds this many bytes.
    pub segment_bytes: u64,
    /// A snapshot is taken once this many bytes were logged since the last.
    pub snapshot_bytes: u64,
}

/// Why the server cannot start on its data directory. Nothing on disk was
/// overwritten.
#[derive(Debug, thiserror::Error)]
pub enum OpenFailure {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{}: {error}", .dir.display())]
    Io { dir: PathBuf, error: io::Error },
    #[error("{}/{error}", .dir.display())]
    Log { dir: PathBuf, error: OpenError },
    #[error("{}: {damage}", .file.display())]
    Snapshot {
        file: PathBuf,
        damage: frame::Damage,
    },
    #[error("{place}: {error}")]
    Frame { place: String, error: String },
}

/// A snapshot on disk.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SnapshotInfo {
    /// The last log frame it holds.
    pub lsn: u64,
    /// The last change sequence it holds.
    pub seq: u64,
    pub bytes: u64,
    #[schema(value_type = String)]
    pub taken_at: Timestamp,
    /// Seconds it took to copy and write.
    pub seconds: f64,
    /// Log bytes appended since start when it was taken.
    #[serde(skip)]
    appended_bytes: u64,
}

/// What the last start read back.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RecoveryInfo {
    /// Snapshot and log frames applied.
    pub frames: u64,
    /// Changes in the log after recovery.
    pub events: u64,
    pub seconds: f64,
}

/// `GET /storage` on a data directory.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DiskReport {
    pub dir: String,
    /// `always` or `never`.
    pub sync: &'static str,
    /// Bytes of log segments and snapshots.
    pub bytes: u64,
    pub log_bytes: u64,
    pub snapshot_bytes: u64,
    pub segments: usize,
    pub last_snapshot: Option<SnapshotInfo>,
    /// The last log frame on disk.
    pub durable_lsn: u64,
    /// Why nothing more is acknowledged, once a write or fsync failed.
    pub error: Option<String>,
    pub recovery: RecoveryInfo,
}

pub struct DataDir {
    options: StorageOptions,
    _lock: DirLock,
    journal: Arc<Journal>,
    snaps: Arc<FsDisk>,
    last: Mutex<Option<SnapshotInfo>>,
    /// One snapshot at a time.
    taking: tokio::sync::Mutex<()>,
    recovery: RecoveryInfo,
}

/// Routes frames to the part of the pipeline they belong to.
struct Restorer<'d, 'p> {
    pipeline: &'p Pipeline,
    /// Parses frames, and knows the tables they name.
    decoder: &'d Decoder<'p>,
    queues: HashMap<&'p str, &'p Arc<dyn QueueView>>,
    children: HashMap<&'p str, &'p Arc<Children>>,
    cursors: HashMap<String, u64>,
    header: Option<HeaderFrame>,
    frames: u64,
    correlations: Correlations,
}

#[derive(Deserialize)]
struct QueueName {
    q: String,
}

impl<'d, 'p> Restorer<'d, 'p> {
    fn new(pipeline: &'p Pipeline, decoder: &'d Decoder<'p>) -> Self {
        let engine = &pipeline.engine;
        Self {
            pipeline,
            decoder,
            queues: engine.queues().iter().map(|q| (q.name(), q)).collect(),
            children: pipeline
                .children()
                .map(|c| (c.listing.name().as_ref(), c))
                .collect(),
            cursors: HashMap::new(),
            header: None,
            frames: 0,
            correlations: Correlations::default(),
        }
    }

    fn table(&self, name: &str) -> Result<&'p Arc<Table>, String> {
        (self.decoder.tables)
            .get(name)
            .copied()
            .ok_or_else(|| format!("a frame of table {name}, which this pipeline does not have"))
    }

    fn apply(&mut self, frame: Decoded) -> Result<(), String> {
        self.frames += 1;
        let log = &self.pipeline.engine.log;
        match frame {
            Decoded::Put(put, change) => {
                let table = self.table(&put.t)?;
                let id = RecordId::derived(put.id);
                if let Some(change) =
                    table.restore_put(id, put.e, change, &mut self.correlations)?
                {
                    log.restore(change);
                }
            }
            Decoded::Current(frame) => {
                self.table(&frame.t)?
                    .restore_current(frame.a.get()?, frame.ids);
            }
            Decoded::Dedup(key) => self.pipeline.dedup.restore(DedupKey::from_bytes(key)),
            Decoded::Applied(frame) => {
                let children = self.children.get(frame.t.as_str()).ok_or_else(|| {
                    format!(
                        "child listings of {}, which this pipeline does not have",
                        frame.t
                    )
                })?;
                children.restore(frame)?;
            }
            Decoded::Queue {
                q,
                kind,
                lsn,
                payload,
            } => {
                let queue = self.queues.get(q.as_str()).ok_or_else(|| {
                    format!("a frame of queue {q}, which this pipeline does not have")
                })?;
                queue.restore(kind, lsn, &payload)?;
            }
            Decoded::Header(header) => {
                log.restore_next_seq(header.next_seq);
                self.header = Some(header);
            }
            Decoded::Event(change) => log.restore_event(*change),
            Decoded::Cursor(frame) => {
                self.cursors.insert(frame.q, frame.cursor);
            }
        }
        Ok(())
    }

    /// Applies `frames` in order while two threads decode the ones after
    /// (decoding is most of a recovery's work); `place` names where a frame
    /// is, for an error.
    fn apply_all<F: Frame>(
        &mut self,
        frames: &[F],
        place: impl Fn(&F) -> String,
        progress: &mut Progress,
    ) -> Result<(), OpenFailure> {
        const CHUNK: usize = 2048;
        const DECODERS: usize = 2;
        let decoder = self.decoder;
        std::thread::scope(|scope| {
            // Two decoders take alternate chunks; the chunks are applied
            // in order, taking turns between them.
            let decoders: Vec<_> = (0..DECODERS)
                .map(|first| {
                    let (sender, decoded) = std::sync::mpsc::sync_channel(2);
                    scope.spawn(move || {
                        let mut correlations = Correlations::default();
                        for chunk in frames.chunks(CHUNK).skip(first).step_by(DECODERS) {
                            let batch: Vec<Result<Decoded, String>> = chunk
                                .iter()
                                .map(|f| {
                                    decoder.decode(
                                        f.kind(),
                                        f.lsn(),
                                        f.payload(),
                                        &mut correlations,
                                    )
                                })
                                .collect();
                            if sender.send(batch).is_err() {
                                return;
                            }
                        }
                    });
                    decoded
                })
                .collect();
            let decoded = (0..frames.len().div_ceil(CHUNK))
                .map_while(|index| decoders[index % DECODERS].recv().ok());
            for (index, batch) in decoded.enumerate() {
                for (offset, frame) in batch.into_iter().enumerate() {
                    let failed = |error| OpenFailure::Frame {
                        place: place(&frames[index * CHUNK + offset]),
                        error,
                    };
                    self.apply(frame.map_err(failed)?).map_err(failed)?;
                    progress.tick(self.frames);
                }
            }
            Ok(())
        })
    }
}

/// A frame read back, with where it came from.
trait Frame: Sync {
    fn kind(&self) -> u8;
    /// Its LSN (0 in a snapshot).
    fn lsn(&self) -> u64;
    fn payload(&self) -> &[u8];
}

impl Frame for Recovered {
    fn kind(&self) -> u8 {
        self.kind
    }
    fn lsn(&self) -> u64 {
        self.lsn
    }
    fn payload(&self) -> &[u8] {
        Recovered::payload(self)
    }
}

/// A frame of a snapshot's body.
struct InSnapshot<'b> {
    kind: u8,
    offset: u64,
    payload: &'b [u8],
}

impl Frame for InSnapshot<'_> {
    fn kind(&self) -> u8 {
        self.kind
    }
    fn lsn(&self) -> u64 {
        0
    }
    fn payload(&self) -> &[u8] {
        self.payload
    }
}

/// A frame parsed, ready to apply.
enum Decoded {
    Put(PutFrame, Option<ChangeImage>),
    Current(CurrentFrame),
    Dedup([u8; 32]),
    Applied(AppliedFrame),
    /// Queues parse their own frames; the name routes it.
    Queue {
        q: String,
        kind: u8,
        lsn: u64,
        payload: Vec<u8>,
    },
    Header(HeaderFrame),
    Event(Box<Change>),
    Cursor(CursorFrame),
}

/// Parses frames (on the decoding threads).
struct Decoder<'p> {
    tables: HashMap<&'p str, &'p Arc<Table>>,
}

impl<'p> Decoder<'p> {
    fn new(pipeline: &'p Pipeline) -> Self {
        let tables = pipeline.engine.tables().iter();
        Self {
            tables: tables.map(|t| (t.name().as_ref(), t)).collect(),
        }
    }

    fn decode(
        &self,
        kind: u8,
        lsn: u64,
        payload: &[u8],
        correlations: &mut Correlations,
    ) -> Result<Decoded, String> {
        Ok(match kind {
            effect::PUT => {
                let (put, change) = effect::decode_put(payload)?;
                Decoded::Put(put, change)
            }
            effect::CURRENT => Decoded::Current(effect::decode(kind, payload)?),
            effect::DEDUP => {
                let DedupFrame(key) = effect::decode(kind, payload)?;
                Decoded::Dedup(key)
            }
            effect::APPLIED => Decoded::Applied(effect::decode(kind, payload)?),
            effect::ENLIST
            | effect::DONE
            | effect::DEAD
            | effect::REDRIVE
            | effect::DISCARD
            | effect::UNFINISHED => {
                let QueueName { q } = effect::decode(kind, payload)?;
                Decoded::Queue {
                    q,
                    kind,
                    lsn,
                    payload: payload.to_vec(),
                }
            }
            effect::HEADER => Decoded::Header(effect::decode(kind, payload)?),
            effect::EVENT => {
                let image: EventImage = effect::decode(kind, payload)?;
                Decoded::Event(Box::new(self.event(image, correlations)?))
            }
            effect::CURSOR => Decoded::Cursor(effect::decode(kind, payload)?),
            other => return Err(format!("a frame of unknown kind {other}")),
        })
    }

    /// A retained change of a snapshot, sharing its key and record with
    /// its table's entry where that still holds them (the snapshot writes
    /// tables first), so that a million retained changes do not keep a
    /// second copy of the records they made.
    fn event(&self, image: EventImage, correlations: &mut Correlations) -> Result<Change, String> {
        let Some(table) = self.tables.get(image.t.as_str()) else {
            return image.get(correlations);
        };
        let version = image.v.get(image.x.as_ref())?;
        let shared =
            (image.x.as_ref()).and_then(|data| table.restored_record(&image.key, &version, data));
        let (key, record) = match shared {
            Some((key, version, data)) => (key, Some((version, data))),
            None => (
                RecordId::derived(image.key),
                image.x.map(|data| (version, data)),
            ),
        };
        image.change.get(table.name(), key, record, correlations)
    }
}

/// Logs how a long recovery is going, every few seconds.
struct Progress {
    started: Instant,
    logged: Instant,
}

impl Progress {
    fn tick(&mut self, frames: u64) {
        // Checked every 4096 frames, so the clock is not read per frame.
        if frames.is_multiple_of(4096) && self.logged.elapsed() >= Duration::from_secs(2) {
            self.logged = Instant::now();
            tracing::info!(
                frames,
                seconds = self.started.elapsed().as_secs_f64(),
                "recovering"
            );
        }
    }
}

impl DataDir {
    /// Takes the directory, rebuilds `pipeline` from it, and starts writing
    /// its effects there. The pipeline must be new, with no request served.
    pub fn open(pipeline: &Pipeline, options: StorageOptions) -> Result<Arc<Self>, OpenFailure> {
        let started = Instant::now();
        let dir = options.dir.clone();
        let lock = DirLock::acquire(&dir)?;
        let io = |error| OpenFailure::Io {
            dir: dir.clone(),
            error,
        };
        let snaps = Arc::new(FsDisk::new(&dir.join("snap")).map_err(io)?);
        let wal_disk = FsDisk::new(&dir.join("wal")).map_err(io)?;
        tracing::info!(dir = %dir.display(), "reading the data directory");

        let engine = &pipeline.engine;
        engine.log.begin_restore();
        let snapshot = snapshot::latest(&*snaps).map_err(io)?;
        let after = snapshot.as_ref().map_or(0, |found| found.lsn);
        let (mut wal, frames) =
            Wal::open_after(wal_disk, options.segment_bytes, after).map_err(|error| {
                OpenFailure::Log {
                    dir: dir.join("wal"),
                    error,
                }
            })?;
        wal.set_sync(options.sync);
        let journal = Arc::new(Journal::new(Committer::start(wal).map_err(io)?));
        // Queues track what they hold from their first restored frame on.
        for queue in engine.queues() {
            queue.attach(journal.clone());
        }

        let decoder = Decoder::new(pipeline);
        let mut restorer = Restorer::new(pipeline, &decoder);
        let mut progress = Progress {
            started,
            logged: started,
        };
        let mut last = None;
        if let Some(found) = &snapshot {
            let file = dir.join("snap").join(&found.file);
            snapshot::read_frames(&*snaps, found, |bytes, frames, base| {
                let frames: Vec<InSnapshot> = frames
                    .iter()
                    .map(|f| InSnapshot {
                        kind: f.kind,
                        offset: base + f.offset as u64,
                        payload: &bytes[f.payload.clone()],
                    })
                    .collect();
                // Decoding runs ahead of applying, so retained changes are
                // decoded only once the entries before them are applied:
                // they share their records with those entries.
                let place = |f: &InSnapshot| format!("{} at offset {}", file.display(), f.offset);
                let event = |f: &InSnapshot| f.kind == effect::EVENT;
                for run in frames.chunk_by(|a, b| event(a) == event(b)) {
                    restorer.apply_all(run, place, &mut progress)?;
                }
                Ok(())
            })
            .map_err(|error| match error {
                ReadError::Io(error) => io(error),
                ReadError::Damage(damage) => OpenFailure::Snapshot {
                    file: file.clone(),
                    damage,
                },
                ReadError::Stopped(failure) => failure,
            })?;
            let header = restorer.header.as_ref();
            last = Some(SnapshotInfo {
                lsn: found.lsn,
                seq: header.map_or(0, |h| h.next_seq.saturating_sub(1)),
                bytes: found.len,
                taken_at: header
                    .and_then(|h| h.taken_at.get().ok())
                    .unwrap_or_else(Timestamp::now),
                seconds: 0.0,
                appended_bytes: 0,
            });
        }
        let wal_dir = dir.join("wal");
        restorer.apply_all(
            &frames,
            |f| format!("{}: frame {} of the log", wal_dir.display(), f.lsn),
            &mut progress,
        )?;
        drop(frames);

        for table in engine.tables() {
            table.finish_restore();
        }
        let cursor = |queue: &Arc<dyn QueueView>| restorer.cursors.get(queue.name()).copied();
        for queue in engine.queues() {
            queue.set_cursor(cursor(queue));
        }
        engine.log.finish_restore(journal.clone());
        follow_durable(&journal, engine.log.clone());
        // A reconciliation a crash cut short is completed now, as its
        // request would have.
        let cause = Cause::request("recovery");
        for table in engine.tables() {
            table.finish_reconciliation(&cause);
        }
        for queue in engine.queues() {
            queue.resume(cursor(queue));
        }
        let recovery = RecoveryInfo {
            frames: restorer.frames,
            events: engine.log.len() as u64,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            frames = recovery.frames,
            events = recovery.events,
            next_seq = engine.log.next_seq(),
            seconds = recovery.seconds,
            "recovered from the data directory"
        );
        Ok(Arc::new(Self {
            options,
            _lock: lock,
            journal,
            snaps,
            last: Mutex::new(last),
            taking: tokio::sync::Mutex::new(()),
            recovery,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Waits until every effect appended so far is on disk; an error once
    /// a write or fsync has failed (nothing is acknowledged from then on).
    pub async fn sync(&self) -> Result<(), Poisoned> {
        self.journal.sync().await
    }

    /// Why nothing more is acknowledged, if a write or fsync failed.
    pub fn failure(&self) -> Option<Poisoned> {
        self.journal.durable_lsn().err()
    }

    fn last_snapshot(&self) -> Option<SnapshotInfo> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn report(&self) -> DiskReport {
        let (segments, log_bytes) = self.journal.disk_use();
        let snapshot_bytes = self
            .snaps
            .list()
            .unwrap_or_default()
            .iter()
            .filter_map(|name| self.snaps.len(name).ok())
            .sum();
        DiskReport {
            dir: self.options.dir.display().to_string(),
            sync: if self.options.sync { "always" } else { "never" },
            bytes: log_bytes + snapshot_bytes,
            log_bytes,
            snapshot_bytes,
            segments,
            last_snapshot: self.last_snapshot(),
            durable_lsn: self.journal.durable_lsn().unwrap_or(0),
            error: self.failure().map(|p| p.to_string()),
            recovery: self.recovery.clone(),
        }
    }

    /// Whether enough was logged since the last snapshot to take another.
    fn due(&self) -> bool {
        let since = self.last_snapshot().map_or(0, |s| s.appended_bytes);
        self.journal.appended_bytes().saturating_sub(since) >= self.options.snapshot_bytes
    }

    /// Copies the pipeline's state as of the log's end, streaming it to a
    /// snapshot file on a blocking thread; makes it the newest once all it
    /// holds is durable, and lets the log drop what the snapshot before it
    /// covered (that one is kept in case this one is found damaged).
    pub async fn snapshot(
        self: &Arc<Self>,
        pipeline: &Arc<Pipeline>,
    ) -> Result<SnapshotInfo, String> {
        let _one = self.taking.lock().await;
        let started = Instant::now();
        let appended_bytes = self.journal.appended_bytes();
        // Frames after `lsn` are replayed over this copy; every effect
        // copied is in a frame appended by the copy's end, which is durable
        // before the snapshot is made the newest.
        let lsn = self.journal.appended();
        let (this, copied) = (self.clone(), pipeline.clone());
        let (next_seq, bytes) = tokio::task::spawn_blocking(move || this.copy(&copied, lsn))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing snapshot {}: {e}", snapshot::name(lsn)))?;
        self.sync().await.map_err(|p| p.to_string())?;
        let snaps = self.snaps.clone();
        tokio::task::spawn_blocking(move || snapshot::publish(&*snaps, lsn))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing snapshot {}: {e}", snapshot::name(lsn)))?;
        let info = SnapshotInfo {
            lsn,
            seq: next_seq - 1,
            bytes,
            taken_at: Timestamp::now(),
            seconds: started.elapsed().as_secs_f64(),
            appended_bytes,
        };
        let previous = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(info.clone());
        if let Some(previous) = previous {
            self.journal.remove_through(previous.lsn);
        }
        tracing::info!(
            lsn,
            seq = info.seq,
            bytes,
            seconds = info.seconds,
            "snapshot written"
        );
        Ok(info)
    }

    /// Streams the state to `<lsn>.snap.tmp`: the tables, the retained log
    /// (with each fed queue's place), the queues, the child listings and
    /// the dedup window, then a header. Returns the next sequence and the
    /// body's length.
    fn copy(&self, pipeline: &Pipeline, lsn: u64) -> io::Result<(u64, u64)> {
        let mut writer = snapshot::Writer::create(&*self.snaps, lsn)?;
        let mut failed = None;
        let mut out = |kind: u8, payload: &[u8]| {
            frame::encode(kind, payload, writer.buffer());
            if failed.is_none()
                && let Err(error) = writer.spill()
            {
                failed = Some(error);
            }
        };
        let engine = &pipeline.engine;
        // Tables before the retained log, so that a restore can share a
        // change's record with its entry.
        for table in engine.tables() {
            table.save(&mut out);
        }
        let (next_seq, cursors) = engine.log.save(&mut out);
        for queue in engine.queues() {
            if let Some(cursor) = queue.feed().and_then(|sub| cursors.get(sub.index())) {
                let frame = CursorFrame {
                    q: queue.name().to_string(),
                    cursor: *cursor,
                };
                out(effect::CURSOR, &effect::encode(&frame));
            }
            queue.save(&mut out);
        }
        for children in pipeline.children() {
            children.save(&mut out);
        }
        for key in pipeline.dedup.keys() {
            out(effect::DEDUP, &effect::encode(&DedupFrame(key.bytes())));
        }
        // Last, as a restore reads it wherever it is: it raises the next
        // sequence to what the copy saw, for changes not retained.
        let header = HeaderFrame {
            lsn,
            next_seq,
            taken_at: Timestamp::now().into(),
        };
        out(effect::HEADER, &effect::encode(&header));
        if let Some(error) = failed {
            return Err(error);
        }
        Ok((next_seq, writer.finish()?))
    }

    /// Takes a snapshot whenever enough was logged since the last, until
    /// `stop`.
    pub async fn snapshot_while(
        self: Arc<Self>,
        pipeline: Arc<Pipeline>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.due()
                && let Err(error) = self.snapshot(&pipeline).await
            {
                tracing::error!(%error, "cannot write a snapshot; the log keeps everything");
                if self.failure().is_some() {
                    return;
                }
            }
        }
    }

    /// After the pipeline has drained: a last snapshot, so the next start
    /// reads little log, then the writer stops.
    pub async fn close(self: &Arc<Self>, pipeline: &Arc<Pipeline>) {
        if self.failure().is_none()
            && let Err(error) = self.snapshot(pipeline).await
        {
            tracing::error!(%error, "cannot write the shutdown snapshot");
        }
        let journal = self.journal.clone();
        let _ = tokio::task::spawn_blocking(move || journal.stop()).await;
    }
}

/// Moves the log's durable sequence as the journal's frames reach disk.
fn follow_durable(journal: &Journal, log: Arc<crate::engine::log::ChangeLog>) {
    let mut durable = journal.watch();
    tokio::spawn(async move {
        loop {
            let state = durable.borrow_and_update().clone();
            match state {
                Ok(lsn) => log.durable_through(lsn),
                Err(poisoned) => {
                    tracing::error!(%poisoned, "the data directory cannot be written");
                    return;
                }
            }
            if durable.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::json;
    use tower::ServiceExt;

    use crate::{App, Config};

    async fn call(app: &App, method: &str, path: &str, body: serde_json::Value) -> StatusCode {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        app.router().oneshot(request).await.unwrap().status()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_read_back_from_a_snapshot_share_their_records_with_the_tables() {
        let dir = std::env::temp_dir().join(format!("eventsys-{}", uuid::Uuid::new_v4()));
        let app = App::start(Config {
            data_dir: Some(dir.clone()),
            ..Config::default()
        });
        let movies: Vec<_> = (0..40)
            .map(|n| {
                json!({"id": format!("m{n}"), "title": format!("Film {n}"), "year": 2001,
                       "actor_ids": ["a1"], "updated_at": "2024-03-01T12:00:00Z"})
            })
            .collect();
        assert_eq!(
            call(&app, "POST", "/raw/movies", json!(movies)).await,
            StatusCode::OK
        );
        let settled = call(&app, "GET", "/settle?timeout_ms=30000", json!(null)).await;
        assert_eq!(settled, StatusCode::OK);
        app.shutdown().await;
        drop(app);

        // Restarted from the snapshot the shutdown took, on a copy (the
        // first server's tasks may still hold the directory's lock).
        let copy = dir.with_extension("copy");
        for part in ["snap", "wal"] {
            std::fs::create_dir_all(copy.join(part)).unwrap();
            for file in std::fs::read_dir(dir.join(part)).unwrap() {
                let file = file.unwrap().path();
                std::fs::copy(&file, copy.join(part).join(file.file_name().unwrap())).unwrap();
            }
        }
        let app = App::start(Config {
            data_dir: Some(copy.clone()),
            ..Config::default()
        });
        let engine = &app.pipeline().engine;
        let page = engine.log.read(0, usize::MAX, |_| true).unwrap();
        let mut shared = 0;
        for change in &page.events {
            let table = engine.table(&change.table).unwrap();
            let record = table.get(change.key.as_str()).unwrap();
            assert_eq!(record.version, change.version, "nothing changed since");
            let data = change.data.as_ref().unwrap();
            assert!(
                data.is_shared_with(&record.data),
                "change {} keeps its own copy of {}",
                change.seq,
                change.key.as_str()
            );
            shared += 1;
        }
        assert_eq!(shared, 80, "40 raw movies and their 40 standard ones");
        app.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&copy);
    }
}
