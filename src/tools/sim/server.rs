//! The simulator's HTTP face: Braze's `/users/track` and `/users/export/ids`, plus routes
//! for tests and operators to inspect and edit profiles, read statistics and inject faults.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::state::{Reply, SimState};
use super::{Faults, SimConfig};

/// A running simulator. Dropping it stops serving.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// `http://<addr>`, the `braze.endpoint` for a client of this simulator.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets requests being answered finish (for up to a second), then stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Binds `addr` (port 0 picks a free one) and serves in a tokio task.
pub async fn start(cfg: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SimState::new(&cfg));
    let app = router(state.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "braze-sim stopped serving");
        }
    });
    Ok(SimHandle {
        addr,
        state,
        stop: Some(stop),
        task: Some(task),
    })
}

fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/users/track", post(track))
        .route("/users/export/ids", post(export))
        .route("/profiles", get(profiles))
        .route(
            "/profiles/{kind}/{id}",
            get(profile).put(put_profile).delete(delete_profile),
        )
        .route("/stats", get(stats))
        .route("/faults", post(set_faults).get(faults))
        .route("/reset", post(reset))
        .with_state(state)
}

async fn track(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let reply = state.track(auth, &body).await;
    respond(reply)
}

async fn export(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    respond(state.export(auth, &body))
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(reply.body)).into_response();
    if let Some(rate) = reply.rate {
        let h = response.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from(rate.limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(rate.remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(rate.reset));
    }
    response
}

async fn profiles(State(state): State<Arc<SimState>>) -> Response {
    Json(state.profiles()).into_response()
}

async fn profile(
    State(state): State<Arc<SimState>>,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    match state.profile(&format!("{kind}:{id}")) {
        Some(p) => Json(p).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "no such profile"})),
        )
            .into_response(),
    }
}

/// Replaces a profile's attributes: drift made by hand, for tests and demonstrations.
async fn put_profile(
    State(state): State<Arc<SimState>>,
    Path((kind, id)): Path<(String, String)>,
    Json(attributes): Json<Map<String, Value>>,
) -> StatusCode {
    state.put_profile(&format!("{kind}:{id}"), attributes);
    StatusCode::NO_CONTENT
}

async fn delete_profile(
    State(state): State<Arc<SimState>>,
    Path((kind, id)): Path<(String, String)>,
) -> StatusCode {
    if state.remove_profile(&format!("{kind}:{id}")) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn stats(State(state): State<Arc<SimState>>) -> Response {
    Json(state.stats()).into_response()
}

async fn faults(State(state): State<Arc<SimState>>) -> Response {
    Json(state.faults()).into_response()
}

async fn set_faults(State(state): State<Arc<SimState>>, Json(f): Json<Faults>) -> StatusCode {
    state.set_faults(f);
    StatusCode::NO_CONTENT
}

async fn reset(State(state): State<Arc<SimState>>) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}
