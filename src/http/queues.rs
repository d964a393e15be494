//! `/queues` (with dead letters), `/handlers` and `/faults`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::schema::{Object, ObjectBuilder, OneOfBuilder, Ref, Schema, Type};

use crate::engine::handler::{Fault, HandlerStats};
use crate::engine::queue::DeadLetter;
use crate::engine::record::Timestamp;
use crate::engine::store::StoreError;
use crate::engine::{HandlerView, QueueSnapshot, QueueView};
use crate::media::scale_out::SharedLetters;

use super::openapi::QueuedEvent;
use super::problem::Problem;
use super::problem::shared::{NoSuchHandler, NoSuchQueue, NotJson, TooLarge};
use super::{ApiError, AppState, NoQuery};

#[derive(Serialize, ToSchema)]
pub struct QueueList {
    queues: Vec<QueueSnapshot>,
}

/// Every queue with its depth, capacity and counters (on JetStream, this
/// instance's, and in `cluster` the queue's over every instance).
#[utoipa::path(
    get,
    path = "/queues",
    operation_id = "list_queues",
    tag = "queues",
    responses((status = 200, description = "Every queue", body = QueueList)),
)]
pub async fn list(_: NoQuery, State(state): State<AppState>) -> Result<Json<QueueList>, ApiError> {
    let mut queues: Vec<QueueSnapshot> = state
        .pipeline()
        .engine
        .queues()
        .iter()
        .map(|q| q.snapshot())
        .collect();
    if let Some(shared) = state.pipeline().shared() {
        for queue in &mut queues {
            if let Some((letters, counts)) = shared.counts(&queue.name).await {
                queue.dead_letters = letters.map_err(unavailable)?;
                queue.cluster = Some(counts.map_err(unavailable)?);
                queue.taken_again = shared.taken_again(&queue.name);
            }
        }
    }
    Ok(Json(QueueList { queues }))
}

fn queue<'a>(
    state: &'a AppState,
    name: &str,
) -> Result<&'a std::sync::Arc<dyn QueueView>, ApiError> {
    state.pipeline().engine.queue(name).ok_or_else(|| {
        ApiError::NotFound(format!("no queue named `{name}`; GET /queues lists them"))
    })
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetters {
    /// Oldest first.
    #[schema(value_type = Vec<DeadLetter<QueuedEvent>>)]
    dead_letters: Vec<DeadLetter<Value>>,
}

/// The events a queue gave up on, with why.
#[utoipa::path(
    get,
    path = "/queues/{queue}/dead-letters",
    operation_id = "list_dead_letters",
    tag = "queues",
    params(("queue" = String, Path, description = "A queue's name, as `GET /queues` lists",
        example = "raw_queue")),
    responses(
        (status = 200, description = "The queue's dead letters", body = DeadLetters),
        NoSuchQueue,
    ),
)]
pub async fn dead_letters(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DeadLetters>, ApiError> {
    let queue = queue(&state, &name)?;
    let dead_letters = match shared_letters(&state, &name) {
        None => queue.dead_letters(),
        Some(letters) => letters
            .letters()
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|(number, letter)| DeadLetter {
                event: letter.item,
                error: letter.error,
                attempts: letter.attempts,
                failed_at: Timestamp::parse(&letter.failed_at).unwrap_or(Timestamp::EPOCH),
                number,
            })
            .collect(),
    };
    Ok(Json(DeadLetters { dead_letters }))
}

/// On JetStream: the dead letters of the queue `name`, kept there.
fn shared_letters<'a>(state: &'a AppState, name: &str) -> Option<&'a dyn SharedLetters> {
    state.pipeline().shared()?.queue(name)
}

pub(super) fn unavailable(error: StoreError) -> ApiError {
    ApiError::StoreUnavailable(error.to_string())
}

#[derive(Serialize, ToSchema)]
pub struct Redriven {
    /// Dead letters put back on the queue.
    redriven: usize,
}

