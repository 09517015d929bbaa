//! The change ledger: the wire format between origin, the edge Worker and its ledger Durable
//! Object, and ([`memory`]) the isolate's bounded memory of key records that the ledger keeps
//! complete.
//!
//! Workers KV alone lets a change take a minute or more to reach other locations. The ledger is
//! one Durable Object holding an append-only, sequence-numbered log of recent key-record
//! changes. Origin appends every change to it (besides writing KV) and, at least once a second,
//! a **watermark**: "every change committed at origin before this time is in the ledger".
//! Isolates poll it about once a second and trust their memory only while it is provably
//! complete (see [`memory::Memory::trusted`]).
//!
//! Messages, each a version-1 JSON object (readers ignore fields they do not know, so a field
//! can be added without breaking an older reader; a new `v` is refused; the records inside
//! follow the record's own versions, `record.rs`, and one this build cannot read refuses the
//! whole message: an append is refused, and a tail an isolate cannot read leaves its memory
//! untrusted, so every key is read from KV until the edge is upgraded; fail closed, and the
//! reason the edge is deployed before origin):
//! * [`AppendBatch`], origin → Worker at [`APPEND_PATH`], signed with HMAC-SHA256 over
//!   [`append_message`] (`x-latchkey-timestamp`, `x-latchkey-signature`, as usage reports).
//! * [`AppendAnswer`], the Worker's answer.
//!
//!   The ledger object takes appends only in the order origin signed them ([`admit_append`]:
//!   a late copy of a timed-out append, signed before one already taken, is refused whole),
//!   and never lets a key's `revision` go back ([`admit_changes`]: a change older than one
//!   already appended for the same key is left out). Either alone keeps an older record from
//!   landing after a newer one and outliving it once the newer one is pruned, when a fresh
//!   isolate would hold it as the key's state.
//! * [`Tail`], the Durable Object → isolates: every entry after a sequence number.
//!
//! ```
//! use latchkey_shared::ledger::{AppendBatch, Change};
//! let body = br#"{"v":1,"changes":[],"watermark":1700000000000}"#;
//! let batch = AppendBatch::parse(body).unwrap();
//! assert!(batch.changes.is_empty());
//! assert_eq!(batch.watermark.unwrap().0, 1_700_000_000_000);
//! assert!(AppendBatch::parse(br#"{"v":2,"changes":[]}"#).is_err());
//! ```

use serde::{Deserialize, Serialize};

use crate::record::{KeyRecord, UnixMillis};

pub mod copy;
pub mod memory;

/// The Worker route origin appends to. Gateway rules cannot claim it.
pub const APPEND_PATH: &str = "/v1/ledger/changes";

/// The version of every ledger message this build writes and reads.
pub const LEDGER_VERSION: u32 = 1;

/// Most changes in one append (origin sends bigger backlogs in several).
pub const APPEND_MAX_CHANGES: usize = 1000;

/// Largest append body accepted: [`APPEND_MAX_CHANGES`] records of up to about 4 KiB each.
pub const APPEND_BODY_MAX_BYTES: usize = 4 << 20;

/// Most entries in one [`Tail`] answer; a longer backlog is read in several.
pub const TAIL_MAX_ENTRIES: usize = 1000;

/// One key change: the KV entry name and the key's full new record (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The KV entry name (`k1:<sha256 hex>`).
    pub name: String,
    /// The key's state after the change.
    pub record: KeyRecord,
}

/// Origin → Worker: changes to append, and optionally a new watermark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    /// Always [`LEDGER_VERSION`].
    pub v: u32,
    /// Changes, oldest first.
    pub changes: Vec<Change>,
    /// Every change committed at origin before this time is in the ledger once this batch is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<UnixMillis>,
}

/// Why an append body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Not JSON of the expected shape (or a record that does not parse).
    #[error("the ledger message is not valid: {0}")]
    Shape(String),
    /// A version this build does not read.
    #[error(
        "ledger message version {0} is not supported (this build reads version {LEDGER_VERSION})"
    )]
    Version(u32),
    /// More than [`APPEND_MAX_CHANGES`] changes.
    #[error("at most {APPEND_MAX_CHANGES} changes per append")]
    TooMany,
    /// An entry name that is not a `k1:` KV entry name.
    #[error("change {0} names no KV entry (expected k1: and 64 lowercase hex digits)")]
    Name(usize),
}

impl AppendBatch {
    /// A batch of `changes` with an optional watermark.
    pub fn new(changes: Vec<Change>, watermark: Option<UnixMillis>) -> Self {
        Self {
            v: LEDGER_VERSION,
            changes,
            watermark,
        }
    }

