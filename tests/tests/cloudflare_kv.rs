//! Origin's publisher against Cloudflare's public KV REST API, which cannot run here: a fake
//! that speaks its wire format (the path under `/client/v4/accounts/<account>`, the bearer
//! token, the raw value body, and the `{success, errors, messages, result}` envelope, with 429
//! and 500 answers for a while). Like Cloudflare it refuses every request, reads as well as
//! writes, without the token it accepts or for another account: 403 with code 10000
//! (`Authentication error`); the token it accepts can be rolled during a test. Like KV it
//! keeps the last write applied to each name, serves it back (`GET …/values/{name}`,
//! `POST …/bulk/get`), and can hold a write and apply it late: after the client timed out and
//! after a newer write of the same name landed. It takes bulk writes (`PUT …/bulk`: a JSON
//! array of up to 10,000 `{key, value}` pairs, at most 100 MB, answered with
//! `successful_key_count` and `unsuccessful_keys`), and enforces Cloudflare's API limit per
//! token: 1,200 requests per five minutes over every endpoint, past which every request with
//! that token gets 429 for five minutes, with `Retry-After` or (as Cloudflare may) without
//! (all scalable for a test). It logs every request (when, with which token, to which
//! endpoint, whether it was refused for the limit), so a test can count them by its own clock.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use common::{TestApp, eventually};
use latchkey_shared::{ApiKey, KeyRecord, kv_entry_name};
use serde_json::{Value, json};

const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
const NAMESPACE: &str = "fedcba9876543210fedcba9876543210";
const TOKEN: &str = "cf-api-token-for-tests-dddddddddddd";
/// The token that replaces [`TOKEN`] when a test rolls it at Cloudflare.
const ROLLED_TOKEN: &str = "cf-api-token-rolled-for-tests-eeeeee";
/// An account [`TOKEN`] does not open.
const OTHER_ACCOUNT: &str = "ffffffffffffffffffffffffffffffff";

/// One PUT the fake accepted.
#[derive(Debug, Clone)]
struct Write {
    name: String,
    authorization: String,
    body: String,
}

/// Cloudflare's API limit, as the fake enforces it.
#[derive(Debug, Clone, Copy)]
struct Limit {
    /// Requests allowed per window, over every endpoint.
    requests: usize,
    /// The window.
    window: Duration,
    /// How long every request is refused once the limit is passed.
    penalty: Duration,
}

/// Cloudflare's: 1,200 requests per five minutes, then 429 for five minutes.
const CLOUDFLARE_LIMIT: Limit = Limit {
    requests: 1200,
    window: Duration::from_secs(300),
    penalty: Duration::from_secs(300),
};

/// One request the fake received, as its meter saw it.
#[derive(Debug, Clone)]
struct Request {
    /// When it came, by the fake's clock.
    at: Instant,
    /// Its `Authorization` header, as sent (Cloudflare meters each token on its own).
    token: String,
    /// The endpoint: `put`, `bulk_put`, `get` or `bulk_get`.
    kind: &'static str,
    /// Whether it was refused for the limit (429).
    limited: bool,
}

/// The fake's bookkeeping of the limit, per token as Cloudflare's.
#[derive(Debug)]
struct Meter {
    limit: Limit,
    /// Whether a 429 for the limit carries `Retry-After` (Cloudflare's may not).
    retry_after: bool,
    /// Per token: when each request of its current window came.
    recent: HashMap<String, VecDeque<Instant>>,
    /// Per token: until when every request with it is refused.
    blocked_until: HashMap<String, Instant>,
    /// Every request, in order.
    log: Vec<Request>,
    /// Every request, by endpoint kind: `put`, `bulk_put`, `get`, `bulk_get`.
    requests: HashMap<&'static str, usize>,
    /// The most requests one token made in one window.
    peak: usize,
    /// Requests refused for the limit (429).
    limited: usize,
    /// Times the limit was passed (each starts a penalty).
    penalties: usize,
}

impl Default for Meter {
    fn default() -> Self {
        Self {
            limit: CLOUDFLARE_LIMIT,
            retry_after: true,
            recent: HashMap::new(),
            blocked_until: HashMap::new(),
            log: Vec::new(),
            requests: HashMap::new(),
            peak: 0,
            limited: 0,
            penalties: 0,
        }
    }
}

impl Meter {
    /// Counts a request with `headers`' token; the 429 to answer if that token passed the
    /// limit or its penalty lasts.
    fn admit(&mut self, kind: &'static str, headers: &HeaderMap) -> Option<Response> {
        let now = Instant::now();
        let token = authorization(headers);
        *self.requests.entry(kind).or_default() += 1;
        let recent = self.recent.entry(token.clone()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.limit.window)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        let in_window = recent.len();
        self.peak = self.peak.max(in_window);
        let blocked = self.blocked_until.get(&token).copied();
        if blocked.is_none_or(|until| now >= until) && in_window > self.limit.requests {
            self.blocked_until
                .insert(token.clone(), now + self.limit.penalty);
            self.penalties += 1;
        }
        let until = self
            .blocked_until
            .get(&token)
            .copied()
            .filter(|until| now < *until);
        self.log.push(Request {
            at: now,
            token,
            kind,
            limited: until.is_some(),
        });
        let until = until?;
        self.limited += 1;
        let left = (until - now).as_secs_f64().ceil().max(1.0);
        let mut response = envelope_error(
            StatusCode::TOO_MANY_REQUESTS,
            10429,
            "Too many requests: rate limited",
        )
        .into_response();
        if self.retry_after {
            response.headers_mut().insert(
                "retry-after",
                format!("{left:.0}").parse().expect("header value"),
            );
        }
        Some(response)
    }

    fn total(&self) -> usize {
        self.requests.values().sum()
    }

    /// When each request with `token` came, in order.
    fn times(&self, token: &str) -> Vec<Instant> {
        let token = format!("Bearer {token}");
        self.log
            .iter()
            .filter(|r| r.token == token)
            .map(|r| r.at)
            .collect()
    }
}

#[derive(Default)]
struct Fake {
    /// Cloudflare's request limit, and what was asked of each endpoint.
    meter: Meter,
    /// The API token Cloudflare accepts (for [`ACCOUNT`]); any other, or none, is refused 403.
    token: String,
    /// Once the next write has been applied, the token is rolled to this one: the token
    /// origin holds stops working.
    roll_token_after_write: Option<String>,
    /// Requests refused 403 (a wrong or missing token, another account), by endpoint kind.
    unauthenticated: HashMap<&'static str, usize>,
    /// Keys of the next bulk writes to report as `unsuccessful_keys` (not written), once.
    unsuccessful_once: usize,
    /// Answers to give before accepting writes, in order: (status, errors).
    failures: Vec<(StatusCode, Value)>,
    refused: usize,
    /// While set, every write gets this answer (an outage of some length).
    outage: Option<(StatusCode, Value)>,
    /// While set, requests are held without an answer (origin's request timeout must fire).
    hang: bool,
    /// Writes applied, in order.
    writes: Vec<Write>,
    /// What KV holds: the last write applied to each name.
    values: HashMap<String, String>,
    /// The next write is held (no answer) and applied late: right after a write of the same
    /// name with a higher revision is applied.
    hold_next_write: bool,
    /// The held write, waiting: its name, revision and release.
    held: Option<(String, u64, Arc<tokio::sync::Notify>)>,
    /// Held writes applied late.
    late_applied: usize,
    /// Reads served (single and bulk).
    reads: usize,
}

impl Fake {
    /// Applies a write as KV does (the last one wins), releasing a held older write of the
    /// same name, which is then applied after it.
    fn apply(&mut self, write: Write) {
        let revision = record_revision(&write.body);
        let newer = |(name, held, _): &(String, u64, _)| *name == write.name && revision > *held;
        if let Some((_, _, release)) = self.held.take_if(|h| newer(h)) {
            release.notify_one();
        }
        self.values.insert(write.name.clone(), write.body.clone());
        self.writes.push(write);
    }

    /// Cloudflare's 403 for a request without the token it accepts (missing, wrong, or not
    /// a bearer token) or for an account that token does not open, on every endpoint: `None`
    /// when the request may go on.
    fn authenticate(
        &mut self,
        kind: &'static str,
        account: &str,
        headers: &HeaderMap,
    ) -> Option<Response> {
        if account == ACCOUNT && authorization(headers) == format!("Bearer {}", self.token) {
            return None;
        }
        *self.unauthenticated.entry(kind).or_default() += 1;
        Some(envelope_error(StatusCode::FORBIDDEN, 10000, "Authentication error").into_response())
    }
}

fn record_revision(body: &str) -> u64 {
    KeyRecord::from_json(body.as_bytes()).map_or(0, |r| r.revision)
}

fn envelope_error(status: StatusCode, code: i64, message: &str) -> (StatusCode, axum::Json<Value>) {
    (
        status,
        axum::Json(
            json!({ "success": false, "errors": [{ "code": code, "message": message }], "messages": [], "result": null }),
        ),
    )
}

