//! Parent-owned children: a parent's child list as a record of its own.
//!
//! When one record carries the complete list of its children (a series'
//! episodes, a video's renditions), the list is versioned apart from the
//! parent (API.md, "Children belong to their parent"):
//!
//! - the list is set only by parent versions that carry the field, so it
//!   lives in a listing table beside the parent's (`raw_series_episodes`
//!   beside `raw_series`), written at ingest in the same step: a version
//!   without the field changes nothing, in any order, and a stale parent
//!   version can still carry the greatest list;
//! - the list that counts is the listing table's record while the parent
//!   is live (a deleted or hidden parent lists nothing);
//! - a handler that sees a change of either table calls [`Children::refresh`],
//!   which reads the parent's current listing and hands it, with the one
//!   applied before, to the caller to apply. Refreshes apply in change-log
//!   order per parent: one for an older change than the last applied is
//!   skipped, because that one read a state at least as new.
//!
//! The result is the same whichever worker handles which change first: the
//! refresh for the last change of a parent reads the final state and is
//! applied last.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use serde_json::value::RawValue;

use super::record::{Data, RecordId, Timestamp, Version};
use super::store::{Key, Store, StoreError};
use super::table::{Table, Write};
use crate::storage::effect::{self, AppliedFrame, ListingImage, MarkFrame, VersionImage};
use std::sync::Arc;

/// A parent's child list as it counts now: the listing version and each
/// child's id and data, in list order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub version: Version,
    pub children: Vec<(RecordId, Data)>,
}

impl Listing {
    /// The data this listing gives `child`, if it lists it.
    pub fn child(&self, child: &RecordId) -> Option<&Data> {
        self.children
            .iter()
            .find(|(id, _)| id == child)
            .map(|(_, data)| data)
    }
}

/// Turns a listing record's data (the list as sent) into children; an
/// error is a permanent failure naming the field.
pub type Split = fn(parent: &RecordId, list: &Data) -> Result<Vec<(RecordId, Data)>, String>;

#[derive(Clone)]
struct Applied {
    /// Sequence of the change whose refresh was applied last.
    seq: u64,
    listing: Option<Listing>,
    /// On a shared store: the revision of this mark there.
    rev: u64,
    /// On a shared store: the refresh under way, and since when.
    holder: Option<(Uuid, Timestamp)>,
}

/// One parent/child pair: the parent table, its listing table, and what
/// each parent's listing last applied.
pub struct Children {
    /// The field of a parent record that lists its children.
    pub field: &'static str,
    /// The parents (`raw_series`): a parent lists children only while live.
    pub parent: Arc<Table>,
    /// The parents' lists, one record per parent (`raw_series_episodes`).
    pub listing: Arc<Table>,
    split: Split,
    /// The listing applied per parent. Held while a refresh reads and
    /// applies, so refreshes of one parent apply in sequence order; lock
    /// order: this, then table shards, then the change log. Never held
    /// across an await.
    applied: Mutex<HashMap<RecordId, Applied>>,
    /// On a shared store: where the marks are kept (see [`Children::begin`]).
    store: OnceLock<Arc<dyn Store>>,
    /// On a shared store: told each time a mark arrives.
    marks: watch::Sender<u64>,
}

/// On a shared store: a refresh of one parent begun by [`Children::begin`],
/// for the caller to apply and then hand to [`Children::finish`].
pub struct Plan {
    parent: RecordId,
    /// The sequence the mark will say was applied.
    seq: u64,
    /// What the children may be now: every child of the last listing
    /// applied and of the current one (the ones only the current lists,
    /// with data no child has, so they are written whatever was).
    pub previous: Option<Listing>,
    /// The parent's listing as it counts now.
    pub current: Option<Listing>,
    /// The mark's revision once the plan was written.
    rev: u64,
}

/// How long a refresh of one parent may hold it before another process
/// takes it over (the holder died, or stopped answering).
const LEASE: Duration = Duration::from_secs(10);

