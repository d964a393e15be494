//! `POST`, `PUT` and `DELETE /raw/{kind}`: the only way data gets in.
//!
//! A request is checked whole before anything is written: the content
//! type, the JSON, every record's envelope, the precondition, and the
//! pipeline's backlog. Any failure answers a 4xx/503 and stores nothing.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::engine::log::Cause;
use crate::engine::record::{RecordId, Timestamp};
use crate::engine::table::{Expect, Outcome, Reconciliation};
use crate::media::records::{InvalidField, InvalidRecord, Kind, parse_record, parse_records};

use super::cloudevents::{self, Mode};
use super::openapi::{CloudEvent, CloudEventBatch, IngestOutcome, KindName, RawRecord, RawRecords};
use super::problem::Problem;
use super::problem::shared::{NotJson, Overloaded, TableFull, TooLarge, UnknownKind};

use super::auth::Caller;
use super::{ApiError, AppState, NoQuery, Query, RequestId};

/// A producer whose token names source prefixes sends only CloudEvents
/// from them: anything else from it is refused whole (`source` is the
/// offending one, `None` for a request that is not a CloudEvent).
fn check_source(caller: &Caller, source: Option<&str>) -> Result<(), ApiError> {
    if caller.may_send_from(source) {
        return Ok(());
    }
    let allowed = caller.sources.join("`, `");
    Err(ApiError::Forbidden(match source {
        Some(source) => format!(
            "`{}` may send events only from sources starting with `{allowed}`, not from `{source}`",
            caller.name
        ),
        None => format!(
            "`{}` may send only CloudEvents from sources starting with `{allowed}`; this request \
             is not one, so it has no source",
            caller.name
        ),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct IngestResult {
    id: RecordId,
    /// A write outcome, or `duplicate` for a CloudEvent already applied.
    #[schema(value_type = IngestOutcome)]
    outcome: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct IngestResponse {
    /// One per record, in input order.
    results: Vec<IngestResult>,
}

pub(super) fn kind(name: &str) -> Result<Kind, ApiError> {
    Kind::parse(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "unknown kind `{name}`; expected one of actors, movies, series, episodes, videos"
        ))
    })
}

/// The media type of the body without parameters, lower-cased.
pub(super) fn essence(headers: &HeaderMap) -> Result<String, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.is_empty() {
        return Err(ApiError::UnsupportedMediaType(
            "the body must be JSON: send Content-Type: application/json".into(),
        ));
    }
    Ok(content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase())
}

/// The body must be declared as JSON (`application/json` or `+json`).
pub(super) fn require_json(essence: &str) -> Result<(), ApiError> {
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "the body must be JSON, not `{essence}`: send Content-Type: application/json \
             (or application/cloudevents+json, application/cloudevents-batch+json)"
        )))
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the body is empty; expected JSON".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))
}

/// A JSON object body read as `T`; `shape` (what the body must look like)
/// goes in the error. An array is refused before serde sees it, since
/// serde reads a struct from a sequence of its fields too.
pub(super) fn parse_object<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &str,
) -> Result<T, ApiError> {
    let value = parse_json(body)?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(format!(
            "the body must be an object: {shape}"
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("the body must be {shape}: {e}")))
}

/// `If-Match: "<version>"` or `If-Match: *`.
fn if_match(headers: &HeaderMap) -> Result<Option<Expect>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::invalid("If-Match", "must be a quoted version"))?
        .trim();
    if text == "*" {
        return Ok(Some(Expect::Exists));
    }
    let unquoted = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    Timestamp::parse(unquoted)
        .map(|t| Some(Expect::Version(t)))
        .map_err(|_| {
            ApiError::invalid(
                "If-Match",
                format_args!(
                    "must be a quoted version such as \"2024-05-01T12:00:00Z\", got `{text}`"
                ),
            )
        })
}

