//! What every Kafka client of the worker shares: librdkafka settings, the consumer context
//! that hands rebalances to whoever owns the partitions, and the cached watermark read.
//!
//! This module knows nothing of the pipeline: the context talks to a [`RebalanceHandler`],
//! so the pipeline depends on it and not the other way round.

use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Message, OwnedHeaders, OwnedMessage};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, TopicPartitionList};
use rdkafka_sys as rdsys;

use crate::config::Config;

/// Settings every client of the worker shares: brokers, then the user's properties (TLS, SASL).
pub fn client_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// The group consumer. Offsets are committed only by the pipeline, explicitly, from the
/// settled watermark: librdkafka's automatic commit and offset store would commit what was
/// merely read.
pub fn consumer_config(cfg: &Config, group_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Cooperative: a rebalance revokes only the partitions that move, so the others keep
        // flowing while the moved ones drain.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "false")
        // librdkafka waits a full second (its default) before fetching again once its local
        // queue is full; the worker drains that queue fast, so that pause would idle it.
        .set("fetch.queue.backoff.ms", "10")
        // librdkafka prefetches up to 64 MB by default, the largest part of the worker's
        // memory while it catches up with a backlog (issue 13: ≤ 150 MB); 16 MB is still
        // about 50,000 events, a fraction of a second of work ahead.
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// A client that only asks for metadata and watermarks, never fetching: its requests get
/// connections of their own. Read committed, as the group consumer reads, so the high
/// watermark it answers is the last stable offset.
pub fn probe_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// The dead-letter producer.
pub fn dead_letter_producer_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    // The dead-letter topic is the last copy of a record the worker gives up on: wait for
    // every in-sync replica. A write that cannot be delivered is reported after 60 s rather
    // than librdkafka's 5 minutes, so a missing or refusing topic shows in readiness soon;
    // the pipeline writes it again, so nothing is given up.
    c.set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// What the owner of the consumed partitions does when they come and go. librdkafka calls
/// these inside `poll`, on the polling thread.
pub trait RebalanceHandler: Send {
    /// Partitions are about to be assigned: a replay may set where each starts in `tpl`.
    fn assigning(&mut self, consumer: &GroupConsumer, tpl: &mut TopicPartitionList);
    /// Partitions were assigned.
    fn assigned(&mut self, consumer: &GroupConsumer, tpl: &TopicPartitionList);
    /// Partitions are about to be revoked: settle and commit what can be before letting go.
    fn revoking(&mut self, consumer: &GroupConsumer, tpl: &TopicPartitionList);
}

/// The consumer context: routes rebalance callbacks to the handler. The poll loop never
/// holds the handler's lock while it polls, so the callbacks can take it.
pub struct Rebalancing {
    handler: Arc<Mutex<dyn RebalanceHandler>>,
}

impl Rebalancing {
    pub fn new(handler: Arc<Mutex<dyn RebalanceHandler>>) -> Rebalancing {
        Rebalancing { handler }
    }

    fn with<R>(&self, f: impl FnOnce(&mut dyn RebalanceHandler) -> R) -> R {
        let mut h = self.handler.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut *h)
    }
}

pub type GroupConsumer = BaseConsumer<Rebalancing>;

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    /// librdkafka's default sequence (pre, assign or unassign, post), with one addition: a
    /// replay's start offsets are written into an assignment before it takes effect, so the
    /// first fetch already starts there.
    fn rebalance(
        &self,
        consumer: &GroupConsumer,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            self.with(|h| h.assigning(consumer, tpl));
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => {
                let code: RDKafkaErrorCode = other.into();
                Rebalance::Error(KafkaError::Rebalance(code))
            }
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match (assign, cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &GroupConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.with(|h| h.revoking(consumer, tpl)),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, consumer: &GroupConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.with(|h| h.assigned(consumer, tpl));
        }
    }
}

/// The high watermark librdkafka last saw for a partition, from its cache (no request):
/// cheap enough for the lag gauge at every commit. `None` before the first fetch answered.
pub fn cached_high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives, the topic is a valid C
    // string for the call, and librdkafka only writes the two integers.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_client().ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// A record's headers as bytes, in order, each with its value if it has one.
///
/// rdkafka 0.38's `Headers::get`/`iter` unwrap `CStr::to_str` on the key and panic on a key
/// that is not UTF-8, which any producer may write: the worker would crash-loop on that
/// record. This reads librdkafka's headers directly instead. A key is as librdkafka hands
/// it out, NUL-terminated: one holding a NUL byte is cut there (librdkafka's API returns no
/// key length), every other key is byte-exact.
pub fn read_headers(headers: &BorrowedHeaders) -> Vec<(&[u8], Option<&[u8]>)> {
    // rdkafka's own `as_native_ptr` is this cast: a `&BorrowedHeaders` is the address of
    // librdkafka's headers.
    let native = headers as *const BorrowedHeaders as *const rdsys::rd_kafka_headers_t;
    let mut out = Vec::new();
    for idx in 0.. {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `native` is live for `headers`' lifetime, and so is every pointer
        // librdkafka returns into it; an index past the end returns an error and nothing.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size)
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: as above; librdkafka NUL-terminates every key it stores.
        let key = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            // SAFETY: `size` bytes at `value`, owned by the headers.
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        out.push((key, value));
    }
    out
}

/// A consumed record's headers, read with [`read_headers`], whichever way it is held.
pub trait RecordHeaders {
    fn record_headers(&self) -> Vec<(&[u8], Option<&[u8]>)>;
}

impl RecordHeaders for BorrowedMessage<'_> {
    fn record_headers(&self) -> Vec<(&[u8], Option<&[u8]>)> {
        self.headers().map(read_headers).unwrap_or_default()
    }
}

impl RecordHeaders for OwnedMessage {
    fn record_headers(&self) -> Vec<(&[u8], Option<&[u8]>)> {
        self.headers()
            .map(|h| read_headers(h.as_borrowed()))
            .unwrap_or_default()
    }
}

/// Headers to produce, keys taken as bytes: `OwnedHeaders::insert` only takes a `&str` key,
/// and a dead-letter copy must keep a key that is not UTF-8 as it was.
pub fn owned_headers<'a>(
    headers: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len());
    let native = owned.as_borrowed() as *const BorrowedHeaders as *mut rdsys::rd_kafka_headers_t;
    for (key, value) in headers {
        let (v, len) = match value {
            Some(v) => (v.as_ptr().cast::<std::ffi::c_void>(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is `owned`'s writable headers (rdkafka's `insert` writes through the
        // same pointer); librdkafka copies key and value. It fails only on read-only headers.
        unsafe {
            rdsys::rd_kafka_header_add(native, key.as_ptr().cast(), key.len() as isize, v, len);
        }
    }
    owned
}

/// `start::decide`'s timestamp lookup, answered by the broker (ListOffsets).
pub struct TimeLookup<'c, C: ConsumerContext>(pub &'c BaseConsumer<C>);

impl<C: ConsumerContext> crate::start::OffsetLookup for TimeLookup<'_, C> {
    type Error = KafkaError;

    fn offset_for_time(
        &self,
        topic: &str,
        partition: i32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, KafkaError> {
        let mut q = TopicPartitionList::new();
        q.add_partition_offset(topic, partition, rdkafka::Offset::Offset(timestamp_ms))?;
        let found = self
            .0
            .offsets_for_times(q, std::time::Duration::from_secs(10))?;
        // librdkafka answers the end (-1) when no record is at or after the time.
        Ok(
            match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => Some(o),
                _ => None,
            },
        )
    }
}
