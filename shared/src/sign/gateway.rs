//! The identity headers the gateway adds to a forwarded request, version 2, and
//! [`GatewayVerifier`], the check an upstream runs on every request before trusting them.
//!
//! # What is signed
//!
//! The edge removes the partner's `Authorization` header and every client-sent `x-latchkey-*`
//! header, then sets the [`header`]s below. `x-latchkey-signature` is the lowercase hex
//! HMAC-SHA256, keyed with `UPSTREAM_SIGNING_SECRET`, of these fields, each written as a
//! netstring (`<length in bytes, decimal>:<bytes>,`), in this order:
//!
//! | field | value |
//! |---|---|
//! | tag | `latchkey-gateway-v2` |
//! | timestamp | unix milliseconds, decimal (`x-latchkey-timestamp`) |
//! | request id | unique per forwarded request (`x-latchkey-request-id`) |
//! | method | as forwarded, e.g. `POST` |
//! | path | the path the upstream receives (the `UPSTREAM_URL`'s own path, then the request's canonical path), percent-encoded exactly as on the wire |
//! | query | the query as on the wire, without `?`; empty if none |
//! | content digest | lowercase hex SHA-256 of the forwarded body (of nothing for a request without one; `x-latchkey-content-sha256`) |
//! | key id | `x-latchkey-key-id` |
//! | subject | the key's subject, UTF-8 (the header carries it percent-encoded) |
//! | scopes | the key's scopes, space-separated (`x-latchkey-scopes`) |
//!
//! Length prefixes make the encoding unambiguous: no field's content can move into another
//! (version 1 joined fields with newlines, so a subject holding a newline could forge scopes).
//!
//! # What an upstream checks
//!
//! [`GatewayVerifier::verify`] checks the version, that the timestamp is within five minutes,
//! that the body it received has the signed digest, the signature (in constant time) over the
//! method, path and query it received, and that the request id was not seen before: a signed
//! request can be replayed neither with another body or query, nor as it is.
//!
//! ```
//! use latchkey_shared::UnixMillis;
//! use latchkey_shared::sign::SigningSecret;
//! use latchkey_shared::sign::gateway::{GatewayError, GatewayVerifier, Received, SignedRequest, content_sha256};
//!
//! let secret = SigningSecret::parse("an-upstream-secret-of-32-bytes-or-more").unwrap();
//! let now = UnixMillis(1_700_000_000_000);
//! let body = br#"{"sku":"A-1"}"#;
//! let digest = content_sha256(body);
//! // The edge's side:
//! let signed = SignedRequest {
//!     timestamp: now, request_id: "0f6e2c1a-7d0b-4c55-9d64-3f2b8b1e9a10",
//!     method: "POST", path: "/orders", query: "dry_run=1", content_sha256: &digest,
//!     key_id: "key_2bX9", subject: "acme-corp", scopes: "write:orders",
//! };
//! let headers = signed.headers(&secret);
//! let header = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
//!
//! // The upstream's side: what it received, and the headers.
//! let mut verifier = GatewayVerifier::new(secret, 100_000);
//! let received = Received { method: "POST", path: "/orders", query: "dry_run=1", body };
//! let identity = verifier.verify(&received, header, now).unwrap();
//! assert_eq!((identity.subject.as_str(), identity.scopes.as_slice()), ("acme-corp", &["write:orders".to_owned()][..]));
//!
//! // The same headers again, or with another body or query, are refused.
//! assert_eq!(verifier.verify(&received, header, now), Err(GatewayError::Replayed));
//! let other = Received { body: br#"{"sku":"B-2"}"#, ..received };
//! assert_eq!(verifier.verify(&other, header, now), Err(GatewayError::BodyMismatch));
//! let other = Received { query: "dry_run=0", ..received };
//! assert_eq!(verifier.verify(&other, header, now), Err(GatewayError::Mismatch));
//! ```
//!
//! # Migrating from version 1
//!
//! Version 1 (`latchkey-gateway-v1`, no `x-latchkey-version` header) signed neither the query
//! nor the body and had no request id. An upstream that checks version 1 refuses every
//! version-2 request, so upgrade the upstream first: switch it to [`GatewayVerifier`] (or your
//! own port of this page), keeping the old check only for requests without
//! `x-latchkey-version` while the edge is redeployed; then deploy the edge; then remove the
//! old check. The edge sends version 2 only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use hmac::Mac;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::{Digest, Sha256};

use super::{MAX_CLOCK_SKEW_MS, SigningSecret, within_skew};
use crate::record::UnixMillis;

/// The value of the [`header::VERSION`] header this module writes and reads.
pub const VERSION: &str = "2";

const TAG: &str = "latchkey-gateway-v2";

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
    /// Every header the edge sets.
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
    hex::encode(Sha256::digest(body))
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
    /// The bytes the signature covers: every field as a netstring, after the tag.
    pub fn message(&self) -> Vec<u8> {
        let mut timestamp = itoa::Buffer::new();
        let fields = [
            TAG,
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

    /// The headers the edge sets, signature included, in [`header::ALL`]'s order.
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
    /// `x-latchkey-version` is not `2`.
    #[error("unsupported identity header version (expected {VERSION})")]
    Version,
    /// The timestamp is further than five minutes from now.
    #[error("the signature timestamp is too far from the current time")]
    Stale,
    /// The body is not the one that was signed.
    #[error("the body does not match the signed digest")]
    BodyMismatch,
    /// The signature does not match the method, path, query and identity.
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
    /// time `now`; on success the request id is remembered and the identity returned.
    pub fn verify<'h>(
        &mut self,
        received: &Received<'_>,
        header: impl Fn(&str) -> Option<&'h str>,
        now: UnixMillis,
    ) -> Result<VerifiedIdentity, GatewayError> {
        let get = |name: &'static str| header(name).ok_or(GatewayError::Header(name));
        if get(header::VERSION)? != VERSION {
            return Err(GatewayError::Version);
        }
        let timestamp = get(header::TIMESTAMP)?
            .parse::<i64>()
            .map(UnixMillis)
            .map_err(|_| GatewayError::Header(header::TIMESTAMP))?;
        if !within_skew(now, timestamp) {
            return Err(GatewayError::Stale);
        }
        let request_id = get(header::REQUEST_ID)?;
        if request_id.is_empty()
            || request_id.len() > REQUEST_ID_MAX
            || !request_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(GatewayError::Header(header::REQUEST_ID));
        }
        let digest = get(header::CONTENT_SHA256)?;
        if digest.as_bytes() != content_sha256(received.body).as_bytes() {
            return Err(GatewayError::BodyMismatch);
        }
        let key_id = get(header::KEY_ID)?;
        let scopes = get(header::SCOPES)?;
        let subject = percent_decode_str(get(header::SUBJECT)?)
            .decode_utf8()
            .map_err(|_| GatewayError::Header(header::SUBJECT))?;
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
        self.secret
            .mac(&signed.message())
            .verify_slice(&signature)
            .map_err(|_| GatewayError::Mismatch)?;
        self.remember(request_id, timestamp, now)?;
        Ok(VerifiedIdentity {
            key_id: key_id.to_owned(),
            subject: subject.into_owned(),
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            request_id: request_id.to_owned(),
            timestamp,
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
}
