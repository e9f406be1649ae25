//! Reads a newly assigned partition's settled history back (DESIGN.md, "Versions restored on
//! assignment"): the records below its committed offset, at most `window.restore_records` of
//! them, folded into each (user, segment)'s and attribute's greatest version for the window.
//!
//! On a thread and a client of its own (and, while a partition is read, a second thread that
//! decodes and folds), as the dead-letter re-reader does, so the poll loop never waits for
//! it: the partitions wait, paused, until their restore is done. A read that fails is tried
//! again from the start of the partition's range until it answers or the worker stops; a
//! history shortened by retention restores what is left of it.

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

use super::ingest::restore_read;
use crate::config::Config;
use crate::event::Rules;
use crate::offsets::TopicPartition;
use crate::source::Source;
use crate::versions::Versions;

/// A partition's restore, done.
pub struct Restored {
    pub tp: TopicPartition,
    pub versions: Versions,
    /// Records read back (a record of a CDP shape may hold several changes, each a version).
    pub records: u64,
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
    waiting: Waiting,
}

/// The partitions waiting for their restore: the generation of each one's assignment and when
/// it began to wait. Pure (the time is handed in), so what `/readyz` says is tested without
/// waiting a minute. Promises: a partition is waiting from `wait` until `done` with the same
/// generation or `cancel`; `overdue` names, in partition order, those waiting longer than the
/// threshold at the given time.
#[derive(Default)]
pub struct Waiting {
    partitions: BTreeMap<TopicPartition, (u64, Instant)>,
}

impl Waiting {
    pub fn wait(&mut self, tp: TopicPartition, generation: u64, now: Instant) {
        self.partitions.insert(tp, (generation, now));
    }

    pub fn cancel(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// The restore of `tp` for `generation` is done: `false` when that assignment has ended
    /// (revoked, or assigned again since), so its result is to be dropped.
    pub fn done(&mut self, tp: &TopicPartition, generation: u64) -> bool {
        let current = self
            .partitions
            .get(tp)
            .is_some_and(|(g, _)| *g == generation);
        if current {
            self.partitions.remove(tp);
        }
        current
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// Partitions that have waited longer than `after` at `now`.
    pub fn overdue(&self, now: Instant, after: Duration) -> Vec<&TopicPartition> {
        self.partitions
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) > after)
            .map(|(tp, _)| tp)
            .collect()
    }

    /// What `/readyz` says at `now`: `None` while no partition has waited longer than `after`.
    pub fn fault(&self, now: Instant, after: Duration) -> Option<String> {
        let overdue = self.overdue(now, after);
        (!overdue.is_empty()).then(|| {
            let names: Vec<String> = overdue.iter().map(ToString::to_string).collect();
            format!(
                "partitions waiting over {} s for their restore: {}",
                after.as_secs(),
                names.join(", ")
            )
        })
    }
}

