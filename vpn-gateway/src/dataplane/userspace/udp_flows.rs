//! UDP flows: relayed per (peer address and port, destination) over a connected tokio
//! socket until [`UDP_IDLE`](super::UDP_IDLE) passes without traffic; DNS to the gateway's
//! addresses answered by [`crate::dns`] (or forwarded upstream); replies built as IPv4 or
//! IPv6 packets here.
//!
//! A flow's datagrams of one receive are queued ([`UdpOut`]) and sent at the end of it
//! ([`UserspaceDataPlane::flush_udp`]) as UDP GSO trains, one system call for up to 64, as
//! the gateway's outer sockets do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::{DNS_UPSTREAM_TIMEOUT, FlowKey, MAX_FLOWS, UDP_IDLE, UserspaceDataPlane};
use crate::acl::Verdict;
use crate::dataplane::Inbound;
use crate::dns::DnsAnswer;
use crate::peers::PeerId;
use crate::transport::Bound;
use crate::udp_batch::send_all;

/// What a Service's side of a UDP flow sent back: a datagram, or an ICMP error the kernel
/// reported on the flow's connected socket.
pub(super) type UdpReply = Result<Vec<u8>, Unreachable>;

/// An ICMP "destination unreachable" the Service's side answered with, passed on to the
/// peer as the same message, so that its client fails as it would without the gateway
/// (`dig`: "connection refused") instead of waiting for a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unreachable {
    Port,
    Host,
    Net,
}

impl Unreachable {
    /// The ICMP error behind a receive's error on a connected UDP socket, if it is one.
    fn of(e: &std::io::Error) -> Option<Unreachable> {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Some(Unreachable::Port),
            std::io::ErrorKind::HostUnreachable => Some(Unreachable::Host),
            std::io::ErrorKind::NetworkUnreachable => Some(Unreachable::Net),
            _ => None,
        }
    }
}

pub(super) struct UdpFlow {
    pub(super) socket: Arc<UdpSocket>,
    pub(super) task: JoinHandle<()>,
    pub(super) peer: PeerId,
    /// The peer's (IPv4) tunnel address, whichever family the flow is.
    pub(super) peer_addr: Ipv4Addr,
    pub(super) service: String,
    /// The rule that allowed it, for its audit line.
    pub(super) rule: String,
    pub(super) started: Instant,
    pub(super) last_activity: Instant,
    pub(super) bytes_up: u64,
    /// Trains go out with `UDP_SEGMENT` until the kernel refuses it (EIO) on this route.
    pub(super) gso: bool,
}

/// Datagrams for the Services' flows, queued until the end of a receive. They leave by
/// `sendmmsg` on the flow's socket: tokio's `try_send` answered `WouldBlock` until its
/// reactor had seen a new socket writable, which dropped every new flow's first datagrams.
#[derive(Default)]
pub(super) struct UdpOut {
    /// Each datagram's flow, beside its (Service, start, length) in `buf`.
    flows: Vec<FlowKey>,
    sends: Vec<(SocketAddr, usize, usize)>,
    buf: Vec<u8>,
    /// Trains of more than one datagram sent so far.
    pub(super) trains: u64,
}

impl UdpOut {
    fn push(&mut self, key: FlowKey, payload: &[u8]) {
        self.flows.push(key);
        self.sends
            .push((SocketAddr::new(key.2, key.3), self.buf.len(), payload.len()));
        self.buf.extend_from_slice(payload);
    }
}

