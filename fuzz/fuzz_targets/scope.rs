//! Scope grammar and matching. Lines starting with `+` are granted, the others required. Never
//! panics; parse → print → parse is identity; a set without wildcards allows exactly what it
//! contains; the result does not depend on the wildcard policy unless a wildcard was granted.
#![no_main]

use latchkey_shared::{Scope, ScopePolicy, parse_required};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (granted, required): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.starts_with('+'));
    let granted: Vec<&str> = granted.iter().map(|g| &g[1..]).collect();
    for g in &granted {
        if let Ok(scope) = Scope::parse_grant(g, true) {
            assert_eq!(scope.to_string(), *g);
            assert_eq!(
                Scope::parse_grant(&scope.to_string(), true).expect("reparses"),
                scope
            );
        }
    }
    let strict = ScopePolicy {
        wildcards: false,
        catalogue: None,
    };
    let open = ScopePolicy {
        wildcards: true,
        catalogue: None,
    };
    let (Ok(required), Ok(set)) = (parse_required(&required), open.parse_grants(&granted)) else {
        return;
    };
    for r in &required {
        let allowed = set.allows(r);
        if !set.iter().any(Scope::is_wildcard) {
            assert_eq!(
                allowed,
                set.iter().any(|g| g == r),
                "{r} against {granted:?}"
            );
        }
        if let Ok(strict_set) = strict.parse_grants(&granted) {
            assert_eq!(strict_set.allows(r), allowed);
        }
        if allowed {
            assert!(set.iter().any(|g| g.covers(r)));
        }
    }
});
