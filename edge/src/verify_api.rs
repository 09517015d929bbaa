//! `POST /v1/api_keys/verify` at the edge: `{key, required_scopes?, client_ip?}` in, the shared
//! [`VerifyReport`] out, exactly as origin's tutorial verify answers (minus the two fields only
//! origin knows: `created_at` and `last_used_at`).

use latchkey_shared::ip::parse_client_field;
use latchkey_shared::{VerifyReport, VerifyRequest, parse_required};
use worker::Result;
use worker::worker_sys::web_sys::{Request, Response};

use crate::body;
use crate::lookup::Lookup;
use crate::reply;

/// Largest request body accepted, as at origin.
const BODY_MAX_BYTES: usize = 64 * 1024;

pub(crate) async fn handle(req: Request, lookup: &mut Lookup<'_>) -> Result<Response> {
    let Some(body) = body::read_capped(&req, BODY_MAX_BYTES).await? else {
        return too_large();
    };
    // As at origin, an empty body is an empty object (so the answer names the missing field).
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    // serde would read `["key", []]` as the struct: like origin, take objects only.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
    {
        return reply::error(
            422,
            "form_param_invalid",
            "the request body must be a JSON object",
        );
    }
    let request: VerifyRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) if e.is_data() => {
            return reply::error(422, "form_param_invalid", &e.to_string());
        }
        Err(e) => {
            return reply::error(
                400,
                "malformed_json",
                &format!("the body is not valid JSON: {e}"),
            );
        }
    };
    let required = match parse_required(&request.required_scopes) {
        Ok(required) => required,
        Err(e) => {
            return reply::field_error(
                422,
                "form_param_invalid",
                &e.to_string(),
                "required_scopes",
            );
        }
    };
    // The address is the caller's word, as at origin: this endpoint answers whether the key
    // would pass from there (the gateway, which grants access, takes Cloudflare's). So
    // `CF-Connecting-IP` and `CF-Worker` mean nothing here: any caller may name any address.
    let client = match parse_client_field(request.client_ip.as_deref()) {
        Ok(client) => client,
        Err(e) => {
            return reply::field_error(422, "form_param_invalid", &e.to_string(), "client_ip");
        }
    };
    match lookup.verify(&request.key, &required, || client).await {
        Ok((verdict, record)) => reply::json(200, &VerifyReport::new(&verdict, record.as_deref())),
        Err(unavailable) => {
            worker::console_error!("verify denied, {unavailable}");
            let (code, message) = unavailable.reply();
            reply::error(503, code, message)
        }
    }
}

fn too_large() -> Result<Response> {
    reply::error(
        413,
        "body_too_large",
        "the request body is larger than 64 KiB",
    )
}
