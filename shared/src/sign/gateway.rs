//! The identity headers the gateway adds to a forwarded request (version 3, and version 2
//! for upstreams not yet upgraded), and [`GatewayVerifier`], the check an upstream runs on
//! every request before trusting them.
//!
//! # What is signed
//!
//! The edge removes the partner's `Authorization` header and every client-sent `x-latchkey-*`
//! header, then signs these fields with HMAC-SHA256, keyed with `UPSTREAM_SIGNING_SECRET`, each
//! written as a netstring (`<length in bytes, decimal>:<bytes>,`), in this order:
//!
//! | field | value |
//! |---|---|
//! | tag | `latchkey-gateway-v3` (version 2: `latchkey-gateway-v2`) |
//! | timestamp | unix milliseconds, decimal |
//! | request id | unique per forwarded request |
//! | method | as forwarded, e.g. `POST` |
//! | path | the path the upstream receives (the `UPSTREAM_URL`'s own path, then the request's canonical path), percent-encoded exactly as on the wire |
//! | query | the query as on the wire, without `?`; empty if none |
//! | content digest | lowercase hex SHA-256 of the forwarded body (of nothing for a request without one) |
//! | key id | the key's public id |
//! | subject | the key's subject, UTF-8 |
//! | scopes | the key's scopes, space-separated |
//!
//! Length prefixes make the encoding unambiguous: no field's content can move into another
//! (version 1 joined fields with newlines, so a subject holding a newline could forge scopes).
//! The tag keeps the versions apart: a signature made for one is no signature for the other.
//!
//! # Version 3: one header
//!
//! [`header::IDENTITY`] (`x-latchkey-identity`) holds seven items separated by single spaces,
//! each exactly once and in this order:
//!
//! ```text
//! v=3 t=<timestamp> id=<request id> key=<key id> sub=<subject> scopes=<scopes> sig=<signature>
//! ```
//!
//! `sub` is percent-encoded UTF-8 (everything but RFC 3986's unreserved characters), `scopes`
//! comma-separated (empty for a key without scopes), `sig` the lowercase hex HMAC. The body's
//! digest does not travel: the upstream computes it from the body it received. One header
//! instead of eight is less work for the edge on every forwarded request (BENCHMARKS.md). Each
//! item has one spelling (digits without a leading zero; the subject with every byte but the
//! unreserved ones escaped, in upper-case hex like `%C3%A9`, and nothing else escaped; the
//! signature in lower-case hex): a verifier refuses any other, so an identity has one header
//! value. The
//! unit test `version_3_is_one_header_with_every_item_in_order` holds a known answer computed
//! apart from this crate, for a port to check itself against.
//!
//! # Version 2: eight headers
//!
//! [`header::ALL`]: `x-latchkey-version: 2`, then the key id, subject (percent-encoded),
//! scopes (space-separated), timestamp, request id, content digest and signature, each in a
//! header of its own. The edge sends them when `UPSTREAM_SIGNATURE_VERSION` is `2`.
//!
//! # What an upstream checks
//!
//! [`GatewayVerifier::verify`] reads version 3 when [`header::IDENTITY`] is present and version
//! 2 otherwise, and checks the version, that the timestamp is within five minutes, the signature
//! (in constant time) over the method, path, query and body it received, and that the request
//! id was not seen before: a signed request can be replayed neither with another body or query,
//! nor as it is.
//!
//! ```
//! use latchkey_shared::UnixMillis;
//! use latchkey_shared::sign::SigningSecret;
//! use latchkey_shared::sign::gateway::{GatewayError, GatewayVerifier, Received, SignedRequest, content_sha256, header};
//!
//! let secret = SigningSecret::parse("an-upstream-secret-of-32-bytes-or-more").unwrap();
//! let now = UnixMillis(1_700_000_000_000);
//! let body = br#"{"sku":"A-1"}"#;
//! let digest = content_sha256(body);
//! // The edge's side:
//! let signed = SignedRequest {
//!     timestamp: now, request_id: "0f6e2c1a-7d0b-4c55-9d64-3f2b8b1e9a10",
//!     method: "POST", path: "/orders", query: "dry_run=1", content_sha256: &digest,
//!     key_id: "key_2bX9", subject: "acme corp", scopes: "write:orders read:orders",
//! };
//! let identity = signed.identity(&secret);
//! assert!(identity.starts_with("v=3 t=1700000000000 id=0f6e2c1a-7d0b-4c55-9d64-3f2b8b1e9a10 key=key_2bX9 sub=acme%20corp scopes=write:orders,read:orders sig="));
//! let header = |name: &str| (name == header::IDENTITY).then_some(identity.as_str());
//!
//! // The upstream's side: what it received, and the headers.
//! let mut verifier = GatewayVerifier::new(secret.clone(), 100_000);
//! let received = Received { method: "POST", path: "/orders", query: "dry_run=1", body };
//! let verified = verifier.verify(&received, header, now).unwrap();
//! assert_eq!(verified.subject, "acme corp");
//! assert_eq!(verified.scopes, ["write:orders", "read:orders"]);
//!
//! // The same header again, or with another body or query, is refused.
//! assert_eq!(verifier.verify(&received, header, now), Err(GatewayError::Replayed));
//! let other = Received { body: br#"{"sku":"B-2"}"#, ..received };
//! assert_eq!(verifier.verify(&other, header, now), Err(GatewayError::Mismatch));
//! let other = Received { query: "dry_run=0", ..received };
//! assert_eq!(verifier.verify(&other, header, now), Err(GatewayError::Mismatch));
//!
//! // Version 2's eight headers pass the same verifier.
//! let signed = SignedRequest { request_id: "a-second-request", ..signed };
//! let headers = signed.headers(&secret);
//! let header = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
//! assert_eq!(verifier.verify(&received, header, now).unwrap().key_id, "key_2bX9");
//! ```
//!
//! # Migrating
//!
//! From version 2 to 3: upgrade the upstream's verifier first ([`GatewayVerifier`] accepts
//! both; a port of this page must too), with the edge still sending version 2
//! (`UPSTREAM_SIGNATURE_VERSION=2`); then let the edge send version 3 (the default). An
//! upstream that only knows version 2 refuses version 3 requests (their `x-latchkey-version`
//! is missing), so the order matters.
//!
//! From version 1 (`latchkey-gateway-v1`, no `x-latchkey-version` header), which signed
//! neither the query nor the body and had no request id: switch the upstream to
//! [`GatewayVerifier`], keeping the old check only for requests without `x-latchkey-version`
//! or `x-latchkey-identity` while the edge is redeployed; then deploy the edge; then remove the
//! old check.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use hmac::Mac;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::{Digest, Sha256};

