//! Tables: versioned maps that drop stale and no-op writes.
//!
//! A table holds at most one live record per id with its [`Version`]. Each
//! write has exactly one [`Outcome`], decided in this order:
//!
//! 1. a tombstone at or above the write's version: `stale`;
//! 2. data equal to the stored data: `unchanged` (a newer version is still
//!    recorded, so a later write between the two versions is stale whatever
//!    the arrival order);
//! 3. a version not newer than the stored one: `stale`;
//! 4. otherwise `inserted` (nothing live) or `updated`.
//!
//! A delete at or above the stored version leaves a tombstone. Only
//! `inserted`, `updated` and `deleted` are changes: each is appended to the
//! [`ChangeLog`] inside the same critical section as the write, so the log
//! order per record is the write order and no change can be lost between
//! the two. The final state is independent of the order and number of times
//! writes arrive (see `tests/properties.rs`).
//!
//! Records are spread over shards, each a `BTreeMap` behind a `std` mutex:
//! writes to different shards do not contend, and id-ordered paging is a
//! merge of the shards' ordered ranges.

use std::collections::{BTreeMap, btree_map};
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use super::log::{Cause, ChangeKind, ChangeLog, TableName};
use super::record::{Data, RecordId, Tie, Timestamp, Version};

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
    /// A delete of a record that was not live (a tombstone is still kept,
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

/// Who writes a table: ingest (`raw`, as received) or handlers (`standard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Raw,
    Standard,
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
    /// Ids deleted because the set did not contain them, in id order.
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
}

/// A stored entry: a live record, or a tombstone when `data` is `None`.
///
/// The version is kept as its two halves rather than as a [`Version`],
/// whose padding would make every entry 8 bytes larger (64 rather than 56;
/// a table holds one entry per id it has seen).
struct Entry {
    tie: Tie,
    data: Option<Data>,
    at: Timestamp,
    /// The latest reconciliation whose set contained this id.
    seen: Option<Timestamp>,
}

impl Entry {
    fn new(version: Version, data: Option<Data>, seen: Option<Timestamp>) -> Self {
        Self {
            tie: version.tie,
            data,
            at: version.at,
            seen,
        }
    }

    fn version(&self) -> Version {
        Version {
            at: self.at,
            tie: self.tie.clone(),
        }
    }

    /// The stored version against `version`, as `Version`'s order has it.
    fn cmp_version(&self, version: &Version) -> std::cmp::Ordering {
        (self.at, &self.tie).cmp(&(version.at, &version.tie))
    }

    fn set_version(&mut self, version: Version) {
        self.at = version.at;
        self.tie = version.tie;
    }
}

type Shard = BTreeMap<RecordId, Entry>;

pub struct Table {
    name: TableName,
    kind: TableKind,
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    counters: Counters,
    log: Arc<ChangeLog>,
}

impl Table {
    pub fn new(name: &str, kind: TableKind, log: Arc<ChangeLog>) -> Self {
        Self {
            name: name.into(),
            kind,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: Default::default(),
            counters: Counters::default(),
            log,
        }
    }

    pub fn name(&self) -> &TableName {
        &self.name
    }

    pub fn kind(&self) -> TableKind {
        self.kind
    }

