//! Azurite, Microsoft's Azure Storage emulator (Blob service only), for the snapshot tests that
//! read a Customer Insights export the way the CDP writes it: installed from npm by
//! `tests/azurite/fetch.sh` into `.cache/azurite` (pinned version), started on a free loopback
//! port in a scratch folder, killed when dropped, and by the kernel when the test process dies
//! (the child's parent-death signal), also on a failed or killed test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};

use super::procs::{free_port, Proc};

/// The emulator's well-known development account and key (public, in Microsoft's docs).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The Blob service REST version the container request is signed for.
const API_VERSION: &str = "2021-08-06";

pub struct Azurite {
    pub proc: Proc,
    pub port: u16,
    _scratch: tempfile::TempDir,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Azurite {
    /// Installs Azurite if needed, starts it and waits until it answers.
    pub fn start() -> Azurite {
        let root = repo_root();
        let status = Command::new("bash")
            .arg(root.join("tests/azurite/fetch.sh"))
            .status()
            .expect("run tests/azurite/fetch.sh");
        assert!(status.success(), "tests/azurite/fetch.sh failed");
        let dir = std::env::var_os("AZURITE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".cache/azurite"));
        let main = dir.join("node_modules/azurite/dist/src/blob/main.js");
        let scratch = tempfile::tempdir().expect("scratch dir");
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new("node");
            cmd.arg(&main)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(scratch.path())
                .args([
                    "--silent",
                    "--skipApiVersionCheck",
                    "--loose",
                    "--disableTelemetry",
                ]);
            let mut proc = Proc::spawn(&format!("azurite-{port}"), cmd, scratch.path());
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline && proc.exited().is_none() {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Azurite {
                        proc,
                        port,
                        _scratch: scratch,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            last = proc.report();
        }
        panic!("Azurite did not start: {last}");
    }

    /// `AZURITE_BLOB_STORAGE_URL`: where object_store's emulator mode finds it.
    pub fn blob_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `container` (object_store writes blobs but creates no containers), with the
    /// Shared Key authorisation of the development account.
    pub fn create_container(&self, container: &str) {
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n\
             /{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
        );
        let key = openssl::base64::decode_block(KEY).expect("the account key");
        let pkey = openssl::pkey::PKey::hmac(&key).expect("hmac key");
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
        signer.update(to_sign.as_bytes()).unwrap();
        let signature = openssl::base64::encode_block(&signer.sign_to_vec().unwrap());
        let response = reqwest::blocking::Client::new()
            .put(format!(
                "{}/{ACCOUNT}/{container}?restype=container",
                self.blob_url()
            ))
            .header("x-ms-date", date)
            .header("x-ms-version", API_VERSION)
            .header("Authorization", format!("SharedKey {ACCOUNT}:{signature}"))
            .header("Content-Length", "0")
            .send()
            .expect("create the container");
        let status = response.status();
        assert!(
            status.is_success() || status.as_u16() == 409,
            "create container {container}: {status} {}",
            response.text().unwrap_or_default()
        );
    }

    fn store(&self, container: &str) -> MicrosoftAzure {
        // The emulator's path-style URL: the account is the first path segment.
        MicrosoftAzureBuilder::new()
            .with_endpoint(format!("{}/{ACCOUNT}", self.blob_url()))
            .with_allow_http(true)
            .with_account(ACCOUNT)
            .with_access_key(KEY)
            .with_container_name(container)
            .build()
            .expect("an object store on Azurite")
    }

    /// Uploads every file under `local` to `container` at the same relative path.
    pub fn upload_tree(&self, container: &str, local: &Path) {
        let store = self.store(container);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut stack = vec![local.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(local).unwrap();
                let key = StorePath::from_iter(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned()),
                );
                let bytes = std::fs::read(&path).unwrap();
                rt.block_on(store.put(&key, PutPayload::from(bytes)))
                    .unwrap_or_else(|e| panic!("upload {key}: {e}"));
            }
        }
    }

    /// Every blob of `container`.
    pub fn list(&self, container: &str) -> Vec<String> {
        use futures::StreamExt;
        let store = self.store(container);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            store
                .list(None)
                .map(|m| {
                    m.map(|m| m.location.to_string())
                        .unwrap_or_else(|e| e.to_string())
                })
                .collect::<Vec<_>>()
                .await
        })
    }

    /// Removes one blob.
    pub fn delete(&self, container: &str, key: &str) {
        let store = self.store(container);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(store.delete(&StorePath::from(key)))
            .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }
}
