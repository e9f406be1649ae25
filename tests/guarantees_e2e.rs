//! End to end, the built binary on the real Apache Kafka broker: the guarantees of
//! docs/design.md that operators reported broken, each checked the way a user would check it
//! (the simulator's final profiles against last write wins computed from the produced
//! records alone, committed offsets, exit codes and stderr, the dead-letter topic).
//!
//! - replay: a dry run commits nothing, and the same backfill can be run again and again;
//!   more members than partitions; SIGTERM before caught up; transactional topics.
//! - dead letters: a record whose dead-letter copy Kafka can never take does not wedge the
//!   worker.
//! - last write wins: a partition moving in a cooperative rebalance does not make the worker
//!   forget what it delivered on the partitions it kept; and a partition's new owner, after
//!   a rebalance or a crash, restores what was written there (`window.restore_records`).
//!
//! Every test bounds its own runtime; the processes it started are killed when it ends,
//! however it ends (`Proc`'s Drop and parent-death signal).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{Map, Value};

use segment_sync::event::{Change, Event};
use segment_sync::tools::generate::{Generated, Generator, GeneratorConfig, Record};
use segment_sync::tools::sim::Faults;

use support::expected::{boolean_profiles, diff, profile_key, strip_identifiers, Landed};
use support::kafka::KafkaBroker;
use support::procs::{http, Proc, Sim, Worker, WorkerConfig};
use support::worker::{dlq_origin, header, produce_with, read_all};

// ---------------------------------------------------------------------------------------
// Wording users rely on.

/// The header a dead-letter record that goes without its value carries to say why
/// (docs/design.md: dead-lettered without its value, with its coordinates and a header saying
/// why).
const VALUE_MISSING_HEADER: &str = segment_sync::dlq::HEADER_VALUE_OMITTED;

/// A replay stopped (SIGTERM) before it caught up says so on stderr, with where it stopped.
const STOPPED_EARLY_WORDS: &[&str] = &["stopped before it caught up"];

// ---------------------------------------------------------------------------------------
// Bounds.

/// How long a replay of a few thousand records may take to exit by itself.
const REPLAY_EXIT: Duration = Duration::from_secs(40);
/// How long a group may take to commit the end of a topic of a few thousand records.
const CONVERGE: Duration = Duration::from_secs(60);
/// A SIGTERMed process's exit beyond its drain deadline.
const EXIT_SLACK: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------
// Setup and producing.

fn generator(users: usize, seed: u64) -> Generator {
    // In order, no repeats: every test here cuts or replays streams, and a change that
    // arrives after a newer one is only dropped while the worker remembers the newer one.
    Generator::new(GeneratorConfig {
        users,
        segments: 8,
        repeat_rate: 0.0,
        out_of_order_rate: 0.0,
        bad_rate: 0.0,
        email_only_rate: 0.1,
        seed,
    })
}

fn json_payload(g: &Generated) -> (Vec<u8>, Option<Event<'static>>) {
    match &g.record {
        Record::Valid(e) => (segment_sync::tools::encode::to_json(e), Some(e.clone())),
        Record::Invalid(e) => (segment_sync::tools::encode::to_json(e), None),
        Record::Undecodable(b) => (b.clone(), None),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("producer runtime")
}

/// Produces the records keyed by user, in order (JSON), and returns where each landed.
fn produce(brokers: &str, topic: &str, records: &[Generated]) -> Vec<Landed> {
    produce_with(&runtime(), brokers, topic, records, &json_payload)
}

/// One record to produce as it is: key, value and, when given, the partition.
struct Outgoing {
    key: Vec<u8>,
    value: Vec<u8>,
    partition: Option<i32>,
}

/// Produces the records in order with an idempotent producer and `extra` settings, and
/// returns (partition, offset) of each.
fn produce_raw(
    brokers: &str,
    topic: &str,
    records: &[Outgoing],
    extra: &[(&str, &str)],
) -> Vec<(i32, i64)> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let producer: FutureProducer = config.create().expect("test producer");
    runtime().block_on(async {
        let sends = records.iter().map(|r| {
            let producer = &producer;
            async move {
                let mut record = FutureRecord::to(topic).key(&r.key).payload(&r.value);
                if let Some(p) = r.partition {
                    record = record.partition(p);
                }
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| e)
                    .expect("produce")
            }
        });
        futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|d| (d.partition, d.offset))
            .collect()
    })
}

/// Produces the records keyed by user with a transactional producer, `per_transaction` to a
/// transaction, each committed: every partition a transaction wrote ends with its commit
/// marker, so a partition's end offset is one past the marker, not past the last record.
fn produce_transactional(
    brokers: &str,
    topic: &str,
    records: &[Generated],
    per_transaction: usize,
) -> Vec<Landed> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("transactional.id", format!("{topic}.txn"))
        .create()
        .expect("transactional producer");
    let timeout = Duration::from_secs(30);
    producer
        .init_transactions(timeout)
        .expect("init_transactions");
    let rt = runtime();
    let mut landed = Vec::with_capacity(records.len());
    for chunk in records.chunks(per_transaction) {
        producer.begin_transaction().expect("begin_transaction");
        let encoded: Vec<_> = chunk.iter().map(json_payload).collect();
        let delivered = rt.block_on(futures::future::join_all(chunk.iter().zip(&encoded).map(
            |(g, (bytes, _))| {
                let producer = &producer;
                async move {
                    producer
                        .send(
                            FutureRecord::to(topic).key(&g.key).payload(bytes),
                            Duration::from_secs(30),
                        )
                        .await
                        .map_err(|(e, _)| e)
                        .expect("transactional produce")
                }
            },
        )));
        producer
            .commit_transaction(timeout)
            .expect("commit_transaction");
        landed.extend(
            encoded
                .into_iter()
                .zip(delivered)
                .map(|((_, event), d)| Landed {
                    event,
                    partition: d.partition,
                    offset: d.offset,
                }),
        );
    }
    landed
}

