//! Group commit: many writers append frames, one thread writes and syncs
//! them, and each writer waits until its frames are durable.
//!
//! Appending only copies a frame into a shared buffer and numbers it, under
//! a short lock; the writer thread takes the whole buffer, writes it and
//! syncs once, so one sync covers every frame appended while the previous
//! one ran. A writer that must not answer before its frames are on disk
//! waits for [`Committer::durable`].
//!
//! The writer takes a batch as soon as somebody waits for a frame in it
//! (a request before its 2xx, a queue for a change to deliver); frames
//! nobody waits for yet (a handler's writes) are held for up to
//! [`HOLD`] or [`HOLD_BYTES`], so that they share the next sync instead of
//! each costing one. Every batch is still written and synced before the
//! next, so a crash can only cut the last one.
//!
//! A failed write or sync is final: every waiter, and every later append,
//! gets the [`Poisoned`] error, so nothing is acknowledged that may not be
//! on disk.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::disk::Disk;
use super::frame;
use super::wal::{Poisoned, Wal};

/// How long frames nobody waits for may be held before they are written.
pub const HOLD: Duration = Duration::from_millis(5);

/// How many bytes of frames nobody waits for may be held.
pub const HOLD_BYTES: usize = 1 << 20;

pub struct Committer {
    shared: Arc<Shared>,
    durable: watch::Receiver<Durable>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The last durable LSN, or why there will be no more.
pub type Durable = Result<u64, Poisoned>;

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when frames are appended or the committer stops.
    wake: Condvar,
    /// Held (shared) by a step whose frames must go to the disk in one
    /// batch, and (exclusively) by the writer while it takes a
    /// batch, so a batch never ends inside such a step. Writer-preferring,
    /// so steps cannot starve the writer.
    groups: RwLock<()>,
}

/// Frames appended while this is held go to the disk in one batch.
pub type Group<'a> = RwLockReadGuard<'a, ()>;

