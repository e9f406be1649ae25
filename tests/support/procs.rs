//! The built `segment-sync` binary as child processes of a test: the Braze simulator
//! (`braze-sim`) and workers (`run`, `replay`), each with its own config file, stdout and
//! stderr in a temp dir, readiness by polling HTTP, signals, and a Drop that kills.
//!
//! Children get `SIGKILL` as their parent-death signal: it fires when the spawning *thread*
//! ends, which for a child spawned from a test's own thread is when the test ends, however it
//! ends. Drop kills them earlier, on the normal path and on a panic.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use segment_sync::tools::sim::{Faults, SimStats};

/// The key the simulator demands and the workers send.
pub const API_KEY: &str = "e2e-key";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The binary under test, built by cargo for integration tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_segment-sync")
}

/// A free loopback port. The port is released before anyone binds it, so another process can
/// take it meanwhile (it happened: a worker's `server.listen` was taken by a neighbour
/// test's connection). Use it only for an address nothing listens on; a worker binds port 0
/// and says where (`Proc::served_base`).
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `addr` field of a log line: `"addr":"127.0.0.1:1234"` in JSON logs (stderr is a file
/// here), `addr=127.0.0.1:1234` in text logs.
fn logged_addr(line: &str) -> Option<&str> {
    if let Some(i) = line.find("\"addr\":\"") {
        return line[i + 8..].split('"').next();
    }
    let i = line.find("addr=")?;
    line[i + 5..].split_whitespace().next()
}

/// A blocking HTTP client with a short timeout: every server here is local.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// One child process of the test. Drop kills it (SIGKILL) if it is still running.
pub struct Proc {
    pub name: String,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr in `<dir>/<name>.out` / `.err`, and no
    /// `SEGMENT_SYNC_*` variable inherited from the test's environment, which would
    /// silently override the config file.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SEGMENT_SYNC_") {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"));
        // SAFETY: the closure runs between fork and exec; prctl is async-signal-safe and
        // touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: kill(2) with a pid we spawned and have not reaped (status is None), so
            // the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid(), signal);
            }
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// `kill -9` and reap.
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(10));
    }

    /// The exit status if it has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The base URL of the process's HTTP server, from its log line saying where it serves
    /// (workers listen on port 0); `None` until it has written it.
    pub fn served_base(&self) -> Option<String> {
        let log = fs::read_to_string(&self.stderr).ok()?;
        log.lines()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(logged_addr)
            .map(|addr| format!("http://{addr}"))
    }

    /// The last `bytes` of its stderr, for failure messages.
    pub fn stderr_tail(&self, bytes: u64) -> String {
        tail(&self.stderr, bytes)
    }

    /// A failure message's block: the name, the status and the tail of stderr.
    pub fn report(&mut self) -> String {
        let status = match self.exited() {
            Some(s) => s.to_string(),
            None => "running".into(),
        };
        format!(
            "--- {} ({status}), stderr tail:\n{}",
            self.name,
            self.stderr_tail(3000)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(path: &Path, bytes: u64) -> String {
    let read = || -> io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// `segment-sync braze-sim` as a child process.
pub struct Sim {
    pub proc: Proc,
    pub url: String,
}

impl Sim {
    /// Starts the simulator on a port of its choosing (it prints the URL on stdout) with no
    /// rate limit unless `extra` sets one, and waits until it answers.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> Sim {
        let mut cmd = Command::new(binary());
        cmd.args(["braze-sim", "--listen", "127.0.0.1:0", "--api-key", API_KEY]);
        if !extra.contains(&"--rate-limit") {
            cmd.args(["--rate-limit", "0"]);
        }
        cmd.args(extra).env_remove("BRAZE_API_KEY");
        let mut proc = Proc::spawn(name, cmd, dir);
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = loop {
            let out = fs::read_to_string(&proc.stdout).unwrap_or_default();
            if let Some(url) = out
                .lines()
                .find_map(|l| l.strip_prefix("braze-sim listening on "))
            {
                break url.trim().to_string();
            }
            if proc.exited().is_some() || Instant::now() > deadline {
                panic!("the simulator did not start\n{}", proc.report());
            }
            thread::sleep(Duration::from_millis(20));
        };
        let sim = Sim { proc, url };
        // The line is printed once listening; one answered request proves it.
        sim.stats();
        sim
    }

    pub fn stats(&self) -> SimStats {
        http()
            .get(format!("{}/stats", self.url))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("GET {}/stats: {e}", self.url))
    }

    pub fn profiles(&self) -> BTreeMap<String, Map<String, Value>> {
        http()
            .get(format!("{}/profiles", self.url))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("GET {}/profiles: {e}", self.url))
    }

    pub fn set_faults(&self, faults: &Faults) {
        http()
            .post(format!("{}/faults", self.url))
            .json(faults)
            .send()
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("POST {}/faults: {e}", self.url));
    }
}

