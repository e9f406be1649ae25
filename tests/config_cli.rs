//! `segment-sync check-config` as an operator runs it: the effective configuration with
//! secrets masked on stdout and exit 0, or, for whatever `run` would refuse at start, the
//! same problem on stderr and exit 2.

use std::path::Path;
use std::process::{Command, Output};

fn check_config(path: &Path, env: &[(&str, &str)]) -> Output {
    segment_sync_with(&["check-config", "--config"], path, env)
}

/// The binary with `args`, then `path`, and only the environment the test gives.
fn segment_sync_with(args: &[&str], path: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segment-sync"));
    cmd.args(args).arg(path);
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

#[test]
fn without_an_api_key_exits_2_with_the_message_run_gives() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "");
    let out = check_config(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let message = "error: no Braze API key: set BRAZE_API_KEY or braze.api_key_file";
    assert_eq!(stderr.trim_end(), message);

    // `run` refuses the same file at start with the same line and exit code.
    let run = segment_sync_with(&["run", "--config"], &path, &[]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains(message),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // With the key, it passes and says so (masked).
    let out = check_config(&path, &[("BRAZE_API_KEY", "k")]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("api_key = \"***\""));
}

#[test]
fn an_unreadable_key_file_exits_2_like_run() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("absent-key");
    let path = write(
        dir.path(),
        &format!("[braze]\napi_key_file = {:?}\n", key.display().to_string()),
    );
    let out = check_config(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("braze.api_key_file") && stderr.contains("absent-key"),
        "{stderr}"
    );
    let run = segment_sync_with(&["run", "--config"], &path, &[]);
    assert_eq!(String::from_utf8_lossy(&run.stderr), stderr);
}

#[test]
fn a_missing_file_names_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    for command in ["check-config", "run"] {
        let out = segment_sync_with(&[command, "--config"], &path, &[("BRAZE_API_KEY", "k")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        let expected = format!(
            "error: cannot read the configuration file {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(2)
        );
        assert_eq!(stderr.trim_end(), expected, "{command}");
    }
}

#[test]
fn every_option_is_described_in_help() {
    let top = Command::new(env!("CARGO_BIN_EXE_segment-sync"))
        .arg("--help")
        .output()
        .expect("run segment-sync");
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    // Every subcommand the binary lists, so that one added later is held to this too.
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 7, "{top}");
    for command in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_segment-sync"))
            .args([command, "--help"])
            .output()
            .expect("run segment-sync");
        let help = String::from_utf8_lossy(&out.stdout);
        let options = described_options(&help);
        assert!(!options.is_empty(), "{command} --help: {help}");
        for (option, description) in &options {
            // `[default: 3]` and `[env: ...]` are clap's, not a description.
            let mut depth = 0;
            let own: String = description
                .chars()
                .filter(|&c| {
                    depth += i32::from(c == '[') - i32::from(c == ']');
                    depth == 0 && c != ']'
                })
                .collect();
            assert!(
                own.chars().any(|c| c.is_alphabetic()),
                "{command} --help: {option} has no description:\n{help}"
            );
        }
        if command != "demo" && command != "braze-sim" {
            let config = options.iter().find(|(o, _)| o == "--config");
            assert!(
                config.is_some_and(|(_, d)| d.contains("configuration file")),
                "{command} --help: {config:?}"
            );
        }
    }
}

/// Each option of a `--help` text with its description, whether clap puts the description
/// beside the option or (when they are long) on the lines below it.
fn described_options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let lines = help
        .lines()
        .skip_while(|l| !l.starts_with("Options:"))
        .skip(1);
    for line in lines {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            let mut words = trimmed.split_whitespace().peekable();
            let mut option = String::new();
            while let Some(w) = words.peek() {
                if w.starts_with('-') || w.starts_with('<') {
                    if w.starts_with("--") {
                        option = w.trim_end_matches(',').to_string();
                    }
                    words.next();
                } else {
                    break;
                }
            }
            out.push((option, words.collect::<Vec<_>>().join(" ")));
        } else if let Some((_, description)) = out.last_mut() {
            description.push(' ');
            description.push_str(trimmed);
        }
    }
    out
}

#[test]
fn what_run_refuses_before_it_connects_check_config_refuses_alike() {
    let dir = tempfile::tempdir().unwrap();
    // JSON and a free port: `run` gets as far as making its clients.
    let base = "[kafka]\nformat = \"json\"\n[server]\nlisten = \"127.0.0.1:0\"\n";
    let cases = [
        (
            format!("{base}[kafka.properties]\n\"fetch.wait.max.mz\" = \"100\"\n"),
            "k",
            "fetch.wait.max.mz",
        ),
        (
            base.to_string(),
            "line\nbreak",
            "characters not allowed in an HTTP header",
        ),
    ];
    for (text, key, named) in cases {
        let path = write(dir.path(), &text);
        let env = [("BRAZE_API_KEY", key)];
        let out = check_config(&path, &env);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{named}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(named),
            "{stderr}"
        );
        let run = segment_sync_with(&["run", "--config"], &path, &env);
        let run_stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{named}: {run_stderr}");
        assert!(
            run_stderr.lines().any(|l| l == stderr.trim_end()),
            "run said:\n{run_stderr}\ncheck-config said:\n{stderr}"
        );
    }
}
