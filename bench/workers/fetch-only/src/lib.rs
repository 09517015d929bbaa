//! Floor for gateway traffic at the edge when the isolate's memory answers (the ledger on): the
//! partner's request passed to the upstream (`UPSTREAM_URL` + its path and query, its method,
//! headers and body, redirects not followed), whose response is returned as the runtime gave
//! it. Nothing else: no KV read, no header added or removed, nothing checked.

use worker::worker_sys::web_sys;
use worker::{Context, Env, Result, event};

#[path = "../../common/pass_through.rs"]
mod pass_through;

#[event(fetch)]
async fn fetch(req: web_sys::Request, env: Env, _ctx: Context) -> Result<web_sys::Response> {
    pass_through::pass_through(&req, &env).await
}