impl Restorer {
    /// `records`: at most this many records per partition (`window.restore_records`, > 0).
    pub fn start(
        cfg: &Config,
        group_id: &str,
        source: Source,
        rules: Rules,
        records: u64,
    ) -> Result<Restorer, KafkaError> {
        let reader = Reader {
            consumer: reader_config(cfg, group_id).create()?,
            source,
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
            waiting: Waiting::default(),
        })
    }

    /// The partition was assigned at `generation`: restore it before it is read.
    pub fn submit(&mut self, tp: TopicPartition, generation: u64) {
        self.waiting.wait(tp.clone(), generation, Instant::now());
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
        self.waiting.cancel(tp);
    }

    /// Some partition waits for its restore: the poll loop should come back soon to take it.
    pub fn is_busy(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Restores finished for partitions still waiting for them.
    pub fn take_done(&mut self) -> Vec<Restored> {
        let mut done = Vec::new();
        while let Ok((generation, r)) = self.results.try_recv() {
            if self.waiting.done(&r.tp, generation) {
                done.push(r);
            }
        }
        done
    }

    /// What `/readyz` should say now of partitions waiting longer than `after`.
    pub fn overdue_fault(&self, after: Duration) -> Option<String> {
        self.waiting.fault(Instant::now(), after)
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
        .set("fetch.wait.max.ms", "10")
        // librdkafka's default waits a full second before fetching again once its local
        // queue holds queued.min.messages; the restore drains that queue faster than the
        // second, so the default stalled a partition's read for most of it.
        .set("fetch.queue.backoff.ms", "10")
        // Its default prefetch of 64 MB is memory the worker's budget (issue 13) does not
        // have; 16 MB is still a good part of a second of reading ahead.
        .set("queued.max.messages.kbytes", "16384");
    c
}

struct Reader {
    consumer: BaseConsumer,
    source: Source,
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
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let outcome = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match reader.read(&job.tp, &stop) {
                Ok(Some(range)) => break range,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(partition = %job.tp, error = %e, retry_in = ?backoff,
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
        };
        let (versions, records, from, to) = outcome;
        let restored = Restored {
            tp: job.tp,
            versions,
            records,
            from,
            to,
            elapsed: started.elapsed(),
        };
        if results.send((job.generation, restored)).is_err() {
            return;
        }
    }
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
    fn read(
        &mut self,
        tp: &TopicPartition,
        stop: &AtomicBool,
    ) -> Result<Option<(Versions, u64, i64, i64)>, ReadError> {
        let mut versions = Versions::new();
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition(&tp.topic, tp.partition);
        let committed = self.consumer.committed_offsets(wanted, TIMEOUT)?;
        let to = match committed
            .find_partition(&tp.topic, tp.partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o,
            // Nothing committed: the group starts this partition afresh, with no history.
            _ => return Ok(Some((versions, 0, 0, 0))),
        };
        let (low, _) = self
            .consumer
            .fetch_watermarks(&tp.topic, tp.partition, TIMEOUT)?;
        let from = to.saturating_sub(self.records).max(low);
        if from >= to {
            return Ok(Some((versions, 0, from, to)));
        }
        versions = Versions::with_capacity(usize::try_from(to - from).unwrap_or(0));
        let mut range = TopicPartitionList::new();
        range.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(from))?;
        self.consumer.assign(&range)?;
        let result = self.read_range(tp.partition, to, &mut versions, stop);
        let _ = self.consumer.unassign();
        Ok(result?.map(|records| (versions, records, from, to)))
    }

    /// Folds records until the one before `to` (or the first at or past it, or the end of
    /// the log: a record below `to` may be a transaction marker that is never delivered).
    /// The records read, or `Ok(None)` when stopped.
    ///
    /// Two threads in a pipeline: this one polls and copies the records into batches, a
    /// second decodes and folds them. On one thread the decoding and folding (≈ 3/4 of a
    /// partition's read) waited for each poll and the fetcher for them.
    fn read_range(
        &mut self,
        partition: i32,
        to: i64,
        versions: &mut Versions,
        stop: &AtomicBool,
    ) -> Result<Option<u64>, ReadError> {
        let Reader {
            consumer,
            source,
            rules,
            ..
        } = self;
        let rules: &Rules = rules;
        let (batches, inbox) = std::sync::mpsc::sync_channel::<Batch>(PIPELINE_BATCHES);
        std::thread::scope(|scope| {
            let folder =
                scope.spawn(move || fold_batches(inbox, source, rules, partition, versions));
            let read = poll_range(consumer, rules, to, stop, &batches);
            drop(batches);
            let folded = folder
                .join()
                .unwrap_or_else(|_| Err(ReadError::Registry("the folding thread panicked".into())));
            // A fold that failed ended the polling (its inbox closed): its error is the one.
            let records = folded?;
            Ok(read?.then_some(records))
        })
    }
}

/// Records in a batch between the polling and the folding thread.
const PIPELINE_BATCH: usize = 2048;
/// Batches in flight: enough to ride out a slow poll, few enough to bound the memory.
const PIPELINE_BATCHES: usize = 8;

/// Records copied out of librdkafka's messages: payloads end to end in one buffer.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// (payload's end in `bytes`, or `None` for a record without one; timestamp; offset).
    records: Vec<(Option<usize>, i64, i64)>,
}

