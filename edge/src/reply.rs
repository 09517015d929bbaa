//! The edge's JSON answers. Errors use the tutorial surface's envelope
//! (`{"success":false,"error":{code,message}}`), the contract of the verify endpoint.
//!
//! Handlers answer with the runtime's own `Response` (`web_sys::Response`), so an upstream's
//! response can be passed through as it is; these build ours.

use serde::Serialize;
use serde_json::json;
use worker::Result;
use worker::worker_sys::web_sys::Response;

/// A JSON body with `status`.
pub(crate) fn json<T: Serialize>(status: u16, body: &T) -> Result<Response> {
    Ok(worker::Response::from_json(body)?
        .with_status(status)
        .into())
}

/// A JSON error with `status`, a stable `code` and a human-readable `message`.
pub(crate) fn error(status: u16, code: &str, message: &str) -> Result<Response> {
    json(
        status,
        &json!({ "success": false, "error": { "code": code, "message": message } }),
    )
}

/// A JSON error naming the request `field` at fault.
pub(crate) fn field_error(status: u16, code: &str, message: &str, field: &str) -> Result<Response> {
    json(
        status,
        &json!({ "success": false, "error": { "code": code, "message": message, "field": field } }),
    )
}

/// An error that also carries a `WWW-Authenticate` challenge (RFC 6750).
pub(crate) fn challenge(
    status: u16,
    code: &str,
    message: &str,
    www_authenticate: &str,
) -> Result<Response> {
    let response = error(status, code, message)?;
    response
        .headers()
        .set("www-authenticate", www_authenticate)?;
    Ok(response)
}
