//! Hostile input: one generated request per case, against every route.
//!
//! An app is seeded with a few records (a movie, a series with an episode,
//! a video with a rendition, a CloudEvent, and one record that ends in dead
//! letters). Each case lets the pipeline settle, takes a snapshot of
//! everything a request could change, and sends ONE generated request
//! through the router with `oneshot`. Apps are shared by
//! [`CASES_PER_APP`] cases (then replaced by a fresh one); once a case
//! fails, shrinking runs every case on a fresh app.
//!
//! Requests are built from the real route templates with valid or hostile
//! path segments, query strings with the route's own parameters or others
//! (valid, negative, huge, non-numeric, repeated), random headers
//! (Content-Type, If-Match, `ce-*`, Last-Event-ID, X-Request-Id) and bodies
//! that are arbitrary JSON, mutated valid bodies (records, reconciliations,
//! CloudEvents, faults), deep nesting, huge numbers, duplicate keys,
//! invalid UTF-8, empty or large. A live `text/event-stream` body is never
//! read (it does not end).
//!
//! Every response must be: no 5xx (except a 503 that says it is
//! backpressure or a settle timeout), every error `application/problem+json`
//! with `type`, `title`, `status` (equal to the HTTP status) and `detail`,
//! and after any 4xx/503 nothing changed: the change log, every table's
//! count and outcome counters, the dedup window, the queues, the handlers
//! and their faults are exactly as before.
//!
//! The same again on a server with a tokens file, each request carrying a
//! known token of some role, an unknown or malformed one, or none; a 401
//! must also challenge with `WWW-Authenticate: Bearer`.
//!
//! At least 10,000 cases per run (3,000 with tokens); `PROPTEST_CASES`
//! raises both.

use std::fmt;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt;

use eventsys::engine::handler::Fault;
use eventsys::engine::table::TableStats;
use eventsys::{App, Config};

// ---------------------------------------------------------------------------
// The request a case sends, printed readably when it fails.

#[derive(Clone)]
struct Req {
    method: &'static str,
    uri: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

impl Req {
    fn build(&self) -> Result<Request<Body>, String> {
        let mut builder = Request::builder()
            .method(Method::from_bytes(self.method.as_bytes()).map_err(|e| e.to_string())?)
            .uri(&self.uri);
        for (name, value) in &self.headers {
            let value = HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
            builder = builder.header(*name, value);
        }
        builder
            .body(Body::from(self.body.clone()))
            .map_err(|e| e.to_string())
    }
}

/// Bytes as text: control characters escaped, bytes that are not UTF-8 as
/// `\xNN`, and long runs of one character shortened to `⟨c × n⟩`, so that a
/// 10,000-character id stays readable yet exact.
fn show(bytes: &[u8]) -> String {
    let mut chars: Vec<String> = Vec::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            chars.push(if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            });
        }
        for b in chunk.invalid() {
            chars.push(format!("\\x{b:02x}"));
        }
    }
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        while j < chars.len() && chars[j] == chars[i] {
            j += 1;
        }
        if j - i >= 16 {
            out.push_str(&format!("⟨{} × {}⟩", chars[i], j - i));
        } else {
            out.push_str(&chars[i..j].concat());
        }
        i = j;
    }
    out
}

impl fmt::Debug for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(f, "    {} {}", self.method, show(self.uri.as_bytes()))?;
        for (name, value) in &self.headers {
            writeln!(f, "    {name}: {}", show(value))?;
        }
        write!(
            f,
            "    body ({} bytes): {}",
            self.body.len(),
            show(&self.body)
        )
    }
}

// ---------------------------------------------------------------------------
// JSON as a tree that keeps duplicate keys and raw number text.

#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    /// The number exactly as written (`1e400`, `-0`, 30 digits...).
    Num(String),
    Str(String),
    Arr(Vec<J>),
    /// Members in order; keys may repeat.
    Obj(Vec<(String, J)>),
}

impl J {
    fn from_value(value: &Value) -> J {
        match value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Number(n) => J::Num(n.to_string()),
            Value::String(s) => J::Str(s.clone()),
            Value::Array(items) => J::Arr(items.iter().map(J::from_value).collect()),
            Value::Object(map) => J::Obj(
                map.iter()
                    .map(|(k, v)| (k.clone(), J::from_value(v)))
                    .collect(),
            ),
        }
    }

    fn render(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => out.push_str(&Value::String(s.clone()).to_string()),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.render(out);
                }
                out.push(']');
            }
            J::Obj(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    value.render(out);
                }
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }

    fn children_mut(&mut self) -> Vec<&mut J> {
        match self {
            J::Arr(items) => items.iter_mut().collect(),
            J::Obj(members) => members.iter_mut().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        }
    }

    fn count(&self, objects_only: bool) -> usize {
        let own = usize::from(!objects_only || matches!(self, J::Obj(_)));
        own + match self {
            J::Arr(items) => items.iter().map(|i| i.count(objects_only)).sum(),
            J::Obj(members) => members.iter().map(|(_, v)| v.count(objects_only)).sum(),
            _ => 0,
        }
    }

    /// The `n`-th node in pre-order (objects only if asked), if any.
    fn nth(&mut self, n: &mut usize, objects_only: bool) -> Option<&mut J> {
        if !objects_only || matches!(self, J::Obj(_)) {
            if *n == 0 {
                return Some(self);
            }
            *n -= 1;
        }
        for child in self.children_mut() {
            if let Some(found) = child.nth(n, objects_only) {
                return Some(found);
            }
        }
        None
    }

    fn pick(&mut self, index: &Index, objects_only: bool) -> Option<&mut J> {
        let count = self.count(objects_only);
        if count == 0 {
            return None;
        }
        let mut n = index.index(count);
        self.nth(&mut n, objects_only)
    }
}

/// A change to a valid body.
#[derive(Clone, Debug)]
enum Mutation {
    /// Remove a member of some object.
    Drop(Index, Index),
    /// Replace some value (the root included) with another.
    Replace(Index, J),
    /// Repeat a member's key with another value, as a duplicate key.
    Duplicate(Index, Index, J),
    /// Add a member to some object.
    Add(Index, String, J),
    /// Put some value inside an array.
    Wrap(Index),
}

