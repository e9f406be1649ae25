//! Operating the worker, in process on librdkafka's mock cluster with the Braze simulator:
//! what /metrics reports, replay beside the live group, dry runs, rebalances mid-flight.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use segment_sync::config::Config;
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{self, RunOptions, StartAt, Until};
use segment_sync::tools::sim::Faults;

use support::expected::{boolean_profiles, diff, strip_identifiers, Landed};
use support::mock::{mock_env, MockEnv};
use support::running::{wait_until, Running};
use support::worker::{clean_records, committed, end_offsets, produce, test_config};

type Env = MockEnv;

fn env(faults: Faults) -> Env {
    mock_env(faults, 0)
}

fn start(env: &Env, cfg: &Config, group: Option<&str>, start_at: StartAt, until: Until) -> Running {
    support::running::start(&env.rt, cfg, group, start_at, until)
}

fn caught_up(cfg: &Config, group: &str, partitions: i32) -> bool {
    let topic = &cfg.kafka.topics[0];
    committed(&cfg.kafka.brokers, group, topic, partitions)
        == end_offsets(&cfg.kafka.brokers, topic, partitions)
}

fn profile_diff(env: &Env, landed: &[Landed]) -> Vec<String> {
    diff(
        &boolean_profiles(landed, ""),
        &strip_identifiers(env.sim.state.profiles()),
    )
}

/// The value of an unlabelled metric, or the sum of a labelled one, from the text format.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn metrics_endpoint_agrees_with_what_braze_saw() {
    let env = env(Faults {
        reject_prefix: Some("user-0000".into()),
        fail_next_5xx: 2,
        ..Faults::default()
    });
    let topic = "metered";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("metered.dlq", 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let recs = clean_records(1500, 11, 300);
    produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &recs);
    let worker = start(&env, &cfg, None, StartAt::Committed, Until::Stopped);
    wait_until("the worker is ready", Duration::from_secs(30), || {
        worker.health.readiness().is_ok()
    });
    wait_until("everything is committed", Duration::from_secs(60), || {
        caught_up(&cfg, &cfg.kafka.group_id, 2) && worker.metrics.braze_in_flight.get() == 0
    });
    // While running (asynchronous commits), /metrics already shows the committed offsets.
    let running = worker.metrics.render();
    for (p, end) in end_offsets(&cfg.kafka.brokers, topic, 2).iter().enumerate() {
        let line =
            format!("segment_sync_committed_offset{{partition=\"{p}\",topic=\"{topic}\"}} {end}");
        assert!(running.contains(&line), "missing `{line}` while running");
    }
    let (metrics, health) = (worker.metrics.clone(), worker.health.clone());
    worker.stop();

    let listener = env
        .rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = env.rt.spawn(segment_sync::server::serve(
        listener,
        metrics,
        health,
        std::future::pending(),
    ));
    let get = |path: &str| {
        env.rt.block_on(async {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let (status, text) = get("/metrics");
    assert_eq!(status, 200);
    let stats = env.sim.state.stats();
    assert_eq!(metric(&text, "segment_sync_events_consumed_total"), 1500);
    assert_eq!(
        metric(&text, "segment_sync_braze_objects_delivered_total"),
        stats.objects_applied
    );
    assert_eq!(
        metric(&text, "segment_sync_braze_objects_rejected_total"),
        stats.objects_rejected
    );
    assert!(stats.objects_rejected > 0);
    assert_eq!(
        metric(&text, "segment_sync_braze_attributes_written_total"),
        stats.data_points
    );
    assert_eq!(
        metric(&text, "segment_sync_braze_requests_total"),
        stats.requests,
        "every request the simulator answered, by class"
    );
    assert!(metric(&text, "segment_sync_braze_retries_total") >= 2);
    assert!(text.contains("segment_sync_braze_request_duration_seconds_bucket{le=\"0.005\"}"));
    assert_eq!(
        metric(&text, "segment_sync_braze_request_duration_seconds_count"),
        stats.requests
    );
    let ends = end_offsets(&cfg.kafka.brokers, topic, 2);
    for (p, end) in ends.iter().enumerate() {
        let line =
            format!("segment_sync_committed_offset{{partition=\"{p}\",topic=\"{topic}\"}} {end}");
        assert!(text.contains(&line), "missing `{line}` in\n{text}");
    }
    // Every event of a rejected user is dead-lettered (no repeats in this stream).
    let rejected_events = recs
        .iter()
        .filter(|g| g.key.starts_with(b"user-0000"))
        .count() as u64;
    assert!(rejected_events > 0);
    assert_eq!(
        metric(&text, "segment_sync_dlq_records_total"),
        rejected_events
    );
    assert_eq!(get("/healthz").0, 200);
    let (status, why) = get("/readyz");
    assert_eq!(status, 503, "stopped: no partitions");
    assert!(why.contains("no partitions"), "{why}");
    server.abort();
}

/// Replay beside the live group, with changes produced while it runs: every profile must
/// end at the log's last write. Replay reads on after its start's end offsets until caught
/// up, so its last write for every user is at least as new as the live group's.
#[test]
fn replay_beside_the_live_group_never_leaves_an_older_profile() {
    let (env, cfg, landed) = race(Until::CaughtUp);
    let d = profile_diff(&env, &landed);
    assert!(
        d.is_empty(),
        "profiles older than the log:\n{}",
        d.join("\n")
    );
    assert!(caught_up(
        &cfg,
        &format!("{}.replay", cfg.kafka.group_id),
        2
    ));
}

/// The same race with `--until-start`: replay stops at the end offsets taken when it started
/// and leaves profiles older than the log. This is why replay does not stop there by default.
#[test]
fn replay_until_start_shows_the_race_it_would_lose() {
    let (env, _, landed) = race(Until::StartOffsets);
    let stale = profile_diff(&env, &landed).len();
    assert!(
        stale > 0,
        "the race did not show: the test no longer exercises it"
    );
}

fn race(until: Until) -> (Env, Config, Vec<Landed>) {
    let env = env(Faults {
        latency_ms: 40,
        ..Faults::default()
    });
    let topic = "race";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.window.linger_ms = 10;
    let stream = clean_records(3200, 21, 400);
    let (wave1, wave2) = stream.split_at(2000);
    let mut landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, wave1);
    let live = start(&env, &cfg, None, StartAt::Committed, Until::Stopped);
    wait_until(
        "the live group has delivered wave 1",
        Duration::from_secs(60),
        || caught_up(&cfg, &cfg.kafka.group_id, 2),
    );
    // A slow replay: one request of two users at a time, so sending wave 1's 400 users takes
    // it about 8 s (200 requests of 40 ms). Wave 2 lands after its first 50 and the live group
    // delivers it within a second or two even on a loaded machine; with ten users a request
    // (1.6 s in all) the replay could finish first under load, and the race did not show.
    let mut slow = cfg.clone();
    slow.braze.batch_size = 2;
    slow.braze.max_in_flight = 1;
    let replay_group = format!("{}.replay", cfg.kafka.group_id);
    let replay = start(&env, &slow, Some(&replay_group), StartAt::Earliest, until);
    wait_until("the replay is sending", Duration::from_secs(30), || {
        replay.metrics.braze_objects_delivered.get() > 50
    });
    // New changes for the same users while the replay is still in wave 1.
    landed.extend(produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        wave2,
    ));
    let summary = replay.thread.join().expect("replay");
    assert!(summary.consumed >= 2000);
    wait_until(
        "the live group has delivered wave 2",
        Duration::from_secs(60),
        || caught_up(&cfg, &cfg.kafka.group_id, 2) && live.metrics.braze_in_flight.get() == 0,
    );
    live.stop();
    (env, cfg, landed)
}

