//! A WireGuard client that moves data the way wireguard-go has since 2023 (and Tailscale,
//! and the Linux kernel with GRO): a TUN device with TSO, so that the laptop's TCP hands it
//! 64 KiB segments, each split and sealed and the datagrams of one read sent as UDP GSO
//! trains; received with `UDP_GRO`, opened, and written to the TUN coalesced (tun-rs's GRO).
//! boringtun's noise `Tunn` under a lock, one thread each way.
//!
//! For the TCP benches: Debian's wireguard-go (2022) sends one datagram per system call, so
//! behind it the gateway pays a receive per datagram and its CPU per GB says more about the
//! client than about the gateway (`KURAYA_BENCH_CLIENT=gso` in `gateway_tun`).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use kuberaya_e2e::gateway::PeerKey;
use kuberaya_e2e::netns::Netns;
use kuberaya_e2e::wg_client::{Client, send_gso};
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

const OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// The WireGuard interface's MTU, as wg-quick sets it.
const MTU: u16 = 1420;
/// Datagrams per GSO train: as many of 1,452 bytes as fit the 64 KiB a UDP send takes.
const TRAIN: usize = 44;
/// What a datagram adds to the packet it seals (header 16, tag 16, padding to 16 at most).
const SEAL: usize = 32 + 16;
const POLL_MS: i32 = 100;

/// The running client; stops its threads and removes its device when dropped.
pub struct GsoClient {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counts: Arc<Counts>,
}

/// What the client moved: datagrams sent and the trains (system calls) they went in;
/// datagrams received and the receives they came in.
#[derive(Default, Debug)]
pub struct Counts {
    pub sent: AtomicU64,
    pub trains: AtomicU64,
    pub received: AtomicU64,
    pub receives: AtomicU64,
}

impl Counts {
    /// `sent/trains received/receives` since `before`, for a report line.
    pub fn snapshot(&self) -> [u64; 4] {
        [&self.sent, &self.trains, &self.received, &self.receives].map(|c| c.load(Ordering::Relaxed))
    }
}

impl Drop for GsoClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A client in `ns` for `peer`: a TUN device `iface` with the peer's address and `routes`,
/// a socket on `bind`, and a session with the gateway (`gateway_public` at `gateway`),
/// handshaken before this returns; its threads on `cpu` if given.
#[allow(clippy::too_many_arguments)]
pub fn start(
    ns: &Netns,
    cpu: Option<usize>,
    iface: &str,
    bind: Ipv4Addr,
    peer: &PeerKey,
    gateway_public: [u8; 32],
    gateway: SocketAddr,
    routes: &[&str],
) -> GsoClient {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ns_name, iface_name, peer) = (ns.name().to_string(), iface.to_string(), peer.clone());
    // The socket and the device belong to the namespace of the thread that creates them.
    std::thread::spawn(move || {
        Netns::attach(&ns_name).enter().unwrap();
        let sock = UdpSocket::bind((bind, 0)).unwrap();
        set_int(&sock, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
        set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        let mut c = Client::on(sock, &peer, gateway_public, gateway);
        c.connect();
        let dev = DeviceBuilder::new()
            .name(&iface_name)
            .ipv4(peer.address, 32, None)
            .mtu(MTU)
            .offload(true)
            .build_sync()
            .expect("a TUN device with offloads");
        assert!(dev.tcp_gso(), "the kernel refused the TUN's TSO");
        dev.set_nonblocking(true).unwrap();
        tx.send((c.tunn, c.sock, dev)).unwrap();
    })
    .join()
    .expect("the client's set-up");
    let (tunn, sock, dev) = rx.recv().unwrap();
    for r in routes {
        ns.ip(["route", "add", r, "dev", iface]).unwrap();
    }
    set_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 1);
    sock.set_read_timeout(Some(Duration::from_millis(POLL_MS as u64)))
        .unwrap();
    let (tunn, sock, dev) = (Arc::new(Mutex::new(tunn)), Arc::new(sock), Arc::new(dev));
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let up = {
        let (tunn, sock, dev, stop, counts) = (tunn.clone(), sock.clone(), dev.clone(), stop.clone(), counts.clone());
        std::thread::spawn(move || {
            cpu.inspect(|&c| super::pin_thread(c));
            up(&tunn, &sock, gateway, &dev, &stop, &counts)
        })
    };
    let down = {
        let (stop, counts) = (stop.clone(), counts.clone());
        std::thread::spawn(move || {
            cpu.inspect(|&c| super::pin_thread(c));
            down(&tunn, &sock, gateway, &dev, &stop, &counts)
        })
    };
    GsoClient {
        stop,
        threads: vec![up, down],
        counts,
    }
}

fn set_int(sock: &UdpSocket, level: i32, name: i32, value: i32) {
    if let Err(e) = super::set_int(sock, level, name, value) {
        panic!("setsockopt({level}, {name}): {e}");
    }
}

