//! Verify's lookup by hash on a few synchronous read-only connections (`HotReads`), on the
//! calling thread, skipping sqlx's thread hand-offs; snapshots renewed after every commit.

use super::*;

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
pub(super) struct HotReads {
    pub(super) connections: Vec<std::sync::Mutex<HotConnection>>,
    pub(super) next: AtomicUsize,
    /// The lookup, with the same column list as every other key query (`KEY_COLUMNS`).
    pub(super) find_by_hash: String,
    pub(super) commits: Arc<AtomicU64>,
}

/// Connections in [`HotReads`]: more than the cores, so a lookup rarely waits for one.
pub(super) const HOT_READERS: usize = 4;

/// Read connections of the background roles ([`SqliteStore::for_background`]): the KV
/// publisher, the ledger publisher and the webhook deliverers, one each.
pub(super) const BACKGROUND_READERS: u32 = 3;

/// Longest a hot connection's snapshot is used or kept.
pub(super) const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(20);

pub(super) struct HotConnection {
    pub(super) conn: rusqlite::Connection,
    /// The open read transaction: the commit count read before it began, and when.
    pub(super) snapshot: Option<(u64, Instant)>,
}

impl HotConnection {
    /// Ends the read transaction, if one is open. If COMMIT fails, the connection is left in
    /// autocommit by ROLLBACK, which cannot leave a read transaction open.
    pub(super) fn end_snapshot(&mut self) {
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
    pub(super) fn open(path: &Path, n: usize, commits: Arc<AtomicU64>) -> Result<Self, StoreError> {
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

    pub(super) fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
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

    pub(super) fn lookup(
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
    pub(super) fn end_old_snapshots(&self) {
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
pub(super) async fn end_old_snapshots(hot: std::sync::Weak<HotReads>) {
    let mut every = tokio::time::interval(SNAPSHOT_MAX_AGE);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(hot) = hot.upgrade() else { return };
        hot.end_old_snapshots();
    }
}

pub(super) fn sqlite_error(error: rusqlite::Error) -> StoreError {
    let code = match &error {
        rusqlite::Error::SqliteFailure(e, _) => e.extended_code,
        _ => 1,
    };
    StoreError::Sqlite {
        code,
        message: error.to_string(),
    }
}
