//! The worker end to end inside the test process: librdkafka's mock cluster as Kafka, the
//! project's simulator as Braze. Each test checks Braze's final profiles against the
//! last-write-wins state computed from the produced records alone.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::message::Message;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use segment_sync::tools::generate::{Generator, GeneratorConfig, Record};
use segment_sync::tools::sim::Faults;

use support::expected::{boolean_profiles, diff, profile_key, strip_identifiers, Landed};
use support::mock::{mock_env, MockEnv};
use support::worker::{
    committed, dlq_origin, end_offsets, header, produce, read_all, run_until_caught_up, test_config,
};

type Env = MockEnv;

fn env(faults: Faults, rate_limit: u32) -> Env {
    mock_env(faults, rate_limit)
}

fn generate(events: usize, cfg: GeneratorConfig) -> Vec<segment_sync::tools::generate::Generated> {
    Generator::new(cfg).take(events).collect()
}

fn assert_profiles(env: &Env, landed: &[Landed], skip_prefix: Option<&str>) {
    let mut want = boolean_profiles(landed, "");
    if let Some(p) = skip_prefix {
        want.retain(|k, _| !k.split_once(':').is_some_and(|(_, id)| id.starts_with(p)));
    }
    let got = strip_identifiers(env.sim.state.profiles());
    let d = diff(&want, &got);
    assert!(
        d.is_empty(),
        "profiles differ from last write wins:\n{}",
        d.join("\n")
    );
}

fn assert_committed_to_end(cfg: &segment_sync::config::Config, partitions: i32) {
    let topic = &cfg.kafka.topics[0];
    assert_eq!(
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, partitions),
        end_offsets(&cfg.kafka.brokers, topic, partitions),
        "the group's committed offsets are the end offsets"
    );
}

#[test]
fn repeats_and_out_of_order_sequences_end_in_last_write_wins() {
    let env = env(Faults::default(), 0);
    let topic = "lww";
    env.cluster.create_topic(topic, 3, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let records = generate(
        4000,
        GeneratorConfig {
            users: 300,
            segments: 6,
            repeat_rate: 0.15,
            out_of_order_rate: 0.15,
            bad_rate: 0.0,
            email_only_rate: 0.2,
            seed: 1,
        },
    );
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records,
    );
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    assert_eq!(summary.consumed, 4000);
    assert!(summary.duplicates > 0, "repeats were dropped: {summary}");
    assert_profiles(&env, &landed, None);
    assert_committed_to_end(&cfg, 3);
    let stats = env.sim.state.stats();
    // Coalescing: fewer objects than events, and no more data points than changes.
    assert!(stats.objects_received < 4000, "{stats:?}");
    assert_eq!(stats.data_points, summary.data_points);
}

#[test]
fn rejected_objects_go_to_the_dead_letter_topic_before_their_offsets_are_committed() {
    let env = env(
        Faults {
            reject_prefix: Some("user-00001".into()),
            ..Faults::default()
        },
        0,
    );
    let topic = "rejects";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("rejects.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let records = generate(
        1500,
        GeneratorConfig {
            users: 200,
            segments: 4,
            repeat_rate: 0.05,
            out_of_order_rate: 0.0,
            bad_rate: 0.0,
            email_only_rate: 0.0,
            seed: 2,
        },
    );
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records,
    );
    // The dead-letter producer's first writes fail: the watermark must hold meanwhile.
    env.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
    );
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);

    // Exactly the distinct events of rejected users, each once, with its context headers.
    let mut want = BTreeSet::new();
    let mut seen_ids = BTreeSet::new();
    for l in &landed {
        let Some(e) = &l.event else { continue };
        if e.external_id
            .as_deref()
            .is_some_and(|id| id.starts_with("user-00001"))
            && seen_ids.insert(e.event_id.to_string())
        {
            want.insert((l.partition, l.offset));
        }
    }
    assert!(!want.is_empty());
    let dlq = read_all(&cfg.kafka.brokers, "rejects.dlq", 1);
    let mut got = BTreeSet::new();
    for m in &dlq {
        let (p, o) = dlq_origin(m);
        assert_eq!(header(m, "__connect.errors.topic").as_deref(), Some(topic));
        assert!(header(m, "braze.error.type").is_some_and(|t| !t.is_empty()));
        assert!(header(m, "__connect.errors.exception.message").is_some());
        assert!(header(m, "__connect.errors.stage").is_some());
        let original = landed
            .iter()
            .find(|l| l.partition == p && l.offset == o)
            .unwrap();
        let e = original.event.as_ref().unwrap();
        assert_eq!(m.key(), Some(e.external_id.as_deref().unwrap().as_bytes()));
        assert_eq!(
            m.payload(),
            Some(&segment_sync::tools::encode::to_json(e)[..])
        );
        assert!(got.insert((p, o)), "({p}, {o}) dead-lettered twice");
    }
    assert_eq!(
        got, want,
        "dead-lettered events are exactly the rejected users' events"
    );
    assert_eq!(summary.dlq_records as usize, want.len());
    assert_profiles(&env, &landed, Some("user-00001"));
    assert_committed_to_end(&cfg, 2);
}

