//! The primary REST API (`/v1/api_keys`, Clerk-compatible) against the real origin binary.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::time::Duration;

use common::{TestApp, eventually};
use latchkey_shared::ApiKey;
use reqwest::StatusCode;
use serde_json::{Value, json};

const KEY_OBJECT_FIELDS: &[&str] = &[
    "object",
    "id",
    "type",
    "name",
    "subject",
    "description",
    "scopes",
    "claims",
    "revoked",
    "revocation_reason",
    "disabled",
    "allowed_ips",
    "rolled_from",
    "rolled_to",
    "leaked_at",
    "leak_source",
    "expired",
    "expiration",
    "created_by",
    "last_used_at",
    "created_at",
    "updated_at",
];

fn assert_key_object(body: &Value, with_secret: bool) {
    let obj = body.as_object().expect("object");
    let mut expected: Vec<&str> = KEY_OBJECT_FIELDS.to_vec();
    if with_secret {
        expected.push("secret");
    }
    let mut got: Vec<&str> = obj.keys().map(String::as_str).collect();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "key object fields");
    assert_eq!(body["object"], "api_key");
    assert_eq!(body["type"], "api_key");
    assert!(
        body["created_at"].as_i64().expect("ms") > 1_600_000_000_000,
        "times are unix ms"
    );
}

