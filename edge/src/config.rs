//! The Worker's settings, read from `wrangler.toml` `[vars]` and secrets once per isolate.

use std::cell::RefCell;
use std::rc::Rc;

use latchkey_shared::ledger::memory::Settings as MemorySettings;
use latchkey_shared::sign::gateway::Version as SignatureVersion;
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
    /// The form of the identity headers (`UPSTREAM_SIGNATURE_VERSION`: `3`, one header, by
    /// default; `2`, eight headers, for upstreams whose verifier predates version 3).
    pub(crate) upstream_signature: SignatureVersion,
    /// Largest gateway request body forwarded (`GATEWAY_BODY_MAX_BYTES`): the body is read
    /// whole to sign its digest.
    pub(crate) gateway_body_max: usize,
    /// Origin's usage ingest URL (`ORIGIN_USAGE_URL`); unset: usage is not reported.
    pub(crate) usage_url: Option<String>,
    /// Signs usage batches (`USAGE_SIGNING_SECRET`, a secret); set when `usage_url` is.
    pub(crate) usage_secret: Option<SigningSecret>,
    /// How long uses gather in an isolate before a batch is sent (`USAGE_FLUSH_MS`).
    pub(crate) usage_flush_ms: i64,
    /// Whether to add the debug headers (KV reads, ledger fetches, memory) (`DEBUG_HEADERS`,
    /// tests and benchmarks only).
    pub(crate) debug_headers: bool,
    /// Checks origin's ledger appends (`LEDGER_SIGNING_SECRET`, a secret); unset: no ledger, no
    /// memory, one KV read per verification as before.
    pub(crate) ledger_secret: Option<SigningSecret>,
    /// How the isolate's memory is kept and trusted; set when `ledger_secret` is.
    pub(crate) ledger: Option<LedgerSettings>,
}

/// The isolate memory's settings (see `memory.rs`).
#[derive(Debug, Clone)]
pub(crate) struct LedgerSettings {
    /// Poll interval, bounds and trust windows (`LEDGER_POLL_MS`, `LEDGER_MAX_AGE_MS`,
    /// `WATERMARK_MAX_AGE_MS`, `MEMORY_MAX_KEYS`, `MEMORY_TTL_MS`, `LEDGER_MAX_KEYS`).
    pub(crate) memory: MemorySettings,
    /// Answer 503 instead of reading KV when memory is not trusted (`LEDGER_STRICT`).
    pub(crate) strict: bool,
    /// Share each poll with the location's other isolates through the Cache API
    /// (`LEDGER_SHARE_POLLS`).
    pub(crate) share_polls: bool,
    /// How long a request waits for a poll while memory is not trusted
    /// (`LEDGER_POLL_TIMEOUT_MS`).
    pub(crate) timeout_ms: u64,
    /// MACs the location's shared copies of ledger polls (`LEDGER_SIGNING_SECRET`, used with a
    /// domain tag of its own).
    pub(crate) cache_secret: SigningSecret,
}

/// `GATEWAY_BODY_MAX_BYTES` when unset: 1 MiB.
const DEFAULT_GATEWAY_BODY_MAX: usize = 1 << 20;

/// `LEDGER_RETENTION_MS` when unset: ten minutes, well above KV's propagation bound.
pub(crate) const DEFAULT_RETENTION_MS: i64 = 600_000;
/// The shortest retention allowed: ten minutes. Shorter would let an isolate trust a KV value
/// older than a change it forgot: KV takes a minute or more to propagate, its writes may wait
/// minutes for the API budget or a 429's pause, and origin appends a change again only after it
/// has waited about four minutes for KV. Tests (`DEBUG_HEADERS=true`) may go down to one second.
pub(crate) const MIN_RETENTION_MS: i64 = 600_000;

/// The ledger's retention range for these settings (the Worker checks `LEDGER_RETENTION_MS`
/// against it here, the Durable Object again for itself): tests may shorten it.
pub(crate) fn retention_range(debug_headers: bool) -> std::ops::RangeInclusive<i64> {
    (if debug_headers {
        1000
    } else {
        MIN_RETENTION_MS
    })..=86_400_000
}

/// The settings shared by every request of this isolate.
pub(crate) type Config = Rc<Settings>;

