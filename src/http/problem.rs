//! Errors as `application/problem+json` (RFC 9457), mapped in one place.
//!
//! Handlers return [`ApiError`]; responses that other layers produce
//! (axum's extractor rejections, 404 for unknown routes, 405, 413 from the
//! body limit) are rewritten by [`problem_responses`], so every error a
//! client sees has the same shape. A 5xx body never carries internal detail.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::engine::log::Gone;
use crate::engine::table::{Full, PreconditionFailed};
use crate::media::pipeline::{Overloaded, Refused};
use crate::media::records::InvalidRecord;
use crate::storage::wal::Poisoned;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// A parameter, header or field outside a record is wrong.
    #[error("`{field}` {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    InvalidRecord(#[from] InvalidRecord),
    #[error(transparent)]
    PreconditionFailed(#[from] PreconditionFailed),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error(transparent)]
    Gone(#[from] Gone),
    /// A table is at its limit of ids (`--max-records`).
    #[error(transparent)]
    Full(#[from] Full),
    #[error(
        "the pipeline did not settle within {timeout_ms} ms ({outstanding} events outstanding)"
    )]
    NotSettled { timeout_ms: u64, outstanding: u64 },
    #[error("the server is shutting down ({outstanding} events outstanding)")]
    ShuttingDown { outstanding: u64 },
    /// More requests than `--max-requests` at once.
    #[error("the server is handling its limit of {limit} requests at once (--max-requests)")]
    Busy { limit: u32 },
    /// The request was not done within `--request-timeout`.
    #[error(
        "the request was not complete within {timeout} (--request-timeout); send its body \
         faster, or in smaller requests"
    )]
    TimedOut { timeout: String },
    /// The data directory could not be written: nothing is acknowledged.
    #[error(transparent)]
    Unavailable(#[from] Poisoned),
    /// JetStream cannot be reached (`--nats-url`): try again.
    #[error("NATS JetStream is unavailable: {0}")]
    StoreUnavailable(String),
    /// The request asks for something this queue does not do.
    #[error("{0}")]
    Conflict(String),
    /// No token, or one the server does not know: 401.
    #[error("{detail}")]
    Unauthorized {
        detail: String,
        /// Whether a token was sent (and was not known).
        invalid: bool,
    },
    /// The caller's role, or its token's sources, do not allow this: 403.
    #[error("{0}")]
    Forbidden(String),
    /// Something the server itself got wrong (a bug): 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::Invalid { .. } | ApiError::InvalidRecord(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Overloaded(_)
            | ApiError::NotSettled { .. }
            | ApiError::ShuttingDown { .. }
            | ApiError::Busy { .. }
            | ApiError::Unavailable(_)
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TimedOut { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Extension members that help a client act on the error.
    fn extensions(&self) -> Map<String, Value> {
        let value = match self {
            ApiError::InvalidRecord(e) => json!({ "index": e.index, "field": e.error.field }),
            ApiError::Invalid { field, .. } => json!({ "field": field }),
            ApiError::PreconditionFailed(e) => json!({ "current_version": e.current }),
            ApiError::Overloaded(e) => json!({ "backlog": e.backlog, "limit": e.limit }),
            ApiError::Gone(e) => json!({ "oldest": e.oldest }),
            ApiError::Full(e) => json!({ "table": e.table, "limit": e.limit }),
            ApiError::Busy { limit } => json!({ "limit": limit }),
            ApiError::NotSettled { outstanding, .. } | ApiError::ShuttingDown { outstanding } => {
                json!({ "settled": false, "outstanding": outstanding })
            }
            _ => json!({}),
        };
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Overloaded(e) => e.into(),
            Refused::Full(e) => e.into(),
            Refused::Unavailable(reason) => ApiError::StoreUnavailable(reason),
        }
    }
}

