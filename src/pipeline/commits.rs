//! Committing the settled watermark, and the gauges that report it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{cached_high_watermark, GroupConsumer};
use crate::metrics::Metrics;
use crate::offsets::TopicPartition;
use crate::replay::RunMark;

/// The wall clock in epoch milliseconds, for the marks of a replay's commits.
pub fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Owns what was committed. Promises: commits only offsets it is given (the settled
/// watermark), each marked as its run's when it is a replay's, and nothing at all
/// in a dry run.
pub struct Commits {
    interval: Duration,
    last: Instant,
    /// The last offset committed per partition (sent, for asynchronous commits).
    committed: HashMap<TopicPartition, i64>,
    mark: Option<RunMark>,
    enabled: bool,
    metrics: Arc<Metrics>,
}

impl Commits {
    pub fn new(
        interval: Duration,
        mark: Option<RunMark>,
        enabled: bool,
        metrics: Arc<Metrics>,
    ) -> Commits {
        Commits {
            interval,
            last: Instant::now(),
            committed: HashMap::new(),
            mark,
            enabled,
            metrics,
        }
    }

    /// Whether the interval has passed since the last periodic commit; restarts it.
    pub fn due(&mut self) -> bool {
        if self.last.elapsed() < self.interval {
            return false;
        }
        self.last = Instant::now();
        true
    }

    /// Commits `offsets`. Every interval sends all of them, changed or not: librdkafka
    /// reports the outcome of an asynchronous commit only to an `offset_commit_cb`, which
    /// rdkafka's event-based consumer does not install, so a commit that failed (say during
    /// a rebalance) is healed by the next one rather than detected. One small request a
    /// second is the price. A synchronous commit's failure is returned.
    pub fn commit(
        &mut self,
        consumer: &GroupConsumer,
        offsets: &[(TopicPartition, i64)],
        mode: CommitMode,
    ) -> Result<(), rdkafka::error::KafkaError> {
        if !self.enabled || offsets.is_empty() {
            return Ok(());
        }
        let metadata = self.mark.as_ref().map(|m| m.stamp(epoch_ms()));
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in offsets {
            if tpl
                .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))
                .is_err()
            {
                continue;
            }
            if let (Some(m), Some(mut e)) = (&metadata, tpl.find_partition(&tp.topic, tp.partition))
            {
                e.set_metadata(m.as_str());
            }
        }
        consumer.commit(&tpl, mode)?;
        // Synchronous: acknowledged. Asynchronous: sent; what the gauges show.
        let now = epoch_ms() as f64 / 1000.0;
        for (tp, offset) in offsets {
            let partition = tp.partition.to_string();
            let labels = [&*tp.topic, partition.as_str()];
            // Every interval re-sends the same offsets, so only a move says work got done:
            // a watermark held by one unsettled event must show as time passing.
            if self.committed.insert(tp.clone(), *offset) != Some(*offset) {
                self.metrics
                    .last_commit_timestamp
                    .with_label_values(&labels)
                    .set(now);
            }
            self.metrics
                .committed_offset
                .with_label_values(&labels)
                .set(*offset);
        }
        Ok(())
    }

    /// A revoked partition is its new owner's to report.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.committed.remove(tp);
    }

    /// Drops a partition's series, so that lag summed over the group (what an autoscaler
    /// reads) does not count a moved partition twice, nor with a value frozen at the move.
    pub fn unreport(&self, tp: &TopicPartition) {
        let partition = tp.partition.to_string();
        let labels = [&*tp.topic, partition.as_str()];
        let m = &self.metrics;
        let _ = m.committed_offset.remove_label_values(&labels);
        let _ = m.consumer_lag.remove_label_values(&labels);
        let _ = m.last_commit_timestamp.remove_label_values(&labels);
    }

    /// Lag per partition: the high watermark librdkafka last saw minus the committed offset,
    /// refreshed every commit interval so a stalled worker shows its lag growing.
    pub fn update_lag(&self, consumer: &GroupConsumer) {
        for (tp, committed) in &self.committed {
            if let Some(high) = cached_high_watermark(consumer, &tp.topic, tp.partition) {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&*tp.topic, tp.partition.to_string().as_str()])
                    .set((high - committed).max(0));
            }
        }
    }

    pub fn committed(&self) -> Vec<(String, i32, i64)> {
        let mut all: Vec<(String, i32, i64)> = self
            .committed
            .iter()
            .map(|(tp, o)| (tp.topic.to_string(), tp.partition, *o))
            .collect();
        all.sort();
        all
    }
}
