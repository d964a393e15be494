//! The values every table write is made of, parsed once at the edge.
//!
//! - [`Timestamp`]: an RFC 3339 instant with nanosecond precision, accepted
//!   with any offset, shown in UTC.
//! - [`Version`]: the order of writes. A timestamp first, then the
//!   tie-break key (the raw record's canonical JSON, greater wins); a
//!   delete's version sits above every write at the same instant.
//! - [`RecordId`]: a record's key.
//! - [`Data`]: a record's content as canonical JSON (RFC 8785), so that equal
//!   content is equal bytes and comparing data is comparing strings.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Why a value was refused at the edge; the caller adds which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("must be an RFC 3339 timestamp such as 2024-05-01T12:00:00Z")]
    Timestamp,
    #[error("must fall in the years 0000 to 9999 once converted to UTC")]
    TimestampRange,
    #[error("must be a string of 1 to {max} characters", max = RecordId::MAX_CHARS)]
    IdLength,
    #[error("must not contain '/'")]
    IdSlash,
    #[error("must not contain control characters")]
    IdControl,
    #[error("could not be written as canonical JSON: {0}")]
    Canonical(String),
}

/// An instant in UTC with nanosecond precision.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// 1970-01-01T00:00:00Z.
    pub const EPOCH: Timestamp = Timestamp(DateTime::<Utc>::UNIX_EPOCH);

    pub fn now() -> Self {
        Self(Utc::now())
    }

    /// Parses RFC 3339 with any offset (`Z`, `+02:00`, ...). The instant
    /// must be writable back as RFC 3339 in UTC (years 0000 to 9999).
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        let at = DateTime::parse_from_rfc3339(text.trim())
            .map_err(|_| ValueError::Timestamp)?
            .with_timezone(&Utc);
        if !(0..=9999).contains(&at.year()) {
            return Err(ValueError::TimestampRange);
        }
        Ok(Self(at))
    }

    pub fn from_datetime(at: DateTime<Utc>) -> Self {
        Self(at)
    }

    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// Seconds since the Unix epoch and nanoseconds within the second:
    /// exact for every instant a timestamp can hold (for the data directory).
    pub fn parts(&self) -> (i64, u32) {
        (self.0.timestamp(), self.0.timestamp_subsec_nanos())
    }

    /// The instant [`Timestamp::parts`] returned.
    pub fn from_parts(secs: i64, nanos: u32) -> Option<Self> {
        DateTime::from_timestamp(secs, nanos).map(Self)
    }

    /// Nanoseconds since the Unix epoch (saturating outside ±292 years).
    pub fn nanos(&self) -> i64 {
        self.0
            .timestamp_nanos_opt()
            .unwrap_or(if self.0.timestamp() < 0 {
                i64::MIN
            } else {
                i64::MAX
            })
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The second half of a [`Version`]: what breaks a tie between equal
/// timestamps. Variant order matters: a tombstone outranks every key, so a
/// delete wins at an equal instant.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Tie {
    /// The raw record's data as canonical JSON, compared byte-wise.
    Key(Data),
    Tombstone,
}

/// The order of writes to one record: timestamp, then tie-break.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Version {
    pub at: Timestamp,
    pub tie: Tie,
}

impl Version {
    /// The version of a write of `data` at `at`, tie-broken by `key`.
    pub fn write(at: Timestamp, key: Data) -> Self {
        Self {
            at,
            tie: Tie::Key(key),
        }
    }

    /// The version of a delete at `at`: above every write at that instant.
    pub fn delete(at: Timestamp) -> Self {
        Self {
            at,
            tie: Tie::Tombstone,
        }
    }
}

/// A record's key: 1 to 128 characters, no `/`, no control characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(Arc<str>);

impl RecordId {
    pub const MAX_CHARS: usize = 128;

