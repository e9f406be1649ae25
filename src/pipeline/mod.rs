//! The one place that wires consumer → decode → window → Braze → offsets → commit.
//!
//! One OS thread owns the consumer and polls it; the `Core` it drives holds every piece of
//! state (window, offset tracker, requests in flight) without locks on the hot path. Braze
//! requests run as tokio tasks and report back over a channel, as do dead-letter
//! acknowledgements, so nothing the core owns is shared with them. The core sits behind a
//! mutex only because librdkafka runs the rebalance callbacks inside `poll`, on this same
//! thread: the loop never holds the lock while it polls, so the callback can take it.

mod catch_up;
mod commit;
mod deliver;
mod ingest;
mod rebalance;

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
    /// The group's worker: from the committed offsets, until told to stop.
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

    /// From the committed offsets until caught up with the log (the demo, tests).
    pub fn until_caught_up() -> RunOptions {
        RunOptions {
            until: Until::CaughtUp,
            ..RunOptions::live(Arc::new(AtomicBool::new(false)))
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
