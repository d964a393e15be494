//! `raw_handler`: from raw changes to standard records (scenarios 1 to 4).
//!
//! Each change on `raw_queue` names the table it came from, and that table
//! has one [`Route`]: the standard table its records become, and, for a
//! parent kind (or its listing table), the [`Children`] pair and the
//! [`ChildSink`] its children go to:
//!
//! - a series' episodes become listings in `raw_episodes`, which come back
//!   through `raw_queue` (recursive breakdown);
//! - a video's renditions become encode jobs on `encode_queue`, one per
//!   rendition whose data changed (async secondary work), and its
//!   `rendition_ids`.
//!
//! Standard records are derived: each is written with the change-log
//! sequence of the change it was computed for, so the record of the last
//! change wins whichever worker finishes first. Everything here is safe to
//! redo: a retried change that was applied already is stale.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use prometheus_client::metrics::histogram::Histogram;
use uuid::Uuid;

use crate::engine::children::{Children, Listing, RefreshError};
use crate::engine::handler::{Failure, Process};
use crate::engine::log::{Cause, Change, ChangeKind, TableName};
use crate::engine::queue::{Queue, SendError};
use crate::engine::record::{Data, RecordId, Tie, Version};
use crate::engine::table::{Outcome, Table, WriteError};

use super::encode_handler::EncodeJob;
use super::records::{Kind, Rendition, standardise};

/// Where a parent's children go once its listing changes.
pub trait ChildSink: Send + Sync {
    /// Applies the change from `previous` to `current` for `parent`, made
    /// for `change`, and returns the encode jobs to send. Its writes go
    /// through each table's writer: in memory they are made at once (it
    /// runs under the pair's lock, through [`at_once`]); on a shared store
    /// each is a compare-and-set there.
    fn apply<'a>(
        &'a self,
        parent: &'a RecordId,
        change: &'a Change,
        previous: Option<&'a Listing>,
        current: Option<&'a Listing>,
        cause: &'a Cause,
    ) -> BoxFuture<'a, Result<Vec<EncodeJob>, Failure>>;

    /// The table the children are written to.
    fn table(&self) -> &Arc<Table>;

    /// The id of `parent`'s child `child` in [`ChildSink::table`].
    fn key(&self, parent: &RecordId, child: &RecordId) -> RecordId;

    /// Fails, before anything is written, if the new children of `previous`
    /// to `current` would take the table past its limit, so that a parent is
    /// never left with part of its children written.
    fn room(
        &self,
        parent: &RecordId,
        previous: Option<&Listing>,
        current: Option<&Listing>,
    ) -> Result<(), String> {
        let keys: Vec<RecordId> = previous
            .into_iter()
            .chain(current)
            .flat_map(|l| l.children.iter().map(|(child, _)| self.key(parent, child)))
            .collect();
        self.table()
            .room_for(&keys)
            .map_err(|full| full.to_string())
    }
}

/// A parent kind's children and where they go.
pub struct Parent {
    pub children: Arc<Children>,
    pub sink: Box<dyn ChildSink>,
}

/// What one raw table's changes become.
pub struct Route {
    pub kind: Kind,
    pub standard: Arc<Table>,
    /// Set for a parent kind's table and for its listing table.
    pub parent: Option<Arc<Parent>>,
}

pub struct RawHandler {
    /// By the name of the table a change comes from.
    pub(crate) routes: HashMap<TableName, Route>,
    pub(crate) encode_queue: Arc<Queue<EncodeJob>>,
    /// Seconds from a raw change being recorded to the standard write it
    /// caused.
    pub(crate) visible: Histogram,
}

impl Process<Arc<Change>> for RawHandler {
    async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
        let route = self.routes.get(&change.table).ok_or_else(|| {
            Failure::Permanent(format!("no standard table for `{}`", change.table))
        })?;
        let cause = Cause::caused_by(change);
        let jobs = match &route.parent {
            None => {
                self.derive(route, change, &cause).await?;
                Vec::new()
            }
            Some(parent) if parent.children.is_shared() => {
                self.refresh_shared(route, parent, change, &cause).await?
            }
            Some(parent) => self.refresh(route, parent, change, &cause)?,
        };
        for (ticket, job) in jobs {
            self.encode_queue
                .send_enlisted(ticket, job)
                .await
                .map_err(send_failure)?;
        }
        Ok(())
    }
}

