//! An in-process world for integration tests: librdkafka's mock cluster as Kafka, the
//! simulator as Braze, and a runtime for the simulator and the worker's requests.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use segment_sync::tools::sim::{self, Faults, SimConfig, SimHandle};

use super::worker::API_KEY;

pub struct MockEnv {
    pub rt: tokio::runtime::Runtime,
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub sim: SimHandle,
}

/// `rate_limit` requests a second for the simulator (0: none).
pub fn mock_env(faults: Faults, rate_limit: u32) -> MockEnv {
    super::init_logs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = MockCluster::new(1).expect("mock cluster");
    let sim = rt
        .block_on(sim::start(
            SimConfig {
                api_key: API_KEY.into(),
                rate_limit,
                rate_window_secs: 1,
                faults,
            },
            "127.0.0.1:0".parse().expect("an address"),
        ))
        .expect("simulator");
    MockEnv { rt, cluster, sim }
}
