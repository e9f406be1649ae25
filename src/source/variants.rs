//! Records written as each vendor documents them, differing from the project's fixtures in
//! the ways real exports do: several identity namespaces, audiences of other namespaces,
//! times with fractions and offsets, calls whose traits sit elsewhere, wrappers and
//! flattenings, other connectors' source blocks. Each runs through `Source::read`, the
//! worker's own seam.

use super::*;
use crate::event::Change;

use super::tests::{source, Seen};

/// Every change, sorted by segment then change (the fixtures' tests sort by segment only).
fn changes(read: Read<'_>) -> Vec<Seen> {
    let mut out = super::tests::changes(read);
    out.sort_by(|a, b| (&a.0, a.1.symbol()).cmp(&(&b.0, b.1.symbol())));
    out
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("time")
        .timestamp_millis()
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

// --- Adobe Real-Time CDP -------------------------------------------------------------

fn adobe() -> Source {
    source(Shape::AdobeRtcdp, |c| {
        c.external_id = Some("/identityMap/crmId/0/id".into());
        c.email = Some("/identityMap/email/0/id".into());
    })
}

#[test]
fn adobe_profile_with_several_namespaces_fractional_offset_times_and_extra_fields() {
    let profile = br#"{
      "person": {"name": {"firstName": "Ana"}},
      "personalEmail": {"address": "ana@example.com"},
      "identityMap": {
        "ecid": [{"id": "14575006536349286404619648085736425115", "authenticatedState": "ambiguous", "primary": false}],
        "email": [{"id": "ana@example.com", "primary": false, "authenticatedState": "authenticated"},
                  {"id": "ana.old@example.com"}],
        "crmId": [{"id": "crm-77", "primary": true, "authenticatedState": "authenticated"}]
      },
      "segmentMembership": {"ups": {
        "a1": {"lastQualificationTime": "2026-11-04T10:15:31.123456Z", "status": "realized",
               "name": "Gold", "createdAt": 1, "mappingCreatedAt": 2, "mappingUpdatedAt": 3},
        "a2": {"lastQualificationTime": "2026-11-04T11:15:31.5+01:00", "status": "exited"},
        "a3": {"lastQualificationTime": "2026-11-04T10:15:31Z", "status": "existing"}
      }},
      "extra": {"nested": [1, 2, {"x": null}]}
    }"#;
    let got = changes(adobe().read(Some(profile)).expect("reads"));
    let who = (s("crm-77"), s("ana@example.com"));
    assert_eq!(
        got,
        vec![
            (
                "a1".into(),
                Change::Entered,
                who.0.clone(),
                who.1.clone(),
                ms("2026-11-04T10:15:31.123Z")
            ),
            (
                "a2".into(),
                Change::Exited,
                who.0.clone(),
                who.1.clone(),
                ms("2026-11-04T10:15:31.5Z")
            ),
            (
                "a3".into(),
                Change::Entered,
                who.0,
                who.1,
                ms("2026-11-04T10:15:31Z")
            ),
        ]
    );
}

#[test]
fn adobe_audiences_of_other_namespaces_than_ups_are_read() {
    // Audiences imported by custom upload or from Audience Manager sit under their own
    // namespace of segmentMembership, beside `ups`.
    let profile = br#"{"identityMap": {"crmId": [{"id": "crm-9"}]},
      "segmentMembership": {
        "ups": {"u1": {"status": "realized", "lastQualificationTime": "2026-11-04T10:15:31Z"}},
        "CustomerAudienceUpload": {"c1": {"status": "exited", "lastQualificationTime": "2026-11-04T10:16:00Z"}},
        "aam": {"m1": {"status": "existing", "lastQualificationTime": "2026-11-04T10:17:00Z"}}
      }}"#;
    let got: Vec<(String, Change)> = changes(adobe().read(Some(profile)).expect("reads"))
        .into_iter()
        .map(|c| (c.0, c.1))
        .collect();
    assert_eq!(
        got,
        vec![
            ("c1".into(), Change::Exited),
            ("m1".into(), Change::Entered),
            ("u1".into(), Change::Entered),
        ]
    );
    // An audience of another namespace is mapped and skipped like one of `ups`.
    let mut mapped = source(Shape::AdobeRtcdp, |c| {
        c.external_id = Some("/identityMap/crmId/0/id".into());
        c.segments = [("c1".to_string(), "uploaded_vips".to_string())].into();
    });
    let got = changes(mapped.read(Some(profile)).expect("reads"));
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.as_str(), got[0].1),
        ("uploaded_vips", Change::Exited)
    );
}

