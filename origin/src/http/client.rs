//! Who a client is, for the per-client limits (failed admin authentications, open connections):
//! the TCP peer's address, or behind a trusted proxy the address it forwarded; IPv6 clients by
//! their /64, since one host usually holds a whole /64 and could otherwise pick a new address
//! for every request.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// Most `X-Forwarded-For` entries looked at, from the right. Each one passed is a trusted
/// proxy; real chains are a few hops long.
const MAX_HOPS: usize = 32;

pub use crate::config::TrustedProxies;

impl TrustedProxies {
    /// The client's address for a request from `peer` with `headers`.
    ///
    /// From a peer that is not a trusted proxy: the peer (its `X-Forwarded-For`, which anyone
    /// can write, is ignored). From a trusted proxy: the rightmost `X-Forwarded-For` entry that
    /// is not itself a trusted proxy (each proxy appends the address it saw, so entries to its
    /// left are whatever the client wrote); if every entry is a trusted proxy, the leftmost.
    /// Several `X-Forwarded-For` headers read as one list, in order. A missing header, or an
    /// entry that is not an address (bare, or with a port: `1.2.3.4:5`, `[::1]:5`) before an
    /// untrusted one is found, gives the peer: only a misconfigured proxy writes that there,
    /// and a client cannot, because its own entries lie to the left of the proxy's.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let mut leftmost_trusted = None;
        let mut hops = 0;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            // Entry by entry from the right, on the raw bytes: bytes a client wrote to the left
            // (not UTF-8, say) must not spoil the proxies' entries to their right.
            for entry in value.as_bytes().rsplit(|b| *b == b',') {
                hops += 1;
                if hops > MAX_HOPS {
                    return leftmost_trusted.unwrap_or(peer);
                }
                let Some(hop) = std::str::from_utf8(entry)
                    .ok()
                    .and_then(|e| parse_hop(e.trim()))
                else {
                    return peer;
                };
                if !self.contains(hop) {
                    return hop;
                }
                leftmost_trusted = Some(hop);
            }
        }
        leftmost_trusted.unwrap_or(peer)
    }
}

fn parse_hop(entry: &str) -> Option<IpAddr> {
    IpAddr::from_str(entry)
        .or_else(|_| SocketAddr::from_str(entry).map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// The key a client is counted under: an IPv4 address as it is (an IPv4-mapped IPv6 address as
/// its IPv4 address), an IPv6 address by its /64 prefix.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s} is an address"))
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop_behind_a_trusted_proxy() {
        let trusted = TrustedProxies::parse("127.0.0.0/8, 10.0.0.0/8, ::1").expect("valid");
        // (peer, X-Forwarded-For headers, expected client, why)
        let cases: &[(&str, &[&[u8]], &str, &str)] = &[
            ("127.0.0.1", &[], "127.0.0.1", "trusted peer, no header"),
            ("127.0.0.1", &[b"203.0.113.7"], "203.0.113.7", "one hop"),
            (
                "127.0.0.1",
                &[b"198.51.100.1, 203.0.113.7"],
                "203.0.113.7",
                "the client's own entry (left) is not believed",
            ),
            (
                "127.0.0.1",
                &[b"203.0.113.7, 10.1.2.3"],
                "203.0.113.7",
                "a chain of trusted proxies is walked",
            ),
            (
                "127.0.0.1",
                &[b"198.51.100.1", b"203.0.113.7, 10.0.0.9"],
                "203.0.113.7",
                "several headers read as one list",
            ),
            (
                "127.0.0.1",
                &[b"10.0.0.5, 10.0.0.9"],
                "10.0.0.5",
                "every hop trusted: the leftmost",
            ),
            (
                "127.0.0.1",
                &[b"unknown"],
                "127.0.0.1",
                "not an address: the peer",
            ),
            ("127.0.0.1", &[b""], "127.0.0.1", "empty: the peer"),
            (
                "127.0.0.1",
                &[b"garbage, 203.0.113.7"],
                "203.0.113.7",
                "garbage left of the client is never read",
            ),
            (
                "127.0.0.1",
                &[b"203.0.113.7, nonsense"],
                "127.0.0.1",
                "garbage where the proxy writes: the peer",
            ),
            ("127.0.0.1", &[b"\xff"], "127.0.0.1", "not UTF-8: the peer"),
            (
                "127.0.0.1",
                &[b"\xff\xfe, 203.0.113.7"],
                "203.0.113.7",
                "bytes a client wrote (not UTF-8) do not spoil the proxy's entry",
            ),
            (
                "127.0.0.1",
                &[b"203.0.113.7:4711"],
                "203.0.113.7",
                "with a port",
            ),
            (
                "127.0.0.1",
                &[b"[2001:db8::1]:4711"],
                "2001:db8::1",
                "IPv6 with a port",
            ),
            ("::1", &[b"2001:db8::1"], "2001:db8::1", "trusted IPv6 peer"),
            (
                "::ffff:127.0.0.1",
                &[b"203.0.113.7"],
                "203.0.113.7",
                "IPv4-mapped peer is the IPv4 peer",
            ),
            (
                "127.0.0.1",
                &[b"::ffff:203.0.113.7"],
                "203.0.113.7",
                "IPv4-mapped hop",
            ),
            (
                "192.0.2.1",
                &[b"203.0.113.7"],
                "192.0.2.1",
                "untrusted peer: its header is ignored",
            ),
            (
                "192.0.2.1",
                &[b"127.0.0.1"],
                "192.0.2.1",
                "untrusted peer cannot claim to be a proxy",
            ),
        ];
        for (peer, values, expected, why) in cases {
            let mut headers = HeaderMap::new();
            for value in *values {
                headers.append(
                    "x-forwarded-for",
                    HeaderValue::from_bytes(value).expect("header value"),
                );
            }
            assert_eq!(
                trusted.client_address(ip(peer), &headers),
                ip(expected),
                "{why}"
            );
        }
    }

    #[test]
    fn without_trusted_proxies_the_header_is_never_read() {
        let none = TrustedProxies::parse("").expect("valid");
        assert!(none.is_empty());
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        assert_eq!(
            none.client_address(ip("127.0.0.1"), &headers),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn a_long_chain_of_trusted_hops_is_cut_short() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("valid");
        let chain = vec!["10.0.0.1"; 10_000].join(",");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_str(&format!("203.0.113.7,{chain}")).expect("value"),
        );
        assert_eq!(
            trusted.client_address(ip("10.0.0.2"), &headers),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_ipv4_as_they_are() {
        let cases = [
            ("203.0.113.7", "203.0.113.7"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2::ffff", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
            ("::1", "::"),
        ];
        for (address, key) in cases {
            assert_eq!(client_key(ip(address)), ip(key), "{address}");
        }
    }
}