impl Children {
    pub fn new(field: &'static str, parent: Arc<Table>, listing: Arc<Table>, split: Split) -> Self {
        Self {
            field,
            parent,
            listing,
            split,
            applied: Mutex::new(HashMap::new()),
            store: OnceLock::new(),
            marks: watch::Sender::new(0),
        }
    }

    /// Makes this pair a replica of `store`: refreshes go through
    /// [`Children::begin`] and [`Children::finish`] from now on, and the
    /// marks come back through [`Children::replicate_mark`].
    pub fn share(&self, store: Arc<dyn Store>) -> Result<(), Arc<dyn Store>> {
        self.store.set(store)
    }

    /// Whether refreshes go through a shared store.
    pub fn is_shared(&self) -> bool {
        self.store.get().is_some()
    }

    fn mark_of(&self, parent: &RecordId) -> Option<Applied> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(parent)
            .cloned()
    }

    /// On a shared store: begins the refresh of `parent` for its change
    /// `seq`, unless a refresh that read the state as of that change or
    /// later was applied (`again`: this one's writes may have come after
    /// it, so it is done again).
    ///
    /// One process at a time refreshes a parent, as the lock makes it in
    /// memory: the parent's mark in the store names the refresh under way
    /// (set by compare-and-set), and a refresh that finds another's waits
    /// for it to finish, or for [`LEASE`] to pass if its process died. The
    /// mark is set, before anything is written, to every child the last
    /// listing applied and the current one have, so a refresh cut short
    /// leaves a mark that makes the next drop or write each of them. The
    /// sequence the mark will say was applied is how far the replica had
    /// got when the listing was read, so one refresh covers every change
    /// of the parent up to there.
    pub async fn begin(
        &self,
        parent: &RecordId,
        seq: u64,
        again: bool,
    ) -> Result<Option<Plan>, RefreshError> {
        let Some(store) = self.store.get() else {
            return Err(RefreshError::Unavailable("not on a shared store".into()));
        };
        let me = Uuid::new_v4();
        let mut marks = self.marks.subscribe();
        for _ in 0..CONFLICTS {
            marks.mark_unchanged();
            let applied = self.mark_of(parent);
            let held = applied
                .as_ref()
                .and_then(|a| a.holder)
                .filter(|(_, since)| !expired(*since));
            if let Some((_, since)) = held {
                let left = LEASE.saturating_sub(age(since));
                // Woken by any mark; a wait that runs out takes it over.
                let _ = tokio::time::timeout(left, marks.changed()).await;
                continue;
            }
            if !again && applied.as_ref().is_some_and(|a| seq <= a.seq) {
                return Ok(None);
            }
            let read_at = store.applied();
            let current = self.current(parent).map_err(RefreshError::Listing)?;
            let intent = self
                .intent(parent, applied.as_ref(), current.as_ref())
                .map_err(RefreshError::Listing)?;
            let previous = intent.l.as_ref().map(listing_of).transpose();
            let previous = previous.map_err(RefreshError::Listing)?;
            let rev = applied.as_ref().map_or(0, |a| a.rev);
            let frame = effect::encode(&MarkFrame {
                applied: intent,
                holder: Some((me, Timestamp::now().into())),
            });
            match store
                .put(self.listing.name(), Key::Mark(parent.as_str()), rev, frame)
                .await
            {
                Ok(rev) => {
                    let done = applied.map_or(0, |a| a.seq);
                    return Ok(Some(Plan {
                        parent: parent.clone(),
                        seq: seq.max(read_at).max(done),
                        previous,
                        current,
                        rev,
                    }));
                }
                Err(StoreError::Conflict) => self.refresh_mark(store, parent).await?,
                Err(StoreError::Unavailable(e)) => return Err(RefreshError::Unavailable(e)),
            }
        }
        Err(RefreshError::Unavailable(format!(
            "the children of `{parent}` kept changing under this refresh"
        )))
    }

    /// On a shared store: marks `plan` applied once its writes are made.
    /// `false` if another refresh of the parent moved the mark since
    /// [`Children::begin`]: the caller begins again, with `again` set.
    pub async fn finish(&self, plan: Plan) -> Result<bool, RefreshError> {
        let Some(store) = self.store.get() else {
            return Err(RefreshError::Unavailable("not on a shared store".into()));
        };
        let frame = effect::encode(&MarkFrame {
            applied: self.frame(&plan.parent, plan.seq, plan.current.as_ref()),
            holder: None,
        });
        let key = Key::Mark(plan.parent.as_str());
        match store.put(self.listing.name(), key, plan.rev, frame).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict) => {
                self.refresh_mark(store, &plan.parent).await?;
                Ok(false)
            }
            Err(StoreError::Unavailable(e)) => Err(RefreshError::Unavailable(e)),
        }
    }

    async fn refresh_mark(
        &self,
        store: &Arc<dyn Store>,
        parent: &RecordId,
    ) -> Result<(), RefreshError> {
        let latest = store
            .latest(self.listing.name(), Key::Mark(parent.as_str()))
            .await
            .map_err(|e| RefreshError::Unavailable(e.to_string()))?;
        if let Some(latest) = latest {
            let frame =
                effect::decode(effect::MARK, &latest.frame).map_err(RefreshError::Unavailable)?;
            self.replicate_mark(latest.rev, frame)
                .map_err(RefreshError::Unavailable)?;
        }
        Ok(())
    }

    /// Takes a parent's mark as the shared store sent it, at its revision
    /// `rev`, unless the replica holds that one or a later one.
    pub fn replicate_mark(&self, rev: u64, frame: MarkFrame) -> Result<(), String> {
        let MarkFrame {
            applied: frame,
            holder,
        } = frame;
        let listing = frame.l.as_ref().map(listing_of).transpose()?;
        let holder = holder
            .map(|(id, since)| since.get().map(|since| (id, since)))
            .transpose()?;
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let parent = RecordId::derived(frame.p);
        if applied.get(&parent).is_some_and(|a| a.rev >= rev) {
            return Ok(());
        }
        applied.insert(
            parent,
            Applied {
                seq: frame.s,
                listing,
                rev,
                holder,
            },
        );
        drop(applied);
        self.marks.send_replace(rev);
        Ok(())
    }

    /// The listing-table write for a parent write, if the write carries
    /// the field (`null` counts as absent). The listing is versioned by
    /// the parent's full version, tie-break key included.
    pub fn listing_write(&self, write: &Write) -> Option<Write> {
        let list = field(&write.data, self.field)?;
        // `{"<field>": <list>}`: the field name is plain ASCII and the list
        // a part of canonical JSON, so this is canonical too.
        let data = Data::of_canonical(&HashMap::from([(self.field, list)])).ok()?;
        Some(Write {
            id: write.id.clone(),
            version: write.version.clone(),
            data,
        })
    }

    /// The ids `list` (a listing's data) names, or none if it does not parse.
    pub fn child_ids(&self, parent: &RecordId, list: &Data) -> Vec<RecordId> {
        field(list, self.field)
            .and_then(Data::of_part)
            .and_then(|list| (self.split)(parent, &list).ok())
            .map(|children| children.into_iter().map(|(id, _)| id).collect())
            .unwrap_or_default()
    }

    /// The parent's listing as it counts now.
    pub fn current(&self, parent: &RecordId) -> Result<Option<Listing>, String> {
        if self.parent.get(parent.as_str()).is_none() {
            return Ok(None);
        }
        let Some(record) = self.listing.get(parent.as_str()) else {
            return Ok(None);
        };
        let list = field(&record.data, self.field)
            .and_then(Data::of_part)
            .ok_or_else(|| format!("the listing of `{parent}` has no `{}`", self.field))?;
        Ok(Some(Listing {
            children: (self.split)(parent, &list)?,
            version: record.version,
        }))
    }

    /// For the change `seq` of `parent` (in either table): reads its
    /// current listing and, unless a refresh for a newer change was applied
    /// already, calls `apply(previous, current)` holding this pair's lock,
    /// then, if it succeeded, remembers `current`. Returns what `apply`
    /// returned, or `None` if skipped.
    pub fn refresh<R>(
        &self,
        parent: &RecordId,
        seq: u64,
        apply: impl FnOnce(Option<&Listing>, Option<&Listing>) -> Result<R, String>,
    ) -> Result<Option<R>, String> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let previous = applied.get(parent);
        if previous.is_some_and(|p| seq <= p.seq) {
            return Ok(None);
        }
        let current = self.current(parent)?;
        if let Some(journal) = self.listing.journal() {
            // Before the effects, so that a restart knows every child they
            // may have written, whatever part of them reached the disk.
            let frame = self.intent(parent, previous, current.as_ref())?;
            journal.append(effect::APPLIED, &frame);
        }
        let result = apply(previous.and_then(|p| p.listing.as_ref()), current.as_ref())?;
        // Kept with no listing too: its sequence stops an older refresh
        // from bringing the children back.
        applied.insert(
            parent.clone(),
            Applied {
                seq,
                listing: current,
                rev: 0,
                holder: None,
            },
        );
        Ok(Some(result))
    }
}

