//! Floor for gateway traffic at the edge: one KV get of a key's record (named by the
//! `RECORD_NAME` binding), then the partner's request passed to the upstream (`UPSTREAM_URL` +
//! its path and query, its method, headers and body, redirects not followed), whose
//! response is returned as the runtime gave it. Nothing else: no header is added or removed,
//! nothing is checked but that the record exists.

use worker::worker_sys::web_sys;
use worker::{Context, Env, Response, Result, event};

#[path = "../../common/pass_through.rs"]
mod pass_through;

#[event(fetch)]
async fn fetch(req: web_sys::Request, env: Env, _ctx: Context) -> Result<web_sys::Response> {
    let name = env.var("RECORD_NAME")?.to_string();
    if env.kv("KEYS")?.get(&name).bytes().await?.is_none() {
        return Ok(Response::error("no record", 401)?.into());
    }
    pass_through::pass_through(&req, &env).await
}
