//! A run in an object store (`az://`, `abfss://`, `s3://`, `gs://`) copied to a local staging
//! folder with the same layout, so the one reader of [`super::read`] serves both. The copy
//! streams to disk: a large partition never sits in memory. Credentials and endpoints come
//! from the object store crate's own environment variables (`AZURE_STORAGE_*`, `AWS_*`,
//! `GOOGLE_*`) and `[snapshot.storage]`, which wins.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::ObjectStore;

use super::SnapshotError;

/// Whether `from` names an object store rather than a local path.
pub fn is_remote(from: &str) -> bool {
    [
        "az://", "abfss://", "abfs://", "azure://", "adl://", "s3://", "s3a://", "gs://",
    ]
    .iter()
    .any(|p| from.starts_with(p))
        || is_azure_https(from)
}

/// An Azure storage account's own `https://<account>.blob|dfs.core.windows.net/<container>/…`
/// URL: what the portal shows and `model.json`'s partition locations hold.
fn is_azure_https(from: &str) -> bool {
    reqwest::Url::parse(from).is_ok_and(|url| {
        url.scheme() == "https"
            && url.host_str().is_some_and(|h| {
                h.ends_with(".blob.core.windows.net") || h.ends_with(".dfs.core.windows.net")
            })
    })
}

/// Environment variable prefixes whose variables are the object store's options.
const ENV_PREFIXES: &[&str] = &["AZURE_", "AWS_", "GOOGLE_", "OBJECT_STORE_"];

fn options(storage: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    // Later options win in the builder: the configuration file after the environment.
    out.extend(
        storage
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
    );
    out
}

fn store_error(what: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Refused {
        file: what.to_string(),
        line: 0,
        reason: format!("cannot be read: {e}"),
    }
}

/// A staged copy of a remote run: the local path to read, and how to show local paths as the
/// operator's URLs again.
pub struct Staged {
    pub local: PathBuf,
    root: PathBuf,
    base: String,
}

impl Staged {
    /// Rewrites the staging folder in an error's file name back to the object store URL.
    pub fn blame(&self, e: SnapshotError) -> SnapshotError {
        match e {
            SnapshotError::Refused { file, line, reason } => {
                let root = self.root.display().to_string();
                let file = match file.strip_prefix(&root) {
                    Some(rest) => format!("{}{}", self.base, rest.trim_start_matches('/')),
                    None => file,
                };
                SnapshotError::Refused { file, line, reason }
            }
            other => other,
        }
    }
}

/// A run folder's `<yyyy>/<mm>/<dd>/<HHMM>` as numbers, in the order runs sort.
type Stamp = (u32, u32, u32, u32);

fn run_stamp(parts: &[&str]) -> Option<Stamp> {
    let [y, m, d, hm] = parts else { return None };
    let ok = |s: &str, w: usize| s.len() == w && s.bytes().all(|b| b.is_ascii_digit());
    (ok(y, 4) && ok(m, 2) && ok(d, 2) && ok(hm, 4)).then(|| {
        (
            y.parse().unwrap_or(0),
            m.parse().unwrap_or(0),
            d.parse().unwrap_or(0),
            hm.parse().unwrap_or(0),
        )
    })
}

/// Copies the run `from` names (a run folder with its export's `model.json`, the newest run
/// under a table folder with `latest`, or one file) into `root`.
pub fn stage(
    from: &str,
    latest: bool,
    storage: &BTreeMap<String, String>,
    root: &Path,
) -> Result<Staged, SnapshotError> {
    let url = reqwest::Url::parse(from)
        .map_err(|e| SnapshotError::Usage(format!("--from {from}: not a URL: {e}")))?;
    let (store, store_path) = object_store::parse_url_opts(&url, options(storage))
        .map_err(|e| SnapshotError::Usage(format!("--from {from}: {e}")))?;
    // The object's path is the URL's path for the schemes whose host names the container or
    // bucket (object_store's own parse drops a first segment for az://, which names the
    // container twice in its convention, not in Azure's `az://<container>/<path>`); an
    // account's https URL names the container first, and object_store's parse drops it.
    let path = if url.scheme() == "https" {
        store_path
    } else {
        StorePath::from_url_path(url.path())
            .map_err(|e| SnapshotError::Usage(format!("--from {from}: {e}")))?
    };
    let text = path.as_ref().to_string();
    let trimmed = from.trim_end_matches('/');
    let base = trimmed.strip_suffix(&text).unwrap_or(trimmed).to_string();
    let base = if base.ends_with('/') {
        base
    } else {
        format!("{base}/")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SnapshotError::Usage(format!("cannot start a runtime: {e}")))?;
    let local = rt.block_on(copy(&*store, &path, latest, root, from))?;
    Ok(Staged {
        local,
        root: root.to_path_buf(),
        base,
    })
}

