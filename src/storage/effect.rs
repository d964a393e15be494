//! What the write-ahead log and snapshots hold: effects, not commands.
//!
//! A frame says what a step *did* (an entry's state after a write, with
//! the change it emitted), never what was asked for, so replaying the log
//! mints no sequence numbers, ids or timestamps, and replaying a frame
//! twice leaves the state as once. Payloads are JSON: short keys, and
//! record data as the canonical text it already is.
//!
//! Log frames are written in the step that makes the effect; snapshot
//! frames (kinds from [`HEADER`] on) only in snapshots.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::engine::log::{Cause, Change, ChangeKind};
use crate::engine::record::{Data, RecordId, Tie, Timestamp, Version};

/// A table entry after a write, and the change the write emitted, if any:
/// [`PutFrame`], then, after a newline, a [`ChangeImage`].
pub const PUT: u8 = 1;
/// A reconciliation became its table's current one ([`CurrentFrame`]).
pub const CURRENT: u8 = 2;
/// A CloudEvent was applied; its key joins the dedup window ([`DedupFrame`]).
pub const DEDUP: u8 = 3;
/// An item was put on a queue outside its feed, such as an encode job (the
/// outbox; [`ItemFrame`]).
pub const ENLIST: u8 = 4;
/// An item from the outbox finished ([`TicketFrame`]).
pub const DONE: u8 = 5;
/// An item was dead-lettered ([`DeadFrame`]).
pub const DEAD: u8 = 6;
/// A queue's dead letters up to a number were put back ([`UptoFrame`]).
pub const REDRIVE: u8 = 7;
/// A queue's dead letters up to a number were dropped ([`UptoFrame`]).
pub const DISCARD: u8 = 8;
/// A parent's child list was applied by its handler ([`AppliedFrame`]).
pub const APPLIED: u8 = 9;

/// Snapshot: what the snapshot covers ([`HeaderFrame`]); always first.
pub const HEADER: u8 = 20;
/// Snapshot: a retained change, whole ([`EventImage`]).
pub const EVENT: u8 = 21;
/// Snapshot: a fed queue's place in the change log ([`CursorFrame`]).
pub const CURSOR: u8 = 22;
/// Snapshot: an item a queue took and had not finished ([`ItemFrame`]).
pub const UNFINISHED: u8 = 23;

/// A timestamp, exactly: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct At(pub i64, pub u32);

impl From<Timestamp> for At {
    fn from(t: Timestamp) -> Self {
        let (secs, nanos) = t.parts();
        Self(secs, nanos)
    }
}

impl At {
    pub fn get(self) -> Result<Timestamp, String> {
        Timestamp::from_parts(self.0, self.1)
            .ok_or_else(|| format!("timestamp {}.{:09} out of range", self.0, self.1))
    }
}

/// A version: its instant, and its tie-break key (`k`), which is left out
/// for a tombstone, and for a stored value whose key is its own data
/// (`same`), as every raw write's is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionImage {
    pub a: At,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<Data>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub same: bool,
}

impl VersionImage {
    pub fn of(version: &Version, data: Option<&Data>) -> Self {
        let (k, same) = match &version.tie {
            Tie::Tombstone => (None, false),
            Tie::Key(key) if Some(key) == data => (None, true),
            Tie::Key(key) => (Some(key.clone()), false),
        };
        Self {
            a: version.at.into(),
            k,
            same,
        }
    }

    pub fn get(self, data: Option<&Data>) -> Result<Version, String> {
        let at = self.a.get()?;
        Ok(match (self.k, self.same, data) {
            (Some(key), _, _) => Version::write(at, key),
            (None, true, Some(data)) => Version::write(at, data.clone()),
            (None, true, None) => return Err("a version keyed by absent data".into()),
            (None, false, _) => Version::delete(at),
        })
    }
}

/// A version and the data written with it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredImage {
    pub v: VersionImage,
    pub x: Data,
}

impl StoredImage {
    pub fn of(version: &Version, data: &Data) -> Self {
        Self {
            v: VersionImage::of(version, Some(data)),
            x: data.clone(),
        }
    }

    pub fn get(self) -> Result<(Version, Data), String> {
        let version = self.v.get(Some(&self.x))?;
        Ok((version, self.x))
    }
}

