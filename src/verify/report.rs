//! Pure: what a run says. One NDJSON line per user that is not in sync (drifted, missing in
//! Braze, dead-lettered, or still changing), and a summary with the exit code.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::compare::Difference;
use super::state::UserState;

/// The exit code when drift was found: a CronJob or CI step fails on it.
pub const EXIT_DRIFT: u8 = 3;
/// The exit code when the run could not conclude (stopped, or users still changing).
pub const EXIT_INCOMPLETE: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The profile differs from the log's last writes.
    Drifted,
    /// Braze has no such user although the worker would have created it.
    Missing,
    /// Every difference comes from a last write Braze refused (it is in the dead-letter
    /// topic): known, not drift.
    DeadLettered,
    /// The live group had not committed past the user's last writes in time, or the user
    /// kept changing: not judged.
    Unsettled,
}

/// One segment's last write as the log leaves it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub change: &'static str,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One NDJSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserLine {
    pub external_id: String,
    pub status: Status,
    /// Segment id → its last write and the record that decided it.
    pub log: BTreeMap<String, LogEntry>,
    /// The attributes of the profile the mapping writes; `null` when Braze has no profile.
    pub braze: Option<Map<String, Value>>,
    pub differences: Vec<Difference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl UserLine {
    pub fn new(
        external_id: &str,
        status: Status,
        user: &UserState,
        braze: Option<Map<String, Value>>,
        differences: Vec<Difference>,
    ) -> UserLine {
        UserLine {
            external_id: external_id.to_string(),
            status,
            log: user
                .segments
                .iter()
                .map(|(segment, last)| {
                    (
                        segment.to_string(),
                        LogEntry {
                            change: last.change.symbol(),
                            topic: last.at.topic.to_string(),
                            partition: last.at.partition,
                            offset: last.at.offset,
                        },
                    )
                })
                .collect(),
            braze,
            differences,
            note: None,
        }
    }

    pub fn to_ndjson(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a report line serialises");
        line.push('\n');
        line
    }
}

/// What a repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairSummary {
    pub dry_run: bool,
    /// Users whose log state was sent (or printed, for a dry run).
    pub sent: u64,
    /// Users left alone because the log moved on for them meanwhile.
    pub changing: u64,
    /// Users whose objects Braze rejected; their deciding records were dead-lettered.
    pub rejected: u64,
    /// Users that matched the log when checked again.
    pub fixed: u64,
    pub still_drifted: u64,
}

/// Why attributes were not judged, for the summary's note.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unjudged {
    pub attributes: u64,
    pub empty_prefix: bool,
    pub partial_log: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub sample: String,
    pub records_read: u64,
    pub records_skipped: u64,
    pub users_checked: u64,
    pub in_sync: u64,
    pub drifted: u64,
    pub missing: u64,
    pub dead_lettered: u64,
    pub unsettled: u64,
    pub email_only: u64,
    pub rechecked: u64,
    pub export_requests: u64,
    pub unjudged: Unjudged,
    pub repair: Option<RepairSummary>,
    /// Stopped (SIGTERM) before it could conclude.
    pub stopped: bool,
    pub elapsed: Duration,
}

impl Summary {
    pub fn drift_found(&self) -> bool {
        self.drifted + self.missing > 0
    }

