//! The Braze client against the in-process simulator: delivery, per-object rejections,
//! splitting on 400, retries through 5xx and 429, configuration faults, and pacing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use segment_sync::braze::{BrazeClient, ObjectOutcome};
use segment_sync::config::BrazeConfig;
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::tools::sim::{self, Faults, SimConfig, SimHandle};
use serde_json::json;

const KEY: &str = "test-key";

async fn simulator(rate_limit: u32, faults: Faults) -> SimHandle {
    let cfg = SimConfig {
        api_key: KEY.into(),
        rate_limit,
        rate_window_secs: 1,
        faults,
    };
    sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

struct Client {
    client: BrazeClient,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

fn client(sim: &SimHandle, key: &str) -> Client {
    let cfg = BrazeConfig {
        endpoint: sim.url(),
        api_key: Some(key.into()),
        requests_per_second: 1000,
        timeout_ms: 2000,
        ..BrazeConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let client = BrazeClient::new(&cfg, metrics.clone(), health.clone()).expect("client");
    Client {
        client,
        metrics,
        health,
    }
}

fn object(id: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&json!({"external_id": id, "seg_1": true})).unwrap())
}

fn objects(ids: &[&str]) -> Vec<Bytes> {
    ids.iter().map(|id| object(id)).collect()
}

fn requests(m: &Metrics, class: &str) -> u64 {
    m.braze_requests.with_label_values(&[class]).get()
}

#[tokio::test]
async fn delivers_every_object_and_braze_stores_them() {
    let sim = simulator(0, Faults::default()).await;
    let c = client(&sim, KEY);
    let ids: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let outcomes = c.client.deliver(objects(&ids)).await;
    assert_eq!(outcomes, vec![ObjectOutcome::Delivered; 20]);
    let profiles = sim.state.profiles();
    assert_eq!(profiles.len(), 20);
    assert_eq!(profiles["external_id:user-7"]["seg_1"], json!(true));
    assert_eq!(sim.state.stats().requests, 1, "one request for 20 objects");
    assert_eq!(c.metrics.braze_objects_delivered.get(), 20);
    assert_eq!(requests(&c.metrics, "2xx"), 1);
    assert_eq!(c.metrics.braze_request_duration.get_sample_count(), 1);
    assert!(c.client.deliver(Vec::new()).await.is_empty());
    assert_eq!(
        sim.state.stats().requests,
        1,
        "nothing to send, nothing sent"
    );
}

#[tokio::test]
async fn per_object_errors_reject_exactly_those_objects() {
    let sim = simulator(
        0,
        Faults {
            reject_prefix: Some("bad-".into()),
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY);
    let outcomes = c
        .client
        .deliver(objects(&["ok-1", "bad-2", "ok-3", "bad-4"]))
        .await;
    let rejected: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            ObjectOutcome::Rejected(r) => {
                assert_eq!(r.status, 201);
                assert!(r.error_type.contains("reject_prefix"), "{r:?}");
                Some(i)
            }
            ObjectOutcome::Delivered => None,
        })
        .collect();
    assert_eq!(rejected, vec![1, 3]);
    assert_eq!(
        sim.state.profiles().keys().cloned().collect::<Vec<_>>(),
        vec!["external_id:ok-1", "external_id:ok-3"]
    );
    assert_eq!(c.metrics.braze_objects_rejected.get(), 2);
    assert_eq!(c.metrics.braze_objects_delivered.get(), 2);
}

