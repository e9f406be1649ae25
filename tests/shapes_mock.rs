//! The CDP shapes end to end inside the test process (librdkafka's mock cluster as Kafka,
//! the simulator as Braze): records in each vendor's documented form reach Braze as the
//! last change of each (user, segment) says; redeliveries are dropped; what the CDP writes
//! beside audience changes is ignored and counted; a broken record is dead-lettered with
//! its field named; a record with several changes is dead-lettered once when Braze refuses
//! them; `verify` reads the log through the shape and finds no drift.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;

use segment_sync::config::{Config, Shape};
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::tools::shapes::{source_config, Samples, ShapedRecord};
use segment_sync::tools::sim::Faults;
use segment_sync::verify::{self, VerifyMetrics, VerifyOptions};

use support::expected::{boolean_profiles, diff, strip_identifiers, Landed};
use support::mock::{mock_env, MockEnv};
use support::worker::{
    committed, dlq_origin, end_offsets, header, read_all, run_until_caught_up, test_config,
};

const PARTITIONS: i32 = 2;

fn setup(env: &MockEnv, topic: &str, shape: Shape) -> Config {
    env.cluster.create_topic(topic, PARTITIONS, 1).unwrap();
    env.cluster
        .create_topic(&format!("{topic}.dlq"), 1, 1)
        .unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.mapping.attribute_prefix = "cdp_".into();
    cfg.source = source_config(shape);
    cfg
}

/// Produces the records in order, keyed, and returns one `Landed` per change they hold.
fn produce(env: &MockEnv, cfg: &Config, records: &[ShapedRecord]) -> Vec<Landed> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let topic = &cfg.kafka.topics[0];
    support::expected::produce_shaped(&env.rt, &producer, topic, records)
}

fn raw(value: &str) -> ShapedRecord {
    ShapedRecord {
        key: b"odd".to_vec(),
        value: Some(value.as_bytes().to_vec()),
        changes: Vec::new(),
    }
}

/// A record the CDP writes beside its audience changes, and one of the shape that cannot
/// be read, with the field its reason must name.
fn other_and_broken(shape: Shape) -> (ShapedRecord, ShapedRecord, &'static str) {
    match shape {
        Shape::AdobeRtcdp => (
            raw(
                r#"{"identityMap":{"crmId":[{"id":"user-77777"}]},"person":{"name":{"firstName":"A"}}}"#,
            ),
            raw(
                r#"{"identityMap":{"crmId":[{"id":"user-77777"}]},"segmentMembership":{"ups":{"a1":{"status":"pending","lastQualificationTime":"2026-01-01T00:00:00Z"}}}}"#,
            ),
            "segmentMembership.ups.a1.status",
        ),
        Shape::Segment => (
            raw(
                r#"{"type":"track","event":"Order Completed","userId":"user-77777","messageId":"o1","timestamp":"2026-01-01T00:00:00Z"}"#,
            ),
            raw(
                r#"{"type":"track","event":"Audience Entered","userId":"user-77777","messageId":"b1","timestamp":"2026-01-01T00:00:00Z","context":{"personas":{"computation_class":"audience"}},"properties":{}}"#,
            ),
            "properties.audience_key",
        ),
        Shape::Lytics => (
            raw(
                r#"{"data":{"user_id":"user-77777","email":"x@example.com"},"meta":{"object":"user"}}"#,
            ),
            raw(
                r#"{"data":{"user_id":"user-77777","segment_events":[{"event":"enter","enter":"2026-01-01T00:00:00Z"}]}}"#,
            ),
            "data.segment_events[0].slug",
        ),
        Shape::Debezium => (
            raw(
                r#"{"op":"t","before":null,"after":null,"source":{"connector":"postgresql","ts_ms":1,"lsn":1}}"#,
            ),
            raw(
                r#"{"op":"c","before":null,"after":{"user_id":"user-77777","is_member":true},"source":{"connector":"postgresql","ts_ms":1,"lsn":1}}"#,
            ),
            "segment_id",
        ),
        Shape::Change => unreachable!("the change shape has its own tests"),
    }
}

