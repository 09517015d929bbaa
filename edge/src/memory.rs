//! The isolate's memory of key records ([`latchkey_shared::ledger::memory`]), kept complete by
//! polling the ledger.
//!
//! * Polls happen inside requests, at most one in flight per isolate. While memory is trusted
//!   the poll runs after the response (`ctx.wait_until`) and no request waits for it; while it
//!   is not (a cold isolate, the ledger unreachable, origin silent), the request that starts a
//!   poll waits for it, at most `LEDGER_POLL_TIMEOUT_MS`, and then decides with KV if memory is
//!   still not trusted (or answers 503 with `LEDGER_STRICT`).
//! * Sharing (`LEDGER_SHARE_POLLS`, on by default): an isolate that is caught up reads the
//!   location's copy of "every entry of the last five poll intervals" from the Cache API, keyed
//!   by poll interval and sealed with the ledger secret (`latchkey_shared::ledger::copy`: a MAC
//!   under a domain tag of its own, over the interval and the tail), so the ledger sees about
//!   one poll per location per interval. The copy lives in a cache of its own (`caches.open`),
//!   apart from the zone's default cache, so no public request can read it, whatever the
//!   Worker's routes. The Cache API does nothing on `*.workers.dev`: there every isolate asks
//!   the ledger itself. An answer that does not reach back to the isolate's cursor is followed
//!   by a direct request.

use std::cell::{Cell, RefCell};

use futures_util::future::{Either, select};
use latchkey_shared::UnixMillis;
use latchkey_shared::ledger::memory::{Memory, SyncError};
use latchkey_shared::ledger::{Tail, copy};
use worker::{Cache, Delay, Env, Response};

use crate::config::LedgerSettings;
use crate::ledger::{self, now};

/// How many poll intervals back a shared poll reaches: an isolate caught up within them can use
/// it (one that is further behind asks the ledger directly).
const SHARED_WINDOW_POLLS: i64 = 5;

