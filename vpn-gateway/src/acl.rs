//! Access control: the peers' allow rules compiled against the Service catalog into a
//! lookup checked on every decrypted packet. Default deny.
//!
//! Keyed by the peer's (IPv4) tunnel address, which is unique among accepted peers and
//! which a packet's source must equal (anti-spoofing) before anything else is looked at; an
//! IPv6 packet's source must be the peer's IPv6 tunnel address. A peer's rules cover every
//! ClusterIP of a Service, so both families of a dual-stack one. A peer's
//! rules are its own and its access policies' ([`crate::policy`]); each compiled port
//! remembers the rule that allows it, for the audit log and [`Acl::explain`], in the same
//! single lookup a packet gets.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use foldhash::HashMap;

use crate::catalog::Catalog;
use crate::crd::PortRef;
use crate::packet::{PROTO_ICMP, PROTO_ICMPV6, Packet};
use crate::peers::AcceptedPeer;
use crate::policy::{RuleSource, SourcedRule, own_rules};

/// The decision for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To an allowed Service port (or ICMP to an allowed ClusterIP).
    Allow,
    /// To the gateway's own tunnel address (DNS, ping).
    Local,
    /// The source is not the peer's own tunnel address.
    Spoofed,
    /// Not allowed by the peer's rules.
    Denied,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allow => "allowed",
            Verdict::Local => "local",
            Verdict::Spoofed => "spoofed",
            Verdict::Denied => "not_allowed",
        }
    }
}

#[derive(Default, Debug)]
struct PeerRules {
    /// (destination, IP protocol, port) → the rule that allows it (index into `sources`).
    ports: HashMap<(IpAddr, u8, u16), u32>,
    /// ClusterIPs with at least one allowed port: ICMP echo is answered.
    hosts: HashMap<IpAddr, u32>,
    /// (namespace, name) → allowed port indices into the Service's ports (for DNS/SRV).
    services: HashMap<(String, String), Vec<usize>>,
    /// Where each rule came from, by rule index.
    sources: Vec<RuleSource>,
}

/// The compiled rules of every accepted peer.
#[derive(Default, Debug)]
pub struct Acl {
    gateway: Option<Ipv4Addr>,
    /// The gateway's IPv6 tunnel address.
    gateway_v6: Option<Ipv6Addr>,
    /// Each peer's IPv6 tunnel address, by its IPv4 one (its identity here).
    v6_of: HashMap<Ipv4Addr, Ipv6Addr>,
    /// Peers with the same rules share one compiled copy (typically most of them: a few
    /// hundred bytes of hash sets each otherwise, megabytes at 10,000 peers).
    peers: HashMap<Ipv4Addr, Arc<PeerRules>>,
}

/// Why [`Acl::explain`] denies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// No rule of the peer or of a policy selecting it allows it.
    NoRule,
    /// The peer is not served (the reason), so it reaches nothing.
    PeerNotServed(String),
    /// No such Service.
    NoSuchService,
    /// The Service has no such port.
    NoSuchPort,
}

/// Whether a peer may reach a Service port, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Explanation {
    Allowed { by: RuleSource },
    Denied(DenyReason),
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Explanation::Allowed { by } => write!(f, "allowed by {by}"),
            Explanation::Denied(DenyReason::NoRule) => f.write_str("denied: no rule"),
            Explanation::Denied(DenyReason::PeerNotServed(why)) => write!(f, "denied: the peer is not served ({why})"),
            Explanation::Denied(DenyReason::NoSuchService) => f.write_str("denied: no such Service"),
            Explanation::Denied(DenyReason::NoSuchPort) => f.write_str("denied: the Service has no such port"),
        }
    }
}