impl RawHandler {
    fn became_visible(&self, change: &Change, outcome: Outcome) {
        if matches!(
            outcome,
            Outcome::Inserted | Outcome::Updated | Outcome::Deleted
        ) {
            let elapsed = chrono::Utc::now() - change.time.as_datetime();
            self.visible
                .observe(elapsed.to_std().unwrap_or_default().as_secs_f64());
        }
    }

    /// A kind without children: the standard record of what the change says.
    async fn derive(&self, route: &Route, change: &Change, cause: &Cause) -> Result<(), Failure> {
        let data = match (&change.kind, &change.data) {
            (ChangeKind::Deleted, _) | (_, None) => None,
            (_, Some(raw)) => Some(standard(route.kind, &change.key, raw, &[])?),
        };
        let outcome = route
            .standard
            .writer()
            .derive(&change.key, change.seq, change.version.clone(), data, cause)
            .await
            .map_err(failure)?;
        self.became_visible(change, outcome);
        Ok(())
    }

    /// A parent kind: its standard record and its children, from the
    /// parent's current record and listing.
    fn refresh(
        &self,
        route: &Route,
        parent: &Parent,
        change: &Change,
        cause: &Cause,
    ) -> Result<Vec<(u64, EncodeJob)>, Failure> {
        let id = &change.key;
        let applied = parent
            .children
            .refresh(id, change.seq, |previous, current| {
                let (version, data) = parent_record(route, parent, change, current)?;
                let jobs = at_once(async {
                    let jobs = parent.sink.apply(id, change, previous, current, cause);
                    jobs.await.map_err(|f| f.to_string())
                })?;
                // Into the outbox before the listing is marked applied, so
                // that after a crash the jobs are sent even if this change
                // is not processed again.
                let jobs = self.encode_queue.enlist(jobs);
                let outcome = route
                    .standard
                    .derive(id, change.seq, version, data, cause)
                    .map_err(|full| full.to_string())?;
                Ok((jobs, outcome))
            })
            .map_err(Failure::Permanent)?;
        Ok(match applied {
            Some((jobs, outcome)) => {
                self.became_visible(change, outcome);
                jobs
            }
            None => Vec::new(),
        })
    }

    /// [`RawHandler::refresh`] on a shared store, where other processes
    /// refresh the same parent at the same time: begun, applied and
    /// finished as [`Children::begin`] says, again until it finishes. The
    /// encode jobs are sent here; none are returned.
    async fn refresh_shared(
        &self,
        route: &Route,
        parent: &Parent,
        change: &Change,
        cause: &Cause,
    ) -> Result<Vec<(u64, EncodeJob)>, Failure> {
        let id = &change.key;
        let mut again = false;
        loop {
            let plan = parent.children.begin(id, change.seq, again).await;
            let Some(plan) = plan.map_err(|e| match e {
                RefreshError::Listing(e) => Failure::Permanent(e),
                RefreshError::Unavailable(e) => Failure::Unavailable(e),
            })?
            else {
                return Ok(Vec::new());
            };
            let (current, previous) = (plan.current.as_ref(), plan.previous.as_ref());
            let (version, data) =
                parent_record(route, parent, change, current).map_err(Failure::Permanent)?;
            let jobs = parent
                .sink
                .apply(id, change, previous, current, cause)
                .await?;
            let outcome = route
                .standard
                .writer()
                .derive(id, change.seq, version, data, cause)
                .await
                .map_err(failure)?;
            // Sent before the mark says the change is applied: a process
            // that dies between the two leaves the change to be done again
            // (the jobs' ids are their video, rendition and listing
            // version, so the work stream keeps each once), where the other
            // order would leave a mark that skips it and jobs never sent.
            for job in jobs {
                self.encode_queue
                    .send_enlisted(0, job)
                    .await
                    .map_err(send_failure)?;
            }
            let finished = parent.children.finish(plan).await;
            if finished.map_err(|e| Failure::Unavailable(e.to_string()))? {
                self.became_visible(change, outcome);
                return Ok(Vec::new());
            }
            again = true;
        }
    }
}