impl Mutation {
    fn apply(&self, root: &mut J) {
        match self {
            Mutation::Drop(at, member) => {
                if let Some(J::Obj(members)) = root.pick(at, true)
                    && !members.is_empty()
                {
                    members.remove(member.index(members.len()));
                }
            }
            Mutation::Replace(at, value) => {
                if let Some(node) = root.pick(at, false) {
                    *node = value.clone();
                }
            }
            Mutation::Duplicate(at, member, value) => {
                if let Some(J::Obj(members)) = root.pick(at, true)
                    && !members.is_empty()
                {
                    let key = members[member.index(members.len())].0.clone();
                    members.push((key, value.clone()));
                }
            }
            Mutation::Add(at, key, value) => {
                if let Some(J::Obj(members)) = root.pick(at, true) {
                    members.push((key.clone(), value.clone()));
                }
            }
            Mutation::Wrap(at) => {
                if let Some(node) = root.pick(at, false) {
                    let inner = std::mem::replace(node, J::Null);
                    *node = J::Arr(vec![inner]);
                }
            }
        }
    }
}

/// A change to the body's bytes, after rendering.
#[derive(Clone, Debug)]
enum Bytes {
    Keep,
    Truncate(Index),
    Insert(Index, &'static [u8]),
}

impl Bytes {
    fn apply(&self, body: &mut Vec<u8>) {
        match self {
            Bytes::Keep => {}
            Bytes::Truncate(at) => body.truncate(at.index(body.len() + 1)),
            Bytes::Insert(at, bytes) => {
                let at = at.index(body.len() + 1);
                body.splice(at..at, bytes.iter().copied());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Values.

const BIG_NUMBERS: &[&str] = &[
    "1e400",
    "-1e400",
    "1E-400",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "-0",
    "0.0",
    "1.5",
    "-1",
    "0",
    "60000",
    "60001",
    "1e3",
    "4.9e-324",
    "1.7976931348623157e308",
];

const WORDS: &[&str] = &[
    "",
    " ",
    "  \t ",
    "m1",
    "s1",
    "e1",
    "v1",
    "r1",
    "bad",
    "Heat",
    "movies",
    "raw_movies",
    "encode_handler",
    "h264",
    "a/b",
    "/",
    "..",
    "\u{0}",
    "\u{1}\u{1f}\u{7f}",
    "\n\r\t",
    "é",
    "🎬",
    "\u{202e}evil",
    "\u{feff}",
    "\u{fffd}",
    "null",
    "1.0",
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00+02:00",
    "2024-02-30T00:00:00Z",
    "2024-01-01",
    "1970-13-01",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
    "+275760-09-13T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "0000-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59.999999999-23:59",
    "2016-12-31T23:59:60Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01t00:00:00z",
    "2024-01-01T00:00:00.1234567891Z",
    "application/json",
    "text/plain",
    "eyJpZCI6Im05IiwidGl0bGUiOiJCNjQifQ==",
    "!!!not base64",
    "eventsys.record.inserted",
];

const FIELDS: &[&str] = &[
    "id",
    "title",
    "updated_at",
    "year",
    "actor_ids",
    "name",
    "birth_date",
    "episodes",
    "series_id",
    "season",
    "number",
    "renditions",
    "codec",
    "height",
    "bitrate_kbps",
    "duration_s",
    "as_of",
    "records",
    "specversion",
    "source",
    "type",
    "time",
    "data",
    "data_base64",
    "datacontenttype",
    "failure_rate",
    "permanent",
    "delay_ms",
    "",
    "ID",
    "__proto__",
];

fn long_string() -> impl Strategy<Value = String> {
    (
        select(&[2usize, 127, 128, 129, 1000, 10_000][..]),
        select(&['x', 'é', '🎬', '/', '\u{0}', ' '][..]),
    )
        .prop_map(|(n, c)| c.to_string().repeat(n))
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => select(WORDS).prop_map(String::from),
        3 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        1 => long_string(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(FIELDS).prop_map(String::from),
        1 => string(),
    ]
}

fn number() -> impl Strategy<Value = J> {
    use proptest::num::f64;
    prop_oneof![
        any::<i64>().prop_map(|n| J::Num(n.to_string())),
        (f64::POSITIVE | f64::NEGATIVE | f64::NORMAL | f64::SUBNORMAL | f64::ZERO)
            .prop_map(|f| J::Num(Value::from(f).to_string())),
        select(BIG_NUMBERS).prop_map(|s| J::Num(s.to_string())),
    ]
}

fn leaf() -> impl Strategy<Value = J> {
    prop_oneof![
        1 => Just(J::Null),
        1 => any::<bool>().prop_map(J::Bool),
        2 => number(),
        3 => string().prop_map(J::Str),
    ]
}

/// Arbitrary JSON (duplicate keys possible).
fn json_value() -> impl Strategy<Value = J> {
    leaf().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((key(), inner), 0..6).prop_map(J::Obj),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), any::<Index>()).prop_map(|(a, m)| Mutation::Drop(a, m)),
        4 => (any::<Index>(), json_value()).prop_map(|(a, v)| Mutation::Replace(a, v)),
        1 => (any::<Index>(), any::<Index>(), json_value())
            .prop_map(|(a, m, v)| Mutation::Duplicate(a, m, v)),
        1 => (any::<Index>(), key(), json_value()).prop_map(|(a, k, v)| Mutation::Add(a, k, v)),
        1 => any::<Index>().prop_map(Mutation::Wrap),
    ]
}

fn byte_change() -> impl Strategy<Value = Bytes> {
    const INSERTS: &[&[u8]] = &[
        b"\xff",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\x00",
        b",",
        b"}",
        b"]",
        b"\"",
        b"\\",
        b"\\ud800",
        b"\\u0000",
        b"\n",
        b"/*",
    ];
    prop_oneof![
        12 => Just(Bytes::Keep),
        1 => any::<Index>().prop_map(Bytes::Truncate),
        1 => (any::<Index>(), select(INSERTS)).prop_map(|(a, b)| Bytes::Insert(a, b)),
    ]
}

/// A valid body (as JSON), a few mutations, maybe a byte change.
fn mutated(valid: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
    (
        valid,
        prop_oneof![
            2 => Just(Vec::new()),
            3 => prop::collection::vec(mutation(), 1..4),
        ],
        byte_change(),
    )
        .prop_map(|(value, mutations, bytes)| {
            let mut tree = J::from_value(&value);
            for m in &mutations {
                m.apply(&mut tree);
            }
            let mut body = tree.text().into_bytes();
            bytes.apply(&mut body);
            body
        })
}

// ---------------------------------------------------------------------------
// Valid bodies to mutate.

fn records() -> Vec<Value> {
    vec![
        json!({"id": "m1", "title": "Heat", "year": 1995, "updated_at": "2024-01-01T00:00:00Z"}),
        json!({"id": "m1", "title": "Heat (director's cut)", "year": 1995, "updated_at": "2024-03-01T00:00:00Z"}),
        json!({"id": "m2", "title": "Ronin", "year": 1998, "actor_ids": ["a1", "a2"]}),
        json!({"id": "a1", "name": "Robert", "birth_date": "1943-08-17"}),
        json!({"id": "s1", "title": "Show", "episodes": [{"id": "e1", "title": "Pilot", "season": 1, "number": 1}], "updated_at": "2024-01-01T00:00:00Z"}),
        json!({"id": "s2", "title": "Other", "episodes": [{"id": "e7", "title": "One", "season": 1, "number": 1, "updated_at": "2024-01-02T00:00:00Z"}, {"id": "e8", "title": "Two"}]}),
        json!({"id": "s1", "title": "Show", "episodes": []}),
        json!({"id": "e2", "series_id": "s1", "title": "Second", "season": 1, "number": 2}),
        json!({"id": "v1", "title": "Clip", "duration_s": 12.5, "renditions": [{"id": "r1", "codec": "h264", "height": 720, "bitrate_kbps": 3000}], "updated_at": "2024-01-01T00:00:00Z"}),
        json!({"id": "m4", "title": "Far future", "updated_at": "9999-12-31T23:59:59.999999999-23:59"}),
        json!({"id": "m5", "title": "Year zero", "updated_at": "0000-01-01T00:00:00+23:59"}),
        json!({"id": "v2", "title": "Trailer", "duration_s": 90, "renditions": [{"id": "r1", "codec": "h264", "height": 1080}, {"id": "r2", "codec": "av1", "height": 2160, "bitrate_kbps": 16000}]}),
    ]
}

fn record() -> impl Strategy<Value = Value> {
    select(records())
}

fn cloud_event() -> impl Strategy<Value = Value> {
    (
        select(&["seed-1", "ev-1", "ev-2"][..]),
        select(&["/vendor", "/other"][..]),
        record(),
        0..4u8,
    )
        .prop_map(|(id, source, record, variant)| {
            let mut event = json!({
                "specversion": "1.0",
                "id": id,
                "source": source,
                "type": "com.vendor.record",
            });
            match variant {
                0 => event["data"] = record,
                1 => {
                    event["time"] = json!("2024-05-01T00:00:00Z");
                    event["datacontenttype"] = json!("application/json");
                    event["data"] = record;
                }
                2 => {
                    use base64::Engine as _;
                    event["data_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(record.to_string()));
                }
                _ => {
                    event["subject"] = json!("x");
                    event["data"] = record;
                }
            }
            event
        })
}

fn reconciliation() -> impl Strategy<Value = Value> {
    (
        select(vec![
            Value::Null,
            json!("2024-06-01T00:00:00Z"),
            json!("2023-01-01T00:00:00Z"),
            json!("2030-01-01T00:00:00+05:00"),
            json!("9999-12-31T23:59:59.999999999-23:59"),
            json!("0000-01-01T00:00:00+23:59"),
        ]),
        prop::collection::vec(record(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(as_of, records, with_as_of)| {
            if with_as_of {
                json!({"as_of": as_of, "records": records})
            } else {
                json!({"records": records})
            }
        })
}

fn fault() -> impl Strategy<Value = Value> {
    (
        select(vec![json!(0.0), json!(0.5), json!(1.0), json!(0)]),
        any::<bool>(),
        select(vec![json!(0), json!(5), json!(60_000)]),
    )
        .prop_map(|(rate, permanent, delay)| {
            json!({"failure_rate": rate, "permanent": permanent, "delay_ms": delay})
        })
}

// ---------------------------------------------------------------------------
// Bodies.

/// Nesting thousands of levels deep, alone or inside a record.
fn deep() -> impl Strategy<Value = Vec<u8>> {
    (
        select(&[64usize, 126, 127, 128, 129, 500, 3000][..]),
        select(
            &[
                ("[", "]"),
                ("{\"a\":", "}"),
                ("[{\"id\":\"m9\",\"x\":", "}]"),
            ][..],
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(depth, (open, close), in_record, closed)| {
            let mut text = String::new();
            if in_record {
                text.push_str("{\"id\":\"m9\",\"title\":\"Deep\",\"extra\":");
            }
            text.push_str(&open.repeat(depth));
            text.push('1');
            if closed {
                text.push_str(&close.repeat(depth));
                if in_record {
                    text.push('}');
                }
            }
            text.into_bytes()
        })
}

/// The body limit of the test app.
const BODY_LIMIT: usize = 256 * 1024;

fn large() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(format!(r#"{{"id":"big","title":"{}"}}"#, "x".repeat(200_000)).into_bytes()),
        Just(format!(r#"{{"id":"big","title":"{}"}}"#, "x".repeat(BODY_LIMIT)).into_bytes()),
        (1..300usize).prop_map(|n| {
            serde_json::to_vec(
                &(0..n)
                    .map(|i| json!({"id": format!("bulk{i}"), "title": "T"}))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default()
        }),
        Just(vec![b' '; BODY_LIMIT + 1]),
    ]
}

fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => select(vec![&b" \n\t "[..], b"null", b"[]", b"{}", b"\"\"", b"0", b"[{}]"])
            .prop_map(|b| b.to_vec()),
        6 => json_value().prop_map(|j| j.text().into_bytes()),
        5 => mutated(record()),
        3 => mutated(prop::collection::vec(record(), 0..4).prop_map(Value::from)),
        2 => mutated(cloud_event()),
        1 => mutated(prop::collection::vec(cloud_event(), 0..3).prop_map(Value::from)),
        2 => mutated(reconciliation()),
        2 => mutated(fault()),
        2 => deep(),
        2 => prop::collection::vec(any::<u8>(), 0..64),
        1 => Just(br#"{"id":"m\xff1","title":"x"}"#.to_vec()),
        1 => large(),
    ]
}

// ---------------------------------------------------------------------------
// Paths and query strings.

const KINDS: &[&str] = &["movies", "actors", "series", "episodes", "videos"];
const TABLES: &[&str] = &[
    "raw_actors",
    "raw_movies",
    "raw_series",
    "raw_episodes",
    "raw_videos",
    "actors",
    "movies",
    "series",
    "episodes",
    "videos",
    "encodes",
];
const QUEUES: &[&str] = &["raw_queue", "encode_queue"];
const HANDLERS: &[&str] = &["raw_handler", "encode_handler"];
const IDS: &[&str] = &["m1", "m3", "s1", "e1", "v1", "v1:r1", "bad", "missing"];

/// Segments that are already valid in a URI.
const HOSTILE_SEGMENTS: &[&str] = &[
    "",
    ".",
    "..",
    "%2e%2e",
    "%ff%fe",
    "%c3%28",
    "%2F",
    "m1%2Fx",
    "%00",
    "%",
    "%zz",
    "%C3%A9",
    "m%201",
    "m+1",
    "~",
    ";",
    "m1;v=1",
    ":",
    "@",
    "%F0%9F%8E%AC",
    "%E2%80%AE",
    "movies%00",
    "MOVIES",
    "movies%20",
    "%20",
    "raw_movies%2F..",
    "*",
];

/// Percent-encodes everything but unreserved characters and a few others
/// that a URI accepts as they are.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$'()*,;:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Slot {
    Kind,
    Table,
    Queue,
    Handler,
    Id,
    Any,
}

impl Slot {
    fn names(self) -> &'static [&'static str] {
        match self {
            Slot::Kind => KINDS,
            Slot::Table => TABLES,
            Slot::Queue => QUEUES,
            Slot::Handler => HANDLERS,
            Slot::Id => IDS,
            Slot::Any => &["movies", "raw_movies", "raw_queue", "encode_handler", "m1"],
        }
    }
}

/// The real route templates, and near misses.
const ROUTES: &[&str] = &[
    "/",
    "/dashboard/app.js",
    "/dashboard/style.css",
    "/healthz",
    "/settle",
    "/topology",
    "/metrics",
    "/openapi.json",
    "/raw/{kind}",
    "/raw/{kind}/{id}",
    "/events",
    "/events/stream",
    "/tables",
    "/tables/{table}",
    "/tables/{table}/{id}",
    "/queues",
    "/queues/{queue}/dead-letters",
    "/queues/{queue}/dead-letters/redrive",
    "/handlers",
    "/faults",
    "/faults/{handler}",
    // Near misses.
    "/raw",
    "/raw/",
    "/raw/{kind}/",
    "/raw/{kind}/{id}/{x}",
    "/tables/",
    "/tables/{table}/{id}/{x}",
    "/queues/{queue}",
    "/queues/{queue}/dead-letters/{x}",
    "/faults/{handler}/{x}",
    "/events/{x}",
    "/dashboard/{x}",
    "/{x}",
    "/{x}/{x}",
    "//healthz",
    "/healthz/",
];

/// A path segment: a name valid for its slot, or something hostile.
#[derive(Clone, Debug)]
enum Segment {
    Valid(Index),
    Hostile(String),
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        14 => any::<Index>().prop_map(Segment::Valid),
        3 => select(HOSTILE_SEGMENTS).prop_map(|s| Segment::Hostile(s.to_string())),
        1 => prop::collection::vec(any::<char>(), 0..10)
            .prop_map(|c| Segment::Hostile(encode(&String::from_iter(c)))),
        1 => select(&[129usize, 10_000][..]).prop_map(|n| Segment::Hostile("x".repeat(n))),
        1 => Just(Segment::Hostile("%ff".repeat(2000))),
    ]
}

fn fill(template: &str, segments: &[Segment]) -> String {
    let mut out = String::new();
    let mut rest = template;
    let mut next = segments.iter();
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map_or(rest.len(), |e| start + e);
        let slot = match &rest[start + 1..end] {
            "kind" => Slot::Kind,
            "table" => Slot::Table,
            "queue" => Slot::Queue,
            "handler" => Slot::Handler,
            "id" => Slot::Id,
            _ => Slot::Any,
        };
        match next.next() {
            Some(Segment::Valid(i)) => out.push_str(slot.names()[i.index(slot.names().len())]),
            Some(Segment::Hostile(s)) => out.push_str(s),
            None => out.push_str(slot.names()[0]),
        }
        rest = &rest[(end + 1).min(rest.len())..];
    }
    out.push_str(rest);
    out
}

const QUERY_KEYS: &[&str] = &[
    "limit",
    "after",
    "table",
    "type",
    "timeout_ms",
    "version",
    "x",
    "",
    "LIMIT",
    "limit%00",
    "after[]",
    "%ff",
];

const QUERY_VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "5",
    "100",
    "1000",
    "1001",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e3",
    "1.5",
    "abc",
    "",
    "%ff%fe",
    "%00",
    "m1",
    "movies",
    "raw_movies",
    "nope",
    "eventsys.record.inserted",
    "inserted",
    "deleted",
    "2024-01-01T00:00:00Z",
    "2999-01-01T00:00:00Z",
    "2024-01-01T00:00:00%2B02:00",
    "0000-01-01T00:00:00%2B23:59",
    "9999-12-31T23:59:59.999999999-23:59",
    "2016-12-31T23:59:60Z",
    "%2F",
    "+",
    "%20",
    "a&b",
    "=",
    "600000",
    "600001",
];

/// The query parameters a route reads.
fn own_keys(template: &str) -> &'static [&'static str] {
    match template {
        "/events" => &["after", "limit", "table", "type"],
        "/events/stream" => &["after", "table", "type"],
        "/tables/{table}" => &["limit", "after"],
        "/settle" => &["timeout_ms"],
        "/raw/{kind}/{id}" => &["version"],
        _ => QUERY_KEYS,
    }
}

/// Values that make sense for a parameter.
fn sensible(key: &str) -> &'static [&'static str] {
    match key {
        "limit" => &["1", "2", "5", "100", "1000", "1001", "18446744073709551615"],
        "after" => &[
            "0",
            "1",
            "3",
            "10",
            "m1",
            "e1",
            "zz",
            "18446744073709551614",
            "18446744073709551615",
        ],
        "table" => TABLES,
        "type" => &[
            "eventsys.record.inserted",
            "eventsys.record.updated",
            "eventsys.record.deleted",
            "inserted",
            "updated",
            "deleted",
        ],
        "timeout_ms" => &["0", "1", "10", "100"],
        "version" => &[
            "2024-01-01T00:00:00Z",
            "2025-01-01T00:00:00Z",
            "2023-01-01T00:00:00%2B01:00",
            "9999-12-31T23:59:59.999999999-23:59",
        ],
        _ => QUERY_VALUES,
    }
}

#[derive(Clone, Debug)]
enum Key {
    /// One the route reads.
    Own(Index),
    Any(&'static str),
}

#[derive(Clone, Debug)]
enum QueryValue {
    /// One that makes sense for the key.
    Sensible(Index),
    Text(String),
}

#[derive(Clone, Debug)]
enum Query {
    Pairs(Vec<(Key, QueryValue)>),
    Raw(&'static str),
}

fn query() -> impl Strategy<Value = Query> {
    let key = prop_oneof![
        4 => any::<Index>().prop_map(Key::Own),
        1 => select(QUERY_KEYS).prop_map(Key::Any),
    ];
    let value = prop_oneof![
        4 => any::<Index>().prop_map(QueryValue::Sensible),
        4 => select(QUERY_VALUES).prop_map(|v| QueryValue::Text(v.to_string())),
        2 => prop::collection::vec(any::<char>(), 0..8)
            .prop_map(|c| QueryValue::Text(encode(&String::from_iter(c)))),
        1 => Just(QueryValue::Text("9".repeat(10_000))),
    ];
    prop_oneof![
        4 => Just(Query::Pairs(Vec::new())),
        1 => select(&["?", "?&&", "?=", "?limit", "?limit=1=2", "?&limit=1&"][..]).prop_map(Query::Raw),
        6 => prop::collection::vec((key, value), 1..4).prop_map(Query::Pairs),
    ]
}

fn render_query(template: &str, query: &Query) -> String {
    match query {
        Query::Raw(raw) => raw.to_string(),
        Query::Pairs(pairs) if pairs.is_empty() => String::new(),
        Query::Pairs(pairs) => {
            let pairs: Vec<String> = pairs
                .iter()
                .map(|(key, value)| {
                    let key = match key {
                        Key::Own(i) => *i.get(own_keys(template)),
                        Key::Any(k) => k,
                    };
                    let value = match value {
                        QueryValue::Sensible(i) => i.get(sensible(key)).to_string(),
                        QueryValue::Text(text) => text.clone(),
                    };
                    format!("{key}={value}")
                })
                .collect();
            format!("?{}", pairs.join("&"))
        }
    }
}

/// A route template filled with segments, and a query string.
fn uri(routes: &'static [&'static str]) -> impl Strategy<Value = String> {
    (select(routes), prop::collection::vec(segment(), 3), query()).prop_map(
        |(template, segments, query)| fill(template, &segments) + &render_query(template, &query),
    )
}

// ---------------------------------------------------------------------------
// Headers.

type Headers = Vec<(&'static str, Vec<u8>)>;

fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![8 => 0x20u8..0x7f, 2 => 0x80u8..=0xff, 1 => Just(b'\t')],
        0..max,
    )
}

fn content_type() -> impl Strategy<Value = Option<Vec<u8>>> {
    const TYPES: &[&str] = &[
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/cloudevents+json; charset=utf-8",
        "application/problem+json",
        "application/x+json",
        "text/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        ";",
        " application/json ",
    ];
    prop_oneof![
        6 => select(TYPES).prop_map(|t| Some(t.as_bytes().to_vec())),
        2 => Just(None),
        1 => header_bytes(40).prop_map(Some),
    ]
}

fn if_match() -> impl Strategy<Value = Option<Vec<u8>>> {
    const VALUES: &[&str] = &[
        "*",
        "\"2024-01-01T00:00:00Z\"",
        "W/\"2024-01-01T00:00:00Z\"",
        "2024-01-01T00:00:00Z",
        "\"2024-01-01T02:00:00+02:00\"",
        "\"1999-01-01T00:00:00Z\"",
        "\"9999-12-31T23:59:59.999999999-23:59\"",
        "\"0000-01-01T00:00:00+23:59\"",
        "\"\"",
        "\"*\"",
        "garbage",
        "\"2024-01-01T00:00:00Z\", \"2024-02-01T00:00:00Z\"",
    ];
    prop_oneof![
        6 => Just(None),
        3 => select(VALUES).prop_map(|v| Some(v.as_bytes().to_vec())),
        1 => header_bytes(30).prop_map(Some),
    ]
}

fn ce_headers() -> impl Strategy<Value = Headers> {
    const NAMES: &[&str] = &[
        "ce-specversion",
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-time",
        "ce-subject",
        "ce-",
    ];
    const VALUES: &[&str] = &[
        "1.0",
        "0.3",
        "",
        " ",
        "ev-1",
        "seed-1",
        "/vendor",
        "com.vendor.record",
        "2024-01-01T00:00:00Z",
        "yesterday",
    ];
    let value = prop_oneof![
        4 => select(VALUES).prop_map(|v| v.as_bytes().to_vec()),
        1 => header_bytes(20),
    ];
    prop_oneof![
        5 => Just(Vec::new()),
        1 => prop::collection::vec((select(NAMES), value), 1..5),
    ]
}

fn other_headers() -> impl Strategy<Value = Headers> {
    let last_event_id = prop_oneof![
        6 => Just(None),
        3 => select(&["0", "1", "5", "999999", "-1", "abc", "18446744073709551616", " 3 ", ""][..])
            .prop_map(|v| Some(v.as_bytes().to_vec())),
        1 => header_bytes(20).prop_map(Some),
    ];
    let request_id = prop_oneof![
        6 => Just(None),
        2 => select(&["abc", "", " ", "a b", "ÿ"][..]).prop_map(|v| Some(v.as_bytes().to_vec())),
        1 => select(&[128usize, 129, 10_000][..]).prop_map(|n| Some(vec![b'r'; n])),
        1 => header_bytes(200).prop_map(Some),
    ];
    let if_none_match = prop_oneof![
        9 => Just(None),
        1 => select(&["*", "\"x\"", "W/\"x\", *"][..]).prop_map(|v| Some(v.as_bytes().to_vec())),
    ];
    (
        last_event_id,
        request_id,
        if_none_match,
        if_match(),
        ce_headers(),
    )
        .prop_map(|(last_event_id, request_id, if_none_match, if_match, ce)| {
            let mut headers = Vec::new();
            if let Some(v) = last_event_id {
                headers.push(("last-event-id", v));
            }
            if let Some(v) = request_id {
                headers.push(("x-request-id", v));
            }
            if let Some(v) = if_none_match {
                headers.push(("if-none-match", v));
            }
            if let Some(v) = if_match {
                headers.push(("if-match", v));
            }
            headers.extend(ce);
            headers
        })
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// Mostly `usual`, sometimes any method.
fn method(usual: &'static str) -> impl Strategy<Value = &'static str> {
    prop_oneof![6 => Just(usual), 1 => select(METHODS)]
}

fn with_headers(
    method: &'static str,
    uri: String,
    content_type: Option<Vec<u8>>,
    mut headers: Headers,
    body: Vec<u8>,
    content_length: bool,
) -> Req {
    if let Some(ct) = content_type {
        headers.insert(0, ("content-type", ct));
    }
    if content_length {
        headers.push(("content-length", body.len().to_string().into_bytes()));
    }
    Req {
        method,
        uri,
        headers,
        body,
    }
}

// ---------------------------------------------------------------------------
// Requests.

/// Anything: any method, route, query, headers and body.
fn random_request() -> BoxedStrategy<Req> {
    (
        select(METHODS),
        uri(ROUTES),
        content_type(),
        other_headers(),
        any_body(),
        any::<bool>(),
    )
        .prop_map(|(method, uri, ct, headers, body, cl)| {
            with_headers(method, uri, ct, headers, body, cl)
        })
        .boxed()
}

/// How an ingest request carries its records.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Plain,
    Structured,
    Batch,
    Binary,
}

/// `POST /raw/{kind}` in every mode, with mutated records and events.
fn ingest_request() -> BoxedStrategy<Req> {
    let body = prop_oneof![
        4 => (Just(Mode::Plain), mutated(record())),
        2 => (Just(Mode::Plain), mutated(prop::collection::vec(record(), 0..4).prop_map(Value::from))),
        2 => (Just(Mode::Structured), mutated(cloud_event())),
        2 => (Just(Mode::Batch), mutated(prop::collection::vec(cloud_event(), 0..4).prop_map(Value::from))),
        2 => (Just(Mode::Binary), mutated(record())),
        1 => (Just(Mode::Plain), deep()),
        1 => (Just(Mode::Plain), prop::collection::vec(any::<u8>(), 0..32)),
        1 => (Just(Mode::Plain), Just(br#"{"id":"m\xff1","title":"x"}"#.to_vec())),
        1 => (Just(Mode::Plain), large()),
        1 => (Just(Mode::Plain), Just(Vec::new())),
    ];
    let binary = (
        select(&["seed-1", "ev-1", "ev-2"][..]),
        prop::option::weighted(0.3, select(&["2024-05-01T00:00:00Z", "not a time"][..])),
    );
    (
        method("POST"),
        uri(&["/raw/{kind}"]),
        body,
        prop::option::weighted(0.15, content_type()),
        other_headers(),
        binary,
        any::<bool>(),
    )
        .prop_map(
            |(method, path, (mode, body), ct, mut headers, (ce_id, ce_time), cl)| {
                let ct = ct.unwrap_or_else(|| {
                    Some(
                        match mode {
                            Mode::Plain | Mode::Binary => "application/json",
                            Mode::Structured => "application/cloudevents+json",
                            Mode::Batch => "application/cloudevents-batch+json",
                        }
                        .as_bytes()
                        .to_vec(),
                    )
                });
                if let Mode::Binary = mode {
                    let mut ce: Headers = vec![
                        ("ce-specversion", b"1.0".to_vec()),
                        ("ce-id", ce_id.as_bytes().to_vec()),
                        ("ce-source", b"/vendor".to_vec()),
                        ("ce-type", b"com.vendor.record".to_vec()),
                    ];
                    if let Some(time) = ce_time {
                        ce.push(("ce-time", time.as_bytes().to_vec()));
                    }
                    // Generated ce-* headers come later and may repeat these.
                    ce.append(&mut headers);
                    headers = ce;
                }
                with_headers(method, path, ct, headers, body, cl)
            },
        )
        .boxed()
}

/// `PUT /raw/{kind}` with mutated reconciliations.
fn reconcile_request() -> BoxedStrategy<Req> {
    (
        method("PUT"),
        uri(&["/raw/{kind}"]),
        prop_oneof![6 => mutated(reconciliation()), 1 => any_body()],
        prop::option::weighted(0.15, content_type()),
        other_headers(),
    )
        .prop_map(|(method, path, body, ct, headers)| {
            let ct = ct.unwrap_or_else(|| Some(b"application/json".to_vec()));
            with_headers(method, path, ct, headers, body, false)
        })
        .boxed()
}

/// `DELETE /raw/{kind}/{id}?version=`.
fn delete_request() -> BoxedStrategy<Req> {
    (
        method("DELETE"),
        uri(&["/raw/{kind}/{id}"]),
        other_headers(),
        prop_oneof![4 => Just(Vec::new()), 1 => any_body()],
    )
        .prop_map(|(method, uri, headers, body)| {
            with_headers(method, uri, None, headers, body, false)
        })
        .boxed()
}

/// `/faults/{handler}` with mutated faults.
fn fault_request() -> BoxedStrategy<Req> {
    (
        prop_oneof![6 => Just("PUT"), 1 => Just("GET"), 1 => Just("DELETE"), 1 => select(METHODS)],
        uri(&["/faults/{handler}", "/faults"]),
        prop_oneof![6 => mutated(fault()), 1 => any_body()],
        prop::option::weighted(0.15, content_type()),
        other_headers(),
    )
        .prop_map(|(method, path, body, ct, headers)| {
            let ct = ct.unwrap_or_else(|| Some(b"application/json".to_vec()));
            with_headers(method, path, ct, headers, body, false)
        })
        .boxed()
}

/// Reads with hostile query strings and cursors.
fn read_request() -> BoxedStrategy<Req> {
    const READS: &[&str] = &[
        "/events",
        "/events/stream",
        "/tables",
        "/tables/{table}",
        "/tables/{table}/{id}",
        "/queues",
        "/queues/{queue}/dead-letters",
        "/queues/{queue}/dead-letters/redrive",
        "/handlers",
        "/faults",
        "/faults/{handler}",
        "/settle",
        "/topology",
        "/metrics",
        "/openapi.json",
        "/healthz",
        "/",
        "/dashboard/app.js",
    ];
    (
        method("GET"),
        uri(READS),
        other_headers(),
        prop_oneof![6 => Just(Vec::new()), 1 => any_body()],
    )
        .prop_map(|(method, uri, headers, body)| {
            with_headers(method, uri, None, headers, body, false)
        })
        .boxed()
}

fn request() -> impl Strategy<Value = Req> {
    prop_oneof![
        4 => random_request(),
        4 => ingest_request(),
        1 => reconcile_request(),
        1 => delete_request(),
        1 => fault_request(),
        2 => read_request(),
    ]
    .prop_filter("a request http can carry", |r| r.build().is_ok())
}

// ---------------------------------------------------------------------------
// The app, its seed and its state.

fn config() -> Config {
    Config {
        encode_delay_ms: 0,
        retry_base_ms: 1,
        retry_max_ms: 10,
        breaker_cooldown_ms: 10,
        raw_workers: Some(2),
        encode_workers: 1,
        body_limit_bytes: BODY_LIMIT,
        shutdown_timeout: Duration::from_secs(10).into(),
        ..Config::default()
    }
}

/// A movie, a series with an episode, a video with a rendition, one
/// CloudEvent (so its duplicate is recognised) and one movie that
/// `raw_handler` dead-letters (so dead-letter routes have work).
const SEED: &[(&str, &str, &str)] = &[
    (
        "/raw/movies",
        "application/json",
        r#"{"id":"m1","title":"Heat","year":1995,"updated_at":"2024-01-01T00:00:00Z"}"#,
    ),
    (
        "/raw/series",
        "application/json",
        r#"{"id":"s1","title":"Show","updated_at":"2024-01-01T00:00:00Z","episodes":[{"id":"e1","title":"Pilot","season":1,"number":1}]}"#,
    ),
    (
        "/raw/videos",
        "application/json",
        r#"{"id":"v1","title":"Clip","duration_s":1.5,"updated_at":"2024-01-01T00:00:00Z","renditions":[{"id":"r1","codec":"h264","height":720}]}"#,
    ),
    (
        "/raw/movies",
        "application/cloudevents+json",
        r#"{"specversion":"1.0","id":"seed-1","source":"/vendor","type":"com.vendor.record","data":{"id":"m3","title":"Ronin","updated_at":"2024-01-01T00:00:00Z"}}"#,
    ),
    (
        "/raw/movies",
        "application/json",
        r#"{"id":"bad","title":" ","updated_at":"2024-01-01T00:00:00Z"}"#,
    ),
];

async fn seed(router: &Router) -> Result<(), String> {
    for (path, content_type, body) in SEED {
        let request = Request::post(*path)
            .header(header::CONTENT_TYPE, *content_type)
            .header(header::AUTHORIZATION, format!("Bearer {}", TOKENS[2].1))
            .body(Body::from(*body))
            .map_err(|e| e.to_string())?;
        let response = router
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("seeding {path} answered {}", response.status()));
        }
    }
    Ok(())
}

/// Everything a request could change, read once the pipeline is idle.
#[derive(Debug, PartialEq)]
struct Snapshot {
    latest: u64,
    tables: Vec<(String, u64, TableStats)>,
    dedup: usize,
    faults: Vec<(String, Option<Fault>)>,
    queues: Vec<Value>,
    handlers: Vec<Value>,
}

impl Snapshot {
    /// What differs from `after`, one line each.
    fn diff(&self, after: &Snapshot) -> String {
        fn lines<T: fmt::Debug + PartialEq>(out: &mut String, what: &str, a: &[T], b: &[T]) {
            for i in 0..a.len().max(b.len()) {
                if a.get(i) != b.get(i) {
                    out.push_str(&format!(
                        "  {what}: {:?}\n    -> {:?}\n",
                        a.get(i),
                        b.get(i)
                    ));
                }
            }
        }
        let mut out = String::new();
        if self.latest != after.latest {
            out.push_str(&format!(
                "  change log latest: {} -> {}\n",
                self.latest, after.latest
            ));
        }
        if self.dedup != after.dedup {
            out.push_str(&format!(
                "  dedup window: {} -> {}\n",
                self.dedup, after.dedup
            ));
        }
        lines(&mut out, "table", &self.tables, &after.tables);
        lines(&mut out, "fault", &self.faults, &after.faults);
        lines(&mut out, "queue", &self.queues, &after.queues);
        lines(&mut out, "handler", &self.handlers, &after.handlers);
        out
    }
}

fn snapshot(app: &App) -> Snapshot {
    let pipeline = app.pipeline();
    let engine = &pipeline.engine;
    Snapshot {
        latest: engine.log.latest(),
        tables: engine
            .tables()
            .iter()
            .map(|t| (t.name().to_string(), t.len(), t.stats()))
            .collect(),
        dedup: pipeline.dedup.len(),
        faults: engine
            .handlers()
            .iter()
            .map(|h| (h.name().to_string(), h.fault()))
            .collect(),
        queues: engine
            .queues()
            .iter()
            .map(|q| serde_json::to_value(q.snapshot()).unwrap_or_default())
            .collect(),
        handlers: engine
            .handlers()
            .iter()
            .map(|h| serde_json::to_value(h.stats()).unwrap_or_default())
            .collect(),
    }
}

async fn settle(app: &App) -> Result<(), String> {
    if app.pipeline().engine.settle(Duration::from_secs(20)).await {
        Ok(())
    } else {
        Err(format!(
            "the pipeline did not settle within 20 s ({} outstanding)",
            app.pipeline().engine.activity.outstanding()
        ))
    }
}

/// A started, seeded app and its router.
struct Seeded {
    app: App,
    router: Router,
}

impl Seeded {
    async fn start(config: &Config) -> Result<Self, String> {
        let app = App::start(config.clone());
        let router = app.router();
        seed(&router).await?;
        Ok(Self { app, router })
    }

    async fn stop(self) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(30), self.app.shutdown())
            .await
            .map(drop)
            .map_err(|_| "the app did not shut down within 30 s".to_string())
    }
}

