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
        .env(
            "AUDIT_CHECKPOINT_FILE",
            app.dir().join("second-origin.checkpoints"),
        )
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
    // Each `/healthz` says who holds the ledger's role: the first origin, not the second.
    let plays_ledger = |health: &Value| {
        health["roles"]
            .as_array()
            .unwrap_or_else(|| panic!("roles in {health}"))
            .iter()
            .any(|role| role == "ledger")
    };
    assert!(plays_ledger(&app.get("/healthz").await.body));
    let listen = logs
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .expect("the second origin's address");
    let second_health: Value = reqwest::get(format!("http://{listen}/healthz"))
        .await
        .expect("the second origin's /healthz")
        .json()
        .await
        .expect("JSON");
    assert!(!plays_ledger(&second_health), "{second_health}");
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
        // `/healthz`'s figures may be a second old: until they show the failure too.
        (redirects.load(Ordering::SeqCst) >= 2
            && health["ledger"]["pending"] == 3
            && health["ledger"]["state"] != "ok")
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

/// Per key id: its KV entry name, and each acknowledged change's (revision, acknowledged at).
type Acks = std::collections::HashMap<String, (String, Vec<(u64, i64)>)>;

/// An accepted append: each change's (entry name, revision), and its watermark.
type Accepted = (Vec<(String, u64)>, Option<i64>);

