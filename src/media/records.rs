//! Media records: the five kinds, what ingest checks, and how `raw_handler`
//! turns a raw record into a standard one.
//!
//! Ingest checks only the envelope (an object with a valid `id`, a valid
//! `updated_at` if present, and well-formed child lists), so a vendor's
//! record is stored as sent. Standardisation checks the fields per kind; a
//! record that fails it is a permanent failure naming the field.

use std::fmt;

use std::borrow::Cow;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::engine::children::Split;
use crate::engine::record::{Data, RecordId, Timestamp, ValueError, Version};
use crate::engine::table::Write;

/// The media kinds, each with a raw and a standard table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Actors,
    Movies,
    Series,
    Episodes,
    Videos,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Actors,
        Kind::Movies,
        Kind::Series,
        Kind::Episodes,
        Kind::Videos,
    ];

    /// The kinds whose standard tables feed `projection_queue`.
    pub const PROJECTED: [Kind; 4] = [Kind::Actors, Kind::Movies, Kind::Series, Kind::Episodes];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Actors => "actors",
            Kind::Movies => "movies",
            Kind::Series => "series",
            Kind::Episodes => "episodes",
            Kind::Videos => "videos",
        }
    }

    pub fn raw_table(self) -> &'static str {
        match self {
            Kind::Actors => "raw_actors",
            Kind::Movies => "raw_movies",
            Kind::Series => "raw_series",
            Kind::Episodes => "raw_episodes",
            Kind::Videos => "raw_videos",
        }
    }

    /// The standard table of this kind has the kind's own name.
    pub fn standard_table(self) -> &'static str {
        self.as_str()
    }

    pub fn from_raw_table(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.raw_table() == name)
    }

    /// The field that lists this kind's children, if it has any.
    pub fn child_list(self) -> Option<&'static str> {
        self.children().map(|(field, _, _)| field)
    }

    /// For a parent kind: the field listing its children, the raw table
    /// of its child lists, and how a list splits into children.
    pub fn children(self) -> Option<(&'static str, &'static str, Split)> {
        match self {
            Kind::Series => Some(("episodes", "raw_series_episodes", split_episodes)),
            Kind::Videos => Some(("renditions", "raw_videos_renditions", split_renditions)),
            _ => None,
        }
    }
}

/// One value per kind, found by kind: adding a kind fails to compile until
/// every `ByKind` has one.
#[derive(Clone, Debug)]
pub struct ByKind<T> {
    pub actors: T,
    pub movies: T,
    pub series: T,
    pub episodes: T,
    pub videos: T,
}

impl<T> ByKind<T> {
    pub fn new(mut make: impl FnMut(Kind) -> T) -> Self {
        Self {
            actors: make(Kind::Actors),
            movies: make(Kind::Movies),
            series: make(Kind::Series),
            episodes: make(Kind::Episodes),
            videos: make(Kind::Videos),
        }
    }

