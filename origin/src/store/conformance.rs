//! What every [`KeyStore`] must do, as stories any backend runs: each takes a fresh, empty
//! store (with an audit chain) and fails the test if the store breaks a promise of the trait.
//! A backend's tests run every story with [`stories!`], given an async function that opens a
//! fresh database (SQLite: `sqlite/tests.rs`).

#![allow(clippy::expect_used, clippy::panic, reason = "test code")]

/// One test per story, each on the store `$fresh().await` opens (it returns the store and
/// whatever must live as long as it, a temporary folder say). The list of stories is here
/// alone, so every backend runs all of them.
macro_rules! stories {
    ($fresh:ident) => {
        $crate::store::conformance::stories!(
            @each $fresh,
            keys_read_back_by_id_and_hash,
            a_change_needs_the_revision_it_was_made_from,
            the_outbox_keeps_order_and_acknowledges_per_entry,
            concurrent_writers_leave_one_chain,
            changes_of_every_kind_committed_together_leave_a_verifiable_chain,
            lists_filter_page_and_hide_deleted_keys,
            lists_filter_by_metadata_fields_and_count_every_match,
            a_roll_commits_both_keys_or_neither,
            uses_merge_to_the_latest,
            each_sink_acknowledges_its_own_and_a_row_goes_when_none_needs_it,
            webhook_cursors_start_at_the_end_of_the_log_and_move,
            kv_read_backs_are_scheduled_retried_and_done,
            a_usage_batch_is_accepted_once_until_its_window_ends,
            policies_find_idle_and_expiring_keys_not_yet_warned
        );
    };
    (@each $fresh:ident, $($story:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $story() {
                let (_guard, store) = $fresh().await;
                $crate::store::conformance::$story(store).await;
            }
        )*
    };
}
pub(crate) use stories;

use std::sync::Arc;

use latchkey_shared::{KeyHash, KeyId, ScopeSet, UnixMillis};
use serde_json::json;

use super::KeyStore;
use crate::model::{AuditEvent, ListFilter, PolicyQuery, Sink, StoredKey, VerifyEntry};

/// The audit chain's key of the stores the stories run on.
pub(crate) const CHAIN_KEY: &str = "store-tests-audit-chain-key-0123456789";

/// A key numbered `n` (its id and hash derive from `n`), of `subject`, made at `n` seconds.
pub(crate) fn key(n: u8, subject: &str) -> StoredKey {
    let mut fill = |bytes: &mut [u8]| bytes.fill(n);
    StoredKey {
        id: KeyId::generate(&mut fill),
        hash: KeyHash::from_bytes([n; 32]),
        hint: "sk_test_...abcd".into(),
        name: format!("key {n}"),
        subject: subject.into(),
        description: None,
        scopes: ScopeSet::default(),
        claims: None,
        created_by: None,
        expiration: None,
        revoked: false,
        revoked_at: None,
        revocation_reason: None,
        last_used_at: None,
        created_at: UnixMillis(i64::from(n) * 1000),
        updated_at: UnixMillis(i64::from(n) * 1000),
        revision: 1,
        disabled: false,
        allowed_ips: Default::default(),
        rolled_from: None,
        rolled_to: None,
        leaked_at: None,
        leak_source: None,
        key_type: "api_key".into(),
        deleted_at: None,
    }
}

pub(crate) fn event(key: &StoredKey, action: &'static str) -> AuditEvent {
    AuditEvent {
        at: key.updated_at,
        actor: "admin:conformance".into(),
        action,
        key_id: Some(key.id.clone()),
        details: json!({ "revision": key.revision }),
    }
}

fn filter() -> ListFilter {
    ListFilter {
        now: UnixMillis(1_000_000),
        limit: 100,
        ..ListFilter::default()
    }
}

