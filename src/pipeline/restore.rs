//! Reads a newly assigned partition's settled history back (DESIGN.md, "Versions restored on
//! assignment"): the records below its committed offset, at most `window.restore_records` of
//! them, folded into each (user, segment)'s and attribute's greatest version for the window.
//!
//! On a thread and a client of its own, as the dead-letter re-reader does, so the poll loop
//! never waits for it: the partitions wait, paused, until their restore is done. A read that
//! fails is tried again from the start of the partition's range until it answers or the
//! worker stops; a history shortened by retention restores what is left of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::ingest::{read_payload, Read};
use crate::config::Config;
use crate::decode::Decoder;
use crate::event::Rules;
use crate::offsets::TopicPartition;
use crate::versions::Versions;

/// A partition's restore, done.
pub struct Restored {
    pub tp: TopicPartition,
    pub versions: Versions,
    /// The offsets read: `from..to` (`to` is the committed offset).
    pub from: i64,
    pub to: i64,
    pub elapsed: Duration,
}

struct Job {
    tp: TopicPartition,
    generation: u64,
}

/// Owns the restoring thread and which partitions wait for it. Promises: a partition handed
/// over is reported done exactly once per assignment (`generation`), unless it is cancelled
/// (revoked) first or the worker stops; a result for an assignment that has ended is dropped.
pub struct Restorer {
    jobs: Option<Sender<Job>>,
    results: Receiver<(u64, Restored)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Partitions waiting: the generation of their assignment and when they began to wait.
    waiting: BTreeMap<TopicPartition, (u64, Instant)>,
}

