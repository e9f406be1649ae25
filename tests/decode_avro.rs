//! The Avro decode plan against apache_avro's own schema resolution, on random events and
//! writer schemas that differ from ours the way upstream writers' schemas do.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use apache_avro::types::Value;
use apache_avro::Schema;
use proptest::prelude::*;
use serde_json::json;

use segment_sync::config::Format;
use segment_sync::decode::{DecodeError, Decoder, MemoryRegistry, SCHEMA};
use segment_sync::event::{AttrValue, Change, Event};
use segment_sync::tools::encode;

/// Registers `writer` and decodes `body` as the Confluent wire format would carry it.
fn decode_with(writer: &str, body: &[u8]) -> Result<Event<'static>, DecodeError> {
    let registry = Arc::new(MemoryRegistry::new());
    let id = registry.register(writer);
    let mut payload = vec![0];
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(body);
    let mut d = Decoder::new(Format::AvroConfluent, Some(registry)).expect("decoder");
    d.decode(&payload).map(Event::into_owned)
}

/// How a writer's schema differs from ours.
#[derive(Debug, Clone)]
struct Variant {
    namespace: Option<&'static str>,
    /// Optional fields the writer does not have.
    dropped: Vec<&'static str>,
    /// Fields the reader does not know, with the value written for them.
    extra: Vec<usize>,
    /// `sequence` and the attribute integers written as int, doubles as float.
    narrow: bool,
    /// Field order, as a permutation of the writer's fields.
    order: Vec<usize>,
}

fn extra_field(i: usize) -> (serde_json::Value, Value) {
    match i {
        0 => (
            json!({"name": "note", "type": ["null", "string"], "default": null}),
            Value::Union(1, Box::new(Value::String("a note".into()))),
        ),
        1 => (
            json!({"name": "tags", "type": {"type": "array", "items": "string"}}),
            Value::Array(vec![Value::String("x".into()), Value::String("yz".into())]),
        ),
        2 => (
            json!({"name": "meta", "type": {"type": "record", "name": "Meta", "fields": [
                {"name": "a", "type": "int"}, {"name": "b", "type": "double"},
                {"name": "c", "type": {"type": "map", "values": "long"}}]}}),
            Value::Record(vec![
                ("a".into(), Value::Int(-7)),
                ("b".into(), Value::Double(2.5)),
                (
                    "c".into(),
                    Value::Map(HashMap::from([("k".to_string(), Value::Long(99))])),
                ),
            ]),
        ),
        _ => (
            json!({"name": "flag", "type": "boolean"}),
            Value::Boolean(true),
        ),
    }
}

fn opt_str(v: &Option<Cow<'_, str>>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.to_string()))),
    }
}