/// Inserted keys read back whole, by id and by hash; an unknown one is `None`.
pub(crate) async fn keys_read_back_by_id_and_hash(store: Arc<dyn KeyStore>) {
    let a = key(1, "acme");
    store
        .insert(&a, &event(&a, "create"))
        .await
        .expect("insert");
    assert_eq!(store.get(&a.id).await.expect("get"), Some(a.clone()));
    assert_eq!(
        store.find_by_hash(&a.hash).await.expect("find"),
        Some(a.clone())
    );
    assert_eq!(store.get(&key(2, "acme").id).await.expect("get"), None);
    assert_eq!(
        store
            .find_by_hash(&KeyHash::from_bytes([9; 32]))
            .await
            .expect("find"),
        None
    );
    assert_eq!(store.count_keys().await.expect("count"), 1);
}

/// A change lands only over the revision it was made from; a stale one writes nothing, not
/// even its audit entry.
pub(crate) async fn a_change_needs_the_revision_it_was_made_from(store: Arc<dyn KeyStore>) {
    let a = key(1, "acme");
    store
        .insert(&a, &event(&a, "create"))
        .await
        .expect("insert");
    let mut next = a.clone();
    next.name = "renamed".into();
    next.revision = 2;
    assert!(
        store
            .replace(&next, 1, &event(&next, "update"))
            .await
            .expect("replace")
    );
    let mut stale = a.clone();
    stale.name = "stale".into();
    stale.revision = 2;
    assert!(
        !store
            .replace(&stale, 1, &event(&stale, "update"))
            .await
            .expect("replace"),
        "a change over an old revision is refused"
    );
    assert_eq!(store.get(&a.id).await.expect("get"), Some(next));
    let log = store.audit_log(Some(&a.id), 0, 10).await.expect("log");
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["create", "update"]);
}

/// Every change is queued for KV in commit order, and an acknowledgement removes only what it
/// names.
pub(crate) async fn the_outbox_keeps_order_and_acknowledges_per_entry(store: Arc<dyn KeyStore>) {
    let keys: Vec<StoredKey> = (1..=3).map(|n| key(n, "acme")).collect();
    for k in &keys {
        store.insert(k, &event(k, "create")).await.expect("insert");
    }
    let peeked = store.outbox_peek(Sink::Kv, 10).await.expect("peek");
    let ids: Vec<&KeyId> = peeked.iter().map(|e| &e.key_id).collect();
    assert_eq!(ids, keys.iter().map(|k| &k.id).collect::<Vec<_>>());
    assert!(peeked.windows(2).all(|w| w[0].seq < w[1].seq));
    store.outbox_ack(Sink::Kv, &peeked[..2]).await.expect("ack");
    let left = store.outbox_peek(Sink::Kv, 10).await.expect("peek");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key_id, keys[2].id);
    assert_eq!(
        store
            .outbox_stats(Sink::Kv, None)
            .await
            .expect("stats")
            .pending,
        1
    );
}

/// Concurrent writers leave one chain: sequence numbers in order, each entry linked to the one
/// before, none lost.
pub(crate) async fn concurrent_writers_leave_one_chain(store: Arc<dyn KeyStore>) {
    writers_on_replicas_leave_one_chain(&[store]).await;
}

