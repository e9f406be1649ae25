//! Debezium records through `avro-confluent`: the Confluent wire format's schema id, the
//! writer schema from the registry, the body decoded as a generic Avro value and turned into
//! the same JSON-like value the JSON form reads into, so one reader serves both.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;

use crate::decode::{parse_writer, split, DecodeError, RegistryError, SchemaSource};

use super::sparse::Json;

/// Writer schemas by id, fetched on first sight. Promises: a registry that cannot answer is
/// a retryable error, never a broken record.
pub(crate) struct AvroValues {
    source: Arc<dyn SchemaSource>,
    schemas: HashMap<u32, Result<Schema, String>>,
}

impl AvroValues {
    pub(crate) fn new(source: Arc<dyn SchemaSource>) -> AvroValues {
        AvroValues {
            source,
            schemas: HashMap::new(),
        }
    }

    pub(crate) fn read(&mut self, payload: &[u8]) -> Result<Json<'static>, DecodeError> {
        let (id, body) = split(payload)?;
        if !self.schemas.contains_key(&id) {
            let text = self.source.fetch(id).map_err(|e| match e {
                RegistryError::NotFound(id) => DecodeError::UnknownSchema(id),
                other => DecodeError::Registry(other),
            })?;
            self.schemas.insert(id, parse_writer(&text));
        }
        let schema = match &self.schemas[&id] {
            Ok(schema) => schema,
            Err(reason) => {
                return Err(DecodeError::Schema {
                    id: Some(id),
                    reason: reason.clone(),
                })
            }
        };
        let mut reader = body;
        // apache-avro may panic on a body its schema does not describe; that is the
        // record's fault, not the worker's.
        let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            apache_avro::from_avro_datum(schema, &mut reader, None)
        }))
        .map_err(|_| DecodeError::WireFormat("the Avro body does not decode".into()))?
        .map_err(|e| DecodeError::WireFormat(format!("the Avro body does not decode: {e}")))?;
        Ok(json_of(value))
    }
}

fn json_of(v: Avro) -> Json<'static> {
    match v {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(b),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => Json::Int(i64::from(n)),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n) => Json::Int(n),
        Avro::Float(x) => Json::Float(f64::from(x)),
        Avro::Double(x) => Json::Float(x),
        Avro::String(s) | Avro::Enum(_, s) => Json::Str(Cow::Owned(s)),
        Avro::Uuid(u) => Json::Str(Cow::Owned(u.to_string())),
        Avro::Union(_, inner) => json_of(*inner),
        Avro::Array(items) => Json::Arr(items.into_iter().map(json_of).collect()),
        Avro::Map(m) => Json::Obj(
            m.into_iter()
                .map(|(k, v)| (Cow::Owned(k), json_of(v)))
                .collect(),
        ),
        Avro::Record(fields) => Json::Obj(
            fields
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k), json_of(v)))
                .collect(),
        ),
        // Bytes, fixed, decimals, durations: never an identity, a segment or a time here.
        _ => Json::Null,
    }
}
