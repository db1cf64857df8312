//! Zero-copy parsing of the IP packets that come out of a tunnel: just enough of the IPv4 or
//! IPv6 header and the transport header to apply the access rules.
//!
//! Never panics, on any input: every read goes through `get`, and lengths come from the
//! header only after they are checked against the buffer.
//!
//! IPv6: the fixed header, then the extension headers a host may meet before the transport
//! — hop-by-hop (0), routing (43), fragment (44) and destination options (60) — are walked
//! (at most `MAX_IPV6_EXTENSIONS`; a longer chain is an error). Anything else ends the
//! walk as the packet's protocol: AH (51), ESP (50), mobility (135) and the like are not
//! parsed, so they reach no Service port and the ACL denies them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// The largest IP packet: what an IPv4 total length can say, and what one offloaded TUN
/// read or write (a super-packet) may carry.
pub const MAX_PACKET: usize = 65_535;

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
/// IPv6 extension headers followed at most (hop-by-hop, routing, destination options).
const MAX_IPV6_EXTENSIONS: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why a packet was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is not 4 or 6")]
    Version(u8),
    #[error("truncated header")]
    Truncated,
    #[error("header length field is inconsistent")]
    BadLength,
    #[error("more than {MAX_IPV6_EXTENSIONS} IPv6 extension headers")]
    TooManyExtensions,
}

/// The transport part of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: &'a [u8],
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    /// ICMP or ICMPv6.
    Icmp { kind: u8, code: u8 },
    /// A later fragment (no transport header) or a protocol we do not look into.
    Other { proto: u8 },
}

/// A parsed packet borrowing from the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP protocol number of the transport (after IPv6 extension headers).
    pub proto: u8,
    pub transport: Transport<'a>,
    /// The packet's length according to its header (at most the buffer's).
    pub len: usize,
}

impl Packet<'_> {
    /// The destination port for TCP and UDP.
    pub fn dst_port(&self) -> Option<u16> {
        match self.transport {
            Transport::Tcp { dst_port, .. } | Transport::Udp { dst_port, .. } => Some(dst_port),
            _ => None,
        }
    }
    pub fn src_port(&self) -> Option<u16> {
        match self.transport {
            Transport::Tcp { src_port, .. } | Transport::Udp { src_port, .. } => Some(src_port),
            _ => None,
        }
    }
    /// A TCP segment that opens a connection (SYN without ACK).
    pub fn is_tcp_syn(&self) -> bool {
        matches!(self.transport, Transport::Tcp { flags, .. } if flags & TCP_SYN != 0 && flags & TCP_ACK == 0)
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// Parse a decrypted packet.
pub fn parse(buf: &[u8]) -> Result<Packet<'_>, ParseError> {
    let first = *buf.first().ok_or(ParseError::Empty)?;
    match first >> 4 {
        4 => parse_v4(buf),
        6 => parse_v6(buf),
        v => Err(ParseError::Version(v)),
    }
}

fn parse_v4(buf: &[u8]) -> Result<Packet<'_>, ParseError> {
    if buf.len() < IPV4_MIN_HEADER {
        return Err(ParseError::Truncated);
    }
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    let total = usize::from(be16(buf, 2).ok_or(ParseError::Truncated)?);
    if ihl < IPV4_MIN_HEADER || total < ihl || total > buf.len() {
        return Err(ParseError::BadLength);
    }
    let frag = be16(buf, 6).ok_or(ParseError::Truncated)?;
    let later_fragment = frag & 0x1fff != 0;
    let proto = buf[9];
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
    let body = buf.get(ihl..total).ok_or(ParseError::BadLength)?;
    let transport = if later_fragment {
        Transport::Other { proto }
    } else {
        transport(proto, body)?
    };
    Ok(Packet {
        src: src.into(),
        dst: dst.into(),
        proto,
        transport,
        len: total,
    })
}