    pub fn get(&self, kind: Kind) -> &T {
        match kind {
            Kind::Actors => &self.actors,
            Kind::Movies => &self.movies,
            Kind::Series => &self.series,
            Kind::Episodes => &self.episodes,
            Kind::Videos => &self.videos,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A field that is missing or wrong, named by its path (`renditions[1].codec`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {reason}")]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

impl InvalidField {
    fn new(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// A record refused at ingest: which one and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index}: {error}")]
pub struct InvalidRecord {
    pub index: usize,
    pub error: InvalidField,
}

/// Checks one raw record's envelope and turns it into a table write.
/// `default_at` is the version used when `updated_at` is absent.
pub fn parse_record(
    value: Value,
    default_at: Timestamp,
    kind: Kind,
) -> Result<Write, InvalidField> {
    let Value::Object(mut map) = value else {
        return Err(InvalidField::new("", "a record must be a JSON object"));
    };
    if depth(&map) > MAX_DEPTH {
        return Err(InvalidField::new(
            "",
            format_args!("is nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let id = record_id(&map, "id")?;
    let at = match map.remove("updated_at") {
        None => default_at,
        Some(value) => timestamp(&value, "updated_at")?,
    };
    if let Some(list) = kind.child_list() {
        child_list(&map, list)?;
    }
    let data = Data::of_object(&map).map_err(|e| InvalidField::new("", e))?;
    Ok(Write {
        id,
        version: Version::write(at, data.clone()),
        data,
    })
}

/// How deep a record may nest. Responses wrap records a few levels deeper
/// (`/events` pages), and must stay within what common JSON parsers accept
/// (serde_json's default limit is 128).
pub const MAX_DEPTH: usize = 64;

/// Nesting depth of an object's values (the object itself is level 1).
fn depth(map: &Map<String, Value>) -> usize {
    let mut deepest = 1;
    let mut stack: Vec<(&Value, usize)> = map.values().map(|v| (v, 2)).collect();
    while let Some((value, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        deepest = deepest.max(level);
        stack.extend(children.map(|child| (child, level + 1)));
    }
    deepest
}

/// Checks a batch; the first invalid record fails the whole batch.
pub fn parse_records(
    values: Vec<Value>,
    default_at: Timestamp,
    kind: Kind,
) -> Result<Vec<Write>, InvalidRecord> {
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            parse_record(value, default_at, kind).map_err(|error| InvalidRecord { index, error })
        })
        .collect()
}

fn record_id(map: &Map<String, Value>, field: &str) -> Result<RecordId, InvalidField> {
    match map.get(field) {
        None => Err(InvalidField::new(field, "is required")),
        Some(value) => id_from(value.as_str()).map_err(|e| InvalidField::new(field, e)),
    }
}

fn timestamp(value: &Value, field: &str) -> Result<Timestamp, InvalidField> {
    timestamp_from(value.as_str()).map_err(|e| InvalidField::new(field, e))
}

/// An id field's text (`None`: the value is not a string), checked.
fn id_from(text: Option<&str>) -> Result<RecordId, ValueError> {
    text.ok_or(ValueError::IdLength).and_then(RecordId::parse)
}

/// A timestamp field's text (`None`: the value is not a string), parsed.
fn timestamp_from(text: Option<&str>) -> Result<Timestamp, ValueError> {
    text.ok_or(ValueError::Timestamp).and_then(Timestamp::parse)
}

/// A child list, if present, is an array of objects each with a valid `id`
/// (and a valid `updated_at`, if any).
fn child_list(map: &Map<String, Value>, field: &str) -> Result<(), InvalidField> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(items)) => {
            let mut seen = std::collections::HashMap::new();
            for (i, item) in items.iter().enumerate() {
                let path = format!("{field}[{i}]");
                let Value::Object(child) = item else {
                    return Err(InvalidField::new(path, "must be an object"));
                };
                let id = record_id(child, "id")
                    .map_err(|e| InvalidField::new(format!("{path}.id"), e.reason))?;
                if let Some(first) = seen.insert(id, i) {
                    return Err(InvalidField::new(
                        format!("{path}.id"),
                        format_args!(
                            "repeats the id of {field}[{first}]; a list names each child once"
                        ),
                    ));
                }
                if let Some(at) = child.get("updated_at") {
                    timestamp(at, "updated_at")
                        .map_err(|e| InvalidField::new(format!("{path}.updated_at"), e.reason))?;
                }
            }
            Ok(())
        }
        Some(_) => Err(InvalidField::new(field, "must be an array of objects")),
    }
}

/// The fields standardisation reads, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Id,
    UpdatedAt,
    Name,
    BirthDate,
    Title,
    Year,
    ActorIds,
    SeriesId,
    Season,
    Number,
    DurationS,
    Episodes,
    Renditions,
    Codec,
    Height,
    BitrateKbps,
}

impl Field {
    const ALL: [Field; 16] = [
        Field::Id,
        Field::UpdatedAt,
        Field::Name,
        Field::BirthDate,
        Field::Title,
        Field::Year,
        Field::ActorIds,
        Field::SeriesId,
        Field::Season,
        Field::Number,
        Field::DurationS,
        Field::Episodes,
        Field::Renditions,
        Field::Codec,
        Field::Height,
        Field::BitrateKbps,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Field::Id => "id",
            Field::UpdatedAt => "updated_at",
            Field::Name => "name",
            Field::BirthDate => "birth_date",
            Field::Title => "title",
            Field::Year => "year",
            Field::ActorIds => "actor_ids",
            Field::SeriesId => "series_id",
            Field::Season => "season",
            Field::Number => "number",
            Field::DurationS => "duration_s",
            Field::Episodes => "episodes",
            Field::Renditions => "renditions",
            Field::Codec => "codec",
            Field::Height => "height",
            Field::BitrateKbps => "bitrate_kbps",
        }
    }

    fn of(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// The known fields of one JSON object, each borrowed as the JSON text of
/// its value; `null` counts as absent and unknown fields are skipped.
/// Reading a record this way parses it once and copies nothing.
#[derive(Default)]
struct Known<'a>([Option<&'a RawValue>; Field::ALL.len()]);

impl<'de> Deserialize<'de> for Known<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Known<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Known<'de>, A::Error> {
                let mut known = Known::default();
                while let Some(field) = map.next_key_seed(FieldName)? {
                    match field {
                        Some(field) => known.0[field as usize] = map.next_value()?,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(known)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Reads an object key as a [`Field`], without allocating.
struct FieldName;

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = Option<Field>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Field>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = Option<Field>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Option<Field>, E> {
        Ok(Field::of(name))
    }
}

/// Reads fields of a raw record (or of one child in its lists) for
/// standardisation, naming the field by its path when it is wrong.
struct Fields<'a> {
    known: Known<'a>,
    /// Path of this object inside the record, for error messages.
    prefix: String,
}

impl<'a> Fields<'a> {
    /// Reads an object's JSON text; `None` if it is not an object.
    fn parse(json: &'a str, prefix: String) -> Option<Self> {
        let known = serde_json::from_str(json).ok()?;
        Some(Self { known, prefix })
    }

    fn path(&self, field: Field) -> String {
        format!("{}{}", self.prefix, field.as_str())
    }

    fn invalid(&self, field: Field, reason: &str) -> InvalidField {
        InvalidField::new(self.path(field), reason)
    }

    fn present(&self, field: Field) -> Option<&'a RawValue> {
        self.known.0[field as usize]
    }

    fn string(&self, field: Field) -> Result<Option<Cow<'a, str>>, InvalidField> {
        let Some(raw) = self.present(field) else {
            return Ok(None);
        };
        match text(raw).map(trim) {
            Some(s) if !s.is_empty() => Ok(Some(s)),
            Some(_) => Err(self.invalid(field, "must not be empty")),
            None => Err(self.invalid(field, "must be a string")),
        }
    }

    fn required_string(&self, field: Field) -> Result<Cow<'a, str>, InvalidField> {
        self.string(field)?
            .ok_or_else(|| self.invalid(field, "is required"))
    }

    /// A number read by `read`, or `reason` if it is not one `read` takes.
    fn number<T>(
        &self,
        field: Field,
        read: impl Fn(&serde_json::Number) -> Option<T>,
        reason: &str,
    ) -> Result<Option<T>, InvalidField> {
        self.present(field)
            .map(|raw| {
                serde_json::from_str(raw.get())
                    .ok()
                    .as_ref()
                    .and_then(&read)
                    .ok_or_else(|| self.invalid(field, reason))
            })
            .transpose()
    }

    fn unsigned(&self, field: Field) -> Result<Option<u64>, InvalidField> {
        self.number(field, |n| n.as_u64(), "must be a non-negative integer")
    }

    fn integer(&self, field: Field) -> Result<Option<i64>, InvalidField> {
        self.number(field, |n| n.as_i64(), "must be an integer")
    }

    fn non_negative(&self, field: Field) -> Result<Option<f64>, InvalidField> {
        self.number(
            field,
            |n| n.as_f64().filter(|f| *f >= 0.0),
            "must be a non-negative number",
        )
    }

    fn date(&self, field: Field) -> Result<Option<String>, InvalidField> {
        let Some(text) = self.string(field)? else {
            return Ok(None);
        };
        // Already in the standard form (the usual case): check it is a real
        // date without the cost of a format string.
        if let [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] = *text.as_bytes() {
            let number = |digits: &[u8]| {
                digits.iter().try_fold(0u32, |n, d| {
                    d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
                })
            };
            let ymd = (
                number(&[y0, y1, y2, y3]),
                number(&[m0, m1]),
                number(&[d0, d1]),
            );
            if let (Some(y), Some(m), Some(d)) = ymd {
                return chrono::NaiveDate::from_ymd_opt(y as i32, m, d)
                    .map(|_| Some(text.into_owned()))
                    .ok_or_else(|| self.invalid(field, "must be a date as YYYY-MM-DD"));
            }
        }
        chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d")
            .map(|d| Some(d.format("%Y-%m-%d").to_string()))
            .map_err(|_| self.invalid(field, "must be a date as YYYY-MM-DD"))
    }

    fn strings(&self, field: Field) -> Result<Vec<Cow<'a, str>>, InvalidField> {
        let Some(raw) = self.present(field) else {
            return Ok(Vec::new());
        };
        let items: Vec<&'a RawValue> = serde_json::from_str(raw.get())
            .map_err(|_| self.invalid(field, "must be an array of strings"))?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match text(item).map(trim) {
                Some(s) if !s.is_empty() => Ok(s),
                _ => Err(InvalidField::new(
                    format!("{}[{i}]", self.path(field)),
                    "must be a non-empty string",
                )),
            })
            .collect()
    }

    fn id(&self) -> Result<RecordId, InvalidField> {
        match self.present(Field::Id) {
            None => Err(self.invalid(Field::Id, "is required")),
            Some(raw) => id_from(text(raw).as_deref())
                .map_err(|e| InvalidField::new(self.path(Field::Id), e)),
        }
    }
}

