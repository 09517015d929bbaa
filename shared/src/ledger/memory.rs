//! An isolate's memory of key records, kept complete by the ledger (sans-IO: the edge does the
//! fetching and calls these methods with what it got).
//!
//! Two maps, both by KV entry name:
//! * **ledger entries** (`pinned`): the newest record of every key the ledger listed within its
//!   retention window. They are never evicted for space, because KV may still serve an older
//!   value for these keys; past the retention window they move to the hot cache. Too many of
//!   them (`ledger_max_keys`) and memory gives up (see below).
//! * **the hot cache**: records (or their absence) read from KV, bounded by `hot_max_keys`
//!   (least recently used out first) and `hot_ttl_ms`.
//!
//! **Invariant: memory answers only while the ledger proves it complete** ([`Memory::trusted`]):
//! a sync that reached the ledger's head is at most `sync_max_age_ms` old, and origin's
//! watermark is at most `watermark_max_age_ms` old. Otherwise [`Memory::recall`] says
//! [`Recall::Untrusted`] and the caller reads KV per request, still letting no KV value older
//! (by `revision`) than a ledger entry of the same key win ([`Memory::merge`]), and keeping none
//! of it: never worse than KV alone.
//!
//! The hot cache survives a short lapse of trust as long as the ledger was read without a break
//! (every entry applied evicts that key's hot record), and is dropped whenever the cursor is
//! lost (a gap: entries pruned before this isolate read them; a new ledger; too many entries)
//! and when trust comes back after a lapse longer than [`LONG_LAPSE_MS`] (origin may have run
//! without feeding the ledger meanwhile).
//!
//! **Clocks** ([`clock`]): the ledger's answer time and origin's watermark come from other
//! clocks than the isolate's, and any of them can step. Memory is distrusted while they disagree
//! and trusted again on the first answer after they agree:
//! * a time more than [`clock::TOLERANCE_MS`] ahead of the isolate's clock proves nothing: an
//!   answer served "from the future" still has its entries applied (they are facts, and the
//!   floor over KV needs them), but it does not make memory fresh, and a watermark from the
//!   future is refused, then and whenever the ledger repeats it;
//! * the newest answer time and watermark are running maxima that keep no time from the
//!   future, so they never block later, correct times; each counts from when it arrived at the
//!   latest, so a clock slightly ahead lengthens no trust window;
//! * every other time memory keeps (a sync in flight, a backoff, the last poll, a record read
//!   from KV, the last time it was trusted) is judged by its age on the isolate's clock, and a
//!   time the clock has since gone back past has no age: it blocks no poll, keeps no KV record,
//!   and counts as a long lapse;
//! * answers are ordered by the ledger's clock: one served before the newest complete answer
//!   applied, or in the same millisecond with a lower head (a shared copy made just before an
//!   append), is an older copy and is ignored. A lower head served later, or when the two times
//!   cannot be compared (a clock stepped), is a rewound ledger: memory starts over (fail safe).
//!
//! ```
//! use latchkey_shared::ledger::memory::{Memory, Recall, Settings};
//! use latchkey_shared::ledger::{Tail, LEDGER_VERSION};
//! use latchkey_shared::UnixMillis;
//!
//! let mut memory = Memory::new(Settings::default());
//! let now = UnixMillis(1_000_000);
//! let name = format!("k1:{}", "a".repeat(64));
//! assert!(matches!(memory.recall(&name, now), Recall::Untrusted));
//! // The first sync asks for everything the ledger keeps, and here it holds nothing.
//! let after = memory.start_sync(now).expect("due");
//! assert_eq!(after, 0);
//! let tail = Tail {
//!     v: LEDGER_VERSION, after: 0, entries: vec![], more: false, head: 0,
//!     watermark: Some(now), served_at: now, retention_ms: 600_000, epoch: 1,
//! };
//! memory.apply(&tail, now).expect("applies");
//! assert!(memory.trusted(now));
//! // Trusted, but this key was never read: read KV once, then memory answers.
//! assert!(matches!(memory.recall(&name, now), Recall::Unknown));
//! memory.remember(&name, None, now);
//! assert!(matches!(memory.recall(&name, now), Recall::Known(None)));
//! ```

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use hashlink::LruCache;

use super::Tail;
use crate::record::{KeyRecord, UnixMillis};

pub mod clock;

use clock::Newest;

/// How memory is bounded and when it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How often the ledger is polled (`LEDGER_POLL_MS`).
    pub poll_ms: i64,
    /// The newest complete sync may be at most this old (`LEDGER_MAX_AGE_MS`).
    pub sync_max_age_ms: i64,
    /// Origin's watermark may be at most this old (`WATERMARK_MAX_AGE_MS`).
    pub watermark_max_age_ms: i64,
    /// Most records read from KV kept (`MEMORY_MAX_KEYS`).
    pub hot_max_keys: usize,
    /// How long a record read from KV is kept (`MEMORY_TTL_MS`).
    pub hot_ttl_ms: i64,
    /// Most ledger entries kept (`LEDGER_MAX_KEYS`); beyond it memory is not trusted.
    pub ledger_max_keys: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            poll_ms: 1000,
            sync_max_age_ms: 2000,
            watermark_max_age_ms: 3000,
            hot_max_keys: 10_000,
            hot_ttl_ms: 300_000,
            ledger_max_keys: 50_000,
        }
    }
}

/// A sync that has not answered after this long is taken as lost (its request ended without
/// reporting back), so another may start.
const IN_FLIGHT_MAX_MS: i64 = 10_000;

/// The longest wait after failed syncs.
const BACKOFF_MAX_MS: i64 = 30_000;

/// A lapse of trust longer than this drops the hot cache when trust comes back.
pub const LONG_LAPSE_MS: i64 = 60_000;

/// After too many ledger entries, how many poll intervals to wait (at first) before loading
/// again; it doubles with each overflow in a row, up to [`BACKOFF_MAX_MS`].
const OVERFLOW_PAUSE_POLLS: i64 = 10;

/// What memory knows of one key.
#[derive(Debug)]
pub enum Recall {
    /// Memory is trusted and knows the key's state (`None`: there is no such key).
    Known(Option<Rc<KeyRecord>>),
    /// Memory is trusted but does not hold this key: read KV, then [`Memory::remember`].
    Unknown,
    /// Memory cannot be trusted now: read KV, then [`Memory::merge`].
    Untrusted,
}

