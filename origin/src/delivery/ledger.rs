//! The ledger publisher: drains the outbox's ledger-pending rows into the edge's change ledger
//! (a Durable Object behind a route of the Worker, `latchkey_shared::ledger::APPEND_PATH`; see `shared/src/ledger`),
//! and appends a **watermark** at least every `LEDGER_WATERMARK_MS`, even when nothing changed.
//!
//! * A watermark `T` says "every change committed at origin before `T` is in the ledger". So
//!   `T` is read *before* the outbox is peeked: a change committed before `T` is in the peek's
//!   snapshot. A batch carries `T` only when the peek returned every ledger-pending row (fewer
//!   than [`APPEND_MAX_CHANGES`]) and all of them fitted in half the Worker's body cap
//!   ([`APPEND_BODY_MAX_BYTES`]); a longer backlog is sent in several batches, the last one
//!   with the watermark.
//! * Each batch holds every peeked key once, with its current state (newer than the row, which
//!   is harmless: readers keep the highest `revision`). Rows are acknowledged for the ledger
//!   only after a 200; a failed append is retried with backoff. A retry of a batch that was
//!   applied after all (a timeout, a 5xx) appends the same records again, which readers ignore.
//! * Every append is signed with `LEDGER_SIGNING_SECRET` (HMAC-SHA256 over
//!   [`append_message`]), with a timestamp that never repeats, so the Worker can refuse replays.
//! * Independent of the KV publisher: each sink clears its own flag on outbox rows
//!   ([`Sink`]), so KV being down never holds the ledger back, nor the other way round.
//! * One ledger publisher per database: it holds the store's ledger lease (`<database>.ledger.lock`
//!   beside a SQLite file, an advisory lock on PostgreSQL), so two origins over one database
//!   never send watermarks side by side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use latchkey_shared::ledger::{
    APPEND_BODY_MAX_BYTES, APPEND_MAX_CHANGES, AppendAnswer, AppendBatch, Change, LEDGER_VERSION,
    append_message,
};
use latchkey_shared::sign::{self, MAX_CLOCK_SKEW_MS, SigningSecret};
use latchkey_shared::{UnixMillis, kv_entry_name};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::config::LedgerConfig;
use crate::model::{OutboxEntry, Sink};
use crate::service::system_now;
use crate::store::lease::{Role, lost_lease};
use crate::store::{KeyStore, StoreError};

/// The first retry delay; it doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(100);
/// The longest wait between two attempts while the ledger fails.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How far back changes are appended again when the publisher starts: the edge ledger's
/// default retention (`LEDGER_RETENTION_MS`), ten times KV's propagation bound.
const RESEND_WINDOW: Duration = Duration::from_secs(600);
/// The most a batch's body is let grow: half the Worker's cap ([`APPEND_BODY_MAX_BYTES`]), so
/// that a batch of large records (up to about 8.5 KB each: 64 scopes of 128 characters) is
/// never refused with a 413, which would stall the ledger on the same batch for ever.
const APPEND_BODY_BUDGET: usize = APPEND_BODY_MAX_BYTES / 2;
/// Generous room for a batch's envelope: `{"v":1,"changes":[`, `],"watermark":<ms>}`.
const ENVELOPE_BYTES: usize = 64;

/// How often the publisher looks for keys stuck on their way to KV (see
/// [`LedgerPublisher::refresh_stuck`]).
const REFRESH_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long a change may wait for KV before its key is appended to the ledger again, and how
/// long between two such refreshes of one key. With the check's minute, a key waiting for KV
/// always has a ledger entry at most about five minutes old: at least five more minutes in the
/// ledger's ten, well over KV's propagation of a minute once KV takes the change.
const REFRESH_AFTER: Duration = Duration::from_secs(240);

/// Why an append did not succeed. `Display` is for logs and the admin status (never the
/// secret, nor the URL); [`LedgerError::state`] for the open `/healthz`.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The connection could not be made: nothing was sent.
    #[error("ledger unreachable: {0}")]
    Unreachable(String),
    /// Sent, but no answer came: the batch may have been appended.
    #[error("ledger gave no answer: {detail}")]
    NoAnswer {
        /// Whether the request timed out.
        timed_out: bool,
        /// What happened.
        detail: String,
    },
    /// The Worker answered something other than 200 with an append answer.
    #[error("ledger answered {status}: {message}")]
    Refused {
        /// HTTP status (502 for a 200 whose body is not an append answer).
        status: u16,
        /// The start of the answer's body.
        message: String,
    },
}

