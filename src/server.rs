//! The worker's HTTP side: `/metrics` for Prometheus, `/healthz` for liveness (the process
//! answers) and `/readyz` for readiness (partitions assigned, consuming, Braze reachable).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::health::Health;
use crate::metrics::Metrics;

/// The Prometheus text exposition format version the scraper negotiates on.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The routes, for embedding in another server or testing without a socket.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

/// Serves until `shutdown` completes, then finishes the requests in progress and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Readiness as `/readyz` answers it, mirrored into `segment_sync_ready`. Health is a set of
/// flags the pipeline flips in many places; reading them when asked is what keeps the gauge
/// and the probe from ever disagreeing.
fn readiness(state: &AppState) -> Result<(), String> {
    let r = state.health.readiness();
    state.metrics.ready.set(i64::from(r.is_ok()));
    r
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let _ = readiness(&state);
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    match readiness(&state) {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    struct Running {
        base: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(metrics: Arc<Metrics>, health: Arc<Health>) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, metrics, health, async {
            let _ = stopped.await;
        }));
        Running {
            base,
            stop: Some(stop),
            task,
        }
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text() {
        let metrics = Arc::new(Metrics::new());
        let server = start(metrics.clone(), Arc::new(Health::new())).await;
        let resp = reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let ctype = resp.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        let body = resp.text().await.unwrap();
        assert_eq!(body, metrics.render());
        assert!(body.contains("segment_sync_"), "{body}");
    }

    #[tokio::test]
    async fn healthz_answers_ok_and_readyz_follows_health() {
        let health = Arc::new(Health::new());
        let server = start(Arc::new(Metrics::new()), health.clone()).await;
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{}{path}", server.base)).send();

        let resp = get("/healthz").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok");

        let resp = get("/readyz").await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp
            .text()
            .await
            .unwrap()
            .contains("no partitions assigned"));

        health.assigned.store(true, Ordering::Relaxed);
        health.consuming.store(true, Ordering::Relaxed);
        let resp = get("/readyz").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ready");

        health.set_braze_problem("braze answered 401: check BRAZE_API_KEY");
        let resp = get("/readyz").await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp.text().await.unwrap().contains("401"));

        let resp = get("/nothing-here").await.unwrap();
        assert_eq!(resp.status(), 404);
    }

    #[tokio::test]
    async fn the_ready_gauge_says_what_readyz_says() {
        let health = Arc::new(Health::new());
        let server = start(Arc::new(Metrics::new()), health.clone()).await;
        let scrape = || async {
            let body = reqwest::get(format!("{}/metrics", server.base))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            body.lines()
                .find_map(|l| l.strip_prefix("segment_sync_ready "))
                .map(str::to_string)
        };
        assert_eq!(scrape().await.as_deref(), Some("0"));
        health.assigned.store(true, Ordering::Relaxed);
        health.consuming.store(true, Ordering::Relaxed);
        assert_eq!(scrape().await.as_deref(), Some("1"));
        health.set_braze_problem("braze answered 401: check BRAZE_API_KEY");
        assert_eq!(scrape().await.as_deref(), Some("0"));
        health.set_braze_ok();
        assert_eq!(scrape().await.as_deref(), Some("1"));
    }

    #[tokio::test]
    async fn serve_returns_when_shutdown_completes() {
        let mut server = start(Arc::new(Metrics::new()), Arc::new(Health::new())).await;
        server.stop.take().unwrap().send(()).unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), server.task)
            .await
            .expect("serve did not stop")
            .unwrap();
        assert!(result.is_ok());
        assert!(reqwest::get(format!("{}/healthz", server.base))
            .await
            .is_err());
    }
}
