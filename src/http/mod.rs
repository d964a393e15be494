//! The HTTP contract (`API.md`): routes, shared state and middleware. Each
//! resource has its own module; they only translate between HTTP and the
//! pipeline.

mod cloudevents;
mod dashboard;
mod events;
mod ingest;
mod metrics;
pub mod problem;
mod queues;
mod system;
mod tables;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;

use crate::config::Config;
use crate::media::pipeline::Pipeline;

pub use problem::ApiError;

/// What every handler can reach; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    pipeline: Arc<Pipeline>,
    config: Config,
    /// What `/metrics` serves; kept per app so parallel tests don't share.
    registry: prometheus_client::registry::Registry,
    http_metrics: metrics::HttpMetrics,
    /// Cancelled when shutdown begins: live streams end on it so that the
    /// server's graceful shutdown does not wait for them.
    stopping: CancellationToken,
}

impl AppState {
    pub fn new(pipeline: Pipeline, config: Config) -> Self {
        let pipeline = Arc::new(pipeline);
        let (registry, http_metrics) = metrics::registry(&pipeline);
        Self(Arc::new(Inner {
            pipeline,
            config,
            registry,
            http_metrics,
            stopping: CancellationToken::new(),
        }))
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.0.pipeline
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.0.registry
    }

    fn http_metrics(&self) -> &metrics::HttpMetrics {
        &self.0.http_metrics
    }

    pub fn stopping(&self) -> CancellationToken {
        self.0.stopping.clone()
    }
}

/// The routes of API.md.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().body_limit_bytes;
    Router::new()
        .merge(dashboard::routes())
        .route("/healthz", get(system::healthz))
        .route("/settle", get(system::settle))
        .route("/topology", get(system::topology))
        .route("/metrics", get(metrics::scrape))
        .route("/raw/{kind}", post(ingest::post).put(ingest::put))
        .route("/raw/{kind}/{id}", axum::routing::delete(ingest::delete))
        .route("/events", get(events::list))
        .route("/events/stream", get(events::stream))
        .route("/tables", get(tables::list))
        .route("/tables/{table}", get(tables::page))
        .route("/tables/{table}/{id}", get(tables::record))
        .route("/queues", get(queues::list))
        .route(
            "/queues/{queue}/dead-letters",
            get(queues::dead_letters).delete(queues::discard),
        )
        .route(
            "/queues/{queue}/dead-letters/redrive",
            post(queues::redrive),
        )
        .route("/handlers", get(queues::handlers))
        .route("/faults", get(queues::faults))
        .route(
            "/faults/{handler}",
            get(queues::fault)
                .put(queues::set_fault)
                .delete(queues::clear_fault),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(CatchPanicLayer::new())
        .layer(middleware::map_response_with_state(
            body_limit,
            problem::problem_responses,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::observe,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// The id of the request that started a chain of changes.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Takes the client's `X-Request-Id` (if it is 1 to 128 visible ASCII
/// characters), else makes one, and returns it on the response.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id: Arc<str> = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string().into(), Into::into);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(uuid::Uuid::new_v4().to_string().into())))
    }
}

/// Parses a query string into `T`, naming the bad parameter in a 400.
pub struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded_query(query).map(Query)
    }
}

fn serde_urlencoded_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| ApiError::BadRequest("the query string is not valid".into()))?,
    )
    .map(|q| q.0)
    .map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid query: {}",
            std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
        ))
    })
}
