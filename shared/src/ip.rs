//! Per-key IP allowlists: where a key may be used from.
//!
//! # Syntax
//!
//! A list of at most [`ALLOWED_IPS_MAX`] entries, each an IPv4 or IPv6 address or a CIDR range
//! of either, written as the standard library parses them:
//!
//! * `203.0.113.7`, `2001:db8::1`: one address;
//! * `203.0.113.0/24`, `2001:db8::/32`: every address whose first *n* bits are the range's. The
//!   bits after the prefix must be zero (`203.0.113.7/24` is refused: which was meant, the
//!   address or its network?);
//! * no zone (`fe80::1%eth0`), no leading zeros in IPv4 (`010.0.0.1`), no spaces, nothing twice;
//! * no IPv4 address written as IPv6 (`::ffff:203.0.113.7`): write it as IPv4;
//! * nothing inside `240.0.0.0/4` ([`PSEUDO_IPV4`]): Cloudflare's *Pseudo IPv4* setting gives
//!   IPv6 clients made-up addresses from that range (a hash of the IPv6 address, in
//!   `CF-Connecting-IP` when set to overwrite headers), so such an entry would stand for
//!   whichever IPv6 clients happen to map to it, not for one client. No real client has one:
//!   the range is reserved.
//!
//! An empty list means the key is not restricted. A client address that is an IPv4 address
//! mapped into IPv6 (`::ffff:203.0.113.7`) is matched as the IPv4 address it is, by the IPv4
//! entries; an IPv6 entry never matches an IPv4 client. A client address in `240.0.0.0/4`
//! matches no entry at all (not even `0.0.0.0/0`): it does not say who the client is. A list
//! stored before `240.0.0.0/4` entries were refused still reads (a record must not become
//! unreadable), and such an entry matches no client.
//!
//! ```
//! use latchkey_shared::ip::{IpAllowlist, IpListError};
//!
//! let list = IpAllowlist::parse(&["203.0.113.0/24", "2001:db8::1"]).unwrap();
//! assert!(list.allows("203.0.113.200".parse().unwrap()));
//! assert!(list.allows("::ffff:203.0.113.9".parse().unwrap()));
//! assert!(!list.allows("198.51.100.1".parse().unwrap()));
//! assert!(!list.allows("2001:db8::2".parse().unwrap()));
//! assert_eq!(list.to_strings(), ["203.0.113.0/24", "2001:db8::1"]);
//! assert!(matches!(IpAllowlist::parse(&["203.0.113.7/24"]), Err(IpListError::HostBits(_))));
//! assert!(matches!(IpAllowlist::parse(&["240.0.0.7"]), Err(IpListError::PseudoIpv4(_))));
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most entries one key's list may hold.
pub const ALLOWED_IPS_MAX: usize = 64;

/// Longest entry accepted, in bytes (the longest IPv6 range is 43).
const ENTRY_MAX: usize = 64;

/// `240.0.0.0/4`, where Cloudflare's *Pseudo IPv4* puts the IPv4 stand-ins it makes for IPv6
/// clients (otherwise reserved: no real client has such an address).
pub const PSEUDO_IPV4: &str = "240.0.0.0/4";

/// [`PSEUDO_IPV4`] as a range.
const PSEUDO_IPV4_RANGE: IpRange = IpRange {
    network: IpAddr::V4(Ipv4Addr::new(240, 0, 0, 0)),
    prefix: 4,
};

/// Whether `address` is in [`PSEUDO_IPV4`] (as IPv4, or mapped into IPv6): an address that
/// names no one client, which no allowlist entry matches.
pub fn is_pseudo_ipv4(address: IpAddr) -> bool {
    PSEUDO_IPV4_RANGE.contains(address.to_canonical())
}

