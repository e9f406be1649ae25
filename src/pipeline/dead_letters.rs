//! Records on their way to the dead-letter topic, until Kafka acknowledges them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;

use crate::braze::Rejection;
use crate::dlq::{
    dead_letter, DlqOutcome, DlqReason, DlqWriter, PendingDlq, RejectedEvents, Rereader,
    SourceRecord,
};
use crate::health::{Fault, Health};
use crate::kafka::RecordHeaders;
use crate::metrics::Metrics;
use crate::offsets::{Position, TopicPartition};

/// Owns the dead-letter writer and the re-reader. Promises: a position given to it settles
/// only once its dead-letter copy is acknowledged; a write that fails is written again,
/// later, never in a loop on the caller's thread; while writes keep failing it reports a
/// fault (the pipeline pauses, `/readyz` says why), cleared by the next success.
pub struct DeadLetters {
    writer: Arc<DlqWriter>,
    rereader: Rereader,
    /// Positions handed over and not yet acknowledged.
    pending: usize,
    retry: VecDeque<(Instant, Box<PendingDlq>)>,
    backoff: Duration,
    failing: Option<String>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl DeadLetters {
    pub fn new(
        writer: Arc<DlqWriter>,
        rereader: Rereader,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> DeadLetters {
        DeadLetters {
            writer,
            rereader,
            pending: 0,
            retry: VecDeque::new(),
            backoff: FIRST_BACKOFF,
            failing: None,
            metrics,
            health,
        }
    }

    /// Dead-letters a consumed record with its key, value and headers.
    pub fn record<M: Message + RecordHeaders>(&mut self, m: &M, pos: Position, reason: &DlqReason) {
        let headers = m.record_headers();
        let src = SourceRecord {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key(),
            value: m.payload(),
            headers,
        };
        self.pending += 1;
        self.send(Box::new(PendingDlq {
            record: dead_letter(&src, reason),
            positions: vec![pos],
            label: reason.metric_label(),
        }));
    }

    /// Dead-letters the records of `positions` that Braze refused: they are read back from
    /// the log first, on the re-reader's thread.
    /// `lines`: for a record holding several changes, the `segment_sync.rejections` header.
    pub fn rejected(
        &mut self,
        tp: TopicPartition,
        positions: Vec<Position>,
        rejection: Rejection,
        lines: Option<String>,
    ) {
        let n = positions.len();
        let job = RejectedEvents {
            topic: tp.topic,
            partition: tp.partition,
            positions,
            rejection,
            lines,
        };
        if self.rereader.submit(job) {
            self.pending += n;
        } else {
            tracing::error!("the dead-letter re-reader stopped; rejected events stay unsettled");
        }
    }

    fn send(&mut self, pending: Box<PendingDlq>) {
        if let Err(pending) = self.writer.send(pending) {
            // librdkafka's queue is full: a moment later, without counting it a failure.
            self.retry
                .push_back((Instant::now() + Duration::from_millis(10), pending));
        }
    }

    /// What the producer reported. A written record's positions go to `settle`.
    pub fn on_outcome(&mut self, outcome: DlqOutcome, mut settle: impl FnMut(Position)) {
        match outcome {
            DlqOutcome::Written(pending) => {
                self.pending = self.pending.saturating_sub(pending.positions.len());
                for p in &pending.positions {
                    settle(*p);
                }
                self.metrics
                    .dlq_records
                    .with_label_values(&[pending.label])
                    .inc();
                if self.failing.take().is_some() {
                    tracing::info!("dead-letter writes succeed again");
                    self.health.set_fault(Fault::DeadLetters, None);
                }
                self.backoff = FIRST_BACKOFF;
            }
            DlqOutcome::Shrunk(pending) => self.send(pending),
            DlqOutcome::Failed(pending, error) => {
                tracing::warn!(%error, retry_in = ?self.backoff, "dead-letter write failed; the watermark holds until it is written");
                self.health.set_fault(
                    Fault::DeadLetters,
                    Some(format!("writes to the dead-letter topic fail: {error}")),
                );
                self.failing = Some(error);
                self.retry
                    .push_back((Instant::now() + self.backoff, pending));
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Writes again what is due.
    pub fn service(&mut self) {
        let now = Instant::now();
        let due = self.retry.iter().filter(|(at, _)| *at <= now).count();
        if due == 0 {
            return;
        }
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retry)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.retry = later.into();
        for (_, pending) in ready {
            self.send(pending);
        }
    }

    /// Writes keep failing: hold consumption.
    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }

    /// Nothing waits for an acknowledgement.
    pub fn is_idle(&self) -> bool {
        self.pending == 0 && self.retry.is_empty()
    }

    /// Waits (bounded) for librdkafka to send what it has queued; at shutdown.
    pub fn flush(&self, timeout: Duration) {
        self.writer.flush(timeout);
    }
}
