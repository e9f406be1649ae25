//! Decode throughput on one core, for the targets of docs/design.md ("Performance targets"):
//! `cargo bench --bench decode`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segment_sync::config::Format;
use segment_sync::decode::{Decoder, MemoryRegistry, SCHEMA};
use segment_sync::tools::generate::{Generator, GeneratorConfig};
use segment_sync::tools::produce::encode_record;

fn main() {
    let registry = Arc::new(MemoryRegistry::new());
    let id = registry.register(SCHEMA);
    let records: Vec<_> = Generator::new(GeneratorConfig {
        users: 100_000,
        ..GeneratorConfig::default()
    })
    .take(200_000)
    .map(|g| g.record)
    .collect();
    for format in [Format::Json, Format::Avro, Format::AvroConfluent] {
        let payloads: Vec<Vec<u8>> = records
            .iter()
            .map(|r| encode_record(format, Some(id), r))
            .collect();
        let mut decoder = match Decoder::new(format, Some(registry.clone())) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{format:?}: {e}");
                continue;
            }
        };
        let mut decoded = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            for p in &payloads {
                if let Ok(e) = decoder.decode(black_box(p)) {
                    black_box(&e);
                    decoded += 1;
                }
            }
        }
        let rate = decoded as f64 / start.elapsed().as_secs_f64();
        let bytes = payloads.iter().map(Vec::len).sum::<usize>() / payloads.len();
        println!("{format:?}: {rate:>12.0} events/s ({bytes} bytes an event)");
    }
}
