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
//! Idle time is only known while the edge reports its uses (`POST /v1/usage`): a key used
//! every day through the gateway would otherwise look idle. So the stale-key policy needs usage
//! ingest (`USAGE_SIGNING_SECRET`; origin refuses to start without it) and is **held** — it
//! switches nothing off, says so once in the log and shows `held` in `/healthz` and
//! `/metrics` — while no usage batch has been accepted for `STALE_KEY_USAGE_MAX_AGE` (by origin's
//! clock, when it was accepted: [`stale_gate`]). A forward step of origin's clock makes the last
//! report look old (and the edge's batches are refused by their signed timestamp until the
//! clocks agree again), so it holds the policy rather than switching keys off in bulk.
//!
//! Each warning is written once per idle period (or per expiry): a warning already in the audit
//! log since the key's last activity (or for its current expiry) is not repeated. One process runs the policies
//! (a lock beside the database).

use std::sync::Arc;
use std::time::Duration;

use latchkey_shared::UnixMillis;
use serde_json::json;
use tokio::sync::watch;

use crate::model::PolicyQuery;
use crate::service::{
    EXPIRY_POLICY_ACTOR, KeyService, STALE_POLICY_ACTOR, ServiceError, system_now,
};
use crate::store::lease::{Role, lost_lease};

/// Keys acted on per kind and pass; a longer backlog waits for the next pass.
const PER_PASS: u32 = 500;

pub use crate::config::KeyPolicy;

/// Whether the stale-key policy may switch keys off now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleGate {
    /// A usage batch was accepted within `STALE_KEY_USAGE_MAX_AGE`.
    Open,
    /// None was: idle times cannot be trusted. `report_age_ms`: how long ago the last one was
    /// accepted (`None`: never).
    Held {
        /// Milliseconds since the last accepted batch, by origin's clock.
        report_age_ms: Option<i64>,
    },
}

/// The gate at `now`, given when a usage batch was last accepted. A report dated after `now`
/// (origin's clock stepped back since) counts as fresh: that makes keys look less idle, never
/// more.
pub fn stale_gate(
    now: UnixMillis,
    last_report: Option<UnixMillis>,
    max_age: Duration,
) -> StaleGate {
    let Some(at) = last_report else {
        return StaleGate::Held {
            report_age_ms: None,
        };
    };
    let age = now.0.saturating_sub(at.0).max(0);
    if u128::try_from(age).unwrap_or(0) <= max_age.as_millis() {
        StaleGate::Open
    } else {
        StaleGate::Held {
            report_age_ms: Some(age),
        }
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

/// Runs the policies every `policy.interval` until `stop`, while this process holds the
/// policy lease.
pub async fn run(service: Arc<KeyService>, policy: KeyPolicy, mut stop: watch::Receiver<bool>) {
    loop {
        let Ok(lease) = service
            .store()
            .hold_lease(
                Role::Policy,
                &mut stop,
                "another origin holds the key policy lock; waiting",
            )
            .await
        else {
            return;
        };
        tokio::select! {
            () = passes(&service, &policy, stop.clone()) => return,
            () = lease.lost_wait() => lost_lease(Role::Policy),
        }
    }
}

/// A pass every `policy.interval` until `stop` (see [`run`]).
async fn passes(service: &KeyService, policy: &KeyPolicy, mut stop: watch::Receiver<bool>) {
    let mut was_held = false;
    loop {
        match pass(service, policy).await {
            Ok(StaleGate::Held { report_age_ms }) if !was_held => {
                was_held = true;
                tracing::warn!(
                    last_report_ms_ago = ?report_age_ms,
                    max_age = %humantime::format_duration(policy.usage_max_age),
                    "stale-key policy held: no usage report from the edge accepted recently, so \
                     idle times cannot be trusted and no key is switched off (check \
                     USAGE_SIGNING_SECRET and ORIGIN_USAGE_URL at the edge, and that origin's \
                     clock agrees with the edge's)"
                );
            }
            Ok(StaleGate::Open) if was_held => {
                was_held = false;
                tracing::info!("stale-key policy resumed: usage reports are arriving");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "key policy pass failed; retrying at the next");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(policy.interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One pass of every policy that is on. Each query leaves out the keys already dealt with,
/// so every key it returns is acted on, and a backlog longer than a pass takes shrinks by that
/// much (500 keys of each kind) each pass. Returns the stale-key policy's gate (`Open` when
/// that policy is off); while it is held, no stale key is warned or switched off.
pub async fn pass(service: &KeyService, policy: &KeyPolicy) -> Result<StaleGate, ServiceError> {
    // Uses still in memory count: a key verified a moment ago is not idle.
    service.flush_usage().await?;
    let store = service.store();
    let now = system_now();
    let gate = match policy.stale_after {
        Some(_) => stale_gate(now, store.last_usage_report().await?, policy.usage_max_age),
        None => StaleGate::Open,
    };
    if let (Some(stale_after), StaleGate::Open) = (policy.stale_after, gate) {
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
    Ok(gate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stale_policy_acts_only_while_usage_reports_are_recent() {
        let hour = Duration::from_secs(3600);
        let now = UnixMillis(1_800_000_000_000);
        let ago = |ms: i64| Some(UnixMillis(now.0 - ms));
        // (last report, expected gate, why)
        let cases = [
            (
                None,
                StaleGate::Held {
                    report_age_ms: None,
                },
                "never reported",
            ),
            (ago(0), StaleGate::Open, "reported just now"),
            (ago(3_600_000), StaleGate::Open, "exactly the limit"),
            (
                ago(3_600_001),
                StaleGate::Held {
                    report_age_ms: Some(3_600_001),
                },
                "just past it",
            ),
            (
                ago(86_400_000 + 5_000),
                StaleGate::Held {
                    report_age_ms: Some(86_405_000),
                },
                "origin's clock stepped a day forward after the last report",
            ),
            (ago(-60_000), StaleGate::Open, "origin's clock stepped back"),
            (
                Some(UnixMillis(i64::MIN)),
                StaleGate::Held {
                    report_age_ms: Some(i64::MAX),
                },
                "no overflow",
            ),
        ];
        for (last, want, why) in cases {
            assert_eq!(stale_gate(now, last, hour), want, "{why}");
        }
    }
}
