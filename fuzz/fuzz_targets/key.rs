//! Key, key id and prefix parsing: never panics; a parsed key prints back to itself and has a
//! stable hash; `parse_presented` agrees with `ApiKey::parse`.
#![no_main]

use latchkey_shared::{ApiKey, KeyId, KeyPrefix, parse_presented};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = KeyId::parse(text);
    let _ = KeyPrefix::parse(text);
    match ApiKey::parse(text) {
        Ok(key) => {
            assert_eq!(key.expose(), text);
            let again = ApiKey::parse(key.expose()).expect("a parsed key reparses");
            assert_eq!(again.hash(), key.hash());
            assert!(text.starts_with(key.prefix()));
            assert!(parse_presented(text).is_ok() || text.len() > latchkey_shared::PRESENTED_MAX);
        }
        Err(_) => assert!(parse_presented(text).is_err()),
    }
});
