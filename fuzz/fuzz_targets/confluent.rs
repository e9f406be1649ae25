//! The Confluent wire format (magic byte, schema id, Avro body) against a registry holding
//! the event's schema and writer schemas that differ from it the ways upstreams do.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use segment_sync::config::Format;
use segment_sync::decode::{Decoder, MemoryRegistry, SCHEMA};

/// Ids 2 to 4: a writer with a field the reader lacks and without an optional one; one with
/// an array of a record without fields (zero bytes an item); one nesting records in a map.
const WRITERS: &[&str] = &[
    r#"{"type":"record","name":"SegmentMembershipChange","namespace":"com.other","fields":[
        {"name":"event_id","type":"string"},
        {"name":"tenant","type":["null","string"],"default":null},
        {"name":"external_id","type":["null","string"],"default":null},
        {"name":"segment_id","type":"string"},
        {"name":"change","type":{"type":"enum","name":"MembershipChange","symbols":["ENTERED","EXITED"]}},
        {"name":"occurred_at","type":"long"},
        {"name":"sequence","type":["null","long"],"default":null}]}"#,
    r#"{"type":"record","name":"SegmentMembershipChange","fields":[
        {"name":"event_id","type":"string"},
        {"name":"empties","type":{"type":"array","items":{"type":"record","name":"E","fields":[]}}},
        {"name":"email","type":["null","string"],"default":null},
        {"name":"segment_id","type":"string"},
        {"name":"change","type":{"type":"enum","name":"MembershipChange","symbols":["ENTERED","EXITED"]}},
        {"name":"occurred_at","type":"long"}]}"#,
    r#"{"type":"record","name":"SegmentMembershipChange","fields":[
        {"name":"event_id","type":"string"},
        {"name":"nested","type":{"type":"map","values":{"type":"record","name":"Node","fields":[
            {"name":"next","type":["null","Node"]},{"name":"tags","type":{"type":"array","items":"bytes"}}]}}},
        {"name":"external_id","type":["null","string"],"default":null},
        {"name":"segment_id","type":"string"},
        {"name":"change","type":{"type":"enum","name":"MembershipChange","symbols":["ENTERED","EXITED"]}},
        {"name":"occurred_at","type":"long"},
        {"name":"attributes","type":["null",{"type":"map","values":["null","string","long","double","boolean"]}],"default":null}]}"#,
];

fuzz_target!(|data: &[u8]| {
    segment_sync::decode::fuzzing::let_apache_avro_panics_be_caught();
    let registry = Arc::new(MemoryRegistry::new());
    registry.register(SCHEMA);
    for w in WRITERS {
        registry.register(w);
    }
    let mut decoder = Decoder::new(Format::AvroConfluent, Some(registry)).expect("decoder");
    if let Ok(event) = decoder.decode(data) {
        let _ = event.validate();
    }
});
