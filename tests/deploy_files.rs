//! The shipped deployment files, checked for what their user would otherwise learn from a
//! crash-looping pod or a `docker compose up` that never syncs: each configuration a file runs
//! the worker with loads (the mounted file and the container's environment together), every
//! variable the files and docs name is one the worker reads, a pod or container is given time
//! to drain and commit before it is killed, probes reach where the worker listens, the image
//! builds from what the build context holds, and the docs name exactly the metrics the worker
//! exports. What a user is meant to edit (replicas, images, rates, wording) is not pinned.
//! No Docker engine or cluster is needed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use prometheus::core::Collector;
use serde_norway::Value;

use segment_sync::config::{Config, KeyRequirement, API_KEY_ENV, ENV_PREFIX};
use segment_sync::metrics::Metrics;

use support::files::{assert_env_read, files_in, read, root, yaml_docs};

/// After the drain the worker waits up to this long for dead-letter acknowledgements before it
/// leaves the group.
const DLQ_FLUSH_MS: u64 = segment_sync::pipeline::DEAD_LETTER_FLUSH.as_millis() as u64;

/// What a user reads: the READMEs and guides.
fn docs() -> Vec<String> {
    [".", "docs", "deploy"]
        .iter()
        .flat_map(|d| files_in(d, &[".md"]))
        .collect()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    opt_at(v, path).unwrap_or_else(|| panic!("missing {}", path.join(".")))
}

fn opt_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, key| cur.get(*key))
}

/// A scalar as text: YAML writes ports and counts as numbers or as strings.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
}

/// A command as a list, or as a string split on whitespace (compose accepts both).
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => list(v).iter().map(text).collect(),
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// `${VAR:-default}`, `${VAR-default}`, `${VAR}` and `$$` as compose expands them where none
/// of the variables is set: what `docker compose up` does on a fresh machine.
fn compose_expand(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {s:?}"));
            let inner = &r[..end];
            if let Some((_, default)) = inner.split_once(":-").or_else(|| inner.split_once('-')) {
                out.push_str(default);
            }
            rest = &r[end + 1..];
        } else {
            panic!("write variables as ${{NAME:-default}} in {s:?}");
        }
    }
    out.push_str(rest);
    out
}

/// A compose duration (`30s`, `1m30s`, `500ms`) in milliseconds.
fn compose_duration_ms(s: &str) -> u64 {
    let mut total = 0;
    let mut rest = s.trim();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("duration {s:?}"));
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += n * match &rest[..unit] {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1000,
            "ms" => 1,
            other => panic!("duration {s:?}: unit {other:?}"),
        };
        rest = &rest[unit..];
    }
    total
}

fn host_port(addr: &str) -> (String, u16) {
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{addr:?} is not host:port"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("{addr:?}: bad port"));
    (host.trim_matches(['[', ']']).to_string(), port)
}

/// `scheme://host:port[/...]` → (host, port).
fn url_host_port(url: &str) -> (String, u16) {
    let (_, after) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("{url:?} is not a URL"));
    host_port(after.split('/').next().unwrap_or(after))
}

// ---------------------------------------------------------------------------------------
// Where the files run segment-sync with a configuration

/// One container that runs segment-sync with `--config`, as a shipped file defines it.
struct Workload {
    what: String,
    /// The command line after the binary's name.
    args: Vec<String>,
    /// Its environment; a value from a Secret or a field is a placeholder, since only its
    /// presence and its variable's name matter to the configuration.
    env: Vec<(String, String)>,
    /// The file `--config` names, as mounted in the container.
    toml: String,
    /// SIGTERM to SIGKILL, as the platform would allow it.
    grace_ms: u64,
    /// The Kubernetes container and pod template; `None` for compose.
    pod: Option<(Value, Value)>,
}

impl Workload {
    fn command(&self) -> &str {
        self.args.first().map_or("", String::as_str)
    }

