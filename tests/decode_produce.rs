//! `produce` against librdkafka's mock cluster: every generated record arrives, keyed by
//! its user, and decodes back to what was generated.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use segment_sync::config::{Config, Format};
use segment_sync::decode::Decoder;
use segment_sync::tools::generate::{Generator, Record};
use segment_sync::tools::produce::{self, ProduceArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_records_arrive_keyed_and_decodable() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("changes", 3, 1).expect("topic");
    let mut cfg = Config::default();
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.kafka.topics = vec!["changes".into()];
    cfg.kafka.format = Format::Json;
    let args = ProduceArgs {
        count: 5000,
        users: 200,
        segments: 5,
        repeat_rate: 0.05,
        out_of_order_rate: 0.02,
        bad_rate: 0.02,
        email_only_rate: 0.1,
        seed: 3,
        topic: None,
        shape: None,
    };
    let summary = produce::run(&cfg, &args).await.expect("produce");
    assert_eq!(summary.records, 5000);
    assert_eq!(summary.valid + summary.undecodable + summary.invalid, 5000);
    assert!(summary.undecodable > 0 && summary.invalid > 0, "{summary}");

    let expected: HashMap<Vec<u8>, Vec<Record>> = Generator::new(produce::generator_config(&args))
        .take(args.count)
        .fold(HashMap::new(), |mut m, g| {
            m.entry(g.key).or_default().push(g.record);
            m
        });

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "check")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset("changes", p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut decoder = Decoder::new(Format::Json, None).expect("decoder");
    let mut got: HashMap<Vec<u8>, Vec<Record>> = HashMap::new();
    let mut partition_of: HashMap<Vec<u8>, i32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while n < 5000 && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.expect("message");
        let key = m.key().expect("keyed").to_vec();
        let payload = m.payload().unwrap_or_default();
        let record = match decoder.decode(payload) {
            Ok(e) if e.validate().is_ok() => Record::Valid(e.into_owned()),
            Ok(e) => Record::Invalid(e.into_owned()),
            Err(_) => Record::Undecodable(payload.to_vec()),
        };
        assert_eq!(
            *partition_of.entry(key.clone()).or_insert(m.partition()),
            m.partition()
        );
        got.entry(key).or_default().push(record);
        n += 1;
    }
    assert_eq!(n, 5000);
    // Per key, records keep their order: they share a partition.
    assert_eq!(got, expected);
}
