//! `NO_PROXY`, as curl and Go read it.

use std::net::IpAddr;

/// `NO_PROXY`: hosts reached without the proxy. Entries are separated by commas or spaces: `*`
/// (every host), a name that matches itself and its subdomains (`example.org`, `.example.org`),
/// an IP address, or an IP range in CIDR form (`10.0.0.0/8`); an entry may end with `:PORT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<String>,
}

impl NoProxy {
    pub fn parse(list: &str) -> Self {
        Self {
            entries: list
                .split([',', ' '])
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        }
    }

    /// Whether `host` (a name or an IP, without brackets) on `port` is reached directly.
    pub fn bypasses(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (pattern, entry_port) = split_entry_port(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            if let Some((network, bits)) = pattern.split_once('/') {
                return match (ip, network.parse::<IpAddr>(), bits.parse::<u8>()) {
                    (Some(ip), Ok(network), Ok(bits)) => in_network(ip, network, bits),
                    _ => false,
                };
            }
            if let (Some(ip), Ok(entry_ip)) = (ip, pattern.parse::<IpAddr>()) {
                return ip == entry_ip;
            }
            let domain = pattern.trim_start_matches("*.").trim_start_matches('.');
            !domain.is_empty()
                && (host == domain
                    || host
                        .strip_suffix(domain)
                        .is_some_and(|head| head.ends_with('.')))
        })
    }
}

/// `host:443` → (`host`, 443); an IPv6 address without brackets keeps its colons.
fn split_entry_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_network(ip: IpAddr, network: IpAddr, bits: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_names_domains_addresses_ranges_and_ports() {
        let list =
            NoProxy::parse("localhost, .internal.example, example.org,10.0.0.0/8 ::1 intra:7443");
        for (host, port) in [
            ("localhost", 1),
            ("a.internal.example", 1),
            ("internal.example", 1),
            ("EXAMPLE.org", 1),
            ("x.example.org", 1),
            ("10.20.30.40", 1),
            ("::1", 1),
            ("[::1]", 1),
            ("intra", 7443),
        ] {
            assert!(list.bypasses(host, port), "{host}:{port}");
        }
        for (host, port) in [
            ("notexample.org", 1),
            ("11.0.0.1", 1),
            ("coordinator.example.com", 1),
            ("intra", 443),
            ("::2", 1),
        ] {
            assert!(!list.bypasses(host, port), "{host}:{port}");
        }
        assert!(NoProxy::parse("*").bypasses("anything", 1));
        assert!(!NoProxy::parse("").bypasses("anything", 1));
    }
}