    /// What segment-sync itself does with the configuration on this command line.
    fn config(&self) -> Config {
        let sends_to_braze = match self.command() {
            // verify reads Braze (export) even when --dry-run sends nothing.
            "run" | "verify" => true,
            "replay" => !self.args.iter().any(|a| a == "--dry-run"),
            _ => false,
        };
        let key = if sends_to_braze {
            KeyRequirement::Required
        } else {
            KeyRequirement::Optional
        };
        let env = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) || k == API_KEY_ENV)
            .cloned();
        Config::from_toml_str_with(&self.toml, env, key).unwrap_or_else(|e| {
            panic!(
                "{}: the worker would refuse its configuration: {e}",
                self.what
            )
        })
    }

    /// `run` and `replay`: a group member that serves /metrics and the probes, and that
    /// SIGTERM makes drain and commit before it leaves.
    fn runs_the_pipeline(&self) -> bool {
        matches!(self.command(), "run" | "replay")
    }

    /// Serves /metrics on server.listen: the pipeline, or `verify --metrics`.
    fn serves_metrics(&self) -> bool {
        self.runs_the_pipeline()
            || (self.command() == "verify" && self.args.iter().any(|a| a == "--metrics"))
    }
}

fn compose() -> Value {
    let mut docs = yaml_docs("docker-compose.yml");
    assert_eq!(docs.len(), 1, "docker-compose.yml is one document");
    docs.remove(0)
}

fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match opt_at(service, &["environment"]) {
        None => BTreeMap::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| {
                let kv = text(i);
                let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                (k.to_string(), compose_expand(v))
            })
            .collect(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| (text(k), compose_expand(&text(v))))
            .collect(),
        Some(other) => panic!("environment: {other:?}"),
    }
}

fn compose_workloads() -> Vec<Workload> {
    let c = compose();
    let services = at(&c, &["services"]).as_mapping().expect("services");
    let mut out = Vec::new();
    for (name, service) in services {
        let what = format!("docker-compose.yml service {}", text(name));
        let Some(command) = opt_at(service, &["command"]).map(words) else {
            continue;
        };
        let Some(path) = flag(&command, "--config") else {
            continue;
        };
        let host_file = opt_at(service, &["volumes"])
            .map(list)
            .unwrap_or_default()
            .iter()
            .map(text)
            .find_map(|v| {
                let mut parts = v.split(':');
                let (host, target) = (parts.next()?, parts.next()?);
                (target == path).then(|| host.trim_start_matches("./").to_string())
            })
            .unwrap_or_else(|| panic!("{what}: nothing is mounted at {path}"));
        out.push(Workload {
            toml: read(&host_file),
            env: compose_env(service).into_iter().collect(),
            // Docker's default when the file says nothing.
            grace_ms: opt_at(service, &["stop_grace_period"])
                .map_or(10_000, |d| compose_duration_ms(&text(d))),
            args: command,
            pod: None,
            what,
        });
    }
    out
}

fn kubernetes_workloads() -> Vec<Workload> {
    let mut out = Vec::new();
    for file in files_in("deploy", &[".yaml", ".yml"]) {
        for doc in yaml_docs(&file) {
            // A Deployment's or Job's pod template, or a CronJob's.
            let Some(pod) = opt_at(&doc, &["spec", "template"])
                .or_else(|| opt_at(&doc, &["spec", "jobTemplate", "spec", "template"]))
            else {
                continue;
            };
            for container in list(at(pod, &["spec", "containers"])) {
                let what = format!("{file} container {}", text(at(container, &["name"])));
                let args: Vec<String> = opt_at(container, &["args"]).map(words).unwrap_or_default();
                let Some(path) = flag(&args, "--config") else {
                    continue;
                };
                let toml = config_map_file(&file, pod, container, &path)
                    .unwrap_or_else(|| panic!("{what}: no ConfigMap key is mounted at {path}"));
                let env = opt_at(container, &["env"])
                    .map(list)
                    .unwrap_or_default()
                    .iter()
                    .map(|e| {
                        let name = text(at(e, &["name"]));
                        let value = opt_at(e, &["value"])
                            .map_or_else(|| format!("placeholder-for-{name}"), text);
                        (name, value)
                    })
                    .collect();
                out.push(Workload {
                    // Kubernetes' default when the manifest says nothing.
                    grace_ms: 1000
                        * opt_at(pod, &["spec", "terminationGracePeriodSeconds"])
                            .map_or(30, |s| s.as_u64().expect("whole seconds")),
                    pod: Some((container.clone(), pod.clone())),
                    args,
                    env,
                    toml,
                    what,
                });
            }
        }
    }
    out
}

