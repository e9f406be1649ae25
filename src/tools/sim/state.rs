//! The simulator's state and its `/users/track` processing, free of HTTP types: the server
//! turns a `Reply` into a response.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde_json::{json, Map, Value};

use super::export;
use super::limit::{Decision, FixedWindow};
use super::profile::apply;
use super::validate::{validate, Target};
use super::{Faults, SimConfig, SimStats};

/// Braze's limit of attributes objects in one request.
pub const MAX_OBJECTS: usize = 75;

/// An answer: status, rate-limit header values (when a limit is set), JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub rate: Option<Decision>,
    pub body: Value,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    accepted_requests: AtomicU64,
    objects_received: AtomicU64,
    objects_applied: AtomicU64,
    objects_rejected: AtomicU64,
    data_points: AtomicU64,
    max_objects_in_request: AtomicUsize,
    oversized_requests: AtomicU64,
    concurrent_user_violations: AtomicU64,
    responses_429: AtomicU64,
    responses_5xx: AtomicU64,
    responses_401: AtomicU64,
    export_requests: AtomicU64,
    users_exported: AtomicU64,
}

pub struct SimState {
    api_key: String,
    rate_limit: u32,
    profiles: DashMap<String, Map<String, Value>>,
    faults: Mutex<Faults>,
    limiter: Mutex<FixedWindow>,
    /// `/users/export/ids` has a limit of its own at Braze; `None`: no limit.
    export_limiter: Mutex<Option<FixedWindow>>,
    /// Users of requests being processed, with how many requests hold each.
    in_flight: Mutex<HashMap<String, u32>>,
    counters: Counters,
}

/// Removes a request's users from the in-flight set even when the client hangs up mid-request.
struct InFlight<'a> {
    state: &'a SimState,
    users: Vec<String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.state.in_flight);
        for u in &self.users {
            if let Some(n) = held.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    held.remove(u);
                }
            }
        }
    }
}

/// The simulator's locks guard plain values, consistent even after a panic elsewhere.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `rand::random_bool` panics outside [0, 1]; a fault rate is clamped instead.
fn chance(p: f64) -> bool {
    if p.is_nan() || p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rand::random_bool(p)
    }
}

fn message(status: u16, text: &str, rate: Option<Decision>) -> Reply {
    Reply {
        status,
        rate,
        body: json!({ "message": text }),
    }
}

/// The identifier values an object's user is known by, for the prefix and marker faults.
fn identifier_values(element: &Value) -> impl Iterator<Item = &str> {
    ["external_id", "email"]
        .into_iter()
        .filter_map(move |f| element.get(f).and_then(Value::as_str))
}

