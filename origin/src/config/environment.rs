//! Every environment variable origin reads, with its default and a line on what it does: the
//! list `origin --help` prints (README.md's "Configuration" says more of each). A test holds it
//! against the names the configuration reads and the README's table.

/// One environment variable.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Its name.
    pub name: &'static str,
    /// Its value when unset (`required` when it must be set).
    pub default: &'static str,
    /// What it sets.
    pub what: &'static str,
}

const fn var(name: &'static str, default: &'static str, what: &'static str) -> Variable {
    Variable {
        name,
        default,
        what,
    }
}

/// Every variable, grouped as README.md's table is.
pub const VARIABLES: &[Variable] = &[
    var(
        "ADMIN_TOKEN",
        "required",
        "admin bearer tokens, comma-separated (>= 24 characters each)",
    ),
    var("ORIGIN_LISTEN", "127.0.0.1:8080", "address to serve on"),
    var(
        "DATABASE_URL",
        "sqlite://data/latchkey.db",
        "the SQLite database file",
    ),
    var("KEY_PREFIX", "sk_live", "prefix of new keys"),
    var(
        "SCOPE_WILDCARDS",
        "false",
        "allow trailing-wildcard grants such as read:*",
    ),
    var(
        "SCOPE_CATALOGUE",
        "unset",
        "the only scopes that may be granted, comma-separated",
    ),
    var(
        "LAST_USED_FLUSH_MS",
        "5000",
        "how often last_used_at is written",
    ),
    var(
        "KV_API_BASE",
        "unset",
        "Cloudflare's KV API base (with KV_NAMESPACE_ID: publishing on)",
    ),
    var("KV_NAMESPACE_ID", "unset", "the KV namespace's id"),
    var("KV_API_TOKEN", "unset", "the Cloudflare API token"),
    var("KV_WRITE_MODE", "auto", "bulk, per_key or auto"),
    var(
        "KV_API_BUDGET",
        "1000",
        "KV API requests per five minutes (10-1200, or unlimited)",
    ),
    var("KV_REQUEST_TIMEOUT_MS", "10000", "limit on one KV request"),
    var(
        "KV_RETRY_MAX_MS",
        "10000",
        "longest wait between retries of a KV write",
    ),
    var(
        "KV_VERIFY_DELAY_MS",
        "90000",
        "when a write with an unknown outcome is read back",
    ),
    var(
        "KV_RECONCILE_INTERVAL_S",
        "3600",
        "how often all of KV is compared (0: never)",
    ),
    var(
        "LEDGER_URL",
        "unset",
        "the Worker's ledger route (with LEDGER_SIGNING_SECRET: the ledger is fed)",
    ),
    var(
        "LEDGER_SIGNING_SECRET",
        "unset",
        "the secret ledger appends are signed with",
    ),
    var(
        "LEDGER_WATERMARK_MS",
        "1000",
        "longest time between two watermarks",
    ),
    var("LEDGER_TIMEOUT_MS", "2000", "limit on one append"),
    var(
        "USAGE_SIGNING_SECRET",
        "unset",
        "the edge's usage-report secret (unset: POST /v1/usage off)",
    ),
    var(
        "AUDIT_CHAIN_KEY",
        "required",
        "the key of the audit log's chain",
    ),
    var(
        "AUDIT_CHECKPOINT_FILE",
        "<database>.audit-checkpoints",
        "where the chain's checkpoints go",
    ),
    var(
        "REQUEST_READ_TIMEOUT_MS",
        "10000",
        "how long a client may take to send headers, then body",
    ),
    var(
        "ADMIN_AUTH_FAILURES_PER_MINUTE",
        "20",
        "wrong admin tokens per client and minute before 429",
    ),
    var(
        "TRUSTED_PROXIES",
        "unset",
        "proxies whose X-Forwarded-For is believed",
    ),
    var("MAX_CONNECTIONS", "1024", "open connections served at once"),
    var(
        "MAX_CONNECTIONS_PER_ADDRESS",
        "256",
        "open connections at once from one address (IPv6: /64)",
    ),
    var(
        "LEAK_ACTION",
        "revoke",
        "what a leak report does: revoke or flag",
    ),
    var(
        "GITHUB_SECRET_SCANNING_KEYS_FILE",
        "unset",
        "GitHub's secret scanning keys, as a file",
    ),
    var(
        "GITHUB_SECRET_SCANNING_KEYS_URL",
        "unset",
        "where to fetch GitHub's secret scanning keys",
    ),
    var(
        "GITHUB_SECRET_SCANNING_KEYS_REFRESH_S",
        "3600",
        "how often that URL is fetched again",
    ),
    var(
        "WEBHOOK_URLS",
        "unset",
        "endpoints key events are delivered to, comma-separated",
    ),
    var(
        "WEBHOOK_SECRET",
        "unset",
        "Standard Webhooks secrets (whsec_...), comma-separated",
    ),
    var(
        "WEBHOOK_SIGN_WITH_SHARED_SECRET",
        "false",
        "also sign with WEBHOOK_SECRET itself",
    ),
    var("WEBHOOK_TIMEOUT_MS", "10000", "limit on one delivery"),
    var(
        "WEBHOOK_RETRY_MAX_MS",
        "300000",
        "longest wait between two delivery attempts",
    ),
    var(
        "STALE_KEY_AFTER",
        "unset",
        "idle time after which a key is switched off (60d, 12h)",
    ),
    var(
        "STALE_KEY_USAGE_MAX_AGE",
        "1h",
        "the stale-key policy waits while usage reports are older",
    ),
    var(
        "STALE_WARNING_BEFORE",
        "7d",
        "how long before that api_key.stale is sent",
    ),
    var(
        "EXPIRY_WARNING_BEFORE",
        "unset",
        "how long before its expiry api_key.expiring is sent",
    ),
    var("KEY_POLICY_INTERVAL", "10m", "how often the policies run"),
    var("RUST_LOG", "info", "log filter"),
];

/// The list as `--help` prints it: a line a variable.
pub fn help() -> String {
    let mut text =
        String::from("Environment (origin serve; README.md, \"Configuration\", says more):\n");
    for v in VARIABLES {
        text.push_str(&format!("  {} [{}]\n      {}\n", v.name, v.default, v.what));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::VARIABLES;

    /// Every name the configuration reads is listed, and every listed name is in the README's
    /// table: the list cannot fall behind the code or the documentation.
    #[test]
    fn the_list_holds_every_variable_read_and_documented() {
        let sources = [
            include_str!("mod.rs"),
            include_str!("kv.rs"),
            include_str!("ledger.rs"),
            include_str!("webhooks.rs"),
            include_str!("policy.rs"),
            include_str!("leaks.rs"),
            include_str!("admin.rs"),
            include_str!("proxies.rs"),
        ];
        let listed: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        for source in sources {
            for quoted in source.split('"').skip(1).step_by(2) {
                let is_name = quoted.len() > 3
                    && quoted.starts_with(|c: char| c.is_ascii_uppercase())
                    && quoted
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if is_name {
                    assert!(listed.contains(&quoted), "{quoted} is read but not listed");
                }
            }
        }
        let readme = include_str!("../../../README.md");
        for name in &listed {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "{name} is listed but not in README.md's table"
            );
        }
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), listed.len(), "a name is listed twice");
    }
}