/// A JSON string's text, borrowed unless it has escapes.
fn text(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
    if !json.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(json) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(json).ok().map(Cow::Owned),
    }
}

fn trim(text: Cow<'_, str>) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
        Cow::Owned(s) if s.trim().len() == s.len() => Cow::Owned(s),
        Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
    }
}

/// A number written as RFC 8785 writes it: integers within ±2^53 as
/// serde_json writes them (the same digits), anything else through the
/// canonicaliser's ECMAScript formatting.
struct Exact<T>(T);

impl<T: Serialize + Copy + Into<Exactly>> Serialize for Exact<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const EXACT: f64 = (1u64 << 53) as f64;
        let plain = match self.0.into() {
            Exactly::Unsigned(n) => n <= 1 << 53,
            Exactly::Signed(n) => n.unsigned_abs() <= 1 << 53,
            Exactly::Float(f) => f.fract() == 0.0 && f.abs() <= EXACT,
        };
        match self.0.into() {
            Exactly::Float(f) if plain => s.serialize_i64(f as i64),
            _ if plain => self.0.serialize(s),
            _ => {
                let text = serde_json_canonicalizer::to_string(&self.0)
                    .map_err(serde::ser::Error::custom)?;
                RawValue::from_string(text)
                    .map_err(serde::ser::Error::custom)?
                    .serialize(s)
            }
        }
    }
}

