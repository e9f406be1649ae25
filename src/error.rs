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
