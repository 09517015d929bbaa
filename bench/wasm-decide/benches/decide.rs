//! The verify hot path, piece by piece, beside its physical anchor: one SHA-256 of a ~50-byte
//! key (criterion). `./dev bench` runs these and writes the medians into BENCHMARKS.md.

#![allow(clippy::expect_used, missing_docs, reason = "benchmark harness")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use latchkey_bench_wasm::{Inputs, inputs};
use latchkey_shared::{ApiKey, DecisionContext, Scope, UnixMillis, decide, parse_presented};
use sha2::{Digest, Sha256};

fn benches(c: &mut Criterion) {
    let Inputs {
        key: text,
        record,
        required,
    } = inputs();
    assert_eq!(text.len(), 46, "a ~50-byte key, as the anchor assumes");
    let parsed = ApiKey::parse(&text).expect("key");
    let now = UnixMillis(1_800_000_000_000);

    c.bench_function("sha256_of_key", |b| {
        b.iter(|| Sha256::digest(black_box(text.as_bytes())))
    });
    c.bench_function("key_parse_and_checksum", |b| {
        b.iter(|| ApiKey::parse(black_box(&text)).expect("key"))
    });
    c.bench_function("key_hash", |b| b.iter(|| black_box(&parsed).hash()));
    c.bench_function("scope_parse", |b| {
        b.iter(|| Scope::parse(black_box("orders.refunds:read:items")).expect("scope"))
    });
    c.bench_function("allows_in_20_scopes", |b| {
        b.iter(|| {
            required
                .iter()
                .all(|r| black_box(&record).scopes.allows(black_box(r)))
        })
    });
    // The whole decision as origin and the edge make it, minus the lookup itself: parse the
    // presented key (syntax, checksum), hash it, decide on the record.
    c.bench_function("verify_decision", |b| {
        b.iter(|| {
            let key = parse_presented(black_box(&text)).expect("well-formed");
            let hash = key.hash();
            black_box(hash);
            decide(
                Some(black_box(&record)),
                &DecisionContext::at(now).requiring(black_box(&required)),
            )
        })
    });
}

criterion_group!(decide_benches, benches);
criterion_main!(decide_benches);
