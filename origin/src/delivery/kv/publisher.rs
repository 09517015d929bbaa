//! The KV publisher: drains the outbox (`kv_outbox`, written in the same transaction as every
//! key change) into Workers KV, so the edge learns every create, update and revocation.
//!
//! * Writes: with `KV_WRITE_MODE=bulk` (Cloudflare) a batch of up to 5,000 outbox rows is
//!   written in one `PUT …/bulk` request; with `per_key` (`wrangler dev`'s local API, which
//!   has no bulk write) each key is one `PUT …/values/{name}`, 16 at a time. A bulk request
//!   with an unknown outcome puts all its keys on the read-back list; keys it reports as
//!   `unsuccessful_keys` stay in the outbox and are written again.
//! * Budget: every Cloudflare API request (writes, read-backs, reconciliation reads) spends
//!   from one request budget (`KV_API_BUDGET` per five minutes, paced; see `budget.rs` beside it), and a
//!   429 pauses them all until its `Retry-After`. Reconciliation reads only while the budget
//!   has plenty left, so they never starve writes.
//! * Order: the outbox is read oldest first. Several changes of one key in a batch are
//!   coalesced: the key's current state is read and written once, which is the newest state.
//!   Rows are deleted only after KV accepted the write, so a crash or an outage only delays a
//!   change, never loses it (a row may be published twice, which is harmless).
//! * Promptness: every commit wakes the publisher (no polling delay); a slow poll is the
//!   backstop for rows queued by another process.
//! * Failures: a failed write is retried with exponential backoff and jitter, capped at
//!   `KV_RETRY_MAX_MS`; each request has a timeout (`KV_REQUEST_TIMEOUT_MS`).
//! * Unknown outcomes: a write that was sent but got no answer (timeout, dropped connection)
//!   or a 5xx may still be applied later, after a newer write of the same key, and KV keeps
//!   the last write. So it is never taken as done: its key is recorded in `kv_verify` (in the
//!   database, before anything else) and, `KV_VERIFY_DELAY_MS` later, read back from KV; if
//!   the value's revision is not the database's, the key is queued again and read back again.
//! * Reconciliation: every `KV_RECONCILE_INTERVAL_S`, every key's KV value is compared with the
//!   database in `bulk/get` batches of 100, one batch a second at most (a quarter of
//!   Cloudflare's 1,200 requests per five minutes), and keys that differ are queued again.
//!   This also covers writes that were in flight when a process died.
//! * One publisher per database: it holds the store's publisher lease (`<database>.publisher.lock`
//!   beside a SQLite file, an advisory lock on PostgreSQL), so a second origin or `origin sync`
//!   cannot interleave stale writes with it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use latchkey_shared::{KeyId, KeyRecord, UnixMillis, kv_entry_name};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::{KvConfig, WriteMode};
use crate::delivery::kv::budget::{ApiBudget, BudgetReport};
use crate::delivery::kv::client::{
    BULK_GET_MAX, BULK_PUT_MAX, BULK_PUT_MAX_BYTES, KvClient, KvError,
};
use crate::model::{OutboxEntry, Sink};
use crate::service::system_now;
use crate::store::lease::{Role, lost_lease};
use crate::store::{KeyStore, StoreError};

/// Outbox rows read per batch, one request per key (`KV_WRITE_MODE=per_key`).
const BATCH: u32 = 256;
/// Outbox rows read per batch written in bulk: one request (a few hundred bytes per key, so
/// far below the 10,000 pairs and 100 MB a bulk write may carry).
const BULK_BATCH: u32 = 5000;
/// KV writes in flight at once.
const CONCURRENCY: usize = 16;
/// The first retry delay; it doubles up to `KV_RETRY_MAX_MS`.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// How often the publisher looks at the outbox when nothing woke it. Commits in this process
/// wake it at once; this catches rows another process queued (`origin sync --full`).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The least time between two reconciliation batches (one `bulk/get` of 100 keys each): at
/// most 300 requests per five minutes, a quarter of Cloudflare's limit for a token.
const RECONCILE_PACE: Duration = Duration::from_secs(1);

