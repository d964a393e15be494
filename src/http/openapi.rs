//! `GET /openapi.json`: the OpenAPI 3.1 description of the API, generated
//! from the code that serves it.
//!
//! Every API route is declared once, in `http::api`, with utoipa-axum's
//! `routes!`: that one declaration gives the handler to axum and its
//! `#[utoipa::path]` operation to the document, so the router and the
//! document cannot disagree on which routes and methods exist. Response
//! and request types derive `ToSchema` beside their `Serialize`, so the
//! schemas follow the types. What is written by hand lives here: schemas of
//! the types that serialise by hand (a record's id, version and data, and
//! queued events as CloudEvents) and of the bodies ingest parses field by
//! field (to name the bad field in a 400). The tests below hold those to
//! the JSON the code really produces.
//!
//! The dashboard (`GET /` and its assets) is HTML for people, not part of
//! the API, and is not described.

use std::sync::LazyLock;

use axum::Json;
use serde_json::json;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, RefBuilder,
    SchemaFormat, Type,
};
use utoipa::openapi::{OpenApi, Ref, RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::engine::log::{Change, ChangeKind};
use crate::engine::record::{Data, RecordId, Timestamp};
use crate::engine::table::Outcome;
use crate::media::encode_handler::EncodeJob;
use crate::media::records::{Kind, Rendition};

use super::problem::Problem;

/// The document's fixed parts; the paths and their schemas are added from
/// the router's declarations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "eventsys",
        version = env!("CARGO_PKG_VERSION"),
        description = "See, learn and prototype event-driven pipelines: raw records go into \
            Tables that keep one live, versioned record per id and drop stale and no-op writes; \
            every change is logged and flows through bounded Queues to Handlers that write \
            standard tables, with retries, dead letters and injectable faults.\n\n\
            Every error is `application/problem+json` (RFC 9457); an unknown route is a 404 \
            and a known route with another method a 405, both problem+json. Timestamps are \
            RFC 3339, accepted with any offset and returned in UTC.",
        license(name = "MIT OR Apache-2.0")
    ),
    components(schemas(Problem)),
    tags(
        (name = "ingest", description = "Raw records in: upsert, reconcile, delete"),
        (name = "tables", description = "Tables and their records"),
        (name = "queues", description = "Queues, their dead letters, handlers and faults"),
        (name = "events", description = "The change log as CloudEvents"),
        (name = "system", description = "Health, settling, topology, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// The whole document, built once from the router's declarations.
static DOCUMENT: LazyLock<OpenApi> = LazyLock::new(super::openapi);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 description of every API route",
        body = Object, content_type = "application/json")),
)]
pub async fn document(_: super::NoQuery) -> Json<&'static OpenApi> {
    Json(&DOCUMENT)
}

/// The schemas a hand-written schema refers to, for `ToSchema::schemas`.
type Schemas = Vec<(String, RefOr<Schema>)>;

/// Adds `T`'s schema, and those it refers to, to the components.
fn component<T: ToSchema>(schemas: &mut Schemas) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// A reference to `T`'s component schema, with what it means here.
fn reference<T: ToSchema>(description: &str) -> RefBuilder {
    RefBuilder::new()
        .ref_location_from_schema_name(T::name())
        .description(Some(description))
}

/// A reference to `T`'s component schema, described by `T`'s own schema.
fn ref_to<T: ToSchema>() -> Ref {
    Ref::from_schema_name(T::name())
}

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

fn string_enum(values: impl IntoIterator<Item = &'static str>, description: &str) -> ObjectBuilder {
    string(description).enum_values(Some(values))
}

fn uuid(description: &str) -> ObjectBuilder {
    string(description).format(Some(SchemaFormat::Custom("uuid".into())))
}

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        string(
            "RFC 3339 with up to nanosecond precision; accepted with any offset, \
             returned in UTC",
        )
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .examples([json!("2024-05-01T12:00:00.5Z")])
        .into()
    }
}

impl ToSchema for Timestamp {}

impl PartialSchema for RecordId {
    fn schema() -> RefOr<Schema> {
        string(
            "A record's id: no `/` and no control characters; 1 to 128 characters when \
             ingested (an id the pipeline derives, such as an encode's \
             `{video_id}:{rendition_id}`, may be longer)",
        )
        .min_length(Some(1))
        .pattern(Some("^[^/]+$"))
        .examples([json!("m1")])
        .into()
    }
}

impl ToSchema for RecordId {}

