//! The one place that wires consumer → decode → window → Braze → offsets → commit.
//!
//! One OS thread owns the consumer and polls it; the `Core` it drives holds every piece of
//! state (window, offset tracker, requests in flight) without locks on the hot path. Braze
//! requests run as tokio tasks and report back over a channel, as do dead-letter
//! acknowledgements, so nothing the core owns is shared with them. The core sits behind a
//! mutex only because librdkafka runs the rebalance callbacks inside `poll`, on this same
//! thread: the loop never holds the lock while it polls, so the callback can take it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::batch::{self, Mapping};
use crate::braze::{BrazeClient, ObjectOutcome, Rejection};
use crate::config::{Config, Format};
use crate::consumer::{cached_high_watermark, consumer_config, GroupConsumer, RebalanceContext};
use crate::decode::{Decoder, RegistryClient, SchemaSource};
use crate::dlq::{dead_letter, DlqReason, SourceRecord};
use crate::dlq_writer::{DlqWriter, PendingDlq};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, PartitionId, Position};
use crate::refetch::{self, Refetcher, RejectedEvents};
pub use crate::start::StartAt;
use crate::start::{decide, OffsetLookup, StartDecision};
use crate::window::{Admit, Flush, Window, WindowConfig};

/// When `run` returns by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Only when told to stop (the live worker).
    Stopped,
    /// Caught up with the log: after a flush Braze acknowledged, the end offsets have not
    /// moved past what was consumed.
    CaughtUp,
    /// The end offsets taken when the partitions were assigned (`--until-start`, dry runs).
    StartOffsets,
}

pub struct RunOptions {
    /// The consumer group; the configured one when `None`.
    pub group_id: Option<String>,
    pub start: StartAt,
    pub until: Until,
    /// Set to stop: the worker stops taking records, flushes, drains and commits.
    pub stop: Arc<AtomicBool>,
    /// Dry run: requests are written here as NDJSON instead of being sent to Braze.
    pub dry_run: Option<Box<dyn Write + Send>>,
    /// Filled in as the run goes, for a progress display.
    pub progress: Option<Arc<Progress>>,
}

/// Records read so far and left to read up to the end of the log (or of the start's end
/// offsets for `Until::StartOffsets`), updated at every commit interval.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: std::sync::atomic::AtomicU64,
    pub to_go: std::sync::atomic::AtomicU64,
}

impl RunOptions {
    pub fn live(stop: Arc<AtomicBool>) -> RunOptions {
        RunOptions {
            group_id: None,
            start: StartAt::Committed,
            until: Until::Stopped,
            stop,
            dry_run: None,
            progress: None,
        }
    }
}