/// The text `path` holds in the container: a ConfigMap key mounted by `subPath`, or by a
/// directory mount of the whole ConfigMap.
fn config_map_file(file: &str, pod: &Value, container: &Value, path: &str) -> Option<String> {
    let (volume, key) = list(opt_at(container, &["volumeMounts"])?)
        .iter()
        .find_map(|m| {
            let dir = text(at(m, &["mountPath"]));
            let key = match opt_at(m, &["subPath"]) {
                Some(sub) if dir == path => text(sub),
                Some(_) => return None,
                None => path
                    .strip_prefix(&format!("{}/", dir.trim_end_matches('/')))?
                    .to_string(),
            };
            Some((text(at(m, &["name"])), key))
        })?;
    let volume = list(at(pod, &["spec", "volumes"]))
        .iter()
        .find(|v| v.get("name").map(text).as_deref() == Some(volume.as_str()))?;
    let map = text(opt_at(volume, &["configMap", "name"])?);
    let config_map = files_in("deploy", &[".yaml", ".yml"])
        .iter()
        .flat_map(|f| yaml_docs(f))
        .filter(|d| d.get("kind").map(text).as_deref() == Some("ConfigMap"))
        .find(|d| text(at(d, &["metadata", "name"])) == map)
        .unwrap_or_else(|| panic!("{file}: no ConfigMap {map} in deploy/"));
    Some(text(at(&config_map, &["data", &key])))
}

fn workloads() -> Vec<Workload> {
    let compose = compose_workloads();
    let kubernetes = kubernetes_workloads();
    // Guards against a parser change that silently finds nothing to check.
    assert!(
        compose.iter().any(|w| w.command() == "run"),
        "no compose service runs the worker"
    );
    assert!(
        kubernetes.iter().any(|w| w.command() == "run"),
        "no deploy/ workload runs the worker"
    );
    compose.into_iter().chain(kubernetes).collect()
}

#[test]
fn every_shipped_workload_runs_with_a_configuration_the_worker_accepts() {
    let all = workloads();
    let live_groups: BTreeSet<String> = all
        .iter()
        .filter(|w| w.command() == "run")
        .map(|w| w.config().kafka.group_id)
        .collect();
    for w in &all {
        w.config();
        if w.command() == "replay" {
            let from = flag(&w.args, "--from").unwrap_or_else(|| panic!("{}: no --from", w.what));
            segment_sync::replay::parse_from(&from).unwrap_or_else(|e| panic!("{}: {e}", w.what));
            // Without --group the worker picks a group of the replay's own.
            if let Some(group) = flag(&w.args, "--group") {
                assert!(
                    !live_groups.contains(&group),
                    "{}: --group {group} is the live group's: the backfill would move its offsets",
                    w.what
                );
            }
        }
        if w.command() == "verify" {
            if let Some(from) = flag(&w.args, "--from") {
                segment_sync::replay::parse_from(&from)
                    .unwrap_or_else(|e| panic!("{}: {e}", w.what));
            }
            if let Some(sample) = flag(&w.args, "--sample") {
                segment_sync::verify::Sample::parse_fraction(&sample)
                    .unwrap_or_else(|e| panic!("{}: {e}", w.what));
            }
        }
    }
}