/// Why a ledger answer was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The answer starts after this isolate's cursor: the entries in between were pruned (or,
    /// for a shared answer, are older than it covers). Memory starts over from the ledger's start.
    #[error("the ledger no longer holds every entry after {cursor} (it starts after {after})")]
    Gap {
        /// This isolate's cursor.
        cursor: u64,
        /// Where the answer starts.
        after: u64,
    },
    /// The ledger's head is behind the cursor: it was wiped or replaced. Memory starts over.
    #[error("the ledger's head {head} is behind this isolate's cursor {cursor}")]
    Rewound {
        /// The ledger's head.
        head: u64,
        /// This isolate's cursor.
        cursor: u64,
    },
    /// Entries out of order or missing in the middle: not a ledger answer to trust.
    #[error("the ledger answer is not contiguous")]
    Malformed,
    /// More ledger entries than `ledger_max_keys`: memory gives up for a while.
    #[error("the ledger holds more keys than this isolate may keep")]
    Overflow,
}

#[derive(Debug)]
struct Pinned {
    record: Rc<KeyRecord>,
    seq: u64,
}

#[derive(Debug)]
struct Hot {
    record: Option<Rc<KeyRecord>>,
    fetched_at: UnixMillis,
}

/// Syncs wait `ms` from `from` (after failures, or an overflow).
#[derive(Debug, Clone, Copy)]
struct Pause {
    from: UnixMillis,
    ms: i64,
}

/// Counters, for debug headers and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Syncs started.
    pub syncs: u64,
    /// Syncs that failed.
    pub failures: u64,
    /// Times memory stopped being trusted and dropped its hot cache.
    pub trust_lost: u64,
    /// Ledger entries held.
    pub ledger_keys: usize,
    /// Records (or absences) read from KV held.
    pub hot_keys: usize,
}

/// One isolate's memory (see the module docs).
#[derive(Debug)]
pub struct Memory {
    settings: Settings,
    /// The last ledger sequence number applied; `None` until the first answer since a start over.
    cursor: Option<u64>,
    /// Whether the last applied answer reached the ledger's head.
    caught_up: bool,
    /// The ledger's clock when it last answered up to its head (orders answers), counted from
    /// when that answer arrived at the latest (its age).
    synced: Newest,
    /// Origin's newest watermark.
    watermark: Newest,
    retention_ms: i64,
    pinned: HashMap<String, Pinned>,
    /// Ledger entries by age, to move them to the hot cache after the retention window.
    pinned_order: VecDeque<(UnixMillis, u64, String)>,
    hot: LruCache<String, Hot>,
    /// When the sync in flight started.
    in_flight: Option<UnixMillis>,
    last_attempt: Option<UnixMillis>,
    pause: Option<Pause>,
    failures_in_a_row: u32,
    was_trusted: bool,
    /// When memory was last found trusted.
    last_trusted: Option<UnixMillis>,
    /// The ledger's epoch the cursor belongs to.
    epoch: Option<u64>,
    stats: MemoryStats,
}

impl Memory {
    /// Empty memory: untrusted until the first sync reaches the ledger's head.
    pub fn new(settings: Settings) -> Self {
        let hot = LruCache::new(settings.hot_max_keys.max(1));
        Self {
            settings,
            cursor: None,
            caught_up: false,
            synced: Newest::default(),
            watermark: Newest::default(),
            retention_ms: 0,
            pinned: HashMap::new(),
            pinned_order: VecDeque::new(),
            hot,
            in_flight: None,
            last_attempt: None,
            pause: None,
            failures_in_a_row: 0,
            was_trusted: false,
            last_trusted: None,
            epoch: None,
            stats: MemoryStats::default(),
        }
    }

    /// The settings memory was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether memory may answer at `now`: the ledger was read up to its head at most
    /// `sync_max_age_ms` ago, and origin's watermark is at most `watermark_max_age_ms` old, each
    /// counted from when it arrived at the latest; neither may be from the future (more than
    /// [`clock::TOLERANCE_MS`] ahead of `now`: a clock that far off proves nothing).
    pub fn trusted(&self, now: UnixMillis) -> bool {
        self.caught_up
            && self.synced.fresh(self.settings.sync_max_age_ms, now)
            && self
                .watermark
                .fresh(self.settings.watermark_max_age_ms, now)
    }

    /// How old, at `now`, the newest complete sync and origin's newest watermark are (each
    /// counted from when it arrived at the latest; `None`: none, or from the future): what
    /// [`Self::trusted`] holds against `LEDGER_MAX_AGE_MS` and `WATERMARK_MAX_AGE_MS`. For the
    /// edge's debug headers, so tests can check every answer from memory against its bounds.
    pub fn trust_ages(&self, now: UnixMillis) -> (Option<i64>, Option<i64>) {
        (self.synced.age(now), self.watermark.age(now))
    }

    /// What memory knows of `name` at `now`.
    pub fn recall(&mut self, name: &str, now: UnixMillis) -> Recall {
        if !self.check_trust(now) {
            return Recall::Untrusted;
        }
        if let Some(pinned) = self.pinned.get(name) {
            return Recall::Known(Some(pinned.record.clone()));
        }
        let ttl = self.settings.hot_ttl_ms;
        match self.hot.get(name) {
            Some(hot) if clock::age(hot.fetched_at, now).is_some_and(|age| age <= ttl) => {
                Recall::Known(hot.record.clone())
            }
            Some(_) => {
                self.hot.remove(name);
                Recall::Unknown
            }
            None => Recall::Unknown,
        }
    }

    /// The record to decide with, given what KV answered: the ledger's entry for `name` when KV
    /// has none or an older revision, else KV's. Remembers nothing.
    pub fn merge(&self, name: &str, kv: Option<KeyRecord>) -> Option<Rc<KeyRecord>> {
        match (self.pinned.get(name), kv) {
            (Some(pinned), Some(kv)) if kv.revision > pinned.record.revision => Some(Rc::new(kv)),
            (Some(pinned), _) => Some(pinned.record.clone()),
            (None, kv) => kv.map(Rc::new),
        }
    }

    /// Merges a KV answer read at `now` ([`Self::merge`]) and, if memory is still trusted,
    /// keeps it in the hot cache.
    pub fn remember(
        &mut self,
        name: &str,
        kv: Option<KeyRecord>,
        now: UnixMillis,
    ) -> Option<Rc<KeyRecord>> {
        let record = self.merge(name, kv);
        if self.check_trust(now) && !self.pinned.contains_key(name) {
            self.hot.insert(
                name.to_owned(),
                Hot {
                    record: record.clone(),
                    fetched_at: now,
                },
            );
        }
        record
    }

