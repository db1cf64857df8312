//! IPv4 forwarding for the TUN data plane, switched on per interface over rtnetlink
//! instead of by writing `/proc/sys/net/ipv4/ip_forward`.
//!
//! Why: in a Kubernetes pod `/proc/sys` is mounted read-only (the container runtime's
//! `readonlyPaths`), even with CAP_NET_ADMIN, so the sysctl cannot be written. Asking for it
//! in the pod's `securityContext.sysctls` does not help either: `net.ipv4.ip_forward` is not
//! one of Kubernetes' "safe" sysctls, so every kubelet would need
//! `--allowed-unsafe-sysctls`. What the kernel checks is the per-device setting: a packet is
//! forwarded only if its *input* interface has forwarding on (`IN_DEV_FORWARD` in
//! `ip_route_input_slow`). That setting can be written with `RTM_SETLINK`
//! (`IFLA_AF_SPEC` → `AF_INET` → `IFLA_INET_CONF`, `IPV4_DEVCONF_FORWARDING`), which needs
//! only CAP_NET_ADMIN in the pod's own network namespace.
//!
//! [`enable`] sets it on every interface but loopback: the TUN device (peers' packets come
//! in there) and the pod's others (replies come in on `eth0` and, once de-masqueraded, are
//! forwarded into the TUN). `/proc/sys/net/ipv4/ip_forward` is still read: when it is
//! already 1 (a host, or a pod whose kubelet allows the sysctl) nothing is changed.
//!
//! Interfaces that appear later get `net.ipv4.conf.default.forwarding`, which only the
//! read-only sysctl sets. In a pod that does not matter: the CNI plugin creates the pod's
//! interfaces before any container starts, and the TUN device exists before [`enable`]
//! runs. Outside a pod, an interface added after the gateway started would need forwarding
//! set by whoever adds it.

use super::netlink::{self, Conn, Msg, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkError};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const IFLA_IFNAME: u16 = 3;
const IFLA_AF_SPEC: u16 = 26;
const AF_INET: u16 = 2;
const IFLA_INET_CONF: u16 = 1;
const IPV4_DEVCONF_FORWARDING: u16 = 1;
const IFF_LOOPBACK: u32 = 0x8;
/// `struct ifinfomsg`'s size.
const IFINFOMSG: usize = 16;
/// The global switch, read to log (and to do nothing when it is on).
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// `struct ifinfomsg` for interface `index` (family AF_UNSPEC, no flags changed).
fn ifinfomsg(index: i32) -> [u8; IFINFOMSG] {
    let mut m = [0u8; IFINFOMSG];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

/// The request listing every interface.
pub fn list_links() -> Vec<u8> {
    Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, &ifinfomsg(0)).finish(1)
}

/// Switch IPv4 forwarding on for interface `index`, and nothing else of its devconf.
pub fn set_forwarding(index: i32, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, &ifinfomsg(index));
    m.nest(IFLA_AF_SPEC, |m| {
        m.nest(AF_INET, |m| {
            m.nest(IFLA_INET_CONF, |m| {
                m.u32(IPV4_DEVCONF_FORWARDING, 1);
            });
        });
    });
    m.finish(seq)
}

/// An interface of the namespace, from an `RTM_NEWLINK` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    pub name: String,
    pub loopback: bool,
}

/// Parse an `RTM_NEWLINK` payload (`ifinfomsg` and attributes).
pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = i32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let flags = u32::from_ne_bytes(payload.get(8..12)?.try_into().ok()?);
    let name = netlink::attrs(payload.get(IFINFOMSG..)?)
        .find(|(t, _)| *t == IFLA_IFNAME)?
        .1;
    let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or(name)).into_owned();
    Some(Link {
        index,
        name,
        loopback: flags & IFF_LOOPBACK != 0,
    })
}

/// What [`enable`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarding {
    /// `net.ipv4.ip_forward` was already 1: every interface forwards.
    Global,
    /// Forwarding switched on for these interfaces.
    Devices(Vec<String>),
}