/// What a table keeps for one id (see `engine::table`'s `Entry`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EntryImage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub o: Option<StoredImage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<At>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l: Vec<(String, StoredImage)>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub i: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One table entry as it is after a write (`e`: none once it is gone).
#[derive(Debug, Serialize, Deserialize)]
pub struct PutFrame {
    pub t: String,
    pub id: String,
    pub e: Option<EntryImage>,
}

/// A change, without what the entry beside it already says: its data and,
/// unless it is a delete, its version are the entry's record after it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeImage {
    pub s: u64,
    pub id: Uuid,
    pub k: ChangeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<VersionImage>,
    pub at: At,
    pub c: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Uuid>,
}

impl ChangeImage {
    pub fn of(change: &Change) -> Self {
        Self {
            s: change.seq,
            id: change.id,
            k: change.kind,
            v: (change.kind == ChangeKind::Deleted)
                .then(|| VersionImage::of(&change.version, None)),
            at: change.time.into(),
            c: change.cause.correlation.to_string(),
            by: change.cause.causation,
        }
    }

    /// The change, given the record it left (`None` for a delete).
    pub fn get(
        self,
        table: &crate::engine::log::TableName,
        key: RecordId,
        record: Option<(Version, Data)>,
    ) -> Result<Change, String> {
        let (version, data) = match (self.k, self.v, record) {
            (ChangeKind::Deleted, Some(v), _) => (v.get(None)?, None),
            (ChangeKind::Deleted, None, _) => return Err("a delete without its version".into()),
            (_, _, Some((version, data))) => (version, Some(data)),
            (_, _, None) => return Err(format!("change {} of an absent record", self.s)),
        };
        Ok(Change {
            seq: self.s,
            id: self.id,
            table: table.clone(),
            key,
            kind: self.k,
            version,
            data,
            time: self.at.get()?,
            cause: Cause {
                correlation: self.c.into(),
                causation: self.by,
            },
        })
    }
}

/// A retained change, whole (snapshots, dead letters, queue items).
#[derive(Debug, Serialize, Deserialize)]
pub struct EventImage {
    pub t: String,
    pub key: String,
    pub change: ChangeImage,
    /// The version, for every kind.
    pub v: VersionImage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<Data>,
}

impl EventImage {
    pub fn of(change: &Change) -> Self {
        Self {
            t: change.table.to_string(),
            key: change.key.to_string(),
            change: ChangeImage::of(change),
            v: VersionImage::of(&change.version, change.data.as_ref()),
            x: change.data.clone(),
        }
    }

    pub fn get(self) -> Result<Change, String> {
        let version = self.v.get(self.x.as_ref())?;
        let record = self.x.map(|data| (version, data));
        let table: crate::engine::log::TableName = self.t.into();
        self.change.get(&table, RecordId::derived(self.key), record)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CurrentFrame {
    pub t: String,
    pub a: At,
    pub ids: Data,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DedupFrame(pub [u8; 32]);

/// An item of a queue, as the queue's item type stores it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ItemFrame {
    pub q: String,
    pub ticket: u64,
    pub item: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TicketFrame {
    pub q: String,
    pub ticket: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeadFrame {
    pub q: String,
    /// The letter's number: the LSN of this frame.
    pub n: u64,
    pub ticket: u64,
    pub item: serde_json::Value,
    pub error: String,
    pub attempts: u32,
    pub at: At,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UptoFrame {
    pub q: String,
    pub upto: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListingImage {
    pub v: VersionImage,
    pub c: Vec<(String, Data)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AppliedFrame {
    /// The listing table.
    pub t: String,
    pub p: String,
    pub s: u64,
    pub l: Option<ListingImage>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HeaderFrame {
    /// The last log frame the snapshot includes.
    pub lsn: u64,
    /// The sequence the next change gets.
    pub next_seq: u64,
    pub taken_at: At,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CursorFrame {
    pub q: String,
    pub cursor: u64,
}

/// Encodes a frame payload.
pub fn encode(value: &impl Serialize) -> Vec<u8> {
    // Room for a typical entry with its change, so that it is not grown
    // three times on the write path.
    let mut out = Vec::with_capacity(512);
    // Serialising these plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    out
}

/// Decodes a frame payload, naming the frame kind on failure.
pub fn decode<T: serde::de::DeserializeOwned>(kind: u8, payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("frame of kind {kind}: {e}"))
}