impl LedgerError {
    /// A coarse state for `/healthz`: `unreachable`, `timeout`, `no_answer`, `bad_signature`
    /// (401: the secrets differ or the clocks are apart), `replay` (409), `refused` (another
    /// 4xx), `unavailable` (503: the Durable Object is away) or `http_error`.
    pub fn state(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::NoAnswer {
                timed_out: true, ..
            } => "timeout",
            Self::NoAnswer { .. } => "no_answer",
            Self::Refused { status: 401, .. } => "bad_signature",
            Self::Refused { status: 409, .. } => "replay",
            Self::Refused { status, .. } if (400..500).contains(status) => "refused",
            Self::Refused { status: 503, .. } => "unavailable",
            Self::Refused { .. } => "http_error",
        }
    }
}

/// Appends signed batches to the Worker's ledger route.
pub struct LedgerClient {
    http: reqwest::Client,
    url: String,
    secret: SigningSecret,
    /// The last timestamp signed: the next is later, so no two appends share a signature.
    last_timestamp: AtomicI64,
}

impl std::fmt::Debug for LedgerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerClient").finish_non_exhaustive()
    }
}

impl LedgerClient {
    /// A client for `config`'s route.
    pub fn new(config: &LedgerConfig) -> Result<Self, LedgerError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect would carry the signed body to another address: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| LedgerError::Unreachable(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            url: config.url.clone(),
            secret: config.secret.clone(),
            last_timestamp: AtomicI64::new(0),
        })
    }

    /// Appends `batch`: `Ok` only for a 200 with an append answer.
    pub async fn append(&self, batch: &AppendBatch) -> Result<AppendAnswer, LedgerError> {
        let body = serde_json::to_vec(batch).map_err(|e| LedgerError::Refused {
            status: 0,
            message: format!("cannot serialise the batch: {e}"),
        })?;
        let timestamp = self.next_timestamp();
        let signature = sign::sign(self.secret.as_bytes(), &append_message(timestamp, &body));
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::header::TIMESTAMP, timestamp.0.to_string())
            .header(sign::header::SIGNATURE, signature)
            .body(body)
            .send()
            .await
            .map_err(no_answer)?;
        let status = response.status();
        let body = response.bytes().await.map_err(no_answer)?;
        let start = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if status == reqwest::StatusCode::CONFLICT
            && let Some(last) = superseded_after(&body)
            && last.saturating_sub(system_now().0) <= MAX_CLOCK_SKEW_MS
        {
            // The ledger accepted an append signed later than this one (a late copy of ours,
            // or our clock went back): the next one is signed after it, with the keys'
            // current state. Never further ahead than the ledger itself would accept; and a
            // last timestamp of ours that is further ahead (signed while the clock ran past
            // the skew, refused) gives way to the ledger's.
            let now = system_now().0;
            let ours = self.last_timestamp.load(Ordering::Relaxed);
            if ours.saturating_sub(now) > MAX_CLOCK_SKEW_MS {
                self.last_timestamp.store(last, Ordering::Relaxed);
            } else {
                self.last_timestamp.fetch_max(last, Ordering::Relaxed);
            }
        }
        if status != reqwest::StatusCode::OK {
            return Err(LedgerError::Refused {
                status: status.as_u16(),
                message: start(),
            });
        }
        match serde_json::from_slice::<AppendAnswer>(&body) {
            Ok(answer) if answer.v == LEDGER_VERSION => Ok(answer),
            _ => Err(LedgerError::Refused {
                status: 502,
                message: format!("not an append answer: {}", start()),
            }),
        }
    }

    /// The timestamp for the next append ([`next_timestamp`]).
    fn next_timestamp(&self) -> UnixMillis {
        let now = system_now().0;
        let mut last = self.last_timestamp.load(Ordering::Relaxed);
        loop {
            let next = next_timestamp(now, last);
            match self.last_timestamp.compare_exchange(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return UnixMillis(next),
                Err(seen) => last = seen,
            }
        }
    }
}

