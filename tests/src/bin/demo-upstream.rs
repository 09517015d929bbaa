//! A small upstream API for the edge gateway, used by `./dev run` and the end-to-end tests.
//!
//! It does what a real upstream behind Latchkey should: it trusts the `x-latchkey-*` identity
//! headers only after checking their HMAC-SHA256 signature and timestamp, and it answers with
//! what it saw, so a test can assert the edge forwarded the right identity, path, query and
//! body, and never the partner's key.
//!
//! Environment: `UPSTREAM_LISTEN` (default 127.0.0.1:8788), `UPSTREAM_SIGNING_SECRET`
//! (required). It logs `demo upstream listening listen=ADDR` once bound.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use latchkey_shared::UnixMillis;
use latchkey_shared::sign::{self, header};
use serde_json::json;

#[derive(Clone)]
struct Secret(std::sync::Arc<Vec<u8>>);

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let listen: SocketAddr = std::env::var("UPSTREAM_LISTEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8788)));
    let Some(secret) = std::env::var("UPSTREAM_SIGNING_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        log("UPSTREAM_SIGNING_SECRET is required");
        return std::process::ExitCode::FAILURE;
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            log(&format!("cannot listen on {listen}: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    let bound = listener.local_addr().map_or(listen, |a| a);
    log(&format!("demo upstream listening listen={bound}"));
    let app = Router::new()
        .fallback(echo)
        .with_state(Secret(std::sync::Arc::new(secret.into_bytes())));
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("server error: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn echo(State(secret): State<Secret>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // One line per request: the tests count them to prove what never reached the upstream.
    log(&format!("request {} {}", parts.method, parts.uri.path()));
    let body: Bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let headers = &parts.headers;
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let now = UnixMillis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    );
    let path = parts.uri.path();
    let checked = sign::verify_signed(
        &secret.0,
        headers.get(header::TIMESTAMP).and_then(|v| v.to_str().ok()),
        headers.get(header::SIGNATURE).and_then(|v| v.to_str().ok()),
        now,
        |t| {
            sign::gateway_message(
                t,
                parts.method.as_str(),
                path,
                text(header::KEY_ID),
                text(header::SUBJECT),
                text(header::SCOPES),
            )
            .into_bytes()
        },
    );
    if let Err(e) = checked {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "error": format!("identity headers not signed by the edge: {e}") })),
        )
            .into_response();
    }
    axum::Json(json!({
        "upstream": "demo",
        "method": parts.method.as_str(),
        "path": path,
        "query": parts.uri.query(),
        "key_id": text(header::KEY_ID),
        "subject": text(header::SUBJECT),
        "scopes": text(header::SCOPES),
        "authorization_forwarded": headers.contains_key("authorization"),
        "other_latchkey_headers": other_latchkey_headers(headers),
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

/// `x-latchkey-*` headers other than the five the edge sets: a client trying to smuggle one in
/// must find it gone.
fn other_latchkey_headers(headers: &HeaderMap) -> Vec<String> {
    let ours = [
        header::KEY_ID,
        header::SUBJECT,
        header::SCOPES,
        header::TIMESTAMP,
        header::SIGNATURE,
    ];
    headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with(header::HEADER_PREFIX) && !ours.contains(&k.as_str()))
        .collect()
}

#[allow(clippy::print_stderr, reason = "a demo server's only log line")]
fn log(message: &str) {
    eprintln!("{message}");
}
