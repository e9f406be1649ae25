//! The one place that wires consumer → decode → window → Braze → offsets → commit.
//!
//! One OS thread owns the consumer and polls it. The parts it drives (`worker.rs` lists
//! them) hold every piece of state without locks on the hot path; Braze requests run as
//! tokio tasks and report back over a channel, as do dead-letter acknowledgements. The parts
//! sit behind a mutex only because librdkafka runs the rebalance callbacks inside `poll`, on
//! this same thread: the loop never holds the lock while it polls, so the callback can take
//! it. Nothing on this thread sleeps or retries I/O: a fault pauses the partitions and the
//! loop goes on polling.

// The parts, in the order a record meets them.
mod assignment;
mod ingest;
mod delivery;
mod dead_letters;
mod commits;
mod flow;
mod restore;
mod bounds;
mod acks;
mod worker;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;

use crate::config::Config;
use crate::health::Health;
use crate::kafka::{consumer_config, GroupConsumer, RebalanceHandler, Rebalancing};
use crate::metrics::Metrics;
pub use crate::start::{StartAt, Until};

use worker::Worker;

pub struct RunOptions {
    /// The consumer group; the configured one when `None`.
    pub group_id: Option<String>,
    pub start: StartAt,
    pub until: Until,
    /// Names this run in its commits, so that every member of one backfill (and a retry of
    /// it) continues the others' partitions; `None` recognises the run's members by their
    /// start and the time of their commits (see `replay::RunMark`).
    pub run_id: Option<String>,
    /// Set to stop: the worker stops taking records, flushes, drains and commits.
    pub stop: Arc<AtomicBool>,
    /// Dry run: requests are written here as NDJSON instead of being sent to Braze, and
    /// nothing is committed.
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
            run_id: None,
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
    /// Records (and audiences of records) of the source shape holding no change to apply.
    pub ignored: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub redundant: u64,
    pub requests: u64,
    pub objects_delivered: u64,
    pub objects_rejected: u64,
    pub data_points: u64,
    pub dlq_records: u64,
    /// A replay's fold: what it read and what it sent.
    pub fold: Option<crate::fold::FoldStats>,
    pub committed: Vec<(String, i32, i64)>,
    /// A bounded run reached its end; false when it was stopped first (and always for the
    /// live worker).
    pub caught_up: bool,
    /// Why the run could not go on (a replay's fold could not spill), when it stopped so.
    pub failed: Option<String>,
    /// A bounded run stopped before its end: (topic, partition, read up to, end).
    pub stopped_at: Vec<(String, i32, i64, i64)>,
    pub elapsed: Duration,
}