    /// 3 when drift was found (even if repaired: it was there); 1 when the run could not
    /// conclude; 0 in sync.
    pub fn exit_code(&self) -> u8 {
        if self.drift_found() {
            EXIT_DRIFT
        } else if self.stopped || self.unsettled > 0 {
            EXIT_INCOMPLETE
        } else {
            0
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "users checked          {} ({})",
            self.users_checked, self.sample
        )?;
        writeln!(f, "  in sync              {}", self.in_sync)?;
        writeln!(f, "  drifted              {}", self.drifted)?;
        writeln!(f, "  missing in Braze     {}", self.missing)?;
        writeln!(
            f,
            "  dead-lettered        {} (the last write is in the dead-letter topic: not drift)",
            self.dead_lettered
        )?;
        writeln!(
            f,
            "  still changing       {} (not judged: the live group had not delivered them)",
            self.unsettled
        )?;
        writeln!(f, "  re-checked           {}", self.rechecked)?;
        writeln!(f, "skipped (email only)   {}", self.email_only)?;
        writeln!(
            f,
            "records read           {} ({} undecodable or invalid)",
            self.records_read, self.records_skipped
        )?;
        writeln!(f, "export requests        {}", self.export_requests)?;
        if self.unjudged.attributes > 0 {
            let why = match (self.unjudged.empty_prefix, self.unjudged.partial_log) {
                (true, false) => "with an empty mapping.attribute_prefix, an attribute that no segment of the log names cannot be told from the users' other attributes",
                (false, true) => "the log was not read from its first record (--from a time, or retention deleted its start), so memberships it does not name may predate what was read",
                _ => "attributes no segment of the log names cannot be told from other attributes, and memberships the read part of the log does not name may predate it",
            };
            writeln!(
                f,
                "attributes not judged  {}: {why}",
                self.unjudged.attributes
            )?;
        }
        if let Some(r) = &self.repair {
            if r.dry_run {
                writeln!(
                    f,
                    "repair (dry run)       {} users printed, none sent",
                    r.sent
                )?;
            } else {
                writeln!(f, "repair                 {} users sent", r.sent)?;
                writeln!(f, "  fixed                {}", r.fixed)?;
                writeln!(f, "  still drifted        {}", r.still_drifted)?;
                writeln!(f, "  rejected by Braze    {} (dead-lettered)", r.rejected)?;
            }
            if r.changing > 0 {
                writeln!(
                    f,
                    "  left alone           {} (changed in the log meanwhile: the live group writes them)",
                    r.changing
                )?;
            }
        }
        if self.stopped {
            writeln!(f, "stopped before the check was complete")?;
        }
        write!(f, "elapsed                {:.2?}", self.elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;
    use crate::verify::state::{Coord, Last};
    use crate::window::Order;
    use serde_json::json;
    use std::sync::Arc;

    #[test]
    fn exit_codes_put_drift_first() {
        let mut s = Summary::default();
        assert_eq!(s.exit_code(), 0);
        s.unsettled = 1;
        assert_eq!(s.exit_code(), 1);
        s.missing = 1;
        assert_eq!(s.exit_code(), 3);
        let s = Summary {
            stopped: true,
            ..Summary::default()
        };
        assert_eq!(s.exit_code(), 1);
        let s = Summary {
            dead_lettered: 4,
            ..Summary::default()
        };
        assert_eq!(s.exit_code(), 0, "dead-lettered is reported apart");
    }

    #[test]
    fn a_line_has_the_log_braze_and_the_deciding_offsets() {
        let at = Coord {
            topic: Arc::from("t"),
            partition: 2,
            offset: 41,
        };
        let mut user = UserState::default();
        user.segments.insert(
            "a".into(),
            Last {
                change: Change::Entered,
                order: Order {
                    sequence: 1,
                    occurred_at: 0,
                    partition: 2,
                    offset: 41,
                },
                at: at.clone(),
                event: 0,
            },
        );
        let d = Difference {
            segment: "a".into(),
            attribute: "cdp_a".into(),
            expected: json!(true),
            found: json!(false),
            deciding: Some(at),
            dead_lettered: false,
        };
        let line = UserLine::new(
            "u1",
            Status::Drifted,
            &user,
            Some(json!({"cdp_a": false}).as_object().unwrap().clone()),
            vec![d],
        );
        let text = line.to_ndjson();
        assert!(text.ends_with('\n') && !text[..text.len() - 1].contains('\n'));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({
                "external_id": "u1",
                "status": "drifted",
                "log": {"a": {"change": "ENTERED", "topic": "t", "partition": 2, "offset": 41}},
                "braze": {"cdp_a": false},
                "differences": [{
                    "segment": "a", "attribute": "cdp_a", "expected": true, "found": false,
                    "deciding": {"topic": "t", "partition": 2, "offset": 41}
                }]
            })
        );
    }
}
