//! Origin's side of the change ledger without the Worker: while the ledger (and KV) cannot be
//! reached, every change stays in the outbox for the sink that has not taken it, across a
//! restart and `kill -9`; the settings are refused clearly. (With the Worker's ledger running,
//! the end-to-end tests check that the changes and the watermarks arrive.)

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::edge::free_port;
use common::{ADMIN_TOKEN, AUDIT_CHAIN_KEY, TestApp, eventually, origin_binary};
use reqwest::StatusCode;
use serde_json::{Value, json};

const LEDGER_SECRET: &str = "ledger-signing-secret-for-tests-llllllll";

/// A ledger route on a loopback port nothing listens on: connections are refused.
fn closed_ledger_url() -> String {
    format!("http://127.0.0.1:{}/v1/ledger/changes", free_port())
}

/// Creates two keys and revokes the first: three key changes.
async fn three_changes(app: &TestApp) {
    let (first, _) = app.create_key("acme-corp", &["read:orders"]).await;
    app.create_key("globex", &["read:orders"]).await;
    let r = app
        .post(&format!("/v1/api_keys/{first}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

/// Waits until `/healthz` shows the ledger failing with `pending` changes, and returns it.
async fn ledger_unreachable(app: &TestApp, pending: u64) -> Value {
    eventually(Duration::from_secs(10), || async {
        let health = app.get("/healthz").await;
        let ledger = &health.body["ledger"];
        if ledger["state"] == "unreachable"
            && ledger["pending"] == pending
            && ledger["failures"].as_u64().unwrap_or(0) > 0
        {
            Ok(health.body)
        } else {
            Err(format!("ledger not yet failing: {}", health.body))
        }
    })
    .await
}

#[tokio::test]
async fn with_kv_and_the_ledger_down_every_change_waits_for_both_across_restarts() {
    let kv_base = format!(
        "http://127.0.0.1:{}/client/v4/accounts/0123456789abcdef0123456789abcdef",
        free_port()
    );
    let mut app = TestApp::builder()
        .env("KV_API_BASE", &kv_base)
        .env("KV_NAMESPACE_ID", "fedcba9876543210fedcba9876543210")
        .env("KV_RETRY_MAX_MS", "200")
        .env("LEDGER_URL", &closed_ledger_url())
        .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET)
        .start()
        .await;
    three_changes(&app).await;

    let health = ledger_unreachable(&app, 3).await;
    assert_eq!(health["status"], "ok", "a backlog is not unhealthy");
    assert_eq!(health["kv_publisher"]["pending"], 3, "{health}");
    let ledger = &health["ledger"];
    assert_eq!(ledger["enabled"], true, "{ledger}");
    assert_eq!(ledger["watermark_ms"], Value::Null, "no watermark accepted");
    assert!(
        ledger.get("last_error").is_none(),
        "no error text in /healthz"
    );
    assert!(ledger["lag_ms"].as_i64().expect("lag") >= 0, "{ledger}");

    // Admins see why; the secret is in no answer and no log line.
    let status = app.get("/v1/status").await;
    let error = status.body["ledger"]["last_error"]
        .as_str()
        .expect("last_error")
        .to_owned();
    assert!(error.contains("cannot connect"), "{error}");
    let metrics = app
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("latchkey_ledger_pending 3"), "{metrics}");
    assert!(metrics.contains("latchkey_ledger_enabled 1"), "{metrics}");
    assert!(
        metrics.contains("latchkey_ledger_watermark_age_seconds -1.000"),
        "{metrics}"
    );

    // A clean restart and a kill -9 lose nothing, for either sink.
    app.restart().await;
    let health = ledger_unreachable(&app, 3).await;
    assert_eq!(health["kv_publisher"]["pending"], 3, "{health}");
    three_changes(&app).await;
    app.kill();
    app.start_again().await;
    let health = ledger_unreachable(&app, 6).await;
    assert_eq!(health["kv_publisher"]["pending"], 6, "{health}");
    assert!(
        !app.logs().contains(LEDGER_SECRET),
        "the secret is never logged"
    );
}

#[tokio::test]
async fn without_the_ledger_nothing_waits_for_it_and_rows_left_for_it_are_released() {
    let kv_base = format!(
        "http://127.0.0.1:{}/client/v4/accounts/0123456789abcdef0123456789abcdef",
        free_port()
    );
    let mut app = TestApp::builder()
        .env("KV_API_BASE", &kv_base)
        .env("KV_NAMESPACE_ID", "fedcba9876543210fedcba9876543210")
        .env("LEDGER_URL", &closed_ledger_url())
        .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET)
        .start()
        .await;
    three_changes(&app).await;
    ledger_unreachable(&app, 3).await;

    // The ledger is switched off: its rows are released at start; KV's stay.
    app.stop().await;
    app.set_env("LEDGER_URL", "");
    app.set_env("LEDGER_SIGNING_SECRET", "");
    app.start_again().await;
    let health = app.get("/healthz").await;
    let ledger = &health.body["ledger"];
    assert_eq!(ledger["enabled"], false, "{ledger}");
    assert_eq!(ledger["pending"], 0, "{ledger}");
    assert_eq!(health.body["kv_publisher"]["pending"], 3, "{}", health.body);
    assert!(
        app.logs().contains("LEDGER_URL is unset"),
        "origin says the ledger is not fed"
    );
}

