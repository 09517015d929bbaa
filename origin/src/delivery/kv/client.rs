//! The one Workers KV client: `PUT {base}/storage/kv/namespaces/{ns}/values/{name}` with the
//! value as the raw body, the wire format of Cloudflare's KV REST API. The same client writes
//! to Cloudflare (`https://api.cloudflare.com/client/v4/accounts/<account id>`) and to the
//! local copy of that API inside `wrangler dev` (`http://127.0.0.1:<port>/cdn-cgi/explorer/api`).
//! Reads (`GET …/values/{name}`, `POST …/bulk/get`) serve the publisher's read-backs and its
//! reconciliation of KV with the database.
//!
//! Writes go one request per key (`PUT …/values/{name}`, the only write `wrangler dev`'s local
//! API has) or many keys per request (`PUT …/bulk`, up to 10,000 pairs and 100 MB: Cloudflare).
//! Every request first takes a token from the client's [`ApiBudget`], and a 429 pauses every
//! request of the client until its `Retry-After`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::KvConfig;
use crate::delivery::kv::budget::{ApiBudget, parse_retry_after};

/// Why a request did not succeed. Every kind is retried; `Display` is for logs and the admin
/// status (no token in it), [`KvError::state`] for the open `/healthz`.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The connection could not be made: nothing was sent, so nothing can land later.
    #[error("KV API unreachable: {0}")]
    Unreachable(String),
    /// Sent, but no answer came (timed out, or the connection dropped): the write may still be
    /// applied, at any later time.
    #[error("KV API gave no answer: {detail}")]
    NoAnswer {
        /// Whether the request timed out (rather than the connection dropping).
        timed_out: bool,
        /// What happened, for logs.
        detail: String,
    },
    /// The API answered with an error status or `success: false`.
    #[error("KV API answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The API's error messages, or the start of the body.
        message: String,
    },
}

impl KvError {
    /// Whether a write that failed this way may still have been applied (or be applied later):
    /// it was sent and got no answer, or a server error (a gateway may answer 5xx while the
    /// write goes on behind it). Such a write is not done: its key is read back later.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Unreachable(_) => false,
            Self::NoAnswer { .. } => true,
            Self::Refused { status, .. } => *status >= 500,
        }
    }

    /// A coarse state, without any detail of the request (for the open `/healthz`):
    /// `unreachable`, `timeout`, `no_answer`, `rate_limited`, `refused` (another 4xx) or
    /// `http_error` (5xx or an answer that is not the API's).
    pub fn state(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::NoAnswer {
                timed_out: true, ..
            } => "timeout",
            Self::NoAnswer { .. } => "no_answer",
            Self::Refused { status: 429, .. } => "rate_limited",
            Self::Refused { status, .. } if (400..500).contains(status) => "refused",
            Self::Refused { .. } => "http_error",
        }
    }
}

/// The KV REST API of one namespace.
#[derive(Debug, Clone)]
pub struct KvClient {
    http: reqwest::Client,
    values_url: String,
    bulk_url: String,
    bulk_get_url: String,
    token: Option<String>,
    budget: Arc<ApiBudget>,
}

/// Cloudflare's response envelope.
#[derive(Debug, Deserialize)]
struct Envelope<T = serde::de::IgnoredAny> {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    #[serde(default = "Option::default")]
    result: Option<T>,
}

/// The `result` of `bulk/get`: each requested name with its value, `null` when absent.
#[derive(Debug, Deserialize)]
struct BulkValues {
    values: HashMap<String, Option<String>>,
}

/// The `result` of a bulk write: the keys it did not write (to be written again).
#[derive(Debug, Deserialize)]
struct BulkWritten {
    #[serde(default)]
    unsuccessful_keys: Vec<String>,
}

/// Cloudflare's error code for a namespace that does not exist.
const NAMESPACE_NOT_FOUND: i64 = 10013;

/// Most names one `bulk/get` request may ask for (Cloudflare's limit).
pub const BULK_GET_MAX: usize = 100;

