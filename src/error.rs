//! How the library's errors are written: each message names its cause itself, so a cause is
//! never also returned by `source()`. Both at once is what made `error: {:#}` print an OS error
//! twice ("...: No such file or directory (os error 2): No such file or directory (os error 2)").
//! thiserror's `#[from]` and a field named `source` make the cause a `source()`; the macro
//! below gives the `From` conversion without that.

/// `From<$cause>` for a tuple variant `$ty::$variant($cause)`, without making the cause a
/// `source()`: the variant's message already names it.
macro_rules! from_cause {
    ($ty:ident :: $variant:ident, $cause:ty) => {
        impl From<$cause> for $ty {
            fn from(cause: $cause) -> Self {
                $ty::$variant(cause)
            }
        }
    };
}
pub(crate) use from_cause;

/// An error's message followed by those of its sources, for a foreign error (reqwest's) whose
/// own message leaves its cause out.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        // Some causes repeat what the error said already; the reader needs it once.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;

    use crate::decode::DecodeError;
    use crate::dlq::DlqWriterError;
    use crate::pipeline::PipelineError;
    use crate::verify::VerifyError;

    /// As `main` prints an error: its message, then each source's.
    fn shown(error: impl std::error::Error + Send + Sync + 'static) -> String {
        format!("{:#}", anyhow::Error::from(error))
    }

    #[test]
    fn a_cause_is_named_once_however_deep() {
        let kafka = || KafkaError::ClientCreation("no-such-property".into());
        let json = || serde_json::from_str::<u8>("x").unwrap_err();
        let cases = [
            shown(PipelineError::from(DlqWriterError::from(kafka()))),
            shown(VerifyError::from(DlqWriterError::from(kafka()))),
            shown(PipelineError::Kafka {
                context: "creating the consumer",
                error: kafka(),
            }),
        ];
        for text in &cases {
            assert_eq!(text.matches("no-such-property").count(), 1, "{text}");
        }
        for text in [
            shown(PipelineError::from(DecodeError::from(json()))),
            shown(VerifyError::from(DecodeError::from(json()))),
        ] {
            assert_eq!(text.matches("expected value").count(), 1, "{text}");
            assert!(text.starts_with("decoder: invalid JSON event: "), "{text}");
        }
    }

    #[test]
    fn with_causes_spells_out_a_hidden_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::with_causes(&e), "outer: inner");
    }
}
