//! Dead-letter records and their Kafka Connect headers.
//!
//! A dead-letter record carries the original key, value, timestamp and headers unchanged,
//! so it can be replayed as it was, plus the context headers Kafka Connect writes when
//! `errors.deadletterqueue.context.headers.enable` is set, so that the DLQ tooling operators
//! already run against Connect sinks reads ours too. Connect's conventions are followed to
//! the byte: every value is UTF-8 text (partition and offset in decimal), the context
//! headers come after the original ones, and a record that already carries context headers
//! (one replayed from a DLQ) keeps them, the newest last, as Connect does.
//!
//! Pure: the pipeline produces the record with rdkafka and settles the original offset once
//! the write is acknowledged.

use crate::event::InvalidEvent;

pub const HEADER_TOPIC: &str = "__connect.errors.topic";
pub const HEADER_PARTITION: &str = "__connect.errors.partition";
pub const HEADER_OFFSET: &str = "__connect.errors.offset";
pub const HEADER_CONNECTOR_NAME: &str = "__connect.errors.connector.name";
pub const HEADER_TASK_ID: &str = "__connect.errors.task.id";
pub const HEADER_STAGE: &str = "__connect.errors.stage";
pub const HEADER_EXECUTING_CLASS: &str = "__connect.errors.class.name";
pub const HEADER_EXCEPTION_CLASS: &str = "__connect.errors.exception.class.name";
pub const HEADER_EXCEPTION_MESSAGE: &str = "__connect.errors.exception.message";
pub const HEADER_BRAZE_ERROR_TYPE: &str = "braze.error.type";
pub const HEADER_BRAZE_HTTP_STATUS: &str = "braze.http.status";
/// Present when the dead-letter record lacks the original value (and perhaps key and
/// headers): says why, so nobody mistakes it for a tombstone.
pub const HEADER_VALUE_OMITTED: &str = "segment_sync.value.omitted";
/// On the dead-letter copy of a record holding several changes, some refused by Braze: one
/// line per change of the record, saying whether it settled or why it was refused.
pub const HEADER_REJECTIONS: &str = "segment_sync.rejections";

/// What `__connect.errors.connector.name` says. One name for every worker of the group,
/// as Connect names the connector, not the worker.
pub const CONNECTOR_NAME: &str = "segment-sync";
/// What `__connect.errors.task.id` says. Connect writes a task number; the workers of the
/// group are interchangeable, like the tasks of one connector, and a fixed number keeps
/// the header parseable by tools that expect an integer.
pub const TASK_ID: &str = "0";

/// Longer messages are cut to this many bytes: a Braze error body or a decoder message
/// quoting a payload must not make the dead-letter record larger than the broker accepts.
pub const MAX_MESSAGE_BYTES: usize = 4096;
const ELLIPSIS: &str = "…";

/// The exception class written for records that Braze rejects.
pub const REJECTED_CLASS: &str = "segment_sync::braze::Rejected";
/// The exception class written for events that decode but cannot be applied.
pub const INVALID_CLASS: &str = "segment_sync::event::InvalidEvent";

// Connect's `Stage` names. Decoding is Connect's value converter. A record the sink
// cannot apply, whether invalid or refused by Braze, is what a Connect sink reports
// through its errant-record reporter, which Connect stamps TASK_PUT; TRANSFORMATION would
// send an operator looking for a single message transform that does not exist.
const STAGE_VALUE_CONVERTER: &str = "VALUE_CONVERTER";
const STAGE_TASK_PUT: &str = "TASK_PUT";

// The code that was running, Connect's `__connect.errors.class.name`.
const DECODE_CLASS: &str = "segment_sync::decode";
const EVENT_CLASS: &str = "segment_sync::event";
const BRAZE_CLASS: &str = "segment_sync::braze";

/// The consumed record, as the pipeline borrows it from the Kafka message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp in epoch milliseconds, kept on the dead-letter record as
    /// Connect keeps it, so a DLQ can be replayed or inspected by time.
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// The original headers in order; a header may have no value. Keys are bytes: nothing
    /// makes a producer write UTF-8 keys, and the copy keeps them as they were.
    pub headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

