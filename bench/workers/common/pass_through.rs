//! What the two gateway floors (`kv-fetch`, `fetch-only`) share: the partner's request passed
//! to the upstream as a minimal proxy passes it. Included by path (`#[path]`), not a crate: the
//! floors stay one file each of plain workers-rs.

use worker::js_sys::{self, futures::JsFuture};
use worker::wasm_bindgen::JsCast;
use worker::worker_sys::web_sys;
use worker::{Env, Result};

/// Sends `req` to `UPSTREAM_URL` + its path and query, with its method, headers and body
/// (not the request itself as the init, which would also copy its `cf`), redirects not
/// followed; the upstream's response is returned as the runtime gave it.
pub(crate) async fn pass_through(req: &web_sys::Request, env: &Env) -> Result<web_sys::Response> {
    let url = req.url();
    // The path and query as sent: from the first `/` after the scheme's `//`.
    let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
    let target = format!("{}{path}", env.var("UPSTREAM_URL")?);
    let init = web_sys::RequestInit::new();
    init.set_method(&req.method());
    init.set_headers(&req.headers());
    if let Some(body) = req.body() {
        init.set_body(&body);
    }
    init.set_redirect(web_sys::RequestRedirect::Manual);
    let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    let response = JsFuture::from(global.fetch_with_str_and_init(&target, &init)).await?;
    Ok(response.dyn_into()?)
}
