//! The unprivileged data plane: no TUN, no NET_ADMIN.
//!
//! - TCP: for each allowed new connection (a SYN to an allowed ClusterIP:port) a smoltcp
//!   socket is made to listen on exactly that destination (the interface accepts any
//!   destination: AnyIP with a default route through its own address), and a tokio task
//!   connects to the same ClusterIP:port. Bytes are carried both ways through bounded
//!   channels: the data plane reads from the smoltcp socket only when the channel to the
//!   Service has room, so a slow Service closes the peer's TCP window (backpressure);
//!   half-closes are passed on (FIN ↔ `shutdown(Write)`).
//! - UDP: relayed per flow (peer address and port, destination) over a connected tokio
//!   socket, expiring after [`UDP_IDLE`] without traffic. DNS to the gateway's own address
//!   is answered by [`crate::dns`] (TCP DNS too).
//! - ICMP echo to an allowed ClusterIP (or the gateway) is answered by smoltcp.
//! - Denied TCP gets a RST from a second, socket-less smoltcp interface (so a denied SYN can
//!   never meet a listening socket); other denied packets are dropped. One audit line per
//!   flow (target `audit`): peer, destination, Service, port, verdict, bytes, duration;
//!   denied flows within a per-peer budget ([`crate::audit`]), the rest summed in one line.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{DataPlane, FlowCounters, Inbound, Policy};
use crate::acl::Verdict;
use crate::audit::AuditBudget;
use crate::dns::{DnsAnswer, Resolver};
use crate::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_RST, Transport};
use crate::peers::PeerId;

/// The MTU of the tunnel (WireGuard's usual 1420).
pub const MTU: usize = 1420;
/// Per-direction buffer of each TCP flow's smoltcp socket.
const TCP_BUFFER: usize = 256 * 1024;
/// Chunks in flight between a flow and its Service connection, each direction.
const CHANNEL_CHUNKS: usize = 16;
const READ_CHUNK: usize = 16 * 1024;
/// A UDP flow ends after this long without traffic.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Connecting to a Service gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A TCP flow with no traffic at all for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(15 * 60);
/// Upstream DNS answers are awaited this long.
const DNS_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many TCP/UDP flows at once (each TCP flow holds 2 × TCP_BUFFER).
const MAX_FLOWS: usize = 4096;
/// Bound on the smoltcp rounds in one `outbound` call.
const MAX_ROUNDS: usize = 16;

/// Configuration of the userspace data plane.
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    /// The gateway's tunnel address.
    pub gateway: Ipv4Addr,
    pub cluster_domain: String,
    pub dns_upstream: Option<SocketAddr>,
}

/// (peer address, peer port, destination, destination port)
type FlowKey = (IpAddr, u16, IpAddr, u16);

/// A smoltcp device whose wire is two queues.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // Packets come out of an authenticated tunnel: checking their checksums adds
        // nothing, but ours must be right.
        let mut cs = ChecksumCapabilities::default();
        cs.ipv4 = Checksum::Tx;
        cs.tcp = Checksum::Tx;
        cs.udp = Checksum::Tx;
        cs.icmpv4 = Checksum::Tx;
        caps.checksum = cs;
        caps
    }
}

/// A smoltcp interface over [`Queues`] accepting every destination.
struct Stack {
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
}

impl Stack {
    fn new(gateway: Ipv4Addr, epoch: Instant) -> Self {
        let mut dev = Queues::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut dev, smol_now(epoch, epoch));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(gateway), 32));
        });
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        Stack {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
        }
    }

    fn poll(&mut self, now: smoltcp::time::Instant) -> bool {
        matches!(
            self.iface.poll(now, &mut self.dev, &mut self.sockets),
            smoltcp::iface::PollResult::SocketStateChanged
        )
    }
}