/// Writes raw records.
///
/// One record or an array of records, or CloudEvents carrying them in
/// structured, batch or binary mode (binary: the `ce-*` headers with the
/// record as a JSON body). The request is checked whole first; if any part
/// of it is wrong, nothing of it is stored.
#[utoipa::path(
    post,
    path = "/raw/{kind}",
    operation_id = "ingest",
    tag = "ingest",
    params(
        ("kind" = inline(KindName), Path, description = "The media kind", example = "movies"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "`\"<version>\"` or `*`, on a \
            single plain record: write only if the stored version is that (optimistic \
            concurrency), else 412"),
        ("ce-specversion" = Option<String>, Header, nullable = false, description = "Binary mode: `1.0`; \
            with `ce-id`, `ce-source` and `ce-type` (required) and `ce-time` (optional)"),
        ("ce-id" = Option<String>, Header, nullable = false, description = "Binary mode: the event id"),
        ("ce-source" = Option<String>, Header, nullable = false, description = "Binary mode: the event source"),
        ("ce-type" = Option<String>, Header, nullable = false, description = "Binary mode: the event type"),
        ("ce-time" = Option<String>, Header, nullable = false, description = "Binary mode: the record's \
            version when it has no `updated_at`"),
    ),
    request_body(
        description = "Records as JSON, or CloudEvents carrying them",
        content(
            (RawRecords = "application/json"),
            (CloudEvent = "application/cloudevents+json"),
            (CloudEventBatch = "application/cloudevents-batch+json"),
        ),
    ),
    responses(
        (status = 200, description = "The outcome of each record, in input order",
            body = IngestResponse),
        (status = 400, description = "The body, a record (the problem names its `index` and \
            `field`), an event or `If-Match` is invalid", body = Problem,
            content_type = "application/problem+json"),
        UnknownKind,
        (status = 412, description = "`If-Match` did not match; the problem has \
            `current_version`", body = Problem, content_type = "application/problem+json"),
        TooLarge,
        NotJson,
        Overloaded,
        TableFull,
    ),
)]
pub async fn post(
    _: NoQuery,
    State(state): State<AppState>,
    Path(kind_name): Path<String>,
    RequestId(request): RequestId,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<IngestResponse>, ApiError> {
    let kind = kind(&kind_name)?;
    // Refused before the body is parsed: under backpressure a refusal
    // should cost next to nothing.
    state.writable()?;
    state.pipeline().admit()?;
    let essence = essence(&headers)?;
    require_json(&essence)?;
    let now = Timestamp::now();
    let (writes, keys, single) = match cloudevents::mode(&essence, &headers) {
        Mode::Plain => {
            check_source(&caller, None)?;
            let (values, single) = match parse_json(&body)? {
                Value::Array(values) => (values, false),
                value @ Value::Object(_) => (vec![value], true),
                _ => {
                    return Err(ApiError::BadRequest(
                        "the body must be a record object or an array of records".into(),
                    ));
                }
            };
            (parse_records(values, now, kind)?, None, single)
        }
        mode => {
            let allowed = &|source: &str| check_source(&caller, Some(source));
            let envelopes = match mode {
                Mode::Batch => cloudevents::batch(parse_json(&body)?, allowed)?,
                Mode::Binary => vec![cloudevents::binary(&headers, parse_json(&body)?, allowed)?],
                _ => vec![cloudevents::structured(parse_json(&body)?, None, allowed)?],
            };
            let mut writes = Vec::with_capacity(envelopes.len());
            let mut keys = Vec::with_capacity(envelopes.len());
            for (index, envelope) in envelopes.into_iter().enumerate() {
                let write = parse_record(envelope.record, envelope.time.unwrap_or(now), kind)
                    .map_err(|error| InvalidRecord { index, error })?;
                writes.push(write);
                keys.push(envelope.key);
            }
            (writes, Some(keys), false)
        }
    };
    let expect = if_match(&headers)?;
    if expect.is_some() && !single {
        return Err(ApiError::BadRequest(
            "If-Match applies to a single plain JSON record".into(),
        ));
    }
    let pipeline = state.pipeline();
    let cause = Cause::request(request);
    let results = match (expect, keys) {
        (Some(expect), _) => {
            let mut results = Vec::with_capacity(writes.len());
            for write in writes {
                let id = write.id.clone();
                let outcome = pipeline.ingest_if(kind, write, expect, &cause).await??;
                results.push(IngestResult {
                    id,
                    outcome: outcome.as_str(),
                });
            }
            results
        }
        (None, None) => pipeline
            .ingest(kind, writes, &cause)
            .await?
            .into_iter()
            .map(|(id, outcome)| IngestResult {
                id,
                outcome: outcome.as_str(),
            })
            .collect(),
        (None, Some(keys)) => pipeline
            .ingest_events(kind, keys.into_iter().zip(writes).collect(), &cause)
            .await?
            .into_iter()
            .map(|(id, outcome)| IngestResult {
                id,
                outcome: outcome.map_or("duplicate", Outcome::as_str),
            })
            .collect(),
    };
    state.durable().await?;
    Ok(Json(IngestResponse { results }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileBody {
    /// When the set was complete (default: now); records without
    /// `updated_at` get this version.
    #[serde(default)]
    #[schema(value_type = Option<Timestamp>)]
    as_of: Option<Value>,
    /// The complete set of records as of `as_of`.
    #[schema(value_type = Vec<RawRecord>)]
    records: Vec<Value>,
}

/// Reconciles a full set.
///
/// The records are the complete set as of `as_of`: each is written and
/// marked seen, then every live record neither seen nor versioned at or
/// after `as_of` is deleted with version `as_of`.
#[utoipa::path(
    put,
    path = "/raw/{kind}",
    operation_id = "reconcile",
    tag = "ingest",
    params(("kind" = inline(KindName), Path, description = "The media kind", example = "actors")),
    request_body(content = ReconcileBody, content_type = "application/json"),
    responses(
        (status = 200, description = "What the reconciliation did", body = Reconciliation),
        (status = 400, description = "The body, `as_of` or a record is invalid", body = Problem,
            content_type = "application/problem+json"),
        UnknownKind,
        TooLarge,
        NotJson,
        Overloaded,
        TableFull,
    ),
)]
pub async fn put(
    _: NoQuery,
    State(state): State<AppState>,
    Path(kind_name): Path<String>,
    RequestId(request): RequestId,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Reconciliation>, ApiError> {
    let kind = kind(&kind_name)?;
    check_source(&caller, None)?;
    // Refused before the body is parsed: under backpressure a refusal
    // should cost next to nothing.
    state.writable()?;
    state.pipeline().admit()?;
    require_json(&essence(&headers)?)?;
    let body: ReconcileBody = parse_object(&body, r#"{"as_of": "<timestamp>", "records": [...]}"#)?;
    let as_of = match body.as_of {
        None | Some(Value::Null) => Timestamp::now(),
        Some(Value::String(text)) => Timestamp::parse(&text).map_err(|e| invalid("as_of", e))?,
        Some(_) => return Err(invalid("as_of", "must be an RFC 3339 timestamp string")),
    };
    // Records without their own `updated_at` are versioned at `as_of`.
    let writes = parse_records(body.records, as_of, kind).map_err(|e| InvalidRecord {
        index: e.index,
        error: InvalidField {
            field: format!("records[{}].{}", e.index, e.error.field)
                .trim_end_matches('.')
                .to_string(),
            reason: e.error.reason,
        },
    })?;
    let pipeline = state.pipeline();
    let reconciliation = pipeline
        .reconcile(kind, as_of, writes, &Cause::request(request))
        .await?;
    state.durable().await?;
    Ok(Json(reconciliation))
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(field, reason)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// The delete's version (default: now); writes at or below it are then
    /// stale.
    #[param(value_type = Option<Timestamp>)]
    version: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DeleteResponse {
    id: RecordId,
    /// `deleted`, `stale` (a newer version is stored) or `absent` (nothing
    /// was live; the tombstone is kept all the same).
    outcome: Outcome,
}

/// Deletes a raw record.
///
/// The delete flows on to the standard table, and a series' delete to the
/// episodes it listed.
#[utoipa::path(
    delete,
    path = "/raw/{kind}/{id}",
    operation_id = "delete_record",
    tag = "ingest",
    params(
        ("kind" = inline(KindName), Path, description = "The media kind", example = "movies"),
        ("id" = String, Path, description = "The record's id", example = "m1"),
        DeleteQuery,
    ),
    responses(
        (status = 200, description = "What the delete did", body = DeleteResponse),
        (status = 400, description = "Invalid `id` or `version`", body = Problem,
            content_type = "application/problem+json"),
        UnknownKind,
        Overloaded,
        TableFull,
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    Path((kind_name, id)): Path<(String, String)>,
    RequestId(request): RequestId,
    caller: Caller,
    Query(query): Query<DeleteQuery>,
) -> Result<Json<DeleteResponse>, ApiError> {
    let kind = kind(&kind_name)?;
    check_source(&caller, None)?;
    // Refused before the body is parsed: under backpressure a refusal
    // should cost next to nothing.
    state.writable()?;
    state.pipeline().admit()?;
    let id = RecordId::parse(&id).map_err(|e| invalid("id", e))?;
    let at = match query.version {
        None => Timestamp::now(),
        Some(text) => Timestamp::parse(&text).map_err(|e| invalid("version", e))?,
    };
    let pipeline = state.pipeline();
    let outcome = pipeline
        .delete(kind, &id, at, &Cause::request(request))
        .await?;
    state.durable().await?;
    Ok(Json(DeleteResponse { id, outcome }))
}
