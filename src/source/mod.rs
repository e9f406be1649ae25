//! Record → changes: the one seam through which everything that reads the topics (the
//! worker's ingest, `replay`, `verify`, the restore on assignment and the backfill fold)
//! turns a record's value into the changes it holds, in the configured `[source] shape`.
//!
//! `change` is this project's own event, decoded in the configured `kafka.format` exactly as
//! before, one change a record without allocating. The CDP shapes (Adobe Real-Time CDP,
//! Twilio Segment, Lytics, Debezium) are JSON documents holding zero or more changes; what
//! a CDP writes beside its audience changes is ignored with a reason, never dead-lettered,
//! and a record of the shape that cannot be read is broken with the field named.
//!
//! Pure apart from the decoder's schema registry (`avro-confluent`, shape `change` only).

mod adobe;
mod avro;
mod common;
mod debezium;
mod lytics;
mod segment;
mod sparse;

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::{Config, Format, Shape, SourceConfig};
use crate::decode::{DecodeError, Decoder, SchemaSource};
use crate::event::Event;

pub use common::Settings;

/// Why a record of the topic holds no change to apply, though nothing is wrong with it: the
/// `reason` label of `segment_sync_events_ignored_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// Something the CDP writes beside audience changes: a Segment `page` call, a track
    /// event that is not an audience event, an Adobe profile without `segmentMembership`.
    OtherKind,
    /// An audience that `[source.segments]` does not name, with `source.unmapped = "skip"`.
    UnmappedAudience,
    /// The empty record Debezium writes after a delete, for log compaction.
    Tombstone,
}

impl Ignored {
    pub const ALL: [Ignored; 3] = [
        Ignored::OtherKind,
        Ignored::UnmappedAudience,
        Ignored::Tombstone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Ignored::OtherKind => "other_kind",
            Ignored::UnmappedAudience => "unmapped_audience",
            Ignored::Tombstone => "tombstone",
        }
    }
}

/// A record of the configured shape that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// Names the field, e.g. `segmentMembership.ups.<id>.status`.
    #[error("{shape} record: {message}")]
    Field {
        shape: &'static str,
        message: String,
    },
    #[error("record has no value (tombstone)")]
    NoValue,
}

impl SourceError {
    /// See [`DecodeError::is_retryable`]: a fault of the environment, not of the record.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Decode(e) if e.is_retryable())
    }

    /// The DLQ header `__connect.errors.exception.class.name`.
    pub fn class_name(&self) -> &'static str {
        match self {
            SourceError::Decode(e) => e.class_name(),
            SourceError::Field { .. } => "segment_sync::source::FieldError",
            SourceError::NoValue => "segment_sync::decode::EmptyValue",
        }
    }
}

/// What one record holds.
#[derive(Debug)]
pub enum Read<'a> {
    /// Exactly one change (every `change` record, and a CDP record with one audience).
    One(Event<'a>),
    /// Several changes of one record; `unmapped` of its audiences were skipped besides.
    Many {
        events: Vec<Event<'a>>,
        unmapped: u32,
    },
    /// No change to apply; settle the record and count it.
    Ignored(Ignored),
}

impl<'a> Read<'a> {
    /// The changes, for callers that do not care how many there are (verify, the fold).
    pub fn into_events(self) -> Vec<Event<'a>> {
        match self {
            Read::One(e) => vec![e],
            Read::Many { events, .. } => events,
            Read::Ignored(_) => Vec::new(),
        }
    }
}

/// The changes a CDP shape found in one record, before they are sorted into a [`Read`].
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub events: Vec<Event<'static>>,
    pub unmapped: u32,
}

impl Found {
    fn into_read<'a>(mut self, empty: Ignored) -> Read<'a> {
        match self.events.len() {
            0 if self.unmapped > 0 => Read::Ignored(Ignored::UnmappedAudience),
            0 => Read::Ignored(empty),
            1 if self.unmapped == 0 => Read::One(self.events.pop().expect("one event")),
            _ => Read::Many {
                events: self.events,
                unmapped: self.unmapped,
            },
        }
    }
}

