//! The KV publisher: drains the outbox (`kv_outbox`, written in the same transaction as every
//! key change) into Workers KV, so the edge learns every create, update and revocation.
//!
//! * Order: the outbox is read oldest first. Several changes of one key in a batch are
//!   coalesced: the key's current state is read and written once, which is the newest state.
//!   Rows are deleted only after KV accepted the write, so a crash or an outage only delays a
//!   change, never loses it (a row may be published twice, which is harmless).
//! * Promptness: every commit wakes the publisher (no polling delay); a slow poll is the
//!   backstop for rows queued by another process.
//! * Failures: a failed write is retried with exponential backoff and jitter, capped at
//!   `KV_RETRY_MAX_MS`; each request has a timeout (`KV_REQUEST_TIMEOUT_MS`).
//! * One publisher per database: it holds an exclusive lock on `<database>.publisher.lock`,
//!   so a second origin or `origin sync` cannot interleave stale writes with it.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use latchkey_shared::kv_entry_name;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::kv::{KvClient, KvError};
use crate::model::OutboxEntry;
use crate::service::system_now;
use crate::store::{KeyStore, StoreError};

/// Outbox rows read per batch.
const BATCH: u32 = 256;
/// KV writes in flight at once.
const CONCURRENCY: usize = 16;
/// The first retry delay; it doubles up to `KV_RETRY_MAX_MS`.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// How often the publisher looks at the outbox when nothing woke it. Commits in this process
/// wake it at once; this catches rows another process queued (`origin sync --full`).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Counters for `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct PublisherStatus {
    enabled: bool,
    published: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What `/healthz` shows of the publisher.
#[derive(Debug, Serialize)]
pub struct PublisherReport {
    /// Whether KV publishing is configured.
    pub enabled: bool,
    /// Key changes not yet in KV.
    pub pending: u64,
    /// Age of the oldest unpublished change, in milliseconds (0 when none waits).
    pub lag_ms: i64,
    /// KV writes that succeeded since start.
    pub published: u64,
    /// KV writes that failed (and were retried) since start.
    pub failures: u64,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

impl PublisherStatus {
    /// The status of a publisher that is (or is not) configured.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// The current backlog, read from the outbox.
    pub async fn report(&self, store: &dyn KeyStore) -> Result<PublisherReport, StoreError> {
        let stats = store.outbox_stats(None).await?;
        let lag_ms = stats
            .oldest_enqueued_at
            .map_or(0, |at| (system_now().0 - at.0).max(0));
        Ok(PublisherReport {
            enabled: self.enabled,
            pending: stats.pending,
            lag_ms,
            published: self.published.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        })
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

/// What one batch achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Outbox rows read.
    pub rows: usize,
    /// Keys written to KV.
    pub published: usize,
    /// Keys whose write failed (left in the outbox).
    pub failed: usize,
}

/// Drains the outbox into KV.
#[derive(Clone)]
pub struct Publisher {
    store: Arc<dyn KeyStore>,
    kv: KvClient,
    status: Arc<PublisherStatus>,
    retry_max: Duration,
}

impl Publisher {
    /// A publisher writing through `kv`, counting into `status`.
    pub fn new(
        store: Arc<dyn KeyStore>,
        kv: KvClient,
        status: Arc<PublisherStatus>,
        retry_max: Duration,
    ) -> Self {
        Self {
            store,
            kv,
            status,
            retry_max,
        }
    }

