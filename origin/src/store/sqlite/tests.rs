//! The SQLite store against a real database file.

#![allow(clippy::expect_used, reason = "test code")]

use super::open::OnDisk;
use super::*;
use latchkey_shared::ip::IpAllowlist;

/// The README promises that an acknowledged write survives a power cut; that holds only with
/// WAL and `synchronous=FULL` on the writer. Read both back from a real store's writer.
#[tokio::test]
async fn the_writer_runs_in_wal_mode_with_synchronous_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = SqliteStore::open(&url, None).await.expect("open");
    let durability = store.pragmas().await.expect("pragmas");
    assert_eq!(
        durability,
        Durability {
            journal_mode: "wal".into(),
            synchronous: 2
        }
    );
    assert!(durability.check().is_ok());
    store.close().await;
}

/// A store over a new database file, appending to a keyed audit chain.
async fn open_store(dir: &tempfile::TempDir) -> SqliteStore {
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let key = latchkey_shared::sign::SigningSecret::parse(crate::store::conformance::CHAIN_KEY)
        .expect("secret");
    let chain = Arc::new(AuditChain::new(key, Some(dir.path().join("t.checkpoints"))));
    SqliteStore::open(&url, Some(chain)).await.expect("open")
}

fn new_key(n: u8) -> StoredKey {
    StoredKey {
        name: "k".into(),
        created_at: UnixMillis(1_000),
        updated_at: UnixMillis(1_000),
        ..crate::store::conformance::key(n, "acme")
    }
}

fn event(key: &StoredKey, action: &'static str) -> AuditEvent {
    AuditEvent {
        at: key.updated_at,
        actor: "admin:test".into(),
        action,
        key_id: Some(key.id.clone()),
        details: serde_json::json!({}),
    }
}

/// An immutable open only where it cannot hide a write: on a read-only filesystem, with
/// no WAL frames and no WAL index, everything known.
#[test]
fn immutable_only_with_nothing_to_miss() {
    let safe = OnDisk {
        cannot_open: true,
        database: true,
        wal: Some(None),
        shm: Some(None),
        read_only: true,
    };
    assert!(safe.immutable_is_safe());
    assert!(
        OnDisk {
            wal: Some(Some(0)),
            ..safe
        }
        .immutable_is_safe(),
        "an empty WAL holds nothing"
    );
    for (why, unsafe_) in [
        (
            "WAL frames",
            OnDisk {
                wal: Some(Some(4_152)),
                ..safe
            },
        ),
        ("WAL unknown", OnDisk { wal: None, ..safe }),
        (
            "a WAL index",
            OnDisk {
                shm: Some(Some(32_768)),
                ..safe
            },
        ),
        ("index unknown", OnDisk { shm: None, ..safe }),
        (
            "writable",
            OnDisk {
                read_only: false,
                ..safe
            },
        ),
        (
            "another error",
            OnDisk {
                cannot_open: false,
                ..safe
            },
        ),
        (
            "no database",
            OnDisk {
                database: false,
                ..safe
            },
        ),
    ] {
        assert!(!unsafe_.immutable_is_safe(), "{why}");
    }
}

/// A key with every optional field set, so a column written or read wrongly shows.
fn full_key(n: u8) -> StoredKey {
    let mut fill = |bytes: &mut [u8]| bytes.fill(n.wrapping_add(100));
    StoredKey {
        description: Some("d".into()),
        scopes: serde_json::from_value(serde_json::json!(["write:b", "read:a"])).expect("scopes"),
        claims: serde_json::from_value(serde_json::json!({"tier": "gold"})).expect("claims"),
        created_by: Some("ops".into()),
        expiration: Some(UnixMillis(9_000)),
        revoked: true,
        revoked_at: Some(UnixMillis(1_500)),
        revocation_reason: Some("r".into()),
        last_used_at: Some(UnixMillis(1_200)),
        disabled: true,
        allowed_ips: IpAllowlist::parse(&["10.0.0.0/8".to_owned()]).expect("list"),
        rolled_from: Some(KeyId::generate(&mut fill)),
        rolled_to: Some(KeyId::generate(&mut |b: &mut [u8]| {
            b.fill(n.wrapping_add(200))
        })),
        leaked_at: Some(UnixMillis(1_400)),
        leak_source: Some("https://github.com/o/r/blob/x/f".into()),
        key_type: "partner_key".into(),
        deleted_at: Some(UnixMillis(1_600)),
        ..new_key(n)
    }
}

