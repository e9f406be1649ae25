//! The Confluent wire format: magic byte 0, a big-endian schema id, then the Avro body,
//! with one decode plan per schema id, fetched and compiled on first sight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::avro::Plan;
use super::registry::{RegistryError, SchemaSource};
use super::DecodeError;
use crate::event::Event;

/// Splits a payload into its schema id and Avro body.
pub(crate) fn split(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match payload {
        [0, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [0, ..] => Err(DecodeError::WireFormat(format!(
            "{} bytes, shorter than the 5-byte header",
            payload.len()
        ))),
        [magic, ..] => Err(DecodeError::WireFormat(format!(
            "magic byte {magic}, expected 0"
        ))),
        [] => Err(DecodeError::WireFormat("empty payload".into())),
    }
}

pub(crate) struct Confluent {
    source: Arc<dyn SchemaSource>,
    /// Writer schemas that cannot be resolved are remembered too, so a stream of such
    /// records does not hit the registry once per record; failed fetches are not.
    plans: FxHashMap<u32, Result<Plan, String>>,
    /// Ids the registry said it does not have, until when to believe it: a stream of such
    /// records costs a registry call per id and minute, not a blocking call per record. A
    /// schema registered later is found after the minute.
    unknown: FxHashMap<u32, Instant>,
}

const UNKNOWN_FOR: Duration = Duration::from_secs(60);
/// Distinct unknown ids remembered; past it the memory starts again.
const MAX_UNKNOWN: usize = 4096;

impl Confluent {
    pub(crate) fn new(source: Arc<dyn SchemaSource>) -> Confluent {
        Confluent {
            source,
            plans: FxHashMap::default(),
            unknown: FxHashMap::default(),
        }
    }

    pub(crate) fn decode<'a>(&mut self, payload: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let (id, body) = split(payload)?;
        let plan = match self.plans.get(&id) {
            Some(plan) => plan,
            None => {
                if let Some(until) = self.unknown.get(&id) {
                    if Instant::now() < *until {
                        return Err(DecodeError::UnknownSchema(id));
                    }
                    self.unknown.remove(&id);
                }
                let plan = match self.compile(id) {
                    Err(DecodeError::UnknownSchema(id)) => {
                        if self.unknown.len() >= MAX_UNKNOWN {
                            self.unknown.clear();
                        }
                        self.unknown.insert(id, Instant::now() + UNKNOWN_FOR);
                        return Err(DecodeError::UnknownSchema(id));
                    }
                    other => other?,
                };
                self.plans.entry(id).or_insert(plan)
            }
        };
        match plan {
            Ok(plan) => plan.decode(body).map_err(DecodeError::Avro),
            Err(reason) => Err(DecodeError::Schema {
                id: Some(id),
                reason: reason.clone(),
            }),
        }
    }

    /// `Err` only for a fetch that failed; a schema that cannot be used is an `Ok(Err(..))`.
    fn compile(&self, id: u32) -> Result<Result<Plan, String>, DecodeError> {
        let text = self.source.fetch(id).map_err(|e| match e {
            RegistryError::NotFound(id) => DecodeError::UnknownSchema(id),
            other => DecodeError::Registry(other),
        })?;
        Ok(super::avro::parse_writer(&text).and_then(|schema| Plan::compile(&schema)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::registry::MemoryRegistry;
    use crate::decode::{RegistryClient, SCHEMA};
    use crate::event::{Change, Event};
    use crate::tools::encode;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn event() -> Event<'static> {
        Event {
            event_id: "e1".into(),
            external_id: Some("u1".into()),
            email: None,
            segment_id: "seg_vip_06".into(),
            segment_name: None,
            change: Change::Entered,
            occurred_at: 1,
            sequence: Some(1),
            attributes: vec![],
        }
    }

    /// Fails with `error` for the first `failures` fetches, then serves our schema.
    struct Flaky {
        failures: usize,
        error: RegistryError,
        calls: AtomicUsize,
    }

    impl SchemaSource for Flaky {
        fn fetch(&self, _id: u32) -> Result<String, RegistryError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                Err(self.error.clone())
            } else {
                Ok(SCHEMA.to_string())
            }
        }
    }

    #[test]
    fn header_faults_are_record_errors() {
        let mut c = Confluent::new(Arc::new(MemoryRegistry::new()));
        for payload in [
            &b""[..],
            b"\x00\x00\x01",
            b"\x01\x00\x00\x00\x01abc",
            b"{\"a\":1}",
        ] {
            let err = c.decode(payload).expect_err("bad header");
            assert!(!err.is_retryable(), "{err}");
            assert_eq!(err.class_name(), "segment_sync::decode::WireFormatError");
        }
        let err = c.decode(b"\x07\x00\x00\x00\x01").expect_err("bad magic");
        assert!(err.to_string().contains("magic byte 7"), "{err}");
    }

    #[test]
    fn unknown_schema_id_is_a_record_error() {
        let registry = Arc::new(MemoryRegistry::new());
        let id = registry.register(SCHEMA);
        let mut c = Confluent::new(registry);
        let err = c
            .decode(&encode::to_confluent(id + 1, &event()))
            .expect_err("unknown id");
        assert!(
            matches!(err, DecodeError::UnknownSchema(n) if n == id + 1),
            "{err}"
        );
        assert!(!err.is_retryable());
        assert_eq!(
            c.decode(&encode::to_confluent(id, &event())).ok(),
            Some(event())
        );
    }

    #[test]
    fn an_unknown_schema_id_is_asked_for_once_a_minute_not_once_a_record() {
        struct Counting(AtomicUsize);
        impl SchemaSource for Counting {
            fn fetch(&self, id: u32) -> Result<String, RegistryError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err(RegistryError::NotFound(id))
            }
        }
        let source = Arc::new(Counting(AtomicUsize::new(0)));
        let mut c = Confluent::new(source.clone());
        for _ in 0..100 {
            let err = c
                .decode(&encode::to_confluent(42, &event()))
                .expect_err("unknown");
            assert!(matches!(err, DecodeError::UnknownSchema(42)), "{err}");
        }
        assert_eq!(source.0.load(Ordering::SeqCst), 1);
        for id in 0..MAX_UNKNOWN as u32 * 2 {
            let _ = c.decode(&encode::to_confluent(id, &event()));
        }
        assert!(c.unknown.len() <= MAX_UNKNOWN);
    }

    #[test]
    fn unreachable_registry_is_retryable_and_not_cached() {
        let source = Arc::new(Flaky {
            failures: 2,
            error: RegistryError::Unavailable("connection refused".into()),
            calls: AtomicUsize::new(0),
        });
        let mut c = Confluent::new(source.clone());
        let payload = encode::to_confluent(3, &event());
        for _ in 0..2 {
            let err = c.decode(&payload).expect_err("registry down");
            assert!(err.is_retryable(), "{err}");
        }
        for _ in 0..3 {
            assert_eq!(c.decode(&payload).ok(), Some(event()));
        }
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            3,
            "fetched once it worked"
        );
    }

    #[test]
    fn registry_on_a_closed_port_is_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let mut c = Confluent::new(Arc::new(RegistryClient::new(&url)));
        let err = c
            .decode(&encode::to_confluent(1, &event()))
            .expect_err("nothing listens");
        assert!(err.is_retryable(), "{err}");
        assert_eq!(err.class_name(), "segment_sync::decode::RegistryError");
    }

    #[test]
    fn unresolvable_writer_schema_is_fetched_once() {
        let source = Arc::new(Flaky {
            failures: usize::MAX,
            error: RegistryError::Unavailable(String::new()),
            calls: AtomicUsize::new(0),
        });
        struct Wrong(Arc<Flaky>);
        impl SchemaSource for Wrong {
            fn fetch(&self, _id: u32) -> Result<String, RegistryError> {
                self.0.calls.fetch_add(1, Ordering::SeqCst);
                Ok(r#"{"type":"record","name":"Other","fields":[]}"#.into())
            }
        }
        let mut c = Confluent::new(Arc::new(Wrong(source.clone())));
        for _ in 0..3 {
            let err = c
                .decode(&encode::to_confluent(9, &event()))
                .expect_err("wrong record");
            assert!(!err.is_retryable());
            assert_eq!(
                err.class_name(),
                "segment_sync::decode::SchemaResolutionError"
            );
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }
}
