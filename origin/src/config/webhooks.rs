//! Event webhooks: the endpoints and their signing secrets (`WEBHOOK_*`).

use std::time::Duration;

use latchkey_shared::target::UpstreamUrl;

use super::{ConfigError, millis, problem};

/// A Standard Webhooks signing secret: `whsec_` and the base64 of 24 to 64 random bytes.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// Parses `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let encoded = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or("must start with whsec_ (a Standard Webhooks secret)")?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| "must be whsec_ followed by base64")?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(format!(
                "must hold 24 to 64 random bytes, not {} (e.g. whsec_$(openssl rand -base64 32))",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// The secret's bytes (for the rule that each role has its own secret).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret `endpoint` is signed for: an HMAC-SHA256 of its URL under this secret. Each
    /// receiver holds only its own, so no receiver can sign an event another one accepts;
    /// `origin webhook-secrets` prints it for the receiver's operator. `None` only if the MAC
    /// were not 32 bytes, which `sign` never answers: then that endpoint is not signed for (and
    /// with no signer left, webhooks are off), never signed with an empty key.
    pub fn for_endpoint(&self, endpoint: &Endpoint) -> Option<Self> {
        let mut message = b"latchkey-webhook-endpoint-v1\n".to_vec();
        message.extend_from_slice(endpoint.url.as_bytes());
        let mac = latchkey_shared::sign::sign(&self.0, &message);
        hex::decode(mac)
            .ok()
            .filter(|bytes| bytes.len() == 32)
            .map(Self)
    }

    /// As `WEBHOOK_SECRET` spells a secret: `whsec_<base64>`.
    pub fn to_whsec(&self) -> String {
        use base64::Engine as _;
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(&self.0)
        )
    }
}

/// Where and how events are delivered.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `WEBHOOK_URLS`: the endpoints.
    pub endpoints: Vec<Endpoint>,
    /// `WEBHOOK_SECRET`: one or more secrets; every delivery carries a signature by each (list
    /// the new one beside the old while receivers move over).
    pub secrets: Vec<WebhookSecret>,
    /// `WEBHOOK_SIGN_WITH_SHARED_SECRET`: while receivers move to their own secrets, also sign
    /// with `WEBHOOK_SECRET` itself (which lets any receiver forge events to the others).
    pub sign_with_shared: bool,
    /// `WEBHOOK_TIMEOUT_MS`: the limit on one delivery.
    pub timeout: Duration,
    /// `WEBHOOK_RETRY_MAX_MS`: the longest wait between two attempts.
    pub retry_max: Duration,
}

/// An endpoint: its URL, and how it is named where the URL must not appear (a URL may carry
/// a token in its path): in logs, in the admin status and as its cursor's key in the database.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: String,
    /// SHA-256 of the URL, in hex: the cursor's key.
    key: String,
    /// `scheme://host` and the hash's first 8 digits.
    label: String,
}

impl Endpoint {
    /// The endpoint at `url` (already checked by the configuration).
    pub fn new(url: &str) -> Self {
        use sha2::Digest as _;
        let key = hex::encode(sha2::Sha256::digest(url.as_bytes()));
        let origin_end = url.find("://").map_or(url.len(), |i| {
            url[i + 3..].find('/').map_or(url.len(), |j| i + 3 + j)
        });
        let label = format!("{} #{}", &url[..origin_end], &key[..8]);
        Self {
            url: url.to_owned(),
            key,
            label,
        }
    }

    /// Its URL (never logged: it may carry a token).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How logs and the admin status name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The SHA-256 of its URL, in hex: its cursor's key in the database.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Reads the event webhooks' settings.
pub fn webhooks(
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<WebhookConfig>, ConfigError> {
    let Some(urls) = var("WEBHOOK_URLS") else {
        if var("WEBHOOK_SECRET").is_some() {
            return Err(problem(
                "WEBHOOK_URLS",
                "is required with WEBHOOK_SECRET: the endpoints events are delivered to",
            ));
        }
        return Ok(None);
    };
    let mut endpoints = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        // The value is never echoed: a pasted URL may carry more than it should.
        let parsed = UpstreamUrl::parse(url).map_err(|e| {
            problem(
                "WEBHOOK_URLS",
                format!("endpoint {}: {e}", endpoints.len() + 1),
            )
        })?;
        if !endpoints.contains(&parsed.base().to_owned()) {
            endpoints.push(parsed.base().to_owned());
        }
    }
    if endpoints.is_empty() {
        return Err(problem("WEBHOOK_URLS", "lists no endpoint"));
    }
    let secrets = var("WEBHOOK_SECRET")
        .ok_or_else(|| {
            problem(
                "WEBHOOK_SECRET",
                "is required with WEBHOOK_URLS: every event is signed (whsec_ and base64, e.g. whsec_$(openssl rand -base64 32))",
            )
        })?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| WebhookSecret::parse(s).map_err(|e| problem("WEBHOOK_SECRET", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let millis = |name: &'static str, range, default| millis(var, name, range, default);
    if secrets.is_empty() {
        return Err(problem("WEBHOOK_SECRET", "lists no secret"));
    }
    Ok(Some(WebhookConfig {
        endpoints: endpoints.iter().map(|url| Endpoint::new(url)).collect(),
        secrets,
        sign_with_shared: match var("WEBHOOK_SIGN_WITH_SHARED_SECRET").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => {
                return Err(problem(
                    "WEBHOOK_SIGN_WITH_SHARED_SECRET",
                    "must be true or false",
                ));
            }
        },
        timeout: millis("WEBHOOK_TIMEOUT_MS", 100..=60_000, 10_000)?,
        retry_max: millis("WEBHOOK_RETRY_MAX_MS", 100..=3_600_000, 300_000)?,
    }))
}
