//! `GET /openapi.json`: an OpenAPI 3.x document that describes every route
//! the router serves, with exactly its methods.
//!
//! A hand-kept list of routes to compare with would drift just as a
//! hand-kept document would, so the test takes the routes from the two
//! places they really come from, and checks both directions:
//!
//! 1. Document to router: every (method, path) the document lists is sent
//!    to the real router, with each `{param}` filled in. It must reach a
//!    handler: neither a 405 nor the fallback's 404 "no such route" (a
//!    handler's own 404, such as an unknown kind, is fine).
//! 2. Router to document, on the documented paths: every other method on
//!    each documented path must get 405, so the router serves no method
//!    there that the document leaves out.
//! 3. Router to document, on other paths: routes that bypass utoipa-axum's
//!    `routes!` can only be added with axum's `.route(...)` (or
//!    `.route_service`, `.nest`, `.nest_service`) somewhere in the source,
//!    so the test reads every file under `src/` and requires each
//!    `.route("<path>", <methods>)` to be in the document with those
//!    methods. The one exception is the dashboard (`src/http/dashboard.rs`):
//!    HTML, JavaScript and CSS for people, deliberately not part of the API
//!    document, and each of its routes is checked to serve exactly that
//!    (GET, 200, a non-JSON type). `.nest` and `.nest_service` fail the test,
//!    since the scan cannot tell which paths they add.
//!
//! Routes declared with `routes!` are in the document by construction;
//! 1 and 2 check that the router agrees.
//!
//! Beyond coverage, the document must be right about what it says: every
//! `$ref` resolves, every `{param}` is declared, and the replies of a run
//! through every operation (successes and the documented errors) have a
//! documented status and media type and match their schemas.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::helpers::{Reply, TestApp};

/// The methods checked; HEAD is left out because axum answers it on every
/// GET route, and OPTIONS and TRACE are served nowhere.
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// The file whose routes are the dashboard's, not the API's.
const DASHBOARD: &str = "src/http/dashboard.rs";

/// Path template to methods, as the document lists them.
fn documented(spec: &Value) -> BTreeMap<String, BTreeSet<String>> {
    spec["paths"]
        .as_object()
        .expect("`paths` is an object")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .expect("a path item is an object")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// A concrete path for a template: every `{param}` becomes `probe`.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "probe"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// What the router does with a bodiless request. The body is read only
/// for errors: `/events/stream` would never end.
async fn probe(app: &TestApp, method: &str, path: &str) -> (StatusCode, String, String) {
    let request = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method"))
        .uri(path)
        .body(Body::empty())
        .expect("a request");
    let response = app
        .app
        .router()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let detail = if status.is_client_error() {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        body["detail"].as_str().unwrap_or_default().to_string()
    } else {
        String::new()
    };
    (status, content_type, detail)
}

#[tokio::test]
async fn the_document_is_openapi_3_and_describes_this_server() {
    let app = TestApp::start().await;

    let reply = app.get("/openapi.json").await;

    let spec = reply.ok();
    assert!(reply.content_type().starts_with("application/json"));
    let version = spec["openapi"].as_str().expect("an `openapi` version");
    assert!(version.starts_with("3."), "OpenAPI {version}");
    assert_eq!(spec["info"]["title"], "eventsys");
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(spec["info"]["description"].as_str().is_some());
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let app = TestApp::start().await;
    let spec = app.get("/openapi.json").await.ok().clone();

    for (template, methods) in documented(&spec) {
        let path = concrete(&template);
        for method in &methods {
            let (status, _, detail) = probe(&app, method, &path).await;
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {template} is documented but not served"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND && detail == "no such route"),
                "{method} {template} is documented but not routed"
            );
        }
    }
}

#[tokio::test]
async fn no_undocumented_method_is_served_on_a_documented_path() {
    let app = TestApp::start().await;
    let spec = app.get("/openapi.json").await.ok().clone();

    for (template, methods) in documented(&spec) {
        let path = concrete(&template);
        for method in METHODS.iter().filter(|m| !methods.contains(**m)) {
            let (status, _, _) = probe(&app, method, &path).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {template} is served but not documented"
            );
        }
    }
}

