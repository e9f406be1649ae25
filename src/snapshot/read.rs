//! Reading one run of a segment's member list: where it is (a Customer Insights run folder with
//! its `model.json`, the newest run under a table folder, a single CSV or NDJSON file), what it
//! is called and when it ran, and its rows as members. Every refusal names the file and line.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::diff::{By, Member};
use super::model::{Model, UTF8_BOM};
use super::SnapshotError;

/// Which columns identify a member: Braze's `external_id` and, optionally, the email.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    pub id: String,
    pub email: Option<String>,
}

/// One run to read: its name and time, and the files holding its rows.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSource {
    pub name: String,
    /// Epoch milliseconds.
    pub time_ms: Option<i64>,
    pub files: Vec<PathBuf>,
    pub format: FileFormat,
    /// The columns from `model.json`; `None` when the file's first row names them.
    pub columns: Option<Vec<String>>,
    /// The CSV field delimiter (`model.json`'s, else a comma).
    pub delimiter: u8,
    /// Which of `files` `model.json` says start with a header row (`columnHeaders`; a header
    /// is also recognised by the column names). Empty when the model says nothing.
    pub headers: Vec<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Csv,
    Ndjson,
    Parquet,
}

/// Finds the run `from` points at: a run folder, a table folder with `latest`, or one file.
pub fn locate(from: &str, latest: bool) -> Result<RunSource, SnapshotError> {
    if is_url(from) {
        return Err(SnapshotError::Usage(format!(
            "--from {from}: read from a local path or an az://, abfss://, \
             https://<account>.blob.core.windows.net/, s3:// or gs:// URL"
        )));
    }
    let path = Path::new(from);
    let meta = std::fs::metadata(path).map_err(|e| SnapshotError::Refused {
        file: from.to_string(),
        line: 0,
        reason: format!("cannot be read: {e}"),
    })?;
    if meta.is_file() {
        if latest {
            return Err(SnapshotError::Usage(
                "--latest takes a table folder, not a file".into(),
            ));
        }
        return single_file(path);
    }
    let run_dir = if latest {
        newest_run(path)?
    } else {
        path.to_path_buf()
    };
    run_folder(&run_dir)
}

fn is_url(from: &str) -> bool {
    from.contains("://")
}

fn single_file(path: &Path) -> Result<RunSource, SnapshotError> {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "csv" => FileFormat::Csv,
        "ndjson" | "jsonl" | "json" => FileFormat::Ndjson,
        "parquet" => FileFormat::Parquet,
        _ => {
            return Err(SnapshotError::Usage(format!(
                "{name}: a single file must end in .csv, .ndjson, .jsonl, .json or .parquet"
            )))
        }
    };
    let run = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or(name);
    Ok(RunSource {
        name: run,
        time_ms: None,
        files: vec![path.to_path_buf()],
        format,
        columns: None,
        delimiter: b',',
        headers: Vec::new(),
    })
}