/// What is inserted is what is read back, through both read paths; an update writes every
/// changeable column and leaves the others (`last_used_at` is the usage flush's).
#[tokio::test]
async fn every_field_is_stored_and_read_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let key = full_key(1);
    store
        .insert(&key, &event(&key, "create"))
        .await
        .expect("insert");
    assert_eq!(store.get(&key.id).await.expect("get"), Some(key.clone()));
    assert_eq!(
        store.find_by_hash(&key.hash).await.expect("find"),
        Some(key.clone())
    );
    // Every field differs from what is stored, the ones an update must not touch too.
    let changed = StoredKey {
        id: key.id.clone(),
        hash: KeyHash::from_bytes([9; 32]),
        hint: "sk_test_...zzzz".into(),
        created_at: UnixMillis(5),
        last_used_at: None,
        revision: 2,
        ..new_key(1)
    };
    assert!(
        store
            .replace(&changed, 1, &event(&changed, "update"))
            .await
            .expect("replace")
    );
    let read = store.get(&key.id).await.expect("get").expect("exists");
    assert_eq!(
        read,
        StoredKey {
            hash: key.hash,
            hint: key.hint.clone(),
            created_at: key.created_at,
            last_used_at: key.last_used_at,
            rolled_from: key.rolled_from.clone(),
            created_by: key.created_by.clone(),
            key_type: key.key_type.clone(),
            ..changed
        }
    );
    store.close().await;
}

/// A roll writes the old key's new state, the new key, both audit entries and both outbox
/// rows together, or nothing: not over a stale revision, and not twice for one key (the
/// unique link refuses a second successor, and the old key's update goes with it).
#[tokio::test]
async fn a_roll_commits_both_keys_or_neither() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let old = new_key(1);
    store
        .insert(&old, &event(&old, "create"))
        .await
        .expect("insert");
    let audit_rows = |store: &SqliteStore| {
        let reader = store.reader.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_log")
                .fetch_one(&reader)
                .await
                .expect("count");
            n
        }
    };
    let successor = |n: u8| StoredKey {
        rolled_from: Some(old.id.clone()),
        ..new_key(n)
    };
    let rolled = |to: &StoredKey, revision: i64| StoredKey {
        rolled_to: Some(to.id.clone()),
        revision,
        ..old.clone()
    };

    let stale = successor(2);
    let before = (audit_rows(&store).await, rows(&store).await);
    let written = store
        .roll(
            (&rolled(&stale, 3), 2, &event(&old, "roll")),
            (&stale, &event(&stale, "create")),
        )
        .await
        .expect("roll");
    assert!(!written, "a stale revision writes nothing");
    assert_eq!(store.get(&stale.id).await.expect("get"), None);
    assert_eq!((audit_rows(&store).await, rows(&store).await), before);

    let new = successor(3);
    assert!(
        store
            .roll(
                (&rolled(&new, 2), 1, &event(&old, "roll")),
                (&new, &event(&new, "create")),
            )
            .await
            .expect("roll")
    );
    assert_eq!(
        store
            .get(&old.id)
            .await
            .expect("get")
            .and_then(|k| k.rolled_to),
        Some(new.id.clone())
    );
    assert_eq!(store.get(&new.id).await.expect("get"), Some(new.clone()));
    assert_eq!(audit_rows(&store).await, before.0 + 2);
    assert_eq!(
        rows(&store).await,
        before.1 + 2,
        "both keys queued to publish"
    );

    // Another process's roll of the same key, at the revision it read: refused whole.
    let second = successor(4);
    let before = (audit_rows(&store).await, rows(&store).await);
    let refused = store
        .roll(
            (&rolled(&second, 3), 2, &event(&old, "roll")),
            (&second, &event(&second, "create")),
        )
        .await;
    assert!(refused.is_err(), "a second successor: {refused:?}");
    assert_eq!(store.get(&second.id).await.expect("get"), None);
    let kept = store.get(&old.id).await.expect("get").expect("exists");
    assert_eq!((kept.revision, kept.rolled_to), (2, Some(new.id.clone())));
    assert_eq!((audit_rows(&store).await, rows(&store).await), before);
    store.close().await;
}