/// A parent's standard record as its current record and `current`
/// listing make it (none once the parent is gone).
fn parent_record(
    route: &Route,
    parent: &Parent,
    change: &Change,
    current: Option<&Listing>,
) -> Result<(Version, Option<Data>), String> {
    let id = &change.key;
    Ok(match parent.children.parent.get(id.as_str()) {
        Some(r) => {
            let ids: Vec<RecordId> = current
                .map(|l| l.children.iter().map(|(id, _)| id.clone()).collect())
                .unwrap_or_default();
            let data = standardise(route.kind, id, &r.data, &ids)
                .map_err(|e| format!("cannot standardise {} `{id}`: {e}", route.kind))?;
            (r.version, Some(data))
        }
        None => (change.version.clone(), None),
    })
}

/// A handler's write that was not made: a full table will not make room
/// by waiting, an unreachable store may come back.
pub(crate) fn failure(error: WriteError) -> Failure {
    match error {
        WriteError::Unavailable(e) => Failure::Unavailable(e),
        e => Failure::Permanent(e.to_string()),
    }
}

/// A job that could not be put on its queue: the shared store was out of
/// reach, or the queue is closing.
fn send_failure(error: SendError) -> Failure {
    match error {
        SendError::Unavailable(e) => Failure::Unavailable(e),
        e @ SendError::Closed(_) => Failure::Transient(e.to_string()),
    }
}

fn standard(kind: Kind, id: &RecordId, raw: &Data, children: &[RecordId]) -> Result<Data, Failure> {
    standardise(kind, id, raw, children)
        .map_err(|e| Failure::Permanent(format!("cannot standardise {kind} `{id}`: {e}")))
}

/// Runs `work` to its end at once: in memory a table's writer never
/// waits.
fn at_once<T>(work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    work.now_or_never()
        .unwrap_or_else(|| Err("a write in memory had to wait".into()))
}

/// The children listed by `previous` that `current` no longer lists.
fn dropped<'a>(
    previous: Option<&'a Listing>,
    current: Option<&'a Listing>,
) -> impl Iterator<Item = &'a RecordId> {
    previous
        .into_iter()
        .flat_map(|p| p.children.iter().map(|(id, _)| id))
        .filter(move |id| current.is_none_or(|c| c.child(id).is_none()))
}

/// Episodes: each listed episode is a listing in `raw_episodes`, at the
/// series' listing version.
pub struct ChildRecords {
    pub table: Arc<Table>,
}

impl ChildSink for ChildRecords {
    fn table(&self) -> &Arc<Table> {
        &self.table
    }

    fn key(&self, _: &RecordId, child: &RecordId) -> RecordId {
        child.clone()
    }

    fn apply<'a>(
        &'a self,
        parent: &'a RecordId,
        change: &'a Change,
        previous: Option<&'a Listing>,
        current: Option<&'a Listing>,
        cause: &'a Cause,
    ) -> BoxFuture<'a, Result<Vec<EncodeJob>, Failure>> {
        Box::pin(self.list(parent, change, previous, current, cause))
    }
}

impl ChildRecords {
    async fn list(
        &self,
        parent: &RecordId,
        change: &Change,
        previous: Option<&Listing>,
        current: Option<&Listing>,
        cause: &Cause,
    ) -> Result<Vec<EncodeJob>, Failure> {
        self.room(parent, previous, current)
            .map_err(Failure::Permanent)?;
        let removed = Version::delete(change.version.at);
        let writer = self.table.writer();
        for child in dropped(previous, current) {
            writer
                .list(child, parent, None, removed.clone(), cause)
                .await
                .map_err(failure)?;
        }
        for (child, data) in current.iter().flat_map(|c| c.children.iter()) {
            let unchanged = previous.is_some_and(|p| {
                current.is_some_and(|c| c.version == p.version) && p.child(child) == Some(data)
            });
            if !unchanged {
                let version = current
                    .map(|c| c.version.clone())
                    .unwrap_or(removed.clone());
                let listing = Some((version, data.clone()));
                writer
                    .list(child, parent, listing, removed.clone(), cause)
                    .await
                    .map_err(failure)?;
            }
        }
        Ok(Vec::new())
    }
}

/// Renditions: one encode job per rendition whose data changed; the encode
/// of a rendition no longer listed is deleted.
pub struct EncodeJobs {
    pub encodes: Arc<Table>,
}