impl Acl {
    /// Compile `peers`' own rules against `catalog`; `gateway` is the gateway's tunnel
    /// address. Policies are not applied: see [`Acl::compile_effective`].
    pub fn compile(gateway: Ipv4Addr, peers: &[AcceptedPeer], catalog: &Catalog) -> Self {
        let own: Vec<Vec<SourcedRule>> = peers.iter().map(|p| own_rules(&p.rules)).collect();
        Acl::compile_effective(
            gateway,
            peers.iter().map(|p| p.address).zip(own.iter().map(|r| r.as_slice())),
            catalog,
        )
    }

    /// Compile each peer's effective rules (its own and its policies', as
    /// [`crate::policy::effective`] gives them) against `catalog`. Equal rule lists are
    /// compiled once and shared.
    pub fn compile_effective<'r>(
        gateway: Ipv4Addr,
        peers: impl IntoIterator<Item = (Ipv4Addr, &'r [SourcedRule])>,
        catalog: &Catalog,
    ) -> Self {
        let peers = peers.into_iter();
        let mut acl = Acl {
            gateway: Some(gateway),
            peers: HashMap::with_capacity_and_hasher(peers.size_hint().0, Default::default()),
            ..Default::default()
        };
        let mut compiled: HashMap<&[SourcedRule], Arc<PeerRules>> = HashMap::default();
        for (address, rules) in peers {
            if let Some(r) = compiled.get(rules) {
                acl.peers.insert(address, r.clone());
                continue;
            }
            let r = Arc::new(compile_rules(rules, catalog));
            compiled.insert(rules, r.clone());
            acl.peers.insert(address, r);
        }
        acl
    }

    /// The IPv6 side: the gateway's IPv6 tunnel address and each peer's (by its IPv4
    /// address), what IPv6 packets' sources and local destinations are checked against.
    pub fn with_ipv6(mut self, gateway: Ipv6Addr, peers: impl IntoIterator<Item = (Ipv4Addr, Ipv6Addr)>) -> Self {
        self.gateway_v6 = Some(gateway);
        self.v6_of = peers.into_iter().collect();
        self
    }

    /// The IPv6 tunnel address of the peer at `peer`.
    pub fn peer_v6(&self, peer: Ipv4Addr) -> Option<Ipv6Addr> {
        self.v6_of.get(&peer).copied()
    }