impl Restorer {
    /// `records`: at most this many records per partition (`window.restore_records`, > 0).
    pub fn start(
        cfg: &Config,
        group_id: &str,
        decoder: Decoder,
        rules: Rules,
        records: u64,
    ) -> Result<Restorer, KafkaError> {
        let reader = Reader {
            consumer: reader_config(cfg, group_id).create()?,
            decoder,
            rules,
            records: i64::try_from(records).unwrap_or(i64::MAX),
        };
        let first_topic = cfg.kafka.topics.first().cloned();
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
        let (results_tx, results_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("restore".into())
            .spawn(move || {
                if let Some(topic) = first_topic {
                    reader.warm_up(&topic);
                }
                serve(reader, jobs_rx, results_tx, flag)
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok(Restorer {
            jobs: Some(jobs_tx),
            results: results_rx,
            stop,
            thread: Some(thread),
            waiting: BTreeMap::new(),
        })
    }

    /// The partition was assigned at `generation`: restore it before it is read.
    pub fn submit(&mut self, tp: TopicPartition, generation: u64) {
        self.waiting
            .insert(tp.clone(), (generation, Instant::now()));
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Job { tp, generation }).is_ok());
        if !sent {
            tracing::error!("the restoring thread is gone; partitions wait");
        }
    }

    /// The partition was revoked: its restore, if still running, no longer matters.
    pub fn cancel(&mut self, tp: &TopicPartition) {
        self.waiting.remove(tp);
    }

    /// Some partition waits for its restore: the poll loop should come back soon to take it.
    pub fn is_busy(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Restores finished for partitions still waiting for them.
    pub fn take_done(&mut self) -> Vec<Restored> {
        let mut done = Vec::new();
        while let Ok((generation, r)) = self.results.try_recv() {
            if self
                .waiting
                .get(&r.tp)
                .is_some_and(|(g, _)| *g == generation)
            {
                self.waiting.remove(&r.tp);
                done.push(r);
            }
        }
        done
    }

    /// Partitions that have waited longer than `after`.
    pub fn overdue(&self, after: Duration) -> Vec<&TopicPartition> {
        self.waiting
            .iter()
            .filter(|(_, (_, since))| since.elapsed() > after)
            .map(|(tp, _)| tp)
            .collect()
    }
}

impl Drop for Restorer {
    /// Stops the read (within one poll) and closes its client before the worker returns.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A consumer that reads a range of a partition: assigned, never subscribed. It carries the
/// group's id to read the group's committed offsets, but never joins the group or commits.
fn reader_config(cfg: &Config, group_id: &str) -> rdkafka::ClientConfig {
    let mut c = crate::kafka::client_config(cfg);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // Records deleted by retention between the watermark read and the fetch: read from
        // what is left.
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10");
    c
}

struct Reader {
    consumer: BaseConsumer,
    decoder: Decoder,
    rules: Rules,
    records: i64,
}

const TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
/// A read that brings nothing for this long is started again.
const STALLED: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("no record for {0:?}")]
    Stalled(Duration),
}

fn serve(
    mut reader: Reader,
    jobs: Receiver<Job>,
    results: Sender<(u64, Restored)>,
    stop: Arc<AtomicBool>,
) {
    // Partitions assigned together are read together, on one assignment: their fetches
    // overlap instead of adding up.
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let mut send = |job: &Job, versions: Versions, from: i64, to: i64| {
                let restored = Restored {
                    tp: job.tp.clone(),
                    versions,
                    from,
                    to,
                    elapsed: started.elapsed(),
                };
                results.send((job.generation, restored)).is_ok()
            };
            match reader.read(&mut batch, &stop, &mut send) {
                Ok(true) => break,
                Ok(false) => return,
                Err(e) => {
                    let partitions: Vec<String> = batch.iter().map(|j| j.tp.to_string()).collect();
                    tracing::warn!(?partitions, error = %e, retry_in = ?backoff,
                        "restore read failed; trying again");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(POLL.min(until - Instant::now()));
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// One partition being read back.
struct Range {
    versions: Versions,
    from: i64,
    to: i64,
}

impl Reader {
    /// Asks for a committed offset once while the group is still being joined, so the client
    /// knows the group's coordinator before the first partition is assigned: found only at
    /// the first request, it added a second to every start, even one with nothing to restore.
    fn warm_up(&self, topic: &str) {
        let mut any = TopicPartitionList::new();
        any.add_partition(topic, 0);
        if let Err(e) = self.consumer.committed_offsets(any, TIMEOUT) {
            tracing::debug!(error = %e, "restore reader warm-up");
        }
    }

    /// One attempt at the partition's range; `Ok(None)` when stopped.
    /// One attempt at the partitions' ranges. Each partition is handed to `send` once done
    /// and leaves `jobs`, so a failed attempt is tried again for the rest only. `Ok(false)`
    /// when stopped (or the results' receiver is gone).
    fn read(
        &mut self,
        jobs: &mut Vec<Job>,
        stop: &AtomicBool,
        send: &mut impl FnMut(&Job, Versions, i64, i64) -> bool,
    ) -> Result<bool, ReadError> {
        let mut wanted = TopicPartitionList::new();
        for j in jobs.iter() {
            wanted.add_partition(&j.tp.topic, j.tp.partition);
        }
        let committed = self.consumer.committed_offsets(wanted, TIMEOUT)?;
        let mut ranges: BTreeMap<(Arc<str>, i32), Range> = BTreeMap::new();
        for j in jobs.iter() {
            let to = match committed
                .find_partition(&j.tp.topic, j.tp.partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                // Nothing committed: the group starts this partition afresh, with no history.
                _ => 0,
            };
            let from = if to > 0 {
                let (low, _) = self
                    .consumer
                    .fetch_watermarks(&j.tp.topic, j.tp.partition, TIMEOUT)?;
                to.saturating_sub(self.records).max(low)
            } else {
                to
            };
            ranges.insert(
                (j.tp.topic.clone(), j.tp.partition),
                Range {
                    versions: Versions::with_capacity(usize::try_from(to - from).unwrap_or(0)),
                    from,
                    to,
                },
            );
        }
        let mut assign = TopicPartitionList::new();
        for ((topic, partition), r) in &ranges {
            if r.from < r.to {
                assign.add_partition_offset(topic, *partition, Offset::Offset(r.from))?;
            }
        }
        // Nothing to read for these: done at once.
        let empty: Vec<(Arc<str>, i32)> = ranges
            .iter()
            .filter(|(_, r)| r.from >= r.to)
            .map(|(k, _)| k.clone())
            .collect();
        for key in empty {
            if !self.finish(key, &mut ranges, jobs, send) {
                return Ok(false);
            }
        }
        if ranges.is_empty() {
            return Ok(true);
        }
        self.consumer.assign(&assign)?;
        let result = self.read_ranges(&mut ranges, jobs, stop, send);
        let _ = self.consumer.unassign();
        result
    }

    /// Hands a finished partition to `send` and forgets it; false when nobody listens.
    fn finish(
        &self,
        key: (Arc<str>, i32),
        ranges: &mut BTreeMap<(Arc<str>, i32), Range>,
        jobs: &mut Vec<Job>,
        send: &mut impl FnMut(&Job, Versions, i64, i64) -> bool,
    ) -> bool {
        let Some(r) = ranges.remove(&key) else {
            return true;
        };
        let Some(i) = jobs
            .iter()
            .position(|j| j.tp.topic == key.0 && j.tp.partition == key.1)
        else {
            return true;
        };
        let job = jobs.remove(i);
        if r.from < r.to {
            // Read to its end: fetch no more of it.
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            let _ = self.consumer.pause(&tpl);
        }
        send(&job, r.versions, r.from, r.to)
    }

    /// Folds each partition's records until the one before its `to` (or the first at or past
    /// it, or the end of the log: a record below `to` may be a transaction marker that is
    /// never delivered).
    fn read_ranges(
        &mut self,
        ranges: &mut BTreeMap<(Arc<str>, i32), Range>,
        jobs: &mut Vec<Job>,
        stop: &AtomicBool,
        send: &mut impl FnMut(&Job, Versions, i64, i64) -> bool,
    ) -> Result<bool, ReadError> {
        let mut last_progress = Instant::now();
        while !ranges.is_empty() {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            match self.consumer.poll(POLL) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    let key = (Arc::<str>::from(m.topic()), m.partition());
                    let Some(r) = ranges.get_mut(&key) else {
                        continue;
                    };
                    let offset = m.offset();
                    if offset < r.to {
                        // `max_future_ms` is judged against when the record was written, so
                        // an event dead-lettered as too far ahead then is not valid now.
                        let at = m
                            .timestamp()
                            .to_millis()
                            .unwrap_or_else(|| self.rules.epoch_ms(0));
                        match read_payload(&mut self.decoder, &self.rules, m.payload(), at) {
                            Read::Valid(event) => {
                                if let Some(identity) = event.identity() {
                                    r.versions.add(&event, identity, key.1, offset);
                                }
                            }
                            // Dead-lettered when it was read live: no version of anything.
                            Read::Undecodable(_) | Read::Invalid(_) => {}
                            Read::Wait(why) => return Err(ReadError::Registry(why)),
                        }
                    }
                    if offset + 1 >= r.to && !self.finish(key, ranges, jobs, send) {
                        return Ok(false);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    // The end of the log below `to`. The error names no topic: every range of
                    // that partition number ends (restoring less is only a write not saved).
                    let ended: Vec<(Arc<str>, i32)> = ranges
                        .keys()
                        .filter(|(_, p)| *p == partition)
                        .cloned()
                        .collect();
                    for key in ended {
                        if !self.finish(key, ranges, jobs, send) {
                            return Ok(false);
                        }
                    }
                }
                Some(Err(e)) => {
                    if matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::OffsetOutOfRange)) {
                        // auto.offset.reset moves on to what is left; keep reading.
                        continue;
                    }
                    return Err(e.into());
                }
                None => {
                    if last_progress.elapsed() > STALLED {
                        return Err(ReadError::Stalled(STALLED));
                    }
                }
            }
        }
        Ok(true)
    }
}