/// The JSON of `name` in an object's canonical JSON (`null` counts as absent).
impl Children {
    fn frame(&self, parent: &RecordId, seq: u64, listing: Option<&Listing>) -> AppliedFrame {
        AppliedFrame {
            t: self.listing.name().to_string(),
            p: parent.to_string(),
            s: seq,
            l: listing.map(|l| ListingImage {
                v: VersionImage::of(&l.version, None),
                c: l.children
                    .iter()
                    .map(|(id, data)| (id.to_string(), data.clone()))
                    .collect(),
            }),
        }
    }

    /// What a restart takes as applied if it finds a refresh begun: the
    /// previous sequence (so the change is refreshed again) and every child
    /// of the previous and the current listing (so that one the refresh
    /// dropped is dropped again), under a version no listing has. A child
    /// the previous listing had keeps the data it had there; one only the
    /// current listing has gets data no child has (`null`), so the refresh
    /// writes it again, encode job and all, whatever part of it reached the
    /// disk.
    fn intent(
        &self,
        parent: &RecordId,
        previous: Option<&Applied>,
        current: Option<&Listing>,
    ) -> Result<AppliedFrame, String> {
        let unknown = Data::of_canonical(&()).map_err(|e| e.to_string())?;
        let before = previous.and_then(|p| p.listing.as_ref());
        let mut children: Vec<(RecordId, Data)> =
            before.map(|l| l.children.clone()).unwrap_or_default();
        for (child, _) in current.map_or(&[][..], |c| &c.children[..]) {
            if before.and_then(|l| l.child(child)).is_none() {
                children.push((child.clone(), unknown.clone()));
            }
        }
        let union = Listing {
            version: Version::delete(Timestamp::EPOCH),
            children,
        };
        Ok(self.frame(parent, previous.map_or(0, |p| p.seq), Some(&union)))
    }

