//! A test app driven in-process with `oneshot`: no ports, no sleeps.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use eventsys::{App, Config};

use crate::nats::NatsServer;
use crate::temp_dir::TempDir;

pub struct TestApp {
    pub app: App,
    router: Router,
    /// With `EVENTSYS_TEST_STORAGE=disk`: the app's data directory.
    _dir: Option<TempDir>,
    /// With `EVENTSYS_TEST_STORAGE=nats`: the app's own nats-server.
    _nats: Option<NatsServer>,
}

/// Where the suite keeps the pipeline: in memory (the default), on a data
/// directory (`EVENTSYS_TEST_STORAGE=disk`) or on NATS JetStream
/// (`EVENTSYS_TEST_STORAGE=nats`, each test on a nats-server of its own;
/// see ../support/nats.rs for where the binary comes from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Memory,
    Disk,
    Nats,
}

pub fn storage() -> Storage {
    match std::env::var("EVENTSYS_TEST_STORAGE").as_deref() {
        Ok("disk") => Storage::Disk,
        Ok("nats") => Storage::Nats,
        Ok("memory") | Err(_) => Storage::Memory,
        Ok(other) => {
            panic!("EVENTSYS_TEST_STORAGE is `memory`, `disk` or `nats`, not `{other}`")
        }
    }
}

/// Whether the suite runs on NATS JetStream.
pub fn on_nats() -> bool {
    storage() == Storage::Nats
}

/// A response, with the body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts this is a problem+json error with `status` and returns it.
    pub fn problem(&self, status: u16) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "body: {}",
            self.text
        );
        for member in ["type", "title", "status", "detail"] {
            assert!(
                self.body.get(member).is_some(),
                "problem without `{member}`: {}",
                self.text
            );
        }
        assert_eq!(self.body["status"], status);
        &self.body
    }

    pub fn ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.text);
        &self.body
    }
}

/// Test defaults: fast encodes and retries, so tests settle quickly.
pub fn test_config() -> Config {
    Config {
        encode_delay_ms: 2,
        retry_base_ms: 2,
        retry_max_ms: 20,
        breaker_cooldown_ms: 20,
        ..Config::default()
    }
}

impl TestApp {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        let mut nats = None;
        let dir = match storage() {
            Storage::Memory => None,
            Storage::Disk => Some(TempDir::new()),
            Storage::Nats => {
                let server = NatsServer::start()
                    .expect("EVENTSYS_TEST_STORAGE=nats needs a nats-server (see above)");
                config.nats_url = Some(server.url.clone());
                nats = Some(server);
                None
            }
        };
        config.data_dir = dir.as_ref().map(|d| d.0.clone());
        adjust(&mut config);
        let app = match App::connect(config).await {
            Ok(app) => app,
            Err(error) => panic!("cannot start: {error}"),
        };
        let router = app.router();
        Self {
            app,
            router,
            _dir: dir,
            _nats: nats,
        }
    }

    /// In memory whatever the suite runs on: for a test on paused time that
    /// times requests out, since paused time jumps ahead while a request
    /// waits for the log's writer thread.
    pub fn in_memory_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        adjust(&mut config);
        let app = App::start(config);
        let router = app.router();
        Self {
            app,
            router,
            _dir: None,
            _nats: None,
        }
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        let body = match body {
            Some(value) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(value.to_string())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(&body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(&body)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None).await
    }

    /// Waits (via `/settle`) until the pipeline has nothing left to do.
    pub async fn settle(&self) {
        let reply = self.get("/settle?timeout_ms=60000").await;
        if reply.status != StatusCode::OK {
            let queues = self.get("/queues").await;
            panic!("did not settle: {}\nqueues: {}", reply.text, queues.text);
        }
    }

    /// Every live record id of `table`, paging through.
    pub async fn ids(&self, table: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/tables/{table}?limit=1000&after={a}"),
                None => format!("/tables/{table}?limit=1000"),
            };
            let page = self.get(&path).await;
            let body = page.ok();
            ids.extend(
                body["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["id"].as_str().unwrap().to_string()),
            );
            match body["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => return ids,
            }
        }
    }

    /// `count` of a table from `GET /tables`.
    pub async fn count(&self, table: &str) -> u64 {
        let tables = self.get("/tables").await;
        tables.ok()["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == table)
            .unwrap_or_else(|| panic!("no table {table}"))["count"]
            .as_u64()
            .unwrap()
    }

    /// A queue's entry from `GET /queues`.
    pub async fn queue(&self, name: &str) -> Value {
        let queues = self.get("/queues").await;
        queues.ok()["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no queue {name}"))
    }

    pub async fn record(&self, table: &str, id: &str) -> Option<Value> {
        let reply = self.get(&format!("/tables/{table}/{id}")).await;
        (reply.status == StatusCode::OK).then(|| reply.body["data"].clone())
    }

    /// Outcomes of a POST, in order.
    pub async fn outcomes(&self, kind: &str, body: Value) -> Vec<String> {
        let reply = self.post(&format!("/raw/{kind}"), body).await;
        reply.ok()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["outcome"].as_str().unwrap().to_string())
            .collect()
    }
}
