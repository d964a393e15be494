//! The change log: the outbox between tables and queues.
//!
//! Every real change a table makes (`inserted`, `updated`, `deleted`) is
//! appended here in the same critical section as the table write, with a
//! global sequence number and the ids that say what caused it. Queues are
//! fed *from the log* by a dispatcher that advances a per-subscriber cursor
//! only after the queue has taken the event. So:
//!
//! - a full queue delays delivery but never loses an accepted write;
//! - a handler that writes into a table its own queue is fed from (series
//!   into episodes) never blocks on that queue, so it cannot deadlock;
//! - retention drops the oldest events only once every subscriber has
//!   received them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::record::{Data, RecordId, Timestamp, Version};
use super::settle::Activity;

/// A table's name, shared by every change it emits.
pub type TableName = Arc<str>;

/// What a change did to its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Inserted,
    Updated,
    Deleted,
}

impl ChangeKind {
    /// The CloudEvents `type` of a change of this kind.
    pub fn event_type(self) -> &'static str {
        match self {
            ChangeKind::Inserted => "eventsys.record.inserted",
            ChangeKind::Updated => "eventsys.record.updated",
            ChangeKind::Deleted => "eventsys.record.deleted",
        }
    }

    pub fn parse_event_type(text: &str) -> Option<Self> {
        [Self::Inserted, Self::Updated, Self::Deleted]
            .into_iter()
            .find(|k| k.event_type() == text || k.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Inserted => "inserted",
            ChangeKind::Updated => "updated",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// Why a write happened: the request that started the chain, and the change
/// that directly caused this one (none for a write from ingest).
#[derive(Clone, Debug)]
pub struct Cause {
    pub correlation: Arc<str>,
    pub causation: Option<Uuid>,
}

impl Cause {
    /// A write made by a client request.
    pub fn request(correlation: impl Into<Arc<str>>) -> Self {
        Self {
            correlation: correlation.into(),
            causation: None,
        }
    }

    /// A write made because of `change`: same correlation, caused by it.
    pub fn caused_by(change: &Change) -> Self {
        Self {
            correlation: change.cause.correlation.clone(),
            causation: Some(change.id),
        }
    }
}

/// One recorded change of one record. Serialises as a CloudEvent 1.0.
#[derive(Debug)]
pub struct Change {
    /// Position in the log, from 1, gapless.
    pub seq: u64,
    /// Unique id of this change (the CloudEvent `id`).
    pub id: Uuid,
    pub table: TableName,
    pub key: RecordId,
    pub kind: ChangeKind,
    /// The record's version after the change (a delete's version for deletes).
    pub version: Version,
    /// The record's data after the change; `None` for deletes.
    pub data: Option<Data>,
    /// When the change was recorded.
    pub time: Timestamp,
    pub cause: Cause,
}

impl Serialize for Change {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("specversion", "1.0")?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("source", &format_args!("/tables/{}", self.table))?;
        map.serialize_entry("type", self.kind.event_type())?;
        map.serialize_entry("subject", &self.key)?;
        map.serialize_entry("time", &self.time)?;
        map.serialize_entry("sequence", &self.seq.to_string())?;
        map.serialize_entry("recordversion", &self.version.at)?;
        map.serialize_entry("correlationid", &*self.cause.correlation)?;
        if let Some(causation) = &self.cause.causation {
            map.serialize_entry("causationid", causation)?;
        }
        if let Some(data) = &self.data {
            map.serialize_entry("datacontenttype", "application/json")?;
            map.serialize_entry("data", data)?;
        }
        map.end()
    }
}

/// A version 7 UUID for a change recorded at `time`: time-ordered, with
/// random bits from a thread-local generator, and no second clock read.
fn event_id(time: Timestamp) -> Uuid {
    let nanos = time.nanos().max(0) as u64;
    let at = uuid::Timestamp::from_unix(
        uuid::NoContext,
        nanos / 1_000_000_000,
        (nanos % 1_000_000_000) as u32,
    );
    Uuid::new_v7(at)
}

/// A dispatcher's handle on the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriberId(usize);

struct Subscriber {
    /// Tables whose changes this subscriber receives.
    tables: Vec<TableName>,
    /// Sequence of the next event to look at; everything before it was
    /// delivered (or was not for this subscriber).
    cursor: u64,
    /// Matching events appended and not yet delivered.
    backlog: u64,
    /// Woken (or left a permit) when a matching event is appended.
    appended: Arc<Notify>,
}

struct Inner {
    events: VecDeque<Arc<Change>>,
    /// Sequence the next append gets.
    next_seq: u64,
    subscribers: Vec<Subscriber>,
}

/// The cursor asked for is older than what is retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("events after {after} are no longer retained; the oldest available is {oldest}")]
pub struct Gone {
    pub after: u64,
    pub oldest: u64,
}

/// A page of the log.
pub struct Page {
    pub events: Vec<Arc<Change>>,
    /// Cursor to continue from: the last sequence looked at.
    pub next: u64,
}

pub struct ChangeLog {
    /// One lock for appends and reads: critical sections are a push or a
    /// short scan, never an await.
    inner: Mutex<Inner>,
    /// Wakes live streams on appends; only sent to while one is watching,
    /// since a send takes locks that every append would otherwise pay.
    streams: watch::Sender<()>,
    retention: usize,
    activity: Activity,
}

impl ChangeLog {
    pub fn new(retention: usize, activity: Activity) -> Self {
        Self {
            inner: Mutex::new(Inner {
                events: VecDeque::new(),
                next_seq: 1,
                subscribers: Vec::new(),
            }),
            streams: watch::Sender::new(()),
            retention: retention.max(1),
            activity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Lock order: a table's shard, then this. Tables append while
        // holding a shard (that is what makes a write and its change one
        // step), so nothing may take a shard while holding this lock.
        // A poisoned lock means a panic mid-append; the log itself is still
        // a valid deque, so keep serving rather than cascade the panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a subscriber for changes of `tables`, from the next append on.
    pub fn subscribe(&self, tables: &[TableName]) -> SubscriberId {
        let mut inner = self.lock();
        let cursor = inner.next_seq;
        inner.subscribers.push(Subscriber {
            tables: tables.to_vec(),
            cursor,
            backlog: 0,
            appended: Arc::new(Notify::new()),
        });
        SubscriberId(inner.subscribers.len() - 1)
    }

    /// Wakes when an event for `sub` is appended; an append while nobody
    /// waits leaves a permit, so none is missed between a read and a wait.
    pub fn appended(&self, sub: SubscriberId) -> Arc<Notify> {
        self.lock().subscribers[sub.0].appended.clone()
    }

    /// Records a change. Called by a table inside its write's critical
    /// section, which is what makes write and append one atomic step.
    pub(crate) fn append(
        &self,
        table: &TableName,
        key: RecordId,
        kind: ChangeKind,
        version: Version,
        data: Option<Data>,
        cause: &Cause,
    ) -> Arc<Change> {
        // Everything but the sequence is made before taking the lock, which
        // every table's writes share.
        let time = Timestamp::now();
        let (id, table, cause) = (event_id(time), table.clone(), cause.clone());
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let change = Arc::new(Change {
            seq,
            id,
            table,
            key,
            kind,
            version,
            data,
            time,
            cause,
        });
        inner.events.push_back(change.clone());
        let mut owed = 0;
        for sub in inner.subscribers.iter_mut() {
            if sub.tables.contains(&change.table) {
                sub.backlog += 1;
                owed += 1;
                sub.appended.notify_one();
            }
        }
        // Counted before the lock is released, so settle cannot see the
        // event neither owed nor delivered.
        self.activity.begin(owed);
        self.trim(&mut inner);
        drop(inner);
        // A stream subscribes before it reads, so one that missed this
        // event's wake-up is sure to read it.
        if self.streams.receiver_count() > 0 {
            self.streams.send_replace(());
        }
        change
    }

    /// Drops the oldest events beyond retention that every subscriber has.
    fn trim(&self, inner: &mut Inner) {
        // A subscriber owed nothing has every event so far: move its cursor
        // past changes of other tables, which never wake its dispatcher.
        let next = inner.next_seq;
        for sub in inner.subscribers.iter_mut().filter(|s| s.backlog == 0) {
            sub.cursor = next;
        }
        let delivered_to_all = inner
            .subscribers
            .iter()
            .map(|s| s.cursor)
            .min()
            .unwrap_or(u64::MAX);
        while inner.events.len() > self.retention {
            match inner.events.front() {
                Some(front) if front.seq < delivered_to_all => {
                    inner.events.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The events for subscriber `sub` not yet delivered, at most `max`.
    /// Returns them with the cursor to pass to [`ChangeLog::delivered`].
    pub fn pending(&self, sub: SubscriberId, max: usize) -> (Vec<Arc<Change>>, u64) {
        let inner = self.lock();
        let subscriber = &inner.subscribers[sub.0];
        let first = inner.events.front().map_or(inner.next_seq, |e| e.seq);
        // The cursor is never behind what is retained (see `trim`).
        let start = subscriber.cursor.saturating_sub(first) as usize;
        let mut found = Vec::new();
        let mut cursor = subscriber.cursor;
        for change in inner.events.range(start.min(inner.events.len())..) {
            if found.len() == max {
                break;
            }
            cursor = change.seq + 1;
            if subscriber.tables.iter().any(|t| *t == change.table) {
                found.push(change.clone());
            }
        }
        (found, cursor)
    }

    /// The events up to `cursor` (from [`ChangeLog::pending`]), `count` of
    /// them for this subscriber, are now in its queue.
    pub fn delivered(&self, sub: SubscriberId, cursor: u64, count: u64) {
        let mut inner = self.lock();
        let subscriber = &mut inner.subscribers[sub.0];
        subscriber.cursor = subscriber.cursor.max(cursor);
        subscriber.backlog -= count;
        self.trim(&mut inner);
    }

    /// Matching events appended and not yet in the subscriber's queue.
    pub fn backlog(&self, sub: SubscriberId) -> u64 {
        self.lock().subscribers[sub.0].backlog
    }

    /// Reads retained events after `after` (0: from the oldest) that pass
    /// `keep`, at most `limit` of them.
    pub fn read(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&Change) -> bool,
    ) -> Result<Page, Gone> {
        self.read_from(after, limit, keep, after == 0)
    }

    /// Like [`ChangeLog::read`], but `after = 0` means "from sequence 1": a
    /// reader that must not miss anything (a live stream) is told `Gone`
    /// rather than silently moved to the oldest retained event.
    pub fn read_strict(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&Change) -> bool,
    ) -> Result<Page, Gone> {
        self.read_from(after, limit, keep, false)
    }

    fn read_from(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&Change) -> bool,
        from_oldest: bool,
    ) -> Result<Page, Gone> {
        let inner = self.lock();
        let first = inner.events.front().map_or(inner.next_seq, |e| e.seq);
        if !from_oldest && after + 1 < first {
            return Err(Gone {
                after,
                oldest: first,
            });
        }
        let start = (after + 1).saturating_sub(first) as usize;
        let mut page = Page {
            events: Vec::new(),
            next: after.max(first.saturating_sub(1)),
        };
        for change in inner.events.range(start.min(inner.events.len())..) {
            if page.events.len() == limit {
                break;
            }
            page.next = change.seq;
            if keep(change) {
                page.events.push(change.clone());
            }
        }
        Ok(page)
    }

    /// The oldest retained sequence (the next to be appended if none are).
    pub fn oldest(&self) -> u64 {
        let inner = self.lock();
        inner.events.front().map_or(inner.next_seq, |e| e.seq)
    }

    /// The sequence of the latest append (0 before the first).
    pub fn latest(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Retained events.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes when something is appended (take it before reading, so an
    /// append in between is not missed).
    pub fn watch(&self) -> watch::Receiver<()> {
        self.streams.subscribe()
    }
}