/// `<yyyy>/<mm>/<dd>/<HHMM>` as the run's folders, checked for digits of the right width.
fn run_stamp(parts: &[&str]) -> Option<i64> {
    let [y, m, d, hm] = parts else { return None };
    let widths = [(y, 4), (m, 2), (d, 2), (hm, 4)];
    if !widths
        .iter()
        .all(|(s, w)| s.len() == *w && s.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let text = format!("{y}-{m}-{d}T{}:{}:00Z", &hm[..2], &hm[2..]);
    chrono::DateTime::parse_from_rfc3339(&text)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn dir_names(dir: &Path) -> Result<Vec<String>, SnapshotError> {
    let entries = std::fs::read_dir(dir).map_err(|e| refused_io(dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| refused_io(dir, e))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

fn refused_io(path: &Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::Refused {
        file: path.display().to_string(),
        line: 0,
        reason: format!("cannot be read: {e}"),
    }
}

/// The newest `<yyyy>/<mm>/<dd>/<HHMM>` folder under a table folder.
fn newest_run(table: &Path) -> Result<PathBuf, SnapshotError> {
    let mut best: Option<(i64, PathBuf)> = None;
    for y in dir_names(table)? {
        let yp = table.join(&y);
        if !yp.is_dir() {
            continue;
        }
        for m in dir_names(&yp)? {
            let mp = yp.join(&m);
            if !mp.is_dir() {
                continue;
            }
            for d in dir_names(&mp)? {
                let dp = mp.join(&d);
                if !dp.is_dir() {
                    continue;
                }
                for hm in dir_names(&dp)? {
                    let Some(t) = run_stamp(&[&y, &m, &d, &hm]) else {
                        continue;
                    };
                    if best.as_ref().is_none_or(|(b, _)| t > *b) {
                        best = Some((t, dp.join(&hm)));
                    }
                }
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| SnapshotError::Refused {
        file: table.display().to_string(),
        line: 0,
        reason: "no <yyyy>/<mm>/<dd>/<HHMM> run folder under this table folder".into(),
    })
}

/// A Customer Insights run folder: `<export>/<table>/<yyyy>/<mm>/<dd>/<HHMM>`, its columns and
/// partitions from `<export>/model.json`, its files exactly those partitions.
fn run_folder(dir: &Path) -> Result<RunSource, SnapshotError> {
    let shown = dir.display().to_string();
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let n = parts.len();
    let stamp = (n >= 6)
        .then(|| {
            let tail: Vec<&str> = parts[n - 4..].iter().map(String::as_str).collect();
            run_stamp(&tail)
        })
        .flatten();
    let Some(time_ms) = stamp else {
        return Err(SnapshotError::Usage(format!(
            "--from {shown}: not a run folder <export>/<table>/<yyyy>/<mm>/<dd>/<HHMM> (use \
             --latest with a table folder, or name a single .csv/.ndjson file)"
        )));
    };
    let table = parts[n - 5].clone();
    let run_name = parts[n - 4..].join("/");
    let export = dir
        .ancestors()
        .nth(5)
        .ok_or_else(|| SnapshotError::Usage(format!("--from {shown}: no export folder above")))?;
    let model_path = export.join("model.json");
    let model_text = std::fs::read(&model_path).map_err(|e| refused_io(&model_path, e))?;
    let model = Model::parse(&model_text, &model_path.display().to_string())?;
    let entity = model.entity(&table).ok_or_else(|| SnapshotError::Refused {
        file: model_path.display().to_string(),
        line: 0,
        reason: format!("no entity named {table} (the table folder)"),
    })?;
    let run_dir: Vec<&str> = parts[n - 5..].iter().map(String::as_str).collect();
    let listed = entity.partition_files_in(&run_dir);
    if listed.is_empty() {
        return Err(SnapshotError::Refused {
            file: model_path.display().to_string(),
            line: 0,
            reason: format!(
                "lists no partition of the run {table}/{run_name}: the export has moved on or \
                 is still being written; read the run model.json describes"
            ),
        });
    }
    let present: Vec<String> = dir_names(dir)?
        .into_iter()
        .filter(|f| dir.join(f).is_file())
        .collect();
    for file in &listed {
        if !present.contains(file) {
            return Err(SnapshotError::Refused {
                file: dir.join(file).display().to_string(),
                line: 0,
                reason: "listed as a partition in model.json but missing: the run is incomplete"
                    .into(),
            });
        }
    }
    for file in &present {
        if file.to_ascii_lowercase().ends_with(".csv") && !listed.contains(file) {
            return Err(SnapshotError::Refused {
                file: dir.join(file).display().to_string(),
                line: 0,
                reason: "not a partition model.json lists for this run".into(),
            });
        }
    }
    let settings: Vec<_> = listed
        .iter()
        .map(|f| {
            entity
                .csv_settings_of(&run_dir, f)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let mut delimiters = Vec::new();
    for s in &settings {
        let d = s
            .delimiter_byte()
            .map_err(|reason| SnapshotError::Refused {
                file: model_path.display().to_string(),
                line: 0,
                reason: format!("{table}: {reason}"),
            })?;
        if !delimiters.contains(&d) {
            delimiters.push(d);
        }
    }
    let [delimiter] = delimiters[..] else {
        return Err(SnapshotError::Refused {
            file: model_path.display().to_string(),
            line: 0,
            reason: format!("{table}: the partitions of one run state different delimiters"),
        });
    };
    Ok(RunSource {
        name: run_name,
        time_ms: Some(time_ms),
        files: listed.iter().map(|f| dir.join(f)).collect(),
        format: FileFormat::Csv,
        columns: Some(entity.columns()),
        delimiter,
        headers: settings
            .iter()
            .map(|s| s.column_headers == Some(true))
            .collect(),
    })
}

/// What reading a run's rows found besides the members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowCounts {
    pub rows: u64,
    /// Rows without an identity (both columns empty, or holding a tab, newline or NUL).
    pub skipped: u64,
}

/// Reads every file of the run, calling `member` once a row with an identity.
pub fn read_rows(
    run: &RunSource,
    columns: &Columns,
    mut member: impl FnMut(Member) -> Result<(), SnapshotError>,
) -> Result<RowCounts, SnapshotError> {
    let mut counts = RowCounts::default();
    for (i, path) in run.files.iter().enumerate() {
        let header = run.headers.get(i).copied().unwrap_or(false);
        let file = std::fs::File::open(path).map_err(|e| refused_io(path, e))?;
        let shown = path.display().to_string();
        match run.format {
            FileFormat::Csv => read_csv(
                file,
                &shown,
                (run, header),
                columns,
                &mut counts,
                &mut member,
            )?,
            FileFormat::Ndjson => read_ndjson(file, &shown, columns, &mut counts, &mut member)?,
            FileFormat::Parquet => read_parquet(file, &shown, columns, &mut counts, &mut member)?,
        }
    }
    Ok(counts)
}

/// The member of a row given its id and email values; `None` when it has no usable identity.
pub fn member_of(id: Option<&str>, email: Option<&str>) -> Option<Member> {
    let clean = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (id, email) = (clean(id), clean(email));
    let bad = |s: &Option<String>| {
        s.as_ref()
            .is_some_and(|s| s.contains(['\t', '\n', '\r', '\0']))
    };
    if bad(&id) || bad(&email) {
        return None;
    }
    match (id, email) {
        (Some(user), email) => Some(Member {
            user,
            by: By::ExternalId,
            email,
        }),
        (None, Some(email)) => Some(Member {
            user: email.clone(),
            by: By::Email,
            email: Some(email),
        }),
        (None, None) => None,
    }
}

fn column_index(
    names: &[String],
    want: &str,
    file: &str,
    line: usize,
) -> Result<usize, SnapshotError> {
    names
        .iter()
        .position(|n| n.trim().eq_ignore_ascii_case(want))
        .ok_or_else(|| SnapshotError::Refused {
            file: file.to_string(),
            line,
            reason: format!("no column {want}; the columns are {}", names.join(", ")),
        })
}

fn read_csv(
    file: impl Read,
    shown: &str,
    (run, has_header): (&RunSource, bool),
    columns: &Columns,
    counts: &mut RowCounts,
    member: &mut impl FnMut(Member) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let model_columns = run.columns.as_deref();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(run.delimiter)
        // Records end at LF only: with the csv crate's CRLF terminator, a CRLF file's records
        // after the first report the line before their own. A CR before the LF is taken off
        // the last field below.
        .terminator(csv::Terminator::Any(b'\n'))
        .from_reader(file);
    let mut record = csv::StringRecord::new();
    let mut idx: Option<(usize, Option<usize>, usize)> = None;
    if let Some(names) = model_columns {
        let id = column_index(names, &columns.id, shown, 0)?;
        let email = match &columns.email {
            Some(c) => Some(column_index(names, c, shown, 0)?),
            None => None,
        };
        idx = Some((id, email, names.len()));
    }
    let mut first = true;
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            SnapshotError::Refused {
                file: shown.to_string(),
                line,
                reason: format!("not CSV: {e}"),
            }
        })?;
        if !more {
            break;
        }
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let mut fields: Vec<&str> = record.iter().collect();
        if let Some(last) = fields.last_mut() {
            *last = last.strip_suffix('\r').unwrap_or(last);
        }
        // A blank CRLF line: the LF-only terminator leaves it a record of one empty field.
        if fields == [""] {
            continue;
        }
        if first {
            first = false;
            let header = match model_columns {
                // A header row repeats the model's column names; the model may also say
                // there is one whatever it holds.
                Some(names) => {
                    has_header
                        || fields.len() == names.len()
                            && fields
                                .iter()
                                .zip(names)
                                .all(|(f, n)| f.trim().eq_ignore_ascii_case(n))
                }
                None => {
                    let names: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
                    let id = column_index(&names, &columns.id, shown, line)?;
                    let email = match &columns.email {
                        Some(c) => Some(column_index(&names, c, shown, line)?),
                        None => None,
                    };
                    idx = Some((id, email, names.len()));
                    true
                }
            };
            if header {
                continue;
            }
        }
        let Some((id, email, width)) = idx else {
            continue;
        };
        if fields.len() != width {
            return Err(SnapshotError::Refused {
                file: shown.to_string(),
                line,
                reason: format!("{} fields where the columns are {width}", fields.len()),
            });
        }
        counts.rows += 1;
        match member_of(
            fields.get(id).copied(),
            email.and_then(|e| fields.get(e).copied()),
        ) {
            Some(m) => member(m)?,
            None => counts.skipped += 1,
        }
    }
    Ok(())
}

fn json_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read_ndjson(
    file: impl Read,
    shown: &str,
    columns: &Columns,
    counts: &mut RowCounts,
    member: &mut impl FnMut(Member) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let reader = BufReader::with_capacity(1 << 16, file);
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| SnapshotError::Refused {
            file: shown.to_string(),
            line: line_no,
            reason: format!("cannot be read: {e}"),
        })?;
        let line = match i {
            0 => line.strip_prefix(UTF8_BOM).unwrap_or(&line),
            _ => &line,
        };
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
            .map_err(|e| SnapshotError::Refused {
                file: shown.to_string(),
                line: line_no,
                reason: format!("not a JSON object: {e}"),
            })?;
        counts.rows += 1;
        let id = json_text(value.get(&columns.id));
        let email = columns.email.as_ref().and_then(|c| json_text(value.get(c)));
        match member_of(id.as_deref(), email.as_deref()) {
            Some(m) => member(m)?,
            None => counts.skipped += 1,
        }
    }
    Ok(())
}

/// A Parquet file's identity columns, row by row (the record API: one row group decoded at a
/// time, only the two columns projected). A problem names the row as the line.
fn read_parquet(
    file: std::fs::File,
    shown: &str,
    columns: &Columns,
    counts: &mut RowCounts,
    member: &mut impl FnMut(Member) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let refused = |line: usize, e: &dyn std::fmt::Display| SnapshotError::Refused {
        file: shown.to_string(),
        line,
        reason: format!("not readable Parquet: {e}"),
    };
    let reader = SerializedFileReader::new(file).map_err(|e| refused(0, &e))?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .clone();
    let names: Vec<String> = root
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let id = column_index(&names, &columns.id, shown, 0)?;
    let email = match &columns.email {
        Some(c) => Some(column_index(&names, c, shown, 0)?),
        None => None,
    };
    let wanted: Vec<_> = root
        .get_fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == id || Some(*i) == email)
        .map(|(_, f)| f.clone())
        .collect();
    let projection = parquet::schema::types::Type::group_type_builder(root.name())
        .with_fields(wanted)
        .build()
        .map_err(|e| refused(0, &e))?;
    let (id_name, email_name) = (&names[id], email.map(|e| &names[e]));
    let text = |f: &Field| match f {
        Field::Str(s) => Some(s.clone()),
        Field::Bytes(b) => std::str::from_utf8(b.data()).ok().map(str::to_string),
        Field::Int(v) => Some(v.to_string()),
        Field::Long(v) => Some(v.to_string()),
        Field::UInt(v) => Some(v.to_string()),
        Field::ULong(v) => Some(v.to_string()),
        _ => None,
    };
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| refused(0, &e))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| refused(i + 1, &e))?;
        counts.rows += 1;
        let (mut id_value, mut email_value) = (None, None);
        for (name, field) in row.get_column_iter() {
            if name == id_name {
                id_value = text(field);
            } else if Some(name) == email_name {
                email_value = text(field);
            }
        }
        match member_of(id_value.as_deref(), email_value.as_deref()) {
            Some(m) => member(m)?,
            None => counts.skipped += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Columns {
        Columns {
            id: "CustomerId".into(),
            email: Some("PrimaryEmail".into()),
        }
    }

    const MODEL: &str = r#"{"name":"m","version":"1.0","entities":[{"$type":"LocalEntity",
      "name":"Seg","attributes":[{"name":"CustomerId","dataType":"string"},
      {"name":"PrimaryEmail","dataType":"string"}],"partitions":[
      {"name":"Seg_1","location":"https://a.blob.core.windows.net/c/CustomerInsights_9/exp/Seg/2026/12/04/0300/Seg_1.csv"},
      {"name":"Seg_2","location":"https://a.blob.core.windows.net/c/CustomerInsights_9/exp/Seg/2026/12/04/0300/Seg_2.csv"}]}]}"#;

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let export = root.path().join("c/CustomerInsights_9/exp");
        let run = export.join("Seg/2026/12/04/0300");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(export.join("Seg/2026/12/03/0300")).unwrap();
        std::fs::write(export.join("model.json"), MODEL).unwrap();
        std::fs::write(
            run.join("Seg_1.csv"),
            "CustomerId,PrimaryEmail\nu1,a@x.io\n,\n",
        )
        .unwrap();
        std::fs::write(run.join("Seg_2.csv"), "u2,\n,only@x.io\n").unwrap();
        (root, export)
    }

    fn all(run: &RunSource) -> Result<(Vec<Member>, RowCounts), SnapshotError> {
        let mut out = Vec::new();
        let counts = read_rows(run, &cols(), |m| {
            out.push(m);
            Ok(())
        })?;
        Ok((out, counts))
    }

    #[test]
    fn a_run_folder_is_read_with_the_model_columns_and_its_header_skipped() {
        let (_root, export) = tree();
        let run = locate(export.join("Seg").to_str().unwrap(), true).unwrap();
        assert_eq!(run.name, "2026/12/04/0300");
        assert_eq!(run.time_ms, Some(1_796_353_200_000));
        let (members, counts) = all(&run).unwrap();
        let users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(users, ["u1", "u2", "only@x.io"]);
        assert_eq!(members[0].email.as_deref(), Some("a@x.io"));
        assert_eq!(members[2].by, By::Email);
        assert_eq!(
            counts,
            RowCounts {
                rows: 4,
                skipped: 1
            }
        );
    }

    #[test]
    fn a_missing_partition_is_refused_naming_the_file() {
        let (_root, export) = tree();
        let run = export.join("Seg/2026/12/04/0300");
        std::fs::remove_file(run.join("Seg_2.csv")).unwrap();
        match locate(run.to_str().unwrap(), false).unwrap_err() {
            SnapshotError::Refused { file, .. } => assert!(file.ends_with("Seg_2.csv"), "{file}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_run_model_json_does_not_list_is_refused() {
        let (_root, export) = tree();
        let err = locate(export.join("Seg/2026/12/03/0300").to_str().unwrap(), false);
        assert!(matches!(err, Err(SnapshotError::Refused { .. })), "{err:?}");
    }

    #[test]
    fn a_short_row_is_refused_with_file_and_line() {
        let (_root, export) = tree();
        let run = export.join("Seg/2026/12/04/0300");
        std::fs::write(run.join("Seg_2.csv"), "u2,\nu3\n").unwrap();
        let source = locate(run.to_str().unwrap(), false).unwrap();
        match all(&source).unwrap_err() {
            SnapshotError::Refused { file, line, .. } => {
                assert!(file.ends_with("Seg_2.csv"));
                assert_eq!(line, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_parquet_file_is_read_by_its_column_names() {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::writer::SerializedFileWriter;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.parquet");
        let schema = std::sync::Arc::new(
            parquet::schema::parser::parse_message_type(
                "message members { OPTIONAL BYTE_ARRAY CustomerId (UTF8); \
                 OPTIONAL BYTE_ARRAY Name (UTF8); OPTIONAL BYTE_ARRAY PrimaryEmail (UTF8); }",
            )
            .unwrap(),
        );
        let props = std::sync::Arc::new(
            parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build(),
        );
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        // Rows: (u1, Ada, a@x.io), (null, Bob, b@x.io), (null, Cy, null).
        let columns: [(&[&str], &[i16]); 3] = [
            (&["u1"], &[1, 0, 0]),
            (&["Ada", "Bob", "Cy"], &[1, 1, 1]),
            (&["a@x.io", "b@x.io"], &[1, 1, 0]),
        ];
        for (values, defs) in columns {
            let mut col = group.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(defs), None)
                .unwrap();
            col.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();

        let run = locate(path.to_str().unwrap(), false).unwrap();
        assert_eq!(run.format, FileFormat::Parquet);
        let (members, counts) = all(&run).unwrap();
        let users: Vec<(&str, By)> = members.iter().map(|m| (m.user.as_str(), m.by)).collect();
        assert_eq!(users, [("u1", By::ExternalId), ("b@x.io", By::Email)]);
        assert_eq!(
            counts,
            RowCounts {
                rows: 3,
                skipped: 1
            }
        );
        let other = Columns {
            id: "Missing".into(),
            email: None,
        };
        assert!(matches!(
            read_rows(&run, &other, |_| Ok(())),
            Err(SnapshotError::Refused { .. })
        ));
        std::fs::write(&path, b"not parquet").unwrap();
        assert!(matches!(all(&run), Err(SnapshotError::Refused { .. })));
    }

    #[test]
    fn single_csv_and_ndjson_files_name_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("members.csv");
        std::fs::write(&csv, "Name,CustomerId\nAda,u1\nBob,\n").unwrap();
        let run = locate(csv.to_str().unwrap(), false).unwrap();
        assert_eq!(run.time_ms, None);
        let columns = Columns {
            id: "CustomerId".into(),
            email: None,
        };
        let mut users = Vec::new();
        let counts = read_rows(&run, &columns, |m| {
            users.push(m.user);
            Ok(())
        })
        .unwrap();
        assert_eq!(users, ["u1"]);
        assert_eq!(
            counts,
            RowCounts {
                rows: 2,
                skipped: 1
            }
        );

        let nd = dir.path().join("members.ndjson");
        std::fs::write(&nd, "{\"CustomerId\":\"u1\"}\n{\"CustomerId\":7}\n\n{}\n").unwrap();
        let run = locate(nd.to_str().unwrap(), false).unwrap();
        let mut users = Vec::new();
        read_rows(&run, &columns, |m| {
            users.push(m.user);
            Ok(())
        })
        .unwrap();
        assert_eq!(users, ["u1", "7"]);
        std::fs::write(&nd, "{\"CustomerId\":\"u1\"}\nnot json\n").unwrap();
        let err = read_rows(&run, &columns, |_| Ok(())).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Refused { line: 2, .. }),
            "{err:?}"
        );
    }

    /// What .NET writers and spreadsheet tools put in real exports: a byte order mark before
    /// model.json, a CSV and an NDJSON file, CRLF line ends, every field quoted, an id holding
    /// a comma or spaces, and a partition whose file name the model URL-encodes.
    #[test]
    fn byte_order_marks_crlf_quoting_and_encoded_names_are_read_as_written() {
        let root = tempfile::tempdir().unwrap();
        let export = root.path().join("c/CustomerInsights_9/exp");
        let run = export.join("Seg/2026/12/04/0300");
        std::fs::create_dir_all(&run).unwrap();
        let base = "https://a.blob.core.windows.net/c/CustomerInsights_9/exp/Seg/2026/12/04/0300";
        let model = format!(
            "\u{feff}{{\"name\":\"m\",\"version\":\"1.0\",\"entities\":[{{\"$type\":\"LocalEntity\",\
             \"name\":\"Seg\",\"attributes\":[{{\"name\":\"CustomerId\",\"dataType\":\"string\"}},\
             {{\"name\":\"PrimaryEmail\",\"dataType\":\"string\"}}],\"partitions\":[\
             {{\"name\":\"Seg 1\",\"location\":\"{base}/Seg%201.csv\"}},\
             {{\"name\":\"Seg_2\",\"location\":\"{base}/Seg_2.csv\"}}]}}]}}"
        );
        std::fs::write(export.join("model.json"), model).unwrap();
        std::fs::write(
            run.join("Seg 1.csv"),
            "\u{feff}\"CustomerId\",\"PrimaryEmail\"\r\n\"u 1\",\"a@x.io\"\r\n\"u,2\",\"\"\r\n",
        )
        .unwrap();
        std::fs::write(run.join("Seg_2.csv"), "\u{feff}\"u3\",\"\"\r\n").unwrap();
        let source = locate(run.to_str().unwrap(), false).unwrap();
        let (members, counts) = all(&source).unwrap();
        let users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(users, ["u 1", "u,2", "u3"]);
        assert_eq!(counts.rows, 3);

        let nd = root.path().join("members.ndjson");
        std::fs::write(
            &nd,
            "\u{feff}{\"CustomerId\":\"u1\"}\r\n{\"CustomerId\":\"u2\"}\r\n",
        )
        .unwrap();
        let run = locate(nd.to_str().unwrap(), false).unwrap();
        let (members, _) = all(&run).unwrap();
        let users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(users, ["u1", "u2"]);
    }

    /// CDM's `fileFormatSettings` of the partitions: their delimiter, and a header row the
    /// model announces even when its names are not the attributes' (a display name).
    #[test]
    fn the_partitions_csv_settings_in_model_json_are_followed() {
        let root = tempfile::tempdir().unwrap();
        let export = root.path().join("c/CustomerInsights_9/exp");
        let run = export.join("Seg/2026/12/04/0300");
        std::fs::create_dir_all(&run).unwrap();
        let model = |delimiter: &str| {
            format!(
                "{{\"name\":\"m\",\"version\":\"1.0\",\"entities\":[{{\"$type\":\"LocalEntity\",\
                 \"name\":\"Seg\",\"attributes\":[{{\"name\":\"CustomerId\",\"dataType\":\"string\"}},\
                 {{\"name\":\"PrimaryEmail\",\"dataType\":\"string\"}}],\"partitions\":[\
                 {{\"name\":\"Seg_1\",\"location\":\"https://a.dfs.core.windows.net/c/Seg/2026/12/04/0300/Seg_1.csv\",\
                 \"fileFormatSettings\":{{\"$type\":\"CsvFormatSettings\",\"columnHeaders\":true,\
                 \"delimiter\":\"{delimiter}\",\"quoteStyle\":\"QuoteStyle.Csv\",\
                 \"csvStyle\":\"CsvStyle.QuoteAlways\",\"encoding\":\"UTF-8\"}}}},\
                 {{\"name\":\"Seg_2\",\"location\":\"https://a.dfs.core.windows.net/c/Seg/2026/12/04/0300/Seg_2.csv\",\
                 \"fileFormatSettings\":{{\"$type\":\"CsvFormatSettings\",\"columnHeaders\":false,\
                 \"delimiter\":\"{delimiter}\"}}}}]}}]}}"
            )
        };
        std::fs::write(export.join("model.json"), model(";")).unwrap();
        std::fs::write(
            run.join("Seg_1.csv"),
            "\"Customer Id\";\"Email\"\r\n\"u1\";\"a@x.io\"\r\n\"u,2\";\"\"\r\n",
        )
        .unwrap();
        // A partition without a header: its first row is a member.
        std::fs::write(run.join("Seg_2.csv"), "\"u3\";\"\"\r\n").unwrap();
        let source = locate(run.to_str().unwrap(), false).unwrap();
        let (members, counts) = all(&source).unwrap();
        let users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(users, ["u1", "u,2", "u3"]);
        assert_eq!(members[0].email.as_deref(), Some("a@x.io"));
        assert_eq!(counts.rows, 3);

        std::fs::write(export.join("model.json"), model("||")).unwrap();
        match locate(run.to_str().unwrap(), false).unwrap_err() {
            SnapshotError::Refused { file, reason, .. } => {
                assert!(file.ends_with("model.json"), "{file}");
                assert!(reason.contains("delimiter"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Windows exports end lines with CRLF: a refusal still names the row's own line, a blank
    /// line is still skipped, and no CR is left on the last column.
    #[test]
    fn crlf_rows_are_refused_by_their_own_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("members.csv");
        std::fs::write(
            &csv,
            "Name,CustomerId\r\nAda,u1\r\n\r\n\"Bob\",\"u2\"\r\nCy\r\n",
        )
        .unwrap();
        let run = locate(csv.to_str().unwrap(), false).unwrap();
        let columns = Columns {
            id: "CustomerId".into(),
            email: None,
        };
        let mut users = Vec::new();
        let err = read_rows(&run, &columns, |m| {
            users.push(m.user);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(users, ["u1", "u2"]);
        assert!(
            matches!(err, SnapshotError::Refused { line: 5, .. }),
            "{err:?}"
        );
    }
}