enum Exactly {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

impl From<u64> for Exactly {
    fn from(n: u64) -> Self {
        Exactly::Unsigned(n)
    }
}

impl From<i64> for Exactly {
    fn from(n: i64) -> Self {
        Exactly::Signed(n)
    }
}

impl From<f64> for Exactly {
    fn from(n: f64) -> Self {
        Exactly::Float(n)
    }
}

/// The standard records, written straight to canonical JSON: fields are
/// declared in byte-wise order of their names, which is the order RFC 8785
/// asks for, and strings and numbers are written as it writes them.
mod standard {
    use super::{Exact, RecordId};
    use serde::Serialize;

    #[derive(Serialize)]
    pub struct Actor<'a> {
        pub birth_date: Option<String>,
        pub id: &'a RecordId,
        pub name: &'a str,
    }

    #[derive(Serialize)]
    pub struct Movie<'a> {
        pub actor_ids: Vec<&'a str>,
        pub id: &'a RecordId,
        pub title: &'a str,
        pub year: Option<Exact<i64>>,
    }

    #[derive(Serialize)]
    pub struct Series<'a> {
        pub id: &'a RecordId,
        pub title: &'a str,
    }

    #[derive(Serialize)]
    pub struct Episode<'a> {
        pub id: &'a RecordId,
        pub number: Option<Exact<u64>>,
        pub season: Option<Exact<u64>>,
        pub series_id: &'a str,
        pub title: &'a str,
    }

    #[derive(Serialize)]
    pub struct Video<'a> {
        pub duration_s: Option<Exact<f64>>,
        pub id: &'a RecordId,
        pub rendition_ids: Vec<&'a RecordId>,
        pub title: &'a str,
    }
}