/// The policies' queries leave out what was already dealt with: a key warned since its
/// activity, a warning not yet old enough, an expiry already warned of; a new expiry or new
/// activity brings a key back.
#[tokio::test]
async fn policy_queries_leave_out_what_was_dealt_with() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let ids = |keys: Vec<StoredKey>| {
        keys.into_iter()
            .map(|k| k.id.to_string())
            .collect::<Vec<_>>()
    };
    let at = |n: i64| UnixMillis(n);
    let idle = StoredKey {
        updated_at: at(1_000),
        ..new_key(1)
    };
    let used = StoredKey {
        updated_at: at(1_000),
        last_used_at: Some(at(9_000)),
        ..new_key(2)
    };
    let expiring = StoredKey {
        updated_at: at(9_500),
        expiration: Some(at(20_000)),
        ..new_key(3)
    };
    for key in [&idle, &used, &expiring] {
        store
            .insert(key, &event(key, "create"))
            .await
            .expect("insert");
    }
    let unwarned = |idle_before| PolicyQuery::StaleUnwarned {
        idle_before: at(idle_before),
        now: at(10_000),
    };
    assert_eq!(
        ids(store
            .policy_candidates(unwarned(5_000), 10)
            .await
            .expect("query")),
        [idle.id.as_str()]
    );
    let due = |warned_before| PolicyQuery::StaleDue {
        idle_before: at(5_000),
        warned_before,
        now: at(10_000),
    };
    assert_eq!(
        ids(store
            .policy_candidates(due(Some(at(8_000))), 10)
            .await
            .expect("query")),
        [""; 0],
        "not warned yet: not due"
    );
    assert_eq!(
        ids(store.policy_candidates(due(None), 10).await.expect("query")),
        [idle.id.as_str()],
        "no warning needed"
    );
    let warning = AuditEvent {
        at: at(7_000),
        action: "stale_warning",
        ..event(&idle, "stale_warning")
    };
    store.record_event(&warning).await.expect("warn");
    assert_eq!(
        ids(store
            .policy_candidates(unwarned(5_000), 10)
            .await
            .expect("query")),
        [""; 0]
    );
    assert_eq!(
        ids(store
            .policy_candidates(due(Some(at(6_000))), 10)
            .await
            .expect("query")),
        [""; 0],
        "warned too recently"
    );
    assert_eq!(
        ids(store
            .policy_candidates(due(Some(at(8_000))), 10)
            .await
            .expect("query")),
        [idle.id.as_str()]
    );
    // New activity after the warning: a new idle period, to be warned anew.
    let touched = StoredKey {
        updated_at: at(7_500),
        revision: 2,
        ..idle.clone()
    };
    assert!(
        store
            .replace(&touched, 1, &event(&touched, "update"))
            .await
            .expect("replace")
    );
    assert_eq!(
        ids(store
            .policy_candidates(unwarned(8_000), 10)
            .await
            .expect("query")),
        [touched.id.as_str()]
    );

    let expiring_query = PolicyQuery::ExpiringUnwarned {
        now: at(10_000),
        until: at(30_000),
    };
    assert_eq!(
        ids(store
            .policy_candidates(expiring_query, 10)
            .await
            .expect("query")),
        [expiring.id.as_str()]
    );
    let warned = AuditEvent {
        action: "expiry_warning",
        details: serde_json::json!({ "expires_at": 20_000 }),
        ..event(&expiring, "expiry_warning")
    };
    store.record_event(&warned).await.expect("warn");
    assert_eq!(
        ids(store
            .policy_candidates(expiring_query, 10)
            .await
            .expect("query")),
        [""; 0]
    );
    // A rename leaves the expiry warned of; a new expiry is warned of again.
    let renamed = StoredKey {
        name: "renamed".into(),
        revision: 2,
        ..expiring.clone()
    };
    assert!(
        store
            .replace(&renamed, 1, &event(&renamed, "update"))
            .await
            .expect("replace")
    );
    assert_eq!(
        ids(store
            .policy_candidates(expiring_query, 10)
            .await
            .expect("query")),
        [""; 0]
    );
    let moved = StoredKey {
        expiration: Some(at(25_000)),
        revision: 3,
        ..renamed
    };
    assert!(
        store
            .replace(&moved, 2, &event(&moved, "update"))
            .await
            .expect("replace")
    );
    assert_eq!(
        ids(store
            .policy_candidates(expiring_query, 10)
            .await
            .expect("query")),
        [moved.id.as_str()]
    );
    store.close().await;
}

