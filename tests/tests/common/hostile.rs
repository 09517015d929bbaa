//! A hostile-input corpus and a raw HTTP/1.1 client that can send what well-behaved clients
//! cannot: invalid UTF-8 in headers, doubled headers, bodies shorter than announced, bytes
//! trickled one at a time.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failure here is a failed test"
)]

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// JSON bodies that no endpoint may accept: broken syntax, wrong shapes, hostile strings.
/// Each is `(label, bytes)`.
pub fn bad_bodies() -> Vec<(String, Vec<u8>)> {
    let mut bodies: Vec<(String, Vec<u8>)> = vec![
        ("truncated object".into(), b"{".to_vec()),
        ("truncated field".into(), br#"{"name": "a"#.to_vec()),
        (
            "truncated value".into(),
            br#"{"name": "a", "subject": "#.to_vec(),
        ),
        ("trailing garbage".into(), br#"{"name": "a"} xyz"#.to_vec()),
        (
            "two documents".into(),
            br#"{"name": "a"}{"name": "b"}"#.to_vec(),
        ),
        ("top-level array".into(), b"[]".to_vec()),
        ("top-level string".into(), br#""string""#.to_vec()),
        ("top-level number".into(), b"123".to_vec()),
        ("top-level null".into(), b"null".to_vec()),
        ("single quotes".into(), b"{'name': 'a'}".to_vec()),
        ("comment".into(), b"{/* c */}".to_vec()),
        ("nested arrays 100k".into(), b"[".repeat(100_000)),
        ("nested objects 10k".into(), br#"{"a":"#.repeat(10_000)),
        (
            "nested closed 200".into(),
            format!("{{\"claims\":{}1{}}}", "[".repeat(200), "]".repeat(200)).into_bytes(),
        ),
        (
            "invalid utf-8 in string".into(),
            b"{\"name\": \"\xff\xfe\"}".to_vec(),
        ),
        ("invalid utf-8 raw".into(), b"\xff\xfe\xfd".to_vec()),
        (
            "overlong utf-8".into(),
            b"{\"name\": \"\xc0\xaf\"}".to_vec(),
        ),
        (
            "lone surrogate escape".into(),
            br#"{"name": "\ud800"}"#.to_vec(),
        ),
        ("raw NUL".into(), b"{\"name\": \"a\x00b\"}".to_vec()),
        ("NUL byte body".into(), vec![0u8; 64]),
        ("unknown field".into(), br#"{"nope": 1}"#.to_vec()),
        (
            "number overflow".into(),
            br#"{"seconds_until_expiration": 1e400}"#.to_vec(),
        ),
        ("BOM".into(), b"\xef\xbb\xbf{}".to_vec()),
        (
            "expiry spelled as an object".into(),
            br#"{"seconds_until_expiration": {"never": true}}"#.to_vec(),
        ),
        (
            "an allowlist entry in Cloudflare's pseudo-IPv4 range".into(),
            br#"{"allowed_ips": ["240.0.0.1"]}"#.to_vec(),
        ),
    ];
    let huge = "A".repeat(60_000);
    for field in [
        "name",
        "subject",
        "secret",
        "key",
        "key_id",
        "description",
        "reason",
    ] {
        bodies.push((
            format!("huge {field} with a NUL escape"),
            format!(r#"{{"{field}": "{huge}\u0000"}}"#).into_bytes(),
        ));
    }
    bodies
}

/// Wrong-typed values for a field of the given kind.
pub fn wrong_values(kind: &str) -> Vec<&'static str> {
    match kind {
        "string" => vec!["5", "true", "[]", "{}", "1.5"],
        "strings" => vec![r#""read:orders""#, "5", "{}", "[1]", "[null]", r#"[["a"]]"#],
        // `"never"` is right for the expiry fields alone; other spellings are wrong for all.
        "number" => vec![
            r#""soon""#,
            r#""Never""#,
            r#"" never""#,
            "true",
            "[]",
            "{}",
            "1.5",
            "1e400",
            "-1",
        ],
        // Any JSON number of seconds is taken when more than 0 and at most ten years; every
        // other number, every spelling JSON lacks (`NaN`, infinities, hex) and every other
        // type is refused. (`"never"` is right for update and roll alone.)
        "seconds" => vec![
            r#""soon""#,
            r#""Never""#,
            r#"" never""#,
            r#""3600""#,
            "true",
            "[]",
            "{}",
            "0",
            "0.0",
            "-0",
            "-0.5",
            "-1",
            "1e-400",
            "1e400",
            "-1e400",
            "1e300",
            "315360000.001",
            "9007199254740993",
            "NaN",
            "-NaN",
            r#""NaN""#,
            "Infinity",
            "-Infinity",
            r#""Infinity""#,
            "0x10",
            "+1",
            ".5",
            "1.",
        ],
        // Clerk's key type: 3 to 25 characters of single-line text.
        "type" => vec![
            "5",
            "true",
            "[]",
            "{}",
            r#""""#,
            r#""ab""#,
            r#""   ""#,
            r#""aaaaaaaaaaaaaaaaaaaaaaaaaa""#,
            r#""api\u0000key""#,
            r#""api\nkey""#,
        ],
        "object" => vec![
            r#""x""#,
            "5",
            "[1]",
            "true",
            // A NUL no database keeps (PostgreSQL's JSON refuses it): in a name, in a value.
            r#"{"a\u0000": 1}"#,
            r#"{"tier": ["gold\u0000"]}"#,
        ],
        "bool" => vec![r#""true""#, "1", "0", "[]", "{}", r#""yes""#],
        other => panic!("unknown kind {other}"),
    }
}

/// Scope lists no endpoint may accept.
pub fn bad_scope_lists() -> Vec<(String, Value)> {
    let many: Vec<String> = (0..1000).map(|i| format!("read:s{i}")).collect();
    vec![
        ("1000 scopes".into(), serde_json::json!(many)),
        (
            "cyrillic look-alike".into(),
            serde_json::json!(["reаd:orders"]),
        ),
        (
            "fullwidth colon".into(),
            serde_json::json!(["read：orders"]),
        ),
        (
            "zero-width joiner".into(),
            serde_json::json!(["read:\u{200d}orders"]),
        ),
        (
            "NUL in scope".into(),
            serde_json::json!(["read:\u{0}orders"]),
        ),
        ("empty scope".into(), serde_json::json!([""])),
        ("spaces".into(), serde_json::json!(["read orders"])),
        (
            "10k-character scope".into(),
            serde_json::json!(["r".repeat(10_000)]),
        ),
        (
            "SQL in scope".into(),
            serde_json::json!(["read:' OR 1=1--"]),
        ),
    ]
}

/// Key ids no route may resolve: traversal, SQL metacharacters, encodings (percent-encoded).
pub fn bad_ids() -> Vec<&'static str> {
    vec![
        "..%2F..%2Fetc%2Fpasswd",
        "..",
        "%2e%2e",
        "key_..%2F..",
        "'%20OR%20'1'%3D'1",
        "key_abc'--",
        "1%3B%20DROP%20TABLE%20api_keys",
        "key_%00",
        "%00",
        "key_%FF%FE",
        "key_%E2%80%AE",
        "%2F",
        "key_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "KEY_ABC",
        "key_%252e%252e",
    ]
}

/// Paths under the routed `/orders/**` that must never be forwarded: each one can be read as
/// a path outside the rules by some server, or is not written the one canonical way.
pub const AMBIGUOUS_PATHS: &[&str] = &[
    "/orders/..%2Fadmin",
    "/orders/..%2fadmin",
    "/orders/%2e%2e%2fadmin",
    "/orders/%2e%2e/admin",
    "/orders/%2E%2E/admin",
    "/orders/.%2e/admin",
    "/orders/%2e/admin",
    "/orders/..%5cadmin",
    "/orders/..%5Cadmin",
    "/orders/..\\admin",
    "/orders/x/..;/admin",
    "/orders;/../admin",
    "/orders/1;jsessionid=x",
    "/orders/..%3B/admin",
    "/orders/..%252Fadmin",
    "/orders/%252e%252e/admin",
    "/orders/%00/admin",
    "/orders/x%00",
    "/orders/%0d%0aX-Injected:%201",
    "/orders/%C0%AF../admin",
    "/orders/%c0%ae%c0%ae/admin",
    "/orders/%E0%80%AE%E0%80%AE/admin",
    "/orders/%FF",
    "/orders/%41dmin",
    "/orders/1%3Acancel",
    "/orders/%40admin",
    "/orders/1%2C2",
    "/orders/%21",
    "/orders/%2",
    "/orders/%zz",
    "/orders/../admin",
    "/orders/./1",
    "/orders/1/..",
    "/orders//admin",
    "/orders/1%3Fx=1",
    "/orders/1%23frag",
];

/// One answer read off the wire.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl RawReply {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Builds an HTTP/1.1 request. `headers` are sent as given (raw bytes); a `Content-Length`
/// for `body` is added unless `headers` has one; every request asks the server to close.
pub fn request(method: &str, target: &str, headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n")
        .into_bytes();
    let mut has_length = false;
    for (name, value) in headers {
        has_length |= name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_length {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Sends `bytes` (in `pieces`, `pause` apart, then holds the connection open) and reads the
/// answer until the server closes. `Err` if nothing came back within `limit`: a hang.
pub async fn exchange(
    addr: &str,
    pieces: &[Vec<u8>],
    pause: Duration,
    limit: Duration,
) -> Result<Option<RawReply>, String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let read = async {
        let (mut rd, mut wr) = stream.split();
        let write = async {
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(pause).await;
                }
                if wr.write_all(piece).await.is_err() {
                    break; // the server gave up on us: fine, read its answer
                }
            }
            std::future::pending::<()>().await;
        };
        let mut buf = Vec::new();
        let reading = rd.read_to_end(&mut buf);
        tokio::select! {
            () = write => unreachable!(),
            result = reading => { let _ = result; }
        }
        buf
    };
    let buf = tokio::time::timeout(limit, read)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?;
    if buf.is_empty() {
        return Ok(None); // closed without an answer
    }
    let text_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(&buf)))?;
    let head = String::from_utf8_lossy(&buf[..text_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut body = buf[text_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok(Some(RawReply {
        status,
        head,
        body,
        elapsed: started.elapsed(),
    }))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..line_end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}
