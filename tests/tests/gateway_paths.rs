//! The gateway against path confusion and replayed identity headers, through the real Worker
//! under `wrangler dev` and the demo upstream, which logs every request target exactly as it
//! received it.
//!
//! * A corpus of traversal and encoding tricks (encoded dot segments, encoded `/` and `\`,
//!   `;` path parameters, double encodings, NUL, overlong UTF-8, non-canonical escapes) on a
//!   routed prefix, with a valid key: each is refused with `400 ambiguous_path` before any KV
//!   read, and nothing outside the rules reaches the upstream.
//! * Methods outside the known table (which workers-rs would map to GET): `405`, unforwarded.
//! * Canonical paths with escapes and queries reach the upstream byte for byte, signed.
//! * The signed identity headers of one request, sent again with another body or query, or
//!   as they are, are refused by the upstream's `GatewayVerifier`.
//! * Bodies are capped: one without a `Content-Length` is read with a running cap (the verify
//!   endpoint answers `413` to an endless chunked body without waiting for its end), and the
//!   gateway refuses a body over `GATEWAY_BODY_MAX_BYTES`.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a failed test"
)]

mod common;

use std::time::Duration;

use common::TestApp;
use common::edge::{Stack, repo_root, report_measurement};
use common::hostile;
use latchkey_shared::RouteTable;
use latchkey_shared::target::check_path;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// What `wrangler dev`'s proxy Worker answers in the Worker's place when the Worker answered
/// before reading a body the proxy was still sending it (a `413` here). Production has no such
/// proxy.
const PROXY_GAVE_UP: &str = "restarted mid-request";

const PUBLISH_LIMIT: Duration = Duration::from_secs(15);
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// The corpus paths whose dot segments workerd (wrangler 4.86) resolves before the Worker sees
/// the URL: these arrive as another path, unrouted (404) or routed (forwarded as that path).
/// Every other corpus path must be refused with 400.
const RESOLVED_BY_WORKERD: &[&str] = &[
    "/orders/%2e%2e/admin",
    "/orders/%2E%2E/admin",
    "/orders/.%2e/admin",
    "/orders/%2e/admin",
    "/orders/..\\admin",
    "/orders;/../admin",
    "/orders/../admin",
    "/orders/./1",
    "/orders/1/..",
];

/// Routed paths that are canonical: forwarded exactly as sent.
const CANONICAL: &[&str] = &[
    "/orders/42",
    "/orders/caf%C3%A9",
    "/orders/a%20b/it's+(1)",
    "/orders/x..y/..z",
    "/orders/",
];

/// The `ROUTES` the Worker runs with: `wrangler.toml`'s.
fn routes_of_wrangler_toml() -> RouteTable {
    let toml = std::fs::read_to_string(repo_root().join("wrangler.toml")).expect("wrangler.toml");
    let rules = toml
        .split_once("ROUTES = \"\"\"")
        .and_then(|(_, rest)| rest.split_once("\"\"\""))
        .map(|(rules, _)| rules)
        .expect("ROUTES in wrangler.toml");
    RouteTable::parse(rules).expect("valid rules")
}

