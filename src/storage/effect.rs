//! What the write-ahead log and snapshots hold: effects, not commands.
//!
//! A frame says what a step *did* (an entry's state after a write, with
//! the change it emitted), never what was asked for, so replaying the log
//! mints no sequence numbers, ids or timestamps, and replaying a frame
//! twice leaves the state as once. Payloads are postcard (serde's compact
//! binary form: fields in order, varint numbers, ids as 16 bytes), with
//! record data as the canonical JSON text it already is.
//!
//! Log frames are written in the step that makes the effect; snapshot
//! frames (kinds from [`HEADER`] on) only in snapshots.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::engine::log::{Cause, Change, ChangeKind};
use crate::engine::record::{Data, RecordId, Tie, Timestamp, Version};

/// A table entry after a write, and the change the write emitted, if any:
/// [`PutFrame`], then, unless the payload ends there, a [`ChangeImage`].
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

/// On a shared store: a record's state ([`StateFrame`]); never on disk.
pub const STATE: u8 = 10;

/// On a shared store: a parent's child-list mark ([`MarkFrame`]).
pub const MARK: u8 = 11;

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
    pub k: Option<Data>,
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
    pub o: Option<StoredImage>,
    pub d: Option<At>,
    pub l: Vec<(String, StoredImage)>,
    pub s: u64,
    pub i: bool,
}

/// One table entry as it is after a write (`e`: none once it is gone).
/// Written with borrowed names (`PutFrame<&str>`), read back owned.
#[derive(Debug, Serialize, Deserialize)]
pub struct PutFrame<S = String> {
    pub t: S,
    pub id: S,
    pub e: Option<EntryImage>,
}

/// On a shared store (JetStream), one message of a record's state: the
/// entry (none once gone), whether the change log last said the record is
/// live (a new reconciliation can hide a record before its change is
/// written), and the change this state made, if any.
#[derive(Debug, Serialize, Deserialize)]
pub struct StateFrame<S = String> {
    pub t: S,
    pub id: S,
    pub e: Option<EntryImage>,
    pub live: bool,
    pub change: Option<ChangeImage<S>>,
}

/// A change, without what the entry beside it already says: its data and,
/// unless it is a delete, its version are the entry's record after it.
///
/// Written with a borrowed correlation (`ChangeImage<&str>`), read back
/// owned.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeImage<S = String> {
    pub s: u64,
    pub id: Uuid,
    pub k: ChangeKind,
    pub v: Option<VersionImage>,
    pub at: At,
    pub c: S,
    pub by: Option<Uuid>,
}

impl<'a> ChangeImage<&'a str> {
    pub fn of(change: &'a Change) -> Self {
        Self {
            s: change.seq,
            id: change.id,
            k: change.kind,
            v: (change.kind == ChangeKind::Deleted)
                .then(|| VersionImage::of(&change.version, None)),
            at: change.time.into(),
            c: &change.cause.correlation,
            by: change.cause.causation,
        }
    }
}

/// Correlation ids read back, shared: the changes of one request (a
/// batch's records, and the changes they caused) are read back close
/// together, so the few ids seen last are kept and a change reuses the one
/// it carries instead of holding a copy of its own.
#[derive(Default)]
pub struct Correlations {
    recent: [Option<std::sync::Arc<str>>; 4],
    next: usize,
}

impl Correlations {
    pub fn get(&mut self, text: &str) -> std::sync::Arc<str> {
        if let Some(seen) = self.recent.iter().flatten().find(|seen| ***seen == *text) {
            return seen.clone();
        }
        let id: std::sync::Arc<str> = text.into();
        self.recent[self.next] = Some(id.clone());
        self.next = (self.next + 1) % self.recent.len();
        id
    }
}

impl ChangeImage {
    /// The change, given the record it left (`None` for a delete).
    pub fn get(
        self,
        table: &crate::engine::log::TableName,
        key: RecordId,
        record: Option<(Version, Data)>,
        correlations: &mut Correlations,
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
                correlation: correlations.get(&self.c),
                causation: self.by,
            },
        })
    }
}

/// A retained change, whole (snapshots, dead letters, queue items).
#[derive(Debug, Serialize, Deserialize)]
pub struct EventImage<S = String> {
    pub t: S,
    pub key: S,
    pub change: ChangeImage<S>,
    /// The version, for every kind.
    pub v: VersionImage,
    pub x: Option<Data>,
}

impl<'a> EventImage<&'a str> {
    pub fn of(change: &'a Change) -> Self {
        Self {
            t: &change.table,
            key: change.key.as_str(),
            change: ChangeImage::of(change),
            v: VersionImage::of(&change.version, change.data.as_ref()),
            x: change.data.clone(),
        }
    }
}

