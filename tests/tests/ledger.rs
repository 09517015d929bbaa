//! The change ledger end to end: the real origin appending to the real Worker's Durable Object
//! under `wrangler dev`, isolates answering from memory, and KV made stale on purpose.
//!
//! Local KV is immediately consistent, so a location whose KV still serves an old value is made
//! by hand: the test writes the old, valid record back into local KV after origin published the
//! new one. The edge must follow the ledger, not KV.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::time::{Duration, Instant};

use common::edge::{Edge, LEDGER_SECRET, Stack, report_measurement};
use common::{TestApp, eventually};
use latchkey_shared::ledger::{APPEND_PATH, append_message};
use latchkey_shared::sign::{self, header};
use latchkey_shared::{ApiKey, UnixMillis, kv_entry_name};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(15);

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

fn kv_reads(headers: &HeaderMap) -> u32 {
    header_text(headers, "x-latchkey-debug-kv-reads")
        .parse()
        .expect("a number")
}

fn memory(headers: &HeaderMap) -> &str {
    header_text(headers, "x-latchkey-debug-memory")
}

fn ledger_fetches(headers: &HeaderMap) -> u64 {
    header_text(headers, "x-latchkey-debug-ledger-fetches")
        .parse()
        .expect("a number")
}

/// The KV entry name of a key's secret.
fn entry_name(secret: &str) -> String {
    kv_entry_name(&ApiKey::parse(secret).expect("a key").hash())
}

/// Nearest-rank percentiles of `ms` (sorted here): p50, p99, max.
fn percentiles(ms: &mut [f64]) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let rank = |p: usize| ms[(p * ms.len()).div_ceil(100).clamp(1, ms.len()) - 1];
    (rank(50), rank(99), ms[ms.len() - 1])
}

