//! A backfill's fold, in process on librdkafka's mock cluster with the Braze simulator: what
//! Braze rejects dead-letters the records that decided it, and only those.

mod support;

use std::collections::{BTreeSet, HashMap};

use rdkafka::message::Message;
use segment_sync::pipeline::{StartAt, Until};
use segment_sync::tools::sim::Faults;
use segment_sync::window::Order;

use support::expected::{boolean_profiles, diff, strip_identifiers};
use support::mock::mock_env;
use support::worker::{clean_records, committed, end_offsets, produce, read_all, test_config};

/// Braze rejects the objects of some users. Their users' state was decided by the last write
/// of each (user, segment): those records, and none of the changes they superseded, go to the
/// dead-letter topic with their values; every other user holds the log's last state, and the
/// replay commits the end of the topic once the dead letters are acknowledged.
#[test]
fn a_rejected_object_dead_letters_the_records_that_decided_it() {
    let env = mock_env(
        Faults {
            reject_prefix: Some("user-0001".into()),
            ..Faults::default()
        },
        0,
    );
    let topic = "fold-reject";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("fold-reject.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    // 200 users over 3 segments, 3,000 changes: each pair changes about 5 times.
    let recs = clean_records(3000, 91, 200);
    let landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &recs);
    let group = format!("{}.replay", cfg.kafka.group_id);
    let replay = support::running::start(
        &env.rt,
        &cfg,
        Some(&group),
        StartAt::Earliest,
        Until::CaughtUp,
    );
    let summary = replay.thread.join().expect("the replay exits by itself");
    assert!(summary.caught_up);

    let rejected_user = |id: &str| id.starts_with("user-0001");
    let mut deciding: HashMap<(String, String), (Order, (i32, i64))> = HashMap::new();
    let mut rejected_records = 0;
    for l in &landed {
        let Some(e) = &l.event else { continue };
        let Some(id) = e.external_id.as_deref() else {
            continue;
        };
        if !rejected_user(id) {
            continue;
        }
        rejected_records += 1;
        let order = Order::of(e, l.partition, l.offset);
        let mut put = |name: String| {
            let k = (id.to_string(), name);
            if deciding.get(&k).is_none_or(|(o, _)| order > *o) {
                deciding.insert(k, (order, (l.partition, l.offset)));
            }
        };
        put(e.segment_id.to_string());
        for (name, _) in &e.attributes {
            put(format!("\u{0}{name}"));
        }
    }
    let want: BTreeSet<(i32, i64)> = deciding.values().map(|(_, at)| *at).collect();
    assert!(
        !want.is_empty() && rejected_records > 2 * want.len(),
        "the rejected users change their segments many times"
    );
    let dead = read_all(&cfg.kafka.brokers, &cfg.kafka.dlq_topic, 1);
    let got: BTreeSet<(i32, i64)> = dead
        .iter()
        .filter(|m| m.payload().is_some())
        .map(support::worker::dlq_origin)
        .collect();
    assert_eq!(dead.len(), got.len(), "each record dead-lettered once");
    assert_eq!(got, want, "the records that decided the rejected objects");

    let others: Vec<_> = landed
        .iter()
        .filter(|l| {
            l.event
                .as_ref()
                .and_then(|e| e.external_id.as_deref())
                .is_some_and(|id| !rejected_user(id))
        })
        .cloned()
        .collect();
    let profiles = strip_identifiers(env.sim.state.profiles());
    let d = diff(&boolean_profiles(&others, ""), &profiles);
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_eq!(
        committed(&cfg.kafka.brokers, &group, topic, 2),
        end_offsets(&cfg.kafka.brokers, topic, 2),
        "committed to the end once everything settled"
    );
}

/// A backfill stopped while it sends commits nothing: its progress in Kafka is all or
/// nothing, so the next run starts over and sends every user again, not only the rest. Run
/// again to the end, it commits the end.
#[test]
fn a_backfill_stopped_while_sending_commits_nothing_and_runs_again_from_its_start() {
    let env = mock_env(
        Faults {
            latency_ms: 100,
            ..Faults::default()
        },
        0,
    );
    let topic = "fold-stop";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    // One small request at a time: sending 300 users takes a few seconds.
    cfg.braze.batch_size = 10;
    cfg.braze.max_in_flight = 1;
    let recs = clean_records(3000, 17, 300);
    let landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &recs);
    let group = format!("{}.replay", cfg.kafka.group_id);
    let first = support::running::start(
        &env.rt,
        &cfg,
        Some(&group),
        StartAt::Earliest,
        Until::CaughtUp,
    );
    support::running::wait_until(
        "the backfill is sending",
        std::time::Duration::from_secs(30),
        || first.metrics.braze_objects_delivered.get() >= 30,
    );
    let summary = first.stop();
    assert!(!summary.caught_up, "stopped before it sent everything");
    let sent_first = summary.objects_delivered;
    assert!(
        sent_first < 300,
        "{sent_first} objects: it was still sending"
    );
    assert!(
        committed(&cfg.kafka.brokers, &group, topic, 2)
            .iter()
            .all(|o| *o <= 0),
        "nothing committed past the start: {:?}",
        committed(&cfg.kafka.brokers, &group, topic, 2)
    );

    let again = support::running::start(
        &env.rt,
        &cfg,
        Some(&group),
        StartAt::Earliest,
        Until::CaughtUp,
    );
    let summary = again.thread.join().expect("the second run exits by itself");
    assert!(summary.caught_up);
    assert_eq!(
        summary.consumed, 3000,
        "the second run read everything again"
    );
    assert_eq!(summary.objects_delivered, 300, "and sent every user once");
    let d = diff(
        &boolean_profiles(&landed, ""),
        &strip_identifiers(env.sim.state.profiles()),
    );
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_eq!(
        committed(&cfg.kafka.brokers, &group, topic, 2),
        end_offsets(&cfg.kafka.brokers, topic, 2)
    );
}

