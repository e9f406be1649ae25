//! `segment-sync snapshot`, the built binary, against the real Apache Kafka broker of this
//! test binary and local Customer Insights run folders: what each run writes to the changes
//! topic (read committed, as the worker reads it), the refusals that write nothing, a run
//! killed with -9 between transactions and completed by the next, and the worker delivering
//! the result to the Braze simulator.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use support::azurite::Azurite;
use support::kafka::KafkaBroker;
use support::procs::{binary, Proc, Sim, Worker, WorkerConfig};

/// One test's topics and folders.
struct Case {
    dir: tempfile::TempDir,
    brokers: String,
    topic: String,
    config: PathBuf,
    export: PathBuf,
}

impl Case {
    fn new(name: &str, transaction_records: usize) -> Case {
        let broker = KafkaBroker::shared();
        let topic = format!("snap-{name}-{}", std::process::id());
        broker.create_topic(&topic, 2);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("snapshot.toml");
        fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = {:?}\ntopics = [{topic:?}]\ndlq_topic = \"{topic}.dlq\"\n\
                 format = \"json\"\n\n[snapshot]\ntransaction_records = {transaction_records}\n",
                broker.bootstrap()
            ),
        )
        .unwrap();
        let export = dir
            .path()
            .join("exports/CustomerInsights_7f3a/braze-export");
        Case {
            brokers: broker.bootstrap(),
            topic,
            config,
            export,
            dir,
        }
    }

    /// Writes the run folder `Segment/<stamp>` with `members` over `parts` partition files
    /// (the first with a header row) and rewrites model.json to list its partitions.
    fn write_run(&self, stamp: &str, members: &[String], parts: usize) -> PathBuf {
        let run = self.export.join("HighValue").join(stamp);
        fs::create_dir_all(&run).unwrap();
        let mut partitions = Vec::new();
        for p in 0..parts {
            let name = format!("HighValue_{}.csv", p + 1);
            let mut text = String::new();
            if p == 0 {
                text.push_str("CustomerId,PrimaryEmail,FirstName\n");
            }
            for (i, m) in members.iter().enumerate().filter(|(i, _)| i % parts == p) {
                text.push_str(&format!("{m},{m}@example.com,\"Name, {i}\"\n"));
            }
            fs::write(run.join(&name), text).unwrap();
            partitions.push(serde_json::json!({
                "name": name.trim_end_matches(".csv"),
                "location": format!(
                    "https://orbitcdp.dfs.core.windows.net/exports/CustomerInsights_7f3a/braze-export/HighValue/{stamp}/{name}"
                ),
                "refreshTime": "2026-12-04T03:05:00Z",
            }));
        }
        let model = serde_json::json!({
            "name": "braze-export",
            "version": "1.0",
            "entities": [{
                "$type": "LocalEntity",
                "name": "HighValue",
                "attributes": [
                    {"name": "CustomerId", "dataType": "string"},
                    {"name": "PrimaryEmail", "dataType": "string"},
                    {"name": "FirstName", "dataType": "string"}
                ],
                "partitions": partitions,
            }]
        });
        fs::write(
            self.export.join("model.json"),
            serde_json::to_vec_pretty(&model).unwrap(),
        )
        .unwrap();
        run
    }

    fn snapshot(&self, segment: &str, from: &Path, extra: &[&str]) -> (i32, String, String) {
        let out = self.command(segment, from, extra).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn command(&self, segment: &str, from: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg("snapshot")
            .arg("--config")
            .arg(&self.config)
            .args(["--segment", segment, "--from"])
            .arg(from)
            .args(extra)
            .env("RUST_LOG", "warn");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SEGMENT_SYNC_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn changes(&self) -> Vec<Change> {
        read_committed(&self.brokers, &self.topic)
            .into_iter()
            .map(|(key, value)| {
                let v: Value = serde_json::from_slice(&value.unwrap()).unwrap();
                Change {
                    key,
                    user: v["external_id"].as_str().unwrap().to_string(),
                    change: v["change"].as_str().unwrap().to_string(),
                    event_id: v["event_id"].as_str().unwrap().to_string(),
                    occurred_at: v["occurred_at"].as_i64().unwrap(),
                    sequence: v["sequence"].as_i64().unwrap(),
                    segment: v["segment_id"].as_str().unwrap().to_string(),
                }
            })
            .collect()
    }

    fn state(&self) -> Vec<(String, Option<Vec<u8>>)> {
        read_committed(&self.brokers, &format!("{}.snapshots", self.topic))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Change {
    key: String,
    user: String,
    change: String,
    event_id: String,
    occurred_at: i64,
    sequence: i64,
    segment: String,
}

fn users(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("cust-{i:04}")).collect()
}

/// Every committed record of `topic` (key, value), as a read-committed consumer sees it.
fn read_committed(brokers: &str, topic: &str) -> Vec<(String, Option<Vec<u8>>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "snapshot-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut pending: std::collections::BTreeSet<i32> = parts.into_iter().collect();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Ok(m)) => out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().map(<[u8]>::to_vec),
            )),
            _ => {}
        }
    }
    out
}

