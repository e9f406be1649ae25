//! The per-partition contiguous settled watermark that offsets are committed from.
//!
//! Every consumed record is `track`ed in offset order and later `settle`d, in any order,
//! when it is delivered, superseded, dropped or dead-lettered. The offset to commit for a
//! partition is the first offset that is not settled yet (Kafka's convention: the committed
//! offset is the next record to read), so nothing is ever committed past a record that could
//! still be lost.
//!
//! Assignments are epochs: a partition that is revoked and assigned again gets a new
//! [`PartitionId`], and positions handed out under the old one settle nothing, because a
//! late acknowledgement from before a rebalance must not move the watermark of the new owner.
//!
//! Pure: no rdkafka types, no clocks, no I/O.

use std::collections::VecDeque;
use std::sync::Arc;

/// A partition by name: the one key the pipeline uses for partitions off the hot path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> TopicPartition {
        TopicPartition {
            topic: Arc::from(topic),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// A cheap handle on one assignment (epoch) of one partition, returned by
/// [`OffsetTracker::assign`]. The hot path uses it instead of `(topic, partition)` so that
/// tracking a record costs an index and a compare, not a string hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionId {
    slot: u32,
    epoch: u32,
}

/// One tracked record, or one change of a record that holds several: which assignment it
/// belongs to, its offset and which of its changes. 16 bytes, `Copy`, so the window can keep
/// one beside every pending change without allocating: the change's number lives in the
/// offset's top bits, above any offset Kafka will reach (2^48).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    partition: PartitionId,
    /// The offset, and above [`PART_SHIFT`] the change's number (0: the record itself).
    offset: i64,
}

const PART_SHIFT: u32 = 48;
const OFFSET_MASK: i64 = (1 << PART_SHIFT) - 1;

/// The most changes one record may hold: the part number must fit the 15 bits above the
/// offset, below the sign.
pub const MAX_PARTS: usize = (1 << (63 - PART_SHIFT)) - 1;

impl Position {
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    pub fn offset(&self) -> i64 {
        if self.offset < 0 {
            self.offset
        } else {
            self.offset & OFFSET_MASK
        }
    }

    /// Which change of a record with several (1..=n); 0 for the record itself.
    pub fn part(&self) -> usize {
        if self.offset < 0 {
            0
        } else {
            (self.offset >> PART_SHIFT) as usize
        }
    }

    /// The position of the record this change belongs to.
    pub fn record(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.offset(),
        }
    }

    /// The position of change `part` (1..=[`MAX_PARTS`]) of this record; `None` for an
    /// offset too large to carry a part number or a part out of range.
    pub fn with_part(&self, part: usize) -> Option<Position> {
        let offset = self.offset();
        if !(1..=MAX_PARTS).contains(&part) || !(0..=OFFSET_MASK).contains(&offset) {
            return None;
        }
        Some(Position {
            partition: self.partition,
            offset: offset | ((part as i64) << PART_SHIFT),
        })
    }

    #[cfg(test)]
    pub(crate) fn for_tests(offset: i64) -> Position {
        Position {
            partition: PartitionId { slot: 0, epoch: 0 },
            offset,
        }
    }
}

/// A replay's fold writes positions to its spill files and reads them back in the same run:
/// a position read back is one this tracker handed out.
impl crate::fold::Spill for Position {
    fn pack(&self) -> [u64; 2] {
        [
            u64::from(self.partition.slot) << 32 | u64::from(self.partition.epoch),
            self.offset as u64,
        ]
    }

    fn unpack(words: [u64; 2]) -> Position {
        Position {
            partition: PartitionId {
                slot: (words[0] >> 32) as u32,
                epoch: words[0] as u32,
            },
            offset: words[1] as i64,
        }
    }
}

/// A tracked offset and whether it is settled, in 8 bytes: Kafka offsets are never negative,
/// so a settled offset is stored bitwise-negated (always negative) instead of beside a flag
/// that would double the size of the queue.
#[derive(Debug, Clone, Copy)]
struct Slot(i64);

impl Slot {
    fn pending(offset: i64) -> Slot {
        Slot(offset)
    }

    fn offset(self) -> i64 {
        if self.0 < 0 {
            !self.0
        } else {
            self.0
        }
    }

    fn is_settled(self) -> bool {
        self.0 < 0
    }

    fn settle(&mut self) {
        if self.0 >= 0 {
            self.0 = !self.0;
        }
    }
}

