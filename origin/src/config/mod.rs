//! Configuration, read from the environment in one place. Every problem names its variable.
//!
//! A leaf: it imports nothing of origin's. Each part's settings have a file of their own here
//! (`database`, `kv`, `ledger`, `webhooks`, `policy`, `leaks`, `admin`, `proxies`), which the part imports;
//! `Config` gathers them for `origin serve`.

mod admin;
mod database;
pub mod environment;
mod kv;
mod leaks;
mod ledger;
mod policy;
mod proxies;
mod webhooks;

pub use admin::{AdminToken, MIN_ADMIN_TOKEN_LEN};
pub use database::{Backend, DatabaseUrl, redacted};
pub use kv::{CLOUDFLARE_LIMIT, KvConfig, WriteMode};
pub use leaks::{KeySources, LeakAction};
pub use ledger::LedgerConfig;
pub use policy::KeyPolicy;
pub use proxies::TrustedProxies;
pub use webhooks::{Endpoint, WebhookConfig, WebhookSecret, webhooks};

use leaks::github_keys;
use policy::key_policy;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use latchkey_shared::sign::{SigningSecret, shared_secret};
use latchkey_shared::{KeyPrefix, Scope, ScopePolicy};

/// Everything origin needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ORIGIN_LISTEN`: address to serve on.
    pub listen: SocketAddr,
    /// `DATABASE_URL`: the database (a SQLite file or a PostgreSQL server).
    pub database_url: DatabaseUrl,
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
    pub github_keys: KeySources,
    /// `LEAK_ACTION`: `revoke` (the default) or `flag`, what a leak report does to the key.
    pub leak_action: LeakAction,
    /// `WEBHOOK_URLS`, `WEBHOOK_SECRET`, `WEBHOOK_TIMEOUT_MS`, `WEBHOOK_RETRY_MAX_MS`: where key
    /// events are delivered; `None` (no URL) turns event webhooks off.
    pub webhooks: Option<WebhookConfig>,
    /// `STALE_KEY_AFTER`, `STALE_WARNING_BEFORE`, `EXPIRY_WARNING_BEFORE`,
    /// `KEY_POLICY_INTERVAL`: the key lifecycle policies (all off by default).
    pub key_policy: KeyPolicy,
}

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    var: &'static str,
    problem: String,
}

pub(crate) fn problem(var: &'static str, problem: impl Into<String>) -> ConfigError {
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
        let backend = Backend::of(&database_url).map_err(|why| problem("DATABASE_URL", why))?;
        if backend == Backend::Postgres && var("AUDIT_CHECKPOINT_FILE").is_none() {
            return Err(problem(
                "AUDIT_CHECKPOINT_FILE",
                "is required with a postgres:// DATABASE_URL (there is no database file to keep \
                 it beside): a file of this origin's own, on other storage than the database, so \
                 that a deletion of the audit log's newest entries is detected",
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
            database_url: database_url.into(),
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
                None | Some("revoke") => LeakAction::Revoke,
                Some("flag") => LeakAction::Flag,
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
pub(crate) fn millis(
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
mod tests;
