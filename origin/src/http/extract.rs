//! Request extractors that turn every malformed input into an [`ApiError`] of the right
//! surface, naming the field where there is one.

use std::marker::PhantomData;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use latchkey_shared::{KeyId, UnixMillis};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::error::{ApiError, Envelope};
use crate::service::{Lifetime, limits};

/// A JSON request body of type `T`, or an error in envelope `E`.
///
/// An empty body reads as `{}`, so bodies whose fields are all optional may be omitted.
#[derive(Debug)]
pub struct JsonBody<T, E>(pub T, pub PhantomData<E>);

impl<S, T, E> FromRequest<S> for JsonBody<T, E>
where
    S: Send + Sync,
    T: DeserializeOwned,
    E: Envelope,
{
    type Rejection = ApiError<E>;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes, _) = RawBody::<E>::from_request(req, state).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse_json(bytes).map(|t| Self(t, PhantomData))
    }
}

/// How long a request body may take to arrive (`REQUEST_READ_TIMEOUT_MS`); the router puts it
/// in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub Duration);

/// The largest body a route takes, where it is not [`limits::BODY_MAX_BYTES`] (for the 413's
/// message; `DefaultBodyLimit` enforces it).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// The raw request body, at most [`limits::BODY_MAX_BYTES`] (or the route's [`BodyLimit`]), arrived within the
/// [`BodyDeadline`]; or an error in envelope `E` (413, 408, 400).
#[derive(Debug)]
pub struct RawBody<E>(pub Bytes, pub PhantomData<E>);

impl<S, E> FromRequest<S> for RawBody<E>
where
    S: Send + Sync,
    E: Envelope,
{
    type Rejection = ApiError<E>;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let deadline = req
            .extensions()
            .get::<BodyDeadline>()
            .map_or(DEFAULT_BODY_DEADLINE, |d| d.0);
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(limits::BODY_MAX_BYTES, |l| l.0);
        let read = tokio::time::timeout(deadline, Bytes::from_request(req, state)).await;
        let Ok(read) = read else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "The request body did not arrive within {} ms.",
                    deadline.as_millis()
                ),
            ));
        };
        read.map(|bytes| Self(bytes, PhantomData))
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("The request body is larger than {limit} bytes."),
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "malformed_request",
                        "The request body could not be read.",
                    )
                }
            })
    }
}

/// The body deadline where the router set none (handlers called directly).
const DEFAULT_BODY_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) fn parse_json<T: DeserializeOwned, E>(bytes: &[u8]) -> Result<T, ApiError<E>> {
    let malformed = |e: &serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("The request body is not valid JSON: {e}"),
        )
    };
    // Syntax first (trailing data included), so broken JSON is a 400 whatever its content.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| malformed(&e))?;
    // serde would fill a struct from an array (`[]` is a valid update that changes nothing):
    // every body of this API is an object, so anything else is refused before it is read.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            "The request body must be a JSON object.",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if !inner.is_data() {
            return malformed(&inner);
        }
        let message = inner.to_string();
        let field = if path == "." {
            missing_field(&message)
        } else {
            Some(path)
        };
        match field {
            Some(f) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "form_param_invalid",
                format!("{f}: {message}"),
            )
            .field(f),
            None => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "form_param_invalid",
                message,
            ),
        }
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

/// serde reports a missing field at the parent's path; pull the field's name out of its message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// A key id from the URL path (`{id}`). Malformed ids cannot exist, so they are 404s too.
#[derive(Debug)]
pub struct KeyIdPath<E>(pub KeyId, pub PhantomData<E>);

impl<S, E> FromRequestParts<S> for KeyIdPath<E>
where
    S: Send + Sync,
    E: Envelope,
{
    type Rejection = ApiError<E>;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::key_not_found())?;
        let id = KeyId::parse(&raw).map_err(|_| ApiError::key_not_found())?;
        Ok(Self(id, PhantomData))
    }
}

