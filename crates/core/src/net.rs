//! Which addresses are not the public internet: [`is_private`]. Proxy lists must not point the
//! gateway at its own network (a poisoned list entry `127.0.0.1:6379` would turn every
//! "upstream check" into a request to a local service), and neither may clients (the
//! destination policy).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is loopback, private (RFC 1918), link-local, shared/CGNAT (100.64.0.0/10),
/// unique-local (fc00::/7), multicast, broadcast, unspecified, documentation, benchmarking or
/// otherwise reserved: anything but a global unicast address. IPv4-mapped and -compatible
/// IPv6 addresses are judged as the IPv4 address they carry.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_private_v4(v4),
            None => is_private_v6(v6),
        },
    }
}

/// Names that are this machine or its network whatever DNS says: `localhost` and
/// `*.localhost`, `.local` (mDNS), `.internal`, `.lan`, `.home.arpa`.
pub fn is_local_name(name: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    n == "localhost"
        || n.ends_with(".localhost")
        || n.ends_with(".local")
        || n.ends_with(".internal")
        || n.ends_with(".lan")
        || n.ends_with(".home.arpa")
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || a == 0                                  // "this network"
        || (a == 100 && (64..128).contains(&b))    // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0)          // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19))      // benchmarking
        || a >= 240 // reserved
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00                // unique local
        || (s[0] & 0xffc0) == 0xfe80                // link-local
        || (s[0] & 0xffc0) == 0xfec0                // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8)       // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
        || (s[0..6] == [0, 0, 0, 0, 0, 0] && s[6] != 0) // IPv4-compatible (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(s: &str) -> bool {
        is_private(s.parse().unwrap())
    }

    #[test]
    fn private_ranges() {
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "192.0.2.5",
            "198.51.100.7",
            "203.0.113.4",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
        ] {
            assert!(private(s), "{s} is not public");
        }
    }

    #[test]
    fn local_names() {
        assert!(is_local_name("LOCALHOST.") && is_local_name("db.internal"));
        assert!(is_local_name("printer.local") && is_local_name("a.b.localhost"));
        assert!(!is_local_name("proxy.example.com") && !is_local_name("localhost.example"));
    }

    #[test]
    fn public_addresses() {
        for s in [
            "8.8.8.8",
            "45.167.124.5",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "2a00:1450:4001::1",
            "::ffff:8.8.4.4",
        ] {
            assert!(!private(s), "{s} is public");
        }
    }
}
