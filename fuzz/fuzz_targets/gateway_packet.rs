//! The gateway's packet path: a decrypted packet as it comes out of a peer's tunnel is
//! parsed (`packet::parse`), judged (`Acl::check`) and, for pings, answered
//! (`packet::echo_reply`, ICMP and ICMPv6). Input: the packet's bytes, IPv4 or IPv6.
//!
//! Besides "never panics", the verdicts are checked against the rules written out by
//! hand below: a packet is only ever allowed to a (ClusterIP, protocol, port) the peer's
//! rules name, of either family of a dual-stack Service, from the peer's own tunnel
//! address of the packet's family; echo replies carry valid checksums (ICMPv6's over the
//! pseudo-header).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use kuberaya_gateway::acl::{Acl, Verdict};
use kuberaya_gateway::catalog::{Catalog, Protocol, Service, ServicePort};
use kuberaya_gateway::crd::PortRef;
use kuberaya_gateway::keys::PublicKey;
use kuberaya_gateway::packet::{self, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Transport};
use kuberaya_gateway::peers::{AcceptedPeer, PeerId, Rule};
use libfuzzer_sys::fuzz_target;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd6b, 0x7261, 0x7961, 0, 0, 0, 0, 1);
/// May reach `default/web` port `http` (TCP 80) and all of `default/dns` (UDP 53).
const PEER_A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// No rules: default deny.
const PEER_B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
/// Their IPv6 tunnel addresses (the seeds use A's).
const PEER_A6: Ipv6Addr = Ipv6Addr::new(0xfd6b, 0x7261, 0x7961, 0, 0, 0, 0, 2);
const PEER_B6: Ipv6Addr = Ipv6Addr::new(0xfd6b, 0x7261, 0x7961, 0, 0, 0, 0, 3);
const WEB: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 96, 0, 10));
/// web is dual-stack.
const WEB6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0xa));
const DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 96, 0, 53));

/// A Service with ClusterIPs `ips` (the first is the primary).
fn service(ns: &str, name: &str, ips: &[&str], ports: &[(Option<&str>, u16, Protocol)]) -> Service {
    let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
    Service {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: ips.first().copied(),
        cluster_ips: ips,
        ports: ports
            .iter()
            .map(|&(name, port, protocol)| ServicePort {
                name: name.map(Into::into),
                port,
                protocol,
            })
            .collect(),
    }
}

fn peer(address: Ipv4Addr, address_v6: Ipv6Addr, rules: Vec<Rule>) -> AcceptedPeer {
    AcceptedPeer {
        id: PeerId::new("default", address.to_string()),
        public_key: PublicKey([address.octets()[3]; 32]),
        address,
        address_v6: Some(address_v6),
        rules,
        preshared_key: None,
        expires_at: None,
    }
}

static ACL: LazyLock<Acl> = LazyLock::new(|| {
    let catalog = Catalog::new([
        service(
            "default",
            "web",
            &["127.96.0.10", "fd00:96::a"],
            &[
                (Some("http"), 80, Protocol::Tcp),
                (Some("metrics"), 9090, Protocol::Tcp),
            ],
        ),
        service("default", "dns", &["127.96.0.53"], &[(Some("dns"), 53, Protocol::Udp)]),
        service(
            "db",
            "pg",
            &["127.96.1.5", "fd00:96::1:5"],
            &[(None, 5432, Protocol::Tcp)],
        ),
        service("v6", "api", &["fd00::10"], &[(None, 443, Protocol::Tcp)]),
    ]);
    let a = peer(
        PEER_A,
        PEER_A6,
        vec![
            Rule {
                namespace: "default".into(),
                service: Some("web".into()),
                ports: Some(vec![PortRef::Name("http".into())]),
            },
            Rule {
                namespace: "default".into(),
                service: Some("dns".into()),
                ports: None,
            },
        ],
    );
    let peers = [a, peer(PEER_B, PEER_B6, vec![])];
    Acl::compile(GATEWAY, &peers, &catalog)
        .with_ipv6(GATEWAY6, peers.iter().filter_map(|p| Some((p.address, p.address_v6?))))
});

