//! Why a Braze client cannot be built. Delivery itself never fails: it retries or rejects.

#[derive(Debug, thiserror::Error)]
pub enum BrazeError {
    #[error(
        "BRAZE_API_KEY is not set: the Braze REST API key is required \
         (set the BRAZE_API_KEY environment variable or braze.api_key_file)"
    )]
    MissingApiKey,
    #[error("the API key from BRAZE_API_KEY contains characters not allowed in an HTTP header")]
    InvalidApiKey,
    #[error("braze.endpoint {endpoint:?} is not usable: {why}")]
    InvalidEndpoint { endpoint: String, why: &'static str },
    #[error("braze.ca_file = {file:?} {why}")]
    CaFile { file: String, why: String },
    // reqwest's message leaves its cause out, so the message spells the chain out itself
    // rather than returning it as a `source()` (see crate::error).
    #[error("cannot build the HTTP client for Braze: {}", crate::error::with_causes(.0))]
    Http(reqwest::Error),
}

crate::error::from_cause!(BrazeError::Http, reqwest::Error);
