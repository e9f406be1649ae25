//! Secrets end to end: the built binary's `check-config`, `produce`, `run` and
//! `replay --dry-run`, given a Braze key, schema registry URLs with credentials (a plain one,
//! one that does not parse because its secret holds an unencoded `/`, a token alone) and SASL
//! passwords, driven down every error path a test can reach (registry unreachable or without
//! the schema, Braze refusing the key, Braze rejecting objects, a broker that is not there, a
//! SASL handshake). Nothing they print, serve or dead-letter may hold a secret, and every
//! process ends in bounded time.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use segment_sync::event::{Change, Event};
use segment_sync::kafka::RecordHeaders;
use segment_sync::tools::sim::{self, Faults, SimConfig};

use support::procs::{binary, free_port, http, Proc, WorkerConfig};
use support::registry::Registry;
use support::worker::{committed, end_offsets, read_all};

const BRAZE_KEY: &str = "brz-7f3a9c1e-5d2b-4e8a-live";
const REGISTRY_PASSWORD: &str = "RegPw-4c1d9e";
/// Confluent Cloud secrets hold `/`; unencoded, the URL does not parse.
const SLASH_SECRET: &str = "Sl4sh/9e2fQx";
const REGISTRY_TOKEN: &str = "Tok-only-5a7b3c";
const SASL_PASSWORD: &str = "SaslPw-8d3e1f";
const SSL_KEY_PASSWORD: &str = "SslKeyPw-1b6c2d";
const OAUTH_SECRET: &str = "OauthSecret-2f7a4b";

/// Every secret, and the pieces of one that would still be a leak: either side of the `/`,
/// and the Braze key without its fixed prefix.
const SECRETS: &[&str] = &[
    BRAZE_KEY,
    "7f3a9c1e-5d2b",
    REGISTRY_PASSWORD,
    SLASH_SECRET,
    "Sl4sh",
    "9e2fQx",
    REGISTRY_TOKEN,
    SASL_PASSWORD,
    SSL_KEY_PASSWORD,
    OAUTH_SECRET,
];

/// A process told to stop (or one that stops by itself) must be gone within this.
const EXIT_BOUND: Duration = Duration::from_secs(20);

/// `http://<user info>@host:port` from `http://host:port`.
fn with_user_info(url: &str, user_info: &str) -> String {
    url.replacen("http://", &format!("http://{user_info}@"), 1)
}

/// Properties that carry secrets without changing how a plaintext client connects.
fn secret_properties(cfg: &mut WorkerConfig) {
    for (k, v) in [
        ("sasl.username", "segment-sync".to_string()),
        ("sasl.password", SASL_PASSWORD.to_string()),
        ("ssl.key.password", SSL_KEY_PASSWORD.to_string()),
        (
            "sasl.oauthbearer.config",
            format!("clientId=segment-sync clientSecret={OAUTH_SECRET}"),
        ),
        // A bad broker must make `produce` fail soon rather than after librdkafka's 5 minutes.
        ("message.timeout.ms", "5000".to_string()),
    ] {
        cfg.properties.insert(k.to_string(), v);
    }
}

/// Starts `segment-sync <args> --config <name>.toml` with the Braze key in the environment
/// and debug logs, so that every line that could show a secret is written.
fn spawn(dir: &Path, name: &str, cfg: &WorkerConfig, args: &[&str]) -> Proc {
    let config = cfg.write(dir, name);
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .arg("--config")
        .arg(&config)
        .env("BRAZE_API_KEY", BRAZE_KEY)
        .env("RUST_LOG", "debug");
    Proc::spawn(name, cmd, dir)
}

/// What a process's HTTP server answers on `/metrics` and `/readyz`.
fn served(p: &Proc) -> (String, String) {
    let Some(base) = p.served_base() else {
        let none = "(no answer: not serving yet)".to_string();
        return (none.clone(), none);
    };
    let get = |path: &str| {
        http()
            .get(format!("{base}{path}"))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_else(|e| format!("(no answer: {e})"))
    };
    (get("/metrics"), get("/readyz"))
}

