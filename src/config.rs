//! The worker's configuration: the TOML file of DESIGN.md, `SEGMENT_SYNC_<SECTION>_<KEY>`
//! environment overrides, `BRAZE_API_KEY`, and validation that names the key and the fix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub braze: BrazeConfig,
    pub mapping: MappingConfig,
    pub window: WindowConfig,
    pub server: ServerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    AvroConfluent,
    Avro,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub dlq_topic: String,
    pub format: Format,
    pub schema_registry_url: String,
    /// Passed to librdkafka as they are (TLS, SASL, ...), for the consumer and the producer.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "segment-sync".into(),
            topics: vec!["cdp.segment-membership".into()],
            dlq_topic: "cdp.segment-membership.dlq".into(),
            format: Format::AvroConfluent,
            schema_registry_url: "http://127.0.0.1:8081".into(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrazeConfig {
    /// A URL (`https://rest.iad-03.braze.com`) or a bare host (`rest.iad-03.braze.com`).
    pub endpoint: String,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub requests_per_second: u32,
    pub timeout_ms: u64,
    pub update_existing_only: bool,
    /// A file holding the API key (a mounted Kubernetes secret); `BRAZE_API_KEY` wins over it.
    pub api_key_file: Option<String>,
    /// Filled from `BRAZE_API_KEY` or `api_key_file`; never read from the TOML, never printed.
    #[serde(skip)]
    pub api_key: Option<String>,
}

impl Default for BrazeConfig {
    fn default() -> Self {
        BrazeConfig {
            endpoint: "https://rest.iad-03.braze.com".into(),
            batch_size: 75,
            max_in_flight: 8,
            requests_per_second: 1000,
            timeout_ms: 10_000,
            update_existing_only: false,
            api_key_file: None,
            api_key: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingMode {
    Boolean,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitedValue {
    False,
    Null,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingConfig {
    pub mode: MappingMode,
    pub attribute_prefix: String,
    pub array_attribute: String,
    pub exited_value: ExitedValue,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            mode: MappingMode::Boolean,
            attribute_prefix: String::new(),
            array_attribute: "cdp_segments".into(),
            exited_value: ExitedValue::False,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    pub linger_ms: u64,
    pub max_pending_users: usize,
    /// How many event ids are remembered to drop exact repeats.
    pub dedup_memory: usize,
    /// How many (user, segment) deliveries are remembered to drop stale and redundant changes.
    pub delivered_memory: usize,
    /// How long revoke and shutdown wait for in-flight requests before committing what settled.
    pub drain_timeout_ms: u64,
    /// How often settled offsets are committed while running.
    pub commit_interval_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            linger_ms: 1000,
            max_pending_users: 100_000,
            dedup_memory: 1_000_000,
            delivered_memory: 1_000_000,
            drain_timeout_ms: 20_000,
            commit_interval_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}