fn parse_v6(buf: &[u8]) -> Result<Packet<'_>, ParseError> {
    if buf.len() < IPV6_HEADER {
        return Err(ParseError::Truncated);
    }
    let payload_len = usize::from(be16(buf, 4).ok_or(ParseError::Truncated)?);
    let total = IPV6_HEADER + payload_len;
    if total > buf.len() {
        return Err(ParseError::BadLength);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&buf[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&buf[24..40]);
    // Extension headers are read within the payload length, not whatever follows it.
    let packet = &buf[..total];
    let mut next = buf[6];
    let mut off = IPV6_HEADER;
    let mut later_fragment = false;
    let mut walked = 0;
    while is_ipv6_extension(next) {
        if walked == MAX_IPV6_EXTENSIONS {
            return Err(ParseError::TooManyExtensions);
        }
        walked += 1;
        let nh = *packet.get(off).ok_or(ParseError::Truncated)?;
        if next == IPV6_FRAGMENT {
            let frag = be16(packet, off + 2).ok_or(ParseError::Truncated)?;
            later_fragment = frag & 0xfff8 != 0;
            off += 8;
        } else {
            off += (usize::from(*packet.get(off + 1).ok_or(ParseError::Truncated)?) + 1) * 8;
        }
        next = nh;
    }
    let body = packet.get(off..).ok_or(ParseError::BadLength)?;
    let transport = if later_fragment {
        Transport::Other { proto: next }
    } else {
        transport(next, body)?
    };
    Ok(Packet {
        src: Ipv6Addr::from(src).into(),
        dst: Ipv6Addr::from(dst).into(),
        proto: next,
        transport,
        len: total,
    })
}

/// The IPv6 fragment header's next-header value.
const IPV6_FRAGMENT: u8 = 44;

/// The extension headers [`parse`] walks: hop-by-hop, routing, fragment, destination
/// options.
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | IPV6_FRAGMENT | 60)
}

fn transport(proto: u8, body: &[u8]) -> Result<Transport<'_>, ParseError> {
    Ok(match proto {
        PROTO_TCP => {
            if body.len() < TCP_MIN_HEADER {
                return Err(ParseError::Truncated);
            }
            let data_off = usize::from(body[12] >> 4) * 4;
            if data_off < TCP_MIN_HEADER || data_off > body.len() {
                return Err(ParseError::BadLength);
            }
            Transport::Tcp {
                src_port: be16(body, 0).ok_or(ParseError::Truncated)?,
                dst_port: be16(body, 2).ok_or(ParseError::Truncated)?,
                seq: be32(body, 4).ok_or(ParseError::Truncated)?,
                ack: be32(body, 8).ok_or(ParseError::Truncated)?,
                flags: body[13],
                payload: &body[data_off..],
            }
        }
        PROTO_UDP => {
            if body.len() < UDP_HEADER {
                return Err(ParseError::Truncated);
            }
            let len = usize::from(be16(body, 4).ok_or(ParseError::Truncated)?);
            // A zero length is legal in IPv6 jumbograms only; treat it as "to the end".
            let end = if len == 0 { body.len() } else { len };
            if end < UDP_HEADER || end > body.len() {
                return Err(ParseError::BadLength);
            }
            Transport::Udp {
                src_port: be16(body, 0).ok_or(ParseError::Truncated)?,
                dst_port: be16(body, 2).ok_or(ParseError::Truncated)?,
                payload: &body[UDP_HEADER..end],
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if body.len() < 4 {
                return Err(ParseError::Truncated);
            }
            Transport::Icmp {
                kind: body[0],
                code: body[1],
            }
        }
        other => Transport::Other { proto: other },
    })
}

