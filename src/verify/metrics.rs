//! `segment_sync_verify_*`: what a verify run found, registered beside the worker's metrics
//! (its repairs go through the worker's Braze client and count there) in the same registry,
//! so one `/metrics` serves both. The live worker does not register them.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

pub struct VerifyMetrics {
    pub records_read: IntCounter,
    /// label `result`: see [`RESULTS`].
    pub users: IntCounterVec,
    pub users_rechecked: IntCounter,
    pub users_repaired: IntCounter,
    pub unjudged_attributes: IntCounter,
    /// label `class`: "2xx" | "4xx" | "429" | "5xx" | "error"
    pub export_requests: IntCounterVec,
    pub export_duration: Histogram,
    pub users_exported: IntCounter,
}

/// The `result` label of `segment_sync_verify_users_total`.
pub const RESULTS: &[&str] = &[
    "in_sync",
    "drifted",
    "missing",
    "dead_lettered",
    "unsettled",
    "email_only",
];

fn name(short: &str) -> String {
    format!("segment_sync_verify_{short}")
}

impl VerifyMetrics {
    /// Registers the figures in `registry` (the worker's `Metrics::registry`).
    pub fn new(registry: &Registry) -> Result<VerifyMetrics, prometheus::Error> {
        let counter = |short: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name(short), help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |short: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name(short), help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let export_duration = Histogram::with_opts(
            HistogramOpts::new(
                name("export_request_duration_seconds"),
                "Latency of POST /users/export/ids requests, one observation per HTTP attempt",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        registry.register(Box::new(export_duration.clone()))?;
        let users = counter_vec(
            "users_total",
            "Users checked, by result: in_sync, drifted, missing (in Braze), dead_lettered (the last write is in the dead-letter topic), unsettled (still changing), email_only (skipped)",
            "result",
        )?;
        for r in RESULTS {
            users.with_label_values(&[r]);
        }
        Ok(VerifyMetrics {
            records_read: counter("records_read_total", "Records read from the topics")?,
            users,
            users_rechecked: counter(
                "users_rechecked_total",
                "Users found to differ and checked again once the live group had committed past their last writes",
            )?,
            users_repaired: counter(
                "users_repaired_total",
                "Drifted users whose profiles matched the log after --repair",
            )?,
            unjudged_attributes: counter(
                "unjudged_attributes_total",
                "Profile attributes that could not be judged (named by no segment of the log, or a log read only in part)",
            )?,
            export_requests: counter_vec(
                "export_requests_total",
                "POST /users/export/ids attempts by response class",
                "class",
            )?,
            export_duration,
            users_exported: counter("users_exported_total", "Profiles Braze exported")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_beside_the_worker_metrics_under_the_verify_prefix() {
        let m = crate::metrics::Metrics::new();
        let v = VerifyMetrics::new(&m.registry).unwrap();
        v.users.with_label_values(&["drifted"]).inc();
        let text = m.render();
        assert!(text.contains("segment_sync_verify_users_total{result=\"drifted\"} 1"));
        assert!(text.contains("segment_sync_events_consumed_total"));
        assert!(VerifyMetrics::new(&m.registry).is_err(), "registered once");
    }
}