/// Counters for `/healthz`, `/metrics` and the admin status.
#[derive(Debug, Default)]
pub struct PublisherStatus {
    enabled: bool,
    published: AtomicU64,
    failures: AtomicU64,
    verified: AtomicU64,
    rewrites: AtomicU64,
    reconciled: AtomicU64,
    reconcile_passes: AtomicU64,
    last_error: Mutex<Option<LastError>>,
    budget: OnceLock<Arc<ApiBudget>>,
}

/// The last failure: a coarse state for everyone, the detail for admins and logs.
#[derive(Debug, Clone)]
struct LastError {
    /// Which step failed (`PUBLISH`, `OUTBOX`, `READ_BACK`, `VERIFY_LIST`, `RECONCILE_READ`,
    /// `RECONCILE_STORE`): only that step working again clears it.
    source: &'static str,
    state: &'static str,
    detail: String,
}

/// What `/healthz` shows of the publisher: counts and states, never an error's text (that
/// names hosts, ports and the API's messages; admins see it at `GET /v1/status`).
#[derive(Debug, Serialize)]
pub struct PublisherReport {
    /// Whether KV publishing is configured.
    pub enabled: bool,
    /// `ok`, or how the last attempt failed: `unreachable`, `timeout`, `no_answer`,
    /// `rate_limited`, `refused`, `http_error` or `store_error`.
    pub state: &'static str,
    /// Key changes not yet in KV.
    pub pending: u64,
    /// Age of the oldest unpublished change, in milliseconds (0 when none waits).
    pub lag_ms: i64,
    /// Keys to be read back from KV because a write of theirs had an unknown outcome.
    pub verifications_pending: u64,
    /// KV writes that succeeded since start.
    pub published: u64,
    /// KV requests that failed (and were retried) since start.
    pub failures: u64,
    /// Read-backs that found KV current since start.
    pub verified: u64,
    /// Keys found behind in KV (by a read-back or reconciliation) and queued again since start.
    pub rewrites: u64,
    /// Keys compared by reconciliation since start.
    pub reconciled: u64,
    /// Full reconciliation passes finished since start.
    pub reconcile_passes: u64,
    /// The Cloudflare API request budget: limit, use, and any 429 pause (`null` until the
    /// publisher runs).
    pub api_budget: Option<BudgetReport>,
    /// The last failure's text: only in the admin status (`GET /v1/status`).
    #[serde(skip_serializing_if = "Option::is_none")]
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

    /// The current backlog, read from the outbox, without error text (for `/healthz`).
    pub async fn report(&self, store: &dyn KeyStore) -> Result<PublisherReport, StoreError> {
        let stats = store.outbox_stats(Sink::Kv, None).await?;
        let verifications_pending = store.verify_pending().await?;
        let lag_ms = stats
            .oldest_enqueued_at
            .map_or(0, |at| (system_now().0 - at.0).max(0));
        let last = self.last_error();
        Ok(PublisherReport {
            enabled: self.enabled,
            state: last.as_ref().map_or("ok", |e| e.state),
            pending: stats.pending,
            lag_ms,
            verifications_pending,
            published: self.published.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            verified: self.verified.load(Ordering::Relaxed),
            rewrites: self.rewrites.load(Ordering::Relaxed),
            reconciled: self.reconciled.load(Ordering::Relaxed),
            reconcile_passes: self.reconcile_passes.load(Ordering::Relaxed),
            api_budget: self.budget.get().map(|b| b.report()),
            last_error: None,
        })
    }

    /// [`Self::report`] with the last failure's text (for admins).
    pub async fn detailed_report(
        &self,
        store: &dyn KeyStore,
    ) -> Result<PublisherReport, StoreError> {
        let mut report = self.report(store).await?;
        report.last_error = self.last_error().map(|e| e.detail);
        Ok(report)
    }

    /// Shows `budget` in the reports (the first one attached stays).
    pub fn attach_budget(&self, budget: Arc<ApiBudget>) {
        let _ = self.budget.set(budget);
    }

    fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_error(&self, source: &'static str, state: &'static str, detail: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(LastError {
            source,
            state,
            detail,
        });
    }

    fn set_kv_error(&self, error: &KvError) {
        self.set_error(PUBLISH, error.state(), error.to_string());
    }

