//! What every client of the configured Braze endpoint shares, `/users/track`'s and
//! `verify`'s export alike: the API key as an `Authorization` header, the endpoint's base
//! URL, and an HTTP client builder that never follows a redirect and trusts `braze.ca_file`.

use reqwest::header::HeaderValue;

use super::{endpoint, BrazeError};
use crate::config::BrazeConfig;

pub(crate) struct Access {
    /// The key itself, only to cut it out of what Braze (or whatever answers) says.
    pub key: Box<str>,
    /// `Bearer <key>`, marked sensitive so reqwest never prints it either.
    pub auth: HeaderValue,
    /// The endpoint as `https://host` (see `endpoint::normalize`).
    pub base: String,
    /// The settings above; each client adds its pool and timeouts.
    pub http: reqwest::ClientBuilder,
}

impl Access {
    pub(crate) fn from_config(cfg: &BrazeConfig) -> Result<Access, BrazeError> {
        let key = cfg
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(BrazeError::MissingApiKey)?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| BrazeError::InvalidApiKey)?;
        auth.set_sensitive(true);
        let base = endpoint::normalize(&cfg.endpoint)?;
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("segment-sync/", env!("CARGO_PKG_VERSION")))
            // A redirect means a wrong endpoint; following it would turn the POST into a GET.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(file) = &cfg.ca_file {
            let certificates = ca_certificates(file).map_err(|why| BrazeError::CaFile {
                file: file.clone(),
                why,
            })?;
            for certificate in certificates {
                http = http.add_root_certificate(certificate);
            }
        }
        Ok(Access {
            key: key.into(),
            auth,
            base,
            http,
        })
    }
}

/// The CA certificates of a PEM file, or why there are none; for validation and the clients.
pub(crate) fn ca_certificates(file: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot be read ({e})"))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("holds a certificate that does not parse ({e})"))?;
    if certificates.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certificates)
}
