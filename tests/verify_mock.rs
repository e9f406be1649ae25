//! `verify`, in process on librdkafka's mock cluster with the Braze simulator: a log the
//! worker delivered is in sync; drift made by hand in the simulator is found exactly and
//! repaired; a last write Braze refused is reported apart; a change still on its way to
//! Braze is not drift.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use segment_sync::config::{Config, MappingMode};
use segment_sync::event::{Change, Event};
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{StartAt, Until};
use segment_sync::tools::generate::{Generator, GeneratorConfig};
use segment_sync::tools::sim::Faults;
use segment_sync::verify::{self, Summary, VerifyMetrics, VerifyOptions};

use support::expected::Landed;
use support::mock::{mock_env, MockEnv};
use support::running::{start, wait_until};
use support::worker::{clean_records, produce, run_until_caught_up, test_config};

fn setup(env: &MockEnv, topic: &str) -> Config {
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster
        .create_topic(&format!("{topic}.dlq"), 1, 1)
        .unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    cfg.mapping.attribute_prefix = "cdp_".into();
    cfg
}

fn options() -> VerifyOptions {
    VerifyOptions {
        settle_timeout: Duration::from_secs(60),
        ..VerifyOptions::new(Arc::new(AtomicBool::new(false)))
    }
}

struct Verified {
    summary: Summary,
    /// The NDJSON lines, parsed.
    lines: Vec<Value>,
    metrics: String,
}

fn verify(env: &MockEnv, cfg: &Config, opts: &VerifyOptions) -> Verified {
    let metrics = Arc::new(Metrics::new());
    let vm = Arc::new(VerifyMetrics::new(&metrics.registry).unwrap());
    let mut out: Vec<u8> = Vec::new();
    let summary = verify::run(
        cfg,
        opts,
        &mut out,
        &metrics,
        &vm,
        &Arc::new(Health::new()),
        env.rt.handle(),
    )
    .expect("verify runs");
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    Verified {
        summary,
        lines,
        metrics: metrics.render(),
    }
}

/// Last write wins: (sequence, occurred_at, partition, offset).
type Order = (i64, i64, i32, i64);

/// The last write of each (user, segment) and where it landed, from the produced records
/// alone: (partition, offset, change).
fn last_writes(landed: &[Landed]) -> BTreeMap<(String, String), (i32, i64, Change)> {
    let mut out: BTreeMap<(String, String), (Order, Change)> = BTreeMap::new();
    for r in landed {
        let Some(Event {
            external_id: Some(id),
            segment_id,
            sequence,
            occurred_at,
            change,
            ..
        }) = &r.event
        else {
            continue;
        };
        let order = (
            sequence.unwrap_or(i64::MIN),
            *occurred_at,
            r.partition,
            r.offset,
        );
        let key = (id.to_string(), segment_id.to_string());
        if out.get(&key).is_none_or(|(o, _)| order > *o) {
            out.insert(key, (order, *change));
        }
    }
    out.into_iter()
        .map(|(k, ((_, _, p, o), c))| (k, (p, o, c)))
        .collect()
}

fn profile(env: &MockEnv, id: &str) -> Map<String, Value> {
    env.sim
        .state
        .profile(&format!("external_id:{id}"))
        .unwrap_or_else(|| panic!("no profile for {id}"))
}

