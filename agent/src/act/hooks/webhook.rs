//! The webhook: the event JSON POSTed to an `http://` URL (the agent is built without TLS).
//! Logs name the URL's origin only: a path or user part often holds a secret token.

use std::{io::Read as _, time::Duration};

use ureq::http::Uri;

/// The most of a failed answer's body kept for the log.
const ANSWER_LIMIT: u64 = 4096;

/// Checks a webhook URL: `http://`, with a host.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("webhook must be an http:// URL ({e})"))?;
    match uri.scheme_str() {
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => {}
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => {
            return Err(
                "webhook: https is not supported (the agent is built without TLS); \
                        use an http:// URL, e.g. a relay on this host"
                    .into(),
            );
        }
        _ => return Err("webhook must be an http:// URL".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("webhook: the URL has no host".into());
    }
    Ok(())
}

/// A webhook and the HTTP agent that posts to it.
pub(super) struct Webhook {
    agent: ureq::Agent,
    url: String,
    origin: String,
}

impl Webhook {
    /// Each request is given up after `timeout`; redirects are not followed (an answer
    /// outside 2xx is a failure).
    pub(super) fn new(url: &str, timeout: Duration) -> Webhook {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("infermem/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Webhook {
            agent,
            url: url.to_owned(),
            origin: origin(url),
        }
    }

    /// `http://host:port`, for the log.
    pub(super) fn origin(&self) -> &str {
        &self.origin
    }

    /// POSTs `json`; Ok on a 2xx answer. The error has the start of any other answer.
    pub(super) fn post(&self, json: &[u8]) -> Result<(), String> {
        let origin = &self.origin;
        let mut answer = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(json)
            .map_err(|e| format!("POST to {origin}: {e}"))?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        let mut body = Vec::new();
        let _ = answer
            .body_mut()
            .as_reader()
            .take(ANSWER_LIMIT)
            .read_to_end(&mut body);
        let body = String::from_utf8_lossy(&body);
        Err(format!(
            "POST to {origin} answered {status}: {:?}",
            body.trim()
        ))
    }
}

/// A URL's scheme, host and port, without its user part, path and query.
fn origin(url: &str) -> String {
    let Ok(uri) = url.parse::<Uri>() else {
        return "(a URL that does not parse)".into();
    };
    let host = uri.host().unwrap_or("");
    match uri.port_u16() {
        Some(port) => format!("http://{host}:{port}"),
        None => format!("http://{host}"),
    }
}
