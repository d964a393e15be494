//! `/metrics`: Prometheus text whose values move with the pipeline.

use std::collections::HashMap;

use serde_json::json;

use crate::helpers::{TestApp, on_nats};

/// Samples by name with labels, e.g. `eventsys_queue_depth{queue="raw_queue"}`.
async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.content_type().starts_with("text/plain"),
        "{}",
        reply.content_type()
    );
    reply
        .text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line}"));
            (
                name.to_string(),
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line}")),
            )
        })
        .collect()
}

fn get(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}"))
}

#[tokio::test]
async fn metrics_follow_writes_queues_handlers_and_requests() {
    let app = TestApp::start().await;
    let before = scrape(&app).await;
    let inserted = r#"eventsys_table_writes_total{table="raw_movies",outcome="inserted"}"#;
    assert_eq!(get(&before, inserted), 0.0);

    app.post(
        "/raw/movies",
        json!([{"id": "m1", "title": "A"}, {"id": "m2", "title": ""}]),
    )
    .await
    .ok();
    app.post("/raw/movies", json!({"id": "m1", "title": "A"}))
        .await
        .ok();
    app.post("/raw/movies", json!({"id": ""}))
        .await
        .problem(400);
    app.settle().await;
    let after = scrape(&app).await;

    assert_eq!(get(&after, inserted), 2.0);
    assert_eq!(
        get(
            &after,
            r#"eventsys_table_writes_total{table="raw_movies",outcome="unchanged"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            r#"eventsys_table_writes_total{table="movies",outcome="inserted"}"#
        ),
        1.0
    );
    assert_eq!(
        get(&after, r#"eventsys_table_records{table="movies"}"#),
        1.0
    );
    assert_eq!(
        get(&after, r#"eventsys_queue_depth{queue="raw_queue"}"#),
        0.0
    );
    assert_eq!(
        get(&after, r#"eventsys_dead_letters{queue="raw_queue"}"#),
        1.0
    );
    assert_eq!(
        get(
            &after,
            r#"eventsys_handler_events_total{handler="raw_handler",result="processed"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            r#"eventsys_handler_events_total{handler="raw_handler",result="dead_lettered"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            r#"eventsys_handler_duration_seconds_count{handler="raw_handler"}"#
        ),
        2.0
    );
    assert_eq!(
        get(&after, "eventsys_ingest_to_visible_seconds_count"),
        1.0,
        "one standard write became visible"
    );
    assert!(get(&after, "eventsys_ingest_to_visible_seconds_sum") > 0.0);
    assert_eq!(
        get(
            &after,
            r#"eventsys_http_requests_total{method="POST",route="/raw/{kind}",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            &after,
            r#"eventsys_http_requests_total{method="POST",route="/raw/{kind}",status="400"}"#
        ),
        1.0
    );
    assert!(
        get(
            &after,
            r#"eventsys_http_request_duration_seconds_count{method="POST",route="/raw/{kind}"}"#
        ) >= 3.0
    );
    // Three changes: m1's and m2's raw writes and m1's standard one (the
    // second m1 only records a newer version). On JetStream that write
    // takes a sequence too, so the latest change's may be past 3.
    let log = app.get("/events?after=0").await;
    let changes = log.ok()["events"].as_array().expect("events").clone();
    assert_eq!(changes.len(), 3, "{changes:?}");
    let latest: f64 = changes[2]["sequence"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a sequence");
    assert_eq!(get(&after, "eventsys_log_sequence"), latest);
    if !on_nats() {
        assert_eq!(latest, 3.0);
    }

    app.get("/no/such/page").await.problem(404);
    let last = scrape(&app).await;
    assert_eq!(
        get(
            &last,
            r#"eventsys_http_requests_total{method="GET",route="unmatched",status="404"}"#
        ),
        1.0
    );
}
