//! Bad input and bad credentials: always a 4xx with a JSON error naming the problem, never a 500.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use common::{ADMIN_TOKEN, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn clerk_code(body: &Value) -> &str {
    body["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("Clerk error envelope expected: {body}"))
}

fn clerk_field(body: &Value) -> Option<&str> {
    body["errors"][0]["meta"]["param_name"].as_str()
}

#[tokio::test]
async fn rotated_admin_tokens_both_work_and_are_labelled_apart() {
    let second = "second-admin-token-bbbbbbbbbbbbbbbbbbbbbbbbbb";
    let app = TestApp::builder()
        .env("ADMIN_TOKEN", &format!("{ADMIN_TOKEN},{second}"))
        .start()
        .await;
    app.create_key("acme", &[]).await;
    let r = TestApp::send(
        app.request(Method::POST, "/v1/api_keys")
            .bearer_auth(second)
            .json(&json!({"name": "n", "subject": "s"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let audit = app.get("/v1/audit_log").await;
    let actors: Vec<&str> = audit.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["actor"].as_str().expect("actor"))
        .collect();
    assert_eq!(actors.len(), 2);
    assert_ne!(actors[0], actors[1]);
}

#[tokio::test]
async fn malformed_bodies_are_400_and_bad_fields_422_with_the_field_named() {
    let app = TestApp::start().await;
    let raw = |body: &'static [u8]| {
        app.request(Method::POST, "/v1/api_keys")
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(&[u8], StatusCode, &str, Option<&str>)> = vec![
        (b"{", StatusCode::BAD_REQUEST, "malformed_json", None),
        (
            b"{\"name\":\"a\",",
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        (b"not json", StatusCode::BAD_REQUEST, "malformed_json", None),
        (
            b"{} trailing",
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        (
            b"{\"name\":\"\xff\xfe\",\"subject\":\"s\"}",
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        (
            b"[]",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            None,
        ),
        (
            b"{\"subject\":\"s\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("name"),
        ),
        (
            b"{\"name\":\"n\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("subject"),
        ),
        // A line break or tab in a single-line field could pass for a field boundary in a
        // header or a signed message: refused (these were accepted before).
        (
            b"{\"name\":\"n\",\"subject\":\"acme\\nread:admin\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("subject"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"acme\\u0085x\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("subject"),
        ),
        (
            b"{\"name\":\"a\\tb\",\"subject\":\"s\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("name"),
        ),
        (
            b"{\"name\":5,\"subject\":\"s\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("name"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"scopes\":\"read:orders\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("scopes"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"scopes\":[1]}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("scopes[0]"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"scope\":[]}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            None,
        ),
        (
            b"{\"name\":\"n\",\"name\":\"m\",\"subject\":\"s\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            None,
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"seconds_until_expiration\":\"soon\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("seconds_until_expiration"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"seconds_until_expiration\":0}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("seconds_until_expiration"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"claims\":\"x\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("claims"),
        ),
        (
            b"{\"name\":\"  \",\"subject\":\"s\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("name"),
        ),
        (
            b"{\"name\":\"a\\u0000b\",\"subject\":\"s\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("name"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"scopes\":[\"Read:Orders\"]}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("scopes"),
        ),
        (
            b"{\"name\":\"n\",\"subject\":\"s\",\"scopes\":[\"read:\xd0\xbe\x72ders\"]}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("scopes"),
        ),
    ];
    for (body, status, code, field) in cases {
        let r = TestApp::send(raw(body)).await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(r.status, status, "{shown}: {}", r.body);
        assert_eq!(clerk_code(&r.body), code, "{shown}");
        if field.is_some() {
            assert_eq!(clerk_field(&r.body), field, "{shown}: {}", r.body);
        }
        assert!(
            r.body["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Deep nesting is refused by the parser's depth limit, not by a stack overflow.
    let deep = format!(
        "{{\"name\":\"n\",\"subject\":\"s\",\"claims\":{}1{}}}",
        "{\"a\":".repeat(5000),
        "}".repeat(5000)
    );
    let r = TestApp::send(
        app.request(Method::POST, "/v1/api_keys")
            .bearer_auth(ADMIN_TOKEN)
            .body(deep),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    // Nothing was created by any of them.
    assert_eq!(
        app.get("/v1/api_keys?include_invalid=true").await.body["total_count"],
        0
    );
}

#[tokio::test]
async fn oversized_fields_and_bodies_are_refused() {
    let app = TestApp::start().await;
    let long = |n: usize| "x".repeat(n);
    let many_scopes: Vec<String> = (0..65).map(|i| format!("read:r{i}")).collect();
    let cases = vec![
        (json!({"name": long(257), "subject": "s"}), "name"),
        (json!({"name": "n", "subject": long(257)}), "subject"),
        (
            json!({"name": "n", "subject": "s", "description": long(1025)}),
            "description",
        ),
        (
            json!({"name": "n", "subject": "s", "created_by": long(257)}),
            "created_by",
        ),
        (
            json!({"name": "n", "subject": "s", "scopes": many_scopes}),
            "scopes",
        ),
        (
            json!({"name": "n", "subject": "s", "scopes": [format!("read:{}", long(200))]}),
            "scopes",
        ),
        (
            json!({"name": "n", "subject": "s", "claims": {"big": long(5000)}}),
            "claims",
        ),
        (
            json!({"name": "n", "subject": "s", "seconds_until_expiration": 400_000_000}),
            "seconds_until_expiration",
        ),
    ];
    for (body, field) in cases {
        let r = app.post("/v1/api_keys", body).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {}",
            r.body
        );
        assert_eq!(clerk_field(&r.body), Some(field));
    }
    let huge = json!({"name": "n", "subject": "s", "description": long(70_000)});
    let r = app.post("/v1/api_keys", huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(clerk_code(&r.body), "payload_too_large");
    let (id, _) = app.create_key("s", &[]).await;
    let r = app
        .post(
            &format!("/v1/api_keys/{id}/revoke"),
            json!({ "revocation_reason": long(513) }),
        )
        .await;
    assert_eq!(clerk_field(&r.body), Some("revocation_reason"));
    let r = app.verify("x", &["*"]).await;
    assert_eq!(
        (r.status, clerk_field(&r.body)),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("required_scopes"))
    );
}

#[tokio::test]
async fn unknown_ids_routes_methods_and_parameters() {
    let app = TestApp::start().await;
    for id in [
        "key_00000000000000000000",
        "nope",
        "..%2F..%2Fetc%2Fpasswd",
        "key_1'%20OR%20'1'='1",
        "%00",
    ] {
        for (method, path) in [
            (Method::GET, format!("/v1/api_keys/{id}")),
            (Method::PATCH, format!("/v1/api_keys/{id}")),
            (Method::POST, format!("/v1/api_keys/{id}/revoke")),
        ] {
            let r = app.call(method.clone(), &path, Some(json!({}))).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(clerk_code(&r.body), "resource_not_found");
        }
    }
    let r = app.get("/v1/nothing-here").await;
    assert_eq!(
        (r.status, clerk_code(&r.body)),
        (StatusCode::NOT_FOUND, "resource_not_found")
    );
    let r = app.call(Method::PUT, "/v1/api_keys", Some(json!({}))).await;
    assert_eq!(
        (r.status, clerk_code(&r.body)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let r = app
        .call(Method::DELETE, "/backend.api-keys.create", None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    for query in [
        "limit=0",
        "limit=501",
        "limit=ten",
        "offset=-1",
        "revoked=maybe",
        "last_used_before=yesterday",
        "colour=red",
        "claims[a.b]=x",
    ] {
        let r = app.get(&format!("/v1/api_keys?{query}")).await;
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {}",
            r.status
        );
        assert!(r.body["errors"][0]["message"].is_string(), "{query}");
    }
    // Up to 16 metadata filters (`claims[…]` and the tutorial's `metadata[…]` together); the
    // 17th is refused, named.
    let filters = |n: usize| {
        (0..n)
            .map(|i| {
                let prefix = if i % 2 == 0 { "claims" } else { "metadata" };
                format!("{prefix}[f{i}]=x")
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    let r = app.get(&format!("/v1/api_keys?{}", filters(16))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.get(&format!("/v1/api_keys?{}", filters(17))).await;
    assert_eq!(
        (r.status, clerk_code(&r.body), clerk_field(&r.body)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            Some("claims[f16]")
        ),
        "{}",
        r.body
    );
    let r = app
        .patch(
            "/backend.api-keys.update",
            json!({ "key_id": "../../x", "name": "n" }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("key_id"))
    );
}

#[tokio::test]
async fn secrets_are_never_shown_again() {
    let app = TestApp::start().await;
    let (id, secret) = app.create_key("acme", &[]).await;
    for path in [
        format!("/api_keys/{id}/secret"),
        format!("/v1/api_keys/{id}/secret"),
    ] {
        let r = app.get(&path).await;
        assert_eq!(
            (r.status, clerk_code(&r.body)),
            (StatusCode::NOT_FOUND, "secret_not_stored"),
            "{path}"
        );
        assert!(!r.body.to_string().contains(&secret));
    }
    assert_eq!(
        app.verify(&secret, &[]).await.status,
        StatusCode::OK,
        "the key still works"
    );
}

/// `origin --help` lists every environment variable origin reads; a usage error says what is
/// wrong and exits 2.
#[test]
fn help_lists_every_variable_and_a_usage_error_exits_2() {
    let run = |args: &[&str]| {
        std::process::Command::new(common::origin_binary())
            .args(args)
            .output()
            .expect("origin runs")
    };
    let help = run(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    // README.md's configuration table, which a unit test holds against the variables read.
    let readme = include_str!("../../README.md");
    let table = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a Configuration section");
    let names: Vec<&str> = table
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|line| line.split('`').next())
        .collect();
    assert!(names.len() > 40, "{names:?}");
    for name in names {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    for command in ["serve", "audit", "routes", "sync", "webhook-secrets"] {
        assert!(text.contains(command), "{command} missing:\n{text}");
    }
    for bad in [&["bogus"][..], &["sync"], &["audit"], &["serve", "--extra"]] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Usage: origin"),
            "{bad:?}"
        );
    }
}