struct Queue {
    /// Frames appended and not yet taken by the writer.
    frames: Vec<u8>,
    /// The LSN the next frame gets.
    next: u64,
    /// The LSN of the first frame in `frames`, and when it was appended.
    first: u64,
    since: Instant,
    /// The highest LSN somebody waits for.
    wanted: u64,
    stopping: bool,
    poisoned: Option<Poisoned>,
    /// Segments wholly at or before this LSN may be deleted.
    remove_through: Option<u64>,
    /// Segment files after the last removal, and bytes written to them.
    segments: usize,
    bytes: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Committer {
    /// Starts the writer thread on `wal`.
    pub fn start<D: Disk>(wal: Wal<D>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                frames: Vec::new(),
                next: wal.next_lsn(),
                first: wal.next_lsn(),
                since: Instant::now(),
                wanted: 0,
                stopping: false,
                poisoned: None,
                remove_through: None,
                segments: wal.segment_count(),
                bytes: wal.bytes(),
            }),
            wake: Condvar::new(),
            groups: RwLock::new(()),
        });
        let (sender, durable) = watch::channel(Ok(wal.durable()));
        let writer = std::thread::Builder::new()
            .name("eventsys-wal".into())
            .spawn({
                let shared = shared.clone();
                move || write(wal, &shared, &sender)
            })?;
        Ok(Self {
            shared,
            durable,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Appends a frame for the next commit; its LSN.
    pub fn append(&self, kind: u8, payload: &[u8]) -> Result<u64, Poisoned> {
        // Every writer shares the lock below: only the copy is made under it.
        let crc = frame::checksum(kind, payload);
        let mut queue = self.shared.lock();
        if let Some(poisoned) = &queue.poisoned {
            return Err(poisoned.clone());
        }
        // The writer waits only while there is nothing to write, so only
        // the first frame after it took the last batch needs to wake it
        // (a wake-up is a system call).
        let was_empty = queue.frames.is_empty();
        frame::encode_checked(kind, payload, crc, &mut queue.frames);
        let lsn = queue.next;
        queue.next += 1;
        if was_empty {
            queue.first = lsn;
            queue.since = Instant::now();
        }
        drop(queue);
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(lsn)
    }

    /// Holds the writer off taking a batch until dropped: the frames
    /// appended meanwhile are written in one batch (a crash between
    /// batches keeps all of them or none; a torn batch keeps its whole
    /// frames before the tear).
    pub fn group(&self) -> Group<'_> {
        self.shared.groups.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The LSN of the last frame appended (0 before the first).
    pub fn appended(&self) -> u64 {
        self.shared.lock().next - 1
    }

    /// Segment files and their bytes, as of the last write.
    pub fn disk_use(&self) -> (usize, u64) {
        let queue = self.shared.lock();
        (queue.segments, queue.bytes)
    }

    /// Asks the writer to delete the segments wholly at or before `lsn`.
    pub fn remove_through(&self, lsn: u64) {
        self.shared.lock().remove_through = Some(lsn);
        self.shared.wake.notify_one();
    }

    /// A receiver of the last durable LSN (or why there will be no more).
    pub fn watch(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    /// Asks the writer to write and sync every frame up to `lsn` now,
    /// rather than hold them.
    pub fn want(&self, lsn: u64) {
        let mut queue = self.shared.lock();
        if lsn > queue.wanted {
            queue.wanted = lsn;
            let held = !queue.frames.is_empty() && lsn >= queue.first;
            drop(queue);
            if held {
                self.shared.wake.notify_one();
            }
        }
    }

    /// Waits until every frame up to `lsn` is durable.
    pub async fn durable(&self, lsn: u64) -> Result<(), Poisoned> {
        if matches!(*self.durable.borrow(), Ok(d) if d >= lsn) {
            return Ok(());
        }
        self.want(lsn);
        let mut durable = self.durable.clone();
        let reached = durable
            .wait_for(|d| d.as_ref().map_or(true, |d| *d >= lsn))
            .await
            .map_err(|_| Poisoned("the log's writer has stopped".into()))?;
        match &*reached {
            Ok(_) => Ok(()),
            Err(poisoned) => Err(poisoned.clone()),
        }
    }

    /// The last durable LSN, or why there will be no more.
    pub fn durable_lsn(&self) -> Result<u64, Poisoned> {
        self.durable.borrow().clone()
    }

    /// Writes what is appended, then stops the writer thread.
    pub fn stop(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("the log's writer thread panicked");
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The writer thread: takes everything appended, writes and syncs it once.
fn write<D: Disk>(mut wal: Wal<D>, shared: &Shared, durable: &watch::Sender<Durable>) {
    let mut batch = Vec::new();
    loop {
        {
            let mut queue = shared.lock();
            loop {
                if queue.stopping || queue.remove_through.is_some() {
                    break;
                }
                if queue.frames.is_empty() {
                    queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                let held = queue.since.elapsed();
                if queue.wanted >= queue.first || queue.frames.len() >= HOLD_BYTES || held >= HOLD {
                    break;
                }
                queue = shared
                    .wake
                    .wait_timeout(queue, HOLD - held)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // No group is half appended while the batch is taken (the queue's
        // lock is not held while waiting for the groups to end, so their
        // appends can finish).
        let _groups = shared.groups.write().unwrap_or_else(|e| e.into_inner());
        let (last, remove) = {
            let mut queue = shared.lock();
            if queue.frames.is_empty() && queue.stopping {
                return;
            }
            std::mem::swap(&mut batch, &mut queue.frames);
            (queue.next - 1, queue.remove_through.take())
        };
        drop(_groups);
        if let Some(lsn) = remove
            && let Err(error) = wal.remove_through(lsn)
        {
            tracing::warn!(%error, "cannot delete old log segments; they are kept");
        }
        let result = wal.write_batch(&batch, last);
        batch.clear();
        {
            let mut queue = shared.lock();
            queue.segments = wal.segment_count();
            queue.bytes = wal.bytes();
        }
        if let Err(poisoned) = &result {
            let mut queue = shared.lock();
            queue.poisoned = Some(poisoned.clone());
            queue.frames.clear();
        }
        let failed = result.is_err();
        // Returns the previous value, which nobody needs.
        let _ = durable.send_replace(result);
        if failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::crash::CrashDisk;

    fn committer(disk: &Arc<CrashDisk>) -> Committer {
        let (wal, _) = Wal::open(disk.clone(), 4096).unwrap();
        Committer::start(wal).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_syncs_and_every_acknowledged_frame_survives() {
        let disk = Arc::new(CrashDisk::default());
        let committer = Arc::new(committer(&disk));
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..16u8 {
            let committer = committer.clone();
            writers.spawn(async move {
                let mut acked = Vec::new();
                for i in 0..20u8 {
                    let lsn = committer.append(w, &[w, i]).unwrap();
                    committer.durable(lsn).await.unwrap();
                    acked.push(vec![w, i]);
                }
                acked
            });
        }
        let mut acked: Vec<Vec<u8>> = writers.join_all().await.concat();
        assert!(
            disk.syncs() < acked.len(),
            "{} syncs for {} acknowledged frames: no group commit",
            disk.syncs(),
            acked.len()
        );
        // A crash loses everything not synced: nothing acknowledged is lost.
        let crashed = disk.crash(|_| 0, &[]);
        let (_, recovered) = Wal::open(crashed, 4096).unwrap();
        let mut got: Vec<Vec<u8>> = recovered.iter().map(|f| f.payload().to_vec()).collect();
        got.sort();
        acked.sort();
        assert_eq!(got, acked);
    }

    #[tokio::test]
    async fn a_failed_sync_stops_every_acknowledgement() {
        let disk = Arc::new(CrashDisk::default());
        let committer = committer(&disk);
        let first = committer.append(1, b"before").unwrap();
        committer.durable(first).await.unwrap();
        disk.fail_sync(0);
        let lsn = committer.append(1, b"lost").unwrap();
        let error = committer.durable(lsn).await.unwrap_err();
        assert!(
            error.to_string().contains("injected fsync failure"),
            "{error}"
        );
        assert!(committer.append(1, b"after").is_err());
        assert!(committer.durable_lsn().is_err());
        // What was acknowledged before is still there.
        let (_, recovered) = Wal::open(disk.crash(|_| 0, &[]), 4096).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].payload(), b"before");
    }

    #[tokio::test]
    async fn frames_nobody_waits_for_share_one_sync_and_are_still_written() {
        let disk = Arc::new(CrashDisk::default());
        let committer = committer(&disk);
        let before = disk.syncs();
        let mut last = 0;
        for round in 0..10u8 {
            for i in 0..20u8 {
                last = committer.append(3, &[round, i]).unwrap();
            }
            // Spaced so that a writer which took each round as it came
            // would sync ten times; well within one hold in all.
            std::thread::sleep(Duration::from_micros(150));
        }
        // Nobody waits: the writer takes them when the hold ends.
        let mut durable = committer.watch();
        durable
            .wait_for(|d| d.as_ref().is_ok_and(|d| *d >= last))
            .await
            .unwrap();
        let syncs = disk.syncs() - before;
        assert!(syncs <= 2, "held frames share a sync ({syncs} syncs)");
        // A waiter's frame goes with the ones held before it, in one sync.
        committer.append(3, b"held").unwrap();
        let lsn = committer.append(3, b"waited for").unwrap();
        committer.durable(lsn).await.unwrap();
        assert_eq!(disk.syncs() - before, syncs + 1);
        let (_, recovered) = Wal::open(disk.crash(|_| 0, &[]), 4096).unwrap();
        assert_eq!(recovered.len(), 202);
    }

    #[tokio::test]
    async fn stop_writes_what_was_appended() {
        let disk = Arc::new(CrashDisk::default());
        let committer = committer(&disk);
        for i in 0..10u8 {
            committer.append(2, &[i]).unwrap();
        }
        committer.stop();
        let (_, recovered) = Wal::open(disk.crash(|_| 0, &[]), 4096).unwrap();
        assert_eq!(recovered.len(), 10);
    }
}