#[derive(Debug)]
struct PartitionState {
    topic: Arc<str>,
    partition: i32,
    epoch: u32,
    /// Tracked offsets from the first unsettled one to the highest tracked, ascending.
    /// Offsets absent between two entries were never consumed (compaction, transaction
    /// markers) and count as settled; keeping only consumed offsets bounds memory by the
    /// number of records in flight, whatever the size of the gaps.
    slots: VecDeque<Slot>,
    /// The highest tracked offset + 1; `None` until the first record of this epoch.
    next: Option<i64>,
    unsettled: usize,
}

impl PartitionState {
    fn new(topic: Arc<str>, partition: i32, epoch: u32) -> Self {
        PartitionState {
            topic,
            partition,
            epoch,
            slots: VecDeque::new(),
            next: None,
            unsettled: 0,
        }
    }

    fn committable(&self) -> Option<i64> {
        match self.slots.front() {
            Some(slot) => Some(slot.offset()),
            None => self.next,
        }
    }

    /// False when the offset was tracked in this epoch already: a second copy of the same
    /// record (the consumer was seeked back, or librdkafka fetched it again). The first copy
    /// settles the slot, and only it may: the second must not move the watermark past a
    /// change the first still holds in the window, in flight or on its way to the
    /// dead-letter topic. Offsets below the epoch's first are older than where it started,
    /// which was committed.
    fn track(&mut self, offset: i64) -> bool {
        if offset < 0 {
            // librdkafka's logical offsets (-1001 and friends) are not records.
            return false;
        }
        if self.next.is_some_and(|next| offset < next) {
            return false;
        }
        self.slots.push_back(Slot::pending(offset));
        self.next = Some(offset + 1);
        self.unsettled += 1;
        true
    }

    /// Returns how many unsettled records the call settled (1, or 0 when already settled
    /// or never tracked).
    fn settle(&mut self, offset: i64) -> usize {
        let Some(front) = self.slots.front() else {
            return 0;
        };
        // Offsets are usually contiguous, so the slot is usually exactly `offset - front`
        // places in; gaps fall back to a binary search of the ascending queue.
        let guess = usize::try_from(offset - front.offset()).ok();
        let index = match guess.and_then(|i| self.slots.get(i).map(|slot| (i, *slot))) {
            Some((i, slot)) if slot.offset() == offset => i,
            _ => match self
                .slots
                .binary_search_by_key(&offset, |slot| slot.offset())
            {
                Ok(i) => i,
                Err(_) => return 0,
            },
        };
        let slot = &mut self.slots[index];
        if slot.is_settled() {
            return 0;
        }
        slot.settle();
        self.unsettled -= 1;
        while self.slots.front().is_some_and(|slot| slot.is_settled()) {
            self.slots.pop_front();
        }
        1
    }
}

