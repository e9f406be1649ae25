//! TLS to Braze: the simulator behind HTTPS with a self-signed certificate made at test time.
//! With `braze.ca_file` naming the certificate, delivery works; without it, nothing is
//! delivered and readiness names the certificate and the key that fixes it. A `ca_file` that
//! is missing or holds no certificate is refused when the configuration is loaded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_native_tls::native_tls;

use segment_sync::braze::{BrazeClient, ObjectOutcome};
use segment_sync::config::{BrazeConfig, Config, KeyRequirement};
use segment_sync::health::Health;
use segment_sync::metrics::Metrics;
use segment_sync::tools::sim::{self, Faults, SimConfig, SimHandle};

const KEY: &str = "tls-key";

/// A self-signed certificate for 127.0.0.1 and localhost, and its private key, in PEM.
fn self_signed() -> (Vec<u8>, Vec<u8>) {
    let key = PKey::from_rsa(Rsa::generate(2048).expect("rsa key")).expect("key");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "segment-sync test Braze")
        .expect("cn");
    let name = name.build();
    let mut cert = X509::builder().expect("builder");
    cert.set_version(2).expect("v3");
    cert.set_subject_name(&name).expect("subject");
    cert.set_issuer_name(&name).expect("issuer");
    cert.set_pubkey(&key).expect("public key");
    cert.set_not_before(&Asn1Time::days_from_now(0).expect("now"))
        .expect("not before");
    cert.set_not_after(&Asn1Time::days_from_now(2).expect("later"))
        .expect("not after");
    let san = SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .dns("localhost")
        .build(&cert.x509v3_context(None, None))
        .expect("san");
    cert.append_extension(san).expect("extension");
    cert.sign(&key, MessageDigest::sha256()).expect("sign");
    (
        cert.build().to_pem().expect("certificate pem"),
        key.private_key_to_pem_pkcs8().expect("key pem"),
    )
}

/// HTTPS in front of the simulator: TLS ends here and the bytes go on to its plain port.
async fn tls_front(backend: SocketAddr, cert: &[u8], key: &[u8]) -> String {
    let identity = native_tls::Identity::from_pkcs8(cert, key).expect("identity");
    let acceptor = tokio_native_tls::TlsAcceptor::from(
        native_tls::TlsAcceptor::new(identity).expect("acceptor"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listener");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the handshake: nothing to do.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut plain) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    format!("https://127.0.0.1:{}", addr.port())
}

async fn simulator() -> SimHandle {
    let cfg = SimConfig {
        api_key: KEY.into(),
        rate_limit: 0,
        rate_window_secs: 1,
        faults: Faults::default(),
    };
    sim::start(cfg, "127.0.0.1:0".parse().expect("address"))
        .await
        .expect("simulator")
}

fn client(endpoint: &str, ca_file: Option<&Path>) -> (BrazeClient, Arc<Health>) {
    let cfg = BrazeConfig {
        endpoint: endpoint.into(),
        api_key: Some(KEY.into()),
        timeout_ms: 2000,
        ca_file: ca_file.map(|p| p.display().to_string()),
        ..BrazeConfig::default()
    };
    let health = Arc::new(Health::new());
    health.assigned.store(true, Ordering::Relaxed);
    health.consuming.store(true, Ordering::Relaxed);
    let client = BrazeClient::new(&cfg, Arc::new(Metrics::new()), health.clone()).expect("client");
    (client, health)
}

fn objects(ids: &[&str]) -> Vec<Bytes> {
    ids.iter()
        .map(|id| Bytes::from(json!({"external_id": id, "seg_1": true}).to_string()))
        .collect()
}

#[tokio::test]
async fn delivery_over_tls_works_with_braze_ca_file_and_names_it_without() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = self_signed();
    let ca_file = dir.path().join("braze-ca.pem");
    std::fs::write(&ca_file, &cert).expect("write the CA file");
    let sim = simulator().await;
    let endpoint = tls_front(sim.addr, &cert, &key).await;

    let (trusting, health) = client(&endpoint, Some(&ca_file));
    let outcomes = tokio::time::timeout(
        Duration::from_secs(20),
        trusting.deliver(objects(&["tls-1", "tls-2"])),
    )
    .await
    .expect("delivered in time");
    assert_eq!(outcomes, vec![ObjectOutcome::Delivered; 2]);
    assert_eq!(
        sim.state.profiles()["external_id:tls-2"]["seg_1"],
        json!(true)
    );
    assert!(health.readiness().is_ok(), "{:?}", health.readiness());

    // The system's roots alone do not know the certificate.
    let (distrusting, health) = client(&endpoint, None);
    let task = tokio::spawn(async move { distrusting.deliver(objects(&["tls-3"])).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while health.readiness().is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = health
        .readiness()
        .expect_err("not ready without the CA file");
    assert!(
        why.contains("certificate") && why.contains("braze.ca_file"),
        "{why}"
    );
    assert!(!task.is_finished(), "delivery gave up: {why}");
    task.abort();
    assert!(!sim.state.profiles().contains_key("external_id:tls-3"));
}

#[test]
fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "just text\n").expect("write");
    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    for (file, says) in [
        (dir.path().join("absent.pem"), "cannot be read"),
        (not_pem, "holds no PEM certificate"),
        (broken, "does not parse"),
    ] {
        let text = format!("[braze]\nca_file = {:?}\n", file.display().to_string());
        let why = Config::from_toml_str_with(&text, Vec::new(), KeyRequirement::Optional)
            .expect_err("refused")
            .to_string();
        assert!(
            why.contains("braze.ca_file") && why.contains(says) && why.contains("PEM file"),
            "{why}"
        );
    }
    let good = dir.path().join("good.pem");
    std::fs::write(&good, self_signed().0).expect("write");
    let text = format!("[braze]\nca_file = {:?}\n", good.display().to_string());
    let cfg = Config::from_toml_str_with(&text, Vec::new(), KeyRequirement::Optional)
        .expect("a good CA file");
    assert_eq!(cfg.braze.ca_file, Some(good.display().to_string()));
    // The environment sets it as any other key.
    let cfg = Config::from_toml_str_with(
        "",
        vec![(
            "SEGMENT_SYNC_BRAZE_CA_FILE".to_string(),
            good.display().to_string(),
        )],
        KeyRequirement::Optional,
    )
    .expect("from the environment");
    assert!(cfg.braze.ca_file.is_some());
}