    /// Parses and checks an append body.
    pub fn parse(body: &[u8]) -> Result<Self, LedgerError> {
        let batch: Self = parse_versioned(body)?;
        if batch.changes.len() > APPEND_MAX_CHANGES {
            return Err(LedgerError::TooMany);
        }
        if let Some(i) = batch.changes.iter().position(|c| !is_entry_name(&c.name)) {
            return Err(LedgerError::Name(i));
        }
        Ok(batch)
    }
}

/// The Worker's answer to an append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendAnswer {
    /// Always [`LEDGER_VERSION`].
    pub v: u32,
    /// Changes appended.
    pub appended: u64,
    /// The ledger's newest sequence number.
    pub head: u64,
    /// Changes left out because the ledger had already appended a higher `revision` of the same
    /// key ([`admit_changes`]). Absent from an older ledger's answer (0).
    #[serde(default)]
    pub superseded: u64,
    /// The ledger's epoch, drawn when its object first ran: another epoch is another (new or
    /// wiped) ledger, which origin fills again with the recent changes. Absent from an older
    /// ledger's answer.
    #[serde(default)]
    pub epoch: Option<u64>,
}

/// Why the ledger object refuses a whole append whose signature checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRefusal {
    /// Signed at or before the last append the ledger accepted: a late copy (origin timed the
    /// request out and has since appended the keys' newer state). Accepting it would put older
    /// records after newer ones, where they would outlive them once those are pruned.
    #[error(
        "this append was signed at {signed_at}, not after the last append the ledger accepted \
         (signed at {last_accepted}): it was superseded. Do not resend it: append the keys' \
         current state with a new timestamp"
    )]
    Superseded {
        /// The refused append's timestamp (unix ms).
        signed_at: i64,
        /// The last accepted append's timestamp (unix ms).
        last_accepted: i64,
    },
}

/// Whether the ledger takes an append signed at `signed_at`, given the signed timestamp of the
/// last append it accepted (`None`: none yet). Appends must arrive in the order origin signed
/// them (its timestamps never repeat and only grow), so one signed at or before the last
/// accepted is refused whole: its changes and its watermark. Origin loses nothing by it: a
/// batch is acknowledged only after a 200, so its rows are sent again, with the keys' current
/// state and a new timestamp.
pub fn admit_append(
    signed_at: UnixMillis,
    last_accepted: Option<UnixMillis>,
) -> Result<(), AppendRefusal> {
    match last_accepted {
        Some(last) if signed_at.0 <= last.0 => Err(AppendRefusal::Superseded {
            signed_at: signed_at.0,
            last_accepted: last.0,
        }),
        _ => Ok(()),
    }
}

/// The changes of an admitted append, split by [`admit_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedChanges<'a> {
    /// To append, in the batch's order.
    pub append: Vec<&'a Change>,
    /// Left out: a higher `revision` of the same key was appended before (or earlier in this
    /// batch).
    pub superseded: Vec<&'a Change>,
}

/// Splits `changes` by the rule that a key's `revision` never goes back in the ledger: a change
/// whose revision is lower than the highest already appended for its name (`highest`, as the
/// ledger keeps it, or earlier in this batch) is left out; an equal one is appended (origin
/// appends a key's unchanged state again to keep its entry alive). So an older record can never
/// follow a newer one, and never be the only entry left once the newer one is pruned.
pub fn admit_changes<'a>(
    changes: &'a [Change],
    mut highest: impl FnMut(&str) -> Option<u64>,
) -> AdmittedChanges<'a> {
    let mut seen: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut admitted = AdmittedChanges {
        append: Vec::with_capacity(changes.len()),
        superseded: Vec::new(),
    };
    for change in changes {
        let name = change.name.as_str();
        let floor = match seen.get(name) {
            Some(&revision) => Some(revision),
            None => highest(name),
        };
        let revision = change.record.revision;
        if floor.is_some_and(|floor| revision < floor) {
            admitted.superseded.push(change);
        } else {
            seen.insert(name, revision);
            admitted.append.push(change);
        }
    }
    admitted
}

/// One entry of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its sequence number: 1, 2, 3, … with no gaps.
    pub seq: u64,
    /// When the ledger appended it (the ledger's clock).
    pub at: UnixMillis,
    /// The KV entry name.
    pub name: String,
    /// The key's state after the change.
    pub record: KeyRecord,
}

/// The ledger → an isolate: every entry after `after`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tail {
    /// Always [`LEDGER_VERSION`].
    pub v: u32,
    /// The entries listed are every entry with a larger sequence number than this, up to the
    /// last one listed (all the way to `head` unless `more`). Larger than the number asked for
    /// when the entries in between were pruned.
    pub after: u64,
    /// The entries, oldest first, with no gaps.
    pub entries: Vec<Entry>,
    /// Whether more entries follow the last one listed (ask again from it).
    pub more: bool,
    /// The newest sequence number.
    pub head: u64,
    /// Origin's newest watermark, if it ever sent one.
    pub watermark: Option<UnixMillis>,
    /// When the ledger answered (its clock).
    pub served_at: UnixMillis,
    /// How long entries are kept before they are pruned.
    pub retention_ms: u64,
    /// A random number the ledger drew when it was created: a new one means another ledger (a
    /// wiped or replaced object), whose sequence numbers say nothing about the old one's.
    #[serde(default)]
    pub epoch: u64,
}

