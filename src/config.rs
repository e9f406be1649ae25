//! The worker's configuration: the TOML file of docs/design.md, `SEGMENT_SYNC_<SECTION>_<KEY>`
//! environment overrides, `BRAZE_API_KEY`, and validation that names the key and the fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub braze: BrazeConfig,
    pub mapping: MappingConfig,
    pub window: WindowConfig,
    pub server: ServerConfig,
    pub source: SourceConfig,
    pub replay: ReplayConfig,
    pub snapshot: SnapshotConfig,
}

/// `[source] shape`: how a record's decoded value becomes changes (DESIGN.md, "Sources").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// This project's `SegmentMembershipChange`, one change per record.
    #[default]
    Change,
    AdobeRtcdp,
    Segment,
    Lytics,
    Debezium,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Change,
        Shape::AdobeRtcdp,
        Shape::Segment,
        Shape::Lytics,
        Shape::Debezium,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Change => "change",
            Shape::AdobeRtcdp => "adobe-rtcdp",
            Shape::Segment => "segment",
            Shape::Lytics => "lytics",
            Shape::Debezium => "debezium",
        }
    }

    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// `source.unmapped`: what becomes of an audience that `[source.segments]` does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmapped {
    /// Settled and counted as `unmapped_audience`, never written.
    Skip,
    /// Written under the audience's own id.
    UseId,
}

/// `[source]`: the shape of the records and where a shape finds identities and audiences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub shape: Shape,
    /// JSON Pointer (RFC 6901) to the external_id; a shape's default when unset.
    pub external_id: Option<String>,
    /// JSON Pointer (RFC 6901) to the email; a shape's default when unset.
    pub email: Option<String>,
    /// Audience id or key → the segment id that names the attribute.
    pub segments: BTreeMap<String, String>,
    /// Unset: `skip` when `segments` has entries, `use-id` when it has none.
    pub unmapped: Option<Unmapped>,
    /// Debezium: the column holding the external_id.
    pub user_column: Option<String>,
    /// Debezium: the column holding the segment id.
    pub segment_column: Option<String>,
    /// Debezium: the column holding the email, optional.
    pub email_column: Option<String>,
    /// Debezium: a boolean column that an update (`u`) follows; unset, an update enters.
    pub member_column: Option<String>,
}

impl SourceConfig {
    /// `source.unmapped` with its default applied.
    pub fn unmapped(&self) -> Unmapped {
        self.unmapped.unwrap_or(if self.segments.is_empty() {
            Unmapped::UseId
        } else {
            Unmapped::Skip
        })
    }

    fn problems(&self, format: Format) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let shape = self.shape.name();
        for (key, value) in [
            ("source.external_id", &self.external_id),
            ("source.email", &self.email),
        ] {
            if let Some(p) = value {
                if !(p.is_empty() || p.starts_with('/')) {
                    out.push((
                        key,
                        format!("{key} = {p:?} is not a JSON Pointer (RFC 6901): start it with `/`, e.g. \"/identityMap/crmId/0/id\""),
                    ));
                }
            }
        }
        let pointers_set = self.external_id.is_some() || self.email.is_some();
        let columns_set = [
            &self.user_column,
            &self.segment_column,
            &self.email_column,
            &self.member_column,
        ]
        .iter()
        .any(|c| c.is_some());
        match self.shape {
            Shape::Change => {
                if pointers_set
                    || columns_set
                    || !self.segments.is_empty()
                    || self.unmapped.is_some()
                {
                    out.push((
                        "source.shape",
                        "source.shape = \"change\" reads this project's own event and takes no source.external_id, source.email, [source.segments], source.unmapped or source.*_column: set source.shape to the CDP's shape or remove them".into(),
                    ));
                }
            }
            Shape::AdobeRtcdp => {
                if self.external_id.as_deref().is_none_or(str::is_empty)
                    && self.email.as_deref().is_none_or(str::is_empty)
                {
                    out.push((
                        "source.external_id",
                        "source.shape = \"adobe-rtcdp\" needs source.external_id or source.email (or both): an identity namespace is each company's choice, e.g. source.external_id = \"/identityMap/crmId/0/id\" and source.email = \"/personalEmail/address\"".into(),
                    ));
                }
            }
            Shape::Segment | Shape::Lytics => {}
            Shape::Debezium => {
                for (key, value) in [
                    ("source.user_column", &self.user_column),
                    ("source.segment_column", &self.segment_column),
                ] {
                    if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                        out.push((
                            key,
                            format!("source.shape = \"debezium\" needs {key}: the membership table's column holding the {}", if key == "source.user_column" { "user's external_id" } else { "segment id" }),
                        ));
                    }
                }
                if pointers_set {
                    out.push((
                        "source.external_id",
                        "source.shape = \"debezium\" reads the row's columns: use source.user_column and source.email_column instead of source.external_id and source.email".into(),
                    ));
                }
            }
        }
        if !matches!(self.shape, Shape::Debezium | Shape::Change) && columns_set {
            out.push((
                "source.user_column",
                format!("source.shape = \"{shape}\" has no table columns: source.user_column, source.segment_column, source.email_column and source.member_column are for \"debezium\""),
            ));
        }
        let avro_debezium = self.shape == Shape::Debezium && format == Format::AvroConfluent;
        if self.shape != Shape::Change && format != Format::Json && !avro_debezium {
            let or_avro = if self.shape == Shape::Debezium {
                " (or \"avro-confluent\" with the schema registry)"
            } else {
                ""
            };
            out.push((
                "kafka.format",
                format!("source.shape = \"{shape}\" is read from JSON: set kafka.format = \"json\"{or_avro}"),
            ));
        }
        for (id, to) in &self.segments {
            if id.is_empty() || to.trim().is_empty() {
                out.push((
                    "source.segments",
                    format!("[source.segments] {id:?} = {to:?}: neither the audience id nor the segment id may be empty"),
                ));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    AvroConfluent,
    Avro,
    Json,
}

/// `Debug` is written by hand below: the registry URL and `properties` may hold secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub dlq_topic: String,
    pub format: Format,
    pub schema_registry_url: String,
    /// Sent as `Authorization: Bearer <token>` to the registry (an API gateway's or an OAuth
    /// proxy's token), instead of basic auth in the URL.
    pub schema_registry_token: Option<Secret>,
    /// A file holding that token (a mounted Secret), read again for every request so that a
    /// rotated token is picked up without a restart.
    pub schema_registry_token_file: Option<String>,
    /// PEM certificates of the CA that signed the registry's certificate, trusted besides the
    /// system's.
    pub schema_registry_ca_file: Option<String>,
    /// A client certificate (PEM, chain allowed) and its PKCS#8 PEM key, for a registry that
    /// wants mutual TLS.
    pub schema_registry_cert_file: Option<String>,
    pub schema_registry_key_file: Option<String>,
    /// Passed to librdkafka as they are (TLS, SASL, ...), for the consumer and the producer.
    pub properties: BTreeMap<String, String>,
}

/// A secret value of the configuration: `{:?}` shows `***`, so no log line, error or panic
/// message can carry it; [`Secret::expose`] is the one way to the value.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
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
            schema_registry_token: None,
            schema_registry_token_file: None,
            schema_registry_ca_file: None,
            schema_registry_cert_file: None,
            schema_registry_key_file: None,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The registry's authentication and TLS keys that contradict each other or the URL.
    /// The files themselves are read when a worker starts, not here: `check-config` runs where
    /// the pod's mounts are not.
    fn schema_registry_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let token = "kafka.schema_registry_token";
        let token_file = "kafka.schema_registry_token_file";
        if self
            .schema_registry_token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            out.push((
                token,
                format!("{token} is empty: set the registry's bearer token, or remove the key"),
            ));
        }
        if self.schema_registry_token.is_some() && self.schema_registry_token_file.is_some() {
            out.push((
                token,
                format!("{token} and {token_file} are both set: keep one"),
            ));
        }
        let has_token =
            self.schema_registry_token.is_some() || self.schema_registry_token_file.is_some();
        let url = reqwest::Url::parse(self.schema_registry_url.trim()).ok();
        if has_token
            && url
                .as_ref()
                .is_some_and(|u| !u.username().is_empty() || u.password().is_some())
        {
            out.push((
                token,
                format!(
                    "kafka.schema_registry_url carries basic-auth credentials and a bearer token \
                     is set ({token} or {token_file}): the registry takes one Authorization \
                     header; keep one of them"
                ),
            ));
        }
        let files = [
            (token_file, &self.schema_registry_token_file),
            (
                "kafka.schema_registry_ca_file",
                &self.schema_registry_ca_file,
            ),
            (
                "kafka.schema_registry_cert_file",
                &self.schema_registry_cert_file,
            ),
            (
                "kafka.schema_registry_key_file",
                &self.schema_registry_key_file,
            ),
        ];
        for (key, file) in files {
            if file.as_ref().is_some_and(|f| f.trim().is_empty()) {
                out.push((
                    key,
                    format!("{key} is empty: set it to a file's path, or remove the key"),
                ));
            }
        }
        match (
            &self.schema_registry_cert_file,
            &self.schema_registry_key_file,
        ) {
            (Some(_), None) => out.push((
                "kafka.schema_registry_key_file",
                "kafka.schema_registry_cert_file is set without kafka.schema_registry_key_file: \
                 a client certificate needs its private key"
                    .into(),
            )),
            (None, Some(_)) => out.push((
                "kafka.schema_registry_cert_file",
                "kafka.schema_registry_key_file is set without kafka.schema_registry_cert_file: \
                 set the client certificate that goes with the key"
                    .into(),
            )),
            _ => {}
        }
        let tls =
            self.schema_registry_ca_file.is_some() || self.schema_registry_cert_file.is_some();
        if tls && url.as_ref().is_some_and(|u| u.scheme() == "http") {
            out.push((
                "kafka.schema_registry_url",
                format!(
                    "kafka.schema_registry_url = {:?} is plain http, but a CA file or a client \
                     certificate is set for the registry: use its https:// URL",
                    mask_url_password(&self.schema_registry_url)
                ),
            ));
        }
        out
    }
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) { "***" } else { v };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dlq_topic", &self.dlq_topic)
            .field("format", &self.format)
            .field(
                "schema_registry_url",
                &mask_url_password(&self.schema_registry_url),
            )
            .field("schema_registry_token", &self.schema_registry_token)
            .field(
                "schema_registry_token_file",
                &self.schema_registry_token_file,
            )
            .field("schema_registry_ca_file", &self.schema_registry_ca_file)
            .field("schema_registry_cert_file", &self.schema_registry_cert_file)
            .field("schema_registry_key_file", &self.schema_registry_key_file)
            .field("properties", &properties)
            .finish()
    }
}

