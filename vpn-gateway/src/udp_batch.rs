//! Batched UDP I/O on the gateway's socket: many datagrams per system call with
//! `sendmmsg(2)` and `recvmmsg(2)`, and many per message with UDP segmentation offload
//! (issue 25): a train of datagrams to one peer leaves in one message (`UDP_SEGMENT`, GSO)
//! and a train from one peer arrives in one (`UDP_GRO`), which this module splits again.
//! Also the receive batch's buffer and the socket's kernel buffers. Plain `libc` calls, so
//! that the `unsafe` of the socket loop sits in one place (each block says why it holds).

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

/// Messages per `sendmmsg(2)` call (each a datagram, or a GSO train of them).
const SEND_BATCH: usize = 64;
/// Datagrams one GSO send may carry: the kernel's `UDP_MAX_SEGMENTS` (64 before Linux 6.2,
/// 128 since; the smaller one).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes one GSO send may carry: the largest UDP payload over IPv6, with room to spare.
const GSO_MAX_BYTES: usize = 65_000;
/// Room for one control message holding an `int` or a `u16` (`CMSG_SPACE`: 24 bytes on
/// 64-bit), as `u64`s so that it is aligned for `cmsghdr`.
const CMSG_WORDS: usize = 4;

/// The socket's segmentation offloads (see [`enable_offloads`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Offloads {
    /// `UDP_SEGMENT`: one `sendmsg` carries a train of datagrams to one peer.
    pub(crate) gso: bool,
    /// `UDP_GRO`: one receive may carry a train of datagrams from one peer.
    pub(crate) gro: bool,
}

/// Switch on UDP GRO and check for UDP GSO on `socket`, when `want`. A kernel or socket
/// that refuses either gets the plain path for it: one datagram per message. GSO needs no
/// socket option (it is asked for per message); `getsockopt(UDP_SEGMENT)` tells whether the
/// kernel knows it, as wireguard-go checks.
pub(crate) fn enable_offloads(socket: &UdpSocket, want: bool) -> Offloads {
    use std::os::fd::AsRawFd;
    if !want {
        return Offloads::default();
    }
    let fd = socket.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: an int option on our own socket.
    let gro = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    };
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads an int option of our own socket into `v`, at most `len` bytes.
    let gso = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        ) == 0
    };
    Offloads { gso, gro }
}

/// How many of `sends` (from the first) go out in one GSO train: datagrams to one
/// destination, back to back in the buffer, all of the first one's size but the last, which
/// may be shorter (the kernel cuts the train at the segment size), within the kernel's
/// limits. Always at least 1 for a non-empty `sends`.
pub(crate) fn train_len(sends: &[(SocketAddr, usize, usize)]) -> usize {
    let Some(&(to, start, seg)) = sends.first() else {
        return 0;
    };
    if seg == 0 {
        return 1;
    }
    let mut n = 1;
    let mut end = start + seg;
    for &(t, s, l) in &sends[1..] {
        if n == GSO_MAX_SEGMENTS || t != to || s != end || l > seg || l == 0 || end - start + l > GSO_MAX_BYTES {
            break;
        }
        n += 1;
        end += l;
        if l < seg {
            // A shorter one ends the train.
            break;
        }
    }
    n
}

/// Send up to [`SEND_BATCH`] messages of `sends` (slices of `buf`) with one `sendmmsg(2)`,
/// without blocking; with `gso`, each message a train of datagrams to one peer
/// ([`train_len`]). Returns how many datagrams went out, and how many of the messages that
/// went out were trains of more than one. `bound` says how to write IPv4
/// destinations (mapped on a dual-stack socket). EIO with `gso` means the route's device
/// cannot segment (no transmit checksum offload): the caller sends without it from then on.
pub(crate) fn send_batch(
    socket: &UdpSocket,
    bound: &Bound,
    sends: &[(SocketAddr, usize, usize)],
    buf: &[u8],
    gso: bool,
) -> std::io::Result<(usize, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut addrs: [libc::sockaddr_storage; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut control = [[0u64; CMSG_WORDS]; SEND_BATCH];
    // Datagrams carried by each message.
    let mut counts = [0usize; SEND_BATCH];
    let mut n = 0;
    let mut next = 0;
    while n < SEND_BATCH && next < sends.len() {
        let count = if gso { train_len(&sends[next..]) } else { 1 };
        let (to, start, seg) = sends[next];
        let (_, last_start, last_len) = sends[next + count - 1];
        let name_len = write_sockaddr(&mut addrs[n], wire_address(bound, to));
        let data = &buf[start..last_start + last_len];
        iovs[n] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let hdr = &mut msgs[n].msg_hdr;
        hdr.msg_name = (&mut addrs[n] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = name_len;
        hdr.msg_iov = &mut iovs[n];
        hdr.msg_iovlen = 1;
        if count > 1 {
            hdr.msg_control = control[n].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            hdr.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
            // SAFETY: msg_control points at CMSG_WORDS * 8 bytes, aligned for cmsghdr, which
            // holds CMSG_SPACE(2); the header and its u16 are written inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(hdr);
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg as u16);
            }
        }
        counts[n] = count;
        n += 1;
        next += count;
    }
    // SAFETY: the first n headers point at live addresses, iovecs over `buf` and control
    // buffers, which the kernel only reads during the call.
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
        let sent = &counts[..r as usize];
        Ok((sent.iter().sum(), sent.iter().filter(|&&c| c > 1).count()))
    }
}

