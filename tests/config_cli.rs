//! `segment-sync check-config` as an operator runs it: the effective configuration with
//! secrets masked on stdout and exit 0, or the problem on stderr and exit 2.

use std::path::Path;
use std::process::{Command, Output};

fn check_config(path: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segment-sync"));
    cmd.arg("check-config").arg("--config").arg(path);
    // Only what the test sets: the runner's own environment must not leak into the result.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("SEGMENT_SYNC_") || name == "BRAZE_API_KEY" {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run segment-sync")
}

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("segment-sync.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn prints_the_effective_config_with_env_overrides_and_masked_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "[kafka]\nbrokers = \"file:9092\"\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n",
    );
    let out = check_config(
        &path,
        &[
            ("SEGMENT_SYNC_KAFKA_BROKERS", "env:9092"),
            ("SEGMENT_SYNC_BRAZE_BATCH_SIZE", "50"),
            ("SEGMENT_SYNC_KAFKA_PROPERTIES_SASL_MECHANISM", "PLAIN"),
            ("BRAZE_API_KEY", "sk-secret-value"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("brokers = \"env:9092\""), "{stdout}");
    assert!(stdout.contains("batch_size = 50"), "{stdout}");
    assert!(
        stdout.contains("\"sasl.mechanism\" = \"PLAIN\""),
        "{stdout}"
    );
    assert!(stdout.contains("api_key = \"***\""), "{stdout}");
    for secret in ["hunter2", "sk-secret-value"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
}

#[test]
fn runs_without_an_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "");
    let out = check_config(&path, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("(not set)"), "{stdout}");
}

#[test]
fn a_bad_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "[braze]\nbatch_sise = 10\n");
    let out = check_config(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("braze.batch_sise"), "{stderr}");

    let path = write(dir.path(), "[braze]\nbatch_size = 100\n");
    let out = check_config(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("braze.batch_size = 100"), "{stderr}");
}

#[test]
fn a_mistyped_environment_variable_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "");
    let out = check_config(&path, &[("SEGMENT_SYNC_WINDOW_LINGER", "5")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("SEGMENT_SYNC_WINDOW_LINGER"), "{stderr}");
}