fn metric(metrics: &Metrics, line: &str) -> u64 {
    let text = metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{line}` in\n{text}"))
}

fn verify_finds_no_drift(env: &MockEnv, cfg: &Config) {
    let metrics = Arc::new(Metrics::new());
    let vm = Arc::new(VerifyMetrics::new(&metrics.registry).unwrap());
    let opts = VerifyOptions {
        settle_timeout: Duration::from_secs(60),
        ..VerifyOptions::new(Arc::new(AtomicBool::new(false)))
    };
    let mut out = Vec::new();
    let s = verify::run(
        cfg,
        &opts,
        &mut out,
        &metrics,
        &vm,
        &Arc::new(Health::new()),
        env.rt.handle(),
    )
    .expect("verify runs");
    assert_eq!(
        (s.drifted, s.missing, s.unsettled),
        (0, 0, 0),
        "{s}\n{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(s.exit_code(), 0, "{s}");
    assert!(s.users_checked > 0, "{s}");
}

fn round_trip(shape: Shape, topic: &str) {
    let env = mock_env(Faults::default(), 0);
    let cfg = setup(&env, topic, shape);
    let mut records: Vec<ShapedRecord> = Samples::new(shape, 60, 5, 11).take(700).collect();
    let (other, broken, field) = other_and_broken(shape);
    records.insert(100, other);
    records.insert(200, broken);
    let landed = produce(&env, &cfg, &records);
    let (summary, metrics, _) = run_until_caught_up(&cfg, &env.rt);

    let want = boolean_profiles(&landed, "cdp_");
    let got = strip_identifiers(env.sim.state.profiles());
    let d = diff(&want, &got);
    assert!(
        d.is_empty(),
        "{shape:?}: profiles differ:\n{}",
        d.join("\n")
    );
    assert!(
        summary.duplicates > 0,
        "redeliveries were dropped: {summary}"
    );
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, PARTITIONS),
        end_offsets(&cfg.kafka.brokers, topic, PARTITIONS),
        "{shape:?}: committed to the end"
    );
    assert!(
        metric(
            &metrics,
            "segment_sync_events_ignored_total{reason=\"other_kind\"}"
        ) >= 1
    );
    if shape == Shape::Debezium {
        let deletes = records.iter().filter(|r| r.value.is_none()).count() as u64;
        assert!(deletes > 0);
        assert_eq!(
            metric(
                &metrics,
                "segment_sync_events_ignored_total{reason=\"tombstone\"}"
            ),
            deletes
        );
    }
    let dlq = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    assert_eq!(
        dlq.len(),
        1,
        "{shape:?}: only the broken record is dead-lettered"
    );
    let message = header(&dlq[0], "__connect.errors.exception.message").unwrap();
    assert!(message.contains(field), "{shape:?}: {message}");
    verify_finds_no_drift(&env, &cfg);
}

#[test]
fn adobe_rtcdp_profiles_reach_braze_as_their_last_change_says() {
    round_trip(Shape::AdobeRtcdp, "shape-adobe");
}

#[test]
fn segment_audience_calls_reach_braze_as_their_last_change_says() {
    round_trip(Shape::Segment, "shape-segment");
}

#[test]
fn lytics_exports_reach_braze_as_their_last_change_says() {
    round_trip(Shape::Lytics, "shape-lytics");
}

#[test]
fn debezium_rows_reach_braze_as_their_last_change_says() {
    round_trip(Shape::Debezium, "shape-debezium");
}

#[test]
fn a_record_with_several_changes_braze_refuses_is_dead_lettered_once_with_every_reason() {
    let env = mock_env(
        Faults {
            reject_prefix: Some("user-00003".into()),
            ..Faults::default()
        },
        0,
    );
    let topic = "shape-refused";
    let cfg = setup(&env, topic, Shape::Lytics);
    let records: Vec<ShapedRecord> = Samples::new(Shape::Lytics, 40, 5, 3).take(400).collect();
    let landed = produce(&env, &cfg, &records);
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, PARTITIONS),
        end_offsets(&cfg.kafka.brokers, topic, PARTITIONS),
        "committed to the end: every record settled, the refused ones once dead-lettered"
    );
    let dlq = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    let mut origins: Vec<(i32, i64)> = dlq.iter().map(dlq_origin).collect();
    let n = origins.len();
    origins.sort();
    origins.dedup();
    assert_eq!(
        origins.len(),
        n,
        "each record is dead-lettered at most once"
    );
    assert!(n > 0, "{summary}");
    let mut several = 0;
    for m in &dlq {
        let (partition, offset) = dlq_origin(m);
        let changes = landed
            .iter()
            .filter(|l| l.partition == partition && l.offset == offset)
            .count();
        let user = &landed
            .iter()
            .find(|l| l.partition == partition && l.offset == offset)
            .expect("a produced record")
            .event
            .as_ref()
            .unwrap()
            .external_id;
        assert!(
            user.as_deref().is_some_and(|u| u.starts_with("user-00003")),
            "only refused users' records: {user:?}"
        );
        match header(m, "segment_sync.rejections") {
            Some(lines) => {
                several += 1;
                assert_eq!(lines.lines().count(), changes, "{lines}");
                assert!(lines.lines().all(|l| l.contains("rejected")), "{lines}");
            }
            None => assert_eq!(changes, 1, "a record with one change has no such header"),
        }
    }
    assert!(several > 0, "some refused records held several changes");
    // Everyone else is as the log says.
    let others: Vec<Landed> = landed
        .into_iter()
        .filter(|l| {
            !l.event
                .as_ref()
                .and_then(|e| e.external_id.as_deref())
                .is_some_and(|u| u.starts_with("user-00003"))
        })
        .collect();
    let want = boolean_profiles(&others, "cdp_");
    let got = strip_identifiers(env.sim.state.profiles());
    let d = diff(&want, &got);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

/// `replay` folds a Lytics log read through its shape (records of several changes among
/// it): Braze ends as the log's last changes say and the replay's group commits the end.
#[test]
fn a_backfill_folds_a_lytics_log_through_its_shape() {
    let env = mock_env(Faults::default(), 0);
    let topic = "shape-fold";
    let cfg = setup(&env, topic, Shape::Lytics);
    let records: Vec<ShapedRecord> = Samples::new(Shape::Lytics, 80, 5, 21).take(900).collect();
    let landed = produce(&env, &cfg, &records);
    let group = format!("{}.replay", cfg.kafka.group_id);
    let replay = support::running::start(
        &env.rt,
        &cfg,
        Some(&group),
        segment_sync::pipeline::StartAt::Earliest,
        segment_sync::pipeline::Until::CaughtUp,
    );
    let summary = replay.thread.join().expect("the replay exits by itself");
    assert!(summary.caught_up, "{summary}");
    let want = boolean_profiles(&landed, "cdp_");
    let got = strip_identifiers(env.sim.state.profiles());
    let d = diff(&want, &got);
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_eq!(
        committed(&cfg.kafka.brokers, &group, topic, PARTITIONS),
        end_offsets(&cfg.kafka.brokers, topic, PARTITIONS),
        "the replay committed the end"
    );
}

/// Debezium's Avro converter through the schema registry (`kafka.format = "avro-confluent"`):
/// updates that follow the member column, deletes, their tombstones; Braze ends as the
/// log's last change of each (user, segment) says.
#[test]
fn debezium_avro_rows_reach_braze_through_the_registry() {
    use apache_avro::types::Value as A;
    use segment_sync::event::{Change, Event};
    const SCHEMA: &str = r#"{"type":"record","name":"Envelope","namespace":"cdp.public.segment_members",
     "fields":[
      {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
         {"name":"user_id","type":"string"},{"name":"segment_id","type":"string"},
         {"name":"email","type":["null","string"],"default":null},{"name":"is_member","type":"boolean"}]}],"default":null},
      {"name":"after","type":["null","Value"],"default":null},
      {"name":"source","type":{"type":"record","name":"Source","namespace":"io.debezium.connector.postgresql","fields":[
         {"name":"connector","type":"string"},{"name":"ts_ms","type":"long"},
         {"name":"lsn","type":["null","long"],"default":null}]}},
      {"name":"op","type":"string"},
      {"name":"ts_ms","type":["null","long"],"default":null}]}"#;
    let env = mock_env(Faults::default(), 0);
    let registry = support::registry::Registry::start();
    let id = registry.register(SCHEMA);
    let schema = apache_avro::Schema::parse_str(SCHEMA).expect("schema");
    let topic = "shape-debezium-avro";
    let mut cfg = setup(&env, topic, Shape::Debezium);
    cfg.kafka.format = segment_sync::config::Format::AvroConfluent;
    cfg.kafka.schema_registry_url = registry.url.clone();

    let mut member = std::collections::HashMap::new();
    let mut records = Vec::new();
    for i in 0..600i64 {
        let user = format!("user-{:03}", (i * 7) % 50);
        let segment = format!("seg_{}", (i * 3) % 4);
        let now = !member
            .get(&(user.clone(), segment.clone()))
            .copied()
            .unwrap_or(false);
        member.insert((user.clone(), segment.clone()), now);
        let at = 1_793_873_000_000 + i * 10;
        let row = |m: bool| {
            A::Union(
                1,
                Box::new(A::Record(vec![
                    ("user_id".into(), A::String(user.clone())),
                    ("segment_id".into(), A::String(segment.clone())),
                    ("email".into(), A::Union(0, Box::new(A::Null))),
                    ("is_member".into(), A::Boolean(m)),
                ])),
            )
        };
        let none = A::Union(0, Box::new(A::Null));
        // Exits are deletes half the time, updates to is_member = false the other half.
        let (op, before, after) = match (now, i % 2) {
            (true, _) => ("u", none.clone(), row(true)),
            (false, 0) => ("d", row(true), none.clone()),
            (false, _) => ("u", none.clone(), row(false)),
        };
        let value = A::Record(vec![
            ("before".into(), before),
            ("after".into(), after),
            (
                "source".into(),
                A::Record(vec![
                    ("connector".into(), A::String("postgresql".into())),
                    ("ts_ms".into(), A::Long(at)),
                    ("lsn".into(), A::Union(1, Box::new(A::Long(1000 + i)))),
                ]),
            ),
            ("op".into(), A::String(op.into())),
            ("ts_ms".into(), A::Union(1, Box::new(A::Long(at + 3)))),
        ]);
        let mut payload = vec![0];
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend(apache_avro::to_avro_datum(&schema, value).expect("encodes"));
        records.push(ShapedRecord {
            key: user.clone().into_bytes(),
            value: Some(payload),
            changes: vec![Event {
                event_id: "x".into(),
                external_id: Some(user.clone().into()),
                email: None,
                segment_id: segment.clone().into(),
                segment_name: None,
                change: if now { Change::Entered } else { Change::Exited },
                occurred_at: at,
                sequence: Some(1000 + i),
                attributes: Vec::new(),
            }],
        });
        if op == "d" {
            records.push(ShapedRecord {
                key: user.clone().into_bytes(),
                value: None,
                changes: Vec::new(),
            });
        }
    }
    let landed = produce(&env, &cfg, &records);
    let (summary, metrics, _) = run_until_caught_up(&cfg, &env.rt);
    let want = boolean_profiles(&landed, "cdp_");
    let got = strip_identifiers(env.sim.state.profiles());
    let d = diff(&want, &got);
    assert!(d.is_empty(), "{summary}\n{}", d.join("\n"));
    assert!(
        metric(
            &metrics,
            "segment_sync_events_ignored_total{reason=\"tombstone\"}"
        ) > 0
    );
    assert_eq!(summary.dlq_records, 0, "{summary}");
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, PARTITIONS),
        end_offsets(&cfg.kafka.brokers, topic, PARTITIONS)
    );
}

/// A worker started on a group committed to the end of a Lytics log (records of several
/// changes each) restores it: `segment_sync_restore_records_total` counts the records read
/// back, not the changes they hold.
#[test]
fn a_restore_counts_the_records_it_reads_not_the_changes_they_hold() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let env = mock_env(Faults::default(), 0);
    let topic = "shape-restore-count";
    let cfg = setup(&env, topic, Shape::Lytics);
    let records: Vec<ShapedRecord> = Samples::new(Shape::Lytics, 80, 5, 31).take(600).collect();
    let changes: usize = records.iter().map(|r| r.changes.len()).sum();
    assert!(
        changes > records.len(),
        "setup: records of several changes ({changes} changes in {} records)",
        records.len()
    );
    produce(&env, &cfg, &records);
    let ends = end_offsets(&cfg.kafka.brokers, topic, PARTITIONS);
    // An idempotent producer's log has no control records: every offset is a record.
    assert_eq!(ends.iter().sum::<i64>() as usize, records.len());
    // The group's commits at the end, as a worker that delivered everything leaves them.
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", &cfg.kafka.group_id)
        .create()
        .expect("committer");
    let mut tpl = TopicPartitionList::new();
    for (p, end) in ends.iter().enumerate() {
        tpl.add_partition_offset(topic, p as i32, Offset::Offset(*end))
            .unwrap();
    }
    committer.commit(&tpl, CommitMode::Sync).expect("commit");
    drop(committer);

    // A live worker (a run until caught up would end before its assignment: nothing is left
    // to read), stopped once both partitions are restored.
    let live = support::running::start(
        &env.rt,
        &cfg,
        None,
        segment_sync::pipeline::StartAt::Committed,
        segment_sync::pipeline::Until::Stopped,
    );
    let restores = live.metrics.clone();
    support::running::wait_until(
        "both partitions are restored",
        Duration::from_secs(60),
        || restores.restore_seconds.get_sample_count() == PARTITIONS as u64,
    );
    let metrics = live.metrics.clone();
    live.stop();
    assert_eq!(
        metric(&metrics, "segment_sync_restore_records_total"),
        records.len() as u64,
        "records restored ({changes} changes among them)"
    );
}

/// Records each vendor documents but the samples do not write, produced as they are
/// (one key a record): Braze ends with `want` for each profile, nothing is dead-lettered.
fn vendor_variants(shape: Shape, topic: &str, values: &[&str], want: &[(&str, &[(&str, bool)])]) {
    let env = mock_env(Faults::default(), 0);
    let cfg = setup(&env, topic, shape);
    let records: Vec<ShapedRecord> = values
        .iter()
        .map(|v| ShapedRecord {
            key: b"one-key".to_vec(),
            value: Some(v.as_bytes().to_vec()),
            changes: Vec::new(),
        })
        .collect();
    produce(&env, &cfg, &records);
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    assert!(summary.caught_up, "{summary}");
    let got = strip_identifiers(env.sim.state.profiles());
    for (user, attributes) in want {
        let profile = got
            .get(*user)
            .unwrap_or_else(|| panic!("{shape:?}: no profile {user} in {got:?}"));
        for (name, value) in *attributes {
            assert_eq!(
                profile.get(*name),
                Some(&serde_json::Value::Bool(*value)),
                "{shape:?}: {user}.{name} in {profile:?}"
            );
        }
    }
    let dlq = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    assert!(dlq.is_empty(), "{shape:?}: nothing is dead-lettered");
}

#[test]
fn adobe_audiences_of_every_membership_namespace_reach_braze() {
    vendor_variants(
        Shape::AdobeRtcdp,
        "variant-adobe",
        &[
            r#"{"identityMap":{"crmId":[{"id":"crm-9","primary":true,"authenticatedState":"authenticated"}],
               "ecid":[{"id":"1457500653634928640"}]},"personalEmail":{"address":"crm9@example.com"},
               "segmentMembership":{"ups":{"u1":{"status":"realized","lastQualificationTime":"2026-11-04T10:15:31.123Z"}},
               "CustomerAudienceUpload":{"c1":{"status":"existing","lastQualificationTime":"2026-11-04T11:15:31+01:00"}}}}"#,
            r#"{"identityMap":{"crmId":[{"id":"crm-9"}]},
               "segmentMembership":{"CustomerAudienceUpload":{"c1":{"status":"exited","lastQualificationTime":"2026-11-04T10:20:00.5Z"}}}}"#,
        ],
        &[("external_id:crm-9", &[("cdp_u1", true), ("cdp_c1", false)])],
    );
}

#[test]
fn segment_identify_with_traits_in_context_only_reaches_braze() {
    vendor_variants(
        Shape::Segment,
        "variant-segment",
        &[
            r#"{"type":"identify","userId":"u-1","messageId":"m1","timestamp":"2026-11-04T10:15:31Z",
               "context":{"personas":{"computation_class":"audience","computation_key":"vip"},"traits":{"email":"u1@example.com","vip":true}}}"#,
            r#"{"type":"track","event":"Audience Exited","userId":null,"anonymousId":"a-2","messageId":"m2",
               "originalTimestamp":"2026-11-04T10:15:32Z","context":{"personas":{"computation_class":"audience","computation_key":"vip"},"traits":{"email":"anon@example.com"}},
               "properties":{"audience_key":"vip","vip":false}}"#,
        ],
        &[
            ("external_id:u-1", &[("cdp_vip", true)]),
            ("email:anon@example.com", &[("cdp_vip", false)]),
        ],
    );
}

#[test]
fn debezium_update_moving_a_row_to_another_segment_reaches_braze_as_both_changes() {
    let source = |lsn: u64, ts: u64| {
        format!(
            r#"{{"connector":"postgresql","ts_ms":{ts},"ts_us":{ts}000,"lsn":{lsn},"txId":7,"snapshot":"false"}}"#
        )
    };
    let insert = format!(
        r#"{{"before":null,"after":{{"id":7,"user_id":"u-7","segment_id":"silver","is_member":true}},"source":{},"op":"r","ts_ms":1793873731500}}"#,
        source(100, 1793873731000)
    );
    let moved = format!(
        r#"{{"schema":{{"type":"struct"}},"payload":{{"before":{{"id":7,"user_id":"u-7","segment_id":"silver","is_member":true}},
           "after":{{"id":7,"user_id":"u-7","segment_id":"gold","is_member":true}},"source":{},"op":"u","ts_ms":1793873732500}}}}"#,
        source(200, 1793873732000)
    );
    vendor_variants(
        Shape::Debezium,
        "variant-debezium",
        &[&insert, &moved],
        &[(
            "external_id:u-7",
            &[("cdp_silver", false), ("cdp_gold", true)],
        )],
    );
}