/// `GET …/values/{name}`: the raw value, or Cloudflare's 404 ("key not found", code 10009).
async fn get_value(
    State(fake): State<Shared>,
    Path((account, namespace, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> axum::response::Response {
    let mut fake = fake.lock().expect("lock");
    if let Some(limited) = fake.meter.admit("get", &headers) {
        return limited;
    }
    if let Some(refused) = fake.authenticate("get", &account, &headers) {
        return refused;
    }
    if namespace != NAMESPACE {
        return envelope_error(StatusCode::NOT_FOUND, 10013, "namespace not found").into_response();
    }
    fake.reads += 1;
    match fake.values.get(&name) {
        Some(value) => (StatusCode::OK, value.clone()).into_response(),
        None => {
            envelope_error(StatusCode::NOT_FOUND, 10009, "get: 'key not found'").into_response()
        }
    }
}

/// `POST …/bulk/get`: `{"keys": [...], "type": "text"}` → `result.values`, `null` when absent.
async fn bulk_get(
    State(fake): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    let mut fake = fake.lock().expect("lock");
    if let Some(limited) = fake.meter.admit("bulk_get", &headers) {
        return limited;
    }
    if let Some(refused) = fake.authenticate("bulk_get", &account, &headers) {
        return refused;
    }
    if namespace != NAMESPACE {
        return envelope_error(StatusCode::NOT_FOUND, 10013, "namespace not found").into_response();
    }
    let names = request["keys"].as_array().cloned().unwrap_or_default();
    if names.len() > 100 || request["type"] != "text" {
        return envelope_error(StatusCode::BAD_REQUEST, 10001, "bad bulk get").into_response();
    }
    fake.reads += 1;
    let values: serde_json::Map<String, Value> = names
        .iter()
        .filter_map(Value::as_str)
        .map(|name| (name.to_owned(), json!(fake.values.get(name))))
        .collect();
    (
        StatusCode::OK,
        axum::Json(
            json!({ "success": true, "errors": [], "messages": [], "result": { "values": values } }),
        ),
    )
        .into_response()
}

type Shared = Arc<Mutex<Fake>>;

/// `PUT …/values/{name}`: one value, the raw body.
async fn put_value(
    State(shared): State<Shared>,
    Path((account, namespace, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    {
        let mut fake = shared.lock().expect("lock");
        if let Some(limited) = fake.meter.admit("put", &headers) {
            return limited;
        }
        if let Some(refused) = fake.authenticate("put", &account, &headers) {
            return refused;
        }
    }
    let write = Write {
        name,
        authorization: authorization(&headers),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    accept(shared, &namespace, vec![write], false).await
}

fn authorization(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Cloudflare's largest bulk write: 10,000 pairs, 100 MB.
const BULK_MAX_PAIRS: usize = 10_000;
const BULK_MAX_BYTES: usize = 100 * 1024 * 1024;

/// `PUT …/bulk`: a JSON array of `{"key", "value", ...}` pairs, each value a string.
async fn put_bulk(
    State(shared): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    {
        let mut fake = shared.lock().expect("lock");
        if let Some(limited) = fake.meter.admit("bulk_put", &headers) {
            return limited;
        }
        if let Some(refused) = fake.authenticate("bulk_put", &account, &headers) {
            return refused;
        }
    }
    let bad =
        |message: &str| envelope_error(StatusCode::BAD_REQUEST, 10001, message).into_response();
    if body.len() > BULK_MAX_BYTES {
        return envelope_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            10011,
            "request body too large",
        )
        .into_response();
    }
    let Ok(Value::Array(pairs)) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body must be a JSON array of key-value pairs");
    };
    if pairs.is_empty() || pairs.len() > BULK_MAX_PAIRS {
        return bad("a bulk write takes 1 to 10,000 pairs");
    }
    let authorization = authorization(&headers);
    let mut writes = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        let (Some(key), Some(value)) = (pair["key"].as_str(), pair["value"].as_str()) else {
            return bad("each pair needs a string key and a string value");
        };
        if key.is_empty() || key.len() > 512 {
            return bad("a key name is 1 to 512 bytes");
        }
        writes.push(Write {
            name: key.to_owned(),
            authorization: authorization.clone(),
            body: value.to_owned(),
        });
    }
    accept(shared, &namespace, writes, true).await
}

/// Applies `writes` (one authenticated request's) as KV does, after any scripted failure,
/// outage, hang or hold; answers as the endpoint (`bulk`: with the bulk result) would.
async fn accept(shared: Shared, namespace: &str, mut writes: Vec<Write>, bulk: bool) -> Response {
    if shared.lock().expect("lock").hang {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let ok = |written: usize, unsuccessful: Vec<String>| {
        let result = if bulk {
            json!({ "successful_key_count": written, "unsuccessful_keys": unsuccessful })
        } else {
            json!({})
        };
        (
            StatusCode::OK,
            axum::Json(json!({ "success": true, "errors": [], "messages": [], "result": result })),
        )
            .into_response()
    };
    let refuse = |status: StatusCode, errors: Value| {
        let mut response = (
            status,
            axum::Json(
                json!({ "success": false, "errors": errors, "messages": [], "result": null }),
            ),
        )
            .into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", "1".parse().expect("header value"));
        }
        response
    };
    let held = {
        let mut fake = shared.lock().expect("lock");
        if let Some((status, errors)) = fake.outage.clone() {
            fake.refused += 1;
            return refuse(status, errors);
        }
        if namespace != NAMESPACE {
            return envelope_error(StatusCode::NOT_FOUND, 10013, "namespace not found")
                .into_response();
        }
        if fake.refused < fake.failures.len() {
            let (status, errors) = fake.failures[fake.refused].clone();
            fake.refused += 1;
            return refuse(status, errors);
        }
        let mut unsuccessful = Vec::new();
        if bulk && fake.unsuccessful_once > 0 {
            let n = fake.unsuccessful_once.min(writes.len());
            fake.unsuccessful_once -= n;
            unsuccessful = writes.drain(..n).map(|w| w.name).collect();
        }
        if !fake.hold_next_write {
            let written = writes.len();
            for write in writes {
                fake.apply(write);
            }
            if let Some(rolled) = fake.roll_token_after_write.take() {
                fake.token = rolled;
            }
            return ok(written, unsuccessful);
        }
        // Held: no answer now (the client times out); applied late, in a task of its own so
        // that the client giving up does not cancel it.
        fake.hold_next_write = false;
        let release = Arc::new(tokio::sync::Notify::new());
        let first = writes.first().expect("at least one write");
        fake.held = Some((
            first.name.clone(),
            record_revision(&first.body),
            release.clone(),
        ));
        (writes, release)
    };
    let (writes, release) = held;
    let written = writes.len();
    let late = tokio::spawn(async move {
        release.notified().await;
        let mut fake = shared.lock().expect("lock");
        for write in writes {
            fake.apply(write);
        }
        fake.late_applied += 1;
    });
    let _ = late.await;
    ok(written, Vec::new())
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
        token: TOKEN.to_owned(),
        ..Fake::default()
    }));
    let app = Router::new()
        .route(
            "/client/v4/accounts/{account}/storage/kv/namespaces/{namespace}/values/{name}",
            put(put_value).get(get_value),
        )
        .route(
            "/client/v4/accounts/{account}/storage/kv/namespaces/{namespace}/bulk/get",
            post(bulk_get),
        )
        .route(
            "/client/v4/accounts/{account}/storage/kv/namespaces/{namespace}/bulk",
            put(put_bulk),
        )
        .layer(DefaultBodyLimit::max(BULK_MAX_BYTES + 1024 * 1024))
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

    let publisher = &all_published(&app, Duration::from_secs(20)).await;
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

/// Clerk's delete revokes the key, and KV learns it as it learns a revocation: the edge then
/// answers `REVOKED` for the deleted key's secret.
#[tokio::test]
async fn a_deleted_key_reaches_kv_revoked() {
    let (base, fake) = start_fake(Vec::new()).await;
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .start()
        .await;
    let (id, secret) = app.create_key("acme-corp", &["read:orders"]).await;
    let r = app.delete(&format!("/api_keys/{id}"), Value::Null).await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);
    all_published(&app, Duration::from_secs(20)).await;

    let fake = fake.lock().expect("lock");
    let name = kv_entry_name(&ApiKey::parse(&secret).expect("issued key").hash());
    let records: Vec<KeyRecord> = fake
        .writes
        .iter()
        .filter(|w| w.name == name)
        .map(|w| KeyRecord::from_json(w.body.as_bytes()).expect("a record"))
        .collect();
    let last = records.last().expect("the key's entry was written");
    assert!(last.revoked, "{records:?}");
    assert_eq!(last.revision, 2, "created, then deleted: {records:?}");
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

    // While refused, the admin status names Cloudflare's error; /healthz says "refused".
    let error = eventually(Duration::from_secs(10), || async {
        let health = app.get("/v1/status").await;
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
    let open = open_publisher(&app).await;
    assert_eq!(open["state"], "refused", "{open}");
    assert!(open.get("last_error").is_none(), "{open}");
    all_published(&app, Duration::from_secs(20)).await;
    assert_eq!(fake.lock().expect("lock").writes.len(), 1);
}

/// `/healthz`'s publisher section, asked without a token as anyone may.
async fn open_publisher(app: &TestApp) -> Value {
    let health = TestApp::send(app.request(reqwest::Method::GET, "/healthz")).await;
    assert_eq!(health.status, reqwest::StatusCode::OK, "{:?}", health.body);
    health.body["kv_publisher"].clone()
}

/// The publisher section of the admin `GET /v1/status`: read afresh, where `/healthz` may
/// answer figures up to a second old.
async fn publisher(app: &TestApp) -> Value {
    let status = app.get("/v1/status").await;
    assert_eq!(status.status, reqwest::StatusCode::OK, "{:?}", status.body);
    status.body["kv_publisher"].clone()
}

/// Waits until every change is in KV by origin's account, read afresh (`GET /v1/status`:
/// `/healthz`, which `TestApp::wait_published` reads, may answer figures up to a second old,
/// from before the last change); returns the publisher section.
async fn all_published(app: &TestApp, limit: Duration) -> Value {
    eventually(limit, || async {
        let p = publisher(app).await;
        if p["pending"] == 0 {
            Ok(p)
        } else {
            Err(format!("outbox not drained: {p}"))
        }
    })
    .await
}

/// Waits until origin reports the publisher in `state`, with changes pending.
async fn outage_reported(app: &TestApp, state: &str) -> Value {
    eventually(Duration::from_secs(15), || async {
        let p = publisher(app).await;
        if p["state"] == state && p["pending"].as_u64() > Some(0) {
            Ok(p)
        } else {
            Err(format!("waiting for {state:?}: {p}"))
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
    all_published(&app, Duration::from_secs(20)).await;
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
    let first = outage_reported(&app, "unreachable").await;
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
    outage_reported(&app, "timeout").await;

    // 3. Rate limited, then 4. server errors, each for a while, with revocations meanwhile.
    let phases = [
        (
            StatusCode::TOO_MANY_REQUESTS,
            json!([{ "code": 10429, "message": "Too many requests" }]),
            "rate_limited",
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!([{ "code": 10001, "message": "Internal error" }]),
            "http_error",
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
    let failures = all_published(&app, Duration::from_secs(30)).await["failures"]
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

/// What the fake KV holds for `secret`'s key: its record, if any.
fn kv_record(fake: &Shared, secret: &str) -> Option<KeyRecord> {
    let name = kv_entry_name(&ApiKey::parse(secret).expect("issued key").hash());
    let fake = fake.lock().expect("lock");
    fake.values
        .get(&name)
        .map(|body| KeyRecord::from_json(body.as_bytes()).expect("a record"))
}

#[tokio::test]
async fn a_timed_out_write_applied_late_cannot_undo_a_revocation() {
    let (base, fake) = start_fake(Vec::new()).await;
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .env("KV_REQUEST_TIMEOUT_MS", "300")
        .env("KV_VERIFY_DELAY_MS", "2000")
        .env("KV_RECONCILE_INTERVAL_S", "0")
        .start()
        .await;
    // The key's first write (revision 1, live) reaches KV but gets no answer: origin times out.
    fake.lock().expect("lock").hold_next_write = true;
    let (id, secret) = app.create_key("acme-corp", &["read:orders"]).await;
    eventually(Duration::from_secs(10), || async {
        if fake.lock().expect("lock").held.is_some() {
            Ok(())
        } else {
            Err("the first write has not arrived".to_owned())
        }
    })
    .await;
    // Revoked meanwhile; the retry writes the revoked state (revision 2) and KV accepts it,
    // and then the held write (revision 1) is applied, late, over it.
    let r = app
        .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);
    let current = app.get(&format!("/v1/api_keys/{id}")).await.body;
    let revision = 2;
    assert_eq!(current["revoked"], true);
    eventually(Duration::from_secs(10), || async {
        if fake.lock().expect("lock").late_applied == 1 {
            Ok(())
        } else {
            Err("the held write has not been applied".to_owned())
        }
    })
    .await;
    let landed = std::time::Instant::now();
    let stale = kv_record(&fake, &secret).expect("a value");
    assert_eq!(
        (stale.revision, stale.revoked),
        (1, false),
        "the late write landed over the revocation"
    );
    // The write whose outcome was unknown was not taken as done: its key is read back.
    let p = open_publisher(&app).await;
    assert!(p["verifications_pending"].as_u64() >= Some(1), "{p}");

    // Read back after KV_VERIFY_DELAY_MS, found behind, written again: KV ends revoked.
    let fixed = eventually(Duration::from_secs(15), || async {
        let record = kv_record(&fake, &secret).expect("a value");
        let p = open_publisher(&app).await;
        if record.revision == revision
            && record.revoked
            && p["verifications_pending"] == 0
            && p["pending"] == 0
        {
            Ok(p)
        } else {
            Err(format!(
                "KV holds revision {} (revoked: {}), origin {revision} (revoked); publisher {p}",
                record.revision, record.revoked
            ))
        }
    })
    .await;
    assert!(fixed["rewrites"].as_u64() >= Some(1), "{fixed}");
    assert!(fixed["verified"].as_u64() >= Some(1), "{fixed}");
    let reads = fake.lock().expect("lock").reads;
    common::edge::report_measurement(&format!(
        "KV late write: a timed-out write applied after the revocation's retry was found by the \
         read-back (KV_VERIFY_DELAY_MS=2000), overwritten and read back again, all within {} ms of landing; {reads} reads, \
         publisher {fixed}",
        landed.elapsed().as_millis()
    ));
}

#[tokio::test]
async fn reconciliation_finds_and_rewrites_a_value_kv_lost_or_holds_stale() {
    let (base, fake) = start_fake(Vec::new()).await;
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .env("KV_RECONCILE_INTERVAL_S", "1")
        // Reconciliation reads only while half the budget's burst is spare, which a new
        // budget has 17 s after its first request: unlimited, it reads at once.
        .env("KV_API_BUDGET", "unlimited")
        .start()
        .await;
    let (lost_id, lost) = app.create_key("acme-corp", &["read:orders"]).await;
    let (stale_id, stale) = app.create_key("acme-corp", &["read:orders"]).await;
    let (_, untouched) = app.create_key("acme-corp", &["read:orders"]).await;
    let old = {
        all_published(&app, Duration::from_secs(10)).await;
        let name = kv_entry_name(&ApiKey::parse(&stale).expect("key").hash());
        fake.lock().expect("lock").values[&name].clone()
    };
    let r = app
        .post(&format!("/v1/api_keys/{stale_id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);
    all_published(&app, Duration::from_secs(10)).await;
    // Behind origin's back: one value disappears, another goes back to its old state.
    {
        let mut fake = fake.lock().expect("lock");
        fake.values
            .remove(&kv_entry_name(&ApiKey::parse(&lost).expect("key").hash()));
        fake.values.insert(
            kv_entry_name(&ApiKey::parse(&stale).expect("key").hash()),
            old,
        );
    }
    let p = eventually(Duration::from_secs(15), || async {
        let p = publisher(&app).await;
        let lost_now = kv_record(&fake, &lost);
        let stale_now = kv_record(&fake, &stale);
        match (&lost_now, &stale_now) {
            (Some(l), Some(s)) if l.revision == 1 && s.revoked && s.revision == 2 => Ok(p),
            _ => Err(format!("KV: {lost_now:?} / {stale_now:?}; publisher {p}")),
        }
    })
    .await;
    assert_eq!(kv_record(&fake, &untouched).expect("kept").revision, 1);
    assert!(p["rewrites"].as_u64() >= Some(2), "{p}");
    assert!(p["reconciled"].as_u64() >= Some(3), "{p}");
    let _ = lost_id;
}

#[tokio::test]
async fn healthz_shows_states_not_error_text_which_admins_see() {
    // Cloudflare's answer names an internal host and port: a detail for admins, not for all.
    let detail = "storage backend kv-store-7.internal:7000 unavailable";
    let (base, fake) = start_fake(Vec::new()).await;
    fake.lock().expect("lock").outage = Some((
        StatusCode::INTERNAL_SERVER_ERROR,
        json!([{ "code": 10001, "message": detail }]),
    ));
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .start()
        .await;
    app.create_key("acme-corp", &["read:orders"]).await;
    let p = eventually(Duration::from_secs(10), || async {
        let p = open_publisher(&app).await;
        if p["failures"].as_u64() >= Some(2) {
            Ok(p)
        } else {
            Err(format!("no failure yet: {p}"))
        }
    })
    .await;
    let open = TestApp::send(app.request(reqwest::Method::GET, "/healthz")).await;
    let text = open.body.to_string();
    assert!(
        !text.contains("kv-store-7") && !text.contains("7000") && !text.contains(&base),
        "/healthz shows error text: {text}"
    );
    assert_eq!(p["state"], "http_error", "{p}");
    // Admins see it in full; nobody else gets in.
    let status = app.get("/v1/status").await;
    assert_eq!(status.status, reqwest::StatusCode::OK, "{:?}", status.body);
    let last = status.body["kv_publisher"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(last.contains(detail), "{}", status.body);
    let anonymous = TestApp::send(app.request(reqwest::Method::GET, "/v1/status")).await;
    assert_eq!(anonymous.status, reqwest::StatusCode::UNAUTHORIZED);
    // And the log has it, for operators.
    assert!(app.logs().contains("kv-store-7.internal:7000"));
}

/// What the fake saw of the API limit: (requests by kind, total, peak in one window, 429s).
fn meter_summary(fake: &Shared) -> (String, usize, usize, usize) {
    let fake = fake.lock().expect("lock");
    let mut kinds: Vec<_> = fake.meter.requests.iter().collect();
    kinds.sort();
    (
        format!("{kinds:?}"),
        fake.meter.total(),
        fake.meter.peak,
        fake.meter.limited,
    )
}

#[tokio::test]
async fn a_burst_of_10000_creates_reaches_kv_in_bulk_within_the_api_limit() {
    const KEYS: usize = 10_000;
    const CLIENTS: usize = 32;
    let (base, fake) = start_fake(Vec::new()).await;
    let app = Arc::new(
        TestApp::builder()
            .env("KV_API_BASE", &base)
            .env("KV_NAMESPACE_ID", NAMESPACE)
            .env("KV_API_TOKEN", TOKEN)
            .env("KV_RETRY_MAX_MS", "200")
            .env("RUST_LOG", "info")
            .start()
            .await,
    );
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let app = app.clone();
        clients.spawn(async move {
            let mut keys = Vec::new();
            for i in (c..KEYS).step_by(CLIENTS) {
                keys.push(
                    app.create_key(&format!("partner-{i}"), &["read:orders"])
                        .await,
                );
            }
            keys
        });
    }
    let mut keys = Vec::with_capacity(KEYS);
    while let Some(joined) = clients.join_next().await {
        keys.extend(joined.expect("client"));
    }
    let created = started.elapsed();
    let p = &all_published(&app, Duration::from_secs(120)).await;
    let published = started.elapsed();
    assert_eq!(keys.len(), KEYS);
    {
        let fake = fake.lock().expect("lock");
        for (id, secret) in &keys {
            let name = kv_entry_name(&ApiKey::parse(secret).expect("issued key").hash());
            let record = KeyRecord::from_json(fake.values.get(&name).expect("in KV").as_bytes())
                .expect("a record");
            assert_eq!((record.id.as_str(), record.revision), (id.as_str(), 1));
        }
        assert!(
            fake.writes
                .iter()
                .all(|w| w.authorization == format!("Bearer {TOKEN}")),
            "every write carries the token"
        );
    }
    let (kinds, total, peak, limited) = meter_summary(&fake);
    assert_eq!(limited, 0, "no 429: {kinds}");
    assert!(peak <= 1000, "{peak} requests in five minutes: {kinds}");
    assert_eq!(
        fake.lock().expect("lock").meter.requests.get("put"),
        None,
        "bulk writes only: {kinds}"
    );
    let budget = &p["api_budget"];
    assert_eq!(budget["limit"], 1000, "{p}");
    assert_eq!(budget["rate_limited_total"], 0, "{p}");
    assert_eq!(budget["throttled"], false, "{p}");
    let text = app
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.contains("latchkey_kv_api_budget_limit 1000"), "{text}");
    common::edge::report_measurement(&format!(
        "KV burst: {KEYS} keys created by {CLIENTS} concurrent clients in {:.1} s, all in KV with revision 1 \
         {:.1} s after the first create; {total} KV API requests ({kinds}), at most {peak} in five minutes \
         (Cloudflare's limit 1200, budget 1000), 0 answered 429",
        created.as_secs_f64(),
        published.as_secs_f64()
    ));
}

/// Adds `n` keys straight into the database of a stopped origin (Python's sqlite3), as a
/// large deployment's would be; returns each key's `(id, secret hash hex)`.
fn seed_keys(app: &TestApp, n: usize) -> Vec<(String, String)> {
    let script = r#"
import hashlib, sqlite3, sys
db, n = sys.argv[1], int(sys.argv[2])
alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
def key_id(i):
    s = ""
    for _ in range(20):
        s = alphabet[i % 62] + s
        i //= 62
    return "key_" + s
c = sqlite3.connect(db)
rows = []
for i in range(n):
    kid = key_id(i)
    h = hashlib.sha256(kid.encode()).digest()
    rows.append((kid, h, "sk_live_...seed", "seeded %d" % i, "partner-%d" % (i % 1000), '["read:orders"]', 1760000000000 + i, 1760000000000 + i))
    sys.stdout.write("%s %s\n" % (kid, h.hex()))
c.executemany("INSERT INTO api_keys (id, secret_hash, hint, name, subject, scopes, created_at, updated_at, revision) VALUES (?,?,?,?,?,?,?,?,1)", rows)
c.commit()
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(app.db_path())
        .arg(n.to_string())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let (id, hash) = line.split_once(' ').expect("id and hash");
            (id.to_owned(), hash.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn sync_full_of_100000_keys_stays_within_the_api_limit_and_loses_nothing() {
    const KEYS: usize = 100_000;
    let (base, fake) = start_fake(Vec::new()).await;
    let mut app = TestApp::start().await;
    app.stop().await;
    let seeded = Instant::now();
    let keys = seed_keys(&app, KEYS);
    let seeding = seeded.elapsed();
    let env = [
        ("KV_API_BASE", base.clone()),
        ("KV_NAMESPACE_ID", NAMESPACE.to_owned()),
        ("KV_API_TOKEN", TOKEN.to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    let app = Arc::new(app);
    let runner = app.clone();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        runner.run_command_with(&["sync", "--full"], &env)
    })
    .await
    .expect("sync ran");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("synced {KEYS} keys")), "{stdout}");
    {
        let fake = fake.lock().expect("lock");
        assert_eq!(fake.values.len(), KEYS);
        for (id, hash) in &keys {
            let value = fake.values.get(&format!("k1:{hash}")).expect("in KV");
            let record = KeyRecord::from_json(value.as_bytes()).expect("a record");
            assert_eq!((record.id.as_str(), record.revision), (id.as_str(), 1));
        }
    }
    let (kinds, total, peak, limited) = meter_summary(&fake);
    assert_eq!(limited, 0, "no 429: {kinds}");
    assert!(peak <= 1000, "{peak} requests in five minutes: {kinds}");
    assert!(total <= 100, "{total} requests for {KEYS} keys: {kinds}");
    common::edge::report_measurement(&format!(
        "origin sync --full of {KEYS} keys (seeded in {:.1} s): all in KV in {:.1} s with {total} KV API \
         requests ({kinds}), at most {peak} in five minutes, 0 answered 429; {}",
        seeding.as_secs_f64(),
        took.as_secs_f64(),
        stdout.trim()
    ));
}

#[tokio::test]
async fn a_429_pauses_every_request_until_retry_after_and_nothing_is_lost() {
    const KEYS: usize = 150;
    let (base, fake) = start_fake(Vec::new()).await;
    // A scaled-down Cloudflare: 1 request per 3 s, then 429 (Retry-After) for 3 s. Origin's
    // budget paces its requests 0.3 s apart from the first (it starts empty), so the limit is
    // passed as soon as two requests go: the first bulk write reports two of its keys as not
    // written, and their retry is the second.
    fake.lock().expect("lock").meter.limit = Limit {
        requests: 1,
        window: Duration::from_secs(3),
        penalty: Duration::from_secs(3),
    };
    fake.lock().expect("lock").unsuccessful_once = 2;
    let app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .env("KV_RECONCILE_INTERVAL_S", "0")
        .start()
        .await;
    let mut keys = Vec::new();
    let mut throttled_seen = None;
    for i in 0..KEYS {
        keys.push(
            app.create_key(&format!("partner-{i}"), &["read:orders"])
                .await,
        );
        if throttled_seen.is_none() {
            let p = open_publisher(&app).await;
            if p["api_budget"]["throttled"] == true {
                throttled_seen = Some(p);
            }
        }
    }
    // The pause shows in the open /healthz while it lasts (three seconds; /healthz's figures
    // may be one second old).
    let seen = match throttled_seen {
        Some(seen) => seen,
        None => {
            eventually(Duration::from_secs(10), || async {
                let p = open_publisher(&app).await;
                if p["api_budget"]["throttled"] == true {
                    Ok(p)
                } else {
                    Err(format!("no pause shown: {p}"))
                }
            })
            .await
        }
    };
    let p = &all_published(&app, Duration::from_secs(60)).await;
    for (id, secret) in &keys {
        let record = kv_record(&fake, secret).expect("in KV");
        assert_eq!((record.id.as_str(), record.revision), (id.as_str(), 1));
    }
    let (kinds, total, peak, limited) = {
        let (kinds, total, peak, limited) = meter_summary(&fake);
        (kinds, total, peak, limited)
    };
    let penalties = fake.lock().expect("lock").meter.penalties;
    assert!(penalties >= 1, "the scaled-down limit was reached: {kinds}");
    // The two keys a bulk write reported unsuccessful were really reported (and, as every key
    // is in KV, written again).
    assert_eq!(
        fake.lock().expect("lock").unsuccessful_once,
        0,
        "a bulk write reported unsuccessful_keys: {kinds}"
    );
    assert!(
        app.logs()
            .contains("some keys were not written (unsuccessful_keys)"),
        "origin saw the unsuccessful keys"
    );
    assert_eq!(
        limited, penalties,
        "after each 429, origin sent nothing until Retry-After had passed: {kinds}"
    );
    let budget = &p["api_budget"];
    assert_eq!(
        budget["rate_limited_total"].as_u64(),
        Some(u64::try_from(limited).expect("count")),
        "{p}"
    );
    assert!(
        seen["api_budget"]["retry_after_s"].as_u64() >= Some(1),
        "{seen}"
    );
    assert!(
        app.logs().contains("rate limit hit (429)"),
        "the pause is logged"
    );
    common::edge::report_measurement(&format!(
        "KV 429: fake limit 1 request / 3 s; {KEYS} keys created one by one all reached KV; {penalties} \
         penalty (429, Retry-After) met by exactly {limited} request(s), then nothing until it passed; \
         {total} requests ({kinds}), peak {peak} per window; 2 unsuccessful_keys written again"
    ));
}

/// The change ledger being down (nothing listens at `LEDGER_URL`) never holds KV back: KV
/// takes every change while the outbox keeps each one for the ledger, across a restart.
#[tokio::test]
async fn kv_publishes_while_the_ledger_is_down_and_the_ledger_loses_nothing() {
    let (base, fake) = start_fake(Vec::new()).await;
    // Port 1: nothing listens there, and no other test can take it meanwhile (a port found
    // free once can be handed to another test's server, which would answer).
    let ledger_url = "http://127.0.0.1:1/v1/ledger/changes".to_owned();
    let mut app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("LEDGER_URL", &ledger_url)
        .env(
            "LEDGER_SIGNING_SECRET",
            "ledger-signing-secret-for-tests-llllllll",
        )
        .start()
        .await;
    let (id, secret) = app.create_key("acme-corp", &["read:orders"]).await;
    app.create_key("globex", &["read:orders"]).await;
    let r = app
        .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);

    for run in 0..2 {
        let health = app.wait_kv_published(Duration::from_secs(20)).await;
        assert_eq!(
            health.body["ledger"]["pending"], 3,
            "run {run}: {}",
            health.body
        );
        // KV may be done before the ledger sink's first try since the start (its state is
        // `ok` until a try fails): wait for that try.
        let health = common::eventually(Duration::from_secs(20), || async {
            let health = app.get("/healthz").await;
            if health.body["ledger"]["state"] == "unreachable" {
                Ok(health)
            } else {
                Err(format!("run {run}: {}", health.body["ledger"]))
            }
        })
        .await;
        let ledger = &health.body["ledger"];
        assert_eq!(ledger["pending"], 3, "run {run}: {ledger}");
        assert_eq!(
            health.body["kv_publisher"]["state"], "ok",
            "{}",
            health.body
        );
        app.restart().await;
    }
    let name = kv_entry_name(&ApiKey::parse(&secret).expect("issued key").hash());
    let fake = fake.lock().expect("lock");
    let value = fake.values.get(&name).expect("the key's record is in KV");
    let record = KeyRecord::from_json(value.as_bytes()).expect("a record");
    assert!(record.revoked, "KV has the revocation");
}

/// `origin sync --full` over an app's database, running in the background (so the fake, on
/// the test's own runtime, keeps answering); its stdout and stderr go to files in the app's
/// folder. Killed when dropped.
struct SyncRun {
    child: std::process::Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl SyncRun {
    /// Starts `origin sync --full` with `env` (the KV settings), its output named `name`.
    fn start(app: &TestApp, name: &str, env: &[(&str, &str)]) -> Self {
        let stdout = app.dir().join(format!("{name}.stdout"));
        let stderr = app.dir().join(format!("{name}.stderr"));
        let child = std::process::Command::new(common::origin_binary())
            .args(["sync", "--full"])
            .env_clear()
            .env("DATABASE_URL", app.database_url())
            .env("AUDIT_CHAIN_KEY", common::AUDIT_CHAIN_KEY)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn origin sync --full");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether it still runs.
    fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Waits until it has exited, and says how.
    async fn finished(&mut self, limit: Duration) -> std::process::ExitStatus {
        eventually(limit, || {
            let status = self.child.try_wait().expect("wait");
            let stderr = self.stderr();
            async move { status.ok_or_else(|| format!("sync still runs: {stderr}")) }
        })
        .await
    }
}

impl Drop for SyncRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the fake's log holds more than `seen` requests; the time, by the fake's clock,
/// of the first one after them.
async fn request_after(fake: &Shared, seen: usize) -> Instant {
    eventually(Duration::from_secs(20), || async {
        let fake = fake.lock().expect("lock");
        fake.meter.log.get(seen).map(|r| r.at).ok_or_else(|| {
            format!(
                "the fake has seen {} requests, waiting for more than {seen}",
                fake.meter.log.len()
            )
        })
    })
    .await
}

/// Waits until `span` has passed since `since`, an instant of the fake's clock.
async fn fake_clock_passes(since: Instant, span: Duration) {
    eventually(span + Duration::from_secs(5), || async {
        if since.elapsed() >= span {
            Ok(())
        } else {
            Err(format!("{:?} of {span:?} passed", since.elapsed()))
        }
    })
    .await;
}

/// Checks that `times` (one token's requests, in order, by the fake's clock) never held more
/// than one budget of `limit` requests per five minutes admits: `limit` in any five minutes,
/// and in any shorter span its burst (a tenth) plus the span at its pace (`(limit - burst) /
/// 300 s`), give or take one request and half a second of delivery. Two budgets spending side
/// by side, or one after another each with a fresh burst, pass the second bound in seconds.
fn assert_within_one_budget(times: &[Instant], limit: u32, what: &str) {
    let burst = (f64::from(limit) / 10.0).floor();
    let pace = (f64::from(limit) - burst) / 300.0;
    // The span over which the most requests passed what one budget admits: (excess, count,
    // from, to, allowed).
    let mut worst: Option<(f64, usize, usize, usize, f64)> = None;
    for (i, from) in times.iter().enumerate() {
        for (j, to) in times.iter().enumerate().skip(i) {
            let span = to.duration_since(*from);
            if span >= Duration::from_secs(300) {
                break;
            }
            let n = j - i + 1;
            assert!(
                n <= usize::try_from(limit).expect("fits"),
                "{what}: {n} requests in five minutes, over the budget of {limit}"
            );
            let allowed = burst + pace * (span.as_secs_f64() + 0.5) + 1.0;
            let excess = usize_f64(n) - allowed;
            if excess > 0.0 && worst.is_none_or(|w| excess > w.0) {
                worst = Some((excess, n, i, j, allowed));
            }
        }
    }
    let at = |k: usize| times[k].duration_since(times[0]).as_secs_f64();
    if let Some((_, n, i, j, allowed)) = worst {
        panic!(
            "{what}: {n} requests in {:.2} s (from {:.2} s to {:.2} s of {} requests over {:.1} s), \
             where one budget of {limit} per five minutes admits {allowed:.1}",
            at(j) - at(i),
            at(i),
            at(j),
            times.len(),
            at(times.len() - 1),
        );
    }
}

#[allow(
    clippy::cast_precision_loss,
    reason = "request counts are far below 2^52"
)]
fn usize_f64(n: usize) -> f64 {
    n as f64
}

/// The fake refuses as Cloudflare does: every endpoint origin uses, reads as well as writes,
/// answers 403 with Cloudflare's `Authentication error` (code 10000) to a request without the
/// token, with another token, with the token not sent as a bearer token, or for an account the
/// token does not open; nothing such a request asked for is written or read. With the token,
/// for its account, each is served.
#[tokio::test]
async fn the_fake_refuses_a_wrong_or_missing_token_and_another_account_on_reads_and_writes() {
    let (base, fake) = start_fake(Vec::new()).await;
    let other_account = base.replace(ACCOUNT, OTHER_ACCOUNT);
    let http = reqwest::Client::new();
    let calls = |base: &str| {
        let ns = format!("{base}/storage/kv/namespaces/{NAMESPACE}");
        [
            (
                "put",
                http.put(format!("{ns}/values/k1%3Aaa"))
                    .body("written alone"),
            ),
            (
                "bulk_put",
                http.put(format!("{ns}/bulk"))
                    .json(&json!([{ "key": "k1:bb", "value": "written in bulk" }])),
            ),
            ("get", http.get(format!("{ns}/values/k1%3Aaa"))),
            (
                "bulk_get",
                http.post(format!("{ns}/bulk/get"))
                    .json(&json!({ "keys": ["k1:aa", "k1:bb"], "type": "text" })),
            ),
        ]
    };
    let refused = json!({
        "success": false,
        "errors": [{ "code": 10000, "message": "Authentication error" }],
        "messages": [],
        "result": null,
    });
    let cases = [
        ("no token", &base, None),
        (
            "another token",
            &base,
            Some(format!("Bearer {ROLLED_TOKEN}")),
        ),
        (
            "the token, not as a bearer token",
            &base,
            Some(TOKEN.to_owned()),
        ),
        ("an empty bearer token", &base, Some("Bearer ".to_owned())),
        (
            "the token, for another account",
            &other_account,
            Some(format!("Bearer {TOKEN}")),
        ),
    ];
    for (what, base, authorization) in &cases {
        for (kind, request) in calls(base) {
            let request = match authorization {
                Some(value) => request.header("authorization", value),
                None => request,
            };
            let response = request.send().await.expect("request");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(
                (status, &body),
                (reqwest::StatusCode::FORBIDDEN, &refused),
                "{what}: {kind}"
            );
        }
    }
    {
        let fake = fake.lock().expect("lock");
        assert!(
            fake.values.is_empty() && fake.writes.is_empty() && fake.reads == 0,
            "nothing was written or read"
        );
        for kind in ["put", "bulk_put", "get", "bulk_get"] {
            assert_eq!(
                fake.unauthenticated.get(kind),
                Some(&cases.len()),
                "{kind}: {:?}",
                fake.unauthenticated
            );
        }
    }
    // The token, for its account: served.
    let mut answers = Vec::new();
    for (kind, request) in calls(&base) {
        let response = request.bearer_auth(TOKEN).send().await.expect("request");
        answers.push((
            kind,
            response.status(),
            response.text().await.expect("body"),
        ));
    }
    assert!(
        answers
            .iter()
            .all(|(_, status, _)| *status == reqwest::StatusCode::OK),
        "{answers:?}"
    );
    assert_eq!(answers[2].2, "written alone", "{answers:?}");
    let values: Value = serde_json::from_str(&answers[3].2).expect("JSON");
    assert_eq!(
        values["result"]["values"],
        json!({ "k1:aa": "written alone", "k1:bb": "written in bulk" })
    );
}

/// Cloudflare rolls origin's token (as it would answer a wrong token from the start, or the
/// URL of an account the token does not open): every request, reads too, is refused 403.
/// Origin reports it for reads alone (the read-back of a write whose outcome was unknown, and
/// reconciliation's reads, with no write waiting) and for writes: `refused` in `/healthz`,
/// Cloudflare's error in the admin status and the log. `origin sync --full` with that token,
/// or for another account, says so and claims nothing. Nothing is lost: once the right token is
/// used, `sync --full` publishes every change and reads back the key that was waiting for it,
/// and origin finds KV current.
#[tokio::test]
async fn a_refused_token_is_reported_for_reads_and_writes_and_nothing_is_lost() {
    // The first write is answered 500 (its outcome unknown: its key is to be read back); its
    // retry lands, and right after it the token is rolled.
    let internal = json!([{ "code": 10001, "message": "Internal error" }]);
    let (base, fake) = start_fake(vec![(StatusCode::INTERNAL_SERVER_ERROR, internal)]).await;
    fake.lock().expect("lock").roll_token_after_write = Some(ROLLED_TOKEN.to_owned());
    let mut app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .env("KV_VERIFY_DELAY_MS", "2000")
        .env("KV_RECONCILE_INTERVAL_S", "1")
        // Reconciliation reads only while half the budget's burst is spare, which a new
        // budget has 17 s after its first request: unlimited, it reads at once.
        .env("KV_API_BUDGET", "unlimited")
        .start()
        .await;
    let (first_id, first) = app.create_key("acme-corp", &["read:orders"]).await;
    eventually(Duration::from_secs(10), || async {
        let token = fake.lock().expect("lock").token.clone();
        match kv_record(&fake, &first) {
            Some(record) if token == ROLLED_TOKEN => Ok(record),
            other => Err(format!("KV: {other:?}; the fake accepts {token}")),
        }
    })
    .await;

    // Reads: the read-back (`GET …/values/{name}`) and reconciliation (`POST …/bulk/get`) are
    // refused, while no write waits.
    let p = eventually(Duration::from_secs(15), || async {
        let refused = fake.lock().expect("lock").unauthenticated.clone();
        let p = publisher(&app).await;
        if refused.get("get") >= Some(&1)
            && refused.get("bulk_get") >= Some(&1)
            && p["state"] == "refused"
        {
            Ok(p)
        } else {
            Err(format!("refused so far: {refused:?}; publisher {p}"))
        }
    })
    .await;
    assert_eq!(p["pending"], 0, "no write waits: {p}");
    assert_eq!(p["verifications_pending"], 1, "the read-back waits: {p}");
    let last_error = p["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("403") && last_error.contains("Authentication error (10000)"),
        "{p}"
    );
    let logs = app.logs();
    for what in ["KV read-back failed", "reconciliation cannot read KV"] {
        assert!(
            logs.lines()
                .any(|line| line.contains(what)
                    && line.contains("403: Authentication error (10000)")),
            "the log says {what:?} with Cloudflare's error"
        );
    }
    let open = eventually(Duration::from_secs(5), || async {
        let open = open_publisher(&app).await;
        if open["state"] == "refused" {
            Ok(open)
        } else {
            Err(format!("/healthz: {open}"))
        }
    })
    .await;
    assert!(open.get("last_error").is_none(), "{open}");

    // Writes: the revocation and a new key wait, refused.
    let r = app
        .post(&format!("/v1/api_keys/{first_id}/revoke"), json!({}))
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);
    let (second_id, second) = app.create_key("globex", &["read:orders"]).await;
    eventually(Duration::from_secs(10), || async {
        let refused = fake.lock().expect("lock").unauthenticated.clone();
        let p = publisher(&app).await;
        if refused.get("bulk_put") >= Some(&1) && p["pending"] == 2 && p["state"] == "refused" {
            Ok(())
        } else {
            Err(format!("refused so far: {refused:?}; publisher {p}"))
        }
    })
    .await;
    let stale = kv_record(&fake, &first).expect("in KV");
    assert!(!stale.revoked, "the revocation did not reach KV");
    assert!(kv_record(&fake, &second).is_none());
    assert!(!app.logs().contains(TOKEN), "the API token is never logged");
    app.stop().await;

    // `origin sync --full` with the rolled-over token, or for another account: refused, it
    // says so and keeps trying; it never claims a sync.
    let other_account = base.replace(ACCOUNT, OTHER_ACCOUNT);
    let refused_syncs = [
        ("sync-rolled-token", base.as_str(), TOKEN),
        ("sync-other-account", other_account.as_str(), ROLLED_TOKEN),
    ];
    for (name, base, token) in refused_syncs {
        let kv = [
            ("KV_API_BASE", base),
            ("KV_NAMESPACE_ID", NAMESPACE),
            ("KV_API_TOKEN", token),
            ("KV_RETRY_MAX_MS", "200"),
        ];
        let mut sync = SyncRun::start(&app, name, &kv);
        let stderr = eventually(Duration::from_secs(15), || async {
            let stderr = sync.stderr();
            if stderr.lines().any(|line| {
                line.contains("KV bulk write failed")
                    && line.contains("403: Authentication error (10000)")
            }) {
                Ok(stderr)
            } else {
                Err(format!("{name}: {stderr}"))
            }
        })
        .await;
        assert!(sync.running(), "{name}: {stderr}");
        assert!(
            !sync.stdout().contains("synced"),
            "{name}: {}",
            sync.stdout()
        );
        assert!(!stderr.contains(token), "{name}: the token is never logged");
    }
    assert!(!kv_record(&fake, &first).expect("in KV").revoked);

    // The right token: everything is published, and the key waiting for its read-back is
    // read back.
    let kv = [
        ("KV_API_BASE", base.as_str()),
        ("KV_NAMESPACE_ID", NAMESPACE),
        ("KV_API_TOKEN", ROLLED_TOKEN),
        ("KV_RETRY_MAX_MS", "200"),
    ];
    let mut sync = SyncRun::start(&app, "sync-right-token", &kv);
    let status = sync.finished(Duration::from_secs(30)).await;
    let stdout = sync.stdout();
    assert!(status.success(), "{stdout}\n{}", sync.stderr());
    assert!(stdout.contains("synced 2 keys"), "{stdout}");
    let revoked = kv_record(&fake, &first).expect("in KV");
    assert_eq!((revoked.revision, revoked.revoked), (2, true));
    assert_eq!(kv_record(&fake, &second).expect("in KV").revision, 1);

    // Origin with the right token: nothing waits, reconciliation reads, all is current.
    app.set_env("KV_API_TOKEN", ROLLED_TOKEN);
    app.start_again().await;
    let p = eventually(Duration::from_secs(15), || async {
        let p = publisher(&app).await;
        if p["state"] == "ok"
            && p["pending"] == 0
            && p["verifications_pending"] == 0
            && p["reconcile_passes"].as_u64() >= Some(1)
        {
            Ok(p)
        } else {
            Err(format!("publisher {p}"))
        }
    })
    .await;
    assert_eq!(p["rewrites"], 0, "KV is current: {p}");
    for (id, secret) in [(&first_id, &first), (&second_id, &second)] {
        let current = app.get(&format!("/v1/api_keys/{id}")).await.body;
        let record = kv_record(&fake, secret).expect("in KV");
        assert_eq!(Some(record.revoked), current["revoked"].as_bool(), "{id}");
    }
}

/// Cloudflare's 429 may come without `Retry-After`. Origin then pauses every request for
/// Cloudflare's whole penalty, five minutes: in the seconds after it, by the fake's clock, the
/// fake gets no request from origin, however many changes wait. A clean stop does not wait the
/// pause out, and nothing is lost: started again once Cloudflare serves again, origin
/// publishes every change.
#[tokio::test]
async fn a_429_without_retry_after_pauses_every_request_and_nothing_is_lost() {
    const WINDOW: Duration = Duration::from_secs(5);
    let (base, fake) = start_fake(Vec::new()).await;
    {
        // A scaled-down Cloudflare whose 429 says nothing of when to come back: 2 requests a
        // minute, then 429 for a minute, without `Retry-After`.
        let mut fake = fake.lock().expect("lock");
        fake.meter.limit = Limit {
            requests: 2,
            window: Duration::from_secs(60),
            penalty: Duration::from_secs(60),
        };
        fake.meter.retry_after = false;
    }
    let mut app = TestApp::builder()
        .env("KV_API_BASE", &base)
        .env("KV_NAMESPACE_ID", NAMESPACE)
        .env("KV_API_TOKEN", TOKEN)
        .env("KV_RETRY_MAX_MS", "200")
        .env("KV_RECONCILE_INTERVAL_S", "0")
        .start()
        .await;
    // Two keys, each in KV before the next; the third's write is refused 429.
    let mut keys = Vec::new();
    for i in 0..2 {
        let (id, secret) = app
            .create_key(&format!("partner-{i}"), &["read:orders"])
            .await;
        eventually(Duration::from_secs(10), || async {
            kv_record(&fake, &secret)
                .map(|_| ())
                .ok_or_else(|| format!("partner-{i} not in KV yet"))
        })
        .await;
        keys.push((id, secret));
    }
    keys.push(app.create_key("partner-2", &["read:orders"]).await);
    let (limited_at, limited_kind) = eventually(Duration::from_secs(10), || async {
        let fake = fake.lock().expect("lock");
        fake.meter
            .log
            .iter()
            .find(|r| r.limited)
            .map(|r| (r.at, r.kind))
            .ok_or_else(|| format!("no 429 yet: {:?}", fake.meter.log))
    })
    .await;
    // More changes wait meanwhile.
    let r = app
        .post(&format!("/v1/api_keys/{}/revoke", keys[0].0), json!({}))
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{:?}", r.body);
    for i in 3..6 {
        keys.push(
            app.create_key(&format!("partner-{i}"), &["read:orders"])
                .await,
        );
    }
    fake_clock_passes(limited_at, WINDOW).await;
    let (after, span) = {
        let fake = fake.lock().expect("lock");
        let after: Vec<Request> = fake
            .meter
            .log
            .iter()
            .filter(|r| r.at > limited_at)
            .cloned()
            .collect();
        (after, limited_at.elapsed())
    };
    assert!(
        after.is_empty(),
        "{} requests in the {span:?} after a 429 without Retry-After: {after:?}",
        after.len()
    );
    let p = publisher(&app).await;
    assert_eq!(p["state"], "rate_limited", "{p}");
    assert_eq!(p["pending"], 5, "{p}");
    let budget = &p["api_budget"];
    assert_eq!(budget["throttled"], true, "{p}");
    assert_eq!(budget["rate_limited_total"], 1, "{p}");
    let left = budget["retry_after_s"].as_u64().unwrap_or_default();
    assert!(
        (300 - WINDOW.as_secs() - 10..=300).contains(&left),
        "five minutes, less what passed: {p}"
    );
    assert!(
        app.logs()
            .lines()
            .any(|line| line.contains("rate limit hit (429)")
                && line.contains("pause_s=300")
                && line.contains("retry_after=\"absent\"")),
        "the pause is logged, and that Retry-After was absent"
    );

    // A clean stop does not wait for the pause (the stop fails the test after 20 s).
    let stopping = Instant::now();
    app.stop().await;
    let stopped_in = stopping.elapsed();
    // Cloudflare serves again; origin, started again, publishes everything.
    {
        let mut fake = fake.lock().expect("lock");
        fake.meter.limit = CLOUDFLARE_LIMIT;
        fake.meter.blocked_until.clear();
    }
    app.start_again().await;
    all_published(&app, Duration::from_secs(20)).await;
    for (n, (id, secret)) in keys.iter().enumerate() {
        let record = kv_record(&fake, secret).expect("in KV");
        let expected = if n == 0 { (2, true) } else { (1, false) };
        assert_eq!((record.revision, record.revoked), expected, "{id}");
    }
    common::edge::report_measurement(&format!(
        "KV 429 without Retry-After (to a {limited_kind}): 0 requests in the {:.1} s after it (by the \
         fake's clock) while 5 changes waited; origin paused for {left} s more, stopped cleanly in {:.1} s; restarted, \
         all {} keys in KV",
        span.as_secs_f64(),
        stopped_in.as_secs_f64(),
        keys.len()
    ));
}

/// `origin sync --full` while origin publishes a backlog through a KV outage: they spend one
/// budget, origin's. The sync queues every key and leaves the publishing to the origin that
/// holds the publisher lock, so every request the fake saw (counted per token, by its own
/// clock) was metered by origin's budget (`KV_API_BUDGET=100`: 10 at once, then 0.3 a second,
/// 100 in five minutes), and the sync sent none.
#[tokio::test]
async fn sync_full_beside_a_publishing_origin_spends_the_origins_budget_only() {
    const BUDGET: u32 = 100;
    const KEYS: usize = 20;
    let internal = json!([{ "code": 10001, "message": "Internal error" }]);
    let (base, fake) = start_fake(Vec::new()).await;
    fake.lock().expect("lock").outage = Some((StatusCode::INTERNAL_SERVER_ERROR, internal));
    let budget = BUDGET.to_string();
    let kv = [
        ("KV_API_BASE", base.as_str()),
        ("KV_NAMESPACE_ID", NAMESPACE),
        ("KV_API_TOKEN", TOKEN),
        ("KV_API_BUDGET", budget.as_str()),
        ("KV_RETRY_MAX_MS", "200"),
        ("KV_VERIFY_DELAY_MS", "500"),
        ("KV_RECONCILE_INTERVAL_S", "0"),
    ];
    let mut builder = TestApp::builder();
    for (name, value) in kv {
        builder = builder.env(name, value);
    }
    let app = builder.start().await;
    let mut keys = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        keys.push(
            app.create_key(&format!("partner-{i}"), &["read:orders"])
                .await,
        );
    }
    // Origin retries its backlog; the sync starts beside it and watches it.
    request_after(&fake, 0).await;
    let mut sync = SyncRun::start(&app, "sync", &kv);
    eventually(Duration::from_secs(15), || async {
        let stderr = sync.stderr();
        if stderr.contains("a running origin holds the publisher lock") {
            Ok(())
        } else {
            Err(stderr)
        }
    })
    .await;
    // Some seconds of the outage with both running, by the fake's clock.
    let seen = fake.lock().expect("lock").meter.log.len();
    let from = request_after(&fake, seen).await;
    fake_clock_passes(from, Duration::from_secs(4)).await;
    fake.lock().expect("lock").outage = None;

    let status = sync.finished(Duration::from_secs(30)).await;
    let stdout = sync.stdout();
    assert!(status.success(), "{stdout}\n{}", sync.stderr());
    assert!(
        stdout.contains(&format!("synced {KEYS} keys to KV namespace {NAMESPACE}"))
            && stdout.contains(&format!(
                "(0 written by this command, {KEYS} by the running origin"
            ))
            && stdout.contains("; 0 KV API requests)"),
        "{stdout}"
    );
    // Published, and the writes whose outcome the outage left unknown read back: nothing more
    // to send.
    let p = eventually(Duration::from_secs(20), || async {
        let p = publisher(&app).await;
        if p["pending"] == 0 && p["verifications_pending"] == 0 {
            Ok(p)
        } else {
            Err(format!("publisher {p}"))
        }
    })
    .await;
    for (id, secret) in &keys {
        assert_eq!(kv_record(&fake, secret).expect("in KV").revision, 1, "{id}");
    }
    let times = fake.lock().expect("lock").meter.times(TOKEN);
    assert_eq!(
        u64::try_from(times.len()).ok(),
        p["api_budget"]["requests_total"].as_u64(),
        "every request the fake saw was metered by origin's budget: {p}"
    );
    assert_within_one_budget(&times, BUDGET, "origin and sync --full");
    let (kinds, total, peak, _) = meter_summary(&fake);
    assert!(peak <= 100, "{peak} requests in five minutes: {kinds}");
    common::edge::report_measurement(&format!(
        "KV budget, sync --full beside origin: {total} requests ({kinds}) in {:.1} s, all metered \
         by origin's budget of {BUDGET} (the sync sent 0); within one budget's pace throughout",
        times
            .last()
            .zip(times.first())
            .map_or(0.0, |(last, first)| last
                .duration_since(*first)
                .as_secs_f64())
    ));
}

/// The publisher lock changes hands: origin stops with a backlog, `origin sync --full` takes
/// the lock and publishes, origin starts again meanwhile and waits for it, then takes over, all
/// through a KV outage that makes each retry as fast as its budget allows. Each process keeps a
/// budget of its own (`KV_API_BUDGET=300`), yet the fake, counting per token by its own clock,
/// sees no more than one budget admits: each budget starts empty when first used. Before, each
/// new holder spent a fresh burst (30 requests) at once over what the one before had spent.
#[tokio::test]
async fn a_sync_full_and_the_origins_before_and_after_it_spend_one_budget() {
    const BUDGET: u32 = 300;
    const KEYS: usize = 10;
    let internal = json!([{ "code": 10001, "message": "Internal error" }]);
    let outage = Some((StatusCode::INTERNAL_SERVER_ERROR, internal));
    let (base, fake) = start_fake(Vec::new()).await;
    fake.lock().expect("lock").outage = outage.clone();
    let budget = BUDGET.to_string();
    let kv = [
        ("KV_API_BASE", base.as_str()),
        ("KV_NAMESPACE_ID", NAMESPACE),
        ("KV_API_TOKEN", TOKEN),
        ("KV_API_BUDGET", budget.as_str()),
        ("KV_RETRY_MAX_MS", "20"),
        ("KV_VERIFY_DELAY_MS", "500"),
        ("KV_RECONCILE_INTERVAL_S", "0"),
    ];
    let mut builder = TestApp::builder();
    for (name, value) in kv {
        builder = builder.env(name, value);
    }
    let mut app = builder.start().await;
    let mut keys = Vec::with_capacity(KEYS + 1);
    for i in 0..KEYS {
        keys.push(
            app.create_key(&format!("partner-{i}"), &["read:orders"])
                .await,
        );
    }
    // Origin retries its backlog, and stops.
    request_after(&fake, 2).await;
    app.stop().await;
    // The sync takes the lock and retries in its turn; origin starts meanwhile and waits.
    let seen = fake.lock().expect("lock").meter.log.len();
    let mut sync = SyncRun::start(&app, "sync", &kv);
    request_after(&fake, seen + 2).await;
    app.start_again().await;
    eventually(Duration::from_secs(10), || async {
        if app
            .logs()
            .contains("another publisher (origin or `origin sync`) holds the lock; waiting")
        {
            Ok(())
        } else {
            Err("origin does not wait for the lock".to_owned())
        }
    })
    .await;
    // KV back: the sync publishes everything, reads back what had an unknown outcome, ends.
    fake.lock().expect("lock").outage = None;
    let status = sync.finished(Duration::from_secs(30)).await;
    let stdout = sync.stdout();
    assert!(status.success(), "{stdout}\n{}", sync.stderr());
    assert!(
        stdout.contains(&format!("synced {KEYS} keys"))
            && stdout.contains(&format!(
                "({KEYS} written by this command, 0 by the running origin"
            )),
        "{stdout}"
    );
    // Origin takes over, with a change to write through another outage.
    fake.lock().expect("lock").outage = outage;
    let seen = fake.lock().expect("lock").meter.log.len();
    keys.push(app.create_key("partner-last", &["read:orders"]).await);
    let from = request_after(&fake, seen).await;
    fake_clock_passes(from, Duration::from_secs(4)).await;
    fake.lock().expect("lock").outage = None;
    all_published(&app, Duration::from_secs(20)).await;
    for (id, secret) in &keys {
        assert_eq!(kv_record(&fake, secret).expect("in KV").revision, 1, "{id}");
    }
    let times = fake.lock().expect("lock").meter.times(TOKEN);
    assert_within_one_budget(&times, BUDGET, "origin, sync --full, origin");
    let (kinds, total, peak, _) = meter_summary(&fake);
    assert!(
        peak <= usize::try_from(BUDGET).expect("fits"),
        "{peak} requests in five minutes: {kinds}"
    );
    common::edge::report_measurement(&format!(
        "KV budget across lock handovers (origin, sync --full, origin): {total} requests ({kinds}) in \
         {:.1} s, within one budget of {BUDGET} throughout",
        times
            .last()
            .zip(times.first())
            .map_or(0.0, |(last, first)| last
                .duration_since(*first)
                .as_secs_f64())
    ));
}

/// One client of the replicas test: creates a key and revokes it, again and again, on one
/// replica, until `until` or until that replica stops answering. Returns what was
/// acknowledged: each created key's id and secret, and whether its revocation was too.
async fn replica_client(base: String, until: Instant, n: usize) -> Vec<(String, String, bool)> {
    let http = reqwest::Client::new();
    let mut acknowledged = Vec::new();
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let Ok(created) = http
            .post(format!("{base}/v1/api_keys"))
            .bearer_auth(common::ADMIN_TOKEN)
            .json(&json!({ "name": format!("c{n}-{i}"), "subject": format!("client-{n}") }))
            .send()
            .await
        else {
            return acknowledged;
        };
        if created.status() != reqwest::StatusCode::CREATED {
            return acknowledged;
        }
        let Ok(body) = created.json::<Value>().await else {
            return acknowledged;
        };
        let id = body["id"].as_str().expect("id").to_owned();
        let secret = body["secret"].as_str().expect("secret").to_owned();
        acknowledged.push((id.clone(), secret, false));
        if i % 2 == 0 {
            let revoked = http
                .post(format!("{base}/v1/api_keys/{id}/revoke"))
                .bearer_auth(common::ADMIN_TOKEN)
                .json(&json!({}))
                .send()
                .await;
            match revoked {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    if let Some(last) = acknowledged.last_mut() {
                        last.2 = true;
                    }
                }
                _ => return acknowledged,
            }
        }
    }
    acknowledged
}

/// Three origins on one PostgreSQL database under concurrent clients, one killed with SIGKILL
/// in each round (whichever holds the publisher's lease, or not): every acknowledged change
/// survives, KV ends with every key's latest state and never saw a key's revision go back
/// (one publisher at a time, in order, across failovers), the audit chain verifies, and
/// delivery resumes on a survivor within a time the test measures and prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgresql_lose_nothing_while_one_is_killed_again_and_again() {
    const ROUNDS: usize = 6;
    let server = std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is unset: the replicas need PostgreSQL (./dev test starts one)");
    let url = common::fresh_postgres_database(&server).await;
    let (base, fake) = start_fake(Vec::new()).await;
    let replica = || {
        TestApp::builder()
            .env("DATABASE_URL", &url)
            .env("KV_API_BASE", &base)
            .env("KV_NAMESPACE_ID", NAMESPACE)
            .env("KV_API_TOKEN", TOKEN)
            .env("KV_RETRY_MAX_MS", "200")
            .start()
    };
    let mut replicas = [replica().await, replica().await, replica().await];
    let mut acknowledged: Vec<(String, String, bool)> = Vec::new();
    let mut resumed = Vec::new();
    for round in 0..ROUNDS {
        let victim = round % replicas.len();
        let until = Instant::now() + Duration::from_millis(1500);
        let clients: Vec<_> = replicas
            .iter()
            .enumerate()
            .flat_map(|(r, app)| {
                (0..2)
                    .map(move |c| tokio::spawn(replica_client(app.base.clone(), until, r * 2 + c)))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        replicas[victim].kill();
        let killed = Instant::now();
        for client in clients {
            acknowledged.extend(client.await.expect("client"));
        }
        // A change on a survivor: how long until KV has it, whoever published before.
        let (_, secret) = replicas[(victim + 1) % replicas.len()]
            .create_key("failover", &[])
            .await;
        eventually(Duration::from_secs(30), || async {
            kv_record(&fake, &secret)
                .map(|_| ())
                .ok_or_else(|| "not in KV yet".to_owned())
        })
        .await;
        resumed.push(killed.elapsed());
        replicas[victim].start_again().await;
    }
    assert!(
        acknowledged.len() > 20,
        "the clients made changes: {}",
        acknowledged.len()
    );
    all_published(&replicas[0], Duration::from_secs(60)).await;

    // Every acknowledged change is in the database, and KV holds every key's latest state.
    for (id, secret, revoked) in &acknowledged {
        let key = replicas[0].get(&format!("/v1/api_keys/{id}")).await;
        assert_eq!(
            key.status,
            reqwest::StatusCode::OK,
            "acknowledged {id}: {}",
            key.body
        );
        if *revoked {
            assert_eq!(key.body["revoked"], true, "acknowledged revocation of {id}");
        }
        let record = kv_record(&fake, secret).expect("in KV");
        assert_eq!(
            record.revoked,
            key.body["revoked"] == true,
            "KV holds {id}'s latest state"
        );
    }
    {
        let fake = fake.lock().expect("lock");
        let mut newest: HashMap<&str, u64> = HashMap::new();
        for write in &fake.writes {
            let revision = record_revision(&write.body);
            let seen = newest.entry(write.name.as_str()).or_default();
            assert!(
                revision >= *seen,
                "{} went back from {seen} to {revision}",
                write.name
            );
            *seen = revision;
        }
    }
    let verified = replicas[0].run_command(&["audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    // `/healthz` says which replica plays which role: each role on one replica at most, and
    // the KV publisher on exactly one.
    let mut players: HashMap<String, usize> = HashMap::new();
    for replica in &replicas {
        let health = replica.get("/healthz").await;
        for role in health.body["roles"].as_array().expect("roles") {
            *players
                .entry(role.as_str().expect("a role's name").to_owned())
                .or_default() += 1;
        }
    }
    assert!(players.values().all(|&n| n == 1), "{players:?}");
    assert_eq!(players.get("publisher"), Some(&1), "{players:?}");
    resumed.sort();
    common::edge::report_measurement(&format!(
        "replicas: 3 origins on PostgreSQL, one SIGKILLed in each of {ROUNDS} rounds under 6 \
         clients: {} acknowledged changes, none lost; a change made right after the kill was in \
         KV within {} ms (median) and {} ms (slowest)",
        acknowledged.len(),
        resumed[resumed.len() / 2].as_millis(),
        resumed.last().expect("rounds").as_millis(),
    ));
}
