//! TCP flows: a smoltcp socket listening on exactly the allowed destination, bridged by a
//! tokio task to a connection to the Service (bounded channels both ways, so a slow
//! Service closes the peer's window), or answering DNS over TCP to the gateway itself.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::stack::smol_now;
use super::{
    CHUNK, CHUNKS, CONNECT_TIMEOUT, DOWN_CHUNK, DOWN_CHUNKS, FlowKey, MAX_FLOWS, TCP_BUFFER, TCP_IDLE,
    UserspaceDataPlane,
};
use crate::dataplane::Inbound;
use crate::dns::DnsAnswer;
use crate::peers::PeerId;

/// From a Service connection to the data plane.
pub(super) enum Upstream {
    /// The Service took the connection: the peer's SYN may be answered.
    Connected,
    Data(Vec<u8>),
    Eof,
    Failed(String),
}

pub(super) enum TcpKind {
    /// Bridged to a Service.
    Service {
        to_service: Option<mpsc::Sender<Vec<u8>>>,
        /// Set when the data plane found `to_service` full: the bridge then wakes it once
        /// there is room (and not after every write).
        up_blocked: Arc<AtomicBool>,
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
    /// The peer's SYN, until the Service has taken or refused the connection.
    pub(super) held_syn: Option<Vec<u8>>,
    pub(super) pending: Vec<u8>,
    pub(super) pending_off: usize,
    pub(super) started: Instant,
    pub(super) last_activity: Instant,
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    /// Times the data plane stopped reading the peer's bytes for want of room toward the
    /// Service (a slow Service: the peer's window closes).
    pub(super) up_stalls: u64,
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
            let (to_service, from_client) = mpsc::channel(CHUNKS);
            let (to_client, from_service) = mpsc::channel(DOWN_CHUNKS);
            let up_blocked = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(bridge(
                SocketAddr::new(key.2, key.3),
                from_client,
                to_client,
                self.notify.clone(),
                up_blocked.clone(),
            ));
            TcpKind::Service {
                to_service: Some(to_service),
                up_blocked,
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
                held_syn: None,
                pending: Vec::new(),
                pending_off: 0,
                started: now,
                last_activity: now,
                bytes_up: 0,
                bytes_down: 0,
                up_stalls: 0,
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
                TcpKind::Service {
                    to_service, up_blocked, ..
                } => {
                    for _ in 0..CHUNKS {
                        let Some(tx) = to_service.as_ref() else { break };
                        if !socket.can_recv() {
                            break;
                        }
                        let Some(permit) = reserve(tx, up_blocked) else {
                            flow.up_stalls += 1;
                            break;
                        };
                        let chunk = take_up_to(socket, CHUNK);
                        flow.bytes_up += chunk.len() as u64;
                        flow.last_activity = now;
                        permit.send(chunk);
                        progressed = true;
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
            for _ in 0..CHUNKS {
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
                    Ok(Upstream::Connected) => {
                        if let Some(syn) = flow.held_syn.take() {
                            self.stack.dev.push_rx(&syn);
                        }
                        progressed = true;
                    }
                    Ok(Upstream::Data(d)) => flow.pending = d,
                    Ok(Upstream::Eof) | Err(mpsc::error::TryRecvError::Disconnected) => {
                        *service_eof = true;
                        socket.close();
                        progressed = true;
                    }
                    Ok(Upstream::Failed(e)) => {
                        *service_eof = true;
                        flow.error = Some(e);
                        if let Some(syn) = flow.held_syn.take() {
                            // Refused before the handshake: the answer to the SYN is a reset,
                            // as the Service's own would be.
                            self.reject.dev.push_rx(&syn);
                            self.reject.poll(smol_now(now, self.epoch));
                            self.out.extend(self.reject.dev.tx.drain(..));
                        }
                        socket.abort();
                        progressed = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            if !matches!(
                socket.state(),
                tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen
            ) && now.duration_since(flow.last_activity) > TCP_IDLE
            {
                // Reset, not dropped without a word: the peer learns now, not at its next
                // write.
                socket.abort();
                flow.error.get_or_insert_with(|| "idle".into());
                progressed = true;
            }
            let done = match socket.state() {
                // An aborted connection keeps its peer until its reset has gone out.
                tcp::State::Closed => socket.remote_endpoint().is_none(),
                tcp::State::TimeWait => true,
                tcp::State::Listen => now.duration_since(flow.started) > Duration::from_secs(30),
                _ => false,
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

/// Room for one chunk toward the Service, or `None` with `blocked` set, so that the bridge
/// wakes the data plane when it makes room. The second try closes the race with a bridge
/// that made room (and found `blocked` clear) between the first try and the flag.
fn reserve<'a>(tx: &'a mpsc::Sender<Vec<u8>>, blocked: &AtomicBool) -> Option<mpsc::Permit<'a, Vec<u8>>> {
    if let Ok(p) = tx.try_reserve() {
        return Some(p);
    }
    blocked.store(true, Ordering::SeqCst);
    tx.try_reserve().ok()
}

/// Up to `max` bytes of what `socket` has received (both parts of its ring buffer).
fn take_up_to(socket: &mut tcp::Socket<'_>, max: usize) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(socket.recv_queue().min(max));
    while chunk.len() < max {
        let room = max - chunk.len();
        let took = socket.recv(|b| {
            let n = b.len().min(room);
            chunk.extend_from_slice(&b[..n]);
            (n, n)
        });
        if !matches!(took, Ok(n) if n > 0) {
            break;
        }
    }
    chunk
}

/// The peer's bytes to the Service until the flow stops sending: whatever chunks are
/// waiting go out in one write, and the data plane is woken only if it stopped reading
/// for want of room ([`reserve`]).
async fn carry_up(
    from_client: &mut mpsc::Receiver<Vec<u8>>,
    w: &mut (impl AsyncWrite + Unpin),
    blocked: &AtomicBool,
    notify: &Notify,
) -> std::io::Result<()> {
    let mut chunks = Vec::with_capacity(CHUNKS);
    while from_client.recv_many(&mut chunks, CHUNKS).await > 0 {
        write_chunks(w, &chunks).await?;
        chunks.clear();
        if blocked.swap(false, Ordering::SeqCst) {
            notify.notify_one();
        }
    }
    Ok(())
}

/// Write every chunk, in one system call where the socket takes them all.
async fn write_chunks(w: &mut (impl AsyncWrite + Unpin), chunks: &[Vec<u8>]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
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
    up_blocked: Arc<AtomicBool>,
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
    if to_client.send(Upstream::Connected).await.is_err() {
        return;
    }
    notify.notify_one();
    let (mut r, mut w) = stream.into_split();
    let up = {
        let notify = notify.clone();
        async move {
            if carry_up(&mut from_client, &mut w, &up_blocked, &notify).await.is_ok() {
                let _ = w.shutdown().await;
            }
        }
    };
    let down = async move {
        loop {
            // Read straight into the chunk that is handed on: no copy, no zeroing.
            let mut chunk = Vec::with_capacity(DOWN_CHUNK);
            match r.read_buf(&mut chunk).await {
                Ok(0) => {
                    let _ = to_client.send(Upstream::Eof).await;
                    break;
                }
                Ok(n) => {
                    if n < DOWN_CHUNK / 16 {
                        // A small answer does not hold 256 KiB while it waits.
                        chunk.shrink_to_fit();
                    }
                    if to_client.send(Upstream::Data(chunk)).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Verdict;
    use crate::dataplane::DataPlane;
    use crate::dataplane::userspace::stack::Stack;
    use crate::dataplane::userspace::{UserspaceConfig, UserspaceDataPlane};
    use smoltcp::wire::IpAddress;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn byte(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// A data plane found the channel toward the Service full: the bridge wakes it once it
    /// has written what was waiting (all of it, in order), and not before it had to.
    #[tokio::test]
    async fn a_data_plane_stopped_by_a_full_channel_is_woken_when_there_is_room() {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHUNKS);
        let blocked = Arc::new(AtomicBool::new(false));
        let notify = Arc::new(Notify::new());
        for i in 0..CHUNKS {
            reserve(&tx, &blocked).expect("room").send(vec![i as u8; 1000]);
        }
        assert!(!blocked.load(Ordering::SeqCst), "not blocked while there was room");
        assert!(reserve(&tx, &blocked).is_none(), "full");
        assert!(blocked.load(Ordering::SeqCst));

        let (mut service, mut w) = tokio::io::duplex(1 << 20);
        let (b, n) = (blocked.clone(), notify.clone());
        let bridge = tokio::spawn(async move { carry_up(&mut rx, &mut w, &b, &n).await });
        tokio::time::timeout(Duration::from_secs(5), notify.notified())
            .await
            .expect("the blocked data plane is woken");
        assert!(!blocked.load(Ordering::SeqCst));
        reserve(&tx, &blocked).expect("room again").send(vec![9; 10]);
        drop(tx);
        bridge.await.unwrap().unwrap();
        let mut got = Vec::new();
        service.read_to_end(&mut got).await.unwrap();
        let want: Vec<u8> = (0..CHUNKS).flat_map(|i| vec![i as u8; 1000]).chain([9; 10]).collect();
        assert_eq!(got, want, "every chunk, in order");
    }

    /// The gateway's side of a test: the plane, and the peer's own smoltcp stack with its
    /// tunnel address, driven as the gateway drives the plane: on the peer's packets, on the
    /// plane's waker, and on its timer.
    struct Harness {
        dp: UserspaceDataPlane,
        waker: Arc<Notify>,
        laptop: Stack,
        peer: PeerId,
        me: Ipv4Addr,
        epoch: Instant,
        /// How far both clocks are ahead of the real one (to reach timeouts).
        ahead: Duration,
    }

    impl Harness {
        fn new() -> Harness {
            let epoch = Instant::now();
            let me = Ipv4Addr::new(100, 64, 0, 2);
            let dp = UserspaceDataPlane::new(UserspaceConfig {
                gateway: Ipv4Addr::new(100, 64, 0, 1),
                gateway_v6: "fd6b:7261:7961::1".parse().unwrap(),
                cluster_domain: "cluster.local".into(),
                dns_upstream: None,
            });
            let waker = dp.waker();
            let laptop = Stack::new(me, "fd6b:7261:7961::2".parse().unwrap(), epoch);
            let peer = PeerId::new("default", "alice");
            Harness {
                dp,
                waker,
                laptop,
                peer,
                me,
                epoch,
                ahead: Duration::ZERO,
            }
        }

        /// The peer's socket, connecting to a Service on 127.0.0.1:`port`.
        fn connect(&mut self, port: u16) -> SocketHandle {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; 256 * 1024]),
                tcp::SocketBuffer::new(vec![0u8; 256 * 1024]),
            );
            let cx = self.laptop.iface.context();
            socket.connect(cx, (IpAddress::v4(127, 0, 0, 1), port), 40_000).unwrap();
            self.laptop.sockets.add(socket)
        }

        /// One round both ways; waits as the gateway would when nothing moved.
        async fn turn(&mut self) {
            if !self.exchange() {
                // Until the plane's waker or its timer, or the peer's own timer (smoltcp's,
                // for retransmits and window probes).
                let now = Instant::now() + self.ahead;
                let theirs = self
                    .laptop
                    .iface
                    .poll_delay(smol_now(now, self.epoch), &self.laptop.sockets)
                    .map(|d| Duration::from_micros(d.total_micros()));
                let wait = [self.dp.poll_delay(now), theirs].into_iter().flatten().min();
                let wait = wait.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
                let _ = tokio::time::timeout(wait, self.waker.notified()).await;
            }
        }

        /// One round both ways, without waiting; whether anything moved.
        fn exchange(&mut self) -> bool {
            let now = Instant::now() + self.ahead;
            self.laptop.poll(smol_now(now, self.epoch));
            let up: Vec<Vec<u8>> = self.laptop.dev.tx.drain(..).collect();
            for bytes in &up {
                let pkt = crate::packet::parse(bytes).unwrap();
                let inbound = Inbound {
                    peer: &self.peer,
                    peer_addr: self.me,
                    bytes,
                    packet: &pkt,
                    verdict: Verdict::Allow,
                };
                self.dp.inbound(inbound, now);
            }
            self.dp.flush();
            let mut down = Vec::new();
            self.dp.outbound(now, &mut |p| down.push(p.to_vec()));
            let moved = !up.is_empty() || !down.is_empty();
            self.laptop.dev.rx.extend(down);
            moved
        }

        /// Both clocks `by` ahead, in steps shorter than the keep-alive interval, with the
        /// keep-alives each step brings exchanged.
        fn advance(&mut self, by: Duration) {
            let end = self.ahead + by;
            while self.ahead < end {
                self.ahead = (self.ahead + Duration::from_secs(20)).min(end);
                for _ in 0..4 {
                    self.exchange();
                }
            }
        }
    }

    /// A peer's upload through the userspace plane to a Service that stops reading for a
    /// while and then reads everything: every byte arrives, in order, once. The peer is a
    /// smoltcp stack of the test's, the Service a real socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_to_a_service_that_pauses_arrives_whole() {
        const TOTAL: usize = 6 << 20;
        // A small receive buffer, so that the kernel cannot take the whole upload while
        // the Service does not read.
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_recv_buffer_size(64 * 1024).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // Not reading: the kernel's buffers, the channel and smoltcp's window fill.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut got = Vec::with_capacity(TOTAL);
            s.read_to_end(&mut got).await.unwrap();
            got
        });

        let mut h = Harness::new();
        let handle = h.connect(port);
        let (mut sent, mut closed, mut stalls) = (0, false, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !service.is_finished() {
            assert!(Instant::now() < deadline, "upload stalled at {sent} of {TOTAL} bytes");
            let s = h.laptop.sockets.get_mut::<tcp::Socket>(handle);
            while s.can_send() && sent < TOTAL {
                sent += s
                    .send(|b| {
                        let n = b.len().min(TOTAL - sent);
                        b[..n].iter_mut().enumerate().for_each(|(k, x)| *x = byte(sent + k));
                        (n, n)
                    })
                    .unwrap();
            }
            if sent == TOTAL && !closed && s.send_queue() == 0 {
                s.close();
                closed = true;
            }
            h.turn().await;
            stalls = h.dp.tcp.values().map(|f| f.up_stalls).max().unwrap_or(0).max(stalls);
        }
        let got = service.await.unwrap();
        assert!(
            stalls > 0,
            "the plane never had to stop reading: the test shows nothing"
        );
        assert_eq!(got.len(), TOTAL);
        assert!(got.iter().enumerate().all(|(i, &b)| b == byte(i)), "the bytes in order");
    }

    /// A Service's answer through the userspace plane to a peer that stops reading for a
    /// while: the plane reads the Service only while the peer's socket has room, so the
    /// bytes wait in the kernel (the Service's window closes), and every byte arrives in
    /// order, once, followed by the Service's end of stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_to_a_peer_that_pauses_arrives_whole_and_then_ends() {
        const TOTAL: usize = 6 << 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let data: Vec<u8> = (0..TOTAL).map(byte).collect();
            s.write_all(&data).await.unwrap();
            // Its end of stream goes to the peer as a FIN, after the last byte.
        });

        let mut h = Harness::new();
        let handle = h.connect(port);
        let mut got = Vec::with_capacity(TOTAL);
        let (mut full_seen, mut ended) = (false, false);
        let paused_until = Instant::now() + Duration::from_millis(500);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ended {
            assert!(
                Instant::now() < deadline,
                "download stalled at {} of {TOTAL} bytes",
                got.len()
            );
            h.turn().await;
            // The plane stopped taking the Service's bytes for want of room toward the peer.
            let flow_full = h.dp.tcp.values().any(|f| {
                let s = h.dp.stack.sockets.get::<tcp::Socket>(f.handle);
                !s.can_send() && f.pending_off < f.pending.len()
            });
            if Instant::now() < paused_until {
                full_seen |= flow_full;
                continue;
            }
            let s = h.laptop.sockets.get_mut::<tcp::Socket>(handle);
            while s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            ended = !s.may_recv() && got.len() == TOTAL;
        }
        service.await.unwrap();
        assert!(full_seen, "the plane never had to stop reading: the test shows nothing");
        assert_eq!(got.len(), TOTAL);
        assert!(got.iter().enumerate().all(|(i, &b)| b == byte(i)), "the bytes in order");
        let flow = h.dp.tcp.values().next();
        assert!(flow.is_none_or(|f| f.error.is_none() && f.bytes_down == TOTAL as u64));
    }

    /// A Service that refuses: so is the peer's connection, with a reset in answer to its
    /// SYN, as the Service's own would be. Before, the gateway accepted the connection at
    /// once and then dropped it without a word: a peer that waits for the Service to speak
    /// first waited until its own timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_that_refuses_refuses_the_peer() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut h = Harness::new();
        let handle = h.connect(port);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            assert!(Instant::now() < deadline, "the peer's connection was not refused");
            h.turn().await;
            let state = h.laptop.sockets.get::<tcp::Socket>(handle).state();
            assert_ne!(state, tcp::State::Established, "accepted for a Service that refused");
            if state == tcp::State::Closed {
                break;
            }
        }
        assert!(h.dp.tcp.is_empty(), "the flow is gone");
    }

