//! Properties of scopes, records, keys and the verify decision, checked over generated inputs
//! (proptest, 1,000 cases per property).

#![allow(clippy::expect_used, reason = "tests")]

use latchkey_shared::{
    ApiKey, DecisionContext, KeyId, KeyPrefix, KeyRecord, RECORD_VERSION, Scope, ScopePolicy,
    ScopeSet, UnixMillis, Verdict, decide,
};
use proptest::prelude::*;

const WITH_WILDCARDS: ScopePolicy = ScopePolicy {
    wildcards: true,
    catalogue: None,
};

fn segment() -> impl Strategy<Value = String> {
    // A small alphabet so that generated scopes often share prefixes and collide.
    "[a-c0-1_.-]{1,3}"
}

fn concrete() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 2..4).prop_map(|s| s.join(":"))
}

fn wildcard() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 1..3).prop_map(|s| format!("{}:*", s.join(":")))
}

fn grant() -> impl Strategy<Value = String> {
    prop_oneof![3 => concrete(), 1 => wildcard()]
}

/// The granted set of generated scopes, repeats dropped first (a grant refuses them).
fn set(scopes: &[String]) -> ScopeSet {
    let mut once: Vec<&String> = Vec::new();
    for s in scopes {
        if !once.contains(&s) {
            once.push(s);
        }
    }
    WITH_WILDCARDS
        .parse_grants(&once)
        .expect("generated scopes are valid")
}

fn scope(s: &str) -> Scope {
    Scope::parse(s).expect("generated scope is valid")
}

/// A required scope near the granted ones: one of them, a prefix or an extension of one, or
/// a fresh one.
fn required_near(granted: Vec<String>) -> impl Strategy<Value = (Vec<String>, String)> {
    let pick = granted.clone();
    (0..granted.len().max(1), 0..4u8, concrete()).prop_map(move |(i, how, fresh)| {
        let base = pick.get(i).cloned().unwrap_or_else(|| fresh.clone());
        let base = base
            .strip_suffix(":*")
            .map_or(base.clone(), |stem| format!("{stem}:x"));
        let required = match how {
            0 => base,
            1 => format!("{base}:more"),
            2 => base.rsplit_once(':').map_or(fresh.clone(), |(head, _)| {
                if head.contains(':') {
                    head.to_owned()
                } else {
                    fresh.clone()
                }
            }),
            _ => fresh,
        };
        (pick.clone(), required)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn without_a_wildcard_a_set_allows_exactly_what_it_contains(
        (granted, required) in prop::collection::vec(concrete(), 0..20).prop_flat_map(required_near)
    ) {
        let set = set(&granted);
        let required = scope(&required);
        prop_assert_eq!(set.allows(&required), granted.iter().any(|g| *g == required.as_str()));
    }

    #[test]
    fn narrowing_never_widens(
        (granted, keep, required) in prop::collection::vec(grant(), 0..20)
            .prop_flat_map(|g| {
                let n = g.len();
                (Just(g.clone()), prop::collection::vec(any::<bool>(), n), required_near(g).prop_map(|(_, r)| r))
            })
    ) {
        let wide = set(&granted);
        let narrow_scopes: Vec<String> = granted.iter().zip(&keep).filter(|(_, k)| **k).map(|(g, _)| g.clone()).collect();
        let narrow = set(&narrow_scopes);
        let required = scope(&required);
        if narrow.allows(&required) {
            prop_assert!(wide.allows(&required), "narrowed {narrow_scopes:?} allows {required} but {granted:?} does not");
        }
    }

    #[test]
    fn a_wildcard_allows_only_what_starts_with_its_stem(stem in concrete(), required in concrete()) {
        let set = set(&[format!("{stem}:*")]);
        let required = scope(&required);
        let expected = required.as_str().starts_with(&format!("{stem}:"));
        prop_assert_eq!(set.allows(&required), expected);
    }

    #[test]
    fn scope_parse_print_parse_is_identity(text in "[a-z0-9_.:*-]{0,20}") {
        if let Ok(parsed) = Scope::parse_grant(&text, true) {
            let printed = parsed.to_string();
            prop_assert_eq!(&printed, &text);
            prop_assert_eq!(Scope::parse_grant(&printed, true).expect("reparses"), parsed);
        }
    }

    #[test]
    fn scope_sets_round_trip_through_json(granted in prop::collection::vec(grant(), 0..20)) {
        let set = set(&granted);
        let json = serde_json::to_string(&set).expect("serialises");
        prop_assert_eq!(serde_json::from_str::<ScopeSet>(&json).expect("parses"), set);
    }

    #[test]
    fn keys_round_trip_and_any_one_character_change_is_caught(
        seed in any::<[u8; 32]>(), at in 8usize..46, replacement in "[0-9A-Za-z]"
    ) {
        let mut bytes = seed.iter().copied().cycle();
        let key = ApiKey::generate(&KeyPrefix::default(), &mut |buf: &mut [u8]| {
            for b in buf.iter_mut() { *b = bytes.next().unwrap_or(0) % 248; }
        });
        let text = key.expose().to_owned();
        prop_assert_eq!(ApiKey::parse(&text).expect("parses").hash(), key.hash());
        let mut changed = text.clone().into_bytes();
        let at = at.min(changed.len() - 1);
        let new = replacement.as_bytes()[0];
        prop_assume!(changed[at] != new);
        changed[at] = new;
        let changed = String::from_utf8(changed).expect("ascii");
        prop_assert!(ApiKey::parse(&changed).is_err(), "{changed} passed the checksum");
    }

    #[test]
    fn a_revoked_expired_or_disabled_record_is_never_valid(
        granted in prop::collection::vec(grant(), 0..10),
        required in prop::collection::vec(concrete(), 0..5),
        revoked in any::<bool>(),
        disabled in any::<bool>(),
        now in 0i64..i64::MAX / 2,
        expires_offset in prop::option::of(-1_000_000i64..1_000_000),
        revision in any::<u64>(),
    ) {
        let expires_at = expires_offset.map(|o| UnixMillis(now + o));
        let mut record = KeyRecord {
            v: RECORD_VERSION,
            id: KeyId::parse("key_0123456789abcdefABCD").expect("valid"),
            subject: "acme".into(),
            scopes: set(&granted),
            revoked,
            revoked_at: revoked.then_some(UnixMillis(now)),
            expires_at,
            revision,
            disabled,
            allowed_ips: Default::default(),
        };
        record.v = record.version_needed();
        let required: Vec<Scope> = required.iter().map(|r| scope(r)).collect();
        let context = DecisionContext::at(UnixMillis(now)).requiring(&required);
        let verdict = decide(Some(&record), &context);
        let expired = expires_at.is_some_and(|e| e.0 <= now);
        if revoked {
            prop_assert_eq!(verdict, Verdict::Revoked);
        } else if expired {
            prop_assert_eq!(verdict, Verdict::Expired);
        } else if disabled {
            prop_assert_eq!(verdict, Verdict::Disabled);
        } else {
            prop_assert_eq!(verdict.is_valid(), required.iter().all(|r| record.scopes.allows(r)));
        }
        // The record the edge reads decides the same after a trip through KV's JSON.
        let reread = KeyRecord::from_json(record.to_json().as_bytes()).expect("round trip");
        prop_assert_eq!(decide(Some(&reread), &context), decide(Some(&record), &context));
    }
}
