//! HMAC-SHA256 signatures for the two messages the edge sends that someone else must trust:
//! the identity headers it adds to a forwarded gateway request (checked by the upstream with
//! [`gateway::GatewayVerifier`]), and the usage batches it reports to origin (checked by
//! origin with [`verify_signed`]).
//!
//! Each signature covers a timestamp, so a receiver can refuse stale messages, and a canonical
//! encoding in which no field can be moved into another. Every secret is read with one rule,
//! [`SigningSecret::parse`].

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::record::UnixMillis;

type HmacSha256 = Hmac<Sha256>;

/// How far a signed message's timestamp may be from the receiver's clock, either way.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Shortest signing secret accepted, in bytes, after trimming (see [`SigningSecret::parse`]).
pub const SECRET_MIN_LEN: usize = 32;

/// A secret that signs messages between Latchkey's parts (`UPSTREAM_SIGNING_SECRET`,
/// `USAGE_SIGNING_SECRET`, …). Origin and the edge read every such setting with the same rule,
/// [`SigningSecret::parse`], so the two sides can never disagree about its bytes. Its `Debug`
/// is redacted.
///
/// ```
/// use latchkey_shared::sign::{SecretError, SigningSecret};
///
/// let secret = SigningSecret::parse("  0123456789abcdef0123456789abcdef\n").unwrap();
/// assert_eq!(secret.as_bytes(), b"0123456789abcdef0123456789abcdef");
/// assert_eq!(format!("{secret:?}"), "SigningSecret(<redacted>)");
/// assert_eq!(SigningSecret::parse("short"), Err(SecretError::TooShort { len: 5 }));
/// ```
#[derive(Clone)]
pub struct SigningSecret {
    bytes: Vec<u8>,
    /// HMAC-SHA256 keyed with `bytes`, before any message: each signature starts from a copy,
    /// so the key's two padded blocks are hashed once, not on every message.
    keyed: HmacSha256,
}

impl PartialEq for SigningSecret {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for SigningSecret {}

/// Why a signing secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Fewer than [`SECRET_MIN_LEN`] bytes once trimmed.
    #[error(
        "must be at least {SECRET_MIN_LEN} characters (e.g. `openssl rand -hex 32`), got {len}"
    )]
    TooShort {
        /// Its length in bytes, trimmed.
        len: usize,
    },
    /// It holds a control character inside it (a pasted line break, a NUL).
    #[error("must not contain control characters")]
    ControlCharacter,
}

impl SigningSecret {
    /// The one rule for reading a secret setting: ASCII white space at both ends is removed
    /// (a trailing newline from `echo` or a file), nothing else is changed, and what remains
    /// must be at least [`SECRET_MIN_LEN`] bytes with no control characters.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.chars().any(char::is_control) {
            return Err(SecretError::ControlCharacter);
        }
        if trimmed.len() < SECRET_MIN_LEN {
            return Err(SecretError::TooShort { len: trimmed.len() });
        }
        let bytes = trimmed.as_bytes().to_vec();
        let keyed = keyed(&bytes);
        Ok(Self { bytes, keyed })
    }

    /// The secret's bytes, the HMAC key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// HMAC-SHA256 under this secret, fed `message`.
    fn mac(&self, message: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(message);
        mac
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// The first two roles, by name, that were given the same secret: each role needs its own, or a
/// message signed for one could be passed off as the other.
///
/// ```
/// use latchkey_shared::sign::{SigningSecret, shared_secret};
///
/// let a = SigningSecret::parse(&"a".repeat(32)).unwrap();
/// let b = SigningSecret::parse(&"b".repeat(32)).unwrap();
/// assert_eq!(shared_secret(&[("X", a.as_bytes()), ("Y", b.as_bytes())]), None);
/// assert_eq!(shared_secret(&[("X", a.as_bytes()), ("Y", a.as_bytes())]), Some(("X", "Y")));
/// ```
pub fn shared_secret<'a>(roles: &[(&'a str, &[u8])]) -> Option<(&'a str, &'a str)> {
    roles.iter().enumerate().find_map(|(i, (first, a))| {
        roles[i + 1..]
            .iter()
            .find(|(_, b)| a == b)
            .map(|(second, _)| (*first, *second))
    })
}

pub mod gateway;
pub use gateway::header;

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The timestamp is missing or not an integer.
    #[error("the signature timestamp is missing or not a number")]
    BadTimestamp,
    /// The timestamp is further than [`MAX_CLOCK_SKEW_MS`] from now.
    #[error("the signature timestamp is too far from the current time")]
    Stale,
    /// The signature is missing, not hex, or does not match.
    #[error("the signature does not match")]
    Mismatch,
}

/// The canonical string for a usage batch: the timestamp and the exact body bytes.
pub fn usage_message(timestamp: UnixMillis, body: &[u8]) -> Vec<u8> {
    let mut message = format!("latchkey-usage-v1\n{}\n", timestamp.0).into_bytes();
    message.extend_from_slice(body);
    message
}

/// Signs `message` with `secret`: lowercase hex HMAC-SHA256.
pub fn sign(secret: &[u8], message: &[u8]) -> String {
    crate::hex32(&mac(secret, message).finalize().into_bytes().into())
}

/// A signature [`verify_signed`] accepted: what replay guards key on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The signed timestamp.
    pub timestamp: UnixMillis,
    /// The MAC's 32 bytes, decoded: one value per signed message, however its hex was written.
    pub mac: [u8; 32],
}