#[test]
fn adobe_status_outside_the_documented_enum_names_the_field_and_namespace() {
    // XDM's status enum is lower case; anything else is named, with its namespace.
    let profile = br#"{"identityMap": {"crmId": [{"id": "crm-9"}]},
      "segmentMembership": {"aam": {"m1": {"status": "Realized", "lastQualificationTime": "2026-11-04T10:17:00Z"}}}}"#;
    let e = adobe()
        .read(Some(profile))
        .expect_err("Realized is not in the enum");
    assert!(
        e.to_string().contains("segmentMembership.aam.m1.status"),
        "{e}"
    );
    let no_time = br#"{"identityMap": {"crmId": [{"id": "crm-9"}]},
      "segmentMembership": {"ups": {"m1": {"status": "realized"}}}}"#;
    let e = adobe().read(Some(no_time)).expect_err("no time");
    assert!(
        e.to_string()
            .contains("segmentMembership.ups.m1.lastQualificationTime"),
        "{e}"
    );
}

#[test]
fn adobe_empty_membership_is_another_kind() {
    let profile =
        br#"{"identityMap": {"crmId": [{"id": "crm-9"}]}, "segmentMembership": {"ups": {}}}"#;
    assert!(matches!(
        adobe().read(Some(profile)),
        Ok(Read::Ignored(Ignored::OtherKind))
    ));
}

// --- Twilio Segment --------------------------------------------------------------------

fn segment() -> Source {
    source(Shape::Segment, |_| {})
}

#[test]
fn segment_identify_with_the_audience_trait_only_in_context_traits() {
    let call = br#"{"type": "identify", "userId": "u1", "messageId": "m-ctx",
      "timestamp": "2026-11-04T10:15:31.284Z",
      "context": {"personas": {"computation_class": "audience", "computation_key": "vip",
                               "computation_id": "aud_1"},
                  "traits": {"email": "u1@example.com", "vip": false}}}"#;
    let Read::One(e) = segment().read(Some(call)).expect("reads") else {
        panic!("one change")
    };
    assert_eq!((e.segment_id.as_ref(), e.change), ("vip", Change::Exited));
    assert_eq!(e.email.as_deref(), Some("u1@example.com"));
    assert_eq!(e.event_id, "m-ctx:vip");
}

#[test]
fn segment_anonymous_call_reads_by_email_and_without_email_names_the_pointers() {
    let call = br#"{"type": "identify", "userId": null, "anonymousId": "anon-1",
      "messageId": "m2", "originalTimestamp": "2026-11-04T10:15:31Z",
      "sentAt": "2026-11-04T10:15:32Z", "receivedAt": "2026-11-04T10:15:33Z",
      "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}},
      "traits": {"email": "anon@example.com", "vip": true}}"#;
    let Read::One(e) = segment().read(Some(call)).expect("reads") else {
        panic!("one change")
    };
    assert_eq!(e.external_id, None);
    assert_eq!(e.email.as_deref(), Some("anon@example.com"));
    // No `timestamp`: the call's originalTimestamp is when it happened.
    assert_eq!(e.occurred_at, ms("2026-11-04T10:15:31Z"));
    let nobody = br#"{"type": "identify", "userId": null, "anonymousId": "anon-1",
      "timestamp": "2026-11-04T10:15:31Z",
      "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}},
      "traits": {"vip": true}}"#;
    let e = segment().read(Some(nobody)).expect_err("no identity");
    assert!(e.to_string().contains("/userId"), "{e}");
    assert!(e.to_string().contains("/context/traits/email"), "{e}");
}

#[test]
fn segment_track_with_the_boolean_under_the_key_and_both_calls_for_one_change() {
    let track = br#"{"type": "track", "event": "Audience Entered", "userId": "u1",
      "messageId": "m-track", "timestamp": "2026-11-04T10:15:31+00:00",
      "context": {"personas": {"computation_class": "audience", "computation_key": "vip"},
                  "traits": {"email": "u1@example.com"}},
      "properties": {"audience_key": "vip", "vip": true}}"#;
    let identify = br#"{"type": "identify", "userId": "u1", "messageId": "m-identify",
      "timestamp": "2026-11-04T10:15:31+00:00",
      "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}},
      "traits": {"email": "u1@example.com", "vip": true}}"#;
    let batch =
        [&track[..], &identify[..]].map(|v| changes(segment().read(Some(v)).expect("reads")));
    assert_eq!(batch[0], batch[1], "both calls say the same");
    assert_eq!(
        batch[0],
        vec![(
            "vip".into(),
            Change::Entered,
            s("u1"),
            s("u1@example.com"),
            ms("2026-11-04T10:15:31Z")
        )]
    );
}