/// The timestamp to sign next, at `now`, after `last`: now, or one millisecond after `last`
/// if that is not earlier, so no two appends share a timestamp and they are signed in order. But
/// a `last` more than the allowed skew ahead of now was signed while the clock ran ahead (it
/// has since been stepped back): the ledger refused those timestamps anyway, so signing goes
/// on from now instead of waiting, append after refused append, for the clock to catch up.
pub fn next_timestamp(now: i64, last: i64) -> i64 {
    if last.saturating_sub(now) > MAX_CLOCK_SKEW_MS {
        now
    } else {
        now.max(last.saturating_add(1))
    }
}

/// The ledger's `409 superseded` answer's `last_signed_at`: when the last append it accepted
/// was signed.
fn superseded_after(body: &[u8]) -> Option<i64> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = answer.get("error")?;
    (error.get("code")?.as_str()? == "superseded")
        .then(|| error.get("last_signed_at")?.as_i64())
        .flatten()
}

/// Whether an append's answer comes from another ledger than the last one did: another epoch
/// (a new or wiped object), or, from a ledger that does not say its epoch, a head that went
/// back. `last` is the previous answer's `(epoch, head)`, `None` for the first since start
/// (origin re-sends the recent changes at start anyway).
pub fn ledger_replaced(last: Option<(Option<u64>, u64)>, answer: &AppendAnswer) -> bool {
    match last {
        None => false,
        Some((Some(epoch), _)) if answer.epoch.is_some_and(|e| e != epoch) => true,
        Some((_, head)) => answer.head < head,
    }
}

/// Names a request that got no answer (see `kv::client::describe_failure`).
fn no_answer(error: reqwest::Error) -> LedgerError {
    let failure = crate::delivery::kv::client::describe_failure(error);
    if failure.connect {
        LedgerError::Unreachable(failure.detail)
    } else {
        LedgerError::NoAnswer {
            timed_out: failure.timed_out,
            detail: failure.detail,
        }
    }
}

/// Counters for `/healthz`, `/metrics` and the admin status.
#[derive(Debug, Default)]
pub struct LedgerStatus {
    enabled: bool,
    appended: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
    /// The last watermark the ledger accepted (unix ms; 0: none yet).
    watermark: AtomicI64,
    /// The last failure: its coarse state and its text. Cleared by the next success.
    last_error: Mutex<Option<(&'static str, String)>>,
}

/// What `/healthz` shows of the ledger sink: counts and states, never an error's text.
#[derive(Debug, Serialize)]
pub struct LedgerReport {
    /// Whether the ledger is configured (`LEDGER_URL`).
    pub enabled: bool,
    /// `ok`, or how the last attempt failed (see [`LedgerError::state`]; `store_error` when
    /// the outbox could not be read or acknowledged).
    pub state: &'static str,
    /// Key changes not yet in the ledger.
    pub pending: u64,
    /// Age of the oldest change not yet in the ledger, in milliseconds (0 when none waits).
    pub lag_ms: i64,
    /// The last watermark the ledger accepted (unix ms), if any since start.
    pub watermark_ms: Option<i64>,
    /// How old that watermark is, in milliseconds (the edge trusts it for `WATERMARK_MAX_AGE_MS`,
    /// 3 s by default); `None` (in `/metrics`, -1) before the first one since start.
    pub watermark_age_ms: Option<i64>,
    /// Changes the ledger appended since start (as it counted them).
    pub appended: u64,
    /// Appends accepted since start (each with changes, a watermark or both).
    pub batches: u64,
    /// Failed appends (and outbox failures) since start.
    pub failures: u64,
    /// The last failure's text: only in the admin status (`GET /v1/status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl LedgerStatus {
    /// The status of a ledger sink that is (or is not) configured.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// The current backlog, read from the outbox, without error text (for `/healthz`).
    pub async fn report(&self, store: &dyn KeyStore) -> Result<LedgerReport, StoreError> {
        let stats = store.outbox_stats(Sink::Ledger, None).await?;
        let now = system_now().0;
        let lag_ms = stats.oldest_enqueued_at.map_or(0, |at| (now - at.0).max(0));
        let watermark = Some(self.watermark.load(Ordering::Relaxed)).filter(|w| *w > 0);
        Ok(LedgerReport {
            enabled: self.enabled,
            state: self.last_error().map_or("ok", |(state, _)| state),
            pending: stats.pending,
            lag_ms,
            watermark_ms: watermark,
            watermark_age_ms: watermark.map(|w| (now - w).max(0)),
            appended: self.appended.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: None,
        })
    }