/// Creates `topic` (and its `.dlq`) with `configs` and waits until every partition has a
/// leader.
fn create_topic_with(broker: &KafkaBroker, topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        broker.client_config().create().expect("admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = block_on(admin.create_topics([&new], &options)).map(|r| r.into_iter().next());
        match result {
            Ok(Some(Ok(_))) | Ok(Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists)))) => break,
            other if Instant::now() < deadline => {
                eprintln!("create topic {topic}: {other:?}; retrying");
                thread::sleep(Duration::from_millis(200));
            }
            other => panic!("cannot create topic {topic}: {other:?}"),
        }
    }
    // Already created: this waits for the leaders.
    broker.create_topic(topic, partitions);
}

fn setup(topic: &str, partitions: i32) -> (&'static KafkaBroker, tempfile::TempDir) {
    let broker = KafkaBroker::shared();
    broker.create_topic(topic, partitions);
    broker.create_topic(&format!("{topic}.dlq"), 1);
    (broker, scratch(topic))
}

fn scratch(topic: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("guarantees-{topic}-"))
        .tempdir()
        .expect("temp dir")
}

// ---------------------------------------------------------------------------------------
// Waiting and checking. Checks return `Err(problem)` so a test can report everything that
// went wrong in one failure.

fn ends(broker: &KafkaBroker, topic: &str) -> Vec<i64> {
    broker
        .end_offsets(topic)
        .into_iter()
        .map(|(_, o)| o)
        .collect()
}

fn committed(broker: &KafkaBroker, group: &str, topic: &str) -> Vec<i64> {
    broker
        .committed_offsets(group, topic)
        .into_iter()
        .map(|(_, o)| o)
        .collect()
}

/// Waits up to `timeout` for the process to exit 0.
fn exits_ok(p: &mut Proc, timeout: Duration) -> Result<ExitStatus, String> {
    let began = Instant::now();
    match p.wait_exit(timeout) {
        Some(s) if s.success() => Ok(s),
        Some(s) => Err(format!(
            "{} exited with {s} after {:.1?}\n{}",
            p.name.clone(),
            began.elapsed(),
            p.report()
        )),
        None => Err(format!(
            "{} did not exit within {timeout:?}\n{}",
            p.name.clone(),
            p.report()
        )),
    }
}

/// Braze's profiles against last write wins of `want`.
fn profiles_match(
    sim: &Sim,
    want: &BTreeMap<String, Map<String, Value>>,
    what: &str,
) -> Result<(), String> {
    let got = strip_identifiers(sim.profiles());
    let d = diff(want, &got);
    if d.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: Braze's profiles differ from last write wins ({} users expected, {} present):\n{}",
            want.len(),
            got.len(),
            d.join("\n")
        ))
    }
}

/// Waits until `group` has committed the end offsets of `topic` and the simulator has gone
/// quiet, while every process of `procs` keeps running.
fn wait_committed_to_end(
    broker: &KafkaBroker,
    group: &str,
    topic: &str,
    sim: &Sim,
    procs: &mut [&mut Proc],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last_requests = None;
    let (mut c, mut e) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            if p.exited().is_some() {
                return Err(format!(
                    "{} exited while it should run\n{}",
                    p.name.clone(),
                    p.report()
                ));
            }
        }
        e = ends(broker, topic);
        c = committed(broker, group, topic);
        if c == e {
            let requests = sim.stats().requests;
            if last_requests == Some(requests) {
                return Ok(());
            }
            last_requests = Some(requests);
        } else {
            last_requests = None;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let mut reports = String::new();
    for p in procs.iter_mut() {
        reports.push_str(&p.report());
        reports.push('\n');
    }
    Err(format!(
        "group {group} did not commit the end of {topic} within {timeout:?}: committed {c:?}, end {e:?}\n{reports}"
    ))
}

