use std::collections::BTreeMap;

use super::*;
use crate::config::Unmapped;
use crate::event::Change;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/sources/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub(super) fn source(shape: Shape, edit: impl FnOnce(&mut SourceConfig)) -> Source {
    let mut c = SourceConfig {
        shape,
        ..SourceConfig::default()
    };
    edit(&mut c);
    Source::new(&c, Format::Json, None).expect("json needs no registry")
}

/// (segment, change, external_id, email, occurred_at) of a change.
pub(super) type Seen = (String, Change, Option<String>, Option<String>, i64);

/// Every change, sorted by segment.
pub(super) fn changes(read: Read<'_>) -> Vec<Seen> {
    let mut out: Vec<_> = read
        .into_events()
        .into_iter()
        .map(|e| {
            (
                e.segment_id.to_string(),
                e.change,
                e.external_id.map(|s| s.to_string()),
                e.email.map(|s| s.to_string()),
                e.occurred_at,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("time")
        .timestamp_millis()
}

fn adobe() -> Source {
    source(Shape::AdobeRtcdp, |c| {
        c.external_id = Some("/identityMap/crmId/0/id".into());
        c.email = Some("/personalEmail/address".into());
    })
}

#[test]
fn adobe_profile_gives_a_change_per_audience_existing_entering() {
    let value = fixture("adobe-rtcdp.json");
    let got = changes(adobe().read(Some(&value)).expect("reads"));
    let at = ms("2026-11-04T10:15:31Z");
    let who = (
        Some("crm-1001".to_string()),
        Some("ana.silva@example.com".to_string()),
    );
    assert_eq!(
        got,
        vec![
            (
                "354e086f-2e11-49a2-9e39-e5d9a76be683".into(),
                Change::Entered,
                who.0.clone(),
                who.1.clone(),
                at
            ),
            (
                "5b998cb9-9488-4ec3-8d95-fa8338ced490".into(),
                Change::Entered,
                who.0.clone(),
                who.1.clone(),
                at
            ),
            (
                "9d3b51a0-7e2c-4c43-bf63-0b8dcbd2d8aa".into(),
                Change::Exited,
                who.0,
                who.1,
                at
            ),
        ]
    );
}

#[test]
fn adobe_mapping_renames_and_skips_the_audiences_it_does_not_name() {
    let value = fixture("adobe-rtcdp.json");
    let mut s = source(Shape::AdobeRtcdp, |c| {
        c.external_id = Some("/identityMap/crmId/0/id".into());
        c.segments = BTreeMap::from([(
            "5b998cb9-9488-4ec3-8d95-fa8338ced490".to_string(),
            "high_value".to_string(),
        )]);
    });
    match s.read(Some(&value)).expect("reads") {
        Read::Many { events, unmapped } => {
            assert_eq!(unmapped, 2);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].segment_id, "high_value");
            assert_eq!(
                events[0].segment_name.as_deref(),
                Some("High value customers")
            );
        }
        other => panic!("{other:?}"),
    }
    // Told to write the others under their ids, it does.
    let mut s = source(Shape::AdobeRtcdp, |c| {
        c.external_id = Some("/identityMap/crmId/0/id".into());
        c.segments = BTreeMap::from([("x".to_string(), "y".to_string())]);
        c.unmapped = Some(Unmapped::UseId);
    });
    assert_eq!(s.read(Some(&value)).expect("reads").into_events().len(), 3);
}

#[test]
fn adobe_profile_without_membership_is_another_kind_and_a_bad_status_is_named() {
    let mut s = adobe();
    let r = s.read(Some(
        br#"{"identityMap":{"crmId":[{"id":"a"}]},"person":{}}"#,
    ));
    assert!(matches!(r, Ok(Read::Ignored(Ignored::OtherKind))), "{r:?}");
    let bad = br#"{"identityMap":{"crmId":[{"id":"a"}]},"segmentMembership":{"ups":{"aud":{"status":"queued","lastQualificationTime":"2026-11-04T10:15:31Z"}}}}"#;
    let e = s.read(Some(bad)).expect_err("queued is not a status");
    assert!(
        e.to_string().contains("segmentMembership.ups.aud.status"),
        "{e}"
    );
    let nobody = br#"{"segmentMembership":{"ups":{"aud":{"status":"realized","lastQualificationTime":"2026-11-04T10:15:31Z"}}}}"#;
    let e = s.read(Some(nobody)).expect_err("no identity");
    assert!(e.to_string().contains("/identityMap/crmId/0/id"), "{e}");
}

#[test]
fn adobe_event_ids_repeat_for_the_same_record_and_differ_for_another_time() {
    let value = fixture("adobe-rtcdp.json");
    let ids = |v: &[u8]| -> Vec<String> {
        let mut ids: Vec<String> = adobe()
            .read(Some(v))
            .expect("reads")
            .into_events()
            .into_iter()
            .map(|e| e.event_id.to_string())
            .collect();
        ids.sort();
        ids
    };
    let first = ids(&value);
    assert_eq!(first, ids(&value));
    let later = String::from_utf8(value.clone())
        .expect("utf-8")
        .replace("2026-11-04T10:15:31Z", "2026-11-05T10:15:31Z");
    assert!(ids(later.as_bytes()).iter().all(|id| !first.contains(id)));
}

#[test]
fn segment_identify_and_track_calls_become_changes_with_their_message_ids() {
    let mut s = source(Shape::Segment, |_| {});
    let identify = fixture("segment-identify.json");
    let Read::One(e) = s.read(Some(&identify)).expect("reads") else {
        panic!("one change")
    };
    assert_eq!(e.segment_id, "high_value_customers");
    assert_eq!(e.change, Change::Entered);
    assert_eq!(e.external_id.as_deref(), Some("crm-1001"));
    assert_eq!(e.email.as_deref(), Some("ana.silva@example.com"));
    assert_eq!(
        e.event_id,
        "personas_1ZxT8cVhYNv2dT0nXgGkmJ7wqQz:high_value_customers"
    );
    assert_eq!(e.occurred_at, ms("2026-11-04T10:15:31.284Z"));
    let track = fixture("segment-track.json");
    let Read::One(e) = s.read(Some(&track)).expect("reads") else {
        panic!("one change")
    };
    assert_eq!(
        (e.segment_id.as_ref(), e.change),
        ("cart_abandoners", Change::Exited)
    );
    // Email only in context.traits (a track call has no traits of its own).
    assert_eq!(e.email.as_deref(), Some("ana.silva@example.com"));
}

#[test]
fn segment_page_calls_and_other_track_events_are_other_kinds() {
    let mut s = source(Shape::Segment, |_| {});
    let page = fixture("segment-page.json");
    assert!(matches!(
        s.read(Some(&page)),
        Ok(Read::Ignored(Ignored::OtherKind))
    ));
    let other = br#"{"type":"track","event":"Order Completed","userId":"u","timestamp":"2026-11-04T10:15:31Z"}"#;
    assert!(matches!(
        s.read(Some(other)),
        Ok(Read::Ignored(Ignored::OtherKind))
    ));
    let plain = br#"{"type":"identify","userId":"u","traits":{"vip":true},"timestamp":"2026-11-04T10:15:31Z"}"#;
    assert!(matches!(
        s.read(Some(plain)),
        Ok(Read::Ignored(Ignored::OtherKind))
    ));
}

#[test]
fn segment_identify_with_two_audience_traits_gives_two_changes() {
    let mut s = source(Shape::Segment, |_| {});
    let two =
        br#"{"type":"identify","userId":"u1","messageId":"m1","timestamp":"2026-11-04T10:15:31Z",
        "context":{"personas":{"computation_class":"audience"}},
        "traits":{"email":"u1@example.com","vip":true,"churn_risk":false}}"#;
    let got = changes(s.read(Some(two)).expect("reads"));
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].0.as_str(), got[0].1),
        ("churn_risk", Change::Exited)
    );
    assert_eq!((got[1].0.as_str(), got[1].1), ("vip", Change::Entered));
}

