//! segment-sync: Kafka segment-membership changes → per-user window → Braze `/users/track`.
//!
//! The modules follow a record from the consumer to the commit.

/// Configuration: TOML, environment overrides, validation, the masked effective view.
pub mod config;
/// The decoded CDP event and its identity rules.
pub mod event;
/// Record payload → `Event`: JSON, plain Avro, Confluent wire format with a registry cache.
pub mod decode;
/// `Event` → payload, the inverse of `decode`, for the producer, the demo and the tests.
pub mod encode;
/// Pure: pending changes per user, last write wins, repeats, stale and redundant changes.
pub mod window;
/// Pure: flushed users → Braze attributes objects → requests of at most `batch_size`.
pub mod batch;
/// Braze: HTTP client, response classification, pacing, retries and splitting.
pub mod braze;
/// Pure: the per-partition contiguous settled watermark that offsets are committed from.
pub mod offsets;
/// Dead-letter records and their Kafka Connect headers.
pub mod dlq;
/// Produces dead-letter records and reports their acknowledgements.
pub mod dlq_writer;
/// Reads rejected records back from the log for their dead-letter copies.
pub mod refetch;
/// Consumer settings and the rebalance callbacks.
pub mod consumer;
/// The one place that wires consumer → window → Braze → offsets → commit.
pub mod pipeline;
/// `segment-sync replay`: `--from` parsing and where a backfill stops.
pub mod replay;
/// Sample CDP changes for `produce`, the demo and the tests.
pub mod generate;
/// `segment-sync produce`: writes generated changes to the topic.
pub mod produce;
/// Everything embedded: mock cluster, simulator, generated stream, worker, summary.
pub mod demo;
/// The Braze simulator (`braze-sim` and tests).
pub mod sim;
/// `/metrics`, `/healthz`, `/readyz`.
pub mod server;
/// Prometheus metrics of one worker.
pub mod metrics;
/// Readiness facts shared by the pipeline, the Braze client and the server.
pub mod health;
/// `tracing` set-up: human-readable on a terminal, JSON otherwise.
pub mod logging;
