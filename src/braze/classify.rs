//! Pure: one Braze `/users/track` answer → what the client does next (docs/design.md's
//! "Braze responses" table). No HTTP types here, so every row is unit-tested.

use serde_json::Value;

/// The rate-limit headers of one answer, already parsed; absent or unparsable → `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Epoch seconds at which the current window ends.
    pub reset: Option<u64>,
}

impl RateLimitHeaders {
    /// From the raw header values (`X-RateLimit-Limit`, `-Remaining`, `-Reset`).
    pub fn parse(limit: Option<&str>, remaining: Option<&str>, reset: Option<&str>) -> Self {
        fn num(s: Option<&str>) -> Option<u64> {
            let s = s?.trim();
            // Some gateways send a float for the reset; the whole seconds are what counts.
            s.parse::<u64>().ok().or_else(|| {
                s.parse::<f64>()
                    .ok()
                    .filter(|f| *f >= 0.0)
                    .map(|f| f as u64)
            })
        }
        RateLimitHeaders {
            limit: num(limit),
            remaining: num(remaining),
            reset: num(reset),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Braze took the request. `rejected` are per-object errors: (index, error type). An index
    /// may be out of range for the request: the caller checks it against the object count.
    Delivered {
        rejected: Vec<(usize, String)>,
        /// Errors Braze listed that name no attributes index: nothing to attribute them to.
        unattributed: usize,
    },
    /// The whole request was refused for its content (400, 413, other 4xx): halve and resend.
    Split { status: u16, message: String },
    /// 401/403/404 or a redirect: the key or the endpoint is wrong. Nothing is the data's fault.
    ConfigFault { status: u16, message: String },
    /// A 2xx whose body is not Braze's JSON (an object with a string `message`): something
    /// else answered in Braze's place (a proxy, a captive portal, a wrong host), so nothing
    /// says the objects arrived. A configuration fault like `ConfigFault`, but the key is
    /// not the suspect: `excerpt` is the start of what answered (empty for an empty body),
    /// for the operator.
    NotBraze { status: u16, excerpt: String },
    /// 429: wait until `reset_at` (epoch seconds) when Braze said, then resend.
    RateLimited { reset_at: Option<u64> },
    /// 5xx and anything else transient: back off and resend.
    Retry { status: u16, message: String },
}

/// The body as a JSON object, if it is one.
fn json_object(body: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Classifies one HTTP answer. Timeouts and connection errors never get here: they have no
/// status, and the client retries them directly.
pub fn classify(status: u16, body: &[u8], headers: RateLimitHeaders) -> Verdict {
    match status {
        200..=299 => delivered(status, body),
        429 => Verdict::RateLimited {
            reset_at: headers.reset,
        },
        401 | 403 | 404 | 300..=399 => Verdict::ConfigFault {
            status,
            message: message_of(status, body),
        },
        // 408 is the server giving up waiting for us: transient, like a timeout.
        408 => Verdict::Retry {
            status,
            message: message_of(status, body),
        },
        400..=499 => Verdict::Split {
            status,
            message: message_of(status, body),
        },
        _ => Verdict::Retry {
            status,
            message: message_of(status, body),
        },
    }
}

fn delivered(status: u16, body: &[u8]) -> Verdict {
    // Braze always says something in `message` ("success", or what went wrong); an object
    // without one did not come from Braze even when it is JSON.
    let answer = json_object(body).filter(|o| matches!(o.get("message"), Some(Value::String(_))));
    let Some(mut answer) = answer else {
        return Verdict::NotBraze {
            status,
            excerpt: excerpt(body),
        };
    };
    let mut rejected = Vec::new();
    let mut unattributed = 0;
    if let Some(Value::Array(errors)) = answer.remove("errors") {
        for e in &errors {
            match attributes_error(e) {
                Some(r) => rejected.push(r),
                None => unattributed += 1,
            }
        }
    }
    Verdict::Delivered {
        rejected,
        unattributed,
    }
}

/// `{"type": "...", "input_array": "attributes", "index": N}` → (N, type). Errors about the
/// `events` or `purchases` arrays are not ours; we only send attributes.
fn attributes_error(e: &Value) -> Option<(usize, String)> {
    let obj = e.as_object()?;
    if let Some(array) = obj.get("input_array").and_then(Value::as_str) {
        if array != "attributes" {
            return None;
        }
    }
    let index = usize::try_from(obj.get("index")?.as_u64()?).ok()?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_owned();
    Some((index, kind))
}

/// The body's `message`, else the start of the raw body, else the bare status; at most 200
/// characters either way, as it goes to the log, `/readyz` and dead-letter headers.
fn message_of(status: u16, body: &[u8]) -> String {
    if let Some(m) = json_object(body).and_then(|mut o| o.remove("message")) {
        let text = match m {
            Value::String(s) => s,
            other => other.to_string(),
        };
        return text.chars().take(200).collect();
    }
    match start_of(body) {
        Some(text) => text,
        None => format!("HTTP {status}"),
    }
}

/// The start of a body that is not Braze's, on one line, for a log line and `/readyz`;
/// empty for an empty body.
fn excerpt(body: &[u8]) -> String {
    start_of(body)
        .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The first 200 characters of the trimmed body, if it holds any.
fn start_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    (!text.is_empty()).then(|| text.chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_is_cut_to_200_characters() {
        let long = "é".repeat(5000);
        for body in [
            format!(r#"{{"message":"{long}"}}"#),
            format!(r#"{{"message":{{"detail":"{long}"}}}}"#),
        ] {
            match c(401, &body) {
                Verdict::ConfigFault { message, .. } => {
                    assert_eq!(message.chars().count(), 200)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    fn c(status: u16, body: &str) -> Verdict {
        classify(status, body.as_bytes(), RateLimitHeaders::default())
    }

    #[test]
    fn success_without_errors_delivers_everything() {
        assert_eq!(
            c(201, r#"{"message":"success","attributes_processed":3}"#),
            Verdict::Delivered {
                rejected: vec![],
                unattributed: 0
            }
        );
    }

    #[test]
    fn success_with_errors_rejects_those_indexes() {
        let body = r#"{"message":"success","errors":[
            {"type":"'external_id' is required","input_array":"attributes","index":2},
            {"type":"bad name","input_array":"attributes","index":0},
            {"type":"event","input_array":"events","index":1},
            "a minor error as a plain string"]}"#;
        assert_eq!(
            c(200, body),
            Verdict::Delivered {
                rejected: vec![
                    (2, "'external_id' is required".into()),
                    (0, "bad name".into())
                ],
                unattributed: 2
            }
        );
    }

    #[test]
    fn error_without_type_still_rejects_its_index() {
        assert_eq!(
            c(200, r#"{"message":"success","errors":[{"index":4}]}"#),
            Verdict::Delivered {
                rejected: vec![(4, "unknown error".into())],
                unattributed: 0
            }
        );
    }

    #[test]
    fn a_success_status_without_brazes_json_is_a_config_fault() {
        // A proxy, a captive portal or a wrong host answering 2xx in Braze's place: nothing
        // says the objects reached Braze, so none may count as delivered.
        for (status, body) in [
            (
                200,
                "<html><body>Welcome to the guest network</body></html>",
            ),
            (200, ""),
            (204, ""),
            (200, "   "),
            (200, "{\"message\":"),
            (200, "[1,2]"),
            (200, "\"success\""),
            (200, "{}"),
            (200, r#"{"status":"ok"}"#),
            (201, r#"{"message":42}"#),
            (200, r#"{"message":null,"errors":[]}"#),
        ] {
            match c(status, body) {
                Verdict::NotBraze { status: s, excerpt } => {
                    assert_eq!(s, status, "{body}");
                    assert_eq!(excerpt, body.trim(), "{body}");
                }
                other => panic!("{status} {body:?}: {other:?}"),
            }
        }
        let long = format!("<html>\n  <p>{}</p>\n</html>", "x".repeat(1000));
        match c(200, &long) {
            Verdict::NotBraze { excerpt, .. } => {
                assert!(excerpt.starts_with("<html> <p>xxx"), "one line: {excerpt}");
                assert!(excerpt.len() <= 200, "{excerpt}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn any_json_object_with_a_string_message_is_brazes_answer() {
        for body in [
            r#"{"message":"success"}"#,
            r#"{"message":"success","attributes_processed":2}"#,
            r#"{"message":"queued"}"#,
            r#"{"message":"success","errors":[]}"#,
        ] {
            assert_eq!(
                c(201, body),
                Verdict::Delivered {
                    rejected: vec![],
                    unattributed: 0
                },
                "{body}"
            );
        }
    }

    #[test]
    fn bad_request_and_too_large_split_with_message() {
        assert_eq!(
            c(400, r#"{"message":"Invalid JSON"}"#),
            Verdict::Split {
                status: 400,
                message: "Invalid JSON".into()
            }
        );
        assert_eq!(
            c(413, "Request Entity Too Large"),
            Verdict::Split {
                status: 413,
                message: "Request Entity Too Large".into()
            }
        );
        assert_eq!(
            c(422, ""),
            Verdict::Split {
                status: 422,
                message: "HTTP 422".into()
            }
        );
    }

    #[test]
    fn auth_and_not_found_are_config_faults() {
        for status in [401, 403, 404] {
            match c(status, r#"{"message":"Invalid API key"}"#) {
                Verdict::ConfigFault { status: s, message } => {
                    assert_eq!(s, status);
                    assert_eq!(message, "Invalid API key");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        assert!(matches!(
            c(301, ""),
            Verdict::ConfigFault { status: 301, .. }
        ));
    }

    #[test]
    fn too_many_requests_carries_the_reset() {
        let h = RateLimitHeaders::parse(Some("3000"), Some("0"), Some("1700000003"));
        assert_eq!(
            classify(429, b"{}", h),
            Verdict::RateLimited {
                reset_at: Some(1_700_000_003)
            }
        );
        assert_eq!(c(429, ""), Verdict::RateLimited { reset_at: None });
    }

    #[test]
    fn server_errors_and_request_timeout_retry() {
        for status in [500, 502, 503, 504, 408] {
            assert!(
                matches!(c(status, "oops"), Verdict::Retry { status: s, .. } if s == status),
                "{status}"
            );
        }
    }

    #[test]
    fn headers_parse_tolerantly() {
        let h = RateLimitHeaders::parse(Some(" 50 "), Some("x"), Some("1700000000.5"));
        assert_eq!(
            h,
            RateLimitHeaders {
                limit: Some(50),
                remaining: None,
                reset: Some(1_700_000_000)
            }
        );
    }

    #[test]
    fn long_bodies_are_cut_in_messages() {
        let body = "e".repeat(1000);
        match c(400, &body) {
            Verdict::Split { message, .. } => assert_eq!(message.len(), 200),
            other => panic!("{other:?}"),
        }
    }
}
