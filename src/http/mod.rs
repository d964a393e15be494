//! The HTTP contract (`API.md`): routes, shared state and middleware. Each
//! resource has its own module; they only translate between HTTP and the
//! pipeline. Every API route is declared once, in [`api`], for both the
//! router and the OpenAPI document ([`openapi()`], served at
//! `/openapi.json`).

pub mod auth;
mod cloudevents;
mod connections;
mod dashboard;
mod events;
pub mod guard;
mod ingest;
mod metrics;
pub mod openapi;
pub mod problem;
mod publications;
mod queues;
mod stream;
mod system;
mod tables;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::media::data_dir::DataDir;
use crate::media::pipeline::Pipeline;

pub use connections::{Limits as ConnectionLimits, serve as serve_connections};
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
    /// One permit per request being handled (`--max-requests`).
    requests: Arc<Semaphore>,
    /// Serialises new changes once for every live stream.
    fanout: Arc<stream::Fanout>,
    /// Where the pipeline is kept, with `--data-dir`.
    data_dir: Option<Arc<DataDir>>,
    /// Who may do what (`--auth-tokens-file`).
    access: Arc<auth::Access>,
}

impl AppState {
    pub fn new(
        pipeline: Arc<Pipeline>,
        config: Config,
        data_dir: Option<Arc<DataDir>>,
        access: Arc<auth::Access>,
    ) -> Self {
        let (registry, http_metrics) = metrics::registry(&pipeline);
        let stopping = CancellationToken::new();
        let fanout = stream::Fanout::start(pipeline.engine.log.clone(), stopping.clone());
        Self(Arc::new(Inner {
            pipeline,
            registry,
            http_metrics,
            stopping,
            fanout,
            requests: Arc::new(Semaphore::new(config.max_requests as usize)),
            config,
            data_dir,
            access,
        }))
    }

    pub fn access(&self) -> &auth::Access {
        &self.0.access
    }

    pub fn data_dir(&self) -> Option<&Arc<DataDir>> {
        self.0.data_dir.as_ref()
    }

    /// Refuses a write before anything of it is stored, once the data
    /// directory has failed.
    pub fn writable(&self) -> Result<(), ApiError> {
        if let Some(shared) = self.0.pipeline.shared()
            && !shared.connected()
        {
            return Err(ApiError::StoreUnavailable(
                "the connection to NATS is lost; reconnecting".into(),
            ));
        }
        match self.0.data_dir.as_ref().and_then(|d| d.failure()) {
            Some(poisoned) => Err(poisoned.into()),
            None => Ok(()),
        }
    }

    /// Waits, before a write is acknowledged, until its effects are on
    /// disk (at once in memory); an error once the disk has failed.
    pub async fn durable(&self) -> Result<(), ApiError> {
        let Some(data_dir) = &self.0.data_dir else {
            return Ok(());
        };
        data_dir.sync().await?;
        // So that a read after the 2xx sees the write's change, without
        // waiting for the task that follows the log's progress.
        if let Ok(lsn) = data_dir.journal().durable_lsn() {
            self.0.pipeline.engine.log.durable_through(lsn);
        }
        Ok(())
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

    fn fanout(&self) -> &stream::Fanout {
        &self.0.fanout
    }

    pub fn stopping(&self) -> CancellationToken {
        self.0.stopping.clone()
    }
}

/// The API routes of API.md. Each `routes!` entry registers a handler with
/// axum under the method and path of its `#[utoipa::path]`, and adds that
/// operation to the OpenAPI document, so the two cannot drift apart.
/// (`routes!` takes handlers of one path at a time.)
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(system::healthz))
        .routes(routes!(system::whoami))
        .routes(routes!(system::settle))
        .routes(routes!(system::topology))
        .routes(routes!(metrics::scrape))
        .routes(routes!(openapi::document))
        .routes(routes!(ingest::post, ingest::put))
        .routes(routes!(ingest::delete))
        .routes(routes!(events::list))
        .routes(routes!(events::stream))
        .routes(routes!(tables::list))
        .routes(routes!(tables::page))
        .routes(routes!(tables::record))
        .routes(routes!(tables::rebuild))
        .routes(routes!(publications::retry))
        .routes(routes!(queues::list))
        .routes(routes!(queues::dead_letters, queues::discard))
        .routes(routes!(queues::redrive))
        .routes(routes!(queues::replay))
        .routes(routes!(system::storage))
        .routes(routes!(queues::handlers))
        .routes(routes!(queues::faults))
        .routes(routes!(
            queues::fault,
            queues::set_fault,
            queues::clear_fault
        ))
}

