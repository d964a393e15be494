//! Tables: versioned maps that drop stale and no-op writes.
//!
//! A table holds at most one live record per id. What is live is a function
//! of the *set* of writes, deletes and reconciliations a table has received,
//! never of their order or repetition (API.md, "The convergence law"):
//!
//! - **Versioned** tables (raw tables, written at ingest) keep, per id, the
//!   greatest write of its own, the latest delete, and, for child tables,
//!   the listing of every parent that lists it. The record is the greatest
//!   of the own write and the listings ([`Version`] order), unless a delete
//!   at or after it exists, or the current reconciliation lacks the id and
//!   the record is not newer than its `as_of` (the record is then
//!   *hidden*, and keeps its greatest write in case a newer reconciliation
//!   lists it again).
//! - **Sequenced** tables (derived tables, written by handlers) keep what
//!   the source change with the greatest change-log sequence said. A
//!   handler recomputes a derived record from its source on every source
//!   change, so the last change's record wins whichever worker finishes
//!   first; a delete is a tombstone at its sequence.
//!
//! Each write has exactly one [`Outcome`]. Only a change of what is visible
//! (`inserted`, `updated`, `deleted`) is appended to the [`ChangeLog`], in
//! the same critical section as the write, so the log order per record is
//! the write order and no change can be lost between the two. A write
//! whose data equal the visible data is `unchanged`: its version is kept
//! (so a later write between the two versions is stale) but nothing is
//! emitted, except by tables made with [`Table::listing`], whose versions
//! are what their children inherit.
//!
//! Records are spread over shards, each a `BTreeMap` behind a `std` mutex:
//! writes to different shards do not contend, and id-ordered paging is a
//! merge of the shards' ordered ranges.
//!
//! A table holds at most its limit of entries (`--max-records`; live,
//! deleted, hidden and listed ids all count). Ingest reserves room for the
//! new ids of a request before writing any of it ([`Table::reserve`]), so
//! a request over the limit stores nothing; a handler's write of a new id
//! past the limit fails with [`Full`].
//!
//! Lock order: a table's reconciliation lock, then a shard, then the
//! change log's lock (taken inside [`ChangeLog::append`]). Nothing awaits
//! while holding any of them.

use std::collections::btree_map::Entry as Slot;
use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::Serialize;

use super::log::{self, Cause, Change, ChangeKind, ChangeLog, TableName};
use super::record::{Data, RecordId, Timestamp, Version};
use super::store::{Key, Store, StoreError};
use crate::storage::effect::{
    self, At, ChangeImage, Correlations, CurrentFrame, EntryImage, PutFrame, StateFrame,
    StoredImage, VersionImage,
};

const SHARDS: usize = 16;

/// What one write or delete did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Inserted,
    Updated,
    Unchanged,
    Stale,
    Deleted,
    /// A delete of a record that was not live (the delete is still kept,
    /// so older writes arriving later are stale).
    Absent,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Inserted => "inserted",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Stale => "stale",
            Outcome::Deleted => "deleted",
            Outcome::Absent => "absent",
        }
    }

    pub const ALL: [Outcome; 6] = [
        Outcome::Inserted,
        Outcome::Updated,
        Outcome::Unchanged,
        Outcome::Stale,
        Outcome::Deleted,
        Outcome::Absent,
    ];
}

/// Who writes a table: ingest (`raw`, as received, versioned by the
/// records' own versions) or handlers (`standard`, derived from changes and
/// sequenced by them; `view`, a read model its one handler computes from
/// standard tables, sequenced by the change-log position it read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Raw,
    Standard,
    View,
    /// The server's own records (the audit trail), outside every scenario.
    System,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Raw => "raw",
            TableKind::Standard => "standard",
            TableKind::View => "view",
            TableKind::System => "system",
        }
    }
}

/// One write: a record's id, its version and its data.
#[derive(Clone, Debug)]
pub struct Write {
    pub id: RecordId,
    pub version: Version,
    pub data: Data,
}

/// A live record as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: RecordId,
    pub version: Version,
    pub data: Data,
}

/// What `If-Match` asked for and did not find.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("precondition failed: the stored version is {}", current.map_or("absent".to_string(), |t| t.to_string()))]
pub struct PreconditionFailed {
    pub current: Option<Timestamp>,
}

/// What a write expects of the stored record (optimistic concurrency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A live record whose version timestamp is exactly this.
    Version(Timestamp),
    /// Any live record (`If-Match: *`).
    Exists,
}

/// The result of a full-set reconciliation.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Reconciliation {
    pub as_of: Option<Timestamp>,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub stale: u64,
    /// Ids this reconciliation hid because its set did not contain them,
    /// in id order (none unless it became the current one).
    pub deleted: Vec<RecordId>,
}

/// Counts of write outcomes since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TableStats {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub stale: u64,
    pub deleted: u64,
}

#[derive(Default)]
struct Counters {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    live: AtomicU64,
    /// Ids kept, whatever their state.
    entries: AtomicU64,
    /// Room promised to ingest requests that are writing now.
    reserved: AtomicU64,
}

/// A write of a new id found the table at its limit of entries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("table `{table}` is full: it keeps {entries} ids and its limit (--max-records) is {limit}")]
pub struct Full {
    pub table: TableName,
    pub entries: u64,
    pub limit: u64,
}

/// Room for new ids, held while an ingest request writes; given back when
/// dropped (by then the ids it was for are entries of their own).
#[must_use]
pub struct Reservation<'t> {
    table: Option<&'t Table>,
    room: u64,
}

impl Reservation<'_> {
    /// A reservation of nothing, for a table a request does not write.
    pub fn none() -> Self {
        Self {
            table: None,
            room: 0,
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(table) = self.table {
            table
                .counters
                .reserved
                .fetch_sub(self.room, Ordering::AcqRel);
        }
    }
}

/// A version and the data written with it.
#[derive(Clone, Debug)]
struct Stored {
    version: Version,
    data: Data,
}

/// One parent's listing of a child: the parent's listing version, and the
/// child's data as that version lists it.
#[derive(Clone, Debug)]
struct Listed {
    parent: RecordId,
    value: Stored,
}

/// The reconciliation that counts: the greatest `as_of`, ties broken by
/// the greater canonical JSON of its sorted id list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Current {
    as_of: Timestamp,
    ids: Data,
}

/// What one id has received. What is visible follows from it
/// ([`Entry::visible`]), never from the order it arrived in.
#[derive(Clone, Default)]
struct Entry {
    /// Versioned: the greatest write of the id's own, kept while it is
    /// deleted or hidden. Sequenced: the record, `None` once deleted.
    own: Option<Stored>,
    /// Versioned: the latest delete; writes at or before it are dead.
    deleted: Option<Timestamp>,
    /// Child tables: each parent that lists this id, at its listing version
    /// (usually none or one).
    listed: Vec<Listed>,
    /// Sequenced: the change-log sequence of the source change that last
    /// set this entry.
    seq: u64,
    /// Versioned: whether the current reconciliation's set has this id.
    in_set: bool,
    /// On a shared store: the store's revision of this state (0: none).
    rev: u64,
    /// On a shared store: whether the change log last said the record is
    /// live (what a write's change is worked out from).
    announced: bool,
}

impl Entry {
    /// The greatest of the own write and the listings.
    fn best(&self) -> Option<&Stored> {
        self.own
            .iter()
            .chain(self.listed.iter().map(|l| &l.value))
            .max_by(|a, b| a.version.cmp(&b.version))
    }

    /// Whether a write at `at` is dead here: at or before the latest
    /// delete, or hidden by the current reconciliation.
    fn dead_at(&self, at: Timestamp, current: Option<&Current>) -> bool {
        self.deleted.is_some_and(|d| at <= d)
            || current.is_some_and(|c| !self.in_set && at <= c.as_of)
    }

    /// The record as read, if live.
    fn visible(&self, order: Order, current: Option<&Current>) -> Option<&Stored> {
        match order {
            Order::Sequenced => self.own.as_ref(),
            Order::Versioned => self
                .best()
                .filter(|best| !self.dead_at(best.version.at, current)),
        }
    }

