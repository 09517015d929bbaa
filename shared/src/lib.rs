//! Latchkey's core, shared by origin (native) and the edge Worker (`wasm32-unknown-unknown`).
//!
//! This crate does no I/O: it never reads the clock, the OS random number generator, the network
//! or a disk. Time ([`UnixMillis`]) and randomness (a `fill_random` callback) are parameters.
//!
//! * [`key`]: the key format (documented there, with its version), hashing, ids and hints.
//! * [`scope`]: the scope grammar (documented there), matching and the operator's policy.
//! * [`record`]: the versioned record published to the edge for each key.
//! * [`verify`]: the one function that decides a verification.

pub mod key;
pub mod record;
pub mod scope;
pub mod verify;

mod base62;

pub use key::{ApiKey, KeyError, KeyHash, KeyHint, KeyId, KeyPrefix};
pub use record::{
    KeyRecord, RECORD_VERSION, RecordError, UnixMillis, is_expired_at, kv_entry_name,
};
pub use scope::{Scope, ScopeError, ScopePolicy, ScopeSet};
pub use verify::{Verdict, decide, parse_presented};