async fn copy(
    store: &dyn ObjectStore,
    path: &StorePath,
    latest: bool,
    root: &Path,
    from: &str,
) -> Result<PathBuf, SnapshotError> {
    let parts: Vec<String> = path.parts().map(|p| p.as_ref().to_string()).collect();
    let is_file = parts.last().is_some_and(|last| {
        let l = last.to_ascii_lowercase();
        [".csv", ".ndjson", ".jsonl", ".json", ".parquet"]
            .iter()
            .any(|e| l.ends_with(e))
    });
    if is_file {
        download(store, path, root, from).await?;
        return Ok(local_of(root, path));
    }
    let run = if latest {
        newest_run(store, path, from).await?
    } else {
        path.clone()
    };
    let run_parts: Vec<String> = run.parts().map(|p| p.as_ref().to_string()).collect();
    if run_parts.len() < 6 {
        return Err(SnapshotError::Usage(format!(
            "--from {from}: not a run folder <export>/<table>/<yyyy>/<mm>/<dd>/<HHMM> (use \
             --latest with a table folder, or name a single file)"
        )));
    }
    let export = StorePath::from_iter(run_parts[..run_parts.len() - 5].iter().map(String::as_str));
    download(store, &export.child("model.json"), root, from).await?;
    let listing = store
        .list_with_delimiter(Some(&run))
        .await
        .map_err(|e| store_error(from, e))?;
    for object in &listing.objects {
        download(store, &object.location, root, from).await?;
    }
    let local = local_of(root, &run);
    std::fs::create_dir_all(&local).map_err(|e| store_error(from, e))?;
    Ok(local)
}

fn local_of(root: &Path, path: &StorePath) -> PathBuf {
    path.parts()
        .fold(root.to_path_buf(), |p, part| p.join(part.as_ref()))
}

async fn newest_run(
    store: &dyn ObjectStore,
    table: &StorePath,
    from: &str,
) -> Result<StorePath, SnapshotError> {
    let depth = table.parts().count();
    let mut listing = store.list(Some(table));
    let mut best: Option<(Stamp, Vec<String>)> = None;
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| store_error(from, e))?;
        let parts: Vec<String> = meta
            .location
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        if parts.len() != depth + 5 {
            continue;
        }
        let stamp: Vec<&str> = parts[depth..depth + 4].iter().map(String::as_str).collect();
        if let Some(s) = run_stamp(&stamp) {
            if best.as_ref().is_none_or(|(b, _)| s > *b) {
                best = Some((s, parts[..depth + 4].to_vec()));
            }
        }
    }
    best.map(|(_, parts)| StorePath::from_iter(parts.iter().map(String::as_str)))
        .ok_or_else(|| SnapshotError::Refused {
            file: from.to_string(),
            line: 0,
            reason: "no <yyyy>/<mm>/<dd>/<HHMM> run folder under this table folder".into(),
        })
}

async fn download(
    store: &dyn ObjectStore,
    path: &StorePath,
    root: &Path,
    from: &str,
) -> Result<(), SnapshotError> {
    let shown = format!("{}: {path}", from);
    let local = local_of(root, path);
    if let Some(dir) = local.parent() {
        std::fs::create_dir_all(dir).map_err(|e| store_error(&shown, e))?;
    }
    let got = match store.get(path).await {
        Ok(got) => got,
        // Absent: the local reader reports it by name (a missing model.json or partition).
        Err(object_store::Error::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(store_error(&shown, e)),
    };
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(&local).map_err(|e| store_error(&shown, e))?);
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| store_error(&shown, e))?;
        file.write_all(&chunk).map_err(|e| store_error(&shown, e))?;
    }
    file.flush().map_err(|e| store_error(&shown, e))
}
