//! The PostgreSQL store against a real server: `TEST_DATABASE_URL` names one whose user may
//! create databases (`./dev test` starts a throwaway cluster and sets it). Each test gets a
//! database of its own.

#![allow(clippy::expect_used, clippy::panic, reason = "test code")]

use super::*;

/// A new, empty database on the test server; its URL.
pub(crate) async fn fresh_database() -> String {
    let Ok(server) = std::env::var("TEST_DATABASE_URL") else {
        panic!(
            "TEST_DATABASE_URL is unset: the PostgreSQL tests need a server whose user may \
             create databases (`./dev test` starts a throwaway one and sets it)"
        );
    };
    let mut admin = PgConnection::connect(&server)
        .await
        .expect("connect to TEST_DATABASE_URL");
    let mut name = [0u8; 8];
    getrandom::fill(&mut name).expect("random");
    let name = format!("latchkey_{}", hex::encode(name));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let _ = admin.close().await;
    with_database(&server, &name)
}

/// `url` with its database replaced by `name`: `postgres://u@h:p/db?x` → `postgres://u@h:p/name?x`.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base
        .find("://")
        .map(|scheme| scheme + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[test]
fn a_test_database_url_keeps_the_server_and_its_options() {
    assert_eq!(
        with_database(
            "postgres://pg@127.0.0.1:5433/postgres?sslmode=disable",
            "t1"
        ),
        "postgres://pg@127.0.0.1:5433/t1?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://pg@host", "t2"),
        "postgres://pg@host/t2"
    );
}

async fn open_store(url: &str) -> PgStore {
    let key = latchkey_shared::sign::SigningSecret::parse(crate::store::conformance::CHAIN_KEY)
        .expect("secret");
    let chain = Arc::new(AuditChain::new(key, None));
    PgStore::open(url, Some(chain)).await.expect("open")
}

mod conformance {
    use super::*;

    async fn fresh() -> ((), Arc<dyn KeyStore>) {
        let url = fresh_database().await;
        ((), Arc::new(open_store(&url).await))
    }

    crate::store::conformance::stories!(fresh);
}

/// Replicas starting together on an empty database run the migrations once, without a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let url = fresh_database().await;
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = url.clone();
        starting.spawn(async move { open_store(&url).await });
    }
    let opened = starting.join_all().await;
    let (applied, versions): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT version) FROM _sqlx_migrations")
            .fetch_one(&opened[0].pool)
            .await
            .expect("count");
    let embedded = i64::try_from(sqlx::migrate!("./migrations/postgres").migrations.len())
        .expect("a few migrations");
    assert_eq!(
        (applied, versions),
        (embedded, embedded),
        "each migration applied once"
    );
    for store in opened {
        store.close().await;
    }
}

/// Three replicas writing at once leave one chain (the write lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_writing_at_once_leave_one_chain() {
    let url = fresh_database().await;
    let mut replicas: Vec<Arc<dyn KeyStore>> = Vec::new();
    for _ in 0..3 {
        replicas.push(Arc::new(open_store(&url).await));
    }
    crate::store::conformance::writers_on_replicas_leave_one_chain(&replicas).await;
}

