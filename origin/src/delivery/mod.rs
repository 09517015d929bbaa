//! Change delivery: every committed change waits in the outbox (or, for webhooks, in the audit
//! log) until each sink has taken it, each sink with its own budget and retries, run by one
//! process at a time (the store's lease for its role).
//!
//! - [`kv`]: the key's latest record into Workers KV, where the edge reads it;
//! - [`ledger`]: the same changes, and watermarks, appended to the edge's change ledger;
//! - [`webhooks`]: the audit log's events to the operator's endpoints, signed.

pub mod kv;
pub mod ledger;
pub mod webhooks;

use std::time::Duration;

/// A sink's next retry delay after `failures_in_a_row` (counted here): doubling from `base` up
/// to `max`, with full jitter in its upper half so many origins do not retry in step.
pub(crate) fn backoff(failures_in_a_row: &mut u32, base: Duration, max: Duration) -> Duration {
    *failures_in_a_row = failures_in_a_row.saturating_add(1);
    let exponent = (*failures_in_a_row - 1).min(16);
    let ceiling = base.saturating_mul(1 << exponent).min(max);
    let mut random = [0u8; 2];
    let jitter = if getrandom::fill(&mut random).is_ok() {
        f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX)
    } else {
        0.5
    };
    ceiling.mul_f64(0.5 + 0.5 * jitter)
}