#[tokio::test]
async fn the_gateway_forwards_one_canonical_path_and_its_signature_cannot_be_replayed() {
    let stack = Stack::start(&[]).await;
    let edge = &stack.edge;
    let (id, key) = stack
        .create(
            &["read:orders", "write:orders"],
            json!({ "metadata": { "partner_id": "acme é" } }),
        )
        .await;
    edge.verify_until(&key, &[], PUBLISH_LIMIT, |b| b["valid"] == true)
        .await;
    let routes = routes_of_wrangler_toml();
    let addr = edge.base.trim_start_matches("http://").to_owned();
    let auth = format!("Bearer {key}");
    let send = |method: &str, target: &str, body: &[u8]| {
        let bytes = hostile::request(
            method,
            target,
            &[
                ("authorization", auth.as_bytes()),
                ("content-type", b"application/json"),
            ],
            body,
        );
        let addr = addr.clone();
        let label = format!("{method} {target}");
        async move {
            tokio::time::timeout(ANSWER_LIMIT, roundtrip(&addr, &bytes))
                .await
                .unwrap_or_else(|_| panic!("{label}: no answer within {ANSWER_LIMIT:?}"))
        }
    };

    // The corpus: 400 before any KV read, for a GET and for a write. workerd resolves some
    // dot segments (`..`, `%2e%2e`) itself before the Worker sees the URL: those arrive as
    // `/admin`, match no rule and are refused with 404, still before any KV read. Either way
    // nothing is forwarded (checked below against the upstream's log).
    let mut refused = 0;
    let mut resolved_by_runtime = Vec::new();
    for path in hostile::AMBIGUOUS_PATHS {
        for method in ["GET", "POST"] {
            let r = send(method, path, b"{}").await;
            let body = r.json().unwrap_or(Value::Null);
            if !RESOLVED_BY_WORKERD.contains(path) {
                assert_eq!(r.status, 400, "{method} {path}: {} {body}", r.head);
            }
            match r.status {
                400 => {
                    assert_eq!(body["error"]["code"], "ambiguous_path", "{method} {path}");
                    refused += 1;
                }
                404 => {
                    assert_eq!(body["error"]["code"], "route_not_found", "{method} {path}");
                    resolved_by_runtime.push(format!("{method} {path} -> 404"));
                }
                200 if method == "GET" => {
                    // Resolved by the runtime into a routed path (`/orders/%2e/x` is
                    // `/orders/x`): forwarded as the path that was matched, which the upstream
                    // log check below proves is canonical and inside the rules.
                    let forwarded = body["path"].as_str().expect("path");
                    assert!(
                        routes.find("GET", forwarded).is_some(),
                        "{path} -> {forwarded}"
                    );
                    resolved_by_runtime.push(format!("{method} {path} -> {forwarded}"));
                    continue;
                }
                _ => panic!("{method} {path}: {} {body}", r.head),
            }
            assert_eq!(
                r.header("x-latchkey-debug-kv-reads"),
                Some("0"),
                "{method} {path}: refused before any KV read"
            );
        }
    }
    assert_eq!(
        refused,
        2 * (hostile::AMBIGUOUS_PATHS.len() - RESOLVED_BY_WORKERD.len()),
        "resolved by the runtime: {resolved_by_runtime:?}"
    );
    report_measurement(&format!(
        "gateway paths resolved by workerd before the Worker: {resolved_by_runtime:?}"
    ));

    // Methods the gateway does not know, which workers-rs reads as GET: 405, never forwarded.
    // (workerd itself refuses methods outside HTTP's registry with a bare 501.)
    let mut unknown_methods = 0;
    for method in ["PROPFIND", "MKCOL", "PURGE", "SEARCH", "REPORT", "LOCK"] {
        let r = send(method, "/orders/1", b"").await;
        assert!(
            r.status == 405 || r.status == 501,
            "{method}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.status == 405 {
            assert_eq!(
                r.json().expect("JSON")["error"]["code"],
                "method_not_allowed"
            );
        }
        unknown_methods += 1;
    }

    // Canonical paths: forwarded byte for byte, with the query, and the upstream's check of
    // the signature passes.
    for path in CANONICAL {
        let target = format!("{path}?q=a%2Fb&x=1");
        let r = send("GET", &target, b"").await;
        let body = r.json().expect("JSON");
        assert_eq!(r.status, 200, "{target}: {body}");
        assert_eq!(body["upstream"], "demo", "{target}");
        assert_eq!(body["path"], *path);
        assert_eq!(body["query"], "q=a%2Fb&x=1");
        assert_eq!(body["subject"], "acme é", "the subject survives as UTF-8");
    }

    // Nothing outside the rules reached the upstream: every request it received has a
    // canonical path that a rule allows, and the canonical ones arrived exactly as sent.
    let log = stack.upstream.log();
    let received: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("request "))
        .collect();
    for line in &received {
        let (method, target) = line.split_once(' ').expect("method and target");
        let path = target.split('?').next().unwrap_or_default();
        assert!(check_path(path).is_ok(), "not canonical: {line}");
        assert!(
            routes.find(method, path).is_some(),
            "outside the rules: {line}"
        );
    }
    for path in CANONICAL {
        let line = format!("GET {path}?q=a%2Fb&x=1");
        assert!(received.contains(&line.as_str()), "{line} in:\n{log}");
    }

    // One signed request, replayed: with another body, another query, or as it was.
    let r = send("POST", "/orders?dry_run=1", br#"{"sku":"A-1"}"#).await;
    let answer = r.json().expect("JSON");
    assert_eq!(r.status, 200, "{answer}");
    assert_eq!(answer["key_id"], id);
    assert_eq!(answer["body"], r#"{"sku":"A-1"}"#);
    let identity = answer["identity_headers"]
        .as_object()
        .expect("identity headers")
        .clone();
    // Version 3, the default: one header.
    assert_eq!(
        identity.keys().collect::<Vec<_>>(),
        ["x-latchkey-identity"],
        "{identity:?}"
    );
    let replay = |target: &str, body: &'static str| {
        let mut req = reqwest::Client::new()
            .post(format!("{}{target}", stack.upstream.base))
            .body(body);
        for (name, value) in &identity {
            req = req.header(name.as_str(), value.as_str().expect("header value"));
        }
        TestApp::send(req)
    };
    for (target, body, why) in [
        (
            "/orders?dry_run=1",
            r#"{"sku":"B-2","qty":1000}"#,
            "the signature",
        ),
        ("/orders?dry_run=0", r#"{"sku":"A-1"}"#, "the signature"),
        ("/orders/1?dry_run=1", r#"{"sku":"A-1"}"#, "the signature"),
        ("/orders?dry_run=1", r#"{"sku":"A-1"}"#, "already accepted"),
    ] {
        let r = replay(target, body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{target} {body}");
        let error = r.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{target} {body}: {error}");
    }

    // Bodies: an endless chunked body to the verify endpoint is cut off at 64 KiB at once
    // (today it is read to the end first), and the gateway refuses one over its cap.
    let head = b"POST /v1/api_keys/verify HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = |n: usize| {
        let mut c = format!("{n:x}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(b' ', n));
        c.extend_from_slice(b"\r\n");
        c
    };
    let (status, body) =
        status_while_sending(&addr, &[head.to_vec(), chunk(40_000), chunk(40_000)]).await;
    // The Worker answers 413 at once. Under `wrangler dev`, its proxy Worker, still piping the
    // body, then fails its own fetch and answers 503 ("Your worker restarted mid-request") in
    // the Worker's place; either way the answer comes while the body is still being sent
    // (before the running cap, nothing came until the body ended), and a Worker that crashed
    // would answer neither.
    assert!(
        refused_early(status, &body),
        "answered while the body is still coming, with {status}: {body}"
    );
    // The same with a small `Content-Length` beside the chunked encoding: the declared length
    // must not be trusted to frame the body (a parser may refuse the pair outright: 400).
    let head = b"POST /v1/api_keys/verify HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (status, body) =
        status_while_sending(&addr, &[head.to_vec(), chunk(40_000), chunk(40_000)]).await;
    assert!(
        status == 400 || refused_early(status, &body),
        "a length beside chunked: answered while the body is still coming, with {status}: {body}"
    );
    let big = vec![b'x'; (1 << 20) + 1];
    let calls = stack.upstream.calls();
    let r = send("POST", "/orders", &big).await;
    let text = String::from_utf8_lossy(&r.body);
    assert!(refused_early(r.status, &text), "{} {text}", r.status);
    assert_eq!(stack.upstream.calls(), calls, "not forwarded");

    report_measurement(&format!(
        "gateway paths: {refused} ambiguous requests refused (400, 0 KV reads); {} resolved by workerd before the Worker ran ({} to an unrouted path, 404; the rest forwarded as the routed path that was matched); nothing outside the rules reached the upstream; {unknown_methods} unknown methods refused; {} canonical paths forwarded byte for byte; 4 replays of signed headers refused",
        resolved_by_runtime.len(),
        resolved_by_runtime
            .iter()
            .filter(|r| r.ends_with("404"))
            .count(),
        CANONICAL.len()
    ));
}

/// Sends `pieces` and then keeps the connection open without finishing the request; returns
/// the status of the answer that arrives meanwhile (the server need not close, nor read on).
async fn status_while_sending(addr: &str, pieces: &[Vec<u8>]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let pieces = pieces.to_vec();
    // Written apart from the reading: once the server stops reading, a write may block.
    let writer = tokio::spawn(async move {
        for piece in pieces {
            if wr.write_all(&piece).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    });
    let read_head = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match rd.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        head
    };
    let head = tokio::time::timeout(ANSWER_LIMIT, read_head).await;
    let head = head.expect("an answer while the body is still coming");
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    // The body says who answered: the Worker's JSON error, or wrangler's proxy giving up.
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(4096)
        .min(64 * 1024);
    let mut body = vec![0u8; length];
    let mut read = 0;
    while read < length {
        match tokio::time::timeout(Duration::from_secs(2), rd.read(&mut body[read..])).await {
            Ok(Ok(n)) if n > 0 => read += n,
            _ => break,
        }
    }
    writer.abort();
    body.truncate(read);
    (status, String::from_utf8_lossy(&body).to_string())
}

/// Whether a refusal of a body still coming was the Worker's own 413 (a JSON error naming the
/// cap), or `wrangler dev`'s proxy answering 503 in its place after the Worker answered early.
/// A Worker that crashed answers neither way.
fn refused_early(status: u16, body: &str) -> bool {
    (status == 413 && body.contains("\"body_too_large\""))
        || (status == 503 && body.contains(PROXY_GAVE_UP))
}

/// Sends one raw request and reads one answer by its `Content-Length` (the server may keep the
/// connection open for a while after it, `Connection: close` or not).
async fn roundtrip(addr: &str, request: &[u8]) -> hostile::RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut reply = hostile::RawReply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}")),
        head,
        body: buf[head_end + 4..].to_vec(),
        elapsed: Duration::ZERO,
    };
    let length: usize = reply
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .expect("a Content-Length");
    while reply.body.len() < length {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed inside the body");
        reply.body.extend_from_slice(&chunk[..n]);
    }
    reply.elapsed = started.elapsed();
    reply
}
