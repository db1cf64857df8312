//! The gateway loop: one UDP socket, the [`PeerTable`], the access rules and a
//! [`DataPlane`], driven by datagrams, flow wake-ups, timers and source snapshots.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::acl::{Acl, Catalog, Verdict};
use crate::dataplane::{DataPlane, Inbound, Policy};
use crate::http::Health;
use crate::keys::PrivateKey;
use crate::metrics::{FlowLabels, Metrics, PeerLabels, StateLabels};
use crate::packet;
use crate::peers::{self, PeerId, TunnelConfig, Validation};
use crate::source::{GatewayReport, PeerReport, PeerSnapshot, ServiceSnapshot};
use crate::tunnel::{BUF_SIZE, PeerTable, TunnelIo, TunnelStats};
use crate::uapi::{DeviceState, PeerState, StateRequest};

/// How often timers run (keepalives, rekeys, expiry of peers).
pub const TICK: Duration = Duration::from_millis(250);
/// Datagrams read per wake-up before the data plane gets a turn.
const RECV_BATCH: usize = 64;

/// The gateway's own settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub tunnel: TunnelConfig,
    pub handshake_limit: u64,
}

/// Datagrams per `sendmmsg(2)` call.
const SEND_BATCH: usize = 64;

/// Send up to [`SEND_BATCH`] of `sends` (slices of `buf`) with one `sendmmsg(2)`, without
/// blocking. Returns how many went out.
fn send_batch(socket: &UdpSocket, sends: &[(SocketAddr, usize, usize)], buf: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = sends.len().min(SEND_BATCH);
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut addrs: [libc::sockaddr_storage; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    for (i, &(to, start, len)) in sends[..n].iter().enumerate() {
        let name_len = match to {
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

/// What the [`PeerTable`] asked for, packed back to back in buffers that keep their
/// capacity from one round to the next: no allocation per packet.
#[derive(Default)]
struct Collect {
    /// (destination, start, length) in `send_buf`.
    sends: Vec<(SocketAddr, usize, usize)>,
    send_buf: Vec<u8>,
    /// (peer address, start, length) in `delivered_buf`.
    delivered: Vec<(Ipv4Addr, usize, usize)>,
    delivered_buf: Vec<u8>,
}

impl TunnelIo for Collect {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.sends.push((to, self.send_buf.len(), datagram.len()));
        self.send_buf.extend_from_slice(datagram);
    }
    fn deliver(&mut self, peer: Ipv4Addr, packet: &[u8]) {
        self.delivered.push((peer, self.delivered_buf.len(), packet.len()));
        self.delivered_buf.extend_from_slice(packet);
    }
}

/// Everything the loop owns.
pub struct Gateway {
    cfg: GatewayConfig,
    table: PeerTable,
    dp: Box<dyn DataPlane>,
    peers: PeerSnapshot,
    services: ServiceSnapshot,
    validation: Validation,
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
    buf: Vec<u8>,
    io: Collect,
    last_stats: HashMap<PeerId, TunnelStats>,
    /// Kept for the UAPI `get` answer (`wg show` derives the public key from it).
    private_key: PrivateKey,
    uapi: Option<mpsc::Receiver<StateRequest>>,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, key: PrivateKey, dp: Box<dyn DataPlane>, metrics: Arc<Metrics>) -> Self {
        Gateway {
            table: PeerTable::new(key.clone(), cfg.handshake_limit),
            cfg,
            dp,
            peers: PeerSnapshot::default(),
            services: ServiceSnapshot::default(),
            validation: Validation::default(),
            policy: Arc::new(Policy::default()),
            metrics,
            buf: vec![0u8; BUF_SIZE],
            io: Collect::default(),
            last_stats: HashMap::new(),
            private_key: key,
            uapi: None,
        }
    }

    /// Where the UAPI socket task ([`crate::uapi::UapiListener::serve`]) asks for the
    /// device's state; the loop answers between packets.
    pub fn uapi_requests(&mut self) -> mpsc::Sender<StateRequest> {
        let (tx, rx) = mpsc::channel(16);
        self.uapi = Some(rx);
        tx
    }

    /// The device as `wg show` sees it: every peer's key, endpoint, tunnel address,
    /// last handshake and byte counters.
    fn device_state(&self, listen_port: u16) -> DeviceState {
        let now = SystemTime::now();
        let psks: HashMap<_, _> = self
            .validation
            .accepted
            .iter()
            .filter_map(|p| p.preshared_key.as_ref().map(|k| (p.public_key, k)))
            .collect();
        let mut peers: Vec<PeerState> = self
            .table
            .peers()
            .map(|t| {
                let s = t.stats();
                PeerState {
                    public_key: t.public_key(),
                    preshared_key: psks.get(&t.public_key()).map(|k| (*k).clone()),
                    endpoint: t.endpoint(),
                    allowed_ips: vec![ipnet::IpNet::V4(ipnet::Ipv4Net::from(t.address()))],
                    last_handshake: s.since_last_handshake.and_then(|d| now.checked_sub(d)),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    persistent_keepalive: 0,
                }
            })
            .collect();
        peers.sort_by_key(|p| p.allowed_ips.first().copied());
        DeviceState {
            private_key: self.private_key.to_x25519().to_bytes(),
            listen_port,
            peers,
        }
    }

    /// Re-validate the peers (expiry included) and apply any change.
    fn refresh(&mut self, services_changed: bool) {
        let v = peers::validate(&self.peers.peers, &self.cfg.tunnel, k8s_openapi::jiff::Timestamp::now());
        let peers_changed = v.accepted != self.validation.accepted;
        if peers_changed {
            let before: HashMap<PeerId, Ipv4Addr> = self.table.peers().map(|t| (t.id().clone(), t.address())).collect();
            let report = self.table.sync(&v.accepted);
            for id in &report.removed {
                if let Some(a) = before.get(id) {
                    self.dp.peer_removed(*a);
                }
                tracing::info!(peer = %id, "peer removed; session dropped");
            }
            for id in &report.added {
                tracing::info!(peer = %id, "peer added");
            }
        }
        if v.rejected != self.validation.rejected {
            for (id, r) in &v.rejected {
                tracing::info!(peer = %id, reason = r.reason(), message = %r, "peer rejected");
            }
        }
        if peers_changed || services_changed {
            let catalog = Catalog::new(self.services.services.iter().cloned());
            let acl = Acl::compile(self.cfg.tunnel.gateway_address(), &v.accepted, &catalog);
            self.policy = Arc::new(Policy { acl, catalog });
            self.dp.set_policy(self.policy.clone());
        }
        self.metrics
            .peers
            .get_or_create(&StateLabels {
                state: "accepted".into(),
            })
            .set(v.accepted.len() as i64);
        self.metrics
            .peers
            .get_or_create(&StateLabels {
                state: "rejected".into(),
            })
            .set(v.rejected.len() as i64);
        self.validation = v;
    }

    fn datagram(&mut self, from: SocketAddr, d: &[u8]) {
        if let Err(e) = self.table.handle_datagram(from, d, &mut self.buf, &mut self.io) {
            let peer = e.peer().map(|p| p.to_string()).unwrap_or_default();
            let label = e.label();
            tracing::debug!(%from, error = %e, "datagram dropped");
            self.metrics.dropped_packet(&peer, label);
        }
        self.deliver();
    }

    /// Judge every decrypted packet and hand it to the data plane.
    fn deliver(&mut self) {
        let now = Instant::now();
        let delivered = std::mem::take(&mut self.io.delivered);
        let buf = std::mem::take(&mut self.io.delivered_buf);
        for &(peer_addr, start, len) in &delivered {
            let bytes = &buf[start..start + len];
            let Some(peer) = self.table.by_address(peer_addr).map(|t| t.id().clone()) else {
                continue;
            };
            let Ok(pkt) = packet::parse(bytes) else {
                self.metrics.dropped_packet(&peer.to_string(), "malformed_packet");
                continue;
            };
            let verdict = self.policy.acl.check(peer_addr, &pkt);
            tracing::trace!(
                peer = %peer, src = %pkt.src, dst = %pkt.dst, proto = pkt.proto, port = ?pkt.dst_port(),
                len = bytes.len(), verdict = verdict.label(), "packet from tunnel"
            );
            match verdict {
                Verdict::Spoofed => {
                    self.metrics.dropped_packet(&peer.to_string(), "spoofed");
                    tracing::debug!(peer = %peer, src = %pkt.src, "spoofed source dropped");
                    continue;
                }
                Verdict::Denied => {
                    self.metrics.dropped_packet(&peer.to_string(), "not_allowed");
                    if pkt.is_tcp_syn() {
                        self.metrics
                            .flows
                            .get_or_create(&FlowLabels {
                                peer: peer.to_string(),
                                verdict: "denied".into(),
                            })
                            .inc();
                    }
                }
                Verdict::Allow | Verdict::Local => {
                    if pkt.is_tcp_syn() {
                        self.metrics
                            .flows
                            .get_or_create(&FlowLabels {
                                peer: peer.to_string(),
                                verdict: "allowed".into(),
                            })
                            .inc();
                    }
                }
            }
            self.dp.inbound(
                Inbound {
                    peer: &peer,
                    peer_addr,
                    bytes,
                    packet: &pkt,
                    verdict,
                },
                now,
            );
        }
        // Back for the next round, emptied but with their capacity.
        self.io.delivered = delivered;
        self.io.delivered.clear();
        self.io.delivered_buf = buf;
        self.io.delivered_buf.clear();
    }

    /// Collect the data plane's packets and encrypt them to their peers.
    fn outbound(&mut self) {
        let now = Instant::now();
        let Gateway { dp, table, buf, io, .. } = self;
        dp.outbound(now, &mut |p: &[u8]| {
            if let Ok(parsed) = packet::parse(p) {
                let r = table.send_to(parsed.dst, p, buf, io);
                tracing::trace!(dst = %parsed.dst, proto = parsed.proto, len = p.len(), result = ?r, "packet to tunnel");
            }
        });
    }

    fn tick(&mut self) {
        self.table.tick(Instant::now(), &mut self.buf, &mut self.io);
        self.refresh(false);
    }

    /// The per-peer report, and metrics deltas since the last one.
    fn report(&mut self) -> GatewayReport {
        let now = SystemTime::now();
        let mut out = GatewayReport::default();
        let mut connected = 0;
        for t in self.table.peers() {
            let s = t.stats();
            let labels = PeerLabels {
                peer: t.id().to_string(),
            };
            let last = self.last_stats.get(t.id()).copied().unwrap_or_default();
            self.metrics
                .rx_bytes
                .get_or_create(&labels)
                .inc_by(s.rx_bytes.saturating_sub(last.rx_bytes));
            self.metrics
                .tx_bytes
                .get_or_create(&labels)
                .inc_by(s.tx_bytes.saturating_sub(last.tx_bytes));
            self.metrics
                .handshakes
                .get_or_create(&labels)
                .inc_by(s.handshakes.saturating_sub(last.handshakes));
            if s.since_last_handshake.is_some_and(|d| d < Duration::from_secs(180)) {
                connected += 1;
            }
            self.last_stats.insert(t.id().clone(), s);
        }
        self.metrics
            .peers
            .get_or_create(&StateLabels {
                state: "connected".into(),
            })
            .set(connected);
        let c = self.dp.counters();
        self.metrics
            .open_flows
            .get_or_create(&StateLabels { state: "tcp".into() })
            .set(c.tcp_flows_open as i64);
        self.metrics
            .open_flows
            .get_or_create(&StateLabels { state: "udp".into() })
            .set(c.udp_flows_open as i64);
        for input in &self.peers.peers {
            let id = &input.id;
            let outcome = match (self.validation.accepted(id), self.validation.rejection(id)) {
                (Some(a), _) => Ok(a.address),
                (None, Some(r)) => Err(r.clone()),
                (None, None) => continue,
            };
            let stats = outcome
                .as_ref()
                .ok()
                .and_then(|a| self.table.by_address(*a))
                .map(|t| t.stats())
                .unwrap_or_default();
            out.peers.push(PeerReport {
                id: id.clone(),
                generation: input.generation,
                outcome,
                last_handshake: stats.since_last_handshake.and_then(|d| now.checked_sub(d)),
                rx_bytes: stats.rx_bytes,
                tx_bytes: stats.tx_bytes,
            });
        }
        out
    }

    fn flush(&mut self, socket: &UdpSocket) {
        let io = &mut self.io;
        let mut done = 0;
        while done < io.sends.len() {
            match send_batch(socket, &io.sends[done..], &io.send_buf) {
                Ok(n) if n > 0 => done += n,
                // UDP: a full socket buffer drops (the first datagram), as a network would.
                _ => done += 1,
            }
        }
        io.sends.clear();
        io.send_buf.clear();
    }

    /// Run until `shutdown` resolves.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        mut self,
        socket: UdpSocket,
        mut peers: watch::Receiver<PeerSnapshot>,
        mut services: watch::Receiver<ServiceSnapshot>,
        report: watch::Sender<GatewayReport>,
        health: Arc<Health>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.peers = peers.borrow_and_update().clone();
        self.services = services.borrow_and_update().clone();
        self.refresh(true);
        health.set_ready(self.peers.loaded && self.services.loaded);
        let waker = self.dp.waker();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_report = Instant::now();
        let mut recv = vec![0u8; 65_536];
        let mut peers_open = true;
        let mut services_open = true;
        let listen_port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut uapi = self.uapi.take();
        tokio::pin!(shutdown);
        loop {
            let delay = self.dp.poll_delay(Instant::now()).unwrap_or(Duration::from_secs(1));
            tokio::select! {
                _ = &mut shutdown => break,
                r = socket.recv_from(&mut recv) => {
                    match r {
                        Ok((n, from)) => self.datagram(from, &recv[..n]),
                        Err(e) => tracing::debug!(error = %e, "recv_from"),
                    }
                    for _ in 1..RECV_BATCH {
                        match socket.try_recv_from(&mut recv) {
                            Ok((n, from)) => self.datagram(from, &recv[..n]),
                            Err(_) => break,
                        }
                    }
                }
                _ = waker.notified() => {}
                r = async { uapi.as_mut()?.recv().await }, if uapi.is_some() => match r {
                    Some(reply) => { let _ = reply.send(self.device_state(listen_port)); }
                    None => uapi = None,
                },
                _ = tokio::time::sleep(delay) => {}
                _ = tick.tick() => {
                    self.tick();
                    if last_report.elapsed() >= Duration::from_secs(1) {
                        last_report = Instant::now();
                        let r = self.report();
                        report.send_if_modified(|old| if *old != r { *old = r; true } else { false });
                    }
                }
                r = peers.changed(), if peers_open => {
                    if r.is_err() { peers_open = false; continue; }
                    self.peers = peers.borrow_and_update().clone();
                    self.refresh(false);
                    health.set_ready(self.peers.loaded && self.services.loaded);
                }
                r = services.changed(), if services_open => {
                    if r.is_err() { services_open = false; continue; }
                    self.services = services.borrow_and_update().clone();
                    self.refresh(true);
                    health.set_ready(self.peers.loaded && self.services.loaded);
                }
            }
            self.outbound();
            self.flush(&socket);
        }
        Ok(())
    }
}