/// Every path the dashboard serves (`GET`), beside the API routes of
/// [`openapi()`]: together, every route the router serves.
pub fn dashboard_paths() -> &'static [&'static str] {
    &dashboard::PATHS
}

/// The OpenAPI 3.1 description of every API route, as `/openapi.json`
/// serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = api().into_openapi();
    secure(&mut document);
    document
}

/// Adds the bearer scheme of `--auth-tokens-file` to the document, and to
/// every operation that needs a role its 401 and 403 (see [`auth::need`]).
fn secure(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "A token of the server's --auth-tokens-file; without that file no token is \
                     needed (and a state-changing request must come from a loopback page)",
                ))
                .build(),
        ),
    );
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                problem::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    for (path, item) in document.paths.paths.iter_mut() {
        let operations = [
            (axum::http::Method::GET, item.get.as_mut()),
            (axum::http::Method::POST, item.post.as_mut()),
            (axum::http::Method::PUT, item.put.as_mut()),
            (axum::http::Method::DELETE, item.delete.as_mut()),
            (axum::http::Method::PATCH, item.patch.as_mut()),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            let auth::Need::Role(role) = auth::need(&method, path) else {
                continue;
            };
            operation.security = Some(vec![SecurityRequirement::new("bearer", [role.as_str()])]);
            let responses = &mut operation.responses.responses;
            responses.entry("401".into()).or_insert_with(|| {
                problem(
                    "No token, or one the server does not know (with `WWW-Authenticate: Bearer`)",
                )
                .into()
            });
            responses.entry("403".into()).or_insert_with(|| {
                problem(&format!(
                    "The caller's role is below `{role}`, its token's sources do not allow this, or \
                     (without tokens) the request is not from a loopback page"
                ))
                .into()
            });
        }
    }
}

/// The routes of API.md: the dashboard, and the API described by
/// [`openapi()`].
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().body_limit_bytes;
    let (api, _) = api().split_for_parts();
    Router::new()
        .merge(dashboard::routes())
        .merge(api)
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
            guard::authorize,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::observe,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Sheds a request over `--max-requests` with a 503 at once, and answers
/// one that takes longer than `--request-timeout` (a slow body, usually)
/// with a 408. Long polls are neither counted nor timed: `/settle` has its
/// own timeout and a live stream runs until it ends; nor are `/healthz` and
/// `/metrics`, which must answer most when the server is busiest.
async fn limit_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(
        request.uri().path(),
        "/settle" | "/events/stream" | "/healthz" | "/metrics"
    ) {
        return next.run(request).await;
    }
    let Ok(_permit) = state.0.requests.clone().try_acquire_owned() else {
        return ApiError::Busy {
            limit: state.config().max_requests,
        }
        .into_response();
    };
    let timeout = state.config().request_timeout();
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut {
            timeout: humantime::format_duration(timeout).to_string(),
        }
        .into_response(),
    }
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
        .map_or_else(new_request_id, Into::into);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    response
}

/// A fresh request id: a random UUID, written without an intermediate
/// `String`.
fn new_request_id() -> Arc<str> {
    let mut buffer = uuid::Uuid::encode_buffer();
    Arc::from(&*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer))
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(new_request_id())))
    }
}

/// For a route that reads no query parameters: any parameter is a 400, so
/// a convention a client tries (`PUT /raw/actors?dry_run=true`) is never
/// silently ignored while the request does something else.
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.uri.query().filter(|q| !q.is_empty()) {
            None => Ok(NoQuery),
            Some(query) => {
                let names: Vec<String> = serde_urlencoded_query::<Vec<(String, String)>>(query)
                    .map(|pairs| pairs.into_iter().map(|(name, _)| name).collect())
                    .unwrap_or_else(|_| vec![query.to_string()]);
                let all = names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(ApiError::invalid(
                    names.first().map_or(query, String::as_str),
                    format_args!(
                        "is not a query parameter of this route, which takes none (got {all})"
                    ),
                ))
            }
        }
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