impl UserspaceDataPlane {
    pub(super) fn udp_inbound(
        &mut self,
        pkt: &Inbound<'_>,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
        now: Instant,
    ) {
        let key = (pkt.packet.src, src_port, pkt.packet.dst, dst_port);
        if pkt.verdict == Verdict::Local {
            if dst_port != 53 {
                return;
            }
            match self
                .resolver
                .answer(payload, pkt.peer_addr, &self.policy.acl, &self.policy.catalog)
            {
                Some(DnsAnswer::Reply(r)) => self.queue_udp_reply(key, &r),
                Some(DnsAnswer::Forward) => self.forward_dns(key, payload.to_vec()),
                None => {}
            }
            return;
        }
        if let Some(f) = self.udp.get_mut(&key) {
            f.last_activity = now;
            f.bytes_up += payload.len() as u64;
            self.udp_out.push(key, payload);
            return;
        }
        if self.tcp.len() + self.udp.len() >= MAX_FLOWS {
            return;
        }
        // A new flow: a connected socket and a task relaying its replies.
        let std_sock = match std::net::UdpSocket::bind(match key.2 {
            IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "binding a UDP relay socket");
                return;
            }
        };
        let socket = match std_sock
            .set_nonblocking(true)
            .and_then(|_| std_sock.connect(SocketAddr::new(key.2, key.3)))
            .and_then(|_| UdpSocket::from_std(std_sock))
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "connecting a UDP relay socket");
                return;
            }
        };
        self.udp_out.push(key, payload);
        let replies = self.replies_tx.clone();
        let notify = self.notify.clone();
        let reader = socket.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            // Ends when the flow expires (the task is aborted) or the socket fails. An ICMP
            // error is reported once and does not end it: the Service may be listening by
            // the peer's next datagram.
            loop {
                let reply = match reader.recv(&mut buf).await {
                    Ok(n) => Ok(buf[..n].to_vec()),
                    Err(e) => match Unreachable::of(&e) {
                        Some(u) => Err(u),
                        None => break,
                    },
                };
                if replies.try_send((key, reply)).is_ok() {
                    notify.notify_one();
                }
            }
        });
        let service = self.service_name(key.2);
        let rule = self.allowing_rule(pkt);
        self.udp.insert(
            key,
            UdpFlow {
                socket,
                task,
                peer: pkt.peer.clone(),
                peer_addr: pkt.peer_addr,
                service,
                rule,
                started: now,
                last_activity: now,
                bytes_up: payload.len() as u64,
                gso: true,
            },
        );
    }

    /// Send the queued datagrams: each flow's run of them in GSO trains on its socket.
    pub(super) fn flush_udp(&mut self) {
        let out = &mut self.udp_out;
        let mut done = 0;
        while done < out.flows.len() {
            let key = out.flows[done];
            let run = out.flows[done..].iter().take_while(|k| **k == key).count();
            // A flow expired since is gone with its datagrams.
            if let Some(f) = self.udp.get_mut(&key) {
                let unspecified = match key.2 {
                    IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                    IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
                };
                let bound = Bound {
                    local: unspecified,
                    dual_stack: false,
                };
                out.trains += send_all(&f.socket, &bound, &out.sends[done..done + run], &out.buf, &mut f.gso) as u64;
            }
            done += run;
        }
        out.flows.clear();
        out.sends.clear();
        out.buf.clear();
    }

    pub(super) fn forward_dns(&mut self, key: FlowKey, query: Vec<u8>) {
        let Some(upstream) = self.cfg.dns_upstream else { return };
        let replies = self.replies_tx.clone();
        let notify = self.notify.clone();
        tokio::spawn(async move {
            let bind = if upstream.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from(([0u16; 8], 0))
            };
            let answer = async {
                let s = UdpSocket::bind(bind).await.ok()?;
                s.send_to(&query, upstream).await.ok()?;
                let mut buf = vec![0u8; 65_536];
                let n = s.recv(&mut buf).await.ok()?;
                buf.truncate(n);
                Some(buf)
            };
            let reply = match tokio::time::timeout(DNS_UPSTREAM_TIMEOUT, answer).await {
                Ok(Some(r)) => Some(r),
                _ => crate::dns::error_reply(&query, hickory_proto::op::ResponseCode::ServFail),
            };
            if let Some(r) = reply
                && replies.try_send((key, Ok(r))).is_ok()
            {
                notify.notify_one();
            }
        });
    }

    /// A UDP reply from `key`'s destination back to its source.
    pub(super) fn queue_udp_reply(&mut self, key: FlowKey, payload: &[u8]) {
        if let Some(p) = build_udp(key.2, key.3, key.0, key.1, payload) {
            self.out.push_back(p);
        }
    }

    /// The ICMP error for `key`'s last datagram, from its destination back to its source.
    pub(super) fn queue_unreachable(&mut self, key: FlowKey, why: Unreachable) {
        if let Some(p) = build_unreachable(key, why) {
            self.out.push_back(p);
        }
    }

    pub(super) fn expire_udp(&mut self, now: Instant) {
        let expired: Vec<FlowKey> = self
            .udp
            .iter()
            .filter(|(_, f)| now.duration_since(f.last_activity) > UDP_IDLE)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(f) = self.udp.remove(&key) {
                f.task.abort();
                audit_udp(&key, &f, now);
            }
        }
    }
}

