//! The window and the Braze requests it flushes into.

use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::braze::{BrazeClient, ObjectOutcome, Rejection};
use crate::event::{Event, Identity};
use crate::mapping::{self, Mapping};
use crate::metrics::Metrics;
use crate::offsets::Position;
use crate::window::{Admit, Flush, IdKind, Lookup, Segments, Window};

/// How many users ahead `on_answer` starts loading the slots it will complete.
const COMPLETE_AHEAD: usize = 4;

use super::acks::Ack;

/// Where requests go.
pub enum Sink {
    Braze(BrazeClient),
    /// A dry run: requests are written as NDJSON and count as delivered.
    DryRun(Box<dyn Write + Send>),
}

struct InFlight {
    flush: Flush<Position>,
    data_points: Vec<u32>,
    /// To stop a request still retrying when its partitions are given up or the run ends.
    task: Option<tokio::task::AbortHandle>,
    /// Built by a replay's fold, not flushed from the window: its users have no slots.
    folded: bool,
}

/// What a finished request settled and what Braze refused.
#[derive(Default)]
pub struct Answer {
    pub delivered: Vec<Position>,
    pub rejected: Vec<(Vec<Position>, Rejection)>,
    /// The users of a replay's folded request that Braze rejected: the fold forgets that it
    /// sent them (`Fold::forget_sent`).
    pub rejected_folded: Vec<RejectedUser>,
}

/// A user of a folded request Braze rejected: its identifier, the segments and the extra
/// attributes the rejected object wrote.
pub type RejectedUser = (IdKind, Arc<str>, Vec<u32>, Vec<Box<str>>);

/// Owns the window and the requests in flight. Promises: at most `max_in_flight` requests
/// at once; one user is never in two of them; a position comes back exactly once, as
/// settled now (redundant), delivered or rejected, unless its partition is revoked first.
pub struct Delivery {
    window: Window<Position>,
    mapping: Mapping,
    sink: Sink,
    rt: tokio::runtime::Handle,
    acks: Sender<Ack>,
    in_flight: HashMap<u64, InFlight>,
    next_request: u64,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
}

