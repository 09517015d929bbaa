//! Origin's KV publisher under faults, and `origin sync --full`, against the real Worker's
//! local KV under `wrangler dev`.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::time::Duration;

use common::TestApp;
use common::edge::{Edge, KV_NAMESPACE_ID, Stack, report_measurement};
use reqwest::StatusCode;
use serde_json::json;

const PUBLISH_LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn changes_made_while_kv_is_unreachable_are_published_once_it_returns() {
    let mut stack = Stack::start(&[]).await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(
            stack
                .create(&["read:orders", "write:orders"], json!({}))
                .await,
        );
    }
    stack.wait_published(PUBLISH_LIMIT).await;

    // KV goes away (wrangler dev and workerd stopped: connections are refused).
    stack.edge.stop();
    stack.revoke(&keys[0].0).await;
    stack.revoke(&keys[1].0).await;
    let r = stack
        .origin
        .patch(
            "/backend.api-keys.update",
            json!({ "key_id": keys[2].0, "scopes": ["read:orders"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let added = stack.create(&["read:orders"], json!({})).await;

    // Origin keeps answering and shows the backlog (its figures may be a second old).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = common::eventually(Duration::from_secs(5), || async {
        let health = stack.origin.get("/healthz").await;
        (health.status == StatusCode::OK && health.body["kv_publisher"]["pending"] == 4)
            .then_some(health.body.clone())
            .ok_or_else(|| format!("{:?}", health.body))
    })
    .await;
    let publisher = &health["kv_publisher"];
    assert_eq!(publisher["pending"], 4, "{publisher}");
    assert!(
        publisher["lag_ms"].as_i64().expect("lag") >= 300,
        "{publisher}"
    );
    assert!(
        publisher["failures"].as_u64().expect("failures") > 0,
        "{publisher}"
    );
    assert_eq!(publisher["state"], "unreachable", "{publisher}");
    let status = stack.origin.get("/v1/status").await;
    assert!(
        status.body["kv_publisher"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect")),
        "{}",
        status.body
    );
    let metrics = TestApp::send(stack.origin.request(reqwest::Method::GET, "/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);

    // Origin restarts during the outage: the outbox is on disk.
    stack.origin.restart().await;
    let health = stack.origin.get("/healthz").await;
    assert_eq!(health.body["kv_publisher"]["pending"], 4, "{}", health.body);

    // KV is back (same port, same persisted namespace): everything arrives.
    let started = std::time::Instant::now();
    stack.edge.start().await;
    stack.wait_published(PUBLISH_LIMIT).await;
    report_measurement(&format!(
        "KV outage: the 4 changes made meanwhile were all in KV {} ms after wrangler dev was restarted (its start-up included)",
        started.elapsed().as_millis()
    ));
    let edge = &stack.edge;
    for (id, key) in &keys[..2] {
        let r = edge.verify(key, &[]).await;
        assert_eq!(
            (r.body["code"].as_str(), r.body["id"].as_str()),
            (Some("REVOKED"), Some(id.as_str()))
        );
    }
    let r = edge.verify(&keys[2].1, &["write:orders"]).await;
    assert_eq!(r.body["code"], "INSUFFICIENT_SCOPE", "{:?}", r.body);
    let r = edge.verify(&keys[3].1, &["write:orders"]).await;
    assert_eq!(r.body["code"], "VALID", "{:?}", r.body);
    let r = edge.verify(&added.1, &[]).await;
    assert_eq!(r.body["code"], "VALID", "{:?}", r.body);
}

#[tokio::test]
async fn reconciliation_puts_back_a_revocation_that_local_kv_lost() {
    let stack = Stack::start(&[("KV_RECONCILE_INTERVAL_S", "1")]).await;
    let (id, key) = stack.create(&["read:orders"], json!({})).await;
    let (_, other) = stack.create(&["read:orders"], json!({})).await;
    stack.wait_published(PUBLISH_LIMIT).await;
    let entry =
        latchkey_shared::kv_entry_name(&latchkey_shared::ApiKey::parse(&key).expect("key").hash());
    let live = stack.edge.read_kv(&entry).await;
    stack.revoke(&id).await;
    stack.wait_published(PUBLISH_LIMIT).await;
    assert_eq!(stack.edge.verify(&key, &[]).await.body["code"], "REVOKED");

    // A stale write lands after the revocation (as a timed-out write applied late would). The
    // edge does not follow it (the ledger's revocation wins over an older KV value), but a cold
    // isolate or one without the ledger would read it: KV itself must be put right.
    stack.edge.write_kv(&entry, &live).await;
    let stale = String::from_utf8(stack.edge.read_kv(&entry).await).expect("utf-8");
    assert!(stale.contains("\"revoked\":false"), "{stale}");
    assert_eq!(stack.edge.verify(&key, &[]).await.body["code"], "REVOKED");

    // Reconciliation compares KV (wrangler's bulk/get) with the database and writes it back.
    let started = std::time::Instant::now();
    common::eventually(PUBLISH_LIMIT, || async {
        let now = String::from_utf8(stack.edge.read_kv(&entry).await).expect("utf-8");
        if now.contains("\"revoked\":true") {
            Ok(())
        } else {
            Err(format!("KV still stale: {now}"))
        }
    })
    .await;
    let took = started.elapsed();
    assert_eq!(stack.edge.verify(&key, &[]).await.body["code"], "REVOKED");
    assert_eq!(stack.edge.verify(&other, &[]).await.body["code"], "VALID");
    // The admin status: fresh, where `/healthz`'s figures may be a second old.
    let health = stack.origin.get("/v1/status").await;
    let publisher = &health.body["kv_publisher"];
    assert!(publisher["rewrites"].as_u64() >= Some(1), "{publisher}");
    assert!(publisher["reconciled"].as_u64() >= Some(2), "{publisher}");
    report_measurement(&format!(
        "KV reconciliation (local KV, KV_RECONCILE_INTERVAL_S=1): a stale value written over a \
         revocation was put back {} ms later",
        took.as_millis()
    ));
}

#[tokio::test]
async fn sync_full_rebuilds_a_namespace_alone_and_beside_a_running_origin() {
    // Origin without KV settings: it says publishing is off, and keeps changes in the outbox.
    let mut origin = TestApp::start().await;
    assert!(
        origin.logs().contains("KV publishing is OFF"),
        "{}",
        origin.logs()
    );
    let mut keys = Vec::new();
    for i in 0..40 {
        let r = origin
            .post(
                "/backend.api-keys.create",
                json!({ "name": format!("k{i}"), "scopes": ["read:orders"] }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        keys.push((
            r.body["id"].as_str().expect("id").to_owned(),
            r.body["key"].as_str().expect("key").to_owned(),
        ));
    }
    for (id, _) in &keys[..10] {
        let r = origin
            .delete("/backend.api-keys.revoke", json!({ "key_id": id }))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }

    // A new, empty namespace: the edge knows none of the keys.
    let mut edge = Edge::on_free_port();
    edge.start().await;
    assert_eq!(
        edge.verify(&keys[20].1, &[]).await.body["code"],
        "NOT_FOUND"
    );

    // sync --full while origin serves (without the publisher lock): sync publishes itself.
    let kv_env = [
        ("KV_API_BASE", edge.kv_api_base()),
        ("KV_NAMESPACE_ID", KV_NAMESPACE_ID.to_owned()),
    ];
    let kv_env: Vec<(&str, &str)> = kv_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stdout = sync_full(
        &origin,
        &kv_env,
        "(40 written by this command, 0 by the running origin",
    );
    report_measurement(&format!("origin sync --full: {}", stdout.trim()));
    for (i, (id, key)) in keys.iter().enumerate() {
        let r = edge.verify(key, &["read:orders"]).await;
        let want = if i < 10 { "REVOKED" } else { "VALID" };
        assert_eq!(
            (r.body["code"].as_str(), r.body["id"].as_str()),
            (Some(want), Some(id.as_str()))
        );
    }

    // Origin now publishes (it holds the lock); a second sync watches it drain instead of
    // writing beside it, and still finishes.
    for (name, value) in &kv_env {
        origin.set_env(name, value);
    }
    origin.restart().await;
    sync_full(
        &origin,
        &kv_env,
        "(0 written by this command, 40 by the running origin",
    );
    let health = origin.get("/healthz").await;
    assert_eq!(health.body["kv_publisher"]["pending"], 0, "{}", health.body);

    // Without KV settings, sync refuses at once and names them.
    let out = origin.run_command(&["sync", "--full"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KV_API_BASE"));
}

/// Runs `origin sync --full` against `origin`'s database; checks that it succeeded, synced all
/// 40 keys and says `who` wrote them. Returns its summary line.
fn sync_full(origin: &TestApp, kv_env: &[(&str, &str)], who: &str) -> String {
    let out = origin.run_command_with(&["sync", "--full"], kv_env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("synced 40 keys") && stdout.contains(who),
        "{stdout}"
    );
    stdout
}
