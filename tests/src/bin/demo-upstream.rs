//! A small upstream API for the edge gateway, used by `./dev run` and the end-to-end tests.
//!
//! It does what a real upstream behind Latchkey should: it trusts the `x-latchkey-*` identity
//! headers (version 3's one or version 2's eight) only after `GatewayVerifier` checked them
//! (signature over method, path, query, body digest and identity; timestamp; request id never
//! seen before), and it answers with what it
//! saw, so a test can assert the edge forwarded the right identity, path, query and body, and
//! never the partner's key. It logs one line per request with the method and the request
//! target exactly as received (`request GET /orders/1?x=2`), before any check.
//!
//! Environment: `UPSTREAM_LISTEN` (default 127.0.0.1:8788), `UPSTREAM_SIGNING_SECRET`
//! (required). It logs `demo upstream listening listen=ADDR` once bound.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use latchkey_shared::UnixMillis;
use latchkey_shared::sign::SigningSecret;
use latchkey_shared::sign::gateway::{GatewayVerifier, Received, header};
use serde_json::json;

/// Request ids remembered for replay protection: ten minutes at about 1,600 requests/s.
const REPLAY_CAPACITY: usize = 1_000_000;

/// Largest body read.
const BODY_MAX: usize = 100 << 20;

type Verifier = Arc<Mutex<GatewayVerifier>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let listen: SocketAddr = std::env::var("UPSTREAM_LISTEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8788)));
    let secret =
        match SigningSecret::parse(&std::env::var("UPSTREAM_SIGNING_SECRET").unwrap_or_default()) {
            Ok(secret) => secret,
            Err(e) => {
                log(&format!("UPSTREAM_SIGNING_SECRET {e}"));
                return std::process::ExitCode::FAILURE;
            }
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
        .with_state(Arc::new(Mutex::new(GatewayVerifier::new(
            secret,
            REPLAY_CAPACITY,
        ))));
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("server error: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn echo(State(verifier): State<Verifier>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // One line per request, as received: the tests read them to prove what reached the upstream.
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    log(&format!("request {} {target}", parts.method));
    let Ok(body) = axum::body::to_bytes(body, BODY_MAX).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(json!({ "error": "body too large or cut short" })),
        )
            .into_response();
    };
    let headers = &parts.headers;
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = UnixMillis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    );
    let received = Received {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or_default(),
        body: &body,
    };
    let checked = verifier
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .verify(&received, text, now);
    let identity = match checked {
        Ok(identity) => identity,
        Err(e) => {
            log(&format!("refused {} {target}: {e}", parts.method));
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(
                    json!({ "error": format!("identity headers not signed by the edge: {e}") }),
                ),
            )
                .into_response();
        }
    };
    axum::Json(json!({
        "upstream": "demo",
        "method": parts.method.as_str(),
        "path": received.path,
        "query": parts.uri.query(),
        "key_id": identity.key_id,
        "subject": identity.subject,
        "scopes": identity.scopes.join(" "),
        "request_id": identity.request_id,
        "authorization_forwarded": headers.contains_key("authorization"),
        "other_latchkey_headers": other_latchkey_headers(headers),
        // What a replay needs: the tests send these again with another body or query. Those
        // of either version that came (version 3: one).
        "identity_headers": std::iter::once(header::IDENTITY)
            .chain(header::ALL)
            .filter_map(|name| Some((name.to_string(), json!(text(name)?))))
            .collect::<serde_json::Map<_, _>>(),
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

/// `x-latchkey-*` headers other than the ones of the version the edge sent: a client trying to
/// smuggle one in (`x-latchkey-subject` beside a version 3 header, say) must find it gone.
fn other_latchkey_headers(headers: &HeaderMap) -> Vec<String> {
    let ours: &[&str] = if headers.contains_key(header::IDENTITY) {
        &[header::IDENTITY]
    } else {
        &header::ALL
    };
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
