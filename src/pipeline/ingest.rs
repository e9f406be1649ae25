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

/// What a record's payload says, before anyone counts or acts on it.
pub enum Read<'a> {
    /// Decoded and valid: `Event::identity` answers.
    Valid(Event<'a>),
    Undecodable(DlqReason),
    /// Decoded but breaking the rules.
    Invalid(DlqReason),
    /// Cannot be decoded now (the schema registry is unreachable).
    Wait(String),
}

/// The one place a record's payload becomes an event, shared by the live path (`Ingest`)
/// and the restore of an assigned partition's history (`restore.rs`), so both read a
/// record alike. `now_epoch_ms` is what `window.max_future_ms` is judged against: the
/// worker's clock for a live record, the record's Kafka timestamp for one read back.
pub fn read_payload<'a>(
    decoder: &mut Decoder,
    rules: &Rules,
    payload: Option<&'a [u8]>,
    now_epoch_ms: i64,
) -> Read<'a> {
    let Some(payload) = payload else {
        return Read::Undecodable(DlqReason::Undecodable {
            class_name: "segment_sync::decode::EmptyValue",
            message: "record has no value (tombstone)".into(),
        });
    };
    let event = match decoder.decode(payload) {
        Ok(e) => e,
        Err(e) if e.is_retryable() => return Read::Wait(e.to_string()),
        Err(e) => {
            return Read::Undecodable(DlqReason::Undecodable {
                class_name: e.class_name(),
                message: e.to_string(),
            })
        }
    };
    match event.validate_with(rules, now_epoch_ms) {
        Ok(_) => Read::Valid(event),
        Err(e) => Read::Invalid(DlqReason::from(&e)),
    }
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
        let now = self.rules.epoch_ms(now_ms);
        match read_payload(&mut self.decoder, &self.rules, payload, now) {
            Read::Valid(event) => {
                self.metrics.events_decoded.inc();
                Verdict::Admit(event)
            }
            Read::Wait(why) => Verdict::Wait(why),
            Read::Undecodable(reason) => {
                self.count_invalid("undecodable");
                Verdict::DeadLetter(reason)
            }
            Read::Invalid(reason) => {
                self.metrics.events_decoded.inc();
                self.count_invalid("invalid");
                Verdict::DeadLetter(reason)
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
