//! When a run that stops by itself has caught up, its progress and its summary.

use super::*;

impl Core {
    pub(super) fn update_progress(&self, consumer: &GroupConsumer) {
        let Some(progress) = &self.progress else {
            return;
        };
        let mut to_go = 0i64;
        for (topic, partition) in self.names.values() {
            let end = match self.until {
                Until::StartOffsets => self
                    .start_ends
                    .get(&(topic.to_string(), *partition))
                    .copied(),
                _ => cached_high_watermark(consumer, topic, *partition),
            };
            let next = self.tracker.next_offset(topic, *partition);
            if let (Some(end), Some(next)) = (end, next) {
                to_go += (end - next).max(0);
            }
        }
        progress
            .done
            .store(self.metrics.events_consumed.get(), Ordering::Relaxed);
        progress.to_go.store(to_go as u64, Ordering::Relaxed);
    }

    /// Whether every assigned partition has been read to its end (by `until`'s measure) and
    /// everything read is settled.
    pub(super) fn caught_up(&mut self, consumer: &GroupConsumer, until: Until) -> bool {
        if until == Until::Stopped || self.names.is_empty() || !self.settled_everything() {
            return false;
        }
        if self.last_caught_up_check.elapsed() < Duration::from_millis(200) {
            return false;
        }
        self.last_caught_up_check = Instant::now();
        let position = consumer.position().ok();
        for (topic, partition) in self.names.values() {
            let key = (topic.to_string(), *partition);
            let Ok((low, high)) =
                consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5))
            else {
                return false;
            };
            let end = match until {
                Until::StartOffsets => match self.start_ends.get(&key) {
                    Some(e) => *e,
                    None => continue,
                },
                _ => high,
            };
            if low >= end {
                // Nothing in the partition to read.
                continue;
            }
            // Where reading has got to: the records tracked, else the consumer's position,
            // else where a replay told it to start, else the group's commit, else (no commit:
            // auto.offset.reset = earliest) the log's start.
            let next = self
                .tracker
                .committable(topic, *partition)
                .or_else(|| {
                    position
                        .as_ref()
                        .and_then(|p| p.find_partition(topic, *partition))
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                })
                .or_else(|| self.start_positions.get(&key).copied());
            let next = match next {
                Some(n) => n,
                None => {
                    let mut q = TopicPartitionList::new();
                    let _ = q.add_partition(topic, *partition);
                    match consumer
                        .committed_offsets(q, Duration::from_secs(5))
                        .ok()
                        .and_then(|c| c.find_partition(topic, *partition).map(|e| e.offset()))
                    {
                        Some(Offset::Offset(o)) => o,
                        Some(Offset::Invalid) => low,
                        _ => return false,
                    }
                }
            };
            if next < end {
                return false;
            }
        }
        true
    }

    pub(super) fn summary(&self, elapsed: Duration) -> RunSummary {
        let m = &self.metrics;
        let requests = ["2xx", "4xx", "429", "5xx", "error"]
            .iter()
            .map(|c| m.braze_requests.with_label_values(&[c]).get())
            .sum();
        let dlq = ["undecodable", "invalid", "rejected"]
            .iter()
            .map(|c| m.dlq_records.with_label_values(&[c]).get())
            .sum();
        let mut committed: Vec<(String, i32, i64)> = self
            .committed
            .iter()
            .map(|((t, p), o)| (t.to_string(), *p, *o))
            .collect();
        committed.sort();
        RunSummary {
            consumed: m.events_consumed.get(),
            decoded: m.events_decoded.get(),
            undecodable: m.events_invalid.with_label_values(&["undecodable"]).get(),
            invalid: m.events_invalid.with_label_values(&["invalid"]).get(),
            duplicates: m.events_deduplicated.get(),
            stale: m.events_stale.get(),
            redundant: m.events_redundant.get(),
            requests,
            objects_delivered: m.braze_objects_delivered.get(),
            objects_rejected: m.braze_objects_rejected.get(),
            data_points: m.braze_attributes_written.get(),
            dlq_records: dlq,
            committed,
            elapsed,
        }
    }
}
