//! The location's shared copy of a ledger poll (sans-IO: the edge reads and writes it in the
//! Cache API, `edge/src/memory.rs`).
//!
//! One isolate per location and poll interval asks the ledger for its recent entries and puts
//! the [`Tail`] in a cache the location's other isolates read instead of asking the ledger
//! themselves. Anything that can write that cache (in production, any Worker on the zone) could
//! put a forged copy there, so a copy is **sealed**: `<hex MAC>\n<tail JSON>`, the MAC an
//! HMAC-SHA256 with the ledger secret over [`DOMAIN`], the poll interval (the [`bucket`]) and the
//! exact JSON. [`open`] refuses a copy whose MAC does not check for this secret and this
//! interval: a tampered one, one sealed with another secret, and an old copy put under a newer
//! interval's key. The domain tag keeps a copy's MAC from passing for any other message signed
//! with the same secret (ledger appends, `latchkey-ledger-v1`), and the other way round.
//!
//! ```
//! use latchkey_shared::UnixMillis;
//! use latchkey_shared::ledger::copy::{self, CopyError};
//! use latchkey_shared::ledger::{Tail, LEDGER_VERSION};
//! use latchkey_shared::sign::SigningSecret;
//!
//! let secret = SigningSecret::parse(&"s".repeat(32)).unwrap();
//! let now = UnixMillis(1_700_000_000_000);
//! let tail = Tail {
//!     v: LEDGER_VERSION, after: 0, entries: vec![], more: false, head: 0,
//!     watermark: Some(now), served_at: now, retention_ms: 600_000, epoch: 1,
//! };
//! let bucket = copy::bucket(now, 1000);
//! let sealed = copy::seal(&secret, bucket, &tail);
//! assert_eq!(copy::open(&secret, bucket, sealed.as_bytes()), Ok(tail));
//! assert_eq!(copy::open(&secret, bucket + 1, sealed.as_bytes()), Err(CopyError::Mac));
//! ```

use super::{LedgerError, Tail};
use crate::record::UnixMillis;
use crate::sign::{self, SigningSecret};

/// The domain tag a copy's MAC starts with.
pub const DOMAIN: &str = "latchkey-ledger-cache-v1";

/// Why a shared copy was refused. The caller asks the ledger itself instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// No MAC line: not a sealed copy.
    #[error("the shared copy is not sealed")]
    Unsealed,
    /// The MAC does not check for this secret and poll interval: tampered, sealed with another
    /// secret, or a copy of another interval.
    #[error("the shared copy's MAC does not match this secret and poll interval")]
    Mac,
    /// Sealed, but not a tail this build reads.
    #[error("the shared copy holds no readable tail: {0}")]
    Tail(LedgerError),
}

/// The poll interval `now` falls in, for `poll_ms` long intervals (at least 1 ms).
pub fn bucket(now: UnixMillis, poll_ms: i64) -> i64 {
    now.0.div_euclid(poll_ms.max(1))
}

/// Seals `tail` as the copy of poll interval `bucket`.
pub fn seal(secret: &SigningSecret, bucket: i64, tail: &Tail) -> String {
    seal_json(secret, bucket, &tail.to_json())
}

/// The tail in a sealed copy, if its MAC checks for this secret and poll interval. Reads no
/// JSON before the MAC has checked.
pub fn open(secret: &SigningSecret, bucket: i64, body: &[u8]) -> Result<Tail, CopyError> {
    let split = body
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(CopyError::Unsealed)?;
    let (mac, json) = body.split_at(split);
    let json = json.get(1..).unwrap_or_default();
    let mac = std::str::from_utf8(mac).map_err(|_| CopyError::Unsealed)?;
    sign::verify_mac(secret.as_bytes(), &message(bucket, json), mac).map_err(|_| CopyError::Mac)?;
    Tail::parse(json).map_err(CopyError::Tail)
}

fn seal_json(secret: &SigningSecret, bucket: i64, json: &str) -> String {
    let mac = sign::sign(secret.as_bytes(), &message(bucket, json.as_bytes()));
    format!("{mac}\n{json}")
}

