//! `segment-sync verify --sample 1/100` of a 1,000,000-event log (100,000 users): done
//! within the export rate limit's time (Braze's 250 requests a minute, 50 users each) plus
//! the time a plain consumer takes to read the log, and in bounded memory (the log is
//! folded, not kept).
//!
//! librdkafka's mock cluster holds the topic (it listens on loopback, so a process of the
//! built binary reads it like a broker) and the simulator stands in for Braze, in this
//! process. The worker delivers the log first, so the check finds everything in sync. Then
//! a plain consumer reads the whole topic (the reading time to beat), and `verify` runs as a
//! child process, whose wall time and peak resident memory are measured.
//! `cargo bench --bench verify_sample`; `VERIFY_BENCH_EVENTS=100000` for a quicker run.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use segment_sync::config::{Config, Format};
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{self, RunOptions};
use segment_sync::tools::produce;
use segment_sync::tools::sim::{EXPORT_RATE_LIMIT, MAX_EXPORT_IDS};

use common::{Verdicts, API_KEY};

const TOPIC: &str = "bench.verify";
/// The mock cluster keeps at most 5 MB a partition (librdkafka's `rdkafka_mock.c`), then
/// deletes the oldest records: 64 partitions hold a million events whole.
const PARTITIONS: i32 = 64;
const SAMPLE: u64 = 100;
/// Resident memory the check may use whatever the log's size: its sample's state, the
/// clients' buffers (librdkafka's prefetch, capped by the reader's settings), the runtime.
const MAX_RSS_MB: f64 = 128.0;

fn events() -> usize {
    std::env::var("VERIFY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Reads the whole topic with a plain consumer by assignment; the time it takes.
fn plain_read(bootstrap: &str, expected: u64) -> Duration {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench.verify.plain")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("plain consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    let started = Instant::now();
    consumer.assign(&tpl).expect("assign");
    let mut n = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while n < expected {
        assert!(
            Instant::now() < deadline,
            "plain consumer: only {n} of {expected}"
        );
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
        }
    }
    started.elapsed()
}

/// Runs the binary's `verify` and waits for it: (exit code, wall time, peak RSS in MB,
/// the summary it printed). The peak is the child's own `VmHWM` (`common::peak_rss_kb`).
fn verify_child(config: &std::path::Path) -> (i32, Duration, f64, String) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segment-sync"))
        .args(["verify", "--config"])
        .arg(config)
        .args(["--sample", &format!("1/{SAMPLE}")])
        .env("BRAZE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the segment-sync binary starts");
    let peak = common::peak_rss_kb(child.id());
    let mut summary = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut summary)
        .expect("verify's summary");
    let status = child.wait().expect("verify ends");
    let elapsed = started.elapsed();
    let peak_kb = peak.join().expect("the memory probe");
    (
        status.code().unwrap_or(-1),
        elapsed,
        peak_kb as f64 / 1024.0,
        summary,
    )
}

/// The figure after `label` in verify's summary.
fn figure(summary: &str, label: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in the summary:\n{summary}"))
}

fn main() {
    let n = events();
    let users = n / 10;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .expect("the topic");
    cluster
        .create_topic(&format!("{TOPIC}.dlq"), 1, 1)
        .expect("the dead-letter topic");
    let braze = common::simulator(&rt);

    let mut cfg = Config::default();
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.kafka.topics = vec![TOPIC.into()];
    cfg.kafka.dlq_topic = format!("{TOPIC}.dlq");
    cfg.kafka.group_id = "bench.verify.live".into();
    cfg.kafka.format = Format::Json;
    cfg.braze.endpoint = braze.url();
    cfg.braze.api_key = Some(API_KEY.into());
    cfg.window.linger_ms = 100;
    cfg.server.listen = "127.0.0.1:0".into();

    println!(
        "verify of 1 user in {SAMPLE}: {n} events over {users} users, {PARTITIONS} partitions"
    );
    let produced = rt
        .block_on(produce::run(
            &cfg,
            &common::produce_args(n, users, 11, None),
        ))
        .expect("producing the log");
    let summary = pipeline::run(
        &cfg,
        RunOptions::until_caught_up(),
        Arc::new(Metrics::new()),
        Arc::new(Health::new()),
        rt.handle().clone(),
    )
    .expect("the worker delivers the log");
    println!(
        "the worker delivered {} events to the simulator in {:.2?}",
        summary.consumed, summary.elapsed
    );

    let read = plain_read(&cfg.kafka.brokers, produced.records as u64);
    assert_eq!(
        summary.consumed, produced.records as u64,
        "the mock cluster dropped records: more partitions are needed"
    );
    println!("a plain consumer reads the log in {read:.2?}");

    let dir = tempfile::tempdir().expect("a scratch dir");
    let config = dir.path().join("verify.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{}\"\ntopics = [\"{TOPIC}\"]\n\
             dlq_topic = \"{TOPIC}.dlq\"\nformat = \"json\"\n[braze]\nendpoint = \"{}\"\n",
            cfg.kafka.brokers,
            cfg.kafka.group_id,
            braze.url()
        ),
    )
    .expect("the configuration");
    let (code, elapsed, rss_mb, printed) = verify_child(&config);
    println!("{printed}");
    let checked = figure(&printed, "users checked");
    let requests = checked.div_ceil(MAX_EXPORT_IDS as u64);
    let export_time = Duration::from_secs(60) * requests as u32 / EXPORT_RATE_LIMIT;
    println!(
        "verify: {checked} users in {requests} export requests ({export_time:.2?} at {EXPORT_RATE_LIMIT} a minute), {elapsed:.2?} in all, peak RSS {rss_mb:.1} MB"
    );

    let mut v = Verdicts::default();
    v.at_most("exit code (0: in sync)", f64::from(code), 0.0, "");
    v.at_most(
        "wall time over the export time plus a plain read of the log",
        elapsed.as_secs_f64(),
        (export_time + read * 2 + Duration::from_secs(5)).as_secs_f64(),
        "s",
    );
    v.at_most("peak resident memory", rss_mb, MAX_RSS_MB, "MB");
    drop(braze);
    v.finish();
}