pub(super) fn audit_udp(key: &FlowKey, f: &UdpFlow, now: Instant) {
    tracing::info!(
        target: "audit",
        peer = %f.peer,
        src = %SocketAddr::new(key.0, key.1),
        dst = %SocketAddr::new(key.2, key.3),
        service = %f.service,
        proto = "udp",
        port = key.3,
        verdict = "allowed",
        rule = %f.rule,
        bytes_up = f.bytes_up,
        duration_ms = now.duration_since(f.started).as_millis() as u64,
        "flow ended"
    );
}

/// A UDP packet with checksums, IPv4 or IPv6 as its addresses are (`None` when they are of
/// two families or it would be too large).
pub(super) fn build_udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let (s, d) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => return build_udp_v6(s, sport, d, dport, payload),
        _ => return None,
    };
    let udp = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let udp_len = udp.header_len() + payload.len();
    if udp_len + 20 > 65_535 {
        return None;
    }
    let ip = Ipv4Repr {
        src_addr: s,
        dst_addr: d,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + udp_len];
    let caps = ChecksumCapabilities::default();
    let mut ipp = Ipv4Packet::new_unchecked(&mut buf);
    ip.emit(&mut ipp, &caps);
    let mut up = UdpPacket::new_unchecked(ipp.payload_mut());
    udp.emit(
        &mut up,
        &IpAddress::Ipv4(s),
        &IpAddress::Ipv4(d),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

/// ICMP (or ICMPv6) "destination unreachable" from `key`'s destination to its source,
/// quoting a datagram of the flow: its IP header and UDP header, which is what a client's
/// kernel matches the error to its socket by.
fn build_unreachable(key: FlowKey, why: Unreachable) -> Option<Vec<u8>> {
    let (src, sport, dst, dport) = key;
    let mut quote = [0u8; 8];
    quote[0..2].copy_from_slice(&sport.to_be_bytes());
    quote[2..4].copy_from_slice(&dport.to_be_bytes());
    quote[4..6].copy_from_slice(&8u16.to_be_bytes());
    let caps = ChecksumCapabilities::default();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let header = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: quote.len(),
                hop_limit: 64,
            };
            let reason = match why {
                Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
                Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
                Unreachable::Net => Icmpv4DstUnreachable::NetUnreachable,
            };
            let icmp = Icmpv4Repr::DstUnreachable {
                reason,
                header,
                data: &quote,
            };
            let ip = Ipv4Repr {
                src_addr: d,
                dst_addr: s,
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
            let mut ipp = Ipv4Packet::new_unchecked(&mut buf);
            ip.emit(&mut ipp, &caps);
            icmp.emit(&mut Icmpv4Packet::new_unchecked(ipp.payload_mut()), &caps);
            Some(buf)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let header = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: quote.len(),
                hop_limit: 64,
            };
            let reason = match why {
                Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
                Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
                Unreachable::Net => Icmpv6DstUnreachable::NoRoute,
            };
            let icmp = Icmpv6Repr::DstUnreachable {
                reason,
                header,
                data: &quote,
            };
            let ip = Ipv6Repr {
                src_addr: d,
                dst_addr: s,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
            let mut ipp = Ipv6Packet::new_unchecked(&mut buf);
            ip.emit(&mut ipp);
            icmp.emit(&d, &s, &mut Icmpv6Packet::new_unchecked(ipp.payload_mut()), &caps);
            Some(buf)
        }
        _ => None,
    }
}

