//! Gateway route rules: which requests the edge forwards, and the scopes each one needs.
//!
//! # Syntax
//!
//! One rule per line (or separated by `;`); blank lines and lines starting with `#` are ignored:
//!
//! ```text
//! # method  path pattern       required scopes (zero or more, space-separated)
//! GET       /orders/**         read:orders
//! POST      /orders            write:orders
//! *         /status            
//! ```
//!
//! * The method is `*` (any method) or one of `GET HEAD POST PUT PATCH DELETE OPTIONS`,
//!   in upper case.
//! * The pattern starts with `/`. Its segments are matched one for one against the request
//!   path: a literal segment matches itself exactly (case-sensitive, no decoding), `*` matches
//!   any one non-empty segment, and `**`, allowed only as the last segment, matches whatever
//!   remains, including nothing (`/orders/**` matches `/orders`, `/orders/1` and `/orders/1/items`).
//! * Scopes follow the grammar in [`crate::scope`]; a rule with none admits any valid key.
//!
//! The first rule that matches decides. A request that matches no rule is refused: the gateway
//! fails closed.

use crate::scope::{Scope, ScopeError};
use crate::target::METHODS;

/// Why a rule table did not parse. `line` counts from 1 over the rules as written (each
/// `;`-separated rule counts as its own line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route rule {line} ({rule:?}): {kind}")]
pub struct RouteError {
    /// Which rule, counting from 1.
    pub line: usize,
    /// The rule as written.
    pub rule: String,
    /// What is wrong with it.
    pub kind: RouteErrorKind,
}

/// What is wrong with one rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteErrorKind {
    /// The rule has a method but no path pattern.
    #[error("expected `METHOD /path [scope ...]`")]
    MissingPattern,
    /// The method is not `*` or a known upper-case method.
    #[error("unknown method {0:?} (use * or one of GET HEAD POST PUT PATCH DELETE OPTIONS)")]
    UnknownMethod(String),
    /// The pattern does not start with `/`.
    #[error("the path pattern must start with /")]
    PatternNotAbsolute,
    /// `**` appears before the last segment.
    #[error("** may only be the last segment of a pattern")]
    DoubleStarNotLast,
    /// A segment mixes `*` with other characters, or is empty (`//`).
    #[error("segment {0:?} must be a literal, * or **")]
    BadSegment(String),
    /// A required scope does not parse.
    #[error("{0}")]
    Scope(#[from] ScopeError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    AnyOne,
    Rest,
}

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    method: Option<String>,
    pattern: Vec<Segment>,
    required: Vec<Scope>,
    source: String,
}

impl RouteRule {
    /// The scopes a request matching this rule needs.
    pub fn required_scopes(&self) -> &[Scope] {
        &self.required
    }

