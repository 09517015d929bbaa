//! SQLite storage: one writer connection (writes are serialised in process, so transactions never
//! fight over SQLite's lock) and a small pool of read-only connections (WAL lets them read while
//! the writer commits).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use latchkey_shared::ip::IpAllowlist;
use latchkey_shared::{KeyHash, KeyId, ScopeSet, UnixMillis};
use serde_json::{Map, Value};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::{KeyStore, StoreError};
use crate::audit::{self, Anchored, AuditChain, ChainChecker, Checkpoints};
use crate::model::{
    AuditEntry, AuditEvent, KeyPage, ListFilter, OutboxEntry, OutboxStats, PolicyQuery, Sink,
    StoredKey, VerifyEntry,
};

const KEY_COLUMNS: &str = "id, secret_hash, hint, name, subject, description, scopes, claims, created_by, \
     expiration, revoked, revoked_at, revocation_reason, last_used_at, created_at, updated_at, revision, \
     disabled, allowed_ips, rolled_from, rolled_to, leaked_at, leak_source, key_type, deleted_at";

/// The columns a change may write: every column but the key's identity, its creation and its
/// use (`last_used_at` is written by the usage flush alone).
const CHANGEABLE_COLUMNS: &[&str] = &[
    "name",
    "subject",
    "description",
    "scopes",
    "claims",
    "expiration",
    "revoked",
    "revoked_at",
    "revocation_reason",
    "updated_at",
    "revision",
    "disabled",
    "allowed_ips",
    "rolled_to",
    "leaked_at",
    "leak_source",
    "deleted_at",
];

type KeyQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds `key`'s value of `column` (a name from [`KEY_COLUMNS`]): the one place that says how
/// a field is stored.
fn bind_column<'q>(query: KeyQuery<'q>, key: &'q StoredKey, column: &str) -> KeyQuery<'q> {
    match column {
        "id" => query.bind(key.id.as_str()),
        "secret_hash" => query.bind(key.hash.as_bytes().as_slice()),
        "hint" => query.bind(&key.hint),
        "name" => query.bind(&key.name),
        "subject" => query.bind(&key.subject),
        "description" => query.bind(&key.description),
        "scopes" => query.bind(json_text(&key.scopes)),
        "claims" => query.bind(key.claims.as_ref().map(json_text)),
        "created_by" => query.bind(&key.created_by),
        "expiration" => query.bind(key.expiration.map(|t| t.0)),
        "revoked" => query.bind(key.revoked),
        "revoked_at" => query.bind(key.revoked_at.map(|t| t.0)),
        "revocation_reason" => query.bind(&key.revocation_reason),
        "last_used_at" => query.bind(key.last_used_at.map(|t| t.0)),
        "created_at" => query.bind(key.created_at.0),
        "updated_at" => query.bind(key.updated_at.0),
        "revision" => query.bind(key.revision),
        "disabled" => query.bind(key.disabled),
        // The list as JSON, or NULL for none.
        "allowed_ips" => {
            query.bind((!key.allowed_ips.is_empty()).then(|| json_text(&key.allowed_ips)))
        }
        "rolled_from" => query.bind(key.rolled_from.as_ref().map(KeyId::as_str)),
        "rolled_to" => query.bind(key.rolled_to.as_ref().map(KeyId::as_str)),
        "leaked_at" => query.bind(key.leaked_at.map(|t| t.0)),
        "leak_source" => query.bind(&key.leak_source),
        "key_type" => query.bind(&key.key_type),
        "deleted_at" => query.bind(key.deleted_at.map(|t| t.0)),
        #[allow(
            clippy::panic,
            reason = "a programming error, caught by every test that writes a key"
        )]
        other => panic!("no stored field for column {other}"),
    }
}

fn key_columns() -> impl Iterator<Item = &'static str> {
    KEY_COLUMNS.split(',').map(str::trim)
}

/// `INSERT` of a whole key, its values bound in [`KEY_COLUMNS`] order.
static INSERT_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let placeholders = vec!["?"; key_columns().count()].join(", ");
    format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({placeholders})")
});

/// `UPDATE` of a key's [`CHANGEABLE_COLUMNS`], if its revision is still the expected one.
static UPDATE_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let set: Vec<String> = CHANGEABLE_COLUMNS
        .iter()
        .map(|c| format!("{c} = ?"))
        .collect();
    format!(
        "UPDATE api_keys SET {} WHERE id = ? AND revision = ?",
        set.join(", ")
    )
});

async fn insert_key(conn: &mut SqliteConnection, key: &StoredKey) -> Result<(), StoreError> {
    key_columns()
        .fold(sqlx::query(&INSERT_KEY), |q, c| bind_column(q, key, c))
        .execute(conn)
        .await?;
    Ok(())
}

/// `false`: the key is not at `expected_revision` any more, and nothing was written.
async fn update_key(
    conn: &mut SqliteConnection,
    key: &StoredKey,
    expected_revision: i64,
) -> Result<bool, StoreError> {
    let updated = CHANGEABLE_COLUMNS
        .iter()
        .fold(sqlx::query(&UPDATE_KEY), |q, c| bind_column(q, key, c))
        .bind(key.id.as_str())
        .bind(expected_revision)
        .execute(conn)
        .await?;
    Ok(updated.rows_affected() == 1)
}

/// A SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    /// Reads for requests (or, in the copy [`SqliteStore::for_background`] makes, for the
    /// background roles).
    reader: SqlitePool,
    /// The background roles' own read connections: requests cannot take their turn.
    background: SqlitePool,
    file: Option<PathBuf>,
    /// Key changes go to the group-commit task.
    changes: mpsc::Sender<Pending>,
    /// Verify's lookup by hash (`None` for an in-memory database).
    hot: Option<Arc<HotReads>>,
    /// Write transactions this process has committed (see [`HotReads`]).
    commits: Arc<AtomicU64>,
    /// Whether the ledger sink is fed (see [`SqliteStore::set_ledger_sink`]).
    ledger_sink: bool,
}

/// The writer's durability settings, read back from SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// `PRAGMA journal_mode`: `wal` for a file (`memory` for an in-memory database).
    pub journal_mode: String,
    /// `PRAGMA synchronous`: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
    pub synchronous: i64,
}

impl Durability {
    /// Whether an acknowledged commit survives a crash and a power cut: WAL, and a sync of the
    /// WAL at every commit (`FULL` or `EXTRA`; `NORMAL` syncs only at checkpoints, so a power
    /// cut can lose the newest commits).
    pub fn check(&self) -> Result<(), StoreError> {
        if self.journal_mode == "wal" && self.synchronous >= 2 {
            Ok(())
        } else {
            Err(StoreError::NotDurable(format!(
                "the database runs with journal_mode={} synchronous={}, not journal_mode=wal \
                 synchronous=full (is it on a filesystem without shared memory, such as a \
                 network share?)",
                self.journal_mode,
                self.synchronous_name()
            )))
        }
    }

