//! A Braze `/users/track` simulator, as a library for tests and the demo and as the
//! `braze-sim` subcommand. It keeps profiles, checks auth, the 75-object limit and the rate
//! limit (with Braze's headers), validates objects as Braze does, and injects latency, 429s,
//! 5xx and per-object errors on demand. `/users/export/ids` reads the profiles back, under
//! a rate limit of its own, for `verify`.

mod export;
mod limit;
mod profile;
mod server;
mod state;
mod validate;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use export::{EXPORT_RATE_LIMIT, MAX_EXPORT_IDS};
pub use limit::Decision;
pub use server::{start, SimHandle};
pub use state::{Reply, SimState, MAX_OBJECTS};

#[derive(Clone)]
pub struct SimConfig {
    /// The key clients must send as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Requests per window; 0 = no limit (and no rate-limit headers).
    pub rate_limit: u32,
    pub rate_window_secs: u64,
    pub faults: Faults,
}

/// Injected misbehaviour; `POST /faults` replaces it (missing fields take their defaults).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    pub latency_ms: u64,
    pub latency_jitter_ms: u64,
    /// The next N authorised requests get 500/503.
    pub fail_next_5xx: u32,
    /// Probability of a 503 per request.
    pub fail_5xx_rate: f64,
    /// The next N authorised requests get 429 (Remaining 0, Reset the next second, or
    /// `reset_after_s` seconds on).
    pub fail_next_429: u32,
    /// How far ahead an injected 429's `X-RateLimit-Reset` lies, in seconds (0: the next
    /// second).
    pub reset_after_s: u64,
    /// Objects whose external_id or email starts with this get a per-object error.
    pub reject_prefix: Option<String>,
    /// Probability of a per-object error per object.
    pub reject_rate: f64,
    /// A request with an object whose external_id or email contains this is answered 400 as a
    /// whole, as Braze does for a malformed request.
    pub bad_request_marker: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    pub requests: u64,
    /// Answered 2xx.
    pub accepted_requests: u64,
    pub objects_received: u64,
    pub objects_applied: u64,
    pub objects_rejected: u64,
    /// Attributes written by applied objects: every key except the identifier and
    /// `_update_existing_only` (what Braze bills).
    pub data_points: u64,
    pub max_objects_in_request: usize,
    /// More than 75 objects: answered 400.
    pub oversized_requests: u64,
    /// Requests holding a user that another request being processed also holds.
    pub concurrent_user_violations: u64,
    pub responses_429: u64,
    pub responses_5xx: u64,
    pub responses_401: u64,
    /// `/users/export/ids` requests answered with users.
    #[serde(default)]
    pub export_requests: u64,
    /// Users found and exported.
    #[serde(default)]
    pub users_exported: u64,
}

/// `segment-sync braze-sim`
#[derive(Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:4010")]
    pub listen: SocketAddr,
    /// The API key clients must present.
    #[arg(
        long,
        env = "BRAZE_API_KEY",
        default_value = "sim-key",
        hide_env_values = true
    )]
    pub api_key: String,
    /// Requests per window (Braze's default for /users/track: 3000 per 3 s); 0 = unlimited.
    #[arg(long, default_value_t = 3000)]
    pub rate_limit: u32,
    /// The window `--rate-limit` counts requests in, in seconds
    #[arg(long, default_value_t = 3)]
    pub rate_window_secs: u64,
    /// Added to every processed request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// A random extra latency up to this.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Probability of a 503 per request.
    #[arg(long, default_value_t = 0.0)]
    pub fail_5xx_rate: f64,
    /// Objects whose external_id or email starts with this are rejected.
    #[arg(long)]
    pub reject_prefix: Option<String>,
    /// `/users/export/ids` requests a minute (Braze's default: 250); 0 = unlimited.
    #[arg(long, default_value_t = EXPORT_RATE_LIMIT)]
    pub export_rate_limit: u32,
}

impl SimArgs {
    pub fn config(&self) -> SimConfig {
        SimConfig {
            api_key: self.api_key.clone(),
            rate_limit: self.rate_limit,
            rate_window_secs: self.rate_window_secs,
            faults: Faults {
                latency_ms: self.latency_ms,
                latency_jitter_ms: self.latency_jitter_ms,
                fail_5xx_rate: self.fail_5xx_rate,
                reject_prefix: self.reject_prefix.clone(),
                ..Faults::default()
            },
        }
    }
}

/// Serves until Ctrl-C or SIGTERM; prints the address on stdout once listening.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let handle = start(args.config(), args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("braze-sim cannot listen on {}: {e}", args.listen))?;
    handle
        .state
        .set_export_rate_limit(args.export_rate_limit, 60);
    println!("braze-sim listening on {}", handle.url());
    shutdown_signal().await;
    tracing::info!(stats = ?handle.state.stats(), "braze-sim stopping");
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
