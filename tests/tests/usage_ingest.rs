//! Origin's `POST /v1/usage`, where the edge reports which keys verified there: signed batches
//! are accepted once; unsigned, wrongly signed, stale and replayed ones are refused.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::TestApp;
use common::edge::USAGE_SECRET;
use latchkey_shared::UnixMillis;
use latchkey_shared::sign::{self, header};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    UnixMillis(i64::try_from(ms).expect("fits"))
}

async fn post(
    app: &TestApp,
    body: &[u8],
    timestamp: Option<String>,
    signature: Option<String>,
) -> common::Reply {
    let mut req = app
        .request(Method::POST, "/v1/usage")
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(t) = timestamp {
        req = req.header(header::TIMESTAMP, t);
    }
    if let Some(s) = signature {
        req = req.header(header::SIGNATURE, s);
    }
    TestApp::send(req).await
}

fn signed(secret: &str, at: UnixMillis, body: &[u8]) -> (Option<String>, Option<String>) {
    let signature = sign::sign(secret.as_bytes(), &sign::usage_message(at, body));
    (Some(at.0.to_string()), Some(signature))
}

#[tokio::test]
async fn signed_batches_are_accepted_once_and_everything_else_is_refused() {
    let app = TestApp::builder()
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .env("LAST_USED_FLUSH_MS", "50")
        .start()
        .await;
    let (id, _) = app.create_key("acme", &["read:orders"]).await;
    let used_at = now().0 - 1_000;
    let body = serde_json::to_vec(&json!({
        "batch": "isolate-1",
        "uses": [{ "id": id, "at": used_at }, { "id": "key_not_a_real_id", "at": used_at }]
    }))
    .expect("json");

    // Refused: unsigned, wrong secret, altered body, stale, and from the future.
    let at = now();
    let stale = UnixMillis(at.0 - 6 * 60 * 1000);
    let future = UnixMillis(at.0 + 6 * 60 * 1000);
    let mut altered = body.clone();
    altered.push(b' ');
    let refusals = [
        ("unsigned", post(&app, &body, None, None).await),
        (
            "no signature",
            post(&app, &body, Some(at.0.to_string()), None).await,
        ),
        ("wrong secret", {
            let (t, s) = signed("another-secret-of-enough-length", at, &body);
            post(&app, &body, t, s).await
        }),
        ("altered body", {
            let (t, s) = signed(USAGE_SECRET, at, &body);
            post(&app, &altered, t, s).await
        }),
        ("stale", {
            let (t, s) = signed(USAGE_SECRET, stale, &body);
            post(&app, &body, t, s).await
        }),
        ("future", {
            let (t, s) = signed(USAGE_SECRET, future, &body);
            post(&app, &body, t, s).await
        }),
    ];
    for (label, reply) in &refusals {
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{label}: {:?}",
            reply.body
        );
        assert_eq!(
            reply.body["errors"][0]["code"], "signature_invalid",
            "{label}"
        );
    }
    let key = app.get(&format!("/v1/api_keys/{id}")).await;
    assert_eq!(
        key.body["last_used_at"],
        json!(null),
        "nothing refused was recorded"
    );

    // Accepted once; the same signed request again is a replay.
    let (t, s) = signed(USAGE_SECRET, at, &body);
    let first = post(&app, &body, t.clone(), s.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.body["accepted"], 1, "the unknown id is ignored");
    let replay = post(&app, &body, t, s).await;
    assert_eq!(replay.status, StatusCode::CONFLICT, "{:?}", replay.body);
    assert_eq!(replay.body["errors"][0]["code"], "replayed");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = app.get(&format!("/v1/api_keys/{id}")).await;
    assert_eq!(key.body["last_used_at"], used_at, "{:?}", key.body);

    // A signed batch of the wrong shape is refused after the signature check.
    let junk = br#"{"uses":"everything"}"#;
    let (t, s) = signed(USAGE_SECRET, now(), junk);
    let r = post(&app, junk, t, s).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", r.body);
}