    /// [`Self::report`] with the last failure's text (for admins).
    pub async fn detailed_report(&self, store: &dyn KeyStore) -> Result<LedgerReport, StoreError> {
        let mut report = self.report(store).await?;
        report.last_error = self.last_error().map(|(_, detail)| detail);
        Ok(report)
    }

    fn last_error(&self) -> Option<(&'static str, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_error(&self, state: &'static str, detail: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((state, detail));
    }

    fn clear_error(&self) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Why one append round failed.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The outbox or a key could not be read, or the rows not acknowledged.
    #[error("outbox: {0}")]
    Store(#[from] StoreError),
    /// The append failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What one append round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundOutcome {
    /// Outbox rows read (and acknowledged).
    pub rows: usize,
    /// Changes sent (one per key).
    pub changes: usize,
    /// Whether the batch carried a watermark (the peek saw every ledger-pending row).
    pub watermark: Option<UnixMillis>,
}

/// Drains the outbox's ledger-pending rows into the ledger, with watermarks.
pub struct LedgerPublisher {
    store: Arc<dyn KeyStore>,
    client: LedgerClient,
    status: Arc<LedgerStatus>,
    watermark_every: Duration,
    /// The last answer's `(epoch, head)`: the ledger it came from ([`ledger_replaced`]).
    last_seen: Mutex<Option<(Option<u64>, u64)>>,
}

impl LedgerPublisher {
    /// A publisher appending through `client`, counting into `status`.
    pub fn new(
        store: Arc<dyn KeyStore>,
        client: LedgerClient,
        status: Arc<LedgerStatus>,
        config: &LedgerConfig,
    ) -> Self {
        Self {
            store,
            client,
            status,
            watermark_every: config.watermark_every,
            last_seen: Mutex::new(None),
        }
    }

    /// Publishes until `stop` turns true: waits for the ledger lock, then appends whatever
    /// the outbox holds for the ledger whenever `wake` fires, and a watermark at least every
    /// `LEDGER_WATERMARK_MS` regardless.
    pub async fn run(self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let store = self.store.clone();
        loop {
            let Ok(lease) = store
                .hold_lease(
                    Role::Ledger,
                    &mut stop,
                    "another origin holds the ledger lock; waiting",
                )
                .await
            else {
                return;
            };
            tokio::select! {
                () = self.play(&wake, stop.clone()) => return,
                () = lease.lost_wait() => lost_lease(Role::Ledger),
            }
        }
    }

