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
pub mod jetstream;
pub mod media;
pub mod storage;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use config::Config;
use http::auth::{Access, TokensError};
use http::tls::TlsError;
use media::data_dir::{DataDir, OpenFailure};
use media::pipeline::Pipeline;
use media::scale_out::ScaleOutError;

/// A running eventsys: the pipeline and its HTTP routes.
#[derive(Clone)]
pub struct App {
    state: http::AppState,
    tls: Option<TlsAcceptor>,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    DataDir(#[from] OpenFailure),
    #[error(transparent)]
    Tokens(#[from] TokensError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A non-loopback address without tokens.
    #[error("{0}")]
    Exposed(String),
    #[error(transparent)]
    ScaleOut(#[from] ScaleOutError),
    /// `--data-dir` with `--nats-url`.
    #[error(
        "--data-dir and --nats-url exclude each other: on JetStream the pipeline is kept there"
    )]
    Exclusive,
}

impl App {
    /// Builds and starts the pipeline on the current tokio runtime; with
    /// `--data-dir`, rebuilds it from the directory first (see
    /// [`DataDir::open`] for why that can fail). Refuses a non-loopback
    /// address without tokens, a tokens file that is wrong, and a
    /// certificate or key that cannot be served.
    pub fn open(config: Config) -> Result<Self, StartError> {
        if config.nats_url.is_some() {
            return Err(StartError::ScaleOut(ScaleOutError::NeedsAsync));
        }
        Self::open_on(config, None)
    }

    /// [`App::open`], and with `--nats-url` connects to JetStream and
    /// reads the shared pipeline first (it is refused within a few seconds
    /// if NATS cannot be reached, or is too old).
    pub async fn connect(config: Config) -> Result<Self, StartError> {
        let Some(options) = config.scale_out() else {
            return Self::open_on(config, None);
        };
        if config.data_dir.is_some() {
            return Err(StartError::Exclusive);
        }
        tracing::info!(url = %options.url, prefix = %options.prefix, "connecting to NATS JetStream");
        let pipeline = Pipeline::start_shared(config.pipeline(), &options).await?;
        tracing::info!(url = %options.url, prefix = %options.prefix, "on NATS JetStream");
        Self::open_on(config, Some(pipeline))
    }

    fn open_on(config: Config, pipeline: Option<Pipeline>) -> Result<Self, StartError> {
        let access = Arc::new(Access::open(config.auth_tokens_file.as_deref())?);
        http::auth::check_exposure(config.addr, access.enabled(), config.insecure_open)
            .map_err(StartError::Exposed)?;
        if config.insecure_open && !access.enabled() && !config.addr.ip().is_loopback() {
            tracing::warn!(
                addr = %config.addr,
                "--insecure-open: serving without tokens; anyone who can reach this address is an operator"
            );
        }
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(http::tls::acceptor(cert, key)?),
            _ => None,
        };
        let pipeline = Arc::new(pipeline.unwrap_or_else(|| Pipeline::start(config.pipeline())));
        let data_dir = match config.storage() {
            Some(options) => {
                let data_dir = DataDir::open(&pipeline, options)?;
                pipeline.read_models.views.invalidate();
                let stop = pipeline.engine.shutdown_token();
                tokio::spawn(data_dir.clone().snapshot_while(pipeline.clone(), stop));
                Some(data_dir)
            }
            None => None,
        };
        if access.enabled() {
            tokio::spawn(reload_on_hangup(
                access.clone(),
                pipeline.engine.shutdown_token(),
            ));
        }
        Ok(Self {
            state: http::AppState::new(pipeline, config, data_dir, access),
            tls,
        })
    }

    /// [`App::open`] for a configuration that cannot fail.
    ///
    /// # Panics
    ///
    /// If the configuration cannot start (see [`App::open`]).
    pub fn start(config: Config) -> Self {
        match Self::open(config) {
            Ok(app) => app,
            Err(error) => panic!("cannot start: {error}"),
        }
    }

    /// Whether it serves HTTPS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
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
    http::serve_connections(listener, app.router(), limits, app.tls.clone(), stopping).await;
    Ok(app.shutdown().await)
}

/// Re-reads the tokens file on each `SIGHUP` until `stop`; a file that is
/// now wrong is logged and the tokens in use are kept.
async fn reload_on_hangup(access: Arc<Access>, stop: tokio_util::sync::CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP: the tokens file will not be re-read");
                return;
            }
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            match access.reload() {
                Ok(callers) => tracing::info!(callers, "tokens reloaded"),
                Err(error) => {
                    tracing::error!(%error, "tokens not reloaded; the ones in use are kept");
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (access, stop);
    }
}
