//! The deployment artefacts as an operator would check them before shipping: the Dockerfile,
//! docker-compose.yml and the Kubernetes manifests in deploy/ parse, agree with each other
//! (ports, paths, names, the API key's variable), and the worker configuration they carry
//! loads with the worker's own configuration code and the container's environment, so an
//! unknown key, a bad value or a mistyped `SEGMENT_SYNC_*` variable fails here instead of
//! in a crash-looping pod. No Docker engine or cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

use segment_sync::config::{Config, ConfigError, KeyRequirement, API_KEY_ENV};

/// Braze's default limit for /users/track: 3,000 requests per 3 seconds per workspace.
const BRAZE_WORKSPACE_RPS: u64 = 1000;
/// The worker flushes dead letters for up to this long after the drain on shutdown
/// (`pipeline::run`), before it leaves the group.
const DLQ_FLUSH_MS: u64 = 5000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file; empty documents are skipped.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}"));
            // `<<: *anchor`, as compose and kubectl read it.
            v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The value at `path` (mapping keys, or indexes into sequences), or a panic naming the path.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    opt_at(v, path).unwrap_or_else(|| panic!("missing {}", path.join(".")))
}

fn opt_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for key in path {
        cur = match cur {
            Value::Sequence(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => cur.get(*key)?,
        };
    }
    Some(cur)
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

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(text)
        .collect()
}

/// A compose command or healthcheck test: a list, or a string split on whitespace.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => strings(v),
    }
}

/// `${VAR:-default}`, `${VAR-default}`, `${VAR}` and `$$` as compose expands them in a shell
/// where none of the variables is set: what `docker compose up` does on a fresh machine.
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

fn host_port(addr: &str) -> (String, u16) {
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{addr:?} is not host:port"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("{addr:?}: bad port"));
    (
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    )
}

/// `scheme://host:port[/...]` → (host, port).
fn url_host_port(url: &str) -> (String, u16) {
    let after = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("{url:?} is not a URL"));
    host_port(after.split('/').next().unwrap_or(after))
}

fn listen_port(cfg: &Config) -> u16 {
    let addr: SocketAddr = cfg.server.listen.parse().expect("validated by Config");
    assert!(
        addr.ip().is_unspecified(),
        "server.listen = {}: inside a container the probes and the scraper come from outside; listen on 0.0.0.0",
        cfg.server.listen
    );
    addr.port()
}

fn load(text: &str, env: &[(String, String)], origin: &str) -> Config {
    Config::from_toml_str_with(text, env.iter().cloned(), KeyRequirement::Required)
        .unwrap_or_else(|e| panic!("{origin}: the worker would refuse its configuration: {e}"))
}

// ---------------------------------------------------------------------------------------
// docker-compose.yml

struct Compose {
    services: BTreeMap<String, Value>,
}

