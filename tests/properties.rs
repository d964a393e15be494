//! The laws the tables keep, checked on generated inputs.
//!
//! - Convergence: any permutation and duplication of a set of versioned
//!   writes and deletes gives the same final table, equal to a simple model.
//! - Reconciliation: after a full set as of T, exactly the records neither
//!   in the set nor written after T are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::DateTime;
use proptest::prelude::*;
use serde_json::json;

use eventsys::engine::log::{Cause, ChangeLog};
use eventsys::engine::record::{Data, RecordId, Timestamp, Version};
use eventsys::engine::settle::Activity;
use eventsys::engine::table::{Record, Table, TableKind, Write};
use eventsys::media::records::{Kind, parse_record, standardise};

#[derive(Clone, Debug)]
enum Op {
    Write { id: u8, at: i64, value: u8 },
    Delete { id: u8, at: i64 },
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_datetime(DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap())
}

fn rid(id: u8) -> RecordId {
    RecordId::parse(&format!("r{id}")).unwrap()
}

fn data(value: u8) -> Data {
    Data::canonical(&json!({ "value": value })).unwrap()
}

fn new_table() -> Table {
    Table::new(
        "t",
        TableKind::Raw,
        Arc::new(ChangeLog::new(1_000_000, Activity::default())),
    )
}

fn apply(table: &Table, op: &Op) {
    let cause = Cause::request("prop");
    match *op {
        Op::Write { id, at, value } => {
            table.apply(
                Write {
                    id: rid(id),
                    version: Version::write(ts(at), data(value)),
                    data: data(value),
                },
                &cause,
            );
        }
        Op::Delete { id, at } => {
            table.delete(&rid(id), ts(at), &cause);
        }
    }
}

/// The final state by definition: per id, the greatest write by (time,
/// canonical data), unless a delete at or after its time exists.
fn model(ops: &[Op]) -> Vec<Record> {
    let mut writes: BTreeMap<u8, Version> = BTreeMap::new();
    let mut deletes: BTreeMap<u8, i64> = BTreeMap::new();
    for op in ops {
        match *op {
            Op::Write { id, at, value } => {
                let v = Version::write(ts(at), data(value));
                let best = writes.entry(id).or_insert_with(|| v.clone());
                if v > *best {
                    *best = v;
                }
            }
            Op::Delete { id, at } => {
                let best = deletes.entry(id).or_insert(at);
                *best = (*best).max(at);
            }
        }
    }
    writes
        .into_iter()
        .filter(|(id, w)| deletes.get(id).is_none_or(|&d| w.at > ts(d)))
        .map(|(id, version)| {
            let eventsys::engine::record::Tie::Key(key) = &version.tie else {
                unreachable!()
            };
            Record {
                id: rid(id),
                data: key.clone(),
                version,
            }
        })
        .collect()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4u8, 0..6i64, 0..3u8).prop_map(|(id, at, value)| Op::Write { id, at, value }),
        1 => (0..4u8, 0..6i64).prop_map(|(id, at)| Op::Delete { id, at }),
    ]
}

/// A set of operations, and an arrival order that permutes and duplicates it.
fn ops_and_arrival() -> impl Strategy<Value = (Vec<Op>, Vec<Op>)> {
    prop::collection::vec(op(), 1..24)
        .prop_flat_map(|ops| {
            let n = ops.len();
            (Just(ops), prop::collection::vec(0..n, n..n * 3))
        })
        .prop_flat_map(|(ops, extra)| {
            let mut arrival: Vec<Op> = ops.clone();
            arrival.extend(extra.into_iter().map(|i| ops[i].clone()));
            (Just(ops), Just(arrival).prop_shuffle())
        })
}

/// Arbitrary JSON, including what the fast path must hand to the full
/// canonicaliser: floats, huge integers, non-ASCII keys, control characters.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        (-(1i64 << 54)..(1i64 << 54)).prop_map(|i| json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "\\PC{0,8}".prop_map(|s| json!(s)),
        "[\\x00-\\x1f\"\\\\/a-z\u{7f}\u{e9}\u{1f600}]{0,6}".prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-zA-Z_\u{e9}\u{1f600}\u{ff5e}]{0,4}", inner, 0..5)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A raw media record of any kind: the fields standardisation reads, each
/// absent, null, well-formed (padded, escaped, huge, fractional) or of the
/// wrong type, plus a field it ignores.
fn raw_media_record() -> impl Strategy<Value = (Kind, serde_json::Value)> {
    let text = prop_oneof![
        "[ a-zA-Z0-9]{0,6}",
        "[ \\x00-\\x1f\"\\\\\u{e9}\u{1f600}a]{0,6}",
    ];
    let field = prop_oneof![
        1 => Just(json!(null)),
        4 => text.clone().prop_map(|s| json!(s)),
        4 => text.clone().prop_map(|s| json!(format!("  {s}x "))),
        1 => (-(1i64 << 60)..(1i64 << 60)).prop_map(|i| json!(i)),
        3 => (0u64..4000).prop_map(|u| json!(u)),
        2 => (0u32..100).prop_map(|n| json!(f64::from(n) / 2.0)),
        1 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        1 => Just(json!("1970-02-03")),
        2 => prop::collection::vec(text.prop_map(|s| json!(format!("{s}a"))), 0..3)
            .prop_map(|v| json!(v)),
        1 => prop::collection::vec(any::<bool>().prop_map(|b| json!(b)), 1..3).prop_map(|v| json!(v)),
    ];
    let names = [
        "name",
        "birth_date",
        "title",
        "year",
        "actor_ids",
        "series_id",
        "season",
        "number",
        "duration_s",
        "extra",
    ];
    let fields = prop::collection::vec(prop::option::weighted(0.8, field), names.len());
    let kind = prop::sample::select(Kind::ALL.to_vec());
    (kind, fields).prop_map(move |(kind, fields)| {
        let mut record = serde_json::Map::new();
        record.insert("id".into(), json!("r1"));
        for (name, value) in names.iter().zip(fields) {
            if let Some(value) = value {
                record.insert(name.to_string(), value);
            }
        }
        (kind, serde_json::Value::Object(record))
    })
}

