//! A worker run on its own thread in the test process, stopped by its flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use segment_sync::config::Config;
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{self, RunOptions, RunSummary, StartAt, Until};

pub struct Running {
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub thread: JoinHandle<RunSummary>,
}

/// Starts a worker in `group` (the configured one when `None`).
pub fn start(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    group: Option<&str>,
    start: StartAt,
    until: Until,
) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        group_id: group.map(str::to_string),
        start,
        until,
        ..RunOptions::live(stop)
    };
    start_with(rt, cfg, opts)
}

pub fn start_with(rt: &tokio::runtime::Runtime, cfg: &Config, opts: RunOptions) -> Running {
    let stop = opts.stop.clone();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let (cfg, m, h, rt) = (
        cfg.clone(),
        metrics.clone(),
        health.clone(),
        rt.handle().clone(),
    );
    let thread = std::thread::spawn(move || pipeline::run(&cfg, opts, m, h, rt).expect("worker"));
    Running {
        stop,
        metrics,
        health,
        thread,
    }
}

impl Running {
    pub fn stop(self) -> RunSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("worker thread")
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
