//! The change log over HTTP: pages, live stream, causation, CloudEvents.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn events(app: &TestApp, query: &str) -> Vec<Value> {
    let reply = app.get(&format!("/events?{query}")).await;
    reply.ok()["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_log_pages_every_change_as_cloudevents() {
    let app = TestApp::start().await;
    app.outcomes(
        "movies",
        json!([{"id": "m1", "title": "A"}, {"id": "m2", "title": "B"}]),
    )
    .await;
    app.settle().await;

    let all = events(&app, "after=0&limit=1000").await;
    assert_eq!(all.len(), 4, "2 raw + 2 standard changes");
    for (i, event) in all.iter().enumerate() {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["sequence"], (i + 1).to_string());
        assert_eq!(event["type"], "eventsys.record.inserted");
        for attribute in ["id", "source", "subject", "time", "data", "correlationid"] {
            assert!(
                event.get(attribute).is_some(),
                "missing {attribute}: {event}"
            );
        }
    }
    let page = app.get("/events?after=1&limit=2").await;
    assert_eq!(page.ok()["events"].as_array().unwrap().len(), 2);
    assert_eq!(page.body["events"][0]["sequence"], "2");
    assert_eq!(page.body["next"], 3);

    let standard = events(&app, "table=movies").await;
    assert_eq!(standard.len(), 2);
    assert!(standard.iter().all(|e| e["source"] == "/tables/movies"));
    app.post("/raw/movies", json!({"id": "m1", "title": "A2"}))
        .await
        .ok();
    app.delete("/raw/movies/m2").await.ok();
    app.settle().await;
    let updated = events(&app, "type=eventsys.record.updated").await;
    assert_eq!(updated.len(), 2, "raw and standard update of m1");
    let deleted = events(&app, "table=movies&type=deleted").await;
    assert_eq!(deleted.len(), 1);
    assert!(deleted[0].get("data").is_none());

    let m1 = events(&app, "subject=m1").await;
    assert!(m1.len() >= 3 && m1.iter().all(|e| e["subject"] == "m1"));
    assert_eq!(
        app.get("/events?after=999").await.problem(400)["field"],
        "after"
    );
    app.get("/events/stream?after=999").await.problem(400);
    app.get("/events?limit=0").await.problem(400);
    app.get("/events?table=nope").await.problem(400);
    app.get("/events?type=eventsys.record.exploded")
        .await
        .problem(400);
    app.get("/events?after=-3").await.problem(400);
}

#[tokio::test]
async fn a_chain_of_changes_carries_causation_and_the_request_id() {
    let app = TestApp::start().await;
    let request = Request::post("/raw/series")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", "chain-42")
        .body(Body::from(
            json!({"id": "s1", "title": "S", "episodes": [{"id": "e1", "title": "P"}]}).to_string(),
        ))
        .unwrap();
    let reply = app.send(request).await;
    assert_eq!(reply.headers["x-request-id"], "chain-42");
    app.settle().await;

    let all = events(&app, "limit=1000").await;
    let find = |source: &str| {
        all.iter()
            .find(|e| e["source"] == source)
            .unwrap_or_else(|| panic!("no {source}"))
    };
    let (raw_series, listing, raw_episode, episode, series) = (
        find("/tables/raw_series"),
        find("/tables/raw_series_episodes"),
        find("/tables/raw_episodes"),
        find("/tables/episodes"),
        find("/tables/series"),
    );
    assert!(
        raw_series.get("causationid").is_none() && listing.get("causationid").is_none(),
        "ingest starts the chain"
    );
    // The series' record and its episode list are two raw changes of one
    // write; the handler derives from whichever it sees first.
    let by_series = [&raw_series["id"], &listing["id"]];
    assert!(by_series.contains(&&series["causationid"]), "{series}");
    assert!(
        by_series.contains(&&raw_episode["causationid"]),
        "the split episode was caused by the series: {raw_episode}"
    );
    assert_eq!(episode["causationid"], raw_episode["id"]);
    assert!(
        all.iter().all(|e| e["correlationid"] == "chain-42"),
        "every change carries the request id"
    );
}

