//! Latchkey origin: issues, stores, verifies and revokes partner API keys.
//!
//! A request's path through the code: [`http::router`] → admin check ([`http`]) → a handler in
//! [`http::clerk`] or [`http::tutorial`] → [`service::KeyService`] (validation, scope policy,
//! the shared verify decision) → [`store::KeyStore`] ([`store::SqliteStore`]: the `api_keys` row
//! its `audit_log` entry and its `kv_outbox` row, in one transaction) → [`publish::Publisher`]
//! (the outbox drained into Workers KV through [`kv::KvClient`]), where the edge reads it, and
//! [`ledger::LedgerPublisher`] (the same outbox appended to the edge's change ledger).

pub mod audit;
pub mod budget;
pub mod config;
pub mod http;
pub mod kv;
pub mod ledger;
pub mod model;
pub mod policy;
pub mod publish;
pub mod secret_scanning;
pub mod serve;
pub mod service;
pub mod store;
pub mod sync;
pub mod usage;
pub mod webhook;
