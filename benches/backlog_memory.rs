//! Issue 13, item 5: peak resident memory of a worker catching up with a backlog of
//! 1,000,000 events over 200,000 users stays ≤ 150 MB, so speed is not bought with memory.
//!
//! The test harness's Apache Kafka broker (its own process, on free loopback ports) holds
//! the backlog: JSON records on 6 partitions, written by `produce::run` (librdkafka's mock
//! cluster keeps only the last few megabytes of a partition, so it cannot hold one). The
//! built binary then runs as a child process, `segment-sync replay --from earliest` with
//! the default `[window]` settings and a request rate too high to bind, against the Braze
//! simulator (in this process), until it has caught up and exits. Its peak resident set is
//! the child's own `VmHWM` (`common::peak_rss_kb`), so neither the broker's copy of the log
//! nor this process's simulator and producer count.
//! `cargo bench --bench backlog_memory`

mod common;
#[allow(dead_code)]
#[path = "../tests/support/kafka.rs"]
mod kafka;

use std::process::{Command, Stdio};
use std::time::Instant;

use segment_sync::config::{Config, Format};
use segment_sync::tools::produce;

use common::{Verdicts, API_KEY};

const TOPIC: &str = "bench.backlog";
const PARTITIONS: i32 = 6;
const RECORDS: usize = 1_000_000;
const USERS: usize = 200_000;
const TARGET_MB: f64 = 150.0;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let broker = kafka::KafkaBroker::shared();
    broker.create_topic(TOPIC, PARTITIONS);
    let brokers = broker.bootstrap();
    let sim = common::simulator(&rt);

    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.clone();
    cfg.kafka.topics = vec![TOPIC.to_string()];
    cfg.kafka.format = Format::Json;
    let t = Instant::now();
    let produced = rt
        .block_on(produce::run(
            &cfg,
            &common::produce_args(RECORDS, USERS, 13, Some(TOPIC)),
        ))
        .expect("produce");
    let backlog: i64 = broker.end_offsets(TOPIC).iter().map(|(_, o)| o).sum();
    assert_eq!(backlog, produced.records as i64);
    println!(
        "{backlog} JSON records over {USERS} users on {PARTITIONS} partitions in {:.1?}",
        t.elapsed()
    );

    let dir = tempfile::tempdir().expect("a scratch directory");
    let config = dir.path().join("backlog.toml");
    std::fs::write(
        &config,
        format!(
            r#"[kafka]
brokers = {brokers:?}
group_id = "bench.backlog"
topics = [{TOPIC:?}]
dlq_topic = "{TOPIC}.dlq"
format = "json"

[braze]
endpoint = {endpoint:?}
requests_per_second = 100000

[server]
listen = "127.0.0.1:0"

[kafka.properties]
{properties}"#,
            endpoint = sim.url(),
            properties = worker_properties(),
        ),
    )
    .expect("write the worker's config");

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segment-sync"))
        .args(["replay", "--from", "earliest", "--config"])
        .arg(&config)
        .env("BRAZE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("the segment-sync binary starts");
    let peak = common::peak_rss_kb(child.id());
    let status = child.wait().expect("replay ends");
    let elapsed = started.elapsed();
    let max_rss_kb = peak.join().expect("the memory probe");
    assert!(status.success(), "replay failed: {status}");
    let stats = sim.state.stats();
    let peak_mb = max_rss_kb as f64 * 1024.0 / 1e6;
    println!(
        "replay caught up in {elapsed:.1?}: {} objects in {} requests; peak resident {peak_mb:.1} MB ({max_rss_kb} KiB)",
        stats.objects_applied, stats.requests
    );
    let mut verdicts = Verdicts::default();
    verdicts.at_most(
        "peak resident memory, 1,000,000-event backlog of 200,000 users",
        peak_mb,
        TARGET_MB,
        "MB",
    );
    drop(sim);
    verdicts.finish();
}

/// For diagnosis only, as in `end_to_end`: `BACKLOG_WORKER_PROPS="k=v,k=v"` adds librdkafka
/// properties to the worker's consumer, to weigh a setting without touching the code.
fn worker_properties() -> String {
    let props = std::env::var("BACKLOG_WORKER_PROPS").unwrap_or_default();
    let mut out = String::new();
    for kv in props.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .expect("BACKLOG_WORKER_PROPS holds k=v pairs");
        println!("worker property {k}={v} (BACKLOG_WORKER_PROPS)");
        out.push_str(&format!("{k:?} = {v:?}\n"));
    }
    out
}
