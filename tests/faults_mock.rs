//! Faults at the edges of the guarantees, in process on librdkafka's mock cluster with the
//! Braze simulator: a registry outage longer than the poll interval, a re-read of a rejected
//! record through a broker blip, a dead-letter record Kafka will not take, a request
//! stopped when its partition moves.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use segment_sync::config::{Config, Format};
use segment_sync::decode::SCHEMA;
use segment_sync::dlq;
use segment_sync::pipeline::{StartAt, Until};
use segment_sync::tools::generate::{Generated, Record};
use segment_sync::tools::sim::{self, Faults, SimConfig};

use support::expected::{boolean_profiles, diff, strip_identifiers, Landed};
use support::mock::{mock_env, MockEnv};
use support::registry::Registry;
use support::running::{start, wait_until, Running};
use support::worker::{
    clean_records, committed, end_offsets, header, produce, produce_with, read_all, test_config,
    API_KEY,
};

fn worker(env: &MockEnv, cfg: &Config) -> Running {
    start(&env.rt, cfg, None, StartAt::Committed, Until::Stopped)
}

fn all_committed(cfg: &Config, partitions: i32) -> bool {
    let topic = &cfg.kafka.topics[0];
    committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, partitions)
        == end_offsets(&cfg.kafka.brokers, topic, partitions)
}

type Profiles = std::collections::BTreeMap<String, serde_json::Map<String, serde_json::Value>>;

fn profile_diff(profiles: Profiles, landed: &[Landed]) -> Vec<String> {
    diff(&boolean_profiles(landed, ""), &strip_identifiers(profiles))
}

/// A registry outage longer than `max.poll.interval.ms`: the worker holds the records that
/// wait (it never sleeps on the consuming thread), stays in its group, says why it is not
/// ready, dead-letters nothing, and delivers everything once the registry answers.
#[test]
fn a_registry_outage_longer_than_the_poll_interval_holds_records_and_keeps_the_group() {
    let env = mock_env(Faults::default(), 0);
    let topic = "registry-outage";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster
        .create_topic("registry-outage.dlq", 1, 1)
        .unwrap();
    let registry = Registry::start();
    assert_eq!(
        registry.register(SCHEMA),
        1,
        "payloads are written with id 1"
    );
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.kafka.format = Format::AvroConfluent;
    cfg.kafka.schema_registry_url = registry.url.clone();
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("max.poll.interval.ms", "6000"),
    ] {
        cfg.kafka.properties.insert(k.into(), v.into());
    }
    registry.set_down(true);
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(600, 71, 200),
    );
    let w = worker(&env, &cfg);
    wait_until(
        "readiness names the registry",
        Duration::from_secs(30),
        || {
            w.health
                .readiness()
                .is_err_and(|why| why.contains("schema registry"))
        },
    );
    // Longer than max.poll.interval.ms: a member that stopped polling would be out of the
    // group by now, and its partitions revoked.
    std::thread::sleep(Duration::from_secs(9));
    let why = w.health.readiness().unwrap_err();
    assert!(why.contains("schema registry"), "{why}");
    assert!(
        w.health.assigned.load(std::sync::atomic::Ordering::Relaxed),
        "the member kept its partitions"
    );
    assert_eq!(env.sim.state.stats().objects_applied, 0);
    registry.set_down(false);
    wait_until(
        "everything is delivered and committed",
        Duration::from_secs(60),
        || all_committed(&cfg, 2),
    );
    assert!(w.health.readiness().is_ok(), "ready again");
    let summary = w.stop();
    assert_eq!(summary.dlq_records, 0, "an outage dead-letters nothing");
    assert_eq!(summary.undecodable, 0);
    let d = profile_diff(env.sim.state.profiles(), &landed);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

