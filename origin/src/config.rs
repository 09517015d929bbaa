//! Configuration, read from the environment in one place. Every problem names its variable.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use latchkey_shared::ledger::APPEND_PATH;
use latchkey_shared::sign::{SigningSecret, shared_secret};
use latchkey_shared::target::UpstreamUrl;
use latchkey_shared::{KeyPrefix, Scope, ScopePolicy};

use crate::http::client::TrustedProxies;
use sha2::{Digest, Sha256};

/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 24;

/// Everything origin needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ORIGIN_LISTEN`: address to serve on.
    pub listen: SocketAddr,
    /// `DATABASE_URL`: where the SQLite database lives.
    pub database_url: String,
    /// `ADMIN_TOKEN`: the accepted admin bearer tokens.
    pub admin_tokens: Vec<AdminToken>,
    /// `KEY_PREFIX`: prefix of newly issued keys.
    pub key_prefix: KeyPrefix,
    /// `SCOPE_WILDCARDS` and `SCOPE_CATALOGUE`: the rules for granting scopes.
    pub scope_policy: ScopePolicy,
    /// `LAST_USED_FLUSH_MS`: how often verified keys' `last_used_at` is written.
    pub last_used_flush: Duration,
    /// `KV_API_BASE`, `KV_NAMESPACE_ID`, `KV_API_TOKEN`: where key records are published;
    /// `None` (both unset) turns publishing off.
    pub kv: Option<KvConfig>,
    /// `LEDGER_URL`, `LEDGER_SIGNING_SECRET`, `LEDGER_WATERMARK_MS`, `LEDGER_TIMEOUT_MS`: where
    /// and how key changes and watermarks are appended to the edge's change ledger; `None` (URL
    /// and secret unset) turns the ledger sink off.
    pub ledger: Option<LedgerConfig>,
    /// `USAGE_SIGNING_SECRET`: the secret the edge signs usage reports with; `None` turns the
    /// usage ingest endpoint off.
    pub usage_secret: Option<SigningSecret>,
    /// `AUDIT_CHAIN_KEY`: the key of the audit log's chain (HMAC-SHA256); never stored in the
    /// database or logged.
    pub audit_chain_key: SigningSecret,
    /// `AUDIT_CHECKPOINT_FILE`: where the audit chain's checkpoints are appended; `None`: beside
    /// the database (`<database>.audit-checkpoints`).
    pub audit_checkpoint_file: Option<std::path::PathBuf>,
    /// `REQUEST_READ_TIMEOUT_MS`: how long a client may take to send a request's headers, and
    /// then its body. Slower clients get 408 (body) or a closed connection (headers), so a
    /// slow-loris client cannot hold a connection open for ever.
    pub request_read_timeout: Duration,
    /// `ADMIN_AUTH_FAILURES_PER_MINUTE`: wrong or malformed admin tokens accepted from one client
    /// address per minute; beyond it the address's wrong tokens get 429 until the minute is over
    /// (a right token always passes).
    pub admin_auth_failures_per_minute: u32,
    /// `TRUSTED_PROXIES`: proxies whose `X-Forwarded-For` names the client for the failed
    /// admin authentication limit, and which the per-address connection cap does not apply to.
    pub trusted_proxies: TrustedProxies,
    /// `MAX_CONNECTIONS`: open connections served at once; more are closed at once.
    pub max_connections: usize,
    /// `MAX_CONNECTIONS_PER_ADDRESS`: open connections served at once from one client address
    /// (IPv6: one /64); a trusted proxy has no cap of its own.
    pub max_connections_per_address: usize,
    /// `GITHUB_SECRET_SCANNING_KEYS_FILE` and `GITHUB_SECRET_SCANNING_KEYS_URL`: where GitHub's
    /// secret scanning keys come from; neither turns `POST /v1/secret_scanning/github` off.
    pub github_keys: crate::secret_scanning::KeySources,
    /// `LEAK_ACTION`: `revoke` (the default) or `flag`, what a leak report does to the key.
    pub leak_action: crate::service::LeakAction,
    /// `WEBHOOK_URLS`, `WEBHOOK_SECRET`, `WEBHOOK_TIMEOUT_MS`, `WEBHOOK_RETRY_MAX_MS`: where key
    /// events are delivered; `None` (no URL) turns event webhooks off.
    pub webhooks: Option<crate::webhook::WebhookConfig>,
    /// `STALE_KEY_AFTER`, `STALE_WARNING_BEFORE`, `EXPIRY_WARNING_BEFORE`,
    /// `KEY_POLICY_INTERVAL`: the key lifecycle policies (all off by default).
    pub key_policy: crate::policy::KeyPolicy,
}

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

    fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
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
                Ok(n) if (10..=crate::budget::CLOUDFLARE_LIMIT).contains(&n) => Some(n),
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

/// Where and how origin appends to the edge's change ledger (`shared/src/ledger`): a route of
/// the Worker itself, signed like usage reports.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// `LEDGER_URL`: the Worker's append route, `https://<worker>/v1/ledger/changes` (http only
    /// to a loopback address).
    pub url: String,
    /// `LEDGER_SIGNING_SECRET`: the HMAC-SHA256 key of every append (the Worker holds the same).
    pub secret: SigningSecret,
    /// `LEDGER_WATERMARK_MS`: the longest time between two watermarks while nothing changes.
    pub watermark_every: Duration,
    /// `LEDGER_TIMEOUT_MS`: the limit on one append request.
    pub timeout: Duration,
}

