//! The gateway's request target (`latchkey_shared::target`): never panics on any URL, and a
//! path it accepts has one reading only: no dot or empty segment, no `;` or `\`, no escape of
//! a character that may stand unescaped or of `/ \ ; % ? #` or a control character, upper-case
//! hex, and it decodes to UTF-8.
#![no_main]

use latchkey_shared::target::{RequestTarget, check_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|url: &str| {
    let Ok(target) = RequestTarget::from_url(url) else {
        return;
    };
    let path = target.path;
    assert_eq!(check_path(path), Ok(()));
    assert!(path.starts_with('/'));
    assert!(!path.contains([';', '\\', '?', '#']), "{path:?}");
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        assert!(*segment != "." && *segment != "..", "{path:?}");
        assert!(!segment.is_empty() || i + 1 == segments.len(), "{path:?}");
    }
    let mut decoded = Vec::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = &path[i + 1..i + 3];
            assert!(hex.bytes().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h)));
            let value = u8::from_str_radix(hex, 16).expect("hex");
            let plain = value.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&value);
            let ambiguous = value.is_ascii_control() || b"/\\;%?#".contains(&value);
            assert!(!plain && !ambiguous, "{path:?}: %{hex}");
            decoded.push(value);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    assert!(std::str::from_utf8(&decoded).is_ok(), "{path:?}");
});