/// Polls `/readyz` until `want` holds for its body, returns the body and `/metrics`.
fn wait_served(p: &mut Proc, what: &str, want: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (metrics, ready) = served(p);
        if want(&ready) {
            return vec![metrics, ready];
        }
        if p.exited().is_some() || Instant::now() > deadline {
            panic!("{what}: /readyz says {ready:?}\n{}", p.report());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, then the exit within the bound.
fn stop(p: &mut Proc) {
    p.sigterm();
    let started = Instant::now();
    let status = p.wait_exit(EXIT_BOUND);
    assert!(
        status.is_some(),
        "still running {EXIT_BOUND:?} after SIGTERM\n{}",
        p.report()
    );
    eprintln!("{} exited {:?} after SIGTERM", p.name, started.elapsed());
}

/// Waits for a process that ends by itself.
fn finish(p: &mut Proc) -> std::process::ExitStatus {
    p.wait_exit(EXIT_BOUND)
        .unwrap_or_else(|| panic!("still running after {EXIT_BOUND:?}\n{}", p.report()))
}

fn event(n: usize) -> Event<'static> {
    Event {
        event_id: format!("unknown-id-{n}").into(),
        external_id: Some(format!("sec-{n}").into()),
        email: None,
        segment_id: "seg".into(),
        segment_name: None,
        change: Change::Entered,
        occurred_at: 1_700_000_000_000,
        sequence: Some(1),
        attributes: Vec::new(),
    }
}

/// Records in the Confluent wire format under a schema id the registry does not have.
fn produce_unknown_schema_ids(brokers: &str, topic: &str, n: usize) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("test producer");
    for i in 0..n {
        let payload = segment_sync::tools::encode::to_confluent(9999, &event(i));
        let key = format!("sec-{i}");
        producer
            .send(BaseRecord::to(topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)
            .expect("produce");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
}

/// Every header of every dead-letter record, as text.
fn dead_letter_headers(brokers: &str, topic: &str, partitions: i32) -> (usize, String) {
    let records = read_all(brokers, topic, partitions);
    let mut text = String::new();
    for m in &records {
        for (k, v) in m.record_headers() {
            text.push_str(&String::from_utf8_lossy(k));
            text.push('=');
            text.push_str(&String::from_utf8_lossy(v.unwrap_or_default()));
            text.push('\n');
        }
    }
    (records.len(), text)
}

#[test]
fn no_secret_in_any_output_of_any_command_on_any_error_path() {
    support::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim_with = |api_key: &str, faults: Faults| {
        rt.block_on(sim::start(
            SimConfig {
                api_key: api_key.into(),
                rate_limit: 0,
                rate_window_secs: 1,
                faults,
            },
            "127.0.0.1:0".parse().expect("an address"),
        ))
        .expect("simulator")
    };
    // Braze that takes the key and rejects some objects (dead letters with Braze's words),
    // and Braze that refuses it (401).
    let braze = sim_with(
        BRAZE_KEY,
        Faults {
            reject_rate: 0.3,
            ..Faults::default()
        },
    );
    let locked = sim_with("another-key", Faults::default());
    let registry = Registry::start();
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    for (topic, partitions) in [
        ("sec.avro", 2),
        ("sec.avro.dlq", 1),
        ("sec.json", 1),
        ("sec.json.dlq", 1),
    ] {
        cluster.create_topic(topic, partitions, 1).expect("topic");
    }
    // Nothing listens there.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let bad_broker = format!("127.0.0.1:{}", free_port());

    let plain_url = with_user_info(&registry.url, &format!("KEY:{REGISTRY_PASSWORD}"));
    let token_url = with_user_info(&registry.url, &format!(":{REGISTRY_TOKEN}"));
    let unparsable_url = with_user_info(&closed, &format!("KEY:{SLASH_SECRET}"));

    let config = |topic: &str, format: &str, registry_url: &str, braze_url: &str| {
        let mut c = WorkerConfig::new(&brokers, topic, braze_url);
        c.format = format.into();
        c.schema_registry_url = registry_url.into();
        c.drain_timeout_ms = 3000;
        secret_properties(&mut c);
        c
    };
    let avro = |registry_url: &str, braze_url: &str| {
        config("sec.avro", "avro-confluent", registry_url, braze_url)
    };

    let mut procs: Vec<Proc> = Vec::new();
    let mut bodies: Vec<(String, String)> = Vec::new();

    // check-config: each URL, and a file it refuses (a URL without a scheme, which is then
    // not http(s), with the secret in it).
    for (name, url) in [
        ("check-plain", plain_url.as_str()),
        ("check-token", &token_url),
        ("check-unparsable", &unparsable_url),
        (
            "check-refused",
            &format!("KEY:{SLASH_SECRET}@registry.example.com"),
        ),
    ] {
        let mut p = spawn(dir, name, &avro(url, &braze.url()), &["check-config"]);
        let status = finish(&mut p);
        let out = fs::read_to_string(&p.stdout).unwrap_or_default();
        if matches!(name, "check-refused" | "check-unparsable") {
            assert_eq!(status.code(), Some(2), "{}", p.report());
        } else {
            assert!(status.success(), "{}", p.report());
            assert!(out.contains("sasl.password"), "{name}: {out}");
        }
        procs.push(p);
    }

    // produce: into the topics the workers read, and down its error paths: the registry
    // unreachable (a token URL, an unparsable one) and a broker that is not there.
    let produce = |name: &str, cfg: &WorkerConfig, count: &str| {
        spawn(
            dir,
            name,
            cfg,
            &[
                "produce",
                "--count",
                count,
                "--bad-rate",
                "0.1",
                "--users",
                "50",
            ],
        )
    };
    let mut good = vec![
        produce("produce-avro", &avro(&plain_url, &braze.url()), "120"),
        produce(
            "produce-json",
            &config("sec.json", "json", &token_url, &locked.url()),
            "40",
        ),
    ];
    let mut failing = vec![
        produce(
            "produce-no-registry",
            &avro(
                &with_user_info(&closed, &format!(":{REGISTRY_TOKEN}")),
                &braze.url(),
            ),
            "5",
        ),
        produce(
            "produce-unparsable",
            &avro(&unparsable_url, &braze.url()),
            "5",
        ),
        produce(
            "produce-bad-broker",
            &WorkerConfig {
                brokers: bad_broker.clone(),
                ..config("sec.json", "json", &plain_url, &braze.url())
            },
            "5",
        ),
    ];
    for p in &mut good {
        assert!(finish(p).success(), "{}", p.report());
    }
    for p in &mut failing {
        assert!(!finish(p).success(), "should fail\n{}", p.report());
    }
    procs.extend(good);
    procs.extend(failing);
    produce_unknown_schema_ids(&brokers, "sec.avro", 3);
    let avro_records: i64 = end_offsets(&brokers, "sec.avro", 2).iter().sum();

    // run: every record settled, dead letters from Braze's rejections, from bad records and
    // from schema ids the registry does not have (404).
    let mut delivering = spawn(
        dir,
        "run-delivering",
        &avro(&plain_url, &braze.url()),
        &["run"],
    );
    // replay --dry-run with the token alone: decodes through the registry, writes nothing.
    let mut replaying = spawn(
        dir,
        "replay-dry-run",
        &avro(&token_url, &braze.url()),
        &["replay", "--from", "earliest", "--dry-run"],
    );
    // Refused before it starts: the unparsable URL.
    let mut unparsable = spawn(
        dir,
        "run-unparsable",
        &avro(&unparsable_url, &braze.url()),
        &["run"],
    );
    // The registry unreachable: readiness names the registry.
    let mut no_registry = avro(
        &with_user_info(&closed, &format!(":{REGISTRY_TOKEN}")),
        &braze.url(),
    );
    no_registry.group_id = "sec.no-registry".into();
    let mut unregistered = spawn(dir, "run-no-registry", &no_registry, &["run"]);
    // Braze refuses the key: 401.
    let mut refused = spawn(
        dir,
        "run-401",
        &config("sec.json", "json", &token_url, &locked.url()),
        &["run"],
    );
    // A broker that is not there, with SASL: nothing connects, the process still stops.
    let mut sasl = config("sec.json", "json", &plain_url, &braze.url());
    sasl.brokers = bad_broker.clone();
    sasl.properties
        .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
    sasl.properties
        .insert("sasl.mechanism".into(), "PLAIN".into());
    let mut no_broker = spawn(dir, "run-bad-broker", &sasl, &["run"]);
    let mut replay_no_broker = spawn(
        dir,
        "replay-bad-broker",
        &sasl,
        &["replay", "--from", "earliest", "--dry-run"],
    );
    // SASL against the mock cluster, which speaks plaintext only.
    let mut sasl_mock = sasl.clone();
    sasl_mock.brokers = brokers.clone();
    sasl_mock.group_id = "sec.sasl".into();
    let mut handshake = spawn(dir, "run-sasl-handshake", &sasl_mock, &["run"]);
    // OAUTHBEARER, with librdkafka's own configuration and security debug lines on: they
    // list every property.
    let mut oauth = sasl_mock.clone();
    oauth.group_id = "sec.oauth".into();
    oauth
        .properties
        .insert("sasl.mechanism".into(), "OAUTHBEARER".into());
    oauth
        .properties
        .insert("debug".into(), "conf,security".into());
    let mut bearer = spawn(dir, "run-oauthbearer", &oauth, &["run"]);

    let deadline = Instant::now() + Duration::from_secs(90);
    while committed(&brokers, "sec.avro.group", "sec.avro", 2)
        .iter()
        .sum::<i64>()
        < avro_records
    {
        assert!(
            Instant::now() < deadline && delivering.exited().is_none(),
            "the worker did not commit all {avro_records} records\n{}",
            delivering.report()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let (metrics, ready) = served(&delivering);
    assert_eq!(ready, "ready", "{}", delivering.report());
    bodies.push(("run-delivering /metrics".into(), metrics));
    bodies.push(("run-delivering /readyz".into(), ready));
    stop(&mut delivering);

    assert_eq!(
        finish(&mut unparsable).code(),
        Some(2),
        "{}",
        unparsable.report()
    );
    assert!(finish(&mut replaying).success(), "{}", replaying.report());
    let dry = fs::read_to_string(&replaying.stdout).unwrap_or_default();
    assert!(!dry.is_empty(), "the dry run printed nothing");

    for (p, what, want) in [
        (&mut unregistered, "registry unreachable", "schema registry"),
        (&mut refused, "Braze 401", "401"),
        (&mut no_broker, "bad broker", "not ready"),
        (&mut handshake, "SASL handshake", "not ready"),
        (&mut bearer, "OAUTHBEARER", "not ready"),
    ] {
        let got = wait_served(p, what, |r| r.contains(want));
        bodies.push((format!("{} /metrics", p.name), got[0].clone()));
        bodies.push((format!("{} /readyz", p.name), got[1].clone()));
    }
    // Long enough for librdkafka's connection attempts and SASL errors to be logged.
    thread::sleep(Duration::from_secs(2));
    for p in [
        &mut unregistered,
        &mut refused,
        &mut no_broker,
        &mut replay_no_broker,
        &mut handshake,
        &mut bearer,
    ] {
        stop(p);
    }
    procs.extend([
        unparsable,
        delivering,
        replaying,
        unregistered,
        refused,
        no_broker,
        replay_no_broker,
        handshake,
        bearer,
    ]);

    let (avro_dead, avro_headers) = dead_letter_headers(&brokers, "sec.avro.dlq", 1);
    let (json_dead, json_headers) = dead_letter_headers(&brokers, "sec.json.dlq", 1);
    assert!(
        avro_headers.contains("braze.error.type"),
        "no Braze rejection among {avro_dead} dead letters"
    );
    assert!(
        avro_headers.contains("9999"),
        "no unknown schema id among {avro_dead} dead letters:\n{avro_headers}"
    );
    bodies.push(("sec.avro.dlq headers".into(), avro_headers));
    bodies.push(("sec.json.dlq headers".into(), json_headers));
    eprintln!("dead letters: {avro_dead} avro, {json_dead} json");

    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for p in &procs {
        for (what, path) in [("stdout", &p.stdout), ("stderr", &p.stderr)] {
            let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
            seen.insert(format!("{} {what}", p.name), text);
        }
    }
    seen.extend(bodies);
    let mut leaks = Vec::new();
    for (what, text) in &seen {
        for secret in SECRETS {
            for line in text.lines().filter(|l| l.contains(secret)) {
                let line: String = line.chars().take(400).collect();
                leaks.push(format!("{what} shows {secret:?}: {line}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets shown:\n{}", leaks.join("\n"));
    // The error paths were taken: their words are there, without the secrets.
    let all: String = seen.values().map(String::as_str).collect();
    for expected in [
        "401",
        "schema registry",
        "registering the schema",
        "percent-encode",
        "***",
    ] {
        assert!(all.contains(expected), "no {expected:?} anywhere");
    }
}
