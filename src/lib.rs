//! segment-sync: Kafka segment-membership changes → per-user window → Braze `/users/track`.
//!
//! The pipeline's modules come first, in the order a record travels them from the consumer
//! to the commit; then what runs beside the pipeline; then the tools that are not it.

/// Pure: flushed users → Braze attributes objects → requests of at most `batch_size`.
pub mod batch;
/// Braze: HTTP client, response classification, pacing, retries and splitting.
pub mod braze;
/// Record payload → `Event`: JSON, plain Avro, Confluent wire format with a registry cache.
pub mod decode;
/// The dead-letter topic: records and their Kafka Connect headers, the writer, the re-reader.
pub mod dlq;
/// The decoded CDP event and the rules it must satisfy to be applied.
pub mod event;
/// librdkafka settings every client shares, and the consumer context that hands rebalances
/// to the pipeline.
pub mod kafka;
/// Pure: the per-partition contiguous settled watermark that offsets are committed from.
pub mod offsets;
/// The one place that wires consumer → window → Braze → offsets → commit.
pub mod pipeline;
/// Pure: the window's bounded memories of event ids seen and of what was sent.
pub mod recent;
/// `segment-sync replay`: `--from` parsing and where a backfill stops.
pub mod replay;
/// Pure: where a partition starts when first assigned (committed, earliest, time, offset).
pub mod start;
/// Pure: pending changes per user, last write wins, repeats, stale and redundant changes.
pub mod window;

/// Configuration: TOML, environment overrides, validation, the masked effective view.
pub mod config;
/// Readiness facts shared by the pipeline, the Braze client and the server.
pub mod health;
/// `tracing` set-up: human-readable on a terminal, JSON otherwise.
pub mod logging;
/// Prometheus metrics of one worker.
pub mod metrics;
/// `/metrics`, `/healthz`, `/readyz`.
pub mod server;

/// Everything embedded: mock cluster, simulator, generated stream, worker, summary.
pub mod demo;
/// `Event` → payload, the inverse of `decode`, for the producer, the demo and the tests.
pub mod encode;
/// Sample CDP changes for `produce`, the demo and the tests.
pub mod generate;
/// `segment-sync produce`: writes generated changes to the topic.
pub mod produce;
/// The Braze simulator (`braze-sim` and tests).
pub mod sim;