#[test]
fn dry_run_writes_the_requests_and_sends_nothing() {
    let env = env(Faults::default());
    let topic = "dry";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let recs = clean_records(500, 31, 100);
    let landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &recs);
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Sink::default();
    let opts = RunOptions {
        group_id: Some("dry.replay".into()),
        start: StartAt::Earliest,
        until: Until::StartOffsets,
        run_id: None,
        stop: Arc::new(AtomicBool::new(false)),
        dry_run: Some(Box::new(out.clone())),
        progress: None,
    };
    let mut keyless = cfg.clone();
    keyless.braze.api_key = None;
    pipeline::run(
        &keyless,
        opts,
        Arc::new(Metrics::new()),
        Arc::new(Health::new()),
        env.rt.handle().clone(),
    )
    .expect("dry run");
    assert_eq!(env.sim.state.stats().requests, 0, "nothing reached Braze");
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    // Apply the NDJSON requests as Braze would: the result is the log's last write.
    let mut profiles: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
        BTreeMap::new();
    for line in text.lines() {
        let req: serde_json::Value = serde_json::from_str(line).expect("one JSON request a line");
        let objects = req["attributes"].as_array().expect("attributes array");
        assert!(!objects.is_empty() && objects.len() <= 75);
        for o in objects {
            let mut o = o.as_object().unwrap().clone();
            let id = o.remove("external_id").unwrap();
            o.remove("_update_existing_only");
            let p = profiles
                .entry(format!("external_id:{}", id.as_str().unwrap()))
                .or_default();
            for (k, v) in o {
                p.insert(k, v);
            }
        }
    }
    let d = diff(&boolean_profiles(&landed, ""), &profiles);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