/// What a run did, read from the worker's own metrics so it agrees with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub consumed: u64,
    pub decoded: u64,
    pub undecodable: u64,
    pub invalid: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub redundant: u64,
    pub requests: u64,
    pub objects_delivered: u64,
    pub objects_rejected: u64,
    pub data_points: u64,
    pub dlq_records: u64,
    pub committed: Vec<(String, i32, i64)>,
    pub elapsed: Duration,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events consumed       {}", self.consumed)?;
        writeln!(f, "  decoded             {}", self.decoded)?;
        writeln!(f, "  undecodable         {}", self.undecodable)?;
        writeln!(f, "  invalid             {}", self.invalid)?;
        writeln!(f, "  duplicates dropped  {}", self.duplicates)?;
        writeln!(f, "  stale dropped       {}", self.stale)?;
        writeln!(f, "  redundant (unsent)  {}", self.redundant)?;
        writeln!(f, "braze requests        {}", self.requests)?;
        writeln!(f, "users updated         {}", self.objects_delivered)?;
        writeln!(f, "objects rejected      {}", self.objects_rejected)?;
        writeln!(f, "data points written   {}", self.data_points)?;
        writeln!(f, "dead-letter records   {}", self.dlq_records)?;
        writeln!(f, "committed offsets")?;
        for (t, p, o) in &self.committed {
            writeln!(f, "  {t}[{p}] = {o}")?;
        }
        write!(f, "elapsed               {:.2?}", self.elapsed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        source: KafkaError,
    },
    #[error("braze client: {0}")]
    Braze(#[from] crate::braze::BrazeError),
    #[error("decoder: {0}")]
    Decode(#[from] crate::decode::DecodeError),
    #[error("dead-letter producer: {0}")]
    Dlq(#[from] crate::dlq_writer::DlqWriterError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> PipelineError {
    move |source| PipelineError::Kafka { context, source }
}

/// What the tasks and producers report back to the core.
pub enum Ack {
    Braze {
        id: u64,
        outcomes: Vec<ObjectOutcome>,
    },
    DlqWritten(Box<PendingDlq>),
    DlqFailed(Box<PendingDlq>, String),
}

struct InFlight {
    flush: Flush<Position>,
    data_points: Vec<u32>,
    /// To stop a request still retrying when the run ends past its drain deadline.
    task: Option<tokio::task::AbortHandle>,
}

enum Sink {
    Braze(BrazeClient),
    DryRun(Box<dyn Write + Send>),
}

pub struct Core {
    window: Window<Position>,
    tracker: OffsetTracker,
    names: HashMap<PartitionId, (Arc<str>, i32)>,
    decoder: Decoder,
    mapping: Mapping,
    sink: Sink,
    rt: tokio::runtime::Handle,
    acks_tx: Sender<Ack>,
    acks_rx: Receiver<Ack>,
    in_flight: HashMap<u64, InFlight>,
    next_request: u64,
    max_in_flight: usize,
    dlq: Arc<DlqWriter>,
    dlq_pending: usize,
    rejected_tx: Sender<RejectedEvents>,
    dlq_retry: Vec<(Instant, Box<PendingDlq>)>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    paused: bool,
    started: Instant,
    drain_timeout: Duration,
    commit_interval: Duration,
    last_commit: Instant,
    /// The last offset committed per partition (sent, for asynchronous commits).
    committed: HashMap<(Arc<str>, i32), i64>,
    shutting_down: bool,
    start: StartAt,
    started_partitions: std::collections::HashSet<(String, i32)>,
    /// End offsets taken when each partition was first assigned, for `Until::StartOffsets`.
    start_ends: HashMap<(String, i32), i64>,
    last_caught_up_check: Instant,
    until: Until,
    progress: Option<Arc<Progress>>,
    /// Where a replay started partitions it named or timed, for caught-up checks of a
    /// partition it has read nothing from.
    start_positions: HashMap<(String, i32), i64>,
    /// Partitions read to their start end offsets (`Until::StartOffsets`).
    finished: std::collections::HashSet<(String, i32)>,
    /// Partitions to pause at the next service (ingest has no consumer at hand).
    pause_requests: Vec<(String, i32)>,
}

impl Core {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether a record lies past the end offsets taken at start, which `--until-start`
    /// and dry runs do not read.
    fn past_start_end(&self, m: &BorrowedMessage<'_>) -> bool {
        self.until == Until::StartOffsets
            && self
                .start_ends
                .get(&(m.topic().to_string(), m.partition()))
                .is_some_and(|end| m.offset() >= *end)
    }

    /// One consumed record: track, decode, validate, admit.
    /// `now_ms` is read once per burst: a clock read per record is measurable here.
    fn ingest(&mut self, m: &BorrowedMessage<'_>, stop: &AtomicBool, now_ms: u64) {
        if self.past_start_end(m) {
            // Left untracked and uncommitted; pausing keeps the partition from fetching on.
            self.pause_partition(m.topic(), m.partition());
            return;
        }
        // A record of a partition revoked since it was polled: its new owner reads it again.
        // Tracking it here could commit a partition this worker no longer owns.
        let Some(pid) = self.tracker.partition_id(m.topic(), m.partition()) else {
            return;
        };
        self.metrics.events_consumed.inc();
        let pos = self.tracker.track(pid, m.offset());
        let Some(payload) = m.payload() else {
            let reason = DlqReason::Undecodable {
                class_name: "segment_sync::decode::EmptyValue",
                message: "record has no value (tombstone)".into(),
            };
            self.metrics
                .events_invalid
                .with_label_values(&["undecodable"])
                .inc();
            self.dead_letter_message(m, pos, reason);
            return;
        };
        let mut backoff = Duration::from_millis(200);
        let event = loop {
            match self.decoder.decode(payload) {
                Ok(e) => break e,
                Err(e) if e.is_retryable() => {
                    // The registry is down: the record is fine, so it must not be
                    // dead-lettered. Hold consumption until it answers again.
                    tracing::warn!(error = %e, topic = m.topic(), partition = m.partition(),
                        offset = m.offset(), "schema registry unavailable; retrying the record");
                    if stop.load(Ordering::Relaxed) {
                        // Left unsettled: the next owner reads it again.
                        return;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    self.metrics
                        .events_invalid
                        .with_label_values(&["undecodable"])
                        .inc();
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                        reason = %e, "undecodable record to the dead-letter topic");
                    let reason = DlqReason::Undecodable {
                        class_name: e.class_name(),
                        message: e.to_string(),
                    };
                    self.dead_letter_message(m, pos, reason);
                    return;
                }
            }
        };
        self.metrics.events_decoded.inc();
        let identity = match event.validate() {
            Ok(id) => id,
            Err(e) => {
                self.metrics
                    .events_invalid
                    .with_label_values(&["invalid"])
                    .inc();
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    reason = %e, "invalid event to the dead-letter topic");
                let reason = DlqReason::Invalid {
                    message: e.to_string(),
                };
                self.dead_letter_message(m, pos, reason);
                return;
            }
        };
        match self
            .window
            .admit(&event, identity, m.partition(), m.offset(), pos, now_ms)
        {
            Admit::Pending | Admit::Superseded => {}
            Admit::Duplicate => {
                self.metrics.events_deduplicated.inc();
                self.tracker.settle(pos);
            }
            Admit::Stale => {
                self.metrics.events_stale.inc();
                self.tracker.settle(pos);
            }
        }
    }

    fn pause_partition(&mut self, topic: &str, partition: i32) {
        if !self.finished.insert((topic.to_string(), partition)) {
            return;
        }
        self.pause_requests.push((topic.to_string(), partition));
    }

    fn dead_letter_message(&mut self, m: &BorrowedMessage<'_>, pos: Position, reason: DlqReason) {
        let headers: Vec<(&str, Option<&[u8]>)> = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default();
        let src = SourceRecord {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key(),
            value: m.payload(),
            headers,
        };
        let record = dead_letter(&src, &reason);
        self.send_dlq(Box::new(PendingDlq {
            record,
            positions: vec![pos],
            label: reason.metric_label(),
        }));
    }

    fn send_dlq(&mut self, pending: Box<PendingDlq>) {
        self.dlq_pending += 1;
        self.dlq.send(pending);
    }

    /// The events of a user Braze rejected go to the re-reader thread, which dead-letters
    /// them; each comes back as a dead-letter acknowledgement.
    fn dead_letter_rejected(&mut self, positions: &[Position], rejection: &Rejection) {
        let mut by_partition: HashMap<PartitionId, Vec<Position>> = HashMap::new();
        for p in positions {
            by_partition.entry(p.partition()).or_default().push(*p);
        }
        for (pid, positions) in by_partition {
            // A partition revoked meanwhile: its new owner reads these records again.
            let Some((topic, partition)) = self.names.get(&pid).cloned() else {
                continue;
            };
            self.dlq_pending += positions.len();
            let job = RejectedEvents {
                topic,
                partition,
                positions,
                rejection: rejection.clone(),
            };
            if self.rejected_tx.send(job).is_err() {
                tracing::error!(
                    "the dead-letter re-reader stopped; rejected events stay unsettled"
                );
            }
        }
    }

    /// Sends one flush: encodes it, settles what proved redundant, and hands the objects to
    /// a task (or writes them, in a dry run).
    fn dispatch(&mut self, flush: Flush<Position>) {
        for p in &flush.settled_now {
            self.tracker.settle(*p);
        }
        self.metrics.events_redundant.inc_by(flush.redundant as u64);
        if flush.users.is_empty() {
            return;
        }
        let encoded = batch::encode(&self.mapping, self.window.segments(), &flush);
        let id = self.next_request;
        self.next_request += 1;
        tracing::debug!(request = id, users = flush.users.len(), "flush");
        let mut task = None;
        match &mut self.sink {
            Sink::Braze(client) => {
                let client = client.clone();
                let tx = self.acks_tx.clone();
                let objects = encoded.objects;
                let handle = self.rt.spawn(async move {
                    let outcomes = client.deliver(objects).await;
                    let _ = tx.send(Ack::Braze { id, outcomes });
                });
                task = Some(handle.abort_handle());
                self.metrics.braze_in_flight.inc();
            }
            Sink::DryRun(out) => {
                let mut line = Vec::with_capacity(
                    64 + encoded.objects.iter().map(|o| o.len() + 1).sum::<usize>(),
                );
                line.extend_from_slice(b"{\"attributes\":[");
                for (i, o) in encoded.objects.iter().enumerate() {
                    if i > 0 {
                        line.push(b',');
                    }
                    line.extend_from_slice(o);
                }
                line.extend_from_slice(b"]}\n");
                if let Err(e) = out.write_all(&line) {
                    tracing::error!(error = %e, "dry run: cannot write the request");
                }
                let outcomes = vec![ObjectOutcome::Delivered; flush.users.len()];
                let _ = self.acks_tx.send(Ack::Braze { id, outcomes });
                self.metrics.braze_in_flight.inc();
            }
        }
        self.in_flight.insert(
            id,
            InFlight {
                flush,
                data_points: encoded.data_points,
                task,
            },
        );
    }

    fn on_ack(&mut self, ack: Ack) {
        match ack {
            Ack::Braze { id, outcomes } => {
                let Some(done) = self.in_flight.remove(&id) else {
                    return;
                };
                self.metrics.braze_in_flight.dec();
                let flush = done.flush;
                for (i, user) in flush.users.iter().enumerate() {
                    let positions = flush.user_positions(user);
                    match outcomes.get(i) {
                        Some(ObjectOutcome::Rejected(r)) => {
                            tracing::warn!(user_kind = user.kind.field(), status = r.status,
                                error_type = %r.error_type, "braze rejected an object; its events go to the dead-letter topic");
                            self.window.complete(&flush, user, true);
                            self.dead_letter_rejected(positions, r);
                        }
                        Some(ObjectOutcome::Delivered) | None => {
                            for p in positions {
                                self.tracker.settle(*p);
                            }
                            self.metrics
                                .braze_attributes_written
                                .inc_by(u64::from(done.data_points.get(i).copied().unwrap_or(0)));
                            self.window.complete(&flush, user, false);
                        }
                    }
                }
            }
            Ack::DlqWritten(pending) => {
                self.dlq_pending -= 1;
                for p in &pending.positions {
                    self.tracker.settle(*p);
                }
                self.metrics
                    .dlq_records
                    .with_label_values(&[pending.label])
                    .inc();
            }
            Ack::DlqFailed(pending, error) => {
                tracing::warn!(%error, "dead-letter write failed; retrying");
                self.dlq_pending -= 1;
                self.dlq_retry
                    .push((Instant::now() + Duration::from_secs(1), pending));
            }
        }
    }

    fn take_acks(&mut self) {
        while let Ok(ack) = self.acks_rx.try_recv() {
            self.on_ack(ack);
        }
        if !self.dlq_retry.is_empty() {
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dlq_retry)
                .into_iter()
                .partition(|(t, _)| *t <= now);
            self.dlq_retry = later;
            for (_, p) in due {
                self.send_dlq(p);
            }
        }
    }

    fn flush_ready(&mut self, force: bool) {
        while self.in_flight.len() < self.max_in_flight {
            let now = self.now_ms();
            match self.window.pop_batch(now, force) {
                Some(flush) => self.dispatch(flush),
                None => break,
            }
        }
    }

    /// Commits the committable offset of every assigned partition. Every interval sends all
    /// of them, changed or not: librdkafka reports the outcome of an asynchronous commit only
    /// to an `offset_commit_cb`, which rdkafka's event-based consumer does not install, so a
    /// commit that failed (say during a rebalance) is healed by the next one rather than
    /// detected. One small request a second is the price.
    fn commit(&mut self, consumer: &GroupConsumer, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in self.names.values() {
            if let Some(offset) = self.tracker.committable(topic, *partition) {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, mode) {
            // Synchronous: acknowledged. Asynchronous: sent; what the gauges show.
            Ok(()) => self.on_commit(&tpl),
            Err(e) => tracing::warn!(error = %e, "offset commit failed; will retry"),
        }
    }

    /// Records a commit: the offsets reported by `/metrics`, the lag and the run's summary.
    fn on_commit(&mut self, offsets: &TopicPartitionList) {
        for e in offsets.elements() {
            let Offset::Offset(offset) = e.offset() else {
                continue;
            };
            if e.error().is_err() {
                continue;
            }
            // A partition revoked meanwhile is its new owner's to report.
            let Some(topic) = self
                .names
                .values()
                .find(|(t, p)| &**t == e.topic() && *p == e.partition())
                .map(|(t, _)| t.clone())
            else {
                continue;
            };
            self.committed
                .insert((topic.clone(), e.partition()), offset);
            self.metrics
                .committed_offset
                .with_label_values(&[&*topic, e.partition().to_string().as_str()])
                .set(offset);
        }
    }

    /// Lag per partition: the high watermark librdkafka last saw minus the committed offset,
    /// refreshed every commit interval so a stalled worker shows its lag growing.
    fn update_lag(&self, consumer: &GroupConsumer) {
        for ((topic, partition), committed) in &self.committed {
            if let Some(high) = cached_high_watermark(consumer, topic, *partition) {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&**topic, partition.to_string().as_str()])
                    .set((high - committed).max(0));
            }
        }
    }

    fn update_gauges(&self) {
        self.metrics
            .window_pending_users
            .set(self.window.pending_users() as i64);
        self.metrics
            .window_pending_changes
            .set(self.window.pending_changes() as i64);
    }

    /// Between polls: acknowledgements, flushes, commits, back-pressure.
    fn service(&mut self, consumer: &GroupConsumer) {
        if !self.pause_requests.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in self.pause_requests.drain(..) {
                tpl.add_partition(&t, p);
            }
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "cannot pause finished partitions");
            }
        }
        self.take_acks();
        self.flush_ready(false);
        if self.last_commit.elapsed() >= self.commit_interval {
            self.last_commit = Instant::now();
            self.commit(consumer, CommitMode::Async);
            self.update_gauges();
            self.update_lag(consumer);
            self.update_progress(consumer);
        }
        // Back-pressure: a full window, or a Braze that cannot take anything (a configuration
        // fault such as a revoked key, or unreachable): reading on would only fill memory.
        let full = self.window.is_full() || !self.health.braze_ok.load(Ordering::Relaxed);
        if full != self.paused {
            if let Ok(assignment) = consumer.assignment() {
                let r = if full {
                    consumer.pause(&assignment)
                } else {
                    // Partitions read to their start end stay paused.
                    let mut tpl = TopicPartitionList::new();
                    for e in assignment.elements() {
                        if !self
                            .finished
                            .contains(&(e.topic().to_string(), e.partition()))
                        {
                            tpl.add_partition(e.topic(), e.partition());
                        }
                    }
                    consumer.resume(&tpl)
                };
                match r {
                    Ok(()) => {
                        self.paused = full;
                        tracing::debug!(
                            paused = full,
                            users = self.window.users(),
                            "back-pressure"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot pause/resume partitions"),
                }
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if !self.in_flight.is_empty() || self.dlq_pending > 0 || !self.dlq_retry.is_empty() {
            return Duration::from_millis(2);
        }
        let now = self.now_ms();
        match self.window.next_deadline() {
            Some(d) => Duration::from_millis(d.saturating_sub(now).clamp(1, 100)),
            None => Duration::from_millis(100),
        }
    }

    /// Flushes and waits for acknowledgements until `done` holds or the deadline passes.
    fn drain(&mut self, deadline: Instant, done: impl Fn(&Core) -> bool) -> bool {
        loop {
            self.take_acks();
            self.flush_ready(true);
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self
                .acks_rx
                .recv_timeout((deadline - now).min(Duration::from_millis(20)))
            {
                Ok(ack) => self.on_ack(ack),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return done(self),
            }
        }
    }

    fn settled_everything(&self) -> bool {
        self.window.is_empty()
            && self.in_flight.is_empty()
            && self.dlq_pending == 0
            && self.dlq_retry.is_empty()
            && self.tracker.unsettled() == 0
    }

    pub(crate) fn on_revoke(&mut self, consumer: &GroupConsumer, tpl: &TopicPartitionList) {
        let revoked: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        if revoked.is_empty() {
            return;
        }
        let lost = consumer.assignment_lost();
        tracing::info!(partitions = ?revoked, lost, "partitions revoked; draining");
        // At shutdown the run has drained already, under its own deadline.
        if !lost && !self.shutting_down {
            let deadline = Instant::now() + self.drain_timeout;
            let drained = self.drain(deadline, |core| {
                revoked
                    .iter()
                    .all(|(t, p)| core.tracker.unsettled_in(t, *p) == 0)
            });
            if !drained {
                tracing::warn!("drain deadline passed; committing what settled");
            }
            let mut commit = TopicPartitionList::new();
            for (t, p) in &revoked {
                if let Some(o) = self.tracker.committable(t, *p) {
                    let _ = commit.add_partition_offset(t, *p, Offset::Offset(o));
                }
            }
            if commit.count() > 0 {
                if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                    tracing::warn!(error = %e, "commit on revoke failed");
                }
            }
        }
        // What this worker remembers sending may be overwritten by the partitions' next owner,
        // and events it dropped pending will be read again (by it, if they come back): neither
        // memory can be trusted past a rebalance.
        self.window.forget_history();
        for (t, p) in &revoked {
            if let Some(pid) = self.tracker.partition_id(t, *p) {
                self.window.drop_positions(|pos| pos.partition() == pid);
                self.names.remove(&pid);
            }
            self.tracker.revoke(t, *p);
            self.committed
                .retain(|(topic, part), _| !(&**topic == t && part == p));
        }
        self.health
            .assigned
            .store(!self.names.is_empty(), Ordering::Relaxed);
    }

    pub(crate) fn on_assign(&mut self, consumer: &GroupConsumer, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            let id = self.tracker.assign(e.topic(), e.partition());
            self.names.insert(id, (Arc::from(e.topic()), e.partition()));
        }
        tracing::info!(partitions = tpl.count(), "partitions assigned");
        self.health
            .assigned
            .store(!self.names.is_empty(), Ordering::Relaxed);
        if self.paused {
            let _ = consumer.pause(tpl);
        }
    }

    /// Sets the start offset of partitions assigned for the first time, for replays. Runs
    /// inside the rebalance callback, before the assignment takes effect.
    pub(crate) fn start_offsets(
        &mut self,
        consumer: &BaseConsumer<RebalanceContext>,
        tpl: &mut TopicPartitionList,
    ) {
        let elements: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in elements {
            if !self.started_partitions.insert((topic.clone(), partition)) {
                continue;
            }
            if self.until == Until::StartOffsets {
                match consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)) {
                    Ok((_, high)) => {
                        self.start_ends.insert((topic.clone(), partition), high);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, topic, partition, "cannot read the end offset")
                    }
                }
            }
            let offset = match decide(&self.start, &topic, partition, &ConsumerLookup(consumer)) {
                Ok(StartDecision::Committed) => continue,
                Ok(StartDecision::Beginning) => Offset::Beginning,
                Ok(StartDecision::At(o)) => {
                    self.start_positions.insert((topic.clone(), partition), o);
                    Offset::Offset(o)
                }
                Ok(StartDecision::End) => {
                    // Nothing will be read there; caught-up checks need to know where it is.
                    if let Ok((_, high)) =
                        consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))
                    {
                        self.start_positions
                            .insert((topic.clone(), partition), high);
                    }
                    Offset::End
                }
                Err(e) => {
                    tracing::error!(error = %e, topic, partition,
                        "start offset lookup failed; starting at the committed offset");
                    continue;
                }
            };
            tracing::info!(topic, partition, ?offset, "replay starts here");
            if let Some(mut e) = tpl.find_partition(&topic, partition) {
                let _ = e.set_offset(offset);
            }
        }
    }

    fn update_progress(&self, consumer: &GroupConsumer) {
        let Some(progress) = &self.progress else {
            return;
        };
        let mut to_go = 0i64;
        for (topic, partition) in self.names.values() {
            let end = match self.until {
                Until::StartOffsets => self
                    .start_ends
                    .get(&(topic.to_string(), *partition))
                    .copied(),
                _ => cached_high_watermark(consumer, topic, *partition),
            };
            let next = self.tracker.next_offset(topic, *partition);
            if let (Some(end), Some(next)) = (end, next) {
                to_go += (end - next).max(0);
            }
        }
        progress
            .done
            .store(self.metrics.events_consumed.get(), Ordering::Relaxed);
        progress.to_go.store(to_go as u64, Ordering::Relaxed);
    }

    /// Whether every assigned partition has been read to its end (by `until`'s measure) and
    /// everything read is settled.
    fn caught_up(&mut self, consumer: &GroupConsumer, until: Until) -> bool {
        if until == Until::Stopped || self.names.is_empty() || !self.settled_everything() {
            return false;
        }
        if self.last_caught_up_check.elapsed() < Duration::from_millis(200) {
            return false;
        }
        self.last_caught_up_check = Instant::now();
        let position = consumer.position().ok();
        for (topic, partition) in self.names.values() {
            let key = (topic.to_string(), *partition);
            let Ok((low, high)) =
                consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5))
            else {
                return false;
            };
            let end = match until {
                Until::StartOffsets => match self.start_ends.get(&key) {
                    Some(e) => *e,
                    None => continue,
                },
                _ => high,
            };
            if low >= end {
                // Nothing in the partition to read.
                continue;
            }
            // Where reading has got to: the records tracked, else the consumer's position,
            // else where a replay told it to start, else the group's commit, else (no commit:
            // auto.offset.reset = earliest) the log's start.
            let next = self
                .tracker
                .committable(topic, *partition)
                .or_else(|| {
                    position
                        .as_ref()
                        .and_then(|p| p.find_partition(topic, *partition))
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                })
                .or_else(|| self.start_positions.get(&key).copied());
            let next = match next {
                Some(n) => n,
                None => {
                    let mut q = TopicPartitionList::new();
                    let _ = q.add_partition(topic, *partition);
                    match consumer
                        .committed_offsets(q, Duration::from_secs(5))
                        .ok()
                        .and_then(|c| c.find_partition(topic, *partition).map(|e| e.offset()))
                    {
                        Some(Offset::Offset(o)) => o,
                        Some(Offset::Invalid) => low,
                        _ => return false,
                    }
                }
            };
            if next < end {
                return false;
            }
        }
        true
    }

    fn summary(&self, elapsed: Duration) -> RunSummary {
        let m = &self.metrics;
        let requests = ["2xx", "4xx", "429", "5xx", "error"]
            .iter()
            .map(|c| m.braze_requests.with_label_values(&[c]).get())
            .sum();
        let dlq = ["undecodable", "invalid", "rejected"]
            .iter()
            .map(|c| m.dlq_records.with_label_values(&[c]).get())
            .sum();
        let mut committed: Vec<(String, i32, i64)> = self
            .committed
            .iter()
            .map(|((t, p), o)| (t.to_string(), *p, *o))
            .collect();
        committed.sort();
        RunSummary {
            consumed: m.events_consumed.get(),
            decoded: m.events_decoded.get(),
            undecodable: m.events_invalid.with_label_values(&["undecodable"]).get(),
            invalid: m.events_invalid.with_label_values(&["invalid"]).get(),
            duplicates: m.events_deduplicated.get(),
            stale: m.events_stale.get(),
            redundant: m.events_redundant.get(),
            requests,
            objects_delivered: m.braze_objects_delivered.get(),
            objects_rejected: m.braze_objects_rejected.get(),
            data_points: m.braze_attributes_written.get(),
            dlq_records: dlq,
            committed,
            elapsed,
        }
    }
}