impl RunSummary {
    /// Where a bounded run stopped, for the line that says so.
    pub fn where_stopped(&self) -> String {
        let behind: Vec<String> = self
            .stopped_at
            .iter()
            .filter(|(_, _, read, end)| read < end)
            .map(|(t, p, read, end)| format!("{t}[{p}] at offset {read} of {end}"))
            .collect();
        if behind.is_empty() {
            "every partition was read to its end but not everything read was settled".into()
        } else {
            behind.join(", ")
        }
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events consumed       {}", self.consumed)?;
        writeln!(f, "  decoded             {}", self.decoded)?;
        writeln!(f, "  undecodable         {}", self.undecodable)?;
        writeln!(f, "  invalid             {}", self.invalid)?;
        if self.ignored > 0 {
            writeln!(f, "  ignored (no change) {}", self.ignored)?;
        }
        writeln!(f, "  duplicates dropped  {}", self.duplicates)?;
        writeln!(f, "  stale dropped       {}", self.stale)?;
        writeln!(f, "  redundant (unsent)  {}", self.redundant)?;
        writeln!(f, "braze requests        {}", self.requests)?;
        writeln!(f, "users updated         {}", self.objects_delivered)?;
        writeln!(f, "objects rejected      {}", self.objects_rejected)?;
        writeln!(f, "data points written   {}", self.data_points)?;
        writeln!(f, "dead-letter records   {}", self.dlq_records)?;
        if let Some(fold) = &self.fold {
            writeln!(f, "backfill fold")?;
            writeln!(f, "  changes read        {}", fold.changes_read)?;
            writeln!(f, "  users               {}", fold.users)?;
            writeln!(f, "  objects             {}", fold.objects)?;
            writeln!(f, "  attribute writes    {}", fold.writes)?;
            writeln!(f, "  requests            {}", fold.requests)?;
            writeln!(f, "  bytes spilled       {}", fold.bytes_spilled)?;
            writeln!(
                f,
                "  writes saved        {}",
                fold.writes_read.saturating_sub(fold.writes)
            )?;
        }
        writeln!(f, "committed offsets")?;
        for (t, p, o) in &self.committed {
            writeln!(f, "  {t}[{p}] = {o}")?;
        }
        write!(f, "elapsed               {:.2?}", self.elapsed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka: {context}: {error}")]
    Kafka {
        context: &'static str,
        error: KafkaError,
    },
    #[error("braze client: {0}")]
    Braze(crate::braze::BrazeError),
    #[error("decoder: {0}")]
    Decode(crate::decode::DecodeError),
    #[error("dead-letter producer: {0}")]
    Dlq(crate::dlq::DlqWriterError),
    #[error("schema registry: {0}")]
    Registry(crate::decode::RegistrySetupError),
}

// Each message above names its cause, so none is also a `source()` (thiserror's `#[from]`
// would make it one, and `{:#}` at the edge would then print the cause twice).
crate::error::from_cause!(PipelineError::Braze, crate::braze::BrazeError);
crate::error::from_cause!(PipelineError::Decode, crate::decode::DecodeError);
crate::error::from_cause!(PipelineError::Dlq, crate::dlq::DlqWriterError);
crate::error::from_cause!(PipelineError::Registry, crate::decode::RegistrySetupError);

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> PipelineError {
    move |error| PipelineError::Kafka { context, error }
}

/// How long the shutdown waits, after the drain, for dead-letter writes librdkafka still
/// has queued: part of what a pod's termination grace period must cover.
pub const DEAD_LETTER_FLUSH: Duration = Duration::from_secs(5);

/// Records polled between two services, and rounds of them taken before servicing again.
const BURST: usize = 64;
const ROUNDS: usize = 8;

/// What `run` refuses at start before any client is made: the Braze key and endpoint as a
/// request would carry them (`to_braze`: not for a dry run, which sends nothing), and
/// librdkafka's acceptance of every property for the dead-letter producer and the consumer.
/// `check-config` runs it after the same [`Config::load`], so that both refuse a
/// configuration with the same message. Files that only clients read (the schema registry's
/// TLS files, librdkafka's `ssl.*.location`) are left to start-up: a file meant for a pod's
/// mounts can be checked anywhere.
pub fn preflight(cfg: &Config, group_id: &str, to_braze: bool) -> Result<(), PipelineError> {
    if to_braze {
        crate::braze::Access::from_config(&cfg.braze)?;
    }
    crate::kafka::dead_letter_producer_config(cfg)
        .create_native_config()
        .map_err(crate::dlq::DlqWriterError::from)?;
    consumer_config(cfg, group_id)
        .create_native_config()
        .map_err(kafka("creating the consumer"))?;
    Ok(())
}

/// Runs the worker on the calling thread until `opts.until` or `opts.stop`. Call it from a
/// plain thread, not a tokio worker: it blocks, and the schema registry client is blocking.
pub fn run(
    cfg: &Config,
    mut opts: RunOptions,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    rt: tokio::runtime::Handle,
) -> Result<RunSummary, PipelineError> {
    let group_id = opts
        .group_id
        .clone()
        .unwrap_or_else(|| cfg.kafka.group_id.clone());
    let dry_run = opts.dry_run.take();
    preflight(cfg, &group_id, dry_run.is_none())?;
    let worker = Arc::new(Mutex::new(Worker::assemble(
        cfg, &opts, dry_run, &group_id, &metrics, &health, rt,
    )?));
    let generation = worker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .generation();
    let handler: Arc<Mutex<dyn RebalanceHandler>> = worker.clone();
    let consumer: GroupConsumer = consumer_config(cfg, &group_id)
        .create_with_context(Rebalancing::new(handler))
        .map_err(kafka("creating the consumer"))?;
    let topics: Vec<&str> = cfg.kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(kafka("subscribing to the topics"))?;
    health.consuming.store(true, Ordering::Relaxed);
    tracing::info!(group = %group_id, topics = ?topics, "consuming");

    let lock = || worker.lock().unwrap_or_else(|e| e.into_inner());
    let mut idle = false;
    let mut caught_up = false;
    let mut burst = Vec::with_capacity(BURST);
    while !opts.stop.load(Ordering::Relaxed) {
        let timeout = {
            let mut w = lock();
            w.service(&consumer);
            if w.failed().is_some() {
                break;
            }
            if w.caught_up(&consumer, idle) {
                tracing::info!("caught up with the log");
                caught_up = true;
                break;
            }
            if idle {
                w.poll_timeout()
            } else {
                Duration::ZERO
            }
        };
        idle = true;
        // Records are polled in bursts without the lock (a rebalance callback inside poll
        // takes it), each stamped with the assignment generation it was polled at, then
        // taken in under one lock.
        for round in 0..ROUNDS {
            for i in 0..BURST {
                let wait = if round == 0 && i == 0 {
                    timeout
                } else {
                    Duration::ZERO
                };
                match consumer.poll(wait) {
                    Some(Ok(m)) => burst.push((m, generation.load(Ordering::Acquire))),
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
            idle = false;
            let full = burst.len() == BURST;
            let mut w = lock();
            let now = w.now_ms();
            w.take_burst(&burst, now);
            drop(w);
            burst.clear();
            if !full {
                break;
            }
        }
    }

    let summary = lock().shut_down(&consumer, caught_up);
    health.consuming.store(false, Ordering::Relaxed);
    consumer.unsubscribe();
    drop(consumer);
    // Close every client (the re-reader's thread with them) before returning, so none
    // outlives the run or the brokers.
    drop(worker);
    Ok(summary)
}