/// The worker's settings that tests vary; `toml()` writes the rest with test-friendly values.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub brokers: String,
    pub group_id: String,
    pub topic: String,
    /// `json` or `avro-confluent`.
    pub format: String,
    pub schema_registry_url: String,
    pub braze_url: String,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub linger_ms: u64,
    pub commit_interval_ms: u64,
    pub drain_timeout_ms: u64,
    pub max_pending_users: usize,
    /// `window.restore_records`; the worker's default when `None`.
    pub restore_records: Option<u64>,
    /// librdkafka properties; the defaults make a killed member's partitions move soon.
    pub properties: BTreeMap<String, String>,
    /// Sections written after the others as they are (e.g. `[source]`).
    pub extra: String,
}

impl WorkerConfig {
    pub fn new(brokers: &str, topic: &str, braze_url: &str) -> WorkerConfig {
        let properties = [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        WorkerConfig {
            brokers: brokers.to_string(),
            group_id: format!("{topic}.group"),
            topic: topic.to_string(),
            format: "json".into(),
            // Nothing listens there: a json worker never asks.
            schema_registry_url: "http://127.0.0.1:9".into(),
            braze_url: braze_url.to_string(),
            batch_size: 75,
            max_in_flight: 8,
            linger_ms: 100,
            commit_interval_ms: 200,
            drain_timeout_ms: 10_000,
            max_pending_users: 100_000,
            restore_records: None,
            properties,
            extra: String::new(),
        }
    }

    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// The TOML file for `listen` as `server.listen`.
    pub fn toml(&self, listen: &str) -> String {
        let mut props = String::new();
        for (k, v) in &self.properties {
            props.push_str(&format!("{k:?} = {v:?}\n"));
        }
        format!(
            r#"[kafka]
brokers = {brokers:?}
group_id = {group:?}
topics = [{topic:?}]
dlq_topic = {dlq:?}
format = {format:?}
schema_registry_url = {registry:?}

[kafka.properties]
{props}
[braze]
endpoint = {braze:?}
batch_size = {batch}
max_in_flight = {in_flight}
requests_per_second = 10000
timeout_ms = 10000

[window]
linger_ms = {linger}
commit_interval_ms = {commit}
drain_timeout_ms = {drain}
max_pending_users = {pending}
{restore}
[server]
listen = {listen:?}

{extra}
"#,
            brokers = self.brokers,
            group = self.group_id,
            topic = self.topic,
            dlq = self.dlq_topic(),
            format = self.format,
            registry = self.schema_registry_url,
            braze = self.braze_url,
            batch = self.batch_size,
            in_flight = self.max_in_flight,
            linger = self.linger_ms,
            commit = self.commit_interval_ms,
            drain = self.drain_timeout_ms,
            pending = self.max_pending_users,
            restore = self
                .restore_records
                .map(|n| format!("restore_records = {n}\n"))
                .unwrap_or_default(),
            extra = self.extra,
        )
    }

    /// Writes the config to `<dir>/<name>.toml` and returns its path. The HTTP server
    /// listens on port 0: `Proc::served_base` says where.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.toml"));
        fs::write(&path, self.toml("127.0.0.1:0")).expect("write the worker config");
        path
    }
}

/// A `segment-sync run` (or `replay`) child process and its HTTP server.
pub struct Worker {
    pub proc: Proc,
    base: OnceLock<String>,
}

impl Worker {
    pub fn new(proc: Proc) -> Worker {
        Worker {
            proc,
            base: OnceLock::new(),
        }
    }

    /// Spawns `segment-sync <args...> --config <file>` without waiting for anything.
    pub fn spawn(dir: &Path, name: &str, cfg: &WorkerConfig, args: &[&str]) -> Worker {
        let config = cfg.write(dir, name);
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .arg("--config")
            .arg(&config)
            .env("BRAZE_API_KEY", API_KEY)
            .env("RUST_LOG", "info");
        Worker::new(Proc::spawn(name, cmd, dir))
    }

    /// Its HTTP server's base URL, once it serves.
    pub fn base(&self) -> Option<&str> {
        if self.base.get().is_none() {
            let base = self.proc.served_base()?;
            let _ = self.base.set(base);
        }
        self.base.get().map(String::as_str)
    }

    /// `segment-sync run`, returned once its `/readyz` answers 200 (partitions assigned).
    pub fn start(dir: &Path, name: &str, cfg: &WorkerConfig) -> Worker {
        let mut w = Worker::spawn(dir, name, cfg, &["run"]);
        w.wait_ready(READY_TIMEOUT);
        w
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let client = http();
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if self.proc.exited().is_some() {
                panic!("worker exited before it was ready\n{}", self.proc.report());
            }
            let Some(base) = self.base().map(str::to_string) else {
                thread::sleep(Duration::from_millis(100));
                continue;
            };
            match client.get(format!("{base}/readyz")).send() {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => last = r.text().unwrap_or_default(),
                Err(e) => last = e.to_string(),
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "worker not ready after {timeout:?}: {last}\n{}",
            self.proc.report()
        );
    }

    /// The sum of every series of a Prometheus metric (`segment_sync_...`); `None` when the
    /// worker does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = http()
            .get(format!("{}/metrics", self.base()?))
            .send()
            .and_then(|r| r.text())
            .ok()?;
        Some(metric_sum(&text, name))
    }
}

/// Sums the samples of `name` in Prometheus text (every label set).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}
