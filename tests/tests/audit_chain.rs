//! The audit chain against someone who can write the database but has neither the chain's key
//! (`AUDIT_CHAIN_KEY`) nor the checkpoint file: they drop the append-only triggers, edit or
//! delete entries (the newest included) and recompute the chain with SHA-256, and
//! `origin audit verify` must still exit 1 and name the problem.
//!
//! The database is edited with Python's `sqlite3` module, as an attacker would, not through
//! origin.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, AUDIT_CHAIN_KEY, TestApp, origin_binary};
use reqwest::StatusCode;
use serde_json::json;

/// Edits `audit_log` like an attacker with write access to the file: `argv[1]` the database,
/// `argv[2]` what to do. Hashes are recomputed exactly as an unkeyed chain is computed
/// (SHA-256 over the length-prefixed fields, origin/src/audit.rs), and where the table says
/// which chain version an entry uses, every entry is made to claim the unkeyed one.
const TAMPER: &str = r#"
import hashlib, sqlite3, struct, sys
db, mode = sys.argv[1], sys.argv[2]
c = sqlite3.connect(db)
c.executescript("DROP TRIGGER IF EXISTS audit_log_no_update; DROP TRIGGER IF EXISTS audit_log_no_delete;")
columns = [r[1] for r in c.execute("PRAGMA table_info(audit_log)")]

def entry_hash(prev, seq, at, actor, action, key_id, details):
    h = hashlib.sha256()
    for f in [prev.encode(), struct.pack(">q", seq), struct.pack(">q", at), actor.encode(),
              action.encode(), (key_id or "").encode(), details.encode()]:
        h.update(struct.pack(">Q", len(f)) + f)
    return h.hexdigest()

def rechain(downgrade):
    prev = "0" * 64
    rows = c.execute("SELECT seq, at, actor, action, key_id, details FROM audit_log ORDER BY seq").fetchall()
    for (seq, at, actor, action, key_id, details) in rows:
        h = entry_hash(prev, seq, at, actor, action, key_id, details)
        c.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, seq))
        prev = h
    if downgrade and "chain" in columns:
        c.execute("UPDATE audit_log SET chain = 1")

if mode == "delete-newest":
    c.execute("DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)")
elif mode == "edit-rechain":
    c.execute("UPDATE audit_log SET actor = 'admin:someone-else' WHERE seq = 2")
    rechain(False)
elif mode == "delete-middle":
    c.execute("DELETE FROM audit_log WHERE seq = 2")
    for (seq,) in c.execute("SELECT seq FROM audit_log WHERE seq > 2 ORDER BY seq").fetchall():
        c.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq - 1, seq))
    rechain(True)
elif mode == "rewrite":
    rows = c.execute("SELECT seq, at, actor, action, key_id, details FROM audit_log ORDER BY seq").fetchall()
    c.execute("DELETE FROM audit_log")
    for (seq, at, actor, action, key_id, details) in rows:
        c.execute("INSERT INTO audit_log (seq, at, actor, action, key_id, details, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, '', '')",
                  (seq, at + 1, "admin:forger", action, key_id, details))
    rechain(True)
elif mode == "legacy":
    rechain(True)
elif mode == "wipe":
    c.execute("DELETE FROM audit_log")
elif mode == "backdoor-key":
    # A key inserted directly, without origin and so without an audit entry: a copy of an
    # existing key's row under a new id and secret hash.
    cols = [r[1] for r in c.execute("PRAGMA table_info(api_keys)")]
    row = list(c.execute("SELECT * FROM api_keys LIMIT 1").fetchone())
    row[cols.index("id")] = "key_backdoor0000000000000"
    row[cols.index("secret_hash")] = bytes(range(32))
    c.execute("INSERT INTO api_keys (%s) VALUES (%s)" % (", ".join(cols), ", ".join("?" * len(cols))), row)
elif mode == "edit-first":
    c.execute("UPDATE audit_log SET actor = 'admin:someone-else' WHERE seq = 1")
else:
    sys.exit("unknown mode " + mode)
c.commit()
"#;

fn tamper(app: &TestApp, mode: &str) {
    let out = Command::new("python3")
        .args(["-c", TAMPER])
        .arg(app.db_path())
        .arg(mode)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}; stdout: {}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Runs `origin serve`, which must refuse to start: an origin that starts serving instead is
