//! The operator's kit (deploy/): autoscaling, dashboard, alerts, example configurations for
//! managed Kafka. Checked for what would otherwise surface as an empty panel, an alert that
//! can never fire, an autoscaler that watches the wrong group or oversubscribes Braze, or an
//! example that crash-loops: every metric they name is one the worker exports, their numbers
//! agree with the manifests and the configuration, and the examples load. PromQL syntax and
//! the alerts' behaviour are promtool's, in `make lint` (scripts/check-monitoring.py).
//! The last test runs workers on librdkafka's mock cluster: what the lag-based autoscaler
//! and the alerts read is what a running worker exports.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::proto::MetricType;
use serde_norway::Value;

use segment_sync::config::{Config, KeyRequirement, API_KEY_ENV, ENV_PREFIX};
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{StartAt, Until};
use segment_sync::tools::sim::Faults;

use support::files::{assert_env_read, files_in, read, root, yaml_docs};
use support::mock::mock_env;
use support::running::{start, wait_until};
use support::worker::{clean_records, committed, end_offsets, produce, test_config};

/// The one document of `kind` among deploy/*.yaml whose file name starts with `prefix`.
fn manifest(kind: &str, prefix: &str) -> Value {
    let found: Vec<Value> = files_in("deploy", &[".yaml"])
        .iter()
        .filter(|f| f.starts_with(&format!("deploy/{prefix}")))
        .flat_map(|f| yaml_docs(f))
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in deploy/{prefix}*.yaml");
    found.into_iter().next().expect("one")
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter()
        .try_fold(v, |cur, key| cur.get(*key))
        .unwrap_or_else(|| panic!("missing {}", path.join(".")))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn number(v: &Value) -> u64 {
    text(v)
        .parse()
        .unwrap_or_else(|_| panic!("not a whole number: {v:?}"))
}

fn list(v: &Value) -> &[Value] {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
}

/// The worker the manifests deploy, as its configuration loads in the pod.
fn deployed_config() -> Config {
    let config_map = manifest("ConfigMap", "configmap");
    Config::from_toml_str_with(
        &text(at(&config_map, &["data", "segment-sync.toml"])),
        Vec::new(),
        KeyRequirement::Optional,
    )
    .expect("configmap.yaml loads")
}

fn container(workload: &Value) -> &Value {
    &list(at(workload, &["spec", "template", "spec", "containers"]))[0]
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    list(at(container, &["env"]))
        .iter()
        .find(|e| e.get("name").map(text).as_deref() == Some(name))
        .and_then(|e| e.get("value"))
        .map(text)
}

// ---------------------------------------------------------------------------------------
// Metric names

/// Whether the worker's registry holds a family of that name. A labelled family has no
/// sample until it has a child, so `gather` cannot list it; the registry refuses a second
/// collector of a name it holds, which is the question asked here.
fn exported(metrics: &Metrics, name: &str) -> bool {
    let Ok(probe) = prometheus::IntCounter::new(name, "probe") else {
        return false;
    };
    match metrics.registry.register(Box::new(probe.clone())) {
        Err(_) => true,
        Ok(()) => {
            metrics
                .registry
                .unregister(Box::new(probe))
                .expect("the probe was registered");
            false
        }
    }
}

/// Every `segment_sync_*` series name in `text` that neither the worker nor `verify` nor
/// `snapshot` exports; a histogram's `_bucket`, `_sum` and `_count` series count as its own.
fn unknown_series(text: &str) -> Vec<String> {
    let metrics = Metrics::new();
    // `verify` and `snapshot` export their own families beside the worker's, on the same
    // registry.
    let _verify =
        segment_sync::verify::VerifyMetrics::new(&metrics.registry).expect("verify metrics");
    let _snapshot = segment_sync::metrics::SnapshotMetrics::register(&metrics.registry);
    let histograms: BTreeSet<String> = metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.get_field_type() == MetricType::HISTOGRAM)
        .map(|f| f.name().to_string())
        .collect();
    let mut unknown = Vec::new();
    for name in series_names(text) {
        let histogram_series = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .is_some_and(|base| histograms.contains(base));
        if !histogram_series && !exported(&metrics, &name) {
            unknown.push(name);
        }
    }
    unknown
}

fn series_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("segment_sync_") {
        let start = &rest[i..];
        let end = start
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(start.len());
        out.insert(start[..end].to_string());
        rest = &start[end..];
    }
    out
}