/// Creates a key with `scopes` (and, if `change`, renames it twice), recording in `acks` each
/// change's revision and when its acknowledgement arrived.
async fn change_keys(
    app: &TestApp,
    acks: &std::sync::Mutex<Acks>,
    scopes: &[String],
    name: &str,
    change: bool,
) {
    let created = app
        .post(
            "/v1/api_keys",
            json!({"name": name, "subject": "acme", "scopes": scopes}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let at = common::now_ms();
    let id = created.body["id"].as_str().expect("id").to_owned();
    let secret = created.body["secret"].as_str().expect("secret");
    let entry = latchkey_shared::kv_entry_name(
        &latchkey_shared::ApiKey::parse(secret).expect("key").hash(),
    );
    acks.lock()
        .expect("acks")
        .insert(id.clone(), (entry, vec![(1, at)]));
    if change {
        for revision in 2..=3 {
            let r = app
                .patch(
                    &format!("/v1/api_keys/{id}"),
                    json!({"name": format!("{name}-r{revision}")}),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            let at = common::now_ms();
            acks.lock()
                .expect("acks")
                .get_mut(&id)
                .expect("key")
                .1
                .push((revision, at));
        }
    }
}

/// What the recording ledger accepted: per append, each change's entry name and revision, and
/// the watermark.
#[derive(Default)]
struct Recorded {
    /// Until set, every request is refused (503, unrecorded): a backlog builds up.
    open: bool,
    requests: usize,
    /// Requests since it opened; the failures injected then.
    since_open: usize,
    refused: usize,
    answers_lost: usize,
    accepted: Vec<Accepted>,
}

/// A ledger route that speaks the Worker's wire format (the signature checked with the ledger
/// secret, the answer an `AppendAnswer`) and records what it accepts, failing on purpose once
/// open: its 2nd, 7th, 12th… requests are refused with 503 unrecorded, and its 4th, 11th, 18th…
/// are recorded but answered 500 (an append whose outcome origin cannot know).
async fn recording_ledger(recorded: std::sync::Arc<std::sync::Mutex<Recorded>>) -> String {
    use latchkey_shared::ledger::{AppendAnswer, AppendBatch, LEDGER_VERSION, append_message};
    use latchkey_shared::sign;
    let app = axum::Router::new().route(
        latchkey_shared::ledger::APPEND_PATH,
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let recorded = recorded.clone();
                async move {
                    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                    let verified = sign::verify_signed(
                        LEDGER_SECRET.as_bytes(),
                        text(sign::header::TIMESTAMP),
                        text(sign::header::SIGNATURE),
                        latchkey_shared::UnixMillis(common::now_ms()),
                        |t| append_message(t, &body),
                    );
                    assert!(verified.is_ok(), "origin's append is signed");
                    let batch = AppendBatch::parse(&body).expect("an append batch");
                    let mut r = recorded.lock().expect("recorded");
                    r.requests += 1;
                    if !r.open {
                        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                    }
                    r.since_open += 1;
                    if r.since_open % 5 == 2 {
                        r.refused += 1;
                        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                    }
                    r.accepted.push((
                        batch
                            .changes
                            .iter()
                            .map(|c| (c.name.clone(), c.record.revision))
                            .collect(),
                        batch.watermark.map(|w| w.0),
                    ));
                    if r.since_open % 7 == 4 {
                        r.answers_lost += 1;
                        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new());
                    }
                    let head = r.accepted.iter().map(|(c, _)| c.len() as u64).sum();
                    let answer = AppendAnswer {
                        v: LEDGER_VERSION,
                        appended: batch.changes.len() as u64,
                        head,
                        superseded: 0,
                        epoch: Some(1),
                    };
                    (
                        axum::http::StatusCode::OK,
                        serde_json::to_string(&answer).expect("answer"),
                    )
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!(
        "http://127.0.0.1:{port}{}",
        latchkey_shared::ledger::APPEND_PATH
    )
}

/// The watermark's promise: once the ledger holds an append with watermark `T`, it holds every
/// change committed before `T`. Checked against what a recording ledger accepted, with changes
/// made concurrently, records large enough (64 long scopes) that a backlog is split over several
/// appends, and appends failing on purpose (refused, or taken with the answer lost): for every
/// accepted watermark `T` and every change whose acknowledgement reached the client before `T`
/// (so committed before it), the key's revision in the appends accepted up to then is at least
/// that change's.
#[tokio::test]
async fn every_watermark_covers_every_change_acknowledged_before_it() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let url = recording_ledger(recorded.clone()).await;
    let app = Arc::new(
        TestApp::builder()
            .env("LEDGER_URL", &url)
            .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET)
            .env("LEDGER_WATERMARK_MS", "100")
            .start()
            .await,
    );
    // On PostgreSQL a second replica (same database, same ledger settings) takes every other
    // worker's changes: whichever replica holds the ledger role, its watermarks must cover the
    // changes the other one committed too.
    let mut replicas = vec![app.clone()];
    if common::postgres_server().is_some() {
        replicas.push(Arc::new(
            TestApp::builder()
                .env("DATABASE_URL", &app.database_url())
                .env("LEDGER_URL", &url)
                .env("LEDGER_SIGNING_SECRET", LEDGER_SECRET)
                .env("LEDGER_WATERMARK_MS", "100")
                .start()
                .await,
        ));
    }
    let scopes: Vec<String> = (0..64)
        .map(|i| format!("read:resource_{i:02}_{}", "x".repeat(100)))
        .collect();
    // Per key: its entry name, and each acknowledged change's (revision, acknowledged at).
    let acks: Arc<Mutex<Acks>> = Arc::default();
    // First a backlog larger than one append holds (350 records of about 7.5 KB, over the 2 MiB
    // an append takes) while the ledger refuses; then it opens, and more keys are created and
    // changed concurrently while the backlog drains.
    for (workers_n, keys_each, open_after) in [(7, 50, true), (8, 40, false)] {
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..workers_n {
            let app = replicas[w % replicas.len()].clone();
            let (acks, scopes) = (acks.clone(), scopes.clone());
            workers.spawn(async move {
                for k in 0..keys_each {
                    change_keys(
                        &app,
                        &acks,
                        &scopes,
                        &format!("{open_after}-{w}-{k}"),
                        k % 5 == 0,
                    )
                    .await;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.expect("worker");
        }
        if open_after {
            // An append read before the backlog was whole may still be on its way: two more
            // refused appends, and the second was read after the first was answered, so after
            // every change of the backlog was acknowledged. Only then does the ledger open.
            let refused_before = recorded.lock().expect("recorded").requests;
            eventually(Duration::from_secs(30), || async {
                let requests = recorded.lock().expect("recorded").requests;
                (requests >= refused_before + 2)
                    .then_some(())
                    .ok_or_else(|| format!("{requests} appends tried"))
            })
            .await;
            recorded.lock().expect("recorded").open = true;
        }
    }
    // Until the ledger has everything: a watermark later than the last acknowledgement.
    let last_ack = common::now_ms();
    eventually(Duration::from_secs(120), || async {
        let r = recorded.lock().expect("recorded");
        // And enough requests for both injected failures to have happened.
        (r.since_open >= 12
            && r.accepted
                .iter()
                .any(|(_, w)| w.is_some_and(|w| w > last_ack)))
        .then_some(())
        .ok_or_else(|| format!("{} appends accepted so far", r.accepted.len()))
    })
    .await;

    let recorded = recorded.lock().expect("recorded");
    let acks = acks.lock().expect("acks");
    let mut highest: HashMap<&str, u64> = HashMap::new();
    let (mut watermarks, mut checked, mut most_changes) = (0, 0, 0);
    for (changes, watermark) in &recorded.accepted {
        most_changes = most_changes.max(changes.len());
        for (name, revision) in changes {
            let h = highest.entry(name.as_str()).or_insert(0);
            *h = (*h).max(*revision);
        }
        let Some(watermark) = watermark else { continue };
        watermarks += 1;
        for (id, (name, changes)) in acks.iter() {
            for (revision, at) in changes {
                if *at < *watermark {
                    checked += 1;
                    let held = highest.get(name.as_str()).copied().unwrap_or(0);
                    assert!(
                        held >= *revision,
                        "watermark {watermark} accepted while {id}'s revision {revision}, \
                         acknowledged at {at}, was not in the ledger (it held {held})"
                    );
                }
            }
        }
    }
    let requests = recorded.requests;
    let split = recorded
        .accepted
        .iter()
        .filter(|(changes, watermark)| !changes.is_empty() && watermark.is_none())
        .count();
    assert!(
        split > 0,
        "the backlog was split over several appends (the largest held {most_changes}; \
         {} requests; accepted (changes, with a watermark): {:?})",
        recorded.requests,
        recorded
            .accepted
            .iter()
            .map(|(c, w)| (c.len(), w.is_some()))
            .collect::<Vec<_>>()
    );
    assert!(
        requests >= 7,
        "failures were injected ({requests} requests)"
    );
    common::edge::report_measurement(&format!(
        "watermark soundness: {checked} (watermark, acknowledged change) pairs checked over {watermarks} watermarks and {requests} append requests ({} refused, {} taken with the answer lost); 670 keys of 64 long scopes written through {} origin(s) on one database, a backlog of 350 split ({split} appends without a watermark, at most {most_changes} changes in one)",
        recorded.refused,
        recorded.answers_lost,
        replicas.len()
    ));
}
