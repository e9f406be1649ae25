//! The parts of one worker and what passes between them: a record goes assignment →
//! ingest → delivery (or dead letters) → assignment's watermark → commits.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;

use crate::dlq::DlqReason;
use crate::event::Event;
use crate::health::{Fault, Health};
use crate::kafka::{cached_high_watermark, GroupConsumer, RebalanceHandler, RecordHeaders};
use crate::metrics::Metrics;
use crate::offsets::{PartitionId, Position, TopicPartition};
use crate::window::{Admit, Lookup, PREFETCH_AHEAD};

use super::acks::Ack;
use super::assignment::Assignment;
use super::bounds::Bounds;
use super::commits::Commits;
use super::dead_letters::DeadLetters;
use super::delivery::Delivery;
use super::delivery::Sink;
use super::flow::{Flow, Held};
use super::ingest::{Ingest, Verdict};
use super::restore::{Restored, Restorer};
use super::{kafka, PipelineError, Progress, RunOptions, RunSummary};
use crate::braze::BrazeClient;
use crate::config::{Config, Format};
use crate::decode::{RegistryClient, SchemaSource};
use crate::dlq::{DlqWriter, Rereader};
use crate::fold::{Fold, FoldConfig};
use crate::mapping::Mapping;
use crate::replay::RunMark;
use crate::source::Source;
use crate::start::{StartAt, Until};
use crate::window::{Window, WindowConfig};
use std::io::Write;
use std::sync::mpsc::channel;

/// After this long waiting for its restore, a partition is named by `/readyz`.
const RESTORE_OVERDUE: Duration = Duration::from_secs(60);

/// What became of a record offered to the pipeline.
enum Taken {
    Done,
    /// It must wait (and everything behind it) for this reason.
    Wait(String),
}

/// A record examined (`Worker::examine`), before the window or the dead letters take it.
enum Examined<'m> {
    /// Nothing more to do: not ours any more, or past a bounded run's end.
    Done,
    Wait(String),
    Take(Taking<'m>),
}

struct Taking<'m> {
    id: PartitionId,
    fate: Fate<'m>,
}

