//! segment-sync: Kafka segment-membership changes → per-user window → Braze `/users/track`.
//!
//! The pipeline's modules come first, in the order a record travels them from the consumer
//! to the commit; then what runs beside the pipeline; then the tools that are not it.

/// librdkafka settings every client shares, and the consumer context that hands rebalances
/// to the pipeline.
pub mod kafka;
/// Pure: where a partition starts when first assigned (committed, earliest, time, offset),
/// and when a run ends.
pub mod start;
/// Pure: the per-partition contiguous settled watermark that offsets are committed from.
pub mod offsets;
/// Record payload → `Event`: JSON, plain Avro, Confluent wire format with a registry cache.
pub mod decode;
/// Pure: a record's value → the changes it holds, in the configured `[source] shape`
/// (this project's change, Adobe Real-Time CDP, Twilio Segment, Lytics, Debezium).
pub mod source;
/// The decoded CDP event and the rules it must satisfy to be applied.
pub mod event;
/// Pure: pending changes per user, last write wins, repeats, stale and redundant changes.
pub mod window;
/// Pure: the window's bounded memories of event ids seen and of what was sent.
pub mod recent;
/// Pure: a partition's history folded into each (user, segment)'s greatest version, which
/// the window loads when the partition is assigned.
pub mod versions;
/// Cache hints that let the window's memory waits overlap across a burst of events.
pub mod prefetch;
/// A replay's fold: the range read, reduced to each user's final state, spilled by user
/// hash past its memory budget, sent user by user.
pub mod fold;
/// Pure: the Braze mapping of docs/design.md: flushed users → attributes objects of a request.
pub mod mapping;
/// Braze: HTTP client, response classification, pacing, retries and splitting.
pub mod braze;
/// The dead-letter topic: records and their Kafka Connect headers, the writer, the re-reader.
pub mod dlq;
/// The one place that wires consumer → window → Braze → offsets → commit.
pub mod pipeline;
/// `segment-sync replay`: `--from`, the group, how a run marks its commits.
pub mod replay;
/// `segment-sync snapshot`: member lists (Customer Insights exports, CSV, NDJSON) → ENTERED /
/// EXITED changes and their state, in Kafka transactions.
pub mod snapshot;
/// `segment-sync verify`: the log's last writes against the profiles Braze exports; repair.
pub mod verify;

/// Configuration: TOML, environment overrides, validation, the masked effective view.
pub mod config;
/// Prometheus metrics of one worker.
pub mod metrics;
/// Readiness facts shared by the pipeline, the Braze client and the server.
pub mod health;
/// `/metrics`, `/healthz`, `/readyz`.
pub mod server;
/// `tracing` set-up: human-readable on a terminal, JSON otherwise.
pub mod logging;
/// How errors are written: a message names its cause, which is not also a `source()`.
mod error;

/// Not the pipeline: the simulator, the generator and producer, the demo.
pub mod tools;
