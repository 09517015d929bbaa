//! The gateway's request target (`latchkey_shared::target`): never panics on any URL, and a
//! path it accepts has one spelling only. Two oracles: decoding the path and encoding it again
//! the one canonical way (escape exactly what cannot stand unescaped, upper-case hex) gives
//! back the very same path; and the path has no dot or empty segment, no `;` or `\`, no escape
//! of `/ \ ; % ? #` or of a control character, and decodes to UTF-8.
#![no_main]

use latchkey_shared::target::{RequestTarget, check_path};
use libfuzzer_sys::fuzz_target;

/// May stand unescaped in a path (RFC 3986 `pchar` and `/`, less `;`).
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b)
}

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
    // Decode, independently of the parser.
    let mut decoded = Vec::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let value = u8::from_str_radix(&path[i + 1..i + 3], 16).expect("hex");
            assert!(
                !value.is_ascii_control() && !b"/\\;%?#".contains(&value),
                "{path:?}: an ambiguous escape"
            );
            decoded.push(value);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    assert!(std::str::from_utf8(&decoded).is_ok(), "{path:?}");
    // Encode the one canonical way: the same path, or it had two spellings.
    let mut canonical = String::new();
    for b in decoded {
        if plain(b) {
            canonical.push(char::from(b));
        } else {
            canonical.push_str(&format!("%{b:02X}"));
        }
    }
    assert_eq!(canonical, path, "two spellings of one path");
});