impl PartialSchema for Data {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A record's data: every field of the record but `updated_at`, which is its \
                 version",
            ))
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .examples([json!({"id": "m1", "title": "Alien", "year": 1979})])
            .into()
    }
}

impl ToSchema for Data {
    fn name() -> std::borrow::Cow<'static, str> {
        "RecordData".into()
    }
}

/// The properties every CloudEvent the pipeline emits has.
fn cloud_event(source: ObjectBuilder, kind: ObjectBuilder) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "specversion",
            string_enum(["1.0"], "The CloudEvents version"),
        )
        .required("specversion")
        .property("id", uuid("This event's unique id"))
        .required("id")
        .property("source", source)
        .required("source")
        .property("type", kind)
        .required("type")
        .property(
            "subject",
            reference::<RecordId>("The id of the record concerned"),
        )
        .required("subject")
        .property(
            "recordversion",
            reference::<Timestamp>("The record's version (`updated_at`)"),
        )
        .required("recordversion")
        .property(
            "correlationid",
            string("The request id (`X-Request-Id`) of the ingest that started the chain"),
        )
        .required("correlationid")
        .property(
            "causationid",
            uuid("The id of the change that caused this event; absent for a raw table's change"),
        )
        .property(
            "datacontenttype",
            string_enum(["application/json"], "Present with `data`"),
        )
}

/// A change, served by `/events` and carried by `raw_queue`, is a
/// CloudEvent; see its `Serialize`.
impl PartialSchema for Change {
    fn schema() -> RefOr<Schema> {
        let kinds = [
            ChangeKind::Inserted,
            ChangeKind::Updated,
            ChangeKind::Deleted,
        ];
        cloud_event(
            string("`/tables/{table}`: the table that changed").pattern(Some("^/tables/")),
            string_enum(kinds.map(ChangeKind::event_type), "What the change did"),
        )
        .description(Some(
            "One change of one record, as a CloudEvent 1.0 with the `sequence`, \
             `recordversion`, `correlationid` and `causationid` extensions",
        ))
        .property(
            "time",
            reference::<Timestamp>("When the change was recorded"),
        )
        .required("time")
        .property(
            "sequence",
            string(
                "The change's position in the log, from 1, gapless, as a decimal string \
                 (CloudEvents extensions are strings); `/events` cursors are this number",
            )
            .pattern(Some("^[1-9][0-9]*$")),
        )
        .required("sequence")
        .property(
            "data",
            reference::<Data>("The record's data after the change; absent for a delete"),
        )
        .into()
    }
}

impl ToSchema for Change {
    fn name() -> std::borrow::Cow<'static, str> {
        "ChangeEvent".into()
    }

    fn schemas(schemas: &mut Schemas) {
        component::<RecordId>(schemas);
        component::<Timestamp>(schemas);
        component::<Data>(schemas);
    }
}

/// A job on `encode_queue`, also a CloudEvent; see its `Serialize`.
impl PartialSchema for EncodeJob {
    fn schema() -> RefOr<Schema> {
        let data = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("video_id", reference::<RecordId>("The video to encode"))
            .required("video_id")
            .property("rendition", reference::<Rendition>("The rendition to make"))
            .required("rendition")
            .property(
                "attempt",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .description(Some(
                        "The publication attempt it belongs to: 1 for raw_handler's jobs, more \
                         for those of a new attempt after a compensation (scenario 6)",
                    )),
            )
            .required("attempt");
        cloud_event(
            string_enum(
                ["/handlers/raw_handler", "/handlers/publication_handler"],
                "The handler that asked for the job",
            ),
            string_enum(["eventsys.encode.requested"], "An encode job"),
        )
        .description(Some(
            "One encode job on `encode_queue`, as a CloudEvent 1.0; its subject is the id of \
             the `encodes` record it will write",
        ))
        .property("data", data)
        .required("data")
        .into()
    }
}

impl ToSchema for EncodeJob {
    fn name() -> std::borrow::Cow<'static, str> {
        "EncodeJobEvent".into()
    }

    fn schemas(schemas: &mut Schemas) {
        component::<RecordId>(schemas);
        component::<Timestamp>(schemas);
        component::<Rendition>(schemas);
    }
}

/// What a queue holds: a change on `raw_queue`, an encode job on
/// `encode_queue`.
pub struct QueuedEvent;

impl PartialSchema for QueuedEvent {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ref_to::<Change>())
            .item(ref_to::<EncodeJob>())
            .description(Some(
                "The event as it was queued: a change on `raw_queue`, an encode job on \
                 `encode_queue`",
            ))
            .into()
    }
}

