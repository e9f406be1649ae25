//! `segment-sync snapshot`: one run of a segment's member list (a Dynamics 365 Customer
//! Insights export, a CSV or NDJSON file) diffed against the members after the last applied
//! run, kept in a compacted Kafka topic, and written as ENTERED / EXITED `change` records
//! together with the new state, in transactions, exactly once.
//!
//! Reading, the diff and the state records are pure and tested on their own; `store` is the
//! only part that knows Kafka.

/// Pure: the diff of one bucket, the order of runs, the shrink guard.
pub mod diff;
/// Pure: the CDM `model.json` of a Customer Insights export.
pub mod model;
/// Where a run is, its name and time, its rows as members.
pub mod read;
/// A run in an object store, copied to a local staging folder of the same layout.
pub mod remote;
/// Hash-partitioned spill files of a run and of the state.
pub mod spill;
/// Pure: the state topic's keys and versioned values.
pub mod state;
/// Kafka: the state topic, reading it read-committed, the transactional writer.
pub mod store;

use std::io::Write;

use crate::config::{Config, Format};
use crate::event::{Change, Event};
use crate::tools::encode;

use diff::{Applied, By, Counts, Digest, Mode, Order, Planned};
use spill::{Spill, BUCKETS};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The input is refused as it is (exit 1): incomplete, unreadable, malformed.
    #[error("{file}{}: {reason}", if *line > 0 { format!(":{line}") } else { String::new() })]
    Refused {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("state topic: {0}")]
    State(String),
    #[error("spill files: {0}")]
    Spill(String),
    #[error("kafka: {0}")]
    Kafka(String),
}

impl SnapshotError {
    /// 1 for a refused input, 2 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            SnapshotError::Refused { .. } => 1,
            _ => 2,
        }
    }
}

#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct SnapshotArgs {
    /// The segment the members belong to (the `segment_id` of the changes).
    #[arg(long)]
    pub segment: String,
    /// A run folder, a table folder (with --latest), or a .csv / .ndjson file.
    #[arg(long, required_unless_present = "retire")]
    pub from: Option<String>,
    /// The column holding the Braze external_id.
    #[arg(long, default_value = "CustomerId")]
    pub id_column: String,
    /// The column holding the email, for members without an external id.
    #[arg(long)]
    pub email_column: Option<String>,
    /// The run's name (default: the run folder's <yyyy>/<mm>/<dd>/<HHMM>, or the file name).
    #[arg(long)]
    pub run: Option<String>,
    /// The run's time, RFC 3339 (default: the run folder's; required for a single file).
    #[arg(long)]
    pub run_time: Option<String>,
    /// Read the newest <yyyy>/<mm>/<dd>/<HHMM> run under the table folder --from names.
    #[arg(long)]
    pub latest: bool,
    /// Refuse a run that would exit more than this share of the last run's members.
    #[arg(long, default_value_t = 0.5)]
    pub max_shrink: f64,
    /// Apply a run the shrink guard refuses.
    #[arg(long)]
    pub force: bool,
    /// Also send ENTERED for every unchanged member (new event ids).
    #[arg(long, conflicts_with = "retire")]
    pub restate: bool,
    /// Send EXITED for every member of the last run and remove the segment's state.
    #[arg(long)]
    pub retire: bool,
    /// Print the counts and the first changes as NDJSON; produce nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Serve segment_sync_snapshot_* on server.listen while running.
    #[arg(long)]
    pub metrics: bool,
    /// Test hook: stop before committing this transaction, and wait to be killed.
    #[arg(long, hide = true)]
    pub pause_before_transaction: Option<u64>,
}

/// What a snapshot did, printed at the end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub segment: String,
    pub run: String,
    pub status: &'static str,
    #[serde(flatten)]
    pub counts: Counts,
    pub transactions: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicated: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Outcome {
    /// 0 applied or nothing to do, 1 refused.
    pub fn exit_code(&self) -> u8 {
        if self.status == "refused" {
            1
        } else {
            0
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "snapshot {} run {}: {}; members {}, entered {}, exited {}, unchanged {}, \
             restated {}, skipped rows {}, duplicates {}, previous members {}, transactions {}",
            self.segment,
            self.run,
            self.status,
            c.members,
            c.entered,
            c.exited,
            c.unchanged,
            c.restated,
            c.skipped_rows,
            c.duplicates,
            c.previous,
            self.transactions
        )?;
        if !self.duplicated.is_empty() {
            write!(f, "; duplicated identities: {}", self.duplicated.join(", "))?;
        }
        if let Some(r) = &self.reason {
            write!(f, "; {r}")?;
        }
        Ok(())
    }
}