    fn set_store_error(&self, source: &'static str, detail: String) {
        self.set_error(source, STORE_ERROR, detail);
    }

    /// Clears the last failure if `source` caused it.
    fn clear_error_from(&self, source: &'static str) {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_ref().is_some_and(|e| e.source == source) {
            *last = None;
        }
    }
}

const STORE_ERROR: &str = "store_error";
// Where a failure came from: a step that works again clears only its own failure, so a read that
// works never hides a write that still fails.
/// A KV write, or reading the keys to write.
const PUBLISH: &str = "publish";
/// Reading the outbox.
const OUTBOX: &str = "outbox";
/// A KV read-back.
const READ_BACK: &str = "read_back";
/// Reading or updating the read-back list.
const VERIFY_LIST: &str = "verify_list";
/// A KV read of the reconciler.
const RECONCILE_READ: &str = "reconcile_read";
/// The reconciler's reads and writes of the database.
const RECONCILE_STORE: &str = "reconcile_store";

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
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

/// What one round of read-backs achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// Keys whose KV value matched the database: done.
    pub verified: usize,
    /// Keys found behind (or absent) in KV: queued again, to be read back again.
    pub behind: usize,
    /// Keys whose read failed: to be read back again.
    pub failed: usize,
}

/// Where a reconciliation pass is.
#[derive(Debug)]
struct Reconcile {
    /// The last key compared in the current pass (`None` at the start of a pass).
    cursor: Option<KeyId>,
    /// When the current pass started, if one runs.
    pass_started: Option<Instant>,
    /// When the next batch (or the next pass) may start.
    next_at: Instant,
}

/// Drains the outbox into KV.
#[derive(Clone)]
pub struct Publisher {
    store: Arc<dyn KeyStore>,
    kv: KvClient,
    status: Arc<PublisherStatus>,
    retry_max: Duration,
    verify_delay: Duration,
    reconcile_interval: Option<Duration>,
    write_mode: WriteMode,
}

/// What writing one batch's keys achieved.
#[derive(Default)]
struct Written {
    /// Keys KV accepted (or that need no write): their rows are acknowledged.
    published: Vec<OutboxEntry>,
    /// Keys whose write had an unknown outcome: read back later.
    unknown: Vec<KeyId>,
    /// Keys not written (left in the outbox).
    failed: usize,
}

impl Publisher {
    /// A publisher writing through `kv`, counting into `status`, with the retry, read-back
    /// and reconciliation settings of `config`.
    pub fn new(
        store: Arc<dyn KeyStore>,
        kv: KvClient,
        status: Arc<PublisherStatus>,
        config: &KvConfig,
    ) -> Self {
        status.attach_budget(kv.budget());
        Self {
            store,
            kv,
            status,
            retry_max: config.retry_max,
            verify_delay: config.verify_delay,
            reconcile_interval: config.reconcile_interval,
            write_mode: config.write_mode,
        }
    }

    /// Publishes until `stop` turns true: waits for the publisher lock, then drains the outbox
    /// whenever `wake` fires (and every second regardless). About once a second it also reads
    /// back the keys due for it and, when reconciliation is on, compares one batch of keys.
    pub async fn run(self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let store = self.store.clone();
        loop {
            let Ok(lease) = store
                .hold_lease(
                    Role::Publisher,
                    &mut stop,
                    "another publisher (origin or `origin sync`) holds the lock; waiting",
                )
                .await
            else {
                return;
            };
            tokio::select! {
                () = self.play(&wake, stop.clone()) => return,
                () = lease.lost_wait() => lost_lease(Role::Publisher),
            }
        }
    }