    /// `synchronous` by name.
    pub fn synchronous_name(&self) -> &'static str {
        match self.synchronous {
            0 => "off",
            1 => "normal",
            2 => "full",
            3 => "extra",
            _ => "unknown",
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url`, and runs the embedded migrations.
    /// Without `chain`, the store can read the audit log but not append to it (`origin audit
    /// verify`, `origin audit anchor`, `origin sync`). With it, the chain's newest entry must
    /// verify with its key: a chain that ends with unkeyed entries is refused (see
    /// [`SqliteStore::anchor_unkeyed`]).
    pub async fn open(url: &str, chain: Option<Arc<AuditChain>>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged, so no acknowledged write is
            // lost to a crash or power cut.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        if let Some(parent) = options
            .get_filename()
            .parent()
            .filter(|p| *p != Path::new(""))
        {
            std::fs::create_dir_all(parent)?;
        }
        let file = (!url.contains(":memory:")).then(|| options.get_filename().to_path_buf());
        if let Some(file) = &file {
            make_database_private(file);
        }
        let (writer, options, immutable) = match open_writer(&options, file.is_some()).await {
            Err(error) if file.as_deref().is_some_and(|f| needs_immutable(f, &error)) => {
                tracing::warn!(
                    %error,
                    "the database's filesystem is read-only and its WAL was folded in at the last \
                     clean shutdown, so SQLite cannot read it in WAL mode: opened as an immutable \
                     file; writes are refused until origin restarts on a writable filesystem"
                );
                let options = options.immutable(true);
                let writer = open_writer(&options, false).await?;
                (writer, options, true)
            }
            writer => (writer?, options, false),
        };
        sqlx::migrate!("./migrations").run(&writer).await?;
        let commits = Arc::new(AtomicU64::new(0));
        if let Some(chain) = &chain {
            check_chain_at_start(&writer, chain).await?;
        }
        let options = options.read_only(true);
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        // Opened on first use: `origin audit verify` and the like never need them.
        let background = SqlitePoolOptions::new()
            .max_connections(BACKGROUND_READERS)
            .connect_lazy_with(options);
        let (changes, queue) = mpsc::channel(4 * GROUP_MAX);
        tokio::spawn(group_commit(writer.clone(), commits.clone(), chain, queue));
        // Where the synchronous connections cannot open (a read-only filesystem, say), verify
        // reads through the sqlx pool like everything else: slower, as correct.
        let hot = file.as_deref().filter(|_| !immutable).and_then(|path| {
            match HotReads::open(path, HOT_READERS, commits.clone()) {
                Ok(hot) => {
                    let hot = Arc::new(hot);
                    tokio::spawn(end_old_snapshots(Arc::downgrade(&hot)));
                    Some(hot)
                }
                Err(error) => {
                    tracing::warn!(%error, "verify lookups go through the pool");
                    None
                }
            }
        });
        Ok(Self {
            writer,
            reader,
            background,
            file,
            changes,
            hot,
            commits,
            ledger_sink: true,
        })
    }

    /// The same database for the background roles (the KV and ledger publishers, the webhook
    /// deliverers): its reads go through connections of their own, so requests (a flood of
    /// `/healthz`, say) never hold up a publisher's turn, nor the reverse. Writes share the one
    /// writer, as every write does.
    #[must_use]
    pub fn for_background(&self) -> Self {
        Self {
            reader: self.background.clone(),
            ..self.clone()
        }
    }

    /// Says whether the change ledger is fed (`LEDGER_URL` set); it is unless told otherwise.
    /// Without it, nobody clears the outbox rows' ledger flags: so KV's acknowledgement clears
    /// them too, and the flags left by an earlier run that fed the ledger are cleared now
    /// (returns how many rows were released). Only `origin serve`, which runs the ledger
    /// publisher when it is configured, turns it off, and only while it holds the ledger lock
    /// (another origin over the same database may feed the ledger).
    pub async fn set_ledger_sink(&mut self, enabled: bool) -> Result<u64, StoreError> {
        self.ledger_sink = enabled;
        if enabled {
            return Ok(0);
        }
        // Read first: a database opened read-only (a read-only filesystem) still starts.
        let (waiting,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM kv_outbox WHERE ledger_pending = 1")
                .fetch_one(&self.reader)
                .await?;
        if waiting == 0 {
            return Ok(0);
        }
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        let released =
            sqlx::query("UPDATE kv_outbox SET ledger_pending = 0 WHERE ledger_pending = 1")
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("DELETE FROM kv_outbox WHERE kv_pending = 0 AND ledger_pending = 0")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }

    /// Hands `change` to the group-commit task and waits until it is on disk.
    async fn commit(&self, change: Change) -> Result<bool, StoreError> {
        let (done, outcome) = oneshot::channel();
        self.changes
            .send(Pending { change, done })
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?;
        outcome
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
    }

    /// The database file (`None` for an in-memory database).
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The database file a `sqlite:` URL names (`None` for an in-memory database).
    pub fn database_file(url: &str) -> Result<Option<PathBuf>, StoreError> {
        if url.contains(":memory:") {
            return Ok(None);
        }
        Ok(Some(
            SqliteConnectOptions::from_str(url)?
                .get_filename()
                .to_path_buf(),
        ))
    }

    /// Keys the audit log does not account for: how many have no `create` entry, and the
    /// first of them (every key is created with one).
    pub async fn keys_without_create(&self) -> Result<(u64, Option<String>), StoreError> {
        let (n, first): (i64, Option<String>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(id) FROM api_keys k WHERE NOT EXISTS \
             (SELECT 1 FROM audit_log a WHERE a.key_id = k.id AND a.action = 'create')",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok((u64::try_from(n).unwrap_or(0), first))
    }

    /// `origin audit anchor`: the operator's one-time step for a database written before
    /// `AUDIT_CHAIN_KEY` existed. Checks, in one write transaction, that the log is an intact
    /// chain of unkeyed entries (none of them an `audit_chain_keyed` entry, which only a keyed
    /// chain has) with no checkpoints taken of it, then appends a keyed `audit_chain_keyed`
    /// entry chained onto them and checkpoints it. Refuses anything else, naming why.
    pub async fn anchor_unkeyed(&self, chain: &AuditChain) -> Result<Anchored, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        let newest: Option<(i64, i64)> =
            sqlx::query_as("SELECT seq, chain FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let last = newest.map_or(0, |(seq, _)| seq);
        refuse_truncated(chain, last)?;
        let newest_chain = match newest {
            None => {
                return Err(StoreError::Audit(
                    "nothing to anchor: the audit log is empty".into(),
                ));
            }
            Some((_, chain)) => chain,
        };
        if newest_chain != audit::CHAIN_UNKEYED {
            return Err(StoreError::Audit(format!(
                "nothing to anchor: the newest audit entry ({last}) is keyed (anchored already, \
                 or written with AUDIT_CHAIN_KEY); {VERIFY_HINT}"
            )));
        }
        refuse_checkpointed(chain, last)?;
        let none = Checkpoints::default();
        let mut checker = ChainChecker::new(Some(chain.key()), &none);
        let mut actions = BTreeMap::<String, u64>::new();
        let mut written = (0, 0);
        let mut hash = String::new();
        let mut after = 0;
        loop {
            let rows: Vec<AuditRow> = sqlx::query_as(
                "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain \
                 FROM audit_log WHERE seq > ? ORDER BY seq LIMIT 500",
            )
            .bind(after)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let entry = audit_entry(row)?;
                checker.check(&entry).map_err(|e| {
                    StoreError::Audit(format!("not anchored, the chain does not hold: {e}"))
                })?;
                if entry.action == audit::ACTION_CHAIN_KEYED {
                    return Err(StoreError::Audit(format!(
                        "not anchored: entry {} is an unkeyed `{}` entry, which only a keyed chain \
                         has: the log was keyed once and rewritten without the key; {VERIFY_HINT}",
                        entry.seq,
                        audit::ACTION_CHAIN_KEYED
                    )));
                }
                if entry.seq == 1 {
                    written.0 = entry.at;
                }
                written.1 = entry.at;
                *actions.entry(entry.action).or_default() += 1;
                after = entry.seq;
                hash = entry.hash;
            }
        }
        let event = AuditEvent {
            at: UnixMillis(system_millis()),
            actor: "origin".into(),
            action: audit::ACTION_CHAIN_KEYED,
            key_id: None,
            details: serde_json::json!({ "unkeyed_entries": last, "unkeyed_hash": hash }),
        };
        let (seq, keyed_hash, at) = append_audit(&mut tx, Some(chain), &event).await?;
        tx.commit().await?;
        chain.checkpoint(seq, &keyed_hash, at);
        Ok(Anchored {
            entries: last,
            written,
            actions,
            hash,
            seq,
        })
    }

    /// The writer connection's durability settings, as SQLite reports them.
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        durability(&self.writer).await
    }
}

/// The writer's pool, its durability checked (a file's) before it takes a write.
async fn open_writer(
    options: &SqliteConnectOptions,
    check_durability: bool,
) -> Result<SqlitePool, StoreError> {
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    if check_durability {
        durability(&writer).await?.check()?;
    }
    Ok(writer)
}

/// Whether `error`, met opening `file`, is SQLite unable to read a WAL database on a read-only
/// filesystem, in a state where reading it as immutable is safe (see [`OnDisk::immutable_is_safe`]).
fn needs_immutable(file: &Path, error: &StoreError) -> bool {
    const SQLITE_CANTOPEN: i32 = 14;
    let beside = |suffix: &str| PathBuf::from(format!("{}{suffix}", file.display()));
    let exists = |path: &Path| match std::fs::metadata(path) {
        Ok(meta) => Some(Some(meta.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
        Err(_) => None,
    };
    let on_disk = OnDisk {
        cannot_open: error.sqlite_code() == Some(SQLITE_CANTOPEN),
        database: file.is_file(),
        wal: exists(&beside("-wal")),
        shm: exists(&beside("-shm")),
        read_only: std::fs::OpenOptions::new()
            .append(true)
            .open(file)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ReadOnlyFilesystem),
    };
    on_disk.immutable_is_safe()
}

/// What an immutable open of a database depends on.
#[derive(Debug, Clone, Copy)]
struct OnDisk {
    /// SQLite answered `SQLITE_CANTOPEN`.
    cannot_open: bool,
    /// The database file exists.
    database: bool,
    /// The `-wal` file: `Some(None)` absent, `Some(Some(len))` present, `None` unknown.
    wal: Option<Option<u64>>,
    /// The `-shm` file, likewise.
    shm: Option<Option<u64>>,
    /// The filesystem refuses writes.
    read_only: bool,
}

impl OnDisk {
    /// An immutable open reads the database file alone, with no WAL and no locks. That is
    /// safe only on a read-only filesystem (nothing writes through it) with no WAL index and
    /// no WAL frames to miss: no `-wal` file, or an empty one (the last connection of a clean
    /// shutdown folds the WAL in and deletes both). Anything unknown is refused: a WAL with
    /// frames read past would hide acknowledged writes.
    fn immutable_is_safe(&self) -> bool {
        self.cannot_open
            && self.database
            && self.read_only
            && matches!(self.wal, Some(None | Some(0)))
            && self.shm == Some(None)
    }
}

async fn durability(writer: &SqlitePool) -> Result<Durability, StoreError> {
    let mut conn = writer.acquire().await?;
    let (journal_mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await?;
    let (synchronous,): (i64,) = sqlx::query_as("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Durability {
        journal_mode: journal_mode.to_ascii_lowercase(),
        synchronous,
    })
}

/// The database holds key hashes and the audit log: its file is created readable and writable
/// by its owner alone (0600, whatever the umask), and an existing one (with its WAL and
/// shared-memory files, which SQLite creates with the database file's mode) is tightened.
/// Failing to (a read-only filesystem) is logged, not fatal.
fn make_database_private(file: &Path) {
    if !file.exists() {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        // An empty file is a new database to SQLite. If this fails, SQLite reports why.
        let _ = options.open(file);
    }
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", file.display()));
        if path.exists()
            && let Err(error) = audit::make_private(&path)
        {
            tracing::warn!(%error, file = %path.display(), "cannot make the database file private (0600)");
        }
    }
}

/// At start with a key: the log must not end before the newest checkpoint (entries deleted),
/// and its newest entry must verify with the key (else the key changed, or the log was edited:
/// refuse to write onto it). A chain that ends with unkeyed entries is refused too: it predates
/// the key (the operator anchors it once with `origin audit anchor`) or was rewritten without
/// the key, and origin cannot tell which, so it never anchors one itself. Ends with a
/// checkpoint of the newest entry.
async fn check_chain_at_start(writer: &SqlitePool, chain: &AuditChain) -> Result<(), StoreError> {
    let newest: Option<AuditRow> = sqlx::query_as(
        "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain FROM audit_log \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(writer)
    .await?;
    let last = newest.as_ref().map_or(0, |row| row.0);
    refuse_truncated(chain, last)?;
    let Some(row) = newest else {
        // Every key is created with an audit entry: keys without any entry mean a wiped log,
        // and a fresh chain must not be written over the wipe.
        let keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(writer)
            .await?;
        if keys > 0 {
            return Err(StoreError::Audit(format!(
                "the audit log is empty but the database holds {keys} keys: the log was wiped; \
                 restore the database from a backup and {VERIFY_HINT}"
            )));
        }
        return Ok(());
    };
    let (seq, at, actor, action, key_id, details, prev_hash, hash, version) = row;
    match version {
        audit::CHAIN_KEYED => {
            let expected = audit::entry_mac(
                chain.key(),
                &audit::EntryFields {
                    prev_hash: &prev_hash,
                    seq,
                    at,
                    actor: &actor,
                    action: &action,
                    key_id: key_id.as_deref(),
                    details_json: &details,
                },
            );
            if !audit::same(&expected, &hash) {
                return Err(StoreError::Audit(format!(
                    "the newest audit entry ({seq}) does not verify with AUDIT_CHAIN_KEY: the key \
                     is not the one the log was written with, or the entry was edited; {VERIFY_HINT}"
                )));
            }
            chain.checkpoint(seq, &hash, at);
            Ok(())
        }
        audit::CHAIN_UNKEYED => {
            refuse_checkpointed(chain, seq)?;
            Err(StoreError::Audit(format!(
                "the newest audit entry ({seq}) is unkeyed, and origin never anchors unkeyed \
                 entries itself: if this database was written before AUDIT_CHAIN_KEY existed, run \
                 `origin audit anchor` once (same DATABASE_URL and AUDIT_CHAIN_KEY) and read what \
                 it anchors; if it ever ran with AUDIT_CHAIN_KEY, its log was rewritten without \
                 the key: do not anchor it, restore the database from a backup and {VERIFY_HINT}"
            )))
        }
        other => Err(StoreError::Audit(format!(
            "the newest audit entry ({seq}) has chain version {other}, unknown to this build"
        ))),
    }
}

const VERIFY_HINT: &str =
    "run `origin audit verify` (with the same DATABASE_URL and AUDIT_CHAIN_KEY)";

/// Refuses a log that ends at `last`, before the newest checkpoint at the end of the
/// checkpoint file: its newest entries were deleted.
fn refuse_truncated(chain: &AuditChain, last: i64) -> Result<(), StoreError> {
    match chain.newest_checkpoint() {
        Some(checkpoint) if checkpoint > last => Err(StoreError::Audit(format!(
            "the audit log ends at entry {last}, but {} holds a checkpoint for entry \
             {checkpoint}: its newest entries were deleted (if the database was restored from an \
             older copy, archive the checkpoint file with the copy it belongs to); {VERIFY_HINT}",
            chain
                .checkpoint_path()
                .map_or_else(String::new, |p| p.display().to_string())
        ))),
        _ => Ok(()),
    }
}

/// Refuses unkeyed entries at the end of a chain that has checkpoints: they were taken from a
/// keyed chain, so it was rewritten without the key.
fn refuse_checkpointed(chain: &AuditChain, seq: i64) -> Result<(), StoreError> {
    match chain.checkpoint_path() {
        Some(path) if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) => {
            Err(StoreError::Audit(format!(
                "the newest audit entry ({seq}) is unkeyed, but {} holds checkpoints of a keyed \
                 chain: the log was rewritten without the key; {VERIFY_HINT}",
                path.display()
            )))
        }
        _ => Ok(()),
    }
}

fn system_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An audit row: seq, at, actor, action, key_id, details, prev_hash, hash, chain.
type AuditRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    i64,
);

