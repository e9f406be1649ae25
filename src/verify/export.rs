//! Braze's `POST /users/export/ids`: up to 50 `external_ids` a request, asking only for
//! `external_id` and `custom_attributes`, paced to `braze.export_requests_per_minute` and to
//! Braze's rate-limit headers. Answers are classified by the same rules as `/users/track`'s
//! (`braze::classify`); what an export answer holds is read by the pure `parse_answer`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use serde_json::{Map, Value};

use crate::braze::pacing::Pacer;
use crate::braze::{classify, status_class, Access, BrazeError, RateLimitHeaders, Verdict};
use crate::config::BrazeConfig;

use super::metrics::VerifyMetrics;

/// Braze's limit of `external_ids` in one export request.
pub const MAX_IDS: usize = 50;
/// The fields asked for: the identifier to match the answer, and the attributes judged.
pub const FIELDS: [&str; 2] = ["external_id", "custom_attributes"];

/// Transient failures (5xx, timeouts) of one request before the run gives up: a one-shot
/// check that cannot read Braze should say so, not wait forever like the worker.
const MAX_ATTEMPTS: u32 = 8;
/// 429s of one request before giving up: the pacing should make even one rare.
const MAX_RATE_LIMITED: u32 = 20;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "Braze answered {status} to /users/export/ids ({message}): check BRAZE_API_KEY (it \
         needs the users.export.ids permission) and braze.endpoint"
    )]
    ConfigFault { status: u16, message: String },
    #[error(
        "braze.endpoint answered {status} to /users/export/ids with something that is not \
         Braze's JSON ({excerpt:?}): a proxy or a wrong host answers there"
    )]
    NotBraze { status: u16, excerpt: String },
    #[error("Braze refused the export request with {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("Braze did not answer /users/export/ids after {attempts} attempts; last: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("Braze's export answer could not be read: {0}")]
    BadAnswer(String),
}

/// One export answer: the profiles found, by external_id, and the ids Braze does not know.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Exported {
    /// external_id → custom attributes (empty when Braze leaves the field out).
    pub profiles: HashMap<String, Map<String, Value>>,
    pub missing: HashSet<String>,
}

/// Reads an export answer for `requested`. A requested id that the answer names neither
/// way is taken as missing: Braze leaves out what it does not have.
pub fn parse_answer(requested: &[&str], body: &[u8]) -> Result<Exported, String> {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return Err("not a JSON object".into());
    };
    let users = match answer.get("users") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(users)) => users.as_slice(),
        Some(_) => return Err("'users' is not an array".into()),
    };
    let wanted: HashSet<&str> = requested.iter().copied().collect();
    let mut out = Exported::default();
    for user in users {
        let Some(id) = user.get("external_id").and_then(Value::as_str) else {
            return Err("a user without 'external_id'".into());
        };
        if !wanted.contains(id) {
            continue;
        }
        let attributes = match user.get("custom_attributes") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(format!("user {id:?}: 'custom_attributes' is not an object")),
        };
        out.profiles.insert(id.to_string(), attributes);
    }
    for id in requested {
        if !out.profiles.contains_key(*id) {
            out.missing.insert((*id).to_string());
        }
    }
    Ok(out)
}

/// The request body for up to [`MAX_IDS`] ids.
pub fn request_body(ids: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "external_ids": ids,
        "fields_to_export": FIELDS,
    }))
    .expect("a JSON value serialises")
}

/// A cheap handle (an `Arc` inside), shared by the requests of one run.
#[derive(Clone)]
pub struct ExportClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: String,
    auth: HeaderValue,
    pacer: Pacer,
    metrics: Arc<VerifyMetrics>,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportClient")
            .field("url", &self.inner.url)
            .field("api_key", &"***")
            .finish()
    }
}

impl ExportClient {
    pub fn new(cfg: &BrazeConfig, metrics: Arc<VerifyMetrics>) -> Result<ExportClient, BrazeError> {
        let Access {
            auth, base, http, ..
        } = Access::from_config(cfg)?;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let http = http
            // An export pulls the whole profile together: slower than /users/track.
            .timeout(timeout.max(Duration::from_secs(30)))
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()?;
        Ok(ExportClient {
            inner: Arc::new(Inner {
                http,
                url: format!("{base}/users/export/ids"),
                auth,
                pacer: Pacer::every(
                    Duration::from_secs(60) / cfg.export_requests_per_minute.max(1),
                ),
                metrics,
            }),
        })
    }