fn smol_now(now: Instant, epoch: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

/// From a Service connection to the data plane.
enum Upstream {
    Data(Vec<u8>),
    Eof,
    Failed(String),
}

enum TcpKind {
    /// Bridged to a Service.
    Service {
        to_service: Option<mpsc::Sender<Vec<u8>>>,
        from_service: mpsc::Receiver<Upstream>,
        task: JoinHandle<()>,
        service_eof: bool,
    },
    /// DNS over TCP to the gateway itself.
    Dns { request: Vec<u8> },
}

struct TcpFlow {
    handle: SocketHandle,
    kind: TcpKind,
    peer: PeerId,
    service: String,
    pending: Vec<u8>,
    pending_off: usize,
    started: Instant,
    last_activity: Instant,
    bytes_up: u64,
    bytes_down: u64,
    error: Option<String>,
}

struct UdpFlow {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
    peer: PeerId,
    service: String,
    started: Instant,
    last_activity: Instant,
    bytes_up: u64,
}

/// See the module documentation.
pub struct UserspaceDataPlane {
    cfg: UserspaceConfig,
    epoch: Instant,
    stack: Stack,
    /// Socket-less: answers every TCP segment handed to it with a RST.
    reject: Stack,
    tcp: HashMap<FlowKey, TcpFlow>,
    udp: HashMap<FlowKey, UdpFlow>,
    replies_tx: mpsc::Sender<(FlowKey, Vec<u8>)>,
    replies_rx: mpsc::Receiver<(FlowKey, Vec<u8>)>,
    resolver: Resolver,
    policy: Arc<Policy>,
    notify: Arc<Notify>,
    /// Packets built here (UDP replies) waiting for `outbound`.
    out: VecDeque<Vec<u8>>,
    /// Lines of denied flows per peer per second (a port scan is one line per try).
    audit: AuditBudget,
}

impl UserspaceDataPlane {
    /// Must be created inside a tokio runtime (flows spawn tasks).
    pub fn new(cfg: UserspaceConfig) -> Self {
        let epoch = Instant::now();
        let (replies_tx, replies_rx) = mpsc::channel(1024);
        UserspaceDataPlane {
            resolver: Resolver::new(&cfg.cluster_domain, cfg.dns_upstream.is_some()),
            stack: Stack::new(cfg.gateway, epoch),
            reject: Stack::new(cfg.gateway, epoch),
            cfg,
            epoch,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            replies_tx,
            replies_rx,
            policy: Arc::new(Policy::default()),
            notify: Arc::new(Notify::new()),
            out: VecDeque::new(),
            audit: AuditBudget::default(),
        }
    }

    fn service_name(&self, dst: IpAddr) -> String {
        match self.policy.catalog.by_ip(dst) {
            Some(s) => format!("{}/{}", s.namespace, s.name),
            None if dst == IpAddr::V4(self.cfg.gateway) => "gateway".to_string(),
            None => "-".to_string(),
        }
    }

    fn audit_denied(&mut self, pkt: &Inbound<'_>, now: Instant) {
        let (write, held) = self.audit.allow(pkt.peer, now);
        if let Some(n) = held {
            audit_held(pkt.peer, n);
        }
        if !write {
            return;
        }
        tracing::info!(
            target: "audit",
            peer = %pkt.peer,
            src = %pkt.packet.src,
            dst = %pkt.packet.dst,
            service = %self.service_name(pkt.packet.dst),
            proto = proto_name(pkt.packet.proto),
            port = pkt.packet.dst_port().unwrap_or(0),
            verdict = pkt.verdict.label(),
            "flow denied"
        );
    }

    fn open_tcp(&mut self, key: FlowKey, pkt: &Inbound<'_>, local_dns: bool, now: Instant) -> bool {
        if self.tcp.len() + self.udp.len() >= MAX_FLOWS {
            tracing::warn!(peer = %pkt.peer, "too many flows; refusing a new one");
            return false;
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        if socket
            .listen(IpListenEndpoint {
                addr: Some(key.2.into()),
                port: key.3,
            })
            .is_err()
        {
            return false;
        }
        let handle = self.stack.sockets.add(socket);
        let kind = if local_dns {
            TcpKind::Dns { request: Vec::new() }
        } else {
            let (to_service, from_client) = mpsc::channel(CHANNEL_CHUNKS);
            let (to_client, from_service) = mpsc::channel(CHANNEL_CHUNKS);
            let task = tokio::spawn(bridge(
                SocketAddr::new(key.2, key.3),
                from_client,
                to_client,
                self.notify.clone(),
            ));
            TcpKind::Service {
                to_service: Some(to_service),
                from_service,
                task,
                service_eof: false,
            }
        };
        let service = self.service_name(key.2);
        self.tcp.insert(
            key,
            TcpFlow {
                handle,
                kind,
                peer: pkt.peer.clone(),
                service,
                pending: Vec::new(),
                pending_off: 0,
                started: now,
                last_activity: now,
                bytes_up: 0,
                bytes_down: 0,
                error: None,
            },
        );
        true
    }

    fn udp_inbound(&mut self, pkt: &Inbound<'_>, src_port: u16, dst_port: u16, payload: &[u8], now: Instant) {
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
            let _ = f.socket.try_send(payload);
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
        let _ = socket.try_send(payload);
        let replies = self.replies_tx.clone();
        let notify = self.notify.clone();
        let reader = socket.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            // Ends when the flow expires (the task is aborted) or the socket fails.
            while let Ok(n) = reader.recv(&mut buf).await {
                if replies.try_send((key, buf[..n].to_vec())).is_ok() {
                    notify.notify_one();
                }
            }
        });
        let service = self.service_name(key.2);
        self.udp.insert(
            key,
            UdpFlow {
                socket,
                task,
                peer: pkt.peer.clone(),
                service,
                started: now,
                last_activity: now,
                bytes_up: payload.len() as u64,
            },
        );
    }

    fn forward_dns(&mut self, key: FlowKey, query: Vec<u8>) {
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
                && replies.try_send((key, r)).is_ok()
            {
                notify.notify_one();
            }
        });
    }

    /// A UDP reply from `key`'s destination back to its source.
    fn queue_udp_reply(&mut self, key: FlowKey, payload: &[u8]) {
        if let Some(p) = build_udp(key.2, key.3, key.0, key.1, payload) {
            self.out.push_back(p);
        }
    }

    fn service_tcp(&mut self, now: Instant) -> bool {
        let mut progressed = false;
        let mut finished = Vec::new();
        for (key, flow) in self.tcp.iter_mut() {
            let socket = self.stack.sockets.get_mut::<tcp::Socket>(flow.handle);
            // Peer → Service.
            match &mut flow.kind {
                TcpKind::Service { to_service, .. } => {
                    for _ in 0..CHANNEL_CHUNKS {
                        let Some(tx) = to_service.as_ref() else { break };
                        if !socket.can_recv() {
                            break;
                        }
                        let Ok(permit) = tx.try_reserve() else { break };
                        if let Ok(chunk) = socket.recv(|b| {
                            let n = b.len().min(READ_CHUNK);
                            (n, b[..n].to_vec())
                        }) {
                            flow.bytes_up += chunk.len() as u64;
                            flow.last_activity = now;
                            permit.send(chunk);
                            progressed = true;
                        }
                    }
                    // The peer half-closed: pass it on once everything is read.
                    if to_service.is_some() && !socket.can_recv() && peer_sent_fin(socket.state()) {
                        *to_service = None;
                        progressed = true;
                    }
                }
                TcpKind::Dns { request } => {
                    while socket.can_recv() && request.len() < 65_536 + 2 {
                        if let Ok(n) = socket.recv(|b| (b.len(), b.to_vec())).map(|v| {
                            let n = v.len();
                            request.extend_from_slice(&v);
                            n
                        }) {
                            flow.bytes_up += n as u64;
                            flow.last_activity = now;
                        }
                    }
                    // Answer every complete length-prefixed query.
                    while request.len() >= 2 {
                        let len = usize::from(u16::from_be_bytes([request[0], request[1]]));
                        if request.len() < 2 + len {
                            break;
                        }
                        let query: Vec<u8> = request.drain(..2 + len).skip(2).collect();
                        let reply =
                            match self
                                .resolver
                                .answer(&query, key.0.to_v4(), &self.policy.acl, &self.policy.catalog)
                            {
                                Some(DnsAnswer::Reply(r)) => Some(r),
                                // Forwarding is UDP only; TCP clients get SERVFAIL.
                                Some(DnsAnswer::Forward) => {
                                    crate::dns::error_reply(&query, hickory_proto::op::ResponseCode::ServFail)
                                }
                                None => None,
                            };
                        if let Some(r) = reply
                            && let Ok(l) = u16::try_from(r.len())
                        {
                            flow.pending.extend_from_slice(&l.to_be_bytes());
                            flow.pending.extend_from_slice(&r);
                        }
                    }
                    if !socket.can_recv() && peer_sent_fin(socket.state()) && flow.pending.len() == flow.pending_off {
                        socket.close();
                    }
                }
            }
            // Service → peer.
            for _ in 0..CHANNEL_CHUNKS {
                if flow.pending_off < flow.pending.len() {
                    if !socket.can_send() {
                        break;
                    }
                    match socket.send_slice(&flow.pending[flow.pending_off..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            flow.pending_off += n;
                            flow.bytes_down += n as u64;
                            flow.last_activity = now;
                            progressed = true;
                        }
                    }
                    continue;
                }
                flow.pending.clear();
                flow.pending_off = 0;
                let TcpKind::Service {
                    from_service,
                    service_eof,
                    ..
                } = &mut flow.kind
                else {
                    break;
                };
                if *service_eof {
                    break;
                }
                match from_service.try_recv() {
                    Ok(Upstream::Data(d)) => flow.pending = d,
                    Ok(Upstream::Eof) | Err(mpsc::error::TryRecvError::Disconnected) => {
                        *service_eof = true;
                        socket.close();
                        progressed = true;
                    }
                    Ok(Upstream::Failed(e)) => {
                        *service_eof = true;
                        flow.error = Some(e);
                        socket.abort();
                        progressed = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            let done = match socket.state() {
                tcp::State::Closed | tcp::State::TimeWait => true,
                tcp::State::Listen => now.duration_since(flow.started) > Duration::from_secs(30),
                _ => now.duration_since(flow.last_activity) > TCP_IDLE,
            };
            if done {
                finished.push(*key);
            }
        }
        for key in finished {
            if let Some(flow) = self.tcp.remove(&key) {
                self.stack.sockets.remove(flow.handle);
                if let TcpKind::Service { task, .. } = &flow.kind {
                    task.abort();
                }
                tracing::info!(
                    target: "audit",
                    peer = %flow.peer,
                    src = %SocketAddr::new(key.0, key.1),
                    dst = %SocketAddr::new(key.2, key.3),
                    service = %flow.service,
                    proto = "tcp",
                    port = key.3,
                    verdict = "allowed",
                    bytes_up = flow.bytes_up,
                    bytes_down = flow.bytes_down,
                    duration_ms = now.duration_since(flow.started).as_millis() as u64,
                    error = flow.error.as_deref().unwrap_or(""),
                    "flow ended"
                );
            }
        }
        progressed
    }

    fn expire_udp(&mut self, now: Instant) {
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

/// The audit lines of denied flows a peer's budget held back in its last second.
fn audit_held(peer: &PeerId, denied: u64) {
    tracing::info!(target: "audit", peer = %peer, denied, "denied flows not logged one by one (over the audit budget)");
}

fn audit_udp(key: &FlowKey, f: &UdpFlow, now: Instant) {
    tracing::info!(
        target: "audit",
        peer = %f.peer,
        src = %SocketAddr::new(key.0, key.1),
        dst = %SocketAddr::new(key.2, key.3),
        service = %f.service,
        proto = "udp",
        port = key.3,
        verdict = "allowed",
        bytes_up = f.bytes_up,
        duration_ms = now.duration_since(f.started).as_millis() as u64,
        "flow ended"
    );
}

trait ToV4 {
    fn to_v4(&self) -> Ipv4Addr;
}

impl ToV4 for IpAddr {
    fn to_v4(&self) -> Ipv4Addr {
        match self {
            IpAddr::V4(a) => *a,
            IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        }
    }
}

fn peer_sent_fin(s: tcp::State) -> bool {
    matches!(
        s,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait | tcp::State::Closed
    )
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        _ => "other",
    }
}

/// An IPv4 UDP packet with checksums.
fn build_udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        return None;
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

/// Carry bytes between a flow and its Service until both directions are done.
async fn bridge(
    dst: SocketAddr,
    mut from_client: mpsc::Receiver<Vec<u8>>,
    to_client: mpsc::Sender<Upstream>,
    notify: Arc<Notify>,
) {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let _ = to_client.send(Upstream::Failed(format!("connect {dst}: {e}"))).await;
            notify.notify_one();
            return;
        }
        Err(_) => {
            let _ = to_client
                .send(Upstream::Failed(format!("connect {dst}: timed out")))
                .await;
            notify.notify_one();
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let up = {
        let notify = notify.clone();
        async move {
            while let Some(chunk) = from_client.recv().await {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
                // Room in the channel again: let the data plane read more.
                notify.notify_one();
            }
            let _ = w.shutdown().await;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => {
                    let _ = to_client.send(Upstream::Eof).await;
                    break;
                }
                Ok(n) => {
                    if to_client.send(Upstream::Data(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = to_client.send(Upstream::Failed(format!("read {dst}: {e}"))).await;
                    break;
                }
            }
            notify.notify_one();
        }
        notify.notify_one();
    };
    tokio::join!(up, down);
}

impl DataPlane for UserspaceDataPlane {
    fn inbound(&mut self, pkt: Inbound<'_>, now: Instant) {
        let p = pkt.packet;
        match (pkt.verdict, p.transport) {
            (Verdict::Spoofed, _) => {}
            (Verdict::Denied, Transport::Tcp { flags, .. }) => {
                if p.is_tcp_syn() {
                    self.audit_denied(&pkt, now);
                }
                if flags & TCP_RST == 0 {
                    self.reject.dev.rx.push_back(pkt.bytes.to_vec());
                    self.reject.poll(smol_now(now, self.epoch));
                    let rst: Vec<Vec<u8>> = self.reject.dev.tx.drain(..).collect();
                    self.out.extend(rst);
                }
            }
            (Verdict::Denied, Transport::Udp { .. }) => {
                let key = (p.src, p.src_port().unwrap_or(0), p.dst, p.dst_port().unwrap_or(0));
                if !self.udp.contains_key(&key) {
                    self.audit_denied(&pkt, now);
                }
            }
            (Verdict::Denied, _) => {}
            (Verdict::Allow | Verdict::Local, Transport::Tcp { .. }) => {
                let key = (p.src, p.src_port().unwrap_or(0), p.dst, p.dst_port().unwrap_or(0));
                let local = pkt.verdict == Verdict::Local;
                if local && key.3 != 53 {
                    // Nothing listens on the gateway but DNS.
                    self.reject.dev.rx.push_back(pkt.bytes.to_vec());
                    self.reject.poll(smol_now(now, self.epoch));
                    let rst: Vec<Vec<u8>> = self.reject.dev.tx.drain(..).collect();
                    self.out.extend(rst);
                    return;
                }
                if p.is_tcp_syn() && !self.tcp.contains_key(&key) {
                    self.open_tcp(key, &pkt, local, now);
                }
                self.stack.dev.rx.push_back(pkt.bytes.to_vec());
            }
            (
                Verdict::Allow | Verdict::Local,
                Transport::Udp {
                    src_port,
                    dst_port,
                    payload,
                },
            ) => {
                self.udp_inbound(&pkt, src_port, dst_port, payload, now);
            }
            (Verdict::Allow, Transport::Icmp { .. }) => match crate::packet::icmpv4_echo_reply(pkt.bytes) {
                // smoltcp answers echo requests only for its own addresses, not for ClusterIPs.
                Some(reply) => self.out.push_back(reply),
                None => self.stack.dev.rx.push_back(pkt.bytes.to_vec()),
            },
            (Verdict::Local, Transport::Icmp { .. }) => {
                self.stack.dev.rx.push_back(pkt.bytes.to_vec());
            }
            (Verdict::Allow | Verdict::Local, Transport::Other { .. }) => {}
        }
    }

    fn outbound(&mut self, now: Instant, emit: &mut dyn FnMut(&[u8])) {
        for (peer, n) in self.audit.expire(now) {
            audit_held(&peer, n);
        }
        let ts = smol_now(now, self.epoch);
        for _ in 0..MAX_ROUNDS {
            let changed = self.stack.poll(ts);
            let progressed = self.service_tcp(now);
            if !changed && !progressed && self.stack.dev.rx.is_empty() {
                break;
            }
        }
        // One more poll so that what the flows wrote goes out now.
        self.stack.poll(ts);
        for _ in 0..1024 {
            match self.replies_rx.try_recv() {
                Ok((key, payload)) => {
                    if let Some(f) = self.udp.get_mut(&key) {
                        f.last_activity = now;
                    }
                    self.queue_udp_reply(key, &payload);
                }
                Err(_) => break,
            }
        }
        self.expire_udp(now);
        for p in self.stack.dev.tx.drain(..).chain(self.out.drain(..)) {
            emit(&p);
        }
    }

    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let d = self
            .stack
            .iface
            .poll_delay(smol_now(now, self.epoch), &self.stack.sockets);
        let d = d.map(|d| Duration::from_micros(d.total_micros()));
        if self.udp.is_empty() && self.tcp.is_empty() {
            d
        } else {
            // Flows need servicing and expiry even when smoltcp has no timer.
            Some(d.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1)))
        }
    }

    fn waker(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    fn peer_removed(&mut self, peer_addr: Ipv4Addr) {
        let ip = IpAddr::V4(peer_addr);
        let tcp: Vec<FlowKey> = self.tcp.keys().filter(|k| k.0 == ip).copied().collect();
        for key in tcp {
            if let Some(flow) = self.tcp.remove(&key) {
                self.stack.sockets.remove(flow.handle);
                if let TcpKind::Service { task, .. } = &flow.kind {
                    task.abort();
                }
            }
        }
        let udp: Vec<FlowKey> = self.udp.keys().filter(|k| k.0 == ip).copied().collect();
        for key in udp {
            if let Some(f) = self.udp.remove(&key) {
                f.task.abort();
            }
        }
    }

    fn counters(&self) -> FlowCounters {
        FlowCounters {
            tcp_flows_open: self.tcp.len() as u64,
            udp_flows_open: self.udp.len() as u64,
        }
    }
}
