//! docs/design.md, "Performance targets": decode → window → batch encode on one core at
//! ≥ 1,300,000 events/s for JSON and for avro-confluent, with a resident window.
//!
//! Events take the path `pipeline::Worker::take_burst` gives a poll's burst of 64
//! (partition lookup, decode, validate and the window's lookups for the whole burst, then
//! offset tracking and admit in order with the window's lines prefetched ahead, settling what
//! the window drops), and every 512 events
//! the service step runs as in `pipeline::run`: acknowledgements of the previous round
//! settle and complete their users, then up to `max_in_flight` batches are popped and
//! encoded. Only Kafka and HTTP are left out. `cargo bench --bench hot_path`

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segment_sync::config::{Format, MappingConfig, SourceConfig};
use segment_sync::decode::{Decoder, SchemaSource};
use segment_sync::event::Event;
use segment_sync::mapping::{self, Mapping};
use segment_sync::metrics::Metrics;
use segment_sync::offsets::{OffsetTracker, PartitionId, Position};
use segment_sync::source::{Read, Source};
use segment_sync::window::{Admit, Flush, Lookup, Window, WindowConfig, PREFETCH_AHEAD};

use common::{Payloads, Verdicts, PARTITIONS};

const EVENTS: usize = 1_000_000;
const USERS: usize = 100_000;
const ROUNDS: usize = 3;