/// The changes of `after` that `before` does not hold (the topic has two partitions, so a
/// later run's records are not simply appended to the list).
fn since(before: &[Change], after: &[Change]) -> Vec<Change> {
    let seen: std::collections::HashSet<&str> =
        before.iter().map(|c| c.event_id.as_str()).collect();
    after
        .iter()
        .filter(|c| !seen.contains(c.event_id.as_str()))
        .cloned()
        .collect()
}

fn count(changes: &[Change], kind: &str) -> Vec<String> {
    let mut v: Vec<String> = changes
        .iter()
        .filter(|c| c.change == kind)
        .map(|c| c.user.clone())
        .collect();
    v.sort();
    v
}

#[test]
fn runs_become_entered_and_exited_changes_exactly_once() {
    let case = Case::new("runs", 100_000);
    let run1 = case.write_run("2026/12/03/0300", &users(0..40), 3);
    let (code, _, err) = case.snapshot("high-value", &run1, &[]);
    assert_eq!(code, 0, "{err}");
    let first = case.changes();
    assert_eq!(count(&first, "ENTERED"), users(0..40));
    assert!(count(&first, "EXITED").is_empty());
    let t1 = chrono::DateTime::parse_from_rfc3339("2026-12-03T03:00:00Z")
        .unwrap()
        .timestamp_millis();
    assert!(first.iter().all(|c| c.occurred_at == t1
        && c.sequence == t1
        && c.key == c.user
        && c.segment == "high-value"));

    // Leavers 0..5, joiners 40..45.
    let run2 = case.write_run("2026/12/04/0300", &users(5..45), 2);
    let (code, _, err) = case.snapshot("high-value", &run2, &[]);
    assert_eq!(code, 0, "{err}");
    let all = case.changes();
    let second = since(&first, &all);
    assert_eq!(count(&second, "ENTERED"), users(40..45));
    assert_eq!(count(&second, "EXITED"), users(0..5));
    assert!(err.contains("entered 5, exited 5, unchanged 35"), "{err}");

    // The same run again: nothing to do, nothing written.
    let (code, _, err) = case.snapshot("high-value", &run2, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing to do"), "{err}");
    assert_eq!(case.changes().len(), all.len());

    // The older run: refused, nothing written. (model.json lists run 2 now; --latest would
    // pick run 2, so the old run is given as a single file with its time.)
    let old = case.dir.path().join("old.csv");
    fs::write(&old, "CustomerId\ncust-0000\n").unwrap();
    let (code, _, err) = case.snapshot("high-value", &old, &["--run-time", "2026-12-03T03:00:00Z"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not newer"), "{err}");
    assert_eq!(case.changes().len(), all.len());

    // --latest picks run 2 under the table folder: already applied.
    let (code, _, err) = case.snapshot("high-value", &case.export.join("HighValue"), &["--latest"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already applied"), "{err}");

    // The state: one record per member of run 2, the segment's record last.
    let mut state: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for (k, v) in case.state() {
        state.insert(k, v);
    }
    let members: Vec<&String> = state
        .iter()
        .filter(|(k, v)| k.contains('\0') && v.is_some())
        .map(|(k, _)| k)
        .collect();
    assert_eq!(members.len(), 40);
    let seg: Value = serde_json::from_slice(state["high-value"].as_ref().unwrap()).unwrap();
    assert_eq!(seg["run"], "2026/12/04/0300");
    assert_eq!(seg["members"], 40);
}

#[test]
fn an_incomplete_run_and_a_mass_exit_are_refused_and_write_nothing() {
    let case = Case::new("guards", 100_000);
    let run1 = case.write_run("2026/12/03/0300", &users(0..20), 2);
    let (code, _, err) = case.snapshot("seg-a", &run1, &[]);
    assert_eq!(code, 0, "{err}");
    let first = case.changes();
    let before = first.len();
    assert_eq!(before, 20);

    // A partition model.json lists is missing.
    let run2 = case.write_run("2026/12/04/0300", &users(0..25), 2);
    fs::remove_file(run2.join("HighValue_2.csv")).unwrap();
    let (code, _, err) = case.snapshot("seg-a", &run2, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HighValue_2.csv"), "{err}");
    assert_eq!(case.changes().len(), before);

    // A malformed row: refused with file and line.
    let run3 = case.write_run("2026/12/05/0300", &users(0..25), 1);
    let mut text = fs::read_to_string(run3.join("HighValue_1.csv")).unwrap();
    text.push_str("cust-9999,only-two-fields\n");
    fs::write(run3.join("HighValue_1.csv"), text).unwrap();
    let (code, _, err) = case.snapshot("seg-a", &run3, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HighValue_1.csv:27"), "{err}");
    assert_eq!(case.changes().len(), before);

    // An export of 5 members where there were 20: 15 exits > 0.5 × 20.
    let run4 = case.write_run("2026/12/06/0300", &users(0..5), 1);
    let (code, _, err) = case.snapshot("seg-a", &run4, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(case.changes().len(), before);
    // A dry run shows what --force would write, and writes nothing.
    let (code, out, err) = case.snapshot("seg-a", &run4, &["--force", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    let counts: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        (counts["members"].as_u64(), counts["exited"].as_u64()),
        (Some(5), Some(15)),
        "{out}"
    );
    let shown: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(shown.len(), 15, "{out}");
    assert!(shown.iter().all(|c| c["change"] == "EXITED"), "{out}");
    assert_eq!(case.changes().len(), before);
    let (code, _, err) = case.snapshot("seg-a", &run4, &["--force"]);
    assert_eq!(code, 0, "{err}");
    let after = case.changes();
    assert_eq!(after.len(), before + 15);
    assert_eq!(count(&since(&first, &after), "EXITED"), users(5..20));
}

#[test]
fn restate_resends_entered_with_new_ids_and_retire_exits_everyone() {
    let case = Case::new("restate", 100_000);
    let run1 = case.write_run("2026/12/03/0300", &users(0..10), 1);
    assert_eq!(case.snapshot("seg-r", &run1, &[]).0, 0);
    let first = case.changes();
    let (code, _, err) = case.snapshot("seg-r", &run1, &["--restate"]);
    assert_eq!(code, 0, "{err}");
    let all = case.changes();
    let restated = &since(&first, &all);
    assert_eq!(count(restated, "ENTERED"), users(0..10));
    for r in restated {
        assert!(
            first.iter().all(|f| f.event_id != r.event_id),
            "a new event id"
        );
    }

    let (code, _, err) = case.snapshot("seg-r", &run1, &["--retire"]);
    assert_eq!(code, 0, "{err}");
    let all2 = case.changes();
    let retired = &since(&all, &all2);
    assert_eq!(count(retired, "EXITED"), users(0..10));
    let t1 = restated[0].occurred_at;
    assert!(retired.iter().all(|c| c.occurred_at > t1));
    let (code, _, err) = case.snapshot("seg-r", &run1, &["--retire"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing to do"), "{err}");
    // An export older than the retirement is refused; a newer one is a first run again.
    let (code, _, err) = case.snapshot("seg-r", &run1, &[]);
    assert_eq!(code, 1, "{err}");
    let later = case.dir.path().join("later.csv");
    fs::write(&later, format!("CustomerId\n{}\n", users(0..3).join("\n"))).unwrap();
    let (code, _, err) = case.snapshot("seg-r", &later, &["--run-time", "2999-01-01T00:00:00Z"]);
    assert_eq!(code, 0, "{err}");
    let fresh = since(&all2, &case.changes());
    assert_eq!(count(&fresh, "ENTERED"), users(0..3));
    assert!(count(&fresh, "EXITED").is_empty());
    let members = case
        .state()
        .into_iter()
        .fold(BTreeMap::new(), |mut m, (k, v)| {
            m.insert(k, v);
            m
        })
        .into_iter()
        .filter(|(k, v)| k.starts_with("seg-r\0") && v.is_some())
        .count();
    assert_eq!(members, 3);
}

/// The run's records as (key, change, event id), sorted: what the worker would see.
fn fingerprint(changes: &[Change]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = changes
        .iter()
        .map(|c| (c.key.clone(), c.change.clone(), c.event_id.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_run_killed_between_transactions_is_completed_by_the_next_invocation() {
    // Transactions of 7 changes: run 2 (15 joiners, 10 leavers) takes four.
    let killed = Case::new("killed", 7);
    let clean = Case::new("clean", 7);
    for case in [&killed, &clean] {
        let run1 = case.write_run("2026/12/03/0300", &users(0..30), 2);
        let (code, _, err) = case.snapshot("seg-k", &run1, &[]);
        assert_eq!(code, 0, "{err}");
    }
    let run2_clean = clean.write_run("2026/12/04/0300", &users(10..45), 3);
    assert_eq!(clean.snapshot("seg-k", &run2_clean, &[]).0, 0);

    let run2 = killed.write_run("2026/12/04/0300", &users(10..45), 3);
    let mut proc = Proc::spawn(
        "snapshot-paused",
        killed.command("seg-k", &run2, &["--pause-before-transaction", "3"]),
        killed.dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proc
        .stderr_tail(4096)
        .contains("paused before committing transaction 3")
    {
        assert!(Instant::now() < deadline, "{}", proc.report());
        assert!(proc.exited().is_none(), "{}", proc.report());
        std::thread::sleep(Duration::from_millis(50));
    }
    proc.sigkill();
    // Two transactions of 7 committed; the third was open when the process died.
    let partial = killed.changes().len();
    assert_eq!(partial, 30 + 14);

    let (code, _, err) = killed.snapshot("seg-k", &run2, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fingerprint(&killed.changes()),
        fingerprint(&clean.changes()),
        "every change exactly as without the crash"
    );
    let (code, _, err) = killed.snapshot("seg-k", &run2, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already applied"), "{err}");
}

#[test]
fn the_worker_delivers_the_snapshot_changes_to_braze() {
    let case = Case::new("braze", 100_000);
    let run1 = case.write_run("2026/12/03/0300", &users(0..12), 1);
    assert_eq!(case.snapshot("vip", &run1, &[]).0, 0);
    let run2 = case.write_run("2026/12/04/0300", &users(4..16), 2);
    assert_eq!(case.snapshot("vip", &run2, &[]).0, 0);

    let sim = Sim::start(case.dir.path(), "sim", &[]);
    let cfg = WorkerConfig::new(&case.brokers, &case.topic, &sim.url);
    let mut worker = Worker::start(case.dir.path(), "worker", &cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let profiles = sim.profiles();
        let done = users(0..16).iter().all(|u| {
            profiles
                .get(&format!("external_id:{u}"))
                .and_then(|p| p.get("vip"))
                .is_some_and(|v| v == &Value::Bool((4..16).any(|i| users(i..i + 1)[0] == *u)))
        });
        if done {
            assert_eq!(profiles.len(), 16, "{profiles:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{profiles:?}\n{}",
            worker.proc.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    worker.proc.sigterm();
}

#[test]
fn an_export_in_azure_blob_storage_is_read_through_the_object_store() {
    let azurite = Azurite::start();
    azurite.create_container("exports");
    let case = Case::new("azure", 100_000);
    let from = "az://exports/CustomerInsights_7f3a/braze-export/HighValue";
    let run = |extra: &[&str]| {
        let mut args = vec!["--latest", "--email-column", "PrimaryEmail"];
        args.extend_from_slice(extra);
        let out = case
            .command("seg-az", Path::new(from), &args)
            .env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env("AZURITE_BLOB_STORAGE_URL", azurite.blob_url())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let exports = case.dir.path().join("exports");

    case.write_run("2026/12/03/0300", &users(0..20), 2);
    azurite.upload_tree("exports", &exports);
    assert_eq!(
        azurite.list("exports").len(),
        3,
        "{:?}",
        azurite.list("exports")
    );
    let (code, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    let first = case.changes();
    assert_eq!(count(&first, "ENTERED"), users(0..20));

    case.write_run("2026/12/04/0300", &users(3..25), 3);
    azurite.upload_tree("exports", &exports);
    let (code, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    let second = since(&first, &case.changes());
    assert_eq!(count(&second, "ENTERED"), users(20..25));
    assert_eq!(count(&second, "EXITED"), users(0..3));
    let (code, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already applied"), "{err}");

    // The newest run lost a partition: refused by its URL, nothing written.
    let before = case.changes().len();
    case.write_run("2026/12/05/0300", &users(3..30), 2);
    azurite.upload_tree("exports", &exports);
    azurite.delete(
        "exports",
        "CustomerInsights_7f3a/braze-export/HighValue/2026/12/05/0300/HighValue_2.csv",
    );
    let (code, err) = run(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("az://exports/CustomerInsights_7f3a/braze-export/HighValue/2026/12/05/0300/HighValue_2.csv"),
        "{err}"
    );
    assert_eq!(case.changes().len(), before);
}

/// Writes `<export>/<table>/<stamp>/<file>` for each (stamp, file, text), exactly as given.
fn write_files(export: &Path, table: &str, files: &[(&str, &str, &str)]) {
    for (stamp, file, text) in files {
        let dir = export.join(table).join(stamp);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(file), text).unwrap();
    }
}

/// One table of a model.json: its name, columns and partitions as (run stamp, file name).
type ModelTable<'a> = (&'a str, &'a [&'a str], Vec<(&'a str, &'a str)>);

/// A model.json as a Customer Insights export writes it (with a byte order mark): each
/// (table, columns, partitions) with its partitions' locations URL-encoded under the
/// storage account's https URL.
fn write_model(export: &Path, entities: &[ModelTable<'_>]) {
    let entities: Vec<Value> = entities
        .iter()
        .map(|(table, columns, partitions)| {
            serde_json::json!({
                "$type": "LocalEntity",
                "name": table,
                "description": "",
                "annotations": [{"name": "Microsoft.CustomerInsights.EntityType", "value": "Segment"}],
                "attributes": columns.iter().map(|c| serde_json::json!({"name": c, "dataType": "string"})).collect::<Vec<_>>(),
                "partitions": partitions.iter().map(|(stamp, file)| serde_json::json!({
                    "name": file.trim_end_matches(".csv"),
                    "refreshTime": "2026-12-04T14:35:12.1234567Z",
                    "location": format!(
                        "https://orbitcdp.blob.core.windows.net/exports/CustomerInsights_7f3a/braze-export/{table}/{stamp}/{}",
                        file.replace(' ', "%20")
                    ),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let model = serde_json::json!({
        "name": "braze-export", "description": "", "version": "1.0",
        "modifiedTime": "2026-12-04T14:35:12Z", "entities": entities,
    });
    fs::create_dir_all(export).unwrap();
    let mut text = "\u{feff}".as_bytes().to_vec();
    text.extend(serde_json::to_vec_pretty(&model).unwrap());
    fs::write(export.join("model.json"), text).unwrap();
}

/// Every committed change's (user key, change) as the worker would read them.
fn changes_by_key(case: &Case) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = read_committed(&case.brokers, &case.topic)
        .into_iter()
        .map(|(_, value)| {
            let v: Value = serde_json::from_slice(&value.unwrap()).unwrap();
            let user = match v["external_id"].as_str() {
                Some(id) => format!("external_id:{id}"),
                None => format!("email:{}", v["email"].as_str().unwrap()),
            };
            (
                user,
                v["change"].as_str().unwrap().to_string(),
                v["event_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Waits until every profile key in `want` holds `segment` = its value in the simulator.
fn wait_braze(sim: &Sim, worker: &mut Worker, segment: &str, want: &[(&str, bool)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let profiles = sim.profiles();
        let done = want.iter().all(|(key, v)| {
            profiles
                .get(*key)
                .and_then(|p| p.get(segment))
                .is_some_and(|got| got == &Value::Bool(*v))
        });
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "want {want:?}\n{profiles:?}\n{}",
            worker.proc.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A new user's pass over an export tree written by hand as Customer Insights writes one:
/// several runs on different days and times, model.json listing only the newest run of its
/// table beside another table's partitions, a partition name with a space, byte order marks,
/// CRLF, every field quoted, a header row, ids with a space or a comma, members known only by
/// email, and a failed refresh exporting an empty segment. The worker runs throughout and
/// Braze is read back after each run.
#[test]
fn a_hand_written_customer_insights_tree_reaches_braze_run_by_run() {
    let case = Case::new("ci-tree", 100_000);
    let export = case.export.clone();
    let table = export.join("HighValue");
    let cols: &[&str] = &["CustomerId", "FirstName", "PrimaryEmail"];
    let sim = Sim::start(case.dir.path(), "sim", &[]);
    let cfg = WorkerConfig::new(&case.brokers, &case.topic, &sim.url);
    let mut worker = Worker::start(case.dir.path(), "worker", &cfg);
    let snapshot = |extra: &[&str]| {
        let mut args = vec!["--latest", "--email-column", "PrimaryEmail"];
        args.extend_from_slice(extra);
        case.snapshot("vip", &table, &args)
    };

    // Run 1, late on the 3rd: a header, BOM and CRLF in the first partition, none in the second.
    write_files(
        &export,
        "HighValue",
        &[
            (
                "2026/12/03/2359",
                "HighValue 1.csv",
                "\u{feff}\"CustomerId\",\"FirstName\",\"PrimaryEmail\"\r\n\
                 \"c 001\",\"Ada\",\"ada@x.io\"\r\n\"acme,42\",\"Lovelace, A\",\"\"\r\n",
            ),
            (
                "2026/12/03/2359",
                "HighValue_2.csv",
                "\"c003\",\"Bob\",\"bob@x.io\"\r\n\"\",\"Cy\",\"cy@x.io\"\r\n\"\",\"Nobody\",\"\"\r\n",
            ),
        ],
    );
    write_model(
        &export,
        &[
            (
                "HighValue",
                cols,
                vec![
                    ("2026/12/03/2359", "HighValue 1.csv"),
                    ("2026/12/03/2359", "HighValue_2.csv"),
                ],
            ),
            (
                "Churners",
                &["CustomerId"],
                vec![("2026/12/03/2359", "Churners_1.csv")],
            ),
        ],
    );
    write_files(
        &export,
        "Churners",
        &[("2026/12/03/2359", "Churners_1.csv", "x1\r\n")],
    );
    let (code, out, err) = snapshot(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("members 4") && err.contains("skipped rows 1"),
        "{err}"
    );
    let first = changes_by_key(&case);
    let entered: Vec<&str> = first.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        entered,
        [
            "email:cy@x.io",
            "external_id:acme,42",
            "external_id:c 001",
            "external_id:c003"
        ]
    );
    wait_braze(
        &sim,
        &mut worker,
        "vip",
        &[
            ("external_id:c 001", true),
            ("external_id:acme,42", true),
            ("external_id:c003", true),
            ("email:cy@x.io", true),
        ],
    );

    // Run 2 in the afternoon of the 4th, beside an earlier run of the 4th that model.json no
    // longer lists: --latest takes 14:30; c003 and cy left, c004 joined.
    write_files(
        &export,
        "HighValue",
        &[
            ("2026/12/04/0300", "HighValue_1.csv", "c 001,Ada,ada@x.io\n"),
            (
                "2026/12/04/1430",
                "HighValue 1.csv",
                "\u{feff}\"CustomerId\",\"FirstName\",\"PrimaryEmail\"\r\n\"c 001\",\"Ada\",\"ada@x.io\"\r\n",
            ),
            ("2026/12/04/1430", "HighValue_2.csv", "\"acme,42\",\"A\",\"\"\r\n\"c004\",\"Di\",\"di@x.io\"\r\n"),
        ],
    );
    write_model(
        &export,
        &[(
            "HighValue",
            cols,
            vec![
                ("2026/12/04/1430", "HighValue 1.csv"),
                ("2026/12/04/1430", "HighValue_2.csv"),
            ],
        )],
    );
    let (code, out, err) = snapshot(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("run 2026/12/04/1430"), "{err}");
    let all = changes_by_key(&case);
    let second: Vec<(&str, &str)> = all
        .iter()
        .filter(|c| !first.contains(c))
        .map(|c| (c.0.as_str(), c.1.as_str()))
        .collect();
    assert_eq!(
        second,
        [
            ("email:cy@x.io", "EXITED"),
            ("external_id:c003", "EXITED"),
            ("external_id:c004", "ENTERED")
        ]
    );
    wait_braze(
        &sim,
        &mut worker,
        "vip",
        &[
            ("external_id:c 001", true),
            ("external_id:acme,42", true),
            ("external_id:c003", false),
            ("email:cy@x.io", false),
            ("external_id:c004", true),
        ],
    );

    // Run 3, a failed refresh: only the header. Refused by the shrink guard, nothing written;
    // applied with --force.
    write_files(
        &export,
        "HighValue",
        &[(
            "2026/12/05/0300",
            "HighValue_1.csv",
            "\u{feff}\"CustomerId\",\"FirstName\",\"PrimaryEmail\"\r\n",
        )],
    );
    write_model(
        &export,
        &[(
            "HighValue",
            cols,
            vec![("2026/12/05/0300", "HighValue_1.csv")],
        )],
    );
    let before = changes_by_key(&case);
    let (code, out, err) = snapshot(&[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refused") && err.contains("exited 3"), "{err}");
    assert_eq!(changes_by_key(&case), before);
    let (code, out, err) = snapshot(&["--force"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_braze(
        &sim,
        &mut worker,
        "vip",
        &[
            ("external_id:c 001", false),
            ("external_id:acme,42", false),
            ("external_id:c004", false),
        ],
    );
    worker.proc.sigterm();
}

/// One CSV or NDJSON file takes its time from --run-time; without it the run is an error
/// (exit 2) that names the option.
#[test]
fn single_files_take_their_run_time_from_the_command_line() {
    let case = Case::new("single", 100_000);
    let csv = case.dir.path().join("members.csv");
    fs::write(
        &csv,
        "\u{feff}Email,CustomerId\r\na@x.io,u1\r\nb@x.io,\"u 2\"\r\n",
    )
    .unwrap();
    let (code, _, err) = case.snapshot("one", &csv, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--run-time"), "{err}");
    let (code, _, err) = case.snapshot("one", &csv, &["--run-time", "2026-12-04T03:00:00Z"]);
    assert_eq!(code, 0, "{err}");
    let nd = case.dir.path().join("members.ndjson");
    fs::write(
        &nd,
        "\u{feff}{\"CustomerId\":\"u1\"}\r\n{\"CustomerId\":\"u3\"}\r\n",
    )
    .unwrap();
    let (code, _, err) = case.snapshot("one", &nd, &["--run-time", "2026-12-05T03:00:00Z"]);
    assert_eq!(code, 0, "{err}");
    let changes = case.changes();
    assert_eq!(count(&changes, "ENTERED"), ["u 2", "u1", "u3"]);
    assert_eq!(count(&changes, "EXITED"), ["u 2"]);
    assert!(changes
        .iter()
        .any(|c| c.user == "u3" && c.occurred_at == 1_796_439_600_000));
    // An older file is refused.
    let (code, _, err) = case.snapshot(
        "one",
        &csv,
        &["--run-time", "2026-12-04T03:00:00Z", "--run", "again"],
    );
    assert_eq!(code, 1, "{err}");
}

/// `--restate` is the repair after a dead-lettered entry: Braze rejected one member's object,
/// the live worker dead-lettered it and forgot what it had sent for that user, so the restated
/// ENTERED reaches Braze; the members it remembers delivering are left out as redundant.
#[test]
fn restate_repairs_a_dead_lettered_entry_while_the_worker_runs() {
    let case = Case::new("repair", 100_000);
    let sim = Sim::start(case.dir.path(), "sim", &[]);
    sim.set_faults(&segment_sync::tools::sim::Faults {
        reject_prefix: Some("cust-0002".into()),
        ..Default::default()
    });
    let cfg = WorkerConfig::new(&case.brokers, &case.topic, &sim.url);
    let mut worker = Worker::start(case.dir.path(), "worker", &cfg);
    let run = case.write_run("2026/12/04/0300", &users(0..4), 1);
    assert_eq!(case.snapshot("vip", &run, &[]).0, 0);
    wait_braze(
        &sim,
        &mut worker,
        "vip",
        &[
            ("external_id:cust-0000", true),
            ("external_id:cust-0001", true),
            ("external_id:cust-0003", true),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim.stats().objects_rejected == 0 {
        assert!(Instant::now() < deadline, "{}", worker.proc.report());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sim.profiles().contains_key("external_id:cust-0002"));

    sim.set_faults(&Default::default());
    let tracked = sim.stats().objects_applied;
    let (code, _, err) = case.snapshot("vip", &run, &["--restate"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("restated 4"), "{err}");
    wait_braze(&sim, &mut worker, "vip", &[("external_id:cust-0002", true)]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sim.stats().objects_applied - tracked,
        1,
        "only the dead-lettered member is sent again"
    );
    worker.proc.sigterm();
}

/// The same export read through an `abfss://<container>@<account>.dfs.core.windows.net/` URL
/// (the form ADLS Gen2 users copy), an `az://` run folder URL and the account's `https://`
/// URL, with a partition whose name holds a space and a model.json starting with a byte order
/// mark.
#[test]
fn abfss_az_and_https_urls_read_the_same_export() {
    let azurite = Azurite::start();
    azurite.create_container("exports");
    let case = Case::new("abfss", 100_000);
    let cols: &[&str] = &["CustomerId", "PrimaryEmail"];
    let snapshot = |from: &str, extra: &[&str]| {
        let out = case
            .command("seg-abfss", Path::new(from), extra)
            .env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env("AZURITE_BLOB_STORAGE_URL", azurite.blob_url())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    write_files(
        &case.export,
        "HighValue",
        &[
            (
                "2026/12/03/0300",
                "HighValue 1.csv",
                "\u{feff}\"CustomerId\",\"PrimaryEmail\"\r\n\"a 1\",\"\"\r\n\"b,2\",\"\"\r\n",
            ),
            ("2026/12/03/0300", "HighValue_2.csv", "\"c3\",\"\"\r\n"),
        ],
    );
    write_model(
        &case.export,
        &[(
            "HighValue",
            cols,
            vec![
                ("2026/12/03/0300", "HighValue 1.csv"),
                ("2026/12/03/0300", "HighValue_2.csv"),
            ],
        )],
    );
    let exports = case.dir.path().join("exports");
    azurite.upload_tree("exports", &exports);
    let (code, err) = snapshot(
        "abfss://exports@devstoreaccount1.dfs.core.windows.net/CustomerInsights_7f3a/braze-export/HighValue",
        &["--latest"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&case.changes(), "ENTERED"), ["a 1", "b,2", "c3"]);

    write_files(
        &case.export,
        "HighValue",
        &[("2026/12/04/0300", "HighValue_1.csv", "c3,\r\nd4,\r\n")],
    );
    write_model(
        &case.export,
        &[(
            "HighValue",
            cols,
            vec![("2026/12/04/0300", "HighValue_1.csv")],
        )],
    );
    azurite.upload_tree("exports", &exports);
    let (code, err) = snapshot(
        "az://exports/CustomerInsights_7f3a/braze-export/HighValue/2026/12/04/0300/",
        &["--force"],
    );
    assert_eq!(code, 0, "{err}");
    let changes = case.changes();
    assert_eq!(count(&changes, "ENTERED"), ["a 1", "b,2", "c3", "d4"]);
    assert_eq!(count(&changes, "EXITED"), ["a 1", "b,2"]);

    // The account's https URL, as the portal and model.json show it: the same run.
    let (code, err) = snapshot(
        "https://devstoreaccount1.blob.core.windows.net/exports/CustomerInsights_7f3a/braze-export/HighValue",
        &["--latest"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already applied"), "{err}");
}

/// A partition with a short row, or bytes that are not UTF-8, is refused (exit 1) naming the
/// file and line; nothing is written.
#[test]
fn a_malformed_partition_is_refused_naming_its_file_and_line() {
    let case = Case::new("malformed", 100_000);
    let cols: &[&str] = &["CustomerId", "FirstName", "PrimaryEmail"];
    let stamp = "2026/12/04/0300";
    write_model(
        &case.export,
        &[(
            "HighValue",
            cols,
            vec![(stamp, "HighValue_1.csv"), (stamp, "HighValue_2.csv")],
        )],
    );
    write_files(
        &case.export,
        "HighValue",
        &[
            (stamp, "HighValue_1.csv", "c1,Ada,ada@x.io\r\n"),
            (stamp, "HighValue_2.csv", "c2,Bob,bob@x.io\r\nc3,Cy\r\n"),
        ],
    );
    let run = case.export.join("HighValue").join(stamp);
    let (code, _, err) = case.snapshot("bad", &run, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HighValue_2.csv:2"), "{err}");

    let dir = case.export.join("HighValue").join(stamp);
    fs::write(
        dir.join("HighValue_2.csv"),
        b"c2,Bob,bob@x.io\r\nc3,\xff\xfe,\r\n",
    )
    .unwrap();
    let (code, _, err) = case.snapshot("bad", &run, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HighValue_2.csv:2"), "{err}");
    assert!(case.changes().is_empty());
}
