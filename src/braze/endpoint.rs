//! Pure: the configured REST endpoint → the base URL requests are sent to. Braze shows the
//! instance as a bare host (`rest.iad-03.braze.com`), so operators paste it either way.

use super::BrazeError;

/// `rest.iad-03.braze.com` → `https://rest.iad-03.braze.com`; `http://` and `https://` URLs are
/// kept (the simulator speaks plain HTTP); trailing slashes are trimmed.
pub fn normalize(endpoint: &str) -> Result<String, BrazeError> {
    let invalid = |why: &'static str| BrazeError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        why,
    };
    let raw = endpoint.trim();
    let lower = raw.to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("https://") {
        ("https://", &raw[8..])
    } else if lower.starts_with("http://") {
        ("http://", &raw[7..])
    } else if raw.contains("://") {
        return Err(invalid("only http:// and https:// are supported"));
    } else {
        ("https://", raw)
    };
    let host = rest.trim_end_matches('/');
    let url = format!("{scheme}{host}");
    if host.is_empty() || host.starts_with('/') {
        return Err(invalid("it names no host"));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(invalid("it contains whitespace"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_gets_https() {
        assert_eq!(
            normalize("rest.iad-03.braze.com").unwrap(),
            "https://rest.iad-03.braze.com"
        );
    }

    #[test]
    fn urls_are_kept_without_trailing_slash() {
        assert_eq!(
            normalize("https://rest.fra-01.braze.eu/").unwrap(),
            "https://rest.fra-01.braze.eu"
        );
        assert_eq!(
            normalize(" http://127.0.0.1:4010// ").unwrap(),
            "http://127.0.0.1:4010"
        );
    }

    #[test]
    fn unusable_endpoints_are_errors_naming_the_endpoint() {
        for bad in ["", "https://", "ftp://x", "rest braze.com"] {
            let err = normalize(bad).unwrap_err().to_string();
            assert!(err.contains("braze.endpoint"), "{bad}: {err}");
        }
    }
}
