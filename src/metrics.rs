//! Prometheus metrics of docs/design.md. One registry per worker instance (not the global one), so
//! several workers can run in one test process and each be checked on its own.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::fold::FoldStats;

pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounter,
    pub events_decoded: IntCounter,
    /// label `reason`: "undecodable" | "invalid"
    pub events_invalid: IntCounterVec,
    /// label `reason`: "other_kind" | "unmapped_audience" | "tombstone": what the CDP
    /// writes beside audience changes, settled without being applied.
    pub events_ignored: IntCounterVec,
    pub events_deduplicated: IntCounter,
    pub events_stale: IntCounter,
    /// Changes that equal what was last delivered for the (user, segment): not written again.
    pub events_redundant: IntCounter,
    /// label `class`: "2xx" | "4xx" | "429" | "5xx" | "error" (timeout, connection)
    pub braze_requests: IntCounterVec,
    pub braze_request_duration: Histogram,
    pub braze_objects_delivered: IntCounter,
    pub braze_objects_rejected: IntCounter,
    /// Data points: attributes written in delivered objects (what Braze bills).
    pub braze_attributes_written: IntCounter,
    pub braze_retries: IntCounter,
    pub braze_rate_limited: IntCounter,
    pub braze_in_flight: IntGauge,
    /// The adaptive in-flight limit, at most `braze.max_in_flight`.
    pub braze_concurrency_limit: IntGauge,
    /// label `reason`: "undecodable" | "invalid" | "rejected", and for records written
    /// without their value: "gone" (no longer in the log) | "too_large" (over Kafka's limit)
    pub dlq_records: IntCounterVec,
    /// labels `topic`, `partition`
    pub committed_offset: IntGaugeVec,
    /// labels `topic`, `partition`
    pub consumer_lag: IntGaugeVec,
    pub window_pending_users: IntGauge,
    pub window_pending_changes: IntGauge,
    /// 1 when `/readyz` would answer 200, else 0; set from [`crate::health::Health`] each time
    /// `/metrics` or `/readyz` is served, so a scrape sees what the probe sees.
    pub ready: IntGauge,
    /// labels `topic`, `partition`: Unix time of the last commit that moved the partition's
    /// committed offset (or was its first in this assignment). Synchronous commits (revoke,
    /// shutdown) are acknowledged by Kafka; the periodic ones are asynchronous and librdkafka
    /// reports no outcome for them, so there it is the time the new offset was sent.
    pub last_commit_timestamp: GaugeVec,
    /// Records read back from assigned partitions' histories (`window.restore_records`).
    pub restore_records: IntCounter,
    /// How long each partition's restore took, from its assignment to its versions loaded.
    pub restore_seconds: Histogram,
    /// A backfill's fold (`replay`); zero in a live worker.
    pub replay_fold: ReplayFoldMetrics,
}

/// What an operator watching a long backfill reads of its fold: how far the read has come,
/// what it holds against `replay.fold_memory`, what it spilled and how far the sending has
/// come. Promises: after `publish`, each figure is the fold's own (a process runs one fold).
pub struct ReplayFoldMetrics {
    pub changes: IntCounter,
    pub users: IntGauge,
    pub bytes: IntGauge,
    pub spilled_bytes: IntCounter,
    pub spill_buckets_left: IntGauge,
    pub users_sent: IntCounter,
    pub objects_sent: IntCounter,
}

impl ReplayFoldMetrics {
    fn register(r: &Registry) -> ReplayFoldMetrics {
        ReplayFoldMetrics {
            changes: counter(
                r,
                "replay_fold_changes_total",
                "Valid changes a backfill's fold has read",
            ),
            users: gauge(
                r,
                "replay_fold_users",
                "Users the fold holds in memory for the stage being read",
            ),
            bytes: gauge(
                r,
                "replay_fold_bytes",
                "Bytes the fold's in-memory state holds, as replay.fold_memory counts them",
            ),
            spilled_bytes: counter(
                r,
                "replay_fold_spilled_bytes_total",
                "Bytes the fold wrote to its spill files under replay.spill_dir",
            ),
            spill_buckets_left: gauge(
                r,
                "replay_fold_spill_buckets_left",
                "Spill files of the stage being sent still to be read back and sent",
            ),
            users_sent: counter(
                r,
                "replay_fold_users_sent_total",
                "Users the fold has sent (again for a user the tail's re-read changed)",
            ),
            objects_sent: counter(
                r,
                "replay_fold_objects_sent_total",
                "Attributes objects the fold has put in requests",
            ),
        }
    }

