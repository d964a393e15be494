//! The journal: what the engine writes its effects through when it runs on
//! a data directory.
//!
//! Tables, the change log, queues and the dedup window append frames here
//! in the step that makes each effect (so the log's order is the order the
//! effects happened in, per record and per change sequence), and never
//! wait. A request waits, before its 2xx, until everything appended so far
//! is durable ([`Journal::sync`]): one group commit covers it and every
//! request beside it.
//!
//! A frame that cannot be appended (the log is poisoned by a failed write
//! or sync) is not lost silently: the waiting request gets the error, and
//! so does every later one.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::watch;

use super::commit::{Committer, Durable};
use super::effect;
use super::wal::Poisoned;

pub struct Journal {
    committer: Committer,
    /// Bytes of frames appended since start, for deciding when to snapshot.
    appended_bytes: AtomicU64,
}

impl Journal {
    pub fn new(committer: Committer) -> Self {
        Self {
            committer,
            appended_bytes: AtomicU64::new(0),
        }
    }

    /// Appends a frame of `kind` holding `value`; its LSN.
    pub fn append(&self, kind: u8, value: &impl Serialize) -> u64 {
        self.append_raw(kind, &effect::encode(value))
    }

    /// Appends an encoded payload; its LSN (0 if the log is poisoned, which
    /// the next [`Journal::sync`] reports).
    pub fn append_raw(&self, kind: u8, payload: &[u8]) -> u64 {
        self.appended_bytes
            .fetch_add(payload.len() as u64 + 9, Ordering::Relaxed);
        self.committer.append(kind, payload).unwrap_or(0)
    }

    /// Frames appended while the guard is held go to the disk in one write:
    /// for a step of several writes (a parent and its child list, a
    /// reconciliation) that a crash between writes must not cut in two.
    pub fn group(&self) -> super::commit::Group<'_> {
        self.committer.group()
    }

    /// The LSN of the last frame appended.
    pub fn appended(&self) -> u64 {
        self.committer.appended()
    }

    /// Bytes appended since start.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes.load(Ordering::Relaxed)
    }

    /// Asks for everything appended so far to be written and synced now
    /// (a queue waits to deliver it), without waiting.
    pub fn want_all(&self) {
        self.committer.want(self.appended());
    }

    /// Waits until everything appended so far is durable.
    pub async fn sync(&self) -> Result<(), Poisoned> {
        self.committer.durable(self.appended()).await
    }

    pub fn durable_lsn(&self) -> Result<u64, Poisoned> {
        self.committer.durable_lsn()
    }

    pub fn watch(&self) -> watch::Receiver<Durable> {
        self.committer.watch()
    }

    pub fn disk_use(&self) -> (usize, u64) {
        self.committer.disk_use()
    }

    /// Lets the writer delete segments wholly at or before `lsn`.
    pub fn remove_through(&self, lsn: u64) {
        self.committer.remove_through(lsn);
    }

    /// Writes what is appended and stops the writer.
    pub fn stop(&self) {
        self.committer.stop();
    }
}
