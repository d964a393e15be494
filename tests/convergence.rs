//! The convergence law over the whole pipeline, not one table at a time.
//!
//! A random set of writes (series and videos with and without their child
//! lists, listed episodes with their own `updated_at`, episodes posted on
//! their own, client deletes and reconciliations, many at equal instants)
//! is applied in a random order, with repeats, from several concurrent
//! clients. Once the pipeline settles, every table must equal a model
//! computed from the set of writes alone (API.md, "The convergence law"):
//! raw tables by id, version and data; derived tables by id and data;
//! scenario 5's views must be what the settled standard tables imply; and
//! scenario 6's publications all published
//! (actors and movies take part for them).
//!
//! Cases: `CONVERGENCE_CASES` (default 2000, about 20 s on two cores).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};

use eventsys::engine::log::Cause;
use eventsys::engine::record::{Data, RecordId, Timestamp, Version};
use eventsys::media::pipeline::{Pipeline, PipelineConfig};
use eventsys::media::records::{Kind, parse_record};

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_datetime(DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap())
}

fn rid(id: &str) -> RecordId {
    RecordId::parse(id).unwrap()
}

/// One thing a client does.
#[derive(Clone, Debug)]
enum Op {
    /// `POST /raw/{kind}` of one record (always with `updated_at`).
    Post(Kind, Value),
    /// `DELETE /raw/{kind}/{id}?version=`.
    Delete(Kind, String, i64),
    /// `PUT /raw/{kind}`: records without `updated_at` are versioned at `as_of`.
    Reconcile(Kind, i64, Vec<Value>),
}

fn listed_episode() -> impl Strategy<Value = Value> {
    (
        0..3u8,
        prop::sample::select(vec!["pilot", "finale"]),
        prop::option::of(1..3u8),
        prop::option::weighted(0.3, 0..4i64),
    )
        .prop_map(|(e, title, season, own_at)| {
            let mut episode = json!({"id": format!("e{e}"), "title": title, "season": season});
            if let Some(at) = own_at {
                episode["updated_at"] = json!(ts(at).to_string());
            }
            episode
        })
}

fn rendition() -> impl Strategy<Value = Value> {
    (
        0..3u8,
        prop::sample::select(vec!["h264", "vp9"]),
        prop::sample::select(vec![360u64, 720]),
        prop::option::of(prop::sample::select(vec![800u64, 3000])),
    )
        .prop_map(|(r, codec, height, bitrate)| {
            let mut rendition = json!({"id": format!("r{r}"), "codec": codec, "height": height});
            if let Some(bitrate) = bitrate {
                rendition["bitrate_kbps"] = json!(bitrate);
            }
            rendition
        })
}