/// The change's event id: a UUID v5 of (segment, run, user, change), so a repeated run writes
/// exactly the same record; `--restate` adds its own nonce for new ids.
pub fn event_id(
    segment: &str,
    run: &str,
    user: &str,
    change: Change,
    nonce: Option<&str>,
) -> String {
    let mut name = Vec::with_capacity(segment.len() + run.len() + user.len() + 16);
    for part in [segment, run, user, change.symbol()] {
        name.extend_from_slice(part.as_bytes());
        name.push(0);
    }
    if let Some(n) = nonce {
        name.extend_from_slice(n.as_bytes());
    }
    // A namespace of our own, so these ids never meet another tool's v5 ids.
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x5e6d_e7c0_5a1a_4d1e_9c3e_0b5a_a9f0_2a21);
    uuid::Uuid::new_v5(&NS, &name).to_string()
}

/// The `change` record of one planned change.
pub fn change_event<'a>(
    segment: &'a str,
    run: &str,
    time_ms: i64,
    p: &'a Planned,
    nonce: Option<&str>,
) -> Event<'a> {
    let m = &p.member;
    Event {
        event_id: event_id(segment, run, &m.user, p.change, nonce).into(),
        external_id: (m.by == By::ExternalId).then(|| m.user.as_str().into()),
        email: m.email.as_deref().map(Into::into),
        segment_id: segment.into(),
        segment_name: None,
        change: p.change,
        occurred_at: time_ms,
        sequence: Some(time_ms),
        attributes: Vec::new(),
    }
}

/// Encodes changes in the configured format.
pub struct Encoder {
    format: Format,
    schema_id: u32,
}

impl Encoder {
    pub fn new(format: Format, schema_id: u32) -> Encoder {
        Encoder { format, schema_id }
    }

    pub fn encode(&self, e: &Event) -> Vec<u8> {
        match self.format {
            Format::Json => encode::to_json(e),
            Format::Avro => encode::to_avro(e),
            Format::AvroConfluent => encode::to_confluent(self.schema_id, e),
        }
    }
}

/// How many changes `--dry-run` prints.
const DRY_RUN_SHOWN: usize = 20;

/// Live figures for the progress bar and the metrics.
#[derive(Debug, Default)]
pub struct Progress {
    pub written: std::sync::atomic::AtomicU64,
    pub total: std::sync::atomic::AtomicU64,
}