impl Delivery {
    pub fn new(
        window: Window<Position>,
        mapping: Mapping,
        sink: Sink,
        rt: tokio::runtime::Handle,
        acks: Sender<Ack>,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Delivery {
        Delivery {
            window,
            mapping,
            sink,
            rt,
            acks,
            in_flight: HashMap::new(),
            next_request: 0,
            max_in_flight: max_in_flight.max(1),
            metrics,
        }
    }

    /// `Window::lookup`: what admitting the event will look up, for `prefetch` and `admit`.
    pub fn lookup(&self, event: &Event<'_>, identity: Identity<'_>) -> Lookup {
        self.window.lookup(event, identity)
    }

    /// `Window::prefetch` and `Window::prefetch_key`: the two steps, a few events apart.
    pub fn prefetch(&self, lookup: &Lookup, event: &Event<'_>) {
        self.window.prefetch(lookup, event);
    }

    pub fn prefetch_key(&self, lookup: &Lookup) {
        self.window.prefetch_key(lookup);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        lookup: &Lookup,
        event: &Event<'_>,
        identity: Identity<'_>,
        partition: i32,
        offset: i64,
        pos: Position,
        now_ms: u64,
    ) -> Admit {
        self.window
            .admit_as(lookup, event, identity, partition, offset, pos, now_ms)
    }

    /// Sends what is ready (everything, with `force`) while there is room in flight.
    /// Records whose change proved redundant settle through `settle` at once.
    pub fn flush(&mut self, now_ms: u64, force: bool, mut settle: impl FnMut(Position)) {
        while self.in_flight.len() < self.max_in_flight {
            match self.window.pop_batch(now_ms, force) {
                Some(flush) => {
                    for p in &flush.settled_now {
                        settle(*p);
                    }
                    self.metrics.events_redundant.inc_by(flush.redundant as u64);
                    if !flush.users.is_empty() {
                        self.dispatch(flush);
                    }
                }
                None => break,
            }
        }
    }

    /// Sends, whatever their linger, the users holding a record `pick` accepts (those of
    /// partitions being revoked), while there is room in flight; every other user keeps
    /// waiting for its linger.
    pub fn flush_holding(
        &mut self,
        pick: impl Fn(&Position) -> bool,
        mut settle: impl FnMut(Position),
    ) {
        while self.in_flight.len() < self.max_in_flight {
            match self.window.pop_batch_holding(&pick) {
                Some(flush) => {
                    for p in &flush.settled_now {
                        settle(*p);
                    }
                    self.metrics.events_redundant.inc_by(flush.redundant as u64);
                    if !flush.users.is_empty() {
                        self.dispatch(flush);
                    }
                }
                None => break,
            }
        }
    }

    fn dispatch(&mut self, flush: Flush<Position>) {
        let encoded = mapping::encode(&self.mapping, self.window.segments(), &flush);
        self.send(flush, encoded, false);
    }

    /// Room for another request in flight.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    /// Sends a request a replay's fold built (its segment indexes are the fold's), through
    /// the same sink, pacing and answers as the window's. Returns the data points it writes.
    pub fn dispatch_folded(&mut self, flush: Flush<Position>, segments: &Segments) -> u64 {
        let encoded = mapping::encode(&self.mapping, segments, &flush);
        let points = encoded.data_points.iter().map(|&p| u64::from(p)).sum();
        self.send(flush, encoded, true);
        points
    }

    fn send(&mut self, flush: Flush<Position>, encoded: mapping::Encoded, folded: bool) {
        let id = self.next_request;
        self.next_request += 1;
        tracing::debug!(request = id, users = flush.users.len(), "flush");
        let mut task = None;
        match &mut self.sink {
            Sink::Braze(client) => {
                let client = client.clone();
                let tx = self.acks.clone();
                let objects = encoded.objects;
                let handle = self.rt.spawn(async move {
                    let outcomes = client.deliver(objects).await;
                    let _ = tx.send(Ack::Braze { id, outcomes });
                });
                task = Some(handle.abort_handle());
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
                let _ = self.acks.send(Ack::Braze { id, outcomes });
            }
        }
        self.metrics.braze_in_flight.inc();
        self.in_flight.insert(
            id,
            InFlight {
                flush,
                data_points: encoded.data_points,
                task,
                folded,
            },
        );
    }

    /// A request finished. Unknown ids (given up meanwhile) answer nothing.
    pub fn on_answer(&mut self, id: u64, outcomes: Vec<ObjectOutcome>) -> Answer {
        let mut answer = Answer::default();
        let Some(done) = self.in_flight.remove(&id) else {
            return answer;
        };
        self.metrics.braze_in_flight.dec();
        let flush = done.flush;
        for (i, user) in flush.users.iter().enumerate() {
            if let Some(ahead) = flush.users.get(i + COMPLETE_AHEAD).filter(|_| !done.folded) {
                self.window.prefetch_user(ahead);
            }
            let positions = flush.user_positions(user);
            match outcomes.get(i) {
                Some(ObjectOutcome::Rejected(r)) => {
                    tracing::warn!(user_kind = user.kind.field(), status = r.status,
                        error_type = %r.error_type, "braze rejected an object; its events go to the dead-letter topic");
                    if done.folded {
                        answer.rejected_folded.push((
                            user.kind,
                            user.id.clone(),
                            flush.user_changes(user).iter().map(|(s, _)| *s).collect(),
                            flush
                                .user_attributes(user)
                                .iter()
                                .map(|(n, _)| n.clone())
                                .collect(),
                        ));
                    } else {
                        self.window.complete(&flush, user, true);
                    }
                    answer.rejected.push((positions.to_vec(), r.clone()));
                }
                Some(ObjectOutcome::Delivered) | None => {
                    answer.delivered.extend_from_slice(positions);
                    self.metrics
                        .braze_attributes_written
                        .inc_by(u64::from(done.data_points.get(i).copied().unwrap_or(0)));
                    if !done.folded {
                        self.window.complete(&flush, user, false);
                    }
                }
            }
        }
        answer
    }

    /// Loads a newly assigned partition's restored versions into the window's memory of
    /// what was written. Returns how many it kept (the others were older than what it
    /// remembered, or found it full of what this worker delivered).
    pub fn restore(&mut self, versions: &crate::versions::Versions) -> usize {
        let mut kept = 0;
        // Oldest first: when the memory cannot hold them all, the restored versions that
        // give way to later ones are the oldest, and late misordered changes are most often
        // near the newest.
        let mut changes: Vec<_> = versions.changes().collect();
        changes.sort_unstable_by_key(|c| c.order.offset);
        for c in changes {
            kept += usize::from(self.window.restore_change(
                c.kind,
                c.id,
                c.segment_id,
                c.change,
                c.order,
            ));
        }
        for a in versions.attributes() {
            kept += usize::from(self.window.restore_attribute(a.kind, a.id, a.name, a.order));
        }
        kept
    }

    /// Partitions were revoked: their pending changes leave the window (their next owner
    /// reads them again), and so does what the window remembers of them.
    pub fn revoke(&mut self, gone: impl Fn(&Position) -> bool, partitions: &[i32]) {
        self.window.drop_positions(&gone);
        self.window.forget_partitions(|p| partitions.contains(&p));
    }

    /// Stops the requests that carry records `gone` picks, so none is sent after their
    /// partitions' next owner may have written a newer value. Their other users' changes
    /// go back into the window. Returns how many requests were stopped. A replay's folded
    /// requests finish: their users have no place in the window to go back to, and what
    /// they settle of a revoked partition settles nothing.
    pub fn give_up(&mut self, gone: impl Fn(&Position) -> bool, now_ms: u64) -> usize {
        let ids: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, r)| !r.folded && r.flush.positions.iter().any(&gone))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            let Some(request) = self.in_flight.remove(id) else {
                continue;
            };
            if let Some(task) = request.task {
                task.abort();
            }
            self.metrics.braze_in_flight.dec();
            for user in &request.flush.users {
                self.window
                    .requeue(&request.flush, user, |p| !gone(p), now_ms);
            }
        }
        ids.len()
    }

    /// At the end of a run: stops whatever is still in flight. Its records stay unsettled,
    /// so the next owner sends them again.
    pub fn abandon(&mut self) -> usize {
        let n = self.in_flight.len();
        for (_, request) in self.in_flight.drain() {
            if let Some(task) = request.task {
                task.abort();
            }
            self.metrics.braze_in_flight.dec();
        }
        n
    }

    /// Nothing pending and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.window.is_empty() && self.in_flight.is_empty()
    }

    pub fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// The window holds as many users as it may: stop reading.
    pub fn is_full(&self) -> bool {
        self.window.is_full()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.window.next_deadline()
    }

    pub fn update_gauges(&self) {
        self.metrics
            .window_pending_users
            .set(self.window.pending_users() as i64);
        self.metrics
            .window_pending_changes
            .set(self.window.pending_changes() as i64);
    }
}
