//! The `eventsys` binary: flags, logging, and serving until a signal.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use eventsys::config::LogFormat;
use eventsys::{App, Config};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Pretty => logs.init(),
    }

    // Recovery comes first: the port opens only on a whole pipeline.
    let addr = config.addr;
    let app = match App::connect(config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let scheme = if app.tls() { "https" } else { "http" };
    tracing::info!(%addr, "eventsys listening on {scheme}://{addr}");
    let left = eventsys::serve(listener, app, shutdown_signal()).await?;
    if left > 0 {
        tracing::warn!(left, "stopped with events unfinished");
    } else {
        tracing::info!("stopped cleanly");
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
