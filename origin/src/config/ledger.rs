//! The edge's change ledger: where key changes and watermarks are appended (`LEDGER_*`).

use std::time::Duration;

use latchkey_shared::ledger::APPEND_PATH;
use latchkey_shared::sign::SigningSecret;
use latchkey_shared::target::UpstreamUrl;

use super::{ConfigError, millis, problem};

/// Where and how origin appends to the edge's change ledger (`shared/src/ledger`): a route of
/// the Worker itself, signed like usage reports.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// `LEDGER_URL`: the Worker's append route, `https://<worker>/v1/ledger/changes` (http only
    /// to a loopback address).
    pub url: String,
    /// `LEDGER_SIGNING_SECRET`: the HMAC-SHA256 key of every append (the Worker holds the same).
    pub secret: SigningSecret,
    /// `LEDGER_WATERMARK_MS`: the longest time between two watermarks while nothing changes.
    pub watermark_every: Duration,
    /// `LEDGER_TIMEOUT_MS`: the limit on one append request.
    pub timeout: Duration,
}

impl LedgerConfig {
    pub(super) fn from_lookup(
        var: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let url = var("LEDGER_URL");
        let secret = var("LEDGER_SIGNING_SECRET");
        let (url, secret) = match (url, secret) {
            (None, None) => return Ok(None),
            (Some(url), Some(secret)) => (url, secret),
            (Some(_), None) => {
                return Err(problem(
                    "LEDGER_SIGNING_SECRET",
                    "is required with LEDGER_URL: the secret the Worker checks appends with",
                ));
            }
            (None, Some(_)) => {
                return Err(problem(
                    "LEDGER_URL",
                    "is required with LEDGER_SIGNING_SECRET: the Worker's append route",
                ));
            }
        };
        // The value is never echoed: it names the Worker, and a pasted URL may carry more.
        let parsed = UpstreamUrl::parse(&url).map_err(|e| problem("LEDGER_URL", e.to_string()))?;
        if parsed.path() != APPEND_PATH {
            return Err(problem(
                "LEDGER_URL",
                format!("must be the Worker's append route, https://<worker host>{APPEND_PATH}"),
            ));
        }
        let secret = SigningSecret::parse(&secret)
            .map_err(|e| problem("LEDGER_SIGNING_SECRET", e.to_string()))?;
        let millis = |name: &'static str, range, default| millis(var, name, range, default);
        Ok(Some(Self {
            url: parsed.base().to_owned(),
            secret,
            // The edge trusts its memory only while the newest watermark is at most
            // `WATERMARK_MAX_AGE_MS` (3 s by default) old: at most 2 s between two leaves room.
            watermark_every: millis("LEDGER_WATERMARK_MS", 100..=2_000, 1_000)?,
            timeout: millis("LEDGER_TIMEOUT_MS", 100..=30_000, 2_000)?,
        }))
    }
}
