//! GitHub secret scanning: the public keys GitHub signs its alerts with, and the check of an
//! alert's signature.
//!
//! GitHub POSTs each batch of leaked tokens with `Github-Public-Key-Identifier` (which key) and
//! `Github-Public-Key-Signature` (base64 of an ASN.1 DER ECDSA P-256 signature, over SHA-256 of
//! the raw body). Its keys are published at
//! `https://api.github.com/meta/public_keys/secret_scanning` as
//! `{"public_keys":[{"key_identifier","key" (PEM),"is_current"}]}`; origin reads that format
//! from a file (`GITHUB_SECRET_SCANNING_KEYS_FILE`) and, if told to, fetches it
//! (`GITHUB_SECRET_SCANNING_KEYS_URL`): hourly, and again (at most every five minutes) when an
//! alert names a key it does not know, keeping the last good list when a fetch fails. Neither is
//! needed to start: without keys, alerts are answered 503 and GitHub retries them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

/// The headers of a signed alert.
pub mod header {
    /// Which of GitHub's keys signed the alert.
    pub const KEY_IDENTIFIER: &str = "github-public-key-identifier";
    /// Base64 of the DER signature over the raw body.
    pub const SIGNATURE: &str = "github-public-key-signature";
}

/// The least time between two reloads caused by an unknown key identifier.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(300);
/// The longest a fetch of GitHub's list may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// GitHub's key list, in its own format.
#[derive(Debug, Deserialize)]
struct KeyList {
    public_keys: Vec<PublishedKey>,
}

#[derive(Debug, Deserialize)]
struct PublishedKey {
    key_identifier: String,
    key: String,
}

/// A key list that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// Not GitHub's `{"public_keys":[…]}` format.
    #[error("not a GitHub public key list ({0})")]
    Format(String),
    /// An entry's `key` is not a PEM P-256 public key.
    #[error("key {identifier} is not a PEM-encoded P-256 public key")]
    Key {
        /// The entry's `key_identifier`.
        identifier: String,
    },
    /// The list is empty.
    #[error("the list holds no key")]
    Empty,
    /// The HTTP client could not be made.
    #[error("cannot make the HTTP client: {0}")]
    Client(String),
    /// The fetch failed.
    #[error("fetching {url} failed: {problem}")]
    Fetch {
        /// Where from.
        url: String,
        /// What went wrong.
        problem: String,
    },
}

/// Why an alert's signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A header is missing (or not text).
    #[error("the {0} header is missing")]
    Missing(&'static str),
    /// The signature is not base64 of a DER ECDSA signature.
    #[error("the signature is not base64 of a DER-encoded ECDSA signature")]
    Malformed,
    /// No known key has this identifier.
    #[error("no GitHub public key with this identifier is known")]
    UnknownKey,
    /// The key does not verify the signature over this body.
    #[error("the signature does not verify over the request body")]
    Mismatch,
    /// No key is known at all (the list could not be read or fetched yet): not the sender's
    /// fault, and worth a retry.
    #[error("GitHub's public keys are not available yet")]
    NoKeys,
    /// A key identifier shaped like GitHub's is not known, and the list was reloaded too
    /// recently to try again: worth a retry.
    #[error("this GitHub public key is not known yet; the key list is reloaded every few minutes")]
    NotReloaded,
}

/// A signature whose headers passed [`GithubKeys::check_headers`], to check over the body.
#[derive(Debug)]
pub struct Checked {
    key: VerifyingKey,
    signature: Signature,
}

