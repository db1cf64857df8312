//! A WireGuard client of the test's own, over its own UDP socket: boringtun's noise `Tunn`
//! as one registered peer of a gateway, for what stock clients cannot do on demand (replay a
//! captured datagram, flood, send a GSO train of chosen packets). The tests that only need
//! a working peer use onetun or wireguard-go instead.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};

use crate::gateway::{Gateway, PeerKey, dns_query, random_bytes};

/// A WireGuard client over its own UDP socket.
pub struct Client {
    pub tunn: Tunn,
    pub sock: UdpSocket,
    pub gateway: SocketAddr,
    pub address: Ipv4Addr,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(peer: &PeerKey, gw: &Gateway) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        Client::on(sock, peer, gw.public, gw.udp)
    }

    /// A client on `sock` (bound where the caller wants it, say in a namespace) of the
    /// gateway whose public key is `gateway_public`, listening at `gateway`.
    pub fn on(sock: UdpSocket, peer: &PeerKey, gateway_public: [u8; 32], gateway: SocketAddr) -> Client {
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let tunn = peer.client_tunn(gateway_public, random_bytes::<4>()[0] as u32);
        Client {
            tunn,
            sock,
            gateway,
            address: peer.address,
            buf: vec![0u8; 65_536],
        }
    }

    /// Handshake, retrying for up to 10 s.
    pub fn connect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut out = vec![0u8; 2048];
            if let TunnResult::WriteToNetwork(p) = self.tunn.format_handshake_initiation(&mut out, true) {
                self.sock.send_to(p, self.gateway).unwrap();
            }
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                let Ok(n) = self.sock.recv(&mut self.buf) else { continue };
                let d = self.buf[..n].to_vec();
                let mut dst = vec![0u8; 65_536];
                if let TunnResult::WriteToNetwork(p) = self.tunn.decapsulate(None, &d, &mut dst) {
                    self.sock.send_to(p, self.gateway).unwrap();
                }
                if d.first() == Some(&2) {
                    return;
                }
            }
        }
        panic!("no handshake with the gateway within 10 s");
    }

    /// Encrypt `packet` into a datagram, without sending it.
    pub fn seal(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; packet.len() + 64];
        match self.tunn.encapsulate(packet, &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("encapsulate: {:?}", std::mem::discriminant(&other)),
        }
    }

    pub fn send(&mut self, packet: &[u8]) {
        let d = self.seal(packet);
        self.sock.send_to(&d, self.gateway).unwrap();
    }

    /// Decrypted packets received within `wait` (stops early after `want` packets).
    pub fn receive(&mut self, wait: Duration, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && got.len() < want {
            let Ok(n) = self.sock.recv(&mut self.buf) else { continue };
            let d = self.buf[..n].to_vec();
            let mut dst = vec![0u8; 65_536];
            match self.tunn.decapsulate(None, &d, &mut dst) {
                TunnResult::WriteToTunnelV4(p, _) => got.push(p.to_vec()),
                TunnResult::WriteToNetwork(p) => {
                    self.sock.send_to(p, self.gateway).unwrap();
                }
                _ => {}
            }
        }
        got
    }

    /// A DNS round trip through the tunnel: the session works.
    pub fn dns_works(&mut self, id: u16) -> bool {
        for attempt in 0..5u16 {
            self.send(&dns_query(self.address, id.wrapping_add(attempt)));
            if !self.receive(Duration::from_secs(1), 1).is_empty() {
                return true;
            }
        }
        false
    }

    /// Send sealed datagrams paced at ~`per_s` (batches every 10 ms).
    pub fn send_raw_paced(&self, datagrams: &[Vec<u8>], per_s: u64) {
        let batch = (per_s / 100).max(1) as usize;
        for chunk in datagrams.chunks(batch) {
            let t = Instant::now();
            for d in chunk {
                self.sock.send_to(d, self.gateway).unwrap();
            }
            std::thread::sleep(Duration::from_millis(10).saturating_sub(t.elapsed()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Services on loopback.

/// Send `datagrams` to `to` in one `sendmsg(2)` as one UDP GSO train (`UDP_SEGMENT`): all
/// of the first one's size but the last, which may be shorter. Over loopback the train
/// reaches a receiver with `UDP_GRO` in one piece.
pub fn send_gso_train(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> std::io::Result<()> {
    let seg = datagrams.first().map_or(0, Vec::len);
    assert!(
        datagrams.iter().rev().skip(1).all(|d| d.len() == seg) && datagrams.last().is_none_or(|d| d.len() <= seg),
        "a GSO train is of one size with a shorter last"
    );
    send_gso(sock, to, &datagrams.concat(), seg)
}

/// Send `data`, datagrams of `seg` bytes laid end to end (the last may be shorter), to `to`
/// in one `sendmsg(2)` with `UDP_SEGMENT`.
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, data: &[u8], seg: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(v4) = to else {
        panic!("IPv4 destinations only")
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: all-zero is a valid msghdr; every pointer set below outlives the call, and the
    // control buffer (32 bytes, aligned) holds CMSG_SPACE(2).
    let r = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&sin as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(2) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg as u16);
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
