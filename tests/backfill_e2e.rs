//! End to end, the built binary on the real Apache Kafka broker: a backfill writes each
//! user's final state once (docs/design.md, "Backfills": it writes the final state).
//!
//! A history where every (user, segment) changes many times, spread over the log, is
//! replayed from the earliest offset: Braze (the simulator) must receive exactly one object
//! per user and one write per (user, segment) and extra attribute, and hold the log's last
//! write for each; the same with a fold budget small enough to spill to disk; and a dry run
//! prints one NDJSON line per request and a summary that agrees with it.
//!
//! Each test bounds its own runtime; the processes it started are killed when it ends.

mod support;

use std::path::Path;
use std::time::Duration;

use segment_sync::event::Event;
use segment_sync::tools::generate::{Generated, Generator, GeneratorConfig, Record};
use serde_json::Value;

use support::expected::{boolean_profiles, diff, strip_identifiers, Landed};
use support::kafka::KafkaBroker;
use support::procs::{binary, Proc, Sim, WorkerConfig, API_KEY};
use support::worker::produce_with;

/// How long a replay of a few ten thousand records may take to exit by itself.
const REPLAY_EXIT: Duration = Duration::from_secs(120);

fn json_payload(g: &Generated) -> (Vec<u8>, Option<Event<'static>>) {
    match &g.record {
        Record::Valid(e) => (segment_sync::tools::encode::to_json(e), Some(e.clone())),
        Record::Invalid(e) => (segment_sync::tools::encode::to_json(e), None),
        Record::Undecodable(b) => (b.clone(), None),
    }
}

/// `changes` records of `users` users over 8 segments, users drawn at random so that one
/// user's changes are spread over the whole log; a few repeats and misordered changes.
fn history(
    topic: &str,
    users: usize,
    changes: usize,
    seed: u64,
) -> (&'static KafkaBroker, tempfile::TempDir, Vec<Landed>) {
    let broker = KafkaBroker::shared();
    broker.create_topic(topic, 3);
    broker.create_topic(&format!("{topic}.dlq"), 1);
    let dir = tempfile::Builder::new()
        .prefix(&format!("e2e-{topic}-"))
        .tempdir()
        .expect("temp dir");
    let records: Vec<Generated> = Generator::new(GeneratorConfig {
        users,
        segments: 8,
        repeat_rate: 0.05,
        out_of_order_rate: 0.02,
        bad_rate: 0.0,
        email_only_rate: 0.1,
        seed,
    })
    .take(changes)
    .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("producer runtime");
    let landed = produce_with(&rt, &broker.bootstrap(), topic, &records, &json_payload);
    (broker, dir, landed)
}

/// `segment-sync replay <args>` with `[replay] <replay_toml>` appended to the config.
fn replay(dir: &Path, name: &str, cfg: &WorkerConfig, replay_toml: &str, args: &[&str]) -> Proc {
    let path = dir.join(format!("{name}.toml"));
    let toml = format!("{}\n[replay]\n{replay_toml}\n", cfg.toml("127.0.0.1:0"));
    std::fs::write(&path, toml).expect("write the config");
    let mut cmd = std::process::Command::new(binary());
    cmd.arg("replay")
        .args(args)
        .arg("--config")
        .arg(&path)
        .env("BRAZE_API_KEY", API_KEY)
        .env("RUST_LOG", "info");
    Proc::spawn(name, cmd, dir)
}

fn exit_ok(p: &mut Proc) {
    match p.wait_exit(REPLAY_EXIT) {
        Some(s) if s.success() => {}
        other => {
            let name = p.name.clone();
            panic!("{name} did not exit 0 ({other:?})\n{}", p.report())
        }
    }
}

/// The number after `label` in the replay's summary on stderr.
fn summary_figure(p: &Proc, label: &str) -> u64 {
    let err = std::fs::read_to_string(&p.stderr).expect("stderr");
    err.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(label)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in the summary:\n{err}"))
}

