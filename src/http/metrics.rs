//! `GET /metrics` in Prometheus text format, and the per-request span and
//! metrics middleware.
//!
//! Counters the engine already keeps (table outcomes, queue counters,
//! handler results, dead letters) are read at scrape time by
//! [`PipelineCollector`]; only latencies are observed as they happen.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::engine::metrics::{LatencyFamily, latency_histogram};
use crate::engine::table::Outcome;
use crate::media::pipeline::Pipeline;

use super::{AppState, NoQuery, RequestId};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: Route,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: &'static str,
    pub route: Route,
}

/// The matched route (such as `/raw/{kind}`), shared with the router
/// rather than copied for every request.
#[derive(Clone, Debug)]
pub struct Route(Option<MatchedPath>);

impl Route {
    fn as_str(&self) -> &str {
        self.0.as_ref().map_or("unmatched", MatchedPath::as_str)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A method as a label without an allocation; methods outside the API's
/// are all `other`.
fn method_label(method: &Method) -> &'static str {
    const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];
    METHODS
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or("other")
}

/// The HTTP layer's instruments.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: LatencyFamily<RouteLabels>,
    /// Requests being handled now, each until its response is ready (a
    /// waiting `/settle` included; a live stream until it starts).
    in_flight: Gauge,
}

/// Counts a request in flight for as long as it lives, including when the
/// client goes away and its future is dropped.
struct InFlight(Gauge);

impl InFlight {
    fn start(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Builds the registry: the pipeline's instruments, the HTTP ones, and the
/// scrape-time collector.
pub fn registry(pipeline: &Arc<Pipeline>) -> (Registry, HttpMetrics) {
    let mut registry = Registry::default();
    let http = HttpMetrics {
        requests: Family::default(),
        duration: Family::new_with_constructor(latency_histogram),
        in_flight: Gauge::default(),
    };
    registry.register(
        "eventsys_http_requests_in_flight",
        "HTTP requests being handled now, each until its response is ready (a waiting /settle included)",
        http.in_flight.clone(),
    );
    registry.register(
        "eventsys_handler_duration_seconds",
        "Time one attempt of a handler takes",
        pipeline.engine.metrics.handler_duration.clone(),
    );
    registry.register(
        "eventsys_ingest_to_visible_seconds",
        "Time from a raw write to the standard-table write it caused",
        pipeline.ingest_to_visible.clone(),
    );
    registry.register(
        "eventsys_http_requests",
        "HTTP requests by method, matched route and status",
        http.requests.clone(),
    );
    registry.register(
        "eventsys_http_request_duration_seconds",
        "HTTP request durations by method and matched route",
        http.duration.clone(),
    );
    registry.register_collector(Box::new(PipelineCollector(pipeline.clone())));
    (registry, http)
}

/// Reads the engine's counters at scrape time.
struct PipelineCollector(Arc<Pipeline>);

impl fmt::Debug for PipelineCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PipelineCollector")
    }
}

