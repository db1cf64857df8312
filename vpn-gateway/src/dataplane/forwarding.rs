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
//!
//! ## IPv6 ([`enable_v6`])
//!
//! IPv6 has no such netlink switch. The kernel's `ip6_forward` forwards only when
//! `net.ipv6.conf.all.forwarding` is 1 or (Linux 6.17 and later) the *input* interface has
//! `net.ipv6.conf.<if>.force_forwarding` set; and IPv6's `RTM_SETLINK` (`AF_INET6` in
//! `IFLA_AF_SPEC`) accepts only the address token and the address generation mode, not
//! the devconf (`IFLA_INET6_CONF` is read-only). Both switches are sysctls, so:
//!
//! 1. `net.ipv6.conf.all.forwarding` already 1 (the pod's `securityContext.sysctls`, a
//!    host): nothing is changed ([`ForwardingV6::Global`]);
//! 2. `/proc/sys` writable (a host, a test's network namespace, a privileged container):
//!    `force_forwarding` on every interface but loopback, as for IPv4
//!    ([`ForwardingV6::Devices`]); on a kernel without it (before 6.17), `all.forwarding`
//!    ([`ForwardingV6::All`]);
//! 3. otherwise (a pod: `/proc/sys` read-only) [`ForwardingV6Error::NotWritable`], whose
//!    text names the pod sysctl to set. `net.ipv6.conf.all.forwarding` is namespaced but
//!    not one of Kubernetes' safe sysctls: the kubelet must allow it
//!    (`--allowed-unsafe-sysctls=net.ipv6.conf.all.forwarding`).
//!
//! IPv4 is unaffected: [`enable`] never writes to `/proc/sys`.

use std::io;
use std::path::Path;

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

/// Where the IPv6 per-interface sysctls are, in the calling thread's network namespace.
pub const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";
/// The pod sysctl that switches IPv6 forwarding on where `/proc/sys` is read-only.
pub const IPV6_SYSCTL: &str = "net.ipv6.conf.all.forwarding";

/// What [`enable_v6`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardingV6 {
    /// `net.ipv6.conf.all.forwarding` was already 1.
    Global,
    /// `force_forwarding` switched on for these interfaces.
    Devices(Vec<String>),
    /// A kernel without `force_forwarding`: `net.ipv6.conf.all.forwarding` written.
    All,
}

/// IPv6 forwarding could not be switched on.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingV6Error {
    #[error(
        "IPv6 forwarding is off and {path} cannot be written ({source}); the kernel has no netlink switch for it: \
         give the pod the sysctl {IPV6_SYSCTL}=1 (securityContext.sysctls; the kubelet must allow it with \
         --allowed-unsafe-sysctls={IPV6_SYSCTL})"
    )]
    NotWritable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("listing interfaces over rtnetlink: {0}")]
    Links(#[source] NetlinkError),
    #[error("IPv6 is not available in this network namespace ({path} is missing)")]
    NoIpv6 { path: String },
}

/// Switch IPv6 forwarding on for every interface but loopback in the calling thread's
/// network namespace, unless `net.ipv6.conf.all.forwarding` already is (see the module
/// documentation for why this one goes through `/proc/sys`).
pub fn enable_v6() -> Result<ForwardingV6, ForwardingV6Error> {
    let all = Path::new(IPV6_CONF).join("all/forwarding");
    if read_flag(&all)? {
        return Ok(ForwardingV6::Global);
    }
    let conn = Conn::open(netlink_sys::protocols::NETLINK_ROUTE).map_err(ForwardingV6Error::Links)?;
    let links: Vec<Link> = conn
        .dump(list_links(), RTM_NEWLINK)
        .map_err(ForwardingV6Error::Links)?
        .iter()
        .filter_map(|p| parse_link(p))
        .collect();
    enable_v6_in(Path::new(IPV6_CONF), &links)
}

