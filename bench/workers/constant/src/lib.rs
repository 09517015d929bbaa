//! Ceiling for garbage-key traffic at the edge: the request body read (if it has one), then a
//! constant JSON body. No KV read.
//!
//! Like every ceiling and floor here (and the edge itself), it takes the runtime's request as
//! it is: `worker::Request` would read the request's `cf` object on every request.

use worker::js_sys::futures::JsFuture;
use worker::worker_sys::web_sys;
use worker::{Context, Env, Response, Result, event};

#[event(fetch)]
async fn fetch(req: web_sys::Request, _env: Env, _ctx: Context) -> Result<Response> {
    // Unread, the body makes workerd drop the keep-alive connection after answering.
    if req.body().is_some() {
        JsFuture::from(req.array_buffer()?).await?;
    }
    Response::from_json(&CONSTANT)
}

/// The answer: the shape of a verify report for a garbage key.
const CONSTANT: &str =
    r#"{"id":null,"valid":false,"code":"MALFORMED","revoked":false,"scopes":[],"expires_at":null}"#;
