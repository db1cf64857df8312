//! Coalescing the TCP segments the TUN data plane writes (receive offload, as the kernel's
//! GRO and wireguard-go's `tcpGRO` do): consecutive segments of one connection become one
//! super-packet behind a virtio-net header that tells the kernel how to cut it again
//! (`gso_size`), so the kernel forwards one packet of up to 64 KiB instead of dozens.
//!
//! Pure: the caller owns the device and writes what [`TcpGro::finish`] hands out. It
//! replaces `tun_rs`'s GRO for TCP (UDP still goes through it) because that one copies
//! every packet into a fresh allocation before looking at it and again into the
//! super-packet, and verifies each segment's checksum: 8-10 % of the TUN mode's upload
//! profile (`docs/benchmarks.md`). Here each packet is copied once, its payload straight
//! to the end of its super-packet, into buffers that live as long as the data plane.
//!
//! The rules are the kernel's (`tcp_gro_receive`, as wireguard-go applies them): the same
//! addresses, ports and acknowledgement number; the same TOS, TTL and DF (IPv4) or traffic
//! class, flow label and hop limit (IPv6); the same TCP header length and options; flags
//! ACK, or ACK|PSH on the last segment; the next sequence number; every segment the size
//! of the first but a shorter last one; 64 KiB at most. Anything else (SYN, FIN, RST, URG,
//! ECN marks, IPv4 options, IPv6 extension headers, fragments, pure ACKs) is written alone
//! and in its place: nothing of its connection that came after it is written before it.
//!
//! Checksums are not verified before coalescing. A decrypted packet has passed Poly1305,
//! so nothing changed it on the way; the kernel's own WireGuard marks such packets
//! `CHECKSUM_UNNECESSARY` for the same reason. The super-packet asks the kernel to fill the
//! checksums in (`NEEDS_CSUM`); a packet written alone keeps its own and is checked as usual.

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_LEN, VirtioNetHdr};

use crate::packet::{MAX_PACKET, PROTO_TCP};

/// Where a packet starts in its buffer: the virtio-net header goes in front.
pub const VNET: usize = VIRTIO_NET_HDR_LEN;
/// Packets already queued that a new segment is compared with, newest first: enough for
/// the connections of one batch of datagrams, few enough that a packet costs no search.
const LOOKBACK: usize = 8;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the kernel computes the TCP checksum of each segment.
const NEEDS_CSUM: u8 = 1;

/// A TCP segment's layout, read from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    v6: bool,
    /// IP and TCP header lengths.
    iph: usize,
    tcph: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

impl Segment {
    /// The segment in `p` (a whole IP packet), if it is plain TCP: no IPv4 options, no IPv6
    /// extension headers, not a fragment, lengths that agree with the buffer.
    fn parse(p: &[u8]) -> Option<Segment> {
        let v6 = match p.first()? >> 4 {
            4 if p.len() >= 20 && p[0] & 0x0f == 5 => {
                let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
                let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
                if total != p.len() || fragment || p[9] != PROTO_TCP {
                    return None;
                }
                false
            }
            6 if p.len() >= 40 => {
                let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
                if 40 + payload != p.len() || p[6] != PROTO_TCP {
                    return None;
                }
                true
            }
            _ => return None,
        };
        let iph = if v6 { 40 } else { 20 };
        let tcph = usize::from(*p.get(iph + 12)? >> 4) * 4;
        if tcph < 20 || p.len() < iph + tcph {
            return None;
        }
        let seq = u32::from_be_bytes(p[iph + 4..iph + 8].try_into().ok()?);
        Some(Segment {
            v6,
            iph,
            tcph,
            seq,
            flags: p[iph + 13],
            payload: p.len() - iph - tcph,
        })
    }

    /// Whether it may join or start a super-packet: data, with ACK and at most PSH.
    fn coalescable(&self) -> bool {
        self.payload > 0 && self.flags & !PSH == ACK
    }