fn audit_entry(row: AuditRow) -> Result<AuditEntry, StoreError> {
    let (seq, at, actor, action, key_id, details_json, prev_hash, hash, chain) = row;
    let details = serde_json::from_str(&details_json).map_err(|e| StoreError::Corrupt {
        id: format!("audit_log seq {seq}"),
        problem: e.to_string(),
    })?;
    Ok(AuditEntry {
        seq,
        at,
        actor,
        action,
        key_id,
        details,
        details_json,
        prev_hash,
        hash,
        chain,
    })
}

/// Read-only connections for verify's lookup by hash, used synchronously on the calling thread.
///
/// Verify is the hot path, and the lookup itself takes a few microseconds against the
/// `secret_hash` index; through sqlx it also took two thread hand-offs (to the connection's
/// worker thread and back), which profiling showed to be most of verify's cost (BENCHMARKS.md).
/// Holding a tokio worker for that long is cheaper than the hand-offs.
///
/// Each connection also keeps its read transaction (its snapshot of the database) open from
/// one lookup to the next: beginning and ending one per lookup took WAL read locks (a process
/// mutex and `fcntl`) that two threads fought over, and profiling put that at 60% of the
/// lookup. A snapshot is reused only while it is current: every write transaction of this
/// process bumps `commits` after its COMMIT and before anyone is answered, and a lookup that
/// sees a count other than its snapshot's starts a new one. So a verify that starts after a
/// revocation was acknowledged always sees it. Writers in other processes are not counted;
/// for them (and so that an idle connection does not hold back WAL checkpoints) no snapshot
/// is used or kept for longer than [`SNAPSHOT_MAX_AGE`].
struct HotReads {
    connections: Vec<std::sync::Mutex<HotConnection>>,
    next: AtomicUsize,
    /// The lookup, with the same column list as every other key query (`KEY_COLUMNS`).
    find_by_hash: String,
    commits: Arc<AtomicU64>,
}

/// Connections in [`HotReads`]: more than the cores, so a lookup rarely waits for one.
const HOT_READERS: usize = 4;

/// Read connections of the background roles ([`SqliteStore::for_background`]): the KV
/// publisher, the ledger publisher and the webhook deliverers, one each.
const BACKGROUND_READERS: u32 = 3;

/// Longest a hot connection's snapshot is used or kept.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(20);

struct HotConnection {
    conn: rusqlite::Connection,
    /// The open read transaction: the commit count read before it began, and when.
    snapshot: Option<(u64, Instant)>,
}

impl HotConnection {
    /// Ends the read transaction, if one is open. If COMMIT fails, the connection is left in
    /// autocommit by ROLLBACK, which cannot leave a read transaction open.
    fn end_snapshot(&mut self) {
        if self.snapshot.take().is_some() && self.conn.execute_batch("COMMIT").is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl std::fmt::Debug for HotReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HotReads({} connections)", self.connections.len())
    }
}

impl HotReads {
    fn open(path: &Path, n: usize, commits: Arc<AtomicU64>) -> Result<Self, StoreError> {
        use rusqlite::OpenFlags;
        let connections = (0..n)
            .map(|_| {
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(Duration::from_secs(5))?;
                Ok(std::sync::Mutex::new(HotConnection {
                    conn,
                    snapshot: None,
                }))
            })
            .collect::<Result<_, rusqlite::Error>>()
            .map_err(sqlite_error)?;
        Ok(Self {
            connections,
            next: AtomicUsize::new(0),
            find_by_hash: format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = ?"),
            commits,
        })
    }

    fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        // The statement, for trace logs (the access tests count lookups by it).
        tracing::trace!(statement = %self.find_by_hash, "lookup by hash");
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.connections.len();
        // A free connection if there is one, else wait for ours.
        let mut hot = (0..n)
            .find_map(|i| self.connections[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| {
                self.connections[start % n]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
        // Read before BEGIN: the snapshot (taken at the first read below) then holds at least
        // every commit counted so far.
        let commits = self.commits.load(Ordering::Acquire);
        let current = hot.snapshot.is_some_and(|(counted, began)| {
            counted == commits && began.elapsed() < SNAPSHOT_MAX_AGE
        });
        if !current {
            hot.end_snapshot();
            hot.conn.execute_batch("BEGIN").map_err(sqlite_error)?;
            hot.snapshot = Some((commits, Instant::now()));
        }
        let found = Self::lookup(&hot.conn, &self.find_by_hash, hash);
        if found.is_err() {
            hot.end_snapshot();
        }
        found
    }

    fn lookup(
        conn: &rusqlite::Connection,
        sql: &str,
        hash: &KeyHash,
    ) -> Result<Option<StoredKey>, StoreError> {
        let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
        let mut rows = statement
            .query([hash.as_bytes().as_slice()])
            .map_err(sqlite_error)?;
        let Some(row) = rows.next().map_err(sqlite_error)? else {
            return Ok(None);
        };
        let row = key_row(row).map_err(sqlite_error)?;
        StoredKey::try_from(row).map(Some)
    }

    /// Ends the snapshots that have not been used for [`SNAPSHOT_MAX_AGE`]. A connection in
    /// use is skipped: its lookup renews or ends its snapshot itself.
    fn end_old_snapshots(&self) {
        for connection in &self.connections {
            if let Ok(mut hot) = connection.try_lock()
                && hot
                    .snapshot
                    .is_some_and(|(_, began)| began.elapsed() >= SNAPSHOT_MAX_AGE)
            {
                hot.end_snapshot();
            }
        }
    }
}

/// Ends idle snapshots every [`SNAPSHOT_MAX_AGE`] until the store is dropped.
async fn end_old_snapshots(hot: std::sync::Weak<HotReads>) {
    let mut every = tokio::time::interval(SNAPSHOT_MAX_AGE);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(hot) = hot.upgrade() else { return };
        hot.end_old_snapshots();
    }
}

/// The position of column `name` in [`KEY_COLUMNS`], worked out at compile time: rows are read
/// by position (reading by name searched the 17 names for every column of every verify), and a
/// name that is not in the list fails the build.
#[allow(
    clippy::panic,
    reason = "only ever evaluated in const blocks: a name not in the list fails the build"
)]
const fn column(name: &str) -> usize {
    let columns = KEY_COLUMNS.as_bytes();
    let name = name.as_bytes();
    let (mut index, mut start, mut i) = (0, 0, 0);
    while i <= columns.len() {
        if i == columns.len() || columns[i] == b',' {
            let mut first = start;
            while first < i && columns[first] == b' ' {
                first += 1;
            }
            if i - first == name.len() {
                let mut k = 0;
                while k < name.len() && columns[first + k] == name[k] {
                    k += 1;
                }
                if k == name.len() {
                    return index;
                }
            }
            index += 1;
            start = i + 1;
        }
        i += 1;
    }
    panic!("not a column of KEY_COLUMNS");
}

/// Reads a row of `KEY_COLUMNS`, each column by its name's position.
fn key_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: row.get(const { column("id") })?,
        secret_hash: row.get(const { column("secret_hash") })?,
        hint: row.get(const { column("hint") })?,
        name: row.get(const { column("name") })?,
        subject: row.get(const { column("subject") })?,
        description: row.get(const { column("description") })?,
        scopes: row.get(const { column("scopes") })?,
        claims: row.get(const { column("claims") })?,
        created_by: row.get(const { column("created_by") })?,
        expiration: row.get(const { column("expiration") })?,
        revoked: row.get(const { column("revoked") })?,
        revoked_at: row.get(const { column("revoked_at") })?,
        revocation_reason: row.get(const { column("revocation_reason") })?,
        last_used_at: row.get(const { column("last_used_at") })?,
        created_at: row.get(const { column("created_at") })?,
        updated_at: row.get(const { column("updated_at") })?,
        revision: row.get(const { column("revision") })?,
        disabled: row.get(const { column("disabled") })?,
        allowed_ips: row.get(const { column("allowed_ips") })?,
        rolled_from: row.get(const { column("rolled_from") })?,
        rolled_to: row.get(const { column("rolled_to") })?,
        leaked_at: row.get(const { column("leaked_at") })?,
        leak_source: row.get(const { column("leak_source") })?,
        key_type: row.get(const { column("key_type") })?,
        deleted_at: row.get(const { column("deleted_at") })?,
    })
}

