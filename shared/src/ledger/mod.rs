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
    fn the_signed_message_is_domain_separated() {
        let m = append_message(UnixMillis(7), b"{}");
        assert_eq!(m, b"latchkey-ledger-v1\n7\n{}");
        assert_ne!(m, crate::sign::usage_message(UnixMillis(7), b"{}"));
    }
}