#[test]
fn bursts_of_5xx_and_429_lose_nothing() {
    let env = env(
        Faults {
            fail_next_5xx: 6,
            fail_next_429: 4,
            fail_5xx_rate: 0.2,
            ..Faults::default()
        },
        0,
    );
    let topic = "flaky";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let records = generate(
        2000,
        GeneratorConfig {
            users: 400,
            segments: 5,
            seed: 3,
            ..GeneratorConfig::default()
        },
    );
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records,
    );
    let (_, metrics, _) = run_until_caught_up(&cfg, &env.rt);
    let stats = env.sim.state.stats();
    assert!(
        stats.responses_5xx >= 6 && stats.responses_429 >= 4,
        "{stats:?}"
    );
    assert!(metrics.braze_retries.get() >= 10);
    assert_profiles(&env, &landed, None);
    assert_committed_to_end(&cfg, 2);
}

#[test]
fn undecodable_and_invalid_records_are_dead_lettered_and_the_worker_keeps_going() {
    let env = env(Faults::default(), 0);
    let topic = "bad";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("bad.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let records = generate(
        2000,
        GeneratorConfig {
            users: 300,
            segments: 4,
            bad_rate: 0.05,
            seed: 4,
            ..GeneratorConfig::default()
        },
    );
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records,
    );
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    let bad: BTreeMap<(i32, i64), &Record> = records
        .iter()
        .zip(&landed)
        .filter(|(g, _)| !matches!(g.record, Record::Valid(_)))
        .map(|(g, l)| ((l.partition, l.offset), &g.record))
        .collect();
    assert!(bad.len() > 40, "the stream has bad records: {}", bad.len());
    let dlq = read_all(&cfg.kafka.brokers, "bad.dlq", 1);
    assert_eq!(
        dlq.len(),
        bad.len(),
        "one dead-letter record per bad record"
    );
    for m in &dlq {
        let (p, o) = dlq_origin(m);
        let stage = header(m, "__connect.errors.stage").unwrap();
        match bad
            .get(&(p, o))
            .expect("a dead-letter record of a bad record")
        {
            Record::Undecodable(bytes) => {
                assert_eq!(m.payload(), Some(&bytes[..]));
                assert_eq!(stage, "VALUE_CONVERTER");
            }
            Record::Invalid(e) => {
                assert!(profile_key(e).is_none() || e.segment_id.is_empty());
                let why = header(m, "__connect.errors.exception.message").unwrap();
                assert!(
                    why.contains("external_id nor email") || why.contains("segment_id"),
                    "{why}"
                );
            }
            Record::Valid(_) => unreachable!(),
        }
    }
    assert_eq!(summary.undecodable + summary.invalid, bad.len() as u64);
    assert_profiles(&env, &landed, None);
    assert_committed_to_end(&cfg, 2);
}

