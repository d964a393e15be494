//! Bounds at the edge: records per table, requests at once, request time,
//! and the backlog ingest admits.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use crate::helpers::TestApp;

fn movies(ids: &[&str]) -> Value {
    json!(
        ids.iter()
            .map(|id| json!({"id": id, "title": "T"}))
            .collect::<Vec<_>>()
    )
}

#[tokio::test]
async fn a_table_at_its_limit_answers_507_naming_it_and_stores_nothing() {
    let app = TestApp::with(|c| c.max_records = 3).await;
    app.post("/raw/movies", movies(&["m1", "m2"])).await.ok();

    let refused = app.post("/raw/movies", movies(&["m1", "m3", "m4"])).await;
    let problem = refused.problem(507);
    assert_eq!(problem["table"], "raw_movies");
    assert_eq!(problem["limit"], 3);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("--max-records"),
        "{problem}"
    );
    // A batch within the room left, repeats and updates included, is taken.
    app.post("/raw/movies", movies(&["m3", "m3", "m1"]))
        .await
        .ok();
    // A delete of an unknown id keeps a tombstone, so it needs room too.
    app.delete("/raw/movies/m9").await.problem(507);
    app.put(
        "/raw/movies",
        json!({"records": [{"id": "m5", "title": "T"}]}),
    )
    .await
    .problem(507);
    app.settle().await;
    assert_eq!(app.ids("raw_movies").await, ["m1", "m2", "m3"]);
    assert_eq!(app.ids("movies").await, ["m1", "m2", "m3"]);
    // Updates of ids the table keeps are never refused.
    app.post("/raw/movies", json!({"id": "m2", "title": "New"}))
        .await
        .ok();
    app.delete("/raw/movies/m1").await.ok();
    app.settle().await;
    assert_eq!(app.ids("movies").await, ["m2", "m3"]);
}

#[tokio::test]
async fn a_parent_whose_children_would_not_fit_is_refused_whole() {
    let app = TestApp::with(|c| c.max_records = 3).await;
    let episodes: Vec<Value> = (1..=5)
        .map(|n| json!({"id": format!("s1e{n}"), "title": "E", "number": n}))
        .collect();
    let refused = app
        .post(
            "/raw/series",
            json!({"id": "s1", "title": "S", "episodes": episodes}),
        )
        .await;
    assert_eq!(refused.problem(507)["table"], "raw_episodes");
    app.settle().await;
    assert_eq!(app.count("raw_series").await, 0, "nothing of it is stored");
    assert_eq!(app.count("raw_series_episodes").await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_handler_write_past_the_limit_is_dead_lettered_whole_with_the_reason() {
    // Its order of events is set by paused time, which a wait for the
    // log's writer thread would move on: in memory on every suite.
    let app = TestApp::in_memory_with(|c| c.max_records = 3);
    // The series is admitted while raw_episodes has room for its two
    // episodes; two episodes posted on their own take it before
    // raw_handler gets to the series.
    app.put("/faults/raw_handler", json!({"delay_ms": 1000}))
        .await
        .ok();
    let listed: Vec<Value> = (1..=2)
        .map(|n| json!({"id": format!("s1e{n}"), "title": "E", "number": n}))
        .collect();
    app.post(
        "/raw/series",
        json!({"id": "s1", "title": "S", "episodes": listed}),
    )
    .await
    .ok();
    app.post(
        "/raw/episodes",
        json!([{"id": "x1", "title": "X", "series_id": "other"}, {"id": "x2", "title": "X", "series_id": "other"}]),
    )
    .await
    .ok();
    app.delete("/faults/raw_handler").await.ok();
    app.settle().await;
    let letters = app.get("/queues/raw_queue/dead-letters").await;
    let errors: Vec<&str> = letters.ok()["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["error"].as_str().unwrap())
        .collect();
    assert!(
        !errors.is_empty()
            && errors
                .iter()
                .all(|e| e.contains("table `raw_episodes` is full")),
        "{errors:?}"
    );
    // None of the series' episodes was written: not one of two.
    assert_eq!(app.ids("raw_episodes").await, ["x1", "x2"]);
    let queue = app.queue("raw_queue").await;
    let n = |k: &str| queue[k].as_u64().unwrap();
    assert_eq!(
        n("enqueued"),
        n("processed") + n("dead_lettered") + n("depth") + n("in_flight") + n("retrying"),
        "{queue}"
    );
}

/// A request whose body never finishes holds its place until the request
/// timeout answers it.
fn endless_post() -> Request<Body> {
    let body = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
    Request::builder()
        .method(Method::POST)
        .uri("/raw/movies")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn requests_past_the_limit_are_shed_and_a_slow_body_times_out() {
    let app = std::sync::Arc::new(TestApp::in_memory_with(|c| {
        c.max_requests = 1;
        c.request_timeout = Duration::from_secs(5).into();
    }));
    let slow = {
        let app = app.clone();
        tokio::spawn(async move { app.send(endless_post()).await })
    };
    // Until the slow request holds the only permit, requests pass.
    let shed = loop {
        let reply = app.post("/raw/movies", movies(&["m1"])).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        reply.ok();
        tokio::task::yield_now().await;
    };
    assert_eq!(shed.headers[header::RETRY_AFTER], "1");
    assert_eq!(shed.problem(503)["limit"], 1);
    // Long polls are not counted against the limit.
    app.get("/settle?timeout_ms=1000").await.ok();

    let timed_out = slow.await.unwrap();
    timed_out.problem(408);
    assert_eq!(timed_out.headers[header::CONNECTION], "close");
    assert!(
        timed_out.body["detail"]
            .as_str()
            .unwrap()
            .contains("--request-timeout"),
        "{}",
        timed_out.text
    );
    // The permit is back.
    app.post("/raw/movies", movies(&["m2"])).await.ok();
}