/// Sending a train; a full socket buffer (ENOBUFS) drops it, as a NIC's queue would.
fn send_train(sock: &UdpSocket, to: SocketAddr, data: &[u8], seg: usize) {
    if data.is_empty() {
        return;
    }
    if let Err(e) = send_gso(sock, to, data, seg)
        && e.raw_os_error() != Some(libc::ENOBUFS)
    {
        panic!("sending a GSO train of {} B in {seg} B datagrams: {e}", data.len());
    }
}

/// TUN → sealed datagrams → the gateway, in GSO trains (one size, the last may be shorter).
fn up(tunn: &Mutex<Tunn>, sock: &UdpSocket, gateway: SocketAddr, dev: &SyncDevice, stop: &AtomicBool, counts: &Counts) {
    let mut raw = vec![0u8; OFFSET + 65_536];
    let mut bufs = vec![vec![0u8; 2048]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut out = vec![0u8; IDEAL_BATCH_SIZE * (usize::from(MTU) + SEAL)];
    let mut timers = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if timers.elapsed() > Duration::from_millis(250) {
            timers = Instant::now();
            let mut b = [0u8; 256];
            if let TunnResult::WriteToNetwork(d) = tunn.lock().unwrap().update_timers(&mut b) {
                let _ = sock.send_to(d, gateway);
            }
        }
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, POLL_MS) } <= 0 {
            continue;
        }
        let n = match dev.recv_multiple(&mut raw, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("reading the client's TUN: {e}"),
        };
        // Seal under the lock, send without it; trains are cut where the size grows or
        // after a shorter datagram, and at TRAIN datagrams.
        let mut trains: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, seg)
        {
            let mut t = tunn.lock().unwrap();
            let (mut len, mut start, mut seg, mut count) = (0, 0, 0, 0);
            for i in 0..n {
                let room = &mut out[len..len + sizes[i] + SEAL];
                let TunnResult::WriteToNetwork(d) = t.encapsulate(&bufs[i][..sizes[i]], room) else {
                    continue; // no session (rekeying): dropped, TCP resends
                };
                let dl = d.len();
                if count > 0 && (dl > seg || count == TRAIN || (len - start) % seg != 0) {
                    trains.push((start, len, seg));
                    (start, count) = (len, 0);
                }
                if count == 0 {
                    seg = dl;
                }
                len += dl;
                count += 1;
            }
            if count > 0 {
                trains.push((start, len, seg));
            }
        }
        for (start, end, seg) in trains {
            send_train(sock, gateway, &out[start..end], seg);
            counts.trains.fetch_add(1, Ordering::Relaxed);
            counts
                .sent
                .fetch_add((end - start).div_ceil(seg) as u64, Ordering::Relaxed);
        }
    }
}

/// The gateway's datagrams (GRO trains split) → opened → the TUN, coalesced.
fn down(
    tunn: &Mutex<Tunn>,
    sock: &UdpSocket,
    gateway: SocketAddr,
    dev: &SyncDevice,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let mut data = vec![0u8; 65_536];
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| vec![0u8; 2 * OFFSET + 65_536]).collect();
    let mut gro = GROTable::new();
    let mut reply = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Some((len, seg)) = recv_gro(sock, &mut data) else {
            continue;
        };
        let seg = if seg == 0 { len } else { seg };
        counts.receives.fetch_add(1, Ordering::Relaxed);
        counts.received.fetch_add(len.div_ceil(seg) as u64, Ordering::Relaxed);
        let mut n = 0;
        {
            let mut t = tunn.lock().unwrap();
            for d in data[..len].chunks(seg) {
                let slot = &mut bufs[n];
                slot.resize(2 * OFFSET + 65_536, 0);
                match t.decapsulate(None, d, &mut slot[OFFSET..]) {
                    TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                        let l = p.len();
                        slot.truncate(OFFSET + l);
                        n += 1;
                    }
                    TunnResult::WriteToNetwork(p) => {
                        let _ = sock.send_to(p, gateway);
                        // boringtun hands queued packets out one call at a time.
                        while let TunnResult::WriteToNetwork(p) = t.decapsulate(None, &[], &mut reply) {
                            let _ = sock.send_to(p, gateway);
                        }
                    }
                    _ => {}
                }
                if n == bufs.len() {
                    break;
                }
            }
        }
        if n > 0 {
            // Writing to a TUN does not block; a refused write is a dropped batch.
            let _ = dev.send_multiple(&mut gro, &mut bufs[..n], OFFSET);
        }
    }
}

/// One receive with `UDP_GRO`: (bytes, segment size or 0), None on timeout.
fn recv_gro(sock: &UdpSocket, data: &mut [u8]) -> Option<(usize, usize)> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: all-zero is a valid msghdr; iov and control outlive the call and are sized as
    // declared.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let r = libc::recvmsg(sock.as_raw_fd(), &mut msg, 0);
        if r <= 0 {
            return None;
        }
        let mut seg = 0;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                seg = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>()) as usize;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Some((r as usize, seg))
    }
}
