//! Where writer schemas come from: the Confluent schema registry over HTTP, or memory.
//!
//! The HTTP client is blocking on purpose: decoding runs on a plain thread, and a schema is
//! fetched once per id, so an async client would only add a runtime hop to a rare call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::config::{KafkaConfig, Secret};

/// Why a writer schema could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered 404 with its own "schema not found" (error_code 40403): the
    /// record names a schema that does not exist.
    #[error("schema id {0} is not in the schema registry")]
    NotFound(u32),
    /// A 404 without the registry's "schema not found": the URL reaches something that is
    /// not the registry's schema API (a proxy, a web server, a wrong path prefix). The
    /// deployment's fault, not the record's: the record waits for the URL to be fixed.
    #[error(
        "the schema registry URL looks wrong: {0}; check kafka.schema_registry_url \
         (it must be the registry's base URL, under which /schemas/ids/<id> is served)"
    )]
    WrongUrl(String),
    /// Connection refused, timeout, 5xx, or a refusal that is the deployment's fault (401,
    /// 403, ...): the same request may succeed later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The registry answered, but with something this worker cannot use (a non-Avro schema,
    /// an incompatible or invalid schema on register).
    #[error("schema registry refused: {0}")]
    Rejected(String),
}

/// A source of writer schemas by Confluent schema id.
pub trait SchemaSource: Send + Sync {
    /// The writer schema's JSON text.
    fn fetch(&self, id: u32) -> Result<String, RegistryError>;
}

/// The Confluent schema registry REST API.
///
/// Blocking: call it from a plain thread or `tokio::task::spawn_blocking`, never from an
/// async task (reqwest's blocking client panics there). The HTTP client is created on first
/// use, so building a `RegistryClient` inside a runtime is fine.
pub struct RegistryClient {
    base: String,
    /// From the URL's user info (`https://KEY:SECRET@host`, as Confluent Cloud's registry
    /// wants): sent as HTTP basic auth, kept out of `base` so no message shows it.
    credentials: Option<(String, String)>,
    /// `kafka.schema_registry_token` or `_token_file`: sent as `Authorization: Bearer`.
    bearer: Option<Bearer>,
    /// `kafka.schema_registry_ca_file`: trusted besides the system's roots.
    roots: Vec<reqwest::Certificate>,
    /// `kafka.schema_registry_cert_file` and `_key_file`: the client certificate of mutual TLS.
    identity: Option<reqwest::Identity>,
    timeout: Duration,
    http: OnceLock<Result<reqwest::blocking::Client, String>>,
}

/// Where the bearer token comes from.
enum Bearer {
    Token(Secret),
    /// Read for every request (schemas are fetched once per id, so that is rare): a token
    /// that a sidecar or the kubelet rotates in the file is used from the next request on.
    File(PathBuf),
}

impl Bearer {
    fn token(&self) -> Result<String, String> {
        match self {
            Bearer::Token(t) => Ok(t.expose().trim().to_string()),
            Bearer::File(path) => {
                // The error names the file, never its content.
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the token file: {e}"))?;
                let token = text.trim();
                if token.is_empty() {
                    return Err("the token file is empty".into());
                }
                Ok(token.to_string())
            }
        }
    }
}