/// Inserts a key, then changes it: two outbox rows for both sinks.
async fn key_with_two_changes(store: &SqliteStore, n: u8) -> StoredKey {
    let key = new_key(n);
    store
        .insert(&key, &event(&key, "create"))
        .await
        .expect("insert");
    let mut revoked = key.clone();
    revoked.revoked = true;
    revoked.revoked_at = Some(UnixMillis(2_000));
    revoked.updated_at = UnixMillis(2_000);
    revoked.revision = 2;
    assert!(
        store
            .replace(&revoked, 1, &event(&revoked, "revoke"))
            .await
            .expect("replace")
    );
    revoked
}

async fn pending(store: &SqliteStore, sink: Sink) -> u64 {
    store.outbox_stats(sink, None).await.expect("stats").pending
}

async fn rows(store: &SqliteStore) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM kv_outbox")
        .fetch_one(&store.reader)
        .await
        .expect("count");
    n
}

/// The last entry of each key in `entries` (what a publisher acknowledges).
fn newest_per_key(entries: &[OutboxEntry]) -> Vec<OutboxEntry> {
    let mut newest: BTreeMap<KeyId, i64> = BTreeMap::new();
    for e in entries {
        newest.insert(e.key_id.clone(), e.seq);
    }
    newest
        .into_iter()
        .map(|(key_id, seq)| OutboxEntry { seq, key_id })
        .collect()
}

/// A key change waits for both sinks; each sink's acknowledgement clears only its own
/// need, in either order, and the rows go only when both took them.
#[tokio::test]
async fn a_change_stays_in_the_outbox_until_both_sinks_took_it() {
    for kv_first in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir).await;
        key_with_two_changes(&store, 1).await;
        assert_eq!(rows(&store).await, 2);
        for sink in [Sink::Kv, Sink::Ledger] {
            assert_eq!(pending(&store, sink).await, 2, "{sink:?}");
        }
        let (first, second) = if kv_first {
            (Sink::Kv, Sink::Ledger)
        } else {
            (Sink::Ledger, Sink::Kv)
        };
        let peeked = store.outbox_peek(first, 100).await.expect("peek");
        assert_eq!(peeked.len(), 2);
        store
            .outbox_ack(first, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(pending(&store, first).await, 0);
        assert!(
            store
                .outbox_peek(first, 100)
                .await
                .expect("peek")
                .is_empty()
        );
        assert_eq!(
            pending(&store, second).await,
            2,
            "the other sink still needs them"
        );
        assert_eq!(rows(&store).await, 2, "kept for the other sink");

        let peeked = store.outbox_peek(second, 100).await.expect("peek");
        assert_eq!(peeked.len(), 2);
        store
            .outbox_ack(second, &newest_per_key(&peeked))
            .await
            .expect("ack");
        assert_eq!(pending(&store, second).await, 0);
        assert_eq!(rows(&store).await, 0, "gone once both sinks took them");
        store.close().await;
    }
}

/// One sink being behind never holds the other back, and an acknowledgement covers only
/// the rows up to its `seq`: a change made after the peek still waits for that sink.
#[tokio::test]
async fn one_sink_down_does_not_hold_the_other_and_later_changes_wait() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let a = key_with_two_changes(&store, 1).await;
    key_with_two_changes(&store, 2).await;
    // KV takes everything, three times over, while the ledger is down.
    for _ in 0..3 {
        let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
        store
            .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
            .await
            .expect("ack");
        let mut next = store.get(&a.id).await.expect("get").expect("exists");
        next.revision += 1;
        next.updated_at = UnixMillis(next.updated_at.0 + 1);
        let expected = next.revision - 1;
        assert!(
            store
                .replace(&next, expected, &event(&next, "update"))
                .await
                .expect("replace")
        );
    }
    assert_eq!(pending(&store, Sink::Kv).await, 1, "only the newest change");
    assert_eq!(
        pending(&store, Sink::Ledger).await,
        7,
        "nothing lost for the ledger"
    );
    // The ledger takes what it peeked; the change made after its peek still waits.
    let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    let mut next = store.get(&a.id).await.expect("get").expect("exists");
    next.revision += 1;
    let expected = next.revision - 1;
    assert!(
        store
            .replace(&next, expected, &event(&next, "update"))
            .await
            .expect("replace")
    );
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(pending(&store, Sink::Ledger).await, 1);
    assert_eq!(pending(&store, Sink::Kv).await, 2);
    assert_eq!(rows(&store).await, 2, "only rows some sink needs");
    let oldest = store.outbox_stats(Sink::Kv, None).await.expect("stats");
    assert!(oldest.oldest_enqueued_at.is_some());
    store.close().await;
}