/// Most pairs one bulk write may carry (Cloudflare's limit).
pub const BULK_PUT_MAX: usize = 10_000;

/// Most bytes one bulk write's body may have: half Cloudflare's 100 MB, for headroom.
pub const BULK_PUT_MAX_BYTES: usize = 50 * 1024 * 1024;

#[derive(Debug, Deserialize)]
struct ApiMessage {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

impl KvClient {
    /// A client for the namespace `config` names, with a request budget of its own
    /// (`KV_API_BUDGET`).
    pub fn new(config: &KvConfig) -> Result<Self, KvError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(16)
            // A redirect would carry the API token to another address: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KvError::Unreachable(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            values_url: format!(
                "{}/storage/kv/namespaces/{}/values",
                config.api_base, config.namespace_id
            ),
            bulk_url: format!(
                "{}/storage/kv/namespaces/{}/bulk",
                config.api_base, config.namespace_id
            ),
            bulk_get_url: format!(
                "{}/storage/kv/namespaces/{}/bulk/get",
                config.api_base, config.namespace_id
            ),
            token: config.api_token.clone(),
            budget: Arc::new(ApiBudget::new(config.api_budget)),
        })
    }

    /// The request budget every request of this client spends from.
    pub fn budget(&self) -> Arc<ApiBudget> {
        self.budget.clone()
    }

    /// Writes many `(name, value)` pairs in one request (`PUT …/bulk`, at most
    /// [`BULK_PUT_MAX`] pairs): the names KV reports it did not write (`unsuccessful_keys`).
    pub async fn put_bulk(&self, pairs: &[(String, String)]) -> Result<Vec<String>, KvError> {
        let body: Vec<serde_json::Value> = pairs
            .iter()
            .map(|(key, value)| serde_json::json!({ "key": key, "value": value }))
            .collect();
        let request = self.http.put(&self.bulk_url).json(&body);
        let (status, body) = self.send(request).await?;
        let written = self.envelope::<BulkWritten>(status, &body)?;
        Ok(written.map(|w| w.unsuccessful_keys).unwrap_or_default())
    }

    /// Writes `value` under `name`, replacing what was there.
    pub async fn put(&self, name: &str, value: String) -> Result<(), KvError> {
        // Key names are URL-encoded in the path, as Cloudflare asks (`k1:` has a colon).
        let url = format!("{}/{}", self.values_url, percent_encode(name));
        let request = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(value);
        let (status, body) = self.send(request).await?;
        self.envelope::<serde::de::IgnoredAny>(status, &body)
            .map(|_| ())
    }

    /// Reads the value under `name`: `None` when KV has none (404 with Cloudflare's error).
    /// The value is returned raw, as it was written.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
        let url = format!("{}/{}", self.values_url, percent_encode(name));
        let (status, body) = self.send(self.http.get(url)).await?;
        if status.is_success() {
            return Ok(Some(body));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            // "No such value" answers 404 (Cloudflare: code 10009, "key not found"); so does a
            // wrong namespace (code 10013), which is a refusal, not an answer about the value.
            let envelope: Option<Envelope> = serde_json::from_slice(&body).ok();
            if !envelope.is_some_and(|e| e.errors.iter().any(|m| m.code == NAMESPACE_NOT_FOUND)) {
                return Ok(None);
            }
        }
        match self.envelope::<serde::de::IgnoredAny>(status, &body) {
            Err(error) => Err(error),
            Ok(_) => Err(KvError::Refused {
                status: status.as_u16(),
                message: "unexpected answer to a read".into(),
            }),
        }
    }

    /// Reads up to [`BULK_GET_MAX`] values in one request (`POST …/bulk/get`, text values):
    /// each name with its value, `None` for a name KV has no value for.
    pub async fn bulk_get(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, Option<String>>, KvError> {
        let request = self.http.post(&self.bulk_get_url).json(&serde_json::json!({
            "keys": names,
            "type": "text",
        }));
        let (status, body) = self.send(request).await?;
        let values = self
            .envelope::<BulkValues>(status, &body)?
            .map(|r| r.values)
            .unwrap_or_default();
        Ok(values)
    }

    /// Sends `request` with the token; the status and the whole body.
    async fn send(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), KvError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        self.budget
            .acquire()
            .await
            .map_err(|_| KvError::Unreachable("shutting down: the request was not sent".into()))?;
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let pause = self.budget.throttled(retry_after);
            tracing::warn!(
                pause_s = pause.as_secs(),
                retry_after = if retry_after.is_some() {
                    "given"
                } else {
                    "absent"
                },
                "KV API rate limit hit (429): every request waits until Retry-After (300 s when absent or unreadable)"
            );
        }
        let body = response.bytes().await.map_err(unreachable)?;
        Ok((status, body.to_vec()))
    }

    /// The `result` of a successful answer in Cloudflare's envelope, or the error it names.
    fn envelope<T: DeserializeOwned>(
        &self,
        status: reqwest::StatusCode,
        body: &[u8],
    ) -> Result<Option<T>, KvError> {
        let envelope: Option<Envelope<T>> = serde_json::from_slice(body).ok();
        match envelope {
            Some(envelope) if status.is_success() && envelope.success => Ok(envelope.result),
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
                // An answer that is not the API's (a proxy's page, a truncated body): its
                // outcome is as unknown as a 5xx's.
                status: if status.is_success() {
                    502
                } else {
                    status.as_u16()
                },
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            }),
        }
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in a key's name.
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A key's name as one path segment.
fn percent_encode(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, NOT_UNRESERVED).to_string()
}