#[tokio::test]
async fn a_cursor_older_than_retention_is_gone() {
    let app = TestApp::with(|c| c.event_retention = 4).await;
    let movies: Vec<_> = (0..10)
        .map(|i| json!({"id": format!("m{i}"), "title": "T"}))
        .collect();
    app.post("/raw/movies", json!(movies)).await.ok();
    app.settle().await;
    let oldest = app.app.pipeline().engine.log.oldest();
    assert!(
        oldest > 2,
        "retention dropped delivered events (oldest {oldest})"
    );
    let gone = app.get("/events?after=1").await;
    assert_eq!(gone.problem(410)["oldest"], oldest);
    // after=0 means "from the oldest retained", never gone.
    assert_eq!(events(&app, "after=0").await.len(), 4);
    app.get("/events/stream?after=1").await.problem(410);
    // A stream from the beginning starts at the oldest retained event.
    let mut stream = open_stream(&app, "?after=0", None).await;
    let first = read_sse(&mut stream, 1).await;
    assert_eq!(first[0].1, None, "a change, not lagged");
    assert_eq!(first[0].0.as_deref(), Some(oldest.to_string().as_str()));
}

#[tokio::test]
async fn retention_never_drops_what_a_queue_has_not_received() {
    let app = TestApp::with(|c| {
        c.event_retention = 2;
        c.queue_capacity = 1;
        c.raw_workers = Some(1);
    })
    .await;
    app.put(
        "/faults/raw_handler",
        json!({"failure_rate": 0.0, "delay_ms": 20}),
    )
    .await
    .ok();
    let movies: Vec<_> = (0..30)
        .map(|i| json!({"id": format!("m{i:02}"), "title": "T"}))
        .collect();
    app.post("/raw/movies", json!(movies)).await.ok();
    app.delete("/faults/raw_handler").await.ok();
    app.settle().await;
    assert_eq!(
        app.count("movies").await,
        30,
        "every change reached the handler despite retention 2"
    );
}

/// Reads SSE frames from a streaming body until `n` events (id + data) arrived.
pub(crate) async fn read_sse(
    body: &mut Body,
    n: usize,
) -> Vec<(Option<String>, Option<String>, Value)> {
    let mut buffer = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("stream stalled")
            .expect("stream ended early")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            buffer.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).unwrap());
                }
            }
            if let Some(data) = data {
                out.push((id, event, data));
            }
        }
    }
    out
}

