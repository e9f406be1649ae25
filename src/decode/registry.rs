//! Where writer schemas come from: the Confluent schema registry over HTTP, or memory.
//!
//! The HTTP client is blocking on purpose: decoding runs on a plain thread, and a schema is
//! fetched once per id, so an async client would only add a runtime hop to a rare call.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

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
    timeout: Duration,
    http: OnceLock<Result<reqwest::blocking::Client, String>>,
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
            timeout: Duration::from_secs(10),
            http: OnceLock::new(),
        }
    }

    fn authorised(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match &self.credentials {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        }
    }

    fn http(&self) -> Result<&reqwest::blocking::Client, RegistryError> {
        let built = self.http.get_or_init(|| {
            reqwest::blocking::Client::builder()
                .timeout(self.timeout)
                .build()
                .map_err(|e| e.to_string())
        });
        built
            .as_ref()
            .map_err(|e| RegistryError::Unavailable(format!("cannot build HTTP client: {e}")))
    }

    /// Registers `schema` under `subject` (idempotent on the registry's side) and returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{}/versions", self.base, subject);
        let response = self
            .authorised(self.http()?.post(&url))
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
            .authorised(self.http()?.get(&url))
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
