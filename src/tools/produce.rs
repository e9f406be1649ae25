//! `segment-sync produce`: writes generated CDP changes to the topic, in the configured
//! format, keyed by the user's identifier, and waits until Kafka has acknowledged them all.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::config::{Config, Format, Shape};
use crate::decode::{RegistryClient, SCHEMA};
use crate::tools::encode;
use crate::tools::generate::{Generator, GeneratorConfig, Record};
use crate::tools::shapes::Samples;

/// Deliveries awaited at once: enough to keep librdkafka's batches full.
const MAX_IN_FLIGHT: usize = 50_000;

#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ProduceArgs {
    /// How many records to write.
    #[arg(long)]
    pub count: usize,
    /// Distinct users the changes are spread over.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Distinct segments.
    #[arg(long, default_value_t = 20)]
    pub segments: usize,
    /// Share of records that repeat an earlier one exactly.
    #[arg(long, default_value_t = 0.05)]
    pub repeat_rate: f64,
    /// Share of changes delivered after a newer change of the same user and segment.
    #[arg(long, default_value_t = 0.02)]
    pub out_of_order_rate: f64,
    /// Share of undecodable or invalid records (they go to the dead-letter topic).
    #[arg(long, default_value_t = 0.0)]
    pub bad_rate: f64,
    /// Share of users known by email only.
    #[arg(long, default_value_t = 0.1)]
    pub email_only_rate: f64,
    /// Same seed, same records.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Defaults to the configuration's first topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// The shape of the records (default: the configuration's `source.shape`). The CDP
    /// shapes write sample records as each vendor documents them, several changes to a
    /// record where the shape allows, with redeliveries and what the CDP writes beside
    /// audience changes; the rates above are for `change`.
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
}

pub fn generator_config(args: &ProduceArgs) -> GeneratorConfig {
    GeneratorConfig {
        users: args.users,
        segments: args.segments,
        repeat_rate: args.repeat_rate,
        out_of_order_rate: args.out_of_order_rate,
        bad_rate: args.bad_rate,
        email_only_rate: args.email_only_rate,
        seed: args.seed,
    }
}

/// What was written, by kind of record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProduceSummary {
    pub records: usize,
    pub valid: usize,
    pub undecodable: usize,
    pub invalid: usize,
}

impl fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "produced {} records: {} valid, {} undecodable, {} invalid",
            self.records, self.valid, self.undecodable, self.invalid
        )
    }
}

/// The record's payload in `format`; undecodable records are their bytes in every format.
/// `schema_id` is needed for `avro-confluent` only (0 is written without one).
pub fn encode_record(format: Format, schema_id: Option<u32>, r: &Record) -> Vec<u8> {
    let event = match r {
        Record::Valid(e) | Record::Invalid(e) => e,
        Record::Undecodable(bytes) => return bytes.clone(),
    };
    match format {
        Format::Json => encode::to_json(event),
        Format::Avro => encode::to_avro(event),
        Format::AvroConfluent => encode::to_confluent(schema_id.unwrap_or(0), event),
    }
}

fn producer(cfg: &Config) -> anyhow::Result<FutureProducer> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000");
    // The operator's properties (TLS, SASL, tuning) win over the defaults above.
    for (k, v) in &cfg.kafka.properties {
        client.set(k, v);
    }
    client.create().context("creating the Kafka producer")
}

fn settled(
    delivery: Option<<DeliveryFuture as std::future::Future>::Output>,
) -> anyhow::Result<()> {
    match delivery {
        None | Some(Ok(Ok(_))) => Ok(()),
        Some(Ok(Err((e, _)))) => Err(e).context("Kafka refused a record"),
        Some(Err(_)) => anyhow::bail!("the producer went away before a delivery report"),
    }
}

/// Records on their way to Kafka: at most `MAX_IN_FLIGHT` unacknowledged, and a full
/// librdkafka queue waited out rather than treated as an error.
struct Sends {
    producer: FutureProducer,
    in_flight: FuturesUnordered<DeliveryFuture>,
}

impl Sends {
    fn new(producer: FutureProducer) -> Sends {
        Sends {
            producer,
            in_flight: FuturesUnordered::new(),
        }
    }

