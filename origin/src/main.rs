//! The `origin` command: `origin serve`, `origin audit verify`, `origin audit anchor`,
//! `origin sync --full`.

use std::io::IsTerminal;
use std::process::ExitCode;

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use latchkey_origin::audit::{self, AuditChain, ChainChecker, ChainError, Checkpoints};
use latchkey_origin::config::{self, Config, KvConfig};
use latchkey_origin::store::{self, KeyStore};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than the system allocator: a request makes a few dozen small allocations,
/// and glibc's malloc and free were 16% of verify's CPU time in the profile (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Latchkey's origin: issues, stores, verifies and revokes partner API keys. Settings come from
/// the environment (listed below; README.md, "Configuration", says more of each).
#[derive(Debug, Parser)]
#[command(name = "origin", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the key service.
    Serve,
    /// The audit log's chain (AUDIT_CHAIN_KEY, AUDIT_CHECKPOINT_FILE, DATABASE_URL).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print every HTTP route, its method and who may call it (JSON lines).
    Routes,
    /// Publish every key's current state to Workers KV (KV_API_BASE, KV_NAMESPACE_ID,
    /// KV_API_TOKEN), e.g. into a new namespace; safe while origin serves (KV only: a rebuild
    /// is not sent to the edge's change ledger).
    Sync {
        /// Every key (the only kind of sync there is; the flag says so).
        #[arg(long, required = true)]
        full: bool,
    },
    /// Copy a SQLite database into an empty PostgreSQL one (keys, the audit log with its
    /// chain, pending deliveries), then verify the copy's chain (AUDIT_CHAIN_KEY, and the
    /// checkpoints: AUDIT_CHECKPOINT_FILE, or the file beside the SQLite database). Stop every
    /// origin first.
    MigrateStore {
        /// The SQLite database: sqlite://path/to/latchkey.db.
        #[arg(long, value_name = "SQLITE_URL")]
        from: String,
        /// The PostgreSQL database: postgres://user@host/database.
        #[arg(long, value_name = "POSTGRES_URL")]
        to: String,
    },
    /// Print, for each endpoint of WEBHOOK_URLS, the secret its events are signed with (one per
    /// WEBHOOK_SECRET, in order): `<url> whsec_...`, one a line. Give each receiver its own
    /// line only.
    WebhookSecrets,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the chain against its checkpoints and the keys it accounts for; exits 1 if
    /// anything is wrong.
    Verify,
    /// Once, for a database written before AUDIT_CHAIN_KEY existed: check its unkeyed entries
    /// and chain a keyed entry onto them (origin serve refuses to start until then); prints
    /// what it anchored. Never on a database that ran with the key: unkeyed entries at its end
    /// mean the log was rewritten.
    Anchor,
}

