//! Inputs the fuzz targets of `fuzz/` (`make fuzz`) found to crash or hang the worker, each
//! kept as a test of the normal suite so the fix stays.

use std::sync::Arc;

use segment_sync::config::Format;
use segment_sync::decode::{DecodeError, Decoder, MemoryRegistry, SCHEMA};

/// The Confluent wire format: magic byte, schema id, body.
fn confluent(id: u32, body: &[u8]) -> Vec<u8> {
    let mut payload = vec![0];
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(body);
    payload
}

/// `avro` target: apache-avro 0.21 panics (an `unwrap` in `Name::parse`) on a writer schema
/// whose record name is not an Avro name. Served by the registry for an id, it crashed the
/// worker on the first record written with that id, and again on every restart.
#[test]
fn a_writer_schema_with_an_invalid_name_is_the_records_fault_not_a_crash() {
    let registry = Arc::new(MemoryRegistry::new());
    let good = registry.register(SCHEMA);
    let bad_name = registry.register(&SCHEMA.replace(
        "\"SegmentMembershipChange\"",
        "\"SegmentMe=mbershipChange\"",
    ));
    let nested = registry.register(
        r#"{"type":"record","name":"Ok","fields":[
            {"name":"inner","type":{"type":"record","name":"Not a name","fields":[]}}]}"#,
    );
    let mut decoder = Decoder::new(Format::AvroConfluent, Some(registry)).expect("decoder");
    for id in [bad_name, nested] {
        let payload = confluent(id, b"\x02ab");
        let got = decoder.decode(&payload);
        assert!(
            matches!(got, Err(DecodeError::Schema { id: Some(i), .. }) if i == id),
            "{got:?}"
        );
    }
    // The decoder goes on with good records.
    let body = segment_sync::tools::encode::to_avro(&segment_sync::event::Event {
        event_id: "e-1".into(),
        external_id: Some("u-1".into()),
        email: None,
        segment_id: "seg".into(),
        segment_name: None,
        change: segment_sync::event::Change::Entered,
        occurred_at: 1_700_000_000_000,
        sequence: None,
        attributes: Vec::new(),
    });
    let payload = confluent(good, &body);
    let event = decoder.decode(&payload).expect("a good record");
    assert_eq!(event.event_id, "e-1");
}
