//! Access: every admin route (enumerated from origin's own route table) refuses bad admin
//! tokens, failed admin authentication is rate-limited per client address, signed routes refuse
//! unsigned, wrongly signed and replayed requests, a near-miss key takes the same path as an
//! unknown one, and refused scope escalations are audited.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::net::IpAddr;
use std::process::Command;

use common::{ADMIN_TOKEN, TestApp, origin_binary};
use latchkey_shared::sign::{self, header};
use latchkey_shared::{ApiKey, KeyPrefix, UnixMillis};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const USAGE_SECRET: &str = "usage-secret-for-access-tests-000000";

/// `origin routes`: the table the router is built from.
fn route_table() -> Vec<Value> {
    let output = Command::new(origin_binary())
        .arg("routes")
        .output()
        .expect("run origin routes");
    assert!(output.status.success(), "origin routes failed");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON route per line"))
        .collect()
}

fn routes_with(table: &[Value], access: &str) -> Vec<(Method, String)> {
    table
        .iter()
        .filter(|r| r["access"] == access)
        .map(|r| {
            let method = Method::from_bytes(r["method"].as_str().expect("method").as_bytes())
                .expect("HTTP method");
            (method, r["path"].as_str().expect("path").to_owned())
        })
        .collect()
}

#[tokio::test]
async fn every_admin_route_in_the_route_table_refuses_bad_admin_tokens() {
    let table = route_table();
    let admin = routes_with(&table, "admin");
    assert!(
        admin.len() >= 20,
        "the table lists the admin API: {table:?}"
    );
    // Only these may be called without credentials; a new route must be added here on purpose.
    let mut open: Vec<String> = routes_with(&table, "open")
        .iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    open.sort();
    assert_eq!(open, ["GET /healthz", "GET /metrics"]);
    assert_eq!(
        routes_with(&table, "signed"),
        [(Method::POST, "/v1/usage".to_owned())]
    );
    assert_eq!(
        routes_with(&table, "github"),
        [(Method::POST, "/v1/secret_scanning/github".to_owned())]
    );
    assert_eq!(
        table.len(),
        admin.len() + 4,
        "every route has an access class"
    );

    let app = TestApp::builder()
        .env("ADMIN_AUTH_FAILURES_PER_MINUTE", "1000000")
        .env("USAGE_SIGNING_SECRET", USAGE_SECRET)
        .start()
        .await;
    let (id, _) = app.create_key("acme", &[]).await;
    let before = app.get(&format!("/v1/api_keys/{id}")).await.body;
    let wrong = "x".repeat(ADMIN_TOKEN.len());
    let bad_headers: Vec<Vec<String>> = vec![
        vec![],
        vec![format!("Bearer {wrong}")],
        vec![format!("Basic {ADMIN_TOKEN}")],
        vec![ADMIN_TOKEN.to_owned()],
        vec!["Bearer".to_owned()],
        vec!["Bearer ".to_owned()],
        vec![format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])],
        vec![format!("Bearer {ADMIN_TOKEN}x")],
        vec![format!("Bearer {}", ADMIN_TOKEN.to_uppercase())],
        vec![
            format!("Bearer {ADMIN_TOKEN}"),
            format!("Bearer {ADMIN_TOKEN}"),
        ],
        vec![format!("Bearer {ADMIN_TOKEN}"), format!("Bearer {wrong}")],
    ];
    let mut checked = 0;
    for (method, pattern) in &admin {
        let path = pattern.replace("{id}", &id);
        for headers in &bad_headers {
            let mut req = app
                .request(method.clone(), &path)
                .json(&json!({"name": "x", "key_id": id, "secret": "x"}));
            for h in headers {
                req = req.header("authorization", h);
            }
            let r = TestApp::send(req).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {headers:?}: {}",
                r.body
            );
            assert_eq!(
                r.headers.get("www-authenticate").map(|v| v.to_str().ok()),
                Some(Some("Bearer"))
            );
            assert!(r.body.is_object(), "JSON error body: {}", r.body);
            checked += 1;
        }
    }
    assert_eq!(checked, admin.len() * bad_headers.len());
    common::edge::report_measurement(&format!(
        "admin access: {} admin routes x {} bad Authorization headers = {checked} requests, all 401",
        admin.len(),
        bad_headers.len()
    ));

    // The signed route refuses unsigned and wrongly signed requests, whatever admin token.
    for (method, path) in routes_with(&table, "signed") {
        let body = br#"{"batch":"b1","uses":[]}"#;
        let now = UnixMillis(
            i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_millis(),
            )
            .expect("ms"),
        );
        let wrong_signature = sign::sign(
            b"not-the-usage-secret-0000000000",
            &sign::usage_message(now, body),
        );
        let attempts: Vec<Vec<(&str, String)>> = vec![
            vec![],
            vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))],
            vec![(header::TIMESTAMP, now.0.to_string())],
            vec![
                (header::TIMESTAMP, now.0.to_string()),
                (header::SIGNATURE, wrong_signature),
            ],
            vec![
                (header::TIMESTAMP, now.0.to_string()),
                (header::SIGNATURE, "00".repeat(32)),
            ],
        ];
        for headers in attempts {
            let mut req = app.request(method.clone(), &path).body(body.to_vec());
            for (name, value) in &headers {
                req = req.header(*name, value);
            }
            let r = TestApp::send(req).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {headers:?}: {}",
                r.body
            );
            assert_eq!(r.body["errors"][0]["code"], "signature_invalid");
        }
        // Signed right: accepted once, refused when replayed.
        let signature = sign::sign(USAGE_SECRET.as_bytes(), &sign::usage_message(now, body));
        let send = || {
            TestApp::send(
                app.request(method.clone(), &path)
                    .header(header::TIMESTAMP, now.0.to_string())
                    .header(header::SIGNATURE, &signature)
                    .body(body.to_vec()),
            )
        };
        assert_eq!(send().await.status, StatusCode::OK);
        let replay = send().await;
        assert_eq!(replay.status, StatusCode::CONFLICT);
        assert_eq!(replay.body["errors"][0]["code"], "replayed");
    }

    // None of it changed anything.
    assert_eq!(app.get(&format!("/v1/api_keys/{id}")).await.body, before);
    let health = TestApp::send(app.request(Method::GET, "/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
}

/// A client bound to one loopback source address.
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(ip))
        .build()
        .expect("client")
}

