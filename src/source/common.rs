//! What the shape readers share: identities by JSON Pointer, the audience → segment table,
//! event ids, times.

use std::collections::HashMap;

use crate::config::{Shape, SourceConfig, Unmapped};
use crate::event::{Change, Event};

use super::sparse::{tokens, Json, Paths};
use super::{field_error, owned, SourceError};

/// `[source]` as the readers use it, with each shape's defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// JSON Pointers tried in order for the external_id, then for the email.
    pub(crate) external_id: Vec<String>,
    pub(crate) email: Vec<String>,
    /// The same pointers as tokens, looked up without unescaping them again.
    external_id_tokens: Vec<Vec<String>>,
    email_tokens: Vec<Vec<String>>,
    segments: HashMap<String, String>,
    unmapped: Unmapped,
    pub(crate) user_column: String,
    pub(crate) segment_column: String,
    pub(crate) email_column: Option<String>,
    pub(crate) member_column: Option<String>,
    /// What the shape's reader looks at; everything else is skipped while parsing.
    paths: Paths,
}

impl Settings {
    pub fn from_config(c: &SourceConfig) -> Settings {
        let (id_default, email_default): (&[&str], &[&str]) = match c.shape {
            Shape::Segment => (&["/userId"], &["/traits/email", "/context/traits/email"]),
            Shape::Lytics => (&["/data/user_id"], &["/data/email"]),
            _ => (&[], &[]),
        };
        let pointers = |set: &Option<String>, default: &[&str]| match set {
            Some(p) if p.is_empty() => Vec::new(),
            Some(p) => vec![p.clone()],
            None => default.iter().map(|p| p.to_string()).collect(),
        };
        let external_id = pointers(&c.external_id, id_default);
        let email = pointers(&c.email, email_default);
        let mut paths = Paths::default();
        for p in external_id.iter().chain(&email) {
            paths.want(p);
        }
        match c.shape {
            Shape::Change => {}
            Shape::AdobeRtcdp => {
                paths.want("/segmentMembership");
            }
            Shape::Segment => {
                for p in [
                    "/type",
                    "/event",
                    "/messageId",
                    "/timestamp",
                    "/originalTimestamp",
                    "/receivedAt",
                    "/sentAt",
                    "/properties/audience_key",
                    "/context/personas/computation_class",
                    "/context/personas/computation_key",
                    "/traits",
                    "/context/traits",
                ] {
                    paths.want(p);
                }
            }
            Shape::Lytics => {
                paths.want("/data/segment_events").want("/meta/timestamp");
            }
            Shape::Debezium => {
                let columns = [
                    &c.user_column,
                    &c.segment_column,
                    &c.email_column,
                    &c.member_column,
                ];
                // The flattened row first: its keys are matched against these in order,
                // and a flattened record is small enough for that to show.
                for column in columns.iter().copied().flatten() {
                    paths.want(&format!("/{}", escape(column)));
                }
                for field in [
                    "__op",
                    "__deleted",
                    "__lsn",
                    "__source_ts_ms",
                    "__ts_ms",
                    "__source_ts_us",
                    "__source_ts_ns",
                    "__ts_us",
                    "__ts_ns",
                ] {
                    paths.want(&format!("/{field}"));
                }
                paths.want_presence("/schema");
                for envelope in ["", "/payload"] {
                    for field in [
                        "op",
                        "ts_ms",
                        "source/ts_ms",
                        "source/ts_us",
                        "source/ts_ns",
                        "source/lsn",
                        "source/connector",
                    ] {
                        paths.want(&format!("{envelope}/{field}"));
                    }
                    for row in ["before", "after"] {
                        // A null row is kept as null; a row, as the columns read.
                        paths.want_presence(&format!("{envelope}/{row}"));
                        for column in columns.iter().copied().flatten() {
                            paths.want(&format!("{envelope}/{row}/{}", escape(column)));
                        }
                    }
                }
            }
        }
        Settings {
            external_id_tokens: external_id.iter().map(|p| tokens(p)).collect(),
            email_tokens: email.iter().map(|p| tokens(p)).collect(),
            paths,
            external_id,
            email,
            segments: c
                .segments
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            unmapped: c.unmapped(),
            user_column: c.user_column.clone().unwrap_or_default(),
            segment_column: c.segment_column.clone().unwrap_or_default(),
            email_column: c.email_column.clone(),
            member_column: c.member_column.clone(),
        }
    }

