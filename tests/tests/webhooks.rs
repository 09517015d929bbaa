//! Event webhooks against a real receiver: an HTTP server on a port that checks every delivery
//! with the Standard Webhooks reference library (the signature over id, timestamp and body, and
//! the timestamp's age) and records it. Every key event arrives signed, in order; a receiver
//! that is down, failing or killed with origin loses nothing; an event whose answer origin never
//! got, because it was SIGKILLed meanwhile, arrives again, the same; and delivery state shows in
//! `/healthz` and `/metrics`.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use common::edge::{USAGE_SECRET, free_port};
use common::{TestApp, eventually};
use latchkey_shared::sign;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The secret origin signs with while receivers move to the new one (rotation).
const OLD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The secret this receiver knows.
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// What the receiver saw.
#[derive(Debug, Default)]
struct Seen {
    /// Deliveries it accepted: `webhook-id` and the payload.
    accepted: Vec<(String, Value)>,
    /// The body of each accepted delivery, byte for byte, in the order of `accepted`.
    bodies: Vec<Bytes>,
    /// Deliveries whose signature or timestamp did not verify.
    refused: usize,
    /// Deliveries it answered 500 on purpose.
    failed: usize,
    /// How many more to fail on purpose.
    fail_next: usize,
    /// A delivery to take in and leave unanswered until released (once).
    hold: Option<Hold>,
    /// Whether the held delivery has arrived (it is in `accepted`, its answer not yet sent).
    holding: bool,
}

/// A delivery the receiver records, then answers only once `release` is notified: meanwhile
/// origin waits for the answer, as it would for a receiver that is slow to answer.
#[derive(Debug)]
struct Hold {
    /// Which delivery: the first one of an event for a key of this subject.
    subject: String,
    release: Arc<tokio::sync::Notify>,
}

/// The secret origin signs `url`'s events with under `master`, as `origin webhook-secrets`
/// prints it for the receiver's operator.
fn endpoint_secret(url: &str, master: &str) -> String {
    let out = std::process::Command::new(common::origin_binary())
        .arg("webhook-secrets")
        .env("WEBHOOK_URLS", url)
        .env("WEBHOOK_SECRET", master)
        .output()
        .expect("run origin webhook-secrets");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let (printed_url, secret) = text.trim().split_once(' ').expect("`<url> <secret>`");
    assert_eq!(printed_url, url);
    assert_ne!(secret, master, "each endpoint has its own secret");
    secret.to_owned()
}

/// Starts the receiver on `port`. It knows only its own endpoint's secret.
async fn receiver(port: u16, seen: Arc<Mutex<Seen>>) {
    let secret = endpoint_secret(&format!("http://127.0.0.1:{port}/hooks"), SECRET);
    let verifier = Arc::new(standardwebhooks::Webhook::new(&secret).expect("secret"));
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            let verifier = verifier.clone();
            async move {
                let release = {
                    let mut seen = seen.lock().expect("seen");
                    if verifier.verify(&body, &headers).is_err() {
                        seen.refused += 1;
                        return AxumStatus::UNAUTHORIZED;
                    }
                    if seen.fail_next > 0 {
                        seen.fail_next -= 1;
                        seen.failed += 1;
                        return AxumStatus::INTERNAL_SERVER_ERROR;
                    }
                    let id = headers["webhook-id"].to_str().expect("id").to_owned();
                    let payload: Value = serde_json::from_slice(&body).expect("JSON payload");
                    let held = seen.hold.as_ref().is_some_and(|hold| {
                        payload["data"]["key"]["subject"] == hold.subject.as_str()
                    });
                    seen.accepted.push((id, payload));
                    seen.bodies.push(body);
                    seen.holding |= held;
                    if held {
                        seen.hold.take().map(|hold| hold.release)
                    } else {
                        None
                    }
                };
                if let Some(release) = release {
                    release.notified().await;
                }
                AxumStatus::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the receiver");
    tokio::spawn(async move { axum::serve(listener, app).await });
}

fn origin_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("WEBHOOK_URLS", format!("http://127.0.0.1:{port}/hooks")),
        ("WEBHOOK_SECRET", format!("{OLD_SECRET},{SECRET}")),
        ("WEBHOOK_RETRY_MAX_MS", "200".to_owned()),
    ]
}