pub(crate) async fn open_stream(app: &TestApp, query: &str, last_event_id: Option<&str>) -> Body {
    let mut request = Request::get(format!("/events/stream{query}"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response =
        tower::ServiceExt::oneshot(app.app.router(), request.body(Body::empty()).unwrap())
            .await
            .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    response.into_body()
}

#[tokio::test]
async fn the_stream_replays_the_backlog_then_goes_live_and_resumes_from_last_event_id() {
    let app = TestApp::start().await;
    app.outcomes(
        "actors",
        json!([{"id": "a1", "name": "A"}, {"id": "a2", "name": "B"}]),
    )
    .await;
    app.settle().await;

    let mut stream = open_stream(&app, "?after=0&table=raw_actors", None).await;
    let backlog = read_sse(&mut stream, 2).await;
    assert_eq!(
        backlog
            .iter()
            .map(|e| e.2["subject"].clone())
            .collect::<Vec<_>>(),
        [json!("a1"), json!("a2")]
    );
    assert_eq!(backlog[0].0.as_deref(), Some("1"));

    app.outcomes("actors", json!({"id": "a3", "name": "C"}))
        .await;
    let live = read_sse(&mut stream, 1).await;
    assert_eq!(live[0].2["subject"], "a3");
    let last_id = live[0].0.clone().unwrap();
    drop(stream);

    // A client that reconnects with Last-Event-ID misses nothing.
    app.outcomes("actors", json!({"id": "a4", "name": "D"}))
        .await;
    let mut resumed = open_stream(&app, "?table=raw_actors", Some(&last_id)).await;
    let next = read_sse(&mut resumed, 1).await;
    assert_eq!(next[0].2["subject"], "a4");
    assert!(
        next[0].0.as_deref().unwrap().parse::<u64>().unwrap() > last_id.parse::<u64>().unwrap()
    );

    let bad = app
        .send(
            Request::get("/events/stream")
                .header("last-event-id", "abc")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    bad.problem(400);
}

#[tokio::test]
async fn a_client_too_slow_for_retention_gets_lagged_and_a_clean_close() {
    let app = TestApp::with(|c| c.event_retention = 3).await;
    let mut stream = open_stream(&app, "?after=0", None).await;
    // The client reads nothing while far more than retention is written.
    let movies: Vec<_> = (0..20)
        .map(|i| json!({"id": format!("m{i}"), "title": "T"}))
        .collect();
    app.post("/raw/movies", json!(movies)).await.ok();
    app.settle().await;
    let events = read_sse(&mut stream, 1).await;
    assert_eq!(events[0].1.as_deref(), Some("lagged"));
    assert!(events[0].2["oldest"].as_u64().unwrap() > 1);
    let end = tokio::time::timeout(Duration::from_secs(20), stream.frame())
        .await
        .expect("closes");
    assert!(end.is_none(), "the stream ends after lagged");
}

fn cloudevent(id: &str, record: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/vendors/acme", "type": "com.acme.movie", "data": record})
}

async fn post_as(
    app: &TestApp,
    content_type: &str,
    extra: &[(&str, &str)],
    body: Value,
) -> crate::helpers::Reply {
    let mut request = Request::post("/raw/movies").header(header::CONTENT_TYPE, content_type);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    app.send(request.body(Body::from(body.to_string())).unwrap())
        .await
}

fn outcomes(reply: &crate::helpers::Reply) -> Vec<String> {
    reply.ok()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn cloudevents_are_accepted_in_three_modes_and_duplicates_are_not_applied_again() {
    let app = TestApp::start().await;
    let structured = post_as(
        &app,
        "application/cloudevents+json",
        &[],
        cloudevent("e1", json!({"id": "m1", "title": "One"})),
    )
    .await;
    assert_eq!(outcomes(&structured), ["inserted"]);

    let batch = post_as(
        &app,
        "application/cloudevents-batch+json",
        &[],
        json!([
            cloudevent("e2", json!({"id": "m2", "title": "Two"})),
            cloudevent("e1", json!({"id": "m1", "title": "One, changed"})),
            {"specversion": "1.0", "id": "e3", "source": "/vendors/acme", "type": "t",
             "data_base64": "eyJpZCI6Im0zIiwidGl0bGUiOiJUaHJlZSJ9"},
            cloudevent("e2", json!({"id": "m2", "title": "Two"}))
        ]),
    )
    .await;
    assert_eq!(
        outcomes(&batch),
        ["inserted", "duplicate", "inserted", "duplicate"]
    );

    let binary_headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "e3"),
        ("ce-source", "/vendors/acme"),
        ("ce-type", "t"),
    ];
    let binary = post_as(
        &app,
        "application/json",
        &binary_headers,
        json!({"id": "m3", "title": "Three, again"}),
    )
    .await;
    assert_eq!(
        outcomes(&binary),
        ["duplicate"],
        "the same source+id in another mode is a duplicate"
    );
    let other_source = [
        ("ce-specversion", "1.0"),
        ("ce-id", "e3"),
        ("ce-source", "/vendors/other"),
        ("ce-type", "t"),
    ];
    let fresh = post_as(
        &app,
        "application/json",
        &other_source,
        json!({"id": "m4", "title": "Four"}),
    )
    .await;
    assert_eq!(outcomes(&fresh), ["inserted"]);

    app.settle().await;
    assert_eq!(app.ids("movies").await, ["m1", "m2", "m3", "m4"]);
    assert_eq!(
        app.record("movies", "m1").await.unwrap()["title"],
        "One",
        "the duplicate was not applied"
    );
    assert_eq!(app.record("movies", "m3").await.unwrap()["title"], "Three");
}

#[tokio::test]
async fn invalid_cloudevents_are_refused_with_nothing_stored() {
    let app = TestApp::start().await;
    let structured = "application/cloudevents+json";
    let cases = [
        json!({"id": "e", "source": "/s", "type": "t", "data": {"id": "m"}}),
        json!({"specversion": "0.3", "id": "e", "source": "/s", "type": "t", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "source": "/s", "type": "t", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "id": "", "source": "/s", "type": "t", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "id": "e", "type": "t", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t"}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "data_base64": "%%%"}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "data_base64": "bm90IGpzb24="}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "data": {"id": "m"}, "data_base64": "e30="}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "datacontenttype": "application/xml", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "time": "noon", "data": {"id": "m"}}),
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "data": {"title": "no id"}}),
        json!([cloudevent("e", json!({"id": "m"}))]),
    ];
    for body in cases {
        post_as(&app, structured, &[], body).await.problem(400);
    }
    let batch = "application/cloudevents-batch+json";
    post_as(&app, batch, &[], cloudevent("e", json!({"id": "m"})))
        .await
        .problem(400);
    post_as(
        &app,
        batch,
        &[],
        json!([cloudevent("ok", json!({"id": "m1"})), {"specversion": "1.0"}]),
    )
    .await
    .problem(400);
    post_as(
        &app,
        "application/json",
        &[
            ("ce-specversion", "1.0"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ],
        json!({"id": "m"}),
    )
    .await
    .problem(400);
    post_as(
        &app,
        "application/json",
        &[
            ("ce-specversion", "2.0"),
            ("ce-id", "e"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ],
        json!({"id": "m"}),
    )
    .await
    .problem(400);
    post_as(
        &app,
        "text/plain",
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "e"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ],
        json!({"id": "m"}),
    )
    .await
    .problem(415);
    app.settle().await;
    assert_eq!(app.app.pipeline().engine.log.latest(), 0, "nothing stored");
    assert!(
        app.app.pipeline().dedup.is_empty(),
        "no dedup key remembered from a rejected request"
    );
}

/// A client that writes through an instance and then reads through it sees
/// its write at once, everywhere: in the record, in the next write's
/// outcome, under `If-Match`, and in the change log. On JetStream the
/// write is answered once the stream has it, before this instance has
/// read it back; the table takes it at once and a read of the log waits
/// for it, so this holds there too.
#[tokio::test]
async fn every_read_after_a_write_through_the_same_instance_sees_it() {
    let app = TestApp::start().await;
    let mut after = 0u64;
    for round in 0..40 {
        let id = format!("m{round}");
        let at = |day: u32| format!("2024-01-{day:02}T00:00:00Z");
        let write =
            |title: &str, day: u32| json!({"id": id, "title": title, "updated_at": at(day)});
        assert_eq!(app.outcomes("movies", write("A", 2)).await, ["inserted"]);
        assert_eq!(app.outcomes("movies", write("B", 3)).await, ["updated"]);
        // Older than B, equal to A: stale only if B is seen.
        assert_eq!(app.outcomes("movies", write("A", 2)).await, ["stale"]);
        assert_eq!(app.outcomes("movies", write("B", 3)).await, ["unchanged"]);

        let read = app.get(&format!("/tables/raw_movies/{id}")).await;
        assert_eq!(read.ok()["data"]["title"], "B", "{}", read.text);
        let etag = read.headers[header::ETAG].to_str().unwrap().to_string();
        assert_eq!(etag, format!("\"{}\"", at(3)));
        let update = Request::post("/raw/movies")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::IF_MATCH, &etag)
            .body(Body::from(write("C", 4).to_string()))
            .unwrap();
        let update = app.send(update).await;
        assert_eq!(update.ok()["results"][0]["outcome"], "updated");

        // The log holds the three changes of this round's record, the
        // last one C, whatever of the handler's work has come in between.
        let changes: Vec<Value> =
            events(&app, &format!("after={after}&limit=1000&table=raw_movies")).await;
        let mine: Vec<&Value> = changes
            .iter()
            .filter(|e| e["subject"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 3, "{changes:?}");
        assert_eq!(mine[2]["data"]["title"], "C", "{changes:?}");
        after = mine[2]["sequence"].as_str().unwrap().parse().unwrap();
    }
    app.settle().await;
}
