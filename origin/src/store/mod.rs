//! Storage, behind one narrow interface with two backends: SQLite (`sqlite/`, the default) and
//! PostgreSQL (`postgres/`, for several origins on one database); `open` picks one by URL.
//!
//! The contract every backend keeps:
//! * a change to a key, its audit entry and its KV outbox entry commit together, or none does;
//! * a write is acknowledged only once it is durable (SQLite: WAL with `synchronous=FULL`;
//!   PostgreSQL: `fsync` and `synchronous_commit` on);
//! * no plaintext secret is ever passed in, so none can be stored.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use latchkey_shared::{KeyHash, KeyId, UnixMillis};

use crate::audit::{self, Anchored, AuditChain};
pub use crate::config::Backend;

use crate::model::{
    AuditEntry, AuditEvent, KeyPage, ListFilter, OutboxEntry, OutboxStats, PolicyQuery, Sink,
    StoredKey, VerifyEntry,
};

pub(crate) mod audit_row;
pub(crate) mod change;
#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod key_row;
pub mod lease;
pub mod migrate;
pub mod postgres;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A storage failure. Its `Display` is for logs, never for API responses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The synchronous read path (verify's lookup by hash) failed; `code` is SQLite's result code.
    #[error("database error (SQLite code {code}): {message}")]
    Sqlite {
        /// SQLite's extended result code.
        code: i32,
        /// Its message.
        message: String,
    },
    /// Migrations failed at start.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be read back as a key (hand-edited or corrupt).
    #[error("corrupt row {id}: {problem}")]
    Corrupt {
        /// The row.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// Creating the database's folder failed.
    #[error("cannot create database folder: {0}")]
    Io(#[from] std::io::Error),
    /// The audit chain cannot be appended to (no key, or its newest entry does not verify).
    #[error("audit log: {0}")]
    Audit(String),
    /// A background role's lease could not be taken (a SQLite database's lock file cannot be
    /// opened, say).
    #[error("the {role} lease ({path}): {source}")]
    Lease {
        /// The role.
        role: &'static str,
        /// Where the lease lives (a lock file's path).
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database does not run with the settings that make a commit durable.
    #[error("not durable: {0}")]
    NotDurable(String),
    /// The database could not be reached for a change, whose outcome is then unknown to the
    /// caller (answered 503, so it retries; a retry of an applied change meets its revision).
    #[error("database unavailable: {0}")]
    Unavailable(&'static str),
    /// `DATABASE_URL` names no backend origin has.
    #[error("DATABASE_URL {0}")]
    Url(&'static str),
}

impl StoreError {
    /// Whether this failure is a temporary condition of the store rather than the request's
    /// fault, with a short reason an operator can act on (the API answers it `503
    /// storage_unavailable`): a full disk, a read-only file, a lock held too long, no free
    /// connection. The store classifies its own errors, so nothing above it reads a database's
    /// codes.
    pub fn unavailable(&self) -> Option<&'static str> {
        match self {
            Self::Unavailable(reason) => Some(reason),
            Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => {
                Some("no database connection is free")
            }
            Self::Database(sqlx::Error::Io(_)) => Some("an I/O error"),
            Self::Database(sqlx::Error::Database(db)) if self.sqlite_code().is_none() => {
                postgres_unavailable(db.code()?.as_ref())
            }
            _ => match self.sqlite_code()? {
                5 | 6 => Some("the database is locked"),
                8 => Some("the database is read-only"),
                10 => Some("a disk I/O error"),
                13 => Some("the disk is full"),
                14 => Some("the database file cannot be opened"),
                _ => None,
            },
        }
    }

    /// SQLite's primary result code (`SQLITE_FULL` is 13, say), when SQLite refused.
    pub fn sqlite_code(&self) -> Option<i32> {
        match self {
            Self::Sqlite { code, .. } => Some(code & 0xff),
            Self::Database(sqlx::Error::Database(db)) => db
                .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                .and_then(sqlx::error::DatabaseError::code)
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff),
            _ => None,
        }
    }
}

/// PostgreSQL's SQLSTATEs that are the server's condition, not the request's fault.
fn postgres_unavailable(state: &str) -> Option<&'static str> {
    match state {
        "53100" => Some("the disk is full"),
        "25006" => Some("the database is read-only"),
        "40001" | "40P01" => Some("the database is busy"),
        "55P03" => Some("the database is locked"),
        _ if state.starts_with("08") => Some("the database connection failed"),
        _ if state.starts_with("57P") => Some("the database is shutting down or starting"),
        _ if state.starts_with("53") => Some("the database is out of resources"),
        _ if state.starts_with("58") => Some("a disk I/O error"),
        _ => None,
    }
}

/// Everything the key service needs from storage.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key and its `create` audit entry.
    async fn insert(&self, key: &StoredKey, event: &AuditEvent) -> Result<(), StoreError>;

    /// Rolls a key in one transaction: writes the replaced key's new state `old.0` if its
    /// revision is still `old.1` (`false` otherwise, and nothing is written), inserts the new
    /// key `new.0`, appends both audit events and queues both for publishing.
    async fn roll(
        &self,
        old: (&StoredKey, i64, &AuditEvent),
        new: (&StoredKey, &AuditEvent),
    ) -> Result<bool, StoreError>;

    /// Where event webhooks to `endpoint` resume: the last audit entry delivered (or passed
    /// over), `None` for an endpoint never seen.
    async fn webhook_cursor(&self, endpoint: &str) -> Result<Option<i64>, StoreError>;

    /// Moves `endpoint`'s webhook cursor to `after_seq`.
    async fn set_webhook_cursor(
        &self,
        endpoint: &str,
        after_seq: i64,
        now: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Gives `endpoint` a webhook cursor at the newest audit entry, unless it has one: events
    /// from now on are delivered to it, history is not.
    async fn init_webhook_cursor(&self, endpoint: &str, now: UnixMillis) -> Result<(), StoreError>;

    /// How many audit entries after `after_seq` have one of `actions` (counted up to `max`),
    /// and when the oldest of them was written.
    async fn audit_count(
        &self,
        after_seq: i64,
        actions: &[&str],
        max: u64,
    ) -> Result<(u64, Option<UnixMillis>), StoreError>;

    /// The keys `query` names, oldest activity (or soonest expiry) first.
    async fn policy_candidates(
        &self,
        query: PolicyQuery,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError>;

    /// Appends an audit entry that changes no key: a refused attempt, or a policy's warning.
    async fn record_event(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// Replaces a key's state, with its audit entry, if the stored revision is still
    /// `expected_revision`. Returns `false` (and writes nothing) if someone changed it first.
    async fn replace(
        &self,
        key: &StoredKey,
        expected_revision: i64,
        event: &AuditEvent,
    ) -> Result<bool, StoreError>;

    /// A key by id.
    async fn get(&self, id: &KeyId) -> Result<Option<StoredKey>, StoreError>;

    /// A key by the hash of its secret: the verification lookup.
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError>;

    /// One page of keys matching `filter`, newest first, with the total count.
    async fn list(&self, filter: &ListFilter) -> Result<KeyPage, StoreError>;

    /// Moves `last_used_at` forward (never back) for a batch of keys, in one transaction.
    async fn record_usage(&self, usage: &[(KeyId, UnixMillis)]) -> Result<(), StoreError>;

    /// Records that the usage batch whose MAC is `mac` was accepted, and remembers it until
    /// `until` (then its timestamp is refused anyway); forgets batches whose `until` is before
    /// `now`. Durable before it returns, so a replay after a restart is refused too. Returns
    /// `false`, and records nothing, if the batch was accepted before: a replay.
    async fn remember_usage_batch(
        &self,
        mac: &[u8; 32],
        until: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// When a usage batch was last accepted ([`KeyStore::remember_usage_batch`]'s `now`), by
    /// any origin over this database; `None` if never.
    async fn last_usage_report(&self) -> Result<Option<UnixMillis>, StoreError>;

    /// Audit entries after `after_seq`, oldest first, optionally for one key.
    async fn audit_log(
        &self,
        key_id: Option<&KeyId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// The oldest `limit` outbox entries that `sink` still needs, in order.
    async fn outbox_peek(&self, sink: Sink, limit: u32) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Records, for each entry, that `sink` has its key's state as of its `seq`: clears the
    /// sink's flag on every row of the key up to `seq`, and deletes the rows no sink still needs.
    async fn outbox_ack(&self, sink: Sink, published: &[OutboxEntry]) -> Result<(), StoreError>;

    /// How many outbox rows `sink` still needs (only those up to `up_to_seq`, if given), and
    /// the oldest one's time.
    async fn outbox_stats(
        &self,
        sink: Sink,
        up_to_seq: Option<i64>,
    ) -> Result<OutboxStats, StoreError>;

    /// Queues up to `limit` keys for publishing to KV alone (not to the ledger: a KV rebuild
    /// must not flood it), in id order after `after`. Returns the last
    /// key queued and its outbox `seq`, or `None` when no key is left.
    async fn outbox_enqueue_all(
        &self,
        after: Option<&KeyId>,
        limit: u32,
        now: UnixMillis,
    ) -> Result<Option<(KeyId, i64)>, StoreError>;

    /// Queues `keys` for publishing to KV again (their KV value was found behind the database),
    /// and to the ledger as well: isolates that cached the stale KV value keep it until a ledger
    /// entry with a higher revision reaches them (repairs are few).
    async fn outbox_enqueue(&self, keys: &[KeyId], now: UnixMillis) -> Result<(), StoreError>;

    /// Queues, for the ledger alone, every key changed at or after `since` (the ledger publisher
    /// does this when it starts: the ledger may be new, or may have missed changes made while
    /// origin ran without it), and every key whose change still waits for KV, whatever its age;
    /// forgets earlier refresh notes. A key already waiting for the ledger is not queued again.
    /// Returns how many keys were queued.
    async fn outbox_enqueue_changed_since(
        &self,
        since: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError>;

    /// Keeps the ledger entries of keys stuck on their way to KV from expiring: queues, for the
    /// ledger alone, every key whose oldest change still waiting for KV was queued at or before
    /// `cutoff` and that was not refreshed after `cutoff`, and notes the refresh at `now`. A key
    /// already waiting for the ledger, or waiting for KV only for a rebuild (`sync --full`), is
    /// not queued. Refresh notes of keys that no longer wait for KV are dropped. Returns how
    /// many keys were queued.
    async fn outbox_refresh_ledger(
        &self,
        cutoff: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError>;

    /// Asks for each of `keys` to be read back from KV at `due_at` (a later time already asked
    /// for is kept).
    async fn verify_schedule(&self, keys: &[KeyId], due_at: UnixMillis) -> Result<(), StoreError>;

    /// Up to `limit` read-backs due at `now`, the most overdue first.
    async fn verify_due(&self, now: UnixMillis, limit: u32)
    -> Result<Vec<VerifyEntry>, StoreError>;

    /// Ends a read-back that found KV current, unless it was asked for again meanwhile (its
    /// `due_at` moved).
    async fn verify_done(&self, entry: &VerifyEntry) -> Result<(), StoreError>;

    /// Asks for a read-back again at `due_at`, counting one more attempt.
    async fn verify_retry(&self, entry: &VerifyEntry, due_at: UnixMillis)
    -> Result<(), StoreError>;

    /// How many read-backs wait.
    async fn verify_pending(&self) -> Result<u64, StoreError>;

    /// Up to `limit` keys in id order after `after` (for reconciling KV with the database).
    async fn keys_after(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError>;

    /// How many keys exist.
    async fn count_keys(&self) -> Result<u64, StoreError>;

    /// Checks that the database answers (for `/healthz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes connections, letting the last transaction finish.
    async fn close(&self);

    /// Takes the lease of a background `role`, waiting while another process holds it (and
    /// saying `waiting` once); `Err(Stopped)` if `stop` turns true first. The role is this
    /// process's until the lease is dropped (or the process dies).
    async fn hold_lease(
        &self,
        role: lease::Role,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        waiting: &str,
    ) -> Result<lease::Lease, lease::Stopped>;

    /// Takes the lease of `role` without waiting: `Ok(None)` while another process holds it.
    async fn try_lease(&self, role: lease::Role) -> Result<Option<lease::Lease>, StoreError>;

    /// The same database for the background roles (the KV and ledger publishers, the webhook
    /// deliverers): their reads go through connections of their own, so requests (a flood of
    /// `/healthz`, say) never hold up a publisher's turn, nor the reverse.
    fn for_background(&self) -> Arc<dyn KeyStore>;

    /// How the store makes an acknowledged commit durable, for the start-up log (SQLite:
    /// `journal_mode=wal synchronous=full`).
    async fn durability(&self) -> Result<String, StoreError>;

    /// Says whether the change ledger is fed (`LEDGER_URL` set); it is unless told otherwise.
    /// Without it, nobody clears the outbox rows' ledger flags: so KV's acknowledgement clears
    /// them too, and the flags left by an earlier run that fed the ledger are cleared now
    /// (returns how many rows were released). Only `origin serve`, which runs the ledger
    /// publisher when it is configured, turns it off, and only while it holds the ledger lease
    /// (another origin over the same database may feed the ledger).
    async fn set_ledger_sink(&self, enabled: bool) -> Result<u64, StoreError>;

    /// Keys the audit log does not account for: how many have no `create` entry, and the
    /// first of them (every key is created with one).
    async fn keys_without_create(&self) -> Result<(u64, Option<String>), StoreError>;

    /// `origin audit anchor`: the operator's one-time step for a database written before
    /// `AUDIT_CHAIN_KEY` existed. Checks, in one write transaction, that the log is an intact
    /// chain of unkeyed entries (none of them an `audit_chain_keyed` entry, which only a keyed
    /// chain has) with no checkpoints taken of it, then appends a keyed `audit_chain_keyed`
    /// entry chained onto them and checkpoints it. Refuses anything else, naming why.
    async fn anchor_unkeyed(&self, chain: &AuditChain) -> Result<Anchored, StoreError>;
}

/// Opens the store `url` names (`sqlite:` or `postgres:`), creating it if needed and running its
/// migrations. Without `chain`, the store can read the audit log but not append to it
/// (`origin audit verify`, `origin sync`). With it, the chain's newest entry must verify with
/// its key.
pub async fn open(
    url: &str,
    chain: Option<Arc<AuditChain>>,
) -> Result<Arc<dyn KeyStore>, StoreError> {
    match Backend::of(url).map_err(StoreError::Url)? {
        Backend::Sqlite => Ok(Arc::new(SqliteStore::open(url, chain).await?)),
        Backend::Postgres => Ok(Arc::new(PgStore::open(url, chain).await?)),
    }
}

/// Where audit checkpoints go when `AUDIT_CHECKPOINT_FILE` is unset: beside a SQLite file
/// (`None` for an in-memory database, whose checkpoints are only logged).
pub fn default_checkpoint_path(url: &str) -> Option<PathBuf> {
    match Backend::of(url).ok()? {
        Backend::Sqlite => SqliteStore::database_file(url)
            .ok()
            .flatten()
            .map(|db| audit::default_checkpoint_path(&db)),
        // No file of the database's own to sit beside: checkpoints are only logged unless
        // AUDIT_CHECKPOINT_FILE says where.
        Backend::Postgres => None,
    }
}

#[cfg(test)]
mod tests {
    use super::StoreError;

    /// Temporary conditions are told apart from faults by the store, extended codes included.
    #[test]
    fn the_store_classifies_its_own_errors() {
        let sqlite = |code| StoreError::Sqlite {
            code,
            message: String::new(),
        };
        let cases = [
            (sqlite(13), Some("the disk is full")),
            (sqlite(8 | (1 << 8)), Some("the database is read-only")),
            (sqlite(5), Some("the database is locked")),
            (sqlite(6), Some("the database is locked")),
            (sqlite(10 | (12 << 8)), Some("a disk I/O error")),
            (sqlite(14), Some("the database file cannot be opened")),
            (sqlite(19), None),
            (sqlite(1), None),
            (
                StoreError::Database(sqlx::Error::PoolTimedOut),
                Some("no database connection is free"),
            ),
            (StoreError::Audit("broken".into()), None),
            (
                StoreError::Unavailable("the database connection failed"),
                Some("the database connection failed"),
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.unavailable(), expected, "{error}");
        }
        // PostgreSQL's SQLSTATEs: the server's condition, or the request's fault.
        for (state, expected) in [
            ("53100", Some("the disk is full")),
            ("57P01", Some("the database is shutting down or starting")),
            ("57P03", Some("the database is shutting down or starting")),
            ("08006", Some("the database connection failed")),
            ("40P01", Some("the database is busy")),
            ("25006", Some("the database is read-only")),
            ("23505", None),
            ("22021", None),
        ] {
            assert_eq!(super::postgres_unavailable(state), expected, "{state}");
        }
    }
}