/// Why an allowlist was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpListError {
    /// More than [`ALLOWED_IPS_MAX`] entries.
    #[error("at most {ALLOWED_IPS_MAX} addresses or ranges")]
    TooMany,
    /// Not an address or a range.
    #[error(
        "{0:?} is not an IPv4 or IPv6 address or CIDR range (such as 203.0.113.7, 203.0.113.0/24 or 2001:db8::/32)"
    )]
    Syntax(String),
    /// A range whose bits past the prefix are not zero.
    #[error(
        "{0:?} has bits set past its prefix: write the network address (such as 203.0.113.0/24)"
    )]
    HostBits(String),
    /// The same entry twice.
    #[error("{0:?} is listed more than once")]
    Duplicate(String),
    /// An IPv4 address or range written as IPv6 (`::ffff:…`), which no client would match.
    #[error("{0:?} is an IPv4 address written as IPv6: write it as IPv4 (such as 203.0.113.7)")]
    Mapped(String),
    /// An address or range inside [`PSEUDO_IPV4`], which stands for no one client.
    #[error(
        "{0:?} is in 240.0.0.0/4, where Cloudflare's Pseudo IPv4 puts made-up addresses for IPv6 \
         clients: it would match unrelated clients. List the clients' real IPv4 or IPv6 addresses"
    )]
    PseudoIpv4(String),
}

/// One entry: an address and how many of its leading bits must match (32 or 128: the address
/// alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpRange {
    network: IpAddr,
    prefix: u8,
}

/// Where a list comes from: a caller's input (every rule) or storage (what earlier rules let
/// in still reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Input,
    Stored,
}

impl IpRange {
    fn parse(text: &str, source: Source) -> Result<Self, IpListError> {
        let syntax = || IpListError::Syntax(truncate(text));
        if text.len() > ENTRY_MAX {
            return Err(syntax());
        }
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| syntax())?;
        if network.is_ipv6() && network.to_canonical().is_ipv4() {
            return Err(IpListError::Mapped(truncate(text)));
        }
        let width = width(network);
        let prefix = match prefix {
            None => width,
            // Digits only, no leading zero: `u8::from_str` would take `+8` and `008`.
            Some(p)
                if (1..=3).contains(&p.len())
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p == "0" || !p.starts_with('0')) =>
            {
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= width)
                    .ok_or_else(syntax)?
            }
            Some(_) => return Err(syntax()),
        };
        let range = Self { network, prefix };
        if range.masked(network) != network {
            return Err(IpListError::HostBits(truncate(text)));
        }
        // Inside the range (a wider one, such as 0.0.0.0/0, is fine: a pseudo-IPv4 client
        // matches no entry).
        if source == Source::Input && prefix >= PSEUDO_IPV4_RANGE.prefix && is_pseudo_ipv4(network)
        {
            return Err(IpListError::PseudoIpv4(truncate(text)));
        }
        Ok(range)
    }

    /// `address` with the bits past this range's prefix cleared (same family assumed).
    fn masked(&self, address: IpAddr) -> IpAddr {
        match address {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    fn contains(&self, client: IpAddr) -> bool {
        self.network.is_ipv4() == client.is_ipv4() && self.masked(client) == self.network
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == width(self.network) {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix)
        }
    }
}

fn width(address: IpAddr) -> u8 {
    if address.is_ipv4() { 32 } else { 128 }
}

/// Error messages echo the input; keep an oversized one from flooding logs and responses.
fn truncate(s: &str) -> String {
    crate::echo(s, ENTRY_MAX)
}

/// A key's allowlist, in the order given (empty: not restricted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpAllowlist(Vec<IpRange>);

impl IpAllowlist {
    /// Parses a list as given to create or update (see the module's syntax).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, IpListError> {
        Self::parse_from(entries, Source::Input)
    }

    fn parse_from<S: AsRef<str>>(entries: &[S], source: Source) -> Result<Self, IpListError> {
        if entries.len() > ALLOWED_IPS_MAX {
            return Err(IpListError::TooMany);
        }
        let mut ranges: Vec<IpRange> = Vec::with_capacity(entries.len());
        for entry in entries {
            let range = IpRange::parse(entry.as_ref(), source)?;
            if ranges.contains(&range) {
                return Err(IpListError::Duplicate(range.to_string()));
            }
            ranges.push(range);
        }
        Ok(Self(ranges))
    }

    /// Whether the list restricts nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `client` may use the key: the list is empty, or an entry contains it (never a
    /// [`PSEUDO_IPV4`] client's address, which names no one client).
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.is_empty()
            || (!is_pseudo_ipv4(client) && self.0.iter().any(|range| range.contains(client)))
    }

    /// The entries as text, in their canonical form (`2001:DB8::/32` reads back as
    /// `2001:db8::/32`).
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl Serialize for IpAllowlist {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(ToString::to_string))
    }
}

