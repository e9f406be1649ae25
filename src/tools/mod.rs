//! What is not the pipeline: the tools that feed it, stand in for Braze, and show it running.

/// Everything embedded: mock cluster, simulator, generated stream, worker, summary.
pub mod demo;
/// `Event` → payload, the inverse of `decode`, for the producer, the demo and the tests.
pub mod encode;
/// Sample CDP changes for `produce`, the demo and the tests.
pub mod generate;
/// `segment-sync produce`: writes generated changes to the topic.
pub mod produce;
/// Sample records in each CDP shape (`produce --shape`, `demo --shape`, tests).
pub mod shapes;
/// The Braze simulator (`braze-sim` and tests).
pub mod sim;
