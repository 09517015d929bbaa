//! The Worker's settings, read from `wrangler.toml` `[vars]` and secrets once per isolate.

use std::cell::RefCell;
use std::rc::Rc;

use latchkey_shared::sign::{SigningSecret, shared_secret};
use latchkey_shared::target::UpstreamUrl;
use latchkey_shared::{RouteError, RouteTable};
use worker::Env;

/// Parsed settings. Cheap to clone (shared per isolate).
#[derive(Debug)]
pub(crate) struct Settings {
    /// Gateway route rules (`ROUTES`); empty: the gateway refuses everything.
    pub(crate) routes: RouteTable,
    /// Where allowed gateway requests go (`UPSTREAM_URL`): https, or http to loopback only.
    pub(crate) upstream: Option<UpstreamUrl>,
    /// Signs the identity headers sent upstream (`UPSTREAM_SIGNING_SECRET`, a secret).
    pub(crate) upstream_secret: Option<SigningSecret>,
    /// Largest gateway request body forwarded (`GATEWAY_BODY_MAX_BYTES`): the body is read
    /// whole to sign its digest.
    pub(crate) gateway_body_max: usize,
    /// Origin's usage ingest URL (`ORIGIN_USAGE_URL`); unset: usage is not reported.
    pub(crate) usage_url: Option<String>,
    /// Signs usage batches (`USAGE_SIGNING_SECRET`, a secret); set when `usage_url` is.
    pub(crate) usage_secret: Option<SigningSecret>,
    /// How long uses gather in an isolate before a batch is sent (`USAGE_FLUSH_MS`).
    pub(crate) usage_flush_ms: i64,
    /// Whether to add the debug header counting KV reads (`DEBUG_HEADERS`, tests only).
    pub(crate) debug_headers: bool,
}

/// `GATEWAY_BODY_MAX_BYTES` when unset: 1 MiB.
const DEFAULT_GATEWAY_BODY_MAX: usize = 1 << 20;

/// The settings shared by every request of this isolate.
pub(crate) type Config = Rc<Settings>;

/// A setting that is missing or does not parse.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("ROUTES: {0}")]
    Routes(#[from] RouteError),
    #[error("{0} is required when {1} is set")]
    Missing(&'static str, &'static str),
    #[error("{name} must be {expected}, got {value:?}")]
    Invalid {
        name: &'static str,
        expected: &'static str,
        value: String,
    },
    /// A problem whose value must not be echoed (a secret), or needs no echo.
    #[error("{name} {problem}")]
    Refused { name: &'static str, problem: String },
    #[error("{0} and {1} must be different secrets")]
    SharedSecret(&'static str, &'static str),
}

thread_local! {
    // A Worker isolate runs one thread; vars and secrets are fixed for its lifetime.
    static CONFIG: RefCell<Option<Result<Config, ConfigError>>> = const { RefCell::new(None) };
}

impl Settings {
    /// This isolate's settings, parsed on first use. A bad setting fails every request with the
    /// same clear error (logged once per request) rather than half-working.
    pub(crate) fn for_isolate(env: &Env) -> Result<Config, ConfigError> {
        CONFIG.with(|cell| {
            cell.borrow_mut()
                .get_or_insert_with(|| Self::parse(env).map(Rc::new))
                .clone()
        })
    }

    fn parse(env: &Env) -> Result<Self, ConfigError> {
        let routes = RouteTable::parse(&text(env, "ROUTES").unwrap_or_default())?;
        let upstream = text(env, "UPSTREAM_URL")
            .map(|url| {
                // The value is not echoed: a URL may carry credentials, and this message is
                // every client's answer while the edge is misconfigured.
                UpstreamUrl::parse(&url).map_err(|e| ConfigError::Refused {
                    name: "UPSTREAM_URL",
                    problem: e.to_string(),
                })
            })
            .transpose()?;
        let upstream_secret = secret(env, "UPSTREAM_SIGNING_SECRET")?;
        if !routes.is_empty() {
            if upstream.is_none() {
                return Err(ConfigError::Missing("UPSTREAM_URL", "ROUTES"));
            }
            if upstream_secret.is_none() {
                return Err(ConfigError::Missing("UPSTREAM_SIGNING_SECRET", "ROUTES"));
            }
        }
        let usage_url = text(env, "ORIGIN_USAGE_URL");
        check_url("ORIGIN_USAGE_URL", usage_url.as_deref())?;
        let usage_secret = secret(env, "USAGE_SIGNING_SECRET")?;
        if usage_url.is_some() && usage_secret.is_none() {
            return Err(ConfigError::Missing(
                "USAGE_SIGNING_SECRET",
                "ORIGIN_USAGE_URL",
            ));
        }
        if let (Some(a), Some(b)) = (&upstream_secret, &usage_secret)
            && let Some((a, b)) = shared_secret(&[
                ("UPSTREAM_SIGNING_SECRET", a.as_bytes()),
                ("USAGE_SIGNING_SECRET", b.as_bytes()),
            ])
        {
            return Err(ConfigError::SharedSecret(a, b));
        }
        let gateway_body_max = match text(env, "GATEWAY_BODY_MAX_BYTES") {
            None => DEFAULT_GATEWAY_BODY_MAX,
            Some(v) => v
                .parse::<usize>()
                .ok()
                // Workers accept request bodies of 100 MB at most (the paid plans' floor).
                .filter(|bytes| (1..=100_000_000).contains(bytes))
                .ok_or(ConfigError::Invalid {
                    name: "GATEWAY_BODY_MAX_BYTES",
                    expected: "a number of bytes from 1 to 100000000",
                    value: v,
                })?,
        };
        let usage_flush_ms = match text(env, "USAGE_FLUSH_MS") {
            None => 10_000,
            Some(v) => v
                .parse::<i64>()
                .ok()
                // The send waits inside `ctx.wait_until`, which Cloudflare ends 30 s after the response.
                .filter(|ms| (100..=25_000).contains(ms))
                .ok_or(ConfigError::Invalid {
                    name: "USAGE_FLUSH_MS",
                    expected: "milliseconds between 100 and 25000",
                    value: v,
                })?,
        };
        let debug_headers = match text(env, "DEBUG_HEADERS").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "DEBUG_HEADERS",
                    expected: "true or false",
                    value: other.to_owned(),
                });
            }
        };
        Ok(Self {
            routes,
            upstream,
            upstream_secret,
            gateway_body_max,
            usage_url,
            usage_secret,
            usage_flush_ms,
            debug_headers,
        })
    }
}

/// Refuses a set URL that is not http(s), without echoing it (it may carry credentials).
fn check_url(name: &'static str, url: Option<&str>) -> Result<(), ConfigError> {
    match url {
        Some(url)
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.contains(['@', '?', '#']) =>
        {
            Err(ConfigError::Refused {
                name,
                problem: "must be an http:// or https:// URL with no user, query or fragment"
                    .to_owned(),
            })
        }
        _ => Ok(()),
    }
}

/// A signing secret, read with the one rule origin uses too (`SigningSecret::parse`); unset and
/// blank are the same.
fn secret(env: &Env, name: &'static str) -> Result<Option<SigningSecret>, ConfigError> {
    text(env, name)
        .map(|value| {
            SigningSecret::parse(&value).map_err(|e| ConfigError::Refused {
                name,
                problem: e.to_string(),
            })
        })
        .transpose()
}

/// A var or secret as text; unset and blank are the same.
fn text(env: &Env, name: &str) -> Option<String> {
    env.var(name)
        .ok()
        .map(|v| v.to_string())
        .filter(|v| !v.trim().is_empty())
}