    pub fn parse(text: &str) -> Result<Self, ValueError> {
        let chars = text.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(ValueError::IdLength);
        }
        if text.contains('/') {
            return Err(ValueError::IdSlash);
        }
        if text.chars().any(char::is_control) {
            return Err(ValueError::IdControl);
        }
        Ok(Self(text.into()))
    }

    /// An id the pipeline derives from ids already checked (such as
    /// `{video_id}:{rendition_id}`); it may exceed the length an ingested
    /// id is held to.
    pub fn derived(text: String) -> Self {
        Self(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for RecordId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RecordId::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl std::borrow::Borrow<str> for RecordId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A record's content as canonical JSON (RFC 8785), shared, never copied.
///
/// Being canonical, two `Data` are equal exactly when their JSON values are,
/// and the bytes double as the tie-break key the contract orders by.
#[derive(Clone)]
pub struct Data(Arc<RawValue>);

impl Data {
    /// Whether the two are one copy.
    #[cfg(test)]
    pub fn is_shared_with(&self, other: &Data) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Canonicalises any JSON value.
    pub fn canonical(value: &impl Serialize) -> Result<Self, ValueError> {
        let text = serde_json_canonicalizer::to_string(value)
            .map_err(|e| ValueError::Canonical(e.to_string()))?;
        let raw = RawValue::from_string(text).map_err(|e| ValueError::Canonical(e.to_string()))?;
        Ok(Self(Arc::from(raw)))
    }

    /// Canonicalises a JSON value, taking a fast path where serde_json's
    /// own output already is RFC 8785: keys sorted byte-wise (its map is a
    /// `BTreeMap`) equal keys sorted by UTF-16 when they are ASCII, and
    /// integers within ±2^53 print the same as ECMAScript numbers. Anything
    /// else (floats, non-ASCII keys, huge integers) goes the long way.
    pub fn of_value(value: &Value) -> Result<Self, ValueError> {
        if plain(value) {
            let raw = serde_json::value::to_raw_value(value)
                .map_err(|e| ValueError::Canonical(e.to_string()))?;
            return Ok(Self(Arc::from(raw)));
        }
        Self::canonical(value)
    }

    /// Data from a value whose serialisation already is canonical JSON:
    /// struct fields declared in byte-wise order of their ASCII names, and
    /// only strings, integers within ±2^53 and values that write themselves
    /// canonically. Nothing is checked or re-parsed; the caller's tests
    /// check the output is canonical.
    pub fn of_canonical(value: &impl Serialize) -> Result<Self, ValueError> {
        let raw = serde_json::value::to_raw_value(value)
            .map_err(|e| ValueError::Canonical(e.to_string()))?;
        Ok(Self(Arc::from(raw)))
    }

    /// A value inside canonical JSON, which is canonical itself.
    pub fn of_part(part: &RawValue) -> Option<Self> {
        RawValue::from_string(part.get().to_owned())
            .ok()
            .map(|raw| Self(Arc::from(raw)))
    }

    /// [`Data::of_value`] for an object.
    pub fn of_object(map: &Map<String, Value>) -> Result<Self, ValueError> {
        if map.iter().all(|(k, v)| k.is_ascii() && plain(v)) {
            let raw = serde_json::value::to_raw_value(map)
                .map_err(|e| ValueError::Canonical(e.to_string()))?;
            return Ok(Self(Arc::from(raw)));
        }
        Self::canonical(map)
    }

    /// The canonical JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// Bytes held, for memory accounting.
    pub fn len(&self) -> usize {
        self.as_str().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }
}

/// Whether serde_json writes `value` exactly as RFC 8785 would.
fn plain(value: &Value) -> bool {
    const EXACT: u64 = 1 << 53;
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => true,
        Value::Number(n) => {
            n.as_u64().is_some_and(|u| u <= EXACT)
                || n.as_i64().is_some_and(|i| i.unsigned_abs() <= EXACT)
        }
        Value::Array(items) => items.iter().all(plain),
        Value::Object(map) => map.iter().all(|(k, v)| k.is_ascii() && plain(v)),
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_str() == other.as_str()
    }
}

impl Eq for Data {}

impl PartialOrd for Data {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Data {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().as_bytes().cmp(other.as_str().as_bytes())
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As JSON, the value itself; in a binary frame (postcard), its text.
impl Serialize for Data {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.0.serialize(s)
        } else {
            s.serialize_str(self.0.get())
        }
    }
}

/// Read back from the data directory, where it was written canonical: the
/// text is kept exactly as written, never re-canonicalised.
impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = if d.is_human_readable() {
            Box::<RawValue>::deserialize(d)?
        } else {
            RawValue::from_string(String::deserialize(d)?).map_err(serde::de::Error::custom)?
        };
        Ok(Self(Arc::from(raw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_accept_any_offset_and_show_utc() {
        let t = Timestamp::parse("2024-05-01T14:00:00.5+02:00").unwrap();
        assert_eq!(t.to_string(), "2024-05-01T12:00:00.500Z");
        assert_eq!(t, Timestamp::parse("2024-05-01T12:00:00.5Z").unwrap());
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("2024-05-01").is_err());
        assert_eq!(
            Timestamp::parse("9999-12-31T23:59:59-23:59"),
            Err(ValueError::TimestampRange)
        );
        assert_eq!(
            Timestamp::parse("0000-01-01T00:00:00+23:59"),
            Err(ValueError::TimestampRange)
        );
    }

    #[test]
    fn nanosecond_precision_is_kept() {
        let t = Timestamp::parse("2024-05-01T12:00:00.123456789Z").unwrap();
        assert_eq!(t.to_string(), "2024-05-01T12:00:00.123456789Z");
    }

    #[test]
    fn ids_are_checked() {
        assert!(RecordId::parse("m1").is_ok());
        assert_eq!(RecordId::parse(""), Err(ValueError::IdLength));
        assert_eq!(RecordId::parse(&"x".repeat(129)), Err(ValueError::IdLength));
        assert!(RecordId::parse(&"é".repeat(128)).is_ok());
        assert_eq!(RecordId::parse("a/b"), Err(ValueError::IdSlash));
        assert_eq!(RecordId::parse("a\nb"), Err(ValueError::IdControl));
    }

    #[test]
    fn data_is_canonical() {
        let a = Data::canonical(&json!({"b": 1.0, "a": [true, null], "c": "x"})).unwrap();
        let b = Data::canonical(&json!({"c": "x", "a": [true, null], "b": 1})).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), r#"{"a":[true,null],"b":1,"c":"x"}"#);
    }

    #[test]
    fn a_tombstone_outranks_every_write_at_the_same_instant() {
        let at = Timestamp::parse("2024-01-01T00:00:00Z").unwrap();
        let later = Timestamp::parse("2024-01-01T00:00:00.000000001Z").unwrap();
        let key = Data::canonical(&json!({"z": "zzz"})).unwrap();
        assert!(Version::delete(at) > Version::write(at, key.clone()));
        assert!(Version::write(later, key) > Version::delete(at));
    }
}