/// What a field of a raw record says once standardised: strings trimmed,
/// null and absent alike.
fn standardised(raw: &serde_json::Value, name: &str) -> serde_json::Value {
    match raw.get(name) {
        Some(serde_json::Value::String(s)) => json!(s.trim()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or(i.clone(), |s| json!(s.trim())))
            .collect(),
        Some(other) => other.clone(),
        None => json!(null),
    }
}

proptest! {
    #[test]
    fn standard_records_are_canonical_and_say_what_the_raw_record_said(
        (kind, value) in raw_media_record()
    ) {
        let write = parse_record(value.clone(), Timestamp::now(), kind).unwrap();
        match standardise(kind, &write.id, &write.data, &[]) {
            Ok(standard) => {
                let text = standard.as_str();
                let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
                let canonical = Data::canonical(&parsed).unwrap();
                prop_assert_eq!(text, canonical.as_str());
                prop_assert_eq!(&parsed["id"], &json!("r1"));
                for (name, got) in parsed.as_object().unwrap() {
                    let want = standardised(&value, name);
                    match name.as_str() {
                        "id" => {}
                        "rendition_ids" => prop_assert_eq!(got, &json!([])),
                        "actor_ids" if want.is_null() => prop_assert_eq!(got, &json!([])),
                        // Numbers compare as numbers: 12.0 is written 12.
                        "year" | "season" | "number" | "duration_s" if !got.is_null() => {
                            prop_assert_eq!(got.as_f64(), want.as_f64());
                        }
                        _ => prop_assert_eq!(got, &want),
                    }
                }
            }
            Err(invalid) => {
                let field = invalid.field.split('[').next().unwrap_or_default();
                prop_assert!(
                    value.get(field).is_some_and(|v| !v.is_null()) || invalid.reason == "is required",
                    "{} names a field the record does not have", invalid
                );
            }
        }
    }

    #[test]
    fn the_canonical_fast_path_agrees_with_rfc_8785(value in json_value()) {
        let fast = Data::of_value(&value).unwrap();
        let full = Data::canonical(&value).unwrap();
        prop_assert_eq!(fast.as_str(), full.as_str());
        if let serde_json::Value::Object(map) = &value {
            let object = Data::of_object(map).unwrap();
            prop_assert_eq!(object.as_str(), full.as_str());
        }
    }

    #[test]
    fn any_order_and_duplication_converges_to_the_model((ops, arrival) in ops_and_arrival()) {
        let in_order = new_table();
        ops.iter().for_each(|op| apply(&in_order, op));
        let shuffled = new_table();
        arrival.iter().for_each(|op| apply(&shuffled, op));
        let expected = model(&ops);
        prop_assert_eq!(&in_order.snapshot(), &expected);
        prop_assert_eq!(&shuffled.snapshot(), &expected);
        prop_assert_eq!(shuffled.len(), expected.len() as u64);
    }

    #[test]
    fn reconciliation_deletes_exactly_the_unseen_and_older(
        before in prop::collection::btree_map(0..12u8, (0..10i64, 0..3u8), 0..12),
        set in prop::collection::btree_map(0..12u8, (0..10i64, 0..3u8), 0..12),
        as_of in 0..10i64,
    ) {
        let table = new_table();
        for (&id, &(at, value)) in &before {
            apply(&table, &Op::Write { id, at, value });
        }
        let writes = set
            .iter()
            .map(|(&id, &(at, value))| Write { id: rid(id), version: Version::write(ts(at), data(value)), data: data(value) })
            .collect();
        let report = table.reconcile(ts(as_of), writes, &Cause::request("prop"));

        let mut expected_deleted: Vec<RecordId> = before
            .iter()
            .filter(|(id, (at, _))| !set.contains_key(id) && *at <= as_of)
            .map(|(&id, _)| rid(id))
            .collect();
        expected_deleted.sort();
        prop_assert_eq!(&report.deleted, &expected_deleted);
        let live: BTreeSet<RecordId> = table.page(None, 1000).0.into_iter().map(|r| r.id).collect();
        let expected_live: BTreeSet<RecordId> = before
            .keys()
            .chain(set.keys())
            .map(|&id| rid(id))
            .filter(|id| !expected_deleted.contains(id))
            .collect();
        prop_assert_eq!(live, expected_live);

        // An older reconciliation deletes nothing newer than itself.
        let older = table.reconcile(ts(as_of - 1), Vec::new(), &Cause::request("prop"));
        prop_assert!(older.deleted.is_empty(), "older reconciliation deleted {:?}", older.deleted);
    }
}