    /// The role's work while this process holds its lease (see `run`).
    async fn play(&self, wake: &Notify, mut stop: watch::Receiver<bool>) {
        self.resend_recent().await;
        let mut failures_in_a_row = 0u32;
        let mut next_refresh = tokio::time::Instant::now();
        loop {
            if *stop.borrow() {
                return;
            }
            if tokio::time::Instant::now() >= next_refresh {
                self.refresh_stuck().await;
                next_refresh = tokio::time::Instant::now() + REFRESH_CHECK_EVERY;
            }
            let wait = match self.round().await {
                Ok(outcome) => {
                    failures_in_a_row = 0;
                    self.status.clear_error();
                    if outcome.watermark.is_none() {
                        // More rows wait than one batch holds.
                        continue;
                    }
                    tokio::select! {
                        () = wake.notified() => continue,
                        () = tokio::time::sleep(self.watermark_every) => continue,
                        _ = stop.changed() => return,
                    }
                }
                Err(error) => {
                    let state = match &error {
                        RoundError::Store(_) => "store_error",
                        RoundError::Ledger(e) => e.state(),
                    };
                    tracing::warn!(%error, "ledger append failed; will retry");
                    self.status.set_error(state, error.to_string());
                    backoff(&mut failures_in_a_row)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Queues for the ledger every key changed within [`RESEND_WINDOW`]: a ledger that is new
    /// (a first deploy, a wiped object) or that missed changes while origin ran without it would
    /// otherwise let isolates trust a KV value up to KV's propagation bound old. Appending a record
    /// twice is harmless. A failure is logged and publishing goes on.
    async fn resend_recent(&self) {
        let now = system_now();
        let window = i64::try_from(RESEND_WINDOW.as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .outbox_enqueue_changed_since(UnixMillis(now.0.saturating_sub(window)), now)
            .await
        {
            Ok(0) => {}
            Ok(keys) => tracing::info!(
                keys,
                "re-sending the last ten minutes of key changes to the ledger"
            ),
            Err(error) => tracing::warn!(%error, "cannot queue recent changes for the ledger"),
        }
    }

    /// Keeps the ledger entries of keys stuck on their way to KV alive: the ledger keeps an
    /// entry only for its retention (ten minutes), and a ledger entry outweighs an older KV
    /// value only while the ledger holds it. If KV publishing is stuck longer (an expired
    /// token, an outage, 429 pauses), a revocation would fall out of the ledger and isolates
    /// would trust KV's old, valid record again. So every key whose change has waited for KV
    /// more than [`REFRESH_AFTER`], and was not refreshed within it, is queued for the ledger
    /// again. A failure is logged and publishing goes on (the next check tries again).
    async fn refresh_stuck(&self) {
        let now = system_now();
        let after = i64::try_from(REFRESH_AFTER.as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .outbox_refresh_ledger(UnixMillis(now.0.saturating_sub(after)), now)
            .await
        {
            Ok(0) => {}
            Ok(keys) => tracing::warn!(
                keys,
                "changes have waited for KV for minutes; appending their keys to the ledger \
                 again so that their ledger entries do not expire"
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot queue ledger refreshes of keys waiting for KV")
            }
        }
    }

    /// One append: reads the time `T`, then up to [`APPEND_MAX_CHANGES`] ledger-pending rows;
    /// appends each key's current state once (as many keys as fit in `APPEND_BODY_BUDGET`),
    /// with the watermark `T` if those were all the rows and all fitted; on success
    /// acknowledges, for the ledger, the rows of the keys appended. The keys that did not fit
    /// wait for the next round. With no rows, it appends the watermark alone.
    pub async fn round(&self) -> Result<RoundOutcome, RoundError> {
        // Before the peek: whatever committed before `at` is in the peek's snapshot.
        let at = system_now();
        let limit = u32::try_from(APPEND_MAX_CHANGES).unwrap_or(1000);
        let rows = self.store.outbox_peek(Sink::Ledger, limit).await?;
        let complete = rows.len() < APPEND_MAX_CHANGES;
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
        let mut batch = BatchBuilder::new(APPEND_BODY_BUDGET);
        // How many of `keys` this batch covers (appended, or skipped as missing).
        let mut covered = 0;
        for entry in &keys {
            match self.store.get(&entry.key_id).await? {
                Some(key) => {
                    let change = Change {
                        name: kv_entry_name(&key.hash),
                        record: key.record(),
                    };
                    if !batch.push(change) {
                        break;
                    }
                }
                // Keys are never erased (a deleted one keeps its row); a missing row means a hand-edited database.
                None => {
                    tracing::warn!(key_id = %entry.key_id, "outbox names a key that does not exist; skipping")
                }
            }
            covered += 1;
        }
        let included = &keys[..covered];
        let watermark = (complete && covered == keys.len()).then_some(at);
        let batch = AppendBatch::new(batch.changes, watermark);
        let answer = self.client.append(&batch).await?;
        self.store.outbox_ack(Sink::Ledger, included).await?;
        let replaced = {
            let mut last = self
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let replaced = ledger_replaced(*last, &answer);
            *last = Some((answer.epoch, answer.head));
            replaced
        };
        if replaced {
            // Its isolates start from nothing and would trust KV values up to KV's
            // propagation bound old: fill it with the recent changes now, not at a restart.
            tracing::warn!(
                epoch = ?answer.epoch,
                head = answer.head,
                "the edge's change ledger is a new one (its epoch changed or its head went back): \
                 re-sending the last ten minutes of key changes"
            );
            self.resend_recent().await;
        }
        self.status
            .appended
            .fetch_add(answer.appended, Ordering::Relaxed);
        self.status.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = watermark {
            self.status.watermark.fetch_max(at.0, Ordering::Relaxed);
        }
        if !batch.changes.is_empty() {
            tracing::debug!(
                changes = batch.changes.len(),
                waiting = keys.len() - covered,
                head = answer.head,
                watermark = ?watermark,
                "appended to the ledger"
            );
        }
        Ok(RoundOutcome {
            rows: rows.len(),
            changes: batch.changes.len(),
            watermark,
        })
    }
}

/// The changes of one append, kept under a body size.
struct BatchBuilder {
    changes: Vec<Change>,
    /// The serialised batch's size so far, envelope included (an upper bound).
    bytes: usize,
    max_bytes: usize,
}

impl BatchBuilder {
    fn new(max_bytes: usize) -> Self {
        Self {
            changes: Vec::new(),
            bytes: ENVELOPE_BYTES,
            max_bytes,
        }
    }

    /// Adds `change` if the batch stays within its size (or is empty: one change always goes,
    /// so the ledger never stalls); `false` when it would not fit.
    fn push(&mut self, change: Change) -> bool {
        // Serialising plain data cannot fail; if it did, the length would not count, and the
        // append would fail loudly instead.
        let size = serde_json::to_vec(&change).map_or(0, |body| body.len()) + 1; // and a comma
        if !self.changes.is_empty() && self.bytes + size > self.max_bytes {
            return false;
        }
        self.bytes += size;
        self.changes.push(change);
        true
    }
}

/// The next retry delay: doubling from [`RETRY_BASE`] to [`RETRY_MAX`], jittered in its upper
/// half (see [`super::backoff`]).
fn backoff(failures_in_a_row: &mut u32) -> Duration {
    super::backoff(failures_in_a_row, RETRY_BASE, RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_go_forward_and_recover_from_a_clock_step() {
        let skew = MAX_CLOCK_SKEW_MS;
        // (now, last signed, next, why)
        let cases = [
            (1_000, 0, 1_000, "the first: now"),
            (1_000, 999, 1_000, "later than the last: now"),
            (1_000, 1_000, 1_001, "the same millisecond: one later"),
            (
                1_000,
                1_500,
                1_501,
                "the clock went back a little: after the last",
            ),
            (
                1_000,
                1_000 + skew,
                1_001 + skew,
                "back by the skew: still after the last",
            ),
            // Before, this kept signing after the last (an hour ahead), and the ledger refused
            // every append until the clock caught up.
            (
                1_000,
                1_000 + 3_600_000,
                1_000,
                "stepped forward an hour, then back: now",
            ),
            (1_000, i64::MAX, 1_000, "no overflow"),
            (i64::MAX, i64::MAX, i64::MAX, "no overflow at the top"),
        ];
        for (now, last, next, why) in cases {
            assert_eq!(next_timestamp(now, last), next, "{why}");
        }
    }

    #[test]
    fn a_superseded_answer_names_the_last_accepted_timestamp() {
        let body = br#"{"success":false,"error":{"code":"superseded","message":"m","last_signed_at":1234}}"#;
        assert_eq!(superseded_after(body), Some(1234));
        for other in [
            &br#"{"success":false,"error":{"code":"replay","last_signed_at":1234}}"#[..],
            br#"{"error":{"code":"superseded"}}"#,
            br#"{"error":{"code":"superseded","last_signed_at":"1234"}}"#,
            b"not json",
        ] {
            assert_eq!(
                superseded_after(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn another_epoch_or_a_head_going_back_is_another_ledger() {
        let answer = |epoch: Option<u64>, head: u64| AppendAnswer {
            v: LEDGER_VERSION,
            appended: 0,
            head,
            superseded: 0,
            epoch,
        };
        // (last seen, answer, replaced, why)
        let cases = [
            (
                None,
                answer(Some(7), 3),
                false,
                "the first answer since start",
            ),
            (
                Some((Some(7), 3)),
                answer(Some(7), 5),
                false,
                "the same ledger, moving on",
            ),
            (
                Some((Some(7), 5)),
                answer(Some(7), 5),
                false,
                "a watermark alone",
            ),
            (
                Some((Some(7), 50)),
                answer(Some(8), 60),
                true,
                "another epoch, even ahead",
            ),
            (
                Some((Some(7), 50)),
                answer(Some(8), 1),
                true,
                "a wiped ledger",
            ),
            (
                Some((None, 50)),
                answer(None, 2),
                true,
                "no epoch, the head went back",
            ),
            (
                Some((None, 50)),
                answer(None, 51),
                false,
                "no epoch, the head moved on",
            ),
            (
                Some((Some(7), 50)),
                answer(None, 2),
                true,
                "an older Worker: the head went back",
            ),
        ];
        for (last, answer, replaced, why) in cases {
            assert_eq!(ledger_replaced(last, &answer), replaced, "{why}");
        }
    }

    #[test]
    fn states_name_the_failure_without_detail() {
        let refused = |status| LedgerError::Refused {
            status,
            message: "secret detail".into(),
        };
        let cases = [
            (LedgerError::Unreachable("x".into()), "unreachable"),
            (
                LedgerError::NoAnswer {
                    timed_out: true,
                    detail: String::new(),
                },
                "timeout",
            ),
            (refused(401), "bad_signature"),
            (refused(409), "replay"),
            (refused(413), "refused"),
            (refused(503), "unavailable"),
            (refused(500), "http_error"),
        ];
        for (error, state) in cases {
            assert_eq!(error.state(), state, "{error:?}");
        }
    }

    #[test]
    fn timestamps_never_repeat() {
        let config = LedgerConfig {
            url: "http://127.0.0.1:9/v1/ledger/changes".into(),
            secret: SigningSecret::parse(&"s".repeat(32)).expect("secret"),
            watermark_every: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let client = LedgerClient::new(&config).expect("client");
        let mut last = 0;
        for _ in 0..1000 {
            let t = client.next_timestamp().0;
            assert!(t > last);
            last = t;
        }
    }

    /// A thousand of the largest records (64 scopes of 128 characters) exceed the Worker's
    /// 4 MiB cap: a batch takes only what fits in half of it, and its body stays under that.
    #[test]
    fn a_batch_of_large_records_stays_under_half_the_body_cap() {
        use latchkey_shared::{KeyHash, KeyId, RECORD_VERSION, Scope, UnixMillis};
        let scopes: latchkey_shared::ScopeSet = (0..64)
            .map(|i| {
                let scope = format!("read:{i:02}{}", "x".repeat(128 - 7));
                Scope::parse(&scope).expect("scope")
            })
            .collect();
        let change = |n: u32| {
            let mut fill = |bytes: &mut [u8]| bytes.fill(7);
            Change {
                name: kv_entry_name(&KeyHash::from_bytes(
                    [u8::try_from(n % 256).unwrap_or(0); 32],
                )),
                record: latchkey_shared::KeyRecord {
                    v: RECORD_VERSION,
                    id: KeyId::generate(&mut fill),
                    subject: "s".repeat(128),
                    scopes: scopes.clone(),
                    revoked: true,
                    revoked_at: Some(UnixMillis(i64::MAX)),
                    expires_at: Some(UnixMillis(i64::MAX)),
                    revision: u64::MAX,
                    disabled: false,
                    allowed_ips: Default::default(),
                },
            }
        };
        let all: Vec<Change> = (0..1000).map(change).collect();
        let whole = serde_json::to_vec(&AppendBatch::new(all.clone(), Some(UnixMillis(i64::MAX))))
            .expect("serialises");
        assert!(whole.len() > APPEND_BODY_MAX_BYTES, "{} bytes", whole.len());

        let mut batch = BatchBuilder::new(APPEND_BODY_BUDGET);
        let taken = all
            .into_iter()
            .take_while(|c| batch.push(c.clone()))
            .count();
        assert!((1..1000).contains(&taken), "{taken}");
        assert_eq!(batch.changes.len(), taken);
        let body = serde_json::to_vec(&AppendBatch::new(batch.changes, Some(UnixMillis(i64::MAX))))
            .expect("serialises");
        assert!(body.len() <= APPEND_BODY_BUDGET, "{} bytes", body.len());
        assert!(
            body.len() > APPEND_BODY_BUDGET - 10_000,
            "nearly full: {} bytes",
            body.len()
        );

        // One change always goes, whatever its size.
        let mut tiny = BatchBuilder::new(1);
        assert!(tiny.push(change(1)));
        assert!(!tiny.push(change(2)));
    }

    #[test]
    fn backoff_is_capped() {
        let mut failures = 0;
        for _ in 0..20 {
            assert!(backoff(&mut failures) <= RETRY_MAX);
        }
    }
}