/// The IPv4 ICMP echo reply to `request`, or `None` when it is not a well-formed IPv4
/// echo request. The gateway answers pings to allowed ClusterIPs itself in userspace mode
/// (smoltcp only answers for addresses it owns).
pub fn icmpv4_echo_reply(request: &[u8]) -> Option<Vec<u8>> {
    const ICMP_ECHO_REQUEST: u8 = 8;
    const ICMP_ECHO_REPLY: u8 = 0;
    let version_ihl = *request.first()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    let total_len = usize::from(be16(request, 2)?);
    if version_ihl >> 4 != 4 || header_len < 20 || total_len < header_len + 8 || total_len > request.len() {
        return None;
    }
    if request[9] != PROTO_ICMP || request[header_len] != ICMP_ECHO_REQUEST || request[header_len + 1] != 0 {
        return None;
    }
    // A fragment is not answered: a later one carries no ICMP header (its bytes would be
    // echoed as if they were one), and a first one holds only part of the checksummed data.
    let frag = be16(request, 6)?;
    if frag & 0x3fff != 0 {
        return None;
    }
    let mut reply = request[..total_len].to_vec();
    // Swap the addresses, fresh TTL, then both checksums.
    reply.copy_within(12..16, 16);
    reply[12..16].copy_from_slice(&request[16..20]);
    reply[8] = 64;
    reply[10..12].fill(0);
    let ip_sum = internet_checksum(&reply[..header_len]);
    reply[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    reply[header_len] = ICMP_ECHO_REPLY;
    reply[header_len + 2..header_len + 4].fill(0);
    let icmp_sum = internet_checksum(&reply[header_len..]);
    reply[header_len + 2..header_len + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    Some(reply)
}

/// The ICMP echo reply to `request` (IPv4 or IPv6), or `None` when it is not a
/// well-formed echo request of its family.
pub fn echo_reply(request: &[u8]) -> Option<Vec<u8>> {
    match request.first()? >> 4 {
        4 => icmpv4_echo_reply(request),
        6 => icmpv6_echo_reply(request),
        _ => None,
    }
}

/// The ICMPv6 echo reply to `request`, or `None` when it is not a well-formed IPv6 echo
/// request directly after the fixed header (a request behind extension headers is not
/// answered: its reply would have to carry or drop them, and pings do not use them).
pub fn icmpv6_echo_reply(request: &[u8]) -> Option<Vec<u8>> {
    const ECHO_REQUEST: u8 = 128;
    const ECHO_REPLY: u8 = 129;
    if request.first()? >> 4 != 6 || request.len() < IPV6_HEADER {
        return None;
    }
    let payload_len = usize::from(be16(request, 4)?);
    let total = IPV6_HEADER + payload_len;
    if payload_len < 8 || total > request.len() || request[6] != PROTO_ICMPV6 {
        return None;
    }
    if request[IPV6_HEADER] != ECHO_REQUEST || request[IPV6_HEADER + 1] != 0 {
        return None;
    }
    let mut reply = request[..total].to_vec();
    // Swap the addresses, fresh hop limit, then the checksum over the pseudo-header.
    reply.copy_within(8..24, 24);
    reply[8..24].copy_from_slice(&request[24..40]);
    reply[7] = 64;
    reply[IPV6_HEADER] = ECHO_REPLY;
    reply[IPV6_HEADER + 2..IPV6_HEADER + 4].fill(0);
    let sum = icmpv6_checksum(&reply);
    reply[IPV6_HEADER + 2..IPV6_HEADER + 4].copy_from_slice(&sum.to_be_bytes());
    Some(reply)
}

/// The ICMPv6 checksum of an IPv6 packet whose ICMPv6 message follows the fixed header:
/// over the pseudo-header (source, destination, upper-layer length, next header 58) and
/// the message (RFC 4443 2.3).
fn icmpv6_checksum(packet: &[u8]) -> u16 {
    let message = &packet[IPV6_HEADER..];
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend_from_slice(&packet[8..40]);
    pseudo.extend_from_slice(&(message.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
    pseudo.extend_from_slice(message);
    internet_checksum(&pseudo)
}

/// RFC 1071 one's-complement sum (0 over bytes that carry a valid checksum).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::net::IpAddr;

    #[test]
    fn echo_reply_swaps_addresses_and_keeps_checksums_valid() {
        // 100.64.0.2 -> 10.96.0.20, ICMP echo request id 1 seq 1 with payload "ping".
        let mut req = vec![
            0x45, 0, 0, 32, 0, 1, 0, 0, 64, PROTO_ICMP, 0, 0, 100, 64, 0, 2, 10, 96, 0, 20,
        ];
        req.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g']);
        let sum = internet_checksum(&req[..20]);
        req[10..12].copy_from_slice(&sum.to_be_bytes());
        let sum = internet_checksum(&req[20..]);
        req[22..24].copy_from_slice(&sum.to_be_bytes());

        let reply = icmpv4_echo_reply(&req).expect("an echo request");
        assert_eq!(&reply[12..16], &[10, 96, 0, 20]);
        assert_eq!(&reply[16..20], &[100, 64, 0, 2]);
        assert_eq!(reply[20], 0, "echo reply");
        assert_eq!(&reply[24..], &req[24..], "id, sequence and payload echoed");
        assert_eq!(internet_checksum(&reply[..20]), 0, "valid IPv4 header checksum");
        assert_eq!(internet_checksum(&reply[20..]), 0, "valid ICMP checksum");
        let parsed = parse(&reply).expect("the reply parses");
        assert_eq!(parsed.dst, std::net::IpAddr::from([100, 64, 0, 2]));
    }

    #[test]
    fn echo_reply_refuses_what_is_not_an_echo_request() {
        assert_eq!(icmpv4_echo_reply(&[]), None);
        assert_eq!(icmpv4_echo_reply(&[0x45; 19]), None);
        let mut reply = vec![0x45, 0, 0, 28, 0, 1, 0, 0, 64, PROTO_ICMP, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2];
        reply.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(icmpv4_echo_reply(&reply), None, "a reply is not answered");
        let mut tcp = reply.clone();
        tcp[9] = PROTO_TCP;
        assert_eq!(icmpv4_echo_reply(&tcp), None);
        let mut short = reply.clone();
        short[20] = 8;
        short[3] = 60;
        assert_eq!(icmpv4_echo_reply(&short), None, "total length beyond the buffer");
    }

    /// Fuzzing finding (gateway_packet): a later fragment whose payload happened to start
    /// like an echo request was answered, the fragment's bytes echoed as an ICMP message.
    #[test]
    fn echo_reply_refuses_fragments() {
        let mut req = vec![
            0x46, 0, 0, 32, 4, 255, 0, 171, 207, 1, 0, 0, 100, 64, 0, 2, 127, 96, 0, 10, 1, 1, 1, 0,
        ];
        req.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(icmpv4_echo_reply(&req), None, "a later fragment (offset 171)");
        req[6..8].copy_from_slice(&[0x20, 0]);
        assert_eq!(icmpv4_echo_reply(&req), None, "a first fragment (more fragments)");
        req[6..8].copy_from_slice(&[0x40, 0]);
        let reply = icmpv4_echo_reply(&req).expect("don't-fragment set: a whole datagram");
        assert_eq!(internet_checksum(&reply[24..]), 0, "valid ICMP checksum");
    }

    /// A minimal IPv4 packet (checksums left zero: the parser does not check them).
    pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    /// A minimal IPv6 packet without extension headers.
    pub(crate) fn ipv6(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = src.parse().unwrap();
        let dst: Ipv6Addr = dst.parse().unwrap();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.push(proto);
        p.push(64);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    pub(crate) fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    pub(crate) fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let len = (8 + payload.len()) as u16;
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    #[test]
    fn parses_tcp_syn() {
        let p = ipv4([100, 64, 0, 2], [127, 96, 0, 10], PROTO_TCP, &tcp(40000, 80, TCP_SYN));
        let pkt = parse(&p).unwrap();
        assert_eq!(pkt.src, IpAddr::from([100, 64, 0, 2]));
        assert_eq!(pkt.dst, IpAddr::from([127, 96, 0, 10]));
        assert_eq!(pkt.dst_port(), Some(80));
        assert_eq!(pkt.src_port(), Some(40000));
        assert!(pkt.is_tcp_syn());
    }

    #[test]
    fn parses_udp_payload() {
        let p = ipv4([1, 1, 1, 1], [2, 2, 2, 2], PROTO_UDP, &udp(5353, 53, b"hello"));
        match parse(&p).unwrap().transport {
            Transport::Udp {
                dst_port: 53, payload, ..
            } => assert_eq!(payload, b"hello"),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn parses_ipv6_tcp_udp_and_icmpv6() {
        let p = ipv6("fd6b:7261:7961::2", "fd00:96::a", PROTO_TCP, &tcp(40000, 80, TCP_SYN));
        let pkt = parse(&p).unwrap();
        assert_eq!(pkt.src, "fd6b:7261:7961::2".parse::<IpAddr>().unwrap());
        assert_eq!(pkt.dst, "fd00:96::a".parse::<IpAddr>().unwrap());
        assert_eq!((pkt.proto, pkt.dst_port(), pkt.len), (PROTO_TCP, Some(80), 60));
        assert!(pkt.is_tcp_syn());
        let p = ipv6(
            "fd6b:7261:7961::2",
            "fd6b:7261:7961::1",
            PROTO_UDP,
            &udp(5353, 53, b"q"),
        );
        assert!(matches!(
            parse(&p).unwrap().transport,
            Transport::Udp {
                dst_port: 53,
                payload: b"q",
                ..
            }
        ));
        let p = ipv6(
            "fd6b:7261:7961::2",
            "fd00:96::a",
            PROTO_ICMPV6,
            &[128, 0, 0, 0, 0, 1, 0, 1],
        );
        assert_eq!(parse(&p).unwrap().transport, Transport::Icmp { kind: 128, code: 0 });
    }

    /// `chain` as (next header, header bytes) pairs, then `l4` as protocol `proto`.
    fn ipv6_with(chain: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, (_, h)) in chain.iter().enumerate() {
            let mut h = h.clone();
            h[0] = chain.get(i + 1).map_or(proto, |n| n.0);
            body.extend_from_slice(&h);
        }
        body.extend_from_slice(l4);
        let mut p = ipv6(
            "fd6b:7261:7961::2",
            "fd00:96::a",
            chain.first().map_or(proto, |c| c.0),
            &body,
        );
        p.truncate(40 + body.len());
        p
    }

    #[test]
    fn ipv6_extension_headers_are_walked_or_refused() {
        let opts = |n: u8| {
            vec![0u8; 8 * (usize::from(n) + 1)]
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 1 { n } else { b })
                .collect::<Vec<u8>>()
        };
        let frag = |offset: u16, more: bool| {
            let f = (offset << 3) | u16::from(more);
            vec![0, 0, (f >> 8) as u8, f as u8, 0, 0, 0, 1]
        };
        // Hop-by-hop, routing (16 bytes), destination options, a first fragment: TCP found.
        let chain = [(0, opts(0)), (43, opts(1)), (60, opts(0)), (44, frag(0, true))];
        let p = ipv6_with(&chain, PROTO_TCP, &tcp(1, 443, TCP_SYN));
        let pkt = parse(&p).unwrap();
        assert_eq!((pkt.proto, pkt.dst_port()), (PROTO_TCP, Some(443)));
        // A later fragment has no transport header: no port, whatever its bytes say.
        let p = ipv6_with(&[(44, frag(3, false))], PROTO_TCP, &tcp(1, 443, TCP_SYN));
        assert_eq!(parse(&p).unwrap().transport, Transport::Other { proto: PROTO_TCP });
        // AH and ESP are not parsed: the protocol, no port (the ACL denies them).
        let p = ipv6_with(&[(0, opts(0))], 51, &[0u8; 16]);
        assert_eq!(parse(&p).unwrap().transport, Transport::Other { proto: 51 });
        assert_eq!(parse(&p).unwrap().dst_port(), None);
        // Nine extension headers: refused.
        let nine: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, opts(0))).collect();
        let p = ipv6_with(&nine, PROTO_UDP, &udp(1, 2, b""));
        assert_eq!(parse(&p), Err(ParseError::TooManyExtensions));
        let eight: Vec<(u8, Vec<u8>)> = (0..8).map(|_| (60, opts(0))).collect();
        assert!(parse(&ipv6_with(&eight, PROTO_UDP, &udp(1, 2, b""))).is_ok());
        // An extension header longer than the payload, or cut by it.
        let p = ipv6_with(&[(60, opts(0))], PROTO_UDP, &udp(1, 2, b""));
        let mut long = p.clone();
        long[41] = 4;
        assert_eq!(parse(&long), Err(ParseError::BadLength));
        let mut cut = p.clone();
        cut[4..6].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(parse(&cut), Err(ParseError::Truncated));
        // Bytes after the payload length are not read as headers.
        let mut padded = ipv6("fd6b:7261:7961::2", "fd00:96::a", 60, &[]);
        padded.extend_from_slice(&opts(0));
        assert_eq!(parse(&padded), Err(ParseError::Truncated));
    }

    #[test]
    fn malformed_ipv6_is_a_clear_error() {
        let good = ipv6("fd6b:7261:7961::2", "fd00:96::a", PROTO_TCP, &tcp(1, 80, TCP_SYN));
        assert_eq!(parse(&good[..39]), Err(ParseError::Truncated));
        assert_eq!(
            parse(&good[..50]),
            Err(ParseError::BadLength),
            "payload length past the end"
        );
        let mut short_tcp = good.clone();
        short_tcp[4..6].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse(&short_tcp), Err(ParseError::Truncated));
        let mut bad_udp = ipv6("fd6b:7261:7961::2", "fd00:96::a", PROTO_UDP, &udp(1, 2, b"abc"));
        bad_udp[44..46].copy_from_slice(&99u16.to_be_bytes());
        assert_eq!(parse(&bad_udp), Err(ParseError::BadLength));
        assert_eq!(
            ParseError::TooManyExtensions.to_string(),
            "more than 8 IPv6 extension headers"
        );
    }

    #[test]
    fn icmpv6_echo_reply_swaps_addresses_with_a_valid_checksum() {
        let mut msg = vec![128, 0, 0, 0, 0, 1, 0, 1];
        msg.extend_from_slice(b"ping");
        let req = ipv6("fd6b:7261:7961::2", "fd6b:7261:7961::1", PROTO_ICMPV6, &msg);
        let reply = echo_reply(&req).expect("an echo request");
        let pkt = parse(&reply).unwrap();
        assert_eq!(pkt.src, "fd6b:7261:7961::1".parse::<IpAddr>().unwrap());
        assert_eq!(pkt.dst, "fd6b:7261:7961::2".parse::<IpAddr>().unwrap());
        assert_eq!(pkt.transport, Transport::Icmp { kind: 129, code: 0 });
        assert_eq!(&reply[44..], &req[44..], "id, sequence and payload echoed");
        assert_eq!(reply[7], 64, "hop limit");
        // Computed independently (Python, RFC 4443 pseudo-header) for this reply.
        assert_eq!(&reply[42..44], &[0xcd, 0x85]);
        assert_eq!(icmpv6_checksum(&reply), 0, "the checksum checks");
    }

    #[test]
    fn icmpv6_echo_reply_refuses_what_is_not_an_echo_request() {
        let echo = [128, 0, 0, 0, 0, 1, 0, 1];
        let req = ipv6("fd6b:7261:7961::2", "fd00:96::a", PROTO_ICMPV6, &echo);
        assert!(icmpv6_echo_reply(&req).is_some());
        let mut reply = req.clone();
        reply[40] = 129;
        assert_eq!(icmpv6_echo_reply(&reply), None, "a reply is not answered");
        let mut code = req.clone();
        code[41] = 1;
        assert_eq!(icmpv6_echo_reply(&code), None);
        assert_eq!(icmpv6_echo_reply(&req[..47]), None, "payload length past the end");
        let short = ipv6("fd6b:7261:7961::2", "fd00:96::a", PROTO_ICMPV6, &echo[..4]);
        assert_eq!(icmpv6_echo_reply(&short), None);
        let behind = ipv6_with(&[(60, vec![0, 0, 0, 0, 0, 0, 0, 0])], PROTO_ICMPV6, &echo);
        assert_eq!(icmpv6_echo_reply(&behind), None, "behind an extension header");
        assert_eq!(echo_reply(&[0x70; 48]), None);
        assert_eq!(echo_reply(&[]), None);
    }

    #[test]
    fn parses_ipv6_udp_after_an_extension_header() {
        let u = udp(1, 2, b"x");
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((u.len() + 8) as u16).to_be_bytes());
        p.push(0); // hop-by-hop
        p.push(64);
        p.extend_from_slice(&[0xfd; 16]);
        p.extend_from_slice(&[0xfe; 16]);
        p.extend_from_slice(&[PROTO_UDP, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&u);
        let pkt = parse(&p).unwrap();
        assert_eq!(pkt.proto, PROTO_UDP);
        assert_eq!(pkt.dst_port(), Some(2));
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        let mut p = ipv4([1, 1, 1, 1], [2, 2, 2, 2], PROTO_TCP, &tcp(1, 2, 0));
        p[2] = 0xff;
        assert_eq!(parse(&p), Err(ParseError::BadLength));
        assert_eq!(parse(&[]), Err(ParseError::Empty));
        assert_eq!(parse(&[0x10]), Err(ParseError::Version(1)));
        assert_eq!(parse(&[0x45, 0]), Err(ParseError::Truncated));
    }

    #[test]
    fn never_panics_on_truncations_and_garbage() {
        let good = [
            ipv4([1, 1, 1, 1], [2, 2, 2, 2], PROTO_TCP, &tcp(1, 2, TCP_SYN)),
            ipv4([1, 1, 1, 1], [2, 2, 2, 2], PROTO_UDP, &udp(1, 2, b"abc")),
            ipv4([1, 1, 1, 1], [2, 2, 2, 2], PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]),
        ];
        for g in &good {
            for cut in 0..=g.len() {
                let _ = parse(&g[..cut]);
            }
            for i in 0..g.len() {
                for v in [0u8, 0x0f, 0x45, 0x60, 0xff] {
                    let mut m = g.clone();
                    m[i] = v;
                    let _ = parse(&m);
                }
            }
        }
        // Pseudo-random garbage (xorshift, deterministic).
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 90) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let mut b = bytes;
            if let Some(f) = b.first_mut() {
                *f = if x & 1 == 0 { 0x45 } else { 0x60 };
            }
            let _ = parse(&b);
        }
    }
}