#[test]
fn the_docs_configuration_examples_load() {
    let mut examples = 0;
    for file in docs() {
        let doc = read(&file);
        for block in doc.split("```toml").skip(1) {
            let example = &block[..block.find("```").expect("closing ```")];
            Config::from_toml_str_with(example, Vec::new(), KeyRequirement::Optional)
                .unwrap_or_else(|e| panic!("{file}: a TOML example the worker refuses: {e}"));
            examples += 1;
        }
    }
    assert!(examples > 0, "no ```toml example found in {:?}", docs());
}

#[test]
fn stopping_leaves_the_worker_time_to_drain_and_commit() {
    for w in workloads().iter().filter(|w| w.runs_the_pipeline()) {
        // SIGTERM → drain (window.drain_timeout_ms) → commit → dead-letter flush → leave.
        // Killed earlier, what was in flight is sent again by the next owner.
        let needed = w.config().window.drain_timeout_ms + DLQ_FLUSH_MS;
        assert!(
            w.grace_ms > needed,
            "{}: {} ms from SIGTERM to SIGKILL does not cover window.drain_timeout_ms plus the \
             {DLQ_FLUSH_MS} ms dead-letter flush ({needed} ms)",
            w.what,
            w.grace_ms
        );
    }
}

#[test]
fn probes_and_scrapes_reach_where_the_worker_listens() {
    for w in workloads().iter().filter(|w| w.serves_metrics()) {
        let cfg = w.config();
        let addr: SocketAddr = cfg.server.listen.parse().expect("validated by Config");
        assert!(
            addr.ip().is_unspecified(),
            "{}: server.listen = {}: probes and scrapes come from outside the container; \
             listen on 0.0.0.0",
            w.what,
            cfg.server.listen
        );
        let Some((container, pod)) = &w.pod else {
            continue;
        };
        let named = |port: &Value| -> u16 {
            if let Some(n) = port.as_u64() {
                return n as u16;
            }
            let name = text(port);
            let p = list(at(container, &["ports"]))
                .iter()
                .find(|p| p.get("name").map(text) == Some(name.clone()))
                .unwrap_or_else(|| panic!("{}: no container port named {name}", w.what));
            at(p, &["containerPort"]).as_u64().expect("containerPort") as u16
        };
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if let Some(port) = opt_at(container, &[probe, "httpGet", "port"]) {
                assert_eq!(
                    named(port),
                    addr.port(),
                    "{}: {probe} vs server.listen",
                    w.what
                );
            }
        }
        if let Some(port) = opt_at(pod, &["metadata", "annotations", "prometheus.io/port"]) {
            assert_eq!(
                text(port),
                addr.port().to_string(),
                "{}: prometheus.io/port vs server.listen",
                w.what
            );
        }
    }
}

#[test]
fn the_compose_worker_reaches_the_stack_it_is_shipped_with() {
    let c = compose();
    let service = |name: &str| at(&c, &["services", name]);
    let worker = compose_workloads()
        .into_iter()
        .find(|w| w.command() == "run")
        .expect("a compose service runs the worker")
        .config();

    let kafka = compose_env(service("kafka"));
    let advertised: BTreeSet<(String, u16)> = kafka["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .map(|l| url_host_port(l.trim()))
        .collect();
    for broker in worker.kafka.brokers.split(',') {
        assert!(
            advertised.contains(&host_port(broker.trim())),
            "kafka.brokers {broker} is not a listener the broker advertises: {advertised:?}"
        );
    }
    // Automatic topic creation is off in the stack, so what the worker reads and writes must
    // be created by a service.
    let commands: String = at(&c, &["services"])
        .as_mapping()
        .expect("services")
        .values()
        .filter_map(|s| opt_at(s, &["command"]).map(|v| words(v).join(" ")))
        .collect::<Vec<_>>()
        .join("\n");
    for topic in worker.kafka.topics.iter().chain([&worker.kafka.dlq_topic]) {
        assert!(
            commands.contains(&format!("--topic {topic} ")),
            "no compose service creates {topic}"
        );
    }

    let registry = compose_env(service("schema-registry"));
    let (_, registry_port) = url_host_port(&registry["SCHEMA_REGISTRY_LISTENERS"]);
    assert_eq!(
        url_host_port(&worker.kafka.schema_registry_url),
        ("schema-registry".to_string(), registry_port)
    );

    let sim = words(at(service("braze-sim"), &["command"]));
    let (_, sim_port) = host_port(&flag(&sim, "--listen").expect("braze-sim --listen"));
    assert_eq!(
        url_host_port(&worker.braze_base_url()),
        ("braze-sim".to_string(), sim_port)
    );
    // A key the simulator does not expect is a 401: the worker pauses and never syncs.
    let sim_key = compose_env(service("braze-sim")).get(API_KEY_ENV).cloned();
    assert_eq!(
        worker.braze.api_key, sim_key,
        "{API_KEY_ENV} of worker and braze-sim"
    );
}

// ---------------------------------------------------------------------------------------
// Names the files and docs use

/// Every `prefix…` identifier in `text`.
fn tokens<'a>(text: &'a str, prefix: &str) -> BTreeSet<&'a str> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let start = &rest[i..];
        let end = start
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(start.len());
        out.insert(&start[..end]);
        rest = &start[end..];
    }
    out
}

