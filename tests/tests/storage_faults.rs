//! Storage faults: the database's filesystem fills up, then turns read-only. Origin must refuse
//! writes with 503 and a clear JSON error and keep serving reads and verifications. When space
//! returns it takes writes again without a restart; a read-only filesystem is left for a
//! restart (origin opened it read-only), whether or not the last clean shutdown left a WAL.
//!
//! The faults are real: the database lives on a small tmpfs that the test fills and remounts
//! read-only. That needs `mount` (root, as on CI); without it the test fails and says so.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::json;

/// A tmpfs of `size`, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill it: run it as root (CI does)"
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {mode}");
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 16 * 1024];
        while file.write_all(&chunk).is_ok() {}
        // Single bytes into the last partial block.
        while file.write_all(&[0]).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

async fn create(app: &TestApp, n: usize) -> (StatusCode, serde_json::Value) {
    let r = app
        .post(
            "/v1/api_keys",
            json!({"name": format!("k{n}"), "subject": "acme", "description": "d".repeat(900)}),
        )
        .await;
    (r.status, r.body)
}

/// Tries writes until one is refused; every answer must be 200 or a clean 503.
async fn write_until_refused(
    app: &TestApp,
    what: &str,
    acknowledged: &mut Vec<String>,
) -> serde_json::Value {
    for n in 0..500 {
        let (status, body) = create(app, n).await;
        match status {
            StatusCode::CREATED => acknowledged.push(body["id"].as_str().expect("id").to_owned()),
            StatusCode::SERVICE_UNAVAILABLE => return body,
            other => panic!("{what}: write answered {other}: {body}"),
        }
    }
    panic!("{what}: 500 writes were all accepted");
}

async fn reads_and_verifies_still_work(app: &TestApp, id: &str, secret: &str) {
    let r = app.get(&format!("/v1/api_keys/{id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}\n{}", r.body, app.logs());
    let r = app.get("/v1/api_keys?limit=5").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.verify(secret, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "verify: {}", r.body);
}

#[tokio::test]
async fn a_full_or_read_only_disk_refuses_writes_serves_reads_and_recovers() {
    let disk = SmallDisk::mount("3m");
    let url = format!("sqlite://{}", disk.path().join("latchkey.db").display());
    let mut app = TestApp::builder()
        .env("DATABASE_URL", &url)
        .env("LAST_USED_FLUSH_MS", "50")
        .start()
        .await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;

    // Disk full.
    let filler = disk.fill();
    let mut acknowledged = vec![id.clone()];
    let refused = write_until_refused(&app, "disk full", &mut acknowledged).await;
    assert_eq!(
        refused["errors"][0]["code"], "storage_unavailable",
        "{refused}"
    );
    reads_and_verifies_still_work(&app, &id, &secret).await;
    let r = app
        .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
        .await;
    assert!(
        r.status == StatusCode::SERVICE_UNAVAILABLE || r.status == StatusCode::OK,
        "revoke on a full disk: {} {}",
        r.status,
        r.body
    );
    let revoked_while_full = r.status == StatusCode::OK;
    let health = app.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "reads work, so origin is up");

    // Space returns: writes work again, no restart.
    std::fs::remove_file(&filler).expect("remove filler");
    let (status, body) = create(&app, 10_000).await;
    assert_eq!(status, StatusCode::CREATED, "after space returned: {body}");
    // Committed for real: another connection (the readers') sees it.
    let new_id = body["id"].as_str().expect("id");
    acknowledged.push(new_id.to_owned());
    let r = app.get(&format!("/v1/api_keys/{new_id}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a write acknowledged after the disk-full error is not visible: {}",
        r.body
    );

    // Read-only filesystem. Linux will not turn a filesystem read-only while files on it are
    // open for writing, so origin is stopped, the filesystem remounted, and origin started on it.
    let (id2, secret2) = app.create_key("globex", &[]).await;
    acknowledged.push(id2.clone());
    app.stop().await;
    disk.remount("ro");
    app.start_again().await;
    let refused = write_until_refused(&app, "read-only", &mut acknowledged).await;
    assert_eq!(
        refused["errors"][0]["code"], "storage_unavailable",
        "{refused}"
    );
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the database is read-only")),
        "{refused}"
    );
    reads_and_verifies_still_work(&app, &id2, &secret2).await;

    // Whether the stop above left the WAL and its index behind depends on which connection
    // closed last. Without them SQLite cannot read a WAL database on a read-only filesystem
    // unless it is opened as immutable, which origin does when the WAL holds nothing. Make that
    // case certain: the last connection of a clean close folds the WAL in and deletes it.
    app.stop().await;
    disk.remount("rw");
    let db = disk.path().join("latchkey.db");
    let conn = rusqlite::Connection::open(&db).expect("open the database");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    drop(conn);
    let wal = disk.path().join("latchkey.db-wal");
    assert!(!wal.exists(), "a clean close leaves no WAL");
    disk.remount("ro");
    let immutable = |app: &TestApp| app.logs().matches("opened as an immutable file").count();
    let before = immutable(&app);
    app.start_again().await;
    assert_eq!(immutable(&app), before + 1, "{}", app.logs());
    let refused = write_until_refused(&app, "read-only, no WAL", &mut acknowledged).await;
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the database is read-only")),
        "{refused}"
    );
    reads_and_verifies_still_work(&app, &id2, &secret2).await;
    app.stop().await;
    disk.remount("rw");
    app.start_again().await;
    let (status, body) = create(&app, 20_000).await;
    acknowledged.push(body["id"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        status,
        StatusCode::CREATED,
        "after remounting read-write: {body}"
    );

    // Nothing acknowledged was lost, and the audit chain is whole.
    let r = app.get(&format!("/v1/api_keys/{id}")).await;
    assert_eq!(r.body["revoked"], revoked_while_full, "{}", r.body);
    for id in &acknowledged {
        let r = app.get(&format!("/v1/api_keys/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "acknowledged key {id} lost");
    }
    assert!(!app.logs().contains("panicked"));
    let out = app.run_command_with(&["audit", "verify"], &[("DATABASE_URL", &url)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::edge::report_measurement(&format!(
        "storage faults: disk full and read-only filesystem both answered writes 503 storage_unavailable, served reads and verifies, and took writes again; {} acknowledged writes all present",
        acknowledged.len()
    ));
}