/// The settled watermark of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Indexed by `PartitionId::slot`; `None` for a revoked partition whose slot is free.
    partitions: Vec<Option<PartitionState>>,
    /// Per topic, the slot of each partition number (+ 1; 0 for none): every record looks
    /// its partition up, so the lookup must not grow with the partitions assigned.
    index: Vec<(Arc<str>, Vec<u32>)>,
    free: Vec<u32>,
    next_epoch: u32,
    unsettled: usize,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A partition was assigned (again): starts a new epoch for it and returns its handle.
    /// Positions of an earlier epoch of the partition settle nothing from now on.
    pub fn assign(&mut self, topic: &str, partition: i32) -> PartitionId {
        let epoch = self.next_epoch;
        // Wrapping is harmless: a position would have to outlive four billion assignments
        // to be mistaken for a current one.
        self.next_epoch = self.next_epoch.wrapping_add(1);
        if let Some(slot) = self.find(topic, partition) {
            if let Some(state) = self.partitions[slot as usize].as_mut() {
                self.unsettled -= state.unsettled;
                *state = PartitionState::new(Arc::clone(&state.topic), partition, epoch);
                return PartitionId { slot, epoch };
            }
        }
        let Ok(number) = usize::try_from(partition) else {
            // Kafka numbers partitions from 0; no record has a negative one, so its handle
            // is one nothing is tracked or settled against.
            return PartitionId {
                slot: u32::MAX,
                epoch,
            };
        };
        let state = PartitionState::new(Arc::from(topic), partition, epoch);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.partitions[slot as usize] = Some(state);
                slot
            }
            None => {
                self.partitions.push(Some(state));
                // More than u32::MAX partitions in one consumer is not a real configuration.
                u32::try_from(self.partitions.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let slots = match self.index.iter().position(|(t, _)| **t == *topic) {
            Some(i) => &mut self.index[i].1,
            None => {
                self.index.push((Arc::from(topic), Vec::new()));
                &mut self.index.last_mut().expect("just pushed").1
            }
        };
        if slots.len() <= number {
            slots.resize(number + 1, 0);
        }
        slots[number] = slot + 1;
        PartitionId { slot, epoch }
    }

    /// The partition is gone: its state is forgotten and its positions settle nothing.
    /// Commit its [`committable`](Self::committable) offset before revoking.
    /// Returns whether it was assigned.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> bool {
        let Some(slot) = self.find(topic, partition) else {
            return false;
        };
        if let Some(state) = self.partitions[slot as usize].take() {
            self.unsettled -= state.unsettled;
        }
        if let Some((_, slots)) = self.index.iter_mut().find(|(t, _)| **t == *topic) {
            slots[partition as usize] = 0;
        }
        self.free.push(slot);
        true
    }

    /// The current handle of an assigned partition.
    pub fn partition_id(&self, topic: &str, partition: i32) -> Option<PartitionId> {
        let slot = self.find(topic, partition)?;
        let state = self.partitions[slot as usize].as_ref()?;
        Some(PartitionId {
            slot,
            epoch: state.epoch,
        })
    }

    /// A record was consumed at `offset`; returns the position to settle it with, or `None`
    /// when there is nothing to settle: a copy of a record already tracked in this epoch
    /// (skip it, the first copy settles it), a handle from an earlier epoch, or a negative
    /// (logical) offset.
    ///
    /// Offsets normally increase by one; a jump leaves a gap that counts as settled.
    pub fn track(&mut self, partition: PartitionId, offset: i64) -> Option<Position> {
        let state = self.state_mut(partition)?;
        if !state.track(offset) {
            return None;
        }
        self.unsettled += 1;
        Some(Position { partition, offset })
    }

    /// The record at `pos` is settled. Idempotent; positions of a revoked partition or an
    /// earlier epoch, and offsets never tracked, are ignored.
    pub fn settle(&mut self, pos: Position) {
        if let Some(state) = self.state_mut(pos.partition) {
            self.unsettled -= state.settle(pos.offset());
        }
    }

    /// The partition of a handle, while that assignment lasts.
    pub fn name(&self, id: PartitionId) -> Option<TopicPartition> {
        let state = self.partitions.get(id.slot as usize)?.as_ref()?;
        (state.epoch == id.epoch).then(|| TopicPartition {
            topic: Arc::clone(&state.topic),
            partition: state.partition,
        })
    }

    /// Every assigned partition.
    pub fn assigned(&self) -> impl Iterator<Item = TopicPartition> + '_ {
        self.partitions.iter().flatten().map(|s| TopicPartition {
            topic: Arc::clone(&s.topic),
            partition: s.partition,
        })
    }

    /// The offset that could be committed for the partition now; `None` when it is not
    /// assigned or no record of this epoch was tracked.
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        self.state(topic, partition)?.committable()
    }

    /// The highest offset tracked in this epoch + 1: where reading has got to.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.state(topic, partition)?.next
    }

    /// Unsettled records over every assigned partition.
    pub fn unsettled(&self) -> usize {
        self.unsettled
    }

    /// Unsettled records of one partition; 0 when it is not assigned.
    pub fn unsettled_in(&self, topic: &str, partition: i32) -> usize {
        self.state(topic, partition).map_or(0, |s| s.unsettled)
    }

    // A worker reads few topics, so they are scanned; partitions are indexed by number.
    fn find(&self, topic: &str, partition: i32) -> Option<u32> {
        let (_, slots) = self.index.iter().find(|(t, _)| **t == *topic)?;
        let slot = *slots.get(usize::try_from(partition).ok()?)?;
        slot.checked_sub(1)
    }

    fn state(&self, topic: &str, partition: i32) -> Option<&PartitionState> {
        let slot = self.find(topic, partition)?;
        self.partitions[slot as usize].as_ref()
    }

    fn state_mut(&mut self, id: PartitionId) -> Option<&mut PartitionState> {
        self.partitions
            .get_mut(id.slot as usize)?
            .as_mut()
            .filter(|s| s.epoch == id.epoch)
    }
}

