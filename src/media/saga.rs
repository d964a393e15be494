//! `publication_handler`: publishing a video as a saga with compensation
//! (scenario 6).
//!
//! Each live video has one `publications` record (a table of kind `view`)
//! for its current version:
//!
//! - `pending` while some of its current renditions are not encoded yet,
//!   with `done` and `total`;
//! - `published` once all are (at once for a video without renditions);
//! - `compensated`, with `reason`, when an encode job the publication
//!   depends on was dead-lettered: the saga then deletes the encodes of
//!   its renditions (the compensating action).
//!
//! The saga learns everything through the change log: `publication_queue`
//! is fed the changes of `videos`, of the videos' rendition lists and of
//! `encodes`, and a dead-lettered job leaves its encode `failed` (see
//! [`EncodeHandler`](super::encode_handler::EncodeHandler)). Each step
//! reads the tables and writes the record they imply, so the order in
//! which changes arrive does not matter, except for what the saga itself
//! does: compensating and starting attempts.
//!
//! **Attempts, and why nothing late counts.** A publication's `since` is
//! the change-log position its attempt started at (0 for the first, whose
//! jobs raw_handler made). An encode counts only if it matches the
//! rendition the video lists now (codec, height and bitrate), and a failed one only
//! if it was written at or after `since`. Compensation deletes the encodes at the
//! position it read, and records that position as the compensated
//! record's `since`; a new attempt (`POST /publications/{id}/retry`, a
//! redrive of the dead-lettered job, or a newer change of the video after
//! the compensation) reads a later position, writes its jobs at it, and so
//! is never stale against the compensation's deletes; results and
//! failures of the jobs before it are older than its `since` and, being
//! also older than the deletes, stale in `encodes`.
//!
//! Steps run one at a time (one lock): each reads the position first, then
//! the tables, and writes at that position, so a later step wins.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use serde::{Deserialize, Serialize};

use crate::engine::children::Children;
use crate::engine::handler::{Failure, Process};
use crate::engine::log::{Cause, Change, ChangeKind, ChangeLog};
use crate::engine::queue::Queue;
use crate::engine::record::{Data, RecordId, Tie, Timestamp, Version};
use crate::engine::table::{Record, Table};

use super::encode_handler::EncodeJob;
use super::projection::ViewError;
use super::raw_handler::{attempt_job_id, encode_id};
use super::records::Rendition;

/// Where a publication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Published,
    Compensated,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Published => "published",
            Status::Compensated => "compensated",
        }
    }
}

/// A `publications` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// The video's id.
    pub id: RecordId,
    pub status: Status,
    /// 1, then one more for each attempt started after a compensation.
    pub attempt: u64,
    /// The change-log position the attempt started at (pending,
    /// published), or the compensation happened at (compensated).
    pub since: u64,
    /// Current renditions encoded for this attempt.
    pub done: u64,
    /// Current renditions.
    pub total: u64,
    /// Why it was compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What set a step off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A change of the video or its rendition list, at this sequence.
    Video(u64),
    /// A change of one of its encodes (or a rebuild).
    Encode,
    /// An operator's `POST /publications/{id}/retry`.
    Retry,
    /// A redrive of a dead-lettered job of the video.
    Redrive,
}

/// What a step did.
#[derive(Debug)]
pub enum Stepped {
    /// The record is as the tables say (or deleted: `None`).
    Recorded(Option<Publication>),
    /// A new attempt started; these jobs are enlisted on `encode_queue`.
    Started(Publication, Vec<(u64, EncodeJob)>),
    /// On JetStream: a new attempt started, and its jobs (this many) are
    /// on `encode_queue`'s work stream already.
    Sent(Publication, usize),
}

/// What a step writes, in the order that keeps a torn write safe.
enum Plan {
    /// The record as the tables say (`None`: no record), unless it is so.
    Record(Option<Publication>),
    /// Compensated, and staying so: nothing.
    Keep(Option<Publication>),
    /// A new attempt: its jobs, then its record.
    Start(Publication, Vec<EncodeJob>),
    /// A compensation: its record, then a delete of each encode.
    Compensate(Publication, Vec<RecordId>),
}

