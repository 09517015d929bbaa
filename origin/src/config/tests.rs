//! The configuration's table of settings and their refusals.

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
    assert_eq!(c.database_url.as_str(), "sqlite://data/latchkey.db");
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
            &[("ADMIN_TOKEN", TOKEN), ("DATABASE_URL", "mysql://x")],
            "DATABASE_URL:",
        ),
        (
            &[
                ("ADMIN_TOKEN", TOKEN),
                ("DATABASE_URL", "postgres://db/keys"),
            ],
            "AUDIT_CHECKPOINT_FILE:",
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

#[test]
fn the_configuration_printed_whole_shows_no_secret() {
    const PASSWORD: &str = "database-password-never-printed-91c2";
    let c = load(&[
        ("ADMIN_TOKEN", TOKEN),
        (
            "DATABASE_URL",
            &format!("postgres://origin:{PASSWORD}@db.example/keys?sslmode=verify-full"),
        ),
        ("AUDIT_CHECKPOINT_FILE", "/var/lib/origin/checkpoints"),
    ])
    .expect("valid");
    let printed = format!("{c:?}");
    assert!(
        printed.contains("postgres://origin:***@db.example/keys"),
        "{printed}"
    );
    for secret in [PASSWORD, TOKEN, AUDIT_KEY] {
        assert!(!printed.contains(secret), "{printed}");
    }
}
