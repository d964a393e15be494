//! `raw_handler`: from raw changes to standard records (scenarios 1 to 4).
//!
//! For each change on `raw_queue` it writes (or deletes) the standard
//! record of the change's kind, carrying the raw version so every table
//! agrees on which write won. Two kinds list children:
//!
//! - a series' `episodes` become `raw_episodes` writes, which come back
//!   through `raw_queue` (recursive breakdown); episodes the series no longer
//!   lists are deleted;
//! - a video's `renditions` become one job each on `encode_queue` (async
//!   secondary work); encodes of renditions no longer listed are deleted.
//!
//! Everything here is safe to redo: a retried event writes again, gets
//! `unchanged`, and carries on with the rest of its work.

use std::collections::BTreeSet;
use std::sync::Arc;

use uuid::Uuid;

use crate::engine::children::{ChildSets, Replaced};
use crate::engine::handler::{Failure, Process};
use crate::engine::log::{Cause, Change, ChangeKind};
use crate::engine::queue::Queue;
use crate::engine::record::{RecordId, Timestamp, Version};
use crate::engine::table::{Outcome, Table};
use prometheus_client::metrics::histogram::Histogram;

use super::encode_handler::EncodeJob;
use super::records::{Kind, Standard, standardise};

pub struct RawHandler {
    /// Standard tables, indexed like [`Kind::ALL`].
    pub(crate) standard: [Arc<Table>; 5],
    pub(crate) raw_episodes: Arc<Table>,
    pub(crate) encodes: Arc<Table>,
    pub(crate) encode_queue: Arc<Queue<EncodeJob>>,
    /// Which episodes each series listed last.
    pub(crate) episodes_of: ChildSets,
    /// Which renditions each video listed last.
    pub(crate) renditions_of: ChildSets,
    /// Seconds from a raw change being recorded to the standard write it
    /// caused.
    pub(crate) visible: Histogram,
}

fn standard_index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl Process<Arc<Change>> for RawHandler {
    async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
        let kind = Kind::from_raw_table(&change.table).ok_or_else(|| {
            Failure::Permanent(format!("no standard table for `{}`", change.table))
        })?;
        let cause = Cause::caused_by(change);
        let table = &self.standard[standard_index(kind)];
        match (&change.kind, &change.data) {
            (ChangeKind::Deleted, _) | (_, None) => {
                if table.delete(&change.key, change.version.at, &cause) == Outcome::Deleted {
                    self.became_visible(change);
                }
                self.delete_children(kind, &change.key, change.version.at, &cause);
                Ok(())
            }
            (_, Some(raw)) => {
                let standard =
                    standardise(kind, &change.key, change.version.at, raw).map_err(|e| {
                        Failure::Permanent(format!(
                            "cannot standardise {kind} `{}`: {e}",
                            change.key
                        ))
                    })?;
                let outcome = table.apply(
                    crate::engine::table::Write {
                        id: change.key.clone(),
                        version: change.version.clone(),
                        data: standard.data.clone(),
                    },
                    &cause,
                );
                if matches!(outcome, Outcome::Inserted | Outcome::Updated) {
                    self.became_visible(change);
                }
                self.write_children(change, standard, &cause).await
            }
        }
    }
}

impl RawHandler {
    fn became_visible(&self, change: &Change) {
        let elapsed = chrono::Utc::now() - change.time.as_datetime();
        self.visible
            .observe(elapsed.to_std().unwrap_or_default().as_secs_f64());
    }

    async fn write_children(
        &self,
        change: &Change,
        standard: Standard,
        cause: &Cause,
    ) -> Result<(), Failure> {
        let at = change.version.at;
        if let Some(episodes) = standard.episodes {
            let listed = episodes.iter().map(|e| e.write.id.clone()).collect();
            let keep = self.replace(&self.episodes_of, change, listed, |id| {
                self.raw_episodes.delete(id, at, cause);
            });
            for episode in episodes.into_iter().filter(|e| keep.contains(&e.write.id)) {
                self.raw_episodes.apply(episode.write, cause);
            }
        }
        if let Some(renditions) = standard.renditions {
            let listed = renditions.iter().map(|r| r.id.clone()).collect();
            let keep = self.replace(&self.renditions_of, change, listed, |rendition| {
                self.encodes
                    .delete(&encode_id(&change.key, rendition), at, cause);
            });
            for rendition in renditions.into_iter().filter(|r| keep.contains(&r.id)) {
                let job = EncodeJob {
                    id: Uuid::now_v7(),
                    video_id: change.key.clone(),
                    rendition,
                    version: change.version.clone(),
                    cause: cause.clone(),
                };
                self.encode_queue
                    .send(job)
                    .await
                    .map_err(|e| Failure::Transient(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Records the new child list and deletes what it dropped; returns which
    /// listed children to write.
    fn replace(
        &self,
        sets: &ChildSets,
        change: &Change,
        listed: BTreeSet<RecordId>,
        delete: impl Fn(&RecordId),
    ) -> Keep {
        match sets.replace(&change.key, change.version.clone(), listed) {
            Replaced::Current { removed } => {
                removed.iter().for_each(delete);
                Keep::All
            }
            Replaced::Outdated { current } => Keep::Only(current),
        }
    }

    fn delete_children(&self, kind: Kind, parent: &RecordId, at: Timestamp, cause: &Cause) {
        let sets = match kind {
            Kind::Series => &self.episodes_of,
            Kind::Videos => &self.renditions_of,
            _ => return,
        };
        let Replaced::Current { removed } =
            sets.replace(parent, Version::delete(at), BTreeSet::new())
        else {
            return;
        };
        for child in &removed {
            match kind {
                Kind::Series => self.raw_episodes.delete(child, at, cause),
                _ => self.encodes.delete(&encode_id(parent, child), at, cause),
            };
        }
    }
}

/// The id of a video's encode of one rendition.
pub fn encode_id(video: &RecordId, rendition: &RecordId) -> RecordId {
    RecordId::derived(format!("{video}:{rendition}"))
}

/// Which children of a list to write: all of them, unless a newer list is
/// known, in which case only those it still lists.
enum Keep {
    All,
    Only(BTreeSet<RecordId>),
}

impl Keep {
    fn contains(&self, id: &RecordId) -> bool {
        match self {
            Keep::All => true,
            Keep::Only(current) => current.contains(id),
        }
    }
}
