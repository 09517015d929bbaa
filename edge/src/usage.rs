//! Usage reporting: keeps `last_used_at` at origin true when keys are verified here.
//!
//! Each isolate gathers the keys that verified (newest time per key, so a busy key costs one
//! entry) and sends them to origin's ingest endpoint in one signed batch after
//! `USAGE_FLUSH_MS`, from `ctx.wait_until` so no response waits for it. No KV write happens
//! per request. A batch that fails to send is merged back and goes with the next one; an
//! isolate that is evicted before sending loses at most one interval of `last_used_at`
//! updates, never a verification decision.

use std::cell::RefCell;
use std::collections::HashMap;

use latchkey_shared::sign;
use latchkey_shared::{KeyId, UnixMillis};
use serde::Serialize;
use wasm_bindgen::JsValue;
use worker::{Delay, Fetch, Headers, Method, Request, RequestInit};

use crate::config::{Config, Settings};

/// Most distinct keys held between batches; beyond it, new keys wait for the next batch.
const PENDING_MAX: usize = 10_000;

/// How long a scheduled send may take before it is presumed cut off (Cloudflare ends
/// `wait_until` work 30 s after the response) and a new one is scheduled.
const SEND_GRACE_MS: i64 = 30_000;

#[derive(Default)]
struct Pending {
    uses: HashMap<String, i64>,
    /// When the pending delayed send was scheduled, if one is.
    scheduled_at: Option<i64>,
    /// Identifies this isolate's batches, so a replayed batch is recognisable.
    isolate: String,
    sent: u64,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

/// One batch as origin's `POST /v1/usage` reads it.
#[derive(Debug, Serialize)]
pub(crate) struct Batch {
    batch: String,
    uses: Vec<Use>,
}

#[derive(Debug, Serialize)]
struct Use {
    id: String,
    at: i64,
}

/// Records that `ids` verified at `now`. Returns true when the caller should schedule a send:
/// the first use since the last batch, or a scheduled send that never finished (the runtime
/// may cut `wait_until` work short).
pub(crate) fn record(config: &Settings, ids: &[KeyId], now: UnixMillis) -> bool {
    if ids.is_empty() || config.usage_url.is_none() {
        return false;
    }
    PENDING.with(|cell| {
        let mut pending = cell.borrow_mut();
        for id in ids {
            if pending.uses.len() >= PENDING_MAX && !pending.uses.contains_key(id.as_str()) {
                continue;
            }
            let at = pending.uses.entry(id.as_str().to_owned()).or_insert(now.0);
            *at = (*at).max(now.0);
        }
        let overdue = |at: i64| now.0 - at > config.usage_flush_ms + SEND_GRACE_MS;
        if pending.scheduled_at.is_some_and(|at| !overdue(at)) {
            return false;
        }
        pending.scheduled_at = Some(now.0);
        true
    })
}

/// Waits one flush interval, then sends what gathered meanwhile.
pub(crate) async fn send_after_interval(config: Config) {
    let (Some(url), Some(secret)) = (config.usage_url.clone(), config.usage_secret.clone()) else {
        return;
    };
    let wait = u64::try_from(config.usage_flush_ms).unwrap_or(10_000);
    Delay::from(std::time::Duration::from_millis(wait)).await;
    let Some(batch) = take_batch() else { return };
    match post(&url, secret.as_bytes(), &batch, crate::ledger::now()).await {
        Ok(()) => {}
        Err(e) => {
            worker::console_error!(
                "usage report to origin failed ({e}); it goes with the next batch"
            );
            give_back(batch);
        }
    }
}

fn take_batch() -> Option<Batch> {
    PENDING.with(|cell| {
        let mut pending = cell.borrow_mut();
        pending.scheduled_at = None;
        if pending.uses.is_empty() {
            return None;
        }
        if pending.isolate.is_empty() {
            // Not a secret: it only makes batch names unique across isolates.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "Math.random() is in [0, 1): the product fits in a u64"
            )]
            let random = (js_sys::Math::random() * 1e15) as u64;
            pending.isolate = format!("{:x}{random:x}", crate::ledger::now().0);
        }
        pending.sent += 1;
        let uses = pending
            .uses
            .drain()
            .map(|(id, at)| Use { id, at })
            .collect();
        Some(Batch {
            batch: format!("{}-{}", pending.isolate, pending.sent),
            uses,
        })
    })
}

fn give_back(batch: Batch) {
    PENDING.with(|cell| {
        let mut pending = cell.borrow_mut();
        for Use { id, at } in batch.uses {
            let entry = pending.uses.entry(id).or_insert(at);
            *entry = (*entry).max(at);
        }
    });
}

async fn post(url: &str, secret: &[u8], batch: &Batch, now: UnixMillis) -> worker::Result<()> {
    let body = serde_json::to_vec(batch)?;
    let signature = sign::sign(secret, &sign::usage_message(now, &body));
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    headers.set(sign::header::TIMESTAMP, &now.0.to_string())?;
    headers.set(sign::header::SIGNATURE, &signature)?;
    let body = js_sys::Uint8Array::from(body.as_slice());
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(JsValue::from(body)));
    let response = Fetch::Request(Request::new_with_init(url, &init)?)
        .send()
        .await?;
    match response.status_code() {
        200..=299 => Ok(()),
        status => Err(worker::Error::RustError(format!(
            "origin answered {status}"
        ))),
    }
}