/// Outbox rows are numbered in commit order across replicas: while one replica's write
/// transaction is open, another's change waits, so no sink can read a higher number and later
/// see a lower one commit (the ledger's watermark relies on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_numbers_follow_commit_order_across_replicas() {
    let url = fresh_database().await;
    let (a, b) = (open_store(&url).await, Arc::new(open_store(&url).await));
    let first = crate::store::conformance::key(1, "acme");
    let mut open = begin_write(&a.pool).await.expect("begin");
    enqueue_publish(&mut open, &first.id, UnixMillis(1))
        .await
        .expect("enqueue");
    let second = crate::store::conformance::key(2, "acme");
    let writer = {
        let (b, second) = (b.clone(), second.clone());
        tokio::spawn(async move {
            let event = AuditEvent {
                at: second.created_at,
                actor: "admin:test".into(),
                action: "create",
                key_id: Some(second.id.clone()),
                details: serde_json::json!({}),
            };
            b.insert(&second, &event).await.expect("insert");
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "the other replica's change waits for the open one"
    );
    assert!(
        b.outbox_peek(Sink::Kv, 10).await.expect("peek").is_empty(),
        "nothing is visible before the first commit"
    );
    open.commit().await.expect("commit");
    writer.await.expect("writer");
    let rows = b.outbox_peek(Sink::Kv, 10).await.expect("peek");
    let order: Vec<&KeyId> = rows.iter().map(|r| &r.key_id).collect();
    assert_eq!(order, vec![&first.id, &second.id], "{rows:?}");
}

/// A usage batch accepted by one replica is a replay at every other, and uses reported to
/// different replicas merge to the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_replay_guards_and_merge_uses() {
    let url = fresh_database().await;
    let (a, b) = (open_store(&url).await, open_store(&url).await);
    let mac = [7u8; 32];
    let (until, now) = (UnixMillis(10_000), UnixMillis(1_000));
    assert!(
        a.remember_usage_batch(&mac, until, now)
            .await
            .expect("remember")
    );
    assert!(
        !b.remember_usage_batch(&mac, until, now)
            .await
            .expect("remember"),
        "a replay"
    );
    assert!(
        !a.remember_usage_batch(&mac, until, now)
            .await
            .expect("remember"),
        "a replay"
    );
    assert_eq!(b.last_usage_report().await.expect("report"), Some(now));

    let key = crate::store::conformance::key(1, "acme");
    let event = AuditEvent {
        at: key.created_at,
        actor: "admin:test".into(),
        action: "create",
        key_id: Some(key.id.clone()),
        details: serde_json::json!({}),
    };
    a.insert(&key, &event).await.expect("insert");
    b.record_usage(&[(key.id.clone(), UnixMillis(5_000))])
        .await
        .expect("use");
    a.record_usage(&[(key.id.clone(), UnixMillis(3_000))])
        .await
        .expect("older use");
    let stored = b.get(&key.id).await.expect("get").expect("key");
    assert_eq!(
        stored.last_used_at,
        Some(UnixMillis(5_000)),
        "the latest use wins"
    );
}

/// Only one replica holds a role's lease; it is free again once the holder lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_lease_admits_one_replica_at_a_time() {
    let url = fresh_database().await;
    let (a, b) = (open_store(&url).await, open_store(&url).await);
    let held = a
        .try_lease(lease::Role::Ledger)
        .await
        .expect("lease")
        .expect("free");
    assert!(
        b.try_lease(lease::Role::Ledger)
            .await
            .expect("lease")
            .is_none()
    );
    assert!(
        b.try_lease(lease::Role::Webhooks)
            .await
            .expect("lease")
            .is_some(),
        "another role is free"
    );
    assert!(!held.lost());
    drop(held);
    // The keeper closes its connection on release; the server frees the lock as it goes.
    let mut free = None;
    for _ in 0..50 {
        free = b.try_lease(lease::Role::Ledger).await.expect("lease");
        if free.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(free.is_some(), "released");
}

/// A lease whose connection the server ends (a restart, an administrator) is marked lost within
/// seconds, and another replica can take the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_connection_ends_is_lost_and_taken_over() {
    let url = fresh_database().await;
    let (a, b) = (open_store(&url).await, open_store(&url).await);
    let held = a
        .try_lease(lease::Role::Publisher)
        .await
        .expect("lease")
        .expect("free");
    let ended: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND classid = $1 AND objid = 1 AND granted",
    )
    .bind(i64::from(LOCKS))
    .fetch_one(&b.pool)
    .await
    .expect("terminate");
    assert_eq!(ended, 1, "one connection held the publisher's lease");
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), held.lost_wait())
        .await
        .expect("the lease is marked lost");
    println!(
        "MEASURED a PostgreSQL lease's loss noticed in {} ms",
        started.elapsed().as_millis()
    );
    assert!(
        b.try_lease(lease::Role::Publisher)
            .await
            .expect("lease")
            .is_some(),
        "another replica takes the role"
    );
}