// --- Lytics ------------------------------------------------------------------------

fn lytics() -> Source {
    source(Shape::Lytics, |_| {})
}

#[test]
fn lytics_new_webhook_format_with_nanoseconds_offsets_and_no_user_id() {
    let record = br#"{"id": "7076027172059065053",
      "data": {"_created": "2020-07-15T08:55:43.041-07:00", "email": "beth@example.com",
               "channels": ["web"], "hourly": {"15": 1},
               "segment_events": [{"id": "42976a269a5e6b9d06c681b1c27292df", "event": "enter",
                                   "slug": "emailzz5", "enter": "2020-10-14T13:27:33.916374949-07:00"}],
               "user_attributes": {"value": "681"}},
      "meta": {"object": "user", "subscription_id": "sub", "timestamp": "2020-10-14T20:27:40Z"}}"#;
    let got = changes(lytics().read(Some(record)).expect("reads"));
    assert_eq!(
        got,
        vec![(
            "emailzz5".into(),
            Change::Entered,
            None,
            s("beth@example.com"),
            ms("2020-10-14T20:27:33.916Z")
        )]
    );
}

#[test]
fn lytics_several_events_past_and_far_future_exits_and_epoch_millis() {
    let record = br#"{"data": {"user_id": "u9", "email": "u9@example.com", "segment_events": [
        {"id": "1", "event": "enter", "slug": "a", "enter": 1793873731120},
        {"id": "2", "event": "exit", "slug": "b", "enter": "2026-01-01T00:00:00Z", "exit": "1793873731999"},
        {"id": "3", "event": "exit", "slug": "c", "enter": "2026-01-01T00:00:00Z", "exit": "2099-12-31T23:59:59Z"},
        {"id": "4", "slug": "d", "enter": "2026-01-01T00:00:00Z", "exit": "2026-02-01T00:00:00Z"}
      ]}, "meta": {"object": "user", "timestamp": "2026-11-04T10:15:31Z"}}"#;
    let got: Vec<(String, Change, i64)> = changes(lytics().read(Some(record)).expect("reads"))
        .into_iter()
        .map(|c| (c.0, c.1, c.4))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".into(), Change::Entered, 1793873731120),
            ("b".into(), Change::Exited, 1793873731999),
            ("c".into(), Change::Entered, ms("2026-01-01T00:00:00Z")),
            ("d".into(), Change::Exited, ms("2026-02-01T00:00:00Z")),
        ]
    );
}

// --- Debezium --------------------------------------------------------------------------

fn debezium(member: bool) -> Source {
    source(Shape::Debezium, |c| {
        c.user_column = Some("user_id".into());
        c.segment_column = Some("segment_id".into());
        if member {
            c.member_column = Some("is_member".into());
        }
    })
}

/// (segment, change, user, occurred_at, sequence) of every change, sorted.
fn rows(read: Read<'_>) -> Vec<(String, Change, String, i64, Option<i64>)> {
    let mut out: Vec<_> = read
        .into_events()
        .into_iter()
        .map(|e| {
            (
                e.segment_id.to_string(),
                e.change,
                e.external_id.map(|s| s.to_string()).unwrap_or_default(),
                e.occurred_at,
                e.sequence,
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.2).cmp(&(&b.0, &b.2)));
    out
}

const PG_SOURCE: &str = r#"{"version": "2.7.3.Final", "connector": "postgresql", "name": "cdp",
    "ts_ms": 1793873731120, "ts_us": 1793873731120123, "ts_ns": 1793873731120123000,
    "snapshot": "false", "db": "cdp", "sequence": "[\"24023000\",\"24023184\"]",
    "schema": "public", "table": "segment_members", "txId": 771, "lsn": 24023184, "xmin": null}"#;