/// How many times to repeat each timed change (`LATCHKEY_REVOCATIONS`; `./dev bench` asks for
/// more).
fn repetitions() -> usize {
    std::env::var("LATCHKEY_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A wait of 0 to 1 s that differs from one change to the next (a fixed sequence: runs compare),
/// so changes fall at every point of the isolate's one-second poll.
fn dephase(i: usize) -> Duration {
    Duration::from_millis(u64::try_from(i.wrapping_mul(379) % 1000).unwrap_or(0))
}

/// Slack on the revocation bound: the time between origin's commit and its answer, and the
/// scheduling of two processes on a loaded machine.
const BOUND_SLACK: Duration = Duration::from_millis(1000);

/// A debug header's age in ms (`None` for `none`).
fn age_header(headers: &HeaderMap, name: &str) -> Option<i64> {
    let text = header_text(headers, name);
    (text != "none").then(|| text.parse().expect("an age in ms"))
}

/// The promise behind every answer from memory: it was given with a sync no older than
/// `LEDGER_MAX_AGE_MS` and a watermark no older than `WATERMARK_MAX_AGE_MS` (the edge's
/// defaults here), as its debug headers report them.
fn assert_memory_answer_trusted(headers: &HeaderMap) {
    if !matches!(memory(headers), "hit" | "miss") {
        return;
    }
    let bounds = latchkey_shared::ledger::memory::Settings::default();
    let sync = age_header(headers, "x-latchkey-debug-sync-age-ms");
    let watermark = age_header(headers, "x-latchkey-debug-watermark-age-ms");
    assert!(
        sync.is_some_and(|a| a <= bounds.sync_max_age_ms)
            && watermark.is_some_and(|a| a <= bounds.watermark_max_age_ms),
        "an answer from memory with a sync {sync:?} ms and a watermark {watermark:?} ms old \
         (bounds {} and {} ms)",
        bounds.sync_max_age_ms,
        bounds.watermark_max_age_ms
    );
}

/// Polls the edge until `done` holds; the time from `since` (origin's answer to the change).
///
/// Asserts the revocation bound rather than timing it: every answer from memory carries a
/// fresh sync and watermark ([`assert_memory_answer_trusted`]), and no answer that still shows
/// the old state comes later than `WATERMARK_MAX_AGE_MS` after the change (plus
/// [`BOUND_SLACK`]): a trusted isolate's watermark is younger than that, and a watermark later
/// than the change's commit means the ledger it synced holds the change.
async fn edge_until(
    edge: &Edge,
    key: &str,
    required: &[&str],
    since: Instant,
    done: impl Fn(&Value) -> bool,
) -> (Value, f64) {
    let bound = Duration::from_millis(
        u64::try_from(latchkey_shared::ledger::memory::Settings::default().watermark_max_age_ms)
            .expect("positive"),
    ) + BOUND_SLACK;
    loop {
        let sent = since.elapsed();
        let reply = edge.verify(key, required).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_memory_answer_trusted(&reply.headers);
        if done(&reply.body) {
            return (reply.body, since.elapsed().as_secs_f64() * 1000.0);
        }
        assert!(
            sent <= bound,
            "the old state was answered {} ms after the change, past the bound of {} ms \
             (memory: {}): {}",
            sent.as_millis(),
            bound.as_millis(),
            memory(&reply.headers),
            reply.body
        );
        assert!(
            since.elapsed() < LIMIT,
            "the edge did not change within {LIMIT:?}; last answer {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn hot_keys_are_answered_from_memory_and_stale_kv_never_wins() {
    let stack = Stack::start(&[]).await;
    let edge = &stack.edge;
    let (_, key) = stack
        .create(&["read:orders", "write:orders"], json!({}))
        .await;
    edge.verify_until(&key, &[], LIMIT, |b| b["valid"] == true)
        .await;

    // The key came through the ledger: memory answers, with no KV read, again and again.
    for _ in 0..3 {
        let r = edge.verify(&key, &["read:orders"]).await;
        assert_eq!(r.body["valid"], true, "{:?}", r.body);
        assert_eq!(kv_reads(&r.headers), 0);
        assert_eq!(memory(&r.headers), "hit");
    }
    // A never-issued key: one KV read, then memory knows it is absent.
    let unissued = common::edge::unissued_key("sk_live");
    let first = edge.verify(&unissued, &[]).await;
    assert_eq!(first.body["code"], "NOT_FOUND");
    assert_eq!(
        (kv_reads(&first.headers), memory(&first.headers)),
        (1, "miss")
    );
    let second = edge.verify(&unissued, &[]).await;
    assert_eq!(second.body["code"], "NOT_FOUND");
    assert_eq!(
        (kv_reads(&second.headers), memory(&second.headers)),
        (0, "hit")
    );
    // The gateway too.
    let r = edge.gateway(Method::GET, "/orders/1", Some(&key)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(kv_reads(&r.headers), 0);

    // Revocations with stale KV: origin revokes, publishes everywhere, and then the key's old,
    // valid record is written back into KV, as a location whose KV cache still held it would
    // serve it. Timed from origin's answer to the edge's first denial.
    let n = repetitions();
    let mut keys = Vec::new();
    for _ in 0..n {
        keys.push(stack.create(&["read:orders"], json!({})).await);
    }
    stack.wait_published(LIMIT).await;
    let mut revoke_ms = Vec::new();
    for (i, (id, secret)) in keys.iter().enumerate() {
        let name = entry_name(secret);
        edge.verify_until(secret, &[], LIMIT, |b| b["valid"] == true)
            .await;
        let valid_record = edge.read_kv(&name).await;
        // Revocations land at every phase of the isolate's poll, not just after one.
        tokio::time::sleep(dephase(i)).await;
        stack.revoke(id).await;
        let revoked_at = Instant::now();
        // Once KV holds the revocation, put the old value back.
        eventually(LIMIT, || async {
            let now = edge.read_kv(&name).await;
            if String::from_utf8_lossy(&now).contains("\"revoked\":true") {
                Ok(())
            } else {
                Err("not published yet".to_owned())
            }
        })
        .await;
        edge.write_kv(&name, &valid_record).await;
        let (answer, ms) = edge_until(edge, secret, &[], revoked_at, |b| b["valid"] == false).await;
        assert_eq!(answer["code"], "REVOKED");
        revoke_ms.push(ms);
        // It stays denied: stale KV never wins.
        let again = edge.verify(secret, &[]).await;
        assert_eq!(again.body["code"], "REVOKED");
    }
    let (p50, p99, max) = percentiles(&mut revoke_ms);
    report_measurement(&format!(
        "ledger revocation with stale KV (origin revoke response -> first edge denial), {n} \
         revocations: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    ));

    // Scope narrowings with stale KV, the same way.
    let mut narrow_ms = Vec::new();
    for i in 0..n.min(10) {
        let (id, secret) = stack
            .create(&["read:orders", "write:orders"], json!({}))
            .await;
        let name = entry_name(&secret);
        edge.verify_until(&secret, &["write:orders"], LIMIT, |b| b["valid"] == true)
            .await;
        stack.wait_published(LIMIT).await;
        let wide_record = edge.read_kv(&name).await;
        tokio::time::sleep(dephase(i)).await;
        let r = stack
            .origin
            .patch(
                "/backend.api-keys.update",
                json!({ "key_id": id, "scopes": ["read:orders"] }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let narrowed_at = Instant::now();
        stack.wait_published(LIMIT).await;
        edge.write_kv(&name, &wide_record).await;
        let (answer, ms) = edge_until(edge, &secret, &["write:orders"], narrowed_at, |b| {
            b["code"] == "INSUFFICIENT_SCOPE"
        })
        .await;
        assert_eq!(answer["missing_scopes"], json!(["write:orders"]));
        narrow_ms.push(ms);
        let r = edge.gateway(Method::POST, "/orders", Some(&secret)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    }
    let (p50, p99, max) = percentiles(&mut narrow_ms);
    report_measurement(&format!(
        "ledger scope narrowing with stale KV, {} narrowings: p50 {p50:.1} ms, p99 {p99:.1} ms, \
         max {max:.1} ms",
        narrow_ms.len()
    ));

    // Memory survives its own limits: ledger fetches stay about one per poll interval.
    let before = ledger_fetches(&edge.verify(&key, &[]).await.headers);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let r = edge.verify(&key, &[]).await;
        assert_eq!(r.body["valid"], true);
    }
    let after = ledger_fetches(&edge.verify(&key, &[]).await.headers);
    let elapsed = started.elapsed();
    let seconds = elapsed.as_secs_f64();
    let per_second = (after - before) as f64 / seconds;
    report_measurement(&format!(
        "ledger fetches under sustained load: {} in {seconds:.1} s ({per_second:.2}/s, poll 1/s)",
        after - before
    ));
    assert!(
        after - before <= elapsed.as_secs() + 2,
        "at most one poll per interval: {} polls in {seconds:.1} s",
        after - before
    );
}

#[tokio::test]
async fn a_key_whose_record_never_reached_kv_is_found_through_the_ledger() {
    // Origin's KV sink points nowhere: only the ledger carries changes to the edge.
    let closed = format!("http://127.0.0.1:{}", common::edge::free_port());
    let stack = Stack::start(&[("KV_API_BASE", &closed)]).await;
    let edge = &stack.edge;
    let n = repetitions().min(10);
    let mut create_ms = Vec::new();
    for i in 0..n {
        tokio::time::sleep(dephase(i)).await;
        let (id, secret) = stack.create(&["read:orders"], json!({})).await;
        let created_at = Instant::now();
        let (answer, ms) = edge_until(edge, &secret, &[], created_at, |b| b["valid"] == true).await;
        assert_eq!(answer["id"], id);
        create_ms.push(ms);
        assert!(
            edge.read_kv(&entry_name(&secret)).await.is_empty()
                || !String::from_utf8_lossy(&edge.read_kv(&entry_name(&secret)).await)
                    .contains(&id),
            "the record is not in KV"
        );
    }
    let (p50, p99, max) = percentiles(&mut create_ms);
    report_measurement(&format!(
        "new key found through the ledger alone (never in KV), {n} keys: p50 {p50:.1} ms, \
         p99 {p99:.1} ms, max {max:.1} ms"
    ));
    // KV's rows wait, the ledger's are done: one sink down does not hold the other.
    let health = eventually(LIMIT, || async {
        let health = stack.origin.get("/healthz").await;
        if health.body["ledger"]["pending"] == 0 {
            Ok(health)
        } else {
            Err(format!("the ledger's rows wait: {}", health.body))
        }
    })
    .await;
    assert!(
        health.body["kv_publisher"]["pending"].as_u64() >= Some(n as u64),
        "{}",
        health.body
    );
}

#[tokio::test]
async fn origin_silent_or_ledger_pruned_falls_back_to_kv_and_still_decides_right() {
    let mut stack = Stack::start(&[]).await;
    let (_, good) = stack.create(&["read:orders"], json!({})).await;
    let (bad_id, bad) = stack.create(&["read:orders"], json!({})).await;
    stack
        .edge
        .verify_until(&bad, &[], LIMIT, |b| b["valid"] == true)
        .await;
    stack
        .edge
        .verify_until(&good, &[], LIMIT, |b| b["valid"] == true)
        .await;
    stack.wait_published(LIMIT).await;
    let bad_name = entry_name(&bad);
    let valid_record = stack.edge.read_kv(&bad_name).await;

    // KV turns stale for a revoked key, then origin goes silent: its watermark ages, memory is
    // dropped, KV is read per request, and the ledger's revocation still beats stale KV.
    stack.revoke(&bad_id).await;
    stack.wait_published(LIMIT).await;
    stack
        .edge
        .verify_until(&bad, &[], LIMIT, |b| b["code"] == "REVOKED")
        .await;
    stack.edge.write_kv(&bad_name, &valid_record).await;
    stack.origin.stop().await;
    eventually(LIMIT, || async {
        let r = stack.edge.verify(&good, &[]).await;
        if memory(&r.headers) == "untrusted" {
            Ok(())
        } else {
            Err(format!("still trusted: {}", memory(&r.headers)))
        }
    })
    .await;
    let r = stack.edge.verify(&good, &["read:orders"]).await;
    assert_eq!(r.body["valid"], true, "KV decides: {:?}", r.body);
    assert_eq!((kv_reads(&r.headers), memory(&r.headers)), (1, "untrusted"));
    let r = stack.edge.verify(&bad, &[]).await;
    assert_eq!(
        r.body["code"], "REVOKED",
        "stale KV lost to the ledger: {:?}",
        r.body
    );
    let r = stack
        .edge
        .gateway(Method::GET, "/orders/1", Some(&bad))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Strict: the same state answers 503 and forwards nothing.
    stack.edge.stop();
    stack.edge.var("LEDGER_STRICT", "true");
    stack.edge.start().await;
    let calls = stack.upstream.calls();
    let r = stack.edge.verify(&good, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "ledger_unavailable");
    let r = stack
        .edge
        .gateway(Method::GET, "/orders/1", Some(&good))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(stack.upstream.calls(), calls, "nothing forwarded");

    // Origin back: its watermark makes memory trusted again, strict or not.
    stack.origin.start_again().await;
    let r = eventually(LIMIT, || async {
        let r = stack.edge.verify(&good, &[]).await;
        if r.status == StatusCode::OK && r.body["valid"] == true {
            Ok(r)
        } else {
            Err(format!("{:?}", r.body))
        }
    })
    .await;
    assert_ne!(memory(&r.headers), "untrusted");

    // Pruned: with a retention of one second, the isolate sleeps (no requests) while origin
    // revokes a key; its cursor is then older than anything the ledger keeps. It notices,
    // decides from KV meanwhile, and reloads.
    stack.edge.stop();
    stack
        .edge
        .var("LEDGER_STRICT", "false")
        .var("LEDGER_RETENTION_MS", "1000");
    stack.edge.start().await;
    let (other_id, other) = stack.create(&["read:orders"], json!({})).await;
    stack
        .edge
        .verify_until(&other, &[], LIMIT, |b| b["valid"] == true)
        .await;
    stack
        .edge
        .verify_until(&good, &[], LIMIT, |b| b["valid"] == true)
        .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stack.revoke(&other_id).await;
    stack.wait_published(LIMIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = stack.edge.verify(&other, &[]).await;
    assert_eq!(r.body["code"], "REVOKED", "{:?}", r.body);
    eventually(LIMIT, || async {
        let r = stack.edge.verify(&good, &[]).await;
        if memory(&r.headers) == "hit" && r.body["valid"] == true {
            Ok(())
        } else {
            Err(format!(
                "memory did not recover: {} {}",
                memory(&r.headers),
                r.body
            ))
        }
    })
    .await;
    eventually(LIMIT, || async {
        if stack
            .edge
            .logs()
            .contains("ledger pruned past this isolate's cursor")
        {
            Ok(())
        } else {
            Err("the isolate did not log the gap".to_owned())
        }
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_ledger_means_kv_per_request_or_503_when_strict() {
    let upstream = common::edge::Upstream::start();
    let mut edge = Edge::on_free_port();
    edge.without_ledger_object()
        .var("UPSTREAM_URL", &upstream.base)
        .unset_var("ORIGIN_USAGE_URL");
    edge.start().await;
    let key = common::edge::unissued_key("sk_live");
    let r = edge.verify(&key, &[]).await;
    assert_eq!(r.body["code"], "NOT_FOUND", "{:?}", r.body);
    assert_eq!((kv_reads(&r.headers), memory(&r.headers)), (1, "untrusted"));
    let r = edge.verify(&key, &[]).await;
    assert_eq!((kv_reads(&r.headers), memory(&r.headers)), (1, "untrusted"));
    eventually(LIMIT, || async {
        if edge.logs().contains("ledger poll failed") {
            Ok(())
        } else {
            Err("the failed poll is not logged".to_owned())
        }
    })
    .await;

    edge.stop();
    edge.var("LEDGER_STRICT", "true");
    edge.start().await;
    let r = edge.verify(&key, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "ledger_unavailable");
    let r = edge.gateway(Method::GET, "/orders/1", Some(&key)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.calls(), 0, "nothing forwarded");
}

/// Signs an append as origin does.
fn signed(body: &[u8], timestamp: i64, secret: &str) -> (String, String) {
    let signature = sign::sign(
        secret.as_bytes(),
        &append_message(UnixMillis(timestamp), body),
    );
    (timestamp.to_string(), signature)
}

async fn append(edge: &Edge, body: &[u8], timestamp: &str, signature: &str) -> (StatusCode, Value) {
    let r = TestApp::send(
        edge.request(Method::POST, APPEND_PATH)
            .header(header::TIMESTAMP, timestamp)
            .header(header::SIGNATURE, signature)
            .body(body.to_vec()),
    )
    .await;
    (r.status, r.body)
}

#[tokio::test]
async fn the_ledger_route_takes_only_fresh_signed_appends() {
    let mut edge = Edge::on_free_port();
    edge.unset_var("ORIGIN_USAGE_URL").var("ROUTES", "");
    edge.start().await;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits");
    let body = br#"{"v":1,"changes":[]}"#;
    let (ts, sig) = signed(body, now, LEDGER_SECRET);
    let (status, answer) = append(&edge, body, &ts, &sig).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["appended"], 0);
    // (what, body, timestamp, signature, expected status, expected code)
    let other = signed(body, now, "another-secret-that-is-long-enough-0000");
    let stale = signed(body, now - 6 * 60 * 1000, LEDGER_SECRET);
    let v2 = br#"{"v":2,"changes":[]}"#;
    let v2_signed = signed(v2, now + 1, LEDGER_SECRET);
    let bad_name = br#"{"v":1,"changes":[{"name":"k1:zz","record":{}}]}"#;
    let bad_name_signed = signed(bad_name, now + 2, LEDGER_SECRET);
    // A watermark later than the signature's own time is not origin's.
    let future = format!(r#"{{"v":1,"changes":[],"watermark":{}}}"#, now + 60_000);
    let future_signed = signed(future.as_bytes(), now + 3, LEDGER_SECRET);
    // (what, body, timestamp, signature, status, code)
    type Case<'a> = (&'a str, &'a [u8], String, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("replay", body, ts.clone(), sig.clone(), 409, "replayed"),
        (
            "replay, upper-case hex",
            body,
            ts.clone(),
            sig.to_uppercase(),
            409,
            "replayed",
        ),
        (
            "another secret",
            body,
            other.0.clone(),
            other.1.clone(),
            401,
            "bad_signature",
        ),
        (
            "stale timestamp",
            body,
            stale.0.clone(),
            stale.1.clone(),
            401,
            "bad_signature",
        ),
        (
            "body changed",
            br#"{"v":1,"changes":[] }"#,
            ts.clone(),
            sig.clone(),
            401,
            "bad_signature",
        ),
        (
            "no signature",
            body,
            ts.clone(),
            String::new(),
            401,
            "bad_signature",
        ),
        (
            "extreme timestamp",
            body,
            i64::MIN.to_string(),
            sig.clone(),
            401,
            "bad_signature",
        ),
        (
            "unknown version",
            v2,
            v2_signed.0.clone(),
            v2_signed.1.clone(),
            400,
            "bad_ledger_batch",
        ),
        (
            "watermark from the future",
            future.as_bytes(),
            future_signed.0.clone(),
            future_signed.1.clone(),
            400,
            "bad_ledger_batch",
        ),
        (
            "bad entry name",
            bad_name,
            bad_name_signed.0.clone(),
            bad_name_signed.1.clone(),
            400,
            "bad_ledger_batch",
        ),
    ];
    for (what, body, ts, sig, status, code) in cases {
        let (got, answer) = append(&edge, body, &ts, &sig).await;
        assert_eq!(got.as_u16(), status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
    }
    let big = vec![b' '; latchkey_shared::ledger::APPEND_BODY_MAX_BYTES + 1];
    let (got, _) = append(&edge, &big, &ts, &sig).await;
    assert_eq!(got, StatusCode::PAYLOAD_TOO_LARGE);
    let r = TestApp::send(edge.request(Method::GET, APPEND_PATH)).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    // An edge without the ledger secret has no ledger route.
    edge.stop();
    edge.unset_var("LEDGER_SIGNING_SECRET");
    edge.start().await;
    let (got, answer) = append(&edge, body, &ts, &sig).await;
    assert_eq!(got, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["error"]["code"], "ledger_disabled");
    let r = edge
        .verify(&common::edge::unissued_key("sk_live"), &[])
        .await;
    assert_eq!(memory(&r.headers), "off");
}

/// A record for a key at `revision` (valid, or revoked), as origin would publish it.
fn record(revision: u64, revoked: bool) -> latchkey_shared::KeyRecord {
    latchkey_shared::KeyRecord {
        v: latchkey_shared::RECORD_VERSION,
        id: latchkey_shared::KeyId::parse("key_0123456789abcdefABCD").expect("id"),
        subject: "acme-corp".into(),
        scopes: latchkey_shared::ScopePolicy::default()
            .parse_grants(&["read:orders"])
            .expect("scopes"),
        revoked,
        revoked_at: revoked.then_some(UnixMillis(common::now_ms())),
        expires_at: None,
        revision,
        disabled: false,
        allowed_ips: Default::default(),
    }
}

/// An append of `changes` (KV entry name, record) and an optional watermark, signed at
/// `timestamp` as origin signs it; the body and its two headers.
fn signed_append(
    changes: &[(&str, &latchkey_shared::KeyRecord)],
    watermark: Option<i64>,
    timestamp: i64,
) -> (Vec<u8>, String, String) {
    let batch = latchkey_shared::ledger::AppendBatch::new(
        changes
            .iter()
            .map(|(name, record)| latchkey_shared::ledger::Change {
                name: (*name).to_owned(),
                record: (*record).clone(),
            })
            .collect(),
        watermark.map(UnixMillis),
    );
    let body = serde_json::to_vec(&batch).expect("serialises");
    let (ts, sig) = signed(&body, timestamp, LEDGER_SECRET);
    (body, ts, sig)
}

/// Origin's rule for timestamps: now, or one millisecond after the last one signed.
#[derive(Default)]
struct Timestamps {
    last: std::cell::Cell<i64>,
}

impl Timestamps {
    fn next(&self) -> i64 {
        let next = common::now_ms().max(self.last.get() + 1);
        self.last.set(next);
        next
    }
}

/// Feeds a fresh watermark (as origin does every second), then verifies `key` until memory
/// answers (the debug header says `hit`): what an isolate holding the ledger's view says.
async fn from_memory(edge: &Edge, clock: &Timestamps, key: &str) -> Value {
    eventually(LIMIT, || async {
        let now = clock.next();
        let (body, ts, sig) = signed_append(&[], Some(now), now);
        let (status, answer) = append(edge, &body, &ts, &sig).await;
        assert_eq!(status, StatusCode::OK, "watermark: {answer}");
        let r = edge.verify(key, &[]).await;
        if memory(&r.headers) == "hit" {
            Ok(r.body)
        } else {
            Err(format!("memory: {} {}", memory(&r.headers), r.body))
        }
    })
    .await
}

/// The review's late-append finding: origin's append of a revocation times out, origin
/// appends the key's newer state, and the first request lands after it. Once the newer entry
/// is pruned, an isolate loading the ledger would find only the older, valid record and answer
/// `VALID` from memory. The ledger takes appends only in signing order, and never lets a key's
/// revision go back.
#[tokio::test]
async fn a_late_or_older_append_never_brings_back_an_older_revision() {
    let mut edge = Edge::on_free_port();
    edge.unset_var("ORIGIN_USAGE_URL")
        .var("ROUTES", "")
        .var("LEDGER_RETENTION_MS", "1000");
    edge.start().await;

    // A late append: signed before the one that replaced it, delivered after.
    let key = common::edge::unissued_key("sk_live");
    let name = entry_name(&key);
    let (valid, revoked) = (record(1, false), record(2, true));
    let clock = Timestamps::default();
    let t0 = clock.next();
    let late = signed_append(&[(&name, &valid)], None, t0);
    let t1 = clock.next();
    let newer = signed_append(&[(&name, &revoked)], None, t1);
    let (status, answer) = append(&edge, &newer.0, &newer.1, &newer.2).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // KV holds the newest record, as origin published it.
    edge.write_kv(&name, revoked.to_json().as_bytes()).await;
    // The newer entry outlives its retention; then the late copy arrives.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, answer) = append(&edge, &late.0, &late.1, &late.2).await;
    // A fresh isolate (this one never loaded the ledger) follows the ledger, not the late copy.
    let seen = from_memory(&edge, &clock, &key).await;
    assert_eq!(
        seen["code"], "REVOKED",
        "the late copy's older record won: {seen} (its append answered {status} {answer})"
    );
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a late append is refused: {answer}"
    );
    assert_eq!(answer["error"]["code"], "superseded", "{answer}");
    assert_eq!(answer["error"]["last_signed_at"], t1, "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(message.contains("Do not resend it"), "{message}");

    // An older revision signed later (an origin whose state went back): left out.
    let key = common::edge::unissued_key("sk_test");
    let name = entry_name(&key);
    let (revoked, valid) = (record(5, true), record(4, false));
    let now = clock.next();
    let (body, ts, sig) = signed_append(&[(&name, &revoked)], None, now);
    let (status, answer) = append(&edge, &body, &ts, &sig).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["appended"], 1, "{answer}");
    edge.write_kv(&name, revoked.to_json().as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let now = clock.next();
    let (body, ts, sig) = signed_append(&[(&name, &valid)], None, now);
    let (status, answer) = append(&edge, &body, &ts, &sig).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let seen = from_memory(&edge, &clock, &key).await;
    assert_eq!(
        seen["code"], "REVOKED",
        "the older revision won: {seen} (its append answered {answer})"
    );
    assert_eq!(
        (&answer["appended"], &answer["superseded"]),
        (&json!(0), &json!(1)),
        "the older revision is left out: {answer}"
    );
    // The same revision again (origin keeping a key's entry alive) still goes in.
    let now = clock.next();
    let (body, ts, sig) = signed_append(&[(&name, &revoked)], None, now);
    let (status, answer) = append(&edge, &body, &ts, &sig).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["appended"], 1, "{answer}");
}

/// The files under `dir` whose path names a Durable Object's storage (`…/do/…`).
fn durable_object_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    common::files_under(dir)
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "do"))
        .collect()
}

/// The review's finding: a new or wiped ledger was noticed only at origin's restart, and
/// meanwhile fresh isolates trusted stale KV values from memory. Now the append answer carries
/// the ledger's epoch, and origin re-sends the recent changes as soon as it changes.
#[tokio::test]
async fn a_ledger_replaced_while_origin_runs_is_filled_again_at_once() {
    let mut stack = Stack::start(&[]).await;
    let (bad_id, bad) = stack.create(&["read:orders"], json!({})).await;
    stack
        .edge
        .verify_until(&bad, &[], LIMIT, |b| b["valid"] == true)
        .await;
    stack.wait_published(LIMIT).await;
    let bad_name = entry_name(&bad);
    let valid_record = stack.edge.read_kv(&bad_name).await;
    stack.revoke(&bad_id).await;
    stack.wait_published(LIMIT).await;
    stack
        .edge
        .verify_until(&bad, &[], LIMIT, |b| b["code"] == "REVOKED")
        .await;
    // KV turns stale (the revocation lost), and the ledger is replaced: its object's storage
    // is wiped while the Worker is down; KV stays.
    stack.edge.write_kv(&bad_name, &valid_record).await;
    stack.edge.stop();
    let objects = durable_object_files(&stack.edge.state_dir());
    assert!(
        !objects.is_empty(),
        "no Durable Object storage found to wipe"
    );
    for file in objects {
        std::fs::remove_file(&file).expect("wipe the ledger");
    }
    stack.edge.start().await;
    // Origin notices the new epoch at its next append and re-sends the revocation: the edge
    // answers REVOKED again, from the new ledger, though KV still says valid.
    let (body, _) = stack
        .edge
        .verify_until(&bad, &[], LIMIT, |b| b["code"] == "REVOKED")
        .await;
    assert_eq!(body["code"], "REVOKED", "{body}");
    let logs = stack.origin.logs();
    assert!(
        logs.contains("change ledger is a new one"),
        "origin did not notice the new ledger: {logs}"
    );
    assert_eq!(
        stack.edge.read_kv(&bad_name).await,
        valid_record,
        "KV was still stale: the ledger decided"
    );
}

/// The poll interval the cache-forging test gives the edge (`LEDGER_POLL_MS`): the shared
/// copies are keyed by it.
const FORGER_POLL_MS: i64 = 1000;

/// How many poll intervals ahead the cache-forging test plants copies: enough to cover a
/// `wrangler dev` start on a loaded machine and the seconds the edge is watched after it.
const FORGER_PLANT_INTERVALS: i64 = 90;

/// The Cache API key of the edge's shared copy of poll interval `bucket` (`edge/src/memory.rs`).
fn shared_copy_key(bucket: i64) -> String {
    format!("https://ledger.latchkey.invalid/tail/{bucket}")
}

/// The poll interval `now_ms` falls in.
fn poll_interval(now_ms: i64) -> i64 {
    latchkey_shared::ledger::copy::bucket(UnixMillis(now_ms), FORGER_POLL_MS)
}

/// A forged shared copy for poll interval `bucket`, as an isolate caught up at `head` of the
/// ledger of `epoch` would take it: the same ledger, one more entry (`name` at `record`), a
/// watermark and an answer time fresh for that interval.
fn forged_tail(
    epoch: u64,
    head: u64,
    name: &str,
    record: &latchkey_shared::KeyRecord,
    bucket: i64,
) -> latchkey_shared::ledger::Tail {
    let at = UnixMillis(bucket * FORGER_POLL_MS);
    latchkey_shared::ledger::Tail {
        v: latchkey_shared::ledger::LEDGER_VERSION,
        after: head,
        entries: vec![latchkey_shared::ledger::Entry {
            seq: head + 1,
            at,
            name: name.to_owned(),
            record: record.clone(),
        }],
        more: false,
        head: head + 1,
        watermark: Some(at),
        served_at: at,
        retention_ms: 600_000,
        epoch,
    }
}

/// The cache-forger Worker (`tests/fixtures/cache-forger`): any other Worker of the zone, which
/// can write the Cache API. Run by its own `wrangler dev` on the edge's persist folder, while
/// the edge is stopped (two workerd processes never share those files at once), so it sees the
/// same local Cache API storage. Its process group is killed on drop, as the edge's is.
struct CacheForger {
    base: String,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl CacheForger {
    /// Starts the forger on `state_dir` (an edge's [`Edge::state_dir`]) and waits until it
    /// answers.
    async fn start(state_dir: &std::path::Path) -> Self {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("temp dir");
        // Run from a copy, so that wrangler's own `.wrangler/` folder lands in the temp dir.
        let fixture = common::edge::repo_root().join("tests/fixtures/cache-forger");
        for file in ["index.js", "wrangler.toml"] {
            std::fs::copy(fixture.join(file), dir.path().join(file)).expect("copy the forger");
        }
        // An env file of its own (empty): no `.dev.vars` adds anything.
        let env_file = dir.path().join("empty.env");
        std::fs::write(&env_file, "").expect("write the empty env file");
        let port = common::edge::free_port();
        let log = std::fs::File::create(dir.path().join("wrangler.log")).expect("log file");
        let mut cmd = std::process::Command::new(
            common::edge::repo_root().join("node_modules/.bin/wrangler"),
        );
        cmd.current_dir(dir.path())
            .env("WRANGLER_SEND_METRICS", "false")
            .env("WRANGLER_LOG_PATH", dir.path().join("wrangler-debug-logs"))
            .env("CI", "1")
            .arg("dev")
            .arg("--config")
            .arg(dir.path().join("wrangler.toml"))
            .args(["--ip", "127.0.0.1", "--port", &port.to_string()])
            .args(["--inspector-port", &common::edge::free_port().to_string()])
            .arg("--persist-to")
            .arg(state_dir)
            .arg("--env-file")
            .arg(&env_file)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .process_group(0);
        let mut forger = Self {
            base: format!("http://127.0.0.1:{port}"),
            child: Some(cmd.spawn().expect("spawn wrangler dev for the forger")),
            dir,
            http: reqwest::Client::new(),
        };
        // Ready once this forger answers (a peek with no key is its own 400), not another
        // server that took the port.
        let started = Instant::now();
        loop {
            let probe = forger
                .http
                .get(format!("{}/peek", forger.base))
                .send()
                .await;
            if let Ok(probe) = probe
                && probe.status() == StatusCode::BAD_REQUEST
                && probe
                    .text()
                    .await
                    .is_ok_and(|t| t.contains("missing ?key="))
            {
                return forger;
            }
            if let Some(status) = forger
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the forger's wrangler dev exited with {status}:\n{}",
                    forger.logs()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the forger never answered:\n{}",
                forger.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wrangler.log")).unwrap_or_default()
    }

    /// Puts `body` in the edge's cache under `key`, for an hour.
    async fn plant(&self, key: &str, body: &str) {
        let r = self
            .http
            .put(format!("{}/plant", self.base))
            .query(&[("key", key)])
            .body(body.to_owned())
            .send()
            .await
            .expect("plant");
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "plant {key}");
    }

    /// What the edge's cache holds under `key`, if anything (expired entries are gone).
    async fn peek(&self, key: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/peek", self.base))
            .query(&[("key", key)])
            .send()
            .await
            .expect("peek");
        match r.status() {
            StatusCode::OK => Some(r.text().await.expect("peeked body")),
            StatusCode::NOT_FOUND => None,
            other => panic!("peek {key}: {other}"),
        }
    }

    /// Stops wrangler, workerd and everything else in their process group.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let signal = |sig: &str| {
            let _ = std::process::Command::new("kill")
                .args([sig, "--", &group])
                .stderr(std::process::Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // workerd may outlive its parent: end the group regardless.
        signal("-KILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for CacheForger {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared copies the edge put in its Cache API cache, read from the local storage under
/// `state_dir` while no workerd runs: `(poll interval, sealed body)`, oldest first. (Miniflare's
/// cache answers no entry past its `max-age`, which for the edge's copies is one poll interval,
/// so a Worker started after the edge stopped cannot read them; the rows and bodies stay on
/// disk.)
fn shared_copies_on_disk(state_dir: &std::path::Path) -> Vec<(i64, Vec<u8>)> {
    let files = common::files_under(&state_dir.join("v3").join("cache"));
    let prefix = shared_copy_key(0);
    let prefix = prefix.trim_end_matches('0');
    let mut copies = Vec::new();
    for db in files.iter().filter(|p| {
        p.extension().is_some_and(|e| e == "sqlite")
            && p.file_name().is_some_and(|n| n != "metadata.sqlite")
    }) {
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("open the cache's storage");
        let Ok(mut rows) = conn.prepare("SELECT key, blob_id FROM _mf_entries") else {
            continue;
        };
        let rows: Vec<(String, String)> = rows
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("query the cache's storage")
            .collect::<Result<_, _>>()
            .expect("read the cache's storage");
        for (key, blob_id) in rows {
            let Some(bucket) = key.strip_prefix(prefix).and_then(|b| b.parse().ok()) else {
                continue;
            };
            let Some(blob) = files
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == blob_id.as_str()))
            else {
                continue;
            };
            copies.push((bucket, std::fs::read(blob).expect("read a cached body")));
        }
    }
    copies.sort();
    copies
}

/// A forged shared copy of a ledger poll, planted in the edge's Cache API cache by another
/// Worker (as any Worker of the zone could), is refused unless it is sealed with the ledger
/// secret for its poll interval: a revoked key stays revoked in memory, though the forged copy,
/// consistent with the ledger in every other way, shows it valid at a higher revision. The
/// control: the same forgery sealed with the right secret is read and believed, which is what
/// the seal is for.
#[tokio::test]
async fn a_forged_shared_poll_in_the_cache_is_refused() {
    use latchkey_shared::ledger::copy;
    let mut edge = Edge::on_free_port();
    edge.unset_var("ORIGIN_USAGE_URL")
        .var("ROUTES", "")
        .var("LEDGER_POLL_MS", &FORGER_POLL_MS.to_string());
    edge.start().await;
    let clock = Timestamps::default();

    // Two keys revoked in the ledger, their old valid records still in KV (stale KV).
    let (forged_key, control_key) = (
        common::edge::unissued_key("sk_live"),
        common::edge::unissued_key("sk_test"),
    );
    let (forged_name, control_name) = (entry_name(&forged_key), entry_name(&control_key));
    let (valid, revoked, forged_valid) = (record(1, false), record(2, true), record(3, false));
    let now = clock.next();
    let (body, ts, sig) = signed_append(
        &[(&forged_name, &revoked), (&control_name, &revoked)],
        Some(now),
        now,
    );
    let (status, answer) = append(&edge, &body, &ts, &sig).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let head = answer["head"].as_u64().expect("head");
    let epoch = answer["epoch"].as_u64().expect("the ledger's epoch");
    for name in [&forged_name, &control_name] {
        edge.write_kv(name, valid.to_json().as_bytes()).await;
    }
    for key in [&forged_key, &control_key] {
        let seen = from_memory(&edge, &clock, key).await;
        assert_eq!(seen["code"], "REVOKED", "{seen}");
    }

    // The channel: a caught-up isolate shares its polls through the Cache API (each poll of
    // a new interval finds no copy, asks the ledger and puts the answer there).
    eventually(LIMIT, || async {
        let now = clock.next();
        let (body, ts, sig) = signed_append(&[], Some(now), now);
        let (status, answer) = append(&edge, &body, &ts, &sig).await;
        assert_eq!(status, StatusCode::OK, "watermark: {answer}");
        let r = edge.verify(&forged_key, &[]).await;
        assert_eq!(r.body["code"], "REVOKED", "{}", r.body);
        let fetches = ledger_fetches(&r.headers);
        if fetches >= 3 {
            Ok(())
        } else {
            Err(format!("{fetches} ledger fetches so far"))
        }
    })
    .await;
    edge.stop();
    let copies = shared_copies_on_disk(&edge.state_dir());
    assert!(
        !copies.is_empty(),
        "the edge put no shared copy in the Cache API (files: {:?})",
        common::files_under(&edge.state_dir().join("v3"))
    );
    let ours = latchkey_shared::sign::SigningSecret::parse(LEDGER_SECRET).expect("secret");
    for (bucket, body) in &copies {
        let tail = copy::open(&ours, *bucket, body)
            .unwrap_or_else(|e| panic!("the edge's copy of interval {bucket}: {e}"));
        assert_eq!((tail.epoch, tail.head), (epoch, head), "{}", tail.to_json());
    }

    // The forgery: for every interval of the next minute or so, a copy that shows the key valid
    // at a higher revision, consistent with the ledger in every other way, sealed with another
    // secret.
    let theirs =
        latchkey_shared::sign::SigningSecret::parse("another-secret-that-is-long-enough-0000")
            .expect("secret");
    let mut forger = CacheForger::start(&edge.state_dir()).await;
    let first = poll_interval(common::now_ms());
    let planted = first..=first + FORGER_PLANT_INTERVALS;
    let forged_body = |bucket: i64| {
        let tail = forged_tail(epoch, head, &forged_name, &forged_valid, bucket);
        copy::seal(&theirs, bucket, &tail)
    };
    for bucket in planted.clone() {
        forger
            .plant(&shared_copy_key(bucket), &forged_body(bucket))
            .await;
    }
    let last = *planted.end();
    assert_eq!(
        forger.peek(&shared_copy_key(last)).await,
        Some(forged_body(last)),
        "the forger reads back what it planted"
    );
    forger.stop();

    // The edge, started on the same storage, polls over several intervals (each poll after the
    // first finds a forged copy): the key stays revoked, answered from memory.
    let watched_from = poll_interval(common::now_ms());
    edge.start().await;
    let (hits, fetches) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    eventually(LIMIT, || async {
        let now = clock.next();
        let (body, ts, sig) = signed_append(&[], Some(now), now);
        let (status, answer) = append(&edge, &body, &ts, &sig).await;
        assert_eq!(status, StatusCode::OK, "watermark: {answer}");
        let r = edge.verify(&forged_key, &[]).await;
        assert_eq!(
            r.body["code"],
            "REVOKED",
            "a forged copy was believed (memory: {}): {}",
            memory(&r.headers),
            r.body
        );
        if memory(&r.headers) == "hit" {
            hits.set(hits.get() + 1);
        }
        fetches.set(ledger_fetches(&r.headers));
        tokio::time::sleep(Duration::from_millis(50)).await;
        if hits.get() >= 5 && fetches.get() >= 4 {
            Ok(())
        } else {
            Err(format!(
                "{} answers from memory, {} ledger fetches",
                hits.get(),
                fetches.get()
            ))
        }
    })
    .await;
    edge.stop();
    let watched_to = poll_interval(common::now_ms());
    assert!(
        watched_to < last,
        "the edge was watched past the planted intervals ({watched_to} > {last})"
    );

    // The edge met the forged copies: every one it polled is gone (it refused it, asked the
    // ledger and put its own copy in its place, since expired); the others are still there.
    let mut forger = CacheForger::start(&edge.state_dir()).await;
    let mut replaced = 0;
    for bucket in watched_from..=watched_to {
        if forger.peek(&shared_copy_key(bucket)).await.as_deref() != Some(&forged_body(bucket)) {
            replaced += 1;
        }
    }
    let fetches = fetches.get();
    assert!(
        replaced + 1 >= fetches,
        "{fetches} ledger fetches (the first poll and one per forged copy refused), but only \
         {replaced} forged copies replaced"
    );
    assert_eq!(
        forger.peek(&shared_copy_key(last)).await,
        Some(forged_body(last)),
        "a forged copy of an interval not polled yet is still in the cache"
    );

    // The control: the same forgery, for the other key, sealed with the ledger secret. The edge
    // believes it, and answers VALID from memory for a key the ledger holds revoked: the seal is
    // all that keeps a Worker that can write the cache from doing so.
    let first = poll_interval(common::now_ms());
    let planted = first..=first + FORGER_PLANT_INTERVALS;
    for bucket in planted.clone() {
        let tail = forged_tail(epoch, head, &control_name, &forged_valid, bucket);
        forger
            .plant(&shared_copy_key(bucket), &copy::seal(&ours, bucket, &tail))
            .await;
    }
    forger.stop();
    edge.start().await;
    let believed = eventually(LIMIT, || async {
        let now = clock.next();
        let (body, ts, sig) = signed_append(&[], Some(now), now);
        let (status, answer) = append(&edge, &body, &ts, &sig).await;
        assert_eq!(status, StatusCode::OK, "watermark: {answer}");
        let r = edge.verify(&control_key, &[]).await;
        if r.body["valid"] == true && memory(&r.headers) == "hit" {
            Ok(r)
        } else {
            Err(format!("memory: {} {}", memory(&r.headers), r.body))
        }
    })
    .await;
    assert!(
        poll_interval(common::now_ms()) < *planted.end(),
        "the control ran past the planted intervals"
    );
    assert_eq!(kv_reads(&believed.headers), 0, "from memory, not KV");
    // The forged copy named only the control key: the other stays revoked.
    let r = edge.verify(&forged_key, &[]).await;
    assert_eq!(r.body["code"], "REVOKED", "{}", r.body);
    edge.stop();
}