/// What became of a record with several changes when one of them got its outcome.
#[derive(Debug, PartialEq)]
pub enum Outcome<R> {
    /// Changes of the record are still pending (or the part was known already).
    Pending,
    /// The last change settled and none was rejected: settle the record.
    Settled(Position),
    /// The last change has its outcome and some were rejected: dead-letter the record once,
    /// with every reason, then settle it.
    Rejected {
        record: Position,
        parts: usize,
        /// (part number, why), in the order the outcomes came.
        rejections: Vec<(usize, R)>,
    },
}

struct Share<R> {
    parts: usize,
    /// One bit per part that has its outcome, so a part settled twice counts once.
    done: Vec<u64>,
    left: usize,
    rejections: Vec<(usize, R)>,
}

/// The records that hold several changes, each with its changes still pending. Promises: a
/// record comes out (settled or rejected) exactly once, when the last of its changes has an
/// outcome, however many times and in whatever order its parts are reported; a record with
/// a single change never enters, so the one-change path costs nothing here.
#[derive(Default)]
pub struct Shares<R> {
    records: std::collections::HashMap<Position, Share<R>>,
}

impl<R> Shares<R> {
    pub fn new() -> Self {
        Shares {
            records: std::collections::HashMap::new(),
        }
    }

    /// `record` holds `parts` changes, numbered 1..=parts ([`Position::with_part`]).
    pub fn split(&mut self, record: Position, parts: usize) {
        self.records.insert(
            record.record(),
            Share {
                parts,
                done: vec![0; parts.div_ceil(64) + 1],
                left: parts,
                rejections: Vec::new(),
            },
        );
    }

    /// Part `part` of its record settled.
    pub fn settle(&mut self, part: Position) -> Outcome<R> {
        self.outcome(part, None)
    }

    /// Part `part` of its record was refused, for `why`.
    pub fn reject(&mut self, part: Position, why: R) -> Outcome<R> {
        self.outcome(part, Some(why))
    }

    fn outcome(&mut self, part: Position, why: Option<R>) -> Outcome<R> {
        let record = part.record();
        let Some(share) = self.records.get_mut(&record) else {
            return Outcome::Pending;
        };
        let n = part.part();
        if n == 0 || n > share.parts {
            return Outcome::Pending;
        }
        let (word, bit) = (n / 64, 1u64 << (n % 64));
        if share.done[word] & bit != 0 {
            return Outcome::Pending;
        }
        share.done[word] |= bit;
        share.left -= 1;
        if let Some(why) = why {
            share.rejections.push((n, why));
        }
        if share.left > 0 {
            return Outcome::Pending;
        }
        let share = self.records.remove(&record).expect("present");
        if share.rejections.is_empty() {
            Outcome::Settled(record)
        } else {
            Outcome::Rejected {
                record,
                parts: share.parts,
                rejections: share.rejections,
            }
        }
    }

    /// Forgets the records for which `gone` holds (a revoked partition's).
    pub fn forget(&mut self, gone: impl Fn(&Position) -> bool) {
        self.records.retain(|p, _| !gone(p));
    }