/// A record whose schema the registry cannot give arrives in the middle of a poll's burst,
/// behind records of a schema the worker holds: the burst is decoded ahead of the window
/// taking it, so this checks that the records before the waiting one are delivered, that it
/// and every record behind it wait (none delivered ahead of it), and that all of them are
/// delivered once the registry answers, none dead-lettered.
#[test]
fn a_record_that_must_wait_mid_burst_holds_every_record_behind_it() {
    let env = mock_env(Faults::default(), 0);
    let topic = "registry-mid-burst";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster
        .create_topic("registry-mid-burst.dlq", 1, 1)
        .unwrap();
    let registry = Registry::start();
    assert_eq!(registry.register(SCHEMA), 1);
    // The same record schema under another id, as a second registered version would be.
    let second = registry.register(&SCHEMA.replacen('{', "{\"doc\": \"v2\", ", 1));
    assert_ne!(second, 1);
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.kafka.format = Format::AvroConfluent;
    cfg.kafka.schema_registry_url = registry.url.clone();
    let records = clean_records(202, 73, 150);
    // The first record brings schema 1 into the worker's cache while the registry is up.
    let mut landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records[..1],
    );
    let w = worker(&env, &cfg);
    wait_until(
        "the first record is committed",
        Duration::from_secs(30),
        || all_committed(&cfg, 1),
    );
    registry.set_down(true);
    // 100 records of schema 1, one of schema 2, 100 of schema 1: polled in bursts of 64,
    // the waiting record is the 37th of the second burst.
    const WAITING: usize = 101;
    landed.extend(produce_with(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        &records[1..],
        &|g: &Generated| {
            let Record::Valid(e) = &g.record else {
                unreachable!("clean records are valid")
            };
            let id = if std::ptr::eq(g, &records[WAITING]) {
                second
            } else {
                1
            };
            (
                segment_sync::tools::encode::to_confluent(id, e),
                Some(e.clone()),
            )
        },
    ));
    let before = boolean_profiles(&landed[..WAITING], "");
    wait_until(
        "the records before the waiting one are delivered",
        Duration::from_secs(30),
        || diff(&before, &strip_identifiers(env.sim.state.profiles())).is_empty(),
    );
    let why = w.health.readiness().unwrap_err();
    assert!(why.contains("schema registry"), "{why}");
    // Longer than the linger and the commit interval: nothing behind the waiting record
    // may reach Braze meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    let d = diff(&before, &strip_identifiers(env.sim.state.profiles()));
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_eq!(
        env.sim.state.profiles().len(),
        before.len(),
        "no user of a record behind the waiting one reached Braze"
    );
    registry.set_down(false);
    wait_until(
        "everything is delivered and committed",
        Duration::from_secs(60),
        || all_committed(&cfg, 1),
    );
    let summary = w.stop();
    assert_eq!(summary.dlq_records, 0, "waiting dead-letters nothing");
    let d = profile_diff(env.sim.state.profiles(), &landed);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

/// Braze rejects some users while the broker answers fetches with errors for longer than one
/// re-read attempt (10 s): the re-read is tried again until it has the record, so the
/// dead-letter copy carries the original value, and only then is the offset committed.
#[test]
fn a_rejected_record_is_read_back_through_a_broker_blip_with_its_value() {
    let env = mock_env(
        Faults {
            reject_prefix: Some("user-0001".into()),
            latency_ms: 1500,
            ..Faults::default()
        },
        0,
    );
    let topic = "reread-blip";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster.create_topic("reread-blip.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let recs = clean_records(400, 81, 200);
    let landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &recs);
    let w = worker(&env, &cfg);
    wait_until("every record is read", Duration::from_secs(30), || {
        w.metrics.events_consumed.get() == 400
    });
    // Braze answers after 1.5 s; by then every fetch fails for a good while.
    env.cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 60],
    );
    wait_until(
        "everything is settled and committed",
        Duration::from_secs(120),
        || all_committed(&cfg, 1),
    );
    let summary = w.stop();
    let rejected: BTreeSet<(i32, i64)> = landed
        .iter()
        .filter(|l| {
            l.event
                .as_ref()
                .and_then(|e| e.external_id.as_deref())
                .is_some_and(|id| id.starts_with("user-0001"))
        })
        .map(|l| (l.partition, l.offset))
        .collect();
    assert!(!rejected.is_empty(), "the test rejects some users");
    let dead = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    let values: BTreeSet<(i32, i64)> = dead
        .iter()
        .filter(|m| m.payload().is_some() && header(m, dlq::HEADER_VALUE_OMITTED).is_none())
        .map(support::worker::dlq_origin)
        .collect();
    assert_eq!(
        values, rejected,
        "every rejected record dead-lettered with its value"
    );
    assert_eq!(summary.dlq_records as usize, rejected.len());
}

