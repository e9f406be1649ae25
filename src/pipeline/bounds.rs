//! Where a replay starts each partition and when it is done.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{GroupConsumer, TimeLookup};
use crate::offsets::TopicPartition;
use crate::replay::RunMark;
use crate::start::{decide, StartAt, StartDecision, Until};

use super::assignment::Assignment;

/// Owns a bounded run's start and end. Promises: every run starts where it is told, however
/// often it is run: a partition continues from a commit only when this same run made it
/// (its metadata, see [`RunMark`]), so a partition handed from one member to another
/// mid-run goes on where the first stopped, and an earlier run's commits never cut a new
/// one short. The run is done only when every partition of its topics is read to the
/// end (by this member, or committed to it under this run by another) and everything read
/// is settled.
pub struct Bounds {
    start: StartAt,
    until: Until,
    /// How this run marks its commits; `None` when the group's own offsets are the start.
    mark: Option<RunMark>,
    topics: Vec<String>,
    started: HashSet<TopicPartition>,
    /// Where this run started each partition it read, as an offset.
    starts: HashMap<TopicPartition, i64>,
    /// `Until::StartOffsets`: every partition's end when the run began.
    start_ends: Option<HashMap<TopicPartition, i64>>,
    /// The same, as a list the hot path scans without building a key.
    ends_list: Vec<(std::sync::Arc<str>, i32, i64)>,
    last_check: Option<Instant>,
    /// Where each partition stood at the last check: (partition, read up to, end).
    standing: Vec<(TopicPartition, i64, i64)>,
    /// Asks the brokers for partitions and watermarks on connections of its own: on the
    /// consumer's, the request waits behind each fetch the broker holds open
    /// (`fetch.wait.max.ms`), which made every check of a few partitions take seconds.
    probe: BaseConsumer,
}

const TIMEOUT: Duration = Duration::from_secs(10);
const CHECK_EVERY: Duration = Duration::from_millis(200);

impl Bounds {
    /// `mark`: how this run marks its commits (see [`RunMark`]); `None` when it starts from
    /// the group's own offsets.
    pub fn new(
        start: StartAt,
        until: Until,
        topics: &[String],
        mark: Option<RunMark>,
        probe: BaseConsumer,
    ) -> Bounds {
        Bounds {
            start,
            until,
            mark,
            topics: topics.to_vec(),
            started: HashSet::new(),
            starts: HashMap::new(),
            start_ends: None,
            ends_list: Vec::new(),
            last_check: None,
            standing: Vec::new(),
            probe,
        }
    }

    fn trusts(&self, metadata: Option<&str>) -> bool {
        self.mark
            .as_ref()
            .is_some_and(|m| metadata.is_some_and(|meta| m.trusts(meta)))
    }

    /// Every partition of the topics, from the broker.
    fn all_partitions(&self) -> Result<Vec<TopicPartition>, KafkaError> {
        let mut all = Vec::new();
        for topic in &self.topics {
            let md = self.probe.fetch_metadata(Some(topic), TIMEOUT)?;
            for t in md.topics() {
                for p in t.partitions() {
                    all.push(TopicPartition::new(t.name(), p.id()));
                }
            }
        }
        all.sort();
        Ok(all)
    }