    /// Brings the figures to the fold's: its running totals (`stats`) and what it holds now.
    pub fn publish(&self, stats: &FoldStats, users: usize, bytes: usize, buckets_left: usize) {
        // One fold a process: a counter's own value is what was published before.
        let advance = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        advance(&self.changes, stats.changes_read);
        advance(&self.spilled_bytes, stats.bytes_spilled);
        advance(&self.users_sent, stats.users);
        advance(&self.objects_sent, stats.objects);
        self.users.set(users as i64);
        self.bytes.set(bytes as i64);
        self.spill_buckets_left.set(buckets_left as i64);
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(format!("segment_sync_{name}"), help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(format!("segment_sync_{name}"), help), labels)
        .expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(format!("segment_sync_{name}"), help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(format!("segment_sync_{name}"), help), labels)
        .expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let braze_request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "segment_sync_braze_request_duration_seconds",
                "Latency of POST /users/track requests, one observation per HTTP attempt",
            )
            // Braze answers in tens to hundreds of milliseconds; the tail up to the 10 s
            // default timeout is where trouble shows.
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(braze_request_duration.clone()))
            .expect("unique metric");
        let restore_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "segment_sync_restore_seconds",
                "Time a newly assigned partition waited for its history to be read back",
            )
            // 100,000 records read back take a fraction of a second; a minute is where
            // /readyz starts to name the partition.
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(restore_seconds.clone()))
            .expect("unique metric");
        Metrics {
            events_consumed: counter(&r, "events_consumed_total", "Records read from Kafka"),
            events_decoded: counter(&r, "events_decoded_total", "Records decoded into events"),
            events_invalid: counter_vec(
                &r,
                "events_invalid_total",
                "Records that could not be decoded or are invalid events",
                &["reason"],
            ),
            events_ignored: {
                let c = counter_vec(
                    &r,
                    "events_ignored_total",
                    "Records or audiences of the source shape that hold no change to apply, settled",
                    &["reason"],
                );
                for reason in crate::source::Ignored::ALL {
                    c.with_label_values(&[reason.label()]);
                }
                c
            },
            events_deduplicated: counter(
                &r,
                "events_deduplicated_total",
                "Exact repeats of an event_id, dropped",
            ),
            events_stale: counter(
                &r,
                "events_stale_total",
                "Events older than what was already sent for the same user and segment, dropped",
            ),
            events_redundant: counter(
                &r,
                "events_redundant_total",
                "Changes equal to what was last delivered for the same user and segment, not written",
            ),
            braze_requests: counter_vec(
                &r,
                "braze_requests_total",
                "HTTP requests to Braze by response class",
                &["class"],
            ),
            braze_request_duration,
            braze_objects_delivered: counter(
                &r,
                "braze_objects_delivered_total",
                "Attributes objects Braze accepted",
            ),
            braze_objects_rejected: counter(
                &r,
                "braze_objects_rejected_total",
                "Attributes objects Braze rejected",
            ),
            braze_attributes_written: counter(
                &r,
                "braze_attributes_written_total",
                "Attributes written in accepted objects (Braze data points)",
            ),
            braze_retries: counter(&r, "braze_retries_total", "Requests sent again"),
            braze_rate_limited: counter(&r, "braze_rate_limited_total", "429 answers from Braze"),
            braze_in_flight: gauge(&r, "braze_in_flight_requests", "Braze requests in flight"),
            braze_concurrency_limit: gauge(
                &r,
                "braze_concurrency_limit",
                "Braze requests allowed in flight now (adaptive, at most braze.max_in_flight)",
            ),
            dlq_records: counter_vec(
                &r,
                "dlq_records_total",
                "Records written to the dead-letter topic and acknowledged",
                &["reason"],
            ),
            committed_offset: gauge_vec(
                &r,
                "committed_offset",
                "Last committed offset per partition",
                &["topic", "partition"],
            ),
            consumer_lag: gauge_vec(
                &r,
                "consumer_lag",
                "High watermark minus committed offset per partition",
                &["topic", "partition"],
            ),
            window_pending_users: gauge(&r, "window_pending_users", "Users waiting in the window"),
            window_pending_changes: gauge(
                &r,
                "window_pending_changes",
                "(user, segment) changes waiting in the window",
            ),
            ready: gauge(
                &r,
                "ready",
                "1 when the worker is ready (/readyz answers 200), else 0",
            ),
            last_commit_timestamp: {
                let g = GaugeVec::new(
                    Opts::new(
                        "segment_sync_last_commit_timestamp_seconds",
                        "Unix time of the last commit that moved the partition's committed offset",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            restore_records: counter(
                &r,
                "restore_records_total",
                "Records read back below the committed offset of newly assigned partitions",
            ),
            restore_seconds,
            replay_fold: ReplayFoldMetrics::register(&r),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `segment-sync snapshot --metrics`: the figures of one run, registered beside the worker's
/// on the registry the command serves (the worker itself never registers them).
pub struct SnapshotMetrics {
    /// label `count`: members, entered, exited, unchanged, restated, skipped_rows,
    /// duplicates, previous
    pub counts: IntGaugeVec,
    pub changes_written: IntGauge,
    /// label `status`: applied, nothing_to_do, refused, dry_run, error
    pub runs: IntCounterVec,
}

impl SnapshotMetrics {
    pub fn register(r: &Registry) -> SnapshotMetrics {
        SnapshotMetrics {
            counts: gauge_vec(
                r,
                "snapshot_members",
                "The snapshot run's counts: members, entered, exited, unchanged, restated, \
                 skipped_rows, duplicates, previous",
                &["count"],
            ),
            changes_written: gauge(
                r,
                "snapshot_changes_written",
                "Changes of the snapshot run written so far (committed or in the open transaction)",
            ),
            runs: counter_vec(
                r,
                "snapshot_runs_total",
                "Snapshot runs by outcome",
                &["status"],
            ),
        }
    }
}
