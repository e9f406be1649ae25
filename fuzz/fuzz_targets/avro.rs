//! Plain Avro: a body written with the event's schema (first byte even), or a writer schema
//! and a body separated by a NUL (first byte odd), resolved against the event's schema as a
//! schema from the registry is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_sync::config::Format;
use segment_sync::decode::{fuzzing, Decoder};

fuzz_target!(|data: &[u8]| {
    segment_sync::decode::fuzzing::let_apache_avro_panics_be_caught();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut decoder = Decoder::new(Format::Avro, None).expect("avro decoder");
        if let Ok(event) = decoder.decode(rest) {
            let _ = event.validate();
        }
        return;
    }
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    if let Ok(schema) = std::str::from_utf8(&rest[..split]) {
        fuzzing::writer_schema_then_body(schema, rest.get(split + 1..).unwrap_or_default());
    }
});