#[test]
fn debezium_envelope_without_wrapper_snapshot_reads_and_microsecond_times() {
    let read = format!(
        r#"{{"before": null, "after": {{"user_id": 42, "segment_id": "vip", "is_member": true}},
        "source": {}, "op": "r", "ts_ms": 1793873731500, "ts_us": 1793873731500000,
        "ts_ns": 1793873731500000000, "transaction": null}}"#,
        PG_SOURCE.replace(r#""snapshot": "false""#, r#""snapshot": "last""#)
    );
    assert_eq!(
        rows(debezium(true).read(Some(read.as_bytes())).expect("reads")),
        vec![(
            "vip".into(),
            Change::Entered,
            "42".into(),
            1793873731120,
            Some(24023184)
        )]
    );
    let wrapped = format!(r#"{{"schema": {{"type": "struct", "fields": []}}, "payload": {read}}}"#);
    assert_eq!(
        rows(
            debezium(true)
                .read(Some(wrapped.as_bytes()))
                .expect("reads")
        ),
        rows(debezium(true).read(Some(read.as_bytes())).expect("reads"))
    );
}

#[test]
fn debezium_update_with_and_without_the_member_column() {
    let update = |member: &str| {
        format!(
            r#"{{"before": {{"user_id": "u1", "segment_id": "vip", "is_member": true}},
            "after": {{"user_id": "u1", "segment_id": "vip"{member}}},
            "source": {PG_SOURCE}, "op": "u", "ts_ms": 1793873731500}}"#
        )
    };
    let off = update(r#", "is_member": false"#);
    assert_eq!(
        rows(debezium(true).read(Some(off.as_bytes())).expect("reads"))[0].1,
        Change::Exited
    );
    assert_eq!(
        rows(debezium(false).read(Some(off.as_bytes())).expect("reads"))[0].1,
        Change::Entered,
        "without source.member_column an update enters"
    );
    let e = debezium(true)
        .read(Some(update("").as_bytes()))
        .expect_err("the member column is configured but absent");
    assert!(e.to_string().contains("\"is_member\""), "{e}");
}

#[test]
fn debezium_update_that_moves_a_row_to_another_segment_exits_the_old_one() {
    // A table keyed by a surrogate id: an update can change the row's segment (or user);
    // the old pair is left, the new one entered. MySQL always writes `before`; PostgreSQL
    // with REPLICA IDENTITY FULL.
    let moved = br#"{"before": {"id": 7, "user_id": "u1", "segment_id": "silver", "is_member": 1},
        "after": {"id": 7, "user_id": "u1", "segment_id": "gold", "is_member": 1},
        "source": {"connector": "mysql", "ts_ms": 1793874000000, "file": "mysql-bin.000003",
                   "pos": 154, "row": 0, "server_id": 1, "gtid": null, "snapshot": "false"},
        "op": "u", "ts_ms": 1793874000150}"#;
    for member in [false, true] {
        assert_eq!(
            rows(debezium(member).read(Some(moved)).expect("reads")),
            vec![
                (
                    "gold".into(),
                    Change::Entered,
                    "u1".into(),
                    1793874000000,
                    None
                ),
                (
                    "silver".into(),
                    Change::Exited,
                    "u1".into(),
                    1793874000000,
                    None
                ),
            ]
        );
    }
    // The same row, its segment unchanged: one change, as before.
    let same = String::from_utf8_lossy(moved).replace("silver", "gold");
    assert_eq!(
        rows(debezium(true).read(Some(same.as_bytes())).expect("reads")).len(),
        1
    );
    // A row that was not a member before only enters the new pair.
    let was_out =
        String::from_utf8_lossy(moved).replacen(r#""is_member": 1"#, r#""is_member": 0"#, 1);
    assert_eq!(
        rows(
            debezium(true)
                .read(Some(was_out.as_bytes()))
                .expect("reads")
        )
        .len(),
        1
    );
}

#[test]
fn debezium_sql_server_and_mysql_source_blocks_have_no_sequence() {
    let sqlserver =
        br#"{"before": null, "after": {"user_id": "u2", "segment_id": "vip", "is_member": true},
        "source": {"version": "2.7.3.Final", "connector": "sqlserver", "name": "cdp",
                   "ts_ms": 1793874000000, "snapshot": "false", "db": "cdp", "schema": "dbo",
                   "table": "segment_members", "change_lsn": "00000027:00000758:0005",
                   "commit_lsn": "00000027:00000758:0007", "event_serial_no": 1},
        "op": "c", "ts_ms": 1793874000100}"#;
    assert_eq!(
        rows(debezium(true).read(Some(sqlserver)).expect("reads")),
        vec![(
            "vip".into(),
            Change::Entered,
            "u2".into(),
            1793874000000,
            None
        )]
    );
}

