//! Running the real pipeline in the test process: producing generated records, running the
//! worker until it has caught up, reading topics back.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use segment_sync::config::{Config, Format};
use segment_sync::event::Event;
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::pipeline::{self, RunOptions, RunSummary};
use segment_sync::tools::generate::{Generated, Generator, GeneratorConfig, Record};

use super::expected::Landed;

pub const API_KEY: &str = "test-key";

/// A configuration for tests: the given brokers and simulator, JSON, short linger.
pub fn test_config(brokers: &str, topic: &str, braze_url: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.topics = vec![topic.to_string()];
    cfg.kafka.dlq_topic = format!("{topic}.dlq");
    cfg.kafka.group_id = format!("{topic}.group");
    cfg.kafka.format = Format::Json;
    cfg.braze.endpoint = braze_url.to_string();
    cfg.braze.api_key = Some(API_KEY.to_string());
    cfg.window.linger_ms = 50;
    cfg.window.commit_interval_ms = 100;
    cfg.window.drain_timeout_ms = 10_000;
    cfg.server.listen = "127.0.0.1:0".into();
    cfg
}

pub fn payload(format: Format, record: &Record) -> Vec<u8> {
    match (format, record) {
        (_, Record::Undecodable(bytes)) => bytes.clone(),
        (Format::Json, Record::Valid(e) | Record::Invalid(e)) => {
            segment_sync::tools::encode::to_json(e)
        }
        (Format::Avro, Record::Valid(e) | Record::Invalid(e)) => {
            segment_sync::tools::encode::to_avro(e)
        }
        (Format::AvroConfluent, Record::Valid(e) | Record::Invalid(e)) => {
            segment_sync::tools::encode::to_confluent(1, e)
        }
    }
}

/// A record's payload and the event the worker should read from it (`None`: not a valid event).
pub type Payload<'a> = dyn Fn(&Generated) -> (Vec<u8>, Option<Event<'static>>) + 'a;

/// Produces the records in order (keyed by user) in `format` and returns where each landed.
pub fn produce(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    format: Format,
    records: &[Generated],
) -> Vec<Landed> {
    produce_with(rt, brokers, topic, records, &|g: &Generated| {
        let event = match &g.record {
            Record::Valid(e) => Some(e.clone()),
            _ => None,
        };
        (payload(format, &g.record), event)
    })
}

/// Produces the records keyed by user, in order, and returns where each landed with the
/// event it carries as the worker should read it (`payload` gives both).
pub fn produce_with(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    records: &[Generated],
    payload: &Payload<'_>,
) -> Vec<Landed> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        // One in flight per partition keeps a user's records in the order they were made.
        .set("enable.idempotence", "true")
        .create()
        .expect("test producer");
    let encoded: Vec<_> = records.iter().map(payload).collect();
    rt.block_on(async {
        let sends = records.iter().zip(&encoded).map(|(g, (bytes, _))| {
            let producer = &producer;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&g.key).payload(bytes),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("produce")
            }
        });
        let delivered = futures::future::join_all(sends).await;
        encoded
            .into_iter()
            .zip(delivered)
            .map(|((_, event), d)| Landed {
                event,
                partition: d.partition,
                offset: d.offset,
            })
            .collect()
    })
}

/// `n` clean changes of `users` users over 3 segments, in order. One stream from one
/// generator carries later sequences in later records: split it into waves rather than
/// generating a wave afresh, whose sequences would start over (older).
pub fn clean_records(n: usize, seed: u64, users: usize) -> Vec<Generated> {
    Generator::new(GeneratorConfig {
        users,
        segments: 3,
        repeat_rate: 0.0,
        out_of_order_rate: 0.0,
        bad_rate: 0.0,
        email_only_rate: 0.0,
        seed,
    })
    .take(n)
    .collect()
}

/// Runs the worker on this thread until it has caught up with the log.
pub fn run_until_caught_up(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
) -> (RunSummary, Arc<Metrics>, Arc<Health>) {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let opts = RunOptions::until_caught_up();
    let summary = pipeline::run(
        cfg,
        opts,
        metrics.clone(),
        health.clone(),
        rt.handle().clone(),
    )
    .expect("worker run");
    (summary, metrics, health)
}

/// Every record of a topic, by partition then offset.
pub fn read_all(brokers: &str, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("reader");
    let mut out = Vec::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
        consumer.assign(&tpl).expect("assign");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut next = low;
        while next < high && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                next = m.offset() + 1;
                out.push(m.detach());
            }
        }
    }
    out
}

/// The group's committed offset per partition (−1 when none).
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("offset reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| match c.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

/// High watermarks per partition.
pub fn end_offsets(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("watermark reader");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    // Not rdkafka's `Headers::iter`: it panics on a key that is not UTF-8.
    use segment_sync::kafka::RecordHeaders;
    m.record_headers()
        .into_iter()
        .rev()
        .find(|(k, _)| *k == name.as_bytes())
        .and_then(|(_, v)| v)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Where a dead-letter record came from: its Connect headers' partition and offset.
pub fn dlq_origin(m: &OwnedMessage) -> (i32, i64) {
    let number = |name: &str| {
        header(m, name)
            .unwrap_or_else(|| panic!("dead-letter record without {name}"))
            .parse::<i64>()
            .unwrap_or_else(|e| panic!("{name} is not a number: {e}"))
    };
    (
        number("__connect.errors.partition") as i32,
        number("__connect.errors.offset"),
    )
}