/// Names what went wrong in a request that got no answer (refused connection, timeout, or
/// something else) with its error chain, without the URL (it names the account). A request
/// whose connection could not be made was never sent; any other was, and may still land.
fn unreachable(error: reqwest::Error) -> KvError {
    let failure = describe_failure(error);
    if failure.connect {
        KvError::Unreachable(failure.detail)
    } else {
        KvError::NoAnswer {
            timed_out: failure.timed_out,
            detail: failure.detail,
        }
    }
}

/// A request that got no answer, described for logs: never the URL.
pub(crate) struct RequestFailure {
    /// The connection could not be made: nothing was sent.
    pub(crate) connect: bool,
    /// The request timed out.
    pub(crate) timed_out: bool,
    /// What happened, with the error chain.
    pub(crate) detail: String,
}

/// Describes a failed request: its kind and error chain, without the URL.
pub(crate) fn describe_failure(error: reqwest::Error) -> RequestFailure {
    let (connect, timed_out) = (error.is_connect(), error.is_timeout());
    let error = error.without_url();
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    let detail = if connect {
        format!("cannot connect ({chain})")
    } else {
        let kind = if timed_out { "timed out" } else { "no answer" };
        format!("{kind} ({chain})")
    };
    RequestFailure {
        connect,
        timed_out,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::{KvError, percent_encode};

    #[test]
    fn only_writes_that_may_have_landed_have_an_unknown_outcome() {
        let refused = |status| KvError::Refused {
            status,
            message: String::new(),
        };
        let no_answer = |timed_out| KvError::NoAnswer {
            timed_out,
            detail: String::new(),
        };
        let cases = [
            (KvError::Unreachable(String::new()), false, "unreachable"),
            (no_answer(true), true, "timeout"),
            (no_answer(false), true, "no_answer"),
            (refused(429), false, "rate_limited"),
            (refused(403), false, "refused"),
            (refused(500), true, "http_error"),
            (refused(504), true, "http_error"),
        ];
        for (error, unknown, state) in cases {
            assert_eq!(error.outcome_unknown(), unknown, "{error:?}");
            assert_eq!(error.state(), state, "{error:?}");
        }
    }

    #[test]
    fn key_names_are_encoded_for_the_path() {
        assert_eq!(percent_encode("k1:ab09"), "k1%3Aab09");
        assert_eq!(percent_encode("a/b ?%"), "a%2Fb%20%3F%25");
    }
}