/// Polls the assigned range and hands it on in batches; `Ok(false)` when stopped or when the
/// folding thread has gone (it reports why).
fn poll_range(
    consumer: &BaseConsumer,
    rules: &Rules,
    to: i64,
    stop: &AtomicBool,
    batches: &std::sync::mpsc::SyncSender<Batch>,
) -> Result<bool, ReadError> {
    let mut last_progress = Instant::now();
    let mut batch = Batch::default();
    let flush = |batch: &mut Batch| batches.send(std::mem::take(batch)).is_ok();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // Nothing waiting in the client: what is batched goes on rather than wait for it.
        let polled = consumer.poll(if batch.records.is_empty() {
            POLL
        } else {
            Duration::ZERO
        });
        match polled {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                if m.offset() >= to {
                    return Ok(flush(&mut batch));
                }
                // `max_future_ms` is judged against when the record was written, so an event
                // dead-lettered as too far ahead then is not valid now.
                let at = m
                    .timestamp()
                    .to_millis()
                    .unwrap_or_else(|| rules.epoch_ms(0));
                let end = m.payload().map(|p| {
                    batch.bytes.extend_from_slice(p);
                    batch.bytes.len()
                });
                batch.records.push((end, at, m.offset()));
                if m.offset() + 1 >= to {
                    return Ok(flush(&mut batch));
                }
                if batch.records.len() >= PIPELINE_BATCH && !flush(&mut batch) {
                    return Ok(false);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(flush(&mut batch)),
            Some(Err(e)) => {
                if matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::OffsetOutOfRange)
                ) {
                    // auto.offset.reset moves on to what is left; keep reading.
                    continue;
                }
                return Err(e.into());
            }
            None => {
                if !batch.records.is_empty() && !flush(&mut batch) {
                    return Ok(false);
                }
                if last_progress.elapsed() > STALLED {
                    return Err(ReadError::Stalled(STALLED));
                }
            }
        }
    }
}

/// Decodes and folds the batches until the polling thread closes the channel; the records
/// read (whatever each held: none, one or several changes).
fn fold_batches(
    inbox: Receiver<Batch>,
    source: &mut Source,
    rules: &Rules,
    partition: i32,
    versions: &mut Versions,
) -> Result<u64, ReadError> {
    let mut records = 0;
    for batch in inbox {
        records += batch.records.len() as u64;
        let mut start = 0;
        for &(end, at, offset) in &batch.records {
            let payload = end.map(|end| &batch.bytes[std::mem::replace(&mut start, end)..end]);
            // A record dead-lettered or ignored when it was read live has no version.
            let events = restore_read(source, rules, payload, at).map_err(ReadError::Registry)?;
            for event in &events {
                if let Some(identity) = event.identity() {
                    versions.add(event, identity, partition, offset);
                }
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition {
            topic: "t".into(),
            partition: p,
        }
    }

    #[test]
    fn readyz_names_only_the_partitions_waiting_longer_than_the_threshold() {
        let minute = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut w = Waiting::default();
        w.wait(tp(2), 1, t0);
        w.wait(tp(0), 1, t0 + Duration::from_secs(30));
        w.wait(tp(1), 1, t0 + Duration::from_secs(40));
        assert_eq!(
            w.fault(t0 + minute, minute),
            None,
            "exactly a minute is not over"
        );
        assert_eq!(
            w.fault(t0 + Duration::from_secs(61), minute).as_deref(),
            Some("partitions waiting over 60 s for their restore: t[2]")
        );
        // One done, one revoked: only the one still waiting is named, and the line goes once
        // none is overdue.
        assert!(w.done(&tp(2), 1));
        w.cancel(&tp(1));
        let late = t0 + Duration::from_secs(120);
        assert_eq!(
            w.fault(late, minute).as_deref(),
            Some("partitions waiting over 60 s for their restore: t[0]")
        );
        assert!(w.done(&tp(0), 1));
        assert_eq!(w.fault(late, minute), None);
        assert!(w.is_empty());
    }

    #[test]
    fn a_result_for_an_ended_assignment_is_dropped() {
        let t0 = Instant::now();
        let mut w = Waiting::default();
        w.wait(tp(0), 1, t0);
        // Revoked and assigned again: the first assignment's restore no longer counts, and a
        // new assignment waits from its own start.
        w.wait(tp(0), 2, t0 + Duration::from_secs(50));
        assert!(!w.done(&tp(0), 1));
        assert_eq!(
            w.overdue(t0 + Duration::from_secs(70), Duration::from_secs(60)),
            Vec::<&TopicPartition>::new()
        );
        assert!(w.done(&tp(0), 2));
        w.wait(tp(1), 3, t0);
        w.cancel(&tp(1));
        assert!(!w.done(&tp(1), 3));
    }
}
