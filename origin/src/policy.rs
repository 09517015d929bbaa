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
//! log since the key's last activity (or change) is not repeated. One process runs the policies
//! (a lock beside the database).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use latchkey_shared::UnixMillis;
use serde_json::json;
use tokio::sync::watch;

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

/// The policy lock next to a database file.
pub fn lock_path(database_file: Option<&Path>) -> Option<PathBuf> {
    database_file.map(|file| {
        let mut name = file.as_os_str().to_owned();
        name.push(".policy.lock");
        PathBuf::from(name)
    })
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
    let _lock = match lock_path {
        Some(path) => match crate::publish::wait_for_lock(
            &path,
            &mut stop,
            "another origin holds the key policy lock; waiting",
        )
        .await
        {
            Some(lock) => Some(lock),
            None => return,
        },
        None => None,
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

/// One pass of every policy that is on.
pub async fn pass(service: &KeyService, policy: &KeyPolicy) -> Result<(), ServiceError> {
    // Uses still in memory count: a key verified a moment ago is not idle.
    service.flush_usage().await?;
    let store = service.store();
    let now = system_now();
    if let Some(stale_after) = policy.stale_after {
        let idle_before = before(now, stale_after);
        let warning = policy.stale_warning.min(stale_after);
        for key in store
            .idle_keys(before(now, stale_after - warning), now, PER_PASS)
            .await?
        {
            let active = key
                .last_used_at
                .unwrap_or(UnixMillis(0))
                .max(key.updated_at);
            if !warning.is_zero() {
                let warned = store
                    .last_audited(&key.id, "stale_warning")
                    .await?
                    .filter(|at| *at >= active);
                let Some(warned) = warned else {
                    // Warned first, switched off no sooner than the warning promised: a key
                    // long idle when the policy is turned on gets its warning too.
                    let details = json!({
                        "idle_since": active,
                        "disabled_from": after(active, stale_after).max(after(now, warning)),
                    });
                    service
                        .warn(STALE_POLICY_ACTOR, &key, "stale_warning", details)
                        .await?;
                    continue;
                };
                if after(warned, warning) > now {
                    continue;
                }
            }
            if active < idle_before {
                let key = service.disable_stale(&key.id, idle_before).await?;
                if key.disabled {
                    tracing::info!(key = %key.id, "stale key switched off");
                }
            }
        }
    }
    if let Some(expiry_warning) = policy.expiry_warning {
        for key in store
            .expiring_keys(now, after(now, expiry_warning), PER_PASS)
            .await?
        {
            let warned = store.last_audited(&key.id, "expiry_warning").await?;
            // Once per expiry: a change (a new expiry, say) allows another warning.
            if warned.is_some_and(|at| at >= key.updated_at) {
                continue;
            }
            let details = json!({ "expires_at": key.expiration });
            service
                .warn(EXPIRY_POLICY_ACTOR, &key, "expiry_warning", details)
                .await?;
        }
    }
    Ok(())
}
