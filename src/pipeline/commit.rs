//! Committing the settled watermark, and the gauges that report it.

use super::*;

impl Core {
    /// Commits the committable offset of every assigned partition. Every interval sends all
    /// of them, changed or not: librdkafka reports the outcome of an asynchronous commit only
    /// to an `offset_commit_cb`, which rdkafka's event-based consumer does not install, so a
    /// commit that failed (say during a rebalance) is healed by the next one rather than
    /// detected. One small request a second is the price.
    pub(super) fn commit(&mut self, consumer: &GroupConsumer, mode: CommitMode) {
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
    pub(super) fn on_commit(&mut self, offsets: &TopicPartitionList) {
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
    pub(super) fn update_lag(&self, consumer: &GroupConsumer) {
        for ((topic, partition), committed) in &self.committed {
            if let Some(high) = cached_high_watermark(consumer, topic, *partition) {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&**topic, partition.to_string().as_str()])
                    .set((high - committed).max(0));
            }
        }
    }

    pub(super) fn update_gauges(&self) {
        self.metrics
            .window_pending_users
            .set(self.window.pending_users() as i64);
        self.metrics
            .window_pending_changes
            .set(self.window.pending_changes() as i64);
    }
}