#[test]
fn the_probe_knows_the_workers_families_labelled_or_not() {
    // Guards the check below against a probe that answers yes to everything.
    let m = Metrics::new();
    assert!(exported(&m, "segment_sync_events_consumed_total"));
    assert!(
        exported(&m, "segment_sync_consumer_lag"),
        "labelled, no child yet"
    );
    assert!(exported(&m, "segment_sync_last_commit_timestamp_seconds"));
    assert!(!exported(&m, "segment_sync_no_such_thing"));
    assert!(
        !exported(&m, "segment_sync_no_such_thing"),
        "the probe left nothing behind"
    );
    assert_eq!(
        unknown_series("rate(segment_sync_braze_request_duration_seconds_bucket[5m]) segment_sync_braze_requests_total_count segment_sync_lag"),
        vec!["segment_sync_braze_requests_total_count", "segment_sync_lag"]
    );
}

/// Every query of the dashboard: panel targets (rows included) and template variables.
fn dashboard_queries(rel: &str) -> Vec<(String, String)> {
    let dash: serde_json::Value = serde_json::from_str(&read(rel)).expect("dashboard JSON");
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            if p["type"] != "row" {
                let targets = p["targets"].as_array().cloned().unwrap_or_default();
                assert!(!targets.is_empty(), "panel {title:?} has no query");
                for t in targets {
                    let expr = t["expr"].as_str().unwrap_or_default().to_string();
                    assert!(
                        !expr.trim().is_empty(),
                        "panel {title:?}: a target without expr"
                    );
                    out.push((format!("panel {title:?}"), expr));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            out.push((
                format!("variable {}", v["name"]),
                q.unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

#[test]
fn the_dashboard_queries_only_metrics_the_worker_exports() {
    let dashboards = files_in("deploy/grafana", &[".json"]);
    assert!(!dashboards.is_empty(), "no dashboard in deploy/grafana");
    for file in dashboards {
        let queries = dashboard_queries(&file);
        for (where_, expr) in &queries {
            assert!(
                !series_names(expr).is_empty(),
                "{file} {where_}: `{expr}` reads no segment_sync_ metric"
            );
            let unknown = unknown_series(expr);
            assert!(
                unknown.is_empty(),
                "{file} {where_}: `{expr}` names {unknown:?}, which the worker does not export"
            );
        }
    }
}

#[test]
fn the_dashboard_shows_every_metric_the_guide_documents() {
    // docs/operating.md's table is held to exactly what the worker exports
    // (tests/deploy_files.rs), so this covers every family.
    let guide = read("docs/operating.md");
    let documented: Vec<&str> = guide
        .lines()
        .filter_map(|l| l.strip_prefix("| `segment_sync_"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(
        documented.len() > 10,
        "the metrics table of docs/operating.md"
    );
    let shown: BTreeSet<String> = files_in("deploy/grafana", &[".json"])
        .iter()
        .flat_map(|f| dashboard_queries(f))
        .flat_map(|(_, expr)| series_names(&expr))
        .collect();
    for name in documented {
        let name = format!("segment_sync_{name}");
        assert!(
            shown
                .iter()
                .any(|s| *s == name || s.strip_prefix(&name).is_some_and(|r| r.starts_with('_'))),
            "no dashboard panel shows {name}"
        );
    }
}

#[test]
fn the_alert_rules_name_only_metrics_the_worker_exports() {
    let rule = manifest("PrometheusRule", "prometheus-rules");
    let mut alerts = 0;
    for group in list(at(&rule, &["spec", "groups"])) {
        for r in list(at(group, &["rules"])) {
            let name = r
                .get("alert")
                .or(r.get("record"))
                .map(text)
                .expect("a name");
            let expr = text(at(r, &["expr"]));
            assert!(
                !series_names(&expr).is_empty(),
                "{name}: reads no segment_sync_ metric"
            );
            let unknown = unknown_series(&expr);
            assert!(
                unknown.is_empty(),
                "{name} names {unknown:?}, which the worker does not export"
            );
            if r.get("alert").is_some() {
                alerts += 1;
                for key in ["summary", "description"] {
                    at(r, &["annotations", key]);
                }
                at(r, &["labels", "severity"]);
            }
        }
    }
    assert!(alerts >= 5, "the alerts of deploy/prometheus-rules.yaml");
    for trigger in list(at(
        &manifest("ScaledObject", "keda-scaledobject-prometheus"),
        &["spec", "triggers"],
    )) {
        let query = text(at(trigger, &["metadata", "query"]));
        let unknown = unknown_series(&query);
        assert!(
            unknown.is_empty(),
            "the Prometheus trigger names {unknown:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Autoscaling

#[test]
fn the_autoscalers_watch_the_live_group_and_respect_partitions_drains_and_braze() {
    let cfg = deployed_config();
    let deployment = manifest("Deployment", "deployment");
    let replay = manifest("Job", "replay-job");
    let kafka_scaler = manifest("ScaledObject", "keda-scaledobject.yaml");
    let prometheus_scaler = manifest("ScaledObject", "keda-scaledobject-prometheus");
    let grace_s = number(at(
        &deployment,
        &["spec", "template", "spec", "terminationGracePeriodSeconds"],
    ));
    let replay_rps: u64 = env_value(container(&replay), "SEGMENT_SYNC_BRAZE_REQUESTS_PER_SECOND")
        .map_or(u64::from(cfg.braze.requests_per_second), |v| {
            v.parse().expect("a number")
        });
    let mut thresholds = BTreeSet::new();
    for so in [&kafka_scaler, &prometheus_scaler] {
        let name = text(at(so, &["metadata", "name"]));
        assert_eq!(
            text(at(so, &["spec", "scaleTargetRef", "name"])),
            text(at(&deployment, &["metadata", "name"])),
            "{name} scales the worker's Deployment"
        );
        // One ScaledObject per Deployment: the two alternatives replace each other.
        assert_eq!(name, text(at(&kafka_scaler, &["metadata", "name"])));
        let min = number(at(so, &["spec", "minReplicaCount"]));
        let max = number(at(so, &["spec", "maxReplicaCount"]));
        assert!(min >= 1 && min <= max, "{name}: {min}..{max}");
        // Braze's limit is per workspace (3,000 requests per 3 s by default): every replica
        // the autoscaler may run, at its pace, plus a replay's.
        let budget = max * u64::from(cfg.braze.requests_per_second) + replay_rps;
        assert!(
            budget <= 1000,
            "{name}: {max} replicas x {} requests/s + a replay's {replay_rps} = {budget}/s, \
             over Braze's default 1,000/s",
            cfg.braze.requests_per_second
        );
        let behavior = at(
            so,
            &[
                "spec",
                "advanced",
                "horizontalPodAutoscalerConfig",
                "behavior",
            ],
        );
        let down = at(behavior, &["scaleDown"]);
        let window_ms = 1000 * number(at(down, &["stabilizationWindowSeconds"]));
        let drain_ms = cfg.window.drain_timeout_ms
            + segment_sync::pipeline::DEAD_LETTER_FLUSH.as_millis() as u64;
        assert!(
            window_ms > drain_ms && window_ms > 1000 * grace_s,
            "{name}: the scale-down window ({window_ms} ms) must outlast a rebalance drain \
             ({drain_ms} ms) and a pod's grace period ({grace_s} s)"
        );
        for policy in list(at(down, &["policies"])) {
            assert!(
                number(at(policy, &["periodSeconds"])) >= grace_s,
                "{name}: scale-downs closer together than a pod's leave"
            );
        }
        let trigger = &list(at(so, &["spec", "triggers"]))[0];
        let threshold = match text(at(trigger, &["type"])).as_str() {
            "kafka" => at(trigger, &["metadata", "lagThreshold"]),
            "prometheus" => at(trigger, &["metadata", "threshold"]),
            other => panic!("{name}: trigger {other}"),
        };
        thresholds.insert(number(threshold));
    }
    assert_eq!(thresholds.len(), 1, "both triggers scale at the same lag");

    let m = at(
        &list(at(&kafka_scaler, &["spec", "triggers"]))[0],
        &["metadata"],
    );
    assert_eq!(text(at(m, &["bootstrapServers"])), cfg.kafka.brokers);
    assert_eq!(text(at(m, &["consumerGroup"])), cfg.kafka.group_id);
    assert!(cfg.kafka.topics.contains(&text(at(m, &["topic"]))));
    let worker = segment_sync::kafka::consumer_config(&cfg, &cfg.kafka.group_id);
    assert_eq!(
        Some(text(at(m, &["offsetResetPolicy"])).as_str()),
        worker.get("auto.offset.reset"),
        "KEDA must count a group without commits as the worker starts it"
    );
    // KEDA's spelling of the ConfigMap's security settings.
    let property = |k: &str| cfg.kafka.properties.get(k).cloned().unwrap_or_default();
    let protocol = property("security.protocol");
    assert_eq!(
        text(at(m, &["tls"])) == "enable",
        protocol.ends_with("SSL"),
        "security.protocol = {protocol}"
    );
    let mechanism = property("sasl.mechanism")
        .to_ascii_lowercase()
        .replace("-sha-", "_sha")
        .replace("plain", "plaintext");
    assert_eq!(text(at(m, &["sasl"])), mechanism);
    // The scaler's credentials are the workers' Secret.
    let auth = manifest("TriggerAuthentication", "keda-scaledobject.yaml");
    let worker_secrets: BTreeSet<(String, String)> = list(at(container(&deployment), &["env"]))
        .iter()
        .filter_map(|e| {
            let r = e.get("valueFrom")?.get("secretKeyRef")?;
            Some((text(at(r, &["name"])), text(at(r, &["key"]))))
        })
        .collect();
    for s in list(at(&auth, &["spec", "secretTargetRef"])) {
        let secret = (text(at(s, &["name"])), text(at(s, &["key"])));
        assert!(
            worker_secrets.contains(&secret),
            "{secret:?} is not the workers'"
        );
    }
}

#[test]
fn the_pod_monitor_scrapes_the_workers_port_and_labels_replays_apart() {
    let pm = manifest("PodMonitor", "podmonitor");
    let deployment = manifest("Deployment", "deployment");
    let replay = manifest("Job", "replay-job");
    let selector = at(&pm, &["spec", "selector", "matchLabels"])
        .as_mapping()
        .expect("matchLabels");
    for workload in [&deployment, &replay] {
        let labels = at(workload, &["spec", "template", "metadata", "labels"]);
        for (k, v) in selector {
            assert_eq!(
                labels.get(text(k)).map(text),
                Some(text(v)),
                "selector {k:?}"
            );
        }
        for l in list(at(&pm, &["spec", "podTargetLabels"])) {
            assert!(labels.get(text(l)).is_some(), "pods lack {l:?}");
        }
    }
    let port = text(at(
        &list(at(&pm, &["spec", "podMetricsEndpoints"]))[0],
        &["port"],
    ));
    assert!(
        list(at(container(&deployment), &["ports"]))
            .iter()
            .any(|p| p.get("name").map(text) == Some(port.clone())),
        "no container port named {port}"
    );
}

// ---------------------------------------------------------------------------------------
// Example configurations

#[test]
fn every_example_passes_check_config() {
    let examples = files_in("deploy/examples", &[".toml"]);
    assert!(examples.len() >= 3, "{examples:?}");
    for file in &examples {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_segment-sync"));
        cmd.args(["check-config", "--config"])
            .arg(root().join(file));
        // As on an operator's machine: nothing set but what the file says, and the API key
        // that the file leaves to the environment (check-config refuses to go without one,
        // as `run` does).
        for (name, _) in std::env::vars() {
            if name.starts_with(ENV_PREFIX) || name == API_KEY_ENV {
                cmd.env_remove(name);
            }
        }
        cmd.env(API_KEY_ENV, "example-key");
        let out = cmd.output().expect("run segment-sync");
        assert!(
            out.status.success(),
            "segment-sync check-config --config {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // librdkafka knows every property and accepts its value (files are read later,
        // when a client is made, so the mounted paths need not exist here).
        let cfg = Config::load_with(&root().join(file), KeyRequirement::Optional).expect("loads");
        segment_sync::kafka::consumer_config(&cfg, &cfg.kafka.group_id)
            .create_native_config()
            .unwrap_or_else(|e| panic!("{file}: librdkafka refuses a property: {e}"));
        // The variables it tells the operator to set are ones the worker reads.
        let body = read(file);
        for var in body
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with(ENV_PREFIX) && !w.ends_with('_'))
        {
            assert_env_read(file, var);
        }
    }
}

#[test]
fn the_confluent_example_takes_the_registry_credentials_from_the_environment_masked() {
    let text = read("deploy/examples/confluent-cloud.toml");
    let cfg = Config::from_toml_str_with(
        &text,
        [(
            "SEGMENT_SYNC_KAFKA_SCHEMA_REGISTRY_URL".to_string(),
            "https://SRKEY:sr%2Fsecret-42@psrc-xxxxx.us-east-2.aws.confluent.cloud".to_string(),
        )],
        KeyRequirement::Optional,
    )
    .expect("loads");
    let shown = cfg.to_masked_toml();
    assert!(!shown.contains("secret-42"), "{shown}");
    segment_sync::decode::RegistryClient::from_config(&cfg.kafka).expect("registry client");
}

// ---------------------------------------------------------------------------------------
// What running workers export

fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| {
            let (labels, value) = l.rsplit_once(' ').expect("name{labels} value");
            let partition = labels
                .split("partition=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("partition label");
            (partition.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

fn partitions_reported(text: &str) -> BTreeSet<String> {
    series(text, "segment_sync_consumer_lag")
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

#[test]
fn each_partition_is_reported_by_its_owner_alone_with_the_time_its_commit_moved() {
    let env = mock_env(Faults::default(), 0);
    let topic = "kit";
    env.cluster.create_topic(topic, 2, 1).unwrap();
    env.cluster.create_topic("kit.dlq", 1, 1).unwrap();
    let mut cfg = test_config(&env.cluster.bootstrap_servers(), topic, &env.sim.url());
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ] {
        cfg.kafka.properties.insert(k.into(), v.into());
    }
    let done = |cfg: &segment_sync::config::Config| {
        committed(&cfg.kafka.brokers, &cfg.kafka.group_id, topic, 2)
            == end_offsets(&cfg.kafka.brokers, topic, 2)
    };
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(400, 3, 100),
    );
    let a = start(&env.rt, &cfg, None, StartAt::Committed, Until::Stopped);
    wait_until(
        "A has committed both partitions",
        Duration::from_secs(60),
        || done(&cfg) && partitions_reported(&a.metrics.render()).len() == 2,
    );
    let text = a.metrics.render();
    let stamps = series(&text, "segment_sync_last_commit_timestamp_seconds");
    assert_eq!(stamps.len(), 2, "{text}");
    for (p, t) in &stamps {
        assert!(
            *t >= before.floor() && *t <= now() + 1.0,
            "partition {p}: {t}"
        );
    }

    // A second member takes a partition: each is then reported once over the group, so lag
    // summed over the workers (the Prometheus autoscaling trigger) counts it once.
    let b = start(&env.rt, &cfg, None, StartAt::Committed, Until::Stopped);
    wait_until("B holds a partition", Duration::from_secs(60), || {
        b.health.assigned.load(std::sync::atomic::Ordering::Relaxed)
            && partitions_reported(&a.metrics.render()).len() == 1
    });
    produce(
        &env.rt,
        &cfg.kafka.brokers,
        topic,
        cfg.kafka.format,
        &clean_records(400, 4, 100),
    );
    wait_until(
        "both report their partition",
        Duration::from_secs(60),
        || {
            done(&cfg)
                && partitions_reported(&a.metrics.render()).len() == 1
                && partitions_reported(&b.metrics.render()).len() == 1
        },
    );
    let (ta, tb) = (a.metrics.render(), b.metrics.render());
    let (pa, pb) = (partitions_reported(&ta), partitions_reported(&tb));
    assert!(pa.is_disjoint(&pb), "{pa:?} {pb:?}");
    for text in [&ta, &tb] {
        for name in [
            "segment_sync_committed_offset",
            "segment_sync_last_commit_timestamp_seconds",
        ] {
            let reported: BTreeSet<String> =
                series(text, name).into_iter().map(|(p, _)| p).collect();
            assert_eq!(reported, partitions_reported(text), "{name} in\n{text}");
        }
    }
    a.stop();
    b.stop();
}

// ---------------------------------------------------------------------------------------
// make deps (scripts/install-deps.sh)

/// The script's code lines, comments left out.
fn install_deps_code() -> Vec<String> {
    read("scripts/install-deps.sh")
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The Debian packages the script may install: every `need+=(...)`.
fn install_deps_packages() -> Vec<String> {
    install_deps_code()
        .iter()
        .filter_map(|l| l.split_once("need+=(").map(|(_, rest)| rest))
        .flat_map(|rest| {
            rest.split(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn make_deps_never_installs_or_enables_a_prometheus_server() {
    let code = install_deps_code();
    let packages = install_deps_packages();
    assert!(packages.len() >= 7, "{packages:?}");
    assert!(
        !packages.iter().any(|p| p.contains("prometheus")),
        "{packages:?}"
    );
    for line in &code {
        assert!(!line.contains("systemctl"), "install-deps.sh: {line}");
        if line.contains("apt-get install") {
            assert!(
                line.contains("\"${need[@]}\"") && !line.contains("prometheus"),
                "install-deps.sh installs only the need list: {line}"
            );
        }
    }
    // promtool alone comes out of the package's archive, into the directory lint looks in.
    let text = code.join("\n");
    assert!(text.contains("apt-get download"), "{text}");
    assert!(text.contains("dpkg-deb -x"), "{text}");
    assert!(text.contains("usr/bin/promtool"), "{text}");
    assert!(text.contains(".cache/bin"), "{text}");
    let check = read("scripts/check-monitoring.py");
    assert!(check.contains("\".cache\", \"bin\""), "check-monitoring.py");
}

#[test]
fn the_readme_lists_what_make_deps_installs() {
    let readme = read("README.md");
    for package in install_deps_packages() {
        assert!(
            readme.contains(&format!("`{package}`")),
            "README does not say that make deps may install `{package}`"
        );
    }
    assert!(
        readme.contains("`.cache/bin/promtool`"),
        "README: where make deps puts promtool"
    );
}
