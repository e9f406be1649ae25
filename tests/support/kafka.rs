//! A real Apache Kafka broker (single-node KRaft) for the end-to-end tests.
//!
//! One broker per test binary, started on first use on free loopback ports in a fresh
//! scratch dir, from the jars that `tests/kafka/fetch-jars.sh` copies from Maven Central.
//!
//! The harness has no global teardown and never drops a static, so the broker's life
//! is tied to this process from outside: the JVM runs under `tests/kafka/guard.sh`,
//! which watches this process and, when it is gone (finished, panicked, killed with -9),
//! stops the JVM and removes the scratch dir. The guard also gets `SIGTERM` as its
//! parent-death signal, and dirs that a killed guard left behind are swept by the next run.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// How long the broker may take to answer a metadata request after it is launched.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new topic may take to show all its partitions with a leader.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of each metadata, watermark or offset request to the broker.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scratch dirs are `<tmp>/segment-sync-kafka-<pid>-<attempt>`: the pid tells the sweep
/// whether their owner is still alive.
const SCRATCH_PREFIX: &str = "segment-sync-kafka-";
/// Attempts to start when the broker loses a race for its ports to another process.
const START_ATTEMPTS: u32 = 3;

/// A running broker, shared by every test of one test binary.
pub struct KafkaBroker {
    port: u16,
    scratch: PathBuf,
}

static BROKER: OnceLock<KafkaBroker> = OnceLock::new();

impl KafkaBroker {
    /// The broker of this test binary, started by the first caller; later callers
    /// (other tests, on other threads) wait for it and share it.
    pub fn shared() -> &'static KafkaBroker {
        BROKER.get_or_init(start)
    }

    /// `bootstrap.servers` for clients: `127.0.0.1:PORT`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A client config with `bootstrap.servers` set, to add the rest to.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        config
    }

    /// The scratch dir: `server.properties`, `broker.log` (the JVM's stdout and stderr)
    /// and the log dir. Removed when the test process is gone.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Creates `name` with `partitions` partitions (replication 1) and returns once the
    /// broker's metadata shows every partition with a leader, so producers and consumers
    /// can use it at once. A topic that already exists with that many partitions is fine.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka admin client: {e}"));
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let deadline = Instant::now() + TOPIC_TIMEOUT;
        loop {
            let outcome = block_on(admin.create_topics([&topic], &options))
                .map_err(|e| e.to_string())
                .and_then(|results| match results.into_iter().next() {
                    Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
                    Some(Err((_, code))) if is_fatal(code) => {
                        panic!("cannot create topic {name} with {partitions} partitions: {code}")
                    }
                    Some(Err((_, code))) => Err(code.to_string()),
                    None => Err("no result for the topic".to_owned()),
                });
            match outcome {
                Ok(()) => break,
                // A broker that has only just started may not be unfenced yet
                // ("replication factor larger than available brokers").
                Err(e) if Instant::now() < deadline => {
                    eprintln!("kafka: create topic {name}: {e}; retrying");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot create topic {name}: {e}"),
            }
        }

        let mut shown = String::from("nothing yet");
        while Instant::now() < deadline {
            match admin.inner().fetch_metadata(Some(name), REQUEST_TIMEOUT) {
                Ok(metadata) => match topic_partitions(&metadata, name) {
                    Ok(found) if found.len() == partitions as usize => return,
                    Ok(found) => shown = format!("{} partitions with a leader", found.len()),
                    Err(e) => shown = e,
                },
                Err(e) => shown = e.to_string(),
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "topic {name} not ready with {partitions} partitions after {TOPIC_TIMEOUT:?}: {shown}"
        );
    }

    /// The high watermark (the offset the next record will get) of every partition of
    /// `topic`, by partition.
    pub fn end_offsets(&self, topic: &str) -> Vec<(i32, i64)> {
        let consumer = self.consumer(None);
        retry(&format!("end offsets of {topic}"), || {
            self.partitions(&consumer, topic)?
                .into_iter()
                .map(|partition| {
                    let (_, high) = consumer
                        .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                        .map_err(|e| format!("watermarks of partition {partition}: {e}"))?;
                    Ok((partition, high))
                })
                .collect()
        })
    }

    /// The offsets that `group` has committed for every partition of `topic`, by
    /// partition; -1 where it has committed none.
    pub fn committed_offsets(&self, group: &str, topic: &str) -> Vec<(i32, i64)> {
        let consumer = self.consumer(Some(group));
        retry(&format!("offsets of group {group} on {topic}"), || {
            let mut wanted = TopicPartitionList::new();
            for partition in self.partitions(&consumer, topic)? {
                wanted.add_partition(topic, partition);
            }
            let committed = consumer
                .committed_offsets(wanted, REQUEST_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let mut offsets = Vec::new();
            for element in committed.elements_for_topic(topic) {
                // A partition's own error (say, the coordinator is still loading) would
                // otherwise read as "nothing committed".
                element
                    .error()
                    .map_err(|e| format!("partition {}: {e}", element.partition()))?;
                let offset = match element.offset() {
                    Offset::Offset(offset) => offset,
                    _ => -1,
                };
                offsets.push((element.partition(), offset));
            }
            offsets.sort_unstable();
            Ok(offsets)
        })
    }

    /// A consumer that never subscribes: it only asks the broker questions, so it
    /// neither joins `group` nor commits for it.
    fn consumer(&self, group: Option<&str>) -> BaseConsumer {
        let mut config = self.client_config();
        config.set("enable.auto.commit", "false");
        if let Some(group) = group {
            config.set("group.id", group);
        }
        config
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka consumer: {e}"))
    }

    fn partitions(&self, consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
        let metadata = consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| format!("metadata: {e}"))?;
        topic_partitions(&metadata, topic)
    }
}