/// Why a retry was refused.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("no live video `{0}`")]
    NoVideo(RecordId),
    #[error(
        "publication `{id}` is {}: only a compensated publication (or one with a dead-lettered \
         encode) is retried", status.as_str()
    )]
    NothingToRetry { id: RecordId, status: Status },
    #[error(transparent)]
    Step(#[from] ViewError),
}

/// An encode record's fields the saga reads.
#[derive(Deserialize)]
struct Encode {
    codec: String,
    height: u64,
    #[serde(default)]
    bitrate_kbps: Option<u64>,
    status: String,
    #[serde(default)]
    error: Option<String>,
    video_id: String,
}

fn parse<'a, T: Deserialize<'a>>(data: &'a Data, what: &str) -> Result<T, ViewError> {
    serde_json::from_str(data.as_str())
        .map_err(|e| ViewError::Source(format!("{what} that cannot be read: {e}")))
}

/// The publication saga: its table, what it reads, and where new attempts'
/// jobs go.
pub struct Saga {
    pub publications: Arc<Table>,
    videos: Arc<Table>,
    encodes: Arc<Table>,
    /// The videos' rendition lists, as they count now.
    renditions: Arc<Children>,
    encode_queue: Arc<Queue<EncodeJob>>,
    log: Arc<ChangeLog>,
    /// Held for a whole step: steps never overlap.
    step: Mutex<()>,
    /// [`Saga::step`]'s lock on JetStream, held across its writes.
    shared_step: tokio::sync::Mutex<()>,
}

/// The tables as one step read them, at position `at`.
struct Reading {
    at: u64,
    /// The video, while live.
    live: Option<Record>,
    stored: Option<Publication>,
    /// Read while the video is live.
    progress: Option<Progress>,
}

/// How the encodes of a video's current renditions stand for an attempt.
struct Progress {
    renditions: Vec<Rendition>,
    version: Option<Version>,
    done: u64,
    /// The first failure of the attempt, as a reason.
    failure: Option<String>,
}

impl Saga {
    pub const NAME: &'static str = "publications";

    pub fn new(
        publications: Arc<Table>,
        videos: Arc<Table>,
        encodes: Arc<Table>,
        renditions: Arc<Children>,
        encode_queue: Arc<Queue<EncodeJob>>,
        log: Arc<ChangeLog>,
    ) -> Self {
        Self {
            publications,
            videos,
            encodes,
            renditions,
            encode_queue,
            log,
            step: Mutex::new(()),
            shared_step: tokio::sync::Mutex::new(()),
        }
    }

    /// The position every step starting now reads at least.
    fn position(&self) -> u64 {
        self.log.next_seq().saturating_sub(1)
    }

    fn stored(&self, video: &RecordId) -> Result<Option<Publication>, ViewError> {
        (self.publications.get(video.as_str()))
            .map(|r| parse(&r.data, "a publication"))
            .transpose()
    }