/// The fold's figures on `/metrics` say what happened in a backfill that spilled: every
/// change read, each user sent once in one object, the bytes spilled (as the run's summary
/// counts them), and, while it sends, the spill files left to send; nothing held at the end,
/// and never more held than `replay.fold_memory`.
#[test]
fn the_fold_metrics_say_what_a_spilling_backfill_did() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    let env = mock_env(
        Faults {
            latency_ms: 100,
            ..Faults::default()
        },
        0,
    );
    let topic = "fold-metrics";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let spill = tempfile::tempdir().unwrap();
    cfg.replay.fold_memory = segment_sync::config::MIN_FOLD_MEMORY;
    cfg.replay.spill_dir = Some(spill.path().display().to_string());
    // Sending 4,000 users takes a few seconds, for the sampling below to see it.
    cfg.braze.max_in_flight = 2;
    let recs = clean_records(8000, 23, 4000);
    let landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &recs);
    let users: BTreeSet<String> = landed
        .iter()
        .filter_map(|l| l.event.as_ref()?.external_id.as_deref().map(str::to_string))
        .collect();
    let changes = landed.iter().filter(|l| l.event.is_some()).count() as u64;
    let group = format!("{}.replay", cfg.kafka.group_id);
    let replay = support::running::start(
        &env.rt,
        &cfg,
        Some(&group),
        StartAt::Earliest,
        Until::CaughtUp,
    );

    // What an operator's scrapes would see while it runs.
    let (most_held, most_buckets_left) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (metrics, held, left, done) = (
            replay.metrics.clone(),
            most_held.clone(),
            most_buckets_left.clone(),
            done.clone(),
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                held.fetch_max(metrics.replay_fold.bytes.get(), Ordering::Relaxed);
                left.fetch_max(
                    metrics.replay_fold.spill_buckets_left.get(),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let summary = replay.thread.join().expect("the replay exits by itself");
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(summary.caught_up, "{summary}");
    let fold = summary.fold.expect("a replay folds");
    let m = &replay.metrics.replay_fold;

    assert_eq!(m.changes.get(), changes, "changes read");
    assert_eq!(fold.changes_read, changes);
    assert_eq!(
        m.users_sent.get(),
        users.len() as u64,
        "each user sent once"
    );
    assert_eq!(
        m.objects_sent.get(),
        users.len() as u64,
        "in one object each"
    );
    assert_eq!(
        env.sim.state.stats().objects_applied,
        users.len() as u64,
        "what Braze applied"
    );
    assert!(fold.bytes_spilled > 0, "setup: the fold spilled");
    assert_eq!(m.spilled_bytes.get(), fold.bytes_spilled, "bytes spilled");
    let held = most_held.load(Ordering::Relaxed);
    assert!(
        held > 0 && held as usize <= cfg.replay.fold_memory,
        "held {held} bytes at most, within replay.fold_memory"
    );
    let left = most_buckets_left.load(Ordering::Relaxed);
    assert!(
        left > 0 && left as usize <= segment_sync::fold::BUCKETS,
        "spill files left to send while sending: {left}"
    );
    assert_eq!(
        (m.users.get(), m.bytes.get(), m.spill_buckets_left.get()),
        (0, 0, 0),
        "nothing held once everything is sent"
    );
    let text = replay.metrics.render();
    for name in [
        "segment_sync_replay_fold_changes_total",
        "segment_sync_replay_fold_users_sent_total",
        "segment_sync_replay_fold_spilled_bytes_total",
    ] {
        assert!(text.contains(name), "{name} on /metrics");
    }
    let d = diff(
        &boolean_profiles(&landed, ""),
        &strip_identifiers(env.sim.state.profiles()),
    );
    assert!(d.is_empty(), "{}", d.join("\n"));
}
