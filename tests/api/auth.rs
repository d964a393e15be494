//! Access control (API.md, "Access control"): every route and every role,
//! producers held to their sources, the loopback-only guard of a server
//! without tokens, and the audit trail of operator actions.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::helpers::{Reply, TestApp};
use crate::temp_dir::TempDir;

const READER: &str = "reader-token-0123456789";
const PRODUCER: &str = "producer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";
const CAMERA: &str = "camera-token-0123456789";

/// An app whose tokens file names a caller of each role, and a producer
/// held to `urn:camera:` sources.
async fn secured() -> (TestApp, TempDir) {
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("tokens");
    std::fs::write(
        &file,
        format!(
            "# name role token [source-prefix ...]\n\
             rita reader {READER}\npat producer {PRODUCER}\nola operator {OPERATOR}\n\
             cam producer {CAMERA} urn:camera: urn:cameras:\n"
        ),
    )
    .unwrap();
    let app = TestApp::with(|c| c.auth_tokens_file = Some(file)).await;
    (app, dir)
}

fn request(method: Method, path: &str, token: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    request.body(body).unwrap()
}

/// What a route needs, as API.md states it (independently of the server's
/// own rule, which this checks): `None` for the open ones.
fn needs(method: &Method, path: &str) -> Option<u8> {
    let open = [
        "/healthz",
        "/openapi.json",
        "/",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ];
    let reads = *method == Method::GET || *method == Method::HEAD;
    match (reads, path.starts_with("/raw/")) {
        (true, _) if open.contains(&path) => None,
        (true, _) => Some(1),
        (false, true) => Some(2),
        (false, false) => Some(3),
    }
}

/// Every route the router serves, with sample values in its parameters,
/// from the router's own declarations (the OpenAPI document and the
/// dashboard's paths), so that a route added later is checked too.
fn every_route() -> Vec<(Method, String)> {
    every_route_with_template()
        .into_iter()
        .map(|(method, _, path)| (method, path))
        .collect()
}

/// [`every_route`] with each route's template (`None` for the dashboard's,
/// which the OpenAPI document leaves out).
fn every_route_with_template() -> Vec<(Method, Option<String>, String)> {
    let sample = |template: &str| {
        template
            .replace("{kind}", "movies")
            .replace("{id}", "m1")
            .replace("{queue}", "raw_queue")
            .replace("{handler}", "raw_handler")
            .replace("{table}", "filmography")
            .replace("{video_id}", "v1")
    };
    let mut routes = Vec::new();
    let document = serde_json::to_value(eventsys::http::openapi()).unwrap();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                routes.push((method, Some(path.clone()), sample(path)));
            }
        }
    }
    for path in eventsys::http::dashboard_paths() {
        routes.push((Method::GET, None, path.to_string()));
    }
    assert!(routes.len() > 20, "{routes:?}");
    routes
}

/// The status and headers of a response, without reading a body that may
/// never end (the live stream).
async fn head(app: &TestApp, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap) {
    let response = app.app.router().oneshot(request).await.unwrap();
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn every_route_answers_each_role_as_api_md_says() {
    let (app, _dir) = secured().await;
    let callers = [
        (None, 0),
        (Some("not-a-known-token-at-all"), 0),
        (Some(READER), 1),
        (Some(PRODUCER), 2),
        (Some(OPERATOR), 3),
    ];
    for (method, path) in every_route() {
        let need = needs(&method, &path);
        for (token, rank) in callers {
            let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
            let (status, headers) =
                head(&app, request(method.clone(), &path, token, body.as_ref())).await;
            let what = format!("{method} {path} as rank {rank} ({token:?}): {status}");
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            match need {
                None => assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{what}: open routes need no token"
                ),
                Some(_) if rank == 0 => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                    let challenge = headers[header::WWW_AUTHENTICATE].to_str().unwrap();
                    assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
                    assert_eq!(content_type, "application/problem+json", "{what}");
                }
                Some(need) if rank < need => {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                    assert_eq!(content_type, "application/problem+json", "{what}");
                }
                Some(_) => assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{what}: the role allows it"
                ),
            }
        }
    }
}

