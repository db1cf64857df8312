//! Batched UDP I/O on the gateway's socket: many datagrams per system call with
//! `sendmmsg(2)` and `recvmmsg(2)`, the receive batch's buffer, and the socket's kernel
//! buffers. Plain `libc` calls, moved here from the socket loop as they were, so that its
//! `unsafe` sits in one place (each block says why it holds); `nix`, in the tree through
//! boringtun and tun-rs, has wrappers for both.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::UdpSocket;

use crate::transport::{Bound, normalize, wire_address};

/// Datagrams read per wake-up (one `recvmmsg(2)`) before the data plane gets a turn.
pub(crate) const RECV_BATCH: usize = 64;
/// One datagram's room in the receive batch: the largest UDP payload, so that no peer's
/// MTU truncates a datagram. Only the bytes written are touched, so the batch's resident
/// size is a few pages per slot.
const RECV_SLOT: usize = 65_536;
/// The UDP socket's kernel buffers: a burst from a fast peer (a TCP window's worth of
/// datagrams) must not overflow the receive queue while the loop encrypts the other way;
/// the default ~200 KiB holds only ~100 datagrams.
const SOCKET_BUFFER: usize = 4 << 20;

/// Datagrams per `sendmmsg(2)` call.
const SEND_BATCH: usize = 64;

/// Send up to [`SEND_BATCH`] of `sends` (slices of `buf`) with one `sendmmsg(2)`, without
/// blocking. Returns how many went out. `bound` says how to write IPv4 destinations (mapped
/// on a dual-stack socket).
pub(crate) fn send_batch(
    socket: &UdpSocket,
    bound: &Bound,
    sends: &[(SocketAddr, usize, usize)],
    buf: &[u8],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = sends.len().min(SEND_BATCH);
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut addrs: [libc::sockaddr_storage; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    for (i, &(to, start, len)) in sends[..n].iter().enumerate() {
        let name_len = match wire_address(bound, to) {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&mut addrs[i] as *mut libc::sockaddr_storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&mut addrs[i] as *mut libc::sockaddr_storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        let data = &buf[start..start + len];
        iovs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = name_len as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the first n headers point at live addresses and iovecs over `buf`, which the
    // kernel only reads during the call.
    let r = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Received datagrams: (source, length) of each slot of the batch buffer.
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    pub(crate) got: Vec<(SocketAddr, usize)>,
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        RecvBatch {
            buf: vec![0u8; RECV_BATCH * RECV_SLOT],
            got: Vec::with_capacity(RECV_BATCH),
        }
    }
    pub(crate) fn datagram(&self, i: usize) -> &[u8] {
        &self.buf[i * RECV_SLOT..i * RECV_SLOT + self.got[i].1]
    }
}

/// Read up to [`RECV_BATCH`] datagrams with one `recvmmsg(2)`, without blocking (WouldBlock
/// when none is queued). Truncated datagrams (larger than a slot) are skipped. Sources come
/// out plain: an IPv4 peer on a dual-stack socket is `a.b.c.d:p`, not `[::ffff:a.b.c.d]:p`.
pub(crate) fn recv_batch(socket: &UdpSocket, batch: &mut RecvBatch) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    batch.got.clear();
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut addrs: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for (i, slot) in batch.buf.chunks_exact_mut(RECV_SLOT).enumerate() {
        iovs[i] = libc::iovec {
            iov_base: slot.as_mut_ptr().cast(),
            iov_len: RECV_SLOT,
        };
        msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at a live address and an iovec over its own slot of
    // `batch.buf`; the kernel writes at most the given lengths.
    let r = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            RECV_BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    for i in 0..r as usize {
        let from = sockaddr_to(&addrs[i]).map(normalize);
        if msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            // Keep the slot (indices follow slots) but make it empty: dropped as malformed.
            batch.got.push((from.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))), 0));
            continue;
        }
        match from {
            Some(from) => batch.got.push((from, msgs[i].msg_len as usize)),
            None => batch.got.push((SocketAddr::from(([0, 0, 0, 0], 0)), 0)),
        }
    }
    Ok(())
}

fn sockaddr_to(a: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match a.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Grow the socket's kernel buffers to [`SOCKET_BUFFER`]: past the `rmem_max`/`wmem_max`
/// limits when privileged (`SO_RCVBUFFORCE`), else as far as they allow.
pub(crate) fn grow_socket_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let set = |opt: libc::c_int| {
        let v = SOCKET_BUFFER as libc::c_int;
        // SAFETY: an int option on our own socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(force) && !set(plain) {
            tracing::debug!(error = %std::io::Error::last_os_error(), "growing the UDP socket's buffers");
        }
    }
}