/// Runs the command (blocking: call it off the async runtime).
pub fn run(
    cfg: &Config,
    args: &SnapshotArgs,
    schema_id: u32,
    progress: &Progress,
    out: &mut dyn Write,
) -> Result<Outcome, SnapshotError> {
    let changes_topic = cfg.snapshot.changes_topic(&cfg.kafka).ok_or_else(|| {
        SnapshotError::Usage("no topic: set snapshot.topic or kafka.topics".into())
    })?;
    let state_topic = cfg
        .snapshot
        .state_topic_for(&cfg.kafka)
        .unwrap_or_else(|| format!("{changes_topic}.snapshots"));
    if let Some(problem) = cfg.snapshot_shape_problem() {
        return Err(SnapshotError::Usage(problem));
    }
    if args.segment.is_empty() || args.segment.contains('\0') {
        return Err(SnapshotError::Usage(
            "--segment must be a non-empty id without NUL".into(),
        ));
    }
    if !(0.0..=1.0).contains(&args.max_shrink) {
        return Err(SnapshotError::Usage(
            "--max-shrink is a fraction between 0 and 1".into(),
        ));
    }
    let started = std::time::Instant::now();
    let segment = args.segment.as_str();
    let mode = if args.retire {
        Mode::Retire
    } else if args.restate {
        Mode::Restate
    } else {
        Mode::Diff
    };

    // 1. The run, read completely (and refused if it is not) before anything is produced.
    let mut run_spill = Spill::new("segment-sync-run-")?;
    let mut run_name = args.run.clone().unwrap_or_default();
    let mut run_time = match &args.run_time {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| SnapshotError::Usage(format!("--run-time {t}: {e}")))?
                .timestamp_millis(),
        ),
        None => None,
    };
    let mut counts = Counts::default();
    if let Some(from) = &args.from {
        if mode != Mode::Retire {
            // A remote run is staged first, so the one reader serves both; its errors name
            // the object store's paths again.
            let staging = tempfile::Builder::new()
                .prefix("segment-sync-stage-")
                .tempdir()
                .map_err(|e| SnapshotError::Spill(e.to_string()))?;
            let staged = if remote::is_remote(from) {
                Some(remote::stage(
                    from,
                    args.latest,
                    &cfg.snapshot.storage,
                    staging.path(),
                )?)
            } else {
                None
            };
            let blame = |e: SnapshotError| match &staged {
                Some(s) => s.blame(e),
                None => e,
            };
            let (local, latest) = match &staged {
                Some(s) => (s.local.display().to_string(), false),
                None => (from.clone(), args.latest),
            };
            let source = read::locate(&local, latest).map_err(blame)?;
            if args.run.is_none() {
                run_name = source.name.clone();
            }
            run_time = run_time.or(source.time_ms);
            if run_time.is_none() {
                return Err(SnapshotError::Usage(format!(
                    "{from}: a single file has no run time: pass --run-time (RFC 3339)"
                )));
            }
            let columns = read::Columns {
                id: args.id_column.clone(),
                email: args.email_column.clone(),
            };
            let rows = read::read_rows(&source, &columns, |m| run_spill.put(&m)).map_err(blame)?;
            counts.skipped_rows = rows.skipped;
        }
    }
    run_spill.flush()?;

    let phase = |what: &str| {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot: {what}"
        )
    };
    phase("run read and spilled");
    // 2. The state as committed. The writer comes first: starting it fences (and aborts the
    // open transaction of) a killed or overlapping run of this segment.
    if !args.dry_run {
        store::ensure_state_topic(cfg, &state_topic)?;
    }
    let mut writer = if args.dry_run {
        None
    } else {
        Some(store::TxnWriter::new(
            cfg,
            segment,
            &changes_topic,
            &state_topic,
            args.pause_before_transaction,
        )?)
    };
    phase("producer ready");
    let mut state_spill = Spill::new("segment-sync-state-")?;
    let applied = if args.dry_run && !store::topic_exists(cfg, &state_topic)? {
        None
    } else {
        store::read_state(cfg, &state_topic, segment, &mut state_spill)?
    };

    let now_ms = chrono::Utc::now().timestamp_millis();
    if mode == Mode::Retire {
        // Later than every change of the segment, so last write wins makes the exit stick.
        let last = applied.as_ref().map(|a| a.time_ms).unwrap_or(0);
        run_time = Some(run_time.unwrap_or(now_ms).max(last + 1));
        if run_name.is_empty() {
            run_name = format!(
                "retire:{}",
                applied.as_ref().map(|a| a.run.as_str()).unwrap_or("-")
            );
        }
    }
    let time_ms = run_time.unwrap_or(now_ms);

    phase("state read");
    // 3. Pass one: counts, digest, guards. Nothing is written yet.
    let mut digest = Digest::default();
    let mut duplicated = Vec::new();
    for b in 0..BUCKETS {
        let cur = run_spill.load(b)?;
        let prev = state_spill.load(b)?;
        let (_, c) = diff::diff(&prev.members, &cur.members, mode);
        counts.add(&c);
        counts.duplicates += cur.duplicates;
        if duplicated.len() < 10 {
            duplicated.extend(cur.duplicated);
        }
        digest.merge(&spill::digest(&cur.members));
    }
    duplicated.truncate(10);
    let mut outcome = Outcome {
        segment: segment.to_string(),
        run: run_name.clone(),
        status: "applied",
        counts,
        transactions: 0,
        duplicated,
        reason: None,
    };
    let refuse = |mut o: Outcome, reason: String| {
        o.status = "refused";
        o.reason = Some(reason);
        Ok(o)
    };
    if mode == Mode::Retire {
        if counts.previous == 0 {
            outcome.status = "nothing to do";
            outcome.reason = Some("the segment has no state to retire".into());
            return Ok(outcome);
        }
    } else {
        match diff::order(applied.as_ref(), &run_name, time_ms, &digest) {
            Order::Apply => {}
            Order::AlreadyApplied if mode == Mode::Restate => {}
            Order::AlreadyApplied => {
                outcome.status = "nothing to do";
                outcome.reason = Some("already applied".into());
                return Ok(outcome);
            }
            Order::Refused(r) => return refuse(outcome, r),
            Order::Conflict(r) => return Err(SnapshotError::Usage(r)),
        }
        let last_members = applied
            .as_ref()
            .map(|a| a.members)
            .unwrap_or(counts.previous);
        if let Some(r) =
            diff::shrink_refusal(counts.exited, last_members, args.max_shrink, args.force)
        {
            return refuse(outcome, r);
        }
    }
    let nonce = (mode == Mode::Restate).then(|| format!("restate@{now_ms}"));
    let encoder = Encoder::new(cfg.kafka.format, schema_id);
    let total = counts.entered + counts.exited + counts.restated;
    progress
        .total
        .store(total, std::sync::atomic::Ordering::Relaxed);

    phase("diffed");
    // 4. Pass two: the changes with their state, in transactions; the segment's record last.
    if args.dry_run {
        outcome.status = "dry run";
        writeln!(
            out,
            "{}",
            serde_json::to_string(&outcome).unwrap_or_default()
        )
        .map_err(|e| SnapshotError::Usage(e.to_string()))?;
        let mut shown = 0;
        for b in 0..BUCKETS {
            if shown >= DRY_RUN_SHOWN {
                break;
            }
            let cur = run_spill.load(b)?;
            let prev = state_spill.load(b)?;
            let (planned, _) = diff::diff(&prev.members, &cur.members, mode);
            for p in planned.iter().take(DRY_RUN_SHOWN - shown) {
                let e = change_event(segment, &run_name, time_ms, p, nonce.as_deref());
                out.write_all(&encode::to_json(&e))
                    .and_then(|_| out.write_all(b"\n"))
                    .map_err(|e| SnapshotError::Usage(e.to_string()))?;
                shown += 1;
            }
        }
        return Ok(outcome);
    }
    let Some(writer) = writer.as_mut() else {
        return Ok(outcome);
    };
    // Nothing changed (the usual day): pass two would find nothing to write.
    for b in (0..BUCKETS).filter(|_| total > 0) {
        let cur = run_spill.load(b)?;
        let prev = state_spill.load(b)?;
        let (planned, _) = diff::diff(&prev.members, &cur.members, mode);
        for p in &planned {
            let e = change_event(segment, &run_name, time_ms, p, nonce.as_deref());
            let payload = encoder.encode(&e);
            let key = state::member_key(segment, &p.member.user);
            let state = match (p.change, p.restated) {
                (Change::Entered, false) => {
                    Some((key, Some(state::member_value(&run_name, &p.member))))
                }
                (Change::Entered, true) => None,
                (Change::Exited, _) => Some((key, None)),
            };
            writer.change(&p.member.user, &payload, state)?;
            progress
                .written
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // A retired segment keeps its record (no members, the retirement's time): an export
    // older than the retirement is refused like any older run, since its ENTERED would be
    // older than the EXITED just sent.
    let record = Applied {
        run: run_name.clone(),
        time_ms,
        members: digest.members,
        digest: digest.hex(),
    };
    phase("changes written");
    writer.finish(segment, Some(&record))?;
    phase("committed");
    outcome.transactions = writer.committed;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_differ_by_every_part() {
        let a = event_id("s", "r", "u", Change::Entered, None);
        assert_eq!(a, event_id("s", "r", "u", Change::Entered, None));
        for other in [
            event_id("s2", "r", "u", Change::Entered, None),
            event_id("s", "r2", "u", Change::Entered, None),
            event_id("s", "r", "u2", Change::Entered, None),
            event_id("s", "r", "u", Change::Exited, None),
            event_id("s", "r", "u", Change::Entered, Some("restate@1")),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn a_change_carries_the_run_time_as_occurred_at_and_sequence() {
        let p = Planned {
            member: diff::Member {
                user: "u1".into(),
                by: By::ExternalId,
                email: Some("a@x.io".into()),
            },
            change: Change::Exited,
            restated: false,
        };
        let e = change_event("seg", "r", 1234, &p, None);
        assert_eq!(e.external_id.as_deref(), Some("u1"));
        assert_eq!(e.email.as_deref(), Some("a@x.io"));
        assert_eq!((e.occurred_at, e.sequence), (1234, Some(1234)));
        assert_eq!(e.change, Change::Exited);
    }
}