#[tokio::test]
async fn every_route_in_the_source_is_documented_except_the_dashboard() {
    let app = TestApp::start().await;
    let spec = app.get("/openapi.json").await.ok().clone();
    let documented = documented(&spec);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    let routes = source_routes(&root.join("src"), root);

    // The scan sees the routes it must: the dashboard is served at `/`.
    assert!(
        routes.iter().any(|r| r.file == DASHBOARD && r.path == "/"),
        "the scan found no dashboard route: {routes:?}"
    );
    for route in &routes {
        if route.file == DASHBOARD {
            assert_eq!(route.methods, ["get"], "dashboard route {route:?}");
            let (status, content_type, _) = probe(&app, "get", &route.path).await;
            assert_eq!(status, StatusCode::OK, "{route:?}");
            assert!(
                content_type.starts_with("text/"),
                "the dashboard is left out of the API document as a page and its \
                 assets, but {} serves `{content_type}`",
                route.path
            );
            continue;
        }
        let served = documented.get(&route.path).unwrap_or_else(|| {
            panic!(
                "{} routes {} with plain `.route(...)` and /openapi.json does not describe it: \
                 declare it with `routes!` and `#[utoipa::path]` in src/http/mod.rs",
                route.file, route.path
            )
        });
        for method in &route.methods {
            assert!(
                served.contains(method),
                "{} routes {method} {} but /openapi.json does not describe it",
                route.file,
                route.path
            );
        }
    }
}

#[tokio::test]
async fn the_document_is_self_consistent() {
    let app = TestApp::start().await;
    let spec = app.get("/openapi.json").await.ok().clone();
    let schemas = spec["components"]["schemas"]
        .as_object()
        .expect("component schemas");

    // Every `$ref` names a component schema.
    let mut refs = Vec::new();
    collect_refs(&spec, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
        assert!(schemas.contains_key(name), "dangling $ref {reference}");
    }

    let mut operation_ids = BTreeSet::new();
    for (template, item) in spec["paths"].as_object().expect("paths") {
        let params: Vec<&str> = template
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        for (method, operation) in item.as_object().expect("a path item") {
            let what = format!("{method} {template}");
            let id = operation["operationId"].as_str().expect("an operationId");
            assert!(
                operation_ids.insert(id.to_string()),
                "{what}: `{id}` reused"
            );
            assert!(
                operation["summary"].as_str().is_some(),
                "{what}: no summary"
            );

            // Every `{param}` of the path is declared as a path parameter.
            let declared: Vec<&str> = operation["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(declared, params, "{what}: path parameters");

            // A success, and every error as problem+json.
            let responses = operation["responses"].as_object().expect("responses");
            assert!(responses.contains_key("200"), "{what}: no 200");
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        response["content"]["application/problem+json"].is_object(),
                        "{what}: {status} is not problem+json"
                    );
                }
            }
        }
    }
}

/// Sends requests and checks each reply against what the document says
/// that operation answers with that status.
struct Conformance {
    app: TestApp,
    spec: Value,
}

impl Conformance {
    async fn start(adjust: impl FnOnce(&mut eventsys::Config)) -> Self {
        let app = TestApp::with(adjust).await;
        let spec = app.get("/openapi.json").await.ok().clone();
        Self { app, spec }
    }

    /// Sends `method path` with an optional body of `content_type`, and
    /// checks the reply against the operation at `template`.
    async fn check(
        &self,
        method: Method,
        template: &str,
        path: &str,
        body: Option<(&str, Value)>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = Request::builder().method(method.clone()).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some((content_type, value)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                Body::from(value.to_string())
            }
            None => Body::empty(),
        };
        let reply = self.app.send(request.body(body).expect("a request")).await;
        let what = format!("{method} {path} -> {}", reply.status);
        let operation = &self.spec["paths"][template][method.as_str().to_lowercase()];
        assert!(operation.is_object(), "{what}: no operation {template}");
        let response = &operation["responses"][reply.status.as_str()];
        assert!(response.is_object(), "{what}: status not documented");
        // Media types compare without their parameters.
        let essence = |media: &str| media.split(';').next().unwrap_or("").trim().to_string();
        let media = essence(reply.content_type());
        let content = response["content"]
            .as_object()
            .and_then(|c| c.iter().find(|(key, _)| essence(key) == media))
            .map(|(_, content)| content)
            .unwrap_or_else(|| panic!("{what}: `{media}` not documented"));
        if media.ends_with("json") {
            let mut errors = Vec::new();
            violations(
                &self.spec,
                &content["schema"],
                &reply.body,
                "$",
                &mut errors,
            );
            assert!(errors.is_empty(), "{what}: {errors:#?}\n{}", reply.text);
        }
        reply
    }

    async fn get(&self, template: &str, path: &str) -> Reply {
        self.check(Method::GET, template, path, None, &[]).await
    }

    /// A write to `/raw/{kind}` that must succeed.
    async fn write(&self, method: Method, path: &str, content_type: &str, body: Value) {
        let body = Some((content_type, body));
        self.check(method, RAW, path, body, &[]).await.ok();
    }
}

