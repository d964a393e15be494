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

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::record::{Data, RecordId, Timestamp, Version};
use super::settle::Activity;
use crate::storage::effect::{self, ChangeImage, EventImage};
use crate::storage::journal::Journal;

/// A table's name, shared by every change it emits.
pub type TableName = Arc<str>;

/// What a change did to its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
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
pub(crate) fn event_id(time: Timestamp) -> Uuid {
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

impl SubscriberId {
    /// Its place in the cursors [`ChangeLog::save`] returns.
    pub(crate) fn index(self) -> usize {
        self.0
    }
}

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
    /// After a restart: changes already dead-lettered from this
    /// subscriber's queue, not to be delivered again.
    skip: HashSet<u64>,
}

struct Inner {
    events: VecDeque<Arc<Change>>,
    /// Sequence the next append gets.
    next_seq: u64,
    subscribers: Vec<Subscriber>,
    /// On a data directory: the last sequence whose frame is durable (queues,
    /// `/events` and live streams see nothing after it), and the frames of
    /// later changes, as (LSN, sequence). In memory every change is
    /// "durable" as soon as it is appended.
    durable_seq: u64,
    marks: VecDeque<(u64, u64)>,
    /// A replica of a shared log (JetStream): sequences come from the
    /// shared stream and have gaps, so what was trimmed cannot be told from
    /// the oldest event kept; this is the greatest sequence trimmed (or
    /// never seen). `None` for a log of this process's own, whose
    /// sequences are gapless.
    floor: Option<u64>,
}

impl Inner {
    /// The oldest sequence that may be read: everything from it on that
    /// the log ever held is still here.
    fn first(&self) -> u64 {
        match self.floor {
            Some(floor) => floor + 1,
            None => self.events.front().map_or(self.next_seq, |e| e.seq),
        }
    }

    /// Where the first retained event with a sequence of `seq` or more is.
    fn index_of(&self, seq: u64) -> usize {
        self.events.partition_point(|e| e.seq < seq)
    }
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
    /// Where effects are written on a data directory; unset in memory.
    journal: OnceLock<Arc<Journal>>,
}

impl ChangeLog {
    pub fn new(retention: usize, activity: Activity) -> Self {
        Self {
            inner: Mutex::new(Inner {
                events: VecDeque::new(),
                next_seq: 1,
                subscribers: Vec::new(),
                durable_seq: u64::MAX,
                marks: VecDeque::new(),
                floor: None,
            }),
            streams: watch::Sender::new(()),
            retention: retention.max(1),
            activity,
            journal: OnceLock::new(),
        }
    }