enum Fate<'m> {
    /// A valid event, with what the window will look up for it.
    Admit(Lookup, Event<'m>),
    /// A record holding several valid changes: it settles when the last of them settles.
    AdmitMany(Vec<(Lookup, Event<'m>)>),
    /// Nothing to apply: settle it.
    Ignore,
    DeadLetter(DlqReason),
}

/// One worker's parts. Each owns its state; this struct only passes results between them.
pub struct Worker {
    assignment: Assignment,
    ingest: Ingest,
    delivery: Delivery,
    dead_letters: DeadLetters,
    commits: Commits,
    flow: Flow,
    /// `None` for the live worker, which runs until stopped.
    bounds: Option<Bounds>,
    /// Reads newly assigned partitions' histories back; `None` for a replay (which starts
    /// where it is told) or when `window.restore_records` is 0.
    restorer: Option<Restorer>,
    /// `/readyz` names partitions whose restore is overdue (kept to touch the health lock
    /// only when that changes).
    restore_overdue: bool,
    /// A replay's fold (docs/design.md, "Backfills": it writes the final state): what it reads is
    /// folded to each user's final state, sent once read to the end, and committed only
    /// when everything read is sent and settled. `None` for the live worker.
    fold: Option<Fold<Position>>,
    /// A fault the run cannot go on with (the fold cannot spill): the poll loop stops.
    failed: Option<String>,
    acks: Receiver<Ack>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    started: Instant,
    drain_timeout: Duration,
    shutting_down: bool,
    progress: Option<Arc<Progress>>,
}

impl Worker {
    /// Builds the parts of one worker.
    #[allow(clippy::too_many_arguments)]
    pub fn assemble(
        cfg: &Config,
        opts: &RunOptions,
        dry_run: Option<Box<dyn Write + Send>>,
        group_id: &str,
        metrics: &Arc<Metrics>,
        health: &Arc<Health>,
        rt: tokio::runtime::Handle,
    ) -> Result<Worker, PipelineError> {
        let registry: Option<Arc<dyn SchemaSource>> = match cfg.kafka.format {
            Format::AvroConfluent => Some(Arc::new(RegistryClient::from_config(&cfg.kafka)?)),
            _ => None,
        };
        let source = Source::from_config(cfg, registry.clone())?;
        let committing = dry_run.is_none();
        let sink = match dry_run {
            Some(out) => Sink::DryRun(out),
            None => Sink::Braze(BrazeClient::new(
                &cfg.braze,
                metrics.clone(),
                health.clone(),
            )?),
        };
        let (acks_tx, acks_rx) = channel();
        let dlq_acks = acks_tx.clone();
        let writer = Arc::new(DlqWriter::new(
            cfg,
            Box::new(move |outcome| {
                // The pipeline is gone only at shutdown, when nothing waits for this any more.
                let _ = dlq_acks.send(Ack::DeadLetter(outcome));
            }),
        )?);
        let rereader = Rereader::start(cfg, group_id, writer.clone())
            .map_err(kafka("creating the re-reader"))?;
        // A replay marks its commits as its run's; the live group's own offsets are its start.
        let mark = (opts.until != Until::Stopped && opts.start != StartAt::Committed).then(|| {
            RunMark::new(
                opts.run_id.clone(),
                &opts.start,
                opts.until,
                super::commits::epoch_ms(),
            )
        });
        // The replay (a bounded run from a point of its own) folds; the live worker and a
        // run from the group's offsets (the demo, tests) use the window.
        let fold = (opts.until != Until::Stopped && opts.start != StartAt::Committed).then(|| {
            Fold::new(FoldConfig {
                memory: cfg.replay.fold_memory,
                spill_dir: cfg.replay.spill_dir(),
                batch_size: cfg.braze.batch_size,
                sent_memory: cfg.window.delivered_memory,
            })
        });
        let bounds = match opts.until {
            Until::Stopped => None,
            until => Some(Bounds::new(
                opts.start.clone(),
                until,
                &cfg.kafka.topics,
                mark.clone(),
                crate::kafka::probe_config(cfg)
                    .create()
                    .map_err(kafka("creating the replay's offset probe"))?,
            )),
        };
        let window = Window::new(WindowConfig {
            linger_ms: cfg.window.linger_ms,
            batch_size: cfg.braze.batch_size,
            max_pending_users: cfg.window.max_pending_users,
            max_pending_bytes: cfg.window.max_pending_bytes,
            dedup_memory: cfg.window.dedup_memory,
            delivered_memory: cfg.window.delivered_memory,
        });
        let mapping = Mapping::from_config(cfg);
        // Built beside the worker's clock, which `Rules::epoch_ms` counts from.
        let rules = mapping.rules_for(cfg.window.max_future_ms);
        let restorer = if opts.start == StartAt::Committed && cfg.window.restore_records > 0 {
            Some(
                Restorer::start(
                    cfg,
                    group_id,
                    Source::from_config(cfg, registry)?,
                    rules.clone(),
                    cfg.window.restore_records,
                )
                .map_err(kafka("creating the restore reader"))?,
            )
        } else {
            None
        };
        Ok(Worker {
            assignment: Assignment::new(),
            ingest: Ingest::new(source, rules, metrics.clone()),
            delivery: Delivery::new(
                window,
                mapping,
                sink,
                rt,
                acks_tx,
                cfg.braze.max_in_flight,
                metrics.clone(),
            ),
            dead_letters: DeadLetters::new(writer, rereader, metrics.clone(), health.clone()),
            commits: Commits::new(
                Duration::from_millis(cfg.window.commit_interval_ms),
                mark,
                committing,
                metrics.clone(),
            ),
            flow: Flow::new(),
            bounds,
            restorer,
            restore_overdue: false,
            fold,
            failed: None,
            acks: acks_rx,
            metrics: metrics.clone(),
            health: health.clone(),
            started: Instant::now(),
            drain_timeout: Duration::from_millis(cfg.window.drain_timeout_ms),
            shutting_down: false,
            progress: opts.progress.clone(),
        })
    }

    /// For the poll loop to stamp records with (see `Assignment`).
    pub fn generation(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.assignment.generation()
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records just polled, each with the assignment generation it was polled at.
    /// `now_ms` is read once per burst: a clock read per record is measurable here.
    ///
    /// The burst is decoded first, up to a record that must wait; then the window takes the
    /// records in order while the cache lines of those `PREFETCH_AHEAD` places behind are
    /// loaded (`Window::prefetch`), so that each record's waits on memory overlap with the
    /// work on the ones before it instead of following it.
    pub fn take_burst(&mut self, burst: &[(BorrowedMessage<'_>, u64)], now_ms: u64) {
        let mut examined = Vec::with_capacity(burst.len());
        let mut wait = None;
        if !self.flow.is_holding() {
            for (i, (m, generation)) in burst.iter().enumerate() {
                match self.examine(m, *generation, now_ms) {
                    Examined::Done => {}
                    Examined::Wait(why) => {
                        wait = Some((i, why));
                        break;
                    }
                    Examined::Take(record) => examined.push((i, record)),
                }
            }
        }
        for k in 0..examined.len() {
            if let Some((
                _,
                Taking {
                    fate: Fate::Admit(lookup, event),
                    ..
                },
            )) = examined.get(k + PREFETCH_AHEAD)
            {
                self.delivery.prefetch(lookup, event);
            }
            if let Some((
                _,
                Taking {
                    fate: Fate::Admit(lookup, _),
                    ..
                },
            )) = examined.get(k + PREFETCH_AHEAD / 2)
            {
                self.delivery.prefetch_key(lookup);
            }
            let (i, record) = &examined[k];
            self.apply(&burst[*i].0, record, now_ms);
        }
        let held_from = match &wait {
            Some((i, _)) => *i,
            // Behind a record that waits: in order, after it.
            None if self.flow.is_holding() => 0,
            None => burst.len(),
        };
        for (m, generation) in &burst[held_from..] {
            self.flow.hold(Held {
                message: m.detach(),
                generation: *generation,
            });
        }
        if let Some((_, why)) = wait {
            self.wait(why);
        }
    }

    fn wait(&mut self, why: String) {
        self.health
            .set_fault(Fault::SchemaRegistry, Some(why.clone()));
        self.flow.wait(why);
    }

    /// One record, examined and applied at once (a held record taken again).
    fn take_record<M: Message + RecordHeaders>(
        &mut self,
        m: &M,
        generation: u64,
        now_ms: u64,
    ) -> Taken {
        match self.examine(m, generation, now_ms) {
            Examined::Done => {}
            Examined::Wait(why) => return Taken::Wait(why),
            Examined::Take(record) => self.apply(m, &record, now_ms),
        }
        Taken::Done
    }

    /// Whose the record is, whether a bounded run wants it, and what it says: nothing here
    /// touches the window, so a burst is examined ahead of the window taking it.
    fn examine<'m, M: Message>(&mut self, m: &'m M, generation: u64, now_ms: u64) -> Examined<'m> {
        // A record of a partition revoked (or revoked and assigned again) since it was
        // polled: its next owner, or the new assignment, reads it again.
        let Some(id) = self
            .assignment
            .resolve(m.topic(), m.partition(), generation)
        else {
            return Examined::Done;
        };
        if let Some(b) = &self.bounds {
            if b.past_end(m.topic(), m.partition(), m.offset()) {
                // Left untracked and uncommitted; the partition is paused from now on.
                self.flow
                    .finish(TopicPartition::new(m.topic(), m.partition()));
                return Examined::Done;
            }
        }
        match self.ingest.examine(m.payload(), now_ms) {
            Verdict::Wait(why) => Examined::Wait(why),
            Verdict::Admit(event) => {
                let Some(identity) = event.identity() else {
                    unreachable!("ingest admits only events with an identity");
                };
                let lookup = self.delivery.lookup(&event, identity);
                Examined::Take(Taking {
                    id,
                    fate: Fate::Admit(lookup, event),
                })
            }
            Verdict::AdmitMany(events) => {
                let fate = events
                    .into_iter()
                    .map(|event| {
                        let Some(identity) = event.identity() else {
                            unreachable!("ingest admits only events with an identity");
                        };
                        (self.delivery.lookup(&event, identity), event)
                    })
                    .collect();
                Examined::Take(Taking {
                    id,
                    fate: Fate::AdmitMany(fate),
                })
            }
            Verdict::Ignore => Examined::Take(Taking {
                id,
                fate: Fate::Ignore,
            }),
            Verdict::DeadLetter(reason) => Examined::Take(Taking {
                id,
                fate: Fate::DeadLetter(reason),
            }),
        }
    }

    /// Tracks an examined record's offset and hands it to the window or the dead letters.
    fn apply<M: Message + RecordHeaders>(&mut self, m: &M, record: &Taking<'_>, now_ms: u64) {
        self.metrics.events_consumed.inc();
        let Some(pos) = self.assignment.track(record.id, m.offset()) else {
            // A second copy of a record read in this assignment: its first copy settles it.
            self.metrics.events_deduplicated.inc();
            return;
        };
        match &record.fate {
            Fate::Admit(lookup, event) => self.admit(m, lookup, event, pos, now_ms),
            Fate::AdmitMany(changes) => {
                if !self.assignment.split(pos, changes.len()) {
                    let reason = DlqReason::Invalid {
                        message: format!(
                            "the record holds {} changes, more than the {} one record may hold",
                            changes.len(),
                            crate::offsets::MAX_PARTS
                        ),
                    };
                    self.dead_letters.record(m, pos, &reason);
                    return;
                }
                for (i, (lookup, event)) in changes.iter().enumerate() {
                    let Some(part) = pos.with_part(i + 1) else {
                        unreachable!("split checked that every part fits");
                    };
                    self.admit(m, lookup, event, part, now_ms);
                }
            }
            Fate::Ignore => self.assignment.settle(pos),
            Fate::DeadLetter(reason) => {
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                reason = ?reason, "record to the dead-letter topic");
                self.dead_letters.record(m, pos, reason);
            }
        }
    }

    /// One change to the window: `pos` is its record's, or its own part of a record with
    /// several.
    fn admit<M: Message>(
        &mut self,
        m: &M,
        lookup: &Lookup,
        event: &Event<'_>,
        pos: Position,
        now_ms: u64,
    ) {
        let Some(identity) = event.identity() else {
            unreachable!("ingest admits only events with an identity");
        };
        if let Some(fold) = self.fold.as_mut() {
            let assignment = &mut self.assignment;
            let mut superseded = 0u64;
            let folded = fold.absorb(event, identity, m.partition(), m.offset(), pos, |p| {
                superseded += 1;
                assignment.settle(p);
            });
            self.metrics.events_redundant.inc_by(superseded);
            if let Err(e) = folded {
                self.fail(format!("the replay's fold: {e}"));
            }
            return;
        }
        match self.delivery.admit(
            lookup,
            event,
            identity,
            m.partition(),
            m.offset(),
            pos,
            now_ms,
        ) {
            Admit::Pending | Admit::Superseded => {}
            Admit::Duplicate => {
                self.metrics.events_deduplicated.inc();
                self.assignment.settle(pos);
            }
            Admit::Stale => {
                self.metrics.events_stale.inc();
                self.assignment.settle(pos);
            }
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(error = %why, "the run cannot go on");
            self.failed = Some(why);
        }
    }

    /// A fault the run cannot go on with, for the poll loop to stop at.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Sends the fold's next requests while there is room in flight. Positions of
    /// partitions no longer ours are left out (their next owner reads them again).
    fn send_folded(&mut self) {
        let Some(fold) = self.fold.as_mut() else {
            return;
        };
        while fold.is_sending() && self.delivery.has_room() {
            let assignment = &self.assignment;
            let mut superseded = Vec::new();
            let next = fold.next_request(
                |p| assignment.name(p.partition()).is_some(),
                |p| superseded.push(p),
            );
            self.metrics
                .events_redundant
                .inc_by(superseded.len() as u64);
            for p in superseded {
                self.assignment.settle(p);
            }
            match next {
                Ok(Some(flush)) => {
                    self.delivery.dispatch_folded(flush, fold.segments());
                }
                Ok(None) => {
                    tracing::info!(stats = ?fold.stats(), "the fold's users are sent");
                }
                Err(e) => {
                    let why = format!("the replay's fold: {e}");
                    self.fail(why);
                    break;
                }
            }
        }
        self.publish_fold();
    }

    /// The fold's figures to `/metrics`.
    fn publish_fold(&self) {
        if let Some(fold) = self.fold.as_ref() {
            self.metrics.replay_fold.publish(
                &fold.stats(),
                fold.users(),
                fold.bytes(),
                fold.spill_buckets_left(),
            );
        }
    }

    /// Whether everything this run read is sent and settled: what a folding replay waits
    /// for before it commits, so that its progress in Kafka is all or nothing.
    fn may_commit(&self) -> bool {
        self.fold.is_none() || self.settled_everything()
    }

    /// Offers held records again, when their wait is due.
    fn retake_held(&mut self) {
        let Some(mut held) = self.flow.take_due() else {
            return;
        };
        let now = self.now_ms();
        while let Some(h) = held.pop_front() {
            if let Taken::Wait(why) = self.take_record(&h.message, h.generation, now) {
                held.push_front(h);
                self.flow.hold_again(held);
                self.wait(why);
                return;
            }
        }
        if !self.flow.is_holding() {
            self.flow.resumed();
            self.health.set_fault(Fault::SchemaRegistry, None);
        }
    }

    /// Between polls: acknowledgements, restores done, held records, flushes, commits,
    /// back-pressure.
    pub fn service(&mut self, consumer: &GroupConsumer) {
        self.take_acks();
        self.take_restores(consumer);
        self.dead_letters.service();
        self.retake_held();
        let now = self.now_ms();
        let assignment = &mut self.assignment;
        self.delivery.flush(now, false, |p| assignment.settle(p));
        self.dead_letter_rejected();
        self.send_folded();
        if self.commits.due() {
            self.commit(consumer, CommitMode::Async);
            self.delivery.update_gauges();
            self.commits.update_lag(consumer);
            self.update_progress(consumer);
        }
        // Back-pressure: a full window, or a Braze or a dead-letter topic that cannot take
        // anything: reading on would only fill memory.
        let hold = self.delivery.is_full()
            || !self.health.braze_ok.load(Ordering::Relaxed)
            || self.dead_letters.is_failing();
        self.flow.apply(consumer, hold);
    }

    /// Loads what the restoring thread read back, and lets those partitions be read.
    fn take_restores(&mut self, consumer: &GroupConsumer) {
        let Some(restorer) = self.restorer.as_mut() else {
            return;
        };
        let done = restorer.take_done();
        let fault = restorer.overdue_fault(RESTORE_OVERDUE);
        for r in done {
            self.restored(consumer, r);
        }
        if fault.is_none() && !self.restore_overdue {
            return;
        }
        self.restore_overdue = fault.is_some();
        self.health.set_fault(Fault::Restore, fault);
    }

    fn restored(&mut self, consumer: &GroupConsumer, r: Restored) {
        let started = Instant::now();
        let kept = self.delivery.restore(&r.versions);
        let elapsed = r.elapsed + started.elapsed();
        self.metrics.restore_records.inc_by(r.records);
        self.metrics.restore_seconds.observe(elapsed.as_secs_f64());
        tracing::info!(partition = %r.tp, from = r.from, to = r.to,
            records = r.records, changes = r.versions.changes_added(), users = r.versions.users(), kept,
            seconds = elapsed.as_secs_f64(), "partition restored");
        self.flow.restored(consumer, &r.tp, true);
    }

    pub fn commit(&mut self, consumer: &GroupConsumer, mode: CommitMode) {
        if !self.may_commit() {
            return;
        }
        let offsets: Vec<(TopicPartition, i64)> = self
            .assignment
            .partitions()
            .into_iter()
            .filter_map(|tp| {
                let offset = self
                    .assignment
                    .committable(&tp)
                    .or_else(|| self.bounds.as_ref()?.start_of(&tp))?;
                Some((tp, offset))
            })
            .collect();
        if let Err(e) = self.commits.commit(consumer, &offsets, mode) {
            tracing::warn!(error = %e, "offset commit failed; will retry");
        }
    }

    fn take_acks(&mut self) {
        while let Ok(ack) = self.acks.try_recv() {
            self.on_ack(ack);
        }
    }

    fn on_ack(&mut self, ack: Ack) {
        match ack {
            Ack::Braze { id, outcomes } => {
                let answer = self.delivery.on_answer(id, outcomes);
                if let Some(fold) = self.fold.as_mut() {
                    for (kind, user, segments, attributes) in &answer.rejected_folded {
                        fold.forget_sent(*kind, user, segments, attributes);
                    }
                }
                for p in answer.delivered {
                    self.assignment.settle(p);
                }
                for (positions, rejection) in answer.rejected {
                    let mut by_partition: HashMap<PartitionId, Vec<Position>> = HashMap::new();
                    for p in positions {
                        // A change of a record with several waits for the others.
                        if self.assignment.reject(p, rejection.clone()).is_some() {
                            by_partition.entry(p.partition()).or_default().push(p);
                        }
                    }
                    for (pid, positions) in by_partition {
                        // A partition revoked meanwhile: its next owner reads these again.
                        if let Some(tp) = self.assignment.name(pid) {
                            self.dead_letters
                                .rejected(tp, positions, rejection.clone(), None);
                        }
                    }
                }
                self.dead_letter_rejected();
            }
            Ack::DeadLetter(outcome) => {
                let assignment = &mut self.assignment;
                self.dead_letters
                    .on_outcome(outcome, |p| assignment.settle(p));
            }
        }
    }

    /// Records with several changes that were refused in part, once all their changes have
    /// an outcome: to the dead-letter topic, once each.
    fn dead_letter_rejected(&mut self) {
        for r in self.assignment.take_rejected() {
            tracing::warn!(partition = %r.tp, offset = r.record.offset(), "a record with several changes had some refused; to the dead-letter topic");
            self.dead_letters
                .rejected(r.tp, vec![r.record], r.rejection, Some(r.lines));
        }
    }

    /// Flushes the users holding a record `only` accepts (everyone when `None`), and serves
    /// acknowledgements until `done` holds or the deadline passes. A bounded wait: the drain
    /// of a revoke (the revoked partitions' users only: the others keep their linger) or of
    /// the shutdown (everyone).
    pub fn drain(
        &mut self,
        deadline: Instant,
        only: Option<&dyn Fn(&Position) -> bool>,
        done: impl Fn(&Worker) -> bool,
    ) -> bool {
        loop {
            self.take_acks();
            self.dead_letters.service();
            let now = self.now_ms();
            let assignment = &mut self.assignment;
            match only {
                Some(pick) => self.delivery.flush_holding(pick, |p| assignment.settle(p)),
                None => self.delivery.flush(now, true, |p| assignment.settle(p)),
            }
            self.dead_letter_rejected();
            if !self.shutting_down {
                self.send_folded();
            }
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self
                .acks
                .recv_timeout((deadline - now).min(Duration::from_millis(20)))
            {
                Ok(ack) => self.on_ack(ack),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return done(self),
            }
        }
    }

    pub fn settled_everything(&self) -> bool {
        self.delivery.is_idle()
            && self.fold.as_ref().is_none_or(Fold::is_empty)
            && self.dead_letters.is_idle()
            && self.assignment.unsettled() == 0
            && !self.flow.is_holding()
    }

    pub fn poll_timeout(&self) -> Duration {
        if self.delivery.has_in_flight()
            || !self.dead_letters.is_idle()
            || self.flow.is_holding()
            || self.restorer.as_ref().is_some_and(Restorer::is_busy)
        {
            return Duration::from_millis(2);
        }
        let now = self.now_ms();
        match self.delivery.next_deadline() {
            Some(d) => Duration::from_millis(d.saturating_sub(now).clamp(1, 100)),
            None => Duration::from_millis(100),
        }
    }

    /// Whether a bounded run is done. `idle`: the last poll brought nothing.
    pub fn caught_up(&mut self, consumer: &GroupConsumer, idle: bool) -> bool {
        if self.fold.as_ref().is_some_and(|f| f.is_sending()) {
            return false;
        }
        if self.fold.as_ref().is_some_and(Fold::has_unsent) {
            // Read to the end: the fold sends what it read, once the last stage's requests
            // have all been answered (a user is never in two requests in flight), while
            // reading goes on into the next stage: what arrived meanwhile, sent after.
            let ready = idle && !self.flow.is_holding() && !self.delivery.has_in_flight();
            if ready
                && self
                    .bounds
                    .as_mut()
                    .is_some_and(|b| b.read_to_end(consumer, &self.assignment))
            {
                let fold = self.fold.as_mut().expect("checked above");
                tracing::info!(
                    users = fold.users(),
                    spilled_bytes = fold.stats().bytes_spilled,
                    "read to the end; sending each user's final state"
                );
                if let Err(e) = fold.start_sending() {
                    self.fail(format!("the replay's fold: {e}"));
                }
                self.send_folded();
            }
            return false;
        }
        if !idle || !self.settled_everything() {
            return false;
        }
        let Some(bounds) = self.bounds.as_mut() else {
            return false;
        };
        bounds.caught_up(consumer, &self.assignment)
    }

    fn update_progress(&self, consumer: &GroupConsumer) {
        let Some(progress) = &self.progress else {
            return;
        };
        let mut to_go = 0i64;
        for tp in self.assignment.partitions() {
            let end = self
                .bounds
                .as_ref()
                .and_then(|b| b.start_end(&tp))
                .or_else(|| cached_high_watermark(consumer, &tp.topic, tp.partition));
            if let (Some(end), Some(next)) = (end, self.assignment.next_offset(&tp)) {
                to_go += (end - next).max(0);
            }
        }
        progress
            .done
            .store(self.metrics.events_consumed.get(), Ordering::Relaxed);
        progress.to_go.store(to_go as u64, Ordering::Relaxed);
    }

    /// Stop taking records, flush, wait for what is in flight (bounded), commit, stop what
    /// is left: the shutdown order of docs/design.md.
    pub fn shut_down(&mut self, consumer: &GroupConsumer, caught_up: bool) -> RunSummary {
        if let Ok(assignment) = consumer.assignment() {
            let _ = consumer.pause(&assignment);
        }
        self.shutting_down = true;
        let deadline = Instant::now() + self.drain_timeout;
        // A fold stopped before it sent everything commits nothing: wait only for what
        // is in flight.
        let drained = if self.fold.as_ref().is_some_and(|f| !f.is_empty()) {
            self.drain(deadline, None, |w| {
                !w.delivery.has_in_flight() && w.dead_letters.is_idle()
            })
        } else {
            self.drain(deadline, None, Worker::settled_everything)
        };
        if !drained {
            tracing::warn!(
                unsettled = self.assignment.unsettled(),
                "shutdown deadline passed; committing what settled"
            );
        }
        self.commit(consumer, CommitMode::Sync);
        // What is still in flight is not committed: the next owner sends it again.
        self.delivery.abandon();
        self.dead_letters.flush(super::DEAD_LETTER_FLUSH);
        self.delivery.update_gauges();
        self.summary(caught_up)
    }

    fn summary(&self, caught_up: bool) -> RunSummary {
        let m = &self.metrics;
        let requests = ["2xx", "4xx", "429", "5xx", "error"]
            .iter()
            .map(|c| m.braze_requests.with_label_values(&[c]).get())
            .sum();
        let dlq = ["undecodable", "invalid", "rejected", "gone", "too_large"]
            .iter()
            .map(|c| m.dlq_records.with_label_values(&[c]).get())
            .sum();
        let stopped_at = match (&self.bounds, caught_up) {
            (Some(b), false) => b
                .standing()
                .iter()
                .map(|(tp, read, end)| (tp.topic.to_string(), tp.partition, *read, *end))
                .collect(),
            _ => Vec::new(),
        };
        RunSummary {
            consumed: m.events_consumed.get(),
            decoded: m.events_decoded.get(),
            undecodable: m.events_invalid.with_label_values(&["undecodable"]).get(),
            invalid: m.events_invalid.with_label_values(&["invalid"]).get(),
            ignored: crate::source::Ignored::ALL
                .iter()
                .map(|r| m.events_ignored.with_label_values(&[r.label()]).get())
                .sum(),
            duplicates: m.events_deduplicated.get(),
            stale: m.events_stale.get(),
            redundant: m.events_redundant.get(),
            requests,
            objects_delivered: m.braze_objects_delivered.get(),
            objects_rejected: m.braze_objects_rejected.get(),
            data_points: m.braze_attributes_written.get(),
            dlq_records: dlq,
            fold: self.fold.as_ref().map(Fold::stats),
            failed: self.failed.clone(),
            committed: self.commits.committed(),
            caught_up,
            stopped_at,
            elapsed: self.started.elapsed(),
        }
    }
}

impl RebalanceHandler for Worker {
    fn assigning(&mut self, consumer: &GroupConsumer, tpl: &mut TopicPartitionList) {
        if let Some(b) = self.bounds.as_mut() {
            b.assigning(consumer, tpl);
        }
    }

    fn assigned(&mut self, consumer: &GroupConsumer, tpl: &TopicPartitionList) {
        let mut restoring = Vec::new();
        for e in tpl.elements() {
            let tp = TopicPartition::new(e.topic(), e.partition());
            self.assignment.assign(&tp);
            if let Some(r) = self.restorer.as_mut() {
                r.submit(
                    tp.clone(),
                    self.assignment.generation().load(Ordering::Acquire),
                );
                restoring.push(tp);
            }
        }
        tracing::info!(
            partitions = tpl.count(),
            restoring = restoring.len(),
            "partitions assigned"
        );
        self.health
            .assigned
            .store(!self.assignment.is_empty(), Ordering::Relaxed);
        self.flow.on_assigned(consumer, tpl);
        self.flow.restoring(consumer, &restoring);
    }

    /// Drain the revoked partitions (bounded), commit them, then let them go: stop any
    /// request of theirs still retrying and forget what is remembered of them.
    fn revoking(&mut self, consumer: &GroupConsumer, tpl: &TopicPartitionList) {
        let revoked: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .filter(|tp| self.assignment.holds(tp))
            .collect();
        if revoked.is_empty() {
            return;
        }
        let lost = consumer.assignment_lost();
        tracing::info!(partitions = ?revoked.iter().map(ToString::to_string).collect::<Vec<_>>(),
            lost, "partitions revoked; draining");
        let ids: Vec<PartitionId> = revoked
            .iter()
            .filter_map(|tp| self.assignment.id(tp))
            .collect();
        let gone = |p: &Position| ids.contains(&p.partition());
        // At shutdown the run has drained already, under its own deadline; a lost
        // assignment has other owners already, so there is nothing to commit.
        // A folding replay commits only when everything it read is sent and settled.
        if !lost && !self.shutting_down && self.may_commit() {
            let deadline = Instant::now() + self.drain_timeout;
            let drained = self.drain(deadline, Some(&gone), |w| {
                revoked.iter().all(|tp| w.assignment.unsettled_in(tp) == 0)
            });
            if !drained {
                tracing::warn!("drain deadline passed; committing what settled");
            }
            let offsets: Vec<(TopicPartition, i64)> = revoked
                .iter()
                .filter_map(|tp| self.assignment.committable(tp).map(|o| (tp.clone(), o)))
                .collect();
            if let Err(e) = self.commits.commit(consumer, &offsets, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revoke failed");
            }
        }
        let now = self.now_ms();
        let stopped = self.delivery.give_up(gone, now);
        if stopped > 0 {
            tracing::warn!(
                requests = stopped,
                "requests of revoked partitions stopped before Braze answered"
            );
        }
        let numbers: Vec<i32> = revoked.iter().map(|tp| tp.partition).collect();
        self.delivery.revoke(gone, &numbers);
        self.flow.drop_held(|topic, partition| {
            revoked
                .iter()
                .any(|tp| tp.partition == partition && &*tp.topic == topic)
        });
        for tp in &revoked {
            if let Some(r) = self.restorer.as_mut() {
                r.cancel(tp);
            }
            self.flow.restored(consumer, tp, false);
            self.assignment.revoke(tp);
            self.commits.forget(tp);
            // At shutdown the last values stay for a final scrape.
            if !self.shutting_down {
                self.commits.unreport(tp);
            }
        }
        self.health
            .assigned
            .store(!self.assignment.is_empty(), Ordering::Relaxed);
    }
}
