//! `/queues` (with dead letters), `/handlers` and `/faults`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::{Value, json};

use crate::engine::handler::{Fault, HandlerStats};
use crate::engine::queue::DeadLetter;
use crate::engine::{HandlerView, QueueSnapshot, QueueView};

use super::{ApiError, AppState};

#[derive(Serialize)]
pub struct QueueList {
    queues: Vec<QueueSnapshot>,
}

pub async fn list(State(state): State<AppState>) -> Json<QueueList> {
    let queues = state
        .pipeline()
        .engine
        .queues()
        .iter()
        .map(|q| q.snapshot())
        .collect();
    Json(QueueList { queues })
}

fn queue<'a>(
    state: &'a AppState,
    name: &str,
) -> Result<&'a std::sync::Arc<dyn QueueView>, ApiError> {
    state.pipeline().engine.queue(name).ok_or_else(|| {
        ApiError::NotFound(format!("no queue named `{name}`; GET /queues lists them"))
    })
}

#[derive(Serialize)]
pub struct DeadLetters {
    dead_letters: Vec<DeadLetter<Value>>,
}

pub async fn dead_letters(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DeadLetters>, ApiError> {
    Ok(Json(DeadLetters {
        dead_letters: queue(&state, &name)?.dead_letters(),
    }))
}

pub async fn redrive(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "redriven": queue(&state, &name)?.redrive() })))
}

pub async fn discard(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "discarded": queue(&state, &name)?.discard() }),
    ))
}

#[derive(Serialize)]
pub struct HandlerList {
    handlers: Vec<HandlerStats>,
}

pub async fn handlers(State(state): State<AppState>) -> Json<HandlerList> {
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

#[derive(Serialize)]
pub struct FaultView {
    handler: String,
    fault: Option<Fault>,
}

/// `GET /faults`: every handler's injected fault (null when none).
pub async fn faults(State(state): State<AppState>) -> Json<Value> {
    let faults: serde_json::Map<String, Value> = state
        .pipeline()
        .engine
        .handlers()
        .iter()
        .map(|h| (h.name().to_string(), json!(h.fault())))
        .collect();
    Json(json!({ "faults": faults }))
}

pub async fn fault(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<FaultView>, ApiError> {
    let h = handler(&state, &name)?;
    Ok(Json(FaultView {
        handler: name,
        fault: h.fault(),
    }))
}

/// `PUT /faults/{handler}` with `{"failure_rate", "permanent", "delay_ms"}`.
pub async fn set_fault(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Json<FaultView>, ApiError> {
    let h = handler(&state, &name)?;
    super::ingest::require_json(&super::ingest::essence(&headers)?)?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be an object: {\"failure_rate\": 0..1, \"permanent\": bool, \"delay_ms\": int}".into(),
        ));
    }
    let fault: Fault = serde_json::from_value(value).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be {{\"failure_rate\": 0..1, \"permanent\": bool, \"delay_ms\": int}}: {e}"
        ))
    })?;
    fault.validate().map_err(ApiError::BadRequest)?;
    h.set_fault(Some(fault));
    tracing::info!(handler = %name, ?fault, "fault injected");
    Ok(Json(FaultView {
        handler: name,
        fault: Some(fault),
    }))
}

pub async fn clear_fault(
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
