//! The gateway's request target: one canonical path that is matched against the route rules,
//! signed, and forwarded, and the method checked against a closed table.
//!
//! A path reaches the edge as the client wrote it, and an upstream may read it differently
//! from the edge: many frameworks decode `%2F` to `/` or `..` segments before routing, and
//! runtimes normalise URLs in ways that differ between them. So the gateway never interprets
//! a path: it accepts only paths that **every reader reads the same way**, and refuses the rest
//! with `400` before any key lookup. A canonical path:
//!
//! * starts with `/` and holds only RFC 3986 path characters: letters, digits,
//!   `-._~!$&'()*+,=:@/` and `%XX` escapes;
//! * has no `;` (path parameters, which Java servers strip: `/orders/x/..;/admin`), no `\`,
//!   no dot segment (`.` or `..`) and no empty segment (`//`); only the last segment may be
//!   empty (a trailing `/`);
//! * escapes only what must be escaped, in upper-case hex: an escape of a character that may
//!   stand unescaped (a letter, a digit, `-._~!$&'()*+,=:@`) is not canonical (`%41` for `A`,
//!   `%2e` for `.`, `%3A` for `:`), lower-case hex is not canonical,
//!   and escapes of `/`, `\`, `;`, `%` (a double encoding such as `%252F`), `?`, `#` and of
//!   control characters (`%00`) are refused outright;
//! * decodes to valid UTF-8 (so an overlong `%C0%AF` is refused).
//!
//! ```
//! use latchkey_shared::target::{PathError, RequestTarget};
//!
//! let target = RequestTarget::from_url("https://api.example.com/orders/42?page=2#top").unwrap();
//! assert_eq!((target.path, target.query), ("/orders/42", "page=2"));
//! assert_eq!(RequestTarget::from_url("http://h/caf%C3%A9").unwrap().path, "/caf%C3%A9");
//!
//! for (url, error) in [
//!     ("http://h/orders/..%2Fadmin", PathError::ForbiddenEscape("%2F".into())),
//!     ("http://h/orders/%2e%2e/admin", PathError::NonCanonicalEscape("%2e".into())),
//!     ("http://h/orders/x/..;/admin", PathError::PathParameter),
//!     ("http://h/orders/../admin", PathError::DotSegment),
//!     ("http://h/orders/..%252Fadmin", PathError::ForbiddenEscape("%25".into())),
//! ] {
//!     assert_eq!(RequestTarget::from_url(url), Err(error), "{url}");
//! }
//! ```

/// The methods the gateway knows. Any other method is refused (`405`) before routing: a
/// runtime may map an unknown one to something else (workers-rs maps `PROPFIND` to `GET`).
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Whether `method` is one of [`METHODS`], exactly (methods are case-sensitive).
pub fn is_known_method(method: &str) -> bool {
    METHODS.contains(&method)
}

/// A request's canonical path and its raw query, borrowed from the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTarget<'a> {
    /// The canonical path (see the module docs), exactly as received.
    pub path: &'a str,
    /// The query without its `?`, exactly as received; empty when there is none. It is
    /// forwarded and signed byte for byte, never re-encoded.
    pub query: &'a str,
}

/// Why a path is not canonical. Each is answered `400` before any key is looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The URL has no path starting with `/`.
    #[error("the request path must start with /")]
    NotAbsolute,
    /// A byte that is not a path character (a space, `"`, `<`, a control character, a raw
    /// non-ASCII byte, …).
    #[error("the request path contains a character that must be percent-encoded (byte 0x{0:02X})")]
    Character(u8),
    /// A `\`, which some servers read as `/`.
    #[error("the request path contains a backslash")]
    Backslash,
    /// A `;`, which some servers strip with what follows it up to the next `/`.
    #[error("the request path contains ; (path parameters are not accepted)")]
    PathParameter,
    /// A `.` or `..` segment.
    #[error("the request path contains a . or .. segment")]
    DotSegment,
    /// An empty segment (`//`) other than a trailing `/`.
    #[error("the request path contains an empty segment (//)")]
    EmptySegment,
    /// A `%` not followed by two hex digits.
    #[error("the request path contains a broken percent escape")]
    BrokenEscape,
    /// An escape that is not how the character is normally written (lower-case hex, or an
    /// escape of a character that may stand unescaped: a letter, a digit, `-._~!$&'()*+,=:@`).
    #[error("the request path contains a non-canonical escape {0}")]
    NonCanonicalEscape(String),
    /// An escape of `/`, `\`, `;`, `%`, `?`, `#` or a control character.
    #[error("the request path contains the escape {0}, which is ambiguous")]
    ForbiddenEscape(String),
    /// The escapes do not decode to UTF-8.
    #[error("the request path does not decode to UTF-8")]
    NotUtf8,
}