/// Reads records of one shape. Keep one per consuming thread, like the [`Decoder`] it owns.
pub struct Source {
    shape: Shape,
    decoder: Decoder,
    settings: Arc<Settings>,
    /// Debezium through `avro-confluent`: the writer schemas by id.
    avro: Option<avro::AvroValues>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("shape", &self.shape.name())
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl Source {
    /// The configured shape and format; `registry` as for [`Decoder::new`].
    pub fn from_config(
        cfg: &Config,
        registry: Option<Arc<dyn SchemaSource>>,
    ) -> Result<Source, DecodeError> {
        Source::new(&cfg.source, cfg.kafka.format, registry)
    }

    pub fn new(
        source: &SourceConfig,
        format: Format,
        registry: Option<Arc<dyn SchemaSource>>,
    ) -> Result<Source, DecodeError> {
        let avro = match (source.shape, format, &registry) {
            (Shape::Debezium, Format::AvroConfluent, Some(r)) => {
                Some(avro::AvroValues::new(r.clone()))
            }
            _ => None,
        };
        Ok(Source {
            shape: source.shape,
            decoder: Decoder::new(format, registry)?,
            settings: Arc::new(Settings::from_config(source)),
            avro,
        })
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// One record's value (`None`: a record without one) → its changes. Each change is
    /// ordered by `window::Order::of(event, partition, offset)` with the record's
    /// coordinates, like every other change: the changes of one record share them.
    /// Inlined: for `change` this is the decoder's call on the worker's hot path.
    #[inline]
    pub fn read<'a>(&mut self, value: Option<&'a [u8]>) -> Result<Read<'a>, SourceError> {
        if self.shape == Shape::Change {
            let value = value.ok_or(SourceError::NoValue)?;
            return Ok(Read::One(self.decoder.decode(value)?));
        }
        if let Some(avro) = &mut self.avro {
            let Some(value) = value else {
                return Ok(Read::Ignored(Ignored::Tombstone));
            };
            let doc = avro.read(value)?;
            return Ok(match debezium::read(&self.settings, &doc)? {
                Some(found) => found.into_read(Ignored::OtherKind),
                None => Read::Ignored(Ignored::Tombstone),
            });
        }
        read_shape(self.shape, &self.settings, value)
    }
}

/// A CDP shape's reader on its own (no decoder: the CDP shapes are JSON), for the fuzz
/// targets and the benches.
pub fn read_shape<'a>(
    shape: Shape,
    settings: &Settings,
    value: Option<&[u8]>,
) -> Result<Read<'a>, SourceError> {
    let Some(value) = value else {
        return match shape {
            Shape::Debezium => Ok(Read::Ignored(Ignored::Tombstone)),
            _ => Err(SourceError::NoValue),
        };
    };
    // Checked for UTF-8 once, whole, as the change decoder does: cheaper than string by string.
    let text = std::str::from_utf8(value)
        .map_err(|e| DecodeError::Json(<serde_json::Error as serde::de::Error>::custom(e)))?;
    let doc = settings.parse(text).map_err(DecodeError::Json)?;
    let (found, empty) = match shape {
        Shape::Change => unreachable!("the change shape is decoded, not read"),
        Shape::AdobeRtcdp => (adobe::read(settings, &doc)?, Ignored::OtherKind),
        Shape::Segment => (segment::read(settings, &doc)?, Ignored::OtherKind),
        Shape::Lytics => (lytics::read(settings, &doc)?, Ignored::OtherKind),
        Shape::Debezium => match debezium::read(settings, &doc)? {
            Some(found) => (found, Ignored::OtherKind),
            None => return Ok(Read::Ignored(Ignored::Tombstone)),
        },
    };
    Ok(found.into_read(empty))
}

pub(crate) fn field_error(shape: Shape, message: impl Into<String>) -> SourceError {
    SourceError::Field {
        shape: shape.name(),
        message: message.into(),
    }
}

pub(crate) fn owned(s: &str) -> Cow<'static, str> {
    Cow::Owned(s.to_string())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod variants;