    fn image(&self) -> EntryImage {
        EntryImage {
            o: self
                .own
                .as_ref()
                .map(|s| StoredImage::of(&s.version, &s.data)),
            d: self.deleted.map(At::from),
            l: self
                .listed
                .iter()
                .map(|l| {
                    let value = StoredImage::of(&l.value.version, &l.value.data);
                    (l.parent.to_string(), value)
                })
                .collect(),
            s: self.seq,
            i: self.in_set,
        }
    }

    fn from_image(image: EntryImage) -> Result<Self, String> {
        let stored =
            |image: StoredImage| image.get().map(|(version, data)| Stored { version, data });
        Ok(Self {
            own: image.o.map(stored).transpose()?,
            deleted: image.d.map(At::get).transpose()?,
            listed: image
                .l
                .into_iter()
                .map(|(parent, value)| {
                    Ok(Listed {
                        parent: RecordId::derived(parent),
                        value: stored(value)?,
                    })
                })
                .collect::<Result<_, String>>()?,
            seq: image.s,
            in_set: image.i,
            rev: 0,
            announced: false,
        })
    }

    /// The entry a shared store's state holds (an empty one for none).
    fn of_state(image: Option<EntryImage>) -> Result<Self, String> {
        Ok(image.map(Self::from_image).transpose()?.unwrap_or_default())
    }

    /// Holds nothing worth keeping (a child no parent lists any more and
    /// that was never written or deleted itself).
    fn is_empty(&self) -> bool {
        self.own.is_none() && self.deleted.is_none() && self.listed.is_empty()
    }
}

/// How a table orders the writes to one id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// By the records' versions (raw tables).
    Versioned,
    /// By the change-log sequence of the source change (derived tables).
    Sequenced,
}

struct Shard {
    entries: BTreeMap<RecordId, Entry>,
    /// This shard's copy of the table's current reconciliation, changed
    /// under the shard lock together with its entries' `in_set` flags, so a
    /// write always sees the two agree.
    current: Option<Arc<Current>>,
}

pub struct Table {
    name: TableName,
    kind: TableKind,
    order: Order,
    /// Whether a newer version with equal data is a change (listing
    /// tables: children inherit their parent's listing version).
    versions_are_changes: bool,
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    /// The current reconciliation; held while one is applied, so that
    /// reconciliations of one table run one at a time.
    reconciling: Mutex<Option<Arc<Current>>>,
    /// The most entries this table keeps.
    limit: AtomicU64,
    counters: Counters,
    log: Arc<ChangeLog>,
    /// Set when the table is a replica of a shared store: writes then go
    /// to the store ([`Writer`]), and come back through
    /// [`Table::replicate`].
    store: OnceLock<Arc<dyn Store>>,
    /// On a shared store: the current reconciliation as the store holds it.
    judge: Mutex<Judge>,
}

/// On a shared store: the reconciliation that judges writes, with the ids
/// of its set, and its revision in the store (0: none yet).
#[derive(Clone, Default)]
struct Judge {
    current: Option<Arc<Current>>,
    members: Option<Arc<HashSet<String>>>,
    rev: u64,
}

/// What a change of one entry did to what is visible.
type Seen = Option<Stored>;

/// Whether a step changed what an entry holds, and what it holds after
/// (`None`: the entry is gone).
#[derive(Clone, Copy)]
enum Effect<'e> {
    Changed(Option<&'e Entry>),
    /// The entry is as it was (what is visible may still have moved: a
    /// reconciliation hides an entry it did not touch).
    Unchanged(Option<&'e Entry>),
}

impl<'e> Effect<'e> {
    fn of(changed: bool, entry: Option<&'e Entry>) -> Self {
        if changed {
            Self::Changed(entry)
        } else {
            Self::Unchanged(entry)
        }
    }

    fn entry(self) -> Option<&'e Entry> {
        match self {
            Self::Changed(entry) | Self::Unchanged(entry) => entry,
        }
    }
}

/// What one step did to one entry: whether the entry now holds anything
/// new (so its state must be written down), and what was visible before
/// and after it.
struct Step {
    changed: bool,
    before: Seen,
    after: Seen,
    /// The version a delete is recorded with.
    deleted: Version,
}

/// Why a write through a [`Writer`] was not made. Nothing of it is
/// stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Full(#[from] Full),
    #[error(transparent)]
    PreconditionFailed(#[from] PreconditionFailed),
    /// The shared store could not be reached (never in memory).
    #[error("{0}")]
    Unavailable(String),
}

/// How many times a write works itself out again after other processes
/// changed its record first, before it gives up as unavailable.
const CONFLICTS: usize = 1_000;

/// A table's writes, wherever its state is kept: in memory each is one
/// step under the shard lock; on a shared store it is a compare-and-set
/// of the new state there (see [`crate::engine::store`]).
pub struct Writer<'t> {
    table: &'t Table,
}

impl Writer<'_> {
    /// [`Table::apply`]: one write (versioned tables), room for which
    /// ingest has reserved.
    pub async fn apply(&self, write: Write, cause: &Cause) -> Result<Outcome, WriteError> {
        let table = self.table;
        let Some(store) = table.store.get() else {
            return Ok(table.apply(write, cause));
        };
        let id = write.id.clone();
        let outcome = table
            .shared(store, &id, cause, false, |entry, current| {
                let (outcome, step) = table.apply_step(entry, current, write.clone());
                (outcome, Some(step))
            })
            .await?;
        table.count(outcome);
        Ok(outcome)
    }

    /// [`Table::apply_if`]: one write, if the stored record meets `expect`.
    pub async fn apply_if(
        &self,
        write: Write,
        expect: Expect,
        cause: &Cause,
    ) -> Result<Outcome, WriteError> {
        let table = self.table;
        let Some(store) = table.store.get() else {
            return Ok(table.apply_if(write, expect, cause)?);
        };
        let id = write.id.clone();
        let outcome = table
            .shared(store, &id, cause, false, |entry, current| {
                let stored = entry.visible(table.order, current).map(|s| s.version.at);
                if !expect.met_by(stored) {
                    return (Err(PreconditionFailed { current: stored }), None);
                }
                let (outcome, step) = table.apply_step(entry, current, write.clone());
                (Ok(outcome), Some(step))
            })
            .await??;
        table.count(outcome);
        Ok(outcome)
    }

    /// [`Table::delete`]: deletes `id` as of `at` (versioned tables).
    pub async fn delete(
        &self,
        id: &RecordId,
        at: Timestamp,
        cause: &Cause,
    ) -> Result<Outcome, WriteError> {
        let table = self.table;
        let Some(store) = table.store.get() else {
            return Ok(table.delete(id, at, cause));
        };
        let outcome = table
            .shared(store, id, cause, false, |entry, current| {
                let (outcome, step) = table.delete_step(entry, current, at);
                (outcome, Some(step))
            })
            .await?;
        table.count(outcome);
        Ok(outcome)
    }

    /// [`Table::derive`]: what the source change `seq` says of `id`
    /// (sequenced tables).
    pub async fn derive(
        &self,
        id: &RecordId,
        seq: u64,
        version: Version,
        data: Option<Data>,
        cause: &Cause,
    ) -> Result<Outcome, WriteError> {
        let table = self.table;
        let Some(store) = table.store.get() else {
            return Ok(table.derive(id, seq, version, data, cause)?);
        };
        let outcome = table
            .shared(store, id, cause, true, |entry, _| {
                table.derive_step(entry, seq, version.clone(), data.clone())
            })
            .await?;
        table.count(outcome);
        Ok(outcome)
    }

    /// [`Table::list`]: sets or removes `parent`'s listing of the child
    /// `id` (child tables).
    pub async fn list(
        &self,
        id: &RecordId,
        parent: &RecordId,
        listing: Option<(Version, Data)>,
        removed: Version,
        cause: &Cause,
    ) -> Result<(), WriteError> {
        let table = self.table;
        let Some(store) = table.store.get() else {
            return Ok(table.list(id, parent, listing, removed, cause)?);
        };
        table
            .shared(store, id, cause, true, |entry, current| {
                if listing.is_none() && entry.is_empty() {
                    return ((), None);
                }
                let step =
                    table.list_step(entry, current, parent, listing.clone(), removed.clone());
                ((), Some(step))
            })
            .await
    }
}