use super::{MAX_CLOCK_SKEW_MS, SigningSecret, within_skew};
use crate::record::UnixMillis;

/// The value of the [`header::VERSION`] header of version 2.
pub const VERSION: &str = "2";

const TAG: &str = "latchkey-gateway-v2";
const TAG_V3: &str = "latchkey-gateway-v3";

/// The form of the identity headers the edge sends (`UPSTREAM_SIGNATURE_VERSION`); an upstream's
/// [`GatewayVerifier`] accepts both.
///
/// ```
/// use latchkey_shared::sign::gateway::Version;
///
/// assert_eq!(Version::parse("3"), Some(Version::V3));
/// assert_eq!(Version::parse("2"), Some(Version::V2));
/// assert_eq!(Version::parse("1"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// Eight headers, [`header::ALL`].
    V2,
    /// One header, [`header::IDENTITY`].
    #[default]
    V3,
}

impl Version {
    /// `2` or `3`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "2" => Some(Self::V2),
            "3" => Some(Self::V3),
            _ => None,
        }
    }
}

/// Names of the headers the edge adds to a forwarded request. Any header with the
/// [`HEADER_PREFIX`](header::HEADER_PREFIX) that a client sends is removed before forwarding.
pub mod header {
    /// Prefix shared by every Latchkey header; the edge strips incoming headers with it.
    pub const HEADER_PREFIX: &str = "x-latchkey-";
    /// The signature format's version: `2`.
    pub const VERSION: &str = "x-latchkey-version";
    /// The verified key's public id.
    pub const KEY_ID: &str = "x-latchkey-key-id";
    /// The verified key's subject (the partner it was issued to), percent-encoded UTF-8.
    pub const SUBJECT: &str = "x-latchkey-subject";
    /// The verified key's granted scopes, space-separated.
    pub const SCOPES: &str = "x-latchkey-scopes";
    /// Milliseconds since the Unix epoch when the edge signed the request.
    pub const TIMESTAMP: &str = "x-latchkey-timestamp";
    /// Unique per forwarded request; the upstream refuses one it has seen.
    pub const REQUEST_ID: &str = "x-latchkey-request-id";
    /// Lowercase hex SHA-256 of the forwarded body.
    pub const CONTENT_SHA256: &str = "x-latchkey-content-sha256";
    /// Lowercase hex HMAC-SHA256 of the signed fields (see the module docs).
    pub const SIGNATURE: &str = "x-latchkey-signature";
    /// Version 3's one header: the identity, the request id, the timestamp and the signature
    /// (see the module docs).
    pub const IDENTITY: &str = "x-latchkey-identity";
    /// Every header the edge sets in version 2.
    pub const ALL: [&str; 8] = [
        VERSION,
        KEY_ID,
        SUBJECT,
        SCOPES,
        TIMESTAMP,
        REQUEST_ID,
        CONTENT_SHA256,
        SIGNATURE,
    ];
}

/// Longest request id accepted.
pub const REQUEST_ID_MAX: usize = 64;