    /// The role's work while this process holds its lease (see `run`).
    async fn play(&self, wake: &Notify, mut stop: watch::Receiver<bool>) {
        // At shutdown, a request waiting for the budget (a 429's pause lasts minutes) gives up.
        let budget = self.kv.budget();
        let mut stopping = stop.clone();
        let closer = tokio::spawn(async move {
            while !*stopping.borrow_and_update() {
                if stopping.changed().await.is_err() {
                    break;
                }
            }
            budget.close();
        });
        let _closer = AbortOnDrop(closer);
        let mut failures_in_a_row = 0u32;
        let mut next_verify = Instant::now();
        let mut reconcile = self.reconcile_interval.map(|interval| Reconcile {
            cursor: None,
            pass_started: None,
            next_at: Instant::now() + interval,
        });
        loop {
            if *stop.borrow() {
                return;
            }
            if Instant::now() >= next_verify {
                next_verify = Instant::now() + IDLE_POLL;
                match self.verify_due().await {
                    Ok(_) => self.status.clear_error_from(VERIFY_LIST),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the KV read-back list; will retry");
                        self.status
                            .set_store_error(VERIFY_LIST, format!("kv_verify: {error}"));
                    }
                }
            }
            if let Some(reconcile) = reconcile.as_mut().filter(|r| Instant::now() >= r.next_at) {
                self.reconcile_step(reconcile).await;
            }
            let wait = match self.publish_batch().await {
                Ok(outcome) if outcome.failed == 0 => {
                    failures_in_a_row = 0;
                    if outcome.rows > 0 {
                        continue;
                    }
                    self.status.clear_error_from(OUTBOX);
                    tokio::select! {
                        () = wake.notified() => continue,
                        () = tokio::time::sleep(IDLE_POLL) => continue,
                        _ = stop.changed() => return,
                    }
                }
                Ok(_) => backoff(&mut failures_in_a_row, self.retry_max),
                Err(error) => {
                    tracing::warn!(%error, "cannot read the KV outbox; will retry");
                    self.status
                        .set_store_error(OUTBOX, format!("outbox: {error}"));
                    backoff(&mut failures_in_a_row, self.retry_max)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Publishes one batch of the outbox: reads the oldest rows, writes each key's current
    /// state once, and deletes the rows of the keys KV accepted. A key whose write had an
    /// unknown outcome keeps its rows (it is retried) and is recorded for a read-back first.
    pub async fn publish_batch(&self) -> Result<BatchOutcome, StoreError> {
        let limit = match self.write_mode {
            WriteMode::Bulk => BULK_BATCH,
            WriteMode::PerKey => BATCH,
        };
        let rows = self.store.outbox_peek(Sink::Kv, limit).await?;
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
        let Written {
            published,
            unknown,
            failed,
        } = match self.write_mode {
            WriteMode::Bulk => self.write_bulk(&keys).await,
            WriteMode::PerKey => self.write_per_key(&keys).await,
        };
        // Recorded before anything else: a stale write may land at any time from now on.
        self.store
            .verify_schedule(&unknown, later(system_now(), self.verify_delay))
            .await?;
        if !published.is_empty() {
            self.store.outbox_ack(Sink::Kv, &published).await?;
            if failed == 0 {
                self.status.clear_error_from(PUBLISH);
                self.status.clear_error_from(OUTBOX);
            }
        }
        self.status
            .published
            .fetch_add(count(published.len()), Ordering::Relaxed);
        self.status
            .failures
            .fetch_add(count(failed), Ordering::Relaxed);
        Ok(BatchOutcome {
            rows: rows.len(),
            published: published.len(),
            failed,
        })
    }

    /// Writes each key in a request of its own, [`CONCURRENCY`] at a time.
    async fn write_per_key(&self, keys: &[OutboxEntry]) -> Written {
        let mut written = Written::default();
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
                    Ok((entry, Ok(()))) => written.published.push(entry),
                    Ok((entry, Err(KeyFailure::Kv(error)))) => {
                        let outcome_unknown = error.outcome_unknown();
                        tracing::warn!(key_id = %entry.key_id, %error, outcome_unknown, "KV publish failed; will retry");
                        if outcome_unknown {
                            written.unknown.push(entry.key_id.clone());
                        }
                        self.status.set_kv_error(&error);
                        written.failed += 1;
                    }
                    Ok((entry, Err(KeyFailure::Store(error)))) => {
                        tracing::warn!(key_id = %entry.key_id, %error, "cannot read a key to publish; will retry");
                        self.status
                            .set_store_error(PUBLISH, format!("key: {error}"));
                        written.failed += 1;
                    }
                    Err(join_error) => {
                        tracing::error!(%join_error, "KV publish task failed");
                        written.failed += 1;
                    }
                }
            }
        }
        written
    }