/// Runs the worker on the calling thread until `opts.until` or `opts.stop`. Call it from a
/// plain thread, not a tokio worker: it blocks, and the schema registry client is blocking.
pub fn run(
    cfg: &Config,
    opts: RunOptions,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    rt: tokio::runtime::Handle,
) -> Result<RunSummary, PipelineError> {
    let started = Instant::now();
    let group_id = opts
        .group_id
        .clone()
        .unwrap_or_else(|| cfg.kafka.group_id.clone());
    let registry: Option<Arc<dyn SchemaSource>> = match cfg.kafka.format {
        Format::AvroConfluent => Some(Arc::new(RegistryClient::new(
            &cfg.kafka.schema_registry_url,
        ))),
        _ => None,
    };
    let decoder = Decoder::new(cfg.kafka.format, registry)?;
    let sink = match opts.dry_run {
        Some(out) => Sink::DryRun(out),
        None => Sink::Braze(BrazeClient::new(
            &cfg.braze,
            metrics.clone(),
            health.clone(),
        )?),
    };
    let (acks_tx, acks_rx) = channel();
    let dlq = Arc::new(DlqWriter::new(cfg, acks_tx.clone())?);
    let refetcher = Refetcher::new(cfg, &group_id).map_err(kafka("creating the re-reader"))?;
    let (rejected_tx, refetch_thread) =
        refetch::spawn(refetcher, dlq.clone()).map_err(PipelineError::Thread)?;
    let core = Core {
        window: Window::new(WindowConfig {
            linger_ms: cfg.window.linger_ms,
            batch_size: cfg.braze.batch_size,
            max_pending_users: cfg.window.max_pending_users,
            dedup_memory: cfg.window.dedup_memory,
            delivered_memory: cfg.window.delivered_memory,
        }),
        tracker: OffsetTracker::new(),
        names: HashMap::new(),
        decoder,
        mapping: Mapping::new(&cfg.mapping, cfg.braze.update_existing_only),
        sink,
        rt,
        acks_tx,
        acks_rx,
        in_flight: HashMap::new(),
        next_request: 0,
        max_in_flight: cfg.braze.max_in_flight.max(1),
        dlq,
        dlq_pending: 0,
        rejected_tx,
        dlq_retry: Vec::new(),
        metrics: metrics.clone(),
        health: health.clone(),
        paused: false,
        started,
        drain_timeout: Duration::from_millis(cfg.window.drain_timeout_ms),
        commit_interval: Duration::from_millis(cfg.window.commit_interval_ms),
        last_commit: Instant::now(),
        committed: HashMap::new(),
        shutting_down: false,
        start: opts.start.clone(),
        started_partitions: Default::default(),
        start_ends: HashMap::new(),
        last_caught_up_check: Instant::now(),
        until: opts.until,
        progress: opts.progress.clone(),
        finished: Default::default(),
        pause_requests: Vec::new(),
        start_positions: HashMap::new(),
    };
    let core = Arc::new(Mutex::new(core));
    let consumer: GroupConsumer = consumer_config(cfg, &group_id)
        .create_with_context(RebalanceContext { core: core.clone() })
        .map_err(kafka("creating the consumer"))?;
    let topics: Vec<&str> = cfg.kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(kafka("subscribing to the topics"))?;
    health.consuming.store(true, Ordering::Relaxed);
    tracing::info!(group = %group_id, topics = ?topics, "consuming");

    let lock = || core.lock().unwrap_or_else(|e| e.into_inner());
    let mut flowing = false;
    const BURST: usize = 64;
    let mut burst = Vec::with_capacity(BURST);
    loop {
        if opts.stop.load(Ordering::Relaxed) {
            break;
        }
        let timeout = {
            let mut c = lock();
            c.service(&consumer);
            if c.caught_up(&consumer, opts.until) {
                tracing::info!("caught up with the log");
                break;
            }
            if flowing {
                Duration::ZERO
            } else {
                c.poll_timeout()
            }
        };
        flowing = false;
        // Records are polled in bursts without the lock (a rebalance callback inside poll
        // takes it) and then ingested under one lock, so the per-record cost is a poll and
        // the pipeline's own work. The service still runs often enough for flushes and
        // acknowledgements.
        for round in 0..8 {
            for i in 0..BURST {
                let wait = if round == 0 && i == 0 {
                    timeout
                } else {
                    Duration::ZERO
                };
                match consumer.poll(wait) {
                    Some(Ok(m)) => burst.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                    None => break,
                }
            }
            if burst.is_empty() {
                break;
            }
            let full = burst.len() == BURST;
            flowing = true;
            let mut c = lock();
            let now = c.now_ms();
            for m in burst.drain(..) {
                c.ingest(&m, &opts.stop, now);
            }
            drop(c);
            if !full {
                break;
            }
        }
    }

    // Stop taking records, flush, wait for what is in flight, commit, then let go.
    let summary = {
        let mut c = lock();
        if let Ok(assignment) = consumer.assignment() {
            let _ = consumer.pause(&assignment);
        }
        c.shutting_down = true;
        let deadline = Instant::now() + c.drain_timeout;
        if !c.drain(deadline, Core::settled_everything) {
            tracing::warn!(
                unsettled = c.tracker.unsettled(),
                "shutdown deadline passed; committing what settled"
            );
        }
        c.commit(&consumer, CommitMode::Sync);
        // What is still in flight is not committed: the next owner sends it again.
        let abandoned: Vec<InFlight> = c.in_flight.drain().map(|(_, r)| r).collect();
        for request in abandoned {
            if let Some(task) = request.task {
                task.abort();
            }
            c.metrics.braze_in_flight.dec();
        }
        c.dlq.flush(Duration::from_secs(5));
        c.update_gauges();
        c.summary(started.elapsed())
    };
    health.consuming.store(false, Ordering::Relaxed);
    consumer.unsubscribe();
    drop(consumer);
    // Close every client before returning, so none outlives the run (or the brokers).
    drop(core);
    let _ = refetch_thread.join();
    Ok(summary)
}

/// The timestamp lookup of `start::decide`, answered by the broker (ListOffsets).
struct ConsumerLookup<'c>(&'c BaseConsumer<RebalanceContext>);

impl OffsetLookup for ConsumerLookup<'_> {
    type Error = KafkaError;

    fn offset_for_time(
        &self,
        topic: &str,
        partition: i32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, KafkaError> {
        let mut q = TopicPartitionList::new();
        q.add_partition_offset(topic, partition, Offset::Offset(timestamp_ms))?;
        let found = self.0.offsets_for_times(q, Duration::from_secs(10))?;
        // librdkafka answers the end (-1) when no record is at or after the time.
        Ok(
            match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            },
        )
    }
}