/// What the subject header escapes: everything but RFC 3986's unreserved characters.
const SUBJECT_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// [`content_sha256`] of an empty body (every GET), known without hashing.
const EMPTY_CONTENT_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Lowercase hex SHA-256 of `body`: the value of [`header::CONTENT_SHA256`].
pub fn content_sha256(body: &[u8]) -> String {
    if body.is_empty() {
        return EMPTY_CONTENT_SHA256.to_owned();
    }
    crate::hex32(&Sha256::digest(body).into())
}

/// The fields the edge signs for one forwarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedRequest<'a> {
    /// When the edge signed it.
    pub timestamp: UnixMillis,
    /// Unique per request.
    pub request_id: &'a str,
    /// The method forwarded.
    pub method: &'a str,
    /// The path the upstream receives, as on the wire.
    pub path: &'a str,
    /// The query as on the wire, without `?`.
    pub query: &'a str,
    /// [`content_sha256`] of the forwarded body.
    pub content_sha256: &'a str,
    /// The key's id.
    pub key_id: &'a str,
    /// The key's subject.
    pub subject: &'a str,
    /// The key's scopes, space-separated.
    pub scopes: &'a str,
}

impl SignedRequest<'_> {
    /// The bytes the signature covers in version 2: every field as a netstring, after the tag.
    pub fn message(&self) -> Vec<u8> {
        self.message_tagged(TAG)
    }

    fn message_tagged(&self, tag: &str) -> Vec<u8> {
        let mut timestamp = itoa::Buffer::new();
        let fields = [
            tag,
            timestamp.format(self.timestamp.0),
            self.request_id,
            self.method,
            self.path,
            self.query,
            self.content_sha256,
            self.key_id,
            self.subject,
            self.scopes,
        ];
        let mut message = Vec::with_capacity(fields.iter().map(|f| f.len() + 8).sum());
        let mut length = itoa::Buffer::new();
        for field in fields {
            message.extend_from_slice(length.format(field.len()).as_bytes());
            message.push(b':');
            message.extend_from_slice(field.as_bytes());
            message.push(b',');
        }
        message
    }

    /// The value of version 3's [`header::IDENTITY`], signature included.
    pub fn identity(&self, secret: &SigningSecret) -> String {
        let mac = secret.mac(&self.message_tagged(TAG_V3)).finalize();
        let mut timestamp = itoa::Buffer::new();
        let mut value = String::with_capacity(
            160 + self.request_id.len()
                + self.key_id.len()
                + 3 * self.subject.len()
                + self.scopes.len(),
        );
        value.push_str("v=3 t=");
        value.push_str(timestamp.format(self.timestamp.0));
        value.push_str(" id=");
        value.push_str(self.request_id);
        value.push_str(" key=");
        value.push_str(self.key_id);
        value.push_str(" sub=");
        value.extend(utf8_percent_encode(self.subject, SUBJECT_ESCAPES));
        value.push_str(" scopes=");
        // Scopes hold no spaces (`scope` module), so the separators are the only ones.
        value.extend(self.scopes.chars().map(|c| if c == ' ' { ',' } else { c }));
        value.push_str(" sig=");
        crate::push_hex32(&mut value, &mac.into_bytes().into());
        value
    }

    /// The headers the edge sets in version 2, signature included, in [`header::ALL`]'s order.
    pub fn headers(&self, secret: &SigningSecret) -> [(&'static str, String); 8] {
        let signature = crate::hex32(&secret.mac(&self.message()).finalize().into_bytes().into());
        [
            (header::VERSION, VERSION.to_owned()),
            (header::KEY_ID, self.key_id.to_owned()),
            (
                header::SUBJECT,
                utf8_percent_encode(self.subject, SUBJECT_ESCAPES).to_string(),
            ),
            (header::SCOPES, self.scopes.to_owned()),
            (header::TIMESTAMP, self.timestamp.0.to_string()),
            (header::REQUEST_ID, self.request_id.to_owned()),
            (header::CONTENT_SHA256, self.content_sha256.to_owned()),
            (header::SIGNATURE, signature),
        ]
    }
}

/// A request as the upstream received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    /// The method.
    pub method: &'a str,
    /// The path as on the wire (not decoded), e.g. `uri.path()` in `http`.
    pub path: &'a str,
    /// The query as on the wire, without `?` (`uri.query().unwrap_or("")`).
    pub query: &'a str,
    /// The whole body.
    pub body: &'a [u8],
}

/// The identity the edge vouched for, once [`GatewayVerifier::verify`] accepted a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// The key's id.
    pub key_id: String,
    /// The partner the key was issued to.
    pub subject: String,
    /// The key's scopes.
    pub scopes: Vec<String>,
    /// The request's unique id.
    pub request_id: String,
    /// When the edge signed it.
    pub timestamp: UnixMillis,
}