/// A KV rebuild (`origin sync --full`) is for KV alone: it must not flood the ledger, and
/// its rows go once KV took them. A KV repair (a read-back or reconciliation found KV
/// behind) goes to the ledger too: isolates may have cached the stale KV value.
#[tokio::test]
async fn kv_rebuilds_skip_the_ledger_but_repairs_reach_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let a = key_with_two_changes(&store, 1).await;
    let b = key_with_two_changes(&store, 2).await;
    for sink in [Sink::Kv, Sink::Ledger] {
        let peeked = store.outbox_peek(sink, 100).await.expect("peek");
        store
            .outbox_ack(sink, &newest_per_key(&peeked))
            .await
            .expect("ack");
    }
    assert_eq!(rows(&store).await, 0);
    let (last, seq) = store
        .outbox_enqueue_all(None, 100, UnixMillis(5_000))
        .await
        .expect("enqueue all")
        .expect("keys");
    assert!(last == a.id || last == b.id);
    assert_eq!(pending(&store, Sink::Ledger).await, 0, "a rebuild is KV's");
    store
        .outbox_enqueue(std::slice::from_ref(&a.id), UnixMillis(5_000))
        .await
        .expect("enqueue");
    assert_eq!(pending(&store, Sink::Kv).await, 3);
    assert_eq!(
        store
            .outbox_stats(Sink::Kv, Some(seq))
            .await
            .expect("stats")
            .pending,
        2
    );
    let for_ledger = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    assert_eq!(for_ledger.len(), 1, "the repair, alone");
    assert_eq!(for_ledger[0].key_id, a.id);
    let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
    store
        .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(rows(&store).await, 1, "the repair waits for the ledger");
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&for_ledger))
        .await
        .expect("ack");
    assert_eq!(rows(&store).await, 0);
    store.close().await;
}

/// At start the ledger publisher queues the recent changes again, for the ledger alone.
#[tokio::test]
async fn recent_changes_are_queued_again_for_the_ledger_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let a = key_with_two_changes(&store, 1).await; // last changed at 2,000
    for sink in [Sink::Kv, Sink::Ledger] {
        let peeked = store.outbox_peek(sink, 100).await.expect("peek");
        store
            .outbox_ack(sink, &newest_per_key(&peeked))
            .await
            .expect("ack");
    }
    // (changed since, keys queued): a key already waiting for the ledger is not queued twice
    for (since, queued) in [(2_001, 0), (2_000, 1), (0, 0)] {
        let n = store
            .outbox_enqueue_changed_since(UnixMillis(since), UnixMillis(9_000))
            .await
            .expect("enqueue");
        assert_eq!(n, queued, "since {since}");
    }
    assert_eq!(pending(&store, Sink::Kv).await, 0, "KV is not asked again");
    let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    assert_eq!(peeked.len(), 1);
    assert!(peeked.iter().all(|e| e.key_id == a.id));
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(rows(&store).await, 0);
    store.close().await;
}

async fn refresh_notes(store: &SqliteStore) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ledger_refresh")
        .fetch_one(&store.reader)
        .await
        .expect("count");
    n
}