/// `Debug` is written by hand below so that `{:?}` of a configuration never prints the key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrazeConfig {
    /// A URL (`https://rest.iad-03.braze.com`) or a bare host (`rest.iad-03.braze.com`).
    pub endpoint: String,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub requests_per_second: u32,
    pub timeout_ms: u64,
    pub update_existing_only: bool,
    /// `verify`'s pace on `POST /users/export/ids`, a limit of its own at Braze (250 a
    /// minute by default).
    pub export_requests_per_minute: u32,
    /// A file holding the API key (a mounted Kubernetes secret); `BRAZE_API_KEY` wins over it.
    pub api_key_file: Option<String>,
    /// A PEM file of CA certificates trusted for the endpoint besides the system's roots: a
    /// TLS-inspecting egress proxy or a private gateway in front of Braze.
    pub ca_file: Option<String>,
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
            export_requests_per_minute: 250,
            api_key_file: None,
            ca_file: None,
            api_key: None,
        }
    }
}

impl std::fmt::Debug for BrazeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrazeConfig")
            .field("endpoint", &self.endpoint)
            .field("batch_size", &self.batch_size)
            .field("max_in_flight", &self.max_in_flight)
            .field("requests_per_second", &self.requests_per_second)
            .field("timeout_ms", &self.timeout_ms)
            .field("update_existing_only", &self.update_existing_only)
            .field(
                "export_requests_per_minute",
                &self.export_requests_per_minute,
            )
            .field("api_key_file", &self.api_key_file)
            .field("ca_file", &self.ca_file)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .finish()
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
    /// Back-pressure in bytes: consumption pauses while pending users' identifiers, changes
    /// and attributes hold this much.
    pub max_pending_bytes: usize,
    /// How many event ids are remembered to drop exact repeats.
    pub dedup_memory: usize,
    /// How many (user, segment) deliveries are remembered to drop stale and redundant changes.
    pub delivered_memory: usize,
    /// How long revoke and shutdown wait for in-flight requests before committing what settled.
    pub drain_timeout_ms: u64,
    /// How often settled offsets are committed while running.
    pub commit_interval_ms: u64,
    /// How far `occurred_at` may be ahead of the worker's clock before the event is invalid
    /// (dead-lettered): a wrong future time would win last write wins against every later
    /// change. 0 turns the check off; otherwise at least [`MIN_MAX_FUTURE_MS`], so that
    /// ordinary clock skew between the CDP and the worker never rejects a good event.
    pub max_future_ms: u64,
    /// How many records below its committed offset a partition newly assigned to `run` is
    /// read back, so that what was written orders the changes that follow (an older one is
    /// stale) across restarts and rebalances. Per partition; 0 turns the restore off.
    pub restore_records: u64,
}

/// Above this, one partition's restore would hold more versions than any window remembers.
pub const MAX_RESTORE_RECORDS: u64 = 10_000_000;

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            linger_ms: 1000,
            max_pending_users: 100_000,
            max_pending_bytes: 64 << 20,
            dedup_memory: 262_144,
            delivered_memory: 262_144,
            drain_timeout_ms: 20_000,
            commit_interval_ms: 1000,
            max_future_ms: 86_400_000,
            restore_records: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
}

/// How `replay` folds the range it reads (docs/design.md, "Backfills": it writes the final state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Bytes the fold's state may hold before it spills to `spill_dir` by user hash.
    pub fold_memory: usize,
    /// Where the fold spills; the system's temporary directory when unset.
    pub spill_dir: Option<String>,
}

/// Below this, a few large users would spill the fold at nearly every record.
pub const MIN_FOLD_MEMORY: usize = 64 << 10;

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            fold_memory: 64 << 20,
            spill_dir: None,
        }
    }
}

impl ReplayConfig {
    /// `spill_dir`, or the system's temporary directory.
    pub fn spill_dir(&self) -> PathBuf {
        match self.spill_dir.as_deref().filter(|d| !d.trim().is_empty()) {
            Some(d) => PathBuf::from(d),
            None => std::env::temp_dir(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `segment-sync snapshot`: where the changes of a member list go and where its state is kept.
/// `Debug` is written by hand below: `storage` holds the object store's credentials.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// The topic the changes are written to; unset means the first of `kafka.topics`.
    pub topic: Option<String>,
    /// The compacted topic of the segments' membership; unset means `<topic>.snapshots`.
    pub state_topic: Option<String>,
    /// Changes per Kafka transaction, so that no transaction of a large run outlives the
    /// broker's transaction timeout or holds the worker at the last stable offset for long.
    pub transaction_records: usize,
    /// The object store's options under its own names (`azure_storage_account_name`,
    /// `aws_access_key_id`, ...), besides its environment variables; secrets are masked.
    pub storage: BTreeMap<String, String>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            topic: None,
            state_topic: None,
            transaction_records: 100_000,
            storage: BTreeMap::new(),
        }
    }
}

impl SnapshotConfig {
    /// The topic the changes go to: `snapshot.topic`, else the first of `kafka.topics`.
    pub fn changes_topic(&self, kafka: &KafkaConfig) -> Option<String> {
        self.topic.clone().or_else(|| kafka.topics.first().cloned())
    }

    /// The state topic: `snapshot.state_topic`, else `<changes topic>.snapshots`.
    pub fn state_topic_for(&self, kafka: &KafkaConfig) -> Option<String> {
        self.state_topic
            .clone()
            .or_else(|| self.changes_topic(kafka).map(|t| format!("{t}.snapshots")))
    }

    /// `storage` with every value whose name marks a secret shown as `***`.
    fn masked_storage(&self) -> BTreeMap<String, String> {
        self.storage
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "***".to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }
}

impl std::fmt::Debug for SnapshotConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotConfig")
            .field("topic", &self.topic)
            .field("state_topic", &self.state_topic)
            .field("transaction_records", &self.transaction_records)
            .field("storage", &self.masked_storage())
            .finish()
    }
}

/// Every environment variable that overrides a key starts with this.
pub const ENV_PREFIX: &str = "SEGMENT_SYNC_";

/// `SEGMENT_SYNC_*` variables that belong to the command line, not to a configuration key,
/// so the typo check must let them through.
pub const COMMAND_LINE_ENV: &[&str] = &[
    "SEGMENT_SYNC_CONFIG",
    "SEGMENT_SYNC_LOG_JSON",
    "SEGMENT_SYNC_REPLAY_RUN_ID",
];

/// Where the API key comes from; it is never read from the TOML file.
pub const API_KEY_ENV: &str = "BRAZE_API_KEY";

/// Braze rejects a `/users/track` request with more attributes objects than this.
pub const BRAZE_MAX_BATCH: usize = 75;

/// Beyond five minutes a user's change waits longer than any operator expects a sync to take.
pub const MAX_LINGER_MS: u64 = 300_000;

/// Below a mebibyte, a handful of users at Braze's size limits would fill the window.
pub const MIN_MAX_PENDING_BYTES: usize = 1 << 20;

/// Below a minute of tolerance, clock skew between the CDP's hosts and the worker's would
/// dead-letter good events.
pub const MIN_MAX_FUTURE_MS: u64 = 60_000;

/// librdkafka properties the worker sets itself; letting the file override them would break
/// the group membership or the at-least-once commit.
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("group.id", "use kafka.group_id instead"),
    ("bootstrap.servers", "use kafka.brokers instead"),
    ("metadata.broker.list", "use kafka.brokers instead"),
    (
        "enable.auto.commit",
        "remove it: the worker commits an offset only once every event below it is settled",
    ),
    (
        "auto.commit.enable",
        "remove it: the worker commits an offset only once every event below it is settled",
    ),
    (
        "enable.auto.offset.store",
        "remove it: the worker stores offsets itself once the events are settled",
    ),
];

/// Parts of a `kafka.properties` key that mark its value as a secret.
const SECRET_PROPERTY_MARKERS: &[&str] = &[
    "password",
    "secret",
    "sasl.jaas",
    "token",
    "key",
    "credential",
    // `sasl.oauthbearer.config` holds client secrets in free text.
    "oauthbearer.config",
];

/// Whether loading must find a Braze API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRequirement {
    /// `run` and `check-config`: the worker cannot talk to Braze without one.
    Required,
    /// `replay --dry-run`, `produce`: nothing is sent to Braze.
    Optional,
}

/// One thing wrong with an otherwise well-formed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, e.g. `braze.batch_size`.
    pub key: String,
    /// What is wrong and how to fix it; starts with the key.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        // Named in the message, so not a `source()`: `{:#}` would print it twice.
        error: std::io::Error,
    },
    #[error("{origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("unknown section [{section}] in {origin} ({suggestion}known sections: {known})")]
    UnknownSection {
        section: String,
        origin: String,
        /// `did you mean ...? ` or empty.
        suggestion: String,
        known: String,
    },
    #[error("unknown key `{key}` in {origin} ({suggestion}known keys in [{section}]: {known})")]
    UnknownKey {
        key: String,
        section: String,
        origin: String,
        /// `did you mean ...? ` or empty.
        suggestion: String,
        known: String,
    },
    #[error("{key} in {origin}: {message}")]
    BadValue {
        key: String,
        origin: String,
        message: String,
    },
    #[error("environment variable {var} matches no configuration key: {hint}")]
    UnknownEnv { var: String, hint: String },
    #[error("environment variable {var} (for {key}): {message}")]
    BadEnv {
        var: String,
        key: String,
        message: String,
    },
    #[error("braze.api_key_file = {path:?}: {message}")]
    ApiKeyFile { path: String, message: String },
    #[error("no Braze API key: set {API_KEY_ENV} or braze.api_key_file")]
    MissingApiKey,
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => one.message.clone(),
        many => {
            let mut out = format!("{} problems in the configuration:", many.len());
            for p in many {
                out.push_str("\n  - ");
                out.push_str(&p.message);
            }
            out
        }
    }
}

