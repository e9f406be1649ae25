//! Whether partitions are read: back-pressure, faults that hold records, partitions read to
//! their end.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::TopicPartitionList;

use crate::kafka::GroupConsumer;
use crate::offsets::TopicPartition;

/// A record polled but not yet taken in, with the assignment generation it was polled at.
pub struct Held {
    pub message: OwnedMessage,
    pub generation: u64,
}

/// Owns the pause state. Promises: the consuming thread is never held up by a fault: it
/// pauses the partitions and goes on polling (the member stays in its group, SIGTERM is
/// answered), and records already polled behind a record that must wait are held here, in
/// order, not lost; a partition read to its end stays paused.
pub struct Flow {
    paused: bool,
    /// Partitions read to a replay's end: paused for good.
    finished: HashSet<TopicPartition>,
    /// Partitions waiting for their restore: paused until it is done.
    restoring: HashSet<TopicPartition>,
    to_pause: Vec<TopicPartition>,
    held: VecDeque<Held>,
    /// Why records are held, while they are.
    waiting: Option<String>,
    retry_at: Instant,
    backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl Flow {
    pub fn new() -> Flow {
        Flow {
            paused: false,
            finished: HashSet::new(),
            restoring: HashSet::new(),
            to_pause: Vec::new(),
            held: VecDeque::new(),
            waiting: None,
            retry_at: Instant::now(),
            backoff: FIRST_BACKOFF,
        }
    }

    /// Records are being held: whatever is polled next joins them.
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    pub fn hold(&mut self, held: Held) {
        self.held.push_back(held);
    }

    /// The first held record must wait for `why`; tries again after a growing backoff.
    pub fn wait(&mut self, why: String) {
        if self.waiting.is_none() {
            tracing::warn!(reason = %why, held = self.held.len(), "records wait; partitions paused");
        }
        self.waiting = Some(why);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The held records, when it is time to try them again (all of them: the caller puts
    /// back, in order, what must still wait).
    pub fn take_due(&mut self) -> Option<VecDeque<Held>> {
        if self.held.is_empty() || Instant::now() < self.retry_at {
            return None;
        }
        Some(std::mem::take(&mut self.held))
    }

    /// Puts records back in front of anything held meanwhile.
    pub fn hold_again(&mut self, mut rest: VecDeque<Held>) {
        rest.append(&mut self.held);
        self.held = rest;
    }

    /// Nothing held any more: the fault is over.
    pub fn resumed(&mut self) {
        if self.held.is_empty() && self.waiting.take().is_some() {
            tracing::info!("held records taken in; reading again");
            self.backoff = FIRST_BACKOFF;
        }
    }

    /// Drops held records of partitions no longer ours: their next owner reads them.
    pub fn drop_held(&mut self, gone: impl Fn(&str, i32) -> bool) {
        use rdkafka::message::Message;
        self.held
            .retain(|h| !gone(h.message.topic(), h.message.partition()));
        if self.held.is_empty() {
            self.resumed();
        }
    }

    /// The partition has been read to its end: pause it at the next `apply`, for good.
    pub fn finish(&mut self, tp: TopicPartition) {
        if self.finished.insert(tp.clone()) {
            self.to_pause.push(tp);
        }
    }

    /// Pauses every assigned partition while `hold` (back-pressure or a fault), resumes the
    /// unfinished ones when it ends.
    pub fn apply(&mut self, consumer: &GroupConsumer, hold: bool) {
        if !self.to_pause.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for tp in self.to_pause.drain(..) {
                tpl.add_partition(&tp.topic, tp.partition);
            }
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "cannot pause finished partitions");
            }
        }
        let hold = hold || self.is_holding();
        if hold == self.paused {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let result = if hold {
            consumer.pause(&assignment)
        } else {
            let mut tpl = TopicPartitionList::new();
            for e in assignment.elements() {
                let tp = TopicPartition::new(e.topic(), e.partition());
                if !self.finished.contains(&tp) && !self.restoring.contains(&tp) {
                    tpl.add_partition(e.topic(), e.partition());
                }
            }
            consumer.resume(&tpl)
        };
        match result {
            Ok(()) => {
                self.paused = hold;
                tracing::debug!(paused = hold, "flow");
            }
            Err(e) => tracing::warn!(error = %e, "cannot pause/resume partitions"),
        }
    }

    /// Newly assigned partitions that must wait for their restore: paused now, before their
    /// first fetch.
    pub fn restoring(&mut self, consumer: &GroupConsumer, tps: &[TopicPartition]) {
        if tps.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for tp in tps {
            self.restoring.insert(tp.clone());
            tpl.add_partition(&tp.topic, tp.partition);
        }
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!(error = %e, "cannot pause partitions for their restore");
        }
    }

    /// The partition's restore is done (or it was revoked): read it, unless everything is
    /// paused, in which case the next resume includes it.
    pub fn restored(&mut self, consumer: &GroupConsumer, tp: &TopicPartition, resume: bool) {
        if !self.restoring.remove(tp) || !resume || self.paused || self.finished.contains(tp) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(error = %e, partition = %tp, "cannot resume a restored partition");
        }
    }

    /// Newly assigned partitions start paused while everything is.
    pub fn on_assigned(&self, consumer: &GroupConsumer, tpl: &TopicPartitionList) {
        if self.paused {
            let _ = consumer.pause(tpl);
        }
    }
}