/// The record to write to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp: Option<i64>,
    /// The original headers, then the context headers. Values are optional because Kafka
    /// headers may be null and the original ones are copied as they are.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl DlqRecord {
    /// Makes the record smaller for a topic that refused it as too large: first without its
    /// value, then also without its key and original headers. The Connect headers stay, so
    /// the original can still be found by its coordinates. Returns false when nothing is
    /// left to drop.
    pub fn omit_payload(&mut self, why: &str) -> bool {
        let note = |r: &mut DlqRecord, what: &str| {
            r.headers
                .retain(|(n, _)| n != HEADER_VALUE_OMITTED.as_bytes());
            r.headers.push((
                HEADER_VALUE_OMITTED.into(),
                Some(format!("{what}: {why}").into_bytes()),
            ));
        };
        if self.value.is_some() {
            self.value = None;
            note(self, "value omitted");
            return true;
        }
        let originals = self.headers.iter().any(|(n, _)| !is_context_header(n));
        if self.key.is_some() || originals {
            self.key = None;
            self.headers.retain(|(n, _)| is_context_header(n));
            note(self, "key, value and original headers omitted");
            return true;
        }
        false
    }

    /// The value of the last header named `name`, as Kafka's `Headers::lastHeader` reads it.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name.as_bytes())
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Why a record goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqReason {
    /// The payload could not be decoded. `class_name` is the error type the decoder failed
    /// with (`__connect.errors.exception.class.name`), e.g. `segment_sync::decode::DecodeError`.
    Undecodable {
        class_name: &'static str,
        message: String,
    },
    /// The event decoded but cannot be applied (no identifier, empty segment id).
    Invalid { message: String },
    /// Braze refused the event's attributes object: a per-object error of a 2xx response,
    /// or a 400 for a single object. `error_type` is Braze's `type`.
    Rejected {
        status: u16,
        error_type: String,
        message: String,
    },
}

impl DlqReason {
    /// The `reason` label of the dead-letter metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DlqReason::Undecodable { .. } => "undecodable",
            DlqReason::Invalid { .. } => "invalid",
            DlqReason::Rejected { .. } => "rejected",
        }
    }

    fn stage(&self) -> &'static str {
        match self {
            DlqReason::Undecodable { .. } => STAGE_VALUE_CONVERTER,
            DlqReason::Invalid { .. } | DlqReason::Rejected { .. } => STAGE_TASK_PUT,
        }
    }

    fn executing_class(&self) -> &'static str {
        match self {
            DlqReason::Undecodable { .. } => DECODE_CLASS,
            DlqReason::Invalid { .. } => EVENT_CLASS,
            DlqReason::Rejected { .. } => BRAZE_CLASS,
        }
    }

    fn exception_class(&self) -> &'static str {
        match self {
            DlqReason::Undecodable { class_name, .. } => class_name,
            DlqReason::Invalid { .. } => INVALID_CLASS,
            DlqReason::Rejected { .. } => REJECTED_CLASS,
        }
    }

    fn message(&self) -> &str {
        match self {
            DlqReason::Undecodable { message, .. }
            | DlqReason::Invalid { message }
            | DlqReason::Rejected { message, .. } => message,
        }
    }
}

impl From<&InvalidEvent> for DlqReason {
    fn from(err: &InvalidEvent) -> Self {
        DlqReason::Invalid {
            message: err.to_string(),
        }
    }
}

/// The dead-letter record for `src`: its key, value, timestamp and headers, then the
/// Kafka Connect context headers describing `reason`.
pub fn dead_letter(src: &SourceRecord, reason: &DlqReason) -> DlqRecord {
    let mut headers: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(src.headers.len() + 11);
    headers.extend(
        src.headers
            .iter()
            .map(|(name, value)| (name.to_vec(), value.map(<[u8]>::to_vec))),
    );
    let mut add = |name: &str, value: &str| {
        headers.push((name.into(), Some(value.as_bytes().to_vec())));
    };
    add(HEADER_TOPIC, src.topic);
    add(HEADER_PARTITION, &src.partition.to_string());
    add(HEADER_OFFSET, &src.offset.to_string());
    add(HEADER_CONNECTOR_NAME, CONNECTOR_NAME);
    add(HEADER_TASK_ID, TASK_ID);
    add(HEADER_STAGE, reason.stage());
    add(HEADER_EXECUTING_CLASS, reason.executing_class());
    add(HEADER_EXCEPTION_CLASS, reason.exception_class());
    add(HEADER_EXCEPTION_MESSAGE, &truncate(reason.message()));
    if let DlqReason::Rejected {
        status, error_type, ..
    } = reason
    {
        add(HEADER_BRAZE_ERROR_TYPE, &truncate(error_type));
        add(HEADER_BRAZE_HTTP_STATUS, &status.to_string());
    }
    DlqRecord {
        key: src.key.map(<[u8]>::to_vec),
        value: src.value.map(<[u8]>::to_vec),
        timestamp: src.timestamp,
        headers,
    }
}