    /// The bytes naming its connection: the addresses, then the ports.
    fn same_flow(&self, a: &[u8], b: &[u8]) -> bool {
        let (addrs, ports) = if self.v6 { (8..40, 40..44) } else { (12..20, 20..24) };
        a[ports.clone()] == b[ports] && a[addrs.clone()] == b[addrs]
    }
}

/// A packet queued for writing: one segment, or several coalesced.
#[derive(Debug)]
struct Item {
    /// `None`: not TCP we can read (written alone, and a barrier to the packets before it).
    head: Option<Segment>,
    /// The first segment's payload size: what the kernel cuts the super-packet into.
    gso_size: usize,
    next_seq: u32,
    segments: usize,
    /// Takes no more segments: written alone, PSH seen, or a shorter segment ended it.
    closed: bool,
}

/// See the module documentation.
pub struct TcpGro {
    /// One per packet to write: the virtio-net header's room, then the IP packet. Each has
    /// room for 64 KiB from the start, so appending never reallocates.
    bufs: Vec<Vec<u8>>,
    items: Vec<Item>,
    /// Items before this index take no more segments (a packet of an unknown connection
    /// came after them).
    barrier: usize,
}

impl TcpGro {
    /// Room for `capacity` packets to write (each up to 64 KiB once coalesced).
    pub fn new(capacity: usize) -> Self {
        TcpGro {
            // Capacity only: pages are touched as packets arrive.
            bufs: (0..capacity).map(|_| Vec::with_capacity(VNET + MAX_PACKET)).collect(),
            items: Vec::with_capacity(capacity),
            barrier: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queue `packet` (a whole IP packet holding TCP, already judged): appended to the
    /// super-packet of its connection when the rules allow, else queued on its own. False
    /// when there is no room: write what [`finish`](Self::finish) hands out first.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        let seg = Segment::parse(packet);
        if let Some(s) = seg
            && let Some(i) = self.latest_of_flow(&s, packet)
        {
            if s.coalescable() && self.append(i, &s, packet) {
                return true;
            }
            self.items[i].closed = true;
        }
        if self.items.len() == self.bufs.len() {
            return false;
        }
        let buf = &mut self.bufs[self.items.len()];
        buf.clear();
        buf.resize(VNET, 0);
        buf.extend_from_slice(packet);
        let item = match seg {
            Some(s) if s.coalescable() => Item {
                head: Some(s),
                gso_size: s.payload,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                segments: 1,
                closed: s.flags & PSH != 0,
            },
            _ => Item {
                head: seg,
                gso_size: 0,
                next_seq: 0,
                segments: 1,
                closed: true,
            },
        };
        if seg.is_none() {
            // Its connection is unknown: nothing queued before it may grow past it.
            self.barrier = self.items.len() + 1;
        }
        self.items.push(item);
        true
    }

    /// The newest queued item of `s`'s connection, among the last [`LOOKBACK`] since the
    /// barrier: only the newest may grow, so a connection's packets stay in order.
    fn latest_of_flow(&self, s: &Segment, packet: &[u8]) -> Option<usize> {
        let from = self.barrier.max(self.items.len().saturating_sub(LOOKBACK));
        (from..self.items.len()).rev().find(|&i| {
            self.items[i]
                .head
                .is_some_and(|h| h.v6 == s.v6 && s.same_flow(&self.bufs[i][VNET..], packet))
        })
    }

    /// Append `s` to item `i` if the rules allow it.
    fn append(&mut self, i: usize, s: &Segment, packet: &[u8]) -> bool {
        let item = &self.items[i];
        let Some(h) = item.head else { return false };
        let buf = &self.bufs[i];
        let head = &buf[VNET..];
        let (iph, tcph) = (h.iph, h.tcph);
        let ip_alike = if h.v6 {
            // Version, traffic class and flow label; hop limit.
            head[..4] == packet[..4] && head[7] == packet[7]
        } else {
            // TOS; DF and the reserved bit; TTL.
            head[1] == packet[1] && head[6] >> 5 == packet[6] >> 5 && head[8] == packet[8]
        };
        if item.closed
            || !ip_alike
            || s.tcph != tcph
            || s.seq != item.next_seq
            // Nothing larger than the first: the kernel cuts at its size.
            || s.payload > item.gso_size
            || buf.len() - VNET + s.payload > MAX_PACKET
            // The acknowledgement number, data offset, and the options.
            || head[iph + 8..iph + 13] != packet[iph + 8..iph + 13]
            || head[iph + 20..iph + tcph] != packet[iph + 20..iph + tcph]
        {
            return false;
        }
        let payload = &packet[s.iph + s.tcph..];
        self.bufs[i].extend_from_slice(payload);
        let item = &mut self.items[i];
        item.next_seq = item.next_seq.wrapping_add(s.payload as u32);
        item.segments += 1;
        if s.payload < item.gso_size {
            item.closed = true;
        }
        if s.flags & PSH != 0 {
            // PSH ends a super-packet and is carried by it.
            item.closed = true;
            self.bufs[i][VNET + iph + 13] |= PSH;
        }
        true
    }

    /// Fill in the headers of what was queued and hand out each packet, virtio-net header
    /// first, in the order they were queued. Then [`clear`](Self::clear).
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> {
        for (item, buf) in self.items.iter().zip(self.bufs.iter_mut()) {
            let (hdr, packet) = buf.split_at_mut(VNET);
            match item.head {
                Some(h) if item.segments > 1 => super_packet_headers(h, item.gso_size, hdr, packet),
                // Alone: the packet as it came, nothing for the kernel to do.
                _ => hdr.fill(0),
            }
        }
        self.bufs[..self.items.len()].iter().map(|b| b.as_slice())
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.barrier = 0;
    }
}

/// The virtio-net header of a super-packet, its IP length (and IPv4 header checksum), and
/// in its TCP checksum field the pseudo-header's sum, which the kernel completes for each
/// segment it cuts.
fn super_packet_headers(h: Segment, gso_size: usize, hdr: &mut [u8], packet: &mut [u8]) {
    let len = packet.len();
    let tcp_len = (len - h.iph) as u16;
    let (addrs, gso_type) = if h.v6 {
        packet[4..6].copy_from_slice(&tcp_len.to_be_bytes());
        (8..40, VIRTIO_NET_HDR_GSO_TCPV6)
    } else {
        packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        packet[10..12].fill(0);
        let sum = !tun_rs::checksum(&packet[..20], 0);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        (12..20, VIRTIO_NET_HDR_GSO_TCPV4)
    };
    let mut pseudo = [0u8; 36];
    let n = addrs.len();
    pseudo[..n].copy_from_slice(&packet[addrs]);
    pseudo[n..n + 4].copy_from_slice(&[0, PROTO_TCP, (tcp_len >> 8) as u8, tcp_len as u8]);
    let sum = tun_rs::checksum(&pseudo[..n + 4], 0);
    packet[h.iph + 16..h.iph + 18].copy_from_slice(&sum.to_be_bytes());
    let v = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type,
        hdr_len: (h.iph + h.tcph) as u16,
        gso_size: gso_size as u16,
        csum_start: h.iph as u16,
        csum_offset: 16,
    };
    v.encode(hdr).expect("VNET bytes of room");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1380;