/// A rendition a video lists, for its encode job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Rendition {
    pub bitrate_kbps: Option<u64>,
    pub codec: String,
    pub height: u64,
    pub id: RecordId,
}

/// Turns raw data of `kind` into its standard record. `children` are the
/// ids its parent's listing names now (a video's `rendition_ids`), which
/// may come from another version than `raw` (API.md, "Children belong to
/// their parent").
pub fn standardise(
    kind: Kind,
    id: &RecordId,
    raw: &Data,
    children: &[RecordId],
) -> Result<Data, InvalidField> {
    let f = Fields::parse(raw.as_str(), String::new())
        .ok_or_else(|| InvalidField::new("", "a record must be a JSON object"))?;
    match kind {
        Kind::Actors => written(&standard::Actor {
            birth_date: f.date(Field::BirthDate)?,
            id,
            name: &f.required_string(Field::Name)?,
        }),
        Kind::Movies => {
            let actor_ids = f.strings(Field::ActorIds)?;
            written(&standard::Movie {
                actor_ids: actor_ids.iter().map(|a| &**a).collect(),
                id,
                title: &f.required_string(Field::Title)?,
                year: f.integer(Field::Year)?.map(Exact),
            })
        }
        Kind::Series => written(&standard::Series {
            id,
            title: &f.required_string(Field::Title)?,
        }),
        Kind::Episodes => written(&standard::Episode {
            id,
            number: f.unsigned(Field::Number)?.map(Exact),
            season: f.unsigned(Field::Season)?.map(Exact),
            series_id: &f.required_string(Field::SeriesId)?,
            title: &f.required_string(Field::Title)?,
        }),
        Kind::Videos => written(&standard::Video {
            duration_s: f.non_negative(Field::DurationS)?.map(Exact),
            id,
            rendition_ids: children.iter().collect(),
            title: &f.required_string(Field::Title)?,
        }),
    }
}

/// A standard record as [`Data`]; it is canonical as written.
fn written(record: &impl Serialize) -> Result<Data, InvalidField> {
    Data::of_canonical(record).map_err(|e| InvalidField::new("", e))
}

/// The items of a child list (`field`) as `Fields`, each with its JSON.
fn items<'a>(field: &str, list: &'a Data) -> Result<Vec<(Fields<'a>, &'a str)>, InvalidField> {
    let items: Vec<&'a RawValue> = serde_json::from_str(list.as_str())
        .map_err(|_| InvalidField::new(field, "must be an array of objects"))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            Fields::parse(item.get(), format!("{field}[{i}]."))
                .map(|f| (f, item.get()))
                .ok_or_else(|| InvalidField::new(format!("{field}[{i}]"), "must be an object"))
        })
        .collect()
}

/// A series' `episodes` as raw episode records: each as listed, without
/// `updated_at` (a listed episode is versioned by its series) and with
/// `series_id` set to the series.
pub fn split_episodes(series: &RecordId, list: &Data) -> Result<Vec<(RecordId, Data)>, String> {
    episodes_of(series, list)
        .map_err(|e| format!("cannot split the episodes of series `{series}`: {e}"))
}

/// A video's `renditions`, each checked and written as a [`Rendition`].
pub fn split_renditions(video: &RecordId, list: &Data) -> Result<Vec<(RecordId, Data)>, String> {
    renditions_of(list).map_err(|e| format!("cannot standardise videos `{video}`: {e}"))
}

fn episodes_of(series: &RecordId, list: &Data) -> Result<Vec<(RecordId, Data)>, InvalidField> {
    items("episodes", list)?
        .into_iter()
        .map(|(f, json)| {
            let id = f.id()?;
            let mut map: Map<String, Value> =
                serde_json::from_str(json).map_err(|e| InvalidField::new(f.prefix.clone(), e))?;
            map.remove("updated_at");
            map.insert("series_id".into(), Value::String(series.to_string()));
            let data = Data::of_object(&map).map_err(|e| InvalidField::new(f.prefix.clone(), e))?;
            Ok((id, data))
        })
        .collect()
}

