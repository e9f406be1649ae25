//! Record payload → `Event`, in the configured format. Decoding borrows strings from the
//! payload and allocates only the attributes, so it can keep up with the consumer.

mod avro;
mod confluent;
mod json;
mod registry;

/// For the shapes read from Avro (`source::Source`): the wire format and a writer schema.
pub(crate) use avro::parse_writer;
pub(crate) use confluent::split;

use std::sync::Arc;

pub use avro::AvroError;
pub use registry::{
    redact_url, MemoryRegistry, RegistryClient, RegistryError, RegistrySetupError, SchemaSource,
};

use crate::config::Format;
use crate::event::Event;

/// The event's Avro schema, `schemas/segment_membership_change.avsc`: the reader schema every
/// writer schema is resolved against, and the schema `encode` writes with.
pub const SCHEMA: &str = include_str!("../../schemas/segment_membership_change.avsc");

/// Entry points for the fuzz targets in `fuzz/`, compiled only with the `fuzzing` feature:
/// the parsers that read what the registry answers, reached without making them public.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// libfuzzer-sys's panic hook aborts on every panic, even one `parse_writer` catches:
    /// apache-avro's are let through to the catch; any other still aborts as a crash.
    pub fn let_apache_avro_panics_be_caught() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let fuzzer_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let in_avro = info
                    .location()
                    .is_some_and(|l| l.file().contains("apache-avro"));
                if !in_avro {
                    fuzzer_hook(info);
                }
            }));
        });
    }

    /// Resolves `schema` as a writer schema against the event's and decodes `body` with it,
    /// as the worker does with what the registry gives for an id.
    pub fn writer_schema_then_body(schema: &str, body: &[u8]) {
        let Ok(writer) = super::avro::parse_writer(schema) else {
            return;
        };
        if let Ok(plan) = super::avro::Plan::compile(&writer) {
            let _ = plan.decode(body);
        }
    }

    /// The registry's answer to `GET /schemas/ids/1`, then the schema it holds, if any.
    pub fn registry_answer(status: u16, text: &str, body: &[u8]) {
        let url = "http://registry.test/schemas/ids/1";
        if let Ok(schema) = super::registry::schema_answer(1, url, status, text) {
            writer_schema_then_body(&schema, body);
        }
    }
}

/// Why a payload did not become an `Event`.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON event: {0}")]
    Json(serde_json::Error),
    #[error("invalid Avro body: {0}")]
    Avro(AvroError),
    #[error("not in the Confluent wire format: {0}")]
    WireFormat(String),
    #[error("schema id {0} is not in the schema registry")]
    UnknownSchema(u32),
    #[error("writer schema{} cannot be resolved against SegmentMembershipChange: {reason}", .id.map(|id| format!(" {id}")).unwrap_or_default())]
    Schema { id: Option<u32>, reason: String },
    #[error("schema registry: {0}")]
    Registry(RegistryError),
    #[error("the avro-confluent format needs a schema registry")]
    NoRegistry,
}

// Each message above names its cause, so none is also a `source()` (see crate::error).
crate::error::from_cause!(DecodeError::Json, serde_json::Error);
crate::error::from_cause!(DecodeError::Avro, AvroError);

impl DecodeError {
    /// True for faults of the environment (registry unreachable, 5xx, misconfigured, a URL
    /// that reaches something else): retry the same record later and never dead-letter it.
    /// False for faults of the record: those go to the dead-letter topic with `to_string()`
    /// as the reason.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DecodeError::Registry(RegistryError::Unavailable(_) | RegistryError::WrongUrl(_))
                | DecodeError::NoRegistry
        )
    }

    /// A short stable name for the DLQ header `__connect.errors.exception.class.name`.
    pub fn class_name(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "segment_sync::decode::JsonError",
            DecodeError::Avro(_) => "segment_sync::decode::AvroError",
            DecodeError::WireFormat(_) => "segment_sync::decode::WireFormatError",
            DecodeError::UnknownSchema(_) => "segment_sync::decode::UnknownSchemaError",
            DecodeError::Schema { .. } => "segment_sync::decode::SchemaResolutionError",
            DecodeError::Registry(_) | DecodeError::NoRegistry => {
                "segment_sync::decode::RegistryError"
            }
        }
    }
}

enum Inner {
    Json,
    Avro(avro::Plan),
    Confluent(confluent::Confluent),
}

/// Decodes payloads of one format. Keep one per consuming thread: it caches the plans of
/// the writer schemas it has seen.
pub struct Decoder {
    inner: Inner,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.inner {
            Inner::Json => "json",
            Inner::Avro(_) => "avro",
            Inner::Confluent(_) => "avro-confluent",
        };
        f.debug_struct("Decoder").field("format", &format).finish()
    }
}

impl Decoder {
    /// `avro-confluent` needs `registry`; the other formats ignore it.
    pub fn new(
        format: Format,
        registry: Option<Arc<dyn SchemaSource>>,
    ) -> Result<Decoder, DecodeError> {
        let inner = match format {
            Format::Json => Inner::Json,
            Format::Avro => Inner::Avro(
                avro::Plan::own().map_err(|reason| DecodeError::Schema { id: None, reason })?,
            ),
            Format::AvroConfluent => Inner::Confluent(confluent::Confluent::new(
                registry.ok_or(DecodeError::NoRegistry)?,
            )),
        };
        Ok(Decoder { inner })
    }

    /// Decodes one payload. Invalid events (no identifier, empty segment_id) decode fine:
    /// `Event::validate` is the caller's check.
    pub fn decode<'a>(&mut self, payload: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        match &mut self.inner {
            Inner::Json => Ok(json::decode(payload)?),
            Inner::Avro(plan) => Ok(plan.decode(payload)?),
            Inner::Confluent(c) => c.decode(payload),
        }
    }
}
