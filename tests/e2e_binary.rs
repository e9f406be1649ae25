//! End to end, the built binary: `segment-sync run` / `replay` worker processes and a
//! `segment-sync braze-sim` process, on the real Apache Kafka broker of this test binary
//! (and once on librdkafka's mock cluster, for fault injection). Each test checks the
//! simulator's final profiles against the last-write-wins state computed from the produced
//! records alone, and that the group committed exactly the end offsets.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use segment_sync::decode::{RegistryClient, SCHEMA};
use segment_sync::event::{AttrValue, Change, Event};
use segment_sync::tools::generate::{Generated, Generator, GeneratorConfig, Record};
use segment_sync::tools::sim::Faults;

use support::expected::{boolean_profiles, diff, profile_key, strip_identifiers, Landed};
use support::kafka::KafkaBroker;
use support::procs::{Proc, Sim, Worker, WorkerConfig};
use support::registry::Registry;
use support::worker::{produce_with, Payload};

/// How long a group may take to settle everything it was given.
const CONVERGE: Duration = Duration::from_secs(90);
/// A SIGTERMed worker's exit: its drain deadline plus closing the consumer.
const EXIT_SLACK: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------
// Kafka: the real broker or the mock cluster, as the tests need it.

/// Offsets of one topic, whichever cluster holds it.
trait Cluster {
    fn brokers(&self) -> String;
    fn ends(&self, topic: &str) -> Vec<i64>;
    /// -1 where the group has committed nothing.
    fn committed(&self, group: &str, topic: &str) -> Vec<i64>;
}

impl Cluster for KafkaBroker {
    fn brokers(&self) -> String {
        self.bootstrap()
    }
    fn ends(&self, topic: &str) -> Vec<i64> {
        self.end_offsets(topic)
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }
    fn committed(&self, group: &str, topic: &str) -> Vec<i64> {
        self.committed_offsets(group, topic)
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }
}

struct Mock {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    partitions: i32,
}

impl Cluster for Mock {
    fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
    fn ends(&self, topic: &str) -> Vec<i64> {
        support::worker::end_offsets(&self.brokers(), topic, self.partitions)
    }
    fn committed(&self, group: &str, topic: &str) -> Vec<i64> {
        support::worker::committed(&self.brokers(), group, topic, self.partitions)
    }
}

/// Records not committed by `group`: an upper bound of what a member killed now can have
/// read, and maybe delivered, without committing.
fn uncommitted(cluster: &dyn Cluster, group: &str, topic: &str) -> (Vec<i64>, i64) {
    let committed = cluster.committed(group, topic);
    let ends = cluster.ends(topic);
    let n = ends
        .iter()
        .zip(&committed)
        .map(|(e, c)| (e - (*c).max(0)).max(0))
        .sum();
    (committed, n)
}

// ---------------------------------------------------------------------------------------
// Producing.