    /// Publishes until `stop` turns true: waits for the publisher lock, then drains the outbox
    /// whenever `wake` fires (and every second regardless).
    pub async fn run(
        self,
        wake: Arc<Notify>,
        lock_path: Option<PathBuf>,
        mut stop: watch::Receiver<bool>,
    ) {
        let _lock = match lock_path {
            Some(path) => match self.wait_for_lock(&path, &mut stop).await {
                Some(lock) => Some(lock),
                None => return,
            },
            None => None,
        };
        let mut failures_in_a_row = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            let wait = match self.publish_batch().await {
                Ok(outcome) if outcome.failed == 0 => {
                    failures_in_a_row = 0;
                    if outcome.rows > 0 {
                        continue;
                    }
                    self.status.set_error(None);
                    tokio::select! {
                        () = wake.notified() => continue,
                        () = tokio::time::sleep(IDLE_POLL) => continue,
                        _ = stop.changed() => return,
                    }
                }
                Ok(_) => backoff(&mut failures_in_a_row, self.retry_max),
                Err(error) => {
                    tracing::warn!(%error, "cannot read the KV outbox; will retry");
                    self.status.set_error(Some(format!("outbox: {error}")));
                    backoff(&mut failures_in_a_row, self.retry_max)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn wait_for_lock(&self, path: &Path, stop: &mut watch::Receiver<bool>) -> Option<File> {
        let mut announced = false;
        loop {
            match try_lock(path) {
                Ok(Some(file)) => return Some(file),
                Ok(None) => {
                    if !announced {
                        tracing::warn!(
                            lock = %path.display(),
                            "another publisher (origin or `origin sync`) holds the lock; waiting"
                        );
                        announced = true;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, lock = %path.display(), "cannot open the publisher lock; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return None,
            }
        }
    }

    /// Publishes one batch of the outbox: reads the oldest rows, writes each key's current
    /// state once, and deletes the rows of the keys KV accepted.
    pub async fn publish_batch(&self) -> Result<BatchOutcome, StoreError> {
        let rows = self.store.outbox_peek(BATCH).await?;
        let mut keys: Vec<OutboxEntry> = Vec::with_capacity(rows.len());
        let mut position: HashMap<_, usize> = HashMap::new();
        for row in &rows {
            match position.get(&row.key_id) {
                Some(&i) => keys[i].seq = row.seq,
                None => {
                    position.insert(row.key_id.clone(), keys.len());
                    keys.push(row.clone());
                }
            }
        }
        let mut published = Vec::with_capacity(keys.len());
        let mut failed = 0;
        let mut last_error = None;
        for chunk in keys.chunks(CONCURRENCY) {
            let mut writes = JoinSet::new();
            for entry in chunk {
                let (store, kv, entry) = (self.store.clone(), self.kv.clone(), entry.clone());
                writes.spawn(async move {
                    let result = publish_key(&*store, &kv, &entry).await;
                    (entry, result)
                });
            }
            while let Some(joined) = writes.join_next().await {
                match joined {
                    Ok((entry, Ok(()))) => published.push(entry),
                    Ok((entry, Err(error))) => {
                        tracing::warn!(key_id = %entry.key_id, %error, "KV publish failed; will retry");
                        last_error = Some(error);
                        failed += 1;
                    }
                    Err(join_error) => {
                        tracing::error!(%join_error, "KV publish task failed");
                        failed += 1;
                    }
                }
            }
        }
        if !published.is_empty() {
            self.store.outbox_ack(&published).await?;
        }
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.status
            .published
            .fetch_add(count(published.len()), Ordering::Relaxed);
        self.status
            .failures
            .fetch_add(count(failed), Ordering::Relaxed);
        if let Some(error) = last_error {
            self.status.set_error(Some(error));
        }
        Ok(BatchOutcome {
            rows: rows.len(),
            published: published.len(),
            failed,
        })
    }
}

/// Writes one key's current state to KV.
async fn publish_key(
    store: &dyn KeyStore,
    kv: &KvClient,
    entry: &OutboxEntry,
) -> Result<(), String> {
    let Some(key) = store.get(&entry.key_id).await.map_err(|e| e.to_string())? else {
        // Keys are never deleted; a missing row means a hand-edited database. Nothing to send.
        tracing::warn!(key_id = %entry.key_id, "outbox names a key that does not exist; skipping");
        return Ok(());
    };
    kv.put(&kv_entry_name(&key.hash), key.record().to_json())
        .await
        .map_err(|e: KvError| e.to_string())
}

/// The next retry delay: doubling from 100 ms up to `max`, with full jitter in its upper half
/// so many origins do not retry in step.
fn backoff(failures_in_a_row: &mut u32, max: Duration) -> Duration {
    *failures_in_a_row = failures_in_a_row.saturating_add(1);
    let exponent = (*failures_in_a_row - 1).min(16);
    let ceiling = RETRY_BASE.saturating_mul(1 << exponent).min(max);
    let mut random = [0u8; 2];
    let jitter = if getrandom::fill(&mut random).is_ok() {
        f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX)
    } else {
        0.5
    };
    ceiling.mul_f64(0.5 + 0.5 * jitter)
}

/// The publisher lock next to a database file, or `None` for an in-memory database.
pub fn lock_path(database_file: Option<&Path>) -> Option<PathBuf> {
    database_file.map(|file| {
        let mut name = file.as_os_str().to_owned();
        name.push(".publisher.lock");
        PathBuf::from(name)
    })
}

/// Takes the publisher lock without waiting: `Ok(None)` if another process holds it. The lock
/// is released when the returned file is dropped or the process dies.
pub fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let max = Duration::from_secs(2);
        let mut failures = 0;
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let wait = backoff(&mut failures, max);
            let ceiling = RETRY_BASE.saturating_mul(1 << (failures - 1)).min(max);
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{wait:?} vs {ceiling:?}"
            );
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[3], Duration::from_millis(800));
        assert_eq!(ceilings[7], max);
    }

    #[test]
    fn the_lock_admits_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = lock_path(Some(&dir.path().join("db.sqlite"))).expect("file database");
        let held = try_lock(&path).expect("opens").expect("free");
        assert!(
            try_lock(&path).expect("opens").is_none(),
            "second holder refused"
        );
        drop(held);
        assert!(
            try_lock(&path).expect("opens").is_some(),
            "free again after release"
        );
    }
}