async fn start(port: u16) -> TestApp {
    let mut builder = TestApp::builder();
    for (name, value) in origin_env(port) {
        builder = builder.env(name, &value);
    }
    builder.start().await
}

/// Waits until the receiver accepted `n` distinct events; returns them in arrival order, each
/// once.
async fn delivered(seen: &Arc<Mutex<Seen>>, n: usize) -> Vec<(String, Value)> {
    eventually(Duration::from_secs(30), || async {
        let seen = seen.lock().expect("seen");
        let mut ids = std::collections::HashSet::new();
        let unique: Vec<(String, Value)> = seen
            .accepted
            .iter()
            .filter(|(id, _)| ids.insert(id.clone()))
            .cloned()
            .collect();
        if unique.len() >= n {
            Ok(unique)
        } else {
            Err(format!(
                "{} of {n} events delivered: {:?}",
                unique.len(),
                seen.accepted
            ))
        }
    })
    .await
}

#[tokio::test]
async fn every_key_event_arrives_signed_and_in_order() {
    let port = free_port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    receiver(port, seen.clone()).await;
    let app = start(port).await;

    let (a, _) = app.create_key("acme", &["read:orders"]).await;
    let path = format!("/v1/api_keys/{a}");
    app.patch(&path, json!({"name": "renamed"})).await;
    app.patch(&path, json!({"disabled": true})).await;
    app.patch(&path, json!({"disabled": false})).await;
    let rolled = app
        .post(&format!("{path}/roll"), json!({"grace_period_seconds": 60}))
        .await;
    let b = rolled.body["id"].as_str().expect("id").to_owned();
    app.post(
        &format!("/v1/api_keys/{b}/leak"),
        json!({"source": "a pastebin"}),
    )
    .await;
    let (c, _) = app.create_key("globex", &[]).await;
    app.post(
        &format!("/v1/api_keys/{c}/revoke"),
        json!({"revocation_reason": "done"}),
    )
    .await;
    // Deleted (Clerk's delete): hidden, yet the event still names the key.
    let deleted = app.delete(&format!("/api_keys/{c}"), Value::Null).await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    // A refused change is audited, but it is no event.
    let refused = app
        .post(
            "/v1/api_keys",
            json!({"name": "x", "subject": "s", "scopes": ["READ"]}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);

    let events = delivered(&seen, 10).await;
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|(_, e)| {
            (
                e["type"].as_str().expect("type").to_owned(),
                e["data"]["key"]["id"].as_str().expect("key id").to_owned(),
            )
        })
        .collect();
    let expect = |kind: &str, id: &str| (kind.to_owned(), id.to_owned());
    assert_eq!(
        summary,
        [
            expect("api_key.created", &a),
            expect("api_key.updated", &a),
            expect("api_key.disabled", &a),
            expect("api_key.enabled", &a),
            expect("api_key.rolled", &a),
            expect("api_key.created", &b),
            expect("api_key.leaked", &b),
            expect("api_key.created", &c),
            expect("api_key.revoked", &c),
            expect("api_key.deleted", &c),
        ]
    );
    let (_, rolled_event) = &events[4];
    assert_eq!(rolled_event["data"]["details"]["rolled_to"], json!(b));
    assert_eq!(rolled_event["data"]["key"]["subject"], "acme");
    assert_eq!(events[5].1["data"]["details"]["rolled_from"], json!(a));
    assert_eq!(events[6].1["data"]["details"]["revoked"], true);
    assert_eq!(events[8].1["data"]["details"]["reason"], "done");
    assert_eq!(
        events[9].1["data"]["details"]["revoked"], false,
        "revoked before"
    );
    assert_eq!(events[9].1["data"]["key"]["subject"], "globex");
    let seqs: Vec<i64> = events
        .iter()
        .map(|(_, e)| e["data"]["audit_seq"].as_i64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let (refused, accepted) = {
        let seen = seen.lock().expect("seen");
        (seen.refused, seen.accepted.len())
    };
    assert_eq!(refused, 0, "every signature verified");
    assert_eq!(accepted, 10, "each delivered once while all went well");

    let health = eventually(Duration::from_secs(10), || async {
        let h = app.get("/healthz").await;
        (h.body["webhooks"]["pending"] == 0)
            .then_some(h.body.clone())
            .ok_or_else(|| h.body.to_string())
    })
    .await;
    assert_eq!(health["webhooks"]["endpoints"], 1);
    assert_eq!(health["webhooks"]["state"], "ok");
    assert_eq!(health["webhooks"]["delivered"], 10);
    assert!(
        health["webhooks"].get("detail").is_none(),
        "no URL on the open route"
    );
    let text = reqwest::get(format!("{}/metrics", app.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("latchkey_webhook_delivered_total 10"),
        "{text}"
    );
    assert!(text.contains("latchkey_webhook_pending 0"), "{text}");
}

#[tokio::test]
async fn a_receiver_down_or_failing_and_origin_killed_lose_no_event() {
    let port = free_port();
    let mut app = start(port).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(app.create_key(&format!("p{n}"), &[]).await.0);
    }
    // Nobody listens: the events wait, and health says so.
    let health = eventually(Duration::from_secs(10), || async {
        let h = app.get("/healthz").await;
        (h.body["webhooks"]["state"] == "failing" && h.body["webhooks"]["pending"] == 5)
            .then_some(h.body.clone())
            .ok_or_else(|| h.body.to_string())
    })
    .await;
    assert!(health["webhooks"]["failures"].as_u64().expect("failures") >= 1);
    assert!(health["webhooks"]["lag_ms"].as_i64().expect("lag") > 0);
    let status = app.get("/v1/status").await;
    let detail = &status.body["webhooks"]["detail"][0];
    assert_eq!(detail["pending"], 5, "{}", status.body);
    assert!(detail["last_error"].is_string(), "{}", status.body);
    let label = detail["endpoint"].as_str().expect("endpoint");
    assert!(
        label.starts_with(&format!("http://127.0.0.1:{port} #")) && !label.contains("/hooks"),
        "named by origin and hash, never by its path: {label}"
    );
    assert!(
        !app.logs().contains("/hooks"),
        "the URL's path is not logged"
    );

    // Origin dies with all of it undelivered, and comes back.
    app.kill();
    app.start_again().await;
    ids.push(app.create_key("after the crash", &[]).await.0);

    // The receiver comes up, and fails the first two deliveries on purpose.
    let seen = Arc::new(Mutex::new(Seen {
        fail_next: 2,
        ..Seen::default()
    }));
    receiver(port, seen.clone()).await;
    let events = delivered(&seen, 6).await;
    let keys: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["data"]["key"]["id"].as_str().expect("key"))
        .collect();
    assert_eq!(
        keys,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "all, in order"
    );
    let (failed, refused) = {
        let seen = seen.lock().expect("seen");
        (seen.failed, seen.refused)
    };
    assert_eq!(
        (failed, refused),
        (2, 0),
        "two failed on purpose, none refused"
    );
    eventually(Duration::from_secs(10), || async {
        let h = app.get("/healthz").await;
        (h.body["webhooks"]["pending"] == 0 && h.body["webhooks"]["state"] == "ok")
            .then_some(())
            .ok_or_else(|| h.body.to_string())
    })
    .await;

    // Restarted cleanly: nothing already delivered is sent again.
    app.restart().await;
    let (late, _) = app.create_key("late", &[]).await;
    let events = delivered(&seen, 7).await;
    assert_eq!(events[6].1["data"]["key"]["id"], json!(late));
    let accepted = seen.lock().expect("seen").accepted.len();
    assert_eq!(
        accepted, 7,
        "no event delivered twice after a clean restart"
    );
    common::edge::report_measurement(&format!(
        "webhooks: 6 events made while the receiver was down (origin SIGKILLed meanwhile) all delivered in order once it came up, through 2 failed attempts; {accepted} deliveries for 7 events"
    ));
}

