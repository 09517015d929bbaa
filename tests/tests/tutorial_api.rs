//! The tutorial's five calls, at its exact paths and with its exact shapes.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

fn is_iso(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 24 && s.ends_with('Z') && &s[10..11] == "T")
}

#[tokio::test]
async fn the_five_calls_with_the_tutorials_shapes() {
    let app = TestApp::start().await;

    // Step 1: create.
    let created = app
        .post(
            "/backend.api-keys.create",
            json!({
                "name": "partner-acme-corp-integration",
                "scopes": ["read:orders", "read:customers", "write:webhooks"],
                "metadata": {"partner_id": "acme-corp", "created_at": "2024-01-15T10:30:00.000Z"}
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    assert_eq!(
        keys(&created.body),
        [
            "created_at",
            "expires_at",
            "id",
            "key",
            "metadata",
            "name",
            "scopes"
        ]
    );
    let id = created.body["id"].as_str().expect("id").to_owned();
    let key = created.body["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("sk_live_"));
    assert!(
        is_iso(&created.body["created_at"]),
        "{}",
        created.body["created_at"]
    );
    assert_eq!(created.body["metadata"]["partner_id"], "acme-corp");
    assert_eq!(created.body["name"], "partner-acme-corp-integration");
    // The tutorial's own answer: the scopes in the order given, not re-sorted.
    let given = json!(["read:orders", "read:customers", "write:webhooks"]);
    assert_eq!(created.body["scopes"], given);

    // Step 2: verify.
    let verified = app
        .post("/backend.api-keys.verify", json!({ "key": key }))
        .await;
    assert_eq!(verified.status, StatusCode::OK);
    assert_eq!(verified.body["valid"], true);
    assert_eq!(verified.body["code"], "VALID");
    assert_eq!(verified.body["revoked"], false);
    assert_eq!(verified.body["id"], id.as_str());
    assert_eq!(verified.body["scopes"], given);
    assert!(is_iso(&verified.body["created_at"]) && is_iso(&verified.body["last_used_at"]));

    // Step 3: list.
    let listed = app.get("/backend.api-keys.list?limit=50").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(
        keys(&listed.body),
        ["data", "page", "page_size", "total_count"]
    );
    assert_eq!(
        (
            listed.body["total_count"].as_u64(),
            listed.body["page"].as_u64(),
            listed.body["page_size"].as_u64()
        ),
        (Some(1), Some(1), Some(50))
    );
    let item = &listed.body["data"][0];
    for field in [
        "id",
        "name",
        "scopes",
        "created_at",
        "last_used_at",
        "revoked",
        "metadata",
    ] {
        assert!(item.get(field).is_some(), "list item has {field}");
    }
    assert!(
        is_iso(&item["last_used_at"]),
        "verify moved last_used_at: {item}"
    );
    assert_eq!(item["metadata"]["partner_id"], "acme-corp");

    // Step 5 (before 4, as a key can't change once revoked): update.
    let updated = app
        .patch(
            "/backend.api-keys.update",
            json!({
                "key_id": id,
                "scopes": ["read:orders", "read:customers"],
                "metadata": {"partner_id": "acme-corp", "reason": "security-review"}
            }),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{:?}", updated.body);
    assert_eq!(
        keys(&updated.body),
        ["id", "metadata", "name", "scopes", "updated_at"]
    );
    assert_eq!(
        updated.body["scopes"],
        json!(["read:orders", "read:customers"])
    );
    let repeated = app
        .patch(
            "/backend.api-keys.update",
            json!({ "key_id": id, "scopes": ["read:orders", "read:orders"] }),
        )
        .await;
    assert_eq!(
        repeated.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        repeated.body
    );
    assert_eq!(updated.body["metadata"]["reason"], "security-review");
    assert!(is_iso(&updated.body["updated_at"]));
    let narrowed = app
        .post(
            "/backend.api-keys.verify",
            json!({ "key": key, "required_scopes": ["write:webhooks"] }),
        )
        .await;
    assert_eq!(
        (
            narrowed.body["valid"].as_bool(),
            narrowed.body["code"].as_str()
        ),
        (Some(false), Some("INSUFFICIENT_SCOPE"))
    );
    assert_eq!(narrowed.body["missing_scopes"], json!(["write:webhooks"]));

    // Step 4: revoke.
    let revoked = app
        .delete("/backend.api-keys.revoke", json!({ "key_id": id }))
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(
        keys(&revoked.body),
        ["id", "revoked", "revoked_at", "success"]
    );
    assert_eq!(
        (
            revoked.body["revoked"].as_bool(),
            revoked.body["success"].as_bool()
        ),
        (Some(true), Some(true))
    );
    assert!(is_iso(&revoked.body["revoked_at"]));
    let again = app
        .delete("/backend.api-keys.revoke", json!({ "key_id": id }))
        .await;
    assert_eq!(
        again.body["revoked_at"], revoked.body["revoked_at"],
        "first revoked_at is kept"
    );

    let after = app
        .post("/backend.api-keys.verify", json!({ "key": key }))
        .await;
    assert_eq!(
        after.status,
        StatusCode::OK,
        "a bad key is still a 200 on this surface"
    );
    assert_eq!(
        (
            after.body["valid"].as_bool(),
            after.body["revoked"].as_bool(),
            after.body["code"].as_str()
        ),
        (Some(false), Some(true), Some("REVOKED"))
    );
    assert_eq!(
        app.get("/backend.api-keys.list?limit=50").await.body["data"][0]["revoked"],
        true,
        "revoked keys stay listed"
    );
}

#[tokio::test]
async fn an_ip_allowlist_on_the_tutorials_calls() {
    let app = TestApp::start().await;
    let created = app
        .post(
            "/backend.api-keys.create",
            json!({ "name": "n", "scopes": ["read:orders"], "allowed_ips": ["203.0.113.0/24"] }),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    assert_eq!(created.body["allowed_ips"], json!(["203.0.113.0/24"]));
    let id = created.body["id"].as_str().expect("id").to_owned();
    let key = created.body["key"].as_str().expect("key").to_owned();
    let verify = |client: Value| {
        app.post(
            "/backend.api-keys.verify",
            json!({ "key": key, "client_ip": client }),
        )
    };
    let inside = verify(json!("203.0.113.1")).await;
    assert_eq!(inside.body["code"], "VALID", "{:?}", inside.body);
    let outside = verify(json!("198.51.100.1")).await;
    assert_eq!(outside.body["code"], "IP_NOT_ALLOWED", "{:?}", outside.body);
    assert_eq!(
        outside.body["id"],
        Value::Null,
        "reported as good as unknown"
    );
    assert_eq!(outside.body["created_at"], Value::Null);
    let unknown = verify(Value::Null).await;
    assert_eq!(unknown.body["code"], "IP_NOT_ALLOWED");
    let listed = app.get("/backend.api-keys.list").await;
    assert_eq!(
        listed.body["data"][0]["allowed_ips"],
        json!(["203.0.113.0/24"])
    );
    let kept = app
        .patch(
            "/backend.api-keys.update",
            json!({ "key_id": id, "allowed_ips": null }),
        )
        .await;
    assert_eq!(kept.status, StatusCode::OK, "{:?}", kept.body);
    assert_eq!(
        verify(Value::Null).await.body["code"],
        "IP_NOT_ALLOWED",
        "null changes nothing"
    );
    let lifted = app
        .patch(
            "/backend.api-keys.update",
            json!({ "key_id": id, "allowed_ips": [] }),
        )
        .await;
    assert_eq!(lifted.status, StatusCode::OK, "{:?}", lifted.body);
    assert_eq!(
        keys(&lifted.body),
        ["id", "metadata", "name", "scopes", "updated_at"],
        "without a list, the tutorial's shape"
    );
    assert_eq!(verify(Value::Null).await.body["code"], "VALID");
}

#[tokio::test]
async fn verify_reason_codes_for_bad_keys() {
    let app = TestApp::start().await;
    for (presented, code) in [
        ("garbage", "MALFORMED"),
        ("", "MALFORMED"),
        (
            "sk_live_0123456789012345678901234567890123456789",
            "MALFORMED",
        ),
    ] {
        let r = app
            .post("/backend.api-keys.verify", json!({ "key": presented }))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            (
                r.body["valid"].as_bool(),
                r.body["code"].as_str(),
                r.body["id"].clone()
            ),
            (Some(false), Some(code), Value::Null)
        );
    }
    let unknown = latchkey_shared::ApiKey::generate(
        &latchkey_shared::KeyPrefix::default(),
        &mut |b: &mut [u8]| b.fill(9),
    );
    let r = app
        .post(
            "/backend.api-keys.verify",
            json!({ "key": unknown.expose() }),
        )
        .await;
    assert_eq!(r.body["code"], "NOT_FOUND");
}

#[tokio::test]
async fn list_pages_and_filters_by_metadata() {
    let app = TestApp::start().await;
    for i in 0..3 {
        let partner = if i == 0 { "globex" } else { "acme-corp" };
        let r = app
            .post("/backend.api-keys.create", json!({ "name": format!("k{i}"), "scopes": ["read:orders"], "metadata": {"partner_id": partner} }))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let page2 = app.get("/backend.api-keys.list?limit=2&page=2").await;
    assert_eq!(
        (
            page2.body["page"].as_u64(),
            page2.body["page_size"].as_u64(),
            page2.body["total_count"].as_u64()
        ),
        (Some(2), Some(2), Some(3))
    );
    assert_eq!(page2.body["data"].as_array().map(Vec::len), Some(1));
    let acme = app
        .get("/backend.api-keys.list?metadata[partner_id]=acme-corp")
        .await;
    assert_eq!(acme.body["total_count"], 2);
    // The subject defaults to metadata.partner_id.
    assert_eq!(
        app.get("/backend.api-keys.list?subject=globex").await.body["total_count"],
        1
    );
}

#[tokio::test]
async fn roll_on_the_tutorials_surface() {
    let app = TestApp::start().await;
    let created = app
        .post(
            "/backend.api-keys.create",
            json!({
                "name": "acme", "scopes": ["read:orders", "write:orders"],
                "metadata": { "partner_id": "acme" }, "seconds_until_expiration": 86_400,
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    let old_id = created.body["id"].as_str().expect("id").to_owned();
    let old_key = created.body["key"].as_str().expect("key").to_owned();
    let rolled = app
        .post(
            "/backend.api-keys.roll",
            json!({ "key_id": old_id, "grace_period_seconds": 600 }),
        )
        .await;
    assert_eq!(rolled.status, StatusCode::OK, "{:?}", rolled.body);
    assert_eq!(
        keys(&rolled.body),
        [
            "created_at",
            "expires_at",
            "id",
            "key",
            "metadata",
            "name",
            "previous",
            "rolled_from",
            "scopes"
        ],
        "create's shape, the link and what became of the old key"
    );
    for field in ["name", "scopes", "metadata", "expires_at"] {
        assert_eq!(rolled.body[field], created.body[field], "{field} is copied");
    }
    assert_eq!(rolled.body["rolled_from"], json!(old_id));
    assert_eq!(rolled.body["previous"]["id"], json!(old_id));
    assert_eq!(rolled.body["previous"]["revoked"], false);
    assert!(is_iso(&rolled.body["previous"]["expires_at"]));
    assert!(
        rolled.body["previous"]["expires_at"].as_str() < created.body["expires_at"].as_str(),
        "the grace period ends before the old key's own expiry"
    );
    let new_id = rolled.body["id"].as_str().expect("id").to_owned();
    let new_key = rolled.body["key"].as_str().expect("key").to_owned();
    for key in [&old_key, &new_key] {
        let r = app
            .post("/backend.api-keys.verify", json!({ "key": key }))
            .await;
        assert_eq!(r.body["code"], "VALID", "{:?}", r.body);
    }
    let listed = app.get("/backend.api-keys.list").await;
    let data = listed.body["data"].as_array().expect("data");
    let find = |id: &str| data.iter().find(|k| k["id"] == id).expect("listed").clone();
    assert_eq!(find(&old_id)["rolled_to"], json!(new_id));
    assert_eq!(find(&new_id)["rolled_from"], json!(old_id));

    let again = app
        .post(
            "/backend.api-keys.roll",
            json!({ "key_id": old_id, "grace_period_seconds": 0 }),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.body);
    assert_eq!(again.body["success"], false);
    assert_eq!(again.body["error"]["code"], "api_key_already_rolled");
    let bad = app
        .post(
            "/backend.api-keys.roll",
            json!({ "key_id": new_id, "grace_period_seconds": -5 }),
        )
        .await;
    assert_eq!(
        bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        bad.body
    );
    assert_eq!(bad.body["error"]["field"], "grace_period_seconds");

    let now = app
        .post(
            "/backend.api-keys.roll",
            json!({ "key_id": new_id, "grace_period_seconds": 0 }),
        )
        .await;
    assert_eq!(now.body["previous"]["revoked"], true, "{:?}", now.body);
    assert!(is_iso(&now.body["previous"]["revoked_at"]));
    let r = app
        .post("/backend.api-keys.verify", json!({ "key": new_key }))
        .await;
    assert_eq!(r.body["code"], "REVOKED", "{:?}", r.body);
}

#[tokio::test]
async fn tutorial_errors_use_its_envelope() {
    let app = TestApp::start().await;
    let r = app
        .delete(
            "/backend.api-keys.revoke",
            json!({ "key_id": "key_00000000000000000000" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["success"], false);
    assert_eq!(r.body["error"]["code"], "resource_not_found");
    let r = app
        .post(
            "/backend.api-keys.create",
            json!({ "name": "x", "scopes": ["read:orders"], "metadata": [1] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["field"], "metadata");
    let r = TestApp::send(
        app.request(reqwest::Method::POST, "/backend.api-keys.create")
            .json(&json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["success"], false);
}