/// An undecodable record whose dead-letter copy is over the producer's `message.max.bytes`:
/// written without its value, with its coordinates and a header saying why; the worker goes
/// on and commits everything.
#[test]
fn a_dead_letter_record_kafka_cannot_take_goes_without_its_value() {
    let env = mock_env(Faults::default(), 0);
    let topic = "oversized";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster.create_topic("oversized.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let mut recs = clean_records(300, 91, 100);
    recs.insert(
        150,
        Generated {
            key: b"user-big".to_vec(),
            record: Record::Undecodable(vec![b'x'; 999_800]),
        },
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    // The big one on its own, so the helper's producer (default limits) sends the rest.
    let landed_before = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &recs[..150],
    );
    let big = env
        .rt
        .block_on(
            producer.send(
                FutureRecord::to(topic)
                    .key("user-big")
                    .payload(&vec![b'x'; 999_800]),
                Duration::from_secs(30),
            ),
        )
        .expect("the topic takes the big record");
    let landed_after = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &recs[151..],
    );
    let w = worker(&env, &cfg);
    wait_until("everything is committed", Duration::from_secs(60), || {
        all_committed(&cfg, 1)
    });
    let summary = w.stop();
    let dead = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    assert_eq!(dead.len(), 1, "one dead-letter record");
    let d = &dead[0];
    assert_eq!(support::worker::dlq_origin(d), (0, big.offset));
    assert!(d.payload().is_none(), "written without its value");
    let why = header(d, dlq::HEADER_VALUE_OMITTED).expect("a header says why");
    assert!(why.contains("message.max.bytes"), "{why}");
    assert!(header(d, dlq::HEADER_EXCEPTION_MESSAGE).is_some());
    assert_eq!(summary.dlq_records, 1);
    let landed: Vec<Landed> = landed_before.into_iter().chain(landed_after).collect();
    let d = profile_diff(env.sim.state.profiles(), &landed);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

/// Requests waiting on a 429 whose reset is past the drain deadline when their partition
/// moves to another worker are stopped: the first worker's Braze never sees the moved
/// partition's users (their new owner writes them), and the users of the partition it kept
/// are sent again and delivered.
#[test]
fn a_request_waiting_on_a_long_429_is_stopped_when_its_partition_moves() {
    let env = mock_env(
        Faults {
            fail_next_429: 1_000_000,
            reset_after_s: 6,
            ..Faults::default()
        },
        0,
    );
    let other_braze = env
        .rt
        .block_on(sim::start(
            SimConfig {
                api_key: API_KEY.into(),
                rate_limit: 0,
                rate_window_secs: 1,
                faults: Faults::default(),
            },
            "127.0.0.1:0".parse().expect("an address"),
        ))
        .expect("second simulator");
    let topic = "moved-429";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("moved-429.dlq", 1, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.window.drain_timeout_ms = 1_500;
    // The mock coordinator waits out a session timeout before it rebalances.
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
    ] {
        cfg.kafka.properties.insert(k.into(), v.into());
    }
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(400, 101, 100),
    );
    let a = worker(&env, &cfg);
    wait_until(
        "A has requests waiting on the 429",
        Duration::from_secs(30),
        || a.metrics.events_consumed.get() == 400 && a.metrics.braze_in_flight.get() > 0,
    );
    let mut cfg_b = cfg.clone();
    cfg_b.braze.endpoint = other_braze.url();
    let b = worker(&env, &cfg_b);
    wait_until("B has read a partition", Duration::from_secs(90), || {
        b.metrics.events_consumed.get() > 0
    });
    // The moved partition is B's now; A's Braze may answer again.
    env.sim.state.set_faults(Faults::default());
    wait_until("everything is committed", Duration::from_secs(90), || {
        all_committed(&cfg, 2)
            && a.metrics.braze_in_flight.get() == 0
            && b.metrics.braze_in_flight.get() == 0
    });
    // Longer than the 429's reset: a request that was not stopped would have been sent.
    std::thread::sleep(Duration::from_secs(7));
    a.stop();
    let sb = b.stop();
    let moved: BTreeSet<i32> = sb.committed.iter().map(|(_, p, _)| *p).collect();
    assert_eq!(moved.len(), 1, "B took exactly one partition: {moved:?}");
    let moved = *moved.iter().next().expect("one");
    let (on_moved, on_kept): (Vec<Landed>, Vec<Landed>) =
        landed.into_iter().partition(|l| l.partition == moved);
    let d = profile_diff(env.sim.state.profiles(), &on_kept);
    assert!(
        d.is_empty(),
        "A delivered its kept partition:\n{}",
        d.join("\n")
    );
    let d = profile_diff(other_braze.state.profiles(), &on_moved);
    assert!(
        d.is_empty(),
        "B delivered the moved partition:\n{}",
        d.join("\n")
    );
}

