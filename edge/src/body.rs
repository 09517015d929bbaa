//! Request bodies, read with a running cap: a client cannot make the Worker hold more than the
//! cap in memory, with or without a `Content-Length`.

use futures_util::StreamExt;
use worker::worker_sys::web_sys::Request;
use worker::{ByteStream, Result};

/// The whole body of `req`, or `None` as soon as more than `max` bytes have arrived (or a
/// `Content-Length` over `max` is declared). A request without a body reads as empty.
pub(crate) async fn read_capped(req: &Request, max: usize) -> Result<Option<Vec<u8>>> {
    let declared = req
        .headers()
        .get("content-length")?
        .and_then(|l| l.trim().parse::<u64>().ok());
    if declared.is_some_and(|l| l > u64::try_from(max).unwrap_or(u64::MAX)) {
        return Ok(None);
    }
    let Some(stream) = req.body() else {
        return Ok(Some(Vec::new()));
    };
    let mut stream = ByteStream::from(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if chunk.len() > max.saturating_sub(body.len()) {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}