    fn shard(&self, id: &str) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(id) as usize) % SHARDS;
        // Critical sections never panic midway through a change to an entry,
        // so a poisoned shard is still consistent.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, outcome: Outcome) {
        self.counters.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Applies one write.
    pub fn apply(&self, write: Write, cause: &Cause) -> Outcome {
        let mut shard = self.shard(write.id.as_str());
        self.apply_locked(&mut shard, write, cause, None)
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
        let current = shard
            .get(&write.id)
            .filter(|e| e.data.is_some())
            .map(|e| e.at);
        let met = match (expect, current) {
            (Expect::Exists, Some(_)) => true,
            (Expect::Version(want), Some(have)) => want == have,
            (_, None) => false,
        };
        if !met {
            return Err(PreconditionFailed { current });
        }
        Ok(self.apply_locked(&mut shard, write, cause, None))
    }

    /// Applies many writes, in order.
    pub fn apply_all(
        &self,
        writes: impl IntoIterator<Item = Write>,
        cause: &Cause,
    ) -> Vec<Outcome> {
        writes.into_iter().map(|w| self.apply(w, cause)).collect()
    }

    fn apply_locked(
        &self,
        shard: &mut Shard,
        write: Write,
        cause: &Cause,
        seen: Option<Timestamp>,
    ) -> Outcome {
        let Write { id, version, data } = write;
        // One search of the map, whether the id is new or not.
        let outcome = match shard.entry(id) {
            btree_map::Entry::Vacant(slot) => {
                self.record_change(
                    ChangeKind::Inserted,
                    slot.key(),
                    &version,
                    Some(&data),
                    cause,
                );
                slot.insert(Entry::new(version, Some(data), seen));
                Outcome::Inserted
            }
            btree_map::Entry::Occupied(mut slot) => {
                let id = slot.key().clone();
                let entry = slot.get_mut();
                if let Some(seen) = seen {
                    entry.seen = entry.seen.max(Some(seen));
                }
                let newer = entry.cmp_version(&version).is_lt();
                match &entry.data {
                    None if !newer => Outcome::Stale,
                    None => {
                        self.record_change(ChangeKind::Inserted, &id, &version, Some(&data), cause);
                        entry.set_version(version);
                        entry.data = Some(data);
                        Outcome::Inserted
                    }
                    Some(stored) if *stored == data => {
                        if newer {
                            entry.set_version(version);
                        }
                        Outcome::Unchanged
                    }
                    Some(_) if !newer => Outcome::Stale,
                    Some(_) => {
                        self.record_change(ChangeKind::Updated, &id, &version, Some(&data), cause);
                        entry.set_version(version);
                        entry.data = Some(data);
                        Outcome::Updated
                    }
                }
            }
        };
        if outcome == Outcome::Inserted {
            self.counters.live.fetch_add(1, Ordering::Relaxed);
        }
        self.count(outcome);
        outcome
    }

    fn record_change(
        &self,
        kind: ChangeKind,
        id: &RecordId,
        version: &Version,
        data: Option<&Data>,
        cause: &Cause,
    ) {
        self.log.append(
            &self.name,
            id.clone(),
            kind,
            version.clone(),
            data.cloned(),
            cause,
        );
    }

    /// Deletes `id` as of `at`: a tombstone at `at` unless something newer
    /// is stored.
    pub fn delete(&self, id: &RecordId, at: Timestamp, cause: &Cause) -> Outcome {
        let mut shard = self.shard(id.as_str());
        self.delete_locked(&mut shard, id, Version::delete(at), cause)
    }

    fn delete_locked(
        &self,
        shard: &mut Shard,
        id: &RecordId,
        version: Version,
        cause: &Cause,
    ) -> Outcome {
        let outcome = match shard.get_mut(id) {
            None => {
                shard.insert(id.clone(), Entry::new(version, None, None));
                Outcome::Absent
            }
            Some(entry) if entry.data.is_none() => {
                if entry.cmp_version(&version).is_gt() {
                    Outcome::Stale
                } else {
                    entry.set_version(version);
                    Outcome::Absent
                }
            }
            Some(entry) if entry.cmp_version(&version).is_gt() => Outcome::Stale,
            Some(entry) => {
                self.record_change(ChangeKind::Deleted, id, &version, None, cause);
                entry.set_version(version);
                entry.data = None;
                self.counters.live.fetch_sub(1, Ordering::Relaxed);
                Outcome::Deleted
            }
        };
        if outcome != Outcome::Absent {
            self.count(outcome);
        }
        outcome
    }

    /// Full-set reconciliation: `writes` are the complete set as of `as_of`.
    ///
    /// Each is applied and marked seen at `as_of`; then every live record
    /// neither seen at or after `as_of` nor versioned at or after `as_of` is
    /// deleted with version `as_of`. A reconciliation older than one already
    /// applied therefore deletes nothing newer.
    pub fn reconcile(&self, as_of: Timestamp, writes: Vec<Write>, cause: &Cause) -> Reconciliation {
        let mut report = Reconciliation {
            as_of: Some(as_of),
            ..Default::default()
        };
        for write in writes {
            let mut shard = self.shard(write.id.as_str());
            match self.apply_locked(&mut shard, write, cause, Some(as_of)) {
                Outcome::Inserted => report.inserted += 1,
                Outcome::Updated => report.updated += 1,
                Outcome::Unchanged => report.unchanged += 1,
                _ => report.stale += 1,
            }
        }
        let tombstone = Version::delete(as_of);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let unseen: Vec<RecordId> = shard
                .iter()
                .filter(|(_, e)| {
                    e.data.is_some() && e.seen.is_none_or(|s| s < as_of) && e.at < as_of
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in unseen {
                if self.delete_locked(&mut shard, &id, tombstone.clone(), cause) == Outcome::Deleted
                {
                    report.deleted.push(id);
                }
            }
        }
        report.deleted.sort();
        report
    }

    /// The live record `id`, if any.
    pub fn get(&self, id: &str) -> Option<Record> {
        let shard = self.shard(id);
        let (id, entry) = shard.get_key_value(id)?;
        Some(Record {
            id: id.clone(),
            version: entry.version(),
            data: entry.data.clone()?,
        })
    }

    /// Up to `limit` live records with ids after `after`, in id order, and
    /// the id to continue after if there are more.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Record>, Option<RecordId>) {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut records = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            records.extend(
                shard
                    .range::<str, _>((lower, Bound::Unbounded))
                    .filter_map(|(id, e)| {
                        Some(Record {
                            id: id.clone(),
                            version: e.version(),
                            data: e.data.clone()?,
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

    /// Every entry as `(id, version, data)`, tombstones included (`None`);
    /// for tests and tools that compare whole tables.
    pub fn snapshot(&self) -> Vec<(RecordId, Version, Option<Data>)> {
        let mut all: Vec<_> = self
            .shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard
                    .iter()
                    .map(|(id, e)| (id.clone(), e.version(), e.data.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
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

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_entry_is_the_sum_of_its_parts_without_padding() {
        // tie and data (16 each), at and seen (12 each).
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    #[test]
    fn entries_order_versions_as_versions_do() {
        let key = |text: &str| Data::canonical(&json!({ "k": text })).unwrap();
        let versions = [
            Version::write(at("00:00:01"), key("a")),
            Version::write(at("00:00:01"), key("b")),
            Version::delete(at("00:00:01")),
            Version::write(at("00:00:02"), key("a")),
        ];
        for stored in &versions {
            let entry = Entry::new(stored.clone(), None, None);
            assert_eq!(&entry.version(), stored);
            for other in &versions {
                assert_eq!(
                    entry.cmp_version(other),
                    stored.cmp(other),
                    "{stored:?} vs {other:?}"
                );
            }
        }
    }
}
