//! What every Kafka client of the worker shares: librdkafka settings, the consumer context
//! that hands rebalances to whoever owns the partitions, and the cached watermark read.
//!
//! This module knows nothing of the pipeline: the context talks to a [`RebalanceHandler`],
//! so the pipeline depends on it and not the other way round.

use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, TopicPartitionList};

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
        .set("fetch.queue.backoff.ms", "10");
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