    /// The rule as written, for logs and errors.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.pattern {
            match segment {
                Segment::Rest => return true,
                Segment::AnyOne => match parts.next() {
                    Some(part) if !part.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(literal) => match parts.next() {
                    Some(part) if part == literal => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// An ordered table of rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    rules: Vec<RouteRule>,
}

impl RouteTable {
    /// Parses rules in the syntax documented in this module. An empty table is valid: it
    /// refuses every request.
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        let rules = text
            .split(['\n', ';'])
            .map(str::trim)
            .enumerate()
            .filter(|(_, rule)| !rule.is_empty() && !rule.starts_with('#'))
            .map(|(i, rule)| {
                parse_rule(rule).map_err(|kind| RouteError {
                    line: i + 1,
                    rule: rule.to_owned(),
                    kind,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// The first rule matching `method` and `path` (the URL path, without the query).
    pub fn find(&self, method: &str, path: &str) -> Option<&RouteRule> {
        self.rules.iter().find(|rule| rule.matches(method, path))
    }

    /// How many rules the table has.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the table has no rules (and so refuses everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn parse_rule(rule: &str) -> Result<RouteRule, RouteErrorKind> {
    let mut words = rule.split_whitespace();
    let method = match words.next() {
        Some("*") => None,
        Some(m) if METHODS.contains(&m) => Some(m.to_owned()),
        Some(m) => return Err(RouteErrorKind::UnknownMethod(m.to_owned())),
        None => return Err(RouteErrorKind::MissingPattern),
    };
    let pattern = words.next().ok_or(RouteErrorKind::MissingPattern)?;
    let pattern = parse_pattern(pattern)?;
    let required = words.map(Scope::parse).collect::<Result<_, _>>()?;
    Ok(RouteRule {
        method,
        pattern,
        required,
        source: rule.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

fn parse_pattern(pattern: &str) -> Result<Vec<Segment>, RouteErrorKind> {
    let rest = pattern
        .strip_prefix('/')
        .ok_or(RouteErrorKind::PatternNotAbsolute)?;
    if rest.is_empty() {
        // `/` alone: the root path.
        return Ok(vec![Segment::Literal(String::new())]);
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| match *part {
            "**" if i == last => Ok(Segment::Rest),
            "**" => Err(RouteErrorKind::DoubleStarNotLast),
            "*" => Ok(Segment::AnyOne),
            p if p.is_empty() || p.contains('*') => Err(RouteErrorKind::BadSegment(p.to_owned())),
            p => Ok(Segment::Literal(p.to_owned())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "
        # orders
        GET    /orders/**      read:orders
        POST   /orders         write:orders
        DELETE /orders/*       write:orders admin:orders
        *      /status
        GET    /               ;  PUT /a/*/c  write:a
    ";

    #[test]
    fn first_matching_rule_decides() {
        let table = RouteTable::parse(TABLE).expect("valid table");
        assert_eq!(table.len(), 6);
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("GET", "/orders", Some("GET /orders/** read:orders")),
            ("GET", "/orders/1", Some("GET /orders/** read:orders")),
            ("GET", "/orders/1/items", Some("GET /orders/** read:orders")),
            ("POST", "/orders", Some("POST /orders write:orders")),
            ("POST", "/orders/1", None),
            (
                "DELETE",
                "/orders/1",
                Some("DELETE /orders/* write:orders admin:orders"),
            ),
            ("DELETE", "/orders", None),
            ("DELETE", "/orders/", None),
            ("DELETE", "/orders/1/x", None),
            ("PATCH", "/status", Some("* /status")),
            ("GET", "/status/x", None),
            ("GET", "/", Some("GET /")),
            ("GET", "/Orders", None),
            ("get", "/orders", None),
            ("PUT", "/a/b/c", Some("PUT /a/*/c write:a")),
            ("PUT", "/a//c", None),
            ("GET", "orders", None),
            ("GET", "/unknown", None),
        ];
        for (method, path, want) in cases {
            let got = table.find(method, path).map(RouteRule::source);
            assert_eq!(got, *want, "{method} {path}");
        }
        let rule = table.find("DELETE", "/orders/9").expect("matches");
        let scopes: Vec<&str> = rule.required_scopes().iter().map(Scope::as_str).collect();
        assert_eq!(scopes, ["write:orders", "admin:orders"]);
    }

    #[test]
    fn bad_rules_name_the_rule_and_the_problem() {
        let cases: &[(&str, usize, RouteErrorKind)] = &[
            ("GET", 1, RouteErrorKind::MissingPattern),
            ("FETCH /x", 1, RouteErrorKind::UnknownMethod("FETCH".into())),
            ("get /x", 1, RouteErrorKind::UnknownMethod("get".into())),
            ("GET x", 1, RouteErrorKind::PatternNotAbsolute),
            ("GET /a/**/b", 1, RouteErrorKind::DoubleStarNotLast),
            ("GET /a*", 1, RouteErrorKind::BadSegment("a*".into())),
            ("GET /a//b", 1, RouteErrorKind::BadSegment(String::new())),
            (
                "GET /a\n\nPOST /b read:*",
                3,
                RouteErrorKind::Scope(Scope::parse("read:*").unwrap_err()),
            ),
        ];
        for (text, line, kind) in cases {
            let err = RouteTable::parse(text).expect_err(text);
            assert_eq!((err.line, &err.kind), (*line, kind), "{text}");
            assert!(
                err.to_string().starts_with(&format!("route rule {line} ")),
                "{err}"
            );
        }
    }

    #[test]
    fn an_empty_table_refuses_everything() {
        let table = RouteTable::parse(" \n# nothing\n").expect("valid");
        assert!(table.is_empty());
        assert!(table.find("GET", "/").is_none());
    }
}
