//! The outer UDP transport: the sockets WireGuard datagrams come and go on.
//!
//! `--listen` may be given several times, one socket per address. Without it the gateway
//! binds one dual-stack socket, `[::]:51820` with `IPV6_V6ONLY` off, which takes IPv4
//! peers too (as `::ffff:a.b.c.d`), and falls back to `0.0.0.0:51820` on a host without
//! IPv6. An unspecified IPv6 address given to `--listen` is dual-stack as well.
//!
//! Peers' endpoints are kept in their plain form: an IPv4-mapped source is turned back into
//! IPv4 ([`normalize`]), so one peer seen over a dual-stack socket and over an IPv4 one has
//! one endpoint (session recovery and roaming compare them), and `wg show` prints
//! `a.b.c.d:port` or `[v6]:port` as `wg` itself does. A datagram to a peer goes out of a
//! socket of its family ([`socket_for`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

/// WireGuard's port, where the gateway listens by default.
pub const DEFAULT_PORT: u16 = 51820;

/// The default listen address: dual-stack.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT))
}

/// Where the default falls back to when the host has no IPv6.
pub fn fallback_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT))
}

/// `a` with an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`) as IPv4 (`a.b.c.d:p`).
pub fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// What a bound socket takes: its local address, and whether it is a dual-stack IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub local: SocketAddr,
    pub dual_stack: bool,
}

impl Bound {
    /// Whether a datagram to `to` can leave by this socket.
    fn reaches(&self, to: SocketAddr) -> bool {
        match (self.local, to) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => true,
            (SocketAddr::V6(_), SocketAddr::V4(_)) => self.dual_stack,
            (SocketAddr::V4(_), SocketAddr::V6(_)) => false,
        }
    }
}

/// The socket a datagram to `to` leaves by: the first of its own family, else the first
/// dual-stack one (IPv4 over it), else none.
pub fn socket_for(sockets: &[Bound], to: SocketAddr) -> Option<usize> {
    let same = sockets.iter().position(|s| s.local.is_ipv4() == to.is_ipv4());
    same.or_else(|| sockets.iter().position(|s| s.reaches(to)))
}

/// The address to write on a socket for `to`: an IPv4 destination leaves a dual-stack
/// socket as its IPv4-mapped IPv6 address.
pub fn wire_address(socket: &Bound, to: SocketAddr) -> SocketAddr {
    match (socket.local, to) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        _ => to,
    }
}

/// Bind one UDP socket: an unspecified IPv6 address dual-stack (`IPV6_V6ONLY` off), any
/// other address as it is.
pub fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, Bound)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let dual_stack = matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified());
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let std: std::net::UdpSocket = socket.into();
    let local = std.local_addr()?;
    Ok((UdpSocket::from_std(std)?, Bound { local, dual_stack }))
}

/// Bind every `--listen` address, or the default (dual-stack, else IPv4) when none is
/// given. `bind_one` is [`bind`] (a parameter so that the fallback can be tested).
pub fn bind_all<S>(
    listen: &[SocketAddr],
    mut bind_one: impl FnMut(SocketAddr) -> std::io::Result<(S, Bound)>,
) -> Result<Vec<(S, Bound)>, (SocketAddr, std::io::Error)> {
    if listen.is_empty() {
        return match bind_one(default_listen()) {
            Ok(s) => Ok(vec![s]),
            // Anything else (the port in use, say) is the default's own error.
            Err(e) if !no_ipv6(&e) => Err((default_listen(), e)),
            Err(e) => {
                tracing::info!(error = %e, "no IPv6 here: listening on IPv4 only");
                bind_one(fallback_listen())
                    .map(|s| vec![s])
                    .map_err(|e| (fallback_listen(), e))
            }
        };
    }
    listen.iter().map(|&a| bind_one(a).map_err(|e| (a, e))).collect()
}