const RAW: &str = "/raw/{kind}";
const JSON: &str = "application/json";
const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

#[tokio::test]
async fn replies_are_what_the_document_says() {
    let api = Conformance::start(|_| {}).await;
    let event = |id: &str, record: Value| {
        json!({"specversion": "1.0", "id": id, "source": "/vendors/acme",
               "type": "com.acme.movie", "data": record})
    };

    // Writes in every form ingest takes, with each outcome: a bad movie
    // (for raw_queue's dead letters), an unchanged re-send, children, a
    // CloudEvent duplicate, a reconciliation and a delete.
    let movies = json!([
        {"id": "m1", "title": "Alien", "updated_at": "2024-01-01T00:00:00Z"},
        {"id": "m2", "title": ""}
    ]);
    api.write(Method::POST, "/raw/movies", JSON, movies.clone())
        .await;
    api.write(Method::POST, "/raw/movies", JSON, movies).await;
    let video = json!({"id": "v1", "title": "V", "duration_s": 10.5, "renditions":
        [{"id": "r1", "codec": "h264", "height": 720, "bitrate_kbps": 3000}]});
    api.write(Method::POST, "/raw/videos", JSON, video).await;
    let series = json!({"id": "s1", "title": "S", "episodes": [{"id": "e1", "title": "E"}]});
    api.write(Method::POST, "/raw/series", JSON, series).await;
    let structured = event("c1", json!({"id": "m3", "title": "X"}));
    api.write(Method::POST, "/raw/movies", STRUCTURED, structured.clone())
        .await;
    api.write(Method::POST, "/raw/movies", STRUCTURED, structured)
        .await;
    let batch = json!([event("c2", json!({"id": "m4", "title": "Y"}))]);
    api.write(Method::POST, "/raw/movies", BATCH, batch).await;
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "c3"),
        ("ce-source", "/vendors/acme"),
        ("ce-type", "com.acme.movie"),
    ];
    let record = Some((JSON, json!({"id": "m5", "title": "Z"})));
    api.check(Method::POST, RAW, "/raw/movies", record, &binary)
        .await
        .ok();
    let set = json!({"as_of": "2030-01-01T00:00:00Z", "records": [{"id": "a1", "name": "A"}]});
    api.write(Method::PUT, "/raw/actors", JSON, set).await;
    api.check(
        Method::DELETE,
        "/raw/{kind}/{id}",
        "/raw/movies/m1",
        None,
        &[],
    )
    .await
    .ok();
    api.get("/settle", "/settle").await.ok();

    // Everything there is to read.
    for path in [
        "/tables",
        "/queues",
        "/handlers",
        "/faults",
        "/topology",
        "/healthz",
        "/metrics",
        "/openapi.json",
    ] {
        api.get(path, path).await.ok();
    }
    api.get("/tables/{table}", "/tables/movies?limit=1")
        .await
        .ok();
    api.get("/tables/{table}", "/tables/encodes").await.ok();
    let record = "/tables/{table}/{id}";
    api.get(record, "/tables/raw_movies/m3").await.ok();
    api.get("/events", "/events?limit=1000").await.ok();
    let letters = "/queues/{queue}/dead-letters";
    let dead = api.get(letters, "/queues/raw_queue/dead-letters").await;
    assert_eq!(dead.ok()["dead_letters"].as_array().map(Vec::len), Some(1));

    // A fault sends an encode job to dead letters; then redrive and discard.
    let fault = "/faults/{handler}";
    let permanent = Some((JSON, json!({"failure_rate": 1.0, "permanent": true})));
    api.check(Method::PUT, fault, "/faults/encode_handler", permanent, &[])
        .await
        .ok();
    api.get(fault, "/faults/encode_handler").await.ok();
    api.get("/faults", "/faults").await.ok();
    let video = json!({"id": "v2", "title": "W", "renditions":
        [{"id": "r1", "codec": "av1", "height": 1080}]});
    api.write(Method::POST, "/raw/videos", JSON, video).await;
    api.get("/settle", "/settle").await.ok();
    let dead = api.get(letters, "/queues/encode_queue/dead-letters").await;
    assert_eq!(dead.ok()["dead_letters"].as_array().map(Vec::len), Some(1));
    api.check(Method::DELETE, fault, "/faults/encode_handler", None, &[])
        .await
        .ok();
    let redrive = "/queues/{queue}/dead-letters/redrive";
    let path = "/queues/encode_queue/dead-letters/redrive";
    api.check(Method::POST, redrive, path, None, &[]).await.ok();
    let path = "/queues/raw_queue/dead-letters";
    api.check(Method::DELETE, letters, path, None, &[])
        .await
        .ok();

    // The documented errors.
    api.get(record, "/tables/movies/nope").await.problem(404);
    api.get("/tables/{table}", "/tables/movies?limit=0")
        .await
        .problem(400);
    api.get("/settle", "/settle?timeout_ms=600001")
        .await
        .problem(400);
    let anything = json!({"id": "x"});
    let cases = [
        ("/raw/nope", JSON, anything.clone(), &[][..], 404),
        ("/raw/movies", JSON, json!({"title": "x"}), &[], 400),
        ("/raw/movies", "text/plain", anything.clone(), &[], 415),
        (
            "/raw/movies",
            JSON,
            anything,
            &[("if-match", "\"2020-01-01T00:00:00Z\"")],
            412,
        ),
    ];
    for (path, content_type, body, headers, status) in cases {
        api.check(Method::POST, RAW, path, Some((content_type, body)), headers)
            .await
            .problem(status);
    }
}

