//! A consumed record's payload → the changes the window can take, a reason to dead-letter
//! it, a reason to ignore it, or a wait for the schema registry.

use std::sync::Arc;

use crate::dlq::DlqReason;
use crate::event::{Event, Rules};
use crate::metrics::Metrics;
use crate::source::{Ignored, Read, Source, SourceError};

/// What became of a payload.
pub enum Verdict<'a> {
    /// Valid: `Event::identity` answers.
    Admit(Event<'a>),
    /// A record holding several changes, every one valid.
    AdmitMany(Vec<Event<'a>>),
    /// Nothing to apply (counted already): settle it.
    Ignore,
    DeadLetter(DlqReason),
    /// The record is fine but cannot be decoded now (the registry is unreachable): it must
    /// wait, and so must every record behind it.
    Wait(String),
}

/// What a record read back by the restore holds: its valid events, through the same
/// `Source` and `Rules` as the live path, so the restore reads a record as `Ingest` did.
/// Empty for a record that was dead-lettered or ignored when it was read live (a record with
/// several changes is dead-lettered whole when one is invalid). `Err` when it must wait
/// (the schema registry is unreachable). `at_epoch_ms` is what `window.max_future_ms` is
/// judged against: the record's Kafka timestamp, not today's clock.
pub fn restore_read<'a>(
    source: &mut Source,
    rules: &Rules,
    payload: Option<&'a [u8]>,
    at_epoch_ms: i64,
) -> Result<Vec<Event<'a>>, String> {
    let events = match source.read(payload) {
        Ok(Read::One(event)) => vec![event],
        Ok(Read::Many { events, .. }) => events,
        Ok(Read::Ignored(_)) => Vec::new(),
        Err(e) if e.is_retryable() => return Err(e.to_string()),
        Err(_) => Vec::new(),
    };
    if events
        .iter()
        .any(|e| e.validate_with(rules, at_epoch_ms).is_err())
    {
        return Ok(Vec::new());
    }
    Ok(events)
}

/// Reads and validates. Promises: sends nothing and keeps no record; a record is
/// dead-lettered only for a fault of its own, never for one of the environment; a record
/// with several changes is dead-lettered whole when one of them is invalid.
pub struct Ingest {
    source: Source,
    rules: Rules,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(source: Source, rules: Rules, metrics: Arc<Metrics>) -> Ingest {
        Ingest {
            source,
            rules,
            metrics,
        }
    }

    /// `now_ms`: milliseconds since the rules were built, read once per burst.
    pub fn examine<'a>(&mut self, payload: Option<&'a [u8]>, now_ms: u64) -> Verdict<'a> {
        let read = match self.source.read(payload) {
            Ok(read) => read,
            Err(e) if e.is_retryable() => return Verdict::Wait(e.to_string()),
            Err(e) => return self.undecodable(&e),
        };
        let now = self.rules.epoch_ms(now_ms);
        match read {
            Read::One(event) => {
                self.metrics.events_decoded.inc();
                match event.validate_with(&self.rules, now) {
                    Ok(_) => Verdict::Admit(event),
                    Err(e) => {
                        self.count_invalid("invalid");
                        Verdict::DeadLetter(DlqReason::from(&e))
                    }
                }
            }
            Read::Many { events, unmapped } => {
                self.metrics.events_decoded.inc();
                let n = events.len();
                for (i, event) in events.iter().enumerate() {
                    if let Err(e) = event.validate_with(&self.rules, now) {
                        self.count_invalid("invalid");
                        return Verdict::DeadLetter(DlqReason::Invalid {
                            message: format!(
                                "change {} of {n} (segment {:?}): {e}",
                                i + 1,
                                event.segment_id
                            ),
                        });
                    }
                }
                self.ignored(Ignored::UnmappedAudience, u64::from(unmapped));
                Verdict::AdmitMany(events)
            }
            Read::Ignored(why) => {
                self.ignored(why, 1);
                Verdict::Ignore
            }
        }
    }

    fn undecodable<'a>(&self, e: &SourceError) -> Verdict<'a> {
        self.count_invalid("undecodable");
        Verdict::DeadLetter(DlqReason::Undecodable {
            class_name: e.class_name(),
            message: e.to_string(),
        })
    }

    fn ignored(&self, why: Ignored, n: u64) {
        if n > 0 {
            self.metrics
                .events_ignored
                .with_label_values(&[why.label()])
                .inc_by(n);
        }
    }

    fn count_invalid(&self, reason: &str) {
        self.metrics
            .events_invalid
            .with_label_values(&[reason])
            .inc();
    }
}