    /// The parts of a record's JSON text the shape reads.
    pub(crate) fn parse<'a>(&self, text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        self.paths.parse(text)
    }

    /// The segment id an audience is written as; `None`: skip it (unmapped).
    pub(crate) fn segment_for<'s>(&'s self, audience: &'s str) -> Option<&'s str> {
        match self.segments.get(audience) {
            Some(to) => Some(to),
            None => match self.unmapped {
                Unmapped::UseId => Some(audience),
                Unmapped::Skip => None,
            },
        }
    }

    /// (external_id, email) from the configured pointers; `None` for each one absent.
    pub(crate) fn identity(&self, doc: &Json<'_>) -> (Option<String>, Option<String>) {
        let first = |pointers: &[Vec<String>]| {
            pointers
                .iter()
                .find_map(|p| doc.at(p).and_then(scalar_text))
                .filter(|s| !s.is_empty())
        };
        (first(&self.external_id_tokens), first(&self.email_tokens))
    }

    /// The error a record without any identity gets, naming where it was looked for.
    pub(crate) fn no_identity(&self, shape: Shape) -> SourceError {
        let list = |p: &[String]| {
            if p.is_empty() {
                "(not set)".to_string()
            } else {
                p.join(" or ")
            }
        };
        field_error(
            shape,
            format!(
                "no identity: neither the external_id at {} (source.external_id) nor the email at {} (source.email) is a non-empty string",
                list(&self.external_id),
                list(&self.email)
            ),
        )
    }
}

/// A column name as one JSON Pointer token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A string, or a number written as text (an id column of integers); nothing else.
pub(crate) fn scalar_text(v: &Json<'_>) -> Option<String> {
    match v {
        Json::Str(s) => Some(s.to_string()),
        Json::Int(n) => Some(n.to_string()),
        Json::Float(n) => Some(n.to_string()),
        _ => None,
    }
}

/// RFC 3339 text or epoch milliseconds → epoch milliseconds.
pub(crate) fn millis(v: &Json<'_>) -> Option<i64> {
    match v {
        Json::Int(n) => Some(*n),
        Json::Str(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis())
            .or_else(|| s.parse::<i64>().ok()),
        _ => None,
    }
}

/// FNV-1a, 64 bits: stable across builds and machines, so a redelivered record gets the
/// same event id in every worker.
fn fnv1a(parts: &[&str], numbers: &[i64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for part in parts {
        eat(part.as_bytes());
    }
    for n in numbers {
        eat(&n.to_le_bytes());
    }
    h
}

/// An event id for a shape that has none of its own: a hash of what makes the change
/// itself, so a redelivered record repeats it exactly and a different change never does.
pub(crate) fn hashed_id(shape: Shape, parts: &[&str], numbers: &[i64]) -> String {
    format!("{}:{:016x}", shape.name(), fnv1a(parts, numbers))
}

/// One change, owned (the CDP shapes are read into a `Value` first).
pub(crate) struct Draft<'d> {
    pub event_id: String,
    pub external_id: &'d Option<String>,
    pub email: &'d Option<String>,
    pub segment_id: &'d str,
    pub segment_name: Option<&'d str>,
    pub change: Change,
    pub occurred_at: i64,
    pub sequence: Option<i64>,
}

impl Draft<'_> {
    pub(crate) fn into_event(self) -> Event<'static> {
        Event {
            event_id: self.event_id.into(),
            external_id: self.external_id.as_deref().map(owned),
            email: self.email.as_deref().map(owned),
            segment_id: owned(self.segment_id),
            segment_name: self.segment_name.map(owned),
            change: self.change,
            occurred_at: self.occurred_at,
            sequence: self.sequence,
            attributes: Vec::new(),
        }
    }
}