#[test]
fn every_variable_the_files_and_docs_name_is_one_the_worker_reads() {
    let mut files = docs();
    files.extend(files_in("deploy", &[".yaml", ".yml"]));
    files.extend(files_in("docker", &[".toml"]));
    files.extend(["docker-compose.yml".into(), "Dockerfile".into()]);
    let mut checked = 0;
    for file in &files {
        let body = read(file);
        // `SEGMENT_SYNC_<SECTION>_<KEY>` and `..._PROPERTIES_<NAME>` are patterns, not names.
        for var in tokens(&body, ENV_PREFIX)
            .into_iter()
            .filter(|t| !t.ends_with('_'))
        {
            assert_env_read(file, var);
            checked += 1;
        }
    }
    assert!(checked > 0, "no {ENV_PREFIX}* variable found in {files:?}");
    // A misspelt key variable is simply not read: the worker then starts without a key.
    for w in workloads() {
        for (name, _) in &w.env {
            assert!(
                !name.starts_with("BRAZE_") || name == API_KEY_ENV,
                "{}: {name} is not read; the key comes from {API_KEY_ENV}",
                w.what
            );
        }
    }
}

/// Every metric family the worker exports. A labelled family has no sample until it has a
/// child, so `gather` misses it: those are taken from their descriptions.
fn metric_names() -> BTreeSet<String> {
    let m = Metrics::new();
    // `verify` registers its figures beside the worker's.
    let v = segment_sync::verify::VerifyMetrics::new(&m.registry).expect("verify metrics");
    // So does `snapshot --metrics`.
    let s = segment_sync::metrics::SnapshotMetrics::register(&m.registry);
    let labelled = [
        m.events_invalid.desc(),
        m.events_ignored.desc(),
        m.braze_requests.desc(),
        m.dlq_records.desc(),
        m.committed_offset.desc(),
        m.consumer_lag.desc(),
        m.last_commit_timestamp.desc(),
        v.users.desc(),
        v.export_requests.desc(),
        s.counts.desc(),
        s.runs.desc(),
    ];
    m.registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .chain(labelled.iter().flatten().map(|d| d.fq_name.clone()))
        .collect()
}

