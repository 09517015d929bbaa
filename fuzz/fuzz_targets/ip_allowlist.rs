//! IP allowlists, as origin parses them on create and update and the edge reads them back from
//! a record. The first line is an allowlist (entries separated by spaces), the rest client
//! addresses. Never panics; a parsed list prints and reparses to itself; an address is allowed
//! exactly when some entry's network holds it, checked here bit by bit, independently, except
//! that an IPv4 address in 240.0.0.0/4 (Cloudflare's Pseudo IPv4, standing for an IPv6 client)
//! matches no entry.
#![no_main]

use std::net::IpAddr;

use latchkey_shared::ip::{IpAllowlist, parse_client};
use libfuzzer_sys::fuzz_target;

/// The address as 128 bits (IPv4 in the low 32, as its own family) and its width.
fn bits(address: IpAddr) -> (u128, u32, bool) {
    match address.to_canonical() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32, true),
        IpAddr::V6(a) => (u128::from(a), 128, false),
    }
}

fuzz_target!(|text: &str| {
    let mut lines = text.lines();
    let entries: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split(' ')
        .filter(|e| !e.is_empty())
        .collect();
    let Ok(list) = IpAllowlist::parse(&entries) else {
        return;
    };
    let printed = list.to_strings();
    assert_eq!(IpAllowlist::parse(&printed).expect("printed list reparses"), list);
    for client in lines.filter_map(parse_client) {
        let (value, width, v4) = bits(client);
        let pseudo_ipv4 = v4 && value >> 28 == 0xf;
        let expected = list.is_empty()
            || !pseudo_ipv4 && printed.iter().any(|entry| {
                let (network, prefix) = entry.split_once('/').unwrap_or((entry, ""));
                let network: IpAddr = network.parse().expect("printed network parses");
                let (network, network_width, network_v4) = match network {
                    IpAddr::V4(a) => (u128::from(u32::from(a)), 32, true),
                    IpAddr::V6(a) => (u128::from(a), 128, false),
                };
                let prefix: u32 = if prefix.is_empty() { network_width } else { prefix.parse().expect("prefix") };
                network_v4 == v4
                    && network_width == width
                    && (0..prefix).all(|i| {
                        let bit = width - 1 - i;
                        (value >> bit) & 1 == (network >> bit) & 1
                    })
            });
        assert_eq!(list.allows(client), expected, "{client} against {printed:?}");
    }
});
