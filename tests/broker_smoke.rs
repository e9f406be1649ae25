//! The test broker itself: it starts, takes keyed records, serves a consumer group,
//! reports end and committed offsets, and is shared by the tests of one binary.

mod support;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;

use support::kafka::KafkaBroker;

const RECORDS: usize = 1000;

#[test]
fn keyed_records_are_consumed_and_committed_by_a_group() {
    let started = Instant::now();
    let broker = KafkaBroker::shared();
    eprintln!("shared broker available after {:.1?}", started.elapsed());
    let topic = "smoke-keyed";
    let group = "smoke-group";
    broker.create_topic(topic, 3);

    let producer: BaseProducer = broker
        .client_config()
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for i in 0..RECORDS {
        let key = format!("user-{}", i % 97);
        let payload = format!("change-{i}");
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        // A full local queue only means the producer is ahead of the broker: wait.
        while let Err((e, back)) = producer.send(record) {
            assert!(
                matches!(
                    e.rdkafka_error_code(),
                    Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                ),
                "send failed: {e}"
            );
            producer.poll(Duration::from_millis(10));
            record = back;
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let ends = broker.end_offsets(topic);
    assert_eq!(
        ends.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(ends.iter().map(|(_, o)| o).sum::<i64>(), RECORDS as i64);
    // 97 distinct keys over 3 partitions: every partition gets some.
    assert!(ends.iter().all(|(_, o)| *o > 0), "{ends:?}");
    assert_eq!(
        broker.committed_offsets(group, topic),
        vec![(0, -1), (1, -1), (2, -1)]
    );

    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < RECORDS {
        assert!(
            Instant::now() < deadline,
            "consumed only {} of {RECORDS}",
            seen.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("consume");
            let payload = std::str::from_utf8(message.payload().expect("payload")).expect("utf8");
            let key = std::str::from_utf8(message.key().expect("key")).expect("utf8");
            let i: usize = payload
                .trim_start_matches("change-")
                .parse()
                .expect("index");
            assert_eq!(key, format!("user-{}", i % 97));
            seen.insert(i);
        }
    }
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("commit");

    assert_eq!(broker.committed_offsets(group, topic), ends);
}

#[test]
fn the_broker_is_shared_by_the_tests_of_one_binary() {
    let first = KafkaBroker::shared();
    let again = KafkaBroker::shared();
    assert_eq!(first.bootstrap(), again.bootstrap());
    // However the tests interleave, this process launched a single broker.
    let prefix = format!("segment-sync-kafka-{}-", std::process::id());
    let launched = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count();
    assert_eq!(launched, 1);
    assert!(first.scratch_dir().join("server.properties").is_file());

    // A second topic on the same broker, independent of the other test's.
    let topic = "smoke-shared";
    first.create_topic(topic, 1);
    first.create_topic(topic, 1);
    assert_eq!(first.end_offsets(topic), vec![(0, 0)]);
    assert_eq!(first.committed_offsets("nobody", topic), vec![(0, -1)]);
}

#[test]
#[should_panic(expected = "cannot create topic not a topic! with 1 partitions: InvalidTopic")]
fn an_invalid_topic_fails_at_once_with_the_brokers_reason() {
    KafkaBroker::shared().create_topic("not a topic!", 1);
}
