//! `/healthz`, `/settle` and `/topology`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::topology::Topology;

use super::{ApiError, AppState, Query};

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleQuery {
    timeout_ms: Option<u64>,
}

/// The longest a client may ask `/settle` to wait.
const MAX_SETTLE_MS: u64 = 600_000;

/// `GET /settle?timeout_ms=5000`: waits until every queue is empty, nothing
/// is in flight and no retry is pending.
pub async fn settle(
    State(state): State<AppState>,
    Query(query): Query<SettleQuery>,
) -> Result<Json<Value>, ApiError> {
    let timeout_ms = query.timeout_ms.unwrap_or(5_000);
    if timeout_ms > MAX_SETTLE_MS {
        return Err(ApiError::invalid(
            "timeout_ms",
            format_args!("must be at most {MAX_SETTLE_MS}"),
        ));
    }
    let engine = &state.pipeline().engine;
    if engine.settle(Duration::from_millis(timeout_ms)).await {
        Ok(Json(json!({ "settled": true })))
    } else {
        Err(ApiError::NotSettled {
            timeout_ms,
            outstanding: engine.activity.outstanding(),
        })
    }
}

pub async fn topology(State(state): State<AppState>) -> Json<Topology> {
    Json(state.pipeline().engine.topology.clone())
}
