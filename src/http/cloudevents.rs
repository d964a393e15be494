//! CloudEvents 1.0 on `POST /raw/{kind}`: structured, batch and binary mode.
//!
//! Each event carries one raw record as `data` (JSON, or `data_base64`
//! holding JSON). The event's `source` + `id` make ingest idempotent: an
//! event already applied within the dedup window gets `duplicate` and is
//! not applied again. Events are checked whole before anything is applied.

use axum::http::HeaderMap;
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::engine::dedup::DedupKey;
use crate::engine::record::Timestamp;

use super::ApiError;

pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

/// One accepted event: its dedup key and its record.
pub struct Envelope {
    /// A digest of `source` and `id`: fixed-size, however long they are.
    pub key: DedupKey,
    pub record: Value,
    /// The event's `time`, the record's version when it has no `updated_at`.
    pub time: Option<Timestamp>,
}

/// Which mode a request is in, from its headers.
pub enum Mode {
    Plain,
    Structured,
    Batch,
    Binary,
}

pub fn mode(essence: &str, headers: &HeaderMap) -> Mode {
    match essence {
        STRUCTURED => Mode::Structured,
        BATCH => Mode::Batch,
        _ if headers.contains_key("ce-specversion")
            || headers.keys().any(|k| k.as_str().starts_with("ce-")) =>
        {
            Mode::Binary
        }
        _ => Mode::Plain,
    }
}

fn bad(index: Option<usize>, what: impl std::fmt::Display) -> ApiError {
    match index {
        Some(i) => ApiError::BadRequest(format!("event {i}: {what}")),
        None => ApiError::BadRequest(format!("event: {what}")),
    }
}

fn required_string<'a>(
    event: &'a Map<String, Value>,
    name: &str,
    index: Option<usize>,
) -> Result<&'a str, ApiError> {
    match event.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(bad(
            index,
            format_args!("`{name}` must be a non-empty string"),
        )),
        None => Err(bad(index, format_args!("`{name}` is required"))),
    }
}

fn key(source: &str, id: &str) -> DedupKey {
    DedupKey::of(&[source, id])
}

fn time(value: Option<&str>, index: Option<usize>) -> Result<Option<Timestamp>, ApiError> {
    value
        .map(|t| Timestamp::parse(t).map_err(|e| bad(index, format_args!("`time` {e}"))))
        .transpose()
}

/// The `datacontenttype` of an event must be JSON, since a record is JSON.
fn json_content_type(value: &str) -> bool {
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence == "text/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// One structured-mode event (also each element of a batch).
///
/// `allowed` checks the event's `source` before anything else is read.
pub fn structured(
    value: Value,
    index: Option<usize>,
    allowed: &dyn Fn(&str) -> Result<(), ApiError>,
) -> Result<Envelope, ApiError> {
    let Value::Object(mut event) = value else {
        return Err(bad(index, "a CloudEvent must be a JSON object"));
    };
    match event.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(other) => {
            return Err(bad(
                index,
                format_args!("`specversion` must be \"1.0\", got {other}"),
            ));
        }
        None => return Err(bad(index, "`specversion` is required")),
    }
    let id = required_string(&event, "id", index)?.to_string();
    let source = required_string(&event, "source", index)?;
    allowed(source)?;
    let source = source.to_string();
    required_string(&event, "type", index)?;
    if let Some(ct) = event.get("datacontenttype") {
        match ct.as_str() {
            Some(ct) if json_content_type(ct) => {}
            _ => {
                return Err(bad(
                    index,
                    "`datacontenttype` must be a JSON media type such as application/json",
                ));
            }
        }
    }
    let time = time(
        match event.get("time") {
            None => None,
            Some(Value::String(t)) => Some(t.as_str()),
            Some(_) => return Err(bad(index, "`time` must be an RFC 3339 string")),
        },
        index,
    )?;
    let record = match (event.remove("data"), event.remove("data_base64")) {
        (Some(_), Some(_)) => {
            return Err(bad(
                index,
                "`data` and `data_base64` are mutually exclusive",
            ));
        }
        (Some(data), None) => data,
        (None, Some(Value::String(encoded))) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| {
                    bad(
                        index,
                        format_args!("`data_base64` is not valid base64: {e}"),
                    )
                })?;
            serde_json::from_slice(&bytes)
                .map_err(|e| bad(index, format_args!("`data_base64` does not hold JSON: {e}")))?
        }
        (None, Some(_)) => return Err(bad(index, "`data_base64` must be a base64 string")),
        (None, None) => return Err(bad(index, "`data` (the record) is required")),
    };
    Ok(Envelope {
        key: key(&source, &id),
        record,
        time,
    })
}

/// A batch: a JSON array of structured events.
pub fn batch(
    value: Value,
    allowed: &dyn Fn(&str) -> Result<(), ApiError>,
) -> Result<Vec<Envelope>, ApiError> {
    let Value::Array(events) = value else {
        return Err(ApiError::BadRequest(
            "a CloudEvents batch must be a JSON array of events".into(),
        ));
    };
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| structured(e, Some(i), allowed))
        .collect()
}

/// Binary mode: attributes in `ce-*` headers, the record as the body.
pub fn binary(
    headers: &HeaderMap,
    body: Value,
    allowed: &dyn Fn(&str) -> Result<(), ApiError>,
) -> Result<Envelope, ApiError> {
    let header = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| bad(None, format_args!("header `{name}` must be visible ASCII")))
            })
            .transpose()
    };
    let required = |name: &str| -> Result<&str, ApiError> {
        match header(name)? {
            Some(v) if !v.trim().is_empty() => Ok(v),
            _ => Err(bad(
                None,
                format_args!("header `{name}` is required in binary mode"),
            )),
        }
    };
    let version = required("ce-specversion")?;
    if version.trim() != "1.0" {
        return Err(bad(
            None,
            format_args!("`ce-specversion` must be 1.0, got `{version}`"),
        ));
    }
    let id = required("ce-id")?;
    let source = required("ce-source")?;
    allowed(source)?;
    required("ce-type")?;
    let time = time(header("ce-time")?, None)?;
    Ok(Envelope {
        key: key(source, id),
        record: body,
        time,
    })
}
