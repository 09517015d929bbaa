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