    /// Writes the keys' current states in bulk requests: one for a whole batch, unless it
    /// passes [`BULK_PUT_MAX`] pairs or [`BULK_PUT_MAX_BYTES`].
    async fn write_bulk(&self, keys: &[OutboxEntry]) -> Written {
        let mut written = Written::default();
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(keys.len());
        let mut entries: Vec<&OutboxEntry> = Vec::with_capacity(keys.len());
        for entry in keys {
            match self.store.get(&entry.key_id).await {
                Ok(Some(key)) => {
                    pairs.push((kv_entry_name(&key.hash), key.record().to_json()));
                    entries.push(entry);
                }
                Ok(None) => {
                    // Keys are never erased (a deleted one keeps its row); a missing row means a hand-edited database.
                    tracing::warn!(key_id = %entry.key_id, "outbox names a key that does not exist; skipping");
                    written.published.push(entry.clone());
                }
                Err(error) => {
                    tracing::warn!(key_id = %entry.key_id, %error, "cannot read a key to publish; will retry");
                    self.status
                        .set_store_error(PUBLISH, format!("key: {error}"));
                    written.failed += 1;
                }
            }
        }
        let mut start = 0;
        while start < pairs.len() {
            let end = bulk_chunk_end(&pairs, start);
            let chunk = &pairs[start..end];
            let chunk_entries = &entries[start..end];
            match self.kv.put_bulk(chunk).await {
                Ok(unsuccessful) => {
                    let refused: HashSet<&str> = unsuccessful.iter().map(String::as_str).collect();
                    for ((name, _), entry) in chunk.iter().zip(chunk_entries) {
                        if refused.contains(name.as_str()) {
                            written.failed += 1;
                        } else {
                            written.published.push((*entry).clone());
                        }
                    }
                    if !refused.is_empty() {
                        tracing::warn!(
                            keys = refused.len(),
                            "KV bulk write: some keys were not written (unsuccessful_keys); will retry them"
                        );
                        self.status.set_error(
                            PUBLISH,
                            "refused",
                            format!(
                                "KV bulk write: {} of {} keys unsuccessful",
                                refused.len(),
                                chunk.len()
                            ),
                        );
                    }
                }
                Err(error) => {
                    let outcome_unknown = error.outcome_unknown();
                    tracing::warn!(keys = chunk.len(), %error, outcome_unknown, "KV bulk write failed; will retry");
                    if outcome_unknown {
                        written
                            .unknown
                            .extend(chunk_entries.iter().map(|e| e.key_id.clone()));
                    }
                    self.status.set_kv_error(&error);
                    written.failed += chunk.len();
                }
            }
            start = end;
        }
        written
    }

