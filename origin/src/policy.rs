//! Key lifecycle policies, run by origin on a schedule (`KEY_POLICY_INTERVAL`):
//!
//! * **Stale keys** (`STALE_KEY_AFTER`, off by default): a live key neither used nor changed
//!   for that long is switched off (`disabled`, reversible, audited as an update by
//!   `policy:stale_keys`), after a `stale_warning` event `STALE_WARNING_BEFORE` earlier, and
//!   never sooner than that after its warning (a key already long idle when the policy is
//!   turned on is warned first). A key's idle time runs from its last verification or its last
//!   change, whichever is later, so switching it on again restarts it.
//! * **Expiring keys** (`EXPIRY_WARNING_BEFORE`, off by default): an `expiry_warning` event
//!   when a live key is that close to its expiry.
//!
//! Each warning is written once per idle period (or per expiry): a warning already in the audit
//! log since the key's last activity (or for its current expiry) is not repeated. One process runs the policies
//! (a lock beside the database).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use latchkey_shared::UnixMillis;
use serde_json::json;
use tokio::sync::watch;

use crate::model::PolicyQuery;
use crate::service::{
    EXPIRY_POLICY_ACTOR, KeyService, STALE_POLICY_ACTOR, ServiceError, system_now,
};

/// Keys acted on per kind and pass; a longer backlog waits for the next pass.
const PER_PASS: u32 = 500;

/// The policies' settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    /// `STALE_KEY_AFTER`: idle time after which a key is switched off (`None`: never).
    pub stale_after: Option<Duration>,
    /// `STALE_WARNING_BEFORE`: how long before that the `stale_warning` event is sent (zero:
    /// none).
    pub stale_warning: Duration,
    /// `EXPIRY_WARNING_BEFORE`: how long before its expiry a key's `expiry_warning` event is
    /// sent (`None`: never).
    pub expiry_warning: Option<Duration>,
    /// `KEY_POLICY_INTERVAL`: how often the policies run.
    pub interval: Duration,
}

impl KeyPolicy {
    /// Whether any policy is on.
    pub fn any(&self) -> bool {
        self.stale_after.is_some() || self.expiry_warning.is_some()
    }
}

fn before(now: UnixMillis, span: Duration) -> UnixMillis {
    UnixMillis(
        now.0
            .saturating_sub(i64::try_from(span.as_millis()).unwrap_or(i64::MAX)),
    )
}

fn after(now: UnixMillis, span: Duration) -> UnixMillis {
    UnixMillis(
        now.0
            .saturating_add(i64::try_from(span.as_millis()).unwrap_or(i64::MAX)),
    )
}

/// Runs the policies every `policy.interval` until `stop`.
pub async fn run(
    service: Arc<KeyService>,
    policy: KeyPolicy,
    lock_path: Option<PathBuf>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(_lock) = crate::publish::hold_lock(
        lock_path.as_deref(),
        &mut stop,
        "another origin holds the key policy lock; waiting",
    )
    .await
    else {
        return;
    };
    loop {
        if let Err(error) = pass(&service, &policy).await {
            tracing::error!(%error, "key policy pass failed; retrying at the next");
        }
        tokio::select! {
            () = tokio::time::sleep(policy.interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One pass of every policy that is on. Each query leaves out the keys already dealt with,
/// so every key it returns is acted on, and a backlog longer than a pass takes shrinks by that
/// much (500 keys of each kind) each pass.
pub async fn pass(service: &KeyService, policy: &KeyPolicy) -> Result<(), ServiceError> {
    // Uses still in memory count: a key verified a moment ago is not idle.
    service.flush_usage().await?;
    let store = service.store();
    let now = system_now();
    if let Some(stale_after) = policy.stale_after {
        let idle_before = before(now, stale_after);
        let warning = policy.stale_warning.min(stale_after);
        if !warning.is_zero() {
            let warn_from = before(now, stale_after - warning);
            let query = PolicyQuery::StaleUnwarned {
                idle_before: warn_from,
                now,
            };
            for key in store.policy_candidates(query, PER_PASS).await? {
                let active = key
                    .last_used_at
                    .unwrap_or(UnixMillis(0))
                    .max(key.updated_at);
                // Switched off no sooner than the warning promises: a key long idle when the
                // policy is turned on gets its warning too.
                let details = json!({
                    "idle_since": active,
                    "disabled_from": after(active, stale_after).max(after(now, warning)),
                });
                service
                    .warn(STALE_POLICY_ACTOR, &key, "stale_warning", details)
                    .await?;
            }
        }
        let query = PolicyQuery::StaleDue {
            idle_before,
            warned_before: (!warning.is_zero()).then(|| before(now, warning)),
            now,
        };
        for key in store.policy_candidates(query, PER_PASS).await? {
            let key = service.disable_stale(&key.id, idle_before).await?;
            if key.disabled {
                tracing::info!(key = %key.id, "stale key switched off");
            }
        }
    }
    if let Some(expiry_warning) = policy.expiry_warning {
        let query = PolicyQuery::ExpiringUnwarned {
            now,
            until: after(now, expiry_warning),
        };
        for key in store.policy_candidates(query, PER_PASS).await? {
            let details = json!({ "expires_at": key.expiration });
            service
                .warn(EXPIRY_POLICY_ACTOR, &key, "expiry_warning", details)
                .await?;
        }
    }
    Ok(())
}
