//! A record's value read as the `segment` shape, then every change's own rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_sync::config::{Format, Shape};
use segment_sync::source::Source;
use segment_sync::tools::shapes::source_config;

fuzz_target!(|data: &[u8]| {
    let mut source =
        Source::new(&source_config(Shape::Segment), Format::Json, None).expect("json source");
    if let Ok(read) = source.read(Some(data)) {
        for event in read.into_events() {
            let _ = event.validate();
        }
    }
});