/// Puts a queue's dead letters back on it, for another round of attempts.
#[utoipa::path(
    post,
    path = "/queues/{queue}/dead-letters/redrive",
    operation_id = "redrive_dead_letters",
    tag = "queues",
    params(("queue" = String, Path, description = "A queue's name, as `GET /queues` lists",
        example = "raw_queue")),
    responses(
        (status = 200, description = "How many were redriven", body = Redriven),
        NoSuchQueue,
    ),
)]
pub async fn redrive(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Redriven>, ApiError> {
    let queue = queue(&state, &name)?;
    state.writable()?;
    let redriven = match state.pipeline().redrive_shared(&name).await {
        None => queue.redrive(),
        Some(redriven) => redriven.map_err(unavailable)?,
    };
    state.durable().await?;
    Ok(Json(Redriven { redriven }))
}

#[derive(Serialize, ToSchema)]
pub struct Discarded {
    /// Dead letters dropped.
    discarded: usize,
}

/// Discards a queue's dead letters.
#[utoipa::path(
    delete,
    path = "/queues/{queue}/dead-letters",
    operation_id = "discard_dead_letters",
    tag = "queues",
    params(("queue" = String, Path, description = "A queue's name, as `GET /queues` lists",
        example = "raw_queue")),
    responses(
        (status = 200, description = "How many were discarded", body = Discarded),
        NoSuchQueue,
    ),
)]
pub async fn discard(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Discarded>, ApiError> {
    let queue = queue(&state, &name)?;
    state.writable()?;
    let discarded = match shared_letters(&state, &name) {
        None => queue.discard(),
        Some(letters) => letters.discard_all().await.map_err(unavailable)?,
    };
    state.durable().await?;
    Ok(Json(Discarded { discarded }))
}

#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Re-deliver the retained changes with a sequence above this one
    /// (0: every retained change).
    after: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Replayed {
    /// Changes put back on the queue.
    replayed: usize,
}

/// Re-delivers the retained changes after `after` that the queue was
/// already given, so its handler applies them again (after a change of
/// rules, say: standard tables are rebuilt from the raw changes).
#[utoipa::path(
    post,
    path = "/queues/{queue}/replay",
    operation_id = "replay_queue",
    tag = "queues",
    params(("queue" = String, Path, description = "A queue fed from the change log",
        example = "raw_queue")),
    request_body(content = ReplayBody, content_type = "application/json"),
    responses(
        (status = 200, description = "How many changes were put back", body = Replayed),
        (status = 400, description = "The body is not `{\"after\": <seq>}`", body = Problem,
            content_type = "application/problem+json"),
        NoSuchQueue,
        (status = 409, description = "The queue is not fed from the change log", body = Problem,
            content_type = "application/problem+json"),
        (status = 410, description = "Changes after `after` are no longer retained; the \
            problem has `oldest`", body = Problem, content_type = "application/problem+json"),
        TooLarge,
        NotJson,
    ),
)]
pub async fn replay(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Json<Replayed>, ApiError> {
    let queue = queue(&state, &name)?;
    super::ingest::require_json(&super::ingest::essence(&headers)?)?;
    let body: ReplayBody = super::ingest::parse_object(&body, r#"{"after": <seq>}"#)?;
    state.writable()?;
    let pipeline = state.pipeline();
    let replayed = match pipeline.shared() {
        None => queue.replay(body.after),
        Some(shared) => match shared.replay(&pipeline.engine.log, &name, body.after).await {
            Some(Err(error)) => return Err(unavailable(error)),
            Some(Ok(replayed)) => Some(replayed),
            None => None,
        },
    };
    let replayed = replayed.ok_or_else(|| {
        ApiError::Conflict(format!(
            "queue `{name}` is not fed from the change log; only such queues replay"
        ))
    })??;
    state.durable().await?;
    tracing::info!(queue = %name, after = body.after, replayed, "replaying changes");
    Ok(Json(Replayed { replayed }))
}

#[derive(Serialize, ToSchema)]
pub struct HandlerList {
    handlers: Vec<HandlerStats>,
}

/// Every handler with its workers, counters and circuit state.
#[utoipa::path(
    get,
    path = "/handlers",
    operation_id = "list_handlers",
    tag = "queues",
    responses((status = 200, description = "Every handler", body = HandlerList)),
)]
pub async fn handlers(_: NoQuery, State(state): State<AppState>) -> Json<HandlerList> {
    let handlers = state
        .pipeline()
        .engine
        .handlers()
        .iter()
        .map(|h| h.stats())
        .collect();
    Json(HandlerList { handlers })
}

