//! `segment-sync verify`: reads users back from Braze and compares them with the log's last
//! writes. Exit 0 in sync, 3 when drift was found.
//!
//! The pure parts: which users are checked (`sample`), the log's last write per user
//! (`state`), a profile judged against it (`compare`), what is reported (`report`). The I/O:
//! the topics read by assignment (`log`), Braze's export endpoint (`export`), the repair
//! through the worker's delivery path (`repair`), and the run that ties them (`run`).
//!
//! A change still on its way is not drift: a user found to differ is checked again once the
//! live group has committed past the records that decided it, with the log read on to its
//! new end; only a difference that persists, with no newer record of the user meanwhile,
//! is reported.

mod compare;
mod export;
mod log;
mod metrics;
mod repair;
mod report;
mod run;
mod sample;
mod state;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;

pub use compare::{Difference, Judge, Judgement, Outcome};
pub use export::{parse_answer, ExportClient, ExportError, Exported, MAX_IDS};
pub use metrics::{VerifyMetrics, RESULTS};
pub use report::{RepairSummary, Status, Summary, UserLine, EXIT_DRIFT, EXIT_INCOMPLETE};
pub use run::{command, run};
pub use sample::{user_hash, Sample, SampleError};
pub use state::{Coord, Last, LogState, Names, UserState};

use crate::start::StartAt;

/// `segment-sync verify`'s options beside `--config`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// `earliest`, or an RFC 3339 time: where reading the topics starts. Segment attributes
    /// the log does not name for a user are judged only when reading from the earliest
    /// record.
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// Check one user in N, chosen by a hash of the user (the same users every run): `1/100`.
    #[arg(long, conflicts_with = "users")]
    pub sample: Option<String>,
    /// Check only the users in this file: one external_id a line.
    #[arg(long)]
    pub users: Option<PathBuf>,
    /// Send the log's state for the drifted users through the worker's delivery path, then
    /// check them again.
    #[arg(long)]
    pub repair: bool,
    /// With --repair: write the requests it would send as NDJSON on stdout instead.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for the live group to commit past a differing user's last writes
    /// before reporting the user as still changing.
    #[arg(long, default_value_t = 300)]
    pub settle_timeout_secs: u64,
    /// Serve /metrics (the segment_sync_verify_* figures) on server.listen while verifying.
    #[arg(long)]
    pub metrics: bool,
}

/// What a run does, from the command line or a test.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// `Earliest` or `Timestamp`.
    pub start: StartAt,
    pub sample: Sample,
    pub repair: bool,
    pub dry_run: bool,
    pub settle_timeout: Duration,
    /// Set to stop: the run ends with what it has, as incomplete.
    pub stop: Arc<AtomicBool>,
}

impl VerifyOptions {
    /// Every user, from the earliest record, no repair.
    pub fn new(stop: Arc<AtomicBool>) -> VerifyOptions {
        VerifyOptions {
            start: StartAt::Earliest,
            sample: Sample::All,
            repair: false,
            dry_run: false,
            settle_timeout: Duration::from_secs(300),
            stop,
        }
    }
}

impl VerifyArgs {
    pub fn options(&self, stop: Arc<AtomicBool>) -> Result<VerifyOptions, VerifyError> {
        let start = match crate::replay::parse_from(&self.from)
            .map_err(|e| VerifyError::Args(e.to_string()))?
        {
            s @ (StartAt::Earliest | StartAt::Timestamp(_)) => s,
            _ => {
                return Err(VerifyError::Args(format!(
                    "--from {:?}: verify reads every partition, so --from takes `earliest` or an RFC 3339 time",
                    self.from
                )))
            }
        };
        let sample = match (&self.sample, &self.users) {
            (Some(fraction), _) => Sample::parse_fraction(fraction)?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| SampleError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                Sample::parse_list(&text)
            }
            (None, None) => Sample::All,
        };
        Ok(VerifyOptions {
            start,
            sample,
            repair: self.repair,
            dry_run: self.dry_run,
            settle_timeout: Duration::from_secs(self.settle_timeout_secs),
            stop,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error("kafka: {context}: {error}")]
    Kafka {
        context: &'static str,
        error: KafkaError,
    },
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
    #[error("decoder: {0}")]
    Decode(crate::decode::DecodeError),
    #[error("braze client: {0}")]
    Braze(crate::braze::BrazeError),
    #[error("braze export: {0}")]
    Export(ExportError),
    #[error("dead-letter producer: {0}")]
    Dlq(crate::dlq::DlqWriterError),
    #[error(
        "only {written} of {queued} dead-letter records of rejected repairs were acknowledged"
    )]
    DeadLetters { written: usize, queued: usize },
    #[error("writing the report: {0}")]
    Output(std::io::Error),
    #[error("metrics: {0}")]
    Metrics(prometheus::Error),
    #[error("server.listen = {listen:?}: cannot listen: {error}")]
    Listen {
        listen: String,
        error: std::io::Error,
    },
    #[error("the verify thread ended without an answer")]
    Thread,
    /// Stopped (SIGTERM); the run reports what it has.
    #[error("stopped")]
    Stopped,
}

// Each message above names its cause, so none is also a `source()` (see crate::error).
crate::error::from_cause!(VerifyError::Decode, crate::decode::DecodeError);
crate::error::from_cause!(VerifyError::Braze, crate::braze::BrazeError);
crate::error::from_cause!(VerifyError::Export, ExportError);
crate::error::from_cause!(VerifyError::Dlq, crate::dlq::DlqWriterError);
crate::error::from_cause!(VerifyError::Metrics, prometheus::Error);

#[cfg(test)]
mod tests {
    use super::*;

    fn args(from: &str) -> VerifyArgs {
        VerifyArgs {
            from: from.into(),
            sample: None,
            users: None,
            repair: false,
            dry_run: false,
            settle_timeout_secs: 1,
            metrics: false,
        }
    }

    #[test]
    fn from_takes_earliest_or_a_time_not_offsets() {
        let stop = Arc::new(AtomicBool::new(false));
        assert_eq!(
            args("earliest").options(stop.clone()).unwrap().start,
            StartAt::Earliest
        );
        assert!(matches!(
            args("2025-01-01T00:00:00Z")
                .options(stop.clone())
                .unwrap()
                .start,
            StartAt::Timestamp(_)
        ));
        let e = args("0:10").options(stop).unwrap_err().to_string();
        assert!(e.contains("earliest") && e.contains("RFC 3339"), "{e}");
    }

    #[test]
    fn users_come_from_a_file_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.txt");
        std::fs::write(&path, "u1\nu2\n").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut a = args("earliest");
        a.users = Some(path.clone());
        assert!(a.options(stop.clone()).unwrap().sample.includes("u2"));
        a.users = Some(dir.path().join("nope.txt"));
        let e = a.options(stop).unwrap_err().to_string();
        assert!(e.contains("nope.txt"), "{e}");
    }
}