impl<'de> Deserialize<'de> for IpAllowlist {
    /// As strictly as [`IpAllowlist::parse`]: a list that does not parse is no list, and the
    /// record holding it is unreadable (the edge denies) rather than unrestricted. One
    /// exception: a [`PSEUDO_IPV4`] entry, refused since, still reads (so the keys that hold
    /// one stay readable and restricted); it matches no client.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        Self::parse_from(&entries, Source::Stored).map_err(serde::de::Error::custom)
    }
}

/// Parses a client address as a caller states it (origin's and the edge's verify, the edge's
/// `CF-Connecting-IP`): one address, no range.
pub fn parse_client(text: &str) -> Option<IpAddr> {
    if text.len() > ENTRY_MAX {
        return None;
    }
    text.parse().ok()
}

/// The client's address as the gateway takes it from the request's headers: Cloudflare's
/// `CF-Connecting-IP` (`connecting_ip`), unless the request carries a `CF-Worker` header
/// (`cf_worker`, any value): then it is a subrequest from another Worker of the same zone,
/// which can set `CF-Connecting-IP` itself, and the address is unknown, so a key with an
/// allowlist fails with `IP_NOT_ALLOWED` (fail closed). A key without one is unaffected: the
/// gateway asks for the address only for a key with a list.
///
/// ```
/// use latchkey_shared::ip::gateway_client;
///
/// assert_eq!(gateway_client(Some("203.0.113.7"), None), "203.0.113.7".parse().ok());
/// assert_eq!(gateway_client(Some("203.0.113.7"), Some("other.example.com")), None);
/// ```
pub fn gateway_client(connecting_ip: Option<&str>, cf_worker: Option<&str>) -> Option<IpAddr> {
    if cf_worker.is_some() {
        return None;
    }
    connecting_ip.and_then(parse_client)
}

/// A verify request's `client_ip` that is not one address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client_ip must be one IPv4 or IPv6 address")]
pub struct ClientIpError;

