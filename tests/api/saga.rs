//! Scenario 6: publishing a video as a saga with compensation, told as a
//! story through the HTTP API.

use serde_json::{Value, json};

use crate::events::{open_stream, read_sse};
use crate::helpers::TestApp;

fn video(id: &str, at: &str, renditions: &[(&str, u64)]) -> Value {
    let renditions: Vec<Value> = renditions
        .iter()
        .map(|(r, height)| json!({"id": r, "codec": "h264", "height": height}))
        .collect();
    json!({"id": id, "title": "A video", "updated_at": at, "renditions": renditions})
}

async fn publication(app: &TestApp, id: &str) -> Option<Value> {
    app.record("publications", id).await
}

/// Every change of `publications` in the log, oldest first (`null` for a
/// delete).
async fn history(app: &TestApp) -> Vec<Value> {
    let reply = app.get("/events?table=publications&limit=1000").await;
    reply.ok()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].clone())
        .collect()
}

async fn fail_encodes(app: &TestApp) {
    app.put(
        "/faults/encode_handler",
        json!({"failure_rate": 1.0, "permanent": true}),
    )
    .await
    .ok();
}

async fn clear_faults(app: &TestApp) {
    app.delete("/faults/encode_handler").await.ok();
}

fn status(publication: &Option<Value>) -> &str {
    publication
        .as_ref()
        .and_then(|p| p["status"].as_str())
        .unwrap_or("absent")
}

/// `enqueued = processed + dead_lettered + depth + in_flight + retrying`
/// for every queue, once settled (nothing in flight).
async fn counters_add_up(app: &TestApp) {
    for queue in app.get("/queues").await.ok()["queues"].as_array().unwrap() {
        let n = |f: &str| queue[f].as_u64().unwrap();
        assert_eq!(
            n("enqueued"),
            n("processed") + n("dead_lettered") + n("depth") + n("in_flight"),
            "{queue}"
        );
    }
}

#[tokio::test]
async fn scenario_6_a_publication_is_pending_until_its_renditions_are_encoded() {
    // Encodes that take a minute: the publication waits for them.
    let app = TestApp::with(|c| c.encode_delay_ms = 60_000).await;
    let mut stream = open_stream(&app, "?after=0&table=publications", None).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720), ("r2", 1080)]),
    )
    .await;
    let first = read_sse(&mut stream, 1).await;
    assert_eq!(
        first[0].2["data"],
        json!({"id": "v1", "status": "pending", "attempt": 1, "since": 0, "done": 0,
            "total": 2})
    );
}

#[tokio::test]
async fn scenario_6_all_encodes_succeed_and_the_video_is_published() {
    let app = TestApp::start().await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720), ("r2", 1080)]),
    )
    .await;
    app.settle().await;
    assert_eq!(
        publication(&app, "v1").await.unwrap(),
        json!({"id": "v1", "status": "published", "attempt": 1, "since": 0, "done": 2,
            "total": 2})
    );
    // Its history only ever moves forward: pending with more done, then
    // published.
    let history = history(&app).await;
    assert_eq!(history.last().unwrap()["status"], "published");
    let mut done = 0;
    for step in &history[..history.len() - 1] {
        assert_eq!(step["status"], "pending", "{history:?}");
        assert!(step["done"].as_u64().unwrap() >= done, "{history:?}");
        done = step["done"].as_u64().unwrap();
    }
    // A title fix re-encodes nothing and publishes the new version at once.
    app.outcomes(
        "videos",
        json!({"id": "v1", "title": "Fixed", "updated_at": "2024-01-02T00:00:00Z"}),
    )
    .await;
    app.settle().await;
    let now = publication(&app, "v1").await.unwrap();
    assert_eq!(now["status"], "published");
    assert_eq!(app.queue("encode_queue").await["enqueued"], 2);
}

#[tokio::test]
async fn scenario_6_a_video_without_renditions_is_published_at_once() {
    let app = TestApp::start().await;
    app.outcomes(
        "videos",
        json!([
            {"id": "v1", "title": "No list", "updated_at": "2024-01-01T00:00:00Z"},
            video("v2", "2024-01-01T00:00:00Z", &[]),
        ]),
    )
    .await;
    app.settle().await;
    for id in ["v1", "v2"] {
        let p = publication(&app, id).await.unwrap();
        assert_eq!(
            (
                p["status"].as_str(),
                p["done"].as_u64(),
                p["total"].as_u64()
            ),
            (Some("published"), Some(0), Some(0)),
            "{id}"
        );
    }
    // Each went straight to published.
    assert!(
        history(&app)
            .await
            .iter()
            .all(|p| p["status"] == "published")
    );
}

