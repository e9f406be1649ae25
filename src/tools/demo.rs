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
    /// Instead of the generated stream: two Customer Insights export runs of a sample segment
    /// through `segment-sync snapshot`, and the users who left it reaching Braze as EXITED.
    #[arg(long)]
    pub snapshot: bool,
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
    if args.snapshot {
        let state_topic = format!("{}.snapshots", cfg.kafka.topics[0]);
        cluster
            .create_topic(&state_topic, 1, 1)
            .context("creating the snapshot state topic")?;
        let exited = snapshot_runs(&cfg).await?;
        let summary = run_worker(&cfg).await?;
        println!("{summary}");
        let profiles = braze.state.profiles();
        let value = |user: &str| {
            profiles
                .get(&format!("external_id:{user}"))
                .and_then(|p| p.get(DEMO_SEGMENT))
                .cloned()
        };
        let members = profiles
            .values()
            .filter(|p| p.get(DEMO_SEGMENT) == Some(&serde_json::Value::Bool(true)))
            .count();
        let left = exited
            .iter()
            .filter(|u| value(u) == Some(serde_json::Value::Bool(false)))
            .count();
        println!("braze (as the simulator saw it)");
        println!("  profiles with {DEMO_SEGMENT} = true   {members}");
        println!(
            "  the {} users who left, {DEMO_SEGMENT} = false   {left}",
            exited.len()
        );
        for user in exited.iter().take(3) {
            println!("    {user}: {DEMO_SEGMENT} = {:?}", value(user));
        }
        braze.shutdown().await;
        return Ok(());
    }
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

const DEMO_SEGMENT: &str = "high-value";

/// Runs the worker until it has caught up with the topic.
async fn run_worker(cfg: &Config) -> anyhow::Result<pipeline::RunSummary> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let options = RunOptions::until_caught_up();
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let worker_cfg = cfg.clone();
    std::thread::spawn(move || {
        let _ = tx.send(pipeline::run(&worker_cfg, options, metrics, health, rt));
    });
    Ok(rx
        .await
        .context("the worker thread ended without an answer")??)
}

/// Two daily runs of a sample Customer Insights export (300 members, then 40 left and 25
/// joined) written to a temporary folder and applied with `snapshot`; returns who left.
async fn snapshot_runs(cfg: &Config) -> anyhow::Result<Vec<String>> {
    use crate::snapshot::{self, Progress, SnapshotArgs};
    let dir = tempfile::tempdir().context("a temporary folder")?;
    let export = dir
        .path()
        .join("exports/CustomerInsights_demo/braze-export");
    let user = |i: usize| format!("cust-{i:05}");
    let runs = [
        ("2026/12/03/0300", (0..300).collect::<Vec<_>>()),
        ("2026/12/04/0300", (40..325).collect::<Vec<_>>()),
    ];
    let mut exited = Vec::new();
    for (stamp, members) in runs {
        let run = export.join("HighValue").join(stamp);
        std::fs::create_dir_all(&run)?;
        let mut csv = String::from("CustomerId,PrimaryEmail\n");
        for i in &members {
            csv.push_str(&format!("{},{}@example.com\n", user(*i), user(*i)));
        }
        std::fs::write(run.join("HighValue_1.csv"), csv)?;
        let model = serde_json::json!({
            "name": "braze-export", "version": "1.0",
            "entities": [{"$type": "LocalEntity", "name": "HighValue",
                "attributes": [{"name": "CustomerId", "dataType": "string"},
                               {"name": "PrimaryEmail", "dataType": "string"}],
                "partitions": [{"name": "HighValue_1", "location": format!(
                    "https://demo.dfs.core.windows.net/exports/CustomerInsights_demo/braze-export/HighValue/{stamp}/HighValue_1.csv")}]}]
        });
        std::fs::write(
            export.join("model.json"),
            serde_json::to_vec_pretty(&model)?,
        )?;
        let args = SnapshotArgs {
            segment: DEMO_SEGMENT.into(),
            from: Some(export.join("HighValue").display().to_string()),
            id_column: "CustomerId".into(),
            email_column: None,
            run: None,
            run_time: None,
            latest: true,
            max_shrink: 0.5,
            force: false,
            restate: false,
            retire: false,
            dry_run: false,
            metrics: false,
            pause_before_transaction: None,
        };
        let c = cfg.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            snapshot::run(&c, &args, 0, &Progress::default(), &mut std::io::sink())
        })
        .await
        .context("the snapshot thread")??;
        println!("  {outcome}");
        if exited.is_empty() && stamp.ends_with("04/0300") {
            exited = (0..40).map(user).collect();
        }
    }
    println!();
    Ok(exited)
}
