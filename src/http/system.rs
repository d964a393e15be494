//! `/healthz`, `/settle` and `/topology`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::topology::Topology;

use super::problem::Problem;
use super::problem::shared::BadQuery;
use super::{ApiError, AppState, NoQuery, Query};

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the server answers.
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the server is serving.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "system",
    responses((status = 200, description = "Serving", body = Health)),
)]
pub async fn healthz(_: NoQuery) -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SettleQuery {
    /// How long to wait, in milliseconds (default 5000, at most 600000).
    #[param(maximum = 600_000)]
    timeout_ms: Option<u64>,
}

/// The longest a client may ask `/settle` to wait.
const MAX_SETTLE_MS: u64 = 600_000;

#[derive(Serialize, ToSchema)]
pub struct Settled {
    /// Always `true`; at the timeout the answer is a 503 problem with
    /// `"settled": false`.
    settled: bool,
}

/// Waits until the pipeline is idle.
///
/// Idle means every queue is empty, nothing is in flight and no retry is
/// pending; dead letters do not count.
#[utoipa::path(
    get,
    path = "/settle",
    operation_id = "settle",
    tag = "system",
    params(SettleQuery),
    responses(
        (status = 200, description = "The pipeline is idle", body = Settled),
        BadQuery,
        (status = 503, description = "Not idle at the timeout; the problem has \
            `\"settled\": false` and `outstanding`", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
pub async fn settle(
    State(state): State<AppState>,
    Query(query): Query<SettleQuery>,
) -> Result<Json<Settled>, ApiError> {
    let timeout_ms = query.timeout_ms.unwrap_or(5_000);
    if timeout_ms > MAX_SETTLE_MS {
        return Err(ApiError::invalid(
            "timeout_ms",
            format_args!("must be at most {MAX_SETTLE_MS}"),
        ));
    }
    let engine = &state.pipeline().engine;
    // A long poll ends when shutdown starts, so that a pending settle does
    // not hold the server past its shutdown timeout.
    let stopping = state.stopping();
    tokio::select! {
        biased;
        settled = engine.settle(Duration::from_millis(timeout_ms)) => if settled {
            Ok(Json(Settled { settled: true }))
        } else {
            Err(ApiError::NotSettled {
                timeout_ms,
                outstanding: engine.activity.outstanding(),
            })
        },
        _ = stopping.cancelled() => Err(ApiError::ShuttingDown {
            outstanding: engine.activity.outstanding(),
        }),
    }
}

/// The pipeline's tables, queues and handlers as a graph, with the four
/// scenarios each node and edge takes part in.
#[utoipa::path(
    get,
    path = "/topology",
    operation_id = "topology",
    tag = "system",
    responses((status = 200, description = "Nodes and edges", body = Topology)),
)]
pub async fn topology(_: NoQuery, State(state): State<AppState>) -> Json<Topology> {
    Json(state.pipeline().engine.topology.clone())
}
