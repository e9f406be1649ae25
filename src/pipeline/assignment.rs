//! Which partitions are ours, and the settled watermark of each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::offsets::{OffsetTracker, PartitionId, Position, TopicPartition};

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
}

impl Assignment {
    pub fn new() -> Assignment {
        Assignment {
            tracker: OffsetTracker::new(),
            generation: Arc::new(AtomicU64::new(0)),
            since: HashMap::new(),
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

    pub fn settle(&mut self, pos: Position) {
        self.tracker.settle(pos);
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
