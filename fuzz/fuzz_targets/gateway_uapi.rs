//! The gateway's WireGuard UAPI (`uapi::Session`, `uapi::Step::answer`, `uapi::format_get`)
//! on any bytes a client writes to its socket: `get=1`, `set=1` with keys, preshared keys,
//! endpoints, allowed IPs, `remove=true`, `replace_allowed_ips`, and whatever the fuzzer
//! makes of them (bad hex, missing blank lines, huge numbers, repeated keys, long lines).
//!
//! Input: the first `HEADER` bytes pick the device state the gateway loop would give (up
//! to three peers; preshared keys, IPv4/IPv6/scoped endpoints, handshake times, counters);
//! the rest is the request stream, cut into pieces as the socket task reads it (a line, or
//! `MAX_LINE` bytes of a longer one).
//!
//! Checked besides "no panic":
//! - the requests answered are the ones a plain reading of the stream finds (lines split
//!   at `\n` whatever their length; requests ended by a blank line or the end; an unknown
//!   operation answered and the connection closed), in order, one answer each;
//! - every `set` fails, answering an errno other than 0 (-1, EPERM: the UAPI is read-only,
//!   peers come from `VpnPeer` resources), and changes nothing: a `get` after it, like
//!   every `get`, reads back the device state as a `wg` client parses it, field by field.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, UNIX_EPOCH};

use ipnet::IpNet;
use kuberaya_gateway::keys::{PresharedKey, PublicKey};
use kuberaya_gateway::uapi::{DeviceState, MAX_LINE, MAX_SET_LINES, PeerState, Session, Step};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 16;

fn state(h: &[u8; HEADER]) -> DeviceState {
    let peers = (0..usize::from(h[0] % 4))
        .map(|i| {
            let b = h[1 + i];
            let k = |x: u8| [b ^ x; 32];
            let endpoint = match (h[4] >> (2 * i)) & 3 {
                0 => None,
                1 => Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(192, 0, 2, b),
                    u16::from(b) << 8,
                ))),
                2 => Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv4Addr::new(198, 51, 100, b).to_ipv6_mapped(),
                    51820,
                    0,
                    0,
                ))),
                // A link-local source keeps its scope; the flow label is not shown.
                _ => Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, u16::from(b)),
                    u16::MAX,
                    u32::from(h[8]),
                    u32::from(b),
                ))),
            };
            let secs = u64::from_be_bytes([h[9], h[10], h[11], h[12], h[13], h[14], h[15], b]);
            let last_handshake = match (h[5] >> (2 * i)) & 3 {
                0 => None,
                1 => Some(UNIX_EPOCH + Duration::new(secs % 4_000_000_000, u32::from(b) * 3_000_000)),
                2 => UNIX_EPOCH.checked_sub(Duration::from_secs(secs % 1_000_000 + 1)),
                _ => UNIX_EPOCH.checked_add(Duration::new(secs >> 2, 999_999_999)),
            };
            let mut allowed_ips: Vec<IpNet> = vec![format!("100.64.{i}.{b}/32").parse().unwrap()];
            if h[6] & (1 << i) != 0 {
                allowed_ips.push(format!("fd00::{b:x}/128").parse().unwrap());
                allowed_ips.push(format!("10.{b}.0.1/{}", b % 33).parse().unwrap());
            }
            PeerState {
                public_key: PublicKey(k(0)),
                // An all-zero key is "no preshared key" on the wire, as in WireGuard.
                preshared_key: match (h[7] >> (2 * i)) & 3 {
                    0 => None,
                    1 => Some(PresharedKey([0; 32])),
                    _ => Some(PresharedKey(k(0x5a))),
                },
                endpoint,
                allowed_ips,
                last_handshake,
                rx_bytes: if b & 1 != 0 { u64::MAX } else { secs },
                tx_bytes: secs.rotate_left(7),
                persistent_keepalive: u16::from_be_bytes([h[8], b]),
            }
        })
        .collect();
    DeviceState {
        private_key: [h[3]; 32].into(),
        listen_port: u16::from_be_bytes([h[1], h[2]]),
        peers,
    }
}

/// The state as a `get` answer can carry it.
fn on_the_wire(mut s: DeviceState) -> DeviceState {
    for p in &mut s.peers {
        if p.preshared_key.as_ref().is_some_and(|k| k.0 == [0; 32]) {
            p.preshared_key = None;
        }
        if let Some(SocketAddr::V6(a)) = &mut p.endpoint {
            a.set_flowinfo(0);
        }
        let since = p.last_handshake.and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        p.last_handshake = since.filter(|d| !d.is_zero()).map(|d| UNIX_EPOCH + d);
    }
    s
}

fn hex32(v: &str) -> [u8; 32] {
    assert_eq!(v.len(), 64, "{v:?}");
    let mut out = [0; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap_or_else(|e| panic!("{v:?}: {e}"));
    }
    out
}