/// Why an upstream must refuse a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// A header is missing or malformed (named).
    #[error("the header {0} is missing or malformed")]
    Header(&'static str),
    /// The version is not one this verifier reads (`x-latchkey-version: 2`, or `v=3` in
    /// `x-latchkey-identity`).
    #[error(
        "unsupported identity header version (expected `x-latchkey-version: 2`, or `v=3` first in `x-latchkey-identity`)"
    )]
    Version,
    /// The timestamp is further than five minutes from now.
    #[error("the signature timestamp is too far from the current time")]
    Stale,
    /// The body is not the one whose digest version 2's headers carry (version 3 carries none:
    /// another body is a [`Mismatch`](Self::Mismatch)).
    #[error("the body does not match the signed digest")]
    BodyMismatch,
    /// The signature does not match the method, path, query, body (version 3) and identity.
    #[error("the signature does not match")]
    Mismatch,
    /// This request id was already accepted.
    #[error("this signed request was already accepted (replay)")]
    Replayed,
    /// More unexpired request ids than the verifier may remember: refused rather than
    /// forgetting one that could then be replayed.
    #[error("too many recent requests to guard against replay; retry shortly")]
    ReplayGuardFull,
}

/// Checks the identity headers of requests forwarded by the gateway, and remembers each
/// accepted request id until its timestamp leaves the five-minute window, so none is accepted
/// twice. One per upstream process (behind a `Mutex` if shared between threads).
#[derive(Debug)]
pub struct GatewayVerifier {
    secret: SigningSecret,
    capacity: usize,
    seen: HashMap<String, i64>,
    expiries: BinaryHeap<Reverse<(i64, String)>>,
}

impl GatewayVerifier {
    /// A verifier for `secret` that remembers at most `capacity` unexpired request ids
    /// (about 40 bytes each plus the id): size it for ten minutes of peak traffic.
    pub fn new(secret: SigningSecret, capacity: usize) -> Self {
        Self {
            secret,
            capacity,
            seen: HashMap::new(),
            expiries: BinaryHeap::new(),
        }
    }

