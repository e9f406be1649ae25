//! The project's own files, for the tests that check what a user reads or deploys.

use std::path::PathBuf;

use serde::Deserialize;
use serde_norway::Value;

use segment_sync::config::{Config, ConfigError, KeyRequirement};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file relative to the crate.
pub fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files in `dir` (relative to the crate) whose names end with one of `exts`, sorted.
pub fn files_in(dir: &str, exts: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| exts.iter().any(|x| n.ends_with(x)))
        .map(|n| if dir == "." { n } else { format!("{dir}/{n}") })
        .collect();
    out.sort();
    out
}

/// Every document of a (multi-document) YAML file, `<<:` merges applied as compose and kubectl
/// apply them; empty documents are skipped.
pub fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}"));
            v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Panics when `var`, which `file` tells the operator to set, is not a variable the worker
/// reads. The value may not suit the key's type; only a name the worker ignores is wrong.
pub fn assert_env_read(file: &str, var: &str) {
    let r = Config::from_toml_str_with(
        "",
        [(var.to_string(), "1".to_string())],
        KeyRequirement::Optional,
    );
    if let Err(e @ ConfigError::UnknownEnv { .. }) = r {
        panic!("{file} names {var}: {e}");
    }
}
