//! The Kafka side of `verify`: reads the topics between offsets by assignment (no group is
//! joined, nothing is committed), asks where the live group has committed, and looks for
//! records in the dead-letter topic by their Connect headers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, Format};
use crate::decode::{RegistryClient, SchemaSource};
use crate::dlq::{HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC};
use crate::event::{Event, Identity, Rules};
use crate::kafka::TimeLookup;
use crate::mapping::Mapping;
use crate::offsets::TopicPartition;
use crate::source::Source;
use crate::start::{decide, StartAt, StartDecision};

use super::state::Coord;
use super::VerifyError;

const TIMEOUT: Duration = Duration::from_secs(10);
/// A record the registry cannot decode yet is tried again this often, until stopped.
const REGISTRY_RETRY: Duration = Duration::from_secs(1);

/// An offset per partition.
pub type Offsets = HashMap<TopicPartition, i64>;

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> VerifyError {
    move |error| VerifyError::Kafka { context, error }
}

/// What one read did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub records: u64,
    /// Undecodable or invalid: the worker dead-letters them, they change nothing in Braze.
    pub skipped: u64,
}

pub struct Log {
    reader: BaseConsumer,
    /// Carries the live group's id to ask for its committed offsets; never subscribes.
    live: BaseConsumer,
    source: Source,
    rules: Rules,
    topics: Vec<String>,
    dlq_topic: String,
}