impl ChildSink for EncodeJobs {
    fn table(&self) -> &Arc<Table> {
        &self.encodes
    }

    fn key(&self, video: &RecordId, rendition: &RecordId) -> RecordId {
        encode_id(video, rendition)
    }

    fn apply<'a>(
        &'a self,
        video: &'a RecordId,
        change: &'a Change,
        previous: Option<&'a Listing>,
        current: Option<&'a Listing>,
        cause: &'a Cause,
    ) -> BoxFuture<'a, Result<Vec<EncodeJob>, Failure>> {
        Box::pin(self.jobs(video, change, previous, current, cause))
    }
}

impl EncodeJobs {
    async fn jobs(
        &self,
        video: &RecordId,
        change: &Change,
        previous: Option<&Listing>,
        current: Option<&Listing>,
        cause: &Cause,
    ) -> Result<Vec<EncodeJob>, Failure> {
        self.room(video, previous, current)
            .map_err(Failure::Permanent)?;
        for rendition in dropped(previous, current) {
            self.encodes
                .writer()
                .derive(
                    &encode_id(video, rendition),
                    change.seq,
                    change.version.clone(),
                    None,
                    cause,
                )
                .await
                .map_err(failure)?;
        }
        let Some(current) = current else {
            return Ok(Vec::new());
        };
        current
            .children
            .iter()
            .filter(|(id, data)| previous.and_then(|p| p.child(id)) != Some(data))
            .map(|(id, data)| {
                let rendition: Rendition = serde_json::from_str(data.as_str()).map_err(|e| {
                    Failure::Permanent(format!("rendition `{id}` of video `{video}`: {e}"))
                })?;
                Ok(EncodeJob {
                    id: job_id(video, id, &current.version),
                    video_id: video.clone(),
                    rendition,
                    seq: change.seq,
                    version: current.version.clone(),
                    cause: cause.clone(),
                    attempt: 1,
                })
            })
            .collect()
    }
}

/// The id of a video's encode of one rendition.
pub fn encode_id(video: &RecordId, rendition: &RecordId) -> RecordId {
    RecordId::derived(format!("{video}:{rendition}"))
}

/// An encode job's id: the same for the same video, rendition and listing
/// version, so a redelivered job is recognisable.
pub fn job_id(video: &RecordId, rendition: &RecordId, version: &Version) -> Uuid {
    Uuid::new_v5(
        &JOB_NAMESPACE,
        job_name(video, rendition, version).as_bytes(),
    )
}

/// The id of a job of a publication's `attempt` (after the first, which
/// is raw_handler's): deterministic too, and apart from the first's.
pub fn attempt_job_id(
    video: &RecordId,
    rendition: &RecordId,
    version: &Version,
    attempt: u64,
) -> Uuid {
    let name = format!("{}\nattempt {attempt}", job_name(video, rendition, version));
    Uuid::new_v5(&JOB_NAMESPACE, name.as_bytes())
}

fn job_name(video: &RecordId, rendition: &RecordId, version: &Version) -> String {
    let key = match &version.tie {
        Tie::Key(key) => key.as_str(),
        Tie::Tombstone => "",
    };
    format!("{video}\n{rendition}\n{}\n{key}", version.at)
}

/// The UUID namespace of encode job ids.
const JOB_NAMESPACE: Uuid = Uuid::from_u128(0x6576_656e_7473_7973_2d65_6e63_6f64_6531);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::record::Timestamp;

    #[test]
    fn a_job_id_is_the_same_for_the_same_video_rendition_and_version() {
        let id = |s: &str| RecordId::parse(s).unwrap();
        let at = Timestamp::parse("2024-01-01T00:00:00Z").unwrap();
        let version = |key: &str| Version::write(at, Data::canonical(&key).unwrap());
        let job = job_id(&id("v1"), &id("r1"), &version("a"));
        assert_eq!(job, job_id(&id("v1"), &id("r1"), &version("a")));
        assert_ne!(job, job_id(&id("v1"), &id("r2"), &version("a")));
        assert_ne!(job, job_id(&id("v2"), &id("r1"), &version("a")));
        assert_ne!(job, job_id(&id("v1"), &id("r1"), &version("b")));
    }
}