impl LedgerConfig {
    fn from_lookup(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        let url = var("LEDGER_URL");
        let secret = var("LEDGER_SIGNING_SECRET");
        let (url, secret) = match (url, secret) {
            (None, None) => return Ok(None),
            (Some(url), Some(secret)) => (url, secret),
            (Some(_), None) => {
                return Err(problem(
                    "LEDGER_SIGNING_SECRET",
                    "is required with LEDGER_URL: the secret the Worker checks appends with",
                ));
            }
            (None, Some(_)) => {
                return Err(problem(
                    "LEDGER_URL",
                    "is required with LEDGER_SIGNING_SECRET: the Worker's append route",
                ));
            }
        };
        // The value is never echoed: it names the Worker, and a pasted URL may carry more.
        let parsed = UpstreamUrl::parse(&url).map_err(|e| problem("LEDGER_URL", e.to_string()))?;
        if parsed.path() != APPEND_PATH {
            return Err(problem(
                "LEDGER_URL",
                format!("must be the Worker's append route, https://<worker host>{APPEND_PATH}"),
            ));
        }
        let secret = SigningSecret::parse(&secret)
            .map_err(|e| problem("LEDGER_SIGNING_SECRET", e.to_string()))?;
        let millis = |name: &'static str, range, default| millis(var, name, range, default);
        Ok(Some(Self {
            url: parsed.base().to_owned(),
            secret,
            // The edge trusts its memory only while the newest watermark is at most
            // `WATERMARK_MAX_AGE_MS` (3 s by default) old: at most 2 s between two leaves room.
            watermark_every: millis("LEDGER_WATERMARK_MS", 100..=2_000, 1_000)?,
            timeout: millis("LEDGER_TIMEOUT_MS", 100..=30_000, 2_000)?,
        }))
    }
}

/// An admin bearer token. Its `Debug` is redacted; its label (a hash prefix) names it in the audit
/// log and logs without revealing it.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
    label: std::sync::Arc<str>,
}

impl AdminToken {
    fn new(token: &str) -> Self {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let label = format!("admin:{}", &hex::encode(digest)[..12]).into();
        Self { digest, label }
    }

    /// SHA-256 of the token: compared in constant time against a presented token's digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The non-secret label, `admin:` + first 12 hex digits of the token's SHA-256.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The label, shared (attached to every request it authenticates).
    pub fn shared_label(&self) -> std::sync::Arc<str> {
        self.label.clone()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminToken({})", self.label)
    }
}

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    var: &'static str,
    problem: String,
}

