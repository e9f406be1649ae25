//! Decode throughput on one core, for the targets of docs/design.md ("Performance targets"):
//! `cargo bench --bench decode`. Then each CDP shape's reader on records of the vendor's own
//! size (tests/fixtures/sources), held to at least half the bytes a second of the project's
//! own JSON change.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segment_sync::config::{Format, Shape};
use segment_sync::decode::{Decoder, MemoryRegistry, SCHEMA};
use segment_sync::source::Source;
use segment_sync::tools::generate::{Generator, GeneratorConfig};
use segment_sync::tools::produce::encode_record;
use segment_sync::tools::shapes::source_config;

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
    shapes(&records);
}

/// Bytes a second `source` reads from `payloads` (each record whole, every change taken) in
/// `time`.
fn bytes_per_second(source: &mut Source, payloads: &[Vec<u8>], time: Duration) -> f64 {
    let mut bytes = 0usize;
    let start = Instant::now();
    while start.elapsed() < time {
        for p in payloads {
            if let Ok(read) = source.read(Some(black_box(p))) {
                black_box(&read);
                bytes += p.len();
            }
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

/// The best of several short runs of each, taken in turns: the machine is shared, and a
/// burst of load on one side only would otherwise decide the ratio.
fn best_of_turns(
    a: &mut Source,
    a_payloads: &[Vec<u8>],
    b: &mut Source,
    b_payloads: &[Vec<u8>],
) -> (f64, f64) {
    let (mut best_a, mut best_b) = (0f64, 0f64);
    for _ in 0..6 {
        best_a = best_a.max(bytes_per_second(a, a_payloads, Duration::from_millis(300)));
        best_b = best_b.max(bytes_per_second(b, b_payloads, Duration::from_millis(300)));
    }
    (best_a, best_b)
}

/// A vendor fixture made into many records: the user's id varied, so no two are alike.
fn vendor_records(file: &str, id: &str) -> Vec<Vec<u8>> {
    let path = format!(
        "{}/tests/fixtures/sources/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (0..2000)
        .map(|i| {
            text.replace(id, &format!("crm-{:04}", 1000 + i))
                .into_bytes()
        })
        .collect()
}

fn shapes(records: &[segment_sync::tools::generate::Record]) {
    let mut verdicts = common::Verdicts::default();
    let own: Vec<Vec<u8>> = records
        .iter()
        .take(20_000)
        .map(|r| encode_record(Format::Json, None, r))
        .collect();
    let mut change = Source::new(&source_config(Shape::Change), Format::Json, None).expect("json");
    for (shape, file) in [
        (Shape::AdobeRtcdp, "adobe-rtcdp.json"),
        (Shape::Segment, "segment-identify.json"),
        (Shape::Segment, "segment-track.json"),
        (Shape::Lytics, "lytics.json"),
        (Shape::Debezium, "debezium-envelope.json"),
        (Shape::Debezium, "debezium-flattened.json"),
    ] {
        let payloads = vendor_records(file, "crm-1001");
        let mut source = Source::new(&source_config(shape), Format::Json, None).expect("json");
        assert!(
            source.read(Some(&payloads[0])).is_ok(),
            "{file} reads as {shape:?}"
        );
        let (baseline, rate) = best_of_turns(&mut change, &own, &mut source, &payloads);
        let size = payloads.iter().map(Vec::len).sum::<usize>() / payloads.len();
        println!(
            "{} {file}: {:.0} MB/s (change: {:.0} MB/s)",
            shape.name(),
            rate / 1e6,
            baseline / 1e6
        );
        verdicts.at_least(
            &format!(
                "{} reading {file} ({size} bytes), share of change's bytes/s",
                shape.name()
            ),
            rate / baseline,
            0.5,
            "x",
        );
    }
    verdicts.finish();
}
