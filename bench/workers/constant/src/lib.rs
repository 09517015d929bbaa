//! Ceiling for garbage-key traffic at the edge: a constant JSON body, no KV read.

use worker::{Context, Env, Request, Response, Result, event};

#[event(fetch)]
async fn fetch(_req: Request, _env: Env, _ctx: Context) -> Result<Response> {
    Response::from_json(&CONSTANT)
}

/// About the size of the edge's answer to a malformed key.
const CONSTANT: &str =
    r#"{"id":null,"valid":false,"code":"MALFORMED","revoked":false,"scopes":[],"expires_at":null}"#;
