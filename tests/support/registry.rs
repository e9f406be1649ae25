//! A tiny Confluent schema registry run by the test on a free loopback port: just the two
//! calls the worker and `produce` make.
//!
//! - `GET /schemas/ids/{id}` → `{"schema": "..."}`, 404 for an unknown id
//! - `POST /subjects/{subject}/versions` with `{"schema": "..."}` → `{"id": N}`; the same
//!   schema text gets the same id again, under any subject, as the real registry does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

#[derive(Default)]
struct Schemas {
    /// Index + 1 is the id: ids start at 1 as in the real registry.
    texts: Mutex<Vec<String>>,
    fetches: AtomicU64,
    /// While set, schema lookups answer 503, as a registry in an outage does.
    down: AtomicBool,
}

impl Schemas {
    fn register(&self, schema: &str) -> u32 {
        let mut texts = self.texts.lock().expect("registry lock");
        let index = match texts.iter().position(|s| s == schema) {
            Some(i) => i,
            None => {
                texts.push(schema.to_string());
                texts.len() - 1
            }
        };
        index as u32 + 1
    }
}

/// The running registry; dropping it stops the server (its runtime goes with it).
pub struct Registry {
    pub url: String,
    schemas: Arc<Schemas>,
    _rt: tokio::runtime::Runtime,
}

impl Registry {
    pub fn start() -> Registry {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("registry runtime");
        let schemas = Arc::new(Schemas::default());
        let app = Router::new()
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/subjects/{subject}/versions", post(register))
            .with_state(schemas.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
                [127, 0, 0, 1],
                0,
            ))))
            .expect("registry listener");
        let addr = listener.local_addr().expect("registry address");
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Registry {
            url: format!("http://{addr}"),
            schemas,
            _rt: rt,
        }
    }

    /// Registers in-process, as `POST /subjects/.../versions` would.
    pub fn register(&self, schema: &str) -> u32 {
        self.schemas.register(schema)
    }

    /// An outage (`true`) or its end.
    pub fn set_down(&self, down: bool) {
        self.schemas.down.store(down, Ordering::Relaxed);
    }

    /// How many `GET /schemas/ids/{id}` requests were answered (found or not).
    pub fn fetches(&self) -> u64 {
        self.schemas.fetches.load(Ordering::Relaxed)
    }
}

async fn schema_by_id(State(schemas): State<Arc<Schemas>>, Path(id): Path<u32>) -> Response {
    schemas.fetches.fetch_add(1, Ordering::Relaxed);
    if schemas.down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "registry down").into_response();
    }
    let texts = schemas.texts.lock().expect("registry lock");
    match id
        .checked_sub(1)
        .and_then(|i| texts.get(i as usize))
        .cloned()
    {
        Some(schema) => Json(json!({ "schema": schema })).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40403, "message": "Schema not found"})),
        )
            .into_response(),
    }
}

/// The body's content type is Confluent's own (`application/vnd.schemaregistry.v1+json`),
/// which axum's `Json` extractor refuses, so the body is parsed here.
async fn register(
    State(schemas): State<Arc<Schemas>>,
    Path(_subject): Path<String>,
    body: Bytes,
) -> Response {
    let schema = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("schema")?.as_str().map(str::to_string));
    match schema {
        Some(s) if apache_avro::Schema::parse_str(&s).is_ok() => {
            Json(json!({ "id": schemas.register(&s) })).into_response()
        }
        _ => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error_code": 42201, "message": "Invalid schema"})),
        )
            .into_response(),
    }
}