impl<'a> RequestTarget<'a> {
    /// The target of an absolute URL (`scheme://authority/path?query#fragment`), as the
    /// runtime hands it to the Worker. The fragment is dropped; the path must be canonical.
    pub fn from_url(url: &'a str) -> Result<Self, PathError> {
        // A scheme is only ever at the start, and holds no `:`, so it ends at the first `:` (a
        // character search: the edge runs this on every request): `/a?x=h://b` is a path and a
        // query.
        let after_scheme = match url.split_once(':') {
            Some((scheme, rest))
                if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) =>
            {
                rest.strip_prefix("//").unwrap_or(url)
            }
            _ => url,
        };
        // The authority ends at the first `/`, `?` or `#`; the path must begin right there.
        let start = after_scheme
            .find(['/', '?', '#'])
            .ok_or(PathError::NotAbsolute)?;
        let target = &after_scheme[start..];
        if !target.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        let target = target.split_once('#').map_or(target, |(t, _)| t);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        check_path(path)?;
        Ok(Self { path, query })
    }
}

/// Checks that `path` is canonical (see the module docs).
pub fn check_path(path: &str) -> Result<(), PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut decoded = Vec::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let escape = path.get(i..i + 3).ok_or(PathError::BrokenEscape)?;
                let value = escape
                    .get(1..)
                    .filter(|hex| hex.bytes().all(|h| h.is_ascii_hexdigit()))
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(PathError::BrokenEscape)?;
                check_escape(escape, value)?;
                decoded.push(value);
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            b if is_path_char(b) => decoded.push(b),
            other => return Err(PathError::Character(other)),
        }
        i += 1;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::NotUtf8);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (n, segment) in segments.iter().enumerate() {
        match *segment {
            "." | ".." => return Err(PathError::DotSegment),
            "" if n != last => return Err(PathError::EmptySegment),
            _ => {}
        }
    }
    Ok(())
}

/// RFC 3986 `pchar` and `/`, less `;` and `%` (handled apart).
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b)
}

fn check_escape(escape: &str, value: u8) -> Result<(), PathError> {
    let forbidden = value.is_ascii_control() || b"/\\;%?#".contains(&value);
    if forbidden {
        return Err(PathError::ForbiddenEscape(escape.to_ascii_uppercase()));
    }
    // A character that may stand unescaped must: otherwise `/a:b` and `/a%3Ab` would be two
    // spellings of one path, and a rule naming one would not see the other.
    let lower_hex = escape.bytes().any(|h| h.is_ascii_lowercase());
    if is_path_char(value) || lower_hex {
        return Err(PathError::NonCanonicalEscape(escape.to_owned()));
    }
    Ok(())
}

/// The gateway's `UPSTREAM_URL`: where allowed requests go.
///
/// ```
/// use latchkey_shared::target::{UpstreamUrl, UpstreamUrlError};
///
/// let url = UpstreamUrl::parse("https://api.internal.example/v2/").unwrap();
/// assert_eq!((url.base(), url.path()), ("https://api.internal.example/v2", "/v2"));
/// assert!(UpstreamUrl::parse("http://127.0.0.1:8788").is_ok());
/// assert_eq!(UpstreamUrl::parse("http://api.example"), Err(UpstreamUrlError::NotTls));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    base: String,
    path_start: usize,
}

/// Why an `UPSTREAM_URL` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    /// Not `http://` or `https://`, or no host.
    #[error("must be an https:// URL (http:// only for a loopback address)")]
    Scheme,
    /// `http://` to a host other than `localhost`, `127.0.0.0/8` or `[::1]`: the signed
    /// identity headers would cross the network in the clear.
    #[error("must use https:// unless the host is loopback (localhost, 127.0.0.0/8, [::1])")]
    NotTls,
    /// It has a query, a fragment or user information, or its path is not canonical.
    #[error(
        "must be scheme://host[:port][/path] with a canonical path, no query, fragment or user"
    )]
    Shape,
}

