//! Origin's publisher against Cloudflare's public KV REST API, which cannot run here: a fake
//! that speaks its wire format (the path under `/client/v4/accounts/<account>`, the bearer
//! token, the raw value body, and the `{success, errors, messages, result}` envelope, with 429
//! and 500 answers for a while).

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use common::{TestApp, eventually};
use latchkey_shared::{ApiKey, KeyRecord, kv_entry_name};
use serde_json::{Value, json};

const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
const NAMESPACE: &str = "fedcba9876543210fedcba9876543210";
const TOKEN: &str = "cf-api-token-for-tests-dddddddddddd";

/// One PUT the fake accepted.
#[derive(Debug, Clone)]
struct Write {
    name: String,
    authorization: String,
    body: String,
}

#[derive(Default)]
struct Fake {
    /// Answers to give before accepting writes, in order: (status, errors).
    failures: Vec<(StatusCode, Value)>,
    refused: usize,
    /// While set, every write gets this answer (an outage of some length).
    outage: Option<(StatusCode, Value)>,
    /// While set, requests are held without an answer (origin's request timeout must fire).
    hang: bool,
    writes: Vec<Write>,
}

type Shared = Arc<Mutex<Fake>>;

async fn put_value(
    State(fake): State<Shared>,
    Path((account, namespace, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    if fake.lock().expect("lock").hang {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let mut fake = fake.lock().expect("lock");
    if let Some((status, errors)) = fake.outage.clone() {
        fake.refused += 1;
        return (
            status,
            axum::Json(
                json!({ "success": false, "errors": errors, "messages": [], "result": null }),
            ),
        );
    }
    if account != ACCOUNT || namespace != NAMESPACE {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(
                json!({ "success": false, "errors": [{ "code": 10013, "message": "namespace not found" }], "messages": [], "result": null }),
            ),
        );
    }
    if fake.refused < fake.failures.len() {
        let (status, errors) = fake.failures[fake.refused].clone();
        fake.refused += 1;
        return (
            status,
            axum::Json(
                json!({ "success": false, "errors": errors, "messages": [], "result": null }),
            ),
        );
    }
    fake.writes.push(Write {
        name,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    (
        StatusCode::OK,
        axum::Json(json!({ "success": true, "errors": [], "messages": [], "result": {} })),
    )
}

async fn start_fake(failures: Vec<(StatusCode, Value)>) -> (String, Shared) {
    let (base, fake, stop) = start_fake_on("127.0.0.1:0", failures).await;
    std::mem::forget(stop); // serves until the test process ends
    (base, fake)
}

/// Serves the fake on `addr` until the returned sender is dropped: then it stops listening
/// and closes its connections, so new connections are refused.
async fn start_fake_on(
    addr: &str,
    failures: Vec<(StatusCode, Value)>,
) -> (String, Shared, tokio::sync::oneshot::Sender<()>) {
    let fake: Shared = Arc::new(Mutex::new(Fake {
        failures,
        ..Fake::default()
    }));
    let app = Router::new()
        .route(
            "/client/v4/accounts/{account}/storage/kv/namespaces/{namespace}/values/{name}",
            put(put_value),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    (
        format!("http://{addr}/client/v4/accounts/{ACCOUNT}"),
        fake,
        stop,
    )
}

#[tokio::test]
async fn publishes_through_rate_limits_and_server_errors_with_the_token_and_the_latest_state() {
    let rate_limited = json!([{ "code": 10429, "message": "Too many requests" }]);
    let broken = json!([{ "code": 10001, "message": "Internal error" }]);
    let failures = vec![
        (StatusCode::TOO_MANY_REQUESTS, rate_limited.clone()),
        (StatusCode::TOO_MANY_REQUESTS, rate_limited),
        (StatusCode::INTERNAL_SERVER_ERROR, broken.clone()),
        (StatusCode::INTERNAL_SERVER_ERROR, broken),
    ];
    let (base, fake) = start_fake(failures).await;
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .start()
        .await;

    let (id, secret) = app.create_key("acme-corp", &["read:orders"]).await;
    let r = app
        .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);

    let health = app.wait_published(Duration::from_secs(20)).await;
    let publisher = &health.body["kv_publisher"];
    assert!(
        publisher["failures"].as_u64().expect("failures") >= 4,
        "{publisher}"
    );

    let fake = fake.lock().expect("lock");
    assert_eq!(fake.refused, 4, "every failure was answered, then retried");
    let name = kv_entry_name(&ApiKey::parse(&secret).expect("issued key").hash());
    let last = fake
        .writes
        .iter()
        .rev()
        .find(|w| w.name == name)
        .expect("the key's entry was written under its hash");
    assert_eq!(last.authorization, format!("Bearer {TOKEN}"));
    let record = KeyRecord::from_json(last.body.as_bytes()).expect("a record");
    assert_eq!(record.id.as_str(), id);
    assert!(
        record.revoked,
        "the latest state (revoked) is what KV holds"
    );
    for write in &fake.writes {
        assert!(!write.body.contains(&secret), "no secret in any KV value");
    }
    assert!(!app.logs().contains(TOKEN), "the API token is never logged");
}

#[tokio::test]
async fn a_refused_token_is_reported_and_retried_until_it_works() {
    let auth_error = json!([{ "code": 10000, "message": "Authentication error" }]);
    let (base, fake) = start_fake(vec![(StatusCode::FORBIDDEN, auth_error); 3]).await;
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "5000")
        .start()
        .await;
    app.create_key("acme-corp", &["read:orders"]).await;

    // While refused, /healthz names Cloudflare's error.
    let error = eventually(Duration::from_secs(10), || async {
        let health = app.get("/healthz").await;
        let error = health.body["kv_publisher"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if error.contains("Authentication error (10000)") {
            Ok(error)
        } else {
            Err(health.body.to_string())
        }
    })
    .await;
    assert!(error.contains("403"), "{error}");
    app.wait_published(Duration::from_secs(20)).await;
    assert_eq!(fake.lock().expect("lock").writes.len(), 1);
}

/// `/healthz`'s publisher section.
async fn publisher(app: &TestApp) -> Value {
    app.get("/healthz").await.body["kv_publisher"].clone()
}

/// Waits until `/healthz` reports a publish error containing `needle`, with changes pending.
async fn outage_reported(app: &TestApp, needle: &str) -> Value {
    eventually(Duration::from_secs(15), || async {
        let p = publisher(app).await;
        let error = p["last_error"].as_str().unwrap_or_default().to_lowercase();
        if error.contains(needle) && p["pending"].as_u64() > Some(0) {
            Ok(p)
        } else {
            Err(format!("waiting for {needle:?}: {p}"))
        }
    })
    .await
}

#[tokio::test]
async fn revocations_during_every_kind_of_kv_outage_all_reach_kv_in_order() {
    let port = common::edge::free_port();
    let addr = format!("127.0.0.1:{port}");
    let base = format!("http://{addr}/client/v4/accounts/{ACCOUNT}");
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .env("KV_REQUEST_TIMEOUT_MS", "300")
        .start()
        .await;
    // KV is up: the new keys are published.
    let (_, up, stop) = start_fake_on(&addr, Vec::new()).await;
    let mut keys = Vec::new();
    for i in 0..12 {
        keys.push(
            app.create_key(&format!("partner-{i}"), &["read:orders"])
                .await,
        );
    }
    app.wait_published(Duration::from_secs(20)).await;
    let mut writes = up.lock().expect("lock").writes.clone();
    assert_eq!(writes.len(), 12);

    let revoke = |id: String| {
        let app = &app;
        async move {
            let r = app
                .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
                .await;
            assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);
        }
    };

    // 1. Nothing listens: connections are refused.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    revoke(keys[0].0.clone()).await;
    revoke(keys[1].0.clone()).await;
    let first = outage_reported(&app, "cannot connect").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = publisher(&app).await;
    assert!(
        later["lag_ms"].as_u64() > first["lag_ms"].as_u64(),
        "the lag grows during the outage: {first} then {later}"
    );

    // 2. KV accepts connections but never answers: origin's request timeout fires.
    let (_, fake, _serving) = start_fake_on(&addr, Vec::new()).await;
    fake.lock().expect("lock").hang = true;
    revoke(keys[2].0.clone()).await;
    outage_reported(&app, "timed out").await;

    // 3. Rate limited, then 4. server errors, each for a while, with revocations meanwhile.
    let phases = [
        (
            StatusCode::TOO_MANY_REQUESTS,
            json!([{ "code": 10429, "message": "Too many requests" }]),
            "429",
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!([{ "code": 10001, "message": "Internal error" }]),
            "500",
        ),
    ];
    for (i, (status, errors, needle)) in phases.into_iter().enumerate() {
        {
            let mut fake = fake.lock().expect("lock");
            fake.outage = Some((status, errors));
            fake.hang = false;
        }
        revoke(keys[3 + i].0.clone()).await;
        let p = outage_reported(&app, needle).await;
        assert!(p["pending"].as_u64() >= Some(1), "{p}");
        assert!(
            fake.lock().expect("lock").writes.is_empty(),
            "nothing accepted yet"
        );
    }

    // Back: everything acknowledged reaches KV, each key's writes in revision order, ending
    // with its current state.
    fake.lock().expect("lock").outage = None;
    let health = app.wait_published(Duration::from_secs(30)).await;
    let failures = health.body["kv_publisher"]["failures"]
        .as_u64()
        .expect("failures");
    writes.extend(fake.lock().expect("lock").writes.iter().cloned());
    for (n, (id, secret)) in keys.iter().enumerate() {
        let name = kv_entry_name(&ApiKey::parse(secret).expect("issued key").hash());
        let revisions: Vec<(u64, bool)> = writes
            .iter()
            .filter(|w| w.name == name)
            .map(|w| {
                let record = KeyRecord::from_json(w.body.as_bytes()).expect("a record");
                assert_eq!(record.id.as_str(), id);
                (record.revision, record.revoked)
            })
            .collect();
        assert_eq!(
            revisions.len(),
            if n < 5 { 2 } else { 1 },
            "{id}: {revisions:?}"
        );
        assert!(
            revisions.windows(2).all(|w| w[0].0 <= w[1].0),
            "{id} out of order: {revisions:?}"
        );
        let current = app.get(&format!("/v1/api_keys/{id}")).await.body;
        let last = revisions.last().expect("one");
        assert_eq!(last.1, current["revoked"].as_bool().expect("bool"), "{id}");
        assert_eq!(last.1, n < 5, "keys 0-4 were revoked during the outage");
    }
    common::edge::report_measurement(&format!(
        "KV API faults: refused connections, timeouts, 429s and 500s; {failures} failed writes retried, \
         {} accepted; 5 revocations made during the outage all in KV, in order",
        writes.len()
    ));
}
