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
//!   socket, expiring after [`UDP_IDLE`] without traffic. DNS to the gateway's own
//!   addresses (IPv4 and IPv6) is answered by [`crate::dns`] (TCP DNS too).
//! - ICMP echo to an allowed ClusterIP is answered here, to the gateway by smoltcp (IPv4)
//!   or here (ICMPv6).
//! - IPv6 like IPv4: smoltcp has the gateway's IPv6 address too, and a flow to an IPv6
//!   ClusterIP is carried over an IPv6 socket to `[clusterIP]:port`.
//! - Denied TCP gets a RST from a second, socket-less smoltcp interface (so a denied SYN can
//!   never meet a listening socket); other denied packets are dropped. One audit line per
//!   flow (target `audit`): peer, destination, Service, port, verdict, the rule that
//!   allowed it (`own rule N`, `policy NS/NAME`) or `no rule`, bytes, duration; denied
//!   flows within a per-peer budget ([`crate::audit`]), the rest summed in one line.
//!
//! This module holds the data plane's state and its [`DataPlane`] side (packets in and
//! out, policy, peers leaving); `stack` the smoltcp interfaces, `tcp_flows` the TCP flows
//! and their Service connections, `udp_flows` the UDP flows and DNS.

mod stack;
mod tcp_flows;
mod udp_flows;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};

use super::{DataPlane, FlowCounters, Inbound, Policy};
use crate::acl::Verdict;
use crate::audit::AuditBudget;
use crate::dns::Resolver;
use crate::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_RST, Transport};
use crate::peers::PeerId;
use stack::{Stack, smol_now};
use tcp_flows::{TcpFlow, TcpKind};
use udp_flows::{UdpFlow, UdpReply};

/// What an audit line names as the rule of a denied flow.
pub const NO_RULE: &str = "no rule";
/// The MTU of the tunnel (WireGuard's usual 1420).
pub const MTU: usize = 1420;
/// Per-direction buffer of each TCP flow's smoltcp socket.
const TCP_BUFFER: usize = 256 * 1024;
/// A peer's bytes go to its Service in chunks of up to 64 KiB (a TCP sender's burst: one
/// system call and one wake-up each), at most four in flight.
const CHUNKS: usize = 4;
const CHUNK: usize = 64 * 1024;
/// A Service's bytes come back in reads of up to 256 KiB, one waiting while the next is
/// read: the same bytes in flight as four 64 KiB chunks, a quarter of the reads, of the
/// window updates the kernel sends the Service and of the data plane's wake-ups
/// (`docs/benchmarks.md`).
const DOWN_CHUNKS: usize = 1;
const DOWN_CHUNK: usize = 256 * 1024;
/// A UDP flow ends after this long without traffic.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Connecting to a Service gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A TCP flow that carried no byte either way for this long is reset: the least a NAT may
/// keep an idle established connection (RFC 5382, REQ-5: 2 hours 4 minutes), so that an
/// idle shell or database session lives as it would through the kernel's forwarding.
/// Dead peers go sooner, by smoltcp's keep-alive and timeout.
const TCP_IDLE: Duration = Duration::from_secs(2 * 3600 + 4 * 60);
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
    /// Its IPv6 tunnel address.
    pub gateway_v6: Ipv6Addr,
    pub cluster_domain: String,
    pub dns_upstream: Option<SocketAddr>,
}

/// (peer address, peer port, destination, destination port)
type FlowKey = (IpAddr, u16, IpAddr, u16);

/// See the module documentation.
pub struct UserspaceDataPlane {
    cfg: UserspaceConfig,
    epoch: Instant,
    stack: Stack,
    /// Socket-less: answers every TCP segment handed to it with a RST.
    reject: Stack,
    tcp: HashMap<FlowKey, TcpFlow>,
    udp: HashMap<FlowKey, UdpFlow>,
    replies_tx: mpsc::Sender<(FlowKey, UdpReply)>,
    replies_rx: mpsc::Receiver<(FlowKey, UdpReply)>,
    resolver: Resolver,
    policy: Arc<Policy>,
    notify: Arc<Notify>,
    /// Packets built here (UDP replies) waiting for `outbound`.
    out: VecDeque<Vec<u8>>,
    /// Datagrams for the Services' UDP flows, sent at [`DataPlane::flush`].
    udp_out: udp_flows::UdpOut,
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
            stack: Stack::new(cfg.gateway, cfg.gateway_v6, epoch),
            reject: Stack::new(cfg.gateway, cfg.gateway_v6, epoch),
            cfg,
            epoch,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            replies_tx,
            replies_rx,
            policy: Arc::new(Policy::default()),
            notify: Arc::new(Notify::new()),
            out: VecDeque::new(),
            udp_out: Default::default(),
            audit: AuditBudget::default(),
        }
    }

    fn service_name(&self, dst: IpAddr) -> String {
        match self.policy.catalog.by_ip(dst) {
            Some(s) => format!("{}/{}", s.namespace, s.name),
            None if dst == IpAddr::V4(self.cfg.gateway) || dst == IpAddr::V6(self.cfg.gateway_v6) => {
                "gateway".to_string()
            }
            None => "-".to_string(),
        }
    }

    /// What the audit line of a new allowed flow names as the rule that allowed it: the
    /// peer's own rule or a policy ([`crate::policy::RuleSource`]), `gateway` for DNS to
    /// the gateway itself.
    fn allowing_rule(&self, pkt: &Inbound<'_>) -> String {
        if pkt.verdict == Verdict::Local {
            return "gateway".to_string();
        }
        let p = pkt.packet;
        match self.policy.acl.allowed_by(pkt.peer_addr, p.dst, p.proto, p.dst_port()) {
            Some(r) => r.to_string(),
            None => NO_RULE.to_string(),
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
            rule = NO_RULE,
            "flow denied"
        );
    }
}