#[test]
fn the_document_lists_401_and_403_where_a_role_is_needed() {
    let document = serde_json::to_value(eventsys::http::openapi()).unwrap();
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (method, template, path) in every_route_with_template() {
        let Some(template) = template else { continue };
        let operation = &document["paths"][&template][method.as_str().to_lowercase()];
        let responses = &operation["responses"];
        match needs(&method, &path) {
            None => assert!(
                responses.get("401").is_none(),
                "{method} {template} is open"
            ),
            Some(_) => {
                for status in ["401", "403"] {
                    assert!(
                        responses.get(status).is_some(),
                        "{method} {template}: no {status}"
                    );
                }
                assert!(operation["security"].is_array(), "{method} {template}");
            }
        }
    }
}

#[tokio::test]
async fn a_refusal_names_the_role_needed_and_stores_nothing() {
    let (app, _dir) = secured().await;
    let movie = json!({"id": "m1", "title": "Heat"});
    let reply = app
        .send(request(
            Method::POST,
            "/raw/movies",
            Some(READER),
            Some(&movie),
        ))
        .await;
    let detail = reply.problem(403)["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("rita") && detail.contains("producer"),
        "{detail}"
    );
    let reply = app
        .send(request(Method::POST, "/raw/movies", None, Some(&movie)))
        .await;
    assert!(
        reply.problem(401)["detail"]
            .as_str()
            .unwrap()
            .contains("Bearer")
    );
    let tables = app
        .send(request(Method::GET, "/tables", Some(READER), None))
        .await;
    for table in tables.ok()["tables"].as_array().unwrap() {
        assert_eq!(table["count"], 0, "{table}");
    }
    // The producer may write what the reader may not.
    let reply = app
        .send(request(
            Method::POST,
            "/raw/movies",
            Some(PRODUCER),
            Some(&movie),
        ))
        .await;
    assert_eq!(reply.ok()["results"][0]["outcome"], "inserted");
}