impl Config {
    /// Reads the TOML file, applies `SEGMENT_SYNC_<SECTION>_<KEY>` environment overrides,
    /// reads the API key (required), validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, KeyRequirement::Required)
    }

    /// [`Config::load`] for commands that may run without an API key.
    pub fn load_with(path: &Path, key: KeyRequirement) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let env = process_env()?;
        Config::parse(&text, env, key, &path.display().to_string())
    }

    /// Same as [`Config::load`] from a string and an explicit environment of (name, value).
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::from_toml_str_with(text, env, KeyRequirement::Required)
    }

    /// [`Config::from_toml_str`] for commands that may run without an API key.
    pub fn from_toml_str_with(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        key: KeyRequirement,
    ) -> Result<Config, ConfigError> {
        Config::parse(text, env, key, "the configuration")
    }

    fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        key: KeyRequirement,
        origin: &str,
    ) -> Result<Config, ConfigError> {
        let schema = Schema::new();
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        schema.check_document(&mut doc, origin)?;
        let mut api_key_env = None;
        // dotted key → the variable that set it, so a bad value blames what the operator wrote.
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        for (var, value) in env {
            if var == API_KEY_ENV {
                api_key_env = Some(value);
            } else if var.starts_with(ENV_PREFIX) && !COMMAND_LINE_ENV.contains(&var.as_str()) {
                if let Some(dotted) = schema.apply_env(&mut doc, &var, &value)? {
                    from_env.insert(dotted, var);
                }
            }
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc))
            .map_err(|e| {
                let key = section_key(e.path());
                let message = e.inner().message().to_string();
                match from_env.remove(&key) {
                    Some(var) => ConfigError::BadEnv { var, key, message },
                    None => ConfigError::BadValue {
                        key,
                        origin: origin.to_string(),
                        message,
                    },
                }
            })?;
        config.validate()?;
        config.braze.api_key = read_api_key(api_key_env, config.braze.api_key_file.as_deref())?;
        if key == KeyRequirement::Required && config.braze.api_key.is_none() {
            return Err(ConfigError::MissingApiKey);
        }
        Ok(config)
    }

    /// Every problem of the loaded values, each naming its key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| {
            out.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        let k = &self.kafka;
        if k.brokers.split(',').all(|b| b.trim().is_empty()) {
            bad(
                "kafka.brokers",
                "kafka.brokers is empty: set it to host:port[,host:port...]".into(),
            );
        }
        if k.group_id.trim().is_empty() {
            bad(
                "kafka.group_id",
                "kafka.group_id is empty: set the consumer group every copy of the worker shares"
                    .into(),
            );
        }
        if k.topics.is_empty() {
            bad(
                "kafka.topics",
                "kafka.topics is empty: list at least one topic to consume".into(),
            );
        } else if k.topics.iter().any(|t| t.trim().is_empty()) {
            bad(
                "kafka.topics",
                format!(
                    "kafka.topics = {:?} holds an empty topic name: remove it",
                    k.topics
                ),
            );
        }
        if k.dlq_topic.trim().is_empty() {
            bad(
                "kafka.dlq_topic",
                "kafka.dlq_topic is empty: set the dead-letter topic for rejected and undecodable records".into(),
            );
        } else if k.topics.contains(&k.dlq_topic) {
            bad(
                "kafka.dlq_topic",
                format!(
                    "kafka.dlq_topic = {:?} is also in kafka.topics: the worker would consume its own dead letters; use a separate topic",
                    k.dlq_topic
                ),
            );
        }
        if k.format == Format::AvroConfluent {
            let url = &k.schema_registry_url;
            // A `/` or `@` left unencoded in a secret moves the host into the user info or
            // the secret into the path: the requests would go elsewhere, or fail as 401s.
            let why = if url.contains('@') && (!is_http_url(url) || has_stray_at(url)) {
                Some("holds credentials that do not parse: percent-encode the key and secret (/ as %2F, @ as %40, : as %3A)")
            } else if !is_http_url(url) {
                Some("is not an http(s) URL: format = \"avro-confluent\" needs the schema registry, e.g. \"http://127.0.0.1:8081\"")
            } else {
                None
            };
            if let Some(why) = why {
                bad(
                    "kafka.schema_registry_url",
                    format!(
                        "kafka.schema_registry_url = {:?} {why}",
                        mask_url_password(url)
                    ),
                );
            }
        }
        for problem in k.schema_registry_problems() {
            bad(problem.0, problem.1);
        }
        for problem in self.source.problems(k.format) {
            bad(problem.0, problem.1);
        }
        for name in k.properties.keys() {
            let lower = name.to_ascii_lowercase();
            if let Some((_, fix)) = OWNED_PROPERTIES.iter().find(|(owned, _)| *owned == lower) {
                bad(
                    "kafka.properties",
                    format!("kafka.properties.\"{name}\" is set by the worker itself: {fix}"),
                );
            }
        }

        let b = &self.braze;
        if !is_http_url(&self.braze_base_url()) {
            bad(
                "braze.endpoint",
                format!(
                    "braze.endpoint = {:?} is neither a URL nor a host: use your instance's REST endpoint, e.g. \"https://rest.iad-03.braze.com\" or \"rest.fra-01.braze.eu\"",
                    b.endpoint
                ),
            );
        }
        if !(1..=BRAZE_MAX_BATCH).contains(&b.batch_size) {
            bad(
                "braze.batch_size",
                format!(
                    "braze.batch_size = {} is out of range: Braze accepts 1 to {BRAZE_MAX_BATCH} attributes objects per request",
                    b.batch_size
                ),
            );
        }
        if b.max_in_flight < 1 {
            bad(
                "braze.max_in_flight",
                "braze.max_in_flight = 0 would never send a request: set it to 1 or more".into(),
            );
        }
        if b.requests_per_second < 1 {
            bad(
                "braze.requests_per_second",
                "braze.requests_per_second = 0 would never send a request: set it to 1 or more (Braze's default limit is 1000 per second per workspace)".into(),
            );
        }
        if b.export_requests_per_minute < 1 {
            bad(
                "braze.export_requests_per_minute",
                "braze.export_requests_per_minute = 0 would never export a user: set it to 1 or more (Braze's default limit for /users/export/ids is 250 a minute)".into(),
            );
        }
        if b.timeout_ms < 1 {
            bad(
                "braze.timeout_ms",
                "braze.timeout_ms = 0 would time out every request: set it to 1 or more milliseconds".into(),
            );
        }
        if let Some(file) = &b.api_key_file {
            if file.trim().is_empty() {
                bad(
                    "braze.api_key_file",
                    "braze.api_key_file is empty: set it to the path of the key file, or remove it"
                        .into(),
                );
            }
        }
        if let Some(file) = &b.ca_file {
            if let Err(why) = crate::braze::ca_certificates(file) {
                bad(
                    "braze.ca_file",
                    format!("braze.ca_file = {file:?} {why}: set it to a PEM file of the CA certificates that sign the endpoint's certificate, or remove it to trust the system's roots only"),
                );
            }
        }

        let m = &self.mapping;
        if m.mode == MappingMode::Array && m.array_attribute.trim().is_empty() {
            bad(
                "mapping.array_attribute",
                "mapping.array_attribute is empty: mode = \"array\" needs the name of the array attribute, e.g. \"cdp_segments\"".into(),
            );
        }
        if m.attribute_prefix.starts_with('$') {
            bad(
                "mapping.attribute_prefix",
                format!(
                    "mapping.attribute_prefix = {:?} starts with \"$\", which Braze reserves for its own attributes: choose another prefix",
                    m.attribute_prefix
                ),
            );
        }
        if m.mode == MappingMode::Array && m.array_attribute.starts_with('$') {
            bad(
                "mapping.array_attribute",
                format!(
                    "mapping.array_attribute = {:?} starts with \"$\", which Braze reserves for its own attributes: choose another name",
                    m.array_attribute
                ),
            );
        }

        let w = &self.window;
        if w.linger_ms > MAX_LINGER_MS {
            bad(
                "window.linger_ms",
                format!(
                    "window.linger_ms = {} is out of range: use 0 to {MAX_LINGER_MS} milliseconds",
                    w.linger_ms
                ),
            );
        }
        if w.max_pending_users < b.batch_size {
            bad(
                "window.max_pending_users",
                format!(
                    "window.max_pending_users = {} is below braze.batch_size = {}: the window could never fill a request; raise it",
                    w.max_pending_users, b.batch_size
                ),
            );
        }
        if w.max_pending_bytes < MIN_MAX_PENDING_BYTES {
            bad(
                "window.max_pending_bytes",
                format!(
                    "window.max_pending_bytes = {} is below {MIN_MAX_PENDING_BYTES} (1 MiB): a few large users would stop consumption; raise it",
                    w.max_pending_bytes
                ),
            );
        }
        if (1..MIN_MAX_FUTURE_MS).contains(&w.max_future_ms) {
            bad(
                "window.max_future_ms",
                format!(
                    "window.max_future_ms = {} is too small: ordinary clock skew between the CDP and the worker would dead-letter good events; use 0 to turn the check off, or {MIN_MAX_FUTURE_MS} (one minute) or more",
                    w.max_future_ms
                ),
            );
        }
        if w.restore_records > MAX_RESTORE_RECORDS {
            bad(
                "window.restore_records",
                format!(
                    "window.restore_records = {} is over {MAX_RESTORE_RECORDS}: what a partition restores is remembered in window.delivered_memory, which cannot use that many; use 0 to turn the restore off",
                    w.restore_records
                ),
            );
        }
        for (key, value) in [
            ("window.dedup_memory", w.dedup_memory as u64),
            ("window.delivered_memory", w.delivered_memory as u64),
            ("window.commit_interval_ms", w.commit_interval_ms),
        ] {
            if value < 1 {
                bad(
                    key,
                    format!("{key} = 0 is out of range: set it to 1 or more"),
                );
            }
        }

        let r = &self.replay;
        if r.fold_memory < MIN_FOLD_MEMORY {
            bad(
                "replay.fold_memory",
                format!(
                    "replay.fold_memory = {} is below {MIN_FOLD_MEMORY} (64 KiB): the fold would spill at nearly every record; raise it",
                    r.fold_memory
                ),
            );
        }
        if let Some(dir) = r.spill_dir.as_deref().filter(|d| !d.trim().is_empty()) {
            if !Path::new(dir).is_dir() {
                bad(
                    "replay.spill_dir",
                    format!("replay.spill_dir = {dir:?} is not a directory: create it or point it at one with room for the fold's spill"),
                );
            }
        }

        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "server.listen",
                format!(
                    "server.listen = {:?} is not a socket address: use ip:port, e.g. \"0.0.0.0:9464\"",
                    self.server.listen
                ),
            );
        }
        let snap = &self.snapshot;
        if snap.transaction_records < 1 {
            bad(
                "snapshot.transaction_records",
                "snapshot.transaction_records = 0 is out of range: set it to 1 or more".into(),
            );
        }
        for (key, topic) in [
            ("snapshot.topic", &snap.topic),
            ("snapshot.state_topic", &snap.state_topic),
        ] {
            if topic.as_ref().is_some_and(|t| t.trim().is_empty()) {
                bad(
                    key,
                    format!("{key} is empty: name a topic, or remove the key for the default"),
                );
            }
        }
        let changes = snap.changes_topic(&self.kafka);
        let state = snap.state_topic_for(&self.kafka);
        if changes.is_some() && changes == state {
            bad(
                "snapshot.state_topic",
                "snapshot.state_topic is the changes topic: the state needs a compacted topic of its own".into(),
            );
        }
        // Unset, it is the first of kafka.topics, which has its own check against the DLQ.
        if snap.topic.as_deref() == Some(self.kafka.dlq_topic.as_str()) {
            bad(
                "snapshot.topic",
                "snapshot.topic is kafka.dlq_topic: write the changes to a topic the worker reads"
                    .into(),
            );
        }
        // Set explicitly, it is checked here; left to its default (the worker's own topic), a
        // configuration for another shape is fine until `snapshot` itself runs with it.
        if snap.topic.is_some() {
            if let Some(problem) = self.snapshot_shape_problem() {
                bad("snapshot.topic", problem);
            }
        }
        out
    }

    /// Why `snapshot` may not write to its topic: `snapshot` writes the project's own
    /// `change` records, and a worker reading that topic with another `source.shape` would
    /// dead-letter every one.
    pub fn snapshot_shape_problem(&self) -> Option<String> {
        if self.source.shape == Shape::Change {
            return None;
        }
        let topic = self.snapshot.changes_topic(&self.kafka)?;
        self.kafka.topics.contains(&topic).then(|| {
            format!(
                "snapshot.topic {topic:?} is read by the worker with source.shape = {:?}, but \
                 snapshot writes `change` records: set snapshot.topic to a topic of its own (read \
                 by a worker with source.shape = \"change\")",
                self.source.shape.name()
            )
        })
    }

    /// The effective configuration as TOML with secrets masked: the API key is shown as `***`
    /// (or `(not set)`), and so is every `kafka.properties` value whose key names a secret.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.braze.api_key = None;
        shown.kafka.schema_registry_url = mask_url_password(&self.kafka.schema_registry_url);
        if shown.kafka.schema_registry_token.is_some() {
            shown.kafka.schema_registry_token = Some(Secret::new("***"));
        }
        for (name, value) in shown.kafka.properties.iter_mut() {
            if is_secret_property(name) {
                *value = "***".into();
            }
        }
        shown.snapshot.storage = self.snapshot.masked_storage();
        let key = if self.braze.api_key.is_some() {
            "\"***\""
        } else {
            "(not set)"
        };
        let body = match toml::to_string(&shown) {
            Ok(body) => body,
            // Every field is a plain string, number, bool or string map: serialising cannot fail.
            Err(e) => format!("# cannot render the configuration: {e}\n"),
        };
        format!(
            "# Effective configuration: file + {ENV_PREFIX}* environment overrides, secrets masked.\n\
             # braze.api_key = {key}  (from {API_KEY_ENV} or braze.api_key_file)\n\n{body}"
        )
    }

    /// The Braze REST base URL: a bare host becomes `https://host`; trailing slashes are trimmed.
    pub fn braze_base_url(&self) -> String {
        let endpoint = self.braze.endpoint.trim().trim_end_matches('/');
        if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("https://{endpoint}")
        }
    }
}

