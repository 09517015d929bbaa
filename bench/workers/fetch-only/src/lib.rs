//! Floor for gateway traffic at the edge when the isolate's memory answers (the ledger on): one
//! fetch of the upstream (`UPSTREAM_URL` + the path), whose response is returned as the
//! runtime gave it. Nothing else: no KV read, no headers touched, nothing checked.

use worker::js_sys::{self, futures::JsFuture};
use worker::wasm_bindgen::JsCast;
use worker::worker_sys::web_sys;
use worker::{Context, Env, Request, Result, event};

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<web_sys::Response> {
    let target = format!("{}{}", env.var("UPSTREAM_URL")?, req.path());
    let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    let response = JsFuture::from(global.fetch_with_str(&target)).await?;
    Ok(response.dyn_into()?)
}
