//! Hostile input on librdkafka's mock cluster: one table of bad records, each produced beside
//! good ones, each with the place it must end up (the dead-letter topic with which error
//! class, or Braze as a documented transformation). The worker must keep consuming and
//! commit to the end of the log; every good user must be right. README's "Bad input" table
//! lists the same cases.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use segment_sync::config::{Config, Format};
use segment_sync::decode::SCHEMA;
use segment_sync::kafka::{owned_headers, RecordHeaders};

use support::mock::mock_env;
use support::registry::Registry;
use support::worker::{
    committed, dlq_origin, end_offsets, header, read_all, run_until_caught_up, test_config,
};

/// Where a record must end up.
#[derive(Debug, Clone)]
enum Want {
    /// Braze holds `seg` = true for the case's user.
    Applied,
    /// The dead-letter topic, with this exception class.
    Dead(&'static str),
}

struct Case {
    name: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    want: Want,
}

const JSON_ERR: &str = "segment_sync::decode::JsonError";
const AVRO_ERR: &str = "segment_sync::decode::AvroError";
const WIRE_ERR: &str = "segment_sync::decode::WireFormatError";
const UNKNOWN_ERR: &str = "segment_sync::decode::UnknownSchemaError";
const SCHEMA_ERR: &str = "segment_sync::decode::SchemaResolutionError";
const INVALID: &str = "segment_sync::event::InvalidEvent";

fn user(n: usize) -> String {
    format!("case-{n:03}")
}

/// A good JSON event for case `n`, with `edit` applied to it.
fn json_event(
    n: usize,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Vec<u8> {
    let mut e = json!({
        "event_id": format!("e-{n}"),
        "external_id": user(n),
        "segment_id": "seg",
        "change": "ENTERED",
        "occurred_at": 1_700_000_000_000i64,
        "sequence": 1,
    });
    edit(e.as_object_mut().expect("object"));
    serde_json::to_vec(&e).expect("json")
}

/// The JSON text of a good event for case `n` with `field`'s string value replaced by raw
/// bytes that are not UTF-8.
fn json_with_bad_utf8(n: usize, field: &str) -> Vec<u8> {
    let text = String::from_utf8(json_event(n, |e| {
        e.insert("segment_name".into(), json!("name"));
        e.insert("attributes".into(), json!({"attr": "value"}));
        e.insert(field.into(), json!("MARK"));
    }))
    .expect("utf8");
    let marked = if field == "attributes-name" {
        text.replace("\"attr\"", "\"MARK\"")
    } else {
        text
    };
    let mut out = Vec::new();
    let at = marked.find("MARK").expect("mark");
    out.extend_from_slice(&marked.as_bytes()[..at]);
    out.extend_from_slice(b"\xff\xfe");
    out.extend_from_slice(&marked.as_bytes()[at + 4..]);
    out
}

fn case(name: &str, value: Vec<u8>, want: Want) -> Case {
    Case {
        name: name.into(),
        key: None,
        value: Some(value),
        headers: Vec::new(),
        want,
    }
}

fn json_cases() -> Vec<Case> {
    let mut c: Vec<Case> = Vec::new();
    let add = |c: &mut Vec<Case>, name: &str, value: Vec<u8>, want: Want| {
        c.push(case(name, value, want));
    };
    let next = |c: &Vec<Case>| c.len();
    let i = next(&c);
    add(
        &mut c,
        "a good event (baseline)",
        json_event(i, |_| {}),
        Want::Applied,
    );
    // Headers and keys.
    let i = next(&c);
    let mut k = case(
        "header key not UTF-8, undecodable value",
        b"{not json".to_vec(),
        Want::Dead(JSON_ERR),
    );
    k.headers = vec![(b"k\xff\xfe".to_vec(), Some(b"v".to_vec()))];
    let _ = i;
    c.push(k);
    let mut k = case(
        "header value not UTF-8, undecodable value",
        b"{not json".to_vec(),
        Want::Dead(JSON_ERR),
    );
    k.headers = vec![(b"trace".to_vec(), Some(b"\xc3\x28".to_vec()))];
    c.push(k);
    let i = next(&c);
    let mut k = case(
        "header key and value not UTF-8, good event",
        json_event(i, |_| {}),
        Want::Applied,
    );
    k.headers = vec![(b"\xff".to_vec(), Some(b"\xfe".to_vec()))];
    c.push(k);
    let mut k = case(
        "header without a value, 10 KB header key, undecodable",
        b"[".to_vec(),
        Want::Dead(JSON_ERR),
    );
    k.headers = vec![
        (b"empty".to_vec(), None),
        (vec![b'h'; 10_000], Some(b"x".to_vec())),
    ];
    c.push(k);
    let i = next(&c);
    let mut k = case(
        "record key not UTF-8, good event",
        json_event(i, |_| {}),
        Want::Applied,
    );
    k.key = Some(b"\xff\xfe\x00".to_vec());
    c.push(k);
    let mut k = case(
        "record key not UTF-8, undecodable",
        b"\x00".to_vec(),
        Want::Dead(JSON_ERR),
    );
    k.key = Some(b"\xff\xfe\x00".to_vec());
    c.push(k);
    // Invalid UTF-8 in every string field.
    for field in [
        "event_id",
        "external_id",
        "email",
        "segment_id",
        "segment_name",
        "change",
        "attributes-name",
    ] {
        let i = next(&c);
        add(
            &mut c,
            &format!("invalid UTF-8 in {field}"),
            json_with_bad_utf8(i, field),
            Want::Dead(JSON_ERR),
        );
    }
    let i = next(&c);
    let bad_value = {
        let t = String::from_utf8(json_event(i, |e| {
            e.insert("attributes".into(), json!({"a": "MARK"}));
        }))
        .unwrap();
        let at = t.find("MARK").unwrap();
        [&t.as_bytes()[..at], b"\xff", &t.as_bytes()[at + 4..]].concat()
    };
    add(
        &mut c,
        "invalid UTF-8 in an attribute value",
        bad_value,
        Want::Dead(JSON_ERR),
    );
    // JSON of the wrong shape.
    add(
        &mut c,
        "a JSON array",
        b"[1,2,3]".to_vec(),
        Want::Dead(JSON_ERR),
    );
    add(
        &mut c,
        "a JSON string",
        b"\"event\"".to_vec(),
        Want::Dead(JSON_ERR),
    );
    add(&mut c, "JSON null", b"null".to_vec(), Want::Dead(JSON_ERR));
    add(&mut c, "an empty value", Vec::new(), Want::Dead(JSON_ERR));
    let i = next(&c);
    add(
        &mut c,
        "change of the wrong type",
        json_event(i, |e| {
            e.insert("change".into(), json!(1));
        }),
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "unknown change symbol",
        json_event(i, |e| {
            e.insert("change".into(), json!("MAYBE"));
        }),
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "occurred_at not a time",
        json_event(i, |e| {
            e.insert("occurred_at".into(), json!("yesterday"));
        }),
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "occurred_at out of range (1e30)",
        {
            let t = String::from_utf8(json_event(i, |_| {})).unwrap();
            t.replace("1700000000000", "1e30").into_bytes()
        },
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "sequence beyond i64",
        {
            let t = String::from_utf8(json_event(i, |_| {})).unwrap();
            t.replace("\"sequence\":1", "\"sequence\":99999999999999999999999")
                .into_bytes()
        },
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "duplicate keys",
        {
            let t = String::from_utf8(json_event(i, |_| {})).unwrap();
            t.replacen('{', "{\"segment_id\":\"other\",", 1)
                .into_bytes()
        },
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "nesting 10,000 deep in an unknown field (skipped without recursion)",
        {
            let t = String::from_utf8(json_event(i, |_| {})).unwrap();
            let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
            t.replacen('{', &format!("{{\"deep\":{deep},"), 1)
                .into_bytes()
        },
        Want::Applied,
    );
    let i = next(&c);
    add(
        &mut c,
        "NaN as an attribute value",
        {
            let t = String::from_utf8(json_event(i, |e| {
                e.insert("attributes".into(), json!({"a": 1}));
            }))
            .unwrap();
            t.replace("\"a\":1", "\"a\":NaN").into_bytes()
        },
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "an attribute double past f64 (1e400)",
        {
            let t = String::from_utf8(json_event(i, |e| {
                e.insert("attributes".into(), json!({"a": 1}));
            }))
            .unwrap();
            t.replace("\"a\":1", "\"a\":1e400").into_bytes()
        },
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "trailing bytes after the object",
        [json_event(i, |_| {}), b"}garbage".to_vec()].concat(),
        Want::Dead(JSON_ERR),
    );
    let i = next(&c);
    add(
        &mut c,
        "nesting 200 deep as an attribute value",
        {
            let t = String::from_utf8(json_event(i, |e| {
                e.insert("attributes".into(), json!({"a": 1}));
            }))
            .unwrap();
            let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
            t.replace("\"a\":1", &format!("\"a\":{deep}")).into_bytes()
        },
        Want::Dead(JSON_ERR),
    );
    c.push(Case {
        name: "a tombstone (no value)".into(),
        key: Some(b"user".to_vec()),
        value: None,
        headers: Vec::new(),
        want: Want::Dead("segment_sync::decode::EmptyValue"),
    });
    // Valid JSON, invalid events.
    let i = next(&c);
    add(
        &mut c,
        "neither external_id nor email",
        json_event(i, |e| {
            e.remove("external_id");
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "empty segment_id",
        json_event(i, |e| {
            e.insert("segment_id".into(), json!(""));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "occurred_at a year ahead",
        json_event(i, |e| {
            e.insert("occurred_at".into(), json!(4_102_444_800_000i64));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "external_id of 998 bytes",
        json_event(i, |e| {
            e.insert("external_id".into(), json!("x".repeat(998)));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "segment_id of 256 characters",
        json_event(i, |e| {
            e.insert("segment_id".into(), json!("s".repeat(256)));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "attribute value of 256 characters",
        json_event(i, |e| {
            e.insert("attributes".into(), json!({"a": "v".repeat(256)}));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "attribute value of 1 MB",
        json_event(i, |e| {
            e.insert("attributes".into(), json!({"a": "v".repeat(900_000)}));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "attribute name of 256 characters",
        json_event(i, |e| {
            e.insert("attributes".into(), json!({"n".repeat(256): 1}));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "empty attribute name",
        json_event(i, |e| {
            e.insert("attributes".into(), json!({"": 1}));
        }),
        Want::Dead(INVALID),
    );
    let i = next(&c);
    add(
        &mut c,
        "attribute named external_id",
        json_event(i, |e| {
            e.insert("attributes".into(), json!({"external_id": "someone-else"}));
        }),
        Want::Dead(INVALID),
    );
    // Documented transformations.
    let i = next(&c);
    add(
        &mut c,
        "external_id of 997 bytes (at the limit)",
        json_event(i, |e| {
            e.insert(
                "external_id".into(),
                json!(format!("{}{}", user(i), "x".repeat(997 - 8))),
            );
        }),
        Want::Applied,
    );
    let i = next(&c);
    add(
        &mut c,
        "NUL and control characters in segment_name",
        json_event(i, |e| {
            e.insert("segment_name".into(), json!("a\u{0}b\u{7}"));
        }),
        Want::Applied,
    );
    let i = next(&c);
    add(
        &mut c,
        "unknown fields",
        json_event(i, |e| {
            e.insert("surprise".into(), json!({"x": [1, 2]}));
        }),
        Want::Applied,
    );
    let i = next(&c);
    add(
        &mut c,
        "a value just under the consumer's fetch size (900 KB unknown field)",
        json_event(i, |e| {
            e.insert("padding".into(), json!("p".repeat(900_000)));
        }),
        Want::Applied,
    );
    add(
        &mut c,
        "an undecodable value of 999,000 bytes (its dead-letter copy is over message.max.bytes)",
        vec![b'x'; 999_000],
        Want::Dead(JSON_ERR),
    );
    c
}

/// The avro-confluent cases; `ids` are (our schema, a record of another name, a writer with
/// an array of empty records).
fn avro_cases(start: usize, ids: (u32, u32, u32)) -> Vec<Case> {
    let event = |n: usize| segment_sync::event::Event {
        event_id: format!("e-{n}").into(),
        external_id: Some(user(n).into()),
        email: None,
        segment_id: "seg".into(),
        segment_name: None,
        change: segment_sync::event::Change::Entered,
        occurred_at: 1_700_000_000_000,
        sequence: Some(1),
        attributes: vec![],
    };
    let good = |n: usize| segment_sync::tools::encode::to_confluent(ids.0, &event(n));
    let mut c = Vec::new();
    c.push(case(
        "a good Avro event (baseline)",
        good(start),
        Want::Applied,
    ));
    let mut wrong_magic = good(start + 1);
    wrong_magic[0] = 1;
    c.push(case("wrong magic byte", wrong_magic, Want::Dead(WIRE_ERR)));
    c.push(case(
        "shorter than the wire format's header",
        vec![0, 0, 1],
        Want::Dead(WIRE_ERR),
    ));
    let mut unknown = good(start + 3);
    unknown[1..5].copy_from_slice(&9999u32.to_be_bytes());
    c.push(case("unknown schema id", unknown, Want::Dead(UNKNOWN_ERR)));
    let mut other = good(start + 4);
    other[1..5].copy_from_slice(&ids.1.to_be_bytes());
    c.push(case(
        "incompatible schema id",
        other,
        Want::Dead(SCHEMA_ERR),
    ));
    let mut truncated = good(start + 5);
    truncated.truncate(truncated.len() - 3);
    c.push(case("truncated Avro body", truncated, Want::Dead(AVRO_ERR)));
    let mut bad_utf8 = good(start + 6);
    let at = bad_utf8
        .windows(3)
        .position(|w| w == b"seg")
        .expect("segment id");
    bad_utf8[at] = 0xff;
    c.push(case(
        "invalid UTF-8 in an Avro string",
        bad_utf8,
        Want::Dead(AVRO_ERR),
    ));
    let mut huge = vec![0];
    huge.extend_from_slice(&ids.2.to_be_bytes());
    huge.extend_from_slice(&[
        0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00,
    ]);
    huge.extend_from_slice(&segment_sync::tools::encode::to_avro(&event(start + 7)));
    c.push(case(
        "a block of 2^62 empty records before the event",
        huge,
        Want::Applied,
    ));
    let mut negative = vec![0];
    negative.extend_from_slice(&ids.0.to_be_bytes());
    negative.extend_from_slice(&[0x01]);
    c.push(case(
        "a negative string length",
        negative,
        Want::Dead(AVRO_ERR),
    ));
    c
}

fn produce_cases(cfg: &Config, cases: &[Case], rt: &tokio::runtime::Runtime) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("message.max.bytes", "1000000")
        .create()
        .expect("producer");
    let topic = &cfg.kafka.topics[0];
    rt.block_on(async {
        let mut out = Vec::new();
        for c in cases {
            let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).partition(0);
            if let Some(k) = &c.key {
                r = r.key(k.as_slice());
            }
            if let Some(v) = &c.value {
                r = r.payload(v.as_slice());
            }
            if !c.headers.is_empty() {
                r = r.headers(owned_headers(
                    c.headers.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
                ));
            }
            let d = producer
                .send(r, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            out.push((d.partition, d.offset));
        }
        out
    })
}

fn check(
    env_profiles: &BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    cfg: &Config,
    cases: &[Case],
    at: &[(i32, i64)],
    start: usize,
) {
    let dlq = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    let dead: BTreeMap<i64, &rdkafka::message::OwnedMessage> =
        dlq.iter().map(|m| (dlq_origin(m).1, m)).collect();
    let mut wrong = Vec::new();
    for (i, (c, (_, offset))) in cases.iter().zip(at).enumerate() {
        let n = start + i;
        let applied = env_profiles.iter().any(|(k, p)| {
            k.starts_with(&format!("external_id:{}", user(n))) && p.get("seg") == Some(&json!(true))
        });
        let got = match (dead.get(offset), applied) {
            (Some(m), false) => format!(
                "dead {}",
                header(m, "__connect.errors.exception.class.name").unwrap_or_default()
            ),
            (None, true) => "applied".to_string(),
            (d, a) => format!(
                "dead letter {:?}, applied {a}",
                d.map(|m| header(m, "__connect.errors.exception.message"))
            ),
        };
        let ok = match &c.want {
            Want::Applied => got == "applied",
            Want::Dead(class) => got == format!("dead {class}"),
        };
        if !ok {
            wrong.push(format!("{:>2} {}: want {:?}, got {got}", n, c.name, c.want));
        }
        // The dead-letter copy keeps what it can of the original, byte for byte.
        if let (Some(m), Want::Dead(_)) = (dead.get(offset), &c.want) {
            let copied = m.record_headers();
            for (k, v) in &c.headers {
                if !copied
                    .iter()
                    .any(|(ck, cv)| *ck == k.as_slice() && *cv == v.as_deref())
                {
                    wrong.push(format!("{n} {}: header {k:?} not copied", c.name));
                }
            }
            if m.key() != c.key.as_deref() {
                wrong.push(format!("{n} {}: key not copied", c.name));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases went wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

#[test]
fn every_bad_record_ends_where_the_table_says_and_the_worker_keeps_going() {
    let env = mock_env(segment_sync::tools::sim::Faults::default(), 0);
    // JSON.
    let topic = "bad-json";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster.create_topic("bad-json.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let cases = json_cases();
    let at = produce_cases(&cfg, &cases, &env.rt);
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    assert!(summary.dlq_records > 0);
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, 1),
        end_offsets(&cfg.kafka.brokers, topic, 1),
        "committed to the end"
    );
    check(&env.sim.state.profiles(), &cfg, &cases, &at, 0);

    // avro-confluent.
    let registry = Registry::start();
    let ours = registry.register(SCHEMA);
    let other = registry
        .register(r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#);
    let mut fields = vec![json!({"name": "empties", "type": {"type": "array", "items":
        {"type": "record", "name": "Nothing", "fields": []}}})];
    let ours_text: serde_json::Value = serde_json::from_str(SCHEMA).expect("schema");
    fields.extend(
        ours_text["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .cloned(),
    );
    let empties = registry.register(
        &json!({"type": "record", "name": "SegmentMembershipChange", "fields": fields}).to_string(),
    );
    let topic = "bad-avro";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster.create_topic("bad-avro.dlq", 1, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.kafka.format = Format::AvroConfluent;
    cfg.kafka.schema_registry_url = registry.url.clone();
    let start = cases.len();
    let avro = avro_cases(start, (ours, other, empties));
    let at = produce_cases(&cfg, &avro, &env.rt);
    run_until_caught_up(&cfg, &env.rt);
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, 1),
        end_offsets(&cfg.kafka.brokers, topic, 1),
    );
    check(&env.sim.state.profiles(), &cfg, &avro, &at, start);
    assert!(
        cases.len() + avro.len() >= 40,
        "{} cases",
        cases.len() + avro.len()
    );
}
