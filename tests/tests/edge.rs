//! End to end: the real origin publishing into the real Worker's KV under `wrangler dev`, the
//! gateway forwarding to a real upstream, and usage flowing back to origin.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::time::Duration;

use common::edge::{Stack, report_measurement, unissued_key};
use common::{TestApp, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PUBLISH_LIMIT: Duration = Duration::from_secs(15);
const KV_READS: &str = "x-latchkey-debug-kv-reads";

fn kv_reads(headers: &reqwest::header::HeaderMap) -> u32 {
    headers
        .get(KV_READS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("the debug header counting KV reads")
}

#[tokio::test]
async fn gateway_forwards_allowed_requests_and_refuses_the_rest() {
    let stack = Stack::start(&[]).await;
    let edge = &stack.edge;
    let (id, key) = stack.create(&["read:orders"], json!({})).await;
    let (answer, _) = edge
        .verify_until(&key, &[], PUBLISH_LIMIT, |b| b["valid"] == true)
        .await;
    assert_eq!(answer["id"], id);
    assert_eq!(answer["scopes"], json!(["read:orders"]));

    // Allowed: forwarded with the identity, signed; without the key or smuggled headers.
    let r = TestApp::send(
        edge.request(Method::GET, "/orders/42?expand=items")
            .bearer_auth(&key)
            .header("x-latchkey-subject", "someone-else")
            .header("x-latchkey-admin", "true"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["upstream"], "demo",
        "the upstream answered, its signature check passed"
    );
    assert_eq!(r.body["key_id"], id);
    assert_eq!(r.body["subject"], "acme-corp");
    assert_eq!(r.body["scopes"], "read:orders");
    assert_eq!(r.body["path"], "/orders/42");
    assert_eq!(r.body["query"], "expand=items");
    assert_eq!(r.body["authorization_forwarded"], false);
    assert_eq!(r.body["other_latchkey_headers"], json!([]));
    let identity = r.body["identity_headers"]["x-latchkey-identity"]
        .as_str()
        .unwrap_or_default();
    assert!(
        identity.starts_with("v=3 t=")
            && identity.contains(&format!(" key={id} sub=acme-corp scopes=read:orders sig=")),
        "version 3, one header: {identity}"
    );
    // The key reached the isolate through the ledger: decided from memory, no KV read.
    assert_eq!(kv_reads(&r.headers), 0);

    // A valid key without the route's scope: 403 naming the scope.
    let r = edge.gateway(Method::POST, "/orders", Some(&key)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "insufficient_scope");
    let challenge = r.headers["www-authenticate"].to_str().expect("ascii");
    assert!(
        challenge.contains(r#"error="insufficient_scope""#) && challenge.contains("write:orders"),
        "{challenge}"
    );

    // No rule for the route: refused before any key is looked at (fail closed).
    for (method, path) in [
        (Method::GET, "/admin"),
        (Method::DELETE, "/orders/1"),
        (Method::GET, "/v1/api_keys"),
    ] {
        let r = edge.gateway(method.clone(), path, Some(&key)).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {:?}",
            r.body
        );
        assert_eq!(r.body["error"]["code"], "route_not_found");
        assert_eq!(kv_reads(&r.headers), 0);
    }

    // No key, garbage, a typo and a never-issued key: the same 401, which says nothing about
    // whether a key exists. Only the well-formed one costs a KV read.
    let mut typo = key.clone();
    let last = typo.pop().expect("non-empty");
    typo.push(if last == 'a' { 'b' } else { 'a' });
    let cases: [(Option<&str>, u32); 5] = [
        (None, 0),
        (Some("garbage"), 0),
        (Some(&"x".repeat(5000)), 0),
        (Some(&typo), 0),
        (Some(&unissued_key("sk_live")), 1),
    ];
    let mut bodies = Vec::new();
    for (presented, reads) in cases {
        let r = edge.gateway(Method::GET, "/orders/1", presented).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{presented:?}: {:?}",
            r.body
        );
        let challenge = r.headers["www-authenticate"].to_str().expect("ascii");
        assert!(
            challenge.starts_with("Bearer realm=\"latchkey\""),
            "{challenge}"
        );
        assert_eq!(kv_reads(&r.headers), reads, "KV reads for {presented:?}");
        if presented.is_some() {
            bodies.push(r.body);
        }
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "identical bodies: {bodies:?}"
    );

    // Two Authorization headers never make a valid key.
    let r = TestApp::send(
        edge.request(Method::GET, "/orders/1")
            .header("authorization", format!("Bearer {key}"))
            .header("authorization", format!("Bearer {key}")),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);

    // Disabled: the same 401, and nothing forwarded.
    let (off_id, off) = stack.create(&["read:orders"], json!({})).await;
    stack.set_disabled(&off_id, true).await;
    edge.verify_until(&off, &[], PUBLISH_LIMIT, |b| b["code"] == "DISABLED")
        .await;
    let r = edge.gateway(Method::GET, "/orders/1", Some(&off)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);
    assert_eq!(r.body, bodies[0]);

    // An IP allowlist: the address is Cloudflare's `CF-Connecting-IP` (which the local runtime
    // keeps when a client sends it, and otherwise sets from the socket: 127.0.0.1 here).
    let (_, listed) = stack
        .create(
            &["read:orders"],
            json!({ "allowed_ips": ["203.0.113.0/24", "2001:db8::/32"] }),
        )
        .await;
    edge.verify_until(&listed, &[], PUBLISH_LIMIT, |b| {
        b["code"] == "IP_NOT_ALLOWED"
    })
    .await;
    for (client, allowed) in [
        (Some("203.0.113.9"), true),
        (Some("2001:db8::7"), true),
        (Some("198.51.100.1"), false),
        (Some("203.0.114.1"), false),
        (Some("not-an-address"), false),
        (None, false),
    ] {
        let mut request = edge.request(Method::GET, "/orders/7").bearer_auth(&listed);
        if let Some(client) = client {
            request = request.header("cf-connecting-ip", client);
        }
        let r = TestApp::send(request).await;
        if allowed {
            assert_eq!(r.status, StatusCode::OK, "{client:?}: {:?}", r.body);
            assert_eq!(r.body["upstream"], "demo");
        } else {
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{client:?}: {:?}", r.body);
            assert_eq!(r.body["error"]["code"], "ip_not_allowed");
            assert!(r.body.get("upstream").is_none(), "not forwarded");
            let text = r.body.to_string();
            assert!(
                !text.contains("203.0.113") && !text.contains("2001:db8"),
                "the answer does not reveal the list: {text}"
            );
        }
    }
    // A subrequest of another Worker in the same zone (it carries `CF-Worker`) can set
    // `CF-Connecting-IP` itself: a key with an allowlist is refused whatever address it claims,
    // as from an address not in the list; a key without one is unaffected.
    for (presented, status) in [(&listed, StatusCode::FORBIDDEN), (&key, StatusCode::OK)] {
        let r = TestApp::send(
            edge.request(Method::GET, "/orders/7")
                .bearer_auth(presented)
                .header("cf-connecting-ip", "203.0.113.9")
                .header("cf-worker", "other-worker.example.com"),
        )
        .await;
        assert_eq!(r.status, status, "{:?}", r.body);
        if status == StatusCode::FORBIDDEN {
            assert_eq!(r.body["error"]["code"], "ip_not_allowed");
            assert!(r.body.get("upstream").is_none(), "not forwarded");
        } else {
            assert_eq!(r.body["upstream"], "demo");
        }
    }

    // Revoked: the gateway's 401 looks like any other.
    stack.revoke(&id).await;
    edge.verify_until(&key, &[], PUBLISH_LIMIT, |b| b["code"] == "REVOKED")
        .await;
    let r = edge.gateway(Method::GET, "/orders/1", Some(&key)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body, bodies[0]);
}

#[tokio::test]
async fn edge_follows_origin_changes_reports_usage_and_outlives_origin() {
    let mut stack = Stack::start(&[]).await;
    let (id, key) = stack
        .create(&["read:orders", "write:orders"], json!({}))
        .await;
    stack
        .edge
        .verify_until(&key, &[], PUBLISH_LIMIT, |b| b["valid"] == true)
        .await;

    // A POST with a body goes through while the key holds write:orders.
    let r = TestApp::send(
        stack
            .edge
            .request(Method::POST, "/orders")
            .bearer_auth(&key)
            .body("{\"sku\":\"A-1\"}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["body"], "{\"sku\":\"A-1\"}");
    assert_eq!(r.body["method"], "POST");

    // last_used_at at origin comes from edge traffic alone (origin verified nothing).
    eventually(Duration::from_secs(15), || async {
        let k = stack.origin.get(&format!("/v1/api_keys/{id}")).await;
        if k.body["last_used_at"].is_number() {
            Ok(())
        } else {
            Err(format!("last_used_at never set: {}", k.body))
        }
    })
    .await;

    // Narrowing at origin reaches the edge: write:orders is gone.
    let r = stack
        .origin
        .patch(
            "/backend.api-keys.update",
            json!({ "key_id": id, "scopes": ["read:orders"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let (answer, took) = stack
        .edge
        .verify_until(&key, &["write:orders"], PUBLISH_LIMIT, |b| {
            b["code"] == "INSUFFICIENT_SCOPE"
        })
        .await;
    assert_eq!(answer["missing_scopes"], json!(["write:orders"]));
    report_measurement(&format!(
        "scope narrowing reached the edge in {} ms",
        took.as_millis()
    ));
    let r = stack
        .edge
        .gateway(Method::POST, "/orders", Some(&key))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Revocation, 20 times (`LATCHKEY_REVOCATIONS`; `./dev bench` asks for 200): measured from
    // origin's revoke response to the edge's first denial. A figure, not a timing assertion.
    let revocations: usize = std::env::var("LATCHKEY_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut revoked = Vec::new();
    for _ in 0..revocations {
        revoked.push(stack.create(&["read:orders"], json!({})).await);
    }
    stack.wait_published(PUBLISH_LIMIT).await;
    let mut took_ms = Vec::new();
    for (i, (other_id, other_key)) in revoked.iter().enumerate() {
        // Revocations land at every phase of the isolate's one-second ledger poll.
        tokio::time::sleep(Duration::from_millis(
            u64::try_from(i.wrapping_mul(379) % 1000).unwrap_or(0),
        ))
        .await;
        stack.revoke(other_id).await;
        let (answer, took) = stack
            .edge
            .verify_until(other_key, &[], PUBLISH_LIMIT, |b| b["valid"] == false)
            .await;
        assert_eq!(
            answer["code"], "REVOKED",
            "a revoked record answers REVOKED, not NOT_FOUND"
        );
        assert_eq!(answer["revoked"], true);
        took_ms.push(took.as_secs_f64() * 1000.0);
    }
    took_ms.sort_by(f64::total_cmp);
    // Nearest-rank percentiles.
    let rank = |p: usize| took_ms[(p * took_ms.len()).div_ceil(100).clamp(1, took_ms.len()) - 1];
    report_measurement(&format!(
        "revocation propagation (origin revoke response -> first edge denial), {revocations} revocations: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        rank(50),
        rank(99),
        took_ms[took_ms.len() - 1]
    ));
    let other_key = &revoked[0].1;

    // Origin stops; the edge keeps deciding from KV alone.
    stack.origin.stop().await;
    let r = stack.edge.verify(&key, &["read:orders"]).await;
    assert_eq!(r.body["valid"], true, "{:?}", r.body);
    let r = stack
        .edge
        .gateway(Method::GET, "/orders/7", Some(&key))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = stack.edge.verify(other_key, &[]).await;
    assert_eq!(r.body["code"], "REVOKED");
}

#[tokio::test]
async fn edge_and_origin_decide_the_same_table_alike() {
    let stack = Stack::start(&[]).await;
    let (_, live) = stack
        .create(&["read:orders", "write:orders"], json!({}))
        .await;
    let (revoked_id, revoked) = stack.create(&["read:orders"], json!({})).await;
    let (_, expiring) = stack
        .create(&["read:orders"], json!({ "seconds_until_expiration": 1 }))
        .await;
    let (_, dated) = stack
        .create(
            &["read:orders"],
            json!({ "seconds_until_expiration": 86_400 }),
        )
        .await;
    let (disabled_id, disabled) = stack.create(&["read:orders"], json!({})).await;
    let (reenabled_id, reenabled) = stack.create(&["read:orders"], json!({})).await;
    stack.revoke(&revoked_id).await;
    stack.set_disabled(&disabled_id, true).await;
    stack.set_disabled(&reenabled_id, true).await;
    stack.set_disabled(&reenabled_id, false).await;
    // Rolled keys: in the grace period, cut off at once, and past a one-second grace period.
    let roll = |id: String, grace: u32| {
        let origin = &stack.origin;
        async move {
            let r = origin
                .post(
                    &format!("/v1/api_keys/{id}/roll"),
                    json!({ "grace_period_seconds": grace }),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
            r.body["secret"].as_str().expect("secret").to_owned()
        }
    };
    let (graced_id, graced) = stack.create(&["read:orders"], json!({})).await;
    let successor = roll(graced_id, 3600).await;
    let (cut_id, cut) = stack.create(&["read:orders"], json!({})).await;
    roll(cut_id, 0).await;
    let (ended_id, ended) = stack.create(&["read:orders"], json!({})).await;
    roll(ended_id, 1).await;
    stack.wait_published(PUBLISH_LIMIT).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut typo = live.clone();
    let last = typo.pop().expect("non-empty");
    typo.push(if last == 'Z' { 'Y' } else { 'Z' });
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        ("live, nothing required", live.clone(), vec![], "VALID"),
        (
            "live, scope held",
            live.clone(),
            vec!["read:orders"],
            "VALID",
        ),
        (
            "live, both held",
            live.clone(),
            vec!["write:orders", "read:orders"],
            "VALID",
        ),
        (
            "live, one missing",
            live.clone(),
            vec!["read:orders", "delete:orders"],
            "INSUFFICIENT_SCOPE",
        ),
        (
            "dated expiry, held",
            dated.clone(),
            vec!["read:orders"],
            "VALID",
        ),
        ("revoked", revoked.clone(), vec![], "REVOKED"),
        (
            "revoked beats scope",
            revoked.clone(),
            vec!["admin:all"],
            "REVOKED",
        ),
        ("disabled", disabled.clone(), vec![], "DISABLED"),
        (
            "disabled beats scope",
            disabled.clone(),
            vec!["admin:all"],
            "DISABLED",
        ),
        (
            "disabled, then enabled again",
            reenabled.clone(),
            vec!["read:orders"],
            "VALID",
        ),
        (
            "rolled, in its grace period",
            graced,
            vec!["read:orders"],
            "VALID",
        ),
        (
            "the key it was rolled to",
            successor,
            vec!["read:orders"],
            "VALID",
        ),
        ("rolled with no grace period", cut, vec![], "REVOKED"),
        ("rolled, grace period over", ended, vec![], "EXPIRED"),
        ("expired", expiring.clone(), vec![], "EXPIRED"),
        (
            "expired beats scope",
            expiring.clone(),
            vec!["admin:all"],
            "EXPIRED",
        ),
        ("never issued", unissued_key("sk_live"), vec![], "NOT_FOUND"),
        (
            "never issued, other prefix",
            unissued_key("pk_test"),
            vec![],
            "NOT_FOUND",
        ),
        ("checksum typo", typo, vec![], "MALFORMED"),
        ("garbage", "hello".into(), vec![], "MALFORMED"),
        ("empty", String::new(), vec![], "MALFORMED"),
        (
            "too long",
            format!("sk_live_{}", "a".repeat(300)),
            vec![],
            "MALFORMED",
        ),
    ];
    let fields = [
        "valid",
        "code",
        "id",
        "revoked",
        "scopes",
        "missing_scopes",
        "expires_at",
    ];
    for (label, key, required, want) in &cases {
        let at_origin = stack
            .origin
            .post(
                "/backend.api-keys.verify",
                json!({ "key": key, "required_scopes": required }),
            )
            .await;
        let at_edge = stack.edge.verify(key, required).await;
        assert_eq!(
            at_origin.status,
            StatusCode::OK,
            "{label}: {:?}",
            at_origin.body
        );
        assert_eq!(
            at_edge.status,
            StatusCode::OK,
            "{label}: {:?}",
            at_edge.body
        );
        assert_eq!(at_origin.body["code"], *want, "{label} at origin");
        for field in fields {
            assert_eq!(
                at_origin.body[field], at_edge.body[field],
                "{label}: field {field}"
            );
        }
    }

    // A key with an IP allowlist, verified for a client address (or none): the same answer at
    // origin and at the edge.
    let (_, listed) = stack
        .create(
            &["read:orders"],
            json!({ "allowed_ips": ["203.0.113.0/24"] }),
        )
        .await;
    stack.wait_published(PUBLISH_LIMIT).await;
    for (client, want) in [
        (Some("203.0.113.9"), "VALID"),
        (Some("::ffff:203.0.113.9"), "VALID"),
        (Some("198.51.100.1"), "IP_NOT_ALLOWED"),
        (None, "IP_NOT_ALLOWED"),
    ] {
        let mut body = json!({ "key": listed, "required_scopes": ["read:orders"] });
        if let Some(client) = client {
            body["client_ip"] = json!(client);
        }
        let at_origin = stack
            .origin
            .post("/backend.api-keys.verify", body.clone())
            .await;
        let at_edge = eventually(PUBLISH_LIMIT, || async {
            let r = TestApp::send(
                stack
                    .edge
                    .request(Method::POST, "/v1/api_keys/verify")
                    .json(&body),
            )
            .await;
            if r.body["code"] == "NOT_FOUND" {
                Err(format!("not at the edge yet: {}", r.body))
            } else {
                Ok(r)
            }
        })
        .await;
        assert_eq!(at_origin.body["code"], want, "{client:?} at origin");
        for field in fields {
            assert_eq!(
                at_origin.body[field], at_edge.body[field],
                "{client:?}: field {field}"
            );
        }
    }

    // Bad requests are refused alike: same status, same code, same field.
    let bad: [(&str, Value); 6] = [
        (
            "wildcard required",
            json!({ "key": live, "required_scopes": ["read:*"] }),
        ),
        (
            "malformed scope",
            json!({ "key": live, "required_scopes": ["READ ORDERS"] }),
        ),
        (
            "65 scopes",
            json!({ "key": live, "required_scopes": vec!["a:b"; 65] }),
        ),
        ("no key", json!({ "required_scopes": [] })),
        (
            "a range as client_ip",
            json!({ "key": live, "client_ip": "203.0.113.0/24" }),
        ),
        (
            "a number as client_ip",
            json!({ "key": live, "client_ip": 5 }),
        ),
    ];
    for (label, body) in bad {
        let at_origin = stack
            .origin
            .post("/backend.api-keys.verify", body.clone())
            .await;
        let at_edge = TestApp::send(
            stack
                .edge
                .request(Method::POST, "/v1/api_keys/verify")
                .json(&body),
        )
        .await;
        assert_eq!(
            at_origin.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{label}: {:?}",
            at_origin.body
        );
        assert_eq!(
            at_edge.status, at_origin.status,
            "{label}: {:?}",
            at_edge.body
        );
        assert_eq!(
            at_edge.body["error"]["code"], at_origin.body["error"]["code"],
            "{label}"
        );
        // A missing field or a wrong JSON type is named by origin only (the edge answers
        // serde's message without the field); the same status and code all the same.
        if !matches!(label, "no key" | "a number as client_ip") {
            assert_eq!(
                at_edge.body["error"]["field"], at_origin.body["error"]["field"],
                "{label}"
            );
        }
    }
    let at_edge = TestApp::send(
        stack
            .edge
            .request(Method::POST, "/v1/api_keys/verify")
            .body("{\"key\":"),
    )
    .await;
    assert_eq!(at_edge.status, StatusCode::BAD_REQUEST);
    assert_eq!(at_edge.body["error"]["code"], "malformed_json");
    let r = TestApp::send(stack.edge.request(Method::GET, "/v1/api_keys/verify")).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_bad_route_rule_or_signature_version_refuses_every_request_and_names_it() {
    let mut edge = common::edge::Edge::on_free_port();
    edge.var("ROUTES", "GET /orders/** read:orders\nFETCH /x")
        .var("UPSTREAM_URL", "http://127.0.0.1:9");
    edge.start_expecting_misconfiguration().await;
    for path in ["/orders/1", "/v1/api_keys/verify"] {
        let r = TestApp::send(
            edge.request(Method::POST, path)
                .json(&json!({ "key": "x" })),
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {:?}",
            r.body
        );
        assert_eq!(r.body["error"]["code"], "edge_misconfigured");
        let message = r.body["error"]["message"].as_str().expect("message");
        assert!(
            message.contains("route rule 2") && message.contains("FETCH"),
            "{message}"
        );
    }
    // The Worker's console.error reaches wrangler's output shortly after the response.
    let logged = &edge;
    eventually(Duration::from_secs(10), || async move {
        let logs = logged.logs();
        if logs.contains("latchkey edge is misconfigured") {
            Ok(())
        } else {
            Err(format!("not logged:\n{logs}"))
        }
    })
    .await;

    // Good rules, an identity header version that does not exist.
    edge.stop();
    edge.var("ROUTES", "GET /orders/** read:orders")
        .var("UPSTREAM_SIGNING_SECRET", &"s".repeat(40))
        .var("UPSTREAM_SIGNATURE_VERSION", "1");
    edge.start_expecting_misconfiguration().await;
    let r = TestApp::send(edge.request(Method::GET, "/orders/1")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "edge_misconfigured");
    assert_eq!(
        r.body["error"]["message"],
        r#"UPSTREAM_SIGNATURE_VERSION must be 2 or 3, got "1""#
    );
}

#[tokio::test]
async fn bad_secrets_and_a_cleartext_upstream_refuse_every_request_and_name_the_setting() {
    let mut edge = common::edge::Edge::on_free_port();
    let long = "s".repeat(40);
    // (setting, value, what the message must name) — each on its own start.
    let cases: [(&str, &str, &str); 4] = [
        (
            "UPSTREAM_SIGNING_SECRET",
            "too-short-secret",
            "UPSTREAM_SIGNING_SECRET must be at least 32",
        ),
        ("USAGE_SIGNING_SECRET", &long, "must be different secrets"),
        (
            "UPSTREAM_URL",
            "http://api.example.com:8080",
            "UPSTREAM_URL must use https://",
        ),
        (
            "UPSTREAM_URL",
            "https://user:hunter2@api.example.com",
            "UPSTREAM_URL must be scheme://host",
        ),
    ];
    edge.var("ROUTES", "GET /orders/** read:orders")
        .var("UPSTREAM_URL", "http://127.0.0.1:9")
        .var("UPSTREAM_SIGNING_SECRET", &long);
    for (name, value, expected) in cases {
        edge.var(name, value);
        edge.start_expecting_misconfiguration().await;
        let r = TestApp::send(edge.request(Method::GET, "/orders/1")).await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{name}: {:?}",
            r.body
        );
        assert_eq!(r.body["error"]["code"], "edge_misconfigured");
        let message = r.body["error"]["message"].as_str().expect("message");
        assert!(message.contains(expected), "{name}: {message}");
        assert!(
            !message.contains(value),
            "{name}: the value is never echoed: {message}"
        );
        edge.stop();
        // Back to a good value before the next case breaks another setting.
        match name {
            "UPSTREAM_SIGNING_SECRET" => edge.var(name, &long),
            "USAGE_SIGNING_SECRET" => edge.var(name, &"u".repeat(40)),
            _ => edge.var(name, "http://127.0.0.1:9"),
        };
    }
}

/// Run alone (`wrangler dev` with the committed `wrangler.toml` and no `.dev.vars`), the Worker
/// refuses every request (fail closed), naming the missing secret and how to set it.
#[tokio::test]
async fn a_worker_run_without_its_secrets_says_how_to_set_them() {
    let mut edge = common::edge::Edge::on_free_port();
    // `wrangler.toml`'s vars as committed, no secret.
    for name in [
        "UPSTREAM_SIGNING_SECRET",
        "USAGE_SIGNING_SECRET",
        "LEDGER_SIGNING_SECRET",
        "DEBUG_HEADERS",
        "USAGE_FLUSH_MS",
    ] {
        edge.unset_var(name);
    }
    // The secrets the committed settings need, in the order the Worker asks for them.
    for (missing, set) in [
        ("UPSTREAM_SIGNING_SECRET", None),
        ("USAGE_SIGNING_SECRET", Some("UPSTREAM_SIGNING_SECRET")),
    ] {
        if let Some(set) = set {
            edge.var(set, &"u".repeat(40));
        }
        edge.start_expecting_misconfiguration().await;
        for path in ["/v1/api_keys/verify", "/orders/1"] {
            let r = TestApp::send(
                edge.request(Method::POST, path)
                    .json(&json!({ "key": "x" })),
            )
            .await;
            assert_eq!(
                r.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{path}: {:?}",
                r.body
            );
            assert_eq!(r.body["error"]["code"], "edge_misconfigured");
            let message = r.body["error"]["message"].as_str().expect("message");
            for needed in [
                &format!("{missing} is required"),
                "copy .dev.vars.example to .dev.vars",
                "openssl rand -hex 32",
                &format!("wrangler secret put {missing}"),
            ] {
                assert!(message.contains(needed), "{path}: {needed:?} in {message}");
            }
        }
        edge.stop();
    }
    // `.dev.vars.example` copied as it is: its placeholders are refused, naming how to make one.
    for (name, value) in dev_vars_example() {
        edge.var(&name, &value);
    }
    edge.start_expecting_misconfiguration().await;
    let r = TestApp::send(edge.request(Method::GET, "/orders/1")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("UPSTREAM_SIGNING_SECRET must be at least 32")
            && message.contains("openssl rand -hex 32"),
        "{message}"
    );
}

/// The `NAME=value` lines of the committed `.dev.vars.example`.
fn dev_vars_example() -> Vec<(String, String)> {
    let path = common::edge::repo_root().join(".dev.vars.example");
    let text = std::fs::read_to_string(&path).expect(".dev.vars.example is committed");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.split_once('=').expect("NAME=value");
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect()
}

/// `.dev.vars.example` lists exactly the secrets the Worker reads (every `secret(env, …)` in
/// `edge/src/config.rs`), with placeholders the Worker refuses (a copy left as it is fails
/// closed); `.dev.vars` is git-ignored and the example is not.
#[test]
fn the_dev_vars_example_lists_every_secret_the_worker_reads() {
    let config = std::fs::read_to_string(common::edge::repo_root().join("edge/src/config.rs"))
        .expect("edge/src/config.rs");
    let mut read: Vec<String> = config
        .split("secret(env, \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
        .collect();
    read.sort();
    assert_eq!(read.len(), 3, "the secrets the Worker reads: {read:?}");
    let example = dev_vars_example();
    let mut listed: Vec<String> = example.iter().map(|(name, _)| name.clone()).collect();
    listed.sort();
    assert_eq!(listed, read, ".dev.vars.example lists every secret");
    for (name, value) in &example {
        assert!(
            latchkey_shared::sign::SigningSecret::parse(value).is_err(),
            "{name}: a placeholder the Worker would accept"
        );
    }
    let ignored = |path: &str| {
        let status = std::process::Command::new("git")
            .args(["check-ignore", "-q", "--no-index", path])
            .current_dir(common::edge::repo_root())
            .status()
            .expect("run git check-ignore");
        match status.code() {
            Some(0) => true,
            Some(1) => false,
            other => panic!("git check-ignore {path}: {other:?}"),
        }
    };
    assert!(ignored(".dev.vars"), ".dev.vars must stay git-ignored");
    assert!(
        !ignored(".dev.vars.example"),
        ".dev.vars.example is committed"
    );
}
