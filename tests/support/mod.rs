//! Test-support code shared by the integration tests: each `tests/*.rs` binary declares
//! `mod support;` and uses what it needs.

// Every test binary compiles this module on its own and uses only part of it; the rest
// would otherwise warn as dead code in that binary.
#![allow(dead_code)]

pub mod azurite;
pub mod expected;
pub mod files;
pub mod kafka;
pub mod mock;
pub mod procs;
pub mod registry;
pub mod running;
pub mod worker;

/// Logs of the code under test, shown for failing tests (RUST_LOG picks the level).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
