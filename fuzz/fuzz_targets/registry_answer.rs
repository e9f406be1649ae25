//! The schema registry's answer to `GET /schemas/ids/{id}`: a status (two bytes), the body
//! up to a NUL, then a record body decoded with whatever schema the answer gave.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_sync::decode::fuzzing;

fuzz_target!(|data: &[u8]| {
    segment_sync::decode::fuzzing::let_apache_avro_panics_be_caught();
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    let rest = &data[2..];
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    if let Ok(text) = std::str::from_utf8(&rest[..split]) {
        fuzzing::registry_answer(status, text, rest.get(split + 1..).unwrap_or_default());
    }
});