impl ToSchema for QueuedEvent {
    fn schemas(schemas: &mut Schemas) {
        component::<Change>(schemas);
        component::<EncodeJob>(schemas);
    }
}

/// What ingest did with one record: a write [`Outcome`] or `duplicate`.
pub struct IngestOutcome;

impl PartialSchema for IngestOutcome {
    fn schema() -> RefOr<Schema> {
        let outcomes = Outcome::ALL.map(Outcome::as_str);
        string_enum(
            outcomes.into_iter().chain(["duplicate"]),
            "What the write did (a POST never deletes, so never `deleted` or `absent`), or \
             `duplicate` for a CloudEvent whose `source` + `id` was already applied",
        )
        .into()
    }
}

impl ToSchema for IngestOutcome {}

/// The `{kind}` path parameter.
pub struct KindName;

impl PartialSchema for KindName {
    fn schema() -> RefOr<Schema> {
        string_enum(
            Kind::ALL.map(Kind::as_str),
            "A media kind; its raw table is `raw_{kind}`",
        )
        .into()
    }
}

impl ToSchema for KindName {}

/// One raw record as `POST` and `PUT /raw/{kind}` take it. Ingest checks
/// it field by field (`media::records::parse_record`), so no Rust type
/// mirrors it.
pub struct RawRecord;

impl PartialSchema for RawRecord {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A record as the vendor sends it, stored as sent, unknown fields included. \
                 Ingest checks `id`, `updated_at`, and that a series' `episodes` and a \
                 video's `renditions`, if present, are arrays of objects each with a valid \
                 `id`. `raw_handler` then needs, per kind: actors `name` (optional \
                 `birth_date` YYYY-MM-DD); movies `title` (optional `year`, `actor_ids`); \
                 series `title` (optional `episodes`, the complete set); episodes \
                 `series_id`, `title` (optional `season`, `number`); videos `title` \
                 (optional `duration_s`, `renditions` of `{id, codec, height, \
                 bitrate_kbps}`). A record it cannot standardise goes to dead letters.",
            ))
            .property(
                "id",
                string("The record's id: 1 to 128 characters, no `/`")
                    .min_length(Some(1))
                    .max_length(Some(128))
                    .pattern(Some("^[^/]+$")),
            )
            .required("id")
            .property(
                "updated_at",
                reference::<Timestamp>(
                    "The record's version; the server's receive time when absent (for \
                     `PUT`, `as_of`)",
                ),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .examples([json!({
                "id": "m1",
                "updated_at": "2024-05-01T12:00:00Z",
                "title": "Alien",
                "year": 1979
            })])
            .into()
    }
}

impl ToSchema for RawRecord {
    fn schemas(schemas: &mut Schemas) {
        component::<Timestamp>(schemas);
    }
}

/// The plain JSON body of `POST /raw/{kind}`.
pub struct RawRecords;

impl PartialSchema for RawRecords {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ref_to::<RawRecord>())
            .item(ArrayBuilder::new().items(ref_to::<RawRecord>()))
            .description(Some(
                "One record, or an array of records validated as a whole: any invalid \
                 record makes a 400 naming its index and field, and nothing is stored",
            ))
            .into()
    }
}

impl ToSchema for RawRecords {
    fn schemas(schemas: &mut Schemas) {
        component::<RawRecord>(schemas);
    }
}

/// A CloudEvent carrying a record, as structured and batch mode take it
/// (checked by `http::cloudevents`).
pub struct CloudEvent;

impl PartialSchema for CloudEvent {
    fn schema() -> RefOr<Schema> {
        let non_empty = |description| string(description).min_length(Some(1));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A CloudEvent 1.0 whose data is one raw record. An event whose `source` + \
                 `id` was already applied (within the dedup window) gets the outcome \
                 `duplicate` and is not applied again. Other attributes and extensions are \
                 allowed and ignored.",
            ))
            .property(
                "specversion",
                string_enum(["1.0"], "The CloudEvents version"),
            )
            .required("specversion")
            .property("id", non_empty("With `source`, identifies the event"))
            .required("id")
            .property("source", non_empty("With `id`, identifies the event"))
            .required("source")
            .property("type", non_empty("Any event type"))
            .required("type")
            .property(
                "time",
                reference::<Timestamp>("The record's version when it has no `updated_at`"),
            )
            .property("datacontenttype", string("A JSON media type, if present"))
            .property("data", ref_to::<RawRecord>())
            .property(
                "data_base64",
                string("The record as base64-encoded JSON, instead of `data`")
                    .content_encoding("base64"),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl ToSchema for CloudEvent {
    fn schemas(schemas: &mut Schemas) {
        component::<RawRecord>(schemas);
        component::<Timestamp>(schemas);
    }
}

/// A batch-mode body.
pub struct CloudEventBatch;

impl PartialSchema for CloudEventBatch {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(ref_to::<CloudEvent>())
            .description(Some(
                "CloudEvents in batch mode, validated as a whole before any is applied",
            ))
            .into()
    }
}

