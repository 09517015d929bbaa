//! The KV record decoder, as the edge runs it on whatever KV holds: never panics; a decoded
//! record re-encodes (as the version its fields need) to one that decodes equal; the decision
//! on it never says valid for a revoked, expired or disabled record, nor, from an unknown
//! address, for one with an IP allowlist.
#![no_main]

use latchkey_shared::{DecisionContext, KeyRecord, UnixMillis, Verdict, decide};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (i64, &[u8])| {
    let (now, bytes) = input;
    let Ok(record) = KeyRecord::from_json(bytes) else {
        return;
    };
    let again =
        KeyRecord::from_json(record.to_json().as_bytes()).expect("re-encoded record decodes");
    assert_eq!(
        again,
        KeyRecord {
            v: record.version_needed(),
            ..record.clone()
        }
    );
    let now = UnixMillis(now);
    let verdict = decide(Some(&record), &DecisionContext::at(now));
    if record.revoked {
        assert_eq!(verdict, Verdict::Revoked);
    } else if record.is_expired(now) {
        assert_eq!(verdict, Verdict::Expired);
    } else if record.disabled {
        assert_eq!(verdict, Verdict::Disabled);
    } else if !record.allowed_ips.is_empty() {
        assert_eq!(verdict, Verdict::IpNotAllowed);
    } else {
        assert!(verdict.is_valid());
    }
});
