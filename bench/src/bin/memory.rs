//! The isolate's hot-key memory, measured natively: the heap bytes that
//! `latchkey_shared::ledger::memory::Memory` holds after taking in 10,000 realistic key records,
//! once as records read from KV (`remember`, the hot cache) and once as ledger entries (`apply`,
//! in answers of 1,000 entries as the ledger sends them). Bytes are counted by a counting global
//! allocator (requested sizes, not the allocator's own overhead), net of what was freed.
//!
//! Native sizes estimate the Worker's: wasm32 has 4-byte pointers and lengths where this has 8,
//! so the wasm figure is smaller. Prints one JSON object.

#![allow(
    clippy::panic,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    reason = "a benchmark probe: it stops with a message when its setup fails, and prints its figures"
)]

use std::alloc::System;

use latchkey_shared::ledger::memory::{Memory, Settings};
use latchkey_shared::ledger::{Entry, LEDGER_VERSION, TAIL_MAX_ENTRIES, Tail};
use latchkey_shared::{
    ApiKey, KeyId, KeyPrefix, KeyRecord, RECORD_VERSION, ScopePolicy, UnixMillis, kv_entry_name,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Keys per measurement.
const KEYS: usize = 10_000;

/// Deterministic random bytes (xorshift), as the seeder uses.
struct Source(u64);

impl Source {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
    }
}

/// `KEYS` KV entry names and the JSON of their records: fresh ids, one of 10,000 subjects, the
/// two scopes the benchmarks grant.
fn records() -> Vec<(String, Vec<u8>)> {
    let mut source = Source(0x9e37_79b9_7f4a_7c15);
    let prefix = KeyPrefix::default();
    let scopes = ScopePolicy::default()
        .parse_grants(&["read:orders", "write:orders"])
        .unwrap_or_else(|e| panic!("scopes: {e}"));
    (0..KEYS)
        .map(|i| {
            let key = ApiKey::generate(&prefix, &mut |b| source.fill(b));
            let record = KeyRecord {
                v: RECORD_VERSION,
                id: KeyId::generate(&mut |b| source.fill(b)),
                subject: format!("partner-{i}"),
                scopes: scopes.clone(),
                revoked: false,
                revoked_at: None,
                expires_at: None,
                revision: 1,
                disabled: false,
                allowed_ips: Default::default(),
            };
            (kv_entry_name(&key.hash()), record.to_json().into_bytes())
        })
        .collect()
}

fn parse(json: &[u8]) -> KeyRecord {
    KeyRecord::from_json(json).unwrap_or_else(|e| panic!("record: {e}"))
}

/// Memory that has completed one sync (trusted at `now`), with `entries` as ledger entries.
fn synced(now: UnixMillis) -> Memory {
    let mut memory = Memory::new(Settings::default());
    let after = memory
        .start_sync(now)
        .unwrap_or_else(|| panic!("a sync is due"));
    memory
        .apply(&tail(after, Vec::new(), 0, now), now)
        .unwrap_or_else(|e| panic!("empty sync: {e}"));
    memory
}

fn tail(after: u64, entries: Vec<Entry>, head: u64, now: UnixMillis) -> Tail {
    Tail {
        v: LEDGER_VERSION,
        after,
        more: entries.last().is_some_and(|e| e.seq < head),
        entries,
        head,
        watermark: Some(now),
        served_at: now,
        retention_ms: 600_000,
        epoch: 1,
    }
}

/// Net heap bytes allocated while `f` ran.
fn net_bytes(f: impl FnOnce()) -> i128 {
    let region = Region::new(ALLOCATOR);
    f();
    let change = region.change();
    i128::try_from(change.bytes_allocated).unwrap_or(i128::MAX)
        - i128::try_from(change.bytes_deallocated).unwrap_or(i128::MAX)
        + i128::try_from(change.bytes_reallocated).unwrap_or(i128::MAX)
}

fn main() {
    let records = records();
    let now = UnixMillis(1_760_000_000_000);
    let json_bytes: usize = records.iter().map(|(_, json)| json.len()).sum();

    // The hot cache: each record parsed from KV's bytes (as the edge does) and remembered.
    let mut memory = synced(now);
    let hot = net_bytes(|| {
        for (name, json) in &records {
            memory.remember(name, Some(parse(json)), now);
        }
    });
    assert_eq!(memory.stats().hot_keys, KEYS, "every record remembered");
    drop(memory);

    // Ledger entries, in answers of TAIL_MAX_ENTRIES, built before counting: memory keeps copies.
    let mut memory = synced(now);
    let head = u64::try_from(KEYS).unwrap_or(u64::MAX);
    let mut tails = Vec::new();
    let mut seq = 0u64;
    for chunk in records.chunks(TAIL_MAX_ENTRIES) {
        let after = seq;
        let entries = chunk
            .iter()
            .map(|(name, json)| {
                seq += 1;
                Entry {
                    seq,
                    at: now,
                    name: name.clone(),
                    record: parse(json),
                }
            })
            .collect();
        tails.push(tail(after, entries, head, now));
    }
    let ledger = net_bytes(|| {
        for tail in &tails {
            memory.start_sync(now);
            memory
                .apply(tail, now)
                .unwrap_or_else(|e| panic!("ledger answer: {e}"));
        }
    });
    assert_eq!(memory.stats().ledger_keys, KEYS, "every entry kept");
    assert!(memory.trusted(now), "caught up");

    // The bench driver reads this line.
    println!(
        r#"{{"keys":{KEYS},"hot_bytes":{hot},"ledger_bytes":{ledger},"record_json_bytes":{json_bytes},"pointer_bytes":{}}}"#,
        std::mem::size_of::<usize>()
    );
}