    /// Whether `a` is one of the gateway's own tunnel addresses.
    pub fn is_gateway(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.gateway == Some(a),
            IpAddr::V6(a) => self.gateway_v6 == Some(a),
        }
    }

    /// How many distinct compiled rule sets the peers share.
    pub fn distinct_rule_sets(&self) -> usize {
        let mut seen: HashSet<*const PeerRules> = HashSet::new();
        for r in self.peers.values() {
            seen.insert(Arc::as_ptr(r));
        }
        seen.len()
    }

    /// The verdict for a packet that came out of the tunnel of the peer at `peer`.
    pub fn check(&self, peer: Ipv4Addr, pkt: &Packet<'_>) -> Verdict {
        let own = match pkt.src {
            IpAddr::V4(a) => a == peer,
            IpAddr::V6(a) => self.v6_of.get(&peer) == Some(&a),
        };
        if !own {
            return Verdict::Spoofed;
        }
        let Some(rules) = self.peers.get(&peer) else {
            return Verdict::Denied;
        };
        if self.is_gateway(pkt.dst) {
            return Verdict::Local;
        }
        match pkt.proto {
            PROTO_ICMP | PROTO_ICMPV6 if rules.hosts.contains_key(&pkt.dst) => Verdict::Allow,
            proto => match pkt.dst_port() {
                Some(port) if rules.ports.contains_key(&(pkt.dst, proto, port)) => Verdict::Allow,
                _ => Verdict::Denied,
            },
        }
    }

    /// The rule that lets the peer at `peer` reach `dst` (`port` of IP protocol `proto`;
    /// ICMP has none): the first of its own rules, then of its policies. Asked when a flow
    /// opens (for its audit line), not per packet.
    pub fn allowed_by(&self, peer: Ipv4Addr, dst: IpAddr, proto: u8, port: Option<u16>) -> Option<&RuleSource> {
        let rules = self.peers.get(&peer)?;
        let i = match (proto, port) {
            (PROTO_ICMP | PROTO_ICMPV6, _) => rules.hosts.get(&dst)?,
            (_, Some(port)) => rules.ports.get(&(dst, proto, port))?,
            (_, None) => return None,
        };
        rules.sources.get(*i as usize)
    }

    /// Whether the peer at `peer` may reach `namespace/service:port` and by which rule: the
    /// lookup a packet to the Service's ClusterIP gets (any protocol the port has).
    pub fn explain(
        &self,
        catalog: &Catalog,
        peer: Ipv4Addr,
        namespace: &str,
        service: &str,
        port: &PortRef,
    ) -> Explanation {
        let Some(svc) = catalog.get(namespace, service) else {
            return Explanation::Denied(DenyReason::NoSuchService);
        };
        let ports: Vec<&crate::catalog::ServicePort> = svc
            .ports
            .iter()
            .filter(|sp| match port {
                PortRef::Number(n) => sp.port == *n,
                PortRef::Name(n) => sp.name.as_deref() == Some(n.as_str()),
            })
            .collect();
        if ports.is_empty() {
            return Explanation::Denied(DenyReason::NoSuchPort);
        }
        let Some(ip) = svc.cluster_ip else {
            return Explanation::Denied(DenyReason::NoRule);
        };
        for sp in ports {
            if let Some(by) = self.allowed_by(peer, ip, sp.protocol.ip_proto(), Some(sp.port)) {
                return Explanation::Allowed { by: by.clone() };
            }
        }
        Explanation::Denied(DenyReason::NoRule)
    }

    /// Whether the peer at `peer` may reach a port of the Service (for DNS answers).
    pub fn may_resolve(&self, peer: Ipv4Addr, namespace: &str, name: &str) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|r| r.services.contains_key(&(namespace.to_string(), name.to_string())))
    }

    /// The indices of the Service's ports the peer may reach.
    pub fn allowed_ports(&self, peer: Ipv4Addr, namespace: &str, name: &str) -> &[usize] {
        self.peers
            .get(&peer)
            .and_then(|r| r.services.get(&(namespace.to_string(), name.to_string())))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }
}

