//! Scenarios 1 to 4, each told as a story through the HTTP API.

use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn scenario_1_one_queue_carries_every_schema_and_drops_stale_and_no_op_writes() {
    let app = TestApp::start().await;

    let outcomes = app
        .outcomes(
            "movies",
            json!([
                {"id": "m1", "title": "Heat", "year": 1995, "updated_at": "2024-01-02T00:00:00Z"},
                {"id": "m1", "title": "Heat", "year": 1995, "updated_at": "2024-01-03T00:00:00Z"},
                {"id": "m1", "title": "Heat (draft)", "updated_at": "2024-01-01T00:00:00Z"},
                {"id": "m2", "title": "Ronin", "actor_ids": ["a1"], "updated_at": "2024-01-01T00:00:00Z"},
                {"id": "m2", "title": "Ronin (1998)", "actor_ids": ["a1"], "updated_at": "2024-01-05T00:00:00+02:00"}
            ]),
        )
        .await;
    assert_eq!(
        outcomes,
        ["inserted", "unchanged", "stale", "inserted", "updated"]
    );
    app.outcomes(
        "actors",
        json!({"id": "a1", "name": " Robert De Niro ", "birth_date": "1943-08-17"}),
    )
    .await;
    app.outcomes(
        "episodes",
        json!({"id": "e9", "series_id": "s9", "title": "Lone", "season": 1, "number": 2}),
    )
    .await;
    app.settle().await;

    assert_eq!(
        app.record("movies", "m1").await.unwrap(),
        json!({"id": "m1", "title": "Heat", "year": 1995, "actor_ids": []})
    );
    assert_eq!(
        app.record("movies", "m2").await.unwrap()["title"],
        "Ronin (1998)"
    );
    assert_eq!(
        app.record("actors", "a1").await.unwrap(),
        json!({"id": "a1", "name": "Robert De Niro", "birth_date": "1943-08-17"})
    );
    assert_eq!(
        app.record("episodes", "e9").await.unwrap()["series_id"],
        "s9"
    );

    // Only real changes reached the queue: 2 movie inserts, 1 update, 1 actor, 1 episode.
    let raw_queue = app.queue("raw_queue").await;
    assert_eq!(raw_queue["enqueued"], 5);
    assert_eq!(raw_queue["processed"], 5);

    // The standard record keeps the raw version, so a no-op keeps the newer version.
    let m1 = app.get("/tables/movies/m1").await;
    assert_eq!(m1.body["version"], "2024-01-02T00:00:00Z");
    let raw_m1 = app.get("/tables/raw_movies/m1").await;
    assert_eq!(raw_m1.body["version"], "2024-01-03T00:00:00Z");
    assert!(raw_m1.body["data"].get("updated_at").is_none());
}

