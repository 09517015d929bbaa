//! Latchkey origin: issues, stores, verifies and revokes partner API keys.
//!
//! A request's path through the code: [`http::router`] → admin check ([`http`]) → a handler in
//! [`http::clerk`] or [`http::tutorial`] → [`service::KeyService`] (validation, scope policy,
//! the shared verify decision) → [`store::KeyStore`] ([`store::SqliteStore`]: the `api_keys` row
//! and its `audit_log` entry, in one transaction).

pub mod audit;
pub mod config;
pub mod http;
pub mod model;
pub mod serve;
pub mod service;
pub mod store;
pub mod usage;