#[tokio::test]
async fn without_a_usage_secret_the_endpoint_is_off() {
    let app = TestApp::start().await;
    let body = br#"{"batch":"b","uses":[]}"#;
    let (t, s) = signed(USAGE_SECRET, now(), body);
    let r = post(&app, body, t, s).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    assert_eq!(r.body["errors"][0]["code"], "usage_ingest_disabled");
    assert!(app.logs().contains("USAGE_SIGNING_SECRET is unset"));
}

/// The replay guard keys on what was signed, not on how the signature is spelled: the same MAC
/// in upper case (hex decoding accepts both) is the same batch.
#[tokio::test]
async fn a_replay_with_the_mac_in_upper_case_is_refused() {
    let app = TestApp::builder()
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .start()
        .await;
    let body = br#"{"batch":"isolate-upper","uses":[]}"#;
    let (t, s) = signed(USAGE_SECRET, now(), body);
    let first = post(&app, body, t.clone(), s.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let upper = s.clone().map(|s| s.to_ascii_uppercase());
    let replay = post(&app, body, t.clone(), upper).await;
    assert_eq!(replay.status, StatusCode::CONFLICT, "{:?}", replay.body);
    assert_eq!(replay.body["errors"][0]["code"], "replayed");
    // The same timestamp written another way (a leading zero) is the same message.
    let padded = t.map(|t| format!("0{t}"));
    let replay = post(&app, body, padded, s).await;
    assert_eq!(replay.status, StatusCode::CONFLICT, "{:?}", replay.body);
}

/// Accepted batches are remembered in the database: a replay after `kill -9` and a restart is
/// still refused.
#[tokio::test]
async fn a_replay_after_a_crash_and_restart_is_refused() {
    let mut app = TestApp::builder()
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .start()
        .await;
    let body = br#"{"batch":"isolate-restart","uses":[]}"#;
    let (t, s) = signed(USAGE_SECRET, now(), body);
    let first = post(&app, body, t.clone(), s.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    app.kill();
    app.start_again().await;
    let replay = post(&app, body, t, s).await;
    assert_eq!(replay.status, StatusCode::CONFLICT, "{:?}", replay.body);
    // A new batch is still accepted.
    let body = br#"{"batch":"isolate-restart-2","uses":[]}"#;
    let (t, s) = signed(USAGE_SECRET, now(), body);
    let next = post(&app, body, t, s).await;
    assert_eq!(next.status, StatusCode::OK, "{:?}", next.body);
}

#[tokio::test]
async fn extreme_timestamps_are_refused_as_stale_without_overflow() {
    // `(now - timestamp).abs()` on an untrusted i64 overflowed (a panic in a debug build, a
    // wrong answer in release); the skew check now takes `abs_diff`.
    let app = TestApp::builder()
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .start()
        .await;
    let body = json!({ "batch": "extreme", "uses": [] }).to_string();
    for at in [i64::MIN, i64::MIN + 1, i64::MAX] {
        let (t, s) = signed(USAGE_SECRET, UnixMillis(at), body.as_bytes());
        let r = post(&app, body.as_bytes(), t, s).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{at}: {:?}", r.body);
        assert_eq!(r.body["errors"][0]["code"], "signature_invalid", "{at}");
        let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains("too far"), "{at}: {message}");
    }
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert!(!app.logs().contains("panicked"), "{}", app.logs());
}

/// Anyone can post to the usage route: a flood of refused batches writes one warning line
/// (with the count left out), not a line each. Before, every refusal was logged.
#[tokio::test]
async fn refused_batches_are_logged_once_per_interval() {
    let app = TestApp::builder()
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .start()
        .await;
    let body = br#"{"batch":"b","uses":[]}"#;
    for n in 0..30 {
        let (timestamp, _) = signed(USAGE_SECRET, now(), body);
        let r = post(&app, body, timestamp, Some(format!("{n:064x}"))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);
    }
    let (timestamp, signature) = signed(USAGE_SECRET, now(), body);
    assert_eq!(
        post(&app, body, timestamp.clone(), signature.clone())
            .await
            .status,
        StatusCode::OK
    );
    for _ in 0..30 {
        let r = post(&app, body, timestamp.clone(), signature.clone()).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    }
    let logs = app.logs();
    assert_eq!(logs.matches("usage batch refused").count(), 1, "{logs}");
    assert_eq!(logs.matches("usage batch replayed").count(), 1, "{logs}");
}