/// The same, with the writers spread over `replicas` (stores over one database, as origins on
/// several machines): still one chain, whoever wrote.
pub(crate) async fn writers_on_replicas_leave_one_chain(replicas: &[Arc<dyn KeyStore>]) {
    let store = replicas[0].clone();
    let writers: Vec<_> = (1..=24)
        .map(|n| {
            let store = replicas[usize::from(n) % replicas.len()].clone();
            tokio::spawn(async move {
                let k = key(n, "acme");
                store
                    .insert(&k, &event(&k, "create"))
                    .await
                    .expect("insert");
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let log = store.audit_log(None, 0, 100).await.expect("log");
    assert_eq!(log.len(), 24);
    assert_eq!(log[0].seq, 1);
    for pair in log.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "in order, no gap");
        assert_eq!(pair[1].prev_hash, pair[0].hash, "linked");
    }
}

/// Changes of every kind sent at once, so mostly committed in shared transactions (inserts, updates,
/// an update that lost its revision, a roll, events, and inserts of an id that exists, which
/// fail their group and send its changes back to be committed one by one), leave one chain
/// whose every entry verifies with the chain's key, with an entry for each change written.
pub(crate) async fn changes_of_every_kind_committed_together_leave_a_verifiable_chain(
    store: Arc<dyn KeyStore>,
) {
    let base: Vec<StoredKey> = (1..=3).map(|n| key(n, "acme")).collect();
    for k in &base {
        store.insert(k, &event(k, "create")).await.expect("insert");
    }
    let mut written = base.len();
    for round in 0..3u8 {
        let mut changes = tokio::task::JoinSet::new();
        let fresh = key(10 + round, "acme");
        let mut updated = base[0].clone();
        updated.revision = i64::from(round) + 2;
        updated.name = format!("renamed {round}");
        let stale = base[1].clone();
        let duplicate = base[2].clone();
        let store_ = store.clone();
        changes.spawn(async move {
            store_
                .insert(&fresh, &event(&fresh, "create"))
                .await
                .expect("insert");
            true
        });
        let store_ = store.clone();
        changes.spawn(async move {
            let expected = updated.revision - 1;
            store_
                .replace(&updated, expected, &event(&updated, "update"))
                .await
                .expect("replace")
        });
        let store_ = store.clone();
        changes.spawn(async move {
            let lost = store_
                .replace(&stale, 99, &event(&stale, "update"))
                .await
                .expect("replace");
            assert!(!lost, "a stale revision writes nothing");
            false
        });
        let store_ = store.clone();
        let refused_key = duplicate.clone();
        changes.spawn(async move {
            store_
                .record_event(&event(&refused_key, "verify_refused"))
                .await
                .expect("event");
            true
        });
        // Sent with the others, so it usually shares their group and fails it.
        let store_ = store.clone();
        changes.spawn(async move {
            let refused = store_
                .insert(&duplicate, &event(&duplicate, "create"))
                .await;
            assert!(refused.is_err(), "an id that exists is refused");
            false
        });
        if round == 0 {
            let mut rolled = base[2].clone();
            let successor = key(30, "acme");
            rolled.rolled_to = Some(successor.id.clone());
            rolled.revision = 2;
            let mut successor = successor;
            successor.rolled_from = Some(rolled.id.clone());
            let store_ = store.clone();
            changes.spawn(async move {
                store_
                    .roll(
                        (&rolled, 1, &event(&rolled, "roll")),
                        (&successor, &event(&successor, "create")),
                    )
                    .await
                    .expect("roll")
            });
            written += 1; // the roll's second entry
        }
        while let Some(outcome) = changes.join_next().await {
            if outcome.expect("change") {
                written += 1;
            }
        }
    }
    let log = store.audit_log(None, 0, 500).await.expect("log");
    assert_eq!(log.len(), written, "an entry for each change written");
    let chain_key = latchkey_shared::sign::SigningSecret::parse(CHAIN_KEY).expect("key");
    let none = crate::audit::Checkpoints::parse(&chain_key, "").expect("no checkpoints");
    // From seq 1, each entry the next one, keyed, linked to the one before and MACed with the
    // key. (No `finish`: the checkpoints, if the store keeps any, are the backends' own tests'.)
    let mut checker = crate::audit::ChainChecker::new(Some(&chain_key), &none);
    for entry in &log {
        assert_eq!(
            entry.chain,
            crate::audit::CHAIN_KEYED,
            "entry {}",
            entry.seq
        );
        checker
            .check(entry)
            .unwrap_or_else(|e| panic!("entry {}: {e}", entry.seq));
    }
}

/// Lists filter by subject, revocation, type and name, page newest first with a total, and
/// never show a deleted key.
pub(crate) async fn lists_filter_page_and_hide_deleted_keys(store: Arc<dyn KeyStore>) {
    let mut keys: Vec<StoredKey> = (1..=6)
        .map(|n| key(n, if n % 2 == 0 { "acme" } else { "globex" }))
        .collect();
    keys[1].revoked = true;
    keys[3].key_type = "partner_key".into();
    keys[5].deleted_at = Some(UnixMillis(7_000));
    keys[5].revoked = true;
    keys[2].name = "Orders 100%_done".into();
    for k in &keys {
        store.insert(k, &event(k, "create")).await.expect("insert");
    }
    let names = |page: &crate::model::KeyPage| -> Vec<String> {
        page.keys.iter().map(|k| k.name.clone()).collect()
    };
    let all = store.list(&filter()).await.expect("list");
    assert_eq!(all.total_count, 5, "the deleted key is never listed");
    assert_eq!(
        names(&all),
        ["key 5", "key 4", "Orders 100%_done", "key 2", "key 1"],
        "newest first"
    );
    let acme = store
        .list(&ListFilter {
            subject: Some("acme".into()),
            ..filter()
        })
        .await
        .expect("list");
    assert_eq!(names(&acme), ["key 4", "key 2"]);
    let live_api_keys = store
        .list(&ListFilter {
            subject: Some("acme".into()),
            revoked: Some(false),
            key_type: Some("api_key".into()),
            ..filter()
        })
        .await
        .expect("list");
    assert_eq!(
        live_api_keys.total_count, 0,
        "key 2 revoked, key 4 another type"
    );
    let globex = store
        .list(&ListFilter {
            subject: Some("globex".into()),
            ..filter()
        })
        .await
        .expect("list");
    assert_eq!(names(&globex), ["key 5", "Orders 100%_done", "key 1"]);
    let page = store
        .list(&ListFilter {
            limit: 2,
            offset: 1,
            ..filter()
        })
        .await
        .expect("list");
    assert_eq!(names(&page), ["key 4", "Orders 100%_done"]);
    assert_eq!(page.total_count, 5);
    for (text, expected) in [
        ("ORDERS", vec!["Orders 100%_done"]),
        ("100%_", vec!["Orders 100%_done"]),
        ("%", vec!["Orders 100%_done"]),
        ("_", vec!["Orders 100%_done"]),
        ("0%d", vec![]),
    ] {
        let found = store
            .list(&ListFilter {
                name_contains: Some(text.into()),
                ..filter()
            })
            .await
            .expect("list");
        assert_eq!(names(&found), expected, "{text}");
    }
    let partner = store
        .list(&ListFilter {
            key_type: Some("partner_key".into()),
            ..filter()
        })
        .await
        .expect("list");
    assert_eq!(names(&partner), ["key 4"]);
}

/// A metadata filter matches a field whose value is that string (not an array holding it, not
/// a number or a boolean written the same way, not another field with it), every field given,
/// never a deleted key; its count is of every match,
/// on any page, past the last one too.
pub(crate) async fn lists_filter_by_metadata_fields_and_count_every_match(
    store: Arc<dyn KeyStore>,
) {
    let claims = |value: serde_json::Value| value.as_object().cloned();
    let mut keys: Vec<StoredKey> = (1..=7).map(|n| key(n, "acme")).collect();
    keys[0].claims = claims(json!({ "tier": "gold", "region": "eu" }));
    keys[1].claims = claims(json!({ "tier": ["gold"] }));
    keys[2].claims = claims(json!({ "tier": "gold", "region": "us" }));
    keys[3].claims = claims(json!({ "region": "gold" }));
    keys[4].claims = claims(json!({ "tier": "gold" }));
    keys[4].deleted_at = Some(UnixMillis(9_000));
    keys[5].claims = claims(json!({ "tier": "silver" }));
    keys[6].claims = claims(json!({ "tier": 5, "gold": true }));
    for k in &keys {
        store.insert(k, &event(k, "create")).await.expect("insert");
    }
    let list = |fields: &[(&str, &str)], limit: u32, offset: u32| {
        let filter = ListFilter {
            claims_equal: fields
                .iter()
                .map(|(f, v)| ((*f).to_owned(), (*v).to_owned()))
                .collect(),
            limit,
            offset,
            ..filter()
        };
        let store = store.clone();
        async move {
            let page = store.list(&filter).await.expect("list");
            let names: Vec<String> = page.keys.iter().map(|k| k.name.clone()).collect();
            (names, page.total_count)
        }
    };
    assert_eq!(
        list(&[("tier", "gold")], 10, 0).await,
        (vec!["key 3".into(), "key 1".into()], 2),
        "newest first; not the array, the other field or the deleted key"
    );
    assert_eq!(
        list(&[("tier", "gold")], 1, 0).await,
        (vec!["key 3".into()], 2)
    );
    assert_eq!(
        list(&[("tier", "gold")], 1, 1).await,
        (vec!["key 1".into()], 2)
    );
    assert_eq!(
        list(&[("tier", "gold")], 1, 5).await,
        (vec![], 2),
        "a page past the last match still counts them"
    );
    assert_eq!(
        list(&[("tier", "gold"), ("region", "eu")], 10, 0).await,
        (vec!["key 1".into()], 1),
        "every field given"
    );
    assert_eq!(list(&[("tier", "platinum")], 10, 0).await, (vec![], 0));
    assert_eq!(
        list(&[("tier", "5")], 10, 0).await,
        (vec![], 0),
        "a number is not the string"
    );
    assert_eq!(
        list(&[("gold", "true")], 10, 0).await,
        (vec![], 0),
        "nor is a boolean"
    );
}

/// A roll writes the old key's new state and the new key together, or neither over a stale
/// revision.
pub(crate) async fn a_roll_commits_both_keys_or_neither(store: Arc<dyn KeyStore>) {
    let old = key(1, "acme");
    store
        .insert(&old, &event(&old, "create"))
        .await
        .expect("insert");
    let mut new = key(2, "acme");
    new.rolled_from = Some(old.id.clone());
    let mut rolled = old.clone();
    rolled.rolled_to = Some(new.id.clone());
    rolled.revision = 2;
    let written = store
        .roll(
            (&rolled, 7, &event(&rolled, "roll")),
            (&new, &event(&new, "create")),
        )
        .await
        .expect("roll");
    assert!(!written, "a stale revision rolls nothing");
    assert_eq!(store.get(&new.id).await.expect("get"), None);
    assert_eq!(store.get(&old.id).await.expect("get"), Some(old.clone()));
    let written = store
        .roll(
            (&rolled, 1, &event(&rolled, "roll")),
            (&new, &event(&new, "create")),
        )
        .await
        .expect("roll");
    assert!(written);
    assert_eq!(store.get(&old.id).await.expect("get"), Some(rolled));
    assert_eq!(store.get(&new.id).await.expect("get"), Some(new));
}

/// Uses merge to the latest time, whatever order they arrive in.
pub(crate) async fn uses_merge_to_the_latest(store: Arc<dyn KeyStore>) {
    let a = key(1, "acme");
    store
        .insert(&a, &event(&a, "create"))
        .await
        .expect("insert");
    store
        .record_usage(&[
            (a.id.clone(), UnixMillis(5_000)),
            (a.id.clone(), UnixMillis(3_000)),
        ])
        .await
        .expect("usage");
    store
        .record_usage(&[(a.id.clone(), UnixMillis(4_000))])
        .await
        .expect("usage");
    let read = store.get(&a.id).await.expect("get").expect("exists");
    assert_eq!(read.last_used_at, Some(UnixMillis(5_000)));
}

/// Each sink (KV, the ledger) clears only its own need; a row goes once neither needs it. With
/// the ledger sink off, KV's acknowledgement is enough, and rows left for the ledger go.
pub(crate) async fn each_sink_acknowledges_its_own_and_a_row_goes_when_none_needs_it(
    store: Arc<dyn KeyStore>,
) {
    let k = key(1, "acme");
    store
        .insert(&k, &event(&k, "create"))
        .await
        .expect("insert");
    let pending = |sink| {
        let store = store.clone();
        async move { store.outbox_stats(sink, None).await.expect("stats").pending }
    };
    let kv = store.outbox_peek(Sink::Kv, 10).await.expect("peek");
    store.outbox_ack(Sink::Kv, &kv).await.expect("ack");
    assert_eq!(pending(Sink::Kv).await, 0);
    assert_eq!(pending(Sink::Ledger).await, 1, "the ledger still needs it");
    let ledger = store.outbox_peek(Sink::Ledger, 10).await.expect("peek");
    assert_eq!(ledger.len(), 1);
    store.outbox_ack(Sink::Ledger, &ledger).await.expect("ack");
    assert_eq!(pending(Sink::Ledger).await, 0);

    let second = key(2, "acme");
    store
        .insert(&second, &event(&second, "create"))
        .await
        .expect("insert");
    assert_eq!(
        store.set_ledger_sink(false).await.expect("off"),
        1,
        "released"
    );
    assert_eq!(pending(Sink::Ledger).await, 0);
    let third = key(3, "acme");
    store
        .insert(&third, &event(&third, "create"))
        .await
        .expect("insert");
    let kv = store.outbox_peek(Sink::Kv, 10).await.expect("peek");
    store.outbox_ack(Sink::Kv, &kv).await.expect("ack");
    assert_eq!(pending(Sink::Kv).await, 0);
    assert_eq!(
        pending(Sink::Ledger).await,
        0,
        "KV's acknowledgement was enough"
    );
}

/// A new endpoint's cursor starts after the newest entry (no history is replayed); it then
/// moves where it is set, and a second start leaves it there.
pub(crate) async fn webhook_cursors_start_at_the_end_of_the_log_and_move(store: Arc<dyn KeyStore>) {
    for n in 1..=3 {
        let k = key(n, "acme");
        store
            .insert(&k, &event(&k, "create"))
            .await
            .expect("insert");
    }
    let endpoint = "https://hooks.example/a";
    assert_eq!(store.webhook_cursor(endpoint).await.expect("cursor"), None);
    store
        .init_webhook_cursor(endpoint, UnixMillis(1))
        .await
        .expect("init");
    assert_eq!(
        store.webhook_cursor(endpoint).await.expect("cursor"),
        Some(3)
    );
    store
        .set_webhook_cursor(endpoint, 2, UnixMillis(2))
        .await
        .expect("set");
    store
        .init_webhook_cursor(endpoint, UnixMillis(3))
        .await
        .expect("init again");
    assert_eq!(
        store.webhook_cursor(endpoint).await.expect("cursor"),
        Some(2)
    );
    let (count, oldest) = store.audit_count(0, &["create"], 10).await.expect("count");
    assert_eq!((count, oldest), (3, Some(UnixMillis(1000))));
    assert_eq!(
        store.audit_count(1, &["create"], 1).await.expect("count").0,
        1,
        "at most max"
    );
}

/// KV read-backs: due when their time comes, retried later (never earlier than asked), done
/// only for the schedule they were read at.
pub(crate) async fn kv_read_backs_are_scheduled_retried_and_done(store: Arc<dyn KeyStore>) {
    let (a, b) = (key(1, "acme"), key(2, "acme"));
    store
        .verify_schedule(&[a.id.clone(), b.id.clone()], UnixMillis(100))
        .await
        .expect("schedule");
    store
        .verify_schedule(std::slice::from_ref(&a.id), UnixMillis(50))
        .await
        .expect("an earlier time keeps the later");
    assert_eq!(store.verify_pending().await.expect("pending"), 2);
    assert!(
        store
            .verify_due(UnixMillis(99), 10)
            .await
            .expect("due")
            .is_empty()
    );
    let due: Vec<VerifyEntry> = store.verify_due(UnixMillis(100), 10).await.expect("due");
    assert_eq!(due.len(), 2);
    assert!(
        due.iter()
            .all(|e| e.due_at == UnixMillis(100) && e.attempts == 0)
    );
    store
        .verify_retry(&due[0], UnixMillis(200))
        .await
        .expect("retry");
    store.verify_done(&due[1]).await.expect("done");
    let due = store.verify_due(UnixMillis(1_000), 10).await.expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].due_at, due[0].attempts), (UnixMillis(200), 1));
    // A stale entry (read at 100, rescheduled since) does not clear the new schedule.
    let stale = VerifyEntry {
        due_at: UnixMillis(100),
        ..due[0].clone()
    };
    store.verify_done(&stale).await.expect("done");
    assert_eq!(store.verify_pending().await.expect("pending"), 1);
}

