//! The admin bearer tokens (`ADMIN_TOKEN`).

use sha2::{Digest, Sha256};

/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 24;

/// An admin bearer token. Its `Debug` is redacted; its label (a hash prefix) names it in the audit
/// log and logs without revealing it.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
    label: std::sync::Arc<str>,
}

impl AdminToken {
    pub(super) fn new(token: &str) -> Self {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let label = format!("admin:{}", &hex::encode(digest)[..12]).into();
        Self { digest, label }
    }

    /// SHA-256 of the token: compared in constant time against a presented token's digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The non-secret label, `admin:` + first 12 hex digits of the token's SHA-256.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The label, shared (attached to every request it authenticates).
    pub fn shared_label(&self) -> std::sync::Arc<str> {
        self.label.clone()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminToken({})", self.label)
    }
}