    /// Records with changes still pending.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(t: &mut OffsetTracker, p: PartitionId, offset: i64) -> Position {
        t.track(p, offset).expect("a new record is tracked")
    }

    #[test]
    fn watermark_waits_for_the_first_unsettled_offset() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let pos: Vec<Position> = (100..105).map(|o| track(&mut t, p, o)).collect();
        assert_eq!(t.committable("t", 0), Some(100));
        t.settle(pos[2]);
        assert_eq!(t.committable("t", 0), Some(100));
        t.settle(pos[0]);
        assert_eq!(t.committable("t", 0), Some(101));
        t.settle(pos[1]);
        assert_eq!(t.committable("t", 0), Some(103));
        t.settle(pos[4]);
        t.settle(pos[3]);
        assert_eq!(t.committable("t", 0), Some(105));
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn skipped_offsets_count_as_settled() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let a = track(&mut t, p, 10);
        let b = track(&mut t, p, 13);
        let c = track(&mut t, p, 20);
        t.settle(a);
        assert_eq!(t.committable("t", 0), Some(13));
        t.settle(c);
        assert_eq!(t.committable("t", 0), Some(13));
        t.settle(b);
        assert_eq!(t.committable("t", 0), Some(21));
        // A jump while nothing is pending moves the watermark to the new record.
        let d = track(&mut t, p, 1_000_000);
        assert_eq!(t.committable("t", 0), Some(1_000_000));
        t.settle(d);
        assert_eq!(t.committable("t", 0), Some(1_000_001));
    }

    #[test]
    fn settle_is_idempotent_and_ignores_untracked_offsets() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let a = track(&mut t, p, 0);
        let b = track(&mut t, p, 1);
        t.settle(b);
        t.settle(b);
        assert_eq!(t.unsettled(), 1);
        assert_eq!(t.committable("t", 0), Some(0));
        // Never tracked: inside a gap, past the end, before the start.
        let _ = track(&mut t, p, 5);
        for offset in [3, 9, -1] {
            t.settle(Position {
                partition: p,
                offset,
            });
        }
        assert_eq!(t.unsettled(), 2);
        t.settle(a);
        t.settle(a);
        assert_eq!(t.unsettled(), 1);
        assert_eq!(t.committable("t", 0), Some(5));
    }

    #[test]
    fn late_settle_from_an_earlier_epoch_is_ignored() {
        let mut t = OffsetTracker::new();
        let first = t.assign("t", 3);
        let old = track(&mut t, first, 7);
        assert!(t.revoke("t", 3));
        t.settle(old);
        assert_eq!(t.committable("t", 3), None);

        let second = t.assign("t", 3);
        assert_ne!(first, second);
        let new = track(&mut t, second, 7);
        t.settle(old);
        assert_eq!(t.unsettled_in("t", 3), 1);
        assert_eq!(t.committable("t", 3), Some(7));
        t.settle(new);
        assert_eq!(t.committable("t", 3), Some(8));
    }

    #[test]
    fn reassign_without_revoke_starts_a_new_epoch() {
        let mut t = OffsetTracker::new();
        let first = t.assign("t", 0);
        let old = track(&mut t, first, 1);
        let second = t.assign("t", 0);
        assert_eq!(t.unsettled(), 0);
        assert_eq!(t.partition_id("t", 0), Some(second));
        // A stale handle tracks nothing.
        let _ = t.track(first, 2);
        assert_eq!(t.unsettled(), 0);
        let new = track(&mut t, second, 1);
        t.settle(old);
        assert_eq!(t.unsettled(), 1);
        t.settle(new);
        assert_eq!(t.committable("t", 0), Some(2));
    }

    #[test]
    fn a_reused_slot_does_not_take_settlements_of_its_previous_partition() {
        let mut t = OffsetTracker::new();
        let a = t.assign("a", 0);
        let old = track(&mut t, a, 0);
        t.revoke("a", 0);
        let b = t.assign("b", 0);
        assert_eq!(a.slot, b.slot, "the test is about a reused slot");
        let _ = track(&mut t, b, 0);
        t.settle(old);
        assert_eq!(t.unsettled_in("b", 0), 1);
        assert_eq!(t.committable("b", 0), Some(0));
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let q = t.assign("t", 1);
        let _ = track(&mut t, p, 0);
        let _ = track(&mut t, q, 0);
        let _ = track(&mut t, q, 1);
        assert_eq!(t.unsettled(), 3);
        assert_eq!(t.unsettled_in("t", 1), 2);
        assert!(t.revoke("t", 1));
        assert!(!t.revoke("t", 1));
        assert_eq!(t.unsettled(), 1);
        assert_eq!(t.unsettled_in("t", 1), 0);
        assert_eq!(t.partition_id("t", 1), None);
        assert!(t.revoke("t", 0));
        assert_eq!(t.unsettled(), 0);
        assert_eq!(t.committable("t", 0), None);
    }

    #[test]
    fn a_second_copy_of_a_record_settles_nothing_and_the_first_copy_still_does() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let pos: Vec<Position> = (0..10).map(|o| track(&mut t, p, o)).collect();
        for &x in &pos[..3] {
            t.settle(x);
        }
        t.settle(pos[7]);
        assert_eq!(t.committable("t", 0), Some(3));
        // Seeked back to 2: 2 was settled, 3..=9 are held by their first copies.
        for o in 2..10 {
            assert_eq!(t.track(p, o), None, "offset {o} is a second copy");
        }
        assert_eq!(
            t.committable("t", 0),
            Some(3),
            "the watermark does not move back"
        );
        assert_eq!(t.unsettled(), 6, "nothing counted twice");
        for &x in &pos[3..] {
            t.settle(x);
        }
        assert_eq!(t.committable("t", 0), Some(10));
        assert_eq!(t.unsettled(), 0);
        // Reading on after the copies tracks as usual.
        let next = track(&mut t, p, 10);
        assert_eq!(t.committable("t", 0), Some(10));
        t.settle(next);
        assert_eq!(t.committable("t", 0), Some(11));
    }

    #[test]
    fn partitions_of_many_topics_are_found_after_revokes_and_reassignments() {
        let mut t = OffsetTracker::new();
        for topic in ["a", "b"] {
            for p in 0..300 {
                t.assign(topic, p);
            }
        }
        for p in (0..300).step_by(3) {
            assert!(t.revoke("a", p));
        }
        assert!(!t.revoke("a", 0), "revoked already");
        assert!(!t.revoke("c", 0) && !t.revoke("a", 300), "never assigned");
        t.assign("c", 7);
        for p in 0..300 {
            assert_eq!(t.partition_id("a", p).is_some(), p % 3 != 0, "a[{p}]");
            let b = t.partition_id("b", p).expect("b is assigned whole");
            let pos = t.track(b, 10).expect("tracked");
            t.settle(pos);
            assert_eq!(t.committable("b", p), Some(11));
        }
        assert!(t.partition_id("c", 7).is_some() && t.partition_id("c", 6).is_none());
        assert!(t.partition_id("a", -1).is_none());
        // Freed slots are reused by the next assignments without confusing them.
        let again = t.assign("a", 0);
        assert_eq!(t.partition_id("a", 0), Some(again));
        assert_eq!(t.assigned().count(), 200 + 300 + 1 + 1);
    }

    #[test]
    fn logical_offsets_are_not_tracked() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        assert_eq!(t.track(p, -1001), None);
        assert_eq!(t.unsettled(), 0);
        assert_eq!(t.committable("t", 0), None);
    }

    #[test]
    fn memory_is_released_as_the_watermark_advances() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        for o in 0..100_000 {
            let pos = track(&mut t, p, o * 3);
            t.settle(pos);
        }
        let state = t.partitions[0].as_ref().map(|s| s.slots.len());
        assert_eq!(state, Some(0));
        assert_eq!(t.committable("t", 0), Some(299_998));
    }

    #[test]
    fn a_position_is_small() {
        assert!(std::mem::size_of::<Position>() <= 16);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::HashSet;

        /// Records in consumption order: (partition index, offset), offsets increasing per
        /// partition with random gaps.
        fn records() -> impl Strategy<Value = (usize, Vec<(usize, i64)>)> {
            (1usize..4).prop_flat_map(|partitions| {
                let gap = prop_oneof![4 => Just(1i64), 2 => 2i64..5, 1 => 5i64..10_000];
                (
                    Just(partitions),
                    proptest::collection::vec((0..partitions, gap, 0i64..3), 1..120),
                )
                    .prop_map(|(partitions, steps)| {
                        let mut next = vec![None::<i64>; partitions];
                        let records = steps
                            .into_iter()
                            .map(|(p, gap, start)| {
                                let offset = match next[p] {
                                    None => start * 1000,
                                    Some(n) => n + gap - 1,
                                };
                                next[p] = Some(offset + 1);
                                (p, offset)
                            })
                            .collect();
                        (partitions, records)
                    })
            })
        }

        fn check_watermarks(
            t: &OffsetTracker,
            tracked: &[(usize, i64)],
            settled: &HashSet<usize>,
            partitions: usize,
        ) -> Result<(), TestCaseError> {
            for p in 0..partitions {
                let mine: Vec<(usize, i64)> = tracked
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.0 == p)
                    .map(|(i, r)| (i, r.1))
                    .collect();
                let committable = t.committable("topic", p as i32);
                let Some(&(_, last)) = mine.last() else {
                    prop_assert_eq!(committable, None);
                    continue;
                };
                let Some(c) = committable else {
                    return Err(TestCaseError::fail("tracked partition has no watermark"));
                };
                for &(i, offset) in &mine {
                    if offset < c {
                        prop_assert!(settled.contains(&i), "offset {} < {} unsettled", offset, c);
                    }
                }
                let first_unsettled = mine
                    .iter()
                    .find(|(i, _)| !settled.contains(i))
                    .map(|&(_, o)| o);
                // Not just safe but live: the watermark is exactly the first unsettled
                // record, or one past the last one.
                prop_assert_eq!(c, first_unsettled.unwrap_or(last + 1));
                let pending = mine.iter().filter(|(i, _)| !settled.contains(i)).count();
                prop_assert_eq!(t.unsettled_in("topic", p as i32), pending);
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn watermark_never_passes_an_unsettled_offset(
                (partitions, records, order) in records().prop_flat_map(|(partitions, records)| {
                    let order: Vec<usize> = (0..records.len()).collect();
                    (Just(partitions), Just(records), Just(order).prop_shuffle())
                }),
                repeat_every in 2usize..7,
            ) {
                let mut t = OffsetTracker::new();
                let ids: Vec<PartitionId> =
                    (0..partitions).map(|p| t.assign("topic", p as i32)).collect();
                let mut positions = Vec::new();
                let mut settled = HashSet::new();
                for (step, &k) in order.iter().enumerate() {
                    // Track everything up to the record about to be settled, so tracking
                    // and settling interleave.
                    while positions.len() <= k {
                        let (p, offset) = records[positions.len()];
                        positions.push(t.track(ids[p], offset).expect("offsets increase"));
                        check_watermarks(&t, &records[..positions.len()], &settled, partitions)?;
                    }
                    t.settle(positions[k]);
                    settled.insert(k);
                    if step % repeat_every == 0 {
                        // Settling again changes nothing.
                        t.settle(positions[k]);
                    }
                    check_watermarks(&t, &records[..positions.len()], &settled, partitions)?;
                    prop_assert_eq!(t.unsettled(), positions.len() - settled.len());
                }
                prop_assert_eq!(t.unsettled(), 0);
                for p in 0..partitions {
                    let last = records.iter().filter(|r| r.0 == p).map(|r| r.1).max();
                    prop_assert_eq!(t.committable("topic", p as i32), last.map(|l| l + 1));
                }
            }
        }
    }

    #[test]
    fn a_record_with_several_changes_settles_when_the_last_settles_once() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let first = track(&mut t, p, 0);
        let second = track(&mut t, p, 1);
        let mut shares: Shares<&str> = Shares::new();
        shares.split(first, 3);
        let part = |n| first.with_part(n).expect("fits");
        assert_eq!(part(2).offset(), 0);
        assert_eq!(part(2).part(), 2);
        assert_eq!(part(2).record(), first);
        assert_ne!(part(1), part(2));
        assert_eq!(shares.settle(part(2)), Outcome::Pending);
        // A part reported twice (a redelivery, a duplicate in a flush) counts once.
        assert_eq!(shares.settle(part(2)), Outcome::Pending);
        t.settle(second);
        assert_eq!(shares.settle(part(1)), Outcome::Pending);
        assert_eq!(
            t.committable("t", 0),
            Some(0),
            "the record still has a change pending"
        );
        match shares.settle(part(3)) {
            Outcome::Settled(record) => t.settle(record),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.committable("t", 0), Some(2));
        assert!(shares.is_empty());
        // Late reports of a finished record change nothing.
        assert_eq!(shares.settle(part(3)), Outcome::Pending);
    }

    #[test]
    fn a_record_with_a_rejected_change_comes_out_once_with_every_reason() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let r = track(&mut t, p, 7);
        let mut shares: Shares<&str> = Shares::new();
        shares.split(r, 3);
        let part = |n| r.with_part(n).expect("fits");
        assert_eq!(shares.reject(part(1), "bad"), Outcome::Pending);
        assert_eq!(shares.settle(part(3)), Outcome::Pending);
        assert_eq!(
            shares.reject(part(2), "worse"),
            Outcome::Rejected {
                record: r,
                parts: 3,
                rejections: vec![(1, "bad"), (2, "worse")],
            }
        );
        assert_eq!(shares.reject(part(2), "again"), Outcome::Pending);
    }

    #[test]
    fn part_numbers_stay_within_their_bits() {
        let mut t = OffsetTracker::new();
        let p = t.assign("t", 0);
        let r = track(&mut t, p, (1 << 47) + 5);
        assert_eq!(
            r.with_part(MAX_PARTS).expect("fits").offset(),
            (1 << 47) + 5
        );
        assert_eq!(r.with_part(MAX_PARTS).expect("fits").part(), MAX_PARTS);
        assert_eq!(r.with_part(MAX_PARTS + 1), None);
        assert_eq!(r.with_part(0), None);
    }
}