fn handler<'a>(
    state: &'a AppState,
    name: &str,
) -> Result<&'a std::sync::Arc<dyn HandlerView>, ApiError> {
    state.pipeline().engine.handler(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no handler named `{name}`; GET /handlers lists them"
        ))
    })
}

#[derive(Serialize, ToSchema)]
pub struct FaultView {
    handler: String,
    /// The injected fault; null when none.
    fault: Option<Fault>,
}

#[derive(Serialize, ToSchema)]
pub struct FaultList {
    /// Every handler's injected fault by handler name; null when none.
    #[schema(schema_with = fault_or_null_by_handler)]
    faults: BTreeMap<String, Option<Fault>>,
}

/// The schema of [`FaultList::faults`], written out because the derive
/// cannot describe a map whose values may be null.
fn fault_or_null_by_handler() -> Object {
    let fault_or_null = OneOfBuilder::new()
        .item(Ref::from_schema_name(Fault::name()))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build();
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(Schema::OneOf(fault_or_null)))
        .build()
}

const HANDLER: &str = "A handler's name, as `GET /handlers` lists";

/// Every handler's injected fault.
#[utoipa::path(
    get,
    path = "/faults",
    operation_id = "list_faults",
    tag = "queues",
    responses((status = 200, description = "Faults by handler", body = FaultList)),
)]
pub async fn faults(_: NoQuery, State(state): State<AppState>) -> Json<FaultList> {
    let faults = state
        .pipeline()
        .engine
        .handlers()
        .iter()
        .map(|h| (h.name().to_string(), h.fault()))
        .collect();
    Json(FaultList { faults })
}

/// One handler's injected fault.
#[utoipa::path(
    get,
    path = "/faults/{handler}",
    operation_id = "read_fault",
    tag = "queues",
    params(("handler" = String, Path, description = HANDLER, example = "raw_handler")),
    responses(
        (status = 200, description = "The handler's fault", body = FaultView),
        NoSuchHandler,
    ),
)]
pub async fn fault(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<FaultView>, ApiError> {
    let h = handler(&state, &name)?;
    Ok(Json(FaultView {
        handler: name,
        fault: h.fault(),
    }))
}

/// Injects a fault into a handler, for demos and tests.
///
/// Transient failures are retried with backoff and may open the circuit;
/// permanent ones go to dead letters at once.
#[utoipa::path(
    put,
    path = "/faults/{handler}",
    operation_id = "set_fault",
    tag = "queues",
    params(("handler" = String, Path, description = HANDLER, example = "raw_handler")),
    request_body(content = Fault, content_type = "application/json"),
    responses(
        (status = 200, description = "The fault now injected", body = FaultView),
        (status = 400, description = "The body is not a valid fault", body = Problem,
            content_type = "application/problem+json"),
        NoSuchHandler,
        TooLarge,
        NotJson,
    ),
)]
pub async fn set_fault(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Json<FaultView>, ApiError> {
    let h = handler(&state, &name)?;
    super::ingest::require_json(&super::ingest::essence(&headers)?)?;
    let fault: Fault = super::ingest::parse_object(
        &body,
        r#"{"failure_rate": 0..1, "permanent": bool, "delay_ms": int}"#,
    )?;
    fault.validate().map_err(ApiError::BadRequest)?;
    h.set_fault(Some(fault));
    tracing::info!(handler = %name, ?fault, "fault injected");
    Ok(Json(FaultView {
        handler: name,
        fault: Some(fault),
    }))
}

/// Removes a handler's injected fault.
#[utoipa::path(
    delete,
    path = "/faults/{handler}",
    operation_id = "clear_fault",
    tag = "queues",
    params(("handler" = String, Path, description = HANDLER, example = "raw_handler")),
    responses(
        (status = 200, description = "The handler, now without a fault", body = FaultView),
        NoSuchHandler,
    ),
)]
pub async fn clear_fault(
    _: NoQuery,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<FaultView>, ApiError> {
    let h = handler(&state, &name)?;
    h.set_fault(None);
    tracing::info!(handler = %name, "fault cleared");
    Ok(Json(FaultView {
        handler: name,
        fault: None,
    }))
}
