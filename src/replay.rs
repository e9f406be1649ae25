//! `segment-sync replay`: a backfill beside the live group. Reads from a chosen point under a
//! group of its own, and exits once caught up with the log (docs/design.md: after a flush Braze
//! acknowledged, the end offsets had not moved past what replay consumed), so the live
//! group's next write for any user is newer than the replay's last one.

use std::collections::BTreeMap;

use crate::start::{StartAt, Until};

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// `earliest`, an RFC 3339 time (`2024-05-01T00:00:00Z`), or `partition:offset,...`.
    #[arg(long)]
    pub from: String,
    /// Write the requests it would send as NDJSON to stdout; send nothing to Braze.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop at the end offsets taken at start instead of catching up with the live log.
    #[arg(long)]
    pub until_start: bool,
    /// The consumer group; default `<kafka.group_id>.replay` (a group of its own for a dry
    /// run), so the live group keeps its offsets.
    #[arg(long)]
    pub group: Option<String>,
    /// Names this run in the offsets it commits. Members started together for one backfill
    /// (a Job's pods) pass the same id to share its partitions; a member commits only once
    /// everything it read is sent and settled, so a stopped member's partitions are read
    /// again from the run's start (or its last such commit). A run with another id, or none
    /// (a fresh one), starts over at `--from`.
    #[arg(long, env = "SEGMENT_SYNC_REPLAY_RUN_ID")]
    pub run_id: Option<String>,
}

/// The consumer group of a replay. A dry run commits nothing, so it could not tell other
/// members how far it read: it reads every partition itself, in a group of its own.
pub fn group(args: &ReplayArgs, live_group: &str) -> String {
    match (&args.group, args.dry_run) {
        (Some(g), _) => g.clone(),
        (None, false) => format!("{live_group}.replay"),
        (None, true) => format!(
            "{live_group}.replay.dry-run.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--from {given:?}: {why}; expected `earliest`, an RFC 3339 time such as 2024-05-01T00:00:00Z, or partition:offset pairs such as 0:1200,3:0")]
pub struct FromError {
    given: String,
    why: String,
}

/// Parses `--from`.
pub fn parse_from(s: &str) -> Result<StartAt, FromError> {
    let err = |why: &str| FromError {
        given: s.to_string(),
        why: why.to_string(),
    };
    let s = s.trim();
    if s.eq_ignore_ascii_case("earliest") {
        return Ok(StartAt::Earliest);
    }
    if s.contains('T') || s.contains('t') {
        let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| err(&e.to_string()))?;
        return Ok(StartAt::Timestamp(t.timestamp_millis()));
    }
    let mut offsets = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (p, o) = pair
            .split_once(':')
            .ok_or_else(|| err(&format!("`{pair}` is not partition:offset")))?;
        let p: i32 = p
            .trim()
            .parse()
            .map_err(|_| err(&format!("partition `{p}` is not a number")))?;
        let o: i64 = o
            .trim()
            .parse()
            .map_err(|_| err(&format!("offset `{o}` is not a number")))?;
        if p < 0 || o < 0 {
            return Err(err("partitions and offsets are not negative"));
        }
        if offsets.insert(p, o).is_some() {
            return Err(err(&format!("partition {p} is named twice")));
        }
    }
    if offsets.is_empty() {
        return Err(err("nothing to start from"));
    }
    Ok(StartAt::Offsets(offsets))
}

/// Where a replay stops: a dry run writes nothing, so nothing can race the live group, and
/// it may stop at the start's end offsets like `--until-start`.
pub fn until(args: &ReplayArgs) -> Until {
    if args.dry_run || args.until_start {
        Until::StartOffsets
    } else {
        Until::CaughtUp
    }
}

/// How a replay marks the offsets it commits, and which marks it trusts: the commits of
/// its own run (a partition handed from one member to another continues where the first
/// stopped), never an earlier run's (a backfill run again starts over).
///
/// Members of one run are recognised by an explicit run id when one is given (a Job's id,
/// so that a retried pod continues its run); otherwise by the same start (`--from` and its
/// stop rule) and a commit made after this member started: live members commit every
/// interval, so the others' progress is always newer than a member that joins them, while
/// an earlier run's last commit is older. Clocks of different hosts are compared there;
/// a skew larger than the gap between two runs of one backfill would let the second trust
/// the first's last commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMark {
    run: Option<String>,
    spec: String,
    started_ms: i64,
}