/// One metric family whose samples are `(labels, value)`.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut descriptor = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in samples {
        metric.encode(descriptor.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One metric without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for PipelineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let engine = &self.0.engine;
        let writes = engine.tables().iter().flat_map(|t| {
            let stats = t.stats();
            [
                (Outcome::Inserted, stats.inserted),
                (Outcome::Updated, stats.updated),
                (Outcome::Unchanged, stats.unchanged),
                (Outcome::Stale, stats.stale),
                (Outcome::Deleted, stats.deleted),
            ]
            .map(|(o, n)| {
                (
                    [
                        ("table", t.name().to_string()),
                        ("outcome", o.as_str().to_string()),
                    ],
                    ConstCounter::new(n),
                )
            })
        });
        family(
            &mut encoder,
            "eventsys_table_writes",
            "Table writes by outcome",
            writes,
        )?;
        family(
            &mut encoder,
            "eventsys_table_records",
            "Live records per table",
            engine.tables().iter().map(|t| {
                (
                    [("table", t.name().to_string())],
                    ConstGauge::new(t.len() as i64),
                )
            }),
        )?;
        let mut queues: Vec<_> = engine.queues().iter().map(|q| q.snapshot()).collect();
        if let Some(shared) = self.0.shared() {
            for queue in &mut queues {
                if let Some(count) = shared.dead_letters_counted(&queue.name) {
                    queue.dead_letters = count;
                }
            }
        }
        let gauge = |f: fn(&crate::engine::QueueSnapshot) -> u64| {
            queues
                .iter()
                .map(move |q| ([("queue", q.name.clone())], ConstGauge::new(f(q) as i64)))
        };
        family(
            &mut encoder,
            "eventsys_queue_depth",
            "Events waiting in a queue",
            gauge(|q| q.counts.depth),
        )?;
        family(
            &mut encoder,
            "eventsys_queue_in_flight",
            "Events taken by a worker and not finished",
            gauge(|q| q.counts.in_flight),
        )?;
        family(
            &mut encoder,
            "eventsys_queue_capacity",
            "Capacity of a queue",
            gauge(|q| q.capacity as u64),
        )?;
        family(
            &mut encoder,
            "eventsys_queue_backlog",
            "Changes recorded for a queue and not yet on it",
            gauge(|q| q.backlog),
        )?;
        family(
            &mut encoder,
            "eventsys_queue_retrying",
            "Events waiting out a retry delay",
            gauge(|q| q.counts.retrying),
        )?;
        family(
            &mut encoder,
            "eventsys_dead_letters",
            "Events in a queue's dead letters",
            gauge(|q| q.dead_letters as u64),
        )?;
        let enqueued = queues.iter().map(|q| {
            (
                [("queue", q.name.clone())],
                ConstCounter::new(q.counts.enqueued),
            )
        });
        family(
            &mut encoder,
            "eventsys_queue_enqueued",
            "Events put on a queue",
            enqueued,
        )?;
        let results = engine.handlers().iter().flat_map(|h| {
            let stats = h.stats();
            let queue = queues.iter().find(|q| *q.name == *stats.queue);
            let (retried, dead) =
                queue.map_or((0, 0), |q| (q.counts.retried, q.counts.dead_lettered));
            [
                ("processed", stats.processed),
                ("failed", stats.failed),
                ("retried", retried),
                ("dead_lettered", dead),
            ]
            .map(|(result, n)| {
                (
                    [
                        ("handler", stats.name.to_string()),
                        ("result", result.to_string()),
                    ],
                    ConstCounter::new(n),
                )
            })
        });
        family(
            &mut encoder,
            "eventsys_handler_events",
            "Handler attempts and events by result",
            results,
        )?;
        let circuits = engine.handlers().iter().map(|h| {
            let stats = h.stats();
            let open = !matches!(stats.circuit, crate::engine::handler::Circuit::Closed);
            (
                [("handler", stats.name.to_string())],
                ConstGauge::new(i64::from(open)),
            )
        });
        family(
            &mut encoder,
            "eventsys_handler_circuit_open",
            "1 while a handler's circuit is open or half-open",
            circuits,
        )?;
        let log = &engine.log;
        single(
            &mut encoder,
            "eventsys_log_events",
            "Change-log events retained",
            ConstGauge::new(log.len() as i64),
        )?;
        single(
            &mut encoder,
            "eventsys_log_sequence",
            "Sequence of the latest change",
            ConstGauge::new(log.latest() as i64),
        )?;
        Ok(())
    }
}

/// Metrics in the Prometheus text format.
///
/// Table writes by outcome, queue depths and counters, handler durations
/// and outcomes, dead letters, ingest-to-visible latency, and HTTP requests
/// by route and status.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "system",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4",
        body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")),
)]
pub async fn scrape(_: NoQuery, State(state): State<AppState>) -> Response {
    if let Some(shared) = state.pipeline().shared()
        && let Err(error) = shared.count_dead_letters().await
    {
        tracing::warn!(%error, "dead letters not counted: the last count is shown");
    }
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, state.registry()) {
        tracing::error!(%error, "encoding metrics failed");
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// One span per request at `debug` (method, matched route, request id,
/// then status), request counts and durations, and one log line per
/// response with the same fields: refusals at `info` (5xx at `error`), the
/// rest at `debug`. The span is `debug` because a span the log keeps costs
/// every request, and at `info` only refusals and failures are logged.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let route = Route(request.extensions().get::<MatchedPath>().cloned());
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let span = tracing::debug_span!("request", %method, %route, request_id = %id, status = tracing::field::Empty);
    let _in_flight = InFlight::start(&state.http_metrics().in_flight);
    let started = Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    span.record("status", status.as_u16());
    let metrics = state.http_metrics();
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status: status.as_u16(),
        })
        .inc();
    metrics
        .duration
        .get_or_create(&RouteLabels {
            method,
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    let _enter = span.enter();
    if status.is_server_error() && status != axum::http::StatusCode::SERVICE_UNAVAILABLE {
        tracing::error!(%method, %route, request_id = %id, status = status.as_u16(), ?elapsed,
            "request failed");
    } else if status.is_client_error() || status.is_server_error() {
        tracing::info!(%method, %route, request_id = %id, status = status.as_u16(), ?elapsed,
            "request refused");
    } else {
        tracing::debug!(status = status.as_u16(), ?elapsed, "request done");
    }
    response
}
