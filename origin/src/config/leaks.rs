//! Leak reports: where GitHub's secret scanning keys come from (`GITHUB_SECRET_SCANNING_*`)
//! and what a report does to the key (`LEAK_ACTION`).

use std::path::PathBuf;
use std::time::Duration;

use latchkey_shared::target::UpstreamUrl;

use super::{ConfigError, problem};

/// Where the keys come from.
#[derive(Debug, Clone)]
pub struct KeySources {
    /// `GITHUB_SECRET_SCANNING_KEYS_FILE`.
    pub file: Option<PathBuf>,
    /// `GITHUB_SECRET_SCANNING_KEYS_URL`.
    pub url: Option<String>,
    /// `GITHUB_SECRET_SCANNING_KEYS_REFRESH_S`: how often the URL is fetched again when nothing
    /// asks for it sooner (an hour by default).
    pub refresh_every: Duration,
}

impl KeySources {
    /// Whether any source is configured (the endpoint is on).
    pub fn any(&self) -> bool {
        self.file.is_some() || self.url.is_some()
    }
}

/// What a leak report does to the key (`LEAK_ACTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakAction {
    /// Revoke it at once (the default).
    #[default]
    Revoke,
    /// Only mark it as leaked (`leaked_at`); it keeps working until rolled or revoked.
    Flag,
}

/// Reads where GitHub's secret scanning keys come from.
pub(super) fn github_keys(var: &dyn Fn(&str) -> Option<String>) -> Result<KeySources, ConfigError> {
    let url = var("GITHUB_SECRET_SCANNING_KEYS_URL")
        .map(|v| {
            UpstreamUrl::parse(&v)
                .map(|u| u.base().to_owned())
                .map_err(|e| {
                    problem(
                        "GITHUB_SECRET_SCANNING_KEYS_URL",
                        format!(
                            "{e} (GitHub's list is at https://api.github.com/meta/public_keys/secret_scanning)"
                        ),
                    )
                })
        })
        .transpose()?;
    let refresh_every = match var("GITHUB_SECRET_SCANNING_KEYS_REFRESH_S") {
        None => Duration::from_secs(3600),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(s @ 1..=86_400) => Duration::from_secs(s),
            _ => {
                return Err(problem(
                    "GITHUB_SECRET_SCANNING_KEYS_REFRESH_S",
                    format!("{v:?} is not a number of seconds from 1 to 86400"),
                ));
            }
        },
    };
    Ok(KeySources {
        file: var("GITHUB_SECRET_SCANNING_KEYS_FILE").map(|v| std::path::PathBuf::from(v.trim())),
        url,
        refresh_every,
    })
}
