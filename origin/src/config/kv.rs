//! Workers KV: where and how key records are written (`KV_*`).

use std::time::Duration;

use latchkey_shared::target::UpstreamUrl;

use super::{ConfigError, millis, problem};

/// Cloudflare's limit on API requests per five minutes (per user or token), the most
/// `KV_API_BUDGET` may ask for.
pub const CLOUDFLARE_LIMIT: u32 = 1200;

/// Where and how to write Workers KV through Cloudflare's REST API (or the local copy of it
/// that `wrangler dev` serves).
#[derive(Clone)]
pub struct KvConfig {
    /// The URL before `/storage/kv/namespaces/...`, without a trailing slash.
    pub api_base: String,
    /// The namespace id.
    pub namespace_id: String,
    /// The API token (`Authorization: Bearer`); unset for `wrangler dev`'s local API.
    pub api_token: Option<String>,
    /// `KV_REQUEST_TIMEOUT_MS`: the limit on one KV request.
    pub request_timeout: Duration,
    /// `KV_RETRY_MAX_MS`: the longest wait between retries.
    pub retry_max: Duration,
    /// `KV_VERIFY_DELAY_MS`: how long after a write with an unknown outcome (timeout, dropped
    /// connection, 5xx) its key is read back from KV, so that a late-applied stale write is
    /// found and overwritten.
    pub verify_delay: Duration,
    /// `KV_RECONCILE_INTERVAL_S`: how often KV is compared with the database in full (`None`
    /// for `0`: never).
    pub reconcile_interval: Option<Duration>,
    /// `KV_WRITE_MODE`: one bulk request per batch of changes, or one request per key.
    pub write_mode: WriteMode,
    /// `KV_API_BUDGET`: API requests per five minutes (`None`: unlimited, for `wrangler dev`'s
    /// local API).
    pub api_budget: Option<u32>,
}

/// How the publisher writes KV (`KV_WRITE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `PUT …/bulk`: up to 10,000 keys per request (Cloudflare).
    Bulk,
    /// `PUT …/values/{name}`: one request per key (`wrangler dev`'s local API has no bulk write).
    PerKey,
}

/// The path of `wrangler dev`'s local copy of the KV API.
const LOCAL_API_PATH: &str = "/cdn-cgi/explorer/api";

impl std::fmt::Debug for KvConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvConfig")
            .field("api_base", &self.api_base)
            .field("namespace_id", &self.namespace_id)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl KvConfig {
    /// Reads the KV settings alone (for `origin sync`, which needs no admin token).
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    pub(super) fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let var = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let (api_base, namespace_id) = match (var("KV_API_BASE"), var("KV_NAMESPACE_ID")) {
            (None, None) => return Ok(None),
            (Some(base), Some(ns)) => (base, ns),
            (None, Some(_)) => {
                return Err(problem("KV_API_BASE", "is required with KV_NAMESPACE_ID"));
            }
            (Some(_), None) => {
                return Err(problem("KV_NAMESPACE_ID", "is required with KV_API_BASE"));
            }
        };
        // https, except to a loopback address (the local KV API of `wrangler dev`): the API
        // token must never cross the network in the clear.
        let api_base = UpstreamUrl::parse(&api_base)
            .map_err(|e| {
                problem(
                    "KV_API_BASE",
                    format!(
                        "{e}, such as https://api.cloudflare.com/client/v4/accounts/<account id>"
                    ),
                )
            })?
            .base()
            .to_owned();
        if !namespace_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(problem(
                "KV_NAMESPACE_ID",
                "must be letters, digits and dashes",
            ));
        }
        let millis = |name: &'static str, default: u64| millis(&var, name, 10..=600_000, default);
        let api_base = api_base.trim_end_matches('/').to_owned();
        let local = api_base.ends_with(LOCAL_API_PATH);
        let write_mode = match var("KV_WRITE_MODE").as_deref() {
            None | Some("auto") if local => WriteMode::PerKey,
            None | Some("auto" | "bulk") => WriteMode::Bulk,
            Some("per_key") => WriteMode::PerKey,
            Some(other) => {
                return Err(problem(
                    "KV_WRITE_MODE",
                    format!("{other:?} is not auto, bulk or per_key"),
                ));
            }
        };
        let api_budget = match var("KV_API_BUDGET").as_deref() {
            None if local => None,
            None => Some(1000),
            Some("unlimited") => None,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (10..=CLOUDFLARE_LIMIT).contains(&n) => Some(n),
                _ => {
                    return Err(problem(
                        "KV_API_BUDGET",
                        format!(
                            "{v:?} is not a number of requests per five minutes from 10 to 1200 (Cloudflare's limit), or unlimited"
                        ),
                    ));
                }
            },
        };
        Ok(Some(Self {
            api_base,
            write_mode,
            api_budget,
            namespace_id,
            api_token: var("KV_API_TOKEN"),
            request_timeout: millis("KV_REQUEST_TIMEOUT_MS", 10_000)?,
            retry_max: millis("KV_RETRY_MAX_MS", 10_000)?,
            verify_delay: millis("KV_VERIFY_DELAY_MS", 90_000)?,
            reconcile_interval: match var("KV_RECONCILE_INTERVAL_S") {
                None => Some(Duration::from_secs(3600)),
                Some(v) => match v.parse::<u64>() {
                    Ok(0) => None,
                    Ok(s) if s <= 604_800 => Some(Duration::from_secs(s)),
                    _ => {
                        return Err(problem(
                            "KV_RECONCILE_INTERVAL_S",
                            format!("{v:?} is not a number of seconds from 0 (off) to 604800"),
                        ));
                    }
                },
            },
        }))
    }
}
