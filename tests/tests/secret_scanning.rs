//! Leak response: GitHub's secret scanning alerts against the real origin, signed with a
//! throwaway P-256 key pair made here (GitHub's own keys cannot sign for a test), in GitHub's
//! wire format; its key list served from a file and from a stand-in for GitHub's key endpoint
//! that speaks the same format. And the manual leak report.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::github::{ALERTS, GithubKey, key_list, write_key_file};
use common::{TestApp, eventually};
use latchkey_shared::{ApiKey, KeyPrefix};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// Posts `body` as GitHub would, signed by `key` (`None`: unsigned).
async fn alert(app: &TestApp, body: &[u8], key: Option<&GithubKey>) -> common::Reply {
    let req = reqwest::Client::new().post(format!("{}{ALERTS}", app.base));
    let req = match key {
        Some(key) => key.signed(req, body),
        None => req.body(body.to_vec()),
    };
    TestApp::send(req).await
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

async fn audit_actions(app: &TestApp, id: &str) -> Vec<String> {
    let r = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    r.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["action"].as_str().expect("action").to_owned())
        .collect()
}

/// An app reading GitHub's key list from a file holding `keys`.
async fn app_with_keys(keys: &[&GithubKey], env: &[(&str, &str)]) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let file = write_key_file(dir.path(), keys);
    let mut builder = TestApp::builder().env(
        "GITHUB_SECRET_SCANNING_KEYS_FILE",
        &file.display().to_string(),
    );
    for (name, value) in env {
        builder = builder.env(name, value);
    }
    (builder.start().await, dir)
}

