//! Scopes: what a key may do.
//!
//! # Syntax
//!
//! ```text
//! scope    = segment ( ":" segment )+ [ ":*" ]      at least two segments in all
//! segment  = [a-z0-9_.-]+
//! ```
//!
//! * Scopes are case-sensitive and at most 128 bytes: `read:orders`, `write:webhooks`,
//!   `orders.refunds:read`.
//! * A trailing `*` segment is a **wildcard**: `read:*` grants every scope that starts with
//!   `read:` and has at least one more segment (`read:orders`, `read:orders:items`). Wildcards are
//!   rejected unless the operator enables them ([`ScopePolicy::wildcards`]).
//! * `*`, `*:*`, `*:orders` and any other scope whose first segment is `*` would grant everything
//!   (or everything in a family across all resources): they are always rejected, wildcards or not.
//!   `*` anywhere but the last segment is rejected too.
//! * A scope a request *requires* is always concrete: no wildcard.
//!
//! An operator may also fix a **catalogue** of allowed scopes ([`ScopePolicy::catalogue`]). A
//! granted scope must then appear in it verbatim (a wildcard grant must be listed as a wildcard).
//!
//! A key's scopes keep the order they were granted in (the order a caller sees them answered),
//! and a scope may be granted only once; whether a key holds a scope does not depend on order:
//!
//! ```
//! use latchkey_shared::{Scope, ScopeError, ScopePolicy};
//!
//! let granted = ScopePolicy::default().parse_grants(&["write:webhooks", "read:orders"]).unwrap();
//! assert_eq!(granted.to_strings(), ["write:webhooks", "read:orders"]);
//! assert!(granted.allows(&Scope::parse("read:orders").unwrap()));
//! assert_eq!(
//!     ScopePolicy::default().parse_grants(&["read:orders", "read:orders"]),
//!     Err(ScopeError::Duplicate("read:orders".into())),
//! );
//! ```

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest accepted scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;

const WILDCARD: &str = "*";

/// Why a scope string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Empty, too long, or fewer than two segments.
    #[error(
        "scope {0:?} must be two or more `:`-separated segments of [a-z0-9_.-], at most {MAX_SCOPE_LEN} bytes"
    )]
    Syntax(String),
    /// A segment contains a character outside `[a-z0-9_.-]` (uppercase and look-alikes included).
    #[error("scope {0:?} contains a character outside [a-z0-9_.-]")]
    Character(String),
    /// `*` as a whole scope, a first segment, or a non-final segment.
    #[error(
        "scope {0:?} would grant everything: `*` may only be the last segment after a concrete one"
    )]
    AllPowerful(String),
    /// A trailing wildcard while wildcards are disabled (or in a required scope).
    #[error("scope {0:?} is a wildcard and wildcards are not enabled")]
    WildcardNotAllowed(String),
    /// Granted scopes that the operator's catalogue does not list.
    #[error("unknown scopes (not in the scope catalogue): {}", .0.join(", "))]
    NotInCatalogue(Vec<String>),
    /// The same scope granted twice.
    #[error("scope {0:?} is listed more than once")]
    Duplicate(String),
}

/// One parsed scope, concrete (`read:orders`) or a trailing wildcard (`read:*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    /// Parses a scope as a grant. Wildcards are accepted here only if `allow_wildcard`.
    pub fn parse_grant(s: &str, allow_wildcard: bool) -> Result<Self, ScopeError> {
        let scope = Self::parse_syntax(s)?;
        if scope.is_wildcard() && !allow_wildcard {
            return Err(ScopeError::WildcardNotAllowed(s.to_owned()));
        }
        Ok(scope)
    }

    /// Parses a concrete scope, as a request requires it: never a wildcard.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        Self::parse_grant(s, false)
    }

    fn parse_syntax(s: &str) -> Result<Self, ScopeError> {
        if s.is_empty() || s.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::Syntax(truncate(s)));
        }
        let segments: Vec<&str> = s.split(':').collect();
        if segments[0] == WILDCARD || segments[..segments.len() - 1].contains(&WILDCARD) {
            return Err(ScopeError::AllPowerful(s.to_owned()));
        }
        if segments.len() < 2 {
            return Err(ScopeError::Syntax(s.to_owned()));
        }
        let last = segments.len() - 1;
        for (i, segment) in segments.iter().enumerate() {
            if i == last && *segment == WILDCARD {
                continue;
            }
            if segment.is_empty() {
                return Err(ScopeError::Syntax(s.to_owned()));
            }
            if !segment.bytes().all(is_segment_byte) {
                return Err(ScopeError::Character(s.to_owned()));
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// Whether this is a trailing-wildcard scope such as `read:*`.
    pub fn is_wildcard(&self) -> bool {
        self.0.ends_with(":*")
    }

    /// Whether this granted scope covers `required` (a concrete scope).
    pub fn covers(&self, required: &Scope) -> bool {
        match self.0.strip_suffix(WILDCARD) {
            // `read:*` stem is `read:`; `read:orders` must start with it and add a segment.
            Some(stem) => required.0.len() > stem.len() && required.0.starts_with(stem),
            None => self.0 == required.0,
        }
    }

    /// The scope as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
}

/// Error messages echo the input; keep an oversized one from flooding logs and responses.
fn truncate(s: &str) -> String {
    crate::echo(s, MAX_SCOPE_LEN)
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Scope {
    /// Deserialising trusts the grant syntax including wildcards: records are written by origin,
    /// which applied the operator's policy when the key was created or updated.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse_grant(&s, true).map_err(serde::de::Error::custom)
    }
}

/// The scopes granted to a key, in the order they were granted, without duplicates. Two sets
/// holding the same scopes in another order are not equal (a caller sees the order), but
/// allow the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// Whether any granted scope covers `required`.
    pub fn allows(&self, required: &Scope) -> bool {
        self.0.iter().any(|granted| granted.covers(required))
    }

    /// The required scopes that no granted scope covers, in the order given.
    pub fn missing<'a>(&self, required: &'a [Scope]) -> Vec<&'a Scope> {
        required.iter().filter(|r| !self.allows(r)).collect()
    }

    /// The scopes, in the order granted.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// Number of distinct scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no scope is granted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scopes as strings, in the order granted.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.0.clone()).collect()
    }
}

