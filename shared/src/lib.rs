//! Latchkey's core, shared by origin (native) and the edge Worker (`wasm32-unknown-unknown`).
//!
//! This crate does no I/O: it never reads the clock, the OS random number generator, the network
//! or a disk. Time ([`UnixMillis`]) and randomness (a `fill_random` callback) are parameters.
//!
//! * [`key`]: the key format (documented there, with its version), hashing, ids and hints.
//! * [`scope`]: the scope grammar (documented there), matching and the operator's policy.
//! * [`record`]: the versioned record published to the edge for each key.
//! * [`ip`]: per-key IP allowlists (syntax documented there) and their matching.
//! * [`verify`]: the one function that decides a verification.
//! * [`route`]: the gateway's route rules (syntax documented there) and their matching.
//! * [`target`]: the gateway's canonical request path and its closed method table.
//! * [`sign`]: HMAC-SHA256 signatures for the edge's forwarded headers and usage reports, the
//!   upstream's check of them ([`sign::gateway::GatewayVerifier`]), and the one rule for secrets.

pub mod ip;
pub mod key;
pub mod ledger;
pub mod record;
pub mod route;
pub mod scope;
pub mod sign;
pub mod target;
pub mod verify;

mod base62;

/// Lowercase hex of a 32-byte digest.
pub(crate) fn hex32(bytes: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    push_hex32(&mut out, bytes);
    out
}

/// Appends the lowercase hex of a 32-byte digest to `out`, written into a buffer on the stack
/// and appended once. (`hex::encode_to_slice`, its iterator chain built for size in the Worker,
/// showed in the gateway's profile: the key's entry name and the HMAC.)
pub(crate) fn push_hex32(out: &mut String, bytes: &[u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 64];
    for (pair, &b) in buf.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    out.push_str(
        std::str::from_utf8(&buf).unwrap_or_else(|_| unreachable!("hex digits are ASCII")),
    );
}

/// `s` as an error message may echo it: its first `max` bytes (cut at a character boundary),
/// and `…` if that left something out.
pub(crate) fn echo(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = s[..end].to_owned();
    if end < s.len() {
        out.push('…');
    }
    out
}

pub use key::{ApiKey, KeyError, KeyHash, KeyHint, KeyId, KeyPrefix};
pub use record::{
    KeyRecord, RECORD_VERSION, RecordError, UnixMillis, is_expired_at, kv_entry_name,
};
pub use route::{RouteError, RouteRule, RouteTable};
pub use scope::{Scope, ScopeError, ScopePolicy, ScopeSet};
pub use verify::{
    DecisionContext, PRESENTED_MAX, REQUIRED_SCOPES_MAX, RequiredScopesError, Verdict,
    VerifyReport, VerifyRequest, decide, parse_presented, parse_required,
};