/// `HOT_PATH_ROUNDS=1` for a profile or an instruction count (valgrind's callgrind, where
/// perf has no hardware counters), which do not need the best of three.
fn rounds() -> usize {
    std::env::var("HOT_PATH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
}
/// `pipeline::run` polls this many records between two service steps, `POLL` at a time.
const BURST: usize = 512;
const POLL: usize = 64;
const MAX_IN_FLIGHT: usize = 8;
const TOPIC: &str = "cdp.segment-membership";

struct Core {
    window: Window<Position>,
    tracker: OffsetTracker,
    /// The worker's seam, record → changes, in the default shape (`change`).
    source: Source,
    mapping: Mapping,
    metrics: Metrics,
    in_flight: Vec<(Flush<Position>, Vec<u32>)>,
    started: Instant,
    offsets: [i64; PARTITIONS as usize],
    objects: u64,
    bytes: u64,
    flush_time: Duration,
}

impl Core {
    fn new(format: Format, registry: Arc<dyn SchemaSource>) -> Core {
        let defaults = segment_sync::config::WindowConfig::default();
        let mut tracker = OffsetTracker::new();
        for p in 0..PARTITIONS {
            tracker.assign(TOPIC, p);
        }
        Core {
            window: Window::new(WindowConfig {
                linger_ms: defaults.linger_ms,
                batch_size: 75,
                max_pending_users: defaults.max_pending_users,
                max_pending_bytes: usize::MAX,
                dedup_memory: defaults.dedup_memory,
                delivered_memory: defaults.delivered_memory,
            }),
            tracker,
            source: Source::new(&SourceConfig::default(), format, Some(registry)).expect("source"),
            mapping: Mapping::new(&MappingConfig::default(), false),
            metrics: Metrics::new(),
            in_flight: Vec::new(),
            started: Instant::now(),
            offsets: [0; PARTITIONS as usize],
            objects: 0,
            bytes: 0,
            flush_time: Duration::ZERO,
        }
    }

    /// One poll's burst, as `pipeline::Worker::take_burst` takes it: every record examined
    /// (partition, decode, validate, what the window will look up), then admitted in order
    /// with the window's lines loaded `PREFETCH_AHEAD` records ahead. `now` is read once a
    /// burst, as `pipeline::run` does.
    fn ingest_burst(&mut self, payloads: &Payloads, burst: std::ops::Range<usize>, now: u64) {
        let mut examined = Vec::with_capacity(burst.len());
        for i in burst {
            let partition = payloads.partitions[i];
            let pid = self
                .tracker
                .partition_id(TOPIC, partition)
                .expect("assigned");
            let Ok(Read::One(event)) = self.source.read(Some(payloads.get(i))) else {
                panic!("a generated valid record did not decode");
            };
            self.metrics.events_decoded.inc();
            let rules = &self.mapping.rules;
            let identity = event
                .validate_with(rules, rules.epoch_ms(now))
                .expect("generated records are valid");
            let lookup = self.window.lookup(&event, identity);
            examined.push((pid, partition, lookup, event));
        }
        for k in 0..examined.len() {
            if let Some((_, _, lookup, event)) = examined.get(k + PREFETCH_AHEAD) {
                self.window.prefetch(lookup, event);
            }
            if let Some((_, _, lookup, _)) = examined.get(k + PREFETCH_AHEAD / 2) {
                self.window.prefetch_key(lookup);
            }
            let (pid, partition, lookup, event) = &examined[k];
            self.admit(*pid, *partition, lookup, event, now);
        }
    }

    fn admit(
        &mut self,
        pid: PartitionId,
        partition: i32,
        lookup: &Lookup,
        event: &Event<'_>,
        now: u64,
    ) {
        self.metrics.events_consumed.inc();
        let offset = self.offsets[partition as usize];
        self.offsets[partition as usize] += 1;
        let Some(pos) = self.tracker.track(pid, offset) else {
            return;
        };
        let identity = event.identity().expect("validated");
        match self
            .window
            .admit_as(lookup, event, identity, partition, offset, pos, now)
        {
            Admit::Pending | Admit::Superseded => {}
            Admit::Duplicate => {
                self.metrics.events_deduplicated.inc();
                self.tracker.settle(pos);
            }
            Admit::Stale => {
                self.metrics.events_stale.inc();
                self.tracker.settle(pos);
            }
        }
    }

    /// Acknowledges the previous round's requests, then flushes what is due.
    fn service(&mut self, force: bool) {
        let t = Instant::now();
        for (flush, points) in std::mem::take(&mut self.in_flight) {
            for (i, user) in flush.users.iter().enumerate() {
                if let Some(ahead) = flush.users.get(i + 4) {
                    self.window.prefetch_user(ahead);
                }
                for p in flush.user_positions(user) {
                    self.tracker.settle(*p);
                }
                self.metrics
                    .braze_attributes_written
                    .inc_by(u64::from(points[i]));
                self.window.complete(&flush, user, false);
            }
        }
        while self.in_flight.len() < MAX_IN_FLIGHT {
            let now = self.started.elapsed().as_millis() as u64;
            let Some(flush) = self.window.pop_batch(now, force) else {
                break;
            };
            for p in &flush.settled_now {
                self.tracker.settle(*p);
            }
            self.metrics.events_redundant.inc_by(flush.redundant as u64);
            if flush.users.is_empty() {
                continue;
            }
            let encoded = mapping::encode(&self.mapping, self.window.segments(), &flush);
            self.objects += encoded.objects.len() as u64;
            self.bytes += encoded.objects.iter().map(|o| o.len() as u64).sum::<u64>();
            black_box(&encoded.objects);
            self.in_flight.push((flush, encoded.data_points));
        }
        self.flush_time += t.elapsed();
    }
}

struct Run {
    rate: f64,
    flush_share: f64,
    objects: u64,
    request_bytes: u64,
    unsettled: usize,
}

// Kept a function of its own, so a profile can count it alone
// (`--toggle-collect='hot_path::run_full'`).
#[inline(never)]
fn run_full(format: Format, registry: &Arc<dyn SchemaSource>, payloads: &Payloads) -> Run {
    let mut core = Core::new(format, registry.clone());
    let start = Instant::now();
    for base in (0..payloads.len()).step_by(BURST) {
        core.service(false);
        let end = (base + BURST).min(payloads.len());
        for poll in (base..end).step_by(POLL) {
            let now = core.started.elapsed().as_millis() as u64;
            core.ingest_burst(payloads, poll..(poll + POLL).min(end), now);
        }
    }
    let elapsed = start.elapsed();
    // Drain outside the measured time: the window's tail waits for its linger in a real run.
    while !core.window.is_empty() || !core.in_flight.is_empty() {
        core.service(true);
    }
    Run {
        rate: payloads.len() as f64 / elapsed.as_secs_f64(),
        flush_share: core.flush_time.as_secs_f64() / elapsed.as_secs_f64(),
        objects: core.objects,
        request_bytes: core.bytes,
        unsettled: core.tracker.unsettled(),
    }
}

fn run_decode_only(format: Format, registry: &Arc<dyn SchemaSource>, payloads: &Payloads) -> f64 {
    let mut decoder = Decoder::new(format, Some(registry.clone())).expect("decoder");
    let start = Instant::now();
    for i in 0..payloads.len() {
        let e = decoder.decode(black_box(payloads.get(i))).expect("decodes");
        black_box(e.validate().is_ok());
    }
    payloads.len() as f64 / start.elapsed().as_secs_f64()
}

fn run_source_only(format: Format, registry: &Arc<dyn SchemaSource>, payloads: &Payloads) -> f64 {
    let mut source =
        Source::new(&SourceConfig::default(), format, Some(registry.clone())).expect("source");
    let start = Instant::now();
    for i in 0..payloads.len() {
        let Ok(Read::One(e)) = source.read(Some(black_box(payloads.get(i)))) else {
            panic!("a generated valid record did not decode");
        };
        black_box(e.validate().is_ok());
    }
    payloads.len() as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let (registry, schema_id) = common::registry();
    let registry: Arc<dyn SchemaSource> = registry;
    let mut verdicts = Verdicts::default();
    for (format, target) in [
        (Format::Json, 1_300_000.0),
        (Format::AvroConfluent, 1_300_000.0),
    ] {
        let t = Instant::now();
        let payloads = common::payloads(format, schema_id, common::stream(USERS, 7), EVENTS);
        println!(
            "{format:?}: {} events over {USERS} users, {} bytes an event (generated in {:.1?})",
            payloads.len(),
            payloads.mean_size(),
            t.elapsed()
        );
        // The decoder alone and through the worker's seam (`Source`, shape `change`), in
        // turns: the seam must cost the hot path nothing.
        let (mut decode, mut through_source) = (0f64, 0f64);
        for _ in 0..rounds() {
            decode = decode.max(run_decode_only(format, &registry, &payloads));
            through_source = through_source.max(run_source_only(format, &registry, &payloads));
        }
        println!(
            "  decode+validate through source::Source: {through_source:.0} events/s ({:.3}x the decoder alone)",
            through_source / decode
        );
        // Best of the rounds: the machine is shared, and noise only ever slows a round down.
        let mut best: Option<Run> = None;
        for _ in 0..rounds() {
            let run = run_full(format, &registry, &payloads);
            assert_eq!(run.unsettled, 0, "every event must settle once drained");
            if best.as_ref().is_none_or(|b| run.rate > b.rate) {
                best = Some(run);
            }
        }
        let best = best.expect("at least one round");
        println!(
            "  decode+validate only: {:.0} events/s ({:.3} µs an event)",
            decode,
            1e6 / decode
        );
        println!(
            "  full hot path: {:.3} µs an event, of which decode {:.3}, window+offsets {:.3}, flush (pop+encode+ack) {:.3}",
            1e6 / best.rate,
            1e6 / decode,
            1e6 / best.rate * (1.0 - best.flush_share) - 1e6 / decode,
            1e6 / best.rate * best.flush_share,
        );
        println!(
            "  {} objects encoded, {} bytes an object",
            best.objects,
            best.request_bytes / best.objects.max(1)
        );
        verdicts.at_least(
            &format!("hot path {format:?}"),
            best.rate,
            target,
            "events/s",
        );
    }
    verdicts.finish();
}
