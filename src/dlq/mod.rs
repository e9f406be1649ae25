//! The dead-letter topic: what a dead-letter record holds (`record`), the producer that
//! writes it and reports each acknowledgement (`writer`), and the thread that reads a
//! rejected record back from the log for its copy (`reread`).

mod record;
pub mod reread;
pub mod writer;

pub use record::*;
pub use reread::{RejectedEvents, Rereader, LABEL_GONE};
pub use writer::{DlqOutcome, DlqWriter, DlqWriterError, PendingDlq, LABEL_TOO_LARGE};