impl ApiError {
    /// A 400 naming the parameter, header or field that is wrong.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        ApiError::Invalid {
            field: field.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = problem(self.status(), &self.to_string(), self.extensions());
        if matches!(
            self,
            ApiError::Overloaded(_) | ApiError::Busy { .. } | ApiError::StoreUnavailable(_)
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::Unauthorized { invalid, .. } = &self {
            let challenge = if *invalid {
                r#"Bearer realm="eventsys", error="invalid_token""#
            } else {
                r#"Bearer realm="eventsys""#
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if matches!(self, ApiError::TimedOut { .. }) {
            // What is left of the body would be read as the next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

// `problem` serialises this, and it is also the `Problem` schema of
// `GET /openapi.json`, so the shape documented is the one served. Its doc
// comments are that schema's descriptions.
/// An error, as `application/problem+json` (RFC 9457): the standard
/// members, then extension members.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:eventsys:problem:bad-request",
    "title": "Bad Request",
    "status": 400,
    "detail": "record 0: `id` is required",
    "index": 0,
    "field": "id"
}))]
pub struct Problem {
    /// `urn:eventsys:problem:` and the status's reason phrase as a slug.
    #[serde(rename = "type")]
    kind: String,
    /// The status's reason phrase.
    title: &'static str,
    /// The HTTP status code, repeated.
    status: u16,
    /// What went wrong, for a person; a 500 says only that it is internal.
    detail: String,
    /// Members that help a client act on the error: `index` and `field`
    /// (400, a bad record), `field` (400, a bad parameter or header),
    /// `current_version` (412), `backlog` and `limit` (503 while
    /// overloaded), `table` and `limit` (507, a table at its limit of
    /// records), `oldest` (410), `settled` and `outstanding` (503 from
    /// `/settle`).
    #[serde(flatten)]
    extensions: Map<String, Value>,
}

/// A problem+json response.
pub fn problem(status: StatusCode, detail: &str, extensions: Map<String, Value>) -> Response {
    let body = problem_json(status, detail, extensions);
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// The `application/problem+json` body of a problem.
pub fn problem_json(status: StatusCode, detail: &str, extensions: Map<String, Value>) -> String {
    let title = status.canonical_reason().unwrap_or("Error");
    let slug = title.to_ascii_lowercase().replace([' ', '\''], "-");
    let body = Problem {
        kind: format!("urn:eventsys:problem:{slug}"),
        title,
        status: status.as_u16(),
        detail: detail.to_string(),
        extensions,
    };
    // Strings, numbers and a map of JSON values: serialising cannot fail.
    serde_json::to_string(&body).unwrap_or_default()
}

/// Rewrites any error response that is not yet problem+json; `body_limit`
/// is the configured limit, for a 413 that says what it is.
pub async fn problem_responses(State(body_limit): State<usize>, response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let detail = if status.is_server_error() {
        tracing::error!(%status, "internal error");
        "internal error; see the server log".to_string()
    } else {
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        match (text.is_empty(), status) {
            (_, StatusCode::PAYLOAD_TOO_LARGE) => {
                format!(
                    "the request body is larger than the limit of {body_limit} bytes (--body-limit-bytes)"
                )
            }
            (true, StatusCode::NOT_FOUND) => "no such route".to_string(),
            (true, StatusCode::METHOD_NOT_ALLOWED) => {
                "method not allowed on this route".to_string()
            }

            (true, _) => status.canonical_reason().unwrap_or("error").to_string(),
            (false, _) => text,
        }
    };
    let mut rewritten = problem(status, &detail, Map::new());
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// Problem responses that several routes document alike, for their
/// `#[utoipa::path(responses(...))]` lists. Each documents exactly what a
/// `(status = .., description = .., body = Problem, content_type =
/// "application/problem+json")` entry would.
pub mod shared {
    use std::collections::BTreeMap;

    use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder};
    use utoipa::{IntoResponses, PartialSchema};

    type Responses = BTreeMap<String, RefOr<utoipa::openapi::Response>>;

    fn problem(description: &str) -> ResponseBuilder {
        ResponseBuilder::new().description(description).content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
    }

    fn one(status: u16, response: ResponseBuilder) -> Responses {
        BTreeMap::from([(status.to_string(), RefOr::T(response.build()))])
    }

    macro_rules! responses {
        ($($(#[$doc:meta])* $name:ident = $status:literal, $description:literal;)*) => {$(
            $(#[$doc])*
            pub struct $name;

            impl IntoResponses for $name {
                fn responses() -> Responses {
                    one($status, problem($description))
                }
            }
        )*};
    }

    responses! {
        /// 400 from a route's query string.
        BadQuery = 400, "A bad query parameter";
        /// 404 from `/raw/{kind}` routes.
        UnknownKind = 404, "Unknown kind";
        /// 404 from `/queues/{queue}/...` routes.
        NoSuchQueue = 404, "No such queue";
        /// 404 from `/faults/{handler}` routes.
        NoSuchHandler = 404, "No such handler";
        /// 413 from any route that takes a body.
        TooLarge = 413, "The body is over the limit (`--body-limit-bytes`)";
        /// 415 from any route that takes a JSON body.
        NotJson = 415, "The body is not declared as JSON";
        /// 507 from ingest when a table is at its limit of ids.
        TableFull = 507, "A table is at its limit of records (`--max-records`); the problem \
            names the `table` and its `limit`";
    }

    /// 503 from ingest while the backlog is over its bound.
    pub struct Overloaded;

    impl IntoResponses for Overloaded {
        fn responses() -> Responses {
            let retry_after = HeaderBuilder::new()
                .schema(Some(u32::schema()))
                .description(Some("Seconds to wait"))
                .build();
            one(
                503,
                problem("The backlog is over its bound; retry later")
                    .header("Retry-After", retry_after),
            )
        }
    }
}