/// One change of `seg_vip` for user `user`, with the given sequence.
fn vip(user: usize, change: segment_sync::event::Change, sequence: i64, tag: &str) -> Generated {
    let id = format!("user-{user:05}");
    Generated {
        key: id.clone().into_bytes(),
        record: Record::Valid(segment_sync::event::Event {
            event_id: format!("{tag}-{user}").into(),
            external_id: Some(id.into()),
            email: None,
            segment_id: "seg_vip".into(),
            segment_name: None,
            change,
            occurred_at: segment_sync::tools::generate::BASE_TIME_MS + user as i64,
            sequence: Some(sequence),
            attributes: Vec::new(),
        }),
    }
}

/// SIGTERM (the stop flag) while partitions are still restoring (issue 19). The restore
/// cannot finish while the schema registry is down (it is tried again and again), so the
/// stop deterministically lands in it: the worker exits within seconds, commits nothing past
/// what was delivered before it, and writes nothing. Started again with the registry back,
/// it restores, and the older changes that arrived meanwhile are stale for every user.
#[test]
fn a_stop_while_partitions_restore_exits_promptly_and_a_restart_ends_right() {
    use segment_sync::event::Change;
    let env = mock_env(Faults::default(), 0);
    let topic = "restore-stop";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("restore-stop.dlq", 1, 1).unwrap();
    let registry = Registry::start();
    assert_eq!(
        registry.register(SCHEMA),
        1,
        "payloads are written with id 1"
    );
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.kafka.format = Format::AvroConfluent;
    cfg.kafka.schema_registry_url = registry.url.clone();
    // The mock coordinator waits out a session timeout before it rebalances.
    cfg.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    let users = 300;

    // ENTERED (sequence 10) for every user, delivered and committed.
    let entered: Vec<_> = (0..users)
        .map(|u| vip(u, Change::Entered, 10, "entered"))
        .collect();
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &entered,
    );
    let w = worker(&env, &cfg);
    wait_until(
        "ENTERED is delivered and committed",
        Duration::from_secs(60),
        || all_committed(&cfg, 2),
    );
    w.stop();
    let delivered = end_offsets(&cfg.kafka.brokers, topic, 2);
    let applied = env.sim.state.stats().objects_applied;

    // Older EXITED (sequence 5) for every user, behind the commits; the registry goes down,
    // so the next start's restore cannot decode what it reads back.
    let exited: Vec<_> = (0..users)
        .map(|u| vip(u, Change::Exited, 5, "exited"))
        .collect();
    produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &exited,
    );
    registry.set_down(true);
    let w = worker(&env, &cfg);
    wait_until(
        "the partitions are assigned",
        Duration::from_secs(60),
        || w.health.assigned.load(std::sync::atomic::Ordering::Relaxed),
    );
    // Long enough for a read of 300 records and a retry or two.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        w.metrics.restore_seconds.get_sample_count(),
        0,
        "setup: the restore is still under way when the stop comes"
    );
    let stopped_at = std::time::Instant::now();
    w.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while !w.thread.is_finished() {
        assert!(
            stopped_at.elapsed() < Duration::from_secs(5),
            "the worker did not stop within 5 s of the stop flag while restoring"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let summary = w.thread.join().expect("the worker exits cleanly");
    assert_eq!(summary.dlq_records, 0, "{summary}");
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, 2),
        delivered,
        "nothing is committed past what was delivered"
    );
    assert_eq!(
        env.sim.state.stats().objects_applied,
        applied,
        "nothing is written while the partitions restore"
    );

    // Started again with the registry back: the restore finishes and every EXITED is stale.
    registry.set_down(false);
    let w = worker(&env, &cfg);
    wait_until(
        "EXITED is read and committed",
        Duration::from_secs(60),
        || all_committed(&cfg, 2),
    );
    let restored = w.metrics.restore_records.get();
    let stale = w.metrics.events_stale.get();
    w.stop();
    assert_eq!(restored, users as u64, "every ENTERED record is read back");
    assert_eq!(stale, users as u64, "every older EXITED is stale");
    let d = profile_diff(env.sim.state.profiles(), &landed);
    assert!(d.is_empty(), "every user still ENTERED:\n{}", d.join("\n"));
}
