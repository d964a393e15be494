//! `GET /events` and `GET /events/stream`: the change log as CloudEvents.
//!
//! Both read the retained log from a cursor. A live stream is a reader that
//! keeps its own cursor and waits for appends, so a slow client never holds
//! anything back: if it falls so far behind that its next event is no
//! longer retained, it gets an explicit `lagged` event and the stream
//! closes, rather than a silent gap.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::log::{Change, ChangeKind, ChangeLog, Gone};

use super::{ApiError, AppState, Query};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
    table: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Which changes a reader wants.
#[derive(Clone)]
struct Filter {
    table: Option<Arc<str>>,
    kind: Option<ChangeKind>,
}

impl Filter {
    fn parse(
        state: &AppState,
        table: Option<String>,
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
        Ok(Self { table, kind })
    }

    fn keeps(&self, change: &Change) -> bool {
        self.table.as_ref().is_none_or(|t| *t == change.table)
            && self.kind.is_none_or(|k| k == change.kind)
    }
}

#[derive(Serialize)]
pub struct EventsPage {
    events: Vec<Arc<Change>>,
    next: u64,
}

/// `GET /events?after=<seq>&limit=<n>&table=&type=`.
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    let limit = match query.limit {
        None => DEFAULT_LIMIT,
        Some(0) => return Err(ApiError::invalid("limit", "must be at least 1")),
        Some(n) => n.min(MAX_LIMIT),
    };
    let filter = Filter::parse(&state, query.table, query.kind)?;
    let page = state
        .pipeline()
        .engine
        .log
        .read(query.after.unwrap_or(0), limit, |c| filter.keeps(c))?;
    Ok(Json(EventsPage {
        events: page.events,
        next: page.next,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    after: Option<u64>,
    table: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// How many events a stream reads from the log at a time.
const STREAM_BATCH: usize = 256;

/// `GET /events/stream`: the backlog after the cursor, then live changes.
/// The cursor is `?after=`, else `Last-Event-ID`, else the latest event
/// (only new changes).
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let filter = Filter::parse(&state, query.table, query.kind)?;
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
    let cursor = query
        .after
        .or(last_event_id)
        .unwrap_or_else(|| log.latest());
    // Refuse a cursor that is already gone with a 410, like `/events`.
    log.read(cursor, 1, |_| false)?;
    let events = changes(log, cursor, filter).take_until(state.stopping().cancelled_owned());
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    ))
}

enum Reader {
    Reading {
        log: Arc<ChangeLog>,
        cursor: u64,
        filter: Filter,
        appended: tokio::sync::watch::Receiver<u64>,
    },
    Done,
}

/// The log from `cursor` on, as SSE events, waiting for appends when caught up.
fn changes(
    log: Arc<ChangeLog>,
    cursor: u64,
    filter: Filter,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let appended = log.watch();
    let reader = Reader::Reading {
        log,
        cursor,
        filter,
        appended,
    };
    stream::unfold(reader, |reader| async move {
        let Reader::Reading {
            log,
            mut cursor,
            filter,
            mut appended,
        } = reader
        else {
            return None;
        };
        loop {
            appended.borrow_and_update();
            match log.read_strict(cursor, STREAM_BATCH, |c| filter.keeps(c)) {
                Err(gone) => return Some((vec![lagged(gone)], Reader::Done)),
                Ok(page) => {
                    let caught_up = page.next == cursor;
                    cursor = page.next;
                    if !page.events.is_empty() {
                        let events = page.events.iter().map(|c| change_event(c)).collect();
                        return Some((
                            events,
                            Reader::Reading {
                                log,
                                cursor,
                                filter,
                                appended,
                            },
                        ));
                    }
                    if caught_up && appended.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

fn change_event(change: &Change) -> Event {
    let data = serde_json::to_string(change).unwrap_or_default();
    Event::default().id(change.seq.to_string()).data(data)
}

fn lagged(gone: Gone) -> Event {
    Event::default().event("lagged").data(
        json!({
            "detail": "this stream fell behind the retained log and is closed; resume from `oldest` or later",
            "after": gone.after,
            "oldest": gone.oldest,
        })
        .to_string(),
    )
}
