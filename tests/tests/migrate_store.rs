//! `origin migrate-store`: a SQLite database copied into PostgreSQL serves the same keys, the
//! same verifiable audit chain (against the same checkpoints) and the same pending deliveries.

#![allow(clippy::expect_used, clippy::panic, reason = "test code")]

mod common;

use common::{AUDIT_CHAIN_KEY, TestApp, fresh_postgres_database, origin_binary};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

/// The PostgreSQL server of the tests (`./dev test` starts one).
fn server() -> String {
    std::env::var("TEST_DATABASE_URL").expect(
        "TEST_DATABASE_URL is unset: migrate-store needs a PostgreSQL server (./dev test starts one)",
    )
}

fn migrate(from: &str, to: &str, env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(origin_binary())
        .args(["migrate-store", "--from", from, "--to", to])
        .env_clear()
        .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY)
        .envs(env.iter().copied())
        .output()
        .expect("run origin migrate-store")
}

/// Every key as the admin API shows it, and the audit log, in order.
async fn snapshot(app: &TestApp) -> (Value, Value) {
    let keys = app.get("/v1/api_keys?limit=500&include_invalid=true").await;
    assert_eq!(keys.status, StatusCode::OK, "{}", keys.body);
    let log = app.get("/v1/audit_log?limit=500").await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.body);
    (keys.body, log.body)
}

