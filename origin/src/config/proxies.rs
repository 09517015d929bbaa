//! The proxies whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`). Who a client is behind
//! them is the HTTP layer's to say (`http/client.rs`).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

/// The proxies (`TRUSTED_PROXIES`) whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[IpNet]>);

impl TrustedProxies {
    /// Proxies in `networks`.
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks.into())
    }

    /// Parses a comma-separated list of networks (`10.0.0.0/8`) or single addresses
    /// (`127.0.0.1`, `::1`); empty entries are skipped.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut networks = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let network = IpNet::from_str(entry)
                .map(|n| n.trunc())
                .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                .map_err(|_| {
                    format!("{entry:?} is not a network like 10.0.0.0/8 or an address like ::1")
                })?;
            networks.push(network);
        }
        Ok(Self::new(networks))
    }

    /// Whether there are none (`X-Forwarded-For` is never read).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn trusted_proxies_parse_networks_and_addresses_and_name_bad_entries() {
        let cases: &[(&str, Result<usize, &str>)] = &[
            ("", Ok(0)),
            ("127.0.0.0/8", Ok(1)),
            ("127.0.0.1/8, ::1, fd00::/8,", Ok(3)),
            ("127.0.0.0/33", Err("\"127.0.0.0/33\"")),
            ("localhost", Err("\"localhost\"")),
            ("10.0.0.0/8;11.0.0.0/8", Err("\"10.0.0.0/8;11.0.0.0/8\"")),
        ];
        for (list, expected) in cases {
            match (TrustedProxies::parse(list), expected) {
                (Ok(t), Ok(n)) => assert_eq!(t.0.len(), *n, "{list}"),
                (Err(e), Err(named)) => assert!(e.starts_with(named), "{list}: {e}"),
                (got, _) => panic!("{list}: {got:?}"),
            }
        }
        let t = TrustedProxies::parse("127.0.0.1/8").expect("valid");
        assert!(t.contains(ip("127.255.0.1")), "host bits are dropped");
        assert!(t.contains(ip("::ffff:127.0.0.1")), "IPv4-mapped");
        assert!(!t.contains(ip("128.0.0.1")));
    }
}