    /// Checks `received` and its headers (`header` looks one up by its lower-case name) at
    /// time `now`; on success the request id is remembered and the identity returned. A
    /// request with [`header::IDENTITY`] is read as version 3, any other as version 2.
    pub fn verify<'h>(
        &mut self,
        received: &Received<'_>,
        header: impl Fn(&str) -> Option<&'h str>,
        now: UnixMillis,
    ) -> Result<VerifiedIdentity, GatewayError> {
        match header(header::IDENTITY) {
            Some(identity) => self.verify_v3(received, identity, now),
            None => self.verify_v2(received, header, now),
        }
    }

    fn verify_v2<'h>(
        &mut self,
        received: &Received<'_>,
        header: impl Fn(&str) -> Option<&'h str>,
        now: UnixMillis,
    ) -> Result<VerifiedIdentity, GatewayError> {
        let get = |name: &'static str| header(name).ok_or(GatewayError::Header(name));
        if get(header::VERSION)? != VERSION {
            return Err(GatewayError::Version);
        }
        let timestamp = timestamp(get(header::TIMESTAMP)?, header::TIMESTAMP, now)?;
        let request_id = request_id(get(header::REQUEST_ID)?, header::REQUEST_ID)?;
        let digest = get(header::CONTENT_SHA256)?;
        if digest.as_bytes() != content_sha256(received.body).as_bytes() {
            return Err(GatewayError::BodyMismatch);
        }
        let key_id = get(header::KEY_ID)?;
        let scopes = get(header::SCOPES)?;
        let subject = subject(get(header::SUBJECT)?, header::SUBJECT)?;
        let signature = hex::decode(get(header::SIGNATURE)?)
            .map_err(|_| GatewayError::Header(header::SIGNATURE))?;
        let signed = SignedRequest {
            timestamp,
            request_id,
            method: received.method,
            path: received.path,
            query: received.query,
            content_sha256: digest,
            key_id,
            subject: &subject,
            scopes,
        };
        self.accept(TAG, &signed, &signature, now)
    }

    /// Version 3: `v=3 t=… id=… key=… sub=… scopes=… sig=…`, each item once, in that order,
    /// separated by single spaces, each in its one canonical spelling (the timestamp's digits
    /// without a leading zero, the subject escaped exactly as the edge escapes it, the signature
    /// in lower-case hex); anything else is malformed, so an identity has one header value only.
    fn verify_v3(
        &mut self,
        received: &Received<'_>,
        value: &str,
        now: UnixMillis,
    ) -> Result<VerifiedIdentity, GatewayError> {
        const MALFORMED: GatewayError = GatewayError::Header(header::IDENTITY);
        let mut items = value.split(' ');
        let mut item = |name: &str| {
            items
                .next()
                .and_then(|item| item.strip_prefix(name))
                .ok_or(MALFORMED)
        };
        // The version first: another version may have other items.
        if item("v=")? != "3" {
            return Err(GatewayError::Version);
        }
        let fields = [
            item("t=")?,
            item("id=")?,
            item("key=")?,
            item("sub=")?,
            item("scopes=")?,
            item("sig=")?,
        ];
        if items.next().is_some() {
            return Err(MALFORMED);
        }
        let [
            timestamp_text,
            request_id_text,
            key_id,
            subject_text,
            scopes,
            signature,
        ] = fields;
        let canonical_timestamp = timestamp_text.bytes().all(|b| b.is_ascii_digit())
            && (timestamp_text == "0" || !timestamp_text.starts_with('0'));
        let canonical_signature = signature.len() == 64
            && signature
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !canonical_timestamp || !canonical_signature {
            return Err(MALFORMED);
        }
        let timestamp = timestamp(timestamp_text, header::IDENTITY, now)?;
        let request_id = request_id(request_id_text, header::IDENTITY)?;
        let subject = subject(subject_text, header::IDENTITY)?;
        if utf8_percent_encode(&subject, SUBJECT_ESCAPES).to_string() != subject_text {
            return Err(MALFORMED);
        }
        // Comma-separated on the wire, signed space-separated; no empty scope in between.
        let scopes: Vec<&str> = match scopes {
            "" => Vec::new(),
            listed => listed.split(',').collect(),
        };
        if scopes.iter().any(|scope| scope.is_empty()) {
            return Err(MALFORMED);
        }
        let signature = hex::decode(signature).map_err(|_| MALFORMED)?;
        let digest = content_sha256(received.body);
        let scopes = scopes.join(" ");
        let signed = SignedRequest {
            timestamp,
            request_id,
            method: received.method,
            path: received.path,
            query: received.query,
            content_sha256: &digest,
            key_id,
            subject: &subject,
            scopes: &scopes,
        };
        self.accept(TAG_V3, &signed, &signature, now)
    }

    /// The signature check (in constant time) and the replay guard, common to both versions.
    fn accept(
        &mut self,
        tag: &str,
        signed: &SignedRequest<'_>,
        signature: &[u8],
        now: UnixMillis,
    ) -> Result<VerifiedIdentity, GatewayError> {
        self.secret
            .mac(&signed.message_tagged(tag))
            .verify_slice(signature)
            .map_err(|_| GatewayError::Mismatch)?;
        self.remember(signed.request_id, signed.timestamp, now)?;
        Ok(VerifiedIdentity {
            key_id: signed.key_id.to_owned(),
            subject: signed.subject.to_owned(),
            scopes: signed
                .scopes
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            request_id: signed.request_id.to_owned(),
            timestamp: signed.timestamp,
        })
    }

    /// Records `request_id` until `timestamp` leaves the window; refuses one already there.
    fn remember(
        &mut self,
        request_id: &str,
        timestamp: UnixMillis,
        now: UnixMillis,
    ) -> Result<(), GatewayError> {
        while let Some(Reverse((until, _))) = self.expiries.peek() {
            if *until >= now.0 {
                break;
            }
            if let Some(Reverse((_, id))) = self.expiries.pop() {
                self.seen.remove(&id);
            }
        }
        if self.seen.contains_key(request_id) {
            return Err(GatewayError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(GatewayError::ReplayGuardFull);
        }
        let until = timestamp.0.saturating_add(MAX_CLOCK_SKEW_MS);
        self.seen.insert(request_id.to_owned(), until);
        self.expiries.push(Reverse((until, request_id.to_owned())));
        Ok(())
    }
}

/// A signed timestamp (decimal unix milliseconds, from the header `name`), refused if further
/// than five minutes from `now`.
fn timestamp(text: &str, name: &'static str, now: UnixMillis) -> Result<UnixMillis, GatewayError> {
    let timestamp = text
        .parse::<i64>()
        .map(UnixMillis)
        .map_err(|_| GatewayError::Header(name))?;
    if !within_skew(now, timestamp) {
        return Err(GatewayError::Stale);
    }
    Ok(timestamp)
}

/// A request id: 1 to [`REQUEST_ID_MAX`] ASCII letters, digits and dashes.
fn request_id<'a>(text: &'a str, name: &'static str) -> Result<&'a str, GatewayError> {
    let well_formed = !text.is_empty()
        && text.len() <= REQUEST_ID_MAX
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    well_formed
        .then_some(text)
        .ok_or(GatewayError::Header(name))
}