/// A second worker joins while the first has requests in flight: the first drains the
/// revoked partitions before letting them go, so no user is ever in two requests at once,
/// nothing is lost and the committed offsets reach the end.
#[test]
fn rebalance_in_the_middle_of_in_flight_batches() {
    let env = env(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let topic = "moving";
    env.cluster.create_topic(topic, 4, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.window.linger_ms = 5;
    cfg.braze.batch_size = 20;
    cfg.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka
        .properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    let stream = clean_records(4500, 41, 800);
    let (wave1, wave2) = stream.split_at(3000);
    let mut landed = produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, wave1);
    let a = start(&env, &cfg, None, StartAt::Committed, Until::Stopped);
    wait_until(
        "worker A has requests in flight",
        Duration::from_secs(30),
        || a.metrics.braze_in_flight.get() > 0,
    );
    let b = start(&env, &cfg, None, StartAt::Committed, Until::Stopped);
    // A trickle of changes through the rebalance, so requests are in flight when the first
    // worker's partitions are revoked, and the second has records to read once it owns some.
    for chunk in wave2.chunks(50) {
        landed.extend(produce(
            &env.rt,
            &cfg.kafka.brokers,
            topic,
            cfg.kafka.format,
            chunk,
        ));
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_until(
        "both workers have consumed",
        Duration::from_secs(60),
        || b.metrics.events_consumed.get() > 0,
    );
    wait_until("everything is committed", Duration::from_secs(90), || {
        caught_up(&cfg, &cfg.kafka.group_id, 4)
            && a.metrics.braze_in_flight.get() == 0
            && b.metrics.braze_in_flight.get() == 0
    });
    let (sa, sb) = (a.stop(), b.stop());
    assert!(sa.consumed > 0 && sb.consumed > 0, "both took part");
    let stats = env.sim.state.stats();
    assert_eq!(stats.concurrent_user_violations, 0, "{stats:?}");
    let d = profile_diff(&env, &landed);
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert!(caught_up(&cfg, &cfg.kafka.group_id, 4));
}

/// A key Braze refuses: nothing is dead-lettered, readiness fails with the reason, and
/// consumption pauses instead of reading on into memory.
#[test]
fn a_refused_api_key_pauses_consumption_and_fails_readiness() {
    let env = env(Faults::default());
    let topic = "refused";
    env.cluster.create_topic(topic, 1, 1).unwrap();
    env.cluster.create_topic("refused.dlq", 1, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.braze.api_key = Some("not-the-key".into());
    cfg.window.drain_timeout_ms = 500;
    let first = clean_records(300, 51, 300);
    produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, &first);
    let worker = start(&env, &cfg, None, StartAt::Committed, Until::Stopped);
    wait_until(
        "readiness reports the refused key",
        Duration::from_secs(30),
        || {
            worker
                .health
                .readiness()
                .is_err_and(|why| why.contains("401"))
        },
    );
    let why = worker.health.readiness().unwrap_err();
    assert!(
        !why.contains("not-the-key"),
        "the key is never shown: {why}"
    );
    // Paused: records produced now are not read.
    std::thread::sleep(Duration::from_millis(500));
    let consumed = worker.metrics.events_consumed.get();
    produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(300, 52, 300),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        worker.metrics.events_consumed.get(),
        consumed,
        "consumption paused"
    );
    let summary = worker.stop();
    assert_eq!(
        summary.dlq_records, 0,
        "a configuration fault dead-letters nothing"
    );
    assert_eq!(env.sim.state.stats().objects_applied, 0);
    assert!(env.sim.state.stats().responses_401 > 0);
    let committed = committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, 1);
    assert!(
        committed[0] <= 0,
        "nothing delivered, nothing committed past the first record: {committed:?}"
    );
}

/// A replay told to start a partition at its end (or at a time after its last record) reads
/// nothing there, and must still see that it has caught up and exit.
#[test]
fn replay_finishes_when_a_partition_has_nothing_to_read() {
    let env = env(Faults::default());
    let topic = "partial";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    let cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(600, 61, 100),
    );
    let ends = end_offsets(&cfg.kafka.brokers, topic, 2);
    assert!(ends.iter().all(|e| *e > 0));
    let start = StartAt::Offsets(BTreeMap::from([(0, ends[0]), (1, 0)]));
    let replay = start_replay(&env, &cfg, start);
    let summary = replay.thread.join().expect("the replay exits by itself");
    assert_eq!(
        summary.consumed as i64, ends[1],
        "only partition 1 was read"
    );
    let only_p1: Vec<Landed> = landed.into_iter().filter(|l| l.partition == 1).collect();
    let d = profile_diff(&env, &only_p1);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

fn start_replay(env: &Env, cfg: &Config, start_at: StartAt) -> Running {
    let group = format!("{}.replay", cfg.kafka.group_id);
    start(env, cfg, Some(&group), start_at, Until::CaughtUp)
}