    /// How the encodes of `video`'s current renditions stand: those
    /// encoded (whenever: an encode of the same data is as good), and the
    /// first failure written at or after `since` (one before it is an
    /// earlier attempt's).
    fn progress(&self, video: &RecordId, since: u64) -> Result<Progress, ViewError> {
        let listing = self.renditions.current(video).map_err(ViewError::Source)?;
        let mut progress = Progress {
            renditions: Vec::new(),
            version: listing.as_ref().map(|l| l.version.clone()),
            done: 0,
            failure: None,
        };
        for (_, data) in listing.iter().flat_map(|l| l.children.iter()) {
            let rendition: Rendition = parse(data, "a rendition")?;
            let id = encode_id(video, &rendition.id);
            let encode = (self.encodes.get(id.as_str()))
                .map(|record| parse::<Encode>(&record.data, "an encode"))
                .transpose()?;
            // An encode of other data is an older job's, for a version that
            // listed the rendition otherwise: not this one's.
            match encode {
                Some(e)
                    if e.codec == rendition.codec
                        && e.height == rendition.height
                        && e.bitrate_kbps == rendition.bitrate_kbps =>
                {
                    match e.status.as_str() {
                        "encoded" => progress.done += 1,
                        "failed"
                            if progress.failure.is_none()
                                && self.encodes.seq_of(id.as_str()) >= since =>
                        {
                            let error = e.error.unwrap_or_default();
                            progress.failure =
                                Some(format!("encode `{id}` was dead-lettered: {error}"));
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            progress.renditions.push(rendition);
        }
        Ok(progress)
    }

    /// What a step reads of `video`, and the position it is as of.
    ///
    /// Handlers write the tables while a step reads them, and a state read
    /// newer than its position would make a change the step has already
    /// seen look new: the video change that reaches the saga after a
    /// compensation read its own state would start a second attempt. So
    /// the read is taken again while the change log moved during it; after
    /// a few tries under constant writes, it keeps the position from before
    /// its last read, whose only cost is an attempt more, never one missed.
    fn read(&self, video: &RecordId) -> Result<Reading, ViewError> {
        const TRIES: usize = 8;
        let mut tries = 0;
        loop {
            let at = self.position();
            // Live in both tables: the rendition list counts only while the
            // raw video is live, and the standard one may not follow it yet.
            let live = (self.videos.get(video.as_str()))
                .filter(|_| self.renditions.parent.get(video.as_str()).is_some());
            let stored = self.stored(video)?;
            let since = stored.as_ref().map_or(0, |p| p.since);
            let progress = match live {
                Some(_) => Some(self.progress(video, since)?),
                None => None,
            };
            tries += 1;
            if self.position() == at || tries == TRIES {
                return Ok(Reading {
                    at,
                    live,
                    stored,
                    progress,
                });
            }
        }
    }

    /// What a step of `video`'s saga for `trigger` does, from what it
    /// read: the position it writes at, and its writes.
    fn decide(
        &self,
        video: &RecordId,
        trigger: Trigger,
        cause: &Cause,
        reading: Reading,
    ) -> Result<(u64, Plan), RetryError> {
        let Reading {
            at,
            live,
            stored,
            progress,
        } = reading;
        let Some((live, progress)) = live.zip(progress) else {
            if matches!(trigger, Trigger::Retry) {
                return Err(RetryError::NoVideo(video.clone()));
            }
            return Ok((at, Plan::Record(None)));
        };
        let (attempt, since) = stored.as_ref().map_or((1, 0), |p| (p.attempt, p.since));
        let compensated = stored
            .as_ref()
            .is_some_and(|p| p.status == Status::Compensated);
        let retryable = compensated || progress.failure.is_some();
        // Where a new attempt starts. For a change of the video, at that
        // change: every process that follows the log takes this step for
        // it, and so starts the same attempt with the same jobs (one each
        // on a shared work stream), whatever position each read at.
        let (new_attempt, start) = match trigger {
            Trigger::Retry | Trigger::Redrive => (retryable, at),
            // A change of the video recorded after the compensation.
            Trigger::Video(seq) => (compensated && seq > since, seq),
            Trigger::Encode => (false, at),
        };
        let total = progress.renditions.len() as u64;
        let record = |status, attempt, since, done, reason| Publication {
            id: video.clone(),
            status,
            attempt,
            since,
            done,
            total,
            reason,
        };
        if new_attempt {
            let status = if total == 0 {
                Status::Published
            } else {
                Status::Pending
            };
            let publication = record(status, attempt + 1, start, 0, None);
            let version = progress.version.unwrap_or_else(|| live.version.clone());
            let jobs = (progress.renditions.into_iter())
                .map(|rendition| EncodeJob {
                    id: attempt_job_id(video, &rendition.id, &version, attempt + 1),
                    video_id: video.clone(),
                    rendition,
                    seq: start,
                    version: version.clone(),
                    cause: cause.clone(),
                    attempt: attempt + 1,
                })
                .collect();
            return Ok((at, Plan::Start(publication, jobs)));
        }
        match (trigger, &stored) {
            (Trigger::Retry, Some(p)) => {
                return Err(RetryError::NothingToRetry {
                    id: video.clone(),
                    status: p.status,
                });
            }
            (Trigger::Redrive, _) | (Trigger::Retry, None) => {
                let status = stored.as_ref().map_or(Status::Pending, |p| p.status);
                return Err(RetryError::NothingToRetry {
                    id: video.clone(),
                    status,
                });
            }
            _ => {}
        }
        if compensated {
            return Ok((at, Plan::Keep(stored)));
        }
        let plan = if let Some(reason) = progress.failure {
            // Compensate: delete what this attempt encoded, and whatever
            // it is still encoding will be stale when it ends.
            let ids: Vec<RecordId> = (progress.renditions.iter())
                .map(|rendition| encode_id(video, &rendition.id))
                .collect();
            let publication = record(Status::Compensated, attempt, at, 0, Some(reason));
            Plan::Compensate(publication, ids)
        } else if progress.done == total {
            Plan::Record(Some(record(Status::Published, attempt, since, total, None)))
        } else {
            Plan::Record(Some(record(
                Status::Pending,
                attempt,
                since,
                progress.done,
                None,
            )))
        };
        Ok((at, plan))
    }

    /// Takes one step of `video`'s saga for `trigger` (in memory or on a
    /// data directory: see [`Saga::step_shared`] for JetStream).
    pub fn step(
        &self,
        video: &RecordId,
        trigger: Trigger,
        cause: &Cause,
    ) -> Result<Stepped, RetryError> {
        // On a data directory, a step's frames go to the disk in one write,
        // so a crash cannot keep a compensation's deletes without its
        // record, or a new attempt's record without its jobs. (Never taken
        // twice on one thread: no caller of a step holds it.)
        let _together = self.log.journal().map(|journal| journal.group());
        let _step = self.step.lock().unwrap_or_else(|e| e.into_inner());
        let (at, plan) = self.decide(video, trigger, cause, self.read(video)?)?;
        // In memory a table's writer never waits.
        (self.apply(video, at, plan, cause).now_or_never()).unwrap_or_else(|| {
            Err(ViewError::Source("a write in memory had to wait".into()).into())
        })
    }

    /// [`Saga::step`] on JetStream, where every process takes the steps of
    /// the whole change log it follows and writes what they imply at the
    /// position it read (the newest position's write is kept; one that
    /// finds the record already so sends nothing).
    pub async fn step_shared(
        &self,
        video: &RecordId,
        trigger: Trigger,
        cause: &Cause,
    ) -> Result<Stepped, RetryError> {
        let _step = self.shared_step.lock().await;
        let (at, plan) = self.decide(video, trigger, cause, self.read(video)?)?;
        self.apply(video, at, plan, cause).await
    }

    /// Makes a step's writes, at position `at`.
    async fn apply(
        &self,
        video: &RecordId,
        at: u64,
        plan: Plan,
        cause: &Cause,
    ) -> Result<Stepped, RetryError> {
        let shared = self.publications.is_shared();
        Ok(match plan {
            Plan::Record(publication) => {
                self.write(video, publication.as_ref(), at, cause).await?;
                Stepped::Recorded(publication)
            }
            Plan::Keep(publication) => Stepped::Recorded(publication),
            // On JetStream the jobs are sent before the record: a process
            // that stops between the two leaves the record to whichever
            // takes the step again, and the jobs, named by video,
            // rendition, version and attempt, are kept once.
            Plan::Start(publication, jobs) if shared => {
                let sent = jobs.len();
                for job in jobs {
                    (self.encode_queue.send_enlisted(0, job).await)
                        .map_err(|e| ViewError::Unavailable(e.to_string()))?;
                }
                self.write(video, Some(&publication), at, cause).await?;
                Stepped::Sent(publication, sent)
            }
            Plan::Start(publication, jobs) => {
                // The jobs first, like raw_handler's: a torn write that
                // keeps the record keeps its jobs too.
                let jobs = self.encode_queue.enlist(jobs);
                self.write(video, Some(&publication), at, cause).await?;
                Stepped::Started(publication, jobs)
            }
            Plan::Compensate(publication, ids) => {
                // Room for every delete (a tombstone is an entry) before
                // any, and the record before the deletes: a torn write
                // keeps a compensated record with encodes still to delete
                // (a retry encodes them again), never deletes without the
                // record.
                if !shared {
                    self.encodes.room_for(&ids).map_err(ViewError::from)?;
                }
                self.write(video, Some(&publication), at, cause).await?;
                for id in &ids {
                    (self.encodes.writer())
                        .derive(id, at, deleted(), None, cause)
                        .await
                        .map_err(ViewError::from)?;
                }
                Stepped::Recorded(Some(publication))
            }
        })
    }

    /// A step on whichever store the saga's tables are on.
    pub async fn step_anywhere(
        &self,
        video: &RecordId,
        trigger: Trigger,
        cause: &Cause,
    ) -> Result<Stepped, RetryError> {
        if self.publications.is_shared() {
            self.step_shared(video, trigger, cause).await
        } else {
            self.step(video, trigger, cause)
        }
    }

    /// The version and data `video`'s publication is written with to be
    /// `publication` (`None` deletes it); `None` if it is so already.
    fn change_to(
        &self,
        video: &RecordId,
        publication: Option<&Publication>,
    ) -> Result<Option<(Version, Option<Data>)>, ViewError> {
        let data = publication
            .map(Data::canonical)
            .transpose()
            .map_err(|e| ViewError::Source(e.to_string()))?;
        let stored = self.publications.get(video.as_str()).map(|r| r.data);
        if stored == data {
            return Ok(None);
        }
        let version = match &data {
            Some(data) => Version::write(Timestamp::now(), data.clone()),
            None => deleted(),
        };
        Ok(Some((version, data)))
    }

    /// Writes `video`'s publication at position `at`, unless it is so.
    async fn write(
        &self,
        video: &RecordId,
        publication: Option<&Publication>,
        at: u64,
        cause: &Cause,
    ) -> Result<(), ViewError> {
        if let Some((version, data)) = self.change_to(video, publication)? {
            (self.publications.writer())
                .derive(video, at, version, data, cause)
                .await?;
        }
        Ok(())
    }

    /// An operator's retry: a new attempt for a compensated publication,
    /// and how many jobs it put on `encode_queue` (sent already on
    /// JetStream; in memory, returned to be put there).
    pub async fn retry(
        &self,
        video: &RecordId,
        cause: &Cause,
    ) -> Result<(Publication, Vec<(u64, EncodeJob)>, usize), RetryError> {
        match self.step_anywhere(video, Trigger::Retry, cause).await? {
            Stepped::Started(publication, jobs) => {
                let n = jobs.len();
                Ok((publication, jobs, n))
            }
            Stepped::Sent(publication, n) => Ok((publication, Vec::new(), n)),
            // A retry either starts an attempt or is refused.
            Stepped::Recorded(_) => Err(RetryError::NoVideo(video.clone())),
        }
    }

    /// Whether a redriven dead letter of `encode_queue` is taken over,
    /// given what its video's redrive step did: yes if it started a new
    /// attempt (which replaces it), or if the job is older than its
    /// video's attempt (a superseded attempt's). The rest go back as they
    /// were.
    fn takes(&self, job: &EncodeJob, stepped: Result<Stepped, RetryError>) -> bool {
        match stepped {
            Ok(Stepped::Started(publication, _) | Stepped::Sent(publication, _)) => {
                tracing::info!(video = %job.video_id, attempt = publication.attempt,
                    "a redrive started a new publication attempt");
                true
            }
            Ok(Stepped::Recorded(_)) | Err(RetryError::NoVideo(_)) => false,
            Err(RetryError::NothingToRetry { .. }) => {
                let since = (self.stored(&job.video_id).ok().flatten()).map_or(0, |p| p.since);
                job.seq < since
            }
            Err(RetryError::Step(error)) => {
                tracing::warn!(%error, job = %job.id, "a redriven job could not be stepped");
                false
            }
        }
    }

    /// Redriven dead letters of `encode_queue` (in memory): those
    /// [`Saga::takes`] are finished, with the jobs of the attempts they
    /// started put in their place; the rest go back as they were.
    pub fn redriven(&self, letters: Vec<(u64, EncodeJob)>) -> Vec<(u64, EncodeJob)> {
        let mut back = Vec::new();
        for (ticket, job) in letters {
            let stepped = self.step(&job.video_id, Trigger::Redrive, &job.cause);
            if let Ok(Stepped::Started(_, jobs)) = &stepped {
                back.extend(jobs.iter().cloned());
            }
            if self.takes(&job, stepped) {
                self.encode_queue.finished(ticket);
            } else {
                back.push((ticket, job));
            }
        }
        back
    }

    /// A redriven dead letter of `encode_queue` on JetStream: whether it
    /// is taken over (see [`Saga::takes`]); a new attempt's jobs are sent.
    pub async fn redriven_shared(&self, job: &EncodeJob) -> bool {
        let stepped = self
            .step_shared(&job.video_id, Trigger::Redrive, &job.cause)
            .await;
        self.takes(job, stepped)
    }

    /// The videos a rebuild steps: every one with a video or a record.
    fn rebuilt(&self) -> BTreeSet<RecordId> {
        let mut videos: BTreeSet<RecordId> =
            self.videos.snapshot().into_iter().map(|r| r.id).collect();
        videos.extend(self.publications.snapshot().into_iter().map(|r| r.id));
        videos
    }

    /// Recomputes every publication from the tables (`POST
    /// /tables/publications/rebuild`); how many there are after.
    pub fn rebuild(&self, cause: &Cause) -> Result<u64, ViewError> {
        for video in &self.rebuilt() {
            rebuilt(self.step(video, Trigger::Encode, cause))?;
        }
        Ok(self.publications.len())
    }

    /// [`Saga::rebuild`] on JetStream.
    pub async fn rebuild_shared(&self, cause: &Cause) -> Result<u64, ViewError> {
        for video in &self.rebuilt() {
            rebuilt(self.step_shared(video, Trigger::Encode, cause).await)?;
        }
        Ok(self.publications.len())
    }
}

/// A rebuild's step: only a failed write stops it.
fn rebuilt(stepped: Result<Stepped, RetryError>) -> Result<(), ViewError> {
    match stepped {
        Ok(_) => Ok(()),
        Err(RetryError::Step(error)) => Err(error),
        Err(error) => Err(ViewError::Source(error.to_string())),
    }
}

/// The version a delete is recorded with.
fn deleted() -> Version {
    Version {
        at: Timestamp::now(),
        tie: Tie::Tombstone,
    }
}

/// The handler of `publication_queue`.
pub struct PublicationHandler {
    pub saga: Arc<Saga>,
}

impl Process<Arc<Change>> for PublicationHandler {
    async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
        let saga = &self.saga;
        let (video, trigger) = if change.table == *saga.encodes.name() {
            // A deleted encode was deleted by a change of its video (or by
            // this saga), whose own change brings the video here.
            let (ChangeKind::Inserted | ChangeKind::Updated, Some(data)) =
                (&change.kind, &change.data)
            else {
                return Ok(());
            };
            let encode: Encode =
                parse(data, "an encode").map_err(|e| Failure::Permanent(e.to_string()))?;
            (RecordId::derived(encode.video_id), Trigger::Encode)
        } else {
            (change.key.clone(), Trigger::Video(change.seq))
        };
        let cause = Cause::caused_by(change);
        let started = |publication: &Publication| {
            tracing::info!(video = %video, attempt = publication.attempt,
                "a newer video version started a new publication attempt");
        };
        match saga.step_anywhere(&video, trigger, &cause).await {
            Ok(Stepped::Recorded(_)) => Ok(()),
            Ok(Stepped::Sent(publication, _)) => {
                started(&publication);
                Ok(())
            }
            Ok(Stepped::Started(publication, jobs)) => {
                started(&publication);
                for (ticket, job) in jobs {
                    saga.encode_queue
                        .send_enlisted(ticket, job)
                        .await
                        .map_err(|e| Failure::Transient(e.to_string()))?;
                }
                Ok(())
            }
            Err(RetryError::Step(ViewError::Unavailable(reason))) => {
                Err(Failure::Unavailable(reason))
            }
            Err(error) => Err(Failure::Permanent(error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::handler::Fault;
    use crate::media::encode_handler::EncodeHandler;
    use crate::media::pipeline::{Pipeline, PipelineConfig};
    use crate::media::records::{Kind, parse_record};

    fn models(pipeline: &Pipeline) -> &crate::media::pipeline::SagaModel {
        &pipeline.read_models.saga
    }

    fn publication(pipeline: &Pipeline, id: &str) -> Publication {
        let record = models(pipeline)
            .saga
            .publications
            .get(id)
            .expect("a publication");
        serde_json::from_str(record.data.as_str()).expect("a publication")
    }

    #[tokio::test]
    async fn late_results_and_dead_letters_of_an_old_attempt_change_nothing() {
        let pipeline = Pipeline::start(PipelineConfig {
            encode_delay: Duration::ZERO,
            ..Default::default()
        });
        let settle = || pipeline.engine.settle(Duration::from_secs(10));
        let encoder = pipeline
            .engine
            .handler("encode_handler")
            .expect("a handler");
        encoder.set_fault(Some(Fault {
            failure_rate: 1.0,
            permanent: true,
            delay_ms: 0,
        }));
        let video = serde_json::json!({"id": "v1", "title": "V", "renditions": [
            {"id": "r1", "codec": "h264", "height": 720},
            {"id": "r2", "codec": "h264", "height": 1080},
        ]});
        let write = parse_record(video, Timestamp::now(), Kind::Videos).expect("a video");
        let cause = Cause::request("test");
        pipeline
            .ingest(Kind::Videos, vec![write], &cause)
            .await
            .expect("ingested");
        assert!(settle().await);
        let compensated = publication(&pipeline, "v1");
        assert_eq!(compensated.status, Status::Compensated);
        let old_jobs: Vec<EncodeJob> = (pipeline.encode_queue.dead_letters().into_iter())
            .map(|letter| letter.event)
            .collect();
        assert!(!old_jobs.is_empty());

        encoder.set_fault(None);
        let video = RecordId::parse("v1").expect("an id");
        // A change of the video the compensation had seen (one redelivered)
        // starts no attempt; only a later one would.
        let stepped = models(&pipeline)
            .saga
            .step(&video, Trigger::Video(compensated.since), &cause)
            .expect("a step");
        assert!(matches!(stepped, Stepped::Recorded(Some(p)) if p == compensated));
        pipeline
            .retry_publication(&video, &cause)
            .await
            .expect("retried");
        assert!(settle().await);
        let published = publication(&pipeline, "v1");
        assert_eq!(
            (published.status, published.attempt),
            (Status::Published, 2)
        );

        // The first attempt's jobs end now, late: failing, and succeeding.
        let encodes = pipeline.engine.table("encodes").expect("encodes").clone();
        let late = EncodeHandler {
            encodes: encodes.clone(),
            delay: Duration::ZERO,
        };
        let before = encodes.snapshot();
        for job in &old_jobs {
            late.gave_up(job, "a late failure");
            late.process(job)
                .await
                .expect("a stale write is no failure");
        }
        assert!(settle().await);
        assert_eq!(encodes.snapshot(), before, "their writes were stale");
        assert_eq!(publication(&pipeline, "v1"), published);
        pipeline.engine.shutdown(Duration::ZERO).await;
    }

    #[tokio::test]
    async fn an_encode_of_the_rendition_as_an_older_version_listed_it_does_not_count() {
        let pipeline = Pipeline::start(PipelineConfig {
            encode_delay: Duration::ZERO,
            ..Default::default()
        });
        let cause = Cause::request("test");
        let post = |bitrate: u64, at: &str| {
            let video = serde_json::json!({"id": "v1", "title": "V", "renditions": [
                {"id": "r1", "codec": "h264", "height": 720, "bitrate_kbps": bitrate}]});
            let at = Timestamp::parse(at).expect("a time");
            let write = parse_record(video, at, Kind::Videos).expect("a video");
            pipeline.ingest(Kind::Videos, vec![write], &cause)
        };
        post(1000, "2024-01-01T00:00:00Z").await.expect("ingested");
        assert!(pipeline.engine.settle(Duration::from_secs(10)).await);
        assert_eq!(publication(&pipeline, "v1").status, Status::Published);
        // A newer version changes only the bitrate (its job held for a
        // minute): until the job has run, the encode there is the older
        // version's, and is not done.
        let encoder = pipeline
            .engine
            .handler("encode_handler")
            .expect("a handler");
        encoder.set_fault(Some(Fault {
            failure_rate: 0.0,
            permanent: false,
            delay_ms: 60_000,
        }));
        post(2000, "2024-01-02T00:00:00Z").await.expect("ingested");
        let video = RecordId::parse("v1").expect("an id");
        let stepped = models(&pipeline).saga.step(&video, Trigger::Encode, &cause);
        let Ok(Stepped::Recorded(Some(p))) = stepped else {
            panic!("a step: {stepped:?}");
        };
        assert_eq!((p.status, p.done, p.total), (Status::Pending, 0, 1));
        pipeline.engine.shutdown(Duration::ZERO).await;
    }
}
