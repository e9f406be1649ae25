//! Pure: the CDM `model.json` that a Customer Insights export writes beside its tables: each
//! table's columns (`entities[].attributes[]`) and the partition files of its last run
//! (`entities[].partitions[].location`).

use serde::Deserialize;

use super::SnapshotError;

/// The UTF-8 byte order mark some writers put before a file's first character.
pub const UTF8_BOM: &str = "\u{feff}";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Model {
    #[serde(default)]
    pub entities: Vec<Entity>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Entity {
    pub name: String,
    #[serde(default)]
    pub attributes: Vec<Attribute>,
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Attribute {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Partition {
    #[serde(default)]
    pub name: String,
    pub location: String,
    /// CDM's `CsvFormatSettings` of the file, when the model states them.
    #[serde(default, rename = "fileFormatSettings")]
    pub format: Option<CsvSettings>,
}

/// How a partition's CSV is written, as far as reading its rows depends on it. Absent fields
/// are CDM's defaults: a comma, and a header row recognised by its column names.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CsvSettings {
    #[serde(default, rename = "columnHeaders")]
    pub column_headers: Option<bool>,
    #[serde(default)]
    pub delimiter: Option<String>,
}

impl CsvSettings {
    /// The delimiter as the one byte a CSV reader takes; an error names what the model says.
    pub fn delimiter_byte(&self) -> Result<u8, String> {
        match self.delimiter.as_deref() {
            None | Some("") => Ok(b','),
            Some(d) if d.len() == 1 && d.is_ascii() => Ok(d.as_bytes()[0]),
            Some(d) => Err(format!(
                "a CSV delimiter {d:?} that is not one ASCII character"
            )),
        }
    }
}

impl Model {
    pub fn parse(text: &[u8], file: &str) -> Result<Model, SnapshotError> {
        // Files written by .NET tools often start with a UTF-8 byte order mark, which JSON
        // parsers refuse as a value.
        let text = text.strip_prefix(UTF8_BOM.as_bytes()).unwrap_or(text);
        serde_json::from_slice(text).map_err(|e| SnapshotError::Refused {
            file: file.to_string(),
            line: e.line(),
            reason: format!("not a CDM model.json: {e}"),
        })
    }

    /// The entity describing the table folder `table` (names compared case-insensitively, as
    /// Customer Insights may capitalise the folder and the entity differently).
    pub fn entity(&self, table: &str) -> Option<&Entity> {
        self.entities
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(table))
    }
}

impl Entity {
    pub fn columns(&self) -> Vec<String> {
        self.attributes.iter().map(|a| a.name.clone()).collect()
    }

    /// The file names of the partitions listed inside the run folder whose path ends with
    /// `run_dir` (`<table>/<yyyy>/<mm>/<dd>/<HHMM>`): a location is a URL of the storage
    /// account, so only the trailing folders are comparable with where the run was read.
    pub fn partition_files_in(&self, run_dir: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = self
            .partitions
            .iter()
            .filter_map(|p| file_in(p, run_dir))
            .collect();
        out.sort();
        out
    }

    /// The CSV settings of the partition `file` of the run folder `run_dir`, when stated.
    pub fn csv_settings_of(&self, run_dir: &[&str], file: &str) -> Option<&CsvSettings> {
        self.partitions
            .iter()
            .find(|p| file_in(p, run_dir).as_deref() == Some(file))
            .and_then(|p| p.format.as_ref())
    }
}

/// The partition's file name when its location lies in the run folder `run_dir`.
fn file_in(p: &Partition, run_dir: &[&str]) -> Option<String> {
    let path = location_path(&p.location);
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (file, dir) = parts.split_last()?;
    let same_dir = dir.len() >= run_dir.len()
        && dir[dir.len() - run_dir.len()..]
            .iter()
            .zip(run_dir)
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
    same_dir.then(|| (*file).to_string())
}

/// The decoded path of a partition location: a URL's path, or the text itself.
fn location_path(location: &str) -> String {
    let path = match reqwest::Url::parse(location) {
        Ok(url) if url.has_host() || url.scheme() == "file" => url.path().to_string(),
        _ => location.to_string(),
    };
    percent_encoding::percent_decode_str(&path)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = r#"{
      "name": "OrbitSegments",
      "version": "1.0",
      "entities": [
        {
          "$type": "LocalEntity",
          "name": "HighValue",
          "attributes": [
            {"name": "CustomerId", "dataType": "string"},
            {"name": "PrimaryEmail", "dataType": "string"}
          ],
          "partitions": [
            {"name": "HighValue_1", "location": "https://acct.dfs.core.windows.net/exports/CustomerInsights_1a2b/braze/HighValue/2026/12/04/0300/HighValue_1.csv"},
            {"name": "HighValue_2", "location": "https://acct.dfs.core.windows.net/exports/CustomerInsights_1a2b/braze/HighValue/2026/12/04/0300/HighValue%5F2.csv"},
            {"name": "old", "location": "https://acct.dfs.core.windows.net/exports/CustomerInsights_1a2b/braze/HighValue/2026/12/03/0300/HighValue_1.csv"}
          ]
        }
      ]
    }"#;

    #[test]
    fn columns_and_the_partitions_of_one_run_folder_are_read() {
        let model = Model::parse(MODEL.as_bytes(), "model.json").unwrap();
        let entity = model.entity("highvalue").unwrap();
        assert_eq!(entity.columns(), ["CustomerId", "PrimaryEmail"]);
        assert_eq!(
            entity.partition_files_in(&["HighValue", "2026", "12", "04", "0300"]),
            ["HighValue_1.csv", "HighValue_2.csv"]
        );
        assert!(entity
            .partition_files_in(&["HighValue", "2026", "12", "05", "0300"])
            .is_empty());
    }

    #[test]
    fn a_file_that_is_not_a_model_is_refused_with_its_line() {
        let err = Model::parse(b"{\n \"entities\": 3\n}", "x/model.json").unwrap_err();
        match err {
            SnapshotError::Refused { file, line, .. } => {
                assert_eq!(file, "x/model.json");
                assert_eq!(line, 2);
            }
            other => panic!("{other:?}"),
        }
    }
}
