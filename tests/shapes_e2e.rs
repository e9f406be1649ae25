//! The CDP shapes end to end with the built binary on the real Apache Kafka broker, under a
//! kill -9 and a restart: Debezium change events with the JSON converter's schema wrapper
//! (tombstones after deletes included), and Adobe Real-Time CDP profiles holding several
//! audiences each. Every user must end as the log's last change says, and the group must
//! commit the end of the topic.
//!
//! Needs the broker's jars (`KAFKA_LIBS`), as every `*_e2e` test.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;

use segment_sync::config::Shape;
use segment_sync::tools::shapes::{Samples, ShapedRecord};

use support::expected::{boolean_profiles, diff, strip_identifiers, Landed};
use support::kafka::KafkaBroker;
use support::procs::{Sim, Worker, WorkerConfig};

const PARTITIONS: i32 = 3;
const CONVERGE: Duration = Duration::from_secs(90);

fn produce(broker: &KafkaBroker, topic: &str, records: &[ShapedRecord]) -> Vec<Landed> {
    let producer: FutureProducer = broker
        .client_config()
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    support::expected::produce_shaped(&rt, &producer, topic, records)
}

fn source_toml(shape: Shape) -> String {
    match shape {
        Shape::Debezium => "[source]\nshape = \"debezium\"\nuser_column = \"user_id\"\nsegment_column = \"segment_id\"\nemail_column = \"email\"\nmember_column = \"is_member\"\n".into(),
        Shape::AdobeRtcdp => "[source]\nshape = \"adobe-rtcdp\"\nexternal_id = \"/identityMap/crmId/0/id\"\nemail = \"/personalEmail/address\"\n".into(),
        other => format!("[source]\nshape = \"{}\"\n", other.name()),
    }
}

fn killed_and_restarted(shape: Shape, topic: &str) {
    let broker = KafkaBroker::shared();
    broker.create_topic(topic, PARTITIONS);
    broker.create_topic(&format!("{topic}.dlq"), 1);
    let dir = tempfile::Builder::new()
        .prefix(&format!("shapes-{topic}-"))
        .tempdir()
        .expect("temp dir");
    let sim = Sim::start(dir.path(), "sim", &["--latency-ms", "20"]);
    let mut cfg = WorkerConfig::new(&broker.bootstrap(), topic, &sim.url);
    cfg.extra = source_toml(shape);
    cfg.linger_ms = 50;
    cfg.batch_size = 20;
    cfg.max_in_flight = 2;
    let records: Vec<ShapedRecord> = Samples::new(shape, 400, 6, 5).take(6000).collect();
    let landed = produce(broker, topic, &records);

    let first = Worker::start(dir.path(), "first", &cfg);
    // Killed mid-stream, with requests in flight and changes of records pending.
    let deadline = Instant::now() + CONVERGE;
    while first
        .metric("segment_sync_braze_objects_delivered_total")
        .unwrap_or(0.0)
        < 300.0
    {
        assert!(
            Instant::now() < deadline,
            "the first worker delivered too little"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let mut first = first;
    first.proc.sigkill();
    let mut second = Worker::start(dir.path(), "second", &cfg);

    let ends: Vec<i64> = broker
        .end_offsets(topic)
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let committed: Vec<i64> = broker
            .committed_offsets(&cfg.group_id, topic)
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        if committed == ends {
            break;
        }
        assert!(
            second.proc.exited().is_none(),
            "the second worker exited\n{}",
            second.proc.report()
        );
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, end {ends:?}\n{}",
            second.proc.report()
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The last requests answered before the commit moved past them.
    let want = boolean_profiles(&landed, "");
    let got = strip_identifiers(sim.profiles());
    let d = diff(&want, &got);
    assert!(
        d.is_empty(),
        "{shape:?}: Braze differs from the log's last changes:\n{}",
        d.join("\n")
    );
    second.proc.sigterm();
}

#[test]
fn debezium_with_schema_wrapper_survives_a_kill_9() {
    killed_and_restarted(Shape::Debezium, "shapes-e2e-debezium");
}

#[test]
fn adobe_profiles_with_several_audiences_survive_a_kill_9() {
    killed_and_restarted(Shape::AdobeRtcdp, "shapes-e2e-adobe");
}
