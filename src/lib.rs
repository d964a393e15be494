//! eventsys: see, learn and prototype event-driven pipelines.
//!
//! # Layout
//!
//! - [`engine`]: Tables (versioned maps that drop stale and no-op writes),
//!   the change log (the outbox every change goes through), Queues (bounded
//!   streams that deliver every event) and Handlers (worker pools with
//!   retry, dead letters, a circuit breaker and injectable faults). It knows
//!   nothing about movies.
//! - [`media`]: the media catalog built on the engine: record kinds,
//!   standardisation, `raw_handler`, `encode_handler`, and the one topology
//!   that holds all six scenarios. It knows nothing about HTTP.
//! - [`http`]: the HTTP contract, translating requests into pipeline calls
//!   and errors into `application/problem+json`.
//! - [`config`]: flags and environment.
//!
//! [`App`] ties them together; [`serve`] runs it until a shutdown signal and
//! then drains the pipeline. `main.rs` is a thin shell around both, so tests
//! drive the same code on port 0.

#![forbid(unsafe_code)]

/// Every record costs several small allocations that live as long as the
/// record; mimalloc serves them faster than the system allocator and keeps
/// less memory for them. Applications embedding the engine may turn it off
/// (`default-features = false`) and choose their own.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod config;
pub mod engine;
pub mod http;
pub mod media;
pub mod storage;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

pub use config::Config;
use media::data_dir::{DataDir, OpenFailure};
use media::pipeline::Pipeline;

/// A running eventsys: the pipeline and its HTTP routes.
#[derive(Clone)]
pub struct App {
    state: http::AppState,
}

impl App {
    /// Builds and starts the pipeline on the current tokio runtime; with
    /// `--data-dir`, rebuilds it from the directory first (see
    /// [`DataDir::open`] for why that can fail).
    pub fn open(config: Config) -> Result<Self, OpenFailure> {
        let pipeline = Arc::new(Pipeline::start(config.pipeline()));
        let data_dir = match config.storage() {
            Some(options) => {
                let data_dir = DataDir::open(&pipeline, options)?;
                pipeline.views.invalidate();
                let stop = pipeline.engine.shutdown_token();
                tokio::spawn(data_dir.clone().snapshot_while(pipeline.clone(), stop));
                Some(data_dir)
            }
            None => None,
        };
        Ok(Self {
            state: http::AppState::new(pipeline, config, data_dir),
        })
    }

    /// [`App::open`] for a configuration in memory, which cannot fail.
    ///
    /// # Panics
    ///
    /// If the configuration has a data directory that cannot be opened.
    pub fn start(config: Config) -> Self {
        match Self::open(config) {
            Ok(app) => app,
            Err(error) => panic!("cannot open the data directory: {error}"),
        }
    }

    pub fn router(&self) -> Router {
        http::router(self.state.clone())
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        self.state.pipeline()
    }

    /// Drains the pipeline for up to the configured shutdown timeout, then
    /// stops its tasks. Returns how many events were left unfinished.
    pub async fn shutdown(&self) -> u64 {
        let timeout = self.state.config().shutdown_timeout();
        let left = self.pipeline().engine.shutdown(timeout).await;
        if let Some(data_dir) = self.state.data_dir() {
            data_dir.close(self.pipeline()).await;
        }
        left
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops taking
/// requests, ends live streams, and drains the pipeline. Returns how many
/// events were left unfinished.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<u64> {
    let stopping = app.state.stopping();
    let signalled = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        signalled.cancel();
    });
    let logged = stopping.clone();
    tokio::spawn(async move {
        logged.cancelled().await;
        tracing::info!("shutting down: no new requests");
    });
    let limits = app.state.config().connection_limits();
    http::serve_connections(listener, app.router(), limits, stopping).await;
    Ok(app.shutdown().await)
}