/// A key id from a request body field.
pub fn body_key_id<E>(raw: &str, field: &'static str) -> Result<KeyId, ApiError<E>> {
    KeyId::parse(raw).map_err(|_| ApiError::key_not_found().field(field))
}

/// An expiry field of update and roll (`seconds_until_expiration`, `expiration`): a number,
/// or `"never"` to remove the expiry.
///
/// One rule holds for every field of every body: `null` is the same as leaving the field out
/// (it changes nothing), so a restriction is lifted only by an explicit value (`"never"` here,
/// `[]` for `allowed_ips`), never by a `null` that a client library may send for "not given".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    /// A number of seconds or an instant in unix ms, as the field says: any JSON number, whole
    /// or not (JSON has no `NaN` or infinity, and serde_json refuses a number past `f64`).
    Value(f64),
    /// `"never"`: no expiry.
    Never,
}

/// A number of seconds as JSON states it: whole or not (`3600`, `3600.0`, `0.5`), as Clerk's
/// document types `seconds_until_expiration`. Its range is the service's to judge, in whole
/// milliseconds ([`Seconds::millis`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub f64);

impl Seconds {
    /// Whole milliseconds: a number of seconds given to the millisecond is kept exactly
    /// (`2.007` is 2,007 ms, though `2.007 * 1000.0` is a hair over 2007), and a finer one is
    /// rounded up (so any positive number is a positive lifetime). The conversion saturates
    /// (`f64 as i64`): a huge number becomes `i64::MAX`, a negative one stays negative, and the
    /// service refuses both; nothing here can overflow.
    ///
    /// ```
    /// use latchkey_origin::http::extract::Seconds;
    ///
    /// assert_eq!(Seconds(3600.0).millis(), 3_600_000);
    /// assert_eq!(Seconds(2.007).millis(), 2_007);
    /// assert_eq!(Seconds(2.01).millis(), 2_010);
    /// assert_eq!(Seconds(0.0015).millis(), 2);
    /// assert_eq!(Seconds(0.0001).millis(), 1);
    /// assert_eq!(Seconds(3.2e-83).millis(), 1);
    /// assert_eq!(Seconds(-3.2e-83).millis(), 0);
    /// assert_eq!(Seconds(-0.5).millis(), -500);
    /// assert_eq!(Seconds(1e300).millis(), i64::MAX);
    /// ```
    #[allow(
        clippy::cast_possible_truncation,
        reason = "saturating by definition; the service checks the range"
    )]
    pub fn millis(self) -> i64 {
        let ms = self.0 * 1000.0;
        let nearest = ms.round();
        // Within a few units of the last place of a whole millisecond: that millisecond; but a
        // positive number never snaps down to zero (the fuzz target found 3.2e-83 s doing so).
        let close = (ms - nearest).abs() <= 1e-9 * nearest.abs().max(1.0);
        let whole = if close && (nearest != 0.0 || ms <= 0.0) {
            nearest
        } else {
            ms.ceil()
        };
        whole as i64
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        match Expiry::deserialize(de)? {
            Expiry::Value(v) => Ok(Self(v)),
            Expiry::Never => Err(serde::de::Error::custom(
                "\"never\" removes an expiry in an update or a roll; a key created without seconds_until_expiration never expires",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Expiry;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number, or \"never\" to remove the expiry")
            }
            #[allow(
                clippy::cast_precision_loss,
                reason = "past 2^53 the value is far out of every range anyway"
            )]
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Expiry, E> {
                Ok(Expiry::Value(v as f64))
            }
            #[allow(
                clippy::cast_precision_loss,
                reason = "past 2^53 the value is far out of every range anyway"
            )]
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Expiry, E> {
                Ok(Expiry::Value(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Expiry, E> {
                if v.is_finite() {
                    Ok(Expiry::Value(v))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Expiry, E> {
                if v == "never" {
                    Ok(Expiry::Never)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        de.deserialize_any(Visitor)
    }
}

/// A field that clears with its empty value: `""` for a description, `{}` for claims or
/// metadata. `None` (absent or `null`): no change; `Some(None)`: clear; `Some(Some(v))`: set.
pub fn cleared_when_empty<T: IsEmpty>(value: Option<T>) -> Option<Option<T>> {
    value.map(|v| (!v.is_empty()).then_some(v))
}

/// What an empty value of a clearable field is.
pub trait IsEmpty {
    /// Whether this is the field's empty value.
    fn is_empty(&self) -> bool;
}

impl IsEmpty for String {
    fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }
}

impl IsEmpty for serde_json::Value {
    fn is_empty(&self) -> bool {
        self.as_object().is_some_and(serde_json::Map::is_empty)
    }
}

/// Query string pairs, in order. Malformed encodings are a 400 naming the problem: a `%` not
/// followed by two hex digits, bytes that are not UTF-8 once decoded, a repeated name. (`serde_urlencoded`
/// would quietly turn both into other text, and a filter would then match nothing.)
pub fn query_pairs<E>(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError<E>> {
    let malformed = |what: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_query",
            format!("The query string is malformed: {what}."),
        )
    };
    let mut pairs = Vec::new();
    for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let decode = |text: &str| {
            percent_decode(text)
                .ok_or_else(|| malformed("a `%` must be followed by two hex digits"))
                .and_then(|bytes| {
                    String::from_utf8(bytes).map_err(|_| malformed("it is not UTF-8 once decoded"))
                })
        };
        let name = decode(name)?;
        // Every parameter is single-valued: a repeat would silently pick one of them.
        if pairs.iter().any(|(seen, _)| *seen == name) {
            return Err(malformed(&format!(
                "`{}` is given more than once",
                name.chars().take(64).collect::<String>()
            )));
        }
        pairs.push((name, decode(value)?));
    }
    Ok(pairs)
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XY` a byte. `None` for a
/// broken escape.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                u8::try_from(hi * 16 + lo).ok()?
            }
            other => other,
        });
    }
    Some(out)
}

/// A query parameter parse error.
pub fn bad_param<E>(name: &str, expected: &str) -> ApiError<E> {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "form_param_invalid",
        format!("{name}: must be {expected}"),
    )
    .field(name)
}

/// `true`/`false` query values.
pub fn parse_bool<E>(name: &str, value: &str) -> Result<bool, ApiError<E>> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_param(name, "true or false")),
    }
}

/// A whole number query value within `range`, also written as a decimal with no fraction
/// (`20.0`, `2e1`), as a client that types it as a JSON number sends it. `NaN`, infinities,
/// fractions and signs out of range are refused.
///
/// ```
/// use latchkey_origin::http::extract::parse_whole_number;
///
/// let parse = |v: &str| parse_whole_number::<()>("limit", v, 1..=100).ok();
/// assert_eq!(parse("20"), Some(20));
/// assert_eq!(parse("20.0"), Some(20));
/// assert_eq!(parse("2e1"), Some(20));
/// for refused in ["20.5", "0", "101", "-1", "NaN", "inf", "1e400", "", " 5", "0x10"] {
///     assert_eq!(parse(refused), None, "{refused}");
/// }
/// ```
pub fn parse_whole_number<E>(
    name: &str,
    value: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ApiError<E>> {
    let whole = value.parse::<u32>().ok().or_else(|| {
        // Only digits, a point and an exponent: Rust's float parser also takes `inf` and `NaN`.
        let decimal = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
        let number = value.parse::<f64>().ok().filter(|_| decimal)?;
        let whole = number.is_finite()
            && number.fract() == 0.0
            && (0.0..=f64::from(u32::MAX)).contains(&number);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a whole number within u32's range, checked above"
        )]
        whole.then_some(number as u32)
    });
    whole.filter(|n| range.contains(n)).ok_or_else(|| {
        bad_param(
            name,
            &format!("a whole number from {} to {}", range.start(), range.end()),
        )
    })
}

/// A whole number query value within `range`.
pub fn parse_u32<E>(
    name: &str,
    value: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ApiError<E>> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            bad_param(
                name,
                &format!("a whole number from {} to {}", range.start(), range.end()),
            )
        })
}