/// Checks a signature made by [`sign`] in constant time, and that `timestamp` (the raw header
/// value) is within [`MAX_CLOCK_SKEW_MS`] of `now`. Returns the timestamp and the decoded MAC.
pub fn verify_signed(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    now: UnixMillis,
    message: impl FnOnce(UnixMillis) -> Vec<u8>,
) -> Result<Verified, SignatureError> {
    let timestamp = timestamp
        .and_then(|t| t.trim().parse::<i64>().ok())
        .map(UnixMillis)
        .ok_or(SignatureError::BadTimestamp)?;
    if !within_skew(now, timestamp) {
        return Err(SignatureError::Stale);
    }
    let mac = verify_mac(
        secret,
        &message(timestamp),
        signature.ok_or(SignatureError::Mismatch)?,
    )?;
    Ok(Verified { timestamp, mac })
}

/// Checks a hex MAC made by [`sign`] over `message`, in constant time; returns its decoded
/// bytes.
pub fn verify_mac(
    secret: &[u8],
    message: &[u8],
    hex_mac: &str,
) -> Result<[u8; 32], SignatureError> {
    let mac_bytes: [u8; 32] = hex::decode(hex_mac.trim())
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(SignatureError::Mismatch)?;
    mac(secret, message)
        .verify_slice(&mac_bytes)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok(mac_bytes)
}

/// Whether `timestamp` is within [`MAX_CLOCK_SKEW_MS`] of `now`, for any two values: the
/// distance is taken with `abs_diff`, which cannot overflow on an untrusted extreme.
pub fn within_skew(now: UnixMillis, timestamp: UnixMillis) -> bool {
    now.0.abs_diff(timestamp.0) <= MAX_CLOCK_SKEW_MS.unsigned_abs()
}

fn mac(secret: &[u8], message: &[u8]) -> HmacSha256 {
    let mut mac = keyed(secret);
    mac.update(message);
    mac
}

/// HMAC-SHA256 keyed with `secret`, before any message.
fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

    fn check(
        ts: Option<&str>,
        sig: Option<&str>,
        body: &[u8],
    ) -> Result<UnixMillis, SignatureError> {
        verify_signed(b"secret", ts, sig, NOW, |t| usage_message(t, body)).map(|v| v.timestamp)
    }

    #[test]
    fn the_mac_is_returned_decoded_so_its_spelling_does_not_matter() {
        let sig = sign(b"secret", &usage_message(NOW, b"{}"));
        let ts = NOW.0.to_string();
        let lower = verify_signed(b"secret", Some(&ts), Some(&sig), NOW, |t| {
            usage_message(t, b"{}")
        });
        let upper = verify_signed(b"secret", Some(&ts), Some(&sig.to_uppercase()), NOW, |t| {
            usage_message(t, b"{}")
        });
        assert_eq!(lower, upper);
        assert_eq!(lower.map(|v| hex::encode(v.mac)), Ok(sig));
    }

    #[test]
    fn known_answer_matches_rfc_4231_case_2() {
        // RFC 4231, test case 2: key "Jefe".
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn accepts_its_own_signature_and_refuses_every_alteration() {
        let sig = sign(b"secret", &usage_message(NOW, b"{}"));
        let ts = NOW.0.to_string();
        assert_eq!(check(Some(&ts), Some(&sig), b"{}"), Ok(NOW));
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a [u8], SignatureError);
        let cases: [Case<'_>; 6] = [
            (Some(&ts), Some(&sig), b"{ }", SignatureError::Mismatch),
            (
                Some("1700000000001"),
                Some(&sig),
                b"{}",
                SignatureError::Mismatch,
            ),
            (Some(&ts), Some("zz"), b"{}", SignatureError::Mismatch),
            (Some(&ts), None, b"{}", SignatureError::Mismatch),
            (None, Some(&sig), b"{}", SignatureError::BadTimestamp),
            (
                Some("soon"),
                Some(&sig),
                b"{}",
                SignatureError::BadTimestamp,
            ),
        ];
        for (ts, sig, body, want) in cases {
            assert_eq!(check(ts, sig, body), Err(want), "{ts:?} {sig:?} {body:?}");
        }
        let wrong_secret = sign(b"other", &usage_message(NOW, b"{}"));
        assert_eq!(
            check(Some(&ts), Some(&wrong_secret), b"{}"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn extreme_timestamps_are_stale_not_an_overflow() {
        for extreme in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX] {
            let ts = extreme.to_string();
            assert_eq!(
                check(Some(&ts), Some("00"), b"{}"),
                Err(SignatureError::Stale),
                "{extreme}"
            );
        }
        let (min, max) = (UnixMillis(i64::MIN), UnixMillis(i64::MAX));
        assert!(!within_skew(min, max) && !within_skew(max, min));
        assert!(within_skew(min, min) && within_skew(max, max));
        assert!(within_skew(min, UnixMillis(i64::MIN + MAX_CLOCK_SKEW_MS)));
        assert!(!within_skew(
            max,
            UnixMillis(i64::MAX - MAX_CLOCK_SKEW_MS - 1)
        ));
    }

    #[test]
    fn refuses_timestamps_outside_the_skew_window() {
        for offset in [MAX_CLOCK_SKEW_MS + 1, -(MAX_CLOCK_SKEW_MS + 1)] {
            let at = UnixMillis(NOW.0 + offset);
            let sig = sign(b"secret", &usage_message(at, b"{}"));
            assert_eq!(
                check(Some(&at.0.to_string()), Some(&sig), b"{}"),
                Err(SignatureError::Stale)
            );
        }
    }
}
