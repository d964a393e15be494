//! `GET /events` and `GET /events/stream`: the change log as CloudEvents.
//!
//! Both read the retained log from a cursor. A live stream keeps its own
//! cursor and takes new changes from the one [`Fanout`](super::stream::Fanout)
//! that serialises them for every stream, so a slow client never holds
//! anything back: if it falls so far behind that its next event is no
//! longer retained, it gets an explicit `lagged` event and the stream
//! closes, rather than a silent gap.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::log::{Change, ChangeKind, ChangeLog};

use super::problem::Problem;
use super::problem::shared::BadQuery;
use super::{ApiError, AppState, Query};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Read after this sequence; 0 (the default) starts at the oldest
    /// retained event. A cursor whose next event is no longer retained
    /// gets 410.
    after: Option<u64>,
    /// Events per page: default 100, at most 1000 (more is capped).
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// Only this table's changes.
    table: Option<String>,
    /// Only changes of this record id (the CloudEvent `subject`).
    subject: Option<String>,
    /// Only changes of this type: `eventsys.record.inserted`, `.updated`
    /// or `.deleted` (or just `inserted`, `updated`, `deleted`).
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Which changes a reader wants.
#[derive(Clone)]
struct Filter {
    table: Option<Arc<str>>,
    subject: Option<String>,
    kind: Option<ChangeKind>,
}

impl Filter {
    fn parse(
        state: &AppState,
        table: Option<String>,
        subject: Option<String>,
        kind: Option<String>,
    ) -> Result<Self, ApiError> {
        let table = match table {
            None => None,
            Some(name) => Some(
                state
                    .pipeline()
                    .engine
                    .table(&name)
                    .map(|t| t.name().clone())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "table",
                            format_args!("names no table: `{name}`; GET /tables lists them"),
                        )
                    })?,
            ),
        };
        let kind = match kind {
            None => None,
            Some(text) => Some(ChangeKind::parse_event_type(&text).ok_or_else(|| {
                ApiError::invalid(
                    "type",
                    format_args!("must be eventsys.record.inserted, .updated or .deleted (or inserted, updated, deleted), got `{text}`"),
                )
            })?),
        };
        Ok(Self {
            table,
            subject,
            kind,
        })
    }

    fn keeps(&self, change: &Change) -> bool {
        self.table.as_ref().is_none_or(|t| *t == change.table)
            && self.kind.is_none_or(|k| k == change.kind)
            && self
                .subject
                .as_deref()
                .is_none_or(|s| s == change.key.as_str())
    }
}

#[derive(Serialize, ToSchema)]
pub struct EventsPage {
    /// In sequence order.
    events: Vec<Arc<Change>>,
    /// The `after` of the next page.
    next: u64,
}

/// A page of the retained change log, as CloudEvents.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "list_events",
    tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of changes", body = EventsPage),
        BadQuery,
        (status = 410, description = "The cursor's next event is no longer retained; the \
            problem has `oldest`", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    let limit = match query.limit {
        None => DEFAULT_LIMIT,
        Some(0) => return Err(ApiError::invalid("limit", "must be at least 1")),
        Some(n) => n.min(MAX_LIMIT),
    };
    let filter = Filter::parse(&state, query.table, query.subject, query.kind)?;
    let log = &state.pipeline().engine.log;
    let after = not_ahead(log, "after", query.after.unwrap_or(0))?;
    let page = log.read(after, limit, |c| filter.keeps(c))?;
    Ok(Json(EventsPage {
        events: page.events,
        next: page.next,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Start after this sequence (overrides `Last-Event-ID`); default: only
    /// new changes.
    after: Option<u64>,
    /// Only this table's changes.
    table: Option<String>,
    /// Only changes of this record id (the CloudEvent `subject`).
    subject: Option<String>,
    /// Only changes of this type, as for `GET /events`.
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The change log as Server-Sent Events, live.
///
/// The backlog after the cursor, then live changes. The cursor is
/// `?after=`, else `Last-Event-ID`, else the latest event (only new
/// changes). Each event's `id:` is its sequence and its `data:` a
/// `ChangeEvent`; comments keep the connection alive. A client too slow to
/// keep up gets a `lagged` event and the stream closes; it also closes
/// when the server shuts down.
#[utoipa::path(
    get,
    path = "/events/stream",
    operation_id = "stream_events",
    tag = "events",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, description = "Resume after this sequence"),
    ),
    responses(
        (status = 200, description = "A stream of `ChangeEvent`s", body = String,
            content_type = "text/event-stream"),
        (status = 400, description = "A bad query parameter or `Last-Event-ID`", body = Problem,
            content_type = "application/problem+json"),
        (status = 410, description = "The cursor's next event is no longer retained; the \
            problem has `oldest`", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(&state, query.table, query.subject, query.kind)?;
    let log = state.pipeline().engine.log.clone();
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid("Last-Event-ID", "must be an event sequence number")
                })
        })
        .transpose()?;
    let cursor = match query.after.or(last_event_id) {
        // From the oldest retained event, fixed now: from here on the
        // stream must not skip anything.
        Some(0) => log.oldest().saturating_sub(1),
        Some(after) => not_ahead(&log, "after or Last-Event-ID", after)?,
        None => log.latest(),
    };
    // Refuse a cursor that is already gone with a 410, like `/events`.
    log.read_strict(cursor, 1, |_| false)?;
    let events = state
        .fanout()
        .stream(log, cursor, move |c| filter.keeps(c))
        .take_until(state.stopping().cancelled_owned());
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response())
}

/// A cursor beyond the latest change would wait for events that are never
/// sent (such as a `Last-Event-ID` from before a restart): refuse it.
fn not_ahead(log: &ChangeLog, field: &str, after: u64) -> Result<u64, ApiError> {
    let latest = log.latest();
    if after > latest {
        return Err(ApiError::invalid(
            field,
            format_args!("is {after}, beyond the latest sequence {latest}"),
        ));
    }
    Ok(after)
}