/// A time as unix milliseconds or an ISO-8601 / RFC 3339 timestamp.
pub fn parse_time<E>(name: &str, value: &str) -> Result<UnixMillis, ApiError<E>> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(UnixMillis(ms));
    }
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
        .map(UnixMillis)
        .ok_or_else(|| bad_param(name, "unix milliseconds or an ISO-8601 timestamp"))
}

/// The most metadata filters one list takes: each is a condition of the query, and no caller
/// needs more.
const MAX_CLAIM_FILTERS: usize = 16;

/// A claim filter's field name from `claims[name]` or `metadata[name]`.
pub fn claim_filter_name(param: &str) -> Option<&str> {
    let inner = param
        .strip_prefix("claims[")
        .or_else(|| param.strip_prefix("metadata["))?
        .strip_suffix(']')?;
    let ok = !inner.is_empty()
        && inner.len() <= 64
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(inner)
}

/// Applies a list filter parameter common to both surfaces. Returns `false` if `name` is not one.
pub fn apply_filter_param<E>(
    filter: &mut crate::model::ListFilter,
    name: &str,
    value: &str,
) -> Result<bool, ApiError<E>> {
    // No stored text holds a NUL (each field refuses it), and PostgreSQL refuses one in a query.
    if value.contains('\0') {
        return Err(bad_param(name, "must not contain the NUL character"));
    }
    match name {
        "subject" => filter.subject = Some(value.to_owned()),
        "revoked" => filter.revoked = Some(parse_bool(name, value)?),
        "expired" => filter.expired = Some(parse_bool(name, value)?),
        "never_used" => filter.never_used = Some(parse_bool(name, value)?),
        "last_used_before" => filter.last_used_before = Some(parse_time(name, value)?),
        _ => match claim_filter_name(name) {
            Some(_) if filter.claims_equal.len() >= MAX_CLAIM_FILTERS => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "form_param_invalid",
                    format!("{name}: one list takes at most {MAX_CLAIM_FILTERS} metadata filters"),
                )
                .field(name));
            }
            Some(field) => filter
                .claims_equal
                .push((field.to_owned(), value.to_owned())),
            None if name.starts_with("claims[") || name.starts_with("metadata[") => {
                return Err(bad_param(
                    name,
                    "claims[<field>] with a field of [A-Za-z0-9_-], at most 64 characters",
                ));
            }
            None => return Ok(false),
        },
    }
    Ok(true)
}

