//! Pure: a run's members against the members after the last applied run → ENTERED and EXITED;
//! whether a run may be applied at all (its order, the shrink guard). Works one hash bucket at
//! a time, so the caller decides how much of a large run is in memory at once.

use std::collections::HashMap;

use crate::event::Change;

/// How a member is addressed in Braze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum By {
    ExternalId,
    Email,
}

/// One member of a segment: `user` is the identity (the external id, else the email).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: String,
    pub by: By,
    pub email: Option<String>,
}

/// Members of one bucket, by identity.
pub type Members = HashMap<String, Member>;

/// What to send besides the difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// ENTERED for joiners, EXITED for leavers.
    Diff,
    /// Also ENTERED for every unchanged member (a repair after a dead-lettered change).
    Restate,
    /// EXITED for every member of the last run; the segment's state is removed.
    Retire,
}

/// One change to write, with the member it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub member: Member,
    pub change: Change,
    /// ENTERED for a member that was already one (`--restate`): its state is not rewritten.
    pub restated: bool,
}

/// The figures a run is judged by and reported with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Distinct members of this run.
    pub members: u64,
    pub entered: u64,
    pub exited: u64,
    pub unchanged: u64,
    /// ENTERED sent again for unchanged members (`--restate`).
    pub restated: u64,
    /// Rows without an identity.
    pub skipped_rows: u64,
    /// Rows repeating an identity already seen in this run (counted once as a member).
    pub duplicates: u64,
    /// Members after the last applied run, as committed.
    pub previous: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.members += o.members;
        self.entered += o.entered;
        self.exited += o.exited;
        self.unchanged += o.unchanged;
        self.restated += o.restated;
        self.skipped_rows += o.skipped_rows;
        self.duplicates += o.duplicates;
        self.previous += o.previous;
    }
}

/// The changes of one bucket, ENTERED before EXITED, each in the order of identity so that a
/// repeated invocation writes the same records in the same order.
pub fn diff(previous: &Members, current: &Members, mode: Mode) -> (Vec<Planned>, Counts) {
    let mut counts = Counts {
        members: if mode == Mode::Retire {
            0
        } else {
            current.len() as u64
        },
        previous: previous.len() as u64,
        ..Counts::default()
    };
    let mut out = Vec::new();
    if mode != Mode::Retire {
        // Only what changes is collected and sorted: an unchanged member, most of a run,
        // costs one lookup.
        let mut joined: Vec<(&Member, bool)> = Vec::new();
        for m in current.values() {
            let known = previous.contains_key(&m.user);
            if known {
                counts.unchanged += 1;
            } else {
                counts.entered += 1;
            }
            if !known || mode == Mode::Restate {
                joined.push((m, known));
            }
        }
        joined.sort_unstable_by(|a, b| a.0.user.cmp(&b.0.user));
        for (m, known) in joined {
            counts.restated += u64::from(known);
            out.push(Planned {
                member: m.clone(),
                change: Change::Entered,
                restated: known,
            });
        }
    }
    let mut left: Vec<&Member> = previous
        .values()
        .filter(|m| mode == Mode::Retire || !current.contains_key(&m.user))
        .collect();
    left.sort_unstable_by(|a, b| a.user.cmp(&b.user));
    counts.exited = left.len() as u64;
    out.extend(left.into_iter().map(|m| Planned {
        member: m.clone(),
        change: Change::Exited,
        restated: false,
    }));
    (out, counts)
}

/// An order-independent digest of a run's distinct members (their count and a sum of stable
/// hashes): it tells "the same run again" from "the same run name with other members".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    pub members: u64,
    pub sum: u64,
}

impl Digest {
    pub fn add(&mut self, user: &str) {
        self.members += 1;
        self.sum = self.sum.wrapping_add(fnv1a(user.as_bytes()));
    }

    pub fn merge(&mut self, o: &Digest) {
        self.members += o.members;
        self.sum = self.sum.wrapping_add(o.sum);
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.sum)
    }
}

/// FNV-1a, 64 bits: stable across versions and platforms, as a stored digest must be.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The run the state says was applied last and completely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub run: String,
    pub time_ms: i64,
    pub members: u64,
    pub digest: String,
}

/// Whether a run may be applied after the last applied one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    Apply,
    /// The same run with the same members: nothing to do.
    AlreadyApplied,
    /// Not newer than the last applied run (exit 1).
    Refused(String),
    /// The same run name with other members (exit 2).
    Conflict(String),
}