fn problem(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let listen = match var("ORIGIN_LISTEN") {
            Some(v) => v.trim().parse().map_err(|_| {
                problem(
                    "ORIGIN_LISTEN",
                    format!("{v:?} is not an address like 127.0.0.1:8080"),
                )
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };

        let database_url =
            var("DATABASE_URL").unwrap_or_else(|| "sqlite://data/latchkey.db".into());
        if !database_url.starts_with("sqlite:") {
            return Err(problem(
                "DATABASE_URL",
                "only sqlite: URLs are supported (for example sqlite://data/latchkey.db)",
            ));
        }

        let tokens = var("ADMIN_TOKEN").ok_or_else(|| {
            problem(
                "ADMIN_TOKEN",
                "is required: one or more comma-separated admin bearer tokens \
                 (generate one with `openssl rand -hex 32`)",
            )
        })?;
        let mut admin_tokens = Vec::new();
        for (i, token) in tokens.split(',').map(str::trim).enumerate() {
            if token.len() < MIN_ADMIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(problem(
                    "ADMIN_TOKEN",
                    format!(
                        "token #{} must be at least {MIN_ADMIN_TOKEN_LEN} printable ASCII characters without spaces",
                        i + 1
                    ),
                ));
            }
            admin_tokens.push(AdminToken::new(token));
        }

        let key_prefix = match var("KEY_PREFIX") {
            Some(v) => KeyPrefix::parse(v.trim())
                .map_err(|e| problem("KEY_PREFIX", format!("{v:?}: {e}")))?,
            None => KeyPrefix::default(),
        };

        let wildcards = match var("SCOPE_WILDCARDS").as_deref().map(str::trim) {
            None | Some("false" | "0") => false,
            Some("true" | "1") => true,
            Some(other) => {
                return Err(problem(
                    "SCOPE_WILDCARDS",
                    format!("{other:?} is not true or false"),
                ));
            }
        };
        let catalogue = match var("SCOPE_CATALOGUE") {
            None => None,
            Some(v) => {
                let entries: Vec<&str> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                let parsed: BTreeSet<Scope> = ScopePolicy::parse_catalogue(&entries, wildcards)
                    .map_err(|e| problem("SCOPE_CATALOGUE", e.to_string()))?;
                Some(parsed)
            }
        };

        let number =
            |name: &'static str, range: std::ops::RangeInclusive<u64>, default: u64, what: &str| {
                match var(name) {
                    None => Ok(default),
                    Some(v) => v
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|n| range.contains(n))
                        .ok_or_else(|| {
                            problem(
                                name,
                                format!(
                                    "{v:?} is not a number of {what} from {} to {}",
                                    range.start(),
                                    range.end()
                                ),
                            )
                        }),
                }
            };
        let last_used_flush = Duration::from_millis(number(
            "LAST_USED_FLUSH_MS",
            10..=3_600_000,
            5_000,
            "milliseconds",
        )?);
        let request_read_timeout = Duration::from_millis(number(
            "REQUEST_READ_TIMEOUT_MS",
            100..=600_000,
            10_000,
            "milliseconds",
        )?);
        let admin_auth_failures_per_minute = u32::try_from(number(
            "ADMIN_AUTH_FAILURES_PER_MINUTE",
            1..=1_000_000,
            20,
            "failures",
        )?)
        .unwrap_or(u32::MAX);
        let trusted_proxies = TrustedProxies::parse(&var("TRUSTED_PROXIES").unwrap_or_default())
            .map_err(|e| problem("TRUSTED_PROXIES", e))?;
        let connections = |name: &'static str, default: u64| {
            number(name, 1..=1_000_000, default, "connections")
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        };
        let max_connections = connections("MAX_CONNECTIONS", 1024)?;
        let max_connections_per_address = connections("MAX_CONNECTIONS_PER_ADDRESS", 256)?;

        let usage_secret = var("USAGE_SIGNING_SECRET")
            .map(|v| SigningSecret::parse(&v))
            .transpose()
            .map_err(|e| problem("USAGE_SIGNING_SECRET", e.to_string()))?;
        let key_policy = key_policy(&var)?;
        if key_policy.stale_after.is_some() && usage_secret.is_none() {
            return Err(problem(
                "STALE_KEY_AFTER",
                "needs USAGE_SIGNING_SECRET: idle time is known only from the edge's usage \
                 reports, and without them keys used every day at the edge would look idle and \
                 be switched off",
            ));
        }
        let audit_chain_key = audit_chain_key(&var)?;
        let ledger = LedgerConfig::from_lookup(&var)?;
        let webhooks = webhooks(&var)?;
        // Each role its own secret (the same admin token listed twice is harmless).
        let mut roles: Vec<(&'static str, &[u8])> =
            vec![("AUDIT_CHAIN_KEY", audit_chain_key.as_bytes())];
        if let Some(usage) = &usage_secret {
            roles.push(("USAGE_SIGNING_SECRET", usage.as_bytes()));
        }
        if let Some(webhooks) = &webhooks {
            roles.extend(
                webhooks
                    .secrets
                    .iter()
                    .map(|s| ("WEBHOOK_SECRET", s.as_bytes())),
            );
        }
        if let Some(ledger) = &ledger {
            roles.push(("LEDGER_SIGNING_SECRET", ledger.secret.as_bytes()));
        }
        let mut token_texts: Vec<&str> = tokens.split(',').map(str::trim).collect();
        token_texts.sort_unstable();
        token_texts.dedup();
        roles.extend(token_texts.iter().map(|t| ("ADMIN_TOKEN", t.as_bytes())));
        if let Some((first, second)) = shared_secret(&roles) {
            return Err(distinct(first, second));
        }

        Ok(Self {
            listen,
            database_url,
            admin_tokens,
            key_prefix,
            scope_policy: ScopePolicy {
                wildcards,
                catalogue,
            },
            last_used_flush,
            kv: KvConfig::from_lookup(&var)?,
            ledger,
            usage_secret,
            audit_chain_key,
            audit_checkpoint_file: var("AUDIT_CHECKPOINT_FILE")
                .map(|v| std::path::PathBuf::from(v.trim())),
            request_read_timeout,
            admin_auth_failures_per_minute,
            trusted_proxies,
            max_connections,
            max_connections_per_address,
            github_keys: github_keys(&var)?,
            webhooks,
            key_policy,
            leak_action: match var("LEAK_ACTION").as_deref().map(str::trim) {
                None | Some("revoke") => crate::service::LeakAction::Revoke,
                Some("flag") => crate::service::LeakAction::Flag,
                Some(other) => {
                    return Err(problem(
                        "LEAK_ACTION",
                        format!("{other:?} is neither revoke nor flag"),
                    ));
                }
            },
        })
    }
}