/// `misordered`: exact repeats and changes delivered after a newer one. A worker drops those
/// only while it remembers the newer change (docs/design.md: per-key order is the upstream's
/// promise), so streams that a restart, a kill or a partition move cuts in two must not
/// carry them: the process after the cut would rightly apply an old change.
fn generator(users: usize, seed: u64, misordered: bool) -> Generator {
    let rate = if misordered { 0.05 } else { 0.0 };
    Generator::new(GeneratorConfig {
        users,
        segments: 8,
        repeat_rate: rate,
        out_of_order_rate: rate / 2.0,
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

/// Produces the records keyed by user, in order, and returns where each landed with the
/// event it carries as the worker should read it (`payload` gives both).
fn produce(
    brokers: &str,
    topic: &str,
    records: &[Generated],
    payload: &Payload<'_>,
) -> Vec<Landed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("producer runtime");
    produce_with(&rt, brokers, topic, records, payload)
}

/// Produces `waves` waves of `per_wave` records from `gen` on a thread, `gap` apart;
/// `done` counts the waves Kafka has acknowledged.
fn produce_in_waves(
    brokers: String,
    topic: String,
    mut gen: Generator,
    waves: usize,
    per_wave: usize,
    gap: Duration,
    done: Arc<AtomicUsize>,
) -> thread::JoinHandle<Vec<Landed>> {
    thread::spawn(move || {
        let mut landed = Vec::new();
        for _ in 0..waves {
            let wave: Vec<_> = gen.by_ref().take(per_wave).collect();
            landed.extend(produce(&brokers, &topic, &wave, &json_payload));
            done.fetch_add(1, Ordering::SeqCst);
            thread::sleep(gap);
        }
        landed
    })
}

fn wait_for_waves(done: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the producer thread is stuck");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Waiting and checking.

/// Waits until `group` has committed the end offsets of `topic` and the simulator has gone
/// quiet. Panics with the offsets and every process's stderr tail if it does not, or if a
/// process that should run has exited.
fn wait_converged(
    cluster: &dyn Cluster,
    group: &str,
    topic: &str,
    sim: &mut Sim,
    procs: &mut [&mut Proc],
) {
    let deadline = Instant::now() + CONVERGE;
    let mut last_requests = None;
    let (mut committed, mut ends) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            if p.exited().is_some() {
                panic!(
                    "a process exited while it should be running\n{}",
                    p.report()
                );
            }
        }
        ends = cluster.ends(topic);
        committed = cluster.committed(group, topic);
        if committed == ends {
            let requests = sim.stats().requests;
            if last_requests == Some(requests) {
                return;
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
    panic!(
        "group {group} did not commit the end of {topic} within {CONVERGE:?}: committed {committed:?}, end {ends:?}\n{reports}{}",
        sim.proc.report()
    );
}

fn assert_profiles(sim: &Sim, landed: &[Landed], what: &str) {
    let want = boolean_profiles(landed, "");
    let got = strip_identifiers(sim.profiles());
    let d = diff(&want, &got);
    assert!(
        d.is_empty(),
        "{what}: Braze's profiles differ from last write wins ({} users expected, {} present):\n{}",
        want.len(),
        got.len(),
        d.join("\n")
    );
}

fn assert_committed_to_end(cluster: &dyn Cluster, group: &str, topic: &str) {
    assert_eq!(
        cluster.committed(group, topic),
        cluster.ends(topic),
        "group {group}: committed offsets are the end offsets of {topic}"
    );
}

/// SIGTERM, then the exit must be clean and within `within`; returns how long it took.
fn stop_gracefully(w: &mut Worker, within: Duration) -> Duration {
    let began = Instant::now();
    w.proc.sigterm();
    let status = w.proc.wait_exit(within);
    let took = began.elapsed();
    match status {
        Some(s) if s.success() => took,
        Some(s) => panic!("exited with {s} after SIGTERM\n{}", w.proc.report()),
        None => panic!(
            "still running {within:?} after SIGTERM\n{}",
            w.proc.report()
        ),
    }
}

/// `consumed` from the worker's last log line ("stopped"), for a process that has exited.
fn consumed_from_log(p: &Proc) -> Option<u64> {
    let text = std::fs::read_to_string(&p.stderr).ok()?;
    text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let fields = v.get("fields").unwrap_or(&v);
        if fields.get("message")?.as_str()? != "stopped" {
            return None;
        }
        fields.get("consumed")?.as_u64()
    })
}

fn consumed(w: &Worker) -> u64 {
    w.metric("segment_sync_events_consumed_total")
        .unwrap_or_else(|| panic!("{}: /metrics does not answer", w.proc.name)) as u64
}

fn valid(landed: &[Landed]) -> usize {
    landed.iter().filter(|l| l.event.is_some()).count()
}

fn setup(topic: &str, partitions: i32) -> (&'static KafkaBroker, tempfile::TempDir) {
    let broker = KafkaBroker::shared();
    broker.create_topic(topic, partitions);
    broker.create_topic(&format!("{topic}.dlq"), 1);
    let dir = tempfile::Builder::new()
        .prefix(&format!("e2e-{topic}-"))
        .tempdir()
        .expect("temp dir");
    (broker, dir)
}

// ---------------------------------------------------------------------------------------
// 1. One worker, SIGTERM, restart: it resumes from its committed offsets.

fn resume_after_sigterm(format: &str, topic: &str) {
    let (broker, dir) = setup(topic, 3);
    let dir = dir.path();
    let mut sim = Sim::start(dir, "sim", &[]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.format = format.into();
    let registry = (format == "avro-confluent").then(Registry::start);
    let schema_id = registry.as_ref().map(|r| {
        cfg.schema_registry_url = r.url.clone();
        RegistryClient::new(&r.url)
            .register(&format!("{topic}-value"), SCHEMA)
            .expect("registering the schema over HTTP")
    });
    let payload = |g: &Generated| match (&g.record, schema_id) {
        (Record::Valid(e), Some(id)) => (
            segment_sync::tools::encode::to_confluent(id, e),
            Some(e.clone()),
        ),
        _ => json_payload(g),
    };

    let mut gen = generator(2000, 11, false);
    let first: Vec<_> = gen.by_ref().take(4000).collect();
    let mut landed = produce(&broker.bootstrap(), topic, &first, &payload);

    let mut w1 = Worker::start(dir, "w1", &cfg);
    wait_converged(broker, &cfg.group_id, topic, &mut sim, &mut [&mut w1.proc]);
    assert_profiles(&sim, &landed, "first stream");
    assert_eq!(consumed(&w1), 4000);
    let after_first = sim.stats();
    let took = stop_gracefully(
        &mut w1,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );

    let second: Vec<_> = gen.by_ref().take(300).collect();
    let landed_second = produce(&broker.bootstrap(), topic, &second, &payload);
    landed.extend(landed_second.iter().cloned());

    let mut w2 = Worker::start(dir, "w2", &cfg);
    wait_converged(broker, &cfg.group_id, topic, &mut sim, &mut [&mut w2.proc]);
    assert_profiles(&sim, &landed, "both streams");
    assert_committed_to_end(broker, &cfg.group_id, topic);
    // Resumed at the committed offsets: only the second stream was read again...
    assert_eq!(
        consumed(&w2),
        300,
        "the restarted worker read exactly the second stream"
    );
    // ...and only it reached Braze: at most one object per event of it.
    let after_second = sim.stats();
    let new_objects = after_second.objects_received - after_first.objects_received;
    assert!(
        new_objects >= 1 && new_objects <= valid(&landed_second) as u64,
        "objects after the restart: {new_objects}, events of the second stream: {}",
        valid(&landed_second)
    );
    stop_gracefully(
        &mut w2,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    eprintln!(
        "e2e resume {format}: 4000 + 300 events, 3 partitions, objects {} then +{new_objects}, SIGTERM exit in {took:.1?}",
        after_first.objects_received
    );
    if let Some(r) = registry {
        assert!(r.fetches() >= 1, "the worker fetched the schema by id");
    }
}

#[test]
fn json_worker_resumes_from_its_commits_after_sigterm() {
    resume_after_sigterm("json", "e2e-resume-json");
}

#[test]
fn avro_confluent_worker_resumes_from_its_commits_after_sigterm() {
    resume_after_sigterm("avro-confluent", "e2e-resume-avro");
}

// ---------------------------------------------------------------------------------------
// 2. Scale-out: two workers share six partitions, a third joins mid-stream, one leaves.

#[test]
fn a_group_of_processes_scales_out_and_in_mid_stream() {
    let topic = "e2e-scale";
    let (broker, dir) = setup(topic, 6);
    let dir = dir.path();
    let mut sim = Sim::start(dir, "sim", &[]);
    let cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);

    let done = Arc::new(AtomicUsize::new(0));
    let producer = produce_in_waves(
        broker.bootstrap(),
        topic.into(),
        generator(3000, 22, false),
        8,
        600,
        Duration::from_millis(500),
        done.clone(),
    );
    let mut a = Worker::spawn(dir, "a", &cfg, &["run"]);
    let mut b = Worker::spawn(dir, "b", &cfg, &["run"]);
    a.wait_ready(Duration::from_secs(60));
    b.wait_ready(Duration::from_secs(60));

    wait_for_waves(&done, 3);
    let mut c = Worker::start(dir, "c", &cfg);
    wait_for_waves(&done, 5);
    let b_before = consumed(&b);
    stop_gracefully(
        &mut b,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    let b_consumed = consumed_from_log(&b.proc).unwrap_or(b_before);

    let landed = producer.join().expect("producer thread");
    wait_converged(
        broker,
        &cfg.group_id,
        topic,
        &mut sim,
        &mut [&mut a.proc, &mut c.proc],
    );
    assert_profiles(&sim, &landed, "scale-out");
    assert_committed_to_end(broker, &cfg.group_id, topic);
    let (a_consumed, c_consumed) = (consumed(&a), consumed(&c));
    assert!(
        a_consumed > 0 && b_consumed > 0 && c_consumed > 0,
        "every member got partitions: a {a_consumed}, b {b_consumed}, c {c_consumed}"
    );
    let total = landed.len() as u64;
    let read = a_consumed + b_consumed + c_consumed;
    assert!(read >= total, "read {read} of {total} records");
    eprintln!(
        "e2e scale: {total} events in 8 waves, 6 partitions, consumed a {a_consumed} b {b_consumed} c {c_consumed} (read twice: {}), objects {}",
        read - total,
        sim.stats().objects_received
    );
    stop_gracefully(
        &mut a,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    stop_gracefully(
        &mut c,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
}

// ---------------------------------------------------------------------------------------
// 3. Crash: kill -9 members of a two-worker group mid-stream, restart them.

struct CrashOutcome {
    kills: usize,
    events: usize,
    objects: u64,
    reference_objects: u64,
    /// Per kill: records the group had not committed at that moment.
    uncommitted_at_kills: Vec<i64>,
}

/// Two workers in a group, a third process in a group of its own that is never killed (the
/// reference: what a clean run of the same stream sends), and a stream in waves during
/// which members are killed with -9 and restarted. `during_kill` runs just before each kill
/// (fault injection on the mock cluster).
fn crash_scenario(
    cluster: &dyn Cluster,
    topic: &str,
    dir: &Path,
    during_kill: &dyn Fn(usize),
) -> CrashOutcome {
    let mut sim = Sim::start(dir, "sim", &[]);
    let mut reference_sim = Sim::start(dir, "reference-sim", &[]);
    let cfg = WorkerConfig::new(&cluster.brokers(), topic, &sim.url);
    let mut reference_cfg = cfg.clone();
    reference_cfg.group_id = format!("{topic}.reference");
    reference_cfg.braze_url = reference_sim.url.clone();

    let waves = 10;
    let done = Arc::new(AtomicUsize::new(0));
    let producer = produce_in_waves(
        cluster.brokers(),
        topic.into(),
        generator(2000, 33, false),
        waves,
        400,
        Duration::from_millis(400),
        done.clone(),
    );
    let mut reference = Worker::spawn(dir, "reference", &reference_cfg, &["run"]);
    let mut members = [
        Worker::spawn(dir, "a0", &cfg, &["run"]),
        Worker::spawn(dir, "b0", &cfg, &["run"]),
    ];
    for m in members.iter_mut() {
        m.wait_ready(Duration::from_secs(60));
    }
    reference.wait_ready(Duration::from_secs(60));

    let mut uncommitted_at_kills = Vec::new();
    for (kill, (victim, after_wave)) in [(0usize, 2usize), (1, 4), (0, 6)].into_iter().enumerate() {
        wait_for_waves(&done, after_wave);
        during_kill(kill);
        let (_, before) = uncommitted(cluster, &cfg.group_id, topic);
        members[victim].proc.sigkill();
        // Records produced after the kill were never read by the victim; counting them
        // keeps the bound an upper bound whatever the order of these two reads.
        let (_, after) = uncommitted(cluster, &cfg.group_id, topic);
        uncommitted_at_kills.push(before.max(after));
        let name = format!("{}{}", ["a", "b"][victim], kill + 1);
        members[victim] = Worker::start(dir, &name, &cfg);
    }

    let landed = producer.join().expect("producer thread");
    {
        let [m0, m1] = &mut members;
        wait_converged(
            cluster,
            &cfg.group_id,
            topic,
            &mut sim,
            &mut [&mut m0.proc, &mut m1.proc],
        );
    }
    wait_converged(
        cluster,
        &reference_cfg.group_id,
        topic,
        &mut reference_sim,
        &mut [&mut reference.proc],
    );
    assert_profiles(&sim, &landed, "after kill -9 and restarts");
    assert_profiles(&reference_sim, &landed, "the reference run");
    assert_committed_to_end(cluster, &cfg.group_id, topic);
    for m in members.iter_mut() {
        stop_gracefully(m, Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK);
    }
    stop_gracefully(
        &mut reference,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    CrashOutcome {
        kills: uncommitted_at_kills.len(),
        events: landed.len(),
        objects: sim.stats().objects_received,
        reference_objects: reference_sim.stats().objects_received,
        uncommitted_at_kills,
    }
}

/// The duplicates Braze received beyond the clean run are bounded by what the killed
/// members could have delivered without committing: each extra object carries at least one
/// record read again after a kill, and a record read again was not committed at the kill.
fn report_and_bound(what: &str, o: &CrashOutcome) {
    let bound: i64 = o.uncommitted_at_kills.iter().sum();
    let extra = o.objects as i64 - o.reference_objects as i64;
    eprintln!(
        "e2e crash ({what}): {} events, {} kills, objects {} vs clean reference {} => {extra} beyond the clean run; uncommitted records at the kills {:?} (bound {bound})",
        o.events, o.kills, o.objects, o.reference_objects, o.uncommitted_at_kills
    );
    assert!(
        extra <= bound,
        "{what}: {extra} objects beyond the clean run, more than the {bound} records uncommitted at the kills"
    );
}

#[test]
fn kill_9_of_group_members_loses_nothing_on_the_real_broker() {
    let topic = "e2e-crash";
    let (broker, dir) = setup(topic, 4);
    let outcome = crash_scenario(broker, topic, dir.path(), &|_| {});
    report_and_bound("real broker", &outcome);
}

#[test]
fn kill_9_with_commit_and_fetch_errors_loses_nothing_on_the_mock_cluster() {
    let topic = "e2e-crash-mock";
    let partitions = 4;
    let mock = Mock {
        cluster: MockCluster::new(1).expect("mock cluster"),
        partitions,
    };
    mock.cluster
        .create_topic(topic, partitions, 1)
        .expect("topic");
    mock.cluster
        .create_topic(&format!("{topic}.dlq"), 1, 1)
        .expect("dlq topic");
    let dir = tempfile::tempdir().expect("temp dir");
    let outcome = crash_scenario(&mock, topic, dir.path(), &|kill| {
        // Around each kill the survivors' commits and fetches fail for a while: commits must
        // be retried, not skipped, and nothing read may be lost.
        mock.cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 4],
        );
        let fetch_error = if kill % 2 == 0 {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION
        } else {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT
        };
        mock.cluster
            .request_errors(RDKafkaApiKey::Fetch, &[fetch_error; 3]);
    });
    report_and_bound("mock cluster with faults", &outcome);
}

// ---------------------------------------------------------------------------------------
// 4. Graceful shutdown while Braze is slow.

#[test]
fn sigterm_while_braze_is_slow_exits_within_the_drain_deadline_having_committed_what_settled() {
    let topic = "e2e-slow";
    let (broker, dir) = setup(topic, 2);
    let dir = dir.path();
    let latency_ms = 1500;
    let mut sim = Sim::start(dir, "sim", &["--latency-ms", &latency_ms.to_string()]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.max_in_flight = 4;
    let mut gen = generator(4000, 44, false);

    // Phase 1: more than the deadline allows (about 2,600 users, 300 objects per 1.5 s).
    cfg.drain_timeout_ms = 2500;
    let records: Vec<_> = gen.by_ref().take(3000).collect();
    let mut landed = produce(&broker.bootstrap(), topic, &records, &json_payload);
    let mut w1 = Worker::start(dir, "w1", &cfg);
    wait_in_flight(&w1);
    let took = stop_gracefully(
        &mut w1,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    let committed = broker.committed(&cfg.group_id, topic);
    let ends = broker.ends(topic);
    assert!(
        committed.iter().zip(&ends).any(|(c, e)| c < e),
        "the setup must leave work unsettled at the deadline: committed {committed:?}, end {ends:?}"
    );
    // Requests the worker gave up on may still land; let the simulator answer them.
    thread::sleep(Duration::from_millis(latency_ms + 500));
    assert_committed_prefix_delivered(&sim, &landed, &committed);

    // Phase 2: Braze is fast again; a new worker takes over from the commits.
    sim.set_faults(&Faults::default());
    cfg.drain_timeout_ms = 10_000;
    let mut w2 = Worker::start(dir, "w2", &cfg);
    wait_converged(broker, &cfg.group_id, topic, &mut sim, &mut [&mut w2.proc]);
    assert_profiles(&sim, &landed, "after the takeover");
    stop_gracefully(
        &mut w2,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );

    // Phase 3: slow again, and a deadline long enough: SIGTERM mid-request settles all.
    sim.set_faults(&Faults {
        latency_ms,
        ..Faults::default()
    });
    let records: Vec<_> = gen.by_ref().take(600).collect();
    landed.extend(produce(&broker.bootstrap(), topic, &records, &json_payload));
    let mut w3 = Worker::start(dir, "w3", &cfg);
    wait_in_flight(&w3);
    let took3 = stop_gracefully(
        &mut w3,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    assert_committed_to_end(broker, &cfg.group_id, topic);
    assert_profiles(&sim, &landed, "after a drained SIGTERM");
    eprintln!(
        "e2e graceful: latency {latency_ms} ms; SIGTERM with drain 2500 ms exited in {took:.1?} (committed {committed:?} of {ends:?}); with drain 10000 ms exited in {took3:.1?}, all committed"
    );
}

/// docs/design.md: on shutdown, wait for in-flight requests up to a deadline. The process
/// must be gone soon after `drain_timeout_ms`, not after a second drain of the same length.
#[test]
fn sigterm_exits_soon_after_the_drain_deadline_even_with_work_left() {
    let topic = "e2e-deadline";
    let (broker, dir) = setup(topic, 2);
    let dir = dir.path();
    let sim = Sim::start(dir, "sim", &["--latency-ms", "1500"]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.max_in_flight = 4;
    cfg.drain_timeout_ms = 2500;
    let records: Vec<_> = generator(4000, 77, false).take(3000).collect();
    produce(&broker.bootstrap(), topic, &records, &json_payload);
    let mut w = Worker::start(dir, "w", &cfg);
    wait_in_flight(&w);
    let took = stop_gracefully(&mut w, Duration::from_secs(20));
    assert!(
        took <= Duration::from_millis(cfg.drain_timeout_ms + 1500),
        "SIGTERM took {took:.1?} with window.drain_timeout_ms = {}",
        cfg.drain_timeout_ms
    );
}

fn wait_in_flight(w: &Worker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while w
        .metric("segment_sync_braze_in_flight_requests")
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "no Braze request in flight\n{}",
            w.proc.stderr_tail(3000)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Every change below the committed offsets reached Braze: each (user, segment) the
/// committed records decide is present, with their value or with that of a later record
/// (delivered, not yet committed).
fn assert_committed_prefix_delivered(sim: &Sim, landed: &[Landed], committed: &[i64]) {
    let below = |l: &Landed| l.offset < committed[l.partition as usize];
    let prefix: Vec<Landed> = landed.iter().filter(|l| below(l)).cloned().collect();
    let mut later: BTreeMap<(String, String), Vec<bool>> = BTreeMap::new();
    for l in landed.iter().filter(|l| !below(l)) {
        if let Some(e) = &l.event {
            if let Some(user) = profile_key(e) {
                later
                    .entry((user, e.segment_id.to_string()))
                    .or_default()
                    .push(e.change == Change::Entered);
            }
        }
    }
    let got = strip_identifiers(sim.profiles());
    let mut wrong = Vec::new();
    for (user, attrs) in boolean_profiles(&prefix, "") {
        for (name, value) in attrs.iter().filter(|(n, _)| n.starts_with("seg_")) {
            let have = got.get(&user).and_then(|p| p.get(name));
            let later_values = later.get(&(user.clone(), name.clone()));
            let ok = have == Some(value)
                || have
                    .and_then(|v| v.as_bool())
                    .is_some_and(|b| later_values.is_some_and(|vs| vs.contains(&b)));
            if !ok {
                wrong.push(format!(
                    "{user}.{name}: committed {value}, Braze has {have:?}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "committed changes missing from Braze ({}):\n{}",
        wrong.len(),
        wrong.into_iter().take(20).collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// 5. Schema evolution through the registry.

const OLD_SCHEMA: &str = r#"{"type":"record","name":"SegmentMembershipChange","namespace":"com.legacy.cdp","fields":[
 {"name":"event_id","type":"string"},
 {"name":"external_id","type":["null","string"],"default":null},
 {"name":"email","type":["null","string"],"default":null},
 {"name":"segment_id","type":"string"},
 {"name":"change","type":{"type":"enum","name":"MembershipChange","symbols":["ENTERED","EXITED"]}},
 {"name":"occurred_at","type":{"type":"long","logicalType":"timestamp-millis"}},
 {"name":"sequence","type":["null","long"],"default":null}]}"#;

const NEW_SCHEMA: &str = r#"{"type":"record","name":"SegmentMembershipChange","namespace":"com.vendor.cdp.v2","fields":[
 {"name":"event_id","type":"string"},
 {"name":"source_system","type":["null","string"],"default":null},
 {"name":"segment_id","type":"string"},
 {"name":"external_id","type":["null","string"],"default":null},
 {"name":"email","type":["null","string"],"default":null},
 {"name":"segment_name","type":["null","string"],"default":null},
 {"name":"change","type":{"type":"enum","name":"MembershipChange","symbols":["ENTERED","EXITED"]}},
 {"name":"occurred_at","type":{"type":"long","logicalType":"timestamp-millis"}},
 {"name":"sequence","type":["null","long"],"default":null},
 {"name":"attributes","type":["null",{"type":"map","values":["null","string","long","double","boolean"]}],"default":null}]}"#;

fn opt_str(s: &Option<std::borrow::Cow<'_, str>>) -> apache_avro::types::Value {
    use apache_avro::types::Value;
    match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.to_string()))),
    }
}

/// The event written with an older or newer writer schema, in the Confluent wire format.
fn confluent_with(schema: &apache_avro::Schema, id: u32, e: &Event<'_>, newer: bool) -> Vec<u8> {
    use apache_avro::types::Value;
    let change = match e.change {
        Change::Entered => Value::Enum(0, "ENTERED".into()),
        Change::Exited => Value::Enum(1, "EXITED".into()),
    };
    let sequence = match e.sequence {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::Long(s))),
    };
    let fields = if newer {
        let attributes = if e.attributes.is_empty() {
            Value::Union(0, Box::new(Value::Null))
        } else {
            let map = e
                .attributes
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        AttrValue::Null => Value::Union(0, Box::new(Value::Null)),
                        AttrValue::String(s) => {
                            Value::Union(1, Box::new(Value::String(s.to_string())))
                        }
                        AttrValue::Long(n) => Value::Union(2, Box::new(Value::Long(*n))),
                        AttrValue::Double(d) => Value::Union(3, Box::new(Value::Double(*d))),
                        AttrValue::Boolean(b) => Value::Union(4, Box::new(Value::Boolean(*b))),
                    };
                    (k.to_string(), v)
                })
                .collect();
            Value::Union(1, Box::new(Value::Map(map)))
        };
        vec![
            (
                "event_id".to_string(),
                Value::String(e.event_id.to_string()),
            ),
            (
                "source_system".to_string(),
                Value::Union(1, Box::new(Value::String("crm-v2".into()))),
            ),
            (
                "segment_id".to_string(),
                Value::String(e.segment_id.to_string()),
            ),
            ("external_id".to_string(), opt_str(&e.external_id)),
            ("email".to_string(), opt_str(&e.email)),
            ("segment_name".to_string(), opt_str(&e.segment_name)),
            ("change".to_string(), change),
            (
                "occurred_at".to_string(),
                Value::TimestampMillis(e.occurred_at),
            ),
            ("sequence".to_string(), sequence),
            ("attributes".to_string(), attributes),
        ]
    } else {
        vec![
            (
                "event_id".to_string(),
                Value::String(e.event_id.to_string()),
            ),
            ("external_id".to_string(), opt_str(&e.external_id)),
            ("email".to_string(), opt_str(&e.email)),
            (
                "segment_id".to_string(),
                Value::String(e.segment_id.to_string()),
            ),
            ("change".to_string(), change),
            (
                "occurred_at".to_string(),
                Value::TimestampMillis(e.occurred_at),
            ),
            ("sequence".to_string(), sequence),
        ]
    };
    let body = apache_avro::to_avro_datum(schema, Value::Record(fields)).expect("avro encode");
    let mut out = vec![0];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[test]
fn avro_confluent_resolves_older_and_newer_writer_schemas_from_the_registry() {
    let topic = "e2e-schemas";
    let (broker, dir) = setup(topic, 2);
    let dir = dir.path();
    let registry = Registry::start();
    let client = RegistryClient::new(&registry.url);
    let subject = format!("{topic}-value");
    let current = client.register(&subject, SCHEMA).expect("register current");
    let old_id = client.register(&subject, OLD_SCHEMA).expect("register old");
    let new_id = client.register(&subject, NEW_SCHEMA).expect("register new");
    assert_eq!(
        client.register(&subject, SCHEMA),
        Ok(current),
        "the same schema keeps its id"
    );
    let old = apache_avro::Schema::parse_str(OLD_SCHEMA).expect("old schema");
    let new = apache_avro::Schema::parse_str(NEW_SCHEMA).expect("new schema");

    let mut sim = Sim::start(dir, "sim", &[]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.format = "avro-confluent".into();
    cfg.schema_registry_url = registry.url.clone();

    // The writer schema follows the event id, so an exact repeat is written as the original.
    let payload = |g: &Generated| match &g.record {
        Record::Valid(e) => match e.event_id.bytes().map(u32::from).sum::<u32>() % 3 {
            0 => (
                segment_sync::tools::encode::to_confluent(current, e),
                Some(e.clone()),
            ),
            1 => {
                // The old writer has no attributes and no segment_name: the worker reads none.
                let mut read = e.clone();
                read.attributes.clear();
                read.segment_name = None;
                (confluent_with(&old, old_id, e, false), Some(read))
            }
            _ => (confluent_with(&new, new_id, e, true), Some(e.clone())),
        },
        _ => json_payload(g),
    };
    let records: Vec<_> = generator(800, 55, true).take(2400).collect();
    let landed = produce(&broker.bootstrap(), topic, &records, &payload);

    let mut w = Worker::start(dir, "w", &cfg);
    wait_converged(broker, &cfg.group_id, topic, &mut sim, &mut [&mut w.proc]);
    assert_profiles(&sim, &landed, "three writer schemas");
    assert_committed_to_end(broker, &cfg.group_id, topic);
    let decoded = w.metric("segment_sync_events_decoded_total").unwrap_or(0.0) as usize;
    assert_eq!(
        decoded,
        landed.len(),
        "every record decoded, none dead-lettered"
    );
    stop_gracefully(
        &mut w,
        Duration::from_millis(cfg.drain_timeout_ms) + EXIT_SLACK,
    );
    eprintln!(
        "e2e schemas: {} events with writer schemas {current}/{old_id}/{new_id}, registry fetches {}",
        landed.len(),
        registry.fetches()
    );
}

// ---------------------------------------------------------------------------------------
// 6. Replay from a time.

#[test]
fn replay_from_a_time_writes_only_what_was_produced_after_it() {
    let topic = "e2e-replay";
    let (broker, dir) = setup(topic, 3);
    let dir = dir.path();
    let mut gen = generator(1500, 66, true);
    let first: Vec<_> = gen.by_ref().take(1500).collect();
    produce(&broker.bootstrap(), topic, &first, &json_payload);
    // Record timestamps are the producer's clock at send time: leave a clear gap around
    // the chosen time.
    thread::sleep(Duration::from_millis(1200));
    let from = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    thread::sleep(Duration::from_millis(1200));
    let second: Vec<_> = gen.by_ref().take(800).collect();
    let landed_second = produce(&broker.bootstrap(), topic, &second, &json_payload);

    let sim = Sim::start(dir, "sim", &[]);
    let cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    let began = Instant::now();
    let mut replay = Worker::spawn(
        dir,
        "replay",
        &cfg,
        &["replay", "--from", &from, "--until-start"],
    );
    match replay.proc.wait_exit(Duration::from_secs(60)) {
        Some(s) if s.success() => {}
        other => panic!(
            "replay did not exit 0 ({other:?})\n{}",
            replay.proc.report()
        ),
    }
    assert_profiles(&sim, &landed_second, "replay of the second wave");
    eprintln!(
        "e2e replay: --from {from} wrote {} users from {} of {} events in {:.1?}",
        sim.profiles().len(),
        second.len(),
        first.len() + second.len(),
        began.elapsed()
    );
}