#[test]
fn debezium_flattened_deletes_with_string_and_boolean_deleted_and_micro_source_times() {
    let string_deleted =
        br#"{"user_id": "u3", "segment_id": "vip", "__op": "d", "__deleted": "true",
        "__lsn": 24024000, "__source_ts_ms": 1793874100000}"#;
    assert_eq!(
        rows(debezium(false).read(Some(string_deleted)).expect("reads")),
        vec![(
            "vip".into(),
            Change::Exited,
            "u3".into(),
            1793874100000,
            Some(24024000)
        )]
    );
    // `__deleted` alone, a boolean (older SMT versions), no __op.
    let bool_deleted = br#"{"user_id": "u3", "segment_id": "vip", "__deleted": true, "__source_ts_ms": 1793874100000}"#;
    assert_eq!(
        rows(debezium(true).read(Some(bool_deleted)).expect("reads"))[0].1,
        Change::Exited
    );
    let inserted = br#"{"user_id": "u3", "segment_id": "vip", "is_member": false, "__op": "c", "__deleted": "false", "__source_ts_ms": 1793874100000}"#;
    assert_eq!(
        rows(debezium(true).read(Some(inserted)).expect("reads"))[0].1,
        Change::Entered,
        "an insert enters whatever the member column says"
    );
    // add.fields=source.ts_us (or ts_ns): the commit time in micro- (nano)seconds.
    let micros = br#"{"user_id": "u3", "segment_id": "vip", "__op": "c", "__source_ts_us": 1793874100000123}"#;
    assert_eq!(
        rows(debezium(false).read(Some(micros)).expect("reads"))[0].3,
        1793874100000
    );
    let nanos = br#"{"user_id": "u3", "segment_id": "vip", "__op": "c", "__source_ts_ns": 1793874100000123456}"#;
    assert_eq!(
        rows(debezium(false).read(Some(nanos)).expect("reads"))[0].3,
        1793874100000
    );
    let wrapped_tombstone = br#"{"schema": null, "payload": null}"#;
    assert!(matches!(
        debezium(false).read(Some(wrapped_tombstone)),
        Ok(Read::Ignored(Ignored::Tombstone))
    ));
    assert!(matches!(
        debezium(false).read(None),
        Ok(Read::Ignored(Ignored::Tombstone))
    ));
}

#[test]
fn debezium_moved_row_of_a_user_known_by_email_only_exits_the_old_pair() {
    let mut src = source(Shape::Debezium, |c| {
        c.user_column = Some("user_id".into());
        c.segment_column = Some("segment_id".into());
        c.email_column = Some("email".into());
    });
    let moved = br#"{"before": {"id": 8, "user_id": null, "email": "e@example.com", "segment_id": "silver"},
        "after": {"id": 8, "user_id": null, "email": "e@example.com", "segment_id": "gold"},
        "source": {"connector": "postgresql", "ts_ms": 1793874000000, "lsn": 300}, "op": "u"}"#;
    let got: Vec<(String, Change, Option<String>)> = changes(src.read(Some(moved)).expect("reads"))
        .into_iter()
        .map(|c| (c.0, c.1, c.3))
        .collect();
    assert_eq!(
        got,
        vec![
            ("gold".into(), Change::Entered, s("e@example.com")),
            ("silver".into(), Change::Exited, s("e@example.com")),
        ]
    );
}

#[test]
fn lytics_event_without_its_kind_is_told_by_the_later_of_enter_and_exit() {
    let record = br#"{"data": {"user_id": "u9", "segment_events": [
        {"slug": "back", "enter": "2026-03-01T00:00:00Z", "exit": "2026-02-01T00:00:00Z"},
        {"slug": "gone", "enter": "2026-01-01T00:00:00Z", "exit": "2026-02-01T00:00:00Z"}
      ]}}"#;
    let got: Vec<(String, Change, i64)> = changes(lytics().read(Some(record)).expect("reads"))
        .into_iter()
        .map(|c| (c.0, c.1, c.4))
        .collect();
    assert_eq!(
        got,
        vec![
            ("back".into(), Change::Entered, ms("2026-03-01T00:00:00Z")),
            ("gone".into(), Change::Exited, ms("2026-02-01T00:00:00Z")),
        ]
    );
}
