//! Hostile input against the real origin, over raw TCP: several hundred requests with broken
//! JSON, wrong types, hostile strings, bad ids, bad credentials, wrong methods, oversized and
//! slow bodies. Every answer must be a 4xx with a JSON error (or, for requests the HTTP parser
//! itself refuses, a bare 4xx); never a 5xx, a panic or a hang. Afterwards origin is healthy
//! and its keys are unchanged.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::github::{ALERTS, GithubKey, KEY_ID_HEADER, SIGNATURE_HEADER, write_key_file};
use common::hostile::{self, RawReply};
use common::{ADMIN_TOKEN, TestApp};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// One endpoint with a JSON body: its fields and their kinds, and a valid body that would
/// change data if a hostile variant of it were accepted.
struct Endpoint {
    method: &'static str,
    path: String,
    fields: &'static [(&'static str, &'static str)],
    base: Value,
}

fn endpoints(id: &str, secret: &str) -> Vec<Endpoint> {
    vec![
        Endpoint {
            method: "POST",
            path: "/v1/api_keys".into(),
            fields: &[
                ("name", "string"),
                ("subject", "string"),
                ("type", "type"),
                ("description", "string"),
                ("scopes", "strings"),
                ("claims", "object"),
                ("seconds_until_expiration", "seconds"),
                ("created_by", "string"),
                ("allowed_ips", "strings"),
            ],
            base: json!({"name": "n", "subject": "s"}),
        },
        Endpoint {
            method: "PATCH",
            path: format!("/v1/api_keys/{id}"),
            fields: &[
                ("name", "string"),
                ("subject", "string"),
                ("description", "string"),
                ("scopes", "strings"),
                ("claims", "object"),
                ("seconds_until_expiration", "seconds"),
                ("expiration", "number"),
                ("disabled", "bool"),
                ("allowed_ips", "strings"),
            ],
            base: json!({"name": "renamed"}),
        },
        Endpoint {
            method: "POST",
            path: format!("/v1/api_keys/{id}/revoke"),
            fields: &[("revocation_reason", "string")],
            base: json!({"revocation_reason": "r"}),
        },
        Endpoint {
            method: "POST",
            path: format!("/v1/api_keys/{id}/roll"),
            fields: &[
                ("grace_period_seconds", "number"),
                ("seconds_until_expiration", "seconds"),
                ("expiration", "number"),
            ],
            base: json!({"grace_period_seconds": 600}),
        },
        Endpoint {
            method: "POST",
            path: format!("/v1/api_keys/{id}/leak"),
            fields: &[("source", "string")],
            base: json!({"source": "s"}),
        },
        Endpoint {
            method: "POST",
            path: "/v1/api_keys/verify".into(),
            fields: &[
                ("secret", "string"),
                ("required_scopes", "strings"),
                ("client_ip", "string"),
            ],
            base: json!({"secret": secret}),
        },
        Endpoint {
            method: "POST",
            path: "/backend.api-keys.create".into(),
            fields: &[
                ("name", "string"),
                ("scopes", "strings"),
                ("metadata", "object"),
                ("subject", "string"),
                ("description", "string"),
                ("seconds_until_expiration", "seconds"),
                ("allowed_ips", "strings"),
            ],
            base: json!({"name": "n"}),
        },
        Endpoint {
            method: "POST",
            path: "/backend.api-keys.verify".into(),
            fields: &[
                ("key", "string"),
                ("required_scopes", "strings"),
                ("client_ip", "string"),
            ],
            base: json!({"key": secret}),
        },
        Endpoint {
            method: "PATCH",
            path: "/backend.api-keys.update".into(),
            fields: &[
                ("key_id", "string"),
                ("name", "string"),
                ("scopes", "strings"),
                ("metadata", "object"),
                ("description", "string"),
                ("seconds_until_expiration", "seconds"),
                ("disabled", "bool"),
                ("allowed_ips", "strings"),
            ],
            base: json!({"key_id": id, "name": "renamed"}),
        },
        Endpoint {
            method: "DELETE",
            path: "/backend.api-keys.revoke".into(),
            fields: &[("key_id", "string"), ("reason", "string")],
            base: json!({"key_id": id}),
        },
        Endpoint {
            method: "POST",
            path: "/backend.api-keys.roll".into(),
            fields: &[
                ("key_id", "string"),
                ("grace_period_seconds", "number"),
                ("seconds_until_expiration", "seconds"),
            ],
            base: json!({"key_id": id, "grace_period_seconds": 600}),
        },
    ]
}

