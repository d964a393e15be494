//! Media records: the five kinds, what ingest checks, and how `raw_handler`
//! turns a raw record into a standard one.
//!
//! Ingest checks only the envelope (an object with a valid `id`, a valid
//! `updated_at` if present, and well-formed child lists), so a vendor's
//! record is stored as sent. Standardisation checks the fields per kind; a
//! record that fails it is a permanent failure naming the field.

use std::fmt;

use serde_json::{Map, Value, json};

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
        match self {
            Kind::Series => Some("episodes"),
            Kind::Videos => Some("renditions"),
            _ => None,
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
        Some(Value::String(s)) => RecordId::parse(s).map_err(|e| InvalidField::new(field, e)),
        Some(_) => Err(InvalidField::new(field, ValueError::IdLength)),
    }
}

fn timestamp(value: &Value, field: &str) -> Result<Timestamp, InvalidField> {
    value
        .as_str()
        .ok_or(ValueError::Timestamp)
        .and_then(Timestamp::parse)
        .map_err(|e| InvalidField::new(field, e))
}

/// A child list, if present, is an array of objects each with a valid `id`
/// (and a valid `updated_at`, if any).
fn child_list(map: &Map<String, Value>, field: &str) -> Result<(), InvalidField> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{field}[{i}]");
                let Value::Object(child) = item else {
                    return Err(InvalidField::new(path, "must be an object"));
                };
                record_id(child, "id")
                    .map_err(|e| InvalidField::new(format!("{path}.id"), e.reason))?;
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

/// Reads fields of a raw record for standardisation.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Path of this object inside the record, for error messages.
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            prefix: String::new(),
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn present(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, InvalidField> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Some(Value::String(_)) => Err(InvalidField::new(self.path(name), "must not be empty")),
            Some(_) => Err(InvalidField::new(self.path(name), "must be a string")),
        }
    }

    fn required_string(&self, name: &str) -> Result<String, InvalidField> {
        self.string(name)?
            .ok_or_else(|| InvalidField::new(self.path(name), "is required"))
    }

    fn unsigned(&self, name: &str) -> Result<Option<u64>, InvalidField> {
        self.present(name)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    InvalidField::new(self.path(name), "must be a non-negative integer")
                })
            })
            .transpose()
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, InvalidField> {
        self.present(name)
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| InvalidField::new(self.path(name), "must be an integer"))
            })
            .transpose()
    }

    fn number(&self, name: &str) -> Result<Option<f64>, InvalidField> {
        self.present(name)
            .map(|v| match v.as_f64() {
                Some(n) if n >= 0.0 => Ok(n),
                _ => Err(InvalidField::new(
                    self.path(name),
                    "must be a non-negative number",
                )),
            })
            .transpose()
    }

    fn date(&self, name: &str) -> Result<Option<String>, InvalidField> {
        let Some(text) = self.string(name)? else {
            return Ok(None);
        };
        chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d")
            .map(|d| Some(d.format("%Y-%m-%d").to_string()))
            .map_err(|_| InvalidField::new(self.path(name), "must be a date as YYYY-MM-DD"))
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, InvalidField> {
        match self.present(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item.as_str().map(str::trim) {
                    Some(s) if !s.is_empty() => Ok(s.to_string()),
                    _ => Err(InvalidField::new(
                        format!("{}[{i}]", self.path(name)),
                        "must be a non-empty string",
                    )),
                })
                .collect(),
            Some(_) => Err(InvalidField::new(
                self.path(name),
                "must be an array of strings",
            )),
        }
    }

    /// The objects of a child list, each with its own `Fields`.
    fn children(&self, name: &str) -> Option<Vec<Fields<'a>>> {
        let items = self.present(name)?.as_array()?;
        Some(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    Some(Fields {
                        map: item.as_object()?,
                        prefix: format!("{}[{i}].", self.path(name)),
                    })
                })
                .collect(),
        )
    }
}

/// An episode a series lists, as a raw episode write.
#[derive(Debug, Clone)]
pub struct ListedEpisode {
    pub write: Write,
}

/// A rendition a video lists, for its encode job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Rendition {
    pub id: RecordId,
    pub codec: String,
    pub height: u64,
    pub bitrate_kbps: Option<u64>,
}

/// A standard record, and the children its raw record listed (`None` when
/// the list field was absent, which changes nothing).
#[derive(Debug, Clone)]
pub struct Standard {
    pub data: Data,
    pub episodes: Option<Vec<ListedEpisode>>,
    pub renditions: Option<Vec<Rendition>>,
}