fn assert_no_problems(test: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{test}: {} problem(s):\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

/// The profiles a dry run's NDJSON requests make when applied in order, as the simulator
/// applies them: `null` removes an attribute.
fn apply_ndjson(text: &str) -> Result<BTreeMap<String, Map<String, Value>>, String> {
    let mut profiles: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let request: Value = serde_json::from_str(line)
            .map_err(|e| format!("dry-run stdout line {}: not JSON ({e}): {line:.200}", n + 1))?;
        let objects = request
            .get("attributes")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("dry-run stdout line {}: no attributes array", n + 1))?;
        for object in objects {
            let object = object
                .as_object()
                .ok_or_else(|| format!("dry-run stdout line {}: an object that is not", n + 1))?;
            let user = match (object.get("external_id"), object.get("email")) {
                (Some(Value::String(id)), _) => format!("external_id:{id}"),
                (_, Some(Value::String(m))) => format!("email:{m}"),
                _ => {
                    return Err(format!(
                        "dry-run stdout line {}: an object without identifier",
                        n + 1
                    ))
                }
            };
            let profile = profiles.entry(user).or_default();
            for (k, v) in object {
                if ["external_id", "email", "_update_existing_only"].contains(&k.as_str()) {
                    continue;
                }
                if v.is_null() {
                    profile.remove(k);
                } else {
                    profile.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Ok(profiles)
}

// ---------------------------------------------------------------------------------------
// 1. The same backfill, again and again.

/// docs/design.md: Every run starts where it is told, however often the same backfill is run
/// (offsets its group committed in an earlier run never cut it short); a dry run commits
/// nothing.
#[test]
fn replay_can_be_run_again_after_a_dry_run() {
    let topic = "g-replay-again";
    let (broker, dir) = setup(topic, 3);
    let dir = dir.path();
    let records: Vec<_> = generator(3000, 101).take(4500).collect();
    let landed = produce(&broker.bootstrap(), topic, &records);
    let want = boolean_profiles(&landed, "");
    let mut problems = Vec::new();

    // A dry run: the requests on stdout, nothing sent, nothing committed.
    let sim = Sim::start(dir, "sim-1", &[]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    // The broker answers a fetch once it has 10 MB or after a second: records arrive a
    // second after the partitions are assigned, as they do after a production broker's
    // `group.initial.rebalance.delay.ms` (3 s; this harness sets 0, so here the first fetch
    // would otherwise beat a run's first caught-up check). A run must not take "nothing
    // read yet" for "read up to what the group committed".
    for (k, v) in [
        ("fetch.min.bytes", "10000000"),
        ("fetch.wait.max.ms", "1000"),
    ] {
        cfg.properties.insert(k.into(), v.into());
    }
    let replay_group = format!("{}.replay", cfg.group_id);
    let mut dry = Worker::spawn(
        dir,
        "dry-run",
        &cfg,
        &["replay", "--from", "earliest", "--dry-run"],
    );
    match exits_ok(&mut dry.proc, REPLAY_EXIT) {
        Err(e) => problems.push(format!("the dry run: {e}")),
        Ok(_) => {
            let out = std::fs::read_to_string(&dry.proc.stdout).unwrap_or_default();
            match apply_ndjson(&out) {
                Err(e) => problems.push(e),
                Ok(dry_profiles) => {
                    let d = diff(&want, &dry_profiles);
                    if !d.is_empty() {
                        problems.push(format!(
                            "the dry run's requests (applied in order) differ from last write wins ({} users expected, {} in {} request lines):\n{}",
                            want.len(),
                            dry_profiles.len(),
                            out.lines().count(),
                            d.join("\n")
                        ));
                    }
                }
            }
        }
    }
    let stats = sim.stats();
    let sent = sim.profiles().len();
    if stats.requests != 0 || sent != 0 {
        problems.push(format!(
            "the dry run sent to Braze: {} requests, {sent} profiles",
            stats.requests
        ));
    }
    let after_dry = committed(broker, &replay_group, topic);
    if after_dry.iter().any(|&o| o >= 0) {
        problems.push(format!(
            "the dry run committed offsets for group {replay_group}: {after_dry:?} (a dry run commits nothing)"
        ));
    }

    // The real backfill, same group, same Braze workspace: every user of the log.
    let mut first = Worker::spawn(dir, "replay-1", &cfg, &["replay", "--from", "earliest"]);
    match exits_ok(&mut first.proc, REPLAY_EXIT) {
        Err(e) => problems.push(format!("the replay after the dry run: {e}")),
        Ok(_) => {
            if let Err(e) = profiles_match(&sim, &want, "the replay after the dry run") {
                problems.push(format!("{e}\n{}", first.proc.report()));
            }
        }
    }
    drop(first);
    drop(sim);

    // A new Braze workspace, the same backfill again: again every user.
    let sim2 = Sim::start(dir, "sim-2", &[]);
    let mut cfg2 = cfg.clone();
    cfg2.braze_url = sim2.url.clone();
    let mut second = Worker::spawn(dir, "replay-2", &cfg2, &["replay", "--from", "earliest"]);
    match exits_ok(&mut second.proc, REPLAY_EXIT) {
        Err(e) => problems.push(format!("the same replay run again: {e}")),
        Ok(_) => {
            if let Err(e) = profiles_match(&sim2, &want, "the same replay run again") {
                problems.push(format!("{e}\n{}", second.proc.report()));
            }
        }
    }
    assert_no_problems("replay run again after a dry run", &problems);
}

// ---------------------------------------------------------------------------------------
// 2. More replay members than partitions.

/// docs/design.md: caught up covers every partition of the replayed topics. Three members of
/// the same backfill on two partitions: one holds nothing, and the partitions are very
/// unequal, so the member holding the small one is done long before the other. Each must
/// exit 0 only once the whole backfill is in Braze, and together they deliver every user.
/// The same check covers a member that holds nothing, and one that is handed a partition
/// another member left (held by nobody meanwhile): neither may exit 0 while another
/// partition is still being replayed.
#[test]
fn replay_with_more_members_than_partitions_waits_for_every_partition() {
    let topic = "g-replay-members";
    let (broker, dir) = setup(topic, 2);
    let dir = dir.path();
    let records: Vec<_> = generator(3000, 202).take(4500).collect();
    // A user's records share a partition; one user in ten is on partition 0.
    let mut partition_of: HashMap<Vec<u8>, i32> = HashMap::new();
    let outgoing: Vec<Outgoing> = records
        .iter()
        .map(|g| {
            let next = partition_of.len();
            let partition = *partition_of
                .entry(g.key.clone())
                .or_insert(if next % 10 == 0 { 0 } else { 1 });
            Outgoing {
                key: g.key.clone(),
                value: json_payload(g).0,
                partition: Some(partition),
            }
        })
        .collect();
    let placed = produce_raw(&broker.bootstrap(), topic, &outgoing, &[]);
    let landed: Vec<Landed> = records
        .iter()
        .zip(&placed)
        .map(|(g, &(partition, offset))| Landed {
            event: json_payload(g).1,
            partition,
            offset,
        })
        .collect();
    let want = boolean_profiles(&landed, "");

    // Braze answers 429 to everything until the group has settled with one partition on
    // each of two members and the third holding none, so nothing is delivered (and no
    // member can be done) before the partitions are spread; then it is slow enough that
    // partition 1 takes seconds and partition 0 well under one.
    let sim = Sim::start(dir, "sim", &[]);
    sim.set_faults(&Faults {
        fail_next_429: u32::MAX,
        ..Faults::default()
    });
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.max_in_flight = 2;
    // A member giving up a partition waits this long for its (429-held) requests.
    cfg.drain_timeout_ms = 1500;
    let replay_group = format!("{}.replay", cfg.group_id);
    let mut members: Vec<Worker> = ["replay-a", "replay-b", "replay-c"]
        .into_iter()
        .map(|name| Worker::spawn(dir, name, &cfg, &["replay", "--from", "earliest"]))
        .collect();
    let settle = Instant::now() + Duration::from_secs(40);
    loop {
        let (state, assigned) = group_assignments(broker, &replay_group, topic);
        let mut sizes: Vec<usize> = assigned.values().map(BTreeSet::len).collect();
        sizes.sort_unstable();
        if state == "Stable" && sizes == [0, 1, 1] {
            eprintln!("replay members: group settled: {assigned:?}");
            break;
        }
        if Instant::now() > settle || members.iter_mut().any(|m| m.proc.exited().is_some()) {
            let mut reports = String::new();
            for m in members.iter_mut() {
                reports.push_str(&m.proc.report());
                reports.push('\n');
            }
            panic!(
                "setup: the three members did not settle with one partition on each of two (group {state}: {assigned:?})\n{reports}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    sim.set_faults(&Faults {
        latency_ms: 250,
        ..Faults::default()
    });

    let began = Instant::now();
    let deadline = began + Duration::from_secs(60);
    let mut problems = Vec::new();
    let mut exits: Vec<Option<(Duration, ExitStatus)>> = vec![None; members.len()];
    while exits.iter().any(Option::is_none) && Instant::now() < deadline {
        for (m, exit) in members.iter_mut().zip(exits.iter_mut()) {
            if exit.is_some() {
                continue;
            }
            let Some(status) = m.proc.exited() else {
                continue;
            };
            let at = began.elapsed();
            *exit = Some((at, status));
            if !status.success() {
                problems.push(format!(
                    "{} exited with {status} after {at:.1?}\n{}",
                    m.proc.name.clone(),
                    m.proc.report()
                ));
            } else if let Err(e) = profiles_match(
                &sim,
                &want,
                &format!(
                    "{} exited 0 after {at:.1?} before the backfill was done",
                    m.proc.name
                ),
            ) {
                problems.push(format!("{e}\n{}", m.proc.report()));
            }
        }
        thread::sleep(Duration::from_millis(25));
    }
    for (m, exit) in members.iter_mut().zip(&exits) {
        if exit.is_none() {
            problems.push(format!(
                "{} did not exit within {:?}\n{}",
                m.proc.name.clone(),
                deadline - began,
                m.proc.report()
            ));
        }
    }
    if let Err(e) = profiles_match(&sim, &want, "the union of the three members") {
        problems.push(e);
    }
    eprintln!(
        "replay members: exits {:?}",
        exits
            .iter()
            .map(|e| e.map(|(t, s)| format!("{t:.1?} {s}")))
            .collect::<Vec<_>>()
    );
    assert_no_problems("more replay members than partitions", &problems);
}

// ---------------------------------------------------------------------------------------
// 3. SIGTERM before caught up.

/// A backfill stopped before it caught up did not do its job: the exit code says so, and
/// stderr says where it stopped, so the operator knows to run it again.
#[test]
fn replay_sigterm_before_caught_up_exits_nonzero() {
    let topic = "g-replay-sigterm";
    let (broker, dir) = setup(topic, 2);
    let dir = dir.path();
    let records: Vec<_> = generator(3000, 303).take(3000).collect();
    produce(&broker.bootstrap(), topic, &records);

    let sim = Sim::start(dir, "sim", &[]);
    // 40 requests at most 2 at a time, 1.5 s each: half a minute of work.
    sim.set_faults(&Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.max_in_flight = 2;
    cfg.drain_timeout_ms = 2000;
    let replay_group = format!("{}.replay", cfg.group_id);
    let mut replay = Worker::spawn(dir, "replay", &cfg, &["replay", "--from", "earliest"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim.stats().requests == 0 {
        assert!(
            Instant::now() < deadline && replay.proc.exited().is_none(),
            "the replay sent no request to Braze\n{}",
            replay.proc.report()
        );
        thread::sleep(Duration::from_millis(20));
    }
    replay.proc.sigterm();
    let status = replay
        .proc
        .wait_exit(Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK);
    let Some(status) = status else {
        panic!(
            "the replay was still running {:?} after SIGTERM\n{}",
            Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
            replay.proc.report()
        );
    };
    let c = committed(broker, &replay_group, topic);
    let e = ends(broker, topic);
    assert!(
        c != e,
        "setup: the replay caught up before SIGTERM (committed {c:?}, end {e:?}); slow Braze down more"
    );
    let stderr = std::fs::read_to_string(&replay.proc.stderr).unwrap_or_default();
    let mut problems = Vec::new();
    if status.success() {
        problems.push(format!(
            "the replay stopped by SIGTERM before it caught up exited 0 (committed {c:?} of end {e:?}): a backfill that did not finish must not report success\n{}",
            replay.proc.report()
        ));
    }
    let lower = stderr.to_lowercase();
    if !STOPPED_EARLY_WORDS.iter().any(|w| lower.contains(w)) {
        problems.push(format!(
            "stderr does not say the replay stopped before it caught up (none of {STOPPED_EARLY_WORDS:?}); it stopped at committed {c:?} of end {e:?}\n{}",
            replay.proc.report()
        ));
    }
    assert_no_problems("replay SIGTERM before caught up", &problems);
}

// ---------------------------------------------------------------------------------------
// 4. A transactional topic.

/// Each partition of a topic written by a transactional producer ends with a commit marker:
/// the end offset is one past the marker, which no consumer ever reads. A replay must still
/// see that it has caught up, with `--until-start` and without.
#[test]
fn replay_until_start_on_a_transactional_topic_finishes() {
    let topic = "g-replay-txn";
    let (broker, dir) = setup(topic, 3);
    let dir = dir.path();
    let records: Vec<_> = generator(3000, 404).take(3000).collect();
    let landed = produce_transactional(&broker.bootstrap(), topic, &records, 1000);
    let want = boolean_profiles(&landed, "");
    // Setup: every partition ends with a marker after its last record.
    let end = ends(broker, topic);
    for (p, &end) in end.iter().enumerate() {
        let last = landed
            .iter()
            .filter(|l| l.partition == p as i32)
            .map(|l| l.offset)
            .max()
            .expect("records on every partition");
        assert!(
            end > last + 1,
            "setup: partition {p} ends at {end}, its last record is at {last}: no commit marker"
        );
    }

    // Both runs at once, each in a group and a Braze workspace of its own.
    let runs = [
        (
            "until-start",
            vec!["replay", "--from", "earliest", "--until-start"],
        ),
        ("caught-up", vec!["replay", "--from", "earliest"]),
    ];
    let mut started = Vec::new();
    for (name, args) in &runs {
        let sim = Sim::start(dir, &format!("sim-{name}"), &[]);
        let cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
        let group = format!("{topic}.{name}");
        let mut args: Vec<&str> = args.clone();
        args.extend(["--group", &group]);
        let w = Worker::spawn(dir, &format!("replay-{name}"), &cfg, &args);
        started.push((name, sim, w));
    }
    let began = Instant::now();
    let mut problems = Vec::new();
    for (name, sim, w) in started.iter_mut() {
        let left = REPLAY_EXIT.saturating_sub(began.elapsed());
        let what = format!("replay {name} of a transactional topic (end offsets {end:?})");
        match w.proc.wait_exit(left) {
            Some(s) if s.success() => {
                if let Err(e) = profiles_match(sim, &want, &what) {
                    problems.push(e);
                }
            }
            other => {
                let state = match other {
                    Some(s) => format!("exited with {s}"),
                    None => "still running".to_string(),
                };
                problems.push(format!(
                    "{what}: {state} {:.1?} after its start, with Braze holding {} of {} users\n{}",
                    began.elapsed(),
                    sim.profiles().len(),
                    want.len(),
                    w.proc.report()
                ));
            }
        }
    }
    assert_no_problems("replay of a transactional topic", &problems);
}

// ---------------------------------------------------------------------------------------
// 5. A dead-letter copy Kafka can never take.

/// The value of the undecodable record: just under librdkafka's default `message.max.bytes`
/// (1,000,000), so the record itself is produced and consumed, but its dead-letter copy with
/// the Connect headers is over the worker's producer limit.
const OVERSIZED_VALUE: usize = 999_800;

/// docs/design.md: Only a record Kafka no longer has (retention) or can never take (over
/// `message.max.bytes`) is dead-lettered without its value, with its coordinates and a
/// header saying why; nothing wedges the worker.
#[test]
fn oversized_dead_letter_record_does_not_wedge_the_worker() {
    let topic = "g-dlq-oversized";
    let broker = KafkaBroker::shared();
    // The topics take records up to 2 MB: only the worker's producer limit is too small.
    let big_topic = [("max.message.bytes", "2000000")];
    create_topic_with(broker, topic, 2, &big_topic);
    let dlq_topic = format!("{topic}.dlq");
    create_topic_with(broker, &dlq_topic, 1, &big_topic);
    let dir = scratch(topic);
    let dir = dir.path();

    let good: Vec<_> = generator(3000, 505).take(5000).collect();
    let big_key = b"oversized-record".to_vec();
    let mut outgoing: Vec<Outgoing> = good
        .iter()
        .map(|g| Outgoing {
            key: g.key.clone(),
            value: json_payload(g).0,
            partition: None,
        })
        .collect();
    let big_index = good.len() / 2;
    outgoing.insert(
        big_index,
        Outgoing {
            key: big_key.clone(),
            value: vec![b'#'; OVERSIZED_VALUE],
            partition: None,
        },
    );
    let placed = produce_raw(
        &broker.bootstrap(),
        topic,
        &outgoing,
        &[("message.max.bytes", "2000000")],
    );
    let (big_partition, big_offset) = placed[big_index];
    let landed: Vec<Landed> = outgoing
        .iter()
        .zip(&placed)
        .enumerate()
        .map(|(i, (_, &(partition, offset)))| Landed {
            event: if i == big_index {
                None
            } else {
                json_payload(&good[if i < big_index { i } else { i - 1 }]).1
            },
            partition,
            offset,
        })
        .collect();
    let want = boolean_profiles(&landed, "");

    let sim = Sim::start(dir, "sim", &[]);
    // The worker's producer keeps librdkafka's default message.max.bytes.
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.drain_timeout_ms = 5000;
    let mut w = Worker::start(dir, "w", &cfg);
    let mut problems = Vec::new();
    if let Err(e) = wait_committed_to_end(
        broker,
        &cfg.group_id,
        topic,
        &sim,
        &mut [&mut w.proc],
        Duration::from_secs(45),
    ) {
        problems.push(format!(
            "with an undecodable record of {OVERSIZED_VALUE} bytes at {topic}[{big_partition}]@{big_offset}: {e}"
        ));
    }
    if let Err(e) = profiles_match(&sim, &want, "the good records around the oversized one") {
        problems.push(e);
    }

    let dead = read_all(&broker.bootstrap(), &dlq_topic, 1);
    let copies: Vec<_> = dead
        .iter()
        .filter(|m| {
            header(m, "__connect.errors.topic").as_deref() == Some(topic)
                && dlq_origin(m) == (big_partition, big_offset)
        })
        .collect();
    match copies.first() {
        None => problems.push(format!(
            "the dead-letter topic holds no record for {topic}[{big_partition}]@{big_offset} ({} records in it)",
            dead.len()
        )),
        Some(m) => {
            let value_len = m.payload().map_or(0, <[u8]>::len);
            if value_len != 0 {
                problems.push(format!(
                    "the dead-letter record of the oversized record carries a value of {value_len} bytes"
                ));
            }
            let names: Vec<String> = rdkafka::message::Headers::iter(
                m.headers().expect("the Connect headers were found"),
            )
            .map(|h| h.key.to_string())
            .collect();
            let why = names.iter().find(|n| is_value_missing_header(n));
            match why {
                None => problems.push(format!(
                    "the dead-letter record of the oversized record has no header saying why its value is missing ({}); headers: {names:?}",
                    VALUE_MISSING_HEADER
                )),
                Some(name) => {
                    if header(m, name).is_none_or(|v| v.is_empty()) {
                        problems.push(format!("the header {name} is empty"));
                    }
                }
            }
        }
    }

    // Not wedged: it still stops cleanly.
    w.proc.sigterm();
    let within = Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK;
    if let Err(e) = exits_ok(&mut w.proc, within) {
        problems.push(format!("after SIGTERM: {e}"));
    }
    assert_no_problems("oversized dead-letter record", &problems);
}

fn is_value_missing_header(name: &str) -> bool {
    name == VALUE_MISSING_HEADER
}

// ---------------------------------------------------------------------------------------
// 6. Scale-out must not make a worker forget the partitions it keeps.

/// One change of one segment for user `user`.
fn membership(
    user: usize,
    change: Change,
    sequence: i64,
    occurred_at: i64,
    tag: &str,
) -> Generated {
    let id = format!("user-{user:05}");
    Generated {
        key: id.clone().into_bytes(),
        record: Record::Valid(Event {
            event_id: format!("{tag}-{user}").into(),
            external_id: Some(id.into()),
            email: None,
            segment_id: "seg_vip".into(),
            segment_name: None,
            change,
            occurred_at,
            sequence: Some(sequence),
            attributes: Vec::new(),
        }),
    }
}

/// The partitions of `topic` each member of `group` is assigned, by member id, as the
/// group coordinator knows them (classic protocol: the consumer protocol's assignment).
fn group_assignments(
    broker: &KafkaBroker,
    group: &str,
    topic: &str,
) -> (String, BTreeMap<String, BTreeSet<i32>>) {
    let client: BaseConsumer = broker.client_config().create().expect("admin consumer");
    let Ok(list) = client.fetch_group_list(Some(group), Duration::from_secs(5)) else {
        return ("unknown".into(), BTreeMap::new());
    };
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
        return ("absent".into(), BTreeMap::new());
    };
    let members = info
        .members()
        .iter()
        .map(|m| {
            let partitions = m
                .assignment()
                .and_then(|a| assigned_partitions(a, topic))
                .unwrap_or_default();
            (m.id().to_string(), partitions)
        })
        .collect();
    (info.state().to_string(), members)
}

/// Parses Kafka's ConsumerProtocolAssignment (version, [topic, [partition]], user data).
fn assigned_partitions(bytes: &[u8], topic: &str) -> Option<BTreeSet<i32>> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }
        fn i16(&mut self) -> Option<i16> {
            Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
        }
        fn i32(&mut self) -> Option<i32> {
            Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
        }
    }
    let mut r = Reader(bytes);
    let mut out = BTreeSet::new();
    r.i16()?;
    for _ in 0..r.i32()?.max(0) {
        let len = r.i16()?.max(0) as usize;
        let name = String::from_utf8_lossy(r.take(len)?).into_owned();
        for _ in 0..r.i32()?.max(0) {
            let p = r.i32()?;
            if name == topic {
                out.insert(p);
            }
        }
    }
    Some(out)
}

fn ready(w: &Worker) -> bool {
    http()
        .get(format!("{}/readyz", w.base().unwrap_or("http://0.0.0.0:9")))
        .send()
        .is_ok_and(|r| r.status().is_success())
}

/// docs/design.md: An event older than what was already delivered for the same (user, segment)
/// is dropped as stale. A partition moving to a new member must not make the old member
/// forget what it delivered on the partitions it keeps: a change older than that, arriving
/// on a kept partition, is stale. (The moved partition's new owner has no memory of it, so
/// its users may end either way.)
#[test]
fn older_change_after_scale_out_is_stale_on_kept_partitions() {
    let topic = "g-stale-after-scale-out";
    let (broker, dir) = setup(topic, 3);
    let dir = dir.path();
    let users = 3000;
    let base = segment_sync::tools::generate::BASE_TIME_MS;
    let entered: Vec<_> = (0..users)
        .map(|u| membership(u, Change::Entered, 10, base + u as i64, "entered"))
        .collect();

    let sim = Sim::start(dir, "sim", &[]);
    let cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    let mut w1 = Worker::start(dir, "w1", &cfg);
    let landed_entered = produce(&broker.bootstrap(), topic, &entered);
    wait_committed_to_end(
        broker,
        &cfg.group_id,
        topic,
        &sim,
        &mut [&mut w1.proc],
        CONVERGE,
    )
    .unwrap_or_else(|e| panic!("setup: the first worker: {e}"));
    profiles_match(
        &sim,
        &boolean_profiles(&landed_entered, ""),
        "setup: ENTERED delivered",
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let (_, before) = group_assignments(broker, &cfg.group_id, topic);
    let w1_id = match before.iter().find(|(_, ps)| ps.len() == 3) {
        Some((id, _)) if before.len() == 1 => id.clone(),
        _ => panic!("setup: the first worker should hold all 3 partitions alone: {before:?}"),
    };

    // A second member joins; the cooperative rebalance moves one partition to it.
    let mut w2 = Worker::start(dir, "w2", &cfg);
    let deadline = Instant::now() + Duration::from_secs(45);
    let kept = loop {
        let (state, members) = group_assignments(broker, &cfg.group_id, topic);
        let all: BTreeSet<i32> = members.values().flatten().copied().collect();
        if state == "Stable"
            && members.len() == 2
            && members.values().all(|ps| !ps.is_empty())
            && all.len() == 3
            && ready(&w1)
            && ready(&w2)
        {
            if let Some(kept) = members.get(&w1_id) {
                break kept.clone();
            }
            panic!("setup: the first worker left the group: {members:?}");
        }
        assert!(
            Instant::now() < deadline && w1.proc.exited().is_none() && w2.proc.exited().is_none(),
            "setup: the group did not settle with both members assigned: {state} {members:?}\n{}\n{}",
            w1.proc.report(),
            w2.proc.report()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !kept.is_empty() && kept.len() < 3,
        "setup: the first worker should keep some partitions and give up one: {kept:?}"
    );

    // An older change (sequence 5 < 10, though computed later) for every user.
    let exited: Vec<_> = (0..users)
        .map(|u| membership(u, Change::Exited, 5, base + 100_000 + u as i64, "exited"))
        .collect();
    let landed_exited = produce(&broker.bootstrap(), topic, &exited);
    wait_committed_to_end(
        broker,
        &cfg.group_id,
        topic,
        &sim,
        &mut [&mut w1.proc, &mut w2.proc],
        CONVERGE,
    )
    .unwrap_or_else(|e| panic!("after the older changes: {e}"));

    // Users whose records are on a partition the first worker kept.
    let on_kept: BTreeSet<String> = landed_entered
        .iter()
        .chain(&landed_exited)
        .filter(|l| kept.contains(&l.partition))
        .filter_map(|l| l.event.as_ref().and_then(profile_key))
        .collect();
    let profiles = sim.profiles();
    let wrong: Vec<String> = on_kept
        .iter()
        .filter(|u| profiles.get(*u).and_then(|p| p.get("seg_vip")) != Some(&Value::Bool(true)))
        .cloned()
        .collect();
    let stale = w1.metric("segment_sync_events_stale_total");
    assert!(
        wrong.is_empty(),
        "{} of the {} users on partitions {kept:?}, which the first worker kept through the rebalance, lost seg_vip = true (sequence 10) to an older EXITED (sequence 5); the first worker counted {stale:?} stale events. First: {:?}\n{}",
        wrong.len(),
        on_kept.len(),
        wrong.iter().take(5).map(|u| (u, profiles.get(u))).collect::<Vec<_>>(),
        w1.proc.report()
    );
}

// ---------------------------------------------------------------------------------------
// 7. Restore on assignment: a partition's new owner (after a rebalance or a crash) knows
//    what was written, so an older change arriving late is stale there too.

/// How a partition changes owner in `older_change_after_a_new_owner`.
#[derive(Debug, Clone, Copy)]
enum Handover {
    /// A second worker joins and the cooperative rebalance moves a partition to it.
    ScaleOut,
    /// The only worker is killed with -9 and started again.
    Crash,
}

/// What became of the users after the older changes.
struct Outcome {
    /// Users whose records are on a partition that changed owner.
    moved: BTreeSet<String>,
    /// Users (of any partition) whose seg_vip is not the newer `true`.
    wrong: BTreeSet<String>,
    stale: Vec<Option<f64>>,
    restored: Vec<Option<f64>>,
    reports: String,
}

/// ENTERED (sequence 10) for every user is delivered and committed; a partition changes owner
/// (`handover`); then EXITED (sequence 5, computed later) arrives for every user. Deterministic
/// without the restore: the new owner has nothing in memory, so each older change is written.
fn older_change_after_a_new_owner(
    topic: &str,
    handover: Handover,
    restore_records: Option<u64>,
) -> Outcome {
    let (broker, dir) = setup(topic, 3);
    let dir = dir.path();
    let users = 3000;
    let base = segment_sync::tools::generate::BASE_TIME_MS;
    let entered: Vec<_> = (0..users)
        .map(|u| membership(u, Change::Entered, 10, base + u as i64, "entered"))
        .collect();
    let sim = Sim::start(dir, "sim", &[]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.restore_records = restore_records;
    let mut w1 = Worker::start(dir, "w1", &cfg);
    let landed_entered = produce(&broker.bootstrap(), topic, &entered);
    wait_committed_to_end(
        broker,
        &cfg.group_id,
        topic,
        &sim,
        &mut [&mut w1.proc],
        CONVERGE,
    )
    .unwrap_or_else(|e| panic!("setup: the first worker: {e}"));
    profiles_match(
        &sim,
        &boolean_profiles(&landed_entered, ""),
        "setup: ENTERED delivered",
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let (mut workers, moved_partitions): (Vec<Worker>, BTreeSet<i32>) = match handover {
        Handover::ScaleOut => {
            let (_, before) = group_assignments(broker, &cfg.group_id, topic);
            let w1_id = match before.iter().find(|(_, ps)| ps.len() == 3) {
                Some((id, _)) if before.len() == 1 => id.clone(),
                _ => panic!("setup: the first worker should hold all 3 partitions: {before:?}"),
            };
            let mut w2 = Worker::start(dir, "w2", &cfg);
            let deadline = Instant::now() + Duration::from_secs(45);
            let moved = loop {
                let (state, members) = group_assignments(broker, &cfg.group_id, topic);
                let all: BTreeSet<i32> = members.values().flatten().copied().collect();
                if state == "Stable"
                    && members.len() == 2
                    && members.values().all(|ps| !ps.is_empty())
                    && all.len() == 3
                    && ready(&w1)
                    && ready(&w2)
                {
                    let kept = members.get(&w1_id).cloned().unwrap_or_default();
                    break all.difference(&kept).copied().collect();
                }
                assert!(
                    Instant::now() < deadline
                        && w1.proc.exited().is_none()
                        && w2.proc.exited().is_none(),
                    "setup: the group did not settle with both members assigned: {state} {members:?}\n{}\n{}",
                    w1.proc.report(),
                    w2.proc.report()
                );
                thread::sleep(Duration::from_millis(100));
            };
            (vec![w1, w2], moved)
        }
        Handover::Crash => {
            w1.proc.sigkill();
            let _ = w1.proc.wait_exit(Duration::from_secs(10));
            let w2 = Worker::start(dir, "w1-again", &cfg);
            (vec![w2], (0..3).collect())
        }
    };
    assert!(
        !moved_partitions.is_empty(),
        "setup: no partition changed owner"
    );

    let exited: Vec<_> = (0..users)
        .map(|u| membership(u, Change::Exited, 5, base + 100_000 + u as i64, "exited"))
        .collect();
    let landed_exited = produce(&broker.bootstrap(), topic, &exited);
    {
        let mut procs: Vec<&mut Proc> = workers.iter_mut().map(|w| &mut w.proc).collect();
        wait_committed_to_end(broker, &cfg.group_id, topic, &sim, &mut procs, CONVERGE)
            .unwrap_or_else(|e| panic!("after the older changes: {e}"));
    }

    let all: BTreeSet<String> = landed_entered
        .iter()
        .filter_map(|l| l.event.as_ref().and_then(profile_key))
        .collect();
    let moved = landed_entered
        .iter()
        .chain(&landed_exited)
        .filter(|l| moved_partitions.contains(&l.partition))
        .filter_map(|l| l.event.as_ref().and_then(profile_key))
        .collect();
    let profiles = sim.profiles();
    let wrong = all
        .into_iter()
        .filter(|u| profiles.get(u).and_then(|p| p.get("seg_vip")) != Some(&Value::Bool(true)))
        .collect();
    let mut reports = String::new();
    for w in workers.iter_mut() {
        reports.push_str(&w.proc.report());
        reports.push('\n');
    }
    Outcome {
        moved,
        wrong,
        stale: workers
            .iter()
            .map(|w| w.metric("segment_sync_events_stale_total"))
            .collect(),
        restored: workers
            .iter()
            .map(|w| w.metric("segment_sync_restore_records_total"))
            .collect(),
        reports,
    }
}

fn assert_none_wrong(what: &str, o: &Outcome) {
    assert!(
        o.wrong.is_empty(),
        "{what}: {} of the users ({} on partitions that changed owner) lost seg_vip = true (sequence 10) to an older EXITED (sequence 5); stale counted {:?}, records restored {:?}. First: {:?}\n{}",
        o.wrong.len(),
        o.moved.len(),
        o.stale,
        o.restored,
        o.wrong.iter().take(5).collect::<Vec<_>>(),
        o.reports
    );
}

/// Issue 19: after a scale-out, the moved partition's new owner restores what was written
/// there, so every older change is stale on every partition.
#[test]
fn older_change_after_a_partition_moves_is_stale_on_its_new_owner() {
    let o = older_change_after_a_new_owner("g-restore-scale-out", Handover::ScaleOut, None);
    assert!(!o.moved.is_empty());
    assert_none_wrong("after a partition moved", &o);
}

/// Issue 19: a worker killed with -9 and started again restores what it had written.
#[test]
fn older_change_after_a_crash_and_restart_is_stale() {
    let o = older_change_after_a_new_owner("g-restore-crash", Handover::Crash, None);
    assert_none_wrong("after kill -9 and a restart", &o);
}

/// The two scenarios above with `window.restore_records = 0`: every user of a partition that
/// changed owner ends wrong, which shows the restore is what holds them.
#[test]
fn without_the_restore_every_moved_user_ends_with_the_older_change() {
    for (topic, handover) in [
        ("g-no-restore-scale-out", Handover::ScaleOut),
        ("g-no-restore-crash", Handover::Crash),
    ] {
        let o = older_change_after_a_new_owner(topic, handover, Some(0));
        assert!(!o.moved.is_empty(), "{handover:?}: nothing moved");
        assert_eq!(
            o.wrong,
            o.moved,
            "{handover:?}: without the restore exactly the moved users should be wrong ({} moved, {} wrong)\n{}",
            o.moved.len(),
            o.wrong.len(),
            o.reports
        );
        assert_eq!(o.restored.iter().flatten().sum::<f64>(), 0.0);
    }
}
