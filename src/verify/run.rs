//! One verify run: read the log to the end offsets taken at start, export the checked users,
//! check the ones that differ again once the live group has passed their last writes, look
//! for dead-lettered last writes, report, and repair when asked.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Map, Value};

use crate::braze::BrazeClient;
use crate::config::Config;
use crate::health::Health;
use crate::mapping::Mapping;
use crate::metrics::Metrics;
use crate::offsets::TopicPartition;
use crate::start::StartAt;

use super::compare::{Difference, Judge, Outcome};
use super::export::{ExportClient, MAX_IDS};
use super::log::{Log, Offsets};
use super::metrics::VerifyMetrics;
use super::repair::{self, RepairUser, Sink};
use super::report::{RepairSummary, Status, Summary, Unjudged, UserLine};
use super::state::{Coord, LogState, UserState};
use super::{VerifyArgs, VerifyError, VerifyOptions};

/// Export requests in flight at once; the pacer spaces their starts.
const EXPORTS_IN_FLIGHT: usize = 4;
/// Checks of a differing user before one that keeps changing is reported as such.
const MAX_ROUNDS: usize = 5;
const SETTLE_POLL: Duration = Duration::from_millis(500);
/// Braze applies `/users/track` asynchronously: a repaired user is read back a few times.
const REPAIR_CHECKS: u32 = 3;
const REPAIR_CHECK_WAIT: Duration = Duration::from_secs(5);

/// A user that differs, as last exported.
struct Differing {
    outcome: Outcome,
    /// The mapping's attributes of the profile; `None` when Braze has no profile.
    braze: Option<Map<String, Value>>,
}

/// `segment-sync verify`: serves `/metrics` when asked, runs on a thread of its own (the
/// registry client blocks), writes the NDJSON lines on stdout.
pub async fn command(
    cfg: Config,
    args: &VerifyArgs,
    stop: Arc<AtomicBool>,
) -> Result<Summary, VerifyError> {
    let options = args.options(stop)?;
    let metrics = Arc::new(Metrics::new());
    let verify_metrics = Arc::new(VerifyMetrics::new(&metrics.registry)?);
    let health = Arc::new(Health::new());
    let server = if args.metrics {
        let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
            .await
            .map_err(|error| VerifyError::Listen {
                listen: cfg.server.listen.clone(),
                error,
            })?;
        Some(tokio::spawn(crate::server::serve(
            listener,
            metrics.clone(),
            health.clone(),
            std::future::pending(),
        )))
    } else {
        None
    };
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || {
            let mut out = std::io::stdout();
            let _ = tx.send(run(
                &cfg,
                &options,
                &mut out,
                &metrics,
                &verify_metrics,
                &health,
                &rt,
            ));
        })
        .map_err(|_| VerifyError::Thread)?;
    let result = rx.await.map_err(|_| VerifyError::Thread)?;
    if let Some(server) = server {
        server.abort();
    }
    result
}

