//! Restore on assignment (issue 19): a worker that starts on a group whose commits are at the
//! end of a 1,000,000-record log of 200,000 users reads every record back (all of it lies
//! within `window.restore_records` of each partition's commit), decodes it and loads the
//! greatest versions, within 2 s of its assignment on this machine; and a worker with nothing to restore (a new
//! group) starts as fast as one with the restore turned off.
//!
//! The test harness's Apache Kafka broker holds the log (6 partitions; librdkafka's mock
//! cluster reads about ten times slower and keeps only a few megabytes a partition); the
//! commits are written directly, so nothing is delivered first. The time is from the
//! assignment to the last partition's versions loaded (`segment_sync_restore_seconds` counts
//! every partition), beside a plain consumer's read of the same log. Startup
//! is timed from the assignment to the first record read, so the group join's own variation
//! (0.1-1 s) does not count.
//! The worker's peak resident memory while it restores the whole log is measured on the built
//! binary (`segment-sync run`, a child process, as benches/backlog_memory.rs does: its own
//! `VmHWM`, so neither the broker nor this process counts), from its start until its log says
//! every partition is restored.
//! `cargo bench --bench restore`; `RESTORE_BENCH_EVENTS=100000` for a quicker run.

mod common;
#[allow(dead_code)]
#[path = "../tests/support/kafka.rs"]
mod kafka;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use segment_sync::config::{Config, Format};
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{self, RunOptions};
use segment_sync::tools::produce;

use common::{Verdicts, API_KEY};

const TOPIC: &str = "bench.restore";
const PARTITIONS: i32 = 6;
/// DESIGN.md / issue 19: 1,000,000 records of 200,000 users restored within 2 s.
const MAX_RESTORE: Duration = Duration::from_secs(2);
/// DESIGN.md's backlog memory figure (benches/backlog_memory.rs), the closest target for
/// what a worker holds while it restores.
const TARGET_MB: f64 = 150.0;
/// What a start with nothing to restore may add to one with the restore off: noise of the
/// group join, not a read.
const STARTUP_SLACK: Duration = Duration::from_millis(500);

fn events() -> usize {
    std::env::var("RESTORE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a consumer")
}

/// The end offsets of every partition.
fn ends(c: &BaseConsumer) -> Vec<i64> {
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// Commits `offsets` for `group`, as a worker that delivered everything would have.
fn commit(bootstrap: &str, group: &str, offsets: &[i64]) {
    let c = consumer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets.iter().enumerate() {
        tpl.add_partition_offset(TOPIC, p as i32, Offset::Offset(*o))
            .expect("partition");
    }
    c.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// Reads the whole topic with a plain consumer by assignment; the time it takes.
fn plain_read(bootstrap: &str, expected: u64) -> Duration {
    let c = consumer(bootstrap, "bench.restore.plain");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)
            .expect("partition");
    }
    let started = Instant::now();
    c.assign(&tpl).expect("assign");
    let mut n = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while n < expected {
        assert!(Instant::now() < deadline, "plain read: {n} of {expected}");
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            n += 1;
        }
    }
    started.elapsed()
}