    /// A TCP/IPv4 segment with valid checksums: 10.0.0.2:40000 → 10.96.0.20:`dport`,
    /// timestamps option, IP ID `id`.
    fn v4(dport: u16, seq: u32, flags: u8, payload: &[u8], id: u16) -> Vec<u8> {
        let (iph, tcph) = (20, 32);
        let total = iph + tcph + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[10, 96, 0, 20]);
        let sum = !tun_rs::checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        tcp(&mut p, iph, tcph, dport, seq, flags, payload);
        p
    }

    /// The same over IPv6: fd00::2 → fd00:96::14.
    fn v6(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let (iph, tcph) = (40, 32);
        let mut p = vec![0u8; iph + tcph + payload.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((tcph + payload.len()) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00:96::14".parse::<std::net::Ipv6Addr>().unwrap().octets());
        tcp(&mut p, iph, tcph, 5201, seq, flags, payload);
        p
    }

    fn tcp(p: &mut [u8], iph: usize, tcph: usize, dport: u16, seq: u32, flags: u8, payload: &[u8]) {
        let t = &mut p[iph..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7777u32.to_be_bytes());
        t[12] = ((tcph / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        // NOP, NOP, timestamps (TSval 1, TSecr 2): the same on every segment of a burst.
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        t[tcph..].copy_from_slice(payload);
        let (addrs, len) = if iph == 40 {
            (8..40, p.len() - 40)
        } else {
            (12..20, p.len() - 20)
        };
        let mut pseudo = p[addrs].to_vec();
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        let sum = !tun_rs::checksum(&p[iph..], tun_rs::checksum_no_fold(&pseudo, 0));
        p[iph + 16..iph + 18].copy_from_slice(&sum.to_be_bytes());
    }

    fn payload(i: usize, n: usize) -> Vec<u8> {
        (0..n).map(|j| (i * 7 + j) as u8).collect()
    }

    /// What the kernel makes of each written packet: a super-packet cut again by `tun_rs`'s
    /// GSO (an independent implementation of the kernel's segmentation, checksums included),
    /// a packet alone as it is.
    fn as_the_kernel_cuts(written: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for w in written {
            let hdr = VirtioNetHdr::decode(&w[..VNET]).unwrap();
            if hdr.gso_type == 0 {
                assert_eq!(hdr.flags, 0, "a packet alone asks nothing of the kernel");
                out.push(w[VNET..].to_vec());
                continue;
            }
            let mut input = w[VNET..].to_vec();
            let mut bufs = vec![vec![0u8; 2048]; 64];
            let mut sizes = vec![0usize; 64];
            let v6 = input[0] >> 4 == 6;
            let n = tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut sizes, 0, v6).unwrap();
            out.extend((0..n).map(|i| bufs[i][..sizes[i]].to_vec()));
        }
        out
    }

    /// The kernel's completion of a `NEEDS_CSUM` packet (the sum of everything from
    /// `csum_start`, the pseudo-header's sum already in the field) gives the checksum the
    /// super-packet would have had whole.
    fn partial_checksum_completes(w: &[u8]) {
        let p = &w[VNET..];
        let (iph, addrs) = if p[0] >> 4 == 6 { (40, 8..40) } else { (20, 12..20) };
        let completed = !tun_rs::checksum(&p[iph..], 0);
        let mut whole = p.to_vec();
        whole[iph + 16..iph + 18].fill(0);
        let mut pseudo = p[addrs].to_vec();
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&((p.len() - iph) as u16).to_be_bytes());
        let expected = !tun_rs::checksum(&whole[iph..], tun_rs::checksum_no_fold(&pseudo, 0));
        assert_eq!(completed, expected);
    }

    fn run(gro: &mut TcpGro, packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for p in packets {
            assert!(gro.push(p));
        }
        let written: Vec<Vec<u8>> = gro.finish().map(<[u8]>::to_vec).collect();
        gro.clear();
        written
    }

    #[test]
    fn a_burst_of_one_connection_is_one_super_packet_that_cuts_back_into_the_same_segments() {
        let segs: Vec<Vec<u8>> = (0..40)
            .map(|i| v4(5201, 1000 + (i * MSS) as u32, ACK, &payload(i, MSS), 100 + i as u16))
            .collect();
        let mut gro = TcpGro::new(8);
        let written = run(&mut gro, &segs);
        assert_eq!(written.len(), 1, "one write for the burst");
        let hdr = VirtioNetHdr::decode(&written[0][..VNET]).unwrap();
        assert_eq!(
            (hdr.gso_type, hdr.gso_size as usize, hdr.hdr_len, hdr.flags),
            (VIRTIO_NET_HDR_GSO_TCPV4, MSS, 52, NEEDS_CSUM)
        );
        assert_eq!(written[0].len(), VNET + 52 + 40 * MSS);
        assert_eq!(
            tun_rs::checksum(&written[0][VNET..VNET + 20], 0),
            0xffff,
            "a valid IPv4 header checksum"
        );
        partial_checksum_completes(&written[0]);
        assert!(
            as_the_kernel_cuts(&written) == segs,
            "byte for byte, checksums included"
        );
    }

    #[test]
    fn ipv6_bursts_coalesce_the_same_way() {
        let segs: Vec<Vec<u8>> = (0..10)
            .map(|i| v6(5 + (i * MSS) as u32, ACK, &payload(i, MSS)))
            .collect();
        let mut gro = TcpGro::new(8);
        let written = run(&mut gro, &segs);
        assert_eq!(written.len(), 1);
        let hdr = VirtioNetHdr::decode(&written[0][..VNET]).unwrap();
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV6);
        partial_checksum_completes(&written[0]);
        assert!(as_the_kernel_cuts(&written) == segs, "the same segments");
    }

    #[test]
    fn a_short_segment_or_psh_ends_a_super_packet_and_psh_is_kept() {
        let mut segs: Vec<Vec<u8>> = (0..3)
            .map(|i| v4(5201, (i * MSS) as u32, ACK, &payload(i, MSS), i as u16))
            .collect();
        segs.push(v4(5201, (3 * MSS) as u32, ACK | PSH, &payload(3, 100), 3));
        segs.push(v4(5201, (3 * MSS + 100) as u32, ACK, &payload(4, MSS), 4));
        segs.push(v4(5201, (4 * MSS + 100) as u32, ACK, &payload(5, 10), 5));
        segs.push(v4(5201, (4 * MSS + 110) as u32, ACK, &payload(6, MSS), 6));
        let mut gro = TcpGro::new(8);
        let written = run(&mut gro, &segs);
        assert_eq!(written.len(), 3, "PSH, then a shorter segment, end a super-packet");
        assert_eq!(written[0][VNET + 20 + 13], ACK | PSH, "the super-packet carries PSH");
        assert!(as_the_kernel_cuts(&written) == segs, "the same segments");
    }

    #[test]
    fn a_gap_a_new_ack_or_other_options_start_a_new_packet_in_order() {
        let a = v4(5201, 0, ACK, &payload(0, MSS), 0);
        let b = v4(5201, MSS as u32, ACK, &payload(1, MSS), 1);
        let gap = v4(5201, (3 * MSS) as u32, ACK, &payload(3, MSS), 2);
        let mut new_ack = v4(5201, (4 * MSS) as u32, ACK, &payload(4, MSS), 3);
        new_ack[20 + 11] ^= 1;
        let mut new_ts = v4(5201, (5 * MSS) as u32, ACK, &payload(5, MSS), 4);
        new_ts[20 + 27] ^= 1;
        let mut ttl = v4(5201, (6 * MSS) as u32, ACK, &payload(6, MSS), 5);
        ttl[8] = 63;
        let segs = vec![a, b, gap, new_ack, new_ts, ttl];
        let mut gro = TcpGro::new(8);
        let written = run(&mut gro, &segs);
        assert_eq!(written.len(), 5, "only the first two join");
        let cut = as_the_kernel_cuts(&written);
        assert_eq!(cut.len(), 6);
        // Header fields were edited without fixing checksums: compare what matters.
        for (c, s) in cut.iter().zip(&segs) {
            assert_eq!(c[20 + 4..20 + 8], s[20 + 4..20 + 8], "same order of sequence numbers");
        }
    }

    #[test]
    fn connections_interleaved_coalesce_apart_and_each_stays_in_order() {
        let mut segs = Vec::new();
        for i in 0..12 {
            let port = 5201 + (i % 3) as u16;
            let n = i / 3;
            segs.push(v4(port, (n * MSS) as u32, ACK, &payload(i, MSS), n as u16));
        }
        let mut gro = TcpGro::new(8);
        let written = run(&mut gro, &segs);
        assert_eq!(written.len(), 3, "one super-packet per connection");
        let cut = as_the_kernel_cuts(&written);
        for port in 5201..5204u16 {
            let of = |v: &[Vec<u8>]| -> Vec<Vec<u8>> {
                v.iter().filter(|p| p[22..24] == port.to_be_bytes()).cloned().collect()
            };
            assert!(of(&cut) == of(&segs), "port {port}: the same segments, in order");
        }
    }

    #[test]
    fn control_segments_go_alone_and_nothing_of_their_connection_overtakes_them() {
        let data = |n: usize| v4(5201, (n * MSS) as u32, ACK, &payload(n, MSS), n as u16);
        let fin = v4(5201, (2 * MSS) as u32, ACK | 0x01, &[], 9);
        let pure_ack = v4(5201, (2 * MSS) as u32, ACK, &[], 10);
        let mut options = data(3);
        options[0] = 0x46; // IPv4 options: not read, so a barrier
        let segs = vec![data(0), data(1), fin, pure_ack, data(2), options, data(4)];
        let mut gro = TcpGro::new(8);
        for p in &segs {
            assert!(gro.push(p));
        }
        assert_eq!(
            gro.items.len(),
            6,
            "data(0)+data(1), fin, ack, data(2), options, data(4)"
        );
        let written: Vec<Vec<u8>> = gro.finish().map(<[u8]>::to_vec).collect();
        assert!(written[1][VNET..] == segs[2][..], "the FIN as it came");
        assert!(written[4][VNET..] == segs[5][..], "the packet with options as it came");
        assert!(written[1..].iter().all(|w| w[..VNET] == [0; VNET]), "alone");
    }

    #[test]
    fn a_super_packet_stops_at_64_kib_and_a_full_queue_says_so() {
        let segs: Vec<Vec<u8>> = (0..60)
            .map(|i| v4(5201, (i * MSS) as u32, ACK, &payload(i, MSS), i as u16))
            .collect();
        let mut gro = TcpGro::new(2);
        let written = run(&mut gro, &segs);
        assert_eq!(written.len(), 2);
        assert!(written.iter().all(|w| w.len() - VNET <= MAX_PACKET));
        assert_eq!((written[0].len() - VNET - 52) / MSS, (MAX_PACKET - 52) / MSS);
        assert!(as_the_kernel_cuts(&written) == segs, "the same segments");
        // Two packets of other connections fill it.
        assert!(gro.push(&v4(1, 0, ACK, b"a", 0)));
        assert!(gro.push(&v4(2, 0, ACK, b"b", 0)));
        assert!(!gro.push(&v4(3, 0, ACK, b"c", 0)), "full: the caller writes first");
        assert!(gro.push(&v4(2, 1, ACK, b"b", 1)), "joining a queued one needs no room");
    }

    #[test]
    fn malformed_or_truncated_packets_go_alone_without_panicking() {
        let good = v4(5201, 0, ACK, &payload(0, MSS), 0);
        let mut gro = TcpGro::new(64);
        for cut in [0, 1, 19, 20, 39, 51, 52] {
            assert!(gro.push(&good[..cut]));
        }
        let mut lying = good.clone();
        lying[2..4].copy_from_slice(&9000u16.to_be_bytes());
        assert!(gro.push(&lying));
        let mut short_doff = good.clone();
        short_doff[32] = 0x40;
        assert!(gro.push(&short_doff));
        assert!(gro.items.iter().all(|i| i.segments == 1));
        assert_eq!(gro.finish().count(), 9);
    }
}