/// A verify request's optional `client_ip` (origin's calls and the edge's verify alike): absent
/// is unknown, present must be one address.
pub fn parse_client_field(text: Option<&str>) -> Result<Option<IpAddr>, ClientIpError> {
    text.map(|t| parse_client(t).ok_or(ClientIpError))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        use IpListError::*;
        let long = "1".repeat(ENTRY_MAX + 1);
        // (entry, Ok(canonical) or the error's kind)
        /// The canonical form, or which error.
        type Want = Result<&'static str, fn(String) -> IpListError>;
        let cases: &[(&str, Want)] = &[
            ("203.0.113.7", Ok("203.0.113.7")),
            ("203.0.113.7/32", Ok("203.0.113.7")),
            ("203.0.113.0/24", Ok("203.0.113.0/24")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("2001:db8::1", Ok("2001:db8::1")),
            ("2001:DB8::/32", Ok("2001:db8::/32")),
            ("::/0", Ok("::/0")),
            ("::ffff:203.0.113.7", Err(Mapped)),
            ("::ffff:0:0/96", Err(Mapped)),
            ("203.0.113.7/24", Err(HostBits)),
            ("2001:db8::1/32", Err(HostBits)),
            ("203.0.113.0/33", Err(Syntax)),
            ("2001:db8::/129", Err(Syntax)),
            ("203.0.113.0/", Err(Syntax)),
            ("203.0.113.0/+8", Err(Syntax)),
            ("203.0.0.0/08", Err(Syntax)),
            ("203.0.0.0/8", Ok("203.0.0.0/8")),
            ("203.0.113.0/0024", Err(Syntax)),
            ("203.0.113.0/24/8", Err(Syntax)),
            ("010.0.0.1", Err(Syntax)),
            ("203.0.113", Err(Syntax)),
            (" 203.0.113.7", Err(Syntax)),
            ("fe80::1%eth0", Err(Syntax)),
            ("localhost", Err(Syntax)),
            ("", Err(Syntax)),
            (&long, Err(Syntax)),
        ];
        for (entry, want) in cases {
            let got = IpAllowlist::parse(&[entry]);
            match want {
                Ok(canonical) => {
                    assert_eq!(got.expect(entry).to_strings(), [*canonical], "{entry}")
                }
                Err(kind) => assert_eq!(
                    std::mem::discriminant(&got.expect_err(entry)),
                    std::mem::discriminant(&kind(String::new())),
                    "{entry}"
                ),
            }
        }
    }

    #[test]
    fn lists_are_bounded_and_hold_each_entry_once() {
        let many: Vec<String> = (0..=ALLOWED_IPS_MAX)
            .map(|i| format!("10.0.0.{i}"))
            .collect();
        assert_eq!(IpAllowlist::parse(&many), Err(IpListError::TooMany));
        assert!(IpAllowlist::parse(&many[..ALLOWED_IPS_MAX]).is_ok());
        assert_eq!(
            IpAllowlist::parse(&["10.0.0.0/8", "10.0.0.0/8"]),
            Err(IpListError::Duplicate("10.0.0.0/8".into()))
        );
        // The same address written two ways is the same entry.
        assert!(matches!(
            IpAllowlist::parse(&["2001:db8::1", "2001:DB8:0::1/128"]),
            Err(IpListError::Duplicate(_))
        ));
    }

    #[test]
    fn matching_table() {
        let list = IpAllowlist::parse(&["203.0.113.0/24", "198.51.100.7", "2001:db8::/32"])
            .expect("valid");
        let cases = [
            ("203.0.113.0", true),
            ("203.0.113.255", true),
            ("203.0.114.0", false),
            ("198.51.100.7", true),
            ("198.51.100.8", false),
            ("::ffff:203.0.113.5", true),
            ("::ffff:198.51.100.8", false),
            ("2001:db8:ffff::1", true),
            ("2001:db9::1", false),
            // An IPv4 range says nothing of IPv6 addresses with the same bits.
            ("::cb00:7100", false),
        ];
        for (client, want) in cases {
            let client: IpAddr = client.parse().expect(client);
            assert_eq!(list.allows(client), want, "{client}");
        }
        let everything = IpAllowlist::parse(&["0.0.0.0/0"]).expect("valid");
        assert!(everything.allows("192.0.2.1".parse().expect("v4")));
        assert!(!everything.allows("2001:db8::1".parse().expect("v6")));
        assert!(IpAllowlist::default().allows("192.0.2.1".parse().expect("v4")));
    }

    #[test]
    fn serialises_canonically_and_deserialises_strictly() {
        let list = IpAllowlist::parse(&["2001:DB8::/32", "203.0.113.7/32"]).expect("valid");
        let json = serde_json::to_string(&list).expect("json");
        assert_eq!(json, r#"["2001:db8::/32","203.0.113.7"]"#);
        assert_eq!(
            serde_json::from_str::<IpAllowlist>(&json).expect("parses"),
            list
        );
        for bad in [
            r#"["203.0.113.7/24"]"#,
            r#"["nope"]"#,
            r#"[1]"#,
            r#""10.0.0.1""#,
        ] {
            assert!(serde_json::from_str::<IpAllowlist>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pseudo_ipv4_entries_are_refused_and_pseudo_ipv4_clients_match_nothing() {
        // (entry, refused as pseudo-IPv4)
        let cases = [
            ("240.0.0.0", true),
            ("240.0.0.1", true),
            ("240.0.0.0/4", true),
            ("250.1.0.0/16", true),
            ("255.255.255.255", true),
            ("255.255.255.255/32", true),
            ("239.255.255.255", false),
            ("224.0.0.0/4", false),
            // Wider than the range: allowed (a pseudo-IPv4 client matches no entry anyway).
            ("224.0.0.0/3", false),
            ("0.0.0.0/0", false),
            // IPv6 is not this rule's (and `::ffff:240.0.0.1` is refused as IPv4 in IPv6).
            ("2001:db8::/32", false),
        ];
        for (entry, refused) in cases {
            let got = IpAllowlist::parse(&[entry]);
            assert_eq!(
                matches!(got, Err(IpListError::PseudoIpv4(_))),
                refused,
                "{entry}: {got:?}"
            );
            if !refused {
                assert!(got.is_ok(), "{entry}: {got:?}");
            }
        }
        let message = IpAllowlist::parse(&["240.1.2.3"])
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains("\"240.1.2.3\"")
                && message.contains("240.0.0.0/4")
                && message.contains("Pseudo IPv4"),
            "{message}"
        );
        assert!(matches!(
            IpAllowlist::parse(&["::ffff:240.0.0.1"]),
            Err(IpListError::Mapped(_))
        ));

        // (client, is pseudo-IPv4)
        let clients = [
            ("240.0.0.1", true),
            ("255.255.255.255", true),
            ("::ffff:240.0.0.1", true),
            ("239.255.255.255", false),
            ("203.0.113.7", false),
            ("2001:db8::1", false),
            ("f000::1", false),
        ];
        let everything = IpAllowlist::parse(&["0.0.0.0/0", "::/0"]).expect("valid");
        for (client, pseudo) in clients {
            let client: IpAddr = client.parse().expect(client);
            assert_eq!(is_pseudo_ipv4(client), pseudo, "{client}");
            assert_eq!(everything.allows(client), !pseudo, "{client}");
            assert!(
                IpAllowlist::default().allows(client),
                "unrestricted: {client}"
            );
        }

        // A list stored before the rule still reads, still restricts, and its pseudo-IPv4
        // entry admits no one.
        let stored: IpAllowlist =
            serde_json::from_str(r#"["240.0.0.1","203.0.113.0/24"]"#).expect("reads");
        assert!(!stored.is_empty());
        assert_eq!(stored.to_strings(), ["240.0.0.1", "203.0.113.0/24"]);
        for (client, allowed) in [
            ("240.0.0.1", false),
            ("240.0.0.2", false),
            ("203.0.113.9", true),
        ] {
            let client: IpAddr = client.parse().expect(client);
            assert_eq!(stored.allows(client), allowed, "{client}");
        }
        // Every other rule still holds for a stored list.
        assert!(serde_json::from_str::<IpAllowlist>(r#"["240.0.0.1/24"]"#).is_err());
    }

    #[test]
    fn the_gateway_takes_cloudflare_s_address_unless_another_worker_sent_the_request() {
        let v4 = |s: &str| Some(s.parse::<IpAddr>().expect(s));
        // (CF-Connecting-IP, CF-Worker, the client's address)
        let cases = [
            (Some("203.0.113.7"), None, v4("203.0.113.7")),
            (Some("2001:db8::1"), None, v4("2001:db8::1")),
            (Some("not-an-address"), None, None),
            (Some("203.0.113.0/24"), None, None),
            (None, None, None),
            // A subrequest of a Worker in the same zone: it can set CF-Connecting-IP.
            (Some("203.0.113.7"), Some("other-worker.example.com"), None),
            (Some("203.0.113.7"), Some(""), None),
            (None, Some("example.com"), None),
        ];
        for (connecting_ip, cf_worker, want) in cases {
            assert_eq!(
                gateway_client(connecting_ip, cf_worker),
                want,
                "{connecting_ip:?} {cf_worker:?}"
            );
        }
        // So a key with an allowlist fails for such a request, and one without passes.
        let listed = IpAllowlist::parse(&["203.0.113.0/24"]).expect("valid");
        let record = |allowed_ips: IpAllowlist| crate::KeyRecord {
            v: crate::RECORD_VERSION,
            id: crate::KeyId::parse("key_0123456789abcdefABCD").expect("id"),
            subject: "acme".into(),
            scopes: crate::ScopeSet::default(),
            revoked: false,
            revoked_at: None,
            expires_at: None,
            revision: 1,
            disabled: false,
            allowed_ips,
        };
        for (cf_worker, allowlist, want) in [
            (None, listed.clone(), crate::Verdict::Valid),
            (Some("x.example.com"), listed, crate::Verdict::IpNotAllowed),
            (
                Some("x.example.com"),
                IpAllowlist::default(),
                crate::Verdict::Valid,
            ),
        ] {
            let context = crate::DecisionContext::at(crate::UnixMillis(0))
                .from_address(gateway_client(Some("203.0.113.7"), cf_worker));
            assert_eq!(
                crate::decide(Some(&record(allowlist)), &context),
                want,
                "{cf_worker:?}"
            );
        }
    }

    #[test]
    fn client_addresses_are_single_addresses() {
        assert_eq!(parse_client_field(None), Ok(None));
        assert_eq!(parse_client_field(Some("x")), Err(ClientIpError));
        assert_eq!(
            parse_client_field(Some("::1")),
            Ok(Some("::1".parse().expect("v6")))
        );
        assert_eq!(
            parse_client("203.0.113.7"),
            Some("203.0.113.7".parse().expect("v4"))
        );
        assert_eq!(
            parse_client("2001:db8::1"),
            Some("2001:db8::1".parse().expect("v6"))
        );
        for bad in [
            "203.0.113.0/24",
            "",
            "x",
            " 203.0.113.7",
            "203.0.113.7, 10.0.0.1",
        ] {
            assert_eq!(parse_client(bad), None, "{bad}");
        }
    }
}