impl ToSchema for CloudEventBatch {
    fn schemas(schemas: &mut Schemas) {
        component::<CloudEvent>(schemas);
    }
}

#[cfg(test)]
mod tests {
    //! The hand-written schemas against the JSON the code really produces:
    //! the same property names, and every required one present.

    use std::sync::Arc;

    use serde_json::Value;
    use uuid::Uuid;

    use super::*;
    use crate::engine::log::Cause;
    use crate::engine::record::Version;

    /// The schema's property names and required names.
    fn properties<T: PartialSchema>() -> (Vec<String>, Vec<String>) {
        let schema = serde_json::to_value(T::schema()).expect("schema serialises");
        let mut names: Vec<String> = schema["properties"]
            .as_object()
            .expect("an object schema")
            .keys()
            .cloned()
            .collect();
        names.sort();
        let required = schema["required"]
            .as_array()
            .expect("required names")
            .iter()
            .map(|v| v.as_str().expect("a name").to_string())
            .collect();
        (names, required)
    }

    fn keys(value: &Value) -> Vec<String> {
        let mut keys: Vec<String> = value
            .as_object()
            .expect("an object")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    fn data() -> Data {
        Data::canonical(&json!({"id": "v1", "title": "Alien"})).expect("canonical JSON")
    }

    #[test]
    fn a_change_serialises_as_its_schema_says() {
        let at = Timestamp::now();
        let full = Change {
            seq: 7,
            id: Uuid::new_v4(),
            table: Arc::from("movies"),
            key: RecordId::parse("m1").expect("an id"),
            kind: ChangeKind::Updated,
            version: Version::write(at, data()),
            data: Some(data()),
            time: at,
            cause: Cause {
                correlation: Arc::from("req-1"),
                causation: Some(Uuid::new_v4()),
            },
        };
        let json = serde_json::to_value(&full).expect("serialises");
        let (names, required) = properties::<Change>();
        assert_eq!(keys(&json), names, "a change with every member: {json}");
        assert_eq!(json["sequence"], "7");

        let delete = Change {
            kind: ChangeKind::Deleted,
            data: None,
            cause: Cause::request("req-2"),
            ..full
        };
        let json = serde_json::to_value(&delete).expect("serialises");
        for name in required {
            assert!(json.get(&name).is_some(), "`{name}` missing from {json}");
        }
    }

    #[test]
    fn an_encode_job_serialises_as_its_schema_says() {
        let job = EncodeJob {
            id: Uuid::new_v4(),
            video_id: RecordId::parse("v1").expect("an id"),
            rendition: Rendition {
                id: RecordId::parse("r1").expect("an id"),
                codec: "h264".into(),
                height: 720,
                bitrate_kbps: Some(3000),
            },
            seq: 7,
            version: Version::write(Timestamp::now(), data()),
            cause: Cause::request("req-1"),
            attempt: 1,
        };
        let json = serde_json::to_value(&job).expect("serialises");
        let (names, required) = properties::<EncodeJob>();
        let mut expected = keys(&json);
        // The one optional member this job lacks.
        expected.push("causationid".into());
        expected.sort();
        assert_eq!(expected, names, "{json}");
        for name in required {
            assert!(json.get(&name).is_some(), "`{name}` missing from {json}");
        }
        assert_eq!(keys(&json["data"]), ["attempt", "rendition", "video_id"]);
    }

    #[test]
    fn ingest_outcomes_are_the_write_outcomes_and_duplicate() {
        let schema = serde_json::to_value(IngestOutcome::schema()).expect("serialises");
        let values = schema["enum"].as_array().expect("an enum");
        for outcome in Outcome::ALL {
            assert!(values.contains(&json!(outcome)), "{outcome:?} missing");
        }
        assert!(values.contains(&json!("duplicate")));
    }
}