/// The audit lines of denied flows a peer's budget held back in its last second.
fn audit_held(peer: &PeerId, denied: u64) {
    tracing::info!(target: "audit", peer = %peer, denied, "denied flows not logged one by one (over the audit budget)");
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        PROTO_ICMPV6 => "icmpv6",
        _ => "other",
    }
}

impl DataPlane for UserspaceDataPlane {
    fn flush(&mut self) {
        self.flush_udp();
    }

    fn inbound(&mut self, pkt: Inbound<'_>, now: Instant) {
        let p = pkt.packet;
        match (pkt.verdict, p.transport) {
            (Verdict::Spoofed, _) => {}
            (Verdict::Denied, Transport::Tcp { flags, .. }) => {
                if p.is_tcp_syn() {
                    self.audit_denied(&pkt, now);
                }
                if flags & TCP_RST == 0 {
                    self.reject.dev.push_rx(pkt.bytes);
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
                    self.reject.dev.push_rx(pkt.bytes);
                    self.reject.poll(smol_now(now, self.epoch));
                    let rst: Vec<Vec<u8>> = self.reject.dev.tx.drain(..).collect();
                    self.out.extend(rst);
                    return;
                }
                if p.is_tcp_syn() && !self.tcp.contains_key(&key) && self.open_tcp(key, &pkt, local, now) && !local {
                    // Answered once the Service has taken the connection: SYN-ACK then,
                    // and a refusal is a refusal ("connection refused"), not a connection
                    // that the gateway accepted and then resets.
                    if let Some(f) = self.tcp.get_mut(&key) {
                        f.held_syn = Some(pkt.bytes.to_vec());
                    }
                    return;
                }
                if self.tcp.get(&key).is_some_and(|f| f.held_syn.is_some()) {
                    // The peer's SYN again while the Service is being connected to.
                    return;
                }
                self.stack.dev.push_rx(pkt.bytes);
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
            (Verdict::Allow, Transport::Icmp { .. }) => match crate::packet::echo_reply(pkt.bytes) {
                // smoltcp answers echo requests only for its own addresses, not for ClusterIPs.
                Some(reply) => self.out.push_back(reply),
                None => self.stack.dev.push_rx(pkt.bytes),
            },
            // ICMPv6 to the gateway: echo answered here (smoltcp would also take neighbour
            // discovery and the like, which a tunnel has no use for).
            (Verdict::Local, Transport::Icmp { .. }) if p.proto == PROTO_ICMPV6 => {
                if let Some(reply) = crate::packet::icmpv6_echo_reply(pkt.bytes) {
                    self.out.push_back(reply);
                }
            }
            (Verdict::Local, Transport::Icmp { .. }) => {
                self.stack.dev.push_rx(pkt.bytes);
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
                Ok((key, Ok(payload))) => {
                    if let Some(f) = self.udp.get_mut(&key) {
                        f.last_activity = now;
                    }
                    self.queue_udp_reply(key, &payload);
                }
                Ok((key, Err(unreachable))) => self.queue_unreachable(key, unreachable),
                Err(_) => break,
            }
        }
        self.expire_udp(now);
        while let Some(p) = self.stack.dev.tx.pop_front() {
            emit(&p);
            self.stack.dev.recycle_tx(p);
        }
        for p in self.out.drain(..) {
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
        // Its flows of both families (an IPv6 flow's key has its IPv6 address).
        let tcp: Vec<FlowKey> = self
            .tcp
            .iter()
            .filter(|(_, f)| f.peer_addr == peer_addr)
            .map(|(k, _)| *k)
            .collect();
        for key in tcp {
            if let Some(flow) = self.tcp.remove(&key) {
                self.stack.sockets.remove(flow.handle);
                if let TcpKind::Service { task, .. } = &flow.kind {
                    task.abort();
                }
            }
        }
        let udp: Vec<FlowKey> = self
            .udp
            .iter()
            .filter(|(_, f)| f.peer_addr == peer_addr)
            .map(|(k, _)| *k)
            .collect();
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
