//! The one Workers KV client: `PUT {base}/storage/kv/namespaces/{ns}/values/{name}` with the
//! value as the raw body, the wire format of Cloudflare's KV REST API. The same client writes
//! to Cloudflare (`https://api.cloudflare.com/client/v4/accounts/<account id>`) and to the
//! local copy of that API inside `wrangler dev` (`http://127.0.0.1:<port>/cdn-cgi/explorer/api`).

use std::time::Duration;

use serde::Deserialize;

use crate::config::KvConfig;

/// Why a write did not land. Every kind is retried; `Display` is for logs (no token in it).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// No answer: refused, reset, or timed out.
    #[error("KV API unreachable: {0}")]
    Unreachable(String),
    /// The API answered with an error status or `success: false`.
    #[error("KV API answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The API's error messages, or the start of the body.
        message: String,
    },
}

/// The KV REST API of one namespace.
#[derive(Debug, Clone)]
pub struct KvClient {
    http: reqwest::Client,
    values_url: String,
    token: Option<String>,
}

/// Cloudflare's response envelope.
#[derive(Debug, Deserialize)]
struct Envelope {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
}

#[derive(Debug, Deserialize)]
struct ApiMessage {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

impl KvClient {
    /// A client for the namespace `config` names.
    pub fn new(config: &KvConfig) -> Result<Self, KvError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| KvError::Unreachable(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            values_url: format!(
                "{}/storage/kv/namespaces/{}/values",
                config.api_base, config.namespace_id
            ),
            token: config.api_token.clone(),
        })
    }

    /// Writes `value` under `name`, replacing what was there.
    pub async fn put(&self, name: &str, value: String) -> Result<(), KvError> {
        // Key names are URL-encoded in the path, as Cloudflare asks (`k1:` has a colon).
        let url = format!("{}/{}", self.values_url, percent_encode(name));
        let mut request = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(value);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        let envelope: Option<Envelope> = serde_json::from_slice(&body).ok();
        match envelope {
            Some(envelope) if status.is_success() && envelope.success => Ok(()),
            Some(envelope) => Err(KvError::Refused {
                status: status.as_u16(),
                message: envelope
                    .errors
                    .iter()
                    .map(|e| format!("{} ({})", e.message, e.code))
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
            None => Err(KvError::Refused {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            }),
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Names what went wrong in a request that got no answer (refused connection, timeout, or
/// something else) with its error chain, without the URL (it names the account).
fn unreachable(error: reqwest::Error) -> KvError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "no answer"
    };
    let error = error.without_url();
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    KvError::Unreachable(format!("{kind} ({chain})"))
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn key_names_are_encoded_for_the_path() {
        assert_eq!(percent_encode("k1:ab09"), "k1%3Aab09");
        assert_eq!(percent_encode("a/b ?%"), "a%2Fb%20%3F%25");
    }
}
