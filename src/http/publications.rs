//! `POST /publications/{video_id}/retry`: an operator's retry of scenario
//! 6's saga.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::log::Cause;
use crate::engine::record::RecordId;
use crate::media::projection::ViewError;
use crate::media::saga::RetryError;

use super::problem::Problem;
use super::{ApiError, AppState, NoQuery, RequestId};

#[derive(Serialize, ToSchema)]
pub struct Retried {
    /// The video's id.
    id: String,
    /// The attempt now running.
    attempt: u64,
    /// `pending`, or `published` for a video without renditions.
    status: String,
    /// Encode jobs the attempt put on `encode_queue`: every current
    /// rendition again.
    jobs: usize,
}

/// Starts a new attempt at publishing a compensated video: every current
/// rendition is encoded again, at a change-log position after the
/// compensation's deletes.
#[utoipa::path(
    post,
    path = "/publications/{video_id}/retry",
    operation_id = "retry_publication",
    tag = "tables",
    params(("video_id" = String, Path, description = "A live video's id", example = "v1")),
    responses(
        (status = 200, description = "A new attempt started", body = Retried),
        (status = 400, description = "Not a valid id", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No live video with this id", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "The publication is not compensated: nothing to retry",
            body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn retry(
    _: NoQuery,
    State(state): State<AppState>,
    Path(video): Path<String>,
    RequestId(request): RequestId,
) -> Result<Json<Retried>, ApiError> {
    let video = RecordId::parse(&video).map_err(|e| ApiError::Invalid {
        field: "video_id".into(),
        reason: e.to_string(),
    })?;
    state.writable()?;
    let (publication, jobs) = state
        .pipeline()
        .retry_publication(&video, &Cause::request(request))
        .await
        .map_err(|error| match error {
            RetryError::NoVideo(_) => ApiError::NotFound(error.to_string()),
            RetryError::NothingToRetry { .. } => ApiError::Conflict(error.to_string()),
            RetryError::Step(ViewError::Full(full)) => ApiError::Full(full),
            RetryError::Step(ViewError::Source(reason)) => ApiError::Internal(reason),
            RetryError::Step(ViewError::Unavailable(reason)) => ApiError::StoreUnavailable(reason),
        })?;
    state.durable().await?;
    tracing::info!(video = %video, attempt = publication.attempt, jobs, "publication retried");
    Ok(Json(Retried {
        id: publication.id.to_string(),
        attempt: publication.attempt,
        status: publication.status.as_str().to_string(),
        jobs,
    }))
}
