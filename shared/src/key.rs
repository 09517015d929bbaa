//! Partner API keys: the secret itself, its hash at rest, its public id and display hint.
//!
//! # Key format, version 1
//!
//! ```text
//! sk_live_4v7x2jK9lQ8mN3pR5aB7cD9eF1gH3iJ5k0Xy3Zq
//! └──┬──┘ └──────────────┬───────────────┘└─┬──┘
//!  prefix          body: 32 base62        checksum: 6 base62
//! ```
//!
//! * **prefix**: `[a-z][a-z0-9_]{0,15}`, chosen by the operator (default `sk_live`), followed by `_`.
//!   It tells a human (and secret scanners) what the string is. The prefix may itself contain `_`;
//!   parsing splits at the *last* `_`.
//! * **body**: 32 characters of `[0-9A-Za-z]`, each drawn uniformly from random bytes by rejection
//!   sampling, so 32 × log2(62) ≈ 190.5 bits of entropy.
//! * **checksum**: CRC-32 (IEEE) of everything before it (`prefix_body`), written as exactly
//!   6 base62 digits, most significant first. A typo, a truncated paste or a random string fails
//!   the checksum and is rejected without any lookup.
//!
//! The format version is [`KEY_FORMAT_VERSION`]. Version 1 is recognised by its 38-character
//! tail after the last `_`; a future version will use a different tail length (or a marker that
//! cannot occur in v1), so both can be parsed side by side during a migration.
//!
//! At rest a key is only its [`KeyHash`] (SHA-256 of the whole key string) and a [`KeyHint`]
//! (the prefix and the last four characters). The plaintext exists once, in the create response.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::base62;

/// The version of the key format this crate issues and parses.
pub const KEY_FORMAT_VERSION: u8 = 1;

/// The prefix used when the operator configures none.
pub const DEFAULT_KEY_PREFIX: &str = "sk_live";

/// Number of random base62 characters in a key body (≈190.5 bits).
pub const KEY_BODY_LEN: usize = 32;

/// Number of base62 characters of the CRC-32 checksum.
pub const KEY_CHECKSUM_LEN: usize = 6;

const KEY_PREFIX_MAX_LEN: usize = 16;
const KEY_ID_TAG: &str = "key_";
const KEY_ID_BODY_LEN: usize = 20;

/// Why a string is not a key, a prefix, a key id or a key hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The prefix does not match `[a-z][a-z0-9_]{0,15}`.
    #[error("key prefix must match [a-z][a-z0-9_]{{0,15}}")]
    InvalidPrefix,
    /// The string has no `_` separating a prefix from the body.
    #[error("key has no prefix")]
    MissingPrefix,
    /// The part after the prefix is not 38 base62 characters.
    #[error(
        "key body must be {KEY_BODY_LEN} base62 characters followed by a {KEY_CHECKSUM_LEN}-character checksum"
    )]
    InvalidBody,
    /// The checksum does not match the rest of the key.
    #[error("key checksum does not match")]
    ChecksumMismatch,
    /// The key id is not `key_` followed by base62 characters.
    #[error("key id must be `key_` followed by {KEY_ID_BODY_LEN} base62 characters")]
    InvalidKeyId,
    /// The hash is not 64 lowercase hexadecimal characters.
    #[error("key hash must be 64 lowercase hex characters")]
    InvalidHash,
}

/// An operator-chosen key prefix such as `sk_live` (without the trailing `_`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Parses a prefix: `[a-z][a-z0-9_]{0,15}`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let bytes = s.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= KEY_PREFIX_MAX_LEN
            && bytes[0].is_ascii_lowercase()
            && bytes
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(KeyError::InvalidPrefix)
        }
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self(DEFAULT_KEY_PREFIX.to_owned())
    }
}

/// A plaintext partner key. It is a secret: its `Debug` output is redacted and it has no
/// `Display`; use [`ApiKey::expose`] at the single place the plaintext must leave the process.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: String,
    prefix_len: usize,
}

impl ApiKey {
    /// Generates a new key with `prefix`, drawing randomness from `fill_random`, which must be
    /// a cryptographically secure source (origin passes the OS CSPRNG).
    pub fn generate(prefix: &KeyPrefix, fill_random: &mut dyn FnMut(&mut [u8])) -> Self {
        let mut body = [0u8; KEY_BODY_LEN];
        base62::random_chars(&mut body, fill_random);
        let mut text = String::with_capacity(prefix.0.len() + 1 + KEY_BODY_LEN + KEY_CHECKSUM_LEN);
        text.push_str(&prefix.0);
        text.push('_');
        text.extend(body.iter().map(|&b| char::from(b)));
        let checksum = checksum(text.as_bytes());
        text.extend(checksum.iter().map(|&b| char::from(b)));
        Self {
            text,
            prefix_len: prefix.0.len(),
        }
    }