    /// Puts back what a frame read from disk says was applied.
    pub(crate) fn restore(&self, frame: AppliedFrame) -> Result<(), String> {
        let listing = frame.l.as_ref().map(listing_of).transpose()?;
        // Frames come in the order they were written, each holding every
        // child the state before it held: the last one stands.
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.insert(
            RecordId::derived(frame.p),
            Applied {
                seq: frame.s,
                listing,
                rev: 0,
                holder: None,
            },
        );
        Ok(())
    }

    /// Writes what was applied, per parent, as snapshot frames.
    pub(crate) fn save(&self, out: &mut dyn FnMut(u8, &[u8])) {
        let frames: Vec<AppliedFrame> = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(parent, a)| self.frame(parent, a.seq, a.listing.as_ref()))
            .collect();
        for frame in frames {
            out(effect::APPLIED, &effect::encode(&frame));
        }
    }
}

/// How long ago `since` was (none if it is ahead of this clock).
fn age(since: Timestamp) -> Duration {
    (chrono::Utc::now() - since.as_datetime())
        .to_std()
        .unwrap_or_default()
}

/// Whether a refresh under way since `since` has held its parent too long.
fn expired(since: Timestamp) -> bool {
    age(since) >= LEASE
}

/// A listing as a mark frame holds it.
fn listing_of(image: &ListingImage) -> Result<Listing, String> {
    Ok(Listing {
        version: image.v.clone().get(None)?,
        children: image
            .c
            .iter()
            .map(|(id, data)| (RecordId::derived(id.clone()), data.clone()))
            .collect(),
    })
}