#[tokio::test]
async fn limits_and_lost_cursors_are_what_the_document_says() {
    let api = Conformance::start(|c| {
        c.event_retention = 2;
        c.body_limit_bytes = 64;
    })
    .await;

    let big = json!({"id": "m1", "title": "x".repeat(100)});
    let reply = api.check(Method::POST, RAW, "/raw/movies", Some((JSON, big)), &[]);
    reply.await.problem(413);
    for i in 0..3 {
        let movie = json!({"id": format!("m{i}"), "title": "T"});
        api.write(Method::POST, "/raw/movies", JSON, movie).await;
    }
    api.get("/settle", "/settle").await.ok();
    api.get("/events", "/events?after=1").await.problem(410);
}

#[test]
fn the_reply_checker_finds_what_breaks_a_schema() {
    let spec = json!({"components": {"schemas": {
        "Id": {"type": "string"},
        "Thing": {"type": "object", "required": ["id"], "additionalProperties": false,
                  "properties": {"id": {"$ref": "#/components/schemas/Id"},
                                 "n": {"type": "integer", "minimum": 0},
                                 "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
                                 "next": {"oneOf": [{"$ref": "#/components/schemas/Id"},
                                                    {"type": "null"}]}}}
    }}});
    let thing = json!({"$ref": "#/components/schemas/Thing"});
    let check = |value: Value| {
        let mut errors = Vec::new();
        violations(&spec, &thing, &value, "$", &mut errors);
        errors
    };

    assert!(check(json!({"id": "t", "n": 1, "tags": ["a"], "next": null})).is_empty());
    for wrong in [
        json!({"n": 1}),
        json!({"id": 1}),
        json!({"id": "t", "n": -1}),
        json!({"id": "t", "tags": ["c"]}),
        json!({"id": "t", "next": 5}),
        json!({"id": "t", "extra": true}),
        json!([]),
    ] {
        assert_eq!(check(wrong.clone()).len(), 1, "{wrong}");
    }
}

