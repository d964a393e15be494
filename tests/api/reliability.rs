//! Failures, overload and recovery through the HTTP API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{StatusCode, header};
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn faults_are_set_listed_validated_and_cleared() {
    let app = TestApp::start().await;
    let faults = json!({"raw_handler": null, "encode_handler": null, "projection_handler": null,
        "publication_handler": null});
    assert_eq!(app.get("/faults").await.ok()["faults"], faults);
    let set = app
        .put(
            "/faults/encode_handler",
            json!({"failure_rate": 0.25, "delay_ms": 5}),
        )
        .await;
    assert_eq!(
        set.ok()["fault"],
        json!({"failure_rate": 0.25, "permanent": false, "delay_ms": 5})
    );
    assert_eq!(
        app.get("/faults/encode_handler").await.ok()["fault"]["failure_rate"],
        0.25
    );

    for bad in [
        json!({"failure_rate": 1.5}),
        json!({"failure_rate": -0.1}),
        json!({"failure_rate": "high"}),
        json!({"failure_rate": 0.1, "explode": true}),
        json!({"delay_ms": -5}),
        json!({"delay_ms": 600_000}),
        json!([0.5]),
    ] {
        app.put("/faults/encode_handler", bad).await.problem(400);
    }
    app.put("/faults/nobody", json!({"failure_rate": 0.5}))
        .await
        .problem(404);
    assert_eq!(
        app.get("/faults/encode_handler").await.body["fault"]["failure_rate"],
        0.25,
        "a refused fault changes nothing"
    );
    app.delete("/faults/encode_handler").await.ok();
    assert_eq!(
        app.get("/faults/encode_handler").await.body["fault"],
        json!(null)
    );
}

