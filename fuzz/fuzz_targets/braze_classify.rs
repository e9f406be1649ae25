//! One Braze answer: a status (two bytes), three rate-limit header values (each up to a
//! newline), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_sync::braze::{classify, RateLimitHeaders, Verdict};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    let mut rest = &data[2..];
    let mut header = || {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let value = std::str::from_utf8(&rest[..end]).ok();
        rest = rest.get(end + 1..).unwrap_or_default();
        value
    };
    let (limit, remaining, reset) = (header(), header(), header());
    let headers = RateLimitHeaders::parse(limit, remaining, reset);
    match classify(status, rest, headers) {
        // What the client relies on: texts short enough for a log line, `/readyz` and a
        // dead-letter header, and for cutting the key out of them cheaply.
        Verdict::Split { message, .. }
        | Verdict::ConfigFault { message, .. }
        | Verdict::Retry { message, .. } => assert!(message.chars().count() <= 200, "{message}"),
        Verdict::NotBraze { excerpt, .. } => assert!(excerpt.chars().count() <= 200, "{excerpt}"),
        Verdict::Delivered { .. } | Verdict::RateLimited { .. } => {}
    }
});