/// The writer schema text and the datum, in the writer's field order.
fn writer(e: &Event<'_>, v: &Variant) -> (String, Value) {
    let attr_types = if v.narrow {
        json!(["null", "string", "int", "float", "boolean"])
    } else {
        json!(["null", "string", "long", "double", "boolean"])
    };
    let mut fields: Vec<(serde_json::Value, Value)> = vec![
        (
            json!({"name": "event_id", "type": "string"}),
            Value::String(e.event_id.to_string()),
        ),
        (
            json!({"name": "external_id", "type": ["null", "string"], "default": null}),
            opt_str(&e.external_id),
        ),
        (
            json!({"name": "email", "type": ["null", "string"], "default": null}),
            opt_str(&e.email),
        ),
        (
            json!({"name": "segment_id", "type": "string"}),
            Value::String(e.segment_id.to_string()),
        ),
        (
            json!({"name": "segment_name", "type": ["null", "string"], "default": null}),
            opt_str(&e.segment_name),
        ),
        (
            json!({"name": "change", "type": {"type": "enum", "name": "MembershipChange",
                "symbols": ["ENTERED", "EXITED"]}}),
            match e.change {
                Change::Entered => Value::Enum(0, "ENTERED".into()),
                Change::Exited => Value::Enum(1, "EXITED".into()),
            },
        ),
        (
            json!({"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-millis"}}),
            Value::TimestampMillis(e.occurred_at),
        ),
        (
            json!({"name": "sequence", "type": ["null", if v.narrow { "int" } else { "long" }], "default": null}),
            match e.sequence {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(s) if v.narrow => Value::Union(1, Box::new(Value::Int(s as i32))),
                Some(s) => Value::Union(1, Box::new(Value::Long(s))),
            },
        ),
        (
            json!({"name": "attributes", "type": ["null", {"type": "map", "values": attr_types}], "default": null}),
            if e.attributes.is_empty() {
                Value::Union(0, Box::new(Value::Null))
            } else {
                let map = e
                    .attributes
                    .iter()
                    .map(|(k, a)| {
                        let value = match a {
                            AttrValue::Null => Value::Union(0, Box::new(Value::Null)),
                            AttrValue::String(s) => {
                                Value::Union(1, Box::new(Value::String(s.to_string())))
                            }
                            AttrValue::Long(n) if v.narrow => {
                                Value::Union(2, Box::new(Value::Int(*n as i32)))
                            }
                            AttrValue::Long(n) => Value::Union(2, Box::new(Value::Long(*n))),
                            AttrValue::Double(d) if v.narrow => {
                                Value::Union(3, Box::new(Value::Float(*d as f32)))
                            }
                            AttrValue::Double(d) => Value::Union(3, Box::new(Value::Double(*d))),
                            AttrValue::Boolean(b) => Value::Union(4, Box::new(Value::Boolean(*b))),
                        };
                        (k.to_string(), value)
                    })
                    .collect();
                Value::Union(1, Box::new(Value::Map(map)))
            },
        ),
    ];
    fields.retain(|(schema, _)| !v.dropped.iter().any(|d| schema["name"] == *d));
    fields.extend(v.extra.iter().map(|&i| extra_field(i)));
    let fields: Vec<_> = v
        .order
        .iter()
        .filter_map(|&i| fields.get(i).cloned())
        .collect();
    let mut schema = json!({
        "type": "record",
        "name": "SegmentMembershipChange",
        "fields": fields.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
    });
    if let Some(ns) = v.namespace {
        schema["namespace"] = json!(ns);
    }
    let datum = Value::Record(
        fields
            .into_iter()
            .map(|(s, d)| (s["name"].as_str().unwrap_or_default().to_string(), d))
            .collect(),
    );
    (schema.to_string(), datum)
}

/// apache_avro's resolved value, read back into an `Event`.
fn from_value(v: Value) -> Event<'static> {
    fn plain(v: Value) -> Value {
        match v {
            Value::Union(_, inner) => plain(*inner),
            other => other,
        }
    }
    fn opt_string(v: Value) -> Option<Cow<'static, str>> {
        match plain(v) {
            Value::String(s) => Some(s.into()),
            Value::Null => None,
            other => panic!("not an optional string: {other:?}"),
        }
    }
    let Value::Record(fields) = v else {
        panic!("not a record: {v:?}")
    };
    let mut f: BTreeMap<String, Value> = fields.into_iter().collect();
    let mut take = |name: &str| f.remove(name).unwrap_or(Value::Null);
    Event {
        event_id: opt_string(take("event_id")).expect("event_id"),
        external_id: opt_string(take("external_id")),
        email: opt_string(take("email")),
        segment_id: opt_string(take("segment_id")).expect("segment_id"),
        segment_name: opt_string(take("segment_name")),
        change: match plain(take("change")) {
            Value::Enum(_, s) => Change::from_symbol(&s).expect("known symbol"),
            other => panic!("change: {other:?}"),
        },
        occurred_at: match plain(take("occurred_at")) {
            Value::TimestampMillis(t) | Value::Long(t) => t,
            other => panic!("occurred_at: {other:?}"),
        },
        sequence: match plain(take("sequence")) {
            Value::Long(s) => Some(s),
            Value::Int(s) => Some(i64::from(s)),
            Value::Null => None,
            other => panic!("sequence: {other:?}"),
        },
        attributes: match plain(take("attributes")) {
            Value::Null => vec![],
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| {
                    let a = match plain(v) {
                        Value::Null => AttrValue::Null,
                        Value::String(s) => AttrValue::String(s.into()),
                        Value::Long(n) => AttrValue::Long(n),
                        Value::Int(n) => AttrValue::Long(i64::from(n)),
                        Value::Double(d) => AttrValue::Double(d),
                        Value::Float(d) => AttrValue::Double(f64::from(d)),
                        Value::Boolean(b) => AttrValue::Boolean(b),
                        other => panic!("attribute: {other:?}"),
                    };
                    (Cow::Owned(k), a)
                })
                .collect(),
            other => panic!("attributes: {other:?}"),
        },
    }
}

