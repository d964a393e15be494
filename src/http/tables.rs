//! `GET /tables`, `/tables/{table}` (paged) and `/tables/{table}/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::engine::record::{Data, RecordId, Timestamp};
use crate::engine::table::{Record, Table, TableKind, TableStats};

use super::{ApiError, AppState, Query};

#[derive(Serialize)]
pub struct TableSummary {
    name: Arc<str>,
    kind: TableKind,
    count: u64,
    stats: TableStats,
}

#[derive(Serialize)]
pub struct TableList {
    tables: Vec<TableSummary>,
}

pub async fn list(State(state): State<AppState>) -> Json<TableList> {
    let tables = state
        .pipeline()
        .engine
        .tables()
        .iter()
        .map(|t| TableSummary {
            name: t.name().clone(),
            kind: t.kind(),
            count: t.len(),
            stats: t.stats(),
        })
        .collect();
    Json(TableList { tables })
}

fn table<'a>(state: &'a AppState, name: &str) -> Result<&'a Arc<Table>, ApiError> {
    state.pipeline().engine.table(name).ok_or_else(|| {
        ApiError::NotFound(format!("no table named `{name}`; GET /tables lists them"))
    })
}

/// A record as the API shows it: `version` is the `updated_at` timestamp.
#[derive(Serialize)]
pub struct RecordView {
    id: RecordId,
    version: Timestamp,
    data: Data,
}

impl From<Record> for RecordView {
    fn from(r: Record) -> Self {
        Self {
            id: r.id,
            version: r.version.at,
            data: r.data,
        }
    }
}

const MAX_PAGE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<usize>,
    after: Option<String>,
}

#[derive(Serialize)]
pub struct PageView {
    table: Arc<str>,
    count: u64,
    records: Vec<RecordView>,
    next: Option<RecordId>,
}

/// `GET /tables/{table}?limit=100&after=<id>`: records in id order.
pub async fn page(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<Json<PageView>, ApiError> {
    let table = table(&state, &name)?;
    let limit = match query.limit {
        None => 100,
        Some(0) => return Err(ApiError::invalid("limit", "must be at least 1")),
        Some(n) => n.min(MAX_PAGE),
    };
    let (records, next) = table.page(query.after.as_deref(), limit);
    Ok(Json(PageView {
        table: table.name().clone(),
        count: table.len(),
        records: records.into_iter().map(RecordView::from).collect(),
        next,
    }))
}

/// `GET /tables/{table}/{id}`, with the version as `ETag`.
pub async fn record(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let table = table(&state, &name)?;
    let record = table
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no record `{id}` in `{name}`")))?;
    let etag = format!("\"{}\"", record.version.at);
    let mut response = Json(RecordView::from(record)).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}