#[test]
fn a_delivered_log_is_in_sync_and_refused_last_writes_are_reported_apart() {
    let env = mock_env(
        Faults {
            reject_prefix: Some("user-00001".into()),
            ..Faults::default()
        },
        0,
    );
    let cfg = setup(&env, "verify-sync");
    // The stream the demo shows: repeats, misordered changes, bad records, email-only users.
    let records: Vec<_> = Generator::new(GeneratorConfig {
        users: 300,
        segments: 3,
        repeat_rate: 0.05,
        out_of_order_rate: 0.03,
        bad_rate: 0.02,
        email_only_rate: 0.2,
        seed: 31,
    })
    .take(1200)
    .collect();
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        "verify-sync",
        cfg.kafka.format,
        &records,
    );
    run_until_caught_up(&cfg, &env.rt);
    let refused: std::collections::BTreeSet<String> = last_writes(&landed)
        .keys()
        .map(|(u, _)| u.clone())
        .filter(|u| u.starts_with("user-00001"))
        .collect();
    assert!(!refused.is_empty(), "the stream has refused users");

    let v = verify(&env, &cfg, &options());
    let s = &v.summary;
    assert_eq!(s.exit_code(), 0, "{s}\n{:?}", v.lines);
    assert_eq!((s.drifted, s.missing, s.unsettled), (0, 0, 0), "{s}");
    assert_eq!(s.dead_lettered, refused.len() as u64, "{s}");
    assert!(s.email_only > 0, "the stream has email-only users: {s}");
    assert_eq!(s.users_checked, s.in_sync + s.dead_lettered, "{s}");
    assert!(
        s.records_skipped > 0,
        "bad records are skipped as the worker skips them: {s}"
    );
    for line in &v.lines {
        assert_eq!(line["status"], "dead_lettered", "{line}");
        assert!(refused.contains(line["external_id"].as_str().unwrap()));
        assert!(
            line["braze"].is_null(),
            "Braze never created a refused user"
        );
        for d in line["differences"].as_array().unwrap() {
            assert_eq!(d["dead_lettered"], true, "{line}");
        }
    }
    for (result, n) in [
        ("in_sync", s.in_sync),
        ("dead_lettered", s.dead_lettered),
        ("drifted", 0),
    ] {
        let sample = format!("segment_sync_verify_users_total{{result=\"{result}\"}} {n}");
        assert!(
            v.metrics.contains(&sample),
            "missing `{sample}` in\n{}",
            v.metrics
        );
    }
    assert!(v
        .metrics
        .contains("segment_sync_verify_records_read_total 1200"));
}

#[test]
fn drift_made_by_hand_is_found_exactly_and_repair_leaves_none() {
    let env = mock_env(Faults::default(), 0);
    let topic = "verify-drift";
    let cfg = setup(&env, topic);
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(1200, 37, 300),
    );
    run_until_caught_up(&cfg, &env.rt);
    let writes = last_writes(&landed);
    assert_eq!(verify(&env, &cfg, &options()).summary.exit_code(), 0);

    // A flipped attribute, a deleted profile, an extra membership.
    let entered: Vec<&(String, String)> = writes
        .iter()
        .filter(|(_, (_, _, c))| *c == Change::Entered)
        .map(|(k, _)| k)
        .collect();
    let (flipped_user, flipped_segment) = entered[0].clone();
    let deleted_user = entered
        .iter()
        .map(|(u, _)| u.clone())
        .find(|u| *u != flipped_user)
        .unwrap();
    let extra_user = entered
        .iter()
        .map(|(u, _)| u.clone())
        .find(|u| *u != flipped_user && *u != deleted_user)
        .unwrap();
    let attribute = format!("cdp_{flipped_segment}");
    let mut p = profile(&env, &flipped_user);
    assert_eq!(p[&attribute], json!(true));
    p.insert(attribute.clone(), json!(false));
    env.sim
        .state
        .put_profile(&format!("external_id:{flipped_user}"), p);
    assert!(env
        .sim
        .state
        .remove_profile(&format!("external_id:{deleted_user}")));
    let mut p = profile(&env, &extra_user);
    p.insert("cdp_seg_ghost".into(), json!(true));
    env.sim
        .state
        .put_profile(&format!("external_id:{extra_user}"), p);

    let v = verify(&env, &cfg, &options());
    assert_eq!(v.summary.exit_code(), 3, "{}", v.summary);
    assert_eq!(
        (v.summary.drifted, v.summary.missing),
        (2, 1),
        "{}",
        v.summary
    );
    let by_user: BTreeMap<&str, &Value> = v
        .lines
        .iter()
        .map(|l| (l["external_id"].as_str().unwrap(), l))
        .collect();
    assert_eq!(by_user.len(), 3, "{:?}", v.lines);

    let flipped = by_user[flipped_user.as_str()];
    let (partition, offset, _) = writes[&(flipped_user.clone(), flipped_segment.clone())];
    assert_eq!(flipped["status"], "drifted");
    assert_eq!(
        flipped["differences"],
        json!([{
            "segment": flipped_segment,
            "attribute": attribute,
            "expected": true,
            "found": false,
            "deciding": {"topic": topic, "partition": partition, "offset": offset}
        }])
    );
    assert_eq!(flipped["braze"][&attribute], json!(false));
    assert_eq!(flipped["log"][&flipped_segment]["change"], "ENTERED");
    assert_eq!(flipped["log"][&flipped_segment]["offset"], offset);

    let deleted = by_user[deleted_user.as_str()];
    assert_eq!(deleted["status"], "missing");
    assert!(deleted["braze"].is_null());
    let expected_segments = writes.keys().filter(|(u, _)| *u == deleted_user).count();
    assert_eq!(deleted["log"].as_object().unwrap().len(), expected_segments);

    let extra = by_user[extra_user.as_str()];
    assert_eq!(extra["status"], "drifted");
    assert_eq!(
        extra["differences"],
        json!([{
            "segment": "seg_ghost",
            "attribute": "cdp_seg_ghost",
            "expected": false,
            "found": true,
            "deciding": null
        }])
    );

    // A dry run prints what it would send and changes nothing.
    let mut dry = options();
    dry.repair = true;
    dry.dry_run = true;
    let v = verify(&env, &cfg, &dry);
    let requests: Vec<&Value> = v
        .lines
        .iter()
        .filter(|l| l.get("attributes").is_some())
        .collect();
    assert_eq!(requests.len(), 1, "{:?}", v.lines);
    let objects = requests[0]["attributes"].as_array().unwrap();
    assert_eq!(objects.len(), 3);
    assert!(objects.contains(&json!({
        "external_id": extra_user, "_update_existing_only": false, "cdp_seg_ghost": false
    })));
    assert_eq!(profile(&env, &flipped_user)[&attribute], json!(false));

    let mut repair = options();
    repair.repair = true;
    let v = verify(&env, &cfg, &repair);
    assert_eq!(
        v.summary.exit_code(),
        3,
        "drift was found, even if repaired"
    );
    let r = v.summary.repair.clone().expect("a repair");
    assert_eq!(
        (r.sent, r.fixed, r.still_drifted, r.rejected),
        (3, 3, 0, 0),
        "{}",
        v.summary
    );
    assert!(v
        .metrics
        .contains("segment_sync_verify_users_repaired_total 3"));
    assert_eq!(profile(&env, &flipped_user)[&attribute], json!(true));
    assert!(
        !profile(&env, &extra_user).contains_key("cdp_seg_ghost")
            || profile(&env, &extra_user)["cdp_seg_ghost"] == json!(false)
    );

    let again = verify(&env, &cfg, &options());
    assert_eq!(
        again.summary.exit_code(),
        0,
        "{}\n{:?}",
        again.summary,
        again.lines
    );
    assert!(again.lines.is_empty());
}