/// Whether a failed IPv6 bind says the host has no IPv6 (no address family, no address).
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_endpoints_are_ipv4() {
        assert_eq!(normalize(addr("[::ffff:203.0.113.7]:51820")), addr("203.0.113.7:51820"));
        assert_eq!(normalize(addr("203.0.113.7:1")), addr("203.0.113.7:1"));
        assert_eq!(normalize(addr("[2001:db8::7]:1")), addr("[2001:db8::7]:1"));
        // IPv4-compatible (deprecated) and the loopback are not mapped addresses.
        assert_eq!(normalize(addr("[::1]:1")), addr("[::1]:1"));
        assert_eq!(normalize(addr("[::203.0.113.7]:1")), addr("[::203.0.113.7]:1"));
        // `wg` prints them like this.
        assert_eq!(normalize(addr("[2001:db8::7]:1")).to_string(), "[2001:db8::7]:1");
    }

    #[test]
    fn a_datagram_leaves_by_a_socket_of_its_family() {
        let v4 = Bound {
            local: addr("127.0.0.1:1"),
            dual_stack: false,
        };
        let v6 = Bound {
            local: addr("[::1]:2"),
            dual_stack: false,
        };
        let dual = Bound {
            local: addr("[::]:3"),
            dual_stack: true,
        };
        let (to4, to6) = (addr("192.0.2.1:9"), addr("[2001:db8::1]:9"));
        assert_eq!(socket_for(&[v4, v6], to4), Some(0));
        assert_eq!(socket_for(&[v4, v6], to6), Some(1));
        assert_eq!(socket_for(&[v6, v4], to4), Some(1));
        assert_eq!(socket_for(&[dual], to4), Some(0));
        assert_eq!(socket_for(&[dual], to6), Some(0));
        assert_eq!(socket_for(&[v6], to4), None, "an IPv6-only socket cannot send IPv4");
        assert_eq!(socket_for(&[v4], to6), None);
        assert_eq!(wire_address(&dual, to4), addr("[::ffff:192.0.2.1]:9"));
        assert_eq!(wire_address(&v4, to4), to4);
        assert_eq!(wire_address(&dual, to6), to6);
    }

    #[test]
    fn the_default_falls_back_to_ipv4_without_ipv6() {
        let no_v6 = |a: SocketAddr| {
            if a.is_ipv6() {
                Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
            } else {
                Ok((
                    (),
                    Bound {
                        local: a,
                        dual_stack: false,
                    },
                ))
            }
        };
        let got = bind_all(&[], no_v6).unwrap();
        assert_eq!(got[0].1.local, addr("0.0.0.0:51820"));
        let with_v6 = |a: SocketAddr| {
            Ok::<_, std::io::Error>((
                (),
                Bound {
                    local: a,
                    dual_stack: a.is_ipv6(),
                },
            ))
        };
        assert_eq!(bind_all(&[], with_v6).unwrap()[0].1.local, addr("[::]:51820"));
        // The port taken is not a missing IPv6: no fallback, the default's error.
        let in_use = |_: SocketAddr| Err::<((), Bound), _>(std::io::Error::from_raw_os_error(libc::EADDRINUSE));
        let err = bind_all(&[], in_use).unwrap_err();
        assert_eq!(err.0, addr("[::]:51820"));
        assert_eq!(err.1.raw_os_error(), Some(libc::EADDRINUSE));
        // Given addresses are all bound, and one that fails is named, with no fallback.
        let given = [addr("127.0.0.1:0"), addr("[::1]:0")];
        assert_eq!(bind_all(&given, with_v6).unwrap().len(), 2);
        let err = bind_all(&given, no_v6).unwrap_err();
        assert_eq!(err.0, addr("[::1]:0"));
    }

    #[tokio::test]
    async fn a_dual_stack_socket_takes_ipv4_and_ipv6() {
        let (s, b) = bind(addr("[::]:0")).unwrap();
        assert!(b.dual_stack);
        let port = b.local.port();
        for client in ["127.0.0.1:0", "[::1]:0"] {
            let c = std::net::UdpSocket::bind(client).unwrap();
            let to = if c.local_addr().unwrap().is_ipv4() {
                SocketAddr::from(([127, 0, 0, 1], port))
            } else {
                SocketAddr::from((Ipv6Addr::LOCALHOST, port))
            };
            c.send_to(b"hi", to).unwrap();
            let mut buf = [0u8; 8];
            let (n, from) = tokio::time::timeout(std::time::Duration::from_secs(5), s.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], b"hi");
            assert_eq!(normalize(from), c.local_addr().unwrap(), "{client}");
            // And back, by the address written on the wire.
            s.send_to(b"ok", wire_address(&b, normalize(from))).await.unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let (n, _) = c.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"ok");
        }
        let (_, only) = bind(addr("[::1]:0")).unwrap();
        assert!(!only.dual_stack);
    }
}
