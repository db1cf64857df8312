//! TCP flows: a smoltcp socket listening on exactly the allowed destination, bridged by a
//! tokio task to a connection to the Service (bounded channels both ways, so a slow
//! Service closes the peer's window), or answering DNS over TCP to the gateway itself.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{
    CHANNEL_CHUNKS, CONNECT_TIMEOUT, FlowKey, MAX_FLOWS, READ_CHUNK, TCP_BUFFER, TCP_IDLE, UserspaceDataPlane,
};
use crate::dataplane::Inbound;
use crate::dns::DnsAnswer;
use crate::peers::PeerId;

/// From a Service connection to the data plane.
pub(super) enum Upstream {
    Data(Vec<u8>),
    Eof,
    Failed(String),
}

pub(super) enum TcpKind {
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

pub(super) struct TcpFlow {
    pub(super) handle: SocketHandle,
    pub(super) kind: TcpKind,
    pub(super) peer: PeerId,
    /// The peer's (IPv4) tunnel address: its identity for the ACL and DNS, whichever
    /// family the flow is.
    pub(super) peer_addr: Ipv4Addr,
    pub(super) service: String,
    /// The rule that allowed it, for its audit line.
    pub(super) rule: String,
    pub(super) pending: Vec<u8>,
    pub(super) pending_off: usize,
    pub(super) started: Instant,
    pub(super) last_activity: Instant,
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    pub(super) error: Option<String>,
}

impl UserspaceDataPlane {
    pub(super) fn open_tcp(&mut self, key: FlowKey, pkt: &Inbound<'_>, local_dns: bool, now: Instant) -> bool {
        if self.tcp.len() + self.udp.len() >= MAX_FLOWS {
            tracing::warn!(peer = %pkt.peer, "too many flows; refusing a new one");
            return false;
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        // Without congestion control smoltcp sends the peer's whole window at once; a client
        // whose UDP receive buffer overflows then loses a burst, and smoltcp, without SACK
        // and with a 1 s minimum RTO, crawled (2-4 Mbit/s downloads through a stock
        // wireguard-go in the bench). Cubic grows into the path instead (issue 25).
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
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
        let rule = self.allowing_rule(pkt);
        self.tcp.insert(
            key,
            TcpFlow {
                handle,
                kind,
                peer: pkt.peer.clone(),
                peer_addr: pkt.peer_addr,
                service,
                rule,
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

    pub(super) fn service_tcp(&mut self, now: Instant) -> bool {
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
                                .answer(&query, flow.peer_addr, &self.policy.acl, &self.policy.catalog)
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
                    rule = %flow.rule,
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
}

pub(super) fn peer_sent_fin(s: tcp::State) -> bool {
    matches!(
        s,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait | tcp::State::Closed
    )
}

/// Carry bytes between a flow and its Service until both directions are done.
pub(super) async fn bridge(
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