impl FromIterator<Scope> for ScopeSet {
    /// Keeps the first of any repeated scope (grants are refused with a repeat before they get
    /// here, [`ScopePolicy::parse_grants`]; this only keeps the set a set).
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut scopes: Vec<Scope> = Vec::new();
        for scope in iter {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        Self(scopes)
    }
}

impl<'de> Deserialize<'de> for ScopeSet {
    /// Records written before scopes kept their order hold them sorted; they read as they are.
    /// No key holds more than [`crate::REQUIRED_SCOPES_MAX`] scopes, so a longer list is refused
    /// (and the repeat check stays cheap).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let scopes = Vec::<Scope>::deserialize(deserializer)?;
        if scopes.len() > crate::REQUIRED_SCOPES_MAX {
            return Err(serde::de::Error::custom(format!(
                "at most {} scopes",
                crate::REQUIRED_SCOPES_MAX
            )));
        }
        Ok(scopes.into_iter().collect())
    }
}

/// The operator's rules for granting scopes.
#[derive(Debug, Clone, Default)]
pub struct ScopePolicy {
    /// Whether trailing-wildcard grants such as `read:*` are allowed.
    pub wildcards: bool,
    /// If set, the only scopes that may be granted.
    pub catalogue: Option<BTreeSet<Scope>>,
}