/// Child lists with unique ids, as ingest requires.
fn unique(list: Vec<Value>) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    list.into_iter()
        .filter(|c| seen.insert(c["id"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// A record of `kind` without `updated_at`.
fn record(kind: Kind) -> BoxedStrategy<Value> {
    let title = prop::sample::select(vec!["A", "B"]);
    match kind {
        Kind::Series => (
            0..2u8,
            title,
            prop::option::weighted(0.6, prop::collection::vec(listed_episode(), 0..3)),
        )
            .prop_map(|(s, title, episodes)| {
                let mut series = json!({"id": format!("s{s}"), "title": title});
                if let Some(list) = episodes {
                    series["episodes"] = Value::Array(unique(list));
                }
                series
            })
            .boxed(),
        Kind::Videos => (
            0..2u8,
            title,
            prop::option::weighted(0.6, prop::collection::vec(rendition(), 0..3)),
        )
            .prop_map(|(v, title, renditions)| {
                let mut video = json!({"id": format!("v{v}"), "title": title});
                if let Some(list) = renditions {
                    video["renditions"] = Value::Array(unique(list));
                }
                video
            })
            .boxed(),
        Kind::Actors => (0..3u8, prop::sample::select(vec!["Ada", "Bo"]))
            .prop_map(|(a, name)| json!({"id": format!("a{a}"), "name": name}))
            .boxed(),
        Kind::Movies => (
            0..3u8,
            title,
            prop::option::of(1990..1992i64),
            prop::collection::vec(0..4u8, 0..3),
        )
            .prop_map(|(m, title, year, cast)| {
                let cast: Vec<String> = cast.into_iter().map(|a| format!("a{a}")).collect();
                json!({"id": format!("m{m}"), "title": title, "year": year, "actor_ids": cast})
            })
            .boxed(),
        Kind::Episodes => (
            0..3u8,
            0..2u8,
            title,
            prop::option::of(1..3u8),
        )
            .prop_map(|(e, s, title, season)| {
                json!({"id": format!("e{e}"), "series_id": format!("s{s}"), "title": title, "season": season})
            })
            .boxed(),
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    let at = 0..4i64;
    prop_oneof![
        8 => (kind(), at.clone()).prop_flat_map(|(k, at)| record(k).prop_map(move |mut r| {
            r["updated_at"] = json!(ts(at).to_string());
            Op::Post(k, r)
        })),
        2 => (kind(), 0..3u8, at.clone()).prop_map(|(k, n, at)| {
            let prefix = match k {
                Kind::Actors => "a",
                Kind::Movies => "m",
                Kind::Series => "s",
                Kind::Videos => "v",
                Kind::Episodes => "e",
            };
            Op::Delete(k, format!("{prefix}{n}"), at)
        }),
        2 => (kind(), at).prop_flat_map(|(k, as_of)| {
            let member = (record(k), prop::option::weighted(0.4, 0..4i64)).prop_map(|(mut r, at)| {
                if let Some(at) = at {
                    r["updated_at"] = json!(ts(at).to_string());
                }
                r
            });
            prop::collection::vec(member, 0..3).prop_map(move |records| Op::Reconcile(k, as_of, records))
        }),
    ]
}

/// A set of operations, an arrival order that permutes and repeats it, and
/// how many concurrent clients share the arrival order.
fn case() -> impl Strategy<Value = (Vec<Op>, Vec<Op>, usize)> {
    prop::collection::vec(op(), 1..16)
        .prop_flat_map(|ops| {
            let n = ops.len();
            (Just(ops), prop::collection::vec(0..n, 0..n), 1..4usize)
        })
        .prop_flat_map(|(ops, repeats, clients)| {
            let mut arrival = ops.clone();
            arrival.extend(repeats.into_iter().map(|i| ops[i].clone()));
            (Just(ops), Just(arrival).prop_shuffle(), Just(clients))
        })
}

// ---------------------------------------------------------------------------
// The model: every table as a function of the set of operations.
// ---------------------------------------------------------------------------

/// A raw write as the table sees it.
#[derive(Clone, Debug)]
struct RawWrite {
    id: RecordId,
    version: Version,
    /// The raw record as JSON (for child lists).
    json: Value,
}

fn raw_write(kind: Kind, value: &Value, default_at: Timestamp) -> RawWrite {
    let write = parse_record(value.clone(), default_at, kind).unwrap();
    RawWrite {
        id: write.id,
        version: write.version,
        json: serde_json::from_str(write.data.as_str()).unwrap(),
    }
}

/// One raw table's inputs: every write, the latest delete per id, and the
/// current reconciliation (greatest `as_of`, then greatest id list JSON).
#[derive(Default)]
struct RawInputs {
    writes: Vec<RawWrite>,
    deletes: BTreeMap<RecordId, Timestamp>,
    current: Option<(Timestamp, String, BTreeSet<RecordId>)>,
}

impl RawInputs {
    fn greatest_own(&self) -> BTreeMap<RecordId, RawWrite> {
        let mut best: BTreeMap<RecordId, RawWrite> = BTreeMap::new();
        for w in &self.writes {
            match best.get(&w.id) {
                Some(b) if b.version >= w.version => {}
                _ => {
                    best.insert(w.id.clone(), w.clone());
                }
            }
        }
        best
    }

    /// Whether a record whose greatest write is `version` is live.
    fn live(&self, id: &RecordId, version: &Version) -> bool {
        if self.deletes.get(id).is_some_and(|d| version.at <= *d) {
            return false;
        }
        match &self.current {
            Some((as_of, _, set)) => set.contains(id) || version.at > *as_of,
            None => true,
        }
    }
}

/// What the pipeline's tables should hold: table -> id -> (version, data).
/// Derived tables' versions are not compared.
type Tables = BTreeMap<&'static str, BTreeMap<RecordId, (Version, Value)>>;

fn model(ops: &[Op]) -> Tables {
    let mut inputs: BTreeMap<&'static str, RawInputs> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Post(kind, value) => {
                let w = raw_write(*kind, value, ts(0));
                inputs.entry(kind.raw_table()).or_default().writes.push(w);
            }
            Op::Delete(kind, id, at) => {
                let d = inputs
                    .entry(kind.raw_table())
                    .or_default()
                    .deletes
                    .entry(rid(id))
                    .or_insert(ts(*at));
                *d = (*d).max(ts(*at));
            }
            Op::Reconcile(kind, as_of, records) => {
                let table = inputs.entry(kind.raw_table()).or_default();
                let mut ids = BTreeSet::new();
                for r in records {
                    let w = raw_write(*kind, r, ts(*as_of));
                    ids.insert(w.id.clone());
                    table.writes.push(w);
                }
                let key =
                    serde_json::to_string(&ids.iter().map(|i| i.as_str()).collect::<Vec<_>>())
                        .unwrap();
                let candidate = (ts(*as_of), key, ids);
                if table
                    .current
                    .as_ref()
                    .is_none_or(|c| (candidate.0, &candidate.1) > (c.0, &c.1))
                {
                    table.current = Some(candidate);
                }
            }
        }
    }
    let empty = RawInputs::default();
    let get = |name: &str| inputs.get(name).unwrap_or(&empty);

    let mut tables = Tables::new();
    // A parent's listing: the greatest version carrying the field, while
    // the parent is live.
    let listings = |name: &str, field: &str| -> BTreeMap<RecordId, (Version, Vec<Value>)> {
        let table = get(name);
        let mut listing: BTreeMap<RecordId, (Version, Vec<Value>)> = BTreeMap::new();
        for w in &table.writes {
            let Some(list) = w.json.get(field).and_then(Value::as_array) else {
                continue;
            };
            match listing.get(&w.id) {
                Some((v, _)) if *v >= w.version => {}
                _ => {
                    listing.insert(w.id.clone(), (w.version.clone(), list.clone()));
                }
            }
        }
        table
            .greatest_own()
            .into_iter()
            .filter(|(id, w)| table.live(id, &w.version))
            .filter_map(|(id, _)| listing.remove(&id).map(|l| (id, l)))
            .collect()
    };
    let series_listing = listings("raw_series", "episodes");
    let video_listing = listings("raw_videos", "renditions");

    for (name, standard) in [("raw_series", "series"), ("raw_videos", "videos")] {
        let table = get(name);
        let mut raw = BTreeMap::new();
        let mut std_table = BTreeMap::new();
        for (id, w) in table.greatest_own() {
            if !table.live(&id, &w.version) {
                continue;
            }
            let standard_record = if standard == "series" {
                json!({"id": id, "title": w.json["title"]})
            } else {
                let ids: Vec<Value> = video_listing
                    .get(&id)
                    .map(|(_, list)| list.iter().map(|r| r["id"].clone()).collect())
                    .unwrap_or_default();
                json!({"id": id, "title": w.json["title"], "duration_s": null, "rendition_ids": ids})
            };
            std_table.insert(id.clone(), (w.version.clone(), standard_record));
            raw.insert(id, (w.version, w.json));
        }
        tables.insert(name, raw);
        tables.insert(standard, std_table);
    }

    // raw_episodes: the greatest of each episode's own writes and the
    // listings of the live parents that list it.
    let episodes = get("raw_episodes");
    let mut candidates: BTreeMap<RecordId, Vec<(Version, Value)>> = BTreeMap::new();
    for w in &episodes.writes {
        candidates
            .entry(w.id.clone())
            .or_default()
            .push((w.version.clone(), w.json.clone()));
    }
    for (series, (version, list)) in &series_listing {
        for item in list {
            let mut data = item.clone();
            let map = data.as_object_mut().unwrap();
            map.remove("updated_at");
            map.insert("series_id".into(), json!(series));
            let canonical = Data::canonical(&data).unwrap();
            candidates
                .entry(rid(item["id"].as_str().unwrap()))
                .or_default()
                .push((
                    version.clone(),
                    serde_json::from_str(canonical.as_str()).unwrap(),
                ));
        }
    }
    let mut raw_episodes = BTreeMap::new();
    let mut std_episodes = BTreeMap::new();
    for (id, list) in candidates {
        let Some((version, data)) = list.into_iter().max_by(|a, b| a.0.cmp(&b.0)) else {
            continue;
        };
        if !episodes.live(&id, &version) {
            continue;
        }
        std_episodes.insert(
            id.clone(),
            (
                version.clone(),
                json!({"id": id, "series_id": data["series_id"], "title": data["title"],
                       "season": data["season"], "number": null}),
            ),
        );
        raw_episodes.insert(id, (version, data));
    }
    tables.insert("raw_episodes", raw_episodes);
    tables.insert("episodes", std_episodes);

    let mut encodes = BTreeMap::new();
    for (video, (version, list)) in &video_listing {
        for r in list {
            let id = rid(&format!("{video}:{}", r["id"].as_str().unwrap()));
            encodes.insert(
                id.clone(),
                (
                    version.clone(),
                    json!({"id": id, "video_id": video, "rendition_id": r["id"],
                           "codec": r["codec"], "height": r["height"],
                           "bitrate_kbps": r.get("bitrate_kbps").cloned().unwrap_or(Value::Null),
                           "status": "encoded"}),
                ),
            );
        }
    }
    tables.insert("encodes", encodes);
    tables
}

// ---------------------------------------------------------------------------
// The pipeline.
// ---------------------------------------------------------------------------

async fn apply(pipeline: &Pipeline, op: &Op) {
    let cause = Cause::request("convergence");
    match op {
        Op::Post(kind, value) => {
            let write = parse_record(value.clone(), ts(0), *kind).unwrap();
            pipeline
                .ingest(*kind, vec![write], &cause)
                .await
                .expect("admitted");
        }
        Op::Delete(kind, id, at) => {
            pipeline
                .delete(*kind, &rid(id), ts(*at), &cause)
                .await
                .expect("admitted");
        }
        Op::Reconcile(kind, as_of, records) => {
            let writes = records
                .iter()
                .map(|r| parse_record(r.clone(), ts(*as_of), *kind).unwrap())
                .collect();
            pipeline
                .reconcile(*kind, ts(*as_of), writes, &cause)
                .await
                .expect("admitted");
        }
    }
}

fn tables_of(pipeline: &Pipeline) -> Tables {
    let names = [
        "raw_series",
        "raw_videos",
        "raw_episodes",
        "series",
        "videos",
        "episodes",
        "encodes",
    ];
    names
        .into_iter()
        .map(|name| {
            let table = pipeline.engine.table(name).unwrap();
            let (records, next) = table.page(None, 1000);
            assert!(next.is_none());
            let records = records
                .into_iter()
                .map(|r| {
                    let data = serde_json::from_str(r.data.as_str()).unwrap();
                    (r.id, (r.version, data))
                })
                .collect();
            (name, records)
        })
        .collect()
}

/// A table's live records, by id, as JSON.
fn contents(pipeline: &Pipeline, name: &str) -> BTreeMap<String, Value> {
    let table = pipeline.engine.table(name).unwrap();
    table
        .snapshot()
        .into_iter()
        .map(|r| {
            let data = serde_json::from_str(r.data.as_str()).unwrap();
            (r.id.as_str().to_string(), data)
        })
        .collect()
}

/// Scenario 5's views as API.md defines them from the standard tables.
fn views_implied(pipeline: &Pipeline) -> [BTreeMap<String, Value>; 2] {
    let movies = contents(pipeline, "movies");
    let filmography = contents(pipeline, "actors")
        .into_iter()
        .map(|(id, actor)| {
            let mut credits: Vec<&Value> = movies
                .values()
                .filter(|m| m["actor_ids"].as_array().unwrap().contains(&json!(id)))
                .collect();
            credits.sort_by_key(|m| {
                let year = m["year"].as_i64();
                (
                    year.is_none(),
                    year,
                    m["title"].to_string(),
                    m["id"].to_string(),
                )
            });
            let credits: Vec<Value> = credits
                .into_iter()
                .map(|m| json!({"id": m["id"], "title": m["title"], "year": m["year"]}))
                .collect();
            let record = json!({"id": id, "name": actor["name"], "movies": credits});
            (id, record)
        })
        .collect();
    let episodes = contents(pipeline, "episodes");
    let overview = contents(pipeline, "series")
        .into_iter()
        .map(|(id, series)| {
            let own: Vec<&Value> = episodes
                .values()
                .filter(|e| e["series_id"] == json!(id))
                .collect();
            let seasons: BTreeSet<u64> = own.iter().filter_map(|e| e["season"].as_u64()).collect();
            let record = json!({"id": id, "title": series["title"],
                "seasons": seasons.len(), "episodes": own.len()});
            (id, record)
        })
        .collect();
    [filmography, overview]
}

/// Scenario 6 without faults: each live video published, all of its
/// renditions encoded, in its first attempt.
fn published_implied(pipeline: &Pipeline) -> BTreeMap<String, Value> {
    let videos = pipeline.engine.table("videos").unwrap().snapshot();
    videos
        .into_iter()
        .map(|video| {
            let data: Value = serde_json::from_str(video.data.as_str()).unwrap();
            let total = data["rendition_ids"].as_array().map_or(0, Vec::len);
            let id = video.id.as_str().to_string();
            let record = json!({"id": id, "status": "published", "attempt": 1, "since": 0,
                "done": total, "total": total});
            (id, record)
        })
        .collect()
}

fn run_case(ops: &[Op], arrival: &[Op], clients: usize) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let got = runtime.block_on(async {
        let pipeline = Arc::new(Pipeline::start(PipelineConfig {
            encode_delay: Duration::ZERO,
            raw_workers: 2,
            ..PipelineConfig::default()
        }));
        // Each client takes every `clients`-th operation of the arrival
        // order, all starting at once.
        let start = Arc::new(tokio::sync::Barrier::new(clients));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mine: Vec<Op> = arrival.iter().skip(c).step_by(clients).cloned().collect();
            let (pipeline, start) = (pipeline.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                for op in &mine {
                    apply(&pipeline, op).await;
                    tokio::task::yield_now().await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(
            pipeline.engine.settle(Duration::from_secs(20)).await,
            "the pipeline did not settle"
        );
        for queue in pipeline.engine.queues() {
            assert!(
                queue.dead_letters().is_empty(),
                "{}: {:?}",
                queue.name(),
                queue.dead_letters()
            );
        }
        let got = tables_of(&pipeline);
        let views = [
            contents(&pipeline, "filmography"),
            contents(&pipeline, "series_overview"),
        ];
        let implied = views_implied(&pipeline);
        let publications = contents(&pipeline, "publications");
        let published = published_implied(&pipeline);
        pipeline.engine.shutdown(Duration::ZERO).await;
        (got, views, implied, publications, published)
    });
    let (got, views, implied, publications, published) = got;
    prop_assert_eq!(
        publications,
        published,
        "without faults every live video ends published, and only those"
    );
    for (view, implied) in views.iter().zip(&implied) {
        prop_assert_eq!(
            view,
            implied,
            "a view is not what the standard tables imply"
        );
    }
    let expected = model(ops);
    for (name, want) in &expected {
        let have = &got[name];
        if name.starts_with("raw_") {
            prop_assert_eq!(have, want, "table {}", name);
        } else {
            let data = |t: &BTreeMap<RecordId, (Version, Value)>| -> BTreeMap<RecordId, Value> {
                t.iter().map(|(k, (_, d))| (k.clone(), d.clone())).collect()
            };
            prop_assert_eq!(data(have), data(want), "table {}", name);
        }
    }
    Ok(())
}

#[test]
fn the_whole_pipeline_converges_whatever_the_order() {
    let cases = std::env::var("CONVERGENCE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&case(), |(ops, arrival, clients)| {
        run_case(&ops, &arrival, clients)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
