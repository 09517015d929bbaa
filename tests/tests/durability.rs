//! What origin keeps across restarts and crashes, and what it never keeps: plaintext secrets.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::time::Duration;

use common::{ADMIN_TOKEN, TestApp, contains_bytes, eventually, origin_binary};
use reqwest::StatusCode;
use serde_json::json;

async fn verify_code(app: &TestApp, secret: &str) -> String {
    let r = app
        .post("/backend.api-keys.verify", json!({ "key": secret }))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    r.body["code"].as_str().expect("code").to_owned()
}

#[tokio::test]
async fn keys_and_revocations_survive_a_clean_restart() {
    let mut app = TestApp::start().await;
    let (_, live) = app.create_key("acme", &["read:orders"]).await;
    let (revoked_id, revoked) = app.create_key("acme", &["read:orders"]).await;
    app.post(&format!("/v1/api_keys/{revoked_id}/revoke"), json!({}))
        .await;
    assert_eq!(verify_code(&app, &live).await, "VALID");

    app.restart().await;
    assert_eq!(verify_code(&app, &live).await, "VALID");
    assert_eq!(verify_code(&app, &revoked).await, "REVOKED");
    let key = app.get(&format!("/v1/api_keys/{revoked_id}")).await;
    assert_eq!(key.body["revoked"], true);
    assert!(
        app.logs().contains("shutting down"),
        "SIGTERM ran the clean shutdown"
    );
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let mut app = TestApp::start().await;
    let mut live = Vec::new();
    let mut revoked = Vec::new();
    for i in 0..10 {
        let (id, secret) = app.create_key("acme", &["read:orders"]).await;
        if i % 2 == 0 {
            let r = app
                .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
                .await;
            assert_eq!(r.status, StatusCode::OK);
            revoked.push(secret);
        } else {
            let r = app
                .patch(
                    &format!("/v1/api_keys/{id}"),
                    json!({ "scopes": ["read:customers"] }),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
            live.push((id, secret));
        }
    }
    // No clean shutdown: whatever was acknowledged must already be on disk.
    app.kill();
    app.start_again().await;
    for secret in &revoked {
        assert_eq!(verify_code(&app, secret).await, "REVOKED");
    }
    for (id, secret) in &live {
        assert_eq!(verify_code(&app, secret).await, "VALID");
        assert_eq!(
            app.get(&format!("/v1/api_keys/{id}")).await.body["scopes"],
            json!(["read:customers"])
        );
    }
    let chain = app.run_command(&["audit", "verify"]);
    assert!(chain.status.success());
    assert!(
        String::from_utf8_lossy(&chain.stdout).contains("20 entries"),
        "10 creates, 5 revokes, 5 updates"
    );
}

#[tokio::test]
async fn last_used_at_is_flushed_in_batches_and_on_shutdown() {
    // A long interval: only the clean shutdown can have written it.
    let mut app = TestApp::builder()
        .env("LAST_USED_FLUSH_MS", "3600000")
        .start()
        .await;
    let (id, secret) = app.create_key("acme", &[]).await;
    assert_eq!(verify_code(&app, &secret).await, "VALID");
    let used = app.get(&format!("/v1/api_keys/{id}")).await.body["last_used_at"].clone();
    assert!(used.is_i64(), "the API shows a pending use at once");
    app.restart().await;
    assert_eq!(
        app.get(&format!("/v1/api_keys/{id}")).await.body["last_used_at"],
        used,
        "flushed on shutdown"
    );

    // A short interval: a crash after one interval loses nothing.
    let mut fast = TestApp::builder()
        .env("LAST_USED_FLUSH_MS", "50")
        .start()
        .await;
    let (id, secret) = fast.create_key("acme", &[]).await;
    assert_eq!(verify_code(&fast, &secret).await, "VALID");
    let used = fast.get(&format!("/v1/api_keys/{id}")).await.body["last_used_at"].clone();
    // The event, not a guess at its time: the batch writer logs each flush (at debug).
    let fast_ref = &fast;
    eventually(Duration::from_secs(10), || async move {
        let logs = fast_ref.logs();
        if logs.contains("flushed last_used_at") {
            Ok(())
        } else {
            Err(format!("no flush logged yet:\n{logs}"))
        }
    })
    .await;
    fast.kill();
    fast.start_again().await;
    assert_eq!(
        fast.get(&format!("/v1/api_keys/{id}")).await.body["last_used_at"],
        used,
        "flushed by the batch writer"
    );
}

#[tokio::test]
async fn no_plaintext_secret_or_admin_token_in_the_database_or_logs() {
    let mut app = TestApp::start().await;
    let mut secrets = Vec::new();
    for i in 0..5 {
        let (id, secret) = app
            .create_key(&format!("partner-{i}"), &["read:orders"])
            .await;
        assert_eq!(verify_code(&app, &secret).await, "VALID");
        // A near miss is logged nowhere either.
        let mut typo = secret.clone();
        typo.pop();
        typo.push('0');
        verify_code(&app, &typo).await;
        app.patch(&format!("/v1/api_keys/{id}"), json!({ "name": "renamed" }))
            .await;
        if i % 2 == 0 {
            app.post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
                .await;
        }
        secrets.push(secret);
    }
    let tutorial = app
        .post(
            "/backend.api-keys.create",
            json!({ "name": "t", "scopes": ["read:orders"] }),
        )
        .await;
    secrets.push(tutorial.body["key"].as_str().expect("key").to_owned());
    let database_while_running = app.database_bytes();
    app.restart().await;
    let database = [database_while_running, app.database_bytes()].concat();
    let logs = app.logs();
    assert!(
        logs.contains("request"),
        "logs were captured at trace level"
    );

    for secret in &secrets {
        let body = &secret[secret.rfind('_').expect("prefix") + 1..];
        for needle in [secret.as_str(), body] {
            assert!(
                !contains_bytes(&database, needle.as_bytes()),
                "secret in the database files"
            );
            assert!(!logs.contains(needle), "secret in the logs");
        }
    }
    assert!(
        !contains_bytes(&database, ADMIN_TOKEN.as_bytes()),
        "admin token in the database"
    );
    assert!(!logs.contains(ADMIN_TOKEN), "admin token in the logs");
    // What is stored is the SHA-256 of each secret: check one by looking it up by hash.
    let hash = latchkey_shared::ApiKey::parse(&secrets[1])
        .expect("parses")
        .hash();
    assert!(
        contains_bytes(&database, hash.as_bytes()),
        "the hash is the lookup index"
    );
}

#[test]
fn refuses_to_start_without_an_admin_token_and_names_the_variable() {
    let out = std::process::Command::new(origin_binary())
        .arg("serve")
        .env_clear()
        .env("ORIGIN_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run origin");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ADMIN_TOKEN"), "{stderr}");

    let out = std::process::Command::new(origin_binary())
        .arg("serve")
        .env_clear()
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("KEY_PREFIX", "Not A Prefix")
        .output()
        .expect("run origin");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY_PREFIX"));

    let out = std::process::Command::new(origin_binary())
        .arg("frobnicate")
        .output()
        .expect("run origin");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: origin"));
}

/// The database, its WAL and shared-memory files and the audit checkpoints hold key hashes and
/// the audit log: they are created readable by origin's user alone, whatever the umask (here
/// 000, which would make them world-writable), and an existing database is tightened at start.
#[tokio::test]
async fn the_database_and_checkpoint_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;

    let mut app = TestApp::builder().umask(0o000).start().await;
    app.create_key("acme", &["read:orders"]).await;
    let files = |app: &TestApp| {
        let db = app.db_path().display().to_string();
        [
            db.clone(),
            format!("{db}-wal"),
            format!("{db}-shm"),
            app.checkpoint_path().display().to_string(),
        ]
    };
    for file in files(&app) {
        let mode = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} has mode {:o}", mode & 0o777);
    }
    // A database made world-readable before (by an older origin) is made private at start.
    app.stop().await;
    for file in files(&app) {
        if std::path::Path::new(&file).exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
    }
    app.start_again().await;
    app.create_key("acme", &["read:orders"]).await;
    for file in files(&app) {
        let mode = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} has mode {:o}", mode & 0o777);
    }
}

/// The README promises that an acknowledged write survives a power cut: that rests on WAL with
/// `synchronous=FULL`. Origin reads both back from its writer connection at start, logs them and
/// refuses to run without them; this checks the log line, so a change to `synchronous=NORMAL`
/// (or a filesystem where WAL cannot be used) fails here.
#[tokio::test]
async fn the_writer_runs_in_wal_mode_with_synchronous_full() {
    let app = TestApp::start().await;
    let line = app
        .logs()
        .lines()
        .find(|l| l.contains("database durability"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no durability line in the log:\n{}", app.logs()));
    assert!(
        line.contains("journal_mode=wal") && line.contains("synchronous=full"),
        "{line}"
    );
}