/// One rule list against the catalog. Where several rules allow the same port the first
/// one is named (own rules come before policies').
fn compile_rules(rules: &[SourcedRule], catalog: &Catalog) -> PeerRules {
    let mut r = PeerRules {
        sources: rules.iter().map(|s| s.source.clone()).collect(),
        ..Default::default()
    };
    for (index, sourced) in rules.iter().enumerate() {
        let rule = &sourced.rule;
        let index = index as u32;
        for svc in catalog.services() {
            if svc.namespace != rule.namespace || rule.service.as_ref().is_some_and(|n| *n != svc.name) {
                continue;
            }
            let allowed: Vec<usize> = svc
                .ports
                .iter()
                .enumerate()
                .filter(|(_, sp)| match &rule.ports {
                    None => true,
                    Some(list) => list.iter().any(|pr| match pr {
                        PortRef::Number(n) => *n == sp.port,
                        PortRef::Name(n) => sp.name.as_deref() == Some(n.as_str()),
                    }),
                })
                .map(|(i, _)| i)
                .collect();
            if allowed.is_empty() {
                continue;
            }
            for ip in svc.addresses().filter(|ip| !catalog.is_ambiguous(ip)) {
                for &i in &allowed {
                    let sp = &svc.ports[i];
                    r.ports.entry((ip, sp.protocol.ip_proto(), sp.port)).or_insert(index);
                }
                r.hosts.entry(ip).or_insert(index);
            }
            let e = r.services.entry((svc.namespace.clone(), svc.name.clone())).or_default();
            e.extend(allowed);
            e.sort_unstable();
            e.dedup();
        }
    }
    r
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::Service;
    use crate::catalog::tests::catalog;
    use crate::keys::PrivateKey;
    use crate::packet::tests::{ipv4, tcp, udp};
    use crate::packet::{PROTO_TCP, PROTO_UDP, TCP_SYN, parse};
    use crate::peers::{PeerId, Rule};

    pub(crate) fn peer(addr: [u8; 4], rules: Vec<Rule>) -> AcceptedPeer {
        AcceptedPeer {
            id: PeerId::new("default", format!("p{}", addr[3])),
            public_key: PrivateKey::generate().public_key(),
            address: Ipv4Addr::from(addr),
            address_v6: None,
            rules,
            preshared_key: None,
            expires_at: None,
        }
    }

    fn rule(ns: &str, svc: Option<&str>, ports: Option<Vec<PortRef>>) -> Rule {
        Rule {
            namespace: ns.into(),
            service: svc.map(Into::into),
            ports,
        }
    }

    fn gw() -> Ipv4Addr {
        Ipv4Addr::new(100, 64, 0, 1)
    }

    #[test]
    fn default_deny_and_allowed_ports() {
        let a = peer(
            [100, 64, 0, 2],
            vec![rule("default", Some("web"), Some(vec![PortRef::Name("http".into())]))],
        );
        let b = peer([100, 64, 0, 3], vec![]);
        let acl = Acl::compile(gw(), &[a.clone(), b.clone()], &catalog());
        let syn = |src: [u8; 4], dst: [u8; 4], port| ipv4(src, dst, PROTO_TCP, &tcp(1234, port, TCP_SYN));
        let check = |peer: Ipv4Addr, p: &[u8]| acl.check(peer, &parse(p).unwrap());
        assert_eq!(
            check(a.address, &syn([100, 64, 0, 2], [127, 96, 0, 10], 80)),
            Verdict::Allow
        );
        assert_eq!(
            check(a.address, &syn([100, 64, 0, 2], [127, 96, 0, 10], 9090)),
            Verdict::Denied
        );
        assert_eq!(
            check(a.address, &syn([100, 64, 0, 2], [127, 96, 1, 5], 5432)),
            Verdict::Denied
        );
        assert_eq!(
            check(b.address, &syn([100, 64, 0, 3], [127, 96, 0, 10], 80)),
            Verdict::Denied
        );
        // UDP to a TCP port is not the same thing.
        let u = ipv4([100, 64, 0, 2], [127, 96, 0, 10], PROTO_UDP, &udp(1, 80, b""));
        assert_eq!(check(a.address, &u), Verdict::Denied);
        // ICMP to an allowed ClusterIP only.
        let ping = |dst| ipv4([100, 64, 0, 2], dst, PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(check(a.address, &ping([127, 96, 0, 10])), Verdict::Allow);
        assert_eq!(check(a.address, &ping([127, 96, 1, 5])), Verdict::Denied);
        // The gateway itself.
        assert_eq!(check(a.address, &ping([100, 64, 0, 1])), Verdict::Local);
        // Unknown peer.
        assert_eq!(
            check(
                Ipv4Addr::new(100, 64, 0, 9),
                &syn([100, 64, 0, 9], [127, 96, 0, 10], 80)
            ),
            Verdict::Denied
        );
    }

    #[test]
    fn a_cluster_ip_two_services_claim_is_granted_by_neither() {
        let a = peer([100, 64, 0, 2], vec![rule("default", Some("web"), None)]);
        let syn = ipv4([100, 64, 0, 2], [127, 96, 0, 10], PROTO_TCP, &tcp(1234, 80, TCP_SYN));
        let mut services: Vec<Service> = catalog().services().cloned().collect();
        services.sort_by(|x, y| x.name.cmp(&y.name));
        // `other` got web's address (web deleted, the cache not told yet): in both orders.
        let mut other = services[0].clone();
        other.name = "other".into();
        other.cluster_ip = services.iter().find(|s| s.name == "web").unwrap().cluster_ip;
        for other_first in [true, false] {
            let mut list = services.clone();
            if other_first {
                list.insert(0, other.clone());
            } else {
                list.push(other.clone());
            }
            let c = Catalog::new(list);
            let acl = Acl::compile(gw(), std::slice::from_ref(&a), &c);
            assert_eq!(
                acl.check(a.address, &parse(&syn).unwrap()),
                Verdict::Denied,
                "other first: {other_first}"
            );
            assert!(c.by_ip("127.96.0.10".parse().unwrap()).is_none());
            assert!(c.get("default", "web").is_some(), "still known by name");
        }
        // Settled: web alone again.
        let acl = Acl::compile(gw(), std::slice::from_ref(&a), &Catalog::new(services));
        assert_eq!(acl.check(a.address, &parse(&syn).unwrap()), Verdict::Allow);
    }

    #[test]
    fn peers_with_the_same_rules_share_one_compiled_copy() {
        let web = || vec![rule("default", Some("web"), None)];
        let a = peer([100, 64, 0, 2], web());
        let b = peer([100, 64, 0, 3], web());
        let c = peer([100, 64, 0, 4], vec![rule("db", None, None)]);
        let acl = Acl::compile(gw(), &[a.clone(), b.clone(), c.clone()], &catalog());
        assert!(Arc::ptr_eq(&acl.peers[&a.address], &acl.peers[&b.address]));
        assert!(!Arc::ptr_eq(&acl.peers[&a.address], &acl.peers[&c.address]));
        assert_eq!(acl.distinct_rule_sets(), 2);
        let syn = |src: [u8; 4], dst: [u8; 4], port| ipv4(src, dst, PROTO_TCP, &tcp(1234, port, TCP_SYN));
        let check = |peer: Ipv4Addr, p: &[u8]| acl.check(peer, &parse(p).unwrap());
        // Shared rules still check each peer's own source address.
        assert_eq!(
            check(b.address, &syn([100, 64, 0, 3], [127, 96, 0, 10], 80)),
            Verdict::Allow
        );
        assert_eq!(
            check(b.address, &syn([100, 64, 0, 2], [127, 96, 0, 10], 80)),
            Verdict::Spoofed
        );
        assert_eq!(
            check(c.address, &syn([100, 64, 0, 4], [127, 96, 0, 10], 80)),
            Verdict::Denied
        );
        assert_eq!(
            check(c.address, &syn([100, 64, 0, 4], [127, 96, 1, 5], 5432)),
            Verdict::Allow
        );
        assert_eq!(
            check(a.address, &syn([100, 64, 0, 2], [127, 96, 1, 5], 5432)),
            Verdict::Denied
        );
    }

    #[test]
    fn each_allowed_port_names_the_first_rule_that_allows_it() {
        use crate::policy::{PolicyId, RuleSource, SourcedRule};
        let sourced = |r: Rule, source: RuleSource| SourcedRule { rule: r, source };
        let policy = RuleSource::Policy(PolicyId::new("default", "jit"));
        let rules = vec![
            sourced(
                rule("default", Some("web"), Some(vec![PortRef::Number(80)])),
                RuleSource::Own(0),
            ),
            sourced(rule("default", None, None), policy.clone()),
        ];
        let a = Ipv4Addr::new(100, 64, 0, 2);
        let acl = Acl::compile_effective(gw(), [(a, rules.as_slice())], &catalog());
        let web: IpAddr = "127.96.0.10".parse().unwrap();
        assert_eq!(acl.allowed_by(a, web, PROTO_TCP, Some(80)), Some(&RuleSource::Own(0)));
        assert_eq!(acl.allowed_by(a, web, PROTO_TCP, Some(9090)), Some(&policy));
        assert_eq!(acl.allowed_by(a, web, PROTO_ICMP, None), Some(&RuleSource::Own(0)));
        assert_eq!(
            acl.allowed_by(a, "127.96.1.5".parse().unwrap(), PROTO_TCP, Some(5432)),
            None
        );
        assert_eq!(
            acl.allowed_by(Ipv4Addr::new(100, 64, 0, 9), web, PROTO_TCP, Some(80)),
            None
        );
        let c = catalog();
        let explain = |svc: &str, port| acl.explain(&c, a, "default", svc, &port);
        assert_eq!(
            explain("web", PortRef::Name("metrics".into())),
            Explanation::Allowed { by: policy.clone() }
        );
        assert_eq!(
            explain("dns", PortRef::Number(53)),
            Explanation::Allowed { by: policy.clone() },
            "UDP ports too"
        );
        assert_eq!(
            explain("web", PortRef::Number(1)),
            Explanation::Denied(DenyReason::NoSuchPort)
        );
        assert_eq!(
            acl.explain(&c, a, "db", "pg", &PortRef::Number(5432)),
            Explanation::Denied(DenyReason::NoRule)
        );
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_packets_follow_the_same_rules() {
        use crate::catalog::tests::dual_catalog;
        use crate::packet::PROTO_ICMPV6;
        use crate::packet::tests::ipv6;
        let mut a = peer(
            [100, 64, 0, 2],
            vec![rule("default", Some("web"), Some(vec![PortRef::Name("http".into())]))],
        );
        a.address_v6 = Some(v6("fd6b:7261:7961::2"));
        let mut b = peer([100, 64, 0, 3], vec![rule("default", None, None)]);
        b.address_v6 = Some(v6("fd6b:7261:7961::3"));
        // A peer served without an IPv6 address (a follower whose leader granted none).
        let c = peer([100, 64, 0, 4], vec![rule("default", None, None)]);
        let peers = [a.clone(), b.clone(), c.clone()];
        let acl = Acl::compile(gw(), &peers, &dual_catalog()).with_ipv6(
            v6("fd6b:7261:7961::1"),
            peers.iter().filter_map(|p| Some((p.address, p.address_v6?))),
        );
        let check = |peer: &AcceptedPeer, src: &str, dst: &str, proto: u8, l4: &[u8]| {
            acl.check(peer.address, &parse(&ipv6(src, dst, proto, l4)).unwrap())
        };
        let syn = |port| tcp(40000, port, TCP_SYN);
        let (a6, b6) = ("fd6b:7261:7961::2", "fd6b:7261:7961::3");
        let echo = [128, 0, 0, 0, 0, 1, 0, 1];
        for (who, src, dst, proto, l4, want) in [
            (&a, a6, "fd00:96::a", PROTO_TCP, syn(80), Verdict::Allow),
            (&a, a6, "fd00:96::a", PROTO_TCP, syn(9090), Verdict::Denied),
            (&a, a6, "fd00:96::1:5", PROTO_TCP, syn(5432), Verdict::Denied),
            (&a, a6, "fd00:96::6", PROTO_TCP, syn(8080), Verdict::Denied),
            (&b, b6, "fd00:96::6", PROTO_TCP, syn(8080), Verdict::Allow),
            (&b, b6, "fd00:96::a", PROTO_TCP, syn(9090), Verdict::Allow),
            (&a, a6, "fd00:96::a", PROTO_ICMPV6, echo.to_vec(), Verdict::Allow),
            (&a, a6, "fd00:96::1:5", PROTO_ICMPV6, echo.to_vec(), Verdict::Denied),
            (&a, a6, "fd6b:7261:7961::1", PROTO_UDP, udp(1, 53, b""), Verdict::Local),
            // Another peer's address, an unknown one, the IPv4-mapped form of its own.
            (&a, b6, "fd00:96::a", PROTO_TCP, syn(80), Verdict::Spoofed),
            (
                &a,
                "fd6b:7261:7961::99",
                "fd00:96::a",
                PROTO_TCP,
                syn(80),
                Verdict::Spoofed,
            ),
            (
                &a,
                "::ffff:100.64.0.2",
                "fd00:96::a",
                PROTO_TCP,
                syn(80),
                Verdict::Spoofed,
            ),
            // No IPv6 address: every IPv6 packet of it is spoofed.
            (
                &c,
                "fd6b:7261:7961::4",
                "fd00:96::a",
                PROTO_TCP,
                syn(80),
                Verdict::Spoofed,
            ),
        ] {
            assert_eq!(
                check(who, src, dst, proto, &l4),
                want,
                "{} {src} -> {dst} {l4:?}",
                who.id
            );
        }
        // IPv4 is unchanged, and the rule that allows is the same for both families.
        let p = ipv4([100, 64, 0, 2], [127, 96, 0, 10], PROTO_TCP, &tcp(1, 80, TCP_SYN));
        assert_eq!(acl.check(a.address, &parse(&p).unwrap()), Verdict::Allow);
        assert_eq!(
            acl.allowed_by(a.address, "fd00:96::a".parse().unwrap(), PROTO_TCP, Some(80)),
            acl.allowed_by(a.address, "127.96.0.10".parse().unwrap(), PROTO_TCP, Some(80)),
        );
        assert!(
            acl.allowed_by(a.address, "fd00:96::a".parse().unwrap(), PROTO_TCP, Some(80))
                .is_some()
        );
        assert_eq!(acl.peer_v6(a.address), a.address_v6);
        assert_eq!(acl.peer_v6(c.address), None);
    }

    #[test]
    fn spoofed_sources_are_caught_first() {
        let a = peer([100, 64, 0, 2], vec![rule("default", None, None)]);
        let b = peer([100, 64, 0, 3], vec![rule("default", None, None)]);
        let acl = Acl::compile(gw(), &[a.clone(), b], &catalog());
        let p = ipv4([100, 64, 0, 3], [127, 96, 0, 10], PROTO_TCP, &tcp(1, 80, TCP_SYN));
        assert_eq!(acl.check(a.address, &parse(&p).unwrap()), Verdict::Spoofed);
    }

    #[test]
    fn whole_namespace_and_dns_visibility() {
        let a = peer([100, 64, 0, 2], vec![rule("default", None, None)]);
        let acl = Acl::compile(gw(), std::slice::from_ref(&a), &catalog());
        assert!(acl.may_resolve(a.address, "default", "web"));
        assert!(acl.may_resolve(a.address, "default", "dns"));
        assert!(!acl.may_resolve(a.address, "db", "pg"));
        assert_eq!(acl.allowed_ports(a.address, "default", "web"), &[0, 1]);
        let u = ipv4([100, 64, 0, 2], [127, 96, 0, 53], PROTO_UDP, &udp(1, 53, b""));
        assert_eq!(acl.check(a.address, &parse(&u).unwrap()), Verdict::Allow);
    }

    #[test]
    fn recompiling_without_a_service_denies_it() {
        let a = peer([100, 64, 0, 2], vec![rule("default", Some("web"), None)]);
        let p = ipv4([100, 64, 0, 2], [127, 96, 0, 10], PROTO_TCP, &tcp(1, 80, TCP_SYN));
        let acl = Acl::compile(gw(), std::slice::from_ref(&a), &catalog());
        assert_eq!(acl.check(a.address, &parse(&p).unwrap()), Verdict::Allow);
        let without: Vec<Service> = catalog().services().filter(|s| s.name != "web").cloned().collect();
        let acl = Acl::compile(gw(), std::slice::from_ref(&a), &Catalog::new(without));
        assert_eq!(acl.check(a.address, &parse(&p).unwrap()), Verdict::Denied);
    }
}