    /// Parses a presented key: prefix syntax, body length and alphabet, then the checksum.
    /// Any prefix of valid syntax is accepted, so keys survive a change of the configured prefix.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let sep = s.rfind('_').ok_or(KeyError::MissingPrefix)?;
        let (prefix, tail) = (&s[..sep], &s[sep + 1..]);
        KeyPrefix::parse(prefix)?;
        let tail = tail.as_bytes();
        if tail.len() != KEY_BODY_LEN + KEY_CHECKSUM_LEN
            || !tail.iter().all(|&b| base62::is_base62(b))
        {
            return Err(KeyError::InvalidBody);
        }
        let split = s.len() - KEY_CHECKSUM_LEN;
        if checksum(&s.as_bytes()[..split]) != s.as_bytes()[split..] {
            return Err(KeyError::ChecksumMismatch);
        }
        Ok(Self {
            text: s.to_owned(),
            prefix_len: sep,
        })
    }

    /// The prefix this key was issued with, without the trailing `_`.
    pub fn prefix(&self) -> &str {
        &self.text[..self.prefix_len]
    }

    /// The SHA-256 of the key: the only form of the key that is stored or published.
    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.text.as_bytes()).into())
    }

    /// The non-secret hint shown in listings: prefix and the last four characters.
    pub fn hint(&self) -> KeyHint {
        KeyHint(format!(
            "{}_…{}",
            self.prefix(),
            &self.text[self.text.len() - 4..]
        ))
    }

    /// The plaintext. Call this only to hand the key to its owner, once.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}_[redacted])", self.prefix())
    }
}

fn checksum(data: &[u8]) -> [u8; KEY_CHECKSUM_LEN] {
    base62::encode_fixed::<KEY_CHECKSUM_LEN>(u64::from(crc32fast::hash(data)))
}