#[tokio::test]
async fn scenario_6_a_dead_lettered_encode_is_compensated_and_a_retry_publishes() {
    let app = TestApp::start().await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720)]),
    )
    .await;
    app.settle().await;
    assert_eq!(status(&publication(&app, "v1").await), "published");

    // A new version adds a rendition whose encode fails for good.
    fail_encodes(&app).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-02T00:00:00Z", &[("r1", 720), ("r2", 1080)]),
    )
    .await;
    app.settle().await;
    let compensated = publication(&app, "v1").await.unwrap();
    assert_eq!(compensated["status"], "compensated");
    let reason = compensated["reason"].as_str().unwrap();
    assert!(
        reason.contains("v1:r2") && reason.contains("injected fault"),
        "{reason}"
    );
    assert_eq!(compensated["attempt"], 1);
    // The compensation deleted what the publication had encoded.
    assert!(app.ids("encodes").await.is_empty());
    assert_eq!(
        app.get("/queues/encode_queue/dead-letters").await.ok()["dead_letters"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The fault is fixed; the operator retries.
    clear_faults(&app).await;
    let retried = app.post("/publications/v1/retry", json!(null)).await;
    assert_eq!(
        retried.ok(),
        &json!({"id": "v1", "attempt": 2, "status": "pending", "jobs": 2})
    );
    app.settle().await;
    let published = publication(&app, "v1").await.unwrap();
    assert_eq!(
        (
            published["status"].as_str(),
            published["attempt"].as_u64(),
            published["done"].as_u64()
        ),
        (Some("published"), Some(2), Some(2))
    );
    assert!(published["since"].as_u64().unwrap() > compensated["since"].as_u64().unwrap());
    assert_eq!(app.ids("encodes").await, ["v1:r1", "v1:r2"]);
    for id in ["v1:r1", "v1:r2"] {
        assert_eq!(
            app.record("encodes", id).await.unwrap()["status"],
            "encoded"
        );
    }

    // A retry with nothing to retry is refused, and so is one for no video.
    let refused = app.post("/publications/v1/retry", json!(null)).await;
    assert!(
        refused.problem(409)["detail"]
            .as_str()
            .unwrap()
            .contains("published")
    );
    app.post("/publications/nope/retry", json!(null))
        .await
        .problem(404);

    // The old attempt's dead letter, redriven now, is a superseded
    // attempt's: it changes nothing, and is not dead-lettered again.
    let enqueued = app.queue("encode_queue").await["enqueued"].clone();
    let redriven = app
        .post("/queues/encode_queue/dead-letters/redrive", json!(null))
        .await;
    assert_eq!(redriven.ok()["redriven"], 1);
    app.settle().await;
    assert_eq!(publication(&app, "v1").await.unwrap(), published);
    assert_eq!(
        app.queue("encode_queue").await["enqueued"],
        enqueued,
        "the superseded job was finished, not run"
    );
    assert_eq!(app.queue("encode_queue").await["dead_lettered"], 1);
    counters_add_up(&app).await;
}

#[tokio::test]
async fn scenario_6_a_redrive_of_the_dead_letters_starts_a_new_attempt() {
    let app = TestApp::start().await;
    fail_encodes(&app).await;
    app.outcomes(
        "videos",
        video(
            "v1",
            "2024-01-01T00:00:00Z",
            &[("r1", 720), ("r2", 1080), ("r3", 2160)],
        ),
    )
    .await;
    app.settle().await;
    assert_eq!(status(&publication(&app, "v1").await), "compensated");
    let letters = app.get("/queues/encode_queue/dead-letters").await.ok()["dead_letters"]
        .as_array()
        .unwrap()
        .len();
    assert!(letters >= 1);

    clear_faults(&app).await;
    let redriven = app
        .post("/queues/encode_queue/dead-letters/redrive", json!(null))
        .await;
    assert_eq!(redriven.ok()["redriven"], letters);
    app.settle().await;
    let published = publication(&app, "v1").await.unwrap();
    assert_eq!(
        (
            published["status"].as_str(),
            published["attempt"].as_u64(),
            published["done"].as_u64()
        ),
        (Some("published"), Some(2), Some(3)),
        "one new attempt however many letters were redriven"
    );
    assert_eq!(app.ids("encodes").await.len(), 3);
    assert!(
        app.get("/queues/encode_queue/dead-letters").await.ok()["dead_letters"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    counters_add_up(&app).await;
}

#[tokio::test]
async fn scenario_6_a_newer_version_mid_saga_supersedes_the_attempt() {
    let app = TestApp::with(|c| c.encode_delay_ms = 20).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720), ("r2", 1080)]),
    )
    .await;
    // At once, before those encodes are done: r1 changes, r2 goes, r3 comes.
    app.outcomes(
        "videos",
        video("v1", "2024-01-02T00:00:00Z", &[("r1", 480), ("r3", 2160)]),
    )
    .await;
    app.settle().await;
    let p = publication(&app, "v1").await.unwrap();
    assert_eq!(
        (
            p["status"].as_str(),
            p["done"].as_u64(),
            p["total"].as_u64()
        ),
        (Some("published"), Some(2), Some(2))
    );
    // The first version's late results changed nothing.
    assert_eq!(app.ids("encodes").await, ["v1:r1", "v1:r3"]);
    assert_eq!(app.record("encodes", "v1:r1").await.unwrap()["height"], 480);
    assert!(
        history(&app)
            .await
            .iter()
            .all(|p| p["status"] != "compensated")
    );
}