    /// The journal effects are written to, on a data directory.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.get()
    }

    /// Frames up to `lsn` are durable: changes up to their sequence may be
    /// delivered and read.
    pub fn durable_through(&self, lsn: u64) {
        let mut inner = self.lock();
        let mut moved = false;
        while let Some(&(at, seq)) = inner.marks.front() {
            if at > lsn {
                break;
            }
            inner.marks.pop_front();
            inner.durable_seq = seq;
            moved = true;
        }
        if moved {
            for sub in inner.subscribers.iter().filter(|s| s.backlog > 0) {
                sub.appended.notify_one();
            }
        }
        drop(inner);
        if moved && self.streams.receiver_count() > 0 {
            self.streams.send_replace(());
        }
    }

    /// The last sequence that is durable (the latest, in memory).
    pub fn durable_seq(&self) -> u64 {
        let inner = self.lock();
        inner.durable_seq.min(inner.next_seq - 1)
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
            skip: HashSet::new(),
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
    // Each argument is a field of the change or its frame; a struct for
    // them would only be taken apart again here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append(
        &self,
        table: &TableName,
        key: RecordId,
        kind: ChangeKind,
        version: Version,
        data: Option<Data>,
        cause: &Cause,
        put: Option<Vec<u8>>,
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
        if let (Some(journal), Some(payload)) = (self.journal.get(), put) {
            // The change's frame is appended under this lock, so frames are
            // in sequence order and a durable prefix has no gaps.
            let payload = effect::encode_onto(&ChangeImage::of(&change), payload);
            let lsn = journal.append_raw(effect::PUT, &payload);
            inner.marks.push_back((lsn, seq));
        }
        self.push(inner, change.clone());
        change
    }

    /// Makes this log a replica of a shared one (JetStream): its changes
    /// come through [`ChangeLog::replicate`], at the shared stream's
    /// sequences, which have gaps.
    pub fn become_replica(&self) {
        let mut inner = self.lock();
        inner.floor = Some(inner.next_seq - 1);
    }

    /// Appends a change read from the shared log, at its own sequence. One
    /// at or below the latest (read again) is ignored.
    pub fn replicate(&self, change: Change) {
        let mut inner = self.lock();
        if change.seq < inner.next_seq {
            return;
        }
        inner.next_seq = change.seq + 1;
        self.push(inner, Arc::new(change));
    }

    /// Adds `change` to the log and tells whoever waits for it.
    fn push(&self, mut inner: MutexGuard<'_, Inner>, change: Arc<Change>) {
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
                    let seq = front.seq;
                    inner.events.pop_front();
                    if let Some(floor) = &mut inner.floor {
                        *floor = seq;
                    }
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
        // The cursor is never behind what is retained (see `trim`).
        let start = inner.index_of(subscriber.cursor);
        let mut found = Vec::new();
        let mut cursor = subscriber.cursor;
        for change in inner.events.range(start..) {
            if found.len() == max || change.seq > inner.durable_seq {
                break;
            }
            cursor = change.seq + 1;
            if subscriber.tables.iter().any(|t| *t == change.table)
                && !subscriber.skip.contains(&change.seq)
            {
                found.push(change.clone());
            }
        }
        // What is left of its backlog waits for frames to be durable: ask
        // for them now rather than when the log's writer would take them.
        if found.len() < max
            && (found.len() as u64) < subscriber.backlog
            && let Some(journal) = self.journal.get()
        {
            journal.want_all();
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
        let first = inner.first();
        if !from_oldest && after + 1 < first {
            return Err(Gone {
                after,
                oldest: first,
            });
        }
        let start = inner.index_of(after + 1);
        let mut page = Page {
            events: Vec::new(),
            next: after.max(first.saturating_sub(1)),
        };
        for change in inner.events.range(start..) {
            if page.events.len() == limit || change.seq > inner.durable_seq {
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
        self.lock().first()
    }

    /// The sequence of the latest durable append (0 before the first).
    pub fn latest(&self) -> u64 {
        self.durable_seq()
    }

    /// The sequence the next change gets.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The retained changes after `after` for `sub`'s tables, up to what
    /// it has been given (for replay: the rest it gets anyway).
    pub fn delivered_after(&self, sub: SubscriberId, after: u64) -> Result<Vec<Arc<Change>>, Gone> {
        let inner = self.lock();
        let first = inner.first();
        if after + 1 < first {
            return Err(Gone {
                after,
                oldest: first,
            });
        }
        let subscriber = &inner.subscribers[sub.0];
        let start = inner.index_of(after + 1);
        Ok(inner
            .events
            .range(start..)
            .take_while(|c| c.seq < subscriber.cursor)
            .filter(|c| subscriber.tables.contains(&c.table))
            .cloned()
            .collect())
    }

    // Restoring from a data directory. These run before anything else
    // touches the log, with no journal attached yet.

    /// Starts a restore: until [`ChangeLog::finish_restore`] nothing in the
    /// log is delivered or read, so dispatchers cannot race it.
    pub(crate) fn begin_restore(&self) {
        self.lock().durable_seq = 0;
    }

    /// Puts back the change of a log frame; one the state already holds
    /// (below the next sequence) is ignored.
    pub(crate) fn restore(&self, change: Change) {
        let mut inner = self.lock();
        if change.seq < inner.next_seq {
            return;
        }
        inner.next_seq = change.seq + 1;
        inner.events.push_back(Arc::new(change));
    }

    /// Puts back a retained change from a snapshot (they come in order,
    /// after its header has set the next sequence).
    pub(crate) fn restore_event(&self, change: Change) {
        let mut inner = self.lock();
        if inner.events.back().is_some_and(|e| e.seq >= change.seq) {
            return;
        }
        inner.next_seq = inner.next_seq.max(change.seq + 1);
        inner.events.push_back(Arc::new(change));
    }

    /// Sequences below `next` were used, even if no change is kept for them.
    pub(crate) fn restore_next_seq(&self, next: u64) {
        let mut inner = self.lock();
        inner.next_seq = inner.next_seq.max(next);
    }

    /// Sets where `sub` resumes, and the changes it must not get again.
    pub(crate) fn restore_cursor(&self, sub: SubscriberId, cursor: u64, skip: HashSet<u64>) {
        let mut inner = self.lock();
        let subscriber = &mut inner.subscribers[sub.0];
        subscriber.cursor = cursor;
        subscriber.skip = skip;
    }

    /// Ends a restore and starts writing effects to `journal`: everything
    /// in the log by now was read back from disk, so it is durable. Counts
    /// what each subscriber is owed from its cursor on as outstanding work,
    /// and wakes its dispatcher, in the same step.
    pub(crate) fn finish_restore(&self, journal: Arc<Journal>) {
        let mut inner = self.lock();
        let Inner {
            events,
            subscribers,
            next_seq,
            durable_seq,
            ..
        } = &mut *inner;
        let first = events.front().map_or(*next_seq, |e| e.seq);
        let mut owed = 0;
        for sub in subscribers.iter_mut() {
            sub.cursor = sub.cursor.clamp(first, *next_seq);
            let start = (sub.cursor - first) as usize;
            sub.backlog = events
                .range(start.min(events.len())..)
                .filter(|c| sub.tables.contains(&c.table) && !sub.skip.contains(&c.seq))
                .count() as u64;
            owed += sub.backlog;
            sub.appended.notify_one();
        }
        *durable_seq = *next_seq - 1;
        let _ = self.journal.set(journal);
        self.activity.begin(owed);
        // The log read back may hold more than retention keeps.
        self.trim(&mut inner);
    }

    /// Writes every retained change as a snapshot frame, and returns the
    /// sequence the next change gets with each subscriber's cursor.
    pub(crate) fn save(&self, out: &mut dyn FnMut(u8, &[u8])) -> (u64, Vec<u64>) {
        // The snapshot is written only once all that was appended by the
        // end of the copy is durable, so it may hold changes not durable yet.
        let (events, next, cursors) = {
            let inner = self.lock();
            let events: Vec<Arc<Change>> = inner.events.iter().cloned().collect();
            let next = inner.next_seq;
            let cursors = inner
                .subscribers
                .iter()
                .map(|s| if s.backlog == 0 { next } else { s.cursor })
                .collect();
            (events, next, cursors)
        };
        for change in events {
            out(effect::EVENT, &effect::encode(&EventImage::of(&change)));
        }
        (next, cursors)
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
