//! No secret at rest: after a full run (create on both surfaces, verify at origin and at the
//! edge, the gateway, update, revoke, usage reports, admin token rotation, `sync --full`), every
//! issued key, every admin token, both signing secrets and the audit chain key are searched for in the database
//! file and its WAL, every log at its most verbose level (origin at `trace`, wrangler at
//! `debug`, the upstream, `sync`), every file of the Worker's local KV and the audit log.
//! Zero hits, with positive controls proving the scan reads the right places.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::edge::{KV_NAMESPACE_ID, Stack, UPSTREAM_SECRET, USAGE_SECRET, report_measurement};
use common::{ADMIN_TOKEN, AUDIT_CHAIN_KEY, TestApp, contains_bytes, files_under};
use reqwest::{Method, StatusCode};
use serde_json::json;

const SECOND_ADMIN_TOKEN: &str = "rotated-admin-token-eeeeeeeeeeeeeeeeeeeeeeee";

#[tokio::test]
async fn no_secret_or_admin_token_is_stored_logged_or_published() {
    let both = format!("{ADMIN_TOKEN},{SECOND_ADMIN_TOKEN}");
    let mut stack = Stack::start(&[("ADMIN_TOKEN", &both)]).await;
    let mut secrets: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();

    // Issue keys on both surfaces.
    for i in 0..3 {
        let (id, key) = stack
            .create(&["read:orders"], json!({"name": format!("tutorial-{i}")}))
            .await;
        ids.push(id);
        secrets.push(key);
        let (id, key) = stack
            .origin
            .create_key(&format!("clerk-{i}"), &["read:orders", "write:orders"])
            .await;
        ids.push(id);
        secrets.push(key);
    }
    stack.wait_published(Duration::from_secs(20)).await;

    // Use them: origin verify on both surfaces, edge verify, the gateway (usage flows back).
    for key in &secrets {
        assert_eq!(
            stack.origin.verify(key, &["read:orders"]).await.status,
            StatusCode::OK
        );
        let r = stack
            .origin
            .post("/backend.api-keys.verify", json!({"key": key}))
            .await;
        assert_eq!(r.body["valid"], true);
        assert_eq!(
            stack.edge.verify(key, &["read:orders"]).await.body["valid"],
            true
        );
        let g = stack
            .edge
            .gateway(Method::GET, "/orders/7", Some(key))
            .await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    }
    // Failed attempts log too: a near-miss key and a wrong admin token.
    let near_miss = format!("{}x", &secrets[0][..secrets[0].len() - 1]);
    stack.origin.verify(&near_miss, &[]).await;
    stack.edge.verify(&near_miss, &[]).await;

    // Change and revoke.
    stack
        .origin
        .patch(
            &format!("/v1/api_keys/{}", ids[1]),
            json!({"scopes": ["read:orders"]}),
        )
        .await;
    stack.revoke(&ids[0]).await;
    let r = stack
        .origin
        .post(
            &format!("/v1/api_keys/{}/revoke", ids[3]),
            json!({"revocation_reason": "leaked"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // Rotate admin tokens: the second one alone, the first refused.
    stack.origin.set_env("ADMIN_TOKEN", SECOND_ADMIN_TOKEN);
    stack.origin.restart().await;
    let http = reqwest::Client::new();
    let with = |token: &str| {
        http.get(format!(
            "{}/v1/api_keys?limit=100&include_invalid=true",
            stack.origin.base
        ))
        .bearer_auth(token)
    };
    assert_eq!(
        TestApp::send(with(ADMIN_TOKEN)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let listed = TestApp::send(with(SECOND_ADMIN_TOKEN)).await;
    assert_eq!(listed.status, StatusCode::OK);
    let created = TestApp::send(
        http.post(format!("{}/v1/api_keys", stack.origin.base))
            .bearer_auth(SECOND_ADMIN_TOKEN)
            .json(&json!({"name": "after rotation", "subject": "acme"})),
    )
    .await;
    secrets.push(created.body["secret"].as_str().expect("secret").to_owned());

    // A full sync into the same namespace, with its own log at trace level.
    let kv_env = [
        ("KV_API_BASE", stack.edge.kv_api_base()),
        ("KV_NAMESPACE_ID", KV_NAMESPACE_ID.to_owned()),
        ("RUST_LOG", "trace".to_owned()),
    ];
    let kv_env: Vec<(&str, &str)> = kv_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sync = stack.origin.run_command_with(&["sync", "--full"], &kv_env);
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    stack.wait_published(Duration::from_secs(20)).await;
    // Let usage reports arrive and flush, then stop cleanly so every log is complete.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let audit = TestApp::send(
        http.get(format!("{}/v1/audit_log?limit=500", stack.origin.base))
            .bearer_auth(SECOND_ADMIN_TOKEN),
    )
    .await;
    assert_eq!(audit.status, StatusCode::OK);
    let db_files: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", stack.origin.db_path().display())))
        .filter(|p| p.exists())
        .collect();
    let running_db: Vec<(String, Vec<u8>)> = db_files
        .iter()
        .map(|p| {
            (
                format!("{} (running)", p.display()),
                std::fs::read(p).expect("read"),
            )
        })
        .collect();
    stack.origin.stop().await;
    stack.edge.stop();

    // Everything to scan.
    let mut scanned: Vec<(String, Vec<u8>)> = running_db;
    for p in files_under(stack.origin.db_path().parent().expect("dir")) {
        scanned.push((p.display().to_string(), std::fs::read(&p).expect("read")));
    }
    for p in files_under(&stack.edge.state_dir()) {
        scanned.push((p.display().to_string(), std::fs::read(&p).expect("read")));
    }
    scanned.push(("wrangler logs".into(), stack.edge.logs().into_bytes()));
    scanned.push((
        "origin sync output".into(),
        [sync.stdout.clone(), sync.stderr.clone()].concat(),
    ));
    scanned.push((
        "audit log (API)".into(),
        audit.body.to_string().into_bytes(),
    ));
    scanned.push(("upstream log".into(), stack.upstream.log().into_bytes()));

    let mut needles: Vec<(String, String)> = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        needles.push((format!("issued key #{i}"), s.clone()));
        // The random body alone (without prefix or checksum) must not appear either.
        let body = &s[s.rfind('_').expect("prefix") + 1..][..32];
        needles.push((format!("body of issued key #{i}"), body.to_owned()));
    }
    needles.push(("admin token 1".into(), ADMIN_TOKEN.into()));
    needles.push(("admin token 2".into(), SECOND_ADMIN_TOKEN.into()));
    needles.push(("usage signing secret".into(), USAGE_SECRET.into()));
    needles.push(("upstream signing secret".into(), UPSTREAM_SECRET.into()));
    needles.push(("audit chain key".into(), AUDIT_CHAIN_KEY.into()));

    let mut hits = Vec::new();
    for (place, bytes) in &scanned {
        for (what, needle) in &needles {
            if contains_bytes(bytes, needle.as_bytes()) {
                hits.push(format!("{what} in {place}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets found: {hits:#?}");

    // Positive controls: the scan reads the places where the keys' traces really are.
    let all: Vec<u8> = scanned.iter().flat_map(|(_, b)| b.clone()).collect();
    let origin_logs = stack.origin.logs();
    assert!(
        origin_logs.contains("TRACE"),
        "origin logged at trace level"
    );
    assert!(
        stack.edge.logs().to_lowercase().contains("debug"),
        "wrangler logged at debug level"
    );
    for id in &ids {
        assert!(
            contains_bytes(&all, id.as_bytes()),
            "key id {id} appears somewhere scanned"
        );
    }
    let kv_files = files_under(&stack.edge.state_dir());
    let kv_bytes: Vec<u8> = kv_files
        .iter()
        .flat_map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert!(
        contains_bytes(&kv_bytes, ids[2].as_bytes()),
        "KV's files hold the published records"
    );
    let bytes: usize = scanned.iter().map(|(_, b)| b.len()).sum();
    for (what, needle) in &needles {
        assert!(
            !origin_logs.contains(needle.as_str()),
            "{what} in origin's logs"
        );
    }
    report_measurement(&format!(
        "secrets: {} secrets and tokens searched in {} files and logs ({:.1} MB, origin at trace, wrangler at debug): 0 found",
        needles.len(),
        scanned.len(),
        bytes as f64 / 1e6
    ));
}
