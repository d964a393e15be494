//! Scenario 5: the views `projection_handler` keeps from the standard
//! tables, told as a story through the HTTP API.

use serde_json::json;

use crate::helpers::TestApp;

fn movie(id: &str, title: &str, year: Option<i64>, cast: &[&str], at: &str) -> serde_json::Value {
    json!({"id": id, "title": title, "year": year, "actor_ids": cast, "updated_at": at})
}

#[tokio::test]
async fn scenario_5_filmography_follows_actors_and_movies_in_any_order() {
    let app = TestApp::start().await;

    // A movie naming an actor not yet known: no entry until the actor is live.
    app.outcomes(
        "movies",
        json!([
            movie(
                "m1",
                "Heat",
                Some(1995),
                &["a1", "a2"],
                "2024-01-01T00:00:00Z"
            ),
            movie(
                "m2",
                "Ronin",
                Some(1998),
                &["a1", "a1"],
                "2024-01-01T00:00:00Z"
            ),
            movie("m3", "Untitled", None, &["a1"], "2024-01-01T00:00:00Z"),
            movie("m4", "Casino", Some(1995), &["a1"], "2024-01-01T00:00:00Z"),
        ]),
    )
    .await;
    app.settle().await;
    assert!(app.ids("filmography").await.is_empty());

    app.outcomes(
        "actors",
        json!([
            {"id": "a1", "name": "Robert De Niro", "updated_at": "2024-01-01T00:00:00Z"},
            {"id": "a3", "name": "Nobody Yet", "updated_at": "2024-01-01T00:00:00Z"},
        ]),
    )
    .await;
    app.settle().await;
    // By year (null last), then title, then id; each movie once.
    assert_eq!(
        app.record("filmography", "a1").await.unwrap(),
        json!({"id": "a1", "name": "Robert De Niro", "movies": [
            {"id": "m4", "title": "Casino", "year": 1995},
            {"id": "m1", "title": "Heat", "year": 1995},
            {"id": "m2", "title": "Ronin", "year": 1998},
            {"id": "m3", "title": "Untitled", "year": null},
        ]})
    );
    assert_eq!(
        app.record("filmography", "a3").await.unwrap(),
        json!({"id": "a3", "name": "Nobody Yet", "movies": []})
    );

    // A movie that stops naming the actor leaves their entry; a retitled
    // one is shown retitled.
    app.outcomes(
        "movies",
        json!([
            movie("m1", "Heat", Some(1995), &["a2"], "2024-01-02T00:00:00Z"),
            movie(
                "m2",
                "Ronin (1998)",
                Some(1998),
                &["a1"],
                "2024-01-02T00:00:00Z"
            ),
        ]),
    )
    .await;
    app.delete("/raw/movies/m3?version=2024-01-02T00:00:00Z")
        .await
        .ok();
    app.settle().await;
    let a1 = app.record("filmography", "a1").await.unwrap();
    let titles: Vec<_> = a1["movies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Casino", "Ronin (1998)"]);

    // A reconciliation of the actors that lacks a1 hides it: no entry.
    let reply = app
        .put(
            "/raw/actors",
            json!({"as_of": "2024-01-05T00:00:00Z",
                   "records": [{"id": "a3", "name": "Nobody Yet", "updated_at": "2024-01-01T00:00:00Z"}]}),
        )
        .await;
    reply.ok();
    app.settle().await;
    assert_eq!(app.ids("filmography").await, ["a3"]);

    // The view is written only by its handler: one change per move, no
    // dead letters, and its records are versioned by the log.
    let queue = app.queue("projection_queue").await;
    assert_eq!(queue["dead_letters"], 0, "{queue}");
    assert_eq!(queue["processed"], queue["enqueued"], "{queue}");
}

#[tokio::test]
async fn scenario_5_series_overview_counts_live_episodes_listed_or_posted_alone() {
    let app = TestApp::start().await;
    app.outcomes(
        "episodes",
        json!([
            {"id": "e9", "series_id": "s1", "title": "Alone", "season": 3},
            {"id": "e8", "series_id": "s2", "title": "Elsewhere", "season": 1},
        ]),
    )
    .await;
    app.outcomes(
        "series",
        json!({"id": "s1", "title": "The Wire", "updated_at": "2024-01-01T00:00:00Z",
        "episodes": [
            {"id": "e1", "title": "The Target", "season": 1},
            {"id": "e2", "title": "The Detail", "season": 1},
            {"id": "e3", "title": "Untold"},
        ]}),
    )
    .await;
    app.settle().await;
    assert_eq!(
        app.record("series_overview", "s1").await.unwrap(),
        json!({"id": "s1", "title": "The Wire", "seasons": 2, "episodes": 4})
    );
    // s2 is not live: no overview, though it has an episode.
    assert_eq!(app.ids("series_overview").await, ["s1"]);

    // The list is the complete set: e2 goes, and the counts follow.
    app.outcomes(
        "series",
        json!({"id": "s1", "title": "The Wire", "updated_at": "2024-01-02T00:00:00Z",
               "episodes": [{"id": "e1", "title": "The Target", "season": 1}, {"id": "e3", "title": "Untold"}]}),
    )
    .await;
    app.settle().await;
    assert_eq!(
        app.record("series_overview", "s1").await.unwrap(),
        json!({"id": "s1", "title": "The Wire", "seasons": 2, "episodes": 3})
    );

    // Deleting the series deletes its overview.
    app.delete("/raw/series/s1?version=2024-01-03T00:00:00Z")
        .await
        .ok();
    app.settle().await;
    assert!(app.ids("series_overview").await.is_empty());
}

#[tokio::test]
async fn a_view_is_rebuilt_from_the_standard_tables_and_only_views_are() {
    let app = TestApp::start().await;
    app.outcomes(
        "actors",
        json!([{"id": "a1", "name": "Ada"}, {"id": "a2", "name": "Bo"}]),
    )
    .await;
    app.outcomes(
        "movies",
        json!([movie(
            "m1",
            "One",
            Some(2001),
            &["a1", "a2"],
            "2024-01-01T00:00:00Z"
        )]),
    )
    .await;
    app.settle().await;
    let before = app.get("/tables/filmography").await.ok().clone();

    let reply = app.post("/tables/filmography/rebuild", json!(null)).await;
    assert_eq!(reply.ok(), &json!({"rebuilt": 2}));
    assert_eq!(app.get("/tables/filmography").await.ok(), &before);
    assert_eq!(
        app.post("/tables/series_overview/rebuild", json!(null))
            .await
            .ok(),
        &json!({"rebuilt": 0})
    );

    let reply = app.post("/tables/movies/rebuild", json!(null)).await;
    let problem = reply.problem(409);
    assert!(
        problem["detail"].as_str().unwrap().contains("only views"),
        "{problem}"
    );
    app.post("/tables/nope/rebuild", json!(null))
        .await
        .problem(404);
}

#[tokio::test]
async fn tables_list_views_as_their_own_kind() {
    let app = TestApp::start().await;
    let tables = app.get("/tables").await.ok().clone();
    let kind = |name: &str| {
        tables["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["kind"].clone())
    };
    assert_eq!(kind("filmography"), Some(json!("view")));
    assert_eq!(kind("series_overview"), Some(json!("view")));
    assert_eq!(kind("movies"), Some(json!("standard")));
}