fn sqlite_error(error: rusqlite::Error) -> StoreError {
    let code = match &error {
        rusqlite::Error::SqliteFailure(e, _) => e.extended_code,
        _ => 1,
    };
    StoreError::Sqlite {
        code,
        message: error.to_string(),
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    secret_hash: Vec<u8>,
    hint: String,
    name: String,
    subject: String,
    description: Option<String>,
    scopes: String,
    claims: Option<String>,
    created_by: Option<String>,
    expiration: Option<i64>,
    revoked: bool,
    revoked_at: Option<i64>,
    revocation_reason: Option<String>,
    last_used_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
    revision: i64,
    disabled: bool,
    allowed_ips: Option<String>,
    rolled_from: Option<String>,
    rolled_to: Option<String>,
    leaked_at: Option<i64>,
    leak_source: Option<String>,
    key_type: String,
    deleted_at: Option<i64>,
}

impl TryFrom<KeyRow> for StoredKey {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            id: row.id.clone(),
            problem,
        };
        let id = KeyId::parse(&row.id).map_err(|e| corrupt(e.to_string()))?;
        let hash: [u8; 32] = row
            .secret_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret_hash is not 32 bytes".into()))?;
        let scopes: ScopeSet =
            serde_json::from_str(&row.scopes).map_err(|e| corrupt(format!("scopes: {e}")))?;
        let allowed_ips: IpAllowlist = row
            .allowed_ips
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("allowed_ips: {e}")))?
            .unwrap_or_default();
        let link = |id: Option<&str>, field: &str| {
            id.map(KeyId::parse)
                .transpose()
                .map_err(|e| corrupt(format!("{field}: {e}")))
        };
        let rolled_from = link(row.rolled_from.as_deref(), "rolled_from")?;
        let rolled_to = link(row.rolled_to.as_deref(), "rolled_to")?;
        let claims: Option<Map<String, Value>> = row
            .claims
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("claims: {e}")))?;
        Ok(Self {
            id,
            hash: KeyHash::from_bytes(hash),
            hint: row.hint,
            name: row.name,
            subject: row.subject,
            description: row.description,
            scopes,
            claims,
            created_by: row.created_by,
            expiration: row.expiration.map(UnixMillis),
            revoked: row.revoked,
            revoked_at: row.revoked_at.map(UnixMillis),
            revocation_reason: row.revocation_reason,
            last_used_at: row.last_used_at.map(UnixMillis),
            created_at: UnixMillis(row.created_at),
            updated_at: UnixMillis(row.updated_at),
            revision: row.revision,
            disabled: row.disabled,
            allowed_ips,
            rolled_from,
            rolled_to,
            leaked_at: row.leaked_at.map(UnixMillis),
            leak_source: row.leak_source,
            key_type: row.key_type,
            deleted_at: row.deleted_at.map(UnixMillis),
        })
    }
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Appends `event` to the chain inside the caller's transaction, MACed with the chain's key.
/// Returns the new entry's `seq`, `hash` and `at` (for the checkpoint after the commit).
async fn append_audit(
    conn: &mut SqliteConnection,
    chain: Option<&AuditChain>,
    event: &AuditEvent,
) -> Result<(i64, String, i64), StoreError> {
    let chain = chain.ok_or_else(|| {
        StoreError::Audit(
            "this store was opened without AUDIT_CHAIN_KEY and cannot append to the audit log"
                .into(),
        )
    })?;
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (prev_seq, prev_hash) = last.unwrap_or_else(|| (0, audit::GENESIS_HASH.to_owned()));
    let seq = prev_seq + 1;
    let details = event.details.to_string();
    let key_id = event.key_id.as_ref().map(KeyId::as_str);
    let hash = audit::entry_mac(
        chain.key(),
        &audit::EntryFields {
            prev_hash: &prev_hash,
            seq,
            at: event.at.0,
            actor: &event.actor,
            action: event.action,
            key_id,
            details_json: &details,
        },
    );
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, key_id, details, prev_hash, hash, chain) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(seq)
    .bind(event.at.0)
    .bind(&event.actor)
    .bind(event.action)
    .bind(key_id)
    .bind(details)
    .bind(prev_hash)
    .bind(&hash)
    .bind(audit::CHAIN_KEYED)
    .execute(&mut *conn)
    .await?;
    Ok((seq, hash, event.at.0))
}

/// Announces a change of `id` to both sinks (KV and the ledger), inside the caller's
/// transaction.
async fn enqueue_publish(
    conn: &mut SqliteConnection,
    id: &KeyId,
    at: UnixMillis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) VALUES (?, ?, 1, 1)",
    )
        .bind(id.as_str())
        .bind(at.0)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The outbox column that says `sink` still needs a row.
fn pending_column(sink: Sink) -> &'static str {
    match sink {
        Sink::Kv => "kv_pending",
        Sink::Ledger => "ledger_pending",
    }
}

/// Adds the WHERE clause of `filter` (shared by the page query and the count).
fn push_filter(qb: &mut QueryBuilder<'_, Sqlite>, filter: &ListFilter) {
    // A deleted key is never listed.
    qb.push(" WHERE deleted_at IS NULL");
    if let Some(subject) = &filter.subject {
        qb.push(" AND subject = ").push_bind(subject.clone());
    }
    if let Some(key_type) = &filter.key_type {
        qb.push(" AND key_type = ").push_bind(key_type.clone());
    }
    if let Some(text) = &filter.name_contains {
        // LIKE's own wildcards in the text are literal: escaped with `\`.
        let escaped = text
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        qb.push(" AND name LIKE ")
            .push_bind(format!("%{escaped}%"))
            .push(" ESCAPE '\\'");
    }
    if let Some(revoked) = filter.revoked {
        qb.push(" AND revoked = ").push_bind(revoked);
    }
    match filter.expired {
        Some(true) => {
            qb.push(" AND expiration IS NOT NULL AND expiration <= ")
                .push_bind(filter.now.0);
        }
        Some(false) => {
            qb.push(" AND (expiration IS NULL OR expiration > ")
                .push_bind(filter.now.0)
                .push(")");
        }
        None => {}
    }
    match filter.never_used {
        Some(true) => {
            qb.push(" AND last_used_at IS NULL");
        }
        Some(false) => {
            qb.push(" AND last_used_at IS NOT NULL");
        }
        None => {}
    }
    if let Some(before) = filter.last_used_before {
        qb.push(" AND last_used_at < ").push_bind(before.0);
    }
    for (field, value) in &filter.claims_equal {
        // The field name is bound as part of a JSON path, never spliced into SQL. Quoting it
        // makes `.` and other characters literal parts of one key.
        let path = format!("$.\"{}\"", field.replace('"', ""));
        qb.push(" AND json_extract(claims, ")
            .push_bind(path)
            .push(") = ")
            .push_bind(value.clone());
    }
}

/// One write transaction on the writer connection, begun and ended by hand rather than with
/// sqlx's `Transaction`.
///
/// After SQLITE_FULL or SQLITE_IOERR, SQLite may roll a transaction back by itself. sqlx's
/// transaction depth does not learn of it, so its next `begin()` on that connection issues a
/// SAVEPOINT inside a transaction that never commits: every later write is answered as
/// committed, seen by nobody else, and lost when the connection closes. (The disk-full test
/// found exactly that.) Here a transaction that did not end cleanly closes its connection, and
/// the next write starts on a fresh one.
///
/// Every commit is counted in `commits` before the caller goes on, which is what tells verify's
/// hot connections that their snapshot is out of date ([`HotReads`]).
struct WriteTx {
    conn: PoolConnection<Sqlite>,
    commits: Arc<AtomicU64>,
    ended: bool,
}

impl WriteTx {
    /// `BEGIN IMMEDIATE`: takes the write lock at once, so a busy database fails here, before
    /// any work, rather than at the first write.
    async fn begin(pool: &SqlitePool, commits: &Arc<AtomicU64>) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        if let Err(error) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
            conn.close_on_drop();
            return Err(error.into());
        }
        Ok(Self {
            conn,
            commits: commits.clone(),
            ended: false,
        })
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        // Counted even if COMMIT fails: SQLite may have committed before reporting an error,
        // and a needless new snapshot costs only a few microseconds.
        let committed = sqlx::query("COMMIT").execute(&mut *self.conn).await;
        self.commits.fetch_add(1, Ordering::Release);
        committed?;
        self.ended = true;
        Ok(())
    }

    async fn rollback(mut self) -> Result<(), StoreError> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.ended = true;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.ended {
            // Its state is unknown: closing the connection rolls back whatever is open.
            self.conn.close_on_drop();
        }
    }
}

/// A key change (with its audit entry and outbox row) waiting for the next group commit.
#[derive(Debug)]
enum Change {
    Insert(StoredKey, AuditEvent),
    /// The new state, the revision it replaces, the audit event.
    Replace(StoredKey, i64, AuditEvent),
    /// An entry that changes no key (a refused attempt, a policy's warning): the entry alone.
    Event(AuditEvent),
    /// A roll: the replaced key's new state, the revision it replaces and its audit event, then
    /// the new key and its own; both or neither.
    Roll {
        old: Box<(StoredKey, i64, AuditEvent)>,
        new: Box<(StoredKey, AuditEvent)>,
    },
}

/// A change and where its outcome goes.
struct Pending {
    change: Change,
    done: oneshot::Sender<Result<bool, StoreError>>,
}

/// Most changes committed together.
const GROUP_MAX: usize = 512;

/// Group commit: one task writes key changes. It takes every change waiting when it starts a
/// transaction (they queued while the previous commit was syncing to disk) and commits them
/// together, so a burst of concurrent writes costs one `fsync`, not one each. Nobody is answered
/// before the commit that holds their change is on disk.
///
/// If anything in a batch fails, the batch is rolled back and each of its changes is retried in
/// a transaction of its own, so one bad change never fails the others and each caller gets its
/// own outcome.
async fn group_commit(
    pool: SqlitePool,
    commits: Arc<AtomicU64>,
    chain: Option<Arc<AuditChain>>,
    mut queue: mpsc::Receiver<Pending>,
) {
    let chain = chain.as_deref();
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        match apply_together(&pool, &commits, chain, &batch).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.done.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::debug!(%error, changes = batch.len(), "group commit failed; committing one by one");
                for pending in batch {
                    let outcome = apply_alone(&pool, &commits, chain, &pending.change).await;
                    let _ = pending.done.send(outcome);
                }
            }
        }
    }
}

async fn apply_together(
    pool: &SqlitePool,
    commits: &Arc<AtomicU64>,
    chain: Option<&AuditChain>,
    batch: &[Pending],
) -> Result<Vec<bool>, StoreError> {
    let mut tx = WriteTx::begin(pool, commits).await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut newest = None;
    for pending in batch {
        outcomes.push(apply(&mut tx, chain, &pending.change, &mut newest).await?);
    }
    tx.commit().await?;
    checkpoint(chain, newest);
    Ok(outcomes)
}

async fn apply_alone(
    pool: &SqlitePool,
    commits: &Arc<AtomicU64>,
    chain: Option<&AuditChain>,
    change: &Change,
) -> Result<bool, StoreError> {
    let mut tx = WriteTx::begin(pool, commits).await?;
    let mut newest = None;
    let outcome = apply(&mut tx, chain, change, &mut newest).await?;
    tx.commit().await?;
    checkpoint(chain, newest);
    Ok(outcome)
}