/// A write kept waiting for the write lock longer than `lock_timeout` (another replica stalled
/// while holding it) is answered "unavailable", never left hanging; the next one goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_kept_waiting_for_the_write_lock_is_refused_as_unavailable() {
    use crate::store::conformance::{event, key};
    let url = fresh_database().await;
    let store = open_store(&url).await;
    // A stalled writer: the write lock taken in a transaction left open (a session of its own,
    // without origin's limits, so the server never ends it).
    let mut stalled = PgConnection::connect(&url).await.expect("connect");
    let mut holding = stalled.begin().await.expect("begin");
    lock_writes(&mut holding).await.expect("lock");
    let k = key(1, "acme");
    let started = std::time::Instant::now();
    let refused = store.insert(&k, &event(&k, "create")).await;
    let waited = started.elapsed();
    assert!(
        matches!(&refused, Err(e) if e.unavailable() == Some("the database is locked")),
        "{refused:?}"
    );
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "refused after lock_timeout (5 s), not at once or much later: {waited:?}"
    );
    assert_eq!(
        store.get(&k.id).await.expect("get"),
        None,
        "nothing written"
    );
    holding.rollback().await.expect("release");
    store
        .insert(&k, &event(&k, "create"))
        .await
        .expect("written once the lock is free");
    assert_eq!(store.get(&k.id).await.expect("get"), Some(k));
}

/// A replica that stalls while holding a role (its process stopped: the kernel still answers
/// TCP keepalives, but nothing pings) loses it when the server ends the idle session
/// (`idle_session_timeout`, 10 s), and another replica takes the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_holder_loses_its_role_to_the_server_idle_limit() {
    let url = fresh_database().await;
    let store = open_store(&url).await;
    // The stalled holder: a lease's own session (the same code and limits), its lock taken,
    // never pinged.
    let started = std::time::Instant::now();
    let options = open::connect_options(&url).expect("options");
    let stalled = open::role_lock_session(&options, lease::Role::Policy)
        .await
        .expect("connect")
        .expect("free");
    assert!(
        store
            .try_lease(lease::Role::Policy)
            .await
            .expect("lease")
            .is_none(),
        "held while the holder is there"
    );
    let mut taken_over = None;
    while started.elapsed() < Duration::from_secs(25) {
        taken_over = store.try_lease(lease::Role::Policy).await.expect("lease");
        if taken_over.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(taken_over.is_some(), "the server ended the stalled session");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_secs(9),
        "not before the idle limit: {after:?}"
    );
    println!(
        "MEASURED a stalled PostgreSQL lease holder replaced after {} ms (idle_session_timeout 10 s)",
        after.as_millis()
    );
    drop(stalled);
}

/// A server over the network must be reached over TLS that cannot be skipped; a local one
/// (loopback, Unix socket) may go without.
#[test]
fn a_server_over_the_network_needs_tls_that_cannot_fall_back() {
    let allowed = |url: &str| open::connect_options(url).is_ok();
    assert!(
        !allowed("postgres://origin@db.example/keys"),
        "libpq's default is prefer"
    );
    assert!(!allowed("postgres://origin@db.example/keys?sslmode=prefer"));
    assert!(!allowed("postgres://origin@10.0.0.5/keys?sslmode=disable"));
    assert!(allowed(
        "postgres://origin@db.example/keys?sslmode=verify-full"
    ));
    assert!(allowed("postgres://origin@db.example/keys?sslmode=require"));
    assert!(allowed("postgres://origin@127.0.0.1:5432/keys"));
    assert!(allowed("postgres://origin@localhost/keys"));
    assert!(allowed("postgres://origin@[::1]/keys"));
    assert!(allowed("postgres:///keys?host=/var/run/postgresql"));
}

/// Opening refuses a server that would not keep an acknowledged commit.
#[test]
fn settings_that_lose_commits_are_refused() {
    let on = |fsync: &str, synchronous_commit: &str| {
        open::Settings {
            fsync: fsync.into(),
            synchronous_commit: synchronous_commit.into(),
        }
        .check()
        .is_ok()
    };
    assert!(on("on", "on"));
    assert!(on("on", "remote_apply"));
    assert!(!on("off", "on"));
    assert!(!on("on", "off"));
}