    /// A Service that resets an established connection: the peer's connection is reset
    /// too, at once, and not left open until its own timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_that_resets_resets_the_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Linger 0: close sends a reset.
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        });
        let mut h = Harness::new();
        let handle = h.connect(port);
        let (mut established, deadline) = (false, Instant::now() + Duration::from_secs(5));
        loop {
            assert!(Instant::now() < deadline, "the peer's connection stayed open");
            h.turn().await;
            let state = h.laptop.sockets.get::<tcp::Socket>(handle).state();
            established |= state == tcp::State::Established;
            if state == tcp::State::Closed {
                break;
            }
        }
        service.await.unwrap();
        assert!(established, "the connection was up before the Service reset it");
    }

    /// An established connection that carries nothing for longer than a NAT must keep it
    /// (RFC 5382): reset, both the peer's side and the flow, and not before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_lives_two_hours_and_is_then_reset() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut rest = Vec::new();
            // Held open, silent, until the gateway lets go of it.
            s.read_to_end(&mut rest).await.map(|_| rest.len())
        });
        let mut h = Harness::new();
        let handle = h.connect(port);
        let state = |h: &Harness| h.laptop.sockets.get::<tcp::Socket>(handle).state();
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(&h) != tcp::State::Established {
            assert!(Instant::now() < deadline, "no connection");
            h.turn().await;
        }
        // Two hours of silence later (keep-alives only): still there.
        h.advance(Duration::from_secs(2 * 3600));
        assert_eq!(state(&h), tcp::State::Established, "dropped within two hours");
        assert_eq!(h.dp.tcp.len(), 1);
        // Past 2 h 4 min: reset.
        h.advance(Duration::from_secs(5 * 60));
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(&h) != tcp::State::Closed {
            assert!(Instant::now() < deadline, "the idle connection was not reset");
            h.turn().await;
        }
        h.turn().await;
        assert!(h.dp.tcp.is_empty(), "the flow is gone");
        let got = tokio::time::timeout(Duration::from_secs(5), service).await;
        assert!(got.is_ok(), "the Service's side was let go of too");
    }
}