impl ScopePolicy {
    /// Parses and checks a list of scopes to grant. Syntax errors report the first bad scope;
    /// catalogue misses report every unknown scope at once, so one round trip fixes them all.
    pub fn parse_grants<S: AsRef<str>>(&self, scopes: &[S]) -> Result<ScopeSet, ScopeError> {
        let mut granted: Vec<Scope> = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let scope = Scope::parse_grant(scope.as_ref(), self.wildcards)?;
            if granted.contains(&scope) {
                return Err(ScopeError::Duplicate(scope.0));
            }
            granted.push(scope);
        }
        let set = ScopeSet(granted);
        if let Some(catalogue) = &self.catalogue {
            let unknown: Vec<String> = set
                .iter()
                .filter(|s| !catalogue.contains(*s))
                .map(|s| s.0.clone())
                .collect();
            if !unknown.is_empty() {
                return Err(ScopeError::NotInCatalogue(unknown));
            }
        }
        Ok(set)
    }

    /// Parses the catalogue itself: each entry must be a valid grant under this policy's
    /// wildcard setting.
    pub fn parse_catalogue<S: AsRef<str>>(
        entries: &[S],
        wildcards: bool,
    ) -> Result<BTreeSet<Scope>, ScopeError> {
        entries
            .iter()
            .map(|s| Scope::parse_grant(s.as_ref(), wildcards))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        use ScopeError::*;
        let long = format!("read:{}", "a".repeat(MAX_SCOPE_LEN));
        // (input, wildcards enabled, expected)
        type Case = (&'static str, bool, Result<(), fn(String) -> ScopeError>);
        let cases: &[Case] = &[
            ("read:orders", false, Ok(())),
            ("write:webhooks", false, Ok(())),
            ("orders.refunds:read", false, Ok(())),
            ("a:b:c:d", false, Ok(())),
            ("v1-beta_x:y.z", false, Ok(())),
            ("read:*", true, Ok(())),
            ("read:orders:*", true, Ok(())),
            ("read:*", false, Err(WildcardNotAllowed)),
            ("*", true, Err(AllPowerful)),
            ("*:*", true, Err(AllPowerful)),
            ("*:orders", true, Err(AllPowerful)),
            ("read:*:items", true, Err(AllPowerful)),
            ("read", false, Err(Syntax)),
            ("", false, Err(Syntax)),
            ("read:", false, Err(Syntax)),
            (":orders", false, Err(Syntax)),
            ("read::orders", false, Err(Syntax)),
            ("Read:orders", false, Err(Character)),
            ("read:ordérs", false, Err(Character)),
            ("read:оrders", false, Err(Character)), // Cyrillic 'о'
            ("read orders:x", false, Err(Character)),
            ("read:or*ders", true, Err(Character)),
            ("read:orders\0", false, Err(Character)),
        ];
        for (input, wildcards, expected) in cases {
            let got = Scope::parse_grant(input, *wildcards);
            match expected {
                Ok(()) => assert_eq!(got.map(|s| s.0), Ok((*input).to_owned()), "{input}"),
                Err(make) => assert_eq!(got, Err(make((*input).to_owned())), "{input}"),
            }
        }
        assert!(matches!(Scope::parse(&long), Err(Syntax(_))));
    }

    fn set(scopes: &[&str]) -> ScopeSet {
        scopes
            .iter()
            .map(|s| Scope::parse_grant(s, true).expect("valid"))
            .collect()
    }

    #[test]
    fn allows_table() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["read:orders"], "read:orders", true),
            (&["read:orders"], "read:customers", false),
            (&["read:orders"], "read:orders:items", false),
            (&["read:*"], "read:orders", true),
            (&["read:*"], "read:orders:items", true),
            (&["read:*"], "write:orders", false),
            (&["read:*"], "readx:orders", false),
            (&["read:orders:*"], "read:orders", false),
            (&["read:orders:*"], "read:orders:items", true),
            (&["read:orders:*"], "read:ordersx:items", false),
            (&[], "read:orders", false),
            (
                &["write:webhooks", "read:customers"],
                "read:customers",
                true,
            ),
        ];
        for (granted, required, expected) in cases {
            let required = Scope::parse(required).expect("concrete");
            assert_eq!(
                set(granted).allows(&required),
                *expected,
                "{granted:?} allows {required}"
            );
        }
    }

    #[test]
    fn missing_lists_uncovered_scopes_in_order() {
        let granted = set(&["read:orders", "read:customers"]);
        let required: Vec<Scope> = ["write:webhooks", "read:orders", "admin:all"]
            .iter()
            .map(|s| Scope::parse(s).expect("valid"))
            .collect();
        let missing: Vec<&str> = granted
            .missing(&required)
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(missing, ["write:webhooks", "admin:all"]);
    }

    #[test]
    fn policy_catalogue_names_every_unknown_scope() {
        let catalogue =
            ScopePolicy::parse_catalogue(&["read:orders", "read:customers"], false).expect("valid");
        let policy = ScopePolicy {
            wildcards: false,
            catalogue: Some(catalogue),
        };
        assert!(policy.parse_grants(&["read:orders"]).is_ok());
        assert_eq!(
            policy.parse_grants(&["read:orders", "write:webhooks", "admin:all"]),
            Err(ScopeError::NotInCatalogue(vec![
                "write:webhooks".into(),
                "admin:all".into()
            ]))
        );
        assert_eq!(
            policy.parse_grants(&["read:*"]),
            Err(ScopeError::WildcardNotAllowed("read:*".into()))
        );
    }

    #[test]
    fn grants_keep_their_order_and_refuse_repeats() {
        let given = ["read:orders", "read:customers", "write:webhooks"];
        let s = ScopePolicy::default().parse_grants(&given).expect("valid");
        assert_eq!(s.to_strings(), given);
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            r#"["read:orders","read:customers","write:webhooks"]"#
        );
        let reordered = ScopePolicy::default()
            .parse_grants(&["write:webhooks", "read:orders", "read:customers"])
            .expect("valid");
        assert_ne!(s, reordered, "the order is part of what a caller sees");
        for required in given {
            let required = Scope::parse(required).expect("valid");
            assert_eq!(s.allows(&required), reordered.allows(&required));
        }
        assert_eq!(
            ScopePolicy::default().parse_grants(&[
                "write:webhooks",
                "read:orders",
                "write:webhooks"
            ]),
            Err(ScopeError::Duplicate("write:webhooks".into()))
        );
    }

    #[test]
    fn stored_scopes_read_in_their_stored_order_once_each() {
        let sorted: ScopeSet =
            serde_json::from_str(r#"["read:orders","write:webhooks"]"#).expect("old record");
        assert_eq!(sorted.to_strings(), ["read:orders", "write:webhooks"]);
        let repeated: ScopeSet =
            serde_json::from_str(r#"["write:a","read:b","write:a"]"#).expect("parses");
        assert_eq!(repeated.to_strings(), ["write:a", "read:b"]);
        let too_many: Vec<String> = (0..=crate::REQUIRED_SCOPES_MAX)
            .map(|i| format!("read:s{i}"))
            .collect();
        let too_many = serde_json::to_string(&too_many).expect("json");
        assert!(serde_json::from_str::<ScopeSet>(&too_many).is_err());
    }

    #[test]
    fn deserialising_rejects_all_powerful_scopes() {
        assert!(serde_json::from_str::<ScopeSet>(r#"["*:*"]"#).is_err());
        assert!(serde_json::from_str::<ScopeSet>(r#"["read:*"]"#).is_ok());
    }
}