fn sorted(mut e: Event<'static>) -> Event<'static> {
    e.attributes.sort_by(|a, b| a.0.cmp(&b.0));
    e
}

fn opt_text() -> impl Strategy<Value = Option<Cow<'static, str>>> {
    proptest::option::of("\\PC{0,12}".prop_map(Cow::Owned))
}

/// Values that survive the narrow writer too: int-sized integers, float-exact doubles.
fn attr_value() -> impl Strategy<Value = AttrValue<'static>> {
    prop_oneof![
        Just(AttrValue::Null),
        "\\PC{0,8}".prop_map(|s| AttrValue::String(s.into())),
        any::<i32>().prop_map(|n| AttrValue::Long(n.into())),
        (-1.0e6f32..1.0e6f32).prop_map(|d| AttrValue::Double(d.into())),
        any::<bool>().prop_map(AttrValue::Boolean),
    ]
}

fn event() -> impl Strategy<Value = Event<'static>> {
    (
        "[0-9a-f-]{1,36}",
        opt_text(),
        opt_text(),
        "\\PC{0,16}",
        opt_text(),
        any::<bool>(),
        any::<i64>(),
        proptest::option::of(any::<i32>()),
        proptest::collection::btree_map("[a-z_]{1,8}", attr_value(), 0..4),
    )
        .prop_map(
            |(id, external_id, email, segment_id, segment_name, entered, at, seq, attrs)| Event {
                event_id: id.into(),
                external_id,
                email,
                segment_id: segment_id.into(),
                segment_name,
                change: if entered {
                    Change::Entered
                } else {
                    Change::Exited
                },
                occurred_at: at,
                sequence: seq.map(i64::from),
                attributes: attrs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            },
        )
}

