//! Scheduled and one-off work beside the requests: the key lifecycle [`policy`] (stale keys,
//! expiry warnings), run every `KEY_POLICY_INTERVAL`, and [`sync`] (`origin sync --full`).
//! The usage flush runs with the service (`usage`).

pub mod policy;
pub mod sync;
