//! Where a partition starts when a worker is first assigned it: the group's committed offset
//! for the live worker, or the point a replay names; and when a run ends. Pure decision
//! behind a seam, so the timestamp rules are tested without a broker.

use std::collections::BTreeMap;

/// Where consumption of a partition starts when the worker is first assigned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// The group's committed offset, else the earliest (the live worker).
    Committed,
    Earliest,
    /// Epoch milliseconds: the first offset whose timestamp is at or after it, else the end.
    Timestamp(i64),
    /// Explicit `partition → offset`; partitions not named start at their committed offset.
    Offsets(BTreeMap<i32, i64>),
}

/// When a run ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Only when told to stop (the live worker).
    Stopped,
    /// Caught up with the log: after a flush Braze acknowledged, the end offsets have not
    /// moved past what was consumed, on every partition of the topics.
    CaughtUp,
    /// The end offsets taken when the run began (`--until-start`, dry runs).
    StartOffsets,
}

/// What to do with one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartDecision {
    /// Leave it to the group's committed offset (and `auto.offset.reset`).
    Committed,
    Beginning,
    At(i64),
    End,
}

/// The broker's answer to "first offset at or after this time" (Kafka's ListOffsets).
pub trait OffsetLookup {
    type Error: std::fmt::Display;
    /// `None` when the partition has no record at or after `timestamp_ms`.
    fn offset_for_time(
        &self,
        topic: &str,
        partition: i32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, Self::Error>;
}

pub fn decide<L: OffsetLookup>(
    start: &StartAt,
    topic: &str,
    partition: i32,
    lookup: &L,
) -> Result<StartDecision, L::Error> {
    Ok(match start {
        StartAt::Committed => StartDecision::Committed,
        StartAt::Earliest => StartDecision::Beginning,
        StartAt::Offsets(map) => match map.get(&partition) {
            Some(o) => StartDecision::At(*o),
            None => StartDecision::Committed,
        },
        // Nothing at or after the time: nothing to replay there, so start at the end rather
        // than at the committed offset, which would replay records older than asked for.
        StartAt::Timestamp(ts) => match lookup.offset_for_time(topic, partition, *ts)? {
            Some(o) => StartDecision::At(o),
            None => StartDecision::End,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A partition's records as (offset, timestamp), answering as ListOffsets does.
    struct Log(HashMap<i32, Vec<(i64, i64)>>);

    impl OffsetLookup for Log {
        type Error = String;
        fn offset_for_time(&self, _: &str, p: i32, ts: i64) -> Result<Option<i64>, String> {
            let records = self.0.get(&p).ok_or("unknown partition")?;
            Ok(records.iter().find(|(_, t)| *t >= ts).map(|(o, _)| *o))
        }
    }

    fn log() -> Log {
        Log(HashMap::from([
            (0, vec![(0, 100), (1, 200), (2, 300)]),
            (1, vec![]),
        ]))
    }

    #[test]
    fn timestamp_finds_the_first_record_at_or_after_it() {
        let l = log();
        let at = |ts| decide(&StartAt::Timestamp(ts), "t", 0, &l).unwrap();
        assert_eq!(at(50), StartDecision::At(0));
        assert_eq!(at(200), StartDecision::At(1));
        assert_eq!(at(201), StartDecision::At(2));
    }

    #[test]
    fn no_record_at_or_after_the_time_starts_at_the_end() {
        let l = log();
        assert_eq!(
            decide(&StartAt::Timestamp(301), "t", 0, &l),
            Ok(StartDecision::End)
        );
        assert_eq!(
            decide(&StartAt::Timestamp(0), "t", 1, &l),
            Ok(StartDecision::End),
            "an empty partition"
        );
    }

    #[test]
    fn lookup_errors_are_reported_not_guessed() {
        assert!(decide(&StartAt::Timestamp(0), "t", 9, &log()).is_err());
    }

    #[test]
    fn explicit_offsets_name_some_partitions_and_leave_the_rest() {
        let start = StartAt::Offsets(BTreeMap::from([(0, 7)]));
        assert_eq!(decide(&start, "t", 0, &log()), Ok(StartDecision::At(7)));
        assert_eq!(decide(&start, "t", 1, &log()), Ok(StartDecision::Committed));
        assert_eq!(
            decide(&StartAt::Earliest, "t", 1, &log()),
            Ok(StartDecision::Beginning)
        );
        assert_eq!(
            decide(&StartAt::Committed, "t", 1, &log()),
            Ok(StartDecision::Committed)
        );
    }
}