/// Cases that share one seeded app before it is replaced. A fresh app per
/// case costs about three times as much as the request itself in a debug
/// build; sharing stays exact because the pipeline settles before each
/// snapshot, and faults are cleared after each case so that one case's
/// injected delay cannot slow the next.
const CASES_PER_APP: usize = 50;

/// Runs cases on shared apps; once a case fails, every later run (the
/// shrinking) uses a fresh app per case, so the minimal request reported
/// fails on its own.
struct Harness {
    config: Config,
    shared: Option<Seeded>,
    used: usize,
    previous: Option<Req>,
    fresh_only: bool,
}

impl Harness {
    fn new(config: Config) -> Self {
        Self {
            config,
            shared: None,
            used: 0,
            previous: None,
            fresh_only: false,
        }
    }

    async fn fresh(&self, req: &Req) -> Result<(), String> {
        let seeded = Seeded::start(&self.config).await?;
        let result = check(&seeded.app, &seeded.router, req).await;
        let stopped = seeded.stop().await;
        result.and(stopped)
    }

    async fn run(&mut self, req: &Req) -> Result<(), String> {
        if self.fresh_only {
            return self.fresh(req).await;
        }
        if self.used == CASES_PER_APP
            && let Some(old) = self.shared.take()
        {
            old.stop().await?;
        }
        if self.shared.is_none() {
            self.shared = Some(Seeded::start(&self.config).await?);
            self.used = 0;
            self.previous = None;
        }
        let Some(seeded) = &self.shared else {
            return Err("no app".into());
        };
        self.used += 1;
        let result = check(&seeded.app, &seeded.router, req).await;
        for handler in seeded.app.pipeline().engine.handlers() {
            handler.set_fault(None);
        }
        let Err(error) = result else {
            self.previous = Some(req.clone());
            return Ok(());
        };
        self.fresh_only = true;
        if let Some(old) = self.shared.take() {
            let _ = old.stop().await;
        }
        match self.fresh(req).await {
            Err(alone) => Err(alone),
            Ok(()) => Err(format!(
                "{error}\n(on an app shared with earlier cases; this request alone passes on a \
                 fresh app; the request before it was:{:?})",
                self.previous
            )),
        }
    }
}

