//! A stand-in for GitHub's secret scanning signer: a throwaway P-256 key pair (GitHub's own keys
//! cannot sign for a test), its entry in GitHub's key list format, and alerts signed as GitHub
//! signs them (base64 of a DER ECDSA signature over the raw body).

#![allow(
    clippy::expect_used,
    reason = "test support: a failure here is a failed test"
)]

use std::path::{Path, PathBuf};

use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use serde_json::{Value, json};

/// Where GitHub's alerts go.
pub const ALERTS: &str = "/v1/secret_scanning/github";
/// The header naming the signing key.
pub const KEY_ID_HEADER: &str = "Github-Public-Key-Identifier";
/// The header holding the signature.
pub const SIGNATURE_HEADER: &str = "Github-Public-Key-Signature";

/// A signing key and its identifier.
pub struct GithubKey {
    pub id: String,
    signing: SigningKey,
}

impl GithubKey {
    /// A new random key.
    pub fn new(id: &str) -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("random");
        Self {
            id: id.to_owned(),
            signing: SigningKey::from_slice(&bytes).expect("a scalar in range"),
        }
    }

    /// Its entry in GitHub's key list.
    pub fn listed(&self) -> Value {
        let pem = self
            .signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        json!({ "key_identifier": self.id, "key": pem, "is_current": true })
    }

    /// The `Github-Public-Key-Signature` value for `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        let signature: Signature = self.signing.sign(body);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    /// `req` with this key's signature headers over `body`, and the body.
    pub fn signed(&self, req: reqwest::RequestBuilder, body: &[u8]) -> reqwest::RequestBuilder {
        req.header("content-type", "application/json")
            .header(KEY_ID_HEADER, &self.id)
            .header(SIGNATURE_HEADER, self.sign(body))
            .body(body.to_vec())
    }
}

/// GitHub's key list format holding `keys`.
pub fn key_list(keys: &[&GithubKey]) -> Value {
    json!({ "public_keys": keys.iter().map(|k| k.listed()).collect::<Vec<_>>() })
}

/// Writes `keys` as GitHub's list into `dir`, for `GITHUB_SECRET_SCANNING_KEYS_FILE`.
pub fn write_key_file(dir: &Path, keys: &[&GithubKey]) -> PathBuf {
    let file = dir.join("github-keys.json");
    std::fs::write(&file, key_list(keys).to_string()).expect("write keys");
    file
}
