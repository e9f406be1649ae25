//! Flushes leave as Braze requests; their answers, and the dead-letter acknowledgements,
//! settle offsets and free the window's users.

use super::*;

impl Core {
    /// Sends one flush: encodes it, settles what proved redundant, and hands the objects to
    /// a task (or writes them, in a dry run).
    pub(super) fn dispatch(&mut self, flush: Flush<Position>) {
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

    pub(super) fn on_ack(&mut self, ack: Ack) {
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

    pub(super) fn take_acks(&mut self) {
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

    pub(super) fn flush_ready(&mut self, force: bool) {
        while self.in_flight.len() < self.max_in_flight {
            let now = self.now_ms();
            match self.window.pop_batch(now, force) {
                Some(flush) => self.dispatch(flush),
                None => break,
            }
        }
    }

    /// Flushes and waits for acknowledgements until `done` holds or the deadline passes.
    pub(super) fn drain(&mut self, deadline: Instant, done: impl Fn(&Core) -> bool) -> bool {
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

    pub(super) fn settled_everything(&self) -> bool {
        self.window.is_empty()
            && self.in_flight.is_empty()
            && self.dlq_pending == 0
            && self.dlq_retry.is_empty()
            && self.tracker.unsettled() == 0
    }
}