/// Whether the sysctl file `path` holds 1.
fn read_flag(path: &Path) -> Result<bool, ForwardingV6Error> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim() == "1"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ForwardingV6Error::NoIpv6 {
            path: path.display().to_string(),
        }),
        Err(e) => Err(ForwardingV6Error::NotWritable {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// [`enable_v6`] against the sysctl directory `conf` (`net/ipv6/conf`) and the
/// namespace's `links`.
pub fn enable_v6_in(conf: &Path, links: &[Link]) -> Result<ForwardingV6, ForwardingV6Error> {
    let all = conf.join("all/forwarding");
    if read_flag(&all)? {
        return Ok(ForwardingV6::Global);
    }
    let write = |path: &Path| {
        std::fs::write(path, "1").map_err(|source| ForwardingV6Error::NotWritable {
            path: path.display().to_string(),
            source,
        })
    };
    // `all/force_forwarding` is there exactly when the kernel has the per-interface switch.
    if !conf.join("all/force_forwarding").exists() {
        write(&all)?;
        return Ok(ForwardingV6::All);
    }
    let mut done = Vec::new();
    for link in links.iter().filter(|l| !l.loopback) {
        let path = conf.join(&link.name).join("force_forwarding");
        // An interface without IPv6 (gone since the listing, or an MTU below 1280) has no
        // directory: nothing to forward there.
        if !conf.join(&link.name).is_dir() {
            tracing::debug!(device = %link.name, "no IPv6 on this interface; not forwarding on it");
            continue;
        }
        write(&path)?;
        done.push(link.name.clone());
    }
    Ok(ForwardingV6::Devices(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `net/ipv6/conf` with `all` and the given interfaces, every flag 0;
    /// `force` whether the kernel has `force_forwarding`.
    fn conf(devices: &[&str], force: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for d in ["all", "default"].iter().chain(devices) {
            std::fs::create_dir(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join("forwarding"), "0\n").unwrap();
            if force {
                std::fs::write(dir.path().join(d).join("force_forwarding"), "0\n").unwrap();
            }
        }
        dir
    }

    fn link(index: i32, name: &str, loopback: bool) -> Link {
        Link {
            index,
            name: name.into(),
            loopback,
        }
    }

    fn flag(dir: &Path, dev: &str, name: &str) -> String {
        std::fs::read_to_string(dir.join(dev).join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn ipv6_forwarding_is_forced_per_interface_but_loopback_and_all_is_left_alone() {
        let d = conf(&["lo", "eth0", "kr-gw0"], true);
        let links = [
            link(1, "lo", true),
            link(2, "eth0", false),
            link(3, "kr-gw0", false),
            link(4, "sit0", false),
        ];
        let got = enable_v6_in(d.path(), &links).unwrap();
        assert_eq!(
            got,
            ForwardingV6::Devices(vec!["eth0".into(), "kr-gw0".into()]),
            "sit0 has no IPv6 directory"
        );
        assert_eq!(flag(d.path(), "eth0", "force_forwarding"), "1");
        assert_eq!(flag(d.path(), "kr-gw0", "force_forwarding"), "1");
        assert_eq!(flag(d.path(), "lo", "force_forwarding"), "0");
        assert_eq!(flag(d.path(), "all", "forwarding"), "0");
    }

    #[test]
    fn ipv6_forwarding_already_on_changes_nothing_and_an_old_kernel_gets_all() {
        let d = conf(&["eth0"], true);
        std::fs::write(d.path().join("all/forwarding"), "1\n").unwrap();
        assert_eq!(
            enable_v6_in(d.path(), &[link(2, "eth0", false)]).unwrap(),
            ForwardingV6::Global
        );
        assert_eq!(flag(d.path(), "eth0", "force_forwarding"), "0");

        let d = conf(&["eth0"], false);
        assert_eq!(
            enable_v6_in(d.path(), &[link(2, "eth0", false)]).unwrap(),
            ForwardingV6::All
        );
        assert_eq!(flag(d.path(), "all", "forwarding"), "1");
    }

    #[test]
    fn ipv6_forwarding_without_ipv6_or_with_a_read_only_proc_sys_says_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let e = enable_v6_in(d.path(), &[]).unwrap_err();
        assert!(matches!(e, ForwardingV6Error::NoIpv6 { .. }), "{e}");
        assert!(e.to_string().contains("IPv6 is not available"), "{e}");

        // A file that cannot be written (a directory in its place stands for EROFS).
        let d = conf(&["eth0"], true);
        let f = d.path().join("eth0/force_forwarding");
        std::fs::remove_file(&f).unwrap();
        std::fs::create_dir(&f).unwrap();
        let e = enable_v6_in(d.path(), &[link(2, "eth0", false)]).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ForwardingV6Error::NotWritable { .. }), "{text}");
        assert!(text.contains("eth0/force_forwarding"), "{text}");
        assert!(text.contains("net.ipv6.conf.all.forwarding=1"), "{text}");
        assert!(
            text.contains("--allowed-unsafe-sysctls=net.ipv6.conf.all.forwarding"),
            "{text}"
        );
    }

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
