//! One consumed record: tracked, decoded, validated and admitted to the window, or sent to
//! the dead-letter topic with its reason.

use super::*;

impl Core {
    /// Whether a record lies past the end offsets taken at start, which `--until-start`
    /// and dry runs do not read.
    pub(super) fn past_start_end(&self, m: &BorrowedMessage<'_>) -> bool {
        self.until == Until::StartOffsets
            && self
                .start_ends
                .get(&(m.topic().to_string(), m.partition()))
                .is_some_and(|end| m.offset() >= *end)
    }

    /// One consumed record: track, decode, validate, admit.
    /// `now_ms` is read once per burst: a clock read per record is measurable here.
    pub(super) fn ingest(&mut self, m: &BorrowedMessage<'_>, stop: &AtomicBool, now_ms: u64) {
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
        let identity = match event
            .validate_with(&self.mapping.rules, self.mapping.rules.epoch_ms(now_ms))
        {
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

    pub(super) fn pause_partition(&mut self, topic: &str, partition: i32) {
        if !self.finished.insert((topic.to_string(), partition)) {
            return;
        }
        self.pause_requests.push((topic.to_string(), partition));
    }

    pub(super) fn dead_letter_message(
        &mut self,
        m: &BorrowedMessage<'_>,
        pos: Position,
        reason: DlqReason,
    ) {
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

    pub(super) fn send_dlq(&mut self, pending: Box<PendingDlq>) {
        self.dlq_pending += 1;
        self.dlq.send(pending);
    }

    /// The events of a user Braze rejected go to the re-reader thread, which dead-letters
    /// them; each comes back as a dead-letter acknowledgement.
    pub(super) fn dead_letter_rejected(&mut self, positions: &[Position], rejection: &Rejection) {
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
}