/// A query parameter this route does not know.
pub fn unknown_param<E>(name: &str) -> ApiError<E> {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unknown_query_parameter",
        format!("Unknown query parameter `{name}`."),
    )
    .field(name)
}

/// An instant in unix ms as JSON states it, rounded up to a whole millisecond; saturating, so
/// the service's range check sees any number safely.
#[allow(
    clippy::cast_possible_truncation,
    reason = "saturating by definition; the service checks the range"
)]
fn whole_millis(at: f64) -> i64 {
    at.ceil() as i64
}

/// Expiry changes as a request states them: seconds from now, or an absolute time (not both);
/// `"never"` in either removes the expiry.
pub fn lifetime<E>(
    seconds: Option<Expiry>,
    at: Option<Expiry>,
) -> Result<Option<Lifetime>, ApiError<E>> {
    match (seconds, at) {
        (Some(_), Some(_)) => Err(bad_param(
            "expiration",
            "given either as seconds_until_expiration or as expiration, not both",
        )),
        (Some(Expiry::Never), None) | (None, Some(Expiry::Never)) => Ok(Some(Lifetime::Never)),
        (Some(Expiry::Value(s)), None) => Ok(Some(Lifetime::Millis(Seconds(s).millis()))),
        (None, Some(Expiry::Value(at))) => Ok(Some(Lifetime::At(UnixMillis(whole_millis(at))))),
        (None, None) => Ok(None),
    }
}