fn renditions_of(list: &Data) -> Result<Vec<(RecordId, Data)>, InvalidField> {
    items("renditions", list)?
        .into_iter()
        .map(|(f, _)| {
            let rendition = rendition(&f)?;
            let data = Data::of_canonical(&rendition)
                .map_err(|e| InvalidField::new(f.prefix.clone(), e))?;
            Ok((rendition.id, data))
        })
        .collect()
}

fn rendition(f: &Fields<'_>) -> Result<Rendition, InvalidField> {
    Ok(Rendition {
        id: f.id()?,
        codec: f.required_string(Field::Codec)?.into_owned(),
        height: f
            .unsigned(Field::Height)?
            .ok_or_else(|| f.invalid(Field::Height, "is required"))?,
        bitrate_kbps: f.unsigned(Field::BitrateKbps)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: Value) -> (RecordId, Data) {
        let write = parse_record(value, Timestamp::now(), Kind::Videos).unwrap();
        (write.id, write.data)
    }

    /// The standard record, with a video's renditions as its listing.
    fn standard(kind: Kind, value: Value) -> Result<Value, InvalidField> {
        let renditions = value
            .get("renditions")
            .map(|list| renditions_of(&Data::canonical(list).unwrap()))
            .transpose()?
            .unwrap_or_default();
        let ids: Vec<RecordId> = renditions.into_iter().map(|(id, _)| id).collect();
        let (id, data) = raw(value);
        standardise(kind, &id, &data, &ids).map(|s| serde_json::from_str(s.as_str()).unwrap())
    }

    #[test]
    fn updated_at_is_the_version_not_the_data() {
        let a = parse_record(
            json!({"id":"m1","title":"A","updated_at":"2024-01-01T00:00:00Z"}),
            Timestamp::now(),
            Kind::Movies,
        )
        .unwrap();
        let b = parse_record(
            json!({"id":"m1","title":"A","updated_at":"2024-02-01T00:00:00Z"}),
            Timestamp::now(),
            Kind::Movies,
        )
        .unwrap();
        assert_eq!(a.data, b.data);
        assert!(b.version > a.version);
    }

    #[test]
    fn envelopes_are_checked() {
        let now = Timestamp::now();
        let err = |v: Value, k: Kind| parse_record(v, now, k).unwrap_err().field;
        assert_eq!(err(json!({"title":"x"}), Kind::Movies), "id");
        assert_eq!(err(json!({"id":""}), Kind::Movies), "id");
        assert_eq!(err(json!({"id":7}), Kind::Movies), "id");
        assert_eq!(
            err(json!({"id":"a","updated_at":"soon"}), Kind::Movies),
            "updated_at"
        );
        assert_eq!(
            err(json!({"id":"s","episodes":{}}), Kind::Series),
            "episodes"
        );
        assert_eq!(
            err(
                json!({"id":"s","episodes":[{"id":"e1"},{"x":1}]}),
                Kind::Series
            ),
            "episodes[1].id"
        );
        assert_eq!(
            err(json!({"id":"v","renditions":[3]}), Kind::Videos),
            "renditions[0]"
        );
        assert_eq!(err(json!([1]), Kind::Movies), "");
        let nested = |levels: usize| {
            let mut value = json!(1);
            for _ in 0..levels {
                value = json!([value]);
            }
            json!({"id": "deep", "x": value})
        };
        assert!(parse_record(nested(MAX_DEPTH - 1), now, Kind::Movies).is_ok());
        assert!(parse_record(nested(MAX_DEPTH), now, Kind::Movies).is_err());
    }

    #[test]
    fn standard_records_per_kind() {
        assert_eq!(
            standard(
                Kind::Actors,
                json!({"id":"a1","name":"  Ann ","birth_date":"1970-02-03","extra":1})
            )
            .unwrap(),
            json!({"id":"a1","name":"Ann","birth_date":"1970-02-03"})
        );
        assert_eq!(
            standard(
                Kind::Movies,
                json!({"id":"m1","title":"T","year":1999,"actor_ids":["a1"]})
            )
            .unwrap(),
            json!({"id":"m1","title":"T","year":1999,"actor_ids":["a1"]})
        );
        assert_eq!(
            standard(
                Kind::Episodes,
                json!({"id":"e1","series_id":"s1","title":"Pilot","season":1,"number":1})
            )
            .unwrap(),
            json!({"id":"e1","series_id":"s1","season":1,"number":1,"title":"Pilot"})
        );
        assert_eq!(
            standard(Kind::Videos, json!({"id":"v1","title":"V","duration_s":12.5,"renditions":[{"id":"r1","codec":"h264","height":720}]})).unwrap(),
            json!({"id":"v1","title":"V","duration_s":12.5,"rendition_ids":["r1"]})
        );
    }

    #[test]
    fn dates_are_checked_and_written_as_yyyy_mm_dd() {
        let date = |text: &str| {
            standard(
                Kind::Actors,
                json!({"id":"a1","name":"A","birth_date": text}),
            )
            .map(|s| s["birth_date"].clone())
        };
        assert_eq!(date("1970-02-03").unwrap(), json!("1970-02-03"));
        assert_eq!(date(" 1970-2-3 ").unwrap(), json!("1970-02-03"));
        assert_eq!(date("2024-02-29").unwrap(), json!("2024-02-29"));
        for bad in [
            "2023-02-29",
            "1970-13-01",
            "1970-00-10",
            "1970-01-32",
            "19x0-01-01",
            "1970/01/01",
        ] {
            assert_eq!(date(bad).unwrap_err().field, "birth_date", "{bad}");
        }
    }

    #[test]
    fn failures_name_the_field() {
        let field = |k: Kind, v: Value| standard(k, v).unwrap_err().field;
        assert_eq!(
            field(Kind::Movies, json!({"id":"m1","title":"  "})),
            "title"
        );
        assert_eq!(
            field(Kind::Movies, json!({"id":"m1","title":"T","year":"x"})),
            "year"
        );
        assert_eq!(
            field(
                Kind::Actors,
                json!({"id":"a1","name":"A","birth_date":"1970-13-01"})
            ),
            "birth_date"
        );
        assert_eq!(
            field(Kind::Episodes, json!({"id":"e1","title":"T"})),
            "series_id"
        );
        assert_eq!(
            field(
                Kind::Episodes,
                json!({"id":"e1","series_id":"s","title":"T","season":-1})
            ),
            "season"
        );
        assert_eq!(
            field(
                Kind::Videos,
                json!({"id":"v1","title":"V","renditions":[{"id":"r1","codec":"h264","height":1},{"id":"r2","codec":"","height":1}]})
            ),
            "renditions[1].codec"
        );
    }

    #[test]
    fn a_series_lists_its_episodes_with_series_id_set_and_no_version_of_their_own() {
        let (id, data) = raw(
            json!({"id":"s1","title":"S","episodes":[{"id":"e1","title":"P"},{"id":"e2","title":"Q","updated_at":"2020-01-01T00:00:00Z"}]}),
        );
        let list =
            Data::canonical(&serde_json::from_str::<Value>(data.as_str()).unwrap()["episodes"])
                .unwrap();
        let episodes = split_episodes(&id, &list).unwrap();
        assert_eq!(episodes.len(), 2);
        assert_eq!(
            episodes[0].1.as_str(),
            r#"{"id":"e1","series_id":"s1","title":"P"}"#
        );
        assert_eq!(
            episodes[1].1.as_str(),
            r#"{"id":"e2","series_id":"s1","title":"Q"}"#
        );
        assert_eq!(
            standardise(Kind::Series, &id, &data, &[]).unwrap().as_str(),
            r#"{"id":"s1","title":"S"}"#
        );
    }

    #[test]
    fn a_child_list_names_each_child_once() {
        let err = parse_record(
            json!({"id":"s","episodes":[{"id":"e1"},{"id":"e2"},{"id":"e1"}]}),
            Timestamp::now(),
            Kind::Series,
        )
        .unwrap_err();
        assert_eq!(err.field, "episodes[2].id");
        assert!(err.reason.contains("episodes[0]"), "{}", err.reason);
    }
}