#[test]
fn values_that_would_poison_last_write_wins_are_dead_lettered() {
    use segment_sync::event::{AttrValue, Change, Event};
    use segment_sync::tools::generate::Generated;
    let env = env(Faults::default(), 0);
    let topic = "poison";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster.create_topic("poison.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let event = |id: &str, user: &str, segment: &str, change: Change, seq: i64| Event {
        event_id: id.to_string().into(),
        external_id: Some(user.to_string().into()),
        email: None,
        segment_id: segment.to_string().into(),
        segment_name: None,
        change,
        occurred_at: now - 60_000,
        sequence: Some(seq),
        attributes: vec![],
    };
    let record = |valid: bool, e: Event<'static>| Generated {
        key: e
            .external_id
            .as_deref()
            .unwrap_or_default()
            .as_bytes()
            .to_vec(),
        record: if valid {
            Record::Valid(e)
        } else {
            Record::Invalid(e)
        },
    };
    let two_days_ahead = Event {
        occurred_at: now + 2 * 86_400_000,
        sequence: None,
        ..event("e2", "u1", "a", Change::Exited, 0)
    };
    let with_email = Event {
        attributes: vec![("email".into(), AttrValue::String("x@y.z".into()))],
        ..event("e4", "u2", "b", Change::Entered, 1)
    };
    let records = vec![
        record(
            true,
            Event {
                sequence: None,
                ..event("e1", "u1", "a", Change::Entered, 0)
            },
        ),
        record(false, two_days_ahead),
        record(false, event(" ", "u1", "a", Change::Exited, 3)),
        record(false, with_email),
        record(false, event("e5", "u3", "external_id", Change::Entered, 1)),
        record(true, event("e6", "u2", "c", Change::Entered, 2)),
    ];
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records,
    );
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    assert_eq!(summary.invalid, 4, "{summary}");
    let mut reasons: Vec<(i64, String)> = read_all(&cfg.kafka.brokers, "poison.dlq", 1)
        .iter()
        .map(|m| {
            let (_, offset) = dlq_origin(m);
            (
                offset,
                header(m, "__connect.errors.exception.message").unwrap(),
            )
        })
        .collect();
    reasons.sort();
    let offsets: Vec<i64> = reasons.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, vec![1, 2, 3, 4]);
    for ((_, why), needle) in reasons.iter().zip([
        "window.max_future_ms",
        "empty event_id",
        "\"email\"",
        "\"external_id\"",
    ]) {
        assert!(why.contains(needle), "{needle}: {why}");
    }
    let profiles = strip_identifiers(env.sim.state.profiles());
    let want = boolean_profiles(&landed, "");
    assert_eq!(diff(&want, &profiles), Vec::<String>::new());
    assert_eq!(profiles["external_id:u1"]["a"], serde_json::json!(true));
    assert!(!profiles.contains_key("external_id:u3"), "{profiles:?}");
    assert_committed_to_end(&cfg, 1);
}

#[test]
fn no_request_over_75_objects_and_no_user_in_two_requests_at_once() {
    let env = env(
        Faults {
            latency_ms: 20,
            latency_jitter_ms: 20,
            ..Faults::default()
        },
        0,
    );
    let topic = "contention";
    env.cluster.create_topic(topic, 4, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.braze.max_in_flight = 8;
    cfg.window.linger_ms = 1;
    let records = generate(
        8000,
        GeneratorConfig {
            users: 2000,
            segments: 10,
            seed: 5,
            ..GeneratorConfig::default()
        },
    );
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &records,
    );
    let (summary, _, _) = run_until_caught_up(&cfg, &env.rt);
    let stats = env.sim.state.stats();
    assert!(summary.requests > 20, "{summary}");
    assert!(stats.max_objects_in_request <= 75, "{stats:?}");
    assert_eq!(
        stats.max_objects_in_request, 75,
        "full batches happen: {stats:?}"
    );
    assert_eq!(stats.oversized_requests, 0);
    assert_eq!(stats.concurrent_user_violations, 0, "{stats:?}");
    assert_profiles(&env, &landed, None);
    assert_committed_to_end(&cfg, 4);
}
