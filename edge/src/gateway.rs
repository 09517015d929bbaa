//! Gateway mode: the route rules decide what a request needs, the key decides whether it has
//! it, and an allowed request goes upstream with signed identity headers instead of the key.
//!
//! Answers never reveal whether a key exists: unknown, malformed, revoked and expired keys all
//! get the same 401.

use js_sys::futures::JsFuture;
use latchkey_shared::sign::{self, header};
use latchkey_shared::{KeyRecord, Verdict};
use wasm_bindgen::JsCast;
use worker::worker_sys::web_sys;
use worker::{Headers, Method, Request, Result};

use crate::config::Settings;
use crate::lookup::Lookup;
use crate::reply;

const REALM: &str = "latchkey";

pub(crate) async fn handle(
    req: Request,
    config: &Settings,
    lookup: &mut Lookup<'_>,
) -> Result<web_sys::Response> {
    let method = req.method();
    let path = req.path();
    let Some(rule) = config.routes.find(method.as_ref(), &path) else {
        return reply::error(
            404,
            "route_not_found",
            "no gateway route matches this method and path",
        );
    };
    let Some(presented) = bearer(req.headers())? else {
        return unauthorized(
            "missing_credentials",
            "send the API key as `Authorization: Bearer <key>`",
        );
    };
    let (verdict, record) = match lookup.verify(&presented, rule.required_scopes()).await {
        Ok(outcome) => outcome,
        Err(unavailable) => {
            worker::console_error!("gateway denied {} {path}, {unavailable}", method.as_ref());
            return reply::error(
                503,
                "kv_unavailable",
                "the key store cannot be read; try again",
            );
        }
    };
    match (verdict, record) {
        (Verdict::Valid, Some(record)) => forward(req, config, lookup, &record).await,
        (Verdict::InsufficientScope { missing }, _) => {
            let scopes: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            let scopes = scopes.join(" ");
            reply::challenge(
                403,
                "insufficient_scope",
                &format!("the API key lacks the scopes this route needs: {scopes}"),
                &format!(r#"Bearer realm="{REALM}", error="insufficient_scope", scope="{scopes}""#),
            )
        }
        _ => unauthorized("invalid_key", "the API key is not valid"),
    }
}

/// The bearer token of the one `Authorization` header, if it has the Bearer scheme. Several
/// `Authorization` headers arrive joined by commas and so never form a valid key.
fn bearer(headers: &Headers) -> Result<Option<String>> {
    let Some(value) = headers.get("authorization")? else {
        return Ok(None);
    };
    let mut parts = value.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next().map(str::trim).unwrap_or_default();
    Ok((scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned()))
}

fn unauthorized(code: &str, message: &str) -> Result<web_sys::Response> {
    reply::challenge(
        401,
        code,
        message,
        &format!(r#"Bearer realm="{REALM}", error="invalid_token""#),
    )
}

/// Sends the request upstream: same method, path, query and body; the partner's credentials
/// and any client-sent `x-latchkey-*` headers removed; identity headers added and signed. The
/// upstream's response is returned as the runtime gave it, not rebuilt.
///
/// This is the gateway's hot path, and its cost is almost all runtime objects, not Rust code:
/// the headers are copied by the runtime in one call (not entry by entry across the wasm
/// boundary), the runtime's `fetch` gets a URL and an init (not a `Request` it would copy
/// again), and the response goes back untouched (`worker::Response` would rebuild it around a
/// new stream).
async fn forward(
    req: Request,
    config: &Settings,
    lookup: &Lookup<'_>,
    record: &KeyRecord,
) -> Result<web_sys::Response> {
    let (Some(upstream), Some(secret)) = (&config.upstream, &config.upstream_secret) else {
        // Config parsing requires both when there are routes; this is unreachable in practice.
        return reply::error(503, "edge_misconfigured", "no upstream is configured");
    };
    // The path as the runtime parsed it, and the query from the raw URL: `Request::url()` would
    // parse the URL again with the `url` crate, whose IDNA tables alone would put the Worker over
    // its size budget.
    let path = req.path();
    let raw_url = req.inner().url();
    let target = match raw_url.split_once('?') {
        Some((_, query)) => {
            let query = query.split_once('#').map_or(query, |(q, _)| q);
            format!("{upstream}{path}?{query}")
        }
        None => format!("{upstream}{path}"),
    };
    let headers = Headers(web_sys::Headers::new_with_headers(&req.headers().0)?);
    // Names come back lower-cased; collected first, since deleting while iterating skips some.
    let dropped: Vec<String> = headers
        .keys()
        .filter(|name| {
            name == "authorization" || name == "host" || name.starts_with(header::HEADER_PREFIX)
        })
        .collect();
    for name in &dropped {
        headers.delete(name)?;
    }
    let method = req.method();
    let scopes = record.scopes.to_strings().join(" ");
    let now = lookup.now();
    let message = sign::gateway_message(
        now,
        method.as_ref(),
        &path,
        record.id.as_str(),
        &record.subject,
        &scopes,
    );
    headers.set(header::KEY_ID, record.id.as_str())?;
    headers.set(header::SUBJECT, &record.subject)?;
    headers.set(header::SCOPES, &scopes)?;
    headers.set(header::TIMESTAMP, &now.0.to_string())?;
    headers.set(header::SIGNATURE, &sign::sign(secret, message.as_bytes()))?;

    let init = web_sys::RequestInit::new();
    init.set_method(method.as_ref());
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    if !matches!(method, Method::Get | Method::Head)
        && let Some(body) = req.inner().body()
    {
        init.set_body(&body);
    }
    let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    let upstream_response = match JsFuture::from(global.fetch_with_str_and_init(&target, &init))
        .await
        .and_then(JsCast::dyn_into::<web_sys::Response>)
    {
        Ok(response) => response,
        Err(e) => {
            let e = worker::Error::from(e);
            worker::console_error!("upstream request failed: {e}");
            return reply::error(
                502,
                "upstream_unavailable",
                "the upstream service did not answer",
            );
        }
    };
    if !config.debug_headers {
        return Ok(upstream_response);
    }
    // A fetched response's headers are immutable: copy them so the debug header can be added.
    let init = web_sys::ResponseInit::new();
    init.set_status(upstream_response.status());
    init.set_headers(&web_sys::Headers::new_with_headers(&upstream_response.headers())?.into());
    Ok(web_sys::Response::new_with_opt_readable_stream_and_init(
        upstream_response.body().as_ref(),
        &init,
    )?)
}
