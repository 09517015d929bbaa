//! The ceiling for origin's HTTP benchmarks, and the gateway's constant upstream: a minimal axum
//! handler answering every request with a constant JSON body, on the same tokio runtime
//! settings and release profile as origin. It reads the request's body (and ignores it), as any
//! endpoint taking one must: the benchmarks send it the very requests origin gets. `CEILING_LISTEN` (default `127.0.0.1:0`); it prints
//! `listen=<addr>` once bound.

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;

/// The same allocator as origin (`origin/src/main.rs`): the ceiling differs from origin only in
/// doing nothing.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn constant(_body: Bytes) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"object":"api_key","id":"key_0123456789abcdefABCD","valid":true}"#,
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::var("CEILING_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    #[allow(
        clippy::print_stdout,
        reason = "the bench reads the address from stdout"
    )]
    {
        println!("listen={}", listener.local_addr()?);
    }
    axum::serve(listener, Router::new().fallback(constant)).await
}
