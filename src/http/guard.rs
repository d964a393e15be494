//! The middleware that lets a request in or not ([`authorize`]), and the
//! audit trail of what operators did ([`audit`]).
//!
//! Every operator action (faults set and cleared, redrives, discards,
//! replays, rebuilds, saga retries) and every reconciliation is written,
//! once its response is known, as a record of the `audit` table (kind
//! `system`): who (`anonymous` without tokens), what, on what, when, the
//! request id and the result. Like any table write it is a change, so it
//! appears in `/events`, the live stream and the dashboard. An action is
//! recorded once it is done (2xx): a request refused, for want of a token
//! or a role or as malformed, stored nothing and leaves no record either
//! (a refusal on authority is logged, naming who tried what).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::engine::log::Cause;
use crate::engine::record::{Data, RecordId, Timestamp};

use super::auth::{self, Caller, Need};
use super::{ApiError, AppState, RequestId};

/// Response bodies up to this size are kept in their audit record whole.
const KEPT_BODY: usize = 16 * 1024;

/// Finds the caller and checks the route's role (or, without tokens, that
/// a state-changing request comes from a loopback page); then runs the
/// request, and records it in the audit table if it is an operator action.
pub async fn authorize(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let need = auth::need(&method, &path);
    let action = action(&method, &path);
    let caller = match state.access().tokens() {
        Some(_) if need == Need::Open => return next.run(request).await,
        Some(tokens) => {
            let token = auth::bearer(request.headers());
            let Some(caller) = token.and_then(|t| tokens.find(t)).cloned() else {
                return ApiError::Unauthorized {
                    detail: match token {
                        None => format!(
                            "{method} {path} needs a token: send `Authorization: Bearer <token>`"
                        ),
                        Some(_) => "the token is not one this server knows".to_string(),
                    },
                    invalid: token.is_some(),
                }
                .into_response();
            };
            if let Need::Role(role) = need
                && caller.role < role
            {
                tracing::warn!(who = &*caller.name, role = %caller.role, %method, %path, "refused: the role is too low");
                return ApiError::Forbidden(format!(
                    "`{}` is a {}; {method} {path} needs a {role}",
                    caller.name, caller.role
                ))
                .into_response();
            }
            caller
        }
        None => {
            if auth::changes_state(&method)
                && let Some(reason) =
                    auth::not_local(request.headers(), state.config().insecure_open)
            {
                return ApiError::Forbidden(reason).into_response();
            }
            Caller::anonymous()
        }
    };
    request.extensions_mut().insert(caller.clone());
    let Some(action) = action else {
        return next.run(request).await;
    };
    let id = request_id(&request);
    let response = next.run(request).await;
    audit(&state, &caller, action, &id, response).await
}

fn request_id(request: &Request) -> std::sync::Arc<str> {
    request
        .extensions()
        .get::<RequestId>()
        .map_or_else(|| "".into(), |r| r.0.clone())
}

/// An audited action: its name and what it acts on.
#[derive(Clone, Copy, Debug)]
pub struct Action<'p> {
    pub name: &'static str,
    pub target: &'p str,
    pub method: &'p Method,
    pub path: &'p str,
}

/// The operator action (or reconciliation) `method` on `path` is, if any.
pub fn action<'p>(method: &'p Method, path: &'p str) -> Option<Action<'p>> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let name = match (method, segments.as_slice()) {
        (&Method::PUT, ["faults", _]) => "fault.set",
        (&Method::DELETE, ["faults", _]) => "fault.clear",
        (&Method::POST, ["queues", _, "dead-letters", "redrive"]) => "dead_letters.redrive",
        (&Method::DELETE, ["queues", _, "dead-letters"]) => "dead_letters.discard",
        (&Method::POST, ["queues", _, "replay"]) => "replay",
        (&Method::POST, ["tables", _, "rebuild"]) => "rebuild",
        (&Method::POST, ["publications", _, "retry"]) => "saga.retry",
        (&Method::PUT, ["raw", _]) => "reconcile",
        _ => return None,
    };
    Some(Action {
        name,
        target: segments.get(1).copied().unwrap_or_default(),
        method,
        path,
    })
}

/// Writes the audit record of `action` by `caller`, whose response is
/// `response`, and returns the response (or, if the record cannot be kept
/// on disk, the error that says so).
async fn audit(
    state: &AppState,
    caller: &Caller,
    action: Action<'_>,
    request_id: &std::sync::Arc<str>,
    response: Response,
) -> Response {
    // What was refused stored nothing, and leaves no record either.
    let status = response.status();
    if !status.is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(%error, "cannot read a response to audit it");
            return ApiError::Internal("cannot read the response".into()).into_response();
        }
    };
    let mut result = json!({ "status": status.as_u16() });
    if bytes.len() <= KEPT_BODY
        && let Ok(body) = serde_json::from_slice::<Value>(&bytes)
    {
        result["body"] = body;
    } else {
        result["body_bytes"] = json!(bytes.len());
    }
    let at = Timestamp::now();
    let id = uuid::Uuid::now_v7().to_string();
    let record = json!({
        "id": id,
        "who": &*caller.name,
        "role": caller.role,
        "action": action.name,
        "target": action.target,
        "method": action.method.as_str(),
        "path": action.path,
        "at": at,
        "request_id": &**request_id,
        "result": result,
    });
    let written = match Data::of_value(&record) {
        Ok(data) => state
            .pipeline()
            .audit(
                RecordId::derived(id),
                at,
                data,
                &Cause::request(request_id.clone()),
            )
            .await
            .map_err(|refused| refused.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match written {
        Ok(()) => {
            if let Err(error) = state.durable().await {
                return error.into_response();
            }
        }
        // The action is done and cannot be undone; say so in the log.
        Err(error) => tracing::error!(
            %error,
            action = action.name,
            target = action.target,
            who = &*caller.name,
            "cannot write the audit record"
        ),
    }
    let mut response = Response::from_parts(parts, Body::from(bytes));
    if status == StatusCode::NO_CONTENT {
        *response.body_mut() = Body::empty();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_actions_are_named() {
        fn named(method: Method, path: &str) -> Option<(&'static str, String)> {
            action(&method, path).map(|a| (a.name, a.target.to_string()))
        }
        assert_eq!(
            named(Method::PUT, "/faults/raw_handler"),
            Some(("fault.set", "raw_handler".into()))
        );
        assert_eq!(
            named(Method::POST, "/queues/raw_queue/dead-letters/redrive"),
            Some(("dead_letters.redrive", "raw_queue".into()))
        );
        assert_eq!(
            named(Method::PUT, "/raw/actors"),
            Some(("reconcile", "actors".into()))
        );
        assert_eq!(named(Method::POST, "/raw/actors"), None);
        assert_eq!(named(Method::GET, "/faults/raw_handler"), None);
    }
}