impl SimState {
    pub fn new(cfg: &SimConfig) -> SimState {
        SimState {
            api_key: cfg.api_key.clone(),
            rate_limit: cfg.rate_limit,
            profiles: DashMap::new(),
            faults: Mutex::new(cfg.faults.clone()),
            limiter: Mutex::new(FixedWindow::new(cfg.rate_limit, cfg.rate_window_secs)),
            export_limiter: Mutex::new(Some(FixedWindow::new(
                export::EXPORT_RATE_LIMIT,
                export::EXPORT_RATE_WINDOW_SECS,
            ))),
            in_flight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// Every profile, keyed `external_id:<id>`, `email:<address>`, ...
    pub fn profiles(&self) -> BTreeMap<String, Map<String, Value>> {
        self.profiles
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// One profile by its key (`external_id:<id>`, ...).
    pub fn profile(&self, key: &str) -> Option<Map<String, Value>> {
        self.profiles.get(key).map(|p| p.value().clone())
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            requests: get(&c.requests),
            accepted_requests: get(&c.accepted_requests),
            objects_received: get(&c.objects_received),
            objects_applied: get(&c.objects_applied),
            objects_rejected: get(&c.objects_rejected),
            data_points: get(&c.data_points),
            max_objects_in_request: c.max_objects_in_request.load(Ordering::Relaxed),
            oversized_requests: get(&c.oversized_requests),
            concurrent_user_violations: get(&c.concurrent_user_violations),
            responses_429: get(&c.responses_429),
            responses_5xx: get(&c.responses_5xx),
            responses_401: get(&c.responses_401),
            export_requests: get(&c.export_requests),
            users_exported: get(&c.users_exported),
        }
    }

    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, f: Faults) {
        *lock(&self.faults) = f;
    }

    /// Replaces a profile's attributes (the identifier is its key, not an attribute): drift
    /// made by hand, as someone editing a user in Braze's dashboard would.
    pub fn put_profile(&self, key: &str, attributes: Map<String, Value>) {
        self.profiles.insert(key.to_string(), attributes);
    }

    /// Deletes a profile; false when there was none.
    pub fn remove_profile(&self, key: &str) -> bool {
        self.profiles.remove(key).is_some()
    }

    /// `/users/export/ids` allows `limit` requests per `window_secs` (Braze's default: 250 a
    /// minute); 0 lifts the limit.
    pub fn set_export_rate_limit(&self, limit: u32, window_secs: u64) {
        *lock(&self.export_limiter) = (limit > 0).then(|| FixedWindow::new(limit, window_secs));
    }

    /// `POST /users/export/ids` with this `Authorization` header value and body.
    pub fn export(&self, authorization: Option<&str>, body: &[u8]) -> Reply {
        let c = &self.counters;
        inc(&c.requests);
        let key = authorization.and_then(|a| a.strip_prefix("Bearer "));
        if key != Some(self.api_key.as_str()) {
            inc(&c.responses_401);
            return message(401, "Invalid API key", None);
        }
        let rate = lock(&self.export_limiter).as_mut().map(|l| l.hit(now_ms()));
        if rate.is_some_and(|d| !d.allowed) {
            inc(&c.responses_429);
            return message(429, "API rate limit exceeded", rate);
        }
        let request = match export::parse_request(body) {
            Ok(r) => r,
            Err(why) => return message(400, &why, rate),
        };
        inc(&c.export_requests);
        let mut users = Vec::new();
        let mut not_found = Vec::new();
        for id in &request.external_ids {
            match self.profiles.get(&format!("external_id:{id}")) {
                Some(profile) => users.push(export::user_object(id, &profile, &request.fields)),
                None => not_found.push(id.clone()),
            }
        }
        c.users_exported
            .fetch_add(users.len() as u64, Ordering::Relaxed);
        Reply {
            status: 201,
            rate,
            body: export::answer(users, not_found),
        }
    }

    /// Forgets every profile and zeroes the statistics; faults and the rate window stay.
    pub fn reset(&self) {
        self.profiles.clear();
        let c = &self.counters;
        for a in [
            &c.requests,
            &c.accepted_requests,
            &c.objects_received,
            &c.objects_applied,
            &c.objects_rejected,
            &c.data_points,
            &c.oversized_requests,
            &c.concurrent_user_violations,
            &c.responses_429,
            &c.responses_5xx,
            &c.responses_401,
            &c.export_requests,
            &c.users_exported,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        c.max_objects_in_request.store(0, Ordering::Relaxed);
    }

    /// `POST /users/track` with this `Authorization` header value and body.
    pub async fn track(&self, authorization: Option<&str>, body: &[u8]) -> Reply {
        let c = &self.counters;
        inc(&c.requests);
        let key = authorization.and_then(|a| a.strip_prefix("Bearer "));
        if key != Some(self.api_key.as_str()) {
            inc(&c.responses_401);
            return message(401, "Invalid API key", None);
        }
        let rate = (self.rate_limit > 0).then(|| lock(&self.limiter).hit(now_ms()));
        if rate.is_some_and(|d| !d.allowed) {
            inc(&c.responses_429);
            return message(429, "API rate limit exceeded", rate);
        }
        if let Some(reply) = self.injected_failure(rate) {
            return reply;
        }
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return message(400, "Invalid JSON in request body", rate);
        };
        let elements: &[Value] = match request.get("attributes") {
            None | Some(Value::Null) => &[],
            Some(Value::Array(a)) => a,
            Some(_) => return message(400, "'attributes' must be an array", rate),
        };
        c.max_objects_in_request
            .fetch_max(elements.len(), Ordering::Relaxed);
        c.objects_received
            .fetch_add(elements.len() as u64, Ordering::Relaxed);
        if elements.len() > MAX_OBJECTS {
            inc(&c.oversized_requests);
            return message(
                400,
                &format!(
                    "Too many attributes objects: {} (at most {MAX_OBJECTS} per request)",
                    elements.len()
                ),
                rate,
            );
        }
        let faults = self.faults();
        if let Some(marker) = faults.bad_request_marker.as_deref() {
            if elements
                .iter()
                .any(|e| identifier_values(e).any(|id| id.contains(marker)))
            {
                return message(
                    400,
                    "Bad request: injected fault (bad_request_marker)",
                    rate,
                );
            }
        }
        let checked: Vec<Result<Target, String>> = elements
            .iter()
            .map(|e| {
                let target = validate(e)?;
                if let Some(prefix) = faults.reject_prefix.as_deref() {
                    if identifier_values(e).any(|id| id.starts_with(prefix)) {
                        return Err("injected rejection (reject_prefix)".into());
                    }
                }
                if chance(faults.reject_rate) {
                    return Err("injected rejection (reject_rate)".into());
                }
                Ok(target)
            })
            .collect();
        let _held = self.hold_users(&checked);
        let latency = faults.latency_ms
            + match faults.latency_jitter_ms {
                0 => 0,
                j => rand::random_range(0..=j),
            };
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let mut errors = Vec::new();
        for (index, (element, check)) in elements.iter().zip(&checked).enumerate() {
            match (check, element.as_object()) {
                (Ok(target), Some(object)) => self.apply(target, object),
                (Err(why), _) => {
                    inc(&c.objects_rejected);
                    errors.push(json!({"type": why, "input_array": "attributes", "index": index}));
                }
                // validate() accepts objects only.
                (Ok(_), None) => {}
            }
        }
        inc(&c.accepted_requests);
        let mut body = json!({
            "message": "success",
            "attributes_processed": elements.len() - errors.len(),
        });
        if !errors.is_empty() {
            body["errors"] = Value::Array(errors);
        }
        Reply {
            status: 201,
            rate,
            body,
        }
    }

    /// The `fail_next_*` and `fail_5xx_rate` faults, in that order.
    fn injected_failure(&self, rate: Option<Decision>) -> Option<Reply> {
        let c = &self.counters;
        let mut faults = lock(&self.faults);
        if faults.fail_next_429 > 0 {
            faults.fail_next_429 -= 1;
            inc(&c.responses_429);
            let reset = now_ms() / 1000 + faults.reset_after_s.max(1);
            let limit = rate.map_or(self.rate_limit, |d| d.limit);
            let rate = Decision {
                allowed: false,
                limit,
                remaining: 0,
                reset,
            };
            return Some(message(429, "API rate limit exceeded", Some(rate)));
        }
        let status = if faults.fail_next_5xx > 0 {
            faults.fail_next_5xx -= 1;
            // Alternate, so clients see both of Braze's usual outage answers.
            if faults.fail_next_5xx % 2 == 0 {
                500
            } else {
                503
            }
        } else if chance(faults.fail_5xx_rate) {
            503
        } else {
            return None;
        };
        inc(&c.responses_5xx);
        Some(message(status, "Internal server error (injected)", rate))
    }

    /// Marks the request's users in flight; counts a violation when one already is.
    fn hold_users(&self, checked: &[Result<Target, String>]) -> InFlight<'_> {
        let users: Vec<String> = checked
            .iter()
            .filter_map(|t| t.as_ref().ok().map(|t| t.key.clone()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut held = lock(&self.in_flight);
        if users.iter().any(|u| held.contains_key(u)) {
            inc(&self.counters.concurrent_user_violations);
        }
        for u in &users {
            *held.entry(u.clone()).or_insert(0) += 1;
        }
        InFlight { state: self, users }
    }

    fn apply(&self, target: &Target, object: &Map<String, Value>) {
        let c = &self.counters;
        let written = if target.update_existing_only {
            match self.profiles.get_mut(&target.key) {
                Some(mut profile) => apply(&mut profile, object, target.id_field),
                // Braze skips unknown users silently here: not an error, nothing created.
                None => return,
            }
        } else {
            let mut profile = self.profiles.entry(target.key.clone()).or_default();
            apply(&mut profile, object, target.id_field)
        };
        inc(&c.objects_applied);
        c.data_points.fetch_add(written, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sim(rate_limit: u32, faults: Faults) -> SimState {
        SimState::new(&SimConfig {
            api_key: "k".into(),
            rate_limit,
            rate_window_secs: 60,
            faults,
        })
    }

    fn body(objects: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({ "attributes": objects })).unwrap()
    }

    const AUTH: Option<&str> = Some("Bearer k");

    #[tokio::test]
    async fn applies_valid_objects_and_lists_the_invalid_ones() {
        let s = sim(0, Faults::default());
        let r = s
            .track(
                AUTH,
                &body(vec![
                    json!({"external_id": "u1", "seg_a": true, "seg_b": false}),
                    json!({"seg_a": true}),
                    json!({"email": "e@x.io", "$bad": 1}),
                    json!({"email": "e@x.io", "seg_a": true}),
                ]),
            )
            .await;
        assert_eq!(r.status, 201);
        assert_eq!(r.body["message"], "success");
        assert_eq!(r.body["attributes_processed"], 2);
        let indexes: Vec<_> = r.body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, vec![1, 2]);
        assert_eq!(r.rate, None);
        let p = s.profiles();
        assert_eq!(
            p["external_id:u1"],
            *json!({"seg_a": true, "seg_b": false}).as_object().unwrap()
        );
        assert_eq!(
            p["email:e@x.io"],
            *json!({"seg_a": true}).as_object().unwrap()
        );
        let st = s.stats();
        assert_eq!(
            (
                st.objects_received,
                st.objects_applied,
                st.objects_rejected,
                st.data_points
            ),
            (4, 2, 2, 3)
        );
    }

    #[tokio::test]
    async fn update_existing_only_does_not_create_users() {
        let s = sim(0, Faults::default());
        let r = s
            .track(
                AUTH,
                &body(vec![
                    json!({"external_id": "new", "_update_existing_only": true, "s": true}),
                ]),
            )
            .await;
        assert_eq!(r.status, 201);
        assert!(r.body.get("errors").is_none());
        assert!(s.profiles().is_empty());
        s.track(AUTH, &body(vec![json!({"external_id": "new", "a": 1})]))
            .await;
        s.track(
            AUTH,
            &body(vec![
                json!({"external_id": "new", "_update_existing_only": true, "s": true}),
            ]),
        )
        .await;
        assert_eq!(s.profile("external_id:new").unwrap()["s"], json!(true));
    }

    #[tokio::test]
    async fn wrong_or_missing_key_is_401() {
        let s = sim(0, Faults::default());
        for auth in [None, Some("Bearer nope"), Some("k")] {
            let r = s
                .track(auth, &body(vec![json!({"external_id": "u"})]))
                .await;
            assert_eq!(r.status, 401);
        }
        assert_eq!(s.stats().responses_401, 3);
        assert!(s.profiles().is_empty());
    }

    #[tokio::test]
    async fn more_than_75_objects_is_refused_whole() {
        let s = sim(0, Faults::default());
        let objects = (0..76)
            .map(|i| json!({"external_id": format!("u{i}")}))
            .collect();
        let r = s.track(AUTH, &body(objects)).await;
        assert_eq!(r.status, 400);
        assert!(s.profiles().is_empty());
        let st = s.stats();
        assert_eq!((st.oversized_requests, st.max_objects_in_request), (1, 76));
    }

    #[tokio::test]
    async fn malformed_requests_are_400() {
        let s = sim(0, Faults::default());
        assert_eq!(s.track(AUTH, b"{not json").await.status, 400);
        assert_eq!(s.track(AUTH, br#"{"attributes": 3}"#).await.status, 400);
    }

    #[tokio::test]
    async fn rate_limit_counts_down_and_answers_429() {
        let s = sim(2, Faults::default());
        let one = body(vec![json!({"external_id": "u"})]);
        let a = s.track(AUTH, &one).await;
        let b = s.track(AUTH, &one).await;
        let c = s.track(AUTH, &one).await;
        assert_eq!((a.status, b.status, c.status), (201, 201, 429));
        assert_eq!(a.rate.unwrap().remaining, 1);
        assert_eq!(b.rate.unwrap().remaining, 0);
        assert!(c.rate.unwrap().reset * 1000 > now_ms());
        assert_eq!(s.stats().responses_429, 1);
    }

    #[tokio::test]
    async fn injected_faults_come_first_then_stop() {
        let s = sim(
            0,
            Faults {
                fail_next_429: 1,
                fail_next_5xx: 2,
                ..Faults::default()
            },
        );
        let one = body(vec![json!({"external_id": "u"})]);
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(s.track(AUTH, &one).await.status);
        }
        assert_eq!(statuses, vec![429, 503, 500, 201]);
        let st = s.stats();
        assert_eq!(
            (st.responses_429, st.responses_5xx, st.accepted_requests),
            (1, 2, 1)
        );
    }

    #[tokio::test]
    async fn reject_prefix_and_marker_faults() {
        let s = sim(
            0,
            Faults {
                reject_prefix: Some("bad-".into()),
                bad_request_marker: Some("poison".into()),
                ..Faults::default()
            },
        );
        let r = s
            .track(
                AUTH,
                &body(vec![
                    json!({"external_id": "ok"}),
                    json!({"external_id": "bad-1"}),
                ]),
            )
            .await;
        assert_eq!(r.body["errors"][0]["index"], 1);
        let r = s
            .track(
                AUTH,
                &body(vec![
                    json!({"external_id": "ok"}),
                    json!({"email": "x-poison@y.z"}),
                ]),
            )
            .await;
        assert_eq!(r.status, 400);
    }

    #[tokio::test]
    async fn a_user_in_two_requests_at_once_is_a_violation() {
        let s = Arc::new(sim(
            0,
            Faults {
                latency_ms: 100,
                ..Faults::default()
            },
        ));
        let req = |ids: &[&str]| body(ids.iter().map(|i| json!({"external_id": i})).collect());
        let (a, b) = (req(&["u1", "u2"]), req(&["u3", "u1"]));
        tokio::join!(s.track(AUTH, &a), s.track(AUTH, &b));
        assert_eq!(s.stats().concurrent_user_violations, 1);
        // Sequential requests for the same user are fine, and the same user twice in one too.
        s.track(AUTH, &req(&["u1", "u1"])).await;
        s.track(AUTH, &req(&["u1"])).await;
        assert_eq!(s.stats().concurrent_user_violations, 1);
    }

    fn export_body(ids: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "external_ids": ids,
            "fields_to_export": ["external_id", "custom_attributes"]
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn export_reads_profiles_back_and_lists_unknown_users_apart() {
        let s = sim(0, Faults::default());
        s.track(
            AUTH,
            &body(vec![
                json!({"external_id": "u1", "seg_a": true, "email": "a@b.c"}),
            ]),
        )
        .await;
        let r = s.export(AUTH, &export_body(&["u1", "u2"]));
        assert_eq!(r.status, 201);
        assert_eq!(
            r.body,
            json!({
                "message": "success",
                "users": [{"external_id": "u1", "custom_attributes": {"seg_a": true}}],
                "invalid_user_ids": ["u2"]
            })
        );
        assert_eq!(
            s.export(Some("Bearer nope"), &export_body(&["u1"])).status,
            401
        );
        let no_fields = serde_json::to_vec(&json!({"external_ids": ["u1"]})).unwrap();
        assert_eq!(s.export(AUTH, &no_fields).status, 400);
        let st = s.stats();
        assert_eq!((st.export_requests, st.users_exported), (1, 1));
    }

    #[tokio::test]
    async fn export_has_a_rate_limit_of_its_own() {
        let s = sim(0, Faults::default());
        s.set_export_rate_limit(2, 60);
        let statuses: Vec<u16> = (0..3)
            .map(|_| s.export(AUTH, &export_body(&["u1"])).status)
            .collect();
        assert_eq!(statuses, vec![201, 201, 429]);
        let limited = s.export(AUTH, &export_body(&["u1"]));
        assert_eq!(limited.rate.unwrap().remaining, 0);
        // /users/track is not held by the export limit.
        assert_eq!(
            s.track(AUTH, &body(vec![json!({"external_id": "u"})]))
                .await
                .status,
            201
        );
        s.set_export_rate_limit(0, 60);
        assert_eq!(s.export(AUTH, &export_body(&["u1"])).status, 201);
    }

    #[tokio::test]
    async fn profiles_can_be_edited_and_deleted_by_hand() {
        let s = sim(0, Faults::default());
        s.put_profile(
            "external_id:u1",
            json!({"x": 1}).as_object().unwrap().clone(),
        );
        assert_eq!(s.profile("external_id:u1").unwrap()["x"], json!(1));
        assert!(s.remove_profile("external_id:u1"));
        assert!(!s.remove_profile("external_id:u1"));
    }

    #[tokio::test]
    async fn reset_forgets_profiles_and_stats() {
        let s = sim(0, Faults::default());
        s.track(AUTH, &body(vec![json!({"external_id": "u"})]))
            .await;
        s.reset();
        assert!(s.profiles().is_empty());
        assert_eq!(s.stats().requests, 0);
    }
}
