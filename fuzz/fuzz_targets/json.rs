//! A record's value in the JSON format, then the event's own rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_sync::config::Format;
use segment_sync::decode::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(Format::Json, None).expect("json decoder");
    if let Ok(event) = decoder.decode(data) {
        let _ = event.validate();
    }
});
