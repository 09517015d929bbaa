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
    writes: Vec<Write>,
}

type Shared = Arc<Mutex<Fake>>;

async fn put_value(
    State(fake): State<Shared>,
    Path((account, namespace, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let mut fake = fake.lock().expect("lock");
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/client/v4/accounts/{ACCOUNT}"), fake)
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