fn build_udp_v6(
    s: std::net::Ipv6Addr,
    sport: u16,
    d: std::net::Ipv6Addr,
    dport: u16,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let udp = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let udp_len = udp.header_len() + payload.len();
    if udp_len > 65_535 {
        return None;
    }
    let ip = Ipv6Repr {
        src_addr: s,
        dst_addr: d,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + udp_len];
    let caps = ChecksumCapabilities::default();
    let mut ipp = Ipv6Packet::new_unchecked(&mut buf);
    ip.emit(&mut ipp);
    let mut up = UdpPacket::new_unchecked(ipp.payload_mut());
    udp.emit(
        &mut up,
        &IpAddress::Ipv6(s),
        &IpAddress::Ipv6(d),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::DataPlane;
    use crate::packet::{Transport, parse};

    #[test]
    fn udp_replies_of_both_families_parse_with_valid_checksums() {
        for (src, dst) in [
            ("127.96.0.53", "100.64.0.2"),
            ("fd6b:7261:7961::1", "fd6b:7261:7961::2"),
        ] {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let p = build_udp(src, 53, dst, 40000, b"answer").unwrap();
            let pkt = parse(&p).unwrap();
            assert_eq!((pkt.src, pkt.dst), (src, dst));
            assert!(matches!(
                pkt.transport,
                Transport::Udp {
                    src_port: 53,
                    dst_port: 40000,
                    payload: b"answer"
                }
            ));
            // The checksum checks (smoltcp verifies it against the pseudo-header).
            let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
            let body = &p[if src.is_ipv4() { 20 } else { 40 }..];
            assert!(UdpPacket::new_checked(body).unwrap().verify_checksum(&s, &d), "{src}");
        }
        let mixed: (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        assert_eq!(build_udp(mixed.0, 1, mixed.1, 2, b""), None);
    }

    fn plane() -> UserspaceDataPlane {
        UserspaceDataPlane::new(super::super::UserspaceConfig {
            gateway: Ipv4Addr::new(100, 64, 0, 1),
            gateway_v6: "fd6b:7261:7961::1".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            dns_upstream: None,
        })
    }

    /// Hand `payloads` from one peer port to the Service at `to`, as one receive would.
    fn deliver(dp: &mut UserspaceDataPlane, to: SocketAddr, payloads: &[Vec<u8>]) {
        let peer = PeerId::new("default", "alice");
        let me = Ipv4Addr::new(100, 64, 0, 2);
        for p in payloads {
            let bytes = build_udp(me.into(), 40_000, to.ip(), to.port(), p).unwrap();
            let pkt = parse(&bytes).unwrap();
            let Transport::Udp { payload, .. } = pkt.transport else {
                panic!("UDP")
            };
            let inbound = Inbound {
                peer: &peer,
                peer_addr: me,
                bytes: &bytes,
                packet: &pkt,
                verdict: Verdict::Allow,
            };
            dp.udp_inbound(&inbound, 40_000, to.port(), payload, Instant::now());
        }
        dp.flush_udp();
    }

    fn service() -> (std::net::UdpSocket, SocketAddr) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    fn got(s: &std::net::UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let k = s.recv(&mut buf).expect("a datagram");
                buf[..k].to_vec()
            })
            .collect()
    }

    /// A burst that opens a flow, handed over before the loop yields (one receive's
    /// worth): every datagram reaches the Service, the first ones included.
    #[tokio::test]
    async fn the_first_datagrams_of_a_new_flow_are_relayed() {
        let (s, to) = service();
        let mut dp = plane();
        let burst: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        deliver(&mut dp, to, &burst);
        assert_eq!(got(&s, 5), burst);
    }

    /// A flow's run of datagrams leaves in GSO trains (equal sizes, a shorter one last,
    /// more than the 64 of one train): the Service gets each datagram as it was, in
    /// order; a larger one after a shorter starts a new train.
    #[tokio::test]
    async fn a_flows_datagrams_go_out_in_trains_each_as_it_was() {
        let (s, to) = service();
        let mut dp = plane();
        let mut burst: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 1_000]).collect();
        burst.push(vec![0xaa; 300]);
        burst.push(vec![0xbb; 1_200]);
        burst.push(vec![0xcc; 1_200]);
        deliver(&mut dp, to, &burst);
        assert_eq!(got(&s, burst.len()), burst);
        s.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
        assert!(s.recv(&mut [0u8; 64]).is_err(), "nothing more arrives");
        assert!(dp.udp.values().all(|f| f.gso), "loopback takes UDP_SEGMENT");
        // 64 of 1,000 B; 36 of 1,000 B and the 300 B that ends it; the two of 1,200 B.
        assert_eq!(dp.udp_out.trains, 3, "three trains");
    }

    /// What the plane sends the peer next: waits for its waker, up to 2 s.
    async fn next_to_peer(dp: &mut UserspaceDataPlane) -> Vec<u8> {
        let waker = dp.waker();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let mut out = Vec::new();
            dp.outbound(Instant::now(), &mut |p| out.push(p.to_vec()));
            if let Some(p) = out.into_iter().next() {
                return p;
            }
            tokio::time::timeout_at(deadline, waker.notified())
                .await
                .expect("nothing for the peer");
        }
    }

    /// A datagram to a port nothing listens on: the peer gets the port unreachable its
    /// kernel matches to its socket (a client fails at once, as without the gateway).
    /// Once the Service listens, the same flow carries its replies: the relay outlives
    /// the error.
    #[tokio::test]
    async fn a_closed_port_is_port_unreachable_and_the_flow_recovers_when_it_opens() {
        let (s, to) = service();
        drop(s);
        let mut dp = plane();
        deliver(&mut dp, to, &[b"anyone?".to_vec()]);
        let p = next_to_peer(&mut dp).await;
        let pkt = parse(&p).unwrap();
        assert_eq!(
            (pkt.src, pkt.dst),
            (to.ip(), IpAddr::from(Ipv4Addr::new(100, 64, 0, 2)))
        );
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert!(ip.verify_checksum());
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(), "ICMP checksum");
        match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap() {
            Icmpv4Repr::DstUnreachable { reason, header, data } => {
                assert_eq!(reason, Icmpv4DstUnreachable::PortUnreachable);
                assert_eq!(
                    (IpAddr::from(header.src_addr), IpAddr::from(header.dst_addr)),
                    (IpAddr::from(Ipv4Addr::new(100, 64, 0, 2)), to.ip())
                );
                assert_eq!(header.next_header, IpProtocol::Udp);
                assert_eq!(&data[..4], &[0x9c, 0x40, (to.port() >> 8) as u8, to.port() as u8]);
            }
            other => panic!("not a destination unreachable: {other:?}"),
        }

        let back = std::net::UdpSocket::bind(to).expect("the port again");
        deliver(&mut dp, to, &[b"now?".to_vec()]);
        let mut buf = [0u8; 64];
        back.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let (n, from) = back.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"now?");
        back.send_to(b"yes", from).unwrap();
        let p = next_to_peer(&mut dp).await;
        let pkt = parse(&p).unwrap();
        assert!(
            matches!(pkt.transport, Transport::Udp { payload: b"yes", .. }),
            "the reply of the Service that now listens"
        );
    }

    #[test]
    fn unreachables_of_both_families_carry_valid_checksums_and_the_flows_ports() {
        let v6: FlowKey = (
            "fd6b:7261:7961::2".parse().unwrap(),
            40_000,
            "fd00:10:96::a".parse().unwrap(),
            53,
        );
        let p = build_unreachable(v6, Unreachable::Port).unwrap();
        let ip = Ipv6Packet::new_checked(&p[..]).unwrap();
        assert_eq!((IpAddr::from(ip.src_addr()), IpAddr::from(ip.dst_addr())), (v6.2, v6.0));
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        assert!(icmp.verify_checksum(&s, &d), "ICMPv6 checksum");
        match Icmpv6Repr::parse(&s, &d, &icmp, &ChecksumCapabilities::default()).unwrap() {
            Icmpv6Repr::DstUnreachable { reason, header, data } => {
                assert_eq!(reason, Icmpv6DstUnreachable::PortUnreachable);
                assert_eq!(IpAddr::from(header.dst_addr), v6.2);
                assert_eq!(&data[..4], &[0x9c, 0x40, 0, 53]);
            }
            other => panic!("not a destination unreachable: {other:?}"),
        }
        let mixed: FlowKey = (Ipv4Addr::LOCALHOST.into(), 1, "::1".parse().unwrap(), 2);
        assert_eq!(build_unreachable(mixed, Unreachable::Host), None);
    }
}