/// Turns raw data of `kind` into its standard record. `id` and `at` are
/// the raw record's id and version time (the default for listed episodes
/// without an `updated_at` of their own).
pub fn standardise(
    kind: Kind,
    id: &RecordId,
    at: Timestamp,
    raw: &Data,
) -> Result<Standard, InvalidField> {
    let map = raw.to_object();
    let f = Fields::new(&map);
    let mut episodes = None;
    let mut renditions = None;
    let value = match kind {
        Kind::Actors => json!({
            "id": id,
            "name": f.required_string("name")?,
            "birth_date": f.date("birth_date")?,
        }),
        Kind::Movies => json!({
            "id": id,
            "title": f.required_string("title")?,
            "year": f.integer("year")?,
            "actor_ids": f.strings("actor_ids")?,
        }),
        Kind::Series => {
            let title = f.required_string("title")?;
            episodes = f
                .children("episodes")
                .map(|list| list.iter().map(|e| listed_episode(e, id, at)).collect())
                .transpose()?;
            json!({ "id": id, "title": title })
        }
        Kind::Episodes => json!({
            "id": id,
            "series_id": f.required_string("series_id")?,
            "season": f.unsigned("season")?,
            "number": f.unsigned("number")?,
            "title": f.required_string("title")?,
        }),
        Kind::Videos => {
            let title = f.required_string("title")?;
            let duration = f.number("duration_s")?;
            let rendition_list = f
                .children("renditions")
                .map(|list| list.iter().map(rendition).collect::<Result<Vec<_>, _>>())
                .transpose()?;
            let ids: Vec<&RecordId> = rendition_list.iter().flatten().map(|r| &r.id).collect();
            let value =
                json!({ "id": id, "title": title, "duration_s": duration, "rendition_ids": ids });
            renditions = rendition_list;
            value
        }
    };
    Ok(Standard {
        data: Data::of_value(&value).map_err(|e| InvalidField::new("", e))?,
        episodes,
        renditions,
    })
}

fn listed_episode(
    f: &Fields<'_>,
    series: &RecordId,
    series_at: Timestamp,
) -> Result<ListedEpisode, InvalidField> {
    let id = record_id(f.map, "id").map_err(|e| InvalidField::new(f.path("id"), e.reason))?;
    let mut map = f.map.clone();
    let at = match map.remove("updated_at") {
        Some(value) => timestamp(&value, &f.path("updated_at"))?,
        None => series_at,
    };
    map.insert("series_id".into(), Value::String(series.to_string()));
    let data = Data::of_object(&map).map_err(|e| InvalidField::new(f.path(""), e))?;
    Ok(ListedEpisode {
        write: Write {
            id,
            version: Version::write(at, data.clone()),
            data,
        },
    })
}

fn rendition(f: &Fields<'_>) -> Result<Rendition, InvalidField> {
    Ok(Rendition {
        id: record_id(f.map, "id").map_err(|e| InvalidField::new(f.path("id"), e.reason))?,
        codec: f.required_string("codec")?,
        height: f
            .unsigned("height")?
            .ok_or_else(|| InvalidField::new(f.path("height"), "is required"))?,
        bitrate_kbps: f.unsigned("bitrate_kbps")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(value: Value) -> (RecordId, Timestamp, Data) {
        let write = parse_record(value, Timestamp::now(), Kind::Videos).unwrap();
        (write.id, write.version.at, write.data)
    }

    fn standard(kind: Kind, value: Value) -> Result<Value, InvalidField> {
        let (id, at, data) = raw(value);
        standardise(kind, &id, at, &data).map(|s| serde_json::from_str(s.data.as_str()).unwrap())
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
    fn a_series_lists_its_episodes_with_series_id_set() {
        let (id, at, data) = raw(
            json!({"id":"s1","title":"S","episodes":[{"id":"e1","title":"P"},{"id":"e2","title":"Q","updated_at":"2020-01-01T00:00:00Z"}]}),
        );
        let s = standardise(Kind::Series, &id, at, &data).unwrap();
        let episodes = s.episodes.unwrap();
        assert_eq!(episodes.len(), 2);
        assert_eq!(
            episodes[0].write.data.as_str(),
            r#"{"id":"e1","series_id":"s1","title":"P"}"#
        );
        assert_eq!(episodes[0].write.version.at, at);
        assert_eq!(
            episodes[1].write.version.at.to_string(),
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(s.data.as_str(), r#"{"id":"s1","title":"S"}"#);
    }
}