/// Send all of `sends` through `socket` ([`send_batch`], GSO trains while `gso`). A datagram
/// the socket will not take now is dropped (a full buffer, as a network would); EIO turns
/// `gso` off for good (the route's device cannot segment: nothing went out, it is sent
/// again without). Returns how many trains of more than one datagram went out.
pub(crate) fn send_all(
    socket: &UdpSocket,
    bound: &Bound,
    sends: &[(SocketAddr, usize, usize)],
    buf: &[u8],
    gso: &mut bool,
) -> usize {
    let (mut done, mut trains) = (0, 0);
    while done < sends.len() {
        match send_batch(socket, bound, &sends[done..], buf, *gso) {
            Ok((n, t)) if n > 0 => {
                done += n;
                trains += t;
            }
            Err(e) if *gso && e.raw_os_error() == Some(libc::EIO) => {
                tracing::warn!(socket = %bound.local, "UDP GSO refused by the kernel (EIO); sending without it");
                *gso = false;
            }
            _ => done += 1,
        }
    }
    trains
}

/// Write `to` into `storage`; returns its length.
fn write_sockaddr(storage: &mut libc::sockaddr_storage, to: SocketAddr) -> libc::socklen_t {
    let len = match to {
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
            unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin) };
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
            unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    len as libc::socklen_t
}

/// Received datagrams: (source, start, length) of each in the batch buffer. With GRO one
/// message may carry a train of datagrams from one source; they are split here, so the
/// caller sees each datagram on its own and decrypts and judges it on its own.
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    control: Vec<[u64; CMSG_WORDS]>,
    pub(crate) got: Vec<(SocketAddr, usize, usize)>,
    /// Messages of the last receive that carried more than one datagram.
    pub(crate) trains: usize,
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        RecvBatch {
            buf: vec![0u8; RECV_BATCH * RECV_SLOT],
            control: vec![[0u64; CMSG_WORDS]; RECV_BATCH],
            got: Vec::with_capacity(RECV_BATCH),
            trains: 0,
        }
    }
    /// The buffer the datagrams of [`RecvBatch::got`] lie in.
    pub(crate) fn buf(&self) -> &[u8] {
        &self.buf
    }
    pub(crate) fn datagram(&self, i: usize) -> &[u8] {
        let (_, start, len) = self.got[i];
        &self.buf[start..start + len]
    }
}

/// Split a received message of `len` bytes at `start` into datagrams of `segment` bytes (the
/// last may be shorter); `segment` 0 (no GRO) or at least `len`: one datagram.
fn split_train(from: SocketAddr, start: usize, len: usize, segment: usize, out: &mut Vec<(SocketAddr, usize, usize)>) {
    if segment == 0 || segment >= len {
        out.push((from, start, len));
        return;
    }
    let mut off = 0;
    while off < len {
        let l = segment.min(len - off);
        out.push((from, start + off, l));
        off += l;
    }
}

/// Read up to [`RECV_BATCH`] messages with one `recvmmsg(2)`, without blocking (WouldBlock
/// when none is queued), and split GRO trains into their datagrams. Truncated datagrams
/// (larger than a slot) are kept as empty ones (dropped as malformed). Sources come out
/// plain: an IPv4 peer on a dual-stack socket is `a.b.c.d:p`, not `[::ffff:a.b.c.d]:p`.
pub(crate) fn recv_batch(socket: &UdpSocket, batch: &mut RecvBatch) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    batch.got.clear();
    batch.trains = 0;
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut addrs: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for (i, slot) in batch.buf.chunks_exact_mut(RECV_SLOT).enumerate() {
        iovs[i] = libc::iovec {
            iov_base: slot.as_mut_ptr().cast(),
            iov_len: RECV_SLOT,
        };
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        hdr.msg_control = batch.control[i].as_mut_ptr().cast();
        hdr.msg_controllen = std::mem::size_of::<[u64; CMSG_WORDS]>() as _;
    }
    // SAFETY: every header points at a live address, an iovec over its own slot of
    // `batch.buf` and its own control buffer; the kernel writes at most the given lengths.
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
        let from = sockaddr_to(&addrs[i])
            .map(normalize)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let start = i * RECV_SLOT;
        if msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || from.port() == 0 {
            // Keep an empty datagram: dropped as malformed (and counted) by the caller.
            batch.got.push((from, start, 0));
            continue;
        }
        let segment = gro_segment(&msgs[i].msg_hdr);
        let len = msgs[i].msg_len as usize;
        batch.trains += usize::from(segment != 0 && segment < len);
        split_train(from, start, len, segment, &mut batch.got);
    }
    Ok(())
}

