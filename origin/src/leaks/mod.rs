//! Leak reports: GitHub secret scanning's keys and the signatures of its alerts
//! ([`github_keys`]); the alert endpoint is `http/github.rs`, and what a report does to a key is
//! the service's (`KeyService::report_leak`).

pub mod github_keys;
