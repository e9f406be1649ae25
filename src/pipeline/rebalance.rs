//! Partitions coming and going: drain and commit before letting go, start offsets for
//! replays.

use super::*;

impl Core {
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