fn main() -> ExitCode {
    // `--help` lists every environment variable; a usage error exits 2, as before.
    let environment = config::environment::help();
    let command = Cli::command()
        .after_help(environment.clone())
        .after_long_help(environment);
    let cli = match command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match cli.command {
        Command::Serve => {
            let config = match Config::from_env() {
                Ok(c) => c,
                Err(e) => return fail(&format!("configuration error: {e}")),
            };
            match runtime.block_on(latchkey_origin::serve::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::Audit(AuditCommand::Verify) => runtime.block_on(audit_verify()),
        Command::Audit(AuditCommand::Anchor) => runtime.block_on(audit_anchor()),
        Command::Routes => {
            for route in latchkey_origin::http::route_list() {
                match serde_json::to_string(&route) {
                    Ok(line) => out(&format!("{line}\n")),
                    Err(e) => return fail(&e.to_string()),
                }
            }
            ExitCode::SUCCESS
        }
        Command::Sync { full: _ } => runtime.block_on(sync_full()),
        Command::WebhookSecrets => webhook_secrets(),
        Command::MigrateStore { from, to } => runtime.block_on(migrate_store(&from, &to)),
    }
}

/// `origin webhook-secrets`: each endpoint's own signing secrets.
fn webhook_secrets() -> ExitCode {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let webhooks = match config::webhooks(&env) {
        Ok(Some(webhooks)) => webhooks,
        Ok(None) => return fail("WEBHOOK_URLS is unset: there is no endpoint"),
        Err(e) => return fail(&format!("configuration error: {e}")),
    };
    for endpoint in &webhooks.endpoints {
        for secret in &webhooks.secrets {
            let Some(own) = secret.for_endpoint(endpoint) else {
                return fail("cannot derive an endpoint's secret");
            };
            out(&format!("{} {}\n", endpoint.url(), own.to_whsec()));
        }
    }
    ExitCode::SUCCESS
}

/// What the `audit` commands read from the environment.
struct AuditEnv {
    url: String,
    key: latchkey_shared::sign::SigningSecret,
    checkpoint_file: Option<PathBuf>,
}

impl AuditEnv {
    fn from_env() -> Result<Self, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = env("DATABASE_URL").unwrap_or_else(|| "sqlite://data/latchkey.db".into());
        let key = config::audit_chain_key(&env).map_err(|e| format!("configuration error: {e}"))?;
        let checkpoint_file = env("AUDIT_CHECKPOINT_FILE")
            .map(|f| PathBuf::from(f.trim()))
            .or_else(|| store::default_checkpoint_path(&url));
        if checkpoint_file.is_none() && config::Backend::of(&url) == Ok(config::Backend::Postgres) {
            return Err(
                "configuration error: AUDIT_CHECKPOINT_FILE is required with a postgres:// \
                 DATABASE_URL (the checkpoints this origin wrote)"
                    .into(),
            );
        }
        Ok(Self {
            url,
            key,
            checkpoint_file,
        })
    }

    fn checkpoints_where(&self) -> String {
        self.checkpoint_file.as_ref().map_or_else(
            || "no checkpoint file".to_owned(),
            |f| f.display().to_string(),
        )
    }
}

async fn audit_anchor() -> ExitCode {
    let env = match AuditEnv::from_env() {
        Ok(env) => env,
        Err(e) => return fail(&e),
    };
    let where_ = env.checkpoints_where();
    let store = match store::open(&env.url, None).await {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot open {}: {e}", config::redacted(&env.url))),
    };
    let chain = AuditChain::new(env.key, env.checkpoint_file);
    let anchored = store.anchor_unkeyed(&chain).await;
    store.close().await;
    match anchored {
        Ok(a) => {
            let actions = a
                .actions
                .iter()
                .map(|(action, n)| format!("{n} {action}"))
                .collect::<Vec<_>>()
                .join(", ");
            out(&format!(
                "anchored {n} unkeyed entries (1-{n}, written {from} to {to}: {actions}; the newest hash {hash}) with keyed entry {seq} ({action}), checkpointed in {where_}\n\
                 From now on they cannot be changed unnoticed; what happened to them before now cannot be proven. Check them (GET /v1/audit_log) and run `origin audit verify`.\n",
                n = a.entries,
                from = datetime(a.written.0),
                to = datetime(a.written.1),
                hash = a.hash,
                seq = a.seq,
                action = audit::ACTION_CHAIN_KEYED,
            ));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// Unix milliseconds as RFC 3339 (UTC), or the number if it is out of range.
fn datetime(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

async fn audit_verify() -> ExitCode {
    let env = match AuditEnv::from_env() {
        Ok(env) => env,
        Err(e) => return fail(&e),
    };
    verify_chain(&env).await
}

/// `origin audit verify` of `env`'s database: prints the report and exits 0, or says what is
/// broken and exits 1.
async fn verify_chain(env: &AuditEnv) -> ExitCode {
    let (url, key) = (&env.url, &env.key);
    let text = match &env.checkpoint_file {
        None => String::new(),
        Some(file) => match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return fail(&format!("cannot read {}: {e}", file.display())),
        },
    };
    let where_ = env.checkpoints_where();
    let checkpoints = match Checkpoints::parse(key, &text) {
        Ok(c) => c,
        Err(e) => return fail(&format!("audit log BROKEN: {e} ({where_})")),
    };
    let store = match store::open(url, None).await {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot open {}: {e}", config::redacted(url))),
    };
    let mut checker = ChainChecker::new(Some(key), &checkpoints);
    let mut after = 0;
    let verdict = loop {
        let batch = match store.audit_log(None, after, 500).await {
            Ok(batch) => batch,
            Err(e) => break Err(format!("cannot read the audit log: {e}")),
        };
        let Some(last) = batch.last() else {
            break checker
                .finish()
                .map_err(|e| format!("audit log BROKEN: {e} (checkpoints: {where_})"));
        };
        after = last.seq;
        if let Err(e) = batch.iter().try_for_each(|entry| checker.check(entry)) {
            break Err(format!("audit log BROKEN: {e}"));
        }
    };
    // Every key is created with a `create` entry: keys without one were inserted behind
    // origin's back, or the log was wiped (with its checkpoints, nothing else would show it).
    let verdict = match verdict {
        Ok(s) => accounted_keys(store.as_ref(), s.entries).await.map(|()| s),
        Err(e) => Err(e),
    };
    store.close().await;
    match verdict {
        Ok(s) => {
            let mut report = format!(
                "audit log OK: {} entries, chain intact ({} keyed with AUDIT_CHAIN_KEY, {} unkeyed from before it)",
                s.entries, s.keyed, s.unkeyed
            );
            if let Some((seq, at, action)) = &s.anchor {
                report.push_str(&format!(
                    "; the unkeyed entries were anchored by entry {seq} ({action}) at {}",
                    datetime(*at)
                ));
            }
            if let Some(newest) = s.newest_checkpoint {
                report.push_str(&format!(
                    "; {} checkpoints in {where_}, the newest for entry {newest}",
                    checkpoints.len()
                ));
                if s.last_seq > newest {
                    report.push_str(&format!(
                        " (entries {}-{} have no checkpoint yet: their deletion would not be detected)",
                        newest + 1,
                        s.last_seq
                    ));
                }
            }
            if checkpoints.unreadable > 0 {
                report.push_str(&format!(
                    "; {} unreadable checkpoint lines ignored (torn writes)",
                    checkpoints.unreadable
                ));
            }
            out(&format!("{report}\n"));
            ExitCode::SUCCESS
        }
        Err(message) => fail(&message),
    }
}

/// Whether the audit log (of `entries` entries, its chain verified) accounts for every key.
/// One query, one snapshot: a key created meanwhile comes with its `create` entry.
async fn accounted_keys(store: &dyn KeyStore, entries: u64) -> Result<(), String> {
    let broken = |e: ChainError| format!("audit log BROKEN: {e}");
    match store.keys_without_create().await {
        Ok((0, _)) => Ok(()),
        Ok((keys, _)) if entries == 0 => Err(broken(ChainError::Wiped { keys })),
        Ok((keys, example)) => Err(broken(ChainError::Unaccounted {
            keys,
            example: example.unwrap_or_default(),
        })),
        Err(e) => Err(format!("cannot read the keys: {e}")),
    }
}

async fn sync_full() -> ExitCode {
    let kv = match KvConfig::from_env() {
        Ok(Some(kv)) => kv,
        Ok(None) => {
            return fail(
                "sync needs KV_API_BASE and KV_NAMESPACE_ID (and KV_API_TOKEN for Cloudflare)",
            );
        }
        Err(e) => return fail(&format!("configuration error: {e}")),
    };
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://data/latchkey.db".into());
    let store = match store::open(&url, None).await {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot open {}: {e}", config::redacted(&url))),
    };
    let result = latchkey_origin::jobs::sync::full(store.clone(), &kv).await;
    store.close().await;
    match result {
        Ok(summary) => {
            out(&format!(
                "synced {} keys to KV namespace {} in {:.1} s ({} written by this command, {} by the running origin; {} failed writes retried; {} KV API requests)\n",
                summary.queued,
                kv.namespace_id,
                summary.elapsed.as_secs_f64(),
                summary.published_here,
                summary.queued.saturating_sub(summary.published_here),
                summary.retries,
                summary.requests
            ));
            ExitCode::SUCCESS
        }
        Err(message) => fail(&format!("sync failed: {message}")),
    }
}

async fn migrate_store(from: &str, to: &str) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let key = match config::audit_chain_key(&env) {
        Ok(key) => key,
        Err(e) => {
            return fail(&format!(
                "configuration error: {e} (the copy's chain is verified with it)"
            ));
        }
    };
    let checkpoint_file = env("AUDIT_CHECKPOINT_FILE")
        .map(|f| PathBuf::from(f.trim()))
        .or_else(|| store::default_checkpoint_path(from));
    // The source's chain first: a broken one is not copied.
    if from.starts_with("sqlite:")
        && store::SqliteStore::database_file(from)
            .ok()
            .flatten()
            .is_some_and(|f| f.is_file())
        && verify_chain(&AuditEnv {
            url: from.to_owned(),
            key: key.clone(),
            checkpoint_file: checkpoint_file.clone(),
        })
        .await
            != ExitCode::SUCCESS
    {
        return fail("migrate-store: the source's audit log does not verify; nothing was copied");
    }
    let copied = match store::migrate::sqlite_to_postgres(from, to).await {
        Ok(copied) => copied,
        Err(e) => return fail(&format!("migrate-store failed: {e}")),
    };
    out(&format!(
        "copied {} keys, {} audit entries (newest {}), {} outbox rows waiting for delivery and {} other rows into {}\n",
        copied.keys,
        copied.audit_entries,
        copied
            .newest
            .as_ref()
            .map_or_else(|| "none".to_owned(), |(seq, hash)| format!("{seq}: {hash}")),
        copied.outbox_rows,
        copied.other_rows,
        config::redacted(to),
    ));
    if let Some(file) = &checkpoint_file {
        out(&format!(
            "the chain is the same: run origin on PostgreSQL with AUDIT_CHECKPOINT_FILE={} to keep checking it against its checkpoints\n",
            file.display()
        ));
    }
    verify_chain(&AuditEnv {
        url: to.to_owned(),
        key,
        checkpoint_file,
    })
    .await
}

#[allow(clippy::print_stdout, reason = "the command's answer goes to stdout")]
fn out(text: &str) {
    print!("{text}");
}

#[allow(clippy::print_stderr, reason = "fatal errors go to stderr")]
fn fail(message: &str) -> ExitCode {
    eprintln!("origin: {message}");
    ExitCode::FAILURE
}