    /// Reads back the keys whose read-back is due, in one request (a `GET` for one key,
    /// `bulk/get` for up to 100): a key whose KV value carries the database's revision is done;
    /// any other is queued again and read back again later, as is every key of a failed read.
    pub async fn verify_due(&self) -> Result<VerifyOutcome, StoreError> {
        let limit = u32::try_from(BULK_GET_MAX).unwrap_or(100);
        let due = self.store.verify_due(system_now(), limit).await?;
        let mut outcome = VerifyOutcome::default();
        let mut keys = Vec::with_capacity(due.len());
        for entry in &due {
            match self.store.get(&entry.key_id).await? {
                Some(key) => keys.push((entry, key)),
                None => self.store.verify_done(entry).await?,
            }
        }
        if keys.is_empty() {
            return Ok(outcome);
        }
        let names: Vec<String> = keys.iter().map(|(_, k)| kv_entry_name(&k.hash)).collect();
        let read = match names.as_slice() {
            [name] => self.kv.get(name).await.map(|value| {
                HashMap::from([(
                    name.clone(),
                    value.map(|v| String::from_utf8_lossy(&v).into_owned()),
                )])
            }),
            _ => self.kv.bulk_get(&names).await,
        };
        let now = system_now();
        let again = later(now, self.verify_delay);
        match read {
            Err(error) => {
                tracing::warn!(keys = keys.len(), %error, "KV read-back failed; will retry");
                self.status
                    .set_error(READ_BACK, error.state(), error.to_string());
                for (entry, _) in &keys {
                    self.store.verify_retry(entry, again).await?;
                }
                outcome.failed = keys.len();
                self.status.failures.fetch_add(1, Ordering::Relaxed);
            }
            Ok(values) => {
                self.status.clear_error_from(READ_BACK);
                let mut behind = Vec::new();
                for ((entry, key), name) in keys.iter().zip(&names) {
                    let expected = key.record().revision;
                    let found = values
                        .get(name)
                        .and_then(Option::as_deref)
                        .and_then(|v| KeyRecord::from_json(v.as_bytes()).ok())
                        .map(|r| r.revision);
                    if found == Some(expected) {
                        tracing::debug!(key_id = %key.id, revision = expected, "KV read-back: current");
                        self.store.verify_done(entry).await?;
                        outcome.verified += 1;
                    } else {
                        tracing::warn!(
                            key_id = %key.id, kv_revision = ?found, revision = expected,
                            "KV read-back: the value is not the current state (a late write \
                             landed, or it was lost); publishing it again"
                        );
                        behind.push(key.id.clone());
                    }
                }
                self.store.outbox_enqueue(&behind, now).await?;
                for (entry, key) in &keys {
                    if behind.contains(&key.id) {
                        self.store.verify_retry(entry, again).await?;
                    }
                }
                outcome.behind = behind.len();
            }
        }
        self.status
            .verified
            .fetch_add(count(outcome.verified), Ordering::Relaxed);
        self.status
            .rewrites
            .fetch_add(count(outcome.behind), Ordering::Relaxed);
        Ok(outcome)
    }

    /// One reconciliation batch: up to 100 keys after the cursor, compared with KV in one
    /// `bulk/get`; keys whose KV value does not carry the database's revision are queued again.
    async fn reconcile_step(&self, reconcile: &mut Reconcile) {
        let now = Instant::now();
        reconcile.next_at = now + RECONCILE_PACE;
        if !self.kv.budget().has_spare() {
            // Writes and read-backs come first: reconciliation waits for a budget with room.
            return;
        }
        let started = *reconcile.pass_started.get_or_insert(now);
        let limit = u32::try_from(BULK_GET_MAX).unwrap_or(100);
        let keys = match self
            .store
            .keys_after(reconcile.cursor.as_ref(), limit)
            .await
        {
            Ok(keys) => {
                self.status.clear_error_from(RECONCILE_STORE);
                keys
            }
            Err(error) => {
                tracing::warn!(%error, "reconciliation cannot read keys; will retry");
                self.status
                    .set_store_error(RECONCILE_STORE, format!("reconcile: {error}"));
                return;
            }
        };
        let Some(last) = keys.last().map(|k| k.id.clone()) else {
            // The pass is over: the next starts an interval after this one started.
            self.status.reconcile_passes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "KV reconciliation pass finished"
            );
            reconcile.cursor = None;
            reconcile.pass_started = None;
            if let Some(interval) = self.reconcile_interval {
                reconcile.next_at = (started + interval).max(now + RECONCILE_PACE);
            }
            return;
        };
        let names: Vec<String> = keys.iter().map(|k| kv_entry_name(&k.hash)).collect();
        let values = match self.kv.bulk_get(&names).await {
            Ok(values) => values,
            Err(error) => {
                tracing::warn!(%error, "reconciliation cannot read KV; will retry");
                self.status
                    .set_error(RECONCILE_READ, error.state(), error.to_string());
                self.status.failures.fetch_add(1, Ordering::Relaxed);
                reconcile.next_at = Instant::now() + self.retry_max.max(RECONCILE_PACE);
                return;
            }
        };
        // A read that works says nothing of writes (a token may read but not write): only the
        // reconciler's own read failure is cleared here.
        self.status.clear_error_from(RECONCILE_READ);
        let behind: Vec<KeyId> = keys
            .iter()
            .zip(&names)
            .filter(|(key, name)| {
                let found = values
                    .get(*name)
                    .and_then(Option::as_deref)
                    .and_then(|v| KeyRecord::from_json(v.as_bytes()).ok())
                    .map(|r| r.revision);
                found != Some(key.record().revision)
            })
            .map(|(key, _)| key.id.clone())
            .collect();
        if !behind.is_empty() {
            tracing::warn!(
                keys = ?behind,
                "reconciliation: KV differs from the database; publishing these keys again"
            );
            if let Err(error) = self.store.outbox_enqueue(&behind, system_now()).await {
                tracing::warn!(%error, "reconciliation cannot queue keys; will retry");
                self.status
                    .set_store_error(RECONCILE_STORE, format!("reconcile: {error}"));
                return;
            }
        }
        self.status
            .reconciled
            .fetch_add(count(keys.len()), Ordering::Relaxed);
        self.status
            .rewrites
            .fetch_add(count(behind.len()), Ordering::Relaxed);
        reconcile.cursor = Some(last);
    }
}

