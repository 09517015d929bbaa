//! `origin sync --full`: rebuild a KV namespace from the database, for a new namespace or after
//! an incident. Safe while origin serves: it queues every key in the outbox (the same path as
//! any change, so it can never write a stale state over a newer one) and then drains the
//! outbox itself, or, when a running origin holds the publisher lock, watches it do so. When
//! it publishes itself, it also waits for the read-backs its own writes asked for (a write with
//! an unknown outcome is read back `KV_VERIFY_DELAY_MS` later), so it never ends with a late
//! stale write unchecked.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_shared::KeyId;

use crate::config::KvConfig;
use crate::delivery::kv::client::KvClient;
use crate::delivery::kv::publisher::{Publisher, PublisherStatus};
use crate::model::Sink;
use crate::service::system_now;
use crate::store::lease::{Lease, Role};
use crate::store::{KeyStore, StoreError};

/// Keys queued per transaction.
const ENQUEUE_CHUNK: u32 = 1000;

/// What a full sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSummary {
    /// Keys queued for publishing.
    pub queued: u64,
    /// Keys written by this command (0 when a running origin published them).
    pub published_here: u64,
    /// Failed writes that were retried.
    pub retries: u64,
    /// KV API requests this command sent (writes and read-backs).
    pub requests: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs a full sync of `store` into the namespace of `kv`.
pub async fn full(store: Arc<dyn KeyStore>, kv: &KvConfig) -> Result<SyncSummary, String> {
    let started = Instant::now();
    let client = KvClient::new(kv).map_err(|e| e.to_string())?;
    let budget = client.budget();
    let total = store.count_keys().await.map_err(|e| e.to_string())?;
    let mut progress = Progress::new("queue", total);
    let mut after: Option<KeyId> = None;
    let mut last_seq = None;
    let mut queued = 0u64;
    while let Some((last, seq)) = store
        .outbox_enqueue_all(after.as_ref(), ENQUEUE_CHUNK, system_now())
        .await
        .map_err(|e| e.to_string())?
    {
        after = Some(last);
        last_seq = Some(seq);
        queued = queued.saturating_add(u64::from(ENQUEUE_CHUNK)).min(total);
        progress.show(queued);
    }
    progress.finish(queued);
    let Some(last_seq) = last_seq else {
        return Ok(SyncSummary {
            queued: 0,
            published_here: 0,
            retries: 0,
            requests: 0,
            elapsed: started.elapsed(),
        });
    };

    let pending = |store: Arc<dyn KeyStore>| async move {
        store
            .outbox_stats(Sink::Kv, Some(last_seq))
            .await
            .map(|s| s.pending)
            .map_err(|e: StoreError| e.to_string())
    };
    let mut held = store
        .try_lease(Role::Publisher)
        .await
        .map_err(|e| e.to_string())?;
    let mut progress = Progress::new("publish", queued);
    let status = Arc::new(PublisherStatus::new(true));
    let publisher = Publisher::new(store.clone(), client, status.clone(), kv);
    let (mut published_here, mut retries) = (0u64, 0u64);
    if held.is_none() {
        tracing::info!(
            "a running origin holds the publisher lock: it publishes, this command watches"
        );
    }
    let mut failures_in_a_row = 0u32;
    loop {
        let left = pending(store.clone()).await?;
        progress.show(queued.saturating_sub(left));
        if left == 0 {
            break;
        }
        if held.as_ref().is_some_and(Lease::lost) {
            // Another process may publish now: this command stops writing and watches.
            crate::store::lease::lost_lease(Role::Publisher);
            held = None;
        }
        if held.is_some() {
            let outcome = publisher.publish_batch().await.map_err(|e| e.to_string())?;
            published_here += u64::try_from(outcome.published).unwrap_or(0);
            retries += u64::try_from(outcome.failed).unwrap_or(0);
            if outcome.failed > 0 {
                failures_in_a_row += 1;
                let wait = kv
                    .retry_max
                    .min(Duration::from_millis(100 << failures_in_a_row.min(7)));
                tokio::time::sleep(wait).await;
            } else {
                failures_in_a_row = 0;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    progress.finish(queued);
    if held.is_some() {
        let mut announced = false;
        loop {
            let left = store.verify_pending().await.map_err(|e| e.to_string())?;
            if left == 0 {
                break;
            }
            if !announced {
                tracing::info!(
                    keys = left,
                    delay_ms = u64::try_from(kv.verify_delay.as_millis()).unwrap_or(u64::MAX),
                    "some writes had an unknown outcome: reading their keys back from KV after KV_VERIFY_DELAY_MS"
                );
                announced = true;
            }
            publisher.verify_due().await.map_err(|e| e.to_string())?;
            let outcome = publisher.publish_batch().await.map_err(|e| e.to_string())?;
            published_here += u64::try_from(outcome.published).unwrap_or(0);
            retries += u64::try_from(outcome.failed).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    drop(held);
    Ok(SyncSummary {
        queued,
        published_here,
        retries,
        requests: budget.report().requests_total,
        elapsed: started.elapsed(),
    })
}

/// Progress on standard error: a bar on a terminal (indicatif); elsewhere, where a bar would
/// be noise in a log, a line at every tenth.
struct Progress {
    label: &'static str,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_decile: u64,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>8} [{bar:20}] {percent:>3}% {pos}/{len}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("#>-");
            indicatif::ProgressBar::new(total)
                .with_style(style)
                .with_prefix(label)
        });
        Self {
            label,
            bar,
            total,
            last_decile: u64::MAX,
        }
    }

    fn show(&mut self, done: u64) {
        let done = done.min(self.total);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let percent = done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100);
        if percent / 10 != self.last_decile {
            self.last_decile = percent / 10;
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}: {percent}% ({done}/{})",
                self.label,
                self.total
            );
        }
    }

    fn finish(&mut self, done: u64) {
        self.show(done);
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
