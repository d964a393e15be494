//! `/healthz`, `/settle` and `/topology`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::topology::Topology;
use crate::media::data_dir::DiskReport;

use super::problem::Problem;
use super::problem::shared::BadQuery;
use super::{ApiError, AppState, NoQuery, Query};

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the server answers.
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the server is serving: 503 once its data directory cannot be
/// written, or while its connection to NATS JetStream is lost (nothing
/// more is acknowledged).
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "system",
    responses(
        (status = 200, description = "Serving", body = Health),
        (status = 503, description = "Storage is unavailable", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
pub async fn healthz(_: NoQuery, State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.writable()?;
    Ok(Json(Health { status: "ok" }))
}

#[derive(Serialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum StorageReport {
    /// Everything is in memory (no `--data-dir`).
    Memory {
        /// The last change sequence.
        durable_seq: u64,
    },
    /// On a data directory.
    Disk {
        /// The last change sequence whose frames are on disk.
        durable_seq: u64,
        #[serde(flatten)]
        disk: DiskReport,
    },
    /// On NATS JetStream (`--nats-url`).
    Nats {
        /// The last state-stream sequence this instance has read.
        durable_seq: u64,
        /// The prefix of its streams and consumers.
        prefix: String,
        /// The NATS server's version.
        server_version: String,
        /// Whether this instance is connected now.
        connected: bool,
    },
}

/// Where the pipeline is kept: mode, bytes on disk, segments, the last
/// snapshot and the durable sequence.
#[utoipa::path(
    get,
    path = "/storage",
    operation_id = "storage",
    tag = "system",
    responses((status = 200, description = "Where the pipeline is kept", body = StorageReport)),
)]
pub async fn storage(_: NoQuery, State(state): State<AppState>) -> Json<StorageReport> {
    let durable_seq = state.pipeline().engine.log.durable_seq();
    if let Some(shared) = state.pipeline().shared() {
        return Json(StorageReport::Nats {
            durable_seq: shared.store.applied(),
            prefix: shared.prefix.clone(),
            server_version: shared.connection.version.to_string(),
            connected: shared.connected(),
        });
    }
    Json(match state.data_dir() {
        None => StorageReport::Memory { durable_seq },
        Some(data_dir) => StorageReport::Disk {
            durable_seq,
            disk: data_dir.report(),
        },
    })
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
    let pipeline = state.pipeline();
    // A long poll ends when shutdown starts, so that a pending settle does
    // not hold the server past its shutdown timeout.
    let stopping = state.stopping();
    let settled = tokio::select! {
        biased;
        settled = pipeline.settle(Duration::from_millis(timeout_ms)) => settled,
        _ = stopping.cancelled() => return Err(ApiError::ShuttingDown {
            outstanding: pipeline.engine.activity.outstanding(),
        }),
    };
    match settled {
        Ok(true) => {
            // On a data directory, what the handlers wrote is readable
            // (and survives a crash) once it is durable.
            state.durable().await?;
            Ok(Json(Settled { settled: true }))
        }
        Ok(false) => Err(ApiError::NotSettled {
            timeout_ms,
            outstanding: pipeline.outstanding().await,
        }),
        Err(error) => Err(super::queues::unavailable(error)),
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

#[derive(Serialize, ToSchema)]
pub struct Identity {
    /// The caller's name in the tokens file (`anonymous` without one).
    #[schema(example = "ola")]
    name: String,
    /// `reader`, `producer` or `operator`.
    #[schema(example = "operator")]
    role: &'static str,
    /// Whether the server asks for tokens (`--auth-tokens-file`).
    tokens: bool,
}

/// Who the request's token names and what its role allows, so a client
/// (the dashboard) can offer only what the caller may do.
#[utoipa::path(
    get,
    path = "/whoami",
    operation_id = "whoami",
    tag = "system",
    responses(
        (status = 200, description = "The caller", body = Identity),
        (status = 401, description = "No token, or one the server does not know", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
pub async fn whoami(
    _: NoQuery,
    State(state): State<AppState>,
    caller: super::auth::Caller,
) -> Json<Identity> {
    Json(Identity {
        name: caller.name.to_string(),
        role: caller.role.as_str(),
        tokens: state.access().enabled(),
    })
}