#[tokio::test]
async fn a_signed_alert_revokes_our_leaked_keys_once_and_answers_githubs_feedback() {
    let github = GithubKey::new("90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a");
    let older = GithubKey::new("bcb53661c06b4728e59d897fb6165d5c9cda0fd9cdf9d09ead458168deb7518c");
    let stranger = GithubKey::new("not-githubs");
    let (app, _dir) = app_with_keys(&[&github, &older], &[]).await;
    let (a_id, a) = app.create_key("acme", &["read:orders"]).await;
    let (b_id, b) = app.create_key("globex", &[]).await;
    let (c_id, c) = app.create_key("initech", &[]).await;
    let unknown = common::edge::unissued_key("sk_live");
    let url = "https://github.com/octocat/Hello-World/blob/12345600b9cbe38a219f39a9941c9319b600c002/foo/bar.txt";
    let batch = json!([
        {"token": a, "type": "latchkey_api_key", "url": url, "source": "content"},
        {"token": unknown, "type": "latchkey_api_key", "url": url, "source": "content"},
        {"token": "sk_live_not-a-key", "type": "latchkey_api_key", "source": "content"},
        {"token": a, "type": "latchkey_api_key", "url": "https://github.com/o/r/blob/x/y", "source": "commit"},
        {"token": b, "type": "latchkey_api_key", "source": "npm", "a_field_github_added_later": 1},
    ])
    .to_string();

    let r = alert(&app, batch.as_bytes(), Some(&github)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let expected = json!([
        {"token_hash": token_hash(&a), "token_type": "latchkey_api_key", "label": "true_positive"},
        {"token_hash": token_hash(&unknown), "token_type": "latchkey_api_key", "label": "false_positive"},
        {"token_hash": token_hash("sk_live_not-a-key"), "token_type": "latchkey_api_key", "label": "false_positive"},
        {"token_hash": token_hash(&a), "token_type": "latchkey_api_key", "label": "true_positive"},
        {"token_hash": token_hash(&b), "token_type": "latchkey_api_key", "label": "true_positive"},
    ]);
    assert_eq!(r.body, expected);
    assert!(!r.body.to_string().contains(&a), "tokens are never echoed");

    let key_a = app.get(&format!("/v1/api_keys/{a_id}")).await.body;
    assert_eq!(key_a["revoked"], true, "{key_a}");
    assert_eq!(key_a["revocation_reason"], json!(format!("leaked: {url}")));
    assert_eq!(
        key_a["leak_source"],
        json!(url),
        "the first report's source"
    );
    assert!(key_a["leaked_at"].as_i64().is_some());
    let key_b = app.get(&format!("/v1/api_keys/{b_id}")).await.body;
    assert_eq!(key_b["revoked"], true);
    assert_eq!(
        key_b["revocation_reason"],
        "leaked: GitHub secret scanning (npm)"
    );
    let v = app.verify(&a, &[]).await;
    assert_eq!(v.body["errors"][0]["code"], "api_key_revoked", "{}", v.body);
    assert_eq!(app.verify(&c, &[]).await.status, StatusCode::OK);
    assert_eq!(audit_actions(&app, &a_id).await, ["create", "leak"]);
    let audit = app.get(&format!("/v1/audit_log?key_id={a_id}")).await;
    let leak = &audit.body["data"][1];
    assert_eq!(leak["actor"], "github_secret_scanning");
    assert_eq!(leak["details"]["reported_by"], "github_secret_scanning");
    assert_eq!(leak["details"]["action"], "revoke");
    assert_eq!(leak["details"]["revoked"], true);

    // GitHub retries: the same alert again changes nothing and answers the same.
    let again = alert(&app, batch.as_bytes(), Some(&github)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, expected);
    assert_eq!(audit_actions(&app, &a_id).await, ["create", "leak"]);
    assert_eq!(app.get(&format!("/v1/api_keys/{a_id}")).await.body, key_a);
    // Signed by GitHub's other listed key: accepted too.
    let by_older = alert(&app, batch.as_bytes(), Some(&older)).await;
    assert_eq!(by_older.status, StatusCode::OK, "{}", by_older.body);

    // A bad or missing signature is refused and changes nothing.
    let c_batch = json!([{"token": c, "type": "latchkey_api_key", "url": url}]).to_string();
    let signed = github.sign(c_batch.as_bytes());
    let mut tampered = c_batch.clone().into_bytes();
    tampered.extend_from_slice(b" ");
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>, headers: Vec<(&'static str, String)>| {
        let mut req = http.post(format!("{}{ALERTS}", app.base)).body(body);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        TestApp::send(req)
    };
    let id = |k: &GithubKey| (common::github::KEY_ID_HEADER, k.id.clone());
    let sig = |s: &str| (common::github::SIGNATURE_HEADER, s.to_owned());
    let refusals = [
        ("unsigned", post(c_batch.clone().into_bytes(), vec![]).await),
        (
            "no identifier",
            post(c_batch.clone().into_bytes(), vec![sig(&signed)]).await,
        ),
        (
            "no signature",
            post(c_batch.clone().into_bytes(), vec![id(&github)]).await,
        ),
        (
            "body changed after signing",
            post(tampered, vec![id(&github), sig(&signed)]).await,
        ),
        (
            "signed by a key GitHub does not list",
            alert(&app, c_batch.as_bytes(), Some(&stranger)).await,
        ),
        (
            "another listed key's identifier",
            post(c_batch.clone().into_bytes(), vec![id(&older), sig(&signed)]).await,
        ),
        (
            "not base64",
            post(c_batch.clone().into_bytes(), vec![id(&github), sig("%%%")]).await,
        ),
        (
            "not DER",
            post(c_batch.clone().into_bytes(), vec![id(&github), sig("AAAA")]).await,
        ),
    ];
    for (label, r) in refusals {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{label}: {}", r.body);
        assert_eq!(r.body["errors"][0]["code"], "signature_invalid", "{label}");
    }
    for (label, body) in [
        ("an object", br#"{"token":"x"}"#.to_vec()),
        ("no token", br#"[{"type":"x"}]"#.to_vec()),
        ("not JSON", b"[{".to_vec()),
    ] {
        let r = alert(&app, &body, Some(&github)).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{label}: {}",
            r.body
        );
    }
    assert_eq!(audit_actions(&app, &c_id).await, ["create"]);
    assert_eq!(app.verify(&c, &[]).await.status, StatusCode::OK);

    // A leak found elsewhere, reported by hand: the same effect, once.
    let path = format!("/v1/api_keys/{c_id}/leak");
    let r = app.post(&path, json!({"source": "a pastebin"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["revoked"], true);
    assert_eq!(r.body["revocation_reason"], "leaked: a pastebin");
    let again = app.post(&path, json!({"source": "somewhere else"})).await;
    assert_eq!(again.body, r.body, "a second report changes nothing");
    assert_eq!(audit_actions(&app, &c_id).await, ["create", "leak"]);
    let bad = app.post(&path, json!({"source": 5})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let long = app
        .post(
            &format!("/v1/api_keys/{b_id}/leak"),
            json!({"source": "x".repeat(513)}),
        )
        .await;
    assert_eq!(
        long.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        long.body
    );

    // A batch of thousands: 200 of our keys among 5,000 tokens.
    let mut ours = Vec::new();
    for n in 0..200 {
        let (_, secret) = app.create_key(&format!("p{n}"), &[]).await;
        ours.push(secret);
    }
    let prefix = KeyPrefix::parse("sk_live").expect("prefix");
    let mut entries: Vec<Value> = (0..4_800)
        .map(|_| {
            let token = ApiKey::generate(&prefix, &mut |b: &mut [u8]| {
                getrandom::fill(b).expect("random");
            });
            json!({"token": token.expose(), "type": "latchkey_api_key", "url": url, "source": "content"})
        })
        .collect();
    entries.extend(
        ours.iter().map(
            |t| json!({"token": t, "type": "latchkey_api_key", "url": url, "source": "content"}),
        ),
    );
    let big = serde_json::to_vec(&entries).expect("json");
    let started = Instant::now();
    let r = alert(&app, &big, Some(&github)).await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let labels = r.body.as_array().expect("feedback");
    assert_eq!(labels.len(), 5_000);
    let positives = labels
        .iter()
        .filter(|l| l["label"] == "true_positive")
        .count();
    assert_eq!(positives, 200);
    for secret in ours.iter().step_by(40) {
        let v = app.verify(secret, &[]).await;
        assert_eq!(v.body["errors"][0]["code"], "api_key_revoked");
    }
    let audit_len = || async {
        let mut n = 0;
        let mut after = 0;
        loop {
            let page = app
                .get(&format!("/v1/audit_log?after={after}&limit=500"))
                .await;
            let data = page.body["data"].as_array().expect("data").clone();
            n += data.len();
            match page.body["next_after"].as_i64() {
                Some(next) => after = next,
                None => return n,
            }
        }
    };
    let before = audit_len().await;
    // GitHub retries an alert it got no answer to: five times here, for a median.
    let mut retries = Vec::new();
    for _ in 0..5 {
        let started_again = Instant::now();
        let r = alert(&app, &big, Some(&github)).await;
        retries.push(started_again.elapsed().as_millis());
        assert_eq!(r.status, StatusCode::OK);
    }
    retries.sort_unstable();
    assert_eq!(
        audit_len().await,
        before,
        "GitHub's retries changed nothing"
    );
    // `./dev bench` reads this line (its `secret_scanning` step).
    common::edge::report_measurement(&format!(
        "secret scanning: a signed alert of 5,000 tokens ({} KB, 200 of them our keys) answered in {} ms, all 200 revoked; GitHub's retry of it: median {} ms of 5, changing nothing",
        big.len() / 1024,
        took.as_millis(),
        retries[2]
    ));
}

/// A deleted key's secret is still ours: GitHub is told so, and the leak is recorded in its
/// audit trail (an admin naming the deleted key by id gets 404, as for every call).
#[tokio::test]
async fn a_deleted_keys_secret_found_by_github_is_ours_and_recorded() {
    let github = GithubKey::new("90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a");
    let (app, _dir) = app_with_keys(&[&github], &[]).await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;
    let r = app.delete(&format!("/v1/api_keys/{id}"), Value::Null).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let batch =
        json!([{"token": secret, "type": "latchkey_api_key", "source": "content"}]).to_string();
    let r = alert(&app, batch.as_bytes(), Some(&github)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body[0]["label"], "true_positive", "{}", r.body);
    assert_eq!(audit_actions(&app, &id).await, ["create", "delete", "leak"]);
    let r = app
        .post(&format!("/v1/api_keys/{id}/leak"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

#[tokio::test]
async fn with_leak_action_flag_a_leaked_key_is_marked_and_keeps_working() {
    let github = GithubKey::new("k1");
    let (app, _dir) = app_with_keys(&[&github], &[("LEAK_ACTION", "flag")]).await;
    let (id, secret) = app.create_key("acme", &[]).await;
    let batch =
        json!([{"token": secret, "type": "latchkey_api_key", "url": "https://github.com/o/r"}])
            .to_string();
    let r = alert(&app, batch.as_bytes(), Some(&github)).await;
    assert_eq!(r.body[0]["label"], "true_positive", "{}", r.body);
    let key = app.get(&format!("/v1/api_keys/{id}")).await.body;
    assert_eq!(key["revoked"], false);
    assert_eq!(key["leak_source"], "https://github.com/o/r");
    assert!(key["leaked_at"].as_i64().is_some());
    assert_eq!(app.verify(&secret, &[]).await.status, StatusCode::OK);
    let listed = app.get("/backend.api-keys.list").await;
    assert!(
        listed.body["data"][0]["leaked_at"].is_string(),
        "{}",
        listed.body
    );
    alert(&app, batch.as_bytes(), Some(&github)).await;
    app.post(&format!("/v1/api_keys/{id}/leak"), json!({}))
        .await;
    assert_eq!(audit_actions(&app, &id).await, ["create", "leak"]);
    // The owner rolls it with an hour's grace: a leaked secret gets none (before, it stayed
    // VALID for the hour). The new key is not marked.
    let rolled = app
        .post(
            &format!("/v1/api_keys/{id}/roll"),
            json!({"grace_period_seconds": 3600}),
        )
        .await;
    assert_eq!(rolled.status, StatusCode::CREATED, "{}", rolled.body);
    assert_eq!(rolled.body["leaked_at"], Value::Null, "{}", rolled.body);
    assert_eq!(rolled.body["previous"]["revoked"], true, "{}", rolled.body);
    let reason = rolled.body["previous"]["revocation_reason"]
        .as_str()
        .expect("reason");
    assert!(reason.contains("reported leaked"), "{reason}");
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.body["errors"][0]["code"], "api_key_revoked", "{}", v.body);
    let new_secret = rolled.body["secret"].as_str().expect("secret");
    assert_eq!(app.verify(new_secret, &[]).await.status, StatusCode::OK);
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await.body;
    let roll = audit["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|e| e["action"] == "roll")
        .expect("roll entry")
        .clone();
    assert_eq!(roll["details"]["grace_period_seconds"], 0, "{roll}");
    assert_eq!(roll["details"]["grace_period_requested"], 3600, "{roll}");
    assert_eq!(roll["details"]["leaked"], true, "{roll}");
}

/// A stand-in for `https://api.github.com/meta/public_keys/secret_scanning`: answers the list
/// it holds, or 500 while it holds none.
async fn github_key_endpoint(list: Arc<Mutex<Option<Value>>>) -> String {
    let app = axum::Router::new().route(
        "/meta/public_keys/secret_scanning",
        axum::routing::get(move || {
            let list = list.lock().expect("list").clone();
            async move {
                match list {
                    Some(list) => (axum::http::StatusCode::OK, axum::Json(list)),
                    None => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(json!({"message": "Server Error"})),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/meta/public_keys/secret_scanning")
}

#[tokio::test]
async fn keys_fetched_from_github_are_never_needed_to_start_and_the_last_good_list_stays() {
    let first = GithubKey::new("first");
    let second = GithubKey::new("second");
    let served = Arc::new(Mutex::new(None));
    let url = github_key_endpoint(served.clone()).await;
    // GitHub is down at start: origin starts all the same, and asks GitHub to retry.
    let app = TestApp::builder()
        .env("GITHUB_SECRET_SCANNING_KEYS_URL", &url)
        .env("GITHUB_SECRET_SCANNING_KEYS_REFRESH_S", "1")
        .start()
        .await;
    let (id, secret) = app.create_key("acme", &[]).await;
    let batch = json!([{"token": secret, "type": "latchkey_api_key"}]).to_string();
    let r = alert(&app, batch.as_bytes(), Some(&first)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.body["errors"][0]["code"], "keys_unavailable");
    assert_eq!(audit_actions(&app, &id).await, ["create"]);

    // GitHub answers: the next refresh takes its list.
    *served.lock().expect("list") = Some(key_list(&[&first]));
    let accepted = eventually(Duration::from_secs(15), || async {
        let r = alert(&app, batch.as_bytes(), Some(&first)).await;
        if r.status == StatusCode::OK {
            Ok(r)
        } else {
            Err(r.body.to_string())
        }
    })
    .await;
    assert_eq!(accepted.body[0]["label"], "true_positive");

    // GitHub fails again: the last good list stays in use.
    *served.lock().expect("list") = None;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = alert(&app, batch.as_bytes(), Some(&first)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // GitHub rotates its key: the new one is taken, the old one dropped with the list.
    *served.lock().expect("list") = Some(key_list(&[&second]));
    eventually(Duration::from_secs(15), || async {
        let r = alert(&app, batch.as_bytes(), Some(&second)).await;
        (r.status == StatusCode::OK)
            .then_some(())
            .ok_or_else(|| r.body.to_string())
    })
    .await;
    let r = alert(&app, batch.as_bytes(), Some(&first)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(audit_actions(&app, &id).await, ["create", "leak"]);
}

#[tokio::test]
async fn without_keys_the_endpoint_is_off_and_a_bad_key_file_stops_the_start() {
    let app = TestApp::start().await;
    let r = alert(&app, b"[]", Some(&GithubKey::new("k"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(r.body["errors"][0]["code"], "secret_scanning_disabled");

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("keys.json");
    std::fs::write(
        &file,
        br#"{"public_keys":[{"key_identifier":"k","key":"nope"}]}"#,
    )
    .expect("write");
    let out = app.run_command_with(
        &["serve"],
        &[
            (
                "GITHUB_SECRET_SCANNING_KEYS_FILE",
                &file.display().to_string(),
            ),
            ("ORIGIN_LISTEN", "127.0.0.1:0"),
            ("ADMIN_TOKEN", common::ADMIN_TOKEN),
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a PEM-encoded P-256 public key"),
        "{stderr}"
    );
}

/// Opens a connection from `source` (another loopback address: another client) that sends an
/// alert's headers, as anyone can (GitHub's key identifiers are public and the signature only
/// has to parse), and the first bytes of a body it never finishes.
async fn slow_unsigned_sender(
    app: &TestApp,
    source: std::net::IpAddr,
    key_id: &str,
) -> tokio::net::TcpStream {
    slow_unsigned_sender_with_length(&app.base, source, key_id, 100_000).await
}

/// Whether `stream` has been answered (or closed) already, without waiting.
fn answered(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test]
async fn slow_unsigned_senders_cannot_hold_up_a_signed_alert() {
    let github = GithubKey::new("90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a");
    // The body deadline is long, so a signed alert that waited behind the slow senders would be
    // answered after them.
    let (app, _dir) = app_with_keys(&[&github], &[("REQUEST_READ_TIMEOUT_MS", "20000")]).await;
    let (id, secret) = app.create_key("acme", &[]).await;
    // Eight slow senders from one address, eight more from another: more than every reading
    // slot origin had before (four, over all clients).
    let mut slow = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..8 {
            slow.push(slow_unsigned_sender(&app, source.parse().expect("ip"), &github.id).await);
        }
    }
    // Let origin take them all in first.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let batch =
        json!([{"token": secret, "type": "latchkey_api_key", "source": "content"}]).to_string();
    let r = alert(&app, batch.as_bytes(), Some(&github)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body[0]["label"], "true_positive", "{}", r.body);
    assert_eq!(
        app.get(&format!("/v1/api_keys/{id}")).await.body["revoked"],
        true
    );
    // Answered while every slow sender still waits: it was never behind them.
    let still_waiting = slow.iter().filter(|s| !answered(s)).count();
    assert_eq!(
        still_waiting,
        slow.len(),
        "the signed alert was answered only after slow senders were"
    );
}

/// A flood of alerts whose signature does not verify writes one warning line, not a line each
/// (before, every refusal was logged).
#[tokio::test]
async fn refused_alerts_are_logged_once_per_interval() {
    let github = GithubKey::new("k1");
    let stranger = GithubKey::new("k1");
    let (app, _dir) = app_with_keys(&[&github], &[]).await;
    let batch = br#"[{"token":"sk_live_x","type":"latchkey_api_key"}]"#;
    for _ in 0..30 {
        let r = alert(&app, batch, Some(&stranger)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    }
    let logs = app.logs();
    assert_eq!(
        logs.matches("GitHub secret scanning alert refused").count(),
        1,
        "{logs}"
    );
}

/// Opens a connection from `source` that sends an alert's headers and, at full speed, all but
/// the last bytes of a body of `BODY_MAX_BYTES`, then stalls: what fills memory fastest.
async fn fast_filling_sender(
    base: &str,
    source: std::net::IpAddr,
    key_id: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = slow_unsigned_sender_with_length(base, source, key_id, 8 * 1024 * 1024).await;
    let filler = vec![b' '; 8 * 1024 * 1024 - 64];
    // Written as far as origin takes it in; a write origin stops reading is left pending.
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&filler)).await;
    stream
}

/// [`slow_unsigned_sender`] with a declared length of `length`.
async fn slow_unsigned_sender_with_length(
    base: &str,
    source: std::net::IpAddr,
    key_id: &str,
    length: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let target: std::net::SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .expect("origin's address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(source, 0))
        .expect("bind to another loopback address");
    let mut stream = socket.connect(target).await.expect("connect");
    let head = format!(
        "POST {ALERTS} HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n\
         {}: {key_id}\r\n{}: MAYCAQECAQE=\r\nContent-Length: {length}\r\n\r\n[",
        common::github::KEY_ID_HEADER,
        common::github::SIGNATURE_HEADER,
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

/// The review's second round: senders from four addresses that fill their bodies at full speed
/// (8 MiB each, two per address) and stall held the whole shared memory (32 MiB then), so a
/// signed alert waited behind them. Each address now holds at most its share (8 MiB).
#[tokio::test]
async fn fast_filling_senders_from_a_few_addresses_cannot_hold_up_a_signed_alert() {
    let github = GithubKey::new("90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a");
    let (app, _dir) = app_with_keys(&[&github], &[("REQUEST_READ_TIMEOUT_MS", "30000")]).await;
    let (id, secret) = app.create_key("acme", &[]).await;
    let mut fillers = Vec::new();
    for n in 2..=5u8 {
        for _ in 0..2 {
            let source = std::net::IpAddr::from([127, 0, 0, n]);
            fillers.push(tokio::spawn({
                let (base, id) = (app.base.clone(), github.id.clone());
                async move { fast_filling_sender(&base, source, &id).await }
            }));
        }
    }
    let mut held = Vec::new();
    for f in fillers {
        held.push(f.await.expect("filler"));
    }
    let batch =
        json!([{"token": secret, "type": "latchkey_api_key", "source": "content"}]).to_string();
    let r = alert(&app, batch.as_bytes(), Some(&github)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        app.get(&format!("/v1/api_keys/{id}")).await.body["revoked"],
        true
    );
    drop(held);
}
