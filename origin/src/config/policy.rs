//! The key lifecycle policies (`STALE_KEY_AFTER`, `STALE_WARNING_BEFORE`,
//! `EXPIRY_WARNING_BEFORE`, `KEY_POLICY_INTERVAL`, `STALE_KEY_USAGE_MAX_AGE`).

use std::time::Duration;

use super::{ConfigError, problem};

/// The policies' settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    /// `STALE_KEY_AFTER`: idle time after which a key is switched off (`None`: never).
    pub stale_after: Option<Duration>,
    /// `STALE_WARNING_BEFORE`: how long before that the `stale_warning` event is sent (zero:
    /// none).
    pub stale_warning: Duration,
    /// `EXPIRY_WARNING_BEFORE`: how long before its expiry a key's `expiry_warning` event is
    /// sent (`None`: never).
    pub expiry_warning: Option<Duration>,
    /// `KEY_POLICY_INTERVAL`: how often the policies run.
    pub interval: Duration,
    /// `STALE_KEY_USAGE_MAX_AGE`: the stale-key policy is held while no usage batch has been
    /// accepted for this long.
    pub usage_max_age: Duration,
}

impl KeyPolicy {
    /// Whether any policy is on.
    pub fn any(&self) -> bool {
        self.stale_after.is_some() || self.expiry_warning.is_some()
    }
}

/// Reads the key lifecycle policies' settings: durations such as `60d`, `12h` or `500ms`.
pub(super) fn key_policy(var: &dyn Fn(&str) -> Option<String>) -> Result<KeyPolicy, ConfigError> {
    const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let duration = |name: &'static str, min: Duration| -> Result<Option<Duration>, ConfigError> {
        var(name)
            .map(|v| match humantime::parse_duration(v.trim()) {
                Ok(d) if (min..=TEN_YEARS).contains(&d) => Ok(d),
                _ => Err(problem(
                    name,
                    format!(
                        "{v:?} is not a duration from {} to 10 years (such as 60d, 12h, 30m)",
                        humantime::format_duration(min)
                    ),
                )),
            })
            .transpose()
    };
    let stale_after = duration("STALE_KEY_AFTER", Duration::from_secs(1))?;
    // Default: a week, or half the idle time if that is shorter.
    let week = Duration::from_secs(7 * 24 * 3600);
    let stale_warning = duration("STALE_WARNING_BEFORE", Duration::ZERO)?
        .unwrap_or_else(|| stale_after.map_or(week, |after| week.min(after / 2)));
    if let Some(after) = stale_after
        && stale_warning >= after
    {
        return Err(problem(
            "STALE_WARNING_BEFORE",
            "must be shorter than STALE_KEY_AFTER (0s: no warning)",
        ));
    }
    Ok(KeyPolicy {
        stale_after,
        stale_warning,
        expiry_warning: duration("EXPIRY_WARNING_BEFORE", Duration::from_secs(1))?,
        interval: duration("KEY_POLICY_INTERVAL", Duration::from_millis(100))?
            .unwrap_or(Duration::from_secs(600)),
        usage_max_age: duration("STALE_KEY_USAGE_MAX_AGE", Duration::from_secs(1))?
            .unwrap_or(Duration::from_secs(3600)),
    })
}
