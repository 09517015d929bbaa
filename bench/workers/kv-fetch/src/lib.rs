//! Floor for gateway traffic at the edge: one KV get of a key's record (named by the
//! `RECORD_NAME` binding), then the partner's request passed to the upstream (`UPSTREAM_URL` +
//! its path and query, its method, headers and body, redirects not followed), whose
//! response is returned as the runtime gave it. Nothing else: no header is added or removed,
//! nothing is checked but that the record exists.

use worker::js_sys::{self, futures::JsFuture};
use worker::wasm_bindgen::JsCast;
use worker::worker_sys::web_sys;
use worker::{Context, Env, Response, Result, event};

#[event(fetch)]
async fn fetch(req: web_sys::Request, env: Env, _ctx: Context) -> Result<web_sys::Response> {
    let name = env.var("RECORD_NAME")?.to_string();
    if env.kv("KEYS")?.get(&name).bytes().await?.is_none() {
        return Ok(Response::error("no record", 401)?.into());
    }
    let url = req.url();
    // The path and query as sent: from the first `/` after the scheme's `//`.
    let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
    let target = format!("{}{path}", env.var("UPSTREAM_URL")?);
    let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    // What a pass-through proxy sends: the method, headers and body as they came (not the
    // request itself as the init, which would also copy its `cf`).
    let init = web_sys::RequestInit::new();
    init.set_method(&req.method());
    init.set_headers(&req.headers());
    if let Some(body) = req.body() {
        init.set_body(&body);
    }
    init.set_redirect(web_sys::RequestRedirect::Manual);
    let response = JsFuture::from(global.fetch_with_str_and_init(&target, &init)).await?;
    Ok(response.dyn_into()?)
}