/// Sends `req` once the pipeline is idle and checks the answer.
async fn check(app: &App, router: &Router, req: &Req) -> Result<(), String> {
    settle(app).await?;
    let before = snapshot(app);

    let request = req.build()?;
    let response = tokio::time::timeout(Duration::from_secs(30), router.clone().oneshot(request))
        .await
        .map_err(|_| "no response within 30 s".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let headers = response.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
        .unwrap_or_default();
    let body = if content_type.starts_with("text/event-stream") {
        // A live stream never ends: do not read it.
        drop(response);
        Vec::new()
    } else {
        tokio::time::timeout(Duration::from_secs(30), response.into_body().collect())
            .await
            .map_err(|_| format!("{status}: the body did not end within 30 s"))?
            .map_err(|e| format!("{status}: reading the body failed: {e}"))?
            .to_bytes()
            .to_vec()
    };
    let text = String::from_utf8_lossy(&body);
    let shown: String = text.chars().take(600).collect();

    match headers.get("x-request-id").map(|v| v.as_bytes()) {
        Some(id) if (1..=128).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic) => {}
        other => {
            return Err(format!(
                "{status}: bad X-Request-Id on the response: {other:?}"
            ));
        }
    }

    if status.is_success() && content_type.starts_with("application/json") && !body.is_empty() {
        serde_json::from_slice::<Value>(&body)
            .map_err(|e| format!("{status} with a JSON body that is not JSON ({e}): {shown}"))?;
    }
    if status == StatusCode::UNAUTHORIZED
        && !headers
            .get(header::WWW_AUTHENTICATE)
            .is_some_and(|v| v.as_bytes().starts_with(b"Bearer"))
    {
        return Err("401 without `WWW-Authenticate: Bearer`".into());
    }
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        return Err(format!("server error {status}: {shown}"));
    }
    if status.is_client_error() || status.is_server_error() {
        if content_type != "application/problem+json" {
            return Err(format!(
                "{status} with Content-Type `{content_type}`, not application/problem+json: {shown}"
            ));
        }
        // A response to HEAD has no body.
        if !(req.method == "HEAD" && body.is_empty()) {
            let problem: Value = serde_json::from_slice(&body)
                .map_err(|e| format!("{status}: the problem is not JSON ({e}): {shown}"))?;
            for member in ["type", "title", "detail"] {
                if !problem[member].is_string() {
                    return Err(format!(
                        "{status}: problem without string `{member}`: {shown}"
                    ));
                }
            }
            if problem["status"] != status.as_u16() {
                return Err(format!("{status}: problem `status` differs: {shown}"));
            }
            if status == StatusCode::SERVICE_UNAVAILABLE {
                let settle_timeout = problem["settled"] == false;
                let backpressure =
                    problem.get("backlog").is_some() && headers.contains_key(header::RETRY_AFTER);
                if !(settle_timeout || backpressure) {
                    return Err(format!(
                        "503 that is neither backpressure nor a settle timeout: {shown}"
                    ));
                }
            }
        }
        settle(app).await?;
        let after = snapshot(app);
        if after != before {
            return Err(format!(
                "{status} yet the state changed: {shown}\n{}",
                before.diff(&after)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

#[test]
fn hostile_requests_get_4xx_problems_and_change_nothing() {
    run(self::config(), request().boxed(), 10_000);
}

/// Callers of the tokens file of [`hostile_requests_with_tokens_too`]:
/// name, token and role.
const TOKENS: [(&str, &str, &str); 3] = [
    ("rita", "reader-token-0123456789", "reader"),
    ("pat", "producer-token-0123456789", "producer"),
    ("ola", "operator-token-0123456789", "operator"),
];

/// An `Authorization` header as clients get it right and wrong.
fn authorization() -> impl Strategy<Value = Option<Vec<u8>>> {
    let known = select(
        TOKENS
            .iter()
            .map(|(_, token, _)| *token)
            .collect::<Vec<_>>(),
    )
    .prop_map(|token| format!("Bearer {token}").into_bytes());
    prop_oneof![
        1 => Just(None),
        6 => known.prop_map(Some),
        1 => header_bytes(64).prop_map(Some),
        1 => Just(Some(b"Bearer ".to_vec())),
        1 => Just(Some(b"Basic cmVhZGVyOnBhc3M=".to_vec())),
    ]
}

#[test]
fn hostile_requests_with_tokens_too() {
    let dir = std::env::temp_dir().join(format!("eventsys-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let file = dir.join("tokens");
    let lines: Vec<String> = TOKENS
        .iter()
        .map(|(name, token, role)| format!("{name} {role} {token}"))
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write the tokens file");
    let config = Config {
        auth_tokens_file: Some(file),
        ..self::config()
    };
    let requests = (request(), authorization())
        .prop_map(|(mut req, authorization)| {
            if let Some(value) = authorization {
                req.headers.push(("authorization", value));
            }
            req
        })
        .prop_filter("a request http can carry", |r| r.build().is_ok())
        .boxed();
    run(config, requests, 3_000);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs at least `cases` generated requests (more with `PROPTEST_CASES`).
fn run(config: Config, requests: BoxedStrategy<Req>, cases: u32) {
    let proptest = ProptestConfig {
        cases: ProptestConfig::default().cases.max(cases),
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let harness = std::cell::RefCell::new(Harness::new(config));
    let mut runner = TestRunner::new(proptest);
    let result = runner.run(&requests, |req| {
        runtime
            .block_on(harness.borrow_mut().run(&req))
            .map_err(TestCaseError::fail)
    });
    if let Some(seeded) = harness.borrow_mut().shared.take() {
        runtime.block_on(seeded.stop()).expect("the last app stops");
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, req)) => {
            panic!("{reason}\nminimal failing request:{req:?}")
        }
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
}
