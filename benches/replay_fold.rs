//! Issue 22: a backfill folds the range into each user's final state and sends each user once.
//!
//! The two histories of the issue (1,000,000 changes spread over the log: 200,000 users over 20
//! segments, and 100,000 users over 5), folded by `fold::Fold` and encoded by
//! `mapping::encode` into requests written to a sink, as `replay --dry-run` does without Kafka
//! or Braze. Each case runs in a child process of its own, so that its CPU time and peak
//! resident memory are its alone; the parent checks them against the targets:
//!
//! - 1,000,000 changes of 200,000 users folded and encoded in at most 3 s of CPU, peak
//!   resident memory at most 150 MB (`replay.fold_memory` at its default, 64 MiB);
//! - the same with `replay.fold_memory` at 8 MiB (spilling) within 2 x that time;
//! - both histories at most 1.05 x the floor in objects (one per user) and in attribute
//!   writes (one per (user, segment) pair), the floor counted from the history alone.
//!
//! `cargo bench --bench replay_fold`

mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use segment_sync::config::{MappingConfig, ReplayConfig, WindowConfig};
use segment_sync::event::{Change, Event, Identity};
use segment_sync::fold::{Fold, FoldConfig};
use segment_sync::mapping::{self, Mapping};

use common::{cpu_time, peak_rss_kb, Verdicts};

const CHANGES: usize = 1_000_000;
const CASE_VAR: &str = "REPLAY_FOLD_CASE";

struct History {
    name: &'static str,
    users: u64,
    segments: u64,
    seed: u64,
}

const HISTORIES: [History; 2] = [
    History {
        name: "200,000 users, 20 segments",
        users: 200_000,
        segments: 20,
        seed: 22,
    },
    History {
        name: "100,000 users, 5 segments",
        users: 100_000,
        segments: 5,
        seed: 5,
    },
];

/// The history's changes in log order: users and segments drawn at random (a user's changes
/// far apart in the log), ENTERED or EXITED at random, `occurred_at` rising with the log.
fn changes(h: &History) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
    let mut s = h.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..CHANGES).map(move |_| {
        // splitmix64
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % h.users, (z >> 32) % h.segments, z >> 63 == 1)
    })
}

/// What a case prints for the parent: one `key value` a line.
fn run_case(history: usize, fold_memory: usize) {
    let h = &HISTORIES[history];
    let spill = tempfile::tempdir().expect("spill dir");
    let mapping = Mapping::new(&MappingConfig::default(), false);
    let start = cpu_time();
    let mut fold: Fold<i64> = Fold::new(FoldConfig {
        memory: fold_memory,
        spill_dir: spill.path().to_path_buf(),
        batch_size: 75,
        sent_memory: WindowConfig::default().delivered_memory,
    });
    let mut user = String::new();
    let mut settled = 0u64;
    for (offset, (u, seg, entered)) in changes(h).enumerate() {
        user.clear();
        write!(user, "user-{u:08}").unwrap();
        let segment = SEGMENT_NAMES[seg as usize];
        let event = Event {
            event_id: "".into(),
            external_id: Some(user.as_str().into()),
            email: None,
            segment_id: segment.into(),
            segment_name: None,
            change: if entered {
                Change::Entered
            } else {
                Change::Exited
            },
            occurred_at: 1_700_000_000_000 + offset as i64,
            sequence: None,
            attributes: Vec::new(),
        };
        fold.absorb(
            &event,
            Identity::ExternalId(&user),
            0,
            offset as i64,
            offset as i64,
            |_| settled += 1,
        )
        .expect("fold");
    }
    let read_cpu = cpu_time() - start;
    fold.start_sending().expect("start sending");
    let mut out = std::io::sink();
    let (mut objects, mut writes, mut bytes, mut in_requests) = (0u64, 0u64, 0u64, 0u64);
    let mut line = Vec::with_capacity(64 << 10);
    while let Some(flush) = fold
        .next_request(|_| true, |_| settled += 1)
        .expect("next request")
    {
        let encoded = mapping::encode(&mapping, fold.segments(), &flush);
        line.clear();
        line.extend_from_slice(b"{\"attributes\":[");
        for (i, o) in encoded.objects.iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            line.extend_from_slice(o);
        }
        line.extend_from_slice(b"]}\n");
        out.write_all(&line).unwrap();
        bytes += line.len() as u64;
        objects += encoded.objects.len() as u64;
        writes += encoded
            .data_points
            .iter()
            .map(|&p| u64::from(p))
            .sum::<u64>();
        in_requests += flush.positions.len() as u64;
    }
    let cpu = cpu_time() - start;
    let stats = fold.stats();
    assert_eq!(
        settled + in_requests,
        CHANGES as u64,
        "every record comes back once"
    );
    println!("cpu_ms {}", cpu.as_millis());
    println!("read_cpu_ms {}", read_cpu.as_millis());
    println!("objects {objects}");
    println!("writes {writes}");
    println!("requests {}", stats.requests);
    println!("users {}", stats.users);
    println!("bytes_spilled {}", stats.bytes_spilled);
    println!("ndjson_bytes {bytes}");
}