/// A setting that is missing or does not parse.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("ROUTES: {0}")]
    Routes(#[from] RouteError),
    #[error("{0} is required when {1} is set")]
    Missing(&'static str, &'static str),
    /// A secret that is required and not set: the message says how to set one.
    #[error(
        "{0} is required when {1} is set, and it is a secret, so it is not in wrangler.toml. \
         Under `wrangler dev`, copy .dev.vars.example to .dev.vars and fill in every secret it \
         lists (`openssl rand -hex 32` makes one); when deployed, run \
         `wrangler secret put {0}`"
    )]
    MissingSecret(&'static str, &'static str),
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
                return Err(ConfigError::MissingSecret(
                    "UPSTREAM_SIGNING_SECRET",
                    "ROUTES",
                ));
            }
        }
        let upstream_signature = match text(env, "UPSTREAM_SIGNATURE_VERSION") {
            None => SignatureVersion::default(),
            Some(v) => SignatureVersion::parse(&v).ok_or(ConfigError::Invalid {
                name: "UPSTREAM_SIGNATURE_VERSION",
                expected: "2 or 3",
                value: v,
            })?,
        };
        let usage_url = text(env, "ORIGIN_USAGE_URL");
        check_url("ORIGIN_USAGE_URL", usage_url.as_deref())?;
        let usage_secret = secret(env, "USAGE_SIGNING_SECRET")?;
        if usage_url.is_some() && usage_secret.is_none() {
            return Err(ConfigError::MissingSecret(
                "USAGE_SIGNING_SECRET",
                "ORIGIN_USAGE_URL",
            ));
        }
        let ledger_secret = secret(env, "LEDGER_SIGNING_SECRET")?;
        let secrets: Vec<(&'static str, &[u8])> = [
            ("UPSTREAM_SIGNING_SECRET", &upstream_secret),
            ("USAGE_SIGNING_SECRET", &usage_secret),
            ("LEDGER_SIGNING_SECRET", &ledger_secret),
        ]
        .into_iter()
        .filter_map(|(name, secret)| secret.as_ref().map(|s| (name, s.as_bytes())))
        .collect();
        if let Some((a, b)) = shared_secret(&secrets) {
            return Err(ConfigError::SharedSecret(a, b));
        }
        let debug_headers = flag(env, "DEBUG_HEADERS", false)?;
        let ledger = ledger_secret
            .as_ref()
            .map(|secret| ledger_settings(env, debug_headers, secret.clone()))
            .transpose()?;
        if ledger.is_none() && flag(env, "LEDGER_STRICT", false)? {
            return Err(ConfigError::MissingSecret(
                "LEDGER_SIGNING_SECRET",
                "LEDGER_STRICT",
            ));
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
        Ok(Self {
            routes,
            upstream,
            upstream_secret,
            upstream_signature,
            gateway_body_max,
            usage_url,
            usage_secret,
            usage_flush_ms,
            debug_headers,
            ledger_secret,
            ledger,
        })
    }
}

/// The memory settings, each with its default and its allowed range.
fn ledger_settings(
    env: &Env,
    debug_headers: bool,
    cache_secret: SigningSecret,
) -> Result<LedgerSettings, ConfigError> {
    let defaults = MemorySettings::default();
    let poll_ms = number(env, "LEDGER_POLL_MS", defaults.poll_ms, 100, 60_000)?;
    let sync_max_age_ms = number(
        env,
        "LEDGER_MAX_AGE_MS",
        defaults.sync_max_age_ms,
        200,
        600_000,
    )?;
    if sync_max_age_ms < 2 * poll_ms {
        return Err(ConfigError::Refused {
            name: "LEDGER_MAX_AGE_MS",
            problem: "must be at least twice LEDGER_POLL_MS".into(),
        });
    }
    let watermark_max_age_ms = number(
        env,
        "WATERMARK_MAX_AGE_MS",
        defaults.watermark_max_age_ms,
        1000,
        600_000,
    )?;
    // Origin sends a watermark every second at most, and an isolate sees it only when it polls.
    if watermark_max_age_ms < sync_max_age_ms.saturating_add(1000) {
        return Err(ConfigError::Refused {
            name: "WATERMARK_MAX_AGE_MS",
            problem: "must be at least LEDGER_MAX_AGE_MS plus 1000".into(),
        });
    }
    // Bounded well under a Worker isolate's 128 MB (BENCHMARKS.md: memory per 10,000 keys).
    let memory = MemorySettings {
        poll_ms,
        sync_max_age_ms,
        watermark_max_age_ms,
        hot_max_keys: count(env, "MEMORY_MAX_KEYS", defaults.hot_max_keys, 1, 100_000)?,
        // At most five minutes: origin appends again the last ten minutes of changes when it
        // starts feeding the ledger, and a KV record kept longer could predate them.
        hot_ttl_ms: number(env, "MEMORY_TTL_MS", defaults.hot_ttl_ms, 1000, 300_000)?,
        ledger_max_keys: count(env, "LEDGER_MAX_KEYS", defaults.ledger_max_keys, 1, 100_000)?,
    };
    // Checked here too (the object reads it for itself) so a bad value is refused loudly.
    let retention = retention_range(debug_headers);
    number(
        env,
        "LEDGER_RETENTION_MS",
        DEFAULT_RETENTION_MS,
        *retention.start(),
        *retention.end(),
    )?;
    Ok(LedgerSettings {
        memory,
        strict: flag(env, "LEDGER_STRICT", false)?,
        share_polls: flag(env, "LEDGER_SHARE_POLLS", true)?,
        timeout_ms: number(env, "LEDGER_POLL_TIMEOUT_MS", 1000, 50, 10_000)?.unsigned_abs(),
        cache_secret,
    })
}

/// An integer setting in `min..=max`, `default` when unset.
fn number(
    env: &Env,
    name: &'static str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    match text(env, name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| ConfigError::Refused {
                name,
                problem: format!("must be a whole number from {min} to {max}, got {v:?}"),
            }),
    }
}

/// A count setting in `min..=max`, `default` when unset.
fn count(
    env: &Env,
    name: &'static str,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    number(env, name, as_i64(default), as_i64(min), as_i64(max))
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// A `true`/`false` setting, `default` when unset.
fn flag(env: &Env, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match text(env, name).as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(ConfigError::Invalid {
            name,
            expected: "true or false",
            value: other.to_owned(),
        }),
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