#[tokio::test]
async fn a_producer_held_to_sources_sends_only_cloudevents_from_them() {
    let (app, _dir) = secured().await;
    let event = |source: &str, id: &str| {
        json!({"specversion": "1.0", "id": id, "source": source, "type": "com.example.movie",
               "data": {"id": id, "title": "T"}})
    };
    let send = |content_type: &str, body: Value| {
        Request::builder()
            .method(Method::POST)
            .uri("/raw/movies")
            .header(header::AUTHORIZATION, format!("Bearer {CAMERA}"))
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    // Outside its prefixes, in each mode: refused whole, naming the source.
    let refused: [Request<Body>; 5] = [
        send("application/cloudevents+json", event("urn:studio:1", "m1")),
        send(
            "application/cloudevents-batch+json",
            json!([event("urn:camera:1", "m1"), event("urn:studio:1", "m2")]),
        ),
        Request::builder()
            .method(Method::POST)
            .uri("/raw/movies")
            .header(header::AUTHORIZATION, format!("Bearer {CAMERA}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("ce-specversion", "1.0")
            .header("ce-id", "m3")
            .header("ce-source", "urn:studio:1")
            .header("ce-type", "com.example.movie")
            .body(Body::from(json!({"id": "m3", "title": "T"}).to_string()))
            .unwrap(),
        send("application/json", json!({"id": "m4", "title": "T"})),
        send("application/json", json!([{"id": "m5", "title": "T"}])),
    ];
    for (n, request) in refused.into_iter().enumerate() {
        let reply = app.send(request).await;
        let detail = reply.problem(403)["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("urn:camera:"), "{n}: {detail}");
        if n < 3 {
            assert!(detail.contains("urn:studio:1"), "{n}: {detail}");
        }
    }
    let reconcile = json!({"records": []});
    let reply = app
        .send(request(
            Method::PUT,
            "/raw/movies",
            Some(CAMERA),
            Some(&reconcile),
        ))
        .await;
    reply.problem(403);
    let reply = app
        .send(request(
            Method::DELETE,
            "/raw/movies/m1",
            Some(CAMERA),
            None,
        ))
        .await;
    reply.problem(403);
    let tables = app
        .send(request(Method::GET, "/tables", Some(READER), None))
        .await;
    for table in tables.ok()["tables"].as_array().unwrap() {
        assert_eq!(table["count"], 0, "{table}");
    }
    assert_eq!(
        app.app.pipeline().engine.log.latest(),
        0,
        "no change at all"
    );

    // From its prefixes, in batch mode too: accepted.
    let reply = app
        .send(send(
            "application/cloudevents-batch+json",
            json!([event("urn:camera:7", "m1"), event("urn:cameras:8", "m2")]),
        ))
        .await;
    assert_eq!(reply.ok()["results"][1]["outcome"], "inserted");
}

#[tokio::test]
async fn without_tokens_only_loopback_pages_may_change_anything() {
    let app = TestApp::start().await;
    let movie = json!({"id": "m1", "title": "Heat"}).to_string();
    let post = |host: &str, origin: Option<&str>| {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/raw/movies")
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        request.body(Body::from(movie.clone())).unwrap()
    };
    for (host, origin) in [
        ("eventsys.example:8080", None),
        ("192.168.1.20:8080", None),
        ("127.0.0.1:8080", Some("https://evil.example")),
        ("127.0.0.1:8080", Some("http://127.0.0.1:9999")),
    ] {
        let reply = app.send(post(host, origin)).await;
        reply.problem(403);
    }
    // A body-less POST, as a cross-site form sends it, is refused the same.
    let redrive = Request::builder()
        .method(Method::POST)
        .uri("/queues/raw_queue/dead-letters/redrive")
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::ORIGIN, "http://evil.example")
        .body(Body::empty())
        .unwrap();
    app.send(redrive).await.problem(403);
    assert_eq!(app.app.pipeline().engine.log.latest(), 0, "nothing stored");
    // Reads are not changes: any page may make them (it cannot read the
    // answer without CORS, which the server does not grant).
    let read = Request::builder()
        .uri("/tables")
        .header(header::HOST, "eventsys.example")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(read).await.status, StatusCode::OK);
    // Its own pages may.
    for (host, origin) in [
        ("127.0.0.1:8080", Some("http://127.0.0.1:8080")),
        ("localhost:8080", None),
    ] {
        let reply = app.send(post(host, origin)).await;
        reply.ok();
    }
}

/// The audit records, oldest first.
async fn audit_trail(app: &TestApp, token: Option<&str>) -> Vec<Value> {
    let reply = app
        .send(request(
            Method::GET,
            "/tables/audit?limit=1000",
            token,
            None,
        ))
        .await;
    let mut records: Vec<Value> = reply.ok()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["data"].clone())
        .collect();
    records.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    records
}

fn with_request_id(mut request: Request<Body>, id: &str) -> Request<Body> {
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

#[tokio::test]
async fn every_operator_action_and_reconciliation_is_audited() {
    let (app, _dir) = secured().await;
    let op = Some(OPERATOR);
    let video = json!({"id": "v1", "title": "V", "renditions": [{"id": "r1", "codec": "h264", "height": 720}]});
    let fault = json!({"failure_rate": 1.0, "permanent": true});
    // What each step is, and what its record must say.
    let steps: Vec<(Request<Body>, &str, &str)> = vec![
        (
            request(Method::PUT, "/faults/encode_handler", op, Some(&fault)),
            "fault.set",
            "encode_handler",
        ),
        (
            request(Method::POST, "/raw/videos", op, Some(&video)),
            "",
            "",
        ),
        (
            request(Method::DELETE, "/faults/encode_handler", op, None),
            "fault.clear",
            "encode_handler",
        ),
        (
            request(Method::POST, "/publications/v1/retry", op, None),
            "saga.retry",
            "v1",
        ),
        (
            request(
                Method::POST,
                "/queues/encode_queue/dead-letters/redrive",
                op,
                None,
            ),
            "dead_letters.redrive",
            "encode_queue",
        ),
        (
            request(Method::DELETE, "/queues/raw_queue/dead-letters", op, None),
            "dead_letters.discard",
            "raw_queue",
        ),
        (
            request(
                Method::POST,
                "/queues/raw_queue/replay",
                op,
                Some(&json!({"after": 0})),
            ),
            "replay",
            "raw_queue",
        ),
        (
            request(Method::POST, "/tables/filmography/rebuild", op, None),
            "rebuild",
            "filmography",
        ),
        (
            request(
                Method::PUT,
                "/raw/actors",
                Some(PRODUCER),
                Some(&json!({"records": [{"id": "a1", "name": "A"}]})),
            ),
            "reconcile",
            "actors",
        ),
    ];
    let mut expected = Vec::new();
    for (n, (request, action, target)) in steps.into_iter().enumerate() {
        let id = format!("step-{n}");
        let reply = app.send(with_request_id(request, &id)).await;
        assert!(reply.status.is_success(), "step {n}: {}", reply.text);
        if !action.is_empty() {
            expected.push((action, target, id, reply.status.as_u16()));
        }
        // The saga compensates before the retry.
        let settle = request_settle();
        app.send(settle).await.ok();
    }
    // A refusal on authority stores nothing, no record either.
    let refused = app
        .send(request(
            Method::POST,
            "/queues/raw_queue/dead-letters/redrive",
            Some(PRODUCER),
            None,
        ))
        .await;
    refused.problem(403);

    let trail = audit_trail(&app, Some(READER)).await;
    let seen: Vec<(&str, &str, String, u16)> = trail
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["target"].as_str().unwrap(),
                r["request_id"].as_str().unwrap().to_string(),
                r["result"]["status"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    assert_eq!(seen, expected, "{trail:#?}");
    let who: Vec<&str> = trail.iter().map(|r| r["who"].as_str().unwrap()).collect();
    let mut operators = vec!["ola"; trail.len() - 1];
    operators.push("pat");
    assert_eq!(who, operators);
    assert_eq!(trail.len(), 8);
    assert_eq!(
        trail[2]["result"]["body"]["jobs"], 1,
        "the retry's answer is kept"
    );
    for record in &trail {
        assert!(record["at"].is_string(), "{record}");
    }
    // Each record is a change in the log, as any table's are.
    let events = app
        .send(request(
            Method::GET,
            "/events?table=audit&limit=100",
            Some(READER),
            None,
        ))
        .await;
    assert_eq!(events.ok()["events"].as_array().unwrap().len(), trail.len());
}

fn request_settle() -> Request<Body> {
    request(
        Method::GET,
        "/settle?timeout_ms=30000",
        Some(OPERATOR),
        None,
    )
}

#[tokio::test]
async fn without_tokens_actions_are_audited_as_anonymous() {
    let app = TestApp::start().await;
    app.put("/faults/raw_handler", json!({"failure_rate": 0.5}))
        .await
        .ok();
    // Refused as malformed: nothing stored, no record either.
    let bad: Reply = app
        .put("/faults/raw_handler", json!({"failure_rate": 7}))
        .await;
    bad.problem(400);
    let trail = audit_trail(&app, None).await;
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(trail[0]["who"], "anonymous");
    assert_eq!(trail[0]["action"], "fault.set");
}

#[test]
fn the_readme_lists_every_route_with_its_role() {
    let table = eventsys::http::auth::route_table();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&table),
        "README.md's table of routes and roles is not the router's; put this in its place:\n{table}"
    );
}