#[tokio::test]
async fn scenario_6_a_newer_version_after_compensation_starts_a_new_attempt() {
    let app = TestApp::start().await;
    fail_encodes(&app).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720), ("r2", 1080)]),
    )
    .await;
    app.settle().await;
    let compensated = publication(&app, "v1").await.unwrap();
    assert_eq!(compensated["status"], "compensated");

    // The fault is fixed and a new version changes only r2: it needs r1
    // again too, which the compensation deleted, so it is a new attempt.
    clear_faults(&app).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-02T00:00:00Z", &[("r1", 720), ("r2", 1440)]),
    )
    .await;
    app.settle().await;
    let p = publication(&app, "v1").await.unwrap();
    assert_eq!(
        (
            p["status"].as_str(),
            p["attempt"].as_u64(),
            p["done"].as_u64()
        ),
        (Some("published"), Some(2), Some(2))
    );
    assert_eq!(
        app.record("encodes", "v1:r2").await.unwrap()["height"],
        1440
    );
    assert_eq!(
        app.record("encodes", "v1:r1").await.unwrap()["status"],
        "encoded"
    );
    // A title fix after that is no new attempt.
    app.outcomes(
        "videos",
        json!({"id": "v1", "title": "Fixed", "updated_at": "2024-01-03T00:00:00Z"}),
    )
    .await;
    app.settle().await;
    assert_eq!(publication(&app, "v1").await.unwrap()["attempt"], 2);
}

#[tokio::test]
async fn scenario_6_a_newer_version_mid_compensation_is_compensated_then_retried() {
    // The failure and a newer version race: both versions' encodes fail,
    // so whichever the saga sees, it ends compensated, never published,
    // and a retry publishes the newest version.
    let app = TestApp::start().await;
    fail_encodes(&app).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720)]),
    )
    .await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-02T00:00:00Z", &[("r1", 1080)]),
    )
    .await;
    app.settle().await;
    assert_eq!(status(&publication(&app, "v1").await), "compensated");
    assert!(
        history(&app)
            .await
            .iter()
            .all(|p| p["status"] != "published")
    );
    assert!(app.ids("encodes").await.is_empty());
    clear_faults(&app).await;
    app.post("/publications/v1/retry", json!(null)).await.ok();
    app.settle().await;
    assert_eq!(status(&publication(&app, "v1").await), "published");
    assert_eq!(
        app.record("encodes", "v1:r1").await.unwrap()["height"],
        1080
    );
}

#[tokio::test]
async fn scenario_6_deleting_the_video_mid_saga_deletes_its_publication() {
    let app = TestApp::with(|c| c.encode_delay_ms = 20).await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720), ("r2", 1080)]),
    )
    .await;
    app.delete("/raw/videos/v1").await.ok();
    app.settle().await;
    assert_eq!(publication(&app, "v1").await, None);
    assert!(
        app.ids("encodes").await.is_empty(),
        "late encodes were stale"
    );
    app.post("/publications/v1/retry", json!(null))
        .await
        .problem(404);

    // And a compensated one goes with its video too.
    fail_encodes(&app).await;
    app.outcomes(
        "videos",
        video("v2", "2024-01-01T00:00:00Z", &[("r1", 720)]),
    )
    .await;
    app.settle().await;
    assert_eq!(status(&publication(&app, "v2").await), "compensated");
    app.delete("/raw/videos/v2").await.ok();
    app.settle().await;
    assert_eq!(publication(&app, "v2").await, None);
    assert_eq!(app.count("publications").await, 0);
}

#[tokio::test]
async fn a_publication_is_rebuilt_from_the_videos_and_encodes() {
    let app = TestApp::start().await;
    app.outcomes(
        "videos",
        video("v1", "2024-01-01T00:00:00Z", &[("r1", 720)]),
    )
    .await;
    app.settle().await;
    let before = publication(&app, "v1").await.unwrap();
    let rebuilt = app.post("/tables/publications/rebuild", json!(null)).await;
    assert_eq!(rebuilt.ok()["rebuilt"], 1);
    assert_eq!(publication(&app, "v1").await.unwrap(), before);
}