impl Writer<'_> {
    /// [`Table::reconcile`]: the complete set `writes` as of `as_of`
    /// (versioned tables). On a shared store the reconciliation is made
    /// current there first, if it is the greatest, then each write is
    /// applied, then every other record is judged under it, which writes
    /// the change of each it hides (or brings back). Any later write to a
    /// record does the same for it, so one cut short by a crash is
    /// finished by the next reconciliation of the table, or the next
    /// write of each record.
    pub async fn reconcile(
        &self,
        as_of: Timestamp,
        writes: Vec<Write>,
        cause: &Cause,
    ) -> Result<Reconciliation, WriteError> {
        let table = self.table;
        let Some(store) = table.store.get() else {
            return Ok(table.reconcile(as_of, writes, cause));
        };
        let mut report = Reconciliation {
            as_of: Some(as_of),
            ..Default::default()
        };
        let mut ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if let Ok(ids) = Data::of_canonical(&ids) {
            table.publish_current(store, Current { as_of, ids }).await?;
        }
        let members: HashSet<RecordId> = writes.iter().map(|w| w.id.clone()).collect();
        for write in writes {
            match self.apply(write, cause).await? {
                Outcome::Inserted => report.inserted += 1,
                Outcome::Updated => report.updated += 1,
                Outcome::Unchanged => report.unchanged += 1,
                _ => report.stale += 1,
            }
        }
        for id in table.ids() {
            if members.contains(&id) {
                continue;
            }
            let hid = table
                .shared(store, &id, cause, false, |entry, current| {
                    let after = entry.visible(table.order, current).cloned();
                    let hid = entry.announced && after.is_none();
                    let hide = Version::delete(current.map_or(as_of, |c| c.as_of));
                    let step = Step {
                        changed: false,
                        before: None,
                        after,
                        deleted: hide,
                    };
                    (hid, Some(step))
                })
                .await?;
            if hid {
                report.deleted.push(id);
            }
        }
        Ok(report)
    }
}

impl Expect {
    /// Whether a record stored at `stored` (`None`: none live) meets this.
    fn met_by(self, stored: Option<Timestamp>) -> bool {
        match (self, stored) {
            (Expect::Exists, Some(_)) => true,
            (Expect::Version(want), Some(have)) => want == have,
            (_, None) => false,
        }
    }
}

