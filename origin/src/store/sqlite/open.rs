//! Opening the database: the writer and the read pools, durability read back from SQLite,
//! the file made private, and the store's own operations outside `KeyStore`.

use super::*;

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
    /// [`KeyStore::anchor_unkeyed`]).
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
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
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
        tokio::spawn(group_commit(
            SqliteWriter {
                pool: writer.clone(),
                commits: commits.clone(),
                chain,
            },
            queue,
        ));
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
            ledger_sink: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The same database for the background roles (see [`KeyStore::for_background`]): its
    /// reads go through connections of their own. Writes share the one writer, as every write
    /// does.
    #[must_use]
    pub fn background_copy(&self) -> Self {
        Self {
            reader: self.background.clone(),
            ..self.clone()
        }
    }

    /// See [`KeyStore::set_ledger_sink`].
    pub(super) async fn ledger_sink(&self, enabled: bool) -> Result<u64, StoreError> {
        self.ledger_sink.store(enabled, Ordering::Relaxed);
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
    pub(super) async fn commit(&self, change: Change) -> Result<bool, StoreError> {
        change::commit(&self.changes, change).await
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

    /// See [`KeyStore::keys_without_create`].
    pub(super) async fn unaccounted_keys(&self) -> Result<(u64, Option<String>), StoreError> {
        let (n, first): (i64, Option<String>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(id) FROM api_keys k WHERE NOT EXISTS \
             (SELECT 1 FROM audit_log a WHERE a.key_id = k.id AND a.action = 'create')",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok((u64::try_from(n).unwrap_or(0), first))
    }

    /// See [`KeyStore::anchor_unkeyed`].
    pub(super) async fn anchor(&self, chain: &AuditChain) -> Result<Anchored, StoreError> {
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
        let newest = newest_entry(&mut tx).await?;
        let (seq, keyed_hash, at) = append_audit(&mut tx, Some(chain), &event, newest).await?;
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
    pub async fn pragmas(&self) -> Result<Durability, StoreError> {
        durability(&self.writer).await
    }
}

/// The writer's pool, its durability checked (a file's) before it takes a write.
pub(super) async fn open_writer(
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
pub(super) fn needs_immutable(file: &Path, error: &StoreError) -> bool {
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
pub(super) struct OnDisk {
    /// SQLite answered `SQLITE_CANTOPEN`.
    pub(super) cannot_open: bool,
    /// The database file exists.
    pub(super) database: bool,
    /// The `-wal` file: `Some(None)` absent, `Some(Some(len))` present, `None` unknown.
    pub(super) wal: Option<Option<u64>>,
    /// The `-shm` file, likewise.
    pub(super) shm: Option<Option<u64>>,
    /// The filesystem refuses writes.
    pub(super) read_only: bool,
}

impl OnDisk {
    /// An immutable open reads the database file alone, with no WAL and no locks. That is
    /// safe only on a read-only filesystem (nothing writes through it) with no WAL index and
    /// no WAL frames to miss: no `-wal` file, or an empty one (the last connection of a clean
    /// shutdown folds the WAL in and deletes both). Anything unknown is refused: a WAL with
    /// frames read past would hide acknowledged writes.
    pub(super) fn immutable_is_safe(&self) -> bool {
        self.cannot_open
            && self.database
            && self.read_only
            && matches!(self.wal, Some(None | Some(0)))
            && self.shm == Some(None)
    }
}

pub(super) async fn durability(writer: &SqlitePool) -> Result<Durability, StoreError> {
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
pub(super) fn make_database_private(file: &Path) {
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