thread_local! {
    static MEMORY: RefCell<Option<Memory>> = const { RefCell::new(None) };
    /// Requests this isolate made to the ledger object (debug header, benchmarks).
    static LEDGER_FETCHES: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` on this isolate's memory, made on first use.
pub(crate) fn with<T>(settings: &LedgerSettings, f: impl FnOnce(&mut Memory) -> T) -> T {
    MEMORY.with(|cell| {
        let mut memory = cell.borrow_mut();
        f(memory.get_or_insert_with(|| Memory::new(settings.memory.clone())))
    })
}

/// How many requests this isolate made to the ledger object.
pub(crate) fn ledger_fetches() -> u64 {
    LEDGER_FETCHES.with(Cell::get)
}

/// The Cache API cache holding the shared polls.
const SHARED_CACHE: &str = "latchkey-ledger";

/// Most pages one sync reads of a long backlog (a cold isolate after a burst of changes).
const PAGES_MAX: usize = 50;

/// One poll of the ledger for entries after `after` (what `Memory::start_sync` returned), applied
/// to memory; a backlog of several pages is read on until caught up.
pub(crate) async fn sync(env: Env, settings: &LedgerSettings, after: u64) {
    let share = settings.share_polls && with(settings, |m| m.may_share());
    let mut answer = if share {
        shared_tail(&env, settings, now()).await
    } else {
        direct_tail(&env, after).await
    };
    let mut direct_after_gap = !share;
    for _ in 0..PAGES_MAX {
        let tail = match answer {
            Ok(tail) => tail,
            Err(error) => {
                worker::console_warn!("ledger poll failed: {error}");
                let overloaded = error.to_string().contains("overloaded");
                with(settings, |m| m.failed(now(), overloaded));
                return;
            }
        };
        let next = match with(settings, |m| m.apply(&tail, now())) {
            Ok(()) => with(settings, |m| m.resume_sync(now())),
            Err(SyncError::Gap { .. }) if !direct_after_gap => {
                // The shared copy does not reach back to this isolate's cursor: ask directly.
                direct_after_gap = true;
                Some(after)
            }
            Err(SyncError::Gap { cursor, after }) => {
                worker::console_warn!(
                    "ledger pruned past this isolate's cursor {cursor} (it starts after {after}); reloading"
                );
                with(settings, Memory::restart);
                return;
            }
            Err(error) => {
                worker::console_warn!("ledger answer not applied: {error}");
                return;
            }
        };
        let Some(cursor) = next else { return };
        answer = direct_tail(&env, cursor).await;
    }
    // Still not caught up: the next request goes on (memory stays untrusted meanwhile).
    with(settings, |m| m.failed(now(), false));
}

/// Like [`sync`], but gives up after `LEDGER_POLL_TIMEOUT_MS`: the poll counts as failed (so the
/// next one backs off) and the request decides without it.
pub(crate) async fn sync_waiting(env: Env, settings: &LedgerSettings, after: u64) {
    let poll = Box::pin(sync(env, settings, after));
    let timeout = Box::pin(Delay::from(std::time::Duration::from_millis(
        settings.timeout_ms,
    )));
    if let Either::Right(_) = select(poll, timeout).await {
        worker::console_warn!(
            "ledger poll took longer than LEDGER_POLL_TIMEOUT_MS; deciding without it"
        );
        with(settings, |m| m.failed(now(), false));
    }
}

async fn direct_tail(env: &Env, after: u64) -> worker::Result<Tail> {
    fetch_tail(env, &format!("https://ledger/tail?after={after}")).await
}

async fn fetch_tail(env: &Env, url: &str) -> worker::Result<Tail> {
    LEDGER_FETCHES.with(|n| n.set(n.get() + 1));
    let mut response = ledger::stub(env)?.fetch_with_str(url).await?;
    if response.status_code() != 200 {
        return Err(worker::Error::RustError(format!(
            "the ledger answered {}",
            response.status_code()
        )));
    }
    let body = response.bytes().await?;
    Tail::parse(&body).map_err(|e| worker::Error::RustError(e.to_string()))
}

/// The location's shared copy of the entries of the last few poll intervals, fetched from the
/// ledger (and put in the cache for the other isolates) when this poll interval has none yet.
/// The copy is sealed with `LEDGER_SIGNING_SECRET` ([`copy::seal`]: under a domain tag of its
/// own, and over its poll interval), and [`copy::open`] refuses any other, so nothing else that
/// can write the zone's caches can feed isolates a forged tail, nor an old copy under a newer
/// interval: a refused copy is replaced by a direct poll's.
async fn shared_tail(
    env: &Env,
    settings: &LedgerSettings,
    now: UnixMillis,
) -> worker::Result<Tail> {
    let poll_ms = settings.memory.poll_ms.max(1);
    let bucket = copy::bucket(now, poll_ms);
    let key = format!("https://ledger.latchkey.invalid/tail/{bucket}");
    let cache = Cache::open(SHARED_CACHE.to_owned()).await;
    if let Ok(Some(mut hit)) = cache.get(key.as_str(), true).await
        && let Ok(body) = hit.bytes().await
        && let Ok(tail) = copy::open(&settings.cache_secret, bucket, &body)
    {
        return Ok(tail);
    }
    // A window of a few intervals: enough for a caught-up isolate, small on the wire.
    let window = poll_ms.saturating_mul(SHARED_WINDOW_POLLS);
    let tail = fetch_tail(env, &format!("https://ledger/tail?recent_ms={window}")).await?;
    let max_age = (poll_ms / 1000).max(1);
    if let Ok(mut sealed) = Response::ok(copy::seal(&settings.cache_secret, bucket, &tail)) {
        let headers = sealed.headers_mut();
        let _ = headers.set("content-type", "text/plain");
        let _ = headers.set("cache-control", &format!("max-age={max_age}"));
        if let Err(e) = cache.put(key.as_str(), sealed).await {
            worker::console_warn!("ledger poll not shared: {e}");
        }
    }
    Ok(tail)
}
