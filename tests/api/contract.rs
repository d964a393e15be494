//! The edges of the contract: every 4xx is problem+json, names what is
//! wrong, and leaves nothing of the request stored.

use axum::body::Body;
use axum::http::{Method, Request, header};
use serde_json::json;

use crate::helpers::TestApp;

/// Nothing at all was written anywhere.
async fn assert_nothing_stored(app: &TestApp) {
    let tables = app.get("/tables").await;
    for table in tables.ok()["tables"].as_array().unwrap() {
        assert_eq!(table["count"], 0, "{} has records", table["name"]);
        let stats = &table["stats"];
        for outcome in ["inserted", "updated", "unchanged", "stale", "deleted"] {
            assert_eq!(stats[outcome], 0, "{} counted {outcome}", table["name"]);
        }
    }
    assert_eq!(
        app.app.pipeline().engine.log.latest(),
        0,
        "the change log is empty"
    );
}

#[tokio::test]
async fn invalid_records_are_refused_whole_naming_index_and_field() {
    let app = TestApp::start().await;
    let cases = [
        (
            json!([{"id": "ok", "title": "A"}, {"title": "no id"}]),
            1,
            "id",
        ),
        (json!([{"id": "ok"}, {"id": "ok2"}, {"id": ""}]), 2, "id"),
        (json!([{"id": "a/b"}]), 0, "id"),
        (json!([{"id": "x".repeat(129)}]), 0, "id"),
        (json!([{"id": 12}]), 0, "id"),
        (
            json!([{"id": "ok", "updated_at": "tuesday"}]),
            0,
            "updated_at",
        ),
        (
            json!([{"id": "ok", "updated_at": 1700000000}]),
            0,
            "updated_at",
        ),
        (json!([{"id": "ok"}, "a string"]), 1, ""),
    ];
    for (body, index, field) in cases {
        let reply = app.post("/raw/movies", body.clone()).await;
        let problem = reply.problem(400);
        assert_eq!(problem["index"], index, "{body}: {}", reply.text);
        assert_eq!(problem["field"], field, "{body}: {}", reply.text);
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("record {index}"))
        );
    }
    let child_lists = [
        (
            "series",
            json!({"id": "s", "episodes": [{"id": "e1"}, {"title": "no id"}]}),
            "episodes[1].id",
        ),
        (
            "series",
            json!({"id": "s", "episodes": "e1,e2"}),
            "episodes",
        ),
        (
            "videos",
            json!({"id": "v", "renditions": [7]}),
            "renditions[0]",
        ),
    ];
    for (kind, body, field) in child_lists {
        let reply = app.post(&format!("/raw/{kind}"), body).await;
        assert_eq!(reply.problem(400)["field"], field);
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn bodies_that_are_not_record_json_are_refused() {
    let app = TestApp::start().await;
    for body in [
        "",
        "   ",
        "{",
        "[1,",
        "null",
        "42",
        "\"text\"",
        "{\"id\": \"a\"} trailing",
    ] {
        let reply = app
            .send(
                Request::post("/raw/movies")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await;
        reply.problem(400);
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let reply = app
        .send(
            Request::post("/raw/movies")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(deep))
                .unwrap(),
        )
        .await;
    reply.problem(400);
    let reply = app
        .send(
            Request::post("/raw/movies")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(vec![b'"', 0xff, 0xfe, b'"']))
                .unwrap(),
        )
        .await;
    reply.problem(400);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn unknown_things_are_404() {
    let app = TestApp::start().await;
    app.post("/raw/cartoons", json!({"id": "x"}))
        .await
        .problem(404);
    app.get("/tables/nope").await.problem(404);
    app.get("/tables/movies/absent").await.problem(404);
    app.get("/queues/nope/dead-letters").await.problem(404);
    app.call(Method::POST, "/queues/nope/dead-letters/redrive", None)
        .await
        .problem(404);
    app.get("/faults/nope").await.problem(404);
    app.put("/faults/nope", json!({"failure_rate": 0.1}))
        .await
        .problem(404);
    app.get("/no/such/route").await.problem(404);
    app.delete("/raw/cartoons/x").await.problem(404);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn wrong_methods_are_405() {
    let app = TestApp::start().await;
    app.call(Method::PATCH, "/tables", None).await.problem(405);
    app.call(Method::GET, "/raw/movies", None)
        .await
        .problem(405);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let app = TestApp::with(|c| c.body_limit_bytes = 1024).await;
    let big: Vec<_> = (0..100)
        .map(|i| json!({"id": format!("m{i}"), "title": "A title long enough"}))
        .collect();
    let too_big = app.post("/raw/movies", json!(big)).await;
    assert!(
        too_big.problem(413)["detail"]
            .as_str()
            .unwrap()
            .contains("1024 bytes"),
        "{}",
        too_big.text
    );
    app.put("/raw/movies", json!({"records": big}))
        .await
        .problem(413);
    assert_nothing_stored(&app).await;
    app.post("/raw/movies", json!({"id": "small", "title": "fits"}))
        .await
        .ok();
}

#[tokio::test]
async fn non_json_content_types_are_415() {
    let app = TestApp::start().await;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/xml"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = Request::post("/raw/movies");
        if let Some(ct) = content_type {
            request = request.header(header::CONTENT_TYPE, ct);
        }
        let reply = app
            .send(
                request
                    .body(Body::from(r#"{"id":"m1","title":"A"}"#))
                    .unwrap(),
            )
            .await;
        reply.problem(415);
    }
    let reply = app
        .send(
            Request::put("/raw/movies")
                .header(header::CONTENT_TYPE, "text/csv")
                .body(Body::from("id\nm1"))
                .unwrap(),
        )
        .await;
    reply.problem(415);
    assert_nothing_stored(&app).await;
    let charset = Request::post("/raw/movies")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8");
    app.send(
        charset
            .body(Body::from(r#"{"id":"m1","title":"A"}"#))
            .unwrap(),
    )
    .await
    .ok();
}

#[tokio::test]
async fn if_match_gives_optimistic_concurrency() {
    let app = TestApp::start().await;
    app.post(
        "/raw/movies",
        json!({"id": "m1", "title": "A", "updated_at": "2024-01-01T00:00:00Z"}),
    )
    .await
    .ok();
    let read = app.get("/tables/raw_movies/m1").await;
    let etag = read
        .headers
        .get(header::ETAG)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(etag, "\"2024-01-01T00:00:00Z\"");

    let update = |tag: &str, title: &str, at: &str| {
        Request::post("/raw/movies")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::IF_MATCH, tag)
            .body(Body::from(
                json!({"id": "m1", "title": title, "updated_at": at}).to_string(),
            ))
            .unwrap()
    };
    let first = app.send(update(&etag, "B", "2024-01-02T00:00:00Z")).await;
    assert_eq!(first.ok()["results"][0]["outcome"], "updated");
    let second = app.send(update(&etag, "C", "2024-01-03T00:00:00Z")).await;
    assert_eq!(
        second.problem(412)["current_version"],
        "2024-01-02T00:00:00Z"
    );
    assert_eq!(
        app.record("raw_movies", "m1").await.unwrap()["title"],
        "B",
        "nothing stored on 412"
    );

    // Any offset names the same instant.
    let offset = app
        .send(update(
            "\"2024-01-02T01:00:00+01:00\"",
            "D",
            "2024-01-04T00:00:00Z",
        ))
        .await;
    assert_eq!(offset.ok()["results"][0]["outcome"], "updated");
    // `*` needs a live record; an absent one fails.
    let absent = Request::post("/raw/movies")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::IF_MATCH, "*")
        .body(Body::from(
            json!({"id": "nobody", "title": "X"}).to_string(),
        ))
        .unwrap();
    app.send(absent).await.problem(412);
    assert!(app.record("raw_movies", "nobody").await.is_none());
    // A malformed tag, or a tag on a batch, is a 400.
    app.send(update("\"not a version\"", "E", "2024-01-05T00:00:00Z"))
        .await
        .problem(400);
    let batch = Request::post("/raw/movies")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::IF_MATCH, "*")
        .body(Body::from(json!([{"id": "m1", "title": "F"}]).to_string()))
        .unwrap();
    app.send(batch).await.problem(400);
    assert_eq!(app.record("raw_movies", "m1").await.unwrap()["title"], "D");
}

#[tokio::test]
async fn reconciliation_bodies_are_checked_before_anything_is_deleted() {
    let app = TestApp::start().await;
    app.post("/raw/actors", json!({"id": "a1", "name": "Keep me"}))
        .await
        .ok();
    app.settle().await;
    let cases = [
        (json!([{"id": "a2", "name": "x"}]), None),
        // The fields in order, as an array: serde would read it as the
        // struct, an empty set that deletes everything.
        (json!([null, []]), None),
        (json!({"as_of": "soon", "records": []}), None),
        (json!({"as_of": 5, "records": []}), None),
        (json!({"as_of": "2030-01-01T00:00:00Z"}), None),
        (
            json!({"as_of": "2030-01-01T00:00:00Z", "records": [], "extra": 1}),
            None,
        ),
        (
            json!({"as_of": "2030-01-01T00:00:00Z", "records": [{"id": "a2"}, {"id": ""}]}),
            Some("records[1].id"),
        ),
    ];
    for (body, field) in cases {
        let reply = app.put("/raw/actors", body.clone()).await;
        let problem = reply.problem(400);
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{}", reply.text);
        }
    }
    app.settle().await;
    assert_eq!(app.ids("raw_actors").await, ["a1"]);
    assert_eq!(app.ids("actors").await, ["a1"]);
}

#[tokio::test]
async fn deletes_report_their_outcome() {
    let app = TestApp::start().await;
    app.post(
        "/raw/movies",
        json!({"id": "m1", "title": "A", "updated_at": "2024-01-02T00:00:00Z"}),
    )
    .await
    .ok();
    let stale = app
        .delete("/raw/movies/m1?version=2024-01-01T00:00:00Z")
        .await;
    assert_eq!(stale.ok(), &json!({"id": "m1", "outcome": "stale"}));
    let deleted = app
        .delete("/raw/movies/m1?version=2024-01-02T00:00:00Z")
        .await;
    assert_eq!(deleted.ok(), &json!({"id": "m1", "outcome": "deleted"}));
    let absent = app.delete("/raw/movies/never").await;
    assert_eq!(absent.ok(), &json!({"id": "never", "outcome": "absent"}));
    app.delete("/raw/movies/m1?version=yesterday")
        .await
        .problem(400);
    app.delete("/raw/movies/m1?colour=blue").await.problem(400);
}

#[tokio::test]
async fn paging_walks_a_table_in_id_order() {
    let app = TestApp::start().await;
    let movies: Vec<_> = (0..250)
        .map(|i| json!({"id": format!("m{i:03}"), "title": "T"}))
        .collect();
    app.post("/raw/movies", json!(movies)).await.ok();
    let first = app.get("/tables/raw_movies?limit=100").await;
    let body = first.ok();
    assert_eq!(body["count"], 250);
    assert_eq!(body["records"].as_array().unwrap().len(), 100);
    assert_eq!(body["next"], "m099");
    let last = app.get("/tables/raw_movies?limit=100&after=m199").await;
    assert_eq!(last.ok()["records"].as_array().unwrap().len(), 50);
    assert_eq!(last.body["next"], json!(null));
    assert_eq!(app.ids("raw_movies").await.len(), 250);
    let capped = app.get("/tables/raw_movies?limit=5000").await;
    assert_eq!(capped.ok()["records"].as_array().unwrap().len(), 250);
    app.get("/tables/raw_movies?limit=0").await.problem(400);
    app.get("/tables/raw_movies?limit=-1").await.problem(400);
    app.get("/tables/raw_movies?limit=ten").await.problem(400);
}

#[tokio::test]
async fn inspection_endpoints_describe_the_pipeline() {
    let app = TestApp::start().await;
    let tables = app.get("/tables").await;
    let names: Vec<_> = tables.ok()["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(names.len(), 17);
    assert!(names.contains(&("audit".into(), "system".into())));
    assert!(names.contains(&("raw_series".into(), "raw".into())));
    assert!(names.contains(&("filmography".into(), "view".into())));
    assert!(names.contains(&("series_overview".into(), "view".into())));
    assert!(names.contains(&("publications".into(), "view".into())));
    assert!(names.contains(&("raw_series_episodes".into(), "raw".into())));
    assert!(names.contains(&("raw_videos_renditions".into(), "raw".into())));
    assert!(names.contains(&("encodes".into(), "standard".into())));

    let queues = app.get("/queues").await;
    for queue in queues.ok()["queues"].as_array().unwrap() {
        for field in [
            "name",
            "depth",
            "capacity",
            "in_flight",
            "enqueued",
            "processed",
            "retried",
            "failed",
            "dead_lettered",
        ] {
            assert!(queue.get(field).is_some(), "queue without {field}");
        }
    }
    let handlers = app.get("/handlers").await;
    let handlers = handlers.ok()["handlers"].as_array().unwrap().clone();
    assert_eq!(handlers.len(), 4);
    assert_eq!(handlers[0]["circuit"], "closed");
    assert_eq!(
        handlers[0]["workers"],
        app.app.pipeline().config().raw_workers as u64
    );

    let topology = app.get("/topology").await;
    let topology = topology.ok();
    // 16 tables beside audit, 4 queues, 4 handlers.
    assert_eq!(topology["nodes"].as_array().unwrap().len(), 16 + 4 + 4);
    assert_eq!(topology["scenarios"].as_array().unwrap().len(), 6);
    let edge = |from: &str, to: &str| {
        topology["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["from"] == from && e["to"] == to)
    };
    assert!(edge("raw_handler", "raw_episodes"), "the recursive edge");
    assert!(edge("encode_handler", "encodes"));
    assert!(
        edge("movies", "projection_queue"),
        "pub/sub: a second subscriber"
    );
    assert!(edge("projection_handler", "series_overview"));
    assert!(
        edge("encodes", "publication_queue"),
        "the saga hears of encodes"
    );
    assert!(edge("publication_handler", "encode_queue"), "a new attempt");
    assert_eq!(app.get("/healthz").await.ok()["status"], "ok");
    let page = app.get("/").await;
    assert!(page.text.contains("<html"), "the dashboard is served");
}

#[tokio::test]
async fn settle_answers_503_problem_when_it_times_out() {
    let app = TestApp::with(|c| c.encode_delay_ms = 60_000).await;
    app.post("/raw/videos", json!({"id": "v", "title": "Slow", "renditions": [{"id": "r", "codec": "h264", "height": 1}]})).await.ok();
    let reply = app.get("/settle?timeout_ms=50").await;
    let problem = reply.problem(503);
    assert_eq!(problem["settled"], false);
    assert!(problem["outstanding"].as_u64().unwrap() >= 1);
    app.get("/settle?timeout_ms=abc").await.problem(400);
    app.get("/settle?timeout_ms=99999999").await.problem(400);
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let app = TestApp::start().await;
    let given = app
        .send(
            Request::get("/healthz")
                .header("x-request-id", "trace-123")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(given.headers["x-request-id"], "trace-123");
    let made = app.get("/healthz").await;
    assert_eq!(made.headers["x-request-id"].len(), 36);
}

/// A request to `path` that would succeed if its query were right.
fn sensible_request(method: &Method, path: &str) -> Request<Body> {
    let body = match (method.as_str(), path) {
        ("POST", p) if p.starts_with("/raw/") => json!({"id": "a1", "name": "Ann"}).to_string(),
        ("PUT", p) if p.starts_with("/raw/") => {
            json!({"records": [{"id": "a1", "name": "Ann"}]}).to_string()
        }
        ("PUT", p) if p.starts_with("/faults/") => json!({"failure_rate": 1.0}).to_string(),
        _ => String::new(),
    };
    let mut request = Request::builder().method(method.clone()).uri(path);
    if !body.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    request.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn an_unknown_query_parameter_is_a_400_on_every_route() {
    let app = TestApp::start().await;
    let document = serde_json::to_value(eventsys::http::openapi()).unwrap();
    let mut routes: Vec<(Method, String)> = eventsys::http::dashboard_paths()
        .iter()
        .map(|p| (Method::GET, p.to_string()))
        .collect();
    for (template, operations) in document["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let path = template
                .replace("{kind}", "actors")
                .replace("{table}", "raw_actors")
                .replace("{queue}", "raw_queue")
                .replace("{handler}", "raw_handler")
                .replace("{id}", "a1");
            routes.push((method.to_uppercase().parse().unwrap(), path));
        }
    }
    assert!(routes.len() >= 20, "{routes:?}");
    for (method, path) in &routes {
        // The unknown parameter alone, and before another.
        for query in ["dry_run=true", "dry_run=true&limit=5"] {
            let uri = format!("{path}?{query}");
            let reply = app.send(sensible_request(method, &uri)).await;
            let problem = reply.problem(400);
            assert!(
                problem["detail"].as_str().unwrap().contains("dry_run"),
                "{method} {uri}: {}",
                reply.text
            );
        }
    }
    assert_nothing_stored(&app).await;
    let faults = app.get("/faults").await;
    let faults = faults.ok()["faults"].as_object().unwrap();
    assert!(faults.values().all(|f| f.is_null()), "{faults:?}");
}
