//! Test-support code shared by the integration tests: each `tests/*.rs` binary declares
//! `mod support;` and uses what it needs.

// Every test binary compiles this module on its own and uses only part of it; the rest
// would otherwise warn as dead code in that binary.
#![allow(dead_code)]

pub mod expected;
pub mod kafka;
pub mod worker;