const MARK_PREFIX: &str = "segment-sync replay";

impl RunMark {
    pub fn new(run: Option<String>, start: &StartAt, until: Until, started_ms: i64) -> RunMark {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        format!("{start:?}/{until:?}").hash(&mut h);
        RunMark {
            run: run.filter(|r| !r.is_empty()),
            spec: format!("{:016x}", h.finish()),
            started_ms,
        }
    }

    /// The metadata of a commit made at `now_ms`.
    pub fn stamp(&self, now_ms: i64) -> String {
        let mut m = format!("{MARK_PREFIX} spec={} at={now_ms}", self.spec);
        if let Some(run) = &self.run {
            m.push_str(" run=");
            // Metadata is one line of words: the id is kept to what cannot break it.
            m.extend(run.chars().filter(|c| !c.is_whitespace()).take(128));
        }
        m
    }

    /// Whether a commit with this metadata was made by this run.
    pub fn trusts(&self, metadata: &str) -> bool {
        let Some(rest) = metadata.strip_prefix(MARK_PREFIX) else {
            return false;
        };
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        };
        if field("spec") != Some(self.spec.as_str()) {
            return false;
        }
        match &self.run {
            Some(run) => field("run").is_some_and(|r| {
                r == run
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .take(128)
                    .collect::<String>()
            }),
            None => field("at")
                .and_then(|at| at.parse::<i64>().ok())
                .is_some_and(|at| at >= self.started_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_trusts_its_members_commits_and_never_an_earlier_runs() {
        let from = StartAt::Earliest;
        let first = RunMark::new(None, &from, Until::CaughtUp, 1_000);
        let old = first.stamp(5_000);
        // The same backfill run again later: the first run's last commit is older.
        let again = RunMark::new(None, &from, Until::CaughtUp, 9_000);
        assert!(!again.trusts(&old));
        // A member of the second run, committing after the other member started.
        let member = RunMark::new(None, &from, Until::CaughtUp, 9_500);
        assert!(again.trusts(&member.stamp(9_600)));
        // Another start or stop rule is another backfill.
        let other = RunMark::new(None, &StartAt::Timestamp(7), Until::CaughtUp, 9_000);
        assert!(!other.trusts(&member.stamp(9_600)));
        let until_start = RunMark::new(None, &from, Until::StartOffsets, 9_000);
        assert!(!until_start.trusts(&member.stamp(9_600)));
        // Commits of the live group, or of nothing known, are never a run's.
        assert!(!again.trusts(""));
        assert!(!again.trusts("some other tool"));
    }

    #[test]
    fn an_explicit_run_id_is_trusted_whenever_it_committed() {
        let from = StartAt::Earliest;
        let pod = RunMark::new(Some("job-7f3a".into()), &from, Until::CaughtUp, 9_000);
        let earlier_pod = RunMark::new(Some("job-7f3a".into()), &from, Until::CaughtUp, 1_000);
        assert!(
            pod.trusts(&earlier_pod.stamp(2_000)),
            "a retried pod continues"
        );
        let other_job = RunMark::new(Some("job-0000".into()), &from, Until::CaughtUp, 1_000);
        assert!(!pod.trusts(&other_job.stamp(9_999)));
        let anonymous = RunMark::new(None, &from, Until::CaughtUp, 8_000);
        assert!(!pod.trusts(&anonymous.stamp(9_999)));
    }

    #[test]
    fn from_accepts_the_three_forms() {
        assert_eq!(parse_from("earliest"), Ok(StartAt::Earliest));
        assert_eq!(
            parse_from("2024-01-01T00:00:01+01:00"),
            Ok(StartAt::Timestamp(1_704_063_601_000))
        );
        assert_eq!(
            parse_from("0:10, 3:0"),
            Ok(StartAt::Offsets(BTreeMap::from([(0, 10), (3, 0)])))
        );
    }

    #[test]
    fn from_rejects_with_the_expected_forms() {
        for bad in [
            "",
            "0:",
            "a:1",
            "1:-2",
            "0:1,0:2",
            "2024-13-01T00:00:00Z",
            "latest",
        ] {
            let e = parse_from(bad).unwrap_err().to_string();
            assert!(e.contains("expected `earliest`"), "{bad}: {e}");
        }
    }
}
