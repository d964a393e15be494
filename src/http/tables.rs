//! `GET /tables`, `/tables/{table}` (paged) and `/tables/{table}/{id}`;
//! `POST /tables/{view}/rebuild`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::log::Cause;
use crate::engine::record::{Data, RecordId, Timestamp};
use crate::engine::table::{Record, Table, TableKind, TableStats};

use super::problem::Problem;
use super::problem::shared::BadQuery;
use super::{ApiError, AppState, NoQuery, Query, RequestId};
use crate::media::projection::ViewError;

#[derive(Serialize, ToSchema)]
pub struct TableSummary {
    name: Arc<str>,
    kind: TableKind,
    /// Live records.
    count: u64,
    /// Write outcomes since start.
    stats: TableStats,
}

#[derive(Serialize, ToSchema)]
pub struct TableList {
    tables: Vec<TableSummary>,
}

/// Every table with its count and write outcomes.
#[utoipa::path(
    get,
    path = "/tables",
    operation_id = "list_tables",
    tag = "tables",
    responses((status = 200, description = "Raw and standard tables", body = TableList)),
)]
pub async fn list(_: NoQuery, State(state): State<AppState>) -> Json<TableList> {
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
#[derive(Serialize, ToSchema)]
#[schema(as = Record)]
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

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Records per page: default 100, at most 1000 (more is capped).
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// Start after this id (the previous page's `next`).
    after: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = TablePage)]
pub struct PageView {
    table: Arc<str>,
    /// Live records in the whole table.
    count: u64,
    /// In id order.
    records: Vec<RecordView>,
    /// The `after` of the next page; null on the last page.
    next: Option<RecordId>,
}

/// A page of a table's live records, in id order.
#[utoipa::path(
    get,
    path = "/tables/{table}",
    operation_id = "read_table",
    tag = "tables",
    params(
        ("table" = String, Path, description = "A table's name, as `GET /tables` lists",
            example = "movies"),
        PageQuery,
    ),
    responses(
        (status = 200, description = "One page of records", body = PageView),
        BadQuery,
        (status = 404, description = "No such table", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
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

/// One live record, with its version as `ETag`.
#[utoipa::path(
    get,
    path = "/tables/{table}/{id}",
    operation_id = "read_record",
    tag = "tables",
    params(
        ("table" = String, Path, description = "A table's name, as `GET /tables` lists",
            example = "movies"),
        ("id" = String, Path, description = "The record's id", example = "m1"),
    ),
    responses(
        (status = 200, description = "The record", body = RecordView,
            headers(("ETag" = String, description = "The version, quoted"))),
        (status = 404, description = "No such table, or no live record with this id",
            body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn record(
    _: NoQuery,
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

#[derive(Serialize, ToSchema)]
pub struct Rebuilt {
    /// Records the view holds once rebuilt.
    rebuilt: u64,
}

/// Recomputes a view (a table of kind `view`) from the standard tables,
/// writing the records that differ; its handler's work waits meanwhile.
#[utoipa::path(
    post,
    path = "/tables/{table}/rebuild",
    operation_id = "rebuild_view",
    tag = "tables",
    params(("table" = String, Path, description = "A view, as `GET /tables` lists them \
        (kind `view`)", example = "filmography")),
    responses(
        (status = 200, description = "The view, recomputed", body = Rebuilt),
        (status = 404, description = "No such table", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "The table is not a view", body = Problem,
            content_type = "application/problem+json"),
        (status = 507, description = "The view is at its limit of ids (--max-records)",
            body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn rebuild(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
    RequestId(request): RequestId,
) -> Result<Json<Rebuilt>, ApiError> {
    let table = table(&state, &name)?;
    if table.kind() != TableKind::View {
        return Err(ApiError::Conflict(format!(
            "`{name}` is a {} table; only views (kind `view` in GET /tables) are rebuilt",
            table.kind().as_str()
        )));
    }
    state.writable()?;
    let pipeline = state.pipeline().clone();
    let cause = Cause::request(request);
    let rebuilt = (pipeline.rebuild(name.clone(), cause).await)
        .ok_or_else(|| ApiError::NotFound(format!("no view named `{name}`")))?
        .map_err(|error| match error {
            ViewError::Full(full) => ApiError::Full(full),
            ViewError::Source(reason) => ApiError::Internal(reason),
            ViewError::Unavailable(reason) => ApiError::StoreUnavailable(reason),
        })?;
    state.durable().await?;
    tracing::info!(view = %name, rebuilt, "rebuilt a view");
    Ok(Json(Rebuilt { rebuilt }))
}
