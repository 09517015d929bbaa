//! Ceiling for valid-key traffic at the edge: the unavoidable work, the request body read (if
//! it has one) and one KV get of a key's record (named by the `RECORD_NAME` binding), returned
//! as it is. Nothing else.

use worker::js_sys::futures::JsFuture;
use worker::worker_sys::web_sys;
use worker::{Context, Env, Response, Result, event};

#[event(fetch)]
async fn fetch(req: web_sys::Request, env: Env, _ctx: Context) -> Result<Response> {
    // Unread, the body makes workerd drop the keep-alive connection after answering.
    if req.body().is_some() {
        JsFuture::from(req.array_buffer()?).await?;
    }
    let name = env.var("RECORD_NAME")?.to_string();
    let record = env
        .kv("KEYS")?
        .get(&name)
        .bytes()
        .await?
        .unwrap_or_default();
    Response::from_bytes(record)
}