#[tokio::test]
async fn scenario_1_a_record_that_cannot_be_standardised_is_dead_lettered_at_once() {
    let app = TestApp::start().await;
    app.outcomes(
        "movies",
        json!([{"id": "ok", "title": "Fine"}, {"id": "bad", "title": "   "}]),
    )
    .await;
    app.settle().await;

    assert!(app.record("movies", "ok").await.is_some());
    assert!(
        app.record("movies", "bad").await.is_none(),
        "never reaches the standard table"
    );
    assert!(
        app.record("raw_movies", "bad").await.is_some(),
        "the raw table keeps what was sent"
    );
    let letters = app.get("/queues/raw_queue/dead-letters").await;
    let letters = letters.ok()["dead_letters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["attempts"], 1);
    assert!(
        letters[0]["error"].as_str().unwrap().contains("`title`"),
        "{}",
        letters[0]["error"]
    );
    assert_eq!(letters[0]["event"]["subject"], "bad");
    let queue = app.queue("raw_queue").await;
    assert_eq!(
        (
            queue["processed"].as_u64(),
            queue["dead_lettered"].as_u64(),
            queue["retried"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
}

fn series(id: &str, at: &str, episodes: &[&str]) -> serde_json::Value {
    let episodes: Vec<_> = episodes
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"id": e, "title": format!("Episode {e}"), "number": i + 1}))
        .collect();
    json!({"id": id, "title": "Series", "updated_at": at, "episodes": episodes})
}

#[tokio::test]
async fn scenario_2_a_series_is_split_into_episodes_that_come_back_through_raw_queue() {
    let app = TestApp::start().await;
    app.outcomes(
        "series",
        series("s1", "2024-01-01T00:00:00Z", &["e1", "e2", "e3"]),
    )
    .await;
    app.settle().await;

    assert_eq!(app.ids("raw_episodes").await, ["e1", "e2", "e3"]);
    assert_eq!(app.ids("episodes").await, ["e1", "e2", "e3"]);
    assert_eq!(
        app.record("episodes", "e2").await.unwrap(),
        json!({"id": "e2", "series_id": "s1", "season": null, "number": 2, "title": "Episode e2"})
    );
    assert_eq!(
        app.record("series", "s1").await.unwrap(),
        json!({"id": "s1", "title": "Series"})
    );
    // 1 series change, 1 change of its episode list and 3 episode changes
    // all went through the one queue.
    assert_eq!(app.queue("raw_queue").await["processed"], 5);

    // The list is the complete set: what it no longer lists is deleted.
    app.outcomes(
        "series",
        series("s1", "2024-01-02T00:00:00Z", &["e1", "e3"]),
    )
    .await;
    app.settle().await;
    assert_eq!(app.ids("episodes").await, ["e1", "e3"]);

    // An older version arriving late changes nothing.
    app.outcomes(
        "series",
        series("s1", "2023-12-31T00:00:00Z", &["e1", "e2", "e3", "e4"]),
    )
    .await;
    app.settle().await;
    assert_eq!(app.ids("episodes").await, ["e1", "e3"]);

    // An absent list changes nothing; an empty list deletes them all.
    app.outcomes(
        "series",
        json!({"id": "s1", "title": "Renamed", "updated_at": "2024-01-03T00:00:00Z"}),
    )
    .await;
    app.settle().await;
    assert_eq!(app.ids("episodes").await, ["e1", "e3"]);
    assert_eq!(
        app.record("series", "s1").await.unwrap()["title"],
        "Renamed"
    );
    app.outcomes("series", series("s1", "2024-01-04T00:00:00Z", &[]))
        .await;
    app.settle().await;
    assert!(app.ids("episodes").await.is_empty());
}

#[tokio::test]
async fn scenario_2_deleting_a_series_deletes_the_episodes_it_listed_only() {
    let app = TestApp::start().await;
    app.outcomes(
        "series",
        series("s1", "2024-01-01T00:00:00Z", &["e1", "e2"]),
    )
    .await;
    app.outcomes(
        "episodes",
        json!({"id": "solo", "series_id": "s1", "title": "Posted on its own"}),
    )
    .await;
    app.settle().await;
    assert_eq!(app.ids("episodes").await, ["e1", "e2", "solo"]);

    let deleted = app.delete("/raw/series/s1").await;
    assert_eq!(deleted.ok()["outcome"], "deleted");
    app.settle().await;
    assert!(app.ids("series").await.is_empty());
    assert_eq!(app.ids("episodes").await, ["solo"]);
    assert_eq!(app.ids("raw_episodes").await, ["solo"]);
}

#[tokio::test]
async fn scenario_2_recursion_at_queue_capacity_1_with_one_worker_does_not_deadlock() {
    let app = TestApp::with(|c| {
        c.queue_capacity = 1;
        c.raw_workers = Some(1);
    })
    .await;
    for batch in 0..10 {
        let body: Vec<_> = (0..20)
            .map(|i| {
                let s = batch * 20 + i;
                let episodes: Vec<_> = (0..50)
                    .map(|e| json!({"id": format!("s{s}e{e}"), "title": "t"}))
                    .collect();
                json!({"id": format!("s{s}"), "title": "Series", "episodes": episodes})
            })
            .collect();
        let reply = app.post("/raw/series", json!(body)).await;
        reply.ok();
    }
    app.settle().await;
    assert_eq!(app.count("series").await, 200);
    assert_eq!(app.count("raw_episodes").await, 10_000);
    assert_eq!(app.count("episodes").await, 10_000);
    let queue = app.queue("raw_queue").await;
    // Each series is two changes: its record and its episode list.
    assert_eq!(queue["processed"], 10_400);
    assert_eq!(queue["dead_lettered"], 0);
}

#[tokio::test]
async fn scenario_3_a_new_video_version_encodes_only_the_renditions_it_changed() {
    let app = TestApp::start().await;
    let video = |title: &str, at: &str, height_4k: u64| {
        json!({"id": "v1", "title": title, "updated_at": at, "renditions": [
            {"id": "1080p", "codec": "h264", "height": 1080},
            {"id": "4k", "codec": "av1", "height": height_4k}
        ]})
    };
    let enqueued = |q: serde_json::Value| q["enqueued"].as_u64().unwrap();
    app.outcomes("videos", video("Trailer", "2024-01-01T00:00:00Z", 2160))
        .await;
    app.settle().await;
    assert_eq!(enqueued(app.queue("encode_queue").await), 2);

    // A title fix leaves both renditions as they were: no encode.
    app.outcomes(
        "videos",
        video("Trailer (fixed)", "2024-01-02T00:00:00Z", 2160),
    )
    .await;
    app.settle().await;
    assert_eq!(
        enqueued(app.queue("encode_queue").await),
        2,
        "a title fix re-encodes nothing"
    );
    assert_eq!(
        app.record("videos", "v1").await.unwrap()["title"],
        "Trailer (fixed)"
    );

    // A version without renditions keeps the list, and encodes nothing.
    app.outcomes(
        "videos",
        json!({"id": "v1", "title": "Trailer", "updated_at": "2024-01-03T00:00:00Z"}),
    )
    .await;
    app.settle().await;
    assert_eq!(enqueued(app.queue("encode_queue").await), 2);
    assert_eq!(
        app.record("videos", "v1").await.unwrap()["rendition_ids"],
        json!(["1080p", "4k"])
    );

    // Changing one rendition encodes that one only.
    app.outcomes("videos", video("Trailer", "2024-01-04T00:00:00Z", 1440))
        .await;
    app.settle().await;
    assert_eq!(enqueued(app.queue("encode_queue").await), 3);
    assert_eq!(
        app.record("encodes", "v1:4k").await.unwrap()["height"],
        1440
    );
    assert_eq!(app.ids("encodes").await, ["v1:1080p", "v1:4k"]);
}

/// The ids of the jobs now in encode_queue's dead letters, with their
/// publication attempt.
async fn dead_jobs(app: &TestApp) -> Vec<(String, u64)> {
    let reply = app.get("/queues/encode_queue/dead-letters").await;
    reply.ok()["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let event = &d["event"];
            let id = event["id"].as_str().unwrap().to_string();
            (id, event["data"]["attempt"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn an_encode_job_has_the_same_id_wherever_and_whenever_it_is_made() {
    // The same video version on two servers: the same job, by id; and a
    // redrive's new attempt (scenario 6) is the same new job on both.
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let app = TestApp::start().await;
        app.put(
            "/faults/encode_handler",
            json!({"failure_rate": 1.0, "permanent": true}),
        )
        .await
        .ok();
        app.outcomes(
            "videos",
            json!({"id": "v1", "title": "T", "updated_at": "2024-05-01T00:00:00Z",
                "renditions": [{"id": "r1", "codec": "h264", "height": 720}]}),
        )
        .await;
        app.settle().await;
        let first = dead_jobs(&app).await;
        app.post("/queues/encode_queue/dead-letters/redrive", json!(null))
            .await
            .ok();
        app.settle().await;
        let again = dead_jobs(&app).await;
        rounds.push((first, again));
    }
    let (first, again) = &rounds[0];
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, 1, "raw_handler's job is the first attempt's");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1, 2, "the redrive started a second attempt");
    assert_ne!(first[0].0, again[0].0, "a new attempt is a new job");
    assert_eq!(rounds[0], rounds[1], "the same jobs have the same ids");
}

#[tokio::test]
async fn scenario_3_a_video_is_written_at_once_and_its_encodes_follow_on_their_own_queue() {
    let app = TestApp::start().await;
    let video = json!({"id": "v1", "title": "Trailer", "duration_s": 90.5, "renditions": [
        {"id": "480p", "codec": "h264", "height": 480, "bitrate_kbps": 1200},
        {"id": "1080p", "codec": "h264", "height": 1080},
        {"id": "4k", "codec": "av1", "height": 2160}
    ]});
    app.outcomes("videos", video).await;
    app.settle().await;

    assert_eq!(
        app.record("videos", "v1").await.unwrap(),
        json!({"id": "v1", "title": "Trailer", "duration_s": 90.5, "rendition_ids": ["480p", "1080p", "4k"]})
    );
    assert_eq!(app.ids("encodes").await, ["v1:1080p", "v1:480p", "v1:4k"]);
    assert_eq!(
        app.record("encodes", "v1:4k").await.unwrap(),
        json!({"id": "v1:4k", "video_id": "v1", "rendition_id": "4k", "codec": "av1", "height": 2160,
            "bitrate_kbps": null, "status": "encoded"})
    );
    let encode_queue = app.queue("encode_queue").await;
    assert_eq!(
        (
            encode_queue["enqueued"].as_u64(),
            encode_queue["processed"].as_u64()
        ),
        (Some(3), Some(3))
    );

    // The video's change was recorded before any of its encodes.
    let log = app
        .app
        .pipeline()
        .engine
        .log
        .read(0, 1000, |_| true)
        .unwrap()
        .events;
    let video_seq = log.iter().find(|c| &*c.table == "videos").unwrap().seq;
    // The video's record and its rendition list are two raw changes; the
    // handler derives the encodes from whichever it sees first.
    let raw_video: Vec<_> = log
        .iter()
        .filter(|c| matches!(&*c.table, "raw_videos" | "raw_videos_renditions"))
        .map(|c| Some(c.id))
        .collect();
    let encodes: Vec<_> = log.iter().filter(|c| &*c.table == "encodes").collect();
    assert_eq!(encodes.len(), 3);
    assert!(encodes.iter().all(|e| e.seq > video_seq));
    assert!(
        encodes
            .iter()
            .all(|e| raw_video.contains(&e.cause.causation)),
        "encodes are caused by the raw video"
    );

    // Dropping a rendition deletes its encode; deleting the video deletes the rest.
    let fewer = json!({"id": "v1", "title": "Trailer", "renditions": [{"id": "4k", "codec": "av1", "height": 2160}], "updated_at": "2999-01-01T00:00:00Z"});
    app.outcomes("videos", fewer).await;
    app.settle().await;
    assert_eq!(app.ids("encodes").await, ["v1:4k"]);
    app.delete("/raw/videos/v1?version=2999-01-02T00:00:00Z")
        .await
        .ok();
    app.settle().await;
    assert!(app.ids("encodes").await.is_empty());
    assert!(app.ids("videos").await.is_empty());
}

#[tokio::test]
async fn scenario_4_a_complete_set_upserts_what_is_new_and_deletes_what_was_not_seen() {
    let app = TestApp::start().await;
    app.outcomes("actors", json!([
        {"id": "a1", "name": "One", "updated_at": "2024-01-01T00:00:00Z"},
        {"id": "a2", "name": "Two", "updated_at": "2024-01-01T00:00:00Z"},
        {"id": "a3", "name": "Three", "updated_at": "2024-01-01T00:00:00Z"},
        {"id": "late", "name": "Written after the set's time", "updated_at": "2024-06-01T00:00:00Z"}
    ])).await;
    app.settle().await;
    assert_eq!(app.ids("actors").await, ["a1", "a2", "a3", "late"]);

    let report = app
        .put(
            "/raw/actors",
            json!({
                "as_of": "2024-03-01T00:00:00Z",
                "records": [
                    {"id": "a1", "name": "One", "updated_at": "2024-01-01T00:00:00Z"},
                    {"id": "a3", "name": "Three, renamed", "updated_at": "2024-02-01T00:00:00Z"},
                    {"id": "a4", "name": "Four"}
                ]
            }),
        )
        .await;
    assert_eq!(
        report.ok(),
        &json!({"as_of": "2024-03-01T00:00:00Z", "inserted": 1, "updated": 1, "unchanged": 1, "stale": 0, "deleted": ["a2"]})
    );
    app.settle().await;

    // The delete flowed downstream like any other change.
    assert_eq!(app.ids("actors").await, ["a1", "a3", "a4", "late"]);
    assert_eq!(
        app.record("actors", "a3").await.unwrap()["name"],
        "Three, renamed"
    );
    // A record without updated_at in a set is versioned at as_of.
    assert_eq!(
        app.get("/tables/raw_actors/a4").await.body["version"],
        "2024-03-01T00:00:00Z"
    );

    // An older set deletes nothing newer than itself.
    let older = app
        .put(
            "/raw/actors",
            json!({"as_of": "2024-02-15T00:00:00Z", "records": []}),
        )
        .await;
    assert_eq!(older.ok()["deleted"], json!([]));
    app.settle().await;
    assert_eq!(app.ids("actors").await, ["a1", "a3", "a4", "late"]);
}
