//! `tracing` set-up for every command: human-readable on a terminal, JSON lines otherwise
//! (what log collectors parse), always on stderr so stdout stays free for command output.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The level when `RUST_LOG` is unset or unusable.
const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. `json: Some(x)` forces the format; `None` picks JSON
/// unless stderr is a terminal. The filter comes from `RUST_LOG` (default `info`).
/// A second call is a no-op, so tests and embedded commands may call it freely.
pub fn init(json: Option<bool>) {
    let terminal = std::io::stderr().is_terminal();
    let (filter, bad_filter) = filter_from(std::env::var("RUST_LOG").ok().as_deref());
    let installed = subscriber(
        json.unwrap_or(!terminal),
        terminal,
        filter,
        BoxMakeWriter::new(std::io::stderr),
    )
    .try_init()
    .is_ok();
    // Said once the subscriber exists, so the warning itself is logged in the chosen format.
    if let (true, Some(why)) = (installed, bad_filter) {
        tracing::warn!("{why}");
    }
}

/// The filter for a `RUST_LOG` value, and why it was replaced by the default if it was.
fn filter_from(spec: Option<&str>) -> (EnvFilter, Option<String>) {
    match spec.map(str::trim).filter(|s| !s.is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(spec) => match EnvFilter::try_new(spec) {
            Ok(filter) => (filter, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                Some(format!(
                    "RUST_LOG={spec:?} is not a valid filter ({e}); logging at {DEFAULT_FILTER}"
                )),
            ),
        },
    }
}

fn subscriber(
    json: bool,
    ansi: bool,
    filter: EnvFilter,
    writer: BoxMakeWriter,
) -> Box<dyn Subscriber + Send + Sync> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        // Flattened so collectors index `partition`, `status`, ... as top-level fields.
        Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        )
    } else {
        Box::new(builder.with_ansi(ansi).finish())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_with(json: bool, spec: Option<&str>) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let sub = subscriber(
            json,
            false,
            filter_from(spec).0,
            BoxMakeWriter::new(move || writer.clone()),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(partition = 3, "debug line");
            tracing::info!(partition = 3, "info line");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_lines_have_top_level_fields_and_default_to_info() {
        let text = log_with(true, None);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["message"], "info line");
        assert_eq!(lines[0]["partition"], 3);
        assert_eq!(lines[0]["level"], "INFO");
    }

    #[test]
    fn human_format_is_not_json_and_rust_log_sets_the_level() {
        let text = log_with(false, Some("debug"));
        assert!(
            text.contains("debug line") && text.contains("info line"),
            "{text}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).is_err());
    }

    #[test]
    fn a_bad_rust_log_falls_back_to_info_and_says_why() {
        let (_, why) = filter_from(Some("segment_sync=loud"));
        assert!(why.unwrap().contains("RUST_LOG"));
        assert!(filter_from(Some("segment_sync=debug,rdkafka=warn"))
            .1
            .is_none());
        let text = log_with(true, Some("segment_sync=loud"));
        assert!(
            text.contains("info line") && !text.contains("debug line"),
            "{text}"
        );
    }
}
