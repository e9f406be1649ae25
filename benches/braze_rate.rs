//! docs/design.md: Against a rate limit of R requests/s, one worker keeps ≥ 90% of R busy with
//! < 1% of requests answered 429, two workers sharing the limit ≥ 85% together.
//!
//! The Braze simulator enforces R with Braze's fixed windows and headers and answers after
//! some latency; each worker is one `BrazeClient` configured with `requests_per_second = R`
//! (a worker does not know how many share the limit), driven by `max_in_flight` callers that
//! each send 75-object requests back to back, as the pipeline's request tasks do when the
//! window has more users than Braze can take. The share of R is counted by the simulator
//! over whole seconds after a warm-up.
//! `cargo bench --bench braze_rate`

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use segment_sync::braze::BrazeClient;
use segment_sync::config::BrazeConfig;
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::tools::sim::{self, Faults, SimConfig};

use common::Verdicts;

const API_KEY: &str = "bench-key";
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(9);

struct Scenario {
    name: &'static str,
    /// Requests a second, as the worker is configured.
    rate: u32,
    /// The simulator's window: `rate * window_secs` requests per window.
    window_secs: u64,
    latency_ms: u64,
    jitter_ms: u64,
    max_in_flight: usize,
    /// Workers sharing the limit, each its own client.
    workers: usize,
    /// The share of R to reach.
    target: f64,
}

struct Outcome {
    share: f64,
    share_429: f64,
    requests: u64,
}

fn objects(caller: usize, round: u64) -> Vec<Bytes> {
    (0..75)
        .map(|i| {
            Bytes::from(format!(
                r#"{{"external_id":"user-{caller}-{i}","_update_existing_only":false,"seg_{}":true}}"#,
                round % 20
            ))
        })
        .collect()
}

/// Sleeps to just after the next epoch-second boundary: the simulator's windows are aligned
/// to epoch seconds, so counting over whole windows gives each the same weight.
async fn align_to_second() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let into = Duration::from_nanos(u64::from(now.subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(5)).await;
}

async fn run(s: &Scenario) -> Outcome {
    let sim = sim::start(
        SimConfig {
            api_key: API_KEY.into(),
            rate_limit: s.rate * s.window_secs as u32,
            rate_window_secs: s.window_secs,
            faults: Faults {
                latency_ms: s.latency_ms,
                latency_jitter_ms: s.jitter_ms,
                ..Faults::default()
            },
        },
        "127.0.0.1:0".parse().expect("address"),
    )
    .await
    .expect("simulator listens");
    let cfg = BrazeConfig {
        endpoint: sim.url(),
        max_in_flight: s.max_in_flight,
        requests_per_second: s.rate,
        api_key: Some(API_KEY.into()),
        ..BrazeConfig::default()
    };
    let clients: Vec<BrazeClient> = (0..s.workers)
        .map(|_| {
            BrazeClient::new(&cfg, Arc::new(Metrics::new()), Arc::new(Health::new()))
                .expect("client")
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..s.max_in_flight * s.workers)
        .map(|caller| {
            let client = clients[caller % s.workers].clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    client.deliver(objects(caller, round)).await;
                    round += 1;
                }
            })
        })
        .collect();

    tokio::time::sleep(WARM_UP).await;
    align_to_second().await;
    let (t0, before) = (Instant::now(), sim.state.stats());
    tokio::time::sleep(MEASURE).await;
    let (t1, after) = (Instant::now(), sim.state.stats());
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    sim.shutdown().await;

    let accepted = after.accepted_requests - before.accepted_requests;
    let requests = after.requests - before.requests;
    let refused = after.responses_429 - before.responses_429;
    assert_eq!(after.oversized_requests, 0);
    Outcome {
        share: accepted as f64 / (f64::from(s.rate) * (t1 - t0).as_secs_f64()),
        share_429: refused as f64 / requests.max(1) as f64,
        requests,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let scenarios = [
        Scenario {
            name: "R=200/s, 1 s windows, 20±10 ms latency",
            rate: 200,
            window_secs: 1,
            latency_ms: 20,
            jitter_ms: 10,
            max_in_flight: 8,
            workers: 1,
            target: 90.0,
        },
        Scenario {
            name: "R=200/s, Braze-shaped 3 s windows (600 per window), 20±10 ms latency",
            rate: 200,
            window_secs: 3,
            latency_ms: 20,
            jitter_ms: 10,
            max_in_flight: 8,
            workers: 1,
            target: 90.0,
        },
        Scenario {
            name: "R=200/s, 3 s windows, two workers sharing it",
            rate: 200,
            window_secs: 3,
            latency_ms: 20,
            jitter_ms: 10,
            max_in_flight: 8,
            workers: 2,
            target: 85.0,
        },
        Scenario {
            name: "R=200/s, 3 s windows, 300±50 ms latency, max_in_flight 64",
            rate: 200,
            window_secs: 3,
            latency_ms: 300,
            jitter_ms: 50,
            max_in_flight: 64,
            workers: 1,
            target: 90.0,
        },
    ];
    let mut verdicts = Verdicts::default();
    for s in &scenarios {
        let out = rt.block_on(run(s));
        println!("{}: {} requests measured", s.name, out.requests);
        verdicts.at_least(
            &format!("{} share of R", s.name),
            out.share * 100.0,
            s.target,
            "%",
        );
        verdicts.below(
            &format!("{} 429 share", s.name),
            out.share_429 * 100.0,
            1.0,
            "%",
        );
    }
    verdicts.finish();
}