impl Log {
    pub fn new(cfg: &Config) -> Result<Log, VerifyError> {
        let mut reader = ClientConfig::new();
        // librdkafka prefetches up to 64 MB by default, and a fetch answer may carry 1 MB a
        // partition: smaller buffers keep the check's memory small on a topic of many
        // partitions, for a little throughput. `kafka.properties` may say otherwise.
        reader
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.max.bytes", "8388608");
        for (k, v) in crate::kafka::client_config(cfg).config_map().iter() {
            reader.set(k, v);
        }
        // Assigned, never subscribed: the id only satisfies librdkafka.
        reader
            .set("group.id", format!("{}.verify", cfg.kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        let mut live = crate::kafka::client_config(cfg);
        live.set("group.id", &cfg.kafka.group_id)
            .set("enable.auto.commit", "false");
        let registry: Option<Arc<dyn SchemaSource>> = match cfg.kafka.format {
            Format::AvroConfluent => Some(Arc::new(RegistryClient::new(
                &cfg.kafka.schema_registry_url,
            ))),
            _ => None,
        };
        Ok(Log {
            reader: reader.create().map_err(kafka("creating the reader"))?,
            live: live
                .create()
                .map_err(kafka("creating the committed-offset reader"))?,
            source: Source::from_config(cfg, registry)?,
            rules: Mapping::from_config(cfg).rules_for(cfg.window.max_future_ms),
            topics: cfg.kafka.topics.clone(),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
        })
    }

    fn partitions_of(&self, topic: &str) -> Result<Vec<TopicPartition>, VerifyError> {
        let md = self
            .reader
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(kafka("reading the topics' partitions"))?;
        let mut out = Vec::new();
        for t in md.topics() {
            if let Some(e) = t.error() {
                return Err(VerifyError::Topic {
                    topic: t.name().to_string(),
                    message: format!("{e:?}"),
                });
            }
            out.extend(
                t.partitions()
                    .iter()
                    .map(|p| TopicPartition::new(t.name(), p.id())),
            );
        }
        Ok(out)
    }

    /// Every partition of the configured topics.
    pub fn partitions(&self) -> Result<Vec<TopicPartition>, VerifyError> {
        let mut all = Vec::new();
        for topic in &self.topics {
            all.extend(self.partitions_of(topic)?);
        }
        all.sort();
        Ok(all)
    }

    /// (log start, end) of each partition; the end is the last stable offset under
    /// librdkafka's default `read_committed`.
    pub fn watermarks(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, (i64, i64)>, VerifyError> {
        partitions
            .iter()
            .map(|tp| {
                let w = self
                    .reader
                    .fetch_watermarks(&tp.topic, tp.partition, TIMEOUT)
                    .map_err(kafka("reading the end offsets"))?;
                Ok((tp.clone(), w))
            })
            .collect()
    }

    /// The end of each partition now.
    pub fn ends(&self, partitions: &[TopicPartition]) -> Result<Offsets, VerifyError> {
        Ok(self
            .watermarks(partitions)?
            .into_iter()
            .map(|(tp, (_, high))| (tp, high))
            .collect())
    }

    /// Where `--from` starts each partition.
    pub fn starts(
        &self,
        start: &StartAt,
        marks: &HashMap<TopicPartition, (i64, i64)>,
    ) -> Result<Offsets, VerifyError> {
        let lookup = TimeLookup(&self.reader);
        marks
            .iter()
            .map(|(tp, (low, high))| {
                let offset = match decide(start, &tp.topic, tp.partition, &lookup)
                    .map_err(kafka("finding the offsets for --from"))?
                {
                    StartDecision::At(o) => o.max(*low),
                    StartDecision::End => *high,
                    StartDecision::Beginning | StartDecision::Committed => *low,
                };
                Ok((tp.clone(), offset))
            })
            .collect()
    }

    /// Reads every partition from `from` up to (not including) `to`, handing each valid
    /// event to `take`. Records at or past `to` are left for a later read.
    pub fn read(
        &mut self,
        from: &Offsets,
        to: &Offsets,
        stop: &AtomicBool,
        mut take: impl FnMut(&Event<'_>, Identity<'_>, &Coord),
    ) -> Result<Read, VerifyError> {
        // (topic, partition, end): a handful of partitions, scanned without building a key.
        let mut pending: Vec<(Arc<str>, i32, i64)> = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for (tp, start) in from {
            let end = to.get(tp).copied().unwrap_or(*start);
            if *start < end {
                tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*start))
                    .map_err(kafka("assigning the partitions"))?;
                pending.push((tp.topic.clone(), tp.partition, end));
            }
        }
        let mut read = Read::default();
        if pending.is_empty() {
            return Ok(read);
        }
        self.reader
            .assign(&tpl)
            .map_err(kafka("assigning the partitions"))?;
        let now = epoch_ms();
        let mut last_check = Instant::now();
        let Log {
            reader,
            source,
            rules,
            ..
        } = self;
        while !pending.is_empty() {
            if stop.load(Ordering::Relaxed) {
                let _ = reader.unassign();
                return Err(VerifyError::Stopped);
            }
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let Some(i) = pending
                        .iter()
                        .position(|(t, p, _)| *p == m.partition() && &**t == m.topic())
                    else {
                        continue;
                    };
                    let end = pending[i].2;
                    if m.offset() < end {
                        let at = Coord {
                            topic: pending[i].0.clone(),
                            partition: m.partition(),
                            offset: m.offset(),
                        };
                        read.records += 1;
                        if !apply(source, rules, m.payload(), now, &at, stop, &mut take)? {
                            read.skipped += 1;
                        }
                    }
                    if m.offset() + 1 >= end {
                        pending.swap_remove(i);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "reading the log"),
                None => {}
            }
            // Transaction markers and compaction leave offsets no record has: the
            // consumer's position says a partition is read through its end.
            if last_check.elapsed() >= Duration::from_millis(500) {
                last_check = Instant::now();
                if let Ok(position) = reader.position() {
                    pending.retain(|(t, p, end)| {
                        !matches!(
                            position.find_partition(t, *p).map(|e| e.offset()),
                            Some(Offset::Offset(o)) if o >= *end
                        )
                    });
                }
            }
        }
        let _ = reader.unassign();
        Ok(read)
    }

