//! The Braze HTTP client: one `reqwest::Client`, one pacer, and the loop that turns answers
//! into outcomes. `deliver` never gives up on an object: it ends delivered or rejected.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use super::access::Access;
use super::classify::{classify, RateLimitHeaders, Verdict};
use super::concurrency::Gate;
use super::pacing::Pacer;
use super::split::Bisection;
use super::BrazeError;
use crate::config::BrazeConfig;
use crate::health::Health;
use crate::metrics::Metrics;

/// Transient failures in a row (across all calls) before readiness reports Braze unreachable:
/// one lost connection is normal, three are an outage.
const UNREACHABLE_AFTER: u32 = 3;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A wrong key or endpoint is not fixed by hammering Braze: retry slowly until someone fixes it.
const CONFIG_RETRY_BASE: Duration = Duration::from_secs(5);
const CONFIG_RETRY_CAP: Duration = Duration::from_secs(30);
const CONFIG_LOG_EVERY: Duration = Duration::from_secs(60);

/// What became of one attributes object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectOutcome {
    Delivered,
    Rejected(Rejection),
}

/// Why Braze refused one object: for the dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub error_type: String,
    pub message: String,
}

/// A cheap handle (an `Arc` inside) shared by every task that sends to Braze.
#[derive(Clone)]
pub struct BrazeClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{endpoint}/users/track`
    url: String,
    /// `Bearer <key>`, marked sensitive so reqwest never prints it either.
    auth: HeaderValue,
    /// The key itself, only to cut it out of what Braze (or whatever answers) says.
    key: Box<str>,
    pacer: Pacer,
    gate: Gate,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    consecutive_failures: AtomicU32,
    /// This client told `health` about a problem that it has not cleared yet.
    problem_reported: AtomicBool,
    last_config_log: Mutex<Option<Instant>>,
}

impl fmt::Debug for BrazeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrazeClient")
            .field("url", &self.inner.url)
            .field("api_key", &"***")
            .finish()
    }
}

/// How one request for a run of objects ended, once retries are over.
enum Settled {
    /// Braze took it; these (in-range) positions were rejected.
    Answered {
        status: u16,
        rejected: Vec<(usize, String)>,
    },
    /// Braze refused the whole request for its content.
    Refused { status: u16, message: String },
}

impl BrazeClient {
    pub fn new(
        cfg: &BrazeConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<BrazeClient, BrazeError> {
        let Access {
            key,
            auth,
            base,
            http,
        } = Access::from_config(cfg)?;
        let mut builder = http
            .pool_max_idle_per_host(cfg.max_in_flight.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        if cfg.timeout_ms > 0 {
            let timeout = Duration::from_millis(cfg.timeout_ms);
            builder = builder
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)));
        }
        Ok(BrazeClient {
            inner: Arc::new(Inner {
                http: builder.build()?,
                url: format!("{base}/users/track"),
                auth,
                key,
                pacer: Pacer::new(cfg.requests_per_second),
                gate: Gate::new(cfg.max_in_flight),
                metrics,
                health,
                consecutive_failures: AtomicU32::new(0),
                problem_reported: AtomicBool::new(false),
                last_config_log: Mutex::new(None),
            }),
        })
    }

    /// Sends the objects (each a serialised attributes object) as one `/users/track` request,
    /// splitting it when Braze refuses its content, and returns one outcome per object in
    /// order. Retries rate limits, server errors, timeouts and configuration faults for as
    /// long as it takes.
    pub async fn deliver(&self, objects: Vec<Bytes>) -> Vec<ObjectOutcome> {
        let mut outcomes = vec![ObjectOutcome::Delivered; objects.len()];
        // The parts of a round go together (see `split`): a refused request is settled in
        // about log2(n) round trips, not one round trip per part.
        let mut parts = Bisection::new(objects.len());
        loop {
            let round = parts.round();
            if round.is_empty() {
                break;
            }
            let answers =
                futures::future::join_all(round.iter().map(|r| self.send(&objects[r.clone()])))
                    .await;
            for (range, answer) in round.into_iter().zip(answers) {
                match answer {
                    Settled::Answered { status, rejected } => {
                        for (i, error_type) in rejected {
                            outcomes[range.start + i] = ObjectOutcome::Rejected(Rejection {
                                status,
                                message: format!(
                                    "Braze rejected the attributes object: {error_type}"
                                ),
                                error_type,
                            });
                        }
                    }
                    Settled::Refused { status, message } => {
                        if !parts.refused(range.clone()) {
                            outcomes[range.start] = ObjectOutcome::Rejected(Rejection {
                                status,
                                error_type: format!("HTTP {status}"),
                                message,
                            });
                        }
                    }
                }
            }
            parts.end_round();
        }
        let rejected = outcomes
            .iter()
            .filter(|o| matches!(o, ObjectOutcome::Rejected(_)))
            .count();
        let m = &self.inner.metrics;
        m.braze_objects_rejected.inc_by(rejected as u64);
        m.braze_objects_delivered
            .inc_by((outcomes.len() - rejected) as u64);
        outcomes
    }

    /// Sends one request until it is answered or refused.
    async fn send(&self, objects: &[Bytes]) -> Settled {
        let inner = &*self.inner;
        let body = request_body(objects);
        let mut transient = 0u32;
        let mut faults = 0u32;
        let mut first = true;
        loop {
            if !first {
                inner.metrics.braze_retries.inc();
            }
            first = false;
            let permit = inner.gate.acquire().await;
            let seq = inner.pacer.acquire().await;
            let started = Instant::now();
            let answer = self.post(body.clone()).await;
            let latency = started.elapsed();
            drop(permit);
            inner
                .metrics
                .braze_request_duration
                .observe(latency.as_secs_f64());
            // A 429, a 5xx or no answer at all asks for fewer requests at once; a request
            // Braze processed (2xx) says how fast it is. Other answers (a 400 or 413 refusing
            // the request, a 401) come back before any work is done: taken as Braze's speed,
            // they made every processed request look slow and shrank the limit to one while
            // a refused batch was split (issue 19), so they say nothing here.
            let (overloaded, processed) = match &answer {
                Ok((status, _, _)) => (
                    *status == 429 || *status >= 500,
                    (200..300).contains(status),
                ),
                Err(_) => (true, false),
            };
            if overloaded {
                inner.gate.on_overload();
            } else if processed {
                inner.gate.on_answer(latency);
            }
            inner
                .metrics
                .braze_concurrency_limit
                .set(inner.gate.limit() as i64);
            let (status, headers, reply) = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    self.count("error");
                    if let Some(tls) = untrusted_certificate(&e) {
                        // Retrying soon cannot help: the trust store or the endpoint is wrong.
                        let problem = format!(
                            "braze.endpoint {} presents a certificate that is not trusted ({tls}): \
                             if a private CA or a TLS-inspecting proxy signs it, set braze.ca_file \
                             to that CA's PEM file; otherwise check braze.endpoint",
                            inner.url
                        );
                        // Status 0: no HTTP answer.
                        self.config_fault(0, problem, objects.len());
                        sleep_config_retry(&mut faults).await;
                        continue;
                    }
                    let why = if e.is_timeout() {
                        "timeout"
                    } else {
                        "connection error"
                    };
                    tracing::warn!(objects = objects.len(), error = %e, "Braze request failed ({why}); retrying");
                    self.transient_failure(why);
                    sleep_backoff(transient).await;
                    transient = transient.saturating_add(1);
                    continue;
                }
            };
            inner.pacer.observe(seq, headers);
            self.count(status_class(status));
            match scrubbed(classify(status, &reply, headers), &inner.key) {
                Verdict::Delivered {
                    rejected,
                    unattributed,
                } => {
                    self.reachable();
                    if unattributed > 0 {
                        tracing::warn!(
                            status,
                            unattributed,
                            "Braze listed errors that name no attributes index"
                        );
                    }
                    let (in_range, out): (Vec<_>, Vec<_>) =
                        rejected.into_iter().partition(|(i, _)| *i < objects.len());
                    if !out.is_empty() {
                        tracing::warn!(status, objects = objects.len(), indexes = ?out.iter().map(|(i, _)| i).collect::<Vec<_>>(), "Braze rejected indexes outside the request; ignored");
                    }
                    tracing::debug!(
                        status,
                        objects = objects.len(),
                        rejected = in_range.len(),
                        "Braze accepted the request"
                    );
                    return Settled::Answered {
                        status,
                        rejected: in_range,
                    };
                }
                Verdict::Split { status, message } => {
                    self.reachable();
                    tracing::warn!(status, objects = objects.len(), %message, "Braze refused the request");
                    return Settled::Refused { status, message };
                }
                Verdict::ConfigFault { status, message } => {
                    let problem = format!(
                        "Braze answered {status} ({message}): check BRAZE_API_KEY and braze.endpoint ({})",
                        inner.url
                    );
                    self.config_fault(status, problem, objects.len());
                    sleep_config_retry(&mut faults).await;
                }
                Verdict::NotBraze { status, excerpt } => {
                    let answered = if excerpt.is_empty() {
                        "an empty body".to_string()
                    } else {
                        format!("a body that is not Braze's JSON: {excerpt}")
                    };
                    let problem = format!(
                        "braze.endpoint {} answered {status} with {answered}; something other \
                         than Braze (a proxy, a captive portal, a wrong host) answers there, \
                         so nothing counts as delivered: check braze.endpoint and the network path",
                        inner.url
                    );
                    self.config_fault(status, problem, objects.len());
                    sleep_config_retry(&mut faults).await;
                }
                Verdict::RateLimited { reset_at } => {
                    // Braze answered, so it is reachable and the key is good.
                    self.reachable();
                    inner.metrics.braze_rate_limited.inc();
                    let wait = inner.pacer.rate_limited(reset_at);
                    tracing::warn!(
                        status,
                        objects = objects.len(),
                        wait_ms = wait.as_millis() as u64,
                        "Braze rate limit hit; holding all requests until the reset"
                    );
                }
                Verdict::Retry { status, message } => {
                    tracing::warn!(status, objects = objects.len(), %message, "Braze request failed; retrying");
                    self.transient_failure(&format!("HTTP {status}"));
                    sleep_backoff(transient).await;
                    transient = transient.saturating_add(1);
                }
            }
        }
    }

    async fn post(&self, body: Bytes) -> Result<(u16, RateLimitHeaders, Bytes), reqwest::Error> {
        let inner = &*self.inner;
        post_json(&inner.http, &inner.url, &inner.auth, body).await
    }

    fn count(&self, class: &str) {
        self.inner
            .metrics
            .braze_requests
            .with_label_values(&[class])
            .inc();
    }

    fn reachable(&self) {
        let inner = &*self.inner;
        inner.consecutive_failures.store(0, Ordering::Relaxed);
        if inner.problem_reported.swap(false, Ordering::Relaxed) {
            inner.health.set_braze_ok();
            tracing::info!("Braze answers normally again");
        }
    }

    fn transient_failure(&self, why: &str) {
        let inner = &*self.inner;
        let n = inner.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= UNREACHABLE_AFTER {
            inner.health.set_braze_problem(format!(
                "Braze unreachable: {n} failed requests in a row (last: {why})"
            ));
            inner.problem_reported.store(true, Ordering::Relaxed);
        }
    }

    fn config_fault(&self, status: u16, problem: String, objects: usize) {
        let inner = &*self.inner;
        inner.consecutive_failures.store(0, Ordering::Relaxed);
        inner.health.set_braze_problem(problem.clone());
        inner.problem_reported.store(true, Ordering::Relaxed);
        let loud = {
            let mut last = inner
                .last_config_log
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= CONFIG_LOG_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if loud {
            tracing::error!(
                status,
                objects,
                "{problem}; delivery is paused and retried slowly"
            );
        } else {
            tracing::debug!(status, objects, "Braze configuration fault persists");
        }
    }
}

/// `{"attributes":[o1,o2,...]}` by concatenation: the objects are already valid JSON.
fn request_body(objects: &[Bytes]) -> Bytes {
    const HEAD: &[u8] = b"{\"attributes\":[";
    const TAIL: &[u8] = b"]}";
    let len = HEAD.len() + TAIL.len() + objects.iter().map(|o| o.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(HEAD);
    for (i, o) in objects.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(o);
    }
    body.extend_from_slice(TAIL);
    Bytes::from(body)
}

/// A status as the `class` label of the request counters (`/users/track`'s and `verify`'s).
pub(crate) fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        429 => "429",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "error",
    }
}

/// The TLS library's words when a request failed because the server's certificate does not
/// verify: reqwest reports it only as a connection error, deep in the error's sources.
fn untrusted_certificate(e: &reqwest::Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("certificate verify failed") {
            return Some(text);
        }
        source = s.source();
    }
    None
}

/// A configuration fault is not fixed by hammering Braze: 5 s doubling up to 30 s.
async fn sleep_config_retry(faults: &mut u32) {
    let wait = CONFIG_RETRY_BASE
        .saturating_mul(1 << (*faults).min(8))
        .min(CONFIG_RETRY_CAP);
    *faults = faults.saturating_add(1);
    tokio::time::sleep(wait).await;
}

/// Exponential backoff with full jitter: a random wait up to 100 ms × 2^n, capped at 30 s,
/// so that workers hit by the same outage do not come back in lockstep.
async fn sleep_backoff(n: u32) {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << n.min(16))
        .min(BACKOFF_CAP);
    let ms = rand::random_range(0..=ceiling.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The verdict with every text Braze's answer supplied cut free of the key: a gateway that
/// echoes the key it refused would otherwise put it in the log, `/readyz` and the
/// dead-letter headers.
fn scrubbed(verdict: Verdict, key: &str) -> Verdict {
    match verdict {
        Verdict::Split { status, message } => Verdict::Split {
            status,
            message: without_key(&message, key),
        },
        Verdict::ConfigFault { status, message } => Verdict::ConfigFault {
            status,
            message: without_key(&message, key),
        },
        Verdict::NotBraze { status, excerpt } => Verdict::NotBraze {
            status,
            excerpt: without_key(&excerpt, key),
        },
        Verdict::Retry { status, message } => Verdict::Retry {
            status,
            message: without_key(&message, key),
        },
        other => other,
    }
}

/// `text` with every run of 8 or more characters that also occurs in `key` (the whole key
/// when it is shorter) shown as `***`: a prefix of the key is as much a leak as the key.
/// Texts are short (classify cuts them to 200 characters), so the plain search is cheap.
fn without_key(text: &str, key: &str) -> String {
    let shortest = key.len().clamp(1, 8);
    if key.is_empty() || text.len() < shortest {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let mut longest = 0;
        let mut end = i + shortest;
        while end <= text.len() {
            if text.is_char_boundary(end) {
                if key.contains(&text[i..end]) {
                    longest = end - i;
                } else {
                    break;
                }
            }
            end += 1;
        }
        if longest >= shortest {
            out.push_str("***");
            i += longest;
        } else {
            let c = text[i..]
                .chars()
                .next()
                .expect("i is a char boundary below len");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// POSTs a JSON body to a Braze endpoint: its status, rate-limit headers and body. Shared by
/// `/users/track` and `verify`'s `/users/export/ids`.
pub(crate) async fn post_json(
    http: &reqwest::Client,
    url: &str,
    auth: &HeaderValue,
    body: Bytes,
) -> Result<(u16, RateLimitHeaders, Bytes), reqwest::Error> {
    let response = http
        .post(url)
        .header(AUTHORIZATION, auth.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let h = response.headers();
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    let headers = RateLimitHeaders::parse(
        get("x-ratelimit-limit"),
        get("x-ratelimit-remaining"),
        get("x-ratelimit-reset"),
    );
    let reply = response.bytes().await?;
    Ok((status, headers, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_whole_or_in_part_is_cut_from_messages() {
        let key = "b7e1c2d4-0f3a-4c5e";
        assert_eq!(
            without_key("Invalid key b7e1c2d4-0f3a-4c5e!", key),
            "Invalid key ***!"
        );
        assert_eq!(
            without_key("key b7e1c2d4-0f3a-... no", key),
            "key ***... no"
        );
        assert_eq!(without_key("Invalid API key", key), "Invalid API key");
        assert_eq!(without_key("ab test-key", "test-key"), "ab ***");
        assert_eq!(without_key("é b7e1c2d4é", key), "é ***é");
    }

    #[test]
    fn body_is_the_objects_in_an_attributes_array() {
        let body = request_body(&[
            Bytes::from_static(br#"{"external_id":"a","s1":true}"#),
            Bytes::from_static(br#"{"email":"b@x.io","s1":null}"#),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"attributes":[{"external_id":"a","s1":true},{"email":"b@x.io","s1":null}]})
        );
        assert_eq!(&request_body(&[])[..], br#"{"attributes":[]}"#);
    }

    fn cfg(key: Option<&str>) -> BrazeConfig {
        BrazeConfig {
            endpoint: "rest.iad-03.braze.com/".into(),
            api_key: key.map(str::to_owned),
            ..BrazeConfig::default()
        }
    }

    fn client(key: Option<&str>) -> Result<BrazeClient, BrazeError> {
        BrazeClient::new(&cfg(key), Arc::new(Metrics::new()), Arc::new(Health::new()))
    }

    #[test]
    fn a_key_is_required_and_the_error_names_the_variable() {
        for key in [None, Some(""), Some("  ")] {
            let err = client(key).unwrap_err().to_string();
            assert!(err.contains("BRAZE_API_KEY"), "{err}");
        }
    }

    #[test]
    fn debug_output_masks_the_key_and_shows_the_url() {
        let c = client(Some("secret-key-123")).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret-key-123"), "{shown}");
        assert!(
            shown.contains("https://rest.iad-03.braze.com/users/track"),
            "{shown}"
        );
    }

    #[test]
    fn status_classes_match_the_metric_labels() {
        assert_eq!(status_class(201), "2xx");
        assert_eq!(status_class(429), "429");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(302), "error");
    }
}
