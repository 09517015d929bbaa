//! Publishing to Workers KV: the [`publisher`] drains the outbox through the [`client`] of
//! Cloudflare's REST API, within the API's request [`budget`].

pub mod budget;
pub mod client;
pub mod publisher;