#[test]
fn array_mode_finds_a_membership_taken_out_of_the_array() {
    let env = mock_env(Faults::default(), 0);
    let topic = "verify-array";
    let mut cfg = setup(&env, topic);
    cfg.mapping.mode = MappingMode::Array;
    cfg.mapping.attribute_prefix = String::new();
    let landed = produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(600, 41, 150),
    );
    run_until_caught_up(&cfg, &env.rt);
    let v = verify(&env, &cfg, &options());
    assert_eq!(v.summary.exit_code(), 0, "{}\n{:?}", v.summary, v.lines);

    let ((user, segment), (_, offset, _)) = last_writes(&landed)
        .into_iter()
        .find(|(_, (_, _, c))| *c == Change::Entered)
        .unwrap();
    let mut p = profile(&env, &user);
    let items = p["cdp_segments"].as_array().unwrap().clone();
    let kept: Vec<Value> = items.into_iter().filter(|v| *v != json!(segment)).collect();
    p.insert("cdp_segments".into(), Value::Array(kept));
    env.sim.state.put_profile(&format!("external_id:{user}"), p);

    let v = verify(&env, &cfg, &options());
    assert_eq!(v.summary.exit_code(), 3, "{}", v.summary);
    assert_eq!(v.lines.len(), 1, "{:?}", v.lines);
    let d = &v.lines[0]["differences"][0];
    assert_eq!(
        (
            d["segment"].as_str(),
            d["attribute"].as_str(),
            &d["expected"],
            &d["found"]
        ),
        (
            Some(segment.as_str()),
            Some("cdp_segments"),
            &json!(true),
            &json!(false)
        )
    );
    assert_eq!(d["deciding"]["offset"], offset);
}