/// Reads a setting in milliseconds: `default` when unset, an error naming `range` otherwise.
fn millis(
    var: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
) -> Result<Duration, ConfigError> {
    match var(name) {
        None => Ok(Duration::from_millis(default)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if range.contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => Err(problem(
                name,
                format!(
                    "{v:?} is not a number of milliseconds from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        },
    }
}

/// Reads the key lifecycle policies' settings: durations such as `60d`, `12h` or `500ms`.
fn key_policy(
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::policy::KeyPolicy, ConfigError> {
    const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let duration = |name: &'static str, min: Duration| -> Result<Option<Duration>, ConfigError> {
        var(name)
            .map(|v| match humantime::parse_duration(v.trim()) {
                Ok(d) if (min..=TEN_YEARS).contains(&d) => Ok(d),
                _ => Err(problem(
                    name,
                    format!(
                        "{v:?} is not a duration from {} to 10 years (such as 60d, 12h, 30m)",
                        humantime::format_duration(min)
                    ),
                )),
            })
            .transpose()
    };
    let stale_after = duration("STALE_KEY_AFTER", Duration::from_secs(1))?;
    // Default: a week, or half the idle time if that is shorter.
    let week = Duration::from_secs(7 * 24 * 3600);
    let stale_warning = duration("STALE_WARNING_BEFORE", Duration::ZERO)?
        .unwrap_or_else(|| stale_after.map_or(week, |after| week.min(after / 2)));
    if let Some(after) = stale_after
        && stale_warning >= after
    {
        return Err(problem(
            "STALE_WARNING_BEFORE",
            "must be shorter than STALE_KEY_AFTER (0s: no warning)",
        ));
    }
    Ok(crate::policy::KeyPolicy {
        stale_after,
        stale_warning,
        expiry_warning: duration("EXPIRY_WARNING_BEFORE", Duration::from_secs(1))?,
        interval: duration("KEY_POLICY_INTERVAL", Duration::from_millis(100))?
            .unwrap_or(Duration::from_secs(600)),
        usage_max_age: duration("STALE_KEY_USAGE_MAX_AGE", Duration::from_secs(1))?
            .unwrap_or(Duration::from_secs(3600)),
    })
}

/// Reads the event webhooks' settings.
pub fn webhooks(
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<crate::webhook::WebhookConfig>, ConfigError> {
    let Some(urls) = var("WEBHOOK_URLS") else {
        if var("WEBHOOK_SECRET").is_some() {
            return Err(problem(
                "WEBHOOK_URLS",
                "is required with WEBHOOK_SECRET: the endpoints events are delivered to",
            ));
        }
        return Ok(None);
    };
    let mut endpoints = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        // The value is never echoed: a pasted URL may carry more than it should.
        let parsed = UpstreamUrl::parse(url).map_err(|e| {
            problem(
                "WEBHOOK_URLS",
                format!("endpoint {}: {e}", endpoints.len() + 1),
            )
        })?;
        if !endpoints.contains(&parsed.base().to_owned()) {
            endpoints.push(parsed.base().to_owned());
        }
    }
    if endpoints.is_empty() {
        return Err(problem("WEBHOOK_URLS", "lists no endpoint"));
    }
    let secrets = var("WEBHOOK_SECRET")
        .ok_or_else(|| {
            problem(
                "WEBHOOK_SECRET",
                "is required with WEBHOOK_URLS: every event is signed (whsec_ and base64, e.g. whsec_$(openssl rand -base64 32))",
            )
        })?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| crate::webhook::WebhookSecret::parse(s).map_err(|e| problem("WEBHOOK_SECRET", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let millis = |name: &'static str, range, default| millis(var, name, range, default);
    if secrets.is_empty() {
        return Err(problem("WEBHOOK_SECRET", "lists no secret"));
    }
    Ok(Some(crate::webhook::WebhookConfig {
        endpoints: endpoints
            .iter()
            .map(|url| crate::webhook::Endpoint::new(url))
            .collect(),
        secrets,
        sign_with_shared: match var("WEBHOOK_SIGN_WITH_SHARED_SECRET").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => {
                return Err(problem(
                    "WEBHOOK_SIGN_WITH_SHARED_SECRET",
                    "must be true or false",
                ));
            }
        },
        timeout: millis("WEBHOOK_TIMEOUT_MS", 100..=60_000, 10_000)?,
        retry_max: millis("WEBHOOK_RETRY_MAX_MS", 100..=3_600_000, 300_000)?,
    }))
}

/// Reads where GitHub's secret scanning keys come from.
fn github_keys(
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::secret_scanning::KeySources, ConfigError> {
    let url = var("GITHUB_SECRET_SCANNING_KEYS_URL")
        .map(|v| {
            UpstreamUrl::parse(&v)
                .map(|u| u.base().to_owned())
                .map_err(|e| {
                    problem(
                        "GITHUB_SECRET_SCANNING_KEYS_URL",
                        format!(
                            "{e} (GitHub's list is at https://api.github.com/meta/public_keys/secret_scanning)"
                        ),
                    )
                })
        })
        .transpose()?;
    let refresh_every = match var("GITHUB_SECRET_SCANNING_KEYS_REFRESH_S") {
        None => Duration::from_secs(3600),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(s @ 1..=86_400) => Duration::from_secs(s),
            _ => {
                return Err(problem(
                    "GITHUB_SECRET_SCANNING_KEYS_REFRESH_S",
                    format!("{v:?} is not a number of seconds from 1 to 86400"),
                ));
            }
        },
    };
    Ok(crate::secret_scanning::KeySources {
        file: var("GITHUB_SECRET_SCANNING_KEYS_FILE").map(|v| std::path::PathBuf::from(v.trim())),
        url,
        refresh_every,
    })
}

/// Reads `AUDIT_CHAIN_KEY` (required), with the one rule for secrets.
pub fn audit_chain_key(var: &dyn Fn(&str) -> Option<String>) -> Result<SigningSecret, ConfigError> {
    let key = var("AUDIT_CHAIN_KEY").ok_or_else(|| {
        problem(
            "AUDIT_CHAIN_KEY",
            "is required: the key of the audit log's chain, kept outside the database \
             (generate one with `openssl rand -hex 32`, and keep it: the log's entries verify \
             only with it)",
        )
    })?;
    SigningSecret::parse(&key).map_err(|e| problem("AUDIT_CHAIN_KEY", e.to_string()))
}

/// Two settings that hold one secret, by name.
/// The error for two roles holding one secret (admin tokens are de-duplicated first, so the
/// two are different variables).
fn distinct(first: &'static str, second: &'static str) -> ConfigError {
    let var = if second == "ADMIN_TOKEN" {
        first
    } else {
        second
    };
    let other = if var == first { second } else { first };
    problem(
        var,
        format!(
            "holds the same secret as {other}: each role needs its own secret, or a message made for one could be passed off as the other"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    const AUDIT_KEY: &str = "audit-chain-key-for-config-tests-0000";

    /// Loads `vars`, with an audit chain key unless `vars` sets one (`""`: none).
    fn load(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
                .or_else(|| (name == "AUDIT_CHAIN_KEY").then(|| AUDIT_KEY.to_owned()))
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn webhook_settings_come_together_and_secrets_are_standard_webhooks_ones() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let on = [
            ("ADMIN_TOKEN", TOKEN),
            (
                "WEBHOOK_URLS",
                "https://hooks.example/latchkey, http://127.0.0.1:9000/h,https://hooks.example/latchkey/",
            ),
            ("WEBHOOK_SECRET", secret),
        ];
        let c = load(&on).expect("valid").webhooks.expect("on");
        let labels: Vec<&str> = c.endpoints.iter().map(|e| e.label()).collect();
        assert_eq!(labels.len(), 2, "listed once each: {labels:?}");
        assert!(
            labels[0].starts_with("https://hooks.example #"),
            "{labels:?}"
        );
        assert!(
            labels[1].starts_with("http://127.0.0.1:9000 #"),
            "{labels:?}"
        );
        assert_eq!(c.secrets.len(), 1);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert!(!format!("{c:?}").contains("MfKQ9r8G"), "Debug is redacted");
        assert!(
            load(&[("ADMIN_TOKEN", TOKEN)])
                .expect("valid")
                .webhooks
                .is_none()
        );
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("WEBHOOK_SECRET", secret)], "WEBHOOK_URLS: is required"),
            (
                &[("WEBHOOK_URLS", "https://h.example")],
                "WEBHOOK_SECRET: is required",
            ),
            (
                &[
                    ("WEBHOOK_URLS", "http://h.example/x"),
                    ("WEBHOOK_SECRET", secret),
                ],
                "WEBHOOK_URLS: endpoint 1: must use https",
            ),
            (
                &[
                    ("WEBHOOK_URLS", "https://h.example/x?token=1"),
                    ("WEBHOOK_SECRET", secret),
                ],
                "WEBHOOK_URLS: endpoint 1: must be scheme",
            ),
            (
                &[
                    ("WEBHOOK_URLS", "https://h.example"),
                    ("WEBHOOK_SECRET", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                ],
                "WEBHOOK_SECRET: must start with whsec_",
            ),
            (
                &[
                    ("WEBHOOK_URLS", "https://h.example"),
                    ("WEBHOOK_SECRET", "whsec_c2hvcnQ="),
                ],
                "WEBHOOK_SECRET: must hold 24 to 64 random bytes",
            ),
            (
                &[
                    ("WEBHOOK_URLS", "https://h.example"),
                    ("WEBHOOK_SECRET", secret),
                    ("WEBHOOK_RETRY_MAX_MS", "0"),
                ],
                "WEBHOOK_RETRY_MAX_MS",
            ),
        ];
        for (vars, want) in cases {
            let vars = [&[("ADMIN_TOKEN", TOKEN)], *vars].concat();
            let error = load(&vars).err().unwrap_or_default();
            assert!(error.contains(want), "{vars:?}: {error}");
            assert!(!error.contains("token=1"), "the URL is not echoed: {error}");
        }
    }

    #[test]
    fn key_policies_are_off_unless_set_and_take_durations() {
        let off = load(&[("ADMIN_TOKEN", TOKEN)]).expect("valid").key_policy;
        assert!(!off.any());
        let usage = (
            "USAGE_SIGNING_SECRET",
            "usage-signing-secret-for-config-tests",
        );
        let on = load(&[
            ("ADMIN_TOKEN", TOKEN),
            usage,
            ("STALE_KEY_AFTER", "60d"),
            ("EXPIRY_WARNING_BEFORE", "3d"),
        ])
        .expect("valid")
        .key_policy;
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(on.stale_after, Some(day * 60));
        assert_eq!(on.stale_warning, day * 7, "a week by default");
        assert_eq!(on.expiry_warning, Some(day * 3));
        assert_eq!(on.interval, Duration::from_secs(600));
        assert_eq!(
            on.usage_max_age,
            Duration::from_secs(3600),
            "an hour by default"
        );
        let short = load(&[("ADMIN_TOKEN", TOKEN), usage, ("STALE_KEY_AFTER", "4d")])
            .expect("valid")
            .key_policy;
        assert_eq!(short.stale_warning, day * 2, "half a short idle time");
        for (vars, want) in [
            (&[("STALE_KEY_AFTER", "sixty days")][..], "STALE_KEY_AFTER"),
            (&[("STALE_KEY_AFTER", "0s")][..], "STALE_KEY_AFTER"),
            (&[("STALE_KEY_AFTER", "20y")][..], "STALE_KEY_AFTER"),
            (
                &[("STALE_KEY_AFTER", "5d"), ("STALE_WARNING_BEFORE", "5d")][..],
                "STALE_WARNING_BEFORE: must be shorter",
            ),
            (&[("KEY_POLICY_INTERVAL", "1ms")][..], "KEY_POLICY_INTERVAL"),
            (
                &[("STALE_KEY_USAGE_MAX_AGE", "1ms")][..],
                "STALE_KEY_USAGE_MAX_AGE",
            ),
        ] {
            let vars = [&[("ADMIN_TOKEN", TOKEN), usage], vars].concat();
            let error = load(&vars).err().unwrap_or_default();
            assert!(error.contains(want), "{vars:?}: {error}");
        }
    }

    #[test]
    fn the_stale_key_policy_needs_usage_reports() {
        let error = load(&[("ADMIN_TOKEN", TOKEN), ("STALE_KEY_AFTER", "60d")])
            .err()
            .unwrap_or_default();
        assert!(
            error.contains("STALE_KEY_AFTER: needs USAGE_SIGNING_SECRET"),
            "{error}"
        );
        // The expiry warnings need no usage.
        assert!(load(&[("ADMIN_TOKEN", TOKEN), ("EXPIRY_WARNING_BEFORE", "3d")]).is_ok());
    }

    #[test]
    fn secrets_follow_one_rule_and_each_role_has_its_own() {
        let usage = "usage-signing-secret-for-config-tests";
        let c = load(&[
            ("ADMIN_TOKEN", TOKEN),
            ("USAGE_SIGNING_SECRET", &format!("  {usage}\n")),
        ])
        .expect("valid");
        assert_eq!(c.audit_chain_key.as_bytes(), AUDIT_KEY.as_bytes());
        assert_eq!(
            c.usage_secret.as_ref().map(SigningSecret::as_bytes),
            Some(usage.as_bytes()),
            "trimmed by the one rule"
        );
        assert!(!format!("{c:?}").contains(AUDIT_KEY), "Debug is redacted");
        let long_token = "t".repeat(40);
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (
                &[("ADMIN_TOKEN", TOKEN), ("AUDIT_CHAIN_KEY", "")],
                &["AUDIT_CHAIN_KEY: is required"],
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("AUDIT_CHAIN_KEY", "short")],
                &["AUDIT_CHAIN_KEY: must be at least 32"],
            ),
            (
                &[
                    ("ADMIN_TOKEN", TOKEN),
                    ("USAGE_SIGNING_SECRET", &"u".repeat(31)),
                ],
                &["USAGE_SIGNING_SECRET: must be at least 32"],
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("USAGE_SIGNING_SECRET", AUDIT_KEY)],
                &["USAGE_SIGNING_SECRET:", "AUDIT_CHAIN_KEY"],
            ),
            (
                &[
                    ("ADMIN_TOKEN", &format!("{TOKEN},{long_token}")),
                    ("AUDIT_CHAIN_KEY", &long_token),
                ],
                &["AUDIT_CHAIN_KEY:", "ADMIN_TOKEN"],
            ),
            (
                &[
                    ("ADMIN_TOKEN", &long_token),
                    ("USAGE_SIGNING_SECRET", &long_token),
                ],
                &["USAGE_SIGNING_SECRET:", "ADMIN_TOKEN"],
            ),
        ];
        for (vars, expected) in cases {
            let err = load(vars).expect_err("invalid");
            for word in *expected {
                assert!(err.contains(word), "{err} should name {word}");
            }
            assert!(
                !err.contains(AUDIT_KEY) && !err.contains(&long_token),
                "{err}"
            );
        }
        // The same admin token listed twice is not two roles sharing one.
        assert!(load(&[("ADMIN_TOKEN", &format!("{TOKEN},{TOKEN}"))]).is_ok());
    }

    #[test]
    fn defaults_need_only_an_admin_token() {
        let c = load(&[("ADMIN_TOKEN", TOKEN)]).expect("valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "sqlite://data/latchkey.db");
        assert_eq!(c.key_prefix.as_str(), "sk_live");
        assert_eq!(c.admin_tokens.len(), 1);
        assert!(!c.scope_policy.wildcards);
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(
            (c.max_connections, c.max_connections_per_address),
            (1024, 256)
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "ADMIN_TOKEN: is required"),
            (&[("ADMIN_TOKEN", "short")], "ADMIN_TOKEN: token #1"),
            (
                &[("ADMIN_TOKEN", &"x".repeat(30)), ("ORIGIN_LISTEN", "nope")],
                "ORIGIN_LISTEN:",
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("KEY_PREFIX", "SK")],
                "KEY_PREFIX:",
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("DATABASE_URL", "postgres://x")],
                "DATABASE_URL:",
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("SCOPE_WILDCARDS", "maybe")],
                "SCOPE_WILDCARDS:",
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("SCOPE_CATALOGUE", "read:orders,*")],
                "SCOPE_CATALOGUE:",
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("LAST_USED_FLUSH_MS", "0")],
                "LAST_USED_FLUSH_MS:",
            ),
            (
                &[
                    ("ADMIN_TOKEN", TOKEN),
                    ("TRUSTED_PROXIES", "10.0.0.0/8, proxy"),
                ],
                "TRUSTED_PROXIES: \"proxy\"",
            ),
            (
                &[("ADMIN_TOKEN", TOKEN), ("MAX_CONNECTIONS", "0")],
                "MAX_CONNECTIONS:",
            ),
            (
                &[
                    ("ADMIN_TOKEN", TOKEN),
                    ("MAX_CONNECTIONS_PER_ADDRESS", "lots"),
                ],
                "MAX_CONNECTIONS_PER_ADDRESS:",
            ),
        ];
        for (vars, expected) in cases {
            let err = load(vars).expect_err("invalid");
            assert!(
                err.starts_with(expected),
                "{err} should start with {expected}"
            );
        }
    }

    #[test]
    fn several_admin_tokens_for_rotation_with_distinct_labels() {
        let two = format!("{TOKEN}, {}", "z".repeat(40));
        let c = load(&[("ADMIN_TOKEN", &two)]).expect("valid");
        assert_eq!(c.admin_tokens.len(), 2);
        assert_ne!(c.admin_tokens[0].label(), c.admin_tokens[1].label());
        assert!(
            !format!("{c:?}").contains(TOKEN),
            "Debug must not leak the token"
        );
    }

    #[test]
    fn ledger_settings_come_together_and_never_echo_the_url() {
        let secret = "ledger-signing-secret-for-config-tests";
        let url = "https://worker.example/v1/ledger/changes";
        let on = [
            ("ADMIN_TOKEN", TOKEN),
            ("LEDGER_URL", url),
            ("LEDGER_SIGNING_SECRET", secret),
        ];
        let c = load(&on).expect("valid").ledger.expect("ledger on");
        assert_eq!(c.url, url);
        assert_eq!(c.secret.as_bytes(), secret.as_bytes());
        assert_eq!(c.watermark_every, Duration::from_secs(1));
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert!(!format!("{c:?}").contains(secret), "Debug is redacted");
        assert!(
            load(&[("ADMIN_TOKEN", TOKEN)])
                .expect("valid")
                .ledger
                .is_none()
        );
        // The first setting of a name wins in `load`.
        let local = [
            &[("LEDGER_URL", "http://127.0.0.1:8787/v1/ledger/changes/")],
            &on[..],
        ]
        .concat();
        let local = load(&local).expect("loopback http").ledger.expect("on");
        assert_eq!(local.url, "http://127.0.0.1:8787/v1/ledger/changes");
        let cases: &[(&str, &str, &str)] = &[
            (
                "LEDGER_URL",
                "http://worker.example/v1/ledger/changes",
                "LEDGER_URL: must use https",
            ),
            (
                "LEDGER_URL",
                "https://worker.example/v1/usage",
                "LEDGER_URL: must be the Worker's append route",
            ),
            (
                "LEDGER_URL",
                "https://worker.example",
                "LEDGER_URL: must be the Worker's append route",
            ),
            (
                "LEDGER_URL",
                "https://user:pw@worker.example/v1/ledger/changes",
                "LEDGER_URL: must be scheme",
            ),
            (
                "LEDGER_URL",
                "https://worker.example/v1/ledger/changes?x=1",
                "LEDGER_URL: must be scheme",
            ),
            (
                "LEDGER_URL",
                "ftp://worker.example/v1/ledger/changes",
                "LEDGER_URL: must be an https",
            ),
            (
                "LEDGER_SIGNING_SECRET",
                "short",
                "LEDGER_SIGNING_SECRET: must be at least 32",
            ),
            (
                "LEDGER_SIGNING_SECRET",
                AUDIT_KEY,
                "LEDGER_SIGNING_SECRET: holds the same secret as AUDIT_CHAIN_KEY",
            ),
            ("LEDGER_WATERMARK_MS", "5000", "LEDGER_WATERMARK_MS:"),
            ("LEDGER_WATERMARK_MS", "50", "LEDGER_WATERMARK_MS:"),
            ("LEDGER_TIMEOUT_MS", "0", "LEDGER_TIMEOUT_MS:"),
        ];
        for (var, value, expected) in cases {
            let vars = [&[(*var, *value)][..], &on[..]].concat();
            let err = load(&vars).expect_err("invalid");
            assert!(
                err.starts_with(expected),
                "{err} should start with {expected}"
            );
            if *var == "LEDGER_URL" {
                assert!(!err.contains("worker.example"), "{err} echoes the URL");
            }
            assert!(!err.contains(secret) && !err.contains(AUDIT_KEY), "{err}");
        }
        let usage = [&on[..], &[("USAGE_SIGNING_SECRET", secret)]].concat();
        let err = load(&usage).expect_err("shared");
        assert!(
            err.contains("LEDGER_SIGNING_SECRET") && err.contains("USAGE_SIGNING_SECRET"),
            "{err}"
        );
        for (only, missing) in [
            (("LEDGER_URL", url), "LEDGER_SIGNING_SECRET: is required"),
            (("LEDGER_SIGNING_SECRET", secret), "LEDGER_URL: is required"),
        ] {
            let err = load(&[("ADMIN_TOKEN", TOKEN), only]).expect_err("half");
            assert!(err.starts_with(missing), "{err}");
        }
    }

    #[test]
    fn kv_read_back_and_reconciliation_settings() {
        let kv = [
            ("ADMIN_TOKEN", TOKEN),
            ("KV_API_BASE", "http://127.0.0.1:1/x"),
            ("KV_NAMESPACE_ID", "ns"),
        ];
        let c = load(&kv).expect("valid");
        let c = c.kv.expect("kv on");
        assert_eq!(c.verify_delay, Duration::from_secs(90));
        assert_eq!(c.reconcile_interval, Some(Duration::from_secs(3600)));
        let off = [&kv[..], &[("KV_RECONCILE_INTERVAL_S", "0")]].concat();
        assert_eq!(
            load(&off)
                .expect("valid")
                .kv
                .expect("kv")
                .reconcile_interval,
            None
        );
        for (var, bad) in [
            ("KV_WRITE_MODE", "sometimes"),
            ("KV_API_BUDGET", "1201"),
            ("KV_API_BUDGET", "0"),
            ("KV_VERIFY_DELAY_MS", "0"),
            ("KV_RECONCILE_INTERVAL_S", "-1"),
            ("KV_RECONCILE_INTERVAL_S", "604801"),
        ] {
            let vars = [&kv[..], &[(var, bad)]].concat();
            let err = load(&vars).expect_err("invalid");
            assert!(err.starts_with(var), "{err}");
        }
    }

    #[test]
    fn the_kv_api_is_reached_over_https_except_on_loopback() {
        let kv = |base: &str| {
            load(&[
                ("ADMIN_TOKEN", TOKEN),
                ("KV_API_BASE", base),
                ("KV_NAMESPACE_ID", "ns"),
            ])
        };
        for good in [
            "https://api.cloudflare.com/client/v4/accounts/0123",
            "http://127.0.0.1:8787/cdn-cgi/explorer/api",
            "http://localhost:8787/cdn-cgi/explorer/api",
            "http://[::1]:8787/cdn-cgi/explorer/api",
        ] {
            assert!(kv(good).is_ok(), "{good}");
        }
        // Before, a remote http:// base was accepted and the API token went in the clear.
        for (bad, why) in [
            (
                "http://kv.example/client/v4/accounts/0123",
                "must use https://",
            ),
            (
                "http://10.0.0.5:8787/cdn-cgi/explorer/api",
                "must use https://",
            ),
            (
                "https://user:pw@api.cloudflare.com/client/v4",
                "no query, fragment or user",
            ),
            (
                "ftp://api.cloudflare.com/client/v4",
                "must be an https:// URL",
            ),
        ] {
            let error = kv(bad).err().unwrap_or_default();
            assert!(
                error.starts_with("KV_API_BASE") && error.contains(why),
                "{bad}: {error}"
            );
            assert!(!error.contains("pw@"), "the URL is not echoed: {error}");
        }
    }

    #[test]
    fn kv_write_mode_and_budget_follow_the_api_unless_set() {
        let cloudflare = [
            ("ADMIN_TOKEN", TOKEN),
            (
                "KV_API_BASE",
                "https://api.cloudflare.com/client/v4/accounts/0123",
            ),
            ("KV_NAMESPACE_ID", "ns"),
        ];
        let kv = |vars: &[(&str, &str)]| load(vars).expect("valid").kv.expect("kv on");
        let c = kv(&cloudflare);
        assert_eq!((c.write_mode, c.api_budget), (WriteMode::Bulk, Some(1000)));
        let local = [
            ("ADMIN_TOKEN", TOKEN),
            ("KV_API_BASE", "http://127.0.0.1:8787/cdn-cgi/explorer/api/"),
            ("KV_NAMESPACE_ID", "ns"),
        ];
        let c = kv(&local);
        assert_eq!((c.write_mode, c.api_budget), (WriteMode::PerKey, None));
        let set = [
            &cloudflare[..],
            &[("KV_WRITE_MODE", "per_key"), ("KV_API_BUDGET", "600")],
        ]
        .concat();
        let c = kv(&set);
        assert_eq!((c.write_mode, c.api_budget), (WriteMode::PerKey, Some(600)));
        let set = [
            &local[..],
            &[("KV_WRITE_MODE", "bulk"), ("KV_API_BUDGET", "unlimited")],
        ]
        .concat();
        let c = kv(&set);
        assert_eq!((c.write_mode, c.api_budget), (WriteMode::Bulk, None));
    }
}