/// A `get` answer read as `wg` reads it: `key=value` lines, `errno=0` last, then a blank line.
fn parse_get(answer: &str) -> DeviceState {
    let body = answer
        .strip_suffix("errno=0\n\n")
        .unwrap_or_else(|| panic!("{answer:?}"));
    let mut s = DeviceState {
        private_key: [0; 32].into(),
        listen_port: 0,
        peers: Vec::new(),
    };
    let mut secs = 0u64;
    for line in body.lines() {
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
        let num = || v.parse::<u64>().unwrap_or_else(|e| panic!("{line:?}: {e}"));
        if k == "private_key" {
            s.private_key = hex32(v).into();
            continue;
        }
        if k == "listen_port" {
            s.listen_port = v.parse().unwrap();
            continue;
        }
        if k == "public_key" {
            s.peers.push(PeerState {
                public_key: PublicKey(hex32(v)),
                preshared_key: None,
                endpoint: None,
                allowed_ips: Vec::new(),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: 0,
            });
            continue;
        }
        let p = s
            .peers
            .last_mut()
            .unwrap_or_else(|| panic!("{line:?} before a public_key"));
        match k {
            "preshared_key" => p.preshared_key = Some(PresharedKey(hex32(v))).filter(|k| k.0 != [0; 32]),
            "protocol_version" => assert_eq!(v, "1"),
            "endpoint" => p.endpoint = Some(v.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))),
            "last_handshake_time_sec" => secs = num(),
            "last_handshake_time_nsec" => {
                let d = Duration::new(secs, u32::try_from(num()).unwrap());
                p.last_handshake = (!d.is_zero()).then(|| UNIX_EPOCH + d);
            }
            "tx_bytes" => p.tx_bytes = num(),
            "rx_bytes" => p.rx_bytes = num(),
            "persistent_keepalive_interval" => p.persistent_keepalive = v.parse().unwrap(),
            "allowed_ip" => p
                .allowed_ips
                .push(v.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))),
            _ => panic!("unknown key in {line:?}"),
        }
    }
    s
}

#[derive(Debug, PartialEq)]
enum Kind {
    Get,
    Set,
    Unknown,
}

/// The requests of a stream, read plainly: whole lines, whatever their length.
fn model(stream: &[u8]) -> Vec<Kind> {
    let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    if stream.ends_with(b"\n") || stream.is_empty() {
        lines.pop();
    }
    let mut out = Vec::new();
    let mut open: Option<Kind> = None;
    for line in lines {
        match &open {
            None if line.is_empty() => {}
            None => {
                let mut op = line;
                while let [rest @ .., b'\r'] = op {
                    op = rest;
                }
                match op {
                    b"get=1" => open = Some(Kind::Get),
                    b"set=1" => open = Some(Kind::Set),
                    _ => {
                        out.push(Kind::Unknown);
                        return out;
                    }
                }
            }
            Some(_) if line.is_empty() => out.extend(open.take()),
            Some(_) => {}
        }
    }
    out.extend(open);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((header, stream)) = data.split_first_chunk::<HEADER>() else {
        return;
    };
    // MAX_SET_LINES ends a set early; the plain reading does not model it.
    if stream.len() >= MAX_SET_LINES {
        return;
    }
    let device = state(header);
    let expected_get = on_the_wire(device.clone());

    let mut session = Session::default();
    let mut answers = Vec::new();
    let mut rest = stream;
    let mut closed = false;
    while !rest.is_empty() && !closed {
        let window = &rest[..rest.len().min(MAX_LINE)];
        let n = window.iter().position(|&b| b == b'\n').map_or(window.len(), |i| i + 1);
        let step = session.line(&rest[..n]);
        rest = &rest[n..];
        closed = step.closes();
        answers.extend(step.answer(Some(&device)).map(|a| (step, a)));
    }
    if !closed {
        let step = session.end();
        answers.extend(step.answer(Some(&device)).map(|a| (step, a)));
    }

    let kinds = model(stream);
    assert_eq!(answers.len(), kinds.len(), "answers {answers:?} for requests {kinds:?}");
    for ((step, answer), kind) in answers.iter().zip(&kinds) {
        match kind {
            Kind::Get => {
                assert_eq!(*step, Step::Get);
                assert_eq!(parse_get(answer), expected_get, "{answer}");
            }
            Kind::Set => {
                assert!(matches!(step, Step::RefuseSet { .. }), "{step:?}");
                let errno: i32 = answer
                    .strip_prefix("errno=")
                    .and_then(|a| a.strip_suffix("\n\n"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{answer:?}"));
                assert_ne!(errno, 0, "a set that fails answers an errno");
            }
            Kind::Unknown => {
                assert!(matches!(step, Step::RefuseUnknown(_)), "{step:?}");
                assert_eq!(answer, "errno=-22\n\n");
            }
        }
    }
});