/// Two origins over one database, the first feeding the ledger (it holds the ledger lock), the
/// second started without `LEDGER_URL`: the second must not release the rows the first's ledger
/// publisher still has to append (it would then send watermarks over an outbox that lacks them,
/// and isolates would trust memory missing revocations).
#[tokio::test]
async fn an_origin_without_the_ledger_leaves_the_rows_of_one_that_feeds_it() {
    let kv_base = format!(
        "http://127.0.0.1:{}/client/v4/accounts/0123456789abcdef0123456789abcdef",
        free_port()
    );
    let kv_vars = [
        ("KV_API_BASE", kv_base.as_str()),
        ("KV_NAMESPACE_ID", "fedcba9876543210fedcba9876543210"),
    ];
    let mut builder = TestApp::builder()
        .env("LEDGER_URL", &closed_ledger_url())
        .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET);
    for (name, value) in kv_vars {
        builder = builder.env(name, value);
    }
    let app = builder.start().await;
    three_changes(&app).await;
    ledger_unreachable(&app, 3).await;

    // The second origin, same database, no LEDGER_URL.
    let log_path = app.dir().join("second-origin.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut second = Command::new(origin_binary())
        .arg("serve")
        .env_clear()
        .env("ORIGIN_LISTEN", "127.0.0.1:0")
        .env("DATABASE_URL", app.database_url())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY)
        .env("RUST_LOG", "info")
        .envs(kv_vars)
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn the second origin");
    let deadline = Instant::now() + Duration::from_secs(20);
    let logs = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("origin listening") {
            break text;
        }
        if let Ok(Some(status)) = second.try_wait() {
            panic!("the second origin exited with {status}:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "the second origin did not start listening:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        logs.contains("another origin over this database holds the ledger lock"),
        "the second origin says why it leaves the ledger's rows: {logs}"
    );
    assert!(!logs.contains("are released"), "nothing released: {logs}");

    // The first origin's ledger publisher still has all three changes to append.
    for _ in 0..10 {
        let health = app.get("/healthz").await;
        assert_eq!(health.body["ledger"]["pending"], 3, "{}", health.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = second.kill();
    let _ = second.wait();
}

/// Runs `origin serve` with `vars`, expecting it to refuse to start.
fn refused_start(vars: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(origin_binary())
        .arg("serve")
        .env_clear()
        .env("ORIGIN_LISTEN", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("db").display()),
        )
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY)
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run origin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "origin started instead of refusing to: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn serve_refuses_bad_ledger_settings_and_names_the_variable() {
    let url = "https://ledger-worker.example/v1/ledger/changes";
    let usage_secret = "usage-signing-secret-for-tests-uuuuuuuuu";
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 6] = [
        (
            &[("LEDGER_URL", url)],
            &["LEDGER_SIGNING_SECRET", "is required"],
        ),
        (
            &[("LEDGER_SIGNING_SECRET", LEDGER_SECRET)],
            &["LEDGER_URL", "is required"],
        ),
        (
            &[
                (
                    "LEDGER_URL",
                    "http://ledger-worker.example/v1/ledger/changes",
                ),
                ("LEDGER_SIGNING_SECRET", LEDGER_SECRET),
            ],
            &["LEDGER_URL", "https"],
        ),
        (
            &[
                ("LEDGER_URL", "https://ledger-worker.example/v1/usage"),
                ("LEDGER_SIGNING_SECRET", LEDGER_SECRET),
            ],
            &["LEDGER_URL", "/v1/ledger/changes"],
        ),
        (
            &[
                ("LEDGER_URL", url),
                ("LEDGER_SIGNING_SECRET", "short-secret"),
            ],
            &["LEDGER_SIGNING_SECRET", "at least 32"],
        ),
        (
            &[
                ("LEDGER_URL", url),
                ("LEDGER_SIGNING_SECRET", usage_secret),
                ("USAGE_SIGNING_SECRET", usage_secret),
            ],
            &["LEDGER_SIGNING_SECRET", "USAGE_SIGNING_SECRET"],
        ),
    ];
    for (vars, expected) in cases {
        let out = refused_start(vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{vars:?}: {stderr}");
        for word in expected {
            assert!(
                stderr.contains(word),
                "{vars:?} should name {word}: {stderr}"
            );
        }
        for secret in [LEDGER_SECRET, usage_secret, "short-secret", ADMIN_TOKEN] {
            assert!(!stderr.contains(secret), "a secret in the error: {stderr}");
        }
        assert!(
            !stderr.contains("ledger-worker.example"),
            "the URL is not echoed: {stderr}"
        );
    }
}

/// A ledger route that redirects every append to a second server, which counts what reaches
/// it. Before, origin followed the redirect and sent its signed body there.
#[tokio::test]
async fn a_redirect_from_the_ledger_is_never_followed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let reached = Arc::new(AtomicUsize::new(0));
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let elsewhere_port = elsewhere.local_addr().expect("addr").port();
    let counter = reached.clone();
    let sink = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            "{}"
        }
    });
    tokio::spawn(async move { axum::serve(elsewhere, sink).await });
    let ledger = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ledger_port = ledger.local_addr().expect("addr").port();
    let redirects = Arc::new(AtomicUsize::new(0));
    let seen = redirects.clone();
    let redirect = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(
                    "location",
                    format!("http://127.0.0.1:{elsewhere_port}/v1/ledger/changes"),
                )],
            )
        }
    });
    tokio::spawn(async move { axum::serve(ledger, redirect).await });

    let app = TestApp::builder()
        .env(
            "LEDGER_URL",
            &format!("http://127.0.0.1:{ledger_port}/v1/ledger/changes"),
        )
        .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET)
        .start()
        .await;
    three_changes(&app).await;
    // The appends were tried (and answered with the redirect) and are still pending.
    let health = eventually(Duration::from_secs(10), || async {
        let health = app.get("/healthz").await.body;
        (redirects.load(Ordering::SeqCst) >= 2 && health["ledger"]["pending"] == 3)
            .then_some(health.clone())
            .ok_or_else(|| health.to_string())
    })
    .await;
    assert_ne!(health["ledger"]["state"], "ok", "{health}");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the signed body went to the redirect's target"
    );
}