/// What a copy's MAC is over: the domain tag, the poll interval and the exact JSON.
fn message(bucket: i64, json: &[u8]) -> Vec<u8> {
    let mut message = format!("{DOMAIN}\n{bucket}\n").into_bytes();
    message.extend_from_slice(json);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Entry, LEDGER_VERSION, append_message};
    use crate::{KeyId, KeyRecord, ScopePolicy};

    const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

    fn secret(c: char) -> SigningSecret {
        SigningSecret::parse(&c.to_string().repeat(32)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A poll holding the revocation of one key.
    fn revocation() -> Tail {
        let record = KeyRecord {
            v: crate::RECORD_VERSION,
            id: KeyId::parse("key_0123456789abcdefABCD").unwrap_or_else(|e| panic!("{e}")),
            subject: "acme".into(),
            scopes: ScopePolicy::default()
                .parse_grants(&["read:orders"])
                .unwrap_or_else(|e| panic!("{e:?}")),
            revoked: true,
            revoked_at: Some(NOW),
            expires_at: None,
            revision: 2,
            disabled: false,
            allowed_ips: Default::default(),
        };
        Tail {
            v: LEDGER_VERSION,
            after: 6,
            entries: vec![Entry {
                seq: 7,
                at: NOW,
                name: format!("k1:{}", "a".repeat(64)),
                record,
            }],
            more: false,
            head: 7,
            watermark: Some(NOW),
            served_at: NOW,
            retention_ms: 600_000,
            epoch: 42,
        }
    }

    /// What a case opens, with which secret, for which interval, and what it expects.
    type Case<'a> = (
        &'a str,
        String,
        &'a SigningSecret,
        i64,
        Result<(), CopyError>,
    );

    #[test]
    fn only_a_copy_sealed_with_this_secret_for_this_interval_opens() {
        let (ours, theirs) = (secret('s'), secret('t'));
        let tail = revocation();
        let bucket = bucket(NOW, 1000);
        let sealed = seal(&ours, bucket, &tail);
        let (mac, json) = sealed.split_once('\n').unwrap_or_else(|| panic!("sealed"));
        // The copy shows the key as valid: the JSON changed, the MAC did not.
        let forged_json = json.replace(r#""revoked":true"#, r#""revoked":false"#);
        assert_ne!(forged_json, json);
        let mut flipped_mac = mac.to_owned().into_bytes();
        flipped_mac[0] = if flipped_mac[0] == b'0' { b'1' } else { b'0' };
        let flipped_mac = String::from_utf8(flipped_mac).unwrap_or_else(|e| panic!("{e}"));
        // MACed like a ledger append (another domain) over the same JSON.
        let append_mac = sign::sign(ours.as_bytes(), &append_message(NOW, json.as_bytes()));
        // A valid seal over JSON that is no tail.
        let not_a_tail = seal_json(&ours, bucket, r#"{"v":1}"#);
        let newer_version = seal_json(&ours, bucket, &json.replacen(r#""v":1"#, r#""v":2"#, 1));
        // (what, body, opened with this secret, for this interval, expected)
        let cases: Vec<Case<'_>> = vec![
            ("a good copy", sealed.clone(), &ours, bucket, Ok(())),
            (
                "the JSON tampered with (a revoked key shown as valid)",
                format!("{mac}\n{forged_json}"),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "the MAC tampered with",
                format!("{flipped_mac}\n{json}"),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "sealed with another secret",
                seal(&theirs, bucket, &tail),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "opened with another secret",
                sealed.clone(),
                &theirs,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "a copy of the previous interval under this one's key",
                seal(&ours, bucket - 1, &tail),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "a copy of an old interval",
                seal(&ours, bucket - 3600, &tail),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "a copy of the next interval",
                seal(&ours, bucket + 1, &tail),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "a MAC of another domain (a ledger append's)",
                format!("{append_mac}\n{json}"),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "the JSON alone",
                json.to_owned(),
                &ours,
                bucket,
                Err(CopyError::Unsealed),
            ),
            (
                "nothing",
                String::new(),
                &ours,
                bucket,
                Err(CopyError::Unsealed),
            ),
            (
                "no MAC",
                format!("\n{json}"),
                &ours,
                bucket,
                Err(CopyError::Mac),
            ),
            (
                "a sealed body that is no tail",
                not_a_tail,
                &ours,
                bucket,
                Err(CopyError::Tail(LedgerError::Shape(String::new()))),
            ),
            (
                "a sealed tail of a newer version",
                newer_version,
                &ours,
                bucket,
                Err(CopyError::Tail(LedgerError::Version(2))),
            ),
        ];
        for (what, body, secret, bucket, expected) in cases {
            let opened = open(secret, bucket, body.as_bytes());
            match (&opened, &expected) {
                (Ok(opened), Ok(())) => assert_eq!(opened, &tail, "{what}"),
                // The parser's message is not part of the contract.
                (
                    Err(CopyError::Tail(LedgerError::Shape(_))),
                    Err(CopyError::Tail(LedgerError::Shape(_))),
                ) => {}
                _ => assert_eq!(opened.map(|_| ()), expected, "{what}"),
            }
        }
        // A MAC line that is not UTF-8.
        let mut body = vec![0xff, 0xfe, b'\n'];
        body.extend_from_slice(json.as_bytes());
        assert_eq!(open(&ours, bucket, &body), Err(CopyError::Unsealed));
    }

    #[test]
    fn any_change_to_a_sealed_copy_s_tail_is_refused() {
        let secret = secret('s');
        let sealed = seal(&secret, 7, &revocation()).into_bytes();
        let start = sealed
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or_else(|| panic!("sealed"));
        for i in start..sealed.len() {
            for bit in [0x01, 0x20, 0x80] {
                let mut body = sealed.clone();
                body[i] ^= bit;
                assert!(open(&secret, 7, &body).is_err(), "byte {i} ^ {bit:#x}");
            }
        }
        // Cut short or lengthened.
        assert!(open(&secret, 7, &sealed[..sealed.len() - 1]).is_err());
        let mut longer = sealed.clone();
        longer.push(b' ');
        assert_eq!(open(&secret, 7, &longer), Err(CopyError::Mac));
        assert!(open(&secret, 7, &sealed).is_ok());
    }

    #[test]
    fn intervals_follow_the_clock_without_overflow() {
        // (time, interval length, expected bucket)
        let cases = [
            (1_700_000_000_000, 1000, 1_700_000_000),
            (1_700_000_000_999, 1000, 1_700_000_000),
            (1_700_000_001_000, 1000, 1_700_000_001),
            (1_700_000_000_000, 0, 1_700_000_000_000),
            (1_700_000_000_000, -5, 1_700_000_000_000),
            (-1, 1000, -1),
            (i64::MIN, 1, i64::MIN),
            (i64::MAX, 60_000, i64::MAX / 60_000),
        ];
        for (now, poll_ms, expected) in cases {
            assert_eq!(
                bucket(UnixMillis(now), poll_ms),
                expected,
                "{now} / {poll_ms}"
            );
        }
    }
}