#[tokio::test]
async fn a_sqlite_database_moves_to_postgresql_whole() {
    let server = server();
    // Origin on SQLite, without KV: every change waits in the outbox.
    let mut sqlite = TestApp::builder().on_sqlite().start().await;
    let (kept, kept_secret) = sqlite.create_key("acme", &["read:orders"]).await;
    let (revoked, revoked_secret) = sqlite.create_key("acme", &[]).await;
    let (deleted, _) = sqlite.create_key("globex", &[]).await;
    let renamed = sqlite
        .patch(
            &format!("/v1/api_keys/{kept}"),
            json!({ "name": "renamed" }),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    let r = sqlite
        .post(&format!("/v1/api_keys/{revoked}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let d = sqlite
        .delete(&format!("/v1/api_keys/{deleted}"), json!({}))
        .await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    let before = snapshot(&sqlite).await;
    sqlite.stop().await;
    let waiting = {
        let db = rusqlite::Connection::open(sqlite.db_path()).expect("open");
        db.query_row("SELECT COUNT(*) FROM kv_outbox", [], |row| {
            row.get::<_, i64>(0)
        })
        .expect("count")
    };
    assert!(waiting >= 5, "changes wait for delivery: {waiting}");

    let to = fresh_postgres_database(&server).await;
    let from = sqlite.database_url();
    let copied = migrate(&from, &to, &[]);
    let stdout = String::from_utf8_lossy(&copied.stdout);
    assert!(
        copied.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert!(stdout.contains("copied 3 keys"), "{stdout}");
    assert!(
        stdout.contains(&format!("{waiting} outbox rows")),
        "{stdout}"
    );
    assert!(
        stdout.contains("audit log OK"),
        "the copy's chain verified: {stdout}"
    );
    assert!(
        stdout.contains(&sqlite.checkpoint_path().display().to_string()),
        "the same checkpoints: {stdout}"
    );

    // The same pending deliveries, in the same order.
    let mut pg = sqlx::PgConnection::connect(&to).await.expect("connect");
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT seq, key_id FROM kv_outbox ORDER BY seq")
        .fetch_all(&mut pg)
        .await
        .expect("outbox");
    let db = rusqlite::Connection::open(sqlite.db_path()).expect("open");
    let mut statement = db
        .prepare("SELECT seq, key_id FROM kv_outbox ORDER BY seq")
        .expect("prepare");
    let source: Vec<(i64, String)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(rows, source);

    // Origin on PostgreSQL serves what origin on SQLite did, and goes on writing the chain.
    let checkpoints = sqlite.checkpoint_path().display().to_string();
    // The SQLite file's own checkpoints, before origin on PostgreSQL extends the chain (and the
    // file) beyond what the file holds.
    let sqlite_checkpoints = sqlite.dir().join("sqlite-only.checkpoints");
    std::fs::copy(sqlite.checkpoint_path(), &sqlite_checkpoints).expect("copy checkpoints");
    let postgres = TestApp::builder()
        .env("DATABASE_URL", &to)
        .env("AUDIT_CHECKPOINT_FILE", &checkpoints)
        .start()
        .await;
    assert_eq!(snapshot(&postgres).await, before);
    assert_eq!(
        postgres.verify(&kept_secret, &["read:orders"]).await.status,
        StatusCode::OK
    );
    let refused = postgres.verify(&revoked_secret, &[]).await;
    assert_eq!(
        refused.body["errors"][0]["code"], "api_key_revoked",
        "{}",
        refused.body
    );
    let (_, fresh) = postgres.create_key("acme", &[]).await;
    assert_eq!(postgres.verify(&fresh, &[]).await.status, StatusCode::OK);
    let verified = postgres.run_command_with(
        &["audit", "verify"],
        &[("AUDIT_CHECKPOINT_FILE", &checkpoints)],
    );
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // A second copy into a database that holds keys is refused, and writes nothing.
    // Now the chain goes on in PostgreSQL: against the moved-on checkpoints the SQLite file
    // looks truncated, and is not copied again.
    let stale = migrate(&from, &to, &[]);
    assert_eq!(stale.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(stderr.contains("nothing was copied"), "{stderr}");
    let sqlite_checkpoints = sqlite_checkpoints.display().to_string();
    let again = migrate(
        &from,
        &to,
        &[("AUDIT_CHECKPOINT_FILE", &sqlite_checkpoints)],
    );
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("empty database only"), "{stderr}");
    let keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
        .fetch_one(&mut pg)
        .await
        .expect("count");
    assert_eq!(keys, 4, "three copied, one created since");
}

#[tokio::test]
async fn migrate_store_refuses_what_it_cannot_copy() {
    let server = server();
    let to = fresh_postgres_database(&server).await;
    let dir = tempfile::tempdir().expect("dir");
    let from = format!("sqlite://{}", dir.path().join("db").display());
    for (from, to, expected) in [
        (
            "postgres://x/y",
            to.as_str(),
            "--from must name a SQLite file",
        ),
        (
            "sqlite::memory:",
            to.as_str(),
            "--from must name a SQLite file",
        ),
        (
            from.as_str(),
            "sqlite://elsewhere.db",
            "--to must name a PostgreSQL database",
        ),
    ] {
        let out = migrate(from, to, &[]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
    let missing = migrate(&from, &to, &[]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("there is no SQLite database"), "{stderr}");
    assert!(
        !dir.path().join("db").exists(),
        "a mistyped source is not created"
    );
    let no_key = std::process::Command::new(origin_binary())
        .args(["migrate-store", "--from", &from, "--to", &to])
        .env_clear()
        .output()
        .expect("run");
    assert_eq!(no_key.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("AUDIT_CHAIN_KEY"));
}

/// A password in a PostgreSQL URL is never printed or logged: not by `migrate-store`, not by
/// `origin serve` (the test server trusts local connections, so any password opens it).
#[tokio::test]
async fn a_database_password_is_never_printed_or_logged() {
    const PASSWORD: &str = "pg-password-that-must-not-leak-7f3a";
    let to = fresh_postgres_database(&server()).await;
    let with_password = to.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PASSWORD}@"),
        1,
    );
    assert_ne!(with_password, to, "{to}");
    let mut sqlite = TestApp::builder().on_sqlite().start().await;
    sqlite.create_key("acme", &[]).await;
    sqlite.stop().await;
    let copied = migrate(&sqlite.database_url(), &with_password, &[]);
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&copied.stdout),
        String::from_utf8_lossy(&copied.stderr)
    );
    assert!(printed.contains("postgres:***@"), "{printed}");
    assert!(!printed.contains(PASSWORD), "{printed}");
    let refused = migrate(&sqlite.database_url(), &with_password, &[]);
    assert!(!String::from_utf8_lossy(&refused.stderr).contains(PASSWORD));
    // A command that cannot open the database names it in its error, without the password.
    let missing = match with_password.split_once('?') {
        Some((base, options)) => format!("{base}_missing?{options}"),
        None => format!("{with_password}_missing"),
    };
    let verify = std::process::Command::new(origin_binary())
        .args(["audit", "verify"])
        .env_clear()
        .env("DATABASE_URL", &missing)
        .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY)
        .env("AUDIT_CHECKPOINT_FILE", "/dev/null")
        .output()
        .expect("run origin audit verify");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert_eq!(verify.status.code(), Some(1), "{said}");
    assert!(
        said.contains("cannot open postgres://postgres:***@"),
        "{said}"
    );
    assert!(!said.contains(PASSWORD), "{said}");

    let app = TestApp::builder()
        .env("DATABASE_URL", &with_password)
        .start()
        .await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        app.logs().contains("postgres:***@"),
        "the database is named, without its password"
    );
    assert!(
        !app.logs().contains(PASSWORD),
        "origin at trace never logs the password"
    );
}