fn variant() -> impl Strategy<Value = Variant> {
    const OPTIONAL: [&str; 5] = [
        "external_id",
        "email",
        "segment_name",
        "sequence",
        "attributes",
    ];
    (
        prop_oneof![
            Just(None),
            Just(Some("io.segmentsync")),
            Just(Some("com.acme.cdp.v2"))
        ],
        proptest::sample::subsequence(OPTIONAL.to_vec(), 0..=2),
        proptest::sample::subsequence(vec![0usize, 1, 2, 3], 0..=2),
        any::<bool>(),
    )
        .prop_flat_map(|(namespace, dropped, extra, narrow)| {
            let n = 9 - dropped.len() + extra.len();
            Just((0..n).collect::<Vec<_>>())
                .prop_shuffle()
                .prop_map(move |order| Variant {
                    namespace,
                    dropped: dropped.clone(),
                    extra: extra.clone(),
                    narrow,
                    order,
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plan_agrees_with_apache_avro(e in event(), v in variant()) {
        let (writer_text, datum) = writer(&e, &v);
        let writer_schema = Schema::parse_str(&writer_text).expect("writer schema parses");
        let reader_schema = Schema::parse_str(SCHEMA).expect("reader schema parses");
        let body = apache_avro::to_avro_datum(&writer_schema, datum).expect("datum encodes");

        let ours = sorted(decode_with(&writer_text, &body).expect("plan decodes"));
        let theirs = apache_avro::from_avro_datum(&writer_schema, &mut &body[..], Some(&reader_schema))
            .expect("apache_avro resolves");
        prop_assert_eq!(&ours, &sorted(from_value(theirs)));

        let mut expected = e.clone();
        for d in &v.dropped {
            match *d {
                "external_id" => expected.external_id = None,
                "email" => expected.email = None,
                "segment_name" => expected.segment_name = None,
                "sequence" => expected.sequence = None,
                _ => expected.attributes.clear(),
            }
        }
        prop_assert_eq!(ours, sorted(expected));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let registry = Arc::new(MemoryRegistry::new());
        let own = registry.register(SCHEMA);
        let e = Event {
            event_id: "e".into(), external_id: None, email: None, segment_id: "s".into(),
            segment_name: None, change: Change::Entered, occurred_at: 0, sequence: None,
            attributes: vec![],
        };
        let (rich, _) = writer(&e, &Variant {
            namespace: None, dropped: vec![], extra: vec![0, 1, 2, 3], narrow: true,
            order: (0..13).collect(),
        });
        let rich = registry.register(&rich);
        for format in [Format::Json, Format::Avro, Format::AvroConfluent] {
            let mut d = Decoder::new(format, Some(registry.clone())).expect("decoder");
            let _ = d.decode(&bytes);
            for id in [own, rich] {
                let mut payload = vec![0];
                payload.extend_from_slice(&id.to_be_bytes());
                payload.extend_from_slice(&bytes);
                if let Err(err) = d.decode(&payload) {
                    prop_assert!(!err.is_retryable());
                }
            }
        }
    }
}

fn sample() -> Event<'static> {
    Event {
        event_id: "0b9e6a52-3f1c-4c3e-9a57-3d2f7c1e0a11".into(),
        external_id: Some("user-000042".into()),
        email: Some("user-000042@example.com".into()),
        segment_id: "seg_high_value_03".into(),
        segment_name: Some("High value 03".into()),
        change: Change::Entered,
        occurred_at: 1_704_067_200_000,
        sequence: Some(17),
        attributes: vec![
            ("cdp_score".into(), AttrValue::Double(0.73)),
            ("tier".into(), AttrValue::String("gold".into())),
        ],
    }
}

fn own_variant() -> Variant {
    Variant {
        namespace: Some("io.segmentsync"),
        dropped: vec![],
        extra: vec![],
        narrow: false,
        order: (0..9).collect(),
    }
}

fn schema_error(writer_text: &str) -> DecodeError {
    let (_, datum) = writer(&sample(), &own_variant());
    let body = Schema::parse_str(&own_writer_text())
        .ok()
        .and_then(|s| apache_avro::to_avro_datum(&s, datum).ok())
        .expect("body");
    decode_with(writer_text, &body).expect_err("writer schema must be refused")
}

fn own_writer_text() -> String {
    writer(&sample(), &own_variant()).0
}

#[test]
fn every_truncation_of_a_body_is_a_record_error() {
    let body = encode::to_avro(&sample());
    let mut d = Decoder::new(Format::Avro, None).expect("decoder");
    assert_eq!(d.decode(&body).expect("whole body decodes"), sample());
    for len in 0..body.len() {
        let err = d.decode(&body[..len]).expect_err("truncated body");
        assert!(!err.is_retryable(), "{err}");
        assert_eq!(err.class_name(), "segment_sync::decode::AvroError");
    }
}

#[test]
fn writer_without_a_required_field_is_refused() {
    let text = own_writer_text().replace(r#"{"name":"segment_id","type":"string"},"#, "");
    assert!(!text.contains("segment_id"), "{text}");
    let err = schema_error(&text);
    assert!(matches!(err, DecodeError::Schema { .. }), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(
        err.class_name(),
        "segment_sync::decode::SchemaResolutionError"
    );
    assert!(err.to_string().contains("segment_id"), "{err}");
}

#[test]
fn writer_record_of_another_name_is_refused() {
    let text = own_writer_text().replace("\"SegmentMembershipChange\"", "\"Other\"");
    let err = schema_error(&text);
    assert!(err.to_string().contains("Other"), "{err}");
}

#[test]
fn writer_field_of_an_unresolvable_type_is_refused() {
    let text = own_writer_text().replace(
        r#"{"default":null,"name":"email","type":["null","string"]}"#,
        r#"{"name":"email","type":"int"}"#,
    );
    assert!(text.contains(r#""email","type":"int""#), "{text}");
    let err = schema_error(&text);
    assert!(err.to_string().contains("email"), "{err}");
}

#[test]
fn unknown_enum_symbol_fails_only_the_records_that_use_it() {
    let text = own_writer_text().replace(
        r#"["ENTERED","EXITED"]"#,
        r#"["ENTERED","EXITED","PAUSED"]"#,
    );
    assert!(text.contains("PAUSED"));
    let mut body = encode::to_avro(&sample());
    assert_eq!(
        decode_with(&text, &body).expect("ENTERED decodes"),
        sample()
    );
    // The enum index sits right after segment_name; ENTERED (0) becomes PAUSED (2).
    let at = body
        .windows(13)
        .position(|w| w == b"High value 03")
        .expect("segment_name in body")
        + 13;
    body[at] = 4;
    let err = decode_with(&text, &body).expect_err("PAUSED has no reader symbol");
    assert!(err.to_string().contains("PAUSED"), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn nullable_required_field_fails_only_on_null() {
    let text = own_writer_text().replace(
        r#"{"name":"segment_id","type":"string"}"#,
        r#"{"name":"segment_id","type":["null","string"]}"#,
    );
    let s = Schema::parse_str(&text).expect("parses");
    let (_, datum) = writer(&sample(), &own_variant());
    let Value::Record(mut fields) = datum else {
        panic!()
    };
    fields[3].1 = Value::Union(1, Box::new(Value::String("seg_x".into())));
    let body = apache_avro::to_avro_datum(&s, Value::Record(fields.clone())).expect("encodes");
    assert_eq!(
        decode_with(&text, &body).expect("string branch").segment_id,
        "seg_x"
    );
    fields[3].1 = Value::Union(0, Box::new(Value::Null));
    let body = apache_avro::to_avro_datum(&s, Value::Record(fields)).expect("encodes");
    let err = decode_with(&text, &body).expect_err("null branch");
    assert!(err.to_string().contains("segment_id"), "{err}");
}

#[test]
fn recursive_writer_types_are_skipped() {
    let text = json!({
        "type": "record", "name": "SegmentMembershipChange", "namespace": "x.y",
        "fields": [
            {"name": "list", "type": {"type": "record", "name": "Node", "fields": [
                {"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}]}},
            {"name": "event_id", "type": "string"},
            {"name": "segment_id", "type": "string"},
            {"name": "change", "type": {"type": "enum", "name": "MembershipChange", "symbols": ["EXITED", "ENTERED"]}},
            {"name": "occurred_at", "type": "long"},
            {"name": "again", "type": {"type": "array", "items": "Node"}},
        ]
    })
    .to_string();
    let node = |v: i32, next: Option<Value>| {
        Value::Record(vec![
            ("v".into(), Value::Int(v)),
            (
                "next".into(),
                match next {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(n) => Value::Union(1, Box::new(n)),
                },
            ),
        ])
    };
    let datum = Value::Record(vec![
        ("list".into(), node(1, Some(node(2, Some(node(3, None)))))),
        ("event_id".into(), Value::String("e".into())),
        ("segment_id".into(), Value::String("s".into())),
        ("change".into(), Value::Enum(1, "ENTERED".into())),
        ("occurred_at".into(), Value::Long(9)),
        (
            "again".into(),
            Value::Array(vec![node(4, None), node(5, Some(node(6, None)))]),
        ),
    ]);
    let schema = Schema::parse_str(&text).expect("parses");
    let body = apache_avro::to_avro_datum(&schema, datum).expect("encodes");
    let e = decode_with(&text, &body).expect("decodes");
    assert_eq!(
        (&*e.event_id, &*e.segment_id, e.change, e.occurred_at),
        ("e", "s", Change::Entered, 9)
    );
    assert_eq!(
        (e.external_id, e.sequence, e.attributes.len()),
        (None, None, 0)
    );
}

/// An array of a record with no fields (or only null fields) takes no bytes per item, so a
/// block count of 2^62 is a few bytes of body: skipping item by item never ended.
#[test]
fn a_huge_block_of_empty_records_is_skipped_at_once() {
    for item in [
        json!({"type": "record", "name": "Nothing", "fields": []}),
        json!({"type": "record", "name": "Nulls", "fields": [
            {"name": "a", "type": "null"},
            {"name": "b", "type": {"type": "record", "name": "Inner", "fields": []}}]}),
        json!({"type": "fixed", "name": "Zero", "size": 0}),
    ] {
        let text = json!({
            "type": "record", "name": "SegmentMembershipChange",
            "fields": [
                {"name": "empties", "type": {"type": "array", "items": item}},
                {"name": "event_id", "type": "string"},
                {"name": "segment_id", "type": "string"},
                {"name": "change", "type": {"type": "enum", "name": "MembershipChange", "symbols": ["EXITED", "ENTERED"]}},
                {"name": "occurred_at", "type": "long"},
            ]
        })
        .to_string();
        // Zigzag varint of 2^62, then the end of the array, then the event.
        let mut body = vec![
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00,
        ];
        body.extend_from_slice(&[2, b'e', 2, b's', 2, 18]);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = text.clone();
        std::thread::spawn(move || {
            let _ = tx.send(decode_with(&t, &body).map(|e| e.segment_id.into_owned()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("decoding hangs on an array of {item}"));
        assert_eq!(got.expect("decodes"), "s", "{text}");
    }
}
