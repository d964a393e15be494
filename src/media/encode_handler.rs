//! `encode_handler`: the slow secondary work of scenario 3.
//!
//! Each job encodes one rendition of a video (simulated by a delay) and
//! writes the `encodes` record `{video_id}:{rendition_id}` at the sequence
//! of the video change that asked for it, so a job outdated by a later
//! change of that rendition is stale on arrival.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::json;
use uuid::Uuid;

use crate::engine::handler::{Failure, Process};
use crate::engine::log::Cause;
use crate::engine::queue::QueueItem;
use crate::engine::record::{Data, RecordId, Version};
use crate::engine::table::Table;

use super::raw_handler::{encode_id, failure};
use super::records::Rendition;
use crate::storage::effect::VersionImage;

/// One rendition of one video to encode.
#[derive(Clone, Debug)]
pub struct EncodeJob {
    pub id: Uuid,
    pub video_id: RecordId,
    pub rendition: Rendition,
    /// The change-log sequence of the video change that asked for it; the
    /// encode is derived at it, so a job outdated by a later change of the
    /// rendition (or its removal) is stale.
    pub seq: u64,
    /// The video's listing version.
    pub version: Version,
    /// The change that asked for it (raw_handler's, or the saga's for a
    /// new attempt).
    pub cause: Cause,
    /// The publication attempt it belongs to: 1 for the jobs raw_handler
    /// makes, then one more for each attempt scenario 6's saga starts.
    pub attempt: u64,
}

impl QueueItem for EncodeJob {
    fn event_id(&self) -> Uuid {
        self.id
    }

    fn store(&self) -> serde_json::Value {
        serde_json::to_value(StoredJob {
            id: self.id,
            video_id: self.video_id.to_string(),
            rendition: self.rendition.clone(),
            seq: self.seq,
            version: VersionImage::of(&self.version, None),
            correlation: self.cause.correlation.to_string(),
            causation: self.cause.causation,
            attempt: self.attempt,
        })
        .unwrap_or_default()
    }

    fn restore(stored: serde_json::Value) -> Option<Self> {
        let job: StoredJob = serde_json::from_value(stored).ok()?;
        Some(Self {
            id: job.id,
            video_id: RecordId::derived(job.video_id),
            rendition: job.rendition,
            seq: job.seq,
            version: job.version.get(None).ok()?,
            cause: Cause {
                correlation: job.correlation.into(),
                causation: job.causation,
            },
            attempt: job.attempt,
        })
    }
}

/// An encode job as kept on a data directory.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredJob {
    id: Uuid,
    video_id: String,
    rendition: Rendition,
    seq: u64,
    version: VersionImage,
    correlation: String,
    causation: Option<Uuid>,
    #[serde(default = "first_attempt")]
    attempt: u64,
}

fn first_attempt() -> u64 {
    1
}

/// Shown as a CloudEvent, like the changes on `raw_queue`.
impl Serialize for EncodeJob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("specversion", "1.0")?;
        map.serialize_entry("id", &self.id)?;
        let source = if self.attempt > 1 {
            "/handlers/publication_handler"
        } else {
            "/handlers/raw_handler"
        };
        map.serialize_entry("source", source)?;
        map.serialize_entry("type", "eventsys.encode.requested")?;
        map.serialize_entry("subject", &encode_id(&self.video_id, &self.rendition.id))?;
        map.serialize_entry("recordversion", &self.version.at)?;
        map.serialize_entry("correlationid", &*self.cause.correlation)?;
        if let Some(causation) = &self.cause.causation {
            map.serialize_entry("causationid", causation)?;
        }
        map.serialize_entry("datacontenttype", "application/json")?;
        map.serialize_entry(
            "data",
            &json!({
                "video_id": self.video_id,
                "rendition": self.rendition,
                "attempt": self.attempt,
            }),
        )?;
        map.end()
    }
}

pub struct EncodeHandler {
    pub(crate) encodes: Arc<Table>,
    /// Simulated time of one encode.
    pub(crate) delay: Duration,
}

impl EncodeHandler {
    /// Writes the job's encode record with `status` (and `error`, for a
    /// failed one), at the job's sequence: stale if a later change of the
    /// rendition (or a saga's compensation) has written it since.
    async fn write(
        &self,
        job: &EncodeJob,
        status: &str,
        error: Option<&str>,
    ) -> Result<(), Failure> {
        let (id, data) = encode_record(job, status, error)?;
        // The encode's causation is the change that asked for it, in the log.
        self.encodes
            .writer()
            .derive(&id, job.seq, job.version.clone(), Some(data), &job.cause)
            .await
            .map_err(failure)?;
        Ok(())
    }
}

/// The encode record of `job` with `status` (and `error`, for a failed
/// one), and its id.
fn encode_record(
    job: &EncodeJob,
    status: &str,
    error: Option<&str>,
) -> Result<(RecordId, Data), Failure> {
    let id = encode_id(&job.video_id, &job.rendition.id);
    let mut record = json!({
        "id": id,
        "video_id": job.video_id,
        "rendition_id": job.rendition.id,
        "codec": job.rendition.codec,
        "height": job.rendition.height,
        "bitrate_kbps": job.rendition.bitrate_kbps,
        "status": status,
    });
    if let Some(error) = error {
        // The job names its dead letter, and sets one failure apart
        // from another's: each is a change the saga hears of.
        record["error"] = error.into();
        record["job"] = job.id.to_string().into();
    }
    let data = Data::of_value(&record).map_err(|e| Failure::Permanent(e.to_string()))?;
    Ok((id, data))
}

impl Process<EncodeJob> for EncodeHandler {
    async fn process(&self, job: &EncodeJob) -> Result<(), Failure> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.write(job, "encoded", None).await
    }

    /// A job given up on leaves its encode `failed`, with why: the change
    /// that tells scenario 6's saga to compensate. In memory it is written
    /// at once; on a shared store, by a task of its own (this must not
    /// wait).
    fn gave_up(&self, job: &EncodeJob, error: &str) {
        let failed = |failure: Failure, job: Uuid| {
            tracing::error!(%failure, %job, "the failed encode could not be recorded");
        };
        if !self.encodes.is_shared() {
            match self.write(job, "failed", Some(error)).now_or_never() {
                Some(Err(failure)) => failed(failure, job.id),
                Some(Ok(())) => {}
                None => failed(
                    Failure::Permanent("a write in memory waited".into()),
                    job.id,
                ),
            }
            return;
        }
        let handler = Self {
            encodes: self.encodes.clone(),
            delay: self.delay,
        };
        let (job, error) = (job.clone(), error.to_owned());
        tokio::spawn(async move {
            if let Err(failure) = handler.write(&job, "failed", Some(&error)).await {
                failed(failure, job.id);
            }
        });
    }
}