#[tokio::test]
async fn a_refused_request_is_split_down_to_the_offending_object() {
    let sim = simulator(
        0,
        Faults {
            bad_request_marker: Some("poison".into()),
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY);
    let ids = ["a", "b", "c", "d", "e", "poison-f", "g", "h"];
    let outcomes = c.client.deliver(objects(&ids)).await;
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            ObjectOutcome::Rejected(r) if i == 5 => {
                assert_eq!(r.status, 400);
                assert!(r.message.contains("bad_request_marker"), "{r:?}");
            }
            ObjectOutcome::Delivered if i != 5 => {}
            other => panic!("object {i}: {other:?}"),
        }
    }
    assert_eq!(sim.state.profiles().len(), 7);
    // 8 → 4+4 → the bad 4 → 2+2 → the bad 2 → 1+1: 1 + 2 + 2 + 2 requests.
    assert_eq!(sim.state.stats().requests, 7);
    assert_eq!(sim.state.stats().max_objects_in_request, 8);
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried_until_delivered() {
    let sim = simulator(
        0,
        Faults {
            fail_next_5xx: 3,
            fail_next_429: 2,
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY);
    let outcomes = c.client.deliver(objects(&["u1", "u2", "u3"])).await;
    assert_eq!(outcomes, vec![ObjectOutcome::Delivered; 3]);
    assert_eq!(sim.state.profiles().len(), 3);
    let m = &c.metrics;
    assert_eq!(m.braze_retries.get(), 5);
    assert_eq!(m.braze_rate_limited.get(), 2);
    assert_eq!(requests(m, "429"), 2);
    assert_eq!(requests(m, "5xx"), 3);
    assert_eq!(requests(m, "2xx"), 1);
    // Three failures in a row flagged Braze unreachable; the success cleared it.
    assert!(c.health.braze_ok.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_wrong_key_pauses_delivery_and_fails_readiness() {
    let sim = simulator(0, Faults::default()).await;
    let c = client(&sim, "wrong-key");
    c.health.assigned.store(true, Ordering::Relaxed);
    c.health.consuming.store(true, Ordering::Relaxed);
    assert!(c.health.readiness().is_ok());
    let client = c.client.clone();
    let task = tokio::spawn(async move { client.deliver(objects(&["u1"])).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !task.is_finished(),
        "objects are neither delivered nor rejected"
    );
    let why = c.health.readiness().expect_err("not ready");
    assert!(why.contains("401"), "{why}");
    assert!(!why.contains("wrong-key"), "the key is never shown: {why}");
    assert_eq!(c.metrics.braze_objects_rejected.get(), 0);
    assert!(sim.state.profiles().is_empty());
    task.abort();
}

/// A captive portal, a corporate proxy or a wrong host answers 200 with its own HTML page.
async fn not_braze_answering(
    status: u16,
    content_type: &'static str,
    body: &'static str,
) -> String {
    use axum::http::{header, StatusCode};
    let app = axum::Router::new().fallback(move || async move {
        (
            StatusCode::from_u16(status).expect("status"),
            [(header::CONTENT_TYPE, content_type)],
            body,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_success_status_with_a_foreign_body_is_not_a_delivery() {
    let endpoint = not_braze_answering(
        200,
        "text/html",
        "<html><body>Sign in to the guest network</body></html>",
    )
    .await;
    let cfg = BrazeConfig {
        endpoint: endpoint.clone(),
        api_key: Some(KEY.into()),
        timeout_ms: 2000,
        ..BrazeConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    health.assigned.store(true, Ordering::Relaxed);
    health.consuming.store(true, Ordering::Relaxed);
    let client = BrazeClient::new(&cfg, metrics.clone(), health.clone()).expect("client");
    let task = tokio::spawn(async move { client.deliver(objects(&["u1", "u2"])).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while health.readiness().is_ok() && !task.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !task.is_finished(),
        "the objects must be neither delivered nor rejected: {:?}",
        if task.is_finished() {
            Some(task.await)
        } else {
            None
        }
    );
    let why = health.readiness().expect_err("not ready");
    assert!(why.contains("200"), "{why}");
    assert!(why.contains(&endpoint), "names the endpoint: {why}");
    assert!(
        why.contains("Sign in to the guest network"),
        "shows the answer: {why}"
    );
    assert!(!why.contains(KEY), "the key is never shown: {why}");
    assert_eq!(metrics.braze_objects_delivered.get(), 0);
    assert_eq!(metrics.braze_objects_rejected.get(), 0);
    assert_eq!(requests(&metrics, "2xx"), 1);
    task.abort();
}

#[tokio::test]
async fn unreachable_braze_is_retried_and_reported() {
    // A port that was just free: connections are refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = BrazeConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        api_key: Some(KEY.into()),
        ..BrazeConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let client = BrazeClient::new(&cfg, metrics.clone(), health.clone()).unwrap();
    let task = tokio::spawn(async move { client.deliver(objects(&["u1"])).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while health.braze_ok.load(Ordering::Relaxed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!health.braze_ok.load(Ordering::Relaxed));
    assert!(requests(&metrics, "error") >= 3);
    assert!(!task.is_finished());
    task.abort();
}

/// docs/design.md: against a limit of R requests/s, ≥ 90% of R used with < 1% answered 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_keeps_close_to_the_limit_without_429s() {
    const LIMIT: u32 = 200;
    const WINDOWS: u32 = 3;
    // Latency makes answers arrive late and out of order, as Braze's do.
    let latency = Faults {
        latency_ms: 10,
        latency_jitter_ms: 10,
        ..Faults::default()
    };
    let sim = simulator(LIMIT, latency).await;
    let c = client(&sim, KEY);
    // Start on a window boundary (the simulator's windows are whole epoch seconds), so the run
    // covers exactly three windows and any unused budget shows.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    tokio::time::sleep(Duration::from_secs(now.as_secs() + 1) - now).await;
    let run_for = Duration::from_secs(WINDOWS.into());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let client = c.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while start.elapsed() < run_for {
                let out = client.deliver(vec![object(&format!("t{t}-{n}"))]).await;
                assert_eq!(out, vec![ObjectOutcome::Delivered]);
                n += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = sim.state.stats();
    let used = stats.accepted_requests as f64 / f64::from(LIMIT * WINDOWS);
    let share_429 = stats.responses_429 as f64 / stats.requests as f64;
    eprintln!(
        "pacing: {:.1}% of the limit used, {:.2}% answered 429",
        used * 100.0,
        share_429 * 100.0
    );
    assert!(used >= 0.9, "{:.1}% used ({stats:?})", used * 100.0);
    assert!(
        share_429 < 0.01,
        "{:.2}% answered 429 ({stats:?})",
        share_429 * 100.0
    );
}

fn epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

#[tokio::test]
async fn a_429_holds_every_concurrent_caller_until_the_reset() {
    let sim = simulator(
        0,
        Faults {
            fail_next_429: 1,
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY);
    // Just after a second boundary, so the 429's reset (the next second) is ~1 s away.
    let now = epoch();
    tokio::time::sleep(Duration::from_secs(now.as_secs() + 1) - now).await;
    let second = epoch().as_secs();
    let first = c.client.clone();
    let a = tokio::spawn(async move { first.deliver(objects(&["a"])).await });
    while sim.state.stats().responses_429 == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // This caller never got a 429 itself, but must not send before the reset either.
    let b = c.client.deliver(objects(&["b"])).await;
    assert_eq!(b, vec![ObjectOutcome::Delivered]);
    assert!(epoch().as_secs() > second, "sent before the reset");
    assert_eq!(a.await.unwrap(), vec![ObjectOutcome::Delivered]);
    assert_eq!(sim.state.stats().responses_429, 1);
}

#[tokio::test]
async fn simulator_routes_show_state_and_take_faults() {
    let sim = simulator(0, Faults::default()).await;
    let http = reqwest::Client::new();
    let url = sim.url();
    let track = |auth: &'static str| {
        http.post(format!("{url}/users/track"))
            .header("Authorization", auth)
            .header("Content-Type", "application/json")
            .body(r#"{"attributes":[{"external_id":"u1","seg":true},{"seg":true}]}"#)
            .send()
    };
    let r = track("Bearer nope").await.unwrap();
    assert_eq!(r.status(), 401);
    let r = track("Bearer test-key").await.unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["index"], 1);
    let get = |path: &str| {
        let req = http.get(format!("{url}{path}"));
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        get("/profiles").await,
        json!({"external_id:u1": {"seg": true}})
    );
    assert_eq!(get("/profiles/external_id/u1").await, json!({"seg": true}));
    let stats = get("/stats").await;
    assert_eq!(
        (stats["requests"].clone(), stats["responses_401"].clone()),
        (json!(2), json!(1))
    );
    let r = http
        .post(format!("{url}/faults"))
        .json(&json!({"fail_next_5xx": 1}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(sim.state.faults().fail_next_5xx, 1);
    assert_eq!(
        track("Bearer test-key").await.unwrap().status().as_u16() / 100,
        5
    );
    let r = http.post(format!("{url}/reset")).send().await.unwrap();
    assert!(r.status().is_success());
    assert_eq!(get("/profiles").await, json!({}));
    assert_eq!(get("/stats").await["requests"], json!(0));
}

/// A gateway that echoes the key it refused: neither `/readyz` nor the log may repeat it,
/// whole or in part.
#[tokio::test]
async fn a_refusal_that_echoes_the_key_does_not_repeat_it() {
    const SECRET: &str = "b7e1c2d4-0f3a-4c5e-9a8b-1d2e3f405162";
    for (status, body) in [
        (
            401,
            r#"{"message":"Invalid API key: b7e1c2d4-0f3a-4c5e-9a8b-1d2e3f405162"}"#,
        ),
        (
            403,
            r#"{"message":"key b7e1c2d4-0f3a-... lacks users.track"}"#,
        ),
        (
            200,
            "<html>Bearer b7e1c2d4-0f3a-4c5e-9a8b-1d2e3f405162</html>",
        ),
    ] {
        let endpoint = not_braze_answering(status, "application/json", body).await;
        let cfg = BrazeConfig {
            endpoint,
            api_key: Some(SECRET.into()),
            timeout_ms: 2000,
            ..BrazeConfig::default()
        };
        let health = Arc::new(Health::new());
        health.assigned.store(true, Ordering::Relaxed);
        health.consuming.store(true, Ordering::Relaxed);
        let client =
            BrazeClient::new(&cfg, Arc::new(Metrics::new()), health.clone()).expect("client");
        let task = tokio::spawn(async move { client.deliver(objects(&["u1"])).await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while health.readiness().is_ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let why = health.readiness().expect_err("not ready");
        assert!(why.contains(&status.to_string()), "{why}");
        assert!(!why.contains("b7e1c2d4-0f3a"), "the key is shown: {why}");
        task.abort();
    }
}

/// Issue 19, the revoke drain: Braze refuses a malformed request before doing any work, so
/// its 400 comes back far sooner than a processed request. Taken as how fast Braze is, those
/// answers made every ordinary answer look slow, and the in-flight limit collapsed to one
/// request at a time while a batch was being split: the drain then ran out of time.
#[tokio::test]
async fn quick_refusals_do_not_shrink_the_in_flight_limit() {
    let sim = simulator(
        0,
        Faults {
            latency_ms: 60,
            bad_request_marker: Some("poison".into()),
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY);
    // Ordinary answers first: the limit grows while probing.
    for _ in 0..4 {
        c.client.deliver(objects(&["a", "b"])).await;
    }
    let before = c.metrics.braze_concurrency_limit.get();
    // A request split down to its bad object: every refusal is answered at once.
    let ids: Vec<String> = (0..16)
        .map(|i| {
            if i == 9 {
                "poison-9".into()
            } else {
                format!("u{i}")
            }
        })
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    c.client.deliver(objects(&refs)).await;
    assert!(requests(&c.metrics, "4xx") >= 4);
    // Ordinary answers again, as slow as before: no sign of overload.
    for _ in 0..4 {
        c.client.deliver(objects(&["a", "b"])).await;
    }
    let after = c.metrics.braze_concurrency_limit.get();
    assert!(
        after >= before,
        "the in-flight limit fell from {before} to {after} after quick 400s"
    );
}
