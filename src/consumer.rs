//! The Kafka side of the pipeline: consumer settings, and the rebalance callbacks that hand
//! assignments and revocations to the pipeline's core.

use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, TopicPartitionList};

use crate::config::Config;
use crate::pipeline::Core;

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

/// Routes rebalance callbacks, which librdkafka runs inside `poll`, to the pipeline core.
/// The poll loop never holds the core's lock while it polls, so the callbacks can take it.
pub struct RebalanceContext {
    pub core: Arc<Mutex<Core>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    /// librdkafka's default sequence (pre, assign or unassign, post), with one addition: a
    /// replay's start offsets are written into a first assignment before it takes effect,
    /// so the first fetch already starts there.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.core
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .start_offsets(consumer, tpl);
                Rebalance::Assign(tpl)
            }
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
        let result = match (err, cooperative) {
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, true) => {
                consumer.incremental_assign(tpl)
            }
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, false) => consumer.assign(tpl),
            (_, true) => consumer.incremental_unassign(tpl),
            (_, false) => consumer.unassign(),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        match rebalance {
            Rebalance::Revoke(tpl) => core.on_revoke(consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            core.on_assign(consumer, tpl);
        }
    }
}

pub type GroupConsumer = BaseConsumer<RebalanceContext>;

/// The high watermark librdkafka last saw for a partition, from its cache (no request):
/// cheap enough for the lag gauge at every commit. `None` before the first fetch answered.
pub fn cached_high_watermark(consumer: &GroupConsumer, topic: &str, partition: i32) -> Option<i64> {
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
