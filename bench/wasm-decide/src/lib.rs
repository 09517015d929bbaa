//! The verify hot path over fixed inputs, measured three ways by `./dev bench`: criterion
//! natively (`benches/decide.rs`), and the same loop (`run(op, n)`: operation `op`, `n` times)
//! natively and compiled to `wasm32-unknown-unknown` under Node (wasm-bindgen's Node.js glue).

#![allow(clippy::expect_used, reason = "fixed inputs, checked once")]

use std::hint::black_box;

use latchkey_shared::{
    ApiKey, DecisionContext, KeyId, KeyPrefix, KeyRecord, RECORD_VERSION, Scope, ScopePolicy,
    UnixMillis, decide, parse_presented, parse_required,
};
use sha2::{Digest, Sha256};
use wasm_bindgen::prelude::wasm_bindgen;

/// The operations, by number: what `run` measures.
pub const OPS: [&str; 5] = [
    "sha256_of_key",
    "key_parse_and_checksum",
    "scope_parse",
    "allows_in_20_scopes",
    "verify_decision",
];

/// The fixed inputs every measurement uses: a key from a fixed "random" source (46 bytes, the
/// "~50-byte key" of the SHA-256 anchor), a record holding 20 scopes, and two required scopes
/// (the last two of the record's, in order).
pub struct Inputs {
    /// The presented key.
    pub key: String,
    /// Its record.
    pub record: KeyRecord,
    /// What a request requires.
    pub required: Vec<Scope>,
}

/// Builds the [`Inputs`].
pub fn inputs() -> Inputs {
    let mut n = 0u8;
    let key = ApiKey::generate(&KeyPrefix::default(), &mut |buf: &mut [u8]| {
        for b in buf {
            n = n.wrapping_mul(31).wrapping_add(7);
            *b = n % 248;
        }
    })
    .expose()
    .to_owned();
    let mut scopes: Vec<String> = (0..18).map(|i| format!("read:resource{i:02}")).collect();
    scopes.push("write:orders".into());
    scopes.push("write:webhooks".into());
    let record = KeyRecord {
        v: RECORD_VERSION,
        id: KeyId::parse("key_0123456789abcdefABCD").expect("id"),
        subject: "acme-corp".into(),
        scopes: ScopePolicy::default()
            .parse_grants(&scopes)
            .expect("scopes"),
        revoked: false,
        revoked_at: None,
        expires_at: Some(UnixMillis(i64::MAX / 2)),
        revision: 3,
        disabled: false,
        allowed_ips: Default::default(),
    };
    let required = parse_required(&["write:orders", "write:webhooks"]).expect("required");
    Inputs {
        key,
        record,
        required,
    }
}

/// Runs operation `op` (an index into [`OPS`]) `n` times; returns a value derived from the
/// results so the work cannot be optimised away.
#[wasm_bindgen]
pub fn run(op: u32, n: u32) -> u32 {
    let inputs = inputs();
    let now = UnixMillis(1_800_000_000_000);
    let mut acc = 0u32;
    for _ in 0..n {
        acc = acc.wrapping_add(match op {
            0 => u32::from(Sha256::digest(black_box(inputs.key.as_bytes()))[0]),
            1 => u32::from(ApiKey::parse(black_box(&inputs.key)).is_ok()),
            2 => u32::from(Scope::parse(black_box("orders.refunds:read:items")).is_ok()),
            3 => u32::from(
                inputs
                    .required
                    .iter()
                    .all(|r| black_box(&inputs.record).scopes.allows(r)),
            ),
            _ => {
                let key = parse_presented(black_box(&inputs.key)).expect("well-formed");
                black_box(key.hash());
                u32::from(
                    decide(
                        Some(black_box(&inputs.record)),
                        &DecisionContext::at(now).requiring(&inputs.required),
                    )
                    .is_valid(),
                )
            }
        });
    }
    acc
}
