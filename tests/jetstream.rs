//! The JetStream backend against a real nats-server started by the test
//! (see support/nats.rs for where the binary comes from).

#[path = "support/nats.rs"]
mod nats;
#[path = "support/temp_dir.rs"]
mod temp_dir;

use std::time::{Duration, Instant};

use eventsys::jetstream::{self, ConnectError, MIN_SERVER};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use nats::NatsServer;

const WITHIN: Duration = Duration::from_secs(3);

#[tokio::test]
async fn connects_to_a_current_server_and_reads_its_version() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let connection = jetstream::connect(&server.url, WITHIN)
        .await
        .expect("connect");
    assert!(connection.version >= MIN_SERVER, "{}", connection.version);
    connection
        .jetstream
        .query_account()
        .await
        .expect("JetStream answers");
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_within_the_time_given() {
    // A port nothing listens on: bound, then released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let error = jetstream::connect(&url, WITHIN).await.expect_err("refused");
    assert!(started.elapsed() < WITHIN + Duration::from_secs(1));
    assert!(matches!(error, ConnectError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains(&url), "{error}");
}

/// A listener that speaks just enough of the NATS protocol to be connected
/// to, claiming to be `version`.
async fn pretend_server(version: &'static str, jetstream: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let info = serde_json::json!({
                    "server_id": "pretend", "server_name": "pretend",
                    "version": version, "go": "go1", "host": "127.0.0.1",
                    "port": addr.port(), "headers": true, "max_payload": 1048576,
                    "proto": 1, "jetstream": jetstream,
                });
                let hello = format!("INFO {info}\r\n");
                if write.write_all(hello.as_bytes()).await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("PING") && write.write_all(b"PONG\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("nats://{addr}")
}

#[tokio::test]
async fn a_server_too_old_is_refused_naming_both_versions() {
    let url = pretend_server("2.9.10", true).await;
    let error = jetstream::connect(&url, WITHIN).await.expect_err("refused");
    assert!(matches!(error, ConnectError::TooOld { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("2.9.10"), "{text}");
    assert!(text.contains(&MIN_SERVER.to_string()), "{text}");
}

#[tokio::test]
async fn a_server_without_jetstream_is_refused() {
    let url = pretend_server("2.15.1", false).await;
    let error = jetstream::connect(&url, WITHIN).await.expect_err("refused");
    assert!(matches!(error, ConnectError::NoJetStream { .. }), "{error}");
    let Some(server) = NatsServer::start_with(&[]) else {
        return;
    };
    let error = jetstream::connect(&server.url, WITHIN)
        .await
        .expect_err("refused");
    assert!(matches!(error, ConnectError::NoJetStream { .. }), "{error}");
}
