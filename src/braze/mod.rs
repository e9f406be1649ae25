//! Braze `/users/track`: the HTTP client (auth, retries, splitting), the pure classification
//! of answers, the endpoint rules, and the pacing and adaptive in-flight limit shared by all
//! requests of one worker.

mod access;
pub mod classify;
mod client;
pub mod concurrency;
pub mod endpoint;
mod error;
pub mod pacing;
mod split;

pub(crate) use access::{ca_certificates, Access};
pub use classify::{classify, RateLimitHeaders, Verdict};
pub(crate) use client::{post_json, status_class};
pub use client::{BrazeClient, ObjectOutcome, Rejection};
pub use error::BrazeError;
