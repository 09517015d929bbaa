//! Floor for gateway traffic at the edge: one KV get of a key's record (named by the
//! `RECORD_NAME` binding), then one fetch of the upstream (`UPSTREAM_URL` + the path), whose
//! response is returned as the runtime gave it. Nothing else: no headers are touched, nothing
//! is checked but that the record exists.

use worker::js_sys::{self, futures::JsFuture};
use worker::wasm_bindgen::JsCast;
use worker::worker_sys::web_sys;
use worker::{Context, Env, Request, Response, Result, event};

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<web_sys::Response> {
    let name = env.var("RECORD_NAME")?.to_string();
    if env.kv("KEYS")?.get(&name).bytes().await?.is_none() {
        return Ok(Response::error("no record", 401)?.into());
    }
    let target = format!("{}{}", env.var("UPSTREAM_URL")?, req.path());
    let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    let response = JsFuture::from(global.fetch_with_str(&target)).await?;
    Ok(response.dyn_into()?)
}