/// A request of the corpus: what it is, its bytes, and whether only the HTTP parser sees it.
struct Probe {
    label: String,
    bytes: Vec<u8>,
    framing: bool,
}

const AUTH: &str = "Authorization";

/// Raw header lines: name and value bytes.
type Headers = Vec<(&'static str, Vec<u8>)>;

fn bearer() -> Vec<u8> {
    format!("Bearer {ADMIN_TOKEN}").into_bytes()
}

fn json_probe(label: String, method: &str, path: &str, body: &[u8]) -> Probe {
    let auth = bearer();
    Probe {
        label,
        bytes: hostile::request(
            method,
            path,
            &[
                (AUTH, auth.as_slice()),
                ("Content-Type", b"application/json".as_slice()),
            ],
            body,
        ),
        framing: false,
    }
}

/// GitHub's alerts: the hostile bodies, each signed by the listed key (so each reaches the
/// parser), and hostile signature headers on a well-formed alert that holds a live key.
/// A label and raw header lines.
type Labelled<'a> = (&'static str, Vec<(&'static str, &'a [u8])>);

fn github_probes(github: &GithubKey, secret: &str) -> Vec<Probe> {
    let sign = |body: &[u8]| github.sign(body).into_bytes();
    let probe = |label: String, headers: &[(&str, &[u8])], body: &[u8]| Probe {
        label: format!("POST {ALERTS}: {label}"),
        bytes: hostile::request("POST", ALERTS, headers, body),
        framing: false,
    };
    let mut probes = Vec::new();
    for (label, body) in hostile::bad_bodies() {
        if body == b"[]" {
            continue; // An empty alert is a valid one.
        }
        let signature = sign(&body);
        probes.push(probe(
            format!("signed {label}"),
            &[
                (KEY_ID_HEADER, b"github".as_slice()),
                (SIGNATURE_HEADER, &signature),
            ],
            &body,
        ));
    }
    let body = json!([{"token": secret, "type": "latchkey_api_key"}]).to_string();
    let good = sign(body.as_bytes());
    let long = vec![b'A'; 8_000];
    let other = sign(b"another body");
    let headers: Vec<Labelled<'_>> = vec![
        ("no signature", vec![(KEY_ID_HEADER, b"github")]),
        ("no identifier", vec![(SIGNATURE_HEADER, &good)]),
        (
            "unknown identifier",
            vec![(KEY_ID_HEADER, b"someone"), (SIGNATURE_HEADER, &good)],
        ),
        (
            "invalid UTF-8 signature",
            vec![(KEY_ID_HEADER, b"github"), (SIGNATURE_HEADER, b"\xff\xfe")],
        ),
        (
            "8 KB signature",
            vec![(KEY_ID_HEADER, b"github"), (SIGNATURE_HEADER, &long)],
        ),
        (
            "empty signature",
            vec![(KEY_ID_HEADER, b"github"), (SIGNATURE_HEADER, b"")],
        ),
        (
            "another body's signature",
            vec![(KEY_ID_HEADER, b"github"), (SIGNATURE_HEADER, &other)],
        ),
        (
            "doubled identifier, a wrong one first",
            vec![
                (KEY_ID_HEADER, b"someone"),
                (KEY_ID_HEADER, b"github"),
                (SIGNATURE_HEADER, &good),
            ],
        ),
        (
            "doubled signature, a wrong one first",
            vec![
                (KEY_ID_HEADER, b"github"),
                (SIGNATURE_HEADER, &other),
                (SIGNATURE_HEADER, &good),
            ],
        ),
    ];
    for (label, headers) in headers {
        probes.push(probe(label.to_owned(), &headers, body.as_bytes()));
    }
    probes
}