#[tokio::test]
async fn create_get_verify_update_revoke_round_trip() {
    let app = TestApp::start().await;
    let created = app
        .post(
            "/v1/api_keys",
            json!({
                "name": "partner-acme-corp-integration",
                "subject": "acme-corp",
                "description": "orders sync",
                "scopes": ["write:webhooks", "read:orders", "read:customers"],
                "claims": {"partner_id": "acme-corp", "tier": 2},
                "created_by": "user_123",
                "seconds_until_expiration": 3600
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_key_object(&created.body, true);
    let body = &created.body;
    let id = body["id"].as_str().expect("id");
    let secret = body["secret"].as_str().expect("secret");
    assert!(id.starts_with("key_"));
    assert!(secret.starts_with("sk_live_"));
    assert!(
        ApiKey::parse(secret).is_ok(),
        "the secret follows the documented format"
    );
    assert_eq!(
        body["scopes"],
        json!(["write:webhooks", "read:orders", "read:customers"]),
        "in the order given"
    );
    assert_eq!(
        body["claims"],
        json!({"partner_id": "acme-corp", "tier": 2})
    );
    assert_eq!(body["created_by"], "user_123");
    assert_eq!(body["description"], "orders sync");
    assert_eq!(body["revoked"], false);
    assert_eq!(body["expired"], false);
    assert_eq!(body["last_used_at"], Value::Null);
    let expiration = body["expiration"].as_i64().expect("expiration");
    let created_at = body["created_at"].as_i64().expect("created_at");
    assert_eq!(expiration - created_at, 3_600_000);

    // The SDK's paths without `/v1` reach the same API.
    for path in [format!("/v1/api_keys/{id}"), format!("/api_keys/{id}")] {
        let got = app.get(&path).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_key_object(&got.body, false);
        assert_eq!(got.body["id"], id);
    }

    let verified = app.verify(secret, &[]).await;
    assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
    assert_key_object(&verified.body, false);
    assert_eq!(verified.body["id"], id);
    let last_used = verified.body["last_used_at"]
        .as_i64()
        .expect("verify moves last_used_at");
    assert!(last_used >= created_at);
    assert_eq!(
        app.get(&format!("/v1/api_keys/{id}")).await.body["last_used_at"],
        last_used
    );

    // Narrow the scopes: same secret, fewer scopes.
    let narrowed = app
        .patch(
            &format!("/v1/api_keys/{id}"),
            json!({ "scopes": ["read:orders"] }),
        )
        .await;
    assert_eq!(narrowed.status, StatusCode::OK, "{:?}", narrowed.body);
    assert_eq!(narrowed.body["scopes"], json!(["read:orders"]));
    assert!(narrowed.body["updated_at"].as_i64() >= Some(created_at));
    let ok = app.verify(secret, &["read:orders"]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let denied = app.verify(secret, &["write:webhooks"]).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(
        denied.body["errors"][0]["code"],
        "api_key_insufficient_scope"
    );

    let revoked = app
        .post(
            &format!("/v1/api_keys/{id}/revoke"),
            json!({ "revocation_reason": "leaked" }),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(revoked.body["revoked"], true);
    assert_eq!(revoked.body["revocation_reason"], "leaked");
    let gone = app.verify(secret, &[]).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.body["errors"][0]["code"], "api_key_revoked");
}

#[tokio::test]
async fn update_changes_each_field_null_changes_nothing_and_empty_values_clear() {
    let app = TestApp::start().await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;
    let path = format!("/api_keys/{id}");
    let r = app
        .patch(
            &path,
            json!({
                "name": "renamed", "subject": "acme", "description": "d",
                "claims": {"partner_id": "acme"}, "scopes": ["read:orders", "read:invoices"],
                "seconds_until_expiration": 60
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["name"], "renamed");
    assert_eq!(r.body["description"], "d");
    assert_eq!(r.body["claims"], json!({"partner_id": "acme"}));
    assert_eq!(r.body["scopes"], json!(["read:orders", "read:invoices"]));
    assert!(r.body["expiration"].as_i64().is_some());
    let repeated = app
        .patch(
            &path,
            json!({"scopes": ["read:orders", "read:invoices", "read:orders"]}),
        )
        .await;
    assert_eq!(
        repeated.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        repeated.body
    );
    assert!(
        repeated.body.to_string().contains("more than once"),
        "{:?}",
        repeated.body
    );

    // One rule for every field: null is "not given". Before, `allowed_ips: null` and an expiry
    // of null lifted the restriction while `disabled: null` changed nothing.
    let before = app.get(&path).await.body;
    let untouched = app
        .patch(
            &path,
            json!({
                "name": null, "subject": null, "description": null, "scopes": null,
                "claims": null, "seconds_until_expiration": null, "expiration": null,
                "disabled": null, "allowed_ips": null
            }),
        )
        .await;
    assert_eq!(untouched.status, StatusCode::OK, "{:?}", untouched.body);
    for field in [
        "name",
        "subject",
        "description",
        "scopes",
        "claims",
        "expiration",
        "disabled",
        "allowed_ips",
    ] {
        assert_eq!(untouched.body[field], before[field], "null changed {field}");
    }

    // On create and verify too: null is the default (before, a list field given null was
    // refused).
    let created = app
        .post(
            "/v1/api_keys",
            json!({
                "name": "n", "subject": "acme", "scopes": null, "allowed_ips": null,
                "claims": null, "description": null, "seconds_until_expiration": null
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["scopes"], json!([]), "{:?}", created.body);
    assert_eq!(created.body["expiration"], Value::Null);
    let verified = app
        .post(
            "/v1/api_keys/verify",
            json!({ "secret": created.body["secret"], "required_scopes": null }),
        )
        .await;
    assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
    let tutorial = app
        .post(
            "/backend.api-keys.verify",
            json!({ "key": secret, "required_scopes": null }),
        )
        .await;
    assert_eq!(tutorial.body["valid"], true, "{:?}", tutorial.body);

    let cleared = app
        .patch(
            &path,
            json!({ "description": "", "claims": {}, "seconds_until_expiration": "never" }),
        )
        .await;
    assert_eq!(cleared.status, StatusCode::OK, "{:?}", cleared.body);
    assert_eq!(cleared.body["description"], Value::Null);
    assert_eq!(cleared.body["claims"], Value::Null);
    assert_eq!(cleared.body["expiration"], Value::Null);
    assert_eq!(
        cleared.body["name"], "renamed",
        "absent fields are left alone"
    );

    let at = cleared.body["updated_at"].as_i64().expect("ms") + 120_000;
    let absolute = app.patch(&path, json!({ "expiration": at })).await;
    assert_eq!(absolute.body["expiration"], at);

    // The secret is unchanged by updates.
    assert_eq!(app.verify(&secret, &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn revoking_is_final_and_idempotent() {
    let app = TestApp::start().await;
    let (id, _) = app.create_key("acme", &["read:orders"]).await;
    let first = app
        .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let revoked_at = first.body["updated_at"].clone();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // Clerk's SDK posts `{"revocation_reason": null}`; an empty body works too.
    let again = app
        .post(
            &format!("/v1/api_keys/{id}/revoke"),
            json!({ "revocation_reason": null }),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(
        again.body["updated_at"], revoked_at,
        "the second revoke changes nothing"
    );
    let empty = TestApp::send(
        app.request(reqwest::Method::POST, &format!("/v1/api_keys/{id}/revoke"))
            .bearer_auth(common::ADMIN_TOKEN),
    )
    .await;
    assert_eq!(empty.status, StatusCode::OK);

    let update = app
        .patch(
            &format!("/v1/api_keys/{id}"),
            json!({ "scopes": ["read:orders"] }),
        )
        .await;
    assert_eq!(update.status, StatusCode::CONFLICT);
    assert_eq!(update.body["errors"][0]["code"], "api_key_revoked");

    // Exactly one revoke entry in the audit log.
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    let actions: Vec<&str> = audit.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["create", "revoke"]);
}

#[tokio::test]
async fn disabling_is_reversible_audited_and_distinct_from_revocation() {
    let app = TestApp::start().await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;
    let path = format!("/v1/api_keys/{id}");
    let created = app.get(&path).await;
    assert_eq!(created.body["disabled"], false, "{:?}", created.body);

    let off = app.patch(&path, json!({ "disabled": true })).await;
    assert_eq!(off.status, StatusCode::OK, "{:?}", off.body);
    assert_eq!(off.body["disabled"], true);
    assert_eq!(off.body["revoked"], false, "disabling is not revoking");
    let r = app.verify(&secret, &[]).await;
    assert_eq!(
        (r.status, r.body["errors"][0]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("api_key_disabled")),
        "{:?}",
        r.body
    );
    let tutorial = app
        .post("/backend.api-keys.verify", json!({ "key": secret }))
        .await;
    assert_eq!(tutorial.body["code"], "DISABLED", "{:?}", tutorial.body);
    assert_eq!(tutorial.body["valid"], false);
    let listed = app.get("/backend.api-keys.list").await;
    assert_eq!(
        listed.body["data"][0]["disabled"], true,
        "{:?}",
        listed.body
    );

    // Other changes go on while it is off; switching it on again restores it as it is now.
    let narrowed = app
        .patch(&path, json!({ "scopes": ["read:orders", "read:invoices"] }))
        .await;
    assert_eq!(narrowed.body["disabled"], true, "an update leaves it off");
    let on = app.patch(&path, json!({ "disabled": false })).await;
    assert_eq!(on.body["disabled"], false);
    let r = app.verify(&secret, &["read:invoices"]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let listed = app.get("/backend.api-keys.list").await;
    assert!(
        listed.body["data"][0].get("disabled").is_none(),
        "{:?}",
        listed.body
    );

    // Revoked, it cannot be switched on (or off): revocation stays final.
    app.post(&format!("{path}/revoke"), json!({})).await;
    let again = app.patch(&path, json!({ "disabled": false })).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.body);
    let bad = app.patch(&path, json!({ "disabled": "yes" })).await;
    assert_eq!(
        bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        bad.body
    );

    // Each switch is an audited update naming the change.
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    let switches: Vec<&Value> = audit.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|e| e["details"]["changes"].get("disabled"))
        .collect();
    assert_eq!(
        switches,
        [
            &json!({ "from": false, "to": true }),
            &json!({ "from": true, "to": false })
        ]
    );
}

/// The error code of a Clerk-envelope answer.
fn code(body: &Value) -> &str {
    body["errors"][0]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn rolling_issues_a_linked_key_and_ends_the_old_one_after_its_grace_period() {
    let app = TestApp::start().await;
    let created = app
        .post(
            "/v1/api_keys",
            json!({
                "name": "acme prod", "subject": "acme", "description": "d",
                "scopes": ["write:orders", "read:orders"], "claims": {"tier": "gold"},
                "seconds_until_expiration": 86_400, "created_by": "ops",
                "allowed_ips": ["10.0.0.0/8"],
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let old_id = created.body["id"].as_str().expect("id").to_owned();
    let old_secret = created.body["secret"].as_str().expect("secret").to_owned();
    let verify = |secret: String| {
        let app = &app;
        async move {
            app.post(
                "/v1/api_keys/verify",
                json!({ "secret": secret, "client_ip": "10.1.2.3" }),
            )
            .await
        }
    };

    // Roll with an hour's grace: a new key with the same settings, linked both ways.
    let before = common::now_ms();
    let rolled = app
        .post(
            &format!("/v1/api_keys/{old_id}/roll"),
            json!({ "grace_period_seconds": 3600 }),
        )
        .await;
    assert_eq!(rolled.status, StatusCode::CREATED, "{}", rolled.body);
    let mut new = rolled.body.clone();
    let previous = new
        .as_object_mut()
        .and_then(|o| o.remove("previous"))
        .expect("previous");
    assert_key_object(&new, true);
    assert_key_object(&previous, false);
    let new_id = new["id"].as_str().expect("id").to_owned();
    let new_secret = new["secret"].as_str().expect("secret").to_owned();
    assert_ne!(new_id, old_id);
    assert_ne!(new_secret, old_secret);
    for field in [
        "name",
        "subject",
        "description",
        "scopes",
        "claims",
        "created_by",
        "allowed_ips",
        "expiration",
        "disabled",
    ] {
        assert_eq!(new[field], created.body[field], "{field} is copied");
    }
    assert_eq!(new["rolled_from"], json!(old_id));
    assert_eq!(new["rolled_to"], Value::Null);
    assert_eq!(previous["id"], json!(old_id));
    assert_eq!(previous["rolled_to"], json!(new_id));
    assert_eq!(previous["revoked"], false);
    let grace_ends = previous["expiration"].as_i64().expect("expiration");
    assert!(
        (before + 3_600_000..=common::now_ms() + 3_600_000).contains(&grace_ends),
        "the grace period is the old key's expiry: {grace_ends}"
    );
    assert_eq!(
        app.get(&format!("/v1/api_keys/{old_id}")).await.body,
        previous
    );
    // Both work during the grace period.
    for secret in [&old_secret, &new_secret] {
        let r = verify(secret.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    // A key is rolled once; its grace period does not move.
    let again = app
        .post(
            &format!("/v1/api_keys/{old_id}/roll"),
            json!({ "grace_period_seconds": 60 }),
        )
        .await;
    assert_eq!(
        (again.status, code(&again.body)),
        (StatusCode::CONFLICT, "api_key_already_rolled"),
        "{}",
        again.body
    );
    assert!(
        again.body.to_string().contains(&new_id),
        "names the successor"
    );
    let extend = app
        .patch(
            &format!("/v1/api_keys/{old_id}"),
            json!({ "seconds_until_expiration": 864_000 }),
        )
        .await;
    assert_eq!(
        extend.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        extend.body
    );

    // Rolling the successor with no grace revokes it at once, naming its own successor; the
    // new key may be given its own lifetime.
    let third = app
        .post(
            &format!("/v1/api_keys/{new_id}/roll"),
            json!({ "grace_period_seconds": 0, "seconds_until_expiration": "never" }),
        )
        .await;
    assert_eq!(third.status, StatusCode::CREATED, "{}", third.body);
    let third_id = third.body["id"].as_str().expect("id").to_owned();
    let third_secret = third.body["secret"].as_str().expect("secret").to_owned();
    assert_eq!(third.body["expiration"], Value::Null, "never expires");
    assert_eq!(third.body["previous"]["revoked"], true);
    assert_eq!(
        third.body["previous"]["revocation_reason"],
        json!(format!("rolled: replaced by {third_id}"))
    );
    let r = verify(new_secret.clone()).await;
    assert_eq!(code(&r.body), "api_key_revoked", "{}", r.body);
    let r = verify(third_secret.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // A short grace period ends: the old secret then fails as expired.
    let fourth = app
        .post(
            &format!("/v1/api_keys/{third_id}/roll"),
            json!({ "grace_period_seconds": 1 }),
        )
        .await;
    assert_eq!(fourth.status, StatusCode::CREATED, "{}", fourth.body);
    eventually(Duration::from_secs(10), || async {
        let r = verify(third_secret.clone()).await;
        (code(&r.body) == "api_key_expired")
            .then_some(())
            .ok_or_else(|| r.body.to_string())
    })
    .await;
    let expired = app
        .post(
            &format!(
                "/v1/api_keys/{}/roll",
                fourth.body["id"].as_str().expect("id")
            ),
            json!({ "grace_period_seconds": 0 }),
        )
        .await;
    assert_eq!(
        expired.status,
        StatusCode::CREATED,
        "the newest key rolls: {}",
        expired.body
    );

    // Both keys' audit entries say what happened.
    let audit = app.get(&format!("/v1/audit_log?key_id={old_id}")).await;
    let roll = audit.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|e| e["action"] == "roll")
        .expect("a roll entry");
    assert_eq!(roll["details"]["rolled_to"], json!(new_id));
    assert_eq!(roll["details"]["grace_period_seconds"], 3600);
    assert_eq!(roll["details"]["expiration"]["to"], json!(grace_ends));
    let audit = app.get(&format!("/v1/audit_log?key_id={new_id}")).await;
    assert_eq!(audit.body["data"][0]["action"], "create");
    assert_eq!(
        audit.body["data"][0]["details"]["rolled_from"],
        json!(old_id)
    );
}

#[tokio::test]
async fn a_roll_that_cannot_be_done_is_refused_and_changes_nothing() {
    let app = TestApp::start().await;
    let (id, _) = app.create_key("acme", &[]).await;
    let path = format!("/v1/api_keys/{id}/roll");
    for (body, field) in [
        (json!({}), "grace_period_seconds"),
        (
            json!({ "grace_period_seconds": -1 }),
            "grace_period_seconds",
        ),
        (
            json!({ "grace_period_seconds": 90 * 86_400 + 1 }),
            "grace_period_seconds",
        ),
        (
            json!({ "grace_period_seconds": "60" }),
            "grace_period_seconds",
        ),
        (
            json!({ "grace_period_seconds": 60, "scopes": [] }),
            "scopes",
        ),
        (
            json!({ "grace_period_seconds": 60, "seconds_until_expiration": 0 }),
            "seconds_until_expiration",
        ),
    ] {
        let r = app.post(&path, body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            r.body
        );
        assert!(r.body.to_string().contains(field), "{body}: {}", r.body);
    }
    let r = app
        .post(
            "/v1/api_keys/key_nosuchkey00000000000/roll",
            json!({ "grace_period_seconds": 0 }),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    let expiring = app
        .post(
            "/v1/api_keys",
            json!({ "name": "short", "subject": "acme", "seconds_until_expiration": 1 }),
        )
        .await;
    let expiring = expiring.body["id"].as_str().expect("id").to_owned();
    app.post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
        .await;
    let r = app.post(&path, json!({ "grace_period_seconds": 0 })).await;
    assert_eq!(
        (r.status, code(&r.body)),
        (StatusCode::CONFLICT, "api_key_revoked"),
        "{}",
        r.body
    );
    eventually(Duration::from_secs(10), || async {
        let r = app.get(&format!("/v1/api_keys/{expiring}")).await;
        (r.body["expired"] == true)
            .then_some(())
            .ok_or_else(|| r.body.to_string())
    })
    .await;
    let r = app
        .post(
            &format!("/v1/api_keys/{expiring}/roll"),
            json!({ "grace_period_seconds": 0 }),
        )
        .await;
    assert_eq!(
        (r.status, code(&r.body)),
        (StatusCode::CONFLICT, "api_key_expired"),
        "{}",
        r.body
    );
    // Nothing was created by any of it.
    let all = app.get("/v1/api_keys?include_invalid=true").await;
    assert_eq!(all.body["total_count"], 2, "{}", all.body);
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    assert!(
        audit.body["data"]
            .as_array()
            .expect("data")
            .iter()
            .all(|e| e["action"] != "roll"),
        "{}",
        audit.body
    );
}

#[tokio::test]
async fn an_ip_allowlist_admits_only_its_addresses() {
    let app = TestApp::start().await;
    let created = app
        .post(
            "/v1/api_keys",
            json!({ "name": "n", "subject": "acme", "scopes": ["read:orders"],
                    "allowed_ips": ["203.0.113.0/24", "2001:DB8::/32"] }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(
        created.body["allowed_ips"],
        json!(["203.0.113.0/24", "2001:db8::/32"])
    );
    let id = created.body["id"].as_str().expect("id").to_owned();
    let secret = created.body["secret"].as_str().expect("secret").to_owned();
    let verify = |client: Option<&str>| {
        let mut body = json!({ "secret": secret });
        if let Some(client) = client {
            body["client_ip"] = json!(client);
        }
        app.post("/v1/api_keys/verify", body)
    };
    let code = |r: &common::Reply| r.body["errors"][0]["code"].as_str().map(str::to_owned);
    assert_eq!(verify(Some("203.0.113.77")).await.status, StatusCode::OK);
    assert_eq!(verify(Some("2001:db8:1::5")).await.status, StatusCode::OK);
    for client in [Some("198.51.100.1"), Some("::1"), None] {
        let r = verify(client).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{client:?}: {:?}", r.body);
        assert_eq!(code(&r).as_deref(), Some("api_key_ip_not_allowed"));
        assert!(
            !r.body.to_string().contains("203.0.113"),
            "the list is not revealed"
        );
    }
    let bad = verify(Some("203.0.113.0/24")).await;
    assert_eq!(
        bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        bad.body
    );
    assert_eq!(bad.body["errors"][0]["meta"]["param_name"], "client_ip");

    // Bad lists are refused, naming the field; nothing changes.
    let path = format!("/v1/api_keys/{id}");
    let many: Vec<String> = (0..65).map(|i| format!("10.0.0.{i}")).collect();
    for list in [
        json!(["203.0.113.7/24"]),
        json!(["nope"]),
        json!(["10.0.0.1", "10.0.0.1"]),
        json!(many),
    ] {
        let r = app.patch(&path, json!({ "allowed_ips": list })).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{list}: {:?}",
            r.body
        );
        assert_eq!(
            r.body["errors"][0]["meta"]["param_name"], "allowed_ips",
            "{list}"
        );
    }
    // An entry in 240.0.0.0/4, where Cloudflare puts its pseudo-IPv4 stand-ins for IPv6
    // clients, would match unrelated clients: refused, and the answer says why.
    for list in [
        json!(["240.1.2.3"]),
        json!(["203.0.113.0/24", "250.0.0.0/8"]),
    ] {
        let r = app.patch(&path, json!({ "allowed_ips": list })).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{list}: {:?}",
            r.body
        );
        let error = &r.body["errors"][0];
        assert_eq!(error["meta"]["param_name"], "allowed_ips", "{list}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("240.0.0.0/4") && message.contains("Pseudo IPv4"),
            "{list}: the reason is named: {message}"
        );
    }
    // `null` changes nothing (before, it lifted the list); `[]` lifts it, and the change is
    // audited.
    let kept = app.patch(&path, json!({ "allowed_ips": null })).await;
    assert_eq!(
        kept.body["allowed_ips"],
        json!(["203.0.113.0/24", "2001:db8::/32"]),
        "{:?}",
        kept.body
    );
    assert_eq!(verify(None).await.status, StatusCode::FORBIDDEN);
    let lifted = app.patch(&path, json!({ "allowed_ips": [] })).await;
    assert_eq!(lifted.body["allowed_ips"], json!([]), "{:?}", lifted.body);
    assert_eq!(verify(None).await.status, StatusCode::OK);
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    let entries = audit.body["data"].as_array().expect("data");
    assert_eq!(
        entries[0]["details"]["allowed_ips"],
        json!(["203.0.113.0/24", "2001:db8::/32"])
    );
    assert_eq!(
        entries.last().expect("update")["details"]["changes"]["allowed_ips"],
        json!({ "from": ["203.0.113.0/24", "2001:db8::/32"], "to": [] })
    );
}

#[tokio::test]
async fn verify_answers_each_reason() {
    let app = TestApp::start().await;
    let (_, secret) = app.create_key("acme", &["read:orders"]).await;
    let expiring = app
        .post("/v1/api_keys", json!({ "name": "short", "subject": "acme", "scopes": [], "seconds_until_expiration": 1 }))
        .await;
    let expiring_secret = expiring.body["secret"].as_str().expect("secret").to_owned();

    // A well-formed key nobody issued, and the real one with one character changed.
    let unknown = ApiKey::generate(
        &latchkey_shared::KeyPrefix::default(),
        &mut |b: &mut [u8]| b.fill(7),
    );
    let mut typo = secret.clone().into_bytes();
    let i = typo.len() - 10;
    typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).expect("ascii");

    let cases = [
        (
            unknown.expose().to_owned(),
            StatusCode::NOT_FOUND,
            "api_key_not_found",
        ),
        (typo, StatusCode::NOT_FOUND, "api_key_malformed"),
        (
            "garbage".to_owned(),
            StatusCode::NOT_FOUND,
            "api_key_malformed",
        ),
        (
            "x".repeat(10_000),
            StatusCode::NOT_FOUND,
            "api_key_malformed",
        ),
    ];
    for (presented, status, code) in cases {
        let r = app.verify(&presented, &[]).await;
        assert_eq!(
            (r.status, r.body["errors"][0]["code"].as_str()),
            (status, Some(code))
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = app.verify(&expiring_secret, &[]).await;
    assert_eq!(
        (r.status, r.body["errors"][0]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("api_key_expired"))
    );
    let listed = app.get("/v1/api_keys?subject=acme&expired=true").await;
    assert_eq!(listed.body["total_count"], 1);
    assert_eq!(listed.body["data"][0]["expired"], true);
}

#[tokio::test]
async fn list_filters_and_paginates_newest_first() {
    let app = TestApp::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = app
            .post(
                "/v1/api_keys",
                json!({ "name": format!("k{i}"), "subject": "acme", "scopes": ["read:orders"],
                        "claims": {"partner_id": if i % 2 == 0 { "even" } else { "odd" }} }),
            )
            .await;
        ids.push(r.body["id"].as_str().expect("id").to_owned());
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let (other_id, other_secret) = app.create_key("globex", &["read:orders"]).await;

    let page = app.get("/v1/api_keys?subject=acme&limit=2&offset=1").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.body["total_count"], 5);
    let got: Vec<&str> = page.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|k| k["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        got,
        [ids[3].as_str(), ids[2].as_str()],
        "newest first, offset 1, limit 2"
    );

    assert_eq!(
        app.get("/v1/api_keys").await.body["total_count"],
        6,
        "no subject: all keys"
    );
    assert_eq!(
        app.get("/v1/api_keys?claims[partner_id]=even").await.body["total_count"],
        3
    );
    assert_eq!(
        app.get("/v1/api_keys?claims%5Bpartner_id%5D=odd&subject=acme")
            .await
            .body["total_count"],
        2
    );

    // Revoked keys are hidden unless asked for, as in Clerk.
    app.post(&format!("/v1/api_keys/{}/revoke", ids[0]), json!({}))
        .await;
    assert_eq!(
        app.get("/v1/api_keys?subject=acme").await.body["total_count"],
        4
    );
    assert_eq!(
        app.get("/v1/api_keys?subject=acme&include_invalid=true")
            .await
            .body["total_count"],
        5
    );
    assert_eq!(
        app.get("/v1/api_keys?subject=acme&revoked=true").await.body["total_count"],
        1
    );

    // Usage filters.
    assert_eq!(app.verify(&other_secret, &[]).await.status, StatusCode::OK);
    let never = app
        .get("/v1/api_keys?never_used=true&include_invalid=true")
        .await;
    assert_eq!(never.body["total_count"], 5);
    let far_future = "2100-01-01T00:00:00Z";
    let used = app
        .get(&format!("/v1/api_keys?last_used_before={far_future}"))
        .await;
    let used_ids: Vec<&str> = used.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|k| k["id"].as_str().expect("id"))
        .collect();
    assert_eq!(used_ids, [other_id.as_str()]);
    assert_eq!(
        app.get("/v1/api_keys?last_used_before=1000").await.body["total_count"],
        0
    );
}

#[tokio::test]
async fn scope_policy_wildcards_and_catalogue() {
    let strict = TestApp::builder()
        .env(
            "SCOPE_CATALOGUE",
            "read:orders,read:customers,write:webhooks",
        )
        .start()
        .await;
    let r = strict
        .post("/v1/api_keys", json!({ "name": "n", "subject": "s", "scopes": ["read:orders", "admin:all", "delete:everything"] }))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let message = r.body["errors"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("admin:all") && message.contains("delete:everything"),
        "{message}"
    );
    assert_eq!(r.body["errors"][0]["meta"]["param_name"], "scopes");
    let (id, _) = strict.create_key("s", &["read:orders"]).await;
    let widen = strict
        .patch(
            &format!("/v1/api_keys/{id}"),
            json!({ "scopes": ["read:orders", "admin:all"] }),
        )
        .await;
    assert_eq!(
        widen.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "update is checked too"
    );
    let wildcard = strict
        .post(
            "/v1/api_keys",
            json!({ "name": "n", "subject": "s", "scopes": ["read:*"] }),
        )
        .await;
    assert_eq!(
        wildcard.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "wildcards are off by default"
    );

    let open = TestApp::builder()
        .env("SCOPE_WILDCARDS", "true")
        .start()
        .await;
    let r = open
        .post(
            "/v1/api_keys",
            json!({ "name": "n", "subject": "s", "scopes": ["read:*"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let secret = r.body["secret"].as_str().expect("secret");
    let ok = open.verify(secret, &["read:orders"]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let no = open.verify(secret, &["write:orders"]).await;
    assert_eq!(no.status, StatusCode::FORBIDDEN);
    for all_powerful in ["*", "*:*", "*:orders"] {
        let r = open
            .post(
                "/v1/api_keys",
                json!({ "name": "n", "subject": "s", "scopes": [all_powerful] }),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{all_powerful} must always be rejected"
        );
    }
}

#[tokio::test]
async fn key_prefix_is_configurable() {
    let app = TestApp::builder()
        .env("KEY_PREFIX", "acme_test")
        .start()
        .await;
    let (_, secret) = app.create_key("s", &[]).await;
    assert!(secret.starts_with("acme_test_"), "{secret}");
    assert_eq!(app.verify(&secret, &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn audit_log_records_who_and_what_and_verifies() {
    let app = TestApp::start().await;
    let (id, secret) = app
        .create_key("acme", &["read:orders", "write:webhooks"])
        .await;
    app.patch(
        &format!("/v1/api_keys/{id}"),
        json!({ "scopes": ["read:orders"] }),
    )
    .await;
    app.post(
        &format!("/v1/api_keys/{id}/revoke"),
        json!({ "revocation_reason": "rotation" }),
    )
    .await;
    let (other, _) = app.create_key("globex", &[]).await;

    let all = app.get("/v1/audit_log").await;
    assert_eq!(all.status, StatusCode::OK);
    let entries = all.body["data"].as_array().expect("data");
    assert_eq!(entries.len(), 4);
    let label = entries[0]["actor"].as_str().expect("actor");
    assert!(label.starts_with("admin:") && !label.contains(common::ADMIN_TOKEN));
    assert_eq!(
        entries[1]["details"]["changes"]["scopes"],
        json!({"from": ["read:orders", "write:webhooks"], "to": ["read:orders"]})
    );
    assert_eq!(entries[2]["details"]["reason"], "rotation");
    assert_eq!(entries[3]["key_id"], other);
    assert_eq!(entries[1]["prev_hash"], entries[0]["hash"]);
    assert!(
        !all.body.to_string().contains(&secret),
        "no secret in the audit log"
    );

    let page = app.get("/v1/audit_log?limit=2").await;
    assert_eq!(page.body["next_after"], 2);
    let rest = app.get("/v1/audit_log?after=2").await;
    assert_eq!(rest.body["data"][0]["seq"], 3);

    let ok = app.run_command(&["audit", "verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("4 entries"));
}

#[tokio::test]
async fn tampering_with_the_audit_log_is_detected() {
    let mut app = TestApp::start().await;
    let (id, _) = app.create_key("acme", &["read:orders"]).await;
    app.patch(&format!("/v1/api_keys/{id}"), json!({ "name": "x" }))
        .await;
    app.stop().await;
    // The table refuses UPDATE and DELETE; someone with the file (or the database's owner) can
    // drop the triggers.
    app.tamper(
        "DROP TRIGGER audit_log_no_update; UPDATE audit_log SET actor = 'admin:someone' WHERE seq = 1;",
        "DROP TRIGGER audit_log_no_update ON audit_log; UPDATE audit_log SET actor = 'admin:someone' WHERE seq = 1;",
    )
    .await;
    let broken = app.run_command(&["audit", "verify"]);
    assert!(!broken.status.success());
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("audit entry 1"),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );
}

#[tokio::test]
async fn concurrent_revokes_and_updates_lose_nothing() {
    let app = TestApp::start().await;
    let (id, _) = app.create_key("acme", &["read:orders"]).await;

    // Ten updates of different fields at once: optimistic locking retries, none is lost.
    let mut updates = tokio::task::JoinSet::new();
    for i in 0..10 {
        let req = app
            .request(reqwest::Method::PATCH, &format!("/v1/api_keys/{id}"))
            .bearer_auth(common::ADMIN_TOKEN)
            .json(&json!({ "claims": null, "description": format!("d{i}") }));
        updates.spawn(async move { req.send().await.map(|r| r.status()) });
    }
    while let Some(status) = updates.join_next().await {
        assert_eq!(status.expect("task").expect("request"), StatusCode::OK);
    }
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    assert_eq!(
        audit.body["data"].as_array().map(Vec::len),
        Some(11),
        "1 create + 10 updates"
    );

    // Ten revokes at once: one writes, all answer the same revocation.
    let mut revokes = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let req = app
            .request(reqwest::Method::POST, &format!("/v1/api_keys/{id}/revoke"))
            .bearer_auth(common::ADMIN_TOKEN);
        revokes.spawn(async move {
            req.send()
                .await
                .expect("request")
                .json::<Value>()
                .await
                .expect("json")
        });
    }
    let mut revoked_at = std::collections::BTreeSet::new();
    while let Some(body) = revokes.join_next().await {
        let body = body.expect("task");
        assert_eq!(body["revoked"], true, "{body}");
        revoked_at.insert(body["updated_at"].to_string());
    }
    assert_eq!(revoked_at.len(), 1, "one revocation time: {revoked_at:?}");
    let audit = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    let revokes = audit.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|e| e["action"] == "revoke")
        .count();
    assert_eq!(revokes, 1);
    assert!(app.run_command(&["audit", "verify"]).status.success());
}

/// Verify reads through connections that keep their database snapshot from one lookup to the
/// next (`HotReads` in origin's store/sqlite/hot.rs). While other clients keep those connections
/// busy with the same key, every acknowledged change must show in the very next verify.
#[tokio::test]
async fn verify_sees_each_acknowledged_change_at_once() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let app = TestApp::start().await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;
    let changed = AtomicBool::new(false);
    let busy = || async {
        let mut lookups = 0u32;
        while !changed.load(Ordering::Relaxed) {
            let r = app.verify(&secret, &[]).await;
            assert!(
                r.status == StatusCode::OK || r.status == StatusCode::NOT_FOUND,
                "{:?}",
                r.body
            );
            lookups += 1;
        }
        lookups
    };
    let changes = async {
        let scopes = ["read:orders", "write:orders"];
        for round in 0..40 {
            let (new, old) = (scopes[round % 2], scopes[(round + 1) % 2]);
            let r = app
                .patch(&format!("/v1/api_keys/{id}"), json!({ "scopes": [new] }))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            let now = app.verify(&secret, &[new]).await;
            assert_eq!(now.status, StatusCode::OK, "round {round}: {:?}", now.body);
            let before = app.verify(&secret, &[old]).await;
            assert_eq!(
                before.status,
                StatusCode::FORBIDDEN,
                "round {round}: the scope just removed still verified: {:?}",
                before.body
            );
        }
        let r = app
            .post(&format!("/v1/api_keys/{id}/revoke"), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let gone = app.verify(&secret, &[]).await;
        assert_eq!(gone.body["errors"][0]["code"], "api_key_revoked");
        changed.store(true, Ordering::Relaxed);
    };
    let (a, b, c, ()) = tokio::join!(busy(), busy(), busy(), changes);
    assert!(
        a + b + c >= 120,
        "the other clients verified only {} times",
        a + b + c
    );
}

/// The error field of a Clerk-envelope answer.
fn param(body: &Value) -> &str {
    body["errors"][0]["meta"]["param_name"]
        .as_str()
        .unwrap_or_default()
}

fn millis(body: &Value, field: &str) -> i64 {
    body[field].as_i64().expect(field)
}

/// What Clerk's Python SDK sends: `type` on create (its default `api_key`), seconds as JSON
/// floats (`3600.0`), and on list `type`, `limit` and `offset` as numbers and `query`.
#[tokio::test]
async fn type_fractional_seconds_and_clerks_list_parameters() {
    let app = TestApp::start().await;
    let orders = app
        .post(
            "/v1/api_keys",
            json!({ "name": "Acme orders", "subject": "acme", "type": "api_key",
                    "seconds_until_expiration": 3600.0 }),
        )
        .await;
    assert_eq!(orders.status, StatusCode::CREATED, "{}", orders.body);
    assert_eq!(orders.body["type"], "api_key");
    assert_eq!(
        millis(&orders.body, "expiration") - millis(&orders.body, "created_at"),
        3_600_000
    );
    // A fraction is kept to the millisecond, rounded up.
    let brief = app
        .post(
            "/v1/api_keys",
            json!({ "name": "brief", "subject": "acme", "seconds_until_expiration": 0.0015 }),
        )
        .await;
    assert_eq!(brief.status, StatusCode::CREATED, "{}", brief.body);
    assert_eq!(
        millis(&brief.body, "expiration") - millis(&brief.body, "created_at"),
        2
    );
    // A type of the creator's own is kept, shown, and listed only when asked for.
    let feed = app
        .post(
            "/v1/api_keys",
            json!({ "name": "Partner feed", "subject": "acme", "type": "partner_key" }),
        )
        .await;
    assert_eq!(feed.status, StatusCode::CREATED, "{}", feed.body);
    assert_eq!(feed.body["type"], "partner_key");
    let feed_id = feed.body["id"].as_str().expect("id");
    assert_eq!(
        app.get(&format!("/v1/api_keys/{feed_id}")).await.body["type"],
        "partner_key"
    );
    let names = |r: &Value| -> Vec<String> {
        r["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|k| k["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let listed = app
        .get("/v1/api_keys?subject=acme&include_invalid=true")
        .await;
    assert_eq!(
        names(&listed.body),
        ["brief", "Acme orders"],
        "{}",
        listed.body
    );
    let listed = app.get("/v1/api_keys?subject=acme&type=partner_key").await;
    assert_eq!(names(&listed.body), ["Partner feed"]);
    assert_eq!(listed.body["data"][0]["type"], "partner_key");

    // Numbers as the Python SDK writes them, and the name search.
    let page = app
        .get("/v1/api_keys?subject=acme&include_invalid=true&limit=1.0&offset=1.0")
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(names(&page.body), ["Acme orders"]);
    assert_eq!(page.body["total_count"], 2);
    let found = app
        .get("/v1/api_keys?subject=acme&include_invalid=true&query=ORDERS")
        .await;
    assert_eq!(names(&found.body), ["Acme orders"]);
    // LIKE's wildcards are plain characters in a search.
    for query in ["%25", "_", "%25orders"] {
        let none = app
            .get(&format!("/v1/api_keys?include_invalid=true&query={query}"))
            .await;
        assert_eq!(none.status, StatusCode::OK, "{query}: {}", none.body);
        assert_eq!(none.body["total_count"], 0, "{query}: {}", none.body);
    }

    // Update takes a float too.
    let orders_id = orders.body["id"].as_str().expect("id");
    let updated = app
        .patch(
            &format!("/v1/api_keys/{orders_id}"),
            json!({ "seconds_until_expiration": 7200.5 }),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(
        millis(&updated.body, "expiration") - millis(&updated.body, "updated_at"),
        7_200_500
    );

    // Refused, each naming its field, and nothing is created.
    let long_type = "t".repeat(26);
    for (extra, field) in [
        (json!({ "type": "ab" }), "type"),
        (json!({ "type": long_type }), "type"),
        (json!({ "type": "" }), "type"),
        (json!({ "type": "api\u{0}key" }), "type"),
        (json!({ "type": 5 }), "type"),
        (
            json!({ "seconds_until_expiration": 0 }),
            "seconds_until_expiration",
        ),
        (
            json!({ "seconds_until_expiration": 0.0 }),
            "seconds_until_expiration",
        ),
        (
            json!({ "seconds_until_expiration": -0.5 }),
            "seconds_until_expiration",
        ),
        (
            json!({ "seconds_until_expiration": 1e300 }),
            "seconds_until_expiration",
        ),
        (
            json!({ "seconds_until_expiration": 315_360_000.001 }),
            "seconds_until_expiration",
        ),
        (
            json!({ "seconds_until_expiration": "NaN" }),
            "seconds_until_expiration",
        ),
        (
            json!({ "seconds_until_expiration": "never" }),
            "seconds_until_expiration",
        ),
    ] {
        let mut body = json!({ "name": "refused", "subject": "acme" });
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let r = app.post("/v1/api_keys", body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            r.body
        );
        assert_eq!(param(&r.body), field, "{body}: {}", r.body);
    }
    for query in [
        "limit=10.5",
        "limit=NaN",
        "limit=inf",
        "offset=-0.5",
        "type=ab",
    ] {
        let r = app.get(&format!("/v1/api_keys?{query}")).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {}",
            r.body
        );
        assert_eq!(param(&r.body), query.split('=').next().expect("name"));
    }
    let all = app.get("/v1/api_keys?include_invalid=true&limit=100").await;
    assert_eq!(all.body["total_count"], 2, "no refused create made a key");
}

/// `DELETE /api_keys/{id}`, as Clerk's SDKs call it: the key is revoked and gone from every
/// read, while its row (the secret's hash) and audit entries stay.
#[tokio::test]
async fn a_deleted_key_is_revoked_hidden_and_still_audited() {
    let app = TestApp::start().await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;
    let (revoked_id, _) = app.create_key("acme", &[]).await;
    let r = app
        .post(
            &format!("/v1/api_keys/{revoked_id}/revoke"),
            json!({ "revocation_reason": "rotation" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    for (key, path) in [
        (&id, format!("/api_keys/{id}")),
        (&revoked_id, format!("/v1/api_keys/{revoked_id}")),
    ] {
        let r = app.delete(&path, Value::Null).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert_eq!(
            r.body,
            json!({ "id": key, "object": "api_key", "deleted": true })
        );
    }

    // Gone: every call that names it answers 404, a second delete too.
    for (method, path, body) in [
        (reqwest::Method::GET, format!("/v1/api_keys/{id}"), None),
        (reqwest::Method::DELETE, format!("/v1/api_keys/{id}"), None),
        (
            reqwest::Method::PATCH,
            format!("/v1/api_keys/{id}"),
            Some(json!({ "name": "x" })),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/api_keys/{id}/revoke"),
            Some(json!({})),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/api_keys/{id}/roll"),
            Some(json!({ "grace_period_seconds": 0 })),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/api_keys/{id}/leak"),
            Some(json!({})),
        ),
        // A refused scope grant is no exception: the key is not found first.
        (
            reqwest::Method::PATCH,
            format!("/v1/api_keys/{id}"),
            Some(json!({ "scopes": ["*"] })),
        ),
    ] {
        let r = app.call(method.clone(), &path, body).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            r.body
        );
        assert_eq!(code(&r.body), "resource_not_found", "{method} {path}");
    }
    // The tutorial's surface too.
    for (method, path, body) in [
        (
            reqwest::Method::PATCH,
            "/backend.api-keys.update",
            json!({ "key_id": id, "name": "x" }),
        ),
        (
            reqwest::Method::DELETE,
            "/backend.api-keys.revoke",
            json!({ "key_id": id }),
        ),
        (
            reqwest::Method::POST,
            "/backend.api-keys.roll",
            json!({ "key_id": id, "grace_period_seconds": 0 }),
        ),
    ] {
        let r = app.call(method.clone(), path, Some(body)).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            r.body
        );
    }
    let listed = app.get("/v1/api_keys?include_invalid=true").await;
    assert_eq!(listed.body["total_count"], 0, "{}", listed.body);
    let listed = app.get("/backend.api-keys.list").await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    assert_eq!(listed.body["total_count"], 0, "{}", listed.body);

    // The secret can never verify again.
    let r = app.verify(&secret, &[]).await;
    assert_eq!(
        (r.status, code(&r.body)),
        (StatusCode::NOT_FOUND, "api_key_revoked"),
        "{}",
        r.body
    );

    // The audit log keeps every entry, the deletions among them.
    let log = app.get(&format!("/v1/audit_log?key_id={id}")).await;
    let actions: Vec<&str> = log.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["create", "delete"]);
    assert_eq!(log.body["data"][1]["details"]["revoked"], true);
    let log = app.get(&format!("/v1/audit_log?key_id={revoked_id}")).await;
    assert_eq!(log.body["data"][2]["action"], "delete");
    assert_eq!(
        log.body["data"][2]["details"]["revoked"], false,
        "it was revoked already"
    );
    let ok = app.run_command(&["audit", "verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("5 entries"));
}