/// SHA-256 of a key: the database index and the KV entry name. Not secret by itself, since the
/// key has ~190 bits of entropy, but still never logged needlessly.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Parses 64 lowercase hexadecimal characters.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(KeyError::InvalidHash);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::InvalidHash)?;
        Ok(Self(out))
    }

    /// Wraps raw digest bytes (as read back from storage).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex (the form `kv_entry_name` writes after `k1:`).
    pub fn to_hex(&self) -> String {
        crate::hex32(&self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

/// The non-secret display hint of a key, e.g. `sk_live_…x3Zq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHint(String);

impl KeyHint {
    /// The hint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a hint read back from storage.
    pub fn from_stored(s: String) -> Self {
        Self(s)
    }
}

/// The public identifier of a key: `key_` + 20 base62 characters. Not secret, url-safe, and
/// unrelated to the key's secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Generates a fresh id from random bytes.
    pub fn generate(fill_random: &mut dyn FnMut(&mut [u8])) -> Self {
        let mut body = [0u8; KEY_ID_BODY_LEN];
        base62::random_chars(&mut body, fill_random);
        let mut s = String::with_capacity(KEY_ID_TAG.len() + KEY_ID_BODY_LEN);
        s.push_str(KEY_ID_TAG);
        s.extend(body.iter().map(|&b| char::from(b)));
        Self(s)
    }

    /// Parses `key_` followed by exactly 20 base62 characters.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        match s.strip_prefix(KEY_ID_TAG) {
            Some(body) if body.len() == KEY_ID_BODY_LEN && body.bytes().all(base62::is_base62) => {
                Ok(Self(s.to_owned()))
            }
            _ => Err(KeyError::InvalidKeyId),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_rng() -> impl FnMut(&mut [u8]) {
        let mut n = 0u8;
        move |buf: &mut [u8]| {
            for b in buf {
                *b = n;
                n = n.wrapping_add(1);
            }
        }
    }

    fn sample_key() -> ApiKey {
        ApiKey::generate(&KeyPrefix::default(), &mut counter_rng())
    }

    #[test]
    fn generated_key_has_documented_shape_and_parses_back() {
        let key = sample_key();
        let text = key.expose();
        assert!(text.starts_with("sk_live_"));
        assert_eq!(
            text.len(),
            "sk_live_".len() + KEY_BODY_LEN + KEY_CHECKSUM_LEN
        );
        let parsed = ApiKey::parse(text).expect("own key parses");
        assert_eq!(parsed, key);
        assert_eq!(parsed.prefix(), "sk_live");
        assert_eq!(parsed.hash(), key.hash());
    }

    #[test]
    fn every_single_character_typo_is_rejected_by_the_checksum() {
        let key = sample_key();
        let text = key.expose().to_owned();
        let tail_start = text.rfind('_').expect("separator") + 1;
        for i in tail_start..text.len() {
            for replacement in [b'0', b'Z', b'z', b'q'] {
                let mut bytes = text.clone().into_bytes();
                if bytes[i] == replacement {
                    continue;
                }
                bytes[i] = replacement;
                let typo = String::from_utf8(bytes).expect("ascii");
                assert_eq!(
                    ApiKey::parse(&typo),
                    Err(KeyError::ChecksumMismatch),
                    "{typo}"
                );
            }
        }
    }

    #[test]
    fn parse_table() {
        let good = sample_key().expose().to_owned();
        let cases: &[(&str, Result<(), KeyError>)] = &[
            (&good, Ok(())),
            ("", Err(KeyError::MissingPrefix)),
            ("nounderscore", Err(KeyError::MissingPrefix)),
            ("_abc", Err(KeyError::InvalidPrefix)),
            (
                "Sk_live_0123456789012345678901234567890123456789",
                Err(KeyError::InvalidPrefix),
            ),
            ("sk_live_short", Err(KeyError::InvalidBody)),
            (
                "sk_live_0123456789012345678901234567890123456-",
                Err(KeyError::InvalidBody),
            ),
            (
                "sk_live_01234567890123456789012345678901234567",
                Err(KeyError::ChecksumMismatch),
            ),
            (
                "sk_live_ü123456789012345678901234567890123456",
                Err(KeyError::InvalidBody),
            ),
            (
                "a_very_long_prefix_0123456789012345678901234567890123456789",
                Err(KeyError::InvalidPrefix),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                ApiKey::parse(input).map(|_| ()),
                *expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn prefixes_with_underscores_round_trip() {
        let prefix = KeyPrefix::parse("acme_test_v2").expect("valid prefix");
        let key = ApiKey::generate(&prefix, &mut counter_rng());
        let parsed = ApiKey::parse(key.expose()).expect("parses");
        assert_eq!(parsed.prefix(), "acme_test_v2");
        assert!(parsed.hint().as_str().starts_with("acme_test_v2_…"));
    }

    #[test]
    fn prefix_table() {
        for ok in ["a", "sk_live", "sk_test", "a0_b1", "abcdefghijklmnop"] {
            assert!(KeyPrefix::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0sk",
            "Sk",
            "sk-live",
            "abcdefghijklmnopq",
            "sk live",
            "_sk",
        ] {
            assert_eq!(KeyPrefix::parse(bad), Err(KeyError::InvalidPrefix), "{bad}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let key = sample_key();
        let debug = format!("{key:?}");
        assert_eq!(debug, "ApiKey(sk_live_[redacted])");
    }

    #[test]
    fn hint_is_prefix_and_last_four() {
        let key = sample_key();
        let text = key.expose();
        assert_eq!(
            key.hint().as_str(),
            format!("sk_live_…{}", &text[text.len() - 4..])
        );
    }

    #[test]
    fn hash_is_sha256_of_the_key_text() {
        let key = ApiKey::parse(sample_key().expose()).expect("parses");
        let expected = Sha256::digest(key.expose().as_bytes());
        assert_eq!(key.hash().as_bytes().as_slice(), expected.as_slice());
        assert_eq!(KeyHash::parse(&key.hash().to_hex()), Ok(key.hash()));
        assert_eq!(
            KeyHash::parse(&key.hash().to_hex().to_uppercase()),
            Err(KeyError::InvalidHash)
        );
        assert_eq!(KeyHash::parse("abc"), Err(KeyError::InvalidHash));
    }

    #[test]
    fn key_id_table() {
        let id = KeyId::generate(&mut counter_rng());
        assert!(id.as_str().starts_with("key_"));
        assert_eq!(KeyId::parse(id.as_str()), Ok(id.clone()));
        for bad in [
            "",
            "key_",
            "key_abc",
            "KEY_0123456789abcdefghij",
            "key_0123456789abcdefghi/",
            "key_../../etc/passwd_x",
            "key_0123456789abcdefghijk",
        ] {
            assert_eq!(KeyId::parse(bad), Err(KeyError::InvalidKeyId), "{bad}");
        }
    }
}
