//! `encode_handler`: the slow secondary work of scenario 3.
//!
//! Each job encodes one rendition of a video (simulated by a delay) and
//! writes the `encodes` record `{video_id}:{rendition_id}` at the sequence
//! of the video change that asked for it, so a job outdated by a later
//! change of that rendition is stale on arrival.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::json;
use uuid::Uuid;

use crate::engine::handler::{Failure, Process};
use crate::engine::log::Cause;
use crate::engine::queue::QueueItem;
use crate::engine::record::{Data, RecordId, Version};
use crate::engine::table::Table;

use super::raw_handler::encode_id;
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
    /// The raw video change that asked for it.
    pub cause: Cause,
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
}

/// Shown as a CloudEvent, like the changes on `raw_queue`.
impl Serialize for EncodeJob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("specversion", "1.0")?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("source", "/handlers/raw_handler")?;
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
            &json!({ "video_id": self.video_id, "rendition": self.rendition }),
        )?;
        map.end()
    }
}

pub struct EncodeHandler {
    pub(crate) encodes: Arc<Table>,
    /// Simulated time of one encode.
    pub(crate) delay: Duration,
}

impl Process<EncodeJob> for EncodeHandler {
    async fn process(&self, job: &EncodeJob) -> Result<(), Failure> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let id = encode_id(&job.video_id, &job.rendition.id);
        let data = Data::of_value(&json!({
            "id": id,
            "video_id": job.video_id,
            "rendition_id": job.rendition.id,
            "codec": job.rendition.codec,
            "height": job.rendition.height,
            "status": "encoded",
        }))
        .map_err(|e| Failure::Permanent(e.to_string()))?;
        // The encode's causation is the raw video change, which is in the log.
        self.encodes
            .derive(&id, job.seq, job.version.clone(), Some(data), &job.cause)
            .map_err(|full| Failure::Permanent(full.to_string()))?;
        Ok(())
    }
}
