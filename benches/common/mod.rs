//! Shared by the benchmark binaries: pre-generated payloads, CPU time, and the verdicts
//! that make `make bench` fail when a docs/design.md target is missed.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use segment_sync::config::Format;
use segment_sync::decode::{MemoryRegistry, SCHEMA};
use segment_sync::tools::generate::{Generator, GeneratorConfig, Record};
use segment_sync::tools::produce::{encode_record, ProduceArgs};
use segment_sync::tools::sim::{self, SimConfig, SimHandle};

/// The Braze key every benchmark's simulator and worker share.
pub const API_KEY: &str = "bench-key";

/// `produce`'s arguments for the log the broker benchmarks read: `count` records over
/// `users` users and 20 segments, the generator's 5% repeats and 2% misordered changes, 10%
/// of users known by email alone, no bad records; to `topic` (the configured one when
/// `None`).
pub fn produce_args(count: usize, users: usize, seed: u64, topic: Option<&str>) -> ProduceArgs {
    ProduceArgs {
        count,
        users,
        segments: 20,
        repeat_rate: 0.05,
        out_of_order_rate: 0.02,
        bad_rate: 0.0,
        email_only_rate: 0.1,
        seed,
        topic: topic.map(str::to_string),
        shape: None,
    }
}

/// The Braze simulator in this process on a free loopback port, without a rate limit: the
/// benchmark measures the worker, not Braze's limit.
pub fn simulator(rt: &tokio::runtime::Runtime) -> SimHandle {
    rt.block_on(sim::start(
        SimConfig {
            api_key: API_KEY.into(),
            rate_limit: 0,
            rate_window_secs: 1,
            faults: Default::default(),
        },
        "127.0.0.1:0".parse().expect("an address"),
    ))
    .expect("the simulator starts")
}

/// The stream every benchmark uses unless it says otherwise: many users, each touched a
/// handful of times, with the generator's default repeats and misordered changes.
pub fn stream(users: usize, seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        users,
        segments: 20,
        seed,
        ..GeneratorConfig::default()
    }
}

/// Encoded records in one buffer, so that the measured loop reads memory the way a consumer
/// reads fetched batches and the allocator does not weigh on the setup.
pub struct Payloads {
    pub bytes: Vec<u8>,
    pub spans: Vec<(usize, usize)>,
    /// The partition the record's key lands on (6 partitions).
    pub partitions: Vec<i32>,
    pub keys: Vec<Vec<u8>>,
}

impl Payloads {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let (a, b) = self.spans[i];
        &self.bytes[a..b]
    }

    pub fn mean_size(&self) -> usize {
        self.bytes.len() / self.spans.len().max(1)
    }
}

pub const PARTITIONS: i32 = 6;

/// A stable stand-in for the producer's key partitioner: a user's records share a partition.
pub fn partition_of(key: &[u8]) -> i32 {
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % PARTITIONS as u64) as i32
}

/// A registry holding the project's schema, and its id, for `avro-confluent`.
pub fn registry() -> (Arc<MemoryRegistry>, u32) {
    let registry = Arc::new(MemoryRegistry::new());
    let id = registry.register(SCHEMA);
    (registry, id)
}

pub fn payloads(format: Format, schema_id: u32, cfg: GeneratorConfig, n: usize) -> Payloads {
    let mut out = Payloads {
        bytes: Vec::new(),
        spans: Vec::with_capacity(n),
        partitions: Vec::with_capacity(n),
        keys: Vec::with_capacity(n),
    };
    for g in Generator::new(cfg).take(n) {
        if !matches!(g.record, Record::Valid(_)) {
            continue;
        }
        let p = encode_record(format, Some(schema_id), &g.record);
        let start = out.bytes.len();
        out.bytes.extend_from_slice(&p);
        out.spans.push((start, out.bytes.len()));
        out.partitions.push(partition_of(&g.key));
        out.keys.push(g.key);
    }
    out
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Watches a child process's own peak resident set (`VmHWM`, in KiB) until it exits; join
/// the handle after reaping it. Polled rather than taken from `wait4`'s `ru_maxrss`, which
/// would count the pages the child shared with this process before `exec`.
pub fn peak_rss_kb(pid: u32) -> std::thread::JoinHandle<u64> {
    let status_file = format!("/proc/{pid}/status");
    std::thread::spawn(move || {
        let mut peak_kb = 0u64;
        while let Ok(status) = std::fs::read_to_string(&status_file) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            match hwm {
                Some(kb) => peak_kb = peak_kb.max(kb),
                // A zombie has no memory left to report.
                None => break,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak_kb
    })
}

/// Collects the pass/fail lines and turns them into the exit status.
#[derive(Default)]
pub struct Verdicts {
    failed: Vec<String>,
}

impl Verdicts {
    /// `value` must be at least `target`.
    pub fn at_least(&mut self, what: &str, value: f64, target: f64, unit: &str) {
        self.check(
            what,
            value,
            value >= target,
            &format!(">= {target} {unit}"),
            unit,
        );
    }

    /// `value` must be at most `target`.
    pub fn at_most(&mut self, what: &str, value: f64, target: f64, unit: &str) {
        self.check(
            what,
            value,
            value <= target,
            &format!("<= {target} {unit}"),
            unit,
        );
    }

    /// `value` must stay below `target`.
    pub fn below(&mut self, what: &str, value: f64, target: f64, unit: &str) {
        self.check(
            what,
            value,
            value < target,
            &format!("< {target} {unit}"),
            unit,
        );
    }

    fn check(&mut self, what: &str, value: f64, ok: bool, target: &str, unit: &str) {
        let mark = if ok { "PASS" } else { "FAIL" };
        println!(
            "{mark}  {what}: {} {unit} (target {target})",
            fmt_num(value)
        );
        if !ok {
            self.failed.push(what.to_string());
        }
    }

    /// Exits non-zero when a target was missed.
    pub fn finish(self) {
        if self.failed.is_empty() {
            println!("all targets met");
        } else {
            println!("targets missed: {}", self.failed.join(", "));
            std::process::exit(1);
        }
    }
}

pub fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
