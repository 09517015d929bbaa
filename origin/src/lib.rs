//! Latchkey origin: issues, stores, verifies and revokes partner API keys.
//!
//! A request's path through the code: [`http::router`] → admin check ([`http`]) → a handler in
//! [`http::clerk`] or [`http::tutorial`] → [`service::KeyService`] (validation, scope policy,
//! the shared verify decision) → [`store::KeyStore`] ([`store::SqliteStore`] or [`store::PgStore`]: the `api_keys` row
//! its `audit_log` entry and its `kv_outbox` row, in one transaction) → [`delivery::kv::publisher::Publisher`]
//! (the outbox drained into Workers KV through [`delivery::kv::client::KvClient`]), where the
//! edge reads it, and [`delivery::ledger::LedgerPublisher`] (the same outbox appended to the
//! edge's change ledger).
//!
//! Three flows, a folder each: requests ([`http`] → [`service`] → [`store`]), change delivery
//! ([`delivery`]: the outbox into KV, the ledger and webhooks) and scheduled jobs ([`jobs`]);
//! [`config`] is a leaf every part takes its settings from.

pub mod audit;
pub mod config;
pub mod delivery;
pub mod http;
pub mod jobs;
pub mod leaks;
pub mod model;
pub mod serve;
pub mod service;
pub mod store;
pub mod usage;
