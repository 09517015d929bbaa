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
            lists_filter_page_and_hide_deleted_keys,
            a_roll_commits_both_keys_or_neither,
            uses_merge_to_the_latest
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
use crate::model::{AuditEvent, ListFilter, Sink, StoredKey};

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

fn event(key: &StoredKey, action: &'static str) -> AuditEvent {
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
