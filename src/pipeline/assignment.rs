//! Which partitions are ours, and the settled watermark of each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::braze::Rejection;
use crate::offsets::{OffsetTracker, Outcome, PartitionId, Position, Shares, TopicPartition};

/// A record with several changes, some of which Braze refused: it goes to the dead-letter
/// topic once, now that all of them have an outcome.
pub struct RejectedRecord {
    pub tp: TopicPartition,
    pub record: Position,
    /// The first refusal, for the Connect headers.
    pub rejection: Rejection,
    /// One line per change of the record: `segment_sync.rejections`.
    pub lines: String,
}

/// The only part that knows which partitions this worker holds. Promises: a record is
/// tracked only under the assignment it was polled in, so a record polled before a revoke
/// (or before a revoke and re-assign within one burst) settles nothing of the new epoch;
/// and a second copy of a record already tracked settles nothing (the first copy does).
pub struct Assignment {
    tracker: OffsetTracker,
    /// Bumped at every assignment change. The poll loop stamps each record with the value
    /// it read right after `poll` returned it, without taking the pipeline's lock.
    generation: Arc<AtomicU64>,
    /// The generation at which each partition's current assignment began.
    since: HashMap<TopicPartition, u64>,
    /// Records with several changes, until the last of them has an outcome.
    shares: Shares<Rejection>,
    /// Such records with a refused change, waiting for the dead letters to take them.
    rejected: Vec<RejectedRecord>,
}

impl Assignment {
    pub fn new() -> Assignment {
        Assignment {
            tracker: OffsetTracker::new(),
            generation: Arc::new(AtomicU64::new(0)),
            since: HashMap::new(),
            shares: Shares::new(),
            rejected: Vec::new(),
        }
    }

