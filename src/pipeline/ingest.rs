//! A consumed record's payload → an event the window can take, a reason to dead-letter it,
//! or a wait for the schema registry.

use std::sync::Arc;

use crate::decode::Decoder;
use crate::dlq::DlqReason;
use crate::event::{Event, Rules};
use crate::metrics::Metrics;

/// What became of a payload.
pub enum Verdict<'a> {
    /// Valid: `Event::identity` answers.
    Admit(Event<'a>),
    DeadLetter(DlqReason),
    /// The record is fine but cannot be decoded now (the registry is unreachable): it must
    /// wait, and so must every record behind it.
    Wait(String),
}

/// Decodes and validates. Promises: sends nothing and keeps no record; a record is
/// dead-lettered only for a fault of its own, never for one of the environment.
pub struct Ingest {
    decoder: Decoder,
    rules: Rules,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(decoder: Decoder, rules: Rules, metrics: Arc<Metrics>) -> Ingest {
        Ingest {
            decoder,
            rules,
            metrics,
        }
    }

    /// `now_ms`: milliseconds since the rules were built, read once per burst.
    pub fn examine<'a>(&mut self, payload: Option<&'a [u8]>, now_ms: u64) -> Verdict<'a> {
        let Some(payload) = payload else {
            self.count_invalid("undecodable");
            return Verdict::DeadLetter(DlqReason::Undecodable {
                class_name: "segment_sync::decode::EmptyValue",
                message: "record has no value (tombstone)".into(),
            });
        };
        let event = match self.decoder.decode(payload) {
            Ok(e) => e,
            Err(e) if e.is_retryable() => return Verdict::Wait(e.to_string()),
            Err(e) => {
                self.count_invalid("undecodable");
                return Verdict::DeadLetter(DlqReason::Undecodable {
                    class_name: e.class_name(),
                    message: e.to_string(),
                });
            }
        };
        self.metrics.events_decoded.inc();
        match event.validate_with(&self.rules, self.rules.epoch_ms(now_ms)) {
            Ok(_) => Verdict::Admit(event),
            Err(e) => {
                self.count_invalid("invalid");
                Verdict::DeadLetter(DlqReason::from(&e))
            }
        }
    }

    fn count_invalid(&self, reason: &str) {
        self.metrics
            .events_invalid
            .with_label_values(&[reason])
            .inc();
    }
}