fn is_secret_property(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_PROPERTY_MARKERS.iter().any(|m| lower.contains(m))
}

/// An `@` after the authority: user info cut short by an unencoded `/`, `?` or `#`.
fn has_stray_at(text: &str) -> bool {
    reqwest::Url::parse(text.trim()).is_ok_and(|u| {
        u.path().contains('@')
            || u.query().is_some_and(|q| q.contains('@'))
            || u.fragment().is_some_and(|f| f.contains('@'))
    })
}

fn is_http_url(text: &str) -> bool {
    match reqwest::Url::parse(text.trim()) {
        Ok(url) => {
            matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some_and(|h| !h.is_empty())
        }
        Err(_) => false,
    }
}

/// The process environment; a `SEGMENT_SYNC_*` or `BRAZE_API_KEY` value that is not UTF-8 is
/// an error rather than a silently ignored override.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with(ENV_PREFIX) || name == API_KEY_ENV) {
            continue;
        }
        match value.into_string() {
            Ok(value) => out.push((name.to_string(), value)),
            Err(_) => {
                return Err(ConfigError::BadEnv {
                    var: name.to_string(),
                    key: "the configuration".into(),
                    message: "the value is not valid UTF-8".into(),
                })
            }
        }
    }
    Ok(out)
}

fn read_api_key(
    from_env: Option<String>,
    file: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    if let Some(key) = from_env.map(|k| k.trim().to_string()) {
        if !key.is_empty() {
            return Ok(Some(key));
        }
    }
    let Some(path) = file.filter(|p| !p.trim().is_empty()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ApiKeyFile {
        path: path.to_string(),
        message: format!("cannot read the API key file: {e}"),
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err(ConfigError::ApiKeyFile {
            path: path.to_string(),
            message: "the file is empty: put the Braze REST API key in it".into(),
        });
    }
    Ok(Some(key.to_string()))
}

/// The sections and keys of the file, taken from the serialised default so that a field added
/// to a struct is known to the typo check and gets its environment variable without more code.
struct Schema {
    /// section → key → a specimen value, whose TOML type tells how to parse an env value.
    sections: BTreeMap<String, toml::Table>,
}

/// A free-form table inside a section: any key, string values (numbers and booleans accepted).
const FREE_TABLES: &[(&str, &str)] = &[
    ("kafka", "properties"),
    ("source", "segments"),
    ("snapshot", "storage"),
];

impl Schema {
    fn new() -> Schema {
        let mut specimen = Config::default();
        // Optional fields are left out of serialised TOML; give each a value so it is listed.
        specimen.braze.api_key_file = Some(String::new());
        let k = &mut specimen.kafka;
        k.schema_registry_token = Some(Secret::new(""));
        for file in [
            &mut k.schema_registry_token_file,
            &mut k.schema_registry_ca_file,
            &mut k.schema_registry_cert_file,
            &mut k.schema_registry_key_file,
        ] {
            *file = Some(String::new());
        }
        specimen.braze.ca_file = Some(String::new());
        let src = &mut specimen.source;
        src.unmapped = Some(Unmapped::Skip);
        for key in [
            &mut src.external_id,
            &mut src.email,
            &mut src.user_column,
            &mut src.segment_column,
            &mut src.email_column,
            &mut src.member_column,
        ] {
            *key = Some(String::new());
        }
        specimen.replay.spill_dir = Some(String::new());
        specimen.snapshot.topic = Some(String::new());
        specimen.snapshot.state_topic = Some(String::new());
        let sections = match toml::Value::try_from(&specimen) {
            Ok(toml::Value::Table(top)) => top
                .into_iter()
                .filter_map(|(name, v)| match v {
                    toml::Value::Table(t) => Some((name, t)),
                    _ => None,
                })
                .collect(),
            // The default configuration is plain data; this arm only keeps the type honest.
            _ => BTreeMap::new(),
        };
        Schema { sections }
    }

    fn known_sections(&self) -> String {
        self.sections.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    fn known_keys(&self, section: &str) -> String {
        self.sections
            .get(section)
            .map(|t| t.keys().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    }

    fn is_free_table(section: &str, key: &str) -> bool {
        FREE_TABLES.contains(&(section, key))
    }

    /// Rejects unknown sections and keys with the known ones and a suggestion; value types are
    /// left to the one deserialisation, whose error path names the key.
    fn check_document(&self, doc: &mut toml::Table, origin: &str) -> Result<(), ConfigError> {
        for (section, value) in doc.iter_mut() {
            let Some(known) = self.sections.get(section) else {
                return Err(ConfigError::UnknownSection {
                    section: section.clone(),
                    origin: origin.to_string(),
                    suggestion: did_you_mean(section, self.sections.keys(), |s| format!("[{s}]")),
                    known: self.known_sections(),
                });
            };
            let toml::Value::Table(table) = value else {
                return Err(ConfigError::BadValue {
                    key: section.clone(),
                    origin: origin.to_string(),
                    message: format!("`{section}` must be a table: write it as [{section}]"),
                });
            };
            for (key, value) in table.iter_mut() {
                if !known.contains_key(key) {
                    return Err(ConfigError::UnknownKey {
                        key: format!("{section}.{key}"),
                        section: section.clone(),
                        origin: origin.to_string(),
                        suggestion: did_you_mean(key, known.keys(), |k| format!("`{k}`")),
                        known: self.known_keys(section),
                    });
                }
                if Schema::is_free_table(section, key) {
                    stringify_free_table(value).map_err(|message| ConfigError::BadValue {
                        key: format!("{section}.{key}"),
                        origin: origin.to_string(),
                        message,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Applies one `SEGMENT_SYNC_*` variable to the document; returns the dotted key it set,
    /// unless it set a free-form property (those are strings, they cannot be mistyped).
    fn apply_env(
        &self,
        doc: &mut toml::Table,
        var: &str,
        raw: &str,
    ) -> Result<Option<String>, ConfigError> {
        for (section, keys) in &self.sections {
            for (key, specimen) in keys {
                let name = env_name(section, key);
                if Schema::is_free_table(section, key) {
                    if let Some(property) =
                        var.strip_prefix(&name).and_then(|r| r.strip_prefix('_'))
                    {
                        self.apply_free_env(doc, var, section, key, property, raw)?;
                        return Ok(None);
                    }
                    continue;
                }
                if var != name {
                    continue;
                }
                let dotted = format!("{section}.{key}");
                let value = env_value(specimen, raw).map_err(|message| ConfigError::BadEnv {
                    var: var.to_string(),
                    key: dotted.clone(),
                    message,
                })?;
                section_table(doc, section).insert(key.clone(), value);
                return Ok(Some(dotted));
            }
        }
        Err(ConfigError::UnknownEnv {
            var: var.to_string(),
            hint: self.env_hint(var),
        })
    }

    fn apply_free_env(
        &self,
        doc: &mut toml::Table,
        var: &str,
        section: &str,
        key: &str,
        name: &str,
        raw: &str,
    ) -> Result<(), ConfigError> {
        if name.is_empty() {
            return Err(ConfigError::BadEnv {
                var: var.to_string(),
                key: format!("{section}.{key}"),
                message: format!(
                    "name the property after the prefix, e.g. {ENV_PREFIX}{}_{}_SASL_MECHANISM",
                    section.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                ),
            });
        }
        // librdkafka's names are dotted; the object store's (`azure_storage_account_key`)
        // keep their underscores.
        let property = if (section, key) == ("snapshot", "storage") {
            name.to_ascii_lowercase()
        } else {
            name.to_ascii_lowercase().replace('_', ".")
        };
        let table = section_table(doc, section);
        let entry = table
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(props) = entry {
            props.insert(property, toml::Value::String(raw.to_string()));
        }
        Ok(())
    }

    fn env_hint(&self, var: &str) -> String {
        if var == format!("{ENV_PREFIX}BRAZE_API_KEY") {
            return format!("the API key is read from {API_KEY_ENV}");
        }
        let mut all: Vec<String> = Vec::new();
        let mut in_section: Vec<String> = Vec::new();
        for (section, keys) in &self.sections {
            let section_prefix = env_name(section, "");
            for key in keys.keys() {
                let mut name = env_name(section, key);
                if Schema::is_free_table(section, key) {
                    name.push_str("_<NAME>");
                }
                if var.starts_with(&section_prefix) {
                    in_section.push(name.clone());
                }
                all.push(name);
            }
        }
        let suggestion = did_you_mean(var, all.iter(), |n| n.to_string());
        if in_section.is_empty() {
            let sections: Vec<String> = self.sections.keys().map(|s| env_name(s, "*")).collect();
            format!("{suggestion}variables are named {}", sections.join(", "))
        } else {
            format!("{suggestion}known variables: {}", in_section.join(", "))
        }
    }
}

/// `did you mean X? ` for the known name closest to a typo, or nothing when none is close.
fn did_you_mean<'k>(
    typo: &str,
    known: impl IntoIterator<Item = &'k String>,
    show: impl Fn(&str) -> String,
) -> String {
    let typo = typo.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (strsim::levenshtein(&typo, &k.to_ascii_lowercase()), k))
        // A quarter of a long name may be mistyped; short names get two edits.
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!("did you mean {}? ", show(k)))
        .unwrap_or_default()
}

/// `SEGMENT_SYNC_<SECTION>_<KEY>`, upper case.
fn env_name(section: &str, key: &str) -> String {
    format!("{ENV_PREFIX}{section}_{key}").to_ascii_uppercase()
}

fn section_table<'d>(doc: &'d mut toml::Table, section: &str) -> &'d mut toml::Table {
    let entry = doc
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    match entry {
        toml::Value::Table(t) => t,
        // Made a table just above.
        _ => unreachable!("section is a table"),
    }
}

/// librdkafka takes every property as a string; accept `session.timeout.ms = 45000` too.
fn stringify_free_table(value: &mut toml::Value) -> Result<(), String> {
    let toml::Value::Table(table) = value else {
        return Err("must be a table of property = \"value\"".into());
    };
    for (name, v) in table.iter_mut() {
        let text = match v {
            toml::Value::String(_) => continue,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "property {name:?} must be a string, number or boolean"
                ))
            }
        };
        *v = toml::Value::String(text);
    }
    Ok(())
}

/// `section.key` of a deserialisation error: the operator sets keys, not list elements or
/// enum internals, so deeper segments are left to the message.
fn section_key(path: &serde_path_to_error::Path) -> String {
    let names: Vec<&str> = path
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .take(2)
        .collect();
    if names.is_empty() {
        "(configuration)".into()
    } else {
        names.join(".")
    }
}

/// Parses an environment value to the TOML type of the key's specimen value.
fn env_value(specimen: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    let trimmed = raw.trim();
    Ok(match specimen {
        toml::Value::Integer(_) => toml::Value::Integer(
            trimmed
                .parse()
                .map_err(|_| format!("{raw:?} is not a whole number"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            trimmed
                .parse()
                .map_err(|_| format!("{raw:?} is not a number"))?,
        ),
        toml::Value::Boolean(_) => match trimmed.to_ascii_lowercase().as_str() {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => return Err(format!("{raw:?} is not a boolean: use true or false")),
        },
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(|item| toml::Value::String(item.trim().to_string()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn with_key(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all = env(pairs);
        all.push((API_KEY_ENV.into(), "test-key-123".into()));
        all
    }

    fn load(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, with_key(pairs))
    }

    fn err(text: &str, pairs: &[(&str, &str)]) -> String {
        match load(text, pairs) {
            Ok(_) => panic!("expected an error for {text:?} {pairs:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_the_defaults_of_the_design() {
        let c = load("", &[]).unwrap();
        let mut expected = Config::default();
        expected.braze.api_key = Some("test-key-123".into());
        assert_eq!(c, expected);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.braze.batch_size, 75);
        assert_eq!(c.server.listen, "127.0.0.1:9464");
    }

    #[test]
    fn snapshot_keys_default_from_the_topics_and_storage_secrets_are_masked() {
        let c = Config::from_toml_str_with(
            "[kafka]\ntopics = [\"t\"]\ndlq_topic = \"t.dlq\"\n\n[snapshot.storage]\n\
             azure_storage_account_name = \"acct\"\n",
            env(&[(
                "SEGMENT_SYNC_SNAPSHOT_STORAGE_AZURE_STORAGE_ACCOUNT_KEY",
                "s3cr3t",
            )]),
            KeyRequirement::Optional,
        )
        .unwrap();
        assert_eq!(c.snapshot.changes_topic(&c.kafka).as_deref(), Some("t"));
        assert_eq!(
            c.snapshot.state_topic_for(&c.kafka).as_deref(),
            Some("t.snapshots")
        );
        assert_eq!(c.snapshot.storage["azure_storage_account_key"], "s3cr3t");
        let shown = c.to_masked_toml();
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("acct"), "{shown}");
        assert!(!format!("{:?}", c.snapshot).contains("s3cr3t"));
        let e = err(
            "[kafka]\ntopics = [\"t\"]\ndlq_topic = \"t.dlq\"\n[snapshot]\nstate_topic = \"t\"\n",
            &[],
        );
        assert!(e.contains("snapshot.state_topic"), "{e}");
        let e = err("[snapshot]\ntransaction_records = 0\n", &[]);
        assert!(e.contains("snapshot.transaction_records"), "{e}");
        // A topic the worker reads with another shape would dead-letter the changes.
        let lytics = "[kafka]\ntopics = [\"t\"]\ndlq_topic = \"t.dlq\"\nformat = \"json\"\n\
                      [source]\nshape = \"lytics\"\n";
        let c = Config::from_toml_str_with(lytics, env(&[]), KeyRequirement::Optional).unwrap();
        let problem = c.snapshot_shape_problem().unwrap();
        assert!(
            problem.contains("snapshot.topic \"t\"") && problem.contains("lytics"),
            "{problem}"
        );
        let e = err(&format!("{lytics}[snapshot]\ntopic = \"t\"\n"), &[]);
        assert!(
            e.contains("snapshot.topic \"t\"") && e.contains("lytics"),
            "{e}"
        );
        let own = format!("{lytics}[snapshot]\ntopic = \"members\"\n");
        let c = Config::from_toml_str_with(&own, env(&[]), KeyRequirement::Optional).unwrap();
        assert_eq!(c.snapshot_shape_problem(), None);
    }

    #[test]
    fn the_example_file_loads_and_matches_the_defaults() {
        let text = include_str!("../segment-sync.example.toml");
        let c = Config::from_toml_str_with(text, env(&[]), KeyRequirement::Optional).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn the_example_file_documents_every_key() {
        let text = include_str!("../segment-sync.example.toml");
        for (section, keys) in &Schema::new().sections {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing"
            );
            for key in keys.keys() {
                assert!(
                    text.contains(&format!("{key} ="))
                        || text.contains(&format!("[{section}.{key}]")),
                    "{section}.{key} is not in the example file"
                );
            }
        }
    }

    #[test]
    fn source_shapes_take_their_keys_and_adobe_needs_an_identity() {
        let e = err(
            "[kafka]\nformat = \"json\"\n[source]\nshape = \"adobe-rtcdp\"\n",
            &[],
        );
        assert!(e.contains("source.external_id or source.email"), "{e}");
        let c = load(
            "[kafka]\nformat = \"json\"\n[source]\nshape = \"adobe-rtcdp\"\nexternal_id = \"/identityMap/crmId/0/id\"\n[source.segments]\n\"5b99\" = \"high_value\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.source.shape, Shape::AdobeRtcdp);
        assert_eq!(c.source.segments["5b99"], "high_value");
        assert_eq!(
            c.source.unmapped(),
            Unmapped::Skip,
            "a table makes skip the default"
        );
        let c = load(
            "[kafka]\nformat = \"json\"\n[source]\nshape = \"lytics\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.source.unmapped(), Unmapped::UseId);
        let e = err(
            "[kafka]\nformat = \"json\"\n[source]\nshape = \"debezium\"\n",
            &[],
        );
        assert!(
            e.contains("source.user_column") && e.contains("source.segment_column"),
            "{e}"
        );
        let e = err("[source]\nshape = \"segment\"\n", &[]);
        assert!(e.contains("kafka.format = \"json\""), "{e}");
        let c = load(
            "[source]\nshape = \"debezium\"\nuser_column = \"u\"\nsegment_column = \"s\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.kafka.format,
            Format::AvroConfluent,
            "Debezium's Avro converter is read"
        );
        let e = err(
            "[kafka]\nformat = \"json\"\n[source]\nshape = \"segment\"\nemail = \"traits.email\"\n",
            &[],
        );
        assert!(e.contains("not a JSON Pointer"), "{e}");
        let c = load(
            "[kafka]\nformat = \"json\"\n",
            &[("SEGMENT_SYNC_SOURCE_SHAPE", "lytics")],
        )
        .unwrap();
        assert_eq!(c.source.shape, Shape::Lytics);
    }

    #[test]
    fn a_full_file_is_read() {
        let text = r#"
            [kafka]
            brokers = "k1:9092,k2:9092"
            group_id = "g"
            topics = ["a", "b"]
            dlq_topic = "a.dlq"
            format = "json"
            schema_registry_url = ""
            [kafka.properties]
            "security.protocol" = "SASL_SSL"
            "session.timeout.ms" = 45000
            [braze]
            endpoint = "rest.fra-01.braze.eu/"
            batch_size = 50
            update_existing_only = true
            [mapping]
            mode = "array"
            exited_value = "null"
            [window]
            linger_ms = 0
            [server]
            listen = "0.0.0.0:9000"
        "#;
        let c = load(text, &[]).unwrap();
        assert_eq!(c.kafka.topics, vec!["a", "b"]);
        assert_eq!(c.kafka.format, Format::Json);
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.kafka.properties["session.timeout.ms"], "45000");
        assert_eq!(c.braze.batch_size, 50);
        assert!(c.braze.update_existing_only);
        assert_eq!(c.mapping.mode, MappingMode::Array);
        assert_eq!(c.mapping.exited_value, ExitedValue::Null);
        assert_eq!(c.window.linger_ms, 0);
        assert_eq!(c.braze_base_url(), "https://rest.fra-01.braze.eu");
    }

    #[test]
    fn unknown_key_names_the_key_and_lists_the_known_ones() {
        let e = err("[braze]\nbatch_sise = 10\n", &[]);
        assert!(e.contains("unknown key `braze.batch_sise`"), "{e}");
        assert!(e.contains("known keys in [braze]"), "{e}");
        assert!(e.contains("did you mean `batch_size`?"), "{e}");
        assert!(e.contains("api_key_file"), "{e}");
        let e = err("[braze]\nfoo = 10\n", &[]);
        assert!(!e.contains("did you mean"), "nothing is close to foo: {e}");
    }

    #[test]
    fn unknown_section_and_top_level_key_are_errors() {
        let e = err("[braz]\nbatch_size = 10\n", &[]);
        assert!(
            e.contains("unknown section [braz]") && e.contains("did you mean [braze]?"),
            "{e}"
        );
        let e = err("brokers = \"x\"\n", &[]);
        assert!(e.contains("[brokers]"), "{e}");
        let e = err("kafka = 3\n", &[]);
        assert!(e.contains("`kafka` must be a table"), "{e}");
    }

    #[test]
    fn the_typo_check_knows_every_field_of_the_structs() {
        // serde lists a struct's fields when it meets an unknown one; the schema must agree.
        for (section, keys) in &Schema::new().sections {
            let text = format!("[{section}]\nzzz_not_a_key = 1\n");
            let serde_msg = toml::from_str::<Config>(&text).unwrap_err().to_string();
            for key in keys.keys() {
                assert!(serde_msg.contains(&format!("`{key}`")), "{section}.{key}");
            }
            let expected = serde_msg.matches('`').count() / 2 - 1;
            assert_eq!(keys.len(), expected, "{section}: {serde_msg}");
        }
    }

    #[test]
    fn syntax_errors_show_line_and_column() {
        let e = err("[kafka]\nbrokers = \n", &[]);
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("column"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err("[braze]\nbatch_size = \"75\"\n", &[]);
        assert!(e.contains("braze.batch_size"), "{e}");
        let e = err("[kafka]\nformat = \"protobuf\"\n", &[]);
        assert!(
            e.contains("kafka.format") && e.contains("avro-confluent"),
            "{e}"
        );
        let e = err("[kafka]\ntopics = \"a\"\n", &[]);
        assert!(e.contains("kafka.topics"), "{e}");
        let e = err("[kafka]\ntopics = [\"a\", 3]\n", &[]);
        assert!(e.starts_with("kafka.topics in "), "{e}");
    }

    #[test]
    fn a_wrong_type_blames_whichever_of_file_and_variable_set_it() {
        let e = err(
            "[braze]\nbatch_size = 10\n",
            &[("SEGMENT_SYNC_BRAZE_BATCH_SIZE", "-1")],
        );
        assert!(
            e.contains("SEGMENT_SYNC_BRAZE_BATCH_SIZE (for braze.batch_size)"),
            "{e}"
        );
        let c = load(
            "[mapping]\nmode = \"bool\"\n",
            &[("SEGMENT_SYNC_MAPPING_MODE", "array")],
        )
        .unwrap();
        assert_eq!(c.mapping.mode, MappingMode::Array, "the variable wins");
    }

    fn problem_of(text: &str) -> String {
        let e = err(text, &[]);
        assert!(
            e.lines().count() == 1,
            "expected exactly one problem, got {e}"
        );
        e
    }

    #[test]
    fn each_bad_value_is_reported_with_its_key_and_fix() {
        let cases: &[(&str, &str, &str)] = &[
            ("[kafka]\nbrokers = \" \"", "kafka.brokers", "host:port"),
            (
                "[kafka]\ngroup_id = \"\"",
                "kafka.group_id",
                "consumer group",
            ),
            ("[kafka]\ntopics = []", "kafka.topics", "at least one"),
            (
                "[kafka]\ntopics = [\"a\", \"\"]",
                "kafka.topics",
                "empty topic name",
            ),
            (
                "[kafka]\ndlq_topic = \"\"",
                "kafka.dlq_topic",
                "dead-letter",
            ),
            (
                "[kafka]\ntopics = [\"a\"]\ndlq_topic = \"a\"",
                "kafka.dlq_topic",
                "separate topic",
            ),
            (
                "[kafka]\nschema_registry_url = \"localhost:8081\"",
                "kafka.schema_registry_url",
                "avro-confluent",
            ),
            (
                "[kafka.properties]\n\"group.id\" = \"x\"",
                "kafka.properties.\"group.id\"",
                "kafka.group_id",
            ),
            (
                "[kafka.properties]\n\"bootstrap.servers\" = \"x\"",
                "bootstrap.servers",
                "kafka.brokers",
            ),
            (
                "[kafka.properties]\n\"enable.auto.commit\" = \"true\"",
                "enable.auto.commit",
                "remove it",
            ),
            (
                "[kafka.properties]\n\"enable.auto.offset.store\" = \"true\"",
                "enable.auto.offset.store",
                "remove it",
            ),
            (
                "[braze]\nendpoint = \"\"",
                "braze.endpoint",
                "REST endpoint",
            ),
            (
                "[braze]\nendpoint = \"ftp://x\"",
                "braze.endpoint",
                "REST endpoint",
            ),
            (
                "[braze]\nbatch_size = 100",
                "braze.batch_size = 100",
                "1 to 75",
            ),
            ("[braze]\nbatch_size = 0", "braze.batch_size = 0", "1 to 75"),
            (
                "[braze]\nmax_in_flight = 0",
                "braze.max_in_flight",
                "1 or more",
            ),
            (
                "[braze]\nrequests_per_second = 0",
                "braze.requests_per_second",
                "1 or more",
            ),
            ("[braze]\ntimeout_ms = 0", "braze.timeout_ms", "1 or more"),
            (
                "[braze]\nexport_requests_per_minute = 0",
                "braze.export_requests_per_minute",
                "1 or more",
            ),
            (
                "[mapping]\nmode = \"array\"\narray_attribute = \"\"",
                "mapping.array_attribute",
                "cdp_segments",
            ),
            (
                "[mapping]\nattribute_prefix = \"$seg_\"",
                "mapping.attribute_prefix",
                "reserves",
            ),
            (
                "[window]\nlinger_ms = 300001",
                "window.linger_ms",
                "0 to 300000",
            ),
            (
                "[window]\nmax_pending_users = 74",
                "window.max_pending_users",
                "braze.batch_size",
            ),
            (
                "[window]\ncommit_interval_ms = 0",
                "window.commit_interval_ms",
                "1 or more",
            ),
            (
                "[window]\nmax_future_ms = 59999",
                "window.max_future_ms",
                "0 to turn the check off",
            ),
            (
                "[server]\nlisten = \"localhost\"",
                "server.listen",
                "ip:port",
            ),
        ];
        for (text, key, fix) in cases {
            let e = problem_of(text);
            assert!(e.contains(key), "{text}: {e}");
            assert!(e.contains(fix), "{text}: {e}");
        }
    }

    #[test]
    fn json_format_needs_no_registry_and_boundaries_are_accepted() {
        let text = "[kafka]\nformat = \"json\"\nschema_registry_url = \"\"\n\
                    [braze]\nbatch_size = 1\n[window]\nlinger_ms = 300000\nmax_pending_users = 1\n";
        let c = load(text, &[]).unwrap();
        assert_eq!(c.braze.batch_size, 1);
    }

    #[test]
    fn restore_records_defaults_to_100000_zero_turns_it_off_and_it_is_bounded() {
        assert_eq!(load("", &[]).unwrap().window.restore_records, 100_000);
        assert_eq!(
            load("[window]\nrestore_records = 0", &[])
                .unwrap()
                .window
                .restore_records,
            0
        );
        let e = load("[window]\nrestore_records = 10000001", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("window.restore_records"), "{e}");
    }

    #[test]
    fn max_future_defaults_to_a_day_and_zero_turns_it_off() {
        assert_eq!(load("", &[]).unwrap().window.max_future_ms, 86_400_000);
        for (text, ms) in [
            ("[window]\nmax_future_ms = 0", 0),
            ("[window]\nmax_future_ms = 60000", 60_000),
        ] {
            assert_eq!(load(text, &[]).unwrap().window.max_future_ms, ms, "{text}");
        }
        let c = load("", &[("SEGMENT_SYNC_WINDOW_MAX_FUTURE_MS", "3600000")]).unwrap();
        assert_eq!(c.window.max_future_ms, 3_600_000);
        let e = err("", &[("SEGMENT_SYNC_WINDOW_MAX_FUTURE_MS", "1000")]);
        assert!(e.contains("window.max_future_ms"), "{e}");
    }

    #[test]
    fn replay_fold_keys_are_read_and_checked() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.replay.fold_memory, 64 << 20);
        assert_eq!(c.replay.spill_dir(), std::env::temp_dir());
        let dir = std::env::temp_dir().display().to_string();
        let c = load(
            &format!("[replay]\nfold_memory = 8388608\nspill_dir = {dir:?}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.replay.fold_memory, 8 << 20);
        assert_eq!(c.replay.spill_dir(), PathBuf::from(&dir));
        let c = load("", &[("SEGMENT_SYNC_REPLAY_FOLD_MEMORY", "1048576")]).unwrap();
        assert_eq!(c.replay.fold_memory, 1 << 20);
        let e = err("[replay]\nfold_memory = 1000\n", &[]);
        assert!(e.contains("replay.fold_memory"), "{e}");
        let e = err("[replay]\nspill_dir = \"/no/such/dir/for/the/fold\"\n", &[]);
        assert!(e.contains("replay.spill_dir"), "{e}");
    }

    #[test]
    fn several_problems_are_all_listed() {
        let e = err("[braze]\nbatch_size = 100\ntimeout_ms = 0\n", &[]);
        assert!(e.starts_with("2 problems"), "{e}");
        assert!(
            e.contains("braze.batch_size") && e.contains("braze.timeout_ms"),
            "{e}"
        );
    }

    #[test]
    fn env_overrides_every_type() {
        let c = load(
            "[kafka]\nbrokers = \"file:9092\"\n",
            &[
                ("SEGMENT_SYNC_KAFKA_BROKERS", "env:9092"),
                ("SEGMENT_SYNC_KAFKA_TOPICS", "t1, t2"),
                ("SEGMENT_SYNC_KAFKA_FORMAT", "json"),
                ("SEGMENT_SYNC_BRAZE_BATCH_SIZE", "20"),
                ("SEGMENT_SYNC_BRAZE_UPDATE_EXISTING_ONLY", "true"),
                ("SEGMENT_SYNC_MAPPING_EXITED_VALUE", "null"),
                ("SEGMENT_SYNC_WINDOW_LINGER_MS", "250"),
                ("SEGMENT_SYNC_SERVER_LISTEN", "0.0.0.0:1234"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "env:9092");
        assert_eq!(c.kafka.topics, vec!["t1", "t2"]);
        assert_eq!(c.kafka.format, Format::Json);
        assert_eq!(c.braze.batch_size, 20);
        assert!(c.braze.update_existing_only);
        assert_eq!(c.mapping.exited_value, ExitedValue::Null);
        assert_eq!(c.window.linger_ms, 250);
        assert_eq!(c.server.listen, "0.0.0.0:1234");
    }

    #[test]
    fn env_overrides_properties_with_dotted_lower_case_names() {
        let c = load(
            "[kafka.properties]\n\"security.protocol\" = \"PLAINTEXT\"\n",
            &[
                ("SEGMENT_SYNC_KAFKA_PROPERTIES_SASL_MECHANISM", "PLAIN"),
                (
                    "SEGMENT_SYNC_KAFKA_PROPERTIES_SECURITY_PROTOCOL",
                    "SASL_SSL",
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.properties["sasl.mechanism"], "PLAIN");
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
        let e = err("", &[("SEGMENT_SYNC_KAFKA_PROPERTIES_GROUP_ID", "x")]);
        assert!(
            e.contains("group.id") && e.contains("kafka.group_id"),
            "{e}"
        );
    }

    #[test]
    fn env_typos_and_bad_values_name_the_variable() {
        let e = err("", &[("SEGMENT_SYNC_BRAZE_BATCH_SISE", "10")]);
        assert!(e.contains("SEGMENT_SYNC_BRAZE_BATCH_SISE"), "{e}");
        assert!(
            e.contains("did you mean SEGMENT_SYNC_BRAZE_BATCH_SIZE?"),
            "{e}"
        );
        assert!(
            !e.contains("SEGMENT_SYNC_KAFKA_BROKERS"),
            "only [braze] is listed: {e}"
        );
        let e = err("", &[("SEGMENT_SYNC_BRAZ_ENDPOINT", "x")]);
        assert!(
            e.contains("did you mean SEGMENT_SYNC_BRAZE_ENDPOINT?"),
            "{e}"
        );
        let e = err("", &[("SEGMENT_SYNC_BRAZE_BATCH_SIZE", "ten")]);
        assert!(
            e.contains("SEGMENT_SYNC_BRAZE_BATCH_SIZE") && e.contains("whole number"),
            "{e}"
        );
        let e = err("", &[("SEGMENT_SYNC_WINDOW_LINGER_MS", "-5")]);
        assert!(e.contains("SEGMENT_SYNC_WINDOW_LINGER_MS"), "{e}");
        let e = err("", &[("SEGMENT_SYNC_BRAZE_UPDATE_EXISTING_ONLY", "yes")]);
        assert!(
            e.contains("SEGMENT_SYNC_BRAZE_UPDATE_EXISTING_ONLY") && e.contains("true or false"),
            "{e}"
        );
        let e = err("", &[("SEGMENT_SYNC_MAPPING_MODE", "bool")]);
        assert!(
            e.contains("SEGMENT_SYNC_MAPPING_MODE") && e.contains("boolean"),
            "{e}"
        );
        let e = err("", &[("SEGMENT_SYNC_BRAZE_API_KEY", "k")]);
        assert!(e.contains(API_KEY_ENV), "{e}");
        let e = err("", &[("SEGMENT_SYNC_KAFKA_PROPERTIES_", "k")]);
        assert!(e.contains("SEGMENT_SYNC_KAFKA_PROPERTIES_"), "{e}");
    }

    #[test]
    fn command_line_and_foreign_variables_are_ignored() {
        let c = load(
            "",
            &[
                ("SEGMENT_SYNC_CONFIG", "/etc/x.toml"),
                ("PATH", "/bin"),
                ("KAFKA_BROKERS", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
    }

    #[test]
    fn api_key_comes_from_env_else_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "  file-key\n").unwrap();
        let text = format!("[braze]\napi_key_file = {:?}\n", file.display().to_string());
        let c = Config::from_toml_str(&text, env(&[])).unwrap();
        assert_eq!(c.braze.api_key.as_deref(), Some("file-key"));
        let c = Config::from_toml_str(&text, env(&[(API_KEY_ENV, "env-key")])).unwrap();
        assert_eq!(c.braze.api_key.as_deref(), Some("env-key"));

        let missing = dir.path().join("nope");
        let text = format!(
            "[braze]\napi_key_file = {:?}\n",
            missing.display().to_string()
        );
        let e = Config::from_toml_str(&text, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("braze.api_key_file") && e.contains("nope"),
            "{e}"
        );

        std::fs::write(&file, "\n").unwrap();
        let text = format!("[braze]\napi_key_file = {:?}\n", file.display().to_string());
        let e = Config::from_toml_str(&text, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("braze.api_key_file") && e.contains("empty"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_key_fails_run_but_not_a_dry_run() {
        let e = Config::from_toml_str("", env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("BRAZE_API_KEY") && e.contains("braze.api_key_file"),
            "{e}"
        );
        let c = Config::from_toml_str_with("", env(&[]), KeyRequirement::Optional).unwrap();
        assert_eq!(c.braze.api_key, None);
        assert!(c.to_masked_toml().contains("(not set)"));
    }

    #[test]
    fn masking_never_shows_the_key_or_a_secret() {
        let text = r#"
            [kafka.properties]
            "sasl.password" = "hunter2-sasl"
            "ssl.key.password" = "hunter2-ssl"
            "sasl.jaas.config" = "hunter2-jaas"
            "sasl.oauthbearer.client.secret" = "hunter2-secret"
            "sasl.oauthbearer.token.endpoint.url" = "hunter2-token"
            "security.protocol" = "SASL_SSL"
        "#;
        let c = Config::from_toml_str(text, env(&[(API_KEY_ENV, "sk-live-abcdef")])).unwrap();
        let shown = c.to_masked_toml();
        assert!(!shown.contains("sk-live-abcdef"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("api_key = \"***\""), "{shown}");
        assert!(shown.contains("\"sasl.password\" = \"***\""), "{shown}");
        assert!(
            shown.contains("SASL_SSL"),
            "non-secrets stay visible: {shown}"
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("sk-live-abcdef") && debug.contains("***"),
            "{debug}"
        );
        // The masked view is itself a valid configuration with the same non-secret values.
        let back = Config::from_toml_str_with(&shown, env(&[]), KeyRequirement::Optional).unwrap();
        assert_eq!(
            back.braze,
            BrazeConfig {
                api_key: None,
                ..c.braze.clone()
            }
        );
        assert_eq!(back.window, c.window);
    }

    #[test]
    fn the_registry_token_comes_from_the_file_or_the_environment_and_is_masked() {
        let from_file = load("[kafka]\nschema_registry_token = \"tok-in-file-77\"\n", &[]).unwrap();
        let from_env = load(
            "",
            &[("SEGMENT_SYNC_KAFKA_SCHEMA_REGISTRY_TOKEN", "tok-in-env-77")],
        )
        .unwrap();
        for (c, token) in [(&from_file, "tok-in-file-77"), (&from_env, "tok-in-env-77")] {
            assert_eq!(
                c.kafka.schema_registry_token.as_ref().map(Secret::expose),
                Some(token)
            );
            let shown = c.to_masked_toml();
            assert!(!shown.contains(token), "{shown}");
            assert!(shown.contains("schema_registry_token = \"***\""), "{shown}");
            let debug = format!("{c:?}");
            assert!(!debug.contains(token), "{debug}");
        }
        let c = load(
            "[kafka]\nschema_registry_token_file = \"/var/run/secrets/registry/token\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.kafka.schema_registry_token_file.as_deref(),
            Some("/var/run/secrets/registry/token")
        );
    }

    #[test]
    fn registry_auth_and_tls_keys_that_contradict_each_other_are_refused() {
        for (text, pairs, says) in [
            (
                "[kafka]\nschema_registry_token = \" \"\n",
                &[][..],
                "kafka.schema_registry_token is empty",
            ),
            (
                "[kafka]\nschema_registry_token = \"t\"\nschema_registry_token_file = \"/t\"\n",
                &[][..],
                "both set",
            ),
            (
                "[kafka]\nschema_registry_url = \"https://KEY:SECRET@r.example.com\"\n",
                &[("SEGMENT_SYNC_KAFKA_SCHEMA_REGISTRY_TOKEN", "t")][..],
                "one Authorization header",
            ),
            (
                "[kafka]\nschema_registry_url = \"https://r.example.com\"\nschema_registry_cert_file = \"/c.pem\"\n",
                &[][..],
                "needs its private key",
            ),
            (
                "[kafka]\nschema_registry_url = \"https://r.example.com\"\nschema_registry_key_file = \"/k.pem\"\n",
                &[][..],
                "set the client certificate",
            ),
            (
                "[kafka]\nschema_registry_ca_file = \"/ca.pem\"\n",
                &[][..],
                "use its https:// URL",
            ),
            (
                "[kafka]\nschema_registry_ca_file = \"\"\n",
                &[][..],
                "kafka.schema_registry_ca_file is empty",
            ),
        ] {
            let e = err(text, pairs);
            assert!(e.contains(says), "{text:?} {pairs:?}: {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
        // TLS and a token together are fine: an https gateway in front of the registry.
        load(
            "[kafka]\nschema_registry_url = \"https://r.example.com\"\nschema_registry_ca_file = \"/ca.pem\"\nschema_registry_cert_file = \"/c.pem\"\nschema_registry_key_file = \"/k.pem\"\nschema_registry_token_file = \"/t\"\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn braze_base_url_accepts_hosts_and_urls() {
        let mut c = Config::default();
        for (endpoint, url) in [
            ("rest.iad-03.braze.com", "https://rest.iad-03.braze.com"),
            (
                "https://rest.fra-01.braze.eu/",
                "https://rest.fra-01.braze.eu",
            ),
            ("http://127.0.0.1:4010", "http://127.0.0.1:4010"),
            ("127.0.0.1:4010//", "https://127.0.0.1:4010"),
        ] {
            c.braze.endpoint = endpoint.into();
            assert_eq!(c.braze_base_url(), url);
            assert!(c.validate().is_ok(), "{endpoint}");
        }
    }

    #[test]
    fn the_loaded_file_prints_masked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment-sync.toml");
        // The key from a file, so that the test holds whatever BRAZE_API_KEY the runner has.
        let key = dir.path().join("key");
        std::fs::write(&key, "k\n").unwrap();
        let key_line = format!("api_key_file = {:?}\n", key.display().to_string());
        std::fs::write(&path, format!("[braze]\nbatch_size = 40\n{key_line}")).unwrap();
        let check_config = |path: &Path| Config::load(path).map(|c| c.to_masked_toml());
        let shown = check_config(&path).unwrap();
        assert!(shown.contains("batch_size = 40"), "{shown}");
        std::fs::write(&path, "[braze]\nbatch_size = 400\n").unwrap();
        let e = check_config(&path).unwrap_err().to_string();
        assert!(e.contains("braze.batch_size = 400"), "{e}");
        let e = check_config(&dir.path().join("absent.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.toml"), "{e}");
    }

    #[test]
    fn a_missing_file_names_the_os_error_once() {
        let path = std::path::PathBuf::from("/nonexistent/segment-sync.toml");
        let e = Config::load(&path).unwrap_err();
        // As main prints it: the message and its sources.
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert!(shown.contains("/nonexistent/segment-sync.toml"), "{shown}");
        assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
    }
}

/// `https://KEY:SECRET@host` → `https://KEY:***@host`: registry credentials may sit in the URL.
fn mask_url_password(url: &str) -> String {
    redact_url(url)
}

/// `url` fit to print: a password becomes `***`, and so does a user name given without one
/// (`https://TOKEN@host`) and the whole user info of a URL that does not parse or that parses
/// with an `@` left in its path (an unencoded `/` in a secret, as Confluent Cloud keys
/// hold, ends the authority early). Without `@` there is no user info to hide.
pub fn redact_url(url: &str) -> String {
    let Some((_, host_part)) = url.rsplit_once('@') else {
        return url.to_string();
    };
    let hidden = || match url.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://***@{host_part}"),
        None => format!("***@{host_part}"),
    };
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return hidden();
    };
    let has_user_info = !parsed.username().is_empty() || parsed.password().is_some();
    let stray_at = parsed.path().contains('@')
        || parsed.query().is_some_and(|q| q.contains('@'))
        || parsed.fragment().is_some_and(|f| f.contains('@'));
    if !has_user_info || stray_at {
        return hidden();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else {
        let _ = parsed.set_username("***");
    }
    parsed.to_string()
}

#[cfg(test)]
mod url_masking_tests {
    use super::*;

    #[test]
    fn check_config_masks_a_password_in_the_registry_url() {
        let text = "[kafka]\nschema_registry_url = \"https://KEY:hunter2@psrc.example.com\"\n";
        let cfg =
            Config::from_toml_str_with(text, Vec::new(), KeyRequirement::Optional).expect("valid");
        let shown = cfg.to_masked_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("https://KEY:***@psrc.example.com"),
            "{shown}"
        );
        assert_eq!(
            mask_url_password("http://127.0.0.1:8081"),
            "http://127.0.0.1:8081"
        );
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn registry_credentials_that_do_not_parse_are_refused_with_the_fix() {
        for url in [
            "https://KEY:s3cr3t/x@psrc.example.com",
            "https://KEY:1234/s3cr3t/x@psrc.example.com",
            "https://KEY:s3cr3t?x@psrc.example.com",
        ] {
            let text = format!("[kafka]\nschema_registry_url = \"{url}\"\n");
            let why = Config::from_toml_str_with(&text, Vec::new(), KeyRequirement::Optional)
                .expect_err(url)
                .to_string();
            assert!(
                why.contains("percent-encode") && leaks(&why).is_empty(),
                "{why}"
            );
        }
        let encoded =
            "[kafka]\nschema_registry_url = \"https://KEY:s3cr3t%2Fx@psrc.example.com\"\n";
        Config::from_toml_str_with(encoded, Vec::new(), KeyRequirement::Optional)
            .expect("encoded credentials");
    }

    const SECRETS: &[&str] = &["hunter2", "s3cr3t/x", "tok3n", "Pa55"];

    fn leaks(text: &str) -> Vec<&'static str> {
        SECRETS
            .iter()
            .copied()
            .filter(|s| text.contains(s))
            .collect()
    }

    #[test]
    fn debug_of_the_configuration_shows_no_secret() {
        let mut c = Config::default();
        c.kafka.schema_registry_url = "https://KEY:hunter2@psrc.example.com".into();
        for (k, v) in [
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "Pa55"),
            ("sasl.oauthbearer.config", "clientSecret=tok3n"),
            ("sasl.username", "visible-user"),
        ] {
            c.kafka.properties.insert(k.into(), v.into());
        }
        let shown = format!("{c:?} {:?}", c.kafka);
        assert!(leaks(&shown).is_empty(), "{shown}");
        assert!(shown.contains("visible-user"), "{shown}");
    }

    #[test]
    fn registry_urls_lose_their_credentials_however_they_are_written() {
        for url in [
            "https://KEY:hunter2@psrc.example.com",
            // An unencoded `/` in the secret: the URL does not parse.
            "https://KEY:s3cr3t/x@psrc.example.com",
            // Digits before the `/`: it parses, with the secret in port and path.
            "https://KEY:1234/s3cr3t/x@psrc.example.com",
            "https://:tok3n@psrc.example.com",
            "https://tok3n@psrc.example.com",
            "https://KEY:Pa55 word@psrc.example.com",
        ] {
            let shown = mask_url_password(url);
            assert!(leaks(&shown).is_empty(), "{url} → {shown}");
            assert!(shown.contains("psrc.example.com"), "{url} → {shown}");
            let text = format!("[kafka]\nschema_registry_url = \"{url}\"\n");
            let shown =
                match Config::from_toml_str_with(&text, Vec::new(), KeyRequirement::Optional) {
                    Ok(c) => c.to_masked_toml(),
                    Err(e) => e.to_string(),
                };
            assert!(leaks(&shown).is_empty(), "{url} → {shown}");
        }
        assert_eq!(
            mask_url_password("http://127.0.0.1:8081/api"),
            "http://127.0.0.1:8081/api"
        );
    }
}