/// killed after 10 s and fails the test (it would otherwise serve for ever).
fn refused_start(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run origin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("origin started instead of refusing to: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A short history: two keys created, one renamed, one revoked (4 entries).
async fn history(app: &TestApp) {
    let (first, _) = app.create_key("acme", &["read:orders"]).await;
    let (second, _) = app.create_key("globex", &["read:orders"]).await;
    let r = app
        .patch(
            &format!("/v1/api_keys/{first}"),
            json!({ "name": "renamed" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .post(&format!("/v1/api_keys/{second}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn rewrites_with_a_recomputed_chain_and_deleted_newest_entries_are_detected() {
    let cases = [
        ("delete-newest", "the newest entries were deleted"),
        (
            "edit-rechain",
            "audit entry 1: content does not match its MAC",
        ),
        ("delete-middle", "differs from the checkpoint"),
        ("rewrite", "differs from the checkpoint"),
    ];
    // Every case runs before any assertion, so a failure shows what verify said to each.
    let mut failures = Vec::new();
    for (mode, expected) in cases {
        let mut app = TestApp::start().await;
        history(&app).await;
        app.stop().await;
        let before = app.run_command(&["audit", "verify"]);
        assert!(before.status.success(), "{mode}: {}", text(&before));
        tamper(&app, mode);
        let after = app.run_command(&["audit", "verify"]);
        eprintln!("{mode}: {}", text(&after));
        let stderr = String::from_utf8_lossy(&after.stderr);
        if after.status.code() != Some(1)
            || !stderr.contains("audit log BROKEN")
            || !stderr.contains(expected)
        {
            failures.push(format!("{mode}: {}", text(&after)));
        }
        // The checkpoints are also in origin's log (for log shipping); the log alone anchors
        // the chain as well as the checkpoint file.
        let log = app.dir().join("origin-1.log");
        let from_log = app.run_command_with(
            &["audit", "verify"],
            &[("AUDIT_CHECKPOINT_FILE", &log.display().to_string())],
        );
        if from_log.status.code() != Some(1) {
            failures.push(format!("{mode}, log as checkpoints: {}", text(&from_log)));
        }
    }
    assert!(
        failures.is_empty(),
        "not detected:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn verify_needs_the_right_key_and_the_checkpoints() {
    let mut app = TestApp::start().await;
    history(&app).await;
    app.stop().await;
    let ok = app.run_command(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("audit log OK: 4 entries") && stdout.contains("4 keyed"),
        "{}",
        text(&ok)
    );
    // The log's checkpoint lines serve as well as the file.
    let log = app.dir().join("origin-1.log");
    let from_log = app.run_command_with(
        &["audit", "verify"],
        &[("AUDIT_CHECKPOINT_FILE", &log.display().to_string())],
    );
    assert!(from_log.status.success(), "{}", text(&from_log));

    let other_key = "another-audit-chain-key-eeeeeeeeeeeeeeeeeeee";
    let wrong = app.run_command_with(&["audit", "verify"], &[("AUDIT_CHAIN_KEY", other_key)]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));

    let no_key = Command::new(origin_binary())
        .args(["audit", "verify"])
        .env_clear()
        .env("DATABASE_URL", app.database_url())
        .output()
        .expect("run origin");
    assert_eq!(no_key.status.code(), Some(1), "{}", text(&no_key));
    assert!(
        String::from_utf8_lossy(&no_key.stderr).contains("AUDIT_CHAIN_KEY"),
        "{}",
        text(&no_key)
    );

    // Without the checkpoints nothing could show that the newest entries were deleted.
    std::fs::remove_file(app.checkpoint_path()).expect("remove the checkpoints");
    let unanchored = app.run_command(&["audit", "verify"]);
    assert_eq!(unanchored.status.code(), Some(1), "{}", text(&unanchored));
    assert!(
        String::from_utf8_lossy(&unanchored.stderr).contains("no checkpoint"),
        "{}",
        text(&unanchored)
    );

    // A forged checkpoint line (an attacker who can append to the log but has no key).
    std::fs::write(
        app.checkpoint_path(),
        "{\"audit_checkpoint\":1,\"seq\":9,\"hash\":\"00\",\"at\":1,\"mac\":\"00\"}\n",
    )
    .expect("write");
    let forged = app.run_command(&["audit", "verify"]);
    assert_eq!(forged.status.code(), Some(1), "{}", text(&forged));
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("checkpoint"),
        "{}",
        text(&forged)
    );
}

/// `origin serve` over `app`'s database, as the test app runs it (for [`refused_start`]).
fn serve_command(app: &TestApp) -> Command {
    let mut cmd = Command::new(origin_binary());
    cmd.arg("serve")
        .env_clear()
        .env("ORIGIN_LISTEN", "127.0.0.1:0")
        .env("DATABASE_URL", app.database_url())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY);
    cmd
}

/// A database from before the key existed: its entries are unkeyed (chain version 1). Alone,
/// nothing vouches for them, and origin will not start on them: the operator anchors them once
/// with `origin audit anchor`, which appends a keyed entry chained onto them, and from then on
/// they cannot be rewritten unnoticed either.
#[tokio::test]
async fn entries_from_before_the_key_are_anchored_by_the_operator() {
    let mut app = TestApp::start().await;
    history(&app).await;
    app.stop().await;
    // What a database written before the key looks like: an unkeyed chain, no checkpoints.
    tamper(&app, "legacy");
    std::fs::remove_file(app.checkpoint_path()).expect("remove the checkpoints");
    let unanchored = app.run_command(&["audit", "verify"]);
    assert_eq!(unanchored.status.code(), Some(1), "{}", text(&unanchored));
    let stderr = String::from_utf8_lossy(&unanchored.stderr);
    assert!(
        stderr.contains("4 entries are unkeyed") && stderr.contains("origin audit anchor"),
        "{}",
        text(&unanchored)
    );

    // Never anchored automatically: origin refuses to start and names the command.
    let refused = refused_start(serve_command(&app));
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("origin audit anchor"),
        "{}",
        text(&refused)
    );

    // The operator anchors them, and is told what was anchored.
    let anchored = app.run_command(&["audit", "anchor"]);
    eprintln!("anchor: {}", text(&anchored));
    assert!(anchored.status.success(), "{}", text(&anchored));
    let stdout = String::from_utf8_lossy(&anchored.stdout);
    assert!(
        stdout.contains("anchored 4 unkeyed entries (1-4") && stdout.contains("with keyed entry 5"),
        "{}",
        text(&anchored)
    );
    // Once only: the chain now ends with a keyed entry.
    let again = app.run_command(&["audit", "anchor"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("nothing to anchor"),
        "{}",
        text(&again)
    );

    app.start_again().await;
    let log = app.get("/v1/audit_log").await;
    assert_eq!(
        log.body["data"][4]["action"], "audit_chain_keyed",
        "{:?}",
        log.body
    );
    // Each entry says which chain version its hash is.
    let chains: Vec<_> = log.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["chain"].clone())
        .collect();
    assert_eq!(chains, [json!(1), json!(1), json!(1), json!(1), json!(2)]);
    app.stop().await;
    let ok = app.run_command(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("4 unkeyed") && stdout.contains("anchored by entry 5"),
        "{}",
        text(&ok)
    );

    // Now an edit of an unkeyed entry breaks the keyed one after it.
    tamper(&app, "edit-first");
    let broken = app.run_command(&["audit", "verify"]);
    assert_eq!(broken.status.code(), Some(1), "{}", text(&broken));

    // Rewritten whole as unkeyed, anchor included, and the checkpoints deleted: the operator's
    // command will not anchor it again, since an `audit_chain_keyed` entry shows that the chain
    // was keyed once.
    tamper(&app, "legacy");
    std::fs::remove_file(app.checkpoint_path()).expect("remove the checkpoints");
    let reanchor = app.run_command(&["audit", "anchor"]);
    assert_eq!(reanchor.status.code(), Some(1), "{}", text(&reanchor));
    assert!(
        String::from_utf8_lossy(&reanchor.stderr)
            .contains("entry 5 is an unkeyed `audit_chain_keyed` entry"),
        "{}",
        text(&reanchor)
    );
}

/// The review's attack: someone who can write the database but has no key rewrites every
/// entry as unkeyed (version 1, hashes recomputed) and deletes the checkpoint file beside it.
/// Origin must not anchor that on its own at the next start (which made `audit verify`
/// answer OK); it refuses to start, and verify keeps failing.
#[tokio::test]
async fn a_log_rewritten_as_unkeyed_is_not_anchored_at_start() {
    let mut app = TestApp::start().await;
    history(&app).await;
    app.stop().await;
    tamper(&app, "rewrite");
    std::fs::remove_file(app.checkpoint_path()).expect("remove the checkpoints");
    let out = refused_start(serve_command(&app));
    eprintln!("serve: {}", text(&out));
    let verify = app.run_command(&["audit", "verify"]);
    eprintln!("verify: {}", text(&verify));
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unkeyed") && stderr.contains("origin audit anchor"),
        "{}",
        text(&out)
    );
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
}

/// Keys the audit log does not account for: every key is created with a `create` entry, so a
/// key without one was inserted behind origin's back, or the log was wiped (with the checkpoint
/// file, nothing else would show it).
#[tokio::test]
async fn keys_without_their_create_entry_fail_verification() {
    let mut failures = Vec::new();
    for (case, expected) in [
        (
            "wipe",
            "the audit log is empty but the database holds 2 keys",
        ),
        (
            "wipe-then-serve",
            "the audit log is empty but the database holds 2 keys",
        ),
        (
            "backdoor-key",
            "1 keys have no create entry in the audit log (the first: key_backdoor",
        ),
    ] {
        let mut app = TestApp::start().await;
        history(&app).await;
        app.stop().await;
        if case == "backdoor-key" {
            tamper(&app, case);
        } else {
            tamper(&app, "wipe");
            std::fs::remove_file(app.checkpoint_path()).expect("remove the checkpoints");
        }
        if case == "wipe-then-serve" {
            // Origin will not write a fresh keyed chain, with checkpoints, onto the wiped log
            // (it did before, and only `audit verify` could tell afterwards).
            let out = refused_start(serve_command(&app));
            eprintln!("{case}, serve: {}", text(&out));
            if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains(expected) {
                failures.push(format!("{case}, serve: {}", text(&out)));
            }
        }
        let out = app.run_command(&["audit", "verify"]);
        eprintln!("{case}: {}", text(&out));
        if out.status.code() != Some(1) || !String::from_utf8_lossy(&out.stderr).contains(expected)
        {
            failures.push(format!("{case}: {}", text(&out)));
        }
    }
    assert!(
        failures.is_empty(),
        "not detected:\n{}",
        failures.join("\n")
    );
}

/// A database whose chain was rewritten as unkeyed while checkpoints exist, or whose newest
/// entries were deleted: origin refuses to write onto it (which would vouch for it), and says
/// so.
#[tokio::test]
async fn origin_will_not_write_onto_a_chain_changed_behind_its_back() {
    for mode in ["rewrite", "delete-newest"] {
        let mut app = TestApp::start().await;
        history(&app).await;
        app.stop().await;
        tamper(&app, mode);
        let out = refused_start(serve_command(&app));
        eprintln!("{mode}: {}", text(&out));
        assert!(!out.status.success(), "{mode}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("origin audit verify"),
            "{mode}: {}",
            text(&out)
        );
        // Nor will the operator's command anchor it.
        let anchor = app.run_command(&["audit", "anchor"]);
        eprintln!("{mode}, anchor: {}", text(&anchor));
        assert_eq!(anchor.status.code(), Some(1), "{mode}: {}", text(&anchor));
        assert!(
            String::from_utf8_lossy(&anchor.stderr).contains("checkpoint"),
            "{mode}: {}",
            text(&anchor)
        );
    }
}

#[test]
fn serve_refuses_a_missing_short_or_shared_secret_and_names_the_variables() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 5] = [
        (&[], &["AUDIT_CHAIN_KEY", "is required"]),
        (
            &[("AUDIT_CHAIN_KEY", "too-short")],
            &["AUDIT_CHAIN_KEY", "at least 32"],
        ),
        (
            &[("AUDIT_CHAIN_KEY", ADMIN_TOKEN)],
            &["ADMIN_TOKEN", "AUDIT_CHAIN_KEY"],
        ),
        (
            &[
                ("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY),
                ("USAGE_SIGNING_SECRET", AUDIT_CHAIN_KEY),
            ],
            &["USAGE_SIGNING_SECRET", "AUDIT_CHAIN_KEY"],
        ),
        (
            &[
                ("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY),
                ("USAGE_SIGNING_SECRET", "twenty-four-characters-x"),
            ],
            &["USAGE_SIGNING_SECRET", "at least 32"],
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}", dir.path().join("db").display());
    for (vars, expected) in cases {
        let mut cmd = Command::new(origin_binary());
        cmd.arg("serve")
            .env_clear()
            .env("ORIGIN_LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", &db)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(vars.iter().copied());
        let out = refused_start(cmd);
        assert!(!out.status.success(), "{vars:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for word in expected {
            assert!(stderr.contains(word), "{vars:?}: {}", text(&out));
        }
        for secret in [ADMIN_TOKEN, AUDIT_CHAIN_KEY] {
            assert!(!stderr.contains(secret), "a secret in the error: {stderr}");
        }
    }
}