/// `at` plus `delay`, saturating.
fn later(at: UnixMillis, delay: Duration) -> UnixMillis {
    UnixMillis(at.0.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the bulk request starting at `start` ends: at most [`BULK_PUT_MAX`] pairs and
/// (by a bound on their JSON size) [`BULK_PUT_MAX_BYTES`]; always at least one pair.
fn bulk_chunk_end(pairs: &[(String, String)], start: usize) -> usize {
    let mut end = start;
    let mut bytes = 2usize;
    while end < pairs.len() && end - start < BULK_PUT_MAX {
        let (name, value) = &pairs[end];
        // Escaping at most doubles a value that serde_json produced (quotes and backslashes).
        let size = name.len() * 2 + value.len() * 2 + 32;
        if end > start && bytes.saturating_add(size) > BULK_PUT_MAX_BYTES {
            break;
        }
        bytes = bytes.saturating_add(size);
        end += 1;
    }
    end
}

/// Why one key was not published.
enum KeyFailure {
    Store(StoreError),
    Kv(KvError),
}

/// Writes one key's current state to KV.
async fn publish_key(
    store: &dyn KeyStore,
    kv: &KvClient,
    entry: &OutboxEntry,
) -> Result<(), KeyFailure> {
    let Some(key) = store.get(&entry.key_id).await.map_err(KeyFailure::Store)? else {
        // Keys are never erased (a deleted one keeps its row); a missing row means a hand-edited database. Nothing to send.
        tracing::warn!(key_id = %entry.key_id, "outbox names a key that does not exist; skipping");
        return Ok(());
    };
    kv.put(&kv_entry_name(&key.hash), key.record().to_json())
        .await
        .map_err(KeyFailure::Kv)
}

/// The next retry delay: doubling from [`RETRY_BASE`] up to `max` (see [`crate::delivery::backoff`]).
fn backoff(failures_in_a_row: &mut u32, max: Duration) -> Duration {
    crate::delivery::backoff(failures_in_a_row, RETRY_BASE, max)
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
    fn bulk_requests_stay_within_the_pair_and_byte_limits() {
        let small: Vec<(String, String)> = (0..25_000)
            .map(|i| (format!("k1:{i:064}"), "{}".to_owned()))
            .collect();
        assert_eq!(bulk_chunk_end(&small, 0), BULK_PUT_MAX);
        assert_eq!(bulk_chunk_end(&small, 20_000), 25_000);
        let big: Vec<(String, String)> = (0..40)
            .map(|i| (format!("k1:{i}"), "x".repeat(4 * 1024 * 1024)))
            .collect();
        let end = bulk_chunk_end(&big, 0);
        assert!(end > 1 && end < 40, "{end}");
        let json = serde_json::to_vec(
            &big[..end]
                .iter()
                .map(|(k, v)| serde_json::json!({ "key": k, "value": v }))
                .collect::<Vec<_>>(),
        )
        .expect("json");
        assert!(json.len() <= BULK_PUT_MAX_BYTES, "{}", json.len());
        let huge = vec![("k1:a".to_owned(), "x".repeat(BULK_PUT_MAX_BYTES))];
        assert_eq!(bulk_chunk_end(&huge, 0), 1, "one pair always goes");
    }
}