    /// Continues a sync whose last answer was one page of several (`more`): returns the cursor
    /// to read on from, or `None` when caught up or no cursor is held. Marks a sync in flight.
    pub fn resume_sync(&mut self, now: UnixMillis) -> Option<u64> {
        if self.caught_up {
            return None;
        }
        let cursor = self.cursor?;
        self.in_flight = Some(now);
        Some(cursor)
    }

    /// Starts a sync if one is due at `now` and none is in flight: returns the sequence number
    /// to ask the ledger for entries after (0: everything it keeps). The caller must then call
    /// [`Self::apply`] or [`Self::failed`].
    pub fn start_sync(&mut self, now: UnixMillis) -> Option<u64> {
        // A time the clock has since gone back past (no age) blocks nothing.
        let within = |at: UnixMillis, ms: i64| clock::age(at, now).is_some_and(|age| age < ms);
        if self
            .in_flight
            .is_some_and(|started| within(started, IN_FLIGHT_MAX_MS))
        {
            return None;
        }
        if self.pause.is_some_and(|pause| within(pause.from, pause.ms)) {
            return None;
        }
        let due = !self.caught_up
            || self
                .last_attempt
                .is_none_or(|at| !within(at, self.settings.poll_ms));
        if !due {
            return None;
        }
        self.in_flight = Some(now);
        self.last_attempt = Some(now);
        self.stats.syncs += 1;
        Some(self.cursor.unwrap_or(0))
    }

    /// Whether this isolate is caught up, so a shared answer (one covering only recent entries)
    /// may do instead of asking the ledger for entries after the cursor.
    pub fn may_share(&self) -> bool {
        self.caught_up && self.cursor.is_some()
    }

    /// Applies a ledger answer received at `now`. On [`SyncError::Gap`] from a shared answer
    /// the caller should ask the ledger directly; [`Self::apply`] leaves the sync in flight
    /// for that (call [`Self::failed`] to give up).
    pub fn apply(&mut self, tail: &Tail, now: UnixMillis) -> Result<(), SyncError> {
        let result = self.apply_inner(tail, now);
        match &result {
            Ok(()) => {
                self.in_flight = None;
                self.failures_in_a_row = 0;
                self.pause = None;
            }
            Err(SyncError::Gap { .. }) if self.cursor.is_some() => {}
            Err(SyncError::Gap { .. } | SyncError::Rewound { .. }) => {
                self.in_flight = None;
            }
            Err(SyncError::Malformed) => self.failed(now, false),
            Err(SyncError::Overflow) => {
                self.in_flight = None;
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                let exponent = (self.failures_in_a_row - 1).min(8);
                let pause = self
                    .settings
                    .poll_ms
                    .saturating_mul(OVERFLOW_PAUSE_POLLS)
                    .saturating_mul(1 << exponent)
                    .min(BACKOFF_MAX_MS.max(self.settings.poll_ms));
                self.pause = Some(Pause {
                    from: now,
                    ms: pause,
                });
            }
        }
        result
    }

    /// Starts over from the ledger's start after a [`SyncError::Gap`] that a direct answer
    /// confirmed (entries were pruned): ledger entries are kept (they are still true), the
    /// cursor is forgotten, and so is the hot cache (a record read from KV may predate an entry
    /// this isolate never saw).
    pub fn restart(&mut self) {
        self.cursor = None;
        self.caught_up = false;
        self.in_flight = None;
        self.hot.clear();
    }

    /// A sync failed at `now` (the ledger unreachable, or `overloaded`): backs off, doubling
    /// from the poll interval (from five times it when overloaded) up to 30 s.
    pub fn failed(&mut self, now: UnixMillis, overloaded: bool) {
        self.in_flight = None;
        self.stats.failures += 1;
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let base = if overloaded {
            self.settings.poll_ms.saturating_mul(5)
        } else {
            self.settings.poll_ms
        };
        let exponent = (self.failures_in_a_row - 1).min(8);
        let wait = base.saturating_mul(1 << exponent).min(BACKOFF_MAX_MS);
        self.pause = Some(Pause {
            from: now,
            ms: wait,
        });
    }