/// The `Retry-After` of a 429 `too_many_failed_attempts`, checked to be within the minute.
fn assert_refused_for_a_while(r: &common::Reply, what: &str) {
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{what}: {}",
        r.body
    );
    assert_eq!(
        r.body["errors"][0]["code"], "too_many_failed_attempts",
        "{what}"
    );
    let retry_after: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (1..=61).contains(&retry_after),
        "{what}: Retry-After {retry_after}"
    );
}

#[tokio::test]
async fn failed_admin_authentication_is_limited_per_client_but_a_right_token_always_passes() {
    // The default limit (20 a minute).
    let app = TestApp::start().await;
    let attacker = client_from([127, 0, 0, 2]);
    let bystander = client_from([127, 0, 0, 3]);
    let list = format!("{}/v1/api_keys", app.base);
    let call = |client: &reqwest::Client, token: &str| {
        let req = client.get(&list).bearer_auth(token);
        TestApp::send(req)
    };

    // A missing header is not a guess: it is never counted.
    for _ in 0..30 {
        let r = TestApp::send(attacker.get(&list)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(call(&attacker, ADMIN_TOKEN).await.status, StatusCode::OK);

    // Twenty wrong tokens are answered 401; then the address's wrong and malformed tokens are
    // refused with 429 and told when to come back.
    for i in 0..20 {
        let r = call(&attacker, &format!("guess-{i}-aaaaaaaaaaaaaaaaaaaaaaaa")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    let r = call(&attacker, "guess-21-aaaaaaaaaaaaaaaaaaaaaaaa").await;
    assert_refused_for_a_while(&r, "a wrong token over the limit");
    let r = TestApp::send(
        attacker
            .get(&list)
            .header("authorization", format!("Basic {ADMIN_TOKEN}")),
    )
    .await;
    assert_refused_for_a_while(&r, "a malformed header over the limit");

    // The right token from the same address is never refused: anyone sharing an address (a
    // proxy, a tunnel) could otherwise lock the admins out.
    for _ in 0..3 {
        let r = call(&attacker, ADMIN_TOKEN).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "right token while blocked: {}",
            r.body
        );
        let r = call(&attacker, "guess-22-aaaaaaaaaaaaaaaaaaaaaaaa").await;
        assert_refused_for_a_while(&r, "and the next wrong one is still refused");
    }
    // Another address is not affected.
    assert_eq!(
        call(&bystander, "guess-b-aaaaaaaaaaaaaaaaaaaaaaaa")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(call(&bystander, ADMIN_TOKEN).await.status, StatusCode::OK);
    // Each counted failure is logged; refusals over the limit are not (a flood cannot flood
    // the log).
    let logs = app.logs();
    let logged = logs.matches("admin authentication failed").count();
    assert_eq!(logged, 21, "20 from the attacker, 1 from the bystander");
    assert_eq!(
        logs.matches("used up its failures").count(),
        1,
        "the 20th says so"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_is_limited_apart() {
    // 127.0.0.2 is the proxy (a TLS terminator or tunnel on this host); 127.0.0.3 is not.
    let app = TestApp::builder()
        .env("ADMIN_AUTH_FAILURES_PER_MINUTE", "3")
        .env("TRUSTED_PROXIES", "127.0.0.2/32, 10.0.0.0/8")
        .start()
        .await;
    let proxy = client_from([127, 0, 0, 2]);
    let untrusted = client_from([127, 0, 0, 3]);
    let list = format!("{}/v1/api_keys", app.base);
    let via = |client: &reqwest::Client, xff: &str, token: &str| {
        let req = client
            .get(&list)
            .header("x-forwarded-for", xff)
            .bearer_auth(token);
        TestApp::send(req)
    };
    let wrong = "wrong-admin-token-aaaaaaaaaaaaaaaaaaaa";

    // One forwarded client uses up its failures...
    for _ in 0..3 {
        assert_eq!(
            via(&proxy, "203.0.113.7", wrong).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_refused_for_a_while(&via(&proxy, "203.0.113.7", wrong).await, "client A");
    // ...and writing another address to the left of the proxy's entry does not dodge it (the
    // proxy appends what it saw: the rightmost untrusted entry is the client).
    assert_refused_for_a_while(
        &via(&proxy, "198.51.100.99, 203.0.113.7", wrong).await,
        "client A with a spoofed entry before the proxy's",
    );
    assert_refused_for_a_while(
        &via(&proxy, "203.0.113.7, 10.1.2.3", wrong).await,
        "client A through a second trusted proxy",
    );
    // Its right token passes.
    assert_eq!(
        via(&proxy, "203.0.113.7", ADMIN_TOKEN).await.status,
        StatusCode::OK
    );
    // Another client through the same proxy is not affected; nor is the proxy's own address.
    assert_eq!(
        via(&proxy, "203.0.113.8", wrong).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        TestApp::send(proxy.get(&list).bearer_auth(wrong))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // IPv6 clients are one client per /64.
    for i in 1..=3 {
        assert_eq!(
            via(&proxy, &format!("2001:db8:1:2::{i}"), wrong)
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_refused_for_a_while(
        &via(&proxy, "2001:db8:1:2:ffff::9", wrong).await,
        "another address in the same /64",
    );
    assert_eq!(
        via(&proxy, "2001:db8:1:3::1", wrong).await.status,
        StatusCode::UNAUTHORIZED,
        "the next /64"
    );

    // An untrusted peer's X-Forwarded-For is ignored: a new address in it every time does not
    // dodge the limit of the peer.
    for i in 0..3 {
        let r = via(&untrusted, &format!("192.0.2.{i}"), wrong).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "untrusted try {i}");
    }
    assert_refused_for_a_while(
        &via(&untrusted, "192.0.2.200", wrong).await,
        "untrusted peer with a fresh X-Forwarded-For",
    );
    assert!(
        app.logs().contains("client=203.0.113.7"),
        "the log names the forwarded client"
    );
}

/// Rebuilds `key` with the body character at `at` replaced, and a valid checksum: a key one
/// character away from an issued one that passes every syntactic check.
fn near_miss(key: &str, at: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let sep = key.rfind('_').expect("prefix");
    let body = &key.as_bytes()[sep + 1..sep + 1 + 32];
    let mut indices: Vec<u8> = body
        .iter()
        .map(|c| u8::try_from(ALPHABET.iter().position(|a| a == c).expect("base62")).expect("< 62"))
        .collect();
    indices[at] = (indices[at] + 1) % 62;
    // `generate` maps each random byte below 248 to ALPHABET[byte % 62]: feed it the indices.
    let mut fed = false;
    let prefix = KeyPrefix::parse(&key[..sep]).expect("prefix");
    let rebuilt = ApiKey::generate(&prefix, &mut |buf: &mut [u8]| {
        assert!(!fed, "one fill is enough");
        fed = true;
        buf.fill(0);
        buf[..32].copy_from_slice(&indices);
    });
    rebuilt.expose().to_owned()
}

#[tokio::test]
async fn a_near_miss_key_is_answered_exactly_like_an_unknown_key() {
    let app = TestApp::start().await;
    let (_, secret) = app.create_key("acme", &[]).await;
    assert_eq!(app.verify(&secret, &[]).await.status, StatusCode::OK);

    let unknown = near_miss(
        ApiKey::generate(&KeyPrefix::default(), &mut |b| b.fill(7)).expose(),
        0,
    );
    let near_first = near_miss(&secret, 0);
    let near_last = near_miss(&secret, 31);
    assert_ne!(near_first, secret);
    // SQLite logs `= ?`, PostgreSQL `= $1`.
    let lookups = |logs: &str| logs.matches("WHERE secret_hash = ").count();
    let mut answers = Vec::new();
    for presented in [&unknown, &near_first, &near_last] {
        let before = lookups(&app.logs());
        let r = app.verify(presented, &[]).await;
        // Each is looked up by its hash, once: there is no comparison with a stored secret
        // that could stop early at the first differing character.
        assert_eq!(lookups(&app.logs()) - before, 1, "one lookup by hash");
        answers.push((r.status, r.body));
    }
    assert_eq!(answers[0].0, StatusCode::NOT_FOUND);
    assert_eq!(answers[0], answers[1], "near miss at the first character");
    assert_eq!(answers[0], answers[2], "near miss at the last character");

    // A typo that breaks the checksum is refused before any lookup.
    let mut typo = secret.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).expect("ascii");
    let before = lookups(&app.logs());
    let r = app.verify(&typo, &[]).await;
    assert_eq!(r.body["errors"][0]["code"], "api_key_malformed");
    assert_eq!(
        lookups(&app.logs()),
        before,
        "no lookup for a malformed key"
    );
}

#[tokio::test]
async fn scope_escalation_is_refused_and_audited() {
    let app = TestApp::builder()
        .env("SCOPE_CATALOGUE", "read:orders,write:orders")
        .env("SCOPE_WILDCARDS", "false")
        .start()
        .await;
    let (id, _) = app.create_key("acme", &["read:orders"]).await;
    let attempts = [
        json!(["read:orders", "admin:all"]),
        json!(["*"]),
        json!(["read:*"]),
        json!(["read:orders", "reаd:orders"]), // Cyrillic а: a look-alike, not in the catalogue
    ];
    for scopes in &attempts {
        let r = app
            .patch(&format!("/v1/api_keys/{id}"), json!({ "scopes": scopes }))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{scopes}: {}",
            r.body
        );
        assert_eq!(r.body["errors"][0]["meta"]["param_name"], "scopes");
    }
    let r = app
        .post(
            "/v1/api_keys",
            json!({"name": "n", "subject": "s", "scopes": ["billing:write"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // The key is unchanged; every refusal is in the audit log, with who tried and what.
    assert_eq!(
        app.get(&format!("/v1/api_keys/{id}")).await.body["scopes"],
        json!(["read:orders"])
    );
    let log = app.get("/v1/audit_log?limit=100").await.body;
    let entries = log["data"].as_array().expect("audit entries");
    let refused: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "update_refused")
        .collect();
    assert_eq!(refused.len(), attempts.len(), "{log}");
    for (entry, scopes) in refused.iter().zip(&attempts) {
        assert_eq!(entry["key_id"], id.as_str());
        assert_eq!(entry["details"]["requested"], *scopes);
        assert!(
            entry["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("admin:"))
        );
    }
    let create_refused: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "create_refused")
        .collect();
    assert_eq!(create_refused.len(), 1);
    assert_eq!(create_refused[0]["key_id"], Value::Null);
    assert_eq!(
        create_refused[0]["details"]["requested"],
        json!(["billing:write"])
    );
    // The chain still verifies with the refusals in it.
    let out = app.run_command(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
