//! Origin's request parsing: the bytes as every JSON request body of both API surfaces and as a
//! query string, through the same code the handlers use. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let accepted = latchkey_origin::http::parse_request_bodies(bytes);
    assert!(accepted <= 11);
});