    /// Takes every partition's end once, at the first assignment, before anything is read.
    fn take_start_ends(&mut self) {
        if self.until != Until::StartOffsets || self.start_ends.is_some() {
            return;
        }
        let mut ends = HashMap::new();
        match self.all_partitions() {
            Ok(all) => {
                for tp in all {
                    match self
                        .probe
                        .fetch_watermarks(&tp.topic, tp.partition, TIMEOUT)
                    {
                        Ok((_, high)) => {
                            ends.insert(tp, high);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, partition = %tp, "cannot read the end offset")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the partitions to replay"),
        }
        self.ends_list = ends
            .iter()
            .map(|(tp, end)| (tp.topic.clone(), tp.partition, *end))
            .collect();
        self.start_ends = Some(ends);
    }

    /// Whether a record lies at or past its partition's end taken at start
    /// (`Until::StartOffsets`): it is not read.
    pub fn past_end(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.ends_list
            .iter()
            .find(|(t, p, _)| *p == partition && &**t == topic)
            .is_some_and(|(_, _, end)| offset >= *end)
    }

    /// Sets the start offset of partitions this member is assigned for the first time.
    /// Runs inside the rebalance callback, before the assignment takes effect.
    pub fn assigning(&mut self, consumer: &GroupConsumer, tpl: &mut TopicPartitionList) {
        self.take_start_ends();
        let new: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .filter(|tp| !self.started.contains(tp))
            .collect();
        if new.is_empty() {
            return;
        }
        let committed = self.committed(consumer, &new).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the group's committed offsets");
            HashMap::new()
        });
        for tp in new {
            self.started.insert(tp.clone());
            let run_commit = committed
                .get(&tp)
                .filter(|(_, meta)| self.trusts(meta.as_deref()))
                .map(|(o, _)| *o);
            let decision = match run_commit {
                // Another member of this run read it this far.
                Some(o) => Ok(StartDecision::At(o)),
                None => decide(&self.start, &tp.topic, tp.partition, &TimeLookup(consumer)),
            };
            let offset = match decision {
                Ok(StartDecision::At(o)) => o,
                Ok(StartDecision::Committed) => match committed.get(&tp) {
                    Some((o, _)) => *o,
                    // No commit: auto.offset.reset = earliest.
                    None => self.watermark(&tp, false),
                },
                Ok(StartDecision::Beginning) => self.watermark(&tp, false),
                Ok(StartDecision::End) => self.watermark(&tp, true),
                Err(e) => {
                    tracing::error!(error = %e, partition = %tp,
                        "start offset lookup failed; starting at the log start");
                    self.watermark(&tp, false)
                }
            };
            if offset < 0 {
                continue;
            }
            tracing::info!(partition = %tp, offset, continued = run_commit.is_some(), "reading from here");
            self.starts.insert(tp.clone(), offset);
            if let Some(mut e) = tpl.find_partition(&tp.topic, tp.partition) {
                let _ = e.set_offset(Offset::Offset(offset));
            }
        }
    }

    /// The log start (`high` false) or end; -1 when it cannot be read (librdkafka then
    /// starts from the committed offset or `auto.offset.reset`).
    fn watermark(&self, tp: &TopicPartition, high: bool) -> i64 {
        match self
            .probe
            .fetch_watermarks(&tp.topic, tp.partition, TIMEOUT)
        {
            Ok((l, h)) => {
                if high {
                    h
                } else {
                    l
                }
            }
            Err(e) => {
                tracing::error!(error = %e, partition = %tp, "cannot read the watermarks");
                -1
            }
        }
    }

    /// The group's committed offsets and their metadata.
    fn committed(
        &self,
        consumer: &GroupConsumer,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, (i64, Option<String>)>, KafkaError> {
        let mut q = TopicPartitionList::new();
        for tp in partitions {
            q.add_partition(&tp.topic, tp.partition);
        }
        let answer = consumer.committed_offsets(q, TIMEOUT)?;
        let mut out = HashMap::new();
        for e in answer.elements() {
            if let Offset::Offset(o) = e.offset() {
                let meta = Some(e.metadata().to_string()).filter(|m| !m.is_empty());
                out.insert(TopicPartition::new(e.topic(), e.partition()), (o, meta));
            }
        }
        Ok(out)
    }

    /// Whether the run is done. Call only when everything read is settled and the last poll
    /// brought nothing. Asks the broker, so it answers at most every 200 ms.
    pub fn caught_up(&mut self, consumer: &GroupConsumer, assignment: &Assignment) -> bool {
        self.check(consumer, assignment, false)
    }

    /// Whether this member has read every partition it holds to the end (a replay's fold
    /// then sends what it read). Unlike `caught_up`, what other members hold does not count:
    /// they commit only once they have sent what they read, so waiting for them here would
    /// have each member wait for the others. Asks the broker, at most every 200 ms.
    pub fn read_to_end(&mut self, consumer: &GroupConsumer, assignment: &Assignment) -> bool {
        self.check(consumer, assignment, true)
    }

    fn check(
        &mut self,
        consumer: &GroupConsumer,
        assignment: &Assignment,
        mine_only: bool,
    ) -> bool {
        if self.last_check.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
            return false;
        }
        self.last_check = Some(Instant::now());
        let all = match self.all_partitions() {
            Ok(all) if !all.is_empty() => all,
            _ => return false,
        };
        let position = consumer.position().ok();
        let all: Vec<TopicPartition> = all
            .into_iter()
            .filter(|tp| !mine_only || assignment.holds(tp))
            .collect();
        let elsewhere: Vec<TopicPartition> = all
            .iter()
            .filter(|tp| !assignment.holds(tp))
            .cloned()
            .collect();
        let committed = if elsewhere.is_empty() {
            HashMap::new()
        } else {
            match self.committed(consumer, &elsewhere) {
                Ok(c) => c,
                Err(_) => return false,
            }
        };
        let mut standing = Vec::with_capacity(all.len());
        let mut done = true;
        for tp in all {
            let Ok((low, high)) = self
                .probe
                .fetch_watermarks(&tp.topic, tp.partition, TIMEOUT)
            else {
                return false;
            };
            // With read_committed (librdkafka's default) the high watermark is the last
            // stable offset: a transaction still open is not the end.
            let end = match (&self.start_ends, self.until) {
                (Some(ends), Until::StartOffsets) => ends.get(&tp).copied().unwrap_or(high),
                _ => high,
            };
            let read = if assignment.holds(&tp) {
                // Records read, or the consumer's position (past transaction markers, which
                // are not records), or where this run started it.
                let pos = position
                    .as_ref()
                    .and_then(|p| p.find_partition(&tp.topic, tp.partition))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                [
                    assignment.next_offset(&tp),
                    pos,
                    self.starts.get(&tp).copied(),
                ]
                .into_iter()
                .flatten()
                .max()
            } else {
                // Held by another member (or by none yet): done when committed under this
                // run, or by the group when the run starts from the group's offsets.
                committed
                    .get(&tp)
                    .filter(|(_, meta)| self.mark.is_none() || self.trusts(meta.as_deref()))
                    .map(|(o, _)| *o)
            };
            if low < end && read.is_none_or(|r| r < end) {
                done = false;
            }
            standing.push((tp, read.unwrap_or(low), end));
        }
        self.standing = standing;
        done
    }

    /// Where each partition stood at the last check, for a run stopped before it was done.
    pub fn standing(&self) -> &[(TopicPartition, i64, i64)] {
        &self.standing
    }

    /// Where this run started the partition: what to commit for it before a record of it
    /// is read, so that other members see it done when there is nothing to read.
    pub fn start_of(&self, tp: &TopicPartition) -> Option<i64> {
        self.starts.get(tp).copied()
    }

    /// The end a progress display counts to: the start's end for `Until::StartOffsets`.
    pub fn start_end(&self, tp: &TopicPartition) -> Option<i64> {
        self.start_ends.as_ref()?.get(tp).copied()
    }
}
