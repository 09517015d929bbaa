//! Gateway mode: the route rules decide what a request needs, the key decides whether it has
//! it, and an allowed request goes upstream with signed identity headers instead of the key.
//!
//! Answers never reveal whether a key exists: unknown, malformed, revoked, expired and disabled
//! keys all get the same 401.

use js_sys::futures::JsFuture;
use latchkey_shared::ip::gateway_client;
use latchkey_shared::sign::gateway::{
    SignedRequest, Version as SignatureVersion, content_sha256, header,
};
use latchkey_shared::target::RequestTarget;
use latchkey_shared::{KeyRecord, Verdict};
use wasm_bindgen::JsCast;
use worker::worker_sys::web_sys;
use worker::{Headers, Result};

use crate::body;
use crate::config::Settings;
use crate::lookup::Lookup;
use crate::reply;

#[wasm_bindgen::prelude::wasm_bindgen(module = "/src/forward.js")]
extern "C" {
    /// `forward.js`: fetches the URL of `spec` (its lines: URL, method, the prefix of header
    /// names to drop, then the signed headers' names and values) with the partner's headers
    /// less its credentials and the prefixed ones, plus the signed ones.
    #[wasm_bindgen(js_name = forwardUpstream, catch)]
    fn forward_upstream(
        spec: &str,
        incoming: &web_sys::Headers,
        body: Option<js_sys::Uint8Array>,
    ) -> std::result::Result<js_sys::Promise, wasm_bindgen::JsValue>;
}

const REALM: &str = "latchkey";