impl EventImage {
    pub fn get(self, correlations: &mut Correlations) -> Result<Change, String> {
        let version = self.v.get(self.x.as_ref())?;
        let record = self.x.map(|data| (version, data));
        let table: crate::engine::log::TableName = self.t.into();
        self.change
            .get(&table, RecordId::derived(self.key), record, correlations)
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
    pub item: Json,
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
    pub item: Json,
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

/// On a shared store: what was last applied of a parent's child list and,
/// while a refresh of it is under way, which one and since when.
#[derive(Debug, Serialize, Deserialize)]
pub struct MarkFrame {
    pub applied: AppliedFrame,
    pub holder: Option<(Uuid, At)>,
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

/// A JSON value inside a frame, as its text: postcard is not
/// self-describing, so a value of any shape (a queue's item) travels as
/// the text it reads back from.
#[derive(Clone, Debug)]
pub struct Json(pub serde_json::Value);

impl Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        serde_json::from_str(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// Encodes a frame payload.
pub fn encode(value: &impl Serialize) -> Vec<u8> {
    // Room for a typical entry with its change, so that it is not grown
    // on the write path.
    encode_onto(value, Vec::with_capacity(512))
}

/// Encodes `value` after what `out` holds.
pub fn encode_onto(value: &impl Serialize, out: Vec<u8>) -> Vec<u8> {
    // Encoding these plain structs into a Vec cannot fail; if it ever
    // did, the frame would be short and fail to decode, loudly, on restart.
    match postcard::to_extend(value, out) {
        Ok(out) => out,
        Err(error) => {
            tracing::error!(%error, "a frame could not be encoded");
            Vec::new()
        }
    }
}

/// Decodes a frame payload, naming the frame kind on failure.
pub fn decode<'a, T: Deserialize<'a>>(kind: u8, payload: &'a [u8]) -> Result<T, String> {
    decode_prefix(kind, payload).map(|(value, _)| value)
}

/// A [`PUT`] payload: the entry, then, if the write emitted one, its
/// change.
pub fn decode_put(payload: &[u8]) -> Result<(PutFrame, Option<ChangeImage>), String> {
    let (put, rest) = decode_prefix(PUT, payload)?;
    let change = (!rest.is_empty()).then(|| decode(PUT, rest)).transpose()?;
    Ok((put, change))
}

/// Decodes a value at the start of `payload`; it and the bytes after it.
pub fn decode_prefix<'a, T: Deserialize<'a>>(
    kind: u8,
    payload: &'a [u8],
) -> Result<(T, &'a [u8]), String> {
    postcard::take_from_bytes(payload).map_err(|e| format!("frame of kind {kind}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_read_back_as_written_with_data_text_exact() {
        let data =
            Data::of_value(&json!({"id": "m\"1", "t": "a\\b\nc", "n": [1, 2.5, null]})).unwrap();
        let version = Version::write(
            Timestamp::from_parts(1_700_000_000, 5).unwrap(),
            data.clone(),
        );
        let put = PutFrame {
            t: "movies",
            id: "m\"1",
            e: Some(EntryImage {
                o: Some(StoredImage::of(&version, &data)),
                d: Some(At(1, 2)),
                l: vec![("raw".into(), StoredImage::of(&version, &data))],
                s: 7,
                i: true,
            }),
        };
        let item = ItemFrame {
            q: "encode_queue".into(),
            ticket: 9,
            item: Json(json!({"video": "v1", "rendition": [720, "hd"]})),
        };
        let payload = encode_onto(&item, encode(&put));
        let (back, rest): (PutFrame, _) = decode_prefix(PUT, &payload).unwrap();
        let entry = back.e.unwrap();
        let (v, x) = entry.o.unwrap().get().unwrap();
        assert_eq!(x.as_str(), data.as_str(), "data is kept as its exact text");
        assert_eq!(v, version);
        assert_eq!((entry.s, entry.i, entry.l.len()), (7, true, 1));
        let item: ItemFrame = decode(ENLIST, rest).unwrap();
        assert_eq!(
            item.item.0,
            json!({"video": "v1", "rendition": [720, "hd"]})
        );
    }

    #[test]
    fn a_cut_frame_is_an_error_naming_its_kind() {
        let payload = encode(&CursorFrame {
            q: "raw_queue".into(),
            cursor: 1 << 40,
        });
        let error = decode::<CursorFrame>(CURSOR, &payload[..payload.len() - 1]).unwrap_err();
        assert!(error.contains("frame of kind 22"), "{error}");
    }
}