/// Replays the history into a fresh simulator and checks the floor: one object per user,
/// one data point per (user, segment) and extra attribute, the log's last state.
fn backfill_at_the_floor(topic: &str, replay_toml: &str, spills: bool) {
    let (_broker, dir, landed) = history(topic, 500, 20_000, 2207);
    let dir = dir.path();
    let want = boolean_profiles(&landed, "");
    let floor_writes: usize = want.values().map(|p| p.len()).sum();
    let pairs_changes = landed.iter().filter(|l| l.event.is_some()).count();
    assert!(
        pairs_changes > 2 * floor_writes,
        "the history must change each pair many times ({pairs_changes} changes, {floor_writes} pairs)"
    );

    let sim = Sim::start(dir, "sim", &[]);
    // The worker's window lingers 100 ms here: the fold must not depend on it.
    let cfg = WorkerConfig::new(&_broker.bootstrap(), topic, &sim.url);
    let mut p = replay(dir, "replay", &cfg, replay_toml, &["--from", "earliest"]);
    exit_ok(&mut p);

    let got = strip_identifiers(sim.profiles());
    let d = diff(&want, &got);
    assert!(
        d.is_empty(),
        "Braze's profiles differ from the log's last writes:\n{}",
        d.join("\n")
    );
    let stats = sim.stats();
    assert_eq!(
        stats.objects_applied as usize,
        want.len(),
        "one object per user ({} users)",
        want.len()
    );
    assert_eq!(
        stats.data_points as usize, floor_writes,
        "one write per (user, segment) and attribute"
    );
    assert_eq!(stats.concurrent_user_violations, 0);
    assert!(stats.max_objects_in_request <= 75);
    let spilled = summary_figure(&p, "bytes spilled");
    assert_eq!(spilled > 0, spills, "bytes spilled: {spilled}");
    eprintln!(
        "backfill {topic}: {} changes, {} users, {} objects, {} data points, {} requests, {spilled} bytes spilled",
        pairs_changes,
        want.len(),
        stats.objects_applied,
        stats.data_points,
        stats.requests
    );
}

#[test]
fn backfill_writes_each_user_once_with_the_logs_last_state() {
    backfill_at_the_floor("e2e-backfill-floor", "", false);
}

#[test]
fn backfill_spilling_to_disk_writes_the_same_floor() {
    // 64 KiB: far below what 500 users' state holds, so the fold spills many times.
    let spill = tempfile::tempdir().expect("spill dir");
    let toml = format!(
        "fold_memory = 65536\nspill_dir = {:?}\n",
        spill.path().display().to_string()
    );
    backfill_at_the_floor("e2e-backfill-spill", &toml, true);
    assert_eq!(
        std::fs::read_dir(spill.path()).unwrap().count(),
        0,
        "the spill files are removed when the backfill ends"
    );
}

#[test]
fn backfill_dry_run_prints_each_request_and_a_summary() {
    let topic = "e2e-backfill-dry";
    let (broker, dir, landed) = history(topic, 400, 4000, 77);
    let dir = dir.path();
    let want = boolean_profiles(&landed, "");
    let cfg = WorkerConfig::new(&broker.bootstrap(), topic, "http://127.0.0.1:9");
    let mut p = replay(dir, "dry", &cfg, "", &["--from", "earliest", "--dry-run"]);
    exit_ok(&mut p);
    let out = std::fs::read_to_string(&p.stdout).expect("stdout");
    let mut objects = 0usize;
    let mut users = std::collections::BTreeSet::new();
    let requests = out.lines().count();
    for line in out.lines() {
        let v: Value = serde_json::from_str(line).expect("one JSON request a line");
        for o in v["attributes"].as_array().expect("attributes") {
            objects += 1;
            let id = o.get("external_id").or_else(|| o.get("email")).unwrap();
            users.insert(id.as_str().unwrap().to_string());
        }
    }
    assert_eq!(objects, want.len(), "one object per user");
    assert_eq!(users.len(), want.len());
    assert_eq!(summary_figure(&p, "requests") as usize, requests);
    assert_eq!(summary_figure(&p, "objects") as usize, objects);
    assert_eq!(summary_figure(&p, "users") as usize, want.len());
    let read = summary_figure(&p, "changes read");
    let saved = summary_figure(&p, "writes saved");
    let writes = summary_figure(&p, "attribute writes");
    assert!(read > 0 && saved > 0 && writes > 0);
}
