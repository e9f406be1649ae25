//! The command line: parse, load the configuration, call the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use segment_sync::config::{Config, KeyRequirement};
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{self, Progress, RunOptions, RunSummary};
use segment_sync::tools::{demo, produce, sim};
use segment_sync::{logging, replay, server};

#[derive(Parser)]
#[command(
    name = "segment-sync",
    version,
    about = "CDP segment changes from Kafka to Braze user profiles"
)]
struct Cli {
    /// Log as JSON lines (default: JSON unless stderr is a terminal).
    #[arg(long, global = true, env = "SEGMENT_SYNC_LOG_JSON")]
    json_logs: bool,
    #[command(subcommand)]
    command: Command,
}

/// `--config`, the same for every command that reads one.
#[derive(clap::Args)]
struct ConfigFile {
    /// The configuration file (TOML); SEGMENT_SYNC_<SECTION>_<KEY> variables override its
    /// keys, and BRAZE_API_KEY gives the API key.
    #[arg(long = "config", env = "SEGMENT_SYNC_CONFIG", value_name = "FILE")]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker as a member of the consumer group.
    Run {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Backfill: replay the topic from a point in a group of its own, until caught up.
    Replay {
        #[command(flatten)]
        config: ConfigFile,
        #[command(flatten)]
        args: replay::ReplayArgs,
    },
    /// Everything embedded (mock Kafka, simulated Braze, sample stream): nothing to install.
    Demo(demo::DemoArgs),
    /// The Braze simulator as an HTTP server.
    BrazeSim(sim::SimArgs),
    /// Write sample CDP segment changes into the configured topic.
    Produce {
        #[command(flatten)]
        config: ConfigFile,
        #[command(flatten)]
        args: produce::ProduceArgs,
    },
    /// Read users back from Braze and compare them with the log's last writes: exit 0 in
    /// sync, 3 when drift was found (one NDJSON line per user on stdout).
    Verify {
        #[command(flatten)]
        config: ConfigFile,
        #[command(flatten)]
        args: segment_sync::verify::VerifyArgs,
    },
    /// A segment's member list (a Customer Insights export run, a CSV or NDJSON file) diffed
    /// against the last applied run: ENTERED / EXITED changes, exactly once. Exit 0 applied
    /// or nothing to do, 1 refused, 2 error.
    Snapshot {
        #[command(flatten)]
        config: ConfigFile,
        #[command(flatten)]
        args: segment_sync::snapshot::SnapshotArgs,
    },
    /// Load the configuration as `run` does and refuse what `run` would refuse at start (exit
    /// 2, the same message); else print the effective configuration, secrets masked.
    CheckConfig {
        #[command(flatten)]
        config: ConfigFile,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Demo(_)) && std::env::var_os("RUST_LOG").is_none() {
        // The demo dead-letters on purpose; its summary says so, a warning per record would
        // bury it. RUST_LOG=warn shows them.
        std::env::set_var("RUST_LOG", "error");
    }
    logging::init(cli.json_logs.then_some(true));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(dispatch(cli.command));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let cfg = Config::load(&config.path)?;
            let summary = worker(cfg, RunOptions::live(stop_on_signal())).await?;
            tracing::info!(
                consumed = summary.consumed,
                delivered = summary.objects_delivered,
                dlq = summary.dlq_records,
                "stopped"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { config, args } => {
            let key = if args.dry_run {
                KeyRequirement::Optional
            } else {
                KeyRequirement::Required
            };
            let cfg = Config::load_with(&config.path, key)?;
            let start = replay::parse_from(&args.from)?;
            let progress = Arc::new(Progress::default());
            let options = RunOptions {
                progress: Some(progress.clone()),
                group_id: Some(replay::group(&args, &cfg.kafka.group_id)),
                start,
                until: replay::until(&args),
                run_id: args.run_id.clone(),
                stop: stop_on_signal(),
                dry_run: args
                    .dry_run
                    .then(|| Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>),
            };
            let bar = std::io::stderr()
                .is_terminal()
                .then(|| show_progress(progress));
            let summary = worker(cfg, options).await;
            if let Some(bar) = bar {
                bar.abort();
            }
            let summary = summary?;
            eprintln!("{summary}");
            if let Some(why) = &summary.failed {
                eprintln!("replay failed: {why}");
            }
            if !summary.caught_up {
                // Non-zero, so that a job controller runs the backfill again.
                eprintln!(
                    "replay stopped before it caught up with the log: {}",
                    summary.where_stopped()
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            demo::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BrazeSim(args) => {
            sim::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce { config, args } => {
            let cfg = Config::load_with(&config.path, KeyRequirement::Optional)?;
            let summary = produce::run(&cfg, &args).await?;
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { config, args } => {
            // Exporting needs the key even when a dry run sends nothing.
            let cfg = Config::load_with(&config.path, KeyRequirement::Required)?;
            let summary = segment_sync::verify::command(cfg, &args, stop_on_signal()).await?;
            eprintln!("{summary}");
            Ok(ExitCode::from(summary.exit_code()))
        }
        Command::Snapshot { config, args } => snapshot(config.path, args).await,
        Command::CheckConfig { config } => {
            // `run`'s own checks, in its order; an error takes the same way out (exit 2).
            let cfg = Config::load(&config.path)?;
            pipeline::preflight(&cfg, &cfg.kafka.group_id, true)?;
            println!("{}", cfg.to_masked_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `snapshot`: reads and writes block, so they run on a thread of their own; the progress bar
/// and `--metrics` are served meanwhile.
async fn snapshot(
    config: PathBuf,
    args: segment_sync::snapshot::SnapshotArgs,
) -> anyhow::Result<ExitCode> {
    use segment_sync::snapshot;
    let cfg = Config::load_with(&config, KeyRequirement::Optional)?;
    let schema_id =
        if cfg.kafka.format == segment_sync::config::Format::AvroConfluent && !args.dry_run {
            let topic = cfg
                .snapshot
                .changes_topic(&cfg.kafka)
                .context("no topic: set snapshot.topic or kafka.topics")?;
            let registry = segment_sync::decode::RegistryClient::from_config(&cfg.kafka)?;
            let subject = format!("{topic}-value");
            tokio::task::spawn_blocking(move || {
                registry.register(&subject, segment_sync::decode::SCHEMA)
            })
            .await
            .context("registering the schema")?
            .context("registering the schema of the changes")?
        } else {
            0
        };
    let progress = Arc::new(snapshot::Progress::default());
    let metrics = Arc::new(Metrics::new());
    let snap_metrics = Arc::new(segment_sync::metrics::SnapshotMetrics::register(
        &metrics.registry,
    ));
    let server = if args.metrics {
        let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
            .await
            .with_context(|| format!("server.listen = {:?}: cannot listen", cfg.server.listen))?;
        Some(tokio::spawn(server::serve(
            listener,
            metrics.clone(),
            Arc::new(Health::new()),
            std::future::pending::<()>(),
        )))
    } else {
        None
    };
    let on_terminal = std::io::stderr().is_terminal() && !args.dry_run;
    let ticker = (on_terminal || args.metrics).then(|| {
        let bar = if on_terminal {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} snapshot [{elapsed_precise}] {wide_bar} {pos}/{len} changes",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let p = progress.clone();
        let m = snap_metrics.clone();
        tokio::spawn(async move {
            loop {
                let total = p.total.load(Ordering::Relaxed);
                let written = p.written.load(Ordering::Relaxed);
                bar.set_length(total);
                bar.set_position(written);
                m.changes_written.set(written as i64);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    });
    let p = progress.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        snapshot::run(&cfg, &args, schema_id, &p, &mut out)
    })
    .await
    .context("the snapshot thread died")?;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    let code = match result {
        Ok(outcome) => {
            let c = &outcome.counts;
            for (name, v) in [
                ("members", c.members),
                ("entered", c.entered),
                ("exited", c.exited),
                ("unchanged", c.unchanged),
                ("restated", c.restated),
                ("skipped_rows", c.skipped_rows),
                ("duplicates", c.duplicates),
                ("previous", c.previous),
            ] {
                snap_metrics.counts.with_label_values(&[name]).set(v as i64);
            }
            snap_metrics
                .changes_written
                .set(progress.written.load(Ordering::Relaxed) as i64);
            snap_metrics
                .runs
                .with_label_values(&[&outcome.status.replace(' ', "_")])
                .inc();
            eprintln!("{outcome}");
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            snap_metrics.runs.with_label_values(&["error"]).inc();
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    };
    if let Some(server) = server {
        // One last scrape window for a job's Prometheus before the process ends.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        server.abort();
    }
    Ok(code)
}

/// A progress bar on the terminal: records replayed and still to go.
fn show_progress(progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{elapsed_precise}] {wide_bar} {pos}/{len} events, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    tokio::spawn(async move {
        loop {
            let done = progress.done.load(Ordering::Relaxed);
            let to_go = progress.to_go.load(Ordering::Relaxed);
            bar.set_length(done + to_go);
            bar.set_position(done);
            bar.set_message(format!("{to_go} to go"));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
}

/// SIGINT or SIGTERM sets the flag: the worker stops taking records, drains and commits.
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stopping: draining in-flight work and committing");
        flag.store(true, Ordering::Relaxed);
    });
    stop
}

/// Serves /metrics and the probes, runs the pipeline on its own thread, waits for it.
async fn worker(cfg: Config, options: RunOptions) -> anyhow::Result<RunSummary> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .with_context(|| format!("server.listen = {:?}: cannot listen", cfg.server.listen))?;
    let (server_stop, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        health.clone(),
        async move {
            let _ = server_stopped.await;
        },
    ));
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (m, h) = (metrics.clone(), health.clone());
    std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || {
            let _ = tx.send(pipeline::run(&cfg, options, m, h, rt));
        })
        .context("starting the pipeline thread")?;
    let result = rx.await.context("the pipeline thread died")?;
    let _ = server_stop.send(());
    let _ = server.await;
    Ok(result?)
}