/// Handles a gateway request whose method is known and whose path is canonical (`fetch`
/// checked both): the path that is matched here is the one signed and forwarded.
pub(crate) async fn handle(
    req: web_sys::Request,
    method: &str,
    target: RequestTarget<'_>,
    config: &Settings,
    lookup: &mut Lookup<'_>,
) -> Result<web_sys::Response> {
    let path = target.path;
    let Some(rule) = config.routes.find(method, path) else {
        return reply::error(
            404,
            "route_not_found",
            "no gateway route matches this method and path",
        );
    };
    // The partner's headers, read once: the key from them here, the rest forwarded.
    let headers = req.headers();
    let Some(presented) = bearer(&Headers(headers.clone()))? else {
        return unauthorized(
            "missing_credentials",
            "send the API key as `Authorization: Bearer <key>`",
        );
    };
    // Where the partner is, as Cloudflare saw it (Cloudflare sets the header), read only for a
    // key with an allowlist. Missing or unreadable, it is unknown, and such a key fails; so it
    // is for a subrequest of another Worker in the same zone (it carries `CF-Worker`), which
    // can set `CF-Connecting-IP` itself (`gateway_client`).
    let client = || {
        let header = |name: &str| headers.get(name).ok().flatten();
        gateway_client(
            header("cf-connecting-ip").as_deref(),
            header("cf-worker").as_deref(),
        )
    };
    let (verdict, record) = match lookup
        .verify(&presented, rule.required_scopes(), client)
        .await
    {
        Ok(outcome) => outcome,
        Err(unavailable) => {
            worker::console_error!("gateway denied {method} {path}, {unavailable}");
            let (code, message) = unavailable.reply();
            return reply::error(503, code, message);
        }
    };
    // Every verdict by name, so that a new one is decided here on purpose (the compiler asks),
    // never folded into a 401 by a wildcard.
    match verdict {
        Verdict::Valid => match record {
            Some(record) => forward(req, &headers, method, target, config, lookup, &record).await,
            // `decide` answers `Valid` only with a record; deny rather than forward unsigned.
            None => reply::error(500, "internal_error", "the key could not be checked"),
        },
        Verdict::InsufficientScope { missing } => {
            let scopes: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            let scopes = scopes.join(" ");
            reply::challenge(
                403,
                "insufficient_scope",
                &format!("the API key lacks the scopes this route needs: {scopes}"),
                &format!(r#"Bearer realm="{REALM}", error="insufficient_scope", scope="{scopes}""#),
            )
        }
        // A key that exists and is live, used from elsewhere: the answer says so, but not
        // from where it may be used.
        Verdict::IpNotAllowed => reply::error(
            403,
            "ip_not_allowed",
            "the API key may not be used from this address",
        ),
        // One answer for all of these, so that it never tells whether a key exists.
        Verdict::NotFound
        | Verdict::Malformed
        | Verdict::Revoked
        | Verdict::Expired
        | Verdict::Disabled => unauthorized("invalid_key", "the API key is not valid"),
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

/// Sends the request upstream: same method, canonical path, query and body; the partner's
/// credentials and any client-sent `x-latchkey-*` headers removed; identity headers added and
/// signed (version 3, or 2 if so configured: `latchkey_shared::sign::gateway`). The upstream's
/// response is returned as the runtime gave it, not rebuilt.
///
/// The body is read whole (up to `GATEWAY_BODY_MAX_BYTES`) because its digest is signed. The
/// signature is made here; the header copying and the `fetch` happen in one call to
/// `forward.js` (each crossing of the wasm boundary costs more than the work it carries: the
/// header surgery done crossing by crossing cost more CPU than the upstream fetch itself). The
/// runtime's `fetch` gets a URL and an init (not a `Request` it would copy again), and the
/// response goes back untouched (`worker::Response` would rebuild it around a new stream).
async fn forward(
    req: web_sys::Request,
    headers: &web_sys::Headers,
    method: &str,
    target: RequestTarget<'_>,
    config: &Settings,
    lookup: &Lookup<'_>,
    record: &KeyRecord,
) -> Result<web_sys::Response> {
    let (Some(upstream), Some(secret)) = (&config.upstream, &config.upstream_secret) else {
        // Config parsing requires both when there are routes; this is unreachable in practice.
        return reply::error(503, "edge_misconfigured", "no upstream is configured");
    };
    // GET and HEAD are forwarded without a body; others with the one signed.
    let body = if matches!(method, "GET" | "HEAD") {
        Vec::new()
    } else {
        match body::read_capped(&req, config.gateway_body_max).await? {
            Some(body) => body,
            None => {
                return reply::error(
                    413,
                    "body_too_large",
                    &format!(
                        "the request body is larger than {} bytes",
                        config.gateway_body_max
                    ),
                );
            }
        }
    };
    // Joined without `format!`, which showed in the Worker's profile.
    let forwarded_path = [upstream.path(), target.path].concat();
    let url = if target.query.is_empty() {
        [upstream.base(), target.path].concat()
    } else {
        [upstream.base(), target.path, "?", target.query].concat()
    };
    let mut scopes = String::with_capacity(record.scopes.len() * 16);
    for scope in record.scopes.iter() {
        if !scopes.is_empty() {
            scopes.push(' ');
        }
        scopes.push_str(scope.as_str());
    }
    let request_id = random_uuid()?;
    let digest = content_sha256(&body);
    let signed = SignedRequest {
        timestamp: lookup.now(),
        request_id: &request_id,
        method,
        path: &forwarded_path,
        query: target.query,
        content_sha256: &digest,
        key_id: record.id.as_str(),
        subject: &record.subject,
        scopes: &scopes,
    };
    // No line can hold a line break: the method is from a closed table, the path canonical, the
    // query as the runtime's URL parser left it (which drops tabs and line breaks), the subject
    // percent-encoded, the scopes, ids and digests of plain characters. Counted all the same:
    // a line too many would shift what `forward.js` reads as the method and the prefix.
    let mut spec = [url.as_str(), "\n", method, "\n", header::HEADER_PREFIX].concat();
    let pairs = match config.upstream_signature {
        SignatureVersion::V3 => {
            push_header(&mut spec, header::IDENTITY, &signed.identity(secret));
            1
        }
        SignatureVersion::V2 => {
            let headers = signed.headers(secret);
            for (name, value) in &headers {
                push_header(&mut spec, name, value);
            }
            headers.len()
        }
    };
    if spec.bytes().filter(|&b| b == b'\n').count() != 2 + 2 * pairs {
        worker::console_error!("forwarding refused: a forwarded field holds a line break");
        return reply::error(500, "internal_error", "the request could not be forwarded");
    }
    let body =
        (!matches!(method, "GET" | "HEAD")).then(|| js_sys::Uint8Array::from(body.as_slice()));
    let sent = match forward_upstream(&spec, headers, body) {
        Ok(sent) => sent,
        Err(e) => {
            // Nothing was sent: the request could not be formed (not the upstream's fault).
            worker::console_error!("forwarding failed: {}", worker::Error::from(e));
            return reply::error(500, "internal_error", "the request could not be forwarded");
        }
    };
    let upstream_response = match JsFuture::from(sent)
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

/// Adds a signed header's name and value to `forward.js`'s spec, a line each.
fn push_header(spec: &mut String, name: &str, value: &str) {
    spec.push('\n');
    spec.push_str(name);
    spec.push('\n');
    spec.push_str(value);
}

thread_local! {
    /// `crypto` and its `randomUUID`, looked up once per isolate.
    static RANDOM_UUID: std::cell::RefCell<Option<(wasm_bindgen::JsValue, js_sys::Function)>> =
        const { std::cell::RefCell::new(None) };
}

/// A fresh request id: `crypto.randomUUID()` (122 random bits from the runtime's CSPRNG).
fn random_uuid() -> Result<String> {
    let (crypto, random_uuid) = RANDOM_UUID.with(|cell| -> Result<_> {
        if let Some(found) = cell.borrow().as_ref() {
            return Ok(found.clone());
        }
        let crypto = js_sys::Reflect::get(&js_sys::global(), &"crypto".into())?;
        let random_uuid: js_sys::Function =
            js_sys::Reflect::get(&crypto, &"randomUUID".into())?.dyn_into()?;
        *cell.borrow_mut() = Some((crypto.clone(), random_uuid.clone()));
        Ok((crypto, random_uuid))
    })?;
    random_uuid
        .call0(&crypto)?
        .as_string()
        .ok_or_else(|| worker::Error::RustError("crypto.randomUUID() gave no string".into()))
}
