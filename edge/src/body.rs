//! Request bodies, read with a cap: a client cannot make the Worker hold more than the cap in
//! memory, with or without a `Content-Length` (without one, the cap is kept while reading).

use futures_util::StreamExt;
use worker::js_sys::{self, futures::JsFuture};
use worker::worker_sys::web_sys::Request;
use worker::{ByteStream, Result};

/// The whole body of `req`, or `None` as soon as more than `max` bytes have arrived (or a
/// `Content-Length` over `max` is declared). A request without a body reads as empty.
pub(crate) async fn read_capped(req: &Request, max: usize) -> Result<Option<Vec<u8>>> {
    let headers = req.headers();
    let declared = headers
        .get("content-length")?
        .and_then(|l| l.trim().parse::<u64>().ok());
    if declared.is_some_and(|l| l > u64::try_from(max).unwrap_or(u64::MAX)) {
        return Ok(None);
    }
    let Some(stream) = req.body() else {
        return Ok(Some(Vec::new()));
    };
    if declared.is_some() && headers.get("transfer-encoding")?.is_none() {
        // HTTP framing holds a body to its declared length, checked above: read in one call
        // (reading chunk by chunk costs a promise per chunk and one more for the end). With a
        // `Transfer-Encoding` too, the length may not be what frames the body: read with the
        // running cap instead.
        let buffer = JsFuture::from(req.array_buffer()?).await?;
        let body = js_sys::Uint8Array::new(&buffer).to_vec();
        return Ok((body.len() <= max).then_some(body));
    }
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
