//! Ceiling for garbage-key traffic at the edge: the request body read (if it has one), then a
//! constant JSON body. No KV read.

use worker::{Context, Env, Request, Response, Result, event};

#[event(fetch)]
async fn fetch(mut req: Request, _env: Env, _ctx: Context) -> Result<Response> {
    // Unread, the body makes workerd drop the keep-alive connection after answering.
    if req.inner().body().is_some() {
        req.bytes().await?;
    }
    Response::from_json(&CONSTANT)
}

/// About the size of the edge's answer to a malformed key.
const CONSTANT: &str =
    r#"{"id":null,"valid":false,"code":"MALFORMED","revoked":false,"scopes":[],"expires_at":null}"#;
