//! Gateway mode: the route rules decide what a request needs, the key decides whether it has
//! it, and an allowed request goes upstream with signed identity headers instead of the key.
//!
//! Answers never reveal whether a key exists: unknown, malformed, revoked and expired keys all
//! get the same 401.

use latchkey_shared::sign::{self, header};
use latchkey_shared::{KeyRecord, Verdict};
use wasm_bindgen::JsValue;
use worker::{Fetch, Headers, Method, Request, RequestInit, RequestRedirect, Response, Result};

use crate::config::Settings;
use crate::lookup::Lookup;
use crate::reply;

const REALM: &str = "latchkey";

pub(crate) async fn handle(
    req: Request,
    config: &Settings,
    lookup: &mut Lookup<'_>,
) -> Result<Response> {
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

fn unauthorized(code: &str, message: &str) -> Result<Response> {
    reply::challenge(
        401,
        code,
        message,
        &format!(r#"Bearer realm="{REALM}", error="invalid_token""#),
    )
}

/// Sends the request upstream: same method, path, query and body; the partner's credentials
/// and any client-sent `x-latchkey-*` headers removed; identity headers added and signed.
async fn forward(
    req: Request,
    config: &Settings,
    lookup: &Lookup<'_>,
    record: &KeyRecord,
) -> Result<Response> {
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
    let headers = Headers::new();
    for (name, value) in req.headers().entries() {
        let lower = name.to_ascii_lowercase();
        if lower == "authorization" || lower == "host" || lower.starts_with(header::HEADER_PREFIX) {
            continue;
        }
        headers.append(&name, &value)?;
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

    let mut init = RequestInit::new();
    init.with_method(method.clone())
        .with_headers(headers)
        .with_redirect(RequestRedirect::Manual);
    if !matches!(method, Method::Get | Method::Head) {
        init.with_body(req.inner().body().map(JsValue::from));
    }
    let upstream_response = match Fetch::Request(Request::new_with_init(&target, &init)?)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => {
            worker::console_error!("upstream request failed: {e}");
            return reply::error(
                502,
                "upstream_unavailable",
                "the upstream service did not answer",
            );
        }
    };
    if !config.debug_headers {
        // Passed through as it is: nothing is added to it.
        return Ok(upstream_response);
    }
    // A fetched response's headers are immutable; copy them so the debug header can be added.
    let headers = Headers::new();
    for (name, value) in upstream_response.headers().entries() {
        headers.append(&name, &value)?;
    }
    let status = upstream_response.status_code();
    let (_, body) = upstream_response.into_parts();
    Ok(Response::builder()
        .with_status(status)
        .with_headers(headers)
        .body(body))
}