    /// Exports up to [`MAX_IDS`] users, retrying 429s (until Braze's reset), 5xx and
    /// timeouts a bounded number of times.
    pub async fn export(&self, ids: &[&str]) -> Result<Exported, ExportError> {
        let inner = &*self.inner;
        let body = bytes::Bytes::from(request_body(ids));
        let mut transient = 0u32;
        let mut limited = 0u32;
        loop {
            let seq = inner.pacer.acquire().await;
            let started = Instant::now();
            let answer = self.post(body.clone()).await;
            inner
                .metrics
                .export_duration
                .observe(started.elapsed().as_secs_f64());
            let (status, headers, reply) = match answer {
                Ok(a) => a,
                Err(e) => {
                    inner
                        .metrics
                        .export_requests
                        .with_label_values(&["error"])
                        .inc();
                    transient += 1;
                    if transient >= MAX_ATTEMPTS {
                        return Err(ExportError::GaveUp {
                            attempts: transient,
                            last: e.to_string(),
                        });
                    }
                    tracing::warn!(error = %e, "export request failed; retrying");
                    backoff(transient).await;
                    continue;
                }
            };
            inner.pacer.observe(seq, headers);
            inner
                .metrics
                .export_requests
                .with_label_values(&[status_class(status)])
                .inc();
            match classify(status, &reply, headers) {
                Verdict::Delivered { .. } => {
                    let exported = parse_answer(ids, &reply).map_err(ExportError::BadAnswer)?;
                    inner
                        .metrics
                        .users_exported
                        .inc_by(exported.profiles.len() as u64);
                    return Ok(exported);
                }
                Verdict::RateLimited { reset_at } => {
                    limited += 1;
                    let wait = inner.pacer.rate_limited(reset_at);
                    if limited >= MAX_RATE_LIMITED {
                        return Err(ExportError::GaveUp {
                            attempts: limited,
                            last: "429 rate limited".into(),
                        });
                    }
                    tracing::warn!(
                        wait_ms = wait.as_millis() as u64,
                        "Braze export rate limit hit; waiting for the reset"
                    );
                }
                Verdict::Retry { status, message } => {
                    transient += 1;
                    if transient >= MAX_ATTEMPTS {
                        return Err(ExportError::GaveUp {
                            attempts: transient,
                            last: format!("{status}: {message}"),
                        });
                    }
                    tracing::warn!(status, %message, "export request failed; retrying");
                    backoff(transient).await;
                }
                Verdict::ConfigFault { status, message } => {
                    return Err(ExportError::ConfigFault { status, message })
                }
                Verdict::NotBraze { status, excerpt } => {
                    return Err(ExportError::NotBraze { status, excerpt })
                }
                Verdict::Split { status, message } => {
                    return Err(ExportError::Refused { status, message })
                }
            }
        }
    }

    async fn post(
        &self,
        body: bytes::Bytes,
    ) -> Result<(u16, RateLimitHeaders, bytes::Bytes), reqwest::Error> {
        let inner = &*self.inner;
        crate::braze::post_json(&inner.http, &inner.url, &inner.auth, body).await
    }
}

/// Exponential backoff with full jitter.
async fn backoff(n: u32) {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << n.min(16))
        .min(BACKOFF_CAP);
    let ms = rand::random_range(0..=ceiling.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_request_asks_for_the_ids_and_two_fields() {
        let body: Value = serde_json::from_slice(&request_body(&["a", "b"])).unwrap();
        assert_eq!(
            body,
            json!({"external_ids": ["a", "b"], "fields_to_export": ["external_id", "custom_attributes"]})
        );
    }

    #[test]
    fn an_answer_gives_profiles_and_missing_users() {
        let body = json!({
            "message": "success",
            "users": [
                {"external_id": "a", "custom_attributes": {"cdp_x": true}},
                {"external_id": "b"},
                {"external_id": "zz", "custom_attributes": {}}
            ],
            "invalid_user_ids": ["c"]
        });
        let got = parse_answer(&["a", "b", "c", "d"], body.to_string().as_bytes()).unwrap();
        assert_eq!(
            got.profiles["a"],
            *json!({"cdp_x": true}).as_object().unwrap()
        );
        assert!(got.profiles["b"].is_empty());
        assert!(!got.profiles.contains_key("zz"), "not asked for");
        let mut missing: Vec<_> = got.missing.into_iter().collect();
        missing.sort();
        assert_eq!(missing, vec!["c", "d"]);
    }

    #[test]
    fn malformed_answers_are_errors_not_empty_profiles() {
        for body in [
            json!([1]),
            json!({"message": "success", "users": {}}),
            json!({"message": "success", "users": [{"custom_attributes": {}}]}),
            json!({"message": "success", "users": [{"external_id": "a", "custom_attributes": 3}]}),
        ] {
            assert!(
                parse_answer(&["a"], body.to_string().as_bytes()).is_err(),
                "{body}"
            );
        }
        let empty = parse_answer(&["a"], br#"{"message":"success","users":[]}"#).unwrap();
        assert!(empty.missing.contains("a"));
    }
}