/// Whether `net.ipv4.ip_forward` is 1 in the calling thread's network namespace (`None`
/// when it cannot be read).
pub fn global() -> Option<bool> {
    std::fs::read_to_string(IP_FORWARD).ok().map(|s| s.trim() == "1")
}

/// Switch IPv4 forwarding on for every interface but loopback in the calling thread's
/// network namespace, unless `net.ipv4.ip_forward` already is (needs CAP_NET_ADMIN).
pub fn enable() -> Result<Forwarding, NetlinkError> {
    if global() == Some(true) {
        return Ok(Forwarding::Global);
    }
    let conn = Conn::open(netlink_sys::protocols::NETLINK_ROUTE)?;
    let links = conn.dump(list_links(), RTM_NEWLINK)?;
    let mut done = Vec::new();
    for (link, seq) in links
        .iter()
        .filter_map(|p| parse_link(p))
        .filter(|l| !l.loopback)
        .zip(2..)
    {
        match conn.request(&[set_forwarding(link.index, seq)], 1) {
            Ok(()) => done.push(link.name),
            // Gone since the listing, or without IPv4 (an MTU below 68): nothing to forward.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EAFNOSUPPORT)) => {
                tracing::debug!(device = %link.name, error = %e, "not forwarding on this interface");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Forwarding::Devices(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setlink_sets_forwarding_alone_in_the_inet_devconf() {
        let b = set_forwarding(7, 3);
        let m = netlink::messages(&b).next().unwrap();
        assert_eq!(m.ty, RTM_SETLINK);
        assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(m.seq, 3);
        assert_eq!(i32::from_ne_bytes(m.payload[4..8].try_into().unwrap()), 7, "ifi_index");
        assert_eq!(&m.payload[8..IFINFOMSG], &[0; 8], "no link flags changed");
        let only = |buf: &[u8], ty: u16| {
            let a: Vec<_> = netlink::attrs(buf).collect();
            assert_eq!(a.len(), 1, "one attribute of type {ty}");
            assert_eq!(a[0].0, ty);
            a[0].1.to_vec()
        };
        let af = only(&m.payload[IFINFOMSG..], IFLA_AF_SPEC);
        let inet = only(&af, AF_INET);
        let conf = only(&inet, IFLA_INET_CONF);
        assert_eq!(only(&conf, IPV4_DEVCONF_FORWARDING), 1u32.to_ne_bytes());
        // Nests are flagged as such (the kernel's strict parsing wants it).
        let at = netlink::HEADER + IFINFOMSG + 2;
        assert_eq!(
            u16::from_ne_bytes([b[at], b[at + 1]]),
            IFLA_AF_SPEC | netlink::NLA_F_NESTED
        );
    }

    #[test]
    fn links_are_parsed_with_their_name_and_loopback_flag() {
        let mut info = ifinfomsg(1);
        info[8..12].copy_from_slice(&(IFF_LOOPBACK | 1).to_ne_bytes());
        let mut m = Msg::new(RTM_NEWLINK, 0, &info);
        m.u32(4, 65536).str(IFLA_IFNAME, "lo");
        let b = m.finish(1);
        let p = netlink::messages(&b).next().unwrap().payload;
        assert_eq!(
            parse_link(p),
            Some(Link {
                index: 1,
                name: "lo".into(),
                loopback: true
            })
        );
        let mut m = Msg::new(RTM_NEWLINK, 0, &ifinfomsg(5));
        m.str(IFLA_IFNAME, "eth0");
        let b = m.finish(1);
        let link = parse_link(netlink::messages(&b).next().unwrap().payload).unwrap();
        assert_eq!((link.index, link.name.as_str(), link.loopback), (5, "eth0", false));
        assert_eq!(parse_link(&[0; 8]), None, "truncated");
        let list = list_links();
        let l = netlink::messages(&list).next().unwrap();
        assert_eq!((l.ty, l.flags), (RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP));
    }
}