/// A `kafka.schema_registry_*` file the worker cannot use: it stops at start rather than
/// holding every record for a registry it can never reach.
#[derive(Debug, thiserror::Error)]
#[error("{key} = {path:?}: {message}")]
pub struct RegistrySetupError {
    pub key: &'static str,
    pub path: String,
    pub message: String,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct SchemaAnswer {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
}

#[derive(serde::Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(serde::Serialize)]
struct RegisterBody<'a> {
    schema: &'a str,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl RegistryClient {
    /// `url` is the registry's base URL, e.g. `http://127.0.0.1:8081`, or with credentials
    /// `https://KEY:SECRET@registry.example.com`.
    pub fn new(url: &str) -> RegistryClient {
        let trimmed = url.trim_end_matches('/');
        let (base, credentials) = match reqwest::Url::parse(trimmed) {
            // A token alone (`https://:TOKEN@host`) is credentials too.
            Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
                let user = percent_decoded(parsed.username());
                let password = percent_decoded(parsed.password().unwrap_or(""));
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
                (
                    parsed.as_str().trim_end_matches('/').to_string(),
                    Some((user, password)),
                )
            }
            // Unparsable: every request fails with an error that prints `base`.
            _ => (redact_url(trimmed), None),
        };
        RegistryClient {
            base,
            credentials,
            bearer: None,
            roots: Vec::new(),
            identity: None,
            timeout: Duration::from_secs(10),
            http: OnceLock::new(),
        }
    }

    /// The client that `kafka.schema_registry_*` describe: URL (with basic auth), bearer
    /// token, CA and client certificate. The files are read and parsed now, so that a wrong
    /// path or a key in the wrong format stops the worker at start with the key's name.
    pub fn from_config(k: &KafkaConfig) -> Result<RegistryClient, RegistrySetupError> {
        let mut client = RegistryClient::new(&k.schema_registry_url);
        let setup = |key: &'static str, path: &str, message: String| RegistrySetupError {
            key,
            path: path.to_string(),
            message,
        };
        let read = |key: &'static str, path: &str| {
            std::fs::read(path).map_err(|e| setup(key, path, format!("cannot read it: {e}")))
        };
        if let Some(token) = &k.schema_registry_token {
            client.bearer = Some(Bearer::Token(token.clone()));
        }
        if let Some(path) = &k.schema_registry_token_file {
            let bearer = Bearer::File(PathBuf::from(path));
            bearer
                .token()
                .map_err(|m| setup("kafka.schema_registry_token_file", path, m))?;
            client.bearer = Some(bearer);
        }
        if let Some(path) = &k.schema_registry_ca_file {
            let key = "kafka.schema_registry_ca_file";
            client.roots = reqwest::Certificate::from_pem_bundle(&read(key, path)?)
                .map_err(|e| setup(key, path, format!("not PEM certificates: {e}")))?;
            if client.roots.is_empty() {
                return Err(setup(key, path, "holds no PEM certificate".into()));
            }
        }
        if let (Some(cert), Some(key_path)) =
            (&k.schema_registry_cert_file, &k.schema_registry_key_file)
        {
            let pem = read("kafka.schema_registry_cert_file", cert)?;
            let key_pem = read("kafka.schema_registry_key_file", key_path)?;
            let key_pem = key_pem.trim_ascii_start();
            // native-tls takes PKCS#8 only; an RSA or EC key would fail with a bare "not
            // PKCS#8", so say how to convert it.
            if !key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----") {
                return Err(setup(
                    "kafka.schema_registry_key_file",
                    key_path,
                    "not an unencrypted PKCS#8 PEM key (\"BEGIN PRIVATE KEY\"); convert it with \
                     openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.pk8.pem"
                        .into(),
                ));
            }
            let identity = reqwest::Identity::from_pkcs8_pem(&pem, key_pem).map_err(|e| {
                setup(
                    "kafka.schema_registry_cert_file",
                    cert,
                    format!("the certificate and key do not make a client identity: {e}"),
                )
            })?;
            client.identity = Some(identity);
        }
        Ok(client)
    }

    fn authorised(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::RequestBuilder, RegistryError> {
        Ok(match (&self.bearer, &self.credentials) {
            // `bearer_auth` marks the header sensitive: HTTP logging leaves it out.
            (Some(bearer), _) => request.bearer_auth(bearer.token().map_err(|m| {
                RegistryError::Unavailable(format!("kafka.schema_registry_token_file: {m}"))
            })?),
            (None, Some((user, password))) => request.basic_auth(user, Some(password)),
            (None, None) => request,
        })
    }

    fn http(&self) -> Result<&reqwest::blocking::Client, RegistryError> {
        let built = self.http.get_or_init(|| {
            let mut builder = reqwest::blocking::Client::builder().timeout(self.timeout);
            for root in &self.roots {
                builder = builder.add_root_certificate(root.clone());
            }
            if let Some(identity) = &self.identity {
                builder = builder.identity(identity.clone());
            }
            builder.build().map_err(|e| e.to_string())
        });
        built
            .as_ref()
            .map_err(|e| RegistryError::Unavailable(format!("cannot build HTTP client: {e}")))
    }

    /// Registers `schema` under `subject` (idempotent on the registry's side) and returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{}/versions", self.base, subject);
        let response = self
            .authorised(self.http()?.post(&url))?
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&RegisterBody { schema })
            .send()
            .map_err(|e| RegistryError::Unavailable(format!("POST {url}: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .map_err(|e| RegistryError::Unavailable(format!("POST {url}: {e}")))?;
        match status.as_u16() {
            200..=299 => serde_json::from_str::<IdAnswer>(&text)
                .map(|a| a.id)
                .map_err(|e| RegistryError::Unavailable(format!("POST {url}: bad answer: {e}"))),
            // Incompatible (409) or invalid (422) schema: retrying will not help.
            409 | 422 => Err(RegistryError::Rejected(format!(
                "POST {url}: {status}: {text}"
            ))),
            _ => Err(RegistryError::Unavailable(format!(
                "POST {url}: {status}: {text}"
            ))),
        }
    }
}

pub use crate::config::redact_url;

/// User info in a URL is percent-encoded (a secret may hold `/` or `@`).
fn percent_decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl SchemaSource for RegistryClient {
    fn fetch(&self, id: u32) -> Result<String, RegistryError> {
        let url = format!("{}/schemas/ids/{}", self.base, id);
        let response = self
            .authorised(self.http()?.get(&url))?
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .map_err(|e| RegistryError::Unavailable(format!("GET {url}: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .map_err(|e| RegistryError::Unavailable(format!("GET {url}: {e}")))?;
        schema_answer(id, &url, status, &text)
    }
}

/// What the registry's answer to `GET {url}` (schema `id`) says: the schema's text or why
/// there is none. Pure, so that it can be fuzzed without a server.
pub(crate) fn schema_answer(
    id: u32,
    url: &str,
    status: u16,
    text: &str,
) -> Result<String, RegistryError> {
    if status == 404 {
        if is_schema_not_found(text) {
            return Err(RegistryError::NotFound(id));
        }
        let shown: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown: String = shown.chars().take(200).collect();
        return Err(RegistryError::WrongUrl(format!(
            "GET {url} answered 404 without the registry's \"schema not found\" \
                 (error_code 40403): {}",
            if shown.is_empty() {
                "an empty body"
            } else {
                &shown
            }
        )));
    }
    if !(200..300).contains(&status) {
        // Anything but 404 is the deployment's fault (auth, proxy, outage), not the record's.
        let status = reqwest::StatusCode::from_u16(status)
            .map_or_else(|_| status.to_string(), |s| s.to_string());
        return Err(RegistryError::Unavailable(format!(
            "GET {url}: {status}: {text}"
        )));
    }
    let answer: SchemaAnswer = serde_json::from_str(text)
        .map_err(|e| RegistryError::Unavailable(format!("GET {url}: bad answer: {e}")))?;
    match answer.schema_type.as_deref() {
        None | Some("AVRO") => Ok(answer.schema),
        Some(other) => Err(RegistryError::Rejected(format!(
            "schema id {id} is a {other} schema, not Avro"
        ))),
    }
}

/// Confluent's answer for an unknown schema id, `{"error_code":40403,...}`, which Karapace,
/// Redpanda and Apicurio's compatibility API give too. A 404 without it comes from
/// something else at that URL.
fn is_schema_not_found(body: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct ErrorAnswer {
        error_code: i64,
    }
    serde_json::from_str::<ErrorAnswer>(body).is_ok_and(|a| a.error_code == 40403)
}

/// An in-process registry for the demo and the tests: ids are handed out from 1.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    schemas: Mutex<HashMap<u32, String>>,
}

impl MemoryRegistry {
    pub fn new() -> MemoryRegistry {
        MemoryRegistry::default()
    }

    /// Stores `schema` and returns its id; the same text always gets the same id.
    pub fn register(&self, schema: &str) -> u32 {
        let mut schemas = self.schemas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, _)) = schemas.iter().find(|(_, s)| s.as_str() == schema) {
            return *id;
        }
        let id = schemas.len() as u32 + 1;
        schemas.insert(id, schema.to_string());
        id
    }
}

impl SchemaSource for MemoryRegistry {
    fn fetch(&self, id: u32) -> Result<String, RegistryError> {
        let schemas = self.schemas.lock().unwrap_or_else(|p| p.into_inner());
        schemas.get(&id).cloned().ok_or(RegistryError::NotFound(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// What `serve_once` saw: the request line, the body, the Authorization header.
    type Seen = (String, String, Option<String>);

    /// Answers one HTTP request with `status` and `body`; returns what it saw.
    fn serve_once(status: &str, body: &str) -> (String, std::thread::JoinHandle<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).expect("request line");
            let mut length = 0;
            let mut authorization = None;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("header");
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().expect("length");
                }
                if line.to_ascii_lowercase().starts_with("authorization:") {
                    authorization = Some(line["authorization:".len()..].trim().to_string());
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).expect("body");
            reader
                .get_mut()
                .write_all(response.as_bytes())
                .expect("answer");
            (
                request_line.trim().to_string(),
                String::from_utf8_lossy(&body).into_owned(),
                authorization,
            )
        });
        (url, handle)
    }

    #[test]
    fn fetch_reads_the_schema_string() {
        let (url, server) = serve_once("200 OK", r#"{"schema":"{\"type\":\"string\"}"}"#);
        let got = RegistryClient::new(&url).fetch(12);
        let (request, _, authorization) = server.join().expect("server");
        assert_eq!(request, "GET /schemas/ids/12 HTTP/1.1");
        assert_eq!(authorization, None);
        assert_eq!(got, Ok(r#"{"type":"string"}"#.to_string()));
    }

    #[test]
    fn credentials_in_the_url_go_as_basic_auth_and_nowhere_else() {
        let (url, server) = serve_once("503 Service Unavailable", "{}");
        let with_key = url.replacen("http://", "http://KEY:s%2Fcret@", 1);
        let client = RegistryClient::new(&with_key);
        let got = client.fetch(7);
        let (request, _, authorization) = server.join().expect("server");
        assert_eq!(request, "GET /schemas/ids/7 HTTP/1.1");
        // base64("KEY:s/cret")
        assert_eq!(authorization.as_deref(), Some("Basic S0VZOnMvY3JldA=="));
        let Err(RegistryError::Unavailable(why)) = got else {
            panic!("{got:?}")
        };
        assert!(
            !why.contains("cret") && !format!("{client:?}").contains("cret"),
            "{why}"
        );
    }

    fn config_for(url: &str) -> KafkaConfig {
        KafkaConfig {
            schema_registry_url: url.to_string(),
            ..KafkaConfig::default()
        }
    }

    /// Everything HTTP and the decoder log from any thread, at every level, for as long as
    /// the test binary runs; `None` when another test installed the global subscriber first.
    fn http_log() -> Option<&'static Mutex<Vec<u8>>> {
        struct Sink(&'static Mutex<Vec<u8>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        static LOG: OnceLock<Option<&'static Mutex<Vec<u8>>>> = OnceLock::new();
        *LOG.get_or_init(|| {
            let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
            // Only the HTTP stack and this module: the rest of the suite stays unslowed.
            let filter = tracing_subscriber::EnvFilter::new(
                "reqwest=trace,hyper=trace,hyper_util=trace,native_tls=trace,segment_sync::decode=trace",
            );
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(move || Sink(buf))
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .ok()
                .map(|()| buf)
        })
    }

    #[test]
    fn a_bearer_token_is_sent_and_never_shown() {
        let token = "tok-Zq8-never-shown";
        let log = http_log();
        let (url, server) = serve_once("401 Unauthorized", r#"{"error_code":40101}"#);
        let mut cfg = config_for(&url);
        cfg.schema_registry_token = Some(Secret::new(token));
        let client = RegistryClient::from_config(&cfg).expect("client");
        let got = client.fetch(3);
        let (request, _, authorization) = server.join().expect("server");
        assert_eq!(request, "GET /schemas/ids/3 HTTP/1.1");
        assert_eq!(authorization, Some(format!("Bearer {token}")));
        // A refusal is the deployment's fault: the record waits, it is not undecodable.
        let Err(e @ RegistryError::Unavailable(_)) = got else {
            panic!("{got:?}")
        };
        for shown in [
            e.to_string(),
            format!("{e:?}"),
            format!("{client:?}"),
            format!("{cfg:?}"),
        ] {
            assert!(!shown.contains(token), "{shown}");
        }
        if let Some(log) = log {
            let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
            assert!(
                text.contains("127.0.0.1"),
                "the HTTP stack logged nothing: {text}"
            );
            assert!(!text.contains(token), "{text}");
        }
    }

    #[test]
    fn a_token_file_is_read_again_for_every_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").expect("write");
        let (url, server) = serve_once("503 Service Unavailable", "{}");
        let mut cfg = config_for(&url);
        cfg.schema_registry_token_file = Some(path.display().to_string());
        let client = RegistryClient::from_config(&cfg).expect("client");
        let _ = client.fetch(1);
        assert_eq!(
            server.join().expect("server").2.as_deref(),
            Some("Bearer first-token")
        );

        // Rotated after the client was made, as the kubelet rotates a mounted Secret: the
        // request carries the file's token as it is then.
        let (url2, server) = serve_once("503 Service Unavailable", "{}");
        let mut cfg2 = cfg.clone();
        cfg2.schema_registry_url = url2;
        let client2 = RegistryClient::from_config(&cfg2).expect("client");
        std::fs::write(&path, "rotated-token").expect("write");
        let _ = client2.fetch(1);
        assert_eq!(
            server.join().expect("server").2.as_deref(),
            Some("Bearer rotated-token")
        );

        // A file that disappears makes records wait, with the key named and no token shown.
        std::fs::remove_file(&path).expect("remove");
        let got = client2.fetch(1);
        let Err(RegistryError::Unavailable(why)) = got else {
            panic!("{got:?}")
        };
        assert!(why.contains("schema_registry_token_file"), "{why}");
    }

    /// A CA, and a certificate it signed for `san` with `usage` ("serverAuth"/"clientAuth"),
    /// as PEM: the PKCS#8 key first, then the certificate.
    mod pki {
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::{PKey, Private};
        use openssl::x509::extension::{
            BasicConstraints, ExtendedKeyUsage, SubjectAlternativeName,
        };
        use openssl::x509::{X509Name, X509};

        pub fn key() -> PKey<Private> {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("curve");
            PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey")
        }

        fn builder(cn: &str, key: &PKey<Private>) -> openssl::x509::X509Builder {
            let mut name = X509Name::builder().expect("name");
            name.append_entry_by_text("CN", cn).expect("cn");
            let name = name.build();
            let mut b = X509::builder().expect("builder");
            b.set_version(2).expect("version");
            let serial = BigNum::from_u32(rand::random::<u32>() >> 1).expect("serial");
            b.set_serial_number(&serial.to_asn1_integer().expect("serial"))
                .expect("serial");
            b.set_subject_name(&name).expect("subject");
            b.set_pubkey(key).expect("pubkey");
            b.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
                .expect("not before");
            b.set_not_after(&Asn1Time::days_from_now(2).expect("time"))
                .expect("not after");
            b
        }

        pub fn ca() -> (X509, PKey<Private>) {
            let key = key();
            let mut b = builder("segment-sync test CA", &key);
            b.set_issuer_name(
                X509Name::builder()
                    .map(|mut n| {
                        n.append_entry_by_text("CN", "segment-sync test CA")
                            .expect("cn");
                        n.build()
                    })
                    .expect("issuer")
                    .as_ref(),
            )
            .expect("issuer");
            b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
                .expect("bc");
            b.sign(&key, MessageDigest::sha256()).expect("sign");
            (b.build(), key)
        }

        pub fn signed(ca: &(X509, PKey<Private>), cn: &str, usage: &str) -> (X509, PKey<Private>) {
            let key = key();
            let mut b = builder(cn, &key);
            b.set_issuer_name(ca.0.subject_name()).expect("issuer");
            let san = SubjectAlternativeName::new()
                .ip("127.0.0.1")
                .build(&b.x509v3_context(Some(&ca.0), None))
                .expect("san");
            b.append_extension(san).expect("san");
            let mut eku = ExtendedKeyUsage::new();
            match usage {
                "serverAuth" => eku.server_auth(),
                _ => eku.client_auth(),
            };
            b.append_extension(eku.build().expect("eku")).expect("eku");
            b.sign(&ca.1, MessageDigest::sha256()).expect("sign");
            (b.build(), key)
        }
    }

    /// A registry that speaks TLS and wants a client certificate signed by `ca`. Answers one
    /// request with a schema; returns the request line, or why the handshake failed.
    fn serve_mtls_once(
        ca: &(
            openssl::x509::X509,
            openssl::pkey::PKey<openssl::pkey::Private>,
        ),
    ) -> (String, std::thread::JoinHandle<Result<String, String>>) {
        use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode};
        let (cert, key) = pki::signed(ca, "registry", "serverAuth");
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).expect("tls");
        acceptor.set_private_key(&key).expect("key");
        acceptor.set_certificate(&cert).expect("cert");
        acceptor
            .cert_store_mut()
            .add_cert(ca.0.clone())
            .expect("ca");
        acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        let acceptor = acceptor.build();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let tls = acceptor.accept(stream).map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(tls);
            let mut request_line = String::new();
            reader
                .read_line(&mut request_line)
                .map_err(|e| e.to_string())?;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).map_err(|e| e.to_string())?;
                if line.trim().is_empty() {
                    break;
                }
            }
            let body = r#"{"schema":"\"string\""}"#;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            reader
                .get_mut()
                .write_all(response.as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(request_line.trim().to_string())
        });
        (url, handle)
    }

    #[test]
    fn the_registrys_ca_and_a_client_certificate_make_mutual_tls() {
        let ca = pki::ca();
        let (client_cert, client_key) = pki::signed(&ca, "segment-sync", "clientAuth");
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: Vec<u8>| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write");
            Some(p.display().to_string())
        };
        let ca_file = write("ca.pem", ca.0.to_pem().expect("pem"));
        let cert_file = write("client.pem", client_cert.to_pem().expect("pem"));
        let key_file = write(
            "client.key",
            client_key.private_key_to_pem_pkcs8().expect("pem"),
        );

        let (url, server) = serve_mtls_once(&ca);
        let cfg = KafkaConfig {
            schema_registry_ca_file: ca_file.clone(),
            schema_registry_cert_file: cert_file,
            schema_registry_key_file: key_file,
            ..config_for(&url)
        };
        let got = RegistryClient::from_config(&cfg).expect("client").fetch(9);
        let seen = server.join().expect("server");
        assert_eq!(seen.as_deref(), Ok("GET /schemas/ids/9 HTTP/1.1"));
        assert_eq!(got, Ok("\"string\"".to_string()));

        // Without the client certificate the registry refuses the handshake: the record
        // waits (the deployment's fault), it is not undecodable.
        let (url, server) = serve_mtls_once(&ca);
        let cfg = KafkaConfig {
            schema_registry_ca_file: ca_file,
            ..config_for(&url)
        };
        let got = RegistryClient::from_config(&cfg).expect("client").fetch(9);
        assert!(server.join().expect("server").is_err());
        assert!(matches!(got, Err(RegistryError::Unavailable(_))), "{got:?}");

        // And without the CA, the registry's certificate is not trusted.
        let (url, server) = serve_mtls_once(&ca);
        let got = RegistryClient::new(&url).fetch(9);
        let _ = server.join();
        assert!(matches!(got, Err(RegistryError::Unavailable(_))), "{got:?}");
    }

    #[test]
    fn unusable_registry_files_stop_the_worker_with_the_key_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p.display().to_string()
        };
        let missing = dir.path().join("missing.pem").display().to_string();
        let empty = file("empty", "  \n");
        let not_pem = file("ca.txt", "hello");
        let rsa = file(
            "rsa.key",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n",
        );
        let cases: Vec<(KafkaConfig, &str, &str)> = vec![
            (
                KafkaConfig {
                    schema_registry_token_file: Some(missing.clone()),
                    ..config_for("https://r.example.com")
                },
                "kafka.schema_registry_token_file",
                "cannot read",
            ),
            (
                KafkaConfig {
                    schema_registry_token_file: Some(empty),
                    ..config_for("https://r.example.com")
                },
                "kafka.schema_registry_token_file",
                "empty",
            ),
            (
                KafkaConfig {
                    schema_registry_ca_file: Some(missing.clone()),
                    ..config_for("https://r.example.com")
                },
                "kafka.schema_registry_ca_file",
                "cannot read",
            ),
            (
                KafkaConfig {
                    schema_registry_ca_file: Some(not_pem),
                    ..config_for("https://r.example.com")
                },
                "kafka.schema_registry_ca_file",
                "certificate",
            ),
            (
                KafkaConfig {
                    schema_registry_cert_file: Some(missing),
                    schema_registry_key_file: Some(rsa.clone()),
                    ..config_for("https://r.example.com")
                },
                "kafka.schema_registry_cert_file",
                "cannot read",
            ),
            (
                KafkaConfig {
                    schema_registry_cert_file: Some(rsa.clone()),
                    schema_registry_key_file: Some(rsa),
                    ..config_for("https://r.example.com")
                },
                "kafka.schema_registry_key_file",
                "openssl pkcs8 -topk8",
            ),
        ];
        for (cfg, key, says) in cases {
            let e = RegistryClient::from_config(&cfg).expect_err(key);
            assert_eq!(e.key, key);
            let text = e.to_string();
            assert!(
                text.starts_with(key) && text.contains(says),
                "{key}: {text}"
            );
        }
    }

    #[test]
    fn a_token_alone_or_an_unparsable_url_never_shows_in_errors() {
        let (url, server) = serve_once("503 Service Unavailable", "{}");
        let client = RegistryClient::new(&url.replacen("http://", "http://:tok3n@", 1));
        let got = client.fetch(7);
        let (_, _, authorization) = server.join().expect("server");
        // base64(":tok3n")
        assert_eq!(authorization.as_deref(), Some("Basic OnRvazNu"));
        let why = got.expect_err("503").to_string();
        assert!(
            !why.contains("tok3n") && !format!("{client:?}").contains("tok3n"),
            "{why}"
        );
        let client = RegistryClient::new("https://KEY:s3cr/et@127.0.0.1:9");
        let why = client.fetch(1).expect_err("unparsable").to_string();
        assert!(
            !why.contains("s3cr") && !format!("{client:?}").contains("s3cr"),
            "{why}"
        );
    }

    #[test]
    fn fetch_404_is_not_found_and_5xx_is_unavailable() {
        let (url, server) = serve_once("404 Not Found", r#"{"error_code":40403}"#);
        assert_eq!(
            RegistryClient::new(&url).fetch(5),
            Err(RegistryError::NotFound(5))
        );
        server.join().expect("server");
        let (url, server) = serve_once("503 Service Unavailable", "{}");
        let got = RegistryClient::new(&url).fetch(5);
        server.join().expect("server");
        assert!(matches!(got, Err(RegistryError::Unavailable(_))), "{got:?}");
    }

    /// What the decoder makes of a fetch error, as `Confluent` maps it.
    fn as_decode_error(e: RegistryError) -> crate::decode::DecodeError {
        match e {
            RegistryError::NotFound(id) => crate::decode::DecodeError::UnknownSchema(id),
            other => crate::decode::DecodeError::Registry(other),
        }
    }

    #[test]
    fn a_404_that_is_not_the_registrys_means_a_wrong_url_and_is_retried() {
        // A proxy's page, a web server's default 404, the registry's own answer for a path it
        // does not serve (a base URL with a stray path), an empty body: none says the schema
        // is missing, so the records must wait for a fix, not go to the dead-letter topic.
        for body in [
            "<html><body><h1>404 Not Found</h1>nginx</body></html>",
            r#"{"error_code":404,"message":"HTTP 404 Not Found"}"#,
            r#"{"error_code":40401,"message":"Subject not found"}"#,
            r#"{"message":"no route"}"#,
            "",
        ] {
            let (url, server) = serve_once("404 Not Found", body);
            let got = RegistryClient::new(&format!("{url}/api")).fetch(5);
            server.join().expect("server");
            let e = got.expect_err(body);
            assert_ne!(e, RegistryError::NotFound(5), "{body}");
            let e = as_decode_error(e);
            assert!(e.is_retryable(), "{body}: {e}");
            let text = e.to_string();
            assert!(
                text.contains("kafka.schema_registry_url") && text.contains("looks wrong"),
                "{text}"
            );
            assert!(text.contains(&format!("{url}/api/schemas/ids/5")), "{text}");
        }
    }

    #[test]
    fn only_the_registrys_schema_not_found_makes_a_record_undecodable() {
        for body in [
            r#"{"error_code":40403,"message":"Schema 5 not found"}"#,
            r#"{"message":"Schema not found","error_code":40403}"#,
        ] {
            let (url, server) = serve_once("404 Not Found", body);
            let got = RegistryClient::new(&url).fetch(5);
            server.join().expect("server");
            assert_eq!(got, Err(RegistryError::NotFound(5)), "{body}");
            assert!(!as_decode_error(RegistryError::NotFound(5)).is_retryable());
        }
    }

    #[test]
    fn register_posts_the_schema_and_returns_its_id() {
        let (url, server) = serve_once("200 OK", r#"{"id":31}"#);
        let got =
            RegistryClient::new(&format!("{url}/")).register("t-value", r#"{"type":"string"}"#);
        let (request, body, _) = server.join().expect("server");
        assert_eq!(got, Ok(31));
        assert_eq!(request, "POST /subjects/t-value/versions HTTP/1.1");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json body");
        assert_eq!(body["schema"], r#"{"type":"string"}"#);
    }

    #[test]
    fn memory_registry_gives_one_id_per_schema() {
        let r = MemoryRegistry::new();
        let a = r.register("\"string\"");
        let b = r.register("\"long\"");
        assert_ne!(a, b);
        assert_eq!(r.register("\"string\""), a);
        assert_eq!(r.fetch(b), Ok("\"long\"".to_string()));
        assert_eq!(r.fetch(99), Err(RegistryError::NotFound(99)));
    }
}