/// While KV is stuck, keys whose change still waits for KV are queued again for the ledger
/// every few minutes, so their ledger entry outlives the ledger's retention; never a key
/// already waiting for the ledger, nor one waiting for KV only for a rebuild.
#[tokio::test]
async fn keys_stuck_on_their_way_to_kv_are_refreshed_in_the_ledger() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    let a = key_with_two_changes(&store, 1).await; // changes queued at 1,000 and 2,000
    let b = key_with_two_changes(&store, 2).await;
    let c = key_with_two_changes(&store, 3).await;
    let refresh = |cutoff: i64, now: i64| {
        let store = &store;
        async move {
            store
                .outbox_refresh_ledger(UnixMillis(cutoff), UnixMillis(now))
                .await
                .expect("refresh")
        }
    };
    // The ledger took every change; KV took only c's, and then a rebuild queued every key.
    let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
        .await
        .expect("ack");
    let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
    let of_c: Vec<_> = newest_per_key(&peeked)
        .into_iter()
        .filter(|e| e.key_id == c.id)
        .collect();
    store.outbox_ack(Sink::Kv, &of_c).await.expect("ack");
    store
        .outbox_enqueue_all(None, 100, UnixMillis(3_000))
        .await
        .expect("enqueue all");
    let kv_pending = pending(&store, Sink::Kv).await;
    assert_eq!(kv_pending, 7);

    assert_eq!(refresh(999, 241_000).await, 0, "not waiting for long yet");
    assert_eq!(
        refresh(1_000, 241_000).await,
        2,
        "a and b; not c (rebuild only)"
    );
    let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    let mut queued: Vec<_> = peeked.iter().map(|e| e.key_id.clone()).collect();
    queued.sort();
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    assert_eq!(queued, expected);
    assert_eq!(
        pending(&store, Sink::Kv).await,
        kv_pending,
        "KV is not asked again"
    );
    assert_eq!(
        refresh(100_000, 242_000).await,
        0,
        "already waiting for the ledger"
    );
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
        .await
        .expect("ack");

    // Refreshed at 241,000: not again until the cutoff passes that.
    assert_eq!(refresh(240_999, 481_000).await, 0);
    assert_eq!(refresh(241_000, 481_000).await, 2);
    let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(refresh_notes(&store).await, 2);

    // KV takes a's state: a is refreshed no more, and its note goes.
    let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
    let of_a: Vec<_> = newest_per_key(&peeked)
        .into_iter()
        .filter(|e| e.key_id == a.id)
        .collect();
    store.outbox_ack(Sink::Kv, &of_a).await.expect("ack");
    assert_eq!(refresh(481_000, 721_000).await, 1, "b alone");
    assert_eq!(refresh_notes(&store).await, 1);
    let peeked = store.outbox_peek(Sink::Ledger, 100).await.expect("peek");
    assert!(peeked.iter().all(|e| e.key_id == b.id), "{peeked:?}");
    store
        .outbox_ack(Sink::Ledger, &newest_per_key(&peeked))
        .await
        .expect("ack");

    // KV takes everything: nothing left to refresh, no notes, no rows.
    let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
    store
        .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(refresh(721_000, 961_000).await, 0);
    assert_eq!(refresh_notes(&store).await, 0);
    assert_eq!(rows(&store).await, 0);
    store.close().await;
}

/// Without the ledger (no `LEDGER_URL`), KV's acknowledgement is enough, and ledger flags
/// left by a run that fed the ledger are released at once.
#[tokio::test]
async fn without_the_ledger_kv_alone_empties_the_outbox() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir).await;
    key_with_two_changes(&store, 1).await;
    // A run with the ledger: KV took the rows, the ledger did not.
    let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
    store
        .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(rows(&store).await, 2);
    // The next run has no ledger.
    assert_eq!(store.set_ledger_sink(false).await.expect("release"), 2);
    assert_eq!(rows(&store).await, 0);
    key_with_two_changes(&store, 2).await;
    assert_eq!(pending(&store, Sink::Kv).await, 2);
    let peeked = store.outbox_peek(Sink::Kv, 100).await.expect("peek");
    store
        .outbox_ack(Sink::Kv, &newest_per_key(&peeked))
        .await
        .expect("ack");
    assert_eq!(pending(&store, Sink::Ledger).await, 0);
    assert_eq!(rows(&store).await, 0, "KV's acknowledgement was enough");
    store.close().await;
}

/// What the start-up check refuses: `synchronous=NORMAL` (or OFF) syncs the WAL only at
/// checkpoints, so a power cut can lose acknowledged commits; without WAL, the readers and
/// the writer block each other and `FULL` means something else.
#[test]
fn the_durability_check_refuses_normal_and_no_wal() {
    for (journal_mode, synchronous) in [("wal", 1), ("wal", 0), ("delete", 2), ("memory", 3)] {
        let settings = Durability {
            journal_mode: journal_mode.into(),
            synchronous,
        };
        assert!(settings.check().is_err(), "{settings:?}");
    }
    let extra = Durability {
        journal_mode: "wal".into(),
        synchronous: 3,
    };
    assert!(extra.check().is_ok());
}

/// The conformance stories (`store/conformance.rs`), each on a fresh database file.
mod conformance {
    use super::*;

    async fn fresh() -> (tempfile::TempDir, Arc<dyn KeyStore>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn KeyStore> = Arc::new(open_store(&dir).await);
        (dir, store)
    }

    crate::store::conformance::stories!(fresh);
}