#[tokio::test]
async fn dead_letters_can_be_redriven_once_the_fault_is_gone() {
    let app = TestApp::start().await;
    app.put(
        "/faults/encode_handler",
        json!({"failure_rate": 1.0, "permanent": true}),
    )
    .await
    .ok();
    app.post(
        "/raw/videos",
        json!({"id": "v", "title": "V", "renditions": [
        {"id": "a", "codec": "h264", "height": 1}, {"id": "b", "codec": "h264", "height": 2}]}),
    )
    .await
    .ok();
    app.settle().await;
    let letters = app.get("/queues/encode_queue/dead-letters").await;
    let letters = letters.ok()["dead_letters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 2);
    assert!(letters.iter().all(|l| l["attempts"] == 1
        && l["error"] == "injected fault"
        && l["failed_at"].is_string()));
    assert_eq!(letters[0]["event"]["type"], "eventsys.encode.requested");
    assert!(app.ids("encodes").await.is_empty(), "compensated");
    assert_eq!(
        app.record("videos", "v").await.unwrap()["rendition_ids"],
        json!(["a", "b"]),
        "the video itself is there"
    );

    app.delete("/faults/encode_handler").await.ok();
    let redrive = app
        .call(
            axum::http::Method::POST,
            "/queues/encode_queue/dead-letters/redrive",
            None,
        )
        .await;
    assert_eq!(redrive.ok()["redriven"], 2);
    app.settle().await;
    assert_eq!(app.ids("encodes").await, ["v:a", "v:b"]);
    let queue = app.queue("encode_queue").await;
    assert_eq!(
        (
            queue["enqueued"].as_u64(),
            queue["processed"].as_u64(),
            queue["dead_lettered"].as_u64()
        ),
        (Some(4), Some(2), Some(2))
    );
    assert!(
        app.get("/queues/encode_queue/dead-letters").await.body["dead_letters"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    app.put(
        "/faults/raw_handler",
        json!({"failure_rate": 1.0, "permanent": true}),
    )
    .await
    .ok();
    app.post("/raw/actors", json!({"id": "a", "name": "A"}))
        .await
        .ok();
    app.settle().await;
    assert_eq!(
        app.delete("/queues/raw_queue/dead-letters").await.ok()["discarded"],
        1
    );
    assert!(
        app.get("/queues/raw_queue/dead-letters").await.body["dead_letters"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_holds_events_instead_of_dead_lettering_them() {
    // Its cool-downs are counted on paused time, which a wait for the
    // log's writer thread would move on: in memory on every suite.
    let app = TestApp::in_memory_with(|c| {
        c.breaker_threshold = 2;
        c.breaker_cooldown_ms = 10_000;
        c.max_attempts = 1000;
        c.retry_base_ms = 1;
        c.retry_max_ms = 5;
    });
    app.put("/faults/raw_handler", json!({"failure_rate": 1.0}))
        .await
        .ok();
    app.post(
        "/raw/movies",
        json!([{"id": "m1", "title": "A"}, {"id": "m2", "title": "B"}, {"id": "m3", "title": "C"}]),
    )
    .await
    .ok();
    let circuit = || async {
        app.get("/handlers").await.body["handlers"][0]["circuit"]
            .as_str()
            .unwrap()
            .to_string()
    };
    while circuit().await != "open" {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Held through many cool-downs' worth of retries: nothing is dead-lettered.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let queue = app.queue("raw_queue").await;
    assert_eq!(queue["dead_lettered"], 0);
    assert_eq!(queue["processed"], 0);
    let failed = app.get("/handlers").await.body["handlers"][0]["failed"]
        .as_u64()
        .unwrap();
    assert!(
        failed < 20,
        "an open circuit stops the attempts ({failed} failures)"
    );

    app.delete("/faults/raw_handler").await.ok();
    app.settle().await;
    assert_eq!(circuit().await, "closed");
    assert_eq!(app.ids("movies").await, ["m1", "m2", "m3"]);
    assert_eq!(app.queue("raw_queue").await["dead_lettered"], 0);
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_pipeline_refuses_ingest_with_503_and_stores_nothing_of_it() {
    // The backlog is held by a delay on paused time, which a wait for the
    // log's writer thread would move on: in memory on every suite.
    let app = TestApp::in_memory_with(|c| {
        c.queue_capacity = 1;
        c.raw_workers = Some(1);
        c.ingest_backlog_limit = 5;
    });
    app.put("/faults/raw_handler", json!({"delay_ms": 1000}))
        .await
        .ok();
    let batch: Vec<_> = (0..10)
        .map(|i| json!({"id": format!("m{i}"), "title": "T"}))
        .collect();
    app.post("/raw/movies", json!(batch)).await.ok();
    let refused = app
        .post("/raw/movies", json!({"id": "late", "title": "T"}))
        .await;
    let problem = refused.problem(503);
    assert_eq!(refused.headers[header::RETRY_AFTER], "1");
    assert!(problem["backlog"].as_u64().unwrap() > 5);
    app.put("/raw/movies", json!({"records": []}))
        .await
        .problem(503);
    app.delete("/raw/movies/m1").await.problem(503);
    app.delete("/faults/raw_handler").await.ok();
    app.settle().await;
    assert_eq!(app.count("raw_movies").await, 10);
    assert!(
        app.record("raw_movies", "late").await.is_none(),
        "nothing of a refused request is stored"
    );
    assert_eq!(app.count("movies").await, 10);
}

/// Capacity 1, one worker, 500 series of 100 episodes posted as fast as
/// possible by several clients that honour 503: the recursive path is never
/// refused, nothing deadlocks, and exactly 50,000 episodes result.
#[tokio::test(start_paused = true)]
async fn backpressure_never_refuses_handler_writes_nor_deadlocks() {
    // Its request timeouts run on paused time, which a wait for the log's
    // writer thread would move on: in memory on every suite.
    let app = Arc::new(TestApp::in_memory_with(|c| {
        c.queue_capacity = 1;
        c.raw_workers = Some(1);
        c.ingest_backlog_limit = 200;
    }));
    let refused = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..4 {
        let (app, refused) = (app.clone(), refused.clone());
        clients.spawn(async move {
            for s in (client..500).step_by(4) {
                let episodes: Vec<_> = (0..100)
                    .map(|e| json!({"id": format!("s{s}e{e}"), "title": "t", "number": e}))
                    .collect();
                let body = json!({"id": format!("s{s}"), "title": "Series", "episodes": episodes});
                loop {
                    let reply = app.post("/raw/series", body.clone()).await;
                    match reply.status {
                        StatusCode::OK => break,
                        StatusCode::SERVICE_UNAVAILABLE => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            let wait: u64 = reply.headers[header::RETRY_AFTER]
                                .to_str()
                                .unwrap()
                                .parse()
                                .unwrap();
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                        }
                        other => panic!("unexpected {other}: {}", reply.text),
                    }
                }
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    app.settle().await;
    assert!(refused.load(Ordering::Relaxed) > 0, "backpressure engaged");
    assert_eq!(app.count("series").await, 500);
    assert_eq!(app.count("raw_episodes").await, 50_000);
    assert_eq!(app.count("episodes").await, 50_000);
    let queue = app.queue("raw_queue").await;
    // Each series is two changes: its record and its episode list.
    assert_eq!(queue["processed"], 51_000);
    assert_eq!(queue["dead_lettered"], 0);
}

#[tokio::test]
async fn fault_bodies_must_be_json_objects() {
    let app = TestApp::start().await;
    let text = axum::http::Request::put("/faults/raw_handler")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(axum::body::Body::from(r#"{"failure_rate": 0.5}"#))
        .unwrap();
    app.send(text).await.problem(415);
    assert_eq!(
        app.get("/faults/raw_handler").await.body["fault"],
        json!(null)
    );
}

#[tokio::test]
async fn a_replay_rebuilds_standard_tables_from_the_retained_changes() {
    let app = TestApp::start().await;
    // Every change fails for good and its dead letters are thrown away:
    // the standard table misses them, as after a change of rules.
    app.put(
        "/faults/raw_handler",
        json!({"failure_rate": 1.0, "permanent": true}),
    )
    .await
    .ok();
    app.post(
        "/raw/movies",
        json!([{"id": "m1", "title": "Heat"}, {"id": "m2", "title": "Ronin"}]),
    )
    .await
    .ok();
    app.settle().await;
    assert_eq!(
        app.delete("/queues/raw_queue/dead-letters").await.ok()["discarded"],
        2
    );
    app.delete("/faults/raw_handler").await.ok();
    assert!(app.ids("movies").await.is_empty());

    let replayed = app
        .post("/queues/raw_queue/replay", json!({"after": 0}))
        .await;
    assert_eq!(replayed.ok()["replayed"], 2);
    app.settle().await;
    assert_eq!(app.ids("movies").await, ["m1", "m2"]);
    // Replaying again converges: nothing changes.
    let latest = app.get("/events?after=0&limit=1000").await.ok()["next"].clone();
    app.post("/queues/raw_queue/replay", json!({"after": 0}))
        .await
        .ok();
    app.settle().await;
    let since = app.get(&format!("/events?after={latest}&limit=1000")).await;
    let since = since.ok();
    let tables: Vec<&str> = since["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        tables,
        ["/tables/audit"],
        "a replay of changes already applied emits nothing but its audit record"
    );
    let after = latest.as_u64().unwrap();
    let none = app
        .post("/queues/raw_queue/replay", json!({"after": after}))
        .await;
    assert_eq!(none.ok()["replayed"], 0);

    // What a replay refuses, naming why.
    app.post("/queues/encode_queue/replay", json!({"after": 0}))
        .await
        .problem(409);
    app.post("/queues/nope/replay", json!({"after": 0}))
        .await
        .problem(404);
    for bad in [
        json!({}),
        json!({"after": -1}),
        json!({"after": 0, "x": 1}),
        json!([1]),
    ] {
        app.post("/queues/raw_queue/replay", bad).await.problem(400);
    }
}

#[tokio::test]
async fn a_replay_from_before_retention_is_gone() {
    let app = TestApp::with(|c| c.event_retention = 2).await;
    for n in 0..5 {
        app.post("/raw/actors", json!({"id": format!("a{n}"), "name": "N"}))
            .await
            .ok();
    }
    app.settle().await;
    let gone = app
        .post("/queues/raw_queue/replay", json!({"after": 0}))
        .await;
    assert!(
        gone.problem(410)["oldest"].as_u64().unwrap() > 1,
        "{}",
        gone.text
    );
}