const SEGMENT_NAMES: [&str; 20] = [
    "seg_00", "seg_01", "seg_02", "seg_03", "seg_04", "seg_05", "seg_06", "seg_07", "seg_08",
    "seg_09", "seg_10", "seg_11", "seg_12", "seg_13", "seg_14", "seg_15", "seg_16", "seg_17",
    "seg_18", "seg_19",
];

struct Figures {
    cpu: Duration,
    peak_mb: f64,
    objects: u64,
    writes: u64,
    requests: u64,
    spilled: u64,
}

fn child(history: usize, fold_memory: usize) -> Figures {
    let exe = std::env::current_exe().expect("this bench");
    let child = Command::new(exe)
        .env(CASE_VAR, format!("{history}:{fold_memory}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the case");
    let rss = peak_rss_kb(child.id());
    let out = child.wait_with_output().expect("the case");
    let peak_kb = rss.join().unwrap_or(0);
    assert!(out.status.success(), "case {history}:{fold_memory} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in\n{text}"))
    };
    Figures {
        cpu: Duration::from_millis(get("cpu_ms")),
        peak_mb: peak_kb as f64 * 1024.0 / 1e6,
        objects: get("objects"),
        writes: get("writes"),
        requests: get("requests"),
        spilled: get("bytes_spilled"),
    }
}

/// The floor, from the history alone: users with a change, distinct (user, segment) pairs.
fn floor(h: &History) -> (u64, u64) {
    let mut users = HashSet::new();
    let mut pairs = HashSet::new();
    for (u, s, _) in changes(h) {
        users.insert(u);
        pairs.insert(u * 64 + s);
    }
    (users.len() as u64, pairs.len() as u64)
}

fn main() {
    if let Ok(case) = std::env::var(CASE_VAR) {
        let (h, m) = case.split_once(':').expect("history:memory");
        run_case(h.parse().unwrap(), m.parse().unwrap());
        return;
    }
    // `cargo bench` passes --bench; nothing else is taken.
    let default_memory = ReplayConfig::default().fold_memory;
    let mut v = Verdicts::default();
    for (i, h) in HISTORIES.iter().enumerate() {
        let (users, pairs) = floor(h);
        let whole = child(i, default_memory);
        println!(
            "{}: {CHANGES} changes, {users} users, {pairs} pairs; fold_memory 64 MiB: {:.2} s CPU, peak {:.0} MB, {} requests, {} objects ({:.3} x floor), {} writes ({:.3} x floor), {} bytes spilled",
            h.name,
            whole.cpu.as_secs_f64(),
            whole.peak_mb,
            whole.requests,
            whole.objects,
            whole.objects as f64 / users as f64,
            whole.writes,
            whole.writes as f64 / pairs as f64,
            whole.spilled
        );
        v.at_most(
            &format!("{}: objects / floor", h.name),
            whole.objects as f64 / users as f64,
            1.05,
            "x",
        );
        v.at_most(
            &format!("{}: attribute writes / floor", h.name),
            whole.writes as f64 / pairs as f64,
            1.05,
            "x",
        );
        if i == 0 {
            let base_cpu = whole.cpu;
            v.at_most(
                "1,000,000 changes of 200,000 users folded and encoded: CPU",
                whole.cpu.as_secs_f64(),
                3.0,
                "s",
            );
            v.at_most(
                "1,000,000 changes of 200,000 users folded and encoded: peak resident memory",
                whole.peak_mb,
                150.0,
                "MB",
            );
            let spilling = child(i, 8 << 20);
            println!(
                "{}: fold_memory 8 MiB: {:.2} s CPU, peak {:.0} MB, {} objects, {} writes, {} bytes spilled",
                h.name,
                spilling.cpu.as_secs_f64(),
                spilling.peak_mb,
                spilling.objects,
                spilling.writes,
                spilling.spilled
            );
            v.at_most(
                "the same with fold_memory 8 MiB (spilling): CPU / at 64 MiB",
                spilling.cpu.as_secs_f64() / base_cpu.as_secs_f64().max(1e-3),
                2.0,
                "x",
            );
            v.at_least(
                "the same with fold_memory 8 MiB: bytes spilled",
                spilling.spilled as f64,
                1.0,
                "bytes",
            );
            v.at_most(
                "the same with fold_memory 8 MiB: objects / floor",
                spilling.objects as f64 / users as f64,
                1.05,
                "x",
            );
            v.at_most(
                "the same with fold_memory 8 MiB: peak resident memory",
                spilling.peak_mb,
                150.0,
                "MB",
            );
        }
    }
    v.finish();
}