#[test]
fn the_docs_name_exactly_the_metrics_the_worker_exports() {
    let names = metric_names();
    let guide = "docs/operating.md";
    let reference = read(guide);
    for name in &names {
        assert!(
            reference.contains(&format!("`{name}`")),
            "{guide} does not document {name}"
        );
    }
    for file in docs() {
        let body = read(&file);
        for token in tokens(&body, "segment_sync_") {
            // `segment_sync_` alone is the prefix in prose.
            if token == "segment_sync_" {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| token.strip_suffix(s))
                .filter(|f| names.contains(*f))
                .unwrap_or(token);
            assert!(
                names.contains(family),
                "{file} names {token}, which the worker does not export \
                 (a new labelled family belongs in metric_names)"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The image builds from what the build context holds

/// Dockerfile instructions, continuation lines joined and comments dropped, by stage.
fn dockerfile_stages() -> Vec<Vec<String>> {
    let mut stages: Vec<Vec<String>> = Vec::new();
    let mut cur = String::new();
    for raw in read("Dockerfile").lines() {
        let t = raw.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            cur.push_str(part);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let line = std::mem::take(&mut cur);
        if line
            .split_whitespace()
            .next()
            .is_some_and(|i| i.eq_ignore_ascii_case("FROM"))
        {
            stages.push(Vec::new());
        } else if let Some(stage) = stages.last_mut() {
            stage.push(line);
        }
    }
    stages
}

/// The sources of the COPY instructions among `lines` (not those copied from another stage).
fn copy_sources(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
        .flat_map(|l| {
            let w: Vec<&str> = l
                .split_whitespace()
                .skip(1)
                .filter(|w| !w.starts_with("--"))
                .collect();
            w[..w.len() - 1]
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn covered(sources: &[String], path: &str) -> bool {
    sources
        .iter()
        .any(|c| path == c || path.starts_with(&format!("{c}/")))
}

/// Every Cargo target's source file: cargo refuses a manifest whose declared target file is
/// missing, even a target it is not asked to build.
fn cargo_targets() -> Vec<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    let path_of = |t: &toml::Value, default: String| {
        t.get("path")
            .and_then(toml::Value::as_str)
            .map_or(default, str::to_string)
    };
    let mut out = Vec::new();
    if let Some(lib) = manifest.get("lib") {
        out.push(path_of(lib, "src/lib.rs".into()));
    }
    for (kind, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("example", "examples"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = t
                .get("name")
                .and_then(toml::Value::as_str)
                .expect("target name");
            out.push(path_of(t, format!("{dir}/{name}.rs")));
        }
    }
    out
}

/// Every file an `include_str!` or `include_bytes!` of src/ reads, from the crate's root.
fn compile_time_includes() -> Vec<String> {
    let crate_root = std::fs::canonicalize(root()).expect("crate root");
    let mut out = Vec::new();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("src dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let src = std::fs::read_to_string(&p).unwrap_or_default();
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for piece in src.split(macro_name).skip(1) {
                    let rel = piece.split('"').next().expect("path");
                    let file = p.parent().expect("parent").join(rel);
                    let full = std::fs::canonicalize(&file)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                    let rel = full.strip_prefix(&crate_root).expect("inside the crate");
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
    }
    out
}

#[test]
fn the_image_build_has_every_input_it_compiles() {
    // `docker compose up --build` is the README's first step; no engine runs in CI to catch
    // a source the builder never sees.
    let stages = dockerfile_stages();
    let builder = stages
        .iter()
        .find(|s| s.iter().any(|l| l.contains("cargo build")))
        .expect("a stage that runs cargo build");
    let copied = copy_sources(builder);
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    let targets = cargo_targets();
    let inputs = ["Cargo.toml".to_string(), "Cargo.lock".to_string()]
        .into_iter()
        .chain(targets.iter().cloned())
        .chain(compile_time_includes());
    for input in inputs {
        assert!(
            covered(&copied, &input),
            "the builder does not COPY {input}"
        );
        assert!(
            !covered(&ignored, &input),
            ".dockerignore keeps {input} out of the build context"
        );
    }
    // The dependency layer is built before the sources arrive: cargo still wants every
    // declared target's file, copied before it or stubbed by it.
    let deps_build = builder
        .iter()
        .position(|l| l.starts_with("RUN") && l.contains("cargo build"))
        .expect("a RUN with cargo build");
    let before = copy_sources(&builder[..deps_build]);
    for target in &targets {
        assert!(
            covered(&before, target) || builder[deps_build].contains(target.as_str()),
            "the dependency layer has neither a copy nor a stub of {target}"
        );
    }
}
