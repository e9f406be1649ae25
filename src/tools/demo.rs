//! `segment-sync demo`: the whole path with nothing installed. librdkafka's in-process mock
//! cluster stands in for Kafka and the project's simulator for Braze; a generated stream of
//! CDP changes (with repeats, out-of-order changes and bad records) goes through the real
//! worker, and the summary says what happened; `verify` then reads the users back from the
//! simulated Braze and finds nothing drifted.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use rdkafka::mocking::MockCluster;

use crate::config::{Config, Format, Shape};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pipeline::{self, RunOptions};
use crate::tools::produce::{self, ProduceArgs};
use crate::tools::sim::{self, Faults, SimConfig};
use crate::verify::{self, VerifyMetrics, VerifyOptions};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Changes to generate.
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Distinct users among them.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Partitions of the demo topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Users whose id starts with this are refused by the simulated Braze, to show the
    /// dead-letter path.
    #[arg(long, default_value = "user-00004")]
    pub reject_prefix: String,
    /// The shape of the records: this project's change, or a CDP's as it writes them.
    #[arg(long, value_enum, default_value = "change")]
    pub shape: Shape,
}

const API_KEY: &str = "demo-key";

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let mut cfg = Config::default();
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.kafka.format = Format::Json;
    cfg.kafka.group_id = "segment-sync-demo".into();
    cfg.source = crate::tools::shapes::source_config(args.shape);
    cluster
        .create_topic(&cfg.kafka.topics[0], args.partitions, 1)
        .context("creating the demo topic")?;
    cluster
        .create_topic(&cfg.kafka.dlq_topic, 1, 1)
        .context("creating the dead-letter topic")?;

    let braze = sim::start(
        SimConfig {
            api_key: API_KEY.into(),
            rate_limit: 0,
            rate_window_secs: 1,
            faults: Faults {
                latency_ms: 5,
                reject_prefix: Some(args.reject_prefix.clone()).filter(|p| !p.is_empty()),
                ..Faults::default()
            },
        },
        "127.0.0.1:0".parse().expect("a socket address"),
    )
    .await
    .context("starting the Braze simulator")?;
    cfg.braze.endpoint = braze.url();
    cfg.braze.api_key = Some(API_KEY.into());
    cfg.window.linger_ms = 200;

    println!("segment-sync demo (source.shape = {:?})", args.shape.name());
    println!("  kafka (librdkafka mock cluster)  {}", cfg.kafka.brokers);
    println!("  braze (simulator)                {}", braze.url());
    let produced = produce::run(
        &cfg,
        &ProduceArgs {
            count: args.events,
            users: args.users,
            segments: 8,
            repeat_rate: 0.08,
            out_of_order_rate: 0.03,
            bad_rate: 0.01,
            email_only_rate: 0.1,
            seed: 7,
            topic: None,
            shape: None,
        },
    )
    .await
    .context("producing the sample stream")?;
    println!(
        "  produced {} records to {} ({} partitions)\n",
        produced.records, cfg.kafka.topics[0], args.partitions
    );

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let options = RunOptions::until_caught_up();
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let worker_cfg = cfg.clone();
    let (m, h) = (metrics.clone(), health.clone());
    std::thread::spawn(move || {
        let _ = tx.send(pipeline::run(&worker_cfg, options, m, h, rt));
    });
    let summary = rx
        .await
        .context("the worker thread ended without an answer")??;
    let stats = braze.state.stats();
    let profiles = braze.state.profiles();
    println!("{summary}");
    println!("braze (as the simulator saw it)");
    println!("  requests              {}", stats.requests);
    println!("  objects applied       {}", stats.objects_applied);
    println!("  objects rejected      {}", stats.objects_rejected);
    println!("  data points written   {}", stats.data_points);
    println!(
        "  largest request       {} objects",
        stats.max_objects_in_request
    );
    println!(
        "  user in two requests  {}",
        stats.concurrent_user_violations
    );
    println!("  profiles              {}", profiles.len());

    // The log's last writes read back from the simulated Braze: nothing should have drifted.
    let verify_metrics = Arc::new(VerifyMetrics::new(&metrics.registry)?);
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let options = VerifyOptions::new(Arc::new(AtomicBool::new(false)));
        // The report's lines are the refused users, already counted above.
        let mut lines = std::io::sink();
        let _ = tx.send(verify::run(
            &cfg,
            &options,
            &mut lines,
            &metrics,
            &verify_metrics,
            &health,
            &rt,
        ));
    });
    let checked = rx
        .await
        .context("the verify thread ended without an answer")??;
    println!("\nverify (segment-sync verify: the log's last writes against Braze's profiles)");
    println!("{checked}");
    braze.shutdown().await;
    Ok(())
}