/// The headers this module writes, as opposed to the ones copied from the original.
fn is_context_header(name: &[u8]) -> bool {
    name.starts_with(b"__connect.errors.")
        || name == HEADER_BRAZE_ERROR_TYPE.as_bytes()
        || name == HEADER_BRAZE_HTTP_STATUS.as_bytes()
        || name == HEADER_VALUE_OMITTED.as_bytes()
        || name == HEADER_REJECTIONS.as_bytes()
}

/// `text` cut to at most `MAX_MESSAGE_BYTES`, on a character boundary, ending in an
/// ellipsis when cut so that a reader knows the message goes on.
fn truncate(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text.into();
    }
    let mut end = MAX_MESSAGE_BYTES - ELLIPSIS.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_too_large_loses_its_value_then_its_key_and_headers_never_its_coordinates() {
        let reason = DlqReason::Invalid {
            message: "no identifier".into(),
        };
        let mut r = dead_letter(&source(), &reason);
        assert!(r.omit_payload("1200000 bytes over message.max.bytes"));
        assert_eq!(r.value, None);
        assert_eq!(r.key.as_deref(), Some(&b"user-1"[..]));
        assert!(
            r.header("trace").is_some(),
            "original headers kept at first"
        );
        let why = String::from_utf8(r.header(HEADER_VALUE_OMITTED).unwrap().to_vec()).unwrap();
        assert!(why.starts_with("value omitted: 1200000 bytes"), "{why}");
        assert!(r.omit_payload("still too large"));
        assert_eq!(r.key, None);
        assert!(r.header("trace").is_none());
        assert_eq!(r.header(HEADER_OFFSET), Some(&b"123456789012"[..]));
        assert_eq!(r.header(HEADER_TOPIC), Some(&b"cdp.segment-membership"[..]));
        assert_eq!(
            r.headers
                .iter()
                .filter(|(n, _)| n == HEADER_VALUE_OMITTED.as_bytes())
                .count(),
            1
        );
        assert!(!r.omit_payload("nothing left"));
    }

    fn source() -> SourceRecord<'static> {
        SourceRecord {
            topic: "cdp.segment-membership",
            partition: 7,
            offset: 123_456_789_012,
            timestamp: Some(1_700_000_000_123),
            key: Some(b"user-1"),
            value: Some(b"\x00\x00\x00\x00\x01not avro"),
            headers: vec![(b"trace", Some(b"abc")), (b"empty", None)],
        }
    }

    fn text(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<(&str, Option<&str>)> {
        headers
            .iter()
            .map(|(n, v)| {
                let v = v
                    .as_deref()
                    .map(|v| std::str::from_utf8(v).expect("test headers are UTF-8"));
                (
                    std::str::from_utf8(n).expect("test header keys are UTF-8"),
                    v,
                )
            })
            .collect()
    }

    #[test]
    fn undecodable_record_headers() {
        let reason = DlqReason::Undecodable {
            class_name: "segment_sync::decode::DecodeError",
            message: "unknown schema id 1".to_string(),
        };
        let record = dead_letter(&source(), &reason);
        assert_eq!(
            text(&record.headers),
            vec![
                ("trace", Some("abc")),
                ("empty", None),
                ("__connect.errors.topic", Some("cdp.segment-membership")),
                ("__connect.errors.partition", Some("7")),
                ("__connect.errors.offset", Some("123456789012")),
                ("__connect.errors.connector.name", Some("segment-sync")),
                ("__connect.errors.task.id", Some("0")),
                ("__connect.errors.stage", Some("VALUE_CONVERTER")),
                ("__connect.errors.class.name", Some("segment_sync::decode")),
                (
                    "__connect.errors.exception.class.name",
                    Some("segment_sync::decode::DecodeError")
                ),
                (
                    "__connect.errors.exception.message",
                    Some("unknown schema id 1")
                ),
            ]
        );
        assert_eq!(reason.metric_label(), "undecodable");
    }

    #[test]
    fn invalid_event_headers() {
        let reason = DlqReason::from(&InvalidEvent::NoIdentifier);
        let record = dead_letter(&source(), &reason);
        let h = |name| record.header(name);
        assert_eq!(h(HEADER_STAGE), Some(&b"TASK_PUT"[..]));
        assert_eq!(h(HEADER_EXECUTING_CLASS), Some(&b"segment_sync::event"[..]));
        assert_eq!(
            h(HEADER_EXCEPTION_CLASS),
            Some(&b"segment_sync::event::InvalidEvent"[..])
        );
        assert_eq!(
            h(HEADER_EXCEPTION_MESSAGE),
            Some(&b"event has neither external_id nor email"[..])
        );
        assert_eq!(h(HEADER_TOPIC), Some(&b"cdp.segment-membership"[..]));
        assert_eq!(h(HEADER_PARTITION), Some(&b"7"[..]));
        assert_eq!(h(HEADER_OFFSET), Some(&b"123456789012"[..]));
        assert_eq!(h(HEADER_BRAZE_ERROR_TYPE), None);
        assert_eq!(h(HEADER_BRAZE_HTTP_STATUS), None);
        assert_eq!(reason.metric_label(), "invalid");
    }

    #[test]
    fn braze_rejection_headers() {
        let reason = DlqReason::Rejected {
            status: 201,
            error_type: "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
                .to_string(),
            message: "Braze rejected attributes object 3".to_string(),
        };
        let record = dead_letter(&source(), &reason);
        let context: Vec<_> = text(&record.headers).into_iter().skip(2).collect();
        assert_eq!(
            context,
            vec![
                ("__connect.errors.topic", Some("cdp.segment-membership")),
                ("__connect.errors.partition", Some("7")),
                ("__connect.errors.offset", Some("123456789012")),
                ("__connect.errors.connector.name", Some("segment-sync")),
                ("__connect.errors.task.id", Some("0")),
                ("__connect.errors.stage", Some("TASK_PUT")),
                ("__connect.errors.class.name", Some("segment_sync::braze")),
                (
                    "__connect.errors.exception.class.name",
                    Some("segment_sync::braze::Rejected")
                ),
                (
                    "__connect.errors.exception.message",
                    Some("Braze rejected attributes object 3")
                ),
                (
                    "braze.error.type",
                    Some("'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required")
                ),
                ("braze.http.status", Some("201")),
            ]
        );
        assert_eq!(reason.metric_label(), "rejected");
    }

    #[test]
    fn key_value_and_timestamp_are_kept() {
        let record = dead_letter(
            &source(),
            &DlqReason::Invalid {
                message: "x".into(),
            },
        );
        assert_eq!(record.key.as_deref(), Some(&b"user-1"[..]));
        assert_eq!(
            record.value.as_deref(),
            Some(&b"\x00\x00\x00\x00\x01not avro"[..])
        );
        assert_eq!(record.timestamp, Some(1_700_000_000_123));

        let bare = SourceRecord {
            key: None,
            value: None,
            timestamp: None,
            headers: Vec::new(),
            ..source()
        };
        let record = dead_letter(
            &bare,
            &DlqReason::Invalid {
                message: "x".into(),
            },
        );
        assert_eq!(
            (record.key, record.value, record.timestamp),
            (None, None, None)
        );
        assert_eq!(record.headers[0].0, HEADER_TOPIC.as_bytes());
    }

    #[test]
    fn a_replayed_dead_letter_gets_the_new_context_last() {
        let mut src = source();
        src.headers = vec![
            (HEADER_STAGE.as_bytes(), Some(b"VALUE_CONVERTER")),
            (HEADER_OFFSET.as_bytes(), Some(b"1")),
        ];
        let record = dead_letter(
            &src,
            &DlqReason::Invalid {
                message: "x".into(),
            },
        );
        assert_eq!(
            record.headers[0].1.as_deref(),
            Some(&b"VALUE_CONVERTER"[..])
        );
        assert_eq!(record.header(HEADER_STAGE), Some(&b"TASK_PUT"[..]));
        assert_eq!(record.header(HEADER_OFFSET), Some(&b"123456789012"[..]));
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        // 'é' is two bytes, so the cut point falls inside a character.
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let reason = DlqReason::Rejected {
            status: 400,
            error_type: long.clone(),
            message: long.clone(),
        };
        let record = dead_letter(&source(), &reason);
        for name in [HEADER_EXCEPTION_MESSAGE, HEADER_BRAZE_ERROR_TYPE] {
            let value = record.header(name).map(std::str::from_utf8);
            let Some(Ok(value)) = value else {
                panic!("{name} is not UTF-8: {value:?}");
            };
            assert!(value.len() <= MAX_MESSAGE_BYTES, "{name}: {}", value.len());
            assert!(value.len() > MAX_MESSAGE_BYTES - 8, "{name} cut too short");
            assert!(value.ends_with('…'));
            assert!(long.starts_with(value.trim_end_matches('…')));
        }
        let exact = "a".repeat(MAX_MESSAGE_BYTES);
        let record = dead_letter(
            &source(),
            &DlqReason::Invalid {
                message: exact.clone(),
            },
        );
        assert_eq!(
            record.header(HEADER_EXCEPTION_MESSAGE),
            Some(exact.as_bytes())
        );
    }
}