/// Runs the live worker on `group` until `done` holds of its metrics (or 5 minutes), then
/// stops it. Returns the metrics and the wall time from its first assignment until `done`
/// held.
fn run_until(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    done: impl Fn(&Metrics) -> bool,
) -> (Arc<Metrics>, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let worker = {
        let (cfg, stop, metrics, health, handle) = (
            cfg.clone(),
            stop.clone(),
            metrics.clone(),
            health.clone(),
            rt.handle().clone(),
        );
        std::thread::spawn(move || {
            pipeline::run(&cfg, RunOptions::live(stop), metrics, health, handle)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut assigned = None;
    while !done(&metrics) {
        assert!(Instant::now() < deadline, "the worker did not get there");
        if assigned.is_none() && health.assigned.load(Ordering::Relaxed) {
            assigned = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = assigned.map_or(Duration::ZERO, |a| a.elapsed());
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .expect("the worker thread")
        .expect("the worker runs");
    (metrics, took)
}

fn main() {
    let n = events();
    let users = n / 5;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let broker = kafka::KafkaBroker::shared();
    broker.create_topic(TOPIC, PARTITIONS);
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let braze = common::simulator(&rt);

    let mut cfg = Config::default();
    cfg.kafka.brokers = broker.bootstrap();
    cfg.kafka.topics = vec![TOPIC.into()];
    cfg.kafka.dlq_topic = format!("{TOPIC}.dlq");
    cfg.kafka.format = Format::Json;
    cfg.braze.endpoint = braze.url();
    cfg.braze.api_key = Some(API_KEY.into());
    cfg.server.listen = "127.0.0.1:0".into();

    println!("restore of {n} records over {users} users, {PARTITIONS} partitions");
    let produced = rt
        .block_on(produce::run(
            &cfg,
            &common::produce_args(n, users, 19, Some(TOPIC)),
        ))
        .expect("producing the log");
    let probe = consumer(&cfg.kafka.brokers, "bench.restore.probe");
    let end = ends(&probe);
    let total: i64 = end.iter().sum();
    assert_eq!(
        total, produced.records as i64,
        "the log holds what was produced"
    );
    let read = plain_read(&cfg.kafka.brokers, total as u64);
    println!("a plain consumer reads the log in {read:.2?}");

    // Everything committed: the worker restores the whole log, and has nothing to consume.
    cfg.kafka.group_id = "bench.restore.live".into();
    // Every record of a partition lies within the lookback.
    cfg.window.restore_records = end.iter().copied().max().unwrap_or(0) as u64;
    commit(&cfg.kafka.brokers, &cfg.kafka.group_id, &end);
    let (m, wall) = run_until(&cfg, &rt, |m| {
        m.restore_seconds.get_sample_count() == PARTITIONS as u64
    });
    let restored = m.restore_records.get();
    let busy = Duration::from_secs_f64(m.restore_seconds.get_sample_sum());
    println!(
        "restored {restored} records in {wall:.2?} from the assignment ({busy:.2?} summed over the partitions' reads and loads, which overlap)"
    );

    let peak_mb = restore_peak_rss_mb(&cfg, &end);

    // Nothing committed (a new group): nothing to restore; against the restore turned off.
    let startup = |group: &str, restore_records: u64| {
        let mut c = cfg.clone();
        c.kafka.group_id = group.into();
        c.window.restore_records = restore_records;
        run_until(&c, &rt, |m| m.events_consumed.get() > 0).1
    };
    let off = startup("bench.restore.fresh-off", 0);
    let on = startup("bench.restore.fresh-on", 100_000);
    println!(
        "a new group's first record, from its assignment: {on:.2?} with the restore, {off:.2?} without"
    );

    let mut v = Verdicts::default();
    v.at_least(
        "records restored (the whole log)",
        restored as f64,
        total as f64,
        "records",
    );
    v.at_most(
        "restore of the log, assignment to every partition restored",
        wall.as_secs_f64(),
        MAX_RESTORE.as_secs_f64() * n as f64 / 1_000_000.0,
        "s",
    );
    v.at_most(
        "peak resident memory, worker restoring the log (backlog bench's target)",
        peak_mb,
        TARGET_MB,
        "MB",
    );
    v.at_most(
        "start with nothing to restore, over the restore off",
        on.saturating_sub(off).as_secs_f64(),
        STARTUP_SLACK.as_secs_f64(),
        "s",
    );
    drop(braze);
    v.finish();
}

/// Runs the built binary as the live worker of a group committed at `end` (so it restores the
/// whole log and has nothing to consume), until its log says every partition is restored;
/// its peak resident set in MB.
fn restore_peak_rss_mb(cfg: &Config, end: &[i64]) -> f64 {
    let group = "bench.restore.rss";
    commit(&cfg.kafka.brokers, group, end);
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("its address")
    };
    let dir = tempfile::tempdir().expect("a scratch directory");
    let config = dir.path().join("restore.toml");
    std::fs::write(
        &config,
        format!(
            r#"[kafka]
brokers = {brokers:?}
group_id = {group:?}
topics = [{TOPIC:?}]
dlq_topic = "{TOPIC}.dlq"
format = "json"

[braze]
endpoint = {endpoint:?}

[window]
restore_records = {lookback}

[server]
listen = "{listen}"
"#,
            brokers = cfg.kafka.brokers,
            endpoint = cfg.braze.endpoint,
            lookback = cfg.window.restore_records,
        ),
    )
    .expect("write the worker's config");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segment-sync"))
        .args(["run", "--config"])
        .arg(&config)
        .env("BRAZE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("the segment-sync binary starts");
    let peak = common::peak_rss_kb(child.id());
    // Every partition restored: one observation of restore_seconds each, on its /metrics.
    let deadline = Instant::now() + Duration::from_secs(180);
    let restored = loop {
        let count = scrape(listen).and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("segment_sync_restore_seconds_count "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if count.is_some_and(|c| c as i32 >= PARTITIONS) || Instant::now() > deadline {
            break count.unwrap_or(0.0) as i32;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    assert_eq!(
        restored, PARTITIONS,
        "the worker ended before it restored every partition"
    );
    // A few of the probe's samples after the last load.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: a signal to the child this function started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("the worker ends");
    let peak_kb = peak.join().expect("the memory probe");
    assert!(status.success(), "the worker failed: {status}");
    let peak_mb = peak_kb as f64 * 1024.0 / 1e6;
    println!(
        "the worker binary restored the log in {took:.2?} from its start; peak resident {peak_mb:.1} MB ({peak_kb} KiB)"
    );
    peak_mb
}

/// `GET /metrics` of the worker at `addr`, or `None` while it does not answer.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