/// Runs one check on the calling thread (not a tokio worker: it blocks) and writes one
/// NDJSON line per user not in sync to `out`.
pub fn run(
    cfg: &Config,
    opts: &VerifyOptions,
    out: &mut (dyn Write + Send),
    metrics: &Arc<Metrics>,
    vm: &Arc<VerifyMetrics>,
    health: &Arc<Health>,
    rt: &tokio::runtime::Handle,
) -> Result<Summary, VerifyError> {
    let started = Instant::now();
    let mut v = Verify::new(cfg, opts, vm, rt)?;
    let mut summary = Summary {
        sample: opts.sample.to_string(),
        ..Summary::default()
    };
    let outcome = v.check(&mut summary, out);
    let drifted = match outcome {
        Ok(drifted) => drifted,
        Err(VerifyError::Stopped) => {
            summary.stopped = true;
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    if opts.repair && !drifted.is_empty() && !summary.stopped {
        match v.repair(&drifted, out, metrics, health) {
            Ok(r) => summary.repair = Some(r),
            Err(VerifyError::Stopped) => summary.stopped = true,
            Err(e) => return Err(e),
        }
    }
    summary.export_requests = ["2xx", "4xx", "429", "5xx", "error"]
        .iter()
        .map(|c| vm.export_requests.with_label_values(&[c]).get())
        .sum();
    summary.elapsed = started.elapsed();
    out.flush().map_err(VerifyError::Output)?;
    Ok(summary)
}

struct Verify<'a> {
    cfg: &'a Config,
    opts: &'a VerifyOptions,
    vm: &'a VerifyMetrics,
    rt: &'a tokio::runtime::Handle,
    log: Log,
    client: ExportClient,
    state: LogState,
    judge: Judge,
    partitions: Vec<TopicPartition>,
    /// Where the log has been read to.
    read_to: Offsets,
    empty: UserState,
}

impl<'a> Verify<'a> {
    fn new(
        cfg: &'a Config,
        opts: &'a VerifyOptions,
        vm: &'a Arc<VerifyMetrics>,
        rt: &'a tokio::runtime::Handle,
    ) -> Result<Verify<'a>, VerifyError> {
        let client = ExportClient::new(&cfg.braze, vm.clone())?;
        let log = Log::new(cfg)?;
        let partitions = log.partitions()?;
        Ok(Verify {
            cfg,
            opts,
            vm,
            rt,
            log,
            client,
            state: LogState::new(opts.sample.clone()),
            judge: Judge::new(&Mapping::from_config(cfg), false),
            partitions,
            read_to: Offsets::new(),
            empty: UserState::default(),
        })
    }

    fn stopped(&self) -> bool {
        self.opts.stop.load(Ordering::Relaxed)
    }

    /// Reads on from where the log was read to, up to its end now; returns the users of a
    /// restricted state that changed.
    fn read_on(&mut self, summary: &mut Summary) -> Result<HashSet<Box<str>>, VerifyError> {
        let ends = self.log.ends(&self.partitions)?;
        let state = &mut self.state;
        let read = self
            .log
            .read(&self.read_to, &ends, &self.opts.stop, |e, id, at| {
                state.fold(e, id, at)
            })?;
        summary.records_read += read.records;
        summary.records_skipped += read.skipped;
        self.vm.records_read.inc_by(read.records);
        self.read_to = ends;
        Ok(self.state.take_touched())
    }

    /// The check, up to the report; returns the drifted users for a repair.
    fn check(
        &mut self,
        summary: &mut Summary,
        out: &mut (dyn Write + Send),
    ) -> Result<Vec<(String, Vec<Difference>)>, VerifyError> {
        let marks = self.log.watermarks(&self.partitions)?;
        let starts = self.log.starts(&self.opts.start, &marks)?;
        let whole_log =
            self.opts.start == StartAt::Earliest && marks.values().all(|(low, _)| *low == 0);
        self.judge.whole_log = whole_log;
        summary.unjudged = Unjudged {
            empty_prefix: self.judge.prefix.is_empty()
                && self.judge.mode == crate::config::MappingMode::Boolean,
            partial_log: !whole_log,
            ..Unjudged::default()
        };
        self.read_to = starts;
        tracing::info!(partitions = self.partitions.len(), sample = %self.opts.sample, "reading the log to its end");
        self.read_on(summary)?;
        let ids = {
            let mut ids: Vec<String> = self.state.users().map(|(id, _)| id.to_string()).collect();
            ids.sort();
            ids
        };
        summary.users_checked = ids.len() as u64;
        summary.email_only = self.state.email_only() as u64;
        self.count("email_only", summary.email_only);
        tracing::info!(
            users = ids.len(),
            records = summary.records_read,
            "exporting the checked users from Braze"
        );

        // Round 1: every checked user, against the snapshot.
        let mut differing: BTreeMap<String, Differing> = BTreeMap::new();
        let mut in_sync = 0u64;
        let mut unjudged = 0u64;
        self.export_each(&ids, |v, id, profile| {
            let user = v.state.user(id).unwrap_or(&v.empty);
            let j = v.judge.judge(user, profile, v.state.names());
            unjudged += j.unjudged as u64;
            match j.outcome {
                Outcome::InSync => in_sync += 1,
                outcome => {
                    let braze = profile.map(|p| v.judge.relevant(user, p, v.state.names()));
                    differing.insert(id.to_string(), Differing { outcome, braze });
                }
            }
        })?;
        summary.in_sync += in_sync;
        summary.unjudged.attributes = unjudged;
        self.vm.unjudged_attributes.inc_by(unjudged);
        summary.rechecked = differing.len() as u64;
        self.vm.users_rechecked.inc_by(differing.len() as u64);

        // Later rounds: what differs may be on its way. Read on, wait for the live group to
        // pass the deciding records, export again, and keep only what persists with no newer
        // record of the user in the log meanwhile.
        let mut confirmed: BTreeMap<String, Differing> = BTreeMap::new();
        let mut unsettled: BTreeMap<String, (Option<Map<String, Value>>, String)> = BTreeMap::new();
        let mut round = 1;
        while !differing.is_empty() {
            round += 1;
            if round > MAX_ROUNDS {
                for (id, d) in std::mem::take(&mut differing) {
                    unsettled.insert(
                        id,
                        (
                            d.braze,
                            format!("changed in the log in each of {MAX_ROUNDS} checks"),
                        ),
                    );
                }
                break;
            }
            self.state
                .restrict(differing.keys().map(|k| Box::from(k.as_str())));
            self.read_on(summary)?;
            let (ready, late) = self.wait_settled(differing.keys())?;
            for id in late {
                if let Some(d) = differing.remove(&id) {
                    unsettled.insert(
                        id,
                        (
                            d.braze,
                            format!(
                                "the live group had not committed past its last writes within {:?}",
                                self.opts.settle_timeout
                            ),
                        ),
                    );
                }
            }
            tracing::info!(round, users = ready.len(), "checking differing users again");
            let mut still: BTreeMap<String, Differing> = BTreeMap::new();
            let mut now_in_sync = 0u64;
            self.export_each(&ready, |v, id, profile| {
                let user = v.state.user(id).unwrap_or(&v.empty);
                match v.judge.judge(user, profile, v.state.names()).outcome {
                    Outcome::InSync => now_in_sync += 1,
                    outcome => {
                        let braze = profile.map(|p| v.judge.relevant(user, p, v.state.names()));
                        still.insert(id.to_string(), Differing { outcome, braze });
                    }
                }
            })?;
            summary.in_sync += now_in_sync;
            // Anything Braze's answer could reflect is in the log below its end now.
            self.state
                .restrict(still.keys().map(|k| Box::from(k.as_str())));
            let touched = self.read_on(summary)?;
            differing = BTreeMap::new();
            for (id, d) in still {
                if touched.contains(id.as_str()) {
                    differing.insert(id, d);
                } else {
                    confirmed.insert(id, d);
                }
            }
        }

        // Last writes Braze refused are in the dead-letter topic: known, reported apart.
        let wanted: HashSet<Coord> = confirmed
            .values()
            .flat_map(|d| differences(&d.outcome))
            .filter_map(|d| d.deciding.clone())
            .collect();
        let dead = self.log.dead_lettered(&wanted, &self.opts.stop)?;
        let mut drifted = Vec::new();
        for (id, mut d) in confirmed {
            let list = match &mut d.outcome {
                Outcome::Differs(list) | Outcome::Missing(list) => list,
                Outcome::InSync => continue,
            };
            for diff in list.iter_mut() {
                diff.dead_lettered = diff.deciding.as_ref().is_some_and(|c| dead.contains(c));
            }
            let all_dead = !list.is_empty() && list.iter().all(|x| x.dead_lettered);
            let status = match (&d.outcome, all_dead) {
                (_, true) => Status::DeadLettered,
                (Outcome::Missing(_), false) => Status::Missing,
                _ => Status::Drifted,
            };
            match status {
                Status::DeadLettered => summary.dead_lettered += 1,
                Status::Missing => summary.missing += 1,
                _ => summary.drifted += 1,
            }
            let list = differences(&d.outcome).to_vec();
            let user = self.state.user(&id).unwrap_or(&self.empty);
            let line = UserLine::new(&id, status, user, d.braze, list.clone());
            out.write_all(line.to_ndjson().as_bytes())
                .map_err(VerifyError::Output)?;
            if status != Status::DeadLettered {
                drifted.push((id, list));
            }
        }
        for (id, (braze, note)) in unsettled {
            summary.unsettled += 1;
            let user = self.state.user(&id).unwrap_or(&self.empty);
            let mut line = UserLine::new(&id, Status::Unsettled, user, braze, Vec::new());
            line.note = Some(note);
            out.write_all(line.to_ndjson().as_bytes())
                .map_err(VerifyError::Output)?;
        }
        self.count("in_sync", summary.in_sync);
        self.count("drifted", summary.drifted);
        self.count("missing", summary.missing);
        self.count("dead_lettered", summary.dead_lettered);
        self.count("unsettled", summary.unsettled);
        Ok(drifted)
    }

    fn count(&self, result: &str, n: u64) {
        self.vm.users.with_label_values(&[result]).inc_by(n);
    }

    /// Exports the users in requests of [`MAX_IDS`] and hands each answer to `each`, as the
    /// answers come, so only differing users' profiles are kept.
    fn export_each(
        &self,
        ids: &[String],
        mut each: impl FnMut(&Verify<'a>, &str, Option<&Map<String, Value>>),
    ) -> Result<(), VerifyError> {
        let client = &self.client;
        let stop = &self.opts.stop;
        self.rt.block_on(async {
            let mut answers = futures::stream::iter(ids.chunks(MAX_IDS))
                .map(|chunk| async move {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    (chunk, client.export(&refs).await)
                })
                .buffered(EXPORTS_IN_FLIGHT);
            while let Some((chunk, answer)) = answers.next().await {
                if stop.load(Ordering::Relaxed) {
                    return Err(VerifyError::Stopped);
                }
                let exported = answer?;
                for id in chunk {
                    each(self, id, exported.profiles.get(id));
                }
            }
            Ok(())
        })
    }

    /// Waits until the live group's committed offsets are past every deciding record of the
    /// users, or the settle timeout; returns (the users it is past, the others).
    fn wait_settled<'i>(
        &self,
        users: impl Iterator<Item = &'i String>,
    ) -> Result<(Vec<String>, Vec<String>), VerifyError> {
        let needs: Vec<(String, Vec<Coord>)> = users
            .map(|id| {
                let coords = self
                    .state
                    .user(id)
                    .map(|u| u.segments.values().map(|l| l.at.clone()).collect())
                    .unwrap_or_default();
                (id.clone(), coords)
            })
            .collect();
        let deadline = Instant::now() + self.opts.settle_timeout;
        loop {
            let committed = self.log.committed(&self.partitions)?;
            let passed = |c: &Coord| {
                committed
                    .get(&TopicPartition::new(&c.topic, c.partition))
                    .is_some_and(|o| *o > c.offset)
            };
            let (ready, late): (Vec<_>, Vec<_>) = needs
                .iter()
                .partition(|(_, coords)| coords.iter().all(passed));
            if late.is_empty() || Instant::now() >= deadline || self.stopped() {
                if self.stopped() {
                    return Err(VerifyError::Stopped);
                }
                return Ok((
                    ready.into_iter().map(|(id, _)| id.clone()).collect(),
                    late.into_iter().map(|(id, _)| id.clone()).collect(),
                ));
            }
            std::thread::sleep(SETTLE_POLL);
        }
    }

    /// Sends the log's state for the drifted users, dead-letters what Braze rejects, and
    /// checks the rest again.
    fn repair(
        &mut self,
        drifted: &[(String, Vec<Difference>)],
        out: &mut (dyn Write + Send),
        metrics: &Arc<Metrics>,
        health: &Arc<Health>,
    ) -> Result<RepairSummary, VerifyError> {
        let mut summary = RepairSummary {
            dry_run: self.opts.dry_run,
            ..RepairSummary::default()
        };
        // A user with a newer record meanwhile is the live group's to write: a repair from
        // the older state could overwrite it.
        self.state
            .restrict(drifted.iter().map(|(id, _)| Box::from(id.as_str())));
        let mut scratch = Summary::default();
        let touched = self.read_on(&mut scratch)?;
        let users: Vec<RepairUser> = drifted
            .iter()
            .filter(|(id, _)| !touched.contains(id.as_str()))
            .map(|(id, list)| {
                let user = self.state.user(id).unwrap_or(&self.empty);
                let changes = self.judge.repair_changes(user, list);
                let deciding = changes
                    .iter()
                    .filter_map(|(segment, _)| user.segments.get(segment.as_str()))
                    .map(|l| l.at.clone())
                    .collect();
                RepairUser {
                    external_id: id.clone(),
                    changes,
                    deciding,
                }
            })
            .filter(|u| !u.changes.is_empty())
            .collect();
        summary.changing = (drifted.len() - users.len()) as u64;
        summary.sent = users.len() as u64;
        if self.opts.dry_run {
            repair::send(self.cfg, &users, Sink::DryRun(out), self.rt)?;
            return Ok(summary);
        }
        let client = BrazeClient::new(&self.cfg.braze, metrics.clone(), health.clone())?;
        tracing::info!(users = users.len(), "repairing drifted users");
        let done = repair::send(self.cfg, &users, Sink::Braze(&client), self.rt)?;
        summary.rejected = done.rejected.len() as u64;
        if !done.rejected.is_empty() {
            let rejected: Vec<_> = done
                .rejected
                .iter()
                .map(|(i, r)| (&users[*i], r.clone()))
                .collect();
            repair::dead_letter_rejected(self.cfg, &rejected, &self.opts.stop)?;
        }
        let mut left: Vec<String> = done
            .delivered
            .iter()
            .map(|i| users[*i].external_id.clone())
            .collect();
        for check in 0..REPAIR_CHECKS {
            if left.is_empty() {
                break;
            }
            if check > 0 {
                std::thread::sleep(REPAIR_CHECK_WAIT);
            }
            let mut still = Vec::new();
            let mut fixed = 0u64;
            self.export_each(&left, |v, id, profile| {
                let user = v.state.user(id).unwrap_or(&v.empty);
                match v.judge.judge(user, profile, v.state.names()).outcome {
                    Outcome::InSync => fixed += 1,
                    _ => still.push(id.to_string()),
                }
            })?;
            summary.fixed += fixed;
            left = still;
        }
        summary.still_drifted = left.len() as u64;
        self.vm.users_repaired.inc_by(summary.fixed);
        Ok(summary)
    }
}

fn differences(outcome: &Outcome) -> &[Difference] {
    match outcome {
        Outcome::Differs(d) | Outcome::Missing(d) => d,
        Outcome::InSync => &[],
    }
}
