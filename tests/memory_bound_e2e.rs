//! The worker's resident size under a flood of large distinct users while Braze is stalled:
//! `window.max_pending_bytes` pauses consumption, so the process stays small and flat however
//! much the topic holds. The worker is the built binary, so `/proc/<pid>/status` measures it
//! alone; Kafka is librdkafka's mock cluster in the test process.

mod support;

use std::fs;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::json;

use segment_sync::tools::sim::{self, Faults, SimConfig};

use support::procs::{binary, Proc, Worker, WorkerConfig, API_KEY};

/// Distinct users, each about 3 KB of identifier and attributes near Braze's limits: some
/// 180 MB of pending state if nothing held consumption back.
const USERS: usize = 60_000;
/// The mock cluster keeps 5 MB a partition (librdkafka's `rdkafka_mock.c`) and drops what is
/// older: enough partitions that the whole flood stays in the log, unread.
const PARTITIONS: i32 = 64;
const MAX_PENDING_BYTES: usize = 8 << 20;
/// librdkafka's prefetch, the other buffer of records read ahead, capped by its own property.
const PREFETCH_KB: usize = 8192;
/// Far above what the bounded worker needs (its own baseline, the prefetch, the window and
/// the requests held for Braze: about 52 MB here), far below what the flood takes unbounded
/// (about 285 MB with `max_pending_bytes` at 1 GiB, every record consumed).
const RSS_BOUND_KB: u64 = 120 << 10;
/// Allocator noise between two samples of a paused worker.
const FLAT_SLACK_KB: u64 = 8 << 10;

fn flood_record(i: usize) -> Vec<u8> {
    let attributes: serde_json::Map<String, serde_json::Value> = (0..8)
        .map(|a| {
            (
                format!("attr_{a}"),
                json!(format!("{i:08}{}", "v".repeat(240))),
            )
        })
        .collect();
    serde_json::to_vec(&json!({
        "event_id": format!("flood-{i}"),
        "external_id": format!("{i:08}-{}", "x".repeat(900)),
        "segment_id": format!("seg-{}", i % 50),
        "change": "ENTERED",
        "occurred_at": 1_700_000_000_000i64 + i as i64,
        "sequence": i,
        "attributes": attributes,
    }))
    .expect("json")
}

fn produce_flood(brokers: &str, topic: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .create()
        .expect("test producer");
    for i in 0..USERS {
        let payload = flood_record(i);
        let key = format!("u{i}");
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// VmRSS of a process, in kB.
fn rss_kb(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn resident_size_stays_flat_under_a_flood_of_large_users_while_braze_is_stalled() {
    support::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Braze says 429 to every request with a reset an hour away: nothing is ever delivered.
    let braze = rt
        .block_on(sim::start(
            SimConfig {
                api_key: API_KEY.into(),
                rate_limit: 0,
                rate_window_secs: 1,
                faults: Faults {
                    fail_next_429: u32::MAX,
                    reset_after_s: 3600,
                    ..Faults::default()
                },
            },
            "127.0.0.1:0".parse().expect("address"),
        ))
        .expect("simulator");
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    let topic = "flood";
    cluster.create_topic(topic, PARTITIONS, 1).expect("topic");
    cluster.create_topic("flood.dlq", 1, 1).expect("dlq topic");

    let mut cfg = WorkerConfig::new(&brokers, topic, &braze.url());
    cfg.properties
        .insert("queued.max.messages.kbytes".into(), PREFETCH_KB.to_string());
    let config = dir.path().join("worker.toml");
    let text = cfg.toml("127.0.0.1:0").replace(
        "[window]\n",
        &format!("[window]\nmax_pending_bytes = {MAX_PENDING_BYTES}\n"),
    );
    fs::write(&config, text).expect("config");
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("BRAZE_API_KEY", API_KEY)
        .env("RUST_LOG", "info");
    let mut worker = Worker::new(Proc::spawn("worker", cmd, dir.path()));
    worker.wait_ready(Duration::from_secs(60));
    let pid = worker.proc.pid();
    let idle = rss_kb(pid);

    let started = Instant::now();
    produce_flood(&brokers, topic);
    eprintln!("flood of {USERS} users produced in {:?}", started.elapsed());

    // Paused: nothing more is consumed for a few seconds.
    let consumed = || {
        worker
            .metric("segment_sync_events_consumed_total")
            .unwrap_or(0.0) as u64
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (consumed(), Instant::now());
    while last.1.elapsed() < Duration::from_secs(3) {
        assert!(Instant::now() < deadline, "consumption never paused");
        thread::sleep(Duration::from_millis(250));
        let now = consumed();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let early = rss_kb(pid);
    thread::sleep(Duration::from_secs(5));
    let late = rss_kb(pid);
    let stats = braze.state.stats();
    eprintln!(
        "VmRSS idle {idle} kB, paused {early} kB, 5 s later {late} kB; consumed {} of {USERS}; \
         Braze answered {} requests with 429",
        last.0, stats.responses_429
    );
    assert!(
        (last.0 as usize) < USERS / 4,
        "consumed {} of {USERS}: nothing held consumption back",
        last.0
    );
    assert!(stats.responses_429 > 0, "Braze was never asked");
    assert!(
        late < RSS_BOUND_KB,
        "VmRSS {late} kB over {RSS_BOUND_KB} kB\n{}",
        worker.proc.report()
    );
    assert!(
        late <= early + FLAT_SLACK_KB,
        "VmRSS grew from {early} kB to {late} kB while paused"
    );
    worker.proc.sigkill();
}
