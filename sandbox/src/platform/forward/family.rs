//! The address-family decisions of the data plane (docs/platform-api.md, "IPv6"). Pure.
//!
//! A rule listens on every public IP of its LB; which address of a backend a client goes
//! to follows the family of the public address it reached, not the client's.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// The family of a public address a rule listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn of(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// The backend address a client of the `family` public address is forwarded to: the
/// backend's `private_ip` for IPv4, its `private_ipv6` for IPv6 (`None`: the backend gets
/// no IPv6 traffic).
pub(crate) fn target(family: Family, private_ip: IpAddr, private_ipv6: Option<Ipv6Addr>) -> Option<IpAddr> {
    match family {
        Family::V4 => Some(private_ip),
        Family::V6 => private_ipv6.map(IpAddr::V6),
    }
}

/// Where a backend's health checks go: its `private_ip`, or its `private_ipv6` when the
/// LB is IPv6-only (`check_ipv6`); `None`: nothing to check (counts as a failure).
pub(crate) fn check_target(check_ipv6: bool, private_ip: IpAddr, private_ipv6: Option<Ipv6Addr>) -> Option<IpAddr> {
    if check_ipv6 {
        private_ipv6.map(IpAddr::V6)
    } else {
        Some(private_ip)
    }
}

/// Whether `client` may use a rule with these `allowed_sources`: when the list is empty, or
/// a CIDR of the client's family contains it (a CIDR never contains an address of the
/// other family, so a list of IPv4 CIDRs refuses every IPv6 client). An IPv4-mapped IPv6
/// client (`::ffff:a.b.c.d`) is matched as the IPv4 address.
pub(crate) fn source_allowed(allowed: &[IpNet], client: IpAddr) -> bool {
    let client = client.to_canonical();
    allowed.is_empty() || allowed.iter().any(|net| net.contains(&client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_of_listen_addresses() {
        assert_eq!(Family::of("127.203.0.10:80".parse().unwrap()), Family::V4);
        assert_eq!(Family::of("[fd00:203::10]:80".parse().unwrap()), Family::V6);
    }

    #[test]
    fn clients_go_to_the_address_of_the_family_they_reached() {
        let v4 = ip("127.10.0.11");
        let v6: Ipv6Addr = "fd00:10::b".parse().unwrap();
        assert_eq!(target(Family::V4, v4, Some(v6)), Some(v4));
        assert_eq!(target(Family::V6, v4, Some(v6)), Some(IpAddr::V6(v6)));
        // A backend without private_ipv6 gets no IPv6 traffic, and still its IPv4 traffic.
        assert_eq!(target(Family::V6, v4, None), None);
        assert_eq!(target(Family::V4, v4, None), Some(v4));
    }

    #[test]
    fn checks_go_to_private_ip_unless_the_lb_is_ipv6_only() {
        let v4 = ip("127.10.0.11");
        let v6: Ipv6Addr = "fd00:10::b".parse().unwrap();
        assert_eq!(check_target(false, v4, Some(v6)), Some(v4));
        assert_eq!(check_target(true, v4, Some(v6)), Some(IpAddr::V6(v6)));
        assert_eq!(check_target(true, v4, None), None);
    }

    #[test]
    fn an_empty_list_allows_everyone() {
        assert!(source_allowed(&[], ip("203.0.113.7")));
        assert!(source_allowed(&[], ip("2001:db8::7")));
    }

    #[test]
    fn sources_are_matched_within_their_family() {
        let mixed = nets(&["10.0.0.0/8", "fd00:99::/64"]);
        assert!(source_allowed(&mixed, ip("10.1.2.3")));
        assert!(source_allowed(&mixed, ip("fd00:99::5")));
        assert!(!source_allowed(&mixed, ip("11.0.0.1")));
        assert!(!source_allowed(&mixed, ip("fd00:98::5")));
        // Only IPv4 CIDRs: every IPv6 client is refused, and the other way round.
        let v4_only = nets(&["0.0.0.0/0"]);
        assert!(source_allowed(&v4_only, ip("198.51.100.1")));
        assert!(!source_allowed(&v4_only, ip("::1")));
        let v6_only = nets(&["::/0"]);
        assert!(source_allowed(&v6_only, ip("2001:db8::1")));
        assert!(!source_allowed(&v6_only, ip("198.51.100.1")));
    }

    #[test]
    fn ipv4_mapped_clients_count_as_ipv4() {
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert!(source_allowed(&nets(&["10.0.0.0/8"]), mapped));
        assert!(!source_allowed(&nets(&["::/0"]), mapped));
        assert!(!source_allowed(&nets(&["::ffff:0:0/96"]), mapped));
    }
}