/// The GRO segment size a received message carries (`UDP_GRO` control message), or 0.
fn gro_segment(hdr: &libc::msghdr) -> usize {
    // SAFETY: the kernel filled msg_control up to msg_controllen with well-formed control
    // messages; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                return std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()).max(0) as usize;
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    0
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::Interest;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// Sends of these (destination port, length), packed back to back.
    fn packed(spec: &[(u16, usize)]) -> Vec<(SocketAddr, usize, usize)> {
        let mut at = 0;
        spec.iter()
            .map(|&(p, l)| {
                let s = (peer(p), at, l);
                at += l;
                s
            })
            .collect()
    }

    #[test]
    fn a_train_is_one_peer_s_datagrams_of_one_size_with_a_shorter_last() {
        assert_eq!(train_len(&[]), 0);
        assert_eq!(train_len(&packed(&[(1, 100)])), 1);
        assert_eq!(train_len(&packed(&[(1, 100), (1, 100), (1, 100)])), 3);
        // A shorter one ends it, a longer one starts the next.
        assert_eq!(train_len(&packed(&[(1, 100), (1, 100), (1, 60), (1, 100)])), 3);
        assert_eq!(train_len(&packed(&[(1, 100), (1, 120), (1, 120)])), 1);
        // Another peer starts the next.
        assert_eq!(train_len(&packed(&[(1, 100), (1, 100), (2, 100), (1, 100)])), 2);
        // Not back to back in the buffer: not one train.
        let mut gap = packed(&[(1, 100), (1, 100)]);
        gap[1].1 += 4;
        assert_eq!(train_len(&gap), 1);
        // The kernel's limits: segments and bytes.
        assert_eq!(train_len(&packed(&[(1, 100); 100])), GSO_MAX_SEGMENTS);
        assert_eq!(train_len(&packed(&[(1, 1452); 60])), GSO_MAX_BYTES / 1452);
        // Empty datagrams (keepalives have 32 bytes; a zero-length one is never batched).
        assert_eq!(train_len(&packed(&[(1, 0), (1, 0)])), 1);
    }

    #[test]
    fn a_received_train_splits_at_the_segment_size() {
        let mut out = Vec::new();
        split_train(peer(1), 10, 250, 100, &mut out);
        assert_eq!(out, vec![(peer(1), 10, 100), (peer(1), 110, 100), (peer(1), 210, 50)]);
        out.clear();
        split_train(peer(1), 0, 80, 0, &mut out);
        split_train(peer(1), 0, 80, 100, &mut out);
        assert_eq!(out, vec![(peer(1), 0, 80), (peer(1), 0, 80)]);
    }

    /// Over loopback, which passes GSO trains on unsplit: one `sendmsg` with `UDP_SEGMENT`
    /// arrives as one GRO train at a socket with `UDP_GRO`, and comes out as the datagrams
    /// that were sent, in order, each with its own bytes; without offloads the same sends
    /// arrive one by one.
    #[tokio::test]
    async fn gso_trains_arrive_as_gro_trains_and_split_into_the_datagrams_sent() {
        for offload in [true, false] {
            let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let rx_off = enable_offloads(&rx, offload);
            let tx_off = enable_offloads(&tx, offload);
            assert_eq!(rx_off.gro, offload, "UDP_GRO on loopback");
            assert_eq!(tx_off.gso, offload, "UDP_SEGMENT on loopback");
            let to = rx.local_addr().unwrap();
            let bound = Bound {
                local: tx.local_addr().unwrap(),
                dual_stack: false,
            };
            // Five datagrams of 300 bytes and a last of 120, each filled with its number.
            let lens = [300, 300, 300, 300, 300, 120];
            let mut buf = Vec::new();
            let mut sends = Vec::new();
            for (i, &l) in lens.iter().enumerate() {
                sends.push((to, buf.len(), l));
                buf.extend(std::iter::repeat_n(i as u8, l));
            }
            let (sent, trains) = send_batch(&tx, &bound, &sends, &buf, tx_off.gso).unwrap();
            assert_eq!(sent, lens.len());
            assert_eq!(trains, usize::from(offload));
            let mut batch = RecvBatch::new();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut trains = 0;
            for _ in 0..100 {
                rx.readable().await.unwrap();
                match rx.try_io(Interest::READABLE, || recv_batch(&rx, &mut batch)) {
                    Ok(()) => {
                        trains += batch.trains;
                        for i in 0..batch.got.len() {
                            assert_eq!(batch.got[i].0, bound.local);
                            got.push(batch.datagram(i).to_vec());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                if got.len() >= lens.len() {
                    break;
                }
            }
            let want: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &l)| vec![i as u8; l]).collect();
            assert_eq!(got, want, "offload {offload}");
            assert_eq!(trains, usize::from(offload), "GRO trains with offload {offload}");
        }
    }
}
