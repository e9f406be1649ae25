//! `segment-sync replay`: a backfill beside the live group. Reads from a chosen point under a
//! group of its own, and exits once caught up with the log (DESIGN.md: after a flush Braze
//! acknowledged, the end offsets had not moved past what replay consumed), so the live
//! group's next write for any user is newer than the replay's last one.

use std::collections::BTreeMap;

use crate::pipeline::{StartAt, Until};

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
    /// (a Job's pods) pass the same id to share its partitions and continue each other's
    /// progress; a run with another id, or none (a fresh one), starts over at `--from`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