    /// Counters.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            ledger_keys: self.pinned.len(),
            hot_keys: self.hot.len(),
            ..self.stats
        }
    }

    fn check_trust(&mut self, now: UnixMillis) -> bool {
        let trusted = self.trusted(now);
        if trusted {
            // Back after a long lapse (or a long idle spell, or one whose length cannot be told
            // because the clock went back past its start): start the hot cache afresh.
            if self
                .last_trusted
                .is_some_and(|at| clock::age(at, now).is_none_or(|age| age > LONG_LAPSE_MS))
            {
                self.hot.clear();
            }
            self.last_trusted = Some(now);
        } else if self.was_trusted {
            self.stats.trust_lost += 1;
        }
        self.was_trusted = trusted;
        trusted
    }

    fn apply_inner(&mut self, tail: &Tail, now: UnixMillis) -> Result<(), SyncError> {
        // When this answer was served, by the ledger's clock, against the newest complete answer
        // applied; `None` when there is none, or either time is from the future (a clock
        // stepped: no order can be told).
        let order = self
            .synced
            .seen(now)
            .filter(|_| clock::age(tail.served_at, now).is_some())
            .map(|newest| tail.served_at.cmp(&newest));
        let older = self.cursor.is_some() && order == Some(Ordering::Less);
        if self.epoch.is_some_and(|epoch| epoch != tail.epoch) {
            if older {
                // An older copy from the ledger before the current one: it teaches nothing.
                return Ok(());
            }
            // Another ledger: nothing the old one said counts.
            let cursor = self.cursor.unwrap_or(0);
            self.forget_ledger();
            self.epoch = None;
            return Err(SyncError::Rewound {
                head: tail.head,
                cursor,
            });
        }
        if let Some(cursor) = self.cursor {
            if tail.head < cursor {
                if matches!(order, Some(Ordering::Less | Ordering::Equal)) {
                    // Served before (or in the same millisecond as) the answer the cursor came
                    // from, when the head was lower: an older copy (a shared poll made just
                    // before an append), not a rewound ledger. It teaches nothing.
                    return Ok(());
                }
                // Served later with a lower head, or no order can be told: another ledger (or
                // this one rewound), and nothing it said before counts.
                self.forget_ledger();
                return Err(SyncError::Rewound {
                    head: tail.head,
                    cursor,
                });
            }
            if older && tail.head == cursor {
                // An older answer with nothing new (a shared copy): it teaches nothing. One with
                // a head past the cursor (the ledger's clock went back) still brings entries.
                return Ok(());
            }
            if tail.after > cursor {
                return Err(SyncError::Gap {
                    cursor,
                    after: tail.after,
                });
            }
        }
        let mut cursor = self.cursor.unwrap_or(tail.after);
        for entry in &tail.entries {
            if entry.seq <= cursor {
                continue; // already applied (a shared answer overlaps)
            }
            if cursor.checked_add(1) != Some(entry.seq) {
                return Err(SyncError::Malformed);
            }
            self.pin(entry);
            cursor = entry.seq;
        }
        if !tail.more && cursor != tail.head {
            return Err(SyncError::Malformed);
        }
        self.cursor = Some(cursor);
        self.epoch = Some(tail.epoch);
        self.retention_ms = i64::try_from(tail.retention_ms).unwrap_or(i64::MAX);
        if let Some(watermark) = tail.watermark {
            // Refused if from the future, kept only if newer: see the module docs.
            self.watermark.take(watermark, now);
        }
        self.caught_up = !tail.more;
        if self.caught_up {
            self.synced.take(tail.served_at, now);
        }
        // Entries leave the floor only once they are old by both clocks: a ledger clock ahead
        // never moves them out early.
        self.unpin_older_than(UnixMillis(tail.served_at.0.min(now.0)), now);
        if self.pinned.len() > self.settings.ledger_max_keys {
            // Ledger entries are kept (as a floor for KV values); only trust is given up, and
            // loading waits.
            self.restart();
            return Err(SyncError::Overflow);
        }
        Ok(())
    }

    /// Another ledger, or this one rewound: its cursor, its answers' times and its watermark
    /// count no more (ledger entries stay, as a floor).
    fn forget_ledger(&mut self) {
        self.restart();
        self.watermark.clear();
        self.synced.clear();
    }

    fn pin(&mut self, entry: &super::Entry) {
        let newer = self
            .pinned
            .get(&entry.name)
            .is_none_or(|p| entry.record.revision >= p.record.revision);
        if newer {
            self.hot.remove(&entry.name);
            self.pinned.insert(
                entry.name.clone(),
                Pinned {
                    record: Rc::new(entry.record.clone()),
                    seq: entry.seq,
                },
            );
            self.pinned_order
                .push_back((entry.at, entry.seq, entry.name.clone()));
            // One key changed many times leaves stale places in the order: compact it.
            if self.pinned_order.len() > 2 * self.pinned.len() + 1024 {
                let pinned = &self.pinned;
                self.pinned_order
                    .retain(|(_, seq, name)| pinned.get(name).is_some_and(|p| p.seq == *seq));
            }
        }
    }

    /// Moves ledger entries older than the retention window (by the ledger's clock) to the hot
    /// cache: KV has caught up with them.
    fn unpin_older_than(&mut self, ledger_now: UnixMillis, now: UnixMillis) {
        let horizon = ledger_now.0.saturating_sub(self.retention_ms);
        while let Some((at, seq, _)) = self.pinned_order.front() {
            if at.0 >= horizon {
                break;
            }
            let (seq, name) = (*seq, self.pinned_order.pop_front().map(|e| e.2));
            let Some(name) = name else { break };
            if self.pinned.get(&name).is_some_and(|p| p.seq == seq)
                && let Some(pinned) = self.pinned.remove(&name)
            {
                self.hot.insert(
                    name,
                    Hot {
                        record: Some(pinned.record),
                        fetched_at: now,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Entry, LEDGER_VERSION};
    use crate::{KeyId, ScopePolicy};

    fn name(c: char) -> String {
        format!("k1:{}", c.to_string().repeat(64))
    }

    fn record(revision: u64, revoked: bool) -> KeyRecord {
        KeyRecord {
            v: crate::RECORD_VERSION,
            id: KeyId::parse("key_0123456789abcdefABCD").expect("valid id"),
            subject: "acme".into(),
            scopes: ScopePolicy::default()
                .parse_grants(&["read:orders"])
                .expect("valid"),
            revoked,
            revoked_at: None,
            expires_at: None,
            revision,
            disabled: false,
            allowed_ips: Default::default(),
        }
    }

    fn entry(seq: u64, at: i64, name: &str, record: KeyRecord) -> Entry {
        Entry {
            seq,
            at: UnixMillis(at),
            name: name.to_owned(),
            record,
        }
    }

    fn tail(after: u64, entries: Vec<Entry>, head: u64, at: i64) -> Tail {
        Tail {
            v: LEDGER_VERSION,
            after,
            entries,
            more: false,
            head,
            watermark: Some(UnixMillis(at)),
            served_at: UnixMillis(at),
            retention_ms: 600_000,
            epoch: 7,
        }
    }

    fn synced(at: i64) -> Memory {
        let mut memory = Memory::new(Settings::default());
        assert_eq!(memory.start_sync(UnixMillis(at)), Some(0));
        memory
            .apply(&tail(0, vec![], 0, at), UnixMillis(at))
            .expect("applies");
        memory
    }

    fn known(recall: Recall) -> Option<u64> {
        match recall {
            Recall::Known(record) => record.map(|r| r.revision),
            other => panic!("expected Known, got {other:?}"),
        }
    }

    #[test]
    fn trust_needs_a_complete_fresh_sync_and_a_fresh_watermark() {
        let at = 1_000_000;
        let memory = synced(at);
        // (time of asking, expected)
        let cases = [
            (at, true),
            (at + 2000, true),
            (at + 2001, false),                    // the sync is too old
            (at - clock::TOLERANCE_MS, true),      // the isolate's clock a little behind
            (at - clock::TOLERANCE_MS - 1, false), // a sync from the future: a clock stepped
        ];
        for (now, expected) in cases {
            assert_eq!(memory.trusted(UnixMillis(now)), expected, "{now}");
        }
        // A fresh sync with an old watermark (origin silent) is not enough.
        let mut memory = Memory::new(Settings::default());
        memory.start_sync(UnixMillis(at));
        let mut t = tail(0, vec![], 0, at);
        t.watermark = Some(UnixMillis(at - 3001));
        memory.apply(&t, UnixMillis(at)).expect("applies");
        assert!(!memory.trusted(UnixMillis(at)));
        t.watermark = None;
        assert!(!Memory::new(Settings::default()).trusted(UnixMillis(at)));
        // A partial answer (`more`) is not complete.
        let mut memory = Memory::new(Settings::default());
        memory.start_sync(UnixMillis(at));
        let mut t = tail(0, vec![entry(1, at, &name('a'), record(1, false))], 2, at);
        t.more = true;
        memory.apply(&t, UnixMillis(at)).expect("applies");
        assert!(!memory.trusted(UnixMillis(at)));
    }

    #[test]
    fn ledger_entries_win_over_older_kv_values() {
        let at = 1_000_000;
        let mut memory = synced(at);
        let now = UnixMillis(at + 10);
        memory.start_sync(UnixMillis(at + 1000));
        memory
            .apply(
                &tail(
                    0,
                    vec![entry(1, at, &name('a'), record(2, true))],
                    1,
                    at + 1000,
                ),
                now,
            )
            .expect("applies");
        assert_eq!(known(memory.recall(&name('a'), now)), Some(2));
        // KV still serves revision 1 (stale): the ledger's revision 2 wins; a newer KV wins.
        let cases = [(Some(1), Some(2)), (None, Some(2)), (Some(3), Some(3))];
        for (kv, expected) in cases {
            let merged = memory.merge(&name('a'), kv.map(|r| record(r, false)));
            assert_eq!(merged.map(|r| r.revision), expected, "{kv:?}");
        }
        // A KV read that lands after the ledger entry does not replace it.
        memory.remember(&name('a'), Some(record(1, false)), now);
        assert_eq!(known(memory.recall(&name('a'), now)), Some(2));
    }

    #[test]
    fn kv_answers_are_kept_only_while_trusted_and_for_their_lifetime() {
        let at = 1_000_000;
        let mut memory = synced(at);
        let now = UnixMillis(at + 1);
        assert!(matches!(memory.recall(&name('b'), now), Recall::Unknown));
        memory.remember(&name('b'), Some(record(5, false)), now);
        assert_eq!(known(memory.recall(&name('b'), now)), Some(5));
        // Untrusted (no sync for too long): memory says so, and keeps nothing read meanwhile.
        let late = UnixMillis(at + 10_000);
        assert!(matches!(memory.recall(&name('b'), late), Recall::Untrusted));
        memory.remember(&name('c'), None, late);
        assert_eq!(memory.stats().hot_keys, 1, "only b, from before");
        assert_eq!(memory.stats().trust_lost, 1);
        // A sync that continues from the cursor restores trust, and the hot cache with it; an
        // entry for b in it replaces b's KV record.
        memory.start_sync(late);
        memory
            .apply(
                &tail(
                    0,
                    vec![entry(1, at, &name('b'), record(6, true))],
                    1,
                    late.0,
                ),
                late,
            )
            .expect("applies");
        assert_eq!(known(memory.recall(&name('b'), late)), Some(6));
        // A gap (entries pruned before this isolate read them) drops the hot cache: a KV record
        // in it may predate an entry never seen.
        memory.remember(&name('d'), Some(record(1, false)), late);
        memory.start_sync(UnixMillis(late.0 + 1000));
        let gap = memory.apply(
            &tail(9, vec![], 9, late.0 + 1000),
            UnixMillis(late.0 + 1000),
        );
        assert_eq!(
            gap,
            Err(SyncError::Gap {
                cursor: 1,
                after: 9
            })
        );
        memory.restart();
        assert_eq!(memory.stats().hot_keys, 0);
        assert_eq!(
            memory.stats().ledger_keys,
            1,
            "ledger entries stay, as a floor"
        );
        // Lifetime: with a long trust window, an entry older than hot_ttl_ms is read again.
        let mut memory = Memory::new(Settings {
            hot_ttl_ms: 100,
            ..Settings::default()
        });
        memory.start_sync(UnixMillis(at));
        memory
            .apply(&tail(0, vec![], 0, at), UnixMillis(at))
            .expect("applies");
        memory.remember(&name('b'), None, UnixMillis(at));
        assert_eq!(known(memory.recall(&name('b'), UnixMillis(at + 100))), None);
        assert!(matches!(
            memory.recall(&name('b'), UnixMillis(at + 101)),
            Recall::Unknown
        ));
    }

    #[test]
    fn the_hot_cache_is_bounded() {
        let at = 1_000_000;
        let mut memory = Memory::new(Settings {
            hot_max_keys: 2,
            ..Settings::default()
        });
        memory.start_sync(UnixMillis(at));
        memory
            .apply(&tail(0, vec![], 0, at), UnixMillis(at))
            .expect("applies");
        for c in ['a', 'b', 'c'] {
            memory.remember(&name(c), None, UnixMillis(at));
        }
        assert_eq!(memory.stats().hot_keys, 2);
        assert!(matches!(
            memory.recall(&name('a'), UnixMillis(at)),
            Recall::Unknown
        ));
    }

    #[test]
    fn syncs_are_paced_single_and_back_off() {
        let at = 1_000_000;
        let mut memory = Memory::new(Settings::default());
        assert_eq!(memory.start_sync(UnixMillis(at)), Some(0));
        assert_eq!(memory.start_sync(UnixMillis(at + 5)), None, "one in flight");
        memory
            .apply(&tail(7, vec![], 7, at), UnixMillis(at))
            .expect("applies");
        assert_eq!(memory.start_sync(UnixMillis(at + 999)), None, "not due");
        assert_eq!(memory.start_sync(UnixMillis(at + 1000)), Some(7));
        memory.failed(UnixMillis(at + 1000), false);
        assert_eq!(
            memory.start_sync(UnixMillis(at + 1999)),
            None,
            "backing off"
        );
        assert_eq!(memory.start_sync(UnixMillis(at + 2000)), Some(7));
        memory.failed(UnixMillis(at + 2000), true);
        assert_eq!(
            memory.start_sync(UnixMillis(at + 11_999)),
            None,
            "overloaded"
        );
        assert_eq!(memory.start_sync(UnixMillis(at + 12_000)), Some(7));
        // A sync that never reports back stops blocking after a while.
        assert_eq!(memory.start_sync(UnixMillis(at + 21_999)), None);
        assert_eq!(memory.start_sync(UnixMillis(at + 22_000)), Some(7));
        assert_eq!(memory.stats().syncs, 5);
    }

    #[test]
    fn a_watermark_from_the_future_proves_nothing() {
        let at = 1_000_000;
        let mut memory = Memory::new(Settings::default());
        memory.start_sync(UnixMillis(at));
        let mut t = tail(0, vec![], 0, at);
        t.watermark = Some(UnixMillis(at + 3001));
        memory.apply(&t, UnixMillis(at)).expect("applies");
        assert!(!memory.trusted(UnixMillis(at)));
        // Numbering that starts again after the end of the range is a new ledger, not a
        // successor.
        let mut memory = Memory::new(Settings::default());
        memory.start_sync(UnixMillis(at));
        memory
            .apply(&tail(u64::MAX, vec![], u64::MAX, at), UnixMillis(at))
            .expect("applies");
        memory.start_sync(UnixMillis(at + 1000));
        let wrapped = tail(
            u64::MAX,
            vec![entry(0, at, &name('a'), record(1, false))],
            0,
            at + 1000,
        );
        assert!(memory.apply(&wrapped, UnixMillis(at + 1000)).is_err());
    }

    #[test]
    fn a_new_ledger_or_a_long_lapse_starts_memory_over() {
        let at = 1_000_000;
        let mut memory = synced(at);
        memory.remember(&name('a'), Some(record(1, false)), UnixMillis(at));
        // Another ledger (a new epoch) whose head is past this isolate's cursor.
        memory.start_sync(UnixMillis(at + 1000));
        let mut other = tail(
            0,
            vec![entry(1, at, &name('b'), record(1, false))],
            1,
            at + 1000,
        );
        other.epoch = 8;
        assert!(matches!(
            memory.apply(&other, UnixMillis(at + 1000)),
            Err(SyncError::Rewound { .. })
        ));
        assert_eq!(memory.stats().hot_keys, 0);
        assert!(!memory.trusted(UnixMillis(at + 1000)));
        memory.start_sync(UnixMillis(at + 1001));
        memory
            .apply(&other, UnixMillis(at + 1001))
            .expect("a fresh start");
        assert!(memory.trusted(UnixMillis(at + 1001)));
        // Trust lost for longer than a minute: the hot cache is dropped when it comes back.
        memory.remember(&name('c'), None, UnixMillis(at + 1001));
        let back = at + 1001 + LONG_LAPSE_MS + 5000;
        assert!(matches!(
            memory.recall(&name('c'), UnixMillis(at + 5000)),
            Recall::Untrusted
        ));
        memory.start_sync(UnixMillis(back));
        let mut t = tail(1, vec![], 1, back);
        t.epoch = 8;
        memory.apply(&t, UnixMillis(back)).expect("applies");
        assert!(matches!(
            memory.recall(&name('c'), UnixMillis(back)),
            Recall::Unknown
        ));
    }

    #[test]
    fn a_long_backlog_is_read_page_by_page() {
        let at = 1_000_000;
        let mut memory = Memory::new(Settings::default());
        assert_eq!(memory.resume_sync(UnixMillis(at)), None, "nothing started");
        memory.start_sync(UnixMillis(at));
        let mut first = tail(0, vec![entry(1, at, &name('a'), record(1, false))], 2, at);
        first.more = true;
        memory.apply(&first, UnixMillis(at)).expect("applies");
        assert!(!memory.trusted(UnixMillis(at)));
        assert_eq!(memory.resume_sync(UnixMillis(at)), Some(1));
        let second = tail(1, vec![entry(2, at, &name('b'), record(1, false))], 2, at);
        memory.apply(&second, UnixMillis(at)).expect("applies");
        assert!(memory.trusted(UnixMillis(at)));
        assert_eq!(memory.resume_sync(UnixMillis(at)), None, "caught up");
    }

    #[test]
    fn gaps_rewinds_and_malformed_answers() {
        let at = 1_000_000;
        // Pruned past the cursor: a gap; the caller restarts from the ledger's start.
        let mut memory = synced(at);
        memory.start_sync(UnixMillis(at + 1000));
        let err = memory.apply(&tail(5, vec![], 9, at + 1000), UnixMillis(at + 1000));
        assert_eq!(
            err,
            Err(SyncError::Gap {
                cursor: 0,
                after: 5
            })
        );
        memory.restart();
        assert_eq!(memory.start_sync(UnixMillis(at + 1001)), Some(0));
        memory
            .apply(&tail(5, vec![], 5, at + 1001), UnixMillis(at + 1001))
            .expect("a fresh start accepts any start");
        // A ledger whose head went back (wiped): start over.
        memory.start_sync(UnixMillis(at + 2001));
        let err = memory.apply(&tail(0, vec![], 2, at + 2001), UnixMillis(at + 2001));
        assert_eq!(err, Err(SyncError::Rewound { head: 2, cursor: 5 }));
        assert_eq!(memory.start_sync(UnixMillis(at + 2002)), Some(0));
        // A hole in the middle, or an answer that stops short of its head.
        let cases = [
            tail(0, vec![entry(2, at, &name('a'), record(1, false))], 2, at),
            tail(0, vec![entry(1, at, &name('a'), record(1, false))], 3, at),
        ];
        for t in cases {
            let mut memory = Memory::new(Settings::default());
            memory.start_sync(UnixMillis(at));
            assert_eq!(memory.apply(&t, UnixMillis(at)), Err(SyncError::Malformed));
            assert!(!memory.trusted(UnixMillis(at)));
        }
    }

    #[test]
    fn overlapping_shared_answers_apply_once() {
        let at = 1_000_000;
        let mut memory = synced(at);
        let e1 = entry(1, at, &name('a'), record(1, false));
        let e2 = entry(2, at, &name('a'), record(2, true));
        memory.start_sync(UnixMillis(at + 1000));
        memory
            .apply(
                &tail(0, vec![e1.clone(), e2.clone()], 2, at + 1000),
                UnixMillis(at + 1000),
            )
            .expect("applies");
        // An older shared answer (cached before the direct one) must not roll the key back
        // nor pass for a wiped ledger.
        memory.start_sync(UnixMillis(at + 2000));
        memory
            .apply(
                &tail(0, vec![e1.clone()], 1, at + 500),
                UnixMillis(at + 2000),
            )
            .expect("ignored");
        assert_eq!(
            known(memory.recall(&name('a'), UnixMillis(at + 2000))),
            Some(2)
        );
        // A newer shared answer overlapping what was applied adds only what is new.
        let e3 = entry(3, at, &name('b'), record(1, false));
        memory.start_sync(UnixMillis(at + 4000));
        memory
            .apply(
                &tail(0, vec![e1, e2, e3], 3, at + 4000),
                UnixMillis(at + 4000),
            )
            .expect("applies");
        assert_eq!(
            known(memory.recall(&name('b'), UnixMillis(at + 4000))),
            Some(1)
        );
        assert_eq!(
            known(memory.recall(&name('a'), UnixMillis(at + 4000))),
            Some(2)
        );
    }

    #[test]
    fn entries_past_retention_move_to_the_hot_cache_and_overflow_gives_up() {
        let at = 1_000_000;
        let mut memory = synced(at);
        memory.start_sync(UnixMillis(at + 1000));
        memory
            .apply(
                &tail(
                    0,
                    vec![entry(1, at, &name('a'), record(1, false))],
                    1,
                    at + 1000,
                ),
                UnixMillis(at + 1000),
            )
            .expect("applies");
        assert_eq!(memory.stats().ledger_keys, 1);
        let later = at + 600_001;
        memory.start_sync(UnixMillis(later));
        memory
            .apply(&tail(1, vec![], 1, later), UnixMillis(later))
            .expect("applies");
        assert_eq!(memory.stats().ledger_keys, 0);
        assert_eq!(known(memory.recall(&name('a'), UnixMillis(later))), Some(1));

        let mut memory = Memory::new(Settings {
            ledger_max_keys: 1,
            ..Settings::default()
        });
        memory.start_sync(UnixMillis(at));
        let t = tail(
            0,
            vec![
                entry(1, at, &name('a'), record(1, false)),
                entry(2, at, &name('b'), record(1, false)),
            ],
            2,
            at,
        );
        assert_eq!(memory.apply(&t, UnixMillis(at)), Err(SyncError::Overflow));
        assert!(!memory.trusted(UnixMillis(at)));
        assert_eq!(
            memory.stats().ledger_keys,
            2,
            "kept as a floor for KV values"
        );
        assert_eq!(memory.start_sync(UnixMillis(at + 9_999)), None, "paused");
        assert_eq!(memory.start_sync(UnixMillis(at + 10_000)), Some(0));
        // Again: the pause doubles.
        assert_eq!(
            memory.apply(&t, UnixMillis(at + 10_000)),
            Err(SyncError::Overflow)
        );
        assert_eq!(memory.start_sync(UnixMillis(at + 29_999)), None);
        assert_eq!(memory.start_sync(UnixMillis(at + 30_000)), Some(0));
    }

    /// One step of a clock scenario: the isolate's clock; the answer of a poll then, if any
    /// (the ledger object's clock when it served it, origin's watermark in it, whether it
    /// carries a new revocation of key `a`); and whether memory is trusted after it.
    struct Poll {
        now: i64,
        answer: Option<(i64, i64)>,
        revokes: bool,
        trusted: bool,
    }

    const fn poll(now: i64, served_at: i64, watermark: i64, trusted: bool) -> Poll {
        Poll {
            now,
            answer: Some((served_at, watermark)),
            revokes: false,
            trusted,
        }
    }

    /// No poll: only whether memory is trusted at `now`.
    const fn check(now: i64, trusted: bool) -> Poll {
        Poll {
            now,
            answer: None,
            revokes: false,
            trusted,
        }
    }

    const fn revoking(poll: Poll) -> Poll {
        Poll {
            revokes: true,
            ..poll
        }
    }

    /// Runs `polls` on fresh memory: each poll must be due and applied, and each step leave
    /// memory trusted or not as it says. Returns the memory and the last revision appended for
    /// key `a`.
    fn run(what: &str, polls: &[Poll]) -> (Memory, u64) {
        let mut memory = Memory::new(Settings::default());
        let (mut head, mut revision) = (0, 1);
        for (i, p) in polls.iter().enumerate() {
            let Some((served_at, watermark)) = p.answer else {
                assert_eq!(
                    memory.trusted(UnixMillis(p.now)),
                    p.trusted,
                    "{what}, step {i}: trusted"
                );
                continue;
            };
            assert!(
                memory.start_sync(UnixMillis(p.now)).is_some(),
                "{what}, step {i}: a poll is due (a second or more since the last, or a clock stepped)"
            );
            let mut entries = vec![];
            if p.revokes {
                revision += 1;
                entries.push(entry(
                    head + 1,
                    served_at,
                    &name('a'),
                    record(revision, true),
                ));
            }
            let mut t = tail(head, entries, head + u64::from(p.revokes), served_at);
            t.watermark = Some(UnixMillis(watermark));
            head = t.head;
            memory
                .apply(&t, UnixMillis(p.now))
                .unwrap_or_else(|e| panic!("{what}, step {i}: {e}"));
            assert_eq!(
                memory.trusted(UnixMillis(p.now)),
                p.trusted,
                "{what}, step {i}: trusted"
            );
        }
        (memory, revision)
    }

    #[test]
    fn a_clock_step_is_distrusted_while_it_lasts_and_forgotten_once_clocks_agree() {
        const STEP: i64 = 3_600_000;
        let at = 1_000_000_000;
        let cases: [(&str, Vec<Poll>); 6] = [
            (
                "the ledger object's clock steps forward, then back",
                vec![
                    poll(at, at, at, true),
                    // Still fresh from the first poll, but this answer proves nothing new.
                    poll(at + 1000, at + 1000 + STEP, at + 1000, true),
                    // Its entries still count: a revocation served from the future is applied.
                    revoking(poll(at + 3000, at + 3000 + STEP, at + 3000, false)),
                    revoking(poll(at + 4000, at + 4000, at + 4000, true)),
                ],
            ),
            (
                "the isolate's clock steps forward, then back",
                vec![
                    poll(at, at, at, true),
                    poll(at + 1000 + STEP, at + 1000, at + 1000, false),
                    revoking(poll(at + 2000, at + 2000, at + 2000, true)),
                ],
            ),
            (
                "both clocks step forward (one machine), then back",
                vec![
                    poll(at, at, at, true),
                    poll(at + 1000 + STEP, at + 1000 + STEP, at + 1000 + STEP, true),
                    revoking(poll(at + 2000, at + 2000, at + 2000, true)),
                ],
            ),
            (
                "the isolate's clock steps back, then forward",
                vec![
                    poll(at, at, at, true),
                    poll(at + 1000 - STEP, at + 1000, at + 1000, false),
                    revoking(poll(at + 2000, at + 2000, at + 2000, true)),
                ],
            ),
            (
                "the ledger object's clock steps back, then forward",
                vec![
                    poll(at, at, at, true),
                    // The object's watermark stays where it was (it only moves forward).
                    poll(at + 1000, at + 1000 - STEP, at, true),
                    // Older by the object's clock, but past the cursor: its entries count.
                    revoking(poll(at + 3000, at + 3000 - STEP, at, false)),
                    revoking(poll(at + 4000, at + 4000, at + 4000, true)),
                ],
            ),
            (
                "both clocks step back (one machine), then forward",
                vec![
                    poll(at, at, at, true),
                    poll(at + 1000 - STEP, at + 1000 - STEP, at + 1000 - STEP, true),
                    revoking(poll(at + 2000, at + 2000, at + 2000, true)),
                ],
            ),
        ];
        for (what, polls) in cases {
            let (mut memory, revision) = run(what, &polls);
            // Every revocation reached memory: it beats KV's stale valid record, and memory
            // answers it.
            let merged = memory.merge(&name('a'), Some(record(1, false)));
            assert_eq!(
                merged.map(|r| (r.revision, r.revoked)),
                Some((revision, true)),
                "{what}: the floor over KV"
            );
            let last = polls.last().map_or(at, |p| p.now);
            assert_eq!(
                known(memory.recall(&name('a'), UnixMillis(last))),
                Some(revision),
                "{what}: memory answers the revocation"
            );
        }
    }

    #[test]
    fn a_watermark_from_the_future_is_neither_fresh_nor_kept() {
        let at = 1_000_000_000;
        let cases: [(&str, Vec<Poll>); 5] = [
            (
                "an hour ahead, then origin's right watermarks",
                vec![
                    poll(at, at, at + 3_600_000, false),
                    poll(at + 1000, at + 1000, at + 1000, true),
                ],
            ),
            (
                // The ledger keeps repeating it while origin is silent: it never vouches for
                // anything, not even once real time has caught up with it.
                "ten seconds ahead, then origin silent",
                vec![
                    poll(at, at, at + 10_000, false),
                    poll(at + 2000, at + 2000, at + 10_000, false),
                    poll(at + 4000, at + 4000, at + 10_000, false),
                    poll(at + 6000, at + 6000, at + 10_000, false),
                    poll(at + 8000, at + 8000, at + 10_000, false),
                    poll(at + 9500, at + 9500, at + 10_000, false),
                    poll(at + 12_000, at + 12_000, at + 10_000, false),
                ],
            ),
            (
                "2.5 s ahead: inside the trust window, beyond the tolerance",
                vec![
                    poll(at, at, at + 2500, false),
                    poll(at + 1000, at + 1000, at + 1000, true),
                ],
            ),
            (
                // Within the tolerance: counted from when it arrived, so it lengthens nothing.
                "half a second ahead, then origin silent",
                vec![
                    poll(at, at, at + 500, true),
                    poll(at + 1500, at + 1500, at + 500, true),
                    check(at + 3000, true),
                    check(at + 3001, false),
                ],
            ),
            (
                "an older watermark after a newer one (an older copy) changes nothing",
                vec![
                    poll(at, at, at, true),
                    poll(at + 1500, at + 1500, at - 5000, true),
                    check(at + 3000, true),
                    check(at + 3001, false),
                ],
            ),
        ];
        for (what, polls) in cases {
            run(what, &polls);
        }
    }

    #[test]
    fn a_lower_head_in_the_same_millisecond_is_an_older_copy_not_a_rewind() {
        let at = 1_000_000;
        // (what, the second answer's clock, its epoch, expected)
        let cases = [
            (
                "same millisecond: a copy from before an append",
                at + 1000,
                7,
                Ok(()),
            ),
            ("an earlier millisecond: an older copy", at + 999, 7, Ok(())),
            (
                "a later millisecond: the ledger went back",
                at + 1001,
                7,
                Err(SyncError::Rewound { head: 1, cursor: 2 }),
            ),
            (
                "same millisecond, another ledger",
                at + 1000,
                8,
                Err(SyncError::Rewound { head: 1, cursor: 2 }),
            ),
        ];
        for (what, served_at, epoch, expected) in cases {
            let mut memory = synced(at);
            memory.remember(&name('h'), Some(record(1, false)), UnixMillis(at));
            let e1 = entry(1, at, &name('a'), record(1, false));
            let e2 = entry(2, at + 1000, &name('a'), record(2, true));
            let now = UnixMillis(at + 1000);
            memory.start_sync(now);
            memory
                .apply(&tail(0, vec![e1.clone(), e2], 2, at + 1000), now)
                .expect("the direct answer");
            let mut copy = tail(0, vec![e1], 1, served_at);
            copy.epoch = epoch;
            let later = UnixMillis(at + 1500);
            memory.start_sync(later);
            assert_eq!(memory.apply(&copy, later), expected, "{what}");
            let kept = expected.is_ok();
            assert_eq!(memory.trusted(later), kept, "{what}: trust");
            assert_eq!(
                memory.stats().hot_keys,
                usize::from(kept),
                "{what}: hot cache"
            );
            if kept {
                assert_eq!(known(memory.recall(&name('a'), later)), Some(2), "{what}");
                assert_eq!(memory.start_sync(UnixMillis(at + 2500)), Some(2), "{what}");
            }
        }
    }

    #[test]
    fn times_from_before_a_clock_step_back_prove_nothing_and_block_nothing() {
        const STEP: i64 = 3_600_000;
        let at = 1_000_000_000;
        // A record read from KV before both clocks stepped back an hour: its age cannot be
        // told, so it is read again.
        let mut memory = synced(at);
        memory.remember(&name('b'), Some(record(1, false)), UnixMillis(at));
        let back = at + 1000 - STEP;
        memory.start_sync(UnixMillis(back));
        memory
            .apply(&tail(0, vec![], 0, back), UnixMillis(back))
            .expect("applies");
        assert!(memory.trusted(UnixMillis(back)));
        assert!(matches!(
            memory.recall(&name('b'), UnixMillis(back)),
            Recall::Unknown
        ));
        // A sync started while the isolate's clock was an hour ahead, that never reported
        // back, does not block the next one once the clock is right.
        let mut memory = synced(at);
        assert!(memory.start_sync(UnixMillis(at + STEP)).is_some());
        assert!(memory.start_sync(UnixMillis(at + 1000)).is_some());
        // Nor does a backoff begun then.
        let mut memory = synced(at);
        assert!(memory.start_sync(UnixMillis(at + STEP)).is_some());
        memory.failed(UnixMillis(at + STEP), true);
        assert!(memory.start_sync(UnixMillis(at + 1000)).is_some());
    }
}