/// A percent-encoded UTF-8 subject, decoded.
fn subject<'a>(text: &'a str, name: &'static str) -> Result<Cow<'a, str>, GatewayError> {
    percent_decode_str(text)
        .decode_utf8()
        .map_err(|_| GatewayError::Header(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_body_digest_is_sha256_of_nothing() {
        assert_eq!(EMPTY_CONTENT_SHA256, hex::encode(Sha256::digest(b"")));
        assert_eq!(content_sha256(b""), EMPTY_CONTENT_SHA256);
        assert_ne!(content_sha256(b" "), EMPTY_CONTENT_SHA256);
    }

    const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

    fn secret() -> SigningSecret {
        SigningSecret::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|e| panic!("{e}"))
    }

    fn signed<'a>(body_digest: &'a str, request_id: &'a str) -> SignedRequest<'a> {
        SignedRequest {
            timestamp: NOW,
            request_id,
            method: "GET",
            path: "/orders/42",
            query: "page=2",
            content_sha256: body_digest,
            key_id: "key_1",
            subject: "acme corp/é",
            scopes: "read:orders write:orders",
        }
    }

    fn check(
        verifier: &mut GatewayVerifier,
        headers: &[(&'static str, String)],
        received: &Received<'_>,
        now: UnixMillis,
    ) -> Result<VerifiedIdentity, GatewayError> {
        verifier.verify(
            received,
            |name| {
                headers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.as_str())
            },
            now,
        )
    }

    type Headers = Vec<(&'static str, String)>;

    const RECEIVED: Received<'static> = Received {
        method: "GET",
        path: "/orders/42",
        query: "page=2",
        body: b"",
    };

    #[test]
    fn fields_are_length_prefixed_so_none_can_move_into_another() {
        let digest = content_sha256(b"");
        let a = SignedRequest {
            subject: "acme\nread:admin",
            scopes: "",
            ..signed(&digest, "r1")
        };
        let b = SignedRequest {
            subject: "acme",
            scopes: "read:admin",
            ..signed(&digest, "r1")
        };
        assert_ne!(a.message(), b.message());
        let c = SignedRequest {
            path: "/a",
            query: "b",
            ..signed(&digest, "r1")
        };
        let d = SignedRequest {
            path: "/a?b",
            query: "",
            ..signed(&digest, "r1")
        };
        assert_ne!(c.message(), d.message());
        assert!(
            String::from_utf8_lossy(&a.message())
                .starts_with("19:latchkey-gateway-v2,13:1700000000000,2:r1,3:GET,")
        );
    }

    #[test]
    fn accepts_what_the_edge_signed_once_and_refuses_every_alteration() {
        let digest = content_sha256(b"");
        let headers = signed(&digest, "r-1").headers(&secret());
        let mut verifier = GatewayVerifier::new(secret(), 10);
        let identity = check(&mut verifier, &headers, &RECEIVED, NOW).expect("valid");
        assert_eq!(identity.subject, "acme corp/é");
        assert_eq!(identity.scopes, ["read:orders", "write:orders"]);
        assert_eq!(
            check(&mut verifier, &headers, &RECEIVED, NOW),
            Err(GatewayError::Replayed)
        );

        let fresh = |id: &'static str| signed(&digest, id).headers(&secret()).to_vec();
        let altered = |id: &'static str, name: &str, value: &str| {
            let mut h = fresh(id);
            for (n, v) in &mut h {
                if *n == name {
                    *v = value.to_owned();
                }
            }
            h
        };
        let other_secret = SigningSecret::parse(&"z".repeat(32)).unwrap_or_else(|e| panic!("{e}"));
        let cases: Vec<(Headers, Received<'_>, GatewayError)> = vec![
            (
                fresh("a"),
                Received {
                    method: "POST",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            (
                fresh("b"),
                Received {
                    path: "/orders/43",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            (
                fresh("c"),
                Received {
                    query: "page=3",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            (
                fresh("d"),
                Received {
                    body: b"x",
                    ..RECEIVED
                },
                GatewayError::BodyMismatch,
            ),
            (
                altered("e", header::SCOPES, "read:orders write:orders admin:all"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("f", header::SUBJECT, "other"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("g", header::KEY_ID, "key_2"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("h", header::REQUEST_ID, "h2"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("i", header::SIGNATURE, &"0".repeat(64)),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("j", header::SIGNATURE, "not hex"),
                RECEIVED,
                GatewayError::Header(header::SIGNATURE),
            ),
            (
                altered("k", header::VERSION, "1"),
                RECEIVED,
                GatewayError::Version,
            ),
            (
                altered("l", header::TIMESTAMP, "soon"),
                RECEIVED,
                GatewayError::Header(header::TIMESTAMP),
            ),
            (
                altered("m", header::TIMESTAMP, &i64::MIN.to_string()),
                RECEIVED,
                GatewayError::Stale,
            ),
            (
                altered("n", header::REQUEST_ID, ""),
                RECEIVED,
                GatewayError::Header(header::REQUEST_ID),
            ),
            (
                altered("o", header::REQUEST_ID, "a b"),
                RECEIVED,
                GatewayError::Header(header::REQUEST_ID),
            ),
            (
                altered("p", header::SUBJECT, "%FF"),
                RECEIVED,
                GatewayError::Header(header::SUBJECT),
            ),
            (
                signed(&digest, "q").headers(&other_secret).to_vec(),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                fresh("r")
                    .into_iter()
                    .filter(|(n, _)| *n != header::KEY_ID)
                    .collect(),
                RECEIVED,
                GatewayError::Header(header::KEY_ID),
            ),
        ];
        for (headers, received, want) in cases {
            assert_eq!(
                check(&mut verifier, &headers, &received, NOW),
                Err(want.clone()),
                "{want:?}"
            );
        }
        // None of the refusals was remembered: the untouched request is still accepted once.
        assert!(check(&mut verifier, &fresh("a"), &RECEIVED, NOW).is_ok());
    }

    #[test]
    fn request_ids_are_forgotten_only_after_their_window_and_memory_is_bounded() {
        let digest = content_sha256(b"");
        let mut verifier = GatewayVerifier::new(secret(), 2);
        let one = signed(&digest, "one").headers(&secret());
        let two = signed(&digest, "two").headers(&secret());
        let three = signed(&digest, "three").headers(&secret());
        assert!(check(&mut verifier, &one, &RECEIVED, NOW).is_ok());
        assert!(check(&mut verifier, &two, &RECEIVED, NOW).is_ok());
        assert_eq!(
            check(&mut verifier, &three, &RECEIVED, NOW),
            Err(GatewayError::ReplayGuardFull)
        );
        let edge_of_window = UnixMillis(NOW.0 + MAX_CLOCK_SKEW_MS);
        assert_eq!(
            check(&mut verifier, &one, &RECEIVED, edge_of_window),
            Err(GatewayError::Replayed)
        );
        // Once the window has passed, the timestamp check refuses the old headers anyway,
        // and their ids make room for new requests.
        let later = UnixMillis(NOW.0 + MAX_CLOCK_SKEW_MS + 1);
        assert_eq!(
            check(&mut verifier, &one, &RECEIVED, later),
            Err(GatewayError::Stale)
        );
        let new = SignedRequest {
            timestamp: later,
            ..signed(&digest, "three")
        };
        assert!(check(&mut verifier, &new.headers(&secret()), &RECEIVED, later).is_ok());
        assert_eq!(verifier.seen.len(), 1);
    }

    /// Version 3's one header, as the edge makes it for [`signed`].
    fn identity(request_id: &'static str) -> Headers {
        let digest = content_sha256(b"");
        vec![(
            header::IDENTITY,
            signed(&digest, request_id).identity(&secret()),
        )]
    }

    #[test]
    fn version_3_is_one_header_with_every_item_in_order() {
        // A known answer, computed apart from this crate (Python's `hmac` over the netstrings the
        // module docs list, `urllib.parse.quote(subject, safe="-._~")`): a port can check itself
        // against it. Secret `0123456789abcdef0123456789abcdef`, GET /orders/42?page=2, no body.
        let digest = content_sha256(b"");
        assert_eq!(
            signed(&digest, "r-1").identity(&secret()),
            "v=3 t=1700000000000 id=r-1 key=key_1 sub=acme%20corp%2F%C3%A9 \
             scopes=read:orders,write:orders \
             sig=5349377905a4c770b62f4e17a88fd41e8b8666160a1c7cdfe0a61703bdf29da7"
        );
        // The same fields as version 2 under another tag: neither signature passes for the other.
        assert!(
            String::from_utf8_lossy(&signed(&digest, "r").message_tagged(TAG_V3))
                .starts_with("19:latchkey-gateway-v3,")
        );
    }

    #[test]
    fn version_3_accepts_what_the_edge_signed_once_and_refuses_every_alteration() {
        let mut verifier = GatewayVerifier::new(secret(), 100);
        let identity_v3 = check(&mut verifier, &identity("r-1"), &RECEIVED, NOW).expect("valid");
        assert_eq!(identity_v3.subject, "acme corp/é");
        assert_eq!(identity_v3.scopes, ["read:orders", "write:orders"]);
        assert_eq!(
            (identity_v3.key_id.as_str(), identity_v3.request_id.as_str()),
            ("key_1", "r-1")
        );
        assert_eq!(
            check(&mut verifier, &identity("r-1"), &RECEIVED, NOW),
            Err(GatewayError::Replayed)
        );

        // The edge's header for request id `id`, with `from` replaced by `to`.
        let altered = |id: &'static str, from: &str, to: &str| -> Headers {
            let value = identity(id).remove(0).1;
            assert!(value.contains(from), "{from:?} in {value:?}");
            vec![(header::IDENTITY, value.replacen(from, to, 1))]
        };
        let digest = content_sha256(b"");
        let v2_signature = signed(&digest, "s")
            .headers(&secret())
            .into_iter()
            .find(|(name, _)| *name == header::SIGNATURE)
            .map(|(_, value)| value)
            .unwrap_or_default();
        let other_secret = SigningSecret::parse(&"z".repeat(32)).unwrap_or_else(|e| panic!("{e}"));
        let malformed = GatewayError::Header(header::IDENTITY);
        let cases: Vec<(Headers, Received<'_>, GatewayError)> = vec![
            (
                identity("a"),
                Received {
                    method: "POST",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            (
                identity("b"),
                Received {
                    path: "/orders/43",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            (
                identity("c"),
                Received {
                    query: "page=3",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            // No digest travels in version 3: a changed body changes the signed message.
            (
                identity("d"),
                Received {
                    body: b"x",
                    ..RECEIVED
                },
                GatewayError::Mismatch,
            ),
            (
                altered("e", "write:orders", "write:orders,admin:all"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("f", "sub=acme%20corp", "sub=other"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("g", "key=key_1", "key=key_2"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("h", "id=h", "id=h2"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                altered("i", "t=1700000000000", "t=1700000000001"),
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                vec![(
                    header::IDENTITY,
                    identity("s")
                        .remove(0)
                        .1
                        .split(" sig=")
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                        + " sig="
                        + &v2_signature,
                )],
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (
                vec![(
                    header::IDENTITY,
                    signed(&digest, "j").identity(&other_secret),
                )],
                RECEIVED,
                GatewayError::Mismatch,
            ),
            (altered("k", "v=3", "v=2"), RECEIVED, GatewayError::Version),
            (
                altered("l", "t=1700000000000", "t=soon"),
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("m", "t=1700000000000", "t=1"),
                RECEIVED,
                GatewayError::Stale,
            ),
            (
                altered("ma", "t=1700000000000", &format!("t={}", i64::MIN)),
                RECEIVED,
                malformed.clone(),
            ),
            (altered("n", "id=n", "id="), RECEIVED, malformed.clone()),
            (altered("o", "id=o", "id=o/1"), RECEIVED, malformed.clone()),
            (
                altered("p", "sub=acme%20corp%2F%C3%A9", "sub=%FF"),
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("q", " sig=", " sig=zz"),
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("r", "read:orders,", "read:orders,,"),
                RECEIVED,
                malformed.clone(),
            ),
            (altered("s", " key=key_1", ""), RECEIVED, malformed.clone()),
            (altered("t", "v=3 ", "v=3  "), RECEIVED, malformed.clone()),
            (
                altered("u", " sig=", " extra=1 sig="),
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("v", "v=3 t=", "t=1 v=3 t="),
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("w", "id=w key=key_1", "key=key_1 id=w"),
                RECEIVED,
                malformed.clone(),
            ),
            (
                vec![(header::IDENTITY, String::new())],
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("mb", "v=3 ", "v=4 "),
                RECEIVED,
                GatewayError::Version,
            ),
            // One spelling per identity: other spellings of the same values are refused.
            (altered("x", "t=", "t=+"), RECEIVED, malformed.clone()),
            (altered("y", "t=", "t=0"), RECEIVED, malformed.clone()),
            (
                altered("z", "sub=acme", "sub=%61cme"),
                RECEIVED,
                malformed.clone(),
            ),
            (
                altered("aa", "corp%2F", "corp/"),
                RECEIVED,
                malformed.clone(),
            ),
            (
                {
                    let value = identity("ab").remove(0).1;
                    let (head, sig) = value.split_once(" sig=").unwrap_or_default();
                    vec![(
                        header::IDENTITY,
                        format!("{head} sig={}", sig.to_uppercase()),
                    )]
                },
                RECEIVED,
                malformed.clone(),
            ),
        ];
        for (headers, received, want) in cases {
            assert_eq!(
                check(&mut verifier, &headers, &received, NOW),
                Err(want.clone()),
                "{want:?} for {headers:?}"
            );
        }
        // None of the refusals was remembered: the untouched request is still accepted once.
        assert!(check(&mut verifier, &identity("a"), &RECEIVED, NOW).is_ok());
    }

    #[test]
    fn version_3_carries_a_key_without_scopes_and_wins_over_version_2_headers() {
        let digest = content_sha256(b"");
        let bare = SignedRequest {
            scopes: "",
            ..signed(&digest, "none")
        };
        let value = bare.identity(&secret());
        assert!(value.contains(" scopes= sig="), "{value}");
        let mut verifier = GatewayVerifier::new(secret(), 10);
        let identity_v3 = check(&mut verifier, &[(header::IDENTITY, value)], &RECEIVED, NOW);
        assert_eq!(identity_v3.map(|i| i.scopes), Ok(Vec::new()));

        // With both forms present, only the one header is read: valid version 2 headers do not
        // rescue a forged version 3 one.
        let mut both = signed(&digest, "both").headers(&secret()).to_vec();
        both.push((header::IDENTITY, "v=3".to_owned()));
        assert_eq!(
            check(&mut verifier, &both, &RECEIVED, NOW),
            Err(GatewayError::Header(header::IDENTITY))
        );
    }
}