impl Table {
    pub fn new(name: &str, kind: TableKind, log: Arc<ChangeLog>) -> Self {
        Self {
            name: name.into(),
            kind,
            order: match kind {
                TableKind::Raw | TableKind::System => Order::Versioned,
                TableKind::Standard | TableKind::View => Order::Sequenced,
            },
            versions_are_changes: false,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: BTreeMap::new(),
                        current: None,
                    })
                })
                .collect(),
            hasher: Default::default(),
            reconciling: Mutex::new(None),
            limit: AtomicU64::new(u64::MAX),
            counters: Counters::default(),
            log,
            store: OnceLock::new(),
            judge: Mutex::new(Judge::default()),
        }
    }

    /// A raw table of parents' child lists: written at ingest by the
    /// parent versions that carry the list, and emitting a change whenever
    /// the listing version moves, since that version is the one each listed
    /// child is written with.
    pub fn listing(name: &str, log: Arc<ChangeLog>) -> Self {
        Self {
            versions_are_changes: true,
            ..Self::new(name, TableKind::Raw, log)
        }
    }

    pub fn name(&self) -> &TableName {
        &self.name
    }

    /// The journal this table's effects go to, on a data directory.
    pub(crate) fn journal(&self) -> Option<&Arc<crate::storage::journal::Journal>> {
        self.log.journal()
    }

    pub fn kind(&self) -> TableKind {
        self.kind
    }

    /// Sets the most entries this table keeps (`u64::MAX`, the default,
    /// for no limit).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    fn full(&self) -> Full {
        Full {
            table: self.name.clone(),
            entries: self.entries(),
            limit: self.limit(),
        }
    }

    /// Reserves room for those of `ids` the table does not keep yet, or
    /// fails if they would take it past its limit. Held while the writes
    /// for them are applied, so concurrent requests cannot all pass one
    /// check.
    pub fn reserve<'i>(
        &self,
        ids: impl IntoIterator<Item = &'i RecordId>,
    ) -> Result<Reservation<'_>, Full> {
        let limit = self.limit();
        if limit == u64::MAX {
            return Ok(Reservation::none());
        }
        let new = self.new_ids(ids);
        let counters = &self.counters;
        counters
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
                let entries = counters.entries.load(Ordering::Acquire);
                (entries.saturating_add(reserved).saturating_add(new) <= limit)
                    .then_some(reserved + new)
            })
            .map_err(|_| self.full())?;
        Ok(Reservation {
            table: Some(self),
            room: new,
        })
    }

    /// Ids kept, and room promised to ingest requests writing now.
    fn used(&self) -> u64 {
        self.counters
            .entries
            .load(Ordering::Acquire)
            .saturating_add(self.counters.reserved.load(Ordering::Acquire))
    }

    /// How many of `ids` the table keeps nothing for yet.
    fn new_ids<'i>(&self, ids: impl IntoIterator<Item = &'i RecordId>) -> u64 {
        let mut ids: Vec<&RecordId> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter(|id| !self.shard(id.as_str()).entries.contains_key(*id))
            .count() as u64
    }

    /// Fails if those of `ids` the table does not keep yet would take it
    /// past its limit (reserving nothing: for writes that come later, by a
    /// handler, and are checked again then).
    pub fn room_for(&self, ids: &[RecordId]) -> Result<(), Full> {
        let limit = self.limit();
        if limit == u64::MAX {
            return Ok(());
        }
        let new = self.new_ids(ids);
        if self.used().saturating_add(new) > limit {
            return Err(self.full());
        }
        Ok(())
    }

    /// The entry for `id`, made if new, for a handler's write: a new entry
    /// must find room beside what ingest has reserved.
    fn slot<'s>(
        &self,
        entries: &'s mut BTreeMap<RecordId, Entry>,
        id: &RecordId,
    ) -> Result<&'s mut Entry, Full> {
        let limit = self.limit();
        if limit != u64::MAX && !entries.contains_key(id) && self.used() >= limit {
            return Err(self.full());
        }
        Ok(self.reserved_slot(entries, id))
    }

    /// The entry for `id`, made if new, for a write ingest reserved room for.
    fn reserved_slot<'s>(
        &self,
        entries: &'s mut BTreeMap<RecordId, Entry>,
        id: &RecordId,
    ) -> &'s mut Entry {
        match entries.entry(id.clone()) {
            Slot::Occupied(entry) => entry.into_mut(),
            Slot::Vacant(vacant) => {
                self.counters.entries.fetch_add(1, Ordering::AcqRel);
                vacant.insert(Entry::default())
            }
        }
    }

    fn shard_index(&self, id: &str) -> usize {
        (self.hasher.hash_one(id) as usize) % SHARDS
    }

    fn lock_shard(&self, index: usize) -> MutexGuard<'_, Shard> {
        // Critical sections never panic midway through a change to an entry,
        // so a poisoned shard is still consistent.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shard(&self, id: &str) -> MutexGuard<'_, Shard> {
        self.lock_shard(self.shard_index(id))
    }

    /// Counts an outcome; a delete of nothing live is not one the
    /// table's stats show.
    fn count(&self, outcome: Outcome) {
        if outcome != Outcome::Absent {
            self.counters.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Applies one write (versioned tables).
    pub fn apply(&self, write: Write, cause: &Cause) -> Outcome {
        let mut shard = self.shard(write.id.as_str());
        self.apply_locked(&mut shard, write, cause)
    }

    /// Applies one write if the stored record meets `expect`; nothing is
    /// written otherwise.
    pub fn apply_if(
        &self,
        write: Write,
        expect: Expect,
        cause: &Cause,
    ) -> Result<Outcome, PreconditionFailed> {
        let mut shard = self.shard(write.id.as_str());
        let current = shard.current.clone();
        let stored = shard
            .entries
            .get(&write.id)
            .and_then(|e| e.visible(self.order, current.as_deref()))
            .map(|s| s.version.at);
        if !expect.met_by(stored) {
            return Err(PreconditionFailed { current: stored });
        }
        Ok(self.apply_locked(&mut shard, write, cause))
    }

    /// Applies many writes, in order.
    pub fn apply_all(
        &self,
        writes: impl IntoIterator<Item = Write>,
        cause: &Cause,
    ) -> Vec<Outcome> {
        writes.into_iter().map(|w| self.apply(w, cause)).collect()
    }

    fn apply_locked(&self, shard: &mut Shard, write: Write, cause: &Cause) -> Outcome {
        let id = write.id.clone();
        let current = shard.current.clone();
        let entry = self.reserved_slot(&mut shard.entries, &id);
        let (outcome, step) = self.apply_step(entry, current.as_deref(), write);
        self.emit(&id, Effect::of(step.changed, Some(entry)), step, cause);
        self.count(outcome);
        outcome
    }

    /// A write's outcome, and what it does to `entry`.
    fn apply_step(
        &self,
        entry: &mut Entry,
        current: Option<&Current>,
        write: Write,
    ) -> (Outcome, Step) {
        let Write { version, data, .. } = write;
        let before = entry.visible(self.order, current).cloned();
        let outcome = if entry.dead_at(version.at, current) {
            Outcome::Stale
        } else {
            match &before {
                None => Outcome::Inserted,
                Some(b) if b.data == data => Outcome::Unchanged,
                Some(b) if version <= b.version => Outcome::Stale,
                Some(_) => Outcome::Updated,
            }
        };
        let newer = entry.own.as_ref().is_none_or(|own| version > own.version);
        if newer {
            entry.own = Some(Stored {
                version: version.clone(),
                data,
            });
        }
        let after = entry.visible(self.order, current).cloned();
        let step = Step {
            changed: newer,
            before,
            after,
            deleted: Version::delete(version.at),
        };
        (outcome, step)
    }

    /// Appends the change that turned `before` into `after`, if any, and
    /// keeps the live count. `deleted` is the version a delete is recorded
    /// with.
    fn emit(&self, id: &RecordId, effect: Effect<'_>, step: Step, cause: &Cause) {
        // On a data directory every change of an entry is a frame, whether
        // or not it changes what is visible (a newer version with equal
        // data, a tombstone, a reconciliation mark): restart must rebuild
        // what the table received, not only what it showed.
        let journaled = self.log.journal().is_some();
        let put = match effect {
            Effect::Changed(entry) if journaled => Some(self.put_frame(id, entry)),
            _ => None,
        };
        let Some((kind, version, data)) = self.change_of(step) else {
            return self.journal_only(put);
        };
        match kind {
            ChangeKind::Inserted => self.counters.live.fetch_add(1, Ordering::Relaxed),
            ChangeKind::Deleted => self.counters.live.fetch_sub(1, Ordering::Relaxed),
            ChangeKind::Updated => 0,
        };
        // The frame travels with the change, even when only what is visible
        // moved, so that the change is in the log and marks its place
        // there (a change without a frame would never become durable).
        let put = put.or_else(|| journaled.then(|| self.put_frame(id, effect.entry())));
        self.log
            .append(&self.name, id.clone(), kind, version, data, cause, put);
    }

    /// The change a step makes to what is visible, if any: its kind, the
    /// version it is recorded with and the record's data after it.
    fn change_of(&self, step: Step) -> Option<(ChangeKind, Version, Option<Data>)> {
        match (step.before, step.after) {
            (None, None) => None,
            (None, Some(a)) => Some((ChangeKind::Inserted, a.version, Some(a.data))),
            (Some(_), None) => Some((ChangeKind::Deleted, step.deleted, None)),
            (Some(b), Some(a)) => {
                let moved = self.versions_are_changes && b.version != a.version;
                (b.data != a.data || moved).then_some((
                    ChangeKind::Updated,
                    a.version,
                    Some(a.data),
                ))
            }
        }
    }

    /// Writes an entry's frame for a step that emitted no change.
    fn journal_only(&self, put: Option<Vec<u8>>) {
        if let (Some(journal), Some(put)) = (self.log.journal(), put) {
            journal.append_raw(effect::PUT, &put);
        }
    }

    fn put_frame(&self, id: &RecordId, entry: Option<&Entry>) -> Vec<u8> {
        effect::encode(&PutFrame {
            t: &*self.name,
            id: id.as_str(),
            e: entry.map(Entry::image),
        })
    }

    /// Deletes `id` as of `at` (versioned tables): writes at or before `at`
    /// are dead from now on.
    pub fn delete(&self, id: &RecordId, at: Timestamp, cause: &Cause) -> Outcome {
        let mut shard = self.shard(id.as_str());
        let current = shard.current.clone();
        let entry = self.reserved_slot(&mut shard.entries, id);
        let (outcome, step) = self.delete_step(entry, current.as_deref(), at);
        self.emit(id, Effect::of(step.changed, Some(entry)), step, cause);
        self.count(outcome);
        outcome
    }

    fn delete_step(
        &self,
        entry: &mut Entry,
        current: Option<&Current>,
        at: Timestamp,
    ) -> (Outcome, Step) {
        let before = entry.visible(self.order, current).cloned();
        let was = entry.deleted;
        entry.deleted = was.max(Some(at));
        let after = entry.visible(self.order, current).cloned();
        let outcome = match (&before, &after) {
            (_, Some(_)) => Outcome::Stale,
            (Some(_), None) => Outcome::Deleted,
            (None, None) if was.is_some_and(|w| w > at) => Outcome::Stale,
            (None, None) => Outcome::Absent,
        };
        let step = Step {
            changed: entry.deleted != was,
            before,
            after,
            deleted: Version::delete(at),
        };
        (outcome, step)
    }

    /// Sets what the source change `seq` says of `id` (sequenced tables):
    /// `Some` writes it, `None` deletes it; a change older than the one
    /// already applied is stale. `version` is the source's version, shown
    /// with the record (and with the change, for a delete).
    pub fn derive(
        &self,
        id: &RecordId,
        seq: u64,
        version: Version,
        data: Option<Data>,
        cause: &Cause,
    ) -> Result<Outcome, Full> {
        let mut shard = self.shard(id.as_str());
        let entry = self.slot(&mut shard.entries, id)?;
        let (outcome, step) = self.derive_step(entry, seq, version, data);
        if let Some(step) = step {
            self.emit(id, Effect::Changed(Some(entry)), step, cause);
        }
        self.count(outcome);
        Ok(outcome)
    }

    /// A derived write's outcome, and what it does to `entry` (nothing if
    /// it is stale).
    fn derive_step(
        &self,
        entry: &mut Entry,
        seq: u64,
        version: Version,
        data: Option<Data>,
    ) -> (Outcome, Option<Step>) {
        if seq <= entry.seq {
            return (Outcome::Stale, None);
        }
        entry.seq = seq;
        let before = entry.own.take();
        entry.own = data.map(|data| Stored {
            version: version.clone(),
            data,
        });
        let after = entry.own.clone();
        let outcome = match (&before, &after) {
            (None, None) => Outcome::Absent,
            (None, Some(_)) => Outcome::Inserted,
            (Some(_), None) => Outcome::Deleted,
            (Some(b), Some(a)) if b.data == a.data => Outcome::Unchanged,
            (Some(_), Some(_)) => Outcome::Updated,
        };
        let step = Step {
            changed: true,
            before,
            after,
            deleted: version,
        };
        (outcome, Some(step))
    }

    /// Sets `parent`'s listing of the child `id` to `listing` (its version
    /// and the child's data), or removes it (`None`) (child tables). The
    /// child's record is the greatest of its own write and its listings; a
    /// child no longer listed by anyone and never written itself is
    /// deleted, the change recorded with `removed`.
    pub fn list(
        &self,
        id: &RecordId,
        parent: &RecordId,
        listing: Option<(Version, Data)>,
        removed: Version,
        cause: &Cause,
    ) -> Result<(), Full> {
        let mut shard = self.shard(id.as_str());
        if listing.is_none() && !shard.entries.contains_key(id) {
            return Ok(());
        }
        let current = shard.current.clone();
        let entry = self.slot(&mut shard.entries, id)?;
        let step = self.list_step(entry, current.as_deref(), parent, listing, removed);
        let effect = if entry.is_empty() {
            shard.entries.remove(id);
            self.counters.entries.fetch_sub(1, Ordering::AcqRel);
            Effect::of(true, None)
        } else {
            Effect::of(true, Some(entry))
        };
        self.emit(id, effect, step, cause);
        Ok(())
    }

    fn list_step(
        &self,
        entry: &mut Entry,
        current: Option<&Current>,
        parent: &RecordId,
        listing: Option<(Version, Data)>,
        removed: Version,
    ) -> Step {
        let before = entry.visible(self.order, current).cloned();
        entry.listed.retain(|l| l.parent != *parent);
        if let Some((version, data)) = listing {
            entry.listed.push(Listed {
                parent: parent.clone(),
                value: Stored { version, data },
            });
        }
        let after = entry.visible(self.order, current).cloned();
        Step {
            changed: true,
            before,
            after,
            deleted: removed,
        }
    }

    /// Full-set reconciliation (versioned tables): `writes` are the
    /// complete set as of `as_of`.
    ///
    /// Each is applied as a write. If this reconciliation is now the
    /// current one (API.md: the greatest `as_of`, then the greater JSON of
    /// its sorted ids), every id its set lacks is hidden unless its record
    /// is newer than `as_of`, and ids an older current one hid that this
    /// set has come back. A reconciliation that is not current hides
    /// nothing.
    pub fn reconcile(&self, as_of: Timestamp, writes: Vec<Write>, cause: &Cause) -> Reconciliation {
        let mut report = Reconciliation {
            as_of: Some(as_of),
            ..Default::default()
        };
        let mut ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Ids cannot hold control characters, so serde_json writes their
        // list as RFC 8785 does.
        let candidate = Data::of_canonical(&ids).map(|ids| Arc::new(Current { as_of, ids }));
        let mut by_shard: Vec<Vec<Write>> = (0..SHARDS).map(|_| Vec::new()).collect();
        for write in writes {
            by_shard[self.shard_index(write.id.as_str())].push(write);
        }
        let mut reconciling = self.reconciling.lock().unwrap_or_else(|e| e.into_inner());
        let becomes_current = match &candidate {
            Ok(c) => reconciling.as_ref().is_none_or(|old| **c > **old),
            Err(_) => false,
        };
        let current = candidate.ok().filter(|_| becomes_current);
        if let Some(current) = &current {
            *reconciling = Some(current.clone());
            if let Some(journal) = self.log.journal() {
                journal.append(
                    effect::CURRENT,
                    &CurrentFrame {
                        t: self.name.to_string(),
                        a: current.as_of.into(),
                        ids: current.ids.clone(),
                    },
                );
            }
        }
        for (index, writes) in by_shard.into_iter().enumerate() {
            let mut shard = self.lock_shard(index);
            if let Some(current) = &current {
                self.make_current(&mut shard, current, &writes, cause, &mut report.deleted);
            }
            for write in writes {
                match self.apply_locked(&mut shard, write, cause) {
                    Outcome::Inserted => report.inserted += 1,
                    Outcome::Updated => report.updated += 1,
                    Outcome::Unchanged => report.unchanged += 1,
                    _ => report.stale += 1,
                }
            }
        }
        report.deleted.sort();
        report
    }

    /// Makes `current` this shard's current reconciliation: its members are
    /// in the set (created if new, so their writes are judged as members),
    /// everyone else is not; records that leave view are deleted, ids that
    /// come back are inserted.
    fn make_current(
        &self,
        shard: &mut Shard,
        current: &Arc<Current>,
        members: &[Write],
        cause: &Cause,
        hid: &mut Vec<RecordId>,
    ) {
        let old = shard.current.replace(current.clone());
        for write in members {
            self.reserved_slot(&mut shard.entries, &write.id);
        }
        let members: HashSet<&str> = members.iter().map(|w| w.id.as_str()).collect();
        let hide = Version::delete(current.as_of);
        for (id, entry) in shard.entries.iter_mut() {
            let before = entry.visible(self.order, old.as_deref()).cloned();
            let was = entry.in_set;
            entry.in_set = members.contains(id.as_str());
            let after = entry.visible(self.order, Some(current)).cloned();
            if before.is_some() && after.is_none() {
                hid.push(id.clone());
            }
            let step = Step {
                changed: entry.in_set != was,
                before,
                after,
                deleted: hide.clone(),
            };
            self.emit(id, Effect::of(step.changed, Some(entry)), step, cause);
        }
    }

    // Restoring from a data directory, before anything else touches the
    // table. Counters are recomputed by `finish_restore`.

    /// Sets an entry as a frame found it, and returns the change the frame
    /// carries (its data is the entry's record).
    pub(crate) fn restore_put(
        &self,
        id: RecordId,
        image: Option<EntryImage>,
        change: Option<ChangeImage>,
        correlations: &mut Correlations,
    ) -> Result<Option<Change>, String> {
        let mut shard = self.shard(id.as_str());
        let record = match image {
            None => {
                shard.entries.remove(&id);
                None
            }
            Some(image) => {
                let entry = Entry::from_image(image)?;
                let record = entry.best().map(|s| (s.version.clone(), s.data.clone()));
                shard.entries.insert(id.clone(), entry);
                record
            }
        };
        drop(shard);
        change
            .map(|change| change.get(&self.name, id, record, correlations))
            .transpose()
    }

    /// The id, version and data `key`'s entry holds, if they equal
    /// `version` and `data`: a change read back from a snapshot then
    /// shares them instead of keeping a copy of its own.
    pub(crate) fn restored_record(
        &self,
        key: &str,
        version: &Version,
        data: &Data,
    ) -> Option<(RecordId, Version, Data)> {
        let shard = self.shard(key);
        let (id, entry) = shard.entries.get_key_value(key)?;
        entry
            .best()
            .filter(|s| s.version == *version && s.data == *data)
            .map(|s| (id.clone(), s.version.clone(), s.data.clone()))
    }

    /// Makes a reconciliation read back from disk the current one (the
    /// entries' marks come with their own frames).
    pub(crate) fn restore_current(&self, as_of: Timestamp, ids: Data) {
        let current = Arc::new(Current { as_of, ids });
        let mut reconciling = self.reconciling.lock().unwrap_or_else(|e| e.into_inner());
        if reconciling.as_ref().is_some_and(|old| **old >= *current) {
            return;
        }
        *reconciling = Some(current.clone());
        for index in 0..SHARDS {
            self.lock_shard(index).current = Some(current.clone());
        }
    }

    /// Recounts entries and live records once every frame is restored.
    pub(crate) fn finish_restore(&self) {
        let (mut entries, mut live) = (0, 0);
        for index in 0..SHARDS {
            let shard = self.lock_shard(index);
            entries += shard.entries.len() as u64;
            live += shard
                .entries
                .values()
                .filter(|e| e.visible(self.order, shard.current.as_deref()).is_some())
                .count() as u64;
        }
        self.counters.entries.store(entries, Ordering::Release);
        self.counters.live.store(live, Ordering::Relaxed);
    }

    /// Completes a reconciliation that a crash cut short: marks, shard by
    /// shard, what the current one's set holds, emitting the hides it had
    /// not reached. A no-op when it had finished (nothing flips).
    pub(crate) fn finish_reconciliation(&self, cause: &Cause) {
        let current = self
            .reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(current) = current else { return };
        let members: HashSet<String> =
            serde_json::from_str(current.ids.as_str()).unwrap_or_default();
        let hide = Version::delete(current.as_of);
        for index in 0..SHARDS {
            let mut shard = self.lock_shard(index);
            for (id, entry) in shard.entries.iter_mut() {
                let want = members.contains(id.as_str());
                if entry.in_set == want {
                    continue;
                }
                let before = entry.visible(self.order, Some(&current)).cloned();
                entry.in_set = want;
                let after = entry.visible(self.order, Some(&current)).cloned();
                let step = Step {
                    changed: true,
                    before,
                    after,
                    deleted: hide.clone(),
                };
                self.emit(id, Effect::Changed(Some(entry)), step, cause);
            }
        }
    }

    /// Writes the table as snapshot frames: its current reconciliation,
    /// then every entry.
    pub(crate) fn save(&self, out: &mut dyn FnMut(u8, &[u8])) {
        let current = self
            .reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(current) = current {
            let frame = CurrentFrame {
                t: self.name.to_string(),
                a: current.as_of.into(),
                ids: current.ids.clone(),
            };
            out(effect::CURRENT, &effect::encode(&frame));
        }
        for index in 0..SHARDS {
            let frames: Vec<Vec<u8>> = {
                let shard = self.lock_shard(index);
                shard
                    .entries
                    .iter()
                    .map(|(id, entry)| self.put_frame(id, Some(entry)))
                    .collect()
            };
            for frame in frames {
                out(effect::PUT, &frame);
            }
        }
    }

    // On a shared store.

    /// Makes this table a replica of `store`: its writes go there from now
    /// on, through [`Table::writer`].
    pub fn share(&self, store: Arc<dyn Store>) -> Result<(), Arc<dyn Store>> {
        self.store.set(store)
    }

    /// Whether this table is a replica of a shared store.
    pub fn is_shared(&self) -> bool {
        self.store.get().is_some()
    }

    /// This table's writes, in memory or on its shared store.
    pub fn writer(&self) -> Writer<'_> {
        Writer { table: self }
    }

    /// On a shared store: the current reconciliation, its members and its
    /// revision there (0: none yet).
    fn shared_current(&self) -> Judge {
        self.judge.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Works out a write from the replica's copy of `id` with `step`, and
    /// publishes the entry it leaves (with its change) if the record's
    /// state in the store is still that copy; otherwise reads the latest
    /// state and works it out again. `limited`: a new id must find room
    /// (a handler's write; ingest reserved room before it wrote).
    ///
    /// Before `step`, the entry's reconciliation mark is set from the
    /// current reconciliation's set, and the change is worked out from
    /// what the change log last said of the record, so a record a newer
    /// reconciliation hid has its change written by whichever write
    /// touches it first. If a newer reconciliation arrived while this one
    /// was published, the record is judged again under it.
    async fn shared<R>(
        &self,
        store: &Arc<dyn Store>,
        id: &RecordId,
        cause: &Cause,
        limited: bool,
        mut step: impl FnMut(&mut Entry, Option<&Current>) -> (R, Option<Step>),
    ) -> Result<R, WriteError> {
        // Set once the write is in the store; later rounds only judge the
        // record again, under a newer reconciliation.
        let mut done: Option<R> = None;
        for _ in 0..CONFLICTS {
            let judge = self.shared_current();
            let (mut entry, known) = {
                let shard = self.shard(id.as_str());
                let entry = shard.entries.get(id);
                let known = entry.is_some_and(|e| !e.is_empty());
                (entry.cloned().unwrap_or_default(), known)
            };
            if done.is_none()
                && limited
                && !known
                && self.limit() != u64::MAX
                && self.used() >= self.limit()
            {
                return Err(self.full().into());
            }
            let expected = entry.rev;
            let said = entry.announced.then(|| entry.best().cloned()).flatten();
            let marked = entry.in_set;
            if let Some(members) = &judge.members {
                entry.in_set = members.contains(id.as_str());
            }
            let current = judge.current.as_deref();
            let (fresh, step) = if done.is_some() {
                let hide = current.map_or(Version::delete(Timestamp::EPOCH), |c| {
                    Version::delete(c.as_of)
                });
                let step = Step {
                    changed: false,
                    before: None,
                    after: entry.visible(self.order, current).cloned(),
                    deleted: hide,
                };
                (None, Some(step))
            } else {
                let (value, step) = step(&mut entry, current);
                (Some(value), step)
            };
            let Some(mut step) = step else {
                return Ok(done.or(fresh).expect("a step's result"));
            };
            step.before = said;
            step.changed |= entry.in_set != marked;
            entry.announced = step.after.is_some();
            let changed = step.changed;
            let change = self.change_of(step);
            if changed || change.is_some() {
                let frame = self.state_frame(id, &entry, change, cause);
                let key = Key::Record(id.as_str());
                match store.put(&self.name, key, expected, frame).await {
                    Ok(_) => {}
                    Err(StoreError::Conflict) => {
                        // Worked out again from the latest state (only
                        // judged again, if it was written already).
                        self.refresh(store, id).await?;
                        continue;
                    }
                    Err(error) => return Err(WriteError::Unavailable(error.to_string())),
                }
            }
            let result = done.take().or(fresh).expect("a step's result");
            if self.shared_current().rev == judge.rev {
                return Ok(result);
            }
            done = Some(result);
        }
        Err(WriteError::Unavailable(format!(
            "the record `{id}` of `{}` kept changing under this write",
            self.name
        )))
    }

    /// After a conflict: reads `id`'s latest state from the store into the
    /// replica.
    async fn refresh(&self, store: &Arc<dyn Store>, id: &RecordId) -> Result<(), WriteError> {
        let latest = store
            .latest(&self.name, Key::Record(id.as_str()))
            .await
            .map_err(|e| WriteError::Unavailable(e.to_string()))?;
        if let Some(latest) = latest {
            let frame: StateFrame =
                effect::decode(effect::STATE, &latest.frame).map_err(WriteError::Unavailable)?;
            let entry = Entry::of_state(frame.e).map_err(WriteError::Unavailable)?;
            self.install(id, latest.rev, entry, frame.live)
                .map_err(WriteError::Unavailable)?;
        }
        Ok(())
    }

    /// The message of `id`'s new state `entry`, with the change it makes.
    fn state_frame(
        &self,
        id: &RecordId,
        entry: &Entry,
        change: Option<(ChangeKind, Version, Option<Data>)>,
        cause: &Cause,
    ) -> Vec<u8> {
        let change = change.map(|(kind, version, _)| {
            let time = Timestamp::now();
            ChangeImage {
                s: 0,
                id: log::event_id(time),
                k: kind,
                v: (kind == ChangeKind::Deleted).then(|| VersionImage::of(&version, None)),
                at: time.into(),
                c: &*cause.correlation,
                by: cause.causation,
            }
        });
        effect::encode(&StateFrame {
            t: &*self.name,
            id: id.as_str(),
            // A derived delete of a record never written still holds its
            // sequence: an older source change's write after it is stale.
            e: (!entry.is_empty() || entry.seq > 0).then(|| entry.image()),
            live: entry.announced,
            change,
        })
    }

    /// Takes a state the shared store sent, at its revision `rev`, and
    /// returns the change it carries, numbered by `rev`. A state older than
    /// the replica's copy (read again, or read ahead by a write) leaves the
    /// entry as it is; its change is still returned, for the log.
    pub fn replicate(
        &self,
        rev: u64,
        frame: StateFrame,
        correlations: &mut Correlations,
    ) -> Result<Option<Change>, String> {
        let id = RecordId::derived(frame.id);
        let entry = Entry::of_state(frame.e)?;
        let change = frame
            .change
            .map(|change| {
                Self::change_of_state(&self.name, id.clone(), rev, &entry, change, correlations)
            })
            .transpose()?;
        self.install(&id, rev, entry, frame.live)?;
        Ok(change)
    }

    /// The change a state of `table`'s record `id` at revision `rev`
    /// carries, if any, numbered by `rev`: its data are the record the
    /// entry `image` holds.
    pub fn carried(
        table: &TableName,
        id: RecordId,
        rev: u64,
        image: Option<EntryImage>,
        change: Option<ChangeImage>,
        correlations: &mut Correlations,
    ) -> Result<Option<Change>, String> {
        let Some(change) = change else {
            return Ok(None);
        };
        let entry = Entry::of_state(image)?;
        Self::change_of_state(table, id, rev, &entry, change, correlations).map(Some)
    }

    fn change_of_state(
        table: &TableName,
        id: RecordId,
        rev: u64,
        entry: &Entry,
        mut change: ChangeImage,
        correlations: &mut Correlations,
    ) -> Result<Change, String> {
        let record = entry.best().map(|s| (s.version.clone(), s.data.clone()));
        change.s = rev;
        change.get(table, id, record, correlations)
    }

    /// Sets the replica's copy of `id` to the store's state at `rev`,
    /// unless it already holds that one or a later one. A state that holds
    /// nothing (a child no parent lists any more) is kept as an empty
    /// entry, not counted, so that its revision is known to the next write.
    fn install(&self, id: &RecordId, rev: u64, mut entry: Entry, live: bool) -> Result<(), String> {
        entry.rev = rev;
        entry.announced = live;
        let mut shard = self.shard(id.as_str());
        let current = shard.current.clone();
        let current = current.as_deref();
        let (was_live, was_kept) = match shard.entries.get(id) {
            Some(old) if old.rev >= rev => return Ok(()),
            Some(old) => (old.visible(self.order, current).is_some(), !old.is_empty()),
            None => (false, false),
        };
        let now_live = entry.visible(self.order, current).is_some();
        let now_kept = !entry.is_empty();
        shard.entries.insert(id.clone(), entry);
        match (was_kept, now_kept) {
            (false, true) => self.counters.entries.fetch_add(1, Ordering::AcqRel),
            (true, false) => self.counters.entries.fetch_sub(1, Ordering::AcqRel),
            _ => 0,
        };
        match (was_live, now_live) {
            (false, true) => self.counters.live.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.counters.live.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
        Ok(())
    }

    /// Takes the table's current reconciliation as the shared store sent
    /// it, at its revision `rev`: from now on it judges what is visible
    /// here, and every write's reconciliation mark. An older one than the
    /// replica holds is ignored.
    pub fn replicate_current(&self, rev: u64, frame: CurrentFrame) -> Result<(), String> {
        let as_of = frame.a.get()?;
        let members: HashSet<String> =
            serde_json::from_str(frame.ids.as_str()).map_err(|e| e.to_string())?;
        let current = Arc::new(Current {
            as_of,
            ids: frame.ids,
        });
        let mut judge = self.judge.lock().unwrap_or_else(|e| e.into_inner());
        if judge.rev >= rev {
            return Ok(());
        }
        *judge = Judge {
            current: Some(current.clone()),
            members: Some(Arc::new(members)),
            rev,
        };
        *self.reconciling.lock().unwrap_or_else(|e| e.into_inner()) = Some(current.clone());
        let mut live = 0;
        for index in 0..SHARDS {
            let mut shard = self.lock_shard(index);
            shard.current = Some(current.clone());
            live += shard
                .entries
                .values()
                .filter(|e| e.visible(self.order, Some(&current)).is_some())
                .count() as u64;
        }
        self.counters.live.store(live, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes `candidate` as the table's current reconciliation if it
    /// is greater than the one the store holds (the greatest `as_of`, then
    /// the greater JSON of its ids), and waits until the replica has it.
    async fn publish_current(
        &self,
        store: &Arc<dyn Store>,
        candidate: Current,
    ) -> Result<(), WriteError> {
        let unavailable = |e: StoreError| WriteError::Unavailable(e.to_string());
        for _ in 0..CONFLICTS {
            let judge = self.shared_current();
            if judge.current.as_deref().is_some_and(|c| *c >= candidate) {
                return Ok(());
            }
            let frame = effect::encode(&CurrentFrame {
                t: self.name.to_string(),
                a: candidate.as_of.into(),
                ids: candidate.ids.clone(),
            });
            match store.put(&self.name, Key::Current, judge.rev, frame).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict) => {
                    let latest = store
                        .latest(&self.name, Key::Current)
                        .await
                        .map_err(unavailable)?;
                    if let Some(latest) = latest {
                        let frame = effect::decode(effect::CURRENT, &latest.frame)
                            .map_err(WriteError::Unavailable)?;
                        self.replicate_current(latest.rev, frame)
                            .map_err(WriteError::Unavailable)?;
                    }
                }
                Err(error) => return Err(unavailable(error)),
            }
        }
        Err(WriteError::Unavailable(format!(
            "the reconciliation of `{}` kept changing under this one",
            self.name
        )))
    }

    /// Every id the replica keeps, in order.
    fn ids(&self) -> Vec<RecordId> {
        let mut ids: Vec<RecordId> = (0..SHARDS)
            .flat_map(|index| {
                let shard = self.lock_shard(index);
                shard.entries.keys().cloned().collect::<Vec<_>>()
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The live record `id`, if any.
    pub fn get(&self, id: &str) -> Option<Record> {
        let shard = self.shard(id);
        let (id, entry) = shard.entries.get_key_value(id)?;
        let stored = entry.visible(self.order, shard.current.as_deref())?;
        Some(Record {
            id: id.clone(),
            version: stored.version.clone(),
            data: stored.data.clone(),
        })
    }

    /// A sequenced table: the change-log sequence `id` was last derived at
    /// (0 if never), deleted or not.
    pub fn seq_of(&self, id: &str) -> u64 {
        self.shard(id).entries.get(id).map_or(0, |entry| entry.seq)
    }

    /// Up to `limit` live records with ids after `after`, in id order, and
    /// the id to continue after if there are more.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Record>, Option<RecordId>) {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut records = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let current = shard.current.as_deref();
            records.extend(
                shard
                    .entries
                    .range::<str, _>((lower, Bound::Unbounded))
                    .filter_map(|(id, e)| {
                        let stored = e.visible(self.order, current)?;
                        Some(Record {
                            id: id.clone(),
                            version: stored.version.clone(),
                            data: stored.data.clone(),
                        })
                    })
                    .take(limit + 1),
            );
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        let more = records.len() > limit;
        records.truncate(limit);
        let next = if more {
            records.last().map(|r| r.id.clone())
        } else {
            None
        };
        (records, next)
    }

    /// Live records.
    pub fn len(&self) -> u64 {
        self.counters.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids the table keeps state for: live, deleted, hidden or listed.
    pub fn entries(&self) -> u64 {
        self.counters.entries.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> TableStats {
        let n = |o: Outcome| self.counters.outcomes[o as usize].load(Ordering::Relaxed);
        TableStats {
            inserted: n(Outcome::Inserted),
            updated: n(Outcome::Updated),
            unchanged: n(Outcome::Unchanged),
            stale: n(Outcome::Stale),
            deleted: n(Outcome::Deleted),
        }
    }

    /// Every live record in id order; for tests and tools that compare
    /// whole tables.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut all = Vec::new();
        let mut after: Option<RecordId> = None;
        loop {
            let (page, next) = self.page(after.as_ref().map(|a| a.as_str()), 10_000);
            all.extend(page);
            match next {
                Some(next) => after = Some(next),
                None => return all,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::settle::Activity;
    use serde_json::json;

    fn table() -> (Table, Arc<ChangeLog>) {
        let log = Arc::new(ChangeLog::new(1000, Activity::default()));
        (Table::new("t", TableKind::Raw, log.clone()), log)
    }

    fn at(text: &str) -> Timestamp {
        Timestamp::parse(&format!("2024-01-01T{text}Z")).unwrap()
    }

    fn write(id: &str, time: &str, data: serde_json::Value) -> Write {
        let data = Data::canonical(&data).unwrap();
        Write {
            id: RecordId::parse(id).unwrap(),
            version: Version::write(at(time), data.clone()),
            data,
        }
    }

    fn cause() -> Cause {
        Cause::request("test")
    }

    fn id(s: &str) -> RecordId {
        RecordId::parse(s).unwrap()
    }

    #[test]
    fn first_write_is_inserted_and_emitted() {
        let (t, log) = table();
        assert_eq!(
            t.apply(write("a", "00:00:01", json!({"x": 1})), &cause()),
            Outcome::Inserted
        );
        assert_eq!(t.len(), 1);
        assert_eq!(log.len(), 1);
        assert_eq!(t.get("a").unwrap().data.as_str(), r#"{"x":1}"#);
    }

    #[test]
    fn newer_different_data_is_updated() {
        let (t, log) = table();
        t.apply(write("a", "00:00:01", json!({"x": 1})), &cause());
        assert_eq!(
            t.apply(write("a", "00:00:02", json!({"x": 2})), &cause()),
            Outcome::Updated
        );
        assert_eq!(t.get("a").unwrap().version.at, at("00:00:02"));
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn older_or_equal_version_with_other_data_is_stale() {
        let (t, log) = table();
        t.apply(write("a", "00:00:02", json!({"x": 2})), &cause());
        assert_eq!(
            t.apply(write("a", "00:00:01", json!({"x": 1})), &cause()),
            Outcome::Stale
        );
        // Same instant, smaller tie-break key ({"x":0} < {"x":2}): stale.
        assert_eq!(
            t.apply(write("a", "00:00:02", json!({"x": 0})), &cause()),
            Outcome::Stale
        );
        assert_eq!(t.get("a").unwrap().data.as_str(), r#"{"x":2}"#);
        assert_eq!(log.len(), 1);
        assert_eq!(t.stats().stale, 2);
    }

    #[test]
    fn equal_instants_are_broken_by_the_greater_canonical_data() {
        let (t, _) = table();
        t.apply(write("a", "00:00:01", json!({"x": 1})), &cause());
        assert_eq!(
            t.apply(write("a", "00:00:01", json!({"x": 9})), &cause()),
            Outcome::Updated
        );
        let (u, _) = table();
        u.apply(write("a", "00:00:01", json!({"x": 9})), &cause());
        assert_eq!(
            u.apply(write("a", "00:00:01", json!({"x": 1})), &cause()),
            Outcome::Stale
        );
        assert_eq!(t.get("a").unwrap().data, u.get("a").unwrap().data);
    }

    #[test]
    fn equal_data_is_unchanged_and_a_newer_version_is_still_recorded() {
        let (t, log) = table();
        t.apply(write("a", "00:00:01", json!({"x": 1})), &cause());
        assert_eq!(
            t.apply(write("a", "00:00:03", json!({"x": 1})), &cause()),
            Outcome::Unchanged
        );
        assert_eq!(log.len(), 1, "a no-op emits nothing");
        assert_eq!(t.get("a").unwrap().version.at, at("00:00:03"));
        // A write between the two versions is now stale.
        assert_eq!(
            t.apply(write("a", "00:00:02", json!({"x": 2})), &cause()),
            Outcome::Stale
        );
        // An older write of the same data is unchanged, and does not lower the version.
        assert_eq!(
            t.apply(write("a", "00:00:00", json!({"x": 1})), &cause()),
            Outcome::Unchanged
        );
        assert_eq!(t.get("a").unwrap().version.at, at("00:00:03"));
    }

    #[test]
    fn delete_leaves_a_tombstone_that_makes_older_writes_stale() {
        let (t, log) = table();
        t.apply(write("a", "00:00:01", json!({"x": 1})), &cause());
        assert_eq!(
            t.delete(&id("a"), at("00:00:05"), &cause()),
            Outcome::Deleted
        );
        assert!(t.get("a").is_none());
        assert_eq!(t.len(), 0);
        assert_eq!(
            t.apply(write("a", "00:00:04", json!({"x": 2})), &cause()),
            Outcome::Stale
        );
        // At the tombstone's own instant a delete wins.
        assert_eq!(
            t.apply(write("a", "00:00:05", json!({"x": 2})), &cause()),
            Outcome::Stale
        );
        // Even the same data as before the delete is stale, not unchanged.
        assert_eq!(
            t.apply(write("a", "00:00:02", json!({"x": 1})), &cause()),
            Outcome::Stale
        );
        assert_eq!(
            t.apply(write("a", "00:00:06", json!({"x": 3})), &cause()),
            Outcome::Inserted
        );
        let kinds: Vec<_> = log
            .read(0, 10, |_| true)
            .unwrap()
            .events
            .iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                ChangeKind::Inserted,
                ChangeKind::Deleted,
                ChangeKind::Inserted
            ]
        );
    }

    #[test]
    fn delete_wins_at_an_equal_version_and_loses_to_a_newer_one() {
        let (t, _) = table();
        t.apply(write("a", "00:00:05", json!({"x": 1})), &cause());
        assert_eq!(t.delete(&id("a"), at("00:00:04"), &cause()), Outcome::Stale);
        assert!(t.get("a").is_some());
        assert_eq!(
            t.delete(&id("a"), at("00:00:05"), &cause()),
            Outcome::Deleted
        );
        assert!(t.get("a").is_none());
    }

    #[test]
    fn deleting_what_is_not_live_is_absent_but_remembered() {
        let (t, log) = table();
        assert_eq!(
            t.delete(&id("a"), at("00:00:05"), &cause()),
            Outcome::Absent
        );
        assert_eq!(
            t.apply(write("a", "00:00:04", json!({"x": 1})), &cause()),
            Outcome::Stale
        );
        assert_eq!(
            t.delete(&id("a"), at("00:00:06"), &cause()),
            Outcome::Absent
        );
        assert_eq!(t.delete(&id("a"), at("00:00:01"), &cause()), Outcome::Stale);
        assert!(log.is_empty());
    }

    #[test]
    fn if_match_writes_only_over_the_expected_version() {
        let (t, _) = table();
        let miss = t.apply_if(
            write("a", "00:00:01", json!({"x": 1})),
            Expect::Exists,
            &cause(),
        );
        assert_eq!(miss, Err(PreconditionFailed { current: None }));
        assert!(
            t.get("a").is_none(),
            "nothing stored on a failed precondition"
        );
        t.apply(write("a", "00:00:01", json!({"x": 1})), &cause());
        let wrong = t.apply_if(
            write("a", "00:00:02", json!({"x": 2})),
            Expect::Version(at("00:00:09")),
            &cause(),
        );
        assert_eq!(
            wrong,
            Err(PreconditionFailed {
                current: Some(at("00:00:01"))
            })
        );
        let right = t.apply_if(
            write("a", "00:00:02", json!({"x": 2})),
            Expect::Version(at("00:00:01")),
            &cause(),
        );
        assert_eq!(right, Ok(Outcome::Updated));
    }

    #[test]
    fn reconcile_deletes_exactly_the_unseen_older_records() {
        let (t, _) = table();
        t.apply(write("keep", "00:00:01", json!({"v": 1})), &cause());
        t.apply(write("gone", "00:00:01", json!({"v": 1})), &cause());
        t.apply(write("newer", "00:00:09", json!({"v": 1})), &cause());
        let report = t.reconcile(
            at("00:00:05"),
            vec![
                write("keep", "00:00:01", json!({"v": 1})),
                write("added", "00:00:02", json!({"v": 2})),
            ],
            &cause(),
        );
        assert_eq!(
            (
                report.inserted,
                report.unchanged,
                report.updated,
                report.stale
            ),
            (1, 1, 0, 0)
        );
        assert_eq!(report.deleted, vec![id("gone")]);
        let live: Vec<_> = t
            .page(None, 10)
            .0
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(live, ["added", "keep", "newer"]);
        // An older reconciliation deletes nothing newer than itself.
        let old = t.reconcile(at("00:00:03"), vec![], &cause());
        assert!(old.deleted.is_empty(), "{:?}", old.deleted);
    }

    #[test]
    fn pages_are_in_id_order_across_shards() {
        let (t, _) = table();
        for i in (0..250).rev() {
            t.apply(
                write(&format!("r{i:03}"), "00:00:01", json!({"i": i})),
                &cause(),
            );
        }
        t.delete(&id("r001"), at("00:00:02"), &cause());
        let (first, next) = t.page(None, 100);
        assert_eq!(first.len(), 100);
        assert_eq!(first[0].id.as_str(), "r000");
        assert_eq!(first[1].id.as_str(), "r002");
        let mut seen: Vec<_> = first.iter().map(|r| r.id.clone()).collect();
        let mut after = next;
        while let Some(cursor) = after {
            let (page, next) = t.page(Some(cursor.as_str()), 100);
            seen.extend(page.iter().map(|r| r.id.clone()));
            after = next;
        }
        assert_eq!(seen.len(), 249);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }
}