#[test]
fn segment_audience_track_without_audience_key_is_named() {
    let mut s = source(Shape::Segment, |_| {});
    let bad = br#"{"type":"track","event":"Audience Entered","userId":"u","timestamp":"2026-11-04T10:15:31Z","context":{"personas":{"computation_class":"audience"}},"properties":{}}"#;
    let e = s.read(Some(bad)).expect_err("no key");
    assert!(e.to_string().contains("properties.audience_key"), "{e}");
}

#[test]
fn lytics_enter_exit_and_the_far_future_exit_that_means_still_a_member() {
    let mut s = source(Shape::Lytics, |_| {});
    let value = fixture("lytics.json");
    let who = (
        Some("crm-1001".to_string()),
        Some("ana.silva@example.com".to_string()),
    );
    assert_eq!(
        changes(s.read(Some(&value)).expect("reads")),
        vec![
            (
                "cart_abandoners".into(),
                Change::Exited,
                who.0.clone(),
                who.1.clone(),
                ms("2026-11-04T10:16:12Z")
            ),
            (
                "high_value_customers".into(),
                Change::Entered,
                who.0,
                who.1,
                ms("2026-11-04T10:15:31Z")
            ),
        ]
    );
    let still = br#"{"data":{"user_id":"u","segment_events":[{"event":"exit","slug":"s","enter":"2026-01-01T00:00:00Z","exit":"2099-12-31T00:00:00Z"}]}}"#;
    let Read::One(e) = s.read(Some(still)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(e.change, Change::Entered);
    let bad = br#"{"data":{"user_id":"u","segment_events":[{"event":"left","slug":"s","exit":"2026-01-01T00:00:00Z"}]}}"#;
    let e = s.read(Some(bad)).expect_err("left");
    assert!(
        e.to_string().contains("data.segment_events[0].event"),
        "{e}"
    );
}

fn debezium(member: bool) -> Source {
    source(Shape::Debezium, |c| {
        c.user_column = Some("user_id".into());
        c.segment_column = Some("segment_id".into());
        c.email_column = Some("email".into());
        if member {
            c.member_column = Some("is_member".into());
        }
    })
}

#[test]
fn debezium_insert_with_its_schema_wrapper_enters_with_the_lsn_as_sequence() {
    let value = fixture("debezium-envelope.json");
    let Read::One(e) = debezium(false).read(Some(&value)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(e.external_id.as_deref(), Some("crm-1001"));
    assert_eq!(e.segment_id, "high_value_customers");
    assert_eq!(e.change, Change::Entered);
    assert_eq!(e.sequence, Some(24023184));
    assert_eq!(e.occurred_at, 1793873731120);
}

#[test]
fn debezium_delete_exits_from_before_and_its_tombstone_is_ignored() {
    let value = fixture("debezium-delete.json");
    let Read::One(e) = debezium(false).read(Some(&value)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(
        (e.segment_id.as_ref(), e.change),
        ("cart_abandoners", Change::Exited)
    );
    assert!(matches!(
        debezium(false).read(None),
        Ok(Read::Ignored(Ignored::Tombstone))
    ));
    let wrapped_null = br#"{"schema":null,"payload":null}"#;
    assert!(matches!(
        debezium(false).read(Some(wrapped_null)),
        Ok(Read::Ignored(Ignored::Tombstone))
    ));
}

#[test]
fn debezium_flattened_update_follows_the_member_column() {
    let value = fixture("debezium-flattened.json");
    let Read::One(e) = debezium(true).read(Some(&value)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(e.change, Change::Exited);
    assert_eq!(e.sequence, Some(24023900));
    let Read::One(e) = debezium(false).read(Some(&value)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(
        e.change,
        Change::Entered,
        "without a member column an update enters"
    );
}

#[test]
fn debezium_mysql_has_no_sequence_and_orders_by_commit_time() {
    let value = fixture("debezium-mysql.json");
    let Read::One(e) = debezium(true).read(Some(&value)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(e.sequence, None);
    assert_eq!(e.occurred_at, 1793874000000);
    assert_eq!(e.change, Change::Entered);
}

#[test]
fn debezium_row_without_the_user_column_is_named() {
    let row = br#"{"op":"c","after":{"segment_id":"s"},"source":{"ts_ms":1,"connector":"postgresql","lsn":5}}"#;
    let e = debezium(false).read(Some(row)).expect_err("no user");
    assert!(e.to_string().contains("\"user_id\""), "{e}");
}

#[test]
fn the_change_shape_reads_as_before_and_a_missing_value_is_an_error() {
    let mut s = source(Shape::Change, |_| {});
    let value = br#"{"event_id":"e1","external_id":"u1","segment_id":"s","change":"ENTERED","occurred_at":5}"#;
    let Read::One(e) = s.read(Some(value)).expect("reads") else {
        panic!("one")
    };
    assert_eq!(e.event_id, "e1");
    assert!(matches!(s.read(None), Err(SourceError::NoValue)));
}

#[test]
fn not_json_is_undecodable_in_every_cdp_shape() {
    for shape in Shape::ALL.into_iter().filter(|s| *s != Shape::Change) {
        let e = source(shape, |_| {})
            .read(Some(b"\x00not json"))
            .expect_err("not json");
        assert_eq!(
            e.class_name(),
            "segment_sync::decode::JsonError",
            "{shape:?}"
        );
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Every fixture cut short or with a byte changed: each shape reads it, ignores it or
    /// names what is wrong, and never panics (the fuzz targets explore further).
    fn mangled(name: &str, cut: usize, at: usize, byte: u8) -> Vec<u8> {
        let mut v = fixture(name);
        let at = at % v.len();
        v[at] = byte;
        v.truncate(v.len() - cut % v.len());
        v
    }

    proptest! {
        #[test]
        fn mangled_vendor_records_never_panic(cut in 0usize..64, at in 0usize..4096, byte in any::<u8>()) {
            for (shape, name) in [
                (Shape::AdobeRtcdp, "adobe-rtcdp.json"),
                (Shape::Segment, "segment-identify.json"),
                (Shape::Segment, "segment-track.json"),
                (Shape::Lytics, "lytics.json"),
                (Shape::Debezium, "debezium-envelope.json"),
                (Shape::Debezium, "debezium-flattened.json"),
            ] {
                let mut s = source(shape, |c| *c = crate::tools::shapes::source_config(shape));
                let value = mangled(name, cut, at, byte);
                if let Ok(read) = s.read(Some(&value)) {
                    for e in read.into_events() {
                        let _ = e.validate();
                    }
                }
            }
        }
    }
}

/// The Avro value schema Debezium's Avro converter registers for a membership table.
const DEBEZIUM_AVRO: &str = r#"{"type":"record","name":"Envelope","namespace":"cdp.public.segment_members",
 "fields":[
  {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
     {"name":"user_id","type":"string"},{"name":"segment_id","type":"string"},
     {"name":"email","type":["null","string"],"default":null},{"name":"is_member","type":"boolean"}]}],"default":null},
  {"name":"after","type":["null","Value"],"default":null},
  {"name":"source","type":{"type":"record","name":"Source","namespace":"io.debezium.connector.postgresql","fields":[
     {"name":"version","type":"string"},{"name":"connector","type":"string"},{"name":"ts_ms","type":"long"},
     {"name":"lsn","type":["null","long"],"default":null}]}},
  {"name":"op","type":"string"},
  {"name":"ts_ms","type":["null","long"],"default":null}]}"#;

#[test]
fn debezium_through_avro_confluent_reads_as_its_json_form() {
    use apache_avro::types::Value as A;
    let registry = std::sync::Arc::new(crate::decode::MemoryRegistry::new());
    let id = registry.register(DEBEZIUM_AVRO);
    let schema = apache_avro::Schema::parse_str(DEBEZIUM_AVRO).expect("schema");
    let row = |member: bool| {
        A::Record(vec![
            ("user_id".into(), A::String("crm-1001".into())),
            ("segment_id".into(), A::String("high_value".into())),
            (
                "email".into(),
                A::Union(1, Box::new(A::String("ana@example.com".into()))),
            ),
            ("is_member".into(), A::Boolean(member)),
        ])
    };
    let envelope = |op: &str, before: A, after: A| {
        A::Record(vec![
            ("before".into(), before),
            ("after".into(), after),
            (
                "source".into(),
                A::Record(vec![
                    ("version".into(), A::String("2.7.3.Final".into())),
                    ("connector".into(), A::String("postgresql".into())),
                    ("ts_ms".into(), A::Long(1793873731120)),
                    ("lsn".into(), A::Union(1, Box::new(A::Long(24023184)))),
                ]),
            ),
            ("op".into(), A::String(op.into())),
            (
                "ts_ms".into(),
                A::Union(1, Box::new(A::Long(1793873731502))),
            ),
        ])
    };
    let framed = |v: A| {
        let mut payload = vec![0];
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend(apache_avro::to_avro_datum(&schema, v).expect("encodes"));
        payload
    };
    let mut c = crate::tools::shapes::source_config(Shape::Debezium);
    c.shape = Shape::Debezium;
    let mut s = Source::new(&c, Format::AvroConfluent, Some(registry.clone())).expect("source");
    let update = framed(envelope(
        "u",
        A::Union(0, Box::new(A::Null)),
        A::Union(1, Box::new(row(false))),
    ));
    let Read::One(e) = s.read(Some(&update)).expect("reads") else {
        panic!("one change")
    };
    assert_eq!(e.external_id.as_deref(), Some("crm-1001"));
    assert_eq!(e.email.as_deref(), Some("ana@example.com"));
    assert_eq!(
        (e.segment_id.as_ref(), e.change),
        ("high_value", Change::Exited)
    );
    assert_eq!((e.sequence, e.occurred_at), (Some(24023184), 1793873731120));
    let delete = framed(envelope(
        "d",
        A::Union(1, Box::new(row(true))),
        A::Union(0, Box::new(A::Null)),
    ));
    let Read::One(e) = s.read(Some(&delete)).expect("reads") else {
        panic!("one change")
    };
    assert_eq!(e.change, Change::Exited);
    assert!(matches!(
        s.read(None),
        Ok(Read::Ignored(Ignored::Tombstone))
    ));
    // Not the wire format, and an id the registry does not hold: the record's fault.
    assert!(s.read(Some(b"{\"op\":\"c\"}")).is_err());
    let mut unknown = update.clone();
    unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
    let e = s.read(Some(&unknown)).expect_err("unknown id");
    assert!(!e.is_retryable(), "{e}");
}