/// What peer A may reach, written out independently of `Acl::compile`.
fn a_may_reach(dst: IpAddr, proto: u8, port: Option<u16>) -> bool {
    matches!(
        (dst, proto, port),
        (WEB | WEB6, PROTO_TCP, Some(80))
            | (DNS, PROTO_UDP, Some(53))
            | (WEB | WEB6 | DNS, PROTO_ICMP | PROTO_ICMPV6, _)
    )
}

/// RFC 1071 checksum over `b` (0 when `b` carries a valid checksum).
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fuzz_target!(|data: &[u8]| {
    let Ok(pkt) = packet::parse(data) else {
        assert!(
            packet::echo_reply(data).is_none(),
            "an echo reply to an unparsable packet"
        );
        return;
    };
    assert!(
        pkt.len <= data.len(),
        "length {} beyond the buffer {}",
        pkt.len,
        data.len()
    );
    match pkt.transport {
        Transport::Tcp { payload, .. } | Transport::Udp { payload, .. } => assert!(payload.len() <= pkt.len),
        _ => {}
    }
    for (peer, peer6) in [(PEER_A, PEER_A6), (PEER_B, PEER_B6)] {
        let verdict = ACL.check(peer, &pkt);
        if pkt.src != IpAddr::V4(peer) && pkt.src != IpAddr::V6(peer6) {
            assert_eq!(verdict, Verdict::Spoofed, "{pkt:?} from {peer}");
            continue;
        }
        match verdict {
            Verdict::Spoofed => panic!("own address judged spoofed: {pkt:?}"),
            Verdict::Local => assert!(pkt.dst == IpAddr::V4(GATEWAY) || pkt.dst == IpAddr::V6(GATEWAY6)),
            Verdict::Allow => {
                assert_eq!(peer, PEER_A, "a peer without rules was allowed {pkt:?}");
                assert!(a_may_reach(pkt.dst, pkt.proto, pkt.dst_port()), "allowed {pkt:?}");
            }
            Verdict::Denied => {
                assert!(
                    peer != PEER_A
                        || pkt.dst == IpAddr::V4(GATEWAY)
                        || pkt.dst == IpAddr::V6(GATEWAY6)
                        || !a_may_reach(pkt.dst, pkt.proto, pkt.dst_port()),
                    "denied what the rules allow: {pkt:?}"
                );
            }
        }
    }
    if let Some(reply) = packet::echo_reply(data) {
        let back = packet::parse(&reply).expect("our echo reply parses");
        assert_eq!((back.src, back.dst), (pkt.dst, pkt.src), "addresses swapped");
        if reply[0] >> 4 == 4 {
            assert_eq!(back.proto, PROTO_ICMP);
            assert!(
                matches!(back.transport, Transport::Icmp { kind: 0, code: 0 }),
                "{back:?}"
            );
            let ihl = usize::from(reply[0] & 0x0f) * 4;
            assert_eq!(checksum(&reply[..ihl]), 0, "IPv4 header checksum");
            assert_eq!(checksum(&reply[ihl..]), 0, "ICMP checksum");
        } else {
            assert_eq!(back.proto, PROTO_ICMPV6);
            assert!(
                matches!(back.transport, Transport::Icmp { kind: 129, code: 0 }),
                "{back:?}"
            );
            assert_eq!(reply.len(), 40 + usize::from(u16::from_be_bytes([reply[4], reply[5]])));
            // The pseudo-header (addresses, upper-layer length, next header) and the message.
            let mut pseudo = reply[8..40].to_vec();
            pseudo.extend_from_slice(&((reply.len() - 40) as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
            pseudo.extend_from_slice(&reply[40..]);
            assert_eq!(checksum(&pseudo), 0, "ICMPv6 checksum");
        }
    }
});
