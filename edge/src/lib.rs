//! Latchkey's edge: a Cloudflare Worker that verifies partner API keys against Workers KV, with
//! no call back to origin.
//!
//! Two ways in (`fetch` dispatches):
//! * `POST /v1/api_keys/verify`: an edge answer with the same contract as origin's tutorial
//!   verify (`verify_api.rs`).
//! * everything else is gateway traffic (`gateway.rs`): a request carrying
//!   `Authorization: Bearer <key>` is checked against the route rules and, if allowed, forwarded
//!   to the upstream with signed identity headers.
//!
//! Before either, the method must be a known one and the path canonical
//! (`latchkey_shared::target`): anything else is refused before any KV read.
//!
//! Both paths go through `lookup.rs`, which parses the presented key first (garbage costs no KV
//! read) and then makes the shared crate's one decision on the KV record. Settings are parsed
//! once per isolate (`config.rs`). Successful verifications are reported to origin in batches
//! (`usage.rs`).

use latchkey_shared::ledger as ledger_api;
use latchkey_shared::target::{self, RequestTarget};
use worker::worker_sys::web_sys::{Request, Response};
use worker::{Context, Env, Result, event};

mod body;
mod config;
mod gateway;
mod ledger;
mod lookup;
mod memory;
mod reply;
mod usage;
mod verify_api;

use config::{Config, Settings};
use lookup::Lookup;

/// The path of the edge's own verify endpoint; gateway rules cannot claim it.
pub const VERIFY_PATH: &str = "/v1/api_keys/verify";

/// Debug header naming how many KV reads the request made: only sent when `DEBUG_HEADERS` is
/// `true`, which the tests set to show that garbage keys cost none.
const KV_READS_HEADER: &str = "x-latchkey-debug-kv-reads";
/// Debug header: how many requests this isolate has made to the ledger object so far.
const LEDGER_FETCHES_HEADER: &str = "x-latchkey-debug-ledger-fetches";
/// Debug header: where the request's key record came from (`hit`, `miss`, `untrusted`, `off`,
/// `none`).
const MEMORY_HEADER: &str = "x-latchkey-debug-memory";
/// Debug headers of an answer from trusted memory: how old the sync and origin's watermark that
/// trusted it were, in ms (`none` if there was none).
const SYNC_AGE_HEADER: &str = "x-latchkey-debug-sync-age-ms";
const WATERMARK_AGE_HEADER: &str = "x-latchkey-debug-watermark-age-ms";

/// The Worker's entry point. It takes the runtime's request as it is: `worker::Request` would
/// read the request's `cf` object on every request (a JSON clone under workerd), which nothing
/// here uses.
#[event(fetch)]
pub async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let config = match Settings::for_isolate(&env) {
        Ok(config) => config,
        Err(error) => {
            worker::console_error!("latchkey edge is misconfigured: {error}");
            return reply::error(503, "edge_misconfigured", &error.to_string());
        }
    };
    // The method as sent (not workers-rs's `Method`, which reads methods it does not know as
    // GET) and the URL as the runtime holds it (not decoded).
    let method = req.method();
    let url = req.url();
    let mut lookup = Lookup::new(&env, &ctx, &config);
    let response = respond(req, &method, &url, &env, &config, &mut lookup).await?;
    if usage::record(&config, lookup.used_keys(), lookup.now()) {
        ctx.wait_until(usage::send_after_interval(config.clone()));
    }
    if config.debug_headers {
        let headers = response.headers();
        headers.set(KV_READS_HEADER, &lookup.kv_reads().to_string())?;
        headers.set(LEDGER_FETCHES_HEADER, &memory::ledger_fetches().to_string())?;
        headers.set(MEMORY_HEADER, lookup.source().as_str())?;
        if let Some((sync, watermark)) = lookup.trust_ages() {
            let text = |age: Option<i64>| age.map_or_else(|| "none".to_owned(), |a| a.to_string());
            headers.set(SYNC_AGE_HEADER, &text(sync))?;
            headers.set(WATERMARK_AGE_HEADER, &text(watermark))?;
        }
    }
    Ok(response)
}

/// The answer to one request whose settings are good: method and path checks, then the verify
/// endpoint, the ledger's append route or the gateway.
async fn respond(
    req: Request,
    method: &str,
    url: &str,
    env: &Env,
    config: &Config,
    lookup: &mut Lookup<'_>,
) -> Result<Response> {
    Ok(if !target::is_known_method(method) {
        reply::error(
            405,
            "method_not_allowed",
            &format!("the method must be one of {}", target::METHODS.join(" ")),
        )?
    } else {
        match RequestTarget::from_url(url) {
            Err(e) => reply::error(400, "ambiguous_path", &e.to_string())?,
            Ok(target) if target.path == VERIFY_PATH => {
                if method == "POST" {
                    verify_api::handle(req, lookup).await?
                } else {
                    reply::error(
                        405,
                        "method_not_allowed",
                        "use POST for /v1/api_keys/verify",
                    )?
                }
            }
            Ok(target) if target.path == ledger_api::APPEND_PATH => {
                if method == "POST" {
                    ledger::append(req, env, config, lookup.now()).await?
                } else {
                    reply::error(
                        405,
                        "method_not_allowed",
                        "use POST to append to the ledger",
                    )?
                }
            }
            Ok(target) => gateway::handle(req, method, target, config, lookup).await?,
        }
    })
}