    /// The live group's committed offset per partition (-1: none).
    pub fn committed(&self, partitions: &[TopicPartition]) -> Result<Offsets, VerifyError> {
        let mut tpl = TopicPartitionList::new();
        for tp in partitions {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let answer = self
            .live
            .committed_offsets(tpl, TIMEOUT)
            .map_err(kafka("reading the live group's committed offsets"))?;
        Ok(partitions
            .iter()
            .map(|tp| {
                let o = match answer
                    .find_partition(&tp.topic, tp.partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                };
                (tp.clone(), o)
            })
            .collect())
    }

    /// Which of `wanted` have a copy in the dead-letter topic, found by the Connect headers
    /// that name the original record. Reads the topic to its end now.
    pub fn dead_lettered(
        &mut self,
        wanted: &HashSet<Coord>,
        stop: &AtomicBool,
    ) -> Result<HashSet<Coord>, VerifyError> {
        let mut found = HashSet::new();
        if wanted.is_empty() {
            return Ok(found);
        }
        let partitions = match self.partitions_of(&self.dlq_topic.clone()) {
            Ok(p) => p,
            Err(VerifyError::Topic { topic, message }) => {
                tracing::warn!(%topic, %message, "no dead-letter topic to look in");
                return Ok(found);
            }
            Err(e) => return Err(e),
        };
        let marks = self.watermarks(&partitions)?;
        let from: Offsets = marks
            .iter()
            .map(|(tp, (low, _))| (tp.clone(), *low))
            .collect();
        let to: Offsets = marks
            .iter()
            .map(|(tp, (_, high))| (tp.clone(), *high))
            .collect();
        let mut tpl = TopicPartitionList::new();
        let mut pending: Vec<(i32, i64)> = Vec::new();
        for (tp, start) in &from {
            if *start < to[tp] {
                tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*start))
                    .map_err(kafka("assigning the dead-letter topic"))?;
                pending.push((tp.partition, to[tp]));
            }
        }
        if pending.is_empty() {
            return Ok(found);
        }
        self.reader
            .assign(&tpl)
            .map_err(kafka("assigning the dead-letter topic"))?;
        let mut last_check = Instant::now();
        while !pending.is_empty() {
            if stop.load(Ordering::Relaxed) {
                let _ = self.reader.unassign();
                return Err(VerifyError::Stopped);
            }
            match self.reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if let Some(origin) = origin(&m) {
                        if wanted.contains(&origin) {
                            found.insert(origin);
                        }
                    }
                    if let Some(i) = pending.iter().position(|(p, _)| *p == m.partition()) {
                        if m.offset() + 1 >= pending[i].1 {
                            pending.swap_remove(i);
                        }
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "reading the dead-letter topic"),
                None => {}
            }
            if last_check.elapsed() >= Duration::from_millis(500) {
                last_check = Instant::now();
                if let Ok(position) = self.reader.position() {
                    let topic = &self.dlq_topic;
                    pending.retain(|(p, end)| {
                        !matches!(
                            position.find_partition(topic, *p).map(|e| e.offset()),
                            Some(Offset::Offset(o)) if o >= *end
                        )
                    });
                }
            }
        }
        let _ = self.reader.unassign();
        Ok(found)
    }
}

/// Reads and validates one payload as the worker would (through the configured shape) and
/// hands its valid changes over; false when the worker would dead-letter it (a record with
/// several changes goes whole). A payload the registry cannot decode yet is tried again, as
/// the worker holds it.
fn apply(
    source: &mut Source,
    rules: &Rules,
    payload: Option<&[u8]>,
    now_epoch_ms: i64,
    at: &Coord,
    stop: &AtomicBool,
    take: &mut impl FnMut(&Event<'_>, Identity<'_>, &Coord),
) -> Result<bool, VerifyError> {
    let read = loop {
        match source.read(payload) {
            Ok(r) => break r,
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "the schema registry cannot decode a record yet; trying again");
                if stop.load(Ordering::Relaxed) {
                    return Err(VerifyError::Stopped);
                }
                std::thread::sleep(REGISTRY_RETRY);
            }
            Err(_) => return Ok(false),
        }
    };
    let events = read.into_events();
    if events
        .iter()
        .any(|e| e.validate_with(rules, now_epoch_ms).is_err())
    {
        return Ok(false);
    }
    for event in &events {
        if let Ok(identity) = event.validate_with(rules, now_epoch_ms) {
            take(event, identity, at);
        }
    }
    Ok(true)
}

/// The original record a dead-letter record names (its newest Connect headers).
fn origin<M: Message>(m: &M) -> Option<Coord> {
    let headers = m.headers()?;
    let last = |name: &str| -> Option<String> {
        headers
            .iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    Some(Coord {
        topic: Arc::from(last(HEADER_TOPIC)?.as_str()),
        partition: last(HEADER_PARTITION)?.trim().parse().ok()?,
        offset: last(HEADER_OFFSET)?.trim().parse().ok()?,
    })
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
