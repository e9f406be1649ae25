//! `--repair`: the log's state for drifted users, sent through the worker's own delivery
//! path: the window batches the changes into objects of at most `braze.batch_size` users,
//! the mapping encodes them, the Braze client sends them (pacing, retries, splitting), and
//! what Braze rejects has its deciding records written to the dead-letter topic with the
//! same headers the worker writes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::braze::{BrazeClient, ObjectOutcome, Rejection};
use crate::config::Config;
use crate::dlq::reread::Fetcher;
use crate::dlq::{DlqOutcome, DlqWriter, PendingDlq};
use crate::event::{Change, Event, Identity};
use crate::mapping::{self, Mapping};
use crate::window::{Window, WindowConfig};

use super::state::Coord;
use super::VerifyError;

/// How long dead-letter writes of rejected repairs may take before the run says so.
const DEAD_LETTER_DEADLINE: Duration = Duration::from_secs(60);

/// One user to repair: the changes to write, and the records that decided them (none for a
/// membership the log never wrote).
#[derive(Debug, Clone, PartialEq)]
pub struct RepairUser {
    pub external_id: String,
    pub changes: Vec<(String, Change)>,
    pub deciding: Vec<Coord>,
}

/// Where the repair goes.
pub enum Sink<'a> {
    Braze(&'a BrazeClient),
    /// `--dry-run`: each request is written as NDJSON, nothing is sent.
    DryRun(&'a mut (dyn Write + Send)),
}

/// What became of the users: those Braze took, and those it rejected.
#[derive(Debug, Default)]
pub struct Repaired {
    pub delivered: Vec<usize>,
    pub rejected: Vec<(usize, Rejection)>,
}

/// Sends the users' changes; returns, by index into `users`, what became of each.
pub fn send(
    cfg: &Config,
    users: &[RepairUser],
    mut sink: Sink<'_>,
    rt: &tokio::runtime::Handle,
) -> Result<Repaired, VerifyError> {
    let changes: usize = users.iter().map(|u| u.changes.len()).sum();
    let mut window: Window<usize> = Window::new(WindowConfig {
        linger_ms: 0,
        batch_size: cfg.braze.batch_size,
        max_pending_users: users.len() + 1,
        dedup_memory: changes + 1,
        delivered_memory: 1,
        max_pending_bytes: usize::MAX,
    });
    let mapping = Mapping::from_config(cfg);
    let mut n = 0i64;
    for (i, user) in users.iter().enumerate() {
        for (segment, change) in &user.changes {
            let event = Event {
                event_id: format!("verify-repair-{n}").into(),
                external_id: Some(user.external_id.as_str().into()),
                email: None,
                segment_id: segment.as_str().into(),
                segment_name: None,
                change: *change,
                occurred_at: 0,
                sequence: None,
                attributes: Vec::new(),
            };
            window.admit(&event, Identity::ExternalId(&user.external_id), 0, n, i, 0);
            n += 1;
        }
    }
    let mut repaired = Repaired::default();
    while let Some(flush) = window.pop_batch(0, true) {
        if flush.users.is_empty() {
            continue;
        }
        let encoded = mapping::encode(&mapping, window.segments(), &flush);
        let outcomes = match &mut sink {
            Sink::Braze(client) => rt.block_on(client.deliver(encoded.objects)),
            Sink::DryRun(out) => {
                let mut line = b"{\"attributes\":[".to_vec();
                for (k, o) in encoded.objects.iter().enumerate() {
                    if k > 0 {
                        line.push(b',');
                    }
                    line.extend_from_slice(o);
                }
                line.extend_from_slice(b"]}\n");
                out.write_all(&line).map_err(VerifyError::Output)?;
                vec![ObjectOutcome::Delivered; flush.users.len()]
            }
        };
        for (k, user) in flush.users.iter().enumerate() {
            let Some(&i) = flush.user_positions(user).first() else {
                continue;
            };
            match outcomes.get(k) {
                Some(ObjectOutcome::Rejected(r)) => {
                    window.complete(&flush, user, true);
                    repaired.rejected.push((i, r.clone()));
                }
                _ => {
                    window.complete(&flush, user, false);
                    repaired.delivered.push(i);
                }
            }
        }
    }
    Ok(repaired)
}

/// The offsets of one partition to dead-letter, with Braze's reason.
type Rejected = Vec<(i64, Rejection)>;

/// Writes the deciding records of rejected users to the dead-letter topic, as the worker
/// does for a rejection: the original key, value and headers read back from the log, and
/// Connect's headers with Braze's error. Returns how many were acknowledged.
pub fn dead_letter_rejected(
    cfg: &Config,
    rejected: &[(&RepairUser, Rejection)],
    stop: &AtomicBool,
) -> Result<usize, VerifyError> {
    let mut by_partition: BTreeMap<(Arc<str>, i32), Rejected> = BTreeMap::new();
    for (user, rejection) in rejected {
        for at in &user.deciding {
            by_partition
                .entry((at.topic.clone(), at.partition))
                .or_default()
                .push((at.offset, rejection.clone()));
        }
    }
    if by_partition.is_empty() {
        return Ok(0);
    }
    let (tx, rx) = channel();
    let tx = std::sync::Mutex::new(tx);
    let writer = DlqWriter::new(
        cfg,
        Box::new(move |outcome| {
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(outcome);
        }),
    )?;
    let fetcher =
        Fetcher::new(cfg, &format!("{}.verify", cfg.kafka.group_id)).map_err(|error| {
            VerifyError::Kafka {
                context: "creating the re-reader",
                error,
            }
        })?;
    let mut queued = 0usize;
    for ((topic, partition), records) in &by_partition {
        let offsets: Vec<i64> = records.iter().map(|(o, _)| *o).collect();
        let Some(found) = fetcher.fetch_all(topic, *partition, &offsets, stop) else {
            return Err(VerifyError::Stopped);
        };
        let mut seen: HashMap<i64, ()> = HashMap::new();
        for (offset, rejection) in records {
            if seen.insert(*offset, ()).is_some() {
                continue;
            }
            let pending = crate::dlq::reread::rejected_record(
                topic,
                *partition,
                *offset,
                rejection,
                found.get(offset),
            );
            queue(&writer, pending)?;
            queued += 1;
        }
    }
    let deadline = Instant::now() + DEAD_LETTER_DEADLINE;
    let mut written = 0usize;
    while written < queued {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(DlqOutcome::Written(_)) => written += 1,
            Ok(DlqOutcome::Shrunk(p)) => queue(&writer, p)?,
            Ok(DlqOutcome::Failed(p, why)) => {
                tracing::warn!(%why, "dead-letter write failed; writing it again");
                std::thread::sleep(Duration::from_millis(200));
                queue(&writer, p)?;
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => return Err(VerifyError::DeadLetters { written, queued }),
        }
    }
    Ok(written)
}

fn queue(writer: &DlqWriter, pending: Box<PendingDlq>) -> Result<(), VerifyError> {
    let mut pending = pending;
    let deadline = Instant::now() + DEAD_LETTER_DEADLINE;
    while let Err(p) = writer.send(pending) {
        if Instant::now() >= deadline {
            return Err(VerifyError::DeadLetters {
                written: 0,
                queued: 1,
            });
        }
        pending = p;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn a_dry_run_writes_one_object_per_user_in_requests_of_batch_size() {
        let mut cfg = Config::default();
        cfg.braze.batch_size = 2;
        cfg.mapping.attribute_prefix = "cdp_".into();
        let users: Vec<RepairUser> = (0..3)
            .map(|i| RepairUser {
                external_id: format!("u{i}"),
                changes: vec![("a".into(), Change::Entered), ("x".into(), Change::Exited)],
                deciding: Vec::new(),
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out: Vec<u8> = Vec::new();
        let done = send(&cfg, &users, Sink::DryRun(&mut out), rt.handle()).unwrap();
        assert_eq!(done.delivered.len(), 3);
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "3 users in requests of 2");
        assert_eq!(
            lines[0]["attributes"][0],
            json!({"external_id": "u0", "_update_existing_only": false, "cdp_a": true, "cdp_x": false})
        );
        assert_eq!(lines[1]["attributes"].as_array().unwrap().len(), 1);
    }
}