/// Why a refresh on a shared store was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The parent's listing cannot be read (a permanent failure).
    #[error("{0}")]
    Listing(String),
    /// The shared store could not be reached.
    #[error("{0}")]
    Unavailable(String),
}

/// How many times a refresh begins again after other processes moved the
/// mark first, before it gives up as unavailable.
const CONFLICTS: usize = 1_000;

fn field<'a>(object: &'a Data, name: &str) -> Option<&'a RawValue> {
    let fields: HashMap<String, &RawValue> = serde_json::from_str(object.as_str()).ok()?;
    fields.get(name).copied().filter(|v| v.get() != "null")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::log::{Cause, ChangeLog};
    use crate::engine::record::Timestamp;
    use crate::engine::settle::Activity;
    use crate::engine::table::TableKind;
    use serde_json::json;

    fn split(_: &RecordId, list: &Data) -> Result<Vec<(RecordId, Data)>, String> {
        let items: Vec<serde_json::Value> =
            serde_json::from_str(list.as_str()).map_err(|e| e.to_string())?;
        items
            .iter()
            .map(|item| {
                let id = RecordId::parse(item["id"].as_str().unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                Ok((id, Data::canonical(item).map_err(|e| e.to_string())?))
            })
            .collect()
    }

    fn write(secs: i64, value: serde_json::Value) -> Write {
        let at = Timestamp::from_datetime(chrono::DateTime::from_timestamp(secs, 0).unwrap());
        let data = Data::canonical(&value).unwrap();
        Write {
            id: RecordId::parse("p").unwrap(),
            version: Version::write(at, data.clone()),
            data,
        }
    }

    fn pair() -> Children {
        let log = Arc::new(ChangeLog::new(100, Activity::default()));
        Children::new(
            "kids",
            Arc::new(Table::new("parents", TableKind::Raw, log.clone())),
            Arc::new(Table::listing("parents_kids", log)),
            split,
        )
    }

    fn ingest(children: &Children, w: Write) {
        let cause = Cause::request("test");
        if let Some(listing) = children.listing_write(&w) {
            children.listing.apply(listing, &cause);
        }
        children.parent.apply(w, &cause);
    }

    fn ids(listing: Option<&Listing>) -> Vec<String> {
        listing
            .map(|l| l.children.iter().map(|(id, _)| id.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_version_without_the_field_keeps_the_list() {
        let children = pair();
        ingest(
            &children,
            write(1, json!({"id": "p", "kids": [{"id": "a"}]})),
        );
        ingest(&children, write(2, json!({"id": "p", "title": "new"})));
        let p = RecordId::parse("p").unwrap();
        assert_eq!(ids(children.current(&p).unwrap().as_ref()), ["a"]);
        // An older version's list loses to the newer list.
        ingest(&children, write(0, json!({"id": "p", "kids": []})));
        assert_eq!(ids(children.current(&p).unwrap().as_ref()), ["a"]);
    }

    #[test]
    fn refreshes_apply_in_sequence_order() {
        let children = pair();
        ingest(
            &children,
            write(1, json!({"id": "p", "kids": [{"id": "a"}]})),
        );
        let p = RecordId::parse("p").unwrap();
        let seen = children
            .refresh(&p, 5, |prev, cur| Ok((ids(prev), ids(cur))))
            .unwrap();
        assert_eq!(seen, Some((vec![], vec!["a".to_string()])));
        assert_eq!(children.refresh(&p, 4, |_, _| Ok(())).unwrap(), None);
        assert_eq!(children.refresh(&p, 5, |_, _| Ok(())).unwrap(), None);
        children
            .parent
            .delete(&p, Timestamp::now(), &Cause::request("test"));
        let seen = children
            .refresh(&p, 6, |prev, cur| Ok((ids(prev), ids(cur))))
            .unwrap();
        assert_eq!(seen, Some((vec!["a".to_string()], vec![])));
    }
}