/// A usage batch's MAC is accepted once while its window lasts, and forgotten after.
pub(crate) async fn a_usage_batch_is_accepted_once_until_its_window_ends(store: Arc<dyn KeyStore>) {
    let mac = [9u8; 32];
    assert_eq!(store.last_usage_report().await.expect("report"), None);
    assert!(
        store
            .remember_usage_batch(&mac, UnixMillis(2_000), UnixMillis(1_000))
            .await
            .expect("remember")
    );
    assert!(
        !store
            .remember_usage_batch(&mac, UnixMillis(2_000), UnixMillis(1_500))
            .await
            .expect("remember"),
        "a replay"
    );
    assert_eq!(
        store.last_usage_report().await.expect("report"),
        Some(UnixMillis(1_000))
    );
    assert!(
        store
            .remember_usage_batch(&mac, UnixMillis(9_000), UnixMillis(3_000))
            .await
            .expect("remember"),
        "its window ended"
    );
}

/// The policies' candidates: live keys idle since before a time and not warned since their
/// last activity; keys expiring in a window without a warning for that expiry.
pub(crate) async fn policies_find_idle_and_expiring_keys_not_yet_warned(store: Arc<dyn KeyStore>) {
    let idle = key(1, "acme");
    let mut used = key(2, "acme");
    used.last_used_at = Some(UnixMillis(900_000));
    let mut revoked = key(3, "acme");
    revoked.revoked = true;
    let mut expiring = key(4, "acme");
    expiring.expiration = Some(UnixMillis(1_500_000));
    for k in [&idle, &used, &revoked, &expiring] {
        store.insert(k, &event(k, "create")).await.expect("insert");
    }
    store
        .record_usage(&[(used.id.clone(), UnixMillis(900_000))])
        .await
        .expect("use");
    let now = UnixMillis(1_000_000);
    let ids = |keys: Vec<StoredKey>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
    let stale = store
        .policy_candidates(
            PolicyQuery::StaleUnwarned {
                idle_before: UnixMillis(500_000),
                now,
            },
            10,
        )
        .await
        .expect("stale");
    assert_eq!(ids(stale), vec![idle.id.clone(), expiring.id.clone()]);
    let warning = AuditEvent {
        at: UnixMillis(600_000),
        actor: "policy:stale_keys".into(),
        action: "stale_warning",
        key_id: Some(idle.id.clone()),
        details: json!({}),
    };
    store.record_event(&warning).await.expect("warn");
    let stale = store
        .policy_candidates(
            PolicyQuery::StaleUnwarned {
                idle_before: UnixMillis(500_000),
                now,
            },
            10,
        )
        .await
        .expect("stale");
    assert_eq!(ids(stale), vec![expiring.id.clone()], "warned once");
    let due = store
        .policy_candidates(
            PolicyQuery::StaleDue {
                idle_before: UnixMillis(500_000),
                warned_before: Some(UnixMillis(700_000)),
                now,
            },
            10,
        )
        .await
        .expect("due");
    assert_eq!(ids(due), vec![idle.id.clone()]);

    let window = PolicyQuery::ExpiringUnwarned {
        now,
        until: UnixMillis(2_000_000),
    };
    let soon = store.policy_candidates(window, 10).await.expect("expiring");
    assert_eq!(ids(soon), vec![expiring.id.clone()]);
    let warned = AuditEvent {
        at: now,
        actor: "policy:expiry".into(),
        action: "expiry_warning",
        key_id: Some(expiring.id.clone()),
        details: json!({ "expires_at": 1_500_000 }),
    };
    store.record_event(&warned).await.expect("warn");
    assert!(
        store
            .policy_candidates(window, 10)
            .await
            .expect("expiring")
            .is_empty(),
        "warned for this expiry"
    );
}
