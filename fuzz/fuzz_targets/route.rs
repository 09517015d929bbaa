//! The edge's route rules (`ROUTES`): never panics; the last line is a request `METHOD /path`
//! looked up in the rules parsed from the lines before it; a match requires concrete scopes.
#![no_main]

use latchkey_shared::RouteTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (rules, request) = text.rsplit_once('\n').unwrap_or((text, "GET /"));
    let Ok(table) = RouteTable::parse(rules) else {
        return;
    };
    let (method, path) = request.split_once(' ').unwrap_or(("GET", request));
    if let Some(rule) = table.find(method, path) {
        // What a rule requires is always concrete, and prints back to itself.
        for scope in rule.required_scopes() {
            assert!(!scope.is_wildcard());
            assert_eq!(
                latchkey_shared::Scope::parse(scope.as_str()).as_ref(),
                Ok(scope)
            );
        }
    }
});