/// Where `value` breaks `schema`, for the parts of JSON Schema the
/// document uses: `$ref`, `allOf`, `oneOf`, `type`, `enum`, `required`,
/// `properties`, `additionalProperties`, `items` and `minimum`.
fn violations(spec: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &spec["components"]["schemas"][name];
        assert!(target.is_object(), "dangling $ref {reference}");
        return violations(spec, target, value, at, out);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            violations(spec, part, value, at, out);
        }
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let matching = one
            .iter()
            .filter(|option| {
                let mut errors = Vec::new();
                violations(spec, option, value, at, &mut errors);
                errors.is_empty()
            })
            .count();
        if matching != 1 {
            out.push(format!("{at}: matches {matching} of `oneOf`: {value}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| is_type(value, t)) {
        out.push(format!("{at}: {value} is not {types:?}"));
        return;
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(value)
    {
        out.push(format!("{at}: {value} is not one of {values:?}"));
    }
    if let (Some(minimum), Some(number)) = (schema["minimum"].as_f64(), value.as_f64())
        && number < minimum
    {
        out.push(format!("{at}: {number} is below {minimum}"));
    }
    if let Value::Object(members) = value {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if !members.contains_key(name) {
                out.push(format!("{at}: `{name}` is missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (name, member) in members {
            let at = format!("{at}.{name}");
            match properties.and_then(|p| p.get(name)) {
                Some(property) => violations(spec, property, member, &at, out),
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => out.push(format!("{at}: not allowed")),
                    extra @ Value::Object(_) => violations(spec, extra, member, &at, out),
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for (i, element) in items.iter().enumerate() {
            violations(spec, item, element, &format!("{at}[{i}]"), out);
        }
    }
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

fn collect_refs<'a>(value: &'a Value, refs: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                refs.push(reference);
            }
            map.values().for_each(|v| collect_refs(v, refs));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
        _ => {}
    }
}

#[test]
fn the_source_scan_finds_plain_routes_and_their_methods() {
    let source = r#"
        // .route("/commented-out", get(x))
        Router::new()
            .route("/a/{id}", get(a::show).put(a::replace))
            .route(
                "/b",
                axum::routing::delete(|headers: HeaderMap| async move { headers.get("x"); }),
            )
    "#;

    let routes = routes_in(source, "example.rs");

    let found: Vec<(&str, Vec<&str>)> = routes
        .iter()
        .map(|r| {
            (
                r.path.as_str(),
                r.methods.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [("/a/{id}", vec!["get", "put"]), ("/b", vec!["delete"])]
    );
}

/// A route registered with axum's own `.route(...)`.
#[derive(Debug)]
struct SourceRoute {
    /// Relative to the package root, with `/`.
    file: String,
    path: String,
    methods: Vec<String>,
}

/// Every `.route(...)` in the `.rs` files under `dir`.
fn source_routes(dir: &Path, root: &Path) -> Vec<SourceRoute> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    files.sort();
    files
        .iter()
        .flat_map(|file| {
            let source = std::fs::read_to_string(file).expect("a readable source file");
            let name = file
                .strip_prefix(root)
                .expect("under the package root")
                .to_string_lossy()
                .replace('\\', "/");
            routes_in(&source, &name)
        })
        .collect()
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a readable directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The routes one source file registers with axum directly. Comment lines
/// are skipped; a call whose path is not a string literal, or whose
/// methods cannot be told (`any`, `on`), fails the test rather than being
/// passed over.
fn routes_in(source: &str, file: &str) -> Vec<SourceRoute> {
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for call in [".nest(", ".nest_service("] {
        assert!(
            !code.contains(call),
            "{file} uses `{call}...)`, whose routes this test cannot see; extend it"
        );
    }
    let mut routes = Vec::new();
    for call in [".route(", ".route_service("] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(call) {
            let args = &rest[at + call.len()..];
            let (path, methods) = route_call(args, file);
            routes.push(SourceRoute {
                file: file.to_string(),
                path,
                methods,
            });
            rest = args;
        }
    }
    routes
}

/// The path literal and the methods of one `.route(` call's arguments.
fn route_call(args: &str, file: &str) -> (String, Vec<String>) {
    let args = args.trim_start();
    let path = args
        .strip_prefix('"')
        .and_then(|a| a.split_once('"'))
        .map(|(path, _)| path.to_string())
        .unwrap_or_else(|| {
            panic!("{file}: a `.route(` whose path is not a string literal: {args:.60}")
        });
    // Walk the arguments to the call's closing parenthesis; a method is a
    // name called at the top level (`get(..)`, `.put(..)`,
    // `axum::routing::delete(..)`), not inside a handler.
    let mut methods = Vec::new();
    let mut depth = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut name = String::new();
    for c in args.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '{' | '[' => {
                if c == '(' && depth == 0 {
                    let method = name.strip_suffix("_service").unwrap_or(&name);
                    assert!(
                        !matches!(method, "any" | "on"),
                        "{file}: route {path} uses `{name}(...)`; this test cannot tell its methods"
                    );
                    if METHODS.contains(&method) || matches!(method, "head" | "options" | "trace") {
                        methods.push(method.to_string());
                    }
                }
                depth += 1;
            }
            ')' | '}' | ']' => {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            }
            _ => {}
        }
        if c.is_alphanumeric() || c == '_' {
            name.push(c);
        } else {
            name.clear();
        }
    }
    assert!(
        !methods.is_empty(),
        "{file}: route {path} has no method this test recognises"
    );
    (path, methods)
}