/// Waits until origin has every event delivered (its cursors are past them all).
async fn nothing_pending(app: &TestApp) {
    eventually(Duration::from_secs(30), || async {
        let h = app.get("/healthz").await;
        (h.body["webhooks"]["pending"] == 0)
            .then_some(())
            .ok_or_else(|| h.body.to_string())
    })
    .await;
}

/// At least once across `kill -9`: the receiver takes an event in and holds its answer while
/// origin is SIGKILLed, so origin never learns that it arrived. After the restart the same event
/// arrives again, with the same `webhook-id` and the same body byte for byte (though its key was
/// renamed meanwhile), then the events made behind it, in order: nothing passes the held event,
/// and it is the only one delivered twice.
#[tokio::test]
async fn an_event_whose_answer_origin_never_got_arrives_again_after_kill_9() {
    let port = free_port();
    let release = Arc::new(tokio::sync::Notify::new());
    let seen = Arc::new(Mutex::new(Seen {
        hold: Some(Hold {
            subject: "held".to_owned(),
            release: release.clone(),
        }),
        ..Seen::default()
    }));
    receiver(port, seen.clone()).await;
    // Origin waits for the held answer as long as it may (its timeout would send the event again).
    let mut builder = TestApp::builder().env("WEBHOOK_TIMEOUT_MS", "60000");
    for (name, value) in origin_env(port) {
        builder = builder.env(name, &value);
    }
    let mut app = builder.start().await;

    let (before, _) = app.create_key("before", &[]).await;
    delivered(&seen, 1).await;
    // Its delivery is in origin's cursor: from here on only the held event may come twice.
    nothing_pending(&app).await;

    let (held, _) = app.create_key("held", &[]).await;
    eventually(Duration::from_secs(10), || async {
        let seen = seen.lock().expect("seen");
        seen.holding
            .then_some(())
            .ok_or_else(|| format!("not held yet: {:?}", seen.accepted))
    })
    .await;
    // Behind the held event: its key renamed (which must not change the held event's body when
    // it is sent again), another key created, the first one revoked.
    let path = format!("/v1/api_keys/{held}");
    let renamed = app
        .patch(&path, json!({"name": "renamed while held"}))
        .await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    let (after, _) = app.create_key("after", &[]).await;
    let revoked = app
        .post(&format!("/v1/api_keys/{before}/revoke"), json!({}))
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    let so_far: Vec<String> = {
        let seen = seen.lock().expect("seen");
        seen.accepted
            .iter()
            .map(|(_, e)| {
                e["data"]["key"]["subject"]
                    .as_str()
                    .expect("subject")
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(so_far, ["before", "held"], "nothing passes the held event");

    // Origin dies waiting for the answer; the receiver then answers a closed connection.
    app.kill();
    release.notify_one();
    app.start_again().await;

    eventually(Duration::from_secs(30), || async {
        let seen = seen.lock().expect("seen");
        let again = seen
            .accepted
            .iter()
            .filter(|(_, e)| {
                e["data"]["key"]["id"] == held.as_str() && e["type"] == "api_key.created"
            })
            .count();
        (again >= 2 && seen.accepted.len() >= 6)
            .then_some(())
            .ok_or_else(|| format!("the held event arrived {again} times: {:?}", seen.accepted))
    })
    .await;
    nothing_pending(&app).await;
    let seen = seen.lock().expect("seen");
    let summary: Vec<(&str, &str, &str)> = seen
        .accepted
        .iter()
        .map(|(_, e)| {
            let key = &e["data"]["key"];
            (
                e["type"].as_str().expect("type"),
                key["id"].as_str().expect("key id"),
                key["name"].as_str().expect("key name"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("api_key.created", before.as_str(), "before key"),
            ("api_key.created", held.as_str(), "held key"),
            ("api_key.created", held.as_str(), "held key"),
            ("api_key.updated", held.as_str(), "renamed while held"),
            ("api_key.created", after.as_str(), "after key"),
            ("api_key.revoked", before.as_str(), "before key"),
        ],
        "the held event again, then the rest in order, each once"
    );
    let ids: Vec<&str> = seen.accepted.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids[1], ids[2], "the same webhook-id: {ids:?}");
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        5,
        "one id per event: {ids:?}"
    );
    assert_eq!(
        seen.bodies[1], seen.bodies[2],
        "the same body, byte for byte"
    );
    let seqs: Vec<i64> = seen.accepted[2..]
        .iter()
        .map(|(_, e)| e["data"]["audit_seq"].as_i64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert_eq!(seen.refused, 0, "every signature verified");
    common::edge::report_measurement(&format!(
        "webhooks: an event whose answer origin never got (the receiver held it while origin was SIGKILLed) arrived again after the restart with the same webhook-id and the same body byte for byte (its key renamed meanwhile), then the 3 events behind it in order; {} deliveries for 5 events, the held one the only repeat",
        seen.accepted.len()
    ));
}

/// Reports a use of `id` now, as the edge does: a batch signed with the usage secret.
async fn report_usage(app: &TestApp, id: &str) -> common::Reply {
    let now = common::now_ms();
    let body =
        json!({"batch": format!("test-{now}-{id}"), "uses": [{"id": id, "at": now}]}).to_string();
    let signature = sign::sign(
        USAGE_SECRET.as_bytes(),
        &sign::usage_message(latchkey_shared::UnixMillis(now), body.as_bytes()),
    );
    let req = app
        .request(reqwest::Method::POST, "/v1/usage")
        .header("content-type", "application/json")
        .header(sign::header::TIMESTAMP, now.to_string())
        .header(sign::header::SIGNATURE, signature)
        .body(body);
    TestApp::send(req).await
}

/// Before, a key used only at the edge looked idle to origin without usage reports and was
/// switched off: now the policy waits for reports, says so, and acts once they arrive.
#[tokio::test]
async fn the_stale_key_policy_is_held_while_no_usage_report_arrives() {
    let app = TestApp::builder()
        .env("STALE_KEY_AFTER", "1s")
        .env("STALE_WARNING_BEFORE", "0s")
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .env("STALE_KEY_USAGE_MAX_AGE", "1s")
        .env("KEY_POLICY_INTERVAL", "100ms")
        .start()
        .await;
    let (idle, _) = app.create_key("idle", &[]).await;
    let health = app.get("/healthz").await.body;
    assert_eq!(health["key_policy"]["stale_keys"], "held", "{health}");
    assert_eq!(health["key_policy"]["usage_report_age_ms"], Value::Null);
    // Well past STALE_KEY_AFTER, and many passes later, the key is still on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let key = app.get(&format!("/v1/api_keys/{idle}")).await.body;
    assert_eq!(key["disabled"], false, "{key}");
    let metrics = reqwest::get(format!("{}/metrics", app.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(
            "latchkey_stale_key_policy_held 1
"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "latchkey_usage_report_age_seconds -1.000
"
        ),
        "{metrics}"
    );
    assert!(
        app.logs().contains("stale-key policy held"),
        "{}",
        app.logs()
    );

    // A report (of another key) shows the reports arrive: the idle key is switched off.
    let (other, _) = app.create_key("other", &[]).await;
    assert_eq!(report_usage(&app, &other).await.status, StatusCode::OK);
    eventually(Duration::from_secs(10), || async {
        let key = app.get(&format!("/v1/api_keys/{idle}")).await.body;
        (key["disabled"] == true)
            .then_some(())
            .ok_or_else(|| key.to_string())
    })
    .await;
    assert!(
        app.logs().contains("stale-key policy resumed"),
        "{}",
        app.logs()
    );
}

/// The event types the receiver accepted for `key`, in order, each event once.
fn types_for(seen: &Arc<Mutex<Seen>>, key: &str) -> Vec<String> {
    let seen = seen.lock().expect("seen");
    let mut ids = std::collections::HashSet::new();
    seen.accepted
        .iter()
        .filter(|(id, e)| e["data"]["key"]["id"] == key && ids.insert(id.clone()))
        .map(|(_, e)| e["type"].as_str().expect("type").to_owned())
        .collect()
}

#[tokio::test]
async fn the_policies_warn_then_switch_off_stale_keys_and_warn_of_expiry_once() {
    let port = free_port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    receiver(port, seen.clone()).await;
    let mut builder = TestApp::builder()
        .env("STALE_KEY_AFTER", "3s")
        .env("STALE_WARNING_BEFORE", "1500ms")
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .env("STALE_KEY_USAGE_MAX_AGE", "2s")
        .env("EXPIRY_WARNING_BEFORE", "2h")
        .env("KEY_POLICY_INTERVAL", "100ms")
        .env("LAST_USED_FLUSH_MS", "50");
    for (name, value) in origin_env(port) {
        builder = builder.env(name, &value);
    }
    let app = Arc::new(builder.start().await);
    let (idle, idle_secret) = app.create_key("idle", &[]).await;
    let (used, used_secret) = app.create_key("used", &[]).await;
    let expiring = app
        .post(
            "/v1/api_keys",
            json!({"name": "e", "subject": "expiring", "seconds_until_expiration": 3600}),
        )
        .await;
    let expiring_id = expiring.body["id"].as_str().expect("id").to_owned();
    let expiring_secret = expiring.body["secret"].as_str().expect("secret").to_owned();
    // Two keys in use all along: one verified at origin, one only at the edge (reported in
    // signed usage batches, as the edge reports them).
    let used_id = app.verify(&used_secret, &[]).await.body["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let user = tokio::spawn({
        let (app, stop) = (app.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(
                    app.verify(&expiring_secret, &[]).await.status,
                    StatusCode::OK
                );
                let r = report_usage(&app, &used_id).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });

    // The idle key is warned, then switched off by the policy, no sooner than promised.
    eventually(Duration::from_secs(20), || async {
        let types = types_for(&seen, &idle);
        (types == ["api_key.created", "api_key.stale", "api_key.disabled"])
            .then_some(())
            .ok_or_else(|| format!("{types:?}"))
    })
    .await;
    let r = app.verify(&idle_secret, &[]).await;
    assert_eq!(
        r.body["errors"][0]["code"], "api_key_disabled",
        "{}",
        r.body
    );
    let audit = app.get(&format!("/v1/audit_log?key_id={idle}")).await.body;
    let entries = audit["data"].as_array().expect("data");
    let (warning, switch) = (&entries[1], &entries[2]);
    assert_eq!(warning["action"], "stale_warning");
    assert_eq!(switch["actor"], "policy:stale_keys");
    assert_eq!(switch["details"]["policy"], "stale_keys");
    assert_eq!(switch["details"]["changes"]["disabled"]["to"], true);
    let waited = switch["at"].as_i64().expect("at") - warning["at"].as_i64().expect("at");
    assert!(waited >= 1500, "switched off {waited} ms after the warning");

    // Switched on again by an admin, its idle time starts over: it works, and is warned anew.
    app.patch(&format!("/v1/api_keys/{idle}"), json!({"disabled": false}))
        .await;
    assert_eq!(app.verify(&idle_secret, &[]).await.status, StatusCode::OK);
    eventually(Duration::from_secs(20), || async {
        let types = types_for(&seen, &idle);
        (types.iter().filter(|t| *t == "api_key.stale").count() == 2)
            .then_some(())
            .ok_or_else(|| format!("{types:?}"))
    })
    .await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    user.await.expect("user task");
    // Keys in use were never warned; the expiring key was warned of its expiry once, however
    // many passes ran.
    assert_eq!(types_for(&seen, &used), ["api_key.created"]);
    let types = types_for(&seen, &expiring_id);
    assert_eq!(types, ["api_key.created", "api_key.expiring"], "{types:?}");
    let expiry = seen
        .lock()
        .expect("seen")
        .accepted
        .iter()
        .find(|(_, e)| e["type"] == "api_key.expiring")
        .map(|(_, e)| e.clone())
        .expect("expiring event");
    assert_eq!(
        expiry["data"]["details"]["expires_at"],
        expiring.body["expiration"]
    );
}

#[tokio::test]
async fn an_endpoint_that_is_down_holds_up_no_other() {
    let (up, down) = (free_port(), free_port());
    let seen = Arc::new(Mutex::new(Seen::default()));
    receiver(up, seen.clone()).await;
    let app = TestApp::builder()
        .env(
            "WEBHOOK_URLS",
            &format!("http://127.0.0.1:{down}/hooks,http://127.0.0.1:{up}/hooks"),
        )
        .env("WEBHOOK_SECRET", SECRET)
        .env("WEBHOOK_RETRY_MAX_MS", "200")
        .start()
        .await;
    for n in 0..3 {
        app.create_key(&format!("p{n}"), &[]).await;
    }
    assert_eq!(delivered(&seen, 3).await.len(), 3);
    let status = eventually(Duration::from_secs(10), || async {
        let s = app.get("/v1/status").await;
        let detail = s.body["webhooks"]["detail"].clone();
        (detail[0]["pending"] == 3 && detail[1]["pending"] == 0)
            .then_some(s.body.clone())
            .ok_or_else(|| s.body.to_string())
    })
    .await;
    assert_eq!(status["webhooks"]["state"], "failing");
    assert_eq!(status["webhooks"]["delivering"], true);
}