fn corpus(id: &str, secret: &str, github: &GithubKey) -> Vec<Probe> {
    let mut probes = github_probes(github, secret);
    let endpoints = endpoints(id, secret);
    for e in &endpoints {
        let at = format!("{} {}", e.method, e.path);
        for (label, body) in hostile::bad_bodies() {
            probes.push(json_probe(
                format!("{at}: {label}"),
                e.method,
                &e.path,
                &body,
            ));
        }
        for (field, kind) in e.fields {
            for wrong in hostile::wrong_values(kind) {
                let mut body = e.base.clone();
                body[*field] = serde_json::from_str(wrong).unwrap_or(Value::Null);
                let held = serde_json::from_str::<Value>(wrong).map(|v| v.to_string());
                let text = if held.ok().as_deref() != Some(wrong) {
                    // Not JSON serde_json holds as written (`1e400`, `NaN`, `1e-400`, `-0`):
                    // splice the literal in.
                    e.base
                        .to_string()
                        .replacen('{', &format!("{{\"{field}\": {wrong},"), 1)
                } else {
                    body.to_string()
                };
                probes.push(json_probe(
                    format!("{at}: {field} = {wrong}"),
                    e.method,
                    &e.path,
                    text.as_bytes(),
                ));
            }
            if kind == &"strings" {
                for (label, scopes) in hostile::bad_scope_lists() {
                    let mut body = e.base.clone();
                    body[*field] = scopes;
                    probes.push(json_probe(
                        format!("{at}: {field} {label}"),
                        e.method,
                        &e.path,
                        body.to_string().as_bytes(),
                    ));
                }
            }
        }
        // Duplicate keys: the second value would be valid on its own.
        let text = e.base.to_string();
        let duplicated =
            text.replacen('{', "{\"name\": 5, ", 1)
                .replacen('}', ", \"name\": \"x\"}", 1);
        probes.push(json_probe(
            format!("{at}: duplicate key"),
            e.method,
            &e.path,
            duplicated.as_bytes(),
        ));
        // Over the body limit.
        let oversized = json!({"name": "A".repeat(100_000)}).to_string();
        probes.push(json_probe(
            format!("{at}: 100 KB body"),
            e.method,
            &e.path,
            oversized.as_bytes(),
        ));
        // Wrong content types are still parsed as JSON; a form body is not JSON.
        let auth = bearer();
        probes.push(Probe {
            label: format!("{at}: form-encoded body"),
            bytes: hostile::request(
                e.method,
                &e.path,
                &[
                    (AUTH, auth.as_slice()),
                    (
                        "Content-Type",
                        b"application/x-www-form-urlencoded".as_slice(),
                    ),
                ],
                b"name=a&subject=b",
            ),
            framing: false,
        });
    }

    for bad in hostile::bad_ids() {
        for (method, path) in [
            ("GET", format!("/v1/api_keys/{bad}")),
            ("PATCH", format!("/v1/api_keys/{bad}")),
            ("POST", format!("/v1/api_keys/{bad}/revoke")),
            ("POST", format!("/v1/api_keys/{bad}/roll")),
            ("POST", format!("/v1/api_keys/{bad}/leak")),
            ("GET", format!("/api_keys/{bad}/secret")),
            ("DELETE", format!("/v1/api_keys/{bad}")),
            ("DELETE", format!("/api_keys/{bad}")),
        ] {
            probes.push(json_probe(
                format!("{method} {path}"),
                method,
                &path,
                br#"{"name":"x"}"#,
            ));
        }
        for (method, path, field) in [
            ("PATCH", "/backend.api-keys.update", "key_id"),
            ("DELETE", "/backend.api-keys.revoke", "key_id"),
            ("POST", "/backend.api-keys.roll", "key_id"),
        ] {
            let decoded = bad
                .replace("%2F", "/")
                .replace("%00", "\u{0}")
                .replace("%20", " ");
            let body = json!({ field: decoded, "name": "x" }).to_string();
            probes.push(json_probe(
                format!("{method} {path} {field}={bad}"),
                method,
                path,
                body.as_bytes(),
            ));
        }
    }

    let long_token = format!("Bearer {}", "a".repeat(8_000));
    let auth_variants: Vec<(&str, Headers)> = vec![
        ("no Authorization", vec![]),
        (
            "doubled valid Authorization",
            vec![(AUTH, bearer()), (AUTH, bearer())],
        ),
        (
            "valid then wrong Authorization",
            vec![(AUTH, bearer()), (AUTH, b"Bearer wrong".to_vec())],
        ),
        (
            "invalid UTF-8 token",
            vec![(AUTH, b"Bearer \xff\xfe\xfd".to_vec())],
        ),
        ("8 KB token", vec![(AUTH, long_token.into_bytes())]),
        (
            "Basic scheme",
            vec![(AUTH, format!("Basic {ADMIN_TOKEN}").into_bytes())],
        ),
        (
            "token without scheme",
            vec![(AUTH, ADMIN_TOKEN.as_bytes().to_vec())],
        ),
        (
            "look-alike token",
            vec![(
                AUTH,
                format!("Bearer {}", ADMIN_TOKEN.replace('a', "а")).into_bytes(),
            )],
        ),
    ];
    for (label, headers) in &auth_variants {
        for (method, path) in [
            ("GET", "/v1/api_keys".to_owned()),
            ("POST", "/v1/api_keys".to_owned()),
            ("POST", format!("/v1/api_keys/{id}/revoke")),
            ("DELETE", format!("/v1/api_keys/{id}")),
            ("DELETE", format!("/api_keys/{id}")),
            ("DELETE", "/backend.api-keys.revoke".to_owned()),
        ] {
            let headers: Vec<(&str, &[u8])> =
                headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
            let body = json!({"name": "n", "subject": "s", "key_id": id}).to_string();
            probes.push(Probe {
                label: format!("{method} {path}: {label}"),
                bytes: hostile::request(method, &path, &headers, body.as_bytes()),
                framing: false,
            });
        }
    }

    for (method, path) in [
        ("PUT", "/v1/api_keys"),
        ("DELETE", "/v1/api_keys"),
        ("DELETE", "/api_keys"),
        ("DELETE", "/v1/api_keys/verify"),
        ("DELETE", "/v1/api_keys/"),
        ("OPTIONS", "/v1/api_keys"),
        ("FOO", "/v1/api_keys"),
        ("POST", "/backend.api-keys.list"),
        ("GET", "/backend.api-keys.create"),
        ("PUT", "/backend.api-keys.update"),
        ("GET", "/backend.api-keys.revoke"),
        ("GET", "/backend.api-keys.roll"),
        ("PATCH", "/healthz"),
        ("POST", "/metrics"),
        ("GET", "/v1/usage"),
        ("TRACE", "/v1/api_keys/verify"),
        ("GET", "/v1/../../etc/passwd"),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
        ("GET", "/v2/api_keys"),
    ] {
        probes.push(json_probe(format!("{method} {path}"), method, path, b""));
    }

    for query in [
        "limit=-1",
        "limit=abc",
        "limit=1000000",
        "limit=0",
        "offset=-5",
        "offset=abc",
        "offset=99999999999999999999",
        "subject=%FF%FE",
        "subject=%ZZ",
        "include_invalid=maybe",
        "include_invalid=TRUE",
        "type=",
        "type=ab",
        "type=%00%00%00",
        "limit=10.5",
        "limit=1e1.5",
        "limit=NaN",
        "limit=inf",
        "limit=-0",
        "limit=1e400",
        "limit=0x10",
        "offset=-0.5",
        "offset=NaN",
        "offset=1e10",
        "query=%FF",
        "query=%00",
        "query=a%00b",
        "subject=%00",
        "subject=a%00b",
        "claims[tier]=gold%00",
        "metadata[tier]=%00",
        "type=api_key&type=api_key",
        "created_after=yesterday",
        "order_by=name%3B%20DROP%20TABLE%20api_keys",
        "limit=1&limit=2",
    ] {
        probes.push(json_probe(
            format!("GET /v1/api_keys?{query}"),
            "GET",
            &format!("/v1/api_keys?{query}"),
            b"",
        ));
    }
    for query in [
        "page=-1",
        "page=abc",
        "page_size=0",
        "page_size=1000000",
        "page=0",
    ] {
        probes.push(json_probe(
            format!("GET /backend.api-keys.list?{query}"),
            "GET",
            &format!("/backend.api-keys.list?{query}"),
            b"",
        ));
    }
    for query in ["limit=0", "after=-1", "after=abc", "key_id=..%2F"] {
        probes.push(json_probe(
            format!("GET /v1/audit_log?{query}"),
            "GET",
            &format!("/v1/audit_log?{query}"),
            b"",
        ));
    }

    // Requests the HTTP parser refuses before any handler runs.
    let framing: Vec<(&str, Vec<u8>)> = vec![
        ("NUL in a header value", b"GET /v1/api_keys HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec()),
        ("header without colon", b"GET /v1/api_keys HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n".to_vec()),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec()),
        ("bad Content-Length", b"POST /v1/api_keys HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec()),
        ("negative Content-Length", b"POST /v1/api_keys HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec()),
        ("two Content-Lengths", b"POST /v1/api_keys HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}".to_vec()),
        ("100 KB of headers", {
            let mut r = b"GET /v1/api_keys HTTP/1.1\r\nHost: x\r\n".to_vec();
            for i in 0..2000 {
                r.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(50)).as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r
        }),
        ("100 KB URL", format!("GET /v1/api_keys?subject={} HTTP/1.1\r\nHost: x\r\n\r\n", "s".repeat(100_000)).into_bytes()),
        ("invalid UTF-8 in the path", b"GET /v1/api_keys/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ];
    for (label, bytes) in framing {
        probes.push(Probe {
            label: label.to_owned(),
            bytes,
            framing: true,
        });
    }
    probes
}

#[tokio::test]
async fn hundreds_of_hostile_requests_get_json_4xx_and_change_nothing() {
    let github = GithubKey::new("github");
    let keys = tempfile::tempdir().expect("dir");
    let keys_file = write_key_file(keys.path(), &[&github]);
    let app = TestApp::builder()
        .env("ADMIN_AUTH_FAILURES_PER_MINUTE", "1000000")
        .env("REQUEST_READ_TIMEOUT_MS", "1000")
        .env(
            "GITHUB_SECRET_SCANNING_KEYS_FILE",
            &keys_file.display().to_string(),
        )
        .start()
        .await;
    let (id, secret) = app.create_key("acme", &["read:orders"]).await;
    let (other_id, _) = app.create_key("globex", &[]).await;
    let before = snapshot(&app).await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    let probes = corpus(&id, &secret, &github);
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut framing_refused = 0;
    let mut tutorial_denials = 0;
    for probe in &probes {
        let reply = hostile::exchange(
            &addr,
            std::slice::from_ref(&probe.bytes),
            Duration::ZERO,
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", probe.label));
        let Some(RawReply {
            status, ref body, ..
        }) = reply
        else {
            panic!("{}: connection closed without an answer", probe.label);
        };
        // The tutorial's verify answers a well-formed request about a bad key with 200 and
        // `valid: false` (its documented contract): a denial, counted apart.
        if status == 200 && probe.label.starts_with("POST /backend.api-keys.verify") {
            let json: Value = serde_json::from_slice(body).expect("JSON");
            assert_eq!(json["valid"], false, "{}: {json}", probe.label);
            tutorial_denials += 1;
            continue;
        }
        assert!(
            (400..500).contains(&status),
            "{}: status {status}: {}",
            probe.label,
            String::from_utf8_lossy(body)
        );
        *by_status.entry(status).or_default() += 1;
        let json = serde_json::from_slice::<Value>(body).ok();
        match json {
            Some(json) => assert!(
                json.get("errors").is_some() || json.get("error").is_some(),
                "{}: not an error envelope: {json}",
                probe.label
            ),
            None if probe.framing => framing_refused += 1,
            None => panic!(
                "{}: {status} without a JSON error: {:?}",
                probe.label,
                String::from_utf8_lossy(body)
            ),
        }
    }
    let total = probes.len();
    assert!(total >= 300, "corpus has {total} requests");

    // Slow clients: headers or bodies that never finish, or trickle in. Each is cut off
    // (a closed connection for headers, 408 for bodies) while origin keeps answering others.
    let auth = bearer();
    let head = |length: &str| {
        hostile::request(
            "POST",
            "/v1/api_keys",
            &[
                (AUTH, auth.as_slice()),
                ("Content-Length", length.as_bytes()),
            ],
            b"",
        )
    };
    let slow: Vec<(&str, Vec<Vec<u8>>, Duration)> = vec![
        (
            "headers never finished",
            vec![b"POST /v1/api_keys HTTP/1.1\r\nHost: x\r\n".to_vec()],
            Duration::ZERO,
        ),
        (
            "headers trickled",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaa\r\n\r\n"
                .iter()
                .map(|b| vec![*b])
                .collect(),
            Duration::from_millis(200),
        ),
        (
            "body shorter than announced",
            vec![head("100"), br#"{"name":"#.to_vec()],
            Duration::ZERO,
        ),
        (
            "body trickled",
            std::iter::once(head("50"))
                .chain((0..50).map(|_| b" ".to_vec()))
                .collect(),
            Duration::from_millis(300),
        ),
        (
            "chunked body never finished",
            vec![hostile::request(
                "POST",
                "/v1/api_keys",
                &[(AUTH, auth.as_slice()), ("Transfer-Encoding", b"chunked")],
                b"5\r\n{\"nam\r\n",
            )],
            Duration::ZERO,
        ),
    ];
    // All at once, in tasks of their own, while origin is asked for its health.
    let slow_runs: Vec<_> = slow
        .into_iter()
        .map(|(label, pieces, pause)| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let reply = hostile::exchange(&addr, &pieces, pause, Duration::from_secs(15))
                    .await
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                (label, reply)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = TestApp::send(app.request(reqwest::Method::GET, "/healthz")).await;
    let mut slow_replies = Vec::new();
    for run in slow_runs {
        slow_replies.push(run.await.expect("slow client task"));
    }
    assert_eq!(
        health.status,
        StatusCode::OK,
        "origin answers while slow clients hang on"
    );
    for (label, reply) in &slow_replies {
        match reply {
            None => assert!(
                label.starts_with("headers"),
                "{label}: closed without an answer"
            ),
            Some(reply) => {
                assert_eq!(
                    reply.status,
                    408,
                    "{label}: {}",
                    String::from_utf8_lossy(&reply.body)
                );
                assert_eq!(
                    reply.json().expect("JSON")["errors"][0]["code"],
                    "request_timeout"
                );
            }
        }
    }

    // Healthy, and nothing changed.
    let health = TestApp::send(app.request(reqwest::Method::GET, "/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(snapshot(&app).await, before, "keys unchanged");
    assert_eq!(
        app.verify(&secret, &["read:orders"]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/v1/api_keys/{other_id}")).await.body["revoked"],
        false
    );
    assert!(!app.logs().contains("panicked"), "no panic in origin's log");
    let counts: Vec<String> = by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    common::edge::report_measurement(&format!(
        "hostile input, origin ({}): {} requests ({total} corpus + {} slow clients); answers {}; \
         {framing_refused} refused by the HTTP parser without a body; {tutorial_denials} tutorial \
         verifies answered 200 valid:false; 0 server errors, 0 hangs",
        if common::postgres_server().is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        total + slow_replies.len(),
        slow_replies.len(),
        counts.join(", ")
    ));
}

/// Every key: Clerk's list shows one `type` at a time, the tutorial's every key.
async fn snapshot(app: &TestApp) -> Value {
    let clerk = app.get("/v1/api_keys?limit=500&include_invalid=true").await;
    assert_eq!(clerk.status, StatusCode::OK);
    let every = app.get("/backend.api-keys.list?page_size=500").await;
    assert_eq!(every.status, StatusCode::OK);
    json!([clerk.body, every.body])
}