impl Tail {
    /// Parses a tail answer.
    pub fn parse(body: &[u8]) -> Result<Self, LedgerError> {
        parse_versioned(body)
    }

    /// Serialises the answer.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The canonical string an append is signed over: a domain tag, the timestamp and the exact
/// body bytes (the tag keeps a usage batch's signature from being replayed here).
pub fn append_message(timestamp: UnixMillis, body: &[u8]) -> Vec<u8> {
    let mut message = format!("latchkey-ledger-v1\n{}\n", timestamp.0).into_bytes();
    message.extend_from_slice(body);
    message
}

/// Whether `name` is a KV entry name of this build's scheme: `k1:` and 64 lowercase hex digits.
pub fn is_entry_name(name: &str) -> bool {
    name.strip_prefix("k1:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn parse_versioned<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, LedgerError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let Version { v } =
        serde_json::from_slice(body).map_err(|e| LedgerError::Shape(e.to_string()))?;
    if v != LEDGER_VERSION {
        return Err(LedgerError::Version(v));
    }
    serde_json::from_slice(body).map_err(|e| LedgerError::Shape(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(c: char) -> String {
        format!("k1:{}", c.to_string().repeat(64))
    }

    #[test]
    fn entry_names_follow_the_kv_scheme() {
        let cases = [
            (name('a'), true),
            (name('0'), true),
            (name('A'), false),
            (name('g'), false),
            (format!("k2:{}", "a".repeat(64)), false),
            (format!("k1:{}", "a".repeat(63)), false),
            (format!("k1:{}", "a".repeat(65)), false),
            (String::new(), false),
        ];
        for (name, expected) in cases {
            assert_eq!(is_entry_name(&name), expected, "{name:?}");
        }
    }

    #[test]
    fn appends_are_checked() {
        let record = r#"{"v":1,"id":"key_0123456789abcdefABCD","subject":"p","scopes":[],"revoked":false,"revoked_at":null,"expires_at":null,"revision":1}"#;
        let body = |v: u32, name: &str| {
            format!(
                r#"{{"v":{v},"changes":[{{"name":"{name}","record":{record}}}],"future":true}}"#
            )
        };
        let ok = AppendBatch::parse(body(1, &name('b')).as_bytes()).expect("valid");
        assert_eq!(ok.changes.len(), 1);
        assert_eq!(ok.watermark, None);
        assert_eq!(
            AppendBatch::parse(body(2, &name('b')).as_bytes()),
            Err(LedgerError::Version(2))
        );
        assert_eq!(
            AppendBatch::parse(body(1, "k1:nothex").as_bytes()),
            Err(LedgerError::Name(0))
        );
        assert!(matches!(
            AppendBatch::parse(b"[]"),
            Err(LedgerError::Shape(_))
        ));
        // A record this build cannot read (a newer version) refuses the whole batch; a record
        // field it does not know is ignored (`record.rs`, "Versions").
        let newer = body(1, &name('b')).replace(r#""record":{"v":1"#, r#""record":{"v":99"#);
        assert!(matches!(
            AppendBatch::parse(newer.as_bytes()),
            Err(LedgerError::Shape(e)) if e.contains("record version 99")
        ));
        let informed =
            body(1, &name('b')).replace(r#""revision":1}"#, r#""revision":1,"note":"x"}"#);
        assert_eq!(AppendBatch::parse(informed.as_bytes()), Ok(ok.clone()));
        let many = AppendBatch::new(vec![ok.changes[0].clone(); APPEND_MAX_CHANGES + 1], None);
        let many = serde_json::to_vec(&many).expect("serialises");
        assert_eq!(AppendBatch::parse(&many), Err(LedgerError::TooMany));
    }

    #[test]
    fn a_tail_holding_a_record_this_build_cannot_read_is_refused_whole() {
        let tail = |v: u32| {
            format!(
                r#"{{"v":1,"after":0,"entries":[{{"seq":1,"at":5,"name":"{}","record":{{"v":{v},"id":"key_0123456789abcdefABCD","subject":"p","scopes":[],"revoked":false,"revoked_at":null,"expires_at":null,"revision":1,"disabled":true}}}}],"more":false,"head":1,"watermark":null,"served_at":6,"retention_ms":600000}}"#,
                name('c')
            )
        };
        let read = Tail::parse(tail(2).as_bytes()).expect("this build reads version 2");
        assert!(read.entries[0].record.disabled);
        assert!(matches!(
            Tail::parse(tail(crate::RECORD_VERSION + 1).as_bytes()),
            Err(LedgerError::Shape(_))
        ));
    }

    #[test]
    fn appends_must_be_signed_after_the_last_accepted_one() {
        // (signed at, last accepted, admitted)
        let cases = [
            (1000, None, true),
            (1001, Some(1000), true),
            (i64::MAX, Some(1000), true),
            // A late copy of an append signed before one the ledger took.
            (1000, Some(1000), false),
            (999, Some(1000), false),
            (i64::MIN, Some(i64::MIN), false),
        ];
        for (signed_at, last, admitted) in cases {
            let got = admit_append(UnixMillis(signed_at), last.map(UnixMillis));
            assert_eq!(got.is_ok(), admitted, "{signed_at} after {last:?}");
            if let (
                Err(AppendRefusal::Superseded {
                    signed_at: s,
                    last_accepted,
                }),
                Some(l),
            ) = (got, last)
            {
                assert_eq!((s, last_accepted), (signed_at, l));
            }
        }
        let message = admit_append(UnixMillis(5), Some(UnixMillis(7)))
            .expect_err("late")
            .to_string();
        assert!(
            message.contains("superseded") && message.contains("signed at 5"),
            "{message}"
        );
    }

    #[test]
    fn a_key_s_revision_never_goes_back_in_the_ledger() {
        let change = |c: char, revision: u64| {
            let record = format!(
                r#"{{"v":1,"id":"key_0123456789abcdefABCD","subject":"p","scopes":[],"revoked":false,"revoked_at":null,"expires_at":null,"revision":{revision}}}"#
            );
            Change {
                name: name(c),
                record: KeyRecord::from_json(record.as_bytes()).expect("record"),
            }
        };
        // (the ledger's highest revisions, the batch, expected appended, expected superseded),
        // as (key, revision) pairs.
        type Case = (
            &'static [(char, u64)],
            &'static [(char, u64)],
            &'static [(char, u64)],
            &'static [(char, u64)],
        );
        let cases: &[Case] = &[
            // Nothing known: everything goes in.
            (&[], &[('a', 1), ('b', 1)], &[('a', 1), ('b', 1)], &[]),
            // Newer and equal (a refresh of the same state) go in; older stays out.
            (&[('a', 5)], &[('a', 6)], &[('a', 6)], &[]),
            (&[('a', 5)], &[('a', 5)], &[('a', 5)], &[]),
            (&[('a', 6)], &[('a', 5)], &[], &[('a', 5)]),
            // Only the older key of a batch is left out.
            (
                &[('a', 6), ('b', 1)],
                &[('a', 5), ('b', 2)],
                &[('b', 2)],
                &[('a', 5)],
            ),
            // Within one batch too: a later change of the same key may not go back.
            (&[], &[('a', 6), ('a', 5)], &[('a', 6)], &[('a', 5)]),
            (&[], &[('a', 5), ('a', 6)], &[('a', 5), ('a', 6)], &[]),
            // The extremes.
            (&[('a', u64::MAX)], &[('a', 0)], &[], &[('a', 0)]),
            (&[('a', 0)], &[('a', u64::MAX)], &[('a', u64::MAX)], &[]),
        ];
        for (known, batch, appended, superseded) in cases {
            let changes: Vec<Change> = batch.iter().map(|&(c, r)| change(c, r)).collect();
            let admitted = admit_changes(&changes, |n| {
                known
                    .iter()
                    .find(|(c, _)| name(*c) == n)
                    .map(|&(_, revision)| revision)
            });
            let pairs = |list: &[&Change]| -> Vec<(String, u64)> {
                list.iter()
                    .map(|c| (c.name.clone(), c.record.revision))
                    .collect()
            };
            let want = |list: &[(char, u64)]| -> Vec<(String, u64)> {
                list.iter().map(|&(c, r)| (name(c), r)).collect()
            };
            assert_eq!(
                pairs(&admitted.append),
                want(appended),
                "{known:?} {batch:?}"
            );
            assert_eq!(
                pairs(&admitted.superseded),
                want(superseded),
                "{known:?} {batch:?}"
            );
        }
    }

    #[test]
    fn an_older_answer_without_the_superseded_count_still_reads() {
        let answer: AppendAnswer =
            serde_json::from_str(r#"{"v":1,"appended":2,"head":9}"#).expect("reads");
        assert_eq!(answer.superseded, 0);
    }

    #[test]
    fn the_signed_message_is_domain_separated() {
        let m = append_message(UnixMillis(7), b"{}");
        assert_eq!(m, b"latchkey-ledger-v1\n7\n{}");
        assert_ne!(m, crate::sign::usage_message(UnixMillis(7), b"{}"));
    }
}