impl UpstreamUrl {
    /// Parses the setting. A trailing `/` is dropped.
    pub fn parse(text: &str) -> Result<Self, UpstreamUrlError> {
        let text = text.trim().trim_end_matches('/');
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(UpstreamUrlError::Scheme);
        };
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.is_empty() {
            return Err(UpstreamUrlError::Scheme);
        }
        if authority.contains(['@', '?', '#']) || path.contains(['?', '#']) {
            return Err(UpstreamUrlError::Shape);
        }
        if !path.is_empty() && check_path(path).is_err() {
            return Err(UpstreamUrlError::Shape);
        }
        if !tls && !is_loopback_host(authority) {
            return Err(UpstreamUrlError::NotTls);
        }
        Ok(Self {
            base: text.to_owned(),
            path_start: text.len() - path.len(),
        })
    }

    /// The URL without a trailing `/`: a request's path is appended to it.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL's own path (empty for none): the upstream receives it before the request's path.
    pub fn path(&self) -> &str {
        &self.base[self.path_start..]
    }
}

/// Whether an authority (`host[:port]`) names a loopback host.
fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, rest)) if rest.is_empty() || rest.starts_with(':') => host,
            _ => return false,
        },
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_pass_unchanged() {
        let cases: &[(&str, &str, &str)] = &[
            ("http://h/", "/", ""),
            ("http://h/orders", "/orders", ""),
            ("http://h/orders/", "/orders/", ""),
            (
                "https://h:8443/orders/42/items?x=1&y=%2F",
                "/orders/42/items",
                "x=1&y=%2F",
            ),
            ("http://h/a%20b/c%C3%A9?", "/a%20b/c%C3%A9", ""),
            (
                "http://h/v1/x:y@z/it's+(1),$!&=*",
                "/v1/x:y@z/it's+(1),$!&=*",
                "",
            ),
            ("http://h/orders/..x/x..", "/orders/..x/x..", ""),
            ("http://h/orders#frag?no", "/orders", ""),
            ("/relative/only?q", "/relative/only", "q"),
            ("/a?x=h://b/c", "/a", "x=h://b/c"),
            // A port's, a userinfo's or an IPv6 literal's `:` comes after the scheme's.
            ("https://h:8443/p?q", "/p", "q"),
            ("http://u:pw@h/x", "/x", ""),
            ("http://[::1]:8080/p", "/p", ""),
            // The scheme ends at the first `:`: with no `//` right after it there is no
            // authority, and the target is read from the first `/`, `?` or `#` (a `/`).
            ("h:x/p:y/z", "/p:y/z", ""),
            ("mailto:/p", "/p", ""),
        ];
        for (url, path, query) in cases {
            assert_eq!(
                RequestTarget::from_url(url),
                Ok(RequestTarget { path, query }),
                "{url}"
            );
        }
    }

    #[test]
    fn every_ambiguous_path_is_refused() {
        use PathError::*;
        let forbidden = |e: &str| ForbiddenEscape(e.to_owned());
        let non_canonical = |e: &str| NonCanonicalEscape(e.to_owned());
        let cases: Vec<(&str, PathError)> = vec![
            ("/orders/..%2Fadmin", forbidden("%2F")),
            ("/orders/..%2fadmin", forbidden("%2F")),
            ("/orders/%2e%2e%2fadmin", non_canonical("%2e")),
            ("/orders/%2E%2E/admin", non_canonical("%2E")),
            ("/orders/%2e/admin", non_canonical("%2e")),
            ("/orders/..%5cadmin", forbidden("%5C")),
            ("/orders/..\\admin", Backslash),
            ("/orders/x/..;/admin", PathParameter),
            ("/orders;jsessionid=1", PathParameter),
            ("/orders/%3B/x", forbidden("%3B")),
            ("/orders/..%252Fadmin", forbidden("%25")),
            ("/orders/%00", forbidden("%00")),
            ("/orders/%0A", forbidden("%0A")),
            ("/orders/%7F", forbidden("%7F")),
            ("/orders/%3F", forbidden("%3F")),
            ("/orders/%23", forbidden("%23")),
            ("/orders/%41", non_canonical("%41")),
            ("/v1/keys%3Arotate", non_canonical("%3A")),
            ("/orders/%40x", non_canonical("%40")),
            ("/orders/%2C", non_canonical("%2C")),
            ("/orders/%21", non_canonical("%21")),
            ("/orders/%2B", non_canonical("%2B")),
            ("/orders/%3D", non_canonical("%3D")),
            ("/orders/%27", non_canonical("%27")),
            ("/orders/%7e", non_canonical("%7e")),
            ("/orders/%c3%a9", non_canonical("%c3")),
            ("/orders/%C0%AF", NotUtf8),
            ("/orders/%FF", NotUtf8),
            ("/orders/%", BrokenEscape),
            ("/orders/%2", BrokenEscape),
            ("/orders/%G0", BrokenEscape),
            ("/orders/%+1", BrokenEscape),
            ("/orders/../admin", DotSegment),
            ("/orders/./x", DotSegment),
            ("/orders/..", DotSegment),
            ("/.", DotSegment),
            ("/orders//admin", EmptySegment),
            ("//orders", EmptySegment),
            ("/orders/a b", Character(b' ')),
            ("/orders/\0", Character(0)),
            ("/orders/\t", Character(b'\t')),
            ("/orders/\u{e9}", Character(0xC3)),
            ("/orders/\"", Character(b'"')),
            ("/orders/<", Character(b'<')),
            ("/orders/|", Character(b'|')),
            ("orders", NotAbsolute),
            ("", NotAbsolute),
        ];
        for (path, want) in cases {
            assert_eq!(check_path(path), Err(want.clone()), "{path:?}");
            let url = format!("https://edge.example{path}");
            if path.starts_with('/') {
                assert_eq!(RequestTarget::from_url(&url), Err(want), "{url:?}");
            }
        }
        // The path begins where the authority ends, never inside a query or fragment.
        for url in ["https://h?x=/admin", "https://h#/admin", "https://h"] {
            assert_eq!(RequestTarget::from_url(url), Err(NotAbsolute), "{url}");
        }
        // No scheme with `//` after it (`a:` has none after it; the others are no scheme: none,
        // a digit or a non-ASCII letter first): the whole text is the target, read from its
        // first `/`, and `//h` is an empty segment.
        for url in ["a:b://h/p", "://h/p", "1http://h/p", "é://h/p"] {
            assert_eq!(RequestTarget::from_url(url), Err(EmptySegment), "{url}");
        }
    }

    #[test]
    fn upstream_urls_need_tls_outside_loopback() {
        let ok: &[(&str, &str, &str)] = &[
            ("https://api.example.com", "https://api.example.com", ""),
            ("https://api.example.com/", "https://api.example.com", ""),
            (
                "https://api.example.com:8443/v2/",
                "https://api.example.com:8443/v2",
                "/v2",
            ),
            ("http://127.0.0.1:8788", "http://127.0.0.1:8788", ""),
            ("http://127.9.9.9", "http://127.9.9.9", ""),
            (
                "http://localhost:3000/api",
                "http://localhost:3000/api",
                "/api",
            ),
            ("http://[::1]:8080", "http://[::1]:8080", ""),
        ];
        for (text, base, path) in ok {
            let url = UpstreamUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((url.base(), url.path()), (*base, *path), "{text}");
        }
        let refused: &[(&str, UpstreamUrlError)] = &[
            ("http://api.example.com", UpstreamUrlError::NotTls),
            ("http://10.0.0.5:8080", UpstreamUrlError::NotTls),
            ("http://128.0.0.1", UpstreamUrlError::NotTls),
            ("http://localhost.evil.example", UpstreamUrlError::NotTls),
            ("http://127.0.0.1.evil.example", UpstreamUrlError::NotTls),
            ("http://[::2]", UpstreamUrlError::NotTls),
            ("http://[::1]evil", UpstreamUrlError::NotTls),
            ("ftp://127.0.0.1", UpstreamUrlError::Scheme),
            ("127.0.0.1:8788", UpstreamUrlError::Scheme),
            ("https://", UpstreamUrlError::Scheme),
            ("https://user@api.example.com", UpstreamUrlError::Shape),
            ("http://127.0.0.1@evil.example", UpstreamUrlError::Shape),
            ("https://api.example.com/v2?x=1", UpstreamUrlError::Shape),
            ("https://api.example.com/a/../b", UpstreamUrlError::Shape),
        ];
        for (text, want) in refused {
            assert_eq!(UpstreamUrl::parse(text).as_ref(), Err(want), "{text}");
        }
    }

    #[test]
    fn only_the_known_methods_pass() {
        for m in METHODS {
            assert!(is_known_method(m), "{m}");
        }
        for m in [
            "PROPFIND", "MKCOL", "PURGE", "SEARCH", "TRACE", "CONNECT", "get", "Get", "", "FOO",
        ] {
            assert!(!is_known_method(m), "{m}");
        }
    }
}