/// Changes the live group has not delivered yet when verify reads Braze are not drift: the
/// differing users are checked again once the live group has committed past their last
/// writes, with the log read on to its new end (more changes arrive meanwhile).
#[test]
fn a_change_still_on_its_way_is_not_drift() {
    let env = mock_env(
        Faults {
            latency_ms: 30,
            ..Faults::default()
        },
        0,
    );
    let topic = "verify-moving";
    let cfg = setup(&env, topic);
    let stream = clean_records(2400, 43, 200);
    let (wave1, rest) = stream.split_at(1000);
    let (wave2, wave3) = rest.split_at(700);
    produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, wave1);
    run_until_caught_up(&cfg, &env.rt);
    // The same users change again; nobody delivers it yet.
    produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, wave2);

    let metrics = Arc::new(Metrics::new());
    let vm = Arc::new(VerifyMetrics::new(&metrics.registry).unwrap());
    let checking = {
        let (cfg, opts, rt) = (cfg.clone(), options(), env.rt.handle().clone());
        let (metrics, vm) = (metrics.clone(), vm.clone());
        std::thread::spawn(move || {
            let mut out: Vec<u8> = Vec::new();
            let summary = verify::run(
                &cfg,
                &opts,
                &mut out,
                &metrics,
                &vm,
                &Arc::new(Health::new()),
                &rt,
            )
            .expect("verify runs");
            (summary, String::from_utf8(out).unwrap())
        })
    };
    wait_until(
        "verify has found users that differ",
        Duration::from_secs(60),
        || vm.users_rechecked.get() > 0,
    );
    // More changes of the same users while verify waits, then the live group catches up.
    produce(&env.rt, &cfg.kafka.brokers, topic, cfg.kafka.format, wave3);
    let live = start(&env.rt, &cfg, None, StartAt::Committed, Until::Stopped);
    let (summary, lines) = checking.join().expect("the verify thread");
    live.stop();
    assert_eq!(summary.exit_code(), 0, "{summary}\n{lines}");
    assert!(lines.is_empty(), "{lines}");
    assert!(summary.rechecked > 0);
    assert_eq!(summary.users_checked, summary.in_sync, "{summary}");
}

/// The export client against the simulator: 50 users a request, a 429 waited out until the
/// reset, users Braze does not know answered as missing, a key without access an error.
#[test]
fn the_export_client_reads_profiles_and_waits_out_the_rate_limit() {
    let env = mock_env(Faults::default(), 0);
    for i in 0..120 {
        env.sim.state.put_profile(
            &format!("external_id:u{i}"),
            json!({"cdp_a": i % 2 == 0}).as_object().unwrap().clone(),
        );
    }
    env.sim.state.set_export_rate_limit(2, 1);
    let mut cfg = test_config("127.0.0.1:1", "unused", &env.sim.url());
    cfg.braze.export_requests_per_minute = 6000;
    let metrics = Metrics::new();
    let vm = Arc::new(VerifyMetrics::new(&metrics.registry).unwrap());
    let client = verify::ExportClient::new(&cfg.braze, vm.clone()).unwrap();
    let ids: Vec<String> = (0..125).map(|i| format!("u{i}")).collect();
    let mut found = 0;
    let mut missing = 0;
    for chunk in ids.chunks(verify::MAX_IDS) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let got = env.rt.block_on(client.export(&refs)).expect("exported");
        found += got.profiles.len();
        missing += got.missing.len();
        if let Some(p) = got.profiles.get("u4") {
            assert_eq!(p["cdp_a"], json!(true));
        }
    }
    assert_eq!((found, missing), (120, 5));
    // The pacer read Braze's headers: it held the third request until the window's reset
    // instead of meeting a 429.
    assert_eq!(vm.export_requests.with_label_values(&["2xx"]).get(), 3);
    assert_eq!(env.sim.state.stats().responses_429, 0);

    // A client that has not seen the budget go (another process) meets the 429 and waits
    // for the reset rather than failing.
    env.sim.state.set_export_rate_limit(1, 2);
    let other = verify::ExportClient::new(&cfg.braze, vm.clone()).unwrap();
    env.rt
        .block_on(other.export(&["u1"]))
        .expect("the budget's one request");
    let fresh = verify::ExportClient::new(&cfg.braze, vm.clone()).unwrap();
    let got = env
        .rt
        .block_on(fresh.export(&["u2"]))
        .expect("exported after the reset");
    assert!(got.profiles.contains_key("u2"));

    cfg.braze.api_key = Some("wrong".into());
    let client = verify::ExportClient::new(&cfg.braze, vm).unwrap();
    let e = env.rt.block_on(client.export(&["u1"])).unwrap_err();
    assert!(
        matches!(e, verify::ExportError::ConfigFault { status: 401, .. }),
        "{e}"
    );
}
