//! Liveness and readiness facts, set by the pipeline and the Braze client, read by `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    /// The consumer holds at least one partition.
    pub assigned: AtomicBool,
    /// The poll loop is running (set at subscribe, cleared at shutdown). Back-pressure pauses
    /// are normal operation and leave it set; a Braze fault shows in `braze_ok` instead.
    pub consuming: AtomicBool,
    /// The last Braze answer was not a configuration fault (401/403/404, or a 2xx whose body
    /// is not Braze's) nor unreachable.
    pub braze_ok: AtomicBool,
    /// Human-readable reason when braze_ok is false; for /readyz's body and logs.
    pub braze_problem: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new() -> Health {
        Health {
            braze_ok: AtomicBool::new(true),
            ..Health::default()
        }
    }

    pub fn set_braze_ok(&self) {
        self.braze_ok.store(true, Ordering::Relaxed);
        *self.braze_problem.lock().expect("health lock") = None;
    }

    pub fn set_braze_problem(&self, why: impl Into<String>) {
        self.braze_ok.store(false, Ordering::Relaxed);
        *self.braze_problem.lock().expect("health lock") = Some(why.into());
    }

    /// Ready when assigned, consuming and Braze is reachable and authorised; else the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.assigned.load(Ordering::Relaxed) {
            return Err("no partitions assigned".into());
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Err("not consuming".into());
        }
        if !self.braze_ok.load(Ordering::Relaxed) {
            let why = self.braze_problem.lock().expect("health lock").clone();
            return Err(why.unwrap_or_else(|| "braze unavailable".into()));
        }
        Ok(())
    }
}