    /// For the poll loop to stamp records with.
    pub fn generation(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.generation)
    }

    fn bump(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn assign(&mut self, tp: &TopicPartition) {
        let generation = self.bump();
        self.tracker.assign(&tp.topic, tp.partition);
        self.since.insert(tp.clone(), generation);
    }

    /// Forgets the partition: its positions settle nothing from now on.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        if let Some(id) = self.tracker.partition_id(&tp.topic, tp.partition) {
            self.shares.forget(|p| p.partition() == id);
            self.rejected.retain(|r| r.record.partition() != id);
        }
        self.bump();
        self.tracker.revoke(&tp.topic, tp.partition);
        self.since.remove(tp);
    }

    /// The partition's handle for a record polled at generation `polled`; `None` when the
    /// partition is not ours, or was (re-)assigned after the record was polled.
    pub fn resolve(&self, topic: &str, partition: i32, polled: u64) -> Option<PartitionId> {
        let id = self.tracker.partition_id(topic, partition)?;
        // The common case, no rebalance since the poll, needs no map lookup.
        if polled < self.generation.load(Ordering::Acquire) {
            let tp = TopicPartition::new(topic, partition);
            if self.since.get(&tp).is_none_or(|since| *since > polled) {
                return None;
            }
        }
        Some(id)
    }

    /// The partition's current handle.
    pub fn id(&self, tp: &TopicPartition) -> Option<PartitionId> {
        self.tracker.partition_id(&tp.topic, tp.partition)
    }

    /// See [`OffsetTracker::track`]: `None` for a record not to be handled again.
    pub fn track(&mut self, id: PartitionId, offset: i64) -> Option<Position> {
        self.tracker.track(id, offset)
    }

    /// A record, or one change of a record with several, settled. A record with several
    /// changes settles with the last of them, or waits in [`Assignment::take_rejected`] when
    /// one of them was refused.
    pub fn settle(&mut self, pos: Position) {
        if pos.part() == 0 {
            self.tracker.settle(pos);
            return;
        }
        let outcome = self.shares.settle(pos);
        self.settled(outcome);
    }

    /// The record at `pos` holds `parts` changes (more than one), settled one by one through
    /// `pos.with_part(1..=parts)`. False when it holds too many to be tracked so.
    pub fn split(&mut self, pos: Position, parts: usize) -> bool {
        if pos.with_part(parts).is_none() {
            return false;
        }
        self.shares.split(pos, parts);
        true
    }

    /// Braze refused the change at `pos`. `Some`: a record of its own, dead-letter it now;
    /// `None`: one change of a record with several, which is dead-lettered (once) when all
    /// of them have an outcome.
    pub fn reject(&mut self, pos: Position, rejection: Rejection) -> Option<Rejection> {
        if pos.part() == 0 {
            return Some(rejection);
        }
        let outcome = self.shares.reject(pos, rejection);
        self.settled(outcome);
        None
    }

    fn settled(&mut self, outcome: Outcome<Rejection>) {
        match outcome {
            Outcome::Pending => {}
            Outcome::Settled(record) => self.tracker.settle(record),
            Outcome::Rejected {
                record,
                parts,
                rejections,
            } => {
                let Some(tp) = self.tracker.name(record.partition()) else {
                    return;
                };
                let mut lines = String::new();
                for n in 1..=parts {
                    match rejections.iter().find(|(part, _)| *part == n) {
                        Some((_, r)) => lines.push_str(&format!(
                            "change {n} of {parts}: rejected: {} {}: {}\n",
                            r.status, r.error_type, r.message
                        )),
                        None => lines.push_str(&format!("change {n} of {parts}: settled\n")),
                    }
                }
                let first = rejections[0].1.clone();
                let rejection = Rejection {
                    status: first.status,
                    error_type: first.error_type,
                    message: format!(
                        "{} of the record's {parts} changes rejected; the first: {}",
                        rejections.len(),
                        first.message
                    ),
                };
                self.rejected.push(RejectedRecord {
                    tp,
                    record,
                    rejection,
                    lines: lines.trim_end().to_string(),
                });
            }
        }
    }

    /// Records with several changes whose last outcome came in and some were refused.
    pub fn take_rejected(&mut self) -> Vec<RejectedRecord> {
        std::mem::take(&mut self.rejected)
    }

    /// The partition a position belongs to, while its assignment lasts.
    pub fn name(&self, id: PartitionId) -> Option<TopicPartition> {
        self.tracker.name(id)
    }

    pub fn partitions(&self) -> Vec<TopicPartition> {
        let mut all: Vec<TopicPartition> = self.tracker.assigned().collect();
        all.sort();
        all
    }

    pub fn holds(&self, tp: &TopicPartition) -> bool {
        self.since.contains_key(tp)
    }

    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }

    /// The offset to commit for the partition: its first unsettled record, or one past the
    /// last record read.
    pub fn committable(&self, tp: &TopicPartition) -> Option<i64> {
        self.tracker.committable(&tp.topic, tp.partition)
    }

    /// One past the last record read in this assignment.
    pub fn next_offset(&self, tp: &TopicPartition) -> Option<i64> {
        self.tracker.next_offset(&tp.topic, tp.partition)
    }

    pub fn unsettled(&self) -> usize {
        self.tracker.unsettled()
    }

    pub fn unsettled_in(&self, tp: &TopicPartition) -> usize {
        self.tracker.unsettled_in(&tp.topic, tp.partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_polled_before_a_reassignment_belongs_to_no_one() {
        let mut a = Assignment::new();
        let tp = TopicPartition::new("t", 0);
        a.assign(&tp);
        let before = a.generation().load(Ordering::Acquire);
        assert!(a.resolve("t", 0, before).is_some());
        // Revoked and assigned again between the poll and the ingest of the burst.
        a.revoke(&tp);
        a.assign(&tp);
        assert_eq!(a.resolve("t", 0, before), None);
        let after = a.generation().load(Ordering::Acquire);
        let id = a
            .resolve("t", 0, after)
            .expect("polled in the new assignment");
        assert!(a.track(id, 5).is_some());
        // Another partition's assignment does not disown records of this one.
        a.assign(&TopicPartition::new("t", 1));
        assert_eq!(a.resolve("t", 0, after), Some(id));
        assert_eq!(a.resolve("u", 0, after), None);
    }
}