/// After a commit that appended audit entries, and before its callers are answered: a
/// checkpoint of the newest one, outside the database.
fn checkpoint(chain: Option<&AuditChain>, newest: Option<(i64, String, i64)>) {
    if let (Some(chain), Some((seq, hash, at))) = (chain, newest) {
        chain.checkpoint(seq, &hash, at);
    }
}

/// Writes one change inside the caller's transaction. `false`: a `Replace` found another
/// revision, and nothing was written. The audit entry appended, if any, goes to `newest`.
async fn apply(
    conn: &mut SqliteConnection,
    chain: Option<&AuditChain>,
    change: &Change,
    newest: &mut Option<(i64, String, i64)>,
) -> Result<bool, StoreError> {
    match change {
        Change::Insert(key, event) => {
            insert_key(conn, key).await?;
            *newest = Some(append_audit(conn, chain, event).await?);
            enqueue_publish(conn, &key.id, key.updated_at).await?;
        }
        Change::Replace(key, expected_revision, event) => {
            if !update_key(conn, key, *expected_revision).await? {
                return Ok(false);
            }
            *newest = Some(append_audit(conn, chain, event).await?);
            enqueue_publish(conn, &key.id, key.updated_at).await?;
        }
        Change::Roll { old, new } => {
            let (old_key, expected_revision, old_event) = old.as_ref();
            let (new_key, new_event) = new.as_ref();
            if !update_key(conn, old_key, *expected_revision).await? {
                return Ok(false);
            }
            insert_key(conn, new_key).await?;
            append_audit(conn, chain, old_event).await?;
            *newest = Some(append_audit(conn, chain, new_event).await?);
            enqueue_publish(conn, &old_key.id, old_key.updated_at).await?;
            enqueue_publish(conn, &new_key.id, new_key.updated_at).await?;
        }
        Change::Event(event) => *newest = Some(append_audit(conn, chain, event).await?),
    }
    Ok(true)
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn record_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.commit(Change::Event(event.clone())).await.map(|_| ())
    }

    async fn insert(&self, key: &StoredKey, event: &AuditEvent) -> Result<(), StoreError> {
        self.commit(Change::Insert(key.clone(), event.clone()))
            .await
            .map(|_| ())
    }

    async fn replace(
        &self,
        key: &StoredKey,
        expected_revision: i64,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        self.commit(Change::Replace(
            key.clone(),
            expected_revision,
            event.clone(),
        ))
        .await
    }

    async fn roll(
        &self,
        old: (&StoredKey, i64, &AuditEvent),
        new: (&StoredKey, &AuditEvent),
    ) -> Result<bool, StoreError> {
        self.commit(Change::Roll {
            old: Box::new((old.0.clone(), old.1, old.2.clone())),
            new: Box::new((new.0.clone(), new.1.clone())),
        })
        .await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<StoredKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?");
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.map(StoredKey::try_from).transpose()
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        if let Some(hot) = &self.hot {
            return hot.find_by_hash(hash);
        }
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = ?");
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(hash.as_bytes().as_slice())
            .fetch_optional(&self.reader)
            .await?;
        row.map(StoredKey::try_from).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<KeyPage, StoreError> {
        let mut page = QueryBuilder::new(format!("SELECT {KEY_COLUMNS} FROM api_keys"));
        push_filter(&mut page, filter);
        page.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(filter.limit))
            .push(" OFFSET ")
            .push_bind(i64::from(filter.offset));
        let rows: Vec<KeyRow> = page.build_query_as().fetch_all(&self.reader).await?;

        let mut count = QueryBuilder::new("SELECT COUNT(*) FROM api_keys");
        push_filter(&mut count, filter);
        let (total,): (i64,) = count.build_query_as().fetch_one(&self.reader).await?;

        Ok(KeyPage {
            keys: rows
                .into_iter()
                .map(StoredKey::try_from)
                .collect::<Result<_, _>>()?,
            total_count: u64::try_from(total).unwrap_or(0),
        })
    }

    async fn record_usage(&self, usage: &[(KeyId, UnixMillis)]) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for (id, at) in usage {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
            )
            .bind(at.0)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn remember_usage_batch(
        &self,
        mac: &[u8; 32],
        until: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query("DELETE FROM usage_batches_seen WHERE until < ?")
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        let inserted =
            sqlx::query("INSERT OR IGNORE INTO usage_batches_seen (mac, until) VALUES (?, ?)")
                .bind(mac.as_slice())
                .bind(until.0)
                .execute(&mut *tx)
                .await?;
        let accepted = inserted.rows_affected() == 1;
        if accepted {
            sqlx::query(
                "INSERT INTO usage_reports (id, last_accepted_at) VALUES (1, ?) \
                 ON CONFLICT (id) DO UPDATE SET last_accepted_at = excluded.last_accepted_at",
            )
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(accepted)
    }

    async fn last_usage_report(&self) -> Result<Option<UnixMillis>, StoreError> {
        let at: Option<(i64,)> =
            sqlx::query_as("SELECT last_accepted_at FROM usage_reports WHERE id = 1")
                .fetch_optional(&self.reader)
                .await?;
        Ok(at.map(|(at,)| UnixMillis(at)))
    }

    async fn audit_log(
        &self,
        key_id: Option<&KeyId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain FROM audit_log \
             WHERE seq > ? AND (? IS NULL OR key_id = ?) ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(key_id.map(KeyId::as_str))
        .bind(key_id.map(KeyId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(audit_entry).collect()
    }

    async fn policy_candidates(
        &self,
        query: PolicyQuery,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        const ACTIVITY: &str = "MAX(COALESCE(k.last_used_at, 0), k.updated_at)";
        const LIVE: &str =
            "k.revoked = 0 AND k.disabled = 0 AND (k.expiration IS NULL OR k.expiration > ?)";
        let warned = |since: &str| {
            format!(
                "SELECT 1 FROM audit_log a WHERE a.key_id = k.id AND a.action = 'stale_warning' \
                 AND a.at >= {since}"
            )
        };
        let columns = KEY_COLUMNS
            .split(',')
            .map(|c| format!("k.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let (sql, binds): (String, Vec<i64>) = match query {
            PolicyQuery::StaleUnwarned { idle_before, now } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < ? \
                     AND NOT EXISTS ({}) ORDER BY {ACTIVITY} LIMIT ?",
                    warned(ACTIVITY)
                ),
                vec![now.0, idle_before.0],
            ),
            PolicyQuery::StaleDue {
                idle_before,
                warned_before: None,
                now,
            } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < ? \
                     ORDER BY {ACTIVITY} LIMIT ?"
                ),
                vec![now.0, idle_before.0],
            ),
            PolicyQuery::StaleDue {
                idle_before,
                warned_before: Some(warned_before),
                now,
            } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < ? \
                     AND EXISTS ({} AND a.at <= ?) ORDER BY {ACTIVITY} LIMIT ?",
                    warned(ACTIVITY)
                ),
                vec![now.0, idle_before.0, warned_before.0],
            ),
            PolicyQuery::ExpiringUnwarned { now, until } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE k.revoked = 0 AND k.disabled = 0 \
                     AND k.expiration > ? \
                     AND k.expiration <= ? AND NOT EXISTS (SELECT 1 FROM audit_log a \
                     WHERE a.key_id = k.id AND a.action = 'expiry_warning' \
                     AND json_extract(a.details, '$.expires_at') = k.expiration) \
                     ORDER BY k.expiration LIMIT ?"
                ),
                vec![now.0, until.0],
            ),
        };
        let query = binds
            .into_iter()
            .fold(sqlx::query_as::<_, KeyRow>(&sql), |q, b| q.bind(b))
            .bind(i64::from(limit));
        let rows = query.fetch_all(&self.reader).await?;
        rows.into_iter().map(StoredKey::try_from).collect()
    }

    async fn webhook_cursor(&self, endpoint: &str) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT after_seq FROM webhook_cursors WHERE endpoint = ?")
                .bind(endpoint)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(|(seq,)| seq))
    }

    async fn set_webhook_cursor(
        &self,
        endpoint: &str,
        after_seq: i64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (endpoint) DO UPDATE SET after_seq = excluded.after_seq, \
             updated_at = excluded.updated_at",
        )
        .bind(endpoint)
        .bind(after_seq)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn init_webhook_cursor(&self, endpoint: &str, now: UnixMillis) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) \
             SELECT ?, COALESCE(MAX(seq), 0), ? FROM audit_log WHERE 1 \
             ON CONFLICT (endpoint) DO NOTHING",
        )
        .bind(endpoint)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_count(
        &self,
        after_seq: i64,
        actions: &[&str],
        max: u64,
    ) -> Result<(u64, Option<UnixMillis>), StoreError> {
        // Both walk the log from `after_seq` by its key: the first match, and at most `max`.
        let matching = |select: &str| {
            let mut query = QueryBuilder::<Sqlite>::new(select);
            query.push_bind(after_seq).push(" AND action IN (");
            let mut list = query.separated(", ");
            for action in actions {
                list.push_bind(*action);
            }
            query.push(") ORDER BY seq");
            query
        };
        let mut oldest = matching("SELECT at FROM audit_log WHERE seq > ");
        oldest.push(" LIMIT 1");
        let oldest: Option<(i64,)> = oldest.build_query_as().fetch_optional(&self.reader).await?;
        let mut count = matching("SELECT COUNT(*) FROM (SELECT 1 FROM audit_log WHERE seq > ");
        count
            .push(" LIMIT ")
            .push_bind(i64::try_from(max).unwrap_or(i64::MAX))
            .push(")");
        let (count,): (i64,) = count.build_query_as().fetch_one(&self.reader).await?;
        Ok((
            u64::try_from(count).unwrap_or(0),
            oldest.map(|(at,)| UnixMillis(at)),
        ))
    }

    async fn outbox_peek(&self, sink: Sink, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let sql = format!(
            "SELECT seq, key_id FROM kv_outbox WHERE {} = 1 ORDER BY seq LIMIT ?",
            pending_column(sink)
        );
        let rows: Vec<(i64, String)> = sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter()
            .map(|(seq, key_id)| {
                let key_id = KeyId::parse(&key_id).map_err(|e| StoreError::Corrupt {
                    id: format!("kv_outbox seq {seq}"),
                    problem: e.to_string(),
                })?;
                Ok(OutboxEntry { seq, key_id })
            })
            .collect()
    }

    async fn outbox_ack(&self, sink: Sink, published: &[OutboxEntry]) -> Result<(), StoreError> {
        if published.is_empty() {
            return Ok(());
        }
        // Without the ledger sink nobody else clears the ledger flag: KV's acknowledgement does.
        let clear = match (sink, self.ledger_sink) {
            (Sink::Kv, false) => "kv_pending = 0, ledger_pending = 0",
            (Sink::Kv, true) => "kv_pending = 0",
            (Sink::Ledger, _) => "ledger_pending = 0",
        };
        let update = format!("UPDATE kv_outbox SET {clear} WHERE key_id = ? AND seq <= ?");
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for entry in published {
            sqlx::query(&update)
                .bind(entry.key_id.as_str())
                .bind(entry.seq)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "DELETE FROM kv_outbox WHERE key_id = ? AND seq <= ? \
                 AND kv_pending = 0 AND ledger_pending = 0",
            )
            .bind(entry.key_id.as_str())
            .bind(entry.seq)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_stats(
        &self,
        sink: Sink,
        up_to_seq: Option<i64>,
    ) -> Result<OutboxStats, StoreError> {
        let sql = format!(
            "SELECT COUNT(*), MIN(enqueued_at) FROM kv_outbox WHERE {} = 1 AND (? IS NULL OR seq <= ?)",
            pending_column(sink)
        );
        let (pending, oldest): (i64, Option<i64>) = sqlx::query_as(&sql)
            .bind(up_to_seq)
            .bind(up_to_seq)
            .fetch_one(&self.reader)
            .await?;
        Ok(OutboxStats {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_enqueued_at: oldest.map(UnixMillis),
        })
    }

    async fn outbox_enqueue_all(
        &self,
        after: Option<&KeyId>,
        limit: u32,
        now: UnixMillis,
    ) -> Result<Option<(KeyId, i64)>, StoreError> {
        let after = after.map_or("", KeyId::as_str);
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        let last: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM (SELECT id FROM api_keys WHERE id > ? ORDER BY id LIMIT ?) \
             ORDER BY id DESC LIMIT 1",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((last,)) = last else {
            tx.rollback().await?;
            return Ok(None);
        };
        let queued = sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending, rebuild) \
             SELECT id, ?, 1, 0, 1 FROM api_keys WHERE id > ? AND id <= ? ORDER BY id",
        )
        .bind(now.0)
        .bind(after)
        .bind(&last)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let last = KeyId::parse(&last).map_err(|e| StoreError::Corrupt {
            id: last.clone(),
            problem: e.to_string(),
        })?;
        Ok(Some((last, queued.last_insert_rowid())))
    }

    async fn outbox_enqueue(&self, keys: &[KeyId], now: UnixMillis) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for key in keys {
            // For the ledger too: an isolate that cached the stale KV value keeps it until a
            // ledger entry with a higher revision arrives. Repairs are few.
            sqlx::query(
                "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
                 VALUES (?, ?, 1, 1)",
            )
            .bind(key.as_str())
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_enqueue_changed_since(
        &self,
        since: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        // Keys still on their way to KV count as recent whatever their age, and refresh notes of
        // an earlier run (perhaps to another ledger) are forgotten.
        let queued = sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
             SELECT id, ?, 0, 1 FROM api_keys \
             WHERE (updated_at >= ? \
                    OR id IN (SELECT key_id FROM kv_outbox WHERE kv_pending = 1 AND rebuild = 0)) \
             AND id NOT IN (SELECT key_id FROM kv_outbox WHERE ledger_pending = 1) \
             ORDER BY updated_at",
        )
        .bind(now.0)
        .bind(since.0)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM ledger_refresh")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(queued.rows_affected())
    }

    async fn outbox_refresh_ledger(
        &self,
        cutoff: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        // Keys no longer waiting for KV need no refresh.
        sqlx::query(
            "DELETE FROM ledger_refresh WHERE key_id NOT IN \
             (SELECT key_id FROM kv_outbox WHERE kv_pending = 1 AND rebuild = 0)",
        )
        .execute(&mut *tx)
        .await?;
        let stale: Vec<(String,)> = sqlx::query_as(
            "SELECT key_id FROM kv_outbox WHERE kv_pending = 1 AND rebuild = 0 \
             AND key_id NOT IN (SELECT key_id FROM kv_outbox WHERE ledger_pending = 1) \
             AND key_id NOT IN (SELECT key_id FROM ledger_refresh WHERE at > ?) \
             GROUP BY key_id HAVING MIN(enqueued_at) <= ? ORDER BY MIN(seq)",
        )
        .bind(cutoff.0)
        .bind(cutoff.0)
        .fetch_all(&mut *tx)
        .await?;
        for (key_id,) in &stale {
            sqlx::query(
                "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
                 VALUES (?, ?, 0, 1)",
            )
            .bind(key_id)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO ledger_refresh (key_id, at) VALUES (?, ?) \
                 ON CONFLICT (key_id) DO UPDATE SET at = excluded.at",
            )
            .bind(key_id)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(stale.len()).unwrap_or(u64::MAX))
    }

    async fn verify_schedule(&self, keys: &[KeyId], due_at: UnixMillis) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO kv_verify (key_id, due_at) VALUES (?, ?) \
                 ON CONFLICT (key_id) DO UPDATE SET due_at = MAX(due_at, excluded.due_at)",
            )
            .bind(key.as_str())
            .bind(due_at.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn verify_due(
        &self,
        now: UnixMillis,
        limit: u32,
    ) -> Result<Vec<VerifyEntry>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key_id, due_at, attempts FROM kv_verify WHERE due_at <= ? ORDER BY due_at LIMIT ?",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(key_id, due_at, attempts)| {
                let key_id = KeyId::parse(&key_id).map_err(|e| StoreError::Corrupt {
                    id: format!("kv_verify {key_id}"),
                    problem: e.to_string(),
                })?;
                Ok(VerifyEntry {
                    key_id,
                    due_at: UnixMillis(due_at),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn verify_done(&self, entry: &VerifyEntry) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query("DELETE FROM kv_verify WHERE key_id = ? AND due_at = ?")
            .bind(entry.key_id.as_str())
            .bind(entry.due_at.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn verify_retry(
        &self,
        entry: &VerifyEntry,
        due_at: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query(
            "UPDATE kv_verify SET due_at = MAX(due_at, ?), attempts = attempts + 1 WHERE key_id = ?",
        )
        .bind(due_at.0)
        .bind(entry.key_id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn verify_pending(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM kv_verify")
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn keys_after(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id > ? ORDER BY id LIMIT ?");
        let rows: Vec<KeyRow> = sqlx::query_as(&sql)
            .bind(after.map_or("", KeyId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(StoredKey::try_from).collect()
    }

    async fn count_keys(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "test code")]

    use super::*;

    /// The README promises that an acknowledged write survives a power cut; that holds only with
    /// WAL and `synchronous=FULL` on the writer. Read both back from a real store's writer.
    #[tokio::test]
    async fn the_writer_runs_in_wal_mode_with_synchronous_full() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url, None).await.expect("open");
        let durability = store.durability().await.expect("pragmas");
        assert_eq!(
            durability,
            Durability {
                journal_mode: "wal".into(),
                synchronous: 2
            }
        );
        assert!(durability.check().is_ok());
        store.close().await;
    }

    /// A store over a new database file, appending to a keyed audit chain.
    async fn open_store(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let key =
            latchkey_shared::sign::SigningSecret::parse("store-tests-audit-chain-key-0123456789")
                .expect("secret");
        let chain = Arc::new(AuditChain::new(key, Some(dir.path().join("t.checkpoints"))));
        SqliteStore::open(&url, Some(chain)).await.expect("open")
    }

    fn new_key(n: u8) -> StoredKey {
        let mut fill = |bytes: &mut [u8]| bytes.fill(n);
        StoredKey {
            id: KeyId::generate(&mut fill),
            hash: KeyHash::from_bytes([n; 32]),
            hint: "sk_test_...abcd".into(),
            name: "k".into(),
            subject: "acme".into(),
            description: None,
            scopes: ScopeSet::default(),
            claims: None,
            created_by: None,
            expiration: None,
            revoked: false,
            revoked_at: None,
            revocation_reason: None,
            last_used_at: None,
            created_at: UnixMillis(1_000),
            updated_at: UnixMillis(1_000),
            revision: 1,
            disabled: false,
            allowed_ips: Default::default(),
            rolled_from: None,
            rolled_to: None,
            leaked_at: None,
            leak_source: None,
            key_type: "api_key".into(),
            deleted_at: None,
        }
    }

    fn event(key: &StoredKey, action: &'static str) -> AuditEvent {
        AuditEvent {
            at: key.updated_at,
            actor: "admin:test".into(),
            action,
            key_id: Some(key.id.clone()),
            details: serde_json::json!({}),
        }
    }

    /// An immutable open only where it cannot hide a write: on a read-only filesystem, with
    /// no WAL frames and no WAL index, everything known.
    #[test]
    fn immutable_only_with_nothing_to_miss() {
        let safe = OnDisk {
            cannot_open: true,
            database: true,
            wal: Some(None),
            shm: Some(None),
            read_only: true,
        };
        assert!(safe.immutable_is_safe());
        assert!(
            OnDisk {
                wal: Some(Some(0)),
                ..safe
            }
            .immutable_is_safe(),
            "an empty WAL holds nothing"
        );
        for (why, unsafe_) in [
            (
                "WAL frames",
                OnDisk {
                    wal: Some(Some(4_152)),
                    ..safe
                },
            ),
            ("WAL unknown", OnDisk { wal: None, ..safe }),
            (
                "a WAL index",
                OnDisk {
                    shm: Some(Some(32_768)),
                    ..safe
                },
            ),
            ("index unknown", OnDisk { shm: None, ..safe }),
            (
                "writable",
                OnDisk {
                    read_only: false,
                    ..safe
                },
            ),
            (
                "another error",
                OnDisk {
                    cannot_open: false,
                    ..safe
                },
            ),
            (
                "no database",
                OnDisk {
                    database: false,
                    ..safe
                },
            ),
        ] {
            assert!(!unsafe_.immutable_is_safe(), "{why}");
        }
    }

    /// A key with every optional field set, so a column written or read wrongly shows.
    fn full_key(n: u8) -> StoredKey {
        let mut fill = |bytes: &mut [u8]| bytes.fill(n.wrapping_add(100));
        StoredKey {
            description: Some("d".into()),
            scopes: serde_json::from_value(serde_json::json!(["write:b", "read:a"]))
                .expect("scopes"),
            claims: serde_json::from_value(serde_json::json!({"tier": "gold"})).expect("claims"),
            created_by: Some("ops".into()),
            expiration: Some(UnixMillis(9_000)),
            revoked: true,
            revoked_at: Some(UnixMillis(1_500)),
            revocation_reason: Some("r".into()),
            last_used_at: Some(UnixMillis(1_200)),
            disabled: true,
            allowed_ips: IpAllowlist::parse(&["10.0.0.0/8".to_owned()]).expect("list"),
            rolled_from: Some(KeyId::generate(&mut fill)),
            rolled_to: Some(KeyId::generate(&mut |b: &mut [u8]| {
                b.fill(n.wrapping_add(200))
            })),
            leaked_at: Some(UnixMillis(1_400)),
            leak_source: Some("https://github.com/o/r/blob/x/f".into()),
            key_type: "partner_key".into(),
            deleted_at: Some(UnixMillis(1_600)),
            ..new_key(n)
        }
    }

    /// What is inserted is what is read back, through both read paths; an update writes every
    /// changeable column and leaves the others (`last_used_at` is the usage flush's).
    #[tokio::test]
    async fn every_field_is_stored_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let key = full_key(1);
        store
            .insert(&key, &event(&key, "create"))
            .await
            .expect("insert");
        assert_eq!(store.get(&key.id).await.expect("get"), Some(key.clone()));
        assert_eq!(
            store.find_by_hash(&key.hash).await.expect("find"),
            Some(key.clone())
        );
        // Every field differs from what is stored, the ones an update must not touch too.
        let changed = StoredKey {
            id: key.id.clone(),
            hash: KeyHash::from_bytes([9; 32]),
            hint: "sk_test_...zzzz".into(),
            created_at: UnixMillis(5),
            last_used_at: None,
            revision: 2,
            ..new_key(1)
        };
        assert!(
            store
                .replace(&changed, 1, &event(&changed, "update"))
                .await
                .expect("replace")
        );
        let read = store.get(&key.id).await.expect("get").expect("exists");
        assert_eq!(
            read,
            StoredKey {
                hash: key.hash,
                hint: key.hint.clone(),
                created_at: key.created_at,
                last_used_at: key.last_used_at,
                rolled_from: key.rolled_from.clone(),
                created_by: key.created_by.clone(),
                key_type: key.key_type.clone(),
                ..changed
            }
        );
        store.close().await;
    }

    /// A roll writes the old key's new state, the new key, both audit entries and both outbox
    /// rows together, or nothing: not over a stale revision, and not twice for one key (the
    /// unique link refuses a second successor, and the old key's update goes with it).
    #[tokio::test]
    async fn a_roll_commits_both_keys_or_neither() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let old = new_key(1);
        store
            .insert(&old, &event(&old, "create"))
            .await
            .expect("insert");
        let audit_rows = |store: &SqliteStore| {
            let reader = store.reader.clone();
            async move {
                let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_log")
                    .fetch_one(&reader)
                    .await
                    .expect("count");
                n
            }
        };
        let successor = |n: u8| StoredKey {
            rolled_from: Some(old.id.clone()),
            ..new_key(n)
        };
        let rolled = |to: &StoredKey, revision: i64| StoredKey {
            rolled_to: Some(to.id.clone()),
            revision,
            ..old.clone()
        };

        let stale = successor(2);
        let before = (audit_rows(&store).await, rows(&store).await);
        let written = store
            .roll(
                (&rolled(&stale, 3), 2, &event(&old, "roll")),
                (&stale, &event(&stale, "create")),
            )
            .await
            .expect("roll");
        assert!(!written, "a stale revision writes nothing");
        assert_eq!(store.get(&stale.id).await.expect("get"), None);
        assert_eq!((audit_rows(&store).await, rows(&store).await), before);

        let new = successor(3);
        assert!(
            store
                .roll(
                    (&rolled(&new, 2), 1, &event(&old, "roll")),
                    (&new, &event(&new, "create")),
                )
                .await
                .expect("roll")
        );
        assert_eq!(
            store
                .get(&old.id)
                .await
                .expect("get")
                .and_then(|k| k.rolled_to),
            Some(new.id.clone())
        );
        assert_eq!(store.get(&new.id).await.expect("get"), Some(new.clone()));
        assert_eq!(audit_rows(&store).await, before.0 + 2);
        assert_eq!(
            rows(&store).await,
            before.1 + 2,
            "both keys queued to publish"
        );

        // Another process's roll of the same key, at the revision it read: refused whole.
        let second = successor(4);
        let before = (audit_rows(&store).await, rows(&store).await);
        let refused = store
            .roll(
                (&rolled(&second, 3), 2, &event(&old, "roll")),
                (&second, &event(&second, "create")),
            )
            .await;
        assert!(refused.is_err(), "a second successor: {refused:?}");
        assert_eq!(store.get(&second.id).await.expect("get"), None);
        let kept = store.get(&old.id).await.expect("get").expect("exists");
        assert_eq!((kept.revision, kept.rolled_to), (2, Some(new.id.clone())));
        assert_eq!((audit_rows(&store).await, rows(&store).await), before);
        store.close().await;
    }

    /// The policies' queries leave out what was already dealt with: a key warned since its
    /// activity, a warning not yet old enough, an expiry already warned of; a new expiry or new
    /// activity brings a key back.
    #[tokio::test]
    async fn policy_queries_leave_out_what_was_dealt_with() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let ids = |keys: Vec<StoredKey>| {
            keys.into_iter()
                .map(|k| k.id.to_string())
                .collect::<Vec<_>>()
        };
        let at = |n: i64| UnixMillis(n);
        let idle = StoredKey {
            updated_at: at(1_000),
            ..new_key(1)
        };
        let used = StoredKey {
            updated_at: at(1_000),
            last_used_at: Some(at(9_000)),
            ..new_key(2)
        };
        let expiring = StoredKey {
            updated_at: at(9_500),
            expiration: Some(at(20_000)),
            ..new_key(3)
        };
        for key in [&idle, &used, &expiring] {
            store
                .insert(key, &event(key, "create"))
                .await
                .expect("insert");
        }
        let unwarned = |idle_before| PolicyQuery::StaleUnwarned {
            idle_before: at(idle_before),
            now: at(10_000),
        };
        assert_eq!(
            ids(store
                .policy_candidates(unwarned(5_000), 10)
                .await
                .expect("query")),
            [idle.id.as_str()]
        );
        let due = |warned_before| PolicyQuery::StaleDue {
            idle_before: at(5_000),
            warned_before,
            now: at(10_000),
        };
        assert_eq!(
            ids(store
                .policy_candidates(due(Some(at(8_000))), 10)
                .await
                .expect("query")),
            [""; 0],
            "not warned yet: not due"
        );
        assert_eq!(
            ids(store.policy_candidates(due(None), 10).await.expect("query")),
            [idle.id.as_str()],
            "no warning needed"
        );
        let warning = AuditEvent {
            at: at(7_000),
            action: "stale_warning",
            ..event(&idle, "stale_warning")
        };
        store.record_event(&warning).await.expect("warn");
        assert_eq!(
            ids(store
                .policy_candidates(unwarned(5_000), 10)
                .await
                .expect("query")),
            [""; 0]
        );
        assert_eq!(
            ids(store
                .policy_candidates(due(Some(at(6_000))), 10)
                .await
                .expect("query")),
            [""; 0],
            "warned too recently"
        );
        assert_eq!(
            ids(store
                .policy_candidates(due(Some(at(8_000))), 10)
                .await
                .expect("query")),
            [idle.id.as_str()]
        );
        // New activity after the warning: a new idle period, to be warned anew.
        let touched = StoredKey {
            updated_at: at(7_500),
            revision: 2,
            ..idle.clone()
        };
        assert!(
            store
                .replace(&touched, 1, &event(&touched, "update"))
                .await
                .expect("replace")
        );
        assert_eq!(
            ids(store
                .policy_candidates(unwarned(8_000), 10)
                .await
                .expect("query")),
            [touched.id.as_str()]
        );

        let expiring_query = PolicyQuery::ExpiringUnwarned {
            now: at(10_000),
            until: at(30_000),
        };
        assert_eq!(
            ids(store
                .policy_candidates(expiring_query, 10)
                .await
                .expect("query")),
            [expiring.id.as_str()]
        );
        let warned = AuditEvent {
            action: "expiry_warning",
            details: serde_json::json!({ "expires_at": 20_000 }),
            ..event(&expiring, "expiry_warning")
        };
        store.record_event(&warned).await.expect("warn");
        assert_eq!(
            ids(store
                .policy_candidates(expiring_query, 10)
                .await
                .expect("query")),
            [""; 0]
        );
        // A rename leaves the expiry warned of; a new expiry is warned of again.
        let renamed = StoredKey {
            name: "renamed".into(),
            revision: 2,
            ..expiring.clone()
        };
        assert!(
            store
                .replace(&renamed, 1, &event(&renamed, "update"))
                .await
                .expect("replace")
        );
        assert_eq!(
            ids(store
                .policy_candidates(expiring_query, 10)
                .await
                .expect("query")),
            [""; 0]
        );
        let moved = StoredKey {
            expiration: Some(at(25_000)),
            revision: 3,
            ..renamed
        };
        assert!(
            store
                .replace(&moved, 2, &event(&moved, "update"))
                .await
                .expect("replace")
        );
        assert_eq!(
            ids(store
                .policy_candidates(expiring_query, 10)
                .await
                .expect("query")),
            [moved.id.as_str()]
        );
        store.close().await;
    }

    /// Inserts a key, then changes it: two outbox rows for both sinks.
    async fn key_with_two_changes(store: &SqliteStore, n: u8) -> StoredKey {
        let key = new_key(n);
        store
            .insert(&key, &event(&key, "create"))
            .await
            .expect("insert");
        let mut revoked = key.clone();
        revoked.revoked = true;
        revoked.revoked_at = Some(UnixMillis(2_000));
        revoked.updated_at = UnixMillis(2_000);
        revoked.revision = 2;
        assert!(
            store
                .replace(&revoked, 1, &event(&revoked, "revoke"))
                .await
                .expect("replace")
        );
        revoked
    }

    async fn pending(store: &SqliteStore, sink: Sink) -> u64 {
        store.outbox_stats(sink, None).await.expect("stats").pending
    }

    async fn rows(store: &SqliteStore) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM kv_outbox")
            .fetch_one(&store.reader)
            .await
            .expect("count");
        n
    }

    /// The last entry of each key in `entries` (what a publisher acknowledges).
    fn newest_per_key(entries: &[OutboxEntry]) -> Vec<OutboxEntry> {
        let mut newest: BTreeMap<KeyId, i64> = BTreeMap::new();
        for e in entries {
            newest.insert(e.key_id.clone(), e.seq);
        }
        newest
            .into_iter()
            .map(|(key_id, seq)| OutboxEntry { seq, key_id })
            .collect()
    }

    /// A key change waits for both sinks; each sink's acknowledgement clears only its own
    /// need, in either order, and the rows go only when both took them.
    #[tokio::test]
    async fn a_change_stays_in_the_outbox_until_both_sinks_took_it() {
        for kv_first in [true, false] {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = open_store(&dir).await;
            key_with_two_changes(&store, 1).await;
            assert_eq!(rows(&store).await, 2);
            for sink in [Sink::Kv, Sink::Ledger] {
                assert_eq!(pending(&store, sink).await, 2, "{sink:?}");
            }
            let (first, second) = if kv_first {
                (Sink::Kv, Sink::Ledger)
            } else {
                (Sink::Ledger, Sink::Kv)
            };
            let peeked = store.outbox_peek(first, 100).await.expect("peek");
            assert_eq!(peeked.len(), 2);
            store
                .outbox_ack(first, &newest_per_key(&peeked))
                .await
                .expect("ack");
            assert_eq!(pending(&store, first).await, 0);
            assert!(
                store
                    .outbox_peek(first, 100)
                    .await
                    .expect("peek")
                    .is_empty()
            );
            assert_eq!(
                pending(&store, second).await,
                2,
                "the other sink still needs them"
            );
            assert_eq!(rows(&store).await, 2, "kept for the other sink");

            let peeked = store.outbox_peek(second, 100).await.expect("peek");
            assert_eq!(peeked.len(), 2);
            store
                .outbox_ack(second, &newest_per_key(&peeked))
                .await
                .expect("ack");
            assert_eq!(pending(&store, second).await, 0);
            assert_eq!(rows(&store).await, 0, "gone once both sinks took them");
            store.close().await;
        }
    }

    /// One sink being behind never holds the other back, and an acknowledgement covers only
    /// the rows up to its `seq`: a change made after the peek still waits for that sink.
    #[tokio::test]
    async fn one_sink_down_does_not_hold_the_other_and_later_changes_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let a = key_with_two_changes(&store, 1).await;
        key_with_two_changes(&store, 2).await;
        // KV takes everything, three times over, while the ledger is down.
        for _ in 0..3 {
            let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
            store
                .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
                .await
                .expect("ack");
            let mut next = store.get(&a.id).await.expect("get").expect("exists");
            next.revision += 1;
            next.updated_at = UnixMillis(next.updated_at.0 + 1);
            let expected = next.revision - 1;
            assert!(
                store
                    .replace(&next, expected, &event(&next, "update"))
                    .await
                    .expect("replace")
            );
        }
        assert_eq!(pending(&store, Sink::Kv).await, 1, "only the newest change");
        assert_eq!(
            pending(&store, Sink::Ledger).await,
            7,
            "nothing lost for the ledger"
        );
        // The ledger takes what it peeked; the change made after its peek still waits.
        let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        let mut next = store.get(&a.id).await.expect("get").expect("exists");
        next.revision += 1;
        let expected = next.revision - 1;
        assert!(
            store
                .replace(&next, expected, &event(&next, "update"))
                .await
                .expect("replace")
        );
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(pending(&store, Sink::Ledger).await, 1);
        assert_eq!(pending(&store, Sink::Kv).await, 2);
        assert_eq!(rows(&store).await, 2, "only rows some sink needs");
        let oldest = store.outbox_stats(Sink::Kv, None).await.expect("stats");
        assert!(oldest.oldest_enqueued_at.is_some());
        store.close().await;
    }

    /// A KV rebuild (`origin sync --full`) is for KV alone: it must not flood the ledger, and
    /// its rows go once KV took them. A KV repair (a read-back or reconciliation found KV
    /// behind) goes to the ledger too: isolates may have cached the stale KV value.
    #[tokio::test]
    async fn kv_rebuilds_skip_the_ledger_but_repairs_reach_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let a = key_with_two_changes(&store, 1).await;
        let b = key_with_two_changes(&store, 2).await;
        for sink in [Sink::Kv, Sink::Ledger] {
            let peeked = store.outbox_peek(sink, 100).await.expect("peek");
            store
                .outbox_ack(sink, &newest_per_key(&peeked))
                .await
                .expect("ack");
        }
        assert_eq!(rows(&store).await, 0);
        let (last, seq) = store
            .outbox_enqueue_all(None, 100, UnixMillis(5_000))
            .await
            .expect("enqueue all")
            .expect("keys");
        assert!(last == a.id || last == b.id);
        assert_eq!(pending(&store, Sink::Ledger).await, 0, "a rebuild is KV's");
        store
            .outbox_enqueue(std::slice::from_ref(&a.id), UnixMillis(5_000))
            .await
            .expect("enqueue");
        assert_eq!(pending(&store, Sink::Kv).await, 3);
        assert_eq!(
            store
                .outbox_stats(Sink::Kv, Some(seq))
                .await
                .expect("stats")
                .pending,
            2
        );
        let for_ledger = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        assert_eq!(for_ledger.len(), 1, "the repair, alone");
        assert_eq!(for_ledger[0].key_id, a.id);
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(rows(&store).await, 1, "the repair waits for the ledger");
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&for_ledger))
            .await
            .expect("ack");
        assert_eq!(rows(&store).await, 0);
        store.close().await;
    }

    /// At start the ledger publisher queues the recent changes again, for the ledger alone.
    #[tokio::test]
    async fn recent_changes_are_queued_again_for_the_ledger_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let a = key_with_two_changes(&store, 1).await; // last changed at 2,000
        for sink in [Sink::Kv, Sink::Ledger] {
            let peeked = store.outbox_peek(sink, 100).await.expect("peek");
            store
                .outbox_ack(sink, &newest_per_key(&peeked))
                .await
                .expect("ack");
        }
        // (changed since, keys queued): a key already waiting for the ledger is not queued twice
        for (since, queued) in [(2_001, 0), (2_000, 1), (0, 0)] {
            let n = store
                .outbox_enqueue_changed_since(UnixMillis(since), UnixMillis(9_000))
                .await
                .expect("enqueue");
            assert_eq!(n, queued, "since {since}");
        }
        assert_eq!(pending(&store, Sink::Kv).await, 0, "KV is not asked again");
        let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        assert_eq!(peeked.len(), 1);
        assert!(peeked.iter().all(|e| e.key_id == a.id));
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(rows(&store).await, 0);
        store.close().await;
    }

    async fn refresh_notes(store: &SqliteStore) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ledger_refresh")
            .fetch_one(&store.reader)
            .await
            .expect("count");
        n
    }

    /// While KV is stuck, keys whose change still waits for KV are queued again for the ledger
    /// every few minutes, so their ledger entry outlives the ledger's retention; never a key
    /// already waiting for the ledger, nor one waiting for KV only for a rebuild.
    #[tokio::test]
    async fn keys_stuck_on_their_way_to_kv_are_refreshed_in_the_ledger() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        let a = key_with_two_changes(&store, 1).await; // changes queued at 1,000 and 2,000
        let b = key_with_two_changes(&store, 2).await;
        let c = key_with_two_changes(&store, 3).await;
        let refresh = |cutoff: i64, now: i64| {
            let store = &store;
            async move {
                store
                    .outbox_refresh_ledger(UnixMillis(cutoff), UnixMillis(now))
                    .await
                    .expect("refresh")
            }
        };
        // The ledger took every change; KV took only c's, and then a rebuild queued every key.
        let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
            .await
            .expect("ack");
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        let of_c: Vec<_> = newest_per_key(&peeked)
            .into_iter()
            .filter(|e| e.key_id == c.id)
            .collect();
        store.outbox_ack(Sink::Kv, &of_c).await.expect("ack");
        store
            .outbox_enqueue_all(None, 100, UnixMillis(3_000))
            .await
            .expect("enqueue all");
        let kv_pending = pending(&store, Sink::Kv).await;
        assert_eq!(kv_pending, 7);

        assert_eq!(refresh(999, 241_000).await, 0, "not waiting for long yet");
        assert_eq!(
            refresh(1_000, 241_000).await,
            2,
            "a and b; not c (rebuild only)"
        );
        let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        let mut queued: Vec<_> = peeked.iter().map(|e| e.key_id.clone()).collect();
        queued.sort();
        let mut expected = vec![a.id.clone(), b.id.clone()];
        expected.sort();
        assert_eq!(queued, expected);
        assert_eq!(
            pending(&store, Sink::Kv).await,
            kv_pending,
            "KV is not asked again"
        );
        assert_eq!(
            refresh(100_000, 242_000).await,
            0,
            "already waiting for the ledger"
        );
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
            .await
            .expect("ack");

        // Refreshed at 241,000: not again until the cutoff passes that.
        assert_eq!(refresh(240_999, 481_000).await, 0);
        assert_eq!(refresh(241_000, 481_000).await, 2);
        let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(refresh_notes(&store).await, 2);

        // KV takes a's state: a is refreshed no more, and its note goes.
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        let of_a: Vec<_> = newest_per_key(&peeked)
            .into_iter()
            .filter(|e| e.key_id == a.id)
            .collect();
        store.outbox_ack(Sink::Kv, &of_a).await.expect("ack");
        assert_eq!(refresh(481_000, 721_000).await, 1, "b alone");
        assert_eq!(refresh_notes(&store).await, 1);
        let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
        assert!(peeked.iter().all(|e| e.key_id == b.id), "{peeked:?}");
        store
            .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
            .await
            .expect("ack");

        // KV takes everything: nothing left to refresh, no notes, no rows.
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(refresh(721_000, 961_000).await, 0);
        assert_eq!(refresh_notes(&store).await, 0);
        assert_eq!(rows(&store).await, 0);
        store.close().await;
    }

    /// Without the ledger (no `LEDGER_URL`), KV's acknowledgement is enough, and ledger flags
    /// left by a run that fed the ledger are released at once.
    #[tokio::test]
    async fn without_the_ledger_kv_alone_empties_the_outbox() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open_store(&dir).await;
        key_with_two_changes(&store, 1).await;
        // A run with the ledger: KV took the rows, the ledger did not.
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(rows(&store).await, 2);
        // The next run has no ledger.
        assert_eq!(store.set_ledger_sink(false).await.expect("release"), 2);
        assert_eq!(rows(&store).await, 0);
        key_with_two_changes(&store, 2).await;
        assert_eq!(pending(&store, Sink::Kv).await, 2);
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(pending(&store, Sink::Ledger).await, 0);
        assert_eq!(rows(&store).await, 0, "KV's acknowledgement was enough");
        store.close().await;
    }

    /// What the start-up check refuses: `synchronous=NORMAL` (or OFF) syncs the WAL only at
    /// checkpoints, so a power cut can lose acknowledged commits; without WAL, the readers and
    /// the writer block each other and `FULL` means something else.
    #[test]
    fn the_durability_check_refuses_normal_and_no_wal() {
        for (journal_mode, synchronous) in [("wal", 1), ("wal", 0), ("delete", 2), ("memory", 3)] {
            let settings = Durability {
                journal_mode: journal_mode.into(),
                synchronous,
            };
            assert!(settings.check().is_err(), "{settings:?}");
        }
        let extra = Durability {
            journal_mode: "wal".into(),
            synchronous: 3,
        };
        assert!(extra.check().is_ok());
    }
}