    async fn send(&mut self, topic: &str, key: &[u8], value: Option<&[u8]>) -> anyhow::Result<()> {
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push(delivery);
                    break;
                }
                // librdkafka's queue is full: let deliveries drain, then try again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if self.in_flight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        settled(self.in_flight.next().await)?;
                    }
                }
                Err((e, _)) => return Err(e).context("producing a record"),
            }
        }
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            settled(self.in_flight.next().await)?;
        }
        Ok(())
    }

    /// Returns once Kafka acknowledged every record sent.
    async fn finish(mut self) -> anyhow::Result<()> {
        while let Some(delivery) = self.in_flight.next().await {
            settled(Some(delivery))?;
        }
        Ok(())
    }
}

/// Writes `args.count` generated records and returns once Kafka acknowledged every one.
pub async fn run(cfg: &Config, args: &ProduceArgs) -> anyhow::Result<ProduceSummary> {
    let topic = args
        .topic
        .clone()
        .or_else(|| cfg.kafka.topics.first().cloned())
        .context("no topic: pass --topic or set kafka.topics")?;
    let shape = args.shape.unwrap_or(cfg.source.shape);
    if shape != Shape::Change {
        return run_shape(cfg, args, shape, &topic).await;
    }
    let format = cfg.kafka.format;
    let schema_id = match format {
        Format::AvroConfluent => {
            let registry = RegistryClient::from_config(&cfg.kafka)?;
            let subject = format!("{topic}-value");
            // The registry client blocks, which an async task must not.
            let id = tokio::task::spawn_blocking(move || registry.register(&subject, SCHEMA))
                .await
                .context("registering the schema")?
                .with_context(|| {
                    format!(
                        "registering the schema under {topic}-value at {}",
                        crate::decode::redact_url(&cfg.kafka.schema_registry_url)
                    )
                })?;
            Some(id)
        }
        Format::Avro | Format::Json => None,
    };

    let mut sends = Sends::new(producer(cfg)?);
    let mut summary = ProduceSummary::default();
    for g in Generator::new(generator_config(args)).take(args.count) {
        match &g.record {
            Record::Valid(_) => summary.valid += 1,
            Record::Undecodable(_) => summary.undecodable += 1,
            Record::Invalid(_) => summary.invalid += 1,
        }
        summary.records += 1;
        let payload = encode_record(format, schema_id, &g.record);
        sends.send(&topic, &g.key, Some(&payload)).await?;
    }
    sends.finish().await?;
    Ok(summary)
}

/// `produce --shape` for a CDP shape: sample records as the vendor writes them, in JSON.
async fn run_shape(
    cfg: &Config,
    args: &ProduceArgs,
    shape: Shape,
    topic: &str,
) -> anyhow::Result<ProduceSummary> {
    let mut sends = Sends::new(producer(cfg)?);
    let mut summary = ProduceSummary::default();
    for r in Samples::new(shape, args.users, args.segments, args.seed).take(args.count) {
        summary.records += 1;
        if !r.changes.is_empty() {
            summary.valid += 1;
        }
        sends.send(topic, &r.key, r.value.as_deref()).await?;
    }
    sends.finish().await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, MemoryRegistry};
    use clap::Parser;
    use std::sync::Arc;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProduceArgs,
    }

    #[test]
    fn flags_and_defaults_become_the_generator_config() {
        let cli =
            Cli::try_parse_from(["produce", "--count", "10", "--bad-rate", "0.5"]).expect("parses");
        assert_eq!(cli.args.count, 10);
        assert_eq!(cli.args.topic, None);
        let g = generator_config(&cli.args);
        assert_eq!(
            g,
            GeneratorConfig {
                bad_rate: 0.5,
                ..GeneratorConfig::default()
            }
        );
    }

    #[test]
    fn encoded_records_decode_back_or_fail_as_their_kind_says() {
        let registry = Arc::new(MemoryRegistry::new());
        let id = registry.register(SCHEMA);
        let gen = GeneratorConfig {
            bad_rate: 0.2,
            ..GeneratorConfig::default()
        };
        let records: Vec<_> = Generator::new(gen).take(2000).collect();
        for format in [Format::Json, Format::Avro, Format::AvroConfluent] {
            let mut d = Decoder::new(format, Some(registry.clone())).expect("decoder");
            for g in &records {
                let payload = encode_record(format, Some(id), &g.record);
                match (&g.record, d.decode(&payload)) {
                    (Record::Valid(e), Ok(got)) => assert_eq!(&got, e),
                    (Record::Invalid(e), Ok(got)) => {
                        assert_eq!(&got, e);
                        assert!(got.validate().is_err());
                    }
                    (Record::Undecodable(_), Err(err)) => assert!(!err.is_retryable()),
                    (r, got) => panic!("{format:?}: {r:?} gave {got:?}"),
                }
            }
        }
    }
}
