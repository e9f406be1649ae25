//! Issue 21, item 6: `segment-sync snapshot` diffs 1,000,000 members in at most 10 s when
//! nothing changed, and a run of 10,000,000 members within 500 MB of resident memory.
//!
//! The built binary against the real broker of the test harness, as an operator runs it: a
//! Customer Insights run folder (model.json and CSV partitions of UUID customer ids) on local
//! disk, the state in the compacted state topic. The state of the 1,000,000-member segment is
//! written by a first snapshot run (its time is reported); the 10,000,000-member segment's
//! state is produced directly (what a first run would leave: one record a member and the
//! segment's record), as a first run of that size would take minutes of producing. Then the
//! same members arrive as the next run: the figure is that run's wall time and its own peak
//! resident set (`VmHWM`).
//! `cargo bench --bench snapshot`

mod common;
#[allow(dead_code)]
#[path = "../tests/support/kafka.rs"]
mod kafka;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use segment_sync::snapshot::diff::{Applied, By, Digest, Member};
use segment_sync::snapshot::state;

use common::Verdicts;

const MAX_SECONDS_1M: f64 = 10.0;
const MAX_RSS_MB_10M: f64 = 500.0;

fn customer_id(i: u64) -> String {
    // A UUID-shaped id, as Customer Insights' unified CustomerId is.
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        i.wrapping_mul(2_654_435_761) as u32,
        i % 65_536,
        i % 4096,
        (i / 7) % 4096,
        i
    )
}

/// `<export>/Members/<stamp>/Members_<n>.csv` for members `0..n`, and model.json listing them.
fn write_run(export: &Path, stamp: &str, n: u64, parts: u64) -> PathBuf {
    let run = export.join("Members").join(stamp);
    std::fs::create_dir_all(&run).unwrap();
    let mut partitions = Vec::new();
    for p in 0..parts {
        let name = format!("Members_{}.csv", p + 1);
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(run.join(&name)).unwrap(),
        );
        if p == 0 {
            writeln!(f, "CustomerId,FirstName").unwrap();
        }
        let mut i = p;
        while i < n {
            writeln!(f, "{},Customer {i}", customer_id(i)).unwrap();
            i += parts;
        }
        f.flush().unwrap();
        partitions.push(serde_json::json!({
            "name": name.trim_end_matches(".csv"),
            "location": format!("https://bench.dfs.core.windows.net/exports/CustomerInsights_b/e/Members/{stamp}/{name}"),
        }));
    }
    let model = serde_json::json!({
        "name": "e", "version": "1.0",
        "entities": [{"$type": "LocalEntity", "name": "Members",
            "attributes": [{"name": "CustomerId", "dataType": "string"}, {"name": "FirstName", "dataType": "string"}],
            "partitions": partitions}]
    });
    std::fs::write(
        export.join("model.json"),
        serde_json::to_vec(&model).unwrap(),
    )
    .unwrap();
    run
}

/// What a completed first run of `n` members leaves in the state topic.
fn produce_state(brokers: &str, topic: &str, segment: &str, n: u64) {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let mut digest = Digest::default();
    for i in 0..n {
        let user = customer_id(i);
        digest.add(&user);
        let m = Member {
            user,
            by: By::ExternalId,
            email: None,
        };
        let key = state::member_key(segment, &m.user);
        let value = state::member_value("2026/12/03/0300", &m);
        let mut record = BaseRecord::<[u8], [u8]>::to(topic)
            .key(&key)
            .payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("producing the state: {e}"),
            }
        }
        if i % 10_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    let applied = Applied {
        run: "2026/12/03/0300".into(),
        time_ms: chrono::DateTime::parse_from_rfc3339("2026-12-03T03:00:00Z")
            .unwrap()
            .timestamp_millis(),
        members: digest.members,
        digest: digest.hex(),
    };
    let value = state::segment_value(&applied);
    let key = state::segment_key(segment);
    producer
        .send(
            BaseRecord::<[u8], [u8]>::to(topic)
                .key(&key)
                .payload(&value),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(300)).unwrap();
}

/// CPU time (user + system) of the children this process has waited for.
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs `snapshot` and waits: (exit code, wall time, peak RSS in MB, its summary line). Its
/// CPU time is printed: the machine is shared, so the wall time also shows the others' load.
fn snapshot(config: &Path, segment: &str, run: &Path) -> (i32, Duration, f64, String) {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_segment-sync"))
        .args(["snapshot", "--config"])
        .arg(config)
        .args(["--segment", segment, "--from"])
        .arg(run)
        // The phases' times (run read, producer ready, state read, diffed, committed).
        .env("RUST_LOG", "warn,segment_sync::snapshot=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the segment-sync binary starts");
    let peak = common::peak_rss_kb(child.id());
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let peak_kb = peak.join().unwrap();
    println!(
        "  snapshot process: {elapsed:.2?} wall, {:.2?} CPU (user + system)",
        children_cpu() - cpu_before
    );
    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (
        out.status.code().unwrap_or(-1),
        elapsed,
        peak_kb as f64 / 1024.0,
        text,
    )
}

fn main() {
    let broker = kafka::KafkaBroker::shared();
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("bench-snapshot-{}", std::process::id());
    broker.create_topic(&topic, 6);
    let config = dir.path().join("snapshot.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = {:?}\ntopics = [{topic:?}]\ndlq_topic = \"{topic}.dlq\"\nformat = \"json\"\n",
            broker.bootstrap()
        ),
    )
    .unwrap();
    let mut v = Verdicts::default();

    // 1,000,000 members: a first run writes them all, the next run with the same members
    // writes nothing but the segment's record.
    let export = dir.path().join("one-million/CustomerInsights_b/e");
    let first = write_run(&export, "2026/12/03/0300", 1_000_000, 4);
    let (code, took, rss, said) = snapshot(&config, "bench-1m", &first);
    assert_eq!(code, 0, "{said}");
    println!("first run of 1,000,000 members (1,000,000 ENTERED written): {took:.1?}, peak RSS {rss:.1} MB\n  {said}");
    std::fs::remove_dir_all(&first).unwrap();
    let second = write_run(&export, "2026/12/04/0300", 1_000_000, 4);
    let (code, took, rss, said) = snapshot(&config, "bench-1m", &second);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("entered 0, exited 0, unchanged 1000000"),
        "{said}"
    );
    println!("next run, nothing changed: {took:.2?}, peak RSS {rss:.1} MB\n  {said}");
    v.at_most(
        "1,000,000 members diffed, nothing changed",
        took.as_secs_f64(),
        MAX_SECONDS_1M,
        "s",
    );
    std::fs::remove_dir_all(dir.path().join("one-million")).unwrap();

    // 10,000,000 members.
    let n = 10_000_000;
    let started = Instant::now();
    produce_state(
        &broker.bootstrap(),
        &format!("{topic}.snapshots"),
        "bench-10m",
        n,
    );
    println!(
        "state of 10,000,000 members produced in {:.1?}",
        started.elapsed()
    );
    let export = dir.path().join("ten-million/CustomerInsights_b/e");
    let run = write_run(&export, "2026/12/04/0300", n, 8);
    let (code, took, rss, said) = snapshot(&config, "bench-10m", &run);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("unchanged 10000000"), "{said}");
    println!(
        "run of 10,000,000 members, nothing changed: {took:.1?}, peak RSS {rss:.1} MB\n  {said}"
    );
    v.at_most(
        "peak resident memory, 10,000,000-member run",
        rss,
        MAX_RSS_MB_10M,
        "MB",
    );
    v.finish();
}
