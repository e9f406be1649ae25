//! Reads rejected records back from the log for their dead-letter copies. The window keeps
//! a 16-byte position per event, not the payload (that is what keeps a pending user under
//! 300 bytes), so on the rare rejection the original key, value and headers are fetched
//! again, on a thread of its own so the poll loop never waits for it.
//!
//! A position is never settled without its record: a fetch that fails or times out is tried
//! again until it answers. Only a record the log no longer has (below the log start after
//! retention, or skipped over by compaction) is dead-lettered without its value, with a
//! header saying so and its own `reason` label.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::writer::{DlqWriter, PendingDlq};
use super::{dead_letter, DlqReason, SourceRecord};
use crate::braze::Rejection;
use crate::config::Config;
use crate::kafka::RecordHeaders;
use crate::offsets::Position;

/// The `reason` label of a rejected record that the log no longer holds.
pub const LABEL_GONE: &str = "gone";

/// The events of one partition that Braze rejected.
pub struct RejectedEvents {
    pub topic: Arc<str>,
    pub partition: i32,
    pub positions: Vec<Position>,
    pub rejection: Rejection,
    /// For a record holding several changes: `segment_sync.rejections`, one line a change.
    pub lines: Option<String>,
}

/// The re-reading thread. Every position handed to it comes back as exactly one
/// dead-letter write (through the writer's outcomes), unless the worker stops first: then
/// it stays unsettled and the partition's next owner reads it again.
pub struct Rereader {
    jobs: Option<Sender<RejectedEvents>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rereader {
    pub fn start(
        cfg: &Config,
        group_id: &str,
        dlq: Arc<DlqWriter>,
    ) -> Result<Rereader, KafkaError> {
        let fetcher = Fetcher::new(cfg, group_id)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dlq-reread".into())
            .spawn(move || serve(fetcher, rx, dlq, flag))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start the re-reading thread");
                KafkaError::ClientCreation(e.to_string())
            })?;
        Ok(Rereader {
            jobs: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// Hands rejected events over; false when the thread is gone (they stay unsettled).
    pub fn submit(&self, job: RejectedEvents) -> bool {
        self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }
}

impl Drop for Rereader {
    /// Stops retrying and closes the thread's clients before the worker returns.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    fetcher: Fetcher,
    rx: Receiver<RejectedEvents>,
    dlq: Arc<DlqWriter>,
    stop: Arc<AtomicBool>,
) {
    // Rejections come in bursts (a request's users): everything waiting is read back with
    // one fetch per partition.
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut by_partition: BTreeMap<(Arc<str>, i32), Vec<RejectedEvents>> = BTreeMap::new();
        for job in jobs {
            by_partition
                .entry((job.topic.clone(), job.partition))
                .or_default()
                .push(job);
        }
        for ((topic, partition), jobs) in by_partition {
            let offsets: Vec<i64> = jobs
                .iter()
                .flat_map(|j| j.positions.iter().map(|p| p.offset()))
                .collect();
            let Some(found) = fetcher.fetch_all(&topic, partition, &offsets, &stop) else {
                return;
            };
            for job in jobs {
                for pos in &job.positions {
                    let mut pending = pending_for(&topic, partition, *pos, &job.rejection, &found);
                    if let Some(lines) = &job.lines {
                        pending.record.headers.push((
                            super::HEADER_REJECTIONS.into(),
                            Some(lines.clone().into_bytes()),
                        ));
                    }
                    send(&dlq, pending, &stop);
                }
            }
        }
    }
}

/// What a fetch learnt of one wanted offset.
#[derive(Debug)]
pub enum Reread {
    Found(OwnedMessage),
    /// No longer in the log; the reason says how we know.
    Gone(String),
}

fn pending_for(
    topic: &str,
    partition: i32,
    pos: Position,
    rejection: &Rejection,
    found: &BTreeMap<i64, Reread>,
) -> Box<PendingDlq> {
    let mut pending = rejected_record(
        topic,
        partition,
        pos.offset(),
        rejection,
        found.get(&pos.offset()),
    );
    pending.positions.push(pos);
    pending
}

/// The dead-letter record of a record Braze refused, from what a re-read found of it (its
/// coordinates only, and a header saying why, when the log no longer has it). It settles
/// no position until the caller adds them.
pub fn rejected_record(
    topic: &str,
    partition: i32,
    offset: i64,
    rejection: &Rejection,
    found: Option<&Reread>,
) -> Box<PendingDlq> {
    let reason = DlqReason::Rejected {
        status: rejection.status,
        error_type: rejection.error_type.clone(),
        message: rejection.message.clone(),
    };
    let (msg, gone) = match found {
        Some(Reread::Found(m)) => (Some(m), None),
        Some(Reread::Gone(why)) => (None, Some(why.as_str())),
        None => (None, Some("not returned by the log")),
    };
    let headers = msg.map(|m| m.record_headers()).unwrap_or_default();
    let src = SourceRecord {
        topic,
        partition,
        offset,
        timestamp: msg.and_then(|m| m.timestamp().to_millis()),
        key: msg.and_then(|m| m.key()),
        value: msg.and_then(|m| m.payload()),
        headers,
    };
    let mut record = dead_letter(&src, &reason);
    let mut label = reason.metric_label();
    if let Some(why) = gone {
        tracing::warn!(
            topic,
            partition,
            offset,
            why,
            "rejected record no longer in the log; dead-lettering its coordinates only"
        );
        record.omit_payload(why);
        label = LABEL_GONE;
    }
    Box::new(PendingDlq {
        record,
        positions: Vec::new(),
        label,
    })
}

/// Queues a record, waiting (on this thread) while librdkafka's queue is full.
fn send(dlq: &DlqWriter, pending: Box<PendingDlq>, stop: &AtomicBool) {
    let mut pending = pending;
    while let Err(p) = dlq.send(pending) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        pending = p;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A consumer that reads single records by offset: assigned, never subscribed.
pub struct Fetcher {
    consumer: BaseConsumer,
}

impl Fetcher {
    pub fn new(cfg: &Config, group_id: &str) -> Result<Fetcher, KafkaError> {
        let mut c = crate::kafka::client_config(cfg);
        // The group id only satisfies librdkafka; nothing is committed under it.
        c.set("group.id", format!("{group_id}.reread"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            // An offset out of range must be reported, not silently moved to the end (the
            // default) or the start: it is how a record deleted by retention shows.
            .set("auto.offset.reset", "error")
            // The records are there already: do not let the broker hold the fetch open.
            .set("fetch.wait.max.ms", "10");
        Ok(Fetcher {
            consumer: c.create()?,
        })
    }

    /// Reads until every offset is found or known gone, trying again after failures, until
    /// `stop`; `None` when stopped.
    pub fn fetch_all(
        &self,
        topic: &str,
        partition: i32,
        offsets: &[i64],
        stop: &AtomicBool,
    ) -> Option<BTreeMap<i64, Reread>> {
        let mut found = BTreeMap::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            let missing: Vec<i64> = offsets
                .iter()
                .copied()
                .filter(|o| !found.contains_key(o))
                .collect();
            if missing.is_empty() {
                return Some(found);
            }
            self.fetch(
                topic,
                partition,
                &missing,
                Duration::from_secs(10),
                &mut found,
            );
            if missing.iter().all(|o| found.contains_key(o)) {
                return Some(found);
            }
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            tracing::warn!(
                topic,
                partition,
                missing = missing.len(),
                ?backoff,
                "rejected records not read back yet; trying again"
            );
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One attempt: reads from the lowest wanted offset up to the highest, within `timeout`,
    /// and records what it learnt in `found`.
    pub fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offsets: &[i64],
        timeout: Duration,
        found: &mut BTreeMap<i64, Reread>,
    ) {
        let (Some(&first), Some(&last)) = (offsets.iter().min(), offsets.iter().max()) else {
            return;
        };
        if self.below_log_start(topic, partition, offsets, found)
            && offsets.iter().all(|o| found.contains_key(o))
        {
            return;
        }
        let first = offsets
            .iter()
            .copied()
            .filter(|o| !found.contains_key(o))
            .min()
            .unwrap_or(first);
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(first))
            .and_then(|_| self.consumer.assign(&tpl))
            .is_err()
        {
            return;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let offset = m.offset();
                    // Records come in offset order from `first`: a wanted offset passed
                    // without being returned is not in the log any more (compaction).
                    for o in offsets.iter().filter(|o| **o < offset && **o >= first) {
                        found
                            .entry(*o)
                            .or_insert_with(|| Reread::Gone(format!("skipped by the log (compacted): the next record is at offset {offset}")));
                    }
                    if offsets.contains(&offset) {
                        found.insert(offset, Reread::Found(m.detach()));
                    }
                    if offset >= last {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) =>
                {
                    // Out of range: below the log start now, or a broker that lost data.
                    self.below_log_start(topic, partition, offsets, found);
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic, partition, "re-reading a rejected record");
                }
                None => {}
            }
        }
        let _ = self.consumer.unassign();
    }

    /// Marks the offsets below the partition's log start as gone; true when the log start
    /// could be read.
    fn below_log_start(
        &self,
        topic: &str,
        partition: i32,
        offsets: &[i64],
        found: &mut BTreeMap<i64, Reread>,
    ) -> bool {
        match self
            .consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(5))
        {
            Ok((low, _)) => {
                for o in offsets.iter().filter(|o| **o < low) {
                    found.entry(*o).or_insert_with(|| {
                        Reread::Gone(format!(
                            "deleted from the log (retention): the log now starts at offset {low}"
                        ))
                    });
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, topic, partition, "cannot read the log start");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    /// Any producer may write a header key that is not UTF-8; rdkafka's `Headers::iter`
    /// panics on one, which killed this thread and left its positions unsettled for good.
    #[test]
    fn a_header_key_that_is_not_utf8_is_copied_byte_exact() {
        let headers = crate::kafka::owned_headers(
            [
                (&b"trace"[..], Some(&b"abc"[..])),
                (&b"k\xff\xfe"[..], Some(&b"v\xc3"[..])),
                (&b"\xc3("[..], None),
            ]
            .into_iter(),
        );
        let msg = OwnedMessage::new(
            Some(b"value".to_vec()),
            Some(b"key".to_vec()),
            "t".into(),
            Timestamp::CreateTime(1),
            0,
            7,
            Some(headers),
        );
        let found = BTreeMap::from([(7, Reread::Found(msg))]);
        let rejection = Rejection {
            status: 200,
            error_type: "invalid".into(),
            message: "m".into(),
        };
        let pending = pending_for("t", 0, Position::for_tests(7), &rejection, &found);
        let originals: Vec<_> = pending.record.headers[..3]
            .iter()
            .map(|(k, v)| (AsRef::<[u8]>::as_ref(k), v.as_deref()))
            .collect();
        assert_eq!(
            originals,
            [
                (&b"trace"[..], Some(&b"abc"[..])),
                (&b"k\xff\xfe"[..], Some(&b"v\xc3"[..])),
                (&b"\xc3("[..], None),
            ]
        );
        assert_eq!(pending.record.value.as_deref(), Some(&b"value"[..]));
    }
}
