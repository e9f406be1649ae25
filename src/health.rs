//! Liveness and readiness facts, set by the pipeline and the Braze client, read by `/readyz`.

use std::collections::BTreeMap;
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
    /// Faults that hold consumption other than Braze's, by what is at fault.
    faults: std::sync::Mutex<BTreeMap<Fault, String>>,
}

/// What, besides Braze, can hold the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The schema registry does not answer (or not as a registry): records wait.
    SchemaRegistry,
    /// Dead-letter writes keep failing: the watermark holds.
    DeadLetters,
    /// Newly assigned partitions have waited over a minute for their history to be read
    /// back: they are not consumed meanwhile.
    Restore,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::SchemaRegistry => "schema registry",
            Fault::DeadLetters => "dead-letter topic",
            Fault::Restore => "restore on assignment",
        }
    }
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

    /// Sets (`Some`) or clears (`None`) a fault.
    pub fn set_fault(&self, fault: Fault, why: Option<String>) {
        let mut faults = self.faults.lock().expect("health lock");
        match why {
            Some(why) => faults.insert(fault, why),
            None => faults.remove(&fault),
        };
    }

    /// Ready when assigned, consuming and Braze is reachable and authorised; else the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.assigned.load(Ordering::Relaxed) {
            return Err("no partitions assigned".into());
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Err("not consuming".into());
        }
        if let Some((fault, why)) = self.faults.lock().expect("health lock").iter().next() {
            return Err(format!("{}: {why}", fault.name()));
        }
        if !self.braze_ok.load(Ordering::Relaxed) {
            let why = self.braze_problem.lock().expect("health lock").clone();
            return Err(why.unwrap_or_else(|| "braze unavailable".into()));
        }
        Ok(())
    }
}
