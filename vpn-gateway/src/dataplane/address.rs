//! The TUN device's IPv6 tunnel address over rtnetlink (`RTM_NEWADDR`), for the TUN data
//! plane of a dual-stack gateway.
//!
//! The address goes on with the tunnel range's prefix length (`fd6b:7261:7961::1/64`), so
//! the kernel adds the connected route for the whole range on the device (`proto kernel`),
//! as the IPv4 address does: every reply for a peer's IPv6 tunnel address goes back into
//! the TUN. `IFA_F_NODAD`: the address is usable at once (a TUN device has no link layer
//! to detect duplicates on, and the kernel skips DAD on it anyway; the flag makes it
//! explicit). `NLM_F_REPLACE`: adding it again (a restart in the same namespace) is no
//! error. Needs CAP_NET_ADMIN only; the kernel refuses with EACCES when IPv6 is disabled on
//! the device (`disable_ipv6`), and the error carries its explanation.

use std::ffi::CString;
use std::io;
use std::net::Ipv6Addr;

use super::netlink::{Conn, Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkError};

const RTM_NEWADDR: u16 = 20;
const NLM_F_REPLACE: u16 = 0x100;
const AF_INET6: u8 = 10;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const IFA_F_PERMANENT: u8 = 0x80;
const RT_SCOPE_UNIVERSE: u8 = 0;
/// `struct ifaddrmsg`'s size.
const IFADDRMSG: usize = 8;

/// `struct ifaddrmsg` for an IPv6 address of `prefix_len` on interface `index`.
fn ifaddrmsg(prefix_len: u8, index: u32) -> [u8; IFADDRMSG] {
    let mut m = [0u8; IFADDRMSG];
    m[0] = AF_INET6;
    m[1] = prefix_len;
    m[2] = IFA_F_PERMANENT;
    m[3] = RT_SCOPE_UNIVERSE;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

/// The request adding (or replacing) `address/prefix_len` on interface `index`, as `ip -6
/// addr replace <address>/<prefix_len> dev <device> nodad` sends it.
pub fn add_v6_msg(index: u32, address: Ipv6Addr, prefix_len: u8, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        &ifaddrmsg(prefix_len, index),
    );
    m.attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .u32(IFA_FLAGS, IFA_F_NODAD);
    m.finish(seq)
}

/// The index of interface `device` in the calling thread's network namespace.
pub fn index_of(device: &str) -> Result<u32, NetlinkError> {
    let name = CString::new(device).map_err(|_| NetlinkError::Protocol("an interface name with a NUL byte"))?;
    // SAFETY: a NUL-terminated string; if_nametoindex reads it and returns 0 on failure.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(NetlinkError::Socket(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {device}: {}", io::Error::last_os_error()),
        )));
    }
    Ok(index)
}

/// Put `address/prefix_len` on `device` (and with it the connected route for the prefix),
/// in the calling thread's network namespace. Needs CAP_NET_ADMIN.
pub fn add_v6(device: &str, address: Ipv6Addr, prefix_len: u8) -> Result<(), NetlinkError> {
    if prefix_len > 128 {
        return Err(NetlinkError::Protocol("an IPv6 prefix longer than 128 bits"));
    }
    let index = index_of(device)?;
    Conn::open(netlink_sys::protocols::NETLINK_ROUTE)?.request(&[add_v6_msg(index, address, prefix_len, 1)], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::netlink;

    #[test]
    fn newaddr_carries_the_address_prefix_and_nodad() {
        let a: Ipv6Addr = "fd6b:7261:7961::1".parse().unwrap();
        let b = add_v6_msg(9, a, 64, 5);
        let m = netlink::messages(&b).next().unwrap();
        assert_eq!(m.ty, RTM_NEWADDR);
        assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        assert_eq!(m.seq, 5);
        assert_eq!(&m.payload[..4], &[AF_INET6, 64, IFA_F_PERMANENT, RT_SCOPE_UNIVERSE]);
        assert_eq!(u32::from_ne_bytes(m.payload[4..8].try_into().unwrap()), 9, "ifa_index");
        let attrs: Vec<(u16, Vec<u8>)> = netlink::attrs(&m.payload[IFADDRMSG..])
            .map(|(t, v)| (t, v.to_vec()))
            .collect();
        assert_eq!(
            attrs,
            [
                (IFA_LOCAL, a.octets().to_vec()),
                (IFA_ADDRESS, a.octets().to_vec()),
                (IFA_FLAGS, IFA_F_NODAD.to_ne_bytes().to_vec())
            ]
        );
    }

    #[test]
    fn a_missing_interface_or_a_bad_prefix_is_a_clear_error() {
        let e = add_v6("kr-no-such-if", Ipv6Addr::LOCALHOST, 64).unwrap_err();
        assert!(e.to_string().contains("no interface kr-no-such-if"), "{e}");
        let e = add_v6("lo", Ipv6Addr::LOCALHOST, 129).unwrap_err();
        assert!(e.to_string().contains("longer than 128"), "{e}");
    }
}