impl Compose {
    fn load() -> Compose {
        let docs = yaml_docs("docker-compose.yml");
        assert_eq!(docs.len(), 1, "docker-compose.yml is one document");
        let services = at(&docs[0], &["services"])
            .as_mapping()
            .expect("services is a mapping")
            .iter()
            .map(|(k, v)| (text(k), v.clone()))
            .collect();
        Compose { services }
    }

    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
    }

    /// The service's environment, expanded, in either of compose's two forms.
    fn env(&self, name: &str) -> BTreeMap<String, String> {
        match opt_at(self.service(name), &["environment"]) {
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
            Some(other) => panic!("{name}.environment: {other:?}"),
        }
    }

    fn command(&self, name: &str) -> Vec<String> {
        words(at(self.service(name), &["command"]))
    }

    /// The host file mounted at `target` in the service, relative to the repository.
    fn mounted_file(&self, name: &str, target: &str) -> String {
        for v in strings(at(self.service(name), &["volumes"])) {
            let parts: Vec<&str> = v.split(':').collect();
            if parts.len() >= 2 && parts[1] == target {
                return parts[0].trim_start_matches("./").to_string();
            }
        }
        panic!("{name} mounts nothing at {target}")
    }

    /// The configuration a segment-sync service of the stack runs with: the file its
    /// `--config` names, mounted from the repository, and its `SEGMENT_SYNC_*` environment.
    fn segment_sync_config(&self, name: &str) -> Config {
        let command = self.command(name);
        let path = flag(&command, "--config")
            .unwrap_or_else(|| panic!("{name}: no --config in {command:?}"));
        let host_file = self.mounted_file(name, &path);
        let env: Vec<(String, String)> = self
            .env(name)
            .into_iter()
            .filter(|(k, _)| k.starts_with("SEGMENT_SYNC_") || k == API_KEY_ENV)
            .collect();
        // The producer loads its configuration without an API key; the worker must have one.
        let text = read(&host_file);
        if name == "worker" {
            load(&text, &env, &format!("compose {name}: {host_file}"))
        } else {
            Config::from_toml_str_with(&text, env, KeyRequirement::Optional)
                .unwrap_or_else(|e| panic!("compose {name}: {host_file}: {e}"))
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn depends_on(service: &Value, on: &str) -> String {
    text(at(service, &["depends_on", on, "condition"]))
}

#[test]
fn compose_runs_the_whole_pipeline_from_one_image() {
    let c = Compose::load();
    for name in [
        "kafka",
        "topics",
        "schema-registry",
        "braze-sim",
        "producer",
        "worker",
    ] {
        c.service(name);
    }
    assert_eq!(
        text(at(c.service("kafka"), &["image"])),
        "apache/kafka:4.1.1"
    );
    assert_eq!(
        text(at(c.service("topics"), &["image"])),
        "apache/kafka:4.1.1"
    );
    assert!(text(at(c.service("schema-registry"), &["image"]))
        .starts_with("confluentinc/cp-schema-registry:"));

    // The worker is built from the repository's Dockerfile; the simulator and the producer
    // run the same image.
    let worker = c.service("worker");
    let build = at(worker, &["build"]);
    let (context, dockerfile) = match build {
        Value::String(ctx) => (ctx.clone(), "Dockerfile".to_string()),
        _ => (
            text(at(build, &["context"])),
            opt_at(build, &["dockerfile"]).map_or("Dockerfile".into(), text),
        ),
    };
    assert!(
        root().join(&context).join(&dockerfile).is_file(),
        "worker.build: no {dockerfile} in {context}"
    );
    let image = text(at(worker, &["image"]));
    for name in ["braze-sim", "producer"] {
        assert_eq!(text(at(c.service(name), &["image"])), image, "{name}.image");
    }
    assert_eq!(c.command("braze-sim")[0], "braze-sim");

    // The producer writes the sample events once the topic and the registry exist.
    let producer = c.command("producer");
    assert_eq!(producer[0], "produce", "{producer:?}");
    assert_eq!(flag(&producer, "--count").as_deref(), Some("10000"));
    let p = c.service("producer");
    assert_eq!(depends_on(p, "kafka"), "service_healthy");
    assert_eq!(depends_on(p, "schema-registry"), "service_healthy");
    assert_eq!(depends_on(p, "topics"), "service_completed_successfully");

    assert_eq!(c.command("worker")[0], "run");
    assert_eq!(depends_on(worker, "kafka"), "service_healthy");
    assert_eq!(
        depends_on(worker, "topics"),
        "service_completed_successfully"
    );
    assert_eq!(depends_on(worker, "braze-sim"), "service_healthy");
    for name in ["kafka", "schema-registry", "braze-sim", "worker"] {
        at(c.service(name), &["healthcheck", "test"]);
    }
}

#[test]
fn compose_worker_config_loads_and_points_at_the_stack() {
    let c = Compose::load();
    let cfg = c.segment_sync_config("worker");

    // The key the worker sends is the one the simulator expects (both from BRAZE_API_KEY;
    // the simulator's own default is sim-key).
    let sim_key = c
        .env("braze-sim")
        .get(API_KEY_ENV)
        .cloned()
        .unwrap_or_else(|| "sim-key".into());
    assert_eq!(cfg.braze.api_key.as_deref(), Some(sim_key.as_str()));

    // Braze is the simulator, on the port it listens on.
    let sim = c.command("braze-sim");
    let sim_listen = flag(&sim, "--listen").expect("braze-sim --listen");
    let (sim_ip, sim_port) = host_port(&sim_listen);
    assert_eq!(
        sim_ip, "0.0.0.0",
        "the simulator must accept the worker's connections"
    );
    assert_eq!(
        url_host_port(&cfg.braze_base_url()),
        ("braze-sim".to_string(), sim_port)
    );

    // Kafka: every bootstrap broker is an address the broker advertises.
    let kafka = c.env("kafka");
    let advertised: BTreeSet<(String, u16)> = kafka["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .map(|l| url_host_port(l.trim()))
        .collect();
    for broker in cfg.kafka.brokers.split(',') {
        assert!(
            advertised.contains(&host_port(broker.trim())),
            "kafka.brokers {broker} is not advertised: {advertised:?}"
        );
    }
    // The registry, where it listens.
    let registry = c.env("schema-registry");
    let (_, registry_port) = url_host_port(&registry["SCHEMA_REGISTRY_LISTENERS"]);
    assert_eq!(
        url_host_port(&cfg.kafka.schema_registry_url),
        ("schema-registry".to_string(), registry_port)
    );
    assert!(registry["SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"]
        .split(',')
        .all(|b| advertised.contains(&url_host_port(b.trim()))));

    // The topics service creates what the worker reads and writes, the event topic with
    // room for six workers.
    let create = c.command("topics").join(" ");
    for topic in cfg.kafka.topics.iter().chain([&cfg.kafka.dlq_topic]) {
        assert!(
            create.contains(&format!("--topic {topic} ")),
            "topics does not create {topic}: {create}"
        );
    }
    let first = format!("--topic {} --partitions 6 ", cfg.kafka.topics[0]);
    assert!(create.contains(&first), "{create}");
    assert_eq!(kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false");

    // /metrics is published where the worker listens, and the healthcheck probes it there.
    let port = listen_port(&cfg);
    let ports = strings(at(c.service("worker"), &["ports"]));
    assert!(
        ports.contains(&format!("{port}:{port}")),
        "worker.ports {ports:?} does not publish {port}"
    );
    let check = words(at(c.service("worker"), &["healthcheck", "test"])).join(" ");
    assert!(
        check.contains("/healthz") && check.contains(&port.to_string()),
        "{check}"
    );

    // The producer writes into the topic the worker reads, in the format it decodes.
    let producer = c.segment_sync_config("producer");
    assert_eq!(producer.kafka.topics, cfg.kafka.topics);
    assert_eq!(producer.kafka.format, cfg.kafka.format);
    assert_eq!(producer.kafka.brokers, cfg.kafka.brokers);
}

#[test]
fn compose_kafka_is_one_kraft_node() {
    let env = Compose::load().env("kafka");
    let roles: BTreeSet<&str> = env["KAFKA_PROCESS_ROLES"]
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(roles, BTreeSet::from(["broker", "controller"]));

    let protocols: BTreeMap<&str, &str> = env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
        .split(',')
        .map(|p| p.trim().split_once(':').expect("NAME:PROTOCOL"))
        .collect();
    let listeners: BTreeMap<String, u16> = env["KAFKA_LISTENERS"]
        .split(',')
        .map(|l| {
            let (name, addr) = l.trim().split_once("://").expect("NAME://host:port");
            (name.to_string(), host_port(addr).1)
        })
        .collect();
    for l in env["KAFKA_ADVERTISED_LISTENERS"].split(',') {
        let (name, addr) = l.trim().split_once("://").expect("NAME://host:port");
        assert!(
            protocols.contains_key(name),
            "{name} has no security protocol"
        );
        assert_eq!(listeners.get(name), Some(&host_port(addr).1), "{l}");
    }
    let controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"].as_str();
    assert!(protocols.contains_key(controller) && listeners.contains_key(controller));
    assert!(protocols.contains_key(env["KAFKA_INTER_BROKER_LISTENER_NAME"].as_str()));

    // The single voter is this node, on its controller listener.
    let (id, addr) = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        .split_once('@')
        .expect("id@host:port");
    assert_eq!(id, env["KAFKA_NODE_ID"]);
    assert_eq!(host_port(addr).1, listeners[controller]);

    // A cluster id is a UUID in unpadded base64url: 22 characters.
    let cluster = &env["CLUSTER_ID"];
    assert!(
        cluster.len() == 22
            && cluster
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'),
        "CLUSTER_ID {cluster:?}"
    );
    // One broker cannot hold more replicas than one.
    assert_eq!(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"], "1");
    assert_eq!(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"], "1");
}

// ---------------------------------------------------------------------------------------
// deploy/

struct Manifests {
    /// (file, document)
    docs: Vec<(String, Value)>,
}

impl Manifests {
    fn load() -> Manifests {
        let mut files: Vec<String> = std::fs::read_dir(root().join("deploy"))
            .expect("deploy/")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .collect();
        files.sort();
        let docs: Vec<(String, Value)> = files
            .iter()
            .flat_map(|f| {
                yaml_docs(&format!("deploy/{f}"))
                    .into_iter()
                    .map(move |d| (f.clone(), d))
            })
            .collect();
        for (file, doc) in &docs {
            assert!(
                opt_at(doc, &["apiVersion"]).is_some() && opt_at(doc, &["kind"]).is_some(),
                "deploy/{file}: a document without apiVersion and kind"
            );
        }
        Manifests { docs }
    }

    fn of_kind(&self, kind: &str) -> Vec<(&str, &Value)> {
        self.docs
            .iter()
            .filter(|(_, d)| text(at(d, &["kind"])) == kind)
            .map(|(f, d)| (f.as_str(), d))
            .collect()
    }

    fn one(&self, kind: &str) -> (&str, &Value) {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "expected one {kind} in deploy/");
        all[0]
    }

    fn config_map(&self, name: &str) -> &Value {
        self.of_kind("ConfigMap")
            .into_iter()
            .find(|(_, d)| text(at(d, &["metadata", "name"])) == name)
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("no ConfigMap {name} in deploy/"))
    }
}

/// What a workload's container would run with, read from its pod template.
struct Container<'a> {
    what: String,
    pod: &'a Value,
    container: &'a Value,
}

impl<'a> Container<'a> {
    fn of(what: &str, workload: &'a Value) -> Container<'a> {
        let pod = at(workload, &["spec", "template"]);
        let containers = at(pod, &["spec", "containers"])
            .as_sequence()
            .expect("containers");
        assert_eq!(containers.len(), 1, "{what}: one container");
        Container {
            what: what.to_string(),
            pod,
            container: &containers[0],
        }
    }

    fn args(&self) -> Vec<String> {
        strings(at(self.container, &["args"]))
    }

    /// The environment; a value from a Secret or a field stands in as a placeholder, since
    /// only its presence and its variable's name matter to the configuration.
    fn env(&self) -> Vec<(String, String)> {
        opt_at(self.container, &["env"])
            .and_then(Value::as_sequence)
            .map(|items| {
                items
                    .iter()
                    .map(|e| {
                        let name = text(at(e, &["name"]));
                        let value = match opt_at(e, &["value"]) {
                            Some(v) => text(v),
                            None => {
                                at(e, &["valueFrom"]);
                                format!("placeholder-for-{name}")
                            }
                        };
                        (name, value)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn env_source(&self, name: &str) -> &'a Value {
        at(self.container, &["env"])
            .as_sequence()
            .expect("env")
            .iter()
            .find(|e| e.get("name").map(text).as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: no env {name}", self.what))
    }

    /// The port number of a container port given by number or by name.
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let name = text(port);
        let ports = at(self.container, &["ports"]).as_sequence().expect("ports");
        let p = ports
            .iter()
            .find(|p| p.get("name").map(text).as_deref() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.what));
        at(p, &["containerPort"]).as_u64().expect("containerPort") as u16
    }

    /// The configuration file `--config` names: a key of the ConfigMap mounted above it.
    fn config(&self, manifests: &Manifests) -> Config {
        let args = self.args();
        let path = flag(&args, "--config")
            .unwrap_or_else(|| panic!("{}: no --config in {args:?}", self.what));
        let mounts = at(self.container, &["volumeMounts"])
            .as_sequence()
            .expect("mounts");
        let (volume, file) = mounts
            .iter()
            .find_map(|m| {
                let dir = text(at(m, &["mountPath"]));
                let file = match opt_at(m, &["subPath"]) {
                    Some(sub) if dir == path => text(sub),
                    Some(_) => return None,
                    None => path
                        .strip_prefix(&format!("{}/", dir.trim_end_matches('/')))?
                        .to_string(),
                };
                Some((text(at(m, &["name"])), file))
            })
            .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", self.what));
        let volumes = at(self.pod, &["spec", "volumes"])
            .as_sequence()
            .expect("volumes");
        let volume = volumes
            .iter()
            .find(|v| v.get("name").map(text).as_deref() == Some(volume.as_str()))
            .unwrap_or_else(|| panic!("{}: no volume {volume}", self.what));
        let map = text(at(volume, &["configMap", "name"]));
        let toml = text(at(manifests.config_map(&map), &["data", &file]));
        let env: Vec<(String, String)> = self
            .env()
            .into_iter()
            .filter(|(k, _)| k.starts_with("SEGMENT_SYNC_") || k == API_KEY_ENV)
            .collect();
        load(&toml, &env, &format!("{} ({map}/{file})", self.what))
    }
}

#[test]
fn deployment_probes_scrapes_and_shuts_down_where_the_worker_expects() {
    let m = Manifests::load();
    let (file, deployment) = m.one("Deployment");
    let c = Container::of(&format!("deploy/{file}"), deployment);
    assert_eq!(c.args()[0], "run");
    let cfg = c.config(&m);
    let port = listen_port(&cfg);

    assert_eq!(text(at(deployment, &["spec", "replicas"])), "3");
    let liveness = at(c.container, &["livenessProbe", "httpGet"]);
    assert_eq!(
        text(at(liveness, &["path"])),
        "/healthz",
        "livenessProbe path"
    );
    assert_eq!(
        c.port(at(liveness, &["port"])),
        port,
        "livenessProbe port vs server.listen"
    );
    let readiness = at(c.container, &["readinessProbe", "httpGet"]);
    assert_eq!(
        text(at(readiness, &["path"])),
        "/readyz",
        "readinessProbe path"
    );
    assert_eq!(
        c.port(at(readiness, &["port"])),
        port,
        "readinessProbe port vs server.listen"
    );

    let annotations = at(c.pod, &["metadata", "annotations"]);
    assert_eq!(text(at(annotations, &["prometheus.io/scrape"])), "true");
    assert_eq!(
        text(at(annotations, &["prometheus.io/port"])),
        port.to_string()
    );
    assert_eq!(text(at(annotations, &["prometheus.io/path"])), "/metrics");

    // SIGTERM → drain (window.drain_timeout_ms) → commit → dead-letter flush: the kubelet
    // must not SIGKILL before that is over.
    let grace = at(c.pod, &["spec", "terminationGracePeriodSeconds"])
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace * 1000 > cfg.window.drain_timeout_ms + DLQ_FLUSH_MS,
        "terminationGracePeriodSeconds = {grace} does not cover window.drain_timeout_ms = {}",
        cfg.window.drain_timeout_ms
    );

    // The key comes from a Secret, under the name the worker reads.
    let key = c.env_source(API_KEY_ENV);
    at(key, &["valueFrom", "secretKeyRef", "name"]);
    at(key, &["valueFrom", "secretKeyRef", "key"]);
    assert!(cfg.braze.api_key.is_some());

    for r in ["requests", "limits"] {
        at(c.container, &["resources", r, "memory"]);
    }
    assert_eq!(
        text(at(c.pod, &["spec", "securityContext", "runAsNonRoot"])),
        "true"
    );
}

#[test]
fn replay_job_backfills_beside_the_live_group() {
    let m = Manifests::load();
    let (file, job) = m.one("Job");
    let c = Container::of(&format!("deploy/{file}"), job);
    let args = c.args();
    assert_eq!(args[0], "replay", "{args:?}");
    let from = flag(&args, "--from").expect("--from");
    segment_sync::replay::parse_from(&from).unwrap_or_else(|e| panic!("{e}"));
    let cfg = c.config(&m);
    listen_port(&cfg);
    let restart = text(at(c.pod, &["spec", "restartPolicy"]));
    assert!(restart == "Never" || restart == "OnFailure", "{restart}");
    // A Job is run once per backfill: a generated name lets `kubectl create` run it again.
    at(job, &["metadata", "generateName"]);
    let key = c.env_source(API_KEY_ENV);
    at(key, &["valueFrom", "secretKeyRef", "name"]);

    // It reads the live group's topics and its configuration, but not its group: the live
    // group's committed offsets are not moved.
    let (_, deployment) = m.one("Deployment");
    let live = Container::of("deployment", deployment).config(&m);
    assert_eq!(cfg.kafka.topics, live.kafka.topics);
    let group = flag(&args, "--group").unwrap_or_else(|| format!("{}.replay", cfg.kafka.group_id));
    assert_ne!(group, live.kafka.group_id);
}

#[test]
fn replicas_and_replays_fit_in_the_braze_rate_limit() {
    let m = Manifests::load();
    let (_, deployment) = m.one("Deployment");
    let live = Container::of("deployment", deployment).config(&m);
    let replicas = at(deployment, &["spec", "replicas"])
        .as_u64()
        .expect("replicas");
    let (_, job) = m.one("Job");
    let replay = Container::of("replay job", job).config(&m);
    let total = replicas * u64::from(live.braze.requests_per_second)
        + u64::from(replay.braze.requests_per_second);
    assert!(
        total <= BRAZE_WORKSPACE_RPS,
        "{replicas} x {} + {} = {total} requests/s exceeds Braze's {BRAZE_WORKSPACE_RPS}/s per workspace",
        live.braze.requests_per_second,
        replay.braze.requests_per_second
    );
}

#[test]
fn secrets_disruption_budget_and_kustomization_agree_with_the_deployment() {
    let m = Manifests::load();
    let (_, deployment) = m.one("Deployment");
    let c = Container::of("deployment", deployment);
    let pod_labels = at(c.pod, &["metadata", "labels"])
        .as_mapping()
        .expect("labels");

    let (_, pdb) = m.one("PodDisruptionBudget");
    let selector = at(pdb, &["spec", "selector", "matchLabels"])
        .as_mapping()
        .expect("matchLabels");
    assert_eq!(
        at(deployment, &["spec", "selector", "matchLabels"]).as_mapping(),
        Some(selector),
        "the budget must cover exactly the Deployment's pods"
    );
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "pod label {k:?}");
    }
    // ...and not the replay Job's, whose eviction the budget has no business blocking.
    let (_, job) = m.one("Job");
    let job_labels = at(job, &["spec", "template", "metadata", "labels"])
        .as_mapping()
        .expect("labels");
    assert!(selector.iter().any(|(k, v)| job_labels.get(k) != Some(v)));

    // `kubectl apply -k deploy/` deploys the worker, not a backfill.
    let (_, kustomization) = m.one("Kustomization");
    let resources = strings(at(kustomization, &["resources"]));
    for r in &resources {
        assert!(
            root().join("deploy").join(r).is_file(),
            "kustomization: no deploy/{r}"
        );
    }
    assert!(
        !resources.iter().any(|r| r.contains("replay")),
        "{resources:?}"
    );
    for needed in ["configmap.yaml", "deployment.yaml", "pdb.yaml"] {
        assert!(
            resources.iter().any(|r| r == needed),
            "{needed} not in {resources:?}"
        );
    }

    // The README tells how to create every Secret the pods reference, with those keys.
    let readme = read("deploy/README.md");
    for (name, key) in secret_refs(&m) {
        assert!(
            readme.contains(&format!("secret generic {name}"))
                && readme.contains(&format!("--from-literal={key}=")),
            "deploy/README.md does not show how to create Secret {name} with key {key}"
        );
    }
}

/// Every (Secret, key) a pod template's env refers to.
fn secret_refs(m: &Manifests) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for kind in ["Deployment", "Job"] {
        for (f, w) in m.of_kind(kind) {
            let c = Container::of(f, w);
            for (name, _) in c.env() {
                if let Some(r) = opt_at(c.env_source(&name), &["valueFrom", "secretKeyRef"]) {
                    out.insert((text(at(r, &["name"])), text(at(r, &["key"]))));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Dockerfile

struct Dockerfile {
    /// Instructions with continuation lines joined, comments dropped.
    lines: Vec<String>,
}

impl Dockerfile {
    fn load() -> Dockerfile {
        let mut lines = Vec::new();
        let mut cur = String::new();
        for raw in read("Dockerfile").lines() {
            let t = raw.trim();
            if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(part) => {
                    cur.push_str(part);
                    cur.push(' ');
                }
                None => {
                    cur.push_str(t);
                    lines.push(std::mem::take(&mut cur));
                }
            }
        }
        Dockerfile { lines }
    }

    /// The instructions of each stage, by `AS` name (or index).
    fn stages(&self) -> Vec<(String, String, Vec<String>)> {
        let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
        for l in &self.lines {
            let mut w = l.split_whitespace();
            if w.next().is_some_and(|i| i.eq_ignore_ascii_case("FROM")) {
                let image = w.next().expect("FROM image").to_string();
                let name = match (w.next(), w.next()) {
                    (Some(kw), Some(n)) if kw.eq_ignore_ascii_case("AS") => n.to_string(),
                    _ => out.len().to_string(),
                };
                out.push((name, image, Vec::new()));
            } else if let Some(stage) = out.last_mut() {
                stage.2.push(l.clone());
            }
        }
        out
    }
}

fn instr<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| {
            let (i, rest) = l.split_once(char::is_whitespace)?;
            i.eq_ignore_ascii_case(name).then_some(rest.trim())
        })
        .collect()
}

/// The sources of the COPY instructions among `lines` (not those copied from another stage).
fn copy_sources(lines: &[String]) -> Vec<String> {
    instr(lines, "COPY")
        .iter()
        .filter(|c| !c.contains("--from="))
        .flat_map(|c| {
            let w: Vec<&str> = c
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            w[..w.len() - 1]
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether `path` is one of `sources` or inside one of them.
fn covered(sources: &[String], path: &str) -> bool {
    sources
        .iter()
        .any(|c| path == c || path.starts_with(&format!("{c}/")))
}

fn json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not an exec-form list: {s}: {e}"))
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
        ("test", "tests"),
        ("example", "examples"),
    ] {
        let targets = manifest.get(kind).and_then(toml::Value::as_array);
        for t in targets.into_iter().flatten() {
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
                    let full = normalize(&p.parent().expect("parent").join(rel));
                    out.push(
                        full.strip_prefix(root())
                            .expect("inside the crate")
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
    }
    out
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn dockerfile_builds_the_binary_in_a_builder_stage_and_runs_it_unprivileged() {
    let d = Dockerfile::load();
    let stages = d.stages();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let (_, builder_image, builder) = stages
        .iter()
        .find(|(n, _, _)| n == "builder")
        .expect("a stage FROM ... AS builder");
    assert_eq!(builder_image, "rust:1-bookworm");
    let (_, runtime_image, runtime) = stages.last().expect("final stage");
    assert_eq!(runtime_image, "debian:bookworm-slim");

    let runs = instr(builder, "RUN").join("\n");
    for pkg in ["cmake", "pkg-config", "libssl-dev"] {
        assert!(runs.contains(pkg), "the builder does not install {pkg}");
    }
    assert!(runs.contains("cargo build --release --locked"), "{runs}");

    // Every build input is copied into the builder, and none is kept out of the build
    // context by .dockerignore.
    let copied = copy_sources(builder);
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    let targets = cargo_targets();
    assert!(targets.iter().any(|t| t == "src/main.rs"), "{targets:?}");
    let inputs = ["Cargo.toml".to_string(), "Cargo.lock".to_string()]
        .into_iter()
        .chain(targets.iter().cloned())
        .chain(compile_time_includes());
    for input in inputs {
        assert!(
            covered(&copied, &input),
            "the builder does not COPY {input} (copied: {copied:?})"
        );
        assert!(
            !covered(&ignored, &input),
            ".dockerignore keeps {input} out of the build context"
        );
    }
    // The dependency layer is built before the sources are copied: every target file must
    // be there already, copied before it or stubbed by it.
    let deps_build = builder
        .iter()
        .position(|l| l.starts_with("RUN") && l.contains("cargo build"))
        .expect("a RUN with cargo build");
    let before = copy_sources(&builder[..deps_build]);
    for target in &targets {
        assert!(
            covered(&before, target) || builder[deps_build].contains(target.as_str()),
            "the dependency layer has neither a copy nor a stub of {target}: {}",
            builder[deps_build]
        );
    }

    // The runtime stage: the binary only, from the builder, as a non-root user.
    let copies = instr(runtime, "COPY");
    assert!(
        copies
            .iter()
            .any(|c| c.contains("--from=builder") && c.contains("segment-sync")),
        "{copies:?}"
    );
    let user = instr(runtime, "USER");
    let user = user.last().expect("USER");
    assert!(!["root", "0", "0:0"].contains(user), "USER {user}");
    let runtime_runs = instr(runtime, "RUN").join("\n");
    for pkg in ["ca-certificates", "libssl3"] {
        assert!(runtime_runs.contains(pkg), "the runtime lacks {pkg}");
    }
    assert!(
        !runtime_runs.contains("cargo"),
        "no toolchain in the runtime image"
    );

    let entrypoint = json_list(instr(runtime, "ENTRYPOINT").last().expect("ENTRYPOINT"));
    assert_eq!(entrypoint, ["segment-sync"]);
    let cmd = json_list(instr(runtime, "CMD").last().expect("CMD"));
    assert_eq!(cmd[0], "run");
    let default_config = flag(&cmd, "--config").expect("CMD --config");

    // The port it exposes, and the config path it defaults to, are those compose and the
    // manifests use.
    let expose = instr(runtime, "EXPOSE").join(" ");
    let compose = Compose::load();
    let worker = compose.segment_sync_config("worker");
    assert!(
        expose
            .split_whitespace()
            .any(|p| p == listen_port(&worker).to_string()),
        "EXPOSE {expose}"
    );
    assert_eq!(
        flag(&compose.command("worker"), "--config"),
        Some(default_config.clone())
    );
    let m = Manifests::load();
    let (_, deployment) = m.one("Deployment");
    assert_eq!(
        flag(&Container::of("deployment", deployment).args(), "--config"),
        Some(default_config)
    );
}

// ---------------------------------------------------------------------------------------
// The operator's guide

/// Every metric family the worker exports, vectors included.
fn metric_names() -> BTreeSet<String> {
    let m = segment_sync::metrics::Metrics::new();
    // A vector shows in the exposition only once it has a child.
    m.events_invalid.with_label_values(&["invalid"]).inc();
    m.braze_requests.with_label_values(&["2xx"]).inc();
    m.dlq_records.with_label_values(&["rejected"]).inc();
    m.committed_offset.with_label_values(&["t", "0"]).set(1);
    m.consumer_lag.with_label_values(&["t", "0"]).set(1);
    m.registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect()
}

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
fn the_guide_documents_every_metric_and_names_no_metric_that_does_not_exist() {
    let guide = read("docs/operating.md");
    let names = metric_names();
    assert!(
        names.contains("segment_sync_consumer_lag")
            && names.contains("segment_sync_dlq_records_total"),
        "labelled families are listed too: {names:?}"
    );
    for name in &names {
        assert!(
            guide.contains(&format!("`{name}`")),
            "docs/operating.md does not document {name}"
        );
    }
    for token in tokens(&guide, "segment_sync_") {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| token.strip_suffix(s))
            .filter(|b| names.contains(*b))
            .unwrap_or(token);
        // `segment_sync_` alone is the prefix in prose, and segment_sync:: the library.
        if base == "segment_sync_" {
            continue;
        }
        assert!(
            names.contains(base),
            "docs/operating.md names {token}, which the worker does not export"
        );
    }
}

#[test]
fn every_environment_variable_the_docs_and_manifests_name_is_one_the_worker_knows() {
    let mut named = BTreeMap::new();
    for file in [
        "docs/operating.md",
        "deploy/README.md",
        "docker-compose.yml",
        "deploy/deployment.yaml",
        "deploy/replay-job.yaml",
    ] {
        let text = read(file);
        for t in tokens(&text, "SEGMENT_SYNC_") {
            // `SEGMENT_SYNC_<SECTION>_<KEY>` and the like are patterns, not variables.
            if !t.ends_with('_') {
                named.entry(t.to_string()).or_insert(file);
            }
        }
    }
    assert!(named.len() >= 4, "{named:?}");
    for (var, file) in named {
        // The value may not suit the key's type; only an unknown name is wrong here.
        let r = Config::from_toml_str_with(
            "",
            [(var.clone(), "1".to_string())],
            KeyRequirement::Optional,
        );
        assert!(
            !matches!(r, Err(ConfigError::UnknownEnv { .. })),
            "{file} names {var}, which matches no configuration key: {}",
            r.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
}

#[test]
fn the_guide_covers_what_an_operator_looks_up() {
    let guide = read("docs/operating.md");
    for needle in [
        API_KEY_ENV,
        "api_key_file",
        "check-config",
        "security.protocol",
        "SASL_SSL",
        "SCRAM-SHA-512",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
        "/healthz",
        "/readyz",
        "RUST_LOG",
        "segment-sync replay",
        "--from",
        "--dry-run",
        "--until-start",
        "--group",
        "docker compose up --build",
        "deploy/README.md",
        "drain_timeout_ms",
    ] {
        assert!(
            guide.contains(needle),
            "docs/operating.md does not mention {needle}"
        );
    }
    // The SASL example is a configuration the worker accepts.
    let start = guide
        .find("```toml")
        .expect("a ```toml example in docs/operating.md");
    let body = &guide[start + 7..];
    let example = &body[..body.find("```").expect("closing ```")];
    let cfg = Config::from_toml_str_with(example, Vec::new(), KeyRequirement::Optional)
        .unwrap_or_else(|e| panic!("the guide's TOML example: {e}"));
    assert_eq!(
        cfg.kafka
            .properties
            .get("security.protocol")
            .map(String::as_str),
        Some("SASL_SSL")
    );
}
