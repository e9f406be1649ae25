//! segment-sync: Kafka segment-membership changes → per-user window → Braze `/users/track`.
//!
//! The modules follow a record from the consumer to the commit.

/// Pure: flushed users → Braze attributes objects → requests of at most `batch_size`.
pub mod batch;
/// Braze: HTTP client, response classification, pacing, retries and splitting.
pub mod braze;
/// Configuration: TOML, environment overrides, validation, the masked effective view.
pub mod config;
/// Consumer settings and the rebalance callbacks.
pub mod consumer;
/// Record payload → `Event`: JSON, plain Avro, Confluent wire format with a registry cache.
pub mod decode;
/// Everything embedded: mock cluster, simulator, generated stream, worker, summary.
pub mod demo;
/// Dead-letter records and their Kafka Connect headers.
pub mod dlq;
/// Produces dead-letter records and reports their acknowledgements.
pub mod dlq_writer;
/// `Event` → payload, the inverse of `decode`, for the producer, the demo and the tests.
pub mod encode;
/// The decoded CDP event and the rules it must satisfy to be applied.
pub mod event;
/// Sample CDP changes for `produce`, the demo and the tests.
pub mod generate;
/// Readiness facts shared by the pipeline, the Braze client and the server.
pub mod health;
/// `tracing` set-up: human-readable on a terminal, JSON otherwise.
pub mod logging;
/// Prometheus metrics of one worker.
pub mod metrics;
/// Pure: the per-partition contiguous settled watermark that offsets are committed from.
pub mod offsets;
/// The one place that wires consumer → window → Braze → offsets → commit.
pub mod pipeline;
/// `segment-sync produce`: writes generated changes to the topic.
pub mod produce;
/// Pure: the window's bounded memories of event ids seen and of what was sent.
pub mod recent;
/// Reads rejected records back from the log for their dead-letter copies.
pub mod refetch;
/// `segment-sync replay`: `--from` parsing and where a backfill stops.
pub mod replay;
/// `/metrics`, `/healthz`, `/readyz`.
pub mod server;
/// The Braze simulator (`braze-sim` and tests).
pub mod sim;
/// Pure: where a partition starts when first assigned (committed, earliest, time, offset).
pub mod start;
/// Pure: pending changes per user, last write wins, repeats, stale and redundant changes.
pub mod window;
