//! The TUN data plane's TCP coalescing (`dataplane::tcp_gro`): the allowed packets of one
//! batch, as they come out of the tunnels, pushed in order. Input: packets, each a
//! big-endian `u16` length and that many bytes (lengths past the end take what is left);
//! byte 0, when odd, first turns the input into a burst of well-formed segments of a few
//! connections (the rest of the input says which connection, what gap, which flags), so
//! that the coalescing paths are reached and not only the refusals.
//!
//! Besides "never panics": nothing is lost or invented (the segments the kernel will cut
//! each written packet into carry, with their headers, exactly the bytes pushed); a packet
//! written alone is written as it came; a super-packet has lengths that agree, a valid
//! IPv4 header checksum, and a virtio-net header the kernel accepts (TCP GSO, the checksum
//! asked for at the TCP header, segments of the first one's size).
#![no_main]

use kuberaya_gateway::dataplane::tcp_gro::{TcpGro, VNET};
// The packet module's checksum: independent of the coalescer's (tun_rs's).
use kuberaya_gateway::packet::internet_checksum as checksum;
use libfuzzer_sys::fuzz_target;

const MSS: usize = 1380;

/// A TCP/IPv4 segment of connection `flow` (its source port).
fn segment(flow: u8, seq: u32, flags: u8, ttl: u8, len: usize) -> Vec<u8> {
    let total = 20 + 20 + len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = ttl;
    p[9] = 6;
    p[12..16].copy_from_slice(&[100, 64, 0, 2]);
    p[16..20].copy_from_slice(&[10, 96, 0, 20]);
    p[20..22].copy_from_slice(&(40000 + u16::from(flow)).to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = (seq as usize + i) as u8;
    }
    p
}

/// A burst of segments steered by `data`: 3 bytes each (connection, gap or size, flags).
fn burst(data: &[u8]) -> Vec<Vec<u8>> {
    let mut next = [0u32; 4];
    data.chunks_exact(3)
        .take(200)
        .map(|c| {
            let flow = c[0] % 4;
            let len = if c[1] < 200 { MSS } else { usize::from(c[1]) * 4 };
            let seq = next[usize::from(flow)].wrapping_add(if c[1] % 16 == 15 { 7 } else { 0 });
            let flags = match c[2] % 8 {
                0 => 0x18,        // ACK|PSH
                1 => 0x11,        // FIN
                2 => 0x10 | 0x40, // ECE
                _ => 0x10,
            };
            let ttl = if c[2] >= 250 { 63 } else { 64 };
            next[usize::from(flow)] = seq.wrapping_add(len as u32);
            segment(flow, seq, flags, ttl, len)
        })
        .collect()
}

fn raw(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 200 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
        out.push(data[2..2 + n].to_vec());
        data = &data[2 + n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let packets = if mode % 2 == 1 { burst(rest) } else { raw(rest) };
    let mut gro = TcpGro::new(usize::from(mode >> 1) % 16 + 1);
    let mut written: Vec<Vec<u8>> = Vec::new();
    for p in &packets {
        if !gro.push(p) {
            written.extend(gro.finish().map(<[u8]>::to_vec));
            gro.clear();
            assert!(gro.push(p), "an empty queue takes any packet");
        }
    }
    written.extend(gro.finish().map(<[u8]>::to_vec));
    gro.clear();
    assert!(gro.is_empty());

    let mut cut_bytes = 0usize;
    let mut alone = Vec::new();
    for w in &written {
        let (hdr, p) = w.split_at(VNET);
        let (flags, gso_type) = (hdr[0], hdr[1]);
        let [hdr_len, gso_size, csum_start, csum_offset] =
            [2, 4, 6, 8].map(|i| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]])));
        if gso_type == 0 {
            assert_eq!(hdr, [0; VNET], "a packet alone asks nothing of the kernel");
            cut_bytes += p.len();
            alone.push(p.to_vec());
            continue;
        }
        assert!(p.len() <= 65_535, "{} bytes in one write", p.len());
        let v6 = p[0] >> 4 == 6;
        let iph = if v6 { 40 } else { 20 };
        assert_eq!(gso_type, if v6 { 4 } else { 1 }, "TCP GSO of the packet's family");
        assert_eq!(
            (flags, csum_start, csum_offset),
            (1, iph, 16),
            "the TCP checksum asked for"
        );
        let ip_len = if v6 {
            40 + usize::from(u16::from_be_bytes([p[4], p[5]]))
        } else {
            assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum");
            usize::from(u16::from_be_bytes([p[2], p[3]]))
        };
        assert_eq!(ip_len, p.len(), "the IP length says what was written");
        assert_eq!(hdr_len, iph + usize::from(p[iph + 12] >> 4) * 4);
        let payload = p.len() - hdr_len;
        assert!(
            gso_size > 0 && payload > gso_size,
            "a super-packet holds two segments or more"
        );
        let segments = payload.div_ceil(gso_size);
        cut_bytes += payload + segments * hdr_len;
    }
    let pushed: usize = packets.iter().map(Vec::len).sum();
    assert_eq!(cut_bytes, pushed, "bytes pushed and bytes the kernel will cut differ");
    for a in &alone {
        assert!(packets.contains(a), "a packet alone was changed");
    }
});