impl Checked {
    /// Whether the signature verifies over `body` with the key its header named.
    pub fn verify(&self, body: &[u8]) -> Result<(), SignatureError> {
        self.key
            .verify(body, &self.signature)
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// The longest signature header looked at (a DER P-256 signature is at most 72 bytes, 96 in
/// base64).
const SIGNATURE_TEXT_MAX: usize = 200;

/// GitHub's key identifiers are 64 hex digits (a SHA-256).
fn looks_like_githubs(identifier: &str) -> bool {
    identifier.len() == 64 && identifier.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The largest key list read from GitHub's URL.
const KEY_LIST_MAX_BYTES: usize = 1024 * 1024;

/// Parses GitHub's key list format into its keys by identifier.
pub fn parse_key_list(json: &[u8]) -> Result<HashMap<String, VerifyingKey>, KeysError> {
    let list: KeyList =
        serde_json::from_slice(json).map_err(|e| KeysError::Format(e.to_string()))?;
    let keys: HashMap<String, VerifyingKey> = list
        .public_keys
        .into_iter()
        .map(|k| {
            VerifyingKey::from_public_key_pem(k.key.trim())
                .map(|key| (k.key_identifier.clone(), key))
                .map_err(|_| KeysError::Key {
                    identifier: k.key_identifier.chars().take(100).collect(),
                })
        })
        .collect::<Result<_, _>>()?;
    if keys.is_empty() {
        return Err(KeysError::Empty);
    }
    Ok(keys)
}

pub use crate::config::KeySources;

/// The keys GitHub signs with, from a file and/or fetched.
#[derive(Debug)]
pub struct GithubKeys {
    sources: KeySources,
    http: reqwest::Client,
    /// The file's keys and the last good fetch's, by identifier.
    known: RwLock<Known>,
    /// When an unknown identifier last caused a reload (rate limit).
    last_reload: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Known {
    from_file: HashMap<String, VerifyingKey>,
    fetched: HashMap<String, VerifyingKey>,
}

impl Known {
    fn get(&self, identifier: &str) -> Option<VerifyingKey> {
        self.from_file
            .get(identifier)
            .or_else(|| self.fetched.get(identifier))
            .copied()
    }

    fn is_empty(&self) -> bool {
        self.from_file.is_empty() && self.fetched.is_empty()
    }
}

impl GithubKeys {
    /// Reads the file, if one is configured: a file that cannot be used stops origin's start,
    /// since it is the operator's configuration. The URL is fetched later ([`Self::refresh`]).
    pub fn load(sources: KeySources) -> Result<Self, KeysError> {
        let from_file = match &sources.file {
            Some(path) => read_file(path)?,
            None => HashMap::new(),
        };
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .user_agent("latchkey-origin")
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KeysError::Client(e.to_string()))?;
        Ok(Self {
            sources,
            http,
            known: RwLock::new(Known {
                from_file,
                fetched: HashMap::new(),
            }),
            last_reload: tokio::sync::Mutex::new(None),
        })
    }

    /// How many keys are known (file and fetched).
    pub fn count(&self) -> usize {
        let known = self.read();
        known.from_file.len() + known.fetched.len()
    }

    /// Checks an alert's signature headers against `body` ([`Self::check_headers`], then
    /// [`Checked::verify`]).
    pub async fn verify(
        &self,
        identifier: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        self.check_headers(identifier, signature)
            .await?
            .verify(body)
    }

    /// Checks what can be checked before the body is read: both headers present, the
    /// signature base64 of a DER signature, the key known. An identifier shaped like GitHub's
    /// (64 hex digits) that is not known reloads the sources first, at most every five minutes,
    /// so a key GitHub rotated in is found (and a stream of made-up identifiers costs GitHub's
    /// API nothing).
    pub async fn check_headers(
        &self,
        identifier: Option<&str>,
        signature: Option<&str>,
    ) -> Result<Checked, SignatureError> {
        let identifier = identifier.ok_or(SignatureError::Missing(header::KEY_IDENTIFIER))?;
        let signature = signature.ok_or(SignatureError::Missing(header::SIGNATURE))?;
        if signature.len() > SIGNATURE_TEXT_MAX {
            return Err(SignatureError::Malformed);
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| SignatureError::Malformed)?;
        let signature = Signature::from_der(&der).map_err(|_| SignatureError::Malformed)?;
        let cached = self.read().get(identifier);
        let key = match cached {
            Some(key) => key,
            None => {
                let shaped = looks_like_githubs(identifier);
                let reloaded = shaped && self.reload_for_unknown_key().await;
                let known = self.read();
                match known.get(identifier) {
                    Some(key) => key,
                    None if known.is_empty() => return Err(SignatureError::NoKeys),
                    // A key GitHub may have rotated in while the last reload is too recent to
                    // try again: GitHub retries a 503, not a 401.
                    None if shaped && !reloaded => return Err(SignatureError::NotReloaded),
                    None => return Err(SignatureError::UnknownKey),
                }
            }
        };
        Ok(Checked { key, signature })
    }

    /// Re-reads the file and fetches the URL (each if configured), keeping what was known
    /// where one fails. Returns the first failure, for the log.
    pub async fn refresh(&self) -> Result<(), KeysError> {
        let mut outcome = Ok(());
        if let Some(path) = &self.sources.file {
            let read = tokio::task::spawn_blocking({
                let path = path.clone();
                move || read_file(&path)
            })
            .await
            .unwrap_or_else(|e| Err(KeysError::Format(e.to_string())));
            match read {
                Ok(keys) => self.write().from_file = keys,
                Err(error) => outcome = Err(error),
            }
        }
        if let Some(url) = &self.sources.url {
            match self.fetch(url).await {
                Ok(keys) => self.write().fetched = keys,
                Err(error) => {
                    if outcome.is_ok() {
                        outcome = Err(error);
                    }
                }
            }
        }
        outcome
    }

    /// Keeps the fetched list fresh: at once, then every `refresh_every`. Failures are logged;
    /// the last good list stays in use.
    pub async fn keep_fresh(self: Arc<Self>) {
        if self.sources.url.is_none() {
            return;
        }
        loop {
            match self.refresh().await {
                Ok(()) => tracing::info!(keys = self.count(), "GitHub secret scanning keys loaded"),
                Err(error) => {
                    tracing::warn!(%error, "GitHub secret scanning keys not refreshed; the last good list stays in use");
                }
            }
            tokio::time::sleep(self.sources.refresh_every).await;
        }
    }

    /// Reloads the sources unless that was done less than [`RELOAD_AT_MOST_EVERY`] ago;
    /// `false` if it was not done now.
    async fn reload_for_unknown_key(&self) -> bool {
        let mut last = self.last_reload.lock().await;
        if last.is_some_and(|at| at.elapsed() < RELOAD_AT_MOST_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        if let Err(error) = self.refresh().await {
            tracing::warn!(%error, "reloading GitHub secret scanning keys for an unknown key identifier");
        }
        true
    }

    async fn fetch(&self, url: &str) -> Result<HashMap<String, VerifyingKey>, KeysError> {
        let failed = |problem: String| KeysError::Fetch {
            url: url.to_owned(),
            problem,
        };
        let response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| failed(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("answered {}", response.status())));
        }
        if response
            .content_length()
            .is_some_and(|n| n > KEY_LIST_MAX_BYTES as u64)
        {
            return Err(failed(format!(
                "answered more than {KEY_LIST_MAX_BYTES} bytes"
            )));
        }
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| failed(e.without_url().to_string()))?
        {
            if body.len() + chunk.len() > KEY_LIST_MAX_BYTES {
                return Err(failed(format!(
                    "answered more than {KEY_LIST_MAX_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_list(&body)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn read_file(path: &std::path::Path) -> Result<HashMap<String, VerifyingKey>, KeysError> {
    let bytes = std::fs::read(path).map_err(|error| KeysError::Read {
        path: path.display().to_string(),
        error,
    })?;
    parse_key_list(&bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "test code")]

    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    fn key_pair(seed: u8) -> (SigningKey, String) {
        let signing = SigningKey::from_slice(&[seed; 32]).expect("a scalar in range");
        let pem = signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        (signing, pem)
    }

    fn list(entries: &[(&str, &str)]) -> Vec<u8> {
        let keys: Vec<_> = entries
            .iter()
            .map(|(id, pem)| serde_json::json!({"key_identifier": id, "key": pem, "is_current": true}))
            .collect();
        serde_json::to_vec(&serde_json::json!({ "public_keys": keys })).expect("json")
    }

    fn keys_from(json: &[u8]) -> GithubKeys {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys.json");
        std::fs::write(&path, json).expect("write");
        GithubKeys::load(KeySources {
            file: Some(path),
            url: None,
            refresh_every: Duration::from_secs(3600),
        })
        .expect("load")
    }

    fn sign(key: &SigningKey, body: &[u8]) -> String {
        let signature: Signature = key.sign(body);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    #[tokio::test]
    async fn a_signature_verifies_only_with_its_key_over_its_body() {
        let (signing, pem) = key_pair(7);
        let (other, other_pem) = key_pair(9);
        let keys = keys_from(&list(&[("k1", &pem), ("k2", &other_pem)]));
        let body = br#"[{"token":"t","type":"x","url":"u","source":"content"}]"#;
        let good = sign(&signing, body);
        assert_eq!(keys.verify(Some("k1"), Some(&good), body).await, Ok(()));
        // Identifier, signature, body, and the refusal.
        type Case<'a> = (Option<&'a str>, Option<String>, &'a [u8], SignatureError);
        let cases: [Case<'_>; 7] = [
            (
                None,
                Some(good.clone()),
                body,
                SignatureError::Missing(header::KEY_IDENTIFIER),
            ),
            (
                Some("k1"),
                None,
                body,
                SignatureError::Missing(header::SIGNATURE),
            ),
            (
                Some("k1"),
                Some("not base64!".into()),
                body,
                SignatureError::Malformed,
            ),
            (
                Some("k1"),
                Some("AAAA".into()),
                body,
                SignatureError::Malformed,
            ),
            (
                Some("k3"),
                Some(good.clone()),
                body,
                SignatureError::UnknownKey,
            ),
            (
                Some("k2"),
                Some(good.clone()),
                body,
                SignatureError::Mismatch,
            ),
            (
                Some("k1"),
                Some(sign(&other, body)),
                body,
                SignatureError::Mismatch,
            ),
        ];
        for (id, signature, body, want) in cases {
            assert_eq!(
                keys.verify(id, signature.as_deref(), body).await,
                Err(want),
                "{id:?} {signature:?}"
            );
        }
        let mut altered = body.to_vec();
        altered[3] ^= 1;
        assert_eq!(
            keys.verify(Some("k1"), Some(&good), &altered).await,
            Err(SignatureError::Mismatch)
        );
    }

    /// GitHub rotates its keys: an alert signed by a key not yet known reloads the list once,
    /// and finds it. Only identifiers shaped like GitHub's (64 hex digits) cause a reload.
    #[tokio::test]
    async fn an_unknown_key_reloads_the_list() {
        let (first, first_pem) = key_pair(7);
        let (second, second_pem) = key_pair(8);
        let (k1, k2) = ("1".repeat(64), "2".repeat(64));
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys.json");
        std::fs::write(&path, list(&[(&k1, &first_pem), ("made-up", &second_pem)])).expect("write");
        let keys = GithubKeys::load(KeySources {
            file: Some(path.clone()),
            url: None,
            refresh_every: Duration::from_secs(3600),
        })
        .expect("load");
        let body = b"[]";
        let signed = |key: &SigningKey| sign(key, body);
        assert_eq!(
            keys.verify(Some(&k1), Some(&signed(&first)), body).await,
            Ok(())
        );
        std::fs::write(&path, list(&[(&k1, &first_pem), (&k2, &second_pem)])).expect("write");
        assert_eq!(
            keys.verify(Some("also-made-up"), Some(&signed(&second)), body)
                .await,
            Err(SignatureError::UnknownKey),
            "not GitHub's shape: no reload"
        );
        assert_eq!(
            keys.verify(Some(&k2), Some(&signed(&second)), body).await,
            Ok(())
        );
        assert_eq!(keys.count(), 2);
        // A broken file later keeps the keys known (the last good list).
        std::fs::write(&path, b"{").expect("write");
        assert!(keys.refresh().await.is_err());
        assert_eq!(
            keys.verify(Some(&k1), Some(&signed(&first)), body).await,
            Ok(())
        );
    }

    #[test]
    fn key_lists_must_be_githubs_format_with_p256_keys() {
        let (_, pem) = key_pair(7);
        assert_eq!(
            parse_key_list(&list(&[("k1", &pem)])).expect("valid").len(),
            1
        );
        for bad in [
            br#"{"public_keys":[]}"#.to_vec(),
            br#"{"keys":[]}"#.to_vec(),
            b"[]".to_vec(),
            list(&[(
                "k1",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
            )]),
        ] {
            assert!(
                parse_key_list(&bad).is_err(),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }
}