/// Runs `attempt` until it succeeds: right after the broker starts, the group coordinator
/// may still be loading. Panics with the last error after `TOPIC_TIMEOUT`.
fn retry<T>(what: &str, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + TOPIC_TIMEOUT;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(e) if Instant::now() < deadline => {
                eprintln!("kafka: {what}: {e}; retrying");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("kafka: cannot get the {what}: {e}"),
        }
    }
}

/// Topic-creation errors that waiting cannot cure.
fn is_fatal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::TopicAuthorizationFailed
    )
}

/// The partitions of `topic` that have a leader, sorted.
fn topic_partitions(metadata: &Metadata, topic: &str) -> Result<Vec<i32>, String> {
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("topic {topic} is not in the metadata"))?;
    if let Some(error) = found.error() {
        return Err(format!("topic {topic}: {}", RDKafkaErrorCode::from(error)));
    }
    let mut partitions: Vec<i32> = found
        .partitions()
        .iter()
        .filter(|p| p.leader() >= 0)
        .map(|p| p.id())
        .collect();
    partitions.sort_unstable();
    Ok(partitions)
}

fn start() -> KafkaBroker {
    let began = Instant::now();
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let libs = kafka_libs(&manifest_dir);
    sweep_stale_scratch_dirs();

    for attempt in 1..=START_ATTEMPTS {
        match launch(&manifest_dir, &libs, attempt) {
            Ok(broker) => {
                eprintln!(
                    "kafka: broker on {} ready in {:.1?} (scratch {})",
                    broker.bootstrap(),
                    began.elapsed(),
                    broker.scratch.display()
                );
                return broker;
            }
            Err(Failure::PortTaken(log)) if attempt < START_ATTEMPTS => {
                eprintln!("kafka: a port was taken before the broker bound it; retrying\n{log}");
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Why a start attempt failed; the messages carry the tail of the broker's log.
#[derive(Debug)]
enum Failure {
    PortTaken(String),
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::PortTaken(log) => write!(f, "the broker's port was taken\n{log}"),
            Failure::Other(message) => f.write_str(message),
        }
    }
}

/// The jar dir (`KAFKA_LIBS`, else `.cache/kafka/libs` in the crate), fetched first when
/// it is not complete, so that a plain `cargo test` works.
fn kafka_libs(manifest_dir: &Path) -> PathBuf {
    let libs = std::env::var_os("KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join(".cache/kafka/libs"));
    if !libs.join(".complete").is_file() {
        eprintln!("kafka: fetching the broker's jars into {}", libs.display());
        let status = Command::new("bash")
            .arg(manifest_dir.join("tests/kafka/fetch-jars.sh"))
            .env("KAFKA_LIBS", &libs)
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run tests/kafka/fetch-jars.sh: {e}"));
        assert!(
            status.success(),
            "tests/kafka/fetch-jars.sh failed ({status}): the Kafka jars are needed (Java 17, Maven, Maven Central)"
        );
    }
    libs
}

/// Removes the scratch dirs of earlier runs whose test process is gone (a guard killed
/// with -9 cannot clean up after itself).
fn sweep_stale_scratch_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner != std::process::id() && !Path::new(&format!("/proc/{owner}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn launch(manifest_dir: &Path, libs: &Path, attempt: u32) -> Result<KafkaBroker, Failure> {
    let scratch =
        std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}-{attempt}", std::process::id()));
    let other = |what: &str, e: io::Error| Failure::Other(format!("kafka: {what}: {e}"));
    // A dir of this name can only be left by a dead process that had our pid.
    let _ = fs::remove_dir_all(&scratch);
    let data = scratch.join("data");
    fs::create_dir_all(&data).map_err(|e| other("cannot create the scratch dir", e))?;

    let (port, controller_port) = free_port_pair().map_err(|e| other("no free port", e))?;
    let props = scratch.join("server.properties");
    fs::write(&props, server_properties(port, controller_port, &data))
        .map_err(|e| other("cannot write server.properties", e))?;
    let log = scratch.join("broker.log");

    format_log_dir(manifest_dir, libs, &props)?;

    let mut guard = Command::new("bash");
    guard
        .arg(manifest_dir.join("tests/kafka/guard.sh"))
        .arg(std::process::id().to_string())
        .arg(&scratch)
        .arg("--")
        .arg("java")
        .args(jvm_args(manifest_dir, libs))
        .arg("kafka.Kafka")
        .arg(&props);
    let exited = spawn_guarded(guard, &log).map_err(|e| other("cannot start the broker", e))?;

    wait_until_ready(port, &exited, &scratch, &log)?;
    Ok(KafkaBroker { port, scratch })
}

fn server_properties(port: u16, controller_port: u16, data: &Path) -> String {
    format!(
        "\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=1
auto.create.topics.enable=false
# One node: internal topics cannot have more replicas, and one partition each is
# created faster on the first group or transaction.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests join groups and kill members: no waiting for more members, and a dead member
# may be noticed after a second (classic protocol) or six (consumer protocol).
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
# A small heap: the compaction buffer would otherwise take 128 MiB of it.
log.cleaner.dedupe.buffer.size=8388608
",
        data = data.display()
    )
}

/// Flags for a broker that starts fast and stays small; it lives for one test binary.
fn jvm_args(manifest_dir: &Path, libs: &Path) -> Vec<String> {
    vec![
        "-Xms64m".to_owned(),
        "-Xmx512m".to_owned(),
        "-XX:+UseSerialGC".to_owned(),
        "-XX:TieredStopAtLevel=1".to_owned(),
        "-XX:-UsePerfData".to_owned(),
        format!(
            "-Dlog4j2.configurationFile={}",
            manifest_dir.join("tests/kafka/log4j2.properties").display()
        ),
        "-cp".to_owned(),
        format!("{}/*", libs.display()),
    ]
}

/// Formats the log dir (KRaft needs a cluster id and the bootstrap metadata).
fn format_log_dir(manifest_dir: &Path, libs: &Path, props: &Path) -> Result<(), Failure> {
    let mut format = Command::new("java");
    // This thread waits for the tool, so the signal only comes if the process dies.
    die_with_parent(&mut format, libc::SIGKILL);
    let output = format
        .args(jvm_args(manifest_dir, libs))
        .args([
            "kafka.tools.StorageTool",
            "format",
            "-t",
            &cluster_id(),
            "-c",
        ])
        .arg(props)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure::Other(format!("kafka: cannot run java (Java 17 is needed): {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Failure::Other(format!(
            "kafka: formatting the log dir failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// A Kafka cluster id: 16 random bytes in URL-safe base64 without padding, as
/// `kafka-storage random-uuid` prints (made here to save a JVM start). One starting with
/// `-` would be read by the tool as an option, so such ids are drawn again.
fn cluster_id() -> String {
    loop {
        let id = random_cluster_id();
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn random_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut id = String::with_capacity(22);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            id.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    id
}

/// Two distinct free loopback ports, held together while both are chosen.
fn free_port_pair() -> io::Result<(u16, u16)> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let first = TcpListener::bind(any)?;
    let second = TcpListener::bind(any)?;
    Ok((first.local_addr()?.port(), second.local_addr()?.port()))
}

/// Spawns the guard from a thread that lives as long as the guard: the parent-death
/// signal fires when the *thread* that forked exits, and test threads end with their test.
/// The receiver gets the guard's exit status if it ever stops.
fn spawn_guarded(mut guard: Command, log: &Path) -> io::Result<Receiver<io::Result<ExitStatus>>> {
    let stdout = fs::File::create(log)?;
    let stderr = stdout.try_clone()?;
    // The guard's output goes to the log, never to the harness's pipes, which a
    // lingering process would otherwise hold open.
    guard.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // TERM, not KILL: the guard traps it to stop the JVM and remove the scratch dir.
    die_with_parent(&mut guard, libc::SIGTERM);

    let (spawned_tx, spawned_rx) = mpsc::channel();
    let (exited_tx, exited_rx) = mpsc::channel();
    thread::Builder::new()
        .name("kafka-broker".to_owned())
        .spawn(move || match guard.spawn() {
            Ok(mut child) => {
                let _ = spawned_tx.send(Ok(()));
                let _ = exited_tx.send(child.wait());
            }
            Err(e) => {
                let _ = spawned_tx.send(Err(e));
            }
        })?;
    spawned_rx
        .recv()
        .map_err(|_| io::Error::other("the broker thread ended before spawning"))??;
    Ok(exited_rx)
}

/// Has the kernel send `signal` to the child when the thread that spawns it ends.
fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    // SAFETY: the closure runs between fork and exec; prctl is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Waits until the broker answers a metadata request listing itself.
fn wait_until_ready(
    port: u16,
    exited: &Receiver<io::Result<ExitStatus>>,
    scratch: &Path,
    log: &Path,
) -> Result<(), Failure> {
    let deadline = Instant::now() + START_TIMEOUT;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut client: Option<BaseConsumer> = None;
    let mut last_error = String::from("the port is not open yet");
    while Instant::now() < deadline {
        match exited.try_recv() {
            Err(TryRecvError::Empty) => {}
            // The guard outlives the broker while we live, so it only ends if killed.
            outcome => {
                let tail = log_tail(log);
                let status = match outcome {
                    Ok(Ok(status)) => status.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "unknown status".to_owned(),
                };
                return Err(Failure::Other(format!(
                    "kafka: the broker's guard exited ({status}) before the broker was ready; broker log:\n{tail}"
                )));
            }
        }
        if let Some(failure) = broker_died(scratch, log) {
            return Err(failure);
        }
        if client.is_none() {
            // Connecting first keeps librdkafka from retrying against a closed port.
            match TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                Ok(_) => {
                    let mut config = ClientConfig::new();
                    config.set("bootstrap.servers", format!("127.0.0.1:{port}"));
                    client = Some(config.create().map_err(|e: KafkaError| {
                        Failure::Other(format!("kafka: cannot create a client: {e}"))
                    })?);
                }
                Err(_) => {
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        if let Some(client) = &client {
            match client.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                Ok(_) => last_error = "metadata lists no broker yet".to_owned(),
                Err(e) => last_error = e.to_string(),
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    Err(Failure::Other(format!(
        "kafka: the broker did not answer within {START_TIMEOUT:?} ({last_error}); broker log:\n{}",
        log_tail(log)
    )))
}

/// The guard outlives a JVM that gave up and records its exit status.
fn broker_died(scratch: &Path, log: &Path) -> Option<Failure> {
    let status = fs::read_to_string(scratch.join("exit-status")).ok()?;
    let tail = log_tail(log);
    if tail.contains("Address already in use") {
        Some(Failure::PortTaken(tail))
    } else {
        Some(Failure::Other(format!(
            "kafka: the broker exited with status {}; broker log:\n{tail}",
            status.trim()
        )))
    }
}

/// The last 8 KiB of the broker's log.
fn log_tail(log: &Path) -> String {
    const TAIL: u64 = 8 * 1024;
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", log.display()))
}