pub fn order(applied: Option<&Applied>, run: &str, time_ms: i64, digest: &Digest) -> Order {
    let Some(last) = applied else {
        return Order::Apply;
    };
    if last.run == run {
        return if last.members == digest.members && last.digest == digest.hex() {
            Order::AlreadyApplied
        } else {
            Order::Conflict(format!(
                "run {run} was applied with {} members and digest {}; this one has {} members \
                 and digest {}: give the changed export another --run name",
                last.members,
                last.digest,
                digest.members,
                digest.hex()
            ))
        };
    }
    if time_ms <= last.time_ms {
        return Order::Refused(format!(
            "run {run} ({}) is not newer than the last applied run {} ({})",
            rfc3339(time_ms),
            last.run,
            rfc3339(last.time_ms)
        ));
    }
    Order::Apply
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// `None` when the run may go ahead; else why it is refused: more EXITED than `max_shrink`
/// times the last run's members.
pub fn shrink_refusal(
    exited: u64,
    last_members: u64,
    max_shrink: f64,
    force: bool,
) -> Option<String> {
    if force || last_members == 0 {
        return None;
    }
    let allowed = max_shrink * last_members as f64;
    (exited as f64 > allowed).then(|| {
        format!(
            "{exited} of the last run's {last_members} members would exit, more than \
             --max-shrink {max_shrink} allows ({}): a failed or partial export? Check it, then \
             pass --force to apply it",
            allowed.floor() as u64
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Members {
        ids.iter()
            .map(|id| {
                (
                    id.to_string(),
                    Member {
                        user: id.to_string(),
                        by: By::ExternalId,
                        email: None,
                    },
                )
            })
            .collect()
    }

    fn changes(planned: &[Planned]) -> Vec<(String, Change)> {
        planned
            .iter()
            .map(|p| (p.member.user.clone(), p.change))
            .collect()
    }

    #[test]
    fn the_first_run_enters_every_member() {
        let (out, counts) = diff(&Members::new(), &members(&["b", "a"]), Mode::Diff);
        assert_eq!(
            changes(&out),
            [("a".into(), Change::Entered), ("b".into(), Change::Entered)]
        );
        assert_eq!((counts.members, counts.entered, counts.exited), (2, 2, 0));
    }

    #[test]
    fn joiners_enter_leavers_exit_and_the_rest_send_nothing() {
        let (out, counts) = diff(
            &members(&["a", "b", "c"]),
            &members(&["b", "c", "d"]),
            Mode::Diff,
        );
        assert_eq!(
            changes(&out),
            [("d".into(), Change::Entered), ("a".into(), Change::Exited)]
        );
        assert_eq!(
            (
                counts.entered,
                counts.exited,
                counts.unchanged,
                counts.previous
            ),
            (1, 1, 2, 3)
        );
    }

    #[test]
    fn restate_enters_the_unchanged_too_and_retire_exits_everyone() {
        let (out, counts) = diff(&members(&["a", "b"]), &members(&["b", "c"]), Mode::Restate);
        assert_eq!(
            changes(&out),
            [
                ("b".into(), Change::Entered),
                ("c".into(), Change::Entered),
                ("a".into(), Change::Exited)
            ]
        );
        assert!(out[0].restated && !out[1].restated);
        assert_eq!((counts.entered, counts.restated), (1, 1));
        let (out, counts) = diff(&members(&["a", "b"]), &Members::new(), Mode::Retire);
        assert_eq!(
            changes(&out),
            [("a".into(), Change::Exited), ("b".into(), Change::Exited)]
        );
        assert_eq!(counts.exited, 2);
    }

    #[test]
    fn runs_must_be_newer_and_a_run_name_keeps_its_members() {
        let mut d = Digest::default();
        d.add("a");
        d.add("b");
        let applied = Applied {
            run: "2026/12/04/0300".into(),
            time_ms: 1000,
            members: 2,
            digest: d.hex(),
        };
        assert_eq!(order(None, "r", 1, &d), Order::Apply);
        assert_eq!(
            order(Some(&applied), "2026/12/05/0300", 2000, &d),
            Order::Apply
        );
        assert_eq!(
            order(Some(&applied), "2026/12/04/0300", 1000, &d),
            Order::AlreadyApplied
        );
        assert!(matches!(
            order(Some(&applied), "2026/12/03/0300", 500, &d),
            Order::Refused(_)
        ));
        assert!(matches!(
            order(Some(&applied), "other", 1000, &d),
            Order::Refused(_)
        ));
        let mut other = Digest::default();
        other.add("a");
        other.add("c");
        assert!(matches!(
            order(Some(&applied), "2026/12/04/0300", 1000, &other),
            Order::Conflict(_)
        ));
    }

    #[test]
    fn the_digest_does_not_depend_on_order_or_bucketing() {
        let (mut one, mut two, mut three) =
            (Digest::default(), Digest::default(), Digest::default());
        one.add("x");
        one.add("y");
        two.add("y");
        three.add("x");
        two.merge(&three);
        assert_eq!(one, two);
    }

    #[test]
    fn the_shrink_guard_refuses_past_the_fraction_unless_forced() {
        assert!(shrink_refusal(50, 100, 0.5, false).is_none());
        assert!(shrink_refusal(51, 100, 0.5, false).is_some());
        assert!(shrink_refusal(100, 100, 0.5, true).is_none());
        assert!(shrink_refusal(0, 0, 0.5, false).is_none());
        assert!(shrink_refusal(1, 10, 0.0, false).is_some());
    }
}
